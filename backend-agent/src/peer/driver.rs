//! Peer mode's I/O: the SIP listener (UDP and TCP) that feeds the agent's
//! `Inbound` stream and answers on the socket or connection a request came
//! on, the peer listener (peers' links, where this agent plays the
//! balancer: their load reports in, forwarded calls out, their answers
//! relayed), and the hand-off itself. The decision is [`super::decide`].
//!
//! SIP clients' addresses are personal data: they are logged at debug
//! level only; peers' (infrastructure) addresses at any level.

// A driver: it reads clocks and spawns tasks.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use encap_proto::frame::auth::{BalancerHandshake, BalancerStep};
use encap_proto::frame::{
    Close, Code, Frame, FrameCodec, PublicAddress, SipFromBackend, SipToBackend, Transport,
    DEFAULT_MAX_BODY,
};
use encap_proto::sip::{
    frame_datagram_scanned, Framed as SipFramed, Limits, Rewrite, Scanned, SipMessage, StreamFramer,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use super::decide::{
    self, CallMemory, Decision, Destination, HandOffReason, KeepReason, PeerPolicy, PeerView,
    RequestFacts,
};
use super::{peer_id_of, ForwardFailure, HandOffMode, PeerConfig, PeerMetrics, PeerStatus};
use crate::agent::{deliver, AgentError, Incoming, Shared, Source};
use crate::stamp::TAG_PARAM;

/// The connection id of the UDP socket (TCP connections count from 2).
const UDP_CONNECTION: u64 = 1;
/// How long the Call-ID memory keeps a new call (64 × T1).
const MEMORY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(32);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A peer that dialed us: its load and the way to send it calls.
#[derive(Debug)]
struct PeerEntry {
    id: u16,
    load_percent: u32,
    /// `None` until its first report: not on-line before.
    last_report: Option<Instant>,
    link: mpsc::Sender<SipToBackend>,
}

impl PeerEntry {
    fn view(&self, name: &str) -> Option<PeerView> {
        Some(PeerView {
            name: name.to_owned(),
            load_percent: self.load_percent,
            last_report: self.last_report?,
            linked: !self.link.is_closed(),
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    handed_off: std::collections::BTreeMap<(String, HandOffReason), u64>,
    kept: std::collections::BTreeMap<KeepReason, u64>,
    failovers: u64,
    not_forwarded: std::collections::BTreeMap<(String, ForwardFailure), u64>,
}

/// Peer mode's state, shared by the agent handle and the driver tasks.
#[derive(Debug)]
pub(crate) struct PeerRuntime {
    pub(crate) config: PeerConfig,
    pub(crate) own_id: u16,
    policy: Mutex<PeerPolicy>,
    peers: Mutex<HashMap<String, PeerEntry>>,
    memory: Mutex<CallMemory>,
    udp: Arc<UdpSocket>,
    /// Open SIP TCP connections: id -> (remote address, write queue).
    conns: Mutex<HashMap<u64, (SocketAddr, mpsc::Sender<Bytes>)>>,
    next_conn: AtomicU64,
    counters: Mutex<Counters>,
    inbound: Mutex<Option<mpsc::Sender<Incoming>>>,
    /// SIP size limits of the listener, UDP and TCP.
    limits: Limits,
}

/// The listeners bound by [`PeerRuntime::bind`], for [`spawn`].
#[derive(Debug)]
pub(crate) struct Listeners {
    sip_tcp: TcpListener,
    peers: TcpListener,
}

fn bind_err(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Bind { what, addr, source }
}

impl PeerRuntime {
    /// Binds the SIP (UDP, TCP) and peer listeners; must run inside a
    /// tokio runtime.
    pub(crate) fn bind(
        config: PeerConfig,
        name: &str,
    ) -> Result<(PeerRuntime, Listeners), AgentError> {
        let std_udp = std::net::UdpSocket::bind(config.sip_listen)
            .map_err(bind_err("SIP UDP listener", config.sip_listen))?;
        std_udp
            .set_nonblocking(true)
            .map_err(bind_err("SIP UDP listener", config.sip_listen))?;
        let udp = UdpSocket::from_std(std_udp)
            .map_err(bind_err("SIP UDP listener", config.sip_listen))?;
        let tcp = |what, addr| -> Result<TcpListener, AgentError> {
            let l = std::net::TcpListener::bind(addr).map_err(bind_err(what, addr))?;
            l.set_nonblocking(true).map_err(bind_err(what, addr))?;
            TcpListener::from_std(l).map_err(bind_err(what, addr))
        };
        let sip_tcp = tcp("SIP TCP listener", config.sip_listen)?;
        let peers = tcp("peer listener", config.peer_listen)?;
        let runtime = PeerRuntime {
            own_id: peer_id_of(name),
            policy: Mutex::new(config.policy.clone()),
            config,
            peers: Mutex::new(HashMap::new()),
            memory: Mutex::new(CallMemory::new(MEMORY_LIFETIME)),
            udp: Arc::new(udp),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(UDP_CONNECTION + 1),
            counters: Mutex::new(Counters::default()),
            inbound: Mutex::new(None),
            limits: Limits::default(),
        };
        Ok((runtime, Listeners { sip_tcp, peers }))
    }

    pub(crate) fn set_policy(&self, policy: PeerPolicy) {
        *lock(&self.policy) = policy;
    }

    pub(crate) fn policy(&self) -> PeerPolicy {
        lock(&self.policy).clone()
    }

    pub(crate) fn stop(&self) {
        lock(&self.inbound).take();
    }

    fn views(&self) -> Vec<PeerView> {
        lock(&self.peers)
            .iter()
            .filter_map(|(name, e)| e.view(name))
            .collect()
    }

    pub(crate) fn metrics(&self, local_load_percent: u32) -> PeerMetrics {
        let now = Instant::now();
        let mut peers: Vec<PeerStatus> = lock(&self.peers)
            .iter()
            .map(|(name, e)| PeerStatus {
                name: name.clone(),
                id: e.id,
                online: e.view(name).is_some_and(|v| v.online(now)),
                load_percent: e.load_percent,
                last_report_age: e.last_report.map(|t| now.saturating_duration_since(t)),
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let c = lock(&self.counters);
        PeerMetrics {
            handed_off: c.handed_off.clone(),
            kept: c.kept.clone(),
            failovers: c.failovers,
            not_forwarded: c.not_forwarded.clone(),
            peers,
            local_load_percent,
        }
    }

    fn peer_by_id(&self, id: u16) -> Option<(String, mpsc::Sender<SipToBackend>)> {
        let now = Instant::now();
        lock(&self.peers)
            .iter()
            .find(|(n, e)| e.id == id && e.view(n).is_some_and(|v| v.online(now)))
            .map(|(n, e)| (n.clone(), e.link.clone()))
    }

    fn peer_link(&self, name: &str) -> Option<mpsc::Sender<SipToBackend>> {
        lock(&self.peers)
            .get(name)
            .filter(|e| !e.link.is_closed())
            .map(|e| e.link.clone())
    }

    /// Queues `sip` on a peer's link without waiting (the SIP listener
    /// must never stall behind one peer); a failure is counted and hands
    /// the request back.
    fn try_forward(
        &self,
        peer: &str,
        link: &mpsc::Sender<SipToBackend>,
        sip: SipToBackend,
    ) -> Result<(), Box<(ForwardFailure, SipToBackend)>> {
        let (reason, sip) = match link.try_send(sip) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(sip)) => (ForwardFailure::QueueFull, sip),
            Err(mpsc::error::TrySendError::Closed(sip)) => (ForwardFailure::LinkClosed, sip),
        };
        *lock(&self.counters)
            .not_forwarded
            .entry((peer.to_owned(), reason))
            .or_insert(0) += 1;
        Err(Box::new((reason, sip)))
    }

    fn count_handoff(&self, peer: &str, reason: HandOffReason) {
        *lock(&self.counters)
            .handed_off
            .entry((peer.to_owned(), reason))
            .or_insert(0) += 1;
    }
}

/// Resolves once the agent is shutting down, at once if it already is: a
/// task that subscribes after the shutdown was sent still sees it.
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Starts the listener tasks.
pub(crate) fn spawn(shared: &Arc<Shared>, listeners: Listeners, inbound: mpsc::Sender<Incoming>) {
    let Some(rt) = shared.peer.clone() else {
        return;
    };
    *lock(&rt.inbound) = Some(inbound);
    info!(sip = %rt.config.sip_listen, peers = %rt.config.peer_listen, "peer mode: listening");
    tokio::spawn(run_udp(shared.clone(), rt.clone()));
    tokio::spawn(run_sip_tcp(shared.clone(), rt.clone(), listeners.sip_tcp));
    tokio::spawn(run_peer_listener(shared.clone(), rt, listeners.peers));
}

async fn run_udp(shared: Arc<Shared>, rt: Arc<PeerRuntime>) {
    let mut shutdown = shared.shutdown.subscribe();
    let local = rt.config.sip_listen;
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            r = rt.udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let bytes = Bytes::copy_from_slice(&buf[..n]);
                    let Some(msg) = scan_datagram(bytes, &rt.limits) else {
                        debug!(peer = %from, "SIP datagram dropped (keep-alive, over the limits or not SIP)");
                        continue;
                    };
                    on_message(&shared, &rt, msg, Transport::Udp, UDP_CONNECTION, from, local).await;
                }
                Err(e) => debug!(error = %e, "SIP UDP receive error"),
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// One SIP datagram framed as the balancer frames it: bytes after the
/// body Content-Length announces dropped, the limits enforced; `None` for
/// a keep-alive or what is not a SIP message within the limits.
fn scan_datagram(datagram: Bytes, limits: &Limits) -> Option<SipMessage> {
    match frame_datagram_scanned(datagram, limits) {
        Ok(Scanned::Message(msg)) => Some(msg),
        Ok(Scanned::Invalid { error, .. }) => {
            debug!(%error, "SIP datagram does not scan");
            None
        }
        Ok(_) => None, // keep-alive
        Err(error) => {
            debug!(%error, "SIP datagram cannot be framed");
            None
        }
    }
}

async fn run_sip_tcp(shared: Arc<Shared>, rt: Arc<PeerRuntime>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => { register_tcp(&shared, &rt, stream); }
                Err(e) => warn!(error = %e, "SIP TCP accept failed"),
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Serves one SIP TCP connection (accepted or opened): a writer fed by a
/// bounded queue and a reader that frames and hands messages on.
fn register_tcp(
    shared: &Arc<Shared>,
    rt: &Arc<PeerRuntime>,
    stream: TcpStream,
) -> mpsc::Sender<Bytes> {
    let _ = stream.set_nodelay(true);
    let id = rt.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(p), Ok(l)) => (p, l),
        // Not connected any more: the queue's receiver is dropped below,
        // so a send on `tx` fails and says so.
        _ => return tx,
    };
    lock(&rt.conns).insert(id, (peer, tx.clone()));
    let (mut read, mut write) = stream.into_split();
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let (shared, rt, pong) = (shared.clone(), rt.clone(), tx.clone());
    tokio::spawn(async move {
        let mut framer = StreamFramer::new(rt.limits);
        let mut buf = BytesMut::with_capacity(8192);
        let mut shutdown = shared.shutdown.subscribe();
        'conn: loop {
            loop {
                match framer.decode(&mut buf) {
                    Ok(Some(SipFramed::Message(m))) => {
                        match SipMessage::parse_with(m, &rt.limits) {
                            Ok(m) => {
                                on_message(&shared, &rt, m, Transport::Tcp, id, peer, local).await
                            }
                            Err(e) => {
                                debug!(%peer, error = %e, "SIP message does not scan; dropped")
                            }
                        }
                    }
                    Ok(Some(SipFramed::Ping)) => {
                        let _ = pong.try_send(Bytes::from_static(b"\r\n"));
                    }
                    Ok(Some(SipFramed::Pong)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        debug!(%peer, "SIP stream that cannot be framed");
                        warn!(error = %e, "SIP stream cannot be framed; closing it");
                        break 'conn;
                    }
                }
            }
            tokio::select! {
                r = read.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = stopped(&mut shutdown) => break,
            }
        }
        lock(&rt.conns).remove(&id);
    });
    tx
}

/// How long opening a SIP TCP connection to a next hop may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Logs a failed SIP datagram: the next hop may be a client, so its
/// address is logged at debug level only.
fn udp_send_failed(next_hop: SocketAddr, e: &std::io::Error) {
    debug!(%next_hop, "SIP UDP send failed");
    warn!(error = %e, "SIP UDP send failed");
}

/// Sends `message` out directly: on connection `connection` when it is a
/// stream still open, else a datagram (UDP) or a new connection (TCP) to
/// `next_hop`. Never waits: queued on the socket or open connection at
/// once (so messages keep their order), or, when a connection must be
/// opened first, in a task of its own bounded by [`CONNECT_TIMEOUT`]. The peer link's loop calls it, so a next hop that
/// does not answer never stalls the link's reading.
pub(crate) fn send_now(
    shared: &Arc<Shared>,
    rt: &Arc<PeerRuntime>,
    transport: Transport,
    connection: Option<u64>,
    next_hop: SocketAddr,
    message: Bytes,
) {
    match transport {
        Transport::Udp => match rt.udp.try_send_to(&message, next_hop) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let rt = rt.clone();
                tokio::spawn(async move {
                    if let Err(e) = rt.udp.send_to(&message, next_hop).await {
                        udp_send_failed(next_hop, &e);
                    }
                });
            }
            Err(e) => udp_send_failed(next_hop, &e),
        },
        _ => {
            // The connection it answers, else any open one to that address
            // (RFC 3261 §18.1.1 / §18.2.2), else a new one.
            let open = {
                let conns = lock(&rt.conns);
                connection
                    .and_then(|c| conns.get(&c))
                    .filter(|(_, tx)| !tx.is_closed())
                    .or_else(|| {
                        conns
                            .values()
                            .find(|(addr, tx)| *addr == next_hop && !tx.is_closed())
                    })
                    .map(|(_, tx)| tx.clone())
            };
            match open {
                Some(tx) => queue_on(&tx, next_hop, message),
                None => {
                    let (shared, rt) = (shared.clone(), rt.clone());
                    tokio::spawn(async move {
                        match connect(next_hop, CONNECT_TIMEOUT).await {
                            Ok(stream) => {
                                let tx = register_tcp(&shared, &rt, stream);
                                queue_on(&tx, next_hop, message);
                            }
                            Err(e) => {
                                // The next hop may be a client: named at
                                // debug level only.
                                debug!(error = %e, "SIP TCP connect failed");
                                warn!("cannot open a SIP TCP connection to the next hop; message dropped");
                            }
                        }
                    });
                }
            }
        }
    }
}

