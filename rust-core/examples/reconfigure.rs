//! Cost of a run-time change of the peer set: `add_peer` and a 100-peer discovery change (40 added, 40 removed,
//! 20 re-weighted) on one upstream of 100, 1,000 and 10,000 peers, over a private region sized for it.
//!
//! Usage: `cargo run --release -p autoscale-core --example reconfigure [SIZE ...]` (run by `make bench-reconfigure`).
//! Prints, per size, milliseconds per `add_peer`, for the change applied one call per peer and as one change set
//! (`change_peers`, what discovery does), and the change set's cost per changed peer.

use autoscale_core::engine::{PeerConf, UpstreamConf, UpstreamParams};
use autoscale_core::{Params, Region};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

const ADDS: u32 = 40;
const REMOVES: u32 = 40;
const REWEIGHTS: u32 = 20;

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 8080))
}

fn yes(_: u32) -> bool {
    true
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn region(n: u32) -> (Region, u32) {
    let r = Region::new_heap(
        Params { max_upstreams: 4, max_peers: n + ADDS + 64, max_workers: 4, ..Params::default() },
        0,
    )
    .expect("region");
    let conf = UpstreamConf {
        name: "bench".into(),
        params: UpstreamParams::default(),
        peers: (0..n).map(|i| PeerConf { addr: addr(i), weight: 1 }).collect(),
    };
    let idx = r.configure(&[conf], 1, &yes, 0).expect("configure")[0];
    (r, idx)
}

fn main() {
    let sizes: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![100, 1_000, 10_000] } else { sizes };
    println!(
        "{:>7} {:>12} {:>24} {:>24} {:>16}",
        "peers", "add_peer ms", "100 changes, 1 call each", "100 changes, 1 set ms", "ms/changed peer"
    );
    for n in sizes {
        let (r, up) = region(n);
        let reps = 5;
        let t = Instant::now();
        for k in 0..reps {
            r.add_peer(up, &addr(n + k).to_string(), 1, 1, &yes, 1).expect("add_peer");
        }
        let add = ms(t) / reps as f64;
        for k in 0..reps {
            r.remove_peer(up, &addr(n + k).to_string(), 1, &yes, 2).expect("remove_peer");
        }

        let changed = (ADDS + REMOVES + REWEIGHTS) as f64;
        let t = Instant::now();
        one_call_each(&r, up, n);
        let each = ms(t);

        let (r, up) = region(n);
        let t = Instant::now();
        r.change_peers(up, &change_set(n), 1, &yes, 3).expect("change_peers");
        let set = ms(t);
        println!("{n:>7} {add:>12.3} {each:>24.3} {set:>24.3} {:>16.4}", set / changed);
    }
}

/// The change as discovery used to apply it: one call per peer.
fn one_call_each(r: &Region, up: u32, n: u32) {
    for k in 0..ADDS {
        r.add_peer(up, &addr(n + 100 + k).to_string(), 2, 1, &yes, 3).expect("add");
    }
    for k in 0..REMOVES {
        r.remove_peer(up, &addr(k).to_string(), 1, &yes, 3).expect("remove");
    }
    for k in 0..REWEIGHTS {
        r.set_weight(up, &addr(REMOVES + k).to_string(), 7, 1, &yes, 3).expect("weight");
    }
}

/// The same change as one change set: weight 0 removes.
fn change_set(n: u32) -> Vec<PeerConf> {
    let adds = (0..ADDS).map(|k| PeerConf { addr: addr(n + 100 + k), weight: 2 });
    let removes = (0..REMOVES).map(|k| PeerConf { addr: addr(k), weight: 0 });
    let weights = (0..REWEIGHTS).map(|k| PeerConf { addr: addr(REMOVES + k), weight: 7 });
    adds.chain(removes).chain(weights).collect()
}
