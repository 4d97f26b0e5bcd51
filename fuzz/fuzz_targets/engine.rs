//! Structure-aware target of the engine: random sequences of configure, pick, end/finish of attempts, upkeep (tick,
//! recover), run-time changes and worker death (a worker killed between two steps, or a configuration writer killed
//! in its critical section), played by several simulated workers on one region. After every step:
//! - the in-flight count of every peer record equals the attempts begun on it and not ended, plus those of killed
//!   workers whose column nobody has reclaimed yet (so it is never negative), and it is 0 once all attempts ended;
//! - a pick of upstream U returns a record of U that U's peer list holds (never another upstream's peer);
//! - every upstream seqlock is even whenever no writer holds the lock;
//! - a refused configuration or run-time change leaves the configuration and its epoch as they were.
#![no_main]
use arbitrary::{Arbitrary, Unstructured};
use autoscale_core::engine::{PeerConf, UpstreamConf, UpstreamParams};
use autoscale_core::layout::{state, Params, Region};
use autoscale_core::owner::Processes;
use autoscale_core::rng::XorShift64;
use autoscale_core::select::Algorithm;
use autoscale_core::Outcome;
use libfuzzer_sys::fuzz_target;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::*;

const WORKERS: usize = 3;
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Arbitrary, Debug)]
enum Op {
    Configure { worker: u8, ups: Vec<(u8, u8, Vec<(u8, u16)>)>, kill_in_critical_section: bool },
    Pick { worker: u8, up: u8, tried: u8 },
    Finish { attempt: u8, outcome: u8, latency_us: u16 },
    End { attempt: u8, outcome: u8, latency_us: u16 },
    Tick { worker: u8, advance_ms: u16 },
    Kill { worker: u8 },
    Attach { worker: u8 },
    AddPeer { worker: u8, up: u8, addr: u8, weight: u16 },
    RemovePeer { worker: u8, up: u8, addr: u8 },
    SetWeight { worker: u8, up: u8, addr: u8, weight: u16 },
    ChangePeers { worker: u8, up: u8, changes: Vec<(u8, u16)> },
    Drain { up: u8, addr: u8, on: bool },
    Tune { worker: u8, up: u8, algorithm: u8, retries: u8 },
}

/// The simulated processes: which pids are alive, and whether the next writer dies in its critical section.
struct Host {
    alive: RefCell<HashSet<u32>>,
    kill_writer: Cell<Option<u32>>,
}

/// The unwinding that stands for a writer killed in its critical section (no destructor of the engine releases
/// the writer lock or the seqlock: they stay as a SIGKILL leaves them).
struct Killed;

impl Processes for Host {
    fn alive(&self, pid: u32) -> bool {
        self.alive.borrow().contains(&pid)
    }
    fn in_critical_section(&self) {
        if let Some(pid) = self.kill_writer.take() {
            self.alive.borrow_mut().remove(&pid);
            std::panic::resume_unwind(Box::new(Killed)); // resume_unwind: no panic hook (libFuzzer's aborts)
        }
    }
}

struct Worker {
    pid: u32,
    col: Option<u32>,
}

struct Attempt {
    pid: u32,
    col: Option<u32>,
    slot: u32,
    gen: u32,
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i % 4], 8000 + (i % 8) as u16))
}

fn outcome(o: u8) -> Outcome {
    [Outcome::Success, Outcome::Http5xx, Outcome::Gateway, Outcome::Connect, Outcome::Timeout, Outcome::Aborted][o as usize % 6]
}

struct Sim {
    r: Region,
    host: Host,
    workers: Vec<Worker>,
    next_pid: u32,
    attempts: Vec<Attempt>,
    /// Attempts of killed workers not yet reclaimed: (column, slot).
    orphans: Vec<(u32, u32)>,
    now: u64,
    rng: XorShift64,
}

impl Sim {
    fn worker(&self, w: u8) -> usize {
        w as usize % WORKERS
    }

    fn attach(&mut self, w: usize) {
        let pid = self.workers[w].pid;
        let first = self.workers[w].col.is_none();
        let col = if first { self.r.attach_new_worker(pid, &self.host) } else { self.r.attach_worker(pid, &self.host) };
        // Attaching reclaims the columns of every dead worker.
        let dead: HashSet<u32> = self.r.worker_pids().iter().map(|p| p.load(Relaxed)).filter(|&p| p != 0 && !self.host.alive(p)).collect();
        assert!(dead.is_empty(), "columns of dead workers left after an attach: {dead:?}");
        self.orphans.clear();
        if let Some(c) = col {
            if let Some(old) = self.workers[w].col {
                assert_eq!(old, c, "a worker keeps its column");
            }
        }
        self.workers[w].col = col.or(self.workers[w].col);
        assert!(col.is_some(), "a column for each of {WORKERS} workers in a region of {WORKERS}");
    }

