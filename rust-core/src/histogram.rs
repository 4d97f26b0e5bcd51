//! Logarithmic latency buckets with a bounded relative error.
//!
//! The mapping is the one of DDSketch (Masson, Rim, Lee: "DDSketch: a fast and fully-mergeable quantile sketch with
//! relative-error guarantees", VLDB 2019): bucket `k` holds values in `(γ^(k-1), γ^k]` and is represented by
//! `2·γ^k / (γ + 1)`, so any value in the bucket is reported within a relative error `α = (γ - 1) / (γ + 1)`.
//! With `γ = 1.04`, `α ≈ 1.96 %`, which is the error this crate promises for p50/p90/p99.
//!
//! Values are microseconds. Bucket 0 holds everything up to 1 µs (including 0); the last bucket holds everything from
//! [`MAX_US`] up (about 114 s), where the error bound no longer applies. Counts are merged by plain addition, which is
//! what makes the rolling window (sum of per-second sketches) exact in count.

/// Bucket growth factor γ.
pub const GAMMA: f64 = 1.04;
/// Guaranteed relative error of a quantile for values in `[1 µs, MAX_US)`.
pub const RELATIVE_ERROR: f64 = (GAMMA - 1.0) / (GAMMA + 1.0);
/// Number of buckets of one sketch.
pub const BUCKETS: usize = 475;
/// Smallest value (µs) that falls in the last, unbounded bucket: `γ^(BUCKETS - 2)`.
pub const MAX_US: f64 = 113_964_473.0;

#[cfg(test)]
const LN_GAMMA: f64 = 0.039_220_713_153_281_3; // ln(1.04)
const INV_LOG2_GAMMA: f64 = 17.672_987_685_172_7; // 1 / log2(1.04)

/// `γ^k` for every bucket: the upper bound of bucket `k` (the last bucket's is infinite, see [`bucket_upper`]).
/// Computed by repeated multiplication at compile time; its rounding (below 10^-13 relative) is far inside the error.
const BOUNDS_TABLE: [f64; BUCKETS] = {
    let mut b = [0.0; BUCKETS];
    let mut v = 1.0;
    let mut k = 0;
    while k < BUCKETS {
        b[k] = v;
        v *= GAMMA;
        k += 1;
    }
    b
};
static BOUNDS: [f64; BUCKETS] = BOUNDS_TABLE;

/// Index of the bucket holding `us` microseconds. Total: NaN, negatives and 0 map to bucket 0, huge values to the last.
///
/// No logarithm call: a guess from the float's exponent and a quadratic fit of `log2` of its mantissa (within 0.1
/// bucket), corrected by comparison with [`BOUNDS`], so the result is exact for the table.
#[inline]
pub fn bucket_index(us: f64) -> usize {
    if us.is_nan() || us <= 1.0 {
        return 0;
    }
    if us > BOUNDS[BUCKETS - 2] {
        return BUCKETS - 1;
    }
    let bits = us.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023; // us > 1: a normal number with exponent >= 0
    let m = f64::from_bits((bits & ((1 << 52) - 1)) | 0x3ff0_0000_0000_0000) - 1.0;
    let log2 = exponent as f64 + m + 0.346_607 * m * (1.0 - m);
    // log2 >= 0 here (us > 1) and far below i64::MAX: a signed conversion is exact and cheaper than an unsigned one.
    settle(((log2 * INV_LOG2_GAMMA) as i64 + 1) as usize, us)
}

/// The bucket of `us` (in `(1, BOUNDS[BUCKETS - 2]]`) from a guess near it, by comparison with [`BOUNDS`]: exact for
/// the table whatever the guess.
#[inline(always)]
fn settle(guess: usize, us: f64) -> usize {
    let mut k = guess.clamp(1, BUCKETS - 2);
    while k > 1 && us <= BOUNDS[k - 1] {
        k -= 1;
    }
    while us > BOUNDS[k] {
        k += 1;
    }
    k
}

/// Sub-ranges per power of two in [`GUESS`].
const GUESS_BITS: u32 = 4;

/// For an integer with its highest set bit at `e` and the next [`GUESS_BITS`] bits `m`, at row `e << GUESS_BITS | m`:
/// the bucket of the smallest such integer, `2^e · (1 + m / 16)` (clamped to `1..=BUCKETS - 2`). The integers of one
/// row span a ratio of at most 17/16 < γ², so a row's guess is at most two buckets below the right one.
static GUESS: [u16; 64 << GUESS_BITS] = {
    let mut g = [0u16; 64 << GUESS_BITS];
    let mut k = 1; // rows are in increasing order of their lower end, so the bucket only moves up
    let mut row = 0;
    while row < g.len() {
        let e = (row >> GUESS_BITS) as i32;
        let m = (row & ((1 << GUESS_BITS) - 1)) as f64;
        let mut low = 1.0;
        let mut i = 0;
        while i < e {
            low *= 2.0;
            i += 1;
        }
        low *= 1.0 + m / (1 << GUESS_BITS) as f64;
        while k < BUCKETS - 2 && low > BOUNDS_TABLE[k] {
            k += 1;
        }
        g[row] = k as u16;
        row += 1;
    }
    g
};

/// [`bucket_index`] of a whole number of microseconds (`bucket_index(us as f64)`, the same result), the first guess
/// taken from [`GUESS`] by the highest bits instead of a logarithm.
#[inline]
pub fn bucket_index_us(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    if us as f64 > BOUNDS[BUCKETS - 2] {
        return BUCKETS - 1;
    }
    let x = us as i64 as f64; // below MAX_US here: exact, and cheaper than the unsigned conversion
    let e = 63 - us.leading_zeros(); // >= 1, and < 27 below MAX_US
    let m = if e >= GUESS_BITS { (us >> (e - GUESS_BITS)) as usize } else { (us << (GUESS_BITS - e)) as usize };
    settle(GUESS[((e as usize) << GUESS_BITS) | (m & ((1 << GUESS_BITS) - 1))] as usize, x)
}

