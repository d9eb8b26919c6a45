//! The async agent: one task per balancer link, a stream of inbound SIP,
//! and the calls a backend makes to answer and to originate.
//!
//! Tasks run on the caller's tokio runtime; [`Agent`] is a cheap handle
//! (`Clone + Send + Sync`) to use from the application's own tasks.

// The driver half of the agent: it reads clocks and spawns tasks.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use encap_proto::frame::{
    DrainState, FrameCodec, LoadReport, PublicAddress, SipFromBackend, SipToBackend, Transport,
};
use encap_proto::sip::{Rewrite, SipMessage};
use encap_proto::tag::TagKeys;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use crate::dialogs::{DialogCounter, DEFAULT_MAX_CALL_AGE};
use crate::link::{Link, LinkConfig, LinkError, LinkEvent};
use crate::peer::driver::{self as peer_driver, PeerRuntime};
use crate::peer::{PeerConfig, PeerMetrics, PeerPolicy};
use crate::resolve::{ResolveError, Resolver};
use crate::route::{request_next_hop, response_next_hop, RouteError};
use crate::stamp::{is_agent_via, Stamper};

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This backend's name, unique in the cluster (the balancer derives
    /// its backend id from it unless its config names one).
    pub name: String,
    /// The cluster secret (the balancers' `agents.secret_file`).
    pub secret: Vec<u8>,
    /// The agent ports of every balancer of the cluster.
    pub balancers: Vec<SocketAddr>,
    /// Capacity weight reported to the balancers. Default: 100.
    pub capacity: u32,
    /// First reconnect delay; doubles up to `reconnect_max`. Default: 100 ms.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay. Default: 5 s.
    pub reconnect_max: Duration,
    /// Inbound messages buffered for the application. Default: 4096.
    pub inbound_queue: usize,
    /// Age after which a call without BYE stops counting. Default: 12 h.
    pub max_call_age: Duration,
    /// DNS servers for next hops that are names; empty: the system's.
    pub name_servers: Vec<SocketAddr>,
    /// Peer mode (README "Peer mode"): the agent listens for SIP itself
    /// and balances with its peers. Default: off. With it, `balancers`
    /// may be empty.
    pub peer: Option<PeerConfig>,
}