fn queue_on(tx: &mpsc::Sender<Bytes>, next_hop: SocketAddr, message: Bytes) {
    if tx.try_send(message).is_err() {
        debug!(%next_hop, "SIP write queue full or closed");
        warn!("SIP connection write queue full or closed; message dropped");
    }
}

/// Opens a TCP connection to `next_hop` within `limit`; the error names
/// the next hop.
async fn connect(next_hop: SocketAddr, limit: std::time::Duration) -> Result<TcpStream, String> {
    within(next_hop, limit, TcpStream::connect(next_hop)).await
}

/// `attempt` (a connect to `next_hop`) bounded by `limit`.
async fn within<T>(
    next_hop: SocketAddr,
    limit: std::time::Duration,
    attempt: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("connect to {next_hop}: {e}")),
        Err(_) => Err(format!("connect to {next_hop}: no answer within {limit:?}")),
    }
}

/// The affinity tag a request carries: Request-URI `vd`, else top Route.
fn tag_of(msg: &SipMessage) -> Option<Vec<u8>> {
    let from_ruri = msg
        .request_uri()
        .and_then(|u| u.param(TAG_PARAM).flatten().map(<[u8]>::to_vec));
    from_ruri.or_else(|| {
        msg.top_route()
            .and_then(|r| r.uri.param(TAG_PARAM).flatten().map(<[u8]>::to_vec))
    })
}

