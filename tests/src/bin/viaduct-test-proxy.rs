//! `viaduct-test-proxy`: a SIP proxy stand-in for the container tests,
//! over TCP, in two lives that share one address (RFC 3261 §18.2.2: a
//! response whose connection is gone goes on a new connection to the Via's
//! `received` address and sent-by port).
//!
//! ```text
//! viaduct-test-proxy send BALANCER OWN_IP CALLS RING_MS REPORT [HANGUP_MS]
//!     connects to BALANCER (TCP, from an ephemeral port), sends CALLS
//!     INVITEs whose Via is `OWN_IP:5060` (no rport) and that ask the demo
//!     backend to ring RING_MS, waits for 180 to each, then closes the
//!     connection and exits. With HANGUP_MS, the INVITEs ask the backend
//!     to hang up that long after its 200, and the proxy waits for the 200s
//!     and ACKs them on the connection before it closes it.
//! viaduct-test-proxy answer CALLS WITHIN_MS REPORT
//!     listens on TCP 0.0.0.0:5060; on every connection accepted, answers a
//!     200 to INVITE with an ACK and a BYE to its Contact on that same
//!     connection, and a BYE request with 200; exits when CALLS BYEs are
//!     done either way, or after WITHIN_MS.
//! ```
//!
//! REPORT gets one line per event, for the test to count:
//! `sent <call-id> <local port>`, `provisional <call-id> <status>`,
//! `answered <call-id>`, `listening`, `accepted <peer>`,
//! `final <call-id> <status> <peer>`, `bye <call-id> <status> <peer>`,
//! `bye-in <call-id> <peer>`.
#![forbid(unsafe_code)]
#![allow(clippy::disallowed_methods)] // a binary: it reads clocks and spawns threads

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use encap_proto::sip::{Framed, Limits, SipMessage, StreamFramer};

type Report = Arc<Mutex<std::fs::File>>;

fn note(report: &Report, line: &str) {
    let mut f = report.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(f, "{line}");
    let _ = f.flush();
}

/// Reads SIP messages from a stream, bounded by a deadline.
struct Reader {
    stream: TcpStream,
    framer: StreamFramer,
    buf: BytesMut,
}

impl Reader {
    fn new(stream: TcpStream) -> Reader {
        Reader {
            stream,
            framer: StreamFramer::new(Limits::default()),
            buf: BytesMut::new(),
        }
    }

    /// The next message, or `None` at end of stream or `deadline`.
    fn next(&mut self, deadline: Instant) -> Option<SipMessage> {
        loop {
            match self.framer.decode(&mut self.buf) {
                Ok(Some(Framed::Message(m))) => return SipMessage::parse(m).ok(),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    eprintln!("stream does not frame: {e}");
                    return None;
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let _ = self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => {
                    eprintln!("read: {e}");
                    return None;
                }
            }
        }
    }
}

fn text(b: Option<&[u8]>) -> String {
    String::from_utf8_lossy(b.unwrap_or_default()).into_owned()
}

