//! Encapsulation frames: round trips, golden bytes, and bad input.
//!
//! * every frame type survives encode → decode (proptest), whatever the
//!   split of the byte stream;
//! * the exact bytes of each frame type are pinned as insta snapshots, so a
//!   change of the wire format is a reviewed change of SPEC.md;
//! * truncated, oversized, unknown-type and garbage input give the error
//!   SPEC.md documents, never a panic.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive: they may unwrap and spawn

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use bytes::{Bytes, BytesMut};
use encap_proto::frame::{
    encode, Challenge, Close, Code, DrainState, Frame, FrameCodec, FrameDecoder, FrameError,
    FrameType, Hello, LoadReport, MalformedReason, PublicAddress, Refuse, SipFromBackend,
    SipToBackend, Transport, Welcome, DEFAULT_MAX_BODY, HEADER_LEN, PROTOCOL_VERSION,
};
use proptest::prelude::*;

fn wire(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    encode(frame, PROTOCOL_VERSION, &mut out).expect("encodable frame");
    out
}

/// Decodes every frame of `bytes`, fed in chunks of `chunk` bytes.
fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<Frame>, FrameError> {
    let mut decoder = FrameDecoder::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(frame) = decoder.decode(&mut buf)? {
            frames.push(frame);
        }
    }
    if let Some(frame) = decoder.decode_eof(&mut buf)? {
        frames.push(frame);
    }
    Ok(frames)
}

// ---------------------------------------------------------------- strategies

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn arb_transport() -> impl Strategy<Value = Transport> {
    proptest::sample::select(Transport::ALL.to_vec())
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        Just(String::new()),
        Just("é✓ ünïcode".to_owned())
    ]
}

fn arb_payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..600).prop_map(Bytes::from)
}

