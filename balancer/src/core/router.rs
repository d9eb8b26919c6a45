//! The router: the whole routing method of design.md §1-§4 and §8 as one
//! state machine, free of I/O.
//!
//! # Driving contract
//!
//! The driver owns the sockets and the clock. It tells the router what
//! happened (`handle_*`, `*_opened`, `*_closed`, `backend_*`), then drains
//! every [`Action`] with [`Router::poll_action`] and carries them out, and
//! calls [`Router::handle_timeout`] when [`Router::poll_timeout`] is due.
//! Nothing here reads a clock, touches a socket or spawns a task.
//!
//! ```
//! use std::time::Instant;
//! use bytes::Bytes;
//! use balancer::core::router::{Action, Egress, Peer, Router, RouterConfig};
//! use encap_proto::frame::Transport;
//! use encap_proto::tag::TagKeys;
//!
//! let mut router = Router::new(RouterConfig::default(), TagKeys::new(b"secret"));
//! let now = Instant::now();
//! let udp = Peer {
//!     conn: 1,
//!     transport: Transport::Udp,
//!     remote: "192.0.2.7:5060".parse().unwrap(),
//!     local: "192.0.2.1:5060".parse().unwrap(),
//! };
//! router.socket_opened(udp.conn, Transport::Udp, udp.local);
//! router.handle_sip(now, 0, udp, Bytes::from_static(
//!     b"OPTIONS sip:lb SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\n\
//!       From: <sip:a@x>;tag=1\r\nTo: <sip:lb>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n\
//!       Content-Length: 0\r\n\r\n"));
//! // No backend yet: the router answers 503 itself, to the sender.
//! match router.poll_action() {
//!     Some(Action::ToPeer { egress: Egress::Datagram { socket: 1, to }, message }) => {
//!         assert_eq!(to, udp.remote);
//!         assert!(message.starts_with(b"SIP/2.0 503 "));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::collections::VecDeque;

use rustc_hash::{FxHashMap, FxHashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use encap_proto::frame::{
    Close, Code, DrainState, Frame, LoadReport, SipFromBackend, SipToBackend, Transport,
};
use encap_proto::sip::{Limits, Rewrite, ScanError, SipMessage, StartLine, Uri};
use encap_proto::tag::{TagError, TagKeys};

use super::hash::rendezvous_weighted;
use super::new_calls::{NewCallTable, DEFAULT_CAPACITY, DEFAULT_LIFETIME};
use super::proxy::{self, Side};
use super::reply::{raw_response, stateless_response};
use super::select::{
    Candidate, Choice, Counts, HashInput, LoadState, PlainMember, Policy, PoolId, ProbeSettings,
    Selection, Selector, Traffic,
};

/// A connection (stream) or socket (UDP) id, chosen by the driver.
pub type ConnId = u64;
/// A backend's short id, the one its affinity tags carry.
pub type BackendId = u16;

/// The URI parameter that carries the affinity tag.
pub const TAG_PARAM: &str = "vd";
/// The header the balancer adds to an initial request it routed by
/// selection: the tag the backend must stamp into its Contact.
pub const TAG_HEADER: &str = "X-Viaduct-Backend";
/// The header marking a request that failed over from a down backend.
pub const FAILOVER_HEADER: &str = "X-Viaduct-Failover";
/// The prefix of every Viaduct header; such headers arriving from outside
/// are removed.
pub const OWN_HEADER_PREFIX: &[u8] = b"x-viaduct-";
/// The Via branch prefix of requests an agent originates: the tag follows.
pub const BRANCH_PREFIX: &[u8] = b"z9hG4bK-vd";

/// Where a SIP message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The connection (TCP/TLS) or listening socket (UDP) it arrived on.
    pub conn: ConnId,
    /// Its transport.
    pub transport: Transport,
    /// The sender's address.
    pub remote: SocketAddr,
    /// Our address it arrived at.
    pub local: SocketAddr,
}

/// How to send a SIP message to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// On this open stream connection.
    Stream(ConnId),
    /// As a datagram from this UDP socket.
    Datagram {
        /// Our UDP socket.
        socket: ConnId,
        /// The destination.
        to: SocketAddr,
    },
    /// Open a new connection to `to` over `transport`, then send; the driver
    /// reports it with [`Router::conn_opened`] once it is up.
    Connect {
        /// TCP or TLS.
        transport: Transport,
        /// The destination.
        to: SocketAddr,
    },
}

/// Something for the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send SIP bytes to a peer.
    ToPeer {
        /// How.
        egress: Egress,
        /// The bare SIP message.
        message: Bytes,
    },
    /// Send a frame on a backend's agent link.
    ToBackend {
        /// Which backend.
        backend: BackendId,
        /// The frame.
        frame: Frame,
    },
    /// Close a backend's agent link (after sending `frame`, if any).
    CloseBackend {
        /// Which backend.
        backend: BackendId,
        /// A last frame (GOODBYE, ERROR).
        frame: Option<Frame>,
    },
    /// Something worth one log line (each rejection is reported once).
    Event(Event),
}

/// What the router reports for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request was answered with an error status by the balancer itself.
    Rejected {
        /// The sender.
        peer: SocketAddr,
        /// The status sent.
        status: u16,
        /// Why.
        reason: String,
    },
    /// A message was dropped.
    Dropped {
        /// Who sent it: a peer address, or a backend.
        from: Source,
        /// Why.
        reason: String,
    },
    /// A backend went down.
    BackendDown {
        /// Which.
        backend: BackendId,
        /// Why.
        reason: &'static str,
    },
    /// A backend came up (or back).
    BackendUp {
        /// Which.
        backend: BackendId,
    },
}

/// The sender of a dropped message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A SIP peer.
    Peer(SocketAddr),
    /// A backend, over its agent link.
    Backend(BackendId),
}

/// What to do with a tag that does not verify or names no known backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadTagPolicy {
    /// Route the message as if it carried no tag (default).
    #[default]
    TreatAsUntagged,
    /// Answer 403 (forged) or 404 (unknown backend).
    Reject,
}

/// What to do with a tagged request whose backend is down (design.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverPolicy {
    /// Send it to a backup chosen by weighted rendezvous hash of the
    /// Call-ID over the serving backends of the dead backend's pools,
    /// marked with [`FAILOVER_HEADER`] (default).
    #[default]
    Backup,
    /// Answer 503 with Retry-After.
    Reject,
}

/// The router's settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Message limits (the scanner's header count, and the sizes for 413/513).
    pub limits: Limits,
    /// What to do with forged, stale or unknown tags.
    pub bad_tag_policy: BadTagPolicy,
    /// Whether call-independent tags (registration, subscription Contacts)
    /// are accepted.
    pub accept_call_independent_tags: bool,
    /// New-call table entry lifetime (design.md §3).
    pub new_call_lifetime: Duration,
    /// New-call table bound.
    pub new_call_capacity: usize,
    /// Keys of the new-call table's Call-ID hash; random per process.
    pub table_hash_keys: (u64, u64),
    /// How often agents report load.
    pub report_interval: Duration,
    /// Missed reports after which a backend is down.
    pub missed_reports_down: u32,
    /// `Retry-After` of the 503 answered when no backend can take a call.
    pub retry_after_secs: u32,
    /// Pools, content rules, policies and thresholds (see
    /// [`select`](super::select)).
    pub selection: Selection,
    /// Seed of the power-of-two-choices draws; random per process.
    pub selection_seed: u64,
    /// Tagged requests for a backend that is down: backup or 503.
    pub failover_policy: FailoverPolicy,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            limits: Limits::default(),
            bad_tag_policy: BadTagPolicy::default(),
            accept_call_independent_tags: true,
            new_call_lifetime: DEFAULT_LIFETIME,
            new_call_capacity: DEFAULT_CAPACITY,
            table_hash_keys: (0x5eed_0001, 0x5eed_0002),
            report_interval: Duration::from_millis(500),
            missed_reports_down: 3,
            retry_after_secs: 5,
            selection: Selection::default(),
            selection_seed: 0x5eed_0003,
            failover_policy: FailoverPolicy::default(),
        }
    }
}

