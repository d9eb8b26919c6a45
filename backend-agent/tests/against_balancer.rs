//! The agent against a real `viaduct` balancer over loopback: registration,
//! a bad secret refused, a whole call routed to it and answered on the right
//! path, a backend-originated request and its response, reconnection after
//! the balancer restarts (the established call survives), drain.
//!
//! Each test owns its 127.0.0.x addresses; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests: unwrap fails the test; they drive clocks

use std::time::Duration;

use backend_agent::agent::{Agent, AgentConfig, Incoming, LinkState};
use backend_agent::respond::response;
use viaduct_tests::{SipTcp, Viaduct};

const SECRET: &[u8] = b"agent test cluster secret";
const STEP: Duration = Duration::from_secs(5);

async fn agent(name: &str, secret: &[u8], lb: &Viaduct) -> (Agent, backend_agent::agent::Inbound) {
    let mut config = AgentConfig::new(name, secret, vec![lb.agents()]);
    config.reconnect_max = Duration::from_millis(300);
    config.name_servers = vec!["127.0.0.1:9".parse().unwrap()]; // never asked: every hop here is an IP
    Agent::start(config).unwrap()
}

async fn next(inbound: &mut backend_agent::agent::Inbound) -> Incoming {
    tokio::time::timeout(STEP, inbound.recv())
        .await
        .expect("no inbound message within 5 s")
        .expect("inbound closed")
}

fn invite(call_id: &str, proxy: std::net::SocketAddr) -> String {
    format!(
        "INVITE sip:ivr@lb.example.com SIP/2.0\r\nVia: SIP/2.0/TCP {proxy};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@lb.example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{proxy};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
    )
}

