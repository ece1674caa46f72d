//! `fedcurate-coordinator`: the consortium coordinator's command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use coordinator::config::CoordinatorConfig;

#[derive(Parser, Debug)]
#[command(
    name = "fedcurate-coordinator",
    version,
    about = "fedcurate coordinator: schemas, aggregates and model updates, never images or identifiers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a coordinator configuration file and print the registered sites.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve the nodes over QUIC (mutual TLS); stops cleanly on SIGTERM or Ctrl-C.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write the consortium report (JSON and HTML) from the coordinator's state and print
    /// where it is.
    Report {
        #[arg(long)]
        config: PathBuf,
    },
    /// The consortium's certificate authority.
    Pki {
        /// The PKI folder (owner-only; keep it offline and backed up).
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Create the consortium CA (refuses to overwrite one).
    Init {
        #[arg(long, default_value = "fedcurate")]
        consortium: String,
    },
    /// Make a key and a client certificate for a site (prefer sign-request).
    IssueSite {
        site: String,
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: i64,
    },
    /// Make a key and a server certificate for the coordinator's DNS name.
    IssueCoordinator {
        host: String,
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: i64,
    },
    /// Sign a site's certificate request (made by `fedcurate-node pki request`).
    SignRequest {
        site: String,
        csr: PathBuf,
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: i64,
    },
    /// Revoke every certificate of a site or coordinator and re-sign the CRL.
    Revoke { name: String },
    /// Replace a certificate before it expires (same key; `--csr` for request-made sites).
    Renew {
        name: String,
        #[arg(long)]
        coordinator: bool,
        #[arg(long)]
        csr: Option<PathBuf>,
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: i64,
    },
    /// Re-sign the CRL with a fresh validity (run it before the CRL's next update).
    Crl,
    /// List issued certificates with fingerprint, expiry and status.
    List,
}

/// Server TLS (for QUIC and the TCP fallback alike) and the fingerprint registry, from the
/// files named in `[tls]`, each read once.
fn load_tls(
    cfg: &CoordinatorConfig,
    tls: &coordinator::config::TlsConfig,
) -> Result<(
    rustls::ServerConfig,
    std::collections::HashMap<String, protocol::SiteId>,
)> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("reading {} (named in [tls])", p.display()))
    };
    let server = coordinator::net::server_tls(
        &read(&tls.ca)?,
        &read(&tls.crl)?,
        &read(&tls.cert)?,
        &read(&tls.key)?,
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let issued = coordinator::pki::Pki::load_issued(&tls.issued)?;
    let members: std::collections::BTreeSet<_> = cfg.sites.iter().map(|s| s.id.clone()).collect();
    let sites: std::collections::HashMap<_, _> = coordinator::net::site_fingerprints(&issued, now)
        .into_iter()
        .filter(|(_, site)| members.contains(site))
        .collect();
    for m in &members {
        if !sites.values().any(|s| s == m) {
            tracing::warn!(site = %m, "no valid certificate issued to this site: it cannot connect");
        }
    }
    Ok((server, sites))
}

/// The revocation list (first CRL of the PEM file) as DER, relayed to sites with peer keys.
fn crl_der(path: &std::path::Path) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let crl = CertificateRevocationListDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| anyhow::anyhow!("{} holds no revocation list", path.display()))?
        .with_context(|| format!("reading the revocation list {}", path.display()))?;
    Ok(crl.as_ref().to_vec())
}

fn mtimes(tls: &coordinator::config::TlsConfig) -> Vec<Option<std::time::SystemTime>> {
    [&tls.ca, &tls.crl, &tls.cert, &tls.key, &tls.issued]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Open the state directory (owner-only) and the coordinator's logic over it.
fn open_hub(cfg: &CoordinatorConfig) -> Result<coordinator::Hub> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let store = coordinator::store::Store::open(&cfg.state_dir.join("coordinator.sqlite"))?;
    let schema = match &cfg.schema {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the schema {}", p.display()))?;
            Some(
                protocol::SchemaDocument::new(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            )
        }
        None => None,
    };
    let mut hub = coordinator::Hub::new(
        cfg.sites.iter().map(|s| s.id.clone()),
        store,
        schema,
        cfg.min_sites_for_model,
    )?;
    hub.set_secure_timeout(cfg.secure_timeout_seconds);
    if let Some(t) = &cfg.training {
        let text = std::fs::read_to_string(&t.job)
            .with_context(|| format!("reading the training job {}", t.job.display()))?;
        let model = std::fs::read(&t.initial_model)
            .with_context(|| format!("reading the initial model {}", t.initial_model.display()))?;
        let doc = coordinator::training::job_document(&text, &model)
            .map_err(|e| anyhow::anyhow!("{}: {e}", t.job.display()))?;
        let trainer = coordinator::training::Trainer::open(
            &cfg.state_dir,
            doc,
            &model,
            cfg.sites.iter().map(|s| s.id.clone()),
        )?;
        tracing::info!(
            job = %trainer.job().id,
            round = trainer.round(),
            revision = trainer.revision(),
            "training job published"
        );
        hub.set_training(trainer);
    }
    Ok(hub)
}

