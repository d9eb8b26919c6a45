//! Affinity tags: which backend a call belongs to, carried in the messages
//! themselves (design.md §2).
//!
//! A tag is 17 lowercase hex digits, safe in a URI parameter, a Via branch
//! and a header value:
//!
//! ```text
//!  0 1 2 3   4       5 . . . . . . . . . . . 16
//! +-------+-------+---------------------------+
//! |backend| flags |  MAC, 48 bits             |
//! |  id   | (hex) |  (12 hex digits)          |
//! +-------+-------+---------------------------+
//!   u16     bit 0: call-independent
//! ```
//!
//! The MAC is SipHash-2-4 (a keyed PRF, 128-bit key derived from the
//! cluster secret) over the backend id, the flags and the Call-ID, so a tag
//! seen in one call cannot steer another; a call-independent tag (a
//! REGISTER binding, a subscription that outlives its dialog) covers no
//! Call-ID and is marked so, and the balancer accepts it only where its
//! configuration allows. Keys rotate: [`TagKeys`] verifies against the
//! current and the previous secret and mints with the current one.

use std::hash::Hasher;

use sha2::{Digest, Sha256};
use siphasher::sip::SipHasher24;

/// Length of a tag in bytes.
pub const TAG_LEN: usize = 17;
const FLAG_CALL_INDEPENDENT: u8 = 0x1;
const MAC_HEX: usize = 12;
const MAC_MASK: u64 = (1 << 48) - 1;

/// What a verified tag says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The backend the call belongs to.
    pub backend: u16,
    /// The tag covers no Call-ID (a registration or subscription Contact).
    pub call_independent: bool,
    /// It verified with the previous key, not the current one (rotation).
    pub previous_key: bool,
}

/// Why a tag was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// Not 17 hex digits, or flags undefined in this version.
    #[error("affinity tag is malformed (expected {TAG_LEN} hex digits)")]
    Malformed,
    /// The MAC does not verify with the current or previous key: forged,
    /// copied from another call, or minted with a retired secret.
    #[error("affinity tag does not verify (forged, from another call, or a retired key)")]
    BadMac,
}

/// A 128-bit tag key.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key(u64, u64);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    fn derive(secret: &[u8]) -> Key {
        let digest = Sha256::new()
            .chain_update(b"viaduct affinity tag key v1\0")
            .chain_update(secret)
            .finalize();
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&digest[..8]);
        b.copy_from_slice(&digest[8..16]);
        Key(u64::from_le_bytes(a), u64::from_le_bytes(b))
    }

    /// SipHash-2-4 of `backend` (big-endian), `flags` and, unless the tag
    /// is call-independent, the Call-ID bytes.
    fn mac(self, backend: u16, flags: u8, call_id: &[u8]) -> u64 {
        let mut h = SipHasher24::new_with_keys(self.0, self.1);
        let call_id = if flags & FLAG_CALL_INDEPENDENT == 0 {
            call_id
        } else {
            &[]
        };
        let [b0, b1] = backend.to_be_bytes();
        // One write of the whole input when it fits a small buffer (the
        // hasher's per-write tail handling costs more than the copy); the
        // same bytes in the same order either way, so the same MAC.
        let mut buf = [0u8; 128];
        if let Some(dst) = buf.get_mut(3..3 + call_id.len()) {
            dst.copy_from_slice(call_id);
            buf[..3].copy_from_slice(&[b0, b1, flags]);
            h.write(&buf[..3 + call_id.len()]);
        } else {
            h.write(&[b0, b1, flags]);
            h.write(call_id);
        }
        h.finish() & MAC_MASK
    }
}

/// The tag keys of a cluster: the current secret, and the previous one
/// while a rotation is under way.
#[derive(Debug, Clone)]
pub struct TagKeys {
    current: Key,
    previous: Option<Key>,
}

