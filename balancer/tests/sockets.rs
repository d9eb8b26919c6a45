//! The real `viaduct` binary on real sockets: the test process plays SIP
//! proxies (TCP, each on its own 127.0.0.x address) and backends whose
//! agents dial the balancer and speak encap-proto (`FrameCodec` and
//! `AgentHandshake`).
//!
//! Each test starts its own balancer on its own 127.0.0.x addresses and
//! free ports; every read is bounded by a timeout, so a test fails rather
//! than hangs.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive: they may unwrap and spawn

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use bytes::BytesMut;
use encap_proto::frame::auth::{AgentHandshake, AgentStep, HandshakeError};
use encap_proto::frame::{
    encode, Code, Frame, FrameCodec, SipFromBackend, SipToBackend, Transport, DEFAULT_MAX_BODY,
};
use encap_proto::sip::{Framed, Limits, StreamFramer};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use viaduct_tests::free_port;

const SECRET: &[u8] = b"sockets test cluster secret";
/// The most any single expected event may take.
const STEP: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched.
const QUIET: Duration = Duration::from_millis(400);

// ------------------------------------------------------------------ balancer

/// The balancer process; killed when the test ends, pass or fail. Its log
/// is printed if the test failed.
struct Lb {
    child: Child,
    sip: SocketAddr,
    agents: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            for line in self.log.lock().unwrap().iter() {
                eprintln!("viaduct| {line}");
            }
        }
    }
}

fn start(ip: &str) -> Lb {
    // The test backends send no load reports.
    start_with_reports(ip, 60_000)
}

/// A balancer expecting load reports every `report_ms` (an agent link
/// silent for 4 × 3 report intervals, at least 10 s, is closed).
fn start_with_reports(ip: &str, report_ms: u32) -> Lb {
    start_with(ip, report_ms, "")
}

/// A balancer as [`start_with_reports`], with `routing` appended to its
/// `[routing]` table (and any tables after it, such as `[[pools]]`).
fn start_with(ip: &str, report_ms: u32, routing: &str) -> Lb {
    let sip_port = free_port(ip, &[]);
    let agent_port = free_port(ip, &[sip_port]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), [SECRET, b"\n"].concat()).unwrap();
    let config = dir.path().join("viaduct.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nidle_timeout_secs = 60\n\
             [[sip.listen]]\ntransport = \"udp\"\naddress = \"{ip}:{sip_port}\"\n\
             [[sip.listen]]\ntransport = \"tcp\"\naddress = \"{ip}:{sip_port}\"\n\
             [agents]\nlisten = \"{ip}:{agent_port}\"\nsecret_file = \"secret\"\n\
             [routing]\nreport_interval_ms = {report_ms}\n{routing}"
        ),
    )
    .unwrap();
    let mut child = Command::cargo_bin("viaduct")
        .unwrap()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("VIADUCT_LOG", "info,balancer=debug")
        .env_remove("VIADUCT_SECRET")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening for agents") {
                let _ = ready_tx.send(());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let lb = Lb {
        child,
        sip: format!("{ip}:{sip_port}").parse().unwrap(),
        agents: format!("{ip}:{agent_port}").parse().unwrap(),
        log,
        _dir: dir,
    };
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("viaduct did not start listening");
    lb
}

// ------------------------------------------------------------------ backends

/// A backend's agent link, driven by hand.
struct Backend {
    id: u16,
    version: u8,
    frames: mpsc::UnboundedReceiver<Frame>,
    write: OwnedWriteHalf,
}

/// Why an agent was not welcomed.
#[derive(Debug)]
struct Refused {
    code: Code,
    /// Whether the balancer closed the link after refusing.
    closed: bool,
}

async fn next_frame(reader: &mut FramedRead<OwnedReadHalf, FrameCodec>) -> Option<Frame> {
    tokio::time::timeout(STEP, reader.next())
        .await
        .expect("timed out waiting for a frame")
        .map(|r| r.unwrap())
}

async fn write_frame(write: &mut OwnedWriteHalf, frame: &Frame, version: u8) {
    let mut buf = BytesMut::new();
    encode(frame, version, &mut buf).unwrap();
    write.write_all(&buf).await.unwrap();
}

