//! The frames and the values they carry.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;

/// Length of a handshake nonce, in bytes.
pub const NONCE_LEN: usize = 16;
/// Length of a handshake MAC (HMAC-SHA-256), in bytes.
pub const MAC_LEN: usize = 32;

/// The SIP transport a message arrived on or must leave by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// UDP (RFC 3261 §18).
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// SCTP (RFC 4168).
    Sctp,
    /// WebSocket (RFC 7118).
    Ws,
    /// Secure WebSocket (RFC 7118).
    Wss,
}

impl Transport {
    /// Every transport, in wire-code order.
    pub const ALL: [Transport; 6] = [
        Transport::Udp,
        Transport::Tcp,
        Transport::Tls,
        Transport::Sctp,
        Transport::Ws,
        Transport::Wss,
    ];

    /// The code on the wire (SPEC.md §2).
    pub const fn code(self) -> u8 {
        match self {
            Transport::Udp => 1,
            Transport::Tcp => 2,
            Transport::Tls => 3,
            Transport::Sctp => 4,
            Transport::Ws => 5,
            Transport::Wss => 6,
        }
    }

    /// The transport with this wire code, if any.
    pub const fn from_code(code: u8) -> Option<Transport> {
        Some(match code {
            1 => Transport::Udp,
            2 => Transport::Tcp,
            3 => Transport::Tls,
            4 => Transport::Sctp,
            5 => Transport::Ws,
            6 => Transport::Wss,
            _ => return None,
        })
    }

    /// The token SIP writes in a Via header (`UDP`, `TCP`, `TLS`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Sctp => "SCTP",
            Transport::Ws => "WS",
            Transport::Wss => "WSS",
        }
    }

    /// The transport named by a Via token, compared case-insensitively.
    pub fn from_via_token(token: &[u8]) -> Option<Transport> {
        Transport::ALL
            .into_iter()
            .find(|t| t.as_str().as_bytes().eq_ignore_ascii_case(token))
    }

    /// Whether messages on this transport are framed by a stream (RFC 3261 §18.3).
    pub const fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The default port of this transport (RFC 3261 §19.1.2, RFC 7118).
    pub const fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            Transport::Ws => 80,
            Transport::Wss => 443,
            Transport::Udp | Transport::Tcp | Transport::Sctp => 5060,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame type code (SPEC.md §4). Unknown codes are kept, not rejected.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Agent → balancer: versions, name, nonce.
    pub const HELLO: FrameType = FrameType(0x01);
    /// Balancer → agent: chosen version, name, nonce.
    pub const CHALLENGE: FrameType = FrameType(0x02);
    /// Agent → balancer: the agent's MAC.
    pub const AUTH: FrameType = FrameType(0x03);
    /// Balancer → agent: accepted; backend id and the balancer's MAC.
    pub const WELCOME: FrameType = FrameType(0x04);
    /// Balancer → agent: refused, with a code and a reason.
    pub const REFUSE: FrameType = FrameType(0x05);
    /// Balancer → agent: a SIP message and where it came from.
    pub const SIP_TO_BACKEND: FrameType = FrameType(0x10);
    /// Agent → balancer: a SIP message and where it must go.
    pub const SIP_FROM_BACKEND: FrameType = FrameType(0x11);
    /// Agent → balancer: load report and heartbeat.
    pub const LOAD: FrameType = FrameType(0x20);
    /// Both: drain state.
    pub const DRAIN: FrameType = FrameType(0x21);
    /// Both: keep-alive request.
    pub const PING: FrameType = FrameType(0x30);
    /// Both: keep-alive answer.
    pub const PONG: FrameType = FrameType(0x31);
    /// Both: orderly close.
    pub const GOODBYE: FrameType = FrameType(0x3e);
    /// Both: protocol error, then close.
    pub const ERROR: FrameType = FrameType(0x3f);

    /// The frame's name as SPEC.md writes it, or `None` for an unknown type.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "HELLO",
            0x02 => "CHALLENGE",
            0x03 => "AUTH",
            0x04 => "WELCOME",
            0x05 => "REFUSE",
            0x10 => "SIP_TO_BACKEND",
            0x11 => "SIP_FROM_BACKEND",
            0x20 => "LOAD",
            0x21 => "DRAIN",
            0x30 => "PING",
            0x31 => "PONG",
            0x3e => "GOODBYE",
            0x3f => "ERROR",
            _ => return None,
        })
    }

    /// Whether the type is reserved and may never be sent (`0x00`, `0xff`).
    pub const fn is_reserved(self) -> bool {
        matches!(self.0, 0x00 | 0xff)
    }
}

