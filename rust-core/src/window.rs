//! One bucket of a rolling window: request and failure counters and a latency sketch for one time slice.
//!
//! A window of `n` buckets of `w` ms is kept in `n + 1` physical buckets, so the bucket the next slice will use holds
//! data already outside the window and can be cleared ahead of time by a timer ([`WindowBucket::preclear`]); writers
//! then never clear on the request path in steady state. A writer that finds a stale bucket anyway (after an idle
//! period) claims it with a compare-and-swap, clears it and publishes the new slice; a concurrent writer that meets
//! the bucket while it is being cleared drops its sample and counts the drop, rather than wait. Readers include a
//! bucket only when its slice is inside the window, checked before and after reading.
//!
//! Crash safety: the mark of a bucket being cleared names its owner (pid) and the slice it is cleared for. A process
//! killed while clearing leaves the mark behind; the first writer or upkeep that needs the bucket for a slice at
//! least [`CLEARING_TIMEOUT_SLICES`] later (in practice the next time round the ring, `n + 1` slices later) takes the
//! bucket over and clears it again, so at most the one slice the killed process was clearing for is lost. The
//! latency totals' seqlock is made even again by [`LatencyTotals::repair`] once no bucket of the peer is marked.

use crate::histogram::{bucket_index_us, bucket_value, BUCKETS};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering::*};

/// The mark of a bucket being cleared: this bit, the owner's pid (23 bits, from bit 40) and the slice + 1 it is
/// cleared for (40 bits).
const CLEARING: u64 = 1 << 63;
const SLICE_BITS: u64 = (1 << 40) - 1;

/// A clearing mark at least this many slices older than the slice a writer wants is taken over (its owner was killed
/// or stalled that long).
pub const CLEARING_TIMEOUT_SLICES: u64 = 2;

/// The clearing mark of this process for tag `want`.
#[inline]
fn clearing_mark(want: u64) -> u64 {
    CLEARING | ((std::process::id() as u64 & 0x7f_ffff) << 40) | (want & SLICE_BITS)
}

#[inline]
fn is_clearing(tag: u64) -> bool {
    tag & CLEARING != 0
}

/// Whether clearing mark `tag` was left long enough before tag `want` to be taken over.
#[inline]
fn abandoned(tag: u64, want: u64) -> bool {
    (tag & SLICE_BITS).saturating_add(CLEARING_TIMEOUT_SLICES) <= want
}

/// The pid of the process clearing a bucket marked `tag`, `None` when it is not marked.
pub fn clearing_owner(tag: u64) -> Option<u32> {
    is_clearing(tag).then_some(((tag >> 40) & 0x7f_ffff) as u32)
}

/// Kinds of attempt outcome. The failure kinds are disjoint: a failed attempt has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Outcome {
    /// Answered with a status not counted as failure.
    Success = 0,
    /// Answered with a 5xx other than 502/503/504.
    Http5xx = 1,
    /// Answered 502/503/504, or failed after connecting without a valid response header.
    Gateway = 2,
    /// Could not connect (refused, unreachable, reset during connect).
    Connect = 3,
    /// Connect, send or read timed out.
    Timeout = 4,
    /// The client went away first; neither success nor failure, and no latency sample.
    Aborted = 5,
}

impl Outcome {
    /// From the number used across the FFI boundary; `None` for an unknown number.
    pub fn from_u32(v: u32) -> Option<Outcome> {
        Some(match v {
            0 => Outcome::Success,
            1 => Outcome::Http5xx,
            2 => Outcome::Gateway,
            3 => Outcome::Connect,
            4 => Outcome::Timeout,
            5 => Outcome::Aborted,
            _ => return None,
        })
    }

    /// Whether the outcome is a failure of the peer.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::Http5xx | Outcome::Gateway | Outcome::Connect | Outcome::Timeout
        )
    }
}

/// Index of each counter in [`WindowBucket::counts`] and in a peer's all-time totals.
pub mod counter {
    /// Attempts that completed (success or failure; aborted ones are not counted here).
    pub const REQUESTS: usize = 0;
    /// Failures by kind: `FAIL_BASE + Outcome as usize - 1`.
    pub const FAIL_BASE: usize = 1;
    /// Aborted attempts.
    pub const ABORTED: usize = 5;
    /// Number of counters.
    pub const N: usize = 6;
}

