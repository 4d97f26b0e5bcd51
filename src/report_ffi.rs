//! C ABI of backend-reported load (see `autoscale_core::report`): an upstream's report settings, the log-phase call
//! that takes a response's load report and `Retry-After`, agent answers, and the values for status and metrics.

use crate::{bytes, guard, now_us, with_worker, column, AUTOSCALE_ERR_ARG, AUTOSCALE_ERR_NO_REGION, AUTOSCALE_OK, REGION};
use autoscale_core::report::{ReportConfig, ReportKind, ReportParams};
use autoscale_core::Outcome;
use std::ffi::{c_int, c_void};

/// `autoscale_log_report`: a load report was stored.
pub const AUTOSCALE_REPORT_TAKEN: c_int = 1;
/// `autoscale_log_report`: the load header was there but malformed (ignored, counted).
pub const AUTOSCALE_REPORT_MALFORMED: c_int = 2;
/// `autoscale_log_report`: the response was back-pressure (429/503 with `Retry-After`).
pub const AUTOSCALE_REPORT_BACKPRESSURE: c_int = 4;
/// `autoscale_log_report`: the request was finished here (as a success of its peer); skip `autoscale_log_finish`.
pub const AUTOSCALE_REPORT_FINISHED: c_int = 8;

/// How an upstream reads backend-reported load (times in milliseconds).
#[repr(C)]
pub struct autoscale_reports_spec_t {
    /// 1: reports enter the cost.
    pub enabled: u32,
    /// 1: `Retry-After` on 429/503 raises the cost for its time.
    pub backpressure: u32,
    /// 1: agent weight percentages enter the cost.
    pub agent: u32,
    /// 0 ORCA utilization, 1 ORCA named metric, 2 plain value.
    pub kind: u32,
    pub blackout_ms: u32,
    pub expiry_ms: u32,
    pub backpressure_max_ms: u32,
    /// Time constant of the smoothing of each peer's reports (0: the last report as it is).
    pub smoothing_ms: u32,
    pub backpressure_penalty: f64,
    pub scale: f64,
    pub error_penalty: f64,
    /// The ORCA named metric (`named_metrics.<name>`), at most 63 bytes.
    pub named: *const u8,
    pub named_len: usize,
}

/// The reported values of one peer record. NaN where nothing was reported.
#[repr(C)]
pub struct autoscale_peer_report_t {
    /// The load the cost uses.
    pub load: f64,
    pub cpu_utilization: f64,
    pub application_utilization: f64,
    pub rps_fractional: f64,
    pub eps: f64,
    /// The named metric, or the plain value.
    pub named: f64,
    /// Age of the last report in seconds (-1: none).
    pub age: f64,
    /// Back-off left in seconds (0: none).
    pub backoff: f64,
    pub reports: u64,
    pub malformed: u64,
    pub backpressure: u64,
    /// 1 when the report is used now (past the blackout, not expired).
    pub usable: u32,
    /// The agent's last state (0 none, 1 up, 2 drain, 3 maint) and weight percent (0 none).
    pub agent_state: u32,
    pub agent_weight: u32,
    pub _pad: u32,
}

/// The reported load of an upstream at the last upkeep: over its healthy peers with a usable report.
#[repr(C)]
pub struct autoscale_upstream_reported_t {
    /// Mean load (-1 while no peer has a usable report).
    pub mean: f64,
    pub sum: f64,
    pub count: u64,
    /// Sum and count of the named metric.
    pub named_sum: f64,
    pub named_count: u64,
}

