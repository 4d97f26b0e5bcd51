//! Peer addresses as they come from nginx.conf, discovery (DNS, etcd, Kubernetes) and the admin API: any bytes are
//! either refused with a reason or parsed to an address whose canonical text parses back to the same address.
#![no_main]
use autoscale_core::addr::{canonical, parse, ADDR_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The FFI turns the bytes into text lossily (src/lib.rs `peer_confs`); the admin path takes UTF-8 as it is.
    let text = String::from_utf8_lossy(data);
    if let Ok(a) = parse(&text) {
        let (canon, host_len) = canonical(&a);
        assert!(canon.len() <= ADDR_MAX, "canonical text fits a record: {canon}");
        assert!(host_len < canon.len() && canon.as_bytes()[host_len] == b':');
        assert_eq!(parse(&canon), Ok(a), "round trip of {text:?}");
        assert!(a.port() != 0);
    }
});
