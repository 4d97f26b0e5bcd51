//! Peer selection: one small trait, one implementation per algorithm.
//!
//! Algorithms see the peers of one upstream through [`PeerView`], so they run the same over shared memory in nginx and
//! over plain vectors in tests. Every algorithm honours the same contract:
//! - it returns a peer that is eligible and not yet tried by this request whenever one exists;
//! - failing that, an eligible peer already tried (a retry with nothing else left);
//! - `None` only when no peer is eligible at all.

use crate::rng::Rng;

/// What an algorithm may know about the peers of an upstream. Indices are `0..len()`.
pub trait PeerView {
    /// Number of peers.
    fn len(&self) -> u32;
    /// Whether the peer may receive traffic at all (active; later: not ejected, not draining).
    fn eligible(&self, i: u32) -> bool;
    /// Whether this request already tried the peer.
    fn tried(&self, i: u32) -> bool;
    /// Load cost, already divided by the static weight; lower is better.
    fn cost(&self, i: u32) -> f64;
    /// Slow-start factor in `(0, 1]`: 1 once the peer has ramped in (and for a peer that must be probed).
    fn ramp(&self, i: u32) -> f64;
    /// Effective weight (static weight × slow-start factor), > 0.
    fn weight(&self, i: u32) -> f64;
    /// An upper bound of [`PeerView::weight`] over all peers.
    fn max_weight(&self) -> f64;
    /// Static integer weight, for round robin.
    fn static_weight(&self, i: u32) -> u32;
}

/// A peer-selection algorithm.
pub trait Selector {
    /// Chooses a peer index. `ticket` is a number drawn from a counter shared by all workers (used by round robin).
    fn select<V: PeerView, R: Rng>(&self, view: &V, rng: &mut R, ticket: u64) -> Option<u32>;
}

#[inline]
fn fresh<V: PeerView>(v: &V, i: u32, other: Option<u32>) -> bool {
    Some(i) != other && v.eligible(i) && !v.tried(i)
}

/// First index from `start` (wrapping) satisfying `ok`.
#[inline]
fn scan<F: Fn(u32) -> bool>(n: u32, start: u32, ok: F) -> Option<u32> {
    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
}

/// A uniformly drawn fresh peer other than `other`: a few random draws, then a scan from a random start.
#[inline(always)]
fn draw<V: PeerView, R: Rng>(v: &V, rng: &mut R, other: Option<u32>) -> Option<u32> {
    let n = v.len();
    for _ in 0..4 {
        let i = rng.below(n);
        if fresh(v, i, other) {
            return Some(i);
        }
    }
    let start = rng.below(n);
    scan(n, start, |i| fresh(v, i, other))
}

/// Any eligible peer, tried or not (the retry-with-nothing-else-left case), cheapest first.
fn fallback<V: PeerView>(v: &V) -> Option<u32> {
    (0..v.len())
        .filter(|&i| v.eligible(i))
        .min_by(|&a, &b| v.cost(a).total_cmp(&v.cost(b)))
}

/// Power of two choices over the load cost (Mitzenmacher 2001; as in Finagle, tower, Linkerd): draw two distinct
/// fresh peers uniformly and keep the cheaper. Avoids the herding of "always the minimum" when many workers read the
/// same numbers.
///
/// Slow start enters as a probability, not as a cost: the cheaper peer is taken with probability
/// `ramp(winner) / max(ramp(a), ramp(b))`, else the other one. A peer at 10 % of its ramp so gets about 10 % of the
/// share it would otherwise win, at any load. (Dividing its cost by 0.1 instead starves it while the load is light:
/// it would win only against a peer with 10 requests in flight.) Two peers at the same point of their ramp compare
/// by cost alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct P2c;

impl Selector for P2c {
    fn select<V: PeerView, R: Rng>(&self, v: &V, rng: &mut R, _ticket: u64) -> Option<u32> {
        if v.len() == 0 {
            return None;
        }
        let Some(a) = draw(v, rng, None) else {
            return fallback(v);
        };
        let Some(b) = draw(v, rng, Some(a)) else {
            return Some(a);
        };
        // Ties go to the first draw, which is uniform, so equal peers share equally.
        let (win, other) = if v.cost(b) < v.cost(a) { (b, a) } else { (a, b) };
        let rw = v.ramp(win);
        if rw < 1.0 {
            let ro = v.ramp(other);
            if rw < ro && rng.next_f64() * ro >= rw {
                return Some(other);
            }
        }
        Some(win)
    }
}

/// Weighted round robin over the static weights, on a counter shared by all workers (exact shares across workers;
/// not "smooth": a peer of weight w receives w consecutive tickets).
#[derive(Debug, Default, Clone, Copy)]
pub struct RoundRobin;