fn arb_code() -> impl Strategy<Value = Code> {
    any::<u16>().prop_map(Code)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), arb_text(), any::<[u8; 16]>()).prop_map(
            |(min_version, max_version, agent, nonce)| {
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    agent,
                    nonce,
                })
            }
        ),
        (any::<u8>(), arb_text(), any::<[u8; 16]>()).prop_map(|(version, balancer, nonce)| {
            Frame::Challenge(Challenge {
                version,
                balancer,
                nonce,
            })
        }),
        any::<[u8; 32]>().prop_map(Frame::Auth),
        (
            any::<u16>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec((arb_transport(), arb_addr()), 0..6),
        )
            .prop_map(
                |(backend_id, mac, report_interval_ms, max_frame_body, addrs)| {
                    Frame::Welcome(Welcome {
                        backend_id,
                        mac,
                        report_interval_ms,
                        max_frame_body,
                        addresses: addrs
                            .into_iter()
                            .map(|(transport, addr)| PublicAddress { transport, addr })
                            .collect(),
                    })
                }
            ),
        (arb_code(), arb_text()).prop_map(|(code, reason)| Frame::Refuse(Refuse { code, reason })),
        (
            any::<bool>(),
            any::<u64>(),
            arb_transport(),
            arb_addr(),
            arb_addr(),
            any::<u64>(),
            arb_payload()
        )
            .prop_map(
                |(failover, connection, transport, peer, local, arrival_unix_us, message)| {
                    Frame::SipToBackend(SipToBackend {
                        failover,
                        connection,
                        transport,
                        peer,
                        local,
                        arrival_unix_us,
                        message,
                    })
                }
            ),
        (
            proptest::option::of(any::<u64>()),
            arb_transport(),
            arb_addr(),
            arb_payload()
        )
            .prop_map(|(connection, transport, next_hop, message)| {
                Frame::SipFromBackend(SipFromBackend {
                    connection,
                    transport,
                    next_hop,
                    message,
                })
            }),
        (
            any::<u64>(),
            any::<u32>(),
            0u16..=1000,
            any::<u32>(),
            proptest::option::of(0u16..=10_000),
            any::<[u64; 4]>(),
        )
            .prop_map(|(seq, active_calls, cpu_permille, capacity, score, t)| {
                Frame::Load(LoadReport {
                    seq,
                    active_calls,
                    cpu_permille,
                    capacity,
                    score,
                    msgs_in: t[0],
                    msgs_out: t[1],
                    bytes_in: t[2],
                    bytes_out: t[3],
                })
            }),
        proptest::sample::select(vec![
            DrainState::Serving,
            DrainState::Draining,
            DrainState::Drained
        ])
        .prop_map(Frame::Drain),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (arb_code(), arb_text()).prop_map(|(code, reason)| Frame::Goodbye(Close { code, reason })),
        (arb_code(), arb_text()).prop_map(|(code, reason)| Frame::Error(Close { code, reason })),
        // Types this version does not know: 0x40..=0xfe are unassigned.
        (0x40u8..=0xfe, arb_payload()).prop_map(|(t, body)| Frame::Unknown {
            frame_type: FrameType(t),
            body
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_round_trips(frame in arb_frame()) {
        let bytes = wire(&frame);
        let frames = decode_all(&bytes, bytes.len()).unwrap();
        prop_assert_eq!(frames, vec![frame]);
    }

    #[test]
    fn a_stream_of_frames_decodes_the_same_whatever_the_split(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        chunk in 1usize..64,
    ) {
        let mut bytes = BytesMut::new();
        for f in &frames {
            encode(f, PROTOCOL_VERSION, &mut bytes).unwrap();
        }
        prop_assert_eq!(decode_all(&bytes, chunk).unwrap(), frames);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..300) {
        // Any result is fine; a panic or a hang is not.
        let _ = decode_all(&bytes, chunk);
    }

    #[test]
    fn every_truncation_of_a_frame_is_reported_at_eof(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = wire(&frame);
        let cut = cut.index(bytes.len());
        let mut decoder = FrameDecoder::default();
        let mut buf = BytesMut::from(&bytes[..cut]);
        prop_assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        let expected = if cut == 0 { Ok(None) } else { Err(FrameError::Truncated { buffered: cut }) };
        prop_assert_eq!(decoder.decode_eof(&mut buf), expected);
    }
}

// ------------------------------------------------------------- golden bytes

/// Hex dump with the header split off, one line per 16 body bytes.
fn hexdump(bytes: &[u8]) -> String {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!("header: {}\n", hex(&bytes[..HEADER_LEN]));
    for line in bytes[HEADER_LEN..].chunks(16) {
        out.push_str(&format!("  body: {}\n", hex(line)));
    }
    out
}

fn v4(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn golden_frames() -> Vec<(&'static str, Frame)> {
    let invite = Bytes::from_static(b"INVITE sip:b@x SIP/2.0\r\nl: 0\r\n\r\n");
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
                agent: "b1".into(),
                nonce: [0xa0; 16],
            }),
        ),
        (
            "challenge",
            Frame::Challenge(Challenge {
                version: 1,
                balancer: "lb".into(),
                nonce: [0xb0; 16],
            }),
        ),
        ("auth", Frame::Auth([0xcc; 32])),
        (
            "welcome",
            Frame::Welcome(Welcome {
                backend_id: 0x0102,
                mac: [0xdd; 32],
                report_interval_ms: 500,
                max_frame_body: DEFAULT_MAX_BODY,
                addresses: vec![
                    PublicAddress {
                        transport: Transport::Udp,
                        addr: v4("192.0.2.1:5060"),
                    },
                    PublicAddress {
                        transport: Transport::Tcp,
                        addr: "[2001:db8::1]:5060".parse().unwrap(),
                    },
                ],
            }),
        ),
        (
            "refuse",
            Frame::Refuse(Refuse {
                code: Code::AUTH_FAILED,
                reason: "bad mac".into(),
            }),
        ),
        (
            "sip_to_backend",
            Frame::SipToBackend(SipToBackend {
                failover: true,
                connection: 42,
                transport: Transport::Tcp,
                peer: v4("192.0.2.9:40000"),
                local: v4("192.0.2.1:5060"),
                arrival_unix_us: 1_700_000_000_000_000,
                message: invite.clone(),
            }),
        ),
        (
            "sip_from_backend",
            Frame::SipFromBackend(SipFromBackend {
                connection: Some(42),
                transport: Transport::Tcp,
                next_hop: v4("192.0.2.9:40000"),
                message: invite,
            }),
        ),
        (
            "load",
            Frame::Load(LoadReport {
                seq: 9,
                active_calls: 1234,
                cpu_permille: 250,
                capacity: 100,
                score: Some(5000),
                msgs_in: 1,
                msgs_out: 2,
                bytes_in: 3,
                bytes_out: 4,
            }),
        ),
        ("drain", Frame::Drain(DrainState::Draining)),
        ("ping", Frame::Ping(0x0102_0304_0506_0708)),
        ("pong", Frame::Pong(0x0102_0304_0506_0708)),
        (
            "goodbye",
            Frame::Goodbye(Close {
                code: Code::SHUTTING_DOWN,
                reason: "bye".into(),
            }),
        ),
        (
            "error",
            Frame::Error(Close {
                code: Code::MALFORMED_FRAME,
                reason: "x".into(),
            }),
        ),
    ]
}

#[test]
fn golden_bytes_of_every_frame_type() {
    let frames = golden_frames();
    // Every named frame type of SPEC.md has a golden rendering.
    let mut types: Vec<u8> = frames.iter().map(|(_, f)| f.frame_type().0).collect();
    types.sort_unstable();
    assert_eq!(
        types,
        [0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x20, 0x21, 0x30, 0x31, 0x3e, 0x3f]
    );
    for (name, frame) in frames {
        let bytes = wire(&frame);
        insta::assert_snapshot!(format!("frame_{name}"), hexdump(&bytes));
        assert_eq!(decode_all(&bytes, 1).unwrap(), vec![frame], "{name}");
    }
}

// ---------------------------------------------------------------- bad input

