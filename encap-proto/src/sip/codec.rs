//! [`tokio_util::codec`] adapter over [`StreamFramer`]: decoding yields
//! [`Framed`] units, encoding writes a message's bytes as they are.
//!
//! ```text
//!  socket bytes ─► FramedRead<_, SipStreamCodec> ─► Framed::{Message, Ping, Pong}
//!  Bytes (a whole SIP message, or b"\r\n" as a pong) ─► FramedWrite ─► socket
//! ```

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::framer::{Framed, FramingError, StreamFramer};
use super::Limits;

/// Error of [`SipStreamCodec`]: framing (the stream must be closed) or I/O.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SipCodecError {
    /// The stream cannot be framed; close it.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// The underlying transport failed.
    #[error("SIP stream I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// SIP stream codec: RFC 3261 §18.3 framing with RFC 5626 keep-alives.
#[derive(Debug, Clone)]
pub struct SipStreamCodec {
    framer: StreamFramer,
}

impl SipStreamCodec {
    /// A codec enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        SipStreamCodec {
            framer: StreamFramer::new(limits),
        }
    }
}

impl Default for SipStreamCodec {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Decoder for SipStreamCodec {
    type Item = Framed;
    type Error = SipCodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Framed>, SipCodecError> {
        Ok(self.framer.decode(src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Framed>, SipCodecError> {
        Ok(self.framer.decode_eof(src)?)
    }
}

impl Encoder<Bytes> for SipStreamCodec {
    type Error = SipCodecError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), SipCodecError> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_encodes() {
        let mut c = SipStreamCodec::default();
        let mut buf = BytesMut::from(&b"SIP/2.0 200 OK\r\nl: 0\r\n\r\n\r\n\r\n"[..]);
        assert!(matches!(c.decode(&mut buf), Ok(Some(Framed::Message(_)))));
        assert!(matches!(c.decode(&mut buf), Ok(Some(Framed::Ping))));
        assert!(matches!(c.decode_eof(&mut buf), Ok(None)));
        let mut out = BytesMut::new();
        c.encode(Bytes::from_static(b"\r\n"), &mut out).unwrap();
        assert_eq!(&out[..], b"\r\n");
        let mut bad = BytesMut::from(&b"SIP/2.0 200 OK\r\n\r\n"[..]);
        assert!(matches!(
            c.decode(&mut bad),
            Err(SipCodecError::Framing(FramingError::MissingContentLength))
        ));
    }
}
