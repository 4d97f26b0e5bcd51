//! C ABI of admission (`autoscale.admit`): concurrency limit, rate limits and priority classes of an upstream, over
//! the shared region (see `autoscale_core::admission`). The request path is `autoscale_admission_rate` and
//! `autoscale_admission_admit` in the access phase and `autoscale_admission_done` in the log phase; each worker
//! remembers its admitted requests in a fixed table of its own, so nothing allocates per request.

use crate::{bytes, column, guard, now_us, pid, write_err, AUTOSCALE_ERR_ARG, AUTOSCALE_ERR_NO_REGION, AUTOSCALE_ERR_UPSTREAM,
            AUTOSCALE_OK, REGION};
use autoscale_core::admission::{reason, AdmissionConf, Admitted, LimitParams, Tracker, CLASSES, RULES};
use autoscale_core::Region;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void};

/// `autoscale_admission_admit`/`_rate`: the request may go on.
pub const AUTOSCALE_ADMIT: c_int = 0;
/// `autoscale_admission_admit`/`_rate`: the request is over the limit.
pub const AUTOSCALE_SHED: c_int = 1;
/// `autoscale_admission_admit`: admission is off for this upstream.
pub const AUTOSCALE_ADMISSION_OFF: c_int = 2;

/// Admission settings of an upstream (times in milliseconds).
#[repr(C)]
pub struct autoscale_admission_spec_t {
    /// 0 fixed limit (`initial`), 1 gradient, 2 AIMD.
    pub algorithm: u32,
    pub min_rtt_requests: u32,
    pub min_rtt_interval_ms: u32,
    pub relax_after_ms: u32,
    pub interval_ms: u32,
    pub _pad: u32,
    pub min_limit: f64,
    pub max_limit: f64,
    pub initial_limit: f64,
    pub buffer: f64,
    pub min_concurrency: f64,
    pub backoff: f64,
    pub tolerance: f64,
    pub tighten: f64,
    /// Guaranteed share of the limit per class (class 0 the most important).
    pub shares: [f64; 4],
}

/// The admission state of an upstream.
#[repr(C)]
pub struct autoscale_admission_stats_t {
    pub limit: f64,
    pub min_rtt: f64,
    pub sample_rtt: f64,
    pub rate_factor: f64,
    pub inflight: i32,
    pub waiting: i32,
    pub measuring: u32,
    pub _pad: u32,
    pub class_inflight: [i32; 4],
    pub admitted: [u64; 4],
    /// Per class: shed for concurrency, for rate, after waiting in the queue.
    pub shed: [u64; 12],
    /// Per rate rule: requests that took the rule's shared overflow bucket (the bucket table had no room).
    pub rate_overflow: [u64; 8],
}

/// Admitted requests remembered per worker (more in flight at once in one worker evict the oldest).
const TRACKED: usize = 16384;

/// Requests of one worker waiting in an admission queue at once that are tracked (more are not counted).
const WAITERS: usize = 1024;

struct State {
    tracker: Tracker,
    claimed: bool,
    /// Requests of this worker counted as waiting (request address, upstream); `nwait` in use.
    waiters: Box<[(usize, u32); WAITERS]>,
    nwait: usize,
}

impl State {
    /// Forgets waiting request `req`, returning its upstream.
    fn unwait(&mut self, req: usize) -> Option<u32> {
        let i = self.waiters[..self.nwait].iter().position(|w| w.0 == req)?;
        let up = self.waiters[i].1;
        self.nwait -= 1;
        self.waiters[i] = self.waiters[self.nwait];
        Some(up)
    }
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// The worker's column for admission counts; the spare column past the last worker when it has none.
fn admission_column(region: &Region, st: &mut State) -> u32 {
    match column() {
        Some(c) => {
            if !st.claimed {
                region.admission_claim_column(c, pid());
                st.claimed = true;
            }
            c
        }
        None => region.params().max_workers,
    }
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        f(s.get_or_insert_with(|| State {
            tracker: Tracker::new(TRACKED),
            claimed: false,
            waiters: Box::new([(0, 0); WAITERS]),
            nwait: 0,
        }))
    })
}