/// Where one request goes.
enum Route {
    Local {
        failover: bool,
    },
    Forward {
        peer: String,
        link: mpsc::Sender<SipToBackend>,
    },
    Redirect {
        peer: String,
    },
    /// A CANCEL of a redirected INVITE: answered 200 here, the INVITE
    /// already had its final response (RFC 3261 §9.2).
    CancelRedirected,
    Absorb,
}

/// One SIP message from the listener: received/rport, then local,
/// forwarded or redirected.
async fn on_message(
    shared: &Arc<Shared>,
    rt: &Arc<PeerRuntime>,
    msg: SipMessage,
    transport: Transport,
    connection: u64,
    from: SocketAddr,
    local: SocketAddr,
) {
    let msg = if msg.is_request() {
        // RFC 3261 §18.2.1: received always (the agent never guesses), rport
        // filled when the client asked for it.
        let mut rw = Rewrite::new(&msg);
        rw.set_top_via_param("received", Some(from.ip().to_string().as_bytes()));
        if msg.top_via().is_some_and(|v| v.rport.is_some()) {
            rw.set_top_via_param("rport", Some(from.port().to_string().as_bytes()));
        }
        match SipMessage::parse(rw.finish()) {
            Ok(m) => m,
            Err(_) => msg,
        }
    } else {
        msg
    };
    let route = if msg.is_request() {
        route_request(shared, rt, &msg)
    } else {
        Route::Local { failover: false }
    };
    let sip = SipToBackend {
        failover: false,
        connection,
        transport,
        peer: from,
        local,
        arrival_unix_us: unix_us(),
        message: msg.bytes().clone(),
    };
    match route {
        Route::Absorb => {}
        Route::Local { failover } => {
            let Some(inbound) = lock(&rt.inbound).clone() else {
                return;
            };
            deliver(
                shared,
                local,
                rt.own_id,
                SipToBackend { failover, ..sip },
                Source::Listener,
                &inbound,
            )
            .await;
        }
        Route::Forward { peer, link } => match rt.try_forward(&peer, &link, sip).map_err(|b| *b) {
            Ok(()) => {}
            Err((ForwardFailure::QueueFull, _)) if transport == Transport::Udp => {
                // The client retransmits; the UDP listener does not wait.
                warn!(%peer, "peer link queue full; UDP request dropped");
            }
            Err((reason, sip)) => {
                warn!(%peer, reason = reason.as_str(), "request not forwarded to the peer; taking it here");
                let inbound = lock(&rt.inbound).clone();
                if let Some(inbound) = inbound {
                    deliver(shared, local, rt.own_id, sip, Source::Listener, &inbound).await;
                }
            }
        },
        Route::Redirect { peer } => redirect(shared, rt, &msg, &peer, transport, connection),
        Route::CancelRedirected => {
            if let Some(next_hop) = response_hop(&msg) {
                let ok = encap_proto::sip::response::response(&msg, 200, "OK")
                    .to_tag(&redirect_to_tag(&msg))
                    .build();
                send_now(shared, rt, transport, Some(connection), next_hop, ok);
            }
        }
    }
}

