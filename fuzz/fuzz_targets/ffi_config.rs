//! The configuration, admin and tune inputs as they cross the FFI (what `autoscale.configure`, the admin API and
//! discovery hand to the library): upstream specs with arbitrary names, peer address bytes, weights, numbers
//! (NaN, infinities, out of range) and status lists; run-time peer changes with arbitrary address bytes; error
//! buffers of any size. Properties: no panic (libFuzzer aborts on one, even one the FFI guard would catch), the error
//! text always fits its buffer and ends in NUL, a refused input changes nothing (configuration epoch and peer lists),
//! and an accepted configuration reads back (`autoscale_upstream_config`) as values that `tune` accepts again and that
//! read back the same.
#![no_main]
use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use resty_autoscale::admin_ffi::{autoscale_upstream_config, autoscale_upstream_config_t};
use resty_autoscale::discovery_ffi::{autoscale_admin_peers_change, autoscale_upstream_find};
use resty_autoscale::*;
use std::ffi::c_char;
use std::sync::Once;

const MAX_UPSTREAMS: u32 = 4;
const MAX_PEERS: usize = 16;

fn region() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let p = autoscale_region_params_t { max_upstreams: MAX_UPSTREAMS, max_peers: MAX_PEERS as u32, max_workers: 2, window_buckets: 4, bucket_ms: 100, rate_slots: 64 };
        // SAFETY: a valid struct, no error buffer.
        assert_eq!(unsafe { autoscale_region_init(&p, std::ptr::null_mut(), 0) }, AUTOSCALE_OK);
    });
}

/// A number: mostly a valid or boundary value, sometimes any bit pattern.
fn num(u: &mut Unstructured, default: f64, lo: f64, hi: f64) -> Result<f64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 | 1 | 2 => default,
        3 => lo,
        4 => hi,
        5 => lo + (hi - lo) * (u.int_in_range(0..=1000u32)? as f64 / 1000.0),
        6 => [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, -1.0, 1e300, f64::MIN_POSITIVE][u.choose_index(7)?],
        _ => f64::from_bits(u.arbitrary()?),
    })
}

fn small(u: &mut Unstructured, typical: u32) -> Result<u32> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 | 1 => typical,
        2 => u.int_in_range(0..=1000)?,
        _ => u.arbitrary()?,
    })
}

fn addr_bytes(u: &mut Unstructured) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 | 1 => format!("127.0.0.{}:{}", u.int_in_range(1..=3u8)?, u.int_in_range(80..=83u16)?).into_bytes(),
        2 => format!("[::{}]:{}", u.int_in_range(1..=2u8)?, u.int_in_range(80..=81u16)?).into_bytes(),
        _ => u.arbitrary()?,
    })
}

/// What a spec points to, kept alive while the FFI reads it.
struct Owned {
    name: Vec<u8>,
    addrs: Vec<Vec<u8>>,
    peers: Vec<autoscale_peer_spec_t>,
    statuses: Vec<u16>,
    spec: autoscale_upstream_spec_t,
}

