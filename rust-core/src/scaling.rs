//! Scaling decisions: how many instances a service needs, from what the gateway measures.
//!
//! One [`Scaler`] per service is fed [`Signals`] every tick (the caller's clock, in microseconds, so tests drive time)
//! and answers a [`Decision`] — including "no change, because …" — with every input it used.
//!
//! The rules, and where they come from:
//! - **Proportional recommendation** (Kubernetes HPA): per signal `desired = ceil(current × value / target)`, skipped
//!   while `|value / target − 1| ≤ tolerance` (HPA's 0.1); the maximum over the signals wins. Utilization
//!   (`in-flight ÷ (instances × capacity)`), request rate per instance and an external value scale both ways (they are
//!   proportional to the instance count); latency and error rate only ever push *up* — a fast, healthy service at low
//!   load says nothing about how few instances would do, so below target they abstain. A missing signal (no data)
//!   abstains too (HPA assumes 100 % of target on scale-down and 0 % on scale-up, which is the same thing).
//! - **Hold** ("p99 > 300 ms for 5 s"): a signal counts only after it has stayed on the same side of its tolerance band
//!   for its hold time.
//! - **Stabilization windows** (HPA `behavior`): scale up to the *lowest* recommendation of the short scale-up window,
//!   down to the *highest* recommendation of the long scale-down window (HPA: 0 s and 300 s).
//! - **Panic** (Knative KPA): when a signal asks for at least `panic_threshold` × the serving instances (Knative: 200 %),
//!   scale up at once (no window, no cooldown) and do not scale down until `panic_window` has passed without a burst.
//! - **Cooldown** after an action, **step limits** (HPA's default scale-up policy: +100 % or +4 instances, whichever
//!   is more; Knative's maximum scale-down rate 2×), and min/max instances, in that order of precedence: min/max last.
//! - **Forecast** (Holt's linear trend, double exponential smoothing): request rate level and trend are updated every
//!   tick; with a provisioning lead time the request-rate signal (and utilization, scaled by the same expected growth)
//!   use the rate expected that far ahead, so capacity is asked for before a steady ramp crosses the target. The
//!   forecast only ever raises a recommendation.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

/// The signals, in the order of [`Signals`] values and [`Decision::per_signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Signal {
    /// In-flight requests per instance ÷ capacity, against a target utilization.
    Utilization = 0,
    /// Requests per second per instance.
    Rps = 1,
    /// A latency percentile (chosen by the caller), up only.
    Latency = 2,
    /// Share of failed requests, up only.
    ErrorRate = 3,
    /// A number from outside (e.g. a Prometheus query), total over the service, against a per-instance target.
    External = 4,
    /// Backend-reported load (see `report`): the sum over the ready peers of their reported utilization or named
    /// metric (e.g. queue depth), against a per-instance target.
    Reported = 5,
}

/// Number of signals.
pub const SIGNALS: usize = 6;

/// Why a decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    /// Every signal is within its tolerance band (or recommends the current count).
    Steady = 0,
    /// Scale up (the deciding signal is in [`Decision::signal`]).
    ScaleUp = 1,
    /// Scale down.
    ScaleDown = 2,
    /// A signal is outside its band but has not held for its hold time yet.
    Holding = 3,
    /// Scale-up wanted, but the scale-up window still holds a recommendation at or below the current count.
    UpWindow = 4,
    /// Scale-down wanted, but the scale-down window still holds a recommendation at or above the current count.
    Stabilizing = 5,
    /// A change is wanted but the cooldown after the last action has not passed.
    Cooldown = 6,
    /// Scale-down wanted, but the service is panicking.
    Panic = 7,
    /// A change is wanted but min/max instances prevent it.
    Bounded = 8,
    /// No signal had data.
    NoData = 9,
}

/// Target and hold time of one signal; `target <= 0` switches the signal off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub target: f64,
    pub hold_us: u64,
}

impl Target {
    /// A signal that is off.
    pub const OFF: Target = Target { target: 0.0, hold_us: 0 };
}