/// Upper bounds (µs) of the all-time latency ranges of a peer: the `le` buckets of the Prometheus histogram.
pub const LE_BOUNDS_US: [f64; 13] = [
    1_000.0, 2_500.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0, 100_000.0, 250_000.0, 500_000.0, 1_000_000.0,
    2_500_000.0, 5_000_000.0, 10_000_000.0,
];
/// Ranges: one per bound, and one above the last.
pub const LE_RANGES: usize = LE_BOUNDS_US.len() + 1;

/// The range of each sketch bucket, by the value the sketch reports for it: a sample within 1.96 % of a bound may
/// land on the other side of it (the sketch's resolution), the counts are exact otherwise.
static RANGE_OF: [u8; BUCKETS] = {
    let mut out = [0u8; BUCKETS];
    let mut k = 0;
    while k < BUCKETS {
        let v = bucket_value(k);
        let mut r = 0;
        while r < LE_BOUNDS_US.len() && v > LE_BOUNDS_US[r] {
            r += 1;
        }
        out[k] = r as u8;
        k += 1;
    }
    out
};

/// All-time latency counts of a peer per range of [`LE_BOUNDS_US`], added from each window bucket as it is cleared
/// (so that the request path pays nothing for them). `seq` is odd while a bucket is being added and cleared, so
/// that a reader summing these counts and the buckets not yet added sees each sample exactly once (it retries).
#[repr(C)]
pub struct LatencyTotals {
    pub seq: AtomicU64,
    pub counts: [AtomicU64; LE_RANGES],
}

impl LatencyTotals {
    /// Zero, for a peer record given to another peer.
    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Relaxed);
        }
    }

    /// Makes `seq` even again when a process killed while turning a bucket over left it odd: odd with no bucket of
    /// the peer (`buckets`) marked as being cleared, since a clearer makes it even before it unmarks its bucket.
    /// Compare-and-swap from the value read before looking at the buckets, so a clearer that started meanwhile is
    /// never disturbed. One load when nothing is wrong. Returns whether it repaired.
    pub fn repair(&self, buckets: &[WindowBucket]) -> bool {
        let s = self.seq.load(Acquire);
        if s & 1 == 0 || buckets.iter().any(|b| is_clearing(b.slice.load(Acquire))) {
            return false;
        }
        self.seq.compare_exchange(s, s.wrapping_add(1), AcqRel, Relaxed).is_ok()
    }
}

/// A time slice of one peer's statistics. Plain atomics, valid for any bit pattern, so it can live in shared memory.
#[repr(C)]
pub struct WindowBucket {
    /// Slice number + 1 (0: never used), or a clearing mark (see [`CLEARING`]).
    slice: AtomicU64,
    latency_sum_us: AtomicU64,
    counts: [AtomicU32; counter::N],
    _pad: [u32; 2],
    hist: [AtomicU32; BUCKETS],
}

/// Counters summed over a window.
#[derive(Debug, Clone)]
pub struct WindowSum {
    /// See [`counter`].
    pub counts: [u64; counter::N],
    /// Sum of latency samples (µs).
    pub latency_sum_us: u64,
    /// Merged latency sketch.
    pub hist: [u64; BUCKETS],
}

impl Default for WindowSum {
    fn default() -> Self {
        WindowSum {
            counts: [0; counter::N],
            latency_sum_us: 0,
            hist: [0; BUCKETS],
        }
    }
}

impl WindowSum {
    /// Failures of all kinds.
    pub fn failures(&self) -> u64 {
        self.counts[counter::FAIL_BASE..counter::FAIL_BASE + 4]
            .iter()
            .sum()
    }
}

impl WindowBucket {
    fn clear_counters(&self) {
        self.latency_sum_us.store(0, Relaxed);
        for c in &self.counts {
            c.store(0, Relaxed);
        }
        for h in &self.hist {
            h.store(0, Relaxed);
        }
    }

    /// Marks the bucket as holding no slice; the next writer or preclear clears its counters.
    pub fn forget(&self) {
        self.slice.store(0, Release);
    }

