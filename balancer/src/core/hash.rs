//! Rendezvous (highest random weight) hashing of a Call-ID over backends.
//!
//! Every balancer replica computes the same choice from the same Call-ID
//! and the same set of live backends, with no state and no coordination:
//! the hash keys are fixed, not per process. When a backend leaves, only
//! the calls it had move, and they spread evenly over the rest.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use super::router::BackendId;

const KEYS: (u64, u64) = (0x7669_6164_7563_742d, 0x7265_6e64_657a_766f);

/// The backend among `candidates` with the highest weight for `call_id`.
pub fn rendezvous(call_id: &[u8], candidates: &[BackendId]) -> Option<BackendId> {
    candidates
        .iter()
        .copied()
        .max_by_key(|&b| (score(call_id, b), b))
}

fn score(call_id: &[u8], backend: BackendId) -> u64 {
    let mut h = SipHasher13::new_with_keys(KEYS.0, KEYS.1);
    h.write(call_id);
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
    }
}
