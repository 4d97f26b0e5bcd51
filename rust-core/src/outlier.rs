//! Health transitions of peers in shared memory (the rules are in `health`). Every transition is a
//! compare-and-swap on the peer's health word, so concurrent workers agree on one outcome, and each one emits an
//! event and re-evaluates the upstream's panic mode.

use crate::events::{kind, NO_PEER};
use crate::health::{self, state::*, OutlierParams, Reason};
use crate::layout::{state, Region};
use crate::rng::Rng;
use crate::window::Outcome;
use std::sync::atomic::Ordering::*;

/// Ejected by an active health check: only a passing check ends it.
const UNTIL_CHECK_PASSES: u64 = u64::MAX / 2;

impl Region {
    fn outlier(&self, up: u32) -> OutlierParams {
        self.read_upstream(up).map(|(p, _, _)| p.outlier).unwrap_or_default()
    }

    /// Feeds one attempt's outcome to outlier detection. The common case — a success on a healthy peer with no
    /// failure streak — reads four words and writes nothing.
    /// Inlined into the log path for its common case; the rest is [`Region::observe_health_slow`].
    #[inline(always)]
    pub(crate) fn observe_health<R: Rng>(&self, slot: u32, outcome: Outcome, now_us: u64, rng: &mut R) {
        if outcome == Outcome::Aborted {
            return;
        }
        let h = self.peer_head(slot);
        let health = h.health.load(Acquire);
        if !outcome.is_failure() {
            for c in &h.consecutive {
                if c.load(Relaxed) != 0 {
                    c.store(0, Relaxed);
                }
            }
            if health == HALF_OPEN {
                self.half_open_success(slot, now_us);
            }
            return;
        }
        self.observe_health_slow(slot, health, outcome, now_us, rng);
    }

    /// A success of a half-open peer: restores it after `half_open_successes` of them.
    #[inline(never)]
    fn half_open_success(&self, slot: u32, now_us: u64) {
        let h = self.peer_head(slot);
        let up = h.upstream.load(Relaxed);
        let ok = h.half_open_ok.fetch_add(1, AcqRel) + 1;
        h.half_open_us.store(now_us, Relaxed); // progress: a probe completed
        if ok >= self.outlier(up).half_open_successes.max(1) {
            self.restore(slot, &[HALF_OPEN], Reason::HalfOpenSuccesses, ok, now_us);
        }
    }

    /// A failure (`outcome`) of a peer whose health was `health`: failure streaks, ejection.
    #[inline(never)]
    fn observe_health_slow<R: Rng>(&self, slot: u32, health: u32, outcome: Outcome, now_us: u64, rng: &mut R) {
        let h = self.peer_head(slot);
        let up = h.upstream.load(Relaxed);
        let p = self.outlier(up);
        if health == HALF_OPEN {
            self.eject(up, slot, Reason::HalfOpenFailure, [0.0, 0.0], true, None, &p, now_us, rng);
            return;
        }
        if health != HEALTHY {
            return;
        }
        let any = h.consecutive[0].fetch_add(1, AcqRel) + 1;
        let (kind_count, threshold, reason) = match outcome {
            Outcome::Gateway | Outcome::Connect => {
                (h.consecutive[1].fetch_add(1, AcqRel) + 1, p.consecutive_gateway, Reason::ConsecutiveGateway)
            }
            Outcome::Timeout => {
                (h.consecutive[2].fetch_add(1, AcqRel) + 1, p.consecutive_timeout, Reason::ConsecutiveTimeout)
            }
            _ => (any, p.consecutive_5xx, Reason::Consecutive5xx),
        };
        if threshold > 0 && kind_count >= threshold {
            self.eject(up, slot, reason, [kind_count as f64, 0.0], false, None, &p, now_us, rng);
        } else if p.consecutive_5xx > 0 && any >= p.consecutive_5xx {
            self.eject(up, slot, Reason::Consecutive5xx, [any as f64, 0.0], false, None, &p, now_us, rng);
        }
    }

