//! What service discovery needs from the library beyond `autoscale.control`: an upstream's index by name, so that a
//! reload (`init_by_lua*` runs again in the master) can carry the peers discovery found over into the new
//! configuration, with their statistics, instead of dropping them until the first refresh.

use crate::{guard, AUTOSCALE_ERR_ARG, AUTOSCALE_ERR_NO_REGION, AUTOSCALE_ERR_UPSTREAM, REGION};
use std::ffi::c_int;

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
