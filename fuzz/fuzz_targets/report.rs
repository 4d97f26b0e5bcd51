//! Target of the load-report parsers (`autoscale_core::report`). Corpus in fuzz/corpus/report/ (grown from `TEXT
//! cpu_utilization=0.3, ...`, `JSON {"cpu_utilization":0.3,"named_metrics":{"queue":4}}`, `73%`, `120`,
//! `drain 50%`; the first input byte is the length of the metric name or path that the rest is read with).
//!
//! Any bytes as an ORCA `endpoint-load-metrics` header (TEXT and JSON), a plain load value, `Retry-After`, an agent
//! answer, a polled JSON or Prometheus body: no panic; every value parsed is finite, >= 0 and <= MAX_VALUE; an
//! agent's weight percentage is at most 1000; the utilization of any parsed report is finite.
#![no_main]
use autoscale_core::report::{self, MAX_VALUE};
use libfuzzer_sys::fuzz_target;

fn ok(v: f64, what: &str, data: &[u8]) {
    assert!(v.is_finite() && (0.0..=MAX_VALUE).contains(&v), "{what} of {data:?}: {v}");
}

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into a name (of a named metric, a JSON path, a Prometheus metric) and the rest.
    let (name, input) = match data.split_first() {
        Some((&n, rest)) if (n as usize) <= rest.len() => rest.split_at(n as usize),
        _ => (&b""[..], data),
    };
    if let Ok(r) = report::parse_orca(input, name) {
        for v in [r.cpu_utilization, r.application_utilization, r.mem_utilization, r.rps_fractional, r.eps] {
            ok(v, "orca field", data);
        }
        if let Some(v) = r.named {
            ok(v, "named metric", data);
        }
        ok(r.utilization(1.0), "utilization", data);
    }
    if let Ok(v) = report::parse_value(input) {
        ok(v, "value", data);
    }
    if let Ok(v) = report::parse_json_field(input, name) {
        ok(v, "json field", data);
    }
    if let Ok(v) = report::parse_prometheus(input, name) {
        ok(v, "prometheus", data);
    }
    let _ = report::parse_retry_after(input);
    if let Ok(a) = report::parse_agent(input) {
        assert!(a.weight_percent.is_none_or(|w| w <= 1000), "agent weight of {data:?}: {a:?}");
    }
});
