//! The admin listener of the real `viaduct` binary: Prometheus metrics,
//! the JSON API (backends, drain/undrain, config, new-call table), the
//! bearer token, `viaduct status`, and the Grafana dashboard's metric
//! names.
//!
//! The test plays SIP proxies (TCP) and backends whose agents dial the
//! balancer and speak encap-proto by hand, so it sees every frame (DRAIN
//! included). Each test has its own 127.0.3.x addresses; every read is
//! bounded by a timeout.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive: they may unwrap and spawn

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use balancer::core::router::{Action, Router, RouterConfig};
use balancer::driver::admin::{client, BackendView, BackendsReply, Drain, NewCalls};
use bytes::BytesMut;
use encap_proto::frame::auth::{AgentHandshake, AgentStep};
use encap_proto::frame::{encode, DrainState, Frame, FrameCodec, LoadReport, DEFAULT_MAX_BODY};
use encap_proto::tag::TagKeys;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use viaduct_tests::{free_port, SipTcp, Viaduct};

const SECRET: &[u8] = b"admin test cluster secret";
/// The most any single expected event may take.
const STEP: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched.
const QUIET: Duration = Duration::from_millis(400);

// ------------------------------------------------------------------ helpers

/// A balancer on `ip` with its admin listener on `admin_ip` (its own
/// address, so its port cannot clash with the SIP and agent ports);
/// `extra` is more TOML.
fn start(ip: &str, admin_ip: &str, extra: &str) -> (Viaduct, String) {
    let port = free_port(admin_ip, &[]);
    let lb = Viaduct::start(
        ip,
        SECRET,
        &format!(
            "[routing]\n# the test agents report by hand\nreport_interval_ms = 60000\n\
             [admin]\nlisten = \"{admin_ip}:{port}\"\n{extra}"
        ),
    );
    (lb, format!("http://{admin_ip}:{port}"))
}

async fn http(method: &str, base: &str, path: &str, token: Option<&str>) -> client::Answer {
    client::request(method, base, path, token, STEP)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
}

async fn get_json<T: serde::de::DeserializeOwned>(base: &str, path: &str) -> T {
    let a = http("GET", base, path, None).await;
    assert_eq!(a.status, 200, "GET {path}: {}", a.body);
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("GET {path}: {e}: {}", a.body))
}

async fn backends(base: &str) -> Vec<BackendView> {
    get_json::<BackendsReply>(base, "/api/backends")
        .await
        .backends
}

/// The sum of the samples of `name` whose labels contain every one of
/// `labels` (`key="value"`), or `None` if there is none.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels.iter().all(|l| rest.contains(l)) {
            let v: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The sample names the exposition declares (`# TYPE` lines; counters
/// with their `_total` suffix).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split(' ');
            let name = parts.next().unwrap();
            match parts.next() {
                Some("counter") => format!("{name}_total"),
                _ => name.to_owned(),
            }
        })
        .collect()
}

/// A backend's agent link, driven by hand.
struct Agent {
    id: u16,
    version: u8,
    frames: mpsc::UnboundedReceiver<Frame>,
    write: OwnedWriteHalf,
}

