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

/// A Markdown table of several targets' results side by side: one row per
/// trace (its rule), one column per target (`pass`, `known failure`,
/// `FAIL`, or `-` when not run there), a total row, then the known
/// failures with their reasons.
pub fn markdown(columns: &[(&str, &[TraceResult])]) -> String {
    let mut ids: Vec<(&str, &str)> = Vec::new();
    for (_, results) in columns {
        for r in *results {
            if !ids.iter().any(|(id, _)| *id == r.id) {
                ids.push((&r.id, &r.rule));
            }
        }
    }
    ids.sort();
    let mut out = String::from("| trace | rule |");
    for (name, _) in columns {
        let _ = write!(out, " {name} |");
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for (id, rule) in &ids {
        let _ = write!(out, "| `{id}` | {} |", rule.replace('|', "\\|"));
        for (_, results) in columns {
            let cell = match results.iter().find(|r| r.id == *id).map(|r| &r.outcome) {
                Some(Outcome::Passed) => "pass",
                Some(Outcome::KnownFailure(_)) => "known failure",
                Some(Outcome::Failed(_) | Outcome::UnexpectedPass) => "**FAIL**",
                Some(Outcome::Skipped(_)) | None => "-",
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push_str("| **total** | |");
    for (_, results) in columns {
        let t = tally(results).values().fold(Tally::default(), |mut a, t| {
            a.passed += t.passed;
            a.failed += t.failed;
            a.known += t.known;
            a
        });
        let _ = write!(
            out,
            " {}/{} passed{}{} |",
            t.passed,
            t.passed + t.failed + t.known,
            if t.known > 0 {
                format!(", {} known", t.known)
            } else {
                String::new()
            },
            if t.failed > 0 {
                format!(", **{} failed**", t.failed)
            } else {
                String::new()
            }
        );
    }
    out.push('\n');
    for (name, results) in columns {
        let known: Vec<_> = results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::KnownFailure(_)))
            .collect();
        if known.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\nKnown failures of {name}:\n");
        for r in known {
            let _ = writeln!(
                out,
                "* `{}`: {}",
                r.id,
                r.known_reason.as_deref().unwrap_or("")
            );
        }
    }
    out
}

/// A Markdown table of results by group: one row per group, one column
/// per target, each cell `passed/run` (known failures and failures named).
pub fn markdown_groups(columns: &[(&str, &[TraceResult])]) -> String {
    let tallies: Vec<BTreeMap<String, Tally>> =
        columns.iter().map(|(_, results)| tally(results)).collect();
    let mut groups: Vec<&String> = tallies.iter().flat_map(BTreeMap::keys).collect();
    groups.sort();
    groups.dedup();
    let mut out = String::from("| group |");
    for (name, _) in columns {
        let _ = write!(out, " {name} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    let cell = |t: &Tally| {
        let mut c = format!("{}/{} passed", t.passed, t.passed + t.failed + t.known);
        if t.known > 0 {
            let _ = write!(c, ", {} known", t.known);
        }
        if t.failed > 0 {
            let _ = write!(c, ", **{} failed**", t.failed);
        }
        c
    };
    let mut totals = vec![Tally::default(); columns.len()];
    for g in groups {
        let _ = write!(out, "| {g} |");
        for (i, by) in tallies.iter().enumerate() {
            match by.get(g) {
                Some(t) => {
                    totals[i].passed += t.passed;
                    totals[i].failed += t.failed;
                    totals[i].known += t.known;
                    let _ = write!(out, " {} |", cell(t));
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    out.push_str("| **total** |");
    for t in &totals {
        let _ = write!(out, " {} |", cell(t));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn result(id: &str, outcome: Outcome, known: Option<&str>) -> TraceResult {
        TraceResult {
            id: id.to_owned(),
            group: id.split('/').next().unwrap_or_default().to_owned(),
            rule: "RFC 3261 §16.6".to_owned(),
            outcome,
            known_reason: known.map(str::to_owned),
            details: String::new(),
            transcript: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn markdown_side_by_side() {
        let a = vec![
            result("p/one", Outcome::Passed, None),
            result("p/two", Outcome::Passed, None),
        ];
        let b = vec![
            result("p/one", Outcome::Passed, None),
            result("p/two", Outcome::KnownFailure("x".into()), Some("§16.3")),
        ];
        let md = markdown(&[("A", &a), ("B", &b)]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| trace | rule | A | B |");
        assert_eq!(lines[2], "| `p/one` | RFC 3261 §16.6 | pass | pass |");
        assert_eq!(
            lines[3],
            "| `p/two` | RFC 3261 §16.6 | pass | known failure |"
        );
        assert_eq!(
            lines[4],
            "| **total** | | 2/2 passed | 1/2 passed, 1 known |"
        );
        assert!(md.contains("Known failures of B:\n\n* `p/two`: §16.3\n"));
        let c = vec![result("p/one", Outcome::Failed("no".into()), None)];
        let md = markdown(&[("C", &c)]);
        assert!(
            md.contains("| `p/one` | RFC 3261 §16.6 | **FAIL** |"),
            "{md}"
        );
        assert!(md.contains("0/1 passed, **1 failed**"), "{md}");
        let g = markdown_groups(&[("A", &a), ("C", &c)]);
        assert_eq!(
            g,
            "| group | A | C |\n|---|---|---|\n| p | 2/2 passed | 0/1 passed, **1 failed** |\n\
             | **total** | 2/2 passed | 0/1 passed, **1 failed** |\n"
        );
    }
}