impl TagKeys {
    /// Keys derived from the cluster secret.
    pub fn new(secret: &[u8]) -> TagKeys {
        TagKeys {
            current: Key::derive(secret),
            previous: None,
        }
    }

    /// Keys that also accept tags minted with `previous` (rotation).
    pub fn with_previous(secret: &[u8], previous: &[u8]) -> TagKeys {
        TagKeys {
            current: Key::derive(secret),
            previous: Some(Key::derive(previous)),
        }
    }

    /// A tag naming `backend` for the call `call_id`.
    pub fn mint(&self, backend: u16, call_id: &[u8]) -> [u8; TAG_LEN] {
        self.mint_flags(backend, 0, call_id)
    }

    /// A call-independent tag naming `backend` (for a Contact that outlives
    /// its dialog: a registration binding, a subscription).
    pub fn mint_call_independent(&self, backend: u16) -> [u8; TAG_LEN] {
        self.mint_flags(backend, FLAG_CALL_INDEPENDENT, b"")
    }

    fn mint_flags(&self, backend: u16, flags: u8, call_id: &[u8]) -> [u8; TAG_LEN] {
        let mac = self.current.mac(backend, flags, call_id);
        let mut out = [0u8; TAG_LEN];
        put_hex(&mut out[0..4], u64::from(backend));
        put_hex(&mut out[4..5], u64::from(flags));
        put_hex(&mut out[5..], mac);
        out
    }

    /// Verifies `tag` as seen in a message of the call `call_id`.
    pub fn verify(&self, tag: &[u8], call_id: &[u8]) -> Result<Tag, TagError> {
        if tag.len() != TAG_LEN {
            return Err(TagError::Malformed);
        }
        let backend = u16::try_from(parse_hex(&tag[0..4])?).map_err(|_| TagError::Malformed)?;
        let flags = u8::try_from(parse_hex(&tag[4..5])?).map_err(|_| TagError::Malformed)?;
        if flags & !FLAG_CALL_INDEPENDENT != 0 {
            return Err(TagError::Malformed);
        }
        let mac = parse_hex(&tag[5..5 + MAC_HEX])?;
        let tag = |previous_key| Tag {
            backend,
            call_independent: flags & FLAG_CALL_INDEPENDENT != 0,
            previous_key,
        };
        // Both comparisons run whatever the first gives: no timing hint of
        // which key matched beyond the result itself.
        let current = self.current.mac(backend, flags, call_id) == mac;
        let previous = self
            .previous
            .is_some_and(|k| k.mac(backend, flags, call_id) == mac);
        match (current, previous) {
            (true, _) => Ok(tag(false)),
            (false, true) => Ok(tag(true)),
            (false, false) => Err(TagError::BadMac),
        }
    }
}

fn put_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

fn parse_hex(digits: &[u8]) -> Result<u64, TagError> {
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(TagError::Malformed),
        };
        Ok(acc << 4 | u64::from(v))
    })
}

