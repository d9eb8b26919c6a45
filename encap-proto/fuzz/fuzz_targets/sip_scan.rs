//! Fuzz the SIP scanner on one arbitrary message: it must never panic, every
//! accessor must work on what it accepts, and a rewrite of an accepted
//! message must scan again with the same Call-ID and body.
#![no_main]

use bytes::Bytes;
use encap_proto::sip::checks::exercise;
use encap_proto::sip::SipMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = SipMessage::parse(Bytes::copy_from_slice(data)) {
        exercise(&msg);
    }
});