fn send(args: &[String]) -> Result<(), String> {
    let (balancer, own_ip, calls, ring_ms, report, hangup) = match args {
        [b, o, c, r, p] => (b, o, c, r, p, None),
        [b, o, c, r, p, h] => (b, o, c, r, p, Some(h)),
        _ => return Err("usage: send BALANCER OWN_IP CALLS RING_MS REPORT [HANGUP_MS]".into()),
    };
    let hangup_header = hangup
        .map(|ms| format!("X-Demo-Hangup-Ms: {ms}\r\n"))
        .unwrap_or_default();
    let calls: usize = calls.parse().map_err(|e| format!("CALLS: {e}"))?;
    let report: Report = Arc::new(Mutex::new(
        std::fs::File::create(report).map_err(|e| format!("{report}: {e}"))?,
    ));
    let mut stream = TcpStream::connect(balancer).map_err(|e| format!("{balancer}: {e}"))?;
    let port = stream.local_addr().map_err(|e| e.to_string())?.port();
    let pid = std::process::id();
    for i in 0..calls {
        let call_id = format!("proxy-{i}-{pid}@{own_ip}");
        let invite = format!(
            "INVITE sip:service@{balancer} SIP/2.0\r\n\
             Via: SIP/2.0/TCP {own_ip}:5060;branch=z9hG4bK-proxy-{pid}-{i}\r\n\
             From: <sip:proxy@{own_ip}>;tag=p{pid}-{i}\r\n\
             To: <sip:service@{balancer}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:proxy@{own_ip}:5060;transport=tcp>\r\n\
             Max-Forwards: 70\r\n\
             X-Demo-Ring-Ms: {ring_ms}\r\n\
             {hangup_header}\
             Content-Length: 0\r\n\r\n"
        );
        stream
            .write_all(invite.as_bytes())
            .map_err(|e| format!("sending INVITE {i}: {e}"))?;
        note(&report, &format!("sent {call_id} {port}"));
    }
    let mut reader = Reader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Without HANGUP_MS: until every call rings; with it: until every call
    // is answered (and ACKed).
    let wanted = if hangup.is_some() { 200 } else { 180 };
    let mut got = 0;
    while got < calls {
        let Some(m) = reader.next(deadline) else {
            return Err(format!(
                "{got} of {calls} calls got {wanted} before the stream ended"
            ));
        };
        let status = m.status().unwrap_or(0);
        let call_id = text(m.call_id());
        if status < 200 {
            note(&report, &format!("provisional {call_id} {status}"));
        }
        if status == 200 {
            let ack = in_dialog(&m, "ACK", 1, &format!("{own_ip}:5060"))
                .ok_or_else(|| format!("{call_id}: a 200 without Contact"))?;
            stream
                .write_all(ack.as_bytes())
                .map_err(|e| format!("sending ACK: {e}"))?;
            note(&report, &format!("answered {call_id}"));
        }
        if status == wanted {
            got += 1;
        }
    }
    // The proxy goes away: its connection closes with it.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn answer(args: &[String]) -> Result<(), String> {
    let [calls, within_ms, report] = args else {
        return Err("usage: answer CALLS WITHIN_MS REPORT".into());
    };
    let calls: usize = calls.parse().map_err(|e| format!("CALLS: {e}"))?;
    let within: u64 = within_ms.parse().map_err(|e| format!("WITHIN_MS: {e}"))?;
    let deadline = Instant::now() + Duration::from_millis(within);
    let report: Report = Arc::new(Mutex::new(
        std::fs::File::create(report).map_err(|e| format!("{report}: {e}"))?,
    ));
    let listener = TcpListener::bind("0.0.0.0:5060").map_err(|e| format!("bind :5060: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    note(&report, "listening");
    let done = Arc::new(Mutex::new(0usize));
    while Instant::now() < deadline && *done.lock().unwrap_or_else(|p| p.into_inner()) < calls {
        match listener.accept() {
            Ok((stream, peer)) => {
                note(&report, &format!("accepted {peer}"));
                let _ = stream.set_nonblocking(false);
                let (report, done) = (report.clone(), done.clone());
                std::thread::spawn(move || serve(stream, peer, deadline, &report, &done));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

/// Answers every 200 to INVITE on `stream` with ACK and BYE on it.
fn serve(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    deadline: Instant,
    report: &Report,
    done: &Mutex<usize>,
) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let own = stream
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut reader = Reader::new(stream);
    while let Some(m) = reader.next(deadline) {
        let call_id = text(m.call_id());
        let status = m.status().unwrap_or(0);
        let method = m.cseq().map(|c| c.method.to_vec()).unwrap_or_default();
        match (status, method.as_slice()) {
            (_, b"BYE") if m.is_request() => {
                note(report, &format!("bye-in {call_id} {peer}"));
                let ok = encap_proto::sip::response::response(&m, 200, "OK").build();
                if out.write_all(&ok).is_err() {
                    return;
                }
                *done.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
            (200, b"INVITE") => {
                note(report, &format!("final {call_id} {status} {peer}"));
                let via = format!("{own}:5060");
                let (Some(ack), Some(bye)) =
                    (in_dialog(&m, "ACK", 1, &via), in_dialog(&m, "BYE", 2, &via))
                else {
                    note(report, &format!("nocontact {call_id}"));
                    continue;
                };
                if out.write_all(ack.as_bytes()).is_err() || out.write_all(bye.as_bytes()).is_err()
                {
                    return;
                }
            }
            (_, b"INVITE") => note(report, &format!("final {call_id} {status} {peer}")),
            (_, b"BYE") => {
                note(report, &format!("bye {call_id} {status} {peer}"));
                *done.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
            _ => note(report, &format!("other {call_id} {status} {peer}")),
        }
    }
}

/// A request `method` (CSeq `cseq`) within the dialog a 200 to INVITE set
/// up, to its Contact, with our Via `via`; `None` without a Contact.
fn in_dialog(ok: &SipMessage, method: &str, cseq: u32, via: &str) -> Option<String> {
    let target = String::from_utf8_lossy(ok.contact()?.uri.raw).into_owned();
    let (from, to, call_id) = (
        text(ok.header("From")),
        text(ok.header("To")),
        text(ok.call_id()),
    );
    let pid = std::process::id();
    let id: String = call_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    Some(format!(
        "{method} {target} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {via};branch=z9hG4bK-proxy-{pid}-{method}-{id}\r\n\
         From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("send") => send(&args[1..]),
        Some("answer") => answer(&args[1..]),
        _ => Err("usage: viaduct-test-proxy send|answer ...".into()),
    };
    if let Err(e) = outcome {
        eprintln!("viaduct-test-proxy: {e}");
        std::process::exit(1);
    }
}
