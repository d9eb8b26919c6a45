//! `viaduct`: the SIP load balancer.
//!
//! ```text
//! viaduct [--config FILE]          serve (defaults: SIP on UDP and TCP 127.0.0.1:5060)
//! viaduct check-config FILE        check a configuration and exit
//! ```
#![allow(clippy::disallowed_methods)] // the binary drives: it may spawn

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use balancer::config::Config;
use balancer::driver::Balancer;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "viaduct",
    version,
    about = "SIP load balancer that keeps no per-call table"
)]
struct Cli {
    /// Configuration file (TOML). Without one, the defaults serve.
    #[arg(long, short, global = true, env = "VIADUCT_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Check a configuration file, print the problems, exit non-zero if any.
    CheckConfig {
        /// The file to check (or --config).
        file: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("VIADUCT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match &cli.command {
        Some(Command::CheckConfig { file }) => check(file.as_ref().or(cli.config.as_ref())),
        Some(Command::Run) | None => serve(cli.config.as_ref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viaduct: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: Option<&PathBuf>) -> anyhow::Result<()> {
    let path = path.context("check-config needs a file (argument or --config)")?;
    load(Some(path))?;
    eprintln!("{}: ok", path.display());
    Ok(())
}

fn serve(path: Option<&PathBuf>) -> anyhow::Result<()> {
    let config = load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let balancer = Balancer::bind(&config).await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("interrupt: shutting down");
                let _ = stop.send(true);
            }
        });
        balancer.run(stopped).await
    })
}
