//! Variables and assertions: pure functions over what was received.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use encap_proto::frame::Transport;
use encap_proto::sip::{NameAddr, SipMessage, Uri};

use crate::trace::{Assertion, Endpoint, Op};

/// The variables of a running trace.
pub type Vars = HashMap<String, String>;

/// The name of the variable replaced, after every other, by the length of
/// the body (the bytes after the first CRLFCRLF).
pub const BODY_LEN: &str = "body-len";

/// Replaces every `${name}` in `input` by its value; `\$` is a literal `$`.
pub fn substitute(input: &[u8], vars: &Vars) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    let mut body_len_at = Vec::new();
    while i < input.len() {
        if input[i] == b'\\' && input.get(i + 1) == Some(&b'$') {
            out.push(b'$');
            i += 2;
            continue;
        }
        if input[i] == b'$' && input.get(i + 1) == Some(&b'{') {
            let end = input[i + 2..]
                .iter()
                .position(|&b| b == b'}')
                .ok_or("`${` without a closing `}`")?;
            let name = String::from_utf8_lossy(&input[i + 2..i + 2 + end]).into_owned();
            if name == BODY_LEN {
                body_len_at.push(out.len());
            } else {
                let v = vars
                    .get(&name)
                    .ok_or_else(|| format!("unknown variable `${{{name}}}`"))?;
                out.extend_from_slice(v.as_bytes());
            }
            i += end + 3;
            continue;
        }
        out.push(input[i]);
        i += 1;
    }
    if !body_len_at.is_empty() {
        // The length's own digits sit in the header section, before the body.
        let body = |o: &[u8]| {
            o.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |p| o.len() - p - 4)
        };
        let len = body(&out).to_string();
        for at in body_len_at.into_iter().rev() {
            out.splice(at..at, len.bytes());
        }
    }
    Ok(out)
}

/// Substitutes a string (step arguments, assertion values).
pub fn substitute_str(input: &str, vars: &Vars) -> Result<String, String> {
    substitute(input.as_bytes(), vars).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// What an agent's frame said about a message it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    /// The balancer's inbound connection id.
    pub connection: u64,
    /// The transport it arrived on.
    pub transport: Transport,
    /// The sender.
    pub peer: SocketAddr,
    /// The balancer's address it arrived at.
    pub local: SocketAddr,
    /// The failover flag.
    pub failover: bool,
}

/// A SIP message an actor received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The actor.
    pub actor: String,
    /// The connection (TCP peers).
    pub conn: Option<String>,
    /// Where it came from (the balancer's address, for peers).
    pub from: Option<SocketAddr>,
    /// The message.
    pub bytes: Bytes,
    /// For an agent: the frame's metadata.
    pub frame: Option<FrameMeta>,
}

impl Received {
    /// The message as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Where it was received, written `actor` or `actor/conn`.
    pub fn at(&self) -> Endpoint {
        Endpoint {
            actor: self.actor.clone(),
            conn: self.conn.clone(),
        }
    }
}

/// The result of one assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The assertion as written.
    pub text: String,
    /// Its line.
    pub line: usize,
    /// The value found (after `->`, the value stored).
    pub got: Option<String>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn param(v: Option<Option<&[u8]>>) -> Option<String> {
    v.map(|v| v.map(s).unwrap_or_default())
}

fn uri_part(uri: &Uri<'_>, part: &str) -> Option<String> {
    match part {
        "" => Some(s(uri.raw)),
        "user" => uri.user.map(s),
        "host" => Some(s(uri.host)),
        "port" => uri.port.map(|p| p.to_string()),
        "scheme" => Some(s(uri.scheme)),
        p => param(uri.param(p)),
    }
}

