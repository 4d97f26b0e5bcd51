//! A ring of the most recent state changes and decisions in shared memory, written by any worker, read by all.
//!
//! Writers take a sequence number with one atomic add; each record is a seqlock over its fields: the writer stores
//! `2·seq + 1` (odd: being written), `fence(Release)`, the fields, then `2·seq + 2` with Release; a reader loads the
//! word with Acquire, copies the fields, `fence(Acquire)` and loads it again, and keeps the copy only if both loads
//! read `2·seq + 2`, so a record overwritten meanwhile is skipped, never torn. Logging claims events in order and
//! never past one still being written: it waits for it (its writer is between two stores) and gives it up only after
//! [`ABANDON_US`], when its writer must have died. The core also formats events as JSON, so the names of kinds and
//! reasons exist in one place.

use crate::health::{self, Reason};
use crate::layout::{Region, EVENT_KINDS, EVENT_RING};
use std::fmt::Write;
use std::sync::atomic::{fence, Ordering::*};

/// Kinds of event.
pub mod kind {
    pub const EJECTED: u32 = 1;
    pub const HALF_OPEN: u32 = 2;
    pub const HEALTHY: u32 = 3;
    pub const PANIC_ON: u32 = 4;
    pub const PANIC_OFF: u32 = 5;
    pub const DRAINING: u32 = 6;
    pub const ENABLED: u32 = 7;
    pub const WEIGHT: u32 = 8;
    pub const PEER_ADDED: u32 = 9;
    pub const PEER_REMOVED: u32 = 10;
    pub const CONFIG: u32 = 11;
    pub const TUNED: u32 = 12;
    pub const EJECTION_SKIPPED: u32 = 13;
    pub const FALLBACK: u32 = 14;
    pub const RATE_TIGHTENED: u32 = 15;
    pub const RATE_RELAXED: u32 = 16;
    /// A scaling action (rust-core `scaling`, decided by the Lua scaler), up or down.
    pub const SCALE_UP: u32 = 17;
    pub const SCALE_DOWN: u32 = 18;
    /// A scale-from-zero episode (decided by the Lua scaler): the first instance asked for, the first peer ready,
    /// or the actuator failed.
    pub const ACTIVATING: u32 = 19;
    pub const ACTIVATED: u32 = 20;
    pub const ACTIVATION_FAILED: u32 = 21;
    /// A dependency (Redis, etcd, the DNS server, Prometheus, the scaling receiver) stopped answering: one per
    /// episode, written by the Lua side when the first attempt fails ([`dependency_name`] names it).
    pub const DEPENDENCY_DOWN: u32 = 22;
    /// The dependency of a `dependency_down` answers again (once per episode, with the failed attempts and how long).
    pub const DEPENDENCY_UP: u32 = 23;

    /// Name used in JSON and logs.
    pub fn name(k: u32) -> &'static str {
        match k {
            EJECTED => "ejected",
            HALF_OPEN => "half_open",
            HEALTHY => "healthy",
            PANIC_ON => "panic_on",
            PANIC_OFF => "panic_off",
            DRAINING => "draining",
            ENABLED => "enabled",
            WEIGHT => "weight",
            PEER_ADDED => "peer_added",
            PEER_REMOVED => "peer_removed",
            CONFIG => "config",
            TUNED => "tuned",
            EJECTION_SKIPPED => "ejection_skipped",
            FALLBACK => "fallback",
            RATE_TIGHTENED => "rate_tightened",
            RATE_RELAXED => "rate_relaxed",
            SCALE_UP => "scale_up",
            SCALE_DOWN => "scale_down",
            ACTIVATING => "activating",
            ACTIVATED => "activated",
            ACTIVATION_FAILED => "activation_failed",
            DEPENDENCY_DOWN => "dependency_down",
            DEPENDENCY_UP => "dependency_up",
            _ => "unknown",
        }
    }

    /// Whether the event is a warning (something broke) rather than a notice.
    pub fn is_warning(k: u32) -> bool {
        matches!(k, EJECTED | PANIC_ON | EJECTION_SKIPPED | FALLBACK | ACTIVATION_FAILED | DEPENDENCY_DOWN)
    }

    /// Dependencies of `dependency_down` / `dependency_up` events, by code (the event's `reason`).
    pub const DEPENDENCIES: [&str; 8] = ["", "redis", "etcd", "dns", "prometheus", "actuator", "consul", "kubernetes"];

    /// Name of dependency `code`, `None` when unknown.
    pub fn dependency_name(code: u32) -> Option<&'static str> {
        DEPENDENCIES.get(code as usize).copied().filter(|n| !n.is_empty())
    }
}

