//! Operations on a shared [`Region`]: configuration, peer choice, attempt accounting and statistics.
//!
//! Concurrency rules:
//! - The request path (pick, begin/end of attempts, recording) takes no lock: it uses atomics only, and reads an
//!   upstream's peer list and tunables under a seqlock (it retries when a writer changed them meanwhile).
//! - Configuration changes are serialised by a writer word in the header holding the writer's pid; a writer that died
//!   holding it is detected and replaced.
//! - A peer record handed to another peer gets a new generation; every writer on the request path carries the
//!   generation it started with, and is ignored when it no longer matches. Records are never freed while in use.

use crate::addr;
use crate::ewma;
use crate::layout::{state, LayoutError, Peer, PeerHead, Region, Upstream};
use crate::rng::Rng;
use crate::select::{Algorithm, PeerView};
use crate::slowstart::SlowStart;
use crate::window::{counter, Outcome, WindowSum};
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
    /// A failed attempt counts as a latency of `penalty × max(own estimate, upstream mean)`.
    pub failure_penalty: f64,
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

/// Why no peer could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("unknown upstream")]
    UnknownUpstream,
    #[error("no peer available")]
    NoPeer,
}

/// A chosen peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub slot: u32,
    pub gen: u32,
    /// Extra attempts nginx should allow this request (meaningful on the first attempt).
    pub more_tries: u32,
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
}

impl Region {
    /// Current time slice of the rolling window.
    #[inline]
    fn slice(&self, now_us: u64) -> u64 {
        now_us / (self.params().bucket_ms as u64 * 1000)
    }

    fn upstream_params(&self, up: &Upstream<'_>) -> UpstreamParams {
        let h = up.head;
        UpstreamParams {
            algorithm: Algorithm::from_u32(h.algorithm.load(Relaxed)),
            retries: h.retries.load(Relaxed),
            slow_start: SlowStart {
                window_us: h.slow_start_ms.load(Relaxed) as u64 * 1000,
                aggression: h.slow_start_aggression_milli.load(Relaxed).max(1) as f64 / 1000.0,
                min_weight: h.slow_start_min_weight_milli.load(Relaxed) as f64 / 1000.0,
            },
            decay_us: h.decay_ms.load(Relaxed) as u64 * 1000,
            default_rtt_us: h.default_rtt_us.load(Relaxed),
            failure_penalty: h.failure_penalty_milli.load(Relaxed) as f64 / 1000.0,
        }
    }

