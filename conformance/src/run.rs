//! Plays a trace against a balancer: one tokio runtime per trace, a task
//! per socket feeding one event queue, the steps run in order.
//!
//! Matching and assertions are pure ([`crate::check`]); this module only
//! moves bytes and waits.

// The runner drives sockets and processes: it reads the clock and spawns.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use encap_proto::frame::auth::{AgentHandshake, AgentStep, HandshakeError};
use encap_proto::frame::{
    encode, DrainState, Frame, FrameCodec, SipFromBackend, Transport, DEFAULT_MAX_BODY,
};
use encap_proto::sip::{frame_datagram, Framed, Limits, SipMessage, StreamFramer, Uri};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use crate::check::{check, substitute, substitute_str, Checked, FrameMeta, Received, Vars};
use crate::render;
use crate::target::{Viaduct, SECRET};
use crate::trace::{ActorKind, Addressing, Endpoint, ExpectKind, Mode, Net, Payload, Step, Trace};

/// How long the runner watches for stray messages at the end, and the
/// default of `quiet`.
pub const QUIET: Duration = Duration::from_millis(300);

/// What the traces run against.
#[derive(Debug, Clone)]
pub enum Target {
    /// The `viaduct` binary, a fresh one per trace, backends simulated as
    /// agents: the `agent` traces.
    Viaduct {
        /// The binary.
        bin: PathBuf,
    },
    /// The `viaduct` binary, a fresh one per trace, with a plain-SIP pool
    /// (`mode = "sip"`) of the trace's sip-server actors: the `plain`
    /// traces.
    ViaductSip {
        /// The binary.
        bin: PathBuf,
    },
    /// Any SIP load balancer already running at `balancer`, whose
    /// configuration lists the sip-server actors at `server_port` (e.g.
    /// `conformance/kamailio/`): the `plain` traces, one at a time.
    Sip {
        /// Its SIP address (UDP and TCP).
        balancer: SocketAddr,
        /// The port every sip-server actor listens on, at its own IP.
        server_port: u16,
    },
    /// A fresh `viaduct` per trace and, behind it, the user's backend
    /// command (`sh -c CMD`) once per backend actor: the `backend` traces.
    Backend {
        /// The `viaduct` binary.
        bin: PathBuf,
        /// The command; it finds the balancer in `$VIADUCT_AGENTS`, the
        /// secret in `$VIADUCT_SECRET`, its name in `$VIADUCT_BACKEND_NAME`.
        cmd: String,
    },
}

impl Target {
    /// Whether traces of `mode` run against this target.
    pub fn runs(&self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (Target::Viaduct { .. }, Mode::Agent)
                | (Target::ViaductSip { .. } | Target::Sip { .. }, Mode::Plain)
                | (Target::Backend { .. }, Mode::Backend)
        )
    }

    /// The target's kind, as `--target` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Viaduct { .. } => "viaduct",
            Target::ViaductSip { .. } => "viaduct-sip",
            Target::Sip { .. } => "sip",
            Target::Backend { .. } => "backend",
        }
    }

    /// How many traces may run at once: one against a long-lived balancer
    /// (its sip-server addresses are fixed).
    pub fn max_jobs(&self) -> usize {
        match self {
            Target::Sip { .. } => 1,
            _ => usize::MAX,
        }
    }
}

/// What a run needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    /// What is under test.
    pub target: Target,
    /// The target's name: the scorecard's label and the key of
    /// `known-failure(NAME):` marks (e.g. `viaduct-sip`, `kamailio`).
    pub name: String,
    /// The folder `file` payloads are relative to (the corpus).
    pub corpus: PathBuf,
    /// The address a `viaduct` started by the runner listens on (`::1` is
    /// taken instead for a trace whose actors are IPv6).
    pub lb_ip: String,
    /// The value of `${run}`; `None`: a random nonce per trace run (so that
    /// re-runs against a long-lived balancer never reuse a Call-ID). Tests
    /// fix it so that snapshots do not change from run to run.
    pub nonce: Option<String>,
}

/// How a trace ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step held.
    Passed,
    /// A step failed: a one-line summary.
    Failed(String),
    /// Not run, with the reason.
    Skipped(String),
    /// Marked known-failing and still fails (the summary says how).
    KnownFailure(String),
    /// Marked known-failing but passed: the mark is stale.
    UnexpectedPass,
}

impl Outcome {
    /// Whether the outcome counts against the run.
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_) | Outcome::UnexpectedPass)
    }
}

/// The result of one trace.
#[derive(Debug, Clone)]
pub struct TraceResult {
    /// `group/name`.
    pub id: String,
    /// Its group.
    pub group: String,
    /// The rule it checks.
    pub rule: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The reason of the trace's known-failure mark for this target.
    pub known_reason: Option<String>,
    /// The full failure report (steps, side by side, balancer log tail).
    pub details: String,
    /// Normalised renderings of every message received (for snapshots).
    pub transcript: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// Runs one trace against a fresh balancer.
pub fn run_trace(trace: &Trace, opts: &Options) -> TraceResult {
    let started = Instant::now();
    let mut result = TraceResult {
        id: trace.id.clone(),
        group: trace.group.clone(),
        rule: trace.rule.clone(),
        outcome: Outcome::Passed,
        known_reason: trace.known_failure_for(&opts.name).map(str::to_owned),
        details: String::new(),
        transcript: String::new(),
        elapsed: Duration::ZERO,
    };
    if !opts.target.runs(trace.mode) {
        result.outcome = Outcome::Skipped(format!(
            "a {} trace: not run against target {}",
            trace.mode,
            opts.target.kind()
        ));
        return result;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            result.outcome = Outcome::Failed(format!("cannot start a runtime: {e}"));
            return result;
        }
    };
    let (failure, details, transcript) = runtime.block_on(play(trace, opts));
    result.transcript = transcript;
    result.details = details;
    result.outcome = match (failure, trace.known_failure_for(&opts.name)) {
        (None, None) => Outcome::Passed,
        (None, Some(_)) => Outcome::UnexpectedPass,
        (Some(f), None) => Outcome::Failed(f),
        (Some(f), Some(_)) => Outcome::KnownFailure(f),
    };
    result.elapsed = started.elapsed();
    result
}

