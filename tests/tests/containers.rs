//! Faults with real parts in containers: the balancer, three demo backends
//! and a SIPp client, each in its own container on a private network
//! (`viaduct_tests::containers`; images built by `ci/images.sh` when
//! missing, no base image pulled). Each test prints what it counted and
//! asserts it:
//!
//! * a backend killed under load: its calls in progress fail over (their
//!   BYEs reach one backup), the balancer sees it down within 1.5 s and
//!   sends it nothing after, and no call fails but one whose INVITE
//!   transaction was inside b2 at that moment (counted; the balancer keeps
//!   no copy of an INVITE, so the caller's timer ends such a call);
//! * a backend paused (`docker pause`: its link stays open, it stops
//!   answering): detected by missed load reports within 1.5 s, same outcome;
//! * the balancer restarted (SIGKILL, start) while about 1,000 calls are
//!   established: every one of them completes its BYE afterwards at its
//!   own backend (the tags carry the state); only calls set up during the
//!   restart window may fail, and they are counted;
//! * a proxy that goes away and comes back at the same address: the
//!   responses to its INVITEs, sent after its connection closed, come on
//!   a new connection the balancer opens to its Via address (RFC 3261
//!   §18.2.2), and its ACKs and BYEs on that connection reach the calls'
//!   backends; and the BYEs the backends send it later (requests they
//!   originate) take a new connection the same way.
//!
//! Without a Docker engine (`docker info` fails) each test says so on
//! stderr and returns; CI machines have one.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stderr)] // tests drive containers

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use viaduct_tests::containers::{docker, docker_available, Cluster};

/// One cluster at a time: the fault timings are measured on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Skips (loudly) when there is no Docker engine; else takes the turn.
macro_rules! require_docker {
    () => {
        if !docker_available() {
            eprintln!(
                "SKIPPED: `docker info` failed: no Docker engine, the container tests cannot run here"
            );
            return;
        }
        let _turn = SERIAL.lock().await;
    };
}

/// What a fault test saw.
#[derive(Debug)]
struct Outcome {
    ok: u64,
    failed: u64,
    /// Calls established at the victim before the fault whose BYE reached
    /// exactly one other backend.
    failed_over: usize,
    /// Calls being set up at the victim when the fault hit: INVITE there
    /// (or, for a kill, no record anywhere: b2 died before flushing it),
    /// no ACK nor BYE anywhere, at most a failed-over CANCEL elsewhere.
    /// The backend holding such a call's transaction is gone; the balancer
    /// keeps no copy of the INVITE, so the caller's own timer ends it, as
    /// with any stateless proxy.
    stalled: u64,
    detected: Duration,
    sent_to_victim_after: u64,
}

