//! Slow start: a peer that just joined gets a growing share of its weight, as in Envoy's slow-start mode:
//! `factor = max(min_weight, (age / window)^(1 / aggression))` until `age >= window`, then 1.

/// Slow-start parameters of an upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// Ramp length in µs; 0 turns slow start off.
    pub window_us: u64,
    /// Envoy's `aggression`; 1.0 is a linear ramp, larger values ramp faster early.
    pub aggression: f64,
    /// Share of the weight a brand-new peer starts with (Envoy's `min_weight_percent`, default 10 %).
    pub min_weight: f64,
}

impl Default for SlowStart {
    fn default() -> Self {
        SlowStart {
            window_us: 10_000_000,
            aggression: 1.0,
            min_weight: 0.1,
        }
    }
}

impl SlowStart {
    /// Weight multiplier in `[min_weight, 1]` for a peer that joined `age_us` ago.
    #[inline]
    pub fn factor(&self, age_us: u64) -> f64 {
        if self.window_us == 0 || age_us >= self.window_us {
            return 1.0;
        }
        // Both are below the window here, which comes from a u32 of milliseconds: the signed conversions (cheaper
        // than unsigned ones) are exact.
        let t = age_us as i64 as f64 / self.window_us as i64 as f64;
        let f = if self.aggression == 1.0 {
            t
        } else {
            t.powf(1.0 / self.aggression)
        };
        f.max(self.min_weight).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_from_min_to_one() {
        let s = SlowStart::default();
        assert_eq!(s.factor(0), 0.1);
        assert!((s.factor(5_000_000) - 0.5).abs() < 1e-12);
        assert_eq!(s.factor(10_000_000), 1.0);
        assert_eq!(s.factor(u64::MAX), 1.0);
        let off = SlowStart { window_us: 0, ..s };
        assert_eq!(off.factor(0), 1.0);
        let fast = SlowStart {
            aggression: 2.0,
            ..s
        };
        assert!((fast.factor(2_500_000) - 0.5).abs() < 1e-12);
    }
}