    /// Peers of upstream `up` in service (active records, not draining) and how many of them are healthy and
    /// ejected (ejected or half-open).
    fn census(&self, up: u32) -> (u32, u32, u32) {
        let (mut total, mut healthy, mut ejected) = (0, 0, 0);
        for slot in self.upstream_slots(up) {
            let h = self.peer_head(slot);
            if h.state.load(Acquire) != state::ACTIVE {
                continue;
            }
            match h.health.load(Acquire) {
                DRAINING => continue,
                HEALTHY => healthy += 1,
                _ => ejected += 1,
            }
            total += 1;
        }
        (total, healthy, ejected)
    }

    /// Ejects a peer. `force` skips the max-ejection-percent check (a half-open peer that failed is already counted
    /// as ejected; an active check is authoritative). `duration` overrides the computed ejection time. `detail` are
    /// the numbers behind the decision, kept in the event (see `events::event_json`).
    #[allow(clippy::too_many_arguments)]
    fn eject<R: Rng>(
        &self,
        up: u32,
        slot: u32,
        reason: Reason,
        detail: [f64; 2],
        force: bool,
        duration: Option<u64>,
        p: &OutlierParams,
        now_us: u64,
        rng: &mut R,
    ) -> bool {
        let h = self.peer_head(slot);
        let cur = h.health.load(Acquire);
        if cur == EJECTED || cur == DRAINING {
            return false;
        }
        if !force {
            let (total, _, ejected) = self.census(up);
            if !p.may_eject(ejected, total) {
                self.emit(now_us, kind::EJECTION_SKIPPED, Some(reason), up, slot, [
                    ejected as f64,
                    total as f64,
                    p.max_ejection_percent as f64,
                    0.0,
                ]);
                for c in &h.consecutive {
                    c.store(0, Relaxed); // count a fresh streak before trying again
                }
                return false;
            }
        }
        if h.health.compare_exchange(cur, EJECTED, AcqRel, Acquire).is_err() {
            return false;
        }
        let times = h.times_ejected.fetch_add(1, AcqRel) + 1;
        let d = duration.unwrap_or_else(|| p.ejection_duration(times, rng));
        h.ejected_until_us.store(now_us.saturating_add(d), Release);
        h.last_ejected_us.store(now_us, Relaxed);
        h.ejections_total.fetch_add(1, Relaxed);
        h.half_open_ok.store(0, Relaxed);
        for c in &h.consecutive {
            c.store(0, Relaxed);
        }
        let secs = if d >= UNTIL_CHECK_PASSES { f64::INFINITY } else { d as f64 / 1e6 };
        self.emit(now_us, kind::EJECTED, Some(reason), up, slot, [secs, times as f64, detail[0], detail[1]]);
        self.update_panic(up, p, now_us);
        true
    }

    /// Brings an ejected or half-open peer back to healthy.
    fn restore(&self, slot: u32, from: &[u32], reason: Reason, detail: u32, now_us: u64) -> bool {
        let h = self.peer_head(slot);
        let cur = h.health.load(Acquire);
        if !from.contains(&cur) || h.health.compare_exchange(cur, HEALTHY, AcqRel, Acquire).is_err() {
            return false;
        }
        h.half_open_ok.store(0, Relaxed);
        for c in &h.consecutive {
            c.store(0, Relaxed);
        }
        let up = h.upstream.load(Relaxed);
        // Back in service like a new peer (Envoy applies slow start to hosts returning to health): its estimate,
        // inflated by failure penalties, is replaced by the best healthy peer's, and its weight ramps up again.
        let decay_us = self.upstream(up).head.decay_ms.load(Relaxed) as f64 * 1000.0;
        if let Some(best) = self.best_estimate(up, slot, decay_us, now_us) {
            h.ewma.store(crate::ewma::pack(best, now_us), Release);
        }
        h.added_us.store(now_us, Release);
        self.emit(now_us, kind::HEALTHY, Some(reason), up, slot, [
            h.times_ejected.load(Relaxed) as f64,
            detail as f64,
            0.0,
            0.0,
        ]);
        self.update_panic(up, &self.outlier(up), now_us);
        true
    }

