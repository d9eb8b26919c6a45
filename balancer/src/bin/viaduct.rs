//! `viaduct`: the SIP load balancer.
//!
//! ```text
//! viaduct [run] [--config FILE]       serve (defaults: SIP on UDP and TCP 127.0.0.1:5060,
//!                                     agents on 127.0.0.1:5070)
//! viaduct check-config FILE           check a configuration, print the effective one
//! viaduct status [--admin URL] [--token T] [--watch [SECS]]
//!                                     the backends' state, load and traffic, from the
//!                                     admin API (default: admin.listen of --config)
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
use balancer::config::{Config, ADMIN_TOKEN_ENV, SECRET_ENV};
use balancer::driver::{Balancer, Reload};
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
    /// Show the backends (state, calls, CPU, capacity, traffic) and totals
    /// from a running balancer's admin API.
    Status {
        /// The admin API's base URL (`http://HOST:PORT`). Default: the
        /// `admin.listen` of --config (or of the defaults).
        #[arg(long)]
        admin: Option<String>,
        /// The bearer token. Default: $VIADUCT_ADMIN_TOKEN, else
        /// `admin.token_file` of --config.
        #[arg(long)]
        token: Option<String>,
        /// Refresh every SECS seconds (default 2) until Ctrl-C.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::Run) | None) {
        fixed_mmap_threshold();
    }
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
        Some(Command::Status {
            admin,
            token,
            watch,
        }) => status::run(cli.config.as_deref(), admin.clone(), token.clone(), *watch),
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

/// Serves with glibc's mmap threshold fixed at its default (128 KiB), by
/// starting this same program again (same PID) with `GLIBC_TUNABLES` set.
///
/// glibc raises the threshold each time a large block is freed: after a
/// burst of new calls had grown and then shrunk the new-call table, its
/// buffers came from the heap and 1.7 MB of it stayed resident (RSS 1.29x
/// idle at 100k established calls, 1.04x with the threshold fixed).
/// Nothing changes when the variable already names the tunable, on other C
/// libraries, or if the exec fails.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const VAR: &str = "GLIBC_TUNABLES";
        const MMAP_TUNABLE: &str = "glibc.malloc.mmap_threshold=131072";
        // Set on the one re-exec: the program never starts itself twice,
        // even where the C library drops GLIBC_TUNABLES (a binary with file
        // capabilities, e.g. to bind port 5060, runs in secure mode).
        const REEXEC: &str = "VIADUCT_MALLOC_REEXEC";
        if std::env::var_os(REEXEC).is_some() {
            return;
        }
        let current = std::env::var(VAR).unwrap_or_default();
        if current.contains("glibc.malloc.mmap_threshold") {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let value = if current.is_empty() {
            MMAP_TUNABLE.to_owned()
        } else {
            format!("{current}:{MMAP_TUNABLE}")
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        // Returns only if the exec failed: serve as we are.
        let _ = std::process::Command::new(&exe)
            .arg0(arg0)
            .args(args)
            .env(VAR, value)
            .env(REEXEC, "1")
            .exec();
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
    let _ = config.admin_token()?;
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
            balancer.reloader(),
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
    reloader: tokio::sync::mpsc::Sender<Reload>,
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
                _ = hup.recv() => reload(path.as_deref(), &mut running, &filter, &reloader),
            }
        }
    })
}

