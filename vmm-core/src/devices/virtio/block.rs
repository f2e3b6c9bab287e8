//! virtio-blk (virtio 1.2 §5.2) over a [`BlockBackend`].
//!
//! Requests are parsed without assuming a message framing (§2.7.4): the
//! 16-byte header is the start of the device-readable part of a chain, the
//! status byte is the last byte of its last descriptor (which must be
//! device-writable), and data is whatever lies between. Everything the
//! driver supplies is checked before the backend sees a request: directions,
//! lengths, that every buffer lies inside guest memory, and sector ranges
//! (with overflow-safe arithmetic) against the capacity.
//!
//! The device never waits for the backend: requests are submitted with a tag
//! that maps to their in-flight record, completions are collected when the
//! backend's eventfd fires, and the driver is interrupted once per batch.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use basalt_storage::{BlockBackend, BlockError, Completion, Op, Request};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::chain::{gather, scatter, Seg};
use super::{log_guest_error, ActivateError, DrainTimeout, InterruptSink, VirtioDevice};

/// virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
/// Largest single data segment a driver may use (VIRTIO_BLK_F_SIZE_MAX).
/// With `seg_max` segments this bounds one request, and so the buffer the
/// VMM allocates for it.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes, in sectors (1 GiB): the file backend may
/// have to write zeroes itself, on the event loop.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Once this many data bytes are in flight, new requests wait in the ring
/// until completions free memory, however many descriptors the guest offers.
const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const STATE_VERSION: u32 = 1;
/// Bytes of `struct virtio_blk_config` the device implements (through
/// `write_zeroes_may_unmap` and its padding); later fields read as zero.
const CONFIG_LEN: usize = 60;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Returned by GET_ID (Linux: /sys/block/vdX/serial); at most 20 bytes.
    pub serial: String,
    /// Maximum (and, for Linux, actual) size of the request queue; a power
    /// of two from 4 to 32768.
    pub queue_size: u16,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig { serial: String::new(), queue_size: DEFAULT_QUEUE_SIZE }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockDeviceError {
    #[error("serial {0:?} is longer than {ID_BYTES} bytes")]
    SerialTooLong(String),
    #[error("queue size {0} is not a power of two between 4 and 32768")]
    QueueSize(u16),
    #[error("backend block size {0} is not a power of two of at least 512")]
    BlockSize(u32),
    #[error("state version {0} is not supported (expected {STATE_VERSION})")]
    StateVersion(u32),
    #[error("saved {what} {saved} differs from this disk's {actual}")]
    Mismatch { what: &'static str, saved: String, actual: String },
}

/// Saved with the transport's state; restoring checks it describes the same
/// disk, since the guest has already seen its capacity and identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlockState {
    pub version: u32,
    pub capacity_sectors: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub serial: String,
    pub queue_size: u16,
}

/// Observability; each field only ever grows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockCounters {
    /// Descriptor chains taken from the available ring.
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR, whatever the cause.
    pub io_errors: u64,
    pub unsupported: u64,
    /// Requests refused by validation (bad layout, header, direction,
    /// length, range, buffers outside guest memory); a subset of io_errors.
    pub bad_requests: u64,
    /// Chains with no reachable status byte (malformed, looping, too long):
    /// returned to the driver with length 0.
    pub dropped_chains: u64,
    /// The backend refused a submission or completed with an error.
    pub backend_errors: u64,
    /// Completions for requests from before a reset, discarded.
    pub stale_completions: u64,
    /// Failed writes to guest memory at completion (data, status, used ring).
    pub guest_memory_errors: u64,
    /// Times the ring was left alone because too much was in flight.
    pub throttled: u64,
    /// The driver corrupted the available ring index; the queue stopped
    /// until the next reset.
    pub broken_queue: u64,
    pub interrupts: u64,
}

/// A descriptor chain flattened into the parts a request is made of.
struct Layout {
    readable: Vec<Seg>,
    /// Device-writable buffers without the status byte.
    writable: Vec<Seg>,
    readable_len: u64,
    writable_len: u64,
    status: GuestAddress,
    /// Problems that still leave the status byte usable for an error.
    fault: Option<&'static str>,
}

