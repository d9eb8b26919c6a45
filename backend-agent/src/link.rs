//! One balancer link, as a sans-I/O state machine.
//!
//! The agent dials a balancer, authenticates (HELLO / CHALLENGE / AUTH /
//! WELCOME, see `encap-proto/SPEC.md`), then exchanges SIP frames, sends a
//! LOAD report every interval the balancer asked for, pings when nothing
//! else went out, and gives up on a balancer that stays silent.
//!
//! # Driving contract
//!
//! ```
//! use std::time::{Duration, Instant};
//! use backend_agent::link::{Link, LinkConfig, LinkEvent};
//! use encap_proto::frame::{auth::BalancerHandshake, auth::BalancerStep, LoadReport};
//!
//! let now = Instant::now();
//! let mut link = Link::new(now, LinkConfig::new("b1", b"secret"), [7; 16]);
//! // The driver writes every frame the link wants sent...
//! let hello = link.poll_transmit().unwrap();
//! // ...feeds every frame read (here: a balancer played in-process)...
//! let mut lb = BalancerHandshake::new(b"secret", "lb", [9; 16]);
//! let BalancerStep::Send(challenge) = lb.handle(hello).unwrap() else { panic!() };
//! link.handle_frame(now, challenge);
//! let auth = link.poll_transmit().unwrap(); // written in link.version()
//! lb.handle(auth).unwrap();
//! link.handle_frame(now, lb.welcome(3, 500, 1 << 20, vec![]).unwrap());
//! assert!(matches!(link.poll_event(), Some(LinkEvent::Established { backend_id: 3, .. })));
//! // ...and calls handle_timeout when poll_timeout is due.
//! let due = link.poll_timeout().unwrap();
//! assert_eq!(due, now + Duration::from_millis(500));
//! link.handle_timeout(due, &LoadReport::default());
//! assert!(matches!(link.poll_transmit(), Some(encap_proto::frame::Frame::Load(_))));
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use encap_proto::frame::auth::{AgentHandshake, AgentStep, HandshakeError};
use encap_proto::frame::{
    Close, Code, DrainState, Frame, LoadReport, PublicAddress, SipFromBackend, SipToBackend,
    Welcome, NONCE_LEN, PROTOCOL_VERSION,
};

/// Settings of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The agent's name, unique in the cluster.
    pub name: String,
    /// The cluster secret.
    pub secret: Vec<u8>,
    /// How long the handshake may take. Default: 5 s.
    pub handshake_timeout: Duration,
    /// Reports the balancer may miss before the agent sends a PING, and
    /// the silence after which the agent gives the link up: this many
    /// report intervals without any frame from the balancer. Default: 6.
    pub silence_periods: u32,
}

impl LinkConfig {
    /// Settings with the defaults.
    pub fn new(name: &str, secret: &[u8]) -> LinkConfig {
        LinkConfig {
            name: name.to_owned(),
            secret: secret.to_vec(),
            handshake_timeout: Duration::from_secs(5),
            silence_periods: 6,
        }
    }
}

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Authentication or version negotiation failed. Check that the agent
    /// and the balancer share the cluster secret.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The handshake did not finish in time: is this address a Viaduct
    /// balancer's agent port?
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The balancer sent nothing for too long; the driver reconnects.
    #[error("balancer silent for {0:?}")]
    Silent(Duration),
    /// The balancer closed the link (GOODBYE or ERROR), saying why.
    #[error("balancer closed the link ({code}): {reason}")]
    ClosedByBalancer {
        /// Its code.
        code: Code,
        /// Its reason.
        reason: String,
    },
    /// The balancer sent a frame the agent never expects from it.
    #[error("balancer sent an unexpected {0} frame")]
    Unexpected(String),
    /// SIP was handed to the link before it was established.
    #[error("the link to this balancer is not established yet")]
    NotEstablished,
}

