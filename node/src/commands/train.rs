//! `train`: the node's side of federated training ([training] in the config) and a shell
//! trainer's way to talk to it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use node::config::NodeConfig;

#[derive(Subcommand, Debug)]
pub(crate) enum TrainCommand {
    /// Take part in the coordinator's training job: the trainer's API on the Unix socket, the
    /// rounds with the coordinator. Runs until SIGTERM.
    Serve,
    /// Wait for a round after --after to open; write its global model to --out and print the
    /// round's JSON (`"finished": true` once the job is done).
    Wait {
        #[arg(long, default_value_t = 0)]
        after: u32,
        /// Where to write the global model (safetensors).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds to wait.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Hand in this round's update (a safetensors file with the job's layout).
    Push {
        #[arg(long)]
        round: u32,
        /// Training samples behind the update (the weight under sample weighting).
        #[arg(long, default_value_t = 1)]
        samples: u64,
        /// The file holds the model after training (`weights`) or the change (`delta`).
        #[arg(long, default_value = "weights")]
        kind: String,
        /// A metric the job defines, `name=value` (repeat).
        #[arg(long = "metric")]
        metrics: Vec<String>,
        file: PathBuf,
    },
    /// What the node is doing for the job.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The privacy accountant: ε after --rounds rounds with noise multiplier --noise at
    /// --delta (RDP, as Google's dp-accounting converts it).
    Epsilon {
        #[arg(long)]
        noise: f64,
        #[arg(long)]
        rounds: u32,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
}

fn socket(config: &NodeConfig) -> PathBuf {
    config.training.socket_path(&config.data_dir)
}

pub(crate) fn train(config: &NodeConfig, command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Serve => serve(config),
        TrainCommand::Epsilon {
            noise,
            rounds,
            delta,
        } => {
            let (eps, order) = fc_training::accountant::epsilon(noise, rounds, delta);
            println!(
                "{}",
                serde_json::json!({
                    "epsilon": eps, "order": order, "delta": delta,
                    "rho": fc_training::accountant::zcdp_rho(noise, rounds),
                })
            );
            Ok(())
        }
        TrainCommand::Wait {
            after,
            out,
            timeout,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
                loop {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let a = fc_training::client::call(
                        &socket(config),
                        "GET",
                        &format!("/v1/round?after={after}&timeout={}", left.as_secs().min(60)),
                        &[],
                    )
                    .await?;
                    if a.status == 200 {
                        let v = a.json();
                        if let Some(out) = &out {
                            let rev = v["revision"].as_u64().unwrap_or(0);
                            let m = fc_training::client::call(
                                &socket(config),
                                "GET",
                                &format!("/v1/model/{rev}"),
                                &[],
                            )
                            .await?;
                            if m.status != 200 {
                                bail!("the model: {}", String::from_utf8_lossy(&m.body));
                            }
                            std::fs::write(out, &m.body)
                                .with_context(|| format!("writing {}", out.display()))?;
                        }
                        println!("{v}");
                        return Ok(());
                    }
                    if a.status != 202 {
                        bail!("{}", String::from_utf8_lossy(&a.body));
                    }
                    if left.is_zero() {
                        bail!("no round opened within {timeout} s");
                    }
                }
            })
        }
        TrainCommand::Push {
            round,
            samples,
            kind,
            metrics,
            file,
        } => {
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut target = format!("/v1/update?round={round}&samples={samples}&kind={kind}");
            for m in &metrics {
                let (k, v) = m
                    .split_once('=')
                    .with_context(|| format!("--metric {m}: write name=value"))?;
                target.push_str(&format!("&metric={k}:{v}"));
            }
            let rt = tokio::runtime::Runtime::new()?;
            let a = rt.block_on(fc_training::client::call(
                &socket(config),
                "POST",
                &target,
                &body,
            ))?;
            if a.status != 200 {
                bail!(
                    "the node refused the update: {}",
                    a.json()["error"].as_str().unwrap_or("")
                );
            }
            println!("{}", a.json());
            Ok(())
        }
        TrainCommand::Status { json } => {
            let rt = tokio::runtime::Runtime::new()?;
            let a = rt.block_on(fc_training::client::call(
                &socket(config),
                "GET",
                "/v1/status",
                &[],
            ))?;
            let v = a.json();
            if json {
                println!("{v}");
            } else {
                println!(
                    "job {} · {} · round {} · global model revision {} · {} chunks sent, {} resumed{}",
                    v["job"]["id"].as_str().unwrap_or("(none)"),
                    v["phase"].as_str().unwrap_or(""),
                    v["round"],
                    v["revision"],
                    v["chunks_sent"],
                    v["chunks_skipped"],
                    v["error"]
                        .as_str()
                        .map(|e| format!(" · last error: {e}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

fn serve(config: &NodeConfig) -> Result<()> {
    let Some(fed) = config.federation.clone() else {
        bail!(
            "add a [federation] section to the node configuration (see deploy/node.toml): training runs with the consortium's coordinator"
        );
    };
    std::fs::create_dir_all(&config.data_dir)?;
    let site = fed.site.clone();
    let session = fc_federation::session::Session::new(fed, &config.data_dir)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let endpoint = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
            .context("opening a UDP socket for QUIC")?;
        let shared = fc_training::agent::Shared::new(&site);
        let agent = fc_training::agent::Agent::new(
            session,
            endpoint.clone(),
            &config.data_dir,
            config.training.clone(),
            shared.clone(),
        )?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let path = socket(config);
        let settings = config.training.clone();
        let api_path = path.clone();
        let mut rx = stop_rx.clone();
        let api = tokio::spawn(async move {
            fc_training::api::serve(&api_path, &settings, shared, async move {
                let _ = rx.changed().await;
            })
            .await
        });
        // The socket exists before anyone is told where it is.
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        println!("trainer API on {}", path.display());
        std::io::stdout().flush()?;
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.changed().await;
        };
        let signals = async {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        tokio::pin!(signals);
        tokio::select! {
            _ = agent.run(stop) => {
                println!("training job finished; serving the final model until stopped");
                std::io::stdout().flush()?;
                (&mut signals).await;
            }
            _ = &mut signals => {}
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), api).await;
        let _ = std::fs::remove_file(&path);
        endpoint.close(0u32.into(), b"node stopping");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        println!("stopped");
        Ok(())
    })
}
