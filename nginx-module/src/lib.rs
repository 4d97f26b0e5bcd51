//! `ngx_http_autoscale_module`: the `autoscale` upstream directive, peer choice and per-attempt accounting by the
//! `autoscale-core` engine, in nginx itself, over the shared region of the Lua library (see docs/native-module.md).
//!
//! - configuration time: `autoscale [name];` in an `upstream` block takes over its peer choice (keepalive after it);
//! - start-up, in the master after `init_by_lua*` ran: the module finds the loaded `libresty_autoscale.so`, checks
//!   its ABI version and the region's layout version against its own, and resolves every autoscale upstream by name,
//!   refusing to start when one is not in `autoscale.configure{}`;
//! - each worker: takes its in-flight column from the library (`autoscale_worker_attach`), so both sides count in the
//!   same column;
//! - per attempt: `get` picks with the engine (tried peers excluded, extra tries from the engine on the first one),
//!   `free` records the attempt's outcome and latency (microsecond clock at `get` and `free`).
//!
//! Every nginx callback runs inside [`guard`]: a panic never unwinds into nginx. The request path allocates nothing
//! but its peer data from the request pool (as nginx's own balancers), takes no lock and makes no system call but the
//! clock.
#![allow(non_upper_case_globals, static_mut_refs)]

use autoscale_core::layout::LAYOUT_VERSION;
use autoscale_core::rng::XorShift64;
use autoscale_core::{addr, Outcome, PickError, Region};
use ngx::ffi::{
    ngx_array_create, ngx_array_push, ngx_array_t, ngx_command_t, ngx_conf_t, ngx_cycle_t, ngx_http_conf_ctx_t,
    ngx_http_module_t, ngx_http_request_t, ngx_http_upstream_module, ngx_http_upstream_srv_conf_t, ngx_int_t,
    ngx_log_t, ngx_module_t, ngx_pcalloc, ngx_peer_connection_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_str_t,
    ngx_test_config, ngx_uint_t, NGX_BUSY, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_ERROR, NGX_HTTP_MODULE,
    NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPS_CONF, NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK, NGX_PEER_FAILED,
};
use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::Ordering::{Acquire, Release};

/// The ABI version of `libresty_autoscale.so` this module was built with (from `src/lib.rs`, see build.rs).
const LIB_ABI_VERSION: u32 = parse_u32(env!("AUTOSCALE_LIB_ABI_VERSION"));

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0u32;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// Attempts of one request remembered for "retries exclude tried peers" (more are still made, the oldest stay).
const TRIED_MAX: usize = 16;
/// No attempt in progress.
const NO_SLOT: u32 = u32::MAX;

/// Per `upstream` block (the module's server configuration there).
#[repr(C)]
struct SrvConf {
    /// Set by the `autoscale` directive.
    enabled: bool,
    /// The upstream's name in `autoscale.configure{}` (the directive's argument, else the block's name).
    name: ngx_str_t,
    /// Record index and generation of the upstream, resolved at start-up; re-resolved by name when the record was
    /// handed to another upstream since (a worker of the previous generation during a reload).
    idx: u32,
    ugen: u32,
}

impl SrvConf {
    fn name(&self) -> &str {
        if self.name.len == 0 || self.name.data.is_null() {
            return "";
        }
        // SAFETY: the name was checked to be UTF-8 when the directive was parsed; it lives in the cycle's pool.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.name.data, self.name.len)) }
    }
}

/// The module's main configuration: the upstreams that use the directive, for the start-up check.
#[repr(C)]
struct MainConf {
    upstreams: *mut ngx_array_t,
}

/// One request's balancer state (allocated from the request pool by `init_peer`).
#[repr(C)]
struct PeerData {
    conf: *mut SrvConf,
    r: *mut ngx_http_request_t,
    /// The attempt in progress (`NO_SLOT` when none) and when it began (µs, monotonic).
    slot: u32,
    gen: u32,
    start_us: u64,
    attempts: u32,
    ntried: u32,
    tried: [u32; TRIED_MAX],
}

