//! Conformance harness: golden SIP traces, a runner and a scorecard.
//!
//! Golden traces are human-readable files (one per trace, under
//! `traces/<group>/<name>.trace`, grammar in `FORMAT.md`) that drive actors
//! on distinct 127.0.0.x addresses through a balancer under test and assert
//! what arrives where. The runner starts the balancer, plays every actor
//! and reports a scorecard:
//!
//! * [`trace`]: the format and its parser (pure);
//! * [`check`]: variables, selectors and assertions (pure);
//! * [`run`]: the tokio driver that plays one trace against a balancer;
//! * [`target`]: the `viaduct` process under test;
//! * [`report`] and [`render`]: scorecard, JUnit, side-by-side failures,
//!   normalised transcripts for insta snapshots.
//!
//! `corpus/` beside this crate holds the public SIP test material every
//! crate's tests share: the RFC 4475 torture messages, the RFC 5118 IPv6
//! messages and call flows from RFC 3665, RFC 3261 §24 and public captures
//! (see `corpus/README.md` and `corpus/SOURCES.md` for origins and licences).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod proc;
pub mod render;
pub mod report;
pub mod run;
pub mod target;
pub mod trace;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use trace::{ParseError, Trace};

/// The folder of the shared SIP test corpus.
pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The folder of the golden traces shipped with this crate.
pub fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("traces")
}

/// Every trace under `dir` (`<group>/<name>.trace`), sorted by id. Parse
/// errors are collected, not fatal.
pub fn load_all(dir: &Path) -> (Vec<Trace>, Vec<ParseError>) {
    let mut traces = Vec::new();
    let mut errors = Vec::new();
    let mut files = Vec::new();
    if let Ok(groups) = std::fs::read_dir(dir) {
        for g in groups.flatten() {
            if let Ok(entries) = std::fs::read_dir(g.path()) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "trace") {
                        files.push(p);
                    }
                }
            }
        }
    }
    files.sort();
    for f in files {
        match Trace::load(&f) {
            Ok(t) => traces.push(t),
            Err(e) => errors.push(e),
        }
    }
    traces.sort_by(|a, b| a.id.cmp(&b.id));
    (traces, errors)
}

/// Which traces to take: by group, and by a substring of the id.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Groups to keep (all when empty).
    pub groups: Vec<String>,
    /// Substrings of `group/name`, any of which keeps a trace (all when empty).
    pub names: Vec<String>,
}

impl Filter {
    /// Whether `t` passes the filter.
    pub fn keeps(&self, t: &Trace) -> bool {
        (self.groups.is_empty() || self.groups.contains(&t.group))
            && (self.names.is_empty() || self.names.iter().any(|n| t.id.contains(n.as_str())))
    }
}

/// Runs `traces` on `jobs` threads, calling `progress` as each ends;
/// results in the order of `traces`.
pub fn run_all(
    traces: &[Trace],
    opts: &run::Options,
    jobs: usize,
    progress: &(dyn Fn(&run::TraceResult) + Sync),
) -> Vec<run::TraceResult> {
    let next = Arc::new(Mutex::new(0usize));
    let results: Mutex<Vec<Option<run::TraceResult>>> = Mutex::new(vec![None; traces.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(t) = traces.get(i) else { break };
                let r = run::run_trace(t, opts);
                progress(&r);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect()
}