/// Everything configurable; see [`Params::default`] for the defaults and their sources.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub min_instances: u32,
    pub max_instances: u32,
    /// In-flight requests one instance is meant to carry at 100 % utilization; 0 switches utilization off.
    pub capacity: f64,
    /// Per signal, indexed by [`Signal`]: utilization (a fraction of `capacity`), requests/s per instance, latency (µs),
    /// error rate (0–1), external value per instance.
    pub targets: [Target; SIGNALS],
    pub tolerance: f64,
    pub up_window_us: u64,
    pub down_window_us: u64,
    pub panic_threshold: f64,
    pub panic_window_us: u64,
    pub cooldown_us: u64,
    pub max_up_rate: f64,
    pub max_step_up: u32,
    pub max_down_rate: f64,
    /// Provisioning lead time the forecast looks ahead; 0 switches the forecast off.
    pub forecast_lead_us: u64,
    pub forecast_alpha: f64,
    pub forecast_beta: f64,
}

impl Default for Params {
    /// Kubernetes HPA's tolerance (0.1), scale-down window (300 s) and scale-up policy (+100 % or +4); Knative's
    /// target utilization (70 %), panic threshold (200 %), panic window (6 s) and scale-down rate (2×). The scale-up
    /// window (1 s) and cooldown (5 s) are ours: the point is to act within a second or two of a sustained change.
    fn default() -> Self {
        let mut targets = [Target::OFF; SIGNALS];
        targets[Signal::Utilization as usize].target = 0.7;
        Params {
            min_instances: 1,
            max_instances: 100,
            capacity: 0.0,
            targets,
            tolerance: 0.1,
            up_window_us: 1_000_000,
            down_window_us: 300_000_000,
            panic_threshold: 2.0,
            panic_window_us: 6_000_000,
            cooldown_us: 5_000_000,
            max_up_rate: 2.0,
            max_step_up: 4,
            max_down_rate: 2.0,
            forecast_lead_us: 0,
            forecast_alpha: 0.5,
            forecast_beta: 0.3,
        }
    }
}

/// What was measured this tick. A value that is NaN or negative is missing (the signal abstains).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    /// Instances asked for (the last desired count while it is being provisioned, else `ready`).
    pub current: u32,
    /// Instances serving now.
    pub ready: u32,
    /// Values indexed by [`Signal`]: in-flight requests (total), requests/s (total), latency (µs), error rate,
    /// external value (total).
    pub values: [f64; SIGNALS],
}

/// One decision and everything it was made from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub now_us: u64,
    pub current: u32,
    pub ready: u32,
    pub desired: u32,
    /// True when `desired != current`: the caller should act (and then treat `desired` as current).
    pub action: bool,
    pub reason: Reason,
    /// The signal that decided (or that a held change waits on); `None` when no signal had an opinion.
    pub signal: Option<Signal>,
    /// The value of `signal` in its target's unit (utilization as a fraction, rps per instance, latency µs, ...).
    pub value: f64,
    pub target: f64,
    /// The recommendation of this tick before windows, cooldown and step limits, within min/max.
    pub recommendation: u32,
    /// Per signal, its recommendation (0: abstained or off).
    pub per_signal: [u32; SIGNALS],
    pub panic: bool,
    /// Request rate expected `forecast_lead` ahead (NaN without a forecast).
    pub forecast_rps: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Holt {
    level: f64,
    trend: f64,
    last_us: u64,
    primed: bool,
}

impl Holt {
    /// Holt's linear trend with irregular steps: trend per second.
    fn update(&mut self, now_us: u64, x: f64, alpha: f64, beta: f64) {
        if !self.primed {
            *self = Holt { level: x, trend: 0.0, last_us: now_us, primed: true };
            return;
        }
        let dt = now_us.saturating_sub(self.last_us) as f64 / 1e6;
        if dt <= 0.0 {
            return;
        }
        let predicted = self.level + self.trend * dt;
        let level = alpha * x + (1.0 - alpha) * predicted;
        self.trend = beta * (level - self.level) / dt + (1.0 - beta) * self.trend;
        self.level = level;
        self.last_us = now_us;
    }