// ------------------------------------------------------------------ events

enum Ev {
    Sip(Received),
    Pong {
        actor: String,
        conn: Option<String>,
    },
    Closed {
        actor: String,
        conn: Option<String>,
    },
    Refused {
        actor: String,
        code: String,
    },
    Accepted {
        actor: String,
        conn: String,
        write: OwnedWriteHalf,
        local: SocketAddr,
    },
}

impl Ev {
    fn actor(&self) -> &str {
        match self {
            Ev::Sip(r) => &r.actor,
            Ev::Pong { actor, .. }
            | Ev::Closed { actor, .. }
            | Ev::Refused { actor, .. }
            | Ev::Accepted { actor, .. } => actor,
        }
    }
    fn conn(&self) -> Option<&str> {
        match self {
            Ev::Sip(r) => r.conn.as_deref(),
            Ev::Pong { conn, .. } | Ev::Closed { conn, .. } => conn.as_deref(),
            Ev::Refused { .. } => None,
            Ev::Accepted { conn, .. } => Some(conn),
        }
    }
    fn kind(&self) -> Option<ExpectKind> {
        match self {
            Ev::Sip(_) => Some(ExpectKind::Sip),
            Ev::Pong { .. } => Some(ExpectKind::Pong),
            Ev::Closed { .. } => Some(ExpectKind::Closed),
            Ev::Refused { .. } => Some(ExpectKind::Refused),
            Ev::Accepted { .. } => None,
        }
    }
}

// ------------------------------------------------------------------ actors

struct TcpPeer {
    ip: IpAddr,
    conns: HashMap<String, (OwnedWriteHalf, SocketAddr)>,
    tasks: Vec<JoinHandle<()>>,
}

struct UdpPeer {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

struct AgentRt {
    id: u16,
    version: u8,
    out: mpsc::UnboundedSender<Frame>,
    tasks: Vec<JoinHandle<()>>,
}

fn spawn_stream_reader(
    actor: String,
    conn: String,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    from: SocketAddr,
    tx: mpsc::UnboundedSender<Ev>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut framer = StreamFramer::new(Limits::default());
        let mut buf = BytesMut::new();
        loop {
            loop {
                match framer.decode(&mut buf) {
                    Ok(Some(Framed::Message(m))) => {
                        let _ = tx.send(Ev::Sip(Received {
                            actor: actor.clone(),
                            conn: Some(conn.clone()),
                            from: Some(from),
                            bytes: m,
                            frame: None,
                        }));
                    }
                    Ok(Some(Framed::Pong)) => {
                        let _ = tx.send(Ev::Pong {
                            actor: actor.clone(),
                            conn: Some(conn.clone()),
                        });
                    }
                    Ok(Some(Framed::Ping)) => {}
                    Ok(None) if &buf[..] == b"\r\n" => {
                        // The framer waits to see whether a lone CRLF starts
                        // a ping; the balancer never pings a peer, so this
                        // is its pong (RFC 5626 §3.5.1).
                        buf.clear();
                        let _ = tx.send(Ev::Pong {
                            actor: actor.clone(),
                            conn: Some(conn.clone()),
                        });
                    }
                    Ok(None) => break,
                    Err(_) => {
                        let _ = tx.send(Ev::Closed {
                            actor: actor.clone(),
                            conn: Some(conn.clone()),
                        });
                        return;
                    }
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Ev::Closed {
                        actor,
                        conn: Some(conn),
                    });
                    return;
                }
                Ok(_) => {}
            }
        }
    })
}

async fn write_frame(write: &mut OwnedWriteHalf, frame: &Frame, version: u8) -> Result<(), String> {
    let mut buf = BytesMut::new();
    encode(frame, version, &mut buf).map_err(|e| e.to_string())?;
    write.write_all(&buf).await.map_err(|e| e.to_string())
}

async fn next_frame(
    reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    name: &str,
) -> Result<Frame, String> {
    match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
        Ok(Some(Ok(f))) => Ok(f),
        Ok(Some(Err(e))) => Err(format!("agent {name}: bad frame: {e}")),
        Ok(None) => Err(format!("agent {name}: link closed during the handshake")),
        Err(_) => Err(format!("agent {name}: handshake timed out")),
    }
}

/// Connects an agent: handshake, then a reader and a writer task.
async fn start_agent(
    name: &str,
    secret: &[u8],
    agents: SocketAddr,
    tx: &mpsc::UnboundedSender<Ev>,
) -> Result<Option<AgentRt>, String> {
    let stream = tokio::net::TcpStream::connect(agents)
        .await
        .map_err(|e| format!("agent {name}: cannot connect to {agents}: {e}"))?;
    let (rd, mut write) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(DEFAULT_MAX_BODY));
    let (mut handshake, hello) = AgentHandshake::start(secret, name, rand::random());
    write_frame(&mut write, &hello, 1).await?;
    let challenge = next_frame(&mut reader, name).await?;
    let auth = match handshake.handle(challenge) {
        Ok(AgentStep::Send(f)) => f,
        other => return Err(format!("agent {name}: unexpected handshake step {other:?}")),
    };
    write_frame(&mut write, &auth, 1).await?;
    let answer = next_frame(&mut reader, name).await?;
    let (welcome, version) = match handshake.handle(answer) {
        Ok(AgentStep::Welcomed { welcome, version }) => (welcome, version),
        Err(HandshakeError::Refused { code, .. }) => {
            let _ = tx.send(Ev::Refused {
                actor: name.to_owned(),
                code: code.to_string(),
            });
            return Ok(None);
        }
        other => return Err(format!("agent {name}: unexpected handshake step {other:?}")),
    };
    reader.decoder_mut().set_version(version);
    let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if write_frame(&mut write, &frame, version).await.is_err() {
                break;
            }
        }
    });
    let pong = out.clone();
    let actor = name.to_owned();
    let tx = tx.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(frame)) = reader.next().await {
            match frame {
                Frame::SipToBackend(sip) => {
                    let _ = tx.send(Ev::Sip(Received {
                        actor: actor.clone(),
                        conn: None,
                        from: Some(sip.peer),
                        frame: Some(FrameMeta {
                            connection: sip.connection,
                            transport: sip.transport,
                            peer: sip.peer,
                            local: sip.local,
                            failover: sip.failover,
                        }),
                        bytes: sip.message,
                    }));
                }
                Frame::Ping(token) => {
                    let _ = pong.send(Frame::Pong(token));
                }
                _ => {}
            }
        }
        let _ = tx.send(Ev::Closed { actor, conn: None });
    });
    Ok(Some(AgentRt {
        id: welcome.backend_id,
        version,
        out,
        tasks: vec![writer, reader],
    }))
}

