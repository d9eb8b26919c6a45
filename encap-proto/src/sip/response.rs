//! Building a response to a request (RFC 3261 §8.2.6): the balancer's own
//! answers and the backends that work with bytes rather than rsip's types
//! share it.
//!
//! ```
//! use encap_proto::sip::response::response;
//! use bytes::Bytes;
//! use encap_proto::sip::SipMessage;
//!
//! let invite = SipMessage::parse(Bytes::from_static(
//!     b"INVITE sip:ivr@lb SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
//!       From: <sip:a@x>;tag=1\r\nTo: <sip:ivr@lb>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
//!       Content-Length: 0\r\n\r\n",
//! ))?;
//! let ringing = response(&invite, 180, "Ringing")
//!     .to_tag("b2bua1")
//!     .header("Contact", b"<sip:ivr@10.0.0.5>")
//!     .build();
//! let parsed = SipMessage::parse(ringing)?;
//! assert_eq!(parsed.status(), Some(180));
//! assert_eq!(parsed.to_tag(), Some(&b"b2bua1"[..]));
//! # Ok::<(), encap_proto::sip::ScanError>(())
//! ```

use super::SipMessage;
use bytes::{BufMut, Bytes, BytesMut};

/// A response under construction; see [`response`].
#[derive(Debug, Clone)]
pub struct ResponseBuilder<'a> {
    request: &'a SipMessage,
    code: u16,
    reason: &'a str,
    to_tag: Option<&'a str>,
    headers: Vec<(&'a str, &'a [u8])>,
    body: Option<(&'a str, &'a [u8])>,
}

/// Starts the response `code reason` to `request`: it copies every Via,
/// From, To, Call-ID and CSeq.
pub fn response<'a>(request: &'a SipMessage, code: u16, reason: &'a str) -> ResponseBuilder<'a> {
    ResponseBuilder {
        request,
        code,
        reason,
        to_tag: None,
        headers: Vec::new(),
        body: None,
    }
}

impl<'a> ResponseBuilder<'a> {
    /// The To tag to add when the request's To has none (ignored for 100).
    pub fn to_tag(mut self, tag: &'a str) -> Self {
        self.to_tag = Some(tag);
        self
    }

    /// An extra header.
    pub fn header(mut self, name: &'a str, value: &'a [u8]) -> Self {
        self.headers.push((name, value));
        self
    }

    /// A body and its Content-Type.
    pub fn body(mut self, content_type: &'a str, body: &'a [u8]) -> Self {
        self.body = Some((content_type, body));
        self
    }

    /// The response's bytes.
    pub fn build(self) -> Bytes {
        let req = self.request;
        let body = self.body.map_or(&b""[..], |(_, b)| b);
        let mut out = BytesMut::with_capacity(512 + body.len());
        out.put_slice(format!("SIP/2.0 {} {}\r\n", self.code, self.reason).as_bytes());
        for via in req.headers("Via") {
            put(&mut out, "Via", via);
        }
        if let Some(from) = req.header("From") {
            put(&mut out, "From", from);
        }
        if let Some(to) = req.header("To") {
            out.put_slice(b"To: ");
            out.put_slice(to);
            if let (Some(tag), None, true) = (self.to_tag, req.to_tag(), self.code > 100) {
                out.put_slice(b";tag=");
                out.put_slice(tag.as_bytes());
            }
            out.put_slice(b"\r\n");
        }
        if let Some(call_id) = req.call_id() {
            put(&mut out, "Call-ID", call_id);
        }
        if let Some(cseq) = req.header("CSeq") {
            put(&mut out, "CSeq", cseq);
        }
        for (name, value) in &self.headers {
            put(&mut out, name, value);
        }
        if let Some((content_type, _)) = self.body {
            put(&mut out, "Content-Type", content_type.as_bytes());
        }
        out.put_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.put_slice(body);
        out.freeze()
    }
}

fn put(out: &mut BytesMut, name: &str, value: &[u8]) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}