    /// An ejected peer whose time is up becomes half-open.
    pub(crate) fn to_half_open(&self, slot: u32, now_us: u64) -> bool {
        let h = self.peer_head(slot);
        let until = h.ejected_until_us.load(Acquire);
        if until > now_us || h.health.compare_exchange(EJECTED, HALF_OPEN, AcqRel, Acquire).is_err() {
            return false;
        }
        h.half_open_ok.store(0, Relaxed);
        // Probes of an earlier half-open spell that never ended are not carried over.
        h.probes.store(0, Relaxed);
        h.probe_us.store(0, Relaxed);
        h.half_open_us.store(now_us, Relaxed);
        let up = h.upstream.load(Relaxed);
        self.emit(now_us, kind::HALF_OPEN, Some(Reason::EjectionTimeUp), up, slot, [
            h.times_ejected.load(Relaxed) as f64,
            0.0,
            0.0,
            0.0,
        ]);
        true
    }

    /// A half-open peer that took probes but saw none of them complete for two probe timeouts (see
    /// [`OutlierParams::probe_timeout_us`]) goes back to ejected, for its current ejection time, and is half-open again
    /// after it, with its probe count cleared: nothing a lost request leaked keeps it out of service for good.
    fn half_open_timeout<R: Rng>(&self, up: u32, slot: u32, p: &OutlierParams, now_us: u64, rng: &mut R) -> bool {
        let h = self.peer_head(slot);
        let since = h.half_open_us.load(Relaxed);
        if h.probes.load(Acquire) == 0 || now_us.saturating_sub(since) < 2 * p.probe_timeout_us() {
            return false;
        }
        if h.health.compare_exchange(HALF_OPEN, EJECTED, AcqRel, Acquire).is_err() {
            return false;
        }
        let times = h.times_ejected.load(Relaxed);
        let d = p.ejection_duration(times, rng);
        h.ejected_until_us.store(now_us.saturating_add(d), Release);
        h.half_open_ok.store(0, Relaxed);
        self.emit(now_us, kind::EJECTED, Some(Reason::HalfOpenTimeout), up, slot, [
            d as f64 / 1e6,
            times as f64,
            now_us.saturating_sub(since) as f64 / 1e6,
            0.0,
        ]);
        self.update_panic(up, p, now_us);
        true
    }

    /// Re-evaluates panic mode of upstream `up` and emits an event when it changes.
    fn update_panic(&self, up: u32, p: &OutlierParams, now_us: u64) {
        let (total, healthy, _) = self.census(up);
        let panic = p.panic(healthy, total) as u32;
        let old = self.upstream(up).head.panic.swap(panic, AcqRel);
        if old != panic {
            let k = if panic == 1 { kind::PANIC_ON } else { kind::PANIC_OFF };
            self.emit(now_us, k, None, up, NO_PEER, [healthy as f64, total as f64, p.panic_threshold as f64, 0.0]);
        }
    }

    /// Once per interval per upstream (whichever worker comes first): ejected peers whose time is up become
    /// half-open, ejection counts of peers quiet for an interval decay by one, success-rate and failure-percentage
    /// outliers over the rolling window are ejected, and panic mode is re-evaluated.
    pub(crate) fn sweep<R: Rng>(&self, up: u32, now_us: u64, rng: &mut R) {
        let head = self.upstream(up).head;
        if head.state.load(Acquire) != state::ACTIVE {
            return;
        }
        let p = self.outlier(up);
        let last = head.last_sweep_us.load(Acquire);
        if now_us.saturating_sub(last) < p.interval_us.max(1)
            || head.last_sweep_us.compare_exchange(last, now_us, AcqRel, Acquire).is_err()
        {
            return;
        }
        let slots = self.upstream_slots(up);
        let mut volumes = Vec::with_capacity(slots.len());
        let mut candidates = Vec::with_capacity(slots.len());
        for &slot in &slots {
            let h = self.peer_head(slot);
            if h.state.load(Acquire) != state::ACTIVE {
                continue;
            }
            match h.health.load(Acquire) {
                EJECTED => {
                    self.to_half_open(slot, now_us);
                }
                HALF_OPEN => {
                    self.half_open_timeout(up, slot, &p, now_us, rng);
                }
                HEALTHY => {
                    let t = h.times_ejected.load(Acquire);
                    if t > 0 && now_us.saturating_sub(h.last_ejected_us.load(Relaxed)) >= p.interval_us {
                        let _ = h.times_ejected.compare_exchange(t, t - 1, AcqRel, Relaxed);
                        h.last_ejected_us.store(now_us, Relaxed); // one step per quiet interval
                    }
                    volumes.push(self.window_volume(slot, now_us));
                    candidates.push(slot);
                }
                _ => {}
            }
        }
        let outliers =
            health::success_rate_outliers(&volumes, p.success_rate_stdev, p.success_rate_min_hosts, p.success_rate_volume);
        for (i, rate, threshold) in outliers {
            self.eject(up, candidates[i], Reason::SuccessRate, [rate, threshold], false, None, &p, now_us, rng);
        }
        for i in health::failure_percentage_outliers(&volumes, p.failure_percentage, p.failure_percentage_min_hosts, p.failure_percentage_volume) {
            let v = volumes[i];
            let pct = v.failures as f64 * 100.0 / v.requests as f64;
            let detail = [pct, v.requests as f64];
            self.eject(up, candidates[i], Reason::FailurePercentage, detail, false, None, &p, now_us, rng);
        }
        self.update_panic(up, &p, now_us);
    }

