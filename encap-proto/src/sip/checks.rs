//! Differential checks of the framer and scanner, shared by this crate's
//! tests and its fuzz targets (not an API: hidden from the docs, may change
//! at any time). Each compares a fast path with a slow one over the same
//! input and panics, naming what differs, when they disagree.

use bytes::{Bytes, BytesMut};

use super::{
    Framed, FramingError, Limits, Rewrite, ScanError, Scanned, SipMessage, StartLine, StreamFramer,
    Uri, UriTarget,
};

/// One unit of a stream as either path gives it, for comparing
/// [`StreamFramer::decode_scanned`] with `decode` then
/// [`SipMessage::parse_with`]: a scanned message by its bytes and every
/// offset the scan kept (its `Debug` form).
#[derive(Debug, PartialEq)]
pub enum Unit {
    /// A message that scans: its bytes and its scan.
    Message(Bytes, String),
    /// A framed message the scanner refused.
    Invalid(Bytes, ScanError),
    /// A keep-alive ping (CRLFCRLF).
    Ping,
    /// A keep-alive pong (CRLF).
    Pong,
}

/// A framed unit, then [`SipMessage::parse_with`] on a message.
pub fn unit_of_framed(f: Framed, limits: &Limits) -> Unit {
    match f {
        Framed::Message(m) => match SipMessage::parse_with(m.clone(), limits) {
            Ok(msg) => Unit::Message(m, format!("{msg:?}")),
            Err(e) => Unit::Invalid(m, e),
        },
        Framed::Ping => Unit::Ping,
        Framed::Pong => Unit::Pong,
    }
}

/// A unit as the one-walk paths (`decode_scanned`,
/// `frame_datagram_scanned`) give it.
pub fn unit_of_scanned(s: Scanned) -> Unit {
    match s {
        Scanned::Message(msg) => Unit::Message(msg.bytes().clone(), format!("{msg:?}")),
        Scanned::Invalid { message, error } => Unit::Invalid(message, error),
        Scanned::Ping => Unit::Ping,
        Scanned::Pong => Unit::Pong,
    }
}

/// `decode` over `chunks` fed in turn, `decode_eof` at the end: the units,
/// and the error that ended the stream, if any.
pub fn frame_stream<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    limits: Limits,
) -> (Vec<Framed>, Option<FramingError>) {
    drive(chunks, limits, StreamFramer::decode, |f| f)
}

/// `decode_scanned` over `chunks` fed in turn, `decode_eof` (then
/// `parse_with`) at the end.
pub fn scan_stream<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    limits: Limits,
) -> (Vec<Unit>, Option<FramingError>) {
    drive(
        chunks,
        limits,
        |framer, buf| framer.decode_scanned(buf).map(|s| s.map(unit_of_scanned)),
        |f| unit_of_framed(f, &limits),
    )
}

