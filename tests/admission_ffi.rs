//! The admission exports under wrong and hostile input: codes, never a panic; a request is counted from admit to
//! done exactly once, whatever order the calls come in. (Own test binary: one process-wide region.)

use resty_autoscale::admission_ffi::*;
use resty_autoscale::*;
use std::ffi::c_void;
use std::ptr::{null, null_mut};

#[path = "common/counting.rs"]
mod counting;
use counting::allocations;

/// The region is process-wide: tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn init() {
    let p = autoscale_region_params_t { max_upstreams: 4, max_peers: 8, max_workers: 4, window_buckets: 10, bucket_ms: 1000, rate_slots: 4096 };
    let mut err = [0 as std::ffi::c_char; 256];
    assert_eq!(unsafe { autoscale_region_init(&p, err.as_mut_ptr(), err.len()) }, AUTOSCALE_OK);
}

fn spec() -> autoscale_admission_spec_t {
    autoscale_admission_spec_t {
        algorithm: 0, min_rtt_requests: 50, min_rtt_interval_ms: 60_000, relax_after_ms: 10_000, interval_ms: 100,
        _pad: 0, min_limit: 1.0, max_limit: 1000.0, initial_limit: 3.0, buffer: 0.25, min_concurrency: 3.0,
        backoff: 0.9, tolerance: 1.5, tighten: 0.5, shares: [0.0; 4],
    }
}

fn req(i: usize) -> *const c_void {
    (0x10_0000 + i * 64) as *const c_void
}

#[test]
fn hostile_calls_get_codes_and_counts_stay_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let mut err = [0 as std::ffi::c_char; 128];
    let mut retry = 0.0f64;
    let mut st: autoscale_admission_stats_t = unsafe { std::mem::zeroed() };
    unsafe {
        assert_eq!(autoscale_admission_configure(99, &spec(), err.as_mut_ptr(), err.len()), AUTOSCALE_ERR_UPSTREAM);
        let bad = autoscale_admission_spec_t { max_limit: f64::NAN, ..spec() };
        assert_eq!(autoscale_admission_configure(1, &bad, err.as_mut_ptr(), err.len()), AUTOSCALE_ERR_ARG);
        assert!(std::ffi::CStr::from_ptr(err.as_ptr()).to_string_lossy().contains("max_limit"));
        assert_eq!(autoscale_admission_configure(1, &bad, null_mut(), 0), AUTOSCALE_ERR_ARG, "no error buffer");
        assert_eq!(autoscale_admission_admit(req(0), 1, 0, &mut retry), AUTOSCALE_ADMISSION_OFF);
        assert_eq!(autoscale_admission_configure(1, &spec(), err.as_mut_ptr(), err.len()), AUTOSCALE_OK);
        assert_eq!(autoscale_admission_admit(null(), 1, 0, &mut retry), AUTOSCALE_ERR_ARG);
        assert_eq!(autoscale_admission_admit(req(0), u32::MAX, 0, &mut retry), AUTOSCALE_ERR_UPSTREAM);
        // Fixed limit 3: three in (any class number; out of range is the least important), the fourth of the least
        // important class shed with a Retry-After.
        for i in 0..3 {
            assert_eq!(autoscale_admission_admit(req(i), 1, [0, 7, u32::MAX][i], null_mut()), AUTOSCALE_ADMIT);
        }
        assert_eq!(autoscale_admission_admit(req(3), 1, 3, &mut retry), AUTOSCALE_SHED);
        assert!(retry >= 1.0);
        assert_eq!(autoscale_admission_shed(1, 0, 0), AUTOSCALE_OK);
        assert_eq!(autoscale_admission_shed(1, 0, 99), AUTOSCALE_ERR_ARG);
        // Done twice, done for an unknown request, done with a null request: each admitted request ends once.
        for r in [req(0), req(0), req(42), null()] {
            assert_eq!(autoscale_admission_done(r, 200), AUTOSCALE_OK);
        }
        assert_eq!(autoscale_admission_stats(1, &mut st), AUTOSCALE_OK);
        assert_eq!(st.inflight, 2);
        // The same request admitted again before its log phase (a reused request object) replaces its entry.
        assert_eq!(autoscale_admission_admit(req(1), 1, 0, null_mut()), AUTOSCALE_ADMIT);
        assert_eq!(autoscale_admission_stats(1, &mut st), AUTOSCALE_OK);
        assert_eq!(st.inflight, 2);
        assert_eq!(autoscale_admission_done(req(1), 499), AUTOSCALE_OK);
        assert_eq!(autoscale_admission_done(req(2), 200), AUTOSCALE_OK);
        assert_eq!(autoscale_admission_stats(1, &mut st), AUTOSCALE_OK);
        assert_eq!((st.inflight, st.shed[0]), (0, 1));
        assert_eq!(autoscale_admission_stats(1, null_mut()), AUTOSCALE_ERR_ARG);
        // Rate rules: bad numbers refused, an inactive rule lets through, keys of any bytes.
        assert_eq!(autoscale_admission_rule(1, 8, 1.0, 1.0), AUTOSCALE_ERR_ARG);
        assert_eq!(autoscale_admission_rule(1, 0, f64::NAN, 1.0), AUTOSCALE_ERR_ARG);
        assert_eq!(autoscale_admission_rule(1, 0, 1.0, 0.5), AUTOSCALE_ERR_ARG);
        assert_eq!(autoscale_admission_rate(1, 0, b"k".as_ptr(), 1, &mut retry), AUTOSCALE_ADMIT);
        assert_eq!(autoscale_admission_rule(1, 0, 1.0, 2.0), AUTOSCALE_OK);
        let key = [0xffu8, 0, 0xfe];
        assert_eq!(autoscale_admission_rate(1, 0, key.as_ptr(), key.len(), null_mut()), AUTOSCALE_ADMIT);
        assert_eq!(autoscale_admission_rate(1, 0, key.as_ptr(), key.len(), null_mut()), AUTOSCALE_ADMIT);
        assert_eq!(autoscale_admission_rate(1, 0, key.as_ptr(), key.len(), &mut retry), AUTOSCALE_SHED);
        assert!(retry > 0.0 && retry <= 1.0);
        assert_eq!(autoscale_admission_rate(1, 0, null(), 3, null_mut()), AUTOSCALE_ERR_ARG);
        assert_eq!(autoscale_admission_rate(1, u32::MAX, null(), 0, null_mut()), AUTOSCALE_ADMIT);
        assert_eq!(autoscale_admission_wait(std::ptr::null(), 9, 1), AUTOSCALE_ERR_UPSTREAM);
        assert_eq!(autoscale_admission_update(9, 1), AUTOSCALE_ERR_UPSTREAM);
        assert_eq!(autoscale_admission_update(1, 1), AUTOSCALE_OK);
        assert_eq!(autoscale_admission_configure(1, null(), null_mut(), 0), AUTOSCALE_OK, "NULL turns admission off");
        assert_eq!(autoscale_admission_admit(req(5), 1, 0, null_mut()), AUTOSCALE_ADMISSION_OFF);
    }
}

