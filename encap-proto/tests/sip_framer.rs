//! Stream and datagram framing: every split of the input gives the same
//! output (tokio-util style), keep-alives, limits, RFC 4475 datagram rules.

// Test helpers too: a panic here is a test failure with its message.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use encap_proto::sip::checks::{frame_stream, scan_stream, unit_of_framed, unit_of_scanned, Unit};
use encap_proto::sip::{
    frame_datagram, frame_datagram_scanned, Framed, FramingError, Limits, StreamFramer,
};
use proptest::prelude::*;

const INVITE: &[u8] = b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 28\r\n\
\r\n\
v=0\r\no=- 1 1 IN IP4 x\r\ns=-\r\n";

/// Compact `l`, and a CRLFCRLF inside the body (must not end anything).
const COMPACT: &[u8] =
    b"SIP/2.0 200 OK\r\nv: SIP/2.0/TCP h;branch=z9hG4bK1\r\ni: c1\r\nl: 6\r\n\r\nab\r\n\r\n";

/// Folded Content-Length with whitespace before the colon.
const FOLDED: &[u8] =
    b"OPTIONS sip:a@b SIP/2.0\r\ni: c2\r\nContent-Length   :\r\n  3\r\nX: y\r\n\r\nabc";

/// Runs the framer over `chunks`, collecting units, and the error that ended it (if any).
fn run(chunks: &[&[u8]], limits: Limits) -> (Vec<Framed>, Option<FramingError>) {
    frame_stream(chunks.iter().copied(), limits)
}

fn whole(input: &[u8]) -> (Vec<Framed>, Option<FramingError>) {
    run(&[input], Limits::default())
}

