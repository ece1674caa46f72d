//! For hospital IT: `check-config` (what is wrong with a configuration, and what to do about
//! it), `status` and the Prometheus metrics (queue depths, outcomes, last contact with the
//! coordinator, certificate expiry, de-identification rate). Nothing here names a patient.

use std::path::Path;

use crate::config::NodeConfig;

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The node will not work (or not safely) until it is fixed.
    Error,
    /// The node works, but probably not as intended.
    Warning,
}

/// One finding of `check-config`: what is wrong, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub level: Level,
    /// A stable code, e.g. `key-permissions`.
    pub code: &'static str,
    pub what: String,
    pub fix: String,
}

fn problem(level: Level, code: &'static str, what: String, fix: String) -> Problem {
    Problem {
        level,
        code,
        what,
        fix,
    }
}

#[cfg(unix)]
fn mode(p: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn mode(_: &Path) -> Option<u32> {
    None
}

/// A secret file must exist, be readable, and be readable by its owner only.
fn secret_file(out: &mut Vec<Problem>, p: &Path, what: &str, required: bool) {
    match std::fs::metadata(p) {
        Err(_) if !required => {}
        Err(e) => out.push(problem(
            Level::Error,
            "missing-file",
            format!("{what} {} cannot be read: {e}", p.display()),
            format!("create it, or correct the path in the config ({what})"),
        )),
        Ok(_) => {
            if let Some(m) = mode(p)
                && m & 0o077 != 0
            {
                out.push(problem(
                    Level::Error,
                    "key-permissions",
                    format!("{what} {} is readable by others (mode {m:o})", p.display()),
                    format!("chmod 600 {}", p.display()),
                ));
            }
        }
    }
}

/// Not-after of a PEM certificate, seconds since the epoch.
pub fn certificate_expiry(pem: &str) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Check a configuration; `online` also tries to reach the coordinator.
pub fn check_config(config: &NodeConfig, online: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    let d = &config.data_dir;
    match std::fs::metadata(d) {
        Ok(m) if !m.is_dir() => out.push(problem(
            Level::Error,
            "data-dir",
            format!("data_dir {} is not a folder", d.display()),
            "point data_dir at a folder on local storage".into(),
        )),
        Ok(_) => {
            if let Some(m) = mode(d)
                && m & 0o077 != 0
            {
                out.push(problem(
                    Level::Error,
                    "data-dir-permissions",
                    format!("data_dir {} is open to others (mode {m:o})", d.display()),
                    format!("chmod 700 {}", d.display()),
                ));
            }
            let probe = d.join(".fc-check-config");
            if std::fs::write(&probe, b"").is_err() {
                out.push(problem(
                    Level::Error,
                    "data-dir-readonly",
                    format!("data_dir {} is not writable by this user", d.display()),
                    "run the node as the owner of data_dir (e.g. the fedcurate user)".into(),
                ));
            }
            let _ = std::fs::remove_file(probe);
        }
        Err(_) => {
            let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.exists()) {
                out.push(problem(
                    Level::Error,
                    "data-dir",
                    format!("data_dir {} and its parent do not exist", d.display()),
                    "create the parent folder, or correct data_dir".into(),
                ));
            }
        }
    }
    if !config.deid.anonymises(false) {
        let secret = config.deid.secret_path(d);
        let explicit = config.deid.site_secret_file.is_some();
        secret_file(&mut out, &secret, "the site secret", explicit);
    }
    if let Some(k) = &config.deid.vault_key_file {
        secret_file(&mut out, k, "the vault key", true);
        if k.starts_with(d) {
            out.push(problem(
                Level::Warning,
                "vault-key-in-data-dir",
                format!("the vault key {} lies inside data_dir", k.display()),
                "keep the vault key apart from the data directory and its backups".into(),
            ));
        }
    }
    if let Err(e) = config.deid.policy() {
        out.push(problem(
            Level::Error,
            "deid-policy",
            e.to_string(),
            "fix the [deid] section".into(),
        ));
    }
    let (audit_key, _) = config.audit_key_source();
    if audit_key.starts_with(&config.data_dir) {
        out.push(problem(
            Level::Warning,
            "audit-key-in-data-dir",
            format!(
                "the audit chain's key comes from {}, inside the data directory: whoever can write the catalog can also recompute the chain",
                audit_key.display()
            ),
            "set audit_key_file (or [deid] site_secret_file) to a file outside the data directory, e.g. /etc/fedcurate/audit.key".into(),
        ));
    }
    if config.scp.allowed.is_empty() {
        out.push(problem(
            Level::Warning,
            "scp-nobody-allowed",
            "[scp] allowed is empty: `serve` refuses every association".into(),
            "list the PACS and modalities that may send, e.g. allowed = [{ ae = \"PACS\", host = \"10.1.2.3\" }]".into(),
        ));
    }
    if let Some(f) = &config.federation {
        for (what, p) in [
            ("the consortium CA", &f.ca),
            ("the site certificate", &f.cert),
        ] {
            match std::fs::read_to_string(p) {
                Err(e) => out.push(problem(
                    Level::Error,
                    "missing-file",
                    format!("{what} {} cannot be read: {e}", p.display()),
                    "copy it from the consortium's operators, or correct [federation]".into(),
                )),
                Ok(pem) => match certificate_expiry(&pem) {
                    None => out.push(problem(
                        Level::Error,
                        "certificate",
                        format!("{what} {} is not a PEM certificate", p.display()),
                        "replace it with the PEM file the CA issued".into(),
                    )),
                    Some(t) if t <= now() => out.push(problem(
                        Level::Error,
                        "certificate-expired",
                        format!("{what} {} has expired", p.display()),
                        "ask the consortium for a renewal (`fedcurate-coordinator pki renew`)"
                            .into(),
                    )),
                    Some(t) if t - now() < 30 * 86_400 => out.push(problem(
                        Level::Warning,
                        "certificate-expiring",
                        format!(
                            "{what} {} expires in {} days",
                            p.display(),
                            (t - now()) / 86_400
                        ),
                        "ask the consortium for a renewal before it expires".into(),
                    )),
                    Some(_) => {}
                },
            }
        }
        secret_file(&mut out, &f.key, "the site key", true);
        // The schema the node follows: can this node's profile satisfy it?
        let schema = std::fs::read_to_string(d.join("federation/schema.toml"))
            .ok()
            .and_then(|t| protocol::schema::CurationSchema::parse(&t).ok());
        if let (Some(s), Ok(policy)) = (schema, config.deid.policy()) {
            let check = crate::site::aggregate::profile_check(&s, &policy);
            for i in check.missing {
                if let Some(name) = s.deidentification.options.get(usize::from(i)) {
                    out.push(problem(
                        Level::Error,
                        "schema-deid-requirement",
                        format!("the consortium schema {} requires de-identification option {name}, which [deid] options lacks", s.id),
                        format!("add \"{name}\" to [deid] options and de-identify again"),
                    ));
                }
            }
        }
        if online && let Err(e) = reach(config) {
            out.push(problem(
                Level::Error,
                "coordinator-unreachable",
                format!("the coordinator {} was not reached: {e}", f.coordinator),
                "check the address, the firewall (UDP, or TCP for the fallback), and the certificates".into(),
            ));
        }
    }
    out
}

