//! Active calls, counted by the agent from the dialogs it sees pass.
//!
//! A call is a dialog this backend answered as UAS: it becomes active when
//! the backend sends a 2xx to an initial INVITE, and ends with a BYE in
//! either direction (or a failure answer to the INVITE). The balancer
//! balances on this number, so it is counted from what crosses the link,
//! not from what the application says: nothing to forget to decrement.
//! A call whose BYE was lost is forgotten after `max_call_age`.
//!
//! Keys are a hash of the Call-ID (64-bit SipHash with a per-process key),
//! so the set costs a few bytes per call and no allocation per message.

use std::collections::HashMap;
use std::hash::Hasher;
use std::time::{Duration, Instant};

use encap_proto::sip::SipMessage;
use siphasher::sip::SipHasher13;

/// The default age after which a call without BYE is forgotten: 12 hours.
pub const DEFAULT_MAX_CALL_AGE: Duration = Duration::from_secs(12 * 3600);

/// Counts active calls.
#[derive(Debug)]
pub struct DialogCounter {
    active: HashMap<u64, Instant>,
    keys: (u64, u64),
    max_call_age: Duration,
}

impl DialogCounter {
    /// A counter; `keys` should be random per process.
    pub fn new(keys: (u64, u64), max_call_age: Duration) -> DialogCounter {
        DialogCounter {
            active: HashMap::new(),
            keys,
            max_call_age,
        }
    }

    fn key(&self, call_id: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(call_id);
        h.finish()
    }

    /// Active calls now.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// A message the backend received through the balancer.
    pub fn inbound(&mut self, msg: &SipMessage) {
        if msg.method().is_some_and(|m| m.eq_ignore_ascii_case(b"BYE")) {
            if let Some(call_id) = msg.call_id() {
                let key = self.key(call_id);
                self.active.remove(&key);
            }
        }
    }

    /// A message the backend sends out through the balancer.
    pub fn outbound(&mut self, now: Instant, msg: &SipMessage) {
        let Some(call_id) = msg.call_id() else { return };
        let key = self.key(call_id);
        match (msg.method(), msg.status(), msg.cseq()) {
            (Some(m), _, _) if m.eq_ignore_ascii_case(b"BYE") => {
                self.active.remove(&key);
            }
            // A failed initial INVITE creates nothing; a failed re-INVITE
            // leaves the call up (RFC 3261 §14.1); a re-INVITE 2xx keeps
            // the call's start time.
            (None, Some(status), Some(cseq))
                if cseq.method.eq_ignore_ascii_case(b"INVITE") && (200..300).contains(&status) =>
            {
                self.active.entry(key).or_insert(now);
            }
            _ => {}
        }
    }

    /// Forgets calls older than `max_call_age` (lost BYE); returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.active.len();
        let max = self.max_call_age;
        self.active
            .retain(|_, started| now.saturating_duration_since(*started) < max);
        before - self.active.len()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick the origin of time
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(start: &str, call_id: &str, cseq: &str) -> SipMessage {
        let text = format!(
            "{start}\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n"
        );
        SipMessage::parse(Bytes::from(text)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_call_counts_from_its_2xx_to_its_bye() {
        let t0 = Instant::now();
        let mut d = DialogCounter::new((1, 2), DEFAULT_MAX_CALL_AGE);
        d.outbound(t0, &msg("SIP/2.0 180 Ringing", "a", "1 INVITE"));
        assert_eq!(d.active(), 0);
        d.outbound(t0, &msg("SIP/2.0 200 OK", "a", "1 INVITE"));
        d.outbound(t0, &msg("SIP/2.0 200 OK", "a", "1 INVITE")); // retransmission
        d.outbound(t0, &msg("SIP/2.0 200 OK", "b", "1 INVITE"));
        d.outbound(t0, &msg("SIP/2.0 486 Busy Here", "c", "1 INVITE"));
        assert_eq!(d.active(), 2);
        d.outbound(t0, &msg("SIP/2.0 491 Request Pending", "a", "2 INVITE")); // failed re-INVITE
        assert_eq!(d.active(), 2);
        d.inbound(&msg("BYE sip:x@y SIP/2.0", "a", "3 BYE"));
        d.outbound(t0, &msg("BYE sip:x@y SIP/2.0", "b", "2 BYE"));
        assert_eq!(d.active(), 0);
    }

    #[test]
    fn a_call_whose_bye_was_lost_is_forgotten() {
        let t0 = Instant::now();
        let mut d = DialogCounter::new((1, 2), Duration::from_secs(60));
        d.outbound(t0, &msg("SIP/2.0 200 OK", "a", "1 INVITE"));
        assert_eq!(d.expire(t0 + Duration::from_secs(59)), 0);
        assert_eq!(d.expire(t0 + Duration::from_secs(60)), 1);
        assert_eq!(d.active(), 0);
    }
}
