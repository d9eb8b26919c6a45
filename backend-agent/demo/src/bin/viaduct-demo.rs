//! `viaduct-demo`: the whole product on one machine, for a first look.
//!
//! It builds (through cargo) and starts the real `viaduct` balancer and
//! three `viaduct-demo-backend` processes on loopback ports of its own,
//! then a call load: SIPp (`tests/sipp/uac_call.xml`) when `sipp` is
//! installed, else a small built-in SIP UAC over UDP. Every second it shows
//! a table of calls per backend, counted from the backends' own records,
//! and the affinity errors (calls whose messages reached more than one
//! backend: there must be none). After `--seconds` of load it waits for the
//! calls in progress, prints the final table, stops every process by its
//! PID (SIGTERM, then SIGKILL after 3 s) and exits: 0 when every call
//! completed at exactly one backend.
//!
//! ```text
//! cargo run --release -p viaduct-demo-backend --bin viaduct-demo [-- --seconds 20 --rate 50 --load auto|sipp|builtin]
//! ```
#![allow(clippy::disallowed_methods)] // a binary: it reads clocks and spawns

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

/// The SIPp scenario of the end-to-end tests: INVITE, 200, ACK, BYE to the
/// tagged Contact.
const SIPP_SCENARIO: &str = include_str!("../../../../tests/sipp/uac_call.xml");
/// The demo's cluster secret (loopback only).
const SECRET: &str = "viaduct demo secret (loopback only)";
const BACKENDS: [&str; 3] = ["backend-1", "backend-2", "backend-3"];

