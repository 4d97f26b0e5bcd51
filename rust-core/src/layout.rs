//! The shared-memory region: its header, and the fixed-size records of workers, upstreams and peers.
//!
//! This is the only module of the core with `unsafe` code: it turns offsets in one mapped region into references to
//! records. Everything in a record is an atomic integer, valid for any bit pattern and shared between processes.
//!
//! ```text
//! Header | worker pids [max_workers] | events [EVENT_RING] | upstream records [max_upstreams] | peer records [max_peers]
//! upstream record = UpstreamHead + peer slot list [max_peers]
//! peer record     = PeerHead + window buckets [window_buckets + 1] + in-flight per worker [max_workers]
//! then: admission records [max_upstreams] | admission column owners [max_workers] | rate buckets [rate_slots]
//! admission record = AdmissionHead + in-flight per (worker + 1 spare column) and class [(max_workers + 1) * CLASSES]
//!                    + queue waiters per column [max_workers + 1]
//! ```
//! The region is mapped `MAP_SHARED | MAP_ANONYMOUS` in the nginx master before it forks, so every worker sees the
//! same memory; it is never unmapped, so a reload reuses it and a worker killed mid-request cannot take it away. The
//! header carries a magic number, a layout version and the parameters; [`Region::check`] refuses a region whose header
//! does not match what this build expects.
#![allow(unsafe_code)]

use crate::window::WindowBucket;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

/// "ASCALE" and a format number.
pub const MAGIC: u64 = u64::from_le_bytes(*b"ASCALE\x00\x01");
/// Bumped whenever any record changes shape.
pub const LAYOUT_VERSION: u32 = 9;
/// Events kept in the ring (the most recent ones).
pub const EVENT_RING: usize = 1024;
/// Event kinds counted in [`Header::event_totals`] (kinds at or above it count in the last one).
pub const EVENT_KINDS: usize = 32;

/// Sizes of the region, fixed for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Upstream records.
    pub max_upstreams: u32,
    /// Peer records (shared by all upstreams).
    pub max_peers: u32,
    /// Worker processes that can be tracked at once (old and new generations during a reload count together).
    pub max_workers: u32,
    /// Buckets of the rolling window.
    pub window_buckets: u32,
    /// Width of a bucket in milliseconds.
    pub bucket_ms: u32,
    /// Token buckets of the rate limits, shared by all upstreams and rules (a power of two).
    pub rate_slots: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_upstreams: 64,
            max_peers: 256,
            max_workers: 64,
            window_buckets: 10,
            bucket_ms: 1000,
            rate_slots: 4096,
        }
    }
}

/// Why a region could not be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{field} must be between {min} and {max} (got {got})")]
    Range {
        field: &'static str,
        min: u64,
        max: u64,
        got: u64,
    },
    #[error("{field} must be a power of two (got {got})")]
    PowerOfTwo { field: &'static str, got: u64 },
    #[error("shared memory of {0} bytes could not be mapped: {1}")]
    Map(usize, String),
    #[error(
        "the shared region is not ours or was written by another version (magic/version mismatch)"
    )]
    Foreign,
    #[error("restart nginx to resize the shared region (a reload cannot): {}", differences(.have, .want))]
    Mismatch { have: Params, want: Params },
}

/// Why [`Region::from_shared_raw`] refused a region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("no shared region")]
    Null,
    #[error("the memory is not a resty.autoscale region (magic number)")]
    Magic,
    #[error("the shared region has layout version {have}, this build needs layout version {want}")]
    Version { have: u32, want: u32 },
    #[error("the shared region's header does not match its size")]
    Size,
}

fn differences(have: &Params, want: &Params) -> String {
    let fields = [
        ("max_upstreams", have.max_upstreams, want.max_upstreams),
        ("max_peers", have.max_peers, want.max_peers),
        ("max_workers", have.max_workers, want.max_workers),
        ("window.buckets", have.window_buckets, want.window_buckets),
        ("window.bucket_ms", have.bucket_ms, want.bucket_ms),
        ("admission_rate_slots", have.rate_slots, want.rate_slots),
    ];
    let parts: Vec<String> = fields
        .iter()
        .filter(|(_, h, w)| h != w)
        .map(|(name, h, w)| {
            format!("{name} is {h} in the running region, {w} in the new configuration")
        })
        .collect();
    parts.join("; ")
}

impl Params {
    /// Checks every size against its limits.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let check = |field, got: u32, min: u32, max: u32| {
            if got < min || got > max {
                Err(LayoutError::Range {
                    field,
                    min: min as u64,
                    max: max as u64,
                    got: got as u64,
                })
            } else {
                Ok(())
            }
        };
        check("max_upstreams", self.max_upstreams, 1, 4096)?;
        check("max_peers", self.max_peers, 1, 65536)?;
        check("max_workers", self.max_workers, 1, 1024)?;
        check("window.buckets", self.window_buckets, 1, 600)?;
        check("window.bucket_ms", self.bucket_ms, 10, 60_000)?;
        check("admission_rate_slots", self.rate_slots, 64, 1 << 20)?;
        if !self.rate_slots.is_power_of_two() {
            return Err(LayoutError::PowerOfTwo { field: "admission_rate_slots", got: self.rate_slots as u64 });
        }
        Ok(())
    }
}

/// Text of up to 63 bytes in atomics.
#[repr(C)]
pub struct Text64 {
    len: AtomicU32,
    _pad: u32,
    words: [AtomicU64; 8],
}

