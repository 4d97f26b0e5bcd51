//! The C ABI under wrong and hostile input: nothing may panic across the boundary or crash; errors come back as
//! codes with a reason. (One process-wide region, as in an nginx master.)

use autoscale_core::rng::{Rng, XorShift64};
use resty_autoscale::*;

mod common;
use common::outlier_defaults;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

/// The region is process-wide and `configure` replaces the whole configuration: tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn init() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = autoscale_region_params_t {
        max_upstreams: 8,
        max_peers: 32,
        max_workers: 8,
        window_buckets: 10,
        bucket_ms: 1000,
        rate_slots: 4096,
    };
    let mut err = [0 as std::ffi::c_char; 256];
    assert_eq!(
        unsafe { autoscale_region_init(&p, err.as_mut_ptr(), err.len()) },
        AUTOSCALE_OK
    );
    guard
}

fn spec(name: &str, peers: &[autoscale_peer_spec_t]) -> autoscale_upstream_spec_t {
    autoscale_upstream_spec_t {
        name: name.as_ptr(),
        name_len: name.len(),
        algorithm: 0,
        retries: 2,
        slow_start_ms: 0,
        decay_ms: 10_000,
        default_rtt_us: 30_000,
        _pad: 0,
        slow_start_aggression: 1.0,
        slow_start_min_weight: 0.1,
        failure_penalty: 2.0,
        slow_peer_factor: 3.0,
        slow_peer_penalty: 10.0,
        peers: peers.as_ptr(),
        npeers: peers.len(),
        outlier: outlier_defaults(),
        failure_statuses: std::ptr::null(),
        nfailure_statuses: 0,
    }
}

fn peer(addr: &'static str) -> autoscale_peer_spec_t {
    autoscale_peer_spec_t {
        addr: addr.as_ptr(),
        addr_len: addr.len(),
        weight: 1,
    }
}