impl Selector for RoundRobin {
    fn select<V: PeerView, R: Rng>(&self, v: &V, _rng: &mut R, ticket: u64) -> Option<u32> {
        let n = v.len();
        if n == 0 {
            return None;
        }
        // The ticket indexes the weights of the peers that can take this attempt, so an ineligible peer's share is
        // spread over the others by weight rather than handed to its neighbour.
        let pick = |ok: &dyn Fn(u32) -> bool| -> Option<u32> {
            let total: u64 = (0..n).filter(|&i| ok(i)).map(|i| v.static_weight(i).max(1) as u64).sum();
            if total == 0 {
                return None;
            }
            let mut pos = ticket % total;
            (0..n).filter(|&i| ok(i)).find(|&i| {
                let w = v.static_weight(i).max(1) as u64;
                if pos < w {
                    true
                } else {
                    pos -= w;
                    false
                }
            })
        };
        pick(&|i| fresh(v, i, None)).or_else(|| pick(&|i| v.eligible(i)))
    }
}

/// Weighted random choice by rejection sampling against the largest weight: O(1) expected when weights are similar.
#[derive(Debug, Default, Clone, Copy)]
pub struct WeightedRandom;

impl Selector for WeightedRandom {
    fn select<V: PeerView, R: Rng>(&self, v: &V, rng: &mut R, _ticket: u64) -> Option<u32> {
        let n = v.len();
        if n == 0 {
            return None;
        }
        let max = v.max_weight().max(f64::MIN_POSITIVE);
        for _ in 0..16 {
            let i = rng.below(n);
            if fresh(v, i, None) && rng.next_f64() * max < v.weight(i) {
                return Some(i);
            }
        }
        // Rejection failed (effective weights far below the bound, e.g. all peers in slow start, or most tried):
        // an exact weighted choice by one scan.
        let total: f64 = (0..n)
            .filter(|&i| fresh(v, i, None))
            .map(|i| v.weight(i))
            .sum();
        if total <= 0.0 {
            return fallback(v);
        }
        let mut x = rng.next_f64() * total;
        let mut last = None;
        for i in (0..n).filter(|&i| fresh(v, i, None)) {
            x -= v.weight(i);
            last = Some(i);
            if x < 0.0 {
                break;
            }
        }
        last
    }
}

/// The algorithms a user can name, dispatched statically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Algorithm {
    /// [`P2c`] over peak-EWMA cost (the default).
    PeakEwma = 0,
    /// [`RoundRobin`].
    RoundRobin = 1,
    /// [`WeightedRandom`].
    Random = 2,
}

impl Algorithm {
    /// From the number stored in shared memory; unknown numbers fall back to the default.
    pub fn from_u32(v: u32) -> Algorithm {
        match v {
            1 => Algorithm::RoundRobin,
            2 => Algorithm::Random,
            _ => Algorithm::PeakEwma,
        }
    }