impl Text64 {
    /// Stores `s` (truncated to 63 bytes).
    pub fn store(&self, s: &[u8]) {
        let s = &s[..s.len().min(63)];
        let mut buf = [0u8; 64];
        buf[..s.len()].copy_from_slice(s);
        for (w, chunk) in self.words.iter().zip(buf.chunks_exact(8)) {
            w.store(
                u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])),
                Relaxed,
            );
        }
        self.len.store(s.len() as u32, Release);
    }

    /// Copies the text into `out` and returns its length.
    pub fn load(&self, out: &mut [u8; 64]) -> usize {
        let len = (self.len.load(Acquire) as usize).min(63);
        for (w, chunk) in self.words.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        len
    }

    /// Whether the text equals `s`.
    pub fn eq(&self, s: &[u8]) -> bool {
        let mut buf = [0u8; 64];
        let len = self.load(&mut buf);
        &buf[..len] == s
    }
}

/// The header at offset 0.
#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub max_upstreams: AtomicU32,
    pub max_peers: AtomicU32,
    pub max_workers: AtomicU32,
    pub window_buckets: AtomicU32,
    pub bucket_ms: AtomicU32,
    pub total_size: AtomicU64,
    pub rate_slots: AtomicU32,
    pub _pad0: u32,
    /// Secret key of the rate-limit key hash, drawn at random when the region is made (see `admission`).
    pub hash_key: [AtomicU64; 2],
    pub created_us: AtomicU64,
    /// Incremented by every configuration change.
    pub config_epoch: AtomicU64,
    /// Owner of the writer lock (see `owner::word`: pid and start time of the process changing the configuration),
    /// 0 when none.
    pub writer: AtomicU64,
    /// Samples dropped because their bucket was being cleared or they came late.
    pub dropped_samples: AtomicU64,
    /// Requests whose tracking entry was evicted before their log phase.
    pub evicted_requests: AtomicU64,
    /// Events written so far (the next event's sequence number).
    pub event_seq: AtomicU64,
    /// Events already claimed for logging (see `Region::claim_events`).
    pub events_logged: AtomicU64,
    /// Events written so far, per kind (see `Region::event_totals`).
    pub event_totals: [AtomicU64; EVENT_KINDS],
    /// The library's own cost: nanoseconds inside its balancer (0) and log (1) calls, summed over the calls timed.
    pub cost_ns: [AtomicU64; 2],
    /// Calls timed, balancer (0) and log (1): one in a few (the FFI layer decides).
    pub cost_calls: [AtomicU64; 2],
    /// When the writer lock was taken (µs, monotonic clock).
    pub writer_since_us: AtomicU64,
    /// Times the writer lock was taken over from a dead owner.
    pub writer_takeovers: AtomicU64,
    /// Markers left behind by killed processes and repaired since: odd upstream seqlocks, window buckets left being
    /// cleared, odd latency-total seqlocks, in-flight columns left being reclaimed.
    pub repaired_markers: AtomicU64,
}

/// One state change or decision, in a ring of the most recent [`EVENT_RING`].
#[repr(C)]
pub struct Event {
    /// Seqlock word of the record: 2·seq + 1 while event `seq` is being written, 2·seq + 2 once complete, 0 never
    /// written (see `events`).
    pub seq: AtomicU64,
    /// Monotonic clock (µs) when it happened.
    pub time_us: AtomicU64,
    pub kind: AtomicU32,
    pub reason: AtomicU32,
    pub upstream: AtomicU32,
    pub slot: AtomicU32,
    /// Numbers behind the event (kind-specific), as f64 bits.
    pub values: [AtomicU64; 4],
}

/// Life of an upstream or peer record.
pub mod state {
    pub const FREE: u32 = 0;
    pub const ACTIVE: u32 = 1;
    pub const RETIRED: u32 = 2;
}

