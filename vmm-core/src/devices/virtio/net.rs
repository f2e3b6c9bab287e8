//! virtio-net (virtio 1.2 §5.1) over a [`NetBackend`], one receive and one
//! transmit queue.
//!
//! Every frame carries the 12-byte `virtio_net_hdr_v1` in front, in both
//! directions, and so does the tap (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12):
//! checksum and segmentation offloads pass through untouched. What the
//! guest may receive (`GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN`) is set on
//! the tap with `TUNSETOFFLOAD` once the driver has acked it; what it may
//! send (`CSUM`, `HOST_TSO4/6`, `HOST_ECN`) the tap always accepts.
//!
//! Receive: a frame is read from the backend only when the ring has room
//! for it. With `MRG_RXBUF` it is spread over as many chains as it needs
//! (`num_buffers` in the header says how many); without, it must fit one
//! chain or it is dropped. When the ring runs dry the frame waits, the
//! chains taken for it go back, and the next notification from the driver
//! resumes. Transmit: each chain's readable buffers are one frame; chains
//! that are too short, too long, writable or outside guest memory are
//! returned unsent and counted, never a reason to stop the queue.
//!
//! DHCP: a NIC given a lease answers its guest's DHCP itself (see
//! [`crate::devices::dhcp`]); those frames never reach the backend, the
//! answers go into the receive ring ahead of the backend's frames, and
//! DHCP server replies from the backend are dropped.
//!
//! The backend fd is meant for an edge-triggered poll: the device reads
//! until the backend is empty or the ring is full, and a guest that adds
//! buffers notifies the queue, which picks up where it stopped.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::devices::dhcp::{self, Lease};
use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::chain::{buffers, gather, scatter, Seg};
use super::{log_guest_error, ActivateError, InterruptSink, VirtioDevice};

/// `struct virtio_net_hdr_v1`: what every frame starts with.
pub const HDR_LEN: usize = 12;
/// The largest frame either way: a 64 KiB GSO packet with its Ethernet
/// header, plus the virtio-net header.
pub const MAX_FRAME: usize = HDR_LEN + 65_550;
/// Ethernet's minimum, without the FCS.
const MIN_ETHERNET: usize = 14;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const STATE_VERSION: u32 = 1;
/// `mac`, `status`, `max_virtqueue_pairs`, `mtu`.
const CONFIG_LEN: usize = 12;
/// IPv4's minimum.
pub const MIN_MTU: u16 = 68;
const RX: usize = 0;
const TX: usize = 1;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
/// DHCP answers waiting for receive buffers; a guest that asks faster than
/// it reads loses the rest, as it would on a wire.
const MAX_REPLIES: usize = 8;

/// What the guest may receive with its offloads (TUNSETOFFLOAD's TUN_F_*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

