//! Outlier detection, the ejection lifecycle and panic mode over a private region, with a simulated clock.

use autoscale_core::engine::{PeerConf, UpstreamConf, UpstreamParams};
use autoscale_core::events::{kind, EventRecord};
use autoscale_core::health::{self, state, OutlierParams};
use autoscale_core::rng::XorShift64;
use autoscale_core::{Outcome, Params, Region};

const SEC: u64 = 1_000_000;

fn yes(_: u32) -> bool {
    true
}

fn setup(n: u16, outlier: OutlierParams) -> (Region, u32, Vec<u32>) {
    let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 16, max_workers: 2, ..Params::default() }, 0).unwrap();
    let conf = UpstreamConf {
        name: "api".into(),
        params: UpstreamParams { outlier, ..UpstreamParams::default() },
        peers: (1..=n).map(|p| PeerConf { addr: format!("127.0.0.1:{p}").parse().unwrap(), weight: 1 }).collect(),
    };
    let up = r.configure(&[conf], 1, &yes, 0).unwrap()[0];
    let slots = r.upstream_slots(up);
    (r, up, slots)
}

fn outcome(r: &Region, slot: u32, o: Outcome, now: u64, rng: &mut XorShift64) {
    let gen = r.snapshot(slot, now).unwrap().gen;
    r.record(slot, gen, o, 1000, now, rng);
}

fn health(r: &Region, slot: u32, now: u64) -> u32 {
    r.snapshot(slot, now).unwrap().health
}

fn events(r: &Region) -> Vec<EventRecord> {
    let mut out = vec![EventRecord::default(); 256];
    let (n, _) = r.read_events(0, &mut out);
    out.truncate(n);
    out
}

/// Three peers, of which up to half may be ejected, and the first of them (the one the tests make fail).
fn one_of_three() -> (Region, u32, u32, XorShift64) {
    let (r, up, slots) = setup(3, OutlierParams { max_ejection_percent: 50, ..OutlierParams::default() });
    (r, up, slots[0], XorShift64::new(1))
}

#[test]
fn consecutive_failures_eject_then_half_open_probes_close_or_reeject_for_longer() {
    let (r, up, bad, mut rng) = one_of_three();
    // Make its estimate huge, as slow failures do: once half-open it must still be probed.
    for i in 0..3 {
        let p = r.pick(up, &|s| s != bad, i, &mut rng, None).unwrap();
        assert_eq!(p.slot, bad);
        r.end_attempt(p.slot, p.gen, None, Outcome::Success, 30 * SEC, i);
    }
    for i in 0..4 {
        outcome(&r, bad, Outcome::Gateway, SEC + i, &mut rng);
    }
    assert_eq!(health(&r, bad, SEC), state::HEALTHY, "4 < 5 consecutive gateway failures");
    outcome(&r, bad, Outcome::Success, SEC + 5, &mut rng); // a success resets the streak
    for i in 0..5 {
        outcome(&r, bad, Outcome::Connect, SEC + 10 + i, &mut rng);
    }
    let s = r.snapshot(bad, SEC + 20).unwrap();
    assert_eq!(s.health, state::EJECTED);
    assert_eq!(s.ejected_for_us, 30 * SEC - 6, "30 s for the first ejection");
    // Never picked while ejected.
    for i in 0..200 {
        let p = r.pick(up, &|_| false, 2 * SEC + i, &mut rng, None).unwrap();
        assert_ne!(p.slot, bad);
        r.end_attempt(p.slot, p.gen, None, Outcome::Success, 1000, 2 * SEC + i);
    }
    // Time up: the next pick that draws it turns it half-open and takes the one probe slot.
    let t = 32 * SEC;
    let probe = (0..400)
        .map(|i| r.pick(up, &|_| false, t + i, &mut rng, None).unwrap())
        .find(|p| p.slot == bad)
        .expect("the half-open peer gets a probe");
    assert_eq!(health(&r, bad, t), state::HALF_OPEN);
    // While the probe is in flight no second one goes there.
    for i in 0..400 {
        let p = r.pick(up, &|_| false, t + 500 + i, &mut rng, None).unwrap();
        assert_ne!(p.slot, bad, "a second probe while one is in flight");
        r.end_attempt(p.slot, p.gen, None, Outcome::Success, 1000, t);
    }
    // The probe fails: ejected again, for twice as long.
    r.end_attempt(probe.slot, probe.gen, None, Outcome::Gateway, 1000, t + 1000);
    outcome(&r, bad, Outcome::Gateway, t + 1000, &mut rng);
    let s = r.snapshot(bad, t + 1000).unwrap();
    assert_eq!((s.health, s.times_ejected, s.ejected_for_us), (state::EJECTED, 2, 60 * SEC));
    // After that time, two successful probes close it.
    let t2 = t + 61 * SEC;
    r.tick(t2, &mut rng); // the sweep turns it half-open as well
    assert_eq!(health(&r, bad, t2), state::HALF_OPEN);
    outcome(&r, bad, Outcome::Success, t2, &mut rng);
    assert_eq!(health(&r, bad, t2), state::HALF_OPEN);
    outcome(&r, bad, Outcome::Success, t2 + 1, &mut rng);
    assert_eq!(health(&r, bad, t2), state::HEALTHY);
    let kinds: Vec<u32> = events(&r).iter().map(|e| e.kind).filter(|&k| k != kind::CONFIG).collect();
    assert_eq!(kinds, vec![kind::EJECTED, kind::HALF_OPEN, kind::EJECTED, kind::HALF_OPEN, kind::HEALTHY]);
    let ejected = events(&r).into_iter().find(|e| e.kind == kind::EJECTED).unwrap();
    let json = r.event_json(&ejected, 0);
    assert!(json.contains("\"event\":\"ejected\",\"reason\":\"consecutive_gateway_failures\",\"upstream\":\"api\",\"peer\":\"127.0.0.1:1\",\"ejection_time\":30,\"times_ejected\":1,\"consecutive\":5"), "{json}");
}

