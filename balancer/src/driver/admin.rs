//! The admin HTTP listener (`[admin]`): Prometheus metrics and a JSON API.
//!
//! | method and path                          | answer                                           |
//! |------------------------------------------|--------------------------------------------------|
//! | `GET /metrics`                           | OpenMetrics text ([`metrics`](super::metrics))   |
//! | `GET /api/backends`                      | [`BackendsReply`]: state, load, traffic, counters |
//! | `POST /api/backends/{id or name}/drain`  | [`BackendView`] after draining it                |
//! | `POST /api/backends/{id or name}/undrain`| [`BackendView`] after undraining it              |
//! | `GET /api/config`                        | the effective configuration (paths, no secrets)  |
//! | `GET /api/new-calls`                     | [`NewCalls`]: table size, capacity, fallbacks    |
//!
//! With a token configured (`admin.token_file` or `$VIADUCT_ADMIN_TOKEN`),
//! every `/api` request must carry `Authorization: Bearer TOKEN`, else 401.
//! `/metrics` is open, for Prometheus (it names backends, nothing more).
//!
//! # Reaching the router
//!
//! The router lives in an `Rc<RefCell<Router>>` on the driver's one thread
//! and axum's handlers must be `Send`, so they never touch it: each sends
//! a [`Request`] over a channel to one local task that owns the `Rc`, and
//! awaits the answer on a `oneshot`. This was chosen over publishing
//! snapshots into an `Arc<Mutex<..>>` on a timer because drain and undrain
//! must change the router and have its actions carried out on its thread
//! anyway, so the channel is needed regardless; with it, a scrape reads
//! the counters as they are at that moment, nothing is copied when nobody
//! asks, and the message path takes no lock.

// Drivers own the clock and the tasks: the one place they are allowed.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use encap_proto::frame::DrainState;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{metrics, Shared};
use crate::config::Config;
use crate::core::router::{BackendId, BackendStats, Counters};
use crate::core::select::Counts;

/// How long a handler waits for the router's thread.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

// ------------------------------------------------------------- plain data

/// A backend's drain state, as the API writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Drain {
    /// Takes new calls.
    Serving,
    /// Takes no new calls, keeps its dialogs.
    Draining,
    /// Draining and holds no call any more.
    Drained,
}

impl From<DrainState> for Drain {
    fn from(d: DrainState) -> Drain {
        match d {
            DrainState::Serving => Drain::Serving,
            DrainState::Draining => Drain::Draining,
            DrainState::Drained => Drain::Drained,
        }
    }
}

/// Traffic counts, each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsView {
    /// SIP messages to the backend.
    pub msgs_to_backend: u64,
    /// SIP messages from the backend.
    pub msgs_from_backend: u64,
    /// SIP bytes to the backend.
    pub bytes_to_backend: u64,
    /// SIP bytes from the backend.
    pub bytes_from_backend: u64,
}

impl From<Counts> for CountsView {
    fn from(c: Counts) -> CountsView {
        CountsView {
            msgs_to_backend: c.msgs_to_backend,
            msgs_from_backend: c.msgs_from_backend,
            bytes_to_backend: c.bytes_to_backend,
            bytes_from_backend: c.bytes_from_backend,
        }
    }
}

/// A backend's load: what its agent reported, and what selection uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadView {
    /// Active calls reported.
    pub active_calls: u32,
    /// CPU reported, per mille of the usable cores.
    pub cpu_permille: u16,
    /// Capacity weight in force (reported, else the default).
    pub capacity: u32,
    /// The application's score (0 idle ..= 10000 full), if reported.
    pub score: Option<u16>,
    /// Load as selection sees it, a fraction of capacity.
    pub load: f64,
    /// New calls placed on it since its last report.
    pub assigned_since_report: u32,
    /// The sequence number of the last report accepted (0: none yet).
    pub report_seq: u64,
}