/// Counters, as plain data (the binary exports them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests received from peers.
    pub requests_in: u64,
    /// Responses received from peers.
    pub responses_in: u64,
    /// Messages forwarded to backends.
    pub to_backends: u64,
    /// Messages received from backends and sent to peers.
    pub from_backends: u64,
    /// Requests routed by a valid tag.
    pub routed_by_tag: u64,
    /// Requests routed by the new-call table.
    pub routed_by_table: u64,
    /// Requests routed by selection (new calls).
    pub routed_by_selection: u64,
    /// New calls placed by the stateless hash because the new-call table
    /// was full (also counted in `routed_by_hash`).
    pub table_full_fallbacks: u64,
    /// New-call table entries that expired (design.md §3 lifetimes).
    pub new_call_expired: u64,
    /// New calls selected, by the pool that took them (index: pool order
    /// of the configuration).
    pub selections_by_pool: Vec<u64>,
    /// Requests routed by the stateless rendezvous hash (table full, or an
    /// untagged in-dialog request).
    pub routed_by_hash: u64,
    /// Requests failed over from a down backend.
    pub failovers: u64,
    /// Tags that did not verify (forged, from another call, retired key).
    pub bad_tags: u64,
    /// Valid tags naming a backend this balancer does not know.
    pub unknown_backend_tags: u64,
    /// Viaduct headers removed from messages arriving from outside.
    pub own_headers_stripped: u64,
    /// Requests answered 400 (cannot be routed).
    pub rejected_400: u64,
    /// Requests answered 403/404 by the bad-tag policy.
    pub rejected_bad_tag: u64,
    /// Requests answered 413 / 513 (too large).
    pub rejected_too_large: u64,
    /// Requests answered 483 (Max-Forwards 0).
    pub rejected_483: u64,
    /// Requests answered 503 (no backend).
    pub rejected_503: u64,
    /// CANCEL answered 481 (no such transaction).
    pub rejected_481: u64,
    /// Responses from peers dropped (malformed, or no valid tag in the top Via).
    pub dropped_responses: u64,
    /// ACKs that matched nothing, dropped.
    pub dropped_acks: u64,
    /// Frames from backends dropped (malformed SIP, loop, no way to send).
    pub dropped_from_backends: u64,
    /// Frames of unknown type skipped.
    pub unknown_frames: u64,
    /// Load reports received out of order or repeated (ignored).
    pub stale_reports: u64,
    /// New calls placed in a pool other than the one the rules named
    /// (overflow).
    pub overflowed: u64,
    /// New calls answered 503 because every candidate was above its
    /// high-water mark and the pool's overload policy is `reject`.
    pub rejected_overload: u64,
}

#[derive(Debug, Clone)]
struct Backend {
    name: String,
    up: bool,
    drain: DrainState,
    last_heard: Instant,
    load: LoadState,
    traffic: Traffic,
    /// The pools it belongs to (ascending).
    pools: Vec<PoolId>,
    /// A plain SIP backend (design.md §7): its address and probe state.
    plain: Option<Box<Plain>>,
}

/// A plain SIP backend's address and OPTIONS probe state.
#[derive(Debug, Clone)]
struct Plain {
    member: PlainMember,
    probe: ProbeSettings,
    /// The last probe sent (its sequence number), while unanswered.
    outstanding: Option<u64>,
    /// Probes sent so far (the next one's sequence number).
    seq: u64,
    /// When the next probe is due (`None`: not started).
    next_probe: Option<Instant>,
    /// Consecutive failed / answered probes.
    failures: u32,
    successes: u32,
}

/// A backend as the router sees it, as plain data (for metrics and the
/// admin API).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStats {
    /// The name its agent registered with.
    pub name: String,
    /// Up (linked and reporting).
    pub up: bool,
    /// Its drain state.
    pub drain: DrainState,
    /// The last accepted load report.
    pub report: LoadReport,
    /// New calls placed on it since that report.
    pub assigned_since_report: u32,
    /// Its capacity weight (reported, else the default capacity).
    pub capacity: u32,
    /// Its load, a fraction of capacity (see [`select`](super::select)).
    pub load: f64,
    /// The whole link's traffic over the window (see [`Traffic`]).
    pub link_traffic: Counts,
    /// This balancer's own traffic with it over the window.
    pub own_traffic: Counts,
    /// This balancer's own traffic with it since first seen.
    pub total_traffic: Counts,
    /// The names of its pools.
    pub pools: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Conn {
    transport: Transport,
    remote: Option<SocketAddr>,
    local: SocketAddr,
}

/// The router. See the module documentation for the driving contract.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    keys: TagKeys,
    backends: FxHashMap<BackendId, Backend>,
    /// Live backends, sorted, for selection and the rendezvous hash.
    live: Vec<BackendId>,
    conns: FxHashMap<ConnId, Conn>,
    /// Open stream connections by (transport, remote address). Fx hash:
    /// looked up per message; its keys are bounded by the connection limits
    /// (`sip.max_connections`, `sip.max_connections_per_ip`), so a crafted
    /// set of colliding ports costs at most one probe per allowed connection.
    by_remote: FxHashMap<(Transport, SocketAddr), Vec<ConnId>>,
    /// Our own SIP addresses: a message is never sent to one of them.
    local_addrs: Vec<SocketAddr>,
    new_calls: NewCallTable,
    selector: Selector,
    /// Per pool, its known members (up or not), sorted.
    pool_members: Vec<Vec<BackendId>>,
    actions: VecDeque<Action>,
    counters: Counters,
    /// The address to advertise (Via, Record-Route) for each of our
    /// sockets and listeners: `(transport, bound, public)`.
    advertised: Vec<(Transport, SocketAddr, SocketAddr)>,
    /// Plain SIP backends by `(transport, address)`.
    plain_by_addr: FxHashMap<(Transport, SocketAddr), BackendId>,
    /// Whether [`Router::start`] registered the plain SIP backends.
    plain_started: bool,
    /// Backends an operator drained ([`Router::set_drain`]) and has not
    /// undrained: the drain outlives the agent's link, so a backend that
    /// reconnects (or restarts) is drained again.
    operator_drained: FxHashSet<BackendId>,
}

/// How a request reaches its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// By a valid tag naming a live backend: forwarded as is.
    Tagged(BackendId),
    /// By the new-call table (a repeat of a new call).
    Table(BackendId),
    /// By selection: a new call.
    Selected(BackendId),
    /// By the stateless hash (table full, or untagged in-dialog).
    Hashed(BackendId),
    /// Tagged for a backend that is down: to a backup, marked.
    Failover(BackendId),
}

impl Route {
    fn backend(self) -> BackendId {
        match self {
            Route::Tagged(b)
            | Route::Table(b)
            | Route::Selected(b)
            | Route::Hashed(b)
            | Route::Failover(b) => b,
        }
    }
}

/// The status of a [`Refusal`] that is dropped without an answer (an ACK).
const NO_ANSWER: u16 = 0;

/// A request the router answers itself instead of forwarding.
struct Refusal {
    status: u16,
    reason: &'static str,
    detail: String,
}

