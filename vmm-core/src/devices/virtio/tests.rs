//! The transport and virtio-blk driven the way a Linux driver drives them:
//! through the MMIO registers, with real split rings in guest memory and a
//! file backend on a temporary file.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use crate::memory::GuestRam;
use basalt_storage::FileBackend;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::{BlockConfig, VirtioBlock, VirtioBlockState, MAX_DISCARD_SECTORS, SIZE_MAX};
use super::mmio::{MmioTransport, MmioTransportState};
use super::{INT_CONFIG, INT_VRING};

const MEM_BASE: u64 = 0x4000_0000;
const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = MEM_BASE;
const AVAIL: u64 = MEM_BASE + 0x1000;
const USED: u64 = MEM_BASE + 0x2000;
const INDIRECT: u64 = MEM_BASE + 0x3000;
/// Request headers, status bytes and data buffers live from here on.
const BUF: u64 = MEM_BASE + 0x10000;
const QSIZE: u16 = 16;
const DISK_SIZE: u64 = 64 * 1024;
const DISK_SECTORS: u64 = DISK_SIZE / 512;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT_F: u16 = 4;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

#[derive(Clone, Copy, Debug)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
}

fn rd(addr: u64, len: u32) -> D {
    D { addr, len, flags: 0 }
}

fn wr(addr: u64, len: u32) -> D {
    D { addr, len, flags: WRITE }
}

struct Harness {
    t: MmioTransport<VirtioBlock>,
    mem: GuestRam,
    file: tempfile::NamedTempFile,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

fn disk_file(fill: u8) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().write_all_at(&vec![fill; DISK_SIZE as usize], 0).expect("fill");
    f
}

fn harness_with(read_only: bool, serial: &str) -> Harness {
    let file = disk_file(0xee);
    let backend = FileBackend::open(file.path(), read_only).expect("open");
    let blk =
        VirtioBlock::new(Box::new(backend), BlockConfig { serial: serial.into(), queue_size: QSIZE }).expect("device");
    let mem = GuestRam::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]).expect("mem");
    let t = MmioTransport::new(Box::new(blk), mem.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .expect("transport");
    Harness { t, mem, file, avail_idx: 0, used_seen: 0, next_desc: 0 }
}

fn harness() -> Harness {
    harness_with(false, "basalt-disk-0")
}

impl Harness {
    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn status(&mut self) -> u32 {
        self.r32(0x70)
    }

    fn device_features(&mut self) -> u64 {
        self.w32(0x14, 0);
        let lo = self.r32(0x10);
        self.w32(0x14, 1);
        let hi = self.r32(0x10);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    fn ack_features(&mut self, f: u64) {
        self.w32(0x24, 0);
        self.w32(0x20, f as u32);
        self.w32(0x24, 1);
        self.w32(0x20, (f >> 32) as u32);
    }

    /// Linux's probe sequence up to FEATURES_OK; returns what the device offered.
    fn negotiate(&mut self, drop_features: u64) -> u64 {
        self.w32(0x70, 0);
        assert_eq!(self.r32(0x0), 0x7472_6976);
        assert_eq!(self.r32(0x4), 2);
        assert_eq!(self.r32(0x8), 2, "block device");
        self.w32(0x70, S_ACK);
        self.w32(0x70, S_ACK | S_DRIVER);
        let offered = self.device_features();
        self.ack_features(offered & !drop_features);
        self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(self.status() & S_FEATURES_OK, S_FEATURES_OK, "features accepted");
        offered
    }

    fn setup_queue(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.w32(0x30, 0);
        assert_eq!(self.r32(0x34), u32::from(QSIZE));
        assert_eq!(self.r32(0x44), 0, "queue not yet ready");
        self.w32(0x38, size);
        self.w32(0x80, desc as u32);
        self.w32(0x84, (desc >> 32) as u32);
        self.w32(0x90, avail as u32);
        self.w32(0x94, (avail >> 32) as u32);
        self.w32(0xa0, used as u32);
        self.w32(0xa4, (used >> 32) as u32);
        self.w32(0x44, 1);
    }

    fn init_with(&mut self, drop_features: u64) {
        self.negotiate(drop_features);
        // Fresh rings, as a driver allocates them.
        self.fill(AVAIL, &[0; 0x1000]);
        self.fill(USED, &[0; 0x1000]);
        self.setup_queue(u32::from(QSIZE), DESC, AVAIL, USED);
        self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(self.status(), S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert!(self.t.is_activated());
        self.avail_idx = 0;
        self.used_seen = 0;
        self.next_desc = 0;
    }

    fn init(&mut self) {
        self.init_with(0);
    }

    fn put_desc(&self, table: u64, i: u16, d: D, next: u16) {
        let a = GuestAddress(table + 16 * u64::from(i));
        self.mem.write_obj(d.addr, a).expect("desc");
        self.mem.write_obj(d.len, GuestAddress(a.0 + 8)).expect("desc");
        self.mem.write_obj(d.flags, GuestAddress(a.0 + 12)).expect("desc");
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).expect("desc");
    }

    /// Writes a chain into the descriptor table (NEXT links added) and
    /// returns its head, without making it available.
    fn chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (k, d) in descs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == descs.len();
            let flags = if last { d.flags } else { d.flags | NEXT };
            self.put_desc(DESC, i, D { flags, ..*d }, (i + 1) % QSIZE);
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        head
    }