    fn kill(&mut self, w: usize) {
        let old = std::mem::replace(&mut self.workers[w], Worker { pid: self.next_pid, col: None });
        self.next_pid += 1;
        self.host.alive.borrow_mut().remove(&old.pid);
        self.host.alive.borrow_mut().insert(self.workers[w].pid);
        let (gone, kept) = std::mem::take(&mut self.attempts).into_iter().partition(|a| a.pid == old.pid);
        self.attempts = kept;
        let gone: Vec<Attempt> = gone;
        self.orphans.extend(gone.iter().map(|a| (a.col.expect("attempts are begun by attached workers"), a.slot)));
    }

    fn index(&self, up: u8) -> Option<u32> {
        self.r.find_upstream(NAMES[up as usize % NAMES.len()])
    }

    fn epoch(&self) -> u64 {
        self.r.header().config_epoch.load(Relaxed)
    }

    /// Runs a change that may be refused: refused, it changes nothing (unless a killed writer's lock was in the way:
    /// taking it over repairs what that writer left half-written, a change of its own).
    fn refusable<E: std::fmt::Debug>(&mut self, f: impl FnOnce(&Self) -> Result<(), E>) {
        let (before, epoch) = (self.r.current_config(), self.epoch());
        let locked = self.r.header().writer.load(Relaxed) != 0;
        if f(self).is_err() && !locked {
            assert_eq!(self.epoch(), epoch, "a refused change keeps the epoch");
            assert_eq!(format!("{:?}", self.r.current_config()), format!("{before:?}"), "a refused change changes nothing");
        }
    }

