//! Every golden trace as a test against the real `viaduct` (built here),
//! plus an insta snapshot of the normalised messages each passing trace
//! received (the balancer's rewrites: Via received/rport, the affinity
//! header, what reaches the peers).
//!
//! A custom harness (`harness = false`): the traces run in parallel, each
//! against its own balancer, and print like libtest. Arguments that are not
//! flags filter traces by a substring of `group/name`. A trace marked
//! `known-failure:` must still fail; one that passes fails the run.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

use std::process::ExitCode;

use conformance::run::{Options, Outcome};
use conformance::{load_all, report, run_all, traces_dir, Filter};

fn main() -> ExitCode {
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        let (traces, _) = load_all(&traces_dir());
        for t in traces {
            println!("{}: test", t.id);
        }
        return ExitCode::SUCCESS;
    }
    let (traces, errors) = load_all(&traces_dir());
    for e in &errors {
        println!("trace does not parse: {e}");
    }
    let filter = Filter {
        groups: Vec::new(),
        names,
    };
    let chosen: Vec<_> = traces.into_iter().filter(|t| filter.keeps(t)).collect();
    let bin = escargot::CargoBuild::new()
        .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .package("balancer")
        .bin("viaduct")
        .current_release()
        .run()
        .unwrap_or_else(|e| panic!("cannot build viaduct: {e}"))
        .path()
        .to_path_buf();
    let opts = Options {
        bin,
        corpus: conformance::corpus_dir(),
        lb_ip: "127.0.0.1".into(),
    };
    println!("\nrunning {} traces", chosen.len());
    let results = run_all(&chosen, &opts, 4, &|r| {
        let mark = match &r.outcome {
            Outcome::Passed => "ok".to_owned(),
            Outcome::KnownFailure(_) => "ok (known failure, still fails)".to_owned(),
            Outcome::Skipped(s) => format!("ignored, {s}"),
            Outcome::Failed(_) => "FAILED".to_owned(),
            Outcome::UnexpectedPass => "FAILED (known failure now passes)".to_owned(),
        };
        println!("test {} ... {mark}", r.id);
    });
    let mut snapshot_failures = Vec::new();
    for r in &results {
        if r.outcome != Outcome::Passed || r.transcript.is_empty() {
            continue;
        }
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path("../snapshots");
        settings.set_prepend_module_to_snapshot(false);
        settings.set_description(format!("messages received in trace {}", r.id));
        settings.set_omit_expression(true);
        let name = r.id.replace('/', "__");
        let transcript = r.transcript.clone();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            settings.bind(|| insta::assert_snapshot!(name, transcript));
        }));
        if ok.is_err() {
            snapshot_failures.push(r.id.clone());
        }
    }
    let failed = results.iter().any(|r| r.outcome.is_failure());
    if failed {
        print!("{}", report::scorecard("viaduct", &results));
    }
    for s in &snapshot_failures {
        println!("snapshot changed: {s} (review with `cargo insta review`)");
    }
    let passed = results.iter().filter(|r| !r.outcome.is_failure()).count();
    println!(
        "\ntest result: {}. {passed} passed; {} failed; {} snapshot changes\n",
        if failed || !errors.is_empty() || !snapshot_failures.is_empty() {
            "FAILED"
        } else {
            "ok"
        },
        results.len() - passed,
        snapshot_failures.len()
    );
    if failed || !errors.is_empty() || !snapshot_failures.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