/// A copy of one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventRecord {
    pub seq: u64,
    pub time_us: u64,
    pub kind: u32,
    pub reason: u32,
    pub upstream: u32,
    /// Peer record, or `u32::MAX` for an upstream-wide event.
    pub slot: u32,
    pub values: [f64; 4],
}

/// No peer: an upstream-wide event.
pub const NO_PEER: u32 = u32::MAX;

/// How long an event may stay unpublished before logging gives it up and goes on (µs). A writer publishes within
/// nanoseconds of taking its number; one that has not after a second was killed in between (or will publish into a
/// record readers of the ring still see, just not in the log).
pub const ABANDON_US: u64 = 1_000_000;

/// The seqlock word of a record while event `seq` is being written into it (odd).
#[inline]
fn writing(seq: u64) -> u64 {
    seq.wrapping_mul(2).wrapping_add(1)
}

/// The seqlock word of a record holding event `seq`, complete (even, never 0).
#[inline]
fn published(seq: u64) -> u64 {
    seq.wrapping_mul(2).wrapping_add(2)
}

/// What one claimer remembers between calls of [`Region::claim_events`]: the oldest event it found still being
/// written, and when it first saw it so. One per worker (a worker's own memory, nothing shared).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClaimWait {
    seq: u64,
    since_us: u64,
    waiting: bool,
}

impl Region {
    /// Appends an event to the ring.
    pub fn emit(&self, now_us: u64, kind: u32, reason: Option<Reason>, upstream: u32, slot: u32, values: [f64; 4]) {
        let seq = self.header().event_seq.fetch_add(1, AcqRel);
        self.header().event_totals[(kind as usize).min(EVENT_KINDS - 1)].fetch_add(1, Relaxed);
        let e = &self.events()[(seq % EVENT_RING as u64) as usize];
        e.seq.store(writing(seq), Relaxed);
        fence(Release); // readers that see any field below see the odd word too
        e.time_us.store(now_us, Relaxed);
        e.kind.store(kind, Relaxed);
        e.reason.store(reason.map_or(0, |r| r as u32), Relaxed);
        e.upstream.store(upstream, Relaxed);
        e.slot.store(slot, Relaxed);
        for (d, v) in e.values.iter().zip(values) {
            d.store(v.to_bits(), Relaxed);
        }
        e.seq.store(published(seq), Release);
    }

    /// Events written since the region was created, per kind (index = kind), including those the ring no longer holds.
    pub fn event_totals(&self) -> [u64; EVENT_KINDS] {
        std::array::from_fn(|k| self.header().event_totals[k].load(Relaxed))
    }

    /// The next sequence number (events `0..next` were written; the last [`EVENT_RING`] are still there).
    pub fn event_head(&self) -> u64 {
        self.header().event_seq.load(Acquire)
    }

    /// Copies events from sequence `since` on into `out`; returns how many were copied and the sequence to ask
    /// for next. Events overwritten before they were read are skipped.
    pub fn read_events(&self, since: u64, out: &mut [EventRecord]) -> (usize, u64) {
        let head = self.event_head();
        let mut seq = since.max(head.saturating_sub(EVENT_RING as u64));
        let mut n = 0;
        while seq < head && n < out.len() {
            let e = &self.events()[(seq % EVENT_RING as u64) as usize];
            let word = published(seq);
            if e.seq.load(Acquire) == word {
                let rec = EventRecord {
                    seq,
                    time_us: e.time_us.load(Relaxed),
                    kind: e.kind.load(Relaxed),
                    reason: e.reason.load(Relaxed),
                    upstream: e.upstream.load(Relaxed),
                    slot: e.slot.load(Relaxed),
                    values: std::array::from_fn(|i| f64::from_bits(e.values[i].load(Relaxed))),
                };
                fence(Acquire); // the copy above is ordered before the second load
                if e.seq.load(Relaxed) == word {
                    out[n] = rec;
                    n += 1;
                }
            }
            seq += 1;
        }
        (n, seq)
    }