/// Feeds `chunks` in turn to a framer, taking units with `step` while it
/// gives them, then the rest with `decode_eof` (each mapped by `at_eof`).
fn drive<'a, T>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    limits: Limits,
    mut step: impl FnMut(&mut StreamFramer, &mut BytesMut) -> Result<Option<T>, FramingError>,
    at_eof: impl Fn(Framed) -> T,
) -> (Vec<T>, Option<FramingError>) {
    let mut framer = StreamFramer::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match step(&mut framer, &mut buf) {
                Ok(Some(u)) => out.push(u),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    loop {
        match framer.decode_eof(&mut buf) {
            Ok(Some(f)) => out.push(at_eof(f)),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// The views the scan caches (top and second Via, Request-URI, first
/// values, tags) agree with a slow re-parse of the same header, and
/// `received`/`rport` edited where the scan saw them equal the same edits
/// found by a walk of the Via's parameters.
///
/// # Panics
///
/// On the first disagreement, naming it.
pub fn assert_cached_agree(m: &SipMessage) {
    assert_eq!(m.top_via(), m.vias().next(), "top Via");
    // The scan has parsed every via-parm, so reading below the top one
    // cannot fail on a scanned message.
    assert_eq!(m.second_via(), m.vias().nth(1), "second Via");
    if m.top_via().is_some() {
        // With a third name every edit goes by the parameter walk.
        let mut walked = Rewrite::new(m);
        walked.set_top_via_params(&[
            ("received", Some(b"192.0.2.1")),
            ("rport", Some(b"5070")),
            ("x-probe", None),
        ]);
        let mut scanned = Rewrite::new(m);
        scanned
            .set_top_via_params(&[("received", Some(b"192.0.2.1")), ("rport", Some(b"5070"))])
            .set_top_via_param("x-probe", None);
        assert_eq!(scanned.finish(), walked.finish(), "received/rport edits");
    }
    if let StartLine::Request { uri, .. } = m.start_line() {
        assert_eq!(m.request_uri(), Uri::parse(uri), "Request-URI");
    }
    for name in [
        "Via",
        "From",
        "To",
        "Call-ID",
        "Contact",
        "Route",
        "l",
        "CSeq",
        "X-Viaduct-Backend",
    ] {
        assert_eq!(m.header(name), m.headers(name).next(), "{name}");
    }
    if m.validate().is_ok() {
        assert_eq!(
            m.from_tag(),
            m.from().and_then(|f| f.param("tag").flatten()),
            "From tag"
        );
        assert_eq!(
            m.to_tag(),
            m.to().and_then(|f| f.param("tag").flatten()),
            "To tag"
        );
    }
}

/// Touches every accessor of a scanned message, checks its cached views
/// ([`assert_cached_agree`]), then applies every kind of edit and checks
/// that the result scans again with the same Call-ID and body, without
/// Max-Forwards or `X-Viaduct-` headers, with views that agree, and valid
/// if the original was.
///
/// # Panics
///
/// On the first check that fails.
pub fn exercise(msg: &SipMessage) {
    assert_cached_agree(msg);
    let valid = msg.validate().is_ok();
    let _ = (
        msg.start_line(),
        msg.request_uri(),
        msg.call_id(),
        msg.cseq(),
    );
    let _ = (
        msg.top_via(),
        msg.top_route(),
        msg.contact(),
        msg.from_tag(),
        msg.to_tag(),
    );
    let _ = (
        msg.max_forwards(),
        msg.content_length(),
        msg.body(),
        msg.vias().count(),
    );
    let _ = (msg.headers("v").count(), msg.header("subject"));
    if let Some(cid) = msg.call_id() {
        assert_eq!(&msg.slice(cid)[..], cid, "Call-ID slice");
    }
    let out = Rewrite::new(msg)
        .insert_header("Via", b"SIP/2.0/TCP lb.example.com;branch=z9hG4bKcheck")
        .insert_header("Record-Route", b"<sip:lb.example.com;lr>")
        .set_top_via_param("received", Some(b"192.0.2.1"))
        .set_top_via_param("rport", None)
        .set_uri_param(UriTarget::RequestUri, "transport", Some(b"tcp"))
        .set_uri_param(UriTarget::TopRoute, "lr", None)
        .set_uri_param(UriTarget::Contact, "ob", None)
        .remove_headers("max-forwards")
        .set_uri_hostport(UriTarget::Contact, "2001:db8::1", Some(5060))
        .set_uri_hostport(UriTarget::RequestUri, "lb.example.com", None)
        .remove_headers_with_prefix("X-Viaduct-")
        .finish();
    let big = Limits {
        max_header_bytes: usize::MAX,
        max_body_bytes: usize::MAX,
        max_headers: usize::MAX,
    };
    let again = match SipMessage::parse_with(out.clone(), &big) {
        Ok(m) => m,
        Err(e) => panic!("a rewritten message does not scan ({e}): {out:?}"),
    };
    assert_eq!(again.call_id(), msg.call_id(), "Call-ID after the rewrite");
    assert_eq!(again.body(), msg.body(), "body after the rewrite");
    assert_eq!(again.max_forwards(), None, "Max-Forwards removed");
    assert!(!again.has_viaduct_headers(), "X-Viaduct- headers removed");
    assert_cached_agree(&again);
    if valid {
        if let Err(e) = again.validate() {
            panic!("a rewrite of a valid message is invalid ({e}): {out:?}");
        }
    }
}