fn region_and(upstream: u32) -> Result<&'static Region, c_int> {
    let region = REGION.get().ok_or(AUTOSCALE_ERR_NO_REGION)?;
    if upstream >= region.params().max_upstreams {
        return Err(AUTOSCALE_ERR_UPSTREAM);
    }
    Ok(region)
}

fn conf_of(s: &autoscale_admission_spec_t) -> Result<AdmissionConf, String> {
    let pos = |x: f64, name: &str, lo: f64, hi: f64| {
        if x.is_finite() && (lo..=hi).contains(&x) {
            Ok(x)
        } else {
            Err(format!("{name} must be between {lo} and {hi} (got {x})"))
        }
    };
    if s.algorithm > 2 {
        return Err(format!("algorithm must be 0, 1 or 2 (got {})", s.algorithm));
    }
    let min = pos(s.min_limit, "min_limit", 1.0, 1e6)?;
    let max = pos(s.max_limit, "max_limit", min, 1e6)?;
    let mut shares = [0.0; CLASSES];
    for (d, x) in shares.iter_mut().zip(s.shares) {
        *d = pos(x, "shares", 0.0, 1.0)?;
    }
    if shares.iter().sum::<f64>() > 1.0 + 1e-9 {
        return Err("the class shares must add up to at most 1".into());
    }
    Ok(AdmissionConf {
        algorithm: s.algorithm,
        limit: LimitParams {
            min,
            max,
            initial: pos(s.initial_limit, "initial_limit", min, max)?,
            buffer: pos(s.buffer, "buffer", 0.0, 10.0)?,
            min_rtt_interval_us: s.min_rtt_interval_ms as u64 * 1000,
            min_rtt_requests: s.min_rtt_requests.max(1) as u64,
            min_concurrency: pos(s.min_concurrency, "min_concurrency", 1.0, 1e6)?,
            backoff: pos(s.backoff, "backoff", 0.01, 1.0)?,
            tolerance: pos(s.tolerance, "tolerance", 1.0, 100.0)?,
        },
        shares,
        tighten: pos(s.tighten, "tighten", 0.0, 1.0)?,
        relax_after_us: s.relax_after_ms as u64 * 1000,
        interval_us: (s.interval_ms.max(1)) as u64 * 1000,
    })
}

/// Applies the admission settings of upstream `upstream` (in `init_by_lua`, after `autoscale_config_apply`).
///
/// # Safety
/// `spec` must be NULL or point to a readable struct; `err` must be NULL or point to `err_len` writable bytes.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM`, `AUTOSCALE_ERR_ARG` (with the reason in `err`).
#[no_mangle]
pub unsafe extern "C" fn autoscale_admission_configure(
    upstream: u32,
    spec: *const autoscale_admission_spec_t,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    guard(|| {
        let region = match region_and(upstream) {
            Ok(r) => r,
            Err(rc) => return rc,
        };
        // SAFETY: the caller passes NULL or a readable struct.
        let Some(spec) = (unsafe { spec.as_ref() }) else {
            region.admission_disable(upstream);
            return AUTOSCALE_OK;
        };
        match conf_of(spec) {
            Ok(c) => {
                region.admission_configure(upstream, &c, now_us());
                AUTOSCALE_OK
            }
            Err(msg) => {
                // SAFETY: as documented for `err`.
                unsafe { write_err(err, err_len, &msg) };
                AUTOSCALE_ERR_ARG
            }
        }
    })
}

/// Sets rate rule `rule` (< 8) of `upstream` to `rate` requests/s (0: inactive) with bucket size `burst`.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM`, `AUTOSCALE_ERR_ARG` for a rule number or values out of range.
#[no_mangle]
pub extern "C" fn autoscale_admission_rule(upstream: u32, rule: u32, rate: f64, burst: f64) -> c_int {
    guard(|| {
        let region = match region_and(upstream) {
            Ok(r) => r,
            Err(rc) => return rc,
        };
        if rule as usize >= RULES || !(rate >= 0.0 && rate.is_finite()) || !(1.0..=1e6).contains(&burst) {
            return AUTOSCALE_ERR_ARG;
        }
        region.admission_rule(upstream, rule as usize, rate, burst);
        AUTOSCALE_OK
    })
}