    /// Claims the events not yet logged by any worker: returns `[from, to)`, empty when there are none or another
    /// worker claimed them first. Lets exactly one worker write each event to the error log. The range stops before
    /// the first event still being written, so that it is logged by a later call once complete; `wait` (the
    /// caller's, kept between calls) notes since when, and after [`ABANDON_US`] that event is given up (claimed
    /// and so skipped by the reader) so that a writer killed mid-event cannot stop the log. Events the ring no
    /// longer holds are claimed at once (the reader skips them).
    pub fn claim_events(&self, now_us: u64, wait: &mut ClaimWait) -> (u64, u64) {
        let logged = &self.header().events_logged;
        let head = self.event_head();
        let from = logged.load(Acquire);
        if from >= head {
            return (head, head);
        }
        let mut to = from.max(head.saturating_sub(EVENT_RING as u64));
        while to < head {
            let word = self.events()[(to % EVENT_RING as u64) as usize].seq.load(Acquire);
            // Below `published(to)`: its writer has the number but has not published yet (a word above it means
            // the record was overwritten by a later event: gone, nothing to wait for).
            if word < published(to) {
                if !wait.waiting || wait.seq != to {
                    *wait = ClaimWait { seq: to, since_us: now_us, waiting: true };
                    break;
                }
                if now_us.saturating_sub(wait.since_us) < ABANDON_US {
                    break;
                }
            }
            to += 1;
        }
        if to == from || logged.compare_exchange(from, to, AcqRel, Acquire).is_err() {
            return (from, from);
        }
        (from, to)
    }

    /// Notes that upstream `up` served a fallback response: emits a `fallback` event when none was served in the
    /// last `quiet_us` (one event per episode, whichever worker serves it). Returns whether it emitted.
    /// Records a scaling action of upstream `up` from `current` to `desired` instances (`ready` serving now) as a
    /// `scale_up` or `scale_down` event. Returns false for an unknown upstream or no change.
    pub fn note_scale(&self, up: u32, current: u32, desired: u32, ready: u32, panic: bool, now_us: u64) -> bool {
        if up >= self.params().max_upstreams || current == desired {
            return false;
        }
        let k = if desired > current { kind::SCALE_UP } else { kind::SCALE_DOWN };
        let v = [current as f64, desired as f64, ready as f64, if panic { 1.0 } else { 0.0 }];
        self.emit(now_us, k, None, up, NO_PEER, v);
        true
    }

    /// Records a step of a scale-from-zero episode of upstream `up`: `kind` is [`kind::ACTIVATING`] (`a` = desired,
    /// `b` = held requests), [`kind::ACTIVATED`] (`a` = cold start in seconds, `b` = ready peers) or
    /// [`kind::ACTIVATION_FAILED`] (`a` = attempts, `b` = seconds until the next try). Returns false for an unknown
    /// upstream or kind.
    pub fn note_activation(&self, up: u32, k: u32, a: f64, b: f64, now_us: u64) -> bool {
        if up >= self.params().max_upstreams || !matches!(k, kind::ACTIVATING | kind::ACTIVATED | kind::ACTIVATION_FAILED) {
            return false;
        }
        let clean = |x: f64| if x.is_finite() { x } else { 0.0 };
        self.emit(now_us, k, None, up, NO_PEER, [clean(a), clean(b), 0.0, 0.0]);
        true
    }

    /// A `dependency_down` (`up` false) or `dependency_up` event of dependency `dep` (a code of
    /// [`kind::DEPENDENCIES`]) for upstream `up` (or `NO_PEER` for none): `failures` attempts failed in the episode,
    /// `down_for` seconds. False (nothing written) for an unknown dependency or upstream.
    pub fn note_dependency(&self, up: u32, dep: u32, back: bool, failures: f64, down_for: f64, now_us: u64) -> bool {
        if kind::dependency_name(dep).is_none() || (up != NO_PEER && up >= self.params().max_upstreams) {
            return false;
        }
        let k = if back { kind::DEPENDENCY_UP } else { kind::DEPENDENCY_DOWN };
        let v = [dep as f64, failures, down_for, 0.0];
        self.emit(now_us, k, None, up, NO_PEER, v);
        true
    }