    /// Clears the bucket, claimed (a clearing mark) from tag `held`, for tag `want`; a slice it held (`held` > 0,
    /// not forgotten, not a mark left by a killed clearer) is first added to `totals`.
    fn turn_over(&self, held: u64, want: u64, totals: &LatencyTotals) {
        fence(Release); // after the caller's CLEARING (the odd mark): a reader seeing a store below sees it too
        let held = if is_clearing(held) { 0 } else { held }; // half cleared: its counts are not worth adding
        if held != 0 {
            totals.seq.fetch_add(1, AcqRel); // odd: readers retry
            fence(Release); // the same for the odd totals.seq
            let mut add = [0u64; LE_RANGES];
            self.sum_ranges(&mut add);
            for (t, a) in totals.counts.iter().zip(add) {
                if a != 0 {
                    t.fetch_add(a, Relaxed);
                }
            }
        }
        self.clear_counters();
        // `seq` even before the mark goes: readers skip a marked bucket, and `LatencyTotals::repair` relies on it.
        if held != 0 {
            totals.seq.fetch_add(1, AcqRel);
        }
        // Publish only over our own mark: a clearer stalled so long that another writer took its mark over (see
        // `claim`) must not move the tag back to an older slice.
        let _ = self.slice.compare_exchange(clearing_mark(want), want, Release, Relaxed);
    }

    /// Claims the bucket from tag `cur` for tag `want`: `cur` is an older slice, or a clearing mark left long enough
    /// ago (see [`CLEARING_TIMEOUT_SLICES`]). False when `cur` is neither or another writer claimed it first.
    #[inline]
    fn claim(&self, cur: u64, want: u64) -> bool {
        let older = if is_clearing(cur) { abandoned(cur, want) } else { cur < want };
        older && self.slice.compare_exchange(cur, clearing_mark(want), AcqRel, Relaxed).is_ok()
    }

    /// Clears the bucket for `slice` if it still holds an older slice (whose latencies go to `totals`). Returns
    /// whether it cleared.
    pub fn preclear(&self, slice: u64, totals: &LatencyTotals) -> bool {
        let want = slice + 1;
        let cur = self.slice.load(Acquire);
        if !self.claim(cur, want) {
            return false;
        }
        self.turn_over(cur, want, totals);
        true
    }

    /// Adds the latency ranges of the slice this bucket holds, if any, to `out`; false when it holds none (never
    /// used, forgotten, or being cleared).
    pub fn add_ranges(&self, out: &mut [u64; LE_RANGES]) -> bool {
        let tag = self.slice.load(Acquire);
        if tag == 0 || is_clearing(tag) {
            return false;
        }
        self.sum_ranges(out);
        true
    }

    /// Adds this bucket's latency sketch to `out`, by range of [`LE_BOUNDS_US`].
    fn sum_ranges(&self, out: &mut [u64; LE_RANGES]) {
        for (k, h) in self.hist.iter().enumerate() {
            out[RANGE_OF[k] as usize] = out[RANGE_OF[k] as usize].wrapping_add(h.load(Relaxed) as u64);
        }
    }

    /// Records one attempt in this bucket for `slice`. Returns `false` when the sample was dropped (the bucket is
    /// being cleared by another writer, or already holds a newer slice because this sample arrived late).
    #[inline(always)]
    pub fn record(&self, slice: u64, outcome: Outcome, latency_us: u64, totals: &LatencyTotals) -> bool {
        let want = slice + 1;
        loop {
            let cur = self.slice.load(Acquire);
            if cur == want {
                break;
            }
            if (is_clearing(cur) && !abandoned(cur, want)) || (!is_clearing(cur) && cur > want) {
                return false; // being cleared (drop rather than wait), or a newer slice already: a late sample
            }
            if self.claim(cur, want) {
                self.turn_over(cur, want, totals);
                break;
            }
        }
        if outcome == Outcome::Aborted {
            self.counts[counter::ABORTED].fetch_add(1, Relaxed);
            return true;
        }
        self.counts[counter::REQUESTS].fetch_add(1, Relaxed);
        if outcome.is_failure() {
            self.counts[counter::FAIL_BASE + outcome as usize - 1].fetch_add(1, Relaxed);
        }
        self.latency_sum_us.fetch_add(latency_us, Relaxed);
        self.hist[bucket_index_us(latency_us)].fetch_add(1, Relaxed);
        true
    }

