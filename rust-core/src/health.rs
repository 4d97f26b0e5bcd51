//! Outlier detection and the ejection lifecycle, after Envoy's outlier detection (defaults from its documentation):
//!
//! - consecutive failures of a kind eject a peer at once (5xx: 5; gateway errors incl. connect errors: 5;
//!   timeouts: 3 here, since each costs a full timeout);
//! - every `interval` (10 s), peers whose success rate is below `mean − 1.9·σ` of their upstream (with at least 5
//!   peers of at least 100 requests) are ejected, and, when enabled, peers failing at least 85 % of ≥ 50 requests;
//! - an ejection lasts `base × times ejected` (30 s, at most 300 s, plus optional jitter); at most 10 % of an
//!   upstream's peers are ejected at once, but always at least one;
//! - when the time is up the peer is *half-open*: a limited number of requests at once probe it; enough successes
//!   close it, one failure ejects it again for longer; the ejection count decays by one per quiet interval;
//! - when fewer than `panic_threshold` (50 %) of the peers are healthy the upstream is in *panic* and health is
//!   ignored (Envoy's panic mode): overloading the few survivors is worse than trying everyone.
//!
//! This module holds the pure parts (parameters, durations, the two statistical detectors); the state transitions on
//! shared memory are in `engine`.

use crate::rng::Rng;

/// Health of a peer (stored in shared memory).
pub mod state {
    /// Takes traffic.
    pub const HEALTHY: u32 = 0;
    /// Takes no traffic until its ejection time is up (or, when ejected by an active check, until it passes again).
    pub const EJECTED: u32 = 1;
    /// Takes a limited number of probe requests at once.
    pub const HALF_OPEN: u32 = 2;
    /// Set by an operator: takes no new requests, in-flight ones finish.
    pub const DRAINING: u32 = 3;

    /// Name used in status, metrics and events.
    pub fn name(s: u32) -> &'static str {
        match s {
            HEALTHY => "healthy",
            EJECTED => "ejected",
            HALF_OPEN => "half_open",
            DRAINING => "draining",
            _ => "unknown",
        }
    }
}

/// Why a peer changed state (stored in events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    Consecutive5xx = 1,
    ConsecutiveGateway = 2,
    ConsecutiveTimeout = 3,
    SuccessRate = 4,
    FailurePercentage = 5,
    HalfOpenFailure = 6,
    EjectionTimeUp = 7,
    HalfOpenSuccesses = 8,
    ActiveCheckFailed = 9,
    ActiveCheckPassed = 10,
    Operator = 11,
    HalfOpenTimeout = 12,
    /// The peer's own agent asked for it (`drain`, `maint`, `up`).
    Agent = 13,
}

impl Reason {
    /// Name used in events and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::ConsecutiveGateway => "consecutive_gateway_failures",
            Reason::ConsecutiveTimeout => "consecutive_timeouts",
            Reason::SuccessRate => "success_rate",
            Reason::FailurePercentage => "failure_percentage",
            Reason::HalfOpenFailure => "half_open_failure",
            Reason::EjectionTimeUp => "ejection_time_up",
            Reason::HalfOpenSuccesses => "half_open_successes",
            Reason::ActiveCheckFailed => "active_check_failed",
            Reason::ActiveCheckPassed => "active_check_passed",
            Reason::Operator => "operator",
            Reason::HalfOpenTimeout => "half_open_timeout",
            Reason::Agent => "agent",
        }
    }

    /// From the number stored in an event.
    pub fn from_u32(v: u32) -> Option<Reason> {
        use Reason::*;
        [
            Consecutive5xx,
            ConsecutiveGateway,
            ConsecutiveTimeout,
            SuccessRate,
            FailurePercentage,
            HalfOpenFailure,
            EjectionTimeUp,
            HalfOpenSuccesses,
            ActiveCheckFailed,
            ActiveCheckPassed,
            Operator,
            HalfOpenTimeout,
            Agent,
        ]
        .into_iter()
        .find(|r| *r as u32 == v)
    }
}

/// [`OutlierParams::probe_timeout_us`] of a base ejection time.
#[inline]
pub fn probe_timeout_us(base_ejection_us: u64) -> u64 {
    base_ejection_us.max(1_000_000)
}

