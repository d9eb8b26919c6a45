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
//! Edits that find no target (no Contact, `Contact: *`, a malformed Contact or
//! Route, a URI that is not `sip:`/`sips:`, ...) or carry bytes
//! that would break the message (CR, LF, a non-token name) are not applied
//! and are counted by [`Rewrite::skipped`].

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use super::scan::{
    is_token, is_viaduct_name, offset_in, parse_name_addr, scan_host, scan_params, uri_params,
    Fields, NameQuery, Uri,
};
use super::SipMessage;

/// Which URI [`Rewrite::set_uri_param`] and [`Rewrite::set_uri_hostport`] edit.
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
/// Storage is inline for up to 8 edits; the new text takes one allocation
/// (256 bytes, enough for a Via, an rport and a Record-Route) with the
/// first edit, and `finish` one more for the result.
#[derive(Debug, Clone)]
pub struct Rewrite<'m> {
    msg: &'m SipMessage,
    edits: SmallVec<[Edit; 8]>,
    // A Vec, not inline storage: many small appends per message, and a
    // SmallVec's append costs several times a Vec's.
    text: Vec<u8>,
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
            text: Vec::new(),
            skipped: 0,
        }
    }

    /// How many requested edits were not applied (no target, or invalid bytes).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    fn splice(&mut self, start: usize, end: usize, parts: &[&[u8]]) {
        if self.text.capacity() == 0 {
            // One allocation serves a typical message's new text.
            self.text.reserve(256);
        }
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
        for f in msg.fields_for(name).flatten() {
            if q.matches(&buf[f.name.clone()]) {
                self.splice(f.line.start, f.line.end, &[]);
            }
        }
        self
    }

    /// Removes every header whose name starts with `prefix` (ASCII
    /// case-insensitive, folded continuation lines included), e.g.
    /// `"X-Viaduct-"` to strip the balancer's internal headers from outside
    /// traffic. Compact forms are not expanded: `prefix` is matched against
    /// the name as written. For an `X-Viaduct-*` prefix this costs nothing
    /// unless [`SipMessage::has_viaduct_headers`] is true.
    pub fn remove_headers_with_prefix(&mut self, prefix: &str) -> &mut Self {
        let p = prefix.trim().as_bytes();
        let msg = self.msg;
        let buf = &msg.bytes()[..];
        let (mut from, end) = msg.field_range();
        if is_viaduct_name(p) {
            match msg.viaduct_start() {
                Some(v) => from = v,
                None => return self,
            }
        }
        for f in Fields::new(buf, from, end).flatten() {
            let name = &buf[f.name.clone()];
            if name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p) {
                self.splice(f.line.start, f.line.end, &[]);
            }
        }
        self
    }

    /// Sets a parameter of the top via-parm: replaces its value if present
    /// (e.g. fills a bare `;rport`), else appends `;name[=value]`.
    pub fn set_top_via_param(&mut self, name: &str, value: Option<&[u8]>) -> &mut Self {
        self.set_top_via_params(&[(name, value)])
    }

    /// [`Rewrite::set_top_via_param`] for several parameters at once (one
    /// reading of the Via; `received` and `rport` together on ingress).
    /// Appended parameters keep the order of `params`.
    pub fn set_top_via_params(&mut self, params: &[(&str, Option<&[u8]>)]) -> &mut Self {
        let msg = self.msg;
        let whole = &msg.bytes()[..];
        let Some(via) = msg.top_via() else {
            self.skipped += params.len();
            return self;
        };
        let base = offset_in(via.params, whole);
        // Where the scan kept a name's place, there; otherwise a walk of the
        // parameters finds every name asked.
        let kept: SmallVec<[Option<Option<std::ops::Range<usize>>>; 4]> = params
            .iter()
            .map(|(name, _)| msg.top_via_param_at(name))
            .collect();
        let mut found: SmallVec<[Option<std::ops::Range<usize>>; 4]> =
            params.iter().map(|_| None).collect();
        if kept.iter().all(Option::is_some) {
            for (slot, at) in found.iter_mut().zip(kept) {
                *slot = at.flatten().map(|r| r.start - base..r.end - base);
            }
        } else {
            let _ = scan_params(via.params, 0, |p| {
                let name = &via.params[p.name.clone()];
                for (slot, (want, _)) in found.iter_mut().zip(params) {
                    if slot.is_none() && name.eq_ignore_ascii_case(want.as_bytes()) {
                        *slot = Some(p.name.start..p.value.as_ref().map_or(p.name.end, |v| v.end));
                    }
                }
            });
        }
        let at = offset_in(via.raw, whole) + via.raw.len();
        for (&(name, value), slot) in params.iter().zip(found) {
            if !self.param_ok(name, value) {
                continue;
            }
            let text_val = value.unwrap_or_default();
            let eq: &[u8] = if value.is_some() { b"=" } else { b"" };
            match slot {
                Some(r) => self.splice(
                    base + r.start,
                    base + r.end,
                    &[name.as_bytes(), eq, text_val],
                ),
                None => self.splice(at, at, &[b";", name.as_bytes(), eq, text_val]),
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
        let Some(uri) = self.target_uri(target) else {
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

    /// The `sip:`/`sips:` URI `target` names, if present and well formed.
    fn target_uri(&self, target: UriTarget) -> Option<Uri<'m>> {
        let msg = self.msg;
        let uri = match target {
            UriTarget::RequestUri => msg.request_uri(),
            UriTarget::Contact => msg
                .raw_contact()
                .and_then(|v| parse_name_addr(v, 0).ok())
                .map(|(na, _)| na.uri),
            UriTarget::TopRoute => msg
                .raw_route()
                .and_then(|v| parse_name_addr(v, 0).ok())
                .map(|(na, _)| na.uri),
        }?;
        // Other schemes are opaque after the colon: no host or parameters to edit.
        uri.is_sip().then_some(uri)
    }

    /// Replaces the `host[:port]` of the Request-URI, the first Contact or
    /// the top Route, keeping the scheme, user part, parameters and headers
    /// byte for byte; e.g. the balancer's public address into a Contact.
    /// `host` is a hostname, an IPv4 address or an IPv6 address (brackets
    /// added if missing); `port: None` leaves no port. Skipped (see
    /// [`Rewrite::skipped`]) if the target is absent, not a `sip:`/`sips:`
    /// URI, or `host` is not a valid host.
    pub fn set_uri_hostport(
        &mut self,
        target: UriTarget,
        host: &str,
        port: Option<u16>,
    ) -> &mut Self {
        let h = host.as_bytes();
        let bracket = h.contains(&b':') && !h.starts_with(b"[");
        let valid = if bracket {
            !h.is_empty()
                && h.iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        } else {
            scan_host(h, 0) == Ok(h.len())
        };
        let Some(uri) = self.target_uri(target).filter(|_| valid) else {
            self.skipped += 1;
            return self;
        };
        let whole = &self.msg.bytes()[..];
        let start = offset_in(uri.host, whole);
        let mut end = start + uri.host.len();
        if uri.port.is_some() {
            // ':' then the digits the scan accepted.
            end += 1;
            while end < whole.len() && whole[end].is_ascii_digit() {
                end += 1;
            }
        }
        let mut digits = [0u8; 6];
        let port_text: &[u8] = match port {
            Some(p) => {
                let mut n = p;
                let mut i = digits.len();
                loop {
                    i -= 1;
                    digits[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                i -= 1;
                digits[i] = b':';
                &digits[i..]
            }
            None => b"",
        };
        let (open, close): (&[u8], &[u8]) = if bracket { (b"[", b"]") } else { (b"", b"") };
        self.splice(start, end, &[open, h, close, port_text]);
        self
    }

    /// Removes the top via-parm: its whole header line when it is the only
    /// value there, else the value and the comma after it (`Via: a, b`
    /// becomes `Via: b`). An agent removes its own Via this way before the
    /// application sees a response.
    pub fn remove_top_via(&mut self) -> &mut Self {
        let msg = self.msg;
        let buf = &msg.bytes()[..];
        let Some(via) = msg.top_via() else {
            self.skipped += 1;
            return self;
        };
        let q = NameQuery::new("Via");
        let Some(field) = msg
            .fields_for("Via")
            .flatten()
            .find(|f| q.matches(&buf[f.name.clone()]))
        else {
            self.skipped += 1;
            return self;
        };
        let start = offset_in(via.raw, buf);
        let mut end = start + via.raw.len();
        while end < field.value.end && matches!(buf[end], b' ' | b'\t' | b'\r' | b'\n') {
            end += 1;
        }
        if end < field.value.end && buf[end] == b',' {
            end += 1;
            while end < field.value.end && matches!(buf[end], b' ' | b'\t' | b'\r' | b'\n') {
                end += 1;
            }
            self.splice(start, end, &[]);
        } else {
            self.splice(field.line.start, field.line.end, &[]);
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

    /// `received` and `rport` are found where the scan saw them; any other
    /// name by a walk of the parameters. Both must edit the same places:
    /// the same edits with a third, unknown name (which sends them all down
    /// the walk) give what the scan's places give plus that name.
    #[test]
    fn received_and_rport_from_the_scan_match_a_parameter_walk() {
        let vias = [
            "SIP/2.0/UDP h;rport;branch=z9hG4bK1",
            "SIP/2.0/TCP h:5060;branch=z9hG4bK1;RPORT;Received=10.0.0.1",
            "SIP/2.0/UDP h;rport=7;rport;received=a;received=b;branch=x",
            "SIP/2.0/UDP h ; rport ; received = 192.0.2.9 ;branch=x",
            "SIP/2.0/UDP h;branch=x, SIP/2.0/UDP i;rport;received=1.1.1.1",
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=x;received=1.1.1.1;rport=5",
            "SIP/2.0/UDP h;xrport;rportx=1;branch=x",
            "SIP/2.0/UDP h",
        ];
        for via in vias {
            let m = msg(&format!(
                "OPTIONS sip:a@b SIP/2.0\r\nVia: {via}\r\nl: 0\r\n\r\n"
            ));
            for values in [
                [Some(&b"192.0.2.1"[..]), Some(&b"5070"[..])],
                [Some(&b"192.0.2.1"[..]), None],
            ] {
                let mut walked = Rewrite::new(&m);
                walked.set_top_via_params(&[
                    ("received", values[0]),
                    ("rport", values[1]),
                    ("x-probe", None),
                ]);
                let mut scanned = Rewrite::new(&m);
                scanned
                    .set_top_via_params(&[("received", values[0]), ("rport", values[1])])
                    .set_top_via_param("x-probe", None);
                assert_eq!(scanned.finish(), walked.finish(), "Via: {via}");
                let out = scanned.finish();
                assert!(SipMessage::parse(out.clone()).is_ok(), "{out:?}");
            }
        }
    }

    /// Found by fuzzing (sip_scan): an addr-spec Contact whose opaque URI held
    /// a '>' was accepted, and wrapping it in `<>` for a URI parameter gave a
    /// message that no longer scanned. URIs may not contain `<`, `>` or `"`:
    /// `validate` rejects this Contact and the rewriter does not touch it.
    #[test]
    fn addr_spec_with_angle_bracket_is_rejected() {
        let raw =
            "REGISTER sip:a@b SIP/2.0\r\nContact: ip:user@[2001:db8::192.com>\r\nl: 0\r\n\r\n";
        let m = msg(raw);
        assert!(m.validate().is_err());
        assert!(m.contact().is_none());
        let mut r = Rewrite::new(&m);
        r.set_uri_param(UriTarget::Contact, "ob", None)
            .set_uri_hostport(UriTarget::Contact, "lb.example.com", None);
        assert_eq!(r.skipped(), 2);
        assert_eq!(r.finish(), *m.bytes());
    }

    /// A non-SIP URI is opaque after its colon: its parameters and host are
    /// not edited. (Its empty parameter view used to point nowhere, so an
    /// edit could land at an arbitrary offset.)
    #[test]
    fn non_sip_uris_are_not_edited() {
        let m = msg("INVITE tel:+1-201-555-0123 SIP/2.0\r\nm: <tel:+1>\r\nl: 0\r\n\r\n");
        let mut r = Rewrite::new(&m);
        r.set_uri_param(UriTarget::RequestUri, "x", None)
            .set_uri_param(UriTarget::Contact, "ob", None)
            .set_uri_hostport(UriTarget::RequestUri, "h", Some(1));
        assert_eq!(r.skipped(), 3);
        assert_eq!(r.finish(), *m.bytes());
    }

    #[test]
    fn hostport_and_prefix_removal() {
        let m = msg("OPTIONS sip:u@h:5060;lr?X=1 SIP/2.0\r\nX-viaduct-a: 1\r\n 2\r\nX-Other: 3\r\nx-VIADUCT-b: 4\r\nm: sip:c@d;expires=5\r\nl: 0\r\n\r\n");
        assert!(m.has_viaduct_headers());
        let out = Rewrite::new(&m)
            .set_uri_hostport(UriTarget::RequestUri, "2001:db8::1", Some(5080))
            .set_uri_hostport(UriTarget::Contact, "[2001:db8::2]", None)
            .remove_headers_with_prefix("X-Viaduct-")
            .finish();
        assert_eq!(
            &out[..],
            &b"OPTIONS sip:u@[2001:db8::1]:5080;lr?X=1 SIP/2.0\r\nX-Other: 3\r\nm: sip:c@[2001:db8::2];expires=5\r\nl: 0\r\n\r\n"[..]
        );
        let r = SipMessage::parse(out).unwrap();
        assert!(!r.has_viaduct_headers());
        assert_eq!(r.header("x-viaduct-a"), None);
        let mut rw = Rewrite::new(&m);
        rw.set_uri_hostport(UriTarget::RequestUri, "bad host", None)
            .set_uri_hostport(UriTarget::TopRoute, "h", None);
        assert_eq!(rw.skipped(), 2);
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
