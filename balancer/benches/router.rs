//! Routing decisions per second through the router core, no I/O:
//! untagged initial INVITEs (selection + new-call table + tag insertion),
//! tagged in-dialog requests (MAC check only), and backend responses
//! (response path). Each iteration feeds one message and drains its actions.
//! In `untagged_invite` the eight backends report load every 500 ms of
//! virtual time (as agents do), so they stay up and the benchmark measures
//! selection, not the 503 of a balancer whose backends all fell silent.
//!
//! `cargo bench -p balancer --bench router`

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // benchmark setup: unwraps, and the origin of time

use std::hint::black_box;
use std::time::{Duration, Instant};

use balancer::core::router::{Peer, Router, RouterConfig};
use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use encap_proto::frame::{Frame, LoadReport, SipFromBackend, Transport};
use encap_proto::tag::TagKeys;

const SECRET: &[u8] = b"bench secret";

fn router(now: Instant) -> Router {
    let mut r = Router::new(RouterConfig::default(), TagKeys::new(SECRET));
    r.socket_opened(1, Transport::Udp, "10.0.0.1:5060".parse().unwrap());
    r.conn_opened(
        2,
        Transport::Tcp,
        "10.0.0.9:40000".parse().unwrap(),
        "10.0.0.1:5060".parse().unwrap(),
    );
    for b in 1..=8 {
        r.backend_up(now, b, &format!("b{b}"));
    }
    while r.poll_action().is_some() {}
    r
}

fn invite(call_id: &str) -> Bytes {
    Bytes::from(format!(
        "INVITE sip:+15551234567@ivr.example.com SIP/2.0\r\n\
         Via: SIP/2.0/TCP 10.0.0.9:5060;branch=z9hG4bK-{call_id}-1;rport\r\n\
         Max-Forwards: 70\r\nFrom: \"Alice\" <sip:+15557654321@carrier.example.net>;tag=9fxced76sl\r\n\
         To: <sip:+15551234567@ivr.example.com>\r\nCall-ID: {call_id}\r\nCSeq: 314159 INVITE\r\n\
         Contact: <sip:+15557654321@10.0.0.9:5060;transport=tcp>\r\n\
         Supported: timer, 100rel\r\nAllow: INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE\r\n\
         Content-Type: application/sdp\r\nContent-Length: 142\r\n\r\n\
         v=0\r\no=alice 2890844526 2890844526 IN IP4 10.0.0.9\r\ns=-\r\nc=IN IP4 10.0.0.9\r\n\
         t=0 0\r\nm=audio 49170 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n"
    ))
}

fn bye(call_id: &str, tag: &str) -> Bytes {
    Bytes::from(format!(
        "BYE sip:ivr@10.0.0.1:5060;transport=tcp;vd={tag} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 10.0.0.9:5060;branch=z9hG4bK-{call_id}-bye\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+15557654321@carrier.example.net>;tag=9fxced76sl\r\n\
         To: <sip:+15551234567@ivr.example.com>;tag=b2bua-77\r\nCall-ID: {call_id}\r\n\
         CSeq: 314160 BYE\r\nContent-Length: 0\r\n\r\n"
    ))
}

fn ok_200(call_id: &str) -> Bytes {
    Bytes::from(format!(
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 10.0.0.9:5060;branch=z9hG4bK-{call_id}-1;rport=40000\r\n\
         From: <sip:+15557654321@carrier.example.net>;tag=9fxced76sl\r\n\
         To: <sip:+15551234567@ivr.example.com>;tag=b2bua-77\r\nCall-ID: {call_id}\r\nCSeq: 314159 INVITE\r\n\
         Contact: <sip:ivr@10.0.0.1:5060;transport=tcp;vd=0001000000000000a>\r\nContent-Length: 0\r\n\r\n"
    ))
}

