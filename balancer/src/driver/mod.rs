//! Tokio drivers: sockets in, the sans-I/O [`Router`] in the middle,
//! sockets out.
//!
//! Everything runs on one thread: a tokio `current_thread` runtime with a
//! [`tokio::task::LocalSet`]. The router lives in an `Rc<RefCell<Router>>`
//! shared by the local tasks, so the per-message path takes no lock; a
//! borrow is never held across an `.await`.
//!
//! ```text
//!  UDP socket task ──┐                                   ┌──> per-connection writer (bounded queue)
//!  TCP conn reader ──┼─> feed one input ─> Router ─> drain poll_action() ─┼──> UDP try_send_to
//!  agent link reader ┤                                   ├──> agent link writer (bounded queue)
//!  timer task ───────┘   (handle_timeout at poll_timeout) └──> connect task (coalesced per peer)
//! ```
//!
//! * [`sip`]: UDP sockets, TCP listeners, accepted and opened connections
//!   (reader task + writer task each), connection limits and timeouts.
//! * [`agents`]: the agent listener, the handshake, one link per backend.
//! * [`admin`]: the `[admin]` HTTP listener (axum): `GET /metrics`
//!   ([`metrics`] renders the router's plain counters for Prometheus) and
//!   the JSON admin API; its handlers reach the router through a channel to
//!   a local task.
//!
//! Every task feeds one input, then drains every action before it waits
//! again. A full queue drops the message and counts it: a slow peer never
//! stalls the others. Shutdown is injected (a [`CancellationToken`]): the
//! listeners stop accepting, readers stop, writers flush what is queued
//! within `sip.shutdown_grace_ms`.

// Drivers own the clock and the tasks: the one place they are allowed.
#![allow(clippy::disallowed_methods)]

pub mod admin;
mod agents;
pub mod metrics;
mod queue;
mod sip;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use encap_proto::frame::{encode, Frame, PublicAddress, Transport};
use rustc_hash::FxHashMap;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{Config, ListenTransport, Secrets};
use crate::core::router::{Action, BackendId, ConnId, Egress, Event, Router, Source};

/// A bound balancer, ready to run.
#[derive(Debug)]
pub struct Balancer {
    udp: Vec<UdpSocket>,
    tcp: Vec<(TcpListener, SocketAddr)>,
    agents: TcpListener,
    /// The `[admin]` listener and its bearer token, if serving.
    admin: Option<(TcpListener, Option<String>)>,
    config: Config,
    secrets: Secrets,
    reloads: (mpsc::Sender<Reload>, mpsc::Receiver<Reload>),
}

/// A configuration reload for a running balancer (SIGHUP): the parts that
/// apply at run time (see [`Router::reconfigure`]) and the cluster secrets
/// (new agent links authenticate with the new secret; tags verify with the
/// current and previous keys).
#[derive(Debug)]
pub struct Reload {
    /// The reloaded configuration.
    pub config: Config,
    /// Its secrets, read again.
    pub secrets: Secrets,
}