    pub fn note_fallback(&self, up: u32, status: u32, now_us: u64, quiet_us: u64) -> bool {
        if up >= self.params().max_upstreams {
            return false;
        }
        let h = self.upstream(up).head;
        let last = h.fallback_us.swap(now_us, AcqRel);
        if last != 0 && now_us.saturating_sub(last) < quiet_us {
            return false;
        }
        let (mut healthy, mut total) = (0, 0);
        for slot in self.upstream_slots(up) {
            total += 1;
            if self.peer_head(slot).health.load(Relaxed) == health::state::HEALTHY {
                healthy += 1;
            }
        }
        self.emit(now_us, kind::FALLBACK, None, up, NO_PEER, [status as f64, healthy as f64, total as f64, 0.0]);
        true
    }

    /// The event as one JSON object; `wall_offset_us` converts the monotonic time to Unix time.
    pub fn event_json(&self, e: &EventRecord, wall_offset_us: i64) -> String {
        let mut s = String::with_capacity(200);
        let time = (e.time_us as i64 + wall_offset_us) as f64 / 1e6;
        let _ = write!(s, "{{\"seq\":{},\"time\":{:.3},\"event\":\"{}\"", e.seq, time, kind::name(e.kind));
        if let Some(r) = Reason::from_u32(e.reason) {
            let _ = write!(s, ",\"reason\":\"{}\"", r.name());
        }
        if e.upstream != NO_PEER {
            let _ = write!(s, ",\"upstream\":\"{}\"", json_safe(&self.upstream_name(e.upstream)));
        }
        if e.slot != NO_PEER {
            let _ = write!(s, ",\"peer\":\"{}\"", json_safe(&self.peer_addr(e.slot)));
        }
        let v = e.values;
        let num = |x: f64| if x.is_finite() { format!("{}", (x * 1e6).round() / 1e6) } else { "null".into() };
        let fields: &[(&str, f64)] = match e.kind {
            kind::EJECTED => match Reason::from_u32(e.reason) {
                Some(Reason::SuccessRate) => &[("ejection_time", v[0]), ("times_ejected", v[1]), ("success_rate", v[2]), ("threshold", v[3])],
                Some(Reason::FailurePercentage) => &[("ejection_time", v[0]), ("times_ejected", v[1]), ("failure_percentage", v[2]), ("requests", v[3])],
                Some(Reason::HalfOpenTimeout) => &[("ejection_time", v[0]), ("times_ejected", v[1]), ("half_open_for", v[2])],
                _ => &[("ejection_time", v[0]), ("times_ejected", v[1]), ("consecutive", v[2])],
            },
            kind::HALF_OPEN => &[("times_ejected", v[0])],
            kind::HEALTHY => &[("times_ejected", v[0]), ("successes", v[1])],
            kind::PANIC_ON | kind::PANIC_OFF => &[("healthy", v[0]), ("total", v[1]), ("panic_threshold", v[2])],
            kind::WEIGHT => &[("old", v[0]), ("new", v[1])],
            kind::PEER_ADDED | kind::PEER_REMOVED => &[("weight", v[0])],
            kind::CONFIG => &[("epoch", v[0]), ("upstreams", v[1]), ("peers", v[2])],
            kind::EJECTION_SKIPPED => &[("ejected", v[0]), ("total", v[1]), ("max_ejection_percent", v[2])],
            kind::FALLBACK => &[("status", v[0]), ("healthy", v[1]), ("total", v[2])],
            kind::RATE_TIGHTENED | kind::RATE_RELAXED => &[("rate_factor", v[0]), ("overloaded", v[1]), ("scale_up_pending", v[2]), ("limit", v[3])],
            kind::SCALE_UP | kind::SCALE_DOWN => &[("current", v[0]), ("desired", v[1]), ("ready", v[2]), ("panic", v[3])],
            kind::ACTIVATING => &[("desired", v[0]), ("held", v[1])],
            kind::ACTIVATED => &[("cold_start", v[0]), ("ready", v[1])],
            kind::ACTIVATION_FAILED => &[("attempts", v[0]), ("retry_in", v[1])],
            kind::DEPENDENCY_DOWN => &[("failures", v[1])],
            kind::DEPENDENCY_UP => &[("failures", v[1]), ("down_for", v[2])],
            _ => &[],
        };
        if let kind::DEPENDENCY_DOWN | kind::DEPENDENCY_UP = e.kind {
            let _ = write!(s, ",\"dependency\":\"{}\"", kind::dependency_name(v[0] as u32).unwrap_or("unknown"));
        }
        for (name, x) in fields {
            let _ = write!(s, ",\"{}\":{}", name, num(*x));
        }
        if e.slot != NO_PEER {
            let _ = write!(s, ",\"state\":\"{}\"", health::state::name(self.peer_head(e.slot).health.load(Relaxed)));
        }
        s.push('}');
        s
    }
}

