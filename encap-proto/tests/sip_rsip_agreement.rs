//! Our scanner against rsip 0.4 over every corpus message: where both accept
//! a message they must agree on what routing reads; and ours must handle the
//! messages rsip 0.4 cannot (compact names, folded lines, `Via :`, IPv6).

// Test helpers too: a panic here is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use encap_proto::sip::{frame_datagram, Framed, Limits, SipMessage};
use rsip::prelude::*;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/corpus");

fn sip_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sip_files(&p));
        } else if p.extension().is_some_and(|x| x == "sip") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn corpus() -> Vec<(String, Bytes)> {
    let root = Path::new(CORPUS);
    let mut files = sip_files(&root.join("rfc4475"));
    files.extend(sip_files(&root.join("rfc5118/wire")));
    files.extend(sip_files(&root.join("rfc5118/wire-clfixed")));
    files.extend(sip_files(&root.join("callflows")));
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, Bytes::from(std::fs::read(&p).unwrap()))
        })
        .collect()
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What both parsers are asked, as owned strings for comparison.
#[derive(Debug, Default, PartialEq)]
struct Routing {
    method_or_status: String,
    call_id: Option<String>,
    cseq: Option<(u32, String)>,
    branch: Option<String>,
    via_host: Option<String>,
    via_port: Option<u16>,
    from_tag: Option<String>,
    to_tag: Option<String>,
}

fn ours(m: &SipMessage) -> Routing {
    let via = m.top_via();
    Routing {
        method_or_status: match (m.method(), m.status()) {
            (Some(meth), _) => s(meth),
            (_, Some(code)) => code.to_string(),
            _ => unreachable!(),
        },
        call_id: m.call_id().map(s),
        cseq: m.cseq().map(|c| (c.seq, s(c.method))),
        branch: via.and_then(|v| v.branch).map(s),
        // rsip prints IPv6 hosts without brackets.
        via_host: via.map(|v| {
            s(v.host)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        }),
        via_port: via.and_then(|v| v.port),
        from_tag: m.from_tag().map(s),
        to_tag: m.to_tag().map(s),
    }
}

/// rsip's view; a field whose typed parse fails in rsip is left `None`
/// and counted as "rsip could not say".
fn theirs(m: &rsip::SipMessage) -> (Routing, usize) {
    let mut unknown = 0;
    let mut r = Routing {
        method_or_status: match m {
            rsip::SipMessage::Request(req) => req.method().to_string(),
            rsip::SipMessage::Response(resp) => resp.status_code().code().to_string(),
        },
        ..Routing::default()
    };
    r.call_id = m.call_id_header().ok().map(|c| c.value().to_owned());
    match m.cseq_header().map(|c| c.typed()) {
        Ok(Ok(c)) => r.cseq = Some((c.seq, c.method.to_string())),
        Ok(Err(_)) => unknown += 1,
        Err(_) => {}
    }
    match m.via_header().map(|v| v.typed()) {
        Ok(Ok(v)) => {
            r.branch = v.branch().map(|b| b.to_string());
            r.via_host = Some(v.uri.host_with_port.host.to_string());
            r.via_port = v.uri.host_with_port.port.map(|p| *p.value());
        }
        Ok(Err(_)) => unknown += 1,
        Err(_) => {}
    }
    match m.from_header().map(|f| f.typed()) {
        Ok(Ok(f)) => r.from_tag = f.tag().map(|t| t.to_string()),
        Ok(Err(_)) => unknown += 1,
        Err(_) => {}
    }
    match m.to_header().map(|t| t.typed()) {
        Ok(Ok(t)) => r.to_tag = t.tag().map(|t| t.to_string()),
        Ok(Err(_)) => unknown += 1,
        Err(_) => {}
    }
    (r, unknown)
}

/// Whether a header line with the long name `long` exists.
fn has_long_form(m: &[u8], long: &str) -> bool {
    m.split(|&b| b == b'\n').any(|line| {
        line.len() > long.len()
            && line[..long.len()].eq_ignore_ascii_case(long.as_bytes())
            && matches!(line[long.len()], b':' | b' ' | b'\t')
    })
}

/// Files rsip 0.4 cannot take, and why; ours scans every one of them.
#[rustfmt::skip]
const RSIP_CANNOT: &[(&str, &str)] = &[
    ("rfc4475/valid/wsinv.sip", "folded lines, `Via  :`, `TO :`, LWS around '/' in Via"),
    ("rfc4475/valid/dblreq.sip", "compact `I:` (rsip reports no Call-ID)"),
    ("rfc4475/valid/esc01.sip", "compact `i:`"),
    ("rfc4475/valid/longreq.sip", "compact `v:`/`V:`, 30+ Via values"),
    ("rfc4475/valid/intmeth.sip", "every token char in method, branch, Call-ID"),
    ("rfc4475/valid/semiuri.sip", "';' in the Request-URI user part"),
    ("rfc5118/wire/valid/ipv6-good.sip", "IPv6 reference in Request-URI and Via"),
    ("rfc5118/wire/valid/port-ambiguous.sip", "IPv6 reference in the Request-URI"),
    ("rfc5118/wire/valid/port-unambiguous.sip", "IPv6 reference with port in the Request-URI"),
    ("rfc5118/wire/valid/via-received-param-with-delim.sip", "received=[IPv6]"),
    ("rfc5118/wire/valid/via-received-param-no-delim.sip", "received=IPv6 without brackets"),
    ("rfc5118/wire/valid/ipv6-bug-abnf-3-colons.sip", "[2001:db8:::192.0.2.1]"),
    ("rfc5118/wire/valid/mult-ip-in-header.sip", "IPv6 references in Via (rsip cannot type the Via)"),
    ("callflows/rfc3665/2.1-successful-new-registration/002-F2-401.sip", "folded Via and WWW-Authenticate"),
    ("callflows/rfc3665/3.2-session-establishment-through-two-proxies/004-F4-INVITE.sip", "folded Via"),
];

