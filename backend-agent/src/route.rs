//! Where a message the backend sends must go: the next hop, per RFC 3261
//! §18.2.2 (responses) and §8.1.2 / RFC 3263 (requests). Sans-I/O: it
//! either knows the address, or says which name to resolve and how.
//!
//! * A response goes to the top Via: `received` (and `rport` if it has a
//!   value) when present, else the sent-by host and port (5060, or 5061 for
//!   TLS). A sent-by that is a name is resolved: A/AAAA when a port is
//!   given, else SRV first (RFC 3263 §5).
//! * A request goes to the top Route URI if there is one (loose routing),
//!   else to the Request-URI: its `maddr`, else its host; its `transport`
//!   parameter (or `sips:`, TLS) picks the transport.

use std::net::{IpAddr, SocketAddr};

use encap_proto::frame::Transport;
use encap_proto::sip::{SipMessage, Uri, Via};

/// The next hop of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop {
    /// Known: send there.
    Addr {
        /// The transport.
        transport: Transport,
        /// The address.
        addr: SocketAddr,
    },
    /// A name to resolve (see [`crate::resolve`]).
    Resolve {
        /// The transport.
        transport: Transport,
        /// The host name.
        host: String,
        /// The port, if the message gave one (then no SRV lookup).
        port: Option<u16>,
    },
}

/// Why no next hop could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The message has no Via (responses) — it cannot be answered.
    #[error("response has no Via header: no way to send it back")]
    NoVia,
    /// The transport token of the Via or URI is one we do not speak.
    #[error("unsupported transport `{0}` in the {1}")]
    UnsupportedTransport(String, &'static str),
    /// A `received` parameter that is not an IP address.
    #[error("Via received parameter `{0}` is not an IP address")]
    BadReceived(String),
    /// The request has neither a usable Route nor a SIP Request-URI.
    #[error("request has no SIP or SIPS Request-URI or Route to send it to")]
    NoTarget,
}

fn ip_of(host: &[u8]) -> Option<IpAddr> {
    let host = host
        .strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .unwrap_or(host);
    std::str::from_utf8(host).ok()?.parse().ok()
}

/// The next hop of a response, from its top Via.
pub fn response_next_hop(via: &Via<'_>) -> Result<NextHop, RouteError> {
    let transport = Transport::from_via_token(via.transport).ok_or_else(|| {
        RouteError::UnsupportedTransport(String::from_utf8_lossy(via.transport).into_owned(), "Via")
    })?;
    let sent_by_port = via.port.unwrap_or(transport.default_port());
    if let Some(received) = via.received {
        let ip = ip_of(received).ok_or_else(|| {
            RouteError::BadReceived(String::from_utf8_lossy(received).into_owned())
        })?;
        let port = match via.rport {
            Some(Some(port)) => port,
            _ => sent_by_port,
        };
        return Ok(NextHop::Addr {
            transport,
            addr: SocketAddr::new(ip, port),
        });
    }
    if let Some(ip) = ip_of(via.host) {
        return Ok(NextHop::Addr {
            transport,
            addr: SocketAddr::new(ip, sent_by_port),
        });
    }
    Ok(NextHop::Resolve {
        transport,
        host: String::from_utf8_lossy(via.host).into_owned(),
        port: via.port,
    })
}

/// The next hop of a request: top Route, else Request-URI.
pub fn request_next_hop(msg: &SipMessage) -> Result<NextHop, RouteError> {
    let route = msg.top_route();
    let uri = match &route {
        Some(r) => r.uri,
        None => msg.request_uri().ok_or(RouteError::NoTarget)?,
    };
    uri_next_hop(&uri)
}

