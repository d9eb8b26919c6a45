//! The peer-mode decision, pure: where a new call goes, given the local
//! load, what the peers last reported and when, the content rules and the
//! thresholds. No clock, no I/O: the driver passes `now`.
//!
//! The rule (README "Peer mode"):
//!
//! 1. A content rule that matches pins the request to the local backend or
//!    to a named peer (if that peer is on-line; else it stays local).
//! 2. Under `local_below_percent` of capacity, the call stays local.
//! 3. Above it, the call goes to the least-loaded on-line peer whose load
//!    is lower than the local one by at least `handoff_margin_points`;
//!    with no such peer it stays local.
//!
//! A peer is on-line while its last load report is younger than
//! `silence_periods` report periods (3 × 500 ms by default) and its link
//! is up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use encap_proto::frame::LoadReport;

/// The report period of peer links.
pub const REPORT_PERIOD: Duration = Duration::from_millis(500);
/// Periods of silence after which a peer is off-line.
pub const SILENCE_PERIODS: u32 = 3;

/// Thresholds and rules of the decision; replaceable at run time
/// (`Agent::set_peer_policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Below this load (% of capacity) every new call stays local.
    /// Default: 50.
    pub local_below_percent: u32,
    /// A peer takes a call only if its load is lower than ours by at
    /// least this many points. Default: 20.
    pub handoff_margin_points: u32,
    /// Content rules, first match wins. Default: none.
    pub rules: Vec<PinRule>,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        PeerPolicy {
            local_below_percent: 50,
            handoff_margin_points: 20,
            rules: Vec::new(),
        }
    }
}

/// A content rule: requests it matches go to `target` whatever the load.
/// Every field set must match (ASCII case-insensitive, exact).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PinRule {
    /// The request method, e.g. `SUBSCRIBE`.
    pub method: Option<String>,
    /// The Request-URI user part.
    pub ruri_user: Option<String>,
    /// The Request-URI host.
    pub ruri_host: Option<String>,
    /// Where matching requests go.
    pub target: PinTarget,
}

/// Where a rule pins requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PinTarget {
    /// This backend.
    #[default]
    Local,
    /// The peer of this name (its agent name).
    Peer(String),
}

/// What the decision needs of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The method.
    pub method: &'a [u8],
    /// The Request-URI user part.
    pub ruri_user: Option<&'a [u8]>,
    /// The Request-URI host.
    pub ruri_host: &'a [u8],
}

/// What is known of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Its agent name.
    pub name: String,
    /// Its last load, % of capacity (see [`load_percent`]).
    pub load_percent: u32,
    /// When its last report arrived.
    pub last_report: Instant,
    /// Whether a link to it is up (a closed link is off-line at once).
    pub linked: bool,
}

impl PeerView {
    /// On-line: linked and heard from within `SILENCE_PERIODS` periods.
    pub fn online(&self, now: Instant) -> bool {
        self.linked
            && now.saturating_duration_since(self.last_report) < REPORT_PERIOD * SILENCE_PERIODS
    }
}

/// Why a call stayed local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeepReason {
    /// Local load under `local_below_percent`.
    UnderThreshold,
    /// No on-line peer lighter by the margin.
    NoLighterPeer,
    /// A rule pins it here.
    PinnedLocal,
    /// A rule pins it to a peer that is off-line.
    PinnedPeerOffline,
}

/// Why a call was handed to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HandOffReason {
    /// The load rule.
    Load,
    /// A content rule.
    Pinned,
    /// The request carries that peer's affinity tag.
    Affinity,
}

impl HandOffReason {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HandOffReason::Load => "load",
            HandOffReason::Pinned => "pinned",
            HandOffReason::Affinity => "affinity",
        }
    }
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Process it here.
    Local(KeepReason),
    /// Hand it to this peer.
    HandOff {
        /// The peer's name.
        peer: String,
        /// Why.
        reason: HandOffReason,
    },
}

/// The load of a report, in % of capacity: the larger of active calls over
/// capacity and the application score (0..=10000 → 0..=100).
pub fn load_percent(report: &LoadReport) -> u32 {
    let calls = if report.capacity == 0 {
        100
    } else {
        let pct = u64::from(report.active_calls) * 100 / u64::from(report.capacity);
        u32::try_from(pct).unwrap_or(u32::MAX)
    };
    let score = report.score.map_or(0, |s| u32::from(s) / 100);
    calls.max(score)
}

fn matches(field: &Option<String>, value: Option<&[u8]>) -> bool {
    match field {
        None => true,
        Some(want) => value.is_some_and(|v| v.eq_ignore_ascii_case(want.as_bytes())),
    }
}