fn route_request(shared: &Arc<Shared>, rt: &Arc<PeerRuntime>, msg: &SipMessage) -> Route {
    let now = Instant::now();
    let call_id = msg.call_id().unwrap_or_default();
    let method = msg.method().unwrap_or_default();
    // 1. A tag names the backend that took the call.
    if let Some(tag) = tag_of(msg) {
        if let Ok(tag) = shared.keys.verify(&tag, call_id) {
            if tag.backend == rt.own_id {
                return Route::Local { failover: false };
            }
            if let Some((peer, link)) = rt.peer_by_id(tag.backend) {
                rt.count_handoff(&peer, HandOffReason::Affinity);
                return Route::Forward { peer, link };
            }
            // Its backend is down: take it here, marked (design.md §6).
            lock(&rt.counters).failovers += 1;
            return Route::Local { failover: true };
        }
        debug!("request with an affinity tag that does not verify: treated as untagged");
    }
    // 2. Untagged repeats of a call follow it.
    let remembered = lock(&rt.memory).get(now, call_id).cloned();
    if let Some(dest) = remembered {
        return match dest {
            Destination::Local => Route::Local { failover: false },
            Destination::Forwarded(peer) => match rt.peer_link(&peer) {
                Some(link) => Route::Forward { peer, link },
                None => Route::Local { failover: true },
            },
            // The ACK of the 302 ends there (RFC 3261 §17.2.1).
            Destination::Redirected(_) if method.eq_ignore_ascii_case(b"ACK") => Route::Absorb,
            Destination::Redirected(_) if method.eq_ignore_ascii_case(b"CANCEL") => {
                Route::CancelRedirected
            }
            Destination::Redirected(peer) => Route::Redirect { peer },
        };
    }
    // 3. A new call (no To tag), but CANCEL and ACK never start one.
    let initial = msg.to_tag().is_none()
        && !method.eq_ignore_ascii_case(b"ACK")
        && !method.eq_ignore_ascii_case(b"CANCEL");
    if !initial {
        return Route::Local { failover: false };
    }
    let ruri = msg.request_uri();
    let facts = RequestFacts {
        method,
        ruri_user: ruri.as_ref().and_then(|u| u.user),
        ruri_host: ruri.as_ref().map_or(&b""[..], |u| u.host),
    };
    let local_percent = decide::load_percent(&shared.load_now());
    let decision = decide::decide(now, local_percent, &rt.views(), &lock(&rt.policy), &facts);
    let (route, dest) = match decision {
        Decision::Local(reason) => {
            *lock(&rt.counters).kept.entry(reason).or_insert(0) += 1;
            (Route::Local { failover: false }, Destination::Local)
        }
        Decision::HandOff { peer, reason } => match rt.config.hand_off {
            HandOffMode::Redirect => match shared.peer_sip_address(&peer) {
                Some(_) => {
                    rt.count_handoff(&peer, reason);
                    (
                        Route::Redirect { peer: peer.clone() },
                        Destination::Redirected(peer),
                    )
                }
                None => {
                    // We never reached its SIP address (our link to it is
                    // not up): nothing to redirect to.
                    *lock(&rt.counters)
                        .kept
                        .entry(KeepReason::NoLighterPeer)
                        .or_insert(0) += 1;
                    (Route::Local { failover: false }, Destination::Local)
                }
            },
            HandOffMode::Forward => match rt.peer_link(&peer) {
                Some(link) => {
                    rt.count_handoff(&peer, reason);
                    (
                        Route::Forward {
                            peer: peer.clone(),
                            link,
                        },
                        Destination::Forwarded(peer),
                    )
                }
                None => (Route::Local { failover: false }, Destination::Local),
            },
        },
    };
    lock(&rt.memory).insert(now, call_id, dest);
    route
}

