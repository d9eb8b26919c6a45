//! The sans-I/O frame codec and its tokio adapter.
//!
//! [`FrameDecoder::decode`] takes bytes from a [`BytesMut`] read buffer and
//! returns one whole frame, `Ok(None)` when more bytes are needed, or an
//! error that ends the link (SPEC.md §5, §6). It reads the 8-byte header
//! first and checks the version, the type and the body length against the
//! maximum *before* it buffers the body. A frame's body is split off the
//! buffer and frozen, so SIP payloads are slices of the read buffer.
//!
//! [`encode`] appends one frame to a write buffer.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::types::{
    Challenge, Close, Code, DrainState, Frame, FrameType, Hello, LoadReport, PublicAddress, Refuse,
    SipFromBackend, SipToBackend, Welcome, MAC_LEN, NONCE_LEN,
};
use super::wire::{addr_len, put_addr, put_str, Reader};
use super::PROTOCOL_VERSION;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// Default maximum frame body a receiver accepts: 1 MiB.
pub const DEFAULT_MAX_BODY: u32 = 1 << 20;
/// The largest maximum a receiver may configure: 16 MiB.
pub const HARD_MAX_BODY: u32 = 16 << 20;

/// The version `HELLO` is always written in (SPEC.md §3).
const HELLO_VERSION: u8 = 1;
const SIP_TO_BACKEND_FAILOVER: u8 = 0b0000_0001;
const SIP_FROM_BACKEND_HAS_CONNECTION: u8 = 0b0000_0001;
const LOAD_HAS_SCORE: u8 = 0b0000_0001;
const MAX_CPU_PERMILLE: u16 = 1000;
const MAX_SCORE: u16 = 10_000;

/// What is wrong with a malformed frame's field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MalformedReason {
    /// The body ends before the field does.
    Truncated {
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the body.
        left: usize,
    },
    /// Bytes are left after the last field.
    TrailingBytes(usize),
    /// A string is not UTF-8.
    NotUtf8,
    /// A transport code SPEC.md does not define.
    UnknownTransport(u8),
    /// An address family other than 4 or 6.
    UnknownFamily(u8),
    /// A flags field has bits set that SPEC.md does not define.
    UndefinedFlags(u8),
    /// A value outside its range.
    OutOfRange {
        /// The value received.
        value: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// The type is reserved (`0x00`, `0xff`) and may never be sent.
    ReservedType,
}

impl std::fmt::Display for MalformedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MalformedReason::Truncated { needed, left } => {
                write!(
                    f,
                    "body ends early: field needs {needed} bytes, {left} left"
                )
            }
            MalformedReason::TrailingBytes(n) => write!(f, "{n} bytes after the last field"),
            MalformedReason::NotUtf8 => f.write_str("not UTF-8"),
            MalformedReason::UnknownTransport(c) => write!(f, "unknown transport code {c}"),
            MalformedReason::UnknownFamily(c) => write!(f, "unknown address family {c}"),
            MalformedReason::UndefinedFlags(bits) => write!(f, "undefined flag bits {bits:#010b}"),
            MalformedReason::OutOfRange { value, max } => {
                write!(f, "value {value} above its maximum {max}")
            }
            MalformedReason::ReservedType => f.write_str("reserved frame type"),
        }
    }
}

