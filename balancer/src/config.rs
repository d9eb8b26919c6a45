//! The balancer's configuration: TOML, typed, with defaults that serve.
//!
//! Every field has a default, so an empty file (or no file) is a working
//! configuration on one machine. Unknown keys are rejected; semantic checks
//! report every problem at once, each with its path
//! (`sip.listen[1].address`) and, where it can be found, its line.
//!
//! The whole schema with its defaults (`viaduct check-config FILE` prints
//! the effective configuration in this form):
//!
//! ```toml
//! [sip]
//! retry_after_secs = 5             # Retry-After of the balancer's own 503
//! max_connections = 10000          # open SIP stream connections, in all
//! max_connections_per_ip = 256     # accepted SIP connections from one peer IP
//! idle_timeout_secs = 600          # a connection silent both ways this long is closed
//! header_read_timeout_secs = 10    # a header section started must end within this
//! connect_timeout_ms = 5000        # opening a connection to a peer (response path)
//! write_queue_messages = 1024      # per connection; a full queue drops (counted)
//! shutdown_grace_ms = 2000         # SIGINT/SIGTERM: time to flush queues
//!
//! [[sip.listen]]
//! transport = "udp"                # "udp" or "tcp"
//! address = "127.0.0.1:5060"
//! # public_address = "192.0.2.1:5060"   # what agents write in Contact/Via
//!
//! [[sip.listen]]
//! transport = "tcp"
//! address = "127.0.0.1:5060"
//!
//! [agents]
//! listen = "127.0.0.1:5070"
//! name = "viaduct"                 # the balancer's name in CHALLENGE
//! # secret_file = "/etc/viaduct/secret"            # else $VIADUCT_SECRET, else a
//! # previous_secret_file = "/etc/viaduct/secret.old" # development secret (LOUD warning)
//! max_frame_body = 1048576
//! handshake_timeout_ms = 5000
//! write_queue_frames = 4096
//!
//! [agents.ids]                     # agent name -> backend id (else a hash of the name)
//! # "ivr-1" = 1
//!
//! [routing]
//! bad_tag_policy = "treat-as-untagged"   # or "reject" (403/404)
//! accept_call_independent_tags = true
//! new_call_lifetime_ms = 32000
//! new_call_capacity = 500000
//! report_interval_ms = 500
//! missed_reports_down = 3
//! failover = "backup"              # tagged request, backend down: "backup" or "reject" (503)
//! default_pool = "default"         # calls no rule matches; agents no pool lists
//! default_capacity = 1000          # capacity of a backend whose agent reports none
//! traffic_window_ms = 10000        # sliding window of the least-traffic counters
//!
//! # Pools (none needed: a default pool holds every agent, least-loaded).
//! # [[pools]]
//! # name = "conference"
//! # policy = "least-loaded"        # "weighted-round-robin", "least-traffic", "hash"
//! # hash_key = "call-id"           # hash: "from-user", "to-user", "request-uri-user"
//! # traffic_metric = "messages"    # least-traffic: "bytes", "messages-to-backend",
//! #                                #   "messages-from-backend", "bytes-to-backend", "bytes-from-backend"
//! # backends = ["conf-1", "conf-2"]  # agent names
//! # high_water_percent = 90        # at or above: no new calls while another has headroom
//! # overflow_pool = "default"      # where calls go when this pool is full
//! # overflow_percent = 90          # pool load (capacity-weighted) that overflows
//! # overload = "least-loaded"      # all above high water: least loaded takes it, or "reject" (503)
//!
//! # Plain SIP backends (design.md §7): the balancer is their stateless proxy.
//! # [[pools]]
//! # name = "pbx"
//! # mode = "sip"                   # default "agent"
//! # members = [{ address = "10.0.0.7:5060", transport = "udp", weight = 1, name = "pbx-1" }]
//! #                                # transport "udp" (default) or "tcp"; weight 1;
//! #                                # name "<transport>:<address>"; id = hash of the name
//! # probe_interval_ms = 5000       # SIP OPTIONS probes; 0: none (always up)
//! # probe_failures_down = 3        # consecutive failed probes: down
//! # probe_successes_up = 2         # consecutive answered probes: up again
//! # probe_accept = [200]           # final codes that count as an answer
//! # (policy "least-loaded" counts traffic instead: plain backends report no load)
//!
//! # Content rules, first match wins (all conditions of a rule must hold).
//! # [[rules]]
//! # pool = "conference"
//! # method = "INVITE"
//! # ruri_user = { prefix = "conf-" }        # or { exact = ".." }, { regex = ".." }
//! # ruri_host = { exact = "conf.example.com" }
//! # header = { name = "X-Tenant", regex = "^acme" }
//!
//! [limits]
//! max_header_bytes = 32768
//! max_body_bytes = 65536
//! max_headers = 256
//!
//! [log]
//! filter = "info"                  # tracing filter; $VIADUCT_LOG wins; SIGHUP reloads
//!
//! [admin]                          # GET /metrics (Prometheus) and the JSON API under /api
//! enabled = true
//! listen = "127.0.0.1:5080"
//! # token_file = "/etc/viaduct/admin-token"  # else $VIADUCT_ADMIN_TOKEN; required off loopback
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use encap_proto::frame::{Transport, DEFAULT_MAX_BODY, HARD_MAX_BODY};
use serde::{Deserialize, Serialize};

