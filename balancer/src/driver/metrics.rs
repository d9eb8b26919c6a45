//! Prometheus exposition of the balancer's plain counters.
//!
//! The core keeps its counters as plain data ([`Counters`],
//! [`BackendStats`](crate::core::router::BackendStats)); only this driver
//! module knows Prometheus. Every scrape takes a [`Snapshot`] from the
//! router's thread and builds a fresh registry from it: each counter is set
//! to the router's value at that moment, so nothing is counted twice and
//! the message path carries no Prometheus code at all.
//!
//! Every family the balancer exports is named in [`FAMILIES`]; the Grafana
//! dashboard (`balancer/dashboards/viaduct-grafana.json`) uses only these.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::admin::{Drain, Snapshot};
use crate::core::router::Counters;

/// Every exported sample name (counters with their `_total` suffix).
pub const FAMILIES: &[&str] = &[
    "viaduct_sip_messages_received_total",
    "viaduct_sip_messages_forwarded_total",
    "viaduct_routed_total",
    "viaduct_failovers_total",
    "viaduct_overflowed_total",
    "viaduct_rejections_total",
    "viaduct_tag_forgeries_total",
    "viaduct_own_headers_stripped_total",
    "viaduct_dropped_total",
    "viaduct_stale_load_reports_total",
    "viaduct_frame_errors_total",
    "viaduct_driver_drops_total",
    "viaduct_connections_refused_total",
    "viaduct_agents_refused_total",
    "viaduct_connections_open",
    "viaduct_agents_connected",
    "viaduct_new_call_table_entries",
    "viaduct_new_call_table_capacity",
    "viaduct_new_call_table_fallbacks_total",
    "viaduct_new_call_table_expired_total",
    "viaduct_selections_total",
    "viaduct_pool_serving_backends",
    "viaduct_backend_messages_total",
    "viaduct_backend_bytes_total",
    "viaduct_backend_reported_messages_total",
    "viaduct_backend_reported_bytes_total",
    "viaduct_backend_up",
    "viaduct_backend_drain_state",
    "viaduct_backend_active_calls",
    "viaduct_backend_cpu_ratio",
    "viaduct_backend_capacity",
    "viaduct_backend_score",
    "viaduct_backend_load_ratio",
];

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rejection {
    status: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct What {
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    id: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendDirection {
    backend: String,
    id: u16,
    direction: &'static str,
}

type Counters1<L> = Family<L, Counter>;
type IntGauges<L> = Family<L, Gauge>;
type FloatGauges<L> = Family<L, Gauge<f64, AtomicU64>>;

/// A registry being filled from one snapshot. Help texts are written as
/// sentences; the encoder adds the final period itself.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let c: Counter = Counter::default();
        c.inc_by(value);
        self.registry.register(name, help.trim_end_matches('.'), c);
    }

    fn counters<L>(&mut self, name: &str, help: &str, values: Vec<(L, u64)>)
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let f: Counters1<L> = Family::default();
        for (labels, v) in values {
            f.get_or_create(&labels).inc_by(v);
        }
        self.registry.register(name, help.trim_end_matches('.'), f);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        self.registry.register(name, help.trim_end_matches('.'), g);
    }

    fn int_gauges<L>(&mut self, name: &str, help: &str, values: Vec<(L, i64)>)
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let f: IntGauges<L> = Family::default();
        for (labels, v) in values {
            f.get_or_create(&labels).set(v);
        }
        self.registry.register(name, help.trim_end_matches('.'), f);
    }

    fn float_gauges<L>(&mut self, name: &str, help: &str, values: Vec<(L, f64)>)
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let f: FloatGauges<L> = Family::default();
        for (labels, v) in values {
            f.get_or_create(&labels).set(v);
        }
        self.registry.register(name, help.trim_end_matches('.'), f);
    }
}

