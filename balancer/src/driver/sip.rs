//! SIP sockets: UDP, TCP listeners, and the stream connections (accepted,
//! or opened by the balancer for the response path).
//!
//! A stream connection is two tasks: a reader that frames messages
//! ([`StreamFramer`]) and feeds them to the router one at a time, and a
//! writer fed by a bounded queue. What the router sends while the reader
//! handles one read is held per connection and handed on when the read is
//! done (`Shared::cork`): written at once, in one write, when the
//! connection's writer is idle, else queued. The reader owns the
//! connection's life: when it ends (EOF, error, framing error, timeout,
//! shutdown) it tells the router and drops the queue, and the writer
//! flushes what is queued and closes.

// Drivers own the clock and the tasks: the one place they are allowed.
#![allow(clippy::disallowed_methods)]

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use encap_proto::frame::Transport;
use encap_proto::sip::{frame_datagram_scanned, Framed, FramingError, Scanned, StreamFramer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tracing::{debug, info, warn, Instrument};

use super::{bump, unix_us, write_loop, ConnHandle, ConnState, Shared};
use crate::core::router::{ConnId, Peer};

/// Largest UDP datagram read (the IPv4 maximum payload).
const MAX_DATAGRAM: usize = 65_535;
/// Finds the blank line that ends a header section (built once: building
/// a searcher per read cost as much as the search).
static END_OF_HEAD: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One UDP socket: read, frame, feed.
pub(super) async fn serve_udp(
    shared: Rc<Shared>,
    id: ConnId,
    socket: Rc<UdpSocket>,
    local: SocketAddr,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Made once: a wait made per datagram would register and deregister
    // with the token each time.
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let (n, remote) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(e) => {
                    // ICMP errors surface here on some systems; keep serving.
                    debug!(%local, error = %e, "UDP receive failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let now = Instant::now();
        let arrival = unix_us();
        let peer = Peer {
            conn: id,
            transport: Transport::Udp,
            remote,
            local,
        };
        // Framed and scanned in one walk of the datagram.
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        match frame_datagram_scanned(datagram, &shared.settings.limits) {
            Ok(Scanned::Message(msg)) => {
                shared.feed(|r| r.handle_scanned(now, arrival, peer, msg));
            }
            Ok(Scanned::Invalid { message, error }) => {
                shared.feed(|r| r.handle_unscannable(peer, &message, &error));
            }
            Ok(Scanned::Ping | Scanned::Pong) => {}
            Err(FramingError::BodyTooLarge { .. } | FramingError::HeaderTooLarge { .. }) => {
                let head = &buf[..n.min(shared.settings.limits.max_header_bytes)];
                shared.feed(|r| r.handle_oversized(peer, head));
            }
            Err(e) => {
                bump(&shared.counters.sip_datagram_framing_errors);
                info!(peer = %remote, transport = "UDP", error = %e, "dropped datagram that does not frame");
            }
        }
    }
}

/// One TCP listener: accept within the limits, start each connection.
pub(super) async fn serve_tcp(shared: Rc<Shared>, listener: TcpListener, local: SocketAddr) {
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(%local, error = %e, "TCP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shared.shutdown.cancelled() => return,
        };
        if let Some(why) = over_limits(&shared, remote.ip()) {
            bump(&shared.counters.conns_refused);
            // Logged once per refusal at debug, the first one at warn.
            if shared.counters.conns_refused.get() == 1 {
                warn!(peer = %remote, why, "refused a SIP connection (further refusals at debug level)");
            } else {
                debug!(peer = %remote, why, "refused a SIP connection");
            }
            drop(stream);
            continue;
        }
        *shared.per_ip.borrow_mut().entry(remote.ip()).or_insert(0) += 1;
        start_conn(&shared, stream, remote, local, Some(remote.ip()));
    }
}

fn over_limits(shared: &Shared, ip: IpAddr) -> Option<&'static str> {
    let s = &shared.settings;
    if open_connections(shared) >= s.max_connections {
        return Some("sip.max_connections reached");
    }
    if shared.per_ip.borrow().get(&ip).copied().unwrap_or(0) >= s.max_connections_per_ip {
        return Some("sip.max_connections_per_ip reached");
    }
    None
}

fn open_connections(shared: &Shared) -> usize {
    shared.conns.borrow().len() + shared.connecting.borrow().len()
}

