//! Tokio drivers: sockets in, the sans-I/O core in the middle, sockets out.
//!
//! One task per listening UDP socket, one per TCP listener and one per
//! accepted TCP connection. Each task reads, feeds one framed message to
//! the core, sends what the core answers, and stops when the shutdown
//! signal fires.

// Drivers own the clock and the tasks: the one place they are allowed.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use encap_proto::sip::{frame_datagram, Framed, Limits, StreamFramer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Config, ListenTransport};
use crate::core::standalone::{answer, Answer, DropReason};

/// Largest UDP datagram read (the IPv4 maximum payload).
const MAX_DATAGRAM: usize = 65_535;

/// A bound balancer, ready to run.
#[derive(Debug)]
pub struct Balancer {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    limits: Limits,
    retry_after_secs: u32,
}

impl Balancer {
    /// Binds every listener of `config`. Errors name the listener.
    pub async fn bind(config: &Config) -> anyhow::Result<Balancer> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for (i, l) in config.sip.listen.iter().enumerate() {
            match l.transport {
                ListenTransport::Udp => {
                    udp.push(UdpSocket::bind(l.address).await.with_context(|| {
                        format!("sip.listen[{i}]: cannot bind UDP {}", l.address)
                    })?)
                }
                ListenTransport::Tcp => {
                    tcp.push(TcpListener::bind(l.address).await.with_context(|| {
                        format!("sip.listen[{i}]: cannot bind TCP {}", l.address)
                    })?)
                }
            }
        }
        Ok(Balancer {
            udp,
            tcp,
            limits: config.limits.sip_limits(),
            retry_after_secs: config.sip.retry_after_secs,
        })
    }

    /// The addresses actually bound, as `(transport, address)`.
    pub fn local_addrs(&self) -> Vec<(ListenTransport, SocketAddr)> {
        let udp = self
            .udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| (ListenTransport::Udp, a));
        let tcp = self
            .tcp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| (ListenTransport::Tcp, a));
        udp.chain(tcp).collect()
    }

    /// Serves until `shutdown` turns `true`.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for (transport, addr) in self.local_addrs() {
            info!(transport = ?transport, %addr, "listening for SIP");
        }
        for socket in self.udp {
            tasks.spawn(serve_udp(
                socket,
                self.limits,
                self.retry_after_secs,
                shutdown.clone(),
            ));
        }
        for listener in self.tcp {
            tasks.spawn(serve_tcp(
                listener,
                self.limits,
                self.retry_after_secs,
                shutdown.clone(),
            ));
        }
        while let Some(done) = tasks.join_next().await {
            done.context("listener task panicked")??;
        }
        Ok(())
    }
}

fn log_drop(peer: SocketAddr, reason: &DropReason) {
    match reason {
        DropReason::Response | DropReason::Ack => {
            debug!(%peer, ?reason, "dropped: no backend to pass it to")
        }
        DropReason::Unanswerable(why) => {
            warn!(%peer, reason = %why, "dropped malformed SIP message")
        }
    }
}

async fn serve_udp(
    socket: UdpSocket,
    limits: Limits,
    retry_after_secs: u32,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(MAX_DATAGRAM);
    loop {
        buf.clear();
        buf.reserve(MAX_DATAGRAM);
        let (_, peer) = tokio::select! {
            r = socket.recv_buf_from(&mut buf) => r.context("UDP receive")?,
            _ = shutdown.changed() => return Ok(()),
        };
        let datagram = buf.split().freeze();
        let message = match frame_datagram(datagram, &limits) {
            Ok(Framed::Message(m)) => m,
            Ok(Framed::Ping | Framed::Pong) => continue,
            Err(e) => {
                warn!(%peer, transport = "UDP", error = %e, "dropped datagram that does not frame");
                continue;
            }
        };
        match answer(message, &limits, retry_after_secs) {
            Answer::Reply(reply) => {
                if let Err(e) = socket.send_to(&reply, peer).await {
                    warn!(%peer, error = %e, "UDP send failed");
                }
            }
            Answer::Drop(reason) => log_drop(peer, &reason),
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    limits: Limits,
    retry_after_secs: u32,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "TCP accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) =
                serve_tcp_connection(stream, peer, limits, retry_after_secs, shutdown).await
            {
                debug!(%peer, error = %e, "TCP connection ended");
            }
        });
    }
}

async fn serve_tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    limits: Limits,
    retry_after_secs: u32,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut framer = StreamFramer::new(limits);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = BytesMut::new();
    loop {
        let n = tokio::select! {
            r = stream.read_buf(&mut buf) => r.context("TCP read")?,
            _ = shutdown.changed() => return Ok(()),
        };
        let eof = n == 0;
        loop {
            let next = if eof {
                framer.decode_eof(&mut buf)
            } else {
                framer.decode(&mut buf)
            };
            match next {
                Ok(Some(Framed::Message(m))) => match answer(m, &limits, retry_after_secs) {
                    Answer::Reply(reply) => out.extend_from_slice(&reply),
                    Answer::Drop(reason) => log_drop(peer, &reason),
                },
                Ok(Some(Framed::Ping)) => out.extend_from_slice(b"\r\n"),
                Ok(Some(Framed::Pong)) => {}
                Ok(None) => break,
                Err(e) => {
                    // RFC 3261 §18.3: a stream that cannot be framed cannot be
                    // resynchronised; flush what we owe and close.
                    warn!(%peer, transport = "TCP", error = %e, "closing stream that does not frame");
                    stream.write_all(&out).await.ok();
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            let chunk: Bytes = out.split().freeze();
            stream.write_all(&chunk).await.context("TCP write")?;
        }
        if eof {
            return Ok(());
        }
    }
}
