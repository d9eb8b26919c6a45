//! Selection: which backend takes a new call (design.md §5).
//!
//! Pure and deterministic: the only randomness is a seeded [`SmallRng`]
//! the [`Selector`] owns (seeded by the caller), time comes in as `now`.
//!
//! # Pools and the path of a new call
//!
//! The content [rules](super::rules) name a pool (else the default pool).
//! Inside the pool, the candidates are its members that are up and serving
//! (not draining). Then, with `load` as defined below:
//!
//! 1. Along the pool's overflow chain (the pool, its `overflow_pool`, that
//!    pool's own overflow, … each pool once): the first pool that has a
//!    candidate with headroom (`load < high_water`) and is either the last
//!    of the chain or below its overflow threshold (capacity-weighted mean
//!    load of its candidates `< overflow`) chooses, by its policy, among
//!    its candidates with headroom.
//! 2. Else the first pool of the chain with any candidate with headroom
//!    chooses among those (above its overflow threshold, but the pools it
//!    overflows to are full).
//! 3. Else every candidate is at or above its high-water mark: by the first
//!    pool's `overload`, the least loaded candidate of the chain takes the
//!    call (`least-loaded`), or the call is refused, 503 with Retry-After
//!    (`reject`).
//!
//! # Load
//!
//! `load = max(active_calls / capacity, score / 10000) + assigned / capacity`
//!
//! * `active_calls`, `capacity` and `score` come from the agent's last
//!   accepted report; `score / 10000` only if the application set a score
//!   (it is the application's own fullness, 0 idle ..= 10000 full, so the
//!   fuller of the two views counts: adding them would count the calls
//!   twice when the score already reflects them);
//! * `capacity` 0 (the application set none, or no report yet) counts as
//!   the configured default capacity;
//! * `assigned` is the number of new calls this balancer placed on the
//!   backend since that report: a burst between two reports does not all
//!   go to the backend that looked idlest. Each accepted report resets it
//!   to 0, so it never drifts: a lost report only means the next one resets
//!   it, a duplicated or reordered one is ignored (its `seq` is not newer)
//!   and resets nothing.
//!
//! So `load` is a fraction of capacity: 0.9 is 90% full.
//!
//! # Policies
//!
//! * `least-loaded`: power of two choices. Two distinct candidates are
//!   drawn, each with probability proportional to its capacity weight
//!   (the second from the rest); the one with the lower `load` takes the
//!   call (a tie: the heavier, then the first drawn).
//! * `weighted-round-robin`: smooth weighted round robin (nginx): each
//!   pick adds every candidate's weight to its running score, takes the
//!   highest score (ties: the lowest id) and subtracts the total weight
//!   from it. Over any `Σ w` consecutive picks with the same candidates,
//!   each gets exactly `w` calls, interleaved.
//! * `least-traffic`: power of two choices (drawn as above) on
//!   `traffic / weight`, where `traffic` is the link's traffic over the
//!   sliding window in the pool's metric (see [`Traffic`]). Two choices
//!   rather than the argmin so that several replicas, which see each
//!   other's traffic only at the agents' reports, do not all pile on the
//!   same backend in between.
//! * `hash`: weighted rendezvous hash ([`rendezvous_weighted`]) of the
//!   pool's hash key over the candidates with headroom, weights the
//!   capacities. A request without the key (no From user) hashes its
//!   Call-ID.
//!
//! The weight of a backend is its reported capacity (the default capacity
//! if it reported none).

use std::time::{Duration, Instant};

use encap_proto::frame::LoadReport;
use encap_proto::sip::SipMessage;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::hash::rendezvous_weighted;
use super::router::BackendId;
use super::rules::{RuleSpec, Rules};

/// A pool's index in [`Selection::pools`].
pub type PoolId = usize;

/// The default high-water mark, percent of capacity.
pub const DEFAULT_HIGH_WATER_PERCENT: u32 = 90;
/// The default overflow threshold, percent of the pool's capacity.
pub const DEFAULT_OVERFLOW_PERCENT: u32 = 90;
/// The default capacity of a backend that reports none.
pub const DEFAULT_CAPACITY: u32 = 1000;
/// The default traffic window.
pub const DEFAULT_TRAFFIC_WINDOW: Duration = Duration::from_secs(10);
/// The name of the default pool unless configured.
pub const DEFAULT_POOL: &str = "default";
/// Buckets of the sliding traffic window.
const BUCKETS: usize = 10;

/// How a pool chooses among its candidates (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Power of two choices on load, weighted by capacity.
    #[default]
    LeastLoaded,
    /// Smooth weighted round robin, weights the capacities.
    WeightedRoundRobin,
    /// Power of two choices on the link's traffic per capacity weight.
    LeastTraffic,
    /// Weighted rendezvous hash of the pool's hash key.
    Hash,
}

/// What the `hash` policy hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashKey {
    /// The Call-ID.
    #[default]
    CallId,
    /// The user part of the From URI.
    FromUser,
    /// The user part of the To URI.
    ToUser,
    /// The user part of the Request-URI.
    RequestUriUser,
}

/// What `least-traffic` counts. "To backend" is balancer → backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficMetric {
    /// Messages, both directions.
    #[default]
    Messages,
    /// Bytes, both directions.
    Bytes,
    /// Messages to the backend.
    MessagesToBackend,
    /// Messages from the backend.
    MessagesFromBackend,
    /// Bytes to the backend.
    BytesToBackend,
    /// Bytes from the backend.
    BytesFromBackend,
}

/// What to do when every candidate is at or above its high-water mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overload {
    /// The least loaded still takes the call.
    #[default]
    LeastLoaded,
    /// Answer 503 with Retry-After.
    Reject,
}

