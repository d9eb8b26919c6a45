//! Fuzz the SIP stream framer, scanner and rewriter together: arbitrary
//! bytes fed in arbitrary chunks. Nothing may panic, and the framer must
//! yield the same units however the input is split.
#![no_main]

use bytes::Bytes;
use encap_proto::sip::checks::{
    assert_cached_agree, frame_stream, scan_stream, unit_of_framed, unit_of_scanned,
};
use encap_proto::sip::{
    frame_datagram, frame_datagram_scanned, Framed, Limits, Rewrite, SipMessage, UriTarget,
};
use libfuzzer_sys::fuzz_target;

fn exercise(m: Bytes) {
    let Ok(msg) = SipMessage::parse(m) else {
        return;
    };
    assert_cached_agree(&msg);
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
    let whole = frame_stream([input], limits);
    let split = frame_stream(input.chunks(chunk), limits);
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
    let scanned = scan_stream(input.chunks(chunk), limits);
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
