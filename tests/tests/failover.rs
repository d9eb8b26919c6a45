//! Health and failover through the real binary with demo backends as
//! processes: a backend killed mid-run takes no new call once its link
//! is gone, and each of its established calls fails over to exactly one
//! backup (the same for every later message of the call).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive processes

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use viaduct_tests::{DemoBackend, SipTcp, Viaduct};

const SECRET: &[u8] = b"failover test secret";

fn invite(call_id: &str, me: std::net::SocketAddr) -> String {
    format!(
        "INVITE sip:ivr@lb.example.com SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a-{call_id}\r\nTo: <sip:ivr@lb.example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{me};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
    )
}

fn in_dialog(
    method: &str,
    uri: &str,
    to_tag: &str,
    call_id: &str,
    me: std::net::SocketAddr,
    cseq: u32,
) -> String {
    format!(
        "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-{call_id}-{cseq}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a-{call_id}\r\nTo: <sip:ivr@lb.example.com>;tag={to_tag}\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Sends an INVITE and reads until its final answer; returns (status,
/// Contact URI, To tag).
async fn call(proxy: &mut SipTcp, call_id: &str) -> (u16, String, String) {
    let me = proxy.local_addr();
    proxy.send(&invite(call_id, me)).await;
    loop {
        let msg = proxy.recv().await;
        let status = msg.status().unwrap();
        if status >= 200 {
            let contact = msg
                .contact()
                .map(|c| String::from_utf8(c.uri.raw.to_vec()).unwrap())
                .unwrap_or_default();
            let tag = msg
                .to_tag()
                .map(|t| String::from_utf8(t.to_vec()).unwrap())
                .unwrap_or_default();
            return (status, contact, tag);
        }
    }
}

/// Which backend's record holds each Call-ID, and with which messages.
fn where_calls_are(
    backends: &[DemoBackend],
) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for b in backends {
        for (call_id, what) in b.record() {
            out.entry(call_id)
                .or_default()
                .entry(b.name().to_owned())
                .or_default()
                .insert(what);
        }
    }
    out
}

#[tokio::test]
async fn a_killed_backend_gets_no_new_call_and_its_calls_fail_over_to_one_backup() {
    let lb = Viaduct::start("127.0.0.121", SECRET, "");
    let mut backends: Vec<DemoBackend> = (1..=3)
        .map(|i| DemoBackend::start(&format!("k{i}"), &lb, &[]))
        .collect();
    lb.wait_backends(3, Duration::from_secs(30));
    let mut proxy = SipTcp::connect("127.0.0.122", lb.sip()).await;
    let me = proxy.local_addr();

    let mut dialogs = Vec::new();
    for i in 0..30 {
        let call_id = format!("before-{i}");
        let (status, contact, tag) = call(&mut proxy, &call_id).await;
        assert_eq!(status, 200, "{call_id}");
        proxy
            .send(&in_dialog("ACK", &contact, &tag, &call_id, me, 1))
            .await;
        dialogs.push((call_id, contact, tag));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // records flush every 100 ms
    let before = where_calls_are(&backends);
    // The backend with the most calls dies.
    let victim = (0..3)
        .max_by_key(|&i| {
            before
                .values()
                .filter(|b| b.contains_key(backends[i].name()))
                .count()
        })
        .unwrap();
    let victim_name = backends[victim].name().to_owned();
    let victims_calls: BTreeSet<String> = before
        .iter()
        .filter(|(_, b)| b.contains_key(&victim_name))
        .map(|(c, _)| c.clone())
        .collect();
    assert!(!victims_calls.is_empty());
    backends[victim].kill();
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(5);
    while !lb.log().iter().any(|l| l.contains("backend down")) {
        assert!(
            Instant::now() < deadline,
            "the balancer did not see the link close:\n{}",
            lb.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let detected = killed_at.elapsed();
    assert!(
        detected < Duration::from_millis(1500),
        "detected after {detected:?}"
    );

    // New calls: all answered, none by the dead backend.
    for i in 0..30 {
        let call_id = format!("after-{i}");
        assert_eq!(call(&mut proxy, &call_id).await.0, 200, "{call_id}");
    }
    // Every established call hangs up: the dead backend's BYEs (twice: a
    // re-sent BYE must reach the same backup) are answered by a backup.
    for (call_id, contact, tag) in &dialogs {
        for cseq in [2, 3] {
            proxy
                .send(&in_dialog("BYE", contact, tag, call_id, me, cseq))
                .await;
            let answer = proxy.recv().await;
            assert_eq!(answer.status(), Some(200), "{call_id}");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = where_calls_are(&backends);
    for (call_id, at) in &after {
        if call_id.starts_with("after-") {
            assert!(
                !at.contains_key(&victim_name),
                "{call_id} went to the dead backend"
            );
            assert_eq!(at.len(), 1, "{call_id} at {at:?}");
        }
    }
    for call_id in &victims_calls {
        let byes: Vec<&String> = after[call_id]
            .iter()
            .filter(|(_, m)| m.contains("BYE"))
            .map(|(b, _)| b)
            .collect();
        assert_eq!(
            byes.len(),
            1,
            "{call_id}: BYEs at {byes:?}, expected one backup"
        );
        assert_ne!(byes[0], &victim_name);
    }
}
