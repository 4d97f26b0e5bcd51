//! Admission in front of an upstream: an adaptive concurrency limit, token-bucket rate limits and priority classes.
//!
//! **Concurrency limit.** Each upkeep interval one worker (whoever wins a CAS on the interval's time stamp) turns the
//! latencies of the requests that finished in the interval into one sample (their mean) and moves the limit with a
//! [`Limiter`]:
//! - [`Gradient`] (Envoy's adaptive concurrency filter): `gradient = clamp((minRTT + buffer·minRTT) / sample, 0.5,
//!   2)`, `limit = gradient·limit + sqrt(limit)`. The minimum RTT is re-measured every `min_rtt_interval` by pinning
//!   the limit to `min_concurrency` until `min_rtt_requests` requests have finished (Envoy: 60 s, 3, 50, buffer 25 %).
//! - [`Aimd`] (Netflix `AIMDLimit`): `limit + 1` while the sample stays under `tolerance·minRTT` and the limit is
//!   in use (at least half), `limit·backoff` otherwise.
//!
//! Both stay within `[min, max]`. When the upstream gains or loses peers the limit is scaled by the ratio at once,
//! so added capacity is used without waiting for latency to tell.
//!
//! **Priority classes** (Netflix's partitioned limiter): class 0 is the most important. Each class has a guaranteed
//! share of the limit: a request is admitted while its class is below its share, or while the total in flight plus
//! the unused shares of the more important classes stays below the limit. So the least important class is shed
//! first and the most important one only when its own share is used up.
//!
//! **Rate limits** are token buckets of one `u64` each (milli-tokens and a millisecond time stamp) updated with a
//! CAS loop, so any worker can take a token without a lock. Their rate is multiplied by the upstream's rate factor,
//! which the update lowers to `tighten` while the upstream is overloaded (requests shed for concurrency, or latency
//! over twice the minimum RTT) or while a scale-up is awaited, and raises back to 1 after `relax_after` calm.

use crate::layout::{AdmissionHead, Region};
use std::sync::atomic::{AtomicU64, Ordering::*};

/// Priority classes per upstream.
pub const CLASSES: usize = 4;
/// Rate-limit rules per upstream.
pub const RULES: usize = 8;
/// Why a request was shed.
pub mod reason {
    pub const CONCURRENCY: usize = 0;
    pub const RATE: usize = 1;
    pub const QUEUE_TIMEOUT: usize = 2;
    pub const N: usize = 3;
    pub fn name(r: usize) -> &'static str {
        ["concurrency", "rate", "queue_timeout"].get(r).copied().unwrap_or("unknown")
    }
}

/// Tunables of the concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitParams {
    pub min: f64,
    pub max: f64,
    pub initial: f64,
    /// Gradient: latency allowed over the minimum RTT, as a fraction of it.
    pub buffer: f64,
    pub min_rtt_interval_us: u64,
    pub min_rtt_requests: u64,
    pub min_concurrency: f64,
    /// AIMD: multiplier on overload.
    pub backoff: f64,
    /// AIMD: a sample over `tolerance × minRTT` is overload.
    pub tolerance: f64,
}

impl Default for LimitParams {
    fn default() -> Self {
        LimitParams {
            min: 3.0,
            max: 1000.0,
            initial: 20.0,
            buffer: 0.25,
            min_rtt_interval_us: 60_000_000,
            min_rtt_requests: 50,
            min_concurrency: 3.0,
            backoff: 0.9,
            tolerance: 1.5,
        }
    }
}

/// What one interval measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Mean latency of the requests that finished (µs).
    pub rtt_us: f64,
    /// Requests in flight at the end of the interval.
    pub inflight: f64,
    /// Whether requests were shed for concurrency in the interval.
    pub shed: bool,
}

/// An algorithm moving the concurrency limit.
pub trait Limiter {
    /// The next limit from the current one, the minimum RTT and a sample (before clamping to `[min, max]`).
    fn next(&self, limit: f64, min_rtt_us: f64, s: &Sample) -> f64;
}

/// Envoy's gradient.
pub struct Gradient {
    pub buffer: f64,
}

impl Limiter for Gradient {
    fn next(&self, limit: f64, min_rtt_us: f64, s: &Sample) -> f64 {
        let gradient = ((min_rtt_us * (1.0 + self.buffer)) / s.rtt_us).clamp(0.5, 2.0);
        gradient * limit + limit.sqrt()
    }
}

/// Additive increase, multiplicative decrease.
pub struct Aimd {
    pub backoff: f64,
    pub tolerance: f64,
}

impl Limiter for Aimd {
    fn next(&self, limit: f64, min_rtt_us: f64, s: &Sample) -> f64 {
        if s.rtt_us > self.tolerance * min_rtt_us {
            limit * self.backoff
        } else if s.inflight * 2.0 >= limit {
            limit + 1.0
        } else {
            limit
        }
    }
}

/// The algorithm named by `code` (1 gradient, 2 AIMD; anything else keeps the limit fixed).
pub fn next_limit(code: u32, p: &LimitParams, limit: f64, min_rtt_us: f64, s: &Sample) -> f64 {
    let next = match code {
        1 => Gradient { buffer: p.buffer }.next(limit, min_rtt_us, s),
        2 => Aimd { backoff: p.backoff, tolerance: p.tolerance }.next(limit, min_rtt_us, s),
        _ => limit,
    };
    if next.is_finite() {
        next.clamp(p.min, p.max)
    } else {
        limit
    }
}