/// Why a frame could not be decoded or encoded. Every decoding error ends
/// the link: send [`FrameError::to_error_frame`] and close (SPEC.md §6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces a body above the receiver's maximum.
    #[error("{frame} frame body of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The frame's type.
        frame: FrameType,
        /// The announced body length.
        len: u32,
        /// The receiver's maximum.
        max: u32,
    },
    /// The header carries a version other than the negotiated one.
    #[error("{frame} frame in protocol version {got}, expected version {expected}")]
    UnsupportedVersion {
        /// The frame's type.
        frame: FrameType,
        /// The version in the header.
        got: u8,
        /// The version this link speaks.
        expected: u8,
    },
    /// A field of the body is malformed.
    #[error("malformed {frame} frame, field `{field}`: {reason}")]
    Malformed {
        /// The frame's type.
        frame: FrameType,
        /// The field that is wrong.
        field: &'static str,
        /// What is wrong with it.
        reason: MalformedReason,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes received of the unfinished frame.
        buffered: usize,
    },
    /// A frame cannot be written as asked (a value does not fit its field).
    #[error("cannot encode field `{field}`: {reason}")]
    Unencodable {
        /// The field that does not fit.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

impl FrameError {
    /// The code an `ERROR` frame reporting this error carries.
    pub fn code(&self) -> Code {
        match self {
            FrameError::TooLarge { .. } => Code::FRAME_TOO_LARGE,
            FrameError::UnsupportedVersion { .. } => Code::UNSUPPORTED_VERSION,
            FrameError::Malformed { .. }
            | FrameError::Truncated { .. }
            | FrameError::Unencodable { .. } => Code::MALFORMED_FRAME,
        }
    }

    /// The `ERROR` frame to send before closing the link.
    pub fn to_error_frame(&self) -> Frame {
        Frame::Error(Close {
            code: self.code(),
            reason: self.to_string(),
        })
    }
}

/// The sans-I/O decoder of one link's incoming frames.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_body: u32,
    version: u8,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_BODY)
    }
}

impl FrameDecoder {
    /// A decoder accepting bodies up to `max_body` bytes (capped at
    /// [`HARD_MAX_BODY`]), expecting [`PROTOCOL_VERSION`] until told otherwise.
    pub fn new(max_body: u32) -> Self {
        FrameDecoder {
            max_body: max_body.min(HARD_MAX_BODY),
            version: PROTOCOL_VERSION,
        }
    }

    /// The version negotiated for this link (SPEC.md §3).
    pub fn set_version(&mut self, version: u8) {
        self.version = version;
    }

    /// The version this decoder expects.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The largest body this decoder accepts.
    pub fn max_body(&self) -> u32 {
        self.max_body
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// `Ok(None)`: `buf` holds no whole frame yet; call again with more
    /// bytes. Unknown frame types decode as [`Frame::Unknown`].
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let version = header[0];
        let frame = FrameType(header[1]);
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let expected = if frame == FrameType::HELLO {
            HELLO_VERSION
        } else {
            self.version
        };
        if version != expected {
            return Err(FrameError::UnsupportedVersion {
                frame,
                got: version,
                expected,
            });
        }
        if frame.is_reserved() {
            return Err(FrameError::Malformed {
                frame,
                field: "type",
                reason: MalformedReason::ReservedType,
            });
        }
        if len > self.max_body {
            return Err(FrameError::TooLarge {
                frame,
                len,
                max: self.max_body,
            });
        }
        // Cannot overflow: len <= HARD_MAX_BODY.
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut whole = buf.split_to(total).freeze();
        let body = whole.split_off(HEADER_LEN);
        decode_body(frame, body).map(Some)
    }

    /// Like [`decode`](Self::decode), at the end of the stream: bytes left
    /// that do not make a whole frame are [`FrameError::Truncated`].
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: buf.len(),
            }),
        }
    }
}