// ------------------------------------------------------------------ the play

/// An instance of the user's backend command, killed on drop.
/// A user backend command (`--target backend`), stopped with its whole
/// process group: `sh -c "cd d && ./b"` leaves no `b` behind.
type BackendProc = crate::proc::GroupChild;

struct Play<'a> {
    trace: &'a Trace,
    opts: &'a Options,
    /// The balancer the runner started, if it did.
    lb: Option<Viaduct>,
    /// The balancer's SIP address.
    lb_sip: SocketAddr,
    /// Where the sip-server actors listen.
    servers: HashMap<String, SocketAddr>,
    /// Outgoing connections opened by sip-server actors.
    opened: usize,
    _backends: Vec<BackendProc>,
    vars: Vars,
    tx: mpsc::UnboundedSender<Ev>,
    rx: mpsc::UnboundedReceiver<Ev>,
    pending: Vec<Ev>,
    tcp: HashMap<String, TcpPeer>,
    udp: HashMap<String, UdpPeer>,
    agents: HashMap<String, AgentRt>,
    saved: HashMap<String, Received>,
    accepted: usize,
    log: String,
    transcript: String,
}

/// A step failure: a one-line summary and the detailed report.
struct Fail {
    summary: String,
    details: String,
}

fn fail(summary: impl Into<String>) -> Fail {
    Fail {
        summary: summary.into(),
        details: String::new(),
    }
}