/// The agent's own counters for its whole link (all balancers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedView {
    /// SIP messages the agent received.
    pub msgs_in: u64,
    /// SIP messages the agent sent.
    pub msgs_out: u64,
    /// SIP bytes the agent received.
    pub bytes_in: u64,
    /// SIP bytes the agent sent.
    pub bytes_out: u64,
}

/// This balancer's traffic with a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficView {
    /// Since the backend was first seen.
    pub total: CountsView,
    /// Over the sliding window (`routing.traffic_window_ms`).
    pub window: CountsView,
    /// The whole link's (all balancers') over the window, as reported.
    pub link_window: CountsView,
}

/// One backend, as `GET /api/backends` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    /// Its short id (the one its tags carry).
    pub id: BackendId,
    /// The name its agent registered with.
    pub name: String,
    /// Linked and reporting.
    pub up: bool,
    /// Its drain state.
    pub drain: Drain,
    /// Its pools.
    pub pools: Vec<String>,
    /// Its load.
    pub load: LoadView,
    /// This balancer's traffic with it.
    pub traffic: TrafficView,
    /// Its agent's own counters.
    pub reported: ReportedView,
}

impl BackendView {
    fn new(id: BackendId, s: BackendStats) -> BackendView {
        BackendView {
            id,
            name: s.name,
            up: s.up,
            drain: s.drain.into(),
            pools: s.pools,
            load: LoadView {
                active_calls: s.report.active_calls,
                cpu_permille: s.report.cpu_permille,
                capacity: s.capacity,
                score: s.report.score,
                load: s.load,
                assigned_since_report: s.assigned_since_report,
                report_seq: s.report.seq,
            },
            traffic: TrafficView {
                total: s.total_traffic.into(),
                window: s.own_traffic.into(),
                link_window: s.link_traffic.into(),
            },
            reported: ReportedView {
                msgs_in: s.report.msgs_in,
                msgs_out: s.report.msgs_out,
                bytes_in: s.report.bytes_in,
                bytes_out: s.report.bytes_out,
            },
        }
    }
}

/// The driver's own counters (drops and refusals) and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverCounters {
    /// Messages dropped: a connection's write queue was full.
    pub queue_full: u64,
    /// Messages for a connection that closed meanwhile.
    pub gone: u64,
    /// Datagrams not sent (socket buffer full, or an error).
    pub udp_drops: u64,
    /// Connections to next hops that could not be opened.
    pub connect_failures: u64,
    /// Connections refused or not opened by the connection limits.
    pub conns_refused: u64,
    /// Frames dropped: an agent link's queue was full.
    pub agent_queue_full: u64,
    /// Agents refused (authentication, duplicate, protocol).
    pub agents_refused: u64,
    /// Malformed frames from agents (the link is closed).
    pub agent_frame_errors: u64,
    /// SIP streams closed because they did not frame.
    pub sip_stream_framing_errors: u64,
    /// SIP datagrams dropped because they did not frame.
    pub sip_datagram_framing_errors: u64,
    /// SIP stream connections open.
    pub connections_open: u64,
    /// Agent links open.
    pub agents_connected: u64,
}

/// The new-call table (design.md §3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCalls {
    /// Entries held.
    pub entries: u64,
    /// The bound; when full, new calls are placed by the stateless hash.
    pub capacity: u64,
    /// Entry lifetime.
    pub lifetime_ms: u64,
    /// Requests routed by the table (repeats of new calls).
    pub routed_by_table: u64,
    /// New calls placed by selection (and entered in the table).
    pub routed_by_selection: u64,
    /// Requests placed by the stateless hash: table-full fallbacks and
    /// untagged in-dialog requests.
    pub routed_by_hash: u64,
}

/// A pool, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// Its name.
    pub name: String,
    /// Its policy, as the config writes it.
    pub policy: String,
    /// Members up and serving.
    pub serving: u64,
}

/// Everything the API and the metrics read, taken at one moment on the
/// router's thread.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The router's counters.
    pub counters: Counters,
    /// The driver's counters.
    pub driver: DriverCounters,
    /// Every known backend, by id.
    pub backends: Vec<BackendView>,
    /// The new-call table.
    pub new_calls: NewCalls,
    /// The pools.
    pub pools: Vec<PoolView>,
}