/// A peer record's address as nginx wants it, cached per worker and re-read when the record's generation changes.
struct CachedPeer {
    gen: u32,
    socklen: u32,
    sockaddr: libc::sockaddr_in6,
    name: ngx_str_t,
    text: [u8; 64],
}

/// What one worker keeps: its column, its random generator and the address cache (made at worker start).
struct Worker {
    col: Option<u32>,
    rng: XorShift64,
    peers: Box<[CachedPeer]>,
}

/// The worker's state: touched only from its event loop thread (nginx calls balancers from that thread alone).
struct WorkerCell(UnsafeCell<Option<Worker>>);
// SAFETY: see above; no nginx thread pool task calls into this module.
unsafe impl Sync for WorkerCell {}
static WORKER: WorkerCell = WorkerCell(UnsafeCell::new(None));

/// Functions of the loaded `libresty_autoscale.so`.
#[derive(Clone, Copy)]
struct Library {
    worker_attach: unsafe extern "C" fn() -> c_int,
}

/// The library's region, seen through this module's copy of the engine, and the library's functions.
struct Shared {
    region: Region,
    lib: Library,
}

/// Set in the master at start-up (and again at a reload that brings another library and region: the previous one
/// is left in place, never freed, for whoever still holds it); workers inherit it.
static SHARED: AtomicPtr<Shared> = AtomicPtr::new(ptr::null_mut());

fn shared() -> Option<&'static Shared> {
    // SAFETY: SHARED is NULL or a leaked Box, never freed.
    unsafe { SHARED.load(Acquire).as_ref() }
}

fn region() -> Option<&'static Region> {
    shared().map(|s| &s.region)
}

/// Runs `f`, turning a panic into `fallback`: nothing unwinds into nginx.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn now_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Writes `msg` to `log` at `level`.
///
/// # Safety
/// `log` must be a valid nginx log.
unsafe fn log(level: u32, log: *mut ngx_log_t, msg: &str) {
    if log.is_null() {
        return;
    }
    ngx::ngx_log_error!(level, log, "{}", msg);
}

// ---- configuration ------------------------------------------------------------------------------------------------

static mut COMMANDS: [ngx_command_t; 2] = [
    ngx_command_t {
        name: ngx::ngx_string!("autoscale"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(directive),
        conf: NGX_HTTP_SRV_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

static CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(postconfiguration),
    create_main_conf: Some(create_main_conf),
    init_main_conf: None,
    create_srv_conf: Some(create_srv_conf),
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

ngx::ngx_modules!(ngx_http_autoscale_module);

#[used]
#[no_mangle]
pub static mut ngx_http_autoscale_module: ngx_module_t = ngx_module_t {
    ctx: &raw const CTX as *mut c_void,
    commands: unsafe { &raw mut COMMANDS[0] },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_process: Some(init_process),
    ..ngx_module_t::default()
};

const CONF_OK: *mut c_char = ptr::null_mut();

fn conf_error() -> *mut c_char {
    ngx::core::NGX_CONF_ERROR
}

/// The module's configuration of kind `which` (main or server) in context `ctx`.
///
/// # Safety
/// `ctx` must be an http configuration context.
unsafe fn our_conf<T>(confs: *mut *mut c_void) -> *mut T {
    *confs.add(ngx_http_autoscale_module.ctx_index) as *mut T
}

unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    guard(ptr::null_mut(), || {
        let mcf = ngx_pcalloc((*cf).pool, std::mem::size_of::<MainConf>()) as *mut MainConf;
        if mcf.is_null() {
            return ptr::null_mut();
        }
        (*mcf).upstreams = ngx_array_create((*cf).pool, 4, std::mem::size_of::<*mut SrvConf>());
        if (*mcf).upstreams.is_null() {
            return ptr::null_mut();
        }
        mcf as *mut c_void
    })
}

unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    guard(ptr::null_mut(), || ngx_pcalloc((*cf).pool, std::mem::size_of::<SrvConf>()))
}

/// `autoscale [name];` in an `upstream` block.
unsafe extern "C" fn directive(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    guard(conf_error(), || {
        let scf = &mut *(conf as *mut SrvConf);
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let uscf = *(*ctx).srv_conf.add(ngx_http_upstream_module.ctx_index) as *mut ngx_http_upstream_srv_conf_t;
        let args = (*(*cf).args).elts as *const ngx_str_t;
        let nargs = (*(*cf).args).nelts;
        let block = (*uscf).host;
        let block_name = String::from_utf8_lossy(std::slice::from_raw_parts(block.data, block.len)).into_owned();
        if scf.enabled {
            ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"autoscale\" is duplicate in upstream \"{block_name}\"");
            return conf_error();
        }
        if (*uscf).peer.init_upstream.is_some() {
            ngx::ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"autoscale\" must be the first balancing directive of upstream \"{block_name}\": it replaces \
                 least_conn, hash, ip_hash and random, and keepalive must come after it"
            );
            return conf_error();
        }
        scf.name = if nargs > 1 { *args.add(1) } else { block };
        let name = std::slice::from_raw_parts(scf.name.data, scf.name.len);
        if name.is_empty() || name.len() > 63 || std::str::from_utf8(name).is_err() {
            ngx::ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"autoscale\" in upstream \"{block_name}\": the upstream name must be 1 to 63 bytes of UTF-8"
            );
            return conf_error();
        }
        scf.enabled = true;
        scf.idx = u32::MAX;
        (*uscf).peer.init_upstream = Some(init_upstream);
        let mcf: *mut MainConf = our_conf((*ctx).main_conf);
        let slot = ngx_array_push((*mcf).upstreams) as *mut *mut SrvConf;
        if slot.is_null() {
            return conf_error();
        }
        *slot = scf;
        CONF_OK
    })
}

