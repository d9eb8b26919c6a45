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

/// What a run needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `viaduct` binary.
    pub bin: PathBuf,
    /// The folder `file` payloads are relative to (the corpus).
    pub corpus: PathBuf,
    /// The balancer's address.
    pub lb_ip: String,
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
    /// How it ended.
    pub outcome: Outcome,
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
        outcome: Outcome::Passed,
        details: String::new(),
        transcript: String::new(),
        elapsed: Duration::ZERO,
    };
    if trace.mode == Mode::Plain
        || trace
            .actors
            .iter()
            .any(|a| matches!(a.kind, ActorKind::SipServer { .. }))
    {
        result.outcome = Outcome::Skipped(
            "plain-SIP backends: the runner does not simulate plain SIP servers yet".into(),
        );
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
    result.outcome = match (failure, &trace.known_failure) {
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

struct Play<'a> {
    trace: &'a Trace,
    opts: &'a Options,
    lb: Viaduct,
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
    let ids: Vec<(String, u16)> = trace
        .actors
        .iter()
        .filter(|a| matches!(a.kind, ActorKind::Agent { .. }))
        .zip(1u16..)
        .map(|(a, id)| (a.name.clone(), id))
        .collect();
    let lb = match Viaduct::start(&opts.bin, &opts.lb_ip, &ids, &trace.config) {
        Ok(lb) => lb,
        Err(e) => {
            return (
                Some(format!("the balancer did not start: {e}")),
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
        lb,
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
        let log = p.lb.log();
        let tail = log.len().saturating_sub(25);
        report.push_str("\nbalancer log (last lines):\n");
        for line in &log[tail..] {
            let _ = writeln!(report, "  viaduct| {line}");
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
        let lb = self.lb.sip;
        self.set_addr("lb", lb);
        let tx = self.tx.clone();
        for actor in &self.trace.actors {
            match &actor.kind {
                ActorKind::Peer { net, ip } => {
                    let ip: IpAddr = ip.parse().map_err(|_| fail(format!("bad IP {ip}")))?;
                    match net {
                        Net::Tcp => {
                            let listener = TcpListener::bind((ip, 0)).await.map_err(|e| {
                                fail(format!("{}: cannot listen on {ip}: {e}", actor.name))
                            })?;
                            let addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
                            self.set_addr(&actor.name, addr);
                            let tx = tx.clone();
                            let name = actor.name.clone();
                            let task = tokio::spawn(async move {
                                let mut n = 0;
                                let mut readers = Vec::new();
                                while let Ok((stream, from)) = listener.accept().await {
                                    n += 1;
                                    let conn = format!("in{n}");
                                    let local = stream.local_addr().unwrap_or(from);
                                    let (rd, write) = stream.into_split();
                                    readers.push(spawn_stream_reader(
                                        name.clone(),
                                        conn.clone(),
                                        rd,
                                        from,
                                        tx.clone(),
                                    ));
                                    let _ = tx.send(Ev::Accepted {
                                        actor: name.clone(),
                                        conn,
                                        write,
                                        local,
                                    });
                                }
                            });
                            self.tcp.insert(
                                actor.name.clone(),
                                TcpPeer {
                                    ip,
                                    conns: HashMap::new(),
                                    tasks: vec![task],
                                },
                            );
                        }
                        Net::Udp => {
                            let socket = UdpSocket::bind((ip, 0)).await.map_err(|e| {
                                fail(format!("{}: cannot bind {ip}: {e}", actor.name))
                            })?;
                            let addr = socket.local_addr().map_err(|e| fail(e.to_string()))?;
                            self.set_addr(&actor.name, addr);
                            let socket = Arc::new(socket);
                            let rd = socket.clone();
                            let tx = tx.clone();
                            let name = actor.name.clone();
                            let task = tokio::spawn(async move {
                                let mut buf = vec![0u8; 65_536];
                                while let Ok((n, from)) = rd.recv_from(&mut buf).await {
                                    let d = Bytes::copy_from_slice(&buf[..n]);
                                    if let Ok(Framed::Message(m)) =
                                        frame_datagram(d, &Limits::default())
                                    {
                                        let _ = tx.send(Ev::Sip(Received {
                                            actor: name.clone(),
                                            conn: None,
                                            from: Some(from),
                                            bytes: m,
                                            frame: None,
                                        }));
                                    }
                                }
                            });
                            self.udp
                                .insert(actor.name.clone(), UdpPeer { socket, task });
                        }
                    }
                }
                ActorKind::Agent { deferred, .. } => {
                    if !deferred {
                        self.start_agent(&actor.name).await?;
                    }
                }
                ActorKind::SipServer { .. } => {}
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
            let at = match &r.conn {
                Some(c) => format!("{}/{c}", r.actor),
                None => r.actor.clone(),
            };
            return Err(Fail {
                summary: format!("after the last step: an unexpected message at {at}"),
                details: format!("unexpected message at {at}:\n{}", indent(&r.text())),
            });
        }
        Ok(())
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
        match start_agent(name, &secret, self.lb.agents, &self.tx).await {
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

    async fn step(&mut self, step: &Step) -> Result<(), Fail> {
        match step {
            Step::Connect { at } => {
                let (actor, conn) = self.endpoint(at)?;
                let conn = conn.unwrap_or_default();
                let lb = self.lb.sip;
                let peer = self
                    .tcp
                    .get_mut(&actor)
                    .ok_or_else(|| fail(format!("`{actor}` is not a TCP peer")))?;
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
                    .connect(lb)
                    .await
                    .map_err(|e| fail(format!("{actor}/{conn}: connect {lb}: {e}")))?;
                let local = stream.local_addr().map_err(|e| fail(e.to_string()))?;
                let (rd, write) = stream.into_split();
                peer.tasks.push(spawn_stream_reader(
                    actor.clone(),
                    conn.clone(),
                    rd,
                    lb,
                    self.tx.clone(),
                ));
                peer.conns.insert(conn.clone(), (write, local));
                self.set_addr(&format!("{actor}/{conn}"), local);
            }
            Step::Send {
                from,
                payload,
                split,
            } => {
                let (actor, conn) = self.endpoint(from)?;
                let bytes = self.payload(payload)?;
                let lb = self.lb.sip;
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
                assertions,
            } => {
                let targets: Vec<(String, Option<String>)> = targets
                    .iter()
                    .map(|t| self.endpoint(t))
                    .collect::<Result<_, _>>()?;
                let within = within.unwrap_or(self.trace.timeout);
                let ev = self
                    .wait_for(&targets, *kind, within)
                    .await
                    .ok_or_else(|| {
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
                    let at = match &r.conn {
                        Some(c) => format!("{}/{c}", r.actor),
                        None => r.actor.clone(),
                    };
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
                let via = msg.top_via().ok_or_else(|| fail("the reply has no Via"))?;
                let transport = Transport::from_via_token(via.transport)
                    .ok_or_else(|| fail("the reply's Via names an unknown transport"))?;
                let port = via.port.unwrap_or(transport.default_port());
                let ip_text = |h: &[u8]| -> Result<IpAddr, Fail> {
                    let h = String::from_utf8_lossy(h);
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| fail(format!("Via host `{h}` is not an IP address")))
                };
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
                let route = msg.top_route().map(|r| r.uri.raw.to_vec());
                let raw = match route {
                    Some(r) => r,
                    None => msg
                        .request_uri()
                        .map(|u| u.raw.to_vec())
                        .ok_or_else(|| fail("not a request"))?,
                };
                let uri =
                    Uri::parse(&raw).ok_or_else(|| fail("the next hop URI does not parse"))?;
                let transport = match uri.param("transport") {
                    Some(Some(t)) => Transport::from_via_token(t)
                        .ok_or_else(|| fail("unknown transport parameter"))?,
                    _ => Transport::Udp,
                };
                let host = String::from_utf8_lossy(uri.host);
                let ip: IpAddr = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| fail(format!("next hop host `{host}` is not an IP address")))?;
                Ok(SipFromBackend {
                    connection: None,
                    transport,
                    next_hop: SocketAddr::new(ip, uri.port.unwrap_or(transport.default_port())),
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
