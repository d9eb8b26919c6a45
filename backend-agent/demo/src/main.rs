//! `viaduct-demo-backend`: a minimal B2BUA-style UAS behind Viaduct.
//!
//! It answers INVITE with 100, 180 and (after `--ring-ms`) 200 with SDP;
//! handles ACK, BYE, CANCEL (487 for the pending INVITE), OPTIONS,
//! re-INVITE, and answers other requests 200. It counts calls and, with
//! `--record FILE`, writes one line per message it received
//! (`<Call-ID> <method or status>`), so tests can check from the backend's
//! own record that every message of a call reached it.
//!
//! Knobs a caller sets per call, for the end-to-end scenarios:
//! * `X-Demo-Ring-Ms: <ms>` on an INVITE rings that long instead of
//!   `--ring-ms` (room for a CANCEL during ringing);
//! * a Request-URI user starting with `auth` is challenged: an INVITE
//!   without `Authorization` gets `401` with a digest nonce derived from the
//!   backend's name and the Call-ID; the retry must carry that nonce (else
//!   `403`, as when the retry reached another backend);
//! * `X-Demo-Hangup-Ms: <ms>` on an INVITE: that long after its 200, the
//!   backend hangs up itself, a BYE to the caller's Contact (a request the
//!   backend originates, sent through the balancer).
//!
//! Like a UAS core (RFC 3261 §13.3.1.4, §17.2.1), it answers a
//! retransmitted INVITE with its final response again and, over UDP,
//! retransmits a 2xx until the ACK comes (T1 doubling up to T2, 32 s at most).
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
use backend_agent::peer::{HandOffMode, PeerConfig};
use backend_agent::respond::response;
use bytes::Bytes;
use clap::Parser;
use encap_proto::frame::Transport;
use encap_proto::sip::SipMessage;
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
    /// Dial no balancer (peer mode only).
    #[arg(long)]
    no_balancer: bool,
    /// Peer mode: listen for SIP (UDP and TCP) on this address.
    #[arg(long)]
    sip_listen: Option<SocketAddr>,
    /// Peer mode: the address written in Contact (default: --sip-listen).
    #[arg(long)]
    sip_public: Option<SocketAddr>,
    /// Peer mode: accept the peers' links on this address.
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Peer mode: a peer's link address; repeat for every peer.
    #[arg(long = "peer")]
    peers: Vec<SocketAddr>,
    /// Peer mode: below this load (% of capacity) new calls stay here.
    #[arg(long, default_value_t = 50)]
    peer_local_below: u32,
    /// Peer mode: a peer takes a call if lighter by this many points.
    #[arg(long, default_value_t = 20)]
    peer_margin: u32,
    /// Peer mode: `redirect` (302, the default) or `forward` (over the
    /// peer link).
    #[arg(long)]
    hand_off: Option<String>,
}