    fn make_available(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).expect("avail idx");
    }

    fn kick(&mut self) {
        self.w32(0x50, 0);
        self.t.handle_backend_event();
    }

    /// Used elements added since the last call.
    fn used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn header(&self, at: u64, req_type: u32, sector: u64) {
        self.mem.write_obj(req_type, GuestAddress(at)).expect("hdr");
        self.mem.write_obj(0u32, GuestAddress(at + 4)).expect("hdr");
        self.mem.write_obj(sector, GuestAddress(at + 8)).expect("hdr");
    }

    fn status_byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).expect("status")
    }

    /// One request through the ring: header at BUF, status at BUF+0x10,
    /// `data` descriptors in between. Returns (status, used len).
    fn request(&mut self, req_type: u32, sector: u64, data: &[D]) -> (u8, u32) {
        let (hdr, st) = (BUF, BUF + 0x10);
        self.header(hdr, req_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(st)).expect("status");
        let mut descs = vec![rd(hdr, 16)];
        descs.extend_from_slice(data);
        descs.push(wr(st, 1));
        let head = self.chain(&descs);
        self.make_available(head);
        self.kick();
        let used = self.used();
        assert_eq!(used.len(), 1, "one used element");
        assert_eq!(used[0].0, u32::from(head));
        (self.status_byte(st), used[0].1)
    }

    fn fill(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).expect("fill");
    }

    fn guest(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).expect("read");
        v
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).expect("disk")
    }

    fn irq_fired(&mut self) -> bool {
        self.t.irq_evt().read().is_ok()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

const DATA: u64 = BUF + 0x1000;
const DATA2: u64 = BUF + 0x8000;

#[test]
fn write_then_read_round_trips_through_the_file() {
    let mut h = harness();
    h.init();
    let p = pattern(1024, 7);
    h.fill(DATA, &p[..512]);
    h.fill(DATA + 0x2000, &p[512..]);
    // Two data descriptors, not contiguous in guest memory.
    let (st, len) = h.request(VIRTIO_BLK_T_OUT, 4, &[rd(DATA, 512), rd(DATA + 0x2000, 512)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1));
    assert!(h.irq_fired(), "used-buffer interrupt");
    assert_eq!(h.r32(0x60) & INT_VRING, INT_VRING);
    h.w32(0x64, INT_VRING);
    assert_eq!(h.r32(0x60), 0, "InterruptACK clears the bit");
    let disk = h.disk();
    assert_eq!(&disk[4 * 512..6 * 512], &p[..]);
    assert!(disk[..4 * 512].iter().all(|&b| b == 0xee), "nothing else written");
    assert!(disk[6 * 512..].iter().all(|&b| b == 0xee));

    // Read it back into three differently sized buffers.
    let (st, len) = h.request(VIRTIO_BLK_T_IN, 4, &[wr(DATA2, 256), wr(DATA2 + 0x1000, 512), wr(DATA2 + 0x3000, 256)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1025), "used length counts data and status");
    let mut back = h.guest(DATA2, 256);
    back.extend(h.guest(DATA2 + 0x1000, 512));
    back.extend(h.guest(DATA2 + 0x3000, 256));
    assert_eq!(back, p);
    let c = h.t.device().counters();
    assert_eq!((c.reads, c.writes, c.read_bytes, c.write_bytes), (1, 1, 1024, 1024));
    assert_eq!(c.io_errors + c.bad_requests + c.dropped_chains, 0);
}

#[test]
fn last_sector_is_reachable_and_one_past_is_not() {
    let mut h = harness();
    h.init();
    h.fill(DATA, &[0x5a; 512]);
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, &[rd(DATA, 512)]).0, VIRTIO_BLK_S_OK as u8);
    assert_eq!(&h.disk()[DISK_SIZE as usize - 512..], &[0x5a; 512][..]);
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, DISK_SECTORS, &[rd(DATA, 512)]).0, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn flush_and_get_id() {
    let mut h = harness();
    h.init();
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK as u8, 1));
    h.fill(DATA, &[0xaa; 20]);
    let (st, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[wr(DATA, 20)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 21));
    let mut want = b"basalt-disk-0".to_vec();
    want.resize(20, 0);
    assert_eq!(h.guest(DATA, 20), want);
    // A short buffer gets a truncated ID.
    let (st, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[wr(DATA2, 6)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 7));
    assert_eq!(h.guest(DATA2, 6), b"basalt");
    let c = h.t.device().counters();
    assert_eq!((c.flushes, c.get_ids), (1, 2));
}