/// Connect to the coordinator and say hello (the same as a federation session would).
fn reach(config: &NodeConfig) -> Result<(), String> {
    let site =
        crate::site::Site::new(config, config.data_dir.join("deid")).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let endpoint = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| e.to_string())?;
        let (link, _) = site.connect(&endpoint).await.map_err(|e| e.to_string())?;
        link.close().await;
        Ok(())
    })
}

/// What `status` and the metrics report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub written: usize,
    pub duplicates: usize,
    pub quarantined: usize,
    pub quarantine_open: usize,
    /// Files waiting in the inbox and being processed.
    pub inbox_depth: usize,
    pub harmonised: usize,
    /// Seconds since the epoch of the last welcome from the coordinator.
    pub last_federation_contact: Option<i64>,
    pub messages_sent: usize,
    /// Seconds since the epoch when the site certificate expires.
    pub certificate_expiry: Option<i64>,
    /// Inputs per second of the last finished de-identification run.
    pub deid_rate: Option<f64>,
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |r| {
        r.flatten()
            .filter(|e| {
                e.file_type().is_ok_and(|t| t.is_file())
                    && !e.file_name().to_string_lossy().starts_with(".fc-tmp-")
            })
            .count()
    })
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ` (the catalog's timestamps).
fn parse_time(s: &str) -> Option<i64> {
    let num = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hh, mm, ss) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// The node's status from its data directory.
pub fn status(config: &NodeConfig) -> Result<Status, crate::catalog::CatalogError> {
    let d = &config.data_dir;
    let catalog = crate::catalog::Catalog::open(&d.join("catalog.sqlite"))?;
    let t = catalog.totals()?;
    let egress = catalog.egress()?;
    let last = egress
        .iter()
        .rev()
        .find(|e| e.answer.starts_with("welcome"))
        .and_then(|e| parse_time(&e.at));
    let rate = catalog
        .connection()
        .query_row(
            "SELECT started_at, finished_at, (SELECT COUNT(*) FROM inputs WHERE run_id = runs.id)
             FROM runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .ok()
        .and_then(|(a, b, n)| {
            let secs = parse_time(&b)? - parse_time(&a)?;
            Some(n as f64 / secs.max(1) as f64)
        });
    let certificate_expiry = config
        .federation
        .as_ref()
        .and_then(|f| std::fs::read_to_string(&f.cert).ok())
        .and_then(|pem| certificate_expiry(&pem));
    Ok(Status {
        written: t.written,
        duplicates: t.duplicates,
        quarantined: t.quarantined,
        quarantine_open: catalog.quarantine_entries(false)?.len(),
        inbox_depth: count_files(&d.join("inbox")) + count_files(&d.join("inbox-processing")),
        harmonised: catalog.harmonised()?.len(),
        last_federation_contact: last,
        messages_sent: egress.len(),
        certificate_expiry,
        deid_rate: rate,
    })
}

/// The status in Prometheus' text exposition format.
pub fn metrics_text(s: &Status) -> String {
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
        o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            o.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    gauge(
        "fedcurate_inputs_total",
        "Inputs recorded in the catalog, by outcome.",
        "counter",
        &[
            ("{outcome=\"written\"}".into(), s.written as f64),
            ("{outcome=\"duplicate\"}".into(), s.duplicates as f64),
            ("{outcome=\"quarantined\"}".into(), s.quarantined as f64),
        ],
    );
    gauge(
        "fedcurate_quarantine_open",
        "Quarantined inputs not released.",
        "gauge",
        &[(String::new(), s.quarantine_open as f64)],
    );
    gauge(
        "fedcurate_inbox_depth",
        "Received objects waiting to be de-identified.",
        "gauge",
        &[(String::new(), s.inbox_depth as f64)],
    );
    gauge(
        "fedcurate_harmonised_volumes_total",
        "Volumes harmonised.",
        "counter",
        &[(String::new(), s.harmonised as f64)],
    );
    gauge(
        "fedcurate_federation_messages_total",
        "Messages sent to the coordinator (the egress log).",
        "counter",
        &[(String::new(), s.messages_sent as f64)],
    );
    if let Some(t) = s.last_federation_contact {
        gauge(
            "fedcurate_federation_last_contact_timestamp_seconds",
            "When the coordinator last welcomed this site.",
            "gauge",
            &[(String::new(), t as f64)],
        );
    }
    if let Some(t) = s.certificate_expiry {
        gauge(
            "fedcurate_certificate_expiry_timestamp_seconds",
            "When the site certificate expires.",
            "gauge",
            &[(String::new(), t as f64)],
        );
    }
    if let Some(r) = s.deid_rate {
        gauge(
            "fedcurate_deid_inputs_per_second",
            "De-identification rate of the last finished run.",
            "gauge",
            &[(String::new(), r)],
        );
    }
    o
}

/// Serve the metrics over HTTP on `listen`, which must be a loopback address (metrics stay
/// on the host; a local Prometheus or node exporter scrapes them). Runs until killed.
pub fn serve_metrics(config: &NodeConfig, listen: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    if !listen.ip().is_loopback() {
        return Err(std::io::Error::other(
            "the metrics endpoint listens on loopback only (e.g. 127.0.0.1:9464)",
        ));
    }
    let listener = std::net::TcpListener::bind(listen)?;
    println!("metrics on http://{}/metrics", listener.local_addr()?);
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let mut buf = [0u8; 2048];
        let n = conn.read(&mut buf).unwrap_or(0);
        let request = String::from_utf8_lossy(&buf[..n]);
        let (code, body) = if request.starts_with("GET /metrics") {
            match status(config) {
                Ok(s) => ("200 OK", metrics_text(&s)),
                Err(e) => ("500 Internal Server Error", format!("{e}\n")),
            }
        } else {
            ("404 Not Found", "GET /metrics\n".to_owned())
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_timestamps_parse_back() {
        for t in [0i64, 951_782_400, 1_795_000_000, 4_102_444_800] {
            assert_eq!(parse_time(&crate::audit::format_utc(t)), Some(t));
        }
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let m = metrics_text(&Status {
            written: 3,
            quarantine_open: 1,
            certificate_expiry: Some(100),
            ..Status::default()
        });
        assert!(m.contains("# TYPE fedcurate_inputs_total counter"));
        assert!(m.contains("fedcurate_inputs_total{outcome=\"written\"} 3\n"));
        assert!(m.contains("fedcurate_quarantine_open 1\n"));
        assert!(m.contains("fedcurate_certificate_expiry_timestamp_seconds 100\n"));
        assert!(
            !m.contains("last_contact"),
            "absent values are not invented"
        );
    }
}
