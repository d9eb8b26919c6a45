//! Peer mode: backends that balance among themselves, with no balancer in
//! front. Proxies reach the backends directly (DNS SRV, a static list);
//! each agent listens for SIP itself, exchanges load reports with its
//! peers, and hands new calls it should not take to a lighter peer.
//!
//! * [`decide`] is the decision, pure: local load, peer table with the
//!   time of each peer's last report, rules, thresholds and `now` in, a
//!   [`decide::Decision`] out; plus the Call-ID memory that keeps a call's
//!   untagged repeats together.
//! * `driver` (private) does the I/O: the SIP listener (UDP and TCP), the
//!   peer listener, and the relay of forwarded calls.
//!
//! Peer links reuse the balancer-link protocol unchanged (encap-proto
//! frames, `encap-proto/SPEC.md`): every agent dials every peer as it
//! would dial a balancer (HELLO / CHALLENGE / AUTH / WELCOME with the
//! cluster secret, then a LOAD report every 500 ms), and accepts its peers'
//! links as a balancer would. On the link a peer B dialed into A, A plays
//! the balancer for B: it reads B's load reports, sends B the calls it
//! forwards (`SIP_TO_BACKEND`) and relays B's answers (`SIP_FROM_BACKEND`)
//! out on the connection or socket the request came on.
//!
//! Affinity: a backend stamps its own SIP address and its own tag into
//! Contact (the tag's backend id is [`peer_id_of`] its name, the same on
//! every peer). A request that reaches peer A with B's tag (the proxy sent
//! it to A anyway) is forwarded to B over B's link; if B is down, A takes
//! it itself, marked failover (design.md §6).

pub mod decide;
pub(crate) mod driver;

use std::net::SocketAddr;

pub use decide::{HandOffReason, KeepReason, PeerPolicy, PinRule, PinTarget};

/// How a call handed to a peer gets there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandOffMode {
    /// Answer `302 Moved Temporarily` with the peer's Contact; the proxy
    /// retries there and nothing stays on this backend.
    #[default]
    Redirect,
    /// Forward the request to the peer over the peer link and relay its
    /// responses (for proxies that do not follow redirects).
    Forward,
}

/// Settings of peer mode (`AgentConfig::peer`).
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where this backend listens for SIP, UDP and TCP.
    pub sip_listen: SocketAddr,
    /// The address written in Contact (and given to peers for redirects).
    /// Default: `sip_listen`.
    pub sip_public: SocketAddr,
    /// Where this agent accepts its peers' links.
    pub peer_listen: SocketAddr,
    /// The peer-link addresses of the other backends (our own
    /// `peer_listen`, if listed, is skipped).
    pub peers: Vec<SocketAddr>,
    /// Thresholds and rules. Default: [`PeerPolicy::default`].
    pub policy: PeerPolicy,
    /// 302 or forward. Default: redirect.
    pub hand_off: HandOffMode,
}

impl PeerConfig {
    /// Peer mode with the default policy and redirects.
    pub fn new(
        sip_listen: SocketAddr,
        peer_listen: SocketAddr,
        peers: Vec<SocketAddr>,
    ) -> PeerConfig {
        PeerConfig {
            sip_listen,
            sip_public: sip_listen,
            peer_listen,
            peers,
            policy: PeerPolicy::default(),
            hand_off: HandOffMode::Redirect,
        }
    }
}

/// The backend id a name stands for in peer mode (and, unless configured
/// otherwise, at a balancer): [`encap_proto::tag::backend_id_of`]. Every peer
/// and every balancer computes the same.
pub use encap_proto::tag::backend_id_of as peer_id_of;

/// Why a request meant for a peer did not go over that peer's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ForwardFailure {
    /// The link's queue was full: a UDP request is dropped (the client
    /// retransmits), a TCP one taken here.
    QueueFull,
    /// The link closed since the decision: the request is taken here.
    LinkClosed,
}

impl ForwardFailure {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardFailure::QueueFull => "queue_full",
            ForwardFailure::LinkClosed => "link_closed",
        }
    }
}

/// Peer-mode figures for the application's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetrics {
    /// Calls handed off, by peer and reason.
    pub handed_off: std::collections::BTreeMap<(String, HandOffReason), u64>,
    /// New calls kept here, by reason.
    pub kept: std::collections::BTreeMap<KeepReason, u64>,
    /// Requests taken here because the backend their tag names is down.
    pub failovers: u64,
    /// Requests meant for a peer that did not go over its link, by peer
    /// and reason.
    pub not_forwarded: std::collections::BTreeMap<(String, ForwardFailure), u64>,
    /// Every peer known, sorted by name.
    pub peers: Vec<PeerStatus>,
    /// This backend's own load, % of capacity.
    pub local_load_percent: u32,
}

/// One peer as this agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its agent name.
    pub name: String,
    /// Its backend id.
    pub id: u16,
    /// On-line (linked and heard from within 3 periods).
    pub online: bool,
    /// Its last reported load, % of capacity.
    pub load_percent: u32,
    /// Time since its last report; `None` before the first.
    pub last_report_age: Option<std::time::Duration>,
}