/// Sets how upstream `upstream` reads reports; `spec` NULL switches them off.
///
/// # Safety
/// `spec` must be NULL or point to a readable struct whose `named` points to `named_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_reports(upstream: u32, spec: *const autoscale_reports_spec_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if upstream >= region.params().max_upstreams {
            return AUTOSCALE_ERR_ARG;
        }
        let Some(s) = spec.as_ref() else {
            region.configure_reports(upstream, None);
            return AUTOSCALE_OK;
        };
        let Some(named) = bytes(s.named, s.named_len) else { return AUTOSCALE_ERR_ARG };
        if named.len() > 63 || s.kind > 2 {
            return AUTOSCALE_ERR_ARG;
        }
        let kind = match s.kind {
            1 => ReportKind::OrcaNamed,
            2 => ReportKind::Value,
            _ => ReportKind::OrcaUtilization,
        };
        let conf = ReportConfig {
            params: ReportParams {
                enabled: s.enabled != 0,
                backpressure: s.backpressure != 0,
                blackout_us: s.blackout_ms as u64 * 1000,
                expiry_us: s.expiry_ms as u64 * 1000,
                backpressure_max_us: s.backpressure_max_ms as u64 * 1000,
                backpressure_penalty: s.backpressure_penalty,
                scale: s.scale,
                smoothing_us: s.smoothing_ms as u64 * 1000,
            },
            agent: s.agent != 0,
            kind,
            named,
            error_penalty: s.error_penalty,
        };
        region.configure_reports(upstream, Some(&conf));
        AUTOSCALE_OK
    })
}

/// The upstream index of the request `req` tracked since its balancer phase, or -1.
///
/// # Safety
/// `req` is not dereferenced.
#[no_mangle]
pub extern "C" fn autoscale_request_upstream(req: *const c_void) -> c_int {
    guard(|| {
        if REGION.get().is_none() {
            return AUTOSCALE_ERR_NO_REGION;
        }
        with_worker(|w| w.requests.find(req as usize).map_or(-1, |e| e.upstream as c_int))
    })
}

/// In the log phase, before `autoscale_log_finish`: takes the load report `header` (`header_len` 0 when the response
/// had none) and, when `status` is 429 or 503, its `retry_after` header, for the last attempt of request `req`.
/// Returns `AUTOSCALE_REPORT_*` bits. A back-pressure response of a request with one attempt is finished here as
/// a success of its peer (it is not ejected for it): then `AUTOSCALE_REPORT_FINISHED` is set and the caller skips
/// `autoscale_log_finish`.
///
/// # Safety
/// `header` and `retry_after` must point to their lengths in readable bytes (or be NULL with length 0).
#[no_mangle]
pub unsafe extern "C" fn autoscale_log_report(
    req: *const c_void,
    status: c_int,
    header: *const u8,
    header_len: usize,
    retry_after: *const u8,
    retry_after_len: usize,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let (Some(header), Some(retry_after)) = (bytes(header, header_len), bytes(retry_after, retry_after_len)) else {
            return AUTOSCALE_ERR_ARG;
        };
        let key = req as usize;
        let now = now_us();
        let status = status.max(0) as u32;
        with_worker(|w| {
            let Some(entry) = w.requests.find(key) else { return 0 };
            let count = entry.count;
            let Some(a) = entry.last_mut().copied() else { return 0 };
            let taken = region.take_report(a.slot, a.gen, status, header, retry_after, now);
            let mut rc = 0;
            if taken.report {
                rc |= AUTOSCALE_REPORT_TAKEN;
            }
            if taken.malformed {
                rc |= AUTOSCALE_REPORT_MALFORMED;
            }
            if taken.backpressure {
                rc |= AUTOSCALE_REPORT_BACKPRESSURE;
                if count == 1 && a.end_us == 0 {
                    let rng = &mut w.rng;
                    w.requests.finish_with(key, |_| {
                        region.finish_attempt(a.slot, a.gen, column(), Outcome::Success, now.saturating_sub(a.start_us), now, rng);
                        (true, ())
                    });
                    rc |= AUTOSCALE_REPORT_FINISHED;
                }
            }
            rc
        })
    })
}

/// The result code of an agent answer: its state (0 none, 1 up, 2 drain, 3 maint), plus 16 when it gave a weight.
fn answer_code(a: &autoscale_core::report::AgentAnswer) -> c_int {
    a.state.map_or(0, |s| s as c_int) + if a.weight_percent.is_some() { 16 } else { 0 }
}

