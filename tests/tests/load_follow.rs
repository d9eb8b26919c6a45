//! Selection follows reported load, through the real binary: three agents
//! (the real `backend-agent`, in this process) report different scores and
//! new calls go where the load is lowest; when the reports change, the
//! choices follow.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive processes

use std::collections::BTreeMap;
use std::time::Duration;

use backend_agent::agent::{Agent, AgentConfig, Inbound};
use backend_agent::respond::response;
use viaduct_tests::{SipTcp, Viaduct};

const SECRET: &[u8] = b"load test secret";

fn invite(call_id: &str, me: std::net::SocketAddr) -> String {
    format!(
        "INVITE sip:ivr@lb.example.com SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:ivr@lb.example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Answers every INVITE 486 (no call stays up: only the score loads it)
/// and counts the INVITEs it saw.
fn serve(
    agent: Agent,
    mut inbound: Inbound,
    name: &'static str,
    seen: tokio::sync::mpsc::UnboundedSender<&'static str>,
) {
    tokio::spawn(async move {
        while let Some(msg) = inbound.recv().await {
            if msg.scanned().method() == Some(&b"INVITE"[..]) {
                let _ = seen.send(name);
                let busy = response(msg.scanned(), 486, "Busy Here")
                    .to_tag("t")
                    .build();
                let _ = agent.respond(&msg, busy).await;
            }
        }
    });
}

async fn round(
    proxy: &mut SipTcp,
    prefix: &str,
    n: usize,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) -> BTreeMap<&'static str, usize> {
    let me = proxy.local_addr();
    let mut counts = BTreeMap::new();
    for i in 0..n {
        proxy.send(&invite(&format!("{prefix}-{i}"), me)).await;
        let answer = proxy.recv().await;
        assert_eq!(answer.status(), Some(486));
        let who = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        *counts.entry(who).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn new_calls_follow_the_reported_load() {
    let lb = Viaduct::start("127.0.0.131", SECRET, "");
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut agents = Vec::new();
    for name in ["busy", "half", "idle"] {
        let (agent, inbound) =
            Agent::start(AgentConfig::new(name, SECRET, vec![lb.agents()])).unwrap();
        assert!(agent.wait_established(Duration::from_secs(10)).await);
        serve(agent.clone(), inbound, name, tx.clone());
        agents.push(agent);
    }
    // Scores: 85%, 40%, 5% of capacity. Two report periods to be sure
    // every balancer-side load is current.
    agents[0].set_score(Some(8500));
    agents[1].set_score(Some(4000));
    agents[2].set_score(Some(500));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut proxy = SipTcp::connect("127.0.0.132", lb.sip()).await;
    let counts = round(&mut proxy, "first", 60, &mut seen).await;
    let c = |n| counts.get(n).copied().unwrap_or(0);
    assert!(c("idle") > c("half") && c("half") > c("busy"), "{counts:?}");
    assert!(
        c("busy") <= 3,
        "the most loaded backend took {} of 60: {counts:?}",
        c("busy")
    );

    // The loads turn around; after the next reports, so do the choices.
    agents[0].set_score(Some(500));
    agents[2].set_score(Some(8500));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let counts = round(&mut proxy, "second", 60, &mut seen).await;
    let c = |n| counts.get(n).copied().unwrap_or(0);
    assert!(c("busy") > c("half") && c("half") > c("idle"), "{counts:?}");
    assert!(c("idle") <= 3, "{counts:?}");
    for a in &agents {
        a.shutdown();
    }
}
