//! The scorecard, JUnit XML and progress lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::run::{Outcome, TraceResult};

/// Counts of one group.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Passed.
    pub passed: usize,
    /// Failed (including known failures that now pass).
    pub failed: usize,
    /// Known failures that still fail.
    pub known: usize,
    /// Skipped.
    pub skipped: usize,
}

/// One progress line for a finished trace.
pub fn progress(r: &TraceResult) -> String {
    let (mark, note) = match &r.outcome {
        Outcome::Passed => ("ok", String::new()),
        Outcome::Failed(s) => ("FAILED", format!(": {s}")),
        Outcome::Skipped(s) => ("skipped", format!(": {s}")),
        Outcome::KnownFailure(s) => ("known failure", format!(" (still fails: {s})")),
        Outcome::UnexpectedPass => (
            "UNEXPECTED PASS",
            ": marked known-failure but passes; remove the mark".to_owned(),
        ),
    };
    format!("{:<48} {mark} ({} ms){note}", r.id, r.elapsed.as_millis())
}

/// Tallies by group.
pub fn tally(results: &[TraceResult]) -> BTreeMap<String, Tally> {
    let mut by: BTreeMap<String, Tally> = BTreeMap::new();
    for r in results {
        let t = by.entry(r.group.clone()).or_default();
        match r.outcome {
            Outcome::Passed => t.passed += 1,
            Outcome::Failed(_) | Outcome::UnexpectedPass => t.failed += 1,
            Outcome::KnownFailure(_) => t.known += 1,
            Outcome::Skipped(_) => t.skipped += 1,
        }
    }
    by
}

/// The scorecard: a table by group, then every failure in full, then the
/// skipped traces with their reasons.
pub fn scorecard(target: &str, results: &[TraceResult]) -> String {
    let by = tally(results);
    let mut out = format!("\nScorecard: target {target}\n\n");
    let _ = writeln!(
        out,
        "| {:<18} | {:>6} | {:>6} | {:>13} | {:>7} |",
        "group", "passed", "failed", "known failure", "skipped"
    );
    let _ = writeln!(
        out,
        "|{:-<20}|{:->8}|{:->8}|{:->15}|{:->9}|",
        "", "", "", "", ""
    );
    let mut total = Tally::default();
    for (g, t) in &by {
        let _ = writeln!(
            out,
            "| {g:<18} | {:>6} | {:>6} | {:>13} | {:>7} |",
            t.passed, t.failed, t.known, t.skipped
        );
        total.passed += t.passed;
        total.failed += t.failed;
        total.known += t.known;
        total.skipped += t.skipped;
    }
    let _ = writeln!(
        out,
        "| {:<18} | {:>6} | {:>6} | {:>13} | {:>7} |",
        "total", total.passed, total.failed, total.known, total.skipped
    );
    for r in results.iter().filter(|r| r.outcome.is_failure()) {
        let _ = writeln!(out, "\n=== FAILED {} ===", r.id);
        match &r.outcome {
            Outcome::Failed(s) => {
                let _ = writeln!(out, "{s}\n{}", r.details);
            }
            _ => {
                let _ = writeln!(out, "marked known-failure, but it passes: remove the mark");
            }
        }
    }
    let known: Vec<_> = results
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::KnownFailure(s) => Some((r, s)),
            _ => None,
        })
        .collect();
    if !known.is_empty() {
        let _ = writeln!(out, "\nKnown failures (checked to still fail):");
        for (r, s) in known {
            let _ = writeln!(out, "  {}: {s}", r.id);
        }
    }
    let skipped: Vec<_> = results
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Skipped(s) => Some((r, s)),
            _ => None,
        })
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(out, "\nSkipped:");
        for (r, s) in skipped {
            let _ = writeln!(out, "  {}: {s}", r.id);
        }
    }
    out
}

fn xml(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            c if c.is_control() && c != '\n' && c != '\t' => String::new(),
            c => c.to_string(),
        })
        .collect()
}

/// JUnit XML: one test suite per group, one test case per trace.
pub fn junit(target: &str, results: &[TraceResult]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let failures = results.iter().filter(|r| r.outcome.is_failure()).count();
    let _ = writeln!(
        out,
        "<testsuites name=\"viaduct-conformance {}\" tests=\"{}\" failures=\"{failures}\">",
        xml(target),
        results.len()
    );
    for (group, t) in tally(results) {
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\">",
            xml(&group),
            t.passed + t.failed + t.known + t.skipped,
            t.failed,
            t.skipped
        );
        for r in results.iter().filter(|r| r.group == group) {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                xml(&group),
                xml(&r.id),
                r.elapsed.as_secs_f64()
            );
            match &r.outcome {
                Outcome::Passed => out.push_str("/>\n"),
                Outcome::KnownFailure(s) => {
                    let _ = writeln!(
                        out,
                        ">\n      <system-out>known failure, still fails: {}</system-out>\n    </testcase>",
                        xml(s)
                    );
                }
                Outcome::Skipped(s) => {
                    let _ = writeln!(
                        out,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                        xml(s)
                    );
                }
                Outcome::Failed(s) => {
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml(s),
                        xml(&r.details)
                    );
                }
                Outcome::UnexpectedPass => {
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"marked known-failure but passes\"/>\n    </testcase>"
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}
