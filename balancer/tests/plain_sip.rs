//! Plain SIP backends (design.md §7): the router as a stateless proxy, fed
//! messages and time, no sockets. Forwarded messages are snapshotted after
//! normalisation (branches and tags redacted: they change only when the
//! Call-ID or the keys do).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests: a failed unwrap fails the test; they pick the origin of time

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::config::Config;
use balancer::core::router::{Action, BackendId, Egress, Event, Peer, Router};
use bytes::Bytes;
use encap_proto::frame::Transport;
use encap_proto::sip::SipMessage;
use encap_proto::tag::TagKeys;

const SECRET: &[u8] = b"plain secret";
const UDP_SOCKET: u64 = 1;
const LB: &str = "192.0.2.1:5060";
const CLIENT: &str = "198.51.100.7:5070";
const B1: &str = "10.0.0.1:5060";
const B2: &str = "10.0.0.2:5060";
const B3: &str = "10.0.0.3:5080";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn config(extra: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        [routing]
        default_pool = "plain"
        [[pools]]
        name = "plain"
        mode = "sip"
        policy = "weighted-round-robin"
        probe_interval_ms = 1000
        probe_accept = [200, 404]
        members = [
            {{ address = "{B1}", name = "b1" }},
            {{ address = "{B2}", name = "b2" }},
            {{ address = "{B3}", transport = "tcp", name = "b3" }},
        ]
        {extra}
        "#
    ))
    .unwrap()
}

struct Lab {
    router: Router,
    t0: Instant,
}

fn id(name: &str) -> BackendId {
    balancer::config::hashed_backend_id(name)
}

/// A router with its sockets reported, not started.
fn fresh(config: &Config) -> Lab {
    let t0 = Instant::now();
    let mut router = Router::new(config.router_config((1, 2)).unwrap(), TagKeys::new(SECRET));
    router.socket_opened(UDP_SOCKET, Transport::Udp, addr(LB));
    router.advertise(Transport::Udp, addr(LB), addr(LB));
    router.listener_opened(addr(LB));
    router.advertise(Transport::Tcp, addr(LB), addr(LB));
    Lab { router, t0 }
}

/// Started at t0 (its first probes sent and forgotten).
fn lab_with(config: &Config) -> Lab {
    let mut lab = fresh(config);
    lab.router.start(lab.t0);
    lab.actions();
    lab
}

fn lab() -> Lab {
    lab_with(&config(""))
}

fn udp(remote: &str) -> Peer {
    Peer {
        conn: UDP_SOCKET,
        transport: Transport::Udp,
        remote: addr(remote),
        local: addr(LB),
    }
}

fn tcp(conn: u64, remote: &str) -> Peer {
    Peer {
        conn,
        transport: Transport::Tcp,
        remote: addr(remote),
        local: addr(LB),
    }
}

const INVITE: &str = "INVITE sip:svc@192.0.2.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bK-client-1;rport\r\n\
From: <sip:alice@198.51.100.7>;tag=a1\r\n\
To: <sip:svc@192.0.2.1>\r\n\
Call-ID: call-1@client\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@198.51.100.7:5070>\r\n\
Max-Forwards: 70\r\n\
X-Viaduct-Backend: 0001000000000000f\r\n\
Content-Length: 0\r\n\r\n";

fn with_call_id(msg: &str, call_id: &str) -> String {
    msg.replace("call-1@client", call_id)
}

/// Branches, tags, connection ids redacted; CRLF shown as lines.
fn normalise(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message).replace("\r\n", "\n");
    let branch = regex::Regex::new(r"z9hG4bK-vp[0-9a-f]+").unwrap();
    let tag = regex::Regex::new(r"vd=[0-9a-f]{17}").unwrap();
    let text = branch.replace_all(&text, "z9hG4bK-vp<BRANCH>");
    tag.replace_all(&text, "vd=<TAG>").into_owned()
}

