//! Address classes for destination binding: "a name is not an address".
//!
//! Every address a destination NAME resolves to is classified before the connection may
//! be bound to it. A name that resolves to loopback, a private range, link-local (the cloud
//! metadata service at 169.254.169.254), CGNAT, a ULA and the like would let a workload
//! reach internal services through a public-looking name (SSRF through DNS: a rebinding
//! record, a hostile DNS zone, or a name the attacker controls). Those "internal" classes
//! are denied for name destinations unless the destination says `allow_internal`.
//!
//! IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, SIIT, NAT64,
//! 6to4, Teredo) are classified by the IPv4 address they carry: `64:ff9b::7f00:1` is
//! loopback.
//!
//! Documentation ranges (RFC 5737 192.0.2/24, 198.51.100/24, 203.0.113/24; RFC 3849
//! 2001:db8::/32; RFC 9637 3fff::/20) are their own class and NOT internal: they are never
//! routed on the internet, so no real internal service lives there, and tests and demos
//! use them as stand-ins for public destinations inside test network namespaces.
//!
//! Pure: no I/O.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// The class of an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddrClass {
    /// Globally routed unicast.
    Global,
    /// Documentation ranges (never routed; used by tests as public stand-ins).
    Documentation,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918: 10/8, 172.16/12, 192.168/16.
    Private,
    /// 169.254/16 (including the cloud metadata service 169.254.169.254), fe80::/10.
    LinkLocal,
    /// Carrier-grade NAT shared space 100.64/10.
    Cgnat,
    /// IPv6 unique local addresses fc00::/7.
    Ula,
    /// 224/4, ff00::/8.
    Multicast,
    /// 0.0.0.0, ::.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 198.18/15, 2001:2::/48.
    Benchmarking,
    /// 240/4, 192.0.0/24, 192.88.99/24, and IPv6 space that is not global unicast.
    Reserved,
    /// 0/8 ("this network"; Linux reaches the local host through 0.0.0.0).
    ThisNetwork,
}

impl AddrClass {
    /// Every class, for tables and tests.
    pub const ALL: [AddrClass; 13] = [
        AddrClass::Global,
        AddrClass::Documentation,
        AddrClass::Loopback,
        AddrClass::Private,
        AddrClass::LinkLocal,
        AddrClass::Cgnat,
        AddrClass::Ula,
        AddrClass::Multicast,
        AddrClass::Unspecified,
        AddrClass::Broadcast,
        AddrClass::Benchmarking,
        AddrClass::Reserved,
        AddrClass::ThisNetwork,
    ];

    /// Whether a name destination may bind to this class only with `allow_internal`.
    pub fn is_internal(self) -> bool {
        !matches!(self, AddrClass::Global | AddrClass::Documentation)
    }

    /// The class's name, as in deny details and `policy explain`.
    pub fn as_str(self) -> &'static str {
        match self {
            AddrClass::Global => "global",
            AddrClass::Documentation => "documentation",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Cgnat => "cgnat",
            AddrClass::Ula => "ula",
            AddrClass::Multicast => "multicast",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Benchmarking => "benchmarking",
            AddrClass::Reserved => "reserved",
            AddrClass::ThisNetwork => "this-network",
        }
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an IPv6 address carries an IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Embedding {
    /// ::ffff:0:0/96.
    V4Mapped,
    /// ::/96 (deprecated).
    V4Compatible,
    /// ::ffff:0:0:0/96 (SIIT, RFC 2765).
    V4Translated,
    /// 64:ff9b::/96 (RFC 6052).
    Nat64,
    /// 2002::/16: the IPv4 address is bits 16..48.
    SixToFour,
    /// 2001::/32: the client's IPv4 address is the last 32 bits, inverted.
    Teredo,
}

impl Embedding {
    /// The form's name and prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Embedding::V4Mapped => "IPv4-mapped ::ffff:0:0/96",
            Embedding::V4Compatible => "IPv4-compatible ::/96",
            Embedding::V4Translated => "IPv4-translated ::ffff:0:0:0/96",
            Embedding::Nat64 => "NAT64 64:ff9b::/96",
            Embedding::SixToFour => "6to4 2002::/16",
            Embedding::Teredo => "Teredo 2001::/32",
        }
    }
}

/// An address's class, and the IPv4 address it was classified by if it carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Classified {
    /// The class.
    pub class: AddrClass,
    /// The embedded IPv4 address and how it is embedded.
    pub embedded: Option<(Embedding, Ipv4Addr)>,
    /// Whether this is a well-known cloud metadata service address.
    pub metadata: bool,
}

