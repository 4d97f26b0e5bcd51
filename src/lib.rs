//! C ABI of lua-resty-autoscale, called from LuaJIT FFI inside nginx workers.
//!
//! Rules every export follows:
//! - names are `autoscale_<object>_<verb>`; results are `int` codes (`AUTOSCALE_OK` = 0, negative on error); error
//!   text, when there is any, is written into a buffer the caller owns (`err`, `err_len`), always NUL-terminated;
//! - only scalars, `(pointer, length)` byte slices and `#[repr(C)]` plain structs cross the boundary; Lua never frees
//!   anything Rust allocated;
//! - every export runs inside [`guard`], which turns a panic into `AUTOSCALE_ERR_PANIC`: a panic must never unwind
//!   into nginx and take a worker, and all its requests, down;
//! - the C header and the Lua `ffi.cdef` are generated from this file by `build.rs` and checked for drift.
//!
//! The shared region is created once per nginx master (in `init_by_lua`, before the fork) and kept in a static: the
//! master keeps this library loaded across `nginx -s reload`, so a reload reuses the region and its statistics.
#![allow(non_camel_case_types)]

use autoscale_core::engine::{default_failure_statuses, ConfigError, PeerConf, UpstreamConf, UpstreamParams};
use autoscale_core::health::OutlierParams;
use autoscale_core::histogram;
use autoscale_core::reqtrack::{Attempt, Entry, Table};
use autoscale_core::rng::XorShift64;
use autoscale_core::select::Algorithm;
use autoscale_core::slowstart::SlowStart;
use autoscale_core::window::counter;
use autoscale_core::{addr, Outcome, Params, Region};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::*};
use std::sync::OnceLock;

pub mod admin_ffi;
pub mod admission_ffi;
pub mod cost;
pub mod discovery_ffi;
pub mod metrics_ffi;
pub mod report_ffi;
mod scaling_ffi;

/// Success.
pub const AUTOSCALE_OK: c_int = 0;
/// An argument was out of range or a pointer was NULL.
pub const AUTOSCALE_ERR_ARG: c_int = -1;
/// `autoscale_region_init` has not succeeded in this process.
pub const AUTOSCALE_ERR_NO_REGION: c_int = -2;
/// The configuration was refused; see the error text.
pub const AUTOSCALE_ERR_CONFIG: c_int = -3;
/// No peer can take the request.
pub const AUTOSCALE_ERR_NO_PEER: c_int = -4;
/// The upstream index is unknown.
pub const AUTOSCALE_ERR_UPSTREAM: c_int = -5;
/// A bug: a panic was caught at the boundary.
pub const AUTOSCALE_ERR_PANIC: c_int = -6;
/// Another process is changing the configuration: nothing changed, try again later (a worker never waits for it).
pub const AUTOSCALE_ERR_BUSY: c_int = -7;
/// The upstream index was resolved before its record was handed to another upstream: resolve the name again
/// (`autoscale_upstream_find`, `autoscale_upstream_gen`).
pub const AUTOSCALE_ERR_STALE: c_int = -8;
/// The log phase needs the per-attempt details (`autoscale_log_detail`).
pub const AUTOSCALE_NEED_DETAIL: c_int = 1;

/// Version of this ABI; the Lua side refuses a library whose version differs from its cdef.
pub const AUTOSCALE_ABI_VERSION: u32 = 3;

/// Requests tracked per worker between balancer and log phases.
const REQUEST_TABLE_SIZE: usize = 16384;
/// A request tracked longer than this is taken as one that will never reach its log phase, and released by the
/// upkeep: a request still running then (a WebSocket, a long poll) stops counting as in flight and its outcome is
/// not recorded.
const REQUEST_MAX_AGE_US: u64 = 600_000_000;

/// Sizes of the shared region.
#[repr(C)]
pub struct autoscale_region_params_t {
    pub max_upstreams: u32,
    pub max_peers: u32,
    pub max_workers: u32,
    pub window_buckets: u32,
    pub bucket_ms: u32,
    /// Token buckets of the rate limits (a power of two, 64 to 1,048,576).
    pub rate_slots: u32,
}

/// One peer of an upstream specification.
#[repr(C)]
pub struct autoscale_peer_spec_t {
    /// `host:port` text (not NUL-terminated).
    pub addr: *const u8,
    pub addr_len: usize,
    pub weight: u32,
}

/// Outlier detection of an upstream (see README, "Options"); times in milliseconds, 0 switches a trigger off.
#[repr(C)]
pub struct autoscale_outlier_spec_t {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_timeout: u32,
    pub base_ejection_ms: u32,
    pub max_ejection_ms: u32,
    pub ejection_jitter_ms: u32,
    pub max_ejection_percent: u32,
    pub interval_ms: u32,
    pub success_rate_min_hosts: u32,
    pub success_rate_volume: u32,
    pub failure_percentage: u32,
    pub failure_percentage_min_hosts: u32,
    pub failure_percentage_volume: u32,
    pub half_open_probes: u32,
    pub half_open_successes: u32,
    pub panic_threshold: u32,
    /// 0 switches success-rate detection off.
    pub success_rate_stdev: f64,
}

/// One upstream of a configuration.
#[repr(C)]
pub struct autoscale_upstream_spec_t {
    pub name: *const u8,
    pub name_len: usize,
    /// 0 peak-EWMA, 1 round robin, 2 weighted random.
    pub algorithm: u32,
    pub retries: u32,
    pub slow_start_ms: u32,
    pub decay_ms: u32,
    pub default_rtt_us: u32,
    pub _pad: u32,
    pub slow_start_aggression: f64,
    pub slow_start_min_weight: f64,
    pub failure_penalty: f64,
    /// A peer whose estimate exceeds this many times the upstream's baseline is slow (0: off).
    pub slow_peer_factor: f64,
    /// Cost multiplier of a slow peer (>= 1).
    pub slow_peer_penalty: f64,
    pub peers: *const autoscale_peer_spec_t,
    pub npeers: usize,
    pub outlier: autoscale_outlier_spec_t,
    /// HTTP statuses counted as failures (each < 640); none means 500 to 599.
    pub failure_statuses: *const u16,
    pub nfailure_statuses: usize,
}

/// The peer chosen for an attempt.
#[repr(C)]
pub struct autoscale_pick_t {
    pub slot: u32,
    pub gen: u32,
    /// Extra tries to give nginx on the first attempt.
    pub more_tries: u32,
    /// 1 for the first attempt of the request.
    pub attempt: u32,
    /// The balancer's cost of the peer when it was chosen (lower is preferred; 0 for a half-open probe).
    pub cost: f64,
}

