//! A running VM: one thread per vCPU, and the VMM thread's event loop that
//! serves devices, the control socket and an outgoing migration's requests
//! until the guest powers off, resets, is stopped or has moved away.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::migration::VmRequest;
use super::{VcpuShared, Vm, VmError, VmExit};
use crate::control::Response;
use crate::devices::bus::MmioBus;
use crate::migration::{Fallback, Paused, StatusCell, Stopped};
use crate::persist::VmState;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// What the VMM thread tells a parked (paused) vCPU thread to do.
enum VcpuCmd {
    Resume,
    Stop,
    /// Save the registers; the feature ID registers given are known (see
    /// [`crate::arch::aarch64::vcpu::save_knowing`]).
    Save(Arc<Vec<(u64, u64)>>, Sender<Result<crate::persist::VcpuState, String>>),
    /// Put the guest's virtual counter back to this value.
    SetCounter(u64, Sender<Result<(), String>>),
}

/// A disk's saved state: its transport and the block device behind it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct DiskState {
    pub transport: crate::devices::virtio::mmio::MmioTransportState,
    pub block: crate::devices::virtio::block::VirtioBlockState,
}

/// A NIC's saved state: its transport and the virtio-net device behind it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct NicState {
    pub transport: crate::devices::virtio::mmio::MmioTransportState,
    pub net: crate::devices::virtio::net::VirtioNetState,
}

/// Binds the control socket (nonblocking), replacing a stale one.
pub(super) fn bind_control(p: &Path) -> Result<UnixListener, VmError> {
    let _ = std::fs::remove_file(p);
    let l = UnixListener::bind(p).map_err(|e| VmError::Setup(format!("control socket {}: {e}", p.display())))?;
    l.set_nonblocking(true).map_err(|e| VmError::Setup(format!("control socket: {e}")))?;
    Ok(l)
}

/// One request per connection; a client that sends nothing within a few
/// seconds is dropped so it cannot stall the VMM thread.
pub(super) fn serve_one(conn: UnixStream, handle: impl FnOnce(&str, &Value) -> Response) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() {
        return;
    }
    let resp = match crate::control::parse_request(&line) {
        Ok(req) => handle(&req.cmd, &req.args),
        Err(r) => r,
    };
    if let Ok(mut text) = serde_json::to_string(&resp) {
        text.push('\n');
        let mut w = &conn;
        let _ = w.write_all(text.as_bytes());
    }
}

impl Vm {
    /// Runs the guest until it stops; returns why. With `control`, serves
    /// the control socket at that path meanwhile.
    pub fn run(self, control: Option<&Path>) -> Result<VmExit, VmError> {
        let listener = control.map(bind_control).transpose()?;
        self.run_on(listener, control)
    }