/// Takes a token of rate rule `rule` of `upstream` for `key`: `AUTOSCALE_ADMIT`, or `AUTOSCALE_SHED` with the seconds
/// until a token is there in `*retry_after`.
///
/// # Safety
/// `key` must point to `len` readable bytes (or be NULL with `len` 0); `retry_after` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoscale_admission_rate(
    upstream: u32,
    rule: u32,
    key: *const u8,
    len: usize,
    retry_after: *mut f64,
) -> c_int {
    guard(|| {
        let region = match region_and(upstream) {
            Ok(r) => r,
            Err(rc) => return rc,
        };
        // SAFETY: as documented for `key`.
        let Some(key) = (unsafe { bytes(key, len) }) else { return AUTOSCALE_ERR_ARG };
        match region.admission_rate(upstream, rule as usize, key, (now_us() / 1000) as u32) {
            Ok(()) => AUTOSCALE_ADMIT,
            Err(wait) => {
                // SAFETY: as documented for `retry_after`.
                if let Some(out) = unsafe { retry_after.as_mut() } {
                    *out = wait;
                }
                AUTOSCALE_SHED
            }
        }
    })
}

/// Admits request `req` (nginx's request pointer, a key only) of priority `class` on `upstream` if its concurrency
/// limit allows: `AUTOSCALE_ADMIT` (the request is counted until `autoscale_admission_done`), `AUTOSCALE_SHED` (not
/// counted; `*retry_after` says how many seconds to wait) or `AUTOSCALE_ADMISSION_OFF`.
///
/// # Safety
/// `retry_after` must be NULL or writable. `req` is not dereferenced.
#[no_mangle]
pub unsafe extern "C" fn autoscale_admission_admit(
    req: *const c_void,
    upstream: u32,
    class: u32,
    retry_after: *mut f64,
) -> c_int {
    guard(|| {
        let region = match region_and(upstream) {
            Ok(r) => r,
            Err(rc) => return rc,
        };
        if req.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        with_state(|st| {
            let col = admission_column(region, st);
            match region.admission_admit(upstream, class, col) {
                None => AUTOSCALE_ADMISSION_OFF,
                Some(true) => {
                    let a = Admitted { key: req as usize, upstream, class, column: col, start_us: now_us() };
                    st.tracker.insert(a, |old| region.admission_done(old, 0, false));
                    AUTOSCALE_ADMIT
                }
                Some(false) => {
                    // SAFETY: as documented for `retry_after`.
                    if let Some(out) = unsafe { retry_after.as_mut() } {
                        *out = region.admission_retry_after(upstream);
                    }
                    AUTOSCALE_SHED
                }
            }
        })
    })
}

/// Counts a request of `class` on `upstream` as shed for `why` (0 concurrency, 1 rate, 2 queue timeout).
#[no_mangle]
pub extern "C" fn autoscale_admission_shed(upstream: u32, class: u32, why: u32) -> c_int {
    guard(|| match region_and(upstream) {
        Ok(region) if (why as usize) < reason::N => {
            region.admission_shed(upstream, class, why as usize);
            AUTOSCALE_OK
        }
        Ok(_) => AUTOSCALE_ERR_ARG,
        Err(rc) => rc,
    })
}

/// Counts request `req` as waiting in the admission queue of `upstream` (`delta` > 0) or no longer (`delta` < 0).
/// A request still counted when its log phase ends it (its Lua thread was aborted during the wait) is uncounted
/// there, and what a dead worker left counted is released with its column.
#[no_mangle]
pub extern "C" fn autoscale_admission_wait(req: *const c_void, upstream: u32, delta: c_int) -> c_int {
    guard(|| match region_and(upstream) {
        Ok(region) => with_state(|st| {
            let col = admission_column(region, st);
            if delta > 0 && st.nwait < WAITERS && !st.waiters[..st.nwait].iter().any(|w| w.0 == req as usize) {
                st.waiters[st.nwait] = (req as usize, upstream);
                st.nwait += 1;
                region.admission_wait(upstream, col, 1);
            } else if delta < 0 {
                // Uncounted where it was counted: a call naming another upstream must not move both counts.
                if let Some(up) = st.unwait(req as usize) {
                    region.admission_wait(up, col, -1);
                }
            }
            AUTOSCALE_OK
        }),
        Err(rc) => rc,
    })
}

