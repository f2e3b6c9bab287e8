//! A DHCP server for one NIC, inside the VMM, as OVN's native DHCP does:
//! the guest's DISCOVER and REQUEST never leave the VMM, and the answer
//! carries the address the controllers' IPAM gave this NIC and nothing else.
//!
//! Why not a dnsmasq per network per host: a DHCP server needs an address
//! of its own in the tenant subnet, and a network spans hosts over VXLAN,
//! so every host's server would share one segment. Each would need a
//! different address taken from the tenant's range, all of them would
//! answer every DISCOVER, and the host would sit on a tenant network it
//! should not be reachable from. Answering in the VMM needs no address,
//! no process per network, and cannot hand a lease to the wrong guest: only
//! this NIC's MAC is served.
//!
//! Leases are infinite (the address is the NIC's until it is deleted), so
//! a guest never renews to a server address it would first have to ARP.
//! Server replies the guest sends, and ones that reach it from the network
//! (a rogue server on the tenant segment), are dropped.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// What one NIC's guest is told: its address and network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub address: Ipv4Addr,
    /// Prefix length of the network (24 for a /24).
    pub prefix: u8,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Offered as option 12; a DNS label.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// The source MAC of replies: locally administered, unicast, not a NIC's.
pub const SERVER_MAC: [u8; 6] = [0x02, 0xba, 0x5a, 0x17, 0x00, 0x01];
const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
const ETH: usize = 14;
const BOOTP: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// What BOOTP relays and old clients expect at least (RFC 1542).
const MIN_BOOTP_LEN: usize = 300;

pub(crate) const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const DECLINE: u8 = 4;
const ACK: u8 = 5;
const NAK: u8 = 6;
const RELEASE: u8 = 7;
const INFORM: u8 = 8;

pub fn valid_hostname(h: &str) -> bool {
    (1..=63).contains(&h.len())
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

impl Lease {
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0))
    }

    /// The address that names this server in its replies (option 54): the
    /// gateway, or else the network's own address, which no guest holds.
    pub fn server_id(&self) -> Ipv4Addr {
        self.gateway.unwrap_or(Ipv4Addr::from(u32::from(self.address) & u32::from(self.mask())))
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.prefix) {
            return Err(format!("DHCP prefix /{} must be between 1 and 32", self.prefix));
        }
        let (a, m) = (u32::from(self.address), u32::from(self.mask()));
        if self.address.is_unspecified() || self.address.is_broadcast() || self.address.is_multicast() {
            return Err(format!("DHCP address {} is not a host address", self.address));
        }
        if self.prefix <= 30 && (a & !m == 0 || a & !m == !m) {
            return Err(format!("DHCP address {} is the network's or its broadcast address", self.address));
        }
        if let Some(g) = self.gateway {
            if u32::from(g) & m != a & m || g == self.address {
                return Err(format!("DHCP gateway {g} must be another address in {}/{}", self.address, self.prefix));
            }
        }
        if let Some(h) = self.hostname.as_deref().filter(|h| !valid_hostname(h)) {
            return Err(format!("DHCP hostname {h:?} must be 1 to 63 letters, digits or inner '-'"));
        }
        Ok(())
    }
}

/// What became of a frame the guest sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not DHCP: it goes to the network.
    Forward,
    /// DHCP, answered: this Ethernet frame goes back to the guest.
    Reply(Vec<u8>),
    /// DHCP that gets no answer (a RELEASE, another client's MAC, a
    /// malformed message, a server reply): it goes nowhere.
    Drop(&'static str),
}

/// The DHCP server of one NIC.
#[derive(Debug, Clone)]
pub struct Server {
    lease: Lease,
    client: [u8; 6],
    mtu: Option<u16>,
}

/// The UDP ports of an IPv4 frame without fragments and its payload's offset.
fn udp(frame: &[u8]) -> Option<(u16, u16, usize)> {
    if frame.len() < ETH + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 17 || ip.len() < ihl + 8 {
        return None;
    }
    // A later fragment has no UDP header; a first one is not DHCP's.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let u = &ip[ihl..];
    Some((u16::from_be_bytes([u[0], u[1]]), u16::from_be_bytes([u[2], u[3]]), ETH + ihl + 8))
}

/// A DHCP server's reply (UDP from port 67 to 68), as a rogue server on
/// the network would send one.
pub fn is_server_reply(frame: &[u8]) -> bool {
    matches!(udp(frame), Some((SERVER_PORT, CLIENT_PORT, _)))
}