/// Statistics of one peer record. Window fields cover the rolling window; `total_*` are all-time.
/// Percentiles are -1 when the window has no sample.
#[repr(C)]
pub struct autoscale_peer_stats_t {
    pub slot: u32,
    pub gen: u32,
    /// 0 free, 1 active, 2 retired.
    pub state: u32,
    pub upstream: u32,
    pub weight: u32,
    pub port: u32,
    pub host_len: u32,
    pub inflight: i32,
    pub requests: u64,
    pub failures: u64,
    pub fail_http_5xx: u64,
    pub fail_gateway: u64,
    pub fail_connect: u64,
    pub fail_timeout: u64,
    pub aborted: u64,
    pub latency_sum_us: u64,
    pub window_us: u64,
    pub total_requests: u64,
    pub total_failures: u64,
    pub total_fail_http_5xx: u64,
    pub total_fail_gateway: u64,
    pub total_fail_connect: u64,
    pub total_fail_timeout: u64,
    pub total_aborted: u64,
    pub total_latency_us: u64,
    pub age_us: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub ewma_us: f64,
    pub cost: f64,
    pub slow_start: f64,
    /// 0 healthy, 1 ejected, 2 half-open, 3 draining.
    pub health: u32,
    pub times_ejected: u32,
    pub ejections_total: u64,
    /// Time left ejected (0 when not ejected; very large when ejected until an active check passes).
    pub ejected_for_us: u64,
    pub consecutive_failures: u32,
    pub consecutive_gateway: u32,
    pub consecutive_timeouts: u32,
    pub _pad: u32,
}

/// An upstream's state.
#[repr(C)]
pub struct autoscale_upstream_info_t {
    pub npeers: u32,
    pub healthy: u32,
    pub ejected: u32,
    pub draining: u32,
    /// 1 while in panic mode.
    pub panic: u32,
    pub algorithm: u32,
}

/// One event of the ring (see `autoscale_event_json` for its meaning).
#[repr(C)]
pub struct autoscale_event_t {
    pub seq: u64,
    pub time_us: u64,
    pub kind: u32,
    pub reason: u32,
    pub upstream: u32,
    pub slot: u32,
    pub values: [f64; 4],
}

/// Facts about the region.
#[repr(C)]
pub struct autoscale_region_info_t {
    pub max_upstreams: u32,
    pub max_peers: u32,
    pub max_workers: u32,
    pub window_buckets: u32,
    pub bucket_ms: u32,
    pub workers_attached: u32,
    pub total_size: u64,
    pub config_epoch: u64,
    pub dropped_samples: u64,
    pub evicted_requests: u64,
    /// Pid of the process holding the writer lock (0: free) and for how long it has held it (ms).
    pub writer_pid: u32,
    pub writer_held_ms: u32,
    /// Times the writer lock was taken over from a dead owner.
    pub writer_takeovers: u64,
    /// Markers left by killed processes and repaired (see `Header::repaired_markers`).
    pub repaired_markers: u64,
}

static REGION: OnceLock<Region> = OnceLock::new();
/// This process's in-flight column; -1 until attached. After a fork each worker has its own copy.
static COLUMN: AtomicI64 = AtomicI64::new(-1);
/// Set once this process has called `autoscale_worker_attach`: a worker, whose event loop must never wait.
static IS_WORKER: AtomicBool = AtomicBool::new(false);

/// What one worker keeps for itself: its request table and its random generator (one thread-local, one lookup).
struct Worker {
    requests: Table,
    rng: XorShift64,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Runs `f` with this worker's state, creating it on first use.
fn with_worker<T>(f: impl FnOnce(&mut Worker) -> T) -> T {
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        let w = w.get_or_insert_with(|| Worker {
            requests: Table::new(REQUEST_TABLE_SIZE),
            rng: XorShift64::new(now_us() ^ ((pid() as u64) << 32)),
        });
        f(w)
    })
}

/// Runs `f`, turning a panic into [`AUTOSCALE_ERR_PANIC`].
pub(crate) fn guard<F: FnOnce() -> c_int>(f: F) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(AUTOSCALE_ERR_PANIC)
}

fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn pid() -> u32 {
    std::process::id()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission; it sends nothing.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The processes of this machine, for the owners of the region's locks and markers (see `autoscale_core::owner`).
pub(crate) struct Os;

/// The one [`Os`].
pub(crate) const OS: Os = Os;

/// The start time of process `pid` (`/proc/PID/stat` field 22, clock ticks since boot), 0 when unknown.
fn start_time(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    rest.split_ascii_whitespace().nth(19).and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// `AUTOSCALE_TEST_WRITER_PAUSE`: a file name (nginx passes it to workers with `env AUTOSCALE_TEST_WRITER_PAUSE;`).
/// While that file exists, a configuration writer pauses in its critical section (up to 30 s) after writing its pid
/// into `<file>.held`: a test arms it to kill a writer at the worst moment. Read on each configuration change only
/// (never on the request path); unset, as always outside tests, it costs one environment lookup per change.
fn writer_pause_file() -> Option<String> {
    std::env::var("AUTOSCALE_TEST_WRITER_PAUSE").ok().filter(|f| !f.is_empty())
}

impl autoscale_core::owner::Processes for Os {
    fn alive(&self, pid: u32) -> bool {
        alive(pid)
    }

    fn start_time(&self, pid: u32) -> u64 {
        start_time(pid)
    }

    fn in_critical_section(&self) {
        let Some(file) = writer_pause_file() else { return };
        let path = std::path::Path::new(&file);
        if !path.exists() {
            return;
        }
        let _ = std::fs::write(format!("{file}.held"), pid().to_string());
        for _ in 0..3000 {
            if !path.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn column() -> Option<u32> {
    let c = COLUMN.load(Relaxed);
    (c >= 0).then_some(c as u32)
}

/// Writes `msg` into the caller's buffer, truncated and NUL-terminated.
///
/// # Safety
/// `err` must be NULL or point to `err_len` writable bytes.
unsafe fn write_err(err: *mut c_char, err_len: usize, msg: &str) {
    if err.is_null() || err_len == 0 {
        return;
    }
    let n = msg.len().min(err_len - 1);
    std::ptr::copy_nonoverlapping(msg.as_ptr(), err as *mut u8, n);
    *err.add(n) = 0;
}

/// # Safety
/// `ptr` must be NULL or point to `len` readable bytes.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return (len == 0).then_some(&[]);
    }
    Some(std::slice::from_raw_parts(ptr, len))
}

/// The version of this ABI ([`AUTOSCALE_ABI_VERSION`]).
#[no_mangle]
pub extern "C" fn autoscale_abi_version() -> u32 {
    AUTOSCALE_ABI_VERSION
}

/// Creates the shared region, or checks that the one this process already has matches `params`.
/// Call it in the nginx master (`init_by_lua`), before workers are forked.
///
/// # Safety
/// `params` must point to a valid struct; `err` to `err_len` writable bytes (or be NULL).
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for bad sizes or a NULL pointer, `AUTOSCALE_ERR_CONFIG` when the existing region has other
/// sizes (a reload cannot resize it) or mapping failed; the reason is in `err`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_region_init(
    params: *const autoscale_region_params_t,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    guard(|| {
        let Some(p) = params.as_ref() else {
            return AUTOSCALE_ERR_ARG;
        };
        let want = Params {
            max_upstreams: p.max_upstreams,
            max_peers: p.max_peers,
            max_workers: p.max_workers,
            window_buckets: p.window_buckets,
            bucket_ms: p.bucket_ms,
            rate_slots: p.rate_slots,
        };
        if let Err(e) = want.validate() {
            write_err(err, err_len, &e.to_string());
            return AUTOSCALE_ERR_ARG;
        }
        let result = match REGION.get() {
            Some(region) => region.check(&want),
            None => Region::new_shared(want, now_us()).map(|r| {
                let _ = REGION.set(r);
            }),
        };
        match result {
            Ok(()) => AUTOSCALE_OK,
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                AUTOSCALE_ERR_CONFIG
            }
        }
    })
}

/// The address of this process's shared region into `base` and its size in bytes into `size`, for the native nginx
/// module: it maps nothing itself but works on the region this library made (it checks the header's layout version
/// against its own).
///
/// # Safety
/// `base` and `size` must point to writable values.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION` before `autoscale_region_init`, `AUTOSCALE_ERR_ARG` for a NULL pointer.
#[no_mangle]
pub unsafe extern "C" fn autoscale_region_base(base: *mut *mut c_void, size: *mut u64) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        if base.is_null() || size.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        *base = region.base_ptr() as *mut c_void;
        *size = region.layout().total as u64;
        AUTOSCALE_OK
    })
}

