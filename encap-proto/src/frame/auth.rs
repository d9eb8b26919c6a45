//! Agent authentication: challenge/response over a shared secret (SPEC.md §4).
//!
//! No secret crosses the wire. Each side proves it knows the cluster secret
//! `K` with an HMAC-SHA-256 over both nonces and the agent's name:
//!
//! ```text
//! mac_a = HMAC(K, "viaduct-v1 agent"    || nonce_a || nonce_b || u16 len || agent)
//! mac_b = HMAC(K, "viaduct-v1 balancer" || nonce_a || nonce_b || u16 len || agent)
//! ```
//!
//! [`AgentHandshake`] and [`BalancerHandshake`] are the two sides as
//! sans-I/O state machines: feed them the frames that arrive, send the
//! frames they return. Nonces come from the caller (the driver owns the
//! random source), so the machines are deterministic under test.
//!
//! ```
//! use encap_proto::frame::auth::{AgentHandshake, AgentStep, BalancerHandshake, BalancerStep};
//! use encap_proto::frame::Frame;
//!
//! let secret = b"cluster secret";
//! let (mut agent, hello) = AgentHandshake::start(secret, "b1", [1; 16]);
//! let mut balancer = BalancerHandshake::new(secret, "lb1", [2; 16]);
//! let BalancerStep::Send(challenge) = balancer.handle(hello).unwrap() else { panic!() };
//! let AgentStep::Send(auth) = agent.handle(challenge).unwrap() else { panic!() };
//! let BalancerStep::Verified { agent: name, version } = balancer.handle(auth).unwrap() else { panic!() };
//! assert_eq!((name.as_str(), version), ("b1", 1));
//! let welcome = balancer.welcome(7, 500, 1 << 20, vec![]).unwrap();
//! let AgentStep::Welcomed { welcome, version } = agent.handle(welcome).unwrap() else { panic!() };
//! assert_eq!((welcome.backend_id, version), (7, 1));
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::types::{
    Challenge, Code, Frame, Hello, PublicAddress, Refuse, Welcome, MAC_LEN, NONCE_LEN,
};
use super::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

type HmacSha256 = Hmac<Sha256>;

/// The cluster secret balancers and agents fall back to when none is
/// configured: for development on one machine only (both sides warn
/// loudly when they use it).
pub const DEVELOPMENT_SECRET: &[u8] = b"viaduct-development-secret-do-not-deploy";

const AGENT_LABEL: &[u8] = b"viaduct-v1 agent";
const BALANCER_LABEL: &[u8] = b"viaduct-v1 balancer";

fn keyed(
    secret: &[u8],
    label: &[u8],
    nonce_a: &[u8; NONCE_LEN],
    nonce_b: &[u8; NONCE_LEN],
    agent: &str,
) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(label);
    mac.update(nonce_a);
    mac.update(nonce_b);
    // Names longer than u16::MAX cannot be encoded in HELLO; clamp for the MAC.
    let len = u16::try_from(agent.len()).unwrap_or(u16::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(agent.as_bytes());
    mac
}

/// The agent's proof (`mac_a`).
pub fn agent_mac(
    secret: &[u8],
    nonce_a: &[u8; NONCE_LEN],
    nonce_b: &[u8; NONCE_LEN],
    agent: &str,
) -> [u8; MAC_LEN] {
    keyed(secret, AGENT_LABEL, nonce_a, nonce_b, agent)
        .finalize()
        .into_bytes()
        .into()
}

/// The balancer's proof (`mac_b`).
pub fn balancer_mac(
    secret: &[u8],
    nonce_a: &[u8; NONCE_LEN],
    nonce_b: &[u8; NONCE_LEN],
    agent: &str,
) -> [u8; MAC_LEN] {
    keyed(secret, BALANCER_LABEL, nonce_a, nonce_b, agent)
        .finalize()
        .into_bytes()
        .into()
}

fn verify(
    secret: &[u8],
    label: &[u8],
    nonce_a: &[u8; NONCE_LEN],
    nonce_b: &[u8; NONCE_LEN],
    agent: &str,
    mac: &[u8; MAC_LEN],
) -> bool {
    // Constant-time comparison.
    keyed(secret, label, nonce_a, nonce_b, agent)
        .verify_slice(mac)
        .is_ok()
}