unsafe extern "C" fn init_upstream(_cf: *mut ngx_conf_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    guard(NGX_ERROR as ngx_int_t, || {
        (*us).peer.init = Some(init_peer);
        NGX_OK as ngx_int_t
    })
}

/// A shared-memory zone of its own whose init callback runs the start-up check: zones are initialised in the
/// master after the whole configuration is read and after `init_by_lua*` ran (lua-nginx-module runs it when its own
/// zones are ready, and ours is added after them), before workers are forked; a refusal there fails the start or the
/// reload cleanly (a reload keeps the running configuration).
unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    guard(NGX_ERROR as ngx_int_t, || {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let mcf: *mut MainConf = our_conf((*ctx).main_conf);
        if (*(*mcf).upstreams).nelts == 0 {
            return NGX_OK as ngx_int_t;
        }
        let mut name = ngx::ngx_string!("autoscale_native_check");
        let zone = ngx_shared_memory_add(cf, &mut name, 8 * 4096, &raw mut ngx_http_autoscale_module as *mut c_void);
        if zone.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*zone).init = Some(startup_check);
        (*zone).data = mcf as *mut c_void;
        NGX_OK as ngx_int_t
    })
}

unsafe extern "C" fn startup_check(zone: *mut ngx_shm_zone_t, _old: *mut c_void) -> ngx_int_t {
    let zlog = (*zone).shm.log;
    let mcf = (*zone).data as *mut MainConf;
    guard(NGX_ERROR as ngx_int_t, || {
        if ngx_test_config != 0 {
            return NGX_OK as ngx_int_t; // `nginx -t` does not run init_by_lua*: nothing to check against
        }
        let arr = &*(*mcf).upstreams;
        let confs = std::slice::from_raw_parts(arr.elts as *const *mut SrvConf, arr.nelts);
        match check(confs) {
            Ok(()) => NGX_OK as ngx_int_t,
            Err(msg) => {
                log(NGX_LOG_EMERG, zlog, &format!("ngx_http_autoscale_module: {msg}"));
                NGX_ERROR as ngx_int_t
            }
        }
    })
}