fn kinds(pairs: &[(&'static str, u64)]) -> Vec<(Kind, u64)> {
    pairs.iter().map(|&(kind, v)| (Kind { kind }, v)).collect()
}

/// The snapshot in the OpenMetrics text format.
pub fn render(s: &Snapshot) -> String {
    let mut b = Builder {
        registry: Registry::with_prefix("viaduct"),
    };
    router_families(&mut b, &s.counters);

    let d = &s.driver;
    b.counters(
        "frame_errors",
        "Frames that could not be decoded: agent links (malformed; unknown type, skipped) and SIP streams and datagrams that do not frame.",
        kinds(&[
            ("agent_malformed", d.agent_frame_errors),
            ("agent_unknown_type", s.counters.unknown_frames),
            ("sip_stream", d.sip_stream_framing_errors),
            ("sip_datagram", d.sip_datagram_framing_errors),
        ]),
    );
    b.counters(
        "driver_drops",
        "Messages the driver dropped instead of stalling: a full write queue, a connection closed meanwhile, a UDP send that failed (would block), a full agent link queue, a connection to the next hop that could not be opened.",
        [
            ("write_queue_full", d.queue_full),
            ("connection_gone", d.gone),
            ("udp_send_failed", d.udp_drops),
            ("agent_queue_full", d.agent_queue_full),
            ("connect_failed", d.connect_failures),
        ]
        .into_iter()
        .map(|(reason, v)| (Reason { reason }, v))
        .collect(),
    );
    b.counter(
        "connections_refused",
        "SIP connections refused or not opened because of sip.max_connections or sip.max_connections_per_ip.",
        d.conns_refused,
    );
    b.counter(
        "agents_refused",
        "Agent links refused (authentication, duplicate, protocol).",
        d.agents_refused,
    );
    b.gauge(
        "connections_open",
        "SIP stream connections open (accepted and opened).",
        d.connections_open,
    );
    b.gauge(
        "agents_connected",
        "Agent links authenticated and open.",
        d.agents_connected,
    );
    b.gauge(
        "new_call_table_entries",
        "Entries in the new-call table.",
        s.new_calls.entries,
    );
    b.gauge(
        "new_call_table_capacity",
        "The new-call table's bound; when full, new calls are placed by the stateless hash (routed_total{route=\"hash\"}).",
        s.new_calls.capacity,
    );
    b.counter(
        "new_call_table_fallbacks",
        "New calls placed by the stateless rendezvous hash because the new-call table was full.",
        s.counters.table_full_fallbacks,
    );
    b.counter(
        "new_call_table_expired",
        "New-call table entries that reached the end of their lifetime.",
        s.counters.new_call_expired,
    );
    b.counters(
        "selections",
        "New calls selected, by the pool that took them and its policy.",
        s.pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    PoolLabels {
                        pool: p.name.clone(),
                        policy: p.policy.clone(),
                    },
                    s.counters.selections_by_pool.get(i).copied().unwrap_or(0),
                )
            })
            .collect(),
    );
    b.int_gauges(
        "pool_serving_backends",
        "Members of a pool that are up and serving.",
        s.pools
            .iter()
            .map(|p| {
                (
                    PoolLabels {
                        pool: p.name.clone(),
                        policy: p.policy.clone(),
                    },
                    i64::try_from(p.serving).unwrap_or(i64::MAX),
                )
            })
            .collect(),
    );
    backend_families(&mut b, s);

    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &b.registry) {
        // Writing to a String fails only if a label's encoding does.
        out = format!("# encoding failed: {e}\n# EOF\n");
    }
    out
}

fn router_families(b: &mut Builder, c: &Counters) {
    b.counters(
        "sip_messages_received",
        "SIP messages received from peers.",
        kinds(&[("request", c.requests_in), ("response", c.responses_in)]),
    );
    b.counters(
        "sip_messages_forwarded",
        "SIP messages forwarded: to backends (over agent links) and from backends to peers.",
        [
            ("to_backend", c.to_backends),
            ("from_backend", c.from_backends),
        ]
        .into_iter()
        .map(|(direction, v)| (Direction { direction }, v))
        .collect(),
    );
    b.counters(
        "routed",
        "Requests routed, by how: a valid tag, the new-call table, selection (new calls), the stateless hash (table full, or untagged in-dialog).",
        [
            ("tag", c.routed_by_tag),
            ("table", c.routed_by_table),
            ("selection", c.routed_by_selection),
            ("hash", c.routed_by_hash),
        ]
        .into_iter()
        .map(|(route, v)| (RouteLabel { route }, v))
        .collect(),
    );
    b.counter(
        "failovers",
        "Requests for a down backend sent to a backup.",
        c.failovers,
    );
    b.counter(
        "overflowed",
        "New calls placed in an overflow pool.",
        c.overflowed,
    );
    b.counters(
        "rejections",
        "Requests the balancer answered itself with an error, by status and reason.",
        vec![
            (
                Rejection {
                    status: "400",
                    reason: "bad_request",
                },
                c.rejected_400,
            ),
            (
                Rejection {
                    status: "403/404",
                    reason: "bad_tag",
                },
                c.rejected_bad_tag,
            ),
            (
                Rejection {
                    status: "413/513",
                    reason: "too_large",
                },
                c.rejected_too_large,
            ),
            (
                Rejection {
                    status: "481",
                    reason: "no_transaction",
                },
                c.rejected_481,
            ),
            (
                Rejection {
                    status: "483",
                    reason: "too_many_hops",
                },
                c.rejected_483,
            ),
            (
                Rejection {
                    status: "503",
                    reason: "no_backend",
                },
                // Overload 503s are counted in both; both only grow, so
                // the difference does too.
                c.rejected_503.saturating_sub(c.rejected_overload),
            ),
            (
                Rejection {
                    status: "503",
                    reason: "overload",
                },
                c.rejected_overload,
            ),
        ],
    );
    b.counters(
        "tag_forgeries",
        "Affinity tags that did not verify (bad_tag) or named a backend this balancer does not know (unknown_backend).",
        kinds(&[
            ("bad_tag", c.bad_tags),
            ("unknown_backend", c.unknown_backend_tags),
        ]),
    );
    b.counter(
        "own_headers_stripped",
        "X-Viaduct-* headers removed from messages arriving from outside.",
        c.own_headers_stripped,
    );
    b.counters(
        "dropped",
        "Messages the router dropped: responses without a valid Viaduct Via, ACKs matching nothing, messages from backends it cannot send.",
        [
            ("response", c.dropped_responses),
            ("ack", c.dropped_acks),
            ("from_backend", c.dropped_from_backends),
        ]
        .into_iter()
        .map(|(what, v)| (What { what }, v))
        .collect(),
    );
    b.counter(
        "stale_load_reports",
        "Load reports received out of order or repeated (ignored).",
        c.stale_reports,
    );
}