fn decode_body(frame: FrameType, body: Bytes) -> Result<Frame, FrameError> {
    let mut r = Reader::new(frame, body);
    let decoded = match frame {
        FrameType::HELLO => Frame::Hello(Hello {
            min_version: r.u8("min_version")?,
            max_version: r.u8("max_version")?,
            agent: r.string("agent")?,
            nonce: r.array::<NONCE_LEN>("nonce")?,
        }),
        FrameType::CHALLENGE => Frame::Challenge(Challenge {
            version: r.u8("version")?,
            balancer: r.string("balancer")?,
            nonce: r.array::<NONCE_LEN>("nonce")?,
        }),
        FrameType::AUTH => Frame::Auth(r.array::<MAC_LEN>("mac")?),
        FrameType::WELCOME => {
            let backend_id = r.u16("backend_id")?;
            let mac = r.array::<MAC_LEN>("mac")?;
            let report_interval_ms = r.u32("report_interval_ms")?;
            let max_frame_body = r.u32("max_frame_body")?;
            let count = r.u8("count")?;
            let mut addresses = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                addresses.push(PublicAddress {
                    transport: r.transport("addresses.transport")?,
                    addr: r.addr("addresses.addr")?,
                });
            }
            Frame::Welcome(Welcome {
                backend_id,
                mac,
                report_interval_ms,
                max_frame_body,
                addresses,
            })
        }
        FrameType::REFUSE => Frame::Refuse(Refuse {
            code: Code(r.u16("code")?),
            reason: r.string("reason")?,
        }),
        FrameType::SIP_TO_BACKEND => {
            let flags = check_flags(frame, r.u8("flags")?, SIP_TO_BACKEND_FAILOVER)?;
            Frame::SipToBackend(SipToBackend {
                failover: flags & SIP_TO_BACKEND_FAILOVER != 0,
                connection: r.u64("connection")?,
                transport: r.transport("transport")?,
                peer: r.addr("peer")?,
                local: r.addr("local")?,
                arrival_unix_us: r.u64("arrival")?,
                message: r.rest(),
            })
        }
        FrameType::SIP_FROM_BACKEND => {
            let flags = check_flags(frame, r.u8("flags")?, SIP_FROM_BACKEND_HAS_CONNECTION)?;
            let connection = r.u64("connection")?;
            Frame::SipFromBackend(SipFromBackend {
                connection: (flags & SIP_FROM_BACKEND_HAS_CONNECTION != 0).then_some(connection),
                transport: r.transport("transport")?,
                next_hop: r.addr("next_hop")?,
                message: r.rest(),
            })
        }
        FrameType::LOAD => {
            let seq = r.u64("seq")?;
            let flags = check_flags(frame, r.u8("flags")?, LOAD_HAS_SCORE)?;
            let active_calls = r.u32("active_calls")?;
            let cpu_permille = in_range(
                frame,
                "cpu_permille",
                r.u16("cpu_permille")?,
                MAX_CPU_PERMILLE,
            )?;
            let capacity = r.u32("capacity")?;
            let score = in_range(frame, "score", r.u16("score")?, MAX_SCORE)?;
            Frame::Load(LoadReport {
                seq,
                active_calls,
                cpu_permille,
                capacity,
                score: (flags & LOAD_HAS_SCORE != 0).then_some(score),
                msgs_in: r.u64("msgs_in")?,
                msgs_out: r.u64("msgs_out")?,
                bytes_in: r.u64("bytes_in")?,
                bytes_out: r.u64("bytes_out")?,
            })
        }
        FrameType::DRAIN => {
            let code = r.u8("state")?;
            Frame::Drain(DrainState::from_code(code).ok_or(FrameError::Malformed {
                frame,
                field: "state",
                reason: MalformedReason::OutOfRange {
                    value: code.into(),
                    max: 2,
                },
            })?)
        }
        FrameType::PING => Frame::Ping(r.u64("token")?),
        FrameType::PONG => Frame::Pong(r.u64("token")?),
        FrameType::GOODBYE | FrameType::ERROR => {
            let close = Close {
                code: Code(r.u16("code")?),
                reason: r.string("reason")?,
            };
            if frame == FrameType::GOODBYE {
                Frame::Goodbye(close)
            } else {
                Frame::Error(close)
            }
        }
        _ => Frame::Unknown {
            frame_type: frame,
            body: r.rest(),
        },
    };
    r.finish()?;
    Ok(decoded)
}

fn check_flags(frame: FrameType, flags: u8, defined: u8) -> Result<u8, FrameError> {
    if flags & !defined != 0 {
        return Err(FrameError::Malformed {
            frame,
            field: "flags",
            reason: MalformedReason::UndefinedFlags(flags & !defined),
        });
    }
    Ok(flags)
}

fn in_range(
    frame: FrameType,
    field: &'static str,
    value: u16,
    max: u16,
) -> Result<u16, FrameError> {
    if value > max {
        return Err(FrameError::Malformed {
            frame,
            field,
            reason: MalformedReason::OutOfRange {
                value: value.into(),
                max: max.into(),
            },
        });
    }
    Ok(value)
}