/// What happened on the link, for the application or the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Authenticated and welcomed.
    Established {
        /// Our backend id at this balancer (the id our tags carry).
        backend_id: u16,
        /// The balancer's public SIP addresses.
        addresses: Vec<PublicAddress>,
    },
    /// A SIP message for this backend.
    Sip(SipToBackend),
    /// The balancer asks us to drain (an operator's request) or to serve.
    DrainRequested(DrainState),
    /// The link ended; the driver closes the socket and reconnects.
    Closed(LinkError),
}

#[derive(Debug)]
enum State {
    Handshaking {
        handshake: AgentHandshake,
        deadline: Instant,
    },
    Established {
        welcome: Welcome,
        interval: Duration,
    },
    Closed,
}

/// One balancer link.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    state: State,
    version: u8,
    transmit: VecDeque<Frame>,
    events: VecDeque<LinkEvent>,
    next_report: Option<Instant>,
    last_heard: Instant,
    ping_sent: bool,
    report_seq: u64,
}

impl Link {
    /// A link that starts its handshake: HELLO is ready to send.
    /// `nonce` must be fresh random bytes.
    pub fn new(now: Instant, config: LinkConfig, nonce: [u8; NONCE_LEN]) -> Link {
        let (handshake, hello) = AgentHandshake::start(&config.secret, &config.name, nonce);
        let deadline = now + config.handshake_timeout;
        Link {
            config,
            state: State::Handshaking {
                handshake,
                deadline,
            },
            version: PROTOCOL_VERSION,
            transmit: VecDeque::from([hello]),
            events: VecDeque::new(),
            next_report: None,
            last_heard: now,
            ping_sent: false,
            report_seq: 0,
        }
    }

    /// The protocol version frames are written and read in now.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Our backend id at this balancer, once established.
    pub fn backend_id(&self) -> Option<u16> {
        match &self.state {
            State::Established { welcome, .. } => Some(welcome.backend_id),
            _ => None,
        }
    }

    /// The balancer's welcome, once established.
    pub fn welcome(&self) -> Option<&Welcome> {
        match &self.state {
            State::Established { welcome, .. } => Some(welcome),
            _ => None,
        }
    }