impl Router {
    /// A router with no backend and no connection yet.
    pub fn new(config: RouterConfig, keys: TagKeys) -> Router {
        let new_calls = NewCallTable::new(
            config.new_call_lifetime,
            config.new_call_capacity,
            config.table_hash_keys,
        );
        let selector = Selector::new(config.selection.clone(), config.selection_seed);
        let pool_members = vec![Vec::new(); config.selection.pools().len()];
        Router {
            config,
            keys,
            backends: FxHashMap::default(),
            live: Vec::new(),
            conns: FxHashMap::default(),
            by_remote: FxHashMap::default(),
            local_addrs: Vec::new(),
            new_calls,
            selector,
            pool_members,
            actions: VecDeque::new(),
            counters: Counters::default(),
            advertised: Vec::new(),
            plain_by_addr: FxHashMap::default(),
            plain_started: false,
            operator_drained: FxHashSet::default(),
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries in the new-call table.
    pub fn new_call_entries(&self) -> usize {
        self.new_calls.len()
    }

    /// Whether `backend` is known and up.
    pub fn is_up(&self, backend: BackendId) -> bool {
        self.backends.get(&backend).is_some_and(|b| b.up)
    }

    /// The next action for the driver, until `None`.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let silence = self.silence_limit();
        let backends = self
            .backends
            .values()
            .filter(|b| b.up && b.plain.is_none())
            .map(|b| b.last_heard + silence)
            .chain(self.next_probe())
            .min();
        match (self.new_calls.next_expiry(), backends) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn silence_limit(&self) -> Duration {
        self.config.report_interval * self.config.missed_reports_down
    }

    /// Time passed: expire new-call entries, mark silent backends down,
    /// probe plain SIP backends. The first call also does
    /// [`start`](Self::start).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.start(now);
        self.counters.new_call_expired += self.new_calls.expire(now) as u64;
        let silence = self.silence_limit();
        let silent: Vec<BackendId> = self
            .backends
            .iter()
            .filter(|(_, b)| b.up && b.plain.is_none() && now >= b.last_heard + silence)
            .map(|(&id, _)| id)
            .collect();
        for id in silent {
            self.backend_down(id, "missed load reports");
        }
        self.probe_due(now);
    }

    // ------------------------------------------------------------ connections

    /// A UDP socket of ours is open at `local` (its id names it in frames).
    pub fn socket_opened(&mut self, socket: ConnId, transport: Transport, local: SocketAddr) {
        self.conns.insert(
            socket,
            Conn {
                transport,
                remote: None,
                local,
            },
        );
        if !self.local_addrs.contains(&local) {
            self.local_addrs.push(local);
        }
    }

    /// Our SIP listener at `local` is open (stream transports): messages are
    /// never sent to it.
    pub fn listener_opened(&mut self, local: SocketAddr) {
        if !self.local_addrs.contains(&local) {
            self.local_addrs.push(local);
        }
    }

    /// A stream connection is open (accepted, or opened for an
    /// [`Egress::Connect`]).
    pub fn conn_opened(
        &mut self,
        conn: ConnId,
        transport: Transport,
        remote: SocketAddr,
        local: SocketAddr,
    ) {
        self.conns.insert(
            conn,
            Conn {
                transport,
                remote: Some(remote),
                local,
            },
        );
        self.by_remote
            .entry((transport, remote))
            .or_default()
            .push(conn);
    }

    /// A connection or socket closed.
    pub fn conn_closed(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(remote) = c.remote {
            if let Some(list) = self.by_remote.get_mut(&(c.transport, remote)) {
                list.retain(|&id| id != conn);
                if list.is_empty() {
                    self.by_remote.remove(&(c.transport, remote));
                }
            }
        }
    }

    // --------------------------------------------------------------- backends

    /// A backend's agent authenticated and was welcomed. It joins the pools
    /// that list its name, else the default pool. A backend seen before
    /// keeps its traffic counters; its load starts afresh.
    pub fn backend_up(&mut self, now: Instant, backend: BackendId, name: &str) {
        let pools = self.config.selection.pools_of(name);
        let traffic = match self.backends.remove(&backend) {
            Some(mut old) => {
                old.traffic.relink();
                old.traffic
            }
            None => Traffic::new(self.config.selection.traffic_window),
        };
        for (p, members) in self.pool_members.iter_mut().enumerate() {
            let listed = pools.contains(&p);
            match (members.binary_search(&backend), listed) {
                (Err(at), true) => members.insert(at, backend),
                (Ok(at), false) => {
                    members.remove(at);
                }
                _ => {}
            }
        }
        self.backends.insert(
            backend,
            Backend {
                name: name.to_owned(),
                up: true,
                drain: DrainState::Serving,
                last_heard: now,
                load: LoadState::default(),
                traffic,
                pools,
                plain: None,
            },
        );
        self.set_live(backend, true);
        self.actions
            .push_back(Action::Event(Event::BackendUp { backend }));
        if self.operator_drained.contains(&backend) {
            // The operator's drain holds until the operator undrains it.
            if let Some(b) = self.backends.get_mut(&backend) {
                b.drain = DrainState::Draining;
            }
            self.actions.push_back(Action::ToBackend {
                backend,
                frame: Frame::Drain(DrainState::Draining),
            });
        }
    }

    /// A backend's link closed, or it fell silent.
    pub fn backend_down(&mut self, backend: BackendId, reason: &'static str) {
        if let Some(b) = self.backends.get_mut(&backend) {
            if b.up {
                b.up = false;
                self.set_live(backend, false);
                self.actions
                    .push_back(Action::Event(Event::BackendDown { backend, reason }));
            }
        }
    }

    /// The name a backend registered with, if known.
    pub fn backend_name(&self, backend: BackendId) -> Option<&str> {
        self.backends.get(&backend).map(|b| b.name.as_str())
    }

    /// Every known backend's id, ascending.
    pub fn backend_ids(&self) -> Vec<BackendId> {
        let mut ids: Vec<BackendId> = self.backends.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A backend's state, load and traffic at `now`.
    pub fn backend_stats(&self, now: Instant, backend: BackendId) -> Option<BackendStats> {
        let b = self.backends.get(&backend)?;
        let default_capacity = self.config.selection.default_capacity;
        let pools = self.config.selection.pools();
        Some(BackendStats {
            name: b.name.clone(),
            up: b.up,
            drain: b.drain,
            report: *b.load.report(),
            assigned_since_report: b.load.assigned_since_report(),
            capacity: b.load.capacity(default_capacity),
            load: b.load.load(default_capacity),
            link_traffic: b.traffic.link(now),
            own_traffic: b.traffic.own(now),
            total_traffic: b.traffic.total(),
            pools: b
                .pools
                .iter()
                .filter_map(|&p| pools.get(p).map(|p| p.name.clone()))
                .collect(),
        })
    }

    /// The selection settings in force.
    pub fn selection(&self) -> &Selection {
        self.selector.selection()
    }

    fn set_live(&mut self, backend: BackendId, up: bool) {
        match (self.live.binary_search(&backend), up) {
            (Err(at), true) => self.live.insert(at, backend),
            (Ok(at), false) => {
                self.live.remove(at);
            }
            _ => {}
        }
    }

    /// A frame from an authenticated backend's agent.
    pub fn handle_frame(&mut self, now: Instant, backend: BackendId, frame: Frame) {
        let Some(b) = self.backends.get_mut(&backend) else {
            self.counters.dropped_from_backends += 1;
            return;
        };
        b.last_heard = now;
        match frame {
            Frame::SipFromBackend(sip) => {
                b.traffic.from_backend(now, sip.message.len());
                self.send_from_backend(now, backend, sip);
            }
            Frame::Load(report) => {
                if b.load.accept(&report) {
                    b.traffic.on_report(now, &report);
                } else {
                    // Duplicated or reordered: the newer report already counted.
                    self.counters.stale_reports += 1;
                }
                if !b.up {
                    b.up = true;
                    self.set_live(backend, true);
                    self.actions
                        .push_back(Action::Event(Event::BackendUp { backend }));
                }
            }
            // An agent that has not yet heard the operator's drain (it
            // announces its own state as its link comes up) does not undo it.
            Frame::Drain(DrainState::Serving) if self.operator_drained.contains(&backend) => {}
            Frame::Drain(state) => b.drain = state,
            Frame::Ping(token) => self.actions.push_back(Action::ToBackend {
                backend,
                frame: Frame::Pong(token),
            }),
            Frame::Pong(_) => {}
            Frame::Goodbye(_) | Frame::Error(_) => {
                self.backend_down(backend, "agent closed the link");
                self.actions.push_back(Action::CloseBackend {
                    backend,
                    frame: None,
                });
            }
            Frame::Unknown { .. } => self.counters.unknown_frames += 1,
            other @ (Frame::Hello(_)
            | Frame::Challenge(_)
            | Frame::Auth(_)
            | Frame::Welcome(_)
            | Frame::Refuse(_)
            | Frame::SipToBackend(_)) => {
                let reason = format!(
                    "{} frame not allowed from an agent after the handshake",
                    other.frame_type()
                );
                self.backend_down(backend, "protocol error");
                self.actions.push_back(Action::CloseBackend {
                    backend,
                    frame: Some(Frame::Error(Close {
                        code: Code::UNEXPECTED_FRAME,
                        reason,
                    })),
                });
            }
        }
    }

    fn drop_from_backend(&mut self, backend: BackendId, reason: String) {
        self.counters.dropped_from_backends += 1;
        self.actions.push_back(Action::Event(Event::Dropped {
            from: Source::Backend(backend),
            reason,
        }));
    }

    /// A SIP message a backend sends out (design.md §4).
    fn send_from_backend(&mut self, now: Instant, backend: BackendId, sip: SipFromBackend) {
        let msg = match SipMessage::parse_with(sip.message, &self.config.limits) {
            Ok(msg) => msg,
            Err(e) => {
                return self.drop_from_backend(backend, format!("malformed SIP from backend: {e}"))
            }
        };
        if let (Some(status), Some(call_id)) = (msg.status(), msg.call_id()) {
            let key = self.new_calls.key(call_id);
            if status < 200 {
                self.new_calls.refresh(now, key);
            } else {
                self.new_calls.linger(now, key);
            }
        }
        if self.local_addrs.contains(&sip.next_hop) {
            return self.drop_from_backend(
                backend,
                format!("loop: next hop {} is this balancer", sip.next_hop),
            );
        }
        let egress = match self.egress(sip.connection, sip.transport, sip.next_hop) {
            Some(egress) => egress,
            None => {
                return self.drop_from_backend(
                    backend,
                    format!(
                        "no {} socket of the address family of {}",
                        sip.transport, sip.next_hop
                    ),
                )
            }
        };
        self.counters.from_backends += 1;
        self.actions.push_back(Action::ToPeer {
            egress,
            message: msg.bytes().clone(),
        });
    }

    /// The response path rules of design.md §4: the named connection if it
    /// is open and leads to the host of `to` (RFC 3261 §18.2.2: a response
    /// over a stream takes the connection the request came on, whose remote
    /// port is usually an ephemeral one, not the sent-by port the agent
    /// resolved); else any open connection to `to`; else a new connection
    /// (streams) or a datagram (UDP). Nothing goes to another host.
    fn egress(
        &self,
        named: Option<ConnId>,
        transport: Transport,
        to: SocketAddr,
    ) -> Option<Egress> {
        if transport == Transport::Udp {
            let named_socket = named.filter(|id| {
                self.conns.get(id).is_some_and(|c| {
                    c.transport == Transport::Udp && c.local.is_ipv4() == to.is_ipv4()
                })
            });
            let socket = named_socket.or_else(|| {
                self.conns
                    .iter()
                    .filter(|(_, c)| {
                        c.transport == Transport::Udp && c.local.is_ipv4() == to.is_ipv4()
                    })
                    .map(|(&id, _)| id)
                    .min()
            })?;
            return Some(Egress::Datagram { socket, to });
        }
        if let Some(id) = named {
            if self.conns.get(&id).is_some_and(|c| {
                c.transport == transport && c.remote.is_some_and(|r| r.ip() == to.ip())
            }) {
                return Some(Egress::Stream(id));
            }
        }
        if let Some(&id) = self.by_remote.get(&(transport, to)).and_then(|l| l.last()) {
            return Some(Egress::Stream(id));
        }
        Some(Egress::Connect { transport, to })
    }

    // ------------------------------------------------------------- from peers

    /// A framed SIP message from a peer (`arrival_unix_us`: wall clock, for
    /// the frame's metadata).
    pub fn handle_sip(&mut self, now: Instant, arrival_unix_us: u64, from: Peer, message: Bytes) {
        match SipMessage::parse_with(message.clone(), &self.config.limits) {
            Ok(msg) => self.handle_scanned(now, arrival_unix_us, from, msg),
            Err(e) => self.handle_unscannable(from, &message, &e),
        }
    }

    /// A framed message the scanner refused (the driver scanned it while
    /// framing, see `StreamFramer::decode_scanned`): a request gets 400
    /// with a Warning naming the fault, a response is dropped.
    pub fn handle_unscannable(&mut self, from: Peer, message: &[u8], error: &ScanError) {
        if message.starts_with(b"SIP/") {
            self.counters.responses_in += 1;
            self.counters.dropped_responses += 1;
            let reason = format!("malformed response: {error}");
            self.actions.push_back(Action::Event(Event::Dropped {
                from: Source::Peer(from.remote),
                reason,
            }));
        } else {
            self.counters.requests_in += 1;
            self.refuse_raw(from, message, 400, "Bad Request", error.to_string());
        }
    }

    /// A framed and scanned SIP message from a peer (the driver scanned it
    /// while framing; [`handle_sip`](Self::handle_sip) does both).
    pub fn handle_scanned(
        &mut self,
        now: Instant,
        arrival_unix_us: u64,
        from: Peer,
        msg: SipMessage,
    ) {
        if msg.is_request() {
            self.counters.requests_in += 1;
            if let Some(backend) = self.plain_source(from) {
                return self.request_from_plain(now, from, backend, &msg);
            }
            match self.route_request(now, &msg) {
                Ok(route) if self.is_plain(route.backend()) => {
                    self.forward_to_plain(now, from, &msg, route);
                }
                Ok(route) => self.forward_request(now, arrival_unix_us, from, &msg, route),
                Err(refusal) => self.refuse(from, &msg, refusal),
            }
        } else {
            self.counters.responses_in += 1;
            self.route_response(now, arrival_unix_us, from, msg);
        }
    }

    /// A message too large to take: `head` is what was read of it (at least
    /// its start line and, ideally, its headers). Streams get 413, UDP 513.
    pub fn handle_oversized(&mut self, from: Peer, head: &[u8]) {
        self.counters.requests_in += 1;
        self.counters.rejected_too_large += 1;
        let (status, reason) = if from.transport == Transport::Udp {
            (513, "Message Too Large")
        } else {
            (413, "Request Entity Too Large")
        };
        let detail = format!(
            "message above the limits (header {} / body {} bytes)",
            self.config.limits.max_header_bytes, self.config.limits.max_body_bytes
        );
        self.answer_raw(from, head, status, reason, detail);
    }

    fn refuse_raw(&mut self, from: Peer, raw: &[u8], status: u16, reason: &str, detail: String) {
        self.counters.rejected_400 += 1;
        self.answer_raw(from, raw, status, reason, detail);
    }

    /// Answers a request from its raw bytes (it did not scan, or is too
    /// large to), with a Warning naming the fault, and reports it once.
    fn answer_raw(&mut self, from: Peer, raw: &[u8], status: u16, reason: &str, detail: String) {
        let warning = warning_value(&detail);
        if let Some(resp) = raw_response(raw, status, reason, &[("Warning", warning.as_bytes())]) {
            self.actions.push_back(Action::ToPeer {
                egress: Self::reply_egress(from, None),
                message: resp,
            });
        }
        self.actions.push_back(Action::Event(Event::Rejected {
            peer: from.remote,
            status,
            reason: detail,
        }));
    }

    fn refuse(&mut self, from: Peer, msg: &SipMessage, refusal: Refusal) {
        if refusal.status == NO_ANSWER {
            self.counters.dropped_acks += 1;
            let reason = refusal.detail;
            self.actions.push_back(Action::Event(Event::Dropped {
                from: Source::Peer(from.remote),
                reason,
            }));
            return;
        }
        match refusal.status {
            400 => self.counters.rejected_400 += 1,
            403 | 404 => self.counters.rejected_bad_tag += 1,
            481 => self.counters.rejected_481 += 1,
            483 => self.counters.rejected_483 += 1,
            503 => self.counters.rejected_503 += 1,
            _ => {}
        }
        let retry = self.config.retry_after_secs.to_string();
        let warning = warning_value(&refusal.detail);
        let mut extra: Vec<(&str, &[u8])> = vec![("Warning", warning.as_bytes())];
        if refusal.status == 503 {
            extra.push(("Retry-After", retry.as_bytes()));
        }
        // A request missing a header a response copies is answered from its
        // raw lines instead (what it has is copied).
        let resp = stateless_response(msg, refusal.status, refusal.reason, &extra)
            .or_else(|| raw_response(msg.bytes(), refusal.status, refusal.reason, &extra));
        if let Some(resp) = resp {
            let egress = Self::reply_egress(from, msg.top_via().map(|v| (v.rport, v.port)));
            self.actions.push_back(Action::ToPeer {
                egress,
                message: resp,
            });
        }
        self.actions.push_back(Action::Event(Event::Rejected {
            peer: from.remote,
            status: refusal.status,
            reason: refusal.detail,
        }));
    }

    /// Where the balancer's own answer to a request goes (RFC 3261 §18.2.2):
    /// on the stream it came on; over UDP to the source address, at the
    /// source port if the Via asked for rport, else at the sent-by port.
    fn reply_egress(from: Peer, via_ports: Option<(Option<Option<u16>>, Option<u16>)>) -> Egress {
        if from.transport.is_stream() {
            return Egress::Stream(from.conn);
        }
        let port = match via_ports {
            Some((Some(_), _)) | None => from.remote.port(),
            Some((None, sent_by)) => sent_by.unwrap_or(Transport::Udp.default_port()),
        };
        Egress::Datagram {
            socket: from.conn,
            to: SocketAddr::new(from.remote.ip(), port),
        }
    }

    /// The affinity decision for a request (design.md §1, §2, §3, §6).
    fn route_request(&mut self, now: Instant, msg: &SipMessage) -> Result<Route, Refusal> {
        let bad = |detail: &str| Refusal {
            status: 400,
            reason: "Bad Request",
            detail: detail.to_owned(),
        };
        let method = msg.method().unwrap_or_default();
        let Some(call_id) = msg.call_id() else {
            return Err(bad("missing Call-ID header"));
        };
        let Some(cseq) = msg.cseq() else {
            return Err(bad("missing CSeq header"));
        };
        // Presence only (O(1)): the scan checked the Via syntax.
        if msg.header("Via").is_none() {
            return Err(bad("missing Via header"));
        }
        if msg.header("From").is_none() {
            return Err(bad("missing From header"));
        }
        if msg.header("To").is_none() {
            return Err(bad("missing To header"));
        }
        if !cseq.method.eq_ignore_ascii_case(method) {
            return Err(bad("CSeq method does not match the request method"));
        }
        if let StartLine::Request { version, .. } = msg.start_line() {
            if !version.eq_ignore_ascii_case(b"SIP/2.0") {
                return Err(Refusal {
                    status: 505,
                    reason: "Version Not Supported",
                    detail: format!(
                        "SIP version {} is not supported",
                        String::from_utf8_lossy(version)
                    ),
                });
            }
        }
        let request_uri = msg.request_uri();
        if request_uri.is_some_and(|u| u.headers.is_some()) {
            // RFC 4475 §3.1.2.11: escaped headers in a Request-URI.
            return Err(bad("Request-URI carries headers (?...)"));
        }
        if msg.to_tag().is_none() {
            // A new call: the full syntax of From, To, Contact and Route is
            // checked once here (RFC 4475 §3.1.2.6, .13, .14); in-dialog
            // requests take the fast path.
            if let Err(e) = msg.validate() {
                return Err(Refusal {
                    status: 400,
                    reason: "Bad Request",
                    detail: e.to_string(),
                });
            }
        }
        if msg.max_forwards() == Some(0) {
            return Err(Refusal {
                status: 483,
                reason: "Too Many Hops",
                detail: "Max-Forwards is 0".to_owned(),
            });
        }
        let is_ack = method.eq_ignore_ascii_case(b"ACK");
        let is_cancel = method.eq_ignore_ascii_case(b"CANCEL");

        if let Some(tag) = request_tag(request_uri.as_ref(), msg) {
            match self.keys.verify(tag, call_id) {
                Ok(t) if t.call_independent && !self.config.accept_call_independent_tags => {
                    self.counters.bad_tags += 1;
                    if self.config.bad_tag_policy == BadTagPolicy::Reject {
                        return Err(Refusal {
                            status: 403,
                            reason: "Forbidden",
                            detail: "call-independent affinity tag not accepted here".to_owned(),
                        });
                    }
                }
                Ok(t) => match self.backends.get(&t.backend) {
                    Some(b) if b.up => {
                        self.counters.routed_by_tag += 1;
                        return Ok(Route::Tagged(t.backend));
                    }
                    Some(_) => return self.failover(call_id, t.backend),
                    None => {
                        self.counters.unknown_backend_tags += 1;
                        if self.config.bad_tag_policy == BadTagPolicy::Reject {
                            return Err(Refusal {
                                status: 404,
                                reason: "Not Found",
                                detail: format!("affinity tag names unknown backend {}", t.backend),
                            });
                        }
                    }
                },
                Err(TagError::Malformed | TagError::BadMac) => {
                    self.counters.bad_tags += 1;
                    if self.config.bad_tag_policy == BadTagPolicy::Reject {
                        return Err(Refusal {
                            status: 403,
                            reason: "Forbidden",
                            detail: "affinity tag does not verify".to_owned(),
                        });
                    }
                }
            }
        }

        // Untagged (or a bad tag treated as none): the new-call table.
        let key = self.new_calls.key(call_id);
        if let Some(b) = self.new_calls.get(now, key) {
            if self.is_up(b) {
                self.counters.routed_by_table += 1;
                return Ok(Route::Table(b));
            }
            return self.failover(call_id, b);
        }
        if is_ack {
            return Err(Refusal {
                status: NO_ANSWER,
                reason: "",
                detail: "ACK matches no call".to_owned(),
            });
        }
        if is_cancel {
            return Err(Refusal {
                status: 481,
                reason: "Call/Transaction Does Not Exist",
                detail: "CANCEL matches no new call".to_owned(),
            });
        }
        let pool = self.selector.selection().pool_for(msg);
        if msg.to_tag().is_some() {
            // In-dialog but untagged: no memory of it; the stateless hash
            // agrees across replicas and restarts. Draining backends keep
            // their dialogs, so they are candidates too.
            let mut candidates = self.members(pool, false);
            if candidates.is_empty() {
                candidates = self.everyone(false);
            }
            return match rendezvous_weighted(call_id, candidates) {
                Some(b) => {
                    self.counters.routed_by_hash += 1;
                    Ok(Route::Hashed(b))
                }
                None => Err(Refusal {
                    status: 503,
                    reason: "Service Unavailable",
                    detail: "no backend is up".to_owned(),
                }),
            };
        }
        let chosen = match self.choose(now, pool, msg, call_id) {
            Choice::Backend { backend, pool: p } => {
                if p != pool {
                    self.counters.overflowed += 1;
                }
                let by_pool = &mut self.counters.selections_by_pool;
                if by_pool.len() <= p {
                    by_pool.resize(p + 1, 0);
                }
                by_pool[p] += 1;
                backend
            }
            Choice::Overloaded => {
                self.counters.rejected_overload += 1;
                let name = &self.selector.selection().pools()[pool].name;
                return Err(Refusal {
                    status: 503,
                    reason: "Service Unavailable",
                    detail: format!("every backend of pool {name} is above its high-water load"),
                });
            }
            Choice::NoBackend => {
                return Err(Refusal {
                    status: 503,
                    reason: "Service Unavailable",
                    detail: "no backend can take a new call".to_owned(),
                })
            }
        };
        let route = match self.new_calls.insert(now, key, chosen) {
            Ok(()) => {
                self.counters.routed_by_selection += 1;
                Route::Selected(chosen)
            }
            Err(_) => {
                // Table full: fall back to the stateless hash, which every
                // repeat of this call (and every replica) computes the
                // same way: over the serving members of the rules' pool,
                // else of the first pool of its overflow chain that has any.
                let b = self.hash_fallback(call_id, pool).unwrap_or(chosen);
                self.counters.routed_by_hash += 1;
                self.counters.table_full_fallbacks += 1;
                Route::Hashed(b)
            }
        };
        if let Some(b) = self.backends.get_mut(&route.backend()) {
            b.load.assign();
        }
        Ok(route)
    }

    /// A tagged request (or a new call's repeat) whose backend is down:
    /// a backup by weighted rendezvous hash of the Call-ID over the serving
    /// members of the dead backend's pools (else over every serving
    /// backend), or 503 by policy.
    fn failover(&mut self, call_id: &[u8], dead: BackendId) -> Result<Route, Refusal> {
        if self.config.failover_policy == FailoverPolicy::Reject {
            return Err(Refusal {
                status: 503,
                reason: "Service Unavailable",
                detail: "the call's backend is down".to_owned(),
            });
        }
        match self.backup(call_id, dead) {
            Some(backup) => {
                self.counters.failovers += 1;
                Ok(Route::Failover(backup))
            }
            None => Err(Refusal {
                status: 503,
                reason: "Service Unavailable",
                detail: "the call's backend is down and no other is up".to_owned(),
            }),
        }
    }

    /// The failover backup of a call whose backend `dead` is down. Every
    /// replica with the same backends up, draining states and capacities
    /// picks the same one.
    pub fn backup(&self, call_id: &[u8], dead: BackendId) -> Option<BackendId> {
        let mut candidates: Vec<(BackendId, u32)> = Vec::new();
        if let Some(b) = self.backends.get(&dead) {
            for &p in &b.pools {
                for c in self.members(p, true) {
                    if c.0 != dead && !candidates.contains(&c) {
                        candidates.push(c);
                    }
                }
            }
        }
        if candidates.is_empty() {
            candidates = self.everyone(true);
        }
        rendezvous_weighted(call_id, candidates)
    }

    /// Where the stateless hash places a new call when the new-call table
    /// is full (see `route_request`).
    pub fn hash_fallback(&self, call_id: &[u8], pool: PoolId) -> Option<BackendId> {
        self.selector
            .selection()
            .chain(pool)
            .iter()
            .map(|&p| self.members(p, true))
            .find(|m| !m.is_empty())
            .and_then(|m| rendezvous_weighted(call_id, m))
    }

    fn weight(&self, b: &Backend) -> u32 {
        match &b.plain {
            Some(p) => p.member.weight,
            None => b.load.capacity(self.config.selection.default_capacity),
        }
    }

    /// The up members of `pool` (only the serving ones if `serving`), with
    /// their capacity weights.
    fn members(&self, pool: PoolId, serving: bool) -> Vec<(BackendId, u32)> {
        self.pool_members
            .get(pool)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let b = self.backends.get(id)?;
                let ok = b.up && (!serving || b.drain == DrainState::Serving);
                ok.then(|| (*id, self.weight(b)))
            })
            .collect()
    }

