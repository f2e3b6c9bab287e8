//! Tenant networks: an IPv4 subnet carried between hosts on a VXLAN segment
//! (its VNI), and the addresses the controllers hand out on it. IPAM lives
//! in the replicated state: a VM's NICs get their MAC and IP when the VM is
//! created and give them back when it is deleted, so no address is ever
//! handed out twice, whichever controller leads.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::names::validate_name;
use crate::error::{invalid, CommandError};

/// Smallest and largest subnets: a /16 is 65534 addresses, a /29 six.
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 29;
/// VXLAN's 24-bit segment id (0 is not used).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Where VNIs the controllers pick start (below: left to operators).
pub const FIRST_AUTO_VNI: u32 = 1000;
pub const MAX_NICS_PER_VM: usize = 8;
/// Locally administered, unicast: no vendor's range. The low three bytes
/// count up and are never reused.
const MAC_PREFIX: [u8; 3] = [0x02, 0xba, 0x5a];
pub const MAX_MACS: u32 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    /// The subnet's address and prefix length.
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub vni: u32,
    /// Reserved: never handed to a NIC.
    pub gateway: Option<Ipv4Addr>,
    pub created_revision: u64,
}

/// What `network create` asks for; the state machine fills in the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRequest {
    pub name: String,
    pub cidr: String,
    /// None: the lowest free VNI from [`FIRST_AUTO_VNI`].
    pub vni: Option<u32>,
    pub gateway: Gateway,
}

/// Which address a network reserves for its router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gateway {
    /// The subnet's first host address.
    First,
    None,
    At(String),
}

/// A NIC as a VM spec asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub network: String,
    /// None: the controllers pick one.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
}

/// What a NIC was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAddress {
    pub network: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

fn mask(prefix: u8) -> u32 {
    u32::MAX << (32 - u32::from(prefix))
}

impl Network {
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix)
    }

    fn base(&self) -> u32 {
        u32::from(self.address)
    }

    fn broadcast(&self) -> u32 {
        self.base() | !mask(self.prefix)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == self.base()
    }

    /// Host addresses (neither the subnet's nor its broadcast address).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        (self.base() + 1..self.broadcast()).map(Ipv4Addr::from)
    }

    pub fn overlaps(&self, o: &Network) -> bool {
        let p = self.prefix.min(o.prefix);
        u32::from(self.address) & mask(p) == u32::from(o.address) & mask(p)
    }

    /// Why `ip` cannot be a NIC's address here, if it cannot (taken or not
    /// is the state machine's business).
    pub fn refuse_host(&self, ip: Ipv4Addr) -> Option<String> {
        let what = format!("network {} ({})", self.name, self.cidr());
        if !self.contains(ip) {
            Some(format!("{ip} is outside {what}"))
        } else if u32::from(ip) == self.base() || u32::from(ip) == self.broadcast() {
            Some(format!("{ip} is the subnet or broadcast address of {what}"))
        } else if self.gateway == Some(ip) {
            Some(format!("{ip} is the gateway of {what}"))
        } else {
            None
        }
    }
}

/// `10.10.0.0/24`: a subnet's address (host bits zero) and a prefix from
/// [`MIN_PREFIX`] to [`MAX_PREFIX`].
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), CommandError> {
    let bad = || invalid(format!("CIDR {s:?} must be an IPv4 subnet like 10.10.0.0/24"));
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
        return Err(invalid(format!("CIDR {s}: prefix /{prefix} must be between /{MIN_PREFIX} and /{MAX_PREFIX}")));
    }
    let net = u32::from(address) & mask(prefix);
    if net != u32::from(address) {
        return Err(invalid(format!(
            "CIDR {s} has host bits set: the subnet is {}/{prefix}",
            Ipv4Addr::from(net)
        )));
    }
    if address.is_loopback() || address.is_multicast() || address.is_unspecified() || address.is_broadcast() {
        return Err(invalid(format!("CIDR {s} is not a unicast subnet")));
    }
    Ok((address, prefix))
}