/// Replaces the configuration with the `n` upstreams of `specs` and writes each one's index into `indices`.
/// Peers that stay keep their statistics; removed ones are retired; nothing changes when an error is returned.
///
/// # Safety
/// `specs` must point to `n` valid specs whose pointers are valid for their lengths; `indices` to `n` writable u32;
/// `err` to `err_len` writable bytes (or be NULL).
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION` before `autoscale_region_init`; `AUTOSCALE_ERR_CONFIG` with the reason (naming the
/// field) in `err`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_config_apply(
    specs: *const autoscale_upstream_spec_t,
    n: usize,
    indices: *mut u32,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        if (specs.is_null() || indices.is_null()) && n > 0 {
            return AUTOSCALE_ERR_ARG;
        }
        let specs = if n == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(specs, n)
        };
        let mut ups = Vec::with_capacity(n);
        for s in specs {
            match upstream_conf(s) {
                Ok(u) => ups.push(u),
                Err(msg) => {
                    write_err(err, err_len, &msg);
                    return AUTOSCALE_ERR_CONFIG;
                }
            }
        }
        match configure_waiting(region, &ups) {
            Ok(idx) => {
                for (i, v) in idx.into_iter().enumerate() {
                    *indices.add(i) = v;
                }
                AUTOSCALE_OK
            }
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                config_code(&e)
            }
        }
    })
}

/// `configure`; outside a worker (the master in `init_by_lua*`, before it serves anything) a busy writer lock is
/// waited for, up to a second; a worker gets [`AUTOSCALE_ERR_BUSY`] at once instead.
fn configure_waiting(region: &Region, ups: &[UpstreamConf]) -> Result<Vec<u32>, ConfigError> {
    let mut tries = if IS_WORKER.load(Relaxed) { 1 } else { 1000 };
    loop {
        tries -= 1;
        match region.configure(ups, pid(), &OS, now_us()) {
            Err(ConfigError::Busy(_)) if tries > 0 => std::thread::sleep(std::time::Duration::from_millis(1)),
            other => return other,
        }
    }
}

/// The code of a refused configuration: [`AUTOSCALE_ERR_BUSY`] when only the writer lock was in the way.
fn config_code(e: &ConfigError) -> c_int {
    match e {
        ConfigError::Busy(_) => AUTOSCALE_ERR_BUSY,
        _ => AUTOSCALE_ERR_CONFIG,
    }
}

/// The `n` peers at `specs` of upstream `name` (named in errors).
///
/// # Safety
/// `specs` must point to `n` valid peer specs (or be NULL with `n` 0).
unsafe fn peer_confs(name: &str, specs: *const autoscale_peer_spec_t, n: usize) -> Result<Vec<PeerConf>, String> {
    if n > 0 && specs.is_null() {
        return Err(format!("upstreams.{name}.peers: NULL"));
    }
    let specs = if n == 0 { &[][..] } else { std::slice::from_raw_parts(specs, n) };
    let mut peers = Vec::with_capacity(specs.len());
    for (i, p) in specs.iter().enumerate() {
        let text = bytes(p.addr, p.addr_len).map(String::from_utf8_lossy).unwrap_or_default();
        let addr = addr::parse(&text).map_err(|e| format!("upstreams.{name}.peers[{}]: \"{text}\": {e}", i + 1))?;
        peers.push(PeerConf { addr, weight: p.weight });
    }
    Ok(peers)
}

/// # Safety
/// As for [`autoscale_config_apply`].
unsafe fn upstream_conf(s: &autoscale_upstream_spec_t) -> Result<UpstreamConf, String> {
    let name = bytes(s.name, s.name_len)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or("upstream name is not UTF-8")?;
    let peers = peer_confs(name, s.peers, s.npeers)?;
    let finite = |v: f64, field: &str, min: f64, max: f64| {
        if v.is_finite() && v >= min && v <= max {
            Ok(v)
        } else {
            Err(format!(
                "upstreams.{name}.{field}: must be between {min} and {max}"
            ))
        }
    };
    Ok(UpstreamConf {
        name: name.to_owned(),
        params: UpstreamParams {
            algorithm: Algorithm::from_u32(s.algorithm),
            retries: s.retries,
            slow_start: SlowStart {
                window_us: s.slow_start_ms as u64 * 1000,
                aggression: finite(
                    s.slow_start_aggression,
                    "slow_start_aggression",
                    0.01,
                    100.0,
                )?,
                min_weight: finite(s.slow_start_min_weight, "slow_start_min_weight", 0.0, 1.0)?,
            },
            decay_us: s.decay_ms as u64 * 1000,
            default_rtt_us: s.default_rtt_us,
            failure_penalty: finite(s.failure_penalty, "failure_penalty", 1.0, 1000.0)?,
            slow_peer_factor: match s.slow_peer_factor {
                f if f == 0.0 => 0.0,
                f => finite(f, "slow_peer_factor", 1.1, 1000.0)?,
            },
            slow_peer_penalty: finite(s.slow_peer_penalty, "slow_peer_penalty", 1.0, 1.0e6)?,
            outlier: outlier_params(&s.outlier, name)?,
            failure_statuses: failure_statuses(s, name)?,
        },
        peers,
    })
}

fn outlier_params(o: &autoscale_outlier_spec_t, name: &str) -> Result<OutlierParams, String> {
    let field = |f: &str, v: u32, max: u32| {
        if v > max {
            Err(format!("upstreams.{name}.outlier.{f}: must be between 0 and {max} (got {v})"))
        } else {
            Ok(v)
        }
    };
    let stdev = o.success_rate_stdev;
    if !(stdev.is_finite() && (0.0..=100.0).contains(&stdev)) {
        return Err(format!("upstreams.{name}.outlier.success_rate_stdev: must be between 0 and 100"));
    }
    Ok(OutlierParams {
        consecutive_5xx: o.consecutive_5xx,
        consecutive_gateway: o.consecutive_gateway,
        consecutive_timeout: o.consecutive_timeout,
        base_ejection_us: o.base_ejection_ms as u64 * 1000,
        max_ejection_us: o.max_ejection_ms as u64 * 1000,
        jitter_us: o.ejection_jitter_ms as u64 * 1000,
        max_ejection_percent: field("max_ejection_percent", o.max_ejection_percent, 100)?,
        interval_us: (o.interval_ms.max(1)) as u64 * 1000,
        success_rate_stdev: stdev,
        success_rate_min_hosts: o.success_rate_min_hosts,
        success_rate_volume: o.success_rate_volume,
        failure_percentage: field("failure_percentage", o.failure_percentage, 100)?,
        failure_percentage_min_hosts: o.failure_percentage_min_hosts,
        failure_percentage_volume: o.failure_percentage_volume,
        half_open_probes: o.half_open_probes.max(1),
        half_open_successes: o.half_open_successes.max(1),
        panic_threshold: field("panic_threshold", o.panic_threshold, 100)?,
    })
}

/// # Safety
/// As for [`autoscale_config_apply`].
unsafe fn failure_statuses(s: &autoscale_upstream_spec_t, name: &str) -> Result<[u64; 10], String> {
    if s.nfailure_statuses == 0 {
        return Ok(default_failure_statuses());
    }
    if s.failure_statuses.is_null() {
        return Err(format!("upstreams.{name}.failure_statuses: NULL"));
    }
    let mut map = [0u64; 10];
    for (i, &st) in std::slice::from_raw_parts(s.failure_statuses, s.nfailure_statuses).iter().enumerate() {
        if !(100..=639).contains(&st) {
            return Err(format!("upstreams.{name}.failure_statuses[{}]: {st} is not an HTTP status", i + 1));
        }
        map[st as usize / 64] |= 1 << (st % 64);
    }
    Ok(map)
}

/// Gives the calling worker its in-flight column, reclaiming the columns of dead workers. Idempotent.
/// Returns the column (>= 0), or -1 when all are taken (the worker then runs without per-worker accounting).
#[no_mangle]
pub extern "C" fn autoscale_worker_attach() -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        IS_WORKER.store(true, Relaxed);
        // The first attach of this process: a column holding its pid is a dead predecessor's with a reused pid.
        let attach = if COLUMN.load(Relaxed) < 0 { Region::attach_new_worker } else { Region::attach_worker };
        match attach(region, pid(), &OS) {
            Some(c) => {
                COLUMN.store(c as i64, Relaxed);
                c as c_int
            }
            None => -1,
        }
    })
}

/// How an attempt that nginx retried ended, from the status nginx reports for it (a retry means nginx judged it
/// failed, except for 403/404 with `proxy_next_upstream http_403/http_404`).
fn retry_outcome(status: c_int) -> Outcome {
    match status {
        0 | 499 => Outcome::Aborted,
        502..=504 => Outcome::Gateway,
        500..=599 => Outcome::Http5xx,
        _ => Outcome::Success,
    }
}

/// How an attempt that got an HTTP response ended: a failure when its upstream counts the status as one.
fn response_outcome(region: &Region, upstream: u32, status: u32) -> Outcome {
    match kept_outcome(status) {
        Outcome::Success if region.fails_on(upstream, status) => match status {
            502..=504 => Outcome::Gateway,
            _ => Outcome::Http5xx,
        },
        outcome => outcome,
    }
}

/// [`response_outcome`] of a status its upstream does not count as a failure: a success, unless the client went away.
#[inline]
fn kept_outcome(status: u32) -> Outcome {
    match status {
        0 | 499 => Outcome::Aborted,
        _ => Outcome::Success,
    }
}

/// Releases what a displaced request entry still held.
fn release(region: &Region, old: &Entry, col: Option<u32>, now: u64) {
    for a in old.attempts().iter().filter(|a| a.end_us == 0) {
        region.end_attempt(a.slot, a.gen, col, Outcome::Aborted, 0, now);
    }
    region.header().evicted_requests.fetch_add(1, Relaxed);
}

/// The generation of upstream record `upstream` into `out`: it changes only when the record is handed to another
/// upstream, so `(index, generation)` names one upstream for good (pass both to `autoscale_balancer_pick`).
///
/// # Safety
/// `out` must point to a writable `uint32_t`.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM` (no upstream at that index), `AUTOSCALE_ERR_ARG`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_gen(upstream: u32, out: *mut u32) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        // SAFETY: the caller guarantees `out` is writable when not NULL.
        let Some(out) = out.as_mut() else {
            return AUTOSCALE_ERR_ARG;
        };
        match region.upstream_gen(upstream) {
            Some(g) => {
                *out = g;
                AUTOSCALE_OK
            }
            None => AUTOSCALE_ERR_UPSTREAM,
        }
    })
}