    /// Every up backend (only the serving ones if `serving`), weighted.
    fn everyone(&self, serving: bool) -> Vec<(BackendId, u32)> {
        self.live
            .iter()
            .filter_map(|id| {
                let b = self.backends.get(id)?;
                let ok = !serving || b.drain == DrainState::Serving;
                ok.then(|| (*id, self.weight(b)))
            })
            .collect()
    }

    /// Runs the pool's policy (see [`select`](super::select)) over its up,
    /// serving members.
    fn choose(&mut self, now: Instant, pool: PoolId, msg: &SipMessage, call_id: &[u8]) -> Choice {
        let Router {
            selector,
            backends,
            pool_members,
            config,
            ..
        } = self;
        let default_capacity = config.selection.default_capacity;
        let input = HashInput::request(call_id, msg);
        selector.choose(pool, &input, |p, pool_cfg, out| {
            for id in pool_members.get(p).into_iter().flatten() {
                let Some(b) = backends.get(id) else { continue };
                if !b.up || b.drain != DrainState::Serving {
                    continue;
                }
                let traffic = if pool_cfg.policy == Policy::LeastTraffic {
                    // Counts fit an f64 well enough to compare.
                    #[allow(clippy::cast_precision_loss)]
                    let t = b.traffic.link(now).metric(pool_cfg.traffic_metric) as f64;
                    t
                } else {
                    0.0
                };
                out.push(match &b.plain {
                    // Plain backends report no load: always headroom.
                    Some(p) => Candidate {
                        id: *id,
                        weight: p.member.weight,
                        load: 0.0,
                        traffic,
                    },
                    None => Candidate {
                        id: *id,
                        weight: b.load.capacity(default_capacity),
                        load: b.load.load(default_capacity),
                        traffic,
                    },
                });
            }
        })
    }

