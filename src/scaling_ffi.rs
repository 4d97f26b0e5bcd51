//! Scaling decisions and webhook signatures for `resty.autoscale.scaler` / `resty.autoscale.actuator`.
//!
//! A scaler is an opaque handle owned by the Lua side (`autoscale_scaler_new` / `autoscale_scaler_free`, freed by
//! `ffi.gc`); it lives in the worker that runs the service's decision timer, never in shared memory, and is only
//! used from timers, never from a request.

use crate::{guard, AUTOSCALE_ERR_ARG, AUTOSCALE_OK};
use autoscale_core::hmac::hmac_sha256;
use autoscale_core::scaling::{Params, Scaler, Signals, Target, SIGNALS};
use std::ffi::c_int;

/// Parameters of a scaler (see docs/scaling.md); times in milliseconds, a target of 0 switches its signal off.
/// Signals, in array order: utilization, requests/s per instance, latency (µs), error rate, external per instance.
#[repr(C)]
pub struct autoscale_scaling_params_t {
    pub min_instances: u32,
    pub max_instances: u32,
    pub capacity: f64,
    pub targets: [f64; 6],
    pub hold_ms: [u32; 6],
    pub up_window_ms: u32,
    pub down_window_ms: u32,
    pub panic_window_ms: u32,
    pub cooldown_ms: u32,
    pub max_step_up: u32,
    pub forecast_lead_ms: u32,
    pub tolerance: f64,
    pub panic_threshold: f64,
    pub max_up_rate: f64,
    pub max_down_rate: f64,
    pub forecast_alpha: f64,
    pub forecast_beta: f64,
}

/// One tick's measurements; a NaN or negative value is missing.
#[repr(C)]
pub struct autoscale_scaling_signals_t {
    pub current: u32,
    pub ready: u32,
    pub values: [f64; 6],
}

/// One decision (see `autoscale_core::scaling::Decision`).
#[repr(C)]
pub struct autoscale_scaling_decision_t {
    pub current: u32,
    pub ready: u32,
    pub desired: u32,
    /// 1: act (ask for `desired`).
    pub action: u32,
    /// 0 steady, 1 scale up, 2 scale down, 3 holding, 4 up window, 5 stabilizing, 6 cooldown, 7 panic, 8 bounded,
    /// 9 no data.
    pub reason: u32,
    /// Index of the deciding signal, -1 for none.
    pub signal: i32,
    pub recommendation: u32,
    pub panic: u32,
    pub per_signal: [u32; 6],
    pub value: f64,
    pub target: f64,
    /// NaN without a forecast.
    pub forecast_rps: f64,
}

/// A service's decision state (opaque).
pub struct autoscale_scaler_t {
    inner: Scaler,
}

fn us(ms: u32) -> u64 {
    ms as u64 * 1000
}

fn params_of(p: &autoscale_scaling_params_t) -> Option<Params> {
    let finite = [p.capacity, p.tolerance, p.panic_threshold, p.max_up_rate, p.max_down_rate, p.forecast_alpha, p.forecast_beta];
    if finite.iter().chain(p.targets.iter()).any(|v| !v.is_finite() || *v < 0.0)
        || p.min_instances > p.max_instances
        || p.max_up_rate < 1.0
        || p.max_down_rate < 1.0
        || p.forecast_alpha > 1.0
        || p.forecast_beta > 1.0
    {
        return None;
    }
    let mut targets = [Target::OFF; SIGNALS];
    for (i, t) in targets.iter_mut().enumerate() {
        *t = Target { target: p.targets[i], hold_us: us(p.hold_ms[i]) };
    }
    Some(Params {
        min_instances: p.min_instances,
        max_instances: p.max_instances,
        capacity: p.capacity,
        targets,
        tolerance: p.tolerance,
        up_window_us: us(p.up_window_ms),
        down_window_us: us(p.down_window_ms),
        panic_threshold: p.panic_threshold,
        panic_window_us: us(p.panic_window_ms),
        cooldown_us: us(p.cooldown_ms),
        max_up_rate: p.max_up_rate,
        max_step_up: p.max_step_up,
        max_down_rate: p.max_down_rate,
        forecast_lead_us: us(p.forecast_lead_ms),
        forecast_alpha: p.forecast_alpha,
        forecast_beta: p.forecast_beta,
    })
}