/// Finds the library and its region, checks versions and resolves every autoscale upstream.
unsafe fn check(confs: &[*mut SrvConf]) -> Result<(), String> {
    let first = confs.first().map(|c| (**c).name().to_owned()).unwrap_or_default();
    let (path, lib, base) = find_library().map_err(|e| format!("upstream \"{first}\": {e}"))?;
    let region = match shared() {
        Some(s) if s.region.base_ptr() == base && s.lib.worker_attach as usize == lib.worker_attach as usize => {
            &s.region
        }
        _ => {
            let region = Region::from_shared_raw(base).map_err(|e| {
                format!("{path}: {e} (this module: layout version {LAYOUT_VERSION}; build the module and the library from the same release)")
            })?;
            let s: &'static Shared = Box::leak(Box::new(Shared { region, lib }));
            SHARED.store(s as *const Shared as *mut Shared, Release);
            &s.region
        }
    };
    for &c in confs {
        let c = &mut *c;
        let name = c.name();
        let idx = region.find_upstream(name).ok_or_else(|| {
            format!("upstream \"{name}\" uses \"autoscale\" but is not in autoscale.configure{{}} (upstreams = {{ {name} = {{ ... }} }} in init_by_lua*)")
        })?;
        c.idx = idx;
        c.ugen = region.upstream_gen(idx).unwrap_or(0);
    }
    Ok(())
}

/// The loaded `libresty_autoscale.so` (LuaJIT loaded it in `init_by_lua*`), its functions and its region's address.
unsafe fn find_library() -> Result<(String, Library, *mut u8), String> {
    let mut paths: Vec<String> = Vec::new();
    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        guard(1, || {
            let paths = &mut *(data as *mut Vec<String>);
            let name = (*info).dlpi_name;
            if !name.is_null() {
                let s = CStr::from_ptr(name).to_string_lossy();
                let file = s.rsplit('/').next().unwrap_or("");
                if file == "libresty_autoscale.so" || file == "resty_autoscale.so" {
                    paths.push(s.into_owned());
                }
            }
            0
        })
    }
    libc::dl_iterate_phdr(Some(each), &mut paths as *mut Vec<String> as *mut c_void);
    if paths.is_empty() {
        return Err("libresty_autoscale.so is not loaded: the Lua library must be configured in init_by_lua* \
                    (autoscale.configure{...}) for the native module to find its shared region"
            .into());
    }
    let mut why = Vec::new();
    for path in paths {
        let c = std::ffi::CString::new(path.clone()).map_err(|e| e.to_string())?;
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if h.is_null() {
            why.push(format!("{path}: not loadable"));
            continue;
        }
        let sym = |n: &CStr| libc::dlsym(h, n.as_ptr());
        let abi = sym(c"autoscale_abi_version");
        let base_fn = sym(c"autoscale_region_base");
        let attach = sym(c"autoscale_worker_attach");
        if abi.is_null() {
            why.push(format!("{path}: no autoscale_abi_version"));
            continue;
        }
        let abi: unsafe extern "C" fn() -> u32 = std::mem::transmute(abi);
        let have = abi();
        if have != LIB_ABI_VERSION || base_fn.is_null() || attach.is_null() {
            why.push(format!(
                "{path} has ABI version {have}{}, this module needs ABI version {LIB_ABI_VERSION} (build the module and the library from the same release)",
                if base_fn.is_null() { " without autoscale_region_base" } else { "" }
            ));
            continue;
        }
        let base_fn: unsafe extern "C" fn(*mut *mut c_void, *mut u64) -> c_int = std::mem::transmute(base_fn);
        let mut base = ptr::null_mut();
        let mut size = 0u64;
        if base_fn(&mut base, &mut size) != 0 || base.is_null() {
            why.push(format!("{path}: no shared region yet (autoscale.configure{{}} was not called in init_by_lua*)"));
            continue;
        }
        let lib = Library { worker_attach: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(attach) };
        return Ok((path, lib, base as *mut u8));
    }
    Err(why.join("; "))
}

unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    let log_ = (*cycle).log;
    guard(NGX_OK as ngx_int_t, || {
        let Some(Shared { region, lib }) = shared() else {
            return NGX_OK as ngx_int_t; // no autoscale upstream in this configuration
        };
        let col = (lib.worker_attach)();
        if col < 0 {
            log(
                NGX_LOG_WARN,
                log_,
                "ngx_http_autoscale_module: no free worker column (raise max_workers); in-flight counts of this \
                 worker are not reclaimed if it dies",
            );
        }
        let peers = (0..region.params().max_peers)
            .map(|_| CachedPeer {
                gen: u32::MAX,
                socklen: 0,
                sockaddr: std::mem::zeroed(),
                name: ngx_str_t { len: 0, data: ptr::null_mut() },
                text: [0; 64],
            })
            .collect();
        let seed = now_us() ^ ((libc::getpid() as u64) << 32) ^ 0x6e61_7469_7665;
        *WORKER.0.get() = Some(Worker { col: (col >= 0).then_some(col as u32), rng: XorShift64::new(seed), peers });
        NGX_OK as ngx_int_t
    })
}

// ---- request path -------------------------------------------------------------------------------------------------

unsafe extern "C" fn init_peer(r: *mut ngx_http_request_t, us: *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t {
    guard(NGX_ERROR as ngx_int_t, || {
        let pd = ngx_pcalloc((*r).pool, std::mem::size_of::<PeerData>()) as *mut PeerData;
        if pd.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*pd).conf = our_conf((*us).srv_conf);
        (*pd).r = r;
        (*pd).slot = NO_SLOT;
        let u = (*r).upstream;
        (*u).peer.data = pd as *mut c_void;
        (*u).peer.get = Some(get_peer);
        (*u).peer.free = Some(free_peer);
        (*u).peer.tries = 1; // the engine gives the extra tries on the first attempt
        (*u).peer.set_session = Some(set_session);
        (*u).peer.save_session = Some(save_session);
        NGX_OK as ngx_int_t
    })
}

unsafe extern "C" fn set_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) -> ngx_int_t {
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn save_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) {}

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    guard(NGX_ERROR as ngx_int_t, || get(&mut *pc, &mut *(data as *mut PeerData)))
}

#[inline]
unsafe fn get(pc: &mut ngx_peer_connection_t, pd: &mut PeerData) -> ngx_int_t {
    // as nginx's own balancers: keepalive sets `cached` again when it hands out a cached connection (nginx gives a
    // failed cached connection its try back, so a stale flag would give every later failure its try back too)
    pc.set_cached(0);
    pc.connection = ptr::null_mut();
    let (Some(region), Some(w)) = (region(), (*WORKER.0.get()).as_mut()) else {
        pc.tries = 0;
        return NGX_BUSY as ngx_int_t;
    };
    let conf = &mut *pd.conf;
    let now = now_us();
    let n = pd.ntried as usize;
    let tried = &pd.tried[..n];
    let mut pick = region.pick_at(conf.idx, conf.ugen, &|s| tried.contains(&s), now, &mut w.rng, w.col);
    if let Err(PickError::StaleUpstream) = pick {
        // the record serves another upstream now: the one under this name, if any
        if let Some(idx) = region.find_upstream(conf.name()) {
            conf.idx = idx;
            conf.ugen = region.upstream_gen(idx).unwrap_or(0);
            pick = region.pick_at(conf.idx, conf.ugen, &|s| tried.contains(&s), now, &mut w.rng, w.col);
        }
    }
    let Ok(p) = pick else {
        // nginx answers 502 "no live upstreams" (error_page can turn it into a fallback); no tries left, or nginx,
        // which retries "no live upstreams" while tries remain, would ask again at once, and again
        pc.tries = 0;
        return NGX_BUSY as ngx_int_t;
    };
    let Some(cp) = w.peers.get_mut(p.slot as usize) else {
        region.end_attempt(p.slot, p.gen, w.col, Outcome::Aborted, 0, now);
        return NGX_ERROR as ngx_int_t;
    };
    if cp.gen != p.gen && !refresh(region, cp, p.slot, p.gen) {
        region.end_attempt(p.slot, p.gen, w.col, Outcome::Aborted, 0, now);
        return NGX_ERROR as ngx_int_t;
    }
    pc.sockaddr = &mut cp.sockaddr as *mut libc::sockaddr_in6 as *mut ngx::ffi::sockaddr;
    pc.socklen = cp.socklen;
    pc.name = &mut cp.name;
    pd.slot = p.slot;
    pd.gen = p.gen;
    pd.start_us = now;
    pd.attempts += 1;
    if n < TRIED_MAX {
        pd.tried[n] = p.slot;
        pd.ntried += 1;
    }
    if pd.attempts == 1 && p.more_tries > 0 {
        let mut tries = 1 + p.more_tries as ngx_uint_t;
        let limit = (*(*(*pd.r).upstream).conf).next_upstream_tries;
        if limit > 0 && tries > limit {
            tries = limit;
        }
        pc.tries = tries;
    }
    NGX_OK as ngx_int_t
}