impl fmt::Debug for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "type {:#04x}", self.0),
        }
    }
}

/// A close, refusal or error code (SPEC.md §4). Unknown codes are kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u16);

impl Code {
    /// Orderly close.
    pub const NORMAL: Code = Code(0);
    /// A frame could not be decoded.
    pub const MALFORMED_FRAME: Code = Code(1);
    /// No common version, or a frame in another version.
    pub const UNSUPPORTED_VERSION: Code = Code(2);
    /// Body length above the receiver's maximum.
    pub const FRAME_TOO_LARGE: Code = Code(3);
    /// The MAC did not verify.
    pub const AUTH_FAILED: Code = Code(4);
    /// A frame not allowed in this state.
    pub const UNEXPECTED_FRAME: Code = Code(5);
    /// An agent with this name is already connected.
    pub const DUPLICATE_AGENT: Code = Code(6);
    /// The sender is going away.
    pub const SHUTTING_DOWN: Code = Code(7);
    /// The peer was silent for too long.
    pub const TIMEOUT: Code = Code(8);

    /// The code's name as SPEC.md writes it, or `None` for an unknown code.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "NORMAL",
            1 => "MALFORMED_FRAME",
            2 => "UNSUPPORTED_VERSION",
            3 => "FRAME_TOO_LARGE",
            4 => "AUTH_FAILED",
            5 => "UNEXPECTED_FRAME",
            6 => "DUPLICATE_AGENT",
            7 => "SHUTTING_DOWN",
            8 => "TIMEOUT",
            _ => return None,
        })
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "code {}", self.0),
        }
    }
}

/// `HELLO`: the first frame of a link, agent → balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub min_version: u8,
    /// Newest protocol version the agent speaks.
    pub max_version: u8,
    /// The agent's name (unique in the cluster, e.g. the host name).
    pub agent: String,
    /// The agent's fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// `CHALLENGE`: the balancer's answer to `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The version chosen for the rest of the link.
    pub version: u8,
    /// The balancer's name.
    pub balancer: String,
    /// The balancer's fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// A public SIP address of the balancer, for one transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicAddress {
    /// The transport this address serves.
    pub transport: Transport,
    /// IP and port the agent writes in Contact and Via.
    pub addr: SocketAddr,
}

/// `WELCOME`: the balancer accepts the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The short id this backend's affinity tags carry.
    pub backend_id: u16,
    /// The balancer's proof that it knows the secret.
    pub mac: [u8; MAC_LEN],
    /// How often the agent must send `LOAD`, in milliseconds.
    pub report_interval_ms: u32,
    /// The largest frame body the balancer accepts.
    pub max_frame_body: u32,
    /// The balancer's public SIP addresses, one per transport (at most 255).
    pub addresses: Vec<PublicAddress>,
}

/// `REFUSE`: the balancer refuses the agent and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    /// Why, as a code.
    pub code: Code,
    /// Why, in words.
    pub reason: String,
}

/// `GOODBYE` and `ERROR` bodies: a code and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Why, as a code.
    pub code: Code,
    /// Why, in words (names the frame and field for malformed input).
    pub reason: String,
}

/// `SIP_TO_BACKEND`: a SIP message the balancer forwards to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipToBackend {
    /// The call's tag names another backend that is down (design.md §6).
    pub failover: bool,
    /// The balancer's id of the inbound connection (UDP: of the socket).
    pub connection: u64,
    /// The transport the message arrived on.
    pub transport: Transport,
    /// The sender's address.
    pub peer: SocketAddr,
    /// The balancer's address the message arrived at.
    pub local: SocketAddr,
    /// Arrival time, microseconds since the UNIX epoch.
    pub arrival_unix_us: u64,
    /// The SIP message, as it leaves the balancer.
    pub message: Bytes,
}