/// Appends `frame`, written in protocol `version`, to `out`.
///
/// `HELLO` is always written in version 1 (SPEC.md §3). Values that do not
/// fit their field (a string over 64 KiB, more than 255 addresses, a CPU
/// figure over 1000 ‰, a body over [`HARD_MAX_BODY`], a reserved type) are
/// refused with [`FrameError::Unencodable`] and `out` is left unchanged.
pub fn encode(frame: &Frame, version: u8, out: &mut BytesMut) -> Result<(), FrameError> {
    let start = out.len();
    let result = encode_inner(frame, version, out, start);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_inner(
    frame: &Frame,
    version: u8,
    out: &mut BytesMut,
    start: usize,
) -> Result<(), FrameError> {
    let ty = frame.frame_type();
    if ty.is_reserved() {
        return Err(FrameError::Unencodable {
            field: "type",
            reason: "reserved frame type",
        });
    }
    let version = if ty == FrameType::HELLO {
        HELLO_VERSION
    } else {
        version
    };
    out.reserve(HEADER_LEN + body_size_hint(frame));
    out.put_u8(version);
    out.put_u8(ty.0);
    out.put_u16(0);
    out.put_u32(0); // patched below
    match frame {
        Frame::Hello(h) => {
            out.put_u8(h.min_version);
            out.put_u8(h.max_version);
            put_str(out, "agent", &h.agent)?;
            out.put_slice(&h.nonce);
        }
        Frame::Challenge(c) => {
            out.put_u8(c.version);
            put_str(out, "balancer", &c.balancer)?;
            out.put_slice(&c.nonce);
        }
        Frame::Auth(mac) => out.put_slice(mac),
        Frame::Welcome(w) => {
            out.put_u16(w.backend_id);
            out.put_slice(&w.mac);
            out.put_u32(w.report_interval_ms);
            out.put_u32(w.max_frame_body);
            let count = u8::try_from(w.addresses.len()).map_err(|_| FrameError::Unencodable {
                field: "addresses",
                reason: "more than 255 addresses",
            })?;
            out.put_u8(count);
            for a in &w.addresses {
                out.put_u8(a.transport.code());
                put_addr(out, &a.addr);
            }
        }
        Frame::Refuse(r) => {
            out.put_u16(r.code.0);
            put_str(out, "reason", &r.reason)?;
        }
        Frame::SipToBackend(s) => {
            out.put_u8(if s.failover {
                SIP_TO_BACKEND_FAILOVER
            } else {
                0
            });
            out.put_u64(s.connection);
            out.put_u8(s.transport.code());
            put_addr(out, &s.peer);
            put_addr(out, &s.local);
            out.put_u64(s.arrival_unix_us);
            out.put_slice(&s.message);
        }
        Frame::SipFromBackend(s) => {
            let (flags, connection) = match s.connection {
                Some(id) => (SIP_FROM_BACKEND_HAS_CONNECTION, id),
                None => (0, 0),
            };
            out.put_u8(flags);
            out.put_u64(connection);
            out.put_u8(s.transport.code());
            put_addr(out, &s.next_hop);
            out.put_slice(&s.message);
        }
        Frame::Load(l) => {
            if l.cpu_permille > MAX_CPU_PERMILLE {
                return Err(FrameError::Unencodable {
                    field: "cpu_permille",
                    reason: "above 1000",
                });
            }
            if l.score.is_some_and(|s| s > MAX_SCORE) {
                return Err(FrameError::Unencodable {
                    field: "score",
                    reason: "above 10000",
                });
            }
            out.put_u64(l.seq);
            out.put_u8(if l.score.is_some() { LOAD_HAS_SCORE } else { 0 });
            out.put_u32(l.active_calls);
            out.put_u16(l.cpu_permille);
            out.put_u32(l.capacity);
            out.put_u16(l.score.unwrap_or(0));
            out.put_u64(l.msgs_in);
            out.put_u64(l.msgs_out);
            out.put_u64(l.bytes_in);
            out.put_u64(l.bytes_out);
        }
        Frame::Drain(state) => out.put_u8(state.code()),
        Frame::Ping(token) | Frame::Pong(token) => out.put_u64(*token),
        Frame::Goodbye(c) | Frame::Error(c) => {
            out.put_u16(c.code.0);
            put_str(out, "reason", &c.reason)?;
        }
        Frame::Unknown { body, .. } => out.put_slice(body),
    }
    let body_len = out.len() - start - HEADER_LEN;
    let len = u32::try_from(body_len)
        .ok()
        .filter(|&len| len <= HARD_MAX_BODY)
        .ok_or(FrameError::Unencodable {
            field: "body",
            reason: "body larger than 16 MiB",
        })?;
    out[start + 4..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// A close upper bound of a frame's body, to reserve the buffer once.
fn body_size_hint(frame: &Frame) -> usize {
    match frame {
        Frame::SipToBackend(s) => {
            1 + 8 + 1 + addr_len(&s.peer) + addr_len(&s.local) + 8 + s.message.len()
        }
        Frame::SipFromBackend(s) => 1 + 8 + 1 + addr_len(&s.next_hop) + s.message.len(),
        Frame::Unknown { body, .. } => body.len(),
        _ => 64,
    }
}

/// Errors of the tokio adapter: a frame error or an I/O error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent bytes that do not decode (send `ERROR`, then close).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading or writing the socket failed.
    #[error("i/o error on the agent link: {0}")]
    Io(#[from] io::Error),
}

/// [`tokio_util::codec`] adapter over [`FrameDecoder`] and [`encode`].
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    decoder: FrameDecoder,
}

impl FrameCodec {
    /// A codec accepting bodies up to `max_body` bytes.
    pub fn new(max_body: u32) -> Self {
        FrameCodec {
            decoder: FrameDecoder::new(max_body),
        }
    }

    /// Switches both directions to the negotiated version (SPEC.md §3).
    pub fn set_version(&mut self, version: u8) {
        self.decoder.set_version(version);
    }

    /// The version this link speaks.
    pub fn version(&self) -> u8 {
        self.decoder.version()
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode_eof(src)?)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(encode(&frame, self.decoder.version(), dst)?)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(encode(frame, self.decoder.version(), dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        encode(frame, PROTOCOL_VERSION, &mut out).unwrap();
        out
    }

    #[test]
    fn header_is_checked_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[1u8, 0x10, 0, 0, 0x7f, 0, 0, 0][..]);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                frame: FrameType::SIP_TO_BACKEND,
                len: 0x7f00_0000,
                max: DEFAULT_MAX_BODY
            }
        );
        assert_eq!(err.code(), Code::FRAME_TOO_LARGE);
    }

    #[test]
    fn hello_is_version_one_whatever_the_link_speaks() {
        let hello = Frame::Hello(Hello {
            min_version: 1,
            max_version: 9,
            agent: "b1".into(),
            nonce: [7; NONCE_LEN],
        });
        let mut out = BytesMut::new();
        encode(&hello, 9, &mut out).unwrap();
        assert_eq!(out[0], 1);
        let mut dec = FrameDecoder::default();
        dec.set_version(9);
        assert_eq!(dec.decode(&mut out).unwrap(), Some(hello));
    }

    #[test]
    fn a_frame_in_another_version_is_refused() {
        let mut buf = wire(&Frame::Ping(1));
        let mut dec = FrameDecoder::default();
        dec.set_version(2);
        assert_eq!(
            dec.decode(&mut buf).unwrap_err(),
            FrameError::UnsupportedVersion {
                frame: FrameType::PING,
                got: 1,
                expected: 2
            }
        );
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut buf = wire(&Frame::Ping(1));
        buf[7] += 1;
        buf.extend_from_slice(&[0]);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed PING frame, field `end of body`: 1 bytes after the last field"
        );
    }

    #[test]
    fn unencodable_frame_leaves_the_buffer_unchanged() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let load = Frame::Load(LoadReport {
            cpu_permille: 1001,
            ..LoadReport::default()
        });
        assert!(matches!(
            encode(&load, 1, &mut out),
            Err(FrameError::Unencodable {
                field: "cpu_permille",
                ..
            })
        ));
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn sip_payload_is_a_slice_of_the_read_buffer() {
        let msg = Bytes::from_static(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\n\r\n");
        let mut buf = wire(&Frame::SipFromBackend(SipFromBackend {
            connection: None,
            transport: super::super::Transport::Udp,
            next_hop: "127.0.0.1:5060".parse().unwrap(),
            message: msg.clone(),
        }));
        let base = buf.as_ptr() as usize;
        let len = buf.len();
        let Some(Frame::SipFromBackend(got)) = FrameDecoder::default().decode(&mut buf).unwrap()
        else {
            panic!("expected SIP_FROM_BACKEND");
        };
        assert_eq!(got.message, msg);
        let at = got.message.as_ptr() as usize;
        assert!(at >= base && at < base + len, "payload was copied");
    }
}
