//! Fuzz the frame decoder: arbitrary bytes, fed in arbitrary chunks, with an
//! arbitrary negotiated version and maximum. It must never panic, never
//! loop, and every frame it yields must encode back to bytes that decode to
//! the same frame.
#![no_main]

use bytes::BytesMut;
use encap_proto::frame::{encode, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[version, chunk, max_hi], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mut decoder = FrameDecoder::new(u32::from(max_hi) << 8 | 0xff);
    decoder.set_version(version % 3);
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut again = BytesMut::new();
                    if encode(&frame, decoder.version(), &mut again).is_ok() {
                        let mut check = FrameDecoder::new(decoder.max_body());
                        check.set_version(decoder.version());
                        let round = check.decode(&mut again).expect("re-encoded frame decodes");
                        assert_eq!(round, Some(frame));
                        assert!(again.is_empty());
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.decode_eof(&mut buf);
});