/// Re-reads the address of peer record `slot` (generation `gen`) into the cache; false when it cannot be used.
fn refresh(region: &Region, cp: &mut CachedPeer, slot: u32, gen: u32) -> bool {
    let mut text = [0u8; 64];
    let n = region.peer(slot).head.addr.load(&mut text);
    let Some(sa) = std::str::from_utf8(&text[..n]).ok().and_then(|t| addr::parse(t).ok()) else {
        return false;
    };
    // SAFETY: all-zero is a valid sockaddr_in6 (and sockaddr_in, which fits in it).
    let mut storage: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28 bytes); both are plain data.
            unsafe { ptr::write(&mut storage as *mut libc::sockaddr_in6 as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            storage.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            storage.sin6_port = a.port().to_be();
            storage.sin6_addr.s6_addr = a.ip().octets();
            storage.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    cp.sockaddr = storage;
    cp.socklen = len as u32;
    cp.text = text;
    cp.name = ngx_str_t { len: n, data: cp.text.as_mut_ptr() };
    cp.gen = gen;
    true
}

unsafe extern "C" fn free_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void, state: ngx_uint_t) {
    guard((), || free(&mut *pc, &mut *(data as *mut PeerData), state))
}

#[inline]
unsafe fn free(pc: &mut ngx_peer_connection_t, pd: &mut PeerData, state: ngx_uint_t) {
    if pc.tries > 0 {
        pc.tries -= 1;
    }
    if pd.slot == NO_SLOT {
        return;
    }
    let (slot, gen) = (pd.slot, pd.gen);
    pd.slot = NO_SLOT;
    let (Some(region), Some(w)) = (region(), (*WORKER.0.get()).as_mut()) else {
        return;
    };
    let now = now_us();
    let outcome = outcome(region, (*pd.conf).idx, pc, pd.r, state);
    region.finish_attempt(slot, gen, w.col, outcome, now.saturating_sub(pd.start_us), now, &mut w.rng);
}

/// How the attempt ended, from what nginx knows when it frees the peer: `NGX_PEER_FAILED` with the connection's
/// timed-out flags, whether it connected (`u.state.connect_time` is -1 until then) and the response status if a
/// header came; else the response status (0 when the client went away before one).
unsafe fn outcome(
    region: &Region,
    idx: u32,
    pc: &ngx_peer_connection_t,
    r: *mut ngx_http_request_t,
    state: ngx_uint_t,
) -> Outcome {
    let u = (*r).upstream;
    let status = (*u).headers_in.status_n as u32;
    if state & NGX_PEER_FAILED as ngx_uint_t == 0 {
        return region.response_outcome(idx, status);
    }
    let c = pc.connection;
    if !c.is_null() && ((*(*c).read).timedout() != 0 || (*(*c).write).timedout() != 0) {
        return Outcome::Timeout;
    }
    let st = (*u).state;
    if st.is_null() || (*st).connect_time == ngx::ffi::ngx_msec_t::MAX {
        return Outcome::Connect;
    }
    if status == 0 || (*st).header_time == ngx::ffi::ngx_msec_t::MAX {
        return Outcome::Gateway; // connected, but no valid response header
    }
    match region.response_outcome(idx, status) {
        Outcome::Success => match status {
            // nginx retried it (proxy_next_upstream http_500 ...): a failure even if not in failure_statuses
            502..=504 => Outcome::Gateway,
            500..=599 => Outcome::Http5xx,
            _ => Outcome::Success,
        },
        o => o,
    }
}