use crate::core::router::{BadTagPolicy, FailoverPolicy, RouterConfig};
use crate::core::rules::RuleSpec;
use crate::core::select::{
    PoolSpec, Selection, DEFAULT_CAPACITY, DEFAULT_POOL, DEFAULT_TRAFFIC_WINDOW,
};

/// The environment variable holding the cluster secret when no
/// `agents.secret_file` is set.
pub const SECRET_ENV: &str = "VIADUCT_SECRET";
/// The environment variable holding the previous cluster secret (rotation)
/// when no `agents.previous_secret_file` is set.
pub const PREVIOUS_SECRET_ENV: &str = "VIADUCT_PREVIOUS_SECRET";
/// The secret used when none is configured: for development on one machine
/// only. The balancer warns loudly at start when it is in use.
pub use encap_proto::frame::auth::DEVELOPMENT_SECRET;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SIP listeners and connection limits.
    pub sip: SipConfig,
    /// The agent listener and the cluster secret.
    pub agents: AgentsConfig,
    /// Routing policy (design.md §2-§5).
    pub routing: RoutingConfig,
    /// Message size and count limits.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Backend pools (`[[pools]]`); agents no pool lists, and calls no rule
    /// matches, go to `routing.default_pool`. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSpec>,
    /// Content rules (`[[rules]]`), checked in order, first match wins.
    /// Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// The metrics endpoint and the admin API.
    pub admin: AdminConfig,
}

/// The environment variable holding the admin API's bearer token when no
/// `admin.token_file` is set.
pub const ADMIN_TOKEN_ENV: &str = "VIADUCT_ADMIN_TOKEN";

/// The HTTP listener serving `GET /metrics` (Prometheus) and the JSON admin
/// API under `/api` (see [`driver::admin`](crate::driver::admin)).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve it at all. Default: true.
    pub enabled: bool,
    /// The address to listen on. Anything but a loopback address needs a
    /// token. Default: `127.0.0.1:5080` (if that default address is taken,
    /// the balancer warns and serves without it; an address set here must
    /// bind).
    pub listen: SocketAddr,
    /// A file holding the bearer token every `/api` request must carry
    /// (`Authorization: Bearer TOKEN`; trailing whitespace ignored).
    /// Default: none, then `$VIADUCT_ADMIN_TOKEN`, then no token (allowed
    /// only on loopback). A relative path is relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// The default `admin.listen`.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5080);

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: DEFAULT_ADMIN_LISTEN,
            token_file: None,
        }
    }
}

