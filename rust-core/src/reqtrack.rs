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
    #[inline]
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts[..(self.count as usize).min(MAX_ATTEMPTS)]
    }

    /// The most recent attempt, if any.
    #[inline]
    pub fn last_mut(&mut self) -> Option<&mut Attempt> {
        let n = (self.count as usize).min(MAX_ATTEMPTS);
        if n == 0 {
            None
        } else {
            Some(&mut self.attempts[n - 1])
        }
    }

    /// Appends an attempt (reusing the last place past [`MAX_ATTEMPTS`]).
    #[inline]
    pub fn push(&mut self, a: Attempt) {
        let i = (self.count as usize).min(MAX_ATTEMPTS - 1);
        self.attempts[i] = a;
        self.count = self.count.saturating_add(1);
    }

    /// Whether the peer record `slot` was already tried.
    #[inline]
    pub fn tried(&self, slot: u32) -> bool {
        self.attempts().iter().any(|a| a.slot == slot)
    }
}

/// The table. Keys are kept apart from the entries so that a probe reads two cache lines, not sixteen entries.
/// Both arrays have [`PROBE`] - 1 spare places past the last home position, so a probe window never wraps and is
/// scanned without branches.
pub struct Table {
    keys: Box<[usize]>,
    entries: Box<[Entry]>,
    mask: usize,
}

impl Table {
    /// A table of `capacity` home positions, rounded up to a power of two (at least [`PROBE`]).
    pub fn new(capacity: usize) -> Table {
        let cap = capacity.max(PROBE).next_power_of_two();
        Table {
            keys: vec![0; cap + PROBE - 1].into_boxed_slice(),
            entries: vec![Entry::default(); cap + PROBE - 1].into_boxed_slice(),
            mask: cap - 1,
        }
    }

