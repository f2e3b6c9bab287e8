//! virtio devices and their virtio-mmio transport (virtio 1.2, modern only).
//!
//! A device model ([`VirtioDevice`]) knows nothing about MMIO: the
//! [`mmio::MmioTransport`] owns the register file, the status state machine,
//! feature negotiation, queue configuration and interrupt status, and hands
//! the device its memory, configured queues and an [`InterruptSink`] when the
//! driver sets DRIVER_OK.
//!
//! Wiring in a VM (one transport per device):
//! - the MMIO bus dispatches guest accesses in the transport's window to
//!   [`mmio::MmioTransport::read`] / [`mmio::MmioTransport::write`];
//! - each [`mmio::MmioTransport::queue_evts`] eventfd is a KVM ioeventfd on
//!   `base + mmio::NOTIFY_REG_OFFSET` with datamatch = queue index, and the
//!   event loop calls [`mmio::MmioTransport::handle_queue_event`] when it fires;
//! - [`mmio::MmioTransport::irq_evt`] is a KVM irqfd on the device's SPI
//!   (edge-triggered: irqfd without a resample fd pulses the line);
//! - the backend's completion fd ([`mmio::MmioTransport::backend_fd`]) is
//!   polled by the event loop, which calls
//!   [`mmio::MmioTransport::handle_backend_event`] when it is readable.
//!
//! Everything the guest controls (register values, descriptor tables, ring
//! indices, request headers) is validated; a misbehaving driver gets an error
//! status, a dropped request or an ignored register write, never a VMM panic
//! or an access outside guest memory.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestRam;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub mod block;
mod chain;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod tests;

pub use block::{BlockConfig, BlockCounters, BlockDeviceError, VirtioBlock, VirtioBlockState};
pub use mmio::{MmioCounters, MmioTransport, MmioTransportState, QueueSnapshot, RestoreError};
pub use net::{NetBackend, NetConfig, NetCounters, NetDeviceError, Offloads, VirtioNet, VirtioNetState};

/// InterruptStatus bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// How a device tells the driver something happened. The transport decides
/// what that means on the wire (for MMIO: an InterruptStatus bit and an
/// edge on the device's interrupt line).
pub trait InterruptSink: Send + Sync {
    fn signal_used_queue(&self);
    fn signal_config_change(&self);
}

/// The virtio-mmio interrupt: sets InterruptStatus bits that the transport
/// reads and the driver acknowledges, and writes an eventfd that the VMM
/// registers as a KVM irqfd.
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    evt: EventFd,
    /// Interrupts raised; a failed eventfd write still counts the attempt.
    raised: AtomicU64,
    failed: AtomicU64,
}

impl MmioInterrupt {
    pub fn new(status: Arc<AtomicU32>, config_generation: Arc<AtomicU32>, evt: EventFd) -> Self {
        MmioInterrupt { status, config_generation, evt, raised: AtomicU64::new(0), failed: AtomicU64::new(0) }
    }

    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        // The only failure is a counter overflow after 2^64-2 unread writes,
        // which cannot happen while KVM consumes the irqfd; the status bit is
        // set either way, so the next interrupt delivers this one too.
        if self.evt.write(1).is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl InterruptSink for MmioInterrupt {
    fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    fn signal_config_change(&self) {
        // The generation changes with every configuration change so that a
        // driver reading a multi-field value can tell it raced with one.
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("the device needs {expected} queue(s), {got} were configured")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("queue {index} is invalid: {reason}")]
    InvalidQueue { index: usize, reason: String },
    #[error("the device is already active")]
    AlreadyActive,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{in_flight} request(s) still in flight after {waited:?}")]
pub struct DrainTimeout {
    pub in_flight: usize,
    pub waited: Duration,
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is the slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver, including transport bits
    /// (VIRTIO_F_VERSION_1, ring features).
    fn device_features(&self) -> u64;
    /// Reads device configuration space. Bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device. `queues` has one entry per
    /// [`VirtioDevice::queue_max_sizes`] entry; the transport has checked that
    /// every ready queue lies in guest memory. `acked_features` is a subset
    /// of [`VirtioDevice::device_features`].
    fn activate(
        &mut self,
        mem: GuestRam,
        queues: Vec<Queue>,
        acked_features: u64,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its pre-activation state. Requests still in
    /// flight in the backend complete into nothing: guest memory is not
    /// touched after reset.
    fn reset(&mut self);
    /// The driver made buffers available on `queue`.
    fn queue_notify(&mut self, queue: u16);
    /// The backend's completion fd is readable.
    fn process_backend_events(&mut self);
    /// The fd to poll for backend completions, if the device has a backend.
    fn backend_fd(&self) -> Option<RawFd>;
    /// The active queues (empty before activation), for saving their positions.
    fn queues(&self) -> &[Queue];
    /// Processes everything the driver has made available and waits until
    /// no request is in flight, so that queue positions fully describe the
    /// device (call with vCPUs paused, before saving state).
    fn drain(&mut self, _timeout: Duration) -> Result<(), DrainTimeout> {
        Ok(())
    }
}

/// Reads a device's configuration space `config` at `offset`: bytes past
/// its end read as zero, as the transport promises the driver.
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(start) = usize::try_from(offset).ok().filter(|&o| o < config.len()) else {
        return;
    };
    let n = (config.len() - start).min(data.len());
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Logs the first occurrence of a guest-triggered problem at warn level and
/// the rest at debug: a hostile guest must not be able to flood the log.
pub(crate) fn log_guest_error(count: u64, what: std::fmt::Arguments<'_>) {
    if count <= 1 {
        log::warn!("{what} (further occurrences are logged at debug level)");
    } else {
        log::debug!("{what}");
    }
}
