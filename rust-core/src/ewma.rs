//! Peak-EWMA latency estimate, as in Finagle's `PeakEwma` and tower's `load::peak_ewma`.
//!
//! A sample larger than the estimate replaces it at once (the "peak"), so a peer that slows down is avoided within one
//! request; a smaller sample is blended in with weight `1 - e^(-Δt/τ)`, where `Δt` is the time since the previous
//! update and `τ` the decay time (10 s by default), so the estimate forgets a peak over a few `τ`, independently of
//! the request rate. When a peer gets no traffic its estimate also decays towards zero as time passes (tower does the
//! same on read), which is how a peer that was expensive gets probed again.
//!
//! In shared memory the estimate and its time stamp live in one 64-bit word, updated with compare-and-swap, so that
//! concurrent updates from several workers are never torn: the high half is the estimate in µs as an `f32`, the low
//! half the time stamp in units of [`STAMP_UNIT_US`] (wrapping after ~76 h; elapsed times are computed with wrapping
//! arithmetic, so only an idle period longer than that is misjudged, and then only its decay).

/// Resolution of the packed time stamp.
pub const STAMP_UNIT_US: u64 = 64;
/// Largest estimate kept (µs), so that repeated failure penalties cannot overflow into infinity.
pub const MAX_ESTIMATE_US: f64 = 1.0e9;

/// Packs an estimate and a time.
#[inline]
pub fn pack(estimate_us: f64, now_us: u64) -> u64 {
    let est = if estimate_us.is_nan() {
        0.0
    } else {
        estimate_us.clamp(0.0, MAX_ESTIMATE_US)
    } as f32;
    ((est.to_bits() as u64) << 32) | ((now_us / STAMP_UNIT_US) as u32 as u64)
}

/// Unpacks `(estimate_us, elapsed_us_since_stamp)`.
#[inline]
pub fn unpack(word: u64, now_us: u64) -> (f64, f64) {
    let est = f32::from_bits((word >> 32) as u32) as f64;
    let stamp = word as u32;
    let now = (now_us / STAMP_UNIT_US) as u32;
    let elapsed = now.wrapping_sub(stamp);
    // A stamp "in the future" (a worker whose clock read raced ours) counts as no time passed.
    let elapsed = if elapsed > u32::MAX / 2 { 0 } else { elapsed };
    (est, elapsed as f64 * STAMP_UNIT_US as f64)
}

/// `e^(-x)` for `x >= 0`. Under load most calls see `x` below 10^-2 (under 100 ms against a 10 s decay), where
/// the Taylor series to the 5th power is exact to 1.4·10^-15 and costs a few instructions instead of a libm call.
#[inline]
pub fn exp_neg(x: f64) -> f64 {
    if x < 1e-2 {
        1.0 - x * (1.0 - x * 0.5 * (1.0 - x * (1.0 / 3.0) * (1.0 - x * 0.25 * (1.0 - x * 0.2))))
    } else {
        (-x).exp()
    }
}

/// The estimate decayed for `elapsed_us` without samples.
#[inline]
pub fn decayed(estimate_us: f64, elapsed_us: f64, decay_us: f64) -> f64 {
    if decay_us <= 0.0 {
        return estimate_us;
    }
    estimate_us * exp_neg(elapsed_us / decay_us)
}

/// The estimate after a sample of `rtt_us`, `elapsed_us` after the previous update, when `samples` samples were
/// observed before this one.
///
/// Warm-up: the weight kept by the old estimate is at most `samples / (samples + 1)`, so the first sample replaces
/// the seed and the first few behave like a running mean. Without it an estimate seeded at the default RTT (30 ms)
/// would take several decay times to reach a 0.3 ms peer.
#[inline]
pub fn observe(estimate_us: f64, elapsed_us: f64, rtt_us: f64, decay_us: f64, samples: u64) -> f64 {
    if rtt_us > estimate_us {
        return rtt_us.min(MAX_ESTIMATE_US);
    }
    let w = if decay_us <= 0.0 {
        0.0
    } else {
        exp_neg(elapsed_us / decay_us)
    };
    let w = w.min(samples as f64 / (samples as f64 + 1.0));
    estimate_us * w + rtt_us * (1.0 - w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_taken_at_once_and_forgotten_over_decay() {
        let tau = 10_000_000.0;
        let mut est = 1_000.0;
        est = observe(est, 1_000.0, 50_000.0, tau, 100);
        assert_eq!(est, 50_000.0);
        // 1,000 fast samples spread over 10 s: about 1 - e^-1 of the way back.
        for _ in 0..1000 {
            est = observe(est, 10_000.0, 1_000.0, tau, u64::MAX);
        }
        let expect = 1_000.0 + 49_000.0 * (-1.0f64).exp();
        assert!((est - expect).abs() / expect < 0.01, "{est} vs {expect}");
    }

    #[test]
    fn decay_does_not_depend_on_rate() {
        let tau = 10_000_000.0;
        let (mut a, mut b) = (10_000.0, 10_000.0);
        for _ in 0..10 {
            a = observe(a, 100_000.0, 100.0, tau, u64::MAX);
        }
        for _ in 0..1000 {
            b = observe(b, 1_000.0, 100.0, tau, u64::MAX);
        }
        assert!((a - b).abs() / a < 1e-9);
    }

    #[test]
    fn exp_neg_matches_libm() {
        let mut x = 0.0;
        while x < 50.0 {
            assert!(
                (exp_neg(x) - (-x).exp()).abs() <= 1e-12 * (-x).exp().max(1e-300),
                "{x}"
            );
            x = if x < 1e-2 { x + 1e-6 } else { x * 1.01 };
        }
    }

    #[test]
    fn first_sample_replaces_the_seed_then_running_mean() {
        let tau = 10_000_000.0;
        let est = observe(30_000.0, 0.0, 300.0, tau, 0);
        assert_eq!(est, 300.0);
        let est = observe(est, 0.0, 100.0, tau, 1);
        assert!((est - 200.0).abs() < 1e-9);
    }

    #[test]
    fn pack_roundtrip_and_wrap() {
        let now = 123_456_789_000u64;
        let (e, el) = unpack(pack(1234.5, now), now + 6400);
        assert!((e - 1234.5).abs() < 0.01);
        assert_eq!(el, 6400.0);
        // Stamp wrap: one unit past the 32-bit boundary is still one unit later.
        let t0 = (u32::MAX as u64) * STAMP_UNIT_US;
        let (_, el) = unpack(pack(1.0, t0), t0 + STAMP_UNIT_US);
        assert_eq!(el, STAMP_UNIT_US as f64);
        // A stamp from a racing clock read slightly ahead counts as zero.
        let (_, el) = unpack(pack(1.0, now + 640), now);
        assert_eq!(el, 0.0);
        assert_eq!(
            unpack(pack(f64::INFINITY, now), now).0,
            MAX_ESTIMATE_US as f32 as f64
        );
        assert_eq!(unpack(pack(f64::NAN, now), now).0, 0.0);
    }
}