impl AgentConfig {
    /// A configuration with the defaults.
    pub fn new(name: &str, secret: &[u8], balancers: Vec<SocketAddr>) -> AgentConfig {
        AgentConfig {
            name: name.to_owned(),
            secret: secret.to_vec(),
            balancers,
            capacity: 100,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            inbound_queue: 4096,
            max_call_age: DEFAULT_MAX_CALL_AGE,
            name_servers: Vec::new(),
            peer: None,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No balancer address was given: set `AgentConfig::balancers` (or
    /// `AgentConfig::peer`).
    #[error("no balancer configured: set AgentConfig::balancers or AgentConfig::peer")]
    NoBalancer,
    /// A peer-mode listener could not be bound.
    #[error("cannot bind the {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// The system DNS configuration is unusable; set `name_servers`.
    #[error(transparent)]
    Resolver(#[from] ResolveError),
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message is not SIP the scanner understands.
    #[error("message to send is not valid SIP: {0}")]
    Malformed(#[from] encap_proto::sip::ScanError),
    /// No next hop: the Via / Route / Request-URI does not say where.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The next hop's name did not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// No link to any balancer is up; it will be retried by reconnecting,
    /// the message is not queued: send it again (SIP retransmits anyway).
    #[error("no balancer link is established")]
    NoBalancer,
    /// The agent was shut down.
    #[error("the agent is shut down")]
    Shutdown,
}

/// Which way a message reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Through a balancer link.
    Balancer,
    /// On the agent's own SIP listener (peer mode); it is answered there.
    Listener,
    /// Forwarded by a peer over its peer link (peer mode).
    Peer,
}

/// Where an inbound message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Which way it came.
    pub source: Source,
    /// The balancer (its agent port) or peer it came through; for
    /// [`Source::Listener`], the listener's address.
    pub balancer: SocketAddr,
    /// Our backend id at that balancer.
    pub backend_id: u16,
    /// The balancer's id of the inbound connection or socket.
    pub connection: u64,
    /// The transport it arrived on.
    pub transport: Transport,
    /// The sender's address.
    pub peer: SocketAddr,
    /// The balancer address it arrived at.
    pub local: SocketAddr,
    /// Arrival at the balancer, microseconds since the UNIX epoch.
    pub arrival_unix_us: u64,
    /// The call belonged to another backend that is down (design.md §6).
    pub failover: bool,
}

/// A SIP message for this backend.
#[derive(Debug)]
pub struct Incoming {
    /// The message as it crossed the link (for a response, without the
    /// agent's own top Via).
    pub raw: Bytes,
    /// The message typed by `rsip`, or why rsip could not parse it (the
    /// message is delivered either way).
    pub sip: Result<rsip::SipMessage, rsip::Error>,
    /// Where it came from.
    pub meta: Meta,
    scanned: SipMessage,
}

impl Incoming {
    /// The zero-copy scan of the message (Call-ID, Via, tags, ...), which
    /// works where rsip does not (compact names, folded lines).
    pub fn scanned(&self) -> &SipMessage {
        &self.scanned
    }
}

/// The state of one balancer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting or authenticating.
    Connecting,
    /// Serving.
    Established {
        /// Our backend id there.
        backend_id: u16,
    },
    /// Down; reconnecting after a delay.
    Backoff {
        /// Why it went down.
        reason: String,
        /// The delay before the next attempt.
        retry_in: Duration,
    },
}

#[derive(Debug)]
enum Command {
    Sip(SipFromBackend),
    Drain(DrainState),
}

#[derive(Debug)]
struct LinkSlot {
    commands: mpsc::Sender<Command>,
    state: LinkState,
    addresses: Vec<PublicAddress>,
    /// A peer's link (peer mode), not a balancer's.
    peer: bool,
    /// The name the other side gave in CHALLENGE.
    remote_name: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    pub(crate) keys: TagKeys,
    links: Mutex<HashMap<SocketAddr, LinkSlot>>,
    dialogs: Mutex<DialogCounter>,
    capacity: AtomicU32,
    /// `u16::MAX`: no score set.
    score: AtomicU16,
    draining: AtomicBool,
    msgs_in: AtomicU64,
    msgs_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    cpu: Mutex<CpuSampler>,
    resolver: Resolver,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) peer: Option<Arc<PeerRuntime>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // keep serving rather than poison every later call.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The handle a backend uses: send, report, drain. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

/// The stream of inbound SIP messages.
#[derive(Debug)]
pub struct Inbound {
    rx: mpsc::Receiver<Incoming>,
}

impl Inbound {
    /// The next message; `None` once the agent is shut down.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}

impl futures::Stream for Inbound {
    type Item = Incoming;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Incoming>> {
        self.rx.poll_recv(cx)
    }
}

/// Messages the agent can send: raw bytes, or rsip's typed messages.
pub trait IntoSip {
    /// The message's bytes.
    fn into_sip_bytes(self) -> Bytes;
}

impl IntoSip for Bytes {
    fn into_sip_bytes(self) -> Bytes {
        self
    }
}

impl IntoSip for Vec<u8> {
    fn into_sip_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}

impl IntoSip for String {
    fn into_sip_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}

impl IntoSip for rsip::SipMessage {
    fn into_sip_bytes(self) -> Bytes {
        Bytes::from(self.to_string())
    }
}

impl IntoSip for rsip::Response {
    fn into_sip_bytes(self) -> Bytes {
        Bytes::from(self.to_string())
    }
}

impl IntoSip for rsip::Request {
    fn into_sip_bytes(self) -> Bytes {
        Bytes::from(self.to_string())
    }
}

impl Agent {
    /// Starts the agent on the current tokio runtime: one link task per
    /// balancer, connecting at once and reconnecting with capped
    /// exponential backoff and jitter.
    pub fn start(config: AgentConfig) -> Result<(Agent, Inbound), AgentError> {
        if config.balancers.is_empty() && config.peer.is_none() {
            return Err(AgentError::NoBalancer);
        }
        let (peer, listeners) = match &config.peer {
            Some(p) => {
                let (rt, listeners) = PeerRuntime::bind(p.clone(), &config.name)?;
                (Some(Arc::new(rt)), Some(listeners))
            }
            None => (None, None),
        };
        let resolver = if config.name_servers.is_empty() {
            Resolver::system()?
        } else {
            Resolver::with_name_servers(&config.name_servers)
        };
        let (tx, rx) = mpsc::channel(config.inbound_queue.max(1));
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            keys: TagKeys::new(&config.secret),
            links: Mutex::new(HashMap::new()),
            dialogs: Mutex::new(DialogCounter::new(rand::random(), config.max_call_age)),
            capacity: AtomicU32::new(config.capacity),
            score: AtomicU16::new(u16::MAX),
            draining: AtomicBool::new(false),
            msgs_in: AtomicU64::new(0),
            msgs_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            cpu: Mutex::new(CpuSampler::default()),
            resolver,
            shutdown,
            peer,
            config,
        });
        let peers = shared.config.peer.as_ref().map_or(Vec::new(), |p| {
            p.peers
                .iter()
                .copied()
                .filter(|a| *a != p.peer_listen && !shared.config.balancers.contains(a))
                .collect()
        });
        let dial = shared
            .config
            .balancers
            .iter()
            .map(|a| (*a, false))
            .chain(peers.into_iter().map(|a| (a, true)));
        for (balancer, is_peer) in dial {
            let (commands, command_rx) = mpsc::channel(4096);
            lock(&shared.links).insert(
                balancer,
                LinkSlot {
                    commands,
                    state: LinkState::Connecting,
                    addresses: Vec::new(),
                    peer: is_peer,
                    remote_name: None,
                },
            );
            tokio::spawn(run_link(
                shared.clone(),
                balancer,
                is_peer,
                command_rx,
                tx.clone(),
            ));
        }
        if let Some(listeners) = listeners {
            peer_driver::spawn(&shared, listeners, tx);
        }
        Ok((Agent { shared }, Inbound { rx }))
    }

    /// The state of every balancer link.
    pub fn links(&self) -> Vec<(SocketAddr, LinkState)> {
        let mut out: Vec<_> = lock(&self.shared.links)
            .iter()
            .map(|(a, s)| (*a, s.state.clone()))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// Waits until at least one balancer link is established, or `timeout`.
    pub async fn wait_established(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self
                .links()
                .iter()
                .any(|(_, s)| matches!(s, LinkState::Established { .. }))
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Active calls, as counted from the dialogs that passed.
    pub fn active_calls(&self) -> usize {
        lock(&self.shared.dialogs).active()
    }

    /// Sets the capacity weight reported to the balancers.
    pub fn set_capacity(&self, capacity: u32) {
        self.shared.capacity.store(capacity, Ordering::Relaxed);
    }

    /// Sets (or clears) the application score reported to the balancers,
    /// 0 idle ..= 10000 full (larger values are capped).
    pub fn set_score(&self, score: Option<u16>) {
        self.shared
            .score
            .store(score.map_or(u16::MAX, |s| s.min(10_000)), Ordering::Relaxed);
    }

    /// Stops taking new calls: the balancers send only in-dialog traffic.
    /// Reports `Drained` once no call is left (see [`Agent::active_calls`]).
    pub async fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.broadcast(Command::Drain(DrainState::Draining)).await;
    }

    /// Takes new calls again.
    pub async fn undrain(&self) {
        self.shared.draining.store(false, Ordering::Relaxed);
        self.broadcast(Command::Drain(DrainState::Serving)).await;
    }

    async fn broadcast(&self, make: Command) {
        let senders: Vec<_> = lock(&self.shared.links)
            .values()
            .map(|s| s.commands.clone())
            .collect();
        for s in senders {
            let cmd = match &make {
                Command::Drain(d) => Command::Drain(*d),
                Command::Sip(sip) => Command::Sip(sip.clone()),
            };
            let _ = s.send(cmd).await;
        }
    }

    /// Closes every link in order (GOODBYE) and ends the inbound stream.
    pub fn shutdown(&self) {
        // Stored even with no receiver now: tasks that subscribe later see it.
        self.shared.shutdown.send_replace(true);
        if let Some(rt) = &self.shared.peer {
            rt.stop();
        }
    }

    /// Replaces the peer-mode thresholds and rules; the next new call is
    /// decided with them. `false` when peer mode is off.
    pub fn set_peer_policy(&self, policy: PeerPolicy) -> bool {
        match &self.shared.peer {
            Some(rt) => {
                info!(
                    local_below_percent = policy.local_below_percent,
                    handoff_margin_points = policy.handoff_margin_points,
                    rules = policy.rules.len(),
                    "peer policy replaced"
                );
                rt.set_policy(policy);
                true
            }
            None => false,
        }
    }

    /// The peer-mode thresholds and rules in force; `None` when peer mode
    /// is off.
    pub fn peer_policy(&self) -> Option<PeerPolicy> {
        self.shared.peer.as_ref().map(|rt| rt.policy())
    }

    /// Peer mode's metrics: hand-offs by peer and reason, calls kept by
    /// reason, every peer's state and load; `None` when peer mode is off.
    pub fn peer_metrics(&self) -> Option<PeerMetrics> {
        let local = crate::peer::decide::load_percent(&self.shared.load_now());
        self.shared.peer.as_ref().map(|rt| rt.metrics(local))
    }

    /// Sends a response to `request` through the balancer it came from,
    /// to the next hop of its top Via (received/rport first), on the
    /// connection it arrived on when that is still open.
    pub async fn respond(
        &self,
        request: &Incoming,
        response: impl IntoSip,
    ) -> Result<(), SendError> {
        let msg = SipMessage::parse(response.into_sip_bytes())?;
        let via = msg.top_via().ok_or(RouteError::NoVia)?;
        let (transport, next_hop) = self
            .shared
            .resolver
            .resolve(&response_next_hop(&via)?)
            .await?;
        let meta = request.meta;
        let link = self.pick_link(Some(meta.balancer), transport);
        // Peer mode: a request from our own listener is answered on the
        // socket or connection it came on; one a peer forwarded goes back
        // through that peer, or straight out if its link is gone.
        let direct = meta.source == Source::Listener
            || (meta.source == Source::Peer
                && link.as_ref().map_or(true, |(b, ..)| *b != meta.balancer));
        if direct {
            let rt = self.shared.peer.as_ref().ok_or(SendError::NoBalancer)?;
            let stamper = Stamper {
                keys: &self.shared.keys,
                backend_id: rt.own_id,
                public: rt.config.sip_public,
            };
            let message = stamper.response(&msg);
            self.count_out(&msg, message.len());
            // The connection id is ours only for our own listener.
            let connection = (meta.source == Source::Listener).then_some(meta.connection);
            peer_driver::send_now(&self.shared, rt, transport, connection, next_hop, message);
            return Ok(());
        }
        let (balancer, mut public, mut backend_id) = link?;
        if let (Source::Peer, Some(rt)) = (meta.source, &self.shared.peer) {
            // A call a peer forwarded is ours: in-dialog requests must
            // name us and come to our own address.
            public = rt.config.sip_public;
            backend_id = rt.own_id;
        }
        let stamper = Stamper {
            keys: &self.shared.keys,
            backend_id,
            public,
        };
        let message = stamper.response(&msg);
        let connection = (balancer == meta.balancer).then_some(meta.connection);
        self.send(
            balancer,
            &msg,
            SipFromBackend {
                connection,
                transport,
                next_hop,
                message,
            },
        )
        .await
    }

    /// Sends a request the backend originates (its outbound leg, or an
    /// in-dialog request) through a balancer: the agent adds its Via with
    /// the tag in the branch and stamps the Contact, and resolves the next
    /// hop from the Route or Request-URI.
    pub async fn send_request(&self, request: impl IntoSip) -> Result<(), SendError> {
        let msg = SipMessage::parse(request.into_sip_bytes())?;
        let (transport, next_hop) = self
            .shared
            .resolver
            .resolve(&request_next_hop(&msg)?)
            .await?;
        let (balancer, public, backend_id) =
            match (self.pick_link(None, transport), &self.shared.peer) {
                (Ok(link), _) => link,
                (Err(_), Some(rt)) => {
                    // Peer mode without a balancer: out of our own listener,
                    // Via and Contact naming us, so the answers come back here.
                    let stamper = Stamper {
                        keys: &self.shared.keys,
                        backend_id: rt.own_id,
                        public: rt.config.sip_public,
                    };
                    let message = stamper.request(&msg, transport);
                    self.count_out(&msg, message.len());
                    peer_driver::send_now(&self.shared, rt, transport, None, next_hop, message);
                    return Ok(());
                }
                (Err(e), None) => return Err(e),
            };
        let stamper = Stamper {
            keys: &self.shared.keys,
            backend_id,
            public,
        };
        let message = stamper.request(&msg, transport);
        self.send(
            balancer,
            &msg,
            SipFromBackend {
                connection: None,
                transport,
                next_hop,
                message,
            },
        )
        .await
    }

    /// The link to send through: `prefer` if established, else any
    /// established balancer link (never a peer's: a peer relays only what
    /// it forwarded); with the balancer's public address for `transport`.
    fn pick_link(
        &self,
        prefer: Option<SocketAddr>,
        transport: Transport,
    ) -> Result<(SocketAddr, SocketAddr, u16), SendError> {
        let links = lock(&self.shared.links);
        let usable = |addr: &SocketAddr, slot: &LinkSlot| match slot.state {
            LinkState::Established { backend_id } => {
                let public = slot
                    .addresses
                    .iter()
                    .find(|a| a.transport == transport)
                    .or_else(|| slot.addresses.first())
                    .map(|a| a.addr)?;
                Some((*addr, public, backend_id))
            }
            _ => None,
        };
        prefer
            .and_then(|p| links.get(&p).and_then(|slot| usable(&p, slot)))
            .or_else(|| {
                let mut all: Vec<_> = links
                    .iter()
                    .filter(|(_, s)| !s.peer)
                    .filter_map(|(a, s)| usable(a, s))
                    .collect();
                all.sort();
                all.into_iter().next()
            })
            .ok_or(SendError::NoBalancer)
    }

    async fn send(
        &self,
        balancer: SocketAddr,
        msg: &SipMessage,
        sip: SipFromBackend,
    ) -> Result<(), SendError> {
        self.count_out(msg, sip.message.len());
        let sender = lock(&self.shared.links)
            .get(&balancer)
            .map(|s| s.commands.clone())
            .ok_or(SendError::NoBalancer)?;
        sender
            .send(Command::Sip(sip))
            .await
            .map_err(|_| SendError::Shutdown)
    }
}

impl Agent {
    fn count_out(&self, msg: &SipMessage, len: usize) {
        lock(&self.shared.dialogs).outbound(Instant::now(), msg);
        self.shared.msgs_out.fetch_add(1, Ordering::Relaxed);
        self.shared
            .bytes_out
            .fetch_add(len as u64, Ordering::Relaxed);
    }
}

impl Shared {
    /// The load now, for peer-mode decisions: calls, capacity and score
    /// (no CPU sample, which would shorten the reports' CPU window).
    pub(crate) fn load_now(&self) -> LoadReport {
        let score = self.score.load(Ordering::Relaxed);
        LoadReport {
            active_calls: u32::try_from(lock(&self.dialogs).active()).unwrap_or(u32::MAX),
            capacity: self.capacity.load(Ordering::Relaxed),
            score: (score != u16::MAX).then_some(score),
            ..LoadReport::default()
        }
    }

    /// The SIP addresses a peer gave us when we dialed it (its WELCOME),
    /// found by the name it gave (its CHALLENGE).
    pub(crate) fn peer_sip_address(&self, name: &str) -> Option<Vec<PublicAddress>> {
        lock(&self.links)
            .values()
            .find(|s| {
                s.peer
                    && s.remote_name.as_deref() == Some(name)
                    && matches!(s.state, LinkState::Established { .. })
            })
            .map(|s| s.addresses.clone())
            .filter(|a| !a.is_empty())
    }

    fn load(&self) -> LoadReport {
        let active = lock(&self.dialogs).active();
        let score = self.score.load(Ordering::Relaxed);
        LoadReport {
            seq: 0,
            active_calls: u32::try_from(active).unwrap_or(u32::MAX),
            cpu_permille: lock(&self.cpu).sample(),
            capacity: self.capacity.load(Ordering::Relaxed),
            score: (score != u16::MAX).then_some(score),
            msgs_in: self.msgs_in.load(Ordering::Relaxed),
            msgs_out: self.msgs_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    fn set_state(
        &self,
        balancer: SocketAddr,
        state: LinkState,
        addresses: Option<Vec<PublicAddress>>,
    ) {
        if let Some(slot) = lock(&self.links).get_mut(&balancer) {
            slot.state = state;
            if let Some(a) = addresses {
                slot.addresses = a;
            }
        }
    }

    fn drain_state(&self) -> Option<DrainState> {
        if !self.draining.load(Ordering::Relaxed) {
            return None;
        }
        Some(if lock(&self.dialogs).active() == 0 {
            DrainState::Drained
        } else {
            DrainState::Draining
        })
    }
}

/// One balancer: connect, serve, back off, again; until shutdown.
async fn run_link(
    shared: Arc<Shared>,
    balancer: SocketAddr,
    is_peer: bool,
    mut commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Incoming>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut delay = shared.config.reconnect_initial;
    loop {
        if *shutdown.borrow() {
            return;
        }
        shared.set_state(balancer, LinkState::Connecting, None);
        let reason = match serve_link(
            &shared,
            balancer,
            is_peer,
            &mut commands,
            &inbound,
            &mut shutdown,
        )
        .await
        {
            Ok(Served::Shutdown) => return,
            Ok(Served::Established(e)) => {
                // It worked for a while: start the backoff over.
                delay = shared.config.reconnect_initial;
                e.to_string()
            }
            Err(e) => e,
        };
        // Capped exponential backoff with ±20% jitter.
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        let wait = delay.mul_f64(jitter);
        warn!(%balancer, %reason, retry_in_ms = wait.as_millis() as u64, "balancer link down");
        shared.set_state(
            balancer,
            LinkState::Backoff {
                reason,
                retry_in: wait,
            },
            None,
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        delay = (delay * 2).min(shared.config.reconnect_max);
    }
}

enum Served {
    Shutdown,
    Established(LinkError),
}

async fn serve_link(
    shared: &Arc<Shared>,
    balancer: SocketAddr,
    is_peer: bool,
    commands: &mut mpsc::Receiver<Command>,
    inbound: &mpsc::Sender<Incoming>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Served, String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(balancer))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, FrameCodec::default());
    let mut link = Link::new(
        Instant::now(),
        LinkConfig::new(&shared.config.name, &shared.config.secret),
        rand::random(),
    );
    let mut established = false;
    let mut reported_drain: Option<DrainState> = None;
    loop {
        // Send what the link wants sent, in the version it speaks now.
        framed.codec_mut().set_version(link.version());
        while let Some(frame) = link.poll_transmit() {
            framed
                .feed(frame)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        SinkExt::<encap_proto::frame::Frame>::flush(&mut framed)
            .await
            .map_err(|e| format!("write: {e}"))?;
        while let Some(event) = link.poll_event() {
            match event {
                LinkEvent::Established {
                    backend_id,
                    addresses,
                } => {
                    established = true;
                    info!(%balancer, backend_id, "balancer link established");
                    shared.set_state(
                        balancer,
                        LinkState::Established { backend_id },
                        Some(addresses),
                    );
                }
                LinkEvent::Sip(sip) => {
                    let source = if is_peer {
                        Source::Peer
                    } else {
                        Source::Balancer
                    };
                    deliver(
                        shared,
                        balancer,
                        link.backend_id().unwrap_or(0),
                        sip,
                        source,
                        inbound,
                    )
                    .await
                }
                LinkEvent::DrainRequested(state) => {
                    info!(%balancer, ?state, "balancer asks to change the drain state");
                    shared
                        .draining
                        .store(state != DrainState::Serving, Ordering::Relaxed);
                }
                LinkEvent::Closed(e) => {
                    // Flush a last REFUSE/ERROR if the link queued one.
                    while let Some(frame) = link.poll_transmit() {
                        let _ = framed.send(frame).await;
                    }
                    return if established {
                        Ok(Served::Established(e))
                    } else {
                        Err(e.to_string())
                    };
                }
            }
        }
        if established {
            let drain = shared.drain_state();
            if drain != reported_drain && (drain.is_some() || reported_drain.is_some()) {
                link.set_drain(drain.unwrap_or(DrainState::Serving));
                reported_drain = drain;
                continue;
            }
        }
        let wake = link.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(frame)) => {
                    if let encap_proto::frame::Frame::Challenge(c) = &frame {
                        if let Some(slot) = lock(&shared.links).get_mut(&balancer) {
                            slot.remote_name = Some(c.balancer.clone());
                        }
                    }
                    link.handle_frame(Instant::now(), frame)
                }
                Some(Err(e)) => {
                    if let encap_proto::frame::CodecError::Frame(fe) = &e {
                        let _ = framed.send(fe.to_error_frame()).await;
                    }
                    return Err(format!("read: {e}"));
                }
                None => {
                    let e = LinkError::ClosedByBalancer { code: encap_proto::frame::Code::NORMAL, reason: "connection closed".into() };
                    return if established { Ok(Served::Established(e)) } else { Err(e.to_string()) };
                }
            },
            cmd = commands.recv() => match cmd {
                Some(Command::Sip(sip)) => {
                    if let Err(e) = link.send_sip(sip) {
                        debug!(%balancer, error = %e, "dropped a message for a link not yet established");
                    }
                }
                Some(Command::Drain(_)) => {} // the drain state is read from `shared` above
                None => return Ok(Served::Shutdown),
            },
            _ = async { match wake { Some(w) => tokio::time::sleep_until(w).await, None => std::future::pending().await } } => {
                link.handle_timeout(Instant::now(), &shared.load());
            }
            _ = shutdown.changed() => {
                link.goodbye("agent shutting down");
                framed.codec_mut().set_version(link.version());
                while let Some(frame) = link.poll_transmit() {
                    let _ = framed.send(frame).await;
                }
                return Ok(Served::Shutdown);
            }
        }
    }
}

/// Hands a message to the application (rsip-typed, or raw with the
/// parse error), after removing the agent's own Via from responses.
pub(crate) async fn deliver(
    shared: &Shared,
    balancer: SocketAddr,
    backend_id: u16,
    sip: SipToBackend,
    source: Source,
    inbound: &mpsc::Sender<Incoming>,
) {
    shared.msgs_in.fetch_add(1, Ordering::Relaxed);
    shared
        .bytes_in
        .fetch_add(sip.message.len() as u64, Ordering::Relaxed);
    let scanned = match SipMessage::parse(sip.message.clone()) {
        Ok(m) => m,
        Err(e) => {
            // The balancer scanned it before forwarding: this is a bug on
            // one side or the other; say so once per message.
            warn!(%balancer, error = %e, "balancer forwarded a message that does not scan; dropped");
            return;
        }
    };
    let scanned = if !scanned.is_request() && is_agent_via(&scanned) {
        let mut rw = Rewrite::new(&scanned);
        rw.remove_top_via();
        match SipMessage::parse(rw.finish()) {
            Ok(m) => m,
            Err(_) => scanned,
        }
    } else {
        scanned
    };
    lock(&shared.dialogs).inbound(&scanned);
    let raw = scanned.bytes().clone();
    let parsed = rsip::SipMessage::try_from(raw.clone());
    let meta = Meta {
        source,
        balancer,
        backend_id,
        connection: sip.connection,
        transport: sip.transport,
        peer: sip.peer,
        local: sip.local,
        arrival_unix_us: sip.arrival_unix_us,
        failover: sip.failover,
    };
    if inbound
        .send(Incoming {
            raw,
            sip: parsed,
            meta,
            scanned,
        })
        .await
        .is_err()
    {
        debug!("inbound stream dropped by the application");
    }
}

/// Process CPU use between two samples, per mille of the cores available.
#[derive(Debug, Default)]
struct CpuSampler {
    last: Option<(Instant, Duration)>,
}

impl CpuSampler {
    fn sample(&mut self) -> u16 {
        let Some(cpu) = process_cpu_time() else {
            return 0;
        };
        let now = Instant::now();
        let permille = match self.last {
            Some((t, c)) if now > t => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                let used = cpu.saturating_sub(c).as_secs_f64() / (now - t).as_secs_f64() / cores;
                (used * 1000.0).clamp(0.0, 1000.0) as u16
            }
            _ => 0,
        };
        self.last = Some((now, cpu));
        permille
    }
}

/// utime + stime of this process, from /proc (Linux); `None` elsewhere.
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}