impl Balancer {
    /// Binds every listener of `config`. Errors name the listener.
    pub async fn bind(config: &Config, secrets: Secrets) -> anyhow::Result<Balancer> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for (i, l) in config.sip.listen.iter().enumerate() {
            match l.transport {
                ListenTransport::Udp => {
                    let socket = UdpSocket::bind(l.address).await.with_context(|| {
                        format!("sip.listen[{i}]: cannot bind UDP {}", l.address)
                    })?;
                    receive_buffer(&socket, l.address, config.sip.udp_receive_buffer_bytes);
                    udp.push(socket);
                }
                ListenTransport::Tcp => tcp.push((
                    TcpListener::bind(l.address).await.with_context(|| {
                        format!("sip.listen[{i}]: cannot bind TCP {}", l.address)
                    })?,
                    l.public(),
                )),
            }
        }
        let agents = TcpListener::bind(config.agents.listen)
            .await
            .with_context(|| format!("agents.listen: cannot bind TCP {}", config.agents.listen))?;
        let admin = if config.admin.enabled {
            let token = config.admin_token()?;
            match TcpListener::bind(config.admin.listen).await {
                Ok(l) => Some((l, token)),
                // Only the default address is let go (another balancer on
                // this machine may hold it); an address the operator set
                // must bind.
                Err(e) if config.admin.listen == crate::config::DEFAULT_ADMIN_LISTEN => {
                    warn!(address = %config.admin.listen, error = %e,
                        "admin.listen: cannot bind the default address; serving WITHOUT metrics and admin API (set admin.listen)");
                    None
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("admin.listen: cannot bind TCP {}", config.admin.listen)
                    })
                }
            }
        } else {
            None
        };
        Ok(Balancer {
            udp,
            tcp,
            agents,
            admin,
            config: config.clone(),
            secrets,
            reloads: mpsc::channel(4),
        })
    }

    /// The SIP addresses actually bound, as `(transport, address)`.
    pub fn local_addrs(&self) -> Vec<(ListenTransport, SocketAddr)> {
        let udp = self
            .udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| (ListenTransport::Udp, a));
        let tcp = self
            .tcp
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok())
            .map(|a| (ListenTransport::Tcp, a));
        udp.chain(tcp).collect()
    }

    /// The agent listener's address.
    pub fn agent_addr(&self) -> Option<SocketAddr> {
        self.agents.local_addr().ok()
    }

    /// The admin listener's address, if it serves.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// A handle to send configuration reloads (SIGHUP) to the running
    /// balancer.
    pub fn reloader(&self) -> mpsc::Sender<Reload> {
        self.reloads.0.clone()
    }

    /// Serves until `shutdown` is cancelled, then flushes (bounded by
    /// `sip.shutdown_grace_ms`) and returns. Must run inside a
    /// [`tokio::task::LocalSet`] on a `current_thread` runtime.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = &self.config;
        let router = Router::new(
            config.router_config(rand::random())?,
            self.secrets.tag_keys(),
        );
        let mut public = Vec::new();
        for l in &config.sip.listen {
            let p = PublicAddress {
                transport: l.transport.transport(),
                addr: l.public(),
            };
            if !public.contains(&p) {
                public.push(p);
            }
        }
        let tcp_source_ips = self
            .tcp
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let shared = Rc::new(Shared {
            router: RefCell::new(router),
            conns: RefCell::new(FxHashMap::default()),
            udp: RefCell::new(FxHashMap::default()),
            agents: RefCell::new(FxHashMap::default()),
            connecting: RefCell::new(HashMap::new()),
            per_ip: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            corked: Cell::new(0),
            dirty: RefCell::new(Vec::new()),
            timer_deadline: Cell::new(None),
            timer: Notify::new(),
            settings: Settings::new(config, public, tcp_source_ips, self.secrets.current.clone()),
            counters: Counters::default(),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
        });

        for (transport, addr) in self.local_addrs() {
            info!(transport = ?transport, %addr, "listening for SIP");
        }
        for socket in self.udp {
            let id = shared.next_id();
            let local = socket.local_addr().context("UDP socket address")?;
            let socket = Rc::new(socket);
            shared.udp.borrow_mut().insert(id, socket.clone());
            let public = config
                .sip
                .listen
                .iter()
                .find(|l| l.transport == ListenTransport::Udp && l.address == local)
                .map_or(local, crate::config::Listen::public);
            shared.feed(|r| {
                r.socket_opened(id, Transport::Udp, local);
                r.advertise(Transport::Udp, local, public);
            });
            shared
                .tasks
                .spawn_local(sip::serve_udp(shared.clone(), id, socket, local));
        }
        for (listener, public) in self.tcp {
            let local = listener.local_addr().context("TCP listener address")?;
            shared.feed(|r| {
                r.listener_opened(local);
                r.listener_opened(public);
                r.advertise(Transport::Tcp, local, public);
            });
            shared
                .tasks
                .spawn_local(sip::serve_tcp(shared.clone(), listener, local));
        }
        if let Ok(addr) = self.agents.local_addr() {
            info!(%addr, "listening for agents");
        }
        shared
            .tasks
            .spawn_local(agents::serve_agents(shared.clone(), self.agents));
        // Plain SIP backends join now that the sockets are known.
        shared.feed(|r| r.start(Instant::now()));
        shared.tasks.spawn_local(timer(shared.clone()));
        shared
            .tasks
            .spawn_local(apply_reloads(shared.clone(), self.reloads.1));
        if let Some((listener, token)) = self.admin {
            admin::start(&shared, listener, token, config);
        }

        shutdown.cancelled().await;
        let grace = shared.settings.shutdown_grace;
        info!(
            grace_ms = grace.as_millis(),
            "shutting down: no new connections, flushing queues"
        );
        shared.tasks.close();
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = shared.tasks.len(),
                "shutdown grace period over; closing what is left"
            );
        }
        let c = &shared.counters;
        info!(
            queue_full_drops = c.queue_full.get(),
            gone_drops = c.gone.get(),
            udp_drops = c.udp_drops.get(),
            connect_failures = c.connect_failures.get(),
            connections_refused = c.conns_refused.get(),
            agent_queue_drops = c.agent_queue_full.get(),
            agents_refused = c.agents_refused.get(),
            "stopped"
        );
        Ok(())
    }
}