/// Registers an open stream connection with the router and starts its
/// reader and writer. Returns its id. Synchronous, so the caller can queue
/// messages on it before any other task runs.
fn start_conn(
    shared: &Rc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    accepted_from: Option<IpAddr>,
) -> ConnId {
    let _ = stream.set_nodelay(true);
    let id = shared.next_id();
    let (rd, wr) = stream.into_split();
    let (tx, rx) = super::queue::queue(shared.settings.write_queue);
    let state = Rc::new(ConnState {
        // A child of the shutdown token: the reader waits on one future.
        cancel: shared.shutdown.child_token(),
        last_write: Cell::new(Instant::now()),
    });
    let wr = Rc::new(wr);
    shared.conns.borrow_mut().insert(
        id,
        ConnHandle {
            tx,
            w: wr.clone(),
            state: state.clone(),
            pending: std::cell::RefCell::new(Vec::new()),
        },
    );
    shared.feed(|r| r.conn_opened(id, Transport::Tcp, remote, local));
    let peer = Peer {
        conn: id,
        transport: Transport::Tcp,
        remote,
        local,
    };
    let span = tracing::info_span!("sip", conn = id, peer = %remote);
    debug!(parent: &span, accepted = accepted_from.is_some(), "connection open");
    shared
        .tasks
        .spawn_local(write_loop(wr, rx, state.clone()).instrument(span.clone()));
    shared
        .tasks
        .spawn_local(read_loop(shared.clone(), rd, peer, state, accepted_from).instrument(span));
    id
}

/// Why a connection's reader stopped.
#[derive(Debug)]
enum End {
    Eof,
    Error(std::io::Error),
    Idle,
    HeaderTimeout,
    Unframeable(FramingError),
    Oversized(FramingError),
    Stopped,
}

async fn read_loop(
    shared: Rc<Shared>,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    peer: Peer,
    state: Rc<ConnState>,
    accepted_from: Option<IpAddr>,
) {
    let end = read_messages(&shared, &mut rd, peer, &state).await;
    match &end {
        End::Eof | End::Stopped => debug!(?end, "connection closed"),
        End::Error(e) => debug!(error = %e, "connection failed"),
        End::Idle => debug!("closing idle connection"),
        End::HeaderTimeout => {
            info!(peer = %peer.remote, "closing connection: header section not complete within sip.header_read_timeout_secs")
        }
        // RFC 3261 §18.3: a stream that cannot be framed cannot be
        // resynchronised.
        End::Unframeable(e) => {
            bump(&shared.counters.sip_stream_framing_errors);
            warn!(peer = %peer.remote, transport = "TCP", error = %e, "closing stream that does not frame")
        }
        End::Oversized(e) => {
            info!(peer = %peer.remote, error = %e, "closing stream after a message too large")
        }
    }
    // Dropping the handle closes the queue: the writer flushes and closes.
    shared.conns.borrow_mut().remove(&peer.conn);
    if let Some(ip) = accepted_from {
        let mut per_ip = shared.per_ip.borrow_mut();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
    shared.feed(|r| r.conn_closed(peer.conn));
}

async fn read_messages(
    shared: &Rc<Shared>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    peer: Peer,
    state: &ConnState,
) -> End {
    let s = &shared.settings;
    let mut framer = StreamFramer::new(s.limits);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut last_read = Instant::now();
    // When the first byte of an unfinished header section arrived.
    let mut head_started: Option<Instant> = None;
    // One timer for the connection, armed at or before the real deadline
    // (reads and writes only push the idle deadline later): when it fires
    // early it is re-armed, so a read costs no timer registration.
    let mut armed = last_read + s.idle_timeout;
    let timer = tokio::time::sleep_until(armed.into());
    // The writer's end or the balancer's shutdown (a parent token).
    let stopped = state.cancel.cancelled();
    tokio::pin!(timer, stopped);
    loop {
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => return End::Error(e),
            },
            () = &mut timer => {
                let now = Instant::now();
                if head_started.is_some_and(|h| now >= h + s.header_read_timeout) {
                    return End::HeaderTimeout;
                }
                let idle_at = last_read.max(state.last_write.get()) + s.idle_timeout;
                if now >= idle_at {
                    return End::Idle;
                }
                armed = head_started.map_or(idle_at, |h| idle_at.min(h + s.header_read_timeout));
                timer.as_mut().reset(armed.into());
                continue;
            }
            () = &mut stopped => return End::Stopped,
        };
        let now = Instant::now();
        last_read = now;
        let eof = n == 0;
        let arrival = unix_us();
        let mut framed_any = false;
        // What the messages of this read send to one peer goes out in one
        // write, when the guard drops (end of this pass or any return).
        let _cork = shared.cork();
        loop {
            // Frame and scan in one walk; at the end of the stream, frame
            // what is left the plain way (decode_eof reports truncation)
            // and let the router scan it.
            let next = if eof {
                match framer.decode_eof(&mut buf) {
                    Ok(Some(Framed::Message(m))) => {
                        framed_any = true;
                        shared.feed(|r| r.handle_sip(now, arrival, peer, m));
                        continue;
                    }
                    Ok(Some(Framed::Ping)) => Ok(Some(Scanned::Ping)),
                    Ok(Some(Framed::Pong)) => Ok(Some(Scanned::Pong)),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            } else {
                framer.decode_scanned(&mut buf)
            };
            match next {
                Ok(Some(Scanned::Message(msg))) => {
                    framed_any = true;
                    shared.feed(|r| r.handle_scanned(now, arrival, peer, msg));
                }
                Ok(Some(Scanned::Invalid { message, error })) => {
                    framed_any = true;
                    shared.feed(|r| r.handle_unscannable(peer, &message, &error));
                }
                Ok(Some(Scanned::Ping)) => {
                    framed_any = true;
                    shared.send_stream(peer.conn, Bytes::from_static(b"\r\n"));
                }
                Ok(Some(Scanned::Pong)) => framed_any = true,
                Ok(None) => break,
                Err(
                    e @ (FramingError::BodyTooLarge { .. } | FramingError::HeaderTooLarge { .. }),
                ) => {
                    let head = &buf[..buf.len().min(s.limits.max_header_bytes)];
                    shared.feed(|r| r.handle_oversized(peer, head));
                    return End::Oversized(e);
                }
                Err(e) => return End::Unframeable(e),
            }
        }
        if eof {
            return End::Eof;
        }
        head_started = if buf.is_empty() || END_OF_HEAD.find(&buf).is_some() {
            None
        } else if framed_any || head_started.is_none() {
            Some(now)
        } else {
            head_started
        };
        if let Some(h) = head_started {
            let due = h + s.header_read_timeout;
            if due < armed {
                armed = due;
                timer.as_mut().reset(armed.into());
            }
        }
    }
}