/// One `[[pools]]` entry as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// The pool's name (rules and `overflow_pool` use it). Required.
    pub name: String,
    /// `"least-loaded"`, `"weighted-round-robin"`, `"least-traffic"` or
    /// `"hash"`. Default: `"least-loaded"`.
    #[serde(default)]
    pub policy: Policy,
    /// For `hash`: `"call-id"`, `"from-user"`, `"to-user"` or
    /// `"request-uri-user"`. Default: `"call-id"`.
    #[serde(default)]
    pub hash_key: HashKey,
    /// For `least-traffic`: `"messages"`, `"bytes"` (both directions) or
    /// `"messages-to-backend"`, `"messages-from-backend"`,
    /// `"bytes-to-backend"`, `"bytes-from-backend"`. Default: `"messages"`.
    #[serde(default)]
    pub traffic_metric: TrafficMetric,
    /// Member agents, by the name they register with. An agent listed in
    /// no pool joins the default pool. Default: empty.
    #[serde(default)]
    pub backends: Vec<String>,
    /// A backend at or above this load (percent of its capacity) takes no
    /// new call while another has headroom. Default: 90.
    #[serde(default = "default_high_water")]
    pub high_water_percent: u32,
    /// Where new calls go when this pool is at or above `overflow_percent`
    /// (or has no headroom left). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow_pool: Option<String>,
    /// The pool's load (capacity-weighted mean of its serving members)
    /// from which it overflows. Default: 90.
    #[serde(default = "default_overflow")]
    pub overflow_percent: u32,
    /// Every backend at or above high water: `"least-loaded"` (the least
    /// loaded takes the call) or `"reject"` (503 with Retry-After).
    /// Default: `"least-loaded"`.
    #[serde(default)]
    pub overload: Overload,
    /// `"agent"` (members are agents, listed in `backends`) or `"sip"`
    /// (members are plain SIP servers listed in `members`; the balancer is
    /// their stateless proxy, design.md §7). Default: `"agent"`.
    #[serde(default, skip_serializing_if = "PoolMode::is_agent")]
    pub mode: PoolMode,
    /// `mode = "sip"`: the plain SIP backends. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSpec>,
    /// `mode = "sip"`: SIP OPTIONS probing of the members (Kamailio
    /// dispatcher parity), every this many milliseconds; 0 disables it
    /// (members are then always up). A probe not answered when the next is
    /// due counts as failed. Default: 5000.
    #[serde(default = "default_probe_interval")]
    pub probe_interval_ms: u64,
    /// Consecutive failed probes after which a member is down. Default: 3.
    #[serde(default = "default_probe_failures_down")]
    pub probe_failures_down: u32,
    /// Consecutive answered probes after which a down member is up again.
    /// Default: 2.
    #[serde(default = "default_probe_successes_up")]
    pub probe_successes_up: u32,
    /// Final status codes of a probe answer that count as success (any
    /// other final answer is a failure). Default: `[200]`.
    #[serde(default = "default_probe_accept")]
    pub probe_accept: Vec<u16>,
}

/// What a pool's members are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Backends that embed the agent and dial in.
    #[default]
    Agent,
    /// Plain SIP servers at static addresses, behind a stateless proxy.
    Sip,
}

impl PoolMode {
    fn is_agent(&self) -> bool {
        *self == PoolMode::Agent
    }
}

/// The transport to reach a plain SIP member over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberTransport {
    /// SIP over UDP.
    #[default]
    Udp,
    /// SIP over TCP.
    Tcp,
}

impl MemberTransport {
    /// The wire transport.
    pub fn transport(self) -> encap_proto::frame::Transport {
        match self {
            MemberTransport::Udp => encap_proto::frame::Transport::Udp,
            MemberTransport::Tcp => encap_proto::frame::Transport::Tcp,
        }
    }
}

/// One plain SIP backend of a `mode = "sip"` pool, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// Its IP address and port, e.g. `"10.0.0.7:5060"`. Required.
    pub address: std::net::SocketAddr,
    /// `"udp"` or `"tcp"`. Default: `"udp"`.
    #[serde(default)]
    pub transport: MemberTransport,
    /// Its weight in selection and failover (1..=1000000). Default: 1.
    #[serde(default = "default_member_weight")]
    pub weight: u32,
    /// Its name (logs, admin API; its backend id is a stable hash of it).
    /// Default: `"<transport>:<address>"`, e.g. `"udp:10.0.0.7:5060"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl MemberSpec {
    /// Its name: as configured, else `"<transport>:<address>"`.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let t = match self.transport {
                MemberTransport::Udp => "udp",
                MemberTransport::Tcp => "tcp",
            };
            format!("{t}:{}", self.address)
        })
    }
}

/// The default probe interval of a `mode = "sip"` pool.
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 5000;

fn default_probe_interval() -> u64 {
    DEFAULT_PROBE_INTERVAL_MS
}

fn default_probe_failures_down() -> u32 {
    3
}

fn default_probe_successes_up() -> u32 {
    2
}

fn default_probe_accept() -> Vec<u16> {
    vec![200]
}

fn default_member_weight() -> u32 {
    1
}

/// A plain SIP backend, resolved (see [`MemberSpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainMember {
    /// Its backend id: a stable hash of its name.
    pub id: BackendId,
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub address: std::net::SocketAddr,
    /// Over what.
    pub transport: encap_proto::frame::Transport,
    /// Its weight.
    pub weight: u32,
}

/// OPTIONS probing settings of a `mode = "sip"` pool, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Probe period; zero: no probing.
    pub interval: Duration,
    /// Consecutive failures to go down.
    pub failures_down: u32,
    /// Consecutive successes to come up.
    pub successes_up: u32,
    /// Accepted final status codes.
    pub accept: Vec<u16>,
}

fn default_high_water() -> u32 {
    DEFAULT_HIGH_WATER_PERCENT
}

