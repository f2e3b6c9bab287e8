//! This VM as live migration sees it: the [`Source`] an outgoing migration
//! thread drives (through requests the VMM thread answers, since only it
//! may pause vCPUs and touch devices), and the receiving VMM's wait for an
//! incoming VM ([`Vm::run_incoming`]) with its [`Sink`].

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::run::{bind_control, serve_one};
use super::{Vm, VmError, VmExit};
use crate::control::Response;
use crate::memory::GuestRam;
use crate::migration::compat::Offer;
use crate::migration::dirty::{take_vmm_writes, DirtyBitmap, KvmDirtyLog};
use crate::migration::{receive, Fallback, Paused, Phase, Sink, Source, StatusCell};
use crate::persist::VmState;

/// What the migration thread asks of the VMM thread.
pub enum VmRequest {
    Throttle(u8),
    StopAndCopy(Sender<Result<Paused, String>>),
    FallBack(Sender<Fallback>),
    /// The guest runs at this peer now.
    HandedOver(String),
    /// The migration thread is done; join it.
    Finished,
}

/// An outgoing migration's handle on its VM.
pub struct VmSource {
    mem: GuestRam,
    log: KvmDirtyLog,
    base: u64,
    size: u64,
    page: u64,
    peer: String,
    tx: Sender<VmRequest>,
    wake: EventFd,
}

impl VmSource {
    pub fn new(vm: &Vm, tx: Sender<VmRequest>, wake: EventFd, peer: &str) -> Self {
        let (base, size) = crate::memory::extent(&vm.mem);
        VmSource {
            mem: vm.mem.clone(),
            log: KvmDirtyLog::new(vm.fd.clone(), vm.slots.clone()),
            base,
            size,
            page: crate::memory::host_page_size(),
            peer: peer.into(),
            tx,
            wake,
        }
    }

    fn tell(&self, r: VmRequest) -> bool {
        let sent = self.tx.send(r).is_ok();
        let _ = self.wake.write(1);
        sent
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> VmRequest) -> Option<T> {
        let (tx, rx) = channel();
        if !self.tell(make(tx)) {
            return None;
        }
        rx.recv().ok()
    }

    pub fn finished(&self) {
        self.tell(VmRequest::Finished);
    }
}

impl Source for VmSource {
    fn memory(&self) -> &GuestRam {
        &self.mem
    }

    fn dirty_start(&mut self) -> Result<(), String> {
        self.log.start(&self.mem)
    }

    fn dirty_harvest(&mut self) -> Result<DirtyBitmap, String> {
        let mut b = DirtyBitmap::new(self.base, self.size, self.page);
        // KVM first: a page the VMM writes after this is in its own bitmap.
        self.log.harvest(&mut b)?;
        take_vmm_writes(&self.mem, &mut b);
        Ok(b)
    }

    fn dirty_stop(&mut self) {
        self.log.stop();
    }

    fn throttle(&mut self, pct: u8) {
        self.tell(VmRequest::Throttle(pct));
    }

    fn stop_and_copy(&mut self) -> Result<Paused, String> {
        self.ask(VmRequest::StopAndCopy).unwrap_or_else(|| Err("the VM has stopped".into()))
    }

    fn fall_back(&mut self) -> Fallback {
        self.ask(VmRequest::FallBack).unwrap_or_else(|| Fallback::Failed("the VM has stopped".into()))
    }

    fn handed_over(&mut self) {
        self.tell(VmRequest::HandedOver(self.peer.clone()));
    }
}

type Ready = (VmState, Sender<Result<(), String>>);

/// The receiving thread's handle on the VM: memory to fill, the offer to
/// compare with, and the VMM thread to hand the state to.
struct ChannelSink {
    mem: GuestRam,
    offer: Offer,
    tx: Sender<Ready>,
}

impl Sink for ChannelSink {
    fn memory(&self) -> &GuestRam {
        &self.mem
    }
    fn offer(&self) -> &Offer {
        &self.offer
    }
    fn ready(&mut self, state: VmState) -> Result<(), String> {
        let (tx, rx) = channel();
        self.tx.send((state, tx)).map_err(|_| "the receiving VMM has stopped".to_string())?;
        rx.recv().map_err(|_| "the receiving VMM has stopped".to_string())?
    }
}

/// The receiving VMM before its guest has arrived.
struct Waiting {
    status: StatusCell,
    cancel: Arc<AtomicBool>,
    receiver: Option<(String, JoinHandle<Result<(), String>>)>,
    ready_tx: Sender<Ready>,
    offer: Offer,
    mem: GuestRam,
    shutdown: bool,
}