impl Classified {
    /// Whether the class is internal.
    pub fn is_internal(&self) -> bool {
        self.class.is_internal()
    }
}

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.class.as_str())?;
        if self.metadata {
            f.write_str(", cloud metadata service")?;
        }
        if let Some((how, v4)) = self.embedded {
            write!(f, ", IPv4 {v4} in {}", how.as_str())?;
        }
        Ok(())
    }
}

/// Classifies `ip`.
pub fn classify(ip: IpAddr) -> Classified {
    match ip {
        IpAddr::V4(v4) => Classified {
            class: classify_v4(v4),
            embedded: None,
            metadata: is_metadata_v4(v4),
        },
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some((how, v4)) => Classified {
                class: classify_v4(v4),
                embedded: Some((how, v4)),
                metadata: is_metadata_v4(v4),
            },
            None => Classified {
                class: classify_v6(v6),
                embedded: None,
                // AWS's IPv6 instance metadata service (a ULA).
                metadata: v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
            },
        },
    }
}

fn is_metadata_v4(v4: Ipv4Addr) -> bool {
    // 169.254.169.254: AWS, GCP, Azure, OpenStack; 100.100.100.200: Alibaba Cloud.
    v4 == Ipv4Addr::new(169, 254, 169, 254) || v4 == Ipv4Addr::new(100, 100, 100, 200)
}

/// Whether `v` lies in `net/prefix` (IPv4).
fn in4(v: u32, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    v & mask == u32::from_be_bytes(net)
}

/// Whether `v` lies in `net/prefix` (IPv6).
fn in6(v: u128, net: u128, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    v & mask == net
}

/// The class of an IPv4 address.
pub fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let v = u32::from(ip);
    if ip == Ipv4Addr::BROADCAST {
        AddrClass::Broadcast
    } else if ip == Ipv4Addr::UNSPECIFIED {
        AddrClass::Unspecified
    } else if in4(v, [0, 0, 0, 0], 8) {
        AddrClass::ThisNetwork
    } else if in4(v, [127, 0, 0, 0], 8) {
        AddrClass::Loopback
    } else if in4(v, [10, 0, 0, 0], 8)
        || in4(v, [172, 16, 0, 0], 12)
        || in4(v, [192, 168, 0, 0], 16)
    {
        AddrClass::Private
    } else if in4(v, [100, 64, 0, 0], 10) {
        AddrClass::Cgnat
    } else if in4(v, [169, 254, 0, 0], 16) {
        AddrClass::LinkLocal
    } else if in4(v, [192, 0, 2, 0], 24)
        || in4(v, [198, 51, 100, 0], 24)
        || in4(v, [203, 0, 113, 0], 24)
    {
        AddrClass::Documentation
    } else if in4(v, [198, 18, 0, 0], 15) {
        AddrClass::Benchmarking
    } else if in4(v, [224, 0, 0, 0], 4) {
        AddrClass::Multicast
    } else if in4(v, [240, 0, 0, 0], 4) {
        AddrClass::Reserved
    } else if in4(v, [192, 0, 0, 0], 24) {
        // IETF protocol assignments; 192.0.0.9 (PCP anycast) and 192.0.0.10 (TURN anycast)
        // are globally reachable.
        if ip == Ipv4Addr::new(192, 0, 0, 9) || ip == Ipv4Addr::new(192, 0, 0, 10) {
            AddrClass::Global
        } else {
            AddrClass::Reserved
        }
    } else if in4(v, [192, 88, 99, 0], 24) {
        // The deprecated 6to4 relay anycast (RFC 7526).
        AddrClass::Reserved
    } else {
        AddrClass::Global
    }
}

/// The IPv4 address an IPv6 address carries, if it is one of the embedding forms.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<(Embedding, Ipv4Addr)> {
    let v = u128::from(ip);
    let low = Ipv4Addr::from(v as u32);
    if ip.is_unspecified() || ip.is_loopback() {
        None
    } else if in6(v, 0xffff_0000_0000, 96) {
        Some((Embedding::V4Mapped, low))
    } else if in6(v, 0, 96) {
        Some((Embedding::V4Compatible, low))
    } else if in6(v, 0xffff_0000_0000_0000, 96) {
        Some((Embedding::V4Translated, low))
    } else if in6(v, 0x0064_ff9b << 96, 96) {
        Some((Embedding::Nat64, low))
    } else if in6(v, 0x2002 << 112, 16) {
        Some((Embedding::SixToFour, Ipv4Addr::from((v >> 80) as u32)))
    } else if in6(v, 0x2001_0000 << 96, 32) {
        Some((Embedding::Teredo, Ipv4Addr::from(!(v as u32))))
    } else {
        None
    }
}