async fn play(trace: &Trace, opts: &Options) -> (Option<String>, String, String) {
    let setup = match setup(trace, opts).await {
        Ok(s) => s,
        Err(e) => {
            return (
                Some(format!("the target did not start: {e}")),
                e,
                String::new(),
            )
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut p = Play {
        trace,
        opts,
        vars: Vars::new(),
        lb_sip: setup.lb_sip,
        lb: setup.lb,
        servers: setup.servers,
        opened: 0,
        _backends: setup.backends,
        tx,
        rx,
        pending: Vec::new(),
        tcp: HashMap::new(),
        udp: HashMap::new(),
        agents: HashMap::new(),
        saved: HashMap::new(),
        accepted: 0,
        log: String::new(),
        transcript: String::new(),
    };
    let outcome = p.run().await;
    let (summary, mut details) = match outcome {
        Ok(()) => (None, String::new()),
        Err(f) => (Some(f.summary), f.details),
    };
    if summary.is_some() {
        let mut report = format!("steps:\n{}", p.log);
        if !details.is_empty() {
            report.push('\n');
            report.push_str(&details);
        }
        if let Some(lb) = &p.lb {
            let log = lb.log();
            let tail = log.len().saturating_sub(25);
            report.push_str("\nbalancer log (last lines):\n");
            for line in &log[tail..] {
                let _ = writeln!(report, "  viaduct| {line}");
            }
        }
        details = report;
    }
    for peer in p.tcp.values() {
        peer.tasks.iter().for_each(JoinHandle::abort);
    }
    for peer in p.udp.values() {
        peer.task.abort();
    }
    for agent in p.agents.values() {
        agent.tasks.iter().for_each(JoinHandle::abort);
    }
    let transcript = render::normalise(&p.transcript, &p.vars);
    (summary, details, transcript)
}

/// What a trace runs against, started.
struct Setup {
    lb: Option<Viaduct>,
    lb_sip: SocketAddr,
    servers: HashMap<String, SocketAddr>,
    backends: Vec<BackendProc>,
}

/// The balancer's address for a trace: `::1` when an actor of the trace is
/// IPv6 and the runner's address is IPv4.
fn lb_ip_for(trace: &Trace, opts: &Options) -> String {
    let v6 = trace.actors.iter().any(|a| match &a.kind {
        ActorKind::Peer { ip, .. } | ActorKind::SipServer { ip, .. } => ip.contains(':'),
        _ => false,
    });
    if v6 && !opts.lb_ip.contains(':') {
        "::1".to_owned()
    } else {
        opts.lb_ip.clone()
    }
}

/// The plain-SIP pool of a trace's sip-server actors, as viaduct
/// configuration: every request goes to it, placed by a rendezvous hash of
/// the Call-ID (as a dispatcher's Call-ID hash), no OPTIONS probes (a
/// probe would be a message the trace does not expect).
fn plain_pool(servers: &[(String, Net, SocketAddr)]) -> String {
    let members: Vec<String> = servers
        .iter()
        .map(|(name, net, addr)| {
            let t = match net {
                Net::Tcp => "tcp",
                Net::Udp => "udp",
            };
            format!("{{ address = \"{addr}\", transport = \"{t}\", name = \"{name}\" }}")
        })
        .collect();
    format!(
        "[routing]\ndefault_pool = \"plain\"\n\
         [[pools]]\nname = \"plain\"\nmode = \"sip\"\npolicy = \"hash\"\nprobe_interval_ms = 0\n\
         members = [{}]\n",
        members.join(", ")
    )
}

async fn setup(trace: &Trace, opts: &Options) -> Result<Setup, String> {
    let ip = lb_ip_for(trace, opts);
    let server_actors: Vec<(String, Net, String)> = trace
        .actors
        .iter()
        .filter_map(|a| match &a.kind {
            ActorKind::SipServer { net, ip } => Some((a.name.clone(), *net, ip.clone())),
            _ => None,
        })
        .collect();
    let at = |ip: &str, port: u16| -> Result<SocketAddr, String> {
        let ip: IpAddr = ip.parse().map_err(|_| format!("bad IP `{ip}`"))?;
        Ok(SocketAddr::new(ip, port))
    };
    match &opts.target {
        Target::Viaduct { bin } => {
            let ids: Vec<(String, u16)> = trace
                .actors
                .iter()
                .filter(|a| matches!(a.kind, ActorKind::Agent { .. }))
                .zip(1u16..)
                .map(|(a, id)| (a.name.clone(), id))
                .collect();
            let lb = Viaduct::start(bin, &ip, &ids, &[&trace.config])?;
            Ok(Setup {
                lb_sip: lb.sip,
                lb: Some(lb),
                servers: HashMap::new(),
                backends: Vec::new(),
            })
        }
        Target::ViaductSip { bin } => {
            let mut servers = Vec::new();
            for (name, net, sip) in &server_actors {
                let port = crate::target::free_port(sip, &[]).map_err(|e| e.to_string())?;
                servers.push((name.clone(), *net, at(sip, port)?));
            }
            let pool = plain_pool(&servers);
            let lb = Viaduct::start(bin, &ip, &[], &[&pool, &trace.config])?;
            Ok(Setup {
                lb_sip: lb.sip,
                lb: Some(lb),
                servers: servers.into_iter().map(|(n, _, a)| (n, a)).collect(),
                backends: Vec::new(),
            })
        }
        Target::Sip {
            balancer,
            server_port,
        } => {
            let mut servers = HashMap::new();
            for (name, _, sip) in &server_actors {
                servers.insert(name.clone(), at(sip, *server_port)?);
            }
            Ok(Setup {
                lb: None,
                lb_sip: *balancer,
                servers,
                backends: Vec::new(),
            })
        }
        Target::Backend { bin, cmd } => {
            let lb = Viaduct::start(bin, &ip, &[], &[&trace.config])?;
            let mut backends = Vec::new();
            let names: Vec<&str> = trace
                .actors
                .iter()
                .filter(|a| matches!(a.kind, ActorKind::Backend))
                .map(|a| a.name.as_str())
                .collect();
            for name in &names {
                let child = crate::proc::spawn_group(
                    std::process::Command::new("sh")
                        .arg("-c")
                        .arg(cmd)
                        .env("VIADUCT_AGENTS", lb.agents.to_string())
                        .env("VIADUCT_SECRET", String::from_utf8_lossy(SECRET).as_ref())
                        .env("VIADUCT_BACKEND_NAME", name)
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null()),
                    Duration::from_secs(2),
                )
                .map_err(|e| format!("cannot start the backend command `{cmd}`: {e}"))?;
                backends.push(child);
            }
            // Every instance registered: as many welcomes in the log.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let welcomed = lb
                    .log()
                    .iter()
                    .filter(|l| l.contains("agent welcomed"))
                    .count();
                if welcomed >= names.len() {
                    break;
                }
                for (b, name) in backends.iter_mut().zip(&names) {
                    if let Ok(Some(status)) = b.child().try_wait() {
                        return Err(format!(
                            "the backend command `{cmd}` ({name}) exited ({status}) before \
                             registering with the balancer"
                        ));
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{welcomed} of {} instances of `{cmd}` registered with the balancer \
                         within 20 s (it gets the agent address in $VIADUCT_AGENTS, the \
                         secret in $VIADUCT_SECRET)",
                        names.len()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Setup {
                lb_sip: lb.sip,
                lb: Some(lb),
                servers: HashMap::new(),
                backends,
            })
        }
    }
}

fn host_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

impl Play<'_> {
    fn set_addr(&mut self, name: &str, addr: SocketAddr) {
        self.vars.insert(name.to_owned(), addr.to_string());
        self.vars
            .insert(format!("{name}.ip"), addr.ip().to_string());
        self.vars.insert(format!("{name}.host"), host_of(addr.ip()));
        self.vars
            .insert(format!("{name}.port"), addr.port().to_string());
    }

    async fn run(&mut self) -> Result<(), Fail> {
        let lb = self.lb_sip;
        self.set_addr("lb", lb);
        // A nonce of this run, for Call-IDs that must not collide with an
        // earlier run against a long-lived balancer.
        let nonce = self
            .opts
            .nonce
            .clone()
            .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
        self.vars.insert("run".to_owned(), nonce);
        for actor in &self.trace.actors {
            match &actor.kind {
                ActorKind::Peer { net, ip } => {
                    let ip: IpAddr = ip.parse().map_err(|_| fail(format!("bad IP {ip}")))?;
                    self.bind(&actor.name, *net, SocketAddr::new(ip, 0)).await?;
                }
                ActorKind::SipServer { net, .. } => {
                    let addr = *self.servers.get(&actor.name).ok_or_else(|| {
                        fail(format!("no address for sip-server `{}`", actor.name))
                    })?;
                    self.bind(&actor.name, *net, addr).await?;
                }
                ActorKind::Backend => {}
                ActorKind::Agent { deferred, .. } => {
                    if !deferred {
                        self.start_agent(&actor.name).await?;
                    }
                }
            }
        }
        for located in &self.trace.steps {
            let _ = writeln!(
                self.log,
                "  line {:>3}: {}",
                located.line,
                step_summary(&located.step)
            );
            if let Err(mut f) = self.step(&located.step).await {
                f.summary = format!("line {}: {}", located.line, f.summary);
                let _ = writeln!(self.log, "            FAILED: {}", f.summary);
                return Err(f);
            }
        }
        // Nothing else may have arrived.
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.push(ev);
        }
        if let Some(Ev::Sip(r)) = self.pending.iter().find(|e| matches!(e, Ev::Sip(_))) {
            let at = r.at();
            return Err(Fail {
                summary: format!("after the last step: an unexpected message at {at}"),
                details: format!("unexpected message at {at}:\n{}", indent(&r.text())),
            });
        }
        Ok(())
    }

    /// Binds a peer's or a sip-server's socket (a TCP listener, or a UDP
    /// socket) at `addr` and starts reading it.
    async fn bind(&mut self, name: &str, net: Net, addr: SocketAddr) -> Result<(), Fail> {
        let tx = self.tx.clone();
        let ip = addr.ip();
        match net {
            Net::Tcp => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| fail(format!("{name}: cannot listen on {addr}: {e}")))?;
                let addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
                self.set_addr(name, addr);
                let actor = name.to_owned();
                let task = tokio::spawn(async move {
                    let mut n = 0;
                    let mut readers = Vec::new();
                    while let Ok((stream, from)) = listener.accept().await {
                        n += 1;
                        let conn = format!("in{n}");
                        let local = stream.local_addr().unwrap_or(from);
                        let (rd, write) = stream.into_split();
                        readers.push(spawn_stream_reader(
                            actor.clone(),
                            conn.clone(),
                            rd,
                            from,
                            tx.clone(),
                        ));
                        let _ = tx.send(Ev::Accepted {
                            actor: actor.clone(),
                            conn,
                            write,
                            local,
                        });
                    }
                });
                self.tcp.insert(
                    name.to_owned(),
                    TcpPeer {
                        ip,
                        conns: HashMap::new(),
                        tasks: vec![task],
                    },
                );
            }
            Net::Udp => {
                let socket = UdpSocket::bind(addr)
                    .await
                    .map_err(|e| fail(format!("{name}: cannot bind {addr}: {e}")))?;
                let addr = socket.local_addr().map_err(|e| fail(e.to_string()))?;
                self.set_addr(name, addr);
                let socket = Arc::new(socket);
                let rd = socket.clone();
                let actor = name.to_owned();
                let task = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, from)) = rd.recv_from(&mut buf).await {
                        let d = Bytes::copy_from_slice(&buf[..n]);
                        if let Ok(Framed::Message(m)) = frame_datagram(d, &Limits::default()) {
                            let _ = tx.send(Ev::Sip(Received {
                                actor: actor.clone(),
                                conn: None,
                                from: Some(from),
                                bytes: m,
                                frame: None,
                            }));
                        }
                    }
                });
                self.udp.insert(name.to_owned(), UdpPeer { socket, task });
            }
        }
        Ok(())
    }

    fn is_server(&self, name: &str) -> bool {
        matches!(
            self.trace.actor(name).map(|a| &a.kind),
            Some(ActorKind::SipServer { .. })
        )
    }

    /// A sip-server actor sends a message the way a SIP server's transport
    /// does: a response to the top Via (RFC 3261 §18.2.2: on the request's
    /// connection over TCP; over UDP to `received`, the `rport` or sent-by
    /// port), a request to the top Route, else the Request-URI (§8.1.2),
    /// over UDP from its socket or over a new TCP connection from its IP.
    async fn server_send(
        &mut self,
        server: &str,
        addressing: &Addressing,
        bytes: Vec<u8>,
    ) -> Result<(), Fail> {
        let message = Bytes::from(bytes);
        let msg = SipMessage::parse(message.clone())
            .map_err(|e| fail(format!("{server}: the message does not scan: {e}")))?;
        let (conn, dest) = match addressing {
            Addressing::ReplyTo(request) => {
                let request = self.sub(request)?;
                let saved = self
                    .saved
                    .get(&request)
                    .ok_or_else(|| fail(format!("no message saved as `{request}`")))?;
                if saved.actor != server {
                    return Err(fail(format!(
                        "`{request}` was received by {}, not {server}",
                        saved.actor
                    )));
                }
                let (_, dest) = via_next_hop(&msg)?;
                (saved.conn.clone(), dest)
            }
            Addressing::Request => {
                let (_, dest) = request_next_hop(&msg)?;
                (None, dest)
            }
            Addressing::Explicit { .. } => {
                return Err(fail(format!(
                    "`{server}` is a sip-server: it sends with `reply` or `request`"
                )))
            }
        };
        if let Some(udp) = self.udp.get(server) {
            udp.socket
                .send_to(&message, dest)
                .await
                .map_err(|e| fail(format!("{server}: send to {dest}: {e}")))?;
            return Ok(());
        }
        let conn = match conn {
            Some(c) => c,
            None => {
                // A new connection from the server's IP.
                self.opened += 1;
                let conn = format!("out{}", self.opened);
                self.open_conn(server, &conn, dest, "has no socket").await?;
                conn
            }
        };
        let peer = self
            .tcp
            .get_mut(server)
            .ok_or_else(|| fail(format!("`{server}` has no socket")))?;
        let (write, _) = peer
            .conns
            .get_mut(&conn)
            .ok_or_else(|| fail(format!("{server}: connection `{conn}` is closed")))?;
        write
            .write_all(&message)
            .await
            .map_err(|e| fail(format!("{server}/{conn}: write: {e}")))
    }

    async fn start_agent(&mut self, name: &str) -> Result<(), Fail> {
        let secret = match self.trace.actor(name).map(|a| &a.kind) {
            Some(ActorKind::Agent { secret, .. }) => secret
                .as_ref()
                .map_or_else(|| SECRET.to_vec(), |s| s.as_bytes().to_vec()),
            _ => return Err(fail(format!("`{name}` is not an agent"))),
        };
        if let Some(old) = self.agents.remove(name) {
            old.tasks.iter().for_each(JoinHandle::abort);
        }
        let agents = self
            .lb
            .as_ref()
            .map(|lb| lb.agents)
            .ok_or_else(|| fail("agents need a viaduct the runner starts"))?;
        match start_agent(name, &secret, agents, &self.tx).await {
            Ok(Some(rt)) => {
                self.vars
                    .insert(format!("{name}.id"), format!("{:04x}", rt.id));
                self.agents.insert(name.to_owned(), rt);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(fail(e)),
        }
    }

    /// Files an event, taking in newly accepted connections at once.
    fn push(&mut self, ev: Ev) {
        if let Ev::Accepted {
            actor,
            conn,
            write,
            local,
        } = ev
        {
            self.accepted += 1;
            self.set_addr(&format!("{actor}/{conn}"), local);
            if let Some(peer) = self.tcp.get_mut(&actor) {
                peer.conns.insert(conn, (write, local));
            }
            return;
        }
        if let Ev::Refused { actor, code } = &ev {
            self.vars.insert(format!("{actor}.refused"), code.clone());
        }
        self.pending.push(ev);
    }

    fn sub(&self, s: &str) -> Result<String, Fail> {
        substitute_str(s, &self.vars).map_err(fail)
    }

    fn endpoint(&self, e: &Endpoint) -> Result<(String, Option<String>), Fail> {
        Ok((
            self.sub(&e.actor)?,
            e.conn.as_deref().map(|c| self.sub(c)).transpose()?,
        ))
    }

    fn payload(&self, payload: &Payload) -> Result<Vec<u8>, Fail> {
        match payload {
            Payload::Inline(b) => substitute(b, &self.vars).map_err(fail),
            Payload::File(f) => {
                let path = self.opts.corpus.join(f);
                std::fs::read(&path).map_err(|e| fail(format!("{}: {e}", path.display())))
            }
        }
    }

    /// Opens the TCP connection `actor/conn` from the actor's IP to `dest`
    /// and starts reading it; `missing` completes the error for an actor
    /// without a TCP socket.
    async fn open_conn(
        &mut self,
        actor: &str,
        conn: &str,
        dest: SocketAddr,
        missing: &str,
    ) -> Result<(), Fail> {
        let peer = self
            .tcp
            .get_mut(actor)
            .ok_or_else(|| fail(format!("`{actor}` {missing}")))?;
        let socket = if peer.ip.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| fail(e.to_string()))?;
        socket
            .bind(SocketAddr::new(peer.ip, 0))
            .map_err(|e| fail(format!("bind {}: {e}", peer.ip)))?;
        let stream = socket
            .connect(dest)
            .await
            .map_err(|e| fail(format!("{actor}/{conn}: connect {dest}: {e}")))?;
        let local = stream.local_addr().map_err(|e| fail(e.to_string()))?;
        let (rd, write) = stream.into_split();
        peer.tasks.push(spawn_stream_reader(
            actor.to_owned(),
            conn.to_owned(),
            rd,
            dest,
            self.tx.clone(),
        ));
        peer.conns.insert(conn.to_owned(), (write, local));
        self.set_addr(&format!("{actor}/{conn}"), local);
        Ok(())
    }

    async fn step(&mut self, step: &Step) -> Result<(), Fail> {
        match step {
            Step::Connect { at } => {
                let (actor, conn) = self.endpoint(at)?;
                let conn = conn.unwrap_or_default();
                let lb = self.lb_sip;
                self.open_conn(&actor, &conn, lb, "is not a TCP peer")
                    .await?;
            }
            Step::Send {
                from,
                payload,
                split,
            } => {
                let (actor, conn) = self.endpoint(from)?;
                let bytes = self.payload(payload)?;
                let lb = self.lb_sip;
                if let Some(udp) = self.udp.get(&actor) {
                    udp.socket
                        .send_to(&bytes, lb)
                        .await
                        .map_err(|e| fail(format!("{actor}: send: {e}")))?;
                    return Ok(());
                }
                let peer = self
                    .tcp
                    .get_mut(&actor)
                    .ok_or_else(|| fail(format!("`{actor}` is not a peer")))?;
                let conn =
                    conn.ok_or_else(|| fail(format!("`send {actor}` needs `{actor}/CONN`")))?;
                let (write, _) = peer
                    .conns
                    .get_mut(&conn)
                    .ok_or_else(|| fail(format!("{actor} has no connection `{conn}`")))?;
                let chunk = split.unwrap_or(bytes.len().max(1));
                for (i, part) in bytes.chunks(chunk).enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    write
                        .write_all(part)
                        .await
                        .map_err(|e| fail(format!("{actor}/{conn}: write: {e}")))?;
                }
            }
            Step::AgentSend {
                agent,
                addressing,
                payload,
            } => {
                let agent = self.sub(agent)?;
                let bytes = self.payload(payload)?;
                if self.is_server(&agent) {
                    return self.server_send(&agent, addressing, bytes).await;
                }
                let frame = self.addressed(&agent, addressing, bytes)?;
                let rt = self
                    .agents
                    .get(&agent)
                    .ok_or_else(|| fail(format!("agent `{agent}` is not connected")))?;
                let _ = rt.version;
                rt.out
                    .send(Frame::SipFromBackend(frame))
                    .map_err(|_| fail(format!("agent `{agent}`: link closed")))?;
            }
            Step::Expect {
                targets,
                label,
                kind,
                within,
                who,
                save,
                final_only,
                assertions,
            } => {
                let targets: Vec<(String, Option<String>)> = targets
                    .iter()
                    .map(|t| self.endpoint(t))
                    .collect::<Result<_, _>>()?;
                let within = within.unwrap_or(self.trace.timeout);
                let deadline = tokio::time::Instant::now() + within;
                let ev = loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self.wait_for(&targets, *kind, left).await {
                        Some(Ev::Sip(r)) if *final_only && is_provisional(&r.bytes) => {
                            let _ = writeln!(
                                self.log,
                                "            (passed over a provisional response at {label})"
                            );
                        }
                        other => break other,
                    }
                };
                let ev = ev.ok_or_else(|| {
                    let what = match kind {
                        ExpectKind::Sip => "no SIP message",
                        ExpectKind::Pong => "no pong",
                        ExpectKind::Closed => "no close",
                        ExpectKind::Refused => "no refusal",
                    };
                    let mut f = fail(format!("{what} at {label} within {within:?}"));
                    f.details = self.expected_vs(assertions, None);
                    f
                })?;
                if let Some(who) = who {
                    // `-> backend` also names the actor's own variables
                    // (`${backend.id}`).
                    let actor = ev.actor().to_owned();
                    let prefix = format!("{actor}.");
                    let own: Vec<(String, String)> = self
                        .vars
                        .iter()
                        .filter_map(|(k, v)| {
                            k.strip_prefix(&prefix)
                                .map(|rest| (format!("{who}.{rest}"), v.clone()))
                        })
                        .collect();
                    self.vars.extend(own);
                    self.vars.insert(who.clone(), actor);
                }
                if let Ev::Sip(r) = ev {
                    let results = check(&r, assertions, &mut self.vars);
                    let on = r
                        .conn
                        .as_ref()
                        .map(|c| format!(", on {}/{c}", r.actor))
                        .unwrap_or_default();
                    let _ = writeln!(
                        self.transcript,
                        "--- {label} (line {}{on}) ---\n{}",
                        step_line(self.trace, step),
                        r.text()
                    );
                    if let Some(bad) = results.iter().find(|c| c.failure.is_some()) {
                        let got = bad
                            .got
                            .as_ref()
                            .filter(|_| bad.failure.as_deref() != Some("absent"))
                            .map(|g| format!(" (got `{g}`)"))
                            .unwrap_or_default();
                        let mut f = fail(format!(
                            "at {label}: `{}`: {}{got}",
                            bad.text,
                            bad.failure.as_deref().unwrap_or_default()
                        ));
                        f.details = self.expected_vs(&results, Some(&r));
                        return Err(f);
                    }
                    if let Some(save) = save {
                        self.saved.insert(save.clone(), r);
                    }
                }
            }
            Step::Quiet { targets, within } => {
                let targets: Vec<(String, Option<String>)> = targets
                    .iter()
                    .map(|t| self.endpoint(t))
                    .collect::<Result<_, _>>()?;
                let within = within.unwrap_or(QUIET);
                if let Some(Ev::Sip(r)) = self.wait_for(&targets, ExpectKind::Sip, within).await {
                    let at = r.at();
                    return Err(Fail {
                        summary: format!("{at} received a message while it should be quiet"),
                        details: format!("unexpected message at {at}:\n{}", indent(&r.text())),
                    });
                }
            }
            Step::Close { at } => {
                let (actor, conn) = self.endpoint(at)?;
                let conn = conn.unwrap_or_default();
                let peer = self
                    .tcp
                    .get_mut(&actor)
                    .ok_or_else(|| fail(format!("`{actor}` is not a TCP peer")))?;
                let (mut write, _) = peer
                    .conns
                    .remove(&conn)
                    .ok_or_else(|| fail(format!("{actor} has no connection `{conn}`")))?;
                let _ = write.shutdown().await;
            }
            Step::Kill { agent } => {
                let agent = self.sub(agent)?;
                let rt = self
                    .agents
                    .remove(&agent)
                    .ok_or_else(|| fail(format!("agent `{agent}` is not connected")))?;
                rt.tasks.iter().for_each(JoinHandle::abort);
                // Let the balancer see the link go.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Step::Start { agent } => {
                let agent = self.sub(agent)?;
                self.start_agent(&agent).await?;
            }
            Step::Drain { agent, draining } => {
                let agent = self.sub(agent)?;
                let rt = self
                    .agents
                    .get(&agent)
                    .ok_or_else(|| fail(format!("agent `{agent}` is not connected")))?;
                let state = if *draining {
                    DrainState::Draining
                } else {
                    DrainState::Serving
                };
                rt.out
                    .send(Frame::Drain(state))
                    .map_err(|_| fail(format!("agent `{agent}`: link closed")))?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Step::Wait(d) => tokio::time::sleep(*d).await,
            Step::Set { name, value } => {
                let v = self.sub(value)?;
                self.vars.insert(name.clone(), v);
            }
        }
        Ok(())
    }

    /// The first event of `kind` at one of `targets`, waiting up to `within`.
    async fn wait_for(
        &mut self,
        targets: &[(String, Option<String>)],
        kind: ExpectKind,
        within: Duration,
    ) -> Option<Ev> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.push(ev);
            }
            let hit = self.pending.iter().position(|ev| {
                ev.kind() == Some(kind)
                    && targets.iter().any(|(a, c)| {
                        ev.actor() == a && c.as_deref().is_none_or(|c| ev.conn() == Some(c))
                    })
            });
            if let Some(i) = hit {
                return Some(self.pending.remove(i));
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.push(ev),
                _ => return None,
            }
        }
    }

    /// The frame for an agent's message (design.md §4).
    fn addressed(
        &self,
        agent: &str,
        addressing: &Addressing,
        bytes: Vec<u8>,
    ) -> Result<SipFromBackend, Fail> {
        let message = Bytes::from(bytes);
        match addressing {
            Addressing::Explicit {
                transport,
                to,
                conn,
            } => {
                let transport = Transport::from_via_token(self.sub(transport)?.as_bytes())
                    .ok_or_else(|| fail(format!("unknown transport `{transport}`")))?;
                let to = self.sub(to)?;
                let next_hop = to
                    .parse()
                    .map_err(|_| fail(format!("`{to}` is not IP:PORT")))?;
                let connection = conn
                    .as_deref()
                    .map(|c| {
                        let c = self.sub(c)?;
                        c.parse::<u64>()
                            .map_err(|_| fail(format!("connection id `{c}` is not a number")))
                    })
                    .transpose()?;
                Ok(SipFromBackend {
                    connection,
                    transport,
                    next_hop,
                    message,
                })
            }
            Addressing::ReplyTo(request) => {
                let request = self.sub(request)?;
                let saved = self
                    .saved
                    .get(&request)
                    .ok_or_else(|| fail(format!("no message saved as `{request}`")))?;
                let meta = saved
                    .frame
                    .ok_or_else(|| fail(format!("`{request}` was not received by an agent")))?;
                if saved.actor != agent {
                    return Err(fail(format!(
                        "`{request}` was received by {}, not {agent}",
                        saved.actor
                    )));
                }
                let msg = SipMessage::parse(message.clone())
                    .map_err(|e| fail(format!("the reply does not scan: {e}")))?;
                let (transport, next_hop) = via_next_hop(&msg)?;
                Ok(SipFromBackend {
                    connection: Some(meta.connection),
                    transport,
                    next_hop,
                    message,
                })
            }
            Addressing::Request => {
                let msg = SipMessage::parse(message.clone())
                    .map_err(|e| fail(format!("the request does not scan: {e}")))?;
                let (transport, next_hop) = request_next_hop(&msg)?;
                Ok(SipFromBackend {
                    connection: None,
                    transport,
                    next_hop,
                    message,
                })
            }
        }
    }

    /// The expectation and the message received, side by side.
    fn expected_vs(&self, results: &[impl AsChecked], got: Option<&Received>) -> String {
        let left: Vec<String> = results.iter().map(AsChecked::render).collect();
        let right: Vec<String> = match got {
            Some(r) => r.text().split("\r\n").map(str::to_owned).collect(),
            None => vec!["(nothing)".to_owned()],
        };
        render::side_by_side("expected", &left, "received", &right)
    }
}