impl Waiting {
    fn listen(&mut self, addr: &str) -> Result<String, String> {
        if let Some((at, _)) = &self.receiver {
            return Err(format!("already listening on {at}"));
        }
        crate::migration::check_host_port(addr)?;
        let l = TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.into());
        let mut sink = ChannelSink { mem: self.mem.clone(), offer: self.offer.clone(), tx: self.ready_tx.clone() };
        let (st, cancel) = (self.status.clone(), self.cancel.clone());
        let thread = std::thread::Builder::new()
            .name("migrate-receive".into())
            .spawn(move || receive::serve(&l, &mut sink, &st, &cancel))
            .map_err(|e| format!("spawn the receiving thread: {e}"))?;
        eprintln!("basalt-vmm: waiting for the VM on {at}");
        self.receiver = Some((at.clone(), thread));
        Ok(at)
    }

    fn handle(&mut self, vm: &Vm, cmd: &str, args: &Value) -> Response {
        match cmd {
            "status" => Response::ok(json!({
                "state": "incoming",
                "vcpus": vm.cfg.vcpus,
                "memory_mib": vm.mem_size >> 20,
                "migration": self.status.get().phase,
            })),
            "migrate-receive" => match args.get("listen").and_then(Value::as_str) {
                Some(a) => match self.listen(a) {
                    Ok(at) => Response::ok(json!({"phase": "listening", "listen": at})),
                    Err(e) => Response::err(format!("migrate-receive: {e}")),
                },
                None => Response::err("migrate-receive needs args {\"listen\": \"HOST:PORT\"}"),
            },
            "migrate-status" => Response::ok(serde_json::to_value(self.status.get()).unwrap_or(Value::Null)),
            "migrate-cancel" => match self.status.get().phase {
                Phase::Listening => {
                    self.cancel.store(true, Ordering::SeqCst);
                    Response::ok(json!({"cancelling": true}))
                }
                p => Response::err(format!(
                    "migrate-cancel: the receiver is in {p:?}; a transfer is cancelled by its sender (or stop this VMM with shutdown)"
                )),
            },
            "shutdown" => {
                self.shutdown = true;
                Response::ok(json!({"state": "stopping"}))
            }
            other => Response::err(format!(
                "{other:?}: this VMM is waiting for an incoming VM; commands now: status, migrate-receive, migrate-status, migrate-cancel, shutdown"
            )),
        }
    }
}

impl Vm {
    /// Waits for a live migration into this VM (built by [`Vm::incoming`]),
    /// serving the control socket meanwhile; listens at once on `listen`,
    /// or when `migrate-receive` says where. Once the VM has arrived, its
    /// state applied and its disks taken, runs it like [`Vm::run`].
    pub fn run_incoming(mut self, control: Option<&Path>, listen: Option<&str>) -> Result<VmExit, VmError> {
        let listener: Option<UnixListener> = control.map(bind_control).transpose()?;
        let (ready_tx, ready_rx) = channel();
        let mut w = Waiting {
            status: StatusCell::default(),
            cancel: Arc::new(AtomicBool::new(false)),
            receiver: None,
            ready_tx,
            offer: self.offer(),
            mem: self.mem.clone(),
            shutdown: false,
        };
        if let Some(a) = listen {
            w.listen(a).map_err(VmError::Setup)?;
        }
        loop {
            if let Some(l) = &listener {
                while let Ok((conn, _)) = l.accept() {
                    serve_one(conn, |cmd, args| w.handle(&self, cmd, args));
                }
            }
            if w.shutdown {
                w.cancel.store(true, Ordering::SeqCst);
                if let Some(p) = control {
                    let _ = std::fs::remove_file(p);
                }
                return Ok(VmExit::Stopped);
            }
            match ready_rx.recv_timeout(Duration::from_millis(20)) {
                Ok((state, reply)) => {
                    let r = self
                        .apply_state(&state)
                        .map_err(|e| e.to_string())
                        .and_then(|()| self.acquire_disks().map_err(|(d, e)| format!("disk {d}: take its lock: {e}")));
                    match r {
                        Ok(()) => {
                            let _ = reply.send(Ok(()));
                            eprintln!("basalt-vmm: the VM has arrived; resuming it here");
                            // Switches and bridges learn the guest's new port now,
                            // not when the guest next happens to send.
                            self.announce_nics();
                            self.arrived = Some(w.status.clone());
                            return self.run_on(listener, control);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {}
            }
            if w.receiver.as_ref().is_some_and(|(_, t)| t.is_finished()) {
                if let Some((at, t)) = w.receiver.take() {
                    let why = match t.join() {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => "the receiver ended without the VM".into(),
                        Err(_) => "the receiving thread panicked".into(),
                    };
                    if let Some(p) = control {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(VmError::Setup(format!("incoming migration on {at} failed: {why}")));
                }
            }
        }
    }
}