    /// Runs the algorithm.
    #[inline]
    pub fn select<V: PeerView, R: Rng>(self, v: &V, rng: &mut R, ticket: u64) -> Option<u32> {
        match self {
            Algorithm::PeakEwma => P2c.select(v, rng, ticket),
            Algorithm::RoundRobin => RoundRobin.select(v, rng, ticket),
            Algorithm::Random => WeightedRandom.select(v, rng, ticket),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::XorShift64;

    #[derive(Default, Clone)]
    pub struct VecView {
        pub cost: Vec<f64>,
        pub weight: Vec<u32>,
        pub eligible: Vec<bool>,
        pub tried: Vec<bool>,
        pub ramp: Vec<f64>,
    }

    impl VecView {
        pub fn equal(n: usize) -> Self {
            VecView {
                cost: vec![1.0; n],
                weight: vec![1; n],
                eligible: vec![true; n],
                tried: vec![false; n],
                ramp: vec![1.0; n],
            }
        }
    }

    impl PeerView for VecView {
        fn len(&self) -> u32 {
            self.cost.len() as u32
        }
        fn eligible(&self, i: u32) -> bool {
            self.eligible[i as usize]
        }
        fn tried(&self, i: u32) -> bool {
            self.tried[i as usize]
        }
        fn cost(&self, i: u32) -> f64 {
            self.cost[i as usize] / self.weight[i as usize] as f64
        }
        fn ramp(&self, i: u32) -> f64 {
            self.ramp[i as usize]
        }
        fn weight(&self, i: u32) -> f64 {
            self.weight[i as usize] as f64 * self.ramp[i as usize]
        }
        fn max_weight(&self) -> f64 {
            *self.weight.iter().max().unwrap_or(&1) as f64
        }
        fn static_weight(&self, i: u32) -> u32 {
            self.weight[i as usize]
        }
    }

    const ALL: [Algorithm; 3] = [
        Algorithm::PeakEwma,
        Algorithm::RoundRobin,
        Algorithm::Random,
    ];

    fn shares(alg: Algorithm, v: &VecView, n: u64) -> Vec<f64> {
        let mut rng = XorShift64::new(99);
        let mut hits = vec![0u64; v.cost.len()];
        for t in 0..n {
            hits[alg.select(v, &mut rng, t).unwrap() as usize] += 1;
        }
        hits.iter().map(|&h| h as f64 / n as f64).collect()
    }

    #[test]
    fn p2c_avoids_the_expensive_peer() {
        let mut v = VecView::equal(3);
        v.cost[2] = 20.0;
        let s = shares(Algorithm::PeakEwma, &v, 30_000);
        assert_eq!(s[2], 0.0, "{s:?}");
        assert!(
            (s[0] - 0.5).abs() < 0.02 && (s[1] - 0.5).abs() < 0.02,
            "{s:?}"
        );
    }

    #[test]
    fn p2c_ramps_a_new_peer_in_by_share_at_any_load() {
        // Two equal peers, the second at 10 % of its ramp: it gets about a tenth of its half, whether or not the
        // first has requests in flight (cost 1 = idle, 4 = three in flight), and nothing is taken from an idle
        // peer's ramp when both ramp alike.
        for old_cost in [1.0, 4.0] {
            let mut v = VecView::equal(2);
            v.cost[0] = old_cost;
            v.ramp[1] = 0.1;
            let s = shares(Algorithm::PeakEwma, &v, 40_000);
            let natural = if old_cost > 1.0 { 1.0 } else { 0.5 };
            assert!((s[1] - 0.1 * natural).abs() < 0.01, "{old_cost}: {s:?}");
        }
        let mut v = VecView::equal(3);
        v.ramp = vec![0.1; 3];
        v.cost[2] = 20.0;
        let s = shares(Algorithm::PeakEwma, &v, 30_000);
        assert_eq!(s[2], 0.0, "equal ramps compare by cost alone: {s:?}");
        // Halfway through the ramp: half the share.
        let mut v = VecView::equal(2);
        v.ramp[1] = 0.5;
        let s = shares(Algorithm::PeakEwma, &v, 40_000);
        assert!((s[1] - 0.25).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn weighted_random_keeps_proportions_when_every_weight_is_far_below_the_bound() {
        // Effective weights of 0.1 and 0.3 (slow start) against a bound of 3: rejection mostly fails.
        struct Scaled(VecView);
        impl PeerView for Scaled {
            fn len(&self) -> u32 {
                self.0.len()
            }
            fn eligible(&self, i: u32) -> bool {
                self.0.eligible(i)
            }
            fn tried(&self, i: u32) -> bool {
                self.0.tried(i)
            }
            fn cost(&self, i: u32) -> f64 {
                self.0.cost(i)
            }
            fn ramp(&self, _: u32) -> f64 {
                0.1
            }
            fn weight(&self, i: u32) -> f64 {
                self.0.weight(i) * 0.1
            }
            fn max_weight(&self) -> f64 {
                self.0.max_weight()
            }
            fn static_weight(&self, i: u32) -> u32 {
                self.0.static_weight(i)
            }
        }
        let mut v = VecView::equal(2);
        v.weight = vec![1, 3];
        let v = Scaled(v);
        let mut rng = XorShift64::new(3);
        let hits = (0..40_000)
            .filter(|&t| WeightedRandom.select(&v, &mut rng, t).unwrap() == 1)
            .count();
        let share = hits as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.015, "{share}");
    }

    #[test]
    fn round_robin_spreads_an_ineligible_peers_share_by_weight() {
        let mut v = VecView::equal(3);
        v.weight = vec![1, 1, 2];
        v.eligible[0] = false;
        let s = shares(Algorithm::RoundRobin, &v, 30_000);
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 1.0 / 3.0).abs() < 0.001 && (s[2] - 2.0 / 3.0).abs() < 0.001, "{s:?}");
    }

    #[test]
    fn weights_give_proportional_shares() {
        let mut v = VecView::equal(3);
        v.weight = vec![1, 1, 2];
        for alg in [Algorithm::RoundRobin, Algorithm::Random] {
            let s = shares(alg, &v, 40_000);
            assert!(
                (s[2] - 0.5).abs() < 0.02 && (s[0] - 0.25).abs() < 0.02,
                "{alg:?} {s:?}"
            );
        }
    }

    /// Property over random peer sets: never an ineligible peer; never a tried peer while a fresh one exists;
    /// `None` only when nothing is eligible.
    #[test]
    fn contract_holds_for_random_views() {
        let mut rng = XorShift64::new(5);
        for case in 0..3000 {
            let n = 1 + rng.below(12) as usize;
            let mut v = VecView::equal(n);
            for i in 0..n {
                v.cost[i] = rng.next_f64() * 100.0;
                v.weight[i] = 1 + rng.below(5);
                v.eligible[i] = rng.below(4) != 0;
                v.tried[i] = rng.below(3) == 0;
            }
            let any_fresh = (0..n).any(|i| v.eligible[i] && !v.tried[i]);
            let any_eligible = v.eligible.iter().any(|&e| e);
            for alg in ALL {
                let got = alg.select(&v, &mut rng, case as u64);
                match got {
                    None => assert!(
                        !any_eligible,
                        "{alg:?} case {case}: gave up with eligible peers"
                    ),
                    Some(i) => {
                        let i = i as usize;
                        assert!(v.eligible[i], "{alg:?} case {case}: ineligible peer {i}");
                        assert!(
                            !any_fresh || !v.tried[i],
                            "{alg:?} case {case}: re-picked tried peer {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn empty_view_selects_nothing() {
        let v = VecView::equal(0);
        let mut rng = XorShift64::new(1);
        for alg in ALL {
            assert_eq!(alg.select(&v, &mut rng, 0), None);
        }
    }
}