#[test]
fn admit_rate_and_done_allocate_nothing_once_warm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let gradient = autoscale_admission_spec_t { algorithm: 1, initial_limit: 100.0, min_concurrency: 100.0, ..spec() };
    let mut err = [0 as std::ffi::c_char; 128];
    unsafe {
        assert_eq!(autoscale_admission_configure(2, &gradient, err.as_mut_ptr(), err.len()), AUTOSCALE_OK);
        assert_eq!(autoscale_admission_rule(2, 0, 1e6, 1e6), AUTOSCALE_OK);
        autoscale_admission_admit(req(0), 2, 0, null_mut()); // the worker's table is made on first use
        autoscale_admission_done(req(0), 200);
        let before = allocations();
        for i in 0..1000 {
            assert_eq!(autoscale_admission_rate(2, 0, b"1.2.3.4".as_ptr(), 7, null_mut()), AUTOSCALE_ADMIT);
            assert_eq!(autoscale_admission_admit(req(i), 2, (i % 4) as u32, null_mut()), AUTOSCALE_ADMIT);
            assert_eq!(autoscale_admission_done(req(i), 200), AUTOSCALE_OK);
            autoscale_admission_update(2, 0);
        }
        assert_eq!(allocations() - before, 0);
    }
}

#[test]
fn a_request_aborted_during_its_queue_wait_is_uncounted_by_its_log_phase() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let mut err = [0 as std::ffi::c_char; 128];
    let mut st: autoscale_admission_stats_t = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { autoscale_admission_configure(2, &spec(), err.as_mut_ptr(), err.len()) }, AUTOSCALE_OK);
    let waiting = |st: &mut autoscale_admission_stats_t| {
        assert_eq!(unsafe { autoscale_admission_stats(2, st) }, AUTOSCALE_OK);
        st.waiting
    };
    assert_eq!(autoscale_admission_wait(req(40), 2, 1), AUTOSCALE_OK);
    assert_eq!(autoscale_admission_wait(req(40), 2, 1), AUTOSCALE_OK, "counted once");
    assert_eq!(autoscale_admission_wait(req(41), 2, 1), AUTOSCALE_OK);
    assert_eq!(waiting(&mut st), 2);
    assert_eq!(autoscale_admission_wait(req(41), 2, -1), AUTOSCALE_OK);
    assert_eq!(autoscale_admission_wait(req(41), 2, -1), AUTOSCALE_OK, "uncounted once");
    assert_eq!(waiting(&mut st), 1);
    // req 40's Lua thread was aborted in the wait (client gone): only its log phase runs.
    assert_eq!(autoscale_admission_done(req(40), 499), AUTOSCALE_OK);
    assert_eq!(waiting(&mut st), 0, "Retry-After no longer counts it");
}

/// Found by the `admission` fuzz target: a request counted as waiting on one upstream and uncounted with another
/// upstream's index left the first counted for good and took the second below 0.
#[test]
fn a_wait_is_uncounted_on_the_upstream_it_was_counted_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let mut st: autoscale_admission_stats_t = unsafe { std::mem::zeroed() };
    let mut waiting = |up: u32| {
        assert_eq!(unsafe { autoscale_admission_stats(up, &mut st) }, AUTOSCALE_OK);
        st.waiting
    };
    let (w0, w1) = (waiting(0), waiting(1));
    assert_eq!(autoscale_admission_wait(req(50), 0, 1), AUTOSCALE_OK);
    assert_eq!(autoscale_admission_wait(req(50), 1, -1), AUTOSCALE_OK);
    assert_eq!((waiting(0), waiting(1)), (w0, w1), "uncounted where it was counted");
    assert_eq!(autoscale_admission_done(req(50), 200), AUTOSCALE_OK);
    assert_eq!((waiting(0), waiting(1)), (w0, w1));
}