/// Why a handshake failed. The link closes after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer sent a frame that is not the next step of the handshake.
    #[error("unexpected {got} frame during the handshake, expected {expected}")]
    Unexpected {
        /// The frame the handshake waited for.
        expected: &'static str,
        /// The frame that came.
        got: super::FrameType,
    },
    /// The agent and the balancer share no protocol version.
    #[error("no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {our_min}..={our_max}")]
    NoCommonVersion {
        /// The peer's oldest version.
        peer_min: u8,
        /// The peer's newest version.
        peer_max: u8,
        /// Our oldest version.
        our_min: u8,
        /// Our newest version.
        our_max: u8,
    },
    /// The peer's MAC does not verify: it does not know the cluster secret.
    #[error("authentication failed: {who}'s MAC does not verify (is the cluster secret the same on both sides?)")]
    BadMac {
        /// Which side failed to prove itself: `"agent"` or `"balancer"`.
        who: &'static str,
    },
    /// The balancer refused the agent.
    #[error("refused by the balancer ({code}): {reason}")]
    Refused {
        /// The balancer's code.
        code: Code,
        /// The balancer's reason.
        reason: String,
    },
    /// The peer closed the link with an error frame.
    #[error("peer reported an error ({code}): {reason}")]
    PeerError {
        /// The peer's code.
        code: Code,
        /// The peer's reason.
        reason: String,
    },
}

impl HandshakeError {
    /// The frame to send the peer before closing, if one is due.
    pub fn to_frame(&self) -> Option<Frame> {
        let code = match self {
            HandshakeError::Unexpected { .. } => Code::UNEXPECTED_FRAME,
            HandshakeError::NoCommonVersion { .. } => Code::UNSUPPORTED_VERSION,
            HandshakeError::BadMac { .. } => Code::AUTH_FAILED,
            HandshakeError::Refused { .. } | HandshakeError::PeerError { .. } => return None,
        };
        Some(Frame::Refuse(Refuse {
            code,
            reason: self.to_string(),
        }))
    }
}

fn peer_error(frame: Frame, expected: &'static str) -> HandshakeError {
    match frame {
        Frame::Refuse(r) => HandshakeError::Refused {
            code: r.code,
            reason: r.reason,
        },
        Frame::Error(c) | Frame::Goodbye(c) => HandshakeError::PeerError {
            code: c.code,
            reason: c.reason,
        },
        other => HandshakeError::Unexpected {
            expected,
            got: other.frame_type(),
        },
    }
}

/// What the agent does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStep {
    /// Send this frame (`AUTH`), in the version now negotiated.
    Send(Frame),
    /// The balancer accepted us and proved it knows the secret.
    Welcomed {
        /// The balancer's welcome.
        welcome: Welcome,
        /// The version the link speaks.
        version: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentState {
    AwaitChallenge,
    AwaitWelcome {
        nonce_b: [u8; NONCE_LEN],
        version: u8,
    },
    Done,
}

/// The agent's side of the handshake.
#[derive(Debug)]
pub struct AgentHandshake {
    secret: Vec<u8>,
    agent: String,
    nonce_a: [u8; NONCE_LEN],
    state: AgentState,
}

impl AgentHandshake {
    /// Starts a handshake: returns the machine and the `HELLO` to send.
    /// `nonce` must be fresh random bytes.
    pub fn start(secret: &[u8], agent: &str, nonce: [u8; NONCE_LEN]) -> (Self, Frame) {
        let hello = Frame::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent: agent.to_owned(),
            nonce,
        });
        (
            AgentHandshake {
                secret: secret.to_vec(),
                agent: agent.to_owned(),
                nonce_a: nonce,
                state: AgentState::AwaitChallenge,
            },
            hello,
        )
    }

    /// Feeds the next frame from the balancer.
    pub fn handle(&mut self, frame: Frame) -> Result<AgentStep, HandshakeError> {
        match (self.state, frame) {
            (AgentState::AwaitChallenge, Frame::Challenge(c)) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&c.version) {
                    return Err(HandshakeError::NoCommonVersion {
                        peer_min: c.version,
                        peer_max: c.version,
                        our_min: MIN_PROTOCOL_VERSION,
                        our_max: PROTOCOL_VERSION,
                    });
                }
                let mac = agent_mac(&self.secret, &self.nonce_a, &c.nonce, &self.agent);
                self.state = AgentState::AwaitWelcome {
                    nonce_b: c.nonce,
                    version: c.version,
                };
                Ok(AgentStep::Send(Frame::Auth(mac)))
            }
            (AgentState::AwaitWelcome { nonce_b, version }, Frame::Welcome(w)) => {
                if !verify(
                    &self.secret,
                    BALANCER_LABEL,
                    &self.nonce_a,
                    &nonce_b,
                    &self.agent,
                    &w.mac,
                ) {
                    return Err(HandshakeError::BadMac { who: "balancer" });
                }
                self.state = AgentState::Done;
                Ok(AgentStep::Welcomed {
                    welcome: w,
                    version,
                })
            }
            (AgentState::AwaitChallenge, other) => Err(peer_error(other, "CHALLENGE")),
            (AgentState::AwaitWelcome { .. }, other) => Err(peer_error(other, "WELCOME")),
            (AgentState::Done, other) => Err(peer_error(other, "nothing (handshake over)")),
        }
    }
}