impl Backend {
    async fn connect(agents: SocketAddr, name: &str, secret: &[u8]) -> Result<Backend, Refused> {
        let stream = TcpStream::connect(agents).await.unwrap();
        let (rd, mut write) = stream.into_split();
        let mut reader = FramedRead::new(rd, FrameCodec::new(DEFAULT_MAX_BODY));
        let (mut handshake, hello) = AgentHandshake::start(secret, name, rand::random());
        write_frame(&mut write, &hello, 1).await;
        let challenge = next_frame(&mut reader).await.expect("no CHALLENGE");
        let AgentStep::Send(auth) = handshake.handle(challenge).unwrap() else {
            panic!("expected AUTH to send")
        };
        let Frame::Auth(_) = &auth else {
            panic!("{auth:?}")
        };
        write_frame(&mut write, &auth, 1).await;
        let answer = next_frame(&mut reader).await.expect("no WELCOME or REFUSE");
        match handshake.handle(answer) {
            Ok(AgentStep::Welcomed { welcome, version }) => {
                reader.decoder_mut().set_version(version);
                let (tx, frames) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(Ok(frame)) = reader.next().await {
                        if tx.send(frame).is_err() {
                            break;
                        }
                    }
                });
                Ok(Backend {
                    id: welcome.backend_id,
                    version,
                    frames,
                    write,
                })
            }
            Err(HandshakeError::Refused { code, .. }) => {
                let closed = next_frame(&mut reader).await.is_none();
                Err(Refused { code, closed })
            }
            other => panic!("unexpected handshake step {other:?}"),
        }
    }

    /// Sends a SIP message out through the balancer, over TCP.
    async fn send_sip(&mut self, connection: Option<u64>, next_hop: SocketAddr, message: String) {
        self.send_sip_over(Transport::Tcp, connection, next_hop, message)
            .await;
    }

    /// Sends a SIP message out through the balancer.
    async fn send_sip_over(
        &mut self,
        transport: Transport,
        connection: Option<u64>,
        next_hop: SocketAddr,
        message: String,
    ) {
        let frame = Frame::SipFromBackend(SipFromBackend {
            connection,
            transport,
            next_hop,
            message: message.into(),
        });
        write_frame(&mut self.write, &frame, self.version).await;
    }

    /// The next SIP message the balancer forwards to this backend.
    async fn expect_sip(&mut self) -> (SipToBackend, String) {
        loop {
            let frame = tokio::time::timeout(STEP, self.frames.recv())
                .await
                .expect("backend: timed out waiting for SIP")
                .expect("backend: link closed");
            if let Frame::SipToBackend(sip) = frame {
                let text = String::from_utf8(sip.message.to_vec()).unwrap();
                return (sip, text);
            }
        }
    }

    /// No SIP reaches this backend for a while.
    async fn expect_quiet(&mut self, who: &str) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, self.frames.recv()).await {
            assert!(
                !matches!(frame, Frame::SipToBackend(_)),
                "{who} got traffic it should not: {frame:?}"
            );
        }
    }

    /// Closes the link (FIN) and waits until the balancer closed its side.
    async fn close(mut self) {
        self.write.shutdown().await.unwrap();
        loop {
            match tokio::time::timeout(STEP, self.frames.recv()).await {
                Ok(None) => return,
                Ok(Some(_)) => continue,
                Err(_) => panic!("the balancer did not close the agent link"),
            }
        }
    }
}