#[test]
fn at_most_max_ejection_percent_is_ejected_but_at_least_one() {
    let (r, _, slots) = setup(4, OutlierParams::default()); // 10 % of 4 → 1
    let mut rng = XorShift64::new(2);
    for &s in &slots[..3] {
        for i in 0..5 {
            outcome(&r, s, Outcome::Http5xx, SEC + i, &mut rng);
        }
    }
    let ejected = slots.iter().filter(|&&s| health(&r, s, SEC) == state::EJECTED).count();
    assert_eq!(ejected, 1);
    assert!(events(&r).iter().any(|e| e.kind == kind::EJECTION_SKIPPED));
}

#[test]
fn success_rate_ejects_the_outlier_and_nobody_when_all_fail_alike() {
    for (bad_rate, others_rate, expect) in [(30u64, 0u64, 1usize), (30, 30, 0)] {
        let p = OutlierParams { consecutive_5xx: 0, consecutive_gateway: 0, consecutive_timeout: 0, ..OutlierParams::default() };
        let (r, up, slots) = setup(5, p);
        let mut rng = XorShift64::new(3);
        for (k, &s) in slots.iter().enumerate() {
            let rate = if k == 0 { bad_rate } else { others_rate };
            for i in 0..200u64 {
                let o = if i % 100 < rate { Outcome::Http5xx } else { Outcome::Success };
                outcome(&r, s, o, 5 * SEC + i, &mut rng);
            }
        }
        r.tick(10 * SEC, &mut rng);
        let ejected: Vec<u32> = slots.iter().copied().filter(|&s| health(&r, s, 10 * SEC) == state::EJECTED).collect();
        assert_eq!(ejected.len(), expect, "bad {bad_rate} %, others {others_rate} %");
        if expect == 1 {
            assert_eq!(ejected[0], slots[0]);
            let e = events(&r).into_iter().find(|e| e.kind == kind::EJECTED).unwrap();
            let json = r.event_json(&e, 0);
            assert!(json.contains("\"reason\":\"success_rate\"") && json.contains("\"success_rate\":0.7"), "{json}");
        }
        let _ = up;
    }
}

#[test]
fn panic_mode_routes_over_everyone_when_most_are_ejected() {
    let (r, up, slots) = setup(4, OutlierParams { max_ejection_percent: 100, ..OutlierParams::default() });
    let mut rng = XorShift64::new(4);
    for &s in &slots[..3] {
        for i in 0..5 {
            outcome(&r, s, Outcome::Connect, SEC + i, &mut rng);
        }
    }
    assert!(events(&r).iter().any(|e| e.kind == kind::PANIC_ON), "1 of 4 healthy < 50 %");
    let mut seen = std::collections::HashSet::new();
    for i in 0..400 {
        let p = r.pick(up, &|_| false, 2 * SEC + i, &mut rng, None).unwrap();
        seen.insert(p.slot);
        r.end_attempt(p.slot, p.gen, None, Outcome::Success, 1000, 2 * SEC);
    }
    assert_eq!(seen.len(), 4, "panic spreads load over all peers");
    // No panic when it is switched off: only the healthy one.
    let (r, up, slots) = setup(4, OutlierParams { max_ejection_percent: 100, panic_threshold: 0, ..OutlierParams::default() });
    for &s in &slots[..3] {
        for i in 0..5 {
            outcome(&r, s, Outcome::Connect, SEC + i, &mut rng);
        }
    }
    for i in 0..100 {
        assert_eq!(r.pick(up, &|_| false, 2 * SEC + i, &mut rng, None).unwrap().slot, slots[3]);
    }
}