/// Ends admitted request `req` in the log phase with response `status` (499: the client went away, its time is
/// not a latency sample). A request that was not admitted is ignored.
#[no_mangle]
pub extern "C" fn autoscale_admission_done(req: *const c_void, status: c_int) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        with_state(|st| {
            if st.nwait > 0 {
                if let Some(up) = st.unwait(req as usize) {
                    let col = admission_column(region, st);
                    region.admission_wait(up, col, -1);
                }
            }
            if let Some(e) = st.tracker.remove(req as usize) {
                region.admission_done(&e, now_us().saturating_sub(e.start_us), status != 499);
            }
            AUTOSCALE_OK
        })
    })
}

/// Periodic update of `upstream`'s limit and rate factor (`pending` non-zero while a scale-up is awaited); call it
/// from a timer in every worker, one call per interval does the work.
#[no_mangle]
pub extern "C" fn autoscale_admission_update(upstream: u32, pending: c_int) -> c_int {
    guard(|| match region_and(upstream) {
        Ok(region) => {
            region.admission_update(upstream, now_us(), pending != 0);
            AUTOSCALE_OK
        }
        Err(rc) => rc,
    })
}

/// Fills `out` with the admission state of `upstream` (times in seconds).
///
/// # Safety
/// `out` must be NULL (refused) or writable.
#[no_mangle]
pub unsafe extern "C" fn autoscale_admission_stats(upstream: u32, out: *mut autoscale_admission_stats_t) -> c_int {
    guard(|| {
        let region = match region_and(upstream) {
            Ok(r) => r,
            Err(rc) => return rc,
        };
        // SAFETY: the caller passes NULL or a writable struct.
        let Some(out) = (unsafe { out.as_mut() }) else { return AUTOSCALE_ERR_ARG };
        let s = region.admission_stats(upstream);
        *out = autoscale_admission_stats_t {
            limit: s.limit,
            min_rtt: s.min_rtt_us / 1e6,
            sample_rtt: s.sample_us / 1e6,
            rate_factor: s.rate_factor,
            inflight: s.inflight,
            waiting: s.waiting,
            measuring: s.measuring as u32,
            _pad: 0,
            class_inflight: s.class_inflight,
            admitted: s.admitted,
            shed: std::array::from_fn(|i| s.shed[i / reason::N][i % reason::N]),
            rate_overflow: s.rate_overflow,
        };
        AUTOSCALE_OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> autoscale_admission_spec_t {
        autoscale_admission_spec_t {
            algorithm: 1, min_rtt_requests: 50, min_rtt_interval_ms: 60_000, relax_after_ms: 10_000, interval_ms: 100,
            _pad: 0, min_limit: 3.0, max_limit: 1000.0, initial_limit: 20.0, buffer: 0.25, min_concurrency: 3.0,
            backoff: 0.9, tolerance: 1.5, tighten: 0.5, shares: [0.5, 0.0, 0.0, 0.0],
        }
    }

    #[test]
    fn hostile_settings_are_refused_with_a_reason() {
        assert!(conf_of(&spec()).is_ok());
        for bad in [
            autoscale_admission_spec_t { algorithm: 7, ..spec() },
            autoscale_admission_spec_t { min_limit: f64::NAN, ..spec() },
            autoscale_admission_spec_t { max_limit: 1.0, ..spec() },
            autoscale_admission_spec_t { initial_limit: 1e9, ..spec() },
            autoscale_admission_spec_t { shares: [0.6, 0.6, 0.0, 0.0], ..spec() },
            autoscale_admission_spec_t { tighten: -1.0, ..spec() },
        ] {
            assert!(conf_of(&bad).is_err());
        }
    }
}