/// `GET /api/backends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendsReply {
    /// Every known backend (up or down), by id.
    pub backends: Vec<BackendView>,
    /// The router's and the driver's counters by name.
    pub counters: BTreeMap<String, u64>,
}

/// The router's and the driver's counters by name.
fn counters_map(c: &Counters, d: &DriverCounters) -> BTreeMap<String, u64> {
    let router = [
        ("requests_in", c.requests_in),
        ("responses_in", c.responses_in),
        ("to_backends", c.to_backends),
        ("from_backends", c.from_backends),
        ("routed_by_tag", c.routed_by_tag),
        ("routed_by_table", c.routed_by_table),
        ("routed_by_selection", c.routed_by_selection),
        ("routed_by_hash", c.routed_by_hash),
        ("table_full_fallbacks", c.table_full_fallbacks),
        ("new_call_expired", c.new_call_expired),
        ("failovers", c.failovers),
        ("bad_tags", c.bad_tags),
        ("unknown_backend_tags", c.unknown_backend_tags),
        ("own_headers_stripped", c.own_headers_stripped),
        ("rejected_400", c.rejected_400),
        ("rejected_bad_tag", c.rejected_bad_tag),
        ("rejected_too_large", c.rejected_too_large),
        ("rejected_483", c.rejected_483),
        ("rejected_503", c.rejected_503),
        ("rejected_481", c.rejected_481),
        ("rejected_overload", c.rejected_overload),
        ("dropped_responses", c.dropped_responses),
        ("dropped_acks", c.dropped_acks),
        ("dropped_from_backends", c.dropped_from_backends),
        ("unknown_frames", c.unknown_frames),
        ("stale_reports", c.stale_reports),
        ("overflowed", c.overflowed),
    ];
    let driver = [
        ("queue_full_drops", d.queue_full),
        ("gone_drops", d.gone),
        ("udp_drops", d.udp_drops),
        ("connect_failures", d.connect_failures),
        ("connections_refused", d.conns_refused),
        ("agent_queue_full_drops", d.agent_queue_full),
        ("agents_refused", d.agents_refused),
        ("agent_frame_errors", d.agent_frame_errors),
        ("sip_stream_framing_errors", d.sip_stream_framing_errors),
        ("sip_datagram_framing_errors", d.sip_datagram_framing_errors),
    ];
    router
        .into_iter()
        .chain(driver)
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

// ------------------------------------------------------ the router's side

/// What a handler asks of the router's thread.
#[derive(Debug)]
enum Request {
    /// Everything, now.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Drain or undrain a backend named by id or name.
    SetDrain {
        target: String,
        state: DrainState,
        reply: oneshot::Sender<Result<BackendView, ApiError>>,
    },
}

fn snapshot(shared: &Shared) -> Snapshot {
    let now = Instant::now();
    let router = shared.router.borrow();
    let backends: Vec<BackendView> = router
        .backend_ids()
        .into_iter()
        .filter_map(|id| {
            router
                .backend_stats(now, id)
                .map(|s| BackendView::new(id, s))
        })
        .collect();
    let pools = router
        .selection()
        .pools()
        .iter()
        .map(|p| PoolView {
            name: p.name.clone(),
            policy: serde_json::to_value(p.policy)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", p.policy)),
            serving: backends
                .iter()
                .filter(|b| b.up && b.drain == Drain::Serving && b.pools.contains(&p.name))
                .count() as u64,
        })
        .collect();
    let counters = router.counters().clone();
    let c = &shared.counters;
    let driver = DriverCounters {
        queue_full: c.queue_full.get(),
        gone: c.gone.get(),
        udp_drops: c.udp_drops.get(),
        connect_failures: c.connect_failures.get(),
        conns_refused: c.conns_refused.get(),
        agent_queue_full: c.agent_queue_full.get(),
        agents_refused: c.agents_refused.get(),
        agent_frame_errors: c.agent_frame_errors.get(),
        sip_stream_framing_errors: c.sip_stream_framing_errors.get(),
        sip_datagram_framing_errors: c.sip_datagram_framing_errors.get(),
        connections_open: shared.conns.borrow().len() as u64,
        agents_connected: shared.agents.borrow().len() as u64,
    };
    let new_calls = NewCalls {
        entries: router.new_call_entries() as u64,
        capacity: shared.settings.new_call_capacity as u64,
        lifetime_ms: shared.settings.new_call_lifetime_ms,
        routed_by_table: counters.routed_by_table,
        routed_by_selection: counters.routed_by_selection,
        routed_by_hash: counters.routed_by_hash,
    };
    Snapshot {
        counters,
        driver,
        backends,
        new_calls,
        pools,
    }
}

fn set_drain(
    shared: &Rc<Shared>,
    target: &str,
    state: DrainState,
) -> Result<BackendView, ApiError> {
    let id = {
        let router = shared.router.borrow();
        target
            .parse::<BackendId>()
            .ok()
            .filter(|id| router.backend_name(*id).is_some())
            .or_else(|| router.backend_by_name(target))
    };
    let Some(id) = id else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no backend with id or name {target:?}"),
        ));
    };
    let done = shared.router.borrow_mut().set_drain(id, state);
    // Carries out the DRAIN frame (and anything else pending).
    shared.drain();
    if !done {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("backend {target:?} is down: there is no agent to tell"),
        ));
    }
    let name = shared.router.borrow().backend_name(id).map(str::to_owned);
    info!(backend = id, name = ?name, state = ?state, "admin API: drain state set");
    shared
        .router
        .borrow()
        .backend_stats(Instant::now(), id)
        .map(|s| BackendView::new(id, s))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "backend vanished".to_owned()))
}

