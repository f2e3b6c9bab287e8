//! Devices of a Basalt VM: the MMIO bus, the serial console, virtio, the
//! tap that backs virtio-net and the DHCP server each NIC answers with.

pub mod bus;
pub mod dhcp;
pub mod pty;
pub mod serial;
pub mod tap;
pub mod virtio;