enum Outcome {
    /// Finished without the backend: status and total bytes written.
    Done(u8, u32),
    Submit {
        op: Op,
        read_into: Vec<Seg>,
        ok_len: u32,
        kind: Kind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

struct InFlight {
    head: u16,
    status: GuestAddress,
    read_into: Vec<Seg>,
    /// Used length on success: data written plus the status byte.
    ok_len: u32,
    bytes: u64,
    kind: Kind,
}

struct Active {
    mem: GuestRam,
    queue: Queue,
    irq: Arc<dyn InterruptSink>,
}

pub struct VirtioBlock {
    backend: Box<dyn BlockBackend>,
    capacity_sectors: u64,
    block_size: u32,
    read_only: bool,
    serial: String,
    id: [u8; ID_BYTES],
    queue_max_sizes: [u16; 1],
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    in_flight: HashMap<u64, InFlight>,
    in_flight_bytes: u64,
    /// Tags are never reused, so a completion from before a reset can never
    /// be mistaken for a request of the new driver instance.
    next_tag: u64,
    throttled: bool,
    broken: bool,
    completions: Vec<Completion>,
    counters: BlockCounters,
}

impl VirtioBlock {
    pub fn new(backend: Box<dyn BlockBackend>, cfg: BlockConfig) -> Result<Self, BlockDeviceError> {
        if cfg.serial.len() > ID_BYTES {
            return Err(BlockDeviceError::SerialTooLong(cfg.serial));
        }
        let qs = cfg.queue_size;
        if !qs.is_power_of_two() || !(4..=32768).contains(&qs) {
            return Err(BlockDeviceError::QueueSize(qs));
        }
        let block_size = backend.block_size();
        if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR_SIZE {
            return Err(BlockDeviceError::BlockSize(block_size));
        }
        let read_only = backend.read_only();
        let capacity_sectors = backend.size() / SECTOR_SIZE;
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut id = [0u8; ID_BYTES];
        id[..cfg.serial.len()].copy_from_slice(cfg.serial.as_bytes());
        let mut dev = VirtioBlock {
            backend,
            capacity_sectors,
            block_size,
            read_only,
            serial: cfg.serial,
            id,
            queue_max_sizes: [qs],
            features,
            acked_features: 0,
            config: [0; CONFIG_LEN],
            active: None,
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
            next_tag: 0,
            throttled: false,
            broken: false,
            completions: Vec::new(),
            counters: BlockCounters::default(),
        };
        dev.config = dev.build_config();
        Ok(dev)
    }

    fn build_config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        // Two descriptors of every request are the header and the status.
        put(12, &(u32::from(self.queue_max_sizes[0]) - 2).to_le_bytes());
        put(20, &self.block_size.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes());
        put(44, &(self.block_size / SECTOR_SIZE as u32).to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[1]);
        c
    }

    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Why the disk cannot move to another host, if it cannot.
    pub fn handover_refusal(&self) -> Option<String> {
        self.backend.handover_refusal()
    }

    /// Hands the disk over (live migration): everything completed so far is
    /// flushed, then the backend's exclusive lock released. Drain first.
    pub fn prepare_handover(&mut self) -> Result<(), BlockError> {
        self.backend.prepare_handover()
    }

    pub fn release_ownership(&mut self) -> Result<(), BlockError> {
        self.backend.release_ownership()
    }

    pub fn acquire_ownership(&mut self) -> Result<(), BlockError> {
        self.backend.acquire_ownership()
    }

    pub fn save(&self) -> VirtioBlockState {
        VirtioBlockState {
            version: STATE_VERSION,
            capacity_sectors: self.capacity_sectors,
            block_size: self.block_size,
            read_only: self.read_only,
            serial: self.serial.clone(),
            queue_size: self.queue_max_sizes[0],
        }
    }

    /// Checks that `s` was saved from the same disk. Call before restoring
    /// the transport (which activates the device).
    pub fn restore(&mut self, s: &VirtioBlockState) -> Result<(), BlockDeviceError> {
        if s.version != STATE_VERSION {
            return Err(BlockDeviceError::StateVersion(s.version));
        }
        fn same<T: PartialEq + std::fmt::Debug>(
            what: &'static str,
            saved: &T,
            actual: &T,
        ) -> Result<(), BlockDeviceError> {
            if saved == actual {
                Ok(())
            } else {
                Err(BlockDeviceError::Mismatch { what, saved: format!("{saved:?}"), actual: format!("{actual:?}") })
            }
        }
        same("capacity", &s.capacity_sectors, &self.capacity_sectors)?;
        same("block size", &s.block_size, &self.block_size)?;
        same("read-only", &s.read_only, &self.read_only)?;
        same("serial", &s.serial, &self.serial)?;
        same("queue size", &s.queue_size, &self.queue_max_sizes[0])
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    fn at_capacity(&self, queue: &Queue) -> bool {
        self.in_flight.len() >= usize::from(queue.size()) || self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES
    }

    /// Takes chains from the available ring until it is empty or too much is
    /// in flight. Notifications from the driver are off while the ring is
    /// being emptied and are re-armed (with a re-check) at the end.
    fn process_queue(&mut self, active: &mut Active) {
        if self.broken {
            return;
        }
        let mem = active.mem.clone();
        let mut used = false;
        let mut idle_rechecks = 0;
        loop {
            // Failing to write the suppression flag only costs extra kicks.
            let _ = active.queue.disable_notification(&mem);
            let mut popped = 0usize;
            loop {
                if self.at_capacity(&active.queue) {
                    self.throttled = true;
                    self.counters.throttled += 1;
                    break;
                }
                let chain = match active.queue.iter(&mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.broken = true;
                        self.counters.broken_queue += 1;
                        log_guest_error(
                            self.counters.broken_queue,
                            format_args!("virtio-blk: available ring unusable ({e}); queue stopped until reset"),
                        );
                        None
                    }
                };
                let Some(chain) = chain else { break };
                popped += 1;
                used |= self.handle_chain(active, &mem, chain);
            }
            if self.throttled || self.broken {
                break;
            }
            match active.queue.enable_notification(&mem) {
                // New buffers arrived while notifications were off.
                Ok(true) if popped > 0 || idle_rechecks == 0 => {
                    if popped == 0 {
                        // The index moved but nothing could be taken: at most
                        // one retry, so a driver cannot keep this loop spinning.
                        idle_rechecks += 1;
                    }
                }
                _ => break,
            }
        }
        if used {
            self.signal(active);
        }
    }

    fn signal(&mut self, active: &mut Active) {
        // Without EVENT_IDX this is always true; with it, the driver's
        // used_event decides. An unreadable ring errs on the side of an interrupt.
        if active.queue.needs_notification(&active.mem).unwrap_or(true) {
            self.counters.interrupts += 1;
            active.irq.signal_used_queue();
        }
    }

    /// Returns whether a used element was added.
    fn handle_chain(&mut self, active: &mut Active, mem: &GuestRam, chain: DescriptorChain<&GuestRam>) -> bool {
        self.counters.requests += 1;
        let head = chain.head_index();
        let layout = match flatten(chain, active.queue.size(), mem) {
            Ok(l) => l,
            Err(reason) => {
                self.counters.dropped_chains += 1;
                log_guest_error(
                    self.counters.dropped_chains,
                    format_args!("virtio-blk: chain at descriptor {head} dropped: {reason}"),
                );
                self.put_used(active, head, 0);
                return true;
            }
        };
        let outcome = match self.parse(&layout, mem) {
            Ok(o) => o,
            Err(reason) => {
                self.counters.bad_requests += 1;
                log_guest_error(
                    self.counters.bad_requests,
                    format_args!("virtio-blk: request at descriptor {head} refused: {reason}"),
                );
                Outcome::Done(S_IOERR, 1)
            }
        };
        match outcome {
            Outcome::Done(status, len) => self.finish(active, head, layout.status, status, len),
            Outcome::Submit { op, read_into, ok_len, kind } => {
                let tag = self.next_tag;
                self.next_tag = self.next_tag.wrapping_add(1);
                let bytes =
                    op.range().map_or(0, |(_, len)| if matches!(kind, Kind::Read | Kind::Write) { len } else { 0 });
                self.in_flight.insert(tag, InFlight { head, status: layout.status, read_into, ok_len, bytes, kind });
                self.in_flight_bytes += bytes;
                if let Err(e) = self.backend.submit(Request { tag, op }) {
                    self.in_flight.remove(&tag);
                    self.in_flight_bytes -= bytes;
                    self.counters.backend_errors += 1;
                    log_guest_error(
                        self.counters.backend_errors,
                        format_args!("virtio-blk: backend refused request: {e}"),
                    );
                    self.finish(active, head, layout.status, S_IOERR, 1);
                } else {
                    return false;
                }
            }
        }
        true
    }

    /// Validates a request and decides what to do with it. An `Err` is a
    /// malformed request, answered with IOERR.
    fn parse(&mut self, l: &Layout, mem: &GuestRam) -> Result<Outcome, &'static str> {
        if let Some(fault) = l.fault {
            return Err(fault);
        }
        if l.readable_len < HEADER_LEN {
            return Err("header shorter than 16 bytes");
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        gather(mem, &l.readable, 0, &mut hdr).ok_or("header unreadable")?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        match req_type {
            VIRTIO_BLK_T_IN => {
                if l.readable_len != HEADER_LEN {
                    return Err("IN request with device-readable data");
                }
                let len = self.data_len(l.writable_len)?;
                let offset = self.check_range(sector, u64::from(len))?;
                self.counters.reads += 1;
                if len == 0 {
                    return Ok(Outcome::Done(S_OK, 1));
                }
                Ok(Outcome::Submit {
                    op: Op::Read { offset, len },
                    read_into: l.writable.clone(),
                    ok_len: len + 1,
                    kind: Kind::Read,
                })
            }
            VIRTIO_BLK_T_OUT => {
                if l.writable_len != 0 {
                    return Err("OUT request with device-writable data");
                }
                let len = self.data_len(l.readable_len - HEADER_LEN)?;
                let offset = self.check_range(sector, u64::from(len))?;
                self.counters.writes += 1;
                if self.read_only {
                    return Ok(Outcome::Done(S_IOERR, 1));
                }
                if len == 0 {
                    return Ok(Outcome::Done(S_OK, 1));
                }
                let mut data = vec![0u8; len as usize];
                gather(mem, &l.readable, HEADER_LEN, &mut data).ok_or("data unreadable")?;
                Ok(Outcome::Submit {
                    op: Op::Write { offset, data },
                    read_into: Vec::new(),
                    ok_len: 1,
                    kind: Kind::Write,
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                if l.readable_len != HEADER_LEN || l.writable_len != 0 {
                    return Err("FLUSH request with data");
                }
                self.counters.flushes += 1;
                Ok(Outcome::Submit { op: Op::Flush, read_into: Vec::new(), ok_len: 1, kind: Kind::Flush })
            }
            VIRTIO_BLK_T_GET_ID => {
                if l.readable_len != HEADER_LEN {
                    return Err("GET_ID request with device-readable data");
                }
                self.counters.get_ids += 1;
                // A shorter buffer gets a truncated ID; the spec leaves it
                // unterminated when the serial fills all 20 bytes.
                let n = l.writable_len.min(ID_BYTES as u64) as usize;
                scatter(mem, &l.writable, &self.id[..n]).ok_or("GET_ID buffer unwritable")?;
                Ok(Outcome::Done(S_OK, n as u32 + 1))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.parse_discard(req_type, l, mem),
            _ => {
                self.counters.unsupported += 1;
                Ok(Outcome::Done(S_UNSUPP, 1))
            }
        }
    }

    fn parse_discard(&mut self, req_type: u32, l: &Layout, mem: &GuestRam) -> Result<Outcome, &'static str> {
        let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
        let feature = if zeroes { VIRTIO_BLK_F_WRITE_ZEROES } else { VIRTIO_BLK_F_DISCARD };
        if !self.acked(feature) {
            self.counters.unsupported += 1;
            return Ok(Outcome::Done(S_UNSUPP, 1));
        }
        if l.writable_len != 0 {
            return Err("discard/write-zeroes request with device-writable data");
        }
        // max_discard_seg and max_write_zeroes_seg are 1.
        if l.readable_len - HEADER_LEN != SEGMENT_LEN {
            return Err("discard/write-zeroes request without exactly one segment");
        }
        let mut seg = [0u8; SEGMENT_LEN as usize];
        gather(mem, &l.readable, HEADER_LEN, &mut seg).ok_or("segment unreadable")?;
        let sector = u64::from_le_bytes([seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7]]);
        let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Unknown flags, and unmap on a discard, must be refused as unsupported (§5.2.6.2).
        let allowed = if zeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        if flags & !allowed != 0 {
            self.counters.unsupported += 1;
            return Ok(Outcome::Done(S_UNSUPP, 1));
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err("discard/write-zeroes larger than advertised");
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = self.check_range(sector, len)?;
        if zeroes {
            self.counters.write_zeroes += 1;
        } else {
            self.counters.discards += 1;
        }
        if len == 0 {
            return Ok(Outcome::Done(S_OK, 1));
        }
        let (op, kind) = if zeroes {
            (Op::WriteZeroes { offset, len }, Kind::WriteZeroes)
        } else {
            (Op::Discard { offset, len }, Kind::Discard)
        };
        Ok(Outcome::Submit { op, read_into: Vec::new(), ok_len: 1, kind })
    }

    fn data_len(&self, len: u64) -> Result<u32, &'static str> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err("data length not a multiple of 512");
        }
        let max = u64::from(SIZE_MAX) * u64::from(self.queue_max_sizes[0] - 2);
        if len > max {
            return Err("data larger than seg_max * size_max");
        }
        u32::try_from(len).map_err(|_| "data larger than 4 GiB")
    }

    /// Byte offset of `sector`, if `len` bytes from there fit the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, &'static str> {
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or("sector overflows")?;
        let end = offset.checked_add(len).ok_or("sector range overflows")?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            return Err("sector range past the end of the disk");
        }
        Ok(offset)
    }

    /// Writes the status byte and returns the chain to the driver.
    fn finish(&mut self, active: &mut Active, head: u16, status_addr: GuestAddress, status: u8, len: u32) {
        if status == S_IOERR {
            self.counters.io_errors += 1;
        }
        if active.mem.write_obj(status, status_addr).is_err() {
            self.counters.guest_memory_errors += 1;
        }
        self.put_used(active, head, len);
    }

    fn put_used(&mut self, active: &mut Active, head: u16, len: u32) {
        if active.queue.add_used(&active.mem, head, len).is_err() {
            self.counters.guest_memory_errors += 1;
        }
    }

    fn complete(&mut self, active: &mut Active, c: Completion) {
        let Some(req) = self.in_flight.remove(&c.tag) else {
            self.counters.stale_completions += 1;
            return;
        };
        self.in_flight_bytes -= req.bytes;
        let (status, len) = match c.result {
            Ok(data) if req.kind == Kind::Read => {
                let expected = req.ok_len as usize - 1;
                if data.len() != expected {
                    self.counters.backend_errors += 1;
                    (S_IOERR, 1)
                } else if scatter(&active.mem, &req.read_into, &data).is_none() {
                    self.counters.guest_memory_errors += 1;
                    (S_IOERR, 1)
                } else {
                    self.counters.read_bytes += data.len() as u64;
                    (S_OK, req.ok_len)
                }
            }
            Ok(_) => {
                if req.kind == Kind::Write {
                    self.counters.write_bytes += req.bytes;
                }
                (S_OK, req.ok_len)
            }
            Err(e) => {
                self.counters.backend_errors += 1;
                if !matches!(e, BlockError::ReadOnly | BlockError::OutOfRange { .. }) {
                    log::warn!("virtio-blk: {:?} failed: {e}", req.kind);
                }
                (S_IOERR, 1)
            }
        };
        self.finish(active, req.head, req.status, status, len);
    }
}

