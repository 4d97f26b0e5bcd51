//! The library's own cost: the time spent inside its balancer and log calls, measured on one call in
//! [`SAMPLE_EVERY`] of each worker (two clock reads around it) and added up in shared memory, so that the Prometheus
//! exporter can show the mean time per call over all workers. The calls not timed pay one load, one store and a
//! branch.

use crate::{guard, REGION};
use std::ffi::c_int;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// Index of the balancer phase in the cost counters.
pub(crate) const BALANCER: usize = 0;
/// Index of the log phase in the cost counters.
pub(crate) const LOG: usize = 1;

/// One call in this many is timed.
const SAMPLE_EVERY: u32 = 64;

/// Calls of this worker so far, per phase (one counter for both would time only one phase when they alternate). Each
/// nginx worker is a single-threaded process with its own copy, so a load and a store (no atomic read-modify-write)
/// are enough.
static CALLS: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];

/// The library's own cost, summed over all workers since the region was created.
#[repr(C)]
pub struct autoscale_cost_t {
    /// Nanoseconds inside the balancer calls that were timed, and how many were.
    pub balancer_ns: u64,
    pub balancer_calls: u64,
    /// The same for the log calls.
    pub log_ns: u64,
    pub log_calls: u64,
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `f` inside [`guard`]; one call in [`SAMPLE_EVERY`] is timed and counted for `phase`.
#[inline(always)]
pub(crate) fn timed<F: FnOnce() -> c_int>(phase: usize, f: F) -> c_int {
    let n = CALLS[phase].load(Relaxed).wrapping_add(1);
    CALLS[phase].store(n, Relaxed);
    // One call of `guard` (so that it is inlined into the export), with the timing around it on sampled calls only.
    let sampled = n % SAMPLE_EVERY == 0;
    let start = if sampled { now_ns() } else { 0 };
    let rc = guard(f);
    if sampled {
        account(phase, now_ns().saturating_sub(start));
    }
    rc
}

/// Adds one timed call of `spent_ns` to the counters of `phase`.
#[cold]
#[inline(never)]
fn account(phase: usize, spent_ns: u64) {
    if let Some(region) = REGION.get() {
        let h = region.header();
        h.cost_ns[phase].fetch_add(spent_ns, Relaxed);
        h.cost_calls[phase].fetch_add(1, Relaxed);
    }
}

/// Fills `out` with the library's own cost so far (see [`autoscale_cost_t`]).
///
/// # Safety
/// `out` must point to a writable struct (or be NULL, which is refused).
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION` before `autoscale_region_init`; `AUTOSCALE_ERR_ARG` for NULL.
#[no_mangle]
pub unsafe extern "C" fn autoscale_cost_read(out: *mut autoscale_cost_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return crate::AUTOSCALE_ERR_NO_REGION };
        // SAFETY: the caller passes NULL or a pointer to a writable struct.
        let Some(out) = (unsafe { out.as_mut() }) else { return crate::AUTOSCALE_ERR_ARG };
        let h = region.header();
        *out = autoscale_cost_t {
            balancer_ns: h.cost_ns[BALANCER].load(Relaxed),
            balancer_calls: h.cost_calls[BALANCER].load(Relaxed),
            log_ns: h.cost_ns[LOG].load(Relaxed),
            log_calls: h.cost_calls[LOG].load(Relaxed),
        };
        crate::AUTOSCALE_OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_in_sample_every_is_timed_and_every_result_passes_through() {
        // No region in unit tests: timing is skipped, results and panics still go through the guard.
        let before = CALLS[BALANCER].load(Relaxed);
        for i in 0..(2 * SAMPLE_EVERY as c_int) {
            assert_eq!(timed(BALANCER, || i), i);
        }
        assert_eq!(CALLS[BALANCER].load(Relaxed).wrapping_sub(before), 2 * SAMPLE_EVERY);
        assert_eq!(timed(LOG, || panic!("boom")), crate::AUTOSCALE_ERR_PANIC);
        assert!(now_ns() > 0);
    }
}