fn segment(h: &Harness, at: u64, sector: u64, num: u32, flags: u32) {
    h.mem.write_obj(sector, GuestAddress(at)).expect("seg");
    h.mem.write_obj(num, GuestAddress(at + 8)).expect("seg");
    h.mem.write_obj(flags, GuestAddress(at + 12)).expect("seg");
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let mut h = harness();
    h.init();
    segment(&h, DATA, 8, 16, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 16)]), (VIRTIO_BLK_S_OK as u8, 1));
    let disk = h.disk();
    assert!(disk[8 * 512..24 * 512].iter().all(|&b| b == 0), "discarded range reads as zeroes");
    assert!(disk[..8 * 512].iter().all(|&b| b == 0xee));
    assert!(disk[24 * 512..].iter().all(|&b| b == 0xee));

    segment(&h, DATA, 40, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[rd(DATA, 16)]), (VIRTIO_BLK_S_OK as u8, 1));
    let disk = h.disk();
    assert!(disk[40 * 512..43 * 512].iter().all(|&b| b == 0));
    assert!(disk[43 * 512..].iter().all(|&b| b == 0xee));
    assert!(disk[24 * 512..40 * 512].iter().all(|&b| b == 0xee));

    // Reading the zeroed range back through the device.
    let (st, _) = h.request(VIRTIO_BLK_T_IN, 40, &[wr(DATA2, 1536)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    assert!(h.guest(DATA2, 1536).iter().all(|&b| b == 0));
    let c = h.t.device().counters();
    assert_eq!((c.discards, c.write_zeroes), (1, 1));
}

#[test]
fn discard_flags_segments_and_limits_are_checked() {
    let mut h = harness();
    h.init();
    let before = h.disk();
    // Unmap is not a discard flag; unknown flags are never allowed.
    segment(&h, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_UNSUPP as u8);
    segment(&h, DATA, 0, 8, 2);
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_UNSUPP as u8);
    // Two segments where one is allowed; none at all; a torn segment.
    segment(&h, DATA + 16, 8, 8, 0);
    segment(&h, DATA, 0, 8, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 32)]).0, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[]).0, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 12)]).0, VIRTIO_BLK_S_IOERR as u8);
    // Past the end, overflowing, larger than advertised.
    segment(&h, DATA, DISK_SECTORS - 4, 8, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_IOERR as u8);
    segment(&h, DATA, u64::MAX / 512, 8, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_IOERR as u8);
    segment(&h, DATA, 0, MAX_DISCARD_SECTORS + 1, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.disk(), before);
    // A segment split across two descriptors is fine (no framing assumed).
    segment(&h, DATA, 0, 1, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 10), rd(DATA + 10, 6)]).0, VIRTIO_BLK_S_OK as u8);
    assert!(h.disk()[..512].iter().all(|&b| b == 0));
}

#[test]
fn discard_not_negotiated_is_unsupported() {
    let mut h = harness();
    h.init_with((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES));
    segment(&h, DATA, 0, 8, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_UNSUPP as u8);
    assert!(h.disk().iter().all(|&b| b == 0xee));
}

/// After every refused request: the file is untouched and the device still
/// serves a good request.
fn still_works(h: &mut Harness, before: &[u8]) {
    assert_eq!(h.disk(), before, "a refused request changed the disk");
    h.fill(DATA2, &[0x11; 512]);
    let (st, len) = h.request(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[wr(DATA2, 512)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 513), "device still serves requests");
    assert_eq!(h.guest(DATA2, 512), &before[before.len() - 512..]);
}

#[test]
fn malformed_requests_complete_with_ioerr_and_change_nothing() {
    let out_of_memory = MEM_BASE + MEM_SIZE as u64 - 256;
    let cases: Vec<(&str, u32, u64, Vec<D>)> = vec![
        ("sector past the end", VIRTIO_BLK_T_OUT, DISK_SECTORS, vec![rd(DATA, 512)]),
        ("range crossing the end", VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, vec![rd(DATA, 1024)]),
        ("sector * 512 overflows", VIRTIO_BLK_T_OUT, u64::MAX / 256, vec![rd(DATA, 512)]),
        ("offset + len overflows", VIRTIO_BLK_T_IN, u64::MAX / 512, vec![wr(DATA, 1024)]),
        ("OUT with device-writable data", VIRTIO_BLK_T_OUT, 0, vec![wr(DATA, 512)]),
        ("IN with device-readable data", VIRTIO_BLK_T_IN, 0, vec![rd(DATA, 512)]),
        ("readable after writable", VIRTIO_BLK_T_IN, 0, vec![wr(DATA, 512), rd(DATA2, 512)]),
        ("data not a multiple of 512", VIRTIO_BLK_T_OUT, 0, vec![rd(DATA, 500)]),
        ("data buffer outside guest memory", VIRTIO_BLK_T_OUT, 0, vec![rd(out_of_memory, 512)]),
        ("data buffer at an unmapped address", VIRTIO_BLK_T_IN, 0, vec![wr(0x1000, 512)]),
        ("data buffer length wraps the address space", VIRTIO_BLK_T_IN, 0, vec![wr(u64::MAX - 255, 512)]),
        ("FLUSH with data", VIRTIO_BLK_T_FLUSH, 0, vec![rd(DATA, 512)]),
        ("GET_ID with readable data", VIRTIO_BLK_T_GET_ID, 0, vec![rd(DATA, 20)]),
    ];
    let mut h = harness();
    h.init();
    let before = h.disk();
    for (what, t, sector, data) in cases {
        let (st, len) = h.request(t, sector, &data);
        assert_eq!((st, len), (VIRTIO_BLK_S_IOERR as u8, 1), "{what}");
        still_works(&mut h, &before);
    }
    let c = h.t.device().counters();
    assert_eq!(c.bad_requests, 13);
    assert_eq!(c.io_errors, 13);
    assert_eq!(c.dropped_chains, 0);
}