/// Where a response to `msg` goes: its top Via (received/rport filled).
fn response_hop(msg: &SipMessage) -> Option<SocketAddr> {
    match crate::route::response_next_hop(&msg.top_via()?) {
        Ok(crate::route::NextHop::Addr { addr, .. }) => Some(addr),
        _ => None,
    }
}

/// The To tag of a 302 (and of the 200 to its CANCEL): the same for every
/// retransmission of the request (RFC 3261 §8.2.7, §17.2.1), so derived
/// from its Call-ID and top Via branch (a CANCEL carries its INVITE's
/// branch, RFC 3261 §9.1).
fn redirect_to_tag(msg: &SipMessage) -> String {
    let branch = msg.top_via().and_then(|v| v.branch).unwrap_or_default();
    to_tag_of(msg.call_id().unwrap_or_default(), branch)
}

/// FNV-1a over the Call-ID, a separator and the branch.
fn to_tag_of(call_id: &[u8], branch: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in call_id.iter().chain(b"\0").chain(branch) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("vdp{h:016x}")
}

/// Answers `302 Moved Temporarily` with the peer's SIP address as Contact.
fn redirect(
    shared: &Arc<Shared>,
    rt: &Arc<PeerRuntime>,
    msg: &SipMessage,
    peer: &str,
    transport: Transport,
    connection: u64,
) {
    let Some(addresses) = shared.peer_sip_address(peer) else {
        return;
    };
    let target = addresses
        .iter()
        .find(|a| a.transport == transport)
        .or_else(|| addresses.first())
        .map(|a| a.addr);
    let (Some(target), Some(next_hop)) = (target, response_hop(msg)) else {
        return;
    };
    let user = msg
        .request_uri()
        .and_then(|u| u.user)
        .map(|u| format!("{}@", String::from_utf8_lossy(u)))
        .unwrap_or_default();
    let transport_param = match transport {
        Transport::Udp => "",
        _ => ";transport=tcp",
    };
    // The peer's own tag for this Call-ID: the retry (same Call-ID, RFC
    // 3261 §8.1.3.4) carries it in its Request-URI, so the peer takes the
    // call instead of deciding again (no redirect ping-pong on stale loads).
    let tag = shared
        .keys
        .mint(peer_id_of(peer), msg.call_id().unwrap_or_default());
    let contact = format!(
        "<sip:{user}{target}{transport_param};{TAG_PARAM}={}>",
        String::from_utf8_lossy(&tag)
    );
    let moved = encap_proto::sip::response::response(msg, 302, "Moved Temporarily")
        .to_tag(&redirect_to_tag(msg))
        .header("Contact", contact.as_bytes())
        .build();
    send_now(shared, rt, transport, Some(connection), next_hop, moved);
}