/// Answers the handlers' requests on the router's thread until shutdown.
async fn serve_requests(shared: Rc<Shared>, mut rx: mpsc::Receiver<Request>) {
    loop {
        let request = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
            () = shared.shutdown.cancelled() => return,
        };
        match request {
            Request::Snapshot(reply) => {
                let _ = reply.send(snapshot(&shared));
            }
            Request::SetDrain {
                target,
                state,
                reply,
            } => {
                let _ = reply.send(set_drain(&shared, &target, state));
            }
        }
    }
}

/// Starts the admin listener's tasks: the router-side request task and the
/// HTTP server, both stopping at shutdown.
pub(super) fn start(
    shared: &Rc<Shared>,
    listener: TcpListener,
    token: Option<String>,
    config: &Config,
) {
    let (tx, rx) = mpsc::channel(64);
    shared.tasks.spawn_local(serve_requests(shared.clone(), rx));
    let state = ApiState {
        tx,
        token: token.map(Arc::from),
        config: Arc::new(serde_json::to_value(config).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("cannot render the configuration: {e}") }),
        )),
    };
    let app = app(state);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API and metrics listening");
    }
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn_local(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            warn!(error = %e, "admin listener failed");
        }
    });
}

// ---------------------------------------------------------------- HTTP side

#[derive(Debug, Clone)]
struct ApiState {
    tx: mpsc::Sender<Request>,
    token: Option<Arc<str>>,
    config: Arc<serde_json::Value>,
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> ApiError {
        ApiError { status, message }
    }

    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the balancer did not answer (shutting down?)".to_owned(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

fn app(state: ApiState) -> axum::Router {
    let api = axum::Router::new()
        .route("/backends", get(backends))
        .route("/backends/{target}/drain", post(drain))
        .route("/backends/{target}/undrain", post(undrain))
        .route("/config", get(config))
        .route("/new-calls", get(new_calls))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ));
    axum::Router::new()
        .route("/metrics", get(metrics_text))
        .nest("/api", api)
        .with_state(state)
}

