//! One VM: guest memory, vCPUs, the vGICv3, devices on the MMIO bus.
//!
//! - this module builds a VM ([`Vm::new`] boots it, [`Vm::restore`] loads a
//!   snapshot, [`Vm::incoming`] waits for a migration) and applies a saved
//!   state to it ([`Vm::apply_state`]), the one restore path for snapshots
//!   and migrations;
//! - [`run`]: the vCPU threads and the event loop serving devices and the
//!   control socket, and the state walk that saves a VM;
//! - [`migration`]: this VM as the migration code sees it (source and sink).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::aarch64::gic::{Its, VGicV3};
use crate::arch::aarch64::{boot, fdt, layout, regs, vcpu};
use crate::config::{ConsoleConfig, DiskBackend, DiskConfig, VmConfig};
use crate::devices::bus::MmioBus;
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::virtio::block::{BlockConfig, VirtioBlock};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::{self, NetConfig, VirtioNet};
use crate::memory::{GuestRam, MemSlot};
use crate::migration::compat::{DiskShape, HostCaps, Offer, VmShape};
use crate::persist::{StateError, VmState};
use basalt_storage::BlockBackend;
use kvm_ioctls::IoEventAddress;

pub mod migration;
pub mod run;

type Disk = Arc<Mutex<MmioTransport<VirtioBlock>>>;
type Nic = Arc<Mutex<MmioTransport<VirtioNet>>>;

/// Opens a disk's backend: a raw file (or block device), or an RBD image,
/// with its exclusive lock unless `lock` is false (a migration target opens
/// its disks unlocked and takes the locks just before the guest resumes).
#[cfg_attr(not(feature = "rbd"), allow(unused_variables))]
fn open_disk(i: usize, d: &DiskConfig, lock: bool) -> Result<Box<dyn BlockBackend>, VmError> {
    match &d.backend {
        DiskBackend::File { path } => basalt_storage::FileBackend::open(path, d.read_only)
            .map(|b| Box::new(b) as Box<dyn BlockBackend>)
            .map_err(|e| VmError::Setup(format!("disk {i}: {}: {e}", path.display()))),
        #[cfg(feature = "rbd")]
        DiskBackend::Rbd { pool, image, client } => {
            use basalt_storage::ceph::{ClientConfig, Cluster};
            let cfg = ClientConfig {
                conf: client.conf.clone(),
                id: client.id.clone().unwrap_or_else(|| "admin".into()),
                keyring: client.keyring.clone(),
                options: vec![],
            };
            let c = Cluster::connect(&cfg).map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            let io = c.ioctx(pool).map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            basalt_storage::RbdBackend::open(&io, image, lock, d.read_only)
                .map(|b| Box::new(b) as Box<dyn BlockBackend>)
                .map_err(|e| VmError::Setup(format!("disk {i}: {e}")))
        }
        #[cfg(not(feature = "rbd"))]
        DiskBackend::Rbd { .. } => {
            Err(VmError::Setup(format!("disk {i}: this basalt-vmm was built without RBD support (feature `rbd`)")))
        }
    }
}

