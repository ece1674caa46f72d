//! The `[federation]` section of the node's configuration: where the coordinator is, this
//! site's certificate, and the site's own privacy limits.

use std::path::PathBuf;

use serde::Deserialize;

/// The `[federation]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSettings {
    /// This site's name in the consortium (as in its certificate).
    pub site: protocol::SiteId,
    /// The coordinator's address, `host:port` (UDP). The node dials out; nothing dials in.
    pub coordinator: String,
    /// The DNS name in the coordinator's certificate (default: the host of `coordinator`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// `auto` (QUIC, falling back to TLS on TCP when QUIC cannot connect), `quic` or `tcp`.
    #[serde(default)]
    pub transport: Transport,
    /// The coordinator's TCP fallback, `host:port` (default: the same as `coordinator`).
    #[serde(default)]
    pub coordinator_tcp: Option<String>,
    /// The consortium CA certificate.
    pub ca: PathBuf,
    /// This site's certificate and private key (0600).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The consortium's revocation list (PEM), to check other sites' certificates against
    /// before masking for them; the coordinator also relays its current one.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// The site's own minimum cell count; the larger of it and the schema's applies (never
    /// below 5).
    #[serde(default)]
    pub min_cell_count: Option<u32>,
    /// Seconds between polls of the coordinator when running as a service.
    #[serde(default = "default_poll")]
    pub poll_seconds: u64,
    /// The site's differential-privacy budget per dataset (consortium protocol): releases
    /// that would spend more in total are refused.
    #[serde(default = "default_budget_epsilon")]
    pub privacy_budget_epsilon: f64,
    #[serde(default = "default_budget_delta")]
    pub privacy_budget_delta: f64,
    /// New kinds of release (a first schema, or one that widens what leaves) wait for
    /// `fedcurate-node egress approve`. Set to false to let every schema's releases leave.
    #[serde(default = "default_true")]
    pub egress_approval: bool,
}

fn default_budget_epsilon() -> f64 {
    10.0
}

fn default_budget_delta() -> f64 {
    1e-5
}

fn default_true() -> bool {
    true
}

/// How the node reaches the coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Auto,
    Quic,
    Tcp,
}

fn default_poll() -> u64 {
    30
}

impl FederationSettings {
    /// The name the coordinator's certificate must carry.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            self.coordinator
                .rsplit_once(':')
                .map_or(self.coordinator.as_str(), |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_owned()
        })
    }
}
