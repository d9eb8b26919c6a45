//! Edits of a scanned message, collected and then applied in one copy.
//!
//! Every edit is a splice of the *original* message: `[start, end)` replaced
//! by some new text (an insertion has `start == end`, a removal has no text).
//! [`Rewrite::finish`] sorts the splices and copies the untouched runs and the
//! new text into a single `BytesMut` of the exact final size:
//!
//! ```text
//!  original:  start-line CRLF │ Via: ...;rport │ ... │ X-Drop: a CRLF │ ... CRLF body
//!  splices:         ▲ insert "Via: ..CRLF"    ▲ replace "rport"→"rport=5060"
//!                                                   └──── remove ────┘
//!  result:    start-line CRLF Via: ..CRLF Via: ...;rport=5060 ... CRLF body
//! ```
//!
//! Edits always refer to the original message: a header inserted by
//! [`Rewrite::insert_header`] is not removed by [`Rewrite::remove_headers`]
//! nor edited by [`Rewrite::set_top_via_param`]. An edit falling inside a
//! removed header is dropped. Set each parameter once per `Rewrite`.
//! Edits that find no target (no Contact, `Contact: *`, ...) or carry bytes
//! that would break the message (CR, LF, a non-token name) are not applied
//! and are counted by [`Rewrite::skipped`].

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use super::scan::{
    is_token, offset_in, parse_name_addr, parse_via, scan_params, uri_params, NameQuery, Uri,
};
use super::SipMessage;

/// Which URI [`Rewrite::set_uri_param`] edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriTarget {
    /// The Request-URI of a request.
    RequestUri,
    /// The URI of the first Contact value (put inside `<>` if it was an addr-spec).
    Contact,
    /// The URI of the first Route value.
    TopRoute,
}

#[derive(Debug, Clone, Copy)]
struct Edit {
    start: u32,
    end: u32,
    text_start: u32,
    text_end: u32,
}

/// A set of edits over a [`SipMessage`], applied by [`Rewrite::finish`].
///
/// Storage is inline for up to 8 edits and 256 bytes of new text, so typical
/// rewrites (a Via, an rport, a Record-Route) do not touch the heap until
/// `finish` allocates the result.
#[derive(Debug, Clone)]
pub struct Rewrite<'m> {
    msg: &'m SipMessage,
    edits: SmallVec<[Edit; 8]>,
    text: SmallVec<[u8; 256]>,
    skipped: usize,
}

fn valid_value(v: &[u8]) -> bool {
    !v.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0))
}

fn valid_param_value(v: &[u8]) -> bool {
    !v.is_empty()
        && !v.iter().any(|&b| {
            matches!(
                b,
                b'\r' | b'\n' | 0 | b' ' | b'\t' | b';' | b',' | b'<' | b'>' | b'?' | b'"'
            )
        })
}

impl<'m> Rewrite<'m> {
    /// Starts an empty set of edits over `msg`.
    pub fn new(msg: &'m SipMessage) -> Self {
        Rewrite {
            msg,
            edits: SmallVec::new(),
            text: SmallVec::new(),
            skipped: 0,
        }
    }

