//! virtio-net driven the way Linux drives it: through the MMIO registers,
//! with split rings in guest memory, over a backend that records frames.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crate::memory::GuestRam;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use super::net::{NetBackend, NetConfig, NetDeviceError, Offloads, VirtioNet, HDR_LEN, MAX_FRAME};
use crate::devices::dhcp::{self, Lease};

const MEM_BASE: u64 = 0x4000_0000;
const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
/// Queue q's rings: descriptors, available, used.
fn rings(q: u64) -> (u64, u64, u64) {
    let base = MEM_BASE + q * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}
const BUF: u64 = MEM_BASE + 0x10000;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RX: u16 = 0;
const TX: u16 = 1;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

#[derive(Clone, Default)]
struct Fake {
    inbound: Arc<Mutex<VecDeque<Vec<u8>>>>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    offloads: Arc<Mutex<Vec<Offloads>>>,
}

impl NetBackend for Fake {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.inbound.lock().expect("lock").pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn send(&mut self, parts: &[IoSlice<'_>]) -> std::io::Result<()> {
        self.sent.lock().expect("lock").push(parts.iter().flat_map(|p| p.iter().copied()).collect());
        Ok(())
    }
    fn set_offloads(&mut self, o: Offloads) -> std::io::Result<()> {
        self.offloads.lock().expect("lock").push(o);
        Ok(())
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

struct H {
    t: MmioTransport<VirtioNet>,
    mem: GuestRam,
    fake: Fake,
    avail_idx: [u16; 2],
    used_seen: [u16; 2],
    next_desc: [u16; 2],
}

fn harness() -> H {
    harness_with(None)
}

fn harness_with(dhcp: Option<Lease>) -> H {
    let fake = Fake::default();
    let dev = VirtioNet::new(Box::new(fake.clone()), NetConfig { mac: MAC, queue_size: QSIZE, mtu: Some(1450), dhcp })
        .expect("device");
    let mem = GuestRam::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]).expect("mem");
    let t = MmioTransport::new(Box::new(dev), mem.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .expect("transport");
    H { t, mem, fake, avail_idx: [0; 2], used_seen: [0; 2], next_desc: [0; 2] }
}

impl H {
    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Linux's probe, acking what is offered minus `drop`, up to DRIVER_OK.
    fn init(&mut self, drop: u64) -> u64 {
        self.w32(0x70, 0);
        assert_eq!(self.r32(0x8), 1, "network device");
        self.w32(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.w32(0x14, 0);
        let lo = self.r32(0x10);
        self.w32(0x14, 1);
        let offered = (u64::from(self.r32(0x10)) << 32) | u64::from(lo);
        let f = offered & !drop;
        self.w32(0x24, 0);
        self.w32(0x20, f as u32);
        self.w32(0x24, 1);
        self.w32(0x20, (f >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w32(0x70, s);
        for q in 0..2u64 {
            let (d, a, u) = rings(q);
            self.mem.write_slice(&[0; 0x3000], GuestAddress(d)).expect("rings");
            self.w32(0x30, q as u32);
            self.w32(0x38, u32::from(QSIZE));
            for (reg, addr) in [(0x80, d), (0x90, a), (0xa0, u)] {
                self.w32(reg, addr as u32);
                self.w32(reg + 4, (addr >> 32) as u32);
            }
            self.w32(0x44, 1);
        }
        self.w32(0x70, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(self.t.is_activated(), "activated");
        offered
    }

    /// A chain of (addr, len, writable) on queue `q`, made available.
    fn offer(&mut self, q: u16, descs: &[(u64, u32, bool)]) -> u16 {
        let qi = usize::from(q);
        let (table, avail, _) = rings(u64::from(q));
        let head = self.next_desc[qi];
        for (k, &(addr, len, w)) in descs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == descs.len();
            let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let at = GuestAddress(table + 16 * u64::from(i));
            self.mem.write_obj(addr, at).expect("desc");
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).expect("desc");
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).expect("desc");
            self.mem.write_obj((i + 1) % QSIZE, GuestAddress(at.0 + 14)).expect("desc");
        }
        self.next_desc[qi] = (head + descs.len() as u16) % QSIZE;
        let slot = avail + 4 + 2 * u64::from(self.avail_idx[qi] % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail");
        self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(1);
        self.mem.write_obj(self.avail_idx[qi], GuestAddress(avail + 2)).expect("avail idx");
        head
    }

    fn kick(&mut self, q: u16) {
        self.t.handle_queue_event(usize::from(q));
    }

    fn used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let qi = usize::from(q);
        let (_, _, used) = rings(u64::from(q));
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen[qi] != idx {
            let e = used + 4 + 8 * u64::from(self.used_seen[qi] % QSIZE);
            out.push((
                self.mem.read_obj(GuestAddress(e)).expect("id"),
                self.mem.read_obj(GuestAddress(e + 4)).expect("len"),
            ));
            self.used_seen[qi] = self.used_seen[qi].wrapping_add(1);
        }
        out
    }

    fn incoming(&self, frame: Vec<u8>) {
        self.fake.inbound.lock().expect("lock").push_back(frame);
    }
}

/// A header and an Ethernet frame of `len` bytes in all, patterned.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    f[..HDR_LEN].fill(0);
    f
}

fn bit(b: u32) -> u64 {
    1 << b
}

#[test]
fn the_driver_sees_the_mac_the_link_and_its_offloads_reach_the_tap() {
    let mut h = harness();
    let offered = h.init(0);
    for f in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM] {
        assert_ne!(offered & bit(f), 0, "feature {f} offered");
    }
    // Config space is read a byte or a word at a time, as drivers do.
    let mut cfg = [0u8; 12];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        h.t.read(0x100 + i as u64, &mut one);
        *b = one[0];
    }
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP as u16);
    assert_ne!(offered & bit(VIRTIO_NET_F_MTU), 0, "an MTU is offered");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1450, "the overlay's MTU");
    let all = Offloads { csum: true, tso4: true, tso6: true, ecn: true };
    assert_eq!(h.fake.offloads.lock().expect("lock").last(), Some(&all));
    // A driver that takes no receive offloads gets none; a reset clears them.
    let mut h = harness();
    h.init(
        bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN),
    );
    assert_eq!(h.fake.offloads.lock().expect("lock").last(), Some(&Offloads::default()));
    h.w32(0x70, 0);
    assert!(!h.t.is_activated());
}