/// Asserts that every 2-way split, every 3-way split on a coarse grid and a
/// 1-byte-at-a-time feed all give the same result as the whole input.
fn assert_split_invariant(input: &[u8], limits: Limits) -> (Vec<Framed>, Option<FramingError>) {
    let expected = run(&[input], limits);
    for i in 0..=input.len() {
        let got = run(&[&input[..i], &input[i..]], limits);
        assert_eq!(got, expected, "split at {i}");
    }
    let step = (input.len() / 40).max(1);
    for i in (0..=input.len()).step_by(step) {
        for j in (i..=input.len()).step_by(step) {
            let got = run(&[&input[..i], &input[i..j], &input[j..]], limits);
            assert_eq!(got, expected, "split at {i},{j}");
        }
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(run(&bytes, limits), expected, "1 byte at a time");
    expected
}

fn msg(b: &'static [u8]) -> Framed {
    Framed::Message(Bytes::from_static(b))
}

#[test]
fn pipelined_messages_and_keepalives_split_everywhere() {
    let mut input = Vec::new();
    input.extend_from_slice(b"\r\n\r\n");
    input.extend_from_slice(INVITE);
    input.extend_from_slice(COMPACT);
    input.extend_from_slice(b"\r\n");
    input.extend_from_slice(FOLDED);
    input.extend_from_slice(b"\r\n\r\n\r\n");
    input.extend_from_slice(INVITE);
    let (out, err) = assert_split_invariant(&input, Limits::default());
    assert_eq!(err, None);
    assert_eq!(
        out,
        vec![
            Framed::Ping,
            msg(INVITE),
            msg(COMPACT),
            Framed::Pong,
            msg(FOLDED),
            Framed::Ping,
            Framed::Pong,
            msg(INVITE),
        ]
    );
}

#[test]
fn message_is_a_zero_copy_slice_of_the_buffer() {
    let mut framer = StreamFramer::new(Limits::default());
    let mut buf = BytesMut::from(INVITE);
    let start = buf.as_ptr();
    let Some(Framed::Message(m)) = framer.decode(&mut buf).unwrap() else {
        panic!("no message")
    };
    assert_eq!(m.as_ptr(), start);
}

#[test]
fn compact_and_folded_content_length() {
    assert_eq!(whole(COMPACT), (vec![msg(COMPACT)], None));
    assert_eq!(whole(FOLDED), (vec![msg(FOLDED)], None));
}

#[test]
fn lone_crlf_waits_for_the_next_bytes() {
    let mut framer = StreamFramer::new(Limits::default());
    let mut buf = BytesMut::from(&b"\r\n"[..]);
    assert_eq!(framer.decode(&mut buf), Ok(None));
    buf.extend_from_slice(b"\r");
    assert_eq!(framer.decode(&mut buf), Ok(None));
    buf.extend_from_slice(b"\n");
    assert_eq!(framer.decode(&mut buf), Ok(Some(Framed::Ping)));
    assert!(buf.is_empty());
    assert_eq!(whole(b"\r\n"), (vec![Framed::Pong], None));
}

#[test]
fn missing_content_length_is_fatal_on_streams() {
    let input = b"OPTIONS sip:a@b SIP/2.0\r\ni: x\r\n\r\n";
    let (out, err) = assert_split_invariant(input, Limits::default());
    assert!(out.is_empty());
    assert_eq!(err, Some(FramingError::MissingContentLength));
}

#[test]
fn invalid_and_conflicting_content_length() {
    let (_, err) = whole(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -999\r\n\r\n");
    assert_eq!(
        err,
        Some(FramingError::InvalidContentLength {
            reason: "negative value"
        })
    );
    let (_, err) = whole(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 1x\r\n\r\n");
    assert!(matches!(
        err,
        Some(FramingError::InvalidContentLength { .. })
    ));
    let (_, err) = whole(b"OPTIONS sip:a@b SIP/2.0\r\nl: 13\r\nContent-Length: 5\r\n\r\n");
    assert_eq!(
        err,
        Some(FramingError::ConflictingContentLength {
            first: 13,
            second: 5
        })
    );
    // The same value twice is fine.
    let ok = b"OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(whole(ok).1, None);
}

#[test]
fn oversized_header_is_refused_before_buffering_more() {
    let limits = Limits {
        max_header_bytes: 64,
        ..Limits::default()
    };
    let long_header = [b'a'; 80];
    let mut framer = StreamFramer::new(limits);
    let mut buf = BytesMut::from(&b"OPTIONS sip:a@b SIP/2.0\r\nX: "[..]);
    buf.extend_from_slice(&long_header);
    let err = framer.decode(&mut buf).unwrap_err();
    assert_eq!(err, FramingError::HeaderTooLarge { limit: 64 });
    assert!(err.to_string().contains("max_header_bytes = 64"), "{err}");
    // Exactly at the limit is accepted, one more byte is not; whatever the split.
    let at_limit = b"OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\nX: 01234567890123456789012345\r\n\r\n";
    assert_eq!(at_limit.len(), 64);
    assert_eq!(assert_split_invariant(at_limit, limits).1, None);
    let over = b"OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\nX: 012345678901234567890123456\r\n\r\n";
    assert_eq!(
        assert_split_invariant(over, limits).1,
        Some(FramingError::HeaderTooLarge { limit: 64 })
    );
}

#[test]
fn oversized_body_is_refused_from_the_header() {
    let limits = Limits {
        max_body_bytes: 10,
        ..Limits::default()
    };
    let (_, err) = run(&[b"OPTIONS sip:a@b SIP/2.0\r\nl: 11\r\n\r\n"], limits);
    let err = err.unwrap();
    assert_eq!(
        err,
        FramingError::BodyTooLarge {
            content_length: 11,
            limit: 10
        }
    );
    assert!(err.to_string().contains("max_body_bytes = 10"), "{err}");
}

#[test]
fn eof_inside_a_message_is_truncated() {
    let (out, err) = whole(&INVITE[..INVITE.len() - 1]);
    assert!(out.is_empty());
    assert_eq!(
        err,
        Some(FramingError::Truncated {
            got: INVITE.len() - 1,
            needed: INVITE.len()
        })
    );
    let (_, err) = whole(&INVITE[..20]);
    assert_eq!(err, Some(FramingError::UnterminatedHeaders { got: 20 }));
}

#[test]
fn datagram_rules() {
    let l = Limits::default();
    // Content-Length optional: the body is the rest of the datagram.
    let no_cl = Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\ni: x\r\n\r\nbody");
    assert_eq!(
        frame_datagram(no_cl.clone(), &l),
        Ok(Framed::Message(no_cl))
    );
    // Trailing bytes after Content-Length are dropped (RFC 4475 dblreq).
    let extra = Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\nl: 2\r\n\r\nbody");
    assert_eq!(
        frame_datagram(extra, &l),
        Ok(msg(b"OPTIONS sip:a@b SIP/2.0\r\nl: 2\r\n\r\nbo"))
    );
    // Content-Length larger than what is there (RFC 4475 clerr).
    let short = Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\nl: 9\r\n\r\nbody");
    assert_eq!(
        frame_datagram(short, &l),
        Err(FramingError::Truncated {
            got: 37,
            needed: 42
        })
    );
    assert_eq!(
        frame_datagram(Bytes::from_static(b"\r\n\r\n"), &l),
        Ok(Framed::Ping)
    );
    assert_eq!(
        frame_datagram(Bytes::from_static(b"\r\n"), &l),
        Ok(Framed::Pong)
    );
    assert_eq!(
        frame_datagram(Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\n"), &l),
        Err(FramingError::UnterminatedHeaders { got: 25 })
    );
    let small = Limits {
        max_body_bytes: 3,
        ..l
    };
    assert_eq!(
        frame_datagram(
            Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\n\r\nbody"),
            &small
        ),
        Err(FramingError::BodyTooLarge {
            content_length: 4,
            limit: 3
        })
    );
}

/// Corpus messages that frame on a stream as exactly themselves.
fn stream_corpus() -> Vec<Vec<u8>> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/corpus/rfc4475/valid"
    );
    let mut out = vec![INVITE.to_vec(), COMPACT.to_vec(), FOLDED.to_vec()];
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let b = std::fs::read(&p).unwrap();
        if let (v, None) = whole(&b) {
            if v == vec![Framed::Message(Bytes::from(b.clone()))] {
                out.push(b);
            }
        }
    }
    assert!(out.len() > 20, "only {} corpus messages frame", out.len());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_splits_of_random_concatenations(
        picks in prop::collection::vec((0usize..1000, 0u8..4), 1..12),
        cuts in prop::collection::vec(0usize..100_000, 0..40),
    ) {
        let corpus = stream_corpus_cached();
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for (i, ka) in picks {
            match ka {
                1 => { input.extend_from_slice(b"\r\n\r\n"); expected.push(Framed::Ping); }
                2 => { input.extend_from_slice(b"\r\n"); expected.push(Framed::Pong); }
                _ => {}
            }
            let m = &corpus[i % corpus.len()];
            input.extend_from_slice(m);
            expected.push(Framed::Message(Bytes::from(m.clone())));
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut last = 0;
        for c in cuts {
            chunks.push(&input[last..c]);
            last = c;
        }
        chunks.push(&input[last..]);
        let (out, err) = run(&chunks, Limits::default());
        prop_assert_eq!(err, None);
        prop_assert_eq!(out, expected);
    }
}

fn stream_corpus_cached() -> &'static [Vec<u8>] {
    static CORPUS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(stream_corpus)
}

/// `decode` then `parse_with` on every message, `decode_eof` at the end.
fn run_parsed(chunks: &[&[u8]], limits: Limits) -> (Vec<Unit>, Option<FramingError>) {
    let (units, err) = run(chunks, limits);
    let units = units
        .into_iter()
        .map(|f| unit_of_framed(f, &limits))
        .collect();
    (units, err)
}

/// `decode_scanned` on every chunk, `decode_eof` (then `parse_with`) at the end.
fn run_scanned(chunks: &[&[u8]], limits: Limits) -> (Vec<Unit>, Option<FramingError>) {
    scan_stream(chunks.iter().copied(), limits)
}

fn corpus_files(dir: &std::path::Path, out: &mut Vec<Vec<u8>>) {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            corpus_files(&p, out);
        } else if p.file_name().is_some_and(|n| n != "README.md") {
            out.push(std::fs::read(&p).unwrap());
        }
    }
}