    /// [`Vm::run`] on a control socket that is already bound.
    pub(super) fn run_on(mut self, listener: Option<UnixListener>, control: Option<&Path>) -> Result<VmExit, VmError> {
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| VmError::Setup(format!("signal handler: {e}")))?;
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
        let (req_tx, req_rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        let mut ctl = Running {
            vm: &self,
            vcpus,
            started: Instant::now(),
            migration: self.arrived.clone(),
            outgoing: None,
            req_tx,
            req_rx,
            wake,
            last_kick: Instant::now(),
            paused_counter: None,
        };
        let result = ctl.event_loop(listener.as_ref());
        let vcpus = std::mem::take(&mut ctl.vcpus);
        let outgoing = ctl.outgoing.take();
        drop(ctl);
        // A migration thread still sending ends now: its requests find no one.
        if let Some(o) = outgoing {
            o.cancel.store(true, Ordering::SeqCst);
            let _ = o.thread.join();
        }
        let why = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or(VmExit::Stopped);
        stop_vcpus(&self.shared, vcpus);
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

/// The devices' and the ITS's state once guest memory is final (the first
/// half of the state walk).
struct Frozen {
    virtio: Vec<serde_json::Value>,
    nics: Vec<serde_json::Value>,
    its: Option<crate::persist::ItsState>,
}

/// A live migration of this VM to another host, on its own thread.
struct Outgoing {
    thread: JoinHandle<()>,
    cancel: Arc<AtomicBool>,
}

/// The VMM thread's view of a running VM.
struct Running<'a> {
    vm: &'a Vm,
    vcpus: Vec<VcpuHandle>,
    started: Instant,
    /// The current or last migration (in or out), for `migrate-status`.
    migration: Option<StatusCell>,
    outgoing: Option<Outgoing>,
    req_tx: Sender<VmRequest>,
    req_rx: Receiver<VmRequest>,
    /// Written by the migration thread after each request.
    wake: EventFd,
    last_kick: Instant,
    /// The guest's counter at stop-and-copy, until the migration ends.
    paused_counter: Option<u64>,
}

const EXIT_TOKEN: u64 = 0;
const LISTENER_TOKEN: u64 = 1;
const CONSOLE_IN_TOKEN: u64 = 2;
const MIGRATION_TOKEN: u64 = 3;
/// Disk `d`'s queue `q` is token ((d + 1) << 8) | q; its backend is slot 0xff.
const BACKEND_SLOT: u64 = 0xff;
/// While throttled, vCPUs are kicked this often and park for their share.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

fn disk_token(d: usize, slot: u64) -> u64 {
    ((d as u64 + 1) << 8) | slot
}

/// NIC `n`'s tokens come after every disk slot's.
fn nic_token(n: usize, slot: u64) -> u64 {
    disk_token(crate::config::MAX_DISKS + n, slot)
}

impl Running<'_> {
    fn event_loop(&mut self, listener: Option<&UnixListener>) -> Result<(), VmError> {
        let ep = Epoll::new().map_err(|e| VmError::Setup(format!("epoll: {e}")))?;
        let add = |fd: i32, token: u64| {
            ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(|e| VmError::Setup(format!("epoll add: {e}")))
        };
        add(self.vm.shared.exit_evt.as_raw_fd(), EXIT_TOKEN)?;
        add(self.wake.as_raw_fd(), MIGRATION_TOKEN)?;
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
        for (n, nic) in self.vm.nics.iter().enumerate() {
            let t = nic.lock().unwrap_or_else(|p| p.into_inner());
            for (q, evt) in t.queue_evts().iter().enumerate() {
                add(evt.as_raw_fd(), nic_token(n, q as u64))?;
            }
            if let Some(fd) = t.backend_fd() {
                // Edge-triggered: the device reads the tap until it is empty
                // or the guest's receive ring is full; a full ring must not
                // keep the loop awake. Buffers the guest adds notify the queue.
                ep.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, nic_token(n, BACKEND_SLOT)),
                )
                .map_err(|e| VmError::Setup(format!("epoll add: {e}")))?;
            }
        }
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let throttled = self.vm.shared.throttle_pct.load(Ordering::Relaxed) > 0;
            let timeout = if throttled { THROTTLE_PERIOD.as_millis() as i32 } else { 1000 };
            let n = match ep.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmError::Setup(format!("epoll wait: {e}"))),
            };
            if throttled && self.last_kick.elapsed() >= THROTTLE_PERIOD {
                // Each kicked vCPU parks for its share of the period (vcpu_loop).
                self.last_kick = Instant::now();
                for v in &self.vcpus {
                    let _ = v.thread.kill(SIGRTMIN());
                }
            }
            for ev in &events[..n] {
                match ev.data() {
                    EXIT_TOKEN => return Ok(()),
                    CONSOLE_IN_TOKEN => self.console_input(),
                    MIGRATION_TOKEN => self.migration_requests(),
                    LISTENER_TOKEN => {
                        if let Some(l) = listener {
                            while let Ok((conn, _)) = l.accept() {
                                serve_one(conn, |cmd, args| self.handle(cmd, args));
                            }
                        }
                    }
                    token if (token >> 8) as usize > crate::config::MAX_DISKS => {
                        let (n, slot) = ((token >> 8) as usize - 1 - crate::config::MAX_DISKS, token & 0xff);
                        if let Some(nic) = self.vm.nics.get(n) {
                            let mut t = nic.lock().unwrap_or_else(|p| p.into_inner());
                            if slot == BACKEND_SLOT {
                                t.handle_backend_event();
                            } else {
                                t.handle_queue_event(slot as usize);
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

    fn migrating(&self) -> bool {
        self.outgoing.is_some()
    }

    fn handle(&mut self, cmd: &str, args: &Value) -> Response {
        const BUSY: &str = "a migration of this VM is under way (migrate-status; migrate-cancel to stop it)";
        match cmd {
            "status" => Response::ok(json!({
                "state": if self.vm.shared.pause.load(Ordering::SeqCst) { "paused" } else { "running" },
                "vcpus": self.vcpus.len(),
                "memory_mib": self.vm.mem_size >> 20,
                "console": self.vm.console_path.as_ref().map(|p| p.display().to_string()),
                "uptime_s": self.started.elapsed().as_secs_f64(),
                "migrating": self.migrating(),
            })),
            "pause" | "resume" | "save" | "restore" if self.migrating() => Response::err(format!("{cmd}: {BUSY}")),
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
                Some(p) => match VmState::read(Path::new(p)) {
                    Ok(_) => {
                        self.vm.shared.finish(VmExit::Restore(p.into()));
                        Response::ok(json!({"state": "restoring", "path": p}))
                    }
                    Err(e) => Response::err(e.to_string()),
                },
                None => Response::err("restore needs args {\"path\": DIR}"),
            },
            "migrate-send" if self.migrating() => Response::err(format!("migrate-send: {BUSY}")),
            "migrate-send" => match self.start_migration(args) {
                Ok(v) => Response::ok(v),
                Err(e) => Response::err(format!("migrate-send: {e}")),
            },
            "migrate-status" => match &self.migration {
                Some(s) => Response::ok(serde_json::to_value(s.get()).unwrap_or(Value::Null)),
                None => Response::ok(json!({"phase": "none"})),
            },
            "migrate-cancel" => match (&self.outgoing, &self.migration) {
                (Some(o), Some(s)) => {
                    let phase = s.get().phase;
                    if matches!(phase, crate::migration::Phase::Connecting | crate::migration::Phase::Precopy) {
                        o.cancel.store(true, Ordering::SeqCst);
                        Response::ok(json!({"cancelling": true}))
                    } else {
                        Response::err(format!(
                            "migrate-cancel: the migration is in {phase:?} and can no longer be cancelled; it ends on one host or the other within seconds"
                        ))
                    }
                }
                _ => Response::err("migrate-cancel: no migration of this VM is under way"),
            },
            "migrate-receive" => Response::err(
                "migrate-receive: this VM is running; a receiver is a basalt-vmm started with --incoming",
            ),
            other => Response::err(format!(
                "unknown command {other:?}; commands: status, pause, resume, shutdown, counters, vgic-state, save, restore, migrate-send, migrate-status, migrate-cancel"
            )),
        }
    }

    fn start_migration(&mut self, args: &Value) -> Result<Value, String> {
        let params = crate::migration::SendParams::from_args(args)?;
        if let Some(why) = self.vm.migration_refusal() {
            return Err(why);
        }
        let status = StatusCell::default();
        let cancel = Arc::new(AtomicBool::new(false));
        let wake = self.wake.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let mut source = super::migration::VmSource::new(self.vm, self.req_tx.clone(), wake, &params.peer);
        let offer = self.vm.offer();
        let (st, c, p) = (status.clone(), cancel.clone(), params.clone());
        let thread = std::thread::Builder::new()
            .name("migrate-send".into())
            .spawn(move || {
                match crate::migration::send::run(&mut source, &offer, &p, &st, &c) {
                    Ok(r) => eprintln!(
                        "basalt-vmm: migrated to {}: {} ms in all, {} ms downtime, {} rounds, {} MiB; report {}",
                        p.peer,
                        r.total_ms,
                        r.downtime_ms,
                        r.rounds.len(),
                        r.bytes >> 20,
                        serde_json::to_string(&r).unwrap_or_default()
                    ),
                    Err(e) => eprintln!("basalt-vmm: migration to {} failed: {e}", p.peer),
                }
                source.finished();
            })
            .map_err(|e| format!("spawn the migration thread: {e}"))?;
        self.outgoing = Some(Outgoing { thread, cancel });
        self.migration = Some(status);
        Ok(json!({"phase": "connecting", "peer": params.peer}))
    }

    fn migration_requests(&mut self) {
        let _ = self.wake.read();
        while let Ok(r) = self.req_rx.try_recv() {
            match r {
                VmRequest::Throttle(pct) => self.vm.shared.throttle_pct.store(pct, Ordering::Relaxed),
                VmRequest::StopAndCopy(reply) => self.stop_for_migration(reply),
                VmRequest::FallBack(reply) => {
                    let _ = reply.send(self.fall_back());
                }
                VmRequest::HandedOver(peer) => {
                    self.paused_counter = None;
                    self.vm.shared.finish(VmExit::Migrated(peer))
                }
                VmRequest::Finished => {
                    if let Some(o) = self.outgoing.take() {
                        let _ = o.thread.join();
                    }
                }
            }
        }
    }

    /// Stop-and-copy on this side, in two steps so that the last pages go
    /// out while the registers are read: pause, drain the disks, flush the
    /// ITS tables and pending LPIs into RAM, and answer `reply` (memory is
    /// final); then read the vCPUs and the vGIC, release each disk's lock,
    /// and send that on the answer's state channel. A failure before the
    /// answer resumes the VM as it was; one after leaves it paused, for the
    /// migration thread's fall-back.
    fn stop_for_migration(&mut self, reply: Sender<Result<Paused, String>>) {
        // The disks' caches are written back while the guest still runs
        // (RBD write latency would otherwise be downtime); what it writes
        // from here to the pause is little, and flushed at the release.
        let early = Instant::now();
        for (i, d) in self.vm.disks.iter().enumerate() {
            if let Err(e) = d.lock().unwrap_or_else(|p| p.into_inner()).device_mut().prepare_handover() {
                // Not fatal: the flush at the release covers it.
                log::warn!("migration: disk {i}: early write-back: {e}");
            }
        }
        let early_us = early.elapsed().as_micros() as u64;
        let t0 = Instant::now();
        self.vm.shared.throttle_pct.store(0, Ordering::Relaxed);
        if let Err(e) = self.pause() {
            self.resume();
            let _ = reply.send(Err(e));
            return;
        }
        let at = Instant::now();
        let mut times = vec![("pause_us", t0.elapsed().as_micros() as u64), ("early_flush_us", early_us)];
        let frozen = match self.freeze(&mut times) {
            Ok(f) => f,
            Err(e) => {
                self.resume();
                let _ = reply.send(Err(e));
                return;
            }
        };
        let (state_tx, state_rx) = channel();
        if reply.send(Ok(Paused { at, state: state_rx })).is_err() {
            // The migration thread is gone: nobody will take this VM.
            self.resume();
            return;
        }
        let stopped = self.read_frozen(frozen, &mut times).and_then(|state| {
            self.paused_counter = state.guest_counter();
            let released = Instant::now();
            for (i, d) in self.vm.disks.iter().enumerate() {
                let r = d.lock().unwrap_or_else(|p| p.into_inner()).device_mut().release_ownership();
                r.map_err(|e| format!("disk {i}: release its lock: {e}"))?;
            }
            times.push(("release_us", released.elapsed().as_micros() as u64));
            Ok(Stopped { state, stop: t0.elapsed(), times })
        });
        let _ = state_tx.send(stopped);
    }

    /// The migration failed past the pause: take the disks back and resume.
    /// While another client holds a disk, keep trying for a minute (a dead
    /// receiver's lock is broken by Ceph once its watch times out, ~30 s);
    /// one that keeps holding it runs the guest.
    fn fall_back(&mut self) -> Fallback {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.vm.acquire_disks() {
                Ok(()) => {
                    self.rewind_counter();
                    self.resume();
                    return Fallback::Resumed;
                }
                Err((d, e)) if Instant::now() > deadline => {
                    // librbd's answer when a live owner keeps an exclusive lock.
                    let held = matches!(&e, basalt_storage::BlockError::Ceph(c)
                        if matches!(c.code().map(|c| -c), Some(libc::EROFS | libc::EBUSY | libc::EAGAIN)));
                    let why = format!("disk {d}: {e}");
                    return if held { Fallback::MovedAway(why) } else { Fallback::Failed(why) };
                }
                Err((d, e)) => {
                    log::warn!("migration fall-back: disk {d}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Before a fall-back resume: sets the guest's virtual counter back to
    /// where it stood at the pause, as a migration target would, so the
    /// guest does not see the failed attempt as a jump in time (its soft
    /// lockup detector did, after a 45 s cut link).
    fn rewind_counter(&mut self) {
        let Some(counter) = self.paused_counter.take() else { return };
        for v in &self.vcpus {
            let (tx, rx) = channel();
            let _ = v.tx.send(VcpuCmd::SetCounter(counter, tx));
            if let Ok(Err(e)) | Err(e) = rx.recv_timeout(Duration::from_secs(10)).map_err(|e| e.to_string()) {
                log::warn!("migration fall-back: {e}; the guest sees the pause as time passing");
            }
        }
    }

    /// The one state walk, for snapshots and migration: [`Running::freeze`],
    /// then [`Running::read_frozen`].
    fn save_state(&mut self) -> Result<VmState, String> {
        let mut times = Vec::new();
        let frozen = self.freeze(&mut times)?;
        self.read_frozen(frozen, &mut times)
    }

    /// The state walk's first half, after which guest memory no longer
    /// changes: pauses the VM, drains the disks and saves the devices, then
    /// flushes the ITS tables and pending LPIs into guest RAM. Notes how long
    /// each step took (`times`, for the migration report).
    fn freeze(&mut self, times: &mut Vec<(&'static str, u64)>) -> Result<Frozen, String> {
        use crate::persist::Persist;
        let t = Instant::now();
        self.pause()?;
        let mut virtio = Vec::new();
        for (i, disk) in self.vm.disks.iter().enumerate() {
            let mut t = disk.lock().unwrap_or_else(|p| p.into_inner());
            // Requests in flight would be lost: let the backend finish them.
            t.drain(Duration::from_secs(30)).map_err(|e| format!("disk {i}: {e}"))?;
            let st = DiskState { transport: t.save(), block: t.device().save() };
            virtio.push(serde_json::to_value(st).map_err(|e| e.to_string())?);
        }
        let mut nics = Vec::new();
        for nic in &self.vm.nics {
            let t = nic.lock().unwrap_or_else(|p| p.into_inner());
            // Frames in flight are a network's ordinary loss: nothing to drain.
            let st = NicState { transport: t.save(), net: t.device().save() };
            nics.push(serde_json::to_value(st).map_err(|e| e.to_string())?);
        }
        // The ITS and the redistributors write their tables into guest
        // memory: before memory is copied.
        let its = match &self.vm.its {
            Some(i) => {
                let st = i.save().map_err(|e| e.to_string())?;
                self.vm.gic.save_pending_tables().map_err(|e| e.to_string())?;
                Some(st)
            }
            None => None,
        };
        times.push(("devices_us", t.elapsed().as_micros() as u64));
        Ok(Frozen { virtio, nics, its })
    }

    /// The state walk's second half, which reads registers only: every vCPU
    /// at once, each on its own thread and fd, then the vGIC (KVM refuses
    /// device attribute access, EBUSY, while a vCPU ioctl holds its vCPU's
    /// lock) and the console.
    fn read_frozen(&mut self, f: Frozen, times: &mut Vec<(&'static str, u64)>) -> Result<VmState, String> {
        use crate::persist::{Persist, STATE_VERSION};
        let mut t = Instant::now();
        let mut answers = Vec::new();
        let known = Arc::new(self.vm.known_id_regs().to_vec());
        for (i, v) in self.vcpus.iter().enumerate() {
            let (tx, rx) = channel();
            v.tx.send(VcpuCmd::Save(known.clone(), tx)).map_err(|_| format!("vCPU {i} is gone"))?;
            answers.push(rx);
        }
        let mut vcpus = Vec::new();
        for (i, rx) in answers.into_iter().enumerate() {
            let st = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| format!("vCPU {i} did not answer"))??;
            vcpus.push(st);
        }
        times.push(("vcpus_us", t.elapsed().as_micros() as u64));
        t = Instant::now();
        let gic = self.vm.gic.save().map_err(|e| e.to_string())?;
        times.push(("gic_us", t.elapsed().as_micros() as u64));
        let serial = self.vm.serial.lock().unwrap_or_else(|p| p.into_inner()).save().map_err(|e| e.to_string())?;
        let Frozen { virtio, nics, its } = f;
        Ok(VmState { version: STATE_VERSION, memory_bytes: self.vm.mem_size, vcpus, gic, its, serial, virtio, nics })
    }

    /// Pauses the VM and writes its whole state and memory to `dir`. The VM
    /// stays paused: resume it, or restore the snapshot elsewhere.
    fn save(&mut self, dir: &Path) -> Result<u64, String> {
        let state = self.save_state()?;
        state.write(dir, &self.vm.mem).map_err(|e| e.to_string())?;
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
        let nics: Vec<Value> = self
            .vm
            .nics
            .iter()
            .map(|n| {
                let t = n.lock().unwrap_or_else(|p| p.into_inner());
                json!({ "transport": t.counters(), "net": t.device().counters() })
            })
            .collect();
        json!({ "vcpus": per_vcpu, "serial_tx_bytes": tx, "disks": disks, "nics": nics })
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
                            Ok(VcpuCmd::Save(known, reply)) => {
                                let st = crate::arch::aarch64::vcpu::save_knowing(&v, &known);
                                let _ = reply.send(st.map_err(|e| format!("save vCPU {id}: {e}")));
                            }
                            Ok(VcpuCmd::SetCounter(value, reply)) => {
                                let r = v.set_one_reg(crate::arch::aarch64::regs::TIMER_CNT, &value.to_le_bytes());
                                let _ =
                                    reply.send(r.map(|_| ()).map_err(|e| format!("vCPU {id}: set its counter: {e}")));
                            }
                            Ok(VcpuCmd::Resume) => break true,
                            Ok(VcpuCmd::Stop) | Err(_) => break false,
                        }
                    };
                    shared.paused_count.fetch_sub(1, Ordering::SeqCst);
                    if !next {
                        return;
                    }
                } else {
                    // Auto-converge: sit out this vCPU's share of the period.
                    let pct = u64::from(shared.throttle_pct.load(Ordering::Relaxed).min(99));
                    if pct > 0 {
                        let period = THROTTLE_PERIOD.as_micros() as u64;
                        std::thread::sleep(Duration::from_micros(period * pct / (100 - pct)));
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
