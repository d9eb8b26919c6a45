//! The balancer under test: a `viaduct` process per trace, on free ports,
//! with its config in a temporary folder, killed on drop.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The cluster secret the runner gives the balancer and its agents.
pub const SECRET: &[u8] = b"viaduct conformance cluster secret";

/// Ports handed out by [`free_port`]: below Linux's ephemeral range
/// (32768-60999), so no outgoing connection or `bind(0)` of another process
/// takes one between our check and the balancer's bind.
pub const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port in [`TEST_PORTS`] free on `ip` for both UDP and TCP right now, not
/// in `taken`. Drawn at random so parallel runs rarely draw the same one;
/// [`Viaduct::start`] retries when one is taken all the same.
pub fn free_port(ip: &str, taken: &[u16]) -> std::io::Result<u16> {
    use rand::RngExt as _;
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(TEST_PORTS);
        if !taken.contains(&port) && free_port_is(ip, port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {TEST_PORTS:?} on {ip} after 1000 draws"),
    ))
}

/// Whether `port` is free on `ip` for both UDP and TCP right now.
pub fn free_port_is(ip: &str, port: u16) -> bool {
    TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok()
}

/// Merges `extra` into `base`, tables recursively, `extra` winning.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A running `viaduct`.
#[derive(Debug)]
pub struct Viaduct {
    child: Option<Child>,
    /// Its SIP address (UDP and TCP).
    pub sip: SocketAddr,
    /// Its agent address.
    pub agents: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Viaduct {
    /// Starts `bin` on `ip` with the runner's base configuration, agent ids
    /// `ids` (name, id) and the `extras` TOML merged in, in order (the
    /// runner's, then the trace's); waits until it listens for agents.
    pub fn start(
        bin: &Path,
        ip: &str,
        ids: &[(String, u16)],
        extras: &[&str],
    ) -> Result<Viaduct, String> {
        // Another process may bind a port between our check and the
        // balancer's bind: draw new ports and try again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Viaduct::start_once(bin, ip, ids, extras) {
                Err(e) if attempt < 5 && e.contains("Address already in use") => continue,
                other => return other,
            }
        }
    }

    fn start_once(
        bin: &Path,
        ip: &str,
        ids: &[(String, u16)],
        extras: &[&str],
    ) -> Result<Viaduct, String> {
        let io = |e: std::io::Error| e.to_string();
        let sip_port = free_port(ip, &[]).map_err(io)?;
        let agent_port = free_port(ip, &[sip_port]).map_err(io)?;
        let admin_port = free_port(ip, &[sip_port, agent_port]).map_err(io)?;
        let dir = tempfile::tempdir().map_err(io)?;
        std::fs::write(dir.path().join("secret"), SECRET).map_err(io)?;
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let mut ids_toml = String::new();
        for (name, id) in ids {
            ids_toml.push_str(&format!("\"{name}\" = {id}\n"));
        }
        let base = format!(
            "[sip]\nidle_timeout_secs = 60\n\
             [[sip.listen]]\ntransport = \"udp\"\naddress = \"{host}:{sip_port}\"\n\
             [[sip.listen]]\ntransport = \"tcp\"\naddress = \"{host}:{sip_port}\"\n\
             [agents]\nlisten = \"{host}:{agent_port}\"\nsecret_file = \"secret\"\n\
             [agents.ids]\n{ids_toml}\
             [admin]\nlisten = \"{host}:{admin_port}\"\n\
             [routing]\n# simulated agents send no load reports\nreport_interval_ms = 60000\n"
        );
        let mut table: toml::Table = base.parse().map_err(|e| format!("base config: {e}"))?;
        for extra in extras {
            let extra: toml::Table = extra
                .parse()
                .map_err(|e| format!("the trace's config: {e}"))?;
            merge(&mut table, extra);
        }
        let config = dir.path().join("viaduct.toml");
        std::fs::write(&config, table.to_string()).map_err(io)?;
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("VIADUCT_LOG", "info,balancer=debug")
            .env_remove("VIADUCT_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("listening for agents") {
                        let _ = ready_tx.send(());
                    }
                    sink.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(strip_ansi(&line));
                }
            });
        }
        let parse = |port: u16| -> Result<SocketAddr, String> {
            format!("{host}:{port}").parse().map_err(|e| format!("{e}"))
        };
        let v = Viaduct {
            child: Some(child),
            sip: parse(sip_port)?,
            agents: parse(agent_port)?,
            log,
            _dir: dir,
        };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            return Err(format!(
                "viaduct did not start listening:\n{}",
                v.log().join("\n")
            ));
        }
        Ok(v)
    }

    /// Its log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Viaduct {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds the `viaduct` binary when no `--bin` is given: beside this
/// executable (the same cargo target folder, or its parent for tests and
/// examples), else on `PATH`.
pub fn find_viaduct() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(format!("viaduct{}", std::env::consts::EXE_SUFFIX));
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("viaduct"))
            .find(|p| p.is_file())
    })
}

/// The text without ANSI escape sequences (the balancer colours its log).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ params final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