/// Looks up a selector (see FORMAT.md) in a received message.
pub fn select(r: &Received, selector: &str) -> Result<Option<String>, String> {
    let meta = |f: fn(&FrameMeta) -> String| {
        r.frame
            .as_ref()
            .map(f)
            .ok_or_else(|| format!("`{selector}`: only an agent receives frames"))
    };
    match selector {
        "who" => return Ok(Some(r.actor.clone())),
        "conn" => return Ok(r.conn.clone()),
        "from" => return Ok(r.from.map(|a| a.to_string())),
        "frame.connection" => return meta(|m| m.connection.to_string()).map(Some),
        "frame.transport" => return meta(|m| m.transport.to_string()).map(Some),
        "frame.peer" => return meta(|m| m.peer.to_string()).map(Some),
        "frame.local" => return meta(|m| m.local.to_string()).map(Some),
        "frame.failover" => return meta(|m| m.failover.to_string()).map(Some),
        "start" => {
            let end = r
                .bytes
                .windows(2)
                .position(|w| w == b"\r\n")
                .unwrap_or(r.bytes.len());
            return Ok(Some(s(&r.bytes[..end])));
        }
        _ => {}
    }
    // The start line and plain header values are read without the scanner,
    // so that a balancer's answer to a malformed request (which copies its
    // malformed headers) can be checked.
    let start = select(r, "start")?.unwrap_or_default();
    let mut parts = start.splitn(3, ' ');
    let (first, second) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let is_response = first.starts_with("SIP/");
    match selector {
        "method" => return Ok((!is_response).then(|| first.to_owned())),
        "status" => return Ok(is_response.then(|| second.to_owned())),
        "reason" => return Ok(is_response.then(|| parts.next().unwrap_or("").to_owned())),
        _ => {}
    }
    let msg = match SipMessage::parse(r.bytes.clone()) {
        Ok(m) => m,
        Err(e) if !selector.contains(['.', '#']) && selector != "body" && selector != "ruri" => {
            let _ = e;
            return Ok(raw_header(&r.bytes, selector));
        }
        Err(e) => return Err(format!("the message received does not scan ({e})")),
    };
    let (head, rest) = match selector.split_once('.') {
        Some((h, rest)) => (h, Some(rest)),
        None => (selector, None),
    };
    if let Some((how, name)) = selector.split_once(':') {
        let mut all: Vec<String> = Vec::new();
        for v in msg.headers(name) {
            all.extend(split_list(&s(v)));
        }
        match how {
            "all" => {}
            "reversed" => all.reverse(),
            other => return Err(format!("`{other}:`: expected `all:` or `reversed:`")),
        }
        return Ok((!all.is_empty()).then(|| all.join(", ")));
    }
    if let Some(name) = head.strip_prefix('#') {
        let n = if name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v") {
            msg.vias().count()
        } else {
            msg.headers(name).count()
        };
        return Ok(Some(n.to_string()));
    }
    Ok(match (head, rest) {
        ("body", None) => Some(s(msg.body())),
        ("ruri", part) => msg
            .request_uri()
            .and_then(|u| uri_part(&u, part.unwrap_or(""))),
        (_, None) => msg.header(head).map(|v| s(v).trim().to_owned()),
        (via, Some(p)) if via.eq_ignore_ascii_case("via") || via == "v" => {
            let Some(v) = msg.top_via() else {
                return Ok(None);
            };
            match p {
                "host" => Some(s(v.host)),
                "port" => v.port.map(|p| p.to_string()),
                "transport" => Some(s(v.transport)),
                p => param(v.param(p)),
            }
        }
        (name, Some(p)) => {
            let Some(value) = msg.header(name) else {
                return Ok(None);
            };
            let na = NameAddr::parse(value)
                .ok_or_else(|| format!("`{name}: {}` is not a name-addr", s(value).trim()))?;
            match p.strip_prefix("uri") {
                Some("") => uri_part(&na.uri, ""),
                Some(sub) if sub.starts_with('.') => uri_part(&na.uri, &sub[1..]),
                _ => param(na.param(p)),
            }
        }
    })
}

