//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! Legacy (version 1) registers are not implemented: a legacy driver sees
//! Version 2 and gives up. Registers other than the configuration space are
//! 32 bits wide and aligned; any other access is ignored (reads return zero)
//! and counted.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{log_guest_error, ActivateError, DrainTimeout, InterruptSink, MmioInterrupt, VirtioDevice};
use crate::devices::bus::MmioDevice;

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
/// Reported in VendorID. Linux ignores it; it only has to be stable.
pub const VENDOR_ID: u32 = 0x5442_5342; // "BSBT", little endian
/// QueueNotify, for registering one ioeventfd per queue with datamatch.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
/// Bits a driver may set; DEVICE_NEEDS_RESET belongs to the device.
const DRIVER_STATUS_BITS: u32 = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED;

pub const STATE_VERSION: u32 = 1;

/// What the driver wrote into one queue's registers. Kept raw and validated
/// as a whole at DRIVER_OK, so that a bad write cannot leave a half-updated
/// [`Queue`] behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct QueueConfig {
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// One queue's saved state: its configuration and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u32,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's saved state. Restore it into a transport built around a
/// device of the same type and queue layout, after guest memory is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub version: u32,
    pub device_type: u32,
    pub status: u32,
    pub activated: bool,
    pub device_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueSnapshot>,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("state version {0} is not supported (expected {STATE_VERSION})")]
    Version(u32),
    #[error("state is for device type {saved}, this transport has {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("state has {saved} queue(s), the device has {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("queue {0}: maximum size differs from the device's")]
    QueueMaxSize(usize),
    #[error("acked features {acked:#x} are not all offered by this device ({offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("invalid status {0:#x}")]
    Status(u32),
    #[error("activating the device: {0}")]
    Activate(#[from] ActivateError),
}

/// Observability for the transport. Guest-caused problems are counted here
/// rather than logged one by one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MmioCounters {
    /// Accesses of the wrong width or alignment, or to no register.
    pub invalid_accesses: u64,
    /// Well-formed writes refused in the current state (features after
    /// FEATURES_OK, queue setup after DRIVER_OK, status bits out of order...).
    pub ignored_writes: u64,
    pub resets: u64,
    pub activations: u64,
    pub activation_failures: u64,
    /// FEATURES_OK refused because the driver accepted bits not offered or
    /// did not accept VIRTIO_F_VERSION_1.
    pub features_refused: u64,
    pub notifies: u64,
}

pub struct MmioTransport<D: ?Sized + VirtioDevice = dyn VirtioDevice> {
    mem: GuestRam,
    interrupt_status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    irq: Arc<MmioInterrupt>,
    queue_evts: Vec<EventFd>,
    status: u32,
    activated: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    counters: MmioCounters,
    device: Box<D>,
}