/// Applies an agent's answer (`up`, `drain`, `maint`, `NN%`) for peer record `slot` while it has generation `gen`.
/// Returns the state it asked for (0 none, 1 up, 2 drain, 3 maint) plus 16 when it gave a weight.
///
/// # Safety
/// `text` must point to `len` readable bytes.
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for an answer that says nothing known (counted as malformed) or a stale record.
#[no_mangle]
pub unsafe extern "C" fn autoscale_agent_answer(slot: u32, gen: u32, text: *const u8, len: usize) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(text) = bytes(text, len) else { return AUTOSCALE_ERR_ARG };
        match region.agent_answer(slot, gen, text, now_us()) {
            Ok(a) => answer_code(&a),
            Err(_) => AUTOSCALE_ERR_ARG,
        }
    })
}

/// Fills `out` with the reported values of peer record `slot`.
///
/// # Safety
/// `out` must point to a writable struct.
#[no_mangle]
pub unsafe extern "C" fn autoscale_peer_report(slot: u32, out: *mut autoscale_peer_report_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(out) = out.as_mut() else { return AUTOSCALE_ERR_ARG };
        let Some(r) = region.peer_report(slot, now_us()) else { return AUTOSCALE_ERR_ARG };
        *out = autoscale_peer_report_t {
            load: r.load,
            cpu_utilization: r.fields[0],
            application_utilization: r.fields[1],
            rps_fractional: r.fields[2],
            eps: r.fields[3],
            named: r.fields[4],
            age: if r.age_us == u64::MAX { -1.0 } else { r.age_us as f64 / 1e6 },
            backoff: r.backoff_us as f64 / 1e6,
            reports: r.reports,
            malformed: r.malformed,
            backpressure: r.backpressure,
            usable: r.usable as u32,
            agent_state: r.agent_state,
            agent_weight: r.agent_weight,
            _pad: 0,
        };
        AUTOSCALE_OK
    })
}

/// Fills `out` with the reported load of upstream `upstream` at the last upkeep.
///
/// # Safety
/// `out` must point to a writable struct.
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_reported(upstream: u32, out: *mut autoscale_upstream_reported_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let Some(out) = out.as_mut() else { return AUTOSCALE_ERR_ARG };
        let Some((mean, sum, count, named_sum, named_count)) = region.reported_load(upstream) else {
            return AUTOSCALE_ERR_ARG;
        };
        *out = autoscale_upstream_reported_t { mean, sum, count, named_sum, named_count };
        AUTOSCALE_OK
    })
}

/// Takes the answer of a polled endpoint for peer record `slot` while it has generation `gen`: `format` 0 agent words
/// (as `autoscale_agent_answer`), 1 a JSON document whose number at `field` (dot-separated keys) is the load,
/// 2 Prometheus text whose metric `field` is the load. Returns as `autoscale_agent_answer` (0 for a load value).
///
/// # Safety
/// `body` and `field` must point to their lengths in readable bytes.
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for a body that does not parse (counted as malformed), an unknown format or a stale record.
#[no_mangle]
pub unsafe extern "C" fn autoscale_poll_result(
    slot: u32,
    gen: u32,
    format: u32,
    body: *const u8,
    body_len: usize,
    field: *const u8,
    field_len: usize,
) -> c_int {
    use autoscale_core::report::PollFormat;
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let (Some(body), Some(field)) = (bytes(body, body_len), bytes(field, field_len)) else { return AUTOSCALE_ERR_ARG };
        let format = match format {
            0 => PollFormat::Agent,
            1 => PollFormat::Json,
            2 => PollFormat::Prometheus,
            _ => return AUTOSCALE_ERR_ARG,
        };
        match region.take_polled(slot, gen, format, body, field, now_us()) {
            Ok(a) => answer_code(&a),
            Err(_) => AUTOSCALE_ERR_ARG,
        }
    })
}
