//! Processes killed in the middle of a change: each test leaves a marker behind as a SIGKILL at that point would (an
//! odd seqlock under a held writer lock, an odd latency-total seqlock, a column marked as being reclaimed), owned by
//! a process that is gone (a child this test spawned and reaped) or whose pid went to another process, and checks
//! that every read returns within a bound, that the next writer or the upkeep repairs the marker, and that data flows
//! again. Calls that could hang run on a thread with a deadline, so a regression fails instead of hanging the suite.

mod common;

use autoscale_core::engine::{ConfigError, SeqBusy, RECLAIMING};
use common::conf;
use autoscale_core::owner::{self, Processes};
use autoscale_core::rng::XorShift64;
use autoscale_core::{Outcome, Params, Region};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const SEC: u64 = 1_000_000;

fn region() -> Arc<Region> {
    Arc::new(Region::new_heap(Params { max_upstreams: 4, max_peers: 8, max_workers: 2, ..Params::default() }, 0).unwrap())
}


/// The pid of a process that existed and is gone: a child spawned and reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// The machine as the engine sees it: the real `kill(pid, 0)` and `/proc/PID/stat` start times, except for pids
/// the test says were reused (alive, with another start time than the one recorded).
struct Host {
    reused: Vec<(u32, u64)>,
}

impl Processes for Host {
    fn alive(&self, pid: u32) -> bool {
        self.reused.iter().any(|&(p, _)| p == pid) || std::path::Path::new(&format!("/proc/{pid}")).exists()
    }
    fn start_time(&self, pid: u32) -> u64 {
        if let Some(&(_, t)) = self.reused.iter().find(|&&(p, _)| p == pid) {
            return t;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(19)?.parse().ok()).unwrap_or(0)
    }
}

const HOST: Host = Host { reused: Vec::new() };
const ME: u32 = 1; // the pid the test's writers use (alive: it is init)

/// Runs `f` on a thread and returns its result, or fails the test when it takes longer than `limit`.
fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: still blocked after {limit:?}"))
}

/// What a writer killed between the first and the last store of its critical section on upstream `up` leaves: the
/// writer lock held by it, the upstream's seqlock odd, its peer list half rewritten.
fn kill_writer_mid_change(r: &Region, up: u32, owner_word: u64) {
    r.header().writer.store(owner_word, Relaxed);
    let h = r.upstream(up).head;
    h.seq.fetch_add(1, Relaxed);
    h.npeers.store(1, Relaxed); // half rewritten: one of its two peers listed
}

