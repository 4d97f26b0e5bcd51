//! Operations on a shared [`Region`]: configuration, peer choice, attempt accounting and statistics.
//!
//! Concurrency rules:
//! - The request path (pick, begin/end of attempts, recording) takes no lock: it uses atomics only, and reads an
//!   upstream's peer list and tunables under a seqlock (it retries when a writer changed them meanwhile).
//! - Configuration changes are serialised by a writer lock in the header holding its owner (pid and start time, see
//!   [`crate::owner`]) and since when. A writer that finds the lock held by a dead owner (the pid is gone, or was given
//!   to another process) takes it over and first repairs what the dead one left half-written: every upstream whose
//!   seqlock is odd gets its peer list rebuilt from the peer records and its seqlock made even
//!   ([`Region::recover`]; every worker's periodic upkeep runs it too, so the repair needs no configuration change).
//! - Every seqlock read is bounded ([`SEQLOCK_READ_TRIES`]): a reader never waits for a writer, dead or alive. Status
//!   reads then answer [`SeqBusy`]; `pick` and the upkeep read the fields as they are (each one valid on its own).
//! - A peer record handed to another peer gets a new generation; every writer on the request path carries the
//!   generation it started with, and is ignored when it no longer matches. Records are never freed while in use.

use crate::addr;
use crate::ewma;
use crate::health::{self, OutlierParams};
use crate::layout::{state, LayoutError, Peer, PeerHead, Region, Upstream, UpstreamHead};
use crate::owner::{self, Processes};
use crate::report::ReportView;
use std::sync::atomic::AtomicU64;
use crate::rng::Rng;
use crate::select::{Algorithm, PeerView};
use crate::slowstart::SlowStart;
use crate::window::{counter, Outcome, WindowSum};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{fence, Ordering::*};

/// Tunables of one upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpstreamParams {
    pub algorithm: Algorithm,
    /// Extra attempts after the first (nginx `set_more_tries`), capped by the number of peers - 1.
    pub retries: u32,
    pub slow_start: SlowStart,
    /// Peak-EWMA decay time τ.
    pub decay_us: u64,
    /// Estimate for peers of an upstream that has no measurement yet.
    pub default_rtt_us: u32,
    /// A failed attempt counts as a latency of at least `penalty ×` the upstream's mean estimate.
    pub failure_penalty: f64,
    /// A peer whose estimate exceeds `slow_peer_factor ×` the upstream's baseline (the lower median of its healthy
    /// peers' estimates) is slow (0 switches the rule off) ...
    pub slow_peer_factor: f64,
    /// ... and its cost is multiplied by `slow_peer_penalty`, so that it wins a comparison only when the other peer
    /// has that many times more requests in flight.
    pub slow_peer_penalty: f64,
    /// Outlier detection, ejection and panic mode.
    pub outlier: OutlierParams,
    /// HTTP statuses counted as failures, as a bitmap (bit `s` for status `s`, `s` < 640).
    pub failure_statuses: [u64; 10],
}

/// The default failure statuses: 500 to 599.
pub fn default_failure_statuses() -> [u64; 10] {
    let mut m = [0u64; 10];
    for s in 500..600 {
        m[s / 64] |= 1 << (s % 64);
    }
    m
}

/// Whether `status` is set in a failure-status bitmap.
#[inline]
pub fn is_failure_status(map: &[u64; 10], status: u32) -> bool {
    (status as usize) < 640 && map[status as usize / 64] & (1 << (status % 64)) != 0
}

impl Default for UpstreamParams {
    fn default() -> Self {
        UpstreamParams {
            algorithm: Algorithm::PeakEwma,
            retries: 2,
            slow_start: SlowStart::default(),
            decay_us: 10_000_000,
            default_rtt_us: 30_000,
            failure_penalty: 2.0,
            slow_peer_factor: 3.0,
            slow_peer_penalty: 10.0,
            outlier: OutlierParams::default(),
            failure_statuses: default_failure_statuses(),
        }
    }
}

/// One peer of an upstream in a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConf {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// One upstream in a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConf {
    pub name: String,
    pub params: UpstreamParams,
    pub peers: Vec<PeerConf>,
}

/// Why a configuration was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("upstreams.{0}: name must be 1 to 63 bytes")]
    BadName(String),
    #[error("upstreams.{0}: defined twice")]
    DuplicateUpstream(String),
    #[error("upstreams.{0}.peers: \"{1}\" listed twice")]
    DuplicatePeer(String, String),
    #[error("upstreams.{0}.peers: weight must be between 1 and 10000")]
    BadWeight(String),
    #[error("{got} upstreams configured but max_upstreams is {max}")]
    TooManyUpstreams { got: usize, max: u32 },
    #[error("{got} peers configured in all but max_peers is {max}")]
    TooManyPeers { got: usize, max: u32 },
    #[error("another process (pid {0}) is changing the configuration")]
    Busy(u32),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Spins of [`Region::lock_writer`] before it reports the lock busy (a few microseconds).
const WRITER_SPINS: u32 = 4096;

/// Tries of a seqlock read before it gives up on a writer (each try that finds the seqlock odd spins once): some tens
/// of microseconds at most. A live writer keeps an upstream's seqlock odd for the few hundred stores of its tunables
/// and peer list only.
pub const SEQLOCK_READ_TRIES: u32 = 1024;

/// Tries of `pick` to read an upstream's peer list unchanged before it picks from the list as it is.
const PICK_TRIES: u32 = 8;

/// A seqlock read gave up: the upstream's seqlock stayed odd (or kept changing) for [`SEQLOCK_READ_TRIES`] tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upstream is being changed by another process; retry")]
pub struct SeqBusy;

/// The peer records of one `configure`, indexed in one pass: non-free records by (upstream, canonical address), the
/// first in record order for each; and the records to reuse for new peers, free ones first, then retired ones, the
/// longest retired first, leaving out those the new configuration keeps or brings back.
#[derive(Default)]
struct Records {
    by_addr: HashMap<(u32, String), u32>,
    free: Vec<u32>,
    retired: Vec<(u64, u32)>,
    next: usize,
}

impl Records {
    fn collect_retired(&mut self, ups: &[UpstreamConf], names: &[Option<String>]) {
        let mut reserved = HashSet::new();
        for u in ups {
            let Some(idx) = names.iter().position(|n| n.as_deref() == Some(u.name.as_str())) else { continue };
            for c in &u.peers {
                if let Some(&s) = self.by_addr.get(&(idx as u32, addr::canonical(&c.addr).0)) {
                    reserved.insert(s);
                }
            }
        }
        self.retired.retain(|(_, s)| !reserved.contains(s));
        self.retired.sort_unstable();
        self.free.reverse(); // popped from the end: lowest record first
    }

    /// The next record to reuse that is still free or retired (one may have been brought back since).
    fn take(&mut self, r: &Region) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        while let Some(&(_, s)) = self.retired.get(self.next) {
            self.next += 1;
            if r.peer(s).head.state.load(Acquire) == state::RETIRED {
                return Some(s);
            }
        }
        None
    }
}

/// The mark of an in-flight column being reclaimed, or'ed with the reclaiming worker's pid (pids are below 2^22).
pub const RECLAIMING: u32 = 1 << 31;

/// Why no peer could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("unknown upstream")]
    UnknownUpstream,
    #[error("no peer available")]
    NoPeer,
    /// The upstream record was handed to another upstream since the caller resolved its index (see
    /// [`Region::upstream_gen`]): resolve the name again.
    #[error("stale upstream index (the record serves another upstream now)")]
    StaleUpstream,
}

/// A chosen peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub slot: u32,
    pub gen: u32,
    /// Extra attempts nginx should allow this request (meaningful on the first attempt).
    pub more_tries: u32,
    /// The balancer's cost of the peer when it was chosen (peak-EWMA latency × (in flight + 1) / weight; 0 for a
    /// probe of a half-open peer), read in the same consistent view as the choice.
    pub cost: f64,
}

/// Statistics of one peer at one moment.
#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    pub slot: u32,
    pub gen: u32,
    pub state: u32,
    pub upstream: u32,
    pub weight: u32,
    pub port: u32,
    pub addr: String,
    pub host_len: usize,
    pub inflight: i32,
    /// Half-open probes in flight.
    pub probes: u32,
    /// Over the rolling window.
    pub window: WindowSum,
    /// Length of time the window covers so far (µs).
    pub window_us: u64,
    /// All-time counters (see `window::counter`) and latency sum.
    pub totals: [u64; counter::N],
    pub total_latency_us: u64,
    /// Decayed peak-EWMA estimate now (µs).
    pub ewma_us: f64,
    /// Load cost used by the balancer (µs-weighted).
    pub cost: f64,
    /// Slow-start multiplier now.
    pub slow_start: f64,
    pub added_us: u64,
    /// `health::state`, times ejected (decays), ejections in all, time left ejected (µs; 0 when not ejected).
    pub health: u32,
    pub times_ejected: u32,
    pub ejections_total: u64,
    pub ejected_for_us: u64,
    /// Current failure streaks: any kind, gateway (incl. connect), timeouts.
    pub consecutive: [u32; 3],
}

