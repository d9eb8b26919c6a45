//! Encapsulation frames between a balancer and its backend agents.
//!
//! The byte layout is specified in `encap-proto/SPEC.md`; this module is its
//! implementation. Every frame is an 8-byte header and a body:
//!
//! ```text
//! +---------+---------+-------------------+---------------------------+
//! | version | type    | reserved (0)      | body length (u32, BE)     |
//! | 1 byte  | 1 byte  | 2 bytes           | 4 bytes                   |
//! +---------+---------+-------------------+---------------------------+
//! | body: the fields of the type, big-endian; SIP payloads last        |
//! +--------------------------------------------------------------------+
//! ```
//!
//! * [`FrameDecoder`] / [`encode`] are the sans-I/O codec: bytes in, frames
//!   out, and back. SIP payloads are decoded as [`Bytes`] slices of the read
//!   buffer, without copying.
//! * [`FrameCodec`] adapts them to [`tokio_util::codec`].
//! * [`auth`] holds the challenge/response and the handshake state
//!   machines of both sides.
//!
//! ```
//! use bytes::BytesMut;
//! use encap_proto::frame::{encode, Frame, FrameDecoder, PROTOCOL_VERSION};
//!
//! let mut wire = BytesMut::new();
//! encode(&Frame::Ping(7), PROTOCOL_VERSION, &mut wire).unwrap();
//! let mut decoder = FrameDecoder::default();
//! assert_eq!(decoder.decode(&mut wire).unwrap(), Some(Frame::Ping(7)));
//! assert_eq!(decoder.decode(&mut wire).unwrap(), None); // need more bytes
//! ```

pub mod auth;
mod codec;
mod types;
mod wire;

pub use codec::{
    encode, CodecError, FrameCodec, FrameDecoder, FrameError, MalformedReason, DEFAULT_MAX_BODY,
    HARD_MAX_BODY, HEADER_LEN,
};
pub use types::{
    Challenge, Close, Code, DrainState, Frame, FrameType, Hello, LoadReport, PublicAddress, Refuse,
    SipFromBackend, SipToBackend, Transport, Welcome, MAC_LEN, NONCE_LEN,
};

/// The protocol version this crate writes and reads.
pub const PROTOCOL_VERSION: u8 = 1;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
