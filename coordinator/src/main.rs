//! `fedcurate-coordinator`: the consortium coordinator's command line.

use std::path::PathBuf;

use anyhow::Result;
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
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::CheckConfig { config } => {
            let cfg = CoordinatorConfig::load(&config)?;
            println!("config {} is valid", config.display());
            println!("listen  {}", cfg.listen);
            println!("sites   {}", cfg.sites.len());
            for s in &cfg.sites {
                println!("  {}", s.id);
            }
            Ok(())
        }
    }
}
