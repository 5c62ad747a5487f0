//! The guard against server-side request forgery.
//!
//! Any role that can create an endpoint could otherwise make the database server send
//! requests into its own network: the cloud metadata service at 169.254.169.254, an admin
//! port on localhost, a neighbour on 10.0.0.0/8. The guard refuses every address that is
//! not publicly routable unless an allow-list names it. It is applied to the addresses a
//! connection is actually made to (after DNS resolution), so a name that resolves — or is
//! re-pointed — to a private address cannot slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Operator-approved exceptions: CIDR blocks and exact host names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<(IpAddr, u8)>,
    hosts: Vec<String>,
}

impl AllowList {
    /// Parses a comma-separated list such as `"127.0.0.1/32, 10.1.0.0/16, localhost"`.
    /// A bare address means that one address.
    pub fn parse(text: &str) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some((addr, bits)) = item.split_once('/') {
                let ip: IpAddr = addr
                    .trim()
                    .parse()
                    .map_err(|_| format!("\"{item}\" is not a valid CIDR block"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits: u8 = bits
                    .trim()
                    .parse()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("\"{item}\" has an invalid prefix length (0-{max})"))?;
                list.nets.push((ip, bits));
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                list.nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            } else if item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                list.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "\"{item}\" is neither a host name, an IP address nor a CIDR block"
                ));
            }
        }
        Ok(list)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets
            .iter()
            .any(|(net, bits)| contains(canonical(*net), *bits, ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are judged as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn v4_reason(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    let within = |net: [u8; 4], bits: u8| contains(IpAddr::V4(net.into()), bits, IpAddr::V4(a));
    Some(match () {
        _ if a.is_unspecified() || o[0] == 0 => "an unspecified (0.0.0.0/8) address",
        _ if a.is_loopback() => "a loopback address",
        _ if a.is_private() => "a private (RFC 1918) address",
        _ if a.is_link_local() => "a link-local address (cloud metadata lives here)",
        _ if within([100, 64, 0, 0], 10) => "a carrier-grade NAT (100.64.0.0/10) address",
        _ if within([192, 0, 0, 0], 24) => "an IETF protocol assignment (192.0.0.0/24)",
        _ if within([198, 18, 0, 0], 15) => "a benchmarking (198.18.0.0/15) address",
        _ if a.is_documentation() => "a documentation address",
        _ if a.is_multicast() => "a multicast address",
        _ if a.is_broadcast() || o[0] >= 240 => "a reserved (240.0.0.0/4) address",
        _ => return None,
    })
}

fn v6_reason(a: Ipv6Addr) -> Option<&'static str> {
    let seg = a.segments();
    Some(match () {
        _ if a.is_unspecified() => "an unspecified (::) address",
        _ if a.is_loopback() => "a loopback address",
        _ if a.is_multicast() => "a multicast address",
        // Deprecated (RFC 4291), and like NAT64 and 6to4 below it can embed any IPv4
        // address: `::10.0.0.1` must not reach what `10.0.0.1` may not.
        _ if seg[..6] == [0; 6] => "an IPv4-compatible (::/96) address",
        _ if seg[0] & 0xfe00 == 0xfc00 => "a unique local (fc00::/7) address",
        _ if seg[0] & 0xffc0 == 0xfe80 => "a link-local address",
        _ if seg[0] & 0xffc0 == 0xfec0 => "a site-local address",
        // 64:ff9b::/96 (NAT64) and 2002::/16 (6to4) can embed any IPv4 address.
        _ if seg[0] == 0x64 && seg[1] == 0xff9b => "a NAT64 address",
        _ if seg[0] == 0x2002 => "a 6to4 address",
        _ if seg[0] == 0x2001 && seg[1] == 0x0db8 => "a documentation address",
        _ => return None,
    })
}

/// Why `ip` may not be connected to without an allow-list entry, or `None` if it is a
/// public address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => v4_reason(a),
        IpAddr::V6(a) => v6_reason(a),
    }
}

/// Decides whether a connection to `ip`, reached through host name `host`, may be made.
pub fn check(host: &str, ip: IpAddr, allow: &AllowList) -> Result<(), String> {
    if allow.allows_host(host) || allow.allows_ip(ip) {
        return Ok(());
    }
    match forbidden_reason(ip) {
        None => Ok(()),
        Some(reason) => Err(format!(
            "refused by the SSRF guard: {host} -> {ip} is {reason}; add it to outbox.allowed_targets if it is intended"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_and_special_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ] {
            assert!(forbidden_reason(ip(a)).is_some(), "{a} must be refused");
            assert!(check("h", ip(a), &AllowList::default()).is_err(), "{a}");
        }
    }

    #[test]
    fn ipv4_compatible_addresses_are_refused_but_their_neighbours_keep_their_reasons() {
        for a in [
            "::a00:1",
            "::8.8.8.8",
            "::a9fe:a9fe",
            "::0.0.0.2",
            "::ffff:ffff",
        ] {
            assert_eq!(
                forbidden_reason(ip(a)),
                Some("an IPv4-compatible (::/96) address"),
                "{a}"
            );
        }
        let msg = check("h", ip("::8.8.8.8"), &AllowList::default()).unwrap_err();
        assert!(msg.contains("IPv4-compatible (::/96)"), "{msg}");
        assert_eq!(forbidden_reason(ip("::1")), Some("a loopback address"));
        assert_eq!(
            forbidden_reason(ip("::")),
            Some("an unspecified (::) address")
        );
        // IPv4-mapped addresses are still judged as the IPv4 address they carry.
        assert_eq!(forbidden_reason(ip("::ffff:8.8.8.8")), None);
        assert_eq!(
            forbidden_reason(ip("::ffff:10.0.0.1")),
            Some("a private (RFC 1918) address")
        );
        // Just outside the block.
        assert_eq!(forbidden_reason(ip("0:0:0:0:0:1::1")), None);
        assert!(check("h", ip("::a00:1"), &AllowList::parse("::/96").unwrap()).is_ok());
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(forbidden_reason(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn the_allow_list_admits_blocks_and_names() {
        let allow = AllowList::parse(" 127.0.0.1/32, 10.1.0.0/16,localhost, fd00::/8 ,192.168.5.5")
            .unwrap();
        assert!(check("anything", ip("127.0.0.1"), &allow).is_ok());
        assert!(check("anything", ip("::ffff:127.0.0.1"), &allow).is_ok());
        assert!(check("anything", ip("127.0.0.2"), &allow).is_err());
        assert!(check("x", ip("10.1.200.3"), &allow).is_ok());
        assert!(check("x", ip("10.2.0.1"), &allow).is_err());
        assert!(check("LocalHost.", ip("::1"), &allow).is_ok());
        assert!(check("x", ip("fd00::5"), &allow).is_ok());
        assert!(check("x", ip("192.168.5.5"), &allow).is_ok());
        assert!(check("x", ip("192.168.5.6"), &allow).is_err());
        let msg = check(
            "metadata.internal",
            ip("169.254.169.254"),
            &AllowList::default(),
        )
        .unwrap_err();
        assert!(
            msg.contains("link-local") && msg.contains("outbox.allowed_targets"),
            "{msg}"
        );
    }

    #[test]
    fn bad_allow_lists_are_refused() {
        assert!(AllowList::parse("10.0.0.0/33").is_err());
        assert!(AllowList::parse("10.0.0/8").is_err());
        assert!(AllowList::parse("http://x").is_err());
        assert_eq!(AllowList::parse(" , ").unwrap(), AllowList::default());
    }
}
