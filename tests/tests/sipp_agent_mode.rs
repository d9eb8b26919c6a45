//! SIPp (the real SIP client) through the real `viaduct` binary to three
//! demo backends in agent mode, over UDP and over TCP as a proxy trunk
//! (`-t t1`, one connection) and a connection per call (`-t tn`). Every
//! call must complete, and every call's messages must reach exactly one
//! backend: checked from the backends' own records, not assumed.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive processes

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use viaduct_tests::{scenario, sipp, sipp_count, DemoBackend, Viaduct};

const SECRET: &[u8] = b"sipp agent-mode secret";

/// Runs `calls` calls of `tests/sipp/uac_call.xml` from `client_ip` and
/// checks completion and per-call affinity.
fn run(lb_ip: &str, client_ip: &str, transport: &str, calls: u64, rate: u64) {
    let lb = Viaduct::start(lb_ip, SECRET, "");
    let backends: Vec<DemoBackend> = (1..=3)
        .map(|i| DemoBackend::start(&format!("b{i}"), &lb, &[]))
        .collect();
    lb.wait_backends(3, Duration::from_secs(30));

    let target = lb.sip().to_string();
    let scenario = scenario("uac_call.xml");
    let (status, screen) = sipp(
        &[
            &target,
            "-sf",
            scenario.to_str().unwrap(),
            "-i",
            client_ip,
            "-p",
            "0",
            "-t",
            transport,
            "-m",
            &calls.to_string(),
            "-r",
            &rate.to_string(),
            "-l",
            "200",
            "-d",
            "50",
            "-recv_timeout",
            "5000",
            "-max_socket",
            "4096",
        ],
        120,
    );
    let ok = sipp_count(&screen, "Successful call");
    let failed = sipp_count(&screen, "Failed call");
    assert_eq!((ok, failed), (calls, 0), "SIPp exit {status}:\n{screen}");
    assert!(status.success(), "SIPp exit {status}:\n{screen}");

    // The demo backends flush their records every 100 ms.
    std::thread::sleep(Duration::from_millis(400));
    let mut seen: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut methods: BTreeMap<(String, String), usize> = BTreeMap::new();
    for b in &backends {
        for (call_id, what) in b.record() {
            seen.entry(call_id.clone()).or_default().insert(b.name());
            *methods.entry((call_id, what)).or_default() += 1;
        }
    }
    assert_eq!(seen.len() as u64, calls, "every call reached the backends");
    let split: Vec<_> = seen.iter().filter(|(_, b)| b.len() != 1).collect();
    assert!(
        split.is_empty(),
        "calls whose messages reached several backends: {split:?}"
    );
    for call_id in seen.keys() {
        for m in ["INVITE", "ACK", "BYE"] {
            assert!(
                methods.contains_key(&(call_id.clone(), m.to_owned())),
                "{call_id}: no {m} at its backend"
            );
        }
    }
    // Selection spread the calls: every backend took a share.
    for b in &backends {
        let mine = seen.values().filter(|s| s.contains(b.name())).count() as u64;
        assert!(
            mine > calls / 10,
            "{} took only {mine} of {calls} calls",
            b.name()
        );
    }
}

#[test]
fn udp_calls_complete_and_stay_on_one_backend() {
    run("127.0.0.111", "127.0.0.112", "u1", 1000, 200);
}

#[test]
fn tcp_trunk_calls_complete_and_stay_on_one_backend() {
    run("127.0.0.113", "127.0.0.114", "t1", 1000, 200);
}

#[test]
fn tcp_connection_per_call_completes_and_stays_on_one_backend() {
    run("127.0.0.115", "127.0.0.116", "tn", 500, 100);
}