/// Chooses the peer for the next attempt of request `req` (nginx's request pointer, used only as a key) on
/// upstream `upstream` while its record has generation `upstream_gen` (`autoscale_upstream_gen` when the index was
/// resolved). `last_status` is 0 on the first attempt, else the status nginx reports for the previous one
/// (its end is recorded now: in flight no more, and its latency fed to the estimate).
///
/// # Safety
/// `out` must point to a writable struct. `req` is not dereferenced.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM`, `AUTOSCALE_ERR_NO_PEER`, `AUTOSCALE_ERR_ARG`,
/// `AUTOSCALE_ERR_STALE` (the record serves another upstream now; nothing was chosen).
#[no_mangle]
pub unsafe extern "C" fn autoscale_balancer_pick(
    req: *const c_void,
    upstream: u32,
    upstream_gen: u32,
    last_status: c_int,
    out: *mut autoscale_pick_t,
) -> c_int {
    cost::timed(cost::BALANCER, || {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        let Some(out) = out.as_mut() else {
            return AUTOSCALE_ERR_ARG;
        };
        if req.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        let key = req as usize;
        let now = now_us();
        let col = column();
        with_worker(|w| {
            let table = &mut w.requests;
            let entry = if last_status == 0 || table.find(key).is_none() {
                table.insert(key, upstream, now, |old| release(region, old, col, now))
            } else {
                table.find(key).unwrap_or_else(|| unreachable!())
            };
            if let Some(a) = entry
                .last_mut()
                .filter(|a| a.end_us == 0 && last_status != 0)
            {
                a.end_us = now;
                a.status = last_status as u32;
                region.end_attempt(
                    a.slot,
                    a.gen,
                    col,
                    retry_outcome(last_status),
                    now - a.start_us,
                    now,
                );
            }
            let pick = region.pick_at(upstream, upstream_gen, &|slot| entry.tried(slot), now, &mut w.rng, col);
            match pick {
                Ok(p) => {
                    entry.push(Attempt {
                        slot: p.slot,
                        gen: p.gen,
                        start_us: now,
                        end_us: 0,
                        status: 0,
                    });
                    *out = autoscale_pick_t {
                        slot: p.slot,
                        gen: p.gen,
                        more_tries: p.more_tries,
                        attempt: entry.count,
                        cost: p.cost,
                    };
                    AUTOSCALE_OK
                }
                Err(autoscale_core::PickError::UnknownUpstream) => AUTOSCALE_ERR_UPSTREAM,
                Err(autoscale_core::PickError::NoPeer) => AUTOSCALE_ERR_NO_PEER,
                Err(autoscale_core::PickError::StaleUpstream) => AUTOSCALE_ERR_STALE,
            }
        })
    })
}

