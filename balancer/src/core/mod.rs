//! The balancer's protocol logic, free of I/O.
//!
//! Everything here is fed messages and the time and returns what to send;
//! nothing reads a clock, opens a socket or spawns a task, so every routing
//! rule is tested by feeding bytes and time (see `ARCHITECTURE.md`).
//!
//! * [`standalone`]: what the balancer answers while no backend is
//!   registered: 503 with Retry-After to every request, 400 to a request
//!   that cannot be scanned, nothing to responses.
//! * [`reply`]: stateless responses the balancer answers itself
//!   (RFC 3261 §8.2.6): 503 when no backend can take a request, and the
//!   400/413/483/513 answers to bad input (design.md §8).
//!
//! The router state machine (affinity tags, the new-call table, the
//! response path of design.md §2-§4) joins this module with the balancer
//! issue.

pub mod hash;
pub mod new_calls;
pub mod reply;
pub mod router;
pub mod standalone;