fn default_overflow() -> u32 {
    DEFAULT_OVERFLOW_PERCENT
}

impl PoolSpec {
    /// A pool with every setting at its default.
    pub fn named(name: &str) -> PoolSpec {
        PoolSpec {
            name: name.to_owned(),
            policy: Policy::default(),
            hash_key: HashKey::default(),
            traffic_metric: TrafficMetric::default(),
            backends: Vec::new(),
            high_water_percent: DEFAULT_HIGH_WATER_PERCENT,
            overflow_pool: None,
            overflow_percent: DEFAULT_OVERFLOW_PERCENT,
            overload: Overload::default(),
            mode: PoolMode::default(),
            members: Vec::new(),
            probe_interval_ms: DEFAULT_PROBE_INTERVAL_MS,
            probe_failures_down: default_probe_failures_down(),
            probe_successes_up: default_probe_successes_up(),
            probe_accept: default_probe_accept(),
        }
    }
}

/// A pool, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Its name.
    pub name: String,
    /// Its policy.
    pub policy: Policy,
    /// What `hash` hashes.
    pub hash_key: HashKey,
    /// What `least-traffic` counts.
    pub traffic_metric: TrafficMetric,
    /// Member agent names as listed.
    pub backends: Vec<String>,
    /// High-water load (fraction of capacity).
    pub high_water: f64,
    /// The pool it overflows to.
    pub overflow: Option<PoolId>,
    /// Its overflow threshold (fraction of capacity).
    pub overflow_at: f64,
    /// Its overload policy.
    pub overload: Overload,
    /// What its members are.
    pub mode: PoolMode,
    /// `mode = "sip"`: its plain SIP members (their names are also in
    /// `backends`).
    pub members: Vec<PlainMember>,
    /// `mode = "sip"`: how its members are probed.
    pub probe: ProbeSettings,
}

impl Pool {
    fn from_spec(spec: &PoolSpec, overflow: Option<PoolId>) -> Pool {
        let members: Vec<PlainMember> = spec
            .members
            .iter()
            .map(|m| {
                let name = m.name();
                PlainMember {
                    id: super::hash::backend_id_of(&name),
                    name,
                    address: m.address,
                    transport: m.transport.transport(),
                    weight: m.weight.max(1),
                }
            })
            .collect();
        let mut backends = spec.backends.clone();
        backends.extend(members.iter().map(|m| m.name.clone()));
        // Plain backends report no load: the reported-load policy falls
        // back to the traffic the balancer counts itself.
        let policy = match (spec.mode, spec.policy) {
            (PoolMode::Sip, Policy::LeastLoaded) => Policy::LeastTraffic,
            (_, p) => p,
        };
        Pool {
            name: spec.name.clone(),
            policy,
            hash_key: spec.hash_key,
            traffic_metric: spec.traffic_metric,
            backends,
            high_water: f64::from(spec.high_water_percent) / 100.0,
            overflow,
            overflow_at: f64::from(spec.overflow_percent) / 100.0,
            overload: spec.overload,
            mode: spec.mode,
            members,
            probe: ProbeSettings {
                interval: Duration::from_millis(spec.probe_interval_ms),
                failures_down: spec.probe_failures_down,
                successes_up: spec.probe_successes_up,
                accept: spec.probe_accept.clone(),
            },
        }
    }
}

/// The selection settings, compiled: pools, rules, defaults.
#[derive(Debug, Clone)]
pub struct Selection {
    pools: Vec<Pool>,
    /// Per pool: the pool, then the pools it overflows to, each once.
    chains: Vec<Vec<PoolId>>,
    default_pool: PoolId,
    rules: Rules,
    /// Capacity of a backend that reports none.
    pub default_capacity: u32,
    /// Length of the sliding traffic window.
    pub traffic_window: Duration,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            pools: vec![Pool::from_spec(&PoolSpec::named(DEFAULT_POOL), None)],
            chains: vec![vec![0]],
            default_pool: 0,
            rules: Rules::default(),
            default_capacity: DEFAULT_CAPACITY,
            traffic_window: DEFAULT_TRAFFIC_WINDOW,
        }
    }
}

