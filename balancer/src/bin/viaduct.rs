//! `viaduct`: the SIP load balancer.
//!
//! ```text
//! viaduct [run] [--config FILE]       serve (defaults: SIP on UDP and TCP 127.0.0.1:5060,
//!                                     agents on 127.0.0.1:5070)
//! viaduct check-config FILE           check a configuration, print the effective one
//! --log-format text|json              log lines as text (default) or JSON
//! ```
//!
//! Signals: SIGINT/SIGTERM stop gracefully (stop accepting, flush queues
//! within `sip.shutdown_grace_ms`, exit 0); SIGHUP re-reads the config file
//! and applies what can change at run time (`log.filter`), and names the
//! changed fields that need a restart.
#![allow(clippy::disallowed_methods)] // the binary drives: it may spawn and read clocks

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use balancer::config::{Config, SECRET_ENV};
use balancer::driver::Balancer;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The environment variable whose filter, when set, wins over `log.filter`.
const LOG_ENV: &str = "VIADUCT_LOG";

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
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Check a configuration file: print the effective configuration, or
    /// every problem (field and line) and exit non-zero.
    CheckConfig {
        /// The file to check (or --config).
        file: Option<PathBuf>,
    },
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let initial = std::env::var(LOG_ENV).unwrap_or_else(|_| "info".to_owned());
    let (filter, filter_handle) =
        reload::Layer::new(EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info")));
    let json = cli.log_format == LogFormat::Json;
    let text_layer = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text_layer)
        .with(json_layer)
        .init();
    let result = match &cli.command {
        Some(Command::CheckConfig { file }) => check(file.as_ref().or(cli.config.as_ref())),
        Some(Command::Run) | None => serve(cli.config.as_deref(), &filter_handle),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viaduct: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    })
}

fn check(path: Option<&PathBuf>) -> anyhow::Result<()> {
    let path = path.context("check-config needs a file (argument or --config)")?;
    let config = load(Some(path))?;
    let secrets = config.secrets()?;
    let mut out = std::io::stdout().lock();
    out.write_all(config.to_toml().as_bytes())
        .context("writing the configuration")?;
    if secrets.development {
        eprintln!(
            "{}: ok (no agents.secret_file and no ${SECRET_ENV}: the development secret would be used)",
            path.display()
        );
    } else {
        eprintln!("{}: ok", path.display());
    }
    Ok(())
}

/// Applies the config's log filter unless `$VIADUCT_LOG` is set; says
/// whether it did.
fn apply_log_filter(config: &Config, handle: &FilterHandle) -> bool {
    if std::env::var_os(LOG_ENV).is_some() {
        return false;
    }
    match EnvFilter::try_new(&config.log.filter) {
        Ok(filter) => match handle.reload(filter) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "cannot change the log filter");
                false
            }
        },
        Err(e) => {
            warn!(filter = %config.log.filter, error = %e, "bad log.filter");
            false
        }
    }
}

fn serve(path: Option<&Path>, filter: &FilterHandle) -> anyhow::Result<()> {
    let config = load(path)?;
    let _ = apply_log_filter(&config, filter);
    let secrets = config.secrets()?;
    if secrets.development {
        warn!("****************************************************************");
        warn!("* USING THE BUILT-IN DEVELOPMENT SECRET: anyone can register a *");
        warn!("* backend and forge affinity tags. Set agents.secret_file or   *");
        warn!("* ${SECRET_ENV} before serving anything but this machine.   *");
        warn!("****************************************************************");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let balancer = Balancer::bind(&config, secrets).await?;
        let shutdown = CancellationToken::new();
        let signals = watch_signals(
            shutdown.clone(),
            path.map(Path::to_path_buf),
            config.clone(),
            filter.clone(),
        )?;
        tokio::task::spawn_local(signals);
        balancer.run(shutdown).await
    })
}

/// SIGINT/SIGTERM cancel `shutdown`; SIGHUP reloads the config file.
fn watch_signals(
    shutdown: CancellationToken,
    path: Option<PathBuf>,
    mut running: Config,
    filter: FilterHandle,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {
                    info!("SIGINT: shutting down");
                    shutdown.cancel();
                    return;
                }
                _ = term.recv() => {
                    info!("SIGTERM: shutting down");
                    shutdown.cancel();
                    return;
                }
                _ = hup.recv() => reload(path.as_deref(), &mut running, &filter),
            }
        }
    })
}

/// SIGHUP: re-read the file; apply the log filter; name what needs a restart.
fn reload(path: Option<&Path>, running: &mut Config, filter: &FilterHandle) {
    let Some(path) = path else {
        info!("SIGHUP: no configuration file to re-read");
        return;
    };
    let new = match Config::from_file(path) {
        Ok(new) => new,
        Err(e) => {
            error!(problems = %e, "SIGHUP: configuration rejected; keeping the running one");
            return;
        }
    };
    if new.log.filter != running.log.filter {
        if apply_log_filter(&new, filter) {
            info!(filter = %new.log.filter, "SIGHUP: log filter changed");
        } else {
            info!("SIGHUP: log.filter changed but ${LOG_ENV} is set and wins");
        }
        running.log.filter = new.log.filter.clone();
    }
    let mut restart = Vec::new();
    if new.sip != running.sip {
        restart.push("sip");
    }
    if new.agents != running.agents {
        restart.push("agents");
    }
    if new.routing != running.routing {
        restart.push("routing");
    }
    if new.limits != running.limits {
        restart.push("limits");
    }
    if restart.is_empty() {
        info!("SIGHUP: configuration re-read");
    } else {
        warn!(
            sections = ?restart,
            "SIGHUP: these sections changed and take effect only after a restart"
        );
    }
}