#[test]
fn oversized_body_is_refused_from_the_header_alone() {
    let mut decoder = FrameDecoder::new(1024);
    let mut buf = BytesMut::from(&[1u8, 0x11, 0, 0, 0, 0, 0x04, 0x01][..]);
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            frame: FrameType::SIP_FROM_BACKEND,
            len: 1025,
            max: 1024
        }
    );
    assert_eq!(err.code(), Code::FRAME_TOO_LARGE);
    assert_eq!(
        err.to_string(),
        "SIP_FROM_BACKEND frame body of 1025 bytes exceeds the maximum of 1024 bytes"
    );
}

#[test]
fn unknown_type_is_skipped_by_length_and_the_stream_goes_on() {
    let mut bytes = BytesMut::from(&[1u8, 0x77, 0, 0, 0, 0, 0, 3, 0xde, 0xad, 0xbe][..]);
    encode(&Frame::Ping(5), PROTOCOL_VERSION, &mut bytes).unwrap();
    let frames = decode_all(&bytes, 1).unwrap();
    assert_eq!(
        frames,
        vec![
            Frame::Unknown {
                frame_type: FrameType(0x77),
                body: Bytes::from_static(&[0xde, 0xad, 0xbe])
            },
            Frame::Ping(5)
        ]
    );
}

#[test]
fn reserved_types_are_malformed() {
    for t in [0x00u8, 0xff] {
        let mut buf = BytesMut::from(&[1u8, t, 0, 0, 0, 0, 0, 0][..]);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Malformed {
                    reason: MalformedReason::ReservedType,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), Code::MALFORMED_FRAME);
    }
}

#[test]
fn short_body_names_the_frame_and_field() {
    // A LOAD frame whose body stops inside `capacity`.
    let mut full = wire(&Frame::Load(LoadReport::default()));
    let cut = HEADER_LEN + 8 + 1 + 4 + 2 + 2;
    full.truncate(cut);
    full[4..8].copy_from_slice(&((cut - HEADER_LEN) as u32).to_be_bytes());
    let err = FrameDecoder::default().decode(&mut full).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed LOAD frame, field `capacity`: body ends early: field needs 4 bytes, 2 left"
    );
    let Frame::Error(close) = err.to_error_frame() else {
        panic!("expected ERROR")
    };
    assert_eq!(close.code, Code::MALFORMED_FRAME);
    assert!(close.reason.contains("LOAD") && close.reason.contains("capacity"));
}

#[test]
fn field_values_outside_the_spec_are_malformed() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // SIP_FROM_BACKEND with undefined flag bits.
        (
            vec![
                0x11, 0b10, 0, 0, 0, 0, 0, 0, 0, 0, 2, 4, 127, 0, 0, 1, 0x13, 0xc4,
            ],
            "flags",
        ),
        // SIP_TO_BACKEND with transport code 9.
        (
            vec![
                0x10, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9, 4, 127, 0, 0, 1, 0, 1, 4, 127, 0, 0, 1, 0, 1,
                0, 0, 0, 0, 0, 0, 0, 0,
            ],
            "transport",
        ),
        // SIP_FROM_BACKEND with address family 5.
        (
            vec![
                0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 5, 127, 0, 0, 1, 0x13, 0xc4,
            ],
            "next_hop",
        ),
        // DRAIN with state 3.
        (vec![0x21, 3], "state"),
        // REFUSE whose reason is not UTF-8.
        (vec![0x05, 0, 4, 0, 2, 0xff, 0xfe], "reason"),
        // LOAD with cpu 1001 permille.
        (
            [
                &[0x20u8][..],
                &[0; 8],
                &[0],
                &[0; 4],
                &1001u16.to_be_bytes(),
                &[0; 4 + 2 + 32],
            ]
            .concat(),
            "cpu_permille",
        ),
    ];
    for (spec, field) in cases {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[1, spec[0], 0, 0]);
        buf.extend_from_slice(&((spec.len() - 1) as u32).to_be_bytes());
        buf.extend_from_slice(&spec[1..]);
        match FrameDecoder::default().decode(&mut buf) {
            Err(FrameError::Malformed { field: f, .. }) => assert_eq!(f, field),
            other => panic!("field {field}: expected Malformed, got {other:?}"),
        }
    }
}

#[test]
fn tokio_codec_reads_frames_and_reports_errors() {
    use futures::{SinkExt, StreamExt};
    use tokio_util::codec::{FramedRead, FramedWrite};

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64);
        let mut writer = FramedWrite::new(client, FrameCodec::default());
        let mut reader = FramedRead::new(server, FrameCodec::default());
        let frames: Vec<Frame> = golden_frames().into_iter().map(|(_, f)| f).collect();
        let sent = frames.clone();
        let send = tokio::spawn(async move {
            for f in sent {
                writer.send(f).await.unwrap();
            }
            // Garbage after the good frames: a frame in version 9.
            let inner = writer.get_mut();
            tokio::io::AsyncWriteExt::write_all(inner, &[9, 0x30, 0, 0, 0, 0, 0, 8])
                .await
                .unwrap();
        });
        for expected in frames {
            assert_eq!(reader.next().await.unwrap().unwrap(), expected);
        }
        let err = reader.next().await.unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "PING frame in protocol version 9, expected version 1"
        );
        send.await.unwrap();
    });
}