/// Where a new call goes.
pub fn decide(
    now: Instant,
    local_percent: u32,
    peers: &[PeerView],
    policy: &PeerPolicy,
    request: &RequestFacts<'_>,
) -> Decision {
    let rule = policy.rules.iter().find(|r| {
        matches(&r.method, Some(request.method))
            && matches(&r.ruri_user, request.ruri_user)
            && matches(&r.ruri_host, Some(request.ruri_host))
    });
    match rule.map(|r| &r.target) {
        Some(PinTarget::Local) => return Decision::Local(KeepReason::PinnedLocal),
        Some(PinTarget::Peer(name)) => {
            return if peers.iter().any(|p| &p.name == name && p.online(now)) {
                Decision::HandOff {
                    peer: name.clone(),
                    reason: HandOffReason::Pinned,
                }
            } else {
                Decision::Local(KeepReason::PinnedPeerOffline)
            };
        }
        None => {}
    }
    if local_percent < policy.local_below_percent {
        return Decision::Local(KeepReason::UnderThreshold);
    }
    peers
        .iter()
        .filter(|p| p.online(now))
        .filter(|p| p.load_percent.saturating_add(policy.handoff_margin_points) <= local_percent)
        .min_by(|a, b| (a.load_percent, &a.name).cmp(&(b.load_percent, &b.name)))
        .map_or(Decision::Local(KeepReason::NoLighterPeer), |p| {
            Decision::HandOff {
                peer: p.name.clone(),
                reason: HandOffReason::Load,
            }
        })
}

/// Where a call's earlier request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Processed here.
    Local,
    /// Forwarded to this peer over the peer link.
    Forwarded(String),
    /// Answered 302 towards this peer.
    Redirected(String),
}

/// Memory of where new calls went, by Call-ID, so that their untagged
/// repeats (retransmissions, CANCEL, the ACK of a failure) follow them; an
/// entry lives `lifetime` (32 s, 64 × T1) from its last use.
#[derive(Debug)]
pub struct CallMemory {
    lifetime: Duration,
    entries: HashMap<Vec<u8>, (Destination, Instant)>,
    next_sweep: Option<Instant>,
}

impl CallMemory {
    /// An empty memory whose entries live `lifetime`.
    pub fn new(lifetime: Duration) -> CallMemory {
        CallMemory {
            lifetime,
            entries: HashMap::new(),
            next_sweep: None,
        }
    }

    /// Where `call_id` went, if remembered and not expired.
    pub fn get(&self, now: Instant, call_id: &[u8]) -> Option<&Destination> {
        self.entries
            .get(call_id)
            .filter(|(_, deadline)| now < *deadline)
            .map(|(d, _)| d)
    }

    /// Remembers where `call_id` went; forgets expired entries now and then.
    pub fn insert(&mut self, now: Instant, call_id: &[u8], to: Destination) {
        if self.next_sweep.is_none_or(|t| now >= t) {
            self.entries.retain(|_, (_, deadline)| now < *deadline);
            self.next_sweep = Some(now + self.lifetime);
        }
        self.entries
            .insert(call_id.to_vec(), (to, now + self.lifetime));
    }

