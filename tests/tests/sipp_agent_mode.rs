//! SIPp (the real SIP client) through the real `viaduct` binary to three
//! demo backends in agent mode, over UDP and over TCP as a proxy trunk
//! (`-t t1`, one connection) and a connection per call (`-t tn`). The
//! scenarios of `tests/sipp/`: a basic call, CANCEL during ringing, a
//! re-INVITE, a 401 challenge and its retry, OPTIONS, REGISTER with refresh
//! and removal, and a basic call over UDP with forced loss. Every call must
//! complete (SIPp's own count, zero failed), and every call's messages must
//! reach exactly one backend and be the ones the scenario sends: checked
//! from the backends' own records, not assumed.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive processes

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use viaduct_tests::{scenario, sipp, sipp_count, DemoBackend, Viaduct};

const SECRET: &[u8] = b"sipp agent-mode secret";

/// One SIPp run against a balancer and three demo backends.
struct Run<'a> {
    lb_ip: &'a str,
    client_ip: &'a str,
    /// SIPp's `-t`: `u1`, `t1` or `tn`.
    transport: &'a str,
    /// A file of `tests/sipp/`.
    scenario: &'a str,
    calls: u64,
    rate: u64,
    /// SIPp's `-d`: the hold of `<pause/>`, in milliseconds.
    hold_ms: u64,
    /// What each call's backend must have received at least: (method, count).
    expect: &'a [(&'a str, usize)],
    /// More SIPp arguments (`-recv_timeout` is 5000 unless given here).
    sipp_args: &'a [&'a str],
}

/// What a run saw: SIPp's final screen and, per Call-ID, what its one
/// backend recorded (method or status -> count).
struct Seen {
    screen: String,
    calls: BTreeMap<String, BTreeMap<String, usize>>,
}

/// Runs `r.calls` calls of `r.scenario` from `r.client_ip` and checks
/// completion and per-call affinity.
fn run(r: &Run) -> Seen {
    let lb = Viaduct::start(r.lb_ip, SECRET, "");
    let backends: Vec<DemoBackend> = (1..=3)
        .map(|i| DemoBackend::start(&format!("b{i}"), &lb, &[]))
        .collect();
    lb.wait_backends(3, Duration::from_secs(30));

    let started = std::time::Instant::now();
    let target = lb.sip().to_string();
    let scenario = scenario(r.scenario);
    let (status, screen) = sipp(
        &[
            &target,
            "-sf",
            scenario.to_str().unwrap(),
            "-i",
            r.client_ip,
            "-p",
            "0",
            "-t",
            r.transport,
            "-m",
            &r.calls.to_string(),
            "-r",
            &r.rate.to_string(),
            "-l",
            "200",
            "-d",
            &r.hold_ms.to_string(),
            "-max_socket",
            "4096",
        ]
        .into_iter()
        .chain(
            Some(["-recv_timeout", "5000"])
                .filter(|_| !r.sipp_args.contains(&"-recv_timeout"))
                .into_iter()
                .flatten(),
        )
        .chain(r.sipp_args.iter().copied())
        .collect::<Vec<_>>(),
        120,
    );
    let ok = sipp_count(&screen, "Successful call");
    let failed = sipp_count(&screen, "Failed call");
    assert_eq!(
        (ok, failed),
        (r.calls, 0),
        "{}: SIPp exit {status}:\n{screen}",
        r.scenario
    );
    assert!(status.success(), "SIPp exit {status}:\n{screen}");

    // The demo backends flush their records every 100 ms.
    std::thread::sleep(Duration::from_millis(400));
    let mut at: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut calls: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for b in &backends {
        for (call_id, what) in b.record() {
            at.entry(call_id.clone()).or_default().insert(b.name());
            *calls.entry(call_id).or_default().entry(what).or_default() += 1;
        }
    }
    assert_eq!(
        at.len() as u64,
        r.calls,
        "{}: every call reached the backends",
        r.scenario
    );
    let split: Vec<_> = at.iter().filter(|(_, b)| b.len() != 1).collect();
    assert!(
        split.is_empty(),
        "{}: calls whose messages reached several backends: {split:?}",
        r.scenario
    );
    for (call_id, got) in &calls {
        for (m, n) in r.expect {
            let have = got.get(*m).copied().unwrap_or(0);
            assert!(
                have >= *n,
                "{}: {call_id}: {have} {m} at its backend, expected {n} or more: {got:?}",
                r.scenario
            );
        }
    }
    // Selection spread the calls: every backend took a share.
    let mut shares = Vec::new();
    for b in &backends {
        let mine = at.values().filter(|s| s.contains(b.name())).count() as u64;
        assert!(
            mine > r.calls / 10,
            "{}: {} took only {mine} of {} calls",
            r.scenario,
            b.name(),
            r.calls
        );
        shares.push(mine);
    }
    eprintln!(
        "{} over {}: {ok} calls completed, {failed} failed in {:.1?}; each call's messages at one \
         backend (shares {shares:?})",
        r.scenario,
        r.transport,
        started.elapsed()
    );
    Seen { screen, calls }
}

