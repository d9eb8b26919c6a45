//! The router core, fed messages and time, no sockets: one test per rule
//! of design.md §1-§4, §6 and §8.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests: a failed unwrap fails the test; they pick the origin of time

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::core::router::{
    Action, BackendId, BadTagPolicy, Egress, Event, Peer, Router, RouterConfig, TAG_HEADER,
};
use bytes::Bytes;
use encap_proto::frame::{
    Code, DrainState, Frame, LoadReport, SipFromBackend, SipToBackend, Transport,
};
use encap_proto::sip::SipMessage;
use encap_proto::tag::TagKeys;

const SECRET: &[u8] = b"cluster secret";
const UDP_SOCKET: u64 = 1;
const LB: &str = "192.0.2.1:5060";

struct Lab {
    router: Router,
    t0: Instant,
    keys: TagKeys,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp_from(remote: &str) -> Peer {
    Peer {
        conn: UDP_SOCKET,
        transport: Transport::Udp,
        remote: addr(remote),
        local: addr(LB),
    }
}

fn tcp_from(conn: u64, remote: &str) -> Peer {
    Peer {
        conn,
        transport: Transport::Tcp,
        remote: addr(remote),
        local: addr(LB),
    }
}

fn lab_with(config: RouterConfig, backends: &[BackendId]) -> Lab {
    let t0 = Instant::now();
    let mut router = Router::new(config, TagKeys::new(SECRET));
    router.socket_opened(UDP_SOCKET, Transport::Udp, addr(LB));
    router.listener_opened(addr(LB));
    for &b in backends {
        router.backend_up(t0, b, &format!("b{b}"));
    }
    let mut lab = Lab {
        router,
        t0,
        keys: TagKeys::new(SECRET),
    };
    lab.actions();
    lab
}

fn lab(backends: &[BackendId]) -> Lab {
    lab_with(RouterConfig::default(), backends)
}

impl Lab {
    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.router.poll_action()).collect()
    }

    fn send(&mut self, secs: u64, from: Peer, msg: &str) -> Vec<Action> {
        self.router.handle_sip(
            self.at(secs),
            0,
            from,
            Bytes::copy_from_slice(msg.as_bytes()),
        );
        self.actions()
    }

    /// Sends and expects exactly one frame to a backend; returns it.
    fn routed(&mut self, secs: u64, from: Peer, msg: &str) -> (BackendId, SipToBackend) {
        let actions = self.send(secs, from, msg);
        let debug = format!("{actions:?}");
        let mut frames = actions.into_iter().filter_map(|a| match a {
            Action::ToBackend {
                backend,
                frame: Frame::SipToBackend(s),
            } => Some((backend, s)),
            _ => None,
        });
        let first = frames
            .next()
            .unwrap_or_else(|| panic!("nothing reached a backend for:\n{msg}\n{debug}"));
        assert!(frames.next().is_none());
        first
    }

    /// Every backend in `backends` pings at `secs` (stays up).
    fn heartbeat(&mut self, secs: u64, backends: &[BackendId]) {
        for &b in backends {
            self.router
                .handle_frame(self.at(secs), b, Frame::Ping(secs));
        }
        self.actions();
    }

    /// Sends and expects the balancer's own answer; returns (egress, status, message).
    fn answered(&mut self, secs: u64, from: Peer, msg: &str) -> (Egress, u16, SipMessage) {
        let actions = self.send(secs, from, msg);
        let reply = actions
            .into_iter()
            .find_map(|a| match a {
                Action::ToPeer { egress, message } => Some((egress, message)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no answer to:\n{msg}"));
        let parsed = SipMessage::parse(reply.1).unwrap();
        (reply.0, parsed.status().unwrap(), parsed)
    }

    /// A message from a backend to a peer; returns the actions.
    fn backend_sends(
        &mut self,
        secs: u64,
        backend: BackendId,
        connection: Option<u64>,
        transport: Transport,
        next_hop: &str,
        msg: &str,
    ) -> Vec<Action> {
        let frame = Frame::SipFromBackend(SipFromBackend {
            connection,
            transport,
            next_hop: addr(next_hop),
            message: Bytes::copy_from_slice(msg.as_bytes()),
        });
        self.router.handle_frame(self.at(secs), backend, frame);
        self.actions()
    }
}

fn invite(call_id: &str, branch: &str) -> String {
    format!(
        "INVITE sip:ivr@lb.example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP proxy.example.com:5060;branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@lb.example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.50>\r\nContent-Length: 0\r\n\r\n"
    )
}

fn cancel(call_id: &str, branch: &str) -> String {
    invite(call_id, branch)
        .replace("INVITE sip", "CANCEL sip")
        .replace("1 INVITE", "1 CANCEL")
}

/// An in-dialog request whose Request-URI is the backend's Contact with the tag.
fn bye(call_id: &str, tag: &str) -> String {
    format!(
        "BYE sip:ivr@192.0.2.1:5060;vd={tag} SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.60:5060;branch=z9hG4bKbye1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@lb.example.com>;tag=b7\r\n\
         Call-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
}

fn response(status: &str, call_id: &str, via_branch: &str) -> String {
    format!(
        "SIP/2.0 {status}\r\nVia: SIP/2.0/UDP proxy.example.com:5060;branch={via_branch};received=192.0.2.9;rport=5060\r\n\
         From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@lb.example.com>;tag=b7\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
}

fn tag_of(frame: &SipToBackend) -> String {
    let msg = SipMessage::parse(frame.message.clone()).unwrap();
    String::from_utf8(msg.header(TAG_HEADER).expect("tag header").to_vec()).unwrap()
}

#[test]
fn a_new_call_is_selected_tagged_and_its_via_records_the_source() {
    let mut lab = lab(&[1, 2, 3]);
    let (b, frame) = lab.routed(0, udp_from("192.0.2.9:5070"), &invite("call-1", "z9hG4bK1"));
    let tag = tag_of(&frame);
    assert_eq!(
        lab.keys.verify(tag.as_bytes(), b"call-1").unwrap().backend,
        b
    );
    let msg = SipMessage::parse(frame.message.clone()).unwrap();
    let via = msg.top_via().unwrap();
    assert_eq!(via.received, Some(&b"192.0.2.9"[..]));
    assert_eq!(via.rport, Some(Some(5070)));
    assert_eq!(
        (frame.connection, frame.transport, frame.peer),
        (UDP_SOCKET, Transport::Udp, addr("192.0.2.9:5070"))
    );
    assert!(!frame.failover);
    assert_eq!(lab.router.counters().routed_by_selection, 1);
    assert_eq!(lab.router.new_call_entries(), 1);
}

#[test]
fn retransmissions_cancel_and_a_challenge_retry_reach_the_same_backend() {
    let mut lab = lab(&[1, 2, 3]);
    let from = udp_from("192.0.2.9:5060");
    let (first, _) = lab.routed(0, from, &invite("call-r", "z9hG4bK1"));
    for _ in 0..5 {
        // Without the table, round robin would move each one on.
        assert_eq!(lab.routed(1, from, &invite("call-r", "z9hG4bK1")).0, first);
    }
    assert_eq!(lab.routed(2, from, &cancel("call-r", "z9hG4bK1")).0, first);
    // 401 then a new INVITE (new branch, CSeq 2) with the same Call-ID.
    lab.backend_sends(
        3,
        first,
        Some(UDP_SOCKET),
        Transport::Udp,
        "192.0.2.9:5060",
        &response("401 Unauthorized", "call-r", "z9hG4bK1"),
    );
    let retry = invite("call-r", "z9hG4bK2").replace("CSeq: 1", "CSeq: 2");
    assert_eq!(lab.routed(4, from, &retry).0, first);
    assert_eq!(lab.router.counters().routed_by_table, 7);
}

#[test]
fn cancel_after_40_s_of_ringing_reaches_the_same_backend() {
    let mut lab = lab(&[1, 2, 3]);
    let from = udp_from("192.0.2.9:5060");
    let (b, _) = lab.routed(0, from, &invite("ringing", "z9hG4bK1"));
    for secs in [0, 20, 40] {
        lab.backend_sends(
            secs,
            b,
            Some(UDP_SOCKET),
            Transport::Udp,
            "192.0.2.9:5060",
            &response("180 Ringing", "ringing", "z9hG4bK1"),
        );
        lab.router.handle_timeout(lab.at(secs));
    }
    // 60 s after the INVITE, 20 s after the last 180.
    assert_eq!(lab.routed(60, from, &cancel("ringing", "z9hG4bK1")).0, b);
}

#[test]
fn after_the_linger_a_retransmitted_invite_is_a_new_call() {
    let mut lab = lab(&[1, 2, 3]);
    let from = udp_from("192.0.2.9:5060");
    let (b, _) = lab.routed(0, from, &invite("late", "z9hG4bK1"));
    lab.backend_sends(
        1,
        b,
        Some(UDP_SOCKET),
        Transport::Udp,
        "192.0.2.9:5060",
        &response("486 Busy Here", "late", "z9hG4bK1"),
    );
    // Within the linger (final at 1 s, + 32 s): the ACK reaches the backend.
    let ack = invite("late", "z9hG4bK1")
        .replace("INVITE sip", "ACK sip")
        .replace("1 INVITE", "1 ACK");
    assert_eq!(lab.routed(32, from, &ack).0, b);
    lab.heartbeat(33, &[1, 2, 3]);
    lab.router.handle_timeout(lab.at(33));
    assert_eq!(lab.router.new_call_entries(), 0);
    assert_eq!(lab.router.counters().new_call_expired, 1);
    let selections = lab.router.counters().routed_by_selection;
    lab.routed(34, from, &invite("late", "z9hG4bK1"));
    assert_eq!(
        lab.router.counters().routed_by_selection,
        selections + 1,
        "routed as a new call"
    );
    // And an ACK that matches nothing is dropped, not answered.
    let actions = lab.send(200, from, &ack);
    assert!(
        actions
            .iter()
            .all(|a| matches!(a, Action::Event(Event::Dropped { .. }))),
        "{actions:?}"
    );
}

#[test]
fn in_dialog_requests_route_by_tag_alone_even_after_a_restart() {
    let tag = TagKeys::new(SECRET).mint(2, b"dialog-1");
    let tag = std::str::from_utf8(&tag).unwrap().to_owned();
    // A fresh router (a restarted balancer): no table entry, no memory.
    let mut lab = lab(&[1, 2, 3]);
    for i in 0..10 {
        let (b, frame) = lab.routed(i, tcp_from(7, "192.0.2.60:5060"), &bye("dialog-1", &tag));
        assert_eq!(b, 2);
        assert!(SipMessage::parse(frame.message)
            .unwrap()
            .header(TAG_HEADER)
            .is_none());
    }
    assert_eq!(lab.router.counters().routed_by_tag, 10);
    assert_eq!(
        lab.router.new_call_entries(),
        0,
        "established calls cost no state"
    );
}

#[test]
fn the_tag_may_come_in_the_top_route() {
    let tag = TagKeys::new(SECRET).mint(3, b"rr-call");
    let tag = std::str::from_utf8(&tag).unwrap();
    let msg = bye("rr-call", "x").replace(";vd=x", "").replace(
        "Max-Forwards",
        &format!("Route: <sip:192.0.2.1:5060;lr;vd={tag}>\r\nMax-Forwards"),
    );
    assert_eq!(
        lab(&[1, 2, 3])
            .routed(0, tcp_from(7, "192.0.2.60:5060"), &msg)
            .0,
        3
    );
}

#[test]
fn forged_and_foreign_tags_are_counted_and_handled_by_policy() {
    let other_call = TagKeys::new(SECRET).mint(2, b"another-call");
    let foreign = TagKeys::new(b"another cluster").mint(2, b"dialog-1");
    for bad in [&other_call[..], &foreign[..], b"0002000000000000f"] {
        let bad = std::str::from_utf8(bad).unwrap();
        let mut lenient = lab(&[1, 2, 3]);
        let (_, frame) = lenient.routed(0, tcp_from(7, "192.0.2.60:5060"), &bye("dialog-1", bad));
        assert_eq!(lenient.router.counters().bad_tags, 1);
        assert_eq!(
            lenient.router.counters().routed_by_hash,
            1,
            "untagged in-dialog: stateless hash"
        );
        assert!(!frame.failover);

        let config = RouterConfig {
            bad_tag_policy: BadTagPolicy::Reject,
            ..RouterConfig::default()
        };
        let mut strict = lab_with(config, &[1, 2, 3]);
        let (egress, status, _) =
            strict.answered(0, tcp_from(7, "192.0.2.60:5060"), &bye("dialog-1", bad));
        assert_eq!((egress, status), (Egress::Stream(7), 403));
    }
}

#[test]
fn a_tag_for_an_unknown_backend_is_rejected_by_policy() {
    let tag = TagKeys::new(SECRET).mint(99, b"dialog-1");
    let config = RouterConfig {
        bad_tag_policy: BadTagPolicy::Reject,
        ..RouterConfig::default()
    };
    let mut lab = lab_with(config, &[1, 2]);
    let (_, status, _) = lab.answered(
        0,
        tcp_from(7, "192.0.2.60:5060"),
        &bye("dialog-1", std::str::from_utf8(&tag).unwrap()),
    );
    assert_eq!(status, 404);
    assert_eq!(lab.router.counters().unknown_backend_tags, 1);
}

#[test]
fn viaduct_headers_from_outside_are_stripped() {
    let mut lab = lab(&[1, 2, 3]);
    let forged = TagKeys::new(SECRET).mint(3, b"strip");
    let msg = invite("strip", "z9hG4bK1").replace(
        "Max-Forwards",
        &format!(
            "X-Viaduct-Backend: {}\r\nx-viaduct-failover: yes\r\nMax-Forwards",
            std::str::from_utf8(&forged).unwrap()
        ),
    );
    let (b, frame) = lab.routed(0, udp_from("192.0.2.9:5060"), &msg);
    let out = SipMessage::parse(frame.message).unwrap();
    assert_eq!(
        out.headers(TAG_HEADER).count(),
        1,
        "only the balancer's own tag"
    );
    assert_eq!(
        lab.keys
            .verify(out.header(TAG_HEADER).unwrap(), b"strip")
            .unwrap()
            .backend,
        b
    );
    assert!(out.header("X-Viaduct-Failover").is_none());
    assert_eq!(lab.router.counters().own_headers_stripped, 2);
}

#[test]
fn max_forwards_zero_gets_483() {
    let mut lab = lab(&[1]);
    let msg = invite("mf", "z9hG4bK1").replace("Max-Forwards: 70", "Max-Forwards: 0");
    let (egress, status, _) = lab.answered(0, udp_from("192.0.2.9:5062"), &msg);
    assert_eq!(status, 483);
    // rport was asked: the answer goes to the source port.
    assert_eq!(
        egress,
        Egress::Datagram {
            socket: UDP_SOCKET,
            to: addr("192.0.2.9:5062")
        }
    );
}

#[test]
fn bad_requests_get_400_naming_the_fault_and_bad_responses_are_dropped() {
    let mut lab = lab(&[1]);
    let no_call_id = invite("x", "z9hG4bK1").replace("Call-ID: x\r\n", "");
    let (_, status, msg) = lab.answered(0, udp_from("192.0.2.9:5060"), &no_call_id);
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(msg.header("Warning").unwrap()).contains("missing Call-ID"));

    let two_call_ids = invite("x", "z9hG4bK1").replace("Call-ID: x\r\n", "Call-ID: x\r\ni: y\r\n");
    let (_, status, msg) = lab.answered(0, udp_from("192.0.2.9:5060"), &two_call_ids);
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(msg.header("Warning").unwrap()).contains("Call-ID"));

    let mismatch = invite("x", "z9hG4bK1").replace("1 INVITE", "1 OPTIONS");
    assert_eq!(
        lab.answered(0, udp_from("192.0.2.9:5060"), &mismatch).1,
        400
    );

    let bad_response = "SIP/2.0 4294967301 Huge\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n";
    let actions = lab.send(0, udp_from("192.0.2.9:5060"), bad_response);
    assert!(
        matches!(&actions[..], [Action::Event(Event::Dropped { .. })]),
        "{actions:?}"
    );
    assert_eq!(lab.router.counters().dropped_responses, 1);
    assert_eq!(lab.router.counters().rejected_400, 3);
}

#[test]
fn oversized_messages_get_413_on_streams_and_513_on_udp() {
    let mut lab = lab(&[1]);
    let head = invite("big", "z9hG4bK1");
    lab.router
        .handle_oversized(tcp_from(4, "192.0.2.60:5060"), head.as_bytes());
    let out = lab.actions();
    let Action::ToPeer { egress, message } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(*egress, Egress::Stream(4));
    assert!(message.starts_with(b"SIP/2.0 413 "));
    lab.router
        .handle_oversized(udp_from("192.0.2.9:5060"), head.as_bytes());
    let out = lab.actions();
    let Action::ToPeer { message, .. } = &out[0] else {
        panic!("{out:?}")
    };
    assert!(message.starts_with(b"SIP/2.0 513 "));
    assert_eq!(lab.router.counters().rejected_too_large, 2);
}

#[test]
fn cancel_for_nothing_gets_481_and_no_backend_gets_503() {
    let mut lab = lab(&[1]);
    assert_eq!(
        lab.answered(
            0,
            udp_from("192.0.2.9:5060"),
            &cancel("nothing", "z9hG4bK1")
        )
        .1,
        481
    );
    let mut empty = lab_with(
        RouterConfig {
            retry_after_secs: 7,
            ..RouterConfig::default()
        },
        &[],
    );
    let (_, status, msg) = empty.answered(0, udp_from("192.0.2.9:5060"), &invite("c", "z9hG4bK1"));
    assert_eq!(status, 503);
    assert_eq!(msg.header("Retry-After"), Some(&b"7"[..]));
}

#[test]
fn response_path_prefers_the_named_connection_then_any_then_a_new_one() {
    let mut lab = lab(&[1]);
    let proxy_a = "192.0.2.70:40001";
    lab.router
        .conn_opened(10, Transport::Tcp, addr(proxy_a), addr(LB));
    lab.router
        .conn_opened(11, Transport::Tcp, addr(proxy_a), addr(LB));
    lab.router
        .conn_opened(12, Transport::Tcp, addr("192.0.2.71:40001"), addr(LB));
    let ok = response("200 OK", "c", "z9hG4bK1");
    let egress = |actions: Vec<Action>| match &actions[..] {
        [Action::ToPeer { egress, .. }] => *egress,
        other => panic!("{other:?}"),
    };
    // The named connection, open and leading to the next hop.
    assert_eq!(
        egress(lab.backend_sends(0, 1, Some(10), Transport::Tcp, proxy_a, &ok)),
        Egress::Stream(10)
    );
    // The named connection comes from proxy A's host but another port (an
    // ephemeral source port; the agent resolved the Via's sent-by port):
    // RFC 3261 §18.2.2, the response takes the connection it came on.
    lab.router
        .conn_opened(13, Transport::Tcp, addr("192.0.2.70:51234"), addr(LB));
    assert_eq!(
        egress(lab.backend_sends(0, 1, Some(13), Transport::Tcp, "192.0.2.70:5060", &ok)),
        Egress::Stream(13)
    );
    lab.router.conn_closed(13);
    // Named connection 12 leads to another host: never sent there; another to proxy A.
    assert_eq!(
        egress(lab.backend_sends(0, 1, Some(12), Transport::Tcp, proxy_a, &ok)),
        Egress::Stream(11)
    );
    // Both of proxy A's connections closed: a new connection to it.
    lab.router.conn_closed(10);
    lab.router.conn_closed(11);
    assert_eq!(
        egress(lab.backend_sends(0, 1, Some(10), Transport::Tcp, proxy_a, &ok)),
        Egress::Connect {
            transport: Transport::Tcp,
            to: addr(proxy_a)
        }
    );
    // UDP: a datagram from our socket to exactly the next hop.
    assert_eq!(
        egress(lab.backend_sends(
            0,
            1,
            Some(UDP_SOCKET),
            Transport::Udp,
            "192.0.2.9:5066",
            &ok
        )),
        Egress::Datagram {
            socket: UDP_SOCKET,
            to: addr("192.0.2.9:5066")
        }
    );
    assert_eq!(lab.router.counters().from_backends, 5);
}

#[test]
fn a_message_is_never_sent_back_to_the_balancer_itself() {
    let mut lab = lab(&[1]);
    let actions = lab.backend_sends(
        0,
        1,
        None,
        Transport::Udp,
        LB,
        &response("200 OK", "c", "z9hG4bK1"),
    );
    assert!(
        matches!(&actions[..], [Action::Event(Event::Dropped { .. })]),
        "{actions:?}"
    );
    assert_eq!(lab.router.counters().dropped_from_backends, 1);
}

#[test]
fn responses_to_backend_requests_follow_the_via_branch_tag() {
    let mut lab = lab(&[1, 2, 3]);
    let tag = TagKeys::new(SECRET).mint(3, b"outbound-1");
    let branch = format!("z9hG4bK-vd{}-x1", std::str::from_utf8(&tag).unwrap());
    let (b, _) = lab.routed(
        0,
        udp_from("192.0.2.9:5060"),
        &response("200 OK", "outbound-1", &branch),
    );
    assert_eq!(b, 3);
    // Another call's tag, or none: dropped.
    for branch in [branch.clone(), "z9hG4bKplain".to_owned()] {
        let actions = lab.send(
            0,
            udp_from("192.0.2.9:5060"),
            &response("200 OK", "outbound-2", &branch),
        );
        assert!(
            matches!(&actions[..], [Action::Event(Event::Dropped { .. })]),
            "{actions:?}"
        );
    }
    assert_eq!(lab.router.counters().dropped_responses, 2);
}

#[test]
fn a_silent_backend_is_down_after_three_periods_and_its_calls_fail_over() {
    let mut lab = lab(&[1, 2, 3]);
    let tag = TagKeys::new(SECRET).mint(2, b"fo-call");
    let tag = std::str::from_utf8(&tag).unwrap().to_owned();
    let t = |ms: u64| lab.t0 + Duration::from_millis(ms);
    // Backends 1 and 3 keep reporting; 2 falls silent.
    for (i, ms) in (500..=1500).step_by(500).enumerate() {
        for b in [1, 3] {
            let report = LoadReport {
                seq: i as u64 + 1,
                ..LoadReport::default()
            };
            lab.router.handle_frame(t(ms), b, Frame::Load(report));
        }
    }
    lab.router.handle_timeout(t(1499));
    assert!(lab.router.is_up(2));
    assert_eq!(lab.router.poll_timeout(), Some(t(1500)));
    lab.router.handle_timeout(t(1500));
    assert!(!lab.router.is_up(2));
    let events = lab.actions();
    assert!(events.contains(&Action::Event(Event::BackendDown {
        backend: 2,
        reason: "missed load reports"
    })));

    let (b, frame) = lab.routed(2, tcp_from(7, "192.0.2.60:5060"), &bye("fo-call", &tag));
    assert!(b == 1 || b == 3);
    assert!(frame.failover);
    let msg = SipMessage::parse(frame.message).unwrap();
    assert_eq!(msg.header("X-Viaduct-Failover"), Some(tag.as_bytes()));
    assert_eq!(
        lab.keys
            .verify(msg.header(TAG_HEADER).unwrap(), b"fo-call")
            .unwrap()
            .backend,
        b
    );
    // Every replica, and every later message, picks the same backup.
    assert_eq!(
        lab.routed(3, tcp_from(7, "192.0.2.60:5060"), &bye("fo-call", &tag))
            .0,
        b
    );

    // It reports again: up, and its calls come home.
    lab.router.handle_frame(
        lab.at(4),
        2,
        Frame::Load(LoadReport {
            seq: 9,
            ..LoadReport::default()
        }),
    );
    assert_eq!(
        lab.routed(4, tcp_from(7, "192.0.2.60:5060"), &bye("fo-call", &tag))
            .0,
        2
    );
}

#[test]
fn with_every_backend_down_a_tagged_request_gets_503() {
    let mut lab = lab(&[2]);
    lab.router.backend_down(2, "link closed");
    let tag = TagKeys::new(SECRET).mint(2, b"c");
    let (_, status, _) = lab.answered(
        0,
        tcp_from(7, "192.0.2.60:5060"),
        &bye("c", std::str::from_utf8(&tag).unwrap()),
    );
    assert_eq!(status, 503);
}

#[test]
fn draining_backends_take_no_new_calls_but_keep_their_dialogs() {
    let mut lab = lab(&[1, 2]);
    lab.router
        .handle_frame(lab.at(0), 2, Frame::Drain(DrainState::Draining));
    for i in 0..6 {
        assert_eq!(
            lab.routed(
                0,
                udp_from("192.0.2.9:5060"),
                &invite(&format!("d{i}"), "z9hG4bK1")
            )
            .0,
            1
        );
    }
    let tag = TagKeys::new(SECRET).mint(2, b"old");
    assert_eq!(
        lab.routed(
            0,
            tcp_from(7, "192.0.2.60:5060"),
            &bye("old", std::str::from_utf8(&tag).unwrap())
        )
        .0,
        2
    );
}

#[test]
fn when_the_table_is_full_repeats_still_agree_through_the_hash() {
    let config = RouterConfig {
        new_call_capacity: 2,
        ..RouterConfig::default()
    };
    let mut lab = lab_with(config, &[1, 2, 3]);
    let from = udp_from("192.0.2.9:5060");
    lab.routed(0, from, &invite("a", "z9hG4bK1"));
    lab.routed(0, from, &invite("b", "z9hG4bK1"));
    let (first, _) = lab.routed(0, from, &invite("c", "z9hG4bK1"));
    assert_eq!(lab.router.new_call_entries(), 2, "bounded");
    assert_eq!(lab.router.counters().table_full_fallbacks, 1);
    for _ in 0..5 {
        assert_eq!(lab.routed(1, from, &invite("c", "z9hG4bK1")).0, first);
    }
}

#[test]
fn stale_reports_are_ignored_and_pings_answered() {
    let mut lab = lab(&[1]);
    lab.router.handle_frame(
        lab.at(0),
        1,
        Frame::Load(LoadReport {
            seq: 5,
            active_calls: 10,
            ..LoadReport::default()
        }),
    );
    lab.router.handle_frame(
        lab.at(0),
        1,
        Frame::Load(LoadReport {
            seq: 4,
            active_calls: 99,
            ..LoadReport::default()
        }),
    );
    lab.router.handle_frame(
        lab.at(0),
        1,
        Frame::Load(LoadReport {
            seq: 5,
            active_calls: 99,
            ..LoadReport::default()
        }),
    );
    assert_eq!(lab.router.counters().stale_reports, 2);
    lab.router.handle_frame(lab.at(0), 1, Frame::Ping(42));
    assert_eq!(
        lab.actions(),
        vec![Action::ToBackend {
            backend: 1,
            frame: Frame::Pong(42)
        }]
    );
}

#[test]
fn a_handshake_frame_after_the_handshake_closes_the_link() {
    let mut lab = lab(&[1]);
    lab.router.handle_frame(lab.at(0), 1, Frame::Auth([0; 32]));
    let actions = lab.actions();
    let closed = actions.iter().find_map(|a| match a {
        Action::CloseBackend {
            backend: 1,
            frame: Some(Frame::Error(c)),
        } => Some(c.clone()),
        _ => None,
    });
    let close = closed.unwrap_or_else(|| panic!("{actions:?}"));
    assert_eq!(close.code, Code::UNEXPECTED_FRAME);
    assert!(close.reason.contains("AUTH"));
    assert!(!lab.router.is_up(1));
}

/// What the router does with each RFC 4475 invalid message arriving over
/// UDP (conformance/corpus/rfc4475/README.md gives the RFC's expectation).
/// `None`: the datagram does not even frame (it never reaches the router).
const RFC4475_INVALID: &[(&str, Option<Outcome>)] = &[
    ("badaspec", Some(Outcome::Answer(400))),
    ("baddate", Some(Outcome::Forwarded)), // a Date the balancer never reads
    ("baddn", None),                       // no empty line ends its headers
    ("badinv01", Some(Outcome::Answer(400))),
    ("badvers", Some(Outcome::Answer(505))),
    ("bigcode", Some(Outcome::Dropped)), // a response: dropped
    ("clerr", None),                     // Content-Length beyond the datagram
    ("escruri", Some(Outcome::Answer(400))),
    ("insuf", Some(Outcome::Answer(400))),
    ("ltgtruri", Some(Outcome::Answer(400))),
    ("lwsruri", Some(Outcome::Answer(400))),
    ("lwsstart", Some(Outcome::Answer(400))),
    ("mcl01", None), // two Content-Length values
    ("mismatch01", Some(Outcome::Answer(400))),
    ("mismatch02", Some(Outcome::Answer(400))),
    ("multi01", Some(Outcome::Answer(400))),
    ("ncl", None), // negative Content-Length
    ("quotbal", Some(Outcome::Answer(400))),
    ("regbadct", Some(Outcome::Answer(400))),
    ("scalar02", Some(Outcome::Answer(400))),
    ("scalarlg", Some(Outcome::Dropped)), // a response: dropped
    ("trws", Some(Outcome::Answer(400))),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answer(u16),
    Dropped,
    Forwarded,
}

#[test]
fn rfc4475_invalid_messages_get_the_expected_answer() {
    use encap_proto::sip::{frame_datagram, Framed, Limits};
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/corpus/rfc4475/invalid"
    );
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let listed: Vec<&str> = RFC4475_INVALID.iter().map(|(f, _)| *f).collect();
    assert_eq!(files, listed, "every invalid message has an expectation");
    for (file, expected) in RFC4475_INVALID {
        let bytes = Bytes::from(std::fs::read(format!("{dir}/{file}.sip")).unwrap());
        let framed = frame_datagram(bytes, &Limits::default());
        let Some(expected) = expected else {
            assert!(framed.is_err(), "{file} frames, expected a framing error");
            continue;
        };
        let Ok(Framed::Message(message)) = framed else {
            panic!("{file} does not frame: {framed:?}")
        };
        let mut lab = lab(&[1]);
        lab.router
            .handle_sip(lab.at(0), 0, udp_from("192.0.2.9:5060"), message);
        let actions = lab.actions();
        let got = actions
            .iter()
            .find_map(|a| match a {
                // The answer copies the request's Via, malformed or not: read
                // the status from the start line only.
                Action::ToPeer { message, .. } => Some(Outcome::Answer(
                    std::str::from_utf8(&message[8..11])
                        .unwrap()
                        .parse()
                        .unwrap(),
                )),
                Action::ToBackend { .. } => Some(Outcome::Forwarded),
                _ => None,
            })
            .unwrap_or(Outcome::Dropped);
        assert_eq!(got, *expected, "{file}: {actions:?}");
    }
}