trait AsChecked {
    fn render(&self) -> String;
}

impl AsChecked for Checked {
    fn render(&self) -> String {
        match &self.failure {
            None => format!("ok  {}", self.text),
            Some(f) => format!(
                "BAD {}  <- {f}{}",
                self.text,
                self.got
                    .as_ref()
                    .map(|g| format!(" (got `{g}`)"))
                    .unwrap_or_default()
            ),
        }
    }
}

impl AsChecked for crate::trace::Assertion {
    fn render(&self) -> String {
        format!("    {}", self.text)
    }
}

/// Whether `bytes` is a 1xx response.
fn is_provisional(bytes: &[u8]) -> bool {
    bytes.starts_with(b"SIP/2.0 1")
}

fn ip_text(h: &[u8]) -> Result<IpAddr, Fail> {
    let h = String::from_utf8_lossy(h);
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| fail(format!("host `{h}` is not an IP address")))
}

/// Where a response goes by its top Via (RFC 3261 §18.2.2, RFC 3581):
/// `received` (else the sent-by host), the `rport` value (else the sent-by
/// port, else the transport's default).
fn via_next_hop(msg: &SipMessage) -> Result<(Transport, SocketAddr), Fail> {
    let via = msg.top_via().ok_or_else(|| fail("the reply has no Via"))?;
    let transport = Transport::from_via_token(via.transport)
        .ok_or_else(|| fail("the reply's Via names an unknown transport"))?;
    let port = via.port.unwrap_or(transport.default_port());
    let next_hop = match via.received {
        Some(r) => SocketAddr::new(
            ip_text(r)?,
            match via.rport {
                Some(Some(p)) => p,
                _ => port,
            },
        ),
        None => SocketAddr::new(ip_text(via.host)?, port),
    };
    Ok((transport, next_hop))
}