/// Value (µs) reported for bucket `k`: the point of `(γ^(k-1), γ^k]` with the smallest worst-case relative error.
#[inline]
pub const fn bucket_value(k: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    let k = if k < BUCKETS { k } else { BUCKETS - 1 };
    2.0 * BOUNDS_TABLE[k] / (GAMMA + 1.0)
}

/// Upper bound (µs) of bucket `k`, used for cumulative ("le") histogram buckets.
#[inline]
pub fn bucket_upper(k: usize) -> f64 {
    if k + 1 >= BUCKETS {
        return f64::INFINITY;
    }
    BOUNDS[k]
}

/// The `q`-quantile (0 ≤ q ≤ 1) of the counts, in µs, or `None` when there are no samples.
///
/// The rank is `⌊q·(n-1)⌋` (0-based) over the sorted samples, the lower "nearest rank" definition; the result is within
/// [`RELATIVE_ERROR`] of the sample at that rank.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
    let rank = (q * (total - 1) as f64).floor() as u64;
    let mut seen = 0u64;
    for (k, &c) in counts.iter().enumerate() {
        seen += c;
        if seen > rank {
            return Some(bucket_value(k));
        }
    }
    Some(bucket_value(counts.len().saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Rng, XorShift64};

    #[test]
    fn constants_agree() {
        assert!((LN_GAMMA - GAMMA.ln()).abs() < 1e-15);
        let max = GAMMA.powi(BUCKETS as i32 - 2);
        assert!(
            (max - MAX_US).abs() / MAX_US < 1e-6,
            "MAX_US should be {max}"
        );
        assert!(RELATIVE_ERROR < 0.02);
    }

    #[test]
    fn integer_index_matches_the_float_index() {
        let check = |us: u64| assert_eq!(bucket_index_us(us), bucket_index(us as f64), "us={us}");
        for us in 0..200_000 {
            check(us);
        }
        for k in 0..BUCKETS {
            let b = bucket_upper(k);
            if b.is_finite() {
                let b = b as u64;
                for us in b.saturating_sub(2)..=b + 2 {
                    check(us);
                }
            }
        }
        let mut rng = XorShift64::new(17);
        for _ in 0..200_000 {
            let bits = rng.below(64);
            check(rng.next_u64() >> bits);
        }
        for us in [u64::MAX, u64::MAX / 2, 1 << 53, (1 << 53) + 1, MAX_US as u64, MAX_US as u64 + 1] {
            check(us);
        }
    }

    #[test]
    fn index_is_total_and_monotonic() {
        for v in [
            f64::NAN,
            -1.0,
            0.0,
            0.5,
            1.0,
            f64::INFINITY,
            f64::MAX,
            1e300,
        ] {
            assert!(bucket_index(v) < BUCKETS);
        }
        let mut last = 0;
        let mut v = 0.25;
        while v < 1e9 {
            let k = bucket_index(v);
            assert!(k >= last);
            last = k;
            v *= 1.003;
        }
    }

    /// The table-driven index equals the definition `ceil(log_γ(us))` wherever rounding cannot decide it.
    #[test]
    fn index_matches_the_logarithm() {
        let mut rng = XorShift64::new(7);
        for _ in 0..1_000_000 {
            let us = (rng.next_f64() * 19.0).exp();
            let x = us.ln() / LN_GAMMA;
            if (x - x.round()).abs() < 1e-9 {
                continue; // on a boundary: either side is right
            }
            let want = (x.ceil() as usize).min(BUCKETS - 1);
            assert_eq!(bucket_index(us), want, "us={us}");
        }
        for k in 1..BUCKETS - 1 {
            assert_eq!(bucket_index(bucket_upper(k)), k);
            assert_eq!(bucket_index(bucket_upper(k) * (1.0 + 1e-12)), k + 1);
        }
    }

    #[test]
    fn every_value_is_represented_within_the_error() {
        let mut v = 1.0001;
        while v < MAX_US {
            let rep = bucket_value(bucket_index(v));
            assert!(
                (rep - v).abs() / v <= RELATIVE_ERROR + 1e-12,
                "v={v} rep={rep}"
            );
            v *= 1.0007;
        }
    }

    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    /// Property: for random sample sets of several shapes, p50/p90/p99/p99.9 are within the stated relative error.
    #[test]
    fn quantiles_within_stated_error() {
        let mut rng = XorShift64::new(42);
        for case in 0..400 {
            let n = 1 + (rng.next_u64() % 5000) as usize;
            let shape = case % 4;
            let mut samples: Vec<f64> = (0..n)
                .map(|_| {
                    let u = rng.next_f64();
                    match shape {
                        0 => 1.0 + u * 1_000_000.0,             // uniform up to 1 s
                        1 => (u * 17.0).exp(),                  // log-uniform 1 µs .. 24 s
                        2 => 200.0 + (-(1.0 - u).ln()) * 800.0, // exponential tail
                        _ => {
                            if u < 0.99 {
                                500.0
                            } else {
                                60_000.0
                            }
                        } // bimodal: 1 % slow
                    }
                })
                .collect();
            let mut counts = vec![0u64; BUCKETS];
            for &s in &samples {
                counts[bucket_index(s)] += 1;
            }
            samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
            for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
                let want = exact(&samples, q);
                let got = quantile(&counts, q).unwrap();
                let err = (got - want).abs() / want;
                assert!(
                    err <= RELATIVE_ERROR + 1e-12,
                    "case {case} q={q} want={want} got={got} err={err}"
                );
            }
        }
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
    }
}