/// Ends the request `req` in the log phase with the response `status`. When the request had one attempt and the
/// status tells its outcome (its upstream does not count it as a failure), everything is recorded and
/// `AUTOSCALE_OK` returned; otherwise (retries, or a failure status, which may come from nginx itself)
/// `AUTOSCALE_NEED_DETAIL` asks for [`autoscale_log_detail`]. A request the balancer never saw is ignored.
///
/// # Safety
/// `req` is not dereferenced.
#[no_mangle]
pub extern "C" fn autoscale_log_finish(req: *const c_void, status: c_int) -> c_int {
    cost::timed(cost::LOG, || {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        let key = req as usize;
        with_worker(|w| {
            let status = status.max(0) as u32;
            let rng = &mut w.rng;
            // one lookup: done here when the request had one attempt and its status tells the outcome
            w.requests
                .finish_with(key, |entry| {
                    if entry.count != 1 || region.fails_on(entry.upstream, status) {
                        if let Some(a) = entry.last_mut() {
                            a.status = status;
                        }
                        return (false, AUTOSCALE_NEED_DETAIL);
                    }
                    let now = now_us();
                    let a = &entry.attempts[0];
                    let outcome = kept_outcome(status); // fails_on was checked above
                    let latency = now.saturating_sub(a.start_us);
                    region.finish_attempt(a.slot, a.gen, column(), outcome, latency, now, rng);
                    (true, AUTOSCALE_OK)
                })
                .unwrap_or(AUTOSCALE_OK)
        })
    })
}

/// Ends the request `req` with each attempt's outcome, as classified by the caller from nginx's `$upstream_status`,
/// `$upstream_connect_time` and `$upstream_header_time`: `kinds[i]` is 0 when attempt `i` got an HTTP response
/// (then `statuses[i]` is judged against the upstream's failure statuses), 2 when it connected but got no valid
/// response header, 3 for a connect error, 4 for a timeout, 5 when the client went away. Both arrays are aligned
/// with the attempts from the end; attempts without an entry are judged by the status nginx reported.
///
/// # Safety
/// `kinds` and `statuses` must point to `n` readable u32 each (or be NULL with `n` = 0). `req` is not dereferenced.
#[no_mangle]
pub unsafe extern "C" fn autoscale_log_detail(
    req: *const c_void,
    kinds: *const u32,
    statuses: *const u32,
    n: usize,
) -> c_int {
    cost::timed(cost::LOG, || {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        if (kinds.is_null() || statuses.is_null()) && n > 0 {
            return AUTOSCALE_ERR_ARG;
        }
        let (kinds, statuses) = if n == 0 {
            (&[][..], &[][..])
        } else {
            (std::slice::from_raw_parts(kinds, n), std::slice::from_raw_parts(statuses, n))
        };
        let key = req as usize;
        with_worker(|w| {
            let rng = &mut w.rng;
            w.requests.remove_with(key, |entry| {
                let now = now_us();
                let attempts = entry.attempts();
                for (i, a) in attempts.iter().enumerate() {
                    let k = n.checked_sub(attempts.len() - i);
                    let outcome = match k.map(|k| (kinds[k], statuses[k])) {
                        Some((0, st)) => response_outcome(region, entry.upstream, st),
                        Some((kind, _)) => Outcome::from_u32(kind)
                            .filter(|o| o.is_failure() || *o == Outcome::Aborted)
                            .unwrap_or_else(|| response_outcome(region, entry.upstream, a.status)),
                        None if a.end_us != 0 => retry_outcome(a.status as c_int),
                        None => response_outcome(region, entry.upstream, a.status),
                    };
                    let end = if a.end_us == 0 { now } else { a.end_us };
                    let latency = end.saturating_sub(a.start_us);
                    if a.end_us == 0 {
                        region.end_attempt(a.slot, a.gen, column(), outcome, latency, now);
                    }
                    region.record(a.slot, a.gen, outcome, latency, now, rng);
                }
            });
        });
        AUTOSCALE_OK
    })
}

