//! The routing hot path: frame a message off a stream buffer, scan it, read
//! what routing reads, and insert one Via.
//!
//! `frame+scan` uses the one-walk [`StreamFramer::decode_scanned`];
//! `decode+parse` is the same work through the two-call API
//! ([`StreamFramer::decode`] then [`SipMessage::parse`]), which walks the
//! header section three times.
//!
//! Each iteration frames a fresh copy of a 64-message stream buffer; the
//! copy is made outside the timed part (`iter_batched_ref`), as a socket
//! read would have filled the buffer.
//!
//! `cargo bench -p encap-proto --bench sip_path -- --warm-up-time 1 --measurement-time 3`

// Test helpers too: a panic here is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use encap_proto::sip::{Framed, Limits, Rewrite, Scanned, SipMessage, StreamFramer};

const SDP: &str = "v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\n\
s=Session SDP\r\n\
c=IN IP4 192.0.2.101\r\n\
t=0 0\r\n\
m=audio 49172 RTP/AVP 0 8 97 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:97 iLBC/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n";

fn invite() -> Vec<u8> {
    format!(
        "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com;transport=tcp>\r\n\
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO\r\n\
Supported: replaces, timer\r\n\
User-Agent: Viaduct-Bench/1.0\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    )
    .into_bytes()
}

fn ok_200() -> Vec<u8> {
    format!(
        "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/TCP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;received=192.0.2.101;rport=5060\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:bob@192.0.2.4;transport=tcp>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    )
    .into_bytes()
}

/// Frames every message in `stream` with `decode` and scans it with
/// `parse`; returns a checksum.
fn decode_and_parse(framer: &mut StreamFramer, buf: &mut BytesMut) -> usize {
    let mut n = 0;
    while let Ok(Some(Framed::Message(m))) = framer.decode(buf) {
        let Ok(msg) = SipMessage::parse(m) else {
            break;
        };
        n += msg.call_id().map_or(0, <[u8]>::len);
        n += msg.top_via().and_then(|v| v.branch).map_or(0, <[u8]>::len);
        n += msg.cseq().map_or(0, |c| c.seq as usize);
        n += msg.from_tag().map_or(0, <[u8]>::len) + msg.to_tag().map_or(0, <[u8]>::len);
    }
    n
}

/// As [`decode_and_parse`], with the one-walk [`StreamFramer::decode_scanned`].
fn frame_and_scan(framer: &mut StreamFramer, buf: &mut BytesMut) -> usize {
    let mut n = 0;
    while let Ok(Some(Scanned::Message(msg))) = framer.decode_scanned(buf) {
        n += msg.call_id().map_or(0, <[u8]>::len);
        n += msg.top_via().and_then(|v| v.branch).map_or(0, <[u8]>::len);
        n += msg.cseq().map_or(0, |c| c.seq as usize);
        n += msg.from_tag().map_or(0, <[u8]>::len) + msg.to_tag().map_or(0, <[u8]>::len);
    }
    n
}

/// Everything the balancer's routing reads after `SipMessage::parse`.
fn routing_reads(msg: &SipMessage) -> usize {
    let mut n = msg.call_id().map_or(0, <[u8]>::len);
    n += msg.cseq().map_or(0, |c| c.seq as usize + c.method.len());
    n += msg.top_via().and_then(|v| v.branch).map_or(0, <[u8]>::len);
    n += msg
        .top_via()
        .map_or(0, |v| v.host.len() + usize::from(v.port.unwrap_or(0)));
    n += msg.from_tag().map_or(0, <[u8]>::len) + msg.to_tag().map_or(0, <[u8]>::len);
    n += msg
        .request_uri()
        .and_then(|u| u.param("vd"))
        .map_or(0, |v| v.map_or(1, <[u8]>::len));
    n += msg.top_route().map_or(0, |r| r.uri.host.len());
    n += msg.max_forwards().unwrap_or(0) as usize;
    n += msg.header("X-Viaduct-Backend").map_or(0, <[u8]>::len);
    n += msg.header("X-Viaduct-Failover").map_or(0, <[u8]>::len);
    n
}

fn bench(c: &mut Criterion) {
    const BATCH: usize = 64;
    for (name, msg) in [("invite_sdp", invite()), ("ok200_sdp", ok_200())] {
        let mut stream = Vec::with_capacity(msg.len() * BATCH);
        for _ in 0..BATCH {
            stream.extend_from_slice(&msg);
        }
        let stream = Bytes::from(stream);
        let mut g = c.benchmark_group(format!("sip_path/{name}_{}B", msg.len()));
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function("frame+scan x64", |b| {
            let mut framer = StreamFramer::new(Limits::default());
            b.iter_batched_ref(
                || BytesMut::from(&stream[..]),
                |buf| black_box(frame_and_scan(&mut framer, buf)),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("decode+parse x64", |b| {
            let mut framer = StreamFramer::new(Limits::default());
            b.iter_batched_ref(
                || BytesMut::from(&stream[..]),
                |buf| black_box(decode_and_parse(&mut framer, buf)),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("frame+scan+route_reads x64", |b| {
            let mut framer = StreamFramer::new(Limits::default());
            b.iter_batched_ref(
                || BytesMut::from(&stream[..]),
                |buf| {
                    let mut n = 0;
                    while let Ok(Some(Scanned::Message(msg))) = framer.decode_scanned(buf) {
                        n += routing_reads(&msg);
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("frame+scan+insert_via x64", |b| {
            let mut framer = StreamFramer::new(Limits::default());
            b.iter_batched_ref(
                || BytesMut::from(&stream[..]),
                |buf| {
                    let mut n = 0;
                    while let Ok(Some(Scanned::Message(msg))) = framer.decode_scanned(buf) {
                        let out = Rewrite::new(&msg)
                            .insert_header(
                                "Via",
                                b"SIP/2.0/TCP lb.example.com:5060;branch=z9hG4bKlb",
                            )
                            .finish();
                        n += out.len();
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
        let single = Bytes::from(msg.clone());
        let mut g = c.benchmark_group(format!("sip_path/{name}_{}B_single", msg.len()));
        g.throughput(Throughput::Bytes(single.len() as u64));
        g.bench_function("scan only", |b| {
            b.iter(|| black_box(SipMessage::parse(single.clone()).map(|m| m.call_id().is_some())))
        });
        g.finish();
    }
}

/// Instruction counting (exact, whatever the machine's load): frames and
/// scans `n` copies of the INVITE (or, with `VIADUCT_MSG=ok200`, the 200 OK)
/// off one stream buffer. Run it under cachegrind for two values of `n`; the
/// difference divided by the difference of `n` is the cost of one message:
///
/// ```text
/// VIADUCT_COUNT=2000 valgrind --tool=cachegrind --cache-sim=no target/release/deps/sip_path-*
/// ```
fn count(n: usize) {
    let msg = match std::env::var("VIADUCT_MSG").as_deref() {
        Ok("ok200") => ok_200(),
        _ => invite(),
    };
    let mut stream = Vec::with_capacity(msg.len() * n);
    for _ in 0..n {
        stream.extend_from_slice(&msg);
    }
    let mut buf = BytesMut::from(&stream[..]);
    let mut framer = StreamFramer::new(Limits::default());
    let got = frame_and_scan(&mut framer, &mut buf);
    assert!(buf.is_empty(), "every message framed");
    black_box(got);
}

criterion_group!(benches, bench);

fn main() {
    if let Some(n) = std::env::var("VIADUCT_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        count(n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
