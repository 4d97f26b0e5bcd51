//! What service discovery needs from the library beyond `autoscale.control`: an upstream's index by name, so that a
//! reload (`init_by_lua*` runs again in the master) can carry the peers discovery found over into the new
//! configuration, with their statistics, instead of dropping them until the first refresh.

use crate::{
    admin_code, autoscale_peer_spec_t, guard, now_us, peer_confs, pid, write_err, OS, AUTOSCALE_ERR_ARG, AUTOSCALE_ERR_CONFIG,
    AUTOSCALE_ERR_NO_REGION, AUTOSCALE_ERR_UPSTREAM, REGION,
};
use std::ffi::{c_char, c_int};

/// The index (≥ 0) of upstream `name` in the configuration in force.
///
/// # Safety
/// `name` must point to `name_len` readable bytes (or be NULL with `name_len` 0).
///
/// # Errors
/// `AUTOSCALE_ERR_NO_REGION` before `autoscale_region_init`; `AUTOSCALE_ERR_ARG` for a NULL or non-UTF-8 name;
/// `AUTOSCALE_ERR_UPSTREAM` when no upstream has that name.
#[no_mangle]
pub unsafe extern "C" fn autoscale_upstream_find(name: *const u8, name_len: usize) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        if name.is_null() {
            return AUTOSCALE_ERR_ARG;
        }
        // SAFETY: the caller guarantees `name_len` readable bytes at `name`, which is not NULL.
        let bytes = std::slice::from_raw_parts(name, name_len);
        let Ok(text) = std::str::from_utf8(bytes) else { return AUTOSCALE_ERR_ARG };
        region
            .find_upstream(text)
            .and_then(|i| c_int::try_from(i).ok())
            .unwrap_or(AUTOSCALE_ERR_UPSTREAM)
    })
}

/// Applies one discovery round's change set to upstream `upstream` in one reconfiguration: each of the `n` entries
/// adds its peer, sets the weight of a peer already there, or with weight 0 removes it (staying peers keep their
/// statistics). Returns how many peers changed (≥ 0).
///
/// # Safety
/// `changes` must point to `n` valid peer specs (or be NULL with `n` 0); `err` to `err_len` writable bytes (or NULL).
///
/// # Errors
/// `AUTOSCALE_ERR_BUSY` when another process is changing the configuration (nothing changed: retry later);
/// `AUTOSCALE_ERR_CONFIG` with the reason in `err` (nothing changed); `AUTOSCALE_ERR_NO_REGION`.
#[no_mangle]
pub unsafe extern "C" fn autoscale_admin_peers_change(
    upstream: u32,
    changes: *const autoscale_peer_spec_t,
    n: usize,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    guard(|| {
        let Some(region) = REGION.get() else { return AUTOSCALE_ERR_NO_REGION };
        let set = match peer_confs("upstream", changes, n) {
            Ok(s) => s,
            Err(msg) => {
                write_err(err, err_len, &msg);
                return AUTOSCALE_ERR_CONFIG;
            }
        };
        match region.change_peers(upstream, &set, pid(), &OS, now_us()) {
            Ok((a, r, w)) => c_int::try_from(a + r + w).unwrap_or(c_int::MAX),
            Err(e) => {
                write_err(err, err_len, &e.to_string());
                admin_code(&e)
            }
        }
    })
}
