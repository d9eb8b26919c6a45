//! The library a SIP backend (a B2BUA: prepaid, conferencing, IVR) embeds to
//! sit behind a Viaduct balancer.
//!
//! The agent dials every balancer of the cluster, authenticates with the
//! cluster secret, receives the SIP messages the balancer routes to this
//! backend inside `SIP_TO_BACKEND` frames, and sends the backend's messages
//! out through the balancer inside `SIP_FROM_BACKEND` frames that name the
//! resolved next hop (design.md §4). It stamps the affinity tag into the
//! Contact URI of dialog-creating messages and reports load every interval.
//!
//! Sans-I/O parts, testable by feeding frames and time:
//!
//! * [`link`]: one balancer link (handshake, load reports, ping, drain);
//! * [`route`]: the next hop of a response (Via) or a request (Route /
//!   Request-URI);
//! * [`dialogs`]: active calls counted from the dialogs that pass.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dialogs;
pub mod link;
pub mod route;

pub use encap_proto::frame::{DrainState, LoadReport, Transport};