#[test]
fn short_header_and_unknown_types() {
    let mut h = harness();
    h.init();
    let before = h.disk();
    // An 8-byte header.
    h.header(BUF, VIRTIO_BLK_T_IN, 0);
    let head = h.chain(&[rd(BUF, 8), wr(DATA, 512), wr(BUF + 0x10, 1)]);
    h.make_available(head);
    h.kick();
    assert_eq!(h.used(), vec![(u32::from(head), 1)]);
    assert_eq!(h.status_byte(BUF + 0x10), VIRTIO_BLK_S_IOERR as u8);
    still_works(&mut h, &before);
    for t in [VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_SECURE_ERASE, VIRTIO_BLK_T_ZONE_REPORT, 3, 0xdead_beef] {
        assert_eq!(h.request(t, 0, &[rd(DATA, 512)]), (VIRTIO_BLK_S_UNSUPP as u8, 1), "type {t}");
        still_works(&mut h, &before);
    }
    assert_eq!(h.t.device().counters().unsupported, 5);
}

#[test]
fn chains_without_a_usable_status_are_returned_with_length_zero() {
    let mut h = harness();
    h.init();
    let before = h.disk();
    let st = BUF + 0x10;
    let chains: Vec<(&str, Vec<D>)> = vec![
        ("last descriptor device-readable", vec![rd(BUF, 16), rd(DATA, 512)]),
        ("status descriptor of length 0", vec![rd(BUF, 16), wr(DATA, 512), wr(st, 0)]),
        ("status outside guest memory", vec![rd(BUF, 16), wr(DATA, 512), wr(MEM_BASE + MEM_SIZE as u64, 1)]),
        ("status address wraps", vec![rd(BUF, 16), wr(u64::MAX, 2)]),
    ];
    for (what, descs) in chains {
        h.header(BUF, VIRTIO_BLK_T_IN, 0);
        h.mem.write_obj(0xffu8, GuestAddress(st)).expect("status");
        h.fill(DATA, &[0x77; 512]);
        let head = h.chain(&descs);
        h.make_available(head);
        h.kick();
        assert_eq!(h.used(), vec![(u32::from(head), 0)], "{what}");
        assert_eq!(h.status_byte(st), 0xff, "{what}: status untouched");
        assert_eq!(h.guest(DATA, 512), vec![0x77; 512], "{what}: data untouched");
        still_works(&mut h, &before);
    }

    // A loop: 0 -> 1 -> 0.
    h.header(BUF, VIRTIO_BLK_T_IN, 0);
    h.next_desc = 0;
    h.put_desc(DESC, 0, D { addr: BUF, len: 16, flags: NEXT }, 1);
    h.put_desc(DESC, 1, D { addr: DATA, len: 512, flags: NEXT | WRITE }, 0);
    h.make_available(0);
    h.kick();
    assert_eq!(h.used(), vec![(0, 0)], "loop");
    still_works(&mut h, &before);

    // A link past the end of the table.
    h.put_desc(DESC, 0, D { addr: BUF, len: 16, flags: NEXT }, QSIZE);
    h.make_available(0);
    h.kick();
    assert_eq!(h.used(), vec![(0, 0)], "link out of range");
    still_works(&mut h, &before);

    // A head index past the end of the table: nothing to walk, and no used
    // element can name it.
    h.make_available(QSIZE + 3);
    h.kick();
    assert!(h.used().is_empty());
    still_works(&mut h, &before);

    // An indirect table longer than the queue.
    for i in 0..=QSIZE {
        let flags = if i == QSIZE { WRITE } else { NEXT | WRITE };
        h.put_desc(INDIRECT, i, D { addr: DATA, len: 512, flags }, i + 1);
    }
    h.put_desc(DESC, 0, D { addr: INDIRECT, len: 16 * (u32::from(QSIZE) + 1), flags: INDIRECT_F }, 0);
    h.make_available(0);
    h.kick();
    assert_eq!(h.used(), vec![(0, 0)], "chain longer than the queue");
    still_works(&mut h, &before);

    let c = h.t.device().counters();
    assert_eq!(c.dropped_chains, 8);
    assert_eq!(c.io_errors, 0);
}

#[test]
fn indirect_descriptors_work() {
    let mut h = harness();
    h.init();
    let p = pattern(512, 3);
    h.fill(DATA, &p);
    h.header(BUF, VIRTIO_BLK_T_OUT, 2);
    h.put_desc(INDIRECT, 0, D { addr: BUF, len: 16, flags: NEXT }, 1);
    h.put_desc(INDIRECT, 1, D { addr: DATA, len: 512, flags: NEXT }, 2);
    h.put_desc(INDIRECT, 2, wr(BUF + 0x10, 1), 0);
    h.put_desc(DESC, 5, D { addr: INDIRECT, len: 48, flags: INDIRECT_F }, 0);
    h.make_available(5);
    h.kick();
    assert_eq!(h.used(), vec![(5, 1)]);
    assert_eq!(h.status_byte(BUF + 0x10), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&h.disk()[1024..1536], &p[..]);
}

