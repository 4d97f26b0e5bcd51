//! What the status, the admin API and the Prometheus exporter read beyond the statistics: the tunables in force
//! after a run-time change (`control.tune`, an admin `PATCH`), read from shared memory rather than from the Lua table
//! of `init_by_lua`, so every worker shows the same, current values; and the totals of events per kind.

use crate::{autoscale_outlier_spec_t, guard, AUTOSCALE_ERR_ARG, AUTOSCALE_ERR_BUSY, AUTOSCALE_ERR_NO_REGION, AUTOSCALE_ERR_UPSTREAM, AUTOSCALE_OK, REGION};
use autoscale_core::engine::UpstreamParams;
use autoscale_core::health::OutlierParams;
use autoscale_core::layout::EVENT_KINDS;
use std::ffi::c_int;

/// The tunables of an upstream as they are in force, in the units of `autoscale_upstream_spec_t` (its peers are
/// read with `autoscale_upstream_peers`).
#[repr(C)]
pub struct autoscale_upstream_config_t {
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
    /// 0 when the slow-peer rule is off.
    pub slow_peer_factor: f64,
    pub slow_peer_penalty: f64,
    pub outlier: autoscale_outlier_spec_t,
    /// HTTP statuses counted as failures, as a bitmap: bit `s % 64` of word `s / 64` for status `s`.
    pub failure_statuses: [u64; 10],
}

fn ms(us: u64) -> u32 {
    u32::try_from(us / 1000).unwrap_or(u32::MAX)
}

fn outlier_spec(o: &OutlierParams) -> autoscale_outlier_spec_t {
    autoscale_outlier_spec_t {
        consecutive_5xx: o.consecutive_5xx,
        consecutive_gateway: o.consecutive_gateway,
        consecutive_timeout: o.consecutive_timeout,
        base_ejection_ms: ms(o.base_ejection_us),
        max_ejection_ms: ms(o.max_ejection_us),
        ejection_jitter_ms: ms(o.jitter_us),
        max_ejection_percent: o.max_ejection_percent,
        interval_ms: ms(o.interval_us),
        success_rate_min_hosts: o.success_rate_min_hosts,
        success_rate_volume: o.success_rate_volume,
        failure_percentage: o.failure_percentage,
        failure_percentage_min_hosts: o.failure_percentage_min_hosts,
        failure_percentage_volume: o.failure_percentage_volume,
        half_open_probes: o.half_open_probes,
        half_open_successes: o.half_open_successes,
        panic_threshold: o.panic_threshold,
        success_rate_stdev: o.success_rate_stdev,
    }
}

fn config_of(p: &UpstreamParams) -> autoscale_upstream_config_t {
    autoscale_upstream_config_t {
        algorithm: p.algorithm as u32,
        retries: p.retries,
        slow_start_ms: ms(p.slow_start.window_us),
        decay_ms: ms(p.decay_us),
        default_rtt_us: p.default_rtt_us,
        _pad: 0,
        slow_start_aggression: p.slow_start.aggression,
        slow_start_min_weight: p.slow_start.min_weight,
        failure_penalty: p.failure_penalty,
        slow_peer_factor: p.slow_peer_factor,
        slow_peer_penalty: p.slow_peer_penalty,
        outlier: outlier_spec(&p.outlier),
        failure_statuses: p.failure_statuses,
    }
}

/// Fills `out` with the tunables of upstream `upstream` in force now (read consistently from shared memory).
///
/// # Safety
/// `out` must point to a writable struct (or be NULL, which is refused).
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION` before `autoscale_region_init`; `AUTOSCALE_ERR_ARG` for NULL; `AUTOSCALE_ERR_UPSTREAM`
/// for an index that is not an upstream; `AUTOSCALE_ERR_BUSY` when a writer kept the upstream changing for the whole
/// bounded read (retry).
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_config(upstream: u32, out: *mut autoscale_upstream_config_t) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        // SAFETY: the caller passes NULL or a pointer to a writable struct.
        let Some(out) = (unsafe { out.as_mut() }) else { return AUTOSCALE_ERR_ARG };
        let Some((params, _, _)) = (match region.try_read_upstream(upstream) {
            Ok(r) => r,
            Err(_) => return AUTOSCALE_ERR_BUSY,
        }) else {
            return AUTOSCALE_ERR_UPSTREAM;
        };
        *out = config_of(&params);
        AUTOSCALE_OK
    })
}

/// Writes the number of events written so far of each kind into `out[kind]` (at most `cap` kinds) and returns the
/// number of kinds counted ([`EVENT_KINDS`]; the last one counts any kind at or above it).
///
/// # Safety
/// `out` must point to `cap` writable u64 (or be NULL with `cap` = 0).
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION` before `autoscale_region_init`; `AUTOSCALE_ERR_ARG` for NULL with `cap` > 0.
#[no_mangle]
pub unsafe extern "C" fn autoscale_event_totals(out: *mut u64, cap: usize) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if out.is_null() && cap > 0 {
            return AUTOSCALE_ERR_ARG;
        }
        for (k, total) in region.event_totals().into_iter().take(cap).enumerate() {
            // SAFETY: k < cap, and `out` points to `cap` writable u64.
            unsafe { *out.add(k) = total };
        }
        EVENT_KINDS as c_int
    })
}

/// Copies the name of event kind `kind` (`"ejected"`, ...; `"unknown"` for a number that is no kind) into `buf`,
/// truncated to `len` bytes, not NUL-terminated, and returns its length.
///
/// # Safety
/// `buf` must point to `len` writable bytes.
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for a NULL `buf`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_event_kind_name(kind: u32, buf: *mut u8, len: usize) -> c_int {
    guard(|| {
        if buf.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        let name = autoscale_core::events::kind::name(kind);
        let n = name.len().min(len);
        // SAFETY: `buf` points to `len` >= n writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), buf, n) };
        n as c_int
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_core::engine::default_failure_statuses;
    use autoscale_core::select::Algorithm;

    #[test]
    fn the_tunables_read_back_in_the_units_they_were_given_in() {
        let p = UpstreamParams { algorithm: Algorithm::RoundRobin, retries: 3, decay_us: 2_500_000, ..UpstreamParams::default() };
        let c = config_of(&p);
        assert_eq!((c.algorithm, c.retries, c.decay_ms), (1, 3, 2500));
        assert_eq!(c.outlier.base_ejection_ms, 30_000);
        assert_eq!(c.outlier.interval_ms, 10_000);
        assert_eq!(c.failure_statuses, default_failure_statuses());
        assert_eq!(ms(u64::MAX), u32::MAX);
    }
}