    fn forward_request(
        &mut self,
        now: Instant,
        arrival_unix_us: u64,
        from: Peer,
        msg: &SipMessage,
        route: Route,
    ) {
        let backend = route.backend();
        let mut rw = Rewrite::new(msg);
        for own in [TAG_HEADER, FAILOVER_HEADER] {
            if msg.has_viaduct_headers() && msg.header(own).is_some() {
                rw.remove_headers(own);
                self.counters.own_headers_stripped += 1;
            }
        }
        // RFC 3261 §18.2.1 and RFC 3581: record where it really came from.
        super::proxy::mark_received(&mut rw, msg, from.remote);
        let call_id = msg.call_id().unwrap_or_default();
        match route {
            Route::Tagged(_) => {}
            Route::Table(b) | Route::Selected(b) | Route::Hashed(b) => {
                let tag = self.keys.mint(b, call_id);
                rw.insert_header(TAG_HEADER, &tag);
            }
            Route::Failover(b) => {
                let old = find_request_tag(msg)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                rw.insert_header(
                    FAILOVER_HEADER,
                    if old.is_empty() { b"table" } else { &old },
                );
                let tag = self.keys.mint(b, call_id);
                rw.insert_header(TAG_HEADER, &tag);
            }
        }
        let message = rw.finish();
        self.counters.to_backends += 1;
        if let Some(b) = self.backends.get_mut(&backend) {
            b.traffic.to_backend(now, message.len());
        }
        self.actions.push_back(Action::ToBackend {
            backend,
            frame: Frame::SipToBackend(SipToBackend {
                failover: matches!(route, Route::Failover(_)),
                connection: from.conn,
                transport: from.transport,
                peer: from.remote,
                local: from.local,
                arrival_unix_us,
                message,
            }),
        });
    }

