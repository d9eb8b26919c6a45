//! The new-call table (design.md §3): the only memory the balancer keeps
//! about calls, and only about new ones.
//!
//! An entry maps a Call-ID to the backend chosen for its first request, so
//! that untagged repeats (retransmissions, CANCEL, the ACK of a failure, a
//! retry after a 401/407 challenge) reach the same backend.
//!
//! * made when an untagged request is routed by selection;
//! * lives `lifetime` (64·T1 = 32 s) from creation;
//! * every provisional response of the call that passes back refreshes it
//!   to `lifetime` from then (a call may ring for minutes and be CANCELed);
//! * the final response starts the linger: `lifetime` more for the ACK and
//!   retransmissions, then it goes;
//! * bounded: when full, [`NewCallTable::insert`] refuses and the caller
//!   falls back to a stateless rendezvous hash of the Call-ID.
//!
//! Keys are a keyed 64-bit hash of the Call-ID, not the Call-ID itself:
//! an entry is a fixed 24 bytes with no heap allocation of its own. The
//! hash key is random per process (given by the driver), so a sender cannot
//! craft colliding Call-IDs.
//!
//! Expiry is exact for lookups (an entry past its deadline is never used)
//! and lazy for memory: entries are reclaimed by [`NewCallTable::expire`],
//! which the driver calls at [`NewCallTable::next_expiry`], on a grid of
//! [`EXPIRY_TICK_MS`] (one wake-up per tick at most, not one per call).

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::time::{Duration, Instant};

use nohash_hasher::BuildNoHashHasher;

/// Granularity of [`NewCallTable::next_expiry`], in milliseconds: at 500
/// new calls per second, a wake-up per call deadline was about a tenth of
/// the balancer's CPU per call.
pub const EXPIRY_TICK_MS: u64 = 100;
use siphasher::sip::SipHasher13;

/// The default lifetime: 64 × T1 (RFC 3261 §17.1.1.2), 32 s.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(32);
/// The default bound on entries (about 45 bytes each with the expiry queue).
pub const DEFAULT_CAPACITY: usize = 500_000;

/// A Call-ID as the table keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallKey(u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Milliseconds since the table's epoch after which the entry is gone.
    deadline_ms: u64,
    backend: u16,
    /// The final response passed: refreshes no longer extend it.
    lingering: bool,
}

/// Why an entry could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("new-call table full ({capacity} entries): fall back to the rendezvous hash")]
pub struct TableFull {
    /// The bound in force.
    pub capacity: usize,
}

/// The new-call table.
#[derive(Debug)]
pub struct NewCallTable {
    map: HashMap<u64, Entry, BuildNoHashHasher<u64>>,
    /// (deadline, key) in the order entries were made; see the module doc.
    queue: VecDeque<(u64, u64)>,
    lifetime_ms: u64,
    capacity: usize,
    hash_keys: (u64, u64),
    epoch: Option<Instant>,
}

impl NewCallTable {
    /// An empty table. `hash_keys` must be random per process.
    pub fn new(lifetime: Duration, capacity: usize, hash_keys: (u64, u64)) -> NewCallTable {
        NewCallTable {
            map: HashMap::with_hasher(BuildNoHashHasher::default()),
            queue: VecDeque::new(),
            lifetime_ms: u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
            capacity,
            hash_keys,
            epoch: None,
        }
    }

    /// New limits (a configuration reload): entries made from now on live
    /// `lifetime`; the table holds at most `capacity` (entries above a
    /// lowered bound stay until they expire).
    pub fn set_limits(&mut self, lifetime: Duration, capacity: usize) {
        self.lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        self.capacity = capacity;
    }

    /// The table's key for a Call-ID.
    pub fn key(&self, call_id: &[u8]) -> CallKey {
        let mut h = SipHasher13::new_with_keys(self.hash_keys.0, self.hash_keys.1);
        h.write(call_id);
        CallKey(h.finish())
    }