/// Settings the tasks need, fixed at start.
#[derive(Debug)]
struct Settings {
    limits: encap_proto::sip::Limits,
    max_connections: usize,
    max_connections_per_ip: usize,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    connect_timeout: Duration,
    write_queue: usize,
    shutdown_grace: Duration,
    /// Source addresses for connections the balancer opens (its TCP
    /// listeners' addresses), so peers see the balancer's address.
    tcp_source_ips: Vec<IpAddr>,
    agent_name: String,
    /// The cluster secret new agent links authenticate with (reloadable).
    secret: RefCell<Vec<u8>>,
    agent_ids: std::collections::BTreeMap<String, BackendId>,
    max_frame_body: u32,
    handshake_timeout: Duration,
    agent_queue: usize,
    report_interval_ms: u32,
    /// An agent link silent this long is closed.
    agent_idle: Duration,
    public: Vec<PublicAddress>,
    /// The new-call table's bound and entry lifetime (admin API).
    new_call_capacity: usize,
    new_call_lifetime_ms: u64,
}

impl Settings {
    fn new(
        config: &Config,
        public: Vec<PublicAddress>,
        tcp_source_ips: Vec<IpAddr>,
        secret: Vec<u8>,
    ) -> Settings {
        let report = Duration::from_millis(u64::from(config.routing.report_interval_ms));
        Settings {
            limits: config.limits.sip_limits(),
            max_connections: config.sip.max_connections,
            max_connections_per_ip: config.sip.max_connections_per_ip,
            idle_timeout: Duration::from_secs(config.sip.idle_timeout_secs),
            header_read_timeout: Duration::from_secs(config.sip.header_read_timeout_secs),
            connect_timeout: Duration::from_millis(config.sip.connect_timeout_ms),
            write_queue: config.sip.write_queue_messages,
            shutdown_grace: Duration::from_millis(config.sip.shutdown_grace_ms),
            tcp_source_ips,
            agent_name: config.agents.name.clone(),
            secret: RefCell::new(secret),
            agent_ids: config.agents.ids.clone(),
            max_frame_body: config.agents.max_frame_body,
            handshake_timeout: Duration::from_millis(config.agents.handshake_timeout_ms),
            agent_queue: config.agents.write_queue_frames,
            report_interval_ms: config.routing.report_interval_ms,
            // Well past the router's "missed reports" limit, which marks the
            // backend down first; this only reclaims dead links.
            agent_idle: (report * config.routing.missed_reports_down.saturating_mul(4))
                .max(Duration::from_secs(10)),
            public,
            new_call_capacity: config.routing.new_call_capacity,
            new_call_lifetime_ms: config.routing.new_call_lifetime_ms,
        }
    }
}