/// What the balancer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalancerStep {
    /// Send this frame (`CHALLENGE`), then switch the link to the version it names.
    Send(Frame),
    /// The agent proved it knows the secret. Assign it a backend id and send
    /// [`BalancerHandshake::welcome`].
    Verified {
        /// The agent's name.
        agent: String,
        /// The version the link speaks.
        version: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BalancerState {
    AwaitHello,
    AwaitAuth {
        nonce_a: [u8; NONCE_LEN],
        agent: String,
        version: u8,
    },
    Verified {
        nonce_a: [u8; NONCE_LEN],
        agent: String,
    },
    Done,
}

/// The balancer's side of the handshake.
#[derive(Debug)]
pub struct BalancerHandshake {
    secret: Vec<u8>,
    balancer: String,
    nonce_b: [u8; NONCE_LEN],
    state: BalancerState,
}

impl BalancerHandshake {
    /// A handshake waiting for `HELLO`. `nonce` must be fresh random bytes.
    pub fn new(secret: &[u8], balancer: &str, nonce: [u8; NONCE_LEN]) -> Self {
        BalancerHandshake {
            secret: secret.to_vec(),
            balancer: balancer.to_owned(),
            nonce_b: nonce,
            state: BalancerState::AwaitHello,
        }
    }

    /// Feeds the next frame from the agent.
    pub fn handle(&mut self, frame: Frame) -> Result<BalancerStep, HandshakeError> {
        let state = std::mem::replace(&mut self.state, BalancerState::Done);
        match (state, frame) {
            (BalancerState::AwaitHello, Frame::Hello(h)) => {
                let version = h.max_version.min(PROTOCOL_VERSION);
                if h.min_version > h.max_version
                    || version < h.min_version.max(MIN_PROTOCOL_VERSION)
                {
                    return Err(HandshakeError::NoCommonVersion {
                        peer_min: h.min_version,
                        peer_max: h.max_version,
                        our_min: MIN_PROTOCOL_VERSION,
                        our_max: PROTOCOL_VERSION,
                    });
                }
                self.state = BalancerState::AwaitAuth {
                    nonce_a: h.nonce,
                    agent: h.agent,
                    version,
                };
                Ok(BalancerStep::Send(Frame::Challenge(Challenge {
                    version,
                    balancer: self.balancer.clone(),
                    nonce: self.nonce_b,
                })))
            }
            (
                BalancerState::AwaitAuth {
                    nonce_a,
                    agent,
                    version,
                },
                Frame::Auth(mac),
            ) => {
                if !verify(
                    &self.secret,
                    AGENT_LABEL,
                    &nonce_a,
                    &self.nonce_b,
                    &agent,
                    &mac,
                ) {
                    return Err(HandshakeError::BadMac { who: "agent" });
                }
                self.state = BalancerState::Verified {
                    nonce_a,
                    agent: agent.clone(),
                };
                Ok(BalancerStep::Verified { agent, version })
            }
            (BalancerState::AwaitHello, other) => Err(peer_error(other, "HELLO")),
            (BalancerState::AwaitAuth { .. }, other) => Err(peer_error(other, "AUTH")),
            (BalancerState::Verified { .. } | BalancerState::Done, other) => {
                Err(peer_error(other, "nothing (handshake over)"))
            }
        }
    }

    /// The `WELCOME` for a verified agent, or `None` if the agent has not
    /// been verified (or was already welcomed).
    pub fn welcome(
        &mut self,
        backend_id: u16,
        report_interval_ms: u32,
        max_frame_body: u32,
        addresses: Vec<PublicAddress>,
    ) -> Option<Frame> {
        let BalancerState::Verified { nonce_a, agent } = &self.state else {
            return None;
        };
        let mac = balancer_mac(&self.secret, nonce_a, &self.nonce_b, agent);
        self.state = BalancerState::Done;
        Some(Frame::Welcome(Welcome {
            backend_id,
            mac,
            report_interval_ms,
            max_frame_body,
            addresses,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_until_auth(
        agent_secret: &[u8],
        balancer_secret: &[u8],
    ) -> (
        AgentHandshake,
        BalancerHandshake,
        Result<BalancerStep, HandshakeError>,
    ) {
        let (mut agent, hello) = AgentHandshake::start(agent_secret, "b1", [1; NONCE_LEN]);
        let mut balancer = BalancerHandshake::new(balancer_secret, "lb", [2; NONCE_LEN]);
        let BalancerStep::Send(challenge) = balancer.handle(hello).unwrap() else {
            panic!("expected CHALLENGE")
        };
        let AgentStep::Send(auth) = agent.handle(challenge).unwrap() else {
            panic!("expected AUTH")
        };
        let step = balancer.handle(auth);
        (agent, balancer, step)
    }

    #[test]
    fn wrong_secret_is_refused_with_auth_failed() {
        let (_, _, step) = run_until_auth(b"right", b"wrong");
        let err = step.unwrap_err();
        assert_eq!(err, HandshakeError::BadMac { who: "agent" });
        let Some(Frame::Refuse(r)) = err.to_frame() else {
            panic!("expected REFUSE")
        };
        assert_eq!(r.code, Code::AUTH_FAILED);
    }

    #[test]
    fn agent_rejects_a_balancer_that_does_not_know_the_secret() {
        let (mut agent, _, step) = run_until_auth(b"s", b"s");
        assert!(matches!(step, Ok(BalancerStep::Verified { .. })));
        let forged = Frame::Welcome(Welcome {
            backend_id: 1,
            mac: [0; MAC_LEN],
            report_interval_ms: 500,
            max_frame_body: 1024,
            addresses: vec![],
        });
        assert_eq!(
            agent.handle(forged).unwrap_err(),
            HandshakeError::BadMac { who: "balancer" }
        );
    }

    #[test]
    fn the_mac_binds_the_nonces_and_the_name() {
        let base = agent_mac(b"k", &[1; 16], &[2; 16], "b1");
        assert_ne!(base, agent_mac(b"k", &[1; 16], &[3; 16], "b1"));
        assert_ne!(base, agent_mac(b"k", &[4; 16], &[2; 16], "b1"));
        assert_ne!(base, agent_mac(b"k", &[1; 16], &[2; 16], "b2"));
        assert_ne!(base, balancer_mac(b"k", &[1; 16], &[2; 16], "b1"));
    }

    #[test]
    fn welcome_only_after_verification() {
        let mut balancer = BalancerHandshake::new(b"s", "lb", [2; NONCE_LEN]);
        assert_eq!(balancer.welcome(1, 500, 1024, vec![]), None);
    }

    #[test]
    fn sip_before_auth_is_unexpected() {
        let mut balancer = BalancerHandshake::new(b"s", "lb", [2; NONCE_LEN]);
        let err = balancer.handle(Frame::Ping(1)).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::Unexpected {
                expected: "HELLO",
                ..
            }
        ));
        assert!(matches!(
            err.to_frame(),
            Some(Frame::Refuse(Refuse {
                code: Code::UNEXPECTED_FRAME,
                ..
            }))
        ));
    }

    #[test]
    fn no_common_version_is_refused() {
        let mut balancer = BalancerHandshake::new(b"s", "lb", [2; NONCE_LEN]);
        let hello = Frame::Hello(Hello {
            min_version: 5,
            max_version: 7,
            agent: "future".into(),
            nonce: [0; NONCE_LEN],
        });
        assert!(matches!(
            balancer.handle(hello),
            Err(HandshakeError::NoCommonVersion {
                peer_min: 5,
                peer_max: 7,
                ..
            })
        ));
    }
}