/// Periodic upkeep (call every half bucket from a timer in each worker; idempotent): clears the next window
/// bucket ahead of time.
#[no_mangle]
pub extern "C" fn autoscale_region_tick() -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        let now = now_us();
        let col = column();
        // A writer killed in its critical section left the writer lock held and an upstream half-written: repaired here.
        region.recover(pid(), &OS, now);
        with_worker(|w| {
            region.tick(now, &mut w.rng);
            // Requests reused without a log phase leave stale entries behind, and requests that never reach one (a
            // subrequest, `auth_request`) leave entries that may never be needed again; their in-flight counts go
            // back here.
            w.requests.sweep(now.saturating_sub(REQUEST_MAX_AGE_US), |stale| release(region, stale, col, now));
        });
        AUTOSCALE_OK
    })
}

/// Writes the peer record slots of upstream `upstream` into `slots` (at most `cap`) and returns how many the
/// upstream has (which may exceed `cap`).
///
/// # Safety
/// `slots` must point to `cap` writable u32 (or be NULL with `cap` = 0).
///
/// # Errors
/// `AUTOSCALE_ERR_ARG`; `AUTOSCALE_ERR_BUSY` when a writer kept the peer list changing for the whole bounded read.
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_peers(
    upstream: u32,
    slots: *mut u32,
    cap: usize,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        if upstream >= region.params().max_upstreams || (slots.is_null() && cap > 0) {
            return AUTOSCALE_ERR_ARG;
        }
        let Ok(v) = region.try_upstream_slots(upstream) else { return AUTOSCALE_ERR_BUSY };
        for (i, s) in v.iter().take(cap).enumerate() {
            *slots.add(i) = *s;
        }
        v.len() as c_int
    })
}

/// Copies the canonical `host:port` text of peer record `slot` into `buf` (not NUL-terminated) and returns its
/// length; the host part is the first `host_len` bytes of it (see `autoscale_peer_stats_t`).
///
/// # Safety
/// `buf` must point to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn autoscale_peer_addr(slot: u32, buf: *mut u8, len: usize) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        if slot >= region.params().max_peers || buf.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        let text = region.peer_addr(slot);
        let n = text.len().min(len);
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n);
        n as c_int
    })
}

/// Fills `out` with the statistics of peer record `slot`.
///
/// # Safety
/// `out` must point to a writable struct.
#[no_mangle]
pub unsafe extern "C" fn autoscale_peer_stats(
    slot: u32,
    out: *mut autoscale_peer_stats_t,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        let Some(out) = out.as_mut() else {
            return AUTOSCALE_ERR_ARG;
        };
        let now = now_us();
        let Some(s) = region.snapshot(slot, now) else {
            return AUTOSCALE_ERR_ARG;
        };
        let q = |p| histogram::quantile(&s.window.hist, p).unwrap_or(-1.0);
        let w = &s.window.counts;
        let t = &s.totals;
        let fail = |c: &[u64; counter::N], k: Outcome| c[counter::FAIL_BASE + k as usize - 1];
        *out = autoscale_peer_stats_t {
            slot: s.slot,
            gen: s.gen,
            state: s.state,
            upstream: s.upstream,
            weight: s.weight,
            port: s.port,
            host_len: s.host_len as u32,
            inflight: s.inflight,
            requests: w[counter::REQUESTS],
            failures: s.window.failures(),
            fail_http_5xx: fail(w, Outcome::Http5xx),
            fail_gateway: fail(w, Outcome::Gateway),
            fail_connect: fail(w, Outcome::Connect),
            fail_timeout: fail(w, Outcome::Timeout),
            aborted: w[counter::ABORTED],
            latency_sum_us: s.window.latency_sum_us,
            window_us: s.window_us,
            total_requests: t[counter::REQUESTS],
            total_failures: t[counter::FAIL_BASE..counter::FAIL_BASE + 4].iter().sum(),
            total_fail_http_5xx: fail(t, Outcome::Http5xx),
            total_fail_gateway: fail(t, Outcome::Gateway),
            total_fail_connect: fail(t, Outcome::Connect),
            total_fail_timeout: fail(t, Outcome::Timeout),
            total_aborted: t[counter::ABORTED],
            total_latency_us: s.total_latency_us,
            age_us: now.saturating_sub(s.added_us),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            ewma_us: s.ewma_us,
            cost: s.cost,
            slow_start: s.slow_start,
            health: s.health,
            times_ejected: s.times_ejected,
            ejections_total: s.ejections_total,
            ejected_for_us: s.ejected_for_us,
            consecutive_failures: s.consecutive[0],
            consecutive_gateway: s.consecutive[1],
            consecutive_timeouts: s.consecutive[2],
            _pad: 0,
        };
        AUTOSCALE_OK
    })
}

/// Fills `out` with facts about the region.
///
/// # Safety
/// `out` must point to a writable struct.
#[no_mangle]
pub unsafe extern "C" fn autoscale_region_info(out: *mut autoscale_region_info_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else {
            return AUTOSCALE_ERR_NO_REGION;
        };
        let Some(out) = out.as_mut() else {
            return AUTOSCALE_ERR_ARG;
        };
        let p = region.params();
        let h = region.header();
        *out = autoscale_region_info_t {
            max_upstreams: p.max_upstreams,
            max_peers: p.max_peers,
            max_workers: p.max_workers,
            window_buckets: p.window_buckets,
            bucket_ms: p.bucket_ms,
            workers_attached: region
                .worker_pids()
                .iter()
                .filter(|w| w.load(Relaxed) != 0)
                .count() as u32,
            total_size: region.layout().total as u64,
            config_epoch: h.config_epoch.load(Relaxed),
            dropped_samples: h.dropped_samples.load(Relaxed),
            evicted_requests: h.evicted_requests.load(Relaxed),
            writer_pid: region.writer().map_or(0, |(pid, _)| pid),
            writer_held_ms: region
                .writer()
                .map_or(0, |(_, since)| (now_us().saturating_sub(since) / 1000).min(u32::MAX as u64) as u32),
            writer_takeovers: h.writer_takeovers.load(Relaxed),
            repaired_markers: h.repaired_markers.load(Relaxed),
        };
        AUTOSCALE_OK
    })
}

fn wall_offset_us() -> i64 {
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    wall - now_us() as i64
}

