//! Shared by the C ABI tests.

use resty_autoscale::autoscale_outlier_spec_t;

/// Envoy's defaults, as the Lua configuration fills them in.
pub fn outlier_defaults() -> autoscale_outlier_spec_t {
    autoscale_outlier_spec_t {
        consecutive_5xx: 5,
        consecutive_gateway: 5,
        consecutive_timeout: 3,
        base_ejection_ms: 30_000,
        max_ejection_ms: 300_000,
        ejection_jitter_ms: 0,
        max_ejection_percent: 10,
        interval_ms: 10_000,
        success_rate_min_hosts: 5,
        success_rate_volume: 100,
        failure_percentage: 0,
        failure_percentage_min_hosts: 5,
        failure_percentage_volume: 50,
        half_open_probes: 1,
        half_open_successes: 2,
        panic_threshold: 50,
        success_rate_stdev: 1.9,
    }
}