/// An upstream record; followed in memory by its peer slot list.
#[repr(C)]
pub struct UpstreamHead {
    pub state: AtomicU32,
    pub gen: AtomicU32,
    /// Seqlock over `npeers`, the slot list and the tunables: odd while a writer changes them.
    pub seq: AtomicU32,
    pub npeers: AtomicU32,
    pub algorithm: AtomicU32,
    pub retries: AtomicU32,
    pub slow_start_ms: AtomicU32,
    pub slow_start_aggression_milli: AtomicU32,
    pub slow_start_min_weight_milli: AtomicU32,
    pub decay_ms: AtomicU32,
    pub default_rtt_us: AtomicU32,
    pub failure_penalty_milli: AtomicU32,
    pub max_weight: AtomicU32,
    /// A peer whose estimate exceeds `slow_factor ×` the upstream's baseline counts as slow (0: off).
    pub slow_factor_milli: AtomicU32,
    pub config_epoch: AtomicU64,
    pub retired_us: AtomicU64,
    /// Round-robin tickets.
    pub ticket: AtomicU64,
    pub name: Text64,
    /// Outlier-detection parameters (see `engine::store_outlier`), under the seqlock.
    pub outlier: [AtomicU64; 17],
    /// HTTP statuses counted as failures: bit `s` of the bitmap for status `s` (< 640), under the seqlock.
    pub failure_statuses: [AtomicU64; 10],
    /// 1 while fewer than `panic_threshold` % of the peers are healthy.
    pub panic: AtomicU32,
    /// Pid of the worker holding the active health-check lease.
    pub check_owner: AtomicU32,
    pub check_until_us: AtomicU64,
    /// When the outlier sweep last ran.
    pub last_sweep_us: AtomicU64,
    /// When a fallback response was last served (for logging once per episode).
    pub fallback_us: AtomicU64,
    /// Cost multiplier of a slow peer.
    pub slow_penalty_milli: AtomicU32,
    pub _pad: u32,
    /// The upstream's latency baseline (µs, as f64 bits): the lower median of its healthy, measured peers'
    /// estimates, refreshed by the upkeep timer; 0 while unknown.
    pub baseline_us: AtomicU64,
    /// Backend-reported load (see `report`): `report::flag` bits (0: off).
    pub report_flags: AtomicU32,
    /// What a report header holds (`report::ReportKind`).
    pub report_kind: AtomicU32,
    pub report_blackout_us: AtomicU64,
    pub report_expiry_us: AtomicU64,
    pub backpressure_max_us: AtomicU64,
    /// f64 bits: back-pressure cost multiplier, weight of the reported load, ORCA error-utilization penalty.
    pub backpressure_penalty: AtomicU64,
    pub report_scale: AtomicU64,
    pub report_error_penalty: AtomicU64,
    /// f64 bits, refreshed by the upkeep: the mean reported load of the healthy peers with a usable report
    /// (negative while none has one), their sum and how many they are; the sum and count of the named metric.
    pub report_mean: AtomicU64,
    pub report_sum: AtomicU64,
    pub report_count: AtomicU64,
    pub named_sum: AtomicU64,
    pub named_count: AtomicU64,
    /// Name of the ORCA named metric read (`named_metrics.<name>`).
    pub report_named: Text64,
    /// Time constant of the smoothing of each peer's reported load (µs; 0: the last report as it is).
    pub report_smoothing_us: AtomicU64,
}

/// A peer record; followed in memory by its window buckets (the per-worker in-flight counts are in a table of their
/// own, one cache line or more per worker, see [`Region::peer`]).
///
/// Field order is by use: the first 64 bytes hold everything the request path reads or writes on a peer that is
/// healthy (what P2C reads of each candidate, the claim and its release, the health check of a success, the estimate
/// and the sample count), so a pick reads one line per candidate and a success writes two (this one and the one of
/// `total_latency_us`), besides its window bucket.
#[repr(C)]
pub struct PeerHead {
    pub state: AtomicU32,
    /// Bumped each time the record is given to another peer; writers holding an old generation are ignored.
    pub gen: AtomicU32,
    pub upstream: AtomicU32,
    pub weight: AtomicU32,
    pub inflight: AtomicI32,
    /// Half-open probes in flight, counted apart from `inflight` (which may hold counts a lost request leaked).
    pub probes: AtomicU32,
    /// `health::state`.
    pub health: AtomicU32,
    /// Consecutive failures: any kind, gateway (incl. connect), timeouts.
    pub consecutive: [AtomicU32; 3],
    /// Packed peak-EWMA estimate and time stamp (see `ewma`).
    pub ewma: AtomicU64,
    pub added_us: AtomicU64,
    /// All-time counters, indexed like `window::counter`, then the latency sum.
    pub totals: [AtomicU64; crate::window::counter::N],
    pub total_latency_us: AtomicU64,
    pub port: AtomicU32,
    pub host_len: AtomicU32,
    pub retired_us: AtomicU64,
    pub addr: Text64,
    pub times_ejected: AtomicU32,
    pub half_open_ok: AtomicU32,
    pub active_ok: AtomicU32,
    pub active_fail: AtomicU32,
    pub ejected_until_us: AtomicU64,
    pub last_ejected_us: AtomicU64,
    pub ejections_total: AtomicU64,
    /// When the last half-open probe was claimed: probes not ended a probe timeout later are taken as lost.
    pub probe_us: AtomicU64,
    /// When the peer last made progress while half-open (became half-open, or a probe succeeded).
    pub half_open_us: AtomicU64,
    /// All-time latency counts per range, added from the window buckets as they are cleared.
    pub latency: crate::window::LatencyTotals,
    /// Backend-reported load (see `report`), f64 bits: the load the cost uses, then the ORCA fields
    /// cpu, application, rps, eps and the named metric (NaN bits when absent).
    pub report_load: AtomicU64,
    pub report_fields: [AtomicU64; 5],
    /// When the current sequence of reports began (for the blackout) and when the last report came (µs).
    pub report_since_us: AtomicU64,
    pub report_us: AtomicU64,
    /// Back-pressure (`Retry-After`) until then (µs).
    pub backoff_until_us: AtomicU64,
    /// Reports taken, headers refused, back-pressure responses.
    pub reports_total: AtomicU64,
    pub reports_malformed: AtomicU64,
    pub backpressure_total: AtomicU64,
    /// The agent's last answer: `report::AgentState` (0 none) and weight percent (0 none), and when it came.
    pub agent_state: AtomicU32,
    pub agent_weight: AtomicU32,
    pub agent_us: AtomicU64,
}