#[test]
fn active_checks_eject_until_they_pass_and_recover_without_traffic() {
    let (r, _, slots) = setup(3, OutlierParams::default());
    let mut rng = XorShift64::new(5);
    let s = slots[1];
    let gen = r.snapshot(s, 0).unwrap().gen;
    r.check_result(s, gen, false, 2, 2, SEC, &mut rng);
    assert_eq!(health(&r, s, SEC), state::HEALTHY);
    r.check_result(s, gen, false, 2, 2, 2 * SEC, &mut rng);
    assert_eq!(health(&r, s, 2 * SEC), state::EJECTED);
    r.tick(1000 * SEC, &mut rng);
    assert_eq!(health(&r, s, 1000 * SEC), state::EJECTED, "time alone does not bring it back");
    r.check_result(s, gen, true, 2, 2, 1001 * SEC, &mut rng);
    r.check_result(s, gen, true, 2, 2, 1002 * SEC, &mut rng);
    assert_eq!(health(&r, s, 1002 * SEC), state::HEALTHY);
    // Only one worker holds the lease until it expires or its owner dies.
    assert!(r.check_lease(0, 100, 0, 5 * SEC, &yes));
    assert!(!r.check_lease(0, 200, SEC, 5 * SEC, &yes));
    assert!(r.check_lease(0, 100, SEC, 5 * SEC, &yes), "renewal");
    assert!(r.check_lease(0, 200, 7 * SEC, 5 * SEC, &yes), "expired");
    assert!(r.check_lease(0, 300, 8 * SEC, 5 * SEC, &|pid| pid != 200), "owner died");
}

#[test]
fn a_draining_peer_takes_no_new_requests() {
    let (r, up, slots) = setup(2, OutlierParams::default());
    let mut rng = XorShift64::new(6);
    assert!(r.set_draining(slots[0], true, SEC));
    assert!(!r.set_draining(slots[0], true, SEC), "already draining");
    for i in 0..100 {
        assert_eq!(r.pick(up, &|_| false, SEC + i, &mut rng, None).unwrap().slot, slots[1]);
    }
    assert!(r.set_draining(slots[0], false, 2 * SEC));
    assert_eq!(health(&r, slots[0], 2 * SEC), state::HEALTHY);
}

#[test]
fn a_drained_peer_removed_and_brought_back_takes_requests_again() {
    let (r, up, slots) = setup(2, OutlierParams::default());
    let mut rng = XorShift64::new(7);
    let conf = |n: u16| UpstreamConf {
        name: "api".into(),
        params: UpstreamParams::default(),
        peers: (1..=n).map(|p| PeerConf { addr: format!("127.0.0.1:{p}").parse().unwrap(), weight: 1 }).collect(),
    };
    assert!(r.set_draining(slots[1], true, SEC)); // drained on its way out, then removed (its record retired)
    r.configure(&[conf(1)], 2, &yes, 2 * SEC).unwrap();
    let up2 = r.configure(&[conf(2)], 3, &yes, 3 * SEC).unwrap()[0]; // named again (a health flap)
    assert_eq!(up2, up);
    let back = r.upstream_slots(up);
    assert_eq!(back, slots, "the retired record is brought back");
    assert_eq!(health(&r, slots[1], 3 * SEC), state::HEALTHY, "not left draining");
    let picked = (0..200).filter(|i| r.pick(up, &|_| false, 40 * SEC + i, &mut rng, None).unwrap().slot == slots[1]);
    assert!(picked.count() > 0, "it takes requests again");
}

/// Traffic of `clients` sequential clients, one request every `step` µs each, every peer answering `outcome_of(slot)`
/// after 1 ms, with the upkeep every 0.5 s, over `[from, until)`. Returns the attempts each slot got.
fn traffic(r: &Region, up: u32, from: u64, until: u64, step: u64, rng: &mut XorShift64) -> std::collections::HashMap<u32, u64> {
    let mut hits = std::collections::HashMap::new();
    let mut next_tick = from;
    let mut now = from;
    while now < until {
        if now >= next_tick {
            r.tick(now, rng);
            next_tick += SEC / 2;
        }
        let p = r.pick(up, &|_| false, now, rng, None).unwrap();
        *hits.entry(p.slot).or_insert(0) += 1;
        r.finish_attempt(p.slot, p.gen, None, Outcome::Success, 1000, now + 1000, rng);
        now += step;
    }
    hits
}