    #[inline]
    fn home(&self, key: usize) -> usize {
        ((key as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Place of `key`: the first place of its probe window holding it (the newest entry of the key, see
    /// [`Table::insert`]).
    #[inline]
    fn position(&self, key: usize) -> Option<usize> {
        let h = self.home(key);
        // One bounds check for the window rather than one per place.
        self.keys[h..h + PROBE].iter().position(|&k| k == key).map(|j| h + j)
    }

    /// The entry of `key`.
    pub fn find(&mut self, key: usize) -> Option<&mut Entry> {
        if key == 0 {
            return None;
        }
        let i = self.position(key)?;
        Some(&mut self.entries[i])
    }

    /// Starts tracking `key` (not 0) and returns its new entry, in the first place of the probe window that is free
    /// or holds `key` (a stale entry of the same key: the request object was reused without a log phase), else in
    /// the place of the window's oldest entry. A displaced entry is shown to `evicted` first, so that the caller can
    /// release its in-flight counts.
    ///
    /// The probe stops at the first free place, so an older stale entry of the same key may remain further on; it is
    /// never found (lookups return the first match, which is the newest) and [`Table::sweep`] releases it.
    pub fn insert(&mut self, key: usize, upstream: u32, now_us: u64, evicted: impl FnOnce(&Entry)) -> &mut Entry {
        debug_assert!(key != 0 && key & 1 == 0, "keys are addresses of (aligned) request objects");
        let h = self.home(key);
        let i = self.keys[h..h + PROBE]
            .iter()
            .position(|&at| at == key || at == 0)
            .map(|j| h + j)
            .unwrap_or_else(|| (h..h + PROBE).min_by_key(|&i| self.entries[i].born_us).unwrap_or(h));
        let old = self.keys[i];
        if old != 0 {
            evicted(&self.entries[i]);
            if old != key && old & 1 == 0 {
                self.mark_stale_after(i, old);
            }
        }
        self.keys[i] = key;
        let e = &mut self.entries[i];
        e.key = key;
        e.upstream = upstream;
        e.count = 0;
        e.born_us = now_us;
        e
    }

    /// Removes the stale entries [`Table::insert`] left behind (a key present twice: all but its first place, and
    /// those [`Table::remove_with`] marked) and the entries born before `born_before_us` (requests that never reached
    /// a log phase: a subrequest, an `auth_request`), and shows each to `evicted`. For the upkeep timer:
    /// O(entries × PROBE), off the request path.
    pub fn sweep(&mut self, born_before_us: u64, mut evicted: impl FnMut(&Entry)) -> usize {
        let mut n = 0;
        for i in 0..self.keys.len() {
            let key = self.keys[i];
            if key != 0
                && (key & 1 == 1 || self.entries[i].born_us < born_before_us || self.position(key) != Some(i))
            {
                evicted(&self.entries[i]);
                self.keys[i] = 0;
                self.entries[i].key = 0;
                n += 1;
            }
        }
        n
    }

    /// Stops tracking `key`; `f` sees its entry one last time (no copy of the entry is made). An older, stale entry
    /// of the same key further on in the window would become the key's first match; it is marked (its key's low bit
    /// set, which no real key has) for [`Table::sweep`] to release.
    pub fn remove_with<T>(&mut self, key: usize, f: impl FnOnce(&Entry) -> T) -> Option<T> {
        if key == 0 {
            return None;
        }
        let i = self.position(key)?;
        self.keys[i] = 0;
        self.entries[i].key = 0;
        self.mark_stale_after(i, key);
        Some(f(&self.entries[i]))
    }

    /// Marks the entries of `key` after place `i` (stale ones, see [`Table::remove_with`]) for the sweep.
    #[inline]
    fn mark_stale_after(&mut self, i: usize, key: usize) {
        let end = self.home(key) + PROBE;
        for k in &mut self.keys[i + 1..end] {
            if *k == key {
                *k |= 1;
            }
        }
    }

    /// Looks `key` up once and lets `f` see its entry: `f` returns whether the entry is done (then it stops being
    /// tracked, as with [`Table::remove_with`]) and a result. `None` when `key` is not tracked.
    pub fn finish_with<T>(&mut self, key: usize, f: impl FnOnce(&mut Entry) -> (bool, T)) -> Option<T> {
        if key == 0 {
            return None;
        }
        let i = self.position(key)?;
        let (done, out) = f(&mut self.entries[i]);
        if done {
            self.keys[i] = 0;
            self.entries[i].key = 0;
            self.mark_stale_after(i, key);
        }
        Some(out)
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
        let mut old = None;
        let e = t.insert(0x1000, 3, 1, |o| old = Some(*o));
        e.push(Attempt {
            slot: 5,
            gen: 1,
            start_us: 1,
            ..Attempt::default()
        });
        assert!(t.find(0x1000).unwrap().tried(5));
        assert!(!t.find(0x1000).unwrap().tried(6));
        assert!(old.is_none());
        // Reinserting the same key displaces the stale entry.
        t.insert(0x1000, 3, 2, |o| old = Some(*o));
        assert_eq!(old.unwrap().count, 1);
        // finish_with: looked at and kept, then looked at and done
        assert_eq!(t.finish_with(0x1000, |e| (false, e.born_us)), Some(2));
        assert!(t.find(0x1000).is_some());
        assert_eq!(t.finish_with(0x1000, |e| (true, e.upstream)), Some(3));
        assert_eq!(t.finish_with(0x1000, |_| (true, 0)), None);
        assert!(t.find(0x1000).is_none());
        assert!(t.is_empty());
    }

    /// A request reused without a log phase, after an earlier place of its window was freed: the new entry goes
    /// first, lookups see it, and the sweep releases the stale one.
    #[test]
    fn stale_entry_behind_a_free_place_is_swept() {
        let mut t = Table::new(16);
        let (a, b) = (0x10, 0x20);
        let h = t.home(a);
        // Find a second key with the same home, so that b sits before a in the window.
        let b = (1..10_000).map(|k| k * 16).find(|&k| k != a && t.home(k) == h).unwrap_or(b);
        t.insert(b, 0, 1, |_| panic!("nothing to evict"));
        t.insert(a, 0, 2, |_| panic!("nothing to evict")).push(Attempt { slot: 1, ..Attempt::default() });
        t.remove(b);
        let mut evicted = Vec::new();
        t.insert(a, 0, 3, |o| evicted.push(o.born_us)); // goes into b's free place, before the stale entry
        assert!(evicted.is_empty());
        assert_eq!(t.find(a).map(|e| e.born_us), Some(3));
        assert_eq!(t.sweep(0, |o| evicted.push(o.born_us)), 1);
        assert_eq!(evicted, vec![2]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(a).map(|e| e.born_us), Some(3));
        assert!(t.is_empty());
    }

    /// A request that never reaches its log phase (a subrequest, `auth_request`) and whose place is never needed
    /// again is released by age; younger ones stay.
    #[test]
    fn entries_older_than_the_age_limit_are_swept() {
        let mut t = Table::new(64);
        t.insert(0x10, 0, 1_000, |_| panic!("nothing to evict")).push(Attempt { slot: 3, ..Attempt::default() });
        t.insert(0x20, 0, 5_000, |_| panic!("nothing to evict"));
        let mut evicted = Vec::new();
        assert_eq!(t.sweep(1_000, |o| evicted.push(o.key)), 0);
        assert_eq!(t.sweep(1_001, |o| evicted.push(o.key)), 1);
        assert_eq!(evicted, vec![0x10]);
        assert!(t.find(0x10).is_none());
        assert_eq!(t.find(0x20).map(|e| e.born_us), Some(5_000));
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

    /// Property: with random inserts and removes, every live key is found (its newest entry), a full table evicts the
    /// oldest of the probe window rather than losing a live key silently, and every entry left behind by a key
    /// inserted again is stale (never the live one) and is released by the sweep or by eviction, exactly once.
    #[test]
    fn model_check_against_a_map() {
        use std::collections::{HashMap, HashSet};
        let mut rng = XorShift64::new(11);
        let mut t = Table::new(64);
        let mut live: HashMap<usize, u64> = HashMap::new();
        let mut stale: HashSet<(usize, u64)> = HashSet::new();
        for step in 0..100_000u64 {
            let key = (1 + rng.below(300) as usize) * 16;
            if rng.below(2) == 0 {
                let mut old = None;
                t.insert(key, 0, step, |o| old = Some(*o));
                if let Some(prev) = live.insert(key, step) {
                    stale.insert((key, prev));
                }
                if let Some(old) = old {
                    let id = (old.key, old.born_us);
                    if !stale.remove(&id) {
                        assert_eq!(live.remove(&old.key), Some(old.born_us), "evicted an unknown entry");
                    }
                }
            } else if let Some(born) = live.remove(&key) {
                assert_eq!(t.remove(key).map(|e| e.born_us), Some(born));
            }
            if step % 1000 == 0 {
                t.sweep(0, |o| assert!(stale.remove(&(o.key, o.born_us)), "swept a live entry"));
                assert!(stale.is_empty(), "stale entries left after the sweep: {stale:?}");
                for (&k, &born) in &live {
                    assert_eq!(t.find(k).map(|e| e.born_us), Some(born));
                }
                assert_eq!(t.len(), live.len());
            }
        }
    }
}