    /// Reads an upstream's tunables and peer count consistently.
    pub fn read_upstream(&self, idx: u32) -> Option<(UpstreamParams, u32, u32)> {
        if idx >= self.params().max_upstreams {
            return None;
        }
        let up = self.upstream(idx);
        loop {
            let s1 = up.head.seq.load(Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let st = up.head.state.load(Relaxed);
            let params = self.upstream_params(&up);
            let n = up.head.npeers.load(Relaxed).min(self.params().max_peers);
            fence(Acquire);
            if up.head.seq.load(Relaxed) == s1 {
                return if st == state::FREE {
                    None
                } else {
                    Some((params, n, up.head.gen.load(Relaxed)))
                };
            }
        }
    }

    /// The peer slots of an upstream, consistently.
    pub fn upstream_slots(&self, idx: u32) -> Vec<u32> {
        let up = self.upstream(idx);
        loop {
            let s1 = up.head.seq.load(Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let n = up.head.npeers.load(Relaxed).min(self.params().max_peers) as usize;
            let v: Vec<u32> = up.slots[..n].iter().map(|s| s.load(Relaxed)).collect();
            fence(Acquire);
            if up.head.seq.load(Relaxed) == s1 {
                return v;
            }
        }
    }

    /// Finds an upstream by name (not on the request path: Lua keeps the index).
    pub fn find_upstream(&self, name: &str) -> Option<u32> {
        (0..self.params().max_upstreams).find(|&i| {
            let h = self.upstream(i).head;
            h.state.load(Acquire) == state::ACTIVE && h.name.eq(name.as_bytes())
        })
    }

    // ----- configuration -----

    fn lock_writer(&self, pid: u32, alive: &dyn Fn(u32) -> bool) -> Result<(), ConfigError> {
        let w = &self.header().writer;
        for _ in 0..1000 {
            match w.compare_exchange(0, pid, AcqRel, Acquire) {
                Ok(_) => return Ok(()),
                Err(owner) if owner == pid => return Ok(()),
                Err(owner) if !alive(owner) => {
                    if w.compare_exchange(owner, pid, AcqRel, Acquire).is_ok() {
                        return Ok(());
                    }
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        Err(ConfigError::Busy(w.load(Relaxed)))
    }

    fn unlock_writer(&self, pid: u32) {
        let _ = self
            .header()
            .writer
            .compare_exchange(pid, 0, AcqRel, Relaxed);
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
        for (i, u) in ups.iter().enumerate() {
            if u.name.is_empty() || u.name.len() > 63 {
                return Err(ConfigError::BadName(u.name.clone()));
            }
            if ups[..i].iter().any(|o| o.name == u.name) {
                return Err(ConfigError::DuplicateUpstream(u.name.clone()));
            }
            for (j, peer) in u.peers.iter().enumerate() {
                if peer.weight == 0 || peer.weight > 10_000 {
                    return Err(ConfigError::BadWeight(u.name.clone()));
                }
                if u.peers[..j].iter().any(|o| o.addr == peer.addr) {
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
    /// # Errors
    /// A [`ConfigError`]; nothing has changed then.
    pub fn configure(
        &self,
        ups: &[UpstreamConf],
        pid: u32,
        alive: &dyn Fn(u32) -> bool,
        now_us: u64,
    ) -> Result<Vec<u32>, ConfigError> {
        self.validate(ups)?;
        self.lock_writer(pid, alive)?;
        let epoch = self.header().config_epoch.fetch_add(1, AcqRel) + 1;
        let p = *self.params();

        // 1. Retire every peer and upstream that the new configuration does not keep, so their records can serve
        //    new ones (validation guaranteed that the kept plus the new fit).
        for slot in 0..p.max_peers {
            let peer = self.peer(slot);
            if peer.head.state.load(Acquire) != state::ACTIVE {
                continue;
            }
            let up_idx = peer.head.upstream.load(Relaxed);
            let up_name = self.upstream_name(up_idx);
            let addr = self.peer_addr(slot);
            let kept = ups
                .iter()
                .any(|u| u.name == up_name && u.peers.iter().any(|c| c.addr.to_string() == addr));
            if !kept {
                peer.head.retired_us.store(now_us, Relaxed);
                peer.head.state.store(state::RETIRED, Release);
            }
        }
        let mut indices = Vec::with_capacity(ups.len());
        for u in ups {
            indices.push(self.apply_upstream(u, epoch, now_us));
        }
        for i in 0..p.max_upstreams {
            let h = self.upstream(i).head;
            if h.state.load(Acquire) == state::ACTIVE && h.config_epoch.load(Relaxed) != epoch {
                h.retired_us.store(now_us, Relaxed);
                h.state.store(state::RETIRED, Release);
            }
        }
        self.unlock_writer(pid);
        Ok(indices)
    }

    fn upstream_name(&self, idx: u32) -> String {
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

    fn apply_upstream(&self, u: &UpstreamConf, epoch: u64, now_us: u64) -> u32 {
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

        // Seed for new peers: the mean estimate of the peers kept.
        let kept: Vec<f64> = self
            .upstream_slots(idx)
            .into_iter()
            .filter(|&s| self.peer(s).head.state.load(Acquire) == state::ACTIVE)
            .map(|s| ewma::unpack(self.peer(s).head.ewma.load(Relaxed), now_us).0)
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
            let found = (0..p.max_peers).find(|&s| {
                let h = self.peer(s).head;
                h.state.load(Acquire) != state::FREE
                    && h.upstream.load(Relaxed) == idx
                    && h.addr.eq(text.as_bytes())
            });
            let slot = match found {
                Some(s) => {
                    let h = self.peer(s).head;
                    if h.state.load(Acquire) == state::RETIRED {
                        h.added_us.store(now_us, Relaxed); // comes back: ramp in again
                        h.state.store(state::ACTIVE, Release);
                    }
                    s
                }
                None => {
                    let s = self
                        .free_record(
                            p.max_peers,
                            |s| self.peer(s),
                            |peer| {
                                (
                                    peer.head.state.load(Acquire),
                                    peer.head.retired_us.load(Relaxed),
                                )
                            },
                        )
                        .unwrap_or(0); // validation guarantees a record
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
        h.max_weight
            .store(u.peers.iter().map(|p| p.weight).max().unwrap_or(1), Relaxed);
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
        h.inflight.store(0, Relaxed);
        for c in peer.inflight_by_worker {
            c.store(0, Relaxed);
        }
        for t in &h.totals {
            t.store(0, Relaxed);
        }
        h.total_latency_us.store(0, Relaxed);
        for b in peer.window {
            b.forget();
        }
        h.upstream.store(up, Relaxed);
        h.addr.store(text.as_bytes());
        h.host_len.store(host_len as u32, Relaxed);
        h.port.store(port as u32, Relaxed);
        h.ewma.store(ewma::pack(seed_us, now_us), Relaxed);
        h.added_us.store(now_us, Relaxed);
        h.retired_us.store(0, Relaxed);
        h.state.store(state::ACTIVE, Release);
    }

    // ----- workers -----

    /// Gives the calling worker (`pid`) a column for its in-flight counts. Columns of workers that died (`alive`
    /// says no) are reclaimed first: their in-flight counts are subtracted from the peers' totals, so a worker killed
    /// with requests in flight leaves no phantom load behind. Returns `None` when every column is in use.
    pub fn attach_worker(&self, pid: u32, alive: &dyn Fn(u32) -> bool) -> Option<u32> {
        const RECLAIMING: u32 = u32::MAX;
        let pids = self.worker_pids();
        let mut mine = pids
            .iter()
            .position(|p| p.load(Acquire) == pid)
            .map(|i| i as u32);
        for (col, p) in pids.iter().enumerate() {
            let owner = p.load(Acquire);
            if owner == 0 || owner == pid || owner == RECLAIMING || alive(owner) {
                continue;
            }
            let take = mine.is_none();
            let new = if take { pid } else { RECLAIMING };
            if p.compare_exchange(owner, new, AcqRel, Acquire).is_ok() {
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

    /// Chooses a peer of upstream `idx` for an attempt, avoiding the slots for which `tried` is true while another
    /// eligible peer exists.
    ///
    /// # Errors
    /// [`PickError`] when the upstream is unknown or has no eligible peer.
    pub fn pick<R: Rng>(
        &self,
        idx: u32,
        tried: &dyn Fn(u32) -> bool,
        now_us: u64,
        rng: &mut R,
    ) -> Result<Pick, PickError> {
        if idx >= self.params().max_upstreams {
            return Err(PickError::UnknownUpstream);
        }
        let up = self.upstream(idx);
        for _ in 0..4 {
            let s1 = up.head.seq.load(Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            if up.head.state.load(Relaxed) == state::FREE {
                return Err(PickError::UnknownUpstream);
            }
            let params = self.upstream_params(&up);
            let view = ShmView {
                region: self,
                up,
                n: up.head.npeers.load(Relaxed).min(self.params().max_peers),
                params,
                max_weight: up.head.max_weight.load(Relaxed).max(1) as f64,
                now_us,
                tried,
            };
            let ticket = if params.algorithm == Algorithm::RoundRobin {
                up.head.ticket.fetch_add(1, Relaxed)
            } else {
                0
            };
            let choice = params.algorithm.select(&view, rng, ticket);
            let slot = choice.map(|i| view.slot(i));
            fence(Acquire);
            if up.head.seq.load(Relaxed) != s1 {
                continue; // the peer list changed while we read it
            }
            let slot = slot.ok_or(PickError::NoPeer)?;
            return Ok(Pick {
                slot,
                gen: self.peer(slot).head.gen.load(Acquire),
                more_tries: params.retries.min(view.n.saturating_sub(1)),
            });
        }
        Err(PickError::NoPeer)
    }

    /// Counts an attempt as in flight on `slot` (and in the worker's column, when it has one).
    #[inline]
    pub fn begin_attempt(&self, slot: u32, gen: u32, col: Option<u32>) {
        let peer = self.peer(slot);
        if peer.head.gen.load(Acquire) != gen {
            return;
        }
        peer.head.inflight.fetch_add(1, AcqRel);
        if let Some(c) = col.and_then(|c| peer.inflight_by_worker.get(c as usize)) {
            c.fetch_add(1, AcqRel);
        }
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
        let peer = self.peer(slot);
        if peer.head.gen.load(Acquire) != gen {
            return;
        }
        peer.head.inflight.fetch_sub(1, AcqRel);
        if let Some(c) = col.and_then(|c| peer.inflight_by_worker.get(c as usize)) {
            c.fetch_sub(1, AcqRel);
        }
        if outcome == Outcome::Aborted {
            return;
        }
        let up_idx = peer.head.upstream.load(Relaxed);
        let Some((params, _, _)) = self.read_upstream(up_idx) else {
            return;
        };
        let sample = if outcome.is_failure() {
            let own = self.decayed_estimate(&peer, &params, now_us);
            let mean = self.mean_estimate(up_idx, &params, now_us);
            (latency_us as f64).max(params.failure_penalty * own.max(mean))
        } else {
            latency_us as f64
        };
        let samples = peer.head.totals[counter::REQUESTS].load(Relaxed);
        let word = &peer.head.ewma;
        let mut cur = word.load(Acquire);
        loop {
            let (est, elapsed) = ewma::unpack(cur, now_us);
            let next = ewma::pack(
                ewma::observe(est, elapsed, sample, params.decay_us as f64, samples),
                now_us,
            );
            match word.compare_exchange_weak(cur, next, AcqRel, Acquire) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
    }

    /// Records a finished attempt in the window and the all-time counters.
    pub fn record(&self, slot: u32, gen: u32, outcome: Outcome, latency_us: u64, now_us: u64) {
        let peer = self.peer(slot);
        if peer.head.gen.load(Acquire) != gen {
            return;
        }
        let slice = self.slice(now_us);
        let bucket = &peer.window[(slice % peer.window.len() as u64) as usize];
        if !bucket.record(slice, outcome, latency_us) {
            self.header().dropped_samples.fetch_add(1, Relaxed);
        }
        let t = &peer.head.totals;
        if outcome == Outcome::Aborted {
            t[counter::ABORTED].fetch_add(1, Relaxed);
            return;
        }
        t[counter::REQUESTS].fetch_add(1, Relaxed);
        if outcome.is_failure() {
            t[counter::FAIL_BASE + outcome as usize - 1].fetch_add(1, Relaxed);
        }
        peer.head.total_latency_us.fetch_add(latency_us, Relaxed);
    }

    fn decayed_estimate(&self, peer: &Peer<'_>, params: &UpstreamParams, now_us: u64) -> f64 {
        let (est, elapsed) = ewma::unpack(peer.head.ewma.load(Acquire), now_us);
        ewma::decayed(est, elapsed, params.decay_us as f64)
    }

    fn mean_estimate(&self, idx: u32, params: &UpstreamParams, now_us: u64) -> f64 {
        let slots = self.upstream(idx).slots;
        let n = self
            .upstream(idx)
            .head
            .npeers
            .load(Relaxed)
            .min(self.params().max_peers) as usize;
        if n == 0 {
            return 0.0;
        }
        let sum: f64 = slots[..n]
            .iter()
            .map(|s| self.decayed_estimate(&self.peer(s.load(Relaxed)), params, now_us))
            .sum();
        sum / n as f64
    }

    /// Clears, ahead of time, the window bucket the next time slice will use, for every peer in service.
    pub fn tick(&self, now_us: u64) {
        let next = self.slice(now_us) + 1;
        for slot in 0..self.params().max_peers {
            let peer = self.peer(slot);
            if peer.head.state.load(Acquire) == state::ACTIVE {
                peer.window[(next % peer.window.len() as u64) as usize].preclear(next);
            }
        }
    }

    // ----- reading -----

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
        let view_cost = {
            let est = self.decayed_estimate(&peer, &params, now_us).max(1.0);
            let inflight = h.inflight.load(Relaxed).max(0) as f64;
            let w = h.weight.load(Relaxed).max(1) as f64
                * params
                    .slow_start
                    .factor(now_us.saturating_sub(h.added_us.load(Relaxed)));
            est * (inflight + 1.0) / w
        };
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
            window,
            window_us: span.min(age.max(1)),
            totals,
            total_latency_us: h.total_latency_us.load(Relaxed),
            ewma_us: self.decayed_estimate(&peer, &params, now_us),
            cost: view_cost,
            slow_start: params
                .slow_start
                .factor(now_us.saturating_sub(h.added_us.load(Relaxed))),
            added_us: h.added_us.load(Relaxed),
        })
    }
}

/// An upstream's peers in shared memory, as the selection algorithms see them.
struct ShmView<'a> {
    region: &'a Region,
    up: Upstream<'a>,
    n: u32,
    params: UpstreamParams,
    max_weight: f64,
    now_us: u64,
    tried: &'a dyn Fn(u32) -> bool,
}

impl ShmView<'_> {
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
        let age = self.now_us.saturating_sub(h.added_us.load(Relaxed));
        h.weight.load(Relaxed).max(1) as f64 * self.params.slow_start.factor(age)
    }
}

impl PeerView for ShmView<'_> {
    #[inline]
    fn len(&self) -> u32 {
        self.n
    }

    #[inline]
    fn eligible(&self, i: u32) -> bool {
        self.head(i).state.load(Relaxed) == state::ACTIVE
    }

    #[inline]
    fn tried(&self, i: u32) -> bool {
        (self.tried)(self.slot(i))
    }

    #[inline]
    fn cost(&self, i: u32) -> f64 {
        let h = self.head(i);
        let (est, elapsed) = ewma::unpack(h.ewma.load(Relaxed), self.now_us);
        let est = ewma::decayed(est, elapsed, self.params.decay_us as f64).max(1.0);
        let inflight = h.inflight.load(Relaxed).max(0) as f64;
        est * (inflight + 1.0) / self.weight_of(h)
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
