//! The balancer's protocol logic, free of I/O.
//!
//! Everything here is fed messages and the time and returns what to send;
//! nothing reads a clock, opens a socket or spawns a task, so every routing
//! rule is tested by feeding bytes and time (see `ARCHITECTURE.md`).
//!
//! * [`router`]: the routing method of design.md §1-§4 and §8 as one state
//!   machine (affinity tags, new-call table, response path, bad input).
//! * [`new_calls`]: the new-call table (design.md §3).
//! * [`select`]: choosing a backend for a new call: pools, policies
//!   (least-loaded, weighted round robin, least-traffic, hash), thresholds
//!   and overflow, load and traffic accounting.
//! * [`rules`]: content rules sending a new call to a pool.
//! * [`hash`]: the (weighted) rendezvous hash every replica computes alike.
//! * [`proxy`]: the stateless proxy of plain SIP backends (design.md §7):
//!   our Via and Record-Route, Max-Forwards, loop detection, the response
//!   path by Via, OPTIONS probes.
//! * [`reply`]: stateless responses the balancer answers itself
//!   (RFC 3261 §8.2.6): 400/403/404/413/481/483/503/513.

pub mod hash;
pub mod new_calls;
pub mod proxy;
pub mod reply;
pub mod router;
pub mod rules;
pub mod select;
