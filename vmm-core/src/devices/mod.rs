//! Devices of a Basalt VM: the MMIO bus, the serial console, virtio.

pub mod bus;
pub mod pty;
pub mod serial;
pub mod virtio;