/// Names and addresses are restricted by validation; this only guards the JSON against anything unexpected.
fn json_safe(s: &str) -> String {
    s.chars().filter(|c| !c.is_control() && *c != '"' && *c != '\\').collect()
}

impl Default for EventRecord {
    fn default() -> Self {
        EventRecord { seq: 0, time_us: 0, kind: 0, reason: 0, upstream: 0, slot: NO_PEER, values: [0.0; 4] }
    }
}

#[cfg(test)]
mod tests {
    use crate::layout::{Params, Region, EVENT_RING};

    use super::*;

    #[test]
    fn ring_keeps_the_latest_and_claims_once() {
        let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 2, max_workers: 2, ..Params::default() }, 0).unwrap();
        for i in 0..(EVENT_RING as u64 + 10) {
            r.emit(i * 1000, kind::CONFIG, None, NO_PEER, NO_PEER, [i as f64, 1.0, 2.0, 0.0]);
        }
        let mut out = vec![EventRecord::default(); 20];
        let (n, next) = r.read_events(0, &mut out);
        assert_eq!(n, 20);
        assert_eq!(out[0].seq, 10, "the oldest 10 were overwritten");
        assert_eq!(next, 30);
        let mut wait = ClaimWait::default();
        let (from, to) = r.claim_events(0, &mut wait);
        assert_eq!((from, to), (0, EVENT_RING as u64 + 10));
        let again = r.claim_events(0, &mut wait);
        assert_eq!(again.0, again.1, "nothing left to claim");
        assert_eq!(r.event_totals()[kind::CONFIG as usize], EVENT_RING as u64 + 10, "totals outlive the ring");
        r.emit(0, kind::EJECTED, None, NO_PEER, NO_PEER, [0.0; 4]);
        r.emit(0, 99, None, NO_PEER, NO_PEER, [0.0; 4]);
        let totals = r.event_totals();
        assert_eq!((totals[kind::EJECTED as usize], totals[EVENT_KINDS - 1], totals.iter().sum::<u64>()), (1, 1, EVENT_RING as u64 + 12));
        let json = r.event_json(&out[0], 0);
        assert_eq!(json, "{\"seq\":10,\"time\":0.010,\"event\":\"config\",\"epoch\":10,\"upstreams\":1,\"peers\":2}");
    }

    #[test]
    fn activation_steps_are_events_with_their_fields() {
        let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 2, max_workers: 2, ..Params::default() }, 0).unwrap();
        assert!(r.note_activation(1, kind::ACTIVATING, 1.0, 3.0, 1_000));
        assert!(r.note_activation(1, kind::ACTIVATED, 0.25, 1.0, 2_000));
        assert!(r.note_activation(1, kind::ACTIVATION_FAILED, 3.0, f64::NAN, 3_000));
        assert!(!r.note_activation(2, kind::ACTIVATED, 0.25, 1.0, 4_000), "unknown upstream");
        assert!(!r.note_activation(1, kind::CONFIG, 0.0, 0.0, 4_000), "not an activation kind");
        let mut out = vec![EventRecord::default(); 4];
        assert_eq!(r.read_events(0, &mut out).0, 3);
        let names: Vec<_> = out[..3].iter().map(|e| kind::name(e.kind)).collect();
        assert_eq!(names, ["activating", "activated", "activation_failed"]);
        assert!(kind::is_warning(kind::ACTIVATION_FAILED) && !kind::is_warning(kind::ACTIVATED));
        let json = r.event_json(&out[2], 0);
        assert!(json.contains("\"event\":\"activation_failed\"") && json.contains("\"attempts\":3,\"retry_in\":0"), "{json}");
    }

    /// A writer that took its number and has not published (preempted, or killed between its stores): logging
    /// stops before its event until it is complete, and gives it up after ABANDON_US so that the log goes on.
    #[test]
    fn an_event_still_being_written_is_claimed_once_complete_or_given_up() {
        let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 2, max_workers: 2, ..Params::default() }, 0).unwrap();
        let stalled = |r: &Region| {
            let seq = r.header().event_seq.fetch_add(1, AcqRel);
            r.events()[(seq % EVENT_RING as u64) as usize].seq.store(writing(seq), Relaxed);
            seq
        };
        r.emit(0, kind::CONFIG, None, NO_PEER, NO_PEER, [0.0; 4]); // 0
        let one = stalled(&r); // 1
        r.emit(0, kind::CONFIG, None, NO_PEER, NO_PEER, [2.0; 4]); // 2
        let mut wait = ClaimWait::default();
        assert_eq!(r.claim_events(1_000, &mut wait), (0, 1), "stops before the event being written");
        assert_eq!(r.claim_events(2_000, &mut wait), (1, 1), "and waits for it");
        let mut other = ClaimWait::default(); // another worker: its own wait starts now
        assert_eq!(r.claim_events(ABANDON_US + 1_500, &mut other), (1, 1));
        // the writer completes: claimed and read
        r.events()[one as usize].seq.store(published(one), Release);
        assert_eq!(r.claim_events(3_000, &mut wait), (1, 3));
        let mut out = vec![EventRecord::default(); 4];
        assert_eq!(r.read_events(1, &mut out).0, 2);
        // a writer that never completes: given up after ABANDON_US, and the reader skips its record
        let four = {
            r.emit(0, kind::CONFIG, None, NO_PEER, NO_PEER, [3.0; 4]); // 3
            stalled(&r) // 4
        };
        r.emit(0, kind::CONFIG, None, NO_PEER, NO_PEER, [5.0; 4]); // 5
        assert_eq!(r.claim_events(10_000, &mut wait), (3, 4));
        assert_eq!(r.claim_events(10_000 + ABANDON_US - 1, &mut wait), (4, 4));
        assert_eq!(r.claim_events(10_000 + ABANDON_US, &mut wait), (4, 6), "given up after ABANDON_US");
        let (n, next) = r.read_events(four, &mut out);
        assert_eq!((n, out[0].seq, next), (1, 5, 6), "the abandoned record is skipped");
    }

    #[test]
    fn dependency_events_name_the_dependency() {
        let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 2, max_workers: 2, ..Params::default() }, 0).unwrap();
        assert!(r.note_dependency(NO_PEER, 1, false, 1.0, 0.0, 1_000));
        assert!(r.note_dependency(NO_PEER, 1, true, 7.0, 2.5, 2_000));
        assert!(!r.note_dependency(NO_PEER, 0, false, 1.0, 0.0, 3_000), "unknown dependency");
        assert!(!r.note_dependency(NO_PEER, 99, false, 1.0, 0.0, 3_000), "unknown dependency");
        assert!(!r.note_dependency(5, 1, false, 1.0, 0.0, 3_000), "unknown upstream");
        let mut out = vec![EventRecord::default(); 4];
        assert_eq!(r.read_events(0, &mut out).0, 2);
        assert_eq!(r.event_json(&out[0], 0), "{\"seq\":0,\"time\":0.001,\"event\":\"dependency_down\",\"dependency\":\"redis\",\"failures\":1}");
        assert_eq!(r.event_json(&out[1], 0), "{\"seq\":1,\"time\":0.002,\"event\":\"dependency_up\",\"dependency\":\"redis\",\"failures\":7,\"down_for\":2.5}");
        assert!(kind::is_warning(kind::DEPENDENCY_DOWN) && !kind::is_warning(kind::DEPENDENCY_UP));
    }
}
