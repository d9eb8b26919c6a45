//! SIPp through the real `viaduct` binary to three SIPp UAS processes as
//! plain SIP backends (a `mode = "sip"` pool: the balancer is their
//! stateless proxy, design.md §7), over UDP and TCP. Every call must
//! complete, and every call's INVITE, ACK and BYE must reach exactly one
//! backend: checked from the backends' own message traces, not assumed.
//! The backends answer the balancer's OPTIONS probes (`-aa`).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive processes

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use viaduct_tests::{free_port, scenario, sipp, sipp_count, Viaduct};

const SECRET: &[u8] = b"sipp plain-mode secret";

/// A SIPp UAS process (`tests/sipp/uas_plain.xml`) tracing every message
/// it receives; killed on drop.
struct Uas {
    child: Child,
    trace: PathBuf,
    _dir: tempfile::TempDir,
}

impl Uas {
    /// `lost`: the percentage of first INVITE copies it ignores.
    fn start(ip: &str, port: u16, transport: &str, lost: u32) -> Uas {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(scenario("uas_plain.xml")).unwrap();
        let sf = dir.path().join("uas.xml");
        std::fs::write(&sf, text.replace("lost=\"0\"", &format!("lost=\"{lost}\""))).unwrap();
        let trace = dir.path().join("uas.msg");
        let child = Command::new("sipp")
            .arg("-sf")
            .arg(&sf)
            .args(["-i", ip, "-p", &port.to_string(), "-t", transport])
            .args(["-aa", "-nostdin", "-trace_msg", "-message_file"])
            .arg(&trace)
            .args(["-max_socket", "4096"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sipp ({e}): bash ci/install.sh"));
        Uas {
            child,
            trace,
            _dir: dir,
        }
    }

    /// `(method, Call-ID)` of every request received (probes left out).
    fn requests(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.trace).unwrap_or_default();
        text.split("message received")
            .skip(1)
            .filter_map(|chunk| {
                let body = chunk.split_once("\n\n")?.1;
                let method = body.trim_start().split(' ').next()?.to_owned();
                let call_id = body.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    let n = name.trim();
                    (n.eq_ignore_ascii_case("call-id") || n == "i").then(|| value.trim().to_owned())
                })?;
                (method != "OPTIONS" && !method.starts_with("SIP/")).then_some((method, call_id))
            })
            .collect()
    }
}