    fn step(&mut self, op: Op) {
        self.now += 1000;
        match op {
            Op::Configure { worker, ups, kill_in_critical_section } => {
                let w = self.worker(worker);
                let pid = self.workers[w].pid;
                let mut confs: Vec<UpstreamConf> = ups
                    .into_iter()
                    .take(4)
                    .map(|(name, algo, peers)| UpstreamConf {
                        name: NAMES[name as usize % NAMES.len()].into(),
                        params: UpstreamParams { algorithm: Algorithm::from_u32(algo as u32 % 3), ..UpstreamParams::default() },
                        peers: peers.into_iter().take(6).map(|(a, weight)| PeerConf { addr: addr(a), weight: weight as u32 % 10_002 }).collect(),
                    })
                    .collect();
                confs.retain(|u| !u.peers.is_empty());
                if kill_in_critical_section {
                    self.host.kill_writer.set(Some(pid));
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.r.configure(&confs, pid, &self.host, self.now)));
                    self.host.kill_writer.set(None);
                    if r.is_err() {
                        // The writer died in its critical section: its worker is gone with its attempts.
                        self.host.alive.borrow_mut().insert(pid); // `kill` below takes it away with the rest
                        self.kill(w);
                        return;
                    }
                } else {
                    let now = self.now;
                    self.refusable(|s| s.r.configure(&confs, pid, &s.host, now).map(|_| ()));
                }
            }
            Op::Pick { worker, up, tried } => {
                let w = self.worker(worker);
                if self.workers[w].col.is_none() {
                    self.attach(w);
                }
                let Some(idx) = self.index(up) else { return };
                let Some(ugen) = self.r.upstream_gen(idx) else { return };
                let col = self.workers[w].col;
                let tried_fn = |s: u32| tried & (1 << (s % 8)) != 0;
                if let Ok(p) = self.r.pick_at(idx, ugen, &tried_fn, self.now, &mut self.rng, col) {
                    let h = self.r.peer_head(p.slot);
                    assert_eq!(h.upstream.load(Relaxed), idx, "picked a peer of another upstream");
                    assert_eq!(h.state.load(Relaxed), state::ACTIVE, "picked a record that is not active");
                    // The list is checked while consistent (a killed writer leaves it odd until the upkeep repairs it;
                    // a pick then takes the list as it is, and only records this upstream owns).
                    if self.r.upstream(idx).head.seq.load(Relaxed) & 1 == 0 {
                        assert!(self.r.upstream_slots(idx).contains(&p.slot), "picked a peer not in the upstream's list");
                    }
                    self.attempts.push(Attempt { pid: self.workers[w].pid, col, slot: p.slot, gen: p.gen });
                }
            }
            Op::Finish { attempt, outcome: o, latency_us } | Op::End { attempt, outcome: o, latency_us }
                if !self.attempts.is_empty() =>
            {
                let finish = matches!(op, Op::Finish { .. });
                let a = self.attempts.swap_remove(attempt as usize % self.attempts.len());
                let (o, lat) = (outcome(o), latency_us as u64);
                if finish {
                    self.r.finish_attempt(a.slot, a.gen, a.col, o, lat, self.now, &mut self.rng);
                } else {
                    self.r.end_attempt(a.slot, a.gen, a.col, o, lat, self.now);
                    self.r.record(a.slot, a.gen, o, lat, self.now, &mut self.rng);
                }
            }
            Op::Finish { .. } | Op::End { .. } => {}
            Op::Tick { worker, advance_ms } => {
                self.now += advance_ms as u64 * 1000;
                let pid = self.workers[self.worker(worker)].pid;
                self.r.recover(pid, &self.host, self.now);
                self.r.tick(self.now, &mut self.rng);
            }
            Op::Kill { worker } => {
                let w = self.worker(worker);
                self.kill(w);
            }
            Op::Attach { worker } => {
                let w = self.worker(worker);
                self.attach(w);
            }
            Op::AddPeer { worker, up, addr: a, weight } => {
                let (pid, now, idx) = (self.workers[self.worker(worker)].pid, self.now, self.index(up).unwrap_or(up as u32));
                self.refusable(|s| s.r.add_peer(idx, &addr(a).to_string(), weight as u32 % 10_002, pid, &s.host, now));
            }
            Op::RemovePeer { worker, up, addr: a } => {
                let (pid, now, idx) = (self.workers[self.worker(worker)].pid, self.now, self.index(up).unwrap_or(up as u32));
                self.refusable(|s| s.r.remove_peer(idx, &addr(a).to_string(), pid, &s.host, now));
            }
            Op::SetWeight { worker, up, addr: a, weight } => {
                let (pid, now, idx) = (self.workers[self.worker(worker)].pid, self.now, self.index(up).unwrap_or(up as u32));
                self.refusable(|s| s.r.set_weight(idx, &addr(a).to_string(), weight as u32 % 10_002, pid, &s.host, now));
            }
            Op::ChangePeers { worker, up, changes } => {
                let (pid, now, idx) = (self.workers[self.worker(worker)].pid, self.now, self.index(up).unwrap_or(up as u32));
                let set: Vec<PeerConf> = changes.into_iter().take(6).map(|(a, w)| PeerConf { addr: addr(a), weight: w as u32 % 10_002 }).collect();
                self.refusable(|s| s.r.change_peers(idx, &set, pid, &s.host, now).map(|_| ()));
            }
            Op::Drain { up, addr: a, on } => {
                if let Some(slot) = self.index(up).and_then(|i| self.r.find_peer(i, &addr(a).to_string())) {
                    self.r.set_draining(slot, on, self.now);
                }
            }
            Op::Tune { worker, up, algorithm, retries } => {
                let (pid, now, idx) = (self.workers[self.worker(worker)].pid, self.now, self.index(up).unwrap_or(up as u32));
                let params = UpstreamParams { algorithm: Algorithm::from_u32(algorithm as u32 % 3), retries: retries as u32, ..UpstreamParams::default() };
                self.refusable(|s| s.r.tune(idx, params, pid, &s.host, now));
            }
        }
    }

    fn check(&self) {
        let p = self.r.params();
        for slot in 0..p.max_peers {
            let peer = self.r.peer(slot);
            let inflight = peer.head.inflight.load(Relaxed);
            let live = self.attempts.iter().filter(|a| a.slot == slot).count();
            let orphaned = self.orphans.iter().filter(|o| o.1 == slot).count();
            assert!(inflight >= 0, "record {slot}: in flight {inflight}");
            assert_eq!(inflight as usize, live + orphaned, "record {slot}: in flight {inflight}, {live} live attempts, {orphaned} of dead workers");
            for (col, c) in peer.inflight_by_worker.iter().enumerate() {
                let want = self.attempts.iter().filter(|a| a.slot == slot && a.col == Some(col as u32)).count()
                    + self.orphans.iter().filter(|o| o.1 == slot && o.0 == col as u32).count();
                assert_eq!(c.load(Relaxed) as usize, want, "record {slot}, column {col}");
            }
        }
        if self.r.header().writer.load(Relaxed) == 0 {
            for i in 0..p.max_upstreams {
                let seq = self.r.upstream(i).head.seq.load(Relaxed);
                assert_eq!(seq & 1, 0, "upstream {i}: seqlock odd ({seq}) with no writer");
            }
        }
    }
}

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let params = Params { max_upstreams: 3, max_peers: u.int_in_range(2..=10)?, max_workers: WORKERS as u32, window_buckets: 4, bucket_ms: 100, rate_slots: 64 };
    let host = Host { alive: RefCell::new((1..=WORKERS as u32).collect()), kill_writer: Cell::new(None) };
    let mut sim = Sim {
        r: Region::new_heap(params, 0).expect("valid params"),
        host,
        workers: (1..=WORKERS as u32).map(|pid| Worker { pid, col: None }).collect(),
        next_pid: WORKERS as u32 + 1,
        attempts: Vec::new(),
        orphans: Vec::new(),
        now: 0,
        rng: XorShift64::new(u.arbitrary::<u64>()? | 1),
    };
    let mut steps = 0;
    while !u.is_empty() && steps < 200 {
        let op: Op = u.arbitrary()?;
        if std::env::var_os("FUZZ_DEBUG").is_some() {
            eprintln!("{op:?}");
        }
        sim.step(op);
        sim.check();
        steps += 1;
    }
    // Every attempt ends; the columns of dead workers are reclaimed by an attach (or a live worker's next one).
    while let Some(a) = sim.attempts.pop() {
        sim.r.finish_attempt(a.slot, a.gen, a.col, Outcome::Success, 1, sim.now, &mut sim.rng);
    }
    sim.attach(0);
    sim.check();
    for slot in 0..params.max_peers {
        assert_eq!(sim.r.peer_head(slot).inflight.load(Relaxed), 0, "record {slot}: in flight after every attempt ended");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