/// Fills `out` with the state of upstream `upstream`.
///
/// # Safety
/// `out` must point to a writable struct.
///
/// # Errors
/// `AUTOSCALE_ERR_UPSTREAM` for an index that is no upstream; `AUTOSCALE_ERR_BUSY` as `autoscale_upstream_peers`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_info(upstream: u32, out: *mut autoscale_upstream_info_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(out) = out.as_mut() else { return AUTOSCALE_ERR_ARG };
        let Some((params, _, _)) = (match region.try_read_upstream(upstream) {
            Ok(r) => r,
            Err(_) => return AUTOSCALE_ERR_BUSY,
        }) else {
            return AUTOSCALE_ERR_UPSTREAM;
        };
        let now = now_us();
        let mut info = autoscale_upstream_info_t { npeers: 0, healthy: 0, ejected: 0, draining: 0, panic: 0, algorithm: params.algorithm as u32 };
        for slot in region.upstream_slots(upstream) {
            if let Some(p) = region.snapshot(slot, now) {
                info.npeers += 1;
                match p.health {
                    0 => info.healthy += 1,
                    3 => info.draining += 1,
                    _ => info.ejected += 1,
                }
            }
        }
        info.panic = region.upstream(upstream).head.panic.load(Relaxed);
        *out = info;
        AUTOSCALE_OK
    })
}

/// Copies up to `cap` events with sequence numbers from `since` on into `out`, writes the sequence number to ask
/// for next into `next`, and returns how many were copied. Times are converted to Unix time (µs).
///
/// # Safety
/// `out` must point to `cap` writable structs, `next` to a writable u64.
#[no_mangle]
pub unsafe extern "C" fn autoscale_events_read(since: u64, out: *mut autoscale_event_t, cap: usize, next: *mut u64) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if (out.is_null() && cap > 0) || next.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        let mut buf = vec![autoscale_core::events::EventRecord::default(); cap.min(autoscale_core::layout::EVENT_RING)];
        let (n, after) = region.read_events(since, &mut buf);
        let offset = wall_offset_us();
        for (i, e) in buf[..n].iter().enumerate() {
            *out.add(i) = autoscale_event_t {
                seq: e.seq,
                time_us: (e.time_us as i64 + offset).max(0) as u64,
                kind: e.kind,
                reason: e.reason,
                upstream: e.upstream,
                slot: e.slot,
                values: e.values,
            };
        }
        *next = after;
        n as c_int
    })
}

thread_local! {
    /// The event this worker's last claim stopped at because it was still being written, and since when.
    static EVENT_WAIT: std::cell::Cell<autoscale_core::events::ClaimWait> = Default::default();
}

/// Claims the events no worker has logged yet: writes `[from, to)` (empty when there are none or another worker
/// claimed them). Used so that each event is written to the error log exactly once. The range stops before an
/// event still being written (a later call claims it once complete, or after a second if its writer died).
///
/// # Safety
/// `from` and `to` must point to writable u64.
#[no_mangle]
pub unsafe extern "C" fn autoscale_events_claim(from: *mut u64, to: *mut u64) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if from.is_null() || to.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        let (a, b) = EVENT_WAIT.with(|w| {
            let mut wait = w.get();
            let claimed = region.claim_events(now_us(), &mut wait);
            w.set(wait);
            claimed
        });
        *from = a;
        *to = b;
        AUTOSCALE_OK
    })
}

/// Writes event `e` (as read by `autoscale_events_read`) as one JSON object into `buf` and returns its length, or
/// the length needed when `len` is too small.
///
/// # Safety
/// `e` must point to a valid struct, `buf` to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn autoscale_event_json(e: *const autoscale_event_t, buf: *mut u8, len: usize) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(e) = e.as_ref() else { return AUTOSCALE_ERR_ARG };
        if buf.is_null() && len > 0 {
            return AUTOSCALE_ERR_ARG;
        }
        let rec = autoscale_core::events::EventRecord {
            seq: e.seq,
            time_us: e.time_us,
            kind: e.kind,
            reason: e.reason,
            upstream: if e.upstream == u32::MAX || e.upstream < region.params().max_upstreams { e.upstream } else { u32::MAX },
            slot: if e.slot == u32::MAX || e.slot < region.params().max_peers { e.slot } else { u32::MAX },
            values: e.values,
        };
        let text = region.event_json(&rec, 0);
        if text.len() <= len {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf, text.len());
        }
        text.len() as c_int
    })
}

/// 1 when event kind `kind` is a warning (ejection, panic, skipped ejection), else 0.
#[no_mangle]
pub extern "C" fn autoscale_event_is_warning(kind: u32) -> c_int {
    autoscale_core::events::kind::is_warning(kind) as c_int
}

/// Takes or renews this worker's lease on the active health checks of upstream `upstream` for `lease_ms`.
/// Returns 1 when this worker holds it (and should probe), 0 when another live worker does.
#[no_mangle]
pub extern "C" fn autoscale_check_lease(upstream: u32, lease_ms: u32) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        region.check_lease(upstream, pid(), now_us(), lease_ms as u64 * 1000, &alive) as c_int
    })
}

/// Records an active health check of peer record `slot` (generation `gen`): `ok` 1 passed, 0 failed. `passes`
/// consecutive passes bring an ejected peer back; `fails` consecutive failures eject it until a check passes.
#[no_mangle]
pub extern "C" fn autoscale_check_result(slot: u32, gen: u32, ok: c_int, passes: u32, fails: u32) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        with_worker(|w| region.check_result(slot, gen, ok != 0, passes, fails, now_us(), &mut w.rng));
        AUTOSCALE_OK
    })
}

/// Notes that upstream `upstream` answered a request with its fallback response `status`; the first one after
/// 10 s without any becomes one `fallback` event (so it is logged once per episode, not per request).
#[no_mangle]
pub extern "C" fn autoscale_upstream_fallback(upstream: u32, status: u32) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        region.note_fallback(upstream, status, now_us(), 10_000_000) as c_int
    })
}

/// Records a scaling action of `upstream` (from `current` to `desired` instances, `ready` serving now) as a
/// `scale_up`/`scale_down` event, so that it reaches the event log, `autoscale.events()` and the dashboard once.
/// Returns 1 when recorded, 0 when `current` = `desired`.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM`.
#[no_mangle]
pub extern "C" fn autoscale_event_scale(upstream: u32, current: u32, desired: u32, ready: u32, panic: c_int) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if upstream >= region.params().max_upstreams {
            return AUTOSCALE_ERR_UPSTREAM;
        }
        region.note_scale(upstream, current, desired, ready, panic != 0, now_us()) as c_int
    })
}