impl Drop for Uas {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    lb_ip: &'static str,
    uas_ips: [&'static str; 3],
    client_ip: &'static str,
    /// `"udp"` or `"tcp"`: how the balancer reaches the backends.
    members: &'static str,
    /// SIPp `-t` of the client.
    client: &'static str,
    calls: u64,
    rate: u64,
    /// Percentage of first INVITE copies the backends ignore.
    lost: u32,
}

/// Runs the calls; returns, per call, how many INVITE copies its backend saw.
fn run(r: &Run) -> BTreeMap<String, usize> {
    let ports: Vec<u16> = r.uas_ips.iter().map(|ip| free_port(ip, &[])).collect();
    let uas_t = if r.members == "tcp" { "t1" } else { "u1" };
    let backends: Vec<Uas> = r
        .uas_ips
        .iter()
        .zip(&ports)
        .map(|(ip, port)| Uas::start(ip, *port, uas_t, r.lost))
        .collect();
    let members: Vec<String> = r
        .uas_ips
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (ip, port))| {
            format!(
                "{{ address = \"{ip}:{port}\", transport = \"{}\", name = \"uas{i}\" }}",
                r.members
            )
        })
        .collect();
    let lb = Viaduct::start(
        r.lb_ip,
        SECRET,
        &format!(
            "[routing]\ndefault_pool = \"plain\"\n\
             [[pools]]\nname = \"plain\"\nmode = \"sip\"\nprobe_interval_ms = 500\n\
             members = [{}]\n",
            members.join(", ")
        ),
    );
    lb.wait_backends(3, Duration::from_secs(30));
    // Let the backends' listeners come up and answer a probe or two.
    std::thread::sleep(Duration::from_millis(700));

    let target = lb.sip().to_string();
    let uac = scenario("uac_plain.xml");
    let recv_timeout = if r.lost > 0 { "32000" } else { "5000" };
    let (status, screen) = sipp(
        &[
            &target,
            "-sf",
            uac.to_str().unwrap(),
            "-i",
            r.client_ip,
            "-p",
            "0",
            "-t",
            r.client,
            "-m",
            &r.calls.to_string(),
            "-r",
            &r.rate.to_string(),
            "-l",
            "200",
            "-d",
            "50",
            "-recv_timeout",
            recv_timeout,
            "-max_socket",
            "4096",
        ],
        120,
    );
    let ok = sipp_count(&screen, "Successful call");
    let failed = sipp_count(&screen, "Failed call");
    assert_eq!((ok, failed), (r.calls, 0), "SIPp exit {status}:\n{screen}");
    assert!(status.success(), "SIPp exit {status}:\n{screen}");
    std::thread::sleep(Duration::from_millis(300));

    // From the backends' side: each call at one backend, all of it there.
    let mut at: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    let mut methods: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, b) in backends.iter().enumerate() {
        for (method, call_id) in b.requests() {
            at.entry(call_id.clone()).or_default().insert(i);
            *methods.entry((call_id, method)).or_default() += 1;
        }
    }
    assert_eq!(at.len() as u64, r.calls, "every call reached a backend");
    let split: Vec<_> = at.iter().filter(|(_, b)| b.len() != 1).collect();
    assert!(split.is_empty(), "calls split over backends: {split:?}");
    for call_id in at.keys() {
        for m in ["INVITE", "ACK", "BYE"] {
            assert!(
                methods.contains_key(&(call_id.clone(), m.to_owned())),
                "{call_id}: no {m} at its backend"
            );
        }
    }
    for i in 0..backends.len() {
        let mine = at.values().filter(|s| s.contains(&i)).count() as u64;
        assert!(
            mine > r.calls / 10,
            "backend {i} took only {mine} of {} calls",
            r.calls
        );
    }
    // No backend went down under load (the probes kept being answered).
    assert!(
        !lb.log().iter().any(|l| l.contains("backend down")),
        "{}",
        lb.log().join("\n")
    );
    at.keys()
        .map(|c| (c.clone(), methods[&(c.clone(), "INVITE".to_owned())]))
        .collect()
}

#[test]
fn udp_calls_through_the_stateless_proxy_stay_on_one_backend() {
    run(&Run {
        lb_ip: "127.0.0.131",
        uas_ips: ["127.0.0.132", "127.0.0.133", "127.0.0.134"],
        client_ip: "127.0.0.135",
        members: "udp",
        client: "u1",
        calls: 300,
        rate: 100,
        lost: 0,
    });
}

#[test]
fn tcp_calls_through_the_stateless_proxy_stay_on_one_backend() {
    run(&Run {
        lb_ip: "127.0.0.141",
        uas_ips: ["127.0.0.142", "127.0.0.143", "127.0.0.144"],
        client_ip: "127.0.0.145",
        members: "tcp",
        client: "t1",
        calls: 300,
        rate: 100,
        lost: 0,
    });
}

/// TCP in, UDP out: the balancer Record-Routes twice (RFC 5658) and takes
/// both entries off the in-dialog requests.
#[test]
fn tcp_client_to_udp_backends_double_record_route() {
    run(&Run {
        lb_ip: "127.0.0.151",
        uas_ips: ["127.0.0.152", "127.0.0.153", "127.0.0.154"],
        client_ip: "127.0.0.155",
        members: "udp",
        client: "t1",
        calls: 200,
        rate: 100,
        lost: 0,
    });
}

/// The backends ignore a fifth of the first INVITE copies: those calls
/// complete only because the client's retransmission reached the same
/// backend (same stateless branch, same new-call table entry).
#[test]
fn udp_retransmissions_reach_the_same_backend() {
    let invites = run(&Run {
        lb_ip: "127.0.0.161",
        uas_ips: ["127.0.0.162", "127.0.0.163", "127.0.0.164"],
        client_ip: "127.0.0.165",
        members: "udp",
        client: "u1",
        calls: 100,
        rate: 50,
        lost: 20,
    });
    let retransmitted = invites.values().filter(|&&n| n >= 2).count();
    assert!(
        retransmitted >= 5,
        "only {retransmitted} calls needed a retransmission: {invites:?}"
    );
}