impl Region {
    /// Current time slice of the rolling window.
    #[inline]
    fn slice(&self, now_us: u64) -> u64 {
        now_us / (self.params().bucket_ms as u64 * 1000)
    }

    fn upstream_params(&self, up: &Upstream<'_>) -> UpstreamParams {
        let h = up.head;
        let sp = self.select_params(up);
        UpstreamParams {
            algorithm: sp.algorithm,
            retries: sp.retries,
            slow_start: sp.slow_start,
            decay_us: sp.decay_us,
            default_rtt_us: h.default_rtt_us.load(Relaxed),
            failure_penalty: h.failure_penalty_milli.load(Relaxed) as f64 / 1000.0,
            slow_peer_factor: sp.slow_factor,
            slow_peer_penalty: sp.slow_penalty,
            outlier: load_outlier(&h.outlier),
            failure_statuses: std::array::from_fn(|i| h.failure_statuses[i].load(Relaxed)),
        }
    }

    /// What the request path needs of an upstream's tunables (a subset of [`UpstreamParams`], fewer loads).
    #[inline]
    fn select_params(&self, up: &Upstream<'_>) -> SelectParams {
        let h = up.head;
        SelectParams {
            algorithm: Algorithm::from_u32(h.algorithm.load(Relaxed)),
            retries: h.retries.load(Relaxed),
            slow_start: SlowStart {
                window_us: h.slow_start_ms.load(Relaxed) as u64 * 1000,
                aggression: h.slow_start_aggression_milli.load(Relaxed).max(1) as f64 / 1000.0,
                min_weight: h.slow_start_min_weight_milli.load(Relaxed) as f64 / 1000.0,
            },
            decay_us: h.decay_ms.load(Relaxed) as u64 * 1000,
            half_open_probes: h.outlier[14].load(Relaxed) as u32,
            probe_timeout_us: health::probe_timeout_us(h.outlier[3].load(Relaxed)),
            slow_factor: h.slow_factor_milli.load(Relaxed) as f64 / 1000.0,
            slow_penalty: h.slow_penalty_milli.load(Relaxed).max(1000) as f64 / 1000.0,
        }
    }

    /// Whether upstream `idx` counts `status` as a failure (one load; no seqlock needed for a single word).
    #[inline]
    pub fn fails_on(&self, idx: u32, status: u32) -> bool {
        if idx >= self.params().max_upstreams || status >= 640 {
            return false;
        }
        let word = self.upstream(idx).head.failure_statuses[status as usize / 64].load(Relaxed);
        word & (1 << (status % 64)) != 0
    }

    /// How an attempt on upstream `idx` that got an HTTP response with `status` ended: a failure when the upstream
    /// counts the status as one (502 to 504 as gateway errors), [`Outcome::Aborted`] for 0 and 499 (the client went
    /// away before a response), else a success.
    #[inline]
    pub fn response_outcome(&self, idx: u32, status: u32) -> Outcome {
        match status {
            0 | 499 => Outcome::Aborted,
            502..=504 if self.fails_on(idx, status) => Outcome::Gateway,
            _ if self.fails_on(idx, status) => Outcome::Http5xx,
            _ => Outcome::Success,
        }
    }

    /// Reads an upstream's tunables and peer count consistently; `Ok(None)` for an index that is no upstream.
    ///
    /// # Errors
    /// [`SeqBusy`] when a writer kept the upstream's seqlock odd for [`SEQLOCK_READ_TRIES`] tries.
    pub fn try_read_upstream(&self, idx: u32) -> Result<Option<(UpstreamParams, u32, u32)>, SeqBusy> {
        if idx >= self.params().max_upstreams {
            return Ok(None);
        }
        let up = self.upstream(idx);
        let (st, params, n, gen) = read_stable(&up, || self.read_upstream_fields(&up))?;
        Ok((st != state::FREE).then_some((params, n, gen)))
    }

    fn read_upstream_fields(&self, up: &Upstream<'_>) -> (u32, UpstreamParams, u32, u32) {
        (
            up.head.state.load(Relaxed),
            self.upstream_params(up),
            up.head.npeers.load(Relaxed).min(self.params().max_peers),
            up.head.gen.load(Relaxed),
        )
    }

    /// [`Region::try_read_upstream`], or when a writer is in the way, the fields as they are (each a value some
    /// configuration had): for the upkeep and the statistics, which must never wait.
    pub fn read_upstream(&self, idx: u32) -> Option<(UpstreamParams, u32, u32)> {
        self.try_read_upstream(idx).unwrap_or_else(|SeqBusy| {
            let (st, params, n, gen) = self.read_upstream_fields(&self.upstream(idx));
            (st != state::FREE).then_some((params, n, gen))
        })
    }

    /// The peer slots of an upstream, consistently.
    ///
    /// # Errors
    /// [`SeqBusy`] as [`Region::try_read_upstream`].
    pub fn try_upstream_slots(&self, idx: u32) -> Result<Vec<u32>, SeqBusy> {
        let up = self.upstream(idx);
        read_stable(&up, || self.slots_now(&up))
    }

    fn slots_now(&self, up: &Upstream<'_>) -> Vec<u32> {
        let n = up.head.npeers.load(Relaxed).min(self.params().max_peers) as usize;
        up.slots[..n].iter().map(|s| s.load(Relaxed)).collect()
    }

    /// [`Region::try_upstream_slots`], or the list as it is when a writer is in the way (as [`Region::read_upstream`]).
    pub fn upstream_slots(&self, idx: u32) -> Vec<u32> {
        self.try_upstream_slots(idx).unwrap_or_else(|SeqBusy| self.slots_now(&self.upstream(idx)))
    }

    /// Finds an upstream by name (not on the request path: Lua keeps the index).
    pub fn find_upstream(&self, name: &str) -> Option<u32> {
        (0..self.params().max_upstreams).find(|&i| {
            let h = self.upstream(i).head;
            h.state.load(Acquire) == state::ACTIVE && h.name.eq(name.as_bytes())
        })
    }

    /// The generation of upstream record `idx` (`None` when it is no upstream). It changes only when the record is
    /// handed to another upstream, so `(idx, generation)` names one upstream for good: pass it to
    /// [`Region::pick_at`], which refuses an index resolved before the record was reused.
    pub fn upstream_gen(&self, idx: u32) -> Option<u32> {
        if idx >= self.params().max_upstreams {
            return None;
        }
        let h = self.upstream(idx).head;
        (h.state.load(Acquire) != state::FREE).then(|| h.gen.load(Acquire))
    }

    // ----- configuration -----

    /// Takes the writer lock for `me` (an owner word, see [`crate::owner`]), waiting at most a bounded spin of a few
    /// microseconds: a worker's event loop must never block, so a lock held by a live writer is reported as
    /// [`ConfigError::Busy`] and the caller retries later. A lock held by a dead owner (its pid gone, or given to
    /// another process since) is taken over, and what that owner left half-written is repaired first (see
    /// [`Region::repair_after_writer`]).
    pub(crate) fn lock_writer(&self, me: u64, procs: &dyn Processes, now_us: u64) -> Result<(), ConfigError> {
        let h = self.header();
        let w = &h.writer;
        // The owner last found running: asked about once, not on every spin (a `kill` and a `/proc` read each).
        let mut live_owner = 0;
        for _ in 0..WRITER_SPINS {
            match w.compare_exchange(0, me, AcqRel, Acquire) {
                Ok(_) => {
                    h.writer_since_us.store(now_us, Relaxed);
                    return Ok(());
                }
                Err(owner) if owner == me => return Ok(()),
                Err(owner) if owner != live_owner && !owner::running(procs, owner) => {
                    if w.compare_exchange(owner, me, AcqRel, Acquire).is_ok() {
                        h.writer_since_us.store(now_us, Relaxed);
                        h.writer_takeovers.fetch_add(1, Relaxed);
                        self.repair_after_writer();
                        return Ok(());
                    }
                }
                Err(owner) => {
                    live_owner = owner;
                    std::hint::spin_loop();
                }
            }
        }
        Err(ConfigError::Busy(owner::pid_of(w.load(Relaxed))))
    }

    pub(crate) fn unlock_writer(&self, me: u64) {
        let _ = self.header().writer.compare_exchange(me, 0, AcqRel, Relaxed);
    }

    /// The writer lock's owner now: `(pid, held since µs)`, `None` while it is free.
    pub fn writer(&self) -> Option<(u32, u64)> {
        let h = self.header();
        let w = h.writer.load(Acquire);
        (w != 0).then(|| (owner::pid_of(w), h.writer_since_us.load(Relaxed)))
    }

