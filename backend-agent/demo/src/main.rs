//! `viaduct-demo-backend`: a minimal B2BUA-style UAS behind Viaduct.
//!
//! It answers INVITE with 100, 180 and (after `--ring-ms`) 200 with SDP;
//! handles ACK, BYE, CANCEL (487 for the pending INVITE), OPTIONS,
//! re-INVITE, and answers other requests 200. It counts calls and, with
//! `--record FILE`, writes one line per message it received
//! (`<Call-ID> <method or status>`), so tests can check from the backend's
//! own record that every message of a call reached it.
//!
//! ```text
//! viaduct-demo-backend --name b1 --balancer 127.0.0.1:5070 [--ring-ms 0]
//! ```
#![allow(clippy::disallowed_methods)] // a binary: it reads clocks and spawns

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use backend_agent::agent::{Agent, AgentConfig, Incoming};
use backend_agent::respond::response;
use bytes::Bytes;
use clap::Parser;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "viaduct-demo-backend",
    version,
    about = "Demo SIP backend (UAS) behind a Viaduct balancer"
)]
struct Cli {
    /// This backend's name, unique in the cluster.
    #[arg(long, default_value = "demo-1")]
    name: String,
    /// A balancer's agent address; repeat for several balancers.
    #[arg(long = "balancer", default_value = "127.0.0.1:5070")]
    balancers: Vec<SocketAddr>,
    /// File holding the cluster secret (else $VIADUCT_SECRET, else the
    /// development secret).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Capacity weight reported to the balancers.
    #[arg(long, default_value_t = 100)]
    capacity: u32,
    /// Time between 180 Ringing and 200 OK, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ring_ms: u64,
    /// Write `<Call-ID> <method or status>` for every message received.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Log a stats line this often, in milliseconds (0: never).
    #[arg(long, default_value_t = 1000)]
    stats_ms: u64,
}

#[derive(Debug, Default)]
struct Stats {
    calls: u64,
    answered: u64,
    cancelled: u64,
    completed: u64,
    messages: u64,
}

/// A call not answered yet: its INVITE, to answer or to 487 on CANCEL.
struct Pending {
    invite: Incoming,
    to_tag: String,
}

struct Demo {
    agent: Agent,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
    stats: Mutex<Stats>,
    record: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    ring: Duration,
}