fn apply(specs: &[autoscale_upstream_spec_t]) -> Result<Vec<u32>, String> {
    let mut idx = vec![0u32; specs.len() + 1];
    let mut err = [0 as std::ffi::c_char; 256];
    let rc = unsafe {
        autoscale_config_apply(
            specs.as_ptr(),
            specs.len(),
            idx.as_mut_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == AUTOSCALE_OK {
        Ok(idx)
    } else {
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }
}

#[test]
fn every_export_survives_null_and_out_of_range() {
    let _serial = init();
    unsafe {
        assert_eq!(
            autoscale_region_init(null(), null_mut(), 0),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(
            autoscale_config_apply(null(), 3, null_mut(), null_mut(), 0),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(
            autoscale_balancer_pick(null(), 0, 0, 0, null_mut()),
            AUTOSCALE_ERR_ARG
        );
        let mut pick = autoscale_pick_t {
            slot: 0,
            gen: 0,
            more_tries: 0,
            attempt: 0,
            cost: 0.0,
        };
        assert_eq!(
            autoscale_balancer_pick(null(), 0, 0, 0, &mut pick),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(
            autoscale_balancer_pick(8 as _, u32::MAX, 0, 0, &mut pick),
            AUTOSCALE_ERR_UPSTREAM
        );
        assert_eq!(autoscale_log_finish(null(), 200), AUTOSCALE_OK);
        assert_eq!(autoscale_log_detail(null(), null(), null(), 5), AUTOSCALE_ERR_ARG);
        assert_eq!(
            autoscale_upstream_peers(u32::MAX, null_mut(), 0),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(
            autoscale_upstream_peers(0, null_mut(), 4),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(
            autoscale_peer_addr(u32::MAX, null_mut(), 0),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(
            autoscale_peer_stats(u32::MAX, null_mut()),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(autoscale_region_info(null_mut()), AUTOSCALE_ERR_ARG);
        // A different size on "reload" is refused with the reason.
        let other = autoscale_region_params_t {
            max_upstreams: 8,
            max_peers: 33,
            max_workers: 8,
            window_buckets: 10,
            bucket_ms: 1000,
            rate_slots: 4096,
        };
        let mut err = [0 as std::ffi::c_char; 256];
        assert_eq!(
            autoscale_region_init(&other, err.as_mut_ptr(), err.len()),
            AUTOSCALE_ERR_CONFIG
        );
        let msg = CStr::from_ptr(err.as_ptr()).to_string_lossy();
        assert!(msg.contains("restart nginx"), "{msg}");
        // Error text is truncated to the buffer and NUL-terminated.
        let bad = autoscale_region_params_t {
            max_upstreams: 0,
            ..other
        };
        let mut small = [1 as std::ffi::c_char; 8];
        assert_eq!(
            autoscale_region_init(&bad, small.as_mut_ptr(), small.len()),
            AUTOSCALE_ERR_ARG
        );
        assert_eq!(small[7], 0);
    }
}

#[test]
fn config_errors_name_the_field() {
    let _serial = init();
    let peers = [peer("127.0.0.1:80"), peer("10.0.0.1:99999")];
    assert_eq!(
        apply(&[spec("api", &peers)]).unwrap_err(),
        "upstreams.api.peers[2]: \"10.0.0.1:99999\": port out of range"
    );
    let peers = [peer("backend:80")];
    assert!(apply(&[spec("api", &peers)])
        .unwrap_err()
        .starts_with("upstreams.api.peers[1]: \"backend:80\": host must be"));
    let peers = [peer("127.0.0.1:80")];
    let mut s = spec("api", &peers);
    s.failure_penalty = f64::NAN;
    assert_eq!(
        apply(&[s]).unwrap_err(),
        "upstreams.api.failure_penalty: must be between 1 and 1000"
    );
    let mut s = spec("api", &peers);
    s.npeers = 5;
    s.peers = null();
    assert_eq!(apply(&[s]).unwrap_err(), "upstreams.api.peers: NULL");
    let s = spec("", &peers);
    assert!(apply(&[s]).unwrap_err().contains("name must be"));
}

/// Random bytes as names and addresses never crash the library; whatever is accepted is readable back.
#[test]
fn fuzz_config_apply() {
    let _serial = init();
    let mut rng = XorShift64::new(0x1234_5678);
    let alphabet = b"0123456789.:[]abf -\x00\xff";
    let bytes = |rng: &mut XorShift64, n: u32| -> Vec<u8> {
        (0..n)
            .map(|_| alphabet[rng.below(alphabet.len() as u32) as usize])
            .collect()
    };
    for _ in 0..3000 {
        let n = 1 + rng.below(8);
        let name = bytes(&mut rng, n);
        let count = rng.below(4);
        let addrs: Vec<Vec<u8>> = (0..count)
            .map(|_| {
                let n = rng.below(24);
                bytes(&mut rng, n)
            })
            .collect();
        let peers: Vec<autoscale_peer_spec_t> = addrs
            .iter()
            .map(|a| autoscale_peer_spec_t {
                addr: a.as_ptr(),
                addr_len: a.len(),
                weight: rng.below(3),
            })
            .collect();
        let mut s = spec("x", &peers);
        s.name = name.as_ptr();
        s.name_len = name.len();
        s.algorithm = rng.below(7);
        let _ = apply(&[s]);
    }
    // Still consistent: a normal configuration applies and can be read.
    let peers = [peer("127.0.0.1:81")];
    let idx = apply(&[spec("ok", &peers)]).unwrap()[0];
    let mut slots = [0u32; 4];
    assert_eq!(
        unsafe { autoscale_upstream_peers(idx, slots.as_mut_ptr(), 4) },
        1
    );
    let mut buf = [0u8; 64];
    let n = unsafe { autoscale_peer_addr(slots[0], buf.as_mut_ptr(), 64) };
    assert_eq!(&buf[..n as usize], b"127.0.0.1:81");
}

#[test]
fn a_request_is_accounted_from_pick_to_log() {
    let _serial = init();
    let peers = [peer("127.0.0.1:90"), peer("127.0.0.1:91")];
    let idx = apply(&[spec("flow", &peers)]).unwrap()[0];
    assert_eq!(autoscale_worker_attach(), autoscale_worker_attach());
    let req = 0x7000 as *const std::ffi::c_void;
    let mut gen = 0u32;
    assert_eq!(unsafe { autoscale_upstream_gen(idx, &mut gen) }, AUTOSCALE_OK);
    assert_eq!(unsafe { autoscale_upstream_gen(u32::MAX, &mut gen) }, AUTOSCALE_ERR_UPSTREAM);
    assert_eq!(unsafe { autoscale_upstream_gen(idx, std::ptr::null_mut()) }, AUTOSCALE_ERR_ARG);
    let mut pick = autoscale_pick_t {
        slot: 0,
        gen: 0,
        more_tries: 0,
        attempt: 0,
        cost: 0.0,
    };
    unsafe {
        assert_eq!(
            autoscale_balancer_pick(req, idx, gen, 0, &mut pick),
            AUTOSCALE_OK
        );
        assert_eq!((pick.attempt, pick.more_tries), (1, 1));
        // A new peer's cost is its seed estimate (default_rtt 30 ms, barely decayed) with nothing in flight yet.
        assert!(pick.cost > 25_000.0 && pick.cost <= 30_000.0, "cost of the choice: {}", pick.cost);
        let first = pick.slot;
        // Retry after a 502: the other peer, attempt 2.
        assert_eq!(
            autoscale_balancer_pick(req, idx, gen, 502, &mut pick),
            AUTOSCALE_OK
        );
        assert_eq!(pick.attempt, 2);
        assert_ne!(pick.slot, first);
        // An index with another generation than its record's is refused, nothing chosen.
        let other = 0x7040 as *const std::ffi::c_void;
        assert_eq!(autoscale_balancer_pick(other, idx, gen.wrapping_add(1), 0, &mut pick), AUTOSCALE_ERR_STALE);
        assert_eq!(autoscale_log_finish(req, 200), AUTOSCALE_NEED_DETAIL);
        let kinds = [3u32, 0];
        let statuses = [502u32, 200];
        assert_eq!(autoscale_log_detail(req, kinds.as_ptr(), statuses.as_ptr(), 2), AUTOSCALE_OK);
        let mut st: autoscale_peer_stats_t = std::mem::zeroed();
        assert_eq!(autoscale_peer_stats(first, &mut st), AUTOSCALE_OK);
        assert_eq!((st.requests, st.fail_connect, st.inflight), (1, 1, 0));
        assert_eq!(autoscale_peer_stats(pick.slot, &mut st), AUTOSCALE_OK);
        assert_eq!((st.requests, st.failures, st.inflight), (1, 0, 0));
        // Logged twice (or never balanced): ignored.
        assert_eq!(autoscale_log_finish(req, 200), AUTOSCALE_OK);
    }
}


#[test]
fn the_admin_and_observability_exports_survive_null_and_out_of_range() {
    use resty_autoscale::admin_ffi::*;
    use resty_autoscale::cost::*;
    let _serial = init();
    let peers = [peer("127.0.0.1:1")];
    apply(&[spec("admin", &peers)]).expect("configured");
    unsafe {
        assert_eq!(autoscale_upstream_config(0, null_mut()), AUTOSCALE_ERR_ARG);
        let mut c: autoscale_upstream_config_t = std::mem::zeroed();
        assert_eq!(autoscale_upstream_config(u32::MAX, &mut c), AUTOSCALE_ERR_UPSTREAM);
        assert_eq!(autoscale_upstream_config(0, &mut c), AUTOSCALE_OK);
        assert_eq!((c.retries, c.decay_ms, c.default_rtt_us, c.slow_peer_factor), (2, 10_000, 30_000, 3.0));
        assert_eq!(autoscale_event_totals(null_mut(), 4), AUTOSCALE_ERR_ARG);
        let n = autoscale_event_totals(null_mut(), 0);
        let mut totals = vec![0u64; n as usize];
        assert_eq!(autoscale_event_totals(totals.as_mut_ptr(), totals.len()), n);
        assert!(totals[11] >= 1, "at least one config event: {totals:?}");
        assert_eq!(autoscale_event_kind_name(1, null_mut(), 8), AUTOSCALE_ERR_ARG);
        let mut name = [0u8; 4];
        assert_eq!(autoscale_event_kind_name(1, name.as_mut_ptr(), name.len()), 4, "truncated to the buffer");
        assert_eq!(&name, b"ejec");
        let mut long = [0u8; 32];
        let len = autoscale_event_kind_name(u32::MAX, long.as_mut_ptr(), long.len());
        assert_eq!(&long[..len as usize], b"unknown");
        assert_eq!(autoscale_cost_read(null_mut()), AUTOSCALE_ERR_ARG);
        let mut cost: autoscale_cost_t = std::mem::zeroed();
        assert_eq!(autoscale_cost_read(&mut cost), AUTOSCALE_OK);
    }
}

#[test]
fn the_discovery_export_finds_upstreams_and_survives_bad_names() {
    use resty_autoscale::discovery_ffi::*;
    let _serial = init();
    let peers = [peer("127.0.0.1:1")];
    let idx = apply(&[spec("disc-a", &peers), spec("disc-b", &peers)]).expect("configured");
    unsafe {
        assert_eq!(autoscale_upstream_find(b"disc-b".as_ptr(), 6), idx[1] as i32);
        assert_eq!(autoscale_upstream_find(b"disc-a".as_ptr(), 6), idx[0] as i32);
        assert_eq!(autoscale_upstream_find(b"disc-".as_ptr(), 5), AUTOSCALE_ERR_UPSTREAM);
        assert_eq!(autoscale_upstream_find(b"disc-a".as_ptr(), 0), AUTOSCALE_ERR_UPSTREAM);
        assert_eq!(autoscale_upstream_find(null(), 0), AUTOSCALE_ERR_ARG);
        assert_eq!(autoscale_upstream_find([0xffu8, 0xfe].as_ptr(), 2), AUTOSCALE_ERR_ARG);
    }
}

#[test]
fn the_change_set_export_applies_all_or_nothing_and_survives_bad_input() {
    use resty_autoscale::discovery_ffi::*;
    let _serial = init();
    let idx = apply(&[spec("set", &[peer("127.0.0.1:1"), peer("127.0.0.1:2")])]).expect("configured")[0];
    let mut err = [0 as std::ffi::c_char; 256];
    let slots = || {
        let mut s = [0u32; 8];
        unsafe { autoscale_upstream_peers(idx, s.as_mut_ptr(), s.len()) }
    };
    let gone = autoscale_peer_spec_t { weight: 0, ..peer("127.0.0.1:1") };
    let heavy = autoscale_peer_spec_t { weight: 7, ..peer("127.0.0.1:2") };
    let set = [peer("127.0.0.1:3"), gone, heavy];
    unsafe {
        assert_eq!(autoscale_admin_peers_change(idx, set.as_ptr(), set.len(), err.as_mut_ptr(), err.len()), 3);
        assert_eq!(slots(), 2);
        let bad = [peer("127.0.0.1:4"), autoscale_peer_spec_t { weight: 0, ..peer("127.0.0.1:9") }];
        assert_eq!(autoscale_admin_peers_change(idx, bad.as_ptr(), bad.len(), err.as_mut_ptr(), err.len()), AUTOSCALE_ERR_CONFIG);
        assert_eq!(slots(), 2, "nothing changed");
        let junk = [peer("not an address")];
        assert_eq!(autoscale_admin_peers_change(idx, junk.as_ptr(), 1, err.as_mut_ptr(), err.len()), AUTOSCALE_ERR_CONFIG);
        assert_eq!(autoscale_admin_peers_change(idx, null(), 1, null_mut(), 0), AUTOSCALE_ERR_CONFIG);
        assert_eq!(autoscale_admin_peers_change(idx, null(), 0, null_mut(), 0), 0, "an empty set changes nothing");
        assert_eq!(autoscale_admin_peers_change(999, set.as_ptr(), 1, null_mut(), 0), AUTOSCALE_ERR_CONFIG);
    }
}
