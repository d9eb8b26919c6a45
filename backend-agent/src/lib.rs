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
//! A backend in a few lines (it answers every request 200; a real B2BUA
//! does its work where the `match` is):
//!
//! ```no_run
//! use backend_agent::agent::{Agent, AgentConfig};
//! use backend_agent::respond::response;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let secret = std::env::var("VIADUCT_SECRET")?;
//!     let config = AgentConfig::new("ivr-1", secret.as_bytes(), vec!["127.0.0.1:5070".parse()?]);
//!     let (agent, mut inbound) = Agent::start(config)?;
//!     while let Some(msg) = inbound.recv().await {
//!         let sip = msg.scanned();
//!         match sip.method() {
//!             Some(b"ACK") | None => {} // ACKs and responses get no answer
//!             Some(_) => {
//!                 let ok = response(sip, 200, "OK")
//!                     .to_tag("ivr1")
//!                     .header("Contact", b"<sip:ivr@10.0.0.5>") // the agent rewrites it
//!                     .build();
//!                 agent.respond(&msg, ok).await?;
//!             }
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! [`agent::Agent`] is the handle (respond, send requests, report load,
//! drain); [`agent::Inbound`] the stream of messages for this backend,
//! each typed by `rsip` and scanned by `encap-proto`, with where it came
//! from. [`stamp`] writes the affinity tag; [`respond`] builds responses.
//!
//! Sans-I/O parts, testable by feeding frames and time:
//!
//! * [`link`]: one balancer link (handshake, load reports, ping, drain);
//! * [`route`]: the next hop of a response (Via) or a request (Route /
//!   Request-URI);
//! * [`dialogs`]: active calls counted from the dialogs that pass;
//! * [`peer::decide`]: peer mode's choice of where a new call goes.
//!
//! Without a balancer, [`peer`] mode lets the backends balance among
//! themselves: the agent listens for SIP itself and hands calls to lighter
//! peers (by 302 or by forwarding over a peer link).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod dialogs;
pub mod link;
pub mod peer;
pub mod resolve;
pub mod respond;
pub mod route;
pub mod stamp;

pub use encap_proto::frame::{DrainState, LoadReport, Transport};
