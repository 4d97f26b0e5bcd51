//! The shared region's layout check and everything that reads the region, over garbage. A region whose header is not
//! exactly this build's (magic, version, sizes) is refused; a region whose header is right but whose records hold
//! garbage (a region damaged, or written by a buggy process) is read without a panic, an out-of-bounds access or an
//! endless loop: every index read from shared memory is bounded before use.
#![no_main]
use arbitrary::Unstructured;
use autoscale_core::engine::{PeerConf, UpstreamConf, UpstreamParams};
use autoscale_core::layout::{Params, Region};
use autoscale_core::rng::XorShift64;
use autoscale_core::Outcome;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering::Relaxed;

fn alive(pid: u32) -> bool {
    pid == 1 || pid == 2
}

/// Words of the header written over: magic, version, the sizes (all read by `Region::check`) and the hash keys.
const HEADER_WORDS: usize = 8;

/// Whether the words the check reads are as they were: words 0 to 4 whole (magic, version and sizes, total size) and
/// the low half of word 5 (`rate_slots`; its high half is padding).
fn checked_fields_same(now: &[u64], before: &[u64]) -> bool {
    now[..5] == before[..5] && now[5] as u32 == before[5] as u32
}

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let params = Params {
        max_upstreams: u.int_in_range(1..=3)?,
        max_peers: u.int_in_range(1..=6)?,
        max_workers: u.int_in_range(1..=3)?,
        window_buckets: u.int_in_range(1..=4)?,
        bucket_ms: 100,
        rate_slots: 64,
    };
    let r = Region::new_heap(params, 0).expect("valid params");
    let ups = vec![UpstreamConf {
        name: "a".into(),
        params: UpstreamParams::default(),
        peers: (1..=params.max_peers.min(3)).map(|p| PeerConf { addr: format!("127.0.0.1:{p}").parse().unwrap(), weight: p }).collect(),
    }];
    r.configure(&ups, 1, &alive, 0).expect("configure");
    let words = r.words();
    let before: Vec<u64> = words[..HEADER_WORDS].iter().map(|w| w.load(Relaxed)).collect();
    // Garbage over the header, and garbage at chosen places (or everywhere) in the records.
    if u.arbitrary::<bool>()? {
        for w in &words[..HEADER_WORDS] {
            if u.arbitrary::<bool>()? {
                w.store(u.arbitrary()?, Relaxed);
            }
        }
    }
    let dense = u.arbitrary::<bool>()?;
    if dense {
        for w in &words[HEADER_WORDS..] {
            w.store(u.arbitrary()?, Relaxed);
        }
    } else {
        for _ in 0..u.int_in_range(0..=64)? {
            let at = u.int_in_range(HEADER_WORDS..=words.len() - 1)?;
            words[at].store(u.arbitrary()?, Relaxed);
        }
    }
    let now_header: Vec<u64> = words[..HEADER_WORDS].iter().map(|w| w.load(Relaxed)).collect();
    let checked = r.check(&params);
    assert_eq!(checked.is_ok(), checked_fields_same(&now_header, &before), "{checked:?}");
    if checked.is_err() {
        return Ok(());
    }
    // Everything that reads records, as a worker, the admin API and the status pages do.
    let mut rng = XorShift64::new(1);
    let now = u.int_in_range(0..=10_000_000u64)?;
    let _ = r.current_config();
    for i in 0..params.max_upstreams + 1 {
        let _ = r.read_upstream(i);
        let _ = r.upstream_slots(i);
        let _ = r.upstream_gen(i);
        let _ = r.admission_stats(i);
        if let Ok(p) = r.pick(i, &|_| false, now, &mut rng, Some(0)) {
            r.finish_attempt(p.slot, p.gen, Some(0), Outcome::Success, 100, now, &mut rng);
        }
        let _ = r.admission_rate(i, 0, b"key", (now / 1000) as u32);
        let _ = r.admission_admit(i, 0, 0);
        r.admission_update(i, now, false);
    }
    for s in 0..params.max_peers + 1 {
        let _ = r.snapshot(s, now);
        let _ = r.latency_ranges(s);
        let _ = r.peer_addr(s);
    }
    let mut out = vec![autoscale_core::events::EventRecord { seq: 0, time_us: 0, kind: 0, reason: 0, upstream: 0, slot: 0, values: [0.0; 4] }; 8];
    let _ = r.read_events(0, &mut out);
    let _ = r.attach_worker(2, &alive);
    let _ = r.recover(2, &alive, now);
    r.tick(now, &mut rng);
    // A configuration written over garbage records must still apply or be refused cleanly.
    let _ = r.configure(&ups, 2, &alive, now + 1);
    let _ = r.current_config();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