/// Waits for the one backend that receives the next SIP message.
async fn expect_one(backends: &mut [Backend]) -> (usize, SipToBackend, String) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        for (i, b) in backends.iter_mut().enumerate() {
            while let Ok(frame) = b.frames.try_recv() {
                if let Frame::SipToBackend(sip) = frame {
                    let text = String::from_utf8(sip.message.to_vec()).unwrap();
                    return (i, sip, text);
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backend received the message"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn three_backends(lb: &Lb) -> Vec<Backend> {
    let mut out = Vec::new();
    for name in ["ivr-a", "ivr-b", "ivr-c"] {
        out.push(Backend::connect(lb.agents, name, SECRET).await.unwrap());
    }
    let mut ids: Vec<u16> = out.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct backend ids");
    out
}

// ------------------------------------------------------------------ proxies

/// One TCP connection of a proxy to the balancer.
struct SipConn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    framer: StreamFramer,
    /// The proxy's end of the connection.
    local: SocketAddr,
}

impl SipConn {
    /// Dials `to` from `ip` (the proxy's own address).
    async fn dial(ip: &str, to: SocketAddr) -> SipConn {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(to).await.unwrap();
        SipConn::from_stream(stream)
    }

    fn from_stream(stream: TcpStream) -> SipConn {
        let local = stream.local_addr().unwrap();
        let (rd, wr) = stream.into_split();
        SipConn {
            rd,
            wr,
            buf: BytesMut::new(),
            framer: StreamFramer::new(Limits::default()),
            local,
        }
    }

    async fn send(&mut self, message: &str) {
        self.wr.write_all(message.as_bytes()).await.unwrap();
    }

    /// The next SIP message, or `None` at EOF; panics after [`STEP`].
    async fn next(&mut self, wait: Duration) -> Result<Option<String>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(framed) = self.framer.decode(&mut self.buf).unwrap() {
                if let Framed::Message(m) = framed {
                    return Ok(Some(String::from_utf8(m.to_vec()).unwrap()));
                }
            }
            match tokio::time::timeout_at(deadline, self.rd.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0) | Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn expect_msg(&mut self, who: &str) -> String {
        match self.next(STEP).await {
            Ok(Some(m)) => m,
            Ok(None) => panic!("{who}: connection closed"),
            Err(()) => panic!("{who}: timed out waiting for a SIP message"),
        }
    }

    async fn expect_quiet(&mut self, who: &str) {
        if let Ok(Some(m)) = self.next(QUIET).await {
            panic!("{who} got a message it should not:\n{m}");
        }
    }

    /// Closes our side and waits until the balancer closed its side.
    async fn close(mut self) {
        self.wr.shutdown().await.unwrap();
        assert_eq!(
            self.next(STEP).await,
            Ok(None),
            "the balancer did not close the connection"
        );
    }
}

// ------------------------------------------------------------------ SIP texts

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

fn in_dialog(method: &str, cseq: u32, call: &str, ruri: &str, via: SocketAddr) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {via};branch=z9hG4bK-{call}-{cseq}-{method}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@a.example>;tag=a-{call}\r\n\
         To: <sip:ivr@example.com>;tag=b-{call}\r\n\
         Call-ID: {call}\r\n\
         CSeq: {cseq} {method}\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// The value of the first header `name` of a message.
fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A backend's response to `request`, with the Contact carrying `tag`.
fn response(request: &str, status: &str, lb: SocketAddr, tag: &str) -> String {
    let mut out = format!("SIP/2.0 {status}\r\n");
    for line in request.split("\r\n") {
        if line.starts_with("Via:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    let call = header(request, "Call-ID").unwrap();
    let to = header(request, "To").unwrap();
    let to = if to.contains(";tag=") {
        to.to_owned()
    } else {
        format!("{to};tag=b-{call}")
    };
    out.push_str(&format!(
        "From: {}\r\nTo: {to}\r\nCall-ID: {call}\r\nCSeq: {}\r\n\
         Contact: <sip:ivr@{lb};transport=tcp;vd={tag}>\r\nContent-Length: 0\r\n\r\n",
        header(request, "From").unwrap(),
        header(request, "CSeq").unwrap(),
    ));
    out
}

/// The tag the balancer stamped on an initial request, checked to name
/// `backend`.
fn stamped_tag(request: &str, backend: u16) -> String {
    let tag = header(request, "X-Viaduct-Backend")
        .unwrap_or_else(|| panic!("no X-Viaduct-Backend header:\n{request}"));
    assert_eq!(tag.len(), 17, "{tag}");
    assert_eq!(
        u16::from_str_radix(&tag[..4], 16).unwrap(),
        backend,
        "the tag names the backend that got the call"
    );
    tag.to_owned()
}

// ------------------------------------------------------------------ tests

/// (1) A whole call sticks to one backend: INVITE by selection (tag
/// stamped), 180/200 back on the exact inbound connection with the tagged
/// Contact, ACK and BYE to that Contact reach the same backend, and no
/// other backend hears anything.
#[tokio::test]
async fn a_whole_call_sticks_to_one_backend() {
    let lb = start("127.0.0.71");
    let mut backends = three_backends(&lb).await;
    let proxy_a = TcpListener::bind("127.0.0.72:0").await.unwrap();
    let a_addr = proxy_a.local_addr().unwrap();
    let mut a = SipConn::dial("127.0.0.72", lb.sip).await;

    a.send(&invite("call-1", a_addr, lb.sip)).await;
    let (i, inv, text) = expect_one(&mut backends).await;
    assert!(text.starts_with("INVITE sip:ivr@"), "{text}");
    assert_eq!(
        (inv.transport, inv.peer, inv.local),
        (Transport::Tcp, a.local, lb.sip)
    );
    let tag = stamped_tag(&text, backends[i].id);

    for status in ["180 Ringing", "200 OK"] {
        let resp = response(&text, status, lb.sip, &tag);
        backends[i]
            .send_sip(Some(inv.connection), a.local, resp)
            .await;
        let got = a.expect_msg("proxy A").await;
        assert!(got.starts_with(&format!("SIP/2.0 {status}\r\n")), "{got}");
        assert!(got.contains(&format!(";vd={tag}>")), "{got}");
    }

    let contact = format!("sip:ivr@{};transport=tcp;vd={tag}", lb.sip);
    let mut conn_ids = vec![inv.connection];
    for (method, cseq) in [("ACK", 1), ("BYE", 2)] {
        a.send(&in_dialog(method, cseq, "call-1", &contact, a_addr))
            .await;
        let (req, req_text) = backends[i].expect_sip().await;
        assert!(
            req_text.starts_with(&format!("{method} {contact} SIP/2.0\r\n")),
            "{req_text}"
        );
        assert_eq!(
            header(&req_text, "X-Viaduct-Backend"),
            None,
            "routed by its own tag"
        );
        conn_ids.push(req.connection);
        if method == "BYE" {
            let ok = response(&req_text, "200 OK", lb.sip, &tag);
            backends[i]
                .send_sip(Some(req.connection), a.local, ok)
                .await;
            let got = a.expect_msg("proxy A").await;
            assert!(
                got.starts_with("SIP/2.0 200 OK\r\n") && got.contains("CSeq: 2 BYE"),
                "{got}"
            );
        }
    }
    assert!(
        conn_ids.iter().all(|&c| c == inv.connection),
        "{conn_ids:?}"
    );
    for (j, b) in backends.iter_mut().enumerate() {
        if j != i {
            b.expect_quiet(&format!("backend {j}")).await;
        }
    }
    a.expect_quiet("proxy A").await;
}

/// (2) Responses go out on the exact inbound connection: proxy A has two
/// connections open, proxy B one; each answer arrives where its request
/// came from, and a frame naming a connection whose peer is not the next
/// hop does not use that connection.
#[tokio::test]
async fn responses_use_the_exact_inbound_connection() {
    let lb = start("127.0.0.81");
    let mut backends = three_backends(&lb).await;
    let a_via: SocketAddr = "127.0.0.82:5060".parse().unwrap();
    let b_via: SocketAddr = "127.0.0.83:5060".parse().unwrap();
    let mut a1 = SipConn::dial("127.0.0.82", lb.sip).await;
    let mut a2 = SipConn::dial("127.0.0.82", lb.sip).await;
    let mut b = SipConn::dial("127.0.0.83", lb.sip).await;

    // A call on A's second connection: answered there only.
    a2.send(&invite("call-2a", a_via, lb.sip)).await;
    let (i, inv_a2, text) = expect_one(&mut backends).await;
    assert_eq!(inv_a2.peer, a2.local);
    let tag = stamped_tag(&text, backends[i].id);
    let ok = response(&text, "200 OK", lb.sip, &tag);
    backends[i]
        .send_sip(Some(inv_a2.connection), a2.local, ok)
        .await;
    assert!(a2.expect_msg("A2").await.contains("Call-ID: call-2a\r\n"));
    a1.expect_quiet("A1").await;
    b.expect_quiet("B").await;

    // A call on A's first connection: answered there only.
    a1.send(&invite("call-2b", a_via, lb.sip)).await;
    let (j, inv_a1, text) = expect_one(&mut backends).await;
    assert_eq!(inv_a1.peer, a1.local);
    assert_ne!(inv_a1.connection, inv_a2.connection);
    let tag = stamped_tag(&text, backends[j].id);
    let ringing = response(&text, "180 Ringing", lb.sip, &tag);
    backends[j]
        .send_sip(Some(inv_a1.connection), a1.local, ringing)
        .await;
    assert!(a1.expect_msg("A1").await.contains("Call-ID: call-2b\r\n"));
    // The frame names A2's connection and a next hop on the same host (an
    // agent resolves the Via's port, which need not be the connection's):
    // RFC 3261 §18.2.2, the named connection carries it.
    let ok = response(&text, "200 OK", lb.sip, &tag);
    backends[j]
        .send_sip(Some(inv_a2.connection), a1.local, ok)
        .await;
    let got = a2.expect_msg("A2").await;
    assert!(got.starts_with("SIP/2.0 200 OK\r\n"), "{got}");
    a1.expect_quiet("A1").await;

    // Proxy B's call is answered to B.
    b.send(&invite("call-2c", b_via, lb.sip)).await;
    let (k, inv_b, text) = expect_one(&mut backends).await;
    assert_eq!(inv_b.peer, b.local);
    let tag = stamped_tag(&text, backends[k].id);
    let ok = response(&text, "200 OK", lb.sip, &tag);
    backends[k]
        .send_sip(Some(inv_b.connection), b.local, ok)
        .await;
    assert!(b.expect_msg("B").await.contains("Call-ID: call-2c\r\n"));
    a1.expect_quiet("A1").await;
    a2.expect_quiet("A2").await;

    // A frame naming B's connection with A1 as next hop: the balancer never
    // sends to a host the next hop does not name, so it goes to A1.
    let ok = response(&text, "200 OK", lb.sip, &tag);
    backends[k]
        .send_sip(Some(inv_b.connection), a1.local, ok)
        .await;
    let got = a1.expect_msg("A1").await;
    assert!(got.starts_with("SIP/2.0 200 OK\r\n"), "{got}");
    b.expect_quiet("B").await;
}

/// (3) Reconnection: proxy A's connection closed before the answer; the
/// backend names A's listening address, the balancer opens a connection to
/// it and delivers; later messages reuse that connection, and what A sends
/// back on it reaches the backend.
#[tokio::test]
async fn a_closed_connection_is_reopened_to_the_next_hop() {
    let lb = start("127.0.0.91");
    let mut backends = three_backends(&lb).await;
    let proxy_a = TcpListener::bind("127.0.0.92:0").await.unwrap();
    let a_addr = proxy_a.local_addr().unwrap();
    let mut a1 = SipConn::dial("127.0.0.92", lb.sip).await;

    a1.send(&invite("call-3", a_addr, lb.sip)).await;
    let (i, inv, text) = expect_one(&mut backends).await;
    let tag = stamped_tag(&text, backends[i].id);
    a1.close().await;

    let ok = response(&text, "200 OK", lb.sip, &tag);
    backends[i].send_sip(Some(inv.connection), a_addr, ok).await;
    let (stream, from) = tokio::time::timeout(STEP, proxy_a.accept())
        .await
        .expect("the balancer did not connect to the proxy's address")
        .unwrap();
    assert_eq!(
        from.ip(),
        lb.sip.ip(),
        "leaves from the balancer's SIP address"
    );
    let mut opened = SipConn::from_stream(stream);
    let got = opened.expect_msg("proxy A (opened)").await;
    assert!(
        got.starts_with("SIP/2.0 200 OK\r\n") && got.contains("Call-ID: call-3\r\n"),
        "{got}"
    );

    // A retransmitted 200 goes on the connection now open, not a new one.
    let again = response(&text, "200 OK", lb.sip, &tag);
    backends[i].send_sip(None, a_addr, again).await;
    assert!(opened
        .expect_msg("proxy A (opened)")
        .await
        .starts_with("SIP/2.0 200 OK"));
    assert!(
        tokio::time::timeout(QUIET, proxy_a.accept()).await.is_err(),
        "a second connection was opened"
    );

    // The opened connection is read like an accepted one.
    let contact = format!("sip:ivr@{};transport=tcp;vd={tag}", lb.sip);
    opened
        .send(&in_dialog("ACK", 1, "call-3", &contact, a_addr))
        .await;
    let (ack, ack_text) = backends[i].expect_sip().await;
    assert!(ack_text.starts_with("ACK "), "{ack_text}");
    assert_eq!(ack.peer, a_addr);
    assert_ne!(ack.connection, inv.connection);
}

/// (4) An agent with the wrong secret is refused (AUTH_FAILED), its link
/// closed, and it never gets traffic: every new call goes to the good one.
/// A second agent with a connected agent's name is refused too
/// (DUPLICATE_AGENT). And the UDP path: a call over UDP reaches the
/// backend, its answer comes back as a datagram from the balancer's socket.
#[tokio::test]
async fn a_wrong_secret_agent_is_refused() {
    let lb = start("127.0.0.101");
    let mut good = Backend::connect(lb.agents, "good", SECRET).await.unwrap();
    let refused = Backend::connect(lb.agents, "intruder", b"not the secret")
        .await
        .err()
        .expect("an agent with the wrong secret was welcomed");
    assert_eq!(refused.code, Code::AUTH_FAILED);
    assert!(refused.closed, "the link stays open after REFUSE");
    let twin = Backend::connect(lb.agents, "good", SECRET)
        .await
        .err()
        .expect("a second agent with the same name was welcomed");
    assert_eq!(twin.code, Code::DUPLICATE_AGENT);
    assert!(twin.closed);

    let udp = tokio::net::UdpSocket::bind("127.0.0.102:0").await.unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let request = invite("call-4-udp", udp_addr, lb.sip).replace("/TCP ", "/UDP ");
    udp.send_to(request.as_bytes(), lb.sip).await.unwrap();
    let (inv, text) = good.expect_sip().await;
    assert_eq!((inv.transport, inv.peer), (Transport::Udp, udp_addr));
    let tag = stamped_tag(&text, good.id);
    let ok = response(&text, "200 OK", lb.sip, &tag);
    good.send_sip_over(Transport::Udp, Some(inv.connection), udp_addr, ok)
        .await;
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(STEP, udp.recv_from(&mut buf))
        .await
        .expect("no datagram back")
        .unwrap();
    assert_eq!(from, lb.sip);
    let got = String::from_utf8_lossy(&buf[..n]);
    assert!(
        got.starts_with("SIP/2.0 200 OK\r\n") && got.contains("Call-ID: call-4-udp"),
        "{got}"
    );

    let mut a = SipConn::dial("127.0.0.102", lb.sip).await;
    let via: SocketAddr = "127.0.0.102:5060".parse().unwrap();
    for n in 0..4 {
        let call = format!("call-4-{n}");
        a.send(&invite(&call, via, lb.sip)).await;
        let (_, text) = good.expect_sip().await;
        assert!(text.contains(&format!("Call-ID: {call}\r\n")), "{text}");
        stamped_tag(&text, good.id);
    }
    a.expect_quiet("proxy A").await;
}

/// (5) A backend that closes its link gets no new call: the calls that
/// follow are all placed on the two others (none lost, none refused).
#[tokio::test]
async fn a_backend_that_closed_its_link_gets_no_new_calls() {
    let lb = start("127.0.0.111");
    let mut backends = three_backends(&lb).await;
    let gone = backends.remove(1);
    let gone_id = gone.id;
    gone.close().await;

    let mut a = SipConn::dial("127.0.0.112", lb.sip).await;
    let via: SocketAddr = "127.0.0.112:5060".parse().unwrap();
    let mut got = [0usize; 2];
    for n in 0..6 {
        let call = format!("call-5-{n}");
        a.send(&invite(&call, via, lb.sip)).await;
        let (i, _, text) = expect_one(&mut backends).await;
        assert!(text.contains(&format!("Call-ID: {call}\r\n")), "{text}");
        assert_ne!(backends[i].id, gone_id);
        stamped_tag(&text, backends[i].id);
        got[i] += 1;
    }
    assert!(
        got.iter().all(|&n| n > 0),
        "both remaining backends serve: {got:?}"
    );
    a.expect_quiet("proxy A").await;
}

/// An agent link that sends nothing is closed with a TIMEOUT error after
/// the idle limit (10 s here); one that sends a frame every 2 s stays.
#[tokio::test]
async fn a_silent_agent_link_is_closed_and_a_live_one_is_kept() {
    let lb = start_with_reports("127.0.0.113", 500);
    let mut silent = Backend::connect(lb.agents, "silent", SECRET).await.unwrap();
    let mut live = Backend::connect(lb.agents, "live", SECRET).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut seq = 0;
    let closed_after = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        seq += 1;
        let report = Frame::Load(encap_proto::frame::LoadReport {
            seq,
            capacity: 100,
            ..Default::default()
        });
        write_frame(&mut live.write, &report, live.version).await;
        // The silent link's frames so far: an ERROR then the close.
        let mut error = None;
        loop {
            match tokio::time::timeout(Duration::from_millis(10), silent.frames.recv()).await {
                Ok(Some(Frame::Error(e))) => error = Some(e),
                Ok(Some(_)) => {}
                Ok(None) => {
                    let e = error.as_ref().expect("closed without an ERROR frame");
                    assert_eq!(e.code, Code::TIMEOUT, "{e:?}");
                    break;
                }
                Err(_) => break,
            }
        }
        if error.is_some() || started.elapsed() > Duration::from_secs(16) {
            break started.elapsed();
        }
    };
    assert!(
        closed_after >= Duration::from_secs(9) && closed_after < Duration::from_secs(14),
        "the silent link closed after {closed_after:?} (limit 10 s)"
    );
    // The live link is still served: its frames arrive, no ERROR, not closed.
    while let Ok(frame) = tokio::time::timeout(Duration::from_millis(200), live.frames.recv()).await
    {
        match frame {
            None => panic!("the live agent link was closed"),
            Some(Frame::Error(e)) => panic!("the live agent link got {e:?}"),
            Some(_) => {}
        }
    }
    write_frame(&mut live.write, &Frame::Ping(7), live.version).await;
    loop {
        match tokio::time::timeout(STEP, live.frames.recv()).await {
            Ok(Some(Frame::Pong(7))) => break,
            Ok(Some(_)) => {}
            other => panic!("no PONG on the live link: {other:?}"),
        }
    }
}

/// (9) A next hop that stops reading (plain-SIP pool, TCP): what the
/// balancer forwards while the hop's socket is full waits in the
/// connection's queue, and once the hop reads again every message arrives
/// whole and in order, while the client keeps sending. Messages are
/// written straight from the reader while the writer is idle, so this is
/// where a message the socket took only in part must be finished, and the
/// writer's batch written, before any later message is.
#[tokio::test]
async fn a_next_hop_that_stops_reading_gets_every_message_whole_and_in_order() {
    const CALLS: usize = 600;
    const BODY: usize = 16 * 1024;
    let uas = TcpListener::bind("127.0.0.94:0").await.unwrap();
    let uas_addr = uas.local_addr().unwrap();
    let lb = start_with(
        "127.0.0.93",
        60_000,
        &format!(
            "default_pool = \"plain\"\n\
             [[pools]]\nname = \"plain\"\nmode = \"sip\"\nprobe_interval_ms = 0\n\
             members = [{{ address = \"{uas_addr}\", transport = \"tcp\", name = \"uas\" }}]\n"
        ),
    );
    let mut client = SipConn::dial("127.0.0.95", lb.sip).await;
    let body_of = |i: usize| -> String {
        let c = char::from(b'a' + u8::try_from(i % 26).unwrap());
        format!("{i:06}{}", c.to_string().repeat(BODY - 6))
    };
    // 9.6 MB in all, past what loopback sockets buffer, sent over about a
    // second: the client goes on sending while the next hop reads.
    let local = client.local;
    let send_all = async {
        for i in 0..CALLS {
            let body = body_of(i);
            let head = invite(&format!("stall-{i}"), local, lb.sip).replace(
                "Content-Length: 0\r\n",
                &format!("Content-Length: {}\r\n", body.len()),
            );
            client.send(&format!("{head}{body}")).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let read_all = async {
        let (stream, _) = tokio::time::timeout(STEP, uas.accept())
            .await
            .expect("the balancer did not connect to the pool member")
            .unwrap();
        // Not read at first: the balancer fills the socket and queues.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut hop = SipConn::from_stream(stream);
        for i in 0..CALLS {
            // Slower than the client: the socket stays near full.
            if i % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let got = hop.expect_msg("the next hop").await;
            assert_eq!(
                header(&got, "Call-ID"),
                Some(format!("stall-{i}").as_str()),
                "message {i} out of order"
            );
            let body = got.split_once("\r\n\r\n").unwrap().1;
            assert!(body == body_of(i), "message {i}: body changed on the way");
        }
        hop.expect_quiet("the next hop").await;
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send_all, read_all)
    })
    .await
    .expect("the run did not finish in 60 s");
}
