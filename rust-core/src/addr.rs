//! Parsing of peer addresses (`"10.0.0.1:8080"`, `"[::1]:8080"`), strictly, with a reason on every rejection.

use std::net::{IpAddr, SocketAddr};

/// Longest canonical address text kept in shared memory.
pub const ADDR_MAX: usize = 63;

/// Why an address was refused. The text is shown to operators after the config path of the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("empty address")]
    Empty,
    #[error("address longer than {ADDR_MAX} bytes")]
    TooLong,
    #[error("missing \":port\"")]
    MissingPort,
    #[error("port is not a number")]
    BadPort,
    #[error("port out of range")]
    PortRange,
    #[error("host must be an IPv4 address or a bracketed IPv6 address such as [::1] (DNS names are not resolved here)")]
    NotIp,
}

/// Parses `host:port` where host is an IP literal and `1 <= port <= 65535`.
pub fn parse(text: &str) -> Result<SocketAddr, AddrError> {
    if text.is_empty() {
        return Err(AddrError::Empty);
    }
    if text.len() > ADDR_MAX {
        return Err(AddrError::TooLong);
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']').ok_or(AddrError::NotIp)?;
        let port = rest[end + 1..]
            .strip_prefix(':')
            .ok_or(AddrError::MissingPort)?;
        let ip: std::net::Ipv6Addr = rest[..end].parse().map_err(|_| AddrError::NotIp)?;
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or(AddrError::MissingPort)?;
        if host.contains(':') {
            return Err(AddrError::NotIp); // an unbracketed IPv6 address is ambiguous
        }
        let ip: std::net::Ipv4Addr = host.parse().map_err(|_| AddrError::NotIp)?;
        (IpAddr::V4(ip), port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(if port.is_empty() {
            AddrError::MissingPort
        } else {
            AddrError::BadPort
        });
    }
    let port: u32 = if port.len() > 5 {
        100_000
    } else {
        port.parse().map_err(|_| AddrError::BadPort)?
    };
    if port == 0 || port > 65535 {
        return Err(AddrError::PortRange);
    }
    Ok(SocketAddr::new(host, port as u16))
}

/// Canonical text of an address and the length of its host part (`"[::1]"` keeps its brackets, as nginx wants).
pub fn canonical(addr: &SocketAddr) -> (String, usize) {
    let text = addr.to_string();
    let host_len = text.rfind(':').unwrap_or(text.len());
    (text, host_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Rng, XorShift64};

    #[test]
    fn accepts_and_canonicalises() {
        assert_eq!(
            canonical(&parse("127.0.0.1:80").unwrap()),
            ("127.0.0.1:80".into(), 9)
        );
        assert_eq!(
            canonical(&parse("[::1]:8080").unwrap()),
            ("[::1]:8080".into(), 5)
        );
        assert_eq!(canonical(&parse("[0:0::1]:1").unwrap()).0, "[::1]:1");
    }

    #[test]
    fn rejects_with_reasons() {
        use AddrError::*;
        for (text, err) in [
            ("", Empty),
            ("10.0.0.1", MissingPort),
            ("10.0.0.1:", MissingPort),
            ("10.0.0.1:99999", PortRange),
            ("10.0.0.1:0", PortRange),
            ("10.0.0.1:8x", BadPort),
            ("10.0.0.1:-1", BadPort),
            ("10.0.0.1:123456789012345678901", PortRange),
            ("backend:80", NotIp),
            ("::1:80", NotIp),
            ("[::1]80", MissingPort),
            ("[::1:80", NotIp),
            ("300.0.0.1:80", NotIp),
        ] {
            assert_eq!(parse(text), Err(err), "{text}");
        }
        assert_eq!(parse(&"1".repeat(64)), Err(TooLong));
    }

    /// Property: arbitrary bytes never panic, and whatever parses round-trips through its canonical text.
    #[test]
    fn fuzz_never_panics_and_roundtrips() {
        let mut rng = XorShift64::new(3);
        let alphabet = b"0123456789.:[]abcdef:x- \x00\xff";
        for _ in 0..200_000 {
            let len = rng.below(24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len() as u32) as usize])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(a) = parse(&text) {
                assert_eq!(parse(&canonical(&a).0), Ok(a));
            }
        }
    }
}