#[derive(Debug, Parser)]
#[command(
    name = "viaduct-demo",
    version,
    about = "Balancer + three demo backends + a call load, with a live table"
)]
struct Cli {
    /// Seconds of load; then the demo waits for the calls in progress and stops.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// New calls per second.
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// How long each call stays up, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    hold_ms: u64,
    /// The load generator.
    #[arg(long, value_enum, default_value_t = Load::Auto)]
    load: Load,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Load {
    /// SIPp if `sipp` is on the PATH, else the built-in UAC.
    Auto,
    /// SIPp (Debian package `sip-tester`).
    Sipp,
    /// The built-in UAC (SIP over UDP).
    Builtin,
}

/// The processes the demo started; each is stopped by its PID on drop.
#[derive(Debug, Default)]
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        self.0.push((name.to_owned(), child));
        Ok(pid)
    }

    /// SIGTERM to each PID, then SIGKILL to those still running after 3 s.
    fn stop_all(&mut self) {
        for (_, child) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (name, child) in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!(
                    "viaduct-demo: {name} (pid {}) ignored SIGTERM: killing it",
                    child.id()
                );
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Builds `bin` of workspace package `package` in this binary's profile.
fn build(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let run = escargot::CargoBuild::new()
        .manifest_path(&manifest)
        .package(package)
        .bin(bin)
        .current_release()
        .run()
        .with_context(|| format!("building {package}/{bin}"))?;
    Ok(run.path().to_path_buf())
}

/// A port free for both UDP and TCP on 127.0.0.1, not in `taken`.
fn free_port(taken: &[u16]) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if !taken.contains(&port) && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What the backends recorded, per backend: Call-ID -> messages received.
type Records = BTreeMap<&'static str, HashMap<String, Vec<String>>>;

fn read_records(dir: &Path) -> Records {
    let mut out = Records::new();
    for name in BACKENDS {
        let text = std::fs::read_to_string(dir.join(format!("{name}.record"))).unwrap_or_default();
        let calls = out.entry(name).or_default();
        for line in text.lines() {
            if let Some((call_id, what)) = line.rsplit_once(' ') {
                calls
                    .entry(call_id.to_owned())
                    .or_default()
                    .push(what.to_owned());
            }
        }
    }
    out
}

/// The client's view: calls started, completed, failed.
#[derive(Debug, Default)]
struct ClientCounts {
    started: u64,
    completed: u64,
    failed: u64,
}

/// Renders the table; returns it and the number of affinity errors.
fn render(
    records: &Records,
    client: &ClientCounts,
    elapsed: Duration,
    load: &str,
) -> (String, usize) {
    let mut at: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for (backend, calls) in records {
        for call_id in calls.keys() {
            at.entry(call_id).or_default().insert(backend);
        }
    }
    let split = at.values().filter(|b| b.len() > 1).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "viaduct demo: {:>4.1} s, load: {load}\n",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>9} {:>10} {:>9}",
        "BACKEND", "CALLS", "IN CALL", "COMPLETED", "MESSAGES"
    );
    let (mut calls, mut up, mut done, mut msgs) = (0, 0, 0, 0);
    for (backend, per_call) in records {
        let c = per_call
            .values()
            .filter(|m| m.iter().any(|m| m == "INVITE"))
            .count();
        let d = per_call
            .values()
            .filter(|m| m.iter().any(|m| m == "BYE"))
            .count();
        let n: usize = per_call.values().map(Vec::len).sum();
        let _ = writeln!(
            out,
            "{backend:<10} {c:>7} {:>9} {d:>10} {n:>9}",
            c.saturating_sub(d)
        );
        calls += c;
        up += c.saturating_sub(d);
        done += d;
        msgs += n;
    }
    let _ = writeln!(out, "{}", "-".repeat(49));
    let _ = writeln!(
        out,
        "{:<10} {calls:>7} {up:>9} {done:>10} {msgs:>9}\n",
        "TOTAL"
    );
    let _ = writeln!(
        out,
        "client: {} calls started, {} completed, {} failed",
        client.started, client.completed, client.failed
    );
    let _ = writeln!(
        out,
        "affinity errors (a call's messages at more than one backend): {split}"
    );
    (out, split)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let load = match cli.load {
        Load::Auto if sipp_installed() => Load::Sipp,
        Load::Auto => Load::Builtin,
        l => l,
    };
    eprintln!("viaduct-demo: building viaduct and viaduct-demo-backend ...");
    let viaduct = build("balancer", "viaduct")?;
    let backend = build("viaduct-demo-backend", "viaduct-demo-backend")?;

    let dir = tempfile::tempdir().context("temporary folder")?;
    let sip_port = free_port(&[])?;
    let agent_port = free_port(&[sip_port])?;
    let admin_port = free_port(&[sip_port, agent_port])?;
    let sip: SocketAddr = ([127, 0, 0, 1], sip_port).into();
    std::fs::write(dir.path().join("secret"), SECRET)?;
    let config = dir.path().join("viaduct.toml");
    std::fs::write(
        &config,
        format!(
            "[[sip.listen]]\ntransport = \"udp\"\naddress = \"{sip}\"\n\
             [[sip.listen]]\ntransport = \"tcp\"\naddress = \"{sip}\"\n\
             [agents]\nlisten = \"127.0.0.1:{agent_port}\"\nsecret_file = \"secret\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
        ),
    )?;

    let mut procs = Processes::default();
    let lb_log = dir.path().join("viaduct.log");
    let pid = procs.spawn(
        "viaduct",
        Command::new(&viaduct)
            .args(["run", "--config"])
            .arg(&config)
            .env("VIADUCT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&lb_log)?),
    )?;
    eprintln!("viaduct-demo: viaduct (pid {pid}) SIP on {sip} (UDP, TCP), agents on 127.0.0.1:{agent_port}, admin http://127.0.0.1:{admin_port}");
    wait_until(
        "viaduct listening for agents",
        Duration::from_secs(20),
        || TcpStream::connect(("127.0.0.1", agent_port)).is_ok(),
    )?;
    for name in BACKENDS {
        let pid = procs.spawn(
            name,
            Command::new(&backend)
                .args(["--name", name, "--balancer"])
                .arg(format!("127.0.0.1:{agent_port}"))
                .arg("--secret-file")
                .arg(dir.path().join("secret"))
                .arg("--record")
                .arg(dir.path().join(format!("{name}.record")))
                .args(["--stats-ms", "200"])
                .env("VIADUCT_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(
                    dir.path().join(format!("{name}.log")),
                )?),
        )?;
        eprintln!("viaduct-demo: {name} (pid {pid})");
    }
    wait_until("three backends up", Duration::from_secs(20), || {
        std::fs::read_to_string(&lb_log)
            .unwrap_or_default()
            .matches("backend up")
            .count()
            >= BACKENDS.len()
    })?;

    let calls = cli.rate * cli.seconds;
    let client = Arc::new(Mutex::new(ClientCounts::default()));
    let started = Instant::now();
    let load_name;
    let builtin = match load {
        Load::Sipp => {
            load_name = format!("SIPp, {} calls/s UDP, {} ms each", cli.rate, cli.hold_ms);
            let scenario = dir.path().join("uac_call.xml");
            std::fs::write(&scenario, SIPP_SCENARIO)?;
            let pid = procs.spawn(
                "sipp",
                Command::new("sipp")
                    .arg(sip.to_string())
                    .arg("-sf")
                    .arg(&scenario)
                    .args(["-i", "127.0.0.1", "-p", "0", "-t", "u1", "-nostdin"])
                    .args(["-m", &calls.to_string(), "-r", &cli.rate.to_string()])
                    .args(["-d", &cli.hold_ms.to_string(), "-recv_timeout", "5000"])
                    .args(["-timeout", &format!("{}s", cli.seconds + 30)])
                    .args(["-trace_stat", "-fd", "1", "-stf"])
                    .arg(dir.path().join("sipp.csv"))
                    .current_dir(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?;
            eprintln!("viaduct-demo: sipp (pid {pid})");
            None
        }
        _ => {
            load_name = format!(
                "built-in UAC, {} calls/s UDP, {} ms each",
                cli.rate, cli.hold_ms
            );
            let counts = client.clone();
            let (rate, hold) = (cli.rate, Duration::from_millis(cli.hold_ms));
            Some(std::thread::spawn(move || {
                uac::run(sip, calls, rate, hold, &counts)
            }))
        }
    };

    // The live table, until the load is done (bounded either way).
    let tty = std::io::stdout().is_terminal();
    let hard_stop = started + Duration::from_secs(cli.seconds + 30);
    let csv = dir.path().join("sipp.csv");
    let snapshot = || {
        if builtin.is_none() {
            *client.lock().unwrap_or_else(|p| p.into_inner()) = sipp_counts(&csv);
        }
        let counts = client.lock().unwrap_or_else(|p| p.into_inner());
        let (table, split) = render(
            &read_records(dir.path()),
            &counts,
            started.elapsed(),
            &load_name,
        );
        (table, split, counts.completed + counts.failed >= calls)
    };
    let show = |table: &str| -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if tty {
            write!(stdout, "\x1b[2J\x1b[H{table}")?;
        } else {
            writeln!(stdout, "{table}")?;
        }
        stdout.flush()
    };
    let affinity_errors = loop {
        std::thread::sleep(Duration::from_secs(1));
        let (table, _, finished) = snapshot();
        show(&table)?;
        let sipp_exited = procs
            .0
            .iter_mut()
            .any(|(n, c)| n == "sipp" && !matches!(c.try_wait(), Ok(None)));
        if finished || sipp_exited || Instant::now() >= hard_stop {
            // A last look once the backends flushed their records.
            std::thread::sleep(Duration::from_millis(500));
            let (table, split, _) = snapshot();
            show(&table)?;
            break split;
        }
    };
    procs.stop_all();
    if let Some(handle) = builtin {
        let _ = handle.join();
    }
    let counts = client.lock().unwrap_or_else(|p| p.into_inner());
    eprintln!("viaduct-demo: every process stopped");
    if affinity_errors > 0 || counts.failed > 0 || counts.completed < calls {
        bail!(
            "{} of {calls} calls completed, {} failed, {affinity_errors} affinity errors",
            counts.completed,
            counts.failed
        );
    }
    Ok(())
}

