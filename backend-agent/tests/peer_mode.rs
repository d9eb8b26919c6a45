//! Peer mode through the agent's API, two agents in this process and a
//! proxy played over TCP: a new call stays local under the threshold;
//! `set_peer_policy` changes the thresholds at run time and the next call
//! is handed off (forwarded over the peer link, or answered 302 towards the
//! peer); in-dialog requests reach the backend that answered the INVITE
//! even when the proxy sends them to the other one; a peer that goes away
//! is off-line and no longer chosen.
//!
//! Each test owns its 127.0.0.x addresses; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests: unwrap fails the test; they drive clocks

use std::net::SocketAddr;
use std::time::Duration;

use backend_agent::agent::{Agent, AgentConfig, Inbound, Incoming, Source};
use backend_agent::peer::{peer_id_of, HandOffMode, PeerConfig, PeerPolicy, PinRule, PinTarget};
use backend_agent::respond::response;
use viaduct_tests::{free_port, SipTcp};

const SECRET: &[u8] = b"peer mode test secret";
const STEP: Duration = Duration::from_secs(5);

struct Node {
    agent: Agent,
    inbound: Inbound,
    sip: SocketAddr,
}

fn addrs(ip: &str) -> (SocketAddr, SocketAddr) {
    let sip = free_port(ip, &[]);
    let peer = free_port(ip, &[sip]);
    (
        format!("{ip}:{sip}").parse().unwrap(),
        format!("{ip}:{peer}").parse().unwrap(),
    )
}

/// Starts agents named `names` on `ips`, each a peer of all the others.
fn cluster(names: &[&str], ips: &[&str], mode: HandOffMode) -> Vec<Node> {
    let addrs: Vec<_> = ips.iter().map(|ip| addrs(ip)).collect();
    let peer_ports: Vec<_> = addrs.iter().map(|(_, p)| *p).collect();
    names
        .iter()
        .zip(&addrs)
        .map(|(name, (sip, peer))| {
            let mut config = AgentConfig::new(name, SECRET, vec![]);
            config.reconnect_max = Duration::from_millis(300);
            config.name_servers = vec!["127.0.0.1:9".parse().unwrap()]; // every hop is an IP
            let mut p = PeerConfig::new(*sip, *peer, peer_ports.clone());
            p.hand_off = mode;
            config.peer = Some(p);
            let (agent, inbound) = Agent::start(config).unwrap();
            Node {
                agent,
                inbound,
                sip: *sip,
            }
        })
        .collect()
}

/// Waits until `node` sees `peer` on-line (or off-line), or panics.
async fn wait_peer(node: &Node, peer: &str, online: bool) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let m = node.agent.peer_metrics().unwrap();
        if m.peers.iter().any(|p| p.name == peer && p.online) == online {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < STEP,
            "{peer} not {} within 5 s: {m:?}",
            if online { "on-line" } else { "off-line" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next(inbound: &mut Inbound) -> Incoming {
    tokio::time::timeout(STEP, inbound.recv())
        .await
        .expect("no inbound message within 5 s")
        .expect("inbound closed")
}

async fn nothing(inbound: &mut Inbound) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), inbound.recv()).await {
        panic!("unexpected message: {:?}", m.raw);
    }
}

fn invite(call_id: &str, to: SocketAddr, me: SocketAddr) -> String {
    format!(
        "INVITE sip:ivr@{to} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-{call_id};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{me};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
    )
}