/// Runs `calls` calls at `rate`/s, each held 2 s; 2.5 s in, applies
/// `fault` to b2 and measures until the balancer reports it down.
async fn fault_under_load(test: &str, fault: &str, calls: u64, rate: u64) -> (Cluster, Outcome) {
    let cluster = Cluster::start(test, "", &[]).await;
    let m = calls.to_string();
    let r = rate.to_string();
    let sipp = cluster
        .sipp(
            "load",
            &["-t", "u1", "-m", &m, "-r", &r, "-l", "1000", "-d", "2000"],
            60,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let victim = &cluster.backends[1];
    let before: BTreeSet<String> = cluster.calls_at("b2");
    match fault {
        "kill" => {
            docker(&["kill", victim.id()]);
        }
        "pause" => victim.pause().await.unwrap(),
        other => unreachable!("{other}"),
    }
    // From the moment the engine says the fault is in place (the SIGKILL
    // sent, the cgroup frozen).
    let t0 = Instant::now();
    let detected = cluster.wait_down("b2", t0, Duration::from_secs(10)).await;
    let at_detection = cluster.backends_state().await["b2"].1;
    let (ok, failed, screen) = sipp.finish(Duration::from_secs(60)).await;
    let at_end = cluster.backends_state().await["b2"].1;
    if fault == "pause" {
        victim.unpause().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // records flush every 100 ms
                                                          // The victim's calls in progress: established there before the fault,
                                                          // with no BYE there; each BYE must have reached one backup.
    let records = cluster.records();
    let (mut failed_over, mut unrecorded) = (0, 0);
    for call_id in &before {
        let at = &records[call_id];
        if at["b2"].iter().any(|m| m == "BYE") {
            continue;
        }
        let byes: Vec<&String> = at
            .iter()
            .filter(|(b, msgs)| *b != "b2" && msgs.iter().any(|m| m == "BYE"))
            .map(|(b, _)| b)
            .collect();
        if byes.is_empty() && fault == "kill" {
            // b2 answered this BYE in its last 100 ms and died before
            // flushing its record (SIPp counts the 200 it got).
            unrecorded += 1;
            continue;
        }
        assert_eq!(byes.len(), 1, "{call_id}: BYE at {byes:?}: {at:?}");
        failed_over += 1;
    }
    eprintln!("{fault}: {unrecorded} BYEs answered by b2 just before it died, not in its record");
    let has = |at: &std::collections::BTreeMap<String, Vec<String>>, backend: &str, what: &str| {
        at.get(backend).is_some_and(|m| m.iter().any(|m| m == what))
    };
    let mut stalled = calls.saturating_sub(records.len() as u64);
    for (call_id, at) in &records {
        // Established (SIPp sends BYE only after its ACK); a killed b2 may
        // have taken its INVITE and ACK records with it.
        if at.keys().any(|b| has(at, b, "ACK") || has(at, b, "BYE")) {
            continue;
        }
        // Its INVITE went to b2 only; a live backend may hold just the
        // caller's CANCEL, failed over from b2 by the new-call table
        // (design §6), which it answers 481: no transaction of its own.
        assert!(
            at.iter()
                .all(|(b, msgs)| b == "b2" || msgs.iter().all(|m| m == "CANCEL")),
            "{call_id}: not established, yet it was at a live backend: {at:?}"
        );
        stalled += 1;
    }
    assert!(
        unrecorded <= rate / 5,
        "{unrecorded} calls of b2 have no BYE recorded anywhere"
    );
    if failed != 0 || ok != calls {
        eprintln!("{screen}");
    }
    (
        cluster,
        Outcome {
            ok,
            failed,
            failed_over,
            stalled,
            detected,
            sent_to_victim_after: at_end - at_detection,
        },
    )
}

fn check(what: &str, calls: u64, o: &Outcome) {
    eprintln!(
        "{what}: {} of {calls} calls completed, {} failed; {} calls in progress on b2 failed over; \
         {} calls were being set up at b2; b2 seen down after {:?}; messages sent to b2 after that: {}",
        o.ok, o.failed, o.failed_over, o.stalled, o.detected, o.sent_to_victim_after
    );
    // Only a call whose INVITE transaction was inside b2 at the fault may
    // fail; at 100 calls/s that is a handful at most.
    assert_eq!(o.ok + o.failed, calls, "{what}: every call ended");
    assert!(
        o.failed <= o.stalled,
        "{what}: {} calls failed, only {} were being set up at b2",
        o.failed,
        o.stalled
    );
    assert!(o.stalled <= 20, "{what}: {} calls stalled at b2", o.stalled);
    assert!(o.failed_over > 0, "{what}: b2 had calls in progress");
    // Missed reports: 3 × 500 ms after the last report the backend sent,
    // which came at most 500 ms before it stopped; measured from outside
    // (docker pause returning, the balancer's log line) with up to 100 ms
    // of observation latency on a busy 2-core machine.
    assert!(
        o.detected < Duration::from_millis(1600),
        "{what}: detected after {:?}",
        o.detected
    );
    assert_eq!(o.sent_to_victim_after, 0, "{what}: new calls avoid b2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_fails_over_and_is_avoided() {
    require_docker!();
    let (_cluster, o) = fault_under_load("kill", "kill", 600, 100).await;
    check("kill", 600, &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_backend_is_detected_by_missed_reports() {
    require_docker!();
    let (_cluster, o) = fault_under_load("pause", "pause", 600, 100).await;
    check("pause", 600, &o);
}

/// About 1,000 calls established (1,300 placed at 130/s, each held 12 s;
/// the balancer is killed 8 s in), then a balancer restart: every call
/// established before it completes its BYE at its own backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_restart_loses_no_established_call() {
    require_docker!();
    let calls = 1300u64;
    let cluster = Cluster::start("restart", "", &[]).await;
    let sipp = cluster
        .sipp(
            "load",
            &[
                "-t", "u1", "-m", "1300", "-r", "130", "-l", "2000", "-d", "12000",
            ],
            90,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Established: INVITE and ACK recorded at a backend before the kill.
    let records = cluster.records();
    let established: BTreeSet<String> = records
        .iter()
        .filter(|(_, at)| at.values().any(|m| m.iter().any(|m| m == "ACK")))
        .map(|(c, _)| c.clone())
        .collect();
    let t0 = Instant::now();
    docker(&["kill", cluster.lb.id()]);
    cluster.lb.start().await.unwrap();
    cluster
        .wait_up(&["b1", "b2", "b3"], Duration::from_secs(30))
        .await;
    let down_for = t0.elapsed();
    let (ok, failed, screen) = sipp.finish(Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = cluster.records();
    let mut completed = 0;
    for call_id in &established {
        let at = &records[call_id];
        assert_eq!(at.len(), 1, "{call_id} reached several backends: {at:?}");
        let msgs = at.values().next().unwrap();
        assert!(
            msgs.iter().any(|m| m == "BYE"),
            "{call_id}: established before the restart, no BYE after it: {msgs:?}"
        );
        completed += 1;
    }
    let failed_ids: Vec<&String> = records
        .iter()
        .filter(|(_, at)| !at.values().any(|m| m.iter().any(|m| m == "BYE")))
        .map(|(c, _)| c)
        .collect();
    eprintln!(
        "restart: {} calls established before the restart, {completed} of them completed their BYE after it; \
         balancer back with 3 backends after {down_for:?}; SIPp: {ok} of {calls} completed, {failed} failed \
         (all set up in the restart window)",
        established.len()
    );
    assert!(
        established.len() >= 900,
        "only {} calls established before the restart",
        established.len()
    );
    assert_eq!(ok + failed, calls, "{screen}");
    for c in &failed_ids {
        assert!(
            !established.contains(*c),
            "{c} was established and did not complete"
        );
    }
    assert!(
        failed as usize <= calls as usize - established.len(),
        "{failed} failed calls cannot all be from the restart window"
    );
}

/// A proxy container of `viaduct-test-proxy:local` at a fixed address,
/// removed on drop.
struct Proxy {
    name: String,
}

impl Proxy {
    /// Runs `viaduct-test-proxy ARGS` as container `name` at `ip`.
    fn run(cluster: &Cluster, name: &str, ip: &str, args: &[&str]) -> Proxy {
        let name = format!("{}-{name}", cluster.net.name());
        let data = format!("{}:/data", cluster.dir().display());
        let mut cmd = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            cluster.net.name(),
            "--ip",
            ip,
            "-v",
            &data,
            "viaduct-test-proxy:local",
        ];
        cmd.extend_from_slice(args);
        docker(&cmd);
        Proxy { name }
    }

    /// Waits for it to exit; its exit code and its log.
    fn wait(&self) -> (String, String) {
        let code = docker(&["wait", &self.name]).trim().to_owned();
        let out = std::process::Command::new("docker")
            .args(["logs", &self.name])
            .output()
            .unwrap();
        (code, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The lines of a proxy report that start with `what`, split in words.
fn report(cluster: &Cluster, file: &str, what: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(cluster.dir().join(file))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|w| w[0] == what)
        .collect()
}

/// The two lives of a proxy at one address (`cluster.net.ip(50)`): the
/// first runs `viaduct-test-proxy send BALANCER IP 20 <send>` and exits, a
/// new container at the same address runs `answer` until it is done. The
/// time from the first start to the second, which must come before the
/// backends' answers or BYEs (at 8 s).
async fn proxy_lives(cluster: &Cluster, send: &[&str]) -> Duration {
    let lb = format!("{}:5060", cluster.lb_ip());
    let ip = cluster.net.ip(50).to_string();
    let calls = PROXY_CALLS.to_string();
    let t0 = Instant::now();
    let mut args = vec!["send", &lb, &ip, &calls];
    args.extend_from_slice(send);
    let first = Proxy::run(cluster, "proxy-1", &ip, &args);
    let (code, log) = first.wait();
    assert_eq!(code, "0", "the first proxy failed: {log}");
    drop(first);
    let second = Proxy::run(
        cluster,
        "proxy-2",
        &ip,
        &["answer", &calls, "30000", "/data/proxy-2.report"],
    );
    let restarted = t0.elapsed();
    let (code, log) = second.wait();
    assert_eq!(code, "0", "the second proxy failed: {log}");
    assert!(
        restarted < Duration::from_secs(7),
        "the proxy took {restarted:?} to come back: the backends (at 8 s) may have come first"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // records flush every 100 ms
    restarted
}

/// Calls per proxy life.
const PROXY_CALLS: usize = 20;

/// What the second proxy life was reached by: the peers of the
/// connections it accepted, all of them the balancer's.
fn accepted_from_balancer(cluster: &Cluster) -> BTreeSet<String> {
    let peers: BTreeSet<String> = report(cluster, "proxy-2.report", "accepted")
        .into_iter()
        .map(|w| w[1].clone())
        .collect();
    assert!(
        !peers.is_empty(),
        "the balancer opened no connection to the proxy"
    );
    for p in &peers {
        assert!(
            p.starts_with(&format!("{}:", cluster.lb_ip())),
            "a connection from {p} is not the balancer's"
        );
    }
    peers
}

/// The first life's INVITEs: all on one connection; their Call-IDs.
fn sent_on_one_connection(cluster: &Cluster) -> BTreeSet<String> {
    let sent = report(cluster, "proxy-1.report", "sent");
    let ports: BTreeSet<&String> = sent.iter().map(|w| &w[2]).collect();
    assert_eq!(
        (sent.len(), ports.len()),
        (PROXY_CALLS, 1),
        "INVITEs on one connection"
    );
    sent.into_iter().map(|w| w[1].clone()).collect()
}

/// How many of `calls` have every one of `messages` recorded at one backend
/// (and none at another).
fn complete_at_one_backend(
    cluster: &Cluster,
    calls: &BTreeSet<String>,
    messages: &[&str],
) -> usize {
    let records = cluster.records();
    let mut complete = 0;
    for call_id in calls {
        let at = records
            .get(call_id)
            .unwrap_or_else(|| panic!("{call_id}: not recorded by any backend"));
        assert_eq!(at.len(), 1, "{call_id}: reached several backends: {at:?}");
        let msgs = at.values().next().unwrap();
        if messages.iter().all(|m| msgs.iter().any(|x| x == m)) {
            complete += 1;
        }
    }
    complete
}

/// A proxy sends 20 INVITEs over one TCP connection, gets 100 and 180 on
/// it, and goes away (the connection closes); a new proxy comes up at the
/// same address and listens on its Via's port. The backends answer 200
/// after 8 s: the balancer must open a new connection to the Via address
/// and send every 200 there; the ACKs and BYEs sent back on that
/// connection must reach each call's backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_proxy_gets_its_responses_on_a_new_connection() {
    require_docker!();
    let cluster = Cluster::start("reconnect", "", &[]).await;
    let restarted = proxy_lives(&cluster, &["8000", "/data/proxy-1.report"]).await;
    let sent = sent_on_one_connection(&cluster);
    let rang: BTreeSet<String> = report(&cluster, "proxy-1.report", "provisional")
        .into_iter()
        .filter(|w| w[2] == "180" && sent.contains(&w[1]))
        .map(|w| w[1].clone())
        .collect();
    let accepted = accepted_from_balancer(&cluster);
    let finals = report(&cluster, "proxy-2.report", "final");
    let answered: BTreeSet<&String> = finals
        .iter()
        .filter(|w| w[2] == "200" && sent.contains(&w[1]))
        .map(|w| &w[1])
        .collect();
    let byes = report(&cluster, "proxy-2.report", "bye");
    let bye_ok = byes.iter().filter(|w| w[2] == "200").count();
    let complete = complete_at_one_backend(&cluster, &sent, &["INVITE", "ACK", "BYE"]);
    eprintln!(
        "reconnect (responses): {} INVITEs sent on one connection by the first proxy, {} rang on \
         it; second proxy up {restarted:?} after the first started; it accepted {} connection(s) \
         from {accepted:?}; {} 200s to INVITE on them, {bye_ok} BYEs answered 200; {complete} \
         calls with INVITE, ACK and BYE at one backend",
        sent.len(),
        rang.len(),
        accepted.len(),
        answered.len(),
    );
    assert_eq!(
        rang.len(),
        PROXY_CALLS,
        "every call rang on the first connection"
    );
    assert_eq!(
        answered.len(),
        PROXY_CALLS,
        "200s on the new connection: {finals:?}"
    );
    assert_eq!(bye_ok, PROXY_CALLS, "BYEs answered 200: {byes:?}");
    assert_eq!(complete, PROXY_CALLS, "calls complete at one backend");
}

/// A proxy sets up 20 calls over one TCP connection (INVITE, 200, ACK),
/// asking the backends to hang up 8 s later, and goes away; a new proxy
/// comes up at the same address. The backends' BYEs (requests the backend
/// originates, to the caller's Contact) must come on a new connection the
/// balancer opens, and the proxy's 200s to them must reach each call's
/// backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_proxy_gets_backend_requests_on_a_new_connection() {
    require_docker!();
    let cluster = Cluster::start("hangup", "", &[]).await;
    let restarted = proxy_lives(&cluster, &["0", "/data/proxy-1.report", "8000"]).await;
    let sent = sent_on_one_connection(&cluster);
    let answered: BTreeSet<String> = report(&cluster, "proxy-1.report", "answered")
        .into_iter()
        .map(|w| w[1].clone())
        .filter(|c| sent.contains(c))
        .collect();
    let accepted = accepted_from_balancer(&cluster);
    let byes_in: BTreeSet<String> = report(&cluster, "proxy-2.report", "bye-in")
        .into_iter()
        .map(|w| w[1].clone())
        .filter(|c| sent.contains(c))
        .collect();
    // The backend records the 200 to its own BYE.
    let complete = complete_at_one_backend(&cluster, &sent, &["INVITE", "ACK", "200"]);
    eprintln!(
        "reconnect (requests): {} INVITEs sent on one connection by the first proxy, {} answered \
         and ACKed on it; second proxy up {restarted:?} after the first started; it accepted {} \
         connection(s) from {accepted:?}; {} BYEs from the backends on them, answered 200; \
         {complete} calls with INVITE, ACK and the 200 to their BYE at one backend",
        sent.len(),
        answered.len(),
        accepted.len(),
        byes_in.len(),
    );
    assert_eq!(
        answered.len(),
        PROXY_CALLS,
        "every call answered on the first connection"
    );
    assert_eq!(
        byes_in.len(),
        PROXY_CALLS,
        "backend BYEs on the new connection"
    );
    assert_eq!(complete, PROXY_CALLS, "calls complete at one backend");
}