/// The options of a BOOTP message: (code, value) for every well-formed one
/// up to the end option. `None` when one runs past the message.
fn options(msg: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut i = BOOTP + MAGIC.len();
    while i < msg.len() {
        match msg[i] {
            0 => i += 1,
            255 => break,
            code => {
                let len = usize::from(*msg.get(i + 1)?);
                let v = msg.get(i + 2..i + 2 + len)?;
                out.push((code, v));
                i += 2 + len;
            }
        }
    }
    Some(out)
}

fn ipv4_of(v: Option<&[u8]>) -> Option<Ipv4Addr> {
    v.and_then(|v| <[u8; 4]>::try_from(v).ok()).map(Ipv4Addr::from)
}

/// The ones' complement sum of RFC 1071, folded.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for p in parts {
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Server {
    /// `lease` must have passed [`Lease::validate`].
    pub fn new(lease: Lease, client: [u8; 6], mtu: Option<u16>) -> Server {
        Server { lease, client, mtu }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Looks at an Ethernet frame the guest sent (without the virtio-net header).
    pub fn handle(&self, frame: &[u8]) -> Verdict {
        let Some((src, dst, at)) = udp(frame) else { return Verdict::Forward };
        if src == SERVER_PORT {
            return Verdict::Drop("a DHCP server reply from the guest");
        }
        if dst != SERVER_PORT {
            return Verdict::Forward;
        }
        let msg = &frame[at..];
        if msg.len() < BOOTP + MAGIC.len()
            || msg[0] != 1
            || msg[1] != 1
            || msg[2] != 6
            || msg[BOOTP..BOOTP + 4] != MAGIC
        {
            return Verdict::Drop("not a DHCP request over Ethernet");
        }
        if msg[28..34] != self.client || frame[6..12] != self.client {
            return Verdict::Drop("a request from or for another MAC than this NIC's");
        }
        let Some(opts) = options(msg) else { return Verdict::Drop("an option runs past the message") };
        let opt = |c: u8| opts.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
        let Some(&[kind]) = opt(53) else { return Verdict::Drop("no DHCP message type") };
        let ciaddr = Ipv4Addr::new(msg[12], msg[13], msg[14], msg[15]);
        let reply = match kind {
            DISCOVER => OFFER,
            REQUEST => {
                if ipv4_of(opt(54)).is_some_and(|s| s != self.lease.server_id()) {
                    return Verdict::Drop("a REQUEST that chose another server");
                }
                let wanted = ipv4_of(opt(50)).unwrap_or(ciaddr);
                if wanted == self.lease.address {
                    ACK
                } else {
                    NAK
                }
            }
            INFORM => ACK,
            DECLINE => return Verdict::Drop("the guest declined its address (another host answers ARP for it?)"),
            RELEASE => return Verdict::Drop("a RELEASE: the address stays the NIC's"),
            _ => return Verdict::Drop("an unknown DHCP message type"),
        };
        Verdict::Reply(self.reply(msg, reply, kind == INFORM, ciaddr))
    }

    fn reply(&self, req: &[u8], kind: u8, inform: bool, ciaddr: Ipv4Addr) -> Vec<u8> {
        let l = &self.lease;
        let sid = l.server_id();
        let mut b = vec![0u8; BOOTP];
        b[0] = 2;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&req[4..8]); // xid
        b[10..12].copy_from_slice(&req[10..12]); // flags
        b[12..16].copy_from_slice(&req[12..16]); // ciaddr
        if kind != NAK && !inform {
            b[16..20].copy_from_slice(&l.address.octets());
        }
        b[28..44].copy_from_slice(&req[28..44]); // chaddr
        b.extend_from_slice(&MAGIC);
        let mut opt = |code: u8, v: &[u8]| {
            b.push(code);
            b.push(v.len() as u8);
            b.extend_from_slice(v);
        };
        opt(53, &[kind]);
        opt(54, &sid.octets());
        if kind != NAK {
            if !inform {
                opt(51, &u32::MAX.to_be_bytes());
            }
            opt(1, &l.mask().octets());
            if let Some(g) = l.gateway {
                opt(3, &g.octets());
            }
            if let Some(m) = self.mtu {
                opt(26, &m.to_be_bytes());
            }
            if let Some(h) = &l.hostname {
                opt(12, h.as_bytes());
            }
        }
        b.push(255);
        if b.len() < MIN_BOOTP_LEN {
            b.resize(MIN_BOOTP_LEN, 0);
        }
        // RFC 2131 §4.1: a client that has an address gets unicast there;
        // one that asked for broadcast (or is told NAK) gets broadcast; else
        // unicast to its MAC and the new address, which it takes raw.
        let broadcast = u16::from_be_bytes([req[10], req[11]]) & 0x8000 != 0;
        let dst = if kind == NAK || (broadcast && ciaddr.is_unspecified()) {
            Ipv4Addr::BROADCAST
        } else if !ciaddr.is_unspecified() {
            ciaddr
        } else {
            l.address
        };
        let udp_len = (8 + b.len()) as u16;
        let mut f = Vec::with_capacity(ETH + 20 + usize::from(udp_len));
        f.extend_from_slice(&self.client);
        f.extend_from_slice(&SERVER_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&sid.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let c = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut u = [0u8; 8];
        u[0..2].copy_from_slice(&SERVER_PORT.to_be_bytes());
        u[2..4].copy_from_slice(&CLIENT_PORT.to_be_bytes());
        u[4..6].copy_from_slice(&udp_len.to_be_bytes());
        let pseudo = [&sid.octets()[..], &dst.octets()[..], &[0, 17], &udp_len.to_be_bytes()].concat();
        let c = match checksum(&[&pseudo, &u, &b]) {
            0 => 0xffff,
            c => c,
        };
        u[6..8].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&u);
        f.extend_from_slice(&b);
        f
    }
}