#[test]
fn read_only_backend_refuses_writes() {
    let mut h = harness_with(true, "ro");
    let offered = h.negotiate(0);
    assert_ne!(offered & (1 << VIRTIO_BLK_F_RO), 0, "RO offered");
    assert_eq!(offered & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)), 0);
    h.init();
    let before = h.disk();
    h.fill(DATA, &[1; 512]);
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[rd(DATA, 512)]), (VIRTIO_BLK_S_IOERR as u8, 1));
    segment(&h, DATA, 0, 8, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[rd(DATA, 16)]).0, VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK as u8);
    still_works(&mut h, &before);
}

#[test]
fn config_space_describes_the_disk() {
    let mut h = harness();
    let mut b8 = [0u8; 8];
    h.t.read(0x100, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), DISK_SECTORS, "capacity");
    // Linux reads 64-bit fields as two 32-bit halves.
    assert_eq!(h.r32(0x100), DISK_SECTORS as u32);
    assert_eq!(h.r32(0x104), 0);
    assert_eq!(h.r32(0x108), SIZE_MAX, "size_max");
    assert_eq!(h.r32(0x10c), u32::from(QSIZE) - 2, "seg_max");
    assert_eq!(h.r32(0x114), 512, "blk_size");
    assert_eq!(h.r32(0x124), MAX_DISCARD_SECTORS, "max_discard_sectors");
    assert_eq!(h.r32(0x128), 1, "max_discard_seg");
    assert_eq!(h.r32(0x12c), 1, "discard_sector_alignment");
    assert_eq!(h.r32(0x130), MAX_DISCARD_SECTORS, "max_write_zeroes_sectors");
    assert_eq!(h.r32(0x134), 1, "max_write_zeroes_seg");
    let mut b1 = [0u8; 1];
    h.t.read(0x138, &mut b1);
    assert_eq!(b1[0], 1, "write_zeroes_may_unmap");
    // Past the implemented fields, and odd widths.
    assert_eq!(h.r32(0x1fc), 0);
    let mut b3 = [0xffu8; 3];
    h.t.read(0x100, &mut b3);
    assert_eq!(b3, [0; 3]);
    assert_eq!(h.t.counters().invalid_accesses, 1);
    // Writes are ignored (no writable field is offered).
    h.w32(0x70, S_ACK);
    h.w32(0x70, S_ACK | S_DRIVER);
    h.w32(0x100, 0xdead);
    assert_eq!(h.r32(0x100), DISK_SECTORS as u32);
    assert_eq!(h.r32(0xfc), 0, "config generation");
}