/// Outlier-detection parameters of an upstream. A threshold of 0 switches its trigger off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierParams {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_timeout: u32,
    pub base_ejection_us: u64,
    pub max_ejection_us: u64,
    pub jitter_us: u64,
    pub max_ejection_percent: u32,
    pub interval_us: u64,
    /// Success-rate outliers: ejected below `mean − factor·σ`; 0 = off.
    pub success_rate_stdev: f64,
    pub success_rate_min_hosts: u32,
    pub success_rate_volume: u32,
    /// Failure-percentage outliers: ejected at or above this percentage; 0 = off.
    pub failure_percentage: u32,
    pub failure_percentage_min_hosts: u32,
    pub failure_percentage_volume: u32,
    /// Probe requests allowed at once to a half-open peer.
    pub half_open_probes: u32,
    /// Successful probes that close a half-open peer.
    pub half_open_successes: u32,
    /// Percentage of healthy peers below which the upstream is in panic; 0 = never.
    pub panic_threshold: u32,
}

impl Default for OutlierParams {
    fn default() -> Self {
        OutlierParams {
            consecutive_5xx: 5,
            consecutive_gateway: 5,
            consecutive_timeout: 3,
            base_ejection_us: 30_000_000,
            max_ejection_us: 300_000_000,
            jitter_us: 0,
            max_ejection_percent: 10,
            interval_us: 10_000_000,
            success_rate_stdev: 1.9,
            success_rate_min_hosts: 5,
            success_rate_volume: 100,
            failure_percentage: 0,
            failure_percentage_min_hosts: 5,
            failure_percentage_volume: 50,
            half_open_probes: 1,
            half_open_successes: 2,
            panic_threshold: 50,
        }
    }
}

impl OutlierParams {
    /// How long a half-open probe may take: one still in flight after this is taken as lost (a request that never
    /// reached its log phase, a killed worker) and its place is given to a new probe. The base ejection time, at
    /// least a second.
    pub fn probe_timeout_us(&self) -> u64 {
        probe_timeout_us(self.base_ejection_us)
    }

    /// How long the `times`-th ejection lasts (times ≥ 1): `base × times`, capped, plus uniform jitter.
    pub fn ejection_duration<R: Rng>(&self, times: u32, rng: &mut R) -> u64 {
        let d = self.base_ejection_us.saturating_mul(times.max(1) as u64).min(self.max_ejection_us.max(self.base_ejection_us));
        let jitter = if self.jitter_us > 0 { (rng.next_f64() * self.jitter_us as f64) as u64 } else { 0 };
        d + jitter
    }

    /// Whether one more peer may be ejected when `ejected` of `total` already are: at most `max_ejection_percent`,
    /// but always at least one.
    pub fn may_eject(&self, ejected: u32, total: u32) -> bool {
        let cap = (total as u64 * self.max_ejection_percent as u64 / 100).max(1);
        (ejected as u64) < cap
    }

    /// Whether `healthy` of `total` peers puts the upstream in panic.
    pub fn panic(&self, healthy: u32, total: u32) -> bool {
        total > 0 && (healthy as u64) * 100 < (total as u64) * self.panic_threshold as u64
    }
}

/// Requests and failures of one peer over the detection interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Volume {
    pub requests: u64,
    pub failures: u64,
}

/// Success-rate outliers as `(index, success rate, threshold)`: peers with at least `volume` requests whose success
/// rate is below [`success_rate_threshold`], when at least `min_hosts` peers have the volume (Envoy's algorithm).
pub fn success_rate_outliers(peers: &[Volume], factor: f64, min_hosts: u32, volume: u32) -> Vec<(usize, f64, f64)> {
    if factor <= 0.0 {
        return Vec::new();
    }
    let rates: Vec<(usize, f64)> = peers
        .iter()
        .enumerate()
        .filter(|(_, v)| v.requests >= volume.max(1) as u64)
        .map(|(i, v)| (i, 1.0 - v.failures as f64 / v.requests as f64))
        .collect();
    if rates.len() < min_hosts.max(1) as usize {
        return Vec::new();
    }
    let (mean, sd) = mean_and_stdev(&rates.iter().map(|r| r.1).collect::<Vec<_>>());
    rates
        .into_iter()
        .map(|(i, r)| (i, r, success_rate_threshold(mean, sd, factor, peers[i].requests)))
        .filter(|&(_, r, threshold)| r < threshold)
        .collect()
}

