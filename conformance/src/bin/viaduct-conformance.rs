//! `viaduct-conformance`: runs the golden SIP traces against a balancer and
//! prints a scorecard.
#![forbid(unsafe_code)]
// A command-line tool: it prints.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use conformance::{load_all, report, run, target, traces_dir, Filter};

#[derive(Parser, Debug)]
#[command(version, about = "Golden SIP traces against a SIP load balancer")]
struct Cli {
    /// The traces folder (`<group>/<name>.trace` below it).
    #[arg(long, global = true, default_value_os_t = traces_dir())]
    traces: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The `viaduct` binary, backends simulated as agents (agent traces).
    Viaduct,
    /// The `viaduct` binary with a plain-SIP pool of simulated SIP servers
    /// (plain traces).
    ViaductSip,
    /// Any SIP load balancer running at --balancer, backends simulated as
    /// plain SIP servers on the addresses its configuration lists (plain
    /// traces, one at a time).
    Sip,
    /// Your backend (--cmd, a command embedding the agent) behind a
    /// `viaduct` the runner starts (backend traces).
    Backend,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs traces and prints the scorecard; exits 1 on any failure.
    Run {
        /// What is under test.
        #[arg(long, value_enum, default_value = "viaduct")]
        target: Target,
        /// The `viaduct` binary (default: beside this one, then on PATH).
        #[arg(long)]
        bin: Option<PathBuf>,
        /// The address a `viaduct` the runner starts listens on.
        #[arg(long, default_value = "127.0.0.1")]
        lb_ip: String,
        /// `--target sip`: the balancer's SIP address (UDP and TCP).
        #[arg(long, required_if_eq("target", "sip"))]
        balancer: Option<SocketAddr>,
        /// `--target sip`: the port every sip-server actor listens on at its
        /// own address (the balancer's configuration lists them, see
        /// conformance/kamailio/dispatcher.list).
        #[arg(long, default_value_t = 5060)]
        server_port: u16,
        /// `--target backend`: the backend command, run with `sh -c` once per
        /// backend actor; it finds the balancer's agent address in
        /// $VIADUCT_AGENTS, the cluster secret in $VIADUCT_SECRET and a name
        /// in $VIADUCT_BACKEND_NAME.
        #[arg(long, required_if_eq("target", "backend"))]
        cmd: Option<String>,
        /// The target's name in the scorecard and in `known-failure(NAME):`
        /// marks (default: the target kind, e.g. `viaduct-sip`).
        #[arg(long)]
        name: Option<String>,
        /// Write the scorecard as a Markdown table here.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Only these groups (repeatable).
        #[arg(long = "group", short = 'g')]
        groups: Vec<String>,
        /// Write JUnit XML here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Traces run at once.
        #[arg(long, short = 'j', default_value_t = 4)]
        jobs: usize,
        /// Only traces whose `group/name` contains one of these.
        names: Vec<String>,
    },
    /// Lists the traces: id, mode, rule, title.
    List {
        /// Only these groups.
        #[arg(long = "group", short = 'g')]
        groups: Vec<String>,
        /// Only traces whose `group/name` contains one of these.
        names: Vec<String>,
    },
    /// Prints one trace (`group/name`).
    Show {
        /// The trace id.
        trace: String,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("viaduct-conformance: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let (traces, errors) = load_all(&cli.traces);
    for e in &errors {
        eprintln!("{e}");
    }
    match cli.command {
        Command::List { groups, names } => {
            let f = Filter { groups, names };
            for t in traces.iter().filter(|t| f.keeps(t)) {
                let mark = if t.known_failure.is_some() {
                    " [known failure]"
                } else {
                    ""
                };
                println!(
                    "{:<44} {:<6} {}{mark}\n{:<51} {}",
                    t.id, t.mode, t.title, "", t.rule
                );
            }
        }
        Command::Show { trace } => {
            let t = traces
                .iter()
                .find(|t| t.id == trace || t.name == trace)
                .with_context(|| format!("no trace `{trace}`"))?;
            print!("{}", std::fs::read_to_string(&t.path)?);
        }
        Command::Run {
            target,
            bin,
            lb_ip,
            balancer,
            server_port,
            cmd,
            name,
            markdown,
            groups,
            junit,
            jobs,
            names,
        } => {
            let viaduct = || match &bin {
                Some(b) => Ok(b.clone()),
                None => target::find_viaduct()
                    .context("no `viaduct` binary beside this one or on PATH: pass --bin PATH"),
            };
            let target = match target {
                Target::Viaduct => run::Target::Viaduct { bin: viaduct()? },
                Target::ViaductSip => run::Target::ViaductSip { bin: viaduct()? },
                Target::Sip => run::Target::Sip {
                    balancer: balancer.context("--target sip needs --balancer HOST:PORT")?,
                    server_port,
                },
                Target::Backend => run::Target::Backend {
                    bin: viaduct()?,
                    cmd: cmd.context("--target backend needs --cmd COMMAND")?,
                },
            };
            let f = Filter { groups, names };
            let chosen: Vec<_> = traces
                .into_iter()
                .filter(|t| f.keeps(t) && target.runs(t.mode))
                .collect();
            if chosen.is_empty() {
                bail!(
                    "no trace matches (target {} runs only its mode's traces: see `list`)",
                    target.kind()
                );
            }
            let name = name.unwrap_or_else(|| target.kind().to_owned());
            let jobs = jobs.clamp(1, target.max_jobs());
            println!(
                "running {} traces against {name} ({} at once)",
                chosen.len(),
                jobs
            );
            let opts = run::Options {
                target,
                name: name.clone(),
                corpus: conformance::corpus_dir(),
                lb_ip,
                nonce: None,
            };
            let results = conformance::run_all(&chosen, &opts, jobs, &|r| {
                println!("{}", report::progress(r));
            });
            print!("{}", report::scorecard(&name, &results));
            if let Some(path) = junit {
                std::fs::write(&path, report::junit(&name, &results))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = markdown {
                std::fs::write(&path, report::markdown(&[(name.as_str(), &results)]))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            let failed = results.iter().any(|r| r.outcome.is_failure()) || !errors.is_empty();
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