    /// A response from a peer answers a request a backend originated: the
    /// top Via is the agent's, its branch carries the tag (design.md §2).
    fn route_response(&mut self, now: Instant, arrival_unix_us: u64, from: Peer, msg: SipMessage) {
        let top_branch = msg.top_via().and_then(|v| v.branch);
        if top_branch.is_some_and(|b| b.starts_with(proxy::PROXY_BRANCH_PREFIX)) {
            return self.plain_response(now, from, &msg);
        }
        if top_branch.is_some_and(|b| b.starts_with(proxy::PROBE_BRANCH_PREFIX)) {
            return self.probe_answer(now, from, &msg);
        }
        let target = msg
            .top_via()
            .and_then(|v| v.branch)
            .and_then(|branch| branch.strip_prefix(BRANCH_PREFIX))
            .and_then(|rest| rest.get(..encap_proto::tag::TAG_LEN))
            .map(|tag| self.keys.verify(tag, msg.call_id().unwrap_or_default()));
        let backend = match target {
            Some(Ok(t)) if self.is_up(t.backend) => t.backend,
            Some(Ok(t)) => {
                return self.drop_response(
                    from,
                    format!("response for backend {} which is down", t.backend),
                )
            }
            Some(Err(e)) => {
                self.counters.bad_tags += 1;
                return self.drop_response(from, format!("response Via branch: {e}"));
            }
            None => {
                return self.drop_response(from, "response without a Viaduct Via branch".to_owned())
            }
        };
        self.counters.to_backends += 1;
        if let Some(b) = self.backends.get_mut(&backend) {
            b.traffic.to_backend(now, msg.bytes().len());
        }
        self.actions.push_back(Action::ToBackend {
            backend,
            frame: Frame::SipToBackend(SipToBackend {
                failover: false,
                connection: from.conn,
                transport: from.transport,
                peer: from.remote,
                local: from.local,
                arrival_unix_us,
                message: msg.bytes().clone(),
            }),
        });
    }

    fn drop_response(&mut self, from: Peer, reason: String) {
        self.counters.dropped_responses += 1;
        self.actions.push_back(Action::Event(Event::Dropped {
            from: Source::Peer(from.remote),
            reason,
        }));
    }
}

// ------------------------------------------------------ plain SIP backends

/// Plain SIP backends (design.md §7): the balancer is their stateless
/// proxy; [`proxy`] writes the messages.
impl Router {
    /// Registers the plain SIP members of the `mode = "sip"` pools (up,
    /// first OPTIONS probe now) and emits a [`Event::BackendUp`] for each.
    /// Call it once the SIP sockets are reported (`socket_opened`,
    /// [`advertise`](Self::advertise)); [`handle_timeout`](Self::handle_timeout)
    /// calls it on its first run. Later calls do nothing.
    pub fn start(&mut self, now: Instant) {
        if self.plain_started {
            return;
        }
        self.plain_started = true;
        let pools = self.config.selection.pools().to_vec();
        for (p, pool) in pools.iter().enumerate() {
            for m in &pool.members {
                let id = m.id;
                self.plain_by_addr.insert((m.transport, m.address), id);
                if let Some(members) = self.pool_members.get_mut(p) {
                    if let Err(at) = members.binary_search(&id) {
                        members.insert(at, id);
                    }
                }
                self.backends.insert(
                    id,
                    Backend {
                        name: m.name.clone(),
                        up: true,
                        drain: DrainState::Serving,
                        last_heard: now,
                        load: LoadState::default(),
                        traffic: Traffic::new(self.config.selection.traffic_window),
                        pools: vec![p],
                        plain: Some(Box::new(Plain {
                            member: m.clone(),
                            probe: pool.probe.clone(),
                            outstanding: None,
                            seq: 0,
                            next_probe: (!pool.probe.interval.is_zero()).then_some(now),
                            failures: 0,
                            successes: 0,
                        })),
                    },
                );
                self.set_live(id, true);
                self.actions
                    .push_back(Action::Event(Event::BackendUp { backend: id }));
            }
        }
        self.probe_due(now);
    }