/// Admission state of an upstream (see `admission`); f64 values are stored as bits.
#[repr(C)]
pub struct AdmissionHead {
    /// 0 off, 1 on.
    pub enabled: AtomicU32,
    /// 0 fixed limit, 1 gradient, 2 AIMD.
    pub algorithm: AtomicU32,
    /// 1 while the minimum RTT is being measured at `min_concurrency`.
    pub measuring: AtomicU32,
    /// Peers of the upstream when the limit was last updated.
    pub npeers: AtomicU32,
    /// min, max, initial, buffer, min_rtt_interval_us, min_rtt_requests, min_concurrency, backoff, tolerance,
    /// tighten, relax_after_us, interval_us.
    pub params: [AtomicU64; 12],
    pub limit: AtomicU64,
    /// The limit to return to after a min-RTT measurement.
    pub saved_limit: AtomicU64,
    pub min_rtt_us: AtomicU64,
    pub sample_us: AtomicU64,
    pub next_measure_us: AtomicU64,
    pub measure_sum_us: AtomicU64,
    pub measure_count: AtomicU64,
    /// Latencies of the requests finished in the current interval.
    pub lat_sum_us: AtomicU64,
    pub lat_count: AtomicU64,
    pub last_update_us: AtomicU64,
    pub rate_factor: AtomicU64,
    pub calm_since_us: AtomicU64,
    /// Concurrency sheds counted at the last update.
    pub shed_seen: AtomicU64,
    pub inflight: AtomicI32,
    pub waiting: AtomicI32,
    pub class_inflight: [AtomicI32; crate::admission::CLASSES],
    /// Guaranteed share of each class, as f64 bits.
    pub class_share: [AtomicU64; crate::admission::CLASSES],
    /// Rate of each rule in requests/s before the rate factor (0: rule inactive), and its burst; f64 bits.
    pub rule_rate: [AtomicU64; crate::admission::RULES],
    pub rule_burst: [AtomicU64; crate::admission::RULES],
    pub admitted: [AtomicU64; crate::admission::CLASSES],
    pub shed: [[AtomicU64; crate::admission::reason::N]; crate::admission::CLASSES],
    /// Per rule: the bucket shared by the keys the table had no room for, and how many requests it took.
    pub overflow: [AtomicU64; crate::admission::RULES],
    pub overflow_requests: [AtomicU64; crate::admission::RULES],
}

/// One token bucket of the shared table.
#[repr(C)]
pub struct RateSlot {
    pub key: AtomicU64,
    pub state: AtomicU64,
}

/// An admission record and its in-flight columns (`(max_workers + 1) × CLASSES`, the last column for workers
/// without one).
#[derive(Clone, Copy)]
pub struct Admission<'a> {
    pub head: &'a AdmissionHead,
    pub columns: &'a [AtomicI32],
    /// Requests waiting in the queue, per column (what a dead worker's column held is released with it).
    pub waiting: &'a [AtomicI32],
}

/// An upstream record and its slot list.
#[derive(Clone, Copy)]
pub struct Upstream<'a> {
    pub head: &'a UpstreamHead,
    pub slots: &'a [AtomicU32],
}

/// A peer record, its window and its per-worker in-flight counts.
#[derive(Clone, Copy)]
pub struct Peer<'a> {
    pub head: &'a PeerHead,
    pub window: &'a [WindowBucket],
    pub inflight_by_worker: WorkerColumns<'a>,
}

/// The in-flight counts of one peer record, one per worker column. They live in a table of their own, worker by
/// worker (each worker's counts for all peer records together, starting on a cache line of their own): a count is
/// written by its worker only, so no two workers write the same cache line on the request path.
#[derive(Clone, Copy)]
pub struct WorkerColumns<'a> {
    table: &'a [AtomicI32],
    slot: usize,
    /// Counts per worker row (`max_peers` rounded up to a cache line).
    row: usize,
    workers: usize,
}

impl<'a> WorkerColumns<'a> {
    /// The count of worker column `col`, if there is such a column.
    #[inline]
    pub fn get(&self, col: usize) -> Option<&'a AtomicI32> {
        if col < self.workers {
            self.table.get(col * self.row + self.slot)
        } else {
            None
        }
    }

    /// Number of worker columns.
    pub fn len(&self) -> usize {
        self.workers
    }

    /// Whether there is no worker column.
    pub fn is_empty(&self) -> bool {
        self.workers == 0
    }

    /// The counts, column by column.
    pub fn iter(&self) -> impl Iterator<Item = &'a AtomicI32> + '_ {
        (0..self.workers).filter_map(|c| self.get(c))
    }
}

impl std::ops::Index<usize> for WorkerColumns<'_> {
    type Output = AtomicI32;
    fn index(&self, col: usize) -> &AtomicI32 {
        self.get(col).expect("worker column out of range")
    }
}

impl Header {
    /// The parameters the header records.
    fn params(&self) -> Params {
        Params {
            max_upstreams: self.max_upstreams.load(Relaxed),
            max_peers: self.max_peers.load(Relaxed),
            max_workers: self.max_workers.load(Relaxed),
            window_buckets: self.window_buckets.load(Relaxed),
            bucket_ms: self.bucket_ms.load(Relaxed),
            rate_slots: self.rate_slots.load(Relaxed),
        }
    }
}

const fn round64(n: usize) -> usize {
    (n + 63) & !63
}

/// Byte offsets of everything in a region of given [`Params`].
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub params: Params,
    workers_off: usize,
    events_off: usize,
    upstreams_off: usize,
    upstream_stride: usize,
    peers_off: usize,
    peer_stride: usize,
    admission_off: usize,
    admission_stride: usize,
    owners_off: usize,
    rate_off: usize,
    /// The per-worker in-flight counts: `max_workers` rows of `column_row` i32, each row 64-aligned.
    columns_off: usize,
    column_row: usize,
    pub total: usize,
}

