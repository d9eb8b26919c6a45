//! Fuzz the SIP stream framer, scanner and rewriter together: arbitrary
//! bytes fed in arbitrary chunks. Nothing may panic, and the framer must
//! yield the same units however the input is split.
#![no_main]

use bytes::{Bytes, BytesMut};
use encap_proto::sip::{
    frame_datagram, frame_datagram_scanned, Framed, FramingError, Limits, Rewrite, ScanError,
    Scanned, SipMessage, StartLine, StreamFramer, Uri, UriTarget,
};
use libfuzzer_sys::fuzz_target;

fn run(
    chunks: &mut dyn Iterator<Item = &[u8]>,
    limits: Limits,
) -> (Vec<Framed>, Option<FramingError>) {
    let mut framer = StreamFramer::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match framer.decode(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    loop {
        match framer.decode_eof(&mut buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// One unit as `decode` + `parse_with` or `decode_scanned` see it; a scanned
/// message by its bytes and every offset the scan kept (`Debug`).
#[derive(Debug, PartialEq)]
enum Unit {
    Message(Bytes, String),
    Invalid(Bytes, ScanError),
    Ping,
    Pong,
}

fn unit_of_framed(f: Framed, limits: &Limits) -> Unit {
    match f {
        Framed::Message(m) => match SipMessage::parse_with(m.clone(), limits) {
            Ok(msg) => Unit::Message(m, format!("{msg:?}")),
            Err(e) => Unit::Invalid(m, e),
        },
        Framed::Ping => Unit::Ping,
        Framed::Pong => Unit::Pong,
    }
}

/// A unit as the one-walk paths (`decode_scanned`, `frame_datagram_scanned`)
/// give it.
fn unit_of_scanned(s: Scanned) -> Unit {
    match s {
        Scanned::Message(msg) => Unit::Message(msg.bytes().clone(), format!("{msg:?}")),
        Scanned::Invalid { message, error } => Unit::Invalid(message, error),
        Scanned::Ping => Unit::Ping,
        Scanned::Pong => Unit::Pong,
    }
}

/// The one-walk `decode_scanned` over `chunks` (`decode_eof` at the end).
fn run_scanned(
    chunks: &mut dyn Iterator<Item = &[u8]>,
    limits: Limits,
) -> (Vec<Unit>, Option<FramingError>) {
    let mut framer = StreamFramer::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match framer.decode_scanned(&mut buf) {
                Ok(Some(s)) => out.push(unit_of_scanned(s)),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    loop {
        match framer.decode_eof(&mut buf) {
            Ok(Some(f)) => out.push(unit_of_framed(f, &limits)),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Differential check: the views the scan caches agree with a slow re-parse
/// of the same header (walk + full parse).
fn cached_agree(msg: &SipMessage) {
    assert_eq!(msg.top_via(), msg.vias().next());
    // The hop below the top Via, read from where the scan's top Via ended:
    // the scan has parsed every via-parm, so it cannot fail here.
    assert_eq!(msg.second_via(), Ok(msg.vias().nth(1)));
    if let StartLine::Request { uri, .. } = msg.start_line() {
        assert_eq!(msg.request_uri(), Uri::parse(uri));
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
        assert_eq!(msg.header(name), msg.headers(name).next(), "{name}");
    }
    if msg.validate().is_ok() {
        assert_eq!(
            msg.from_tag(),
            msg.from().and_then(|f| f.param("tag").flatten())
        );
        assert_eq!(
            msg.to_tag(),
            msg.to().and_then(|f| f.param("tag").flatten())
        );
    }
}

fn exercise(m: Bytes) {
    let Ok(msg) = SipMessage::parse(m) else {
        return;
    };
    cached_agree(&msg);
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
    let _ = msg.header("subject");
    let out = Rewrite::new(&msg)
        .insert_header("Via", b"SIP/2.0/TCP lb.example.com;branch=z9hG4bKfuzz")
        .set_top_via_param("rport", Some(b"5060"))
        .set_uri_param(UriTarget::Contact, "ob", None)
        .remove_headers("Route")
        .finish();
    let big = Limits {
        max_header_bytes: usize::MAX,
        max_body_bytes: usize::MAX,
        max_headers: usize::MAX,
    };
    let again = SipMessage::parse_with(out, &big).expect("a rewritten message scans");
    assert_eq!(again.call_id(), msg.call_id());
    assert_eq!(again.body(), msg.body());
}

fuzz_target!(|data: &[u8]| {
    let Some((&[chunk, max_hdr], input)) = data.split_first_chunk::<2>() else {
        return;
    };
    let limits = Limits {
        max_header_bytes: 16 + usize::from(max_hdr) * 4,
        max_body_bytes: 1024,
        max_headers: 32,
    };
    let chunk = usize::from(chunk).max(1);
    let whole = run(&mut std::iter::once(input), limits);
    let split = run(&mut input.chunks(chunk), limits);
    assert_eq!(whole, split, "framing depends on how the input is split");
    let parsed = (
        whole
            .0
            .iter()
            .cloned()
            .map(|f| unit_of_framed(f, &limits))
            .collect::<Vec<_>>(),
        whole.1.clone(),
    );
    let scanned = run_scanned(&mut input.chunks(chunk), limits);
    assert_eq!(
        scanned, parsed,
        "decode_scanned differs from decode + parse"
    );
    for f in whole.0 {
        if let Framed::Message(m) = f {
            exercise(m);
        }
    }
    let datagram = Bytes::copy_from_slice(input);
    let framed = frame_datagram(datagram.clone(), &limits);
    // The one-walk datagram path gives what frame_datagram + parse_with give.
    let expected = framed.clone().map(|f| unit_of_framed(f, &limits));
    let got = frame_datagram_scanned(datagram, &limits).map(unit_of_scanned);
    assert_eq!(got, expected, "frame_datagram_scanned disagrees");
    if let Ok(Framed::Message(m)) = framed {
        exercise(m);
    }
});