    fn ahead(&self, secs: f64) -> f64 {
        (self.level + self.trend * secs).max(0.0)
    }
}

/// The decision state of one service.
#[derive(Debug, Clone)]
pub struct Scaler {
    params: Params,
    /// Side of the tolerance band each signal is on (-1, 0, 1) and since when.
    side: [(i8, u64); SIGNALS],
    /// Recommendations of past ticks, oldest first, as long as the longer window needs them.
    history: VecDeque<(u64, u32)>,
    panic_until: u64,
    last_action: Option<u64>,
    holt: Holt,
    started: Option<(u64, u32)>,
}

/// `ceil` that forgives float noise (2.0000000001 is 2).
fn ceil(x: f64) -> u32 {
    let c = (x - 1e-9).ceil();
    if c <= 0.0 {
        0
    } else if c >= u32::MAX as f64 {
        u32::MAX
    } else {
        c as u32
    }
}

fn present(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

impl Scaler {
    pub fn new(params: Params) -> Scaler {
        Scaler {
            params,
            side: [(0, 0); SIGNALS],
            history: VecDeque::new(),
            panic_until: 0,
            last_action: None,
            holt: Holt::default(),
            started: None,
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Per signal: (recommendation or None when abstaining, value in target units, whether it proposes a change).
    fn recommend(&self, s: &Signals, forecast_rps: f64) -> [(Option<u32>, f64); SIGNALS] {
        let p = &self.params;
        let ready = s.ready.max(1) as f64;
        let mut out = [(None, f64::NAN); SIGNALS];
        let rps = s.values[Signal::Rps as usize];
        // Expected growth of the load by the lead time, which utilization is scaled by as well.
        let growth = if present(rps) && rps > 0.0 && forecast_rps.is_finite() {
            (forecast_rps / rps).max(1.0)
        } else {
            1.0
        };
        for (i, slot) in out.iter_mut().enumerate() {
            let t = p.targets[i].target;
            let v = s.values[i];
            if t <= 0.0 || !present(v) {
                continue;
            }
            let (value, total, up_only) = match i {
                0 if p.capacity > 0.0 => (v / (ready * p.capacity), v * growth / (p.capacity * t), false),
                0 => continue,
                1 => {
                    let ahead = if forecast_rps.is_finite() { v.max(forecast_rps) } else { v };
                    (v / ready, ahead / t, false)
                }
                2 | 3 => (v, ready * v / t, true),
                _ => (v / ready, v / t, false),
            };
            let ratio = total / ready;
            if (ratio - 1.0).abs() <= p.tolerance || (up_only && ratio < 1.0) {
                *slot = (if up_only { None } else { Some(s.current) }, value);
            } else {
                *slot = (Some(ceil(total)), value);
            }
        }
        out
    }

    /// The decision for this tick. `now_us` must not go backwards (a step back is treated as no time passing).
    pub fn decide(&mut self, now_us: u64, s: &Signals) -> Decision {
        let p = self.params.clone();
        let current = s.current;
        let rps = s.values[Signal::Rps as usize];
        let mut forecast_rps = f64::NAN;
        if p.forecast_lead_us > 0 && present(rps) {
            self.holt.update(now_us, rps, p.forecast_alpha, p.forecast_beta);
            forecast_rps = self.holt.ahead(p.forecast_lead_us as f64 / 1e6);
        }
        let recs = self.recommend(s, forecast_rps);

        let mut per_signal = [0u32; SIGNALS];
        let mut best: Option<(u32, usize)> = None;
        let mut held: Option<usize> = None;
        let mut any_data = false;
        let mut burst = false;
        for (i, &(rec, _)) in recs.iter().enumerate() {
            let Some(r) = rec else {
                self.side[i] = (0, now_us);
                any_data |= present(s.values[i]) && p.targets[i].target > 0.0;
                continue;
            };
            any_data = true;
            let side = (r > current) as i8 - (r < current) as i8;
            if self.side[i].0 != side {
                self.side[i] = (side, now_us);
            }
            if side != 0 && now_us.saturating_sub(self.side[i].1) < p.targets[i].hold_us {
                held.get_or_insert(i);
                continue;
            }
            per_signal[i] = r;
            if r as f64 >= p.panic_threshold * s.ready.max(1) as f64 && side > 0 {
                burst = true;
            }
            if best.map_or(true, |(b, _)| r > b) {
                best = Some((r, i));
            }
        }
        if burst {
            self.panic_until = now_us.saturating_add(p.panic_window_us);
        }
        let panic = now_us < self.panic_until;
        let raw = best.map_or(current, |(r, _)| r);
        let recommendation = raw.clamp(p.min_instances, p.max_instances);

        // Stabilization windows over this and past recommendations.
        let keep = p.up_window_us.max(p.down_window_us);
        while self.history.front().is_some_and(|&(t, _)| now_us.saturating_sub(t) > keep) {
            self.history.pop_front();
        }
        if self.started.is_none() {
            // The count in force when the scaler starts counts as a recommendation of both windows, so that nothing
            // is scaled (but in panic) before a whole window has been seen.
            self.started = Some((now_us, current.clamp(p.min_instances, p.max_instances)));
        }
        self.history.push_back((now_us, recommendation));
        let in_window = |w: u64| self.history.iter().filter(move |&&(t, _)| now_us.saturating_sub(t) <= w).map(|&(_, r)| r);
        let seed_up = self.started.filter(|&(t, _)| now_us.saturating_sub(t) < p.up_window_us).map(|(_, r)| r);
        let up = if panic { recommendation } else { in_window(p.up_window_us).chain(seed_up).min().unwrap_or(recommendation) };
        let seed = self.started.filter(|&(t, _)| now_us.saturating_sub(t) <= p.down_window_us).map(|(_, r)| r);
        let down = in_window(p.down_window_us).chain(seed).max().unwrap_or(recommendation);

        let signal = best.map(|(_, i)| i).or(held);
        let mut d = Decision {
            now_us,
            current,
            ready: s.ready,
            desired: current,
            action: false,
            reason: Reason::Steady,
            signal: signal.map(signal_at),
            value: signal.map_or(f64::NAN, |i| recs[i].1),
            target: signal.map_or(f64::NAN, |i| p.targets[i].target),
            recommendation,
            per_signal,
            panic,
            forecast_rps,
        };
        let mut want = current;
        if want < up {
            want = up;
        }
        if want > down && !panic {
            want = down;
        }
        let bounded = current.clamp(p.min_instances, p.max_instances);
        if want == current {
            d.reason = if bounded != current {
                // Outside min/max (e.g. min raised): go there regardless of windows.
                want = bounded;
                if want > current { Reason::ScaleUp } else { Reason::ScaleDown }
            } else if !any_data {
                Reason::NoData
            } else if held.is_some() && best.map_or(true, |(r, _)| r == current) {
                Reason::Holding
            } else if raw != recommendation && recommendation == current {
                Reason::Bounded
            } else if recommendation > current {
                Reason::UpWindow
            } else if recommendation < current {
                if panic { Reason::Panic } else { Reason::Stabilizing }
            } else {
                Reason::Steady
            };
            if want == current {
                return d;
            }
        } else {
            d.reason = if want > current { Reason::ScaleUp } else { Reason::ScaleDown };
        }
        let cooling = self.last_action.is_some_and(|t| now_us.saturating_sub(t) < p.cooldown_us);
        if cooling && !(panic && want > current) && bounded == current {
            d.reason = Reason::Cooldown;
            return d;
        }
        // Step limits, then min/max.
        let up_limit = ceil(current as f64 * p.max_up_rate).max(current.saturating_add(p.max_step_up));
        let down_limit = ceil(current as f64 / p.max_down_rate);
        let want = want.clamp(down_limit.min(current), up_limit.max(current)).clamp(p.min_instances, p.max_instances);
        if want == current {
            d.reason = Reason::Bounded;
            return d;
        }
        d.desired = want;
        d.action = true;
        self.last_action = Some(now_us);
        d
    }
}

fn signal_at(i: usize) -> Signal {
    match i {
        0 => Signal::Utilization,
        1 => Signal::Rps,
        2 => Signal::Latency,
        3 => Signal::ErrorRate,
        4 => Signal::External,
        _ => Signal::Reported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Rng, XorShift64};

    const S: u64 = 1_000_000;

    fn util(capacity: f64) -> Params {
        Params { capacity, ..Params::default() }
    }

    fn inflight(current: u32, n: f64) -> Signals {
        let mut values = [f64::NAN; SIGNALS];
        values[0] = n;
        Signals { current, ready: current, values }
    }

    /// Runs ticks every 500 ms from `from` to `to` (µs), feeding `f(t)`; returns every decision with an action.
    fn run(sc: &mut Scaler, current: &mut u32, from: u64, to: u64, f: impl Fn(u64) -> f64) -> Vec<Decision> {
        let mut acts = Vec::new();
        let mut t = from;
        while t <= to {
            let d = sc.decide(t, &inflight(*current, f(t)));
            if d.action {
                *current = d.desired;
                acts.push(d);
            }
            t += S / 2;
        }
        acts
    }

    #[test]
    fn proportional_with_tolerance() {
        // capacity 10 at 70 %: 7 in flight per instance is on target.
        let mut sc = Scaler::new(Params { up_window_us: 0, ..util(10.0) });
        let d = sc.decide(0, &inflight(2, 15.0)); // ratio 15/14 = 1.07: inside the band
        assert_eq!((d.desired, d.reason, d.action), (2, Reason::Steady, false));
        let d = sc.decide(S, &inflight(2, 28.0)); // 2× target → ceil(28/7) = 4
        assert_eq!((d.desired, d.reason, d.action), (4, Reason::ScaleUp, true));
        assert_eq!(d.signal, Some(Signal::Utilization));
        assert!((d.value - 1.4).abs() < 1e-9 && d.target == 0.7, "{d:?}");
        assert_eq!(d.per_signal[0], 4);
    }

    #[test]
    fn max_over_signals_and_up_only_signals_abstain_below_target() {
        let mut p = Params { up_window_us: 0, ..util(10.0) };
        p.targets[Signal::Rps as usize].target = 100.0;
        p.targets[Signal::Latency as usize].target = 300_000.0;
        let mut sc = Scaler::new(p);
        let mut s = inflight(4, 14.0); // utilization says 2
        s.values[1] = 250.0; // 250 rps / 100 per instance: 3
        s.values[2] = 10_000.0; // far below the latency target: abstains (would say 1)
        let d = sc.decide(0, &s);
        assert_eq!(d.per_signal, [2, 3, 0, 0, 0, 0]);
        assert_eq!(d.recommendation, 3);
        s.values[2] = 600_000.0; // 2× latency target on 4 instances: 8
        let d = sc.decide(S, &s);
        assert_eq!((d.desired, d.signal), (8, Some(Signal::Latency)));
    }

    #[test]
    fn error_rate_pushes_up_and_external_scales_both_ways() {
        let mut p = Params { up_window_us: 0, down_window_us: 0, cooldown_us: 0, ..Params::default() };
        p.targets = [Target::OFF; SIGNALS];
        p.targets[Signal::ErrorRate as usize].target = 0.05;
        p.targets[Signal::External as usize].target = 10.0;
        let mut sc = Scaler::new(p);
        let mut values = [f64::NAN; SIGNALS];
        values[Signal::ErrorRate as usize] = 0.2; // 4x the target on 2 instances: 8 (panic; step limit +4)
        values[Signal::External as usize] = 20.0; // 2 instances' worth: on target, recommends the current 2
        let d = sc.decide(0, &Signals { current: 2, ready: 2, values });
        assert_eq!((d.per_signal[3], d.per_signal[4], d.desired, d.signal), (8, 2, 6, Some(Signal::ErrorRate)));
        values[Signal::ErrorRate as usize] = 0.0; // healthy: abstains; the external value alone decides
        values[Signal::External as usize] = 25.0;
        sc.panic_until = 0;
        let d = sc.decide(S, &Signals { current: 6, ready: 6, values });
        assert_eq!((d.per_signal[3], d.per_signal[4], d.desired), (0, 3, 3), "{d:?}");
    }

    #[test]
    fn reported_load_is_a_total_against_a_per_instance_target() {
        let mut p = Params { up_window_us: 0, down_window_us: 0, cooldown_us: 0, ..Params::default() };
        p.targets = [Target::OFF; SIGNALS];
        p.targets[Signal::Reported as usize].target = 2.0; // e.g. 2 queued requests per instance
        let mut sc = Scaler::new(p);
        let mut values = [f64::NAN; SIGNALS];
        values[Signal::Reported as usize] = 9.0; // 9 queued over 2 instances: ceil(9 / 2) = 5
        let d = sc.decide(0, &Signals { current: 2, ready: 2, values });
        assert_eq!((d.per_signal[5], d.desired, d.signal), (5, 5, Some(Signal::Reported)), "{d:?}");
        assert_eq!(d.value, 4.5, "per instance");
        values[Signal::Reported as usize] = f64::NAN; // no usable report: the signal abstains
        let d = sc.decide(S, &Signals { current: 5, ready: 5, values });
        assert_eq!(d.per_signal[5], 0);
    }

    #[test]
    fn a_signal_must_hold_for_its_hold_time() {
        let mut p = Params { up_window_us: 0, ..util(10.0) };
        p.targets[0].hold_us = 2 * S;
        let mut sc = Scaler::new(p);
        assert_eq!(sc.decide(0, &inflight(2, 28.0)).reason, Reason::Holding);
        assert_eq!(sc.decide(S, &inflight(2, 28.0)).reason, Reason::Holding);
        assert_eq!(sc.decide(S + S / 2, &inflight(2, 10.0)).reason, Reason::Steady); // back inside: resets
        assert_eq!(sc.decide(2 * S, &inflight(2, 28.0)).reason, Reason::Holding);
        let d = sc.decide(4 * S, &inflight(2, 28.0));
        assert_eq!((d.reason, d.desired), (Reason::ScaleUp, 4));
    }

    #[test]
    fn step_up_acts_after_the_up_window() {
        let mut sc = Scaler::new(util(10.0)); // up window 1 s
        let mut cur = 2;
        run(&mut sc, &mut cur, 0, 10 * S, |_| 10.0);
        let acts = run(&mut sc, &mut cur, 10 * S + S / 2, 20 * S, |_| 40.0); // 4× load on 2 instances
        // 40 / 7 → 6, but +100 % or +4 allows 6: one action, 1 s after the step.
        assert_eq!(acts.len(), 1, "{acts:?}");
        assert_eq!(acts[0].desired, 6);
        assert!(acts[0].now_us - 10 * S <= 2 * S, "acted {} µs after the step", acts[0].now_us - 10 * S);
    }

    #[test]
    fn panic_acts_at_once_and_blocks_scale_down() {
        let mut sc = Scaler::new(Params { up_window_us: 10 * S, ..util(10.0) });
        let d = sc.decide(0, &inflight(2, 70.0)); // wants 10 ≥ 2 × 2: panic, skip the 10 s up window
        assert!(d.panic && d.action && d.desired == 6, "{d:?}"); // step limit: +4
        let mut cur = d.desired;
        // Load vanishes: no scale-down while panicking, even with a 0 s down window.
        sc.params.down_window_us = 0;
        for t in 1..12 {
            let d = sc.decide(t * S / 2, &inflight(cur, 1.0));
            assert_eq!(d.reason, Reason::Panic, "{d:?}");
        }
        let d = sc.decide(7 * S, &inflight(cur, 1.0));
        assert!(!d.panic && d.action && d.desired == 3, "{d:?}"); // max scale-down rate 2×
        cur = d.desired;
        assert_eq!(cur, 3);
    }

    #[test]
    fn no_scale_down_before_the_stabilization_window_ends() {
        let mut sc = Scaler::new(Params { down_window_us: 30 * S, cooldown_us: 0, ..util(10.0) });
        let mut cur = 2;
        let acts = run(&mut sc, &mut cur, 0, 5 * S, |_| 28.0);
        assert_eq!(cur, 4, "{acts:?}");
        let acts = run(&mut sc, &mut cur, 5 * S + S / 2, 60 * S, |_| 7.0);
        assert_eq!(acts.len(), 2, "{acts:?}"); // 4 → 2 (2× rate) → 1
        // The last 4-recommendation was at 5 s: the first scale-down is after 35 s, not before.
        assert!(acts[0].now_us > 35 * S && acts[0].now_us <= 36 * S, "{acts:?}");
        assert_eq!((acts[0].desired, acts[1].desired), (2, 1));
        assert_eq!(acts[0].reason, Reason::ScaleDown);
    }

    #[test]
    fn no_scale_down_within_a_window_of_the_start() {
        let mut sc = Scaler::new(Params { down_window_us: 10 * S, cooldown_us: 0, ..util(10.0) });
        let mut cur = 4;
        let acts = run(&mut sc, &mut cur, 0, 20 * S, |_| 0.0);
        assert!(acts[0].now_us > 10 * S && acts[0].now_us <= 11 * S, "{acts:?}");
    }

    #[test]
    fn oscillating_load_does_not_flap() {
        let mut sc = Scaler::new(Params { down_window_us: 60 * S, ..util(10.0) });
        let mut cur = 4; // 28 in flight is on target; the load swings ±30 % every 2 s
        let acts = run(&mut sc, &mut cur, 0, 120 * S, |t| if (t / (2 * S)) % 2 == 0 { 36.0 } else { 20.0 });
        // At most one step up to cover the peaks, never back down while the swing goes on.
        assert!(acts.len() <= 1, "{acts:?}");
        assert!(acts.iter().all(|d| d.desired > d.current), "{acts:?}");
    }

    #[test]
    fn cooldown_spaces_actions() {
        let p = Params { up_window_us: 0, max_step_up: 1, max_up_rate: 1.0, panic_threshold: 1000.0, ..util(10.0) };
        let mut sc = Scaler::new(p);
        let mut cur = 2;
        let acts = run(&mut sc, &mut cur, 0, 12 * S, |_| 50.0); // wants 8; one instance per action
        let times: Vec<u64> = acts.iter().map(|d| d.now_us / (S / 2)).collect();
        assert_eq!(times, vec![0, 10, 20], "{acts:?}"); // every 5 s, one instance each
        assert!(acts.iter().all(|d| d.desired == d.current + 1));
        let d = sc.decide(12 * S + S / 2, &inflight(cur, 50.0));
        assert_eq!(d.reason, Reason::Cooldown);
    }

    #[test]
    fn min_and_max_bound_everything() {
        let mut sc = Scaler::new(Params { up_window_us: 0, min_instances: 3, max_instances: 5, ..util(10.0) });
        let d = sc.decide(0, &inflight(1, 0.0));
        assert_eq!((d.desired, d.action), (3, true)); // below min: go to min at once
        let d = sc.decide(S, &inflight(5, 1000.0));
        assert_eq!((d.desired, d.reason), (5, Reason::Bounded));
    }

    #[test]
    fn missing_data_abstains() {
        let mut sc = Scaler::new(util(10.0));
        let d = sc.decide(0, &inflight(3, f64::NAN));
        assert_eq!((d.desired, d.reason), (3, Reason::NoData));
    }

    #[test]
    fn forecast_scales_up_before_a_ramp_crosses_the_target() {
        // 100 rps per instance, 2 instances: the target total is 200 rps; the ramp climbs 10 rps/s from 100.
        let mk = |lead: u64| {
            let mut p = Params { forecast_lead_us: lead, min_instances: 2, ..Params::default() };
            p.targets = [Target::OFF; SIGNALS];
            p.targets[Signal::Rps as usize].target = 100.0;
            Scaler::new(p)
        };
        let first_up = |mut sc: Scaler| {
            let mut t = 0;
            while t < 60 * S {
                let mut values = [f64::NAN; SIGNALS];
                values[1] = 100.0 + 10.0 * t as f64 / S as f64;
                let d = sc.decide(t, &Signals { current: 2, ready: 2, values });
                if d.action {
                    return (t, values[1], d);
                }
                t += S / 2;
            }
            panic!("never scaled up");
        };
        let (t_plain, rps_plain, _) = first_up(mk(0));
        let (t_fc, rps_fc, d) = first_up(mk(10 * S));
        // Without a forecast: only once 200 × 1.1 is passed; with a 10 s lead: while still below the target.
        assert!(rps_plain > 220.0, "{rps_plain}");
        assert!(rps_fc < 200.0, "{rps_fc} at {t_fc}");
        assert!(t_fc + 5 * S < t_plain, "{t_fc} vs {t_plain}");
        assert!(d.forecast_rps > 220.0, "{d:?}");
    }

    #[test]
    fn holt_tracks_a_linear_trend() {
        let mut h = Holt::default();
        for i in 0..100u64 {
            h.update(i * S / 2, 50.0 + 4.0 * i as f64 / 2.0, 0.5, 0.3);
        }
        assert!((h.trend - 4.0).abs() < 0.01, "{h:?}");
        assert!((h.ahead(10.0) - (50.0 + 4.0 * 49.5 + 40.0)).abs() < 0.5, "{h:?}");
    }

    /// Properties over random loads and parameters: desired within min/max; each action within the step limits;
    /// no scale-down while panicking; no two actions closer than the cooldown unless a panic scales up; no scale-down
    /// while a higher recommendation is inside the scale-down window.
    #[test]
    fn properties_hold_for_random_loads() {
        let mut rng = XorShift64::new(42);
        for _ in 0..300 {
            let min = 1 + rng.below(3);
            let p = Params {
                min_instances: min,
                max_instances: min + rng.below(20),
                capacity: 1.0 + rng.below(20) as f64,
                up_window_us: rng.below(4) as u64 * S / 2,
                down_window_us: rng.below(20) as u64 * S,
                cooldown_us: rng.below(6) as u64 * S,
                max_step_up: rng.below(5),
                max_up_rate: 1.0 + rng.next_f64() * 2.0,
                max_down_rate: 1.0 + rng.next_f64() * 2.0,
                ..Params::default()
            };
            let mut sc = Scaler::new(p.clone());
            let mut cur = min;
            let mut last_action: Option<u64> = None;
            let mut recs: Vec<(u64, u32)> = Vec::new();
            for tick in 0..400u64 {
                let t = tick * S / 2;
                let load = rng.next_f64() * 200.0;
                let d = sc.decide(t, &inflight(cur, load));
                recs.push((t, d.recommendation));
                assert!(d.desired >= p.min_instances && d.desired <= p.max_instances, "{d:?} {p:?}");
                if d.action {
                    let up = ceil(cur as f64 * p.max_up_rate).max(cur + p.max_step_up);
                    let down = ceil(cur as f64 / p.max_down_rate);
                    assert!(d.desired <= up.max(p.min_instances), "{d:?} {p:?}");
                    assert!(d.desired >= down.min(p.max_instances), "{d:?} {p:?}");
                    if d.desired < cur {
                        assert!(!d.panic, "{d:?}");
                        let higher = recs.iter().any(|&(rt, r)| t - rt <= p.down_window_us && r >= cur);
                        assert!(!higher || cur > p.max_instances, "{d:?}");
                    }
                    if let Some(la) = last_action {
                        assert!(t - la >= p.cooldown_us || (d.panic && d.desired > cur), "{d:?} {p:?}");
                    }
                    last_action = Some(t);
                    cur = d.desired;
                } else {
                    assert_eq!(d.desired, cur);
                }
            }
        }
    }

    #[test]
    fn ceil_forgives_float_noise() {
        assert_eq!(ceil(2.0000000001), 2);
        assert_eq!(ceil(2.01), 3);
        assert_eq!(ceil(-1.0), 0);
        assert_eq!(ceil(f64::INFINITY), u32::MAX);
    }
}