/// Where frames go and come from (a tap; a fake in tests). Frames start
/// with the virtio-net header.
pub trait NetBackend: Send {
    /// One waiting frame into `buf`; `None` when nothing waits.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Sends one frame made of `parts`.
    fn send(&mut self, parts: &[IoSlice<'_>]) -> std::io::Result<()>;
    fn set_offloads(&mut self, o: Offloads) -> std::io::Result<()>;
    /// Readable when a frame waits.
    fn fd(&self) -> Option<RawFd>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub queue_size: u16,
    /// Offered to the driver (VIRTIO_NET_F_MTU): below 1500 on an overlay
    /// such as VXLAN, whose headers must fit in the hosts' MTU.
    pub mtu: Option<u16>,
    /// Answer the guest's DHCP with this lease (see [`crate::devices::dhcp`]);
    /// none: its DHCP goes to the network like any frame.
    pub dhcp: Option<Lease>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetDeviceError {
    #[error("MAC {0} is multicast; a NIC needs a unicast address")]
    MulticastMac(String),
    #[error("queue size {0} is not a power of two between 4 and 32768")]
    QueueSize(u16),
    #[error("MTU {0} is below {MIN_MTU}")]
    Mtu(u16),
    #[error("state version {0} is not supported (expected {STATE_VERSION})")]
    StateVersion(u32),
    #[error("saved MAC {saved} differs from this NIC's {actual}")]
    MacMismatch { saved: String, actual: String },
    #[error("{0}")]
    Lease(String),
}

/// Saved with the transport's state: the guest has seen the MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub version: u32,
    pub mac: [u8; 6],
    pub queue_size: u16,
}

/// Observability; each field only ever grows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the backend that no chain could hold (without
    /// MRG_RXBUF, larger than the chain), or shorter than a header.
    pub rx_dropped: u64,
    /// Times a frame waited for the driver to add receive buffers.
    pub rx_waits: u64,
    /// Transmit chains refused (layout, length, memory) and returned unsent.
    pub tx_bad_chains: u64,
    /// Receive chains refused (readable buffers, memory) and returned empty.
    pub rx_bad_chains: u64,
    pub backend_errors: u64,
    pub guest_memory_errors: u64,
    /// The driver corrupted a ring index; that queue stopped until reset.
    pub broken_queue: u64,
    pub interrupts: u64,
    /// Frames the VMM sent on its own (announcements after a migration).
    pub announcements: u64,
    /// DHCP answers the VMM gave the guest.
    pub dhcp_replies: u64,
    /// DHCP the VMM dropped: from the guest (unanswerable, or a server's
    /// reply), or from the network (a server other than the VMM's).
    pub dhcp_dropped: u64,
}

struct Active {
    mem: GuestRam,
    /// Receive, then transmit.
    queues: Vec<Queue>,
    irq: Arc<dyn InterruptSink>,
}

pub struct VirtioNet {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    queue_max_sizes: [u16; 2],
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    /// A frame in `rx_buf` that waits for receive buffers.
    pending: Option<usize>,
    dhcp: Option<dhcp::Server>,
    /// Frames from the VMM to the guest (DHCP answers), before the backend's.
    replies: VecDeque<Vec<u8>>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    broken: [bool; 2],
    counters: NetCounters,
}

pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl VirtioNet {
    pub fn new(backend: Box<dyn NetBackend>, cfg: NetConfig) -> Result<Self, NetDeviceError> {
        if cfg.mac[0] & 1 != 0 {
            return Err(NetDeviceError::MulticastMac(mac_string(&cfg.mac)));
        }
        let qs = cfg.queue_size;
        if !qs.is_power_of_two() || !(4..=32768).contains(&qs) {
            return Err(NetDeviceError::QueueSize(qs));
        }
        if let Some(m) = cfg.mtu.filter(|m| *m < MIN_MTU) {
            return Err(NetDeviceError::Mtu(m));
        }
        if let Some(l) = &cfg.dhcp {
            l.validate().map_err(NetDeviceError::Lease)?;
        }
        let mut features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ]
        .iter()
        .fold(0u64, |f, b| f | (1u64 << b));
        if cfg.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&cfg.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&cfg.mtu.unwrap_or(1500).to_le_bytes());
        Ok(VirtioNet {
            backend,
            mac: cfg.mac,
            queue_max_sizes: [qs, qs],
            features,
            acked_features: 0,
            config,
            active: None,
            pending: None,
            dhcp: cfg.dhcp.map(|l| dhcp::Server::new(l, cfg.mac, cfg.mtu)),
            replies: VecDeque::new(),
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            broken: [false; 2],
            counters: NetCounters::default(),
        })
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn save(&self) -> VirtioNetState {
        VirtioNetState { version: STATE_VERSION, mac: self.mac, queue_size: self.queue_max_sizes[0] }
    }