#[test]
fn frames_go_out_whole_and_bad_transmit_chains_are_returned_unsent() {
    let mut h = harness();
    h.init(0);
    let f = frame(HDR_LEN + 60, 1);
    h.mem.write_slice(&f, GuestAddress(BUF)).expect("frame");
    // Header and frame in two descriptors, as Linux sends without a linear skb.
    let good = h.offer(TX, &[(BUF, HDR_LEN as u32, false), (BUF + HDR_LEN as u64, 60, false)]);
    h.kick(TX);
    assert_eq!(h.used(TX), [(u32::from(good), 0)]);
    assert_eq!(h.fake.sent.lock().expect("lock").as_slice(), [f.clone()]);
    // Refused, each returned, none sent: a writable buffer, a runt, memory
    // outside guest RAM, a length beyond 64 KiB.
    let bad = [
        vec![(BUF, 72, true)],
        vec![(BUF, 10, false)],
        vec![(BUF, HDR_LEN as u32, false), (0x1000, 60, false)],
        vec![(BUF, HDR_LEN as u32, false), (BUF, (MAX_FRAME + 1) as u32, false)],
    ];
    for descs in &bad {
        h.offer(TX, descs);
    }
    let after = h.offer(TX, &[(BUF, (HDR_LEN + 60) as u32, false)]);
    h.kick(TX);
    let used = h.used(TX);
    assert_eq!(used.len(), bad.len() + 1, "every chain returned: {used:?}");
    assert_eq!(used.last(), Some(&(u32::from(after), 0)));
    assert_eq!(h.fake.sent.lock().expect("lock").len(), 2, "only the good frames went out");
    let c = h.t.device().counters();
    assert_eq!((c.tx_frames, c.tx_bad_chains), (2, 4));
}

