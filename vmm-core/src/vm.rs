//! One VM: guest memory, vCPU threads, the vGICv3, devices on the MMIO bus,
//! and the event loop that serves devices and the control socket until the
//! guest powers off, resets, or is told to stop.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_userspace_memory_region, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::aarch64::gic::VGicV3;
use crate::arch::aarch64::{boot, fdt, layout, vcpu};
use crate::config::{ConsoleConfig, VmConfig};
use crate::devices::bus::MmioBus;
use crate::devices::serial::{ConsoleOut, SerialDevice};

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
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}

/// State the vCPU threads and the VMM thread share.
pub struct VcpuShared {
    stop: AtomicBool,
    pause: Mutex<bool>,
    resumed: Condvar,
    paused_count: AtomicUsize,
    exit: Mutex<Option<VmExit>>,
    exit_evt: EventFd,
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

pub struct Vm {
    _kvm: Kvm,
    _fd: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    _gic: VGicV3,
    bus: MmioBus,
    pub serial: Arc<Mutex<SerialDevice>>,
    shared: Arc<VcpuShared>,
    mem_size: u64,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    pub fn new(cfg: &VmConfig) -> Result<Vm, VmError> {
        cfg.validate()?;
        let kvm_ = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let fd = kvm_.create_vm().map_err(kvm("create VM"))?;

        let mem_size = cfg.memory_bytes();
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(layout::RAM_BASE), mem_size as usize)])
            .map_err(|e| VmError::Memory(e.to_string()))?;
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
            };
            // SAFETY: the mapping belongs to `mem`, which the Vm owns and keeps
            // alive (and unmoved: the mmap does not move) as long as the VM fd.
            unsafe { fd.set_user_memory_region(region) }.map_err(kvm("map guest memory"))?;
        }

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            vcpus.push(fd.create_vcpu(u64::from(id)).map_err(kvm(format!("create vCPU {id}")))?);
        }
        let gic = VGicV3::create(&fd, u64::from(cfg.vcpus))?;
        let mut mpidrs = Vec::new();
        for (id, v) in vcpus.iter().enumerate() {
            vcpu::init(&fd, v, id as u32).map_err(kvm(format!("init vCPU {id}")))?;
            mpidrs.push(vcpu::mpidr(v).map_err(kvm("read MPIDR"))?);
        }
        // KVM requires every vCPU to exist before the vGIC is initialised.
        gic.finalize()?;

        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        let shared = Arc::new(VcpuShared {
            stop: AtomicBool::new(false),
            pause: Mutex::new(false),
            resumed: Condvar::new(),
            paused_count: AtomicUsize::new(0),
            exit: Mutex::new(None),
            exit_evt,
            mmio_exits: (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect(),
        });

        let mut bus = MmioBus::default();
        let out: ConsoleOut = match &cfg.console {
            ConsoleConfig::Stdout => Box::new(std::io::stdout()),
            ConsoleConfig::File { path } => Box::new(File::create(path).map_err(VmError::Console)?),
            ConsoleConfig::None => Box::new(std::io::sink()),
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        fd.register_irqfd(&serial_irq, layout::spi_gsi(layout::SERIAL_SPI)).map_err(kvm("serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        bus.insert(layout::SERIAL_BASE, layout::SERIAL_SIZE, serial.clone())
            .map_err(|e| VmError::Setup(e.to_string()))?;

        let image = boot::load(&mem, mem_size, &cfg.kernel, cfg.initrd.as_deref())?;
        let tree = fdt::create_fdt(&fdt::FdtParams { mpidrs: &mpidrs, mem_size, cmdline: &cfg.cmdline, initrd: image.initrd, virtio: &[] })
            .map_err(|e| VmError::Fdt(e.to_string()))?;
        boot::write_fdt(&mem, image.fdt, &tree)?;
        vcpu::set_boot_regs(&vcpus[0], image.entry, image.fdt).map_err(kvm("set boot registers"))?;

        Ok(Vm { _kvm: kvm_, _fd: fd, mem, vcpus, _gic: gic, bus, serial, shared, mem_size })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn memory_size(&self) -> u64 {
        self.mem_size
    }

    /// Runs the guest until it stops; returns why.
    pub fn run(mut self) -> Result<VmExit, VmError> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VmError::Setup(format!("signal handler: {e}")))?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (id, v) in self.vcpus.drain(..).enumerate() {
            let shared = self.shared.clone();
            let bus = self.bus.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, v, bus, shared))
                .map_err(|e| VmError::Setup(format!("spawn vCPU thread: {e}")))?;
            threads.push(t);
        }
        // Wait for the first vCPU to report an end.
        loop {
            let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&self.shared.exit_evt), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd on the stack.
            let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if n > 0 {
                break;
            }
        }
        let why = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or(VmExit::Stopped);
        stop_vcpus(&self.shared, threads);
        Ok(why)
    }
}

/// Tells every vCPU thread to leave KVM_RUN and end, kicking it with a
/// signal until it has (a kick that lands outside KVM_RUN is simply retried).
fn stop_vcpus(shared: &VcpuShared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::SeqCst);
    {
        let mut p = shared.pause.lock().unwrap_or_else(|e| e.into_inner());
        *p = false;
        shared.resumed.notify_all();
    }
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = t.join();
    }
}

fn vcpu_loop(id: usize, mut v: VcpuFd, bus: MmioBus, shared: Arc<VcpuShared>) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match v.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.mmio_exits[id].fetch_add(1, Ordering::Relaxed);
                if !bus.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio_exits[id].fetch_add(1, Ordering::Relaxed);
                bus.write(addr, data);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let why = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    other => VmExit::Crashed(format!("vCPU {id}: unknown system event {other}")),
                };
                shared.finish(why);
                return;
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Shutdown) => {
                shared.finish(VmExit::PowerOff);
                return;
            }
            Ok(other) => {
                shared.finish(VmExit::Crashed(format!("vCPU {id}: unexpected exit {other:?}")));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: stop, or park while paused.
                let mut paused = shared.pause.lock().unwrap_or_else(|p| p.into_inner());
                if *paused {
                    shared.paused_count.fetch_add(1, Ordering::SeqCst);
                    while *paused && !shared.stop.load(Ordering::SeqCst) {
                        paused = shared.resumed.wait(paused).unwrap_or_else(|p| p.into_inner());
                    }
                    shared.paused_count.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) => {
                shared.finish(VmExit::Crashed(format!("vCPU {id}: KVM_RUN failed: {e}")));
                return;
            }
        }
    }
}