impl Layout {
    /// Computes the layout; `params` must be valid.
    pub fn new(params: Params) -> Layout {
        let p = params;
        let workers_off = round64(std::mem::size_of::<Header>());
        let events_off = workers_off + round64(p.max_workers as usize * 4);
        let upstreams_off = events_off + EVENT_RING * std::mem::size_of::<Event>();
        let upstream_stride =
            round64(std::mem::size_of::<UpstreamHead>() + p.max_peers as usize * 4);
        let peers_off = upstreams_off + upstream_stride * p.max_upstreams as usize;
        let peer_stride = round64(
            std::mem::size_of::<PeerHead>() + (p.window_buckets as usize + 1) * std::mem::size_of::<WindowBucket>(),
        );
        let admission_off = peers_off + peer_stride * p.max_peers as usize;
        let admission_stride = round64(
            std::mem::size_of::<AdmissionHead>()
                + (p.max_workers as usize + 1) * (crate::admission::CLASSES + 1) * 4,
        );
        let owners_off = admission_off + admission_stride * p.max_upstreams as usize;
        let rate_off = owners_off + round64(p.max_workers as usize * 4);
        let columns_off = round64(rate_off + p.rate_slots as usize * std::mem::size_of::<RateSlot>());
        let column_row = round64(p.max_peers as usize * 4) / 4;
        let total = columns_off + p.max_workers as usize * column_row * 4;
        Layout {
            columns_off,
            column_row,
            admission_off,
            admission_stride,
            owners_off,
            rate_off,
            params,
            workers_off,
            events_off,
            upstreams_off,
            upstream_stride,
            peers_off,
            peer_stride,
            total,
        }
    }
}

