//! Byte search for the short haystacks of a SIP header section.
//!
//! The scanner looks for one byte (a line feed, `:`, `@`, `;`, `>`) in spans
//! that are mostly 5 to 80 bytes long. `memchr::memchr` pays for its runtime
//! CPU dispatch (an indirect call that cannot be inlined) before the first
//! byte is compared, which on such spans costs as much as the search. On
//! x86-64, SSE2 is part of the baseline, so [`find`] uses memchr's SSE2
//! searcher directly: same crate, same code, inlined into the scanner.
//! Elsewhere it is `memchr::memchr`.

/// Index of the first `needle` in `hay`.
#[inline]
pub(crate) fn find(needle: u8, hay: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if let Some(searcher) = memchr::arch::x86_64::sse2::memchr::One::new(needle) {
        return searcher.find(hay);
    }
    memchr::memchr(needle, hay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memchr::memchr;
    use proptest::prelude::*;

    #[test]
    fn finds_the_first_match_at_every_position() {
        for len in 0..300 {
            for at in 0..len {
                let mut hay = vec![b'a'; len];
                hay[at] = b'\n';
                if at + 1 < len {
                    hay[len - 1] = b'\n';
                }
                assert_eq!(find(b'\n', &hay), Some(at), "len {len} at {at}");
            }
            assert_eq!(find(b'\n', &vec![b'a'; len]), None, "len {len}");
        }
    }

    #[test]
    fn borrows_do_not_make_false_matches() {
        // 0x0b - 0x0a = 0x01 and 0x0a + 0x01: the neighbours of the needle
        // and bytes with the high bit set must not be reported.
        let hay = [0x0b, 0x09, 0x8a, 0xff, 0x00, 0x01, 0x0b, 0x8a, 0x0a];
        assert_eq!(find(0x0a, &hay), Some(8));
        assert_eq!(find(0x00, &[0x01, 0x00, 0x00]), Some(1));
        assert_eq!(find(0xff, &[0xfe, 0x7f, 0x00, 0xff]), Some(3));
    }

    proptest! {
        #[test]
        fn agrees_with_memchr(hay in proptest::collection::vec(any::<u8>(), 0..600), needle: u8) {
            prop_assert_eq!(find(needle, &hay), memchr(needle, &hay));
        }

        #[test]
        fn agrees_with_memchr_on_sparse_text(
            hay in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'\r'), Just(b'\n'), Just(b':')], 0..400),
            needle in prop_oneof![Just(b'\n'), Just(b':'), Just(b'\r')],
        ) {
            prop_assert_eq!(find(needle, &hay), memchr(needle, &hay));
        }
    }
}