/// SIGHUP: re-read the file; apply the log filter; name what needs a restart.
fn reload(
    path: Option<&Path>,
    running: &mut Config,
    filter: &FilterHandle,
    reloader: &tokio::sync::mpsc::Sender<Reload>,
) {
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
    // What applies at once (Router::reconfigure and the agent secret):
    // routing policies, new-call table limits, Retry-After and the
    // secrets. Pools, rules, the report interval, listeners and limits
    // need a restart.
    match new.secrets() {
        Ok(secrets) => {
            let mut applied = running.clone();
            let r = &mut applied.routing;
            r.bad_tag_policy = new.routing.bad_tag_policy;
            r.accept_call_independent_tags = new.routing.accept_call_independent_tags;
            r.new_call_lifetime_ms = new.routing.new_call_lifetime_ms;
            r.new_call_capacity = new.routing.new_call_capacity;
            r.missed_reports_down = new.routing.missed_reports_down;
            r.failover = new.routing.failover;
            applied.sip.retry_after_secs = new.sip.retry_after_secs;
            applied.agents.secret_file = new.agents.secret_file.clone();
            applied.agents.previous_secret_file = new.agents.previous_secret_file.clone();
            match reloader.try_send(Reload {
                config: applied.clone(),
                secrets,
            }) {
                Ok(()) => {
                    *running = Config {
                        log: running.log.clone(),
                        ..applied
                    }
                }
                Err(_) => warn!("SIGHUP: a reload is already being applied; send SIGHUP again"),
            }
        }
        Err(e) => error!(problems = %e, "SIGHUP: secrets unreadable; keeping the running ones"),
    }
    let mut restart = Vec::new();
    if new.sip != running.sip {
        restart.push("sip");
    }
    if new.agents != running.agents {
        restart.push("agents");
    }
    if new.routing != running.routing || new.pools != running.pools || new.rules != running.rules {
        restart.push("routing (pools, rules, report interval)");
    }
    if new.limits != running.limits {
        restart.push("limits");
    }
    if new.admin != running.admin {
        restart.push("admin");
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

/// `viaduct status`: a table of the backends from the admin API.
mod status {
    use std::io::Write;
    use std::path::Path;
    use std::time::Duration;

    use anyhow::{bail, Context};
    use balancer::config::Config;
    use balancer::driver::admin::{client, BackendView, BackendsReply, Drain, NewCalls};

    use super::{load, ADMIN_TOKEN_ENV};

    /// One request's bound.
    const WITHIN: Duration = Duration::from_secs(5);

    pub(super) fn run(
        config: Option<&Path>,
        admin: Option<String>,
        token: Option<String>,
        watch: Option<u64>,
    ) -> anyhow::Result<()> {
        // The config is read only for what the flags leave out.
        let needs_config =
            admin.is_none() || (token.is_none() && std::env::var_os(ADMIN_TOKEN_ENV).is_none());
        let cfg = if needs_config {
            load(config)?
        } else {
            Config::default()
        };
        let base = admin.unwrap_or_else(|| format!("http://{}", cfg.admin.listen));
        let token = match token {
            Some(t) => Some(t),
            None if needs_config => cfg.admin_token()?,
            None => std::env::var(ADMIN_TOKEN_ENV).ok(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?;
        runtime.block_on(async {
            let Some(secs) = watch else {
                let text = fetch(&base, token.as_deref()).await?;
                return print(&text, false);
            };
            let every = Duration::from_secs(secs.max(1));
            let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
            loop {
                let text = match fetch(&base, token.as_deref()).await {
                    Ok(text) => text,
                    Err(e) => format!("{base}: {e:#}\n"),
                };
                print(&text, true)?;
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = &mut ctrl_c => return Ok(()),
                }
            }
        })
    }

    fn print(text: &str, clear: bool) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if clear {
            out.write_all(b"\x1b[2J\x1b[H")?;
        }
        out.write_all(text.as_bytes())?;
        out.flush()?;
        Ok(())
    }

    async fn get(base: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
        let answer = client::request("GET", base, path, token, WITHIN).await?;
        match answer.status {
            200 => Ok(answer.body),
            401 => bail!("{base}{path}: 401 unauthorized (give --token or ${ADMIN_TOKEN_ENV})"),
            s => bail!("{base}{path}: HTTP {s}: {}", answer.body.trim()),
        }
    }

    async fn fetch(base: &str, token: Option<&str>) -> anyhow::Result<String> {
        let backends: BackendsReply =
            serde_json::from_str(&get(base, "/api/backends", token).await?)
                .context("/api/backends: unexpected answer")?;
        let new_calls: NewCalls = serde_json::from_str(&get(base, "/api/new-calls", token).await?)
            .context("/api/new-calls: unexpected answer")?;
        Ok(render(&backends, &new_calls))
    }

    fn state(b: &BackendView) -> &'static str {
        match (b.up, b.drain) {
            (false, _) => "down",
            (true, Drain::Serving) => "serving",
            (true, Drain::Draining) => "draining",
            (true, Drain::Drained) => "drained",
        }
    }

    /// The table: one line per backend, then totals.
    pub(super) fn render(r: &BackendsReply, n: &NewCalls) -> String {
        use std::fmt::Write as _;
        let mut rows: Vec<[String; 9]> = vec![[
            "NAME".into(),
            "ID".into(),
            "STATE".into(),
            "CALLS".into(),
            "CPU%".into(),
            "CAPACITY".into(),
            "LOAD%".into(),
            "MSGS IN".into(),
            "MSGS OUT".into(),
        ]];
        let (mut calls, mut capacity, mut msgs_in, mut msgs_out, mut up) =
            (0u64, 0u64, 0u64, 0u64, 0);
        for b in &r.backends {
            calls += u64::from(b.load.active_calls);
            capacity += u64::from(b.load.capacity);
            msgs_in += b.traffic.total.msgs_to_backend;
            msgs_out += b.traffic.total.msgs_from_backend;
            up += usize::from(b.up);
            rows.push([
                b.name.clone(),
                b.id.to_string(),
                state(b).into(),
                b.load.active_calls.to_string(),
                format!("{:.1}", f64::from(b.load.cpu_permille) / 10.0),
                b.load.capacity.to_string(),
                format!("{:.1}", b.load.load * 100.0),
                b.traffic.total.msgs_to_backend.to_string(),
                b.traffic.total.msgs_from_backend.to_string(),
            ]);
        }
        rows.push([
            format!("TOTAL ({up}/{} up)", r.backends.len()),
            String::new(),
            String::new(),
            calls.to_string(),
            String::new(),
            capacity.to_string(),
            String::new(),
            msgs_in.to_string(),
            msgs_out.to_string(),
        ]);
        let widths: Vec<usize> = (0..9)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, row) in rows.iter().enumerate() {
            if i + 1 == rows.len() {
                let _ = writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 2 * 8));
            }
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                // Names and states left, numbers right.
                if c == 0 || c == 2 {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
                } else {
                    let _ = write!(line, "{cell:>w$}  ", w = widths[c]);
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        let c = |k: &str| r.counters.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "\nrequests {}  responses {}  new calls {}  failovers {}  503 {}  bad tags {}",
            c("requests_in"),
            c("responses_in"),
            c("routed_by_selection"),
            c("failovers"),
            c("rejected_503"),
            c("bad_tags") + c("unknown_backend_tags"),
        );
        let _ = writeln!(
            out,
            "new-call table {} / {} entries  hash-placed {}",
            n.entries, n.capacity, n.routed_by_hash
        );
        out
    }
}
