//! `viaduct-conformance`: runs the golden SIP traces against a balancer and
//! prints a scorecard.
#![forbid(unsafe_code)]
// A command-line tool: it prints.
#![allow(clippy::print_stdout)]

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
    /// The `viaduct` binary, backends simulated as agents.
    Viaduct,
    /// Any SIP load balancer, backends simulated as plain SIP servers.
    Sip,
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
        /// The address the balancer listens on.
        #[arg(long, default_value = "127.0.0.1")]
        lb_ip: String,
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
            groups,
            junit,
            jobs,
            names,
        } => {
            if target == Target::Sip {
                bail!("--target sip (plain-SIP traces against any SIP load balancer) is not implemented yet");
            }
            let bin = match bin {
                Some(b) => b,
                None => target::find_viaduct()
                    .context("no `viaduct` binary beside this one or on PATH: pass --bin PATH")?,
            };
            let f = Filter { groups, names };
            let chosen: Vec<_> = traces.into_iter().filter(|t| f.keeps(t)).collect();
            if chosen.is_empty() {
                bail!("no trace matches");
            }
            println!(
                "running {} traces against {} ({} at once)",
                chosen.len(),
                bin.display(),
                jobs
            );
            let opts = run::Options {
                bin,
                corpus: conformance::corpus_dir(),
                lb_ip,
            };
            let results = conformance::run_all(&chosen, &opts, jobs, &|r| {
                println!("{}", report::progress(r));
            });
            print!("{}", report::scorecard("viaduct", &results));
            if let Some(path) = junit {
                std::fs::write(&path, report::junit("viaduct", &results))
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