/// SIP side: where the balancer listens, and the limits on connections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// `Retry-After` seconds in a 503 answered when no backend can take a
    /// request. Default: 5.
    pub retry_after_secs: u32,
    /// Most SIP stream connections open at once (accepted and opened).
    /// Default: 10000.
    pub max_connections: usize,
    /// Most accepted SIP connections from one peer IP address. Default: 256.
    pub max_connections_per_ip: usize,
    /// A connection with no traffic either way for this long is closed.
    /// Default: 600.
    pub idle_timeout_secs: u64,
    /// Once the first byte of a message arrived, its header section must be
    /// complete within this long, or the connection is closed (slow-read
    /// attacks). Default: 10.
    pub header_read_timeout_secs: u64,
    /// Opening a connection to a peer (response path, design.md §4) gives up
    /// after this long; the messages waiting for it are dropped (counted).
    /// Default: 5000.
    pub connect_timeout_ms: u64,
    /// Messages queued for one connection; when full, new messages for it
    /// are dropped and counted (a slow peer never stalls others).
    /// Default: 1024.
    pub write_queue_messages: usize,
    /// On SIGINT/SIGTERM, how long queued messages may take to flush before
    /// the process exits. Default: 2000.
    pub shutdown_grace_ms: u64,
    /// Receive buffer asked for each UDP socket (SO_RCVBUF), so a burst or
    /// a scheduling stall does not overflow it; the kernel caps it at
    /// `net.core.rmem_max` and the effective size is logged. 0 keeps the
    /// system default. Default: 4194304.
    pub udp_receive_buffer_bytes: usize,
    /// Listening sockets. Default: UDP and TCP on `127.0.0.1:5060` (one
    /// machine; list public addresses to serve a network).
    pub listen: Vec<Listen>,
}

impl Default for SipConfig {
    fn default() -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 5060));
        SipConfig {
            retry_after_secs: 5,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            idle_timeout_secs: 600,
            header_read_timeout_secs: 10,
            connect_timeout_ms: 5000,
            write_queue_messages: 1024,
            shutdown_grace_ms: 2000,
            udp_receive_buffer_bytes: 4 * 1024 * 1024,
            listen: vec![
                Listen {
                    transport: ListenTransport::Udp,
                    address: local,
                    public_address: None,
                },
                Listen {
                    transport: ListenTransport::Tcp,
                    address: local,
                    public_address: None,
                },
            ],
        }
    }
}

/// One SIP listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// `"udp"` or `"tcp"`. Required.
    pub transport: ListenTransport,
    /// IPv4 or IPv6 address and port, e.g. `"0.0.0.0:5060"` or `"[::]:5060"`.
    /// Required.
    pub address: SocketAddr,
    /// The address peers reach this listener at (behind NAT, or when
    /// `address` is unspecified); agents write it in Contact and Via.
    /// Default: `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<SocketAddr>,
}

impl Listen {
    /// The address advertised to agents.
    pub fn public(&self) -> SocketAddr {
        self.public_address.unwrap_or(self.address)
    }
}

/// The transports a listener can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenTransport {
    /// SIP over UDP.
    Udp,
    /// SIP over TCP.
    Tcp,
}

impl ListenTransport {
    /// The wire transport.
    pub fn transport(self) -> Transport {
        match self {
            ListenTransport::Udp => Transport::Udp,
            ListenTransport::Tcp => Transport::Tcp,
        }
    }
}

/// The agent side: where backends' agents dial in, and how they prove
/// themselves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// The address agents connect to. Default: `127.0.0.1:5070`.
    pub listen: SocketAddr,
    /// The balancer's name, sent to agents in CHALLENGE. Default: `"viaduct"`.
    pub name: String,
    /// A file holding the cluster secret (trailing whitespace ignored).
    /// Default: none, then `$VIADUCT_SECRET`, then a development secret with
    /// a loud warning. A relative path is relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// A file holding the previous cluster secret, accepted during a
    /// rotation (tags and agents keyed with it still verify). Default: none,
    /// then `$VIADUCT_PREVIOUS_SECRET`, then none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_file: Option<PathBuf>,
    /// Largest frame body accepted from an agent, in bytes (at most
    /// 16 MiB, at least a whole SIP message). Default: 1048576.
    pub max_frame_body: u32,
    /// An agent must finish the handshake within this long. Default: 5000.
    pub handshake_timeout_ms: u64,
    /// Frames queued for one agent link; when full, new frames for it are
    /// dropped and counted. Default: 4096.
    pub write_queue_frames: usize,
    /// Backend ids by agent name (1..=65535). An agent not listed gets a
    /// stable 16-bit hash of its name. Default: empty.
    pub ids: BTreeMap<String, u16>,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 5070)),
            name: "viaduct".to_owned(),
            secret_file: None,
            previous_secret_file: None,
            max_frame_body: DEFAULT_MAX_BODY,
            handshake_timeout_ms: 5000,
            write_queue_frames: 4096,
            ids: BTreeMap::new(),
        }
    }
}