/// Mean and population standard deviation.
fn mean_and_stdev(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (mean, (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt())
}

/// The success rate below which a peer with `requests` requests is an outlier: `mean − factor·σ`, where σ is at
/// least the binomial standard error `√(mean·(1 − mean)/requests)`. Envoy uses the spread between peers alone, so
/// when every peer fails alike it can eject one for differences that sampling alone explains; the floor prevents it.
pub fn success_rate_threshold(mean: f64, sd: f64, factor: f64, requests: u64) -> f64 {
    let se = (mean * (1.0 - mean) / requests.max(1) as f64).max(0.0).sqrt();
    mean - factor * sd.max(se)
}

/// Indices of peers failing at least `percent` % of at least `volume` requests, when at least `min_hosts` peers
/// have the volume.
pub fn failure_percentage_outliers(peers: &[Volume], percent: u32, min_hosts: u32, volume: u32) -> Vec<usize> {
    if percent == 0 {
        return Vec::new();
    }
    let eligible: Vec<usize> = (0..peers.len()).filter(|&i| peers[i].requests >= volume.max(1) as u64).collect();
    if eligible.len() < min_hosts.max(1) as usize {
        return Vec::new();
    }
    eligible.into_iter().filter(|&i| peers[i].failures * 100 >= peers[i].requests * percent as u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::XorShift64;

    fn vol(requests: u64, failures: u64) -> Volume {
        Volume { requests, failures }
    }

    #[test]
    fn a_peer_failing_30_percent_among_healthy_ones_is_an_outlier() {
        let peers = [vol(1000, 5), vol(1000, 8), vol(1000, 2), vol(1000, 300), vol(1000, 6)];
        assert_eq!(success_rate_outliers(&peers, 1.9, 5, 100).iter().map(|o| o.0).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn nobody_is_an_outlier_when_all_fail_alike() {
        let peers = [vol(1000, 300), vol(1000, 310), vol(1000, 290), vol(1000, 305), vol(1000, 295)];
        assert!(success_rate_outliers(&peers, 1.9, 5, 100).is_empty());
        let peers = [vol(1000, 0); 5];
        assert!(success_rate_outliers(&peers, 1.9, 5, 100).is_empty());
    }

    #[test]
    fn sampling_noise_alone_ejects_nobody() {
        // Five peers failing exactly alike but for one request: the spread between them is tiny, so without the
        // binomial floor the lowest would sit "1.9 σ" below the mean.
        let peers = [vol(100, 30), vol(100, 30), vol(100, 30), vol(100, 30), vol(100, 31)];
        assert!(success_rate_outliers(&peers, 1.9, 5, 100).is_empty());
    }

    #[test]
    fn detectors_need_hosts_and_volume() {
        let peers = [vol(1000, 5), vol(1000, 8), vol(1000, 2), vol(1000, 300)];
        assert!(success_rate_outliers(&peers, 1.9, 5, 100).is_empty(), "only 4 hosts");
        let peers = [vol(99, 0), vol(1000, 8), vol(1000, 2), vol(1000, 300), vol(1000, 1)];
        assert!(success_rate_outliers(&peers, 1.9, 5, 100).is_empty(), "one host below volume");
        let peers = [vol(100, 90), vol(100, 0), vol(100, 0), vol(100, 84), vol(100, 0)];
        assert_eq!(failure_percentage_outliers(&peers, 85, 5, 50), vec![0]);
        assert!(failure_percentage_outliers(&peers, 0, 5, 50).is_empty(), "off");
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let p = OutlierParams::default();
        let mut rng = XorShift64::new(1);
        assert_eq!(p.ejection_duration(1, &mut rng), 30_000_000);
        assert_eq!(p.ejection_duration(3, &mut rng), 90_000_000);
        assert_eq!(p.ejection_duration(50, &mut rng), 300_000_000);
        let j = OutlierParams { jitter_us: 1_000_000, ..p };
        let d = j.ejection_duration(1, &mut rng);
        assert!((30_000_000..31_000_000).contains(&d));
    }

    #[test]
    fn at_most_ten_percent_but_always_one() {
        let p = OutlierParams::default();
        assert!(p.may_eject(0, 3));
        assert!(!p.may_eject(1, 3));
        assert!(p.may_eject(1, 20));
        assert!(!p.may_eject(2, 20));
        assert!(p.panic(1, 4));
        assert!(!p.panic(2, 4));
        assert!(!OutlierParams { panic_threshold: 0, ..p }.panic(0, 4));
    }
}