/// [`Egress::Connect`](crate::core::router::Egress::Connect): open a
/// connection to `to` and send `message` on it. Concurrent connects to one
/// destination are coalesced: messages wait in order until it is up.
pub(super) fn connect(shared: &Rc<Shared>, transport: Transport, to: SocketAddr, message: Bytes) {
    if transport != Transport::Tcp {
        bump(&shared.counters.connect_failures);
        info!(peer = %to, %transport, "dropped: this balancer opens TCP connections only");
        return;
    }
    {
        let mut connecting = shared.connecting.borrow_mut();
        if let Some(waiting) = connecting.get_mut(&to) {
            if waiting.len() < shared.settings.write_queue {
                waiting.push(message);
            } else {
                bump(&shared.counters.queue_full);
            }
            return;
        }
    }
    if open_connections(shared) >= shared.settings.max_connections {
        bump(&shared.counters.conns_refused);
        info!(peer = %to, "dropped: sip.max_connections reached, cannot open a connection");
        return;
    }
    shared.connecting.borrow_mut().insert(to, vec![message]);
    let span = tracing::info_span!("connect", peer = %to);
    shared
        .tasks
        .spawn_local(open_and_send(shared.clone(), to).instrument(span));
}

async fn open_and_send(shared: Rc<Shared>, to: SocketAddr) {
    let opened = tokio::select! {
        r = tokio::time::timeout(shared.settings.connect_timeout, open(&shared, to)) => match r {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        },
        () = shared.shutdown.cancelled() => Err("shutting down".to_owned()),
    };
    let waiting = shared
        .connecting
        .borrow_mut()
        .remove(&to)
        .unwrap_or_default();
    match opened.and_then(|s| s.local_addr().map(|l| (s, l)).map_err(|e| e.to_string())) {
        Ok((stream, local)) => {
            debug!(%local, queued = waiting.len(), "connection opened");
            let id = start_conn(&shared, stream, to, local, None);
            let _cork = shared.cork();
            for message in waiting {
                shared.send_stream(id, message);
            }
        }
        Err(e) => {
            bump(&shared.counters.connect_failures);
            warn!(peer = %to, error = %e, dropped = waiting.len(), "cannot open a connection to the next hop");
        }
    }
}

async fn open(shared: &Shared, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Leave from the balancer's own SIP address where there is one, so the
    // peer sees the address it knows.
    if let Some(ip) = shared
        .settings
        .tcp_source_ips
        .iter()
        .find(|ip| ip.is_ipv4() == to.is_ipv4())
    {
        if let Err(e) = socket.bind(SocketAddr::new(*ip, 0)) {
            debug!(%ip, error = %e, "cannot bind the source address; letting the system choose");
        }
    }
    socket.connect(to).await
}
