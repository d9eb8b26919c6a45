//! Renderings: side-by-side diffs, normalised transcripts for snapshots.

use std::net::SocketAddr;
use std::sync::OnceLock;

use regex::Regex;

use crate::check::Vars;

/// Two columns: `left` and `right` line by line, under their titles.
pub fn side_by_side(
    left_title: &str,
    left: &[String],
    right_title: &str,
    right: &[String],
) -> String {
    const MAX: usize = 72;
    let width = left
        .iter()
        .map(|l| l.chars().count())
        .chain([left_title.len()])
        .max()
        .unwrap_or(0)
        .min(MAX);
    let clip = |s: &str| -> String {
        if s.chars().count() > width {
            let mut c: String = s.chars().take(width.saturating_sub(1)).collect();
            c.push('…');
            c
        } else {
            s.to_owned()
        }
    };
    let mut out = format!("  {:<width$} | {right_title}\n", left_title);
    out.push_str(&format!("  {:-<width$}-+-{:-<20}\n", "", ""));
    for i in 0..left.len().max(right.len()) {
        let l = left.get(i).map_or(String::new(), |l| clip(l));
        let r = right.get(i).map_or("", String::as_str);
        out.push_str(&format!("  {l:<width$} | {r}\n"));
    }
    out
}

struct Redactions {
    rules: Vec<(Regex, &'static str)>,
}

fn redactions() -> &'static Redactions {
    static R: OnceLock<Redactions> = OnceLock::new();
    R.get_or_init(|| {
        let rule = |re: &str, with: &'static str| {
            // The patterns are constants of this file, tested below.
            #[allow(clippy::unwrap_used)]
            (Regex::new(re).unwrap(), with)
        };
        Redactions {
            rules: vec![
                rule(r"(?i)(branch=)[^;,\s>]+", "${1}[branch]"),
                rule(r"(?i)(;tag=)[^;,\s>]+", "${1}[tag]"),
                rule(r"(?i)(;vd=)[0-9a-f]+", "${1}[affinity-tag]"),
                rule(
                    r"(?im)^(X-Viaduct-(?:Backend|Failover):[ \t]*)[0-9a-f]+",
                    "${1}[affinity-tag]",
                ),
                rule(r"(?im)^((?:Call-ID|i)[ \t]*:[ \t]*)\S+", "${1}[call-id]"),
                rule(r"(?im)^((?:Date|Timestamp)[ \t]*:[ \t]*).*$", "${1}[time]"),
            ],
        }
    })
}

/// A transcript as snapshots keep it: run-dependent addresses and ports
/// named after their variables, branches, tags, Call-IDs and times
/// redacted, line ends shown as `\n`.
pub fn normalise(text: &str, vars: &Vars) -> String {
    let mut addrs: Vec<(&String, &String)> = vars
        .iter()
        .filter(|(k, v)| {
            !k.ends_with(".ip")
                && !k.ends_with(".host")
                && !k.ends_with(".port")
                && v.parse::<SocketAddr>().is_ok()
        })
        .collect();
    // Longest first, then by name, so the result is deterministic.
    addrs.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let mut out = text.replace("\r\n", "\n");
    if let Some(run) = vars.get("run").filter(|r| !r.is_empty()) {
        out = out.replace(run.as_str(), "${run}");
    }
    for (k, v) in &addrs {
        out = out.replace(v.as_str(), &format!("${{{k}}}"));
    }
    // A port alone (`rport=`, a sent-by with a host name).
    for (k, v) in &addrs {
        if let Ok(a) = v.parse::<SocketAddr>() {
            let re = Regex::new(&format!(r"([:=]){}\b", a.port()));
            if let Ok(re) = re {
                out = re
                    .replace_all(&out, |c: &regex::Captures<'_>| {
                        format!("{}${{{k}.port}}", &c[1])
                    })
                    .into_owned();
            }
        }
    }
    for (re, with) in &redactions().rules {
        out = re.replace_all(&out, *with).into_owned();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn normalises() {
        let mut vars = Vars::new();
        vars.insert("lb".into(), "127.0.0.1:40000".into());
        vars.insert("lb.port".into(), "40000".into());
        vars.insert("a/c1".into(), "127.0.0.72:51000".into());
        let text = "INVITE sip:x@127.0.0.1:40000;vd=0001abcdef0123456 SIP/2.0\r\n\
            Via: SIP/2.0/TCP 127.0.0.72:5060;branch=z9hG4bK-1;received=127.0.0.72;rport=51000\r\n\
            Contact: <sip:a@a.example:51000>\r\nFrom: <sip:a@x>;tag=abc\r\nCall-ID: c1@x\r\nX-Viaduct-Backend: 0001abcdef0123456\r\n\r\n";
        assert_eq!(
            normalise(text, &vars),
            "INVITE sip:x@${lb};vd=[affinity-tag] SIP/2.0\n\
             Via: SIP/2.0/TCP 127.0.0.72:5060;branch=[branch];received=127.0.0.72;rport=${a/c1.port}\n\
             Contact: <sip:a@a.example:${a/c1.port}>\nFrom: <sip:a@x>;tag=[tag]\nCall-ID: [call-id]\nX-Viaduct-Backend: [affinity-tag]\n\n"
        );
    }

    #[test]
    fn side_by_side_aligns() {
        let out = side_by_side("e", &["a".into()], "r", &["x".into(), "y".into()]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "  e | r");
        assert_eq!(lines[2], "  a | x");
        assert_eq!(lines[3], "    | y");
    }
}