/// What to do with a forged, stale or unknown affinity tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadTagPolicyConfig {
    /// Route the message as if it carried no tag.
    #[default]
    TreatAsUntagged,
    /// Answer 403 (forged) or 404 (unknown backend).
    Reject,
}

impl From<BadTagPolicyConfig> for BadTagPolicy {
    fn from(p: BadTagPolicyConfig) -> BadTagPolicy {
        match p {
            BadTagPolicyConfig::TreatAsUntagged => BadTagPolicy::TreatAsUntagged,
            BadTagPolicyConfig::Reject => BadTagPolicy::Reject,
        }
    }
}

/// Routing policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// `"treat-as-untagged"` or `"reject"`. Default: `"treat-as-untagged"`.
    pub bad_tag_policy: BadTagPolicyConfig,
    /// Accept call-independent tags (registration and subscription
    /// Contacts). Default: true.
    pub accept_call_independent_tags: bool,
    /// New-call table entry lifetime (design.md §3). Default: 32000.
    pub new_call_lifetime_ms: u64,
    /// New-call table bound; when full, new calls are placed by a stateless
    /// hash. Default: 500000.
    pub new_call_capacity: usize,
    /// How often agents report load (sent to them in WELCOME). Default: 500.
    pub report_interval_ms: u32,
    /// Missed reports after which a backend is down. Default: 3.
    pub missed_reports_down: u32,
    /// A tagged request whose backend is down: `"backup"` (a backup by
    /// rendezvous hash, marked) or `"reject"` (503). Default: `"backup"`.
    pub failover: FailoverPolicy,
    /// The pool of calls no rule matches and of agents no pool lists; made
    /// with default settings if no `[[pools]]` entry has the name.
    /// Default: `"default"`.
    pub default_pool: String,
    /// The capacity (and weight) of a backend whose agent reports none.
    /// Default: 1000.
    pub default_capacity: u32,
    /// Length of the sliding window of the least-traffic counters.
    /// Default: 10000.
    pub traffic_window_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        let r = RouterConfig::default();
        RoutingConfig {
            bad_tag_policy: BadTagPolicyConfig::default(),
            accept_call_independent_tags: r.accept_call_independent_tags,
            new_call_lifetime_ms: duration_ms(r.new_call_lifetime),
            new_call_capacity: r.new_call_capacity,
            report_interval_ms: u32::try_from(r.report_interval.as_millis()).unwrap_or(u32::MAX),
            missed_reports_down: r.missed_reports_down,
            failover: FailoverPolicy::default(),
            default_pool: DEFAULT_POOL.to_owned(),
            default_capacity: DEFAULT_CAPACITY,
            traffic_window_ms: duration_ms(DEFAULT_TRAFFIC_WINDOW),
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Limits on SIP messages (design.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest header section in bytes. Default: 32768.
    pub max_header_bytes: usize,
    /// Largest body in bytes. Default: 65536.
    pub max_body_bytes: usize,
    /// Most header fields in one message. Default: 256.
    pub max_headers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = encap_proto::sip::Limits::default();
        LimitsConfig {
            max_header_bytes: l.max_header_bytes,
            max_body_bytes: l.max_body_bytes,
            max_headers: l.max_headers,
        }
    }
}

impl LimitsConfig {
    /// The limits as the SIP framer and scanner take them.
    pub fn sip_limits(&self) -> encap_proto::sip::Limits {
        encap_proto::sip::Limits {
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body_bytes,
            max_headers: self.max_headers,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`"info"`, `"balancer=debug,info"`). `$VIADUCT_LOG`,
    /// when set, wins. SIGHUP reloads it. Default: `"info"`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".to_owned(),
        }
    }
}

/// The cluster secrets, read from their files or the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// The current secret.
    pub current: Vec<u8>,
    /// The previous secret, during a rotation.
    pub previous: Option<Vec<u8>>,
    /// Whether `current` is the built-in development secret.
    pub development: bool,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("current", &"..")
            .field("previous", &self.previous.as_ref().map(|_| ".."))
            .field("development", &self.development)
            .finish()
    }
}