#[test]
fn a_frame_spreads_over_merged_buffers_or_waits_for_them() {
    let mut h = harness();
    h.init(0);
    let f = frame(3000, 9);
    h.incoming(f.clone());
    // No buffers yet: it waits, nothing is lost.
    h.t.handle_backend_event();
    assert!(h.used(RX).is_empty());
    assert_eq!(h.t.device().counters().rx_waits, 1);
    let a = h.offer(RX, &[(BUF, 1536, true)]);
    let b = h.offer(RX, &[(BUF + 0x1000, 1536, true)]);
    h.kick(RX);
    assert_eq!(h.used(RX), [(u32::from(a), 1536), (u32::from(b), 3000 - 1536)]);
    let mut got = vec![0u8; 3000];
    h.mem.read_slice(&mut got[..1536], GuestAddress(BUF)).expect("read");
    h.mem.read_slice(&mut got[1536..], GuestAddress(BUF + 0x1000)).expect("read");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    got[10..12].copy_from_slice(&[0, 0]);
    assert_eq!(got, f, "the frame arrived intact");
    // One buffer too few for the next: the chain taken goes back, and the
    // frame waits for the next notification.
    h.incoming(frame(2000, 3));
    let c = h.offer(RX, &[(BUF, 1536, true)]);
    h.t.handle_backend_event();
    assert!(h.used(RX).is_empty(), "nothing half-delivered");
    let d = h.offer(RX, &[(BUF + 0x1000, 1536, true)]);
    h.kick(RX);
    assert_eq!(h.used(RX), [(u32::from(c), 1536), (u32::from(d), 464)]);
    assert_eq!(h.t.device().counters().rx_frames, 2);
}

#[test]
fn without_merged_buffers_a_frame_must_fit_one_chain_and_bad_chains_come_back_empty() {
    let mut h = harness();
    h.init(bit(VIRTIO_NET_F_MRG_RXBUF));
    h.incoming(frame(3000, 1));
    let small = h.offer(RX, &[(BUF, 1536, true)]);
    h.t.handle_backend_event();
    assert_eq!(h.used(RX), [(u32::from(small), 0)], "too big for the chain: dropped");
    assert_eq!(h.t.device().counters().rx_dropped, 1);
    // A receive chain with a device-readable buffer, one outside RAM: both
    // handed back empty; the frame goes to the next good chain.
    h.incoming(frame(100, 2));
    let readable = h.offer(RX, &[(BUF, 1536, false)]);
    let outside = h.offer(RX, &[(0x10, 1536, true)]);
    let good = h.offer(RX, &[(BUF + 0x1000, 100, true), (BUF + 0x2000, 1000, true)]);
    h.t.handle_backend_event();
    assert_eq!(h.used(RX), [(u32::from(readable), 0), (u32::from(outside), 0), (u32::from(good), 100)]);
    let mut hdr = [0u8; HDR_LEN];
    h.mem.read_slice(&mut hdr, GuestAddress(BUF + 0x1000)).expect("read");
    assert_eq!(&hdr[10..12], &[0, 0], "num_buffers is 0 without MRG_RXBUF");
    assert_eq!(h.t.device().counters().rx_bad_chains, 2);
}

#[test]
fn a_corrupt_available_index_stops_only_that_queue() {
    let mut h = harness();
    h.init(0);
    // avail idx far ahead of the queue size: the ring is unusable.
    let (_, avail, _) = rings(u64::from(TX));
    h.mem.write_obj(QSIZE + 5, GuestAddress(avail + 2)).expect("idx");
    h.kick(TX);
    assert_eq!(h.t.device().counters().broken_queue, 1);
    // Receive still works.
    h.incoming(frame(100, 4));
    let r = h.offer(RX, &[(BUF, 1536, true)]);
    h.t.handle_backend_event();
    assert_eq!(h.used(RX), [(u32::from(r), 100)]);
}

