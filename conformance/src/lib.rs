//! Conformance harness: golden SIP traces, a runner and a scorecard.
//!
//! Golden traces are human-readable files (one per trace) that drive actors
//! on distinct 127.0.0.x addresses through a balancer under test and assert
//! what arrives where. The runner points at any balancer binary, and in
//! plain-SIP mode at any SIP load balancer (Kamailio included).
//!
//! `corpus/` beside this crate holds the public SIP test material every
//! crate's tests share: the RFC 4475 torture messages, the RFC 5118 IPv6
//! messages and call flows from RFC 3665, RFC 3261 §24 and public captures
//! (see `corpus/README.md` and `corpus/SOURCES.md` for origins and licences).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;

/// The folder of the shared SIP test corpus.
pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
}