/// Write the consortium report (JSON and HTML) into `state_dir/report/`, atomically.
fn write_report(hub: &coordinator::Hub, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let report = coordinator::report::build(hub)?;
    let out = dir.join("report");
    std::fs::create_dir_all(&out)?;
    let put = |name: &str, bytes: &[u8]| -> Result<()> {
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, out.join(name))?;
        Ok(())
    };
    put("report.json", &serde_json::to_vec_pretty(&report)?)?;
    put("report.html", coordinator::report::html(&report).as_bytes())?;
    Ok(out)
}

fn serve(path: &std::path::Path) -> Result<()> {
    use std::io::Write as _;
    let cfg = CoordinatorConfig::load(path)?;
    let tls = cfg.tls.clone().with_context(|| {
        format!(
            "{}: add a [tls] section (ca, crl, cert, key, issued) to serve",
            path.display()
        )
    })?;
    let (server, sites) = load_tls(&cfg, &tls)?;
    let mut hub = open_hub(&cfg)?;
    hub.set_crl(crl_der(&tls.crl)?);
    tracing::info!(
        round = hub.round(),
        schema = hub.schema().map(|(_, s)| s.id.as_str()).unwrap_or("(none)"),
        "coordinator state opened"
    );
    let hub = std::sync::Arc::new(std::sync::Mutex::new(hub));
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        // Installed before anyone learns the address, so an early SIGTERM is still clean.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let service = coordinator::net::Service::start_with(
            coordinator::net::quic_server_config(server.clone())?,
            cfg.listen,
            hub.clone(),
            sites,
            cfg.limits,
        )?;
        println!("listening on {}", service.local_addr()?);
        let tcp = if cfg.tcp_fallback {
            let addr = cfg.listen_tcp.unwrap_or(service.local_addr()?);
            let tcp = coordinator::net::TcpService::start_with(
                server,
                addr,
                hub.clone(),
                service.sites(),
                cfg.limits,
            )
            .await?;
            println!("tcp fallback on {}", tcp.local_addr());
            Some(tcp)
        } else {
            None
        };
        std::io::stdout().flush()?;
        let mut seen = mtimes(&tls);
        let mut reported = u64::MAX;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {
                    if let Ok(mut h) = hub.lock() {
                        h.tick(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs() as i64),
                        );
                    }
                    let now = mtimes(&tls);
                    if now != seen {
                        seen = now;
                        match load_tls(&cfg, &tls) {
                            Ok((server, sites)) => match coordinator::net::quic_server_config(server.clone()) {
                                Ok(quic) => {
                                    service.reload(quic, sites);
                                    if let Some(t) = &tcp {
                                        t.reload(server);
                                    }
                                    if let (Ok(der), Ok(mut h)) = (crl_der(&tls.crl), hub.lock()) {
                                        h.set_crl(der);
                                    }
                                    tracing::info!("reloaded the certificates, revocation list and register");
                                }
                                Err(e) => tracing::error!(error = %e, "could not reload [tls]; keeping the previous material"),
                            },
                            Err(e) => tracing::error!(error = %format!("{e:#}"), "could not reload [tls]; keeping the previous material"),
                        }
                    }
                    let changes = hub.lock().map(|h| h.changes()).unwrap_or(0);
                    if changes != reported {
                        reported = changes;
                        if let Ok(h) = hub.lock()
                            && let Err(e) = write_report(&h, &cfg.state_dir)
                        {
                            tracing::error!(error = %format!("{e:#}"), "could not write the consortium report");
                        }
                    }
                }
            }
        }
        tracing::info!("stopping: closing connections");
        if let Some(t) = &tcp {
            t.close();
        }
        service.endpoint.close(0u32.into(), b"coordinator stopping");
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            service.endpoint.wait_idle(),
        )
        .await;
        if let Ok(h) = hub.lock() {
            write_report(&h, &cfg.state_dir)?;
        }
        println!("stopped");
        Ok(())
    })
}