/// The backend id a name stands for when none is configured: a 16-bit fold
/// of a fixed-key SipHash-2-4 of the name, never 0. The balancer uses it for
/// agents not listed in `agents.ids` and for plain SIP members, peers use it
/// for each other (peer mode); every replica, peer and restart computes the
/// same, so tags keep their meaning. Its values are part of the wire
/// contract: they never change between releases.
pub fn backend_id_of(name: &str) -> u16 {
    let mut h = SipHasher24::new_with_keys(0x7669_6164_7563_7421, 0x6261_636b_656e_6421);
    h.write(name.as_bytes());
    let x = h.finish();
    // Truncation is the point: fold the 64 bits into 16.
    #[allow(clippy::cast_possible_truncation)]
    let id = (x ^ (x >> 16) ^ (x >> 32) ^ (x >> 48)) as u16;
    if id == 0 {
        1
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_ids_from_names_are_fixed_and_never_zero() {
        // Pinned: tags minted by one release are read by the next.
        for (name, id) in [
            ("b1", 0x587e),
            ("b2", 0x4e03),
            ("backend-0", 0xfbed),
            ("pbx-east-1", 0x0756),
            ("", 0x2d78),
        ] {
            assert_eq!(backend_id_of(name), id, "{name:?}");
        }
        for n in 0..10_000 {
            assert_ne!(backend_id_of(&format!("n{n}")), 0);
        }
    }

    #[test]
    fn minted_tags_verify_for_their_call_only() {
        let keys = TagKeys::new(b"cluster secret");
        let tag = keys.mint(0x01a2, b"call-1@example.com");
        assert!(tag.iter().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            keys.verify(&tag, b"call-1@example.com"),
            Ok(Tag {
                backend: 0x01a2,
                call_independent: false,
                previous_key: false
            })
        );
        assert_eq!(
            keys.verify(&tag, b"call-2@example.com"),
            Err(TagError::BadMac)
        );
        // Case-insensitive hex: a proxy that upper-cases it does not break it.
        assert!(keys
            .verify(&tag.to_ascii_uppercase(), b"call-1@example.com")
            .is_ok());
    }

    /// The MAC as first written: three writes into the hasher. The one-write
    /// form must give the same bytes (tags minted by one release are read
    /// by the next), for short and long Call-IDs.
    fn mac_three_writes(key: Key, backend: u16, flags: u8, call_id: &[u8]) -> u64 {
        let mut h = SipHasher24::new_with_keys(key.0, key.1);
        h.write(&backend.to_be_bytes());
        h.write_u8(flags);
        if flags & FLAG_CALL_INDEPENDENT == 0 {
            h.write(call_id);
        }
        h.finish() & MAC_MASK
    }

    #[test]
    fn the_mac_is_the_three_write_mac() {
        let key = Key::derive(b"cluster secret");
        for len in [0usize, 1, 7, 8, 9, 36, 124, 125, 126, 200, 1000] {
            let call_id: Vec<u8> = (0..len).map(|i| b"abcdef0123@.-"[i % 13]).collect();
            for (backend, flags) in [(1u16, 0u8), (0x01a2, 0), (0xffff, FLAG_CALL_INDEPENDENT)] {
                assert_eq!(
                    key.mac(backend, flags, &call_id),
                    mac_three_writes(key, backend, flags, &call_id),
                    "len {len}, backend {backend}, flags {flags}"
                );
            }
        }
    }

    #[test]
    fn changing_the_backend_id_breaks_the_mac() {
        let keys = TagKeys::new(b"s");
        let mut tag = keys.mint(1, b"c");
        tag[3] = b'2';
        assert_eq!(keys.verify(&tag, b"c"), Err(TagError::BadMac));
    }

    #[test]
    fn rotation_accepts_the_previous_key_and_says_so() {
        let old = TagKeys::new(b"old");
        let tag = old.mint(7, b"c");
        let rotated = TagKeys::with_previous(b"new", b"old");
        assert_eq!(rotated.verify(&tag, b"c").map(|t| t.previous_key), Ok(true));
        assert_eq!(
            TagKeys::new(b"new").verify(&tag, b"c"),
            Err(TagError::BadMac)
        );
    }

    #[test]
    fn call_independent_tags_ignore_the_call_id() {
        let keys = TagKeys::new(b"s");
        let tag = keys.mint_call_independent(9);
        let t = keys.verify(&tag, b"any call").unwrap();
        assert!(t.call_independent);
        assert_eq!(keys.verify(&tag, b"another"), Ok(t));
    }

    #[test]
    fn malformed_tags_are_named_as_such() {
        let keys = TagKeys::new(b"s");
        for bad in [
            &b""[..],
            b"0001",
            b"zzzzzzzzzzzzzzzzz",
            b"0001200000000000000",
            b"00012000000000000",
        ] {
            assert_eq!(keys.verify(bad, b"c"), Err(TagError::Malformed), "{bad:?}");
        }
    }
}