impl<D: ?Sized + VirtioDevice> MmioTransport<D> {
    /// `irq_evt` is the eventfd the VMM registers as the device's irqfd.
    pub fn new(device: Box<D>, mem: GuestRam, irq_evt: EventFd) -> std::io::Result<Self> {
        let n = device.queue_max_sizes().len();
        let queue_evts = (0..n).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let config_generation = Arc::new(AtomicU32::new(0));
        let irq = Arc::new(MmioInterrupt::new(interrupt_status.clone(), config_generation.clone(), irq_evt));
        Ok(MmioTransport {
            mem,
            interrupt_status,
            config_generation,
            irq,
            queue_evts,
            status: 0,
            activated: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues: vec![QueueConfig::default(); n],
            counters: MmioCounters::default(),
            device,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// One eventfd per queue, to register as KVM ioeventfds on
    /// `base + NOTIFY_REG_OFFSET` with datamatch = the queue's index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd given to [`MmioTransport::new`] (the irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        self.irq.evt()
    }

    /// The interrupt sink the device signals through; the VMM can use it to
    /// announce a configuration change (a resized disk).
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        self.irq.clone()
    }

    pub fn backend_fd(&self) -> Option<RawFd> {
        self.device.backend_fd()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn counters(&self) -> MmioCounters {
        self.counters
    }

    /// The event loop saw `queue_evts()[queue]` readable.
    pub fn handle_queue_event(&mut self, queue: usize) {
        if let Some(evt) = self.queue_evts.get(queue) {
            // Reading resets the counter; several kicks collapse into one pass
            // over the ring, which is what a kick means anyway.
            let _ = evt.read();
            self.notify(queue as u32);
        }
    }

    /// The event loop saw the backend's completion fd readable.
    pub fn handle_backend_event(&mut self) {
        // Also when not activated: completions of requests from before a
        // reset must be consumed so the fd stops being readable; the device
        // drops them without touching guest memory.
        self.device.process_backend_events();
    }

    /// Waits for the device to go quiet before its state is saved.
    pub fn drain(&mut self, timeout: Duration) -> Result<(), DrainTimeout> {
        if self.activated {
            self.device.drain(timeout)
        } else {
            Ok(())
        }
    }

    fn notify(&mut self, queue: u32) {
        self.counters.notifies += 1;
        if self.activated && (queue as usize) < self.queues.len() {
            self.device.queue_notify(queue as u16);
        }
    }

    fn invalid_access(&mut self, what: &str, offset: u64, width: usize) {
        self.counters.invalid_accesses += 1;
        log_guest_error(
            self.counters.invalid_accesses,
            format_args!("virtio-mmio: invalid {what} at {offset:#x} width {width}"),
        );
    }

    fn ignored_write(&mut self, offset: u64, value: u32) {
        self.counters.ignored_writes += 1;
        log_guest_error(
            self.counters.ignored_writes,
            format_args!("virtio-mmio: write {value:#x} to {offset:#x} ignored in status {:#x}", self.status),
        );
    }

    /// Guest read of `data.len()` bytes at `offset` in the transport window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                self.invalid_access("config read", offset, data.len());
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.invalid_access("read", offset, data.len());
            return;
        }
        let sel = self.queue_sel as usize;
        let v = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.device.queue_max_sizes().get(sel).map_or(0, |&m| u32::from(m)),
            REG_QUEUE_READY => self.queues.get(sel).map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            // No shared memory regions: a length of -1 says "no such region".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation.load(Ordering::SeqCst),
            _ => {
                self.invalid_access("read of a write-only or unknown register", offset, 4);
                return;
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data.len()` bytes at `offset` in the transport window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            // Configuration writes only make sense while the driver owns the
            // device and before it has failed it.
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                self.invalid_access("config write", offset, data.len());
            } else if self.status & S_DRIVER == 0 || self.status & S_FAILED != 0 {
                self.ignored_write(offset, 0);
            } else {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.invalid_access("write", offset, data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            self.invalid_access("write", offset, data.len());
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(v),
            // Selecting a shared memory region is harmless; none exists.
            REG_SHM_SEL => {}
            _ => self.invalid_access("write to a read-only or unknown register", offset, 4),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK only.
        let negotiating = self.status & (S_ACK | S_DRIVER) == (S_ACK | S_DRIVER)
            && self.status & (S_FEATURES_OK | S_FAILED | S_NEEDS_RESET) == 0;
        match self.driver_features_sel {
            0 if negotiating => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 if negotiating => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => self.ignored_write(REG_DRIVER_FEATURES, v),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        // Queues are configured after FEATURES_OK and before DRIVER_OK.
        let configuring =
            self.status & S_FEATURES_OK != 0 && self.status & (S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) == 0;
        let sel = self.queue_sel as usize;
        let Some(q) = self.queues.get_mut(sel).filter(|_| configuring) else {
            self.ignored_write(offset, v);
            return;
        };
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            REG_QUEUE_NUM => q.size = v,
            REG_QUEUE_READY => q.ready = v == 1,
            REG_QUEUE_DESC_LOW => q.desc = lo(q.desc),
            REG_QUEUE_DESC_HIGH => q.desc = hi(q.desc),
            REG_QUEUE_DRIVER_LOW => q.driver = lo(q.driver),
            REG_QUEUE_DRIVER_HIGH => q.driver = hi(q.driver),
            REG_QUEUE_DEVICE_LOW => q.device = lo(q.device),
            REG_QUEUE_DEVICE_HIGH => q.device = hi(q.device),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let added = v & !old;
        // The driver only ever adds bits (virtio 1.2 §3.1.1); clearing one,
        // or setting DEVICE_NEEDS_RESET or an undefined bit, is not a step of
        // the initialization sequence. Once the device or the driver gave up
        // (NEEDS_RESET, FAILED) only a reset or FAILED itself is accepted.
        let in_order = v & old == old
            && added & !DRIVER_STATUS_BITS == 0
            && (added & S_ACK == 0 || old == 0)
            && (added & S_DRIVER == 0 || v & S_ACK != 0)
            && (added & S_FEATURES_OK == 0 || old & S_DRIVER != 0)
            && (added & S_DRIVER_OK == 0 || old & S_FEATURES_OK != 0)
            && (added & !S_FAILED == 0 || old & (S_FAILED | S_NEEDS_RESET) == 0);
        if !in_order {
            self.ignored_write(REG_STATUS, v);
            return;
        }
        let mut new = v;
        if added & S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear is how the device refuses: the driver
            // reads the status back and gives up.
            self.counters.features_refused += 1;
            log_guest_error(
                self.counters.features_refused,
                format_args!(
                    "virtio-mmio: refusing driver features {:#x} (offered {:#x})",
                    self.acked_features,
                    self.device.device_features()
                ),
            );
            new &= !S_FEATURES_OK;
            // DRIVER_OK cannot follow a refused FEATURES_OK in the same write.
            new &= !S_DRIVER_OK;
        }
        self.status = new;
        if added & S_DRIVER_OK != 0 && new & S_DRIVER_OK != 0 {
            match self.activate() {
                Ok(()) => {
                    self.activated = true;
                    self.counters.activations += 1;
                }
                Err(e) => {
                    self.counters.activation_failures += 1;
                    log_guest_error(
                        self.counters.activation_failures,
                        format_args!("virtio-mmio: device type {} not activated: {e}", self.device.device_type()),
                    );
                    self.status |= S_NEEDS_RESET;
                    // With DRIVER_OK set, NEEDS_RESET must be announced by a
                    // configuration change notification (§2.1.2).
                    self.irq.signal_config_change();
                }
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        self.acked_features & !offered == 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Builds the device's queues from what the driver wrote, checking each
    /// ready one: size a power of two no larger than the maximum, rings
    /// aligned and inside guest memory.
    fn build_queues(&self, positions: Option<&[QueueSnapshot]>) -> Result<Vec<Queue>, ActivateError> {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let max_sizes = self.device.queue_max_sizes();
        let mut out = Vec::with_capacity(self.queues.len());
        for (index, (cfg, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
            let invalid = |reason: String| ActivateError::InvalidQueue { index, reason };
            let mut q = Queue::new(max).map_err(|e| invalid(format!("maximum size {max}: {e}")))?;
            if cfg.ready {
                let size = u16::try_from(cfg.size).map_err(|_| invalid(format!("size {}", cfg.size)))?;
                q.try_set_size(size).map_err(|e| invalid(format!("size {size}: {e}")))?;
                q.try_set_desc_table_address(GuestAddress(cfg.desc))
                    .map_err(|e| invalid(format!("descriptor table {:#x}: {e}", cfg.desc)))?;
                q.try_set_avail_ring_address(GuestAddress(cfg.driver))
                    .map_err(|e| invalid(format!("available ring {:#x}: {e}", cfg.driver)))?;
                q.try_set_used_ring_address(GuestAddress(cfg.device))
                    .map_err(|e| invalid(format!("used ring {:#x}: {e}", cfg.device)))?;
                // virtio-queue takes an available ring at 0 for an unconfigured queue.
                if cfg.driver == 0 {
                    return Err(invalid("available ring at address 0".into()));
                }
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(invalid("rings are not inside guest memory".into()));
                }
                if let Some(p) = positions.and_then(|p| p.get(index)) {
                    q.set_next_avail(p.next_avail);
                    q.set_next_used(p.next_used);
                }
            }
            out.push(q);
        }
        Ok(out)
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        self.activate_with(None)
    }

    fn activate_with(&mut self, positions: Option<&[QueueSnapshot]>) -> Result<(), ActivateError> {
        let queues = self.build_queues(positions)?;
        let irq: Arc<dyn InterruptSink> = self.irq.clone();
        self.device.activate(self.mem.clone(), queues, self.acked_features, irq)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(|q| *q = QueueConfig::default());
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.counters.resets += 1;
    }

    /// Saves the transport. With requests in flight the saved queue
    /// positions would skip them: call [`MmioTransport::drain`] first.
    pub fn save(&self) -> MmioTransportState {
        let active = self.device.queues();
        let queues = self
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
            .map(|(i, (cfg, &max_size))| {
                let (next_avail, next_used) = match active.get(i) {
                    Some(q) if self.activated => (q.next_avail(), q.next_used()),
                    _ => (0, 0),
                };
                QueueSnapshot {
                    max_size,
                    size: cfg.size,
                    ready: cfg.ready,
                    desc_table: cfg.desc,
                    avail_ring: cfg.driver,
                    used_ring: cfg.device,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        MmioTransportState {
            version: STATE_VERSION,
            device_type: self.device.device_type(),
            status: self.status,
            activated: self.activated,
            device_features: self.device.device_features(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            queues,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.config_generation.load(Ordering::SeqCst),
        }
    }

    /// Restores a saved transport, activating the device if it was active.
    /// Guest memory must already hold the saved contents. On error the
    /// transport is left reset.
    pub fn restore(&mut self, s: &MmioTransportState) -> Result<(), RestoreError> {
        if s.version != STATE_VERSION {
            return Err(RestoreError::Version(s.version));
        }
        let actual = self.device.device_type();
        if s.device_type != actual {
            return Err(RestoreError::DeviceType { saved: s.device_type, actual });
        }
        let max_sizes = self.device.queue_max_sizes();
        if s.queues.len() != max_sizes.len() {
            return Err(RestoreError::QueueCount { saved: s.queues.len(), actual: max_sizes.len() });
        }
        if let Some(i) = s.queues.iter().zip(max_sizes).position(|(q, &m)| q.max_size != m) {
            return Err(RestoreError::QueueMaxSize(i));
        }
        // Mid-negotiation the register may hold anything the driver wrote;
        // once FEATURES_OK is set it must be something this device offers.
        let offered = self.device.device_features();
        if s.status & S_FEATURES_OK != 0 && s.acked_features & !offered != 0 {
            return Err(RestoreError::Features { acked: s.acked_features, offered });
        }
        if s.status & !(DRIVER_STATUS_BITS | S_NEEDS_RESET) != 0 || (s.activated && s.status & S_DRIVER_OK == 0) {
            return Err(RestoreError::Status(s.status));
        }
        self.reset();
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        for (cfg, q) in self.queues.iter_mut().zip(&s.queues) {
            *cfg = QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: q.desc_table,
                driver: q.avail_ring,
                device: q.used_ring,
            };
        }
        self.interrupt_status.store(s.interrupt_status, Ordering::SeqCst);
        self.config_generation.store(s.config_generation, Ordering::SeqCst);
        if s.activated {
            if let Err(e) = self.activate_with(Some(&s.queues)) {
                self.reset();
                return Err(e.into());
            }
            self.activated = true;
        }
        Ok(())
    }
}

impl<D: ?Sized + VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}
