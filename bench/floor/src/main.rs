//! `viaduct-floor`: the cost floor of the benchmark (`bench/compare.sh`,
//! contender `floor`). It relays bytes between the SIPp client and one
//! SIPp backend without reading them, on the same runtime viaduct uses (one
//! tokio thread): what is left of a balancer's CPU per call and of its time
//! per message when all SIP work is taken away.
//!
//! * TCP: each accepted connection is joined to a new connection to the
//!   backend (`copy_bidirectional`, no-delay on both).
//! * UDP: datagrams from the backend go to the last client address seen;
//!   every other datagram goes to the backend (the benchmark has one client).
//!
//! It is a yardstick, not a SIP element: no Via, no Record-Route, no routing.

// A driver from end to end: it owns its tasks and sockets.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, info, warn};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Transport {
    Tcp,
    Udp,
}

/// Relay bytes between one client and one backend, reading none of them.
#[derive(Debug, Parser)]
#[command(name = "viaduct-floor", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The backend every message from the client goes to.
    #[arg(long)]
    to: SocketAddr,
    /// tcp or udp.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIADUCT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        match cli.transport {
            Transport::Tcp => tcp(cli.listen, cli.to).await,
            Transport::Udp => udp(cli.listen, cli.to).await,
        }
    })
}

async fn tcp(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding TCP {listen}"))?;
    info!(%listen, %to, "relaying TCP");
    loop {
        let (mut client, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let mut backend = match TcpStream::connect(to).await {
                Ok(s) => s,
                Err(e) => return warn!(%to, error = %e, "cannot connect to the backend"),
            };
            let _ = backend.set_nodelay(true);
            match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                Ok((up, down)) => debug!(%peer, up, down, "connection closed"),
                Err(e) => debug!(%peer, error = %e, "connection failed"),
            }
        });
    }
}

async fn udp(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(listen)
        .await
        .with_context(|| format!("binding UDP {listen}"))?;
    info!(%listen, %to, "relaying UDP");
    let mut buf = vec![0u8; 65_535];
    let mut client: Option<SocketAddr> = None;
    loop {
        let (n, from) = socket.recv_from(&mut buf).await.context("receiving")?;
        let dest = if from == to {
            match client {
                Some(c) => c,
                None => continue,
            }
        } else {
            client = Some(from);
            to
        };
        if let Err(e) = socket.send_to(&buf[..n], dest).await {
            debug!(%dest, error = %e, "send failed");
        }
    }
}