fn sipp_installed() -> bool {
    Command::new("sipp")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The cumulative counters of the last line of SIPp's `-trace_stat` file.
fn sipp_counts(csv: &Path) -> ClientCounts {
    let text = std::fs::read_to_string(csv).unwrap_or_default();
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return ClientCounts::default();
    };
    let Some(last) = lines.rfind(|l| !l.trim().is_empty()) else {
        return ClientCounts::default();
    };
    let names: Vec<&str> = header.split(';').collect();
    let values: Vec<&str> = last.split(';').collect();
    let get = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    ClientCounts {
        started: get("TotalCallCreated"),
        completed: get("SuccessfulCall(C)"),
        failed: get("FailedCall(C)"),
    }
}

/// The built-in load: a small SIP UAC over UDP (INVITE, 200, ACK, hold,
/// BYE, 200), with retransmissions every 500 ms and a 5 s bound per
/// transaction. In-dialog requests go to the Contact of the 200, which
/// carries the affinity tag.
mod uac {
    use super::*;
    use tokio::sync::mpsc;

    type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<encap_proto::sip::SipMessage>>>>;

    pub(super) fn run(
        lb: SocketAddr,
        calls: u64,
        rate: u64,
        hold: Duration,
        counts: &Arc<Mutex<ClientCounts>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("viaduct-demo: cannot start the UAC runtime: {e}");
                return;
            }
        };
        runtime.block_on(async move {
            let socket = match tokio::net::UdpSocket::bind("127.0.0.1:0").await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    eprintln!("viaduct-demo: UAC socket: {e}");
                    return;
                }
            };
            let waiters: Waiters = Arc::default();
            let reader = {
                let (socket, waiters) = (socket.clone(), waiters.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = socket.recv(&mut buf).await {
                        let Ok(msg) = encap_proto::sip::SipMessage::parse(
                            bytes::Bytes::copy_from_slice(&buf[..n]),
                        ) else {
                            continue;
                        };
                        let call_id =
                            String::from_utf8_lossy(msg.call_id().unwrap_or_default()).into_owned();
                        let tx = waiters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&call_id)
                            .cloned();
                        if let Some(tx) = tx {
                            let _ = tx.send(msg);
                        }
                    }
                })
            };
            if let Err(e) = socket.connect(lb).await {
                eprintln!("viaduct-demo: UAC connect: {e}");
                return;
            }
            let seq = AtomicU64::new(0);
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let mut tasks = Vec::new();
            for _ in 0..calls {
                tick.tick().await;
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let (socket, waiters, counts) = (socket.clone(), waiters.clone(), counts.clone());
                counts.lock().unwrap_or_else(|p| p.into_inner()).started += 1;
                tasks.push(tokio::spawn(async move {
                    let ok = call(&socket, &waiters, n, hold).await;
                    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                    if ok {
                        c.completed += 1;
                    } else {
                        c.failed += 1;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            reader.abort();
        });
    }

    /// One call; true when it completed (200 to the INVITE and to the BYE).
    async fn call(
        socket: &tokio::net::UdpSocket,
        waiters: &Waiters,
        n: u64,
        hold: Duration,
    ) -> bool {
        let me = match socket.local_addr() {
            Ok(a) => a,
            Err(_) => return false,
        };
        let lb = match socket.peer_addr() {
            Ok(a) => a,
            Err(_) => return false,
        };
        let call_id = format!("demo-{n}-{}@{}", std::process::id(), me.ip());
        let (tx, mut rx) = mpsc::unbounded_channel();
        waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(call_id.clone(), tx);
        let from = format!("<sip:demo@{me}>;tag=uac{n}");
        let invite = format!(
            "INVITE sip:demo@{lb} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-inv{n};rport\r\n\
             Max-Forwards: 70\r\nFrom: {from}\r\nTo: <sip:demo@{lb}>\r\nCall-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\nContact: <sip:demo@{me}>\r\nContent-Length: 0\r\n\r\n"
        );
        let ok = match transaction(socket, &mut rx, &invite).await {
            Some(ok) if ok.status() == Some(200) => ok,
            _ => {
                waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&call_id);
                return false;
            }
        };
        let target = ok
            .contact()
            .map(|c| String::from_utf8_lossy(c.uri.raw).into_owned())
            .unwrap_or_else(|| format!("sip:demo@{lb}"));
        let to = ok
            .header("To")
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        let in_dialog = |method: &str, cseq: u32, branch: &str| {
            format!(
                "{method} {target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{branch}{n};rport\r\n\
                 Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
                 CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
            )
        };
        let _ = socket.send(in_dialog("ACK", 1, "ack").as_bytes()).await;
        tokio::time::sleep(hold).await;
        let bye = transaction(socket, &mut rx, &in_dialog("BYE", 2, "bye")).await;
        waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&call_id);
        bye.is_some_and(|r| r.status() == Some(200))
    }

    /// Sends `request` (again every 500 ms) until a final response, at most 5 s.
    async fn transaction(
        socket: &tokio::net::UdpSocket,
        rx: &mut mpsc::UnboundedReceiver<encap_proto::sip::SipMessage>,
        request: &str,
    ) -> Option<encap_proto::sip::SipMessage> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut provisional = false;
        loop {
            if !provisional {
                let _ = socket.send(request.as_bytes()).await;
            }
            let retransmit =
                (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
            loop {
                match tokio::time::timeout_at(retransmit, rx.recv()).await {
                    Ok(Some(msg)) => match msg.status() {
                        Some(s) if s >= 200 => return Some(msg),
                        Some(_) => provisional = true,
                        None => {}
                    },
                    Ok(None) => return None,
                    Err(_) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
    }
}