/// Creates a scaler; `*out` receives the handle, to be released with `autoscale_scaler_free`.
///
/// # Safety
/// `params` must point to a valid `autoscale_scaling_params_t` and `out` to a writable pointer.
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for NULL pointers or out-of-range parameters (the Lua side validates first, with field paths).
#[no_mangle]
pub unsafe extern "C" fn autoscale_scaler_new(
    params: *const autoscale_scaling_params_t,
    out: *mut *mut autoscale_scaler_t,
) -> c_int {
    guard(|| {
        if params.is_null() || out.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        // SAFETY: checked non-NULL; the caller guarantees it points to a valid struct.
        let Some(p) = params_of(unsafe { &*params }) else {
            return AUTOSCALE_ERR_ARG;
        };
        let handle = Box::into_raw(Box::new(autoscale_scaler_t { inner: Scaler::new(p) }));
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { *out = handle };
        AUTOSCALE_OK
    })
}

/// Releases a scaler made by `autoscale_scaler_new`; NULL is ignored.
///
/// # Safety
/// `h` must come from `autoscale_scaler_new` and not have been freed.
#[no_mangle]
pub unsafe extern "C" fn autoscale_scaler_free(h: *mut autoscale_scaler_t) {
    let _ = guard(|| {
        if !h.is_null() {
            // SAFETY: the caller guarantees `h` came from Box::into_raw in autoscale_scaler_new, freed once.
            drop(unsafe { Box::from_raw(h) });
        }
        AUTOSCALE_OK
    });
}

/// One tick: the decision for `signals` at `now_ms` (any monotonic clock in milliseconds) into `*out`.
///
/// # Safety
/// `h` from `autoscale_scaler_new`; `signals` readable, `out` writable.
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for a NULL pointer.
#[no_mangle]
pub unsafe extern "C" fn autoscale_scaler_decide(
    h: *mut autoscale_scaler_t,
    now_ms: f64,
    signals: *const autoscale_scaling_signals_t,
    out: *mut autoscale_scaling_decision_t,
) -> c_int {
    guard(|| {
        if h.is_null() || signals.is_null() || out.is_null() || !now_ms.is_finite() || now_ms < 0.0 {
            return AUTOSCALE_ERR_ARG;
        }
        // SAFETY: all three checked non-NULL; the caller guarantees they are valid and not aliased.
        let (sc, s, out) = unsafe { (&mut (*h).inner, &*signals, &mut *out) };
        let d = sc.decide((now_ms * 1000.0) as u64, &Signals { current: s.current, ready: s.ready, values: s.values });
        *out = autoscale_scaling_decision_t {
            current: d.current,
            ready: d.ready,
            desired: d.desired,
            action: d.action as u32,
            reason: d.reason as u32,
            signal: d.signal.map_or(-1, |x| x as i32),
            recommendation: d.recommendation,
            panic: d.panic as u32,
            per_signal: d.per_signal,
            value: d.value,
            target: d.target,
            forecast_rps: d.forecast_rps,
        };
        AUTOSCALE_OK
    })
}