const CALL: &[(&str, usize)] = &[("INVITE", 1), ("ACK", 1), ("BYE", 1)];

#[test]
fn udp_calls_complete_and_stay_on_one_backend() {
    run(&Run {
        lb_ip: "127.0.0.111",
        client_ip: "127.0.0.112",
        transport: "u1",
        scenario: "uac_call.xml",
        calls: 1000,
        rate: 200,
        hold_ms: 50,
        expect: CALL,
        sipp_args: &[],
    });
}

#[test]
fn tcp_trunk_calls_complete_and_stay_on_one_backend() {
    run(&Run {
        lb_ip: "127.0.0.113",
        client_ip: "127.0.0.114",
        transport: "t1",
        scenario: "uac_call.xml",
        calls: 1000,
        rate: 200,
        hold_ms: 50,
        expect: CALL,
        sipp_args: &[],
    });
}

#[test]
fn tcp_connection_per_call_completes_and_stays_on_one_backend() {
    run(&Run {
        lb_ip: "127.0.0.115",
        client_ip: "127.0.0.116",
        transport: "tn",
        scenario: "uac_call.xml",
        calls: 500,
        rate: 100,
        hold_ms: 50,
        expect: CALL,
        sipp_args: &[],
    });
}

/// CANCEL and the ACK of the 487 carry no tag: the new-call table sends
/// them to the ringing INVITE's backend, which answers 487 (SIPp counts a
/// call successful only after 200 to CANCEL and 487).
#[test]
fn cancel_during_ringing_reaches_the_ringing_backend() {
    for (lb, client, transport) in [
        ("127.0.0.171", "127.0.0.172", "u1"),
        ("127.0.0.173", "127.0.0.174", "t1"),
    ] {
        run(&Run {
            lb_ip: lb,
            client_ip: client,
            transport,
            scenario: "uac_cancel.xml",
            calls: 300,
            rate: 100,
            hold_ms: 50,
            expect: &[("INVITE", 1), ("CANCEL", 1), ("ACK", 1)],
            sipp_args: &[],
        });
    }
}

#[test]
fn reinvite_within_the_call_reaches_its_backend() {
    run(&Run {
        lb_ip: "127.0.0.175",
        client_ip: "127.0.0.176",
        transport: "u1",
        scenario: "uac_reinvite.xml",
        calls: 300,
        rate: 100,
        hold_ms: 50,
        expect: &[("INVITE", 2), ("ACK", 2), ("BYE", 1)],
        sipp_args: &[],
    });
}

/// The retry after a 401 must reach the backend that issued the nonce
/// (another one refuses it with 403, and SIPp fails the call).
#[test]
fn a_401_challenge_and_its_retry_reach_one_backend() {
    for (lb, client, transport) in [
        ("127.0.0.177", "127.0.0.178", "u1"),
        ("127.0.0.179", "127.0.0.180", "t1"),
    ] {
        run(&Run {
            lb_ip: lb,
            client_ip: client,
            transport,
            scenario: "uac_auth.xml",
            calls: 300,
            rate: 100,
            hold_ms: 50,
            expect: &[("INVITE", 2), ("ACK", 2), ("BYE", 1)],
            sipp_args: &[],
        });
    }
}

#[test]
fn options_are_balanced_and_answered() {
    run(&Run {
        lb_ip: "127.0.0.181",
        client_ip: "127.0.0.182",
        transport: "u1",
        scenario: "uac_options.xml",
        calls: 300,
        rate: 100,
        hold_ms: 50,
        expect: &[("OPTIONS", 1)],
        sipp_args: &[],
    });
}

/// A registration, its refresh and its removal share a Call-ID and no tag:
/// all three reach the backend selected for the first.
#[test]
fn register_refresh_and_removal_reach_one_backend() {
    run(&Run {
        lb_ip: "127.0.0.183",
        client_ip: "127.0.0.184",
        transport: "t1",
        scenario: "uac_register.xml",
        calls: 300,
        rate: 100,
        hold_ms: 50,
        expect: &[("REGISTER", 3)],
        sipp_args: &[],
    });
}