    /// Takes or renews the active health-check lease of upstream `up` for `pid` until `now + lease_us`. A lease
    /// held by a dead worker, or expired, is taken over. Returns whether `pid` holds it now.
    pub fn check_lease(&self, up: u32, pid: u32, now_us: u64, lease_us: u64, alive: &dyn Fn(u32) -> bool) -> bool {
        if up >= self.params().max_upstreams {
            return false;
        }
        let h = self.upstream(up).head;
        let owner = h.check_owner.load(Acquire);
        let free = owner == 0 || owner == pid || h.check_until_us.load(Acquire) <= now_us || !alive(owner);
        if !free || h.check_owner.compare_exchange(owner, pid, AcqRel, Acquire).is_err() {
            return false;
        }
        h.check_until_us.store(now_us + lease_us, Release);
        true
    }

    /// Records an active health check of peer `slot`: `passes` consecutive passes bring an ejected or half-open
    /// peer back; `fails` consecutive failures eject a peer until a check passes again.
    #[allow(clippy::too_many_arguments)]
    pub fn check_result<R: Rng>(&self, slot: u32, gen: u32, ok: bool, passes: u32, fails: u32, now_us: u64, rng: &mut R) {
        if slot >= self.params().max_peers {
            return;
        }
        let h = self.peer_head(slot);
        if h.gen.load(Acquire) != gen || h.state.load(Acquire) != state::ACTIVE {
            return;
        }
        if ok {
            h.active_fail.store(0, Relaxed);
            let n = h.active_ok.fetch_add(1, AcqRel) + 1;
            if n >= passes.max(1) {
                self.restore(slot, &[EJECTED, HALF_OPEN], Reason::ActiveCheckPassed, n, now_us);
            }
        } else {
            h.active_ok.store(0, Relaxed);
            let n = h.active_fail.fetch_add(1, AcqRel) + 1;
            let health = h.health.load(Acquire);
            if n >= fails.max(1) && (health == HEALTHY || health == HALF_OPEN) {
                let up = h.upstream.load(Relaxed);
                let p = self.outlier(up);
                self.eject(up, slot, Reason::ActiveCheckFailed, [n as f64, 0.0], true, Some(UNTIL_CHECK_PASSES), &p, now_us, rng);
            }
        }
    }

    /// Drains a peer (no new requests) or puts it back into service. Returns false when it was already so.
    pub fn set_draining(&self, slot: u32, draining: bool, now_us: u64) -> bool {
        self.set_draining_for(slot, draining, Reason::Operator, now_us)
    }

    /// [`Region::set_draining`] with the reason the event gives.
    pub fn set_draining_for(&self, slot: u32, draining: bool, reason: Reason, now_us: u64) -> bool {
        let h = self.peer_head(slot);
        let up = h.upstream.load(Relaxed);
        let cur = h.health.load(Acquire);
        let (want, k) = if draining { (DRAINING, kind::DRAINING) } else { (HEALTHY, kind::ENABLED) };
        if cur == want || (!draining && cur != DRAINING) {
            return false;
        }
        if h.health.compare_exchange(cur, want, AcqRel, Acquire).is_err() {
            return false;
        }
        self.emit(now_us, k, Some(reason), up, slot, [0.0; 4]);
        self.update_panic(up, &self.outlier(up), now_us);
        true
    }
}