    /// The address to write in Via and Record-Route for our socket or
    /// listener bound at `bound` (its `public_address`); unset, the bound
    /// address is advertised.
    pub fn advertise(&mut self, transport: Transport, bound: SocketAddr, public: SocketAddr) {
        self.advertised
            .retain(|&(t, b, _)| !(t == transport && b == bound));
        self.advertised.push((transport, bound, public));
        for a in [bound, public] {
            if !self.local_addrs.contains(&a) {
                self.local_addrs.push(a);
            }
        }
    }

    /// Whether `backend` is a plain SIP backend.
    pub fn is_plain(&self, backend: BackendId) -> bool {
        self.backends
            .get(&backend)
            .is_some_and(|b| b.plain.is_some())
    }

    /// The plain SIP backend a message came from, if any: over UDP, from
    /// its address; over TCP, on a connection to its address, or from its
    /// IP address (a connection it opened).
    fn plain_source(&self, from: Peer) -> Option<BackendId> {
        if self.plain_by_addr.is_empty() {
            return None;
        }
        if let Some(&b) = self.plain_by_addr.get(&(from.transport, from.remote)) {
            return Some(b);
        }
        if from.transport.is_stream() {
            return self
                .plain_by_addr
                .iter()
                .filter(|((t, a), _)| *t == from.transport && a.ip() == from.remote.ip())
                .map(|(_, &b)| b)
                .min();
        }
        None
    }

    /// The address we advertise for `local` over `transport`.
    fn public_of(&self, transport: Transport, local: SocketAddr) -> SocketAddr {
        self.advertised
            .iter()
            .find(|&&(t, b, _)| {
                t == transport
                    && (b == local || (b.ip().is_unspecified() && b.port() == local.port()))
            })
            .map_or(local, |&(_, _, p)| p)
    }

    /// The side a message from `from` came in by.
    fn ingress_side(&self, from: Peer) -> Side {
        Side {
            transport: from.transport,
            addr: self.public_of(from.transport, from.local),
        }
    }

    /// How to send to `to` over `transport` (on connection `named` if it is
    /// still open to that host), and the side it leaves by.
    fn egress_to(
        &self,
        transport: Transport,
        to: SocketAddr,
        named: Option<ConnId>,
    ) -> Option<(Egress, Side)> {
        if transport == Transport::Udp {
            let egress = self.egress(named, transport, to)?;
            let Egress::Datagram { socket, .. } = egress else {
                return None;
            };
            let local = self.conns.get(&socket)?.local;
            return Some((
                egress,
                Side {
                    transport,
                    addr: self.public_of(transport, local),
                },
            ));
        }
        // Our stream listener of the destination's address family: peers
        // open their connections (and send responses) to it.
        let addr = self
            .advertised
            .iter()
            .find(|&&(t, b, _)| t == transport && b.is_ipv4() == to.is_ipv4())
            .map(|&(_, _, p)| p)?;
        let open = named.filter(|id| {
            self.conns.get(id).is_some_and(|c| {
                c.transport == transport && c.remote.is_some_and(|r| r.ip() == to.ip())
            })
        });
        let egress = match open {
            Some(id) => Egress::Stream(id),
            None => self.egress(None, transport, to)?,
        };
        Some((egress, Side { transport, addr }))
    }

    /// Whether a Route URI names this balancer.
    fn is_our_uri(&self, uri: &encap_proto::sip::Uri<'_>) -> bool {
        proxy::uri_addr(uri).is_some_and(|(_, a)| self.local_addrs.contains(&a))
    }

    /// A request routed to a plain SIP backend: forwarded as a stateless
    /// proxy (see [`proxy`]).
    fn forward_to_plain(&mut self, now: Instant, from: Peer, msg: &SipMessage, route: Route) {
        let backend = route.backend();
        let Some(member) = self
            .backends
            .get(&backend)
            .and_then(|b| b.plain.as_ref())
            .map(|p| p.member.clone())
        else {
            return;
        };
        let call_id = msg.call_id().unwrap_or_default();
        let tag = self.keys.mint(backend, call_id);
        let failover = match route {
            Route::Failover(_) => {
                Some(find_request_tag(msg).map_or_else(|| b"table".to_vec(), <[u8]>::to_vec))
            }
            _ => None,
        };
        self.proxy_out(
            now,
            from,
            msg,
            backend,
            &tag,
            (member.transport, member.address),
            failover.as_deref(),
            None,
        );
        self.counters.to_backends += 1;
    }

    /// A request from a plain SIP backend: to the next Route entry that is
    /// not ours, else to the Request-URI.
    fn request_from_plain(
        &mut self,
        now: Instant,
        from: Peer,
        backend: BackendId,
        msg: &SipMessage,
    ) {
        let refusal = |status, reason, detail: &str| Refusal {
            status,
            reason,
            detail: detail.to_owned(),
        };
        let Some(call_id) = msg.call_id() else {
            return self.refuse(
                from,
                msg,
                refusal(400, "Bad Request", "missing Call-ID header"),
            );
        };
        if msg.top_via().is_none() {
            return self.refuse(from, msg, refusal(400, "Bad Request", "missing Via header"));
        }
        if msg.max_forwards() == Some(0) {
            return self.refuse(
                from,
                msg,
                refusal(483, "Too Many Hops", "Max-Forwards is 0"),
            );
        }
        let entries = proxy::route_entries(msg);
        let own = proxy::own_routes(&entries, |u| self.is_our_uri(u));
        let next = match entries.get(own) {
            Some(e) => encap_proto::sip::NameAddr::parse(e).and_then(|na| proxy::uri_addr(&na.uri)),
            None => msg.request_uri().and_then(|u| proxy::uri_addr(&u)),
        };
        let Some(next) = next else {
            return self.refuse(
                from,
                msg,
                refusal(
                    502,
                    "Bad Gateway",
                    "next hop is not an IP address (no DNS here)",
                ),
            );
        };
        let tag = self.keys.mint(backend, call_id);
        if self.proxy_out(
            now,
            from,
            msg,
            backend,
            &tag,
            next,
            None,
            Some((&entries, own)),
        ) {
            self.counters.from_backends += 1;
            if let Some(b) = self.backends.get_mut(&backend) {
                b.traffic.from_backend(now, msg.bytes().len());
            }
        }
    }

    /// Forwards `msg` to `next` as a stateless proxy with `tag`; false if it
    /// was refused or dropped instead.
    #[allow(clippy::too_many_arguments)]
    fn proxy_out(
        &mut self,
        now: Instant,
        from: Peer,
        msg: &SipMessage,
        backend: BackendId,
        tag: &[u8; encap_proto::tag::TAG_LEN],
        next: (Transport, SocketAddr),
        failover: Option<&[u8]>,
        routes: Option<(&[&[u8]], usize)>,
    ) -> bool {
        let branch = proxy::stateless_branch(msg, tag);
        if proxy::is_loop(msg, &branch) || self.local_addrs.contains(&next.1) {
            self.refuse(
                from,
                msg,
                Refusal {
                    status: 482,
                    reason: "Loop Detected",
                    detail: "the request has been through this balancer before".to_owned(),
                },
            );
            return false;
        }
        let Some((egress, side)) = self.egress_to(next.0, next.1, None) else {
            self.actions.push_back(Action::Event(Event::Dropped {
                from: Source::Peer(from.remote),
                reason: format!("no {} socket or listener to reach {}", next.0, next.1),
            }));
            return false;
        };
        let method = msg.method().unwrap_or_default();
        let record_route = msg.to_tag().is_none()
            && !(method.eq_ignore_ascii_case(b"REGISTER")
                || method.eq_ignore_ascii_case(b"ACK")
                || method.eq_ignore_ascii_case(b"CANCEL"));
        // The Route entries, read once (the caller may have read them).
        let read;
        let (routes, own_routes) = match routes {
            Some(r) => r,
            None if msg.top_route().is_some() => {
                read = proxy::route_entries(msg);
                let own = proxy::own_routes(&read, |u| self.is_our_uri(u));
                (&read[..], own)
            }
            None => (&[][..], 0),
        };
        let message = proxy::forward_request(
            msg,
            &proxy::Forward {
                egress: side,
                ingress: self.ingress_side(from),
                tag,
                branch: &branch,
                conn: from.conn,
                source: from.remote,
                record_route,
                routes,
                own_routes,
                failover,
            },
        );
        if self.plain_source(from).is_none() {
            if let Some(b) = self.backends.get_mut(&backend) {
                b.traffic.to_backend(now, message.len());
            }
        }
        self.actions.push_back(Action::ToPeer { egress, message });
        true
    }