/// HMAC-SHA256 of `msg` under `key` into the 32 bytes at `out`.
///
/// # Safety
/// `key`/`msg` readable for their lengths (may be NULL when the length is 0); `out` writable for 32 bytes.
///
/// # Errors
/// `AUTOSCALE_ERR_ARG` for a NULL pointer with a non-zero length, or a NULL `out`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_hmac_sha256(
    key: *const u8,
    key_len: usize,
    msg: *const u8,
    msg_len: usize,
    out: *mut u8,
) -> c_int {
    guard(|| {
        if out.is_null() || (key.is_null() && key_len > 0) || (msg.is_null() && msg_len > 0) {
            return AUTOSCALE_ERR_ARG;
        }
        let slice = |p: *const u8, n: usize| -> &[u8] {
            if n == 0 {
                &[]
            } else {
                // SAFETY: non-NULL (checked) and readable for `n` bytes (caller's guarantee).
                unsafe { std::slice::from_raw_parts(p, n) }
            }
        };
        let mac = hmac_sha256(slice(key, key_len), slice(msg, msg_len));
        // SAFETY: `out` is non-NULL and writable for 32 bytes (caller's guarantee).
        unsafe { std::ptr::copy_nonoverlapping(mac.as_ptr(), out, 32) };
        AUTOSCALE_OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> autoscale_scaling_params_t {
        autoscale_scaling_params_t {
            min_instances: 1,
            max_instances: 10,
            capacity: 10.0,
            targets: [0.7, 0.0, 0.0, 0.0, 0.0, 0.0],
            hold_ms: [0; 6],
            up_window_ms: 0,
            down_window_ms: 300_000,
            panic_window_ms: 6000,
            cooldown_ms: 5000,
            max_step_up: 4,
            forecast_lead_ms: 0,
            tolerance: 0.1,
            panic_threshold: 2.0,
            max_up_rate: 2.0,
            max_down_rate: 2.0,
            forecast_alpha: 0.5,
            forecast_beta: 0.3,
        }
    }

    #[test]
    fn decide_through_the_abi_and_refuse_hostile_input() {
        let mut h: *mut autoscale_scaler_t = std::ptr::null_mut();
        unsafe {
            assert_eq!(autoscale_scaler_new(std::ptr::null(), &mut h), AUTOSCALE_ERR_ARG);
            let mut bad = defaults();
            bad.capacity = f64::NAN;
            assert_eq!(autoscale_scaler_new(&bad, &mut h), AUTOSCALE_ERR_ARG);
            bad = defaults();
            bad.min_instances = 11;
            assert_eq!(autoscale_scaler_new(&bad, &mut h), AUTOSCALE_ERR_ARG);
            assert_eq!(autoscale_scaler_new(&defaults(), &mut h), AUTOSCALE_OK);
            let s = autoscale_scaling_signals_t { current: 2, ready: 2, values: [28.0, f64::NAN, f64::NAN, f64::NAN, f64::NAN, f64::NAN] };
            let mut d: autoscale_scaling_decision_t = std::mem::zeroed();
            assert_eq!(autoscale_scaler_decide(h, f64::NAN, &s, &mut d), AUTOSCALE_ERR_ARG);
            assert_eq!(autoscale_scaler_decide(h, 1.0, std::ptr::null(), &mut d), AUTOSCALE_ERR_ARG);
            assert_eq!(autoscale_scaler_decide(h, 1.0, &s, &mut d), AUTOSCALE_OK);
            assert_eq!((d.desired, d.action, d.reason, d.signal), (4, 1, 1, 0));
            autoscale_scaler_free(h);
            autoscale_scaler_free(std::ptr::null_mut());
            let mut mac = [0u8; 32];
            assert_eq!(autoscale_hmac_sha256(b"Jefe".as_ptr(), 4, std::ptr::null(), 1, mac.as_mut_ptr()), AUTOSCALE_ERR_ARG);
            let msg = b"what do ya want for nothing?";
            assert_eq!(autoscale_hmac_sha256(b"Jefe".as_ptr(), 4, msg.as_ptr(), msg.len(), mac.as_mut_ptr()), AUTOSCALE_OK);
            assert_eq!(mac[..4], [0x5b, 0xdc, 0xc1, 0x46]);
        }
    }
}
