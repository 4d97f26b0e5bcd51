#!/usr/bin/env bash
# Builds the fuzz targets as libFuzzer-linked binaries with the stable toolchain (see docs/fuzzing.md):
# the `libfuzzer-sys` crate compiles libFuzzer itself (needs a C++ compiler), rustc adds the SanitizerCoverage
# instrumentation libFuzzer steers by. FUZZ_SANITIZER=address (default) or none.
set -euo pipefail
cd "$(dirname "$0")"
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers"
case "${FUZZ_SANITIZER:-address}" in
address) flags+=" -Zsanitizer=address"; export RUSTC_BOOTSTRAP=1 ;;
none) ;;
*) echo "FUZZ_SANITIZER: address or none" >&2; exit 2 ;;
esac
# One target directory per sanitizer, so that switching does not rebuild everything: the binaries are in
# fuzz/target/<sanitizer>/x86_64-unknown-linux-gnu/release/.
RUSTFLAGS="$flags" exec cargo build --release --target x86_64-unknown-linux-gnu --target-dir "${FUZZ_TARGET_DIR:-target/${FUZZ_SANITIZER:-address}}" \
    --bins "$@"
