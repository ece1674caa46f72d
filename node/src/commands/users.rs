//! `users`: the web annotator's local accounts (argon2id password hashes in the catalog).
//! Passwords are read from the terminal without echo, or as one line from standard input.

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use fc_annotator::accounts::{self, Role};
use node::config::NodeConfig;

#[derive(Subcommand, Debug)]
pub(crate) enum UsersCommand {
    /// Add an account (the password is asked for, or read from standard input).
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Change an account's password (its sessions end).
    Passwd { name: String },
    /// Disable an account (its sessions end); `--enable` undoes it.
    Disable {
        name: String,
        #[arg(long)]
        enable: bool,
    },
    /// The accounts.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum RoleArg {
    Annotator,
    Reviewer,
    Admin,
}

fn password(prompt: &str) -> Result<String> {
    use std::io::{BufRead, IsTerminal};
    let p = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt).context("reading the password")?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if p.is_empty() {
        bail!("no password given");
    }
    Ok(p)
}

/// Run a `users` command.
pub(crate) fn users(config: &NodeConfig, command: UsersCommand) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {} to its owner", config.data_dir.display()))?;
    }
    let mut catalog = node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
    catalog.set_audit_key(config.audit_key()?);
    match command {
        UsersCommand::Add { name, role } => {
            let role = match role {
                RoleArg::Annotator => Role::Annotator,
                RoleArg::Reviewer => Role::Reviewer,
                RoleArg::Admin => Role::Admin,
            };
            let p = password(&format!("password for {name}: "))?;
            accounts::add(&mut catalog, &name, role, &p)?;
            println!("user {name} added ({})", role.name());
        }
        UsersCommand::Passwd { name } => {
            let p = password(&format!("new password for {name}: "))?;
            accounts::passwd(&mut catalog, &name, &p)?;
            println!("password of {name} changed; its sessions ended");
        }
        UsersCommand::Disable { name, enable } => {
            accounts::set_disabled(&mut catalog, &name, !enable)?;
            println!(
                "user {name} {}",
                if enable {
                    "enabled"
                } else {
                    "disabled; its sessions ended"
                }
            );
        }
        UsersCommand::List { json } => {
            let users = catalog.users()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                for u in users {
                    println!(
                        "{:<24} {:<10} {:<9} created {}",
                        u.name,
                        u.role,
                        if u.disabled { "disabled" } else { "active" },
                        u.created
                    );
                }
            }
        }
    }
    Ok(())
}