impl NetworkRequest {
    /// The network this request describes, with `vni` decided and the
    /// gateway checked; overlaps and VNIs in use are the state machine's.
    pub fn build(&self, vni: u32, rev: u64) -> Result<Network, CommandError> {
        validate_name("network", &self.name)?;
        let what = format!("network {}", self.name);
        let (address, prefix) = parse_cidr(&self.cidr).map_err(|e| invalid(format!("{what}: {}", e.message())))?;
        if vni == 0 || vni > MAX_VNI {
            return Err(invalid(format!("{what}: VNI {vni} must be between 1 and {MAX_VNI}")));
        }
        let mut n = Network { name: self.name.clone(), address, prefix, vni, gateway: None, created_revision: rev };
        n.gateway = match &self.gateway {
            Gateway::First => n.hosts().next(),
            Gateway::None => None,
            Gateway::At(g) => {
                let ip: Ipv4Addr =
                    g.parse().map_err(|_| invalid(format!("{what}: gateway {g:?} is not an IPv4 address")))?;
                if let Some(why) = n.refuse_host(ip) {
                    return Err(invalid(format!("{what}: gateway {why}")));
                }
                Some(ip)
            }
        };
        Ok(n)
    }
}

/// The `n`th MAC the controllers hand out.
pub fn mac(n: u32) -> String {
    let b = n.to_be_bytes();
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", MAC_PREFIX[0], MAC_PREFIX[1], MAC_PREFIX[2], b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cidr: &str, gateway: Option<Option<&str>>) -> NetworkRequest {
        let gateway = match gateway {
            None => Gateway::First,
            Some(None) => Gateway::None,
            Some(Some(g)) => Gateway::At(g.into()),
        };
        NetworkRequest { name: "blue".into(), cidr: cidr.into(), vni: None, gateway }
    }

    #[test]
    fn subnets_gateways_and_macs_are_checked() {
        let n = req("10.10.0.0/24", None).build(1000, 1).expect("network");
        assert_eq!((n.cidr(), n.gateway), ("10.10.0.0/24".into(), Some(Ipv4Addr::new(10, 10, 0, 1))));
        assert_eq!(n.hosts().count(), 254);
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(n.refuse_host(Ipv4Addr::new(10, 10, 0, 1)).is_some_and(|w| w.contains("gateway")));
        assert!(n.refuse_host(Ipv4Addr::new(10, 10, 0, 255)).is_some_and(|w| w.contains("broadcast")));
        assert!(n.refuse_host(Ipv4Addr::new(10, 10, 1, 5)).is_some_and(|w| w.contains("outside")));
        assert_eq!(n.refuse_host(Ipv4Addr::new(10, 10, 0, 7)), None);
        let wide = req("10.10.0.0/16", Some(None)).build(1001, 1).expect("network");
        assert!(wide.overlaps(&n) && n.overlaps(&wide) && wide.gateway.is_none());
        let other = req("10.10.1.0/24", Some(Some("10.10.1.254"))).build(1002, 1).expect("network");
        assert!(!other.overlaps(&n));
        for (cidr, needle) in [
            ("10.10.0.5/24", "host bits set: the subnet is 10.10.0.0/24"),
            ("10.10.0.0/8", "between /16 and /29"),
            ("10.10.0.0/30", "between /16 and /29"),
            ("10.10.0.0", "IPv4 subnet"),
            ("fd00::/64", "IPv4 subnet"),
            ("127.0.0.0/24", "not a unicast subnet"),
        ] {
            let e = req(cidr, None).build(1000, 1).expect_err(cidr);
            assert!(e.message().contains(needle), "{cidr}: {e}");
        }
        let e = req("10.10.0.0/24", Some(Some("10.10.1.1"))).build(1000, 1).expect_err("gateway outside");
        assert!(e.message().contains("gateway 10.10.1.1 is outside"), "{e}");
        assert!(req("10.10.0.0/24", None).build(0, 1).is_err() && req("10.10.0.0/24", None).build(MAX_VNI + 1, 1).is_err());
        // Requests travel through Raft as JSON: every gateway choice survives it.
        for g in [None, Some(None), Some(Some("10.10.0.9"))] {
            let r = req("10.10.0.0/24", g);
            let back: NetworkRequest = serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("json");
            assert_eq!(back, r);
        }
        assert_eq!(mac(0), "02:ba:5a:00:00:00");
        assert_eq!(mac(0x01_0203), "02:ba:5a:01:02:03");
    }
}