#[test]
fn a_writer_killed_mid_change_blocks_no_reader_and_the_next_writer_repairs() {
    let r = region();
    let up = r.configure(&[conf("api", &[1, 2])], ME, &HOST, 0).unwrap()[0];
    let dead = dead_pid();
    kill_writer_mid_change(&r, up, owner::word(dead, 0));

    // Readers return within a bound: status reads say busy, the upkeep and pick read the fields as they are.
    let started = Instant::now();
    let r2 = r.clone();
    let (strict, slots, pick) = within("readers", Duration::from_secs(2), move || {
        let strict = r2.try_read_upstream(up);
        let slots = r2.upstream_slots(up);
        let pick = r2.pick(up, &|_| false, SEC, &mut XorShift64::new(1), None);
        if let Ok(p) = pick {
            r2.finish_attempt(p.slot, p.gen, None, Outcome::Http5xx, 1000, SEC, &mut XorShift64::new(2));
        }
        r2.snapshot(0, SEC).unwrap();
        (strict, slots, pick)
    });
    assert!(started.elapsed() < Duration::from_millis(100), "bounded reads took {:?}", started.elapsed());
    assert_eq!(strict.unwrap_err(), SeqBusy);
    assert_eq!(slots.len(), 1, "the half-written list as it is");
    assert!(pick.is_ok(), "pick still serves from the list as it is: {pick:?}");

    // The next writer takes the lock over from the dead one, repairs, and applies its change.
    let r2 = r.clone();
    let res = within("configure", Duration::from_secs(2), move || r2.configure(&[conf("api", &[1, 2, 3])], ME, &HOST, 2 * SEC));
    assert_eq!(res.unwrap(), vec![up]);
    assert_eq!(r.upstream(up).head.seq.load(Relaxed) & 1, 0, "seqlock even again");
    assert_eq!(r.header().writer.load(Relaxed), 0, "lock released");
    assert_eq!(r.header().writer_takeovers.load(Relaxed), 1);
    assert!(r.header().repaired_markers.load(Relaxed) >= 1);
    assert_eq!(r.try_upstream_slots(up).unwrap().len(), 3);

    // Data flows again: every peer is picked (once the newcomer's slow start is over) and its attempts counted.
    let mut rng = XorShift64::new(3);
    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        let p = r.pick(up, &|_| false, 600 * SEC + i, &mut rng, None).unwrap();
        r.finish_attempt(p.slot, p.gen, None, Outcome::Success, 1000, 600 * SEC + i, &mut rng);
        seen.insert(p.slot);
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn the_upkeep_repairs_a_dead_writer_without_a_configuration_change() {
    let r = region();
    let up = r.configure(&[conf("api", &[1, 2]), conf("web", &[3])], ME, &HOST, 0).unwrap()[0];
    let before = r.try_upstream_slots(up).unwrap();
    kill_writer_mid_change(&r, up, owner::word(dead_pid(), 0));
    assert!(!r.recover(ME, &|_| true, SEC), "a live owner (as the closure says) is left alone");
    assert!(r.recover(ME, &HOST, SEC), "a dead owner's lock is taken over");
    assert_eq!(r.header().writer.load(Relaxed), 0);
    assert_eq!(r.try_upstream_slots(up).unwrap(), before, "the peer list rebuilt from the peer records");
    assert!(r.try_read_upstream(up).unwrap().is_some());
    assert!(!r.recover(ME, &HOST, 2 * SEC), "nothing left to repair");
}

#[test]
fn a_lock_whose_pid_went_to_another_process_is_taken_over() {
    let r = region();
    let up = r.configure(&[conf("api", &[1])], ME, &HOST, 0).unwrap()[0];
    // The writer (pid 4242, started at tick 111) was killed; the kernel gave pid 4242 to a process started later.
    kill_writer_mid_change(&r, up, owner::word(4242, 111));
    let reused = Host { reused: vec![(4242, 999)] };
    assert!(r.configure(&[conf("api", &[1, 2])], ME, &reused, SEC).is_ok());
    assert_eq!(r.try_upstream_slots(up).unwrap().len(), 2);

    // The same pid with the recorded start time is the live owner: busy, nothing changed.
    kill_writer_mid_change(&r, up, owner::word(4242, 999));
    assert_eq!(r.configure(&[conf("api", &[1])], ME, &reused, 2 * SEC), Err(ConfigError::Busy(4242)));
    assert_eq!(r.writer().map(|(pid, _)| pid), Some(4242));
    let r2 = r.clone();
    let busy = within("status read under a live writer", Duration::from_secs(2), move || r2.try_read_upstream(up));
    assert_eq!(busy.unwrap_err(), SeqBusy);
}

#[test]
fn a_run_time_change_repairs_a_dead_writer_before_reading_the_configuration() {
    let r = region();
    let up = r.configure(&[conf("api", &[1, 2])], ME, &HOST, 0).unwrap()[0];
    kill_writer_mid_change(&r, up, owner::word(dead_pid(), 0));
    let r2 = r.clone();
    let res = within("add_peer", Duration::from_secs(2), move || r2.add_peer(up, "127.0.0.1:3", 1, ME, &HOST, SEC));
    assert!(res.is_ok(), "{res:?}");
    let mut ports: Vec<u32> = r.try_upstream_slots(up).unwrap().iter().map(|&s| r.peer_head(s).port.load(Relaxed)).collect();
    ports.sort();
    assert_eq!(ports, vec![1, 2, 3], "both peers kept (the list was rebuilt, not read half-written) and 3 added");
}

#[test]
fn a_latency_total_seqlock_left_odd_is_repaired_by_the_upkeep() {
    let r = region();
    let up = r.configure(&[conf("api", &[1])], ME, &HOST, 0).unwrap()[0];
    let slot = r.try_upstream_slots(up).unwrap()[0];
    let mut rng = XorShift64::new(1);
    let gen = r.snapshot(slot, 0).unwrap().gen;
    for i in 0..10 {
        r.finish_attempt(slot, gen, None, Outcome::Success, 2_000, i, &mut rng);
    }
    // A worker killed while adding a bucket to the all-time latency counts: the seqlock stays odd.
    r.peer(slot).head.latency.seq.fetch_add(1, Relaxed);
    r.tick(SEC / 2, &mut rng);
    assert_eq!(r.peer(slot).head.latency.seq.load(Relaxed) & 1, 0, "the upkeep made it even");
    assert!(r.header().repaired_markers.load(Relaxed) >= 1);
    let ranges = r.latency_ranges(slot).unwrap();
    assert_eq!(ranges.iter().sum::<u64>(), 10, "each sample counted once");
}

#[test]
fn a_column_left_being_reclaimed_by_a_killed_worker_is_not_lost() {
    let r = region(); // 2 columns
    let up = r.configure(&[conf("api", &[1])], ME, &HOST, 0).unwrap()[0];
    let slot = r.try_upstream_slots(up).unwrap()[0];
    // Column 0 belonged to a worker that died with 3 attempts in flight; the worker reclaiming it was killed too.
    r.peer(slot).inflight_by_worker[0].store(3, Relaxed);
    r.peer_head(slot).inflight.store(3, Relaxed);
    r.worker_pids()[0].store(RECLAIMING | dead_pid(), Relaxed);
    let a = r.attach_worker(ME, &HOST);
    let b = r.attach_worker(2, &|p: u32| p == ME || p == 2);
    let mut cols = [a, b];
    cols.sort();
    assert_eq!(cols, [Some(0), Some(1)], "both columns in use again");
    assert_eq!(r.peer_head(slot).inflight.load(Relaxed), 0, "the dead worker's in-flight count went back");
    assert!(r.header().repaired_markers.load(Relaxed) >= 1);

    // A marker whose owner is alive and holds a column is someone reclaiming right now: left alone.
    let other = if a == Some(0) { 1 } else { 0 };
    r.worker_pids()[other].store(RECLAIMING | ME, Relaxed);
    assert_eq!(r.attach_worker(3, &|_| true), None);
}

#[test]
fn a_writer_asks_once_whether_a_live_owner_runs_not_on_every_spin() {
    let r = region();
    r.configure(&[conf("api", &[1])], ME, &HOST, 0).unwrap();
    r.header().writer.store(owner::word(4242, 0), Relaxed);
    let asked = std::sync::atomic::AtomicU32::new(0);
    let live = |_: u32| {
        asked.fetch_add(1, Relaxed);
        true
    };
    assert_eq!(r.configure(&[conf("api", &[1, 2])], ME, &live, SEC), Err(ConfigError::Busy(4242)));
    assert_eq!(asked.load(Relaxed), 1, "a kill(2) and a /proc read per spin would block a worker for milliseconds");
}
