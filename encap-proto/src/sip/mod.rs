//! SIP over streams and datagrams: framing, scanning, rewriting.
//!
//! Sans-I/O, zero copy, no per-message heap allocation on the routing path:
//!
//! ```text
//!  bytes from a socket ──► StreamFramer / frame_datagram ──► Framed::Message(Bytes)
//!                                                                │
//!                         SipMessage::parse (one pass, offsets only) ◄─────┘
//!                                │  call_id(), top_via(), cseq(), from_tag() ... O(1)
//!                                │  validate() on initial requests (From/To/Contact/Route)
//!                                ▼
//!                         Rewrite::new(&msg).insert_header(..).finish() ──► Bytes (one copy)
//! ```
//!
//! * [`framer`]: RFC 3261 §18.3 stream framing (Content-Length mandatory),
//!   datagram framing, RFC 5626 CRLF keep-alives.
//!   [`StreamFramer::decode_scanned`] frames and scans in one walk of the
//!   header section (the same result as `decode` then [`SipMessage::parse_with`],
//!   which walk it three times): use it on the routing path.
//! * [`scan`]: a zero-copy, one-pass scanner of the fields routing needs,
//!   tolerant of compact names, folded lines and LWS wherever RFC 3261 allows
//!   it; full From/To/Contact/Route syntax checks are in
//!   [`SipMessage::validate`].
//! * [`rewrite`]: header insertion/removal and parameter edits applied in one
//!   pass, everything not edited kept byte for byte.
//! * [`codec`]: the thin [`tokio_util::codec`] adapter over the framer.
//!
//! A minimal stream loop:
//!
//! ```
//! use bytes::BytesMut;
//! use encap_proto::sip::{Framed, Limits, SipMessage, StreamFramer};
//!
//! let mut framer = StreamFramer::new(Limits::default());
//! let mut buf = BytesMut::from(
//!     &b"OPTIONS sip:a@example.com SIP/2.0\r\nCall-ID: x1\r\nl: 0\r\n\r\n\r\n\r\n"[..],
//! );
//! let Some(Framed::Message(bytes)) = framer.decode(&mut buf)? else { panic!() };
//! let msg = SipMessage::parse(bytes)?;
//! assert_eq!(msg.call_id(), Some(&b"x1"[..]));
//! assert_eq!(framer.decode(&mut buf)?, Some(Framed::Ping)); // answer with "\r\n"
//! assert_eq!(framer.decode(&mut buf)?, None); // need more bytes
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[doc(hidden)]
pub mod checks;
pub mod codec;
mod find;
pub mod framer;
pub mod response;
pub mod rewrite;
pub mod scan;

pub use codec::{SipCodecError, SipStreamCodec};
pub use framer::{
    frame_datagram, frame_datagram_scanned, Framed, FramingError, Scanned, StreamFramer,
};
pub use rewrite::{Rewrite, UriTarget};
pub use scan::{CSeq, NameAddr, ScanError, SipMessage, StartLine, Uri, Via};

/// Size and count limits applied to every SIP message, by the framers and the
/// scanner alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest header section (start line, header fields and the empty line
    /// that ends them), in bytes. Default: 32 KiB (32 768).
    pub max_header_bytes: usize,
    /// Largest body (the Content-Length value, or the rest of a datagram), in
    /// bytes. Default: 64 KiB (65 536).
    pub max_body_bytes: usize,
    /// Most header fields in one message (a folded field counts once).
    /// Default: 256.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_body_bytes: 64 * 1024,
            max_headers: 256,
        }
    }
}
