//! What both fuzz targets share: a virtio-blk device on its MMIO transport,
//! backed by a small temporary file, with guest memory at address 0 (so that
//! small numbers in fuzz input are valid guest addresses).

use std::time::Duration;

use basalt_storage::FileBackend;
use basalt_vmm::devices::virtio::{BlockConfig, MmioTransport, VirtioBlock};
use basalt_vmm::memory::GuestRam;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const MEM_SIZE: usize = 64 * 1024;
pub const DISK_SIZE: u64 = 64 * 1024;
pub const MAX_QUEUE: u16 = 16;
/// Ring layout used by the seeds and by `init`.
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x100;
pub const USED: u64 = 0x200;

pub const S_ACK: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;

pub struct Rig {
    pub t: MmioTransport<VirtioBlock>,
    pub mem: GuestRam,
    file: tempfile::NamedTempFile,
    read_only: bool,
}

fn temp_disk() -> tempfile::NamedTempFile {
    // tmpfs when there is one: a file per input must be cheap.
    let f = tempfile::NamedTempFile::new_in("/dev/shm")
        .or_else(|_| tempfile::NamedTempFile::new())
        .expect("temporary disk");
    f.as_file().set_len(DISK_SIZE).expect("size the disk");
    f
}

fn device(file: &tempfile::NamedTempFile, read_only: bool) -> VirtioBlock {
    let backend = FileBackend::open(file.path(), read_only).expect("open disk");
    VirtioBlock::new(Box::new(backend), BlockConfig { serial: "fuzz".into(), queue_size: MAX_QUEUE }).expect("device")
}