fn cancel(call_id: &str, to: SocketAddr, me: SocketAddr) -> String {
    format!(
        "CANCEL sip:ivr@{to} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-{call_id};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    )
}

fn bye(uri: &str, call_id: &str, me: SocketAddr) -> String {
    format!(
        "BYE {uri} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-{call_id}-bye\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@example.com>;tag=t\r\n\
         Call-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
}

async fn answer(node: &Node, msg: &Incoming, code: u16) {
    let ok = response(msg.scanned(), code, "OK")
        .to_tag("t")
        .header("Contact", b"<sip:ivr@10.9.9.9>") // the agent rewrites it
        .build();
    node.agent.respond(msg, ok).await.unwrap();
}

fn contact_of(msg: &encap_proto::sip::SipMessage) -> String {
    String::from_utf8(msg.contact().unwrap().uri.raw.to_vec()).unwrap()
}

fn hand_off_everything() -> PeerPolicy {
    PeerPolicy {
        local_below_percent: 0,
        handoff_margin_points: 0,
        rules: vec![],
    }
}

#[tokio::test]
async fn forward_mode_follows_the_reloaded_thresholds_and_keeps_affinity() {
    let mut nodes = cluster(
        &["fa", "fb"],
        &["127.0.0.141", "127.0.0.142"],
        HandOffMode::Forward,
    );
    wait_peer(&nodes[0], "fb", true).await;
    let mut proxy = SipTcp::connect("127.0.0.143", nodes[0].sip).await;
    let me = proxy.local_addr();

    // Idle, under 50%: the call stays on fa, answered on our connection,
    // with fa's own address and tag in Contact.
    proxy.send(&invite("p1", nodes[0].sip, me)).await;
    let msg = next(&mut nodes[0].inbound).await;
    assert_eq!(msg.meta.source, Source::Listener);
    answer(&nodes[0], &msg, 200).await;
    let ok = proxy.recv().await;
    assert_eq!(ok.status(), Some(200));
    let contact = contact_of(&ok);
    assert!(
        contact.contains(&nodes[0].sip.to_string()),
        "Contact {contact}"
    );
    nothing(&mut nodes[1].inbound).await;

    // A content rule pins conference calls to fb, whatever the load.
    nodes[0].agent.set_peer_policy(PeerPolicy {
        rules: vec![PinRule {
            ruri_user: Some("conf".into()),
            target: PinTarget::Peer("fb".into()),
            ..PinRule::default()
        }],
        ..PeerPolicy::default()
    });
    proxy
        .send(&invite("p5", nodes[0].sip, me).replacen("sip:ivr@", "sip:conf@", 1))
        .await;
    let msg = next(&mut nodes[1].inbound).await;
    assert_eq!(msg.scanned().call_id(), Some(&b"p5"[..]));
    answer(&nodes[1], &msg, 486).await;
    assert_eq!(proxy.recv().await.status(), Some(486));
    nothing(&mut nodes[0].inbound).await;

    // Thresholds changed at run time: every new call goes to the peer.
    assert!(nodes[0].agent.set_peer_policy(hand_off_everything()));
    assert_eq!(nodes[0].agent.peer_policy(), Some(hand_off_everything()));
    proxy.send(&invite("p2", nodes[0].sip, me)).await;
    let msg = next(&mut nodes[1].inbound).await;
    assert_eq!(msg.meta.source, Source::Peer);
    assert_eq!(msg.scanned().call_id(), Some(&b"p2"[..]));
    answer(&nodes[1], &msg, 200).await;
    // fb's answer comes back on our connection, naming fb.
    let ok = proxy.recv().await;
    assert_eq!(ok.status(), Some(200));
    let contact = contact_of(&ok);
    assert!(
        contact.contains(&nodes[1].sip.to_string()),
        "Contact {contact}"
    );
    let tag = encap_proto::tag::TagKeys::new(SECRET)
        .verify(
            contact
                .split(";vd=")
                .nth(1)
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .as_bytes(),
            b"p2",
        )
        .unwrap();
    assert_eq!(tag.backend, peer_id_of("fb"));
    nothing(&mut nodes[0].inbound).await;

    // The proxy sends the BYE to fa anyway: it reaches fb, the backend
    // that answered the INVITE.
    proxy.send(&bye(&contact, "p2", me)).await;
    let msg = next(&mut nodes[1].inbound).await;
    assert_eq!(msg.scanned().method(), Some(&b"BYE"[..]));
    answer(&nodes[1], &msg, 200).await;
    assert_eq!(proxy.recv().await.status(), Some(200));
    nothing(&mut nodes[0].inbound).await;
    let m = nodes[0].agent.peer_metrics().unwrap();
    assert_eq!(
        m.handed_off
            .get(&("fb".into(), backend_agent::peer::HandOffReason::Load)),
        Some(&1),
        "{m:?}"
    );
    assert_eq!(
        m.handed_off
            .get(&("fb".into(), backend_agent::peer::HandOffReason::Pinned)),
        Some(&1),
        "{m:?}"
    );

    // An untagged CANCEL follows its INVITE to fb (the Call-ID memory).
    proxy.send(&invite("p4", nodes[0].sip, me)).await;
    let msg = next(&mut nodes[1].inbound).await;
    assert_eq!(msg.scanned().call_id(), Some(&b"p4"[..]));
    proxy.send(&cancel("p4", nodes[0].sip, me)).await;
    let msg = next(&mut nodes[1].inbound).await;
    assert_eq!(msg.scanned().method(), Some(&b"CANCEL"[..]));
    nothing(&mut nodes[0].inbound).await;

    // fb goes away: fa sees it off-line within 3 periods and keeps calls.
    nodes[1].agent.shutdown();
    let took = wait_peer(&nodes[0], "fb", false).await;
    assert!(took <= Duration::from_millis(1500), "{took:?}");
    proxy.send(&invite("p3", nodes[0].sip, me)).await;
    let msg = next(&mut nodes[0].inbound).await;
    assert_eq!(msg.scanned().call_id(), Some(&b"p3"[..]));
    nodes[0].agent.shutdown();
}

#[tokio::test]
async fn redirect_mode_answers_302_with_the_peer_contact() {
    let mut nodes = cluster(
        &["ra", "rb"],
        &["127.0.0.144", "127.0.0.145"],
        HandOffMode::Redirect,
    );
    wait_peer(&nodes[0], "rb", true).await;
    nodes[0].agent.set_peer_policy(hand_off_everything());
    let mut proxy = SipTcp::connect("127.0.0.146", nodes[0].sip).await;
    let me = proxy.local_addr();
    proxy.send(&invite("r1", nodes[0].sip, me)).await;
    let moved = proxy.recv().await;
    assert_eq!(moved.status(), Some(302));
    let target = contact_of(&moved);
    // The peer's address, and its tag for this call: it takes the retry
    // without deciding again.
    let prefix = format!("sip:ivr@{};transport=tcp;vd=", nodes[1].sip);
    let tag = target
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{target}"));
    let tag = encap_proto::tag::TagKeys::new(SECRET)
        .verify(tag.as_bytes(), b"r1")
        .unwrap();
    assert_eq!(tag.backend, peer_id_of("rb"));
    // Its ACK ends there; a retransmission of the INVITE gets the same 302.
    let to_hdr = String::from_utf8_lossy(moved.header("To").unwrap()).into_owned();
    proxy
        .send(&format!(
            "ACK sip:ivr@{} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-r1;rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: {to_hdr}\r\n\
             Call-ID: r1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            nodes[0].sip
        ))
        .await;
    proxy.send(&invite("r1", nodes[0].sip, me)).await;
    let again = proxy.recv().await;
    assert_eq!(again.status(), Some(302));
    assert_eq!(contact_of(&again), target);
    // The same response, To tag included (RFC 3261 §8.2.7, §17.2.1).
    assert!(moved.to_tag().is_some());
    assert_eq!(again.to_tag(), moved.to_tag());
    // A CANCEL of it is answered 200 (RFC 3261 §9.2), and nothing else.
    proxy.send(&cancel("r1", nodes[0].sip, me)).await;
    let ok = proxy.recv().await;
    assert_eq!(ok.status(), Some(200));
    assert_eq!(ok.cseq().map(|c| c.method), Some(&b"CANCEL"[..]));
    assert!(proxy
        .recv_within(Duration::from_millis(300))
        .await
        .is_none());
    nothing(&mut nodes[0].inbound).await;
    nothing(&mut nodes[1].inbound).await;

    // The proxy retries there: rb takes the call on its own listener.
    let mut retry = SipTcp::connect("127.0.0.146", nodes[1].sip).await;
    let me2 = retry.local_addr();
    // rb is over its threshold now and ra is lighter, yet the retry
    // carrying rb's tag stays on rb.
    nodes[1].agent.set_peer_policy(hand_off_everything());
    retry
        .send(&invite("r1", nodes[1].sip, me2).replacen(
            &format!("INVITE sip:ivr@{} ", nodes[1].sip),
            &format!("INVITE {target} "),
            1,
        ))
        .await;
    let msg = next(&mut nodes[1].inbound).await;
    assert_eq!(msg.meta.source, Source::Listener);
    answer(&nodes[1], &msg, 200).await;
    assert_eq!(retry.recv().await.status(), Some(200));
    for n in &nodes {
        n.agent.shutdown();
    }
}

#[tokio::test]
async fn without_a_balancer_requests_the_backend_originates_leave_from_its_listener() {
    let mut nodes = cluster(&["oa"], &["127.0.0.147"], HandOffMode::Forward);
    let far = tokio::net::UdpSocket::bind("127.0.0.148:0").await.unwrap();
    let far_addr = far.local_addr().unwrap();
    let options = format!(
        "OPTIONS sip:ua@{far_addr} SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bK-o1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:ivr@example.com>;tag=o1\r\nTo: <sip:ua@example.com>\r\n\
         Call-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    nodes[0].agent.send_request(options).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(STEP, far.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    // It came from the agent's own SIP socket, with a top Via naming it.
    assert_eq!(from, nodes[0].sip);
    let req =
        encap_proto::sip::SipMessage::parse(bytes::Bytes::copy_from_slice(&buf[..n])).unwrap();
    let via = req.top_via().unwrap();
    assert_eq!(via.host, nodes[0].sip.ip().to_string().as_bytes());
    assert_eq!(via.port, Some(nodes[0].sip.port()));
    // The answer, sent to that Via, reaches the application without it.
    let ok = response(&req, 200, "OK").to_tag("ua").build();
    far.send_to(&ok, nodes[0].sip).await.unwrap();
    let got = next(&mut nodes[0].inbound).await;
    assert_eq!(got.scanned().status(), Some(200));
    assert_eq!(
        got.scanned().top_via().unwrap().branch,
        Some(&b"z9hG4bK-o1"[..])
    );
    nodes[0].agent.shutdown();
}