/// Limits tight enough that corpus messages hit each of them.
const TIGHT: Limits = Limits {
    max_header_bytes: 300,
    max_body_bytes: 100,
    max_headers: 8,
};

/// The sample messages of this file, `extra`, then every corpus file.
fn samples_and_corpus(extra: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut files = vec![INVITE.to_vec(), COMPACT.to_vec(), FOLDED.to_vec()];
    files.extend(extra.iter().map(|e| e.to_vec()));
    corpus_files(
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../conformance/corpus"
        )),
        &mut files,
    );
    assert!(files.len() > 100, "only {} corpus files", files.len());
    files
}

/// The one-walk fast path gives exactly what `decode` then `parse_with`
/// give (same units, same scanned offsets, same errors), for every corpus
/// file (valid, invalid, RFC 5118), alone and pipelined, with keep-alives,
/// under tight limits too, however the input is split.
#[test]
fn decode_scanned_matches_decode_then_parse() {
    let files = samples_and_corpus(&[]);
    let tight = TIGHT;
    for f in &files {
        let mut twice = b"\r\n\r\n".to_vec();
        twice.extend_from_slice(f);
        twice.extend_from_slice(b"\r\n");
        twice.extend_from_slice(f);
        for input in [&f[..], &twice[..]] {
            for limits in [Limits::default(), tight] {
                let expected = run_parsed(&[input], limits);
                assert_eq!(run_scanned(&[input], limits), expected);
                let step = (input.len() / 16).max(1);
                for i in (0..=input.len()).step_by(step) {
                    let chunks = [&input[..i], &input[i..]];
                    assert_eq!(run_scanned(&chunks, limits), expected, "split at {i}");
                }
            }
        }
        let bytes: Vec<&[u8]> = f.chunks(1).collect();
        assert_eq!(
            run_scanned(&bytes, Limits::default()),
            run_parsed(&[f], Limits::default()),
            "1 byte at a time"
        );
    }
}

/// `frame_datagram_scanned` agrees with `frame_datagram` then `parse_with`
/// on every corpus file (valid, invalid, RFC 5118) as a datagram, with
/// bytes after it, cut short, as keep-alives, under tight limits too.
#[test]
fn frame_datagram_scanned_matches_frame_then_parse() {
    let files = samples_and_corpus(&[b"\r\n\r\n", b"\r\n", b""]);
    let tight = TIGHT;
    let mut fast = 0;
    for f in &files {
        let mut trailing = f.clone();
        trailing.extend_from_slice(b"garbage after the message");
        let short = &f[..f.len() / 2];
        for input in [&f[..], &trailing[..], short] {
            for limits in [Limits::default(), tight] {
                let datagram = Bytes::copy_from_slice(input);
                let expected = frame_datagram(datagram.clone(), &limits)
                    .map(|framed| unit_of_framed(framed, &limits));
                let got = frame_datagram_scanned(datagram, &limits).map(unit_of_scanned);
                assert_eq!(got, expected, "{}", String::from_utf8_lossy(input));
                fast += usize::from(matches!(got, Ok(Unit::Message(..))));
            }
        }
    }
    assert!(fast > 100, "only {fast} datagrams scanned as messages");
}