/// Walks a chain, refusing what has no usable status byte: loops, chains
/// longer than the queue, broken links, and a last descriptor that is not
/// device-writable, is empty, or ends outside guest memory.
fn flatten(chain: DescriptorChain<&GuestRam>, queue_size: u16, mem: &GuestRam) -> Result<Layout, &'static str> {
    let mut descs = Vec::new();
    let mut last_has_next = false;
    for d in chain {
        if descs.len() >= usize::from(queue_size) {
            return Err("chain longer than the queue");
        }
        last_has_next = d.has_next();
        descs.push(d);
    }
    // The iterator stops early, with the last descriptor still pointing on,
    // on a loop, an out-of-range index or an unreadable descriptor.
    if last_has_next {
        return Err("chain loops or links to an invalid descriptor");
    }
    let Some(last) = descs.last() else {
        return Err("empty or unreadable chain");
    };
    if !last.is_write_only() || last.len() == 0 {
        return Err("last descriptor is not a device-writable status byte");
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .filter(|&a| mem.check_range(a, 1, Permissions::Write))
        .ok_or("status byte outside guest memory")?;
    let mut l =
        Layout { readable: Vec::new(), writable: Vec::new(), readable_len: 0, writable_len: 0, status, fault: None };
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let len = if i + 1 == n { d.len() - 1 } else { d.len() };
        if len == 0 {
            continue;
        }
        let seg = Seg { addr: d.addr(), len };
        let (perm, list, total) = if d.is_write_only() {
            (Permissions::Write, &mut l.writable, &mut l.writable_len)
        } else {
            if !l.writable.is_empty() {
                l.fault.get_or_insert("device-readable descriptor after a device-writable one");
            }
            (Permissions::Read, &mut l.readable, &mut l.readable_len)
        };
        if !mem.check_range(seg.addr, len as usize, perm) {
            l.fault.get_or_insert("buffer outside guest memory");
        }
        list.push(seg);
        *total += u64::from(len);
    }
    Ok(l)
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE,
        // which is not offered: the cache mode is the backend's business.
    }

    fn activate(
        &mut self,
        mem: GuestRam,
        mut queues: Vec<Queue>,
        acked_features: u64,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount { expected: 1, got: queues.len() });
        }
        let Some(queue) = queues.pop().filter(|q| q.ready()) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        self.acked_features = acked_features;
        self.throttled = false;
        self.broken = false;
        self.active = Some(Active { mem, queue, irq });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.throttled = false;
        self.broken = false;
    }

    fn queue_notify(&mut self, queue: u16) {
        if queue != 0 {
            return;
        }
        if let Some(mut active) = self.active.take() {
            self.process_queue(&mut active);
            self.active = Some(active);
        }
    }

    fn process_backend_events(&mut self) {
        let mut done = std::mem::take(&mut self.completions);
        self.backend.take_completions(&mut done);
        match self.active.take() {
            Some(mut active) => {
                let any = !done.is_empty();
                for c in done.drain(..) {
                    self.complete(&mut active, c);
                }
                if any {
                    self.signal(&mut active);
                }
                if self.throttled && !self.at_capacity(&active.queue) {
                    self.throttled = false;
                    self.process_queue(&mut active);
                }
                self.active = Some(active);
            }
            None => {
                self.counters.stale_completions += done.len() as u64;
                done.clear();
            }
        }
        self.completions = done;
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.backend.completion_fd())
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    fn drain(&mut self, timeout: Duration) -> Result<(), DrainTimeout> {
        let start = Instant::now();
        self.queue_notify(0);
        loop {
            self.process_backend_events();
            if self.in_flight.is_empty() && !self.throttled {
                return Ok(());
            }
            let waited = start.elapsed();
            let Some(left) = timeout.checked_sub(waited).filter(|d| !d.is_zero()) else {
                return Err(DrainTimeout { in_flight: self.in_flight.len(), waited });
            };
            let mut pfd = libc::pollfd { fd: self.backend.completion_fd(), events: libc::POLLIN, revents: 0 };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one valid pollfd on the stack, count 1; the fd is the
            // backend's and stays open for the call. An error or timeout only
            // means another trip round the loop.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
}
