//! End-to-end tests of Viaduct with real parts: the `viaduct` binary, demo
//! backends, SIPp clients and servers, and containers built from our own
//! binaries. The tests live in `tests/tests/`; this library holds what every
//! crate's socket-level tests share:
//!
//! * [`bin`]: the path of one of the workspace's binaries, built on demand
//!   in the test's own profile;
//! * [`free_port`]: a port free on a given loopback address;
//! * [`Viaduct`]: a balancer process on its own 127.0.0.x address, with its
//!   config in a temporary folder, its log kept (and printed if the test
//!   fails), killed on drop, restartable on the same ports;
//! * [`containers`]: the balancer, demo backends and SIPp each in a
//!   container on a private network (images from `ci/images.sh`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Test support drives processes: it may read clocks and spawn.
#![allow(clippy::disallowed_methods)]

pub mod containers;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The path of binary `bin` of workspace package `package`, built once per
/// test process (debug or release as the test itself).
///
/// Panics with cargo's message if the build fails: a test cannot go on.
pub fn bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(format!("{package}/{bin}"))
        .or_insert_with(|| {
            // `--workspace` (not `-p`): every binary is built with the
            // workspace's unified features, so one build serves them all and
            // `ci/test.sh`'s `cargo build --workspace --bins` is reused.
            let run = escargot::CargoBuild::new()
                .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
                .arg("--workspace")
                .bin(bin)
                .current_release()
                .run()
                .unwrap_or_else(|e| panic!("cannot build {package}/{bin}: {e}"));
            run.path().to_path_buf()
        })
        .clone()
}

/// A demo backend's `--record` file: `(Call-ID, method or status)` per
/// message it handled, in order (empty if it wrote none yet).
pub fn read_record(path: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(c, m)| (c.to_owned(), m.to_owned()))
        })
        .collect()
}

/// A port free on `ip` for both UDP and TCP right now, not in `taken`.
pub fn free_port(ip: &str, taken: &[u16]) -> u16 {
    conformance::target::free_port(ip, taken).unwrap_or_else(|e| panic!("free port on {ip}: {e}"))
}

/// A `viaduct` balancer process for a test.
#[derive(Debug)]
pub struct Viaduct {
    child: Option<Child>,
    sip: SocketAddr,
    agents: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Viaduct {
    /// Starts a balancer serving SIP (UDP and TCP) and agents on `ip`, with
    /// cluster secret `secret`; `extra` is appended to its TOML config
    /// (e.g. a `[routing]` section). Waits until it listens.
    pub fn start(ip: &str, secret: &[u8], extra: &str) -> Viaduct {
        let sip_port = free_port(ip, &[]);
        let agent_port = free_port(ip, &[sip_port]);
        let admin_port = free_port(ip, &[sip_port, agent_port]);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(dir.path().join(name), bytes)
                .unwrap_or_else(|e| panic!("writing {name}: {e}"));
        };
        write("secret", secret);
        let config = dir.path().join("viaduct.toml");
        // An admin listener of its own unless the test configures one.
        let admin = if extra.contains("[admin]") {
            String::new()
        } else {
            format!("[admin]\nlisten = \"{ip}:{admin_port}\"\n")
        };
        write(
            "viaduct.toml",
            format!(
                "[[sip.listen]]\ntransport = \"udp\"\naddress = \"{ip}:{sip_port}\"\n\
                 [[sip.listen]]\ntransport = \"tcp\"\naddress = \"{ip}:{sip_port}\"\n\
                 [agents]\nlisten = \"{ip}:{agent_port}\"\nsecret_file = \"secret\"\n\
                 {admin}{extra}\n"
            )
            .as_bytes(),
        );
        let mut v = Viaduct {
            child: None,
            sip: SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), sip_port),
            agents: SocketAddr::new(
                ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")),
                agent_port,
            ),
            admin: SocketAddr::new(
                ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")),
                admin_port,
            ),
            config,
            log: Arc::new(Mutex::new(Vec::new())),
            dir,
        };
        v.spawn();
        v
    }

    fn spawn(&mut self) {
        let mut child = Command::new(bin("balancer", "viaduct"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("VIADUCT_LOG", "info,balancer=debug")
            .env_remove("VIADUCT_SECRET")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start viaduct: {e}"));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child
            .stderr
            .take()
            .unwrap_or_else(|| unreachable!("stderr is piped"));
        let sink = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening for agents") {
                    let _ = ready_tx.send(());
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        self.child = Some(child);
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!(
                "viaduct did not start listening:\n{}",
                self.log().join("\n")
            );
        }
    }

    /// The SIP address (UDP and TCP).
    pub fn sip(&self) -> SocketAddr {
        self.sip
    }

    /// The agent address.
    pub fn agents(&self) -> SocketAddr {
        self.agents
    }

    /// The admin HTTP address (metrics and API).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The folder holding its config and secret.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Its log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Kills the process (SIGKILL): no goodbye, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts it again on the same addresses with the same config.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Viaduct {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            for line in self.log() {
                eprintln!("viaduct| {line}");
            }
        }
    }
}

