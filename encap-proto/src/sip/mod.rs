//! SIP over streams and datagrams: framing, scanning, rewriting.
