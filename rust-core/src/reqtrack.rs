//! Per-worker tracking of the requests between their balancer and log phases.
//!
//! nginx gives every attempt of a request to the balancer callback, and the outcome of the request to the log phase;
//! between them the library needs to remember which peers were tried, when each attempt started, and which attempt
//! is still counted as in flight. The table lives in the worker's own memory (one nginx worker runs one thread), is
//! allocated once, and is keyed by the address of nginx's request object. Lookups probe a fixed window of
//! [`PROBE`] entries, so a lookup is O(1) and holes left by removals never break a chain. When the window is full the
//! oldest entry is evicted and returned to the caller, who releases its in-flight counts: a request that never reaches
//! its log phase (a subrequest, a bug elsewhere) can leak nothing for longer than the table takes to cycle.

/// Attempts remembered per request; further retries still work, but only the first ones are excluded on re-pick.
pub const MAX_ATTEMPTS: usize = 4;
/// Entries probed per lookup.
pub const PROBE: usize = 16;

/// One attempt of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempt {
    /// Peer record and its generation when chosen.
    pub slot: u32,
    pub gen: u32,
    /// Clock (µs) when the balancer chose the peer.
    pub start_us: u64,
    /// Clock (µs) when the attempt ended; 0 while in flight.
    pub end_us: u64,
    /// Upstream status nginx reported for it (0 while in flight or unknown).
    pub status: u32,
}

/// A request being tracked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    /// Request address; 0 marks a free entry.
    pub key: usize,
    pub upstream: u32,
    /// Attempts started (may exceed [`MAX_ATTEMPTS`]; the last slot is then reused).
    pub count: u32,
    pub attempts: [Attempt; MAX_ATTEMPTS],
    pub born_us: u64,
}

impl Entry {
    /// The attempts remembered, oldest first.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts[..(self.count as usize).min(MAX_ATTEMPTS)]
    }

    /// The most recent attempt, if any.
    pub fn last_mut(&mut self) -> Option<&mut Attempt> {
        let n = (self.count as usize).min(MAX_ATTEMPTS);
        if n == 0 {
            None
        } else {
            Some(&mut self.attempts[n - 1])
        }
    }

    /// Appends an attempt (reusing the last place past [`MAX_ATTEMPTS`]).
    pub fn push(&mut self, a: Attempt) {
        let i = (self.count as usize).min(MAX_ATTEMPTS - 1);
        self.attempts[i] = a;
        self.count = self.count.saturating_add(1);
    }

    /// Whether the peer record `slot` was already tried.
    pub fn tried(&self, slot: u32) -> bool {
        self.attempts().iter().any(|a| a.slot == slot)
    }
}

/// The table. Keys are kept apart from the entries so that a probe reads two cache lines, not sixteen entries.
pub struct Table {
    keys: Box<[usize]>,
    entries: Box<[Entry]>,
    mask: usize,
}

impl Table {
    /// A table of `capacity` entries, rounded up to a power of two (at least [`PROBE`]).
    pub fn new(capacity: usize) -> Table {
        let cap = capacity.max(PROBE).next_power_of_two();
        Table {
            keys: vec![0; cap].into_boxed_slice(),
            entries: vec![Entry::default(); cap].into_boxed_slice(),
            mask: cap - 1,
        }
    }