    /// Takes back a sample [`WindowBucket::record`] added for `slice` (a writer that found afterwards its peer record
    /// reused): only while the bucket still holds that slice, and never below zero (the sample may have been cleared
    /// already). Not on the request path's normal course.
    #[cold]
    pub fn unrecord(&self, slice: u64, outcome: Outcome, latency_us: u64) {
        if self.slice.load(Acquire) != slice + 1 {
            return; // cleared or turned over since: the sample went with it
        }
        if outcome == Outcome::Aborted {
            sat_sub_u32(&self.counts[counter::ABORTED], 1);
            return;
        }
        sat_sub_u32(&self.counts[counter::REQUESTS], 1);
        if outcome.is_failure() {
            sat_sub_u32(&self.counts[counter::FAIL_BASE + outcome as usize - 1], 1);
        }
        sat_sub_u64(&self.latency_sum_us, latency_us);
        sat_sub_u32(&self.hist[bucket_index_us(latency_us)], 1);
    }

    /// Adds this bucket into `sum` if it holds a slice in `[first, last]`. Returns whether it was added.
    ///
    /// The slice tag is the bucket's seqlock word (a clear turns it to [`CLEARING`] first): the tag is loaded with
    /// Acquire, the counters with Relaxed, then `fence(Acquire)` and the tag again, Relaxed; a copy is kept only if
    /// the tag did not move, so counters of two slices are never mixed.
    pub fn add_to(&self, first: u64, last: u64, sum: &mut WindowSum) -> bool {
        let tag = self.slice.load(Acquire);
        if tag == 0 || is_clearing(tag) || tag - 1 < first || tag - 1 > last {
            return false;
        }
        let mut part = WindowSum {
            latency_sum_us: self.latency_sum_us.load(Relaxed),
            ..WindowSum::default()
        };
        for (d, s) in part.counts.iter_mut().zip(&self.counts) {
            *d = s.load(Relaxed) as u64;
        }
        for (d, s) in part.hist.iter_mut().zip(&self.hist) {
            *d = s.load(Relaxed) as u64;
        }
        fence(Acquire); // the counter loads above are ordered before the second tag load
        if self.slice.load(Relaxed) != tag {
            return false; // cleared while we read: the slice left the window
        }
        for (d, s) in sum.counts.iter_mut().zip(part.counts) {
            *d += s;
        }
        for (d, s) in sum.hist.iter_mut().zip(part.hist.iter()) {
            *d += s;
        }
        sum.latency_sum_us = sum.latency_sum_us.wrapping_add(part.latency_sum_us);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::bucket_index;

    fn zeroed() -> WindowBucket {
        WindowBucket {
            slice: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            counts: Default::default(),
            _pad: [0; 2],
            hist: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    fn totals() -> LatencyTotals {
        LatencyTotals { seq: AtomicU64::new(0), counts: std::array::from_fn(|_| AtomicU64::new(0)) }
    }

    /// The bucket's seqlock under contention: writers move it from slice to slice (each turn over clears it) while
    /// readers sum it; a sum kept for slice `s` holds samples of slice `s` only. A stress test of the protocol, not a
    /// model check of the orderings (see `tests/seqlock_stress.rs`).
    #[test]
    fn readers_never_mix_two_slices() {
        // Odd and even slices get latencies in different sketch buckets and with no common multiple in range.
        let latency = |slice: u64| if slice % 2 == 1 { 1_009 } else { 700_001 };
        let (b, t) = (zeroed(), totals());
        let current = AtomicU64::new(1);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (writers, slices, per_slice) = (2u64, 20_000u64, 20u64);
        // The writers start each slice together: slices here last microseconds, and a writer lagging another by
        // CLEARING_TIMEOUT_SLICES would be taken for one killed mid-clear (its mark taken over), which is not what
        // this test is about.
        let start = std::sync::Barrier::new(writers as usize);
        let checked = std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut checked = 0u64;
                        while !done.load(Acquire) {
                            let slice = current.load(Acquire);
                            let mut sum = WindowSum::default();
                            if !b.add_to(slice, slice, &mut sum) {
                                continue;
                            }
                            let (mine, other) = (latency(slice), latency(slice + 1));
                            let n = sum.counts[counter::REQUESTS];
                            assert_eq!(sum.hist[bucket_index_us(other)], 0, "slice {slice}: another slice's samples");
                            assert!(n <= writers * per_slice, "slice {slice}: {n} requests");
                            assert!(sum.latency_sum_us % mine == 0 && sum.latency_sum_us / mine <= writers * per_slice,
                                    "slice {slice}: latency sum {}", sum.latency_sum_us);
                            checked += 1;
                        }
                        checked
                    })
                })
                .collect();
            let ws: Vec<_> = (0..writers)
                .map(|_| {
                    s.spawn(|| {
                        for slice in 1..=slices {
                            start.wait();
                            current.fetch_max(slice, AcqRel);
                            for _ in 0..per_slice {
                                b.record(slice, Outcome::Success, latency(slice), &t);
                            }
                        }
                    })
                })
                .collect();
            for w in ws {
                w.join().unwrap();
            }
            done.store(true, Release);
            readers.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
        });
        assert!(checked > 0, "the readers kept some sums");
    }

    fn ranges(t: &LatencyTotals, buckets: &[&WindowBucket]) -> [u64; LE_RANGES] {
        let mut out: [u64; LE_RANGES] = std::array::from_fn(|i| t.counts[i].load(Relaxed));
        for b in buckets {
            b.add_ranges(&mut out);
        }
        out
    }

    #[test]
    fn records_clears_and_reads_by_slice() {
        let b = zeroed();
        let t = totals();
        assert!(b.record(7, Outcome::Success, 1000, &t));
        assert!(b.record(7, Outcome::Gateway, 10, &t));
        assert!(b.record(7, Outcome::Aborted, 10, &t));
        let mut s = WindowSum::default();
        assert!(b.add_to(0, 7, &mut s));
        assert_eq!(s.counts[counter::REQUESTS], 2);
        assert_eq!(s.failures(), 1);
        assert_eq!(s.counts[counter::ABORTED], 1);
        assert_eq!(s.latency_sum_us, 1010);
        // Out of the window: not added.
        assert!(!b.add_to(8, 20, &mut WindowSum::default()));
        // A late sample for an older slice is dropped, not mixed in.
        assert!(!b.record(6, Outcome::Success, 1, &t));
        // A newer slice clears the bucket.
        assert!(b.record(17, Outcome::Success, 5, &t));
        let mut s = WindowSum::default();
        b.add_to(17, 17, &mut s);
        assert_eq!(s.counts[counter::REQUESTS], 1);
        // Preclear only moves forward.
        assert!(b.preclear(18, &t));
        assert!(!b.preclear(18, &t));
        assert!(!b.preclear(3, &t));
        let mut s = WindowSum::default();
        assert!(b.add_to(18, 18, &mut s));
        assert_eq!(s.counts[counter::REQUESTS], 0);
    }

    #[test]
    fn concurrent_writers_lose_nothing_in_a_steady_slice() {
        let b = std::sync::Arc::new(zeroed());
        let t = std::sync::Arc::new(totals());
        b.preclear(1, &t);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, t) = (b.clone(), t.clone());
                std::thread::spawn(move || {
                    for _ in 0..50_000 {
                        assert!(b.record(1, Outcome::Success, 100, &t));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut s = WindowSum::default();
        b.add_to(1, 1, &mut s);
        assert_eq!(s.counts[counter::REQUESTS], 200_000);
        assert_eq!(s.hist.iter().sum::<u64>(), 200_000);
    }

    /// The all-time ranges count every latency sample once: while its bucket holds its slice, then after the bucket
    /// was cleared (by the timer or by a writer of a newer slice); forgotten buckets add nothing.
    #[test]
    fn all_time_ranges_count_each_sample_once() {
        let (a, b, t) = (zeroed(), zeroed(), totals());
        // 1 ms, 3 ms, 40 ms, 20 s (above the last bound); the 1 ms sample may fall either side of 1 ms (resolution).
        for (slice, us) in [(1u64, 900u64), (1, 3_000), (2, 40_000), (2, 20_000_000)] {
            let bucket = if slice % 2 == 1 { &a } else { &b };
            assert!(bucket.record(slice, Outcome::Success, us, &t));
        }
        let want = {
            let mut w = [0u64; LE_RANGES];
            w[0] = 1; // 900 µs <= 1 ms
            w[2] = 1; // 3 ms <= 5 ms
            w[5] = 1; // 40 ms <= 50 ms
            w[LE_RANGES - 1] = 1;
            w
        };
        assert_eq!(ranges(&t, &[&a, &b]), want);
        assert!(a.preclear(3, &t)); // slice 1 leaves the window: added to the totals
        assert_eq!(t.seq.load(Relaxed), 2);
        assert_eq!(ranges(&t, &[&a, &b]), want);
        assert!(b.record(4, Outcome::Success, 3_000, &t)); // a writer turns b over
        let mut w2 = want;
        w2[2] += 1;
        assert_eq!(ranges(&t, &[&a, &b]), w2);
        b.forget(); // a peer record given to another peer: its bucket's data is not added
        assert!(b.preclear(5, &t));
        w2[2] -= 1;
        assert_eq!(ranges(&t, &[&a, &b]), w2);
        // every bound maps samples at it to its own range, well inside it to the next
        for (r, &bound) in LE_BOUNDS_US.iter().enumerate() {
            assert_eq!(RANGE_OF[bucket_index(bound * 0.95)] as usize, r, "{bound}");
            assert_eq!(RANGE_OF[bucket_index(bound * 1.05)] as usize, r + 1, "{bound}");
        }
    }

    /// What a process killed inside `turn_over` leaves: the bucket marked as being cleared by it (pid of a reaped
    /// child), possibly after it made the latency-total seqlock odd.
    fn killed_clearer(b: &WindowBucket, t: &LatencyTotals, want: u64, seq_odd: bool) -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        b.slice.store(CLEARING | ((pid as u64) << 40) | want, Release);
        if seq_odd {
            t.seq.fetch_add(1, Relaxed);
        }
        pid
    }

    #[test]
    fn a_bucket_left_being_cleared_by_a_killed_worker_is_taken_over_when_next_needed() {
        let (b, t) = (zeroed(), totals());
        assert!(b.record(3, Outcome::Success, 1_000, &t));
        let pid = killed_clearer(&b, &t, 14, true); // killed while turning slice 3 over for slice 13
        assert_eq!(clearing_owner(b.slice.load(Relaxed)), Some(pid), "the mark names its owner");
        // Meanwhile its own slice's samples are dropped (bounded: no writer waits), and readers skip it.
        assert!(!b.record(13, Outcome::Success, 1_000, &t));
        assert!(!b.add_to(0, 100, &mut WindowSum::default()));
        // The latency totals stay odd while the mark is there (a live clearer could be inside)...
        assert!(!t.repair(std::slice::from_ref(&b)));
        // ... and the next slice that needs the bucket takes it over: data flows again.
        assert!(b.record(24, Outcome::Gateway, 2_000, &t));
        let mut s = WindowSum::default();
        assert!(b.add_to(24, 24, &mut s));
        assert_eq!((s.counts[counter::REQUESTS], s.failures()), (1, 1), "the half-cleared counts were dropped");
        // Unmarked now, the odd latency-total seqlock is repaired, once.
        assert!(t.repair(std::slice::from_ref(&b)));
        assert_eq!(t.seq.load(Relaxed) & 1, 0);
        assert!(!t.repair(std::slice::from_ref(&b)));
        assert_eq!(ranges(&t, &[&b]).iter().sum::<u64>(), 1);

        // The upkeep takes a mark over too, when it clears the bucket ahead of time for a later slice.
        let c = zeroed();
        killed_clearer(&c, &t, 14, false);
        assert!(!c.preclear(14, &t), "not for the slice it was marked for");
        assert!(c.preclear(25, &t));
        assert!(c.record(25, Outcome::Success, 10, &t));
    }
}

macro_rules! saturating_sub_fn {
    ($(#[$doc:meta])* $name:ident, $atomic:ty, $int:ty) => {
        $(#[$doc])*
        pub(crate) fn $name(a: &$atomic, v: $int) {
            let mut cur = a.load(Relaxed);
            for _ in 0..8 {
                match a.compare_exchange_weak(cur, cur.saturating_sub(v), Relaxed, Relaxed) {
                    Ok(_) => return,
                    Err(x) => cur = x,
                }
            }
        }
    };
}

saturating_sub_fn!(
    /// Subtracts `v` from `a`, stopping at zero (a few compare-and-swap tries; under contention that lasts longer the
    /// subtraction is given up: the counter stays high by at most `v`).
    sat_sub_u32, AtomicU32, u32
);
saturating_sub_fn!(
    /// [`sat_sub_u32`] for a 64-bit counter.
    sat_sub_u64, AtomicU64, u64
);
