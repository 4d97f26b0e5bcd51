//! Stress tests of the event ring's seqlocks with many threads: no torn record, no lost event.
//!
//! These check the protocol (what is stored and compared, in which order) under real contention; they are not a
//! model check of the memory orderings. This machine is x86-64, whose stores are not reordered with each other, so
//! a missing fence would go unnoticed here; on aarch64 the same tests exercise the fences too, though not every
//! interleaving. The window bucket's seqlock has the same kind of test in `window.rs`.

use autoscale_core::events::{kind, ClaimWait, EventRecord};
use autoscale_core::layout::{Params, Region, EVENT_RING};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Barrier;
use std::time::Instant;

fn region() -> Region {
    Region::new_heap(Params { max_upstreams: 2, max_peers: 2, max_workers: 2, ..Params::default() }, 0).unwrap()
}

/// Every field of event `k` derives from `k` (its time), so that a record mixing two events shows.
fn emit(r: &Region, k: u64) {
    let v = [k as f64, (k * 3) as f64, (k ^ 0x5555) as f64, -(k as f64)];
    r.emit(k, kind::CONFIG, None, (k % 7) as u32, (k % 5) as u32, v);
}

fn whole(e: &EventRecord) -> bool {
    let k = e.time_us;
    e.kind == kind::CONFIG
        && e.upstream == (k % 7) as u32
        && e.slot == (k % 5) as u32
        && e.values == [k as f64, (k * 3) as f64, (k ^ 0x5555) as f64, -(k as f64)]
}

/// Writers overwrite the ring many times over while readers copy it: every record a reader keeps is one event whole.
#[test]
fn readers_never_keep_a_torn_event() {
    let r = region();
    let done = AtomicBool::new(false);
    let (writers, per_writer) = (4u64, 25_000u64);
    let start = Barrier::new(writers as usize + 2);
    let (kept, during) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut out = vec![EventRecord::default(); EVENT_RING];
                    let (mut kept, mut during) = (0u64, 0u64);
                    start.wait();
                    loop {
                        let finished = done.load(Acquire);
                        let since = r.event_head().saturating_sub(EVENT_RING as u64);
                        let (n, _) = r.read_events(since, &mut out);
                        for e in &out[..n] {
                            assert!(whole(e), "torn event: {e:?}");
                        }
                        kept += n as u64;
                        if finished {
                            return (kept, during);
                        }
                        during += n as u64;
                    }
                })
            })
            .collect();
        let ws: Vec<_> = (0..writers)
            .map(|w| {
                let (r, start) = (&r, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..per_writer {
                        emit(r, w * per_writer + i);
                    }
                })
            })
            .collect();
        for w in ws {
            w.join().unwrap();
        }
        done.store(true, Release);
        readers.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert_eq!(r.event_head(), writers * per_writer);
    assert!(kept >= EVENT_RING as u64, "the readers read the ring: {kept}");
    eprintln!("records kept while the writers wrote: {during}");
}

/// Writers race claimers in rounds that fit in the ring (so nothing is overwritten before it is read): every event
/// is claimed by exactly one claimer and read whole by it; none claimed while still being written (it would then
/// be skipped for good).
#[test]
fn every_event_is_claimed_once_and_read() {
    let r = region();
    let (writers, per_round, rounds) = (4u64, 60u64, 1_000u64);
    let all = writers * per_round * rounds;
    let start = Instant::now();
    let writers_done = AtomicBool::new(false);
    let barrier = Barrier::new(writers as usize);
    let mut seen = std::thread::scope(|s| {
        let claimers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let mut wait = ClaimWait::default();
                    let mut out = vec![EventRecord::default(); EVENT_RING];
                    let mut seen = Vec::new();
                    loop {
                        let finished = writers_done.load(Acquire);
                        let (from, to) = r.claim_events(start.elapsed().as_micros() as u64, &mut wait);
                        let mut seq = from;
                        while seq < to {
                            let (n, next) = r.read_events(seq, &mut out);
                            for e in out[..n].iter().filter(|e| e.seq < to) {
                                assert!(whole(e), "torn event: {e:?}");
                                seen.push(e.seq);
                            }
                            if next == seq {
                                break;
                            }
                            seq = next;
                        }
                        if finished && r.header().events_logged.load(Acquire) == all {
                            return seen;
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        let ws: Vec<_> = (0..writers)
            .map(|w| {
                let (r, barrier) = (&r, &barrier);
                s.spawn(move || {
                    for round in 0..rounds {
                        for i in 0..per_round {
                            emit(r, (round * writers + w) * per_round + i);
                        }
                        barrier.wait();
                        // the next round only once this one is logged, so that the ring never laps a reader
                        while r.header().events_logged.load(Acquire) < r.event_head() {
                            std::thread::yield_now();
                        }
                        barrier.wait();
                    }
                })
            })
            .collect();
        for w in ws {
            w.join().unwrap();
        }
        writers_done.store(true, Release);
        claimers.into_iter().flat_map(|h| h.join().unwrap()).collect::<Vec<u64>>()
    });
    seen.sort_unstable();
    let read = seen.len() as u64;
    let lost = (0..all).filter(|s| seen.binary_search(s).is_err()).count();
    seen.dedup();
    assert_eq!((lost, read, seen.len() as u64), (0, all, all), "events lost, events read, distinct events read");
}
