//! Building a response to a request (RFC 3261 §8.2.6), for backends that
//! work with bytes rather than rsip's types: it copies every Via, From,
//! To, Call-ID and CSeq of the request, adds a To tag when asked, then
//! your headers and body. (It lives in `encap-proto`, where the balancer
//! builds its own answers with it too.)
//!
//! ```
//! use backend_agent::respond::response;
//! use bytes::Bytes;
//! use encap_proto::sip::SipMessage;
//!
//! let invite = SipMessage::parse(Bytes::from_static(
//!     b"INVITE sip:ivr@lb SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
//!       From: <sip:a@x>;tag=1\r\nTo: <sip:ivr@lb>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
//!       Content-Length: 0\r\n\r\n",
//! ))?;
//! let ringing = response(&invite, 180, "Ringing").to_tag("b2bua1").build();
//! assert_eq!(SipMessage::parse(ringing)?.to_tag(), Some(&b"b2bua1"[..]));
//! # Ok::<(), encap_proto::sip::ScanError>(())
//! ```

pub use encap_proto::sip::response::{response, ResponseBuilder};