/// Whether a request of `class` (0 the most important) may start under `limit`:
/// - while its class is under its guaranteed share of `share_limit` (the adaptive limit; the same as `limit` except
///   while the minimum RTT is measured at a low concurrency, when the classes keep their shares of the adaptive
///   limit, so that critical traffic is not shed for the measurement);
/// - or while its own class and the more important ones have in flight, plus the unused shares of the more important
///   classes, less than `limit`.
///
/// Less important classes never block a more important one: their requests are already in flight and cannot be
/// taken back, but every new one of theirs is refused while the total is over the limit, so the total comes back under
/// it within about one round trip. A critical request is so shed only when nothing less important is left to shed
/// (Netflix's partitioned limiter instead refuses it once the others have taken the limit). The total in flight
/// (`total`) stays under twice the limit even so, however many classes take turns.
pub fn admits(
    class: usize,
    limit: f64,
    share_limit: f64,
    total: i32,
    inflight: &[i32; CLASSES],
    shares: &[f64; CLASSES],
) -> bool {
    let class = class.min(CLASSES - 1);
    if (inflight[class] as f64) < (shares[class] * share_limit).floor() {
        return true;
    }
    let used: i32 = inflight[..=class].iter().sum();
    let reserved: f64 = (0..class).map(|h| (shares[h] * limit - inflight[h] as f64).max(0.0)).sum();
    (used as f64) + reserved < limit && (total as f64) < 2.0 * limit
}

/// Whether the upstream counts as overloaded after an interval.
pub fn overloaded(s: &Sample, min_rtt_us: f64) -> bool {
    s.shed || (min_rtt_us > 0.0 && s.rtt_us > 2.0 * min_rtt_us)
}

/// The rate factor after an interval: `tighten` while overloaded or awaiting a scale-up; back to 1 once calm for
/// `relax_after_us` (`calm_since_us` is 0 while not calm). Returns the new factor and the new calm time stamp.
pub fn rate_factor(factor: f64, tighten: f64, pressure: bool, calm_since_us: u64, relax_after_us: u64, now_us: u64)
    -> (f64, u64) {
    if pressure {
        return (tighten, 0);
    }
    if factor >= 1.0 {
        return (1.0, 0);
    }
    let since = if calm_since_us == 0 { now_us } else { calm_since_us };
    if now_us.saturating_sub(since) >= relax_after_us {
        (1.0, 0)
    } else {
        (factor, since)
    }
}

/// A token bucket in one word: a "used" bit and 31 bits of milli-tokens in the upper half, a millisecond clock in the
/// lower half; 0 is a bucket never used (full).
pub struct Bucket<'a>(pub &'a AtomicU64);