    fn ms(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn ms_ro(&self, now: Instant) -> u64 {
        self.epoch.map_or(0, |epoch| {
            u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
        })
    }

    /// The backend of a live entry.
    pub fn get(&self, now: Instant, key: CallKey) -> Option<u16> {
        let now_ms = self.ms_ro(now);
        self.map
            .get(&key.0)
            .filter(|e| e.deadline_ms > now_ms)
            .map(|e| e.backend)
    }

    /// Makes (or remakes) the entry of a call routed by selection.
    pub fn insert(&mut self, now: Instant, key: CallKey, backend: u16) -> Result<(), TableFull> {
        let now_ms = self.ms(now);
        let deadline_ms = now_ms.saturating_add(self.lifetime_ms);
        if let Some(e) = self.map.get_mut(&key.0) {
            // A stale entry not reclaimed yet, or a new call reusing a
            // Call-ID: either way the new choice wins.
            *e = Entry {
                deadline_ms,
                backend,
                lingering: false,
            };
            return Ok(());
        }
        if self.map.len() >= self.capacity {
            self.expire(now);
            if self.map.len() >= self.capacity {
                return Err(TableFull {
                    capacity: self.capacity,
                });
            }
        }
        self.map.insert(
            key.0,
            Entry {
                deadline_ms,
                backend,
                lingering: false,
            },
        );
        self.queue.push_back((deadline_ms, key.0));
        Ok(())
    }

    /// A provisional response of the call passed back: the entry lives
    /// `lifetime` from now. No effect once the final response has passed.
    pub fn refresh(&mut self, now: Instant, key: CallKey) {
        let now_ms = self.ms(now);
        let lifetime = self.lifetime_ms;
        if let Some(e) = self.map.get_mut(&key.0) {
            if !e.lingering && e.deadline_ms > now_ms {
                e.deadline_ms = now_ms.saturating_add(lifetime);
            }
        }
    }

    /// The final response of the call passed back: the entry lingers
    /// `lifetime` from now, then goes.
    pub fn linger(&mut self, now: Instant, key: CallKey) {
        let now_ms = self.ms(now);
        let lifetime = self.lifetime_ms;
        if let Some(e) = self.map.get_mut(&key.0) {
            if !e.lingering && e.deadline_ms > now_ms {
                e.deadline_ms = now_ms.saturating_add(lifetime);
                e.lingering = true;
            }
        }
    }

    /// Reclaims every entry past its deadline; returns how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let now_ms = self.ms(now);
        let mut gone = 0;
        while let Some(&(deadline, key)) = self.queue.front() {
            if deadline > now_ms {
                break;
            }
            self.queue.pop_front();
            match self.map.get(&key) {
                Some(e) if e.deadline_ms <= now_ms => {
                    self.map.remove(&key);
                    gone += 1;
                }
                // Refreshed since: look again at its new deadline.
                Some(e) => self.queue.push_back((e.deadline_ms, key)),
                None => {}
            }
        }
        // Give memory back after a burst: the table follows the new-call
        // rate of the last lifetime, not its peak.
        if self.map.capacity() > 4 * self.map.len() + 1024 {
            self.map.shrink_to(2 * self.map.len());
            self.queue.shrink_to(2 * self.queue.len());
        }
        gone
    }

    /// When [`expire`](Self::expire) has work next: the oldest deadline,
    /// rounded up to the [`EXPIRY_TICK_MS`] grid so that the deadlines of
    /// many calls share one wake-up (memory is reclaimed up to a tick late;
    /// lookups never use an expired entry).
    pub fn next_expiry(&self) -> Option<Instant> {
        let (deadline, _) = self.queue.front()?;
        let tick = deadline
            .div_ceil(EXPIRY_TICK_MS)
            .saturating_mul(EXPIRY_TICK_MS);
        Some(self.epoch? + Duration::from_millis(tick))
    }

