//! One VM: guest memory, vCPU threads, the vGICv3, devices on the MMIO bus,
//! and the event loop that serves devices and the control socket until the
//! guest powers off, resets, or is told to stop.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::aarch64::gic::{Its, VGicV3};
use crate::arch::aarch64::{boot, fdt, layout, vcpu};
use crate::config::{ConsoleConfig, VmConfig};
use crate::config::{DiskBackend, DiskConfig};
use crate::devices::bus::MmioBus;
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::virtio::block::{BlockConfig, VirtioBlock};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use basalt_storage::BlockBackend;
use kvm_ioctls::IoEventAddress;

type Disk = Arc<Mutex<MmioTransport<VirtioBlock>>>;

/// Opens a disk's backend: a raw file (or block device), or an RBD image
/// with its exclusive lock (so the disk is never writable on two hosts).
fn open_disk(i: usize, d: &DiskConfig) -> Result<Box<dyn BlockBackend>, VmError> {
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
            basalt_storage::RbdBackend::open(&io, image, true, d.read_only)
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

/// What the VMM thread tells a parked (paused) vCPU thread to do.
enum VcpuCmd {
    Resume,
    Stop,
    Save(Sender<Result<crate::persist::VcpuState, String>>),
}

/// State the vCPU threads and the VMM thread share.
pub struct VcpuShared {
    stop: AtomicBool,
    pause: AtomicBool,
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
    mpidrs: Vec<u64>,
    gic: VGicV3,
    its: Option<Its>,
    bus: MmioBus,
    pub serial: Arc<Mutex<SerialDevice>>,
    disks: Vec<Disk>,
    /// The console's pseudo-terminal, when it has one: read for guest input.
    pty: Option<crate::devices::pty::Pty>,
    console_path: Option<std::path::PathBuf>,
    shared: Arc<VcpuShared>,
    mem_size: u64,
    /// Guest RAM's mapping: declared last so it is unmapped after every
    /// field holding a view of it (devices, `mem`) is gone.
    _ram: crate::memory::Mapping,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    pub fn new(cfg: &VmConfig) -> Result<Vm, VmError> {
        Self::build(cfg, None)
    }

    /// A fresh VM with the given snapshot's state instead of a boot.
    pub fn restore(cfg: &VmConfig, state: &crate::persist::VmState, memory: &[u8]) -> Result<Vm, VmError> {
        state.check()?;
        if state.vcpus.len() != cfg.vcpus as usize || state.memory_bytes != cfg.memory_bytes() {
            return Err(crate::persist::StateError::Shape(format!(
                "snapshot has {} vCPUs and {} MiB, the config {} and {} MiB",
                state.vcpus.len(),
                state.memory_bytes >> 20,
                cfg.vcpus,
                cfg.memory_mib
            ))
            .into());
        }
        Self::build(cfg, Some((state, memory)))
    }

    fn build(cfg: &VmConfig, snapshot: Option<(&crate::persist::VmState, &[u8])>) -> Result<Vm, VmError> {
        use crate::persist::Persist;
        cfg.validate()?;
        let kvm_ = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let fd = kvm_.create_vm().map_err(kvm("create VM"))?;

        let mem_size = cfg.memory_bytes();
        let (mem, ram) = crate::memory::create(&fd, layout::RAM_BASE, mem_size as usize).map_err(VmError::Memory)?;

        if let Some((_, bytes)) = snapshot {
            // Devices re-activate from guest memory on restore: it goes in first.
            mem.write_slice(bytes, GuestAddress(layout::RAM_BASE)).map_err(|e| VmError::Memory(e.to_string()))?;
        }

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
        let mut its = if cfg.its { Some(Its::create(&fd)?) } else { None };

        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        let shared = Arc::new(VcpuShared {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused_count: AtomicUsize::new(0),
            exit: Mutex::new(None),
            exit_evt,
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
        let mut virtio_fdt = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let serial = d.serial.clone().unwrap_or_else(|| format!("basalt-disk{i}"));
            let mut blk = VirtioBlock::new(open_disk(i, d)?, BlockConfig { serial, ..BlockConfig::default() })
                .map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            let saved = match snapshot {
                Some((state, _)) => {
                    let v = state
                        .virtio
                        .get(i)
                        .ok_or_else(|| VmError::Setup(format!("the snapshot has no state for disk {i}")))?;
                    let st: DiskState = serde_json::from_value(v.clone())
                        .map_err(|e| VmError::Setup(format!("disk {i} state: {e}")))?;
                    blk.restore(&st.block).map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
                    Some(st.transport)
                }
                None => None,
            };
            let spi = layout::VIRTIO_SPI_BASE + i as u32;
            let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
            fd.register_irqfd(&irq, layout::spi_gsi(spi)).map_err(kvm(format!("disk {i} irqfd")))?;
            let mut t = MmioTransport::new(Box::new(blk), mem.clone(), irq)
                .map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            for (q, evt) in t.queue_evts().iter().enumerate() {
                fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), q as u32)
                    .map_err(kvm(format!("disk {i} ioeventfd")))?;
            }
            if let Some(ts) = saved {
                t.restore(&ts).map_err(|e| VmError::Setup(format!("disk {i}: {e}")))?;
            }
            let t = Arc::new(Mutex::new(t));
            bus.insert(base, layout::VIRTIO_MMIO_SIZE, t.clone()).map_err(|e| VmError::Setup(e.to_string()))?;
            disks.push(t);
            virtio_fdt.push((base, spi));
        }

        match snapshot {
            None => {
                let image = boot::load(&mem, mem_size, &cfg.kernel, cfg.initrd.as_deref())?;
                let tree = fdt::create_fdt(&fdt::FdtParams {
                    mpidrs: &mpidrs,
                    mem_size,
                    cmdline: &cfg.cmdline,
                    initrd: image.initrd,
                    virtio: &virtio_fdt,
                    its: cfg.its,
                })
                .map_err(|e| VmError::Fdt(e.to_string()))?;
                boot::write_fdt(&mem, image.fdt, &tree)?;
                vcpu::set_boot_regs(&vcpus[0], image.entry, image.fdt).map_err(kvm("set boot registers"))?;
            }
            Some((state, _)) => {
                for (i, (v, st)) in vcpus.iter_mut().zip(&state.vcpus).enumerate() {
                    v.restore(st).map_err(kvm(format!("restore vCPU {i}")))?;
                }
                gic.restore(&state.gic)?;
                match (&mut its, &state.its) {
                    (Some(its), Some(st)) => its.restore(st)?,
                    (None, None) => {}
                    _ => {
                        return Err(crate::persist::StateError::Shape(
                            "the snapshot and the config disagree on the ITS".into(),
                        )
                        .into())
                    }
                }
                serial
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .restore(&state.serial)
                    .map_err(|e| VmError::Setup(format!("restore the serial console: {e}")))?;
            }
        }

        Ok(Vm {
            _kvm: kvm_,
            _fd: fd,
            mem,
            vcpus,
            mpidrs,
            gic,
            its,
            bus,
            serial,
            disks,
            pty,
            console_path,
            shared,
            mem_size,
            _ram: ram,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn memory_size(&self) -> u64 {
        self.mem_size
    }

    /// Runs the guest until it stops; returns why. With `control`, serves
    /// the control socket at that path meanwhile.
    pub fn run(mut self, control: Option<&Path>) -> Result<VmExit, VmError> {
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| VmError::Setup(format!("signal handler: {e}")))?;
        let listener = match control {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)
                    .map_err(|e| VmError::Setup(format!("control socket {}: {e}", p.display())))?;
                l.set_nonblocking(true).map_err(|e| VmError::Setup(format!("control socket: {e}")))?;
                Some(l)
            }
            None => None,
        };
        let mut vcpus = Vec::new();
        for (id, v) in self.vcpus.drain(..).enumerate() {
            // Counters are read from the VMM thread while the vCPU runs.
            let stats = crate::kvm_stats::open(&v).ok();
            let (tx, rx) = channel();
            let shared = self.shared.clone();
            let bus = self.bus.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, v, bus, shared, rx))
                .map_err(|e| VmError::Setup(format!("spawn vCPU thread: {e}")))?;
            vcpus.push(VcpuHandle { thread, tx, stats });
        }
        let mut ctl = Running { vm: &self, vcpus, started: Instant::now() };
        let result = ctl.event_loop(listener.as_ref());
        let why = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or(VmExit::Stopped);
        stop_vcpus(&self.shared, std::mem::take(&mut ctl.vcpus));
        if let Some(p) = control {
            let _ = std::fs::remove_file(p);
        }
        result.map(|()| why)
    }
}