/// Peer-mode flags make sense only with `--sip-listen`: given without it
/// they are an error naming them, not ignored; `--no-balancer` needs it.
fn check_peer_flags(cli: &Cli) -> anyhow::Result<()> {
    if cli.sip_listen.is_some() {
        return Ok(());
    }
    let given: Vec<&str> = [
        (!cli.peers.is_empty(), "--peer"),
        (cli.peer_listen.is_some(), "--peer-listen"),
        (cli.hand_off.is_some(), "--hand-off"),
        (cli.sip_public.is_some(), "--sip-public"),
    ]
    .into_iter()
    .filter_map(|(set, flag)| set.then_some(flag))
    .collect();
    if !given.is_empty() {
        anyhow::bail!(
            "{}: peer mode only, give --sip-listen and --peer-listen too",
            given.join(", ")
        );
    }
    if cli.no_balancer {
        anyhow::bail!(
            "--no-balancer leaves no balancer: give --sip-listen and --peer-listen (peer mode), \
             or drop --no-balancer"
        );
    }
    Ok(())
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

/// A final response sent to an INVITE and not ACKed yet: sent again when
/// the INVITE is retransmitted (same CSeq) and, over UDP, until the ACK.
struct Answered {
    cseq: u32,
    response: Bytes,
}

/// The 2xx retransmission interval: T1 = 500 ms doubling up to T2 = 4 s,
/// for at most 64*T1 = 32 s (RFC 3261 §13.3.1.4).
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const TIMER_H: Duration = Duration::from_secs(32);
/// The longest delay a caller may ask for (`X-Demo-Ring-Ms`, `X-Demo-Hangup-Ms`).
const MAX_RING: Duration = Duration::from_secs(60);

struct Demo {
    agent: Agent,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
    answered: Mutex<HashMap<Vec<u8>, Answered>>,
    stats: Mutex<Stats>,
    record: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    ring: Duration,
    /// This backend's name: part of its digest nonces.
    name: String,
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
        let cseq = s.cseq().map_or(0, |c| c.seq);
        match method.as_slice() {
            b"INVITE" if s.to_tag().is_none() => {
                if lock(&self.pending).contains_key(&call_id) {
                    return; // a retransmission: the transaction is in hand
                }
                let again = lock(&self.answered)
                    .get(&call_id)
                    .filter(|a| a.cseq == cseq)
                    .map(|a| a.response.clone());
                if let Some(response) = again {
                    // A retransmission after the final answer: answer again.
                    self.reply(&msg, response).await;
                    return;
                }
                if let Some(refusal) = challenge(s, &call_id, &self.name) {
                    self.reply(&msg, refusal).await;
                    return;
                }
                lock(&self.stats).calls += 1;
                let ring = s
                    .header("X-Demo-Ring-Ms")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .map_or(self.ring, |ms| Duration::from_millis(ms).min(MAX_RING));
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
                if ring.is_zero() {
                    self.answer(&call_id).await;
                } else {
                    let demo = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(ring).await;
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
            b"ACK" => {
                lock(&self.answered).remove(&call_id);
            }
            b"CANCEL" => {
                self.reply(&msg, response(s, 200, "OK").build()).await;
                let pending = lock(&self.pending).remove(&call_id);
                if let Some(p) = pending {
                    let terminated = response(p.invite.scanned(), 487, "Request Terminated")
                        .to_tag(&p.to_tag)
                        .build();
                    self.remember(&p.invite, &call_id, terminated.clone());
                    self.reply(&p.invite, terminated).await;
                    lock(&self.stats).cancelled += 1;
                }
            }
            b"BYE" => {
                lock(&self.answered).remove(&call_id);
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

    async fn answer(self: &Arc<Self>, call_id: &[u8]) {
        let Some(p) = lock(&self.pending).remove(call_id) else {
            return;
        }; // cancelled meanwhile
        let ok = response(p.invite.scanned(), 200, "OK")
            .to_tag(&p.to_tag)
            .header("Contact", b"<sip:demo@127.0.0.1>")
            .body("application/sdp", SDP)
            .build();
        self.remember(&p.invite, call_id, ok.clone());
        self.reply(&p.invite, ok.clone()).await;
        lock(&self.stats).answered += 1;
        let hangup = p
            .invite
            .scanned()
            .header("X-Demo-Hangup-Ms")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .map(|ms| Duration::from_millis(ms).min(MAX_RING));
        if let (Some(after), Some(bye)) = (hangup, hangup_bye(p.invite.scanned(), &p.to_tag)) {
            let demo = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Err(e) = demo.agent.send_request(bye).await {
                    warn!(error = %e, "could not send a BYE");
                }
            });
        }
        if p.invite.meta.transport == Transport::Udp {
            let demo = self.clone();
            let call_id = call_id.to_vec();
            tokio::spawn(async move { demo.retransmit(p.invite, call_id, ok).await });
        }
    }

    /// Keeps the final response to `invite` until the ACK (or 32 s).
    fn remember(self: &Arc<Self>, invite: &Incoming, call_id: &[u8], response: Bytes) {
        let cseq = invite.scanned().cseq().map_or(0, |c| c.seq);
        lock(&self.answered).insert(call_id.to_vec(), Answered { cseq, response });
        let demo = self.clone();
        let call_id = call_id.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(TIMER_H).await;
            let mut answered = lock(&demo.answered);
            if answered.get(&call_id).is_some_and(|a| a.cseq == cseq) {
                answered.remove(&call_id);
            }
        });
    }

    /// Sends the 2xx `ok` again at T1, 2*T1, ... T2 until its ACK arrives.
    async fn retransmit(&self, invite: Incoming, call_id: Vec<u8>, ok: Bytes) {
        let mut interval = T1;
        let mut waited = Duration::ZERO;
        while waited < TIMER_H {
            tokio::time::sleep(interval).await;
            waited += interval;
            let unacked = lock(&self.answered)
                .get(&call_id)
                .is_some_and(|a| a.response == ok);
            if !unacked {
                return;
            }
            self.reply(&invite, ok.clone()).await;
            interval = (interval * 2).min(T2);
        }
    }
}

/// The BYE that ends the call `invite` set up, from our side (To tag
/// `to_tag`) to the caller's Contact; `None` if the INVITE has no Contact.
fn hangup_bye(invite: &SipMessage, to_tag: &str) -> Option<String> {
    let target = String::from_utf8_lossy(invite.contact()?.uri.raw);
    let text = |name| String::from_utf8_lossy(invite.header(name).unwrap_or_default());
    let (from, to, call_id) = (text("From"), text("To"), text("Call-ID"));
    let branch = rand::random::<u64>();
    Some(format!(
        "BYE {target} SIP/2.0\r\n\
         Via: SIP/2.0/TCP demo.invalid;branch=z9hG4bK-demo{branch:016x}\r\n\
         From: {to};tag={to_tag}\r\nTo: {from}\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ))
}

/// The digest challenge of Request-URI users `auth*`: `None` to go on, or
/// the answer that refuses the INVITE (401 without credentials, 403 with
/// credentials for another nonce).
fn challenge(s: &SipMessage, call_id: &[u8], backend: &str) -> Option<Bytes> {
    let user = s.request_uri()?.user?;
    if !user.starts_with(b"auth") {
        return None;
    }
    // Derived from this backend's name and the Call-ID: the retry of the
    // same call carries it back, and a retry that reached another backend
    // carries a nonce that backend did not issue (403).
    let nonce = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        backend.hash(&mut h);
        call_id.hash(&mut h);
        format!("{:016x}", h.finish())
    };
    match s.header("Authorization") {
        None => {
            let tag = format!("demo{:08x}", rand::random::<u32>());
            let www = format!("Digest realm=\"viaduct-demo\", nonce=\"{nonce}\", algorithm=MD5");
            Some(
                response(s, 401, "Unauthorized")
                    .to_tag(&tag)
                    .header("WWW-Authenticate", www.as_bytes())
                    .build(),
            )
        }
        Some(creds) => {
            let expected = format!("nonce=\"{nonce}\"");
            let ok = creds
                .windows(expected.len())
                .any(|w| w == expected.as_bytes());
            (!ok).then(|| {
                let tag = format!("demo{:08x}", rand::random::<u32>());
                response(s, 403, "Forbidden").to_tag(&tag).build()
            })
        }
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
    check_peer_flags(&cli)?;
    let balancers = if cli.no_balancer {
        vec![]
    } else {
        cli.balancers.clone()
    };
    let mut config = AgentConfig::new(&cli.name, secret.as_bytes(), balancers);
    config.capacity = cli.capacity;
    if let Some(sip_listen) = cli.sip_listen {
        let peer_listen = cli
            .peer_listen
            .context("--sip-listen (peer mode) needs --peer-listen")?;
        let mut peer = PeerConfig::new(sip_listen, peer_listen, cli.peers.clone());
        peer.sip_public = cli.sip_public.unwrap_or(sip_listen);
        peer.policy.local_below_percent = cli.peer_local_below;
        peer.policy.handoff_margin_points = cli.peer_margin;
        peer.hand_off = match cli.hand_off.as_deref().unwrap_or("redirect") {
            "redirect" => HandOffMode::Redirect,
            "forward" => HandOffMode::Forward,
            other => anyhow::bail!("--hand-off {other}: expected `redirect` or `forward`"),
        };
        config.peer = Some(peer);
    }
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
        answered: Mutex::new(HashMap::new()),
        stats: Mutex::new(Stats::default()),
        record,
        ring: Duration::from_millis(cli.ring_ms),
        name: cli.name.clone(),
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
                if let Some(m) = agent.peer_metrics() {
                    // `name=count` per peer and reason; `name:on|off:load%` per peer.
                    let handed_off: Vec<String> = m.handed_off.iter()
                        .map(|((peer, reason), n)| format!("{peer}/{}={n}", reason.as_str())).collect();
                    let peers: Vec<String> = m.peers.iter()
                        .map(|p| format!("{}:{}:{}", p.name, if p.online { "on" } else { "off" }, p.load_percent)).collect();
                    info!(load = m.local_load_percent, handed_off = %handed_off.join(","),
                          peers = %peers.join(","), failovers = m.failovers, "peer stats");
                }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(args: &[&str]) -> Result<(), String> {
        let cli = Cli::try_parse_from([&["demo"], args].concat()).unwrap();
        check_peer_flags(&cli).map_err(|e| e.to_string())
    }

    #[test]
    fn peer_flags_without_sip_listen_are_an_error_naming_them() {
        assert_eq!(
            check(&["--peer", "10.0.0.6:5071", "--hand-off", "forward"]).unwrap_err(),
            "--peer, --hand-off: peer mode only, give --sip-listen and --peer-listen too"
        );
        assert!(check(&["--peer-listen", "10.0.0.5:5071"])
            .unwrap_err()
            .starts_with("--peer-listen: "));
        let err = check(&["--no-balancer"]).unwrap_err();
        assert!(
            err.contains("--sip-listen") && !err.contains("AgentConfig"),
            "{err}"
        );
        assert!(check(&[]).is_ok());
        assert!(check(&[
            "--no-balancer",
            "--sip-listen",
            "10.0.0.5:5060",
            "--peer-listen",
            "10.0.0.5:5071",
            "--peer",
            "10.0.0.6:5071",
        ])
        .is_ok());
    }
}
