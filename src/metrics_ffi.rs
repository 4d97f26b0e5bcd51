//! All-time latency histograms for the Prometheus exporter: the bounds of the `le` buckets and, per peer, the
//! cumulative counts at each bound (what a Prometheus histogram's `_bucket` series are). The counts are kept in
//! ranges by the library at no cost to requests: each window bucket's sketch is added to its peer's ranges when the
//! bucket is cleared (rust-core `window::LatencyTotals`).

use crate::{guard, AUTOSCALE_ERR_ARG, AUTOSCALE_ERR_NO_REGION, REGION};
use autoscale_core::window::{LE_BOUNDS_US, LE_RANGES};
use std::ffi::c_int;

/// Writes the upper bounds (seconds) of the latency buckets into `out` (at most `cap`) and returns how many there
/// are (the `+Inf` bucket is not among them).
///
/// # Safety
/// `out` must point to `cap` writable doubles (or be NULL with `cap` = 0).
#[no_mangle]
pub unsafe extern "C" fn autoscale_latency_bounds(out: *mut f64, cap: usize) -> c_int {
    guard(|| {
        if out.is_null() && cap > 0 {
            return AUTOSCALE_ERR_ARG;
        }
        for (i, b) in LE_BOUNDS_US.iter().enumerate().take(cap) {
            *out.add(i) = b / 1e6;
        }
        LE_BOUNDS_US.len() as c_int
    })
}

/// Writes into `out` (at most `cap`) the all-time number of attempts of peer record `slot` whose latency was at
/// most each bound of [`autoscale_latency_bounds`] (cumulative, as Prometheus `le` buckets; within the sketch's
/// 1.96 % resolution at each bound) and returns how many bounds there are.
///
/// # Safety
/// `out` must point to `cap` writable u64 (or be NULL with `cap` = 0).
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_ARG` (slot out of range, NULL buffer).
#[no_mangle]
pub unsafe extern "C" fn autoscale_peer_latency_buckets(slot: u32, out: *mut u64, cap: usize) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        if out.is_null() && cap > 0 {
            return AUTOSCALE_ERR_ARG;
        }
        let Some(ranges) = region.latency_ranges(slot) else {
            return AUTOSCALE_ERR_ARG;
        };
        let mut sum = 0u64;
        for (i, r) in ranges.iter().take(LE_RANGES - 1).enumerate() {
            sum += r;
            if i < cap {
                *out.add(i) = sum;
            }
        }
        (LE_RANGES - 1) as c_int
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_seconds_and_null_is_refused() {
        let mut b = [0.0f64; 16];
        let n = unsafe { autoscale_latency_bounds(b.as_mut_ptr(), b.len()) };
        assert_eq!(n as usize, LE_BOUNDS_US.len());
        assert_eq!(b[0], 0.001);
        assert_eq!(b[n as usize - 1], 10.0);
        assert_eq!(unsafe { autoscale_latency_bounds(std::ptr::null_mut(), 0) }, n);
        assert_eq!(unsafe { autoscale_latency_bounds(std::ptr::null_mut(), 3) }, AUTOSCALE_ERR_ARG);
    }
}