enum Backing {
    /// Mapped with mmap; never unmapped (see the module docs).
    Shared,
    /// Private memory, for tests and tools.
    Heap(#[allow(dead_code)] Box<[AtomicU64]>),
}

/// A mapped region.
pub struct Region {
    base: NonNull<u8>,
    layout: Layout,
    _backing: Backing,
}

// SAFETY: all access to the memory behind `base` goes through atomics, so sharing between threads is sound.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Maps a new zeroed region shared with processes forked after this call.
    pub fn new_shared(params: Params, now_us: u64) -> Result<Region, LayoutError> {
        params.validate()?;
        let layout = Layout::new(params);
        // SAFETY: an anonymous mapping with no address hint has no preconditions; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LayoutError::Map(
                layout.total,
                std::io::Error::last_os_error().to_string(),
            ));
        }
        let base = NonNull::new(ptr as *mut u8)
            .ok_or_else(|| LayoutError::Map(layout.total, "null".into()))?;
        let region = Region {
            base,
            layout,
            _backing: Backing::Shared,
        };
        region.init_header(now_us);
        Ok(region)
    }

    /// A private zeroed region with the same layout (tests, tools).
    pub fn new_heap(params: Params, now_us: u64) -> Result<Region, LayoutError> {
        params.validate()?;
        let layout = Layout::new(params);
        let words: Box<[AtomicU64]> = (0..layout.total.div_ceil(8))
            .map(|_| AtomicU64::new(0))
            .collect();
        let base = NonNull::new(words.as_ptr() as *mut u8)
            .ok_or_else(|| LayoutError::Map(layout.total, "null".into()))?;
        let region = Region {
            base,
            layout,
            _backing: Backing::Heap(words),
        };
        region.init_header(now_us);
        Ok(region)
    }

    fn init_header(&self, now_us: u64) {
        let h = self.header();
        let p = self.layout.params;
        h.version.store(LAYOUT_VERSION, Relaxed);
        h.max_upstreams.store(p.max_upstreams, Relaxed);
        h.max_peers.store(p.max_peers, Relaxed);
        h.max_workers.store(p.max_workers, Relaxed);
        h.window_buckets.store(p.window_buckets, Relaxed);
        h.bucket_ms.store(p.bucket_ms, Relaxed);
        h.total_size.store(self.layout.total as u64, Relaxed);
        h.rate_slots.store(p.rate_slots, Relaxed);
        for (k, seed) in h.hash_key.iter().zip([0u64, 1]) {
            k.store(random_u64(seed), Relaxed);
        }
        h.created_us.store(now_us, Relaxed);
        h.magic.store(MAGIC, Release);
    }

    /// The region another copy of this code mapped in this process at `base` (the native nginx module works on the
    /// region the library made, see docs/native-module.md): the header must carry this build's magic number, layout
    /// version and a size matching its parameters. The memory is borrowed, never unmapped.
    ///
    /// # Errors
    /// [`AttachError`] naming the layout version found and the one of this build.
    ///
    /// # Safety
    /// `base` must be the start of a live mapping made by [`Region::new_shared`] (of any version: only its header is
    /// read before the checks) that stays mapped for the life of the process.
    pub unsafe fn from_shared_raw(base: *mut u8) -> Result<Region, AttachError> {
        let base = NonNull::new(base).ok_or(AttachError::Null)?;
        // SAFETY: the caller guarantees a mapping of at least a header (every version begins with magic and version).
        let h = unsafe { &*(base.as_ptr() as *const Header) };
        if h.magic.load(Acquire) != MAGIC {
            return Err(AttachError::Magic);
        }
        let version = h.version.load(Relaxed);
        if version != LAYOUT_VERSION {
            return Err(AttachError::Version { have: version, want: LAYOUT_VERSION });
        }
        let params = h.params();
        params.validate().map_err(|_| AttachError::Size)?;
        let layout = Layout::new(params);
        if h.total_size.load(Relaxed) != layout.total as u64 {
            return Err(AttachError::Size);
        }
        Ok(Region { base, layout, _backing: Backing::Shared })
    }

    /// The address of the region's first byte (for [`Region::from_shared_raw`] in another copy of this code).
    pub fn base_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Verifies the header against this build and `want`.
    pub fn check(&self, want: &Params) -> Result<(), LayoutError> {
        let h = self.header();
        if h.magic.load(Acquire) != MAGIC
            || h.version.load(Relaxed) != LAYOUT_VERSION
            || h.total_size.load(Relaxed) != self.layout.total as u64
        {
            return Err(LayoutError::Foreign);
        }
        let have = h.params();
        if have != self.layout.params {
            return Err(LayoutError::Foreign);
        }
        if have != *want {
            return Err(LayoutError::Mismatch { have, want: *want });
        }
        Ok(())
    }

    /// The whole region as 64-bit words, for tools and tests that inspect it or damage it on purpose (the fuzz
    /// target of the layout check writes garbage through it). Nothing on the request path uses it.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the region is `total` bytes from a 64-aligned base and `total` is a multiple of 8 (every record
        // size is); AtomicU64 is valid for any bit pattern and only accessed through shared references.
        unsafe { self.slice_at(0, self.layout.total / 8) }
    }

    /// The layout in force.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The parameters in force.
    #[inline]
    pub fn params(&self) -> &Params {
        &self.layout.params
    }

    /// # Safety
    /// `off + size_of::<T>() * count` must lie within the region and `off` must be aligned for `T`; `T` must be valid
    /// for any bit pattern and only ever accessed through shared references (atomics).
    unsafe fn slice_at<T>(&self, off: usize, count: usize) -> &[T] {
        debug_assert!(off + std::mem::size_of::<T>() * count <= self.layout.total);
        debug_assert_eq!(off % std::mem::align_of::<T>(), 0);
        std::slice::from_raw_parts(self.base.as_ptr().add(off) as *const T, count)
    }

    /// The header.
    #[inline]
    pub fn header(&self) -> &Header {
        // SAFETY: offset 0, within the region by construction; Header is all atomics.
        unsafe { &self.slice_at::<Header>(0, 1)[0] }
    }

    /// Pids of the workers owning each in-flight column (0: free).
    pub fn worker_pids(&self) -> &[AtomicU32] {
        // SAFETY: `workers_off` is 64-aligned and the table of `max_workers` u32 fits before `upstreams_off`.
        unsafe {
            self.slice_at(
                self.layout.workers_off,
                self.layout.params.max_workers as usize,
            )
        }
    }

    /// The event ring.
    pub fn events(&self) -> &[Event] {
        // SAFETY: `events_off` is 64-aligned and the ring of EVENT_RING events fits before `upstreams_off`.
        unsafe { self.slice_at(self.layout.events_off, EVENT_RING) }
    }

    /// Upstream record `i`; `i` is clamped into range (callers validate indices from outside first).
    #[inline]
    pub fn upstream(&self, i: u32) -> Upstream<'_> {
        let i = (i as usize).min(self.layout.params.max_upstreams as usize - 1);
        let off = self.layout.upstreams_off + i * self.layout.upstream_stride;
        let head_size = std::mem::size_of::<UpstreamHead>();
        // SAFETY: record `i` lies within the upstream table; the head is followed by `max_peers` u32 slots, all within
        // the stride; head_size is a multiple of 8 so the slots are aligned.
        unsafe {
            Upstream {
                head: &self.slice_at::<UpstreamHead>(off, 1)[0],
                slots: self.slice_at(off + head_size, self.layout.params.max_peers as usize),
            }
        }
    }

    /// The head of peer record `i` only (the request path's most frequent read); `i` is clamped into range.
    #[inline]
    pub fn peer_head(&self, i: u32) -> &PeerHead {
        let i = (i as usize).min(self.layout.params.max_peers as usize - 1);
        let off = self.layout.peers_off + i * self.layout.peer_stride;
        // SAFETY: record `i` lies within the peer table and starts with its head (see `peer`).
        unsafe { &self.slice_at::<PeerHead>(off, 1)[0] }
    }

    /// Peer record `i`; `i` is clamped into range (callers validate indices from outside first).
    #[inline]
    pub fn peer(&self, i: u32) -> Peer<'_> {
        let p = &self.layout.params;
        let i = (i as usize).min(p.max_peers as usize - 1);
        let off = self.layout.peers_off + i * self.layout.peer_stride;
        let head = std::mem::size_of::<PeerHead>();
        let buckets = p.window_buckets as usize + 1;
        // SAFETY: record `i` lies within the peer table; head and buckets follow each other within the stride, and
        // every size involved is a multiple of 8. The column table (64-aligned, `max_workers` rows of `column_row`
        // i32) ends the region.
        unsafe {
            Peer {
                head: &self.slice_at::<PeerHead>(off, 1)[0],
                window: self.slice_at(off + head, buckets),
                inflight_by_worker: WorkerColumns {
                    table: self.slice_at(self.layout.columns_off, p.max_workers as usize * self.layout.column_row),
                    slot: i,
                    row: self.layout.column_row,
                    workers: p.max_workers as usize,
                },
            }
        }
    }
}