impl Selection {
    /// Checks and compiles pools and rules. A `default_pool` no pool is
    /// named after is made, with every setting at its default. Every problem
    /// is reported at once, with its path (`pools[1].overflow_pool`,
    /// `rules[0].ruri_user.regex`).
    pub fn new(
        pools: &[PoolSpec],
        default_pool: &str,
        rules: &[RuleSpec],
        default_capacity: u32,
        traffic_window: Duration,
    ) -> Result<Selection, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut specs: Vec<PoolSpec> = pools.to_vec();
        if !specs.iter().any(|p| p.name == default_pool) {
            specs.push(PoolSpec::named(default_pool));
        }
        let id_of = |name: &str| specs.iter().position(|p| p.name == name);
        for (i, p) in pools.iter().enumerate() {
            let path = format!("pools[{i}]");
            if p.name.is_empty() {
                problems.push((format!("{path}.name"), "must not be empty".to_owned()));
            } else if id_of(&p.name) != Some(i) {
                problems.push((
                    format!("{path}.name"),
                    format!("another pool is named {:?}", p.name),
                ));
            }
            for (field, value) in [
                ("high_water_percent", p.high_water_percent),
                ("overflow_percent", p.overflow_percent),
            ] {
                if !(1..=1000).contains(&value) {
                    problems.push((
                        format!("{path}.{field}"),
                        format!("{value} is not in 1..=1000"),
                    ));
                }
            }
            match &p.overflow_pool {
                Some(o) if o == &p.name => {
                    problems.push((
                        format!("{path}.overflow_pool"),
                        "a pool cannot overflow to itself".to_owned(),
                    ));
                }
                Some(o) if id_of(o).is_none() => problems.push((
                    format!("{path}.overflow_pool"),
                    format!("no pool is named {o:?}"),
                )),
                _ => {}
            }
            for (j, b) in p.backends.iter().enumerate() {
                if p.backends[..j].contains(b) {
                    problems.push((
                        format!("{path}.backends[{j}]"),
                        format!("{b:?} is listed twice"),
                    ));
                }
            }
            check_members(pools, i, &mut problems);
        }
        let rules = match Rules::compile(rules, id_of) {
            Ok(r) => r,
            Err(mut p) => {
                problems.append(&mut p);
                Rules::default()
            }
        };
        if default_capacity == 0 {
            problems.push(("default_capacity".to_owned(), "must be above 0".to_owned()));
        }
        if traffic_window < Duration::from_millis(BUCKETS as u64) {
            problems.push((
                "traffic_window_ms".to_owned(),
                format!("must be at least {BUCKETS}"),
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let compiled: Vec<Pool> = specs
            .iter()
            .map(|s| Pool::from_spec(s, s.overflow_pool.as_deref().and_then(id_of)))
            .collect();
        let chains = (0..compiled.len())
            .map(|start| {
                let mut chain = vec![start];
                let mut at = start;
                while let Some(next) = compiled[at].overflow {
                    if chain.contains(&next) {
                        break;
                    }
                    chain.push(next);
                    at = next;
                }
                chain
            })
            .collect();
        let default_pool = id_of(default_pool).unwrap_or(0);
        Ok(Selection {
            pools: compiled,
            chains,
            default_pool,
            rules,
            default_capacity,
            traffic_window,
        })
    }

    /// The pools; a [`PoolId`] indexes them.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The default pool.
    pub fn default_pool(&self) -> PoolId {
        self.default_pool
    }

    /// The pools an agent named `name` belongs to: those listing it, else
    /// the default pool.
    pub fn pools_of(&self, name: &str) -> Vec<PoolId> {
        let listed: Vec<PoolId> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| p.backends.iter().any(|b| b == name))
            .map(|(i, _)| i)
            .collect();
        if listed.is_empty() {
            vec![self.default_pool]
        } else {
            listed
        }
    }

    /// The pool a new call's initial request goes to: the first matching
    /// rule's, else the default pool.
    pub fn pool_for(&self, msg: &SipMessage) -> PoolId {
        self.rules.pool_for(msg).unwrap_or(self.default_pool)
    }

    /// `pool`, then the pools it overflows to.
    pub fn chain(&self, pool: PoolId) -> &[PoolId] {
        self.chains.get(pool).map_or(&[], Vec::as_slice)
    }
}

/// The checks of a pool's `mode`, `members` and `probe_*` settings.
fn check_members(pools: &[PoolSpec], i: usize, problems: &mut Vec<(String, String)>) {
    let p = &pools[i];
    let path = format!("pools[{i}]");
    match p.mode {
        PoolMode::Agent => {
            if !p.members.is_empty() {
                problems.push((
                    format!("{path}.members"),
                    "static members need mode = \"sip\" (agents join by name, in `backends`)"
                        .to_owned(),
                ));
            }
            return;
        }
        PoolMode::Sip => {
            if !p.backends.is_empty() {
                problems.push((
                    format!("{path}.backends"),
                    "a mode = \"sip\" pool lists plain SIP servers in `members`, not agents"
                        .to_owned(),
                ));
            }
        }
    }
    for (j, m) in p.members.iter().enumerate() {
        let mpath = format!("{path}.members[{j}]");
        let name = m.name();
        if name.is_empty() {
            problems.push((format!("{mpath}.name"), "must not be empty".to_owned()));
        }
        if m.address.ip().is_unspecified() || m.address.port() == 0 {
            problems.push((
                format!("{mpath}.address"),
                format!("{} is not an address to send to", m.address),
            ));
        }
        if !(1..=1_000_000).contains(&m.weight) {
            problems.push((
                format!("{mpath}.weight"),
                format!("{} is not in 1..=1000000", m.weight),
            ));
        }
        let id = super::hash::backend_id_of(&name);
        let earlier = pools[..=i]
            .iter()
            .enumerate()
            .flat_map(|(k, q)| {
                let upto = if k == i { j } else { q.members.len() };
                q.members[..upto].iter()
            })
            .find(|o| {
                o.name() == name
                    || super::hash::backend_id_of(&o.name()) == id
                    || (o.address == m.address && o.transport == m.transport)
            });
        if let Some(o) = earlier {
            problems.push((
                mpath.clone(),
                format!("same name, backend id or address as member {:?}", o.name()),
            ));
        }
    }
    if p.probe_interval_ms > 0 {
        for (field, value) in [
            ("probe_failures_down", p.probe_failures_down),
            ("probe_successes_up", p.probe_successes_up),
        ] {
            if value == 0 {
                problems.push((format!("{path}.{field}"), "must be above 0".to_owned()));
            }
        }
    }
    if p.probe_accept.is_empty() {
        problems.push((
            format!("{path}.probe_accept"),
            "at least one status code is needed".to_owned(),
        ));
    }
    for (j, code) in p.probe_accept.iter().enumerate() {
        if !(200..=699).contains(code) {
            problems.push((
                format!("{path}.probe_accept[{j}]"),
                format!("{code} is not a final status code"),
            ));
        }
    }
}

/// A backend a pool may choose, as the router sees it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Its id.
    pub id: BackendId,
    /// Its capacity weight (at least 1).
    pub weight: u32,
    /// Its load (see the module doc).
    pub load: f64,
    /// Its traffic in the pool's metric over the window (`least-traffic`
    /// only; else 0).
    pub traffic: f64,
}