/// The class of an IPv6 address that carries no IPv4 address.
fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let v = u128::from(ip);
    let p = |net: [u16; 8], prefix: u32| in6(v, u128::from(Ipv6Addr::from(net)), prefix);
    if ip.is_unspecified() {
        AddrClass::Unspecified
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if p([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32) || p([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20) {
        AddrClass::Documentation
    } else if p([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48) {
        AddrClass::Benchmarking
    } else if p([0x2001, 0, 0, 0, 0, 0, 0, 0], 23) {
        // IETF protocol assignments (Teredo, 2001::/32, is embedded above); these are
        // the globally reachable ones.
        let global = [1, 2, 3]
            .iter()
            .any(|&n| ip == Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, n))
            || p([0x2001, 0x3, 0, 0, 0, 0, 0, 0], 32)
            || p([0x2001, 0x4, 0x112, 0, 0, 0, 0, 0], 48)
            || p([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28);
        if global {
            AddrClass::Global
        } else {
            AddrClass::Reserved
        }
    } else if p([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7) {
        AddrClass::Ula
    } else if p([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10) {
        AddrClass::LinkLocal
    } else if p([0xff00, 0, 0, 0, 0, 0, 0, 0], 8) {
        AddrClass::Multicast
    } else if p([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16) {
        // SRv6 SIDs (RFC 9602).
        AddrClass::Reserved
    } else if p([0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        AddrClass::Global
    } else {
        // Everything outside global unicast 2000::/3: site-local fec0::/10, discard-only
        // 100::/64, local-use NAT64 64:ff9b:1::/48 and unallocated space.
        AddrClass::Reserved
    }
}

/// An address range `addr/prefix` with the host bits clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A range; the caller has checked the prefix length and host bits.
    pub(crate) fn new(addr: IpAddr, prefix: u8) -> Self {
        match (addr, addr.to_canonical()) {
            (IpAddr::V6(_), IpAddr::V4(v4)) if prefix >= 96 => Cidr {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            },
            _ => Cidr { addr, prefix },
        }
    }

    /// Whether `ip` (IPv4-mapped IPv6 compares as IPv4) lies in the range. An address
    /// matches as written: `allow_internal: [127.0.0.0/8]` does not cover
    /// `64:ff9b::7f00:1`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                in4(u32::from(ip), net.octets(), u32::from(self.prefix))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                in6(u128::from(ip), u128::from(net), u32::from(self.prefix))
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which internal addresses a name destination may bind to (`allow_internal`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowInternal {
    /// None (the default): only global and documentation addresses.
    #[default]
    No,
    /// `allow_internal: true`: any address the name resolves to.
    All,
    /// `allow_internal: [CIDR, …]`: internal addresses inside these ranges.
    Ranges(Vec<Cidr>),
}

/// Why a name destination may or may not bind to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not internal.
    Allowed,
    /// Internal, and `allow_internal` permits it.
    AllowedInternal,
    /// Internal and not permitted.
    InternalDenied,
}

impl Verdict {
    /// Whether the address may be bound.
    pub fn is_allowed(self) -> bool {
        self != Verdict::InternalDenied
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allowed => "allowed",
            Verdict::AllowedInternal => "allowed (allow_internal)",
            Verdict::InternalDenied => "internal, denied",
        })
    }
}

impl AllowInternal {
    /// The verdict on binding a name destination to `ip`, and the address's class.
    pub fn check(&self, ip: IpAddr) -> (Verdict, Classified) {
        let class = classify(ip.to_canonical());
        let verdict = if !class.is_internal() {
            Verdict::Allowed
        } else {
            let permitted = match self {
                AllowInternal::No => false,
                AllowInternal::All => true,
                AllowInternal::Ranges(ranges) => ranges.iter().any(|r| r.contains(ip)),
            };
            if permitted {
                Verdict::AllowedInternal
            } else {
                Verdict::InternalDenied
            }
        };
        (verdict, class)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use AddrClass::*;

    fn class(s: &str) -> AddrClass {
        classify(s.parse().unwrap()).class
    }

    #[test]
    fn ipv4_classes() {
        let table: &[(&str, AddrClass)] = &[
            ("0.0.0.0", Unspecified),
            ("0.0.0.1", ThisNetwork),
            ("0.255.255.255", ThisNetwork),
            ("1.0.0.0", Global),
            ("1.1.1.1", Global),
            ("8.8.8.8", Global),
            ("9.255.255.255", Global),
            ("10.0.0.0", Private),
            ("10.255.255.255", Private),
            ("11.0.0.0", Global),
            ("100.63.255.255", Global),
            ("100.64.0.0", Cgnat),
            ("100.127.255.255", Cgnat),
            ("100.128.0.0", Global),
            ("126.255.255.255", Global),
            ("127.0.0.0", Loopback),
            ("127.0.0.1", Loopback),
            ("127.0.0.31", Loopback),
            ("127.255.255.255", Loopback),
            ("128.0.0.0", Global),
            ("169.253.255.255", Global),
            ("169.254.0.0", LinkLocal),
            ("169.254.169.254", LinkLocal),
            ("169.254.255.255", LinkLocal),
            ("169.255.0.0", Global),
            ("172.15.255.255", Global),
            ("172.16.0.0", Private),
            ("172.31.255.255", Private),
            ("172.32.0.0", Global),
            ("192.0.0.0", Reserved),
            ("192.0.0.8", Reserved),
            ("192.0.0.9", Global),
            ("192.0.0.10", Global),
            ("192.0.0.255", Reserved),
            ("192.0.1.255", Global),
            ("192.0.2.0", Documentation),
            ("192.0.2.255", Documentation),
            ("192.0.3.0", Global),
            ("192.88.99.1", Reserved),
            ("192.167.255.255", Global),
            ("192.168.0.0", Private),
            ("192.168.255.255", Private),
            ("192.169.0.0", Global),
            ("198.17.255.255", Global),
            ("198.18.0.0", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("198.20.0.0", Global),
            ("198.51.100.7", Documentation),
            ("203.0.113.1", Documentation),
            ("203.0.114.0", Global),
            ("223.255.255.255", Global),
            ("224.0.0.0", Multicast),
            ("239.255.255.255", Multicast),
            ("240.0.0.0", Reserved),
            ("254.255.255.255", Reserved),
            ("255.255.255.254", Reserved),
            ("255.255.255.255", Broadcast),
        ];
        for (ip, want) in table {
            assert_eq!(class(ip), *want, "{ip}");
        }
    }

    #[test]
    fn ipv6_classes() {
        let table: &[(&str, AddrClass)] = &[
            ("::", Unspecified),
            ("::1", Loopback),
            ("2606:4700::1111", Global),
            ("2a00:1450:4001::200e", Global),
            ("2001:db8::1", Documentation),
            ("2001:db8:ffff::1", Documentation),
            ("3fff::1", Documentation),
            ("3fff:fff::1", Documentation),
            ("2001:2::1", Benchmarking),
            ("2001:2:0:ffff::1", Benchmarking),
            ("2001:1::1", Global),
            ("2001:1::4", Reserved),
            ("2001:3::1", Global),
            ("2001:4:112::1", Global),
            ("2001:10::1", Reserved),
            ("2001:20::1", Global),
            ("2001:200::1", Global),
            ("fc00::1", Ula),
            ("fd00::1", Ula),
            ("fdff:ffff::1", Ula),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", Reserved),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("100::1", Reserved),
            ("64:ff9b:1::1", Reserved),
            ("5f00::1", Reserved),
            ("4000::1", Reserved),
            ("1fff::1", Reserved),
            ("3ffe::1", Global),
        ];
        for (ip, want) in table {
            assert_eq!(class(ip), *want, "{ip}");
        }
    }

    #[test]
    fn embedded_ipv4_is_classified_by_the_ipv4() {
        let table: &[(&str, Embedding, &str, AddrClass)] = &[
            (
                "::ffff:127.0.0.31",
                Embedding::V4Mapped,
                "127.0.0.31",
                Loopback,
            ),
            ("::ffff:8.8.8.8", Embedding::V4Mapped, "8.8.8.8", Global),
            (
                "::ffff:169.254.169.254",
                Embedding::V4Mapped,
                "169.254.169.254",
                LinkLocal,
            ),
            (
                "::127.0.0.1",
                Embedding::V4Compatible,
                "127.0.0.1",
                Loopback,
            ),
            ("::10.1.2.3", Embedding::V4Compatible, "10.1.2.3", Private),
            ("::0.0.0.2", Embedding::V4Compatible, "0.0.0.2", ThisNetwork),
            (
                "::ffff:0:192.168.1.1",
                Embedding::V4Translated,
                "192.168.1.1",
                Private,
            ),
            ("64:ff9b::7f00:1", Embedding::Nat64, "127.0.0.1", Loopback),
            (
                "64:ff9b::a9fe:a9fe",
                Embedding::Nat64,
                "169.254.169.254",
                LinkLocal,
            ),
            ("64:ff9b::808:808", Embedding::Nat64, "8.8.8.8", Global),
            (
                "64:ff9b::c633:6407",
                Embedding::Nat64,
                "198.51.100.7",
                Documentation,
            ),
            ("2002:7f00:1::", Embedding::SixToFour, "127.0.0.1", Loopback),
            (
                "2002:a00:1:1234::5",
                Embedding::SixToFour,
                "10.0.0.1",
                Private,
            ),
            ("2002:6440:1::1", Embedding::SixToFour, "100.64.0.1", Cgnat),
            ("2002:808:808::1", Embedding::SixToFour, "8.8.8.8", Global),
            // Teredo: server 65.54.227.120, client 127.0.0.1 (inverted: 80ff:fffe).
            (
                "2001:0:4136:e378:8000:63bf:80ff:fffe",
                Embedding::Teredo,
                "127.0.0.1",
                Loopback,
            ),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                Embedding::Teredo,
                "192.0.2.45",
                Documentation,
            ),
            (
                "2001:0:4136:e378::5fff:fffe",
                Embedding::Teredo,
                "160.0.0.1",
                Global,
            ),
            ("2001::f5ff:fffe", Embedding::Teredo, "10.0.0.1", Private),
        ];
        for (ip, how, v4, want) in table {
            let c = classify(ip.parse().unwrap());
            assert_eq!(c.class, *want, "{ip}");
            assert_eq!(c.embedded, Some((*how, v4.parse().unwrap())), "{ip}");
        }
        assert_eq!(classify("::1".parse().unwrap()).embedded, None);
        assert_eq!(classify("::".parse().unwrap()).embedded, None);
        assert_eq!(classify("2001:db8::1".parse().unwrap()).embedded, None);
    }

    #[test]
    fn internal_classes() {
        let internal: Vec<&str> = AddrClass::ALL
            .iter()
            .filter(|c| c.is_internal())
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            internal,
            [
                "loopback",
                "private",
                "link-local",
                "cgnat",
                "ula",
                "multicast",
                "unspecified",
                "broadcast",
                "benchmarking",
                "reserved",
                "this-network"
            ]
        );
        assert!(!Global.is_internal());
        assert!(!Documentation.is_internal());
    }

    #[test]
    fn display_names_the_embedding_and_metadata() {
        let c = |s: &str| classify(s.parse().unwrap()).to_string();
        assert_eq!(c("127.0.0.1"), "loopback");
        assert_eq!(c("169.254.169.254"), "link-local, cloud metadata service");
        assert_eq!(
            c("64:ff9b::7f00:1"),
            "loopback, IPv4 127.0.0.1 in NAT64 64:ff9b::/96"
        );
        assert_eq!(c("fd00:ec2::254"), "ula, cloud metadata service");
    }

    #[test]
    fn allow_internal_verdicts() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let no = AllowInternal::No;
        assert_eq!(no.check(ip("127.0.0.1")).0, Verdict::InternalDenied);
        assert_eq!(no.check(ip("::ffff:10.0.0.1")).0, Verdict::InternalDenied);
        assert_eq!(no.check(ip("198.51.100.7")).0, Verdict::Allowed);
        assert_eq!(no.check(ip("1.1.1.1")).0, Verdict::Allowed);
        let all = AllowInternal::All;
        assert_eq!(all.check(ip("127.0.0.1")).0, Verdict::AllowedInternal);
        assert_eq!(all.check(ip("1.1.1.1")).0, Verdict::Allowed);
        let ranges = AllowInternal::Ranges(vec![
            Cidr::new(ip("127.0.0.0"), 8),
            Cidr::new(ip("fd00::"), 8),
        ]);
        assert_eq!(ranges.check(ip("127.0.0.1")).0, Verdict::AllowedInternal);
        assert_eq!(
            ranges.check(ip("::ffff:127.0.0.9")).0,
            Verdict::AllowedInternal
        );
        assert_eq!(ranges.check(ip("10.0.0.1")).0, Verdict::InternalDenied);
        assert_eq!(ranges.check(ip("fd00::5")).0, Verdict::AllowedInternal);
        assert_eq!(ranges.check(ip("fc00::5")).0, Verdict::InternalDenied);
        // An embedded address matches only a range written for its IPv6 form.
        assert_eq!(
            ranges.check(ip("64:ff9b::7f00:1")).0,
            Verdict::InternalDenied
        );
        // A range written as IPv4-mapped IPv6 is the IPv4 range.
        let mapped = Cidr::new(ip("::ffff:10.0.0.0"), 104);
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains(ip("10.9.9.9")));
    }
}