const SDP: &[u8] =
    b"v=0\r\no=demo 1 1 IN IP4 127.0.0.1\r\ns=viaduct demo\r\nc=IN IP4 127.0.0.1\r\n\
t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Demo {
    fn record(&self, msg: &Incoming) {
        let Some(record) = &self.record else { return };
        let s = msg.scanned();
        let what = match (s.method(), s.status()) {
            (Some(m), _) => String::from_utf8_lossy(m).into_owned(),
            (None, Some(code)) => code.to_string(),
            _ => "?".to_owned(),
        };
        let call_id = String::from_utf8_lossy(s.call_id().unwrap_or_default());
        let _ = writeln!(lock(record), "{call_id} {what}");
    }

    async fn reply(&self, req: &Incoming, resp: Bytes) {
        if let Err(e) = self.agent.respond(req, resp).await {
            warn!(error = %e, "could not send a response");
        }
    }

    async fn handle(self: &Arc<Self>, msg: Incoming) {
        lock(&self.stats).messages += 1;
        self.record(&msg);
        let s = msg.scanned();
        let Some(method) = s.method().map(<[u8]>::to_ascii_uppercase) else {
            return; // a response to a request of ours: nothing to do
        };
        let call_id = s.call_id().unwrap_or_default().to_vec();
        match method.as_slice() {
            b"INVITE" if s.to_tag().is_none() => {
                if lock(&self.pending).contains_key(&call_id) {
                    return; // a retransmission: the transaction is in hand
                }
                lock(&self.stats).calls += 1;
                let to_tag = format!("demo{:08x}", rand::random::<u32>());
                self.reply(&msg, response(s, 100, "Trying").build()).await;
                let ringing = response(s, 180, "Ringing")
                    .to_tag(&to_tag)
                    .header("Contact", b"<sip:demo@127.0.0.1>")
                    .build();
                self.reply(&msg, ringing).await;
                lock(&self.pending).insert(
                    call_id.clone(),
                    Pending {
                        invite: msg,
                        to_tag,
                    },
                );
                if self.ring.is_zero() {
                    self.answer(&call_id).await;
                } else {
                    let demo = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(demo.ring).await;
                        demo.answer(&call_id).await;
                    });
                }
            }
            b"INVITE" => {
                // re-INVITE: accept the new offer.
                let ok = response(s, 200, "OK")
                    .header("Contact", b"<sip:demo@127.0.0.1>")
                    .body("application/sdp", SDP)
                    .build();
                self.reply(&msg, ok).await;
            }
            b"ACK" => {}
            b"CANCEL" => {
                self.reply(&msg, response(s, 200, "OK").build()).await;
                let pending = lock(&self.pending).remove(&call_id);
                if let Some(p) = pending {
                    let terminated = response(p.invite.scanned(), 487, "Request Terminated")
                        .to_tag(&p.to_tag)
                        .build();
                    self.reply(&p.invite, terminated).await;
                    lock(&self.stats).cancelled += 1;
                }
            }
            b"BYE" => {
                self.reply(&msg, response(s, 200, "OK").build()).await;
                lock(&self.stats).completed += 1;
            }
            _ => {
                let tag = format!("demo{:08x}", rand::random::<u32>());
                self.reply(&msg, response(s, 200, "OK").to_tag(&tag).build())
                    .await;
            }
        }
    }

    async fn answer(&self, call_id: &[u8]) {
        let Some(p) = lock(&self.pending).remove(call_id) else {
            return;
        }; // cancelled meanwhile
        let ok = response(p.invite.scanned(), 200, "OK")
            .to_tag(&p.to_tag)
            .header("Contact", b"<sip:demo@127.0.0.1>")
            .body("application/sdp", SDP)
            .build();
        self.reply(&p.invite, ok).await;
        lock(&self.stats).answered += 1;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIADUCT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let secret = match (&cli.secret_file, std::env::var("VIADUCT_SECRET")) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("--secret-file {}", path.display()))?
            .trim()
            .to_owned(),
        (None, Ok(s)) => s,
        (None, Err(_)) => {
            warn!("no --secret-file or $VIADUCT_SECRET: using the development secret");
            String::from_utf8_lossy(encap_proto::frame::auth::DEVELOPMENT_SECRET).into_owned()
        }
    };
    let mut config = AgentConfig::new(&cli.name, secret.as_bytes(), cli.balancers.clone());
    config.capacity = cli.capacity;
    config.name_servers = vec![];
    let (agent, mut inbound) = Agent::start(config).context("starting the agent")?;
    let record = match &cli.record {
        Some(path) => Some(Mutex::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("--record {}", path.display()))?,
        ))),
        None => None,
    };
    let demo = Arc::new(Demo {
        agent: agent.clone(),
        pending: Mutex::new(HashMap::new()),
        stats: Mutex::new(Stats::default()),
        record,
        ring: Duration::from_millis(cli.ring_ms),
    });
    info!(name = %cli.name, balancers = ?cli.balancers, "demo backend started");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let mut stats_tick = tokio::time::interval(Duration::from_millis(cli.stats_ms.max(1)));
    loop {
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(msg) => demo.handle(msg).await,
                None => break,
            },
            _ = stats_tick.tick(), if cli.stats_ms > 0 => {
                if let Some(record) = &demo.record {
                    let _ = lock(record).flush();
                }
                let s = lock(&demo.stats);
                info!(calls = s.calls, answered = s.answered, cancelled = s.cancelled, completed = s.completed,
                      active = agent.active_calls(), messages = s.messages, "stats");
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    if let Some(record) = &demo.record {
        let _ = lock(record).flush();
    }
    agent.shutdown();
    let s = lock(&demo.stats);
    info!(
        calls = s.calls,
        completed = s.completed,
        "demo backend stopped"
    );
    Ok(())
}