impl Secrets {
    /// The tag keys derived from these secrets.
    pub fn tag_keys(&self) -> encap_proto::tag::TagKeys {
        match &self.previous {
            Some(previous) => encap_proto::tag::TagKeys::with_previous(&self.current, previous),
            None => encap_proto::tag::TagKeys::new(&self.current),
        }
    }
}

/// Every problem found in a configuration, each with its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// `(path, problem)` pairs, in file order.
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} problem(s) in the configuration:",
            self.problems.len()
        )?;
        for (path, problem) in &self.problems {
            writeln!(f, "  {path}: {problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses and checks a configuration text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![(
                e.span()
                    .map(|s| format!("line {}", line_of(text, s.start)))
                    .unwrap_or_else(|| "config".to_owned()),
                e.message().to_owned(),
            )],
        })?;
        config.check().map_err(|mut e| {
            for (path, _) in &mut e.problems {
                if let Some(line) = line_of_key(text, path) {
                    *path = format!("{path} (line {line})");
                }
            }
            e
        })?;
        Ok(config)
    }

    /// Reads, parses and checks a configuration file. Relative secret file
    /// paths are made relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![(path.display().to_string(), format!("cannot read: {e}"))],
        })?;
        let mut config = Config::from_toml(&text).map_err(|mut e| {
            for (p, _) in &mut e.problems {
                *p = format!("{}: {p}", path.display());
            }
            e
        })?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        for file in [
            &mut config.agents.secret_file,
            &mut config.agents.previous_secret_file,
            &mut config.admin.token_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        Ok(config)
    }

    /// Pools and rules, compiled (regexes included). Problem paths are
    /// those of the file (`pools[1].overflow_pool`, `rules[0].ruri_user.regex`,
    /// `routing.default_capacity`).
    pub fn selection(&self) -> Result<Selection, ConfigError> {
        Selection::new(
            &self.pools,
            &self.routing.default_pool,
            &self.rules,
            self.routing.default_capacity,
            Duration::from_millis(self.routing.traffic_window_ms),
        )
        .map_err(|problems| ConfigError {
            problems: problems
                .into_iter()
                .map(|(path, text)| {
                    if path.starts_with("pools") || path.starts_with("rules") {
                        (path, text)
                    } else {
                        (format!("routing.{path}"), text)
                    }
                })
                .collect(),
        })
    }

    /// The router's settings. `table_hash_keys` must be random per process;
    /// the seed of the selection draws is derived from them (one way).
    /// Fails only for a configuration [`check`](Self::check) rejects.
    pub fn router_config(&self, table_hash_keys: (u64, u64)) -> Result<RouterConfig, ConfigError> {
        let selection_seed = {
            use std::hash::Hasher;
            let mut h =
                siphasher::sip::SipHasher24::new_with_keys(table_hash_keys.0, table_hash_keys.1);
            h.write(b"viaduct selection seed");
            h.finish()
        };
        Ok(RouterConfig {
            limits: self.limits.sip_limits(),
            bad_tag_policy: self.routing.bad_tag_policy.into(),
            accept_call_independent_tags: self.routing.accept_call_independent_tags,
            new_call_lifetime: Duration::from_millis(self.routing.new_call_lifetime_ms),
            new_call_capacity: self.routing.new_call_capacity,
            table_hash_keys,
            report_interval: Duration::from_millis(u64::from(self.routing.report_interval_ms)),
            missed_reports_down: self.routing.missed_reports_down,
            retry_after_secs: self.sip.retry_after_secs,
            selection: self.selection()?,
            selection_seed,
            failover_policy: self.routing.failover,
        })
    }

    /// Reads the cluster secrets: the files if set, else the environment,
    /// else the development secret (`development` is then true).
    pub fn secrets(&self) -> Result<Secrets, ConfigError> {
        let mut problems = Vec::new();
        let mut read = |key: &str, file: &Option<PathBuf>, env: &str| -> Option<Vec<u8>> {
            let secret = match file {
                Some(f) => match std::fs::read(f) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        problems.push((
                            format!("agents.{key}"),
                            format!("cannot read {}: {e}", f.display()),
                        ));
                        return None;
                    }
                },
                None => std::env::var_os(env)?.into_encoded_bytes(),
            };
            let trimmed = secret.trim_ascii_end().to_vec();
            if trimmed.is_empty() {
                let source = file
                    .as_ref()
                    .map_or_else(|| format!("${env}"), |f| f.display().to_string());
                problems.push((format!("agents.{key}"), format!("{source} is empty")));
                return None;
            }
            Some(trimmed)
        };
        let current = read("secret_file", &self.agents.secret_file, SECRET_ENV);
        let previous = read(
            "previous_secret_file",
            &self.agents.previous_secret_file,
            PREVIOUS_SECRET_ENV,
        );
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(match current {
            Some(current) => Secrets {
                current,
                previous,
                development: false,
            },
            None => Secrets {
                current: DEVELOPMENT_SECRET.to_vec(),
                previous,
                development: true,
            },
        })
    }

    /// Reads the admin API's bearer token: `admin.token_file` if set, else
    /// `$VIADUCT_ADMIN_TOKEN`, else none. Fails, naming `admin.token_file`,
    /// when the file cannot be read or is empty, or when there is no token
    /// and `admin.listen` is not a loopback address.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let fail = |text: String| ConfigError {
            problems: vec![("admin.token_file".to_owned(), text)],
        };
        let (raw, source) = match &self.admin.token_file {
            Some(f) => (
                Some(
                    std::fs::read(f)
                        .map_err(|e| fail(format!("cannot read {}: {e}", f.display())))?,
                ),
                f.display().to_string(),
            ),
            None => (
                std::env::var_os(ADMIN_TOKEN_ENV).map(std::ffi::OsString::into_encoded_bytes),
                format!("${ADMIN_TOKEN_ENV}"),
            ),
        };
        let token = match raw {
            Some(raw) => {
                let token = String::from_utf8(raw.trim_ascii().to_vec())
                    .map_err(|_| fail(format!("{source} is not UTF-8")))?;
                if token.is_empty() {
                    return Err(fail(format!("{source} is empty")));
                }
                Some(token)
            }
            None => None,
        };
        if self.admin.enabled && token.is_none() && !self.admin.listen.ip().is_loopback() {
            return Err(fail(format!(
                "admin.listen {} is not a loopback address: a token is required (set admin.token_file or ${ADMIN_TOKEN_ENV})",
                self.admin.listen
            )));
        }
        Ok(token)
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Semantic checks, every problem at once.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |path: String, text: String| problems.push((path, text));
        if self.sip.listen.is_empty() {
            problem(
                "sip.listen".to_owned(),
                "at least one listener is needed".to_owned(),
            );
        }
        for (i, l) in self.sip.listen.iter().enumerate() {
            if l.address.port() == 0 {
                problem(
                    format!("sip.listen[{i}].address"),
                    "port 0 is not a SIP port".to_owned(),
                );
            }
            if self.sip.listen[..i]
                .iter()
                .any(|o| o.transport == l.transport && o.address == l.address)
            {
                problem(format!("sip.listen[{i}]"), "listed twice".to_owned());
            }
            let public = l.public();
            if public.ip().is_unspecified() || public.port() == 0 {
                problem(
                    format!("sip.listen[{i}].public_address"),
                    format!(
                        "agents would write {public} in Contact headers: set public_address to the address peers reach this listener at"
                    ),
                );
            }
            if l.address == self.agents.listen && l.transport == ListenTransport::Tcp {
                problem(
                    format!("sip.listen[{i}].address"),
                    "same address as agents.listen".to_owned(),
                );
            }
        }
        let at_least = [
            ("sip.max_connections", self.sip.max_connections, 1),
            (
                "sip.max_connections_per_ip",
                self.sip.max_connections_per_ip,
                1,
            ),
            ("sip.write_queue_messages", self.sip.write_queue_messages, 1),
            (
                "agents.write_queue_frames",
                self.agents.write_queue_frames,
                1,
            ),
            (
                "routing.new_call_capacity",
                self.routing.new_call_capacity,
                1,
            ),
            ("limits.max_header_bytes", self.limits.max_header_bytes, 256),
            ("limits.max_body_bytes", self.limits.max_body_bytes, 0),
            ("limits.max_headers", self.limits.max_headers, 8),
        ];
        for (path, value, min) in at_least {
            if value < min {
                problem(
                    path.to_owned(),
                    format!("{value} is below the minimum {min}"),
                );
            }
        }
        let positive = [
            ("sip.idle_timeout_secs", self.sip.idle_timeout_secs),
            (
                "sip.header_read_timeout_secs",
                self.sip.header_read_timeout_secs,
            ),
            ("sip.connect_timeout_ms", self.sip.connect_timeout_ms),
            (
                "agents.handshake_timeout_ms",
                self.agents.handshake_timeout_ms,
            ),
            (
                "routing.new_call_lifetime_ms",
                self.routing.new_call_lifetime_ms,
            ),
            (
                "routing.report_interval_ms",
                u64::from(self.routing.report_interval_ms),
            ),
            (
                "routing.missed_reports_down",
                u64::from(self.routing.missed_reports_down),
            ),
        ];
        for (path, value) in positive {
            if value == 0 {
                problem(path.to_owned(), "must be above 0".to_owned());
            }
        }
        // A whole SIP message must fit in one frame, with room for its metadata.
        let needed = self
            .limits
            .max_header_bytes
            .saturating_add(self.limits.max_body_bytes)
            .saturating_add(64);
        let max_frame = usize::try_from(self.agents.max_frame_body).unwrap_or(usize::MAX);
        if self.agents.max_frame_body > HARD_MAX_BODY {
            problem(
                "agents.max_frame_body".to_owned(),
                format!("{max_frame} is above the hard maximum {HARD_MAX_BODY}"),
            );
        } else if max_frame < needed {
            problem(
                "agents.max_frame_body".to_owned(),
                format!(
                    "{max_frame} cannot carry the largest SIP message the limits allow ({needed} bytes with metadata)"
                ),
            );
        }
        if self.agents.name.is_empty() || self.agents.name.len() > usize::from(u16::MAX) {
            problem(
                "agents.name".to_owned(),
                "must be 1 to 65535 bytes".to_owned(),
            );
        }
        let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
        for (name, &id) in &self.agents.ids {
            if id == 0 {
                problem(
                    format!("agents.ids.{name}"),
                    "backend id 0 is reserved".to_owned(),
                );
            } else if let Some(other) = seen.insert(id, name) {
                problem(
                    format!("agents.ids.{name}"),
                    format!("backend id {id} is also given to {other:?}"),
                );
            }
        }
        if self.admin.enabled
            && (self
                .sip
                .listen
                .iter()
                .any(|l| l.transport == ListenTransport::Tcp && l.address == self.admin.listen)
                || self.admin.listen == self.agents.listen)
        {
            problem(
                "admin.listen".to_owned(),
                "same address as a SIP TCP listener or agents.listen".to_owned(),
            );
        }
        if let Err(e) = self.selection() {
            for (path, text) in e.problems {
                problem(path, text);
            }
        }
        for (i, pool) in self.pools.iter().enumerate() {
            for (j, m) in pool.members.iter().enumerate() {
                let id = hashed_backend_id(&m.name());
                if let Some((agent, _)) = self.agents.ids.iter().find(|(_, &a)| a == id) {
                    problem(
                        format!("pools[{i}].members[{j}]"),
                        format!(
                            "its backend id {id} is also given to agent {agent:?} in agents.ids"
                        ),
                    );
                }
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            problem(
                "log.filter".to_owned(),
                format!("not a tracing filter: {e}"),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// The line of the key a problem path names, when the key (its last
/// segment, without an index) starts exactly one line of the file.
fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let last = path.rsplit('.').next()?;
    let key = last.split('[').next()?.trim_matches('"');
    if key.is_empty() {
        return None;
    }
    let mut found = text.lines().enumerate().filter(|(_, line)| {
        let line = line.trim_start().trim_start_matches('"');
        line.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start_matches('"').trim_start().starts_with('='))
    });
    let (n, _) = found.next()?;
    match found.next() {
        Some(_) => None,
        None => Some(n + 1),
    }
}

/// A stable backend id for an agent not listed in `agents.ids`: a 16-bit
/// fold of a fixed-key SipHash of its name, never 0.
pub fn hashed_backend_id(name: &str) -> u16 {
    crate::core::hash::backend_id_of(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_and_serves_udp_and_tcp() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        let transports: Vec<_> = c
            .sip
            .listen
            .iter()
            .map(|l| l.transport.transport())
            .collect();
        assert_eq!(transports, [Transport::Udp, Transport::Tcp]);
        assert_eq!(c.agents.listen, SocketAddr::from(([127, 0, 0, 1], 5070)));
    }

    #[test]
    fn the_effective_config_reads_back_as_itself() {
        let mut c = Config::default();
        c.agents.ids.insert("ivr-1".to_owned(), 7);
        c.agents.secret_file = Some(PathBuf::from("/etc/viaduct/secret"));
        c.sip.listen[1].public_address = Some("192.0.2.1:5060".parse().unwrap());
        c.routing.bad_tag_policy = BadTagPolicyConfig::Reject;
        let text = c.to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), c, "{text}");
        assert!(text.contains("bad_tag_policy = \"reject\""), "{text}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err = Config::from_toml("[sip]\nretry_after_secs = 3\nlisten_on = []\n").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].0, "line 3");
        assert!(
            err.problems[0].1.contains("unknown field `listen_on`"),
            "{err}"
        );
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let text = r#"
            [[sip.listen]]
            transport = "udp"
            address = "127.0.0.1:0"
            [[sip.listen]]
            transport = "udp"
            address = "127.0.0.1:0"
            [limits]
            max_headers = 2
        "#;
        let err = Config::from_toml(text).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sip.listen[0].address",
                "sip.listen[0].public_address",
                "sip.listen[1].address",
                "sip.listen[1]",
                "sip.listen[1].public_address",
                "limits.max_headers (line 9)"
            ]
        );
    }

    #[test]
    fn ids_are_checked_and_hashed_ids_are_stable_and_never_zero() {
        let err = Config::from_toml("[agents.ids]\na = 0\nb = 3\nc = 3\n").unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["agents.ids.a (line 2)", "agents.ids.c (line 4)"]);
        assert_eq!(hashed_backend_id("ivr-1"), hashed_backend_id("ivr-1"));
        assert_ne!(hashed_backend_id("ivr-1"), hashed_backend_id("ivr-2"));
        assert!((0..2000).all(|i| hashed_backend_id(&format!("b{i}")) != 0));
    }

    #[test]
    fn routing_settings_reach_the_router_config() {
        let c = Config::from_toml(
            "[routing]\nbad_tag_policy = \"reject\"\nnew_call_lifetime_ms = 1000\n[sip]\nretry_after_secs = 9\n",
        )
        .unwrap();
        let r = c.router_config((1, 2)).unwrap();
        assert_eq!(r.bad_tag_policy, BadTagPolicy::Reject);
        assert_eq!(r.new_call_lifetime, Duration::from_secs(1));
        assert_eq!(r.retry_after_secs, 9);
        assert_eq!(r.table_hash_keys, (1, 2));
    }

    #[test]
    fn pools_and_rules_read_back_and_reach_the_router() {
        let text = r#"
            [routing]
            default_pool = "main"
            failover = "reject"
            [[pools]]
            name = "conf"
            policy = "hash"
            hash_key = "to-user"
            backends = ["c1"]
            overflow_pool = "main"
            overflow_percent = 75
            [[rules]]
            pool = "conf"
            method = "INVITE"
            ruri_user = { prefix = "conf-" }
        "#;
        let c = Config::from_toml(text).unwrap();
        assert_eq!(
            Config::from_toml(&c.to_toml()).unwrap(),
            c,
            "{}",
            c.to_toml()
        );
        let r = c.router_config((1, 2)).unwrap();
        assert_eq!(r.failover_policy, FailoverPolicy::Reject);
        let pools = r.selection.pools();
        assert_eq!(pools.len(), 2, "conf, and the implicit main");
        assert_eq!(pools[0].overflow, Some(1));
        assert_eq!(pools[0].overflow_at, 0.75);
        assert_eq!(r.selection.default_pool(), 1);
        assert_eq!(r.selection.pools_of("c1"), [0]);
        assert_eq!(r.selection.pools_of("anyone"), [1]);
    }

    #[test]
    fn a_missing_secret_file_is_a_problem_naming_the_field() {
        let mut c = Config::default();
        c.agents.secret_file = Some(PathBuf::from("/nonexistent/viaduct-secret"));
        let err = c.secrets().unwrap_err();
        assert_eq!(err.problems[0].0, "agents.secret_file");
    }
}