/// 4096 BYEs, each with its call's valid tag for one of eight backends.
fn tagged_byes(keys: &TagKeys, ids: &[String]) -> Vec<Bytes> {
    ids.iter()
        .take(4096)
        .enumerate()
        .map(|(n, id)| {
            let tag = keys.mint((n % 8) as u16 + 1, id.as_bytes());
            bye(id, std::str::from_utf8(&tag).unwrap())
        })
        .collect()
}

fn call_ids() -> Vec<String> {
    (0..65_536)
        .map(|i| format!("{i:08x}-4c1d-11ef@10.0.0.9"))
        .collect()
}

fn tcp_peer() -> Peer {
    Peer {
        conn: 2,
        transport: Transport::Tcp,
        remote: "10.0.0.9:40000".parse().unwrap(),
        local: "10.0.0.1:5060".parse().unwrap(),
    }
}

/// Instruction counting (exact, whatever the machine's load): feeds `n`
/// tagged in-dialog requests and returns. Run it under cachegrind for two
/// values of `n`; the difference divided by the difference of `n` is the
/// cost of one message:
///
/// ```text
/// VIADUCT_COUNT=20000 valgrind --tool=cachegrind --cache-sim=no target/release/deps/router-*
/// ```
fn count(n: usize) {
    let t0 = Instant::now();
    let byes = tagged_byes(&TagKeys::new(SECRET), &call_ids());
    let mut r = router(t0);
    let peer = tcp_peer();
    for i in 0..n {
        r.handle_sip(t0, 0, peer, byes[i % byes.len()].clone());
        while let Some(a) = r.poll_action() {
            black_box(a);
        }
    }
}

fn bench(c: &mut Criterion) {
    let peer = tcp_peer();
    let keys = TagKeys::new(SECRET);
    let ids = call_ids();
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));

    // Untagged INVITEs, each a new call; virtual time moves 1 ms a call so
    // the new-call table holds ~32k entries in steady state.
    let invites: Vec<Bytes> = ids.iter().map(|id| invite(id)).collect();
    let t0 = Instant::now();
    let mut r = router(t0);
    let mut i = 0usize;
    g.bench_function("untagged_invite", |b| {
        b.iter(|| {
            let now = t0 + Duration::from_millis(i as u64);
            if i % 500 == 0 {
                for b in 1..=8u16 {
                    let report = LoadReport {
                        seq: i as u64 / 500 + 1,
                        active_calls: 100 * u32::from(b),
                        capacity: 2000,
                        ..LoadReport::default()
                    };
                    r.handle_frame(now, b, Frame::Load(report));
                }
            }
            if i % 1024 == 0 {
                r.handle_timeout(now);
            }
            r.handle_sip(now, 0, peer, invites[i % invites.len()].clone());
            while let Some(a) = r.poll_action() {
                black_box(a);
            }
            i += 1;
        })
    });

    // Tagged in-dialog requests: routed by the tag alone.
    let byes = tagged_byes(&keys, &ids);
    let mut r = router(t0);
    let mut i = 0usize;
    g.bench_function("tagged_in_dialog", |b| {
        b.iter(|| {
            r.handle_sip(t0, 0, peer, byes[i % byes.len()].clone());
            while let Some(a) = r.poll_action() {
                black_box(a);
            }
            i += 1;
        })
    });

    // Backend responses on their way out (response path).
    let oks: Vec<Frame> = ids
        .iter()
        .take(4096)
        .map(|id| {
            Frame::SipFromBackend(SipFromBackend {
                connection: Some(2),
                transport: Transport::Tcp,
                next_hop: "10.0.0.9:40000".parse().unwrap(),
                message: ok_200(id),
            })
        })
        .collect();
    let mut r = router(t0);
    let mut i = 0usize;
    g.bench_function("backend_response", |b| {
        b.iter(|| {
            r.handle_frame(t0, 1, oks[i % oks.len()].clone());
            while let Some(a) = r.poll_action() {
                black_box(a);
            }
            i += 1;
        })
    });
    g.finish();
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