/// What the `hash` policy may hash.
#[derive(Debug, Clone, Copy)]
pub struct HashInput<'a> {
    call_id: &'a [u8],
    msg: Option<&'a SipMessage>,
}

impl<'a> HashInput<'a> {
    /// A bare Call-ID (every key falls back to it).
    pub fn call_id(call_id: &'a [u8]) -> HashInput<'a> {
        HashInput { call_id, msg: None }
    }

    /// A request and its Call-ID.
    pub fn request(call_id: &'a [u8], msg: &'a SipMessage) -> HashInput<'a> {
        HashInput {
            call_id,
            msg: Some(msg),
        }
    }

    /// The bytes `key` names, or the Call-ID when the request has none.
    pub fn key(&self, key: HashKey) -> &'a [u8] {
        let user = match (key, self.msg) {
            (HashKey::CallId, _) | (_, None) => None,
            (HashKey::FromUser, Some(m)) => m.from().and_then(|n| n.uri.user),
            (HashKey::ToUser, Some(m)) => m.to().and_then(|n| n.uri.user),
            (HashKey::RequestUriUser, Some(m)) => m.request_uri().and_then(|u| u.user),
        };
        user.filter(|u| !u.is_empty()).unwrap_or(self.call_id)
    }
}

/// The outcome of [`Selector::choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// This backend, from this pool (the first pool, or one it overflowed to).
    Backend {
        /// The backend.
        backend: BackendId,
        /// The pool that chose it.
        pool: PoolId,
    },
    /// Every candidate is at or above high water and the pool's overload
    /// policy is `reject`.
    Overloaded,
    /// No member of the pool (or its overflow pools) is up and serving.
    NoBackend,
}

/// The selection state: settings, round-robin scores, the RNG.
#[derive(Debug)]
pub struct Selector {
    selection: Selection,
    wrr: Vec<SmoothWrr>,
    rng: SmallRng,
    /// Per pool, candidates of the current choice (reused allocations).
    cands: Vec<Vec<Candidate>>,
    headroom: Vec<Candidate>,
}

impl Selector {
    /// A selector; `seed` seeds the power-of-two draws.
    pub fn new(selection: Selection, seed: u64) -> Selector {
        let n = selection.pools.len();
        Selector {
            selection,
            wrr: vec![SmoothWrr::default(); n],
            rng: SmallRng::seed_from_u64(seed),
            cands: vec![Vec::new(); n],
            headroom: Vec::new(),
        }
    }

    /// The settings.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Chooses a backend for a new call that the rules sent to `pool`
    /// (see the module doc). `fill(pool, out)` pushes the pool's candidates
    /// (its members that are up and serving) in ascending id order.
    pub fn choose(
        &mut self,
        pool: PoolId,
        input: &HashInput<'_>,
        mut fill: impl FnMut(PoolId, &Pool, &mut Vec<Candidate>),
    ) -> Choice {
        let Selector {
            selection,
            wrr,
            rng,
            cands,
            headroom,
        } = self;
        let chain = selection.chain(pool);
        if chain.is_empty() {
            return Choice::NoBackend;
        }
        for &p in chain {
            cands[p].clear();
            fill(p, &selection.pools[p], &mut cands[p]);
        }
        // 1. The first pool with headroom that is not overflowing.
        for (pos, &p) in chain.iter().enumerate() {
            let pool_cfg = &selection.pools[p];
            headroom.clear();
            headroom.extend(cands[p].iter().filter(|c| c.load < pool_cfg.high_water));
            if headroom.is_empty() {
                continue;
            }
            if pos + 1 == chain.len() || pool_load(&cands[p]) < pool_cfg.overflow_at {
                let chosen = pick(pool_cfg, &mut wrr[p], rng, headroom, input);
                return chosen.map_or(Choice::NoBackend, |backend| Choice::Backend {
                    backend,
                    pool: p,
                });
            }
        }
        // 2. Overflowing, but where it would overflow to is full.
        for &p in chain {
            let pool_cfg = &selection.pools[p];
            headroom.clear();
            headroom.extend(cands[p].iter().filter(|c| c.load < pool_cfg.high_water));
            if !headroom.is_empty() {
                let chosen = pick(pool_cfg, &mut wrr[p], rng, headroom, input);
                return chosen.map_or(Choice::NoBackend, |backend| Choice::Backend {
                    backend,
                    pool: p,
                });
            }
        }
        // 3. Everything at or above high water.
        let least = chain
            .iter()
            .flat_map(|&p| cands[p].iter().map(move |c| (c, p)))
            .fold(None::<(&Candidate, PoolId)>, |best, (c, p)| match best {
                Some((b, _)) if b.load <= c.load => best,
                _ => Some((c, p)),
            });
        match (least, selection.pools[pool].overload) {
            (None, _) => Choice::NoBackend,
            (Some(_), Overload::Reject) => Choice::Overloaded,
            (Some((c, p)), Overload::LeastLoaded) => Choice::Backend {
                backend: c.id,
                pool: p,
            },
        }
    }
}

/// Capacity-weighted mean load.
fn pool_load(cands: &[Candidate]) -> f64 {
    let (sum, weights) = cands.iter().fold((0.0, 0.0), |(s, w), c| {
        let cw = f64::from(c.weight.max(1));
        (s + cw * c.load, w + cw)
    });
    if weights > 0.0 {
        sum / weights
    } else {
        0.0
    }
}