    /// Repairs what a writer killed inside its critical section left behind; the caller holds the writer lock, so no
    /// writer runs. A writer makes an upstream's seqlock odd only while it stores that upstream's tunables and peer
    /// list, so an odd seqlock marks the one upstream it was rewriting: its peer list is rebuilt from the peer records
    /// (the active ones that belong to it, in record order) and its seqlock made even. Its tunables are each a value
    /// of the old or of the new configuration; the next configuration change rewrites them all. Peer records it was
    /// (re)initialising are whole once active: `init_peer` makes a record active last. Returns the upstreams repaired.
    fn repair_after_writer(&self) -> u32 {
        let p = *self.params();
        let mut repaired = 0;
        for idx in 0..p.max_upstreams {
            let up = self.upstream(idx);
            let s = up.head.seq.load(Acquire);
            if s & 1 == 0 {
                continue;
            }
            let mut n = 0usize;
            let mut max_weight = 1;
            for slot in 0..p.max_peers {
                let h = self.peer_head(slot);
                if h.state.load(Acquire) == state::ACTIVE && h.upstream.load(Relaxed) == idx {
                    up.slots[n].store(slot, Relaxed);
                    max_weight = max_weight.max(h.weight.load(Relaxed));
                    n += 1;
                }
            }
            up.head.npeers.store(n as u32, Relaxed);
            up.head.max_weight.store(max_weight, Relaxed);
            up.head.seq.store(s.wrapping_add(1), Release);
            repaired += 1;
        }
        self.header().repaired_markers.fetch_add(repaired as u64, Relaxed);
        repaired
    }

    /// Takes over the writer lock from a dead owner, if a dead owner holds it, repairs what it left half-written (see
    /// [`Region::repair_after_writer`]) and releases the lock. Cheap when the lock is free (one load); every worker's
    /// periodic upkeep calls it, so a writer killed in its critical section is repaired within one upkeep interval
    /// even when no configuration change follows. Returns whether it took over a lock.
    pub fn recover(&self, pid: u32, procs: &dyn Processes, now_us: u64) -> bool {
        let held = self.header().writer.load(Acquire);
        if held == 0 || owner::running(procs, held) {
            return false;
        }
        let me = owner::word_of(procs, pid);
        if held == me || self.lock_writer(me, procs, now_us).is_err() {
            return false;
        }
        self.unlock_writer(me);
        true
    }