fn in_dialog(
    method: &str,
    contact_uri: &str,
    call_id: &str,
    proxy: std::net::SocketAddr,
    cseq: u32,
) -> String {
    format!(
        "{method} {contact_uri} SIP/2.0\r\nVia: SIP/2.0/TCP {proxy};branch=z9hG4bK-{call_id}-{cseq}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@lb.example.com>;tag=b1\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The Contact URI of a message, as text.
fn contact(msg: &encap_proto::sip::SipMessage) -> String {
    String::from_utf8(msg.contact().expect("a Contact").uri.raw.to_vec()).unwrap()
}

#[tokio::test]
async fn a_whole_call_reaches_the_agent_and_its_answers_take_the_inbound_connection() {
    let lb = Viaduct::start("127.0.0.81", SECRET, "");
    let (agent, mut inbound) = agent("agent-a", SECRET, &lb).await;
    assert!(agent.wait_established(STEP).await, "{:?}", agent.links());
    assert!(matches!(agent.links()[0].1, LinkState::Established { .. }));

    let mut proxy = SipTcp::connect("127.0.0.82", lb.sip()).await;
    let me = proxy.local_addr();
    proxy.send(&invite("call-1", me)).await;
    let inv = next(&mut inbound).await;
    assert_eq!(inv.scanned().call_id(), Some(&b"call-1"[..]));
    assert!(inv.sip.is_ok(), "rsip parses it: {:?}", inv.sip);
    assert_eq!(inv.meta.peer, me);
    assert!(!inv.meta.failover);

    let ok = response(inv.scanned(), 200, "OK")
        .to_tag("b1")
        .header("Contact", b"<sip:ivr@10.9.9.9:5099>")
        .build();
    agent.respond(&inv, ok).await.unwrap();
    let got = proxy.recv().await;
    assert_eq!(got.status(), Some(200));
    // The agent stamped the Contact: the balancer's address and the tag.
    let uri = contact(&got);
    assert!(uri.starts_with(&format!("sip:ivr@{}", lb.sip())), "{uri}");
    assert!(uri.contains(";vd="), "{uri}");
    assert_eq!(agent.active_calls(), 1);

    // ACK and BYE to the Contact reach the agent; the BYE's 200 comes back.
    proxy.send(&in_dialog("ACK", &uri, "call-1", me, 1)).await;
    assert_eq!(
        next(&mut inbound).await.scanned().method(),
        Some(&b"ACK"[..])
    );
    proxy.send(&in_dialog("BYE", &uri, "call-1", me, 2)).await;
    let bye = next(&mut inbound).await;
    assert_eq!(bye.scanned().method(), Some(&b"BYE"[..]));
    agent
        .respond(&bye, response(bye.scanned(), 200, "OK").build())
        .await
        .unwrap();
    assert_eq!(proxy.recv().await.status(), Some(200));
    assert_eq!(agent.active_calls(), 0);
    agent.shutdown();
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_gets_no_traffic() {
    let lb = Viaduct::start("127.0.0.83", SECRET, "");
    let (agent, _inbound) = agent("intruder", b"not the secret", &lb).await;
    let deadline = tokio::time::Instant::now() + STEP;
    let reason = loop {
        if let [(_, LinkState::Backoff { reason, .. })] = &agent.links()[..] {
            break reason.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            agent.links()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains("AUTH_FAILED"), "{reason}");
    assert!(!agent.wait_established(Duration::from_millis(500)).await);
    // With no backend, the balancer answers a new call itself.
    let mut proxy = SipTcp::connect("127.0.0.84", lb.sip()).await;
    let me = proxy.local_addr();
    proxy.send(&invite("nobody", me)).await;
    assert_eq!(proxy.recv().await.status(), Some(503));
}

#[tokio::test]
async fn requests_the_backend_originates_get_their_responses_back() {
    let lb = Viaduct::start("127.0.0.85", SECRET, "");
    let (agent, mut inbound) = agent("agent-b", SECRET, &lb).await;
    assert!(agent.wait_established(STEP).await);
    // The far end: a UA listening on its own address.
    let far = tokio::net::TcpListener::bind("127.0.0.86:0").await.unwrap();
    let far_addr = far.local_addr().unwrap();
    let out = format!(
        "OPTIONS sip:ua@{far_addr};transport=tcp SIP/2.0\r\nVia: SIP/2.0/TCP 10.9.9.9:5099;branch=z9hG4bK-app-1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:ivr@example.com>;tag=o1\r\nTo: <sip:ua@example.com>\r\n\
         Call-ID: out-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    agent.send_request(out).await.unwrap();
    let (stream, _) = tokio::time::timeout(STEP, far.accept())
        .await
        .unwrap()
        .unwrap();
    let mut ua = SipTcp::from_stream(stream);
    let req = ua.recv().await;
    let top = req.top_via().unwrap();
    assert_eq!(
        top.host,
        lb.sip().ip().to_string().as_bytes(),
        "the agent's Via names the balancer"
    );
    assert!(top.branch.unwrap().starts_with(b"z9hG4bK-vd"));
    assert_eq!(
        req.vias().count(),
        2,
        "the application's own Via stays under it"
    );
    // The UA answers on the same connection, with the Vias copied.
    let mut answer = String::from("SIP/2.0 200 OK\r\n");
    for via in req.headers("Via") {
        answer.push_str(&format!("Via: {}\r\n", String::from_utf8_lossy(via)));
    }
    answer.push_str("From: <sip:ivr@example.com>;tag=o1\r\nTo: <sip:ua@example.com>;tag=u1\r\nCall-ID: out-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
    ua.send(&answer).await;
    let resp = next(&mut inbound).await;
    assert_eq!(resp.scanned().status(), Some(200));
    let vias: Vec<_> = resp
        .scanned()
        .vias()
        .map(|v| v.branch.unwrap().to_vec())
        .collect();
    assert_eq!(
        vias,
        [b"z9hG4bK-app-1".to_vec()],
        "the agent's Via is gone, the application's is on top"
    );
}

#[tokio::test]
async fn after_a_balancer_restart_the_agent_reconnects_and_the_call_goes_on() {
    let mut lb = Viaduct::start("127.0.0.87", SECRET, "");
    let (agent, mut inbound) = agent("agent-c", SECRET, &lb).await;
    assert!(agent.wait_established(STEP).await);
    let mut proxy = SipTcp::connect("127.0.0.88", lb.sip()).await;
    let me = proxy.local_addr();
    proxy.send(&invite("survivor", me)).await;
    let inv = next(&mut inbound).await;
    let ok = response(inv.scanned(), 200, "OK")
        .to_tag("b1")
        .header("Contact", b"<sip:ivr@10.9.9.9>")
        .build();
    agent.respond(&inv, ok).await.unwrap();
    let uri = contact(&proxy.recv().await);

    lb.restart();
    // The proxy's connection died with the old process; the agent reconnects.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(agent.wait_established(STEP).await, "{:?}", agent.links());
    let mut proxy = SipTcp::connect("127.0.0.88", lb.sip()).await;
    let me = proxy.local_addr();
    proxy.send(&in_dialog("BYE", &uri, "survivor", me, 2)).await;
    let bye = next(&mut inbound).await;
    assert_eq!(
        bye.scanned().call_id(),
        Some(&b"survivor"[..]),
        "the tag carried the call over the restart"
    );
    agent
        .respond(&bye, response(bye.scanned(), 200, "OK").build())
        .await
        .unwrap();
    assert_eq!(proxy.recv().await.status(), Some(200));
}

#[tokio::test]
async fn a_draining_agent_keeps_its_dialogs_and_takes_no_new_call() {
    let lb = Viaduct::start("127.0.0.89", SECRET, "");
    let (agent, mut inbound) = agent("agent-d", SECRET, &lb).await;
    assert!(agent.wait_established(STEP).await);
    let mut proxy = SipTcp::connect("127.0.0.90", lb.sip()).await;
    let me = proxy.local_addr();
    proxy.send(&invite("kept", me)).await;
    let inv = next(&mut inbound).await;
    let ok = response(inv.scanned(), 200, "OK")
        .to_tag("b1")
        .header("Contact", b"<sip:ivr@10.9.9.9>")
        .build();
    agent.respond(&inv, ok).await.unwrap();
    let uri = contact(&proxy.recv().await);

    agent.drain().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.send(&invite("new-while-draining", me)).await;
    assert_eq!(
        proxy.recv().await.status(),
        Some(503),
        "the only backend drains: no new call"
    );
    proxy.send(&in_dialog("BYE", &uri, "kept", me, 2)).await;
    assert_eq!(
        next(&mut inbound).await.scanned().call_id(),
        Some(&b"kept"[..])
    );

    agent.undrain().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.send(&invite("after-undrain", me)).await;
    assert_eq!(
        next(&mut inbound).await.scanned().call_id(),
        Some(&b"after-undrain"[..])
    );
}