/// A client's message as udhcpc builds it: broadcast from 0.0.0.0.
#[cfg(test)]
pub(crate) fn request(kind: u8, mac: [u8; 6], extra: &[(u8, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; BOOTP];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    b[28..34].copy_from_slice(&mac);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&[53, 1, kind]);
    for (c, v) in extra {
        b.push(*c);
        b.push(v.len() as u8);
        b.extend_from_slice(v);
    }
    b.push(255);
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + b.len()) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
    f[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    f.extend_from_slice(&SERVER_PORT.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&b);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 10, 0, 7),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 10, 0, 1)),
            hostname: Some("web-1".into()),
        }
    }

    fn reply_of(v: Verdict) -> Vec<u8> {
        match v {
            Verdict::Reply(f) => f,
            other => panic!("no reply: {other:?}"),
        }
    }

    fn opts_of(f: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let (_, _, at) = udp(f).expect("udp");
        options(&f[at..]).expect("options").into_iter().map(|(c, v)| (c, v.to_vec())).collect()
    }

    #[test]
    fn discover_and_request_get_the_ipam_address_with_valid_checksums() {
        let s = Server::new(lease(), MAC, Some(1450));
        let offer = reply_of(s.handle(&request(DISCOVER, MAC, &[])));
        assert_eq!(&offer[..6], &MAC, "to the client's MAC");
        assert_eq!(&offer[6..12], &SERVER_MAC);
        assert_eq!(checksum(&[&offer[ETH..ETH + 20]]), 0, "IP header checksum");
        let (src, dst, at) = udp(&offer).expect("udp");
        assert_eq!((src, dst), (67, 68));
        let ip_dst = Ipv4Addr::new(offer[30], offer[31], offer[32], offer[33]);
        assert_eq!(ip_dst, Ipv4Addr::new(10, 10, 0, 7), "unicast to the new address");
        let udp_len = (offer.len() - ETH - 20) as u16;
        let pseudo = [&offer[26..34], &[0, 17], &udp_len.to_be_bytes()[..]].concat();
        assert_eq!(checksum(&[&pseudo, &offer[ETH + 20..]]), 0, "UDP checksum");
        let msg = &offer[at..];
        assert!(msg.len() >= MIN_BOOTP_LEN);
        assert_eq!(&msg[4..8], &[0xde, 0xad, 0xbe, 0xef], "xid echoed");
        assert_eq!(&msg[16..20], &[10, 10, 0, 7], "yiaddr");
        let o = opts_of(&offer);
        for want in [
            (53, vec![OFFER]),
            (54, vec![10, 10, 0, 1]),
            (51, vec![0xff; 4]),
            (1, vec![255, 255, 255, 0]),
            (3, vec![10, 10, 0, 1]),
            (26, 1450u16.to_be_bytes().to_vec()),
            (12, b"web-1".to_vec()),
        ] {
            assert!(o.contains(&want), "option {want:?} in {o:?}");
        }
        let ack = reply_of(s.handle(&request(REQUEST, MAC, &[(50, &[10, 10, 0, 7]), (54, &[10, 10, 0, 1])])));
        assert!(opts_of(&ack).contains(&(53, vec![ACK])));
        // Another address asked for: NAK, broadcast, no address in it.
        let nak = reply_of(s.handle(&request(REQUEST, MAC, &[(50, &[10, 10, 0, 8])])));
        assert!(opts_of(&nak).contains(&(53, vec![NAK])));
        assert_eq!(&nak[30..34], &[255; 4]);
        let (_, _, at) = udp(&nak).expect("udp");
        assert_eq!(&nak[at + 16..at + 20], &[0; 4]);
    }

    #[test]
    fn without_a_gateway_the_network_address_names_the_server() {
        let s = Server::new(Lease { gateway: None, hostname: None, ..lease() }, MAC, None);
        let o = opts_of(&reply_of(s.handle(&request(DISCOVER, MAC, &[]))));
        assert!(o.contains(&(54, vec![10, 10, 0, 0])));
        assert!(!o.iter().any(|(c, _)| [3, 26, 12].contains(c)), "{o:?}");
    }

    #[test]
    fn other_traffic_passes_and_abuse_gets_no_answer() {
        let s = Server::new(lease(), MAC, None);
        let mut dns = request(DISCOVER, MAC, &[]);
        dns[ETH + 22..ETH + 24].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(s.handle(&dns), Verdict::Forward);
        assert_eq!(s.handle(&[0u8; 60]), Verdict::Forward, "not IPv4");
        let other_mac = [0x52, 0x54, 0, 0, 0, 9];
        assert!(matches!(s.handle(&request(DISCOVER, other_mac, &[])), Verdict::Drop(_)));
        // This NIC's chaddr from another source MAC: not this NIC's client.
        let mut spoofed = request(DISCOVER, MAC, &[]);
        spoofed[6..12].copy_from_slice(&other_mac);
        assert!(matches!(s.handle(&spoofed), Verdict::Drop(_)));
        let mut rogue = request(DISCOVER, MAC, &[]);
        rogue[ETH + 20..ETH + 24].copy_from_slice(&[0, 67, 0, 68]);
        assert!(matches!(s.handle(&rogue), Verdict::Drop(_)));
        assert!(is_server_reply(&rogue));
        assert!(matches!(s.handle(&request(RELEASE, MAC, &[])), Verdict::Drop(_)));
        assert!(matches!(s.handle(&request(REQUEST, MAC, &[(54, &[10, 10, 0, 99])])), Verdict::Drop(_)));
        // An option whose length runs past the end; a message cut short.
        let mut bad = request(DISCOVER, MAC, &[]);
        let end = bad.len() - 1;
        bad[end] = 61;
        bad.push(200);
        assert!(matches!(s.handle(&bad), Verdict::Drop(_)));
        let short = &request(DISCOVER, MAC, &[])[..ETH + 28 + 100];
        assert!(matches!(s.handle(short), Verdict::Drop(_)));
        // Every cut of a good message: never a panic.
        let full = request(REQUEST, MAC, &[(50, &[10, 10, 0, 7])]);
        for n in 0..full.len() {
            let _ = s.handle(&full[..n]);
        }
    }

    #[test]
    fn leases_are_checked() {
        assert!(lease().validate().is_ok());
        for (bad, why) in [
            (Lease { prefix: 0, ..lease() }, "prefix"),
            (Lease { prefix: 33, ..lease() }, "prefix"),
            (Lease { address: Ipv4Addr::new(10, 10, 0, 0), ..lease() }, "network"),
            (Lease { address: Ipv4Addr::new(10, 10, 0, 255), ..lease() }, "broadcast"),
            (Lease { gateway: Some(Ipv4Addr::new(10, 11, 0, 1)), ..lease() }, "gateway"),
            (Lease { gateway: Some(Ipv4Addr::new(10, 10, 0, 7)), ..lease() }, "gateway"),
            (Lease { hostname: Some("a_b".into()), ..lease() }, "hostname"),
            (Lease { hostname: Some("-a".into()), ..lease() }, "hostname"),
        ] {
            let e = bad.validate().expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }
}