/// SIPp's per-message statistics of the final screen, one entry per
/// scenario line in order (`INVITE ---------->`, `200 <----------` ...):
/// its name and its numbers (sent lines: messages, retransmissions,
/// timeouts, lost; received lines: messages, retransmissions, timeouts,
/// unexpected, lost).
fn message_lines(screen: &str) -> Vec<(String, Vec<u64>)> {
    let table = screen
        .split("Scenario Screen")
        .last()
        .unwrap_or_default()
        .split("Statistics Screen")
        .next()
        .unwrap_or_default();
    table
        .lines()
        .filter(|l| l.contains("----------"))
        .filter_map(|l| {
            let (name, rest) = l.split_once("--")?;
            if name.trim().is_empty() {
                return None; // a rule, not a scenario line
            }
            let numbers = rest
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            Some((name.trim().to_owned(), numbers))
        })
        .collect()
}

/// Forced loss over UDP: 10% of SIPp's INVITEs, ACKs and BYEs are dropped
/// before they leave, half the 100s and 180s and 10% of the 200s it
/// receives are ignored (`tests/sipp/uac_loss.xml`; the backend rings
/// 700 ms), with a hold of 1.5 s so that the backend's 2xx retransmissions
/// (from 500 ms) come before the BYE. Every call still
/// completes; SIPp's own statistics show the retransmissions of INVITE,
/// ACK (answering a retransmitted 200) and BYE; the backends' records show
/// retransmitted INVITEs and BYEs reaching each call's one backend.
#[test]
fn udp_with_forced_loss_retransmits_and_completes() {
    let calls = 300;
    let seen = run(&Run {
        lb_ip: "127.0.0.185",
        client_ip: "127.0.0.186",
        transport: "u1",
        scenario: "uac_loss.xml",
        calls,
        rate: 50,
        hold_ms: 1500,
        expect: &[("INVITE", 1), ("BYE", 1)],
        // A BYE attempt fails when the BYE or its 200 is lost (19%): time
        // for 8 attempts (0, 0.5, 1.5, 3.5 s, then every 4 s) before a call
        // fails, so that a failed call (19%^8 per call) means a real fault.
        sipp_args: &[
            "-recv_timeout",
            "20000",
            "-max_non_invite_retrans",
            "10",
            "-max_invite_retrans",
            "10",
        ],
    });
    let lines = message_lines(&seen.screen);
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["INVITE", "100 <", "180 <", "200 <", "ACK", "BYE", "200 <"],
        "the scenario lines of SIPp's screen:\n{}",
        seen.screen
    );
    let stat = |i: usize, col: usize| lines[i].1.get(col).copied().unwrap_or(0);
    let (invite_retrans, invite_lost) = (stat(0, 1), stat(0, 3));
    let (ok_retrans, ok_ignored) = (stat(3, 1), stat(3, 4));
    let (ack_retrans, ack_lost) = (stat(4, 1), stat(4, 2));
    let (bye_retrans, bye_lost) = (stat(5, 1), stat(5, 3));
    let bye_ok_ignored = stat(6, 4);
    // At the backends: requests that arrived more than once, each at the
    // call's one backend (run() checked there is one).
    let twice = |m: &str| {
        seen.calls
            .values()
            .filter(|got| got.get(m).copied().unwrap_or(0) >= 2)
            .count()
    };
    let with_ack = seen
        .calls
        .values()
        .filter(|got| got.contains_key("ACK"))
        .count();
    eprintln!(
        "loss: SIPp dropped {invite_lost} INVITEs, {ack_lost} ACKs, {bye_lost} BYEs and ignored \
         {ok_ignored} + {bye_ok_ignored} 200s; it retransmitted {invite_retrans} INVITEs, \
         {ack_retrans} ACKs and {bye_retrans} BYEs and received {ok_retrans} retransmitted 200s; \
         at the backends {} calls got their INVITE twice or more, {} their BYE, {with_ack} of \
         {calls} an ACK",
        twice("INVITE"),
        twice("BYE"),
    );
    assert!(
        invite_lost > 0 && ack_lost > 0 && bye_lost > 0,
        "no loss forced"
    );
    assert!(
        invite_retrans >= invite_lost,
        "every dropped INVITE is retransmitted"
    );
    assert!(
        bye_retrans >= bye_lost,
        "every dropped BYE is retransmitted"
    );
    assert!(
        ok_retrans > 0,
        "no retransmitted 200 to INVITE reached SIPp"
    );
    assert!(
        ack_retrans > 0,
        "SIPp never answered a retransmitted 200 with its ACK again"
    );
    assert!(
        twice("INVITE") > 0,
        "no retransmitted INVITE reached its call's backend"
    );
    assert!(
        twice("BYE") > 0,
        "no retransmitted BYE reached its call's backend"
    );
    // An ACK is lost for good only if it and the two 2xx retransmissions
    // before the BYE (at 0.5 s and 1.5 s) all meet the 10% loss.
    assert!(
        with_ack as u64 >= calls - calls / 20,
        "only {with_ack} of {calls} calls got an ACK to their backend"
    );
}