struct VcpuHandle {
    thread: JoinHandle<()>,
    tx: Sender<VcpuCmd>,
    stats: Option<File>,
}

/// The VMM thread's view of a running VM.
struct Running<'a> {
    vm: &'a Vm,
    vcpus: Vec<VcpuHandle>,
    started: Instant,
}

const EXIT_TOKEN: u64 = 0;
const LISTENER_TOKEN: u64 = 1;
const CONSOLE_IN_TOKEN: u64 = 2;
/// Disk `d`'s queue `q` is token ((d + 1) << 8) | q; its backend is slot 0xff.
const BACKEND_SLOT: u64 = 0xff;

fn disk_token(d: usize, slot: u64) -> u64 {
    ((d as u64 + 1) << 8) | slot
}

/// A disk's saved state: its transport and the block device behind it.
#[derive(serde::Serialize, serde::Deserialize)]
struct DiskState {
    transport: crate::devices::virtio::mmio::MmioTransportState,
    block: crate::devices::virtio::block::VirtioBlockState,
}

impl Running<'_> {
    fn event_loop(&mut self, listener: Option<&UnixListener>) -> Result<(), VmError> {
        let ep = Epoll::new().map_err(|e| VmError::Setup(format!("epoll: {e}")))?;
        let add = |fd: i32, token: u64| {
            ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(|e| VmError::Setup(format!("epoll add: {e}")))
        };
        add(self.vm.shared.exit_evt.as_raw_fd(), EXIT_TOKEN)?;
        if let Some(l) = listener {
            add(l.as_raw_fd(), LISTENER_TOKEN)?;
        }
        if let Some(p) = &self.vm.pty {
            add(p.master.as_raw_fd(), CONSOLE_IN_TOKEN)?;
        }
        for (d, disk) in self.vm.disks.iter().enumerate() {
            let t = disk.lock().unwrap_or_else(|p| p.into_inner());
            for (q, evt) in t.queue_evts().iter().enumerate() {
                add(evt.as_raw_fd(), disk_token(d, q as u64))?;
            }
            if let Some(fd) = t.backend_fd() {
                add(fd, disk_token(d, BACKEND_SLOT))?;
            }
        }
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match ep.wait(1000, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmError::Setup(format!("epoll wait: {e}"))),
            };
            for ev in &events[..n] {
                match ev.data() {
                    EXIT_TOKEN => return Ok(()),
                    CONSOLE_IN_TOKEN => self.console_input(),
                    LISTENER_TOKEN => {
                        if let Some(l) = listener {
                            while let Ok((conn, _)) = l.accept() {
                                self.serve(conn);
                            }
                        }
                    }
                    token => {
                        let (d, slot) = ((token >> 8) as usize - 1, token & 0xff);
                        if let Some(disk) = self.vm.disks.get(d) {
                            let mut t = disk.lock().unwrap_or_else(|p| p.into_inner());
                            if slot == BACKEND_SLOT {
                                t.handle_backend_event();
                            } else {
                                t.handle_queue_event(slot as usize);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Typed console input goes to the UART's receive FIFO; what does not
    /// fit stays in the pty until the guest has read some.
    fn console_input(&mut self) {
        use std::io::Read;
        let Some(p) = &self.vm.pty else { return };
        let mut serial = self.vm.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_room();
        if room == 0 {
            return;
        }
        let mut buf = [0u8; 64];
        let n = (&p.master).read(&mut buf[..room.min(64)]).unwrap_or(0);
        serial.enqueue_input(&buf[..n]);
    }

    /// One request per connection; a client that sends nothing within a few
    /// seconds is dropped so it cannot stall the VM's event loop.
    fn serve(&mut self, conn: std::os::unix::net::UnixStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            return;
        }
        let resp = match crate::control::parse_request(&line) {
            Ok(req) => self.handle(&req.cmd, &req.args),
            Err(r) => r,
        };
        if let Ok(mut text) = serde_json::to_string(&resp) {
            text.push('\n');
            let mut w = &conn;
            let _ = w.write_all(text.as_bytes());
        }
    }

    fn handle(&mut self, cmd: &str, args: &Value) -> crate::control::Response {
        use crate::control::Response;
        match cmd {
            "status" => Response::ok(json!({
                "state": if self.vm.shared.pause.load(Ordering::SeqCst) { "paused" } else { "running" },
                "vcpus": self.vcpus.len(),
                "memory_mib": self.vm.mem_size >> 20,
                "console": self.vm.console_path.as_ref().map(|p| p.display().to_string()),
                "uptime_s": self.started.elapsed().as_secs_f64(),
            })),
            "pause" => match self.pause() {
                Ok(()) => Response::ok(json!({"state": "paused"})),
                Err(e) => Response::err(e),
            },
            "resume" => {
                self.resume();
                Response::ok(json!({"state": "running"}))
            }
            "shutdown" => {
                self.vm.shared.finish(VmExit::Stopped);
                Response::ok(json!({"state": "stopping"}))
            }
            "counters" => Response::ok(self.counters()),
            "vgic-state" => {
                let was_running = !self.vm.shared.pause.load(Ordering::SeqCst);
                if was_running {
                    if let Err(e) = self.pause() {
                        return Response::err(e);
                    }
                }
                let st = self.vm.gic.state(&self.vm.mpidrs);
                if was_running {
                    self.resume();
                }
                match st {
                    Ok(irqs) => Response::ok(json!({ "irqs": irqs })),
                    Err(e) => Response::err(e.to_string()),
                }
            }
            "save" => match args.get("path").and_then(Value::as_str) {
                Some(p) => match self.save(Path::new(p)) {
                    Ok(bytes) => Response::ok(json!({"state": "paused", "path": p, "memory_bytes": bytes})),
                    Err(e) => Response::err(e),
                },
                None => Response::err("save needs args {\"path\": DIR}"),
            },
            "restore" => match args.get("path").and_then(Value::as_str) {
                // Read and check it now, so a bad snapshot is refused while
                // this VM keeps running.
                Some(p) => match crate::persist::VmState::read(Path::new(p)) {
                    Ok(_) => {
                        self.vm.shared.finish(VmExit::Restore(p.into()));
                        Response::ok(json!({"state": "restoring", "path": p}))
                    }
                    Err(e) => Response::err(e.to_string()),
                },
                None => Response::err("restore needs args {\"path\": DIR}"),
            },
            other => Response::err(format!(
                "unknown command {other:?}; commands: status, pause, resume, shutdown, counters, vgic-state, save, restore"
            )),
        }
    }

    /// Pauses the VM and writes its whole state and memory to `dir`. The VM
    /// stays paused: resume it, or restore the snapshot elsewhere.
    fn save(&mut self, dir: &Path) -> Result<u64, String> {
        use crate::persist::{Persist, VmState, STATE_VERSION};
        self.pause()?;
        let mut vcpus = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let (tx, rx) = channel();
            v.tx.send(VcpuCmd::Save(tx)).map_err(|_| format!("vCPU {i} is gone"))?;
            let st = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| format!("vCPU {i} did not answer"))??;
            vcpus.push(st);
        }
        let mut virtio = Vec::new();
        for (i, disk) in self.vm.disks.iter().enumerate() {
            let mut t = disk.lock().unwrap_or_else(|p| p.into_inner());
            // Requests in flight would be lost: let the backend finish them.
            t.drain(Duration::from_secs(30)).map_err(|e| format!("disk {i}: {e}"))?;
            let st = DiskState { transport: t.save(), block: t.device().save() };
            virtio.push(serde_json::to_value(st).map_err(|e| e.to_string())?);
        }
        // The ITS writes its tables into guest memory: before memory is copied.
        let its = match &self.vm.its {
            Some(i) => Some(i.save().map_err(|e| e.to_string())?),
            None => None,
        };
        let gic = self.vm.gic.save().map_err(|e| e.to_string())?;
        let serial = self.vm.serial.lock().unwrap_or_else(|p| p.into_inner()).save().map_err(|e| e.to_string())?;
        let mut mem = vec![0u8; self.vm.mem_size as usize];
        self.vm.mem.read_slice(&mut mem, GuestAddress(layout::RAM_BASE)).map_err(|e| e.to_string())?;
        let state = VmState { version: STATE_VERSION, memory_bytes: self.vm.mem_size, vcpus, gic, its, serial, virtio };
        state.write(dir, &mem).map_err(|e| e.to_string())?;
        Ok(self.vm.mem_size)
    }

    /// Parks every vCPU outside KVM_RUN. Idempotent.
    fn pause(&mut self) -> Result<(), String> {
        let sh = &self.vm.shared;
        sh.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while sh.paused_count.load(Ordering::SeqCst) < self.vcpus.len() {
            if Instant::now() > deadline {
                return Err("vCPUs did not stop within 5 s".into());
            }
            for v in &self.vcpus {
                let _ = v.thread.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn resume(&mut self) {
        let sh = &self.vm.shared;
        if sh.pause.swap(false, Ordering::SeqCst) {
            for v in &self.vcpus {
                let _ = v.tx.send(VcpuCmd::Resume);
            }
        }
    }

    fn counters(&self) -> Value {
        let per_vcpu: Vec<Value> = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let kvm = v.stats.as_ref().and_then(|f| crate::kvm_stats::read_all(f).ok()).unwrap_or_default();
                json!({
                    "vcpu": i,
                    "mmio_exits_handled": self.vm.shared.mmio_exits[i].load(Ordering::Relaxed),
                    "kvm": kvm,
                })
            })
            .collect();
        let tx = self.vm.serial.lock().map(|s| s.tx_bytes).unwrap_or(0);
        let disks: Vec<Value> = self
            .vm
            .disks
            .iter()
            .map(|d| {
                let t = d.lock().unwrap_or_else(|p| p.into_inner());
                json!({ "transport": t.counters(), "block": t.device().counters(), "in_flight": t.device().in_flight() })
            })
            .collect();
        json!({ "vcpus": per_vcpu, "serial_tx_bytes": tx, "disks": disks })
    }
}

/// Tells every vCPU thread to leave KVM_RUN and end, kicking it with a
/// signal until it has (a kick that lands outside KVM_RUN is simply retried).
fn stop_vcpus(shared: &VcpuShared, vcpus: Vec<VcpuHandle>) {
    shared.stop.store(true, Ordering::SeqCst);
    for v in &vcpus {
        let _ = v.tx.send(VcpuCmd::Stop);
    }
    for v in vcpus {
        while !v.thread.is_finished() {
            let _ = v.thread.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = v.thread.join();
    }
}

fn vcpu_loop(id: usize, mut v: VcpuFd, bus: MmioBus, shared: Arc<VcpuShared>, rx: Receiver<VcpuCmd>) {
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
                // Kicked: stop, or park while paused until told otherwise.
                if shared.pause.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
                    shared.paused_count.fetch_add(1, Ordering::SeqCst);
                    // Parked: the VMM thread may ask for this vCPU's state (only
                    // this thread holds its fd) until it resumes or stops it.
                    let next = loop {
                        match rx.recv() {
                            Ok(VcpuCmd::Save(reply)) => {
                                use crate::persist::Persist;
                                let _ = reply.send(v.save().map_err(|e| format!("save vCPU {id}: {e}")));
                            }
                            Ok(VcpuCmd::Resume) => break true,
                            Ok(VcpuCmd::Stop) | Err(_) => break false,
                        }
                    };
                    shared.paused_count.fetch_sub(1, Ordering::SeqCst);
                    if !next {
                        return;
                    }
                }
            }
            Err(e) => {
                shared.finish(VmExit::Crashed(format!("vCPU {id}: KVM_RUN failed: {e}")));
                return;
            }
        }
    }
}
