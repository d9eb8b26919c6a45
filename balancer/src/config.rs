//! The balancer's configuration: TOML, typed, with defaults that serve.
//!
//! Every field has a default, so an empty file (or no file) is a working
//! configuration. Unknown keys are rejected; semantic checks report every
//! problem at once, each with its path (`sip.listen[1].address`).
//!
//! ```toml
//! [[sip.listen]]
//! transport = "udp"          # "udp" or "tcp"
//! address = "127.0.0.1:5060"
//!
//! [limits]
//! max_header_bytes = 32768
//! max_body_bytes = 65536
//! max_headers = 256
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use encap_proto::frame::Transport;
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SIP listeners.
    pub sip: SipConfig,
    /// Message size and count limits.
    pub limits: LimitsConfig,
}

/// SIP side: where the balancer listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// Listening sockets. Default: UDP and TCP on `127.0.0.1:5060` (one
    /// machine; list public addresses to serve a network).
    pub listen: Vec<Listen>,
    /// `Retry-After` seconds in a 503 answered when no backend can take a
    /// request. Default: 5.
    pub retry_after_secs: u32,
}

impl Default for SipConfig {
    fn default() -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 5060));
        SipConfig {
            listen: vec![
                Listen {
                    transport: ListenTransport::Udp,
                    address: local,
                },
                Listen {
                    transport: ListenTransport::Tcp,
                    address: local,
                },
            ],
            retry_after_secs: 5,
        }
    }
}

/// One SIP listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// `"udp"` or `"tcp"`.
    pub transport: ListenTransport,
    /// IPv4 or IPv6 address and port, e.g. `"0.0.0.0:5060"` or `"[::]:5060"`.
    pub address: SocketAddr,
}

/// The transports a listener can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenTransport {
    /// SIP over UDP.
    Udp,
    /// SIP over TCP.
    Tcp,
}

impl ListenTransport {
    /// The wire transport.
    pub fn transport(self) -> Transport {
        match self {
            ListenTransport::Udp => Transport::Udp,
            ListenTransport::Tcp => Transport::Tcp,
        }
    }
}

/// Limits on SIP messages (design.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest header section in bytes. Default: 32768.
    pub max_header_bytes: usize,
    /// Largest body in bytes. Default: 65536.
    pub max_body_bytes: usize,
    /// Most header fields in one message. Default: 256.
    pub max_headers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = encap_proto::sip::Limits::default();
        LimitsConfig {
            max_header_bytes: l.max_header_bytes,
            max_body_bytes: l.max_body_bytes,
            max_headers: l.max_headers,
        }
    }
}

impl LimitsConfig {
    /// The limits as the SIP framer and scanner take them.
    pub fn sip_limits(&self) -> encap_proto::sip::Limits {
        encap_proto::sip::Limits {
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body_bytes,
            max_headers: self.max_headers,
        }
    }
}

/// Every problem found in a configuration, each with its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// `(path, problem)` pairs, in file order.
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} problem(s) in the configuration:",
            self.problems.len()
        )?;
        for (path, problem) in &self.problems {
            writeln!(f, "  {path}: {problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses and checks a configuration text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![(
                e.span()
                    .map(|s| format!("line {}", line_of(text, s.start)))
                    .unwrap_or_else(|| "config".to_owned()),
                e.message().to_owned(),
            )],
        })?;
        config.check()?;
        Ok(config)
    }

    /// Reads, parses and checks a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![(path.display().to_string(), format!("cannot read: {e}"))],
        })?;
        Config::from_toml(&text).map_err(|mut e| {
            for (p, _) in &mut e.problems {
                *p = format!("{}: {p}", path.display());
            }
            e
        })
    }

    /// Semantic checks, every problem at once.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.sip.listen.is_empty() {
            problems.push((
                "sip.listen".to_owned(),
                "at least one listener is needed".to_owned(),
            ));
        }
        for (i, l) in self.sip.listen.iter().enumerate() {
            if l.address.port() == 0 {
                problems.push((
                    format!("sip.listen[{i}].address"),
                    "port 0 is not a SIP port".to_owned(),
                ));
            }
            if self.sip.listen[..i].contains(l) {
                problems.push((format!("sip.listen[{i}]"), "listed twice".to_owned()));
            }
        }
        let limits = [
            ("limits.max_header_bytes", self.limits.max_header_bytes, 256),
            ("limits.max_body_bytes", self.limits.max_body_bytes, 0),
            ("limits.max_headers", self.limits.max_headers, 8),
        ];
        for (path, value, min) in limits {
            if value < min {
                problems.push((
                    path.to_owned(),
                    format!("{value} is below the minimum {min}"),
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_and_serves_udp_and_tcp() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        let transports: Vec<_> = c
            .sip
            .listen
            .iter()
            .map(|l| l.transport.transport())
            .collect();
        assert_eq!(transports, [Transport::Udp, Transport::Tcp]);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err = Config::from_toml("[sip]\nretry_after_secs = 3\nlisten_on = []\n").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].0, "line 3");
        assert!(
            err.problems[0].1.contains("unknown field `listen_on`"),
            "{err}"
        );
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let text = r#"
            [[sip.listen]]
            transport = "udp"
            address = "127.0.0.1:0"
            [[sip.listen]]
            transport = "udp"
            address = "127.0.0.1:0"
            [limits]
            max_headers = 2
        "#;
        let err = Config::from_toml(text).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sip.listen[0].address",
                "sip.listen[1].address",
                "sip.listen[1]",
                "limits.max_headers"
            ]
        );
    }
}