fn backend_families(b: &mut Builder, s: &Snapshot) {
    let labels = |v: &super::admin::BackendView| BackendLabels {
        backend: v.name.clone(),
        id: v.id,
    };
    let dir = |v: &super::admin::BackendView, direction: &'static str| BackendDirection {
        backend: v.name.clone(),
        id: v.id,
        direction,
    };
    let mut msgs = Vec::new();
    let mut bytes = Vec::new();
    let mut rmsgs = Vec::new();
    let mut rbytes = Vec::new();
    for v in &s.backends {
        let t = &v.traffic.total;
        msgs.push((dir(v, "to_backend"), t.msgs_to_backend));
        msgs.push((dir(v, "from_backend"), t.msgs_from_backend));
        bytes.push((dir(v, "to_backend"), t.bytes_to_backend));
        bytes.push((dir(v, "from_backend"), t.bytes_from_backend));
        let r = &v.reported;
        rmsgs.push((dir(v, "to_backend"), r.msgs_in));
        rmsgs.push((dir(v, "from_backend"), r.msgs_out));
        rbytes.push((dir(v, "to_backend"), r.bytes_in));
        rbytes.push((dir(v, "from_backend"), r.bytes_out));
    }
    b.counters(
        "backend_messages",
        "SIP messages this balancer exchanged with a backend since it was first seen.",
        msgs,
    );
    b.counters(
        "backend_bytes",
        "SIP bytes this balancer exchanged with a backend since it was first seen.",
        bytes,
    );
    b.counters(
        "backend_reported_messages",
        "SIP messages the backend's agent reports for its whole link (all balancers) since the agent started.",
        rmsgs,
    );
    b.counters(
        "backend_reported_bytes",
        "SIP bytes the backend's agent reports for its whole link (all balancers) since the agent started.",
        rbytes,
    );
    let ints = |f: &dyn Fn(&super::admin::BackendView) -> i64| -> Vec<(BackendLabels, i64)> {
        s.backends.iter().map(|v| (labels(v), f(v))).collect()
    };
    b.int_gauges(
        "backend_up",
        "1 if the backend's agent is linked and reporting.",
        ints(&|v| i64::from(v.up)),
    );
    b.int_gauges(
        "backend_drain_state",
        "0 serving, 1 draining (no new calls), 2 drained (draining, no call left).",
        ints(&|v| match v.drain {
            Drain::Serving => 0,
            Drain::Draining => 1,
            Drain::Drained => 2,
        }),
    );
    b.int_gauges(
        "backend_active_calls",
        "Active calls the backend's agent reported last.",
        ints(&|v| i64::from(v.load.active_calls)),
    );
    b.int_gauges(
        "backend_capacity",
        "The backend's capacity weight (reported, else routing.default_capacity).",
        ints(&|v| i64::from(v.load.capacity)),
    );
    b.int_gauges(
        "backend_score",
        "The application's load score, 0 idle to 10000 full (only backends that report one).",
        s.backends
            .iter()
            .filter_map(|v| v.load.score.map(|sc| (labels(v), i64::from(sc))))
            .collect(),
    );
    b.float_gauges(
        "backend_cpu_ratio",
        "The backend process's CPU over the last report interval, a fraction of its usable cores.",
        s.backends
            .iter()
            .map(|v| (labels(v), f64::from(v.load.cpu_permille) / 1000.0))
            .collect(),
    );
    b.float_gauges(
        "backend_load_ratio",
        "The load selection uses, a fraction of capacity (reported calls, plus calls placed since the report).",
        s.backends
            .iter()
            .map(|v| (labels(v), v.load.load))
            .collect(),
    );
}
