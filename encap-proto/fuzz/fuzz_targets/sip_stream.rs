//! Fuzz the SIP stream framer, scanner and rewriter together: arbitrary
//! bytes fed in arbitrary chunks. Nothing may panic, and the framer must
//! yield the same units however the input is split.
#![no_main]

use bytes::Bytes;
use encap_proto::sip::checks::{self, frame_stream, scan_stream, unit_of_framed, unit_of_scanned};
use encap_proto::sip::{frame_datagram, frame_datagram_scanned, Framed, Limits, SipMessage};
use libfuzzer_sys::fuzz_target;

fn exercise(m: Bytes) {
    if let Ok(msg) = SipMessage::parse(m) {
        checks::exercise(&msg);
    }
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