    /// Whether SIP can be sent.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established { .. })
    }

    /// Whether the link ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The next frame to write, until `None`.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next event, until `None`.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Handshaking { deadline, .. } => Some(*deadline),
            State::Established { interval, .. } => {
                let silence = self.last_heard + *interval * self.config.silence_periods;
                Some(self.next_report.map_or(silence, |r| r.min(silence)))
            }
            State::Closed => None,
        }
    }

    fn close(&mut self, error: LinkError) {
        if !self.is_closed() {
            self.state = State::Closed;
            self.next_report = None;
            self.events.push_back(LinkEvent::Closed(error));
        }
    }

    /// A frame arrived from the balancer.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        self.last_heard = now;
        self.ping_sent = false;
        match &mut self.state {
            State::Handshaking { handshake, .. } => {
                if let Frame::Challenge(c) = &frame {
                    // AUTH and everything after it speak the chosen version.
                    self.version = c.version;
                }
                match handshake.handle(frame) {
                    Ok(AgentStep::Send(f)) => self.transmit.push_back(f),
                    Ok(AgentStep::Welcomed { welcome, version }) => {
                        self.version = version;
                        let interval =
                            Duration::from_millis(u64::from(welcome.report_interval_ms.max(50)));
                        self.events.push_back(LinkEvent::Established {
                            backend_id: welcome.backend_id,
                            addresses: welcome.addresses.clone(),
                        });
                        self.next_report = Some(now + interval);
                        self.state = State::Established { welcome, interval };
                    }
                    Err(e) => {
                        if let Some(f) = e.to_frame() {
                            self.transmit.push_back(f);
                        }
                        self.close(LinkError::Handshake(e));
                    }
                }
            }
            State::Established { .. } => match frame {
                Frame::SipToBackend(sip) => self.events.push_back(LinkEvent::Sip(sip)),
                Frame::Ping(token) => self.transmit.push_back(Frame::Pong(token)),
                Frame::Pong(_) | Frame::Unknown { .. } => {}
                Frame::Drain(state) => self.events.push_back(LinkEvent::DrainRequested(state)),
                Frame::Goodbye(c) | Frame::Error(c) => self.close(LinkError::ClosedByBalancer {
                    code: c.code,
                    reason: c.reason,
                }),
                other => {
                    let name = other.frame_type().to_string();
                    self.transmit.push_back(Frame::Error(Close {
                        code: Code::UNEXPECTED_FRAME,
                        reason: format!("{name} frame not expected by an agent"),
                    }));
                    self.close(LinkError::Unexpected(name));
                }
            },
            State::Closed => {}
        }
    }

    /// Time passed: send the LOAD report when due (`load` without its
    /// sequence number; the link numbers reports), ping a quiet balancer,
    /// give up a silent one or a handshake that takes too long.
    pub fn handle_timeout(&mut self, now: Instant, load: &LoadReport) {
        match &self.state {
            State::Handshaking { deadline, .. } => {
                if now >= *deadline {
                    let timeout = self.config.handshake_timeout;
                    self.close(LinkError::HandshakeTimeout(timeout));
                }
            }
            State::Established { interval, .. } => {
                let interval = *interval;
                let silent_for = now.saturating_duration_since(self.last_heard);
                if silent_for >= interval * self.config.silence_periods {
                    self.close(LinkError::Silent(silent_for));
                    return;
                }
                if silent_for >= interval * (self.config.silence_periods / 2) && !self.ping_sent {
                    self.ping_sent = true;
                    self.transmit.push_back(Frame::Ping(self.report_seq));
                }
                if self.next_report.is_some_and(|r| now >= r) {
                    self.report_seq += 1;
                    self.transmit.push_back(Frame::Load(LoadReport {
                        seq: self.report_seq,
                        ..*load
                    }));
                    // Next report one interval after this one was due, not
                    // after now: a late wake-up does not drift the schedule.
                    let due = self.next_report.unwrap_or(now) + interval;
                    self.next_report = Some(if due <= now { now + interval } else { due });
                }
            }
            State::Closed => {}
        }
    }

    /// Queues a SIP message for the balancer.
    pub fn send_sip(&mut self, sip: SipFromBackend) -> Result<(), LinkError> {
        if !self.is_established() {
            return Err(LinkError::NotEstablished);
        }
        self.transmit.push_back(Frame::SipFromBackend(sip));
        Ok(())
    }

    /// Tells the balancer our drain state.
    pub fn set_drain(&mut self, state: DrainState) {
        if self.is_established() {
            self.transmit.push_back(Frame::Drain(state));
        }
    }

    /// Ends the link in order (GOODBYE).
    pub fn goodbye(&mut self, reason: &str) {
        if !self.is_closed() {
            self.transmit.push_back(Frame::Goodbye(Close {
                code: Code::SHUTTING_DOWN,
                reason: reason.to_owned(),
            }));
            self.state = State::Closed;
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick the origin of time
mod tests {
    use super::*;
    use encap_proto::frame::auth::{BalancerHandshake, BalancerStep};

    fn established(now: Instant) -> Link {
        let mut link = Link::new(now, LinkConfig::new("b1", b"s"), [1; NONCE_LEN]);
        let mut lb = BalancerHandshake::new(b"s", "lb", [2; NONCE_LEN]);
        let Some(hello) = link.poll_transmit() else {
            panic!("no HELLO")
        };
        let Ok(BalancerStep::Send(challenge)) = lb.handle(hello) else {
            panic!("no CHALLENGE")
        };
        link.handle_frame(now, challenge);
        let Some(auth) = link.poll_transmit() else {
            panic!("no AUTH")
        };
        assert!(lb.handle(auth).is_ok());
        link.handle_frame(
            now,
            lb.welcome(4, 500, 1 << 20, vec![])
                .unwrap_or(Frame::Ping(0)),
        );
        assert!(matches!(
            link.poll_event(),
            Some(LinkEvent::Established { backend_id: 4, .. })
        ));
        link
    }

    #[test]
    fn reports_every_interval_with_increasing_numbers() {
        let t0 = Instant::now();
        let mut link = established(t0);
        let load = LoadReport {
            active_calls: 7,
            ..LoadReport::default()
        };
        let mut seqs = vec![];
        for ms in [499, 500, 750, 1000, 1700] {
            let now = t0 + Duration::from_millis(ms);
            link.handle_frame(now, Frame::Pong(0)); // the balancer is alive
            link.handle_timeout(now, &load);
            while let Some(f) = link.poll_transmit() {
                if let Frame::Load(r) = f {
                    assert_eq!(r.active_calls, 7);
                    seqs.push((ms, r.seq));
                }
            }
        }
        // Due at 500, 1000, 1500 (sent late at 1700), next due 2000.
        assert_eq!(seqs, [(500, 1), (1000, 2), (1700, 3)]);
        assert_eq!(link.poll_timeout(), Some(t0 + Duration::from_millis(2000)));
    }

    #[test]
    fn a_silent_balancer_is_pinged_then_given_up() {
        let t0 = Instant::now();
        let mut link = established(t0);
        let load = LoadReport::default();
        link.handle_timeout(t0 + Duration::from_millis(1500), &load);
        let frames: Vec<Frame> = std::iter::from_fn(|| link.poll_transmit()).collect();
        assert!(
            frames.iter().any(|f| matches!(f, Frame::Ping(_))),
            "{frames:?}"
        );
        link.handle_timeout(t0 + Duration::from_millis(3000), &load);
        assert!(matches!(
            link.poll_event(),
            Some(LinkEvent::Closed(LinkError::Silent(_)))
        ));
        assert!(link.is_closed());
    }

    #[test]
    fn a_slow_handshake_times_out() {
        let t0 = Instant::now();
        let mut link = Link::new(t0, LinkConfig::new("b1", b"s"), [1; NONCE_LEN]);
        link.handle_timeout(t0 + Duration::from_secs(5), &LoadReport::default());
        assert!(matches!(
            link.poll_event(),
            Some(LinkEvent::Closed(LinkError::HandshakeTimeout(_)))
        ));
    }

    #[test]
    fn a_refusal_ends_the_link_with_the_balancers_reason() {
        let t0 = Instant::now();
        let mut link = Link::new(t0, LinkConfig::new("b1", b"s"), [1; NONCE_LEN]);
        link.handle_frame(
            t0,
            Frame::Refuse(encap_proto::frame::Refuse {
                code: Code::AUTH_FAILED,
                reason: "bad mac".into(),
            }),
        );
        let Some(LinkEvent::Closed(LinkError::Handshake(HandshakeError::Refused { code, reason }))) =
            link.poll_event()
        else {
            panic!("expected a refusal")
        };
        assert_eq!((code, reason.as_str()), (Code::AUTH_FAILED, "bad mac"));
    }

    #[test]
    fn sip_waits_for_the_handshake() {
        let t0 = Instant::now();
        let mut link = Link::new(t0, LinkConfig::new("b1", b"s"), [1; NONCE_LEN]);
        let sip = SipFromBackend {
            connection: None,
            transport: encap_proto::frame::Transport::Udp,
            next_hop: "127.0.0.1:5060".parse().unwrap_or_else(|_| unreachable!()),
            message: bytes::Bytes::new(),
        };
        assert_eq!(link.send_sip(sip.clone()), Err(LinkError::NotEstablished));
        let mut link = established(t0);
        assert_eq!(link.send_sip(sip), Ok(()));
    }
}