    fn validate(&self, ups: &[UpstreamConf]) -> Result<(), ConfigError> {
        let p = self.params();
        if ups.len() > p.max_upstreams as usize {
            return Err(ConfigError::TooManyUpstreams {
                got: ups.len(),
                max: p.max_upstreams,
            });
        }
        let total: usize = ups.iter().map(|u| u.peers.len()).sum();
        if total > p.max_peers as usize {
            return Err(ConfigError::TooManyPeers {
                got: total,
                max: p.max_peers,
            });
        }
        let mut names = HashSet::with_capacity(ups.len());
        for u in ups {
            if u.name.is_empty() || u.name.len() > 63 {
                return Err(ConfigError::BadName(u.name.clone()));
            }
            if !names.insert(u.name.as_str()) {
                return Err(ConfigError::DuplicateUpstream(u.name.clone()));
            }
            let mut seen = HashSet::with_capacity(u.peers.len());
            for peer in &u.peers {
                if peer.weight == 0 || peer.weight > 10_000 {
                    return Err(ConfigError::BadWeight(u.name.clone()));
                }
                if !seen.insert(peer.addr) {
                    return Err(ConfigError::DuplicatePeer(
                        u.name.clone(),
                        peer.addr.to_string(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Replaces the whole configuration: upstreams and peers not listed are retired (their records keep their
    /// statistics until reused), listed ones keep their records and statistics, new ones get fresh records seeded
    /// with the mean estimate of their upstream. Returns the upstream index of each entry of `ups`.
    ///
    /// Cost: one pass over the peer records builds an index by (upstream, canonical address); every listed peer is
    /// then one hash lookup, so a change costs O(records + listed peers), not a scan of the records per peer.
    ///
    /// # Errors
    /// A [`ConfigError`]; nothing has changed then.
    pub fn configure(
        &self,
        ups: &[UpstreamConf],
        pid: u32,
        procs: &dyn Processes,
        now_us: u64,
    ) -> Result<Vec<u32>, ConfigError> {
        self.validate(ups)?;
        let me = owner::word_of(procs, pid);
        self.lock_writer(me, procs, now_us)?;
        let epoch = self.header().config_epoch.fetch_add(1, AcqRel).wrapping_add(1);
        let p = *self.params();

        // 1. Retire every peer and upstream that the new configuration does not keep, so their records can serve
        //    new ones (validation guaranteed that the kept plus the new fit); index the records on the way.
        let names: Vec<Option<String>> = (0..p.max_upstreams)
            .map(|i| (self.upstream(i).head.state.load(Acquire) != state::FREE).then(|| self.upstream_name(i)))
            .collect();
        let wanted: HashSet<(&str, String)> = ups
            .iter()
            .flat_map(|u| u.peers.iter().map(move |c| (u.name.as_str(), addr::canonical(&c.addr).0)))
            .collect();
        let mut records = Records::default();
        for slot in 0..p.max_peers {
            let h = self.peer(slot).head;
            let st = h.state.load(Acquire);
            if st == state::FREE {
                records.free.push(slot);
                continue;
            }
            let up_idx = h.upstream.load(Relaxed);
            let key = (up_idx, self.peer_addr(slot));
            if st == state::ACTIVE {
                let name = names.get(up_idx as usize).and_then(|n| n.as_deref());
                if !name.is_some_and(|n| wanted.contains(&(n, key.1.clone()))) {
                    h.retired_us.store(now_us, Relaxed);
                    h.state.store(state::RETIRED, Release);
                }
            }
            if h.state.load(Relaxed) == state::RETIRED {
                records.retired.push((h.retired_us.load(Relaxed), slot));
            }
            records.by_addr.entry(key).or_insert(slot);
        }
        records.collect_retired(ups, &names);
        let mut indices = Vec::with_capacity(ups.len());
        for u in ups {
            indices.push(self.apply_upstream(u, epoch, now_us, &mut records, procs));
        }
        for i in 0..p.max_upstreams {
            let h = self.upstream(i).head;
            if h.state.load(Acquire) == state::ACTIVE && h.config_epoch.load(Relaxed) != epoch {
                h.retired_us.store(now_us, Relaxed);
                h.state.store(state::RETIRED, Release);
            }
        }
        self.unlock_writer(me);
        let peers: usize = ups.iter().map(|u| u.peers.len()).sum();
        self.emit(now_us, crate::events::kind::CONFIG, None, crate::events::NO_PEER, crate::events::NO_PEER, [
            epoch as f64,
            ups.len() as f64,
            peers as f64,
            0.0,
        ]);
        for &i in &indices {
            self.upstream(i).head.last_sweep_us.store(now_us, Relaxed); // first sweep one interval from now
        }
        Ok(indices)
    }

    pub(crate) fn upstream_name(&self, idx: u32) -> String {
        let mut buf = [0u8; 64];
        let len = self.upstream(idx).head.name.load(&mut buf);
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    /// Canonical address text of a peer record.
    pub fn peer_addr(&self, slot: u32) -> String {
        let mut buf = [0u8; 64];
        let len = self.peer(slot).head.addr.load(&mut buf);
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    /// A record to reuse: a free one first, else the one retired longest ago.
    fn free_record<'a, T>(
        &self,
        n: u32,
        get: impl Fn(u32) -> T,
        st: impl Fn(&T) -> (u32, u64),
    ) -> Option<u32> {
        let mut best: Option<(u32, u64)> = None;
        for i in 0..n {
            let (s, retired) = st(&get(i));
            if s == state::FREE {
                return Some(i);
            }
            if s == state::RETIRED && best.map_or(true, |(_, r)| retired < r) {
                best = Some((i, retired));
            }
        }
        best.map(|(i, _)| i)
    }

    fn apply_upstream(&self, u: &UpstreamConf, epoch: u64, now_us: u64, records: &mut Records, procs: &dyn Processes) -> u32 {
        let p = *self.params();
        let existing = (0..p.max_upstreams).find(|&i| {
            let h = self.upstream(i).head;
            h.state.load(Acquire) != state::FREE && h.name.eq(u.name.as_bytes())
        });
        let idx = existing.unwrap_or_else(|| {
            let i = self
                .free_record(
                    p.max_upstreams,
                    |i| self.upstream(i),
                    |up| {
                        (
                            up.head.state.load(Acquire),
                            up.head.retired_us.load(Relaxed),
                        )
                    },
                )
                .unwrap_or(0); // validation guarantees a record
            let h = self.upstream(i).head;
            h.gen.fetch_add(1, AcqRel);
            h.ticket.store(0, Relaxed);
            h.name.store(u.name.as_bytes());
            i
        });
        let up = self.upstream(idx);

        // Seed for new peers: the mean estimate of the healthy peers kept, decayed to now (a peak the stored word
        // still holds from long ago would make the newcomer look slow, and the slow-peer rule would keep it idle).
        let decay_us = u.params.decay_us as f64;
        let kept: Vec<f64> = self
            .upstream_slots(idx)
            .into_iter()
            .map(|s| self.peer(s))
            .filter(|peer| {
                peer.head.state.load(Acquire) == state::ACTIVE
                    && peer.head.health.load(Relaxed) == health::state::HEALTHY
            })
            .map(|peer| self.decayed_estimate(&peer, decay_us, now_us))
            .filter(|&e| e > 0.0)
            .collect();
        let seed = if kept.is_empty() {
            u.params.default_rtt_us as f64
        } else {
            kept.iter().sum::<f64>() / kept.len() as f64
        };

        let mut slots = Vec::with_capacity(u.peers.len());
        for pc in &u.peers {
            let (text, host_len) = addr::canonical(&pc.addr);
            let found = records.by_addr.get(&(idx, text.clone())).copied().filter(|&s| {
                let h = self.peer(s).head; // the index may name a record reused since: check it still is this peer
                h.state.load(Acquire) != state::FREE
                    && h.upstream.load(Relaxed) == idx
                    && h.addr.eq(text.as_bytes())
            });
            let slot = match found {
                Some(s) => {
                    let h = self.peer(s).head;
                    if h.state.load(Acquire) == state::RETIRED {
                        h.added_us.store(now_us, Relaxed); // comes back: ramp in again
                        // it was drained on its way out: coming back, it takes requests again (an ejection stays)
                        let _ = h.health.compare_exchange(
                            health::state::DRAINING,
                            health::state::HEALTHY,
                            AcqRel,
                            Relaxed,
                        );
                        h.state.store(state::ACTIVE, Release);
                    }
                    s
                }
                None => {
                    let s = records.take(self).unwrap_or(0); // validation guarantees a record
                    self.init_peer(s, idx, &text, host_len, pc.addr.port(), seed, now_us);
                    s
                }
            };
            self.peer(slot).head.weight.store(pc.weight, Relaxed);
            slots.push(slot);
        }

        let h = up.head;
        let s = h.seq.load(Relaxed);
        h.seq.store(s.wrapping_add(1) | 1, Relaxed);
        fence(Release);
        procs.in_critical_section();
        let q = &u.params;
        h.algorithm.store(q.algorithm as u32, Relaxed);
        h.retries.store(q.retries, Relaxed);
        h.slow_start_ms
            .store((q.slow_start.window_us / 1000) as u32, Relaxed);
        h.slow_start_aggression_milli
            .store((q.slow_start.aggression * 1000.0).round() as u32, Relaxed);
        h.slow_start_min_weight_milli
            .store((q.slow_start.min_weight * 1000.0).round() as u32, Relaxed);
        h.decay_ms.store((q.decay_us / 1000) as u32, Relaxed);
        h.default_rtt_us.store(q.default_rtt_us, Relaxed);
        h.failure_penalty_milli
            .store((q.failure_penalty * 1000.0).round() as u32, Relaxed);
        h.slow_factor_milli
            .store((q.slow_peer_factor * 1000.0).round() as u32, Relaxed);
        h.slow_penalty_milli
            .store((q.slow_peer_penalty * 1000.0).round() as u32, Relaxed);
        h.max_weight
            .store(u.peers.iter().map(|p| p.weight).max().unwrap_or(1), Relaxed);
        store_outlier(&h.outlier, &q.outlier);
        for (dst, &v) in h.failure_statuses.iter().zip(&q.failure_statuses) {
            dst.store(v, Relaxed);
        }
        for (dst, &slot) in up.slots.iter().zip(&slots) {
            dst.store(slot, Relaxed);
        }
        h.npeers.store(slots.len() as u32, Relaxed);
        h.config_epoch.store(epoch, Relaxed);
        h.state.store(state::ACTIVE, Relaxed);
        h.seq
            .store((s.wrapping_add(1) | 1).wrapping_add(1), Release);
        idx
    }

    #[allow(clippy::too_many_arguments)]
    fn init_peer(
        &self,
        slot: u32,
        up: u32,
        text: &str,
        host_len: usize,
        port: u16,
        seed_us: f64,
        now_us: u64,
    ) {
        let peer = self.peer(slot);
        let h = peer.head;
        h.gen.fetch_add(1, AcqRel); // from here on, writers of the previous occupant are ignored
        // The in-flight counts (total and per worker) are not reset: they belong to the record, not to its occupant.
        // An attempt begun on the previous occupant still ends here (see `end_inflight`), and a reset would race with
        // the owners' increments and leave the count off by one for good.
        for t in &h.totals {
            t.store(0, Relaxed);
        }
        h.total_latency_us.store(0, Relaxed);
        for b in peer.window {
            b.forget();
        }
        h.latency.reset();
        h.upstream.store(up, Relaxed);
        h.addr.store(text.as_bytes());
        h.host_len.store(host_len as u32, Relaxed);
        h.port.store(port as u32, Relaxed);
        h.ewma.store(ewma::pack(seed_us, now_us), Relaxed);
        h.added_us.store(now_us, Relaxed);
        h.retired_us.store(0, Relaxed);
        h.health.store(health::state::HEALTHY, Relaxed);
        h.times_ejected.store(0, Relaxed);
        for c in &h.consecutive {
            c.store(0, Relaxed);
        }
        h.half_open_ok.store(0, Relaxed);
        h.active_ok.store(0, Relaxed);
        h.active_fail.store(0, Relaxed);
        h.ejected_until_us.store(0, Relaxed);
        h.last_ejected_us.store(0, Relaxed);
        h.ejections_total.store(0, Relaxed);
        h.probes.store(0, Relaxed);
        h.probe_us.store(0, Relaxed);
        h.half_open_us.store(0, Relaxed);
        self.reset_report(slot);
        h.state.store(state::ACTIVE, Release);
    }

    // ----- workers -----

    /// Gives the calling worker (`pid`) a column for its in-flight counts. Columns of workers that died (`alive`
    /// says no) are reclaimed first: their in-flight counts are subtracted from the peers' totals, so a worker killed
    /// with requests in flight leaves no phantom load behind. Returns `None` when every column is in use.
    ///
    /// A column this worker reclaims without taking it is marked [`RECLAIMING`] with its pid meanwhile; a marker whose
    /// owner is gone (dead, holding no column any more, or the caller itself: a previous process with its pid) is
    /// reclaimed again, so a worker killed while reclaiming loses no column.
    pub fn attach_worker(&self, pid: u32, alive: &dyn Processes) -> Option<u32> {
        let pids = self.worker_pids();
        let mut mine = pids
            .iter()
            .position(|p| p.load(Acquire) == pid)
            .map(|i| i as u32);
        for (col, p) in pids.iter().enumerate() {
            let owner = p.load(Acquire);
            if owner == 0 || owner == pid {
                continue;
            }
            let marker = owner & RECLAIMING != 0;
            if marker {
                let by = owner & !RECLAIMING;
                if by != pid && alive.alive(by) && pids.iter().any(|q| q.load(Acquire) == by) {
                    continue;
                }
            } else if alive.alive(owner) {
                continue;
            }
            let take = mine.is_none();
            let new = if take { pid } else { RECLAIMING | pid };
            if p.compare_exchange(owner, new, AcqRel, Acquire).is_ok() {
                if marker {
                    self.header().repaired_markers.fetch_add(1, Relaxed);
                }
                self.reclaim_column(col);
                if take {
                    mine = Some(col as u32);
                } else {
                    p.store(0, Release);
                }
            }
        }
        mine.or_else(|| {
            pids.iter()
                .position(|p| p.compare_exchange(0, pid, AcqRel, Acquire).is_ok())
                .map(|i| i as u32)
        })
    }

    /// [`Region::attach_worker`] for a process attaching for the first time. A column that already holds `pid`
    /// belonged to an earlier process with the same pid (pids are reused), which is dead: its in-flight counts are
    /// reclaimed instead of being inherited by the new worker. While they are, the column still holds `pid`, a live
    /// pid, so no other worker touches it.
    pub fn attach_new_worker(&self, pid: u32, alive: &dyn Processes) -> Option<u32> {
        for (col, p) in self.worker_pids().iter().enumerate() {
            if p.load(Acquire) == pid {
                self.reclaim_column(col);
                let _ = p.compare_exchange(pid, 0, AcqRel, Relaxed);
            }
        }
        self.attach_worker(pid, alive)
    }

    /// Reclaims in-flight column `col`: idempotent, so a reclaim interrupted by a kill can be done again.
    fn reclaim_column(&self, col: usize) {
        for slot in 0..self.params().max_peers {
            let peer = self.peer(slot);
            let v = peer.inflight_by_worker[col].swap(0, AcqRel);
            if v != 0 {
                peer.head.inflight.fetch_sub(v, AcqRel);
            }
        }
    }

    // ----- request path -----

    /// Chooses a peer of upstream `idx` for an attempt and counts the attempt as in flight on it (and in the
    /// worker's column `col`). Avoids the slots for which `tried` is true while another eligible peer exists;
    /// ejected and draining peers are not eligible unless the upstream is in panic; a half-open peer takes at most
    /// `half_open_probes` attempts at once (claimed with compare-and-swap, so the limit holds across workers).
    ///
    /// # Errors
    /// [`PickError`] when the upstream is unknown or has no eligible peer.
    ///
    /// For an index resolved just now (tests, tools); a caller that keeps an index across configuration changes
    /// uses [`Region::pick_at`] with the generation it resolved.
    pub fn pick<R: Rng, T: Fn(u32) -> bool + ?Sized>(
        &self,
        idx: u32,
        tried: &T,
        now_us: u64,
        rng: &mut R,
        col: Option<u32>,
    ) -> Result<Pick, PickError> {
        let ugen = self.upstream_gen(idx).ok_or(PickError::UnknownUpstream)?;
        self.pick_at(idx, ugen, tried, now_us, rng, col)
    }

    /// [`Region::pick`] on upstream record `idx` while it still has generation `ugen` ([`Region::upstream_gen`] when
    /// the caller resolved the upstream's name): an index kept by a worker across a reconfigure that handed the record
    /// to another upstream (an old worker during a reload) is refused, never routed to the other upstream's peers.
    ///
    /// # Errors
    /// [`PickError::StaleUpstream`] when the record has another generation; else as [`Region::pick`].
    pub fn pick_at<R: Rng, T: Fn(u32) -> bool + ?Sized>(
        &self,
        idx: u32,
        ugen: u32,
        tried: &T,
        now_us: u64,
        rng: &mut R,
        col: Option<u32>,
    ) -> Result<Pick, PickError> {
        if idx >= self.params().max_upstreams {
            return Err(PickError::UnknownUpstream);
        }
        let up = self.upstream(idx);
        let mut skip = [u32::MAX; 4];
        for attempt in 0..PICK_TRIES {
            // The last try takes the peer list as it is: a writer keeping the seqlock odd (one killed in its critical
            // section, until the upkeep repairs it) must not turn requests away. Each slot it reads is a peer record,
            // and only active ones are eligible.
            let last = attempt + 1 == PICK_TRIES;
            let s1 = up.head.seq.load(Acquire);
            if s1 & 1 == 1 && !last {
                std::hint::spin_loop();
                continue;
            }
            if up.head.state.load(Relaxed) == state::FREE {
                return Err(PickError::UnknownUpstream);
            }
            if up.head.gen.load(Acquire) != ugen {
                return Err(PickError::StaleUpstream);
            }
            let params = self.select_params(&up);
            // `skip` fills from the front, so an unused first place means it is empty (the common case).
            let excluded = |slot: u32| tried(slot) || (skip[0] != u32::MAX && skip.contains(&slot));
            let view = ShmView {
                region: self,
                idx,
                up,
                n: up.head.npeers.load(Relaxed).min(self.params().max_peers),
                params,
                decay_us: params.decay_us as f64,
                max_weight: up.head.max_weight.load(Relaxed).max(1) as f64,
                now_us,
                tried: &excluded,
                panic: up.head.panic.load(Relaxed) != 0,
                slow: slow_threshold(up.head, &params),
                costs: Cell::new([(u32::MAX, 0.0); 2]),
                reports: up.head.report_flags.load(Relaxed),
            };
            let ticket = if params.algorithm == Algorithm::RoundRobin {
                up.head.ticket.fetch_add(1, Relaxed)
            } else {
                0
            };
            let choice = params.algorithm.select(&view, rng, ticket);
            let slot = choice.map(|i| view.slot(i));
            let cost = choice.map_or(0.0, |i| view.cost(i));
            fence(Acquire);
            if up.head.seq.load(Relaxed) != s1 && !last {
                continue; // the peer list changed while we read it
            }
            let slot = slot.ok_or(PickError::NoPeer)?;
            let peer = self.peer(slot);
            // The generation is read before the claim: if the record is handed to another peer after this point,
            // the check below sees it, and the claim is undone rather than counted on the new occupant's generation.
            let gen = peer.head.gen.load(Acquire);
            let Some(probe) = self.claim(slot, &params, view.panic, now_us) else {
                // A half-open peer whose probe slots were taken meanwhile: choose again without it.
                if let Some(free) = skip.iter_mut().find(|s| **s == u32::MAX) {
                    *free = slot;
                }
                continue;
            };
            if let Some(c) = col.and_then(|c| peer.inflight_by_worker.get(c as usize)) {
                // The column is written by its worker only (one thread), so no read-modify-write is needed.
                c.store(c.load(Relaxed) + 1, Release);
            }
            let stale = up.head.gen.load(Acquire) != ugen;
            if stale || peer.head.gen.load(Acquire) != gen || !owned_by(peer.head, idx) {
                // The record was retired or reused (by another upstream, or for another peer) between the choice and
                // the claim, or the upstream record itself was handed to another upstream (a peer record then
                // `owned_by` this index belongs to that one): undo the claim and choose again, or refuse.
                self.end_inflight(&peer, col);
                if probe {
                    release_probe(peer.head);
                }
                if stale {
                    return Err(PickError::StaleUpstream);
                }
                continue;
            }
            return Ok(Pick {
                slot,
                gen,
                more_tries: params.retries.min(view.n.saturating_sub(1)),
                cost,
            });
        }
        Err(PickError::NoPeer)
    }

    /// Counts an attempt as in flight on `slot`; for a half-open peer only while a probe place is free (see
    /// [`claim_probe`]). An ejected peer whose time is up becomes half-open here. `None` when refused, else whether
    /// the attempt took a probe place.
    #[inline(always)]
    fn claim(&self, slot: u32, params: &SelectParams, panic: bool, now_us: u64) -> Option<bool> {
        let h = self.peer_head(slot);
        let mut probe = false;
        if !panic {
            let mut health = h.health.load(Acquire);
            if health == health::state::EJECTED {
                if h.ejected_until_us.load(Acquire) > now_us {
                    return None;
                }
                self.to_half_open(slot, now_us);
                health = h.health.load(Acquire);
            }
            if health == health::state::HALF_OPEN {
                if !claim_probe(h, params, now_us) {
                    return None;
                }
                probe = true;
            }
        }
        h.inflight.fetch_add(1, AcqRel);
        Some(probe)
    }

    /// Ends an in-flight attempt and feeds its latency to the peak-EWMA estimate (a failure as a penalty).
    /// Counters are recorded separately by [`Region::record`], once the kind of outcome is known.
    pub fn end_attempt(
        &self,
        slot: u32,
        gen: u32,
        col: Option<u32>,
        outcome: Outcome,
        latency_us: u64,
        now_us: u64,
    ) {
        if let Some(peer) = self.release_attempt(slot, gen, col) {
            self.observe_latency(&peer, slot, outcome, latency_us, now_us);
        }
    }

    /// Ends the in-flight count of an attempt on record `slot` (see `end_inflight`) and returns the record
    /// while it still has generation `gen` (the rest of an attempt on a record reused since is dropped).
    #[inline(always)]
    fn release_attempt(&self, slot: u32, gen: u32, col: Option<u32>) -> Option<Peer<'_>> {
        if slot >= self.params().max_peers {
            return None;
        }
        let peer = self.peer(slot);
        self.end_inflight(&peer, col);
        if peer.head.gen.load(Acquire) != gen {
            return None;
        }
        if peer.head.health.load(Acquire) == health::state::HALF_OPEN {
            // Which attempts were probes is not remembered: any attempt ending while the peer is half-open gives a
            // probe place back (at worst one more probe than configured, once, for an attempt begun before the
            // ejection).
            release_probe(peer.head);
        }
        Some(peer)
    }

    /// The peer record of `slot` while it still has generation `gen` (an attempt on a record reused since is dropped).
    #[inline(always)]
    fn peer_of(&self, slot: u32, gen: u32) -> Option<Peer<'_>> {
        let peer = self.peer(slot);
        (peer.head.gen.load(Acquire) == gen).then_some(peer)
    }

    /// [`Region::end_attempt`] and then [`Region::record`] of the same attempt, with one lookup of its peer record and
    /// one check of its generation (the log phase of a request with one attempt).
    #[allow(clippy::too_many_arguments)]
    pub fn finish_attempt<R: Rng>(
        &self,
        slot: u32,
        gen: u32,
        col: Option<u32>,
        outcome: Outcome,
        latency_us: u64,
        now_us: u64,
        rng: &mut R,
    ) {
        if let Some(peer) = self.release_attempt(slot, gen, col) {
            self.observe_latency(&peer, slot, outcome, latency_us, now_us);
            self.record_of(&peer, slot, gen, outcome, latency_us, now_us, rng);
        }
    }

    /// Ends the in-flight count of an attempt on record `peer`, whatever its generation now: the counts belong to the
    /// record (see `init_peer`), so an attempt begun before the record was reused ends exactly, and it is not left
    /// counted for good.
    #[inline]
    fn end_inflight(&self, peer: &Peer<'_>, col: Option<u32>) {
        peer.head.inflight.fetch_sub(1, AcqRel);
        if let Some(c) = col.and_then(|c| peer.inflight_by_worker.get(c as usize)) {
            c.store(c.load(Relaxed) - 1, Release); // written by its worker only, as in `pick`
        }
    }

    /// Feeds an ended attempt's latency to the peak-EWMA estimate of a peer record whose generation was checked.
    #[inline]
    fn observe_latency(&self, peer: &Peer<'_>, slot: u32, outcome: Outcome, latency_us: u64, now_us: u64) {
        if outcome == Outcome::Aborted {
            return;
        }
        // Two words of the upstream's tunables; no seqlock needed for independent single words.
        let up_idx = peer.head.upstream.load(Relaxed);
        let uh = self.upstream(up_idx).head;
        let decay_us = uh.decay_ms.load(Relaxed) as f64 * 1000.0;
        // A failure sets the estimate to `max(its latency, penalty × the best other healthy peer's estimate)`: a
        // peer failing fast never looks faster than its healthy peers, and since the value is set rather than
        // peaked, it follows the current baseline instead of keeping a stale high one. So a failing peer keeps
        // drawing the few attempts that let outlier detection count its failures and eject it, and failures of
        // several peers never inflate each other.
        let failure = if outcome.is_failure() {
            let penalty = uh.failure_penalty_milli.load(Relaxed) as f64 / 1000.0;
            let best = self.best_estimate(up_idx, slot, decay_us, now_us).unwrap_or(0.0);
            Some((latency_us as f64).max(penalty * best))
        } else {
            None
        };
        let samples = peer.head.totals[counter::REQUESTS].load(Relaxed);
        let word = &peer.head.ewma;
        let mut cur = word.load(Acquire);
        loop {
            let (est, elapsed) = ewma::unpack(cur, now_us);
            let value = match failure {
                Some(v) => v,
                None => ewma::observe(est, elapsed, latency_us as f64, decay_us, samples),
            };
            let next = ewma::pack(value, now_us);
            match word.compare_exchange_weak(cur, next, AcqRel, Acquire) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
    }

    /// Records a finished attempt in the window and the all-time counters, and feeds its outcome to outlier
    /// detection (consecutive failures, half-open probes).
    pub fn record<R: Rng>(&self, slot: u32, gen: u32, outcome: Outcome, latency_us: u64, now_us: u64, rng: &mut R) {
        if let Some(peer) = self.peer_of(slot, gen) {
            self.record_of(&peer, slot, gen, outcome, latency_us, now_us, rng);
        }
    }

    /// [`Region::record`] on a peer record whose generation `gen` was checked. The record can still be handed to
    /// another peer between that check and the writes here (`init_peer` bumps the generation, then clears the
    /// counters): so the generation is loaded once more after the counters are written (the last write is a
    /// read-modify-write with Acquire, so the load is not done before it), and when it moved, the sample is taken
    /// back (never below zero: it may have been cleared already) and outlier detection does not see it. What is left:
    /// a new occupant may miss one sample of its own per attempt of the old occupant ending in that instant (the
    /// sample cleared, then one of the new occupant's taken back in its place), and a failure feeds the new
    /// occupant's failure streak only when the record is reused between this second check and the few loads of
    /// `observe_health` after it. Closing those too would cost a read-modify-write of a shared word per request.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn record_of<R: Rng>(&self, peer: &Peer<'_>, slot: u32, gen: u32, outcome: Outcome, latency_us: u64, now_us: u64, rng: &mut R) {
        let slice = self.slice(now_us);
        let bucket = &peer.window[(slice % peer.window.len() as u64) as usize];
        let recorded = bucket.record(slice, outcome, latency_us, &peer.head.latency);
        if !recorded {
            self.header().dropped_samples.fetch_add(1, Relaxed);
        }
        let t = &peer.head.totals;
        if outcome == Outcome::Aborted {
            t[counter::ABORTED].fetch_add(1, AcqRel);
        } else {
            t[counter::REQUESTS].fetch_add(1, Relaxed);
            if outcome.is_failure() {
                t[counter::FAIL_BASE + outcome as usize - 1].fetch_add(1, Relaxed);
            }
            peer.head.total_latency_us.fetch_add(latency_us, AcqRel);
        }
        if peer.head.gen.load(Acquire) != gen {
            self.take_back(peer, recorded.then_some(bucket), slice, outcome, latency_us);
            return;
        }
        if outcome != Outcome::Aborted {
            self.observe_health(slot, outcome, now_us, rng);
        }
    }

    /// Takes back what [`Region::record_of`] wrote for an attempt whose peer record was reused meanwhile.
    #[cold]
    #[inline(never)]
    fn take_back(&self, peer: &Peer<'_>, bucket: Option<&crate::window::WindowBucket>, slice: u64, outcome: Outcome, latency_us: u64) {
        use crate::window::sat_sub_u64;
        if let Some(b) = bucket {
            b.unrecord(slice, outcome, latency_us);
        }
        let t = &peer.head.totals;
        if outcome == Outcome::Aborted {
            sat_sub_u64(&t[counter::ABORTED], 1);
            return;
        }
        sat_sub_u64(&t[counter::REQUESTS], 1);
        if outcome.is_failure() {
            sat_sub_u64(&t[counter::FAIL_BASE + outcome as usize - 1], 1);
        }
        sat_sub_u64(&peer.head.total_latency_us, latency_us);
    }

    fn decayed_estimate(&self, peer: &Peer<'_>, decay_us: f64, now_us: u64) -> f64 {
        let (est, elapsed) = ewma::unpack(peer.head.ewma.load(Acquire), now_us);
        ewma::decayed(est, elapsed, decay_us)
    }

    /// The lowest decayed estimate among the upstream's healthy, already measured peers other than `except`, or
    /// `None` when there is none. It is the baseline a failure is compared with: peers that are failing (healthy until ejected) and
    /// ejected ones carry inflated estimates and would inflate a mean, and several failing peers would inflate
    /// each other's penalties without bound.
    pub(crate) fn best_estimate(&self, idx: u32, except: u32, decay_us: f64, now_us: u64) -> Option<f64> {
        self.measured_estimates(idx, except, decay_us, now_us)
            .filter(|&e| e > 0.0)
            .min_by(|a, b| a.total_cmp(b))
    }

    /// The decayed estimates of upstream `idx`'s healthy peers that have been measured (an estimate that is still the
    /// seed, default_rtt, is no baseline), `except` left out: what the failure penalty and the slow-peer baseline
    /// compare with.
    fn measured_estimates(&self, idx: u32, except: u32, decay_us: f64, now_us: u64) -> impl Iterator<Item = f64> + '_ {
        let up = self.upstream(idx);
        let n = up.head.npeers.load(Relaxed).min(self.params().max_peers) as usize;
        up.slots[..n]
            .iter()
            .map(|s| s.load(Relaxed))
            .filter(move |&slot| {
                let h = self.peer_head(slot);
                slot != except
                    && h.health.load(Relaxed) == health::state::HEALTHY
                    && h.totals[counter::REQUESTS].load(Relaxed) > 0
            })
            .map(move |slot| self.decayed_estimate(&self.peer(slot), decay_us, now_us))
    }

    /// Refreshes the latency baseline of upstream `idx` for the slow-peer rule: the lower median of the decayed
    /// estimates of its healthy, measured peers (0 when it has none). The lower median, so that with two peers the
    /// faster one is the baseline, and a minority of slow peers never moves it.
    pub(crate) fn update_baseline(&self, idx: u32, now_us: u64) {
        let up = self.upstream(idx);
        if up.head.state.load(Acquire) != state::ACTIVE {
            return;
        }
        let decay_us = up.head.decay_ms.load(Relaxed) as f64 * 1000.0;
        // A buffer kept per thread, so that the upkeep allocates nothing once it has seen the largest upstream.
        thread_local!(static ESTIMATES: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) });
        let baseline = ESTIMATES.with_borrow_mut(|estimates| {
            estimates.clear();
            estimates.extend(self.measured_estimates(idx, u32::MAX, decay_us, now_us));
            estimates.sort_unstable_by(|a, b| a.total_cmp(b));
            estimates.get(estimates.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
        });
        up.head.baseline_us.store(baseline.to_bits(), Relaxed);
    }

    /// `(threshold µs, multiplier)` of upstream `idx`'s slow-peer rule now (see [`load_cost`]).
    pub fn slow_threshold(&self, idx: u32) -> (f64, f64) {
        if idx >= self.params().max_upstreams {
            return (f64::INFINITY, 1.0);
        }
        let up = self.upstream(idx);
        slow_threshold(up.head, &self.select_params(&up))
    }

    /// Periodic upkeep, called by every worker about twice per window bucket: clears ahead of time the window
    /// bucket the next time slice will use (taking over one a killed worker left marked), makes even a latency-total
    /// seqlock a killed worker left odd (see [`crate::window::LatencyTotals::repair`]), and runs each upstream's outlier sweep once per interval (whichever
    /// worker comes first does it).
    pub fn tick<R: Rng>(&self, now_us: u64, rng: &mut R) {
        let next = self.slice(now_us) + 1;
        for slot in 0..self.params().max_peers {
            let peer = self.peer(slot);
            if peer.head.state.load(Acquire) == state::ACTIVE {
                peer.window[(next % peer.window.len() as u64) as usize].preclear(next, &peer.head.latency);
                if peer.head.latency.repair(peer.window) {
                    self.header().repaired_markers.fetch_add(1, Relaxed);
                }
            }
        }
        for idx in 0..self.params().max_upstreams {
            self.update_baseline(idx, now_us);
            self.update_reports(idx, now_us);
            self.sweep(idx, now_us, rng);
        }
    }

    /// Requests and failures of a peer over the rolling window (counters only).
    pub(crate) fn window_volume(&self, slot: u32, now_us: u64) -> health::Volume {
        let p = self.params();
        let slice = self.slice(now_us);
        let first = slice.saturating_sub(p.window_buckets as u64 - 1);
        let mut sum = WindowSum::default();
        for b in self.peer(slot).window {
            b.add_to(first, slice, &mut sum);
        }
        health::Volume { requests: sum.counts[counter::REQUESTS], failures: sum.failures() }
    }

    // ----- reading -----

    /// All-time latency counts of peer record `slot` per range of [`crate::window::LE_BOUNDS_US`] (the last range:
    /// above the last bound): those added from cleared window buckets plus those of the buckets still holding a
    /// slice, read consistently (each sample once). `None` for a slot out of range.
    pub fn latency_ranges(&self, slot: u32) -> Option<[u64; crate::window::LE_RANGES]> {
        if slot >= self.params().max_peers {
            return None;
        }
        let peer = self.peer(slot);
        let totals = &peer.head.latency;
        let mut out = [0u64; crate::window::LE_RANGES];
        for _ in 0..100 {
            let s1 = totals.seq.load(Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            out = std::array::from_fn(|i| totals.counts[i].load(Relaxed));
            for b in peer.window {
                b.add_ranges(&mut out);
            }
            fence(Acquire);
            if totals.seq.load(Relaxed) == s1 {
                break;
            }
        }
        Some(out)
    }

    /// A snapshot of one peer record (any state), or `None` for an index out of range.
    pub fn snapshot(&self, slot: u32, now_us: u64) -> Option<PeerSnapshot> {
        let p = *self.params();
        if slot >= p.max_peers {
            return None;
        }
        let peer = self.peer(slot);
        let h = peer.head;
        let up_idx = h.upstream.load(Relaxed);
        let params = self
            .read_upstream(up_idx)
            .map(|(q, _, _)| q)
            .unwrap_or_default();
        let slice = self.slice(now_us);
        let first = slice.saturating_sub(p.window_buckets as u64 - 1);
        let mut window = WindowSum::default();
        for b in peer.window {
            b.add_to(first, slice, &mut window);
        }
        let bucket_us = p.bucket_ms as u64 * 1000;
        let span = (p.window_buckets as u64 - 1) * bucket_us + (now_us - slice * bucket_us);
        let age = now_us.saturating_sub(self.header().created_us.load(Relaxed));
        let mut totals = [0u64; counter::N];
        for (d, s) in totals.iter_mut().zip(&h.totals) {
            *d = s.load(Relaxed);
        }
        Some(PeerSnapshot {
            slot,
            gen: h.gen.load(Acquire),
            state: h.state.load(Acquire),
            upstream: up_idx,
            weight: h.weight.load(Relaxed),
            port: h.port.load(Relaxed),
            addr: self.peer_addr(slot),
            host_len: h.host_len.load(Relaxed) as usize,
            inflight: h.inflight.load(Relaxed),
            probes: h.probes.load(Relaxed),
            window,
            window_us: span.min(age.max(1)),
            totals,
            total_latency_us: h.total_latency_us.load(Relaxed),
            ewma_us: self.decayed_estimate(&peer, params.decay_us as f64, now_us),
            cost: {
                let reports = if up_idx < p.max_upstreams { ReportView::read(self.upstream(up_idx).head) } else { ReportView::OFF };
                let slow = self.slow_threshold(up_idx);
                if reports.flags != 0 {
                    reported_load_cost(h, params.decay_us as f64, slow, now_us, &reports)
                } else {
                    load_cost(h, params.decay_us as f64, slow, now_us)
                }
            },
            slow_start: ramp(h, &params.slow_start, now_us),
            added_us: h.added_us.load(Relaxed),
            health: h.health.load(Acquire),
            times_ejected: h.times_ejected.load(Relaxed),
            ejections_total: h.ejections_total.load(Relaxed),
            ejected_for_us: if h.health.load(Acquire) == health::state::EJECTED {
                h.ejected_until_us.load(Relaxed).saturating_sub(now_us)
            } else {
                0
            },
            consecutive: std::array::from_fn(|i| h.consecutive[i].load(Relaxed)),
        })
    }
}

/// The tunables the request path reads.
#[derive(Debug, Clone, Copy)]
struct SelectParams {
    algorithm: Algorithm,
    retries: u32,
    slow_start: SlowStart,
    decay_us: u64,
    half_open_probes: u32,
    probe_timeout_us: u64,
    slow_factor: f64,
    slow_penalty: f64,
}

/// An upstream's peers in shared memory, as the selection algorithms see them.
struct ShmView<'a, T: Fn(u32) -> bool> {
    region: &'a Region,
    /// Index of the upstream: a peer record is eligible only while it belongs to it (see [`owned_by`]).
    idx: u32,
    up: Upstream<'a>,
    n: u32,
    params: SelectParams,
    /// `params.decay_us` as a float, converted once per pick rather than per cost.
    decay_us: f64,
    max_weight: f64,
    now_us: u64,
    tried: &'a T,
    /// The upstream is in panic: health is ignored.
    panic: bool,
    /// Slow-peer threshold (µs) and cost multiplier.
    slow: (f64, f64),
    /// The last two costs computed, `(index, cost)`: P2C compares two peers and the pick then reports the winner's
    /// cost, which so is not computed twice (one decayed estimate and its loads fewer per pick).
    costs: Cell<[(u32, f64); 2]>,
    /// Backend-reported load (`report::flag` bits): 0, one load and one branch per cost, unless the upstream reads
    /// reports; the rest of its settings is read only then.
    reports: u32,
}

impl<T: Fn(u32) -> bool> ShmView<'_, T> {
    #[inline]
    fn slot(&self, i: u32) -> u32 {
        self.up.slots[i as usize].load(Relaxed)
    }

    #[inline]
    fn head(&self, i: u32) -> &PeerHead {
        self.region.peer_head(self.slot(i))
    }

    #[inline]
    fn weight_of(&self, h: &PeerHead) -> f64 {
        effective_weight(h, &self.params.slow_start, self.now_us)
    }

    /// Whether an eligible peer is to be probed: half-open, or ejected with its time up (outside panic mode, where
    /// health is ignored).
    #[inline]
    fn must_probe(&self, h: &PeerHead) -> bool {
        !self.panic && matches!(h.health.load(Relaxed), health::state::HALF_OPEN | health::state::EJECTED)
    }
}

impl<T: Fn(u32) -> bool> PeerView for ShmView<'_, T> {
    #[inline]
    fn len(&self) -> u32 {
        self.n
    }

    #[inline]
    fn eligible(&self, i: u32) -> bool {
        let h = self.head(i);
        if !owned_by(h, self.idx) {
            return false;
        }
        match h.health.load(Relaxed) {
            health::state::HEALTHY => true,
            health::state::DRAINING => false,
            _ if self.panic => true,
            health::state::HALF_OPEN => probe_free(h, &self.params, self.now_us),
            health::state::EJECTED => h.ejected_until_us.load(Relaxed) <= self.now_us,
            _ => false,
        }
    }

    #[inline]
    fn tried(&self, i: u32) -> bool {
        (self.tried)(self.slot(i))
    }

    #[inline(always)]
    fn cost(&self, i: u32) -> f64 {
        let [a, b] = self.costs.get();
        if a.0 == i {
            return a.1;
        }
        if b.0 == i {
            return b.1;
        }
        let h = self.head(i);
        // A probe costs nothing: its estimate, inflated by the failures that ejected it, would lose every comparison
        // and it would never come back. claim() keeps the probes to `half_open_probes` at once.
        let c = if self.must_probe(h) {
            0.0
        } else if self.reports != 0 {
            reported_load_cost(h, self.decay_us, self.slow, self.now_us, &ReportView::read(self.up.head))
        } else {
            load_cost(h, self.decay_us, self.slow, self.now_us)
        };
        self.costs.set([(i, c), a]);
        c
    }

    #[inline]
    fn ramp(&self, i: u32) -> f64 {
        let h = self.head(i);
        let f = ramp(h, &self.params.slow_start, self.now_us);
        // A probe is not ramped either; the peer restarts its slow start when it is healthy again.
        if f < 1.0 && self.must_probe(h) {
            return 1.0;
        }
        f
    }

    #[inline]
    fn weight(&self, i: u32) -> f64 {
        self.weight_of(self.head(i))
    }

    #[inline]
    fn max_weight(&self) -> f64 {
        self.max_weight
    }

    #[inline]
    fn static_weight(&self, i: u32) -> u32 {
        self.head(i).weight.load(Relaxed)
    }
}

/// Whether a half-open peer has a probe place free: fewer probes in flight than allowed, or none claimed for a
/// probe timeout (those in flight are then taken as lost: a request without a log phase, a killed worker).
#[inline]
fn probe_free(h: &PeerHead, params: &SelectParams, now_us: u64) -> bool {
    h.probes.load(Relaxed) < params.half_open_probes.max(1)
        || now_us.saturating_sub(h.probe_us.load(Relaxed)) >= params.probe_timeout_us
}

/// Takes a probe place of a half-open peer (see [`probe_free`]); lost probes' places are taken back all at once.
#[inline]
fn claim_probe(h: &PeerHead, params: &SelectParams, now_us: u64) -> bool {
    let limit = params.half_open_probes.max(1);
    let mut cur = h.probes.load(Acquire);
    // Bounded: each failed exchange means another worker changed the count; a few tries are plenty.
    for _ in 0..64 {
        let next = if cur < limit {
            cur + 1
        } else if now_us.saturating_sub(h.probe_us.load(Acquire)) >= params.probe_timeout_us {
            1
        } else {
            return false;
        };
        match h.probes.compare_exchange(cur, next, AcqRel, Acquire) {
            Ok(_) => {
                h.probe_us.store(now_us, Release);
                return true;
            }
            Err(v) => cur = v,
        }
    }
    false
}

/// Gives a probe place back (never below zero).
#[inline]
fn release_probe(h: &PeerHead) {
    let mut cur = h.probes.load(Acquire);
    for _ in 0..64 {
        if cur == 0 {
            return;
        }
        match h.probes.compare_exchange(cur, cur - 1, AcqRel, Acquire) {
            Ok(_) => return,
            Err(v) => cur = v,
        }
    }
}

/// Whether peer record `h` serves upstream `idx` now: active and given to that upstream. A slot list read under the
/// seqlock can still name a record that was retired and reused by another upstream since (an old worker's retry
/// during a reload, or a configure between retiring peers and rewriting slot lists).
#[inline(always)]
fn owned_by(h: &PeerHead, idx: u32) -> bool {
    h.state.load(Acquire) == state::ACTIVE && h.upstream.load(Relaxed) == idx
}

/// Runs `read` until it saw the upstream's seqlock-protected fields unchanged (no writer in between), at most
/// [`SEQLOCK_READ_TRIES`] times.
fn read_stable<T>(up: &Upstream<'_>, mut read: impl FnMut() -> T) -> Result<T, SeqBusy> {
    for _ in 0..SEQLOCK_READ_TRIES {
        let s1 = up.head.seq.load(Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let v = read();
        fence(Acquire);
        if up.head.seq.load(Relaxed) == s1 {
            return Ok(v);
        }
    }
    Err(SeqBusy)
}

/// `(threshold µs, multiplier)` of the slow-peer rule of an upstream: infinite while the rule is off or the baseline
/// unknown.
#[inline]
fn slow_threshold(h: &UpstreamHead, params: &SelectParams) -> (f64, f64) {
    let baseline = f64::from_bits(h.baseline_us.load(Relaxed));
    if params.slow_factor <= 0.0 || baseline <= 0.0 {
        (f64::INFINITY, 1.0)
    } else {
        (params.slow_factor * baseline, params.slow_penalty)
    }
}

/// Slow-start factor of a peer now.
#[inline]
fn ramp(h: &PeerHead, slow_start: &SlowStart, now_us: u64) -> f64 {
    slow_start.factor(now_us.saturating_sub(h.added_us.load(Relaxed)))
}

/// Static weight × slow-start factor of a peer now.
#[inline]
fn effective_weight(h: &PeerHead, slow_start: &SlowStart, now_us: u64) -> f64 {
    h.weight.load(Relaxed).max(1) as f64 * ramp(h, slow_start, now_us)
}

/// The load cost of a peer: decayed peak-EWMA estimate × (in flight + 1) ÷ static weight. Slow start is not part of
/// it: P2C takes a ramping peer with a probability (see [`crate::select::P2c`]).
#[inline]
///
/// A slow peer (estimate above `slow.0`, see [`Region::slow_threshold`]) costs `slow.1` times more: under the plain
/// formula a peer 6× slower than its peers wins as soon as they have 5 requests in flight, which at a few hundred
/// requests per second happens often enough to put it into the client p99; with the penalty it takes 10× that.
fn load_cost(h: &PeerHead, decay_us: f64, slow: (f64, f64), now_us: u64) -> f64 {
    let (est, elapsed) = ewma::unpack(h.ewma.load(Relaxed), now_us);
    let est = ewma::decayed(est, elapsed, decay_us).max(1.0);
    let inflight = h.inflight.load(Relaxed).max(0) as f64;
    let cost = est * (inflight + 1.0) / h.weight.load(Relaxed).max(1) as f64;
    // Only a measured estimate can be judged slow: a newcomer's is a seed.
    if est > slow.0 && h.totals[counter::REQUESTS].load(Relaxed) > 0 {
        cost * slow.1
    } else {
        cost
    }
}

/// [`load_cost`] of a peer of an upstream that reads reports (see [`crate::report`]); cold, so that the request path
/// of upstreams without reports keeps its layout.
#[cold]
#[inline(never)]
fn reported_load_cost(h: &PeerHead, decay_us: f64, slow: (f64, f64), now_us: u64, r: &ReportView) -> f64 {
    let plain = load_cost(h, decay_us, slow, now_us);
    let (est, elapsed) = ewma::unpack(h.ewma.load(Relaxed), now_us);
    let est = ewma::decayed(est, elapsed, decay_us).max(1.0);
    let inflight = h.inflight.load(Relaxed).max(0) as f64;
    let m = if est > slow.0 && h.totals[counter::REQUESTS].load(Relaxed) > 0 { slow.1 } else { 1.0 };
    r.cost(h, est, inflight, m, plain, now_us)
}

/// Writes outlier parameters into their slots of an upstream record.
fn store_outlier(dst: &[AtomicU64; 17], o: &OutlierParams) {
    let v: [u64; 17] = [
        o.consecutive_5xx as u64,
        o.consecutive_gateway as u64,
        o.consecutive_timeout as u64,
        o.base_ejection_us,
        o.max_ejection_us,
        o.jitter_us,
        o.max_ejection_percent as u64,
        o.interval_us,
        o.success_rate_stdev.to_bits(),
        o.success_rate_min_hosts as u64,
        o.success_rate_volume as u64,
        o.failure_percentage as u64,
        o.failure_percentage_min_hosts as u64,
        o.failure_percentage_volume as u64,
        o.half_open_probes as u64,
        o.half_open_successes as u64,
        o.panic_threshold as u64,
    ];
    for (d, x) in dst.iter().zip(v) {
        d.store(x, Relaxed);
    }
}

/// Reads outlier parameters back (see [`store_outlier`]).
fn load_outlier(src: &[AtomicU64; 17]) -> OutlierParams {
    let v: [u64; 17] = std::array::from_fn(|i| src[i].load(Relaxed));
    OutlierParams {
        consecutive_5xx: v[0] as u32,
        consecutive_gateway: v[1] as u32,
        consecutive_timeout: v[2] as u32,
        base_ejection_us: v[3],
        max_ejection_us: v[4],
        jitter_us: v[5],
        max_ejection_percent: v[6] as u32,
        interval_us: v[7],
        success_rate_stdev: f64::from_bits(v[8]),
        success_rate_min_hosts: v[9] as u32,
        success_rate_volume: v[10] as u32,
        failure_percentage: v[11] as u32,
        failure_percentage_min_hosts: v[12] as u32,
        failure_percentage_volume: v[13] as u32,
        half_open_probes: v[14] as u32,
        half_open_successes: v[15] as u32,
        panic_threshold: v[16] as u32,
    }
}