fn pick(
    pool: &Pool,
    wrr: &mut SmoothWrr,
    rng: &mut SmallRng,
    cands: &[Candidate],
    input: &HashInput<'_>,
) -> Option<BackendId> {
    let i = match pool.policy {
        Policy::LeastLoaded => power_of_two(cands, |c| c.load, rng),
        Policy::LeastTraffic => {
            power_of_two(cands, |c| c.traffic / f64::from(c.weight.max(1)), rng)
        }
        Policy::WeightedRoundRobin => wrr.pick(cands),
        Policy::Hash => {
            let key = input.key(pool.hash_key);
            let b = rendezvous_weighted(key, cands.iter().map(|c| (c.id, c.weight)))?;
            return Some(b);
        }
    }?;
    cands.get(i).map(|c| c.id)
}

/// Power of two choices: two distinct candidates drawn with probability
/// proportional to their weights; the lower `metric` wins (a tie: the
/// heavier, then the first drawn). Returns an index into `cands`.
pub fn power_of_two<R: Rng + ?Sized>(
    cands: &[Candidate],
    metric: impl Fn(&Candidate) -> f64,
    rng: &mut R,
) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => Some(0),
        _ => {
            let weight = |c: &Candidate| u64::from(c.weight.max(1));
            let total: u64 = cands.iter().map(weight).sum();
            let a = weighted_index(cands, total, rng.next_u64(), None);
            let b = weighted_index(cands, total - weight(&cands[a]), rng.next_u64(), Some(a));
            let (ma, mb) = (metric(&cands[a]), metric(&cands[b]));
            let b_wins = mb < ma || (mb == ma && cands[b].weight > cands[a].weight);
            Some(if b_wins { b } else { a })
        }
    }
}

/// The candidate at `r` scaled into `[0, total)` over the cumulative
/// weights, skipping `skip` (whose weight `total` excludes).
fn weighted_index(cands: &[Candidate], total: u64, r: u64, skip: Option<usize>) -> usize {
    // Lemire's multiply-shift: the high word of r * total is in [0, total).
    let mut x = ((u128::from(r) * u128::from(total)) >> 64) as u64;
    let mut last = 0;
    for (i, c) in cands.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let w = u64::from(c.weight.max(1));
        if x < w {
            return i;
        }
        x -= w;
        last = i;
    }
    last
}

/// Smooth weighted round robin state of one pool: each backend's running
/// score, by id.
#[derive(Debug, Clone, Default)]
pub struct SmoothWrr {
    current: Vec<(BackendId, i64)>,
}

impl SmoothWrr {
    /// The index in `cands` of the next pick (see the module doc).
    pub fn pick(&mut self, cands: &[Candidate]) -> Option<usize> {
        let total: i64 = cands.iter().map(|c| i64::from(c.weight.max(1))).sum();
        let mut best: Option<(usize, i64)> = None;
        for (i, c) in cands.iter().enumerate() {
            let at = match self.current.binary_search_by_key(&c.id, |e| e.0) {
                Ok(at) => at,
                Err(at) => {
                    self.current.insert(at, (c.id, 0));
                    at
                }
            };
            let score = &mut self.current[at].1;
            *score += i64::from(c.weight.max(1));
            if best.is_none_or(|(_, s)| *score > s) {
                best = Some((i, *score));
            }
        }
        let (i, _) = best?;
        if let Ok(at) = self.current.binary_search_by_key(&cands[i].id, |e| e.0) {
            self.current[at].1 -= total;
        }
        Some(i)
    }
}

/// A backend's load as this balancer knows it: the last accepted report
/// and the calls placed since (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadState {
    report: LoadReport,
    assigned: u32,
}

impl LoadState {
    /// Takes a report. A report whose `seq` is not newer than the last
    /// accepted one (duplicated, reordered) is ignored: returns false.
    /// `seq` 0 is always taken (an agent that does not number reports).
    pub fn accept(&mut self, report: &LoadReport) -> bool {
        if report.seq != 0 && report.seq <= self.report.seq {
            return false;
        }
        self.report = *report;
        self.assigned = 0;
        true
    }

    /// A new call was placed on the backend.
    pub fn assign(&mut self) {
        self.assigned = self.assigned.saturating_add(1);
    }

    /// The last accepted report.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// Calls placed since the last accepted report.
    pub fn assigned_since_report(&self) -> u32 {
        self.assigned
    }

    /// The capacity weight: as reported, else `default`.
    pub fn capacity(&self, default: u32) -> u32 {
        match self.report.capacity {
            0 => default.max(1),
            c => c,
        }
    }

    /// The load as a fraction of capacity (see the module doc).
    pub fn load(&self, default_capacity: u32) -> f64 {
        let cap = f64::from(self.capacity(default_capacity));
        let calls = f64::from(self.report.active_calls) / cap;
        let base = match self.report.score {
            Some(s) => calls.max(f64::from(s) / 10_000.0),
            None => calls,
        };
        base + f64::from(self.assigned) / cap
    }
}

/// Messages and bytes, each direction ("to backend": balancer → backend).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// SIP messages to the backend.
    pub msgs_to_backend: u64,
    /// SIP messages from the backend.
    pub msgs_from_backend: u64,
    /// SIP bytes to the backend.
    pub bytes_to_backend: u64,
    /// SIP bytes from the backend.
    pub bytes_from_backend: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.msgs_to_backend = self.msgs_to_backend.saturating_add(o.msgs_to_backend);
        self.msgs_from_backend = self.msgs_from_backend.saturating_add(o.msgs_from_backend);
        self.bytes_to_backend = self.bytes_to_backend.saturating_add(o.bytes_to_backend);
        self.bytes_from_backend = self.bytes_from_backend.saturating_add(o.bytes_from_backend);
    }

    fn is_zero(&self) -> bool {
        *self == Counts::default()
    }

    /// `self - earlier`, or `None` if any counter went backwards.
    fn since(&self, earlier: &Counts) -> Option<Counts> {
        Some(Counts {
            msgs_to_backend: self.msgs_to_backend.checked_sub(earlier.msgs_to_backend)?,
            msgs_from_backend: self
                .msgs_from_backend
                .checked_sub(earlier.msgs_from_backend)?,
            bytes_to_backend: self
                .bytes_to_backend
                .checked_sub(earlier.bytes_to_backend)?,
            bytes_from_backend: self
                .bytes_from_backend
                .checked_sub(earlier.bytes_from_backend)?,
        })
    }

    /// The value of `metric`.
    pub fn metric(&self, metric: TrafficMetric) -> u64 {
        match metric {
            TrafficMetric::Messages => self.msgs_to_backend.saturating_add(self.msgs_from_backend),
            TrafficMetric::Bytes => self
                .bytes_to_backend
                .saturating_add(self.bytes_from_backend),
            TrafficMetric::MessagesToBackend => self.msgs_to_backend,
            TrafficMetric::MessagesFromBackend => self.msgs_from_backend,
            TrafficMetric::BytesToBackend => self.bytes_to_backend,
            TrafficMetric::BytesFromBackend => self.bytes_from_backend,
        }
    }
}