fn pki(dir: &std::path::Path, command: PkiCommand) -> Result<()> {
    use coordinator::pki::{Pki, Role};
    let p = Pki::at(dir);
    let show = |f: coordinator::pki::IssuedFiles| {
        println!("certificate {}", f.certificate.display());
        if let Some(k) = f.key {
            println!(
                "key         {} (0600: hand it over on a secure channel)",
                k.display()
            );
        }
        println!("fingerprint {}", f.record.fingerprint);
    };
    match command {
        PkiCommand::Init { consortium } => {
            p.init(&consortium)?;
            println!("consortium CA created in {}", dir.display());
            println!("distribute {} to every site", p.ca_cert_path().display());
        }
        PkiCommand::IssueSite { site, days } => show(p.issue_site(&site, days)?),
        PkiCommand::IssueCoordinator { host, days } => show(p.issue_coordinator(&host, days)?),
        PkiCommand::SignRequest { site, csr, days } => {
            let pem = std::fs::read_to_string(&csr)
                .with_context(|| format!("reading the request {}", csr.display()))?;
            show(p.sign_request(&site, &pem, days)?);
        }
        PkiCommand::Revoke { name } => {
            let n = p.revoke(&name)?;
            println!(
                "{n} certificate(s) of {name} revoked; {} re-signed: copy it to the coordinator",
                p.crl_path().display()
            );
        }
        PkiCommand::Renew {
            name,
            coordinator,
            csr,
            days,
        } => {
            let pem = csr
                .map(|c| {
                    std::fs::read_to_string(&c)
                        .with_context(|| format!("reading the request {}", c.display()))
                })
                .transpose()?;
            let role = if coordinator {
                Role::Coordinator
            } else {
                Role::Site
            };
            show(p.renew(&name, role, pem.as_deref(), days)?);
        }
        PkiCommand::Crl => {
            p.refresh_crl()?;
            println!("{} re-signed", p.crl_path().display());
        }
        PkiCommand::List => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for i in p.issued()? {
                let status = if i.revoked.is_some() && i.superseded {
                    "revoked (renewed with a new key)".to_owned()
                } else if i.revoked.is_some() {
                    "revoked".to_owned()
                } else if i.not_after <= now {
                    "expired".to_owned()
                } else if i.superseded {
                    "superseded".to_owned()
                } else {
                    format!("valid, {} days left", (i.not_after - now) / 86_400)
                };
                println!(
                    "{:<11} {:<24} {} {}",
                    format!("{:?}", i.role).to_lowercase(),
                    i.name,
                    i.fingerprint,
                    status
                );
            }
        }
    }
    Ok(())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::CheckConfig { config } => {
            let cfg = CoordinatorConfig::load(&config)?;
            if let Some(p) = &cfg.schema {
                let text = std::fs::read_to_string(p).with_context(|| {
                    format!(
                        "reading the schema {} (named in {})",
                        p.display(),
                        config.display()
                    )
                })?;
                let doc = protocol::SchemaDocument::new(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                let s = doc.schema().map_err(|e| anyhow::anyhow!("{e}"))?;
                println!(
                    "schema  {} revision {} (k = {})",
                    s.id, s.revision, s.privacy.min_cell_count
                );
            }
            let mut errors = Vec::new();
            if let Some(tls) = &cfg.tls {
                for (what, p) in [
                    ("ca", &tls.ca),
                    ("crl", &tls.crl),
                    ("cert", &tls.cert),
                    ("key", &tls.key),
                    ("issued", &tls.issued),
                ] {
                    if std::fs::metadata(p).is_err() {
                        errors.push(format!(
                            "[tls] {what} = {}: cannot be read; correct the path or copy the file from the CA folder",
                            p.display()
                        ));
                    }
                }
                {
                    use std::os::unix::fs::PermissionsExt as _;
                    if let Ok(m) = std::fs::metadata(&tls.key)
                        && m.permissions().mode() & 0o077 != 0
                    {
                        errors.push(format!(
                            "[tls] key = {}: readable by others; run chmod 600 {}",
                            tls.key.display(),
                            tls.key.display()
                        ));
                    }
                }
                if let Ok(pem) = std::fs::read(&tls.cert) {
                    match coordinator::pki::not_after(&pem) {
                        Some(t) if t <= now_secs() => errors.push(format!(
                            "[tls] cert = {}: expired; renew it with `fedcurate-coordinator pki renew HOST --coordinator`",
                            tls.cert.display()
                        )),
                        Some(t) => println!("cert    expires in {} days", (t - now_secs()) / 86_400),
                        None => errors.push(format!(
                            "[tls] cert = {}: not a PEM certificate",
                            tls.cert.display()
                        )),
                    }
                }
                if let (Ok(ca), Ok(crl), Ok(cert), Ok(key)) = (
                    std::fs::read(&tls.ca),
                    std::fs::read(&tls.crl),
                    std::fs::read(&tls.cert),
                    std::fs::read(&tls.key),
                ) && let Err(e) = coordinator::net::server_tls(&ca, &crl, &cert, &key)
                {
                    errors.push(format!(
                        "[tls]: the files do not make a TLS configuration: {e}"
                    ));
                }
            } else {
                println!("warning: no [tls] section: `serve` needs one");
            }
            if !errors.is_empty() {
                for e in &errors {
                    println!("error: {e}");
                }
                anyhow::bail!("{}: {} problem(s) to fix", config.display(), errors.len());
            }
            println!("config {} is valid", config.display());
            println!("listen  {}", cfg.listen);
            println!("sites   {}", cfg.sites.len());
            for s in &cfg.sites {
                println!("  {}", s.id);
            }
            Ok(())
        }
        Command::Pki { dir, command } => pki(&dir, command),
        Command::Serve { config } => serve(&config),
        Command::Report { config } => {
            let cfg = CoordinatorConfig::load(&config)?;
            let hub = open_hub(&cfg)?;
            let out = write_report(&hub, &cfg.state_dir)?;
            println!("{}", out.join("report.html").display());
            Ok(())
        }
    }
}