/// A SIP peer over TCP (a proxy or UA) for tests: sends verbatim text,
/// receives framed messages, every wait bounded.
#[derive(Debug)]
pub struct SipTcp {
    stream: tokio::net::TcpStream,
    framer: encap_proto::sip::StreamFramer,
    buf: bytes::BytesMut,
}

impl SipTcp {
    /// Connects from `local_ip` (a 127.0.0.x of the test's own) to `to`.
    pub async fn connect(local_ip: &str, to: SocketAddr) -> SipTcp {
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
        let local: SocketAddr = format!("{local_ip}:0")
            .parse()
            .unwrap_or_else(|e| panic!("{local_ip}: {e}"));
        socket
            .bind(local)
            .unwrap_or_else(|e| panic!("bind {local}: {e}"));
        let stream = socket
            .connect(to)
            .await
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        SipTcp::from_stream(stream)
    }

    /// Wraps an accepted connection.
    pub fn from_stream(stream: tokio::net::TcpStream) -> SipTcp {
        SipTcp {
            stream,
            framer: encap_proto::sip::StreamFramer::new(encap_proto::sip::Limits::default()),
            buf: bytes::BytesMut::new(),
        }
    }

    /// Our address on this connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"))
    }

    /// Sends `text` as is.
    pub async fn send(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(text.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// The next SIP message, or `None` if none comes within `within`
    /// (or the connection closed).
    pub async fn recv_within(&mut self, within: Duration) -> Option<encap_proto::sip::SipMessage> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.framer.decode(&mut self.buf) {
                Ok(Some(encap_proto::sip::Framed::Message(m))) => {
                    return Some(
                        encap_proto::sip::SipMessage::parse(m)
                            .unwrap_or_else(|e| panic!("received SIP does not scan: {e}")),
                    )
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => panic!("received stream does not frame: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Err(_) => return None,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("read: {e}"),
            }
        }
    }

    /// The next SIP message; panics after 5 s.
    pub async fn recv(&mut self) -> encap_proto::sip::SipMessage {
        self.recv_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("no SIP message within 5 s"))
    }
}

/// A `viaduct-demo-backend` process whose agent dials a balancer; it
/// records every message it receives (`<Call-ID> <method or status>`).
#[derive(Debug)]
pub struct DemoBackend {
    child: Child,
    name: String,
    record: PathBuf,
}

impl DemoBackend {
    /// Starts backend `name` for the balancer `lb` (same secret), recording
    /// into `lb`'s folder; `extra` are more command-line arguments.
    pub fn start(name: &str, lb: &Viaduct, extra: &[&str]) -> DemoBackend {
        let record = lb.dir().join(format!("{name}.record"));
        let child = Command::new(bin("viaduct-demo-backend", "viaduct-demo-backend"))
            .args([
                "--name",
                name,
                "--balancer",
                &lb.agents().to_string(),
                "--stats-ms",
                "100",
            ])
            .arg("--secret-file")
            .arg(lb.dir().join("secret"))
            .arg("--record")
            .arg(&record)
            .args(extra)
            .env("VIADUCT_LOG", "warn")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start demo backend {name}: {e}"));
        DemoBackend {
            child,
            name: name.to_owned(),
            record,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it recorded so far: `(Call-ID, method or status)` per message.
    pub fn record(&self) -> Vec<(String, String)> {
        read_record(&self.record)
    }

    /// Kills it (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Viaduct {
    /// Waits until `n` backends are up (the balancer logs each), or panics
    /// after `within`.
    pub fn wait_backends(&self, n: usize, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let up = self
                .log()
                .iter()
                .filter(|l| l.contains("backend up"))
                .count();
            if up >= n {
                return;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "only {up} of {n} backends came up:\n{}",
                    self.log().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The SIPp scenarios of the repository (`tests/sipp/`).
pub fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sipp")
        .join(name)
}

/// Runs SIPp (`sip-tester`, installed by `ci/install.sh`) with `args`, in
/// the foreground, bounded by `-timeout`; returns its exit status and its
/// final statistics screen.
pub fn sipp(args: &[&str], timeout_secs: u64) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let screen = dir.path().join("screen.log");
    let out = Command::new("sipp")
        .args(args)
        .args(["-nostdin", "-timeout", &format!("{timeout_secs}s"), "-timeout_error", "-trace_screen", "-screen_file"])
        .arg(&screen)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run sipp ({e}): install it with `bash ci/install.sh` (Debian package sip-tester)"));
    let text = std::fs::read_to_string(&screen).unwrap_or_default();
    (
        out.status,
        format!("{text}\n{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// The value of a counter line of SIPp's final screen, e.g.
/// `Successful call` or `Failed call` (the cumulative column).
pub fn sipp_count(screen: &str, what: &str) -> u64 {
    screen
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with(what))
        .and_then(|l| l.rsplit('|').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{what}` in the SIPp screen:\n{screen}"))
}
