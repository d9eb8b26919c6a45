//! Fuzz the SIP scanner on one arbitrary message: it must never panic, every
//! accessor must work on what it accepts, and a rewrite of an accepted
//! message must scan again with the same Call-ID and body.
#![no_main]

use bytes::Bytes;
use encap_proto::sip::checks::assert_cached_agree;
use encap_proto::sip::{Limits, Rewrite, SipMessage, UriTarget};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = SipMessage::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert_cached_agree(&msg);
    let valid = msg.validate().is_ok();
    let _ = (
        msg.start_line(),
        msg.request_uri(),
        msg.call_id(),
        msg.cseq(),
    );
    let _ = (
        msg.top_via(),
        msg.top_route(),
        msg.contact(),
        msg.from_tag(),
        msg.to_tag(),
    );
    let _ = (msg.max_forwards(), msg.content_length(), msg.vias().count());
    let _ = msg.headers("v").count();
    if let Some(cid) = msg.call_id() {
        assert_eq!(&msg.slice(cid)[..], cid);
    }
    let out = Rewrite::new(&msg)
        .insert_header("Record-Route", b"<sip:lb.example.com;lr>")
        .set_top_via_param("received", Some(b"192.0.2.1"))
        .set_top_via_param("rport", None)
        .set_uri_param(UriTarget::RequestUri, "transport", Some(b"tcp"))
        .set_uri_param(UriTarget::TopRoute, "lr", None)
        .set_uri_param(UriTarget::Contact, "ob", None)
        .remove_headers("max-forwards")
        .set_uri_hostport(UriTarget::Contact, "2001:db8::1", Some(5060))
        .set_uri_hostport(UriTarget::RequestUri, "lb.example.com", None)
        .remove_headers_with_prefix("X-Viaduct-")
        .finish();
    let big = Limits {
        max_header_bytes: usize::MAX,
        max_body_bytes: usize::MAX,
        max_headers: usize::MAX,
    };
    let again = SipMessage::parse_with(out, &big).expect("a rewritten message scans");
    assert_eq!(again.call_id(), msg.call_id());
    assert_eq!(again.body(), msg.body());
    assert_eq!(again.max_forwards(), None);
    assert!(!again.has_viaduct_headers());
    assert_cached_agree(&again);
    if valid {
        again
            .validate()
            .expect("a rewrite of a valid message is valid");
    }
});
