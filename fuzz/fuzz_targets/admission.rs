//! Admission as it crosses the FFI: settings (`autoscale_admission_configure`, any numbers), rate rules (rule number,
//! rate, burst), rate-limit keys (any bytes: a client address, a header value, an API key), and random sequences of
//! admit / wait / done / shed / update; and the token bucket and the key hash on their own, at any time stamp.
//! Properties: no panic; refused settings leave the admission state as it was; in flight and waiting are never
//! negative and back to 0 when every admitted request has ended; a shed answer's retry-after is a number >= 0 (infinite when no token can come: the Lua side caps it).
#![no_main]
use arbitrary::{Result, Unstructured};
use autoscale_core::admission::{key_hash, Bucket};
use libfuzzer_sys::fuzz_target;
use resty_autoscale::admission_ffi::*;
use resty_autoscale::*;
use std::ffi::{c_char, c_void};
use std::sync::atomic::AtomicU64;
use std::sync::Once;

fn setup() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let p = autoscale_region_params_t { max_upstreams: 2, max_peers: 4, max_workers: 2, window_buckets: 4, bucket_ms: 100, rate_slots: 64 };
        let addr = b"127.0.0.1:80";
        let peer = autoscale_peer_spec_t { addr: addr.as_ptr(), addr_len: addr.len(), weight: 1 };
        // SAFETY: valid structs; the spec is otherwise zero and then given its valid numbers.
        unsafe {
            assert_eq!(autoscale_region_init(&p, std::ptr::null_mut(), 0), AUTOSCALE_OK);
            let mut s: autoscale_upstream_spec_t = std::mem::zeroed();
            s.name = b"a".as_ptr();
            s.name_len = 1;
            s.slow_start_aggression = 1.0;
            s.failure_penalty = 2.0;
            s.slow_peer_penalty = 1.0;
            s.peers = &peer;
            s.npeers = 1;
            let mut idx = 0u32;
            let mut err = [0u8; 256];
            let rc = autoscale_config_apply(&s, 1, &mut idx, err.as_mut_ptr() as *mut c_char, err.len());
            assert_eq!(rc, AUTOSCALE_OK, "{}", String::from_utf8_lossy(&err));
            assert!(autoscale_worker_attach() >= 0);
        }
    });
}

fn num(u: &mut Unstructured, default: f64, lo: f64, hi: f64) -> Result<f64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0..=2 => default,
        3 => lo,
        4 => hi,
        5 => lo + (hi - lo) * (u.int_in_range(0..=1000u32)? as f64 / 1000.0),
        6 => [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, -1.0, 1e300, f64::MIN_POSITIVE][u.choose_index(7)?],
        _ => f64::from_bits(u.arbitrary()?),
    })
}

fn spec(u: &mut Unstructured) -> Result<autoscale_admission_spec_t> {
    Ok(autoscale_admission_spec_t {
        algorithm: if u.ratio(7, 8)? { u.int_in_range(0..=2)? } else { u.arbitrary()? },
        min_rtt_requests: u.int_in_range(0..=100)?,
        min_rtt_interval_ms: u.arbitrary()?,
        relax_after_ms: u.arbitrary()?,
        interval_ms: u.int_in_range(0..=1000)?,
        _pad: 0,
        min_limit: num(u, 3.0, 1.0, 1e6)?,
        max_limit: num(u, 100.0, 1.0, 1e6)?,
        initial_limit: num(u, 10.0, 1.0, 1e6)?,
        buffer: num(u, 0.25, 0.0, 10.0)?,
        min_concurrency: num(u, 3.0, 1.0, 1e6)?,
        backoff: num(u, 0.9, 0.01, 1.0)?,
        tolerance: num(u, 1.5, 1.0, 100.0)?,
        tighten: num(u, 0.5, 0.0, 1.0)?,
        shares: [num(u, 0.0, 0.0, 1.0)?, num(u, 0.0, 0.0, 1.0)?, num(u, 0.0, 0.0, 1.0)?, num(u, 0.0, 0.0, 1.0)?],
    })
}

fn stats(up: u32) -> autoscale_admission_stats_t {
    // SAFETY: a writable struct.
    unsafe {
        let mut s: autoscale_admission_stats_t = std::mem::zeroed();
        assert_eq!(autoscale_admission_stats(up, &mut s), AUTOSCALE_OK);
        s
    }
}