/// Drops and refusals, counted (the log says them once; these add up).
#[derive(Debug, Default)]
struct Counters {
    /// Messages dropped because a connection's queue was full.
    queue_full: Cell<u64>,
    /// Messages for a connection that closed meanwhile.
    gone: Cell<u64>,
    /// Datagrams not sent (socket buffer full, or an error).
    udp_drops: Cell<u64>,
    /// Connections to peers that could not be opened.
    connect_failures: Cell<u64>,
    /// Connections refused or dropped by the connection limits.
    conns_refused: Cell<u64>,
    /// Frames dropped because an agent link's queue was full.
    agent_queue_full: Cell<u64>,
    /// Agents refused (authentication, duplicate, protocol).
    agents_refused: Cell<u64>,
    /// Malformed frames from agents (each closes its link).
    agent_frame_errors: Cell<u64>,
    /// SIP streams closed because they did not frame.
    sip_stream_framing_errors: Cell<u64>,
    /// SIP datagrams dropped because they did not frame.
    sip_datagram_framing_errors: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get().saturating_add(1));
}

/// What a writer task is given.
#[derive(Debug)]
enum Out {
    /// Bytes to write.
    Bytes(Bytes),
    /// Write what came before, then close.
    Close,
}

/// State shared by a connection's reader and writer.
#[derive(Debug)]
struct ConnState {
    /// Fired by either side to stop the other.
    cancel: CancellationToken,
    /// Last time bytes went out (for the idle timeout).
    last_write: Cell<Instant>,
}

/// An open SIP stream connection.
#[derive(Debug)]
struct ConnHandle {
    tx: queue::Sender<Out>,
    /// The write side, shared with the writer task: a message for an idle
    /// writer is written straight from the task that routed it.
    w: Rc<OwnedWriteHalf>,
    state: Rc<ConnState>,
    /// Messages sent while corked, not yet handed on (see [`Shared::flush`]).
    pending: RefCell<Vec<Bytes>>,
}

/// An authenticated agent link.
#[derive(Debug)]
struct AgentHandle {
    /// Which link (a backend reconnecting gets a new one).
    link: u64,
    name: String,
    version: u8,
    tx: queue::Sender<Out>,
}

