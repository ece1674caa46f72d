//! `annotator`: the web annotator, served from the node (loopback by default, TLS on the
//! LAN). It serves only the annotation workspace's de-identified images and its versions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use fc_annotator::listen;
use fc_annotator::server::{AppState, router};
use fc_annotator::web::Assets;
use node::config::NodeConfig;

/// Start the service and serve until SIGTERM or Ctrl-C.
pub(crate) fn annotator(
    config: &NodeConfig,
    listen_at: Option<SocketAddr>,
    web_assets: Option<PathBuf>,
) -> Result<()> {
    let mut settings = config.annotator.clone();
    if let Some(a) = listen_at {
        settings.listen = a;
    }
    if let Some(w) = web_assets {
        settings.web_assets = Some(w);
    }
    if let Err(e) = settings.validate() {
        bail!("{e}");
    }
    let started = std::time::Instant::now();
    let assets = Assets::load(&settings.web_assets_dir())?;
    let tls = match (&settings.tls_certificate, &settings.tls_key) {
        (Some(c), Some(k)) => Some(listen::tls_config(c, k)?),
        _ => None,
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let work = node::annotation::open(config, config.data_dir.join("deid"))?;
    let catalog = node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
    let origins = settings.origins();
    let state = AppState::new(
        catalog,
        origins[0].clone(),
        settings.tls(),
        Box::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        }),
    )
    .with_origins(origins)
    .with_session_limits(settings.session_idle_seconds, settings.session_max_seconds)
    .with_annotations(work, config.data_dir.join("exports").join("annotations"))
    .with_assets(assets);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let listener = listen::bind(settings.listen).await?;
        let app = router(Arc::new(state));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        tracing::info!(url = %settings.url(), tls = settings.tls(), "annotator listening");
        println!(
            "annotator: {} (ready in {} ms; `fedcurate-node users add NAME --role annotator|reviewer|admin` creates logins)",
            settings.url(),
            started.elapsed().as_millis()
        );
        listen::serve(listener, app, tls, stop).await?;
        Ok::<_, anyhow::Error>(())
    })
}