    #[inline]
    fn home(&self, key: usize) -> usize {
        ((key as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    #[inline]
    fn position(&self, key: usize) -> Option<usize> {
        let h = self.home(key);
        (0..PROBE)
            .map(|k| (h + k) & self.mask)
            .find(|&i| self.entries[i].key == key)
    }

    /// The entry of `key`.
    pub fn find(&mut self, key: usize) -> Option<&mut Entry> {
        if key == 0 {
            return None;
        }
        let i = self.position(key)?;
        Some(&mut self.entries[i])
    }

    /// Starts tracking `key`. Returns the new entry and whatever it displaced: a stale entry of the same key (the
    /// request object was reused without a log phase) or the oldest entry of a full probe window.
    pub fn insert(
        &mut self,
        key: usize,
        upstream: u32,
        now_us: u64,
    ) -> (&mut Entry, Option<Entry>) {
        let h = self.home(key);
        // One pass: the key itself if present, else the first free place.
        let mut free = None;
        let mut found = None;
        for k in 0..PROBE {
            let i = (h + k) & self.mask;
            let at = self.keys[i];
            if at == key {
                found = Some(i);
                break;
            }
            if at == 0 && free.is_none() {
                free = Some(i);
            }
        }
        let i = found.or(free).unwrap_or_else(|| {
            (0..PROBE)
                .map(|k| (h + k) & self.mask)
                .min_by_key(|&i| self.entries[i].born_us)
                .unwrap_or(h)
        });
        let old = if self.keys[i] != 0 {
            Some(self.entries[i])
        } else {
            None
        };
        self.keys[i] = key;
        let e = &mut self.entries[i];
        e.key = key;
        e.upstream = upstream;
        e.count = 0;
        e.born_us = now_us;
        (e, old)
    }

    /// Stops tracking `key`; `f` sees its entry one last time (no copy of the entry is made).
    pub fn remove_with<T>(&mut self, key: usize, f: impl FnOnce(&Entry) -> T) -> Option<T> {
        if key == 0 {
            return None;
        }
        let i = self.position(key)?;
        self.keys[i] = 0;
        self.entries[i].key = 0;
        Some(f(&self.entries[i]))
    }

    /// Stops tracking `key` and returns a copy of its entry.
    pub fn remove(&mut self, key: usize) -> Option<Entry> {
        self.remove_with(key, |e| *e)
    }

    /// Entries in use (for status and tests).
    pub fn len(&self) -> usize {
        self.keys.iter().filter(|&&k| k != 0).count()
    }

    /// Whether no entry is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Rng, XorShift64};

    #[test]
    fn insert_find_remove() {
        let mut t = Table::new(64);
        let (e, old) = t.insert(0x1000, 3, 1);
        assert!(old.is_none());
        e.push(Attempt {
            slot: 5,
            gen: 1,
            start_us: 1,
            ..Attempt::default()
        });
        assert!(t.find(0x1000).unwrap().tried(5));
        assert!(!t.find(0x1000).unwrap().tried(6));
        // Reinserting the same key displaces the stale entry.
        let (_, old) = t.insert(0x1000, 3, 2);
        assert_eq!(old.unwrap().count, 1);
        assert_eq!(t.remove(0x1000).unwrap().born_us, 2);
        assert!(t.find(0x1000).is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn many_attempts_reuse_the_last_place() {
        let mut e = Entry::default();
        for s in 0..20 {
            e.push(Attempt {
                slot: s,
                ..Attempt::default()
            });
        }
        assert_eq!(e.count, 20);
        assert_eq!(e.attempts().len(), MAX_ATTEMPTS);
        assert_eq!(e.attempts()[MAX_ATTEMPTS - 1].slot, 19);
    }

    /// Property: with random inserts and removes, every live key is found, and a full table evicts the oldest of the
    /// probe window rather than losing a live key silently.
    #[test]
    fn model_check_against_a_map() {
        let mut rng = XorShift64::new(11);
        let mut t = Table::new(64);
        let mut model = std::collections::HashMap::new();
        for step in 0..100_000u64 {
            let key = (1 + rng.below(300) as usize) * 16;
            if rng.below(2) == 0 {
                let (_, old) = t.insert(key, 0, step);
                model.insert(key, step);
                if let Some(old) = old {
                    if old.key != key {
                        assert_eq!(model.remove(&old.key), Some(old.born_us));
                    }
                }
            } else {
                assert_eq!(t.remove(key).map(|e| e.born_us), model.remove(&key));
            }
            if step % 1000 == 0 {
                for (&k, &born) in &model {
                    assert_eq!(t.find(k).map(|e| e.born_us), Some(born));
                }
                assert_eq!(t.len(), model.len());
            }
        }
    }
}