#[test]
fn the_nic_announces_itself_and_its_state_names_its_mac() {
    let mut h = harness();
    h.init(0);
    h.t.device_mut().announce();
    let sent = h.fake.sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1);
    let e = &sent[0][HDR_LEN..];
    assert_eq!(e.len(), 60);
    assert_eq!((&e[..6], &e[6..12], &e[12..14]), (&[0xff; 6][..], &MAC[..], &[0x80, 0x35][..]), "a RARP from the MAC");
    let s = h.t.device().save();
    let other = VirtioNet::new(
        Box::new(Fake::default()),
        NetConfig { mac: [2, 0, 0, 0, 0, 1], queue_size: QSIZE, mtu: None, dhcp: None },
    );
    let err = other.expect("device").restore(&s).expect_err("another MAC");
    assert!(matches!(err, NetDeviceError::MacMismatch { .. }), "{err}");
    let multicast = VirtioNet::new(
        Box::new(Fake::default()),
        NetConfig { mac: [1, 0, 0, 0, 0, 1], queue_size: QSIZE, mtu: None, dhcp: None },
    );
    assert!(matches!(multicast.err(), Some(NetDeviceError::MulticastMac(_))));
}

#[test]
fn the_guests_dhcp_is_answered_by_the_vmm_and_never_reaches_the_network() {
    let lease = Lease { address: "10.10.0.7".parse().expect("ip"), prefix: 24, gateway: None, hostname: None };
    let mut h = harness_with(Some(lease));
    h.init(0);
    let with_hdr = |f: Vec<u8>| [vec![0u8; HDR_LEN], f].concat();
    let discover = with_hdr(dhcp::request(dhcp::DISCOVER, MAC, &[]));
    h.mem.write_slice(&discover, GuestAddress(BUF)).expect("frame");
    // The answer waits for a receive buffer, then lands in it.
    h.offer(TX, &[(BUF, discover.len() as u32, false)]);
    h.kick(TX);
    assert!(h.fake.sent.lock().expect("lock").is_empty(), "DHCP stays in the VMM");
    let r = h.offer(RX, &[(BUF + 0x1000, 1536, true)]);
    h.kick(RX);
    let used = h.used(RX);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, u32::from(r));
    let mut got = vec![0u8; used[0].1 as usize];
    h.mem.read_slice(&mut got, GuestAddress(BUF + 0x1000)).expect("read");
    let e = &got[HDR_LEN..];
    assert_eq!((&e[..6], &e[6..12]), (&MAC[..], &dhcp::SERVER_MAC[..]), "to the guest from the VMM's server");
    assert!(dhcp::is_server_reply(e));
    // yiaddr: the lease's address.
    assert_eq!(&e[14 + 20 + 8 + 16..14 + 20 + 8 + 20], &[10, 10, 0, 7]);
    // Other frames still go out; a server's reply from the network is dropped
    // and the frame after it delivered.
    let other = frame(HDR_LEN + 60, 5);
    h.mem.write_slice(&other, GuestAddress(BUF)).expect("frame");
    h.offer(TX, &[(BUF, other.len() as u32, false)]);
    h.kick(TX);
    assert_eq!(h.fake.sent.lock().expect("lock").len(), 1);
    let mut rogue = dhcp::request(dhcp::DISCOVER, [2, 0, 0, 0, 0, 9], &[]);
    rogue[34..38].copy_from_slice(&[0, 67, 0, 68]);
    h.incoming(with_hdr(rogue));
    h.incoming(frame(100, 6));
    let r = h.offer(RX, &[(BUF + 0x1000, 1536, true)]);
    h.t.handle_backend_event();
    assert_eq!(h.used(RX), [(u32::from(r), 100)]);
    let c = h.t.device().counters();
    assert_eq!((c.dhcp_replies, c.dhcp_dropped, c.tx_frames), (1, 1, 1));
}

#[test]
fn without_a_lease_dhcp_is_an_ordinary_frame() {
    let mut h = harness();
    h.init(0);
    let discover = [vec![0u8; HDR_LEN], dhcp::request(dhcp::DISCOVER, MAC, &[])].concat();
    h.mem.write_slice(&discover, GuestAddress(BUF)).expect("frame");
    h.offer(TX, &[(BUF, discover.len() as u32, false)]);
    h.kick(TX);
    assert_eq!(h.fake.sent.lock().expect("lock").as_slice(), [discover]);
}