/// Why a VM stopped. The binary turns it into its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest asked for a reset (PSCI SYSTEM_RESET).
    Reset,
    /// Stopped on request (control socket, signal).
    Stopped,
    /// The guest or KVM failed in a way that ends the VM.
    Crashed(String),
    /// Asked to replace this VM with the snapshot in this directory.
    Restore(std::path::PathBuf),
    /// The guest now runs in the VMM at this address: this one is done.
    Migrated(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Gic(#[from] crate::arch::aarch64::gic::GicError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("device tree: {0}")]
    Fdt(String),
    #[error("console: {0}")]
    Console(std::io::Error),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    State(#[from] crate::persist::StateError),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}

/// State the vCPU threads and the VMM thread share.
pub struct VcpuShared {
    stop: AtomicBool,
    pause: AtomicBool,
    paused_count: AtomicUsize,
    exit: Mutex<Option<VmExit>>,
    exit_evt: EventFd,
    /// Share of each vCPU's time spent parked (live migration's auto-converge).
    throttle_pct: AtomicU8,
    /// Exits handled in userspace, per vCPU, for the counters view.
    pub mmio_exits: Vec<AtomicU64>,
}

impl VcpuShared {
    fn finish(&self, why: VmExit) {
        let mut e = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(why);
        }
        let _ = self.exit_evt.write(1);
    }
}

/// KVM_CAP_COUNTER_OFFSET (Linux 6.4): one counter offset for the whole VM.
const KVM_CAP_COUNTER_OFFSET: u32 = 227;
vmm_sys_util::ioctl_iow_nr!(
    KVM_ARM_SET_COUNTER_OFFSET,
    kvm_bindings::KVMIO,
    0xb5,
    kvm_bindings::kvm_arm_counter_offset
);

pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    mem: GuestRam,
    slots: Vec<MemSlot>,
    vcpus: Vec<VcpuFd>,
    mpidrs: Vec<u64>,
    gic: VGicV3,
    its: Option<Its>,
    bus: MmioBus,
    pub serial: Arc<Mutex<SerialDevice>>,
    disks: Vec<Disk>,
    nics: Vec<Nic>,
    /// The console's pseudo-terminal, when it has one: read for guest input.
    pty: Option<crate::devices::pty::Pty>,
    console_path: Option<std::path::PathBuf>,
    shared: Arc<VcpuShared>,
    mem_size: u64,
    cfg: VmConfig,
    caps: HostCaps,
    /// The migration that brought this VM here, for `migrate-status`.
    arrived: Option<crate::migration::StatusCell>,
    /// Guest RAM's mapping: declared last so it is unmapped after every
    /// field holding a view of it (devices, `mem`) is gone.
    _ram: crate::memory::Mapping,
}

impl Vm {
    /// A VM that boots `cfg`'s kernel.
    pub fn new(cfg: &VmConfig) -> Result<Vm, VmError> {
        let mut vm = Self::build(cfg, true)?;
        vm.boot()?;
        Ok(vm)
    }

    /// A fresh VM in the state of the snapshot in `dir`.
    pub fn restore(cfg: &VmConfig, dir: &std::path::Path) -> Result<Vm, VmError> {
        let state = VmState::read(dir)?;
        let mut vm = Self::build(cfg, true)?;
        // Devices re-activate from guest memory on restore: it goes in first.
        state.load_memory(dir, &vm.mem)?;
        vm.apply_state(&state)?;
        Ok(vm)
    }

    /// A VM built to receive a live migration: memory, vCPUs, vGIC and
    /// devices exist, nothing boots, and the disks are open without their
    /// locks, which are taken once the guest has arrived.
    pub fn incoming(cfg: &VmConfig) -> Result<Vm, VmError> {
        Self::build(cfg, false)
    }

    fn build(cfg: &VmConfig, lock_disks: bool) -> Result<Vm, VmError> {
        cfg.validate()?;
        let kvm_ = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let fd = kvm_.create_vm().map_err(kvm("create VM"))?;

        let mem_size = cfg.memory_bytes();
        let (mem, ram, slots) =
            crate::memory::create(&fd, layout::RAM_BASE, mem_size as usize).map_err(VmError::Memory)?;

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            vcpus.push(fd.create_vcpu(u64::from(id)).map_err(kvm(format!("create vCPU {id}")))?);
        }
        let mut gic = VGicV3::create(&fd, u64::from(cfg.vcpus))?;
        let mut mpidrs = Vec::new();
        for (id, v) in vcpus.iter().enumerate() {
            vcpu::init(&fd, v, id as u32).map_err(kvm(format!("init vCPU {id}")))?;
            mpidrs.push(vcpu::mpidr(v).map_err(kvm("read MPIDR"))?);
        }
        // KVM requires every vCPU to exist before the vGIC is initialised.
        gic.finalize_with(&mpidrs)?;
        let its = if cfg.its { Some(Its::create(&fd)?) } else { None };
        let caps = host_caps(&kvm_, &fd, &vcpus[0], &gic)?;

        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        let shared = Arc::new(VcpuShared {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused_count: AtomicUsize::new(0),
            exit: Mutex::new(None),
            exit_evt,
            throttle_pct: AtomicU8::new(0),
            mmio_exits: (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect(),
        });

        let mut bus = MmioBus::default();
        let mut pty = None;
        let mut console_path = None;
        let out: ConsoleOut = match &cfg.console {
            ConsoleConfig::Stdout => Box::new(std::io::stdout()),
            // Appended to, so a reset or restored VM continues the same log.
            ConsoleConfig::File { path } => {
                Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(VmError::Console)?)
            }
            ConsoleConfig::None => Box::new(std::io::sink()),
            ConsoleConfig::Pty => {
                let p = crate::devices::pty::Pty::open().map_err(VmError::Console)?;
                eprintln!("basalt-vmm: console on {}", p.path.display());
                let out = p.master.try_clone().map_err(VmError::Console)?;
                console_path = Some(p.path.clone());
                pty = Some(p);
                Box::new(out)
            }
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        fd.register_irqfd(&serial_irq, layout::spi_gsi(layout::SERIAL_SPI)).map_err(kvm("serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        bus.insert(layout::SERIAL_BASE, layout::SERIAL_SIZE, serial.clone())
            .map_err(|e| VmError::Setup(e.to_string()))?;

        let mut disks: Vec<Disk> = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let serial = d.serial.clone().unwrap_or_else(|| format!("basalt-disk{i}"));
            let blk = VirtioBlock::new(open_disk(i, d, lock_disks)?, BlockConfig { serial, ..BlockConfig::default() })
                .map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            let (base, spi) = disk_window(i);
            let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
            fd.register_irqfd(&irq, layout::spi_gsi(spi)).map_err(kvm(format!("disk {i} irqfd")))?;
            let t = MmioTransport::new(Box::new(blk), mem.clone(), irq)
                .map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            for (q, evt) in t.queue_evts().iter().enumerate() {
                fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), q as u32)
                    .map_err(kvm(format!("disk {i} ioeventfd")))?;
            }
            let t = Arc::new(Mutex::new(t));
            bus.insert(base, layout::VIRTIO_MMIO_SIZE, t.clone()).map_err(|e| VmError::Setup(e.to_string()))?;
            disks.push(t);
        }

        let mut nics: Vec<Nic> = Vec::new();
        for (i, n) in cfg.nics.iter().enumerate() {
            let setup = |e: String| VmError::Setup(format!("nic {i}: {e}"));
            let mac = crate::config::parse_mac(&n.mac).map_err(setup)?;
            let tap = crate::devices::tap::Tap::open(&n.tap).map_err(|e| setup(e.to_string()))?;
            let dev = VirtioNet::new(
                Box::new(tap),
                NetConfig { mac, queue_size: net::DEFAULT_QUEUE_SIZE, mtu: n.mtu, dhcp: n.dhcp.clone() },
            )
            .map_err(|e| setup(e.to_string()))?;
            let (base, spi) = nic_window(i);
            let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
            fd.register_irqfd(&irq, layout::spi_gsi(spi)).map_err(kvm(format!("nic {i} irqfd")))?;
            let t = MmioTransport::new(Box::new(dev), mem.clone(), irq).map_err(|e| setup(e.to_string()))?;
            for (q, evt) in t.queue_evts().iter().enumerate() {
                fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), q as u32)
                    .map_err(kvm(format!("nic {i} ioeventfd")))?;
            }
            let t = Arc::new(Mutex::new(t));
            bus.insert(base, layout::VIRTIO_MMIO_SIZE, t.clone()).map_err(|e| VmError::Setup(e.to_string()))?;
            nics.push(t);
        }

        Ok(Vm {
            _kvm: kvm_,
            fd: Arc::new(fd),
            mem,
            slots,
            vcpus,
            mpidrs,
            gic,
            its,
            bus,
            serial,
            disks,
            nics,
            pty,
            console_path,
            shared,
            mem_size,
            cfg: cfg.clone(),
            caps,
            arrived: None,
            _ram: ram,
        })
    }

    /// Loads the kernel, initrd and device tree and points vCPU 0 at them.
    fn boot(&mut self) -> Result<(), VmError> {
        let image = boot::load(&self.mem, self.mem_size, &self.cfg.kernel, self.cfg.initrd.as_deref())?;
        let virtio: Vec<(u64, u32)> =
            (0..self.disks.len()).map(disk_window).chain((0..self.nics.len()).map(nic_window)).collect();
        let tree = fdt::create_fdt(&fdt::FdtParams {
            mpidrs: &self.mpidrs,
            mem_size: self.mem_size,
            cmdline: &self.cfg.cmdline,
            initrd: image.initrd,
            virtio: &virtio,
            its: self.cfg.its,
        })
        .map_err(|e| VmError::Fdt(e.to_string()))?;
        boot::write_fdt(&self.mem, image.fdt, &tree)?;
        vcpu::set_boot_regs(&self.vcpus[0], image.entry, image.fdt).map_err(kvm("set boot registers"))?;
        Ok(())
    }

    /// Puts a saved state into this freshly built VM, whose guest memory
    /// already holds the saved RAM: vCPUs (with one counter offset for the
    /// whole VM), vGIC, ITS, console, and each disk's device and transport.
    pub fn apply_state(&mut self, state: &VmState) -> Result<(), VmError> {
        use crate::persist::Persist;
        state.check()?;
        if state.vcpus.len() != self.cfg.vcpus as usize || state.memory_bytes != self.mem_size {
            return Err(StateError::Shape(format!(
                "the saved VM has {} vCPUs and {} MiB, this one {} and {} MiB",
                state.vcpus.len(),
                state.memory_bytes >> 20,
                self.cfg.vcpus,
                self.mem_size >> 20
            ))
            .into());
        }
        if state.nics.len() != self.nics.len() {
            return Err(StateError::Shape(format!(
                "the saved VM has {} NICs, this one {}",
                state.nics.len(),
                self.nics.len()
            ))
            .into());
        }
        if state.virtio.len() != self.disks.len() {
            return Err(StateError::Shape(format!(
                "the saved VM has {} disks, this one {}",
                state.virtio.len(),
                self.disks.len()
            ))
            .into());
        }
        let mut skip = self.set_counter_offset(state)?;
        // The feature ID registers the sender's vCPUs show (the same on
        // every vCPU). Those that already hold the sent value here are not
        // written back: that changes nothing and costs an ioctl each (a
        // migration's receiver compared them all at the hello).
        let sent: Vec<(u64, u64)> = state
            .vcpus
            .first()
            .map_or(&[][..], |v| v.regs.as_slice())
            .iter()
            .filter_map(|(id, b)| {
                let value = u64::from_le_bytes(<[u8; 8]>::try_from(b.as_slice()).ok()?);
                regs::is_feature_id_reg(*id).then_some((*id, value))
            })
            .collect();
        skip.extend(sent.iter().filter(|s| self.caps.id_regs.contains(s)).map(|(id, _)| *id));
        // Each vCPU on its own thread: the ioctls of one vCPU do not wait
        // for another's, and a migration's downtime is mostly these.
        let skip = &skip;
        std::thread::scope(|scope| {
            let restores: Vec<_> = self
                .vcpus
                .iter()
                .zip(&state.vcpus)
                .map(|(v, st)| scope.spawn(move || vcpu::restore_regs(v, st, skip)))
                .collect();
            for (i, r) in restores.into_iter().enumerate() {
                let r = r.join().unwrap_or_else(|_| Err(kvm_ioctls::Error::new(libc::EIO)));
                r.map_err(kvm(format!("restore vCPU {i}")))?;
            }
            Ok::<(), VmError>(())
        })?;
        // What the guest sees now (a restore may have narrowed a feature
        // where KVM lets it): a later save and a migration's offer use these.
        for (id, value) in &mut self.caps.id_regs {
            if let Some((_, v)) = sent.iter().find(|(i, _)| i == id) {
                *value = *v;
            }
        }
        self.gic.restore(&state.gic)?;
        match (&mut self.its, &state.its) {
            (Some(its), Some(st)) => its.restore(st)?,
            (None, None) => {}
            _ => return Err(StateError::Shape("the saved VM and the config disagree on the ITS".into()).into()),
        }
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&state.serial)
            .map_err(|e| VmError::Setup(format!("restore the serial console: {e}")))?;
        for (i, (disk, v)) in self.disks.iter().zip(&state.virtio).enumerate() {
            let st: run::DiskState =
                serde_json::from_value(v.clone()).map_err(|e| VmError::Setup(format!("disk {i} state: {e}")))?;
            let mut t = disk.lock().unwrap_or_else(|p| p.into_inner());
            t.device_mut().restore(&st.block).map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            t.restore(&st.transport).map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
        }
        for (i, (nic, v)) in self.nics.iter().zip(&state.nics).enumerate() {
            let st: run::NicState =
                serde_json::from_value(v.clone()).map_err(|e| VmError::Setup(format!("nic {i} state: {e}")))?;
            let mut t = nic.lock().unwrap_or_else(|p| p.into_inner());
            t.device_mut().restore(&st.net).map_err(|e| VmError::Setup(format!("nic {i}: {e}")))?;
            t.restore(&st.transport).map_err(|e| VmError::Setup(format!("nic {i}: {e}")))?;
        }
        Ok(())
    }

    /// Where the kernel has KVM_ARM_SET_COUNTER_OFFSET, sets the VM's one
    /// counter offset so the guest's counters continue from the saved value
    /// (virtual and physical alike), and returns the counter registers the
    /// vCPU restore must then skip. Without it (Linux < 6.4) the saved
    /// KVM_REG_ARM_TIMER_CNT is written back instead, which sets the same
    /// offset for the virtual counter, and the physical one is left alone.
    fn set_counter_offset(&self, state: &VmState) -> Result<Vec<u64>, VmError> {
        if !self.caps.counter_offset {
            return Ok(vec![]);
        }
        let Some(saved) = state.guest_counter() else { return Ok(vec![]) };
        let off =
            kvm_bindings::kvm_arm_counter_offset { counter_offset: host_counter().wrapping_sub(saved), reserved: 0 };
        // SAFETY: a VM fd; the argument is a live struct of the size the
        // ioctl reads. KVM refuses it (EBUSY) once a vCPU has run, and this
        // VM's have not.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*self.fd, KVM_ARM_SET_COUNTER_OFFSET(), &off) };
        if r < 0 {
            return Err(VmError::Setup(format!("KVM_ARM_SET_COUNTER_OFFSET: {}", std::io::Error::last_os_error())));
        }
        Ok(vec![regs::TIMER_CNT, regs::PTIMER_CNT])
    }

    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// The feature ID registers every vCPU of this VM shows: read from KVM
    /// when the VM was built, or the values a restore wrote.
    pub(crate) fn known_id_regs(&self) -> &[(u64, u64)] {
        &self.caps.id_regs
    }

    pub fn memory_size(&self) -> u64 {
        self.mem_size
    }

    /// What a migration target compares with its own before taking this VM.
    pub fn offer(&self) -> Offer {
        let disks = self
            .cfg
            .disks
            .iter()
            .zip(&self.disks)
            .map(|(d, t)| {
                let (kind, target) = match &d.backend {
                    DiskBackend::File { path } => ("file", path.display().to_string()),
                    DiskBackend::Rbd { pool, image, .. } => ("rbd", format!("{pool}/{image}")),
                };
                let t = t.lock().unwrap_or_else(|p| p.into_inner());
                DiskShape {
                    kind: kind.into(),
                    target,
                    read_only: d.read_only,
                    capacity_bytes: t.device().capacity_sectors() * crate::devices::virtio::block::SECTOR_SIZE,
                }
            })
            .collect();
        Offer {
            host: self.caps.clone(),
            vm: VmShape {
                vcpus: self.cfg.vcpus,
                memory_bytes: self.mem_size,
                its: self.cfg.its,
                disks,
                nics: self
                    .nics
                    .iter()
                    .map(|n| net::mac_string(&n.lock().unwrap_or_else(|p| p.into_inner()).device().mac()))
                    .collect(),
            },
        }
    }

    /// Tells the network where each NIC now is (a migration's target, once
    /// the guest runs here).
    pub fn announce_nics(&self) {
        for n in &self.nics {
            n.lock().unwrap_or_else(|p| p.into_inner()).device_mut().announce();
        }
    }

    /// Why this VM cannot be migrated, if it cannot: a disk that cannot
    /// change hands (a local file).
    pub fn migration_refusal(&self) -> Option<String> {
        self.disks.iter().enumerate().find_map(|(i, d)| {
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .device()
                .handover_refusal()
                .map(|why| format!("disk {i}: {why}"))
        })
    }

    /// Takes every disk's exclusive lock (the migration target, before it
    /// resumes the guest); on failure, releases what it took and names the
    /// disk that failed.
    pub fn acquire_disks(&self) -> Result<(), (usize, basalt_storage::BlockError)> {
        for (i, d) in self.disks.iter().enumerate() {
            let r = d.lock().unwrap_or_else(|p| p.into_inner()).device_mut().acquire_ownership();
            if let Err(e) = r {
                for d in &self.disks[..i] {
                    let _ = d.lock().unwrap_or_else(|p| p.into_inner()).device_mut().release_ownership();
                }
                return Err((i, e));
            }
        }
        Ok(())
    }
}