fn run(u: &mut Unstructured) -> Result<()> {
    setup();
    // The token bucket and the key hash alone, at any time stamp, rate and burst.
    let bucket = AtomicU64::new(u.arbitrary()?);
    for _ in 0..u.int_in_range(0..=4u8)? {
        let (now, rate, burst) = (u.arbitrary::<u32>()?, num(u, 10.0, 0.0, 1e6)?, num(u, 10.0, 1.0, 1e6)?);
        if rate.is_finite() && rate > 0.0 && (1.0..=1e6).contains(&burst) {
            if let Err(wait) = Bucket(&bucket).take(now, rate, burst) {
                assert!(wait >= 0.0, "retry after {wait}"); // infinite when no token can come (rate 0 after tightening)
            }
        }
    }
    let key: Vec<u8> = u.arbitrary()?;
    assert_eq!(key_hash([1, 2], 0, 0, &key), key_hash([1, 2], 0, 0, &key));
    // SAFETY (all calls below): pointers to live values of the lengths given.
    unsafe {
        let s = spec(u)?;
        let before = stats(0);
        let mut err = [0xAAu8; 129];
        let on = u.arbitrary::<bool>()?;
        let rc = autoscale_admission_configure(0, if on { &s } else { std::ptr::null() }, err.as_mut_ptr() as *mut c_char, 128);
        assert_eq!(err[128], 0xAA, "written past the error buffer");
        if rc != AUTOSCALE_OK {
            assert_eq!(rc, AUTOSCALE_ERR_ARG);
            assert!(err[..128].contains(&0), "error text NUL-terminated");
            let after = stats(0);
            assert!(after.limit.to_bits() == before.limit.to_bits() && after.rate_factor.to_bits() == before.rate_factor.to_bits(), "refused settings changed the limit");
        }
        let mut admitted = Vec::new();
        for _ in 0..u.int_in_range(0..=32u8)? {
            let up = if u.ratio(15, 16)? { 0 } else { u.arbitrary()? };
            let req = u.int_in_range(1..=16usize)? as *const c_void;
            let mut retry = -1.0f64;
            match u.int_in_range(0..=7u8)? {
                0 => {
                    let rc = autoscale_admission_rule(up, u.int_in_range(0..=8)?, num(u, 5.0, 0.0, 1e6)?, num(u, 5.0, 1.0, 1e6)?);
                    assert!(rc == AUTOSCALE_OK || rc == AUTOSCALE_ERR_ARG || rc == AUTOSCALE_ERR_UPSTREAM, "{rc}");
                }
                1 => {
                    let key: Vec<u8> = u.arbitrary()?;
                    let rc = autoscale_admission_rate(up, u.int_in_range(0..=9)?, key.as_ptr(), key.len(), &mut retry);
                    if rc == AUTOSCALE_SHED {
                        assert!(retry >= 0.0, "retry after {retry}");
                    }
                    assert_ne!(rc, AUTOSCALE_ERR_PANIC);
                }
                2 | 3 => {
                    let rc = autoscale_admission_admit(req, up, u.int_in_range(0..=5)?, &mut retry);
                    match rc {
                        AUTOSCALE_ADMIT => admitted.push(req),
                        AUTOSCALE_SHED => assert!(retry >= 0.0, "retry after {retry}"),
                        _ => assert!(rc == AUTOSCALE_ADMISSION_OFF || rc == AUTOSCALE_ERR_UPSTREAM, "{rc}"),
                    }
                }
                4 => {
                    let _ = autoscale_admission_wait(req, up, u.int_in_range(-2..=2)?);
                }
                5 => {
                    let _ = autoscale_admission_done(req, u.arbitrary()?);
                }
                6 => {
                    let _ = autoscale_admission_shed(up, u.arbitrary()?, u.int_in_range(0..=3)?);
                }
                _ => {
                    let _ = autoscale_admission_update(up, u.arbitrary()?);
                }
            }
            let st = stats(0);
            assert!(st.inflight >= 0 && st.waiting >= 0, "in flight {}, waiting {}", st.inflight, st.waiting);
            assert!(st.class_inflight.iter().all(|&c| c >= 0), "{:?}", st.class_inflight);
        }
        // Every request ends: nothing is left counted.
        for req in 1..=16usize {
            autoscale_admission_done(req as *const c_void, 200);
        }
        let st = stats(0);
        assert_eq!((st.inflight, st.waiting), (0, 0), "counted after every request ended");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
