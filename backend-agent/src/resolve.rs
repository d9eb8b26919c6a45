//! Resolving a [`NextHop`] name to an address: RFC 3263 §5 for SIP.
//!
//! A name with a port is looked up as A/AAAA; a name without one is
//! looked up as SRV first (`_sip._udp`, `_sip._tcp`, `_sips._tcp`), the
//! lowest priority target taken, then its A/AAAA; no SRV record: A/AAAA
//! at the transport's default port. Uses hickory-resolver: the system's
//! configuration by default, or the name servers the caller gives (tests
//! use a local one; nothing here reaches the internet by itself).

use std::net::SocketAddr;

use encap_proto::frame::Transport;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use crate::route::NextHop;

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The system resolver configuration could not be read
    /// (`/etc/resolv.conf`); pass name servers explicitly.
    #[error("cannot read the system DNS configuration: {0}")]
    SystemConfig(String),
    /// The name has no usable record.
    #[error("`{host}` did not resolve ({what}): {reason}")]
    NoAddress {
        /// The name.
        host: String,
        /// What was asked (SRV, A/AAAA).
        what: &'static str,
        /// The resolver's answer.
        reason: String,
    },
}

/// A DNS resolver for next hops.
#[derive(Debug, Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// The system's resolver configuration (`/etc/resolv.conf`).
    pub fn system() -> Result<Resolver, ResolveError> {
        let builder = TokioResolver::builder_tokio()
            .map_err(|e| ResolveError::SystemConfig(e.to_string()))?;
        Ok(Resolver {
            inner: builder.build(),
        })
    }

    /// A resolver asking only `servers` (UDP), e.g. a local DNS server.
    pub fn with_name_servers(servers: &[SocketAddr]) -> Resolver {
        let mut config = ResolverConfig::new();
        for &addr in servers {
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
        }
        let inner =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default()).build();
        Resolver { inner }
    }

    /// The address to send to.
    pub async fn resolve(&self, hop: &NextHop) -> Result<(Transport, SocketAddr), ResolveError> {
        match hop {
            NextHop::Addr { transport, addr } => Ok((*transport, *addr)),
            NextHop::Resolve {
                transport,
                host,
                port: Some(port),
            } => Ok((*transport, SocketAddr::new(self.ip(host).await?, *port))),
            NextHop::Resolve {
                transport,
                host,
                port: None,
            } => {
                let service = match transport {
                    Transport::Tls => "_sips._tcp",
                    Transport::Udp => "_sip._udp",
                    _ => "_sip._tcp",
                };
                let fqdn = format!("{service}.{}.", host.trim_end_matches('.'));
                if let Ok(srv) = self.inner.srv_lookup(fqdn.as_str()).await {
                    // Lowest priority first; among equals, the highest weight
                    // (a deterministic stand-in for RFC 2782's weighted pick).
                    if let Some(best) = srv
                        .iter()
                        .min_by_key(|r| (r.priority(), std::cmp::Reverse(r.weight())))
                    {
                        let target = best.target().to_utf8();
                        let ip = self.ip(&target).await?;
                        return Ok((*transport, SocketAddr::new(ip, best.port())));
                    }
                }
                Ok((
                    *transport,
                    SocketAddr::new(self.ip(host).await?, transport.default_port()),
                ))
            }
        }
    }

    async fn ip(&self, host: &str) -> Result<std::net::IpAddr, ResolveError> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let lookup =
            self.inner
                .lookup_ip(fqdn.as_str())
                .await
                .map_err(|e| ResolveError::NoAddress {
                    host: host.to_owned(),
                    what: "A/AAAA",
                    reason: e.to_string(),
                })?;
        lookup.iter().next().ok_or_else(|| ResolveError::NoAddress {
            host: host.to_owned(),
            what: "A/AAAA",
            reason: "no address in the answer".to_owned(),
        })
    }
}