/// `SIP_FROM_BACKEND`: a SIP message a backend sends out through the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipFromBackend {
    /// The inbound connection this answers, if any.
    pub connection: Option<u64>,
    /// The transport to send on.
    pub transport: Transport,
    /// The resolved next hop.
    pub next_hop: SocketAddr,
    /// The bare SIP message to send.
    pub message: Bytes,
}

/// `LOAD`: load report and heartbeat, agent → balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Report number, +1 per report.
    pub seq: u64,
    /// Dialogs the agent counts as active.
    pub active_calls: u32,
    /// Process CPU over the last interval, per mille of the usable cores (0..=1000).
    pub cpu_permille: u16,
    /// Capacity weight set by the application.
    pub capacity: u32,
    /// Application score, 0 idle ..= 10000 full, if the application set one.
    pub score: Option<u16>,
    /// SIP messages received from all balancers since the agent started.
    pub msgs_in: u64,
    /// SIP messages sent to all balancers since the agent started.
    pub msgs_out: u64,
    /// SIP payload bytes received since the agent started.
    pub bytes_in: u64,
    /// SIP payload bytes sent since the agent started.
    pub bytes_out: u64,
}

/// `DRAIN`: a backend's drain state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainState {
    /// Takes new calls.
    Serving,
    /// Takes no new calls, keeps its dialogs.
    Draining,
    /// Draining and holds no call any more.
    Drained,
}

impl DrainState {
    pub(crate) const fn code(self) -> u8 {
        match self {
            DrainState::Serving => 0,
            DrainState::Draining => 1,
            DrainState::Drained => 2,
        }
    }

    pub(crate) const fn from_code(code: u8) -> Option<DrainState> {
        Some(match code {
            0 => DrainState::Serving,
            1 => DrainState::Draining,
            2 => DrainState::Drained,
            _ => return None,
        })
    }
}

/// One encapsulation frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `HELLO` (0x01).
    Hello(Hello),
    /// `CHALLENGE` (0x02).
    Challenge(Challenge),
    /// `AUTH` (0x03): the agent's MAC.
    Auth([u8; MAC_LEN]),
    /// `WELCOME` (0x04).
    Welcome(Welcome),
    /// `REFUSE` (0x05).
    Refuse(Refuse),
    /// `SIP_TO_BACKEND` (0x10).
    SipToBackend(SipToBackend),
    /// `SIP_FROM_BACKEND` (0x11).
    SipFromBackend(SipFromBackend),
    /// `LOAD` (0x20).
    Load(LoadReport),
    /// `DRAIN` (0x21).
    Drain(DrainState),
    /// `PING` (0x30) with its token.
    Ping(u64),
    /// `PONG` (0x31) with the ping's token.
    Pong(u64),
    /// `GOODBYE` (0x3e).
    Goodbye(Close),
    /// `ERROR` (0x3f).
    Error(Close),
    /// A frame of a type this version does not know, skipped by its length
    /// (SPEC.md §5). Kept so the receiver can count it.
    Unknown {
        /// Its type code.
        frame_type: FrameType,
        /// Its body, unread.
        body: Bytes,
    },
}

impl Frame {
    /// This frame's type code.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Challenge(_) => FrameType::CHALLENGE,
            Frame::Auth(_) => FrameType::AUTH,
            Frame::Welcome(_) => FrameType::WELCOME,
            Frame::Refuse(_) => FrameType::REFUSE,
            Frame::SipToBackend(_) => FrameType::SIP_TO_BACKEND,
            Frame::SipFromBackend(_) => FrameType::SIP_FROM_BACKEND,
            Frame::Load(_) => FrameType::LOAD,
            Frame::Drain(_) => FrameType::DRAIN,
            Frame::Ping(_) => FrameType::PING,
            Frame::Pong(_) => FrameType::PONG,
            Frame::Goodbye(_) => FrameType::GOODBYE,
            Frame::Error(_) => FrameType::ERROR,
            Frame::Unknown { frame_type, .. } => *frame_type,
        }
    }
}