/// Everything the local tasks share.
#[derive(Debug)]
struct Shared {
    router: RefCell<Router>,
    /// Open stream connections. Fx hash: the ids are ours (sequential), so
    /// no seed is needed, and it spreads them into the high bits hashbrown
    /// tags slots with (an identity hash would tag every small id alike).
    conns: RefCell<FxHashMap<ConnId, ConnHandle>>,
    udp: RefCell<FxHashMap<ConnId, Rc<UdpSocket>>>,
    agents: RefCell<FxHashMap<BackendId, AgentHandle>>,
    /// Connections being opened, with the messages waiting for them.
    connecting: RefCell<HashMap<SocketAddr, Vec<Bytes>>>,
    /// Accepted connections per peer IP.
    per_ip: RefCell<HashMap<IpAddr, usize>>,
    next_id: Cell<u64>,
    /// Open [`Cork`] guards.
    corked: Cell<u32>,
    /// Connections with messages held (see [`Shared::cork`]).
    dirty: RefCell<Vec<ConnId>>,
    /// When the timer task will wake next (None: not armed).
    timer_deadline: Cell<Option<Instant>>,
    timer: Notify,
    settings: Settings,
    counters: Counters,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Shared {
    fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1).max(1));
        id
    }

    /// Feeds one input to the router, then carries out every action.
    fn feed(self: &Rc<Self>, input: impl FnOnce(&mut Router)) {
        input(&mut self.router.borrow_mut());
        self.drain();
    }

    /// Carries out every pending action, then wakes the timer if the
    /// router's deadline moved earlier.
    fn drain(self: &Rc<Self>) {
        loop {
            // The borrow ends with the statement: `perform` never runs under it.
            let action = self.router.borrow_mut().poll_action();
            match action {
                Some(action) => self.perform(action),
                None => break,
            }
        }
        let next = self.router.borrow().poll_timeout();
        if let Some(next) = next {
            if self.timer_deadline.get().is_none_or(|armed| next < armed) {
                self.timer.notify_one();
            }
        }
    }

    fn perform(self: &Rc<Self>, action: Action) {
        match action {
            Action::ToPeer { egress, message } => match egress {
                Egress::Stream(id) => self.send_stream(id, message),
                Egress::Datagram { socket, to } => self.send_datagram(socket, to, message),
                Egress::Connect { transport, to } => sip::connect(self, transport, to, message),
            },
            Action::ToBackend { backend, frame } => self.send_backend(backend, &frame, false),
            Action::CloseBackend { backend, frame } => match frame {
                Some(frame) => self.send_backend(backend, &frame, true),
                None => {
                    if let Some(a) = self.agents.borrow().get(&backend) {
                        let _ = a.tx.try_send(Out::Close);
                    }
                }
            },
            Action::Event(event) => self.log_event(event),
        }
    }

    /// Sends `message` on stream connection `id`: held with the
    /// connection's other messages while the driver is corked (see
    /// [`Shared::cork`]), handed on at once otherwise.
    fn send_stream(&self, id: ConnId, message: Bytes) {
        let conns = self.conns.borrow();
        let Some(conn) = conns.get(&id) else {
            bump(&self.counters.gone);
            debug!(conn = id, "dropped: the connection closed meanwhile");
            return;
        };
        {
            let mut pending = conn.pending.borrow_mut();
            // The bound holds for what is held and queued together, so
            // handing held messages on never finds the queue full.
            if pending.len() + conn.tx.len() >= self.settings.write_queue {
                bump(&self.counters.queue_full);
                debug!(conn = id, "dropped: the connection's write queue is full");
                return;
            }
            pending.push(message);
            if self.corked.get() > 0 {
                if pending.len() == 1 {
                    self.dirty.borrow_mut().push(id);
                }
                return;
            }
        }
        self.hand_on(conn);
    }

    /// Holds what is sent on stream connections until the guard drops
    /// (the last of nested guards), then hands each connection's messages
    /// on together: one write for what a read burst routed to one peer.
    fn cork(&self) -> Cork<'_> {
        self.corked.set(self.corked.get() + 1);
        Cork(self)
    }

    /// Hands on every held message (see [`Shared::cork`]).
    fn flush(&self) {
        let conns = self.conns.borrow();
        for id in self.dirty.borrow_mut().drain(..) {
            // Closed meanwhile: its held messages went with its handle.
            if let Some(conn) = conns.get(&id) {
                self.hand_on(conn);
            }
        }
    }

    /// Hands on a connection's held messages. While its writer is idle
    /// they are written from here in one vectored write, which saves
    /// waking the writer (a task switch at low rates); what the socket does
    /// not take goes to the writer's queue in order.
    fn hand_on(&self, conn: &ConnHandle) {
        let mut pending = conn.pending.borrow_mut();
        let mut first = 0;
        if conn.tx.is_idle() {
            // On WouldBlock the writer waits for room; on an error it meets
            // it again and closes the connection.
            if let Ok(written) = try_write_vectored(&conn.w, &pending) {
                conn.state.last_write.set(Instant::now());
                first = consume(&mut pending, 0, written);
            }
        }
        for message in pending.drain(..).skip(first) {
            match conn.tx.try_send(Out::Bytes(message)) {
                Ok(()) => {}
                // Not met: send_stream bounds what is held and queued.
                Err(queue::SendError::Full) => bump(&self.counters.queue_full),
                Err(queue::SendError::Closed) => bump(&self.counters.gone),
            }
        }
    }

    fn send_datagram(&self, socket: ConnId, to: SocketAddr, message: Bytes) {
        let sockets = self.udp.borrow();
        let Some(s) = sockets.get(&socket) else {
            bump(&self.counters.udp_drops);
            return;
        };
        if let Err(e) = s.try_send_to(&message, to) {
            bump(&self.counters.udp_drops);
            debug!(%to, error = %e, "dropped datagram");
        }
    }

    fn send_backend(&self, backend: BackendId, frame: &Frame, then_close: bool) {
        let agents = self.agents.borrow();
        let Some(agent) = agents.get(&backend) else {
            debug!(backend, frame = %frame.frame_type(), "dropped: backend has no link");
            return;
        };
        let mut buf = BytesMut::new();
        if let Err(e) = encode(frame, agent.version, &mut buf) {
            warn!(backend, error = %e, "cannot encode a frame for the backend");
            return;
        }
        match agent.tx.try_send(Out::Bytes(buf.freeze())) {
            Ok(()) => {}
            Err(queue::SendError::Full) => {
                bump(&self.counters.agent_queue_full);
                debug!(backend, "dropped: the agent link's write queue is full");
            }
            Err(queue::SendError::Closed) => bump(&self.counters.gone),
        }
        if then_close {
            let _ = agent.tx.try_send(Out::Close);
        }
    }

    fn backend_name(&self, backend: BackendId) -> String {
        self.router
            .borrow()
            .backend_name(backend)
            .unwrap_or("?")
            .to_owned()
    }

    fn log_event(&self, event: Event) {
        match event {
            Event::Rejected {
                peer,
                status,
                reason,
            } => info!(%peer, status, %reason, "rejected SIP request"),
            Event::Dropped {
                from: Source::Peer(peer),
                reason,
            } => info!(%peer, %reason, "dropped SIP message"),
            Event::Dropped {
                from: Source::Backend(backend),
                reason,
            } => {
                let name = self.backend_name(backend);
                warn!(backend, %name, %reason, "dropped message from backend");
            }
            Event::BackendUp { backend } => {
                let name = self.backend_name(backend);
                info!(backend, %name, "backend up");
            }
            Event::BackendDown { backend, reason } => {
                let name = self.backend_name(backend);
                warn!(backend, %name, reason, "backend down");
            }
        }
    }
}