fn spec(u: &mut Unstructured) -> Result<Box<Owned>> {
    let name = match u.int_in_range(0..=4u8)? {
        0..=2 => vec![b'a' + u.int_in_range(0..=2u8)?],
        3 => vec![b'x'; u.int_in_range(0..=80usize)?],
        _ => u.arbitrary()?,
    };
    let n = u.int_in_range(0..=6usize)?;
    let mut addrs = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    for _ in 0..n {
        addrs.push(addr_bytes(u)?);
        weights.push(match u.int_in_range(0..=3u8)? { 0 | 1 => 1, 2 => u.int_in_range(0..=10_001)?, _ => u.arbitrary()? });
    }
    let statuses: Vec<u16> = if u.arbitrary()? { Vec::new() } else { (0..u.int_in_range(1..=4usize)?).map(|_| u.arbitrary()).collect::<Result<_>>()? };
    let outlier = autoscale_outlier_spec_t {
        consecutive_5xx: small(u, 5)?,
        consecutive_gateway: small(u, 0)?,
        consecutive_timeout: small(u, 0)?,
        base_ejection_ms: small(u, 30_000)?,
        max_ejection_ms: small(u, 300_000)?,
        ejection_jitter_ms: small(u, 0)?,
        max_ejection_percent: small(u, 10)?,
        interval_ms: small(u, 10_000)?,
        success_rate_min_hosts: small(u, 5)?,
        success_rate_volume: small(u, 100)?,
        failure_percentage: small(u, 0)?,
        failure_percentage_min_hosts: small(u, 5)?,
        failure_percentage_volume: small(u, 50)?,
        half_open_probes: small(u, 1)?,
        half_open_successes: small(u, 1)?,
        panic_threshold: small(u, 50)?,
        success_rate_stdev: num(u, 1.9, 0.0, 100.0)?,
    };
    let mut o = Box::new(Owned {
        name,
        addrs,
        peers: Vec::new(),
        statuses,
        spec: autoscale_upstream_spec_t {
            name: std::ptr::null(),
            name_len: 0,
            algorithm: small(u, 0)?,
            retries: small(u, 1)?,
            slow_start_ms: small(u, 0)?,
            decay_ms: small(u, 10_000)?,
            default_rtt_us: small(u, 1000)?,
            _pad: 0,
            slow_start_aggression: num(u, 1.0, 0.01, 100.0)?,
            slow_start_min_weight: num(u, 0.1, 0.0, 1.0)?,
            failure_penalty: num(u, 2.0, 1.0, 1000.0)?,
            slow_peer_factor: if u.arbitrary()? { 0.0 } else { num(u, 3.0, 1.1, 1000.0)? },
            slow_peer_penalty: num(u, 10.0, 1.0, 1.0e6)?,
            peers: std::ptr::null(),
            npeers: 0,
            outlier,
            failure_statuses: std::ptr::null(),
            nfailure_statuses: 0,
        },
    });
    o.link(&weights);
    Ok(o)
}

impl Owned {
    /// Points the spec at what it owns.
    fn link(&mut self, weights: &[u32]) {
        self.peers = self.addrs.iter().zip(weights).map(|(a, &weight)| autoscale_peer_spec_t { addr: a.as_ptr(), addr_len: a.len(), weight }).collect();
        self.spec.name = self.name.as_ptr();
        self.spec.name_len = self.name.len();
        self.spec.peers = self.peers.as_ptr();
        self.spec.npeers = self.peers.len();
        self.spec.failure_statuses = self.statuses.as_ptr();
        self.spec.nfailure_statuses = self.statuses.len();
    }
}

/// An error buffer of a chosen size, with a guard byte after it.
struct ErrBuf(Vec<u8>, usize);

impl ErrBuf {
    fn new(u: &mut Unstructured) -> Result<ErrBuf> {
        let len = [0usize, 1, 2, 7, 64, 512][u.choose_index(6)?];
        Ok(ErrBuf(vec![0xAA; len + 1], len))
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr() as *mut c_char
    }
    /// The text is NUL-terminated within the buffer and nothing past it was written.
    fn check(&self, rc: i32) {
        assert_eq!(self.0[self.1], 0xAA, "written past the error buffer");
        if rc < 0 && self.1 > 0 && self.0[0] != 0xAA {
            assert!(self.0[..self.1].contains(&0), "error text not NUL-terminated");
        }
    }
}