    /// Checks that `s` was saved from a NIC with this MAC. Call before
    /// restoring the transport (which activates the device).
    pub fn restore(&mut self, s: &VirtioNetState) -> Result<(), NetDeviceError> {
        if s.version != STATE_VERSION {
            return Err(NetDeviceError::StateVersion(s.version));
        }
        if s.mac != self.mac {
            return Err(NetDeviceError::MacMismatch { saved: mac_string(&s.mac), actual: mac_string(&self.mac) });
        }
        Ok(())
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// Tells the network where the guest now is (after a migration): a RARP
    /// from its MAC, as QEMU's announce does, so that switches and bridges
    /// learn the new port at once, whatever the guest's protocols.
    pub fn announce(&mut self) {
        let mut f = [0u8; HDR_LEN + 60];
        let e = &mut f[HDR_LEN..];
        e[..6].fill(0xff);
        e[6..12].copy_from_slice(&self.mac);
        e[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
        // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (reverse request).
        e[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]);
        e[22..28].copy_from_slice(&self.mac);
        e[32..38].copy_from_slice(&self.mac);
        match self.backend.send(&[IoSlice::new(&f)]) {
            Ok(()) => self.counters.announcements += 1,
            Err(e) => {
                self.counters.backend_errors += 1;
                log::warn!("virtio-net {}: announcement not sent: {e}", mac_string(&self.mac));
            }
        }
    }

    fn signal(&mut self, active: &mut Active, q: usize) {
        let queue = &mut active.queues[q];
        // Without EVENT_IDX this is always true; with it, the driver's
        // used_event decides. An unreadable ring errs on the side of an interrupt.
        if queue.needs_notification(&active.mem).unwrap_or(true) {
            self.counters.interrupts += 1;
            active.irq.signal_used_queue();
        }
    }

    fn queue_broken(&mut self, q: usize, e: impl std::fmt::Display) {
        self.broken[q] = true;
        self.counters.broken_queue += 1;
        let name = if q == RX { "receive" } else { "transmit" };
        log_guest_error(
            self.counters.broken_queue,
            format_args!("virtio-net: {name} ring unusable ({e}); queue stopped until reset"),
        );
    }

    /// Sends what the driver queued.
    fn process_tx(&mut self, active: &mut Active) {
        if self.broken[TX] {
            return;
        }
        let mem = active.mem.clone();
        let mut used = false;
        let mut idle_rechecks = 0;
        loop {
            let _ = active.queues[TX].disable_notification(&mem);
            let mut popped = 0usize;
            loop {
                let chain = match active.queues[TX].iter(&mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.queue_broken(TX, e);
                        None
                    }
                };
                let Some(chain) = chain else { break };
                popped += 1;
                let head = chain.head_index();
                match buffers(chain, active.queues[TX].size(), &mem).and_then(|b| self.frame_to_send(&mem, &b)) {
                    Ok(()) if self.answered_here() => {}
                    Ok(()) => {
                        let parts = [IoSlice::new(&self.tx_buf)];
                        match self.backend.send(&parts) {
                            Ok(()) => {
                                self.counters.tx_frames += 1;
                                self.counters.tx_bytes += (self.tx_buf.len() - HDR_LEN) as u64;
                            }
                            Err(e) => {
                                // A full tap queue or a link down: the frame
                                // is lost, as on a wire.
                                self.counters.backend_errors += 1;
                                log_guest_error(
                                    self.counters.backend_errors,
                                    format_args!("virtio-net: frame not sent: {e}"),
                                );
                            }
                        }
                    }
                    Err(reason) => {
                        self.counters.tx_bad_chains += 1;
                        log_guest_error(
                            self.counters.tx_bad_chains,
                            format_args!("virtio-net: transmit chain at descriptor {head} refused: {reason}"),
                        );
                    }
                }
                if active.queues[TX].add_used(&mem, head, 0).is_err() {
                    self.counters.guest_memory_errors += 1;
                }
                used = true;
            }
            if self.broken[TX] {
                break;
            }
            match active.queues[TX].enable_notification(&mem) {
                Ok(true) if popped > 0 || idle_rechecks == 0 => {
                    if popped == 0 {
                        idle_rechecks += 1;
                    }
                }
                _ => break,
            }
        }
        if used {
            self.signal(active, TX);
        }
        if !self.replies.is_empty() {
            self.process_rx(active);
        }
    }