// Every device slot has an SPI the vGIC has.
const _: () = assert!(
    layout::VIRTIO_SPI_BASE as usize + crate::config::MAX_DISKS + crate::config::MAX_NICS
        <= layout::GIC_NR_IRQS as usize
);

/// Disk `i`'s virtio-mmio window and SPI.
fn disk_window(i: usize) -> (u64, u32) {
    device_window(i)
}

/// NICs come after every disk slot, so a NIC's window and interrupt do not
/// depend on how many disks the VM has.
fn nic_window(i: usize) -> (u64, u32) {
    device_window(crate::config::MAX_DISKS + i)
}

fn device_window(i: usize) -> (u64, u32) {
    (layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE, layout::VIRTIO_SPI_BASE + i as u32)
}

/// The host's counter (CNTVCT_EL0 in a host process reads the physical
/// count: the host's own virtual offset is zero).
fn host_counter() -> u64 {
    let v: u64;
    // SAFETY: reads a system register EL0 may read (Linux sets CNTKCTL_EL1.EL0VCTEN); no memory is touched.
    unsafe { std::arch::asm!("isb", "mrs {v}, cntvct_el0", v = out(reg) v, options(nomem, nostack)) };
    v
}

fn cntfrq() -> u64 {
    let v: u64;
    // SAFETY: CNTFRQ_EL0 is readable at EL0; no memory is touched.
    unsafe { std::arch::asm!("mrs {v}, cntfrq_el0", v = out(reg) v, options(nomem, nostack)) };
    v
}