#[test]
fn register_accesses_of_wrong_width_or_offset_are_ignored() {
    let mut h = harness();
    let mut b2 = [0xffu8; 2];
    h.t.read(0x0, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    h.t.read(0x0, &mut b8);
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    h.t.read(0x2, &mut b4);
    assert_eq!(b4, [0; 4], "unaligned");
    h.t.write(0x70, &[1]);
    h.t.write(0x70, &[1, 0]);
    h.t.write(0x72, &1u32.to_le_bytes());
    assert_eq!(h.status(), 0, "status unchanged by bad writes");
    // Write-only and unknown registers read as zero; read-only ones ignore writes.
    assert_eq!(h.r32(0x50), 0);
    assert_eq!(h.r32(0xc8), 0);
    h.w32(0x0, 0);
    assert_eq!(h.r32(0x0), 0x7472_6976);
    assert_eq!(h.r32(0xb0), u32::MAX, "no shared memory region");
    assert_eq!(h.t.counters().invalid_accesses, 9);
    assert_eq!(h.r32(0xc), super::mmio::VENDOR_ID);
}

#[test]
fn status_bits_must_come_in_order() {
    let mut h = harness();
    h.w32(0x70, S_DRIVER);
    assert_eq!(h.status(), 0, "DRIVER before ACK");
    h.w32(0x70, S_ACK);
    h.w32(0x24, 0);
    h.w32(0x20, 0xffff_ffff);
    h.w32(0x70, S_ACK | S_FEATURES_OK);
    assert_eq!(h.status(), S_ACK, "FEATURES_OK before DRIVER");
    h.w32(0x70, S_ACK | S_DRIVER);
    h.w32(0x70, S_ACK | S_DRIVER | S_DRIVER_OK);
    assert_eq!(h.status(), S_ACK | S_DRIVER, "DRIVER_OK before FEATURES_OK");
    h.w32(0x70, S_ACK | S_DRIVER | S_NEEDS_RESET);
    assert_eq!(h.status(), S_ACK | S_DRIVER, "the driver cannot set NEEDS_RESET");
    h.w32(0x70, S_DRIVER);
    assert_eq!(h.status(), S_ACK | S_DRIVER, "bits are not cleared except by reset");
    // Queue registers before FEATURES_OK are ignored.
    h.w32(0x30, 0);
    h.w32(0x38, 8);
    h.w32(0x44, 1);
    assert_eq!(h.r32(0x44), 0);
    assert!(h.t.counters().ignored_writes >= 7);
    assert!(!h.t.is_activated());
    // FAILED is always accepted, and after it only a reset.
    h.w32(0x70, S_ACK | S_DRIVER | VIRTIO_CONFIG_S_FAILED);
    h.w32(0x70, S_ACK | S_DRIVER | VIRTIO_CONFIG_S_FAILED | S_FEATURES_OK);
    assert_eq!(h.status(), S_ACK | S_DRIVER | VIRTIO_CONFIG_S_FAILED);
    h.init();
}

#[test]
fn feature_negotiation_is_checked() {
    let mut h = harness();
    // Before DRIVER, feature writes are ignored.
    h.w32(0x70, S_ACK);
    h.ack_features(1 << VIRTIO_F_VERSION_1);
    h.w32(0x70, S_ACK | S_DRIVER);
    h.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(h.status(), S_ACK | S_DRIVER, "no VERSION_1 acked: FEATURES_OK refused");
    assert_eq!(h.t.counters().features_refused, 1);

    // A bit the device does not offer.
    h.w32(0x70, 0);
    h.w32(0x70, S_ACK | S_DRIVER);
    let offered = h.device_features();
    assert_ne!(offered & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(offered & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_ne!(offered & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    assert_eq!(offered & (1 << VIRTIO_BLK_F_RO), 0);
    h.ack_features(offered | (1 << VIRTIO_BLK_F_MQ));
    h.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(h.status() & S_FEATURES_OK, 0);

    // Selectors past 1: DeviceFeatures reads 0, DriverFeatures ignores writes.
    h.w32(0x70, 0);
    h.w32(0x70, S_ACK | S_DRIVER);
    h.w32(0x14, 2);
    assert_eq!(h.r32(0x10), 0);
    h.ack_features(offered);
    h.w32(0x24, 2);
    h.w32(0x20, 0xffff_ffff);
    h.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(h.status() & S_FEATURES_OK, S_FEATURES_OK, "the sel-2 write changed nothing");
    // After FEATURES_OK the features are fixed.
    let ignored = h.t.counters().ignored_writes;
    h.w32(0x24, 0);
    h.w32(0x20, 0);
    assert_eq!(h.t.counters().ignored_writes, ignored + 1);
    assert_eq!(h.t.save().acked_features, offered);
}

#[test]
fn queue_select_out_of_range_is_harmless() {
    let mut h = harness();
    h.negotiate(0);
    h.w32(0x30, 1);
    assert_eq!(h.r32(0x34), 0, "no queue 1");
    assert_eq!(h.r32(0x44), 0);
    h.w32(0x38, 8);
    h.w32(0x44, 1);
    h.w32(0x30, u32::MAX);
    h.w32(0x80, 0x1234);
    assert_eq!(h.r32(0x44), 0);
    h.w32(0x50, 1);
    h.w32(0x50, u32::MAX);
    // Queue 0 was never set up, so DRIVER_OK fails.
    h.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    assert_eq!(h.status() & S_NEEDS_RESET, S_NEEDS_RESET);
    assert!(!h.t.is_activated());
}

#[test]
fn invalid_queues_refuse_driver_ok_and_reset_recovers() {
    let end = MEM_BASE + MEM_SIZE as u64;
    let cases: Vec<(&str, u32, u64, u64, u64)> = vec![
        ("size not a power of two", 12, DESC, AVAIL, USED),
        ("size above the maximum", 32, DESC, AVAIL, USED),
        ("size zero", 0, DESC, AVAIL, USED),
        ("size above 16 bits", 0x1_0010, DESC, AVAIL, USED),
        ("descriptor table misaligned", 16, DESC + 8, AVAIL, USED),
        ("available ring misaligned", 16, DESC, AVAIL + 1, USED),
        ("used ring misaligned", 16, DESC, AVAIL, USED + 2),
        ("descriptor table outside memory", 16, 0x1000, AVAIL, USED),
        ("used ring crossing the end of memory", 16, DESC, AVAIL, end - 64),
        ("descriptor table at the top of the address space", 16, u64::MAX - 15, AVAIL, USED),
        ("available ring at 0", 16, DESC, 0, USED),
    ];
    let mut h = harness();
    for (what, size, desc, avail, used) in cases {
        h.negotiate(0);
        h.setup_queue(size, desc, avail, used);
        let _ = h.irq_fired();
        h.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(h.status() & S_NEEDS_RESET, S_NEEDS_RESET, "{what}");
        assert!(!h.t.is_activated(), "{what}");
        assert_eq!(h.r32(0x60) & INT_CONFIG, INT_CONFIG, "{what}: config interrupt");
        assert!(h.irq_fired(), "{what}");
        // Notifies and further status bits are ignored until reset.
        h.w32(0x50, 0);
        let s = h.status();
        h.w32(0x70, s | VIRTIO_CONFIG_S_FAILED);
        assert!(!h.t.is_activated());
    }
    assert_eq!(h.t.counters().activation_failures, 11);
    assert_eq!(h.r32(0xfc), 11, "generation moved with each config change");
    h.init();
    assert_eq!(h.r32(0x60), 0, "reset clears interrupt status");
    still_works(&mut h, &vec![0xee; DISK_SIZE as usize]);
}

#[test]
fn queue_not_ready_refuses_driver_ok() {
    let mut h = harness();
    h.negotiate(0);
    h.setup_queue(16, DESC, AVAIL, USED);
    h.w32(0x44, 0);
    h.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    assert_eq!(h.status() & S_NEEDS_RESET, S_NEEDS_RESET);
}

#[test]
fn queue_registers_are_frozen_after_driver_ok() {
    let mut h = harness();
    h.init();
    h.w32(0x80, 0x5000);
    h.w32(0x44, 0);
    assert_eq!(h.r32(0x44), 1);
    assert_eq!(h.t.save().queues[0].desc_table, DESC);
    still_works(&mut h, &vec![0xee; DISK_SIZE as usize]);
}

#[test]
fn many_requests_in_flight_and_throttling() {
    let mut h = harness();
    h.init();
    // Four writes made available at once, one kick, completions not yet taken.
    let mut heads = Vec::new();
    for i in 0..4u64 {
        let hdr = BUF + 0x100 * i;
        h.header(hdr, VIRTIO_BLK_T_OUT, i);
        h.fill(DATA + 512 * i, &[i as u8 + 1; 512]);
        let head = h.chain(&[rd(hdr, 16), rd(DATA + 512 * i, 512), wr(hdr + 0x10, 1)]);
        h.make_available(head);
        heads.push(head);
    }
    h.w32(0x50, 0);
    assert_eq!(h.t.device().in_flight(), 4);
    assert!(h.used().is_empty());
    h.t.handle_backend_event();
    let used = h.used();
    assert_eq!(used.iter().map(|u| u.0 as u16).collect::<Vec<_>>(), heads);
    assert!(h.irq_fired());
    let disk = h.disk();
    for i in 0..4usize {
        assert!(disk[512 * i..512 * (i + 1)].iter().all(|&b| b == i as u8 + 1));
    }

    // A hostile driver: with the whole queue in flight it offers the same
    // heads again. The device stops taking chains until completions free
    // slots, then catches up.
    h.init();
    let heads: Vec<u16> = (0..4u64)
        .map(|i| {
            let hdr = BUF + 0x100 * i;
            h.chain(&[rd(hdr, 16), rd(DATA + 512 * i, 512), wr(hdr + 0x10, 1)])
        })
        .collect();
    for _ in 0..QSIZE / 4 {
        for &head in &heads {
            h.make_available(head);
        }
    }
    h.w32(0x50, 0);
    assert_eq!(h.t.device().in_flight(), usize::from(QSIZE));
    for &head in heads.iter().take(4) {
        h.make_available(head);
    }
    h.w32(0x50, 0);
    assert_eq!(h.t.device().in_flight(), usize::from(QSIZE), "nothing more taken");
    assert!(h.t.device().counters().throttled >= 1);
    h.t.handle_backend_event();
    assert_eq!(h.used().len(), usize::from(QSIZE));
    assert_eq!(h.t.device().in_flight(), 4, "the waiting chains were taken after completions");
    h.t.handle_backend_event();
    assert_eq!(h.used().len(), 4);
    assert_eq!(h.t.device().in_flight(), 0);
}

#[test]
fn corrupt_available_index_stops_the_queue_until_reset() {
    let mut h = harness();
    h.init();
    // The index claims more new entries than the queue holds.
    h.mem.write_obj(QSIZE + 1, GuestAddress(AVAIL + 2)).expect("idx");
    h.kick();
    h.kick();
    assert!(h.used().is_empty());
    assert_eq!(h.t.device().counters().broken_queue, 1);
    h.w32(0x70, 0);
    h.init();
    still_works(&mut h, &vec![0xee; DISK_SIZE as usize]);
}

#[test]
fn reset_with_requests_in_flight_leaves_guest_memory_alone() {
    let mut h = harness();
    h.init();
    h.header(BUF, VIRTIO_BLK_T_IN, 0);
    h.mem.write_obj(0xffu8, GuestAddress(BUF + 0x10)).expect("status");
    h.fill(DATA, &[0x33; 512]);
    let head = h.chain(&[rd(BUF, 16), wr(DATA, 512), wr(BUF + 0x10, 1)]);
    h.make_available(head);
    h.w32(0x50, 0);
    assert_eq!(h.t.device().in_flight(), 1);
    h.w32(0x70, 0);
    assert!(!h.t.is_activated());
    h.t.handle_backend_event();
    assert!(h.used().is_empty());
    assert_eq!(h.guest(DATA, 512), vec![0x33; 512]);
    assert_eq!(h.status_byte(BUF + 0x10), 0xff);
    assert_eq!(h.t.device().counters().stale_completions, 1);
    h.init();
    still_works(&mut h, &vec![0xee; DISK_SIZE as usize]);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut h = harness();
    h.init();
    assert_ne!(h.t.save().acked_features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    let used_event = AVAIL + 4 + 2 * u64::from(QSIZE);
    // Interrupt only once used idx passes 2.
    h.mem.write_obj(2u16, GuestAddress(used_event)).expect("used_event");
    let _ = h.irq_fired();
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(!h.irq_fired(), "first completion suppressed");
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(!h.irq_fired(), "second completion suppressed");
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(h.irq_fired(), "third completion crosses used_event");
    // The device asks for a kick at the next available entry.
    let avail_event: u16 = h.mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE))).expect("avail_event");
    assert_eq!(avail_event, 3);

    // Without EVENT_IDX every batch interrupts.
    h.w32(0x70, 0);
    h.init_with(1 << VIRTIO_RING_F_EVENT_IDX);
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(h.irq_fired());
}

#[test]
fn save_and_restore_preserve_queue_positions() {
    let mut h = harness();
    h.init();
    h.fill(DATA, &[0x42; 512]);
    for s in 0..3 {
        h.request(VIRTIO_BLK_T_OUT, s, &[rd(DATA, 512)]);
    }
    h.t.drain(Duration::from_secs(5)).expect("drain");
    let state = h.t.save();
    assert_eq!(state.queues[0].next_avail, 3);
    assert_eq!(state.queues[0].next_used, 3);
    assert!(state.activated);
    let blk_state = h.t.device().save();
    // Through the wire format, as a migration would.
    let state: MmioTransportState = serde_json::from_str(&serde_json::to_string(&state).expect("ser")).expect("de");
    let blk_state: VirtioBlockState =
        serde_json::from_str(&serde_json::to_string(&blk_state).expect("ser")).expect("de");

    // A new device on the same disk and memory, as on the target host.
    let backend = FileBackend::open(h.file.path(), false).expect("open");
    let mut blk =
        VirtioBlock::new(Box::new(backend), BlockConfig { serial: "basalt-disk-0".into(), queue_size: QSIZE })
            .expect("device");
    blk.restore(&blk_state).expect("same disk");
    let mut t = MmioTransport::new(Box::new(blk), h.mem.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .expect("transport");
    t.restore(&state).expect("restore");
    assert!(t.is_activated());
    assert_eq!(t.save(), state);
    h.t = t;
    // The next request continues where the old device stopped.
    assert_eq!(h.status(), S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    let disk = h.disk();
    still_works(&mut h, &disk);
    let s = h.t.save();
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (4, 4));
}

#[test]
fn restore_refuses_mismatched_state() {
    let mut h = harness();
    h.init();
    let good = h.t.save();
    let mut s = good.clone();
    s.version = 99;
    assert!(h.t.restore(&s).is_err());
    let mut s = good.clone();
    s.device_type = 1;
    assert!(h.t.restore(&s).is_err());
    let mut s = good.clone();
    s.queues.push(s.queues[0]);
    assert!(h.t.restore(&s).is_err());
    let mut s = good.clone();
    s.acked_features |= 1 << VIRTIO_BLK_F_MQ;
    assert!(h.t.restore(&s).is_err());
    let mut s = good.clone();
    s.queues[0].size = 3;
    assert!(h.t.restore(&s).is_err());
    assert!(!h.t.is_activated(), "a failed restore leaves the transport reset");
    h.t.restore(&good).expect("good state");
    assert!(h.t.is_activated());

    // Mid-negotiation, whatever the driver wrote is saved and restored.
    h.w32(0x70, 0);
    h.w32(0x70, S_ACK | S_DRIVER);
    h.ack_features(u64::MAX);
    let mid = h.t.save();
    h.t.restore(&mid).expect("mid-negotiation state");
    assert_eq!(h.t.save(), mid);

    let mut bs = h.t.device().save();
    bs.capacity_sectors += 1;
    assert!(h.t.device_mut().restore(&bs).is_err());
    let mut bs = h.t.device().save();
    bs.serial = "other".into();
    assert!(h.t.device_mut().restore(&bs).is_err());
}

#[test]
fn device_construction_is_validated() {
    let file = disk_file(0);
    let open = || Box::new(FileBackend::open(file.path(), false).expect("open"));
    assert!(VirtioBlock::new(open(), BlockConfig { serial: "x".repeat(21), queue_size: 16 }).is_err());
    assert!(VirtioBlock::new(open(), BlockConfig { serial: "x".repeat(20), queue_size: 16 }).is_ok());
    assert!(VirtioBlock::new(open(), BlockConfig { serial: String::new(), queue_size: 12 }).is_err());
    assert!(VirtioBlock::new(open(), BlockConfig { serial: String::new(), queue_size: 2 }).is_err());
    assert!(VirtioBlock::new(open(), BlockConfig::default()).is_ok());
}

#[test]
fn a_type_erased_transport_sits_on_the_mmio_bus() {
    use std::sync::{Arc, Mutex};

    use crate::devices::bus::MmioBus;
    use crate::devices::virtio::VirtioDevice;

    let file = disk_file(0);
    let blk = VirtioBlock::new(Box::new(FileBackend::open(file.path(), false).expect("open")), BlockConfig::default())
        .expect("device");
    let mem = GuestRam::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]).expect("mem");
    let t: MmioTransport =
        MmioTransport::new(Box::new(blk) as Box<dyn VirtioDevice>, mem, EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .expect("transport");
    assert_eq!(t.queue_evts().len(), 1);
    assert!(t.backend_fd().is_some());
    let mut bus = MmioBus::default();
    bus.insert(0x0a00_0000, 0x200, Arc::new(Mutex::new(t))).expect("insert");
    let mut b = [0u8; 4];
    assert!(bus.read(0x0a00_0000, &mut b));
    assert_eq!(u32::from_le_bytes(b), 0x7472_6976);
    assert!(bus.read(0x0a00_0008, &mut b));
    assert_eq!(u32::from_le_bytes(b), VIRTIO_ID_BLOCK);
}
