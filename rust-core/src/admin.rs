//! Changes made at run time (the admin API): peers added, removed, re-weighted, drained; tunables changed. Each one
//! rebuilds the configuration in force from shared memory, changes it, and applies it with `configure`, so it gets
//! the same validation, the same all-or-nothing application and the same keeping of statistics as a reload, and
//! takes effect in every worker at once. Nothing here is persisted: a reload or restart applies nginx.conf again.

use crate::addr;
use crate::engine::{ConfigError, PeerConf, UpstreamConf, UpstreamParams};
use crate::events::kind;
use crate::health::Reason;
use crate::layout::{state, Region};
use crate::owner::{self, Processes};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::*;

/// Why a run-time change was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("unknown upstream")]
    UnknownUpstream,
    #[error("\"{0}\": {1}")]
    BadAddress(String, addr::AddrError),
    #[error("peer {0} is not in this upstream")]
    UnknownPeer(String),
    #[error("peer {0} is already in this upstream")]
    DuplicatePeer(String),
    #[error("weight must be between 1 and 10000 (got {0})")]
    BadWeight(u32),
    #[error("an upstream cannot lose its last peer")]
    LastPeer,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Region {
    /// The configuration in force, read back from shared memory.
    pub fn current_config(&self) -> Vec<UpstreamConf> {
        (0..self.params().max_upstreams)
            .filter(|&i| self.upstream(i).head.state.load(Acquire) == state::ACTIVE)
            .filter_map(|i| {
                let (params, _, _) = self.read_upstream(i)?;
                let peers = self
                    .upstream_slots(i)
                    .into_iter()
                    .filter_map(|s| {
                        let a = addr::parse(&self.peer_addr(s)).ok()?;
                        Some(PeerConf { addr: a, weight: self.peer_head(s).weight.load(Relaxed) })
                    })
                    .collect();
                Some(UpstreamConf { name: self.upstream_name(i), params, peers })
            })
            .collect()
    }

    fn change(
        &self,
        idx: u32,
        pid: u32,
        alive: &dyn Processes,
        now_us: u64,
        f: impl FnOnce(&mut UpstreamConf) -> Result<(), AdminError>,
    ) -> Result<(), AdminError> {
        if idx >= self.params().max_upstreams || self.upstream(idx).head.state.load(Acquire) != state::ACTIVE {
            return Err(AdminError::UnknownUpstream);
        }
        // The writer lock is held from reading the configuration in force to applying the changed one, so no other
        // change lands in between (and a dead writer's half-written upstream is repaired before it is read).
        let me = owner::word_of(alive, pid);
        self.lock_writer(me, alive, now_us)?;
        let result = (|| {
            let name = self.upstream_name(idx);
            let mut all = self.current_config();
            let u = all.iter_mut().find(|u| u.name == name).ok_or(AdminError::UnknownUpstream)?;
            f(u)?;
            self.configure(&all, pid, alive, now_us)?;
            Ok(())
        })();
        self.unlock_writer(me);
        result
    }

    /// Adds peer `text` with `weight` to upstream `idx` (it enters with slow start, seeded like any new peer).
    pub fn add_peer(&self, idx: u32, text: &str, weight: u32, pid: u32, alive: &dyn Processes, now_us: u64) -> Result<(), AdminError> {
        let a = addr::parse(text).map_err(|e| AdminError::BadAddress(text.into(), e))?;
        if weight == 0 || weight > 10_000 {
            return Err(AdminError::BadWeight(weight));
        }
        self.change(idx, pid, alive, now_us, |u| {
            if u.peers.iter().any(|p| p.addr == a) {
                return Err(AdminError::DuplicatePeer(a.to_string()));
            }
            u.peers.push(PeerConf { addr: a, weight });
            Ok(())
        })?;
        if let Some(slot) = self.find_peer(idx, text) {
            self.emit(now_us, kind::PEER_ADDED, Some(Reason::Operator), idx, slot, [weight as f64, 0.0, 0.0, 0.0]);
        }
        Ok(())
    }

    /// Removes peer `text` from upstream `idx`: it takes no new requests, its in-flight ones finish, its record keeps
    /// its statistics until reused.
    pub fn remove_peer(&self, idx: u32, text: &str, pid: u32, alive: &dyn Processes, now_us: u64) -> Result<(), AdminError> {
        let a = addr::parse(text).map_err(|e| AdminError::BadAddress(text.into(), e))?;
        let slot = self.find_peer(idx, text).ok_or_else(|| AdminError::UnknownPeer(a.to_string()))?;
        self.change(idx, pid, alive, now_us, |u| {
            if u.peers.len() == 1 {
                return Err(AdminError::LastPeer);
            }
            u.peers.retain(|p| p.addr != a);
            Ok(())
        })?;
        self.emit(now_us, kind::PEER_REMOVED, Some(Reason::Operator), idx, slot, [0.0; 4]);
        Ok(())
    }

    /// Sets the weight of peer `text` of upstream `idx`.
    pub fn set_weight(&self, idx: u32, text: &str, weight: u32, pid: u32, alive: &dyn Processes, now_us: u64) -> Result<(), AdminError> {
        let a = addr::parse(text).map_err(|e| AdminError::BadAddress(text.into(), e))?;
        if weight == 0 || weight > 10_000 {
            return Err(AdminError::BadWeight(weight));
        }
        let slot = self.find_peer(idx, text).ok_or_else(|| AdminError::UnknownPeer(a.to_string()))?;
        let old = self.peer_head(slot).weight.load(Relaxed);
        self.change(idx, pid, alive, now_us, |u| {
            for p in u.peers.iter_mut().filter(|p| p.addr == a) {
                p.weight = weight;
            }
            Ok(())
        })?;
        self.emit(now_us, kind::WEIGHT, Some(Reason::Operator), idx, slot, [old as f64, weight as f64, 0.0, 0.0]);
        Ok(())
    }

    /// Applies one change set to upstream `idx` in ONE `configure` (one discovery round): each entry adds its peer,
    /// or sets the weight of a peer already there, or, with weight 0, removes it. Peers that stay keep their records
    /// and statistics. All or nothing: an entry naming a peer twice, a bad weight, removing an unknown peer or the
    /// last one refuses the whole set. Returns (added, removed, re-weighted).
    pub fn change_peers(
        &self,
        idx: u32,
        changes: &[PeerConf],
        pid: u32,
        alive: &dyn Processes,
        now_us: u64,
    ) -> Result<(usize, usize, usize), AdminError> {
        if changes.is_empty() && idx < self.params().max_upstreams {
            return Ok((0, 0, 0)); // nothing to reconfigure
        }
        let before = self.slots_by_addr(idx);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut reweighted = Vec::new();
        self.change(idx, pid, alive, now_us, |u| {
            let mut at: HashMap<SocketAddr, usize> = u.peers.iter().enumerate().map(|(i, p)| (p.addr, i)).collect();
            let mut seen = HashSet::with_capacity(changes.len());
            let mut gone = HashSet::new();
            for c in changes {
                if !seen.insert(c.addr) {
                    return Err(AdminError::DuplicatePeer(c.addr.to_string()));
                }
                if c.weight > 10_000 {
                    return Err(AdminError::BadWeight(c.weight));
                }
                match (at.get(&c.addr).copied(), c.weight) {
                    (None, 0) => return Err(AdminError::UnknownPeer(c.addr.to_string())),
                    (Some(_), 0) => {
                        gone.insert(c.addr);
                        removed.push(c.addr);
                    }
                    (Some(i), w) => {
                        let old = u.peers[i].weight;
                        if old != w {
                            u.peers[i].weight = w;
                            reweighted.push((c.addr, old, w));
                        }
                    }
                    (None, w) => {
                        at.insert(c.addr, u.peers.len());
                        u.peers.push(PeerConf { addr: c.addr, weight: w });
                        added.push((c.addr, w));
                    }
                }
            }
            u.peers.retain(|p| !gone.contains(&p.addr));
            if u.peers.is_empty() {
                return Err(AdminError::LastPeer);
            }
            Ok(())
        })?;
        let after = self.slots_by_addr(idx);
        let slot = |m: &HashMap<String, u32>, a: &SocketAddr| m.get(&addr::canonical(a).0).copied();
        for (a, w) in &added {
            if let Some(s) = slot(&after, a) {
                self.emit(now_us, kind::PEER_ADDED, Some(Reason::Operator), idx, s, [*w as f64, 0.0, 0.0, 0.0]);
            }
        }
        for a in &removed {
            if let Some(s) = slot(&before, a) {
                self.emit(now_us, kind::PEER_REMOVED, Some(Reason::Operator), idx, s, [0.0; 4]);
            }
        }
        for (a, old, w) in &reweighted {
            if let Some(s) = slot(&after, a) {
                self.emit(now_us, kind::WEIGHT, Some(Reason::Operator), idx, s, [*old as f64, *w as f64, 0.0, 0.0]);
            }
        }
        Ok((added.len(), removed.len(), reweighted.len()))
    }

    /// The active peer records of upstream `idx` by canonical address.
    fn slots_by_addr(&self, idx: u32) -> HashMap<String, u32> {
        self.upstream_slots(idx).into_iter().map(|s| (self.peer_addr(s), s)).collect()
    }

    /// Replaces the tunables of upstream `idx` (its peers stay as they are).
    pub fn tune(&self, idx: u32, params: UpstreamParams, pid: u32, alive: &dyn Processes, now_us: u64) -> Result<(), AdminError> {
        self.change(idx, pid, alive, now_us, |u| {
            u.params = params;
            Ok(())
        })?;
        self.emit(now_us, kind::TUNED, Some(Reason::Operator), idx, crate::events::NO_PEER, [0.0; 4]);
        Ok(())
    }

    /// The active peer record of upstream `idx` whose address is `text` (any spelling of the same address).
    pub fn find_peer(&self, idx: u32, text: &str) -> Option<u32> {
        let a = addr::parse(text).ok()?;
        let (canonical, _) = addr::canonical(&a);
        self.upstream_slots(idx).into_iter().find(|&s| self.peer_addr(s) == canonical)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::{PeerConf, UpstreamConf, UpstreamParams};
    use crate::layout::{Params, Region};
    use crate::window::Outcome;

    fn yes(_: u32) -> bool {
        true
    }

    #[test]
    fn run_time_changes_keep_statistics_and_refuse_bad_input_without_changing_anything() {
        let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 4, max_workers: 2, ..Params::default() }, 0).unwrap();
        let conf = UpstreamConf {
            name: "api".into(),
            params: UpstreamParams::default(),
            peers: vec![PeerConf { addr: "127.0.0.1:1".parse().unwrap(), weight: 1 }],
        };
        let up = r.configure(&[conf], 1, &yes, 0).unwrap()[0];
        let s1 = r.find_peer(up, "127.0.0.1:1").unwrap();
        r.record(s1, r.snapshot(s1, 0).unwrap().gen, Outcome::Success, 100, 1, &mut crate::rng::XorShift64::new(1));
        r.add_peer(up, "127.0.0.1:2", 3, 1, &yes, 10).unwrap();
        r.set_weight(up, "127.0.0.1:1", 5, 1, &yes, 11).unwrap();
        let epoch = r.header().config_epoch.load(std::sync::atomic::Ordering::Relaxed);
        assert!(r.add_peer(up, "127.0.0.1:2", 1, 1, &yes, 12).is_err(), "duplicate");
        assert!(r.add_peer(up, "localhost:2", 1, 1, &yes, 12).is_err(), "not an IP");
        assert!(r.set_weight(up, "127.0.0.1:9", 1, 1, &yes, 12).is_err(), "unknown peer");
        assert!(r.set_weight(up, "127.0.0.1:1", 0, 1, &yes, 12).is_err(), "bad weight");
        assert!(r.add_peer(up, "127.0.0.1:3", 1, 1, &yes, 12).is_ok());
        assert!(r.add_peer(up, "127.0.0.1:4", 1, 1, &yes, 12).is_ok());
        assert!(r.add_peer(up, "127.0.0.1:5", 1, 1, &yes, 12).is_err(), "max_peers");
        assert_eq!(r.header().config_epoch.load(std::sync::atomic::Ordering::Relaxed), epoch + 2);
        r.remove_peer(up, "127.0.0.1:4", 1, &yes, 13).unwrap();
        assert_eq!(r.snapshot(s1, 14).unwrap().totals[0], 1, "statistics kept");
        assert_eq!(r.snapshot(s1, 14).unwrap().weight, 5);
        assert_eq!(r.upstream_slots(up).len(), 3);
        let cfg = r.current_config();
        assert_eq!(cfg[0].peers.iter().map(|p| p.weight).collect::<Vec<_>>(), vec![5, 3, 1]);
        assert!(r.remove_peer(up, "127.0.0.1:9", 1, &yes, 15).is_err());
    }

    #[test]
    fn a_change_set_keeps_the_statistics_of_staying_peers_removes_and_reweights_in_one_configure() {
        let r = Region::new_heap(Params { max_upstreams: 2, max_peers: 8, max_workers: 2, ..Params::default() }, 0).unwrap();
        let peer = |p: u16, weight| PeerConf { addr: format!("127.0.0.1:{p}").parse().unwrap(), weight };
        let conf = UpstreamConf { name: "api".into(), params: UpstreamParams::default(), peers: (1..=4).map(|p| peer(p, 1)).collect() };
        let up = r.configure(&[conf], 1, &yes, 0).unwrap()[0];
        let slot = |p: u16| r.find_peer(up, &format!("127.0.0.1:{p}"));
        let (s1, s2) = (slot(1).unwrap(), slot(2).unwrap());
        for s in [s1, s2] {
            r.record(s, r.snapshot(s, 0).unwrap().gen, Outcome::Success, 100, 1, &mut crate::rng::XorShift64::new(1));
        }
        let epoch = r.header().config_epoch.load(std::sync::atomic::Ordering::Relaxed);
        // 5 and 6 come, 3 and 4 go, 2 is re-weighted, 1 is named with its weight unchanged.
        let set = [peer(5, 2), peer(3, 0), peer(6, 1), peer(2, 9), peer(4, 0), peer(1, 1)];
        assert_eq!(r.change_peers(up, &set, 1, &yes, 10), Ok((2, 2, 1)));
        assert_eq!(r.header().config_epoch.load(std::sync::atomic::Ordering::Relaxed), epoch + 1, "one configure");
        assert_eq!((slot(1), slot(2)), (Some(s1), Some(s2)), "staying peers keep their records");
        assert_eq!(r.snapshot(s1, 11).unwrap().totals[0], 1, "statistics kept");
        assert_eq!(r.snapshot(s2, 11).unwrap().totals[0], 1, "statistics kept");
        assert_eq!(r.snapshot(s2, 11).unwrap().weight, 9);
        assert_eq!((slot(3), slot(4)), (None, None), "removed");
        assert_eq!(r.snapshot(slot(5).unwrap(), 11).unwrap().weight, 2);
        assert_eq!(r.snapshot(slot(6).unwrap(), 11).unwrap().totals[0], 0, "new peers start fresh");
        assert_eq!(r.upstream_slots(up).len(), 4);
        // All or nothing: one bad entry refuses the set.
        for bad in [vec![peer(7, 1), peer(9, 0)], vec![peer(7, 1), peer(7, 2)], vec![peer(7, 10_001)],
                    vec![peer(1, 0), peer(2, 0), peer(5, 0), peer(6, 0)]] {
            assert!(r.change_peers(up, &bad, 1, &yes, 12).is_err(), "{bad:?}");
        }
        assert_eq!(r.header().config_epoch.load(std::sync::atomic::Ordering::Relaxed), epoch + 1, "nothing changed");
        assert_eq!(slot(7), None);
    }
}
