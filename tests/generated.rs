//! The committed C header and Lua cdef must be exactly what build.rs generates from src/lib.rs.

fn check(generated: &str, committed_path: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(committed_path);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{committed_path} is out of date with src/lib.rs: run `make cdef` and commit the result"
    );
}

#[test]
fn c_header_is_current() {
    check(
        include_str!(concat!(env!("OUT_DIR"), "/resty_autoscale.h")),
        "include/resty_autoscale.h",
    );
}

#[test]
fn lua_cdef_is_current() {
    check(
        include_str!(concat!(env!("OUT_DIR"), "/cdef.lua")),
        "lua/resty/autoscale/cdef.lua",
    );
}
