//! Helpers shared by the integration tests of the core.

use autoscale_core::engine::{PeerConf, UpstreamConf, UpstreamParams};

/// Upstream `name` with default tunables and one peer of weight 1 per port on 127.0.0.1.
pub fn conf(name: &str, ports: &[u16]) -> UpstreamConf {
    UpstreamConf {
        name: name.into(),
        params: UpstreamParams::default(),
        peers: ports
            .iter()
            .map(|&p| PeerConf {
                addr: format!("127.0.0.1:{p}").parse().unwrap(),
                weight: 1,
            })
            .collect(),
    }
}
