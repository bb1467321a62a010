//! What a call's network grants let through, as pure functions of its plan: which
//! destinations agentd forwards, which names its DNS stub answers, and which addresses are
//! special (reached only through a grant that names them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::plan::NetworkPlan;
use crate::types::{normalize_name, HostAddr, HostPort};

/// Where the DNS stub listens in every namespace with network grants (also on `[::1]:53`,
/// and, for UDP, on port 53 of every address, so that a resolver configured elsewhere still
/// reaches it).
pub const DNS_STUB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53);

/// Why an address is special: loopback, link-local (cloud metadata), private and other
/// ranges that a name or a `*:PORT` grant must never reach by accident. `None` for a public
/// address. IPv4-mapped and NAT64 spellings are judged by the IPv4 address they carry.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata services live here)")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("this-network")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space (carrier-grade NAT)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved or broadcast")
    } else {
        None
    }
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return special_v4(v4).or(Some("IPv4-mapped"));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        // NAT64 (64:ff9b::/96): the IPv4 address is in the last 32 bits.
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return special_v4(Ipv4Addr::new(a, b, c, d));
    }
    if s[0] == 0x2002 {
        // 6to4 (2002::/16): the IPv4 address is in bits 16 to 48.
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return special_v4(Ipv4Addr::new(a, b, c, d)).or(Some("6to4"));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some("local-use NAT64");
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("Teredo");
    }
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (private)")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local (private)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] == 0 {
        Some("IPv4-compatible or reserved")
    } else {
        None
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl NetworkPlan {
    /// Whether the call may connect to `to` by address, whatever name it used: an exact
    /// grant, a range grant containing it, or a `*:PORT` grant if the address is public.
    pub fn allows_address(&self, to: SocketAddr) -> Result<(), Refusal> {
        let ip = canonical(to.ip());
        let port = to.port();
        let mut special = None;
        for g in self.connect.iter().filter(|g| g.port.get() == port) {
            match &g.addr {
                HostAddr::Ip(a) if canonical(*a) == ip => return Ok(()),
                HostAddr::Range(net) if net.contains(&ip) => return Ok(()),
                HostAddr::Any => match special_range(ip) {
                    None => return Ok(()),
                    Some(why) => special = Some(why),
                },
                _ => {}
            }
        }
        Err(Refusal(match special {
            Some(why) => format!(
                "{to} is a {why} address: `*:{port}` covers public addresses only; grant the address or its range to reach it"
            ),
            None => format!("{to} is not granted"),
        }))
    }

    /// Whether a grant names `to` itself: its exact address or a range containing it (not
    /// `*:PORT`, not a name).
    pub fn names_address(&self, to: SocketAddr) -> bool {
        let ip = canonical(to.ip());
        self.connect.iter().filter(|g| g.port.get() == to.port()).any(|g| match &g.addr {
            HostAddr::Ip(a) => canonical(*a) == ip,
            HostAddr::Range(net) => net.contains(&ip),
            _ => false,
        })
    }

    /// The ports on which `name` is granted (empty if it is not).
    pub fn name_ports(&self, name: &str) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .connect
            .iter()
            .filter(|g| matches!(&g.addr, HostAddr::Name(n) if n.matches(name)))
            .map(|g| g.port.get())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Whether an address that `name` (granted on `port`) resolved to may be reached: a
    /// public one may; a special one only where a grant names that address or its range.
    pub fn allows_resolved(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        match special_range(canonical(ip)) {
            None => Ok(()),
            Some(why) => self.allows_address(SocketAddr::new(ip, port)).map_err(|_| {
                Refusal(format!("it resolves to {ip}, a {why} address, which no grant of port {port} names"))
            }),
        }
    }

    /// Whether any name is granted (the DNS stub then answers for them).
    pub fn grants_names(&self) -> bool {
        self.connect.iter().any(HostPort::is_name)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; anything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A name as the DNS stub compares it, or `None` if it is not a host name.
pub fn client_name(raw: &str) -> Option<String> {
    normalize_name(raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges_include_every_spelling_of_metadata_and_loopback() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "64:ff9b:1::a9fe:a9fe",
            "2001:0:4136:e378::1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert!(special_range(ip).is_some(), "{ip} should be special");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8", "192.0.2.10"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(special_range(ip), None, "{ip}");
        }
    }
}