/// A sliding window of [`Counts`] in `BUCKETS` buckets.
#[derive(Debug, Clone, Default)]
struct Window {
    slots: [(u64, Counts); BUCKETS],
}

impl Window {
    fn add(&mut self, bucket: u64, c: &Counts) {
        let slot = &mut self.slots[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, Counts::default());
        }
        slot.1.add(c);
    }

    fn sum(&self, bucket: u64) -> Counts {
        let mut sum = Counts::default();
        for (b, c) in &self.slots {
            if *b <= bucket && b + BUCKETS as u64 > bucket {
                sum.add(c);
            }
        }
        sum
    }
}

/// One backend link's traffic.
///
/// The balancer counts what it sends to and receives from the backend
/// (`own`), over a sliding window of ten buckets. Agents report cumulative
/// counters of what they exchanged with *all* balancers; each accepted
/// report's increase over the previous one is added to a second window
/// (`reported`) at the report's arrival, and the balancer's own counts since
/// that report (`since_report`, not yet in the agent's counters) are kept
/// apart. The link's traffic is then `reported + since_report` once the
/// agent reports any traffic, else `own`: with several balancer replicas
/// every one sees the whole link's traffic, without counting its own
/// twice. A counter that goes backwards (the agent restarted) starts a new
/// baseline; the first report only sets the baseline. Stale reports never
/// reach here.
#[derive(Debug, Clone)]
pub struct Traffic {
    epoch: Option<Instant>,
    bucket: Duration,
    own: Window,
    reported: Window,
    since_report: Counts,
    last_cumulative: Option<Counts>,
    agent_counts: bool,
    total: Counts,
}

impl Traffic {
    /// Empty counters over a window of `window`.
    pub fn new(window: Duration) -> Traffic {
        Traffic {
            epoch: None,
            bucket: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            own: Window::default(),
            reported: Window::default(),
            since_report: Counts::default(),
            last_cumulative: None,
            agent_counts: false,
            total: Counts::default(),
        }
    }