impl Bucket<'_> {
    fn tokens(state: u64, now_ms: u32, rate: f64, burst: f64) -> f64 {
        if state == 0 {
            return burst;
        }
        let (milli, t) = (((state >> 32) & 0x7fff_ffff) as f64, state as u32);
        let elapsed = now_ms.wrapping_sub(t) as f64 / 1000.0;
        (milli / 1000.0 + elapsed * rate).min(burst)
    }

    /// Takes one token at `rate` per second (bucket size `burst`); on refusal, the seconds until one is there.
    pub fn take(&self, now_ms: u32, rate: f64, burst: f64) -> Result<(), f64> {
        let mut cur = self.0.load(Acquire);
        loop {
            let have = Self::tokens(cur, now_ms, rate, burst);
            if have < 1.0 {
                return Err(if rate > 0.0 { (1.0 - have) / rate } else { f64::INFINITY });
            }
            let left = ((have - 1.0) * 1000.0).min(0x7fff_ffff as f64) as u64;
            let new = ((left | 0x8000_0000) << 32) | now_ms as u64;
            match self.0.compare_exchange_weak(cur, new, AcqRel, Acquire) {
                Ok(_) => return Ok(()),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Whether the bucket is full (and so may be given to another key without changing anything).
    pub fn full(&self, now_ms: u32, rate: f64, burst: f64) -> bool {
        Self::tokens(self.0.load(Acquire), now_ms, rate, burst) >= burst
    }
}

/// SipHash with `C` compression and `D` finalization rounds under key `k` (Aumasson & Bernstein, 2012): a keyed
/// hash, so a client who does not know the key cannot compute keys that collide.
pub fn siphash<const C: usize, const D: usize>(k: [u64; 2], data: &[u8]) -> u64 {
    let mut v = [k[0] ^ 0x736f_6d65_7073_6575, k[1] ^ 0x646f_7261_6e64_6f6d, k[0] ^ 0x6c79_6765_6e65_7261,
                 k[1] ^ 0x7465_6462_7974_6573];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        for _ in 0..C {
            round(v);
        }
        v[0] ^= m;
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        compress(&mut v, u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    last[7] = data.len() as u8;
    compress(&mut v, u64::from_le_bytes(last));
    v[2] ^= 0xff;
    for _ in 0..D {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// SipHash-1-3 (the variant Rust's `HashMap` uses) of the upstream, the rule and the key under `secret` (never 0:
/// 0 marks a free bucket slot). Keys longer than 256 bytes are hashed on their first 256 bytes and their length.
pub fn key_hash(secret: [u64; 2], upstream: u32, rule: u32, key: &[u8]) -> u64 {
    let mut buf = [0u8; 8 + 8 + 256];
    buf[..4].copy_from_slice(&upstream.to_le_bytes());
    buf[4..8].copy_from_slice(&rule.to_le_bytes());
    buf[8..16].copy_from_slice(&(key.len() as u64).to_le_bytes());
    let n = key.len().min(256);
    buf[16..16 + n].copy_from_slice(&key[..n]);
    siphash::<1, 3>(secret, &buf[..16 + n]).max(1)
}

/// One admitted request of this worker, remembered until its log phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Request address; 0 marks a free entry.
    pub key: usize,
    pub upstream: u32,
    pub class: u32,
    /// In-flight column the request was counted in.
    pub column: u32,
    pub start_us: u64,
}

/// Entries probed per lookup.
const PROBE: usize = 8;

/// This worker's admitted requests, keyed by request address; fixed size, no allocation after `new`.
pub struct Tracker {
    entries: Box<[Admitted]>,
    mask: usize,
}

impl Tracker {
    pub fn new(capacity: usize) -> Tracker {
        let cap = capacity.max(PROBE).next_power_of_two();
        Tracker { entries: vec![Admitted::default(); cap + PROBE].into_boxed_slice(), mask: cap - 1 }
    }

    fn home(&self, key: usize) -> usize {
        ((key as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Remembers `a`; an entry of the same key (a request object reused without a log phase) or, in a full probe
    /// window, the oldest entry is replaced and given to `evicted` so that its count can be released.
    pub fn insert(&mut self, a: Admitted, evicted: impl FnOnce(&Admitted)) {
        let h = self.home(a.key);
        let window = &mut self.entries[h..h + PROBE];
        let i = window
            .iter()
            .position(|e| e.key == a.key)
            .or_else(|| window.iter().position(|e| e.key == 0))
            .unwrap_or_else(|| (0..PROBE).min_by_key(|&i| window[i].start_us).unwrap_or(0));
        if window[i].key != 0 {
            evicted(&window[i]);
        }
        window[i] = a;
    }

    /// Forgets and returns the entry of `key`.
    pub fn remove(&mut self, key: usize) -> Option<Admitted> {
        if key == 0 {
            return None;
        }
        let h = self.home(key);
        let e = self.entries[h..h + PROBE].iter_mut().find(|e| e.key == key)?;
        Some(std::mem::take(e))
    }
}

/// Admission settings of one upstream (rules are set one by one with [`Region::admission_rule`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConf {
    /// 0 fixed limit (`limit.initial`), 1 gradient, 2 AIMD.
    pub algorithm: u32,
    pub limit: LimitParams,
    pub shares: [f64; CLASSES],
    /// Rate factor while under pressure.
    pub tighten: f64,
    pub relax_after_us: u64,
    /// Time between limit updates.
    pub interval_us: u64,
}

/// What the status shows of an upstream's admission.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdmissionStats {
    pub limit: f64,
    pub min_rtt_us: f64,
    pub sample_us: f64,
    pub rate_factor: f64,
    pub inflight: i32,
    pub waiting: i32,
    pub measuring: bool,
    pub class_inflight: [i32; CLASSES],
    pub admitted: [u64; CLASSES],
    pub shed: [[u64; reason::N]; CLASSES],
    /// Per rule: requests that found no bucket of their own and took the shared overflow bucket.
    pub rate_overflow: [u64; RULES],
}

fn get(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Relaxed))
}

fn put(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Relaxed)
}

fn params_of(h: &AdmissionHead) -> LimitParams {
    let v = |i: usize| get(&h.params[i]);
    // The bounds are used with `f64::clamp`, which panics unless min <= max (neither NaN): a region that does not
    // hold what `admission_configure` wrote (damaged) gets the default bounds rather than a panic.
    let (min, max) = match (v(0), v(1)) {
        (min, max) if min.is_finite() && max.is_finite() && min <= max => (min, max),
        _ => (LimitParams::default().min, LimitParams::default().max),
    };
    LimitParams {
        min,
        max,
        initial: v(2),
        buffer: v(3),
        min_rtt_interval_us: v(4) as u64,
        min_rtt_requests: v(5) as u64,
        min_concurrency: v(6),
        backoff: v(7),
        tolerance: v(8),
    }
}

/// Bucket slots probed per key.
const RATE_PROBE: usize = 8;
/// A bucket untouched for this long may be given to another key.
const RATE_IDLE_MS: u32 = 60_000;

impl Region {
    /// Applies the admission settings of upstream `up`. The limit and the measurements carry over a reload that
    /// keeps the algorithm; otherwise the limit starts at `initial` with a min-RTT measurement.
    pub fn admission_configure(&self, up: u32, c: &AdmissionConf, now_us: u64) {
        let h = self.admission(up).head;
        let p = &c.limit;
        let keep = h.enabled.load(Acquire) == 1 && h.algorithm.load(Relaxed) == c.algorithm;
        for (i, v) in [
            p.min, p.max, p.initial, p.buffer, p.min_rtt_interval_us as f64, p.min_rtt_requests as f64,
            p.min_concurrency, p.backoff, p.tolerance, c.tighten, c.relax_after_us as f64, c.interval_us as f64,
        ]
        .into_iter()
        .enumerate()
        {
            put(&h.params[i], v);
        }
        for (d, s) in h.class_share.iter().zip(c.shares) {
            put(d, s);
        }
        if keep {
            put(&h.limit, get(&h.limit).clamp(p.min, p.max));
        } else {
            put(&h.limit, p.initial);
            put(&h.saved_limit, p.initial);
            put(&h.min_rtt_us, 0.0);
            put(&h.rate_factor, 1.0);
            h.next_measure_us.store(now_us, Relaxed);
            h.measuring.store((c.algorithm != 0) as u32, Relaxed);
            h.measure_sum_us.store(0, Relaxed);
            h.measure_count.store(0, Relaxed);
            h.calm_since_us.store(0, Relaxed);
        }
        h.algorithm.store(c.algorithm, Relaxed);
        h.enabled.store(1, Release);
    }

    /// Turns admission of `up` off (requests in flight still end normally).
    pub fn admission_disable(&self, up: u32) {
        self.admission(up).head.enabled.store(0, Release);
    }

    /// Sets rate rule `rule` of `up` to `rate` requests/s (0: inactive) with bucket size `burst`.
    pub fn admission_rule(&self, up: u32, rule: usize, rate: f64, burst: f64) {
        let h = self.admission(up).head;
        if let (Some(r), Some(b)) = (h.rule_rate.get(rule), h.rule_burst.get(rule)) {
            put(b, burst);
            put(r, rate);
        }
    }

    /// Gives column `col` to `pid` if it is not its already, releasing what a previous owner (a dead worker)
    /// left counted in it.
    pub fn admission_claim_column(&self, col: u32, pid: u32) {
        let Some(owner) = self.admission_owners().get(col as usize) else { return };
        if owner.load(Acquire) == pid {
            return;
        }
        for up in 0..self.params().max_upstreams {
            let a = self.admission(up);
            for class in 0..CLASSES {
                let v = a.columns[col as usize * CLASSES + class].swap(0, AcqRel);
                if v != 0 {
                    a.head.inflight.fetch_sub(v, AcqRel);
                    a.head.class_inflight[class].fetch_sub(v, AcqRel);
                }
            }
            if let Some(w) = a.waiting.get(col as usize) {
                a.head.waiting.fetch_sub(w.swap(0, AcqRel), AcqRel);
            }
        }
        owner.store(pid, Release);
    }

    /// Admits a request of `class` on `up` if the limit allows, counting it in column `col`; `None` when admission
    /// is off for `up`. A refusal is not counted (see [`Region::admission_shed`]).
    #[inline]
    pub fn admission_admit(&self, up: u32, class: u32, col: u32) -> Option<bool> {
        let a = self.admission(up);
        let h = a.head;
        if h.enabled.load(Acquire) == 0 {
            return None;
        }
        let class = (class as usize).min(CLASSES - 1);
        let adaptive = get(&h.limit);
        let limit = if h.measuring.load(Relaxed) == 1 { get(&h.params[6]) } else { adaptive };
        let inflight: [i32; CLASSES] = std::array::from_fn(|i| h.class_inflight[i].load(Relaxed));
        let shares: [f64; CLASSES] = std::array::from_fn(|i| get(&h.class_share[i]));
        if !admits(class, limit, adaptive, h.inflight.load(Relaxed), &inflight, &shares) {
            return Some(false);
        }
        let col = (col as usize).min(a.columns.len() / CLASSES - 1);
        a.columns[col * CLASSES + class].fetch_add(1, Relaxed);
        h.class_inflight[class].fetch_add(1, Relaxed);
        h.inflight.fetch_add(1, Relaxed);
        h.admitted[class].fetch_add(1, Relaxed);
        Some(true)
    }

    /// Adds `delta` (+1 or -1) to the requests of `up` waiting in the queue, counted in column `col` (so that what
    /// a dead worker left counted is released with its column).
    pub fn admission_wait(&self, up: u32, col: u32, delta: i32) {
        let a = self.admission(up);
        let col = (col as usize).min(a.waiting.len() - 1);
        a.waiting[col].fetch_add(delta, Relaxed);
        a.head.waiting.fetch_add(delta, Relaxed);
    }

    /// Counts a request of `class` shed for `why` (a [`reason`]).
    pub fn admission_shed(&self, up: u32, class: u32, why: usize) {
        let h = self.admission(up).head;
        if let Some(c) = h.shed.get((class as usize).min(CLASSES - 1)).and_then(|r| r.get(why)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Ends an admitted request; its latency feeds the limit unless `sample` is false (the client went away).
    #[inline]
    pub fn admission_done(&self, e: &Admitted, latency_us: u64, sample: bool) {
        let a = self.admission(e.upstream);
        let class = (e.class as usize).min(CLASSES - 1);
        let col = (e.column as usize).min(a.columns.len() / CLASSES - 1);
        a.columns[col * CLASSES + class].fetch_sub(1, Relaxed);
        a.head.class_inflight[class].fetch_sub(1, Relaxed);
        a.head.inflight.fetch_sub(1, Relaxed);
        if sample {
            a.head.lat_sum_us.fetch_add(latency_us, Relaxed);
            a.head.lat_count.fetch_add(1, Relaxed);
        }
    }

    /// Seconds a shed client should wait: about the time the requests ahead need to finish, at least 1.
    pub fn admission_retry_after(&self, up: u32) -> f64 {
        let h = self.admission(up).head;
        let rtt = match (get(&h.sample_us), get(&h.min_rtt_us)) {
            (s, _) if s > 0.0 => s,
            (_, m) => m,
        };
        let limit = get(&h.limit).max(1.0);
        let ahead = (h.inflight.load(Relaxed) + h.waiting.load(Relaxed)).max(0) as f64;
        (rtt / 1e6 * (ahead / limit).max(1.0)).ceil().clamp(1.0, 3600.0)
    }

    /// Takes a token of rate rule `rule` of `up` for `key`; on refusal the seconds until one is there. An inactive
    /// rule lets the request through. A key the table has no room for (its probe window full of recently used
    /// buckets) shares the rule's overflow bucket with every other such key: a full table limits more, never less.
    pub fn admission_rate(&self, up: u32, rule: usize, key: &[u8], now_ms: u32) -> Result<(), f64> {
        let h = self.admission(up).head;
        let (Some(r), Some(b)) = (h.rule_rate.get(rule), h.rule_burst.get(rule)) else { return Ok(()) };
        let base = get(r);
        if base.is_nan() || base <= 0.0 {
            return Ok(());
        }
        let factor = get(&h.rate_factor).clamp(0.0, 1.0);
        let (rate, burst) = (base * factor, (get(b) * factor).max(1.0));
        let secret = std::array::from_fn(|i| self.header().hash_key[i].load(Relaxed));
        let hash = key_hash(secret, up, rule as u32, key);
        let slots = self.rate_slots();
        let home = hash as usize & (slots.len() - 1);
        let probe = || (0..RATE_PROBE).map(|i| &slots[(home + i) & (slots.len() - 1)]);
        for s in probe() {
            let k = s.key.load(Acquire);
            if k == hash {
                return Bucket(&s.state).take(now_ms, rate, burst);
            }
            if k == 0 && s.key.compare_exchange(0, hash, AcqRel, Acquire).is_ok() {
                s.state.store(0, Release);
                return Bucket(&s.state).take(now_ms, rate, burst);
            }
        }
        for s in probe() {
            let (k, st) = (s.key.load(Acquire), s.state.load(Acquire));
            if now_ms.wrapping_sub(st as u32) > RATE_IDLE_MS && s.key.compare_exchange(k, hash, AcqRel, Acquire).is_ok() {
                s.state.store(0, Release);
                return Bucket(&s.state).take(now_ms, rate, burst);
            }
        }
        match (h.overflow.get(rule), h.overflow_requests.get(rule)) {
            (Some(o), Some(n)) => {
                n.fetch_add(1, Relaxed);
                Bucket(o).take(now_ms, rate, burst)
            }
            _ => Err(1.0),
        }
    }

    /// Periodic update of `up` (any worker may call it; one per interval does the work): moves the limit, measures
    /// the minimum RTT when due, and tightens or relaxes the rate limits (`pending`: a scale-up is awaited). Each
    /// change of the rate factor is an event with its reason.
    pub fn admission_update(&self, up: u32, now_us: u64, pending: bool) {
        let h = self.admission(up).head;
        if h.enabled.load(Acquire) == 0 {
            return;
        }
        let last = h.last_update_us.load(Acquire);
        let interval = get(&h.params[11]) as u64;
        if now_us.saturating_sub(last) < interval
            || h.last_update_us.compare_exchange(last, now_us, AcqRel, Acquire).is_err()
        {
            return;
        }
        let p = params_of(h);
        let sum = h.lat_sum_us.swap(0, AcqRel);
        let count = h.lat_count.swap(0, AcqRel);
        // Only compared for a change: wrapping sums (counters a damaged region holds may be anything).
        let sheds = h.shed.iter().fold(0u64, |a, r| {
            a.wrapping_add(r[reason::CONCURRENCY].load(Relaxed)).wrapping_add(r[reason::QUEUE_TIMEOUT].load(Relaxed))
        });
        let shed = h.shed_seen.swap(sheds, AcqRel) != sheds;
        let npeers = self.upstream(up).head.npeers.load(Acquire);
        let before = h.npeers.swap(npeers, AcqRel);
        let mut limit = get(&h.limit);
        if before != 0 && npeers != 0 && before != npeers {
            limit = (limit * npeers as f64 / before as f64).clamp(p.min, p.max);
        }
        let algorithm = h.algorithm.load(Relaxed);
        let measuring = h.measuring.load(Relaxed) == 1;
        let min_rtt = get(&h.min_rtt_us);
        let rtt = if count > 0 { sum as f64 / count as f64 } else { 0.0 };
        let sample = Sample { rtt_us: rtt, inflight: h.inflight.load(Relaxed) as f64, shed };
        if algorithm != 0 && measuring {
            let (msum, mcount) = (h.measure_sum_us.load(Relaxed) + sum, h.measure_count.load(Relaxed) + count);
            if mcount >= p.min_rtt_requests.max(1) {
                put(&h.min_rtt_us, msum as f64 / mcount as f64);
                limit = get(&h.saved_limit).clamp(p.min, p.max);
                h.next_measure_us.store(now_us + p.min_rtt_interval_us, Relaxed);
                h.measure_sum_us.store(0, Relaxed);
                h.measure_count.store(0, Relaxed);
                h.measuring.store(0, Release);
            } else {
                h.measure_sum_us.store(msum, Relaxed);
                h.measure_count.store(mcount, Relaxed);
            }
        } else if algorithm != 0 && p.min_rtt_interval_us > 0 && now_us >= h.next_measure_us.load(Relaxed) {
            put(&h.saved_limit, limit);
            h.measuring.store(1, Release);
        } else if count > 0 && min_rtt > 0.0 {
            limit = next_limit(algorithm, &p, limit, min_rtt, &sample);
        }
        if count > 0 {
            put(&h.sample_us, rtt);
        }
        put(&h.limit, limit);
        let over = !measuring && (count > 0 || shed) && overloaded(&sample, min_rtt);
        let old = get(&h.rate_factor);
        let (factor, calm) = rate_factor(old, get(&h.params[9]), over || pending, h.calm_since_us.load(Relaxed),
                                         get(&h.params[10]) as u64, now_us);
        h.calm_since_us.store(calm, Relaxed);
        if factor != old {
            put(&h.rate_factor, factor);
            let kind = if factor < old { crate::events::kind::RATE_TIGHTENED } else { crate::events::kind::RATE_RELAXED };
            self.emit(now_us, kind, None, up, crate::events::NO_PEER, [factor, over as u8 as f64, pending as u8 as f64, limit]);
        }
    }

    /// The admission state of `up`.
    pub fn admission_stats(&self, up: u32) -> AdmissionStats {
        let h = self.admission(up).head;
        AdmissionStats {
            limit: get(&h.limit),
            min_rtt_us: get(&h.min_rtt_us),
            sample_us: get(&h.sample_us),
            rate_factor: get(&h.rate_factor),
            inflight: h.inflight.load(Relaxed),
            waiting: h.waiting.load(Relaxed),
            measuring: h.measuring.load(Relaxed) == 1,
            class_inflight: std::array::from_fn(|i| h.class_inflight[i].load(Relaxed)),
            admitted: std::array::from_fn(|i| h.admitted[i].load(Relaxed)),
            shed: std::array::from_fn(|c| std::array::from_fn(|r| h.shed[c][r].load(Relaxed))),
            rate_overflow: std::array::from_fn(|r| h.overflow_requests[r].load(Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rtt_us: f64, inflight: f64) -> Sample {
        Sample { rtt_us, inflight, shed: false }
    }

    #[test]
    fn gradient_settles_near_capacity_and_falls_when_latency_climbs() {
        // A backend of capacity 16 with a 40 ms service time: latency is 40 ms up to 16 in flight, then queues.
        let p = LimitParams { buffer: 0.1, ..LimitParams::default() };
        let latency = |limit: f64| 40_000.0 * (limit / 16.0).max(1.0);
        let mut limit = p.initial;
        for _ in 0..200 {
            limit = next_limit(1, &p, limit, 40_000.0, &sample(latency(limit), limit));
        }
        assert!((17.0..26.0).contains(&limit), "settles a little above capacity: {limit}");
        assert!(latency(limit) < 1.5 * 40_000.0);
        // The backend gets 3x slower: the limit halves at most per step and goes down.
        let before = limit;
        limit = next_limit(1, &p, limit, 40_000.0, &sample(120_000.0, limit));
        assert!(limit < before && limit >= before * 0.5);
        // Never outside [min, max], whatever the sample.
        for rtt in [0.0, 1.0, f64::INFINITY, f64::NAN, 1e12] {
            let l = next_limit(1, &p, 500.0, 40_000.0, &sample(rtt, 1.0));
            assert!((p.min..=p.max).contains(&l), "{rtt} -> {l}");
        }
    }

    #[test]
    fn aimd_adds_one_and_backs_off() {
        let p = LimitParams::default();
        assert_eq!(next_limit(2, &p, 20.0, 1000.0, &sample(1000.0, 15.0)), 21.0);
        assert_eq!(next_limit(2, &p, 20.0, 1000.0, &sample(1000.0, 5.0)), 20.0, "unused limit does not grow");
        assert_eq!(next_limit(2, &p, 20.0, 1000.0, &sample(2000.0, 20.0)), 18.0);
        assert_eq!(next_limit(2, &p, 3.0, 1000.0, &sample(9000.0, 3.0)), 3.0, "min holds");
        assert_eq!(next_limit(0, &p, 7.0, 1000.0, &sample(9000.0, 3.0)), 7.0, "fixed");
    }

    #[test]
    fn critical_keeps_its_share_and_the_least_important_goes_first() {
        let shares = [0.5, 0.0, 0.0, 0.0];
        // Limit 10, nothing critical in flight: normal (1) may use only the half not reserved for critical.
        assert!(admits(1, 10.0, 10.0, 4, &[0, 4, 0, 0], &shares));
        assert!(!admits(1, 10.0, 10.0, 5, &[0, 5, 0, 0], &shares));
        // Critical is admitted while under its share, even with the limit used up.
        assert!(admits(0, 10.0, 10.0, 10, &[4, 6, 0, 0], &shares));
        // ...and beyond it while what it has in flight is under the limit: the less important requests in flight
        // do not block it (no new one of theirs is admitted until the total is back under the limit).
        assert!(admits(0, 10.0, 10.0, 10, &[5, 5, 0, 0], &shares));
        assert!(!admits(1, 10.0, 10.0, 10, &[6, 4, 0, 0], &shares));
        assert!(!admits(3, 10.0, 10.0, 10, &[6, 0, 0, 4], &shares));
        assert!(!admits(0, 10.0, 10.0, 12, &[10, 2, 0, 0], &shares), "critical alone at the limit");
        // Classes taking turns cannot push the total to twice the limit: here 10 sheddable, then 9 normal in flight.
        assert!(admits(0, 10.0, 10.0, 19, &[0, 9, 0, 10], &[0.0; 4]));
        assert!(!admits(0, 10.0, 10.0, 20, &[0, 10, 0, 10], &[0.0; 4]));
        // A middle class counts itself and the more important ones, plus their unused shares.
        let three = [0.3, 0.3, 0.0, 0.0];
        assert!(admits(1, 10.0, 10.0, 9, &[2, 6, 0, 1], &three), "2 + 6 + 1 reserved for critical; sheddable does not count");
        assert!(!admits(1, 10.0, 10.0, 9, &[2, 7, 0, 0], &three), "2 + 7 + 1 reserved for critical");
        assert!(admits(2, 10.0, 10.0, 9, &[3, 3, 3, 0], &three));
        assert!(!admits(2, 10.0, 10.0, 10, &[3, 3, 4, 0], &three));
        // While the minimum RTT is measured (limit 3), the shares are of the adaptive limit (40): critical keeps 20.
        assert!(admits(0, 3.0, 40.0, 15, &[12, 0, 0, 3], &shares));
        assert!(!admits(0, 3.0, 40.0, 20, &[20, 0, 0, 0], &shares));
        assert!(!admits(3, 3.0, 40.0, 3, &[0, 0, 0, 3], &shares));
        // Without shares it is a plain limit.
        assert!(admits(0, 10.0, 10.0, 9, &[9, 0, 0, 0], &[0.0; 4]));
        assert!(!admits(0, 10.0, 10.0, 10, &[10, 0, 0, 0], &[0.0; 4]));
        assert!(!admits(9, 10.0, 10.0, 10, &[0, 0, 0, 10], &[0.0; 4]), "out-of-range class is the last");
    }

    #[test]
    fn rate_tightens_under_pressure_and_relaxes_after_the_calm_period() {
        let (f, c) = rate_factor(1.0, 0.5, true, 0, 10_000_000, 1_000_000);
        assert_eq!((f, c), (0.5, 0));
        let (f, c) = rate_factor(f, 0.5, false, c, 10_000_000, 2_000_000);
        assert_eq!((f, c), (0.5, 2_000_000));
        let (f, c) = rate_factor(f, 0.5, true, c, 10_000_000, 5_000_000);
        assert_eq!((f, c), (0.5, 0), "pressure again restarts the calm period");
        let (f, c) = rate_factor(f, 0.5, false, c, 10_000_000, 6_000_000);
        assert_eq!(rate_factor(f, 0.5, false, c, 10_000_000, 15_999_999).0, 0.5);
        assert_eq!(rate_factor(f, 0.5, false, c, 10_000_000, 16_000_000), (1.0, 0));
        assert!(overloaded(&Sample { rtt_us: 1.0, inflight: 0.0, shed: true }, 1.0));
        assert!(overloaded(&sample(2001.0, 0.0), 1000.0));
        assert!(!overloaded(&sample(1999.0, 0.0), 1000.0));
    }

    #[test]
    fn bucket_refills_by_time_and_says_how_long_to_wait() {
        let w = AtomicU64::new(0);
        let b = Bucket(&w);
        for _ in 0..5 {
            assert!(b.take(1000, 10.0, 5.0).is_ok());
        }
        let wait = b.take(1000, 10.0, 5.0).unwrap_err();
        assert!((wait - 0.1).abs() < 0.002, "{wait}");
        assert!(b.take(1050, 10.0, 5.0).is_err());
        assert!(b.take(1101, 10.0, 5.0).is_ok(), "one token after 100 ms at 10/s");
        assert!(!b.full(1101, 10.0, 5.0));
        assert!(b.full(3000, 10.0, 5.0));
        assert!(b.take(u32::MAX, 10.0, 5.0).is_ok(), "clock wrap");
        assert!(b.take(5, 10.0, 5.0).is_ok());
        assert!(Bucket(&AtomicU64::new(0)).take(0, 0.0, 0.5).unwrap_err().is_infinite());
    }

    #[test]
    fn bucket_is_exact_under_threads() {
        let w = AtomicU64::new(0);
        let taken = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if Bucket(&w).take(7, 0.0, 100.0).is_ok() {
                            taken.fetch_add(1, Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Relaxed), 100);
    }

    #[test]
    fn tracker_remembers_evicts_and_forgets() {
        let mut t = Tracker::new(16);
        let a = |key, start_us| Admitted { key, upstream: 1, class: 0, column: 0, start_us };
        t.insert(a(0x1000, 5), |_| panic!("nothing to evict"));
        assert_eq!(t.remove(0x1000).map(|e| e.start_us), Some(5));
        assert_eq!(t.remove(0x1000), None);
        let mut evicted = 0;
        for i in 0..200 {
            t.insert(a(0x1000 + i * 16, i as u64 + 1), |_| evicted += 1);
        }
        let mut found = 0;
        for i in 0..200 {
            found += t.remove(0x1000 + i * 16).is_some() as usize;
        }
        assert_eq!(found + evicted, 200, "every request is either remembered or handed back");
        assert_eq!(t.remove(0), None);
    }

    fn region() -> Region {
        let p = crate::layout::Params { max_upstreams: 2, max_peers: 4, max_workers: 2, ..Default::default() };
        Region::new_heap(p, 0).unwrap()
    }

    fn conf(algorithm: u32) -> AdmissionConf {
        AdmissionConf {
            algorithm,
            limit: LimitParams { min_rtt_requests: 4, ..LimitParams::default() },
            shares: [0.0; CLASSES],
            tighten: 0.5,
            relax_after_us: 5_000_000,
            interval_us: 100_000,
        }
    }

    #[test]
    fn limit_measures_min_rtt_then_follows_latency() {
        let r = region();
        r.admission_configure(0, &conf(1), 0);
        // Measuring: pinned at min_concurrency (3).
        let admitted = (0..5).filter(|_| r.admission_admit(0, 0, 0) == Some(true)).count();
        assert_eq!(admitted, 3);
        let done = |us| r.admission_done(&Admitted { key: 1, upstream: 0, class: 0, column: 0, start_us: 0 }, us, true);
        for _ in 0..3 {
            done(10_000);
        }
        done(10_000); // a fourth sample (as if admitted earlier): inflight goes to -1, fine for the test
        r.admission(0).head.inflight.store(0, Relaxed);
        r.admission_update(0, 200_000, false);
        let s = r.admission_stats(0);
        assert!(!s.measuring);
        assert_eq!((s.min_rtt_us, s.limit), (10_000.0, 20.0));
        // Latency at twice the minimum: the limit halves plus headroom.
        for _ in 0..10 {
            done(20_000);
        }
        r.admission_update(0, 250_000, false);
        assert_eq!(r.admission_stats(0).limit, 20.0, "not before the interval");
        r.admission_update(0, 300_000, false);
        let l = r.admission_stats(0).limit;
        assert!((l - (20.0 * 0.625 + 20f64.sqrt())).abs() < 1e-9, "{l}");
        // Peers doubled: the limit doubles at once.
        r.upstream(0).head.npeers.store(2, Relaxed);
        r.admission_update(0, 400_000, false);
        r.upstream(0).head.npeers.store(4, Relaxed);
        let before = r.admission_stats(0).limit;
        r.admission_update(0, 500_000, false);
        assert!((r.admission_stats(0).limit - 2.0 * before).abs() < 1e-9);
    }

    #[test]
    fn rate_rules_tighten_under_pressure_and_relax_with_an_event() {
        let r = region();
        r.admission_configure(1, &conf(0), 0);
        r.admission_rule(1, 0, 10.0, 10.0);
        let taken = (0..20).filter(|_| r.admission_rate(1, 0, b"1.2.3.4", 1000).is_ok()).count();
        assert_eq!(taken, 10);
        assert!(r.admission_rate(1, 0, b"5.6.7.8", 1000).is_ok(), "another key has its own bucket");
        assert!(r.admission_rate(1, 1, b"1.2.3.4", 1000).is_ok(), "an inactive rule lets everything through");
        r.admission_update(1, 1_000_000, true);
        assert_eq!(r.admission_stats(1).rate_factor, 0.5);
        let e = r.read_events(0, &mut [crate::events::EventRecord::default(); 4]);
        assert_eq!(e.0, 1);
        // 2 s later at half the rate: 10 tokens, not 20.
        let taken = (0..30).filter(|_| r.admission_rate(1, 0, b"9.9.9.9", 3000).is_ok()).count();
        assert_eq!(taken, 5, "the burst is halved too");
        r.admission_update(1, 2_000_000, false);
        r.admission_update(1, 6_900_000, false);
        assert_eq!(r.admission_stats(1).rate_factor, 0.5);
        r.admission_update(1, 7_000_000, false);
        assert_eq!(r.admission_stats(1).rate_factor, 1.0);
        let mut out = [crate::events::EventRecord::default(); 4];
        assert_eq!(r.read_events(0, &mut out).0, 2);
        assert_eq!(out[1].kind, crate::events::kind::RATE_RELAXED);
    }

    #[test]
    fn a_dead_workers_column_is_released_when_reclaimed() {
        let r = region();
        r.admission_configure(0, &conf(0), 0);
        r.admission_claim_column(1, 100);
        for _ in 0..3 {
            assert_eq!(r.admission_admit(0, 2, 1), Some(true));
        }
        assert_eq!(r.admission_stats(0).inflight, 3);
        r.admission_claim_column(1, 100);
        assert_eq!(r.admission_stats(0).inflight, 3, "same owner: nothing released");
        r.admission_claim_column(1, 200);
        let s = r.admission_stats(0);
        assert_eq!((s.inflight, s.class_inflight[2]), (0, 0));
        assert_eq!(r.admission_admit(1, 0, 0), None, "off unless configured");
    }

    #[test]
    fn a_dead_workers_queue_waiters_are_released_with_its_column() {
        let r = region();
        r.admission_configure(0, &conf(0), 0);
        r.admission_claim_column(1, 100);
        r.admission_wait(0, 1, 1);
        r.admission_wait(0, 1, 1);
        r.admission_wait(0, 0, 1);
        assert_eq!(r.admission_stats(0).waiting, 3);
        r.admission_claim_column(1, 200); // the worker was killed during the wait; its successor takes the column
        assert_eq!(r.admission_stats(0).waiting, 1, "only the live worker's waiter is left");
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // From the SipHash paper (appendix A) and the reference implementation's vectors.h: key 00..0f.
        let k = [u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]), u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15])];
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash::<2, 4>(k, &msg), 0xa129_ca61_49be_45e5);
        assert_eq!(siphash::<2, 4>(k, &[]), 0x726f_db47_dd0e_0e31);
        assert_ne!(key_hash(k, 0, 0, b"a"), key_hash([k[0] ^ 1, k[1]], 0, 0, b"a"), "the secret changes the hash");
    }

    /// The unkeyed hash rate keys used to have (FNV-1a), for the attack below.
    fn fnv(upstream: u32, rule: u32, key: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in upstream.to_le_bytes().iter().chain(rule.to_le_bytes().iter()).chain(key) {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h.max(1)
    }

    #[test]
    fn keys_computed_offline_do_not_switch_off_a_victims_limit() {
        let r = region();
        r.admission_configure(1, &conf(0), 0);
        r.admission_rule(1, 0, 1.0, 5.0);
        let slots = r.rate_slots().len() as u64;
        let victim = b"victim";
        let home = fnv(1, 0, victim) % slots;
        // Keys whose public hash falls into the victim's probe window, found offline.
        let mut attack = Vec::new();
        let mut i = 0u64;
        while attack.len() < RATE_PROBE * 2 {
            let k = format!("k{i}");
            if (fnv(1, 0, k.as_bytes()) % slots).wrapping_sub(home) % slots < RATE_PROBE as u64 {
                attack.push(k);
            }
            i += 1;
        }
        for k in &attack {
            let _ = r.admission_rate(1, 0, k.as_bytes(), 1000);
        }
        let admitted = (0..1000).filter(|_| r.admission_rate(1, 0, victim, 1000).is_ok()).count();
        assert_eq!(admitted, 5, "the victim keeps its own limit (burst 5)");
        assert_eq!(r.admission_stats(1).rate_overflow[0], 0);
    }

    #[test]
    fn a_full_table_limits_new_keys_through_the_overflow_bucket() {
        let p = crate::layout::Params { max_upstreams: 2, max_peers: 4, max_workers: 2, rate_slots: 64, ..Default::default() };
        let r = Region::new_heap(p, 0).unwrap();
        r.admission_configure(0, &conf(0), 0);
        r.admission_rule(0, 0, 1.0, 3.0);
        for i in 0..64 * 8 {
            let _ = r.admission_rate(0, 0, format!("fill{i}").as_bytes(), 1000);
        }
        assert!(r.rate_slots().iter().all(|s| s.key.load(Relaxed) != 0), "every bucket is taken");
        let before = r.admission_stats(0).rate_overflow[0];
        assert!(before > 0, "the keys past the table's room were counted");
        // The overflow bucket (burst 3) is long empty: new keys are limited, not let through.
        let admitted = (0..100).filter(|i| r.admission_rate(0, 0, format!("new{i}").as_bytes(), 1000).is_ok()).count();
        assert_eq!(admitted, 0);
        assert_eq!(r.admission_stats(0).rate_overflow[0], before + 100);
        // A minute later every bucket is idle and may be given to a new key again.
        assert!(r.admission_rate(0, 0, b"later", 62_000).is_ok());
    }
}