#[test]
fn a_leaked_in_flight_count_does_not_keep_a_half_open_peer_out_of_service() {
    let (r, up, bad, mut rng) = one_of_three();
    // One attempt on it never ends (a subrequest without a log phase, a worker killed without a column)...
    let leaked = r.pick(up, &|s| s != bad, SEC, &mut rng, None).unwrap();
    assert_eq!(leaked.slot, bad);
    // ...and it fails until it is ejected.
    for i in 0..5 {
        outcome(&r, bad, Outcome::Gateway, SEC + i, &mut rng);
    }
    assert_eq!(health(&r, bad, SEC), state::EJECTED);
    // An hour of traffic: once its ejection time is up it is probed, and the probes bring it back.
    let hits = traffic(&r, up, 2 * SEC, 3600 * SEC, 10_000, &mut rng);
    let s = r.snapshot(bad, 3600 * SEC).unwrap();
    assert_eq!(s.health, state::HEALTHY, "still {} after an hour", health::state::name(s.health));
    assert!(hits.get(&bad).copied().unwrap_or(0) >= 100, "{hits:?}");
    assert_eq!(s.inflight, 1, "the leaked attempt is still counted (until its request entry is swept)");
}

#[test]
fn a_probe_that_never_ends_is_given_back_and_a_stuck_half_open_peer_is_ejected_again() {
    let (r, up, bad, mut rng) = one_of_three();
    let timeout = OutlierParams::default().probe_timeout_us();
    for i in 0..5 {
        outcome(&r, bad, Outcome::Gateway, SEC + i, &mut rng);
    }
    // Its time is up: it takes one probe, which never ends.
    let t = 32 * SEC;
    let probe = (0..400)
        .map(|i| r.pick(up, &|_| false, t + i, &mut rng, None).unwrap())
        .find(|p| p.slot == bad)
        .expect("the half-open peer gets a probe");
    assert_eq!(r.snapshot(bad, t).unwrap().probes, 1);
    // No second probe within the probe timeout...
    let hits = traffic(&r, up, t + 1000, t + timeout - SEC, 10_000, &mut rng);
    assert_eq!(hits.get(&bad), None);
    // ...but after it the lost probe's place is given back, and the next probe can close the peer.
    let t2 = t + timeout + SEC;
    let second = (0..400)
        .map(|i| r.pick(up, &|_| false, t2 + i, &mut rng, None).unwrap())
        .find(|p| p.slot == bad)
        .expect("a new probe once the first is taken as lost");
    assert_eq!((health(&r, bad, t2), r.snapshot(bad, t2).unwrap().probes), (state::HALF_OPEN, 1));
    // That one is lost too, and no probe completes for two probe timeouts: the sweep ejects the peer again.
    let t3 = t + 2 * timeout + 11 * SEC;
    r.tick(t3, &mut rng);
    let s = r.snapshot(bad, t3).unwrap();
    assert_eq!(s.health, state::EJECTED);
    let last = events(&r).into_iter().rfind(|e| e.kind == kind::EJECTED).unwrap();
    assert_eq!(health::Reason::from_u32(last.reason), Some(health::Reason::HalfOpenTimeout));
    assert!(r.event_json(&last, 0).contains("\"reason\":\"half_open_timeout\""), "{}", r.event_json(&last, 0));
    // After its ejection time it is half-open with no probe counted, and probes bring it back.
    let t4 = t3 + s.ejected_for_us + SEC;
    traffic(&r, up, t4, t4 + 10 * SEC, 10_000, &mut rng);
    let s = r.snapshot(bad, t4 + 10 * SEC).unwrap();
    assert_eq!(s.health, state::HEALTHY);
    // The lost probes end at last: nothing goes negative.
    r.end_attempt(probe.slot, probe.gen, None, Outcome::Success, 1000, t4 + 10 * SEC);
    r.end_attempt(second.slot, second.gen, None, Outcome::Success, 1000, t4 + 10 * SEC);
    let s = r.snapshot(bad, t4 + 10 * SEC).unwrap();
    assert_eq!((s.inflight, s.probes), (0, 0));
}
