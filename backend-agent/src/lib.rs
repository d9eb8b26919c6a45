//! The library a SIP backend (a B2BUA: prepaid, conferencing, IVR) embeds to
//! sit behind a Viaduct balancer.
//!
//! The agent dials every balancer of the cluster, authenticates with the
//! cluster secret (`encap_proto::frame::auth`), receives the SIP messages
//! the balancer routes to this backend inside `SIP_TO_BACKEND` frames, and
//! sends the backend's messages out through the balancer inside
//! `SIP_FROM_BACKEND` frames that name the resolved next hop
//! (design.md §4). It stamps the affinity tag into the Contact URI of
//! dialog-creating messages and reports load every 500 ms.
//!
//! Module map (filled by the backend-agent issue):
//!
//! * `link`: the sans-I/O state machine of one balancer link (handshake,
//!   load reports, ping, drain), driven by a tokio task;
//! * `route`: next-hop resolution from Via / Route / Request-URI;
//! * `stamp`: affinity tag stamping of Contact and Via.
//!
//! The wire types it speaks are re-exported here for embedders.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use encap_proto::frame::{DrainState, LoadReport, Transport};