/// The comma-separated values of one header line (commas inside `<>` and
/// quotes do not separate), trimmed.
fn split_list(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut angle, mut quote) = (false, false);
    let mut cur = String::new();
    for c in line.chars() {
        match c {
            '"' if !angle => quote = !quote,
            '<' if !quote => angle = true,
            '>' if !quote => angle = false,
            ',' if !angle && !quote => {
                out.push(cur.trim().to_owned());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// The first value of header `name` found by a plain line scan (full names
/// only, case-insensitive), for messages the scanner refuses.
fn raw_header(bytes: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Checks assertions against a received message, storing captures in
/// `vars`. Returns one result per assertion.
pub fn check(r: &Received, assertions: &[Assertion], vars: &mut Vars) -> Vec<Checked> {
    assertions
        .iter()
        .map(|a| {
            let mut out = Checked {
                text: a.text.clone(),
                line: a.line,
                got: None,
                failure: None,
            };
            let got = match select(r, &a.selector) {
                Ok(g) => g,
                Err(e) => {
                    out.failure = Some(e);
                    return out;
                }
            };
            out.got.clone_from(&got);
            let want = |v: &str, vars: &Vars| substitute_str(v, vars);
            let failure = match (&a.op, &got) {
                (Op::Absent, None) | (Op::Present, Some(_)) => None,
                (Op::Absent, Some(g)) => Some(format!("present: `{g}`")),
                (Op::Present | Op::Capture(_), None) => Some("absent".to_owned()),
                (_, None) => Some("absent".to_owned()),
                (Op::Capture(name), Some(g)) => {
                    vars.insert(name.trim_start_matches('$').to_owned(), g.clone());
                    None
                }
                (Op::Eq(v), Some(g)) => match want(v, vars) {
                    Ok(w) if &w == g => None,
                    Ok(w) => Some(format!("expected `{w}`")),
                    Err(e) => Some(e),
                },
                (Op::Ne(v), Some(g)) => match want(v, vars) {
                    Ok(w) if &w != g => None,
                    Ok(w) => Some(format!("expected anything but `{w}`")),
                    Err(e) => Some(e),
                },
                (Op::Contains(v), Some(g)) => match want(v, vars) {
                    Ok(w) if g.contains(&w) => None,
                    Ok(w) => Some(format!("does not contain `{w}`")),
                    Err(e) => Some(e),
                },
                (Op::Matches(v) | Op::NotMatches(v), Some(g)) => {
                    let negate = matches!(a.op, Op::NotMatches(_));
                    match want(v, vars).map(|w| regex::Regex::new(&w).map(|re| (w, re))) {
                        Ok(Ok((w, re))) => match (re.is_match(g), negate) {
                            (true, false) | (false, true) => None,
                            (false, false) => Some(format!("does not match /{w}/")),
                            (true, true) => Some(format!("matches /{w}/")),
                        },
                        Ok(Err(e)) => Some(format!("bad regex: {e}")),
                        Err(e) => Some(e),
                    }
                }
            };
            out.failure = failure;
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::trace::Trace;

    fn received(text: &str) -> Received {
        Received {
            actor: "b1".into(),
            conn: None,
            from: None,
            bytes: Bytes::copy_from_slice(text.as_bytes()),
            frame: None,
        }
    }

    const INVITE: &str = "INVITE sip:ivr@192.0.2.1:5060;vd=00010abc SIP/2.0\r\n\
        v: SIP/2.0/TCP 127.0.0.72:5060;branch=z9hG4bK-1;received=127.0.0.72;rport=4000\r\n\
        Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-0\r\n\
        f: <sip:a@x>;tag=a1\r\nt: <sip:ivr@x>\r\ni: c1\r\nCSeq: 1 INVITE\r\n\
        m: <sip:a@127.0.0.72:5060;transport=tcp>\r\nl: 0\r\n\r\n";

    #[test]
    fn selectors() {
        let r = received(INVITE);
        let get = |sel: &str| select(&r, sel).unwrap();
        assert_eq!(get("method").as_deref(), Some("INVITE"));
        assert_eq!(get("ruri.vd").as_deref(), Some("00010abc"));
        assert_eq!(get("ruri.host").as_deref(), Some("192.0.2.1"));
        assert_eq!(get("Via.received").as_deref(), Some("127.0.0.72"));
        assert_eq!(get("Via.rport").as_deref(), Some("4000"));
        assert_eq!(get("#Via").as_deref(), Some("2"));
        assert_eq!(get("From.tag").as_deref(), Some("a1"));
        assert_eq!(get("To.tag"), None);
        assert_eq!(get("Call-ID").as_deref(), Some("c1"));
        assert_eq!(get("Contact.uri.transport").as_deref(), Some("tcp"));
        assert_eq!(get("Contact.uri.port").as_deref(), Some("5060"));
        assert_eq!(get("X-Viaduct-Backend"), None);
        let rr = received(
            "SIP/2.0 200 OK\r\nRecord-Route: <sip:p1;lr>, \"a,b\" <sip:p2;lr>\r\n\
             Record-Route: <sip:p3;lr>\r\nVia: SIP/2.0/UDP x;branch=z9hG4bK-1\r\n\
             Call-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            select(&rr, "all:Record-Route").unwrap().as_deref(),
            Some("<sip:p1;lr>, \"a,b\" <sip:p2;lr>, <sip:p3;lr>")
        );
        assert_eq!(
            select(&rr, "reversed:Record-Route").unwrap().as_deref(),
            Some("<sip:p3;lr>, \"a,b\" <sip:p2;lr>, <sip:p1;lr>")
        );
        assert_eq!(select(&rr, "all:Route").unwrap(), None);
        assert!(select(&r, "frame.peer").is_err());
    }

    #[test]
    fn assertions_and_captures() {
        let text = "title: t\nrule: r\nactor b1 agent\nexpect b1\n  \
            Call-ID = c1\n  Via.branch -> br\n  To.tag absent\n  status present\n  \
            ruri ~ ^sip:ivr@\n  CSeq = 2 INVITE\n";
        let t = Trace::parse(std::path::Path::new("t"), "g", "t", text).unwrap();
        let crate::trace::Step::Expect { assertions, .. } = &t.steps[0].step else {
            panic!()
        };
        let mut vars = Vars::new();
        let out = check(&received(INVITE), assertions, &mut vars);
        let failed: Vec<_> = out.iter().filter(|c| c.failure.is_some()).collect();
        assert_eq!(failed.len(), 2, "{out:?}");
        assert_eq!(failed[0].text, "status present");
        assert_eq!(failed[1].failure.as_deref(), Some("expected `2 INVITE`"));
        assert_eq!(vars["br"], "z9hG4bK-1");
    }

    #[test]
    fn substitution_and_body_length() {
        let mut vars = Vars::new();
        vars.insert("lb".into(), "127.0.0.1:5060".into());
        let out = substitute(
            b"X sip:${lb} \\$1\r\nContent-Length: ${body-len}\r\n\r\nv=0\r\n",
            &vars,
        )
        .unwrap();
        assert_eq!(
            out,
            b"X sip:127.0.0.1:5060 $1\r\nContent-Length: 5\r\n\r\nv=0\r\n".to_vec()
        );
        assert!(substitute(b"${nope}", &vars).is_err());
    }
}