/// Equal in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: HttpRequest,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({ "error": "a valid bearer token is required" })),
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn take_snapshot(state: &ApiState) -> Result<Snapshot, ApiError> {
    let (reply, answer) = oneshot::channel();
    state
        .tx
        .send(Request::Snapshot(reply))
        .await
        .map_err(|_| ApiError::unavailable())?;
    tokio::time::timeout(ANSWER_WITHIN, answer)
        .await
        .map_err(|_| ApiError::unavailable())?
        .map_err(|_| ApiError::unavailable())
}

async fn metrics_text(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let s = take_snapshot(&state).await?;
    Ok((
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&s),
    )
        .into_response())
}

async fn backends(State(state): State<ApiState>) -> Result<Json<BackendsReply>, ApiError> {
    let s = take_snapshot(&state).await?;
    Ok(Json(BackendsReply {
        counters: counters_map(&s.counters, &s.driver),
        backends: s.backends,
    }))
}

async fn new_calls(State(state): State<ApiState>) -> Result<Json<NewCalls>, ApiError> {
    Ok(Json(take_snapshot(&state).await?.new_calls))
}

async fn config(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json((*state.config).clone())
}

async fn set_drain_state(
    state: &ApiState,
    target: String,
    drain: DrainState,
) -> Result<Json<BackendView>, ApiError> {
    let (reply, answer) = oneshot::channel();
    state
        .tx
        .send(Request::SetDrain {
            target,
            state: drain,
            reply,
        })
        .await
        .map_err(|_| ApiError::unavailable())?;
    tokio::time::timeout(ANSWER_WITHIN, answer)
        .await
        .map_err(|_| ApiError::unavailable())?
        .map_err(|_| ApiError::unavailable())?
        .map(Json)
}

async fn drain(
    State(state): State<ApiState>,
    Path(target): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    set_drain_state(&state, target, DrainState::Draining).await
}

async fn undrain(
    State(state): State<ApiState>,
    Path(target): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    set_drain_state(&state, target, DrainState::Serving).await
}

// ------------------------------------------------------------------ client

/// A minimal HTTP/1.1 client for the admin API (`viaduct status`, tests):
/// plain `http://` only, one request per connection.
pub mod client {
    use std::time::Duration;

    use anyhow::{bail, Context};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    /// An answer: status and body.
    #[derive(Debug, Clone)]
    pub struct Answer {
        /// The HTTP status.
        pub status: u16,
        /// The body.
        pub body: String,
    }

    /// Sends `method` to `base` + `path` (`base`: `http://host:port` or
    /// `host:port`), with a bearer `token` if given; the whole exchange is
    /// bounded by `within`.
    pub async fn request(
        method: &str,
        base: &str,
        path: &str,
        token: Option<&str>,
        within: Duration,
    ) -> anyhow::Result<Answer> {
        let authority = base
            .strip_prefix("http://")
            .unwrap_or(base)
            .trim_end_matches('/');
        if authority.contains("://") {
            bail!("{base}: only http:// is supported");
        }
        let authority = authority.split('/').next().unwrap_or(authority);
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(authority)
                .await
                .with_context(|| format!("cannot connect to {authority}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                    .context("HTTP handshake")?;
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, authority)
                .header(hyper::header::CONNECTION, "close");
            if let Some(t) = token {
                req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req.body(Full::new(Bytes::new())).context("request")?;
            let work = async {
                let res = sender
                    .send_request(req)
                    .await
                    .context("sending the request")?;
                let status = res.status().as_u16();
                let body = res
                    .into_body()
                    .collect()
                    .await
                    .context("reading the answer")?
                    .to_bytes();
                anyhow::Ok(Answer {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            };
            // The connection is driven here, beside the exchange, so no
            // task (and no LocalSet) is needed.
            let mut conn = std::pin::pin!(conn);
            let mut work = std::pin::pin!(work);
            tokio::select! {
                r = &mut work => r,
                c = &mut conn => {
                    c.context("the connection failed")?;
                    work.await
                }
            }
        };
        tokio::time::timeout(within, exchange)
            .await
            .with_context(|| format!("{base}{path}: no answer within {within:?}"))?
    }
}