/// Records a step of a scale-from-zero episode of `upstream` as an event (the event log, `autoscale.events()`, the
/// dashboard, `autoscale_events_total`): `kind` 0 `activating` (`a` = desired, `b` = held requests), 1 `activated`
/// (`a` = cold start in seconds, `b` = ready peers), 2 `activation_failed` (`a` = attempts, `b` = seconds until the
/// next try). Returns 1 when recorded.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM`, `AUTOSCALE_ERR_ARG` (another kind).
#[no_mangle]
pub extern "C" fn autoscale_event_activation(upstream: u32, kind: c_int, a: f64, b: f64) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if upstream >= region.params().max_upstreams {
            return AUTOSCALE_ERR_UPSTREAM;
        }
        use autoscale_core::events::kind as k;
        let kind = match kind {
            0 => k::ACTIVATING,
            1 => k::ACTIVATED,
            2 => k::ACTIVATION_FAILED,
            _ => return AUTOSCALE_ERR_ARG,
        };
        region.note_activation(upstream, kind, a, b, now_us()) as c_int
    })
}

/// Records that dependency `dependency` (1 redis, 2 etcd, 3 dns, 4 prometheus, 5 actuator, 6 consul, 7 kubernetes)
/// of upstream `upstream` (`u32::MAX`: of none) stopped answering (`up` 0: a `dependency_down` event) or answers
/// again (`up` 1: `dependency_up`, with the `failures` of the episode and `down_for` seconds). The caller writes one
/// per episode, not one per attempt. Returns 1 when recorded, 0 for an unknown dependency.
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION`, `AUTOSCALE_ERR_UPSTREAM`.
#[no_mangle]
pub extern "C" fn autoscale_event_dependency(upstream: u32, dependency: u32, up: c_int, failures: u32, down_for: f64) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if upstream != u32::MAX && upstream >= region.params().max_upstreams {
            return AUTOSCALE_ERR_UPSTREAM;
        }
        let down_for = if down_for.is_finite() { down_for.max(0.0) } else { 0.0 };
        region.note_dependency(upstream, dependency, up != 0, failures as f64, down_for, now_us()) as c_int
    })
}

/// Runs a run-time change and reports its error text.
///
/// # Safety
/// `addr` must point to `addr_len` readable bytes; `err` to `err_len` writable bytes (or be NULL).
unsafe fn admin(
    addr: *const u8,
    addr_len: usize,
    err: *mut c_char,
    err_len: usize,
    f: impl FnOnce(&Region, &str) -> Result<(), autoscale_core::admin::AdminError>,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(text) = bytes(addr, addr_len).and_then(|b| std::str::from_utf8(b).ok()) else {
            write_err(err, err_len, "address is not UTF-8");
            return AUTOSCALE_ERR_ARG;
        };
        match f(region, text) {
            Ok(()) => AUTOSCALE_OK,
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                admin_code(&e)
            }
        }
    })
}

/// The code of a refused run-time change ([`AUTOSCALE_ERR_BUSY`]: retry later).
fn admin_code(e: &autoscale_core::admin::AdminError) -> c_int {
    match e {
        autoscale_core::admin::AdminError::Config(c) => config_code(c),
        _ => AUTOSCALE_ERR_CONFIG,
    }
}

/// Adds peer `addr` (`host:port`) with `weight` to upstream `upstream`, in every worker at once (not persisted: a
/// reload applies nginx.conf again).
///
/// # Safety
/// `addr` must point to `addr_len` readable bytes; `err` to `err_len` writable bytes (or be NULL).
///
/// # Errors
/// `AUTOSCALE_ERR_CONFIG` with the reason in `err`; nothing changed then.
#[no_mangle]
pub unsafe extern "C" fn autoscale_admin_peer_add(
    upstream: u32,
    addr: *const u8,
    addr_len: usize,
    weight: u32,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    admin(addr, addr_len, err, err_len, |r, a| r.add_peer(upstream, a, weight, pid(), &OS, now_us()))
}

/// Removes peer `addr` from upstream `upstream` (its in-flight requests finish).
///
/// # Safety
/// As for [`autoscale_admin_peer_add`].
///
/// # Errors
/// As for [`autoscale_admin_peer_add`].
#[no_mangle]
pub unsafe extern "C" fn autoscale_admin_peer_remove(
    upstream: u32,
    addr: *const u8,
    addr_len: usize,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    admin(addr, addr_len, err, err_len, |r, a| r.remove_peer(upstream, a, pid(), &OS, now_us()))
}

/// Sets the weight of peer `addr` of upstream `upstream`.
///
/// # Safety
/// As for [`autoscale_admin_peer_add`].
///
/// # Errors
/// As for [`autoscale_admin_peer_add`].
#[no_mangle]
pub unsafe extern "C" fn autoscale_admin_peer_weight(
    upstream: u32,
    addr: *const u8,
    addr_len: usize,
    weight: u32,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    admin(addr, addr_len, err, err_len, |r, a| r.set_weight(upstream, a, weight, pid(), &OS, now_us()))
}

/// Drains (`draining` = 1) or re-enables (0) peer `addr` of upstream `upstream`. Returns 1 when its state changed,
/// 0 when it already was so.
///
/// # Safety
/// As for [`autoscale_admin_peer_add`].
///
/// # Errors
/// As for [`autoscale_admin_peer_add`].
#[no_mangle]
pub unsafe extern "C" fn autoscale_admin_peer_drain(
    upstream: u32,
    addr: *const u8,
    addr_len: usize,
    draining: c_int,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let mut changed = false;
    let rc = admin(addr, addr_len, err, err_len, |r, a| {
        let slot = r
            .find_peer(upstream, a)
            .ok_or_else(|| autoscale_core::admin::AdminError::UnknownPeer(a.to_owned()))?;
        changed = r.set_draining(slot, draining != 0, now_us());
        Ok(())
    });
    if rc == AUTOSCALE_OK {
        changed as c_int
    } else {
        rc
    }
}

/// Replaces the tunables of upstream `upstream` with those of `spec` (its name and peers are ignored).
///
/// # Safety
/// `spec` must point to a valid spec (as for [`autoscale_config_apply`]); `err` to `err_len` writable bytes.
///
/// # Errors
/// As for [`autoscale_admin_peer_add`].
#[no_mangle]
pub unsafe extern "C" fn autoscale_admin_upstream_tune(
    upstream: u32,
    spec: *const autoscale_upstream_spec_t,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(spec) = spec.as_ref() else { return AUTOSCALE_ERR_ARG };
        let no_peers = autoscale_upstream_spec_t { peers: std::ptr::null(), npeers: 0, ..std::ptr::read(spec) };
        let conf = match upstream_conf(&no_peers) {
            Ok(c) => c,
            Err(msg) => {
                write_err(err, err_len, &msg);
                return AUTOSCALE_ERR_CONFIG;
            }
        };
        match region.tune(upstream, conf.params, pid(), &OS, now_us()) {
            Ok(()) => AUTOSCALE_OK,
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                admin_code(&e)
            }
        }
    })
}
