//! End-to-end tests of Viaduct with real parts: SIPp clients and servers,
//! the `viaduct` binary, and containers built from our own binaries.
//! The tests live in `tests/tests/`; this library holds what they share.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