/// The configuration as the FFI shows it: epoch, and each upstream record's peer addresses.
fn state() -> (u64, Vec<Vec<String>>) {
    let mut info: autoscale_region_info_t = unsafe { std::mem::zeroed() };
    // SAFETY: a writable struct.
    assert_eq!(unsafe { autoscale_region_info(&mut info) }, AUTOSCALE_OK);
    let peers = (0..MAX_UPSTREAMS)
        .map(|up| {
            let mut slots = [0u32; MAX_PEERS];
            // SAFETY: MAX_PEERS writable u32.
            let n = unsafe { autoscale_upstream_peers(up, slots.as_mut_ptr(), MAX_PEERS) };
            assert!(n >= 0 && n as usize <= MAX_PEERS, "peers of {up}: {n}");
            let mut v: Vec<String> = slots[..n as usize]
                .iter()
                .map(|&s| {
                    let mut buf = [0u8; 64];
                    // SAFETY: 64 writable bytes.
                    let len = unsafe { autoscale_peer_addr(s, buf.as_mut_ptr(), buf.len()) };
                    assert!(len > 0);
                    String::from_utf8(buf[..len as usize].to_vec()).expect("canonical text")
                })
                .collect();
            v.sort();
            v
        })
        .collect();
    (info.config_epoch, peers)
}

