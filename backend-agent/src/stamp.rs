//! Affinity stamping: what the agent writes into the messages the backend
//! sends, so every later message of the call comes back to this backend
//! (design.md §2). The application never sees the tag format.
//!
//! * The Contact URI of every message that has one (but 3xx, whose Contacts
//!   are redirect targets) gets the balancer's public address as host:port
//!   and `;vd=<tag>`: in-dialog requests from outside are sent to it.
//!   A REGISTER's Contact gets a call-independent tag (a binding outlives
//!   any one call).
//! * A request the backend originates gets a top Via with the balancer's
//!   address and the tag in the branch, `z9hG4bK-vd<tag>-<id>`: its
//!   responses come back through the balancer to this backend. `<id>` is
//!   derived from the application's own top Via branch, so a CANCEL or the
//!   ACK of a failure gets the same branch as its INVITE (RFC 3261 §9.1,
//!   §17.1.1.3). On the way back the agent removes that Via again.
//! * Viaduct's own headers are removed from whatever the backend sends.

use std::hash::Hasher;
use std::net::SocketAddr;

use bytes::Bytes;
use encap_proto::frame::Transport;
use encap_proto::sip::{Rewrite, SipMessage, UriTarget};
use encap_proto::tag::TagKeys;
use siphasher::sip::SipHasher13;

/// The URI parameter that carries the tag (the balancer reads it).
pub const TAG_PARAM: &str = "vd";
/// The branch prefix of the agent's Via (the balancer reads it).
pub const BRANCH_PREFIX: &str = "z9hG4bK-vd";
/// The prefix of Viaduct's own headers.
pub const OWN_HEADER_PREFIX: &str = "X-Viaduct-";

/// Who is stamping: the tag keys, our backend id, the balancer's public
/// SIP address for the transport the message leaves by.
#[derive(Debug, Clone, Copy)]
pub struct Stamper<'a> {
    /// The cluster's tag keys.
    pub keys: &'a TagKeys,
    /// Our backend id (from WELCOME).
    pub backend_id: u16,
    /// The balancer's public address.
    pub public: SocketAddr,
}

fn host_of(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
    }
}

impl Stamper<'_> {
    fn contact(&self, msg: &SipMessage, rw: &mut Rewrite<'_>) {
        if msg.contact().is_none() || msg.status().is_some_and(|s| (300..400).contains(&s)) {
            return;
        }
        let register = msg
            .method()
            .is_some_and(|m| m.eq_ignore_ascii_case(b"REGISTER"));
        let tag = if register {
            self.keys.mint_call_independent(self.backend_id)
        } else {
            self.keys
                .mint(self.backend_id, msg.call_id().unwrap_or_default())
        };
        rw.set_uri_hostport(
            UriTarget::Contact,
            &host_of(self.public),
            Some(self.public.port()),
        );
        rw.set_uri_param(UriTarget::Contact, TAG_PARAM, Some(&tag));
    }

    /// A response the backend sends.
    pub fn response(&self, msg: &SipMessage) -> Bytes {
        let mut rw = Rewrite::new(msg);
        if msg.has_viaduct_headers() {
            rw.remove_headers_with_prefix(OWN_HEADER_PREFIX);
        }
        self.contact(msg, &mut rw);
        rw.finish()
    }

    /// A request the backend originates, leaving by `transport`.
    pub fn request(&self, msg: &SipMessage, transport: Transport) -> Bytes {
        let mut rw = Rewrite::new(msg);
        if msg.has_viaduct_headers() {
            rw.remove_headers_with_prefix(OWN_HEADER_PREFIX);
        }
        self.contact(msg, &mut rw);
        let call_id = msg.call_id().unwrap_or_default();
        let tag = self.keys.mint(self.backend_id, call_id);
        let via = format!(
            "SIP/2.0/{transport} {}:{};branch={BRANCH_PREFIX}{}-{:x};rport",
            host_of(self.public),
            self.public.port(),
            String::from_utf8_lossy(&tag),
            transaction_id(msg),
        );
        rw.insert_header("Via", via.as_bytes());
        rw.finish()
    }
}

/// The same for a request, its CANCEL and the ACK of its failure: the
/// application's top Via branch, else Call-ID and CSeq number.
fn transaction_id(msg: &SipMessage) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x7669_6164, 0x7563_7462);
    match msg.top_via().and_then(|v| v.branch) {
        Some(branch) => h.write(branch),
        None => {
            h.write(msg.call_id().unwrap_or_default());
            h.write_u32(msg.cseq().map_or(0, |c| c.seq));
        }
    }
    h.finish()
}

/// Whether a response's top Via is the agent's own (to be removed before
/// the application sees it).
pub fn is_agent_via(msg: &SipMessage) -> bool {
    msg.top_via()
        .and_then(|v| v.branch)
        .is_some_and(|b| b.starts_with(BRANCH_PREFIX.as_bytes()))
}
