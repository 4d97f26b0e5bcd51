//! The request path (pick, retry, log) allocates nothing once a worker's state exists.

use resty_autoscale::*;

mod common;
use common::outlier_defaults;

#[path = "common/counting.rs"]
mod counting;
use counting::allocations;

#[test]
fn the_request_path_allocates_nothing() {
    let p = autoscale_region_params_t { max_upstreams: 4, max_peers: 16, max_workers: 4, window_buckets: 10, bucket_ms: 1000, rate_slots: 4096 };
    let mut err = [0 as std::ffi::c_char; 256];
    assert_eq!(unsafe { autoscale_region_init(&p, err.as_mut_ptr(), err.len()) }, AUTOSCALE_OK);
    let addrs = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];
    let peers: Vec<autoscale_peer_spec_t> =
        addrs.iter().map(|a| autoscale_peer_spec_t { addr: a.as_ptr(), addr_len: a.len(), weight: 1 }).collect();
    let name = "api";
    let spec = autoscale_upstream_spec_t {
        name: name.as_ptr(),
        name_len: name.len(),
        algorithm: 0,
        retries: 2,
        slow_start_ms: 10_000,
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
    };
    let mut idx = [0u32; 1];
    assert_eq!(unsafe { autoscale_config_apply(&spec, 1, idx.as_mut_ptr(), err.as_mut_ptr(), err.len()) }, AUTOSCALE_OK);
    autoscale_worker_attach();
    let mut gen0 = 0u32;
    assert_eq!(unsafe { autoscale_upstream_gen(idx[0], &mut gen0) }, AUTOSCALE_OK);
    let mut pick = autoscale_pick_t { slot: 0, gen: 0, more_tries: 0, attempt: 0, cost: 0.0 };
    let kinds = [2u32, 0];
    let statuses = [502u32, 200];
    let mut run = |n: usize| {
        for i in 0..n {
            let req = (0x10_0000 + i * 64) as *const std::ffi::c_void;
            unsafe {
                assert_eq!(autoscale_balancer_pick(req, idx[0], gen0, 0, &mut pick), AUTOSCALE_OK);
                if i % 10 == 0 {
                    // a retry after a 502, then the detailed log path
                    assert_eq!(autoscale_balancer_pick(req, idx[0], gen0, 502, &mut pick), AUTOSCALE_OK);
                    assert_eq!(autoscale_log_finish(req, 200), AUTOSCALE_NEED_DETAIL);
                    assert_eq!(autoscale_log_detail(req, kinds.as_ptr(), statuses.as_ptr(), 2), AUTOSCALE_OK);
                } else {
                    assert_eq!(autoscale_log_finish(req, 200), AUTOSCALE_OK);
                }
            }
        }
        autoscale_region_tick();
    };
    run(100); // creates the worker's request table and random generator once
    let before = allocations();
    run(50_000);
    assert_eq!(allocations() - before, 0, "allocations on the request path");
}