    /// Entries held (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    // `Instant::now()` only as an arbitrary origin: every time the tests
    // feed is an explicit offset from it.
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]
    use super::*;

    fn peer(name: &str, load: u32, last: Instant) -> PeerView {
        PeerView {
            name: name.into(),
            load_percent: load,
            last_report: last,
            linked: true,
        }
    }

    const INVITE: RequestFacts<'static> = RequestFacts {
        method: b"INVITE",
        ruri_user: Some(b"ivr"),
        ruri_host: b"example.com",
    };

    #[test]
    fn under_the_first_threshold_the_call_stays_local() {
        let now = Instant::now();
        let peers = [peer("b", 0, now)];
        let d = decide(now, 49, &peers, &PeerPolicy::default(), &INVITE);
        assert_eq!(d, Decision::Local(KeepReason::UnderThreshold));
    }

    #[test]
    fn above_it_the_least_loaded_peer_lighter_by_the_margin_takes_it() {
        let now = Instant::now();
        let peers = [peer("b", 30, now), peer("c", 10, now), peer("d", 5, now)];
        let d = decide(now, 50, &peers, &PeerPolicy::default(), &INVITE);
        assert_eq!(
            d,
            Decision::HandOff {
                peer: "d".into(),
                reason: HandOffReason::Load
            }
        );
    }

    #[test]
    fn a_peer_less_than_the_margin_lighter_is_not_chosen() {
        let now = Instant::now();
        let peers = [peer("b", 61, now)];
        let d = decide(now, 80, &peers, &PeerPolicy::default(), &INVITE);
        assert_eq!(d, Decision::Local(KeepReason::NoLighterPeer));
        // Exactly the margin is enough.
        let peers = [peer("b", 60, now)];
        assert!(matches!(
            decide(now, 80, &peers, &PeerPolicy::default(), &INVITE),
            Decision::HandOff { .. }
        ));
    }

    #[test]
    fn a_peer_silent_for_three_periods_is_never_chosen() {
        let t0 = Instant::now();
        let peers = [peer("b", 0, t0)];
        let policy = PeerPolicy::default();
        // 1.499 s after its last report it is on-line...
        let just_before = t0 + Duration::from_millis(1499);
        assert!(peers[0].online(just_before));
        assert!(matches!(
            decide(just_before, 90, &peers, &policy, &INVITE),
            Decision::HandOff { .. }
        ));
        // ...3 periods (1.5 s) after it, and ever later, it is not.
        for ms in [1500, 1501, 3000, 60_000] {
            let now = t0 + Duration::from_millis(ms);
            assert!(!peers[0].online(now), "{ms} ms");
            assert_eq!(
                decide(now, 90, &peers, &policy, &INVITE),
                Decision::Local(KeepReason::NoLighterPeer),
                "{ms} ms"
            );
        }
    }

    #[test]
    fn a_peer_whose_link_closed_is_off_line_at_once() {
        let now = Instant::now();
        let mut p = peer("b", 0, now);
        p.linked = false;
        assert!(!p.online(now));
        assert_eq!(
            decide(now, 100, &[p], &PeerPolicy::default(), &INVITE),
            Decision::Local(KeepReason::NoLighterPeer)
        );
    }

    #[test]
    fn rules_pin_regardless_of_load() {
        let now = Instant::now();
        let peers = [peer("b", 90, now), peer("c", 0, now)];
        let policy = PeerPolicy {
            rules: vec![
                PinRule {
                    method: Some("subscribe".into()),
                    target: PinTarget::Local,
                    ..PinRule::default()
                },
                PinRule {
                    ruri_user: Some("conf".into()),
                    ruri_host: Some("EXAMPLE.com".into()),
                    target: PinTarget::Peer("b".into()),
                    ..PinRule::default()
                },
                PinRule {
                    ruri_user: Some("gone".into()),
                    target: PinTarget::Peer("z".into()),
                    ..PinRule::default()
                },
            ],
            ..PeerPolicy::default()
        };
        let subscribe = RequestFacts {
            method: b"SUBSCRIBE",
            ..INVITE
        };
        assert_eq!(
            decide(now, 100, &peers, &policy, &subscribe),
            Decision::Local(KeepReason::PinnedLocal)
        );
        let conf = RequestFacts {
            ruri_user: Some(b"conf"),
            ..INVITE
        };
        // Pinned to b although b is busier than us.
        assert_eq!(
            decide(now, 0, &peers, &policy, &conf),
            Decision::HandOff {
                peer: "b".into(),
                reason: HandOffReason::Pinned
            }
        );
        let gone = RequestFacts {
            ruri_user: Some(b"gone"),
            ..INVITE
        };
        assert_eq!(
            decide(now, 100, &peers, &policy, &gone),
            Decision::Local(KeepReason::PinnedPeerOffline)
        );
        // No rule matches: the load rule applies (c is lighter).
        assert_eq!(
            decide(now, 100, &peers, &policy, &INVITE),
            Decision::HandOff {
                peer: "c".into(),
                reason: HandOffReason::Load
            }
        );
    }

    #[test]
    fn load_percent_is_the_larger_of_calls_and_score() {
        let r = |active_calls, capacity, score| LoadReport {
            active_calls,
            capacity,
            score,
            ..LoadReport::default()
        };
        assert_eq!(load_percent(&r(5, 10, None)), 50);
        assert_eq!(load_percent(&r(5, 10, Some(7000))), 70);
        assert_eq!(load_percent(&r(30, 10, None)), 300);
        assert_eq!(load_percent(&r(0, 0, None)), 100);
    }

    #[test]
    fn call_memory_forgets_after_its_lifetime() {
        let t0 = Instant::now();
        let mut m = CallMemory::new(Duration::from_secs(32));
        m.insert(t0, b"c1", Destination::Forwarded("b".into()));
        assert_eq!(
            m.get(t0 + Duration::from_secs(31), b"c1"),
            Some(&Destination::Forwarded("b".into()))
        );
        assert_eq!(m.get(t0 + Duration::from_secs(32), b"c1"), None);
        // A later insert sweeps the expired entry away.
        m.insert(t0 + Duration::from_secs(40), b"c2", Destination::Local);
        assert_eq!(m.len(), 1);
    }
}