/// The next hop a SIP or SIPS URI names.
pub fn uri_next_hop(uri: &Uri<'_>) -> Result<NextHop, RouteError> {
    let secure = uri.scheme.eq_ignore_ascii_case(b"sips");
    if !secure && !uri.scheme.eq_ignore_ascii_case(b"sip") {
        return Err(RouteError::NoTarget);
    }
    let transport = match uri.param("transport") {
        Some(Some(t)) => Transport::from_via_token(t).ok_or_else(|| {
            RouteError::UnsupportedTransport(
                String::from_utf8_lossy(t).into_owned(),
                "URI transport parameter",
            )
        })?,
        _ if secure => Transport::Tls,
        _ => Transport::Udp,
    };
    let host = match uri.param("maddr") {
        Some(Some(maddr)) => maddr,
        _ => uri.host,
    };
    if let Some(ip) = ip_of(host) {
        let port = uri.port.unwrap_or(transport.default_port());
        return Ok(NextHop::Addr {
            transport,
            addr: SocketAddr::new(ip, port),
        });
    }
    Ok(NextHop::Resolve {
        transport,
        host: String::from_utf8_lossy(host).into_owned(),
        port: uri.port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(text: &str) -> SipMessage {
        SipMessage::parse(Bytes::copy_from_slice(text.as_bytes()))
            .unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn resp(via: &str) -> NextHop {
        let m = msg(&format!(
            "SIP/2.0 200 OK\r\nVia: {via}\r\nCall-ID: c\r\nContent-Length: 0\r\n\r\n"
        ));
        response_next_hop(&m.top_via().unwrap_or_else(|| panic!("no via")))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr(t: Transport, s: &str) -> NextHop {
        NextHop::Addr {
            transport: t,
            addr: s.parse().unwrap_or_else(|_| panic!("{s}")),
        }
    }

    #[test]
    fn responses_go_to_received_and_rport_first() {
        assert_eq!(
            resp("SIP/2.0/UDP pc33.example.com;branch=z9hG4bK1;received=192.0.2.4;rport=6000"),
            addr(Transport::Udp, "192.0.2.4:6000")
        );
        assert_eq!(
            resp("SIP/2.0/TCP pc33.example.com:5070;branch=z9hG4bK1;received=192.0.2.4"),
            addr(Transport::Tcp, "192.0.2.4:5070")
        );
        assert_eq!(
            resp("SIP/2.0/TLS pc33.example.com;branch=z9hG4bK1;received=192.0.2.4;rport"),
            addr(Transport::Tls, "192.0.2.4:5061")
        );
        assert_eq!(
            resp("SIP/2.0/UDP [2001:db8::9]:5062;branch=z9hG4bK1;received=2001:db8::10"),
            addr(Transport::Udp, "[2001:db8::10]:5062")
        );
    }

    #[test]
    fn responses_without_received_use_the_sent_by() {
        assert_eq!(
            resp("SIP/2.0/UDP 192.0.2.4;branch=z9hG4bK1"),
            addr(Transport::Udp, "192.0.2.4:5060")
        );
        assert_eq!(
            resp("SIP/2.0/TCP [2001:db8::9]:5070;branch=z9hG4bK1"),
            addr(Transport::Tcp, "[2001:db8::9]:5070")
        );
        assert_eq!(
            resp("SIP/2.0/UDP proxy.example.com;branch=z9hG4bK1"),
            NextHop::Resolve {
                transport: Transport::Udp,
                host: "proxy.example.com".into(),
                port: None
            }
        );
        assert_eq!(
            resp("SIP/2.0/TCP proxy.example.com:5080;branch=z9hG4bK1"),
            NextHop::Resolve {
                transport: Transport::Tcp,
                host: "proxy.example.com".into(),
                port: Some(5080)
            }
        );
    }

    #[test]
    fn a_bad_received_is_an_error_naming_it() {
        let m = msg("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1;received=nonsense\r\nContent-Length: 0\r\n\r\n");
        let err = response_next_hop(&m.top_via().unwrap_or_else(|| panic!())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Via received parameter `nonsense` is not an IP address"
        );
    }

    fn req(start: &str, extra: &str) -> NextHop {
        let m = msg(&format!(
            "{start}\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n{extra}Call-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ));
        request_next_hop(&m).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn requests_follow_the_route_then_the_request_uri() {
        assert_eq!(
            req("INVITE sip:bob@192.0.2.20:5070 SIP/2.0", ""),
            addr(Transport::Udp, "192.0.2.20:5070")
        );
        assert_eq!(
            req("INVITE sip:bob@192.0.2.20;transport=tcp SIP/2.0", ""),
            addr(Transport::Tcp, "192.0.2.20:5060")
        );
        assert_eq!(
            req("INVITE sips:bob@192.0.2.20 SIP/2.0", ""),
            addr(Transport::Tls, "192.0.2.20:5061")
        );
        assert_eq!(
            req(
                "BYE sip:bob@192.0.2.20 SIP/2.0",
                "Route: <sip:192.0.2.30:5090;lr;transport=tcp>\r\n"
            ),
            addr(Transport::Tcp, "192.0.2.30:5090")
        );
        assert_eq!(
            req("INVITE sip:bob@example.com;maddr=192.0.2.40 SIP/2.0", ""),
            addr(Transport::Udp, "192.0.2.40:5060")
        );
        assert_eq!(
            req("INVITE sip:bob@[2001:db8::1]:5062 SIP/2.0", ""),
            addr(Transport::Udp, "[2001:db8::1]:5062")
        );
        assert_eq!(
            req("INVITE sip:bob@example.com SIP/2.0", ""),
            NextHop::Resolve {
                transport: Transport::Udp,
                host: "example.com".into(),
                port: None
            }
        );
    }
}