impl Rig {
    pub fn new(read_only: bool) -> Self {
        let file = temp_disk();
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let t = MmioTransport::new(
            Box::new(device(&file, read_only)),
            mem.clone(),
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        )
        .expect("transport");
        Rig { t, mem, file, read_only }
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The Linux driver's sequence; returns whether the device went live.
    pub fn init(&mut self, drop_features: u64, queue_size: u32) -> bool {
        self.w32(0x70, 0);
        self.w32(0x70, S_ACK);
        self.w32(0x70, S_ACK | S_DRIVER);
        self.w32(0x14, 0);
        let lo = self.r32(0x10);
        self.w32(0x14, 1);
        let hi = self.r32(0x10);
        let f = ((u64::from(hi) << 32) | u64::from(lo)) & !drop_features;
        self.w32(0x24, 0);
        self.w32(0x20, f as u32);
        self.w32(0x24, 1);
        self.w32(0x20, (f >> 32) as u32);
        self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        self.w32(0x30, 0);
        self.w32(0x38, queue_size);
        self.w32(0x80, DESC as u32);
        self.w32(0x84, 0);
        self.w32(0x90, AVAIL as u32);
        self.w32(0x94, 0);
        self.w32(0xa0, USED as u32);
        self.w32(0xa4, 0);
        self.w32(0x44, 1);
        self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        self.t.is_activated()
    }

    pub fn kick(&mut self) {
        self.w32(0x50, 0);
        self.t.handle_backend_event();
    }

    /// Drain, save, build a fresh device on the same disk and memory,
    /// restore: must always succeed and reproduce the same state.
    pub fn save_restore(&mut self) {
        self.t.drain(Duration::from_secs(10)).expect("file backend drains");
        assert_eq!(self.t.device().in_flight(), 0);
        let state = self.t.save();
        let blk_state = self.t.device().save();
        let mut blk = device(&self.file, self.read_only);
        blk.restore(&blk_state).expect("same disk");
        let mut t = MmioTransport::new(Box::new(blk), self.mem.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .expect("transport");
        t.restore(&state).expect("a saved state restores");
        assert_eq!(t.save(), state, "restore reproduces the saved state");
        self.t = t;
    }
}

/// virtio-net's rig: the receive ring at [`DESC`]/[`AVAIL`]/[`USED`], the
/// transmit ring at [`TX_DESC`]/[`TX_AVAIL`]/[`TX_USED`], and a backend that
/// hands the device the frames it is given and swallows what it sends.
pub mod net {
    use std::collections::VecDeque;
    use std::io::IoSlice;
    use std::os::fd::RawFd;
    use std::sync::{Arc, Mutex};

    use basalt_vmm::devices::dhcp::Lease;
    use basalt_vmm::devices::virtio::{MmioTransport, NetBackend, NetConfig, Offloads, VirtioNet};
    use basalt_vmm::memory::GuestRam;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    pub const TX_DESC: u64 = 0x300;
    pub const TX_AVAIL: u64 = 0x400;
    pub const TX_USED: u64 = 0x500;

    #[derive(Clone, Default)]
    pub struct Frames {
        pub inbound: Arc<Mutex<VecDeque<Vec<u8>>>>,
        pub sent: Arc<Mutex<usize>>,
    }

    impl NetBackend for Frames {
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            Ok(self.inbound.lock().expect("lock").pop_front().map(|f| {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                n
            }))
        }
        fn send(&mut self, parts: &[IoSlice<'_>]) -> std::io::Result<()> {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            assert!(len <= basalt_vmm::devices::virtio::net::MAX_FRAME, "the device sent {len} bytes");
            *self.sent.lock().expect("lock") += 1;
            Ok(())
        }
        fn set_offloads(&mut self, _o: Offloads) -> std::io::Result<()> {
            Ok(())
        }
        fn fd(&self) -> Option<RawFd> {
            None
        }
    }

    pub struct NetRig {
        pub t: MmioTransport<VirtioNet>,
        pub mem: GuestRam,
        pub frames: Frames,
    }

    pub const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    /// The NIC under test: its own DHCP server on, so every transmitted
    /// frame also passes through it.
    pub fn config() -> NetConfig {
        let dhcp = Lease { address: [10, 10, 0, 7].into(), prefix: 24, gateway: Some([10, 10, 0, 1].into()), hostname: None };
        NetConfig { mac: MAC, queue_size: MAX_QUEUE, mtu: Some(1450), dhcp: Some(dhcp) }
    }

    impl NetRig {
        pub fn new() -> Self {
            let frames = Frames::default();
            let dev =
                VirtioNet::new(Box::new(frames.clone()), config()).expect("device");
            let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
            let t = MmioTransport::new(Box::new(dev), mem.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd"))
                .expect("transport");
            NetRig { t, mem, frames }
        }

        fn w32(&mut self, off: u64, v: u32) {
            self.t.write(off, &v.to_le_bytes());
        }

        fn r32(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(off, &mut b);
            u32::from_le_bytes(b)
        }

        /// The Linux driver's sequence with both queues; whether it went live.
        pub fn init(&mut self, drop_features: u64, queue_size: u32) -> bool {
            self.w32(0x70, 0);
            self.w32(0x70, S_ACK | S_DRIVER);
            self.w32(0x14, 0);
            let lo = self.r32(0x10);
            self.w32(0x14, 1);
            let hi = self.r32(0x10);
            let f = ((u64::from(hi) << 32) | u64::from(lo)) & !drop_features;
            self.w32(0x24, 0);
            self.w32(0x20, f as u32);
            self.w32(0x24, 1);
            self.w32(0x20, (f >> 32) as u32);
            self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
            for (q, (d, a, u)) in [(DESC, AVAIL, USED), (TX_DESC, TX_AVAIL, TX_USED)].into_iter().enumerate() {
                self.w32(0x30, q as u32);
                self.w32(0x38, queue_size);
                for (reg, addr) in [(0x80, d), (0x90, a), (0xa0, u)] {
                    self.w32(reg, addr as u32);
                    self.w32(reg + 4, 0);
                }
                self.w32(0x44, 1);
            }
            self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
            self.t.is_activated()
        }
    }

    impl Default for NetRig {
        fn default() -> Self {
            Self::new()
        }
    }
}