impl Lab {
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.router.poll_action()).collect()
    }

    fn send(&mut self, ms: u64, from: Peer, msg: &str) -> Vec<Action> {
        self.router
            .handle_sip(self.at(ms), 0, from, Bytes::copy_from_slice(msg.as_bytes()));
        self.actions()
    }

    /// Sends and expects exactly one message out; returns where and what.
    fn out(&mut self, ms: u64, from: Peer, msg: &str) -> (Egress, SipMessage) {
        let actions = self.send(ms, from, msg);
        let mut sent: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::ToPeer { egress, message } => Some((*egress, message.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(sent.len(), 1, "{actions:?}");
        let (egress, message) = sent.remove(0);
        (egress, SipMessage::parse(message).unwrap())
    }

    fn timeout(&mut self, ms: u64) -> Vec<Action> {
        self.router.handle_timeout(self.at(ms));
        self.actions()
    }
}

/// Where a message went: the member address (UDP datagram or TCP connect).
fn dest(egress: Egress) -> SocketAddr {
    match egress {
        Egress::Datagram { to, .. } | Egress::Connect { to, .. } => to,
        Egress::Stream(id) => panic!("stream {id}"),
    }
}

fn top_branch(m: &SipMessage) -> String {
    String::from_utf8(m.top_via().unwrap().branch.unwrap().to_vec()).unwrap()
}

/// A response from the backend to a forwarded request.
fn answer(forwarded: &SipMessage, status: &str, to_tag: bool) -> String {
    let text = String::from_utf8_lossy(forwarded.bytes()).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let mut out = format!("SIP/2.0 {status}\r\n");
    for line in head.lines().skip(1) {
        let name = line.split(':').next().unwrap().to_ascii_lowercase();
        if ["via", "record-route", "from", "call-id", "cseq"].contains(&name.as_str()) {
            out.push_str(line);
            out.push_str("\r\n");
        } else if name == "to" {
            out.push_str(line);
            if to_tag {
                out.push_str(";tag=uas1");
            }
            out.push_str("\r\n");
        }
    }
    if status.starts_with("200") {
        out.push_str("Contact: <sip:uas@BACKEND>\r\n");
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

#[test]
fn initial_invite_gets_our_via_record_route_and_one_hop_less() {
    let mut lab = lab();
    let (egress, fwd) = lab.out(0, udp(CLIENT), INVITE);
    assert!(matches!(
        egress,
        Egress::Datagram {
            socket: UDP_SOCKET,
            ..
        } | Egress::Connect { .. }
    ));
    insta::assert_snapshot!(normalise(fwd.bytes()), @r"
    INVITE sip:svc@192.0.2.1:5060 SIP/2.0
    Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-vp<BRANCH>;vdc=1
    Record-Route: <sip:192.0.2.1:5060;lr;vd=<TAG>>
    Max-Forwards: 69
    Via: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bK-client-1;rport=5070;received=198.51.100.7
    From: <sip:alice@198.51.100.7>;tag=a1
    To: <sip:svc@192.0.2.1>
    Call-ID: call-1@client
    CSeq: 1 INVITE
    Contact: <sip:alice@198.51.100.7:5070>
    Content-Length: 0
    ");
    // The tag in the branch and in the Record-Route name the chosen member
    // for this Call-ID.
    let keys = TagKeys::new(SECRET);
    let branch = top_branch(&fwd);
    let tag = &branch.as_bytes()[10..27];
    let t = keys.verify(tag, b"call-1@client").unwrap();
    let member = [("b1", B1), ("b2", B2), ("b3", B3)]
        .into_iter()
        .find(|(n, _)| id(n) == t.backend)
        .unwrap();
    assert_eq!(dest(egress), addr(member.1));
}

#[test]
fn tcp_in_udp_out_records_both_sides_and_no_max_forwards_means_70() {
    let mut lab = lab();
    lab.router
        .conn_opened(40, Transport::Tcp, addr(CLIENT), addr(LB));
    // Round robin: find a call that goes to a UDP member.
    for n in 0..6 {
        let msg = with_call_id(INVITE, &format!("c{n}"))
            .replace(
                "SIP/2.0/UDP 198.51.100.7:5070",
                "SIP/2.0/TCP 198.51.100.7:5070",
            )
            .replace("Max-Forwards: 70\r\n", "");
        let (egress, fwd) = lab.out(0, tcp(40, CLIENT), &msg);
        if let Egress::Datagram { .. } = egress {
            insta::assert_snapshot!(normalise(fwd.bytes()).replace(&format!("c{n}"), "CALL"), @r"
            INVITE sip:svc@192.0.2.1:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-vp<BRANCH>;vdc=40
            Record-Route: <sip:192.0.2.1:5060;lr;vd=<TAG>>
            Record-Route: <sip:192.0.2.1:5060;transport=tcp;lr;vd=<TAG>>
            Max-Forwards: 70
            Via: SIP/2.0/TCP 198.51.100.7:5070;branch=z9hG4bK-client-1;rport=5070;received=198.51.100.7
            From: <sip:alice@198.51.100.7>;tag=a1
            To: <sip:svc@192.0.2.1>
            Call-ID: CALL
            CSeq: 1 INVITE
            Contact: <sip:alice@198.51.100.7:5070>
            Content-Length: 0
            ");
            return;
        }
    }
    panic!("no call went to a UDP member");
}

#[test]
fn retransmissions_cancel_and_non_2xx_ack_keep_the_branch_and_backend() {
    let mut lab = lab();
    let (e1, first) = lab.out(0, udp(CLIENT), INVITE);
    let (e2, again) = lab.out(500, udp(CLIENT), INVITE);
    assert_eq!(dest(e1), dest(e2));
    assert_eq!(
        first.bytes(),
        again.bytes(),
        "a retransmission is forwarded identically"
    );
    let cancel = INVITE
        .replace("INVITE sip", "CANCEL sip")
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    let (e3, c) = lab.out(600, udp(CLIENT), &cancel);
    assert_eq!(dest(e3), dest(e1));
    assert_eq!(top_branch(&c), top_branch(&first));
    assert!(
        c.header("Record-Route").is_none(),
        "CANCEL is not record-routed"
    );
    let ack = INVITE
        .replace("INVITE sip", "ACK sip")
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK")
        .replace(
            "To: <sip:svc@192.0.2.1>",
            "To: <sip:svc@192.0.2.1>;tag=uas1",
        );
    let (e4, a) = lab.out(700, udp(CLIENT), &ack);
    assert_eq!(dest(e4), dest(e1));
    assert_eq!(top_branch(&a), top_branch(&first));
    // Another transaction of the call (a new client branch): another branch.
    let reinvite = INVITE.replace("z9hG4bK-client-1", "z9hG4bK-client-2");
    let (e5, r) = lab.out(800, udp(CLIENT), &reinvite);
    assert_eq!(dest(e5), dest(e1));
    assert_ne!(top_branch(&r), top_branch(&first));
}

#[test]
fn responses_pop_our_via_and_follow_the_next_one() {
    let mut lab = lab();
    let (egress, fwd) = lab.out(0, udp(CLIENT), INVITE);
    let member = dest(egress);
    let from_member = if member == addr(B3) {
        lab.router
            .conn_opened(77, Transport::Tcp, member, addr("192.0.2.1:40000"));
        tcp(77, B3)
    } else {
        udp(&member.to_string())
    };
    let (to, ringing) = lab.out(10, from_member, &answer(&fwd, "180 Ringing", true));
    // received/rport of the client's Via, from our UDP socket (vdc=1).
    assert_eq!(
        to,
        Egress::Datagram {
            socket: UDP_SOCKET,
            to: addr(CLIENT)
        }
    );
    assert_eq!(ringing.vias().count(), 1);
    assert_eq!(
        ringing.top_via().unwrap().branch,
        Some(&b"z9hG4bK-client-1"[..])
    );
    assert!(ringing.header("Record-Route").is_some());
}

#[test]
fn a_response_over_tcp_goes_back_on_the_inbound_connection() {
    let mut lab = lab();
    let msg = INVITE.replace(
        "SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bK-client-1;rport",
        "SIP/2.0/TCP 198.51.100.7:5070;branch=z9hG4bK-client-1",
    );
    lab.router
        .conn_opened(40, Transport::Tcp, addr("198.51.100.7:40123"), addr(LB));
    let (egress, fwd) = lab.out(0, tcp(40, "198.51.100.7:40123"), &msg);
    let member = dest(egress);
    let from_member = if member == addr(B3) {
        tcp(41, B3)
    } else {
        udp(&member.to_string())
    };
    let (to, ok) = lab.out(10, from_member, &answer(&fwd, "200 OK", true));
    assert_eq!(to, Egress::Stream(40), "not a connect to the sent-by port");
    assert_eq!(ok.vias().count(), 1);
    // The connection closed: a new one to received + sent-by port.
    lab.router.conn_closed(40);
    let (to, _) = lab.out(20, from_member, &answer(&fwd, "200 OK", true));
    assert_eq!(
        to,
        Egress::Connect {
            transport: Transport::Tcp,
            to: addr("198.51.100.7:5070")
        }
    );
}

/// The client's in-dialog request after a 200 with our Record-Route.
fn bye_through(rr: &[&str]) -> String {
    let route: Vec<String> = rr.iter().rev().map(|r| (*r).to_owned()).collect();
    format!(
        "BYE sip:uas@10.0.0.9:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bK-client-bye;rport\r\n\
         Route: {}\r\n\
         From: <sip:alice@198.51.100.7>;tag=a1\r\n\
         To: <sip:svc@192.0.2.1>;tag=uas1\r\n\
         Call-ID: call-1@client\r\n\
         CSeq: 2 BYE\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n",
        route.join(", ")
    )
}

#[test]
fn in_dialog_requests_lose_our_route_and_reach_the_tagged_backend() {
    let mut lab = lab();
    let (egress, fwd) = lab.out(0, udp(CLIENT), INVITE);
    let rr: Vec<String> = fwd
        .headers("Record-Route")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let rr: Vec<&str> = rr.iter().map(String::as_str).collect();
    // Much later: the new-call table has forgotten the call.
    let (e, bye) = lab.out(120_000, udp(CLIENT), &bye_through(&rr));
    assert_eq!(dest(e), dest(egress));
    assert!(bye.header("Route").is_none(), "our Route entry is removed");
    assert!(
        bye.header("Record-Route").is_none(),
        "in-dialog: no Record-Route"
    );
    insta::assert_snapshot!(normalise(bye.bytes()), @r"
    BYE sip:uas@10.0.0.9:5060 SIP/2.0
    Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-vp<BRANCH>;vdc=1
    Max-Forwards: 69
    Via: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bK-client-bye;rport=5070;received=198.51.100.7
    From: <sip:alice@198.51.100.7>;tag=a1
    To: <sip:svc@192.0.2.1>;tag=uas1
    Call-ID: call-1@client
    CSeq: 2 BYE
    Content-Length: 0
    ");
    // Another proxy's entry after ours stays.
    let (_, bye) = lab.out(
        120_001,
        udp(CLIENT),
        &bye_through(&["<sip:203.0.113.5;lr>", rr[0]]),
    );
    assert_eq!(bye.header("Route"), Some(&b"<sip:203.0.113.5;lr>"[..]));
}

#[test]
fn both_record_route_entries_are_removed() {
    let mut lab = lab();
    lab.router
        .conn_opened(40, Transport::Tcp, addr(CLIENT), addr(LB));
    for n in 0..6 {
        let msg = with_call_id(INVITE, &format!("d{n}")).replace(
            "SIP/2.0/UDP 198.51.100.7:5070",
            "SIP/2.0/TCP 198.51.100.7:5070",
        );
        let (egress, fwd) = lab.out(0, tcp(40, CLIENT), &msg);
        let rr: Vec<String> = fwd
            .headers("Record-Route")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if rr.len() != 2 {
            continue;
        }
        let rr: Vec<&str> = rr.iter().map(String::as_str).collect();
        let bye = with_call_id(&bye_through(&rr), &format!("d{n}")).replace(
            "SIP/2.0/UDP 198.51.100.7:5070",
            "SIP/2.0/TCP 198.51.100.7:5070",
        );
        let (e, out) = lab.out(1000, tcp(40, CLIENT), &bye);
        assert_eq!(dest(e), dest(egress));
        assert!(out.header("Route").is_none(), "{}", normalise(out.bytes()));
        return;
    }
    panic!("no call was double record-routed");
}

#[test]
fn a_request_that_comes_back_is_a_loop() {
    let mut lab = lab();
    let (_, fwd) = lab.out(0, udp(CLIENT), INVITE);
    // The backend (or a misconfigured peer) sends it back unchanged.
    let back = String::from_utf8_lossy(fwd.bytes()).into_owned();
    let actions = lab.send(10, udp("203.0.113.9:5060"), &back);
    let status = actions.iter().find_map(|a| match a {
        Action::ToPeer { message, .. } => SipMessage::parse(message.clone()).ok()?.status(),
        _ => None,
    });
    assert_eq!(status, Some(482), "{actions:?}");
}

#[test]
fn requests_from_a_backend_follow_the_route_set_out() {
    let mut lab = lab();
    let keys = TagKeys::new(SECRET);
    let tag = keys.mint(id("b1"), b"call-1@client");
    let tag = std::str::from_utf8(&tag).unwrap();
    let bye = format!(
        "BYE sip:alice@198.51.100.7:5070 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-uas-bye\r\n\
         Route: <sip:192.0.2.1:5060;lr;vd={tag}>\r\n\
         From: <sip:svc@192.0.2.1>;tag=uas1\r\n\
         To: <sip:alice@198.51.100.7>;tag=a1\r\n\
         Call-ID: call-1@client\r\n\
         CSeq: 1 BYE\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    );
    let (e, out) = lab.out(0, udp(B1), &bye);
    assert_eq!(
        e,
        Egress::Datagram {
            socket: UDP_SOCKET,
            to: addr(CLIENT)
        }
    );
    insta::assert_snapshot!(normalise(out.bytes()), @r"
    BYE sip:alice@198.51.100.7:5070 SIP/2.0
    Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-vp<BRANCH>;vdc=1
    Max-Forwards: 69
    Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-uas-bye
    From: <sip:svc@192.0.2.1>;tag=uas1
    To: <sip:alice@198.51.100.7>;tag=a1
    Call-ID: call-1@client
    CSeq: 1 BYE
    Content-Length: 0
    ");
    // The client's 200 goes back to the backend.
    let (e, ok) = lab.out(10, udp(CLIENT), &answer(&out, "200 OK", false));
    assert_eq!(
        e,
        Egress::Datagram {
            socket: UDP_SOCKET,
            to: addr(B1)
        }
    );
    assert_eq!(ok.vias().count(), 1);
}

/// The OPTIONS probes sent at `ms`, by destination.
fn probes(actions: &[Action]) -> Vec<(SocketAddr, SipMessage)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ToPeer { egress, message } if message.starts_with(b"OPTIONS ") => {
                Some((dest(*egress), SipMessage::parse(message.clone()).unwrap()))
            }
            _ => None,
        })
        .collect()
}

fn events(actions: &[Action]) -> Vec<Event> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e @ (Event::BackendUp { .. } | Event::BackendDown { .. })) => {
                Some(e.clone())
            }
            _ => None,
        })
        .collect()
}

fn probe_answer(probe: &SipMessage, status: &str) -> String {
    answer(probe, status, true)
}

#[test]
fn probing_takes_a_silent_member_down_and_an_answering_one_back() {
    let mut lab = fresh(&config(""));
    // The first timeout starts: three members up, three probes out.
    let first = lab.timeout(0);
    assert_eq!(events(&first).len(), 3);
    let sent = probes(&first);
    assert_eq!(sent.len(), 3);
    let (_, p) = sent.iter().find(|(to, _)| *to == addr(B2)).unwrap();
    insta::assert_snapshot!(normalise(p.bytes()).replace(&top_branch(p), "<PROBE>"), @r"
    OPTIONS sip:10.0.0.2:5060 SIP/2.0
    Via: SIP/2.0/UDP 192.0.2.1:5060;branch=<PROBE>
    Max-Forwards: 70
    From: <sip:viaduct@192.0.2.1:5060>;tag=vq4e03
    To: <sip:10.0.0.2:5060>
    Call-ID: <PROBE>@viaduct
    CSeq: 1 OPTIONS
    User-Agent: viaduct
    Content-Length: 0
    ");
    assert_eq!(lab.router.poll_timeout(), Some(lab.at(1000)));
    // b1 and b3 answer every probe (b3 with 404, accepted here); b2 is silent.
    let mut down = Vec::new();
    let mut round = sent;
    for tick in 1..=3u64 {
        for (to, probe) in &round {
            let reply = match *to {
                a if a == addr(B1) => probe_answer(probe, "200 OK"),
                a if a == addr(B3) => probe_answer(probe, "404 Not Found"),
                _ => continue,
            };
            let from = if *to == addr(B3) { tcp(9, B3) } else { udp(B1) };
            assert!(lab.send(tick * 1000 - 500, from, &reply).is_empty());
        }
        let actions = lab.timeout(tick * 1000);
        down.extend(events(&actions));
        round = probes(&actions);
        assert_eq!(round.len(), 3);
    }
    // Three unanswered probes: b2 is down (the third went unanswered at 3 s).
    assert_eq!(
        down,
        [Event::BackendDown {
            backend: id("b2"),
            reason: "OPTIONS probes failed"
        }]
    );
    assert!(!lab.router.is_up(id("b2")));
    // No new call goes to b2.
    for n in 0..30 {
        let (e, _) = lab.out(3100, udp(CLIENT), &with_call_id(INVITE, &format!("n{n}")));
        assert_ne!(dest(e), addr(B2));
    }
    // b2 answers again: up after two answered probes (probe_successes_up).
    let mut up = Vec::new();
    for tick in 4..=5u64 {
        let (_, p) = round
            .iter()
            .find(|(to, _)| *to == addr(B2))
            .unwrap()
            .clone();
        let actions = lab.send(tick * 1000 - 500, udp(B2), &probe_answer(&p, "200 OK"));
        up.extend(events(&actions));
        let actions = lab.timeout(tick * 1000);
        up.extend(events(&actions));
        round = probes(&actions);
    }
    assert_eq!(up, [Event::BackendUp { backend: id("b2") }]);
    assert!(lab.router.is_up(id("b2")));
}

#[test]
fn a_probe_answer_not_in_probe_accept_fails_and_foreign_answers_are_ignored() {
    let mut lab = lab_with(&config("probe_failures_down = 2"));
    let sent = probes(&lab.timeout(0));
    assert!(sent.is_empty(), "start already probed at t0");
    let sent = probes(&lab.timeout(1000));
    let (_, p) = sent.iter().find(|(to, _)| *to == addr(B1)).unwrap();
    // From the wrong address: ignored.
    lab.send(1100, udp("203.0.113.1:5060"), &probe_answer(p, "503 Busy"));
    assert!(lab.router.is_up(id("b1")));
    let actions = lab.send(1200, udp(B1), &probe_answer(p, "503 Service Unavailable"));
    assert_eq!(
        events(&actions),
        [Event::BackendDown {
            backend: id("b1"),
            reason: "OPTIONS probes failed"
        }]
    );
}

#[test]
fn a_call_of_a_down_member_fails_over_marked() {
    let mut lab = fresh(&config("probe_failures_down = 1"));
    let round = probes(&lab.timeout(0));
    let (egress, fwd) = lab.out(0, udp(CLIENT), INVITE);
    let rr: Vec<String> = fwd
        .headers("Record-Route")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let rr: Vec<&str> = rr.iter().map(String::as_str).collect();
    // Every member but the call's answers its probe: at 1 s it is down.
    for (to, p) in &round {
        if *to != dest(egress) {
            let from = if *to == addr(B3) {
                tcp(9, B3)
            } else {
                udp(&to.to_string())
            };
            lab.send(100, from, &probe_answer(p, "200 OK"));
        }
    }
    lab.timeout(1000);
    let dead = [("b1", B1), ("b2", B2), ("b3", B3)]
        .into_iter()
        .find(|(_, a)| addr(a) == dest(egress))
        .unwrap()
        .0;
    assert!(!lab.router.is_up(id(dead)));
    let (e, bye) = lab.out(2100, udp(CLIENT), &bye_through(&rr));
    assert_ne!(dest(e), dest(egress));
    let old = bye.header("X-Viaduct-Failover").unwrap();
    assert_eq!(old.len(), 17, "the old tag marks the failover");
    assert!(bye.header("Route").is_none());
    // Every replica picks the same backup: the rendezvous hash.
    let backup = lab.router.backup(b"call-1@client", id(dead)).unwrap();
    let backup_addr = [("b1", B1), ("b2", B2), ("b3", B3)]
        .into_iter()
        .find(|(n, _)| id(n) == backup)
        .unwrap()
        .1;
    assert_eq!(dest(e), addr(backup_addr));
}

#[test]
fn config_checks_members() {
    let err = Config::from_toml(
        r#"
        [[pools]]
        name = "p"
        mode = "sip"
        backends = ["agent-1"]
        probe_accept = [100]
        members = [{ address = "0.0.0.0:5060" }, { address = "10.0.0.1:5060", weight = 0 },
                   { address = "10.0.0.1:5060" }]
        [[pools]]
        name = "q"
        members = [{ address = "10.0.0.2:5060" }]
        "#,
    )
    .unwrap_err();
    let paths: Vec<&str> = err
        .problems
        .iter()
        .map(|(p, _)| p.split(" (line").next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "pools[0].backends",
            "pools[0].members[0].address",
            "pools[0].members[1].weight",
            "pools[0].members[2]",
            "pools[0].probe_accept[0]",
            "pools[1].members",
        ],
        "{err}"
    );
    // Defaults, and the effective config reads back.
    let c = config("");
    assert_eq!(
        Config::from_toml(&c.to_toml()).unwrap(),
        c,
        "{}",
        c.to_toml()
    );
    let d = Config::from_toml(
        "[[pools]]\nname = \"p\"\nmode = \"sip\"\nmembers = [{ address = \"10.0.0.1:5060\" }]\n",
    )
    .unwrap();
    let pool = &d.pools[0];
    assert_eq!(
        (
            pool.probe_interval_ms,
            pool.probe_failures_down,
            pool.probe_successes_up
        ),
        (5000, 3, 2)
    );
    assert_eq!(pool.probe_accept, [200]);
    assert_eq!(pool.members[0].name(), "udp:10.0.0.1:5060");
    assert_eq!(pool.members[0].weight, 1);
}
