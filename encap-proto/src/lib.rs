//! Viaduct's wire layer.
//!
//! Everything that turns bytes on a stream into messages and back, with no
//! I/O of its own:
//!
//! * [`frame`]: the encapsulation frames exchanged between a balancer and the
//!   backend agents that dial in (hello, authentication, SIP to and from a
//!   backend, load reports, drain, keep-alive, errors). The byte layout is
//!   specified in `SPEC.md` beside this crate.
//! * [`tag`]: affinity tags, minted and verified with the cluster secret
//!   (design.md §2), shared by the balancer and the agents.
//! * [`sip`]: SIP over a stream (RFC 3261 §18.3) and over datagrams, a
//!   zero-copy scanner of the fields routing needs, and rewrite helpers.
//!
//! Both halves are sans-I/O: pure functions and state machines over
//! [`bytes::BytesMut`] / [`bytes::Bytes`], with thin
//! [`tokio_util::codec`] adapters for drivers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod frame;
pub mod sip;
pub mod tag;