    /// A response whose top Via is ours (a stateless branch): pop it, send
    /// per the next Via.
    fn plain_response(&mut self, now: Instant, from: Peer, msg: &SipMessage) {
        let call_id = msg.call_id().unwrap_or_default();
        let tag = msg
            .top_via()
            .and_then(|v| v.branch)
            .and_then(proxy::branch_tag)
            .map(|t| self.keys.verify(t, call_id));
        let backend = match tag {
            Some(Ok(t)) => t.backend,
            Some(Err(e)) => {
                self.counters.bad_tags += 1;
                return self.drop_response(from, format!("response Via branch: {e}"));
            }
            None => return self.drop_response(from, "malformed Viaduct Via branch".to_owned()),
        };
        let hop = match proxy::response_hop(msg) {
            Ok(hop) => hop,
            Err(e) => return self.drop_response(from, format!("response next hop: {e}")),
        };
        if self.local_addrs.contains(&hop.to) {
            return self.drop_response(from, format!("loop: next hop {} is this balancer", hop.to));
        }
        if let Some(status) = msg.status() {
            let key = self.new_calls.key(call_id);
            if status < 200 {
                self.new_calls.refresh(now, key);
            } else {
                self.new_calls.linger(now, key);
            }
        }
        let Some((egress, _)) = self.egress_to(hop.transport, hop.to, hop.conn) else {
            return self.drop_response(
                from,
                format!("no {} socket to reach {}", hop.transport, hop.to),
            );
        };
        let message = proxy::pop_via(msg);
        let from_backend = self.plain_source(from) == Some(backend);
        if let Some(b) = self.backends.get_mut(&backend) {
            if from_backend {
                b.traffic.from_backend(now, message.len());
            } else {
                b.traffic.to_backend(now, message.len());
            }
        }
        if from_backend {
            self.counters.from_backends += 1;
        } else {
            self.counters.to_backends += 1;
        }
        self.actions.push_back(Action::ToPeer { egress, message });
    }

    /// The earliest probe due.
    fn next_probe(&self) -> Option<Instant> {
        self.backends
            .values()
            .filter_map(|b| b.plain.as_ref()?.next_probe)
            .min()
    }

    /// Sends the probes due at `now`; a probe still unanswered when the
    /// next is due failed.
    fn probe_due(&mut self, now: Instant) {
        let due: Vec<BackendId> = self
            .backends
            .iter()
            .filter(|(_, b)| {
                b.plain
                    .as_ref()
                    .and_then(|p| p.next_probe)
                    .is_some_and(|t| now >= t)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let Some(p) = self.backends.get_mut(&id).and_then(|b| b.plain.as_mut()) else {
                continue;
            };
            let unanswered = p.outstanding.take().is_some();
            p.seq += 1;
            p.outstanding = Some(p.seq);
            p.next_probe = Some(now + p.probe.interval);
            let (seq, member) = (p.seq, p.member.clone());
            if unanswered {
                self.probe_result(id, false);
            }
            let target = Side {
                transport: member.transport,
                addr: member.address,
            };
            if let Some((egress, side)) = self.egress_to(member.transport, member.address, None) {
                let message = proxy::probe_request(target, side, id, seq);
                self.actions.push_back(Action::ToPeer { egress, message });
            }
        }
    }

    /// An answer to one of our OPTIONS probes.
    fn probe_answer(&mut self, _now: Instant, from: Peer, msg: &SipMessage) {
        let Some((id, seq)) = msg
            .top_via()
            .and_then(|v| v.branch)
            .and_then(proxy::parse_probe_branch)
        else {
            return self.drop_response(from, "malformed probe branch".to_owned());
        };
        let status = msg.status().unwrap_or(0);
        let Some(p) = self.backends.get_mut(&id).and_then(|b| b.plain.as_mut()) else {
            return self.drop_response(from, format!("probe answer for unknown backend {id}"));
        };
        if p.member.address.ip() != from.remote.ip() || p.outstanding != Some(seq) {
            return self.drop_response(from, "stale or foreign probe answer".to_owned());
        }
        if status < 200 {
            return;
        }
        p.outstanding = None;
        let ok = p.probe.accept.contains(&status);
        self.probe_result(id, ok);
    }

    fn probe_result(&mut self, id: BackendId, ok: bool) {
        let Some(b) = self.backends.get_mut(&id) else {
            return;
        };
        let Some(p) = b.plain.as_mut() else { return };
        if ok {
            p.failures = 0;
            p.successes = p.successes.saturating_add(1);
            if !b.up && p.successes >= p.probe.successes_up {
                b.up = true;
                self.set_live(id, true);
                self.actions
                    .push_back(Action::Event(Event::BackendUp { backend: id }));
            }
        } else {
            p.successes = 0;
            p.failures = p.failures.saturating_add(1);
            if b.up && p.failures >= p.probe.failures_down {
                self.backend_down(id, "OPTIONS probes failed");
            }
        }
    }
}

/// The tag of a request, in the order of design.md §2: a Request-URI
/// parameter, then a top Route URI parameter.
fn find_request_tag(msg: &SipMessage) -> Option<&[u8]> {
    request_tag(msg.request_uri().as_ref(), msg)
}

/// [`find_request_tag`] with the Request-URI already read.
fn request_tag<'m>(request_uri: Option<&Uri<'m>>, msg: &'m SipMessage) -> Option<&'m [u8]> {
    if let Some(Some(tag)) = request_uri.and_then(|u| u.param(TAG_PARAM)) {
        return Some(tag);
    }
    msg.top_route()
        .and_then(|r| r.uri.param(TAG_PARAM))
        .flatten()
}

/// A Warning header value (RFC 3261 §20.43) carrying `text`.
fn warning_value(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    format!("399 viaduct \"{clean}\"")
}

/// Operator actions (the admin API), kept apart from the routing code.
impl Router {
    /// An operator drains (`Draining`) or undrains (`Serving`) `backend`:
    /// the router records the state at once (a draining backend takes no
    /// new call; its dialogs still reach it by their tags) and tells the
    /// agent with a DRAIN frame (`Action::ToBackend`). Returns false, and
    /// does nothing, if the backend is unknown or down (no agent to tell).
    /// A drain is remembered for the balancer's lifetime: when the backend
    /// reconnects (its link dropped, or its process restarted), it is
    /// drained again until the operator undrains it.
    pub fn set_drain(&mut self, backend: BackendId, state: DrainState) -> bool {
        let Some(b) = self.backends.get_mut(&backend) else {
            return false;
        };
        if !b.up {
            return false;
        }
        b.drain = state;
        if state == DrainState::Serving {
            self.operator_drained.remove(&backend);
        } else {
            self.operator_drained.insert(backend);
        }
        self.actions.push_back(Action::ToBackend {
            backend,
            frame: Frame::Drain(state),
        });
        true
    }

    /// The id of the known backend registered as `name`.
    pub fn backend_by_name(&self, name: &str) -> Option<BackendId> {
        self.backends
            .iter()
            .find(|(_, b)| b.name == name)
            .map(|(&id, _)| id)
    }
}

impl Router {
    /// Applies what a configuration reload (SIGHUP) may change at run time:
    /// the bad-tag and failover policies, whether call-independent tags are
    /// accepted, the 503 Retry-After, the missed-report limit, the new-call
    /// table's lifetime and bound, and the tag keys (secret rotation).
    /// Pools, rules, limits and the report interval need a restart; they
    /// are left as they are.
    pub fn reconfigure(&mut self, new: &RouterConfig, keys: TagKeys) {
        self.config.bad_tag_policy = new.bad_tag_policy;
        self.config.accept_call_independent_tags = new.accept_call_independent_tags;
        self.config.retry_after_secs = new.retry_after_secs;
        self.config.failover_policy = new.failover_policy;
        self.config.missed_reports_down = new.missed_reports_down;
        self.config.new_call_lifetime = new.new_call_lifetime;
        self.config.new_call_capacity = new.new_call_capacity;
        self.new_calls
            .set_limits(new.new_call_lifetime, new.new_call_capacity);
        self.keys = keys;
    }
}