    /// How many requested edits were not applied (no target, or invalid bytes).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    fn splice(&mut self, start: usize, end: usize, parts: &[&[u8]]) {
        let text_start = self.text.len();
        for p in parts {
            self.text.extend_from_slice(p);
        }
        // Offsets fit in u32: the scanner rejects messages over 4 GiB, and new
        // text beyond that would not fit a SIP message either.
        self.edits.push(Edit {
            start: start as u32,
            end: end as u32,
            text_start: text_start as u32,
            text_end: self.text.len() as u32,
        });
    }

    /// Inserts `name: value` right after the start line (so an inserted Via is
    /// the top Via). Several insertions keep their call order.
    pub fn insert_header(&mut self, name: &str, value: &[u8]) -> &mut Self {
        if name.is_empty() || !name.bytes().all(is_token) || !valid_value(value) {
            self.skipped += 1;
            return self;
        }
        let at = self.msg.fields_start();
        self.splice(at, at, &[name.as_bytes(), b": ", value, b"\r\n"]);
        self
    }

    /// Removes every instance of a header (case-insensitive, compact form
    /// included, folded continuation lines included).
    pub fn remove_headers(&mut self, name: &str) -> &mut Self {
        let q = NameQuery::new(name);
        let msg = self.msg;
        let buf = &msg.bytes()[..];
        for f in msg.fields().flatten() {
            if q.matches(&buf[f.name.clone()]) {
                self.splice(f.line.start, f.line.end, &[]);
            }
        }
        self
    }

    /// Sets a parameter of the top via-parm: replaces its value if present
    /// (e.g. fills a bare `;rport`), else appends `;name[=value]`.
    pub fn set_top_via_param(&mut self, name: &str, value: Option<&[u8]>) -> &mut Self {
        let msg = self.msg;
        let whole = &msg.bytes()[..];
        let Some(raw) = msg.raw_via() else {
            self.skipped += 1;
            return self;
        };
        if !self.param_ok(name, value) {
            return self;
        }
        let Ok((via, _)) = parse_via(raw, 0) else {
            self.skipped += 1;
            return self;
        };
        let base = offset_in(via.params, whole);
        let mut found = None;
        let _ = scan_params(via.params, 0, |p| {
            if found.is_none() && via.params[p.name.clone()].eq_ignore_ascii_case(name.as_bytes()) {
                found = Some(p.name.start..p.value.map_or(p.name.end, |v| v.end));
            }
        });
        let text_val = value.unwrap_or_default();
        let eq: &[u8] = if value.is_some() { b"=" } else { b"" };
        match found {
            Some(r) => self.splice(
                base + r.start,
                base + r.end,
                &[name.as_bytes(), eq, text_val],
            ),
            None => {
                let at = offset_in(via.raw, whole) + via.raw.len();
                self.splice(at, at, &[b";", name.as_bytes(), eq, text_val]);
            }
        }
        self
    }

    fn param_ok(&mut self, name: &str, value: Option<&[u8]>) -> bool {
        let ok =
            !name.is_empty() && name.bytes().all(is_token) && value.is_none_or(valid_param_value);
        if !ok {
            self.skipped += 1;
        }
        ok
    }

    /// Sets a URI parameter of the Request-URI, the first Contact or the top
    /// Route: replaces it if present, else appends `;name[=value]` to the URI
    /// parameters (inside `<>`; an addr-spec Contact gets `<>` added so the
    /// parameter stays a URI parameter).
    pub fn set_uri_param(
        &mut self,
        target: UriTarget,
        name: &str,
        value: Option<&[u8]>,
    ) -> &mut Self {
        if !self.param_ok(name, value) {
            return self;
        }
        let msg = self.msg;
        let whole = &msg.bytes()[..];
        let uri: Option<Uri<'m>> = match target {
            UriTarget::RequestUri => msg.request_uri(),
            UriTarget::Contact => msg
                .raw_contact()
                .and_then(|v| parse_name_addr(v, 0).ok())
                .map(|(na, _)| na.uri),
            UriTarget::TopRoute => msg
                .raw_route()
                .and_then(|v| parse_name_addr(v, 0).ok())
                .map(|(na, _)| na.uri),
        };
        let Some(uri) = uri else {
            self.skipped += 1;
            return self;
        };
        let uri_start = offset_in(uri.raw, whole);
        let uri_end = uri_start + uri.raw.len();
        let needs_brackets =
            target != UriTarget::RequestUri && (uri_start == 0 || whole[uri_start - 1] != b'<');
        let base = offset_in(uri.params, whole);
        let existing = uri_params(uri.params)
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, _, r)| r);
        let text_val = value.unwrap_or_default();
        let eq: &[u8] = if value.is_some() { b"=" } else { b"" };
        if needs_brackets {
            self.splice(uri_start, uri_start, &[b"<"]);
        }
        match existing {
            Some(r) => self.splice(
                base + r.start,
                base + r.end,
                &[name.as_bytes(), eq, text_val],
            ),
            None => {
                let at = base + uri.params.len();
                self.splice(at, at, &[b";", name.as_bytes(), eq, text_val]);
            }
        }
        if needs_brackets {
            self.splice(uri_end, uri_end, &[b">"]);
        }
        self
    }

    /// The edited message, built with one allocation of the exact size.
    pub fn finish(&self) -> Bytes {
        let src = &self.msg.bytes()[..];
        if self.edits.is_empty() {
            return self.msg.bytes().clone();
        }
        let mut order: SmallVec<[(u32, bool, usize); 16]> = self
            .edits
            .iter()
            .enumerate()
            .map(|(i, e)| (e.start, e.end > e.start, i))
            .collect();
        // Insertions before replacements/removals at the same offset; call order otherwise.
        order.sort_unstable();
        let mut size = 0usize;
        let mut cursor = 0usize;
        let mut accepted: SmallVec<[usize; 16]> = SmallVec::new();
        for &(_, _, i) in &order {
            let e = self.edits[i];
            let (s, en) = (e.start as usize, e.end as usize);
            if s < cursor || en > src.len() {
                continue; // inside a removed or replaced range
            }
            size += s - cursor + (e.text_end - e.text_start) as usize;
            cursor = en;
            accepted.push(i);
        }
        size += src.len() - cursor;
        let mut out = BytesMut::with_capacity(size);
        let mut cursor = 0usize;
        for &i in &accepted {
            let e = self.edits[i];
            out.extend_from_slice(&src[cursor..e.start as usize]);
            out.extend_from_slice(&self.text[e.text_start as usize..e.text_end as usize]);
            cursor = e.end as usize;
        }
        out.extend_from_slice(&src[cursor..]);
        debug_assert_eq!(out.len(), size);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> SipMessage {
        SipMessage::parse(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    #[test]
    fn no_edit_is_no_copy() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\n\r\n");
        let out = Rewrite::new(&m).finish();
        assert_eq!(out.as_ptr(), m.bytes().as_ptr());
    }

    #[test]
    fn insert_remove_and_params() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;rport;branch=z9hG4bK1\r\nX-A: 1\r\n 2\r\nm: sip:c@d\r\nl: 0\r\n\r\n");
        let out = Rewrite::new(&m)
            .insert_header("Via", b"SIP/2.0/TCP lb;branch=z9hG4bKlb")
            .remove_headers("x-a")
            .set_top_via_param("rport", Some(b"5060"))
            .set_top_via_param("received", Some(b"192.0.2.1"))
            .set_uri_param(UriTarget::Contact, "ob", None)
            .set_uri_param(UriTarget::RequestUri, "transport", Some(b"tcp"))
            .finish();
        assert_eq!(
            &out[..],
            &b"OPTIONS sip:a@b;transport=tcp SIP/2.0\r\nVia: SIP/2.0/TCP lb;branch=z9hG4bKlb\r\nv: SIP/2.0/UDP h;rport=5060;branch=z9hG4bK1;received=192.0.2.1\r\nm: <sip:c@d;ob>\r\nl: 0\r\n\r\n"[..]
        );
    }

    /// Found by fuzzing (sip_scan): an addr-spec Contact whose opaque URI held
    /// a '>' was accepted, and wrapping it in `<>` for a URI parameter gave a
    /// message that no longer scanned. URIs may not contain `<`, `>` or `"`.
    #[test]
    fn addr_spec_with_angle_bracket_is_rejected() {
        let raw =
            "REGISTER sip:a@b SIP/2.0\r\nContact: ip:user@[2001:db8::192.com>\r\nl: 0\r\n\r\n";
        assert!(SipMessage::parse(Bytes::copy_from_slice(raw.as_bytes())).is_err());
    }

    #[test]
    fn rejects_injection() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\n\r\n");
        let mut r = Rewrite::new(&m);
        r.insert_header("X", b"a\r\nEvil: 1");
        r.set_uri_param(UriTarget::RequestUri, "a b", None);
        assert_eq!(r.skipped(), 2);
        assert_eq!(r.finish(), *m.bytes());
    }
}
