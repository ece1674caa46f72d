//! The `[annotator]` section of the node's configuration: where the service listens, its TLS
//! certificate, and where the viewer's files are installed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The `[annotator]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotatorSettings {
    /// Address and port (default `127.0.0.1:8750`). Anything but loopback needs TLS.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL clinicians open (`https://annotator.hospital.example:8750`), when the service is
    /// reached under a name: requests that change anything must come from this origin.
    #[serde(default)]
    pub public_url: Option<String>,
    /// PEM certificate chain and private key for TLS.
    #[serde(default)]
    pub tls_certificate: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The viewer's installed files: the folder holding `package.json` and `node_modules`
    /// after `npm ci --ignore-scripts` (default: `web` next to the binary).
    #[serde(default)]
    pub web_assets: Option<PathBuf>,
    /// A session ends after this many seconds without a request (default 30 minutes)…
    #[serde(default = "default_idle")]
    pub session_idle_seconds: i64,
    /// …and this many seconds after login whatever happens (default 12 hours).
    #[serde(default = "default_absolute")]
    pub session_max_seconds: i64,
}

fn default_idle() -> i64 {
    crate::accounts::IDLE
}

fn default_absolute() -> i64 {
    crate::accounts::ABSOLUTE
}

impl Default for AnnotatorSettings {
    fn default() -> Self {
        AnnotatorSettings {
            listen: default_listen(),
            public_url: None,
            tls_certificate: None,
            tls_key: None,
            web_assets: None,
            session_idle_seconds: default_idle(),
            session_max_seconds: default_absolute(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8750))
}

impl AnnotatorSettings {
    /// Whether the service runs under TLS.
    pub fn tls(&self) -> bool {
        self.tls_certificate.is_some()
    }

    /// Check the settings: TLS needs both files; a LAN address needs TLS.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_certificate, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(
                    "[annotator] needs both tls_certificate and tls_key, or neither".into(),
                );
            }
            _ => {}
        }
        if self.session_idle_seconds < 1 || self.session_max_seconds < self.session_idle_seconds {
            return Err(
                "[annotator] session_idle_seconds must be at least 1 and at most session_max_seconds"
                    .into(),
            );
        }
        if !self.listen.ip().is_loopback() && !self.tls() {
            return Err(format!(
                "[annotator] listen = {} is not loopback: set tls_certificate and tls_key so \
                 passwords and images never cross the network in clear",
                self.listen
            ));
        }
        Ok(())
    }

    /// The origins whose pages may change anything: the public URL, the listening address,
    /// and on loopback also `localhost`.
    pub fn origins(&self) -> Vec<String> {
        let scheme = if self.tls() { "https" } else { "http" };
        let mut out = vec![format!("{scheme}://{}", self.listen)];
        if self.listen.ip().is_loopback() {
            out.push(format!("{scheme}://localhost:{}", self.listen.port()));
        }
        if let Some(u) = &self.public_url {
            out.push(u.trim_end_matches('/').to_owned());
        }
        out
    }

    /// The URL to print for users.
    pub fn url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| self.origins()[0].clone())
    }

    /// The web-assets folder: the setting, else `FEDCURATE_WEB_ASSETS`, else `web` next to the
    /// binary, else (in a source checkout, binary under `target/<profile>/`) the checkout's
    /// `web`.
    pub fn web_assets_dir(&self) -> PathBuf {
        if let Some(p) = &self.web_assets {
            return p.clone();
        }
        if let Some(p) = std::env::var_os("FEDCURATE_WEB_ASSETS") {
            return PathBuf::from(p);
        }
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let beside = exe_dir.join("web");
        if beside.join("package.json").exists() {
            return beside;
        }
        exe_dir
            .ancestors()
            .skip(1)
            .take(3)
            .map(|a| a.join("web"))
            .find(|p| p.join("package.json").exists())
            .unwrap_or(beside)
    }
}