impl Agent {
    async fn connect(agents: SocketAddr, name: &str) -> Agent {
        let stream = tokio::time::timeout(STEP, TcpStream::connect(agents))
            .await
            .unwrap()
            .unwrap();
        let (rd, mut write) = stream.into_split();
        let mut reader = FramedRead::new(rd, FrameCodec::new(DEFAULT_MAX_BODY));
        let (mut handshake, hello) = AgentHandshake::start(SECRET, name, rand::random());
        write_frame(&mut write, &hello, 1).await;
        let challenge = handshake_frame(&mut reader).await;
        let AgentStep::Send(auth) = handshake.handle(challenge).unwrap() else {
            panic!("expected AUTH to send")
        };
        write_frame(&mut write, &auth, 1).await;
        let answer = handshake_frame(&mut reader).await;
        let Ok(AgentStep::Welcomed { welcome, version }) = handshake.handle(answer) else {
            panic!("agent {name} not welcomed")
        };
        reader.decoder_mut().set_version(version);
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = reader.next().await {
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
        Agent {
            id: welcome.backend_id,
            version,
            frames,
            write,
        }
    }

    async fn send(&mut self, frame: &Frame) {
        write_frame(&mut self.write, frame, self.version).await;
    }

    /// The next frame that `want` accepts (others are skipped).
    async fn expect<T>(&mut self, what: &str, want: impl Fn(&Frame) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.frames.recv())
                .await
                .unwrap_or_else(|_| panic!("agent {}: no {what} within {STEP:?}", self.id))
                .expect("agent link closed");
            if let Some(t) = want(&frame) {
                return t;
            }
        }
    }

    /// No SIP reaches this agent for a while.
    async fn expect_no_sip(&mut self) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, self.frames.recv()).await {
            assert!(
                !matches!(frame, Frame::SipToBackend(_)),
                "agent {} got SIP it should not: {frame:?}",
                self.id
            );
        }
    }
}

async fn handshake_frame(
    reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
) -> Frame {
    tokio::time::timeout(STEP, reader.next())
        .await
        .expect("timed out waiting for a handshake frame")
        .expect("link closed during the handshake")
        .unwrap()
}

async fn write_frame(write: &mut OwnedWriteHalf, frame: &Frame, version: u8) {
    let mut buf = BytesMut::new();
    encode(frame, version, &mut buf).unwrap();
    write.write_all(&buf).await.unwrap();
}

