//! Rendezvous (highest random weight) hashing of a key over backends.
//!
//! Every balancer replica computes the same choice from the same key and
//! the same set of live backends (and their capacity weights), with no
//! state and no coordination: the hash keys are fixed, not per process.
//! When a backend leaves, only the keys it had move, and they spread over
//! the rest in proportion to their weights.
//!
//! # Weighted form
//!
//! Backend `b` with weight `w` scores `w / -ln(u)` for the key, where
//! `u ∈ (0, 1)` is the top 53 bits of a fixed-key SipHash-1-3 of
//! (key, `b`); the highest score wins, ties go to the higher id. Backend
//! `b` then wins a uniformly random key with probability `w_b / Σ w`
//! (the scores are exponential clocks: `-ln(u)/w` is Exp(w), and the
//! smallest of independent exponentials is `b` with probability
//! `w_b / Σ w`). With equal weights the order is the order of `u`.
//!
//! `ln` is IEEE-754 double arithmetic from the platform's libm: replicas
//! built for the same target agree bit for bit.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use super::router::BackendId;

const KEYS: (u64, u64) = (0x7669_6164_7563_742d, 0x7265_6e64_657a_766f);

/// A stable backend id for a name (an agent not listed in `agents.ids`, a
/// plain SIP member); the same function peers use (peer mode).
pub use encap_proto::tag::backend_id_of;

/// The backend among `candidates` (all of weight 1) with the highest score
/// for `key`.
pub fn rendezvous(key: &[u8], candidates: &[BackendId]) -> Option<BackendId> {
    candidates
        .iter()
        .copied()
        .max_by_key(|&b| (score(key, b), b))
}

/// The backend among `candidates` — `(id, weight)` pairs — with the highest
/// weighted score for `key` (see the module doc). A weight of 0 counts as 1.
pub fn rendezvous_weighted(
    key: &[u8],
    candidates: impl IntoIterator<Item = (BackendId, u32)>,
) -> Option<BackendId> {
    let mut best: Option<(f64, BackendId)> = None;
    for (b, w) in candidates {
        let s = weighted_score(key, b, w);
        if best.is_none_or(|(bs, bb)| s > bs || (s == bs && b > bb)) {
            best = Some((s, b));
        }
    }
    best.map(|(_, b)| b)
}

/// `w / -ln(u)`, `u` in (0, 1) from the hash.
fn weighted_score(key: &[u8], backend: BackendId, weight: u32) -> f64 {
    // The top 53 bits as an odd multiple of 2^-54: strictly inside (0, 1).
    let bits = score(key, backend) >> 11;
    #[allow(clippy::cast_precision_loss)] // 53 bits: exact in an f64
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight.max(1)) / -u.ln()
}

fn score(key: &[u8], backend: BackendId) -> u64 {
    let mut h = SipHasher13::new_with_keys(KEYS.0, KEYS.1);
    h.write(key);
    h.write_u16(backend);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_input_same_choice_and_only_the_lost_backends_calls_move() {
        let all = [1, 2, 3, 4];
        let without_3 = [1, 2, 4];
        let mut moved_to = [0usize; 5];
        for i in 0..10_000 {
            let call = format!("call-{i}");
            let before = rendezvous(call.as_bytes(), &all).unwrap();
            assert_eq!(rendezvous(call.as_bytes(), &all), Some(before));
            let after = rendezvous(call.as_bytes(), &without_3).unwrap();
            if before == 3 {
                moved_to[usize::from(after)] += 1;
            } else {
                assert_eq!(after, before, "a call not on the lost backend moved");
            }
        }
        // The lost backend's calls spread evenly (each gets 1/3 ± 10%).
        let total: usize = moved_to.iter().sum();
        for b in [1, 2, 4] {
            let share = moved_to[b] as f64 / total as f64;
            assert!(
                (share - 1.0 / 3.0).abs() < 0.033,
                "backend {b} took {share}"
            );
        }
    }

    #[test]
    fn no_candidates_no_choice() {
        assert_eq!(rendezvous(b"c", &[]), None);
        assert_eq!(rendezvous_weighted(b"c", []), None);
    }

    #[test]
    fn equal_weights_agree_with_the_unweighted_hash() {
        let ids = [3, 9, 17, 200, 4000];
        for i in 0..5000 {
            let key = format!("k{i}");
            assert_eq!(
                rendezvous_weighted(key.as_bytes(), ids.iter().map(|&b| (b, 7))),
                rendezvous(key.as_bytes(), &ids)
            );
        }
    }

    #[test]
    fn weights_are_honoured_and_a_weight_change_moves_only_towards_the_heavier() {
        let mut counts = [0u32; 3];
        let mut moved_off_1 = 0;
        for i in 0..100_000 {
            let key = format!("call-{i}");
            let b = rendezvous_weighted(key.as_bytes(), [(0, 1), (1, 2), (2, 5)]).unwrap();
            counts[usize::from(b)] += 1;
            // Doubling backend 2's weight only ever moves keys onto it.
            let after = rendezvous_weighted(key.as_bytes(), [(0, 1), (1, 2), (2, 10)]).unwrap();
            assert!(after == b || after == 2);
            moved_off_1 += u32::from(b == 1 && after != 1);
        }
        // Each share within 4 standard deviations of its binomial
        // expectation (σ ≈ 0.1 points here): a real bias of a fraction of a
        // point fails.
        for (b, w) in [(0usize, 1.0), (1, 2.0), (2, 5.0)] {
            let share = f64::from(counts[b]) / 100_000.0;
            let want: f64 = w / 8.0;
            let sigma = (want * (1.0 - want) / 100_000.0).sqrt();
            assert!(
                (share - want).abs() < 4.0 * sigma,
                "backend {b}: {share} vs {want}"
            );
        }
        assert!(moved_off_1 > 0);
    }
}