/// Where a request goes: its top Route, else its Request-URI (RFC 3261
/// §8.1.2); the transport from the URI's `transport` parameter (UDP).
fn request_next_hop(msg: &SipMessage) -> Result<(Transport, SocketAddr), Fail> {
    let route = msg.top_route().map(|r| r.uri.raw.to_vec());
    let raw = match route {
        Some(r) => r,
        None => msg
            .request_uri()
            .map(|u| u.raw.to_vec())
            .ok_or_else(|| fail("not a request"))?,
    };
    let uri = Uri::parse(&raw).ok_or_else(|| fail("the next hop URI does not parse"))?;
    let transport = match uri.param("transport") {
        Some(Some(t)) => {
            Transport::from_via_token(t).ok_or_else(|| fail("unknown transport parameter"))?
        }
        _ => Transport::Udp,
    };
    Ok((
        transport,
        SocketAddr::new(
            ip_text(uri.host)?,
            uri.port.unwrap_or(transport.default_port()),
        ),
    ))
}

fn indent(text: &str) -> String {
    text.split("\r\n")
        .map(|l| format!("  | {l}\n"))
        .collect::<String>()
}

fn step_line(trace: &Trace, step: &Step) -> usize {
    trace
        .steps
        .iter()
        .find(|l| std::ptr::eq(&l.step, step))
        .map_or(0, |l| l.line)
}

fn step_summary(step: &Step) -> String {
    match step {
        Step::Connect { at } => format!("connect {at}"),
        Step::Send { from, split, .. } => match split {
            Some(n) => format!("send {from} (split {n})"),
            None => format!("send {from}"),
        },
        Step::AgentSend { agent, .. } => format!("{agent} sends"),
        Step::Expect { label, .. } => format!("expect {label}"),
        Step::Quiet { targets, .. } => format!(
            "quiet {}",
            targets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Step::Close { at } => format!("close {at}"),
        Step::Kill { agent } => format!("kill {agent}"),
        Step::Start { agent } => format!("start {agent}"),
        Step::Drain { agent, draining } => {
            format!("{} {agent}", if *draining { "drain" } else { "undrain" })
        }
        Step::Wait(d) => format!("wait {d:?}"),
        Step::Set { name, .. } => format!("set {name}"),
    }
}