#[test]
fn agree_with_rsip_where_both_accept() {
    let mut both = 0;
    let mut rsip_only_fails = BTreeSet::new();
    let mut rsip_partial = BTreeSet::new();
    let mut rsip_missed_compact = BTreeSet::new();
    for (name, raw) in corpus() {
        let Ok(Framed::Message(m)) = frame_datagram(raw.clone(), &Limits::default()) else {
            continue;
        };
        // Ours accepts: the scan and the full validation of From/To/Contact/Route.
        let ours_msg = SipMessage::parse(m.clone()).and_then(|o| o.validate().map(|()| o));
        let theirs_msg = rsip::SipMessage::try_from(&m[..]);
        match (ours_msg, theirs_msg) {
            (Ok(o), Ok(t)) => {
                let mine = ours(&o);
                let (mut other, unknown) = theirs(&t);
                if unknown > 0 {
                    rsip_partial.insert(name.clone());
                }
                // Where rsip could not type a header, compare only what it could.
                if other.cseq.is_none() {
                    other.cseq = mine.cseq.clone();
                }
                if other.via_host.is_none() {
                    (other.branch, other.via_host, other.via_port) =
                        (mine.branch.clone(), mine.via_host.clone(), mine.via_port);
                }
                if unknown > 0 && other.from_tag.is_none() {
                    other.from_tag = mine.from_tag.clone();
                }
                if unknown > 0 && other.to_tag.is_none() {
                    other.to_tag = mine.to_tag.clone();
                }
                // rsip 0.4 does not know compact names: a header it reports
                // absent must then be present only in compact form.
                let mut compact_only = |theirs: bool, ours: bool, long: &str| {
                    if !theirs && ours {
                        assert!(!has_long_form(&m, long), "{name}: rsip misses {long}");
                        rsip_missed_compact.insert((name.clone(), long.to_owned()));
                        true
                    } else {
                        false
                    }
                };
                if compact_only(other.call_id.is_some(), mine.call_id.is_some(), "call-id") {
                    other.call_id = mine.call_id.clone();
                }
                if compact_only(other.via_host.is_some(), mine.via_host.is_some(), "via") {
                    (other.branch, other.via_host, other.via_port) =
                        (mine.branch.clone(), mine.via_host.clone(), mine.via_port);
                }
                if compact_only(t.from_header().is_ok(), o.from().is_some(), "from") {
                    other.from_tag = mine.from_tag.clone();
                }
                if compact_only(t.to_header().is_ok(), o.to().is_some(), "to") {
                    other.to_tag = mine.to_tag.clone();
                }
                assert_eq!(mine, other, "{name}");
                both += 1;
            }
            (Ok(_), Err(_)) => {
                rsip_only_fails.insert(name);
            }
            (Err(_), _) => {}
        }
    }
    assert!(both >= 250, "only {both} messages compared");
    assert!(
        rsip_only_fails.len() >= 150,
        "rsip failed on {} only",
        rsip_only_fails.len()
    );
    eprintln!(
        "compared {both}; rsip failed on {} that we scan: {rsip_only_fails:?}",
        rsip_only_fails.len()
    );
    eprintln!("rsip could not type a header in: {rsip_partial:?}");
    eprintln!("rsip missed compact-form headers: {rsip_missed_compact:?}");
    for (file, why) in RSIP_CANNOT {
        assert!(
            rsip_only_fails.contains(*file)
                || rsip_partial.contains(*file)
                || rsip_missed_compact.iter().any(|(f, _)| f == file),
            "{file} ({why}): rsip 0.4 now handles it; update the list"
        );
    }
    assert!(!rsip_missed_compact.is_empty());
}

#[test]
fn ours_reads_what_rsip_cannot() {
    for (file, why) in RSIP_CANNOT {
        let raw = Bytes::from(std::fs::read(Path::new(CORPUS).join(file)).unwrap());
        let Ok(Framed::Message(m)) = frame_datagram(raw, &Limits::default()) else {
            panic!("{file} does not frame")
        };
        let m = SipMessage::parse(m).unwrap_or_else(|e| panic!("{file} ({why}): {e}"));
        assert!(
            m.call_id().is_some() && m.top_via().is_some() && m.cseq().is_some(),
            "{file}"
        );
    }
}