/// The tunables in force of `up` turned back into a spec (without peers) and tuned again: accepted, same values.
fn round_trip(up: u32) {
    let mut c: autoscale_upstream_config_t = unsafe { std::mem::zeroed() };
    // SAFETY: a writable struct.
    if unsafe { autoscale_upstream_config(up, &mut c) } != AUTOSCALE_OK {
        return;
    }
    let statuses: Vec<u16> = (100..640u16).filter(|&s| c.failure_statuses[s as usize / 64] & (1 << (s % 64)) != 0).collect();
    let spec = autoscale_upstream_spec_t {
        name: b"x".as_ptr(),
        name_len: 1,
        algorithm: c.algorithm,
        retries: c.retries,
        slow_start_ms: c.slow_start_ms,
        decay_ms: c.decay_ms,
        default_rtt_us: c.default_rtt_us,
        _pad: 0,
        slow_start_aggression: c.slow_start_aggression,
        slow_start_min_weight: c.slow_start_min_weight,
        failure_penalty: c.failure_penalty,
        slow_peer_factor: c.slow_peer_factor,
        slow_peer_penalty: c.slow_peer_penalty,
        peers: std::ptr::null(),
        npeers: 0,
        // SAFETY: a plain struct of numbers.
        outlier: unsafe { std::ptr::read(&c.outlier) },
        failure_statuses: statuses.as_ptr(),
        nfailure_statuses: statuses.len(),
    };
    let mut err = [0u8; 256];
    // SAFETY: a valid spec and buffer.
    let rc = unsafe { autoscale_admin_upstream_tune(up, &spec, err.as_mut_ptr() as *mut c_char, err.len()) };
    let text = String::from_utf8_lossy(&err[..err.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
    assert_eq!(rc, AUTOSCALE_OK, "the configuration in force of upstream {up} is refused by tune: {text}");
    let mut again: autoscale_upstream_config_t = unsafe { std::mem::zeroed() };
    // SAFETY: a writable struct.
    assert_eq!(unsafe { autoscale_upstream_config(up, &mut again) }, AUTOSCALE_OK);
    let bytes = |c: &autoscale_upstream_config_t| {
        // SAFETY: a plain struct read as bytes.
        unsafe { std::slice::from_raw_parts(c as *const _ as *const u8, std::mem::size_of::<autoscale_upstream_config_t>()) }.to_vec()
    };
    assert!(bytes(&c) == bytes(&again), "upstream {up}: tuning with the values in force changed them");
}

fn run(u: &mut Unstructured) -> Result<()> {
    region();
    // A known starting point for every input: one upstream of two peers.
    let mut base = spec(&mut Unstructured::new(&[]))?;
    base.name = b"a".to_vec();
    base.addrs = vec![b"127.0.0.1:80".to_vec(), b"127.0.0.2:80".to_vec()];
    base.statuses.clear();
    base.link(&[1, 1]);
    let mut idx = [0u32; 4];
    let mut err = [0u8; 256];
    // SAFETY: valid spec and output.
    let rc = unsafe { autoscale_config_apply(&base.spec, 1, idx.as_mut_ptr(), err.as_mut_ptr() as *mut c_char, err.len()) };
    assert_eq!(rc, AUTOSCALE_OK, "{}", String::from_utf8_lossy(&err));
    for _ in 0..u.int_in_range(1..=8u8)? {
        let before = state();
        let mut err = ErrBuf::new(u)?;
        let op = u.int_in_range(0..=7u8)?;
        let up = if u.ratio(3, 4)? { u.int_in_range(0..=MAX_UPSTREAMS)? } else { u.arbitrary()? };
        let a = addr_bytes(u)?;
        let weight: u32 = if u.arbitrary()? { u.int_in_range(0..=10_001)? } else { u.arbitrary()? };
        // SAFETY (all calls): pointers to live buffers of the lengths given.
        let rc = unsafe {
            match op {
                0 => {
                    let specs: Vec<Box<Owned>> = (0..u.int_in_range(0..=5usize)?).map(|_| spec(u)).collect::<Result<_>>()?;
                    let raw: Vec<autoscale_upstream_spec_t> = specs.iter().map(|o| std::ptr::read(&o.spec)).collect();
                    let mut out = vec![u32::MAX; raw.len()];
                    let rc = autoscale_config_apply(raw.as_ptr(), raw.len(), out.as_mut_ptr(), err.ptr(), err.1);
                    if rc == AUTOSCALE_OK {
                        for (o, &i) in specs.iter().zip(&out) {
                            assert!(i < MAX_UPSTREAMS);
                            assert_eq!(autoscale_upstream_find(o.name.as_ptr(), o.name.len()), i as i32);
                            round_trip(i);
                        }
                    }
                    rc
                }
                1 => {
                    let s = spec(u)?;
                    let rc = autoscale_admin_upstream_tune(up, &s.spec, err.ptr(), err.1);
                    if rc == AUTOSCALE_OK {
                        round_trip(up);
                    }
                    rc
                }
                2 => autoscale_admin_peer_add(up, a.as_ptr(), a.len(), weight, err.ptr(), err.1),
                3 => autoscale_admin_peer_remove(up, a.as_ptr(), a.len(), err.ptr(), err.1),
                4 => autoscale_admin_peer_weight(up, a.as_ptr(), a.len(), weight, err.ptr(), err.1),
                5 => {
                    let rc = autoscale_admin_peer_drain(up, a.as_ptr(), a.len(), u.arbitrary::<u8>()? as i32 % 2, err.ptr(), err.1);
                    assert!(rc < 0 || rc == 0 || rc == 1);
                    if rc >= 0 {
                        continue; // draining changes health, not the configuration
                    }
                    rc
                }
                6 => {
                    let addrs: Vec<Vec<u8>> = (0..u.int_in_range(0..=5usize)?).map(|_| addr_bytes(u)).collect::<Result<_>>()?;
                    let set: Vec<autoscale_peer_spec_t> = addrs
                        .iter()
                        .map(|a| Ok(autoscale_peer_spec_t { addr: a.as_ptr(), addr_len: a.len(), weight: u.int_in_range(0..=3)? }))
                        .collect::<Result<_>>()?;
                    let rc = autoscale_admin_peers_change(up, set.as_ptr(), set.len(), err.ptr(), err.1);
                    if rc > 0 {
                        0
                    } else {
                        rc
                    }
                }
                _ => {
                    let name: Vec<u8> = u.arbitrary()?;
                    let rc = autoscale_upstream_find(name.as_ptr(), name.len());
                    assert!(rc >= 0 && (rc as u32) < MAX_UPSTREAMS || rc == AUTOSCALE_ERR_UPSTREAM || rc == AUTOSCALE_ERR_ARG, "{rc}");
                    continue;
                }
            }
        };
        assert_ne!(rc, AUTOSCALE_ERR_PANIC);
        err.check(rc);
        if rc < 0 {
            assert_eq!(state(), before, "a refused input (op {op}, rc {rc}) changed the configuration");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