/// What this host shows a guest and what its KVM offers, for migration.
fn host_caps(kvm_: &Kvm, fd: &VmFd, vcpu0: &VcpuFd, gic: &VGicV3) -> Result<HostCaps, VmError> {
    let mut id_regs = Vec::new();
    for id in vcpu::reg_list(vcpu0).map_err(kvm("KVM_GET_REG_LIST"))? {
        if regs::is_feature_id_reg(id) {
            id_regs.push((id, vcpu::read_u64(vcpu0, id).map_err(kvm("read an ID register"))?));
        }
    }
    let max_ipa = kvm_.check_extension_int(kvm_ioctls::Cap::ArmVmIPASize);
    Ok(HostCaps {
        arch: std::env::consts::ARCH.into(),
        page_size: crate::memory::host_page_size(),
        cntfrq: cntfrq(),
        // VMs are created with KVM's default guest-physical size.
        ipa_bits: 40,
        max_ipa_bits: if max_ipa > 0 { max_ipa as u32 } else { 40 },
        gic_iidr: gic.iidr()?,
        gic_nr_irqs: layout::GIC_NR_IRQS,
        id_regs,
        counter_offset: fd.check_extension_raw(u64::from(KVM_CAP_COUNTER_OFFSET) as _) > 0,
    })
}