    /// Entries held (live or awaiting reclaim).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of memory one entry costs, map slot and expiry-queue slot
    /// together, at the map's current load (for metrics and the README).
    pub fn bytes_per_entry(&self) -> usize {
        let slot = std::mem::size_of::<(u64, Entry)>() + 1; // + hashbrown control byte
        let queue = std::mem::size_of::<(u64, u64)>();
        let load = if self.map.capacity() == 0 {
            1.0
        } else {
            self.map.len().max(1) as f64 / self.map.capacity() as f64
        };
        (slot as f64 / load.max(0.5)) as usize + queue
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick the origin of time
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn table() -> (NewCallTable, Instant) {
        (
            NewCallTable::new(DEFAULT_LIFETIME, 4, (1, 2)),
            Instant::now(),
        )
    }

    #[test]
    fn an_entry_lives_32_seconds_from_creation() {
        let (mut t, t0) = table();
        let k = t.key(b"call-1");
        t.insert(t0, k, 3).unwrap();
        assert_eq!(t.get(t0 + 31 * S, k), Some(3));
        assert_eq!(t.get(t0 + 32 * S, k), None);
        assert_eq!(t.expire(t0 + 32 * S), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn provisional_responses_keep_a_ringing_call_alive() {
        let (mut t, t0) = table();
        let k = t.key(b"ringing");
        t.insert(t0, k, 1).unwrap();
        // 180 Ringing every 20 s for two minutes.
        for i in 1..=6 {
            t.refresh(t0 + 20 * i * S, k);
            t.expire(t0 + 20 * i * S);
        }
        // CANCEL 40 s after the first 180, long past the first 32 s.
        assert_eq!(t.get(t0 + 140 * S, k), Some(1));
        // The 487 is final: 32 s of linger, then gone.
        t.linger(t0 + 141 * S, k);
        t.refresh(t0 + 150 * S, k); // a late provisional does not extend it
        assert_eq!(t.get(t0 + 172 * S, k), Some(1));
        assert_eq!(t.get(t0 + 173 * S, k), None);
        assert_eq!(t.expire(t0 + 173 * S), 1);
    }

    #[test]
    fn an_expired_entry_is_not_revived_by_a_late_refresh() {
        let (mut t, t0) = table();
        let k = t.key(b"c");
        t.insert(t0, k, 1).unwrap();
        t.refresh(t0 + 40 * S, k);
        assert_eq!(t.get(t0 + 41 * S, k), None);
    }

    #[test]
    fn full_table_refuses_then_makes_room_as_entries_expire() {
        let (mut t, t0) = table();
        for i in 0..4u16 {
            let k = t.key(format!("c{i}").as_bytes());
            t.insert(t0 + u32::from(i) * S, k, i).unwrap();
        }
        let k = t.key(b"one too many");
        assert_eq!(t.insert(t0 + 10 * S, k, 9), Err(TableFull { capacity: 4 }));
        // c0 expires at 32 s: room for one.
        assert_eq!(t.insert(t0 + 32 * S, k, 9), Ok(()));
        assert_eq!(t.get(t0 + 32 * S, k), Some(9));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn next_expiry_follows_the_oldest_entry() {
        let (mut t, t0) = table();
        assert_eq!(t.next_expiry(), None);
        let k = t.key(b"c");
        t.insert(t0, k, 1).unwrap();
        assert_eq!(t.next_expiry(), Some(t0 + 32 * S));
        t.refresh(t0 + 10 * S, k);
        // The queue slot still says 32 s; at 32 s it is re-queued for 42 s.
        assert_eq!(t.expire(t0 + 32 * S), 0);
        assert_eq!(t.next_expiry(), Some(t0 + 42 * S));
    }

    #[test]
    fn many_deadlines_share_a_wake_up() {
        let t0 = Instant::now();
        let mut t = NewCallTable::new(DEFAULT_LIFETIME, 10_000, (1, 2));
        let ms = Duration::from_millis(1);
        // A call every millisecond: deadlines 32.001 s .. 32.999 s.
        for i in 1..1000u32 {
            let k = t.key(format!("c{i}").as_bytes());
            t.insert(t0 + ms * i, k, 1).unwrap();
        }
        let mut wake_ups = 0;
        let mut now = t0;
        while let Some(at) = t.next_expiry() {
            assert!(at > now, "the next expiry moves forward");
            now = at;
            t.expire(now);
            wake_ups += 1;
        }
        // 999 deadlines over 998 ms: one wake-up per 100 ms tick they touch.
        assert!(wake_ups <= 11, "{wake_ups} wake-ups for 999 deadlines");
        assert!(t.is_empty());
    }

    #[test]
    fn memory_is_given_back_after_a_burst() {
        let t0 = Instant::now();
        let mut t = NewCallTable::new(DEFAULT_LIFETIME, 1_000_000, (1, 2));
        for i in 0..100_000u32 {
            let k = t.key(&i.to_be_bytes());
            t.insert(t0, k, 1).unwrap();
        }
        let peak = t.map.capacity();
        assert!(peak >= 100_000);
        assert_eq!(t.expire(t0 + 32 * S), 100_000);
        assert!(
            t.map.capacity() < peak / 8,
            "capacity {} after expiry, peak {peak}",
            t.map.capacity()
        );
    }

    #[test]
    fn keys_depend_on_the_process_secret() {
        let a = NewCallTable::new(DEFAULT_LIFETIME, 1, (1, 2));
        let b = NewCallTable::new(DEFAULT_LIFETIME, 1, (3, 4));
        assert_eq!(a.key(b"x"), a.key(b"x"));
        assert_ne!(a.key(b"x"), b.key(b"x"));
    }
}
