//! Field readers and writers (SPEC.md §2).
//!
//! [`Reader`] walks a frame body held as [`Bytes`]; every read is bounds
//! checked and a short body is an error naming the frame and the field.
//! Payloads are returned as slices of the body, without copying.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::codec::{FrameError, MalformedReason};
use super::types::{FrameType, Transport};

pub(super) struct Reader {
    body: Bytes,
    frame: FrameType,
}

impl Reader {
    pub(super) fn new(frame: FrameType, body: Bytes) -> Self {
        Reader { body, frame }
    }

    fn malformed(&self, field: &'static str, reason: MalformedReason) -> FrameError {
        FrameError::Malformed {
            frame: self.frame,
            field,
            reason,
        }
    }

    fn need(&self, field: &'static str, n: usize) -> Result<(), FrameError> {
        if self.body.remaining() < n {
            return Err(self.malformed(
                field,
                MalformedReason::Truncated {
                    needed: n,
                    left: self.body.remaining(),
                },
            ));
        }
        Ok(())
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(field, 1)?;
        Ok(self.body.get_u8())
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(field, 2)?;
        Ok(self.body.get_u16())
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(field, 4)?;
        Ok(self.body.get_u32())
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(field, 8)?;
        Ok(self.body.get_u64())
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], FrameError> {
        self.need(field, N)?;
        let mut out = [0u8; N];
        self.body.copy_to_slice(&mut out);
        Ok(out)
    }

    pub(super) fn string(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u16(field)?);
        self.need(field, len)?;
        let raw = self.body.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| self.malformed(field, MalformedReason::NotUtf8))
    }

    pub(super) fn transport(&mut self, field: &'static str) -> Result<Transport, FrameError> {
        let code = self.u8(field)?;
        Transport::from_code(code)
            .ok_or_else(|| self.malformed(field, MalformedReason::UnknownTransport(code)))
    }

    pub(super) fn addr(&mut self, field: &'static str) -> Result<SocketAddr, FrameError> {
        let ip = match self.u8(field)? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?)),
            other => return Err(self.malformed(field, MalformedReason::UnknownFamily(other))),
        };
        let port = self.u16(field)?;
        Ok(match ip {
            IpAddr::V4(v4) => SocketAddr::from((v4, port)),
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
        })
    }

    /// The rest of the body (the payload), zero copy.
    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }

    /// Checks that every byte was read (SPEC.md §2: no trailing bytes).
    pub(super) fn finish(self) -> Result<(), FrameError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(
                "end of body",
                MalformedReason::TrailingBytes(self.body.len()),
            ))
        }
    }
}

pub(super) fn put_str(out: &mut BytesMut, field: &'static str, s: &str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::Unencodable {
        field,
        reason: "string longer than 65535 bytes",
    })?;
    out.put_u16(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

pub(super) fn put_addr(out: &mut BytesMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.put_u8(4);
            out.put_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.put_u8(6);
            out.put_slice(&v6.octets());
        }
    }
    out.put_u16(addr.port());
}

/// Encoded length of an address field.
pub(super) const fn addr_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2,
    }
}