/// See [`Shared::cork`].
struct Cork<'a>(&'a Shared);

impl Drop for Cork<'_> {
    fn drop(&mut self) {
        let n = self.0.corked.get() - 1;
        self.0.corked.set(n);
        if n == 0 {
            self.0.flush();
        }
    }
}

/// Calls `handle_timeout` when the router's deadline is due; woken early
/// when an input moved the deadline earlier.
async fn timer(shared: Rc<Shared>) {
    loop {
        let deadline = shared.router.borrow().poll_timeout();
        shared.timer_deadline.set(deadline);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                let now = Instant::now();
                shared.feed(|r| r.handle_timeout(now));
            }
            () = shared.timer.notified() => {}
            () = shared.shutdown.cancelled() => return,
        }
    }
}

/// Asks for `bytes` of receive buffer on a UDP socket (0: leave it) and
/// logs what the kernel granted (it caps the request at
/// `net.core.rmem_max`; Linux reports twice the usable size).
fn receive_buffer(socket: &UdpSocket, address: SocketAddr, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s.set_recv_buffer_size(bytes) {
        warn!(%address, requested = bytes, error = %e, "cannot set the UDP receive buffer");
    }
    match s.recv_buffer_size() {
        Ok(got) if got < bytes => warn!(
            %address,
            requested = bytes,
            granted = got,
            "UDP receive buffer below sip.udp_receive_buffer_bytes (raise net.core.rmem_max)"
        ),
        Ok(got) => info!(%address, bytes = got, "UDP receive buffer"),
        Err(e) => warn!(%address, error = %e, "cannot read the UDP receive buffer size"),
    }
}