    /// Whether the frame in `tx_buf` is DHCP, which the VMM answers (or
    /// drops) itself instead of sending it.
    fn answered_here(&mut self) -> bool {
        let Some(server) = &self.dhcp else { return false };
        // A GSO frame is a TCP or UDP stream's, never a DHCP message.
        if self.tx_buf[1] != 0 {
            return false;
        }
        match server.handle(&self.tx_buf[HDR_LEN..]) {
            dhcp::Verdict::Forward => false,
            dhcp::Verdict::Reply(f) => {
                if self.replies.len() < MAX_REPLIES {
                    self.counters.dhcp_replies += 1;
                    self.replies.push_back(f);
                } else {
                    self.counters.dhcp_dropped += 1;
                }
                true
            }
            dhcp::Verdict::Drop(why) => {
                self.counters.dhcp_dropped += 1;
                log_guest_error(self.counters.dhcp_dropped, format_args!("virtio-net: DHCP dropped: {why}"));
                true
            }
        }
    }

    /// Copies a transmit chain's frame into `tx_buf`.
    fn frame_to_send(&mut self, mem: &GuestRam, b: &super::chain::Buffers) -> Result<(), &'static str> {
        if !b.writable.is_empty() {
            return Err("device-writable buffer in a transmit chain");
        }
        let len = b.readable_len as usize;
        if len < HDR_LEN + MIN_ETHERNET {
            return Err("shorter than a header and an Ethernet header");
        }
        if len > MAX_FRAME {
            return Err("longer than 64 KiB");
        }
        self.tx_buf.resize(len, 0);
        gather(mem, &b.readable, 0, &mut self.tx_buf).ok_or("buffer unreadable")
    }

    /// Delivers frames from the backend while the ring has room.
    fn process_rx(&mut self, active: &mut Active) {
        if self.broken[RX] {
            return;
        }
        let mem = active.mem.clone();
        let mut used = false;
        loop {
            let len = match self.pending.take() {
                Some(l) => l,
                None if !self.replies.is_empty() => {
                    let f = self.replies.pop_front().unwrap_or_default();
                    // No offloads: the answer is whole and its checksums set.
                    self.rx_buf[..HDR_LEN].fill(0);
                    self.rx_buf[HDR_LEN..HDR_LEN + f.len()].copy_from_slice(&f);
                    HDR_LEN + f.len()
                }
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(l))
                        if l >= HDR_LEN + MIN_ETHERNET
                            && l <= MAX_FRAME
                            && self.dhcp.is_some()
                            && dhcp::is_server_reply(&self.rx_buf[HDR_LEN..l]) =>
                    {
                        self.counters.dhcp_dropped += 1;
                        log_guest_error(
                            self.counters.dhcp_dropped,
                            format_args!("virtio-net: a DHCP server's reply from the network dropped"),
                        );
                        continue;
                    }
                    Ok(Some(l)) if l >= HDR_LEN + MIN_ETHERNET && l <= MAX_FRAME => l,
                    Ok(Some(_)) => {
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.counters.backend_errors += 1;
                        log_guest_error(self.counters.backend_errors, format_args!("virtio-net: receive: {e}"));
                        break;
                    }
                },
            };
            match self.deliver(active, &mem, len) {
                Delivered::Yes => used = true,
                Delivered::Dropped => {
                    used = true;
                    self.counters.rx_dropped += 1;
                }
                Delivered::NoRoom => {
                    self.pending = Some(len);
                    self.counters.rx_waits += 1;
                    // Re-armed; buffers added meanwhile mean another try.
                    match active.queues[RX].enable_notification(&mem) {
                        Ok(true) => {
                            let _ = active.queues[RX].disable_notification(&mem);
                            if matches!(self.deliver(active, &mem, len), Delivered::Yes) {
                                self.pending = None;
                                used = true;
                                continue;
                            }
                        }
                        Ok(false) => {}
                        Err(e) => self.queue_broken(RX, e),
                    }
                    break;
                }
                Delivered::Broken => break,
            }
        }
        if used {
            self.signal(active, RX);
        }
    }

    /// Writes the frame in `rx_buf[..len]` into as many receive chains as it
    /// needs (one without MRG_RXBUF). Nothing is consumed on `NoRoom`.
    fn deliver(&mut self, active: &mut Active, mem: &GuestRam, len: usize) -> Delivered {
        let merge = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let mut chains: Vec<(u16, Vec<Seg>, u64)> = Vec::new();
        let mut room = 0u64;
        while room < len as u64 {
            if !merge && !chains.is_empty() {
                break;
            }
            let chain = match active.queues[RX].iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.queue_broken(RX, e);
                    return Delivered::Broken;
                }
            };
            let Some(chain) = chain else {
                for _ in &chains {
                    active.queues[RX].go_to_previous_position();
                }
                return Delivered::NoRoom;
            };
            let head = chain.head_index();
            match buffers(chain, active.queues[RX].size(), mem) {
                Ok(b)
                    if b.readable.is_empty()
                        && b.writable_len >= if chains.is_empty() { HDR_LEN as u64 } else { 1 } =>
                {
                    room += b.writable_len;
                    chains.push((head, b.writable, b.writable_len));
                }
                Ok(_) | Err(_) => {
                    // Useless for data: handed back empty, as Linux expects
                    // of a device that cannot use a buffer.
                    self.counters.rx_bad_chains += 1;
                    log_guest_error(
                        self.counters.rx_bad_chains,
                        format_args!("virtio-net: receive chain at descriptor {head} refused"),
                    );
                    if active.queues[RX].add_used(mem, head, 0).is_err() {
                        self.counters.guest_memory_errors += 1;
                    }
                }
            }
        }
        if room < len as u64 {
            // Without MRG_RXBUF, one chain too small for the frame.
            for (head, _, _) in &chains {
                if active.queues[RX].add_used(mem, *head, 0).is_err() {
                    self.counters.guest_memory_errors += 1;
                }
            }
            return Delivered::Dropped;
        }
        let n = chains.len() as u16;
        self.rx_buf[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&(if merge { n } else { 0 }).to_le_bytes());
        let mut off = 0usize;
        for (head, segs, cap) in chains {
            let take = (len - off).min(cap as usize);
            if scatter(mem, &segs, &self.rx_buf[off..off + take]).is_none() {
                self.counters.guest_memory_errors += 1;
            }
            off += take;
            if active.queues[RX].add_used(mem, head, take as u32).is_err() {
                self.counters.guest_memory_errors += 1;
            }
        }
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += (len - HDR_LEN) as u64;
        Delivered::Yes
    }
}