/// Which agent receives the next SIP message, and its text.
async fn expect_sip(agents: &mut [&mut Agent]) -> (usize, String) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        for (i, a) in agents.iter_mut().enumerate() {
            while let Ok(frame) = a.frames.try_recv() {
                if let Frame::SipToBackend(sip) = frame {
                    return (i, String::from_utf8(sip.message.to_vec()).unwrap());
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agent received the message"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn invite(call: &str, via: SocketAddr, lb: SocketAddr) -> String {
    format!(
        "INVITE sip:ivr@{lb} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {via};branch=z9hG4bK-{call}-1\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@a.example>;tag=a-{call}\r\n\
         To: <sip:ivr@{lb}>\r\n\
         Call-ID: {call}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@{via};transport=tcp>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn bye(call: &str, ruri: &str, via: SocketAddr) -> String {
    format!(
        "BYE {ruri} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {via};branch=z9hG4bK-{call}-2\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@a.example>;tag=a-{call}\r\n\
         To: <sip:ivr@example.com>;tag=b-{call}\r\n\
         Call-ID: {call}\r\n\
         CSeq: 2 BYE\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn report(seq: u64, active_calls: u32, cpu_permille: u16) -> Frame {
    Frame::Load(LoadReport {
        seq,
        active_calls,
        cpu_permille,
        capacity: 100,
        score: Some(1200),
        msgs_in: 40,
        msgs_out: 41,
        bytes_in: 4000,
        bytes_out: 4100,
    })
}

/// Polls `check` until it holds, or panics after [`STEP`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STEP;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ tests

/// `/metrics` exposes every family, and the values move with real SIP
/// traffic and load reports.
#[tokio::test]
async fn metrics_expose_the_families_and_move_with_traffic() {
    let (lb, base) = start("127.0.3.1", "127.0.3.2", "");
    let mut a = Agent::connect(lb.agents(), "alpha").await;
    let mut b = Agent::connect(lb.agents(), "beta").await;
    a.send(&report(1, 3, 250)).await;
    b.send(&report(1, 5, 500)).await;

    let before = http("GET", &base, "/metrics", None).await;
    assert_eq!(before.status, 200);
    let names = exported_names(&before.body);
    let declared: BTreeSet<String> = balancer::driver::metrics::FAMILIES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(names, declared, "FAMILIES lists exactly what is exported");
    let sent = |t: &str| {
        sample(
            t,
            "viaduct_sip_messages_received_total",
            &["kind=\"request\""],
        )
        .unwrap()
    };
    assert_eq!(sent(&before.body), 0.0);

    let mut proxy = SipTcp::connect("127.0.3.3", lb.sip()).await;
    let via: SocketAddr = "127.0.3.3:5060".parse().unwrap();
    for n in 0..4 {
        proxy.send(&invite(&format!("m-{n}"), via, lb.sip())).await;
        expect_sip(&mut [&mut a, &mut b]).await;
    }

    let after = http("GET", &base, "/metrics", None).await.body;
    assert_eq!(sent(&after), 4.0, "{after}");
    assert_eq!(
        sample(&after, "viaduct_routed_total", &["route=\"selection\""]),
        Some(4.0)
    );
    let to_backends = sample(
        &after,
        "viaduct_backend_messages_total",
        &["direction=\"to_backend\""],
    )
    .unwrap();
    assert_eq!(to_backends, 4.0, "{after}");
    assert!(
        sample(
            &after,
            "viaduct_backend_bytes_total",
            &["direction=\"to_backend\""]
        )
        .unwrap()
            > 400.0
    );
    let alpha = ["backend=\"alpha\""];
    assert_eq!(
        sample(&after, "viaduct_backend_active_calls", &alpha),
        Some(3.0)
    );
    assert_eq!(
        sample(&after, "viaduct_backend_cpu_ratio", &alpha),
        Some(0.25)
    );
    assert_eq!(
        sample(&after, "viaduct_backend_capacity", &alpha),
        Some(100.0)
    );
    assert_eq!(
        sample(&after, "viaduct_backend_score", &alpha),
        Some(1200.0)
    );
    assert_eq!(sample(&after, "viaduct_backend_up", &alpha), Some(1.0));
    assert_eq!(
        sample(&after, "viaduct_backend_drain_state", &alpha),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &after,
            "viaduct_backend_reported_messages_total",
            &["backend=\"beta\"", "direction=\"from_backend\""]
        ),
        Some(41.0)
    );
    assert_eq!(sample(&after, "viaduct_agents_connected", &[]), Some(2.0));
    assert_eq!(sample(&after, "viaduct_connections_open", &[]), Some(1.0));
    assert_eq!(
        sample(&after, "viaduct_new_call_table_entries", &[]),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &after,
            "viaduct_pool_serving_backends",
            &["pool=\"default\""]
        ),
        Some(2.0)
    );

    // A second scrape reads the same counters: nothing counted twice.
    let again = http("GET", &base, "/metrics", None).await.body;
    assert_eq!(sent(&again), 4.0);

    // A request the balancer answers itself moves the rejection counter.
    proxy
        .send(
            "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK-r\r\n\
                 From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: r\r\nCSeq: 1 OPTIONS\r\n\
                 Max-Forwards: 0\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
    let answer = proxy.recv().await;
    assert_eq!(answer.status(), Some(483));
    let text = http("GET", &base, "/metrics", None).await.body;
    assert_eq!(
        sample(&text, "viaduct_rejections_total", &["status=\"483\""]),
        Some(1.0)
    );
}

/// `/api/backends` lists both agents with their load; `/api/new-calls`
/// and `/api/config` answer; `viaduct status` prints the table.
#[tokio::test]
async fn the_api_lists_backends_and_status_prints_them() {
    let (lb, base) = start("127.0.3.11", "127.0.3.12", "");
    let mut a = Agent::connect(lb.agents(), "alpha").await;
    let b = Agent::connect(lb.agents(), "beta").await;
    a.send(&report(1, 7, 125)).await;

    eventually("alpha's report is in", || async {
        backends(&base)
            .await
            .iter()
            .any(|v| v.name == "alpha" && v.load.active_calls == 7)
    })
    .await;
    let list = backends(&base).await;
    let names: Vec<&str> = list.iter().map(|v| v.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["alpha", "beta"]);
    for v in &list {
        assert!(v.up);
        assert_eq!(v.drain, Drain::Serving);
        assert_eq!(v.pools, ["default"]);
        let want = if v.name == "alpha" { a.id } else { b.id };
        assert_eq!(v.id, want);
    }
    let alpha = list.iter().find(|v| v.name == "alpha").unwrap();
    assert_eq!(
        (
            alpha.load.cpu_permille,
            alpha.load.capacity,
            alpha.load.score
        ),
        (125, 100, Some(1200))
    );
    assert_eq!(alpha.reported.msgs_in, 40);

    let n: NewCalls = get_json(&base, "/api/new-calls").await;
    assert_eq!((n.entries, n.capacity), (0, 500_000));

    let config: serde_json::Value = get_json(&base, "/api/config").await;
    assert_eq!(config["routing"]["report_interval_ms"], 60_000);
    assert!(config["admin"]["listen"]
        .as_str()
        .unwrap()
        .starts_with("127.0.3.12:"));
    let text = config.to_string();
    assert!(
        !text.contains(std::str::from_utf8(SECRET).unwrap()),
        "the secret leaks: {text}"
    );

    let out = tokio::task::spawn_blocking(move || {
        Command::cargo_bin("viaduct")
            .unwrap()
            .args(["status", "--admin", &base])
            .env_remove("VIADUCT_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = stdout.lines().next().unwrap();
    for col in [
        "NAME", "ID", "STATE", "CALLS", "CPU%", "CAPACITY", "MSGS IN", "MSGS OUT",
    ] {
        assert!(header.contains(col), "{stdout}");
    }
    let alpha_line = stdout.lines().find(|l| l.starts_with("alpha ")).unwrap();
    for cell in [a.id.to_string().as_str(), "serving", "7", "12.5", "100"] {
        assert!(
            alpha_line.split_whitespace().any(|c| c == cell),
            "{cell} in {alpha_line}"
        );
    }
    assert!(stdout.contains("TOTAL (2/2 up)"), "{stdout}");
}

/// Drain via the API: the agent gets a DRAIN frame, new calls avoid it,
/// its tagged in-dialog requests still reach it. Undrain: it is told, and
/// takes new calls again.
#[tokio::test]
async fn drain_and_undrain_through_the_api() {
    let (lb, base) = start("127.0.3.21", "127.0.3.22", "");
    let mut a = Agent::connect(lb.agents(), "alpha").await;
    let mut b = Agent::connect(lb.agents(), "beta").await;
    let mut proxy = SipTcp::connect("127.0.3.23", lb.sip()).await;
    let via: SocketAddr = "127.0.3.23:5060".parse().unwrap();

    // A call placed on alpha before the drain; its tag is what the
    // backend would put in its Contact.
    let mut tag = None;
    for n in 0..40 {
        let call = format!("before-{n}");
        proxy.send(&invite(&call, via, lb.sip())).await;
        let (i, text) = expect_sip(&mut [&mut a, &mut b]).await;
        if i == 0 {
            tag = Some((call, header(&text, "X-Viaduct-Backend").unwrap().to_owned()));
            break;
        }
    }
    let (call, tag) = tag.expect("no call reached alpha in 40 tries");

    let answer = http("POST", &base, "/api/backends/alpha/drain", None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let view: BackendView = serde_json::from_str(&answer.body).unwrap();
    assert_eq!((view.name.as_str(), view.drain), ("alpha", Drain::Draining));
    let state = a
        .expect("DRAIN", |f| match f {
            Frame::Drain(s) => Some(*s),
            _ => None,
        })
        .await;
    assert_eq!(state, DrainState::Draining);
    let list = backends(&base).await;
    assert_eq!(
        list.iter().find(|v| v.name == "alpha").unwrap().drain,
        Drain::Draining
    );

    for n in 0..8 {
        proxy
            .send(&invite(&format!("during-{n}"), via, lb.sip()))
            .await;
        let (i, text) = expect_sip(&mut [&mut a, &mut b]).await;
        assert_eq!(i, 1, "a new call reached the draining backend:\n{text}");
    }
    let ruri = format!("sip:ivr@{};transport=tcp;vd={tag}", lb.sip());
    proxy.send(&bye(&call, &ruri, via)).await;
    let (i, text) = expect_sip(&mut [&mut a, &mut b]).await;
    assert_eq!(i, 0, "the dialog's BYE left its draining backend:\n{text}");
    assert!(text.starts_with("BYE "), "{text}");
    a.expect_no_sip().await;

    // By id works too; unknown names are 404.
    let path = format!("/api/backends/{}/undrain", a.id);
    let answer = http("POST", &base, &path, None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let state = a
        .expect("DRAIN", |f| match f {
            Frame::Drain(s) => Some(*s),
            _ => None,
        })
        .await;
    assert_eq!(state, DrainState::Serving);
    let missing = http("POST", &base, "/api/backends/nobody/drain", None).await;
    assert_eq!(missing.status, 404, "{}", missing.body);

    let mut back = false;
    for n in 0..40 {
        proxy
            .send(&invite(&format!("after-{n}"), via, lb.sip()))
            .await;
        if expect_sip(&mut [&mut a, &mut b]).await.0 == 0 {
            back = true;
            break;
        }
    }
    assert!(back, "alpha took no new call after undrain");
}

/// With a token configured, `/api` needs it (401 without or wrong);
/// `/metrics` stays open for Prometheus.
#[tokio::test]
async fn the_api_needs_the_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin-token\n").unwrap();
    let (_lb, base) = start(
        "127.0.3.31",
        "127.0.3.32",
        &format!("token_file = \"{}\"\n", token_file.display()),
    );
    for path in ["/api/backends", "/api/config", "/api/new-calls"] {
        let none = http("GET", &base, path, None).await;
        assert_eq!(none.status, 401, "{path}: {}", none.body);
        let wrong = http("GET", &base, path, Some("guess")).await;
        assert_eq!(wrong.status, 401, "{path}");
        let right = http("GET", &base, path, Some("s3cret-admin-token")).await;
        assert_eq!(right.status, 200, "{path}: {}", right.body);
        assert!(!right.body.contains("s3cret-admin-token"));
    }
    let drain = http("POST", &base, "/api/backends/x/drain", None).await;
    assert_eq!(drain.status, 401);
    assert_eq!(http("GET", &base, "/metrics", None).await.status, 200);
}

/// `check-config` refuses an admin listener off loopback without a token,
/// naming `admin.token_file`; with one (file or environment) it passes.
#[test]
fn a_non_loopback_admin_listener_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("viaduct.toml");
    std::fs::write(&config, "[admin]\nlisten = \"0.0.0.0:5080\"\n").unwrap();
    let run = |env: Option<&str>| {
        let mut cmd = Command::cargo_bin("viaduct").unwrap();
        cmd.arg("check-config")
            .arg(&config)
            .env_remove("VIADUCT_ADMIN_TOKEN");
        if let Some(t) = env {
            cmd.env("VIADUCT_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = run(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("admin.token_file"), "{stderr}");
    assert!(run(Some("tok")).status.success());

    std::fs::write(dir.path().join("token"), "tok\n").unwrap();
    std::fs::write(
        &config,
        "[admin]\nlisten = \"0.0.0.0:5080\"\ntoken_file = \"token\"\n",
    )
    .unwrap();
    let out = run(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("tok\n"));
}

/// Every expression of the Grafana dashboard names only metrics the
/// balancer exports, and every panel has one.
#[tokio::test]
async fn the_dashboard_uses_only_exported_metrics() {
    let (lb, base) = start("127.0.3.41", "127.0.3.42", "");
    let mut a = Agent::connect(lb.agents(), "alpha").await;
    // Families without a sample are left out of the exposition: a report
    // with a score gives every per-backend family one.
    a.send(&report(1, 1, 10)).await;
    let deadline = Instant::now() + STEP;
    let exported = loop {
        let names = exported_names(&http("GET", &base, "/metrics", None).await.body);
        if names.contains("viaduct_backend_score") {
            break names;
        }
        assert!(Instant::now() < deadline, "the report never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exported.len() > 20, "{exported:?}");

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/viaduct-grafana.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let name = regex::Regex::new(r"viaduct_[a-z_]+").unwrap();
    let mut used = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = name.find_iter(expr).map(|m| m.as_str()).collect();
            assert!(!names.is_empty(), "{title}: {expr} names no metric");
            for n in names {
                assert!(
                    exported.contains(n),
                    "{title}: {n} is not exported ({exported:?})"
                );
                used.insert(n.to_owned());
            }
        }
    }
    let unused: Vec<&String> = exported.difference(&used).collect();
    assert!(unused.is_empty(), "no panel shows {unused:?}");
}

/// The router records an operator's drain at once and tells the agent;
/// an unknown or down backend is refused.
#[test]
fn set_drain_records_the_state_and_emits_a_drain_frame() {
    let mut r = Router::new(RouterConfig::default(), TagKeys::new(b"k"));
    let now = std::time::Instant::now();
    assert!(!r.set_drain(7, DrainState::Draining));
    r.backend_up(now, 7, "seven");
    while r.poll_action().is_some() {}
    assert!(r.set_drain(7, DrainState::Draining));
    assert_eq!(
        r.poll_action(),
        Some(Action::ToBackend {
            backend: 7,
            frame: Frame::Drain(DrainState::Draining)
        })
    );
    assert_eq!(r.backend_stats(now, 7).unwrap().drain, DrainState::Draining);
    assert_eq!(r.backend_by_name("seven"), Some(7));
    r.backend_down(7, "test");
    while r.poll_action().is_some() {}
    assert!(!r.set_drain(7, DrainState::Serving));
    assert_eq!(r.poll_action(), None);
}

/// An operator's drain outlives the agent's link: the backend that comes
/// back is drained again (and told so) until the operator undrains it, and
/// an agent announcing "serving" before it heard does not undo it.
#[test]
fn an_operator_drain_survives_the_agent_reconnecting() {
    let mut r = Router::new(RouterConfig::default(), TagKeys::new(b"k"));
    let now = std::time::Instant::now();
    r.backend_up(now, 7, "seven");
    while r.poll_action().is_some() {}
    assert!(r.set_drain(7, DrainState::Draining));
    while r.poll_action().is_some() {}
    r.backend_down(7, "link closed");
    while r.poll_action().is_some() {}

    r.backend_up(now, 7, "seven");
    let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(
        actions.contains(&Action::ToBackend {
            backend: 7,
            frame: Frame::Drain(DrainState::Draining)
        }),
        "{actions:?}"
    );
    assert_eq!(r.backend_stats(now, 7).unwrap().drain, DrainState::Draining);
    r.handle_frame(now, 7, Frame::Drain(DrainState::Serving));
    assert_eq!(r.backend_stats(now, 7).unwrap().drain, DrainState::Draining);
    r.handle_frame(now, 7, Frame::Drain(DrainState::Drained));
    assert_eq!(r.backend_stats(now, 7).unwrap().drain, DrainState::Drained);

    // Undrained by the operator: the next reconnect serves.
    assert!(r.set_drain(7, DrainState::Serving));
    r.backend_down(7, "link closed");
    while r.poll_action().is_some() {}
    r.backend_up(now, 7, "seven");
    let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::ToBackend {
                frame: Frame::Drain(_),
                ..
            }
        )),
        "{actions:?}"
    );
    assert_eq!(r.backend_stats(now, 7).unwrap().drain, DrainState::Serving);
}
