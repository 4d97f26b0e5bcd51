//! Pure algorithms of lua-resty-autoscale, free of nginx.
//!
//! - [`histogram`]: latency sketch with a bounded relative error (DDSketch mapping);
//! - [`window`]: one time slice of a rolling window, lock-free;
//! - [`ewma`]: peak-EWMA latency estimate (Finagle, tower);
//! - [`slowstart`]: Envoy's slow-start ramp;
//! - [`health`]: outlier detection, ejection lifecycle and panic mode (Envoy);
//! - [`select`]: peer selection (power of two choices, round robin, weighted random) behind one trait;
//! - [`layout`]: the shared-memory region (the only `unsafe` of this crate);
//! - [`engine`]: configuration, peer choice and accounting over a region;
//! - [`owner`]: owners (pid + start time) of the locks and markers in shared memory, for crash repair;
//! - [`reqtrack`]: per-worker tracking of requests between balancer and log phases;
//! - [`admission`]: adaptive concurrency limits, token-bucket rate limits and priority classes;
//! - [`addr`]: strict parsing of peer addresses;
//! - [`admin`]: run-time changes (peers, weights, tunables) through the same path as a reload;
//! - [`report`]: backend-reported load (ORCA, plain values, `Retry-After`, agent answers) and its cost;
//! - [`scaling`]: how many instances a service needs (HPA/Knative rules, Holt forecast);
//! - [`hmac`]: SHA-256 and HMAC-SHA256 for signed scaling webhooks.
#![deny(unsafe_code)]

pub mod addr;
pub mod admission;
pub mod admin;
pub mod engine;
pub mod events;
pub mod ewma;
pub mod health;
pub mod hmac;
pub mod histogram;
pub mod layout;
pub mod owner;
pub mod report;
mod outlier;
pub mod reqtrack;
pub mod rng;
pub mod scaling;
pub mod select;
pub mod slowstart;
pub mod window;

pub use engine::{
    ConfigError, PeerConf, PeerSnapshot, Pick, PickError, UpstreamConf, UpstreamParams,
};
pub use layout::{Params, Region};
pub use window::Outcome;