enum Delivered {
    Yes,
    Dropped,
    NoRoom,
    Broken,
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only in legacy devices; this one is modern only.
    }

    fn activate(
        &mut self,
        mem: GuestRam,
        queues: Vec<Queue>,
        acked_features: u64,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount { expected: 2, got: queues.len() });
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.acked_features = acked_features;
        let offloads = Offloads {
            csum: self.acked(VIRTIO_NET_F_GUEST_CSUM),
            tso4: self.acked(VIRTIO_NET_F_GUEST_TSO4),
            tso6: self.acked(VIRTIO_NET_F_GUEST_TSO6),
            ecn: self.acked(VIRTIO_NET_F_GUEST_ECN),
        };
        if let Err(e) = self.backend.set_offloads(offloads) {
            // The tap then hands over only frames without offloads, which
            // every driver takes: slower, not wrong.
            self.counters.backend_errors += 1;
            log::warn!("virtio-net {}: offloads {offloads:?} not set: {e}", mac_string(&self.mac));
        }
        self.broken = [false; 2];
        self.active = Some(Active { mem, queues, irq });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.pending = None;
        self.replies.clear();
        self.broken = [false; 2];
        let _ = self.backend.set_offloads(Offloads::default());
    }

    fn queue_notify(&mut self, queue: u16) {
        let Some(mut active) = self.active.take() else { return };
        match usize::from(queue) {
            RX => self.process_rx(&mut active),
            TX => self.process_tx(&mut active),
            _ => {}
        }
        self.active = Some(active);
    }

    fn process_backend_events(&mut self) {
        match self.active.take() {
            Some(mut active) => {
                self.process_rx(&mut active);
                self.active = Some(active);
            }
            None => {
                // Before the driver is ready frames are dropped, as by a
                // NIC whose link is not up yet; the fd must still be read.
                while let Ok(Some(_)) = self.backend.recv(&mut self.rx_buf) {
                    self.counters.rx_dropped += 1;
                }
            }
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.backend.fd()
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| a.queues.as_slice())
    }
}