impl Region {
    /// Admission record of upstream `i`; `i` is clamped into range.
    pub fn admission(&self, i: u32) -> Admission<'_> {
        let i = (i as usize).min(self.layout.params.max_upstreams as usize - 1);
        let off = self.layout.admission_off + i * self.layout.admission_stride;
        let ncol = self.layout.params.max_workers as usize + 1;
        let cols = ncol * crate::admission::CLASSES;
        let head = std::mem::size_of::<AdmissionHead>();
        // SAFETY: record `i` lies within the admission table; the head (a multiple of 8 bytes) is followed by its
        // in-flight columns, then its waiting counts, all i32, within the stride.
        unsafe {
            Admission {
                head: &self.slice_at::<AdmissionHead>(off, 1)[0],
                columns: self.slice_at(off + head, cols),
                waiting: self.slice_at(off + head + cols * 4, ncol),
            }
        }
    }

    /// Pid of the worker whose admission counts each column holds (see `admission`).
    pub fn admission_owners(&self) -> &[AtomicU32] {
        // SAFETY: `owners_off` is 64-aligned and the table of `max_workers` u32 fits before `rate_off`.
        unsafe { self.slice_at(self.layout.owners_off, self.layout.params.max_workers as usize) }
    }

    /// The shared token buckets.
    pub fn rate_slots(&self) -> &[RateSlot] {
        // SAFETY: `rate_off` is 64-aligned and `rate_slots` slots end the region.
        unsafe { self.slice_at(self.layout.rate_off, self.layout.params.rate_slots as usize) }
    }
}

