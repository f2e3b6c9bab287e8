//! Devices of a Basalt VM: the MMIO bus, the serial console, virtio, and
//! the tap that backs virtio-net.

pub mod bus;
pub mod pty;
pub mod serial;
pub mod tap;
pub mod virtio;
