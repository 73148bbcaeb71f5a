//! Address ranges as the operator writes them: [`Cidr`] (allow/deny rules, `trusted_proxies`,
//! `sluicectl allow|deny`), and how an IPv4-mapped IPv6 address or range compares
//! ([`canonical`], [`canonical_range`]). Plain data under both the configuration and the
//! admission lists ([`crate::admission`]), so neither has to import the other for it.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

/// An IPv4-mapped IPv6 address (a v4 client on a dual-stack socket) as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A range written in IPv4-mapped IPv6 (`::ffff:a.b.c.d/len`, `len` from 96 to 128) as the IPv4
/// range it is (`a.b.c.d/len-96`); any other range as written. Client addresses are compared
/// as IPv4 ([`canonical`]), so every rule side (allow/deny, `trusted_proxies`) goes through
/// this too, or a `::ffff:` rule would match no client. A shorter IPv6 range (`::/0`) stays
/// IPv6 and matches IPv6 clients only.
pub(crate) fn canonical_range(addr: IpAddr, len: u8) -> (IpAddr, u8) {
    match addr {
        IpAddr::V6(a) if (96..=128).contains(&len) => match a.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), len - 96),
            None => (addr, len),
        },
        _ => (addr, len),
    }
}

/// A client address range (an [`IpNet`] with its host bits zero, an IPv4-mapped range as the
/// IPv4 one: see [`canonical_range`]). Written as text (config, `sluicectl`), a range with host
/// bits set is refused (`10.1.2.3/8` is a typo for a host or for `10.0.0.0/8`; neither is
/// guessed); a bare address is that one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr(IpNet);

/// Why text is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CidrError(String);

impl Cidr {
    /// `addr/prefix_len` with its host bits cleared (for ranges that come from a map or are
    /// computed; text goes through `FromStr`, which refuses host bits); fails if the prefix
    /// is longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let (addr, prefix_len) = canonical_range(addr, prefix_len);
        IpNet::new(addr, prefix_len)
            .map(|n| Cidr(n.trunc()))
            .map_err(|_| {
                CidrError(format!(
                    "an {} prefix is at most {} bits",
                    if addr.is_ipv4() { "ipv4" } else { "ipv6" },
                    if addr.is_ipv4() { 32 } else { 128 }
                ))
            })
    }

    /// The network address (host bits zero).
    pub(crate) fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    /// How many leading bits of [`Cidr::addr`] count.
    pub(crate) fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }
}

/// `ADDRESS/PREFIX` without host bits, or a bare address meaning exactly that address.
impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match s.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(CidrError(
                        "expected ADDRESS or ADDRESS/PREFIX (a prefix of at most 32 bits for \
                         IPv4, 128 for IPv6)"
                            .into(),
                    ));
                }
            },
        };
        if let Some(why) = host_bits(&net) {
            return Err(CidrError(why));
        }
        Cidr::new(net.addr(), net.prefix_len())
    }
}

/// Why a range written with host bits set (`10.1.2.3/8`) is refused, naming the range it would
/// be; None when it has none. Every place a range is read from text asks this.
pub(crate) fn host_bits(net: &IpNet) -> Option<String> {
    (net.trunc() != *net).then(|| {
        format!(
            "`{net}` has host bits set (the range is {}): write the network address, or the \
             single host as /{}",
            net.trunc(),
            net.max_prefix_len()
        )
    })
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a CIDR ({e})")))
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix_len())
    }
}