/// A random number: std's per-process random SipHash keys applied to `salt` (no unsafe code, no extra dependency).
fn random_u64(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `layout` fuzz target (built with overflow checks): records holding garbage behind an intact
    /// header (a configuration epoch and latency sums near 2^64) overflowed an addition instead of being read.
    #[test]
    fn garbage_records_behind_an_intact_header_are_read_without_overflow() {
        use crate::engine::{PeerConf, UpstreamConf, UpstreamParams};
        let params = Params { max_upstreams: 1, max_peers: 2, max_workers: 1, window_buckets: 2, bucket_ms: 100, rate_slots: 64 };
        let r = Region::new_heap(params, 0).unwrap();
        let ups = [UpstreamConf {
            name: "a".into(),
            params: UpstreamParams::default(),
            peers: vec![PeerConf { addr: "127.0.0.1:1".parse().unwrap(), weight: 1 }],
        }];
        let yes = |_: u32| true;
        r.configure(&ups, 1, &yes, 0).unwrap();
        let header = std::mem::size_of::<Header>() / 8;
        for w in &r.words()[header..] {
            w.store(u64::MAX, Relaxed);
        }
        r.header().config_epoch.store(u64::MAX, Relaxed);
        assert!(r.check(&params).is_ok());
        for s in 0..2 {
            let _ = r.snapshot(s, 1_000_000);
            let _ = r.latency_ranges(s);
        }
        let _ = r.configure(&ups, 1, &yes, 1);
        r.admission_update(0, 1_000_000_000, false);
    }

    #[test]
    fn sizes_are_multiples_of_eight() {
        assert_eq!(std::mem::size_of::<Header>() % 8, 0);
        assert_eq!(std::mem::size_of::<UpstreamHead>() % 8, 0);
        assert_eq!(std::mem::size_of::<PeerHead>() % 8, 0);
        assert_eq!(std::mem::size_of::<WindowBucket>() % 8, 0);
        assert_eq!(std::mem::size_of::<Event>() % 8, 0);
        assert_eq!(std::mem::size_of::<AdmissionHead>() % 8, 0);
    }

    #[test]
    fn from_shared_raw_sees_the_same_records_and_refuses_other_versions() {
        let p = Params { max_upstreams: 2, max_peers: 3, max_workers: 2, window_buckets: 2, bucket_ms: 1000, rate_slots: 64 };
        let r = Region::new_heap(p, 7).unwrap();
        // SAFETY: `r` is a live region for the whole test.
        let view = unsafe { Region::from_shared_raw(r.base_ptr()) }.unwrap();
        assert_eq!(*view.params(), p);
        view.peer(2).inflight_by_worker[1].store(5, Relaxed);
        assert_eq!(r.peer(2).inflight_by_worker[1].load(Relaxed), 5);
        r.header().version.store(LAYOUT_VERSION + 1, Relaxed);
        // SAFETY: as above.
        let err = unsafe { Region::from_shared_raw(r.base_ptr()) }.err().unwrap();
        assert_eq!(err, AttachError::Version { have: LAYOUT_VERSION + 1, want: LAYOUT_VERSION });
        assert!(err.to_string().contains(&format!("layout version {}", LAYOUT_VERSION + 1)), "{err}");
        r.header().version.store(LAYOUT_VERSION, Relaxed);
        r.header().total_size.store(1, Relaxed);
        // SAFETY: as above.
        assert_eq!(unsafe { Region::from_shared_raw(r.base_ptr()) }.err(), Some(AttachError::Size));
        r.header().magic.store(0, Relaxed);
        // SAFETY: as above.
        assert_eq!(unsafe { Region::from_shared_raw(r.base_ptr()) }.err(), Some(AttachError::Magic));
        // SAFETY: NULL is refused before any read.
        assert_eq!(unsafe { Region::from_shared_raw(std::ptr::null_mut()) }.err(), Some(AttachError::Null));
    }

    #[test]
    fn admission_records_fit_in_the_region() {
        let p = Params { max_upstreams: 3, max_peers: 2, max_workers: 3, window_buckets: 2, bucket_ms: 1000, rate_slots: 64 };
        let r = Region::new_heap(p, 0).unwrap();
        let end = r.base.as_ptr() as usize + r.layout.total;
        for i in 0..3 {
            let a = r.admission(i);
            assert_eq!(a.columns.len(), 4 * crate::admission::CLASSES);
            a.columns.last().unwrap().store(i as i32 + 1, Relaxed);
            assert!(a.columns.last().unwrap() as *const _ as usize + 4 <= r.admission(i + 1).head as *const _ as usize || i == 2);
        }
        assert_eq!(r.admission(1).columns.last().unwrap().load(Relaxed), 2);
        assert_eq!(r.peer(1).inflight_by_worker[2].load(Relaxed), 0);
        let last = r.rate_slots().last().unwrap() as *const _ as usize + 16;
        assert!(last <= &r.peer(0).inflight_by_worker[0] as *const _ as usize);
        let last = &r.peer(1).inflight_by_worker[2] as *const _ as usize + 4;
        assert!(last <= end);
        assert_eq!(r.admission_owners().len(), 3);
    }

    #[test]
    fn records_do_not_overlap_and_fit() {
        let p = Params {
            max_upstreams: 3,
            max_peers: 5,
            max_workers: 3,
            window_buckets: 2,
            bucket_ms: 1000,
            rate_slots: 64,
        };
        let r = Region::new_heap(p, 0).unwrap();
        let end = r.base.as_ptr() as usize + r.layout.total;
        for i in 0..5 {
            let peer = r.peer(i);
            let last = &peer.inflight_by_worker[2] as *const _ as usize + 4;
            assert!(last <= end);
            peer.head.weight.store(i + 1, Relaxed);
            peer.inflight_by_worker[2].store(7, Relaxed);
        }
        for i in 0..5 {
            assert_eq!(r.peer(i).head.weight.load(Relaxed), i + 1);
        }
        assert_eq!(r.upstream(2).slots.len(), 5);
        r.check(&p).unwrap();
        let other = Params { max_peers: 6, ..p };
        assert!(matches!(r.check(&other), Err(LayoutError::Mismatch { .. })));
        r.header().magic.store(1, Relaxed);
        assert_eq!(r.check(&p), Err(LayoutError::Foreign));
    }

    #[test]
    fn hot_peer_fields_share_one_cache_line_and_workers_write_their_own_lines() {
        let p = Params { max_upstreams: 2, max_peers: 20, max_workers: 4, window_buckets: 2, bucket_ms: 1000, rate_slots: 64 };
        let r = Region::new_heap(p, 0).unwrap();
        let h = r.peer_head(3);
        let base = h as *const PeerHead as usize;
        // (the mapped region is page-aligned; this heap copy is not, so offsets are taken from its start)
        let start = r.base.as_ptr() as usize;
        assert_eq!((base - start) % 64, 0, "peer records start on a cache line");
        let end = |f: *const u8, size: usize| f as usize + size - base;
        for (name, e) in [
            ("state", end(&h.state as *const _ as *const u8, 4)),
            ("gen", end(&h.gen as *const _ as *const u8, 4)),
            ("upstream", end(&h.upstream as *const _ as *const u8, 4)),
            ("weight", end(&h.weight as *const _ as *const u8, 4)),
            ("inflight", end(&h.inflight as *const _ as *const u8, 4)),
            ("health", end(&h.health as *const _ as *const u8, 4)),
            ("consecutive", end(&h.consecutive as *const _ as *const u8, 12)),
            ("ewma", end(&h.ewma as *const _ as *const u8, 8)),
            ("added_us", end(&h.added_us as *const _ as *const u8, 8)),
            ("totals[REQUESTS]", end(&h.totals[crate::window::counter::REQUESTS] as *const _ as *const u8, 8)),
        ] {
            assert!(e <= 64, "{name} ends at byte {e} of the peer record, past its first cache line");
        }
        // each worker's counts: contiguous over the peer records, on lines no other worker writes
        let line = |a: &AtomicI32| (a as *const _ as usize - start) / 64;
        for w in 0..4 {
            for slot in 0..20 {
                let c = &r.peer(slot).inflight_by_worker[w];
                for other in (0..4).filter(|&o| o != w) {
                    for s2 in 0..20 {
                        assert_ne!(line(c), line(&r.peer(s2).inflight_by_worker[other]), "workers {w} and {other} share a line");
                    }
                }
            }
        }
        r.peer(19).inflight_by_worker[3].store(5, Relaxed);
        assert_eq!(r.peer(19).inflight_by_worker.iter().map(|c| c.load(Relaxed)).sum::<i32>(), 5);
        assert!(r.peer(0).inflight_by_worker.get(4).is_none());
        assert!(&r.peer(19).inflight_by_worker[3] as *const _ as usize + 4 <= r.base.as_ptr() as usize + r.layout.total);
    }

    #[test]
    fn params_are_validated() {
        let p = Params {
            max_peers: 0,
            ..Params::default()
        };
        assert!(matches!(
            p.validate(),
            Err(LayoutError::Range {
                field: "max_peers",
                ..
            })
        ));
        assert!(Params::default().validate().is_ok());
    }

    #[test]
    fn text_roundtrip() {
        let r = Region::new_heap(Params::default(), 0).unwrap();
        let t = &r.upstream(0).head.name;
        t.store(b"backend");
        assert!(t.eq(b"backend"));
        assert!(!t.eq(b"backen"));
        t.store(&[b'x'; 100]);
        let mut buf = [0; 64];
        assert_eq!(t.load(&mut buf), 63);
    }
}
