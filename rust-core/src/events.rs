//! A ring of the most recent state changes and decisions in shared memory, written by any worker, read by all.
//!
//! Writers take a sequence number with one atomic add and publish the record by storing `seq + 1` last; readers
//! copy a record and keep it only if its sequence number is the one they expected before and after the copy, so a
//! record overwritten meanwhile is skipped, never torn. The core also formats events as JSON, so the names of kinds
//! and reasons exist in one place.

use crate::health::{self, Reason};
use crate::layout::{Region, EVENT_KINDS, EVENT_RING};
use std::fmt::Write;
use std::sync::atomic::Ordering::*;

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
            _ => "unknown",
        }
    }

    /// Whether the event is a warning (something broke) rather than a notice.
    pub fn is_warning(k: u32) -> bool {
        matches!(k, EJECTED | PANIC_ON | EJECTION_SKIPPED | FALLBACK)
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

impl Region {
    /// Appends an event to the ring.
    pub fn emit(&self, now_us: u64, kind: u32, reason: Option<Reason>, upstream: u32, slot: u32, values: [f64; 4]) {
        let seq = self.header().event_seq.fetch_add(1, AcqRel);
        self.header().event_totals[(kind as usize).min(EVENT_KINDS - 1)].fetch_add(1, Relaxed);
        let e = &self.events()[(seq % EVENT_RING as u64) as usize];
        e.seq.store(0, Release);
        e.time_us.store(now_us, Relaxed);
        e.kind.store(kind, Relaxed);
        e.reason.store(reason.map_or(0, |r| r as u32), Relaxed);
        e.upstream.store(upstream, Relaxed);
        e.slot.store(slot, Relaxed);
        for (d, v) in e.values.iter().zip(values) {
            d.store(v.to_bits(), Relaxed);
        }
        e.seq.store(seq + 1, Release);
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
            if e.seq.load(Acquire) == seq + 1 {
                let rec = EventRecord {
                    seq,
                    time_us: e.time_us.load(Relaxed),
                    kind: e.kind.load(Relaxed),
                    reason: e.reason.load(Relaxed),
                    upstream: e.upstream.load(Relaxed),
                    slot: e.slot.load(Relaxed),
                    values: std::array::from_fn(|i| f64::from_bits(e.values[i].load(Relaxed))),
                };
                if e.seq.load(Acquire) == seq + 1 {
                    out[n] = rec;
                    n += 1;
                }
            }
            seq += 1;
        }
        (n, seq)
    }

    /// Claims the events not yet logged by any worker: returns `[from, to)`, empty when another worker claimed
    /// them first. Lets exactly one worker write each event to the error log.
    pub fn claim_events(&self) -> (u64, u64) {
        let logged = &self.header().events_logged;
        let head = self.event_head();
        let from = logged.load(Acquire);
        if from >= head || logged.compare_exchange(from, head, AcqRel, Acquire).is_err() {
            return (head, head);
        }
        (from, head)
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
            _ => &[],
        };
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
        let (from, to) = r.claim_events();
        assert_eq!((from, to), (0, EVENT_RING as u64 + 10));
        assert_eq!(r.claim_events().0, r.claim_events().1, "nothing left to claim");
        assert_eq!(r.event_totals()[kind::CONFIG as usize], EVENT_RING as u64 + 10, "totals outlive the ring");
        r.emit(0, kind::EJECTED, None, NO_PEER, NO_PEER, [0.0; 4]);
        r.emit(0, 99, None, NO_PEER, NO_PEER, [0.0; 4]);
        let totals = r.event_totals();
        assert_eq!((totals[kind::EJECTED as usize], totals[EVENT_KINDS - 1], totals.iter().sum::<u64>()), (1, 1, EVENT_RING as u64 + 12));
        let json = r.event_json(&out[0], 0);
        assert_eq!(json, "{\"seq\":10,\"time\":0.010,\"event\":\"config\",\"epoch\":10,\"upstreams\":1,\"peers\":2}");
    }
}
