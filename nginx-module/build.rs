//! Takes the library's ABI version from its source (`src/lib.rs` of the repository), so the module refuses a library
//! of another ABI without a copy of the constant that could drift.
use std::fs;

fn main() {
    let src = "../src/lib.rs";
    println!("cargo:rerun-if-changed={src}");
    let text = fs::read_to_string(src).expect("nginx-module/build.rs: cannot read ../src/lib.rs");
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const AUTOSCALE_ABI_VERSION: u32 = "))
        .and_then(|v| v.trim_end_matches(';').trim().parse::<u32>().ok())
        .expect("nginx-module/build.rs: no `pub const AUTOSCALE_ABI_VERSION: u32 = N;` in ../src/lib.rs");
    println!("cargo:rustc-env=AUTOSCALE_LIB_ABI_VERSION={version}");
}