    fn bucket_at(&self, now: Instant) -> u64 {
        // In u64 nanoseconds (584 years): a u128 division per message was a
        // visible share of the per-message cost.
        let nanos = |d: Duration| {
            d.as_secs()
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::from(d.subsec_nanos()))
        };
        self.epoch.map_or(0, |e| {
            nanos(now.saturating_duration_since(e)) / nanos(self.bucket).max(1)
        })
    }

    fn count(&mut self, now: Instant, c: &Counts) {
        self.epoch.get_or_insert(now);
        let b = self.bucket_at(now);
        self.own.add(b, c);
        self.since_report.add(c);
        self.total.add(c);
    }

    /// A message of `bytes` was sent to the backend.
    pub fn to_backend(&mut self, now: Instant, bytes: usize) {
        let c = Counts {
            msgs_to_backend: 1,
            bytes_to_backend: bytes as u64,
            ..Counts::default()
        };
        self.count(now, &c);
    }

    /// A message of `bytes` came from the backend.
    pub fn from_backend(&mut self, now: Instant, bytes: usize) {
        let c = Counts {
            msgs_from_backend: 1,
            bytes_from_backend: bytes as u64,
            ..Counts::default()
        };
        self.count(now, &c);
    }

    /// An accepted report's cumulative counters.
    pub fn on_report(&mut self, now: Instant, report: &LoadReport) {
        self.epoch.get_or_insert(now);
        let cumulative = Counts {
            msgs_to_backend: report.msgs_in,
            msgs_from_backend: report.msgs_out,
            bytes_to_backend: report.bytes_in,
            bytes_from_backend: report.bytes_out,
        };
        if !cumulative.is_zero() {
            self.agent_counts = true;
        }
        if let Some(delta) = self
            .last_cumulative
            .as_ref()
            .and_then(|prev| cumulative.since(prev))
        {
            let b = self.bucket_at(now);
            self.reported.add(b, &delta);
        }
        self.last_cumulative = Some(cumulative);
        self.since_report = Counts::default();
    }

    /// A new agent link (reconnect): the next report sets a new baseline.
    pub fn relink(&mut self) {
        self.last_cumulative = None;
    }

    /// The whole link's traffic over the window ending at `now` (see the
    /// type's doc).
    pub fn link(&self, now: Instant) -> Counts {
        let b = self.bucket_at(now);
        if self.agent_counts {
            let mut c = self.reported.sum(b);
            c.add(&self.since_report);
            c
        } else {
            self.own.sum(b)
        }
    }

    /// This balancer's own traffic over the window ending at `now`.
    pub fn own(&self, now: Instant) -> Counts {
        self.own.sum(self.bucket_at(now))
    }

    /// This balancer's own traffic since the backend was first seen.
    pub fn total(&self) -> Counts {
        self.total
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick the origin of time
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate {
                id: i as BackendId + 1,
                weight: w,
                load: 0.0,
                traffic: 0.0,
            })
            .collect()
    }

    #[test]
    fn smooth_wrr_is_exact_and_interleaved() {
        let c = cands(&[5, 1, 1]);
        let mut wrr = SmoothWrr::default();
        let picks: Vec<BackendId> = (0..7).map(|_| c[wrr.pick(&c).unwrap()].id).collect();
        // nginx's own example: a a b a c a a.
        assert_eq!(picks, [1, 1, 2, 1, 3, 1, 1]);
    }

    #[test]
    fn smooth_wrr_is_exact_over_every_period_for_64_backends() {
        let weights: Vec<u32> = (0..64).map(|i| 1 + (i * 37 % 23)).collect();
        let total: u32 = weights.iter().sum();
        let c = cands(&weights);
        let mut wrr = SmoothWrr::default();
        for _period in 0..3 {
            let mut counts = vec![0u32; 64];
            for _ in 0..total {
                counts[wrr.pick(&c).unwrap()] += 1;
            }
            assert_eq!(counts, weights);
        }
    }

    #[test]
    fn power_of_two_never_takes_the_most_loaded_and_prefers_the_least() {
        let mut c = cands(&[1, 1, 1]);
        c[0].load = 0.1;
        c[1].load = 0.5;
        c[2].load = 0.8;
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[power_of_two(&c, |c| c.load, &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        // Pairs {0,1} and {0,2} go to 0, {1,2} to 1: 2/3 and 1/3.
        let share0 = f64::from(counts[0]) / 30_000.0;
        assert!((share0 - 2.0 / 3.0).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn power_of_two_draws_by_weight() {
        // Equal metric, so the first drawn wins unless the second is heavier:
        // the heaviest wins every pair it is in.
        let c = cands(&[1, 1, 2]);
        let mut rng = SmallRng::seed_from_u64(9);
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            counts[power_of_two(&c, |_| 0.0, &mut rng).unwrap()] += 1;
        }
        // P(2 drawn in either place) = 1/2 + 2 * (1/4 * 2/3) = 5/6.
        let share2 = f64::from(counts[2]) / 40_000.0;
        assert!((share2 - 5.0 / 6.0).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn load_is_the_fuller_view_plus_calls_since_the_report() {
        let mut l = LoadState::default();
        assert_eq!(l.load(100), 0.0);
        assert!(l.accept(&LoadReport {
            seq: 1,
            active_calls: 20,
            capacity: 200,
            ..LoadReport::default()
        }));
        assert_eq!(l.load(100), 0.1);
        l.assign();
        l.assign();
        assert_eq!(l.load(100), 0.11);
        assert!(l.accept(&LoadReport {
            seq: 2,
            active_calls: 20,
            capacity: 200,
            score: Some(5000),
            ..LoadReport::default()
        }));
        assert_eq!(
            l.load(100),
            0.5,
            "score 50% beats 10% of calls; assigned reset"
        );
        // A stale report changes nothing.
        l.assign();
        assert!(!l.accept(&LoadReport {
            seq: 2,
            active_calls: 190,
            capacity: 200,
            ..LoadReport::default()
        }));
        assert_eq!(l.load(100), 0.505);
    }

    #[test]
    fn traffic_window_slides_and_agent_deltas_replace_own_counts() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut t = Traffic::new(Duration::from_secs(10));
        for i in 0..10 {
            t.to_backend(ms(i * 1000), 100);
            t.from_backend(ms(i * 1000), 50);
        }
        let c = t.link(ms(9_500));
        assert_eq!(
            (c.msgs_to_backend, c.bytes_to_backend, c.bytes_from_backend),
            (10, 1000, 500)
        );
        // Two seconds later the first two buckets have slid out.
        assert_eq!(t.link(ms(11_500)).msgs_to_backend, 8);
        assert_eq!(t.total().msgs_to_backend, 10);
        // The agent reports: baseline first, then deltas count.
        let report = |msgs_in| LoadReport {
            msgs_in,
            ..LoadReport::default()
        };
        t.on_report(ms(12_000), &report(1_000_000));
        assert_eq!(
            t.link(ms(12_000)).msgs_to_backend,
            0,
            "the baseline is not traffic"
        );
        t.to_backend(ms(12_100), 10);
        assert_eq!(
            t.link(ms(12_100)).msgs_to_backend,
            1,
            "own since the report"
        );
        t.on_report(ms(12_500), &report(1_000_300));
        assert_eq!(
            t.link(ms(12_500)).msgs_to_backend,
            300,
            "whole link, ours inside"
        );
        // Restarted agent: new baseline, no negative delta.
        t.on_report(ms(13_000), &report(5));
        assert_eq!(t.link(ms(13_000)).msgs_to_backend, 300);
        t.on_report(ms(13_500), &report(25));
        assert_eq!(t.link(ms(13_500)).msgs_to_backend, 320);
        assert_eq!(t.link(ms(30_000)).msgs_to_backend, 0);
    }

    #[test]
    fn pool_problems_are_all_named() {
        let mut a = PoolSpec::named("a");
        a.overflow_pool = Some("nope".to_owned());
        a.high_water_percent = 0;
        a.backends = vec!["x".to_owned(), "x".to_owned()];
        let mut b = PoolSpec::named("a");
        b.overflow_pool = Some("a".to_owned());
        let err = Selection::new(&[a, b], "default", &[], 0, Duration::from_secs(1)).unwrap_err();
        let paths: Vec<&str> = err.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "pools[0].high_water_percent",
                "pools[0].overflow_pool",
                "pools[0].backends[1]",
                "pools[1].name",
                "pools[1].overflow_pool",
                "default_capacity"
            ]
        );
    }
}