/// Accepts peers' links: handshake as the balancer side, then their load
/// reports in, forwarded calls out, their answers relayed.
async fn run_peer_listener(shared: Arc<Shared>, rt: Arc<PeerRuntime>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, from)) => {
                    let (shared, rt) = (shared.clone(), rt.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve_peer(&shared, &rt, stream).await {
                            warn!(%from, reason = %e, "peer link ended");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "peer accept failed"),
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Whether a peer that authenticated as `agent` may link to us (named
/// `own`), `linked` being the peers linked now: never ourselves, and never
/// one whose backend id another has (its tagged requests would go to the
/// wrong backend).
fn admit<'a>(
    own: &str,
    agent: &str,
    linked: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    if agent == own {
        return Err(format!(
            "peer link from ourselves ({own}): remove it from peers"
        ));
    }
    let id = peer_id_of(agent);
    if id == peer_id_of(own) {
        return Err(format!(
            "peer {agent} and this agent ({own}) have the same backend id {id}: rename one"
        ));
    }
    match linked
        .into_iter()
        .find(|other| *other != agent && peer_id_of(other) == id)
    {
        Some(other) => Err(format!(
            "peers {other} and {agent} have the same backend id {id}: rename one"
        )),
        None => Ok(()),
    }
}

async fn serve_peer(
    shared: &Arc<Shared>,
    rt: &Arc<PeerRuntime>,
    stream: TcpStream,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, FrameCodec::default());
    let mut handshake =
        BalancerHandshake::new(&shared.config.secret, &shared.config.name, rand::random());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let name = loop {
        let frame = match tokio::time::timeout_at(deadline, framed.next()).await {
            Err(_) => return Err("handshake timed out".into()),
            Ok(None) => return Err("closed during the handshake".into()),
            Ok(Some(Err(e))) => return Err(format!("read: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        match handshake.handle(frame) {
            Ok(BalancerStep::Send(f)) => {
                if let Frame::Challenge(c) = &f {
                    let v = c.version;
                    framed.send(f).await.map_err(|e| format!("write: {e}"))?;
                    framed.codec_mut().set_version(v);
                } else {
                    framed.send(f).await.map_err(|e| format!("write: {e}"))?;
                }
            }
            Ok(BalancerStep::Verified { agent, version }) => {
                framed.codec_mut().set_version(version);
                let linked: Vec<String> = lock(&rt.peers)
                    .iter()
                    .filter(|(_, e)| !e.link.is_closed())
                    .map(|(n, _)| n.clone())
                    .collect();
                if let Err(reason) = admit(
                    &shared.config.name,
                    &agent,
                    linked.iter().map(String::as_str),
                ) {
                    let refusal = Frame::Error(Close {
                        code: Code::DUPLICATE_AGENT,
                        reason: reason.clone(),
                    });
                    let _ = framed.send(refusal).await;
                    return Err(reason);
                }
                let addresses = [Transport::Udp, Transport::Tcp]
                    .into_iter()
                    .map(|transport| PublicAddress {
                        transport,
                        addr: rt.config.sip_public,
                    })
                    .collect();
                let interval = u32::try_from(decide::REPORT_PERIOD.as_millis()).unwrap_or(500);
                let Some(welcome) =
                    handshake.welcome(peer_id_of(&agent), interval, DEFAULT_MAX_BODY, addresses)
                else {
                    return Err("handshake state lost".into());
                };
                framed
                    .send(welcome)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                break agent;
            }
            Err(e) => {
                if let Some(f) = e.to_frame() {
                    let _ = framed.send(f).await;
                }
                return Err(format!("handshake: {e}"));
            }
        }
    };
    let (tx, mut rx) = mpsc::channel::<SipToBackend>(4096);
    info!(peer = %name, "peer link up");
    lock(&rt.peers).insert(
        name.clone(),
        PeerEntry {
            id: peer_id_of(&name),
            load_percent: 100,
            last_report: None,
            link: tx,
        },
    );
    let mut shutdown = shared.shutdown.subscribe();
    let result = loop {
        tokio::select! {
            frame = framed.next() => match frame {
                None => break Err("closed by the peer".to_owned()),
                Some(Err(e)) => break Err(format!("read: {e}")),
                Some(Ok(Frame::Load(report))) => {
                    if let Some(e) = lock(&rt.peers).get_mut(&name) {
                        e.load_percent = decide::load_percent(&report);
                        e.last_report = Some(Instant::now());
                    }
                }
                Some(Ok(Frame::SipFromBackend(SipFromBackend { connection, transport, next_hop, message }))) => {
                    // Never awaited here: a next hop that does not answer
                    // must not stall this peer's load reports.
                    send_now(shared, rt, transport, connection, next_hop, message);
                }
                Some(Ok(Frame::Ping(token))) => {
                    if let Err(e) = framed.send(Frame::Pong(token)).await {
                        break Err(format!("write: {e}"));
                    }
                }
                Some(Ok(Frame::Goodbye(c) | Frame::Error(c))) => break Err(format!("peer closed the link: {}", c.reason)),
                Some(Ok(_)) => {} // PONG, DRAIN, unknown: nothing to do
            },
            sip = rx.recv() => match sip {
                Some(sip) => {
                    if let Err(e) = framed.send(Frame::SipToBackend(sip)).await {
                        break Err(format!("write: {e}"));
                    }
                }
                None => break Ok(()),
            },
            _ = stopped(&mut shutdown) => break Ok(()),
        }
    };
    // The entry stays (its link now reads closed: off-line) for the
    // metrics, until the peer dials again and replaces it.
    drop(rx);
    info!(peer = %name, "peer link down");
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_connect_that_gets_no_answer_ends_within_its_limit_naming_the_next_hop() {
        // A blackholed address: the SYN is never answered.
        let hop: SocketAddr = "10.255.255.1:5060".parse().unwrap();
        let start = Instant::now();
        let limit = std::time::Duration::from_millis(100);
        let err = within::<()>(hop, limit, std::future::pending())
            .await
            .unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(err, "connect to 10.255.255.1:5060: no answer within 100ms");
    }

    #[tokio::test]
    async fn a_full_or_closed_peer_link_is_not_waited_for_and_is_counted() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (rt, _listeners) = PeerRuntime::bind(PeerConfig::new(any, any, vec![]), "me").unwrap();
        let sip = SipToBackend {
            failover: false,
            connection: UDP_CONNECTION,
            transport: Transport::Udp,
            peer: any,
            local: any,
            arrival_unix_us: 0,
            message: Bytes::from_static(b"OPTIONS sip:x SIP/2.0\r\n\r\n"),
        };
        let (link, mut queue) = mpsc::channel(1);
        assert!(rt.try_forward("p", &link, sip.clone()).is_ok());
        let (reason, back) = *rt.try_forward("p", &link, sip.clone()).unwrap_err();
        assert_eq!(reason, ForwardFailure::QueueFull);
        assert_eq!(back.message, sip.message);
        assert!(queue.try_recv().is_ok());
        drop(queue);
        let (reason, _) = *rt.try_forward("p", &link, sip).unwrap_err();
        assert_eq!(reason, ForwardFailure::LinkClosed);
        let m = rt.metrics(0).not_forwarded;
        assert_eq!(
            m.get(&("p".to_owned(), ForwardFailure::QueueFull)),
            Some(&1)
        );
        assert_eq!(
            m.get(&("p".to_owned(), ForwardFailure::LinkClosed)),
            Some(&1)
        );
    }

    #[test]
    fn a_peer_link_from_ourselves_or_with_a_colliding_id_is_refused() {
        assert_eq!(
            admit("ivr-1", "ivr-1", []).unwrap_err(),
            "peer link from ourselves (ivr-1): remove it from peers"
        );
        assert!(admit("ivr-1", "ivr-2", ["ivr-3"]).is_ok());
        assert!(admit("ivr-1", "ivr-2", ["ivr-2"]).is_ok()); // it, dialing again
                                                             // Two names with the same backend id.
        let mut seen = HashMap::new();
        let (a, b) = (0..100_000)
            .map(|i| format!("p{i}"))
            .find_map(|n| seen.insert(peer_id_of(&n), n.clone()).map(|a| (a, n)))
            .unwrap();
        let own = if peer_id_of("me") == peer_id_of(&a) {
            "me2"
        } else {
            "me"
        };
        let err = admit(own, &b, [a.as_str()]).unwrap_err();
        assert!(err.contains(&a) && err.contains(&b), "{err}");
        let err = admit(&a, &b, []).unwrap_err();
        assert!(err.contains(&a) && err.contains(&b), "{err}");
    }

    #[test]
    fn a_datagram_is_framed_as_the_balancer_frames_it() {
        let limits = Limits {
            max_body_bytes: 8,
            ..Limits::default()
        };
        let head =
            "MESSAGE sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-1\r\n\
                    Call-ID: d1\r\nCSeq: 1 MESSAGE\r\n";
        // Bytes after the body Content-Length announces are dropped.
        let msg = scan_datagram(
            Bytes::from(format!("{head}Content-Length: 4\r\n\r\nbodyTRAILING")),
            &limits,
        )
        .unwrap();
        assert!(msg.bytes().ends_with(b"\r\n\r\nbody"));
        assert_eq!(msg.body(), b"body");
        // A body over max_body_bytes is dropped.
        let big = format!("{head}Content-Length: 9\r\n\r\n123456789");
        assert!(scan_datagram(Bytes::from(big), &limits).is_none());
        // Keep-alives and what is not SIP.
        assert!(scan_datagram(Bytes::from_static(b"\r\n\r\n"), &limits).is_none());
        assert!(scan_datagram(Bytes::from_static(b"\r\n"), &limits).is_none());
        assert!(scan_datagram(Bytes::from_static(b"hello"), &limits).is_none());
    }

    #[tokio::test]
    async fn a_task_that_subscribes_after_the_shutdown_still_stops() {
        let (tx, _first) = tokio::sync::watch::channel(false);
        tx.send_replace(true);
        let mut late = tx.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(1), stopped(&mut late))
            .await
            .unwrap();
        // And one subscribed before it sees the change.
        let (tx, mut early) = tokio::sync::watch::channel(false);
        let waiting = tokio::spawn(async move { stopped(&mut early).await });
        tx.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_302_to_tag_is_the_same_for_a_retransmission_and_differs_by_call_and_branch() {
        let t = to_tag_of(b"c1", b"z9hG4bK-1");
        assert_eq!(t, to_tag_of(b"c1", b"z9hG4bK-1"));
        assert_ne!(t, to_tag_of(b"c2", b"z9hG4bK-1"));
        assert_ne!(t, to_tag_of(b"c1", b"z9hG4bK-2"));
        // The separator keeps the two fields apart.
        assert_ne!(to_tag_of(b"ab", b"c"), to_tag_of(b"a", b"bc"));
        assert!(t.starts_with("vdp") && t.len() == 19, "{t}");
    }
}
