//! The answer to a SIP message when no backend can take it.
//!
//! Until a backend registers, the balancer answers every request itself:
//! `503 Service Unavailable` with `Retry-After` (RFC 3261 §21.5.4), so a
//! client or proxy tries another balancer or later. A request that cannot
//! be scanned gets `400` naming the fault in its reason phrase; responses
//! and ACKs are dropped (there is nobody to forward them to).

use bytes::Bytes;
use encap_proto::sip::{Limits, SipMessage};

use super::reply::stateless_response;

/// What to do with one framed SIP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes back to the sender.
    Reply(Bytes),
    /// Send nothing; the reason is for the log and the counters.
    Drop(DropReason),
}

/// Why a message gets no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// A response (there is no transaction to pass it to).
    Response,
    /// An ACK (never answered).
    Ack,
    /// A message too broken to answer (no Via, Call-ID, From, To or CSeq to
    /// copy), with what was wrong.
    Unanswerable(String),
}

/// Answers `message` as a balancer with no backend.
pub fn answer(message: Bytes, limits: &Limits, retry_after_secs: u32) -> Answer {
    let msg = match SipMessage::parse_with(message, limits) {
        Ok(msg) => msg,
        Err(e) => {
            // Too broken to build a response from: RFC 3261 §8.2.6 needs
            // the transaction headers, which only a scanned message gives.
            return Answer::Drop(DropReason::Unanswerable(e.to_string()));
        }
    };
    match msg.method() {
        None => Answer::Drop(DropReason::Response),
        Some(m) if m.eq_ignore_ascii_case(b"ACK") => Answer::Drop(DropReason::Ack),
        Some(_) => {
            let retry = retry_after_secs.to_string();
            match stateless_response(
                &msg,
                503,
                "Service Unavailable",
                &[("Retry-After", retry.as_bytes())],
            ) {
                Some(reply) => Answer::Reply(reply),
                None => Answer::Drop(DropReason::Unanswerable(
                    "request lacks Via, From, To, Call-ID or CSeq".to_owned(),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_gets_503_with_retry_after() {
        let req = Bytes::from_static(
            b"OPTIONS sip:lb.example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
              From: <sip:a@x>;tag=1\r\nTo: <sip:lb.example.com>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n",
        );
        let Answer::Reply(reply) = answer(req, &Limits::default(), 7) else {
            panic!("expected a reply")
        };
        let msg = SipMessage::parse(reply).unwrap();
        assert_eq!(msg.status(), Some(503));
        assert_eq!(msg.header("Retry-After"), Some(&b"7"[..]));
    }

    #[test]
    fn responses_and_acks_are_dropped() {
        let resp = Bytes::from_static(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nl: 0\r\n\r\n",
        );
        assert_eq!(
            answer(resp, &Limits::default(), 5),
            Answer::Drop(DropReason::Response)
        );
        let ack = Bytes::from_static(
            b"ACK sip:b@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\n\
              To: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 ACK\r\nl: 0\r\n\r\n",
        );
        assert_eq!(
            answer(ack, &Limits::default(), 5),
            Answer::Drop(DropReason::Ack)
        );
    }

    #[test]
    fn a_request_without_call_id_is_dropped_with_the_reason() {
        let req = Bytes::from_static(
            b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\n\
              To: <sip:b@x>\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n",
        );
        assert!(matches!(
            answer(req, &Limits::default(), 5),
            Answer::Drop(DropReason::Unanswerable(_))
        ));
    }
}
