//! Viaduct balancer: the library half of the `viaduct` binary.
//!
//! * [`config`]: the TOML configuration, typed, defaults that serve.
//! * [`core`]: protocol logic, free of I/O (fed bytes and time, returns
//!   what to send).
//! * [`driver`]: tokio tasks that own the sockets and drive the core.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Drivers are the one place that reads clocks and spawns tasks.

pub mod config;
pub mod core;
pub mod driver;