/// The wall clock in microseconds since the UNIX epoch (frame metadata).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Writes what a connection's queue holds, gathering what is queued
/// together into one vectored write (no copy), until the queue closes or
/// says [`Out::Close`]; then shuts the write side and stops the reader.
///
/// The write side is shared (see [`ConnHandle::w`]): others write on it
/// only while the queue says this writer is idle ([`queue::Sender::is_idle`]).
async fn write_loop(w: Rc<OwnedWriteHalf>, mut rx: queue::Receiver<Out>, state: Rc<ConnState>) {
    /// Bytes gathered into one write at most.
    const BATCH: usize = 64 * 1024;
    let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_IOV);
    'run: while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut size = 0;
        match first {
            Out::Bytes(b) => {
                size += b.len();
                batch.push(b);
            }
            Out::Close => close = true,
        }
        while !close && size < BATCH && batch.len() < MAX_IOV {
            match rx.try_recv() {
                Some(Out::Bytes(b)) => {
                    size += b.len();
                    batch.push(b);
                }
                Some(Out::Close) => close = true,
                None => break,
            }
        }
        if size > 0 {
            if let Err(e) = write_all_vectored(&w, &mut batch).await {
                debug!(error = %e, "write failed; closing");
                break 'run;
            }
            state.last_write.set(Instant::now());
        }
        batch.clear();
        if close {
            break;
        }
        rx.done();
    }
    // The write side closes now, though the connection's handle may hold
    // `w` a little longer (until the reader has stopped).
    let stream: &TcpStream = (*w).as_ref();
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    state.cancel.cancel();
}

/// Messages gathered into one vectored write at most.
const MAX_IOV: usize = 64;

/// One vectored write of the first [`MAX_IOV`] of `bufs`, without waiting.
fn try_write_vectored(w: &OwnedWriteHalf, bufs: &[Bytes]) -> std::io::Result<usize> {
    use std::io::IoSlice;
    if let [one] = bufs {
        // The usual batch at low rates: no I/O vector to fill.
        return w.try_write(one);
    }
    let mut iov = [IoSlice::new(&[]); MAX_IOV];
    let mut n = 0;
    for b in bufs.iter().take(MAX_IOV) {
        iov[n] = IoSlice::new(b);
        n += 1;
    }
    w.try_write_vectored(&iov[..n])
}

/// Marks `written` bytes of `bufs[first..]` as gone (the first partly
/// written buffer is advanced) and returns the index of the first buffer
/// with bytes left; empty buffers are skipped.
fn consume(bufs: &mut [Bytes], mut first: usize, mut written: usize) -> usize {
    use bytes::Buf;
    while written > 0 && first < bufs.len() {
        let len = bufs[first].len();
        if written >= len {
            written -= len;
            first += 1;
        } else {
            bufs[first].advance(written);
            written = 0;
        }
    }
    while bufs.get(first).is_some_and(Bytes::is_empty) {
        first += 1;
    }
    first
}

/// Writes every byte of `bufs`, in order, with as few `writev` calls as
/// the socket allows.
async fn write_all_vectored(w: &OwnedWriteHalf, bufs: &mut [Bytes]) -> std::io::Result<()> {
    let mut first = consume(bufs, 0, 0);
    while first < bufs.len() {
        let written = match try_write_vectored(w, &bufs[first..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                w.writable().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        first = consume(bufs, first, written);
    }
    Ok(())
}

/// Applies configuration reloads as they come (SIGHUP), until shutdown.
async fn apply_reloads(shared: Rc<Shared>, mut reloads: mpsc::Receiver<Reload>) {
    loop {
        let reload = tokio::select! {
            r = reloads.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let router_config = match reload.config.router_config(rand::random()) {
            Ok(c) => c,
            Err(e) => {
                warn!(problems = %e, "reload: configuration rejected; keeping the running one");
                continue;
            }
        };
        *shared.settings.secret.borrow_mut() = reload.secrets.current.clone();
        shared.feed(|r| r.reconfigure(&router_config, reload.secrets.tag_keys()));
        info!(
            bad_tag_policy = ?router_config.bad_tag_policy,
            failover = ?router_config.failover_policy,
            retry_after_secs = router_config.retry_after_secs,
            "reload: routing policies, new-call table limits and secrets applied"
        );
    }
}
