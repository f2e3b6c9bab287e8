//! One `basalt-vmm` process per assigned VM: started when the VM should run,
//! stopped (SIGTERM, then SIGKILL after the stop timeout) when it should not
//! or is no longer assigned here, restarted with backoff when it fails.
//!
//! The supervisor owns all VM state in one task and reacts to events (a new
//! assignment set, a process that came up or exited, a tick), so no lock is
//! held across the processes' lives. It reports every observed phase change;
//! the reporter delivers them to the controllers whenever they are reachable.
//!
//! The desired state is whatever the controllers last sent: while they are
//! unreachable nothing changes, so running VMs keep running.
//!
//! Migrations: a VM migrating *to* this host arrives in the assignments while
//! still placed on its source; this host starts a receiving `basalt-vmm
//! --incoming` for it, says where it listens, and says when the guest runs
//! here. On the source, once the receiver listens, a driver task asks the VM's
//! VMM to `migrate-send` and watches it; a VMM that handed its guest over
//! exits 4. Which host runs the guest is the VMMs' decision (the RBD lock
//! hand-over); the agents only report it.

use crate::network::{tap_name, HostNetworks, Iproute2, Segment};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use pb::VmPhase;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::reporter::ReporterMsg;
use crate::vmm::{last_log_line, vm_config, ExitKind, VmDir};

#[derive(Debug)]
pub enum Event {
    Assigned(pb::Assignments),
    /// The VMM's control socket answered: the VM is running.
    Up {
        vm: String,
        token: u64,
    },
    /// `status` is None for a process adopted from an earlier agent (not our
    /// child, so its status is unknown).
    Exited {
        vm: String,
        token: u64,
        status: Option<ExitStatus>,
    },
    /// The receiving VMM runs the guest.
    ReceiverResumed {
        vm: String,
        token: u64,
        migration: u64,
        downtime_ms: Option<u64>,
        total_ms: Option<u64>,
    },
    /// The sending VMM gave up (or refused); its guest runs on here.
    SendEnded {
        vm: String,
        token: u64,
        migration: u64,
        error: String,
    },
    Tick,
}

#[derive(Debug)]
struct Proc {
    token: u64,
    pid: i32,
    generation: u64,
    up: bool,
    stop_requested: Option<Instant>,
    killed: bool,
    /// Started with `--incoming` on this port and not yet running the guest.
    receiving: Option<u16>,
    /// The migration a receiver waits for: its exit speaks for that one
    /// only, not for a later migration of the same VM. Unknown (None) for a
    /// receiver adopted from an earlier agent until the assignments name its
    /// migration.
    receives_for: Option<u64>,
}

/// This host's part in a VM's migration.
#[derive(Debug)]
struct Part {
    id: u64,
    /// This host receives (the target); otherwise it sends.
    incoming: bool,
    /// A receiver was started (target) or a driver task watches the send (source).
    started: bool,
    /// Target: the receiver's address was reported.
    announced: bool,
    /// Target: a task watches the receiver for the guest's arrival.
    watching: bool,
    /// This host's last word on it is said: nothing more to report.
    ended: bool,
    cancel_sent: bool,
}

#[derive(Debug, Default)]
struct Slot {
    /// The assignment; None once the VM is no longer assigned here.
    vm: Option<pb::Vm>,
    proc: Option<Proc>,
    /// Not started again for this generation: the guest powered off, the
    /// spec cannot run here, or restarts were exhausted. A new generation
    /// (start, stop, spec change) clears it.
    settled_generation: Option<u64>,
    restarts: VecDeque<Instant>,
    start_after: Option<Instant>,
    phase: Option<(VmPhase, String)>,
    /// The VM's migration in progress, if this host takes part.
    part: Option<Part>,
}

pub struct Supervisor {
    cfg: Arc<Config>,
    slots: BTreeMap<String, Slot>,
    volumes: HashMap<String, pb::Volume>,
    /// Nothing is stopped before the first assignment set arrives: adopted
    /// VMs must not die because the controllers are slow to answer.
    have_assignments: bool,
    events: mpsc::Sender<Event>,
    reports: mpsc::UnboundedSender<ReporterMsg>,
    metrics: Arc<Metrics>,
    next_token: u64,
    /// The networks the assigned VMs have NICs on, by name.
    networks: HashMap<String, pb::NetworkAttachment>,
    host_net: HostNetworks<Iproute2>,
    /// Whether this agent has built any network device: until then, a host
    /// without NICs is not asked about its links at all.
    net_used: bool,
    /// The last sync left something undone: when to try again.
    net_retry: Option<Instant>,
}

/// This host's underlay address: the host part of its node address.
fn cfg_host(cfg: &Config) -> String {
    cfg.address_host().to_string()
}

impl Supervisor {
    pub fn new(
        cfg: Arc<Config>,
        events: mpsc::Sender<Event>,
        reports: mpsc::UnboundedSender<ReporterMsg>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let local = cfg_host(&cfg);
        let host_net = HostNetworks::new(Iproute2, local).with_tap_tuning(crate::nic::Root("/".into()), cfg.nic_profile.clone());
        Supervisor {
            cfg,
            slots: BTreeMap::new(),
            volumes: HashMap::new(),
            have_assignments: false,
            events,
            reports,
            metrics,
            next_token: 1,
            networks: HashMap::new(),
            host_net,
            net_used: false,
            net_retry: None,
        }
    }

    /// Makes the host carry the networks and taps of the VMs assigned here
    /// (and migrating here).
    fn sync_networks(&mut self) {
        let mut segments: BTreeMap<u32, Segment> = BTreeMap::new();
        let mut taps: BTreeMap<String, u32> = BTreeMap::new();
        for (name, slot) in &self.slots {
            let Some(vm) = &slot.vm else { continue };
            for (i, nic) in vm.nics.iter().enumerate() {
                let Some(n) = self.networks.get(&nic.network) else { continue };
                segments
                    .entry(n.vni)
                    .or_insert_with(|| Segment { vni: n.vni, peers: n.peers.iter().cloned().collect() });
                taps.insert(tap_name(name, i), n.vni);
            }
        }
        if segments.is_empty() && taps.is_empty() && !self.net_used {
            return;
        }
        self.net_used = true;
        let errors = self.host_net.apply(&segments, &taps);
        for e in &errors {
            warn!("network: {e}");
        }
        self.net_retry = (!errors.is_empty()).then(|| Instant::now() + Duration::from_secs(5));
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ev = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = tick.tick() => Event::Tick,
            };
            self.handle(ev);
            if self.have_assignments {
                self.reconcile();
            }
            self.update_metrics();
        }
    }

    /// VMMs an earlier agent started that are still running: watched by PID
    /// (not our children), kept running if they are still assigned.
    pub fn adopt(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.cfg.state_dir.join("vms")) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = VmDir(e.path());
            let Some(pid) = std::fs::read_to_string(dir.pid_file()).ok().and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            if !is_our_vmm(pid, &dir) {
                let _ = std::fs::remove_file(dir.pid_file());
                continue;
            }
            let generation =
                std::fs::read_to_string(dir.0.join("generation")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            let token = self.token();
            info!(vm = %name, pid, "adopting the VMM an earlier agent started");
            self.watch_pid(name.clone(), token, pid);
            let slot = self.slots.entry(name).or_default();
            let receiving = incoming_port(pid);
            slot.proc = Some(Proc {
                token,
                pid,
                generation,
                up: true,
                stop_requested: None,
                killed: false,
                receiving,
                receives_for: None,
            });
            if receiving.is_none() {
                slot.phase = Some((VmPhase::Running, format!("basalt-vmm pid {pid} (adopted)")));
            }
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Assigned(a) => {
                self.have_assignments = true;
                self.volumes = a.volumes.into_iter().map(|v| (v.name.clone(), v)).collect();
                for slot in self.slots.values_mut() {
                    slot.vm = None;
                }
                let host = self.cfg.host_id.clone();
                for vm in a.vms {
                    let slot = self.slots.entry(vm.name.clone()).or_default();
                    let old_gen = slot.vm.as_ref().map(|v| v.generation);
                    if old_gen != Some(vm.generation) {
                        // A new intent: a fresh restart budget.
                        slot.restarts.clear();
                        slot.start_after = None;
                    }
                    let active = vm.migration.as_ref().filter(|m| {
                        matches!(
                            pb::MigrationPhase::try_from(m.phase),
                            Ok(pb::MigrationPhase::Preparing | pb::MigrationPhase::Sending)
                        )
                    });
                    match active {
                        Some(m) if slot.part.as_ref().map(|p| p.id) != Some(m.id) => {
                            // An adopted receiver is this migration's: the
                            // first one an agent hears of after adopting it.
                            if m.target == host {
                                if let Some(p) = slot.proc.as_mut().filter(|p| p.receiving.is_some()) {
                                    p.receives_for.get_or_insert(m.id);
                                }
                            }
                            slot.part = Some(Part {
                                id: m.id,
                                incoming: m.target == host,
                                started: false,
                                announced: false,
                                watching: false,
                                ended: false,
                                cancel_sent: false,
                            });
                        }
                        Some(_) => {}
                        None => slot.part = None,
                    }
                    // Placed here: whatever was received is this host's VM now.
                    if vm.placement == host {
                        if let Some(p) = slot.proc.as_mut().filter(|p| p.receiving.is_some()) {
                            p.receiving = None;
                        }
                    }
                    slot.vm = Some(vm);
                }
                // A migration of a VM no longer sent here is over for this host.
                for slot in self.slots.values_mut().filter(|s| s.vm.is_none()) {
                    slot.part = None;
                }
                self.networks = a.networks.into_iter().map(|n| (n.name.clone(), n)).collect();
                self.sync_networks();
                info!(
                    revision = a.revision,
                    vms = self.slots.values().filter(|s| s.vm.is_some()).count(),
                    "assignments"
                );
            }
            Event::Up { vm, token } => {
                if let Some(slot) = self.slots.get_mut(&vm) {
                    if let Some(p) = slot.proc.as_mut().filter(|p| p.token == token && !p.up) {
                        p.up = true;
                        if p.receiving.is_none() {
                            let msg = format!("basalt-vmm pid {} is running the guest", p.pid);
                            info!(vm = %vm, "{msg}");
                            set_phase(&self.reports, &vm, slot, VmPhase::Running, msg);
                        }
                    }
                }
            }
            Event::Exited { vm, token, status } => self.exited(&vm, token, status),
            Event::ReceiverResumed { vm, token, migration, downtime_ms, total_ms } => {
                let Some(slot) = self.slots.get_mut(&vm) else { return };
                let Some(p) = slot.proc.as_mut().filter(|p| p.token == token) else { return };
                p.receiving = None;
                let pid = p.pid;
                let d = downtime_ms.map_or("unknown".into(), |d| format!("{d} ms"));
                info!(vm = %vm, migration, "the guest arrived and runs here (downtime {d})");
                let _ = self.reports.send(migration_report(
                    &vm,
                    migration,
                    pb::MigrationReport::Completed,
                    downtime_ms,
                    total_ms,
                    "",
                ));
                if let Some(part) = slot.part.as_mut().filter(|x| x.id == migration) {
                    part.ended = true;
                }
                set_phase(
                    &self.reports,
                    &vm,
                    slot,
                    VmPhase::Running,
                    format!("basalt-vmm pid {pid} runs the migrated guest"),
                );
            }
            Event::SendEnded { vm, token, migration, error } => {
                let Some(slot) = self.slots.get_mut(&vm) else { return };
                if slot.proc.as_ref().map(|p| p.token) != Some(token) {
                    return;
                }
                if let Some(part) = slot.part.as_mut().filter(|x| x.id == migration && !x.ended) {
                    part.ended = true;
                    warn!(vm = %vm, migration, "the migration did not complete; the guest runs on here: {error}");
                    let _ = self.reports.send(migration_report(
                        &vm,
                        migration,
                        pb::MigrationReport::Failed,
                        None,
                        None,
                        &error,
                    ));
                }
            }
            Event::Tick => {
                if self.net_retry.is_some_and(|t| Instant::now() >= t) {
                    self.sync_networks();
                }
            }
        }
    }

    fn exited(&mut self, vm: &str, token: u64, status: Option<ExitStatus>) {
        let cfg = self.cfg.clone();
        let Some(slot) = self.slots.get_mut(vm) else { return };
        if slot.proc.as_ref().map(|p| p.token) != Some(token) {
            return;
        }
        let Some(p) = slot.proc.take() else { return };
        let dir = VmDir::new(&cfg.state_dir, vm);
        let _ = std::fs::remove_file(dir.pid_file());
        let kind = match status {
            Some(s) => ExitKind::of(s),
            // Not our child: its last words tell a hand-over from the rest.
            None if last_log_line(&dir).contains("this VMM is done") => ExitKind::MigratedAway,
            None => ExitKind::Other("exited (status unknown: started by an earlier agent)".into()),
        };
        self.metrics.exit(kind.label());
        if kind == ExitKind::MigratedAway {
            // The guest runs on the target now: nothing to restart, no phase
            // to report here (the VM is placed there once this is heard).
            slot.settled_generation = Some(p.generation);
            info!(vm, "basalt-vmm handed the guest over to the migration's target");
            if let Some(part) = slot.part.as_mut().filter(|x| !x.incoming && !x.ended) {
                part.ended = true;
                let _ =
                    self.reports.send(migration_report(vm, part.id, pb::MigrationReport::Completed, None, None, ""));
            }
            return;
        }
        if p.receiving.is_some() {
            // A receiver that ended before it ran the guest: the guest runs
            // on at the source. Not restarted (it would be a new migration).
            let why = match last_log_line(&dir) {
                d if d.is_empty() => format!("the receiving basalt-vmm {}", kind.describe()),
                d => format!("the receiving basalt-vmm {}: {d}", kind.describe()),
            };
            warn!(vm, "{why}");
            if let Some(part) = slot.part.as_mut().filter(|x| x.incoming && !x.ended && p.receives_for == Some(x.id)) {
                part.ended = true;
                let _ = self.reports.send(migration_report(vm, part.id, pb::MigrationReport::Failed, None, None, &why));
            }
            slot.phase = None;
            return;
        }
        if p.stop_requested.is_some() {
            let msg = if p.killed {
                format!("killed: it did not stop within {:.0} s", cfg.timing.stop_timeout.as_secs_f64())
            } else {
                "stopped".to_string()
            };
            info!(vm, "{msg}");
            set_phase(&self.reports, vm, slot, VmPhase::Stopped, msg);
            return;
        }
        if kind == ExitKind::Clean {
            // The guest's own power-off is its owner's intent: the desired
            // power follows it (compare-and-set on the generation that ran,
            // so a newer start request wins), and it is not restarted.
            slot.settled_generation = Some(p.generation);
            // The desired power goes first, so whoever sees Stopped also
            // sees the desired power that follows from it.
            info!(vm, "the guest powered off");
            let _ = self.reports.send(ReporterMsg::GuestPoweredOff { vm: vm.to_string(), generation: p.generation });
            set_phase(&self.reports, vm, slot, VmPhase::Stopped, "the guest powered off".into());
            return;
        }
        let why = match &kind {
            ExitKind::Setup => "basalt-vmm could not start the VM".to_string(),
            ExitKind::Crashed => "the guest or KVM failed".to_string(),
            ExitKind::ResetLoop => "the guest kept resetting".to_string(),
            ExitKind::Other(s) => format!("basalt-vmm {s}"),
            ExitKind::Clean | ExitKind::MigratedAway => unreachable!("handled above"),
        };
        let detail = last_log_line(&dir);
        let why = if detail.is_empty() { why } else { format!("{why}: {detail}") };
        let now = Instant::now();
        while slot.restarts.front().is_some_and(|t| now.duration_since(*t) > cfg.timing.restart_window) {
            slot.restarts.pop_front();
        }
        let msg = if (slot.restarts.len() as u32) < cfg.timing.max_restarts {
            let delay = cfg.timing.restart_backoff * 2u32.saturating_pow(slot.restarts.len() as u32);
            slot.restarts.push_back(now);
            slot.start_after = Some(now + delay);
            format!("{why}; restarting in {:.1} s", delay.as_secs_f64())
        } else {
            slot.settled_generation = Some(p.generation);
            format!(
                "{why}; not restarted again ({} restarts in {:.0} s)",
                slot.restarts.len(),
                cfg.timing.restart_window.as_secs_f64()
            )
        };
        warn!(vm, "{msg}");
        set_phase(&self.reports, vm, slot, VmPhase::Failed, msg);
    }

    fn reconcile(&mut self) {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for name in names {
            let now = Instant::now();
            let stop_timeout = self.cfg.timing.stop_timeout;
            self.drive_migration(&name);
            let host = self.cfg.host_id.clone();
            let Some(slot) = self.slots.get_mut(&name) else { continue };
            let placed_here = slot.vm.as_ref().is_some_and(|v| v.placement == host);
            // Migrating here: a receiver runs until the guest arrives or the migration ends.
            let receiving = slot.vm.is_some() && !placed_here && slot.part.as_ref().is_some_and(|p| p.incoming);
            let want_running = receiving
                || (placed_here && slot.vm.as_ref().is_some_and(|v| v.desired_power == pb::Power::Running as i32));
            match (&mut slot.proc, want_running) {
                (Some(p), false) => match p.stop_requested {
                    None => {
                        let why = if slot.vm.is_some() { "stop requested" } else { "no longer assigned to this host" };
                        info!(vm = %name, pid = p.pid, "stopping: {why}");
                        signal(p.pid, libc::SIGTERM);
                        p.stop_requested = Some(now);
                    }
                    Some(t) if !p.killed && now.duration_since(t) > stop_timeout => {
                        warn!(vm = %name, pid = p.pid, "did not stop in {stop_timeout:?}: SIGKILL");
                        signal(p.pid, libc::SIGKILL);
                        p.killed = true;
                    }
                    Some(_) => {}
                },
                (Some(_), true) => {}
                (None, true) if receiving => {
                    if slot.part.as_ref().is_some_and(|p| p.started) {
                        continue;
                    }
                    self.start_receiver(&name);
                }
                (None, true) => {
                    let generation = slot.vm.as_ref().map_or(0, |v| v.generation);
                    if slot.settled_generation == Some(generation) || slot.start_after.is_some_and(|t| now < t) {
                        continue;
                    }
                    self.start(&name, None);
                }
                (None, false) => {
                    if slot.vm.is_none() {
                        self.slots.remove(&name);
                    } else if slot.phase.as_ref().map(|p| p.0) != Some(VmPhase::Stopped) {
                        set_phase(&self.reports, &name, slot, VmPhase::Stopped, "stopped".into());
                    }
                }
            }
        }
    }

    /// A receiving VMM for a VM migrating here, on a free migration port.
    fn start_receiver(&mut self, name: &str) {
        let used: Vec<u16> = self.slots.values().filter_map(|s| s.proc.as_ref().and_then(|p| p.receiving)).collect();
        let port = self.cfg.migration_ports.clone().find(|p| !used.contains(p));
        let Some(slot) = self.slots.get_mut(name) else { return };
        let Some(part) = slot.part.as_mut() else { return };
        part.started = true;
        match port {
            Some(port) => self.start(name, Some(port)),
            None => {
                part.ended = true;
                let why = format!(
                    "no free migration port on {} (ports {:?} are all in use)",
                    self.cfg.host_id, self.cfg.migration_ports
                );
                warn!(vm = %name, "{why}");
                let _ =
                    self.reports.send(migration_report(name, part.id, pb::MigrationReport::Failed, None, None, &why));
            }
        }
    }

    /// This host's next step in the VM's migration, if it has one to take.
    fn drive_migration(&mut self, name: &str) {
        let cfg = self.cfg.clone();
        let events = self.events.clone();
        let Some(slot) = self.slots.get_mut(name) else { return };
        let (Some(vm), Some(part), Some(proc)) = (slot.vm.as_ref(), slot.part.as_mut(), slot.proc.as_ref()) else {
            return;
        };
        let Some(m) = vm.migration.as_ref().filter(|m| m.id == part.id) else { return };
        if !proc.up || part.ended || proc.stop_requested.is_some() {
            return;
        }
        let socket = VmDir::new(&cfg.state_dir, name).control_socket();
        let (vm_name, token, pid, id) = (name.to_string(), proc.token, proc.pid, part.id);
        if part.incoming {
            // A receiver started here, or adopted from an earlier agent; not
            // one left over from an earlier migration and still stopping.
            let Some(port) = proc.receiving.filter(|_| proc.receives_for == Some(id)) else { return };
            if !part.announced && m.phase == pb::MigrationPhase::Preparing as i32 {
                part.announced = true;
                let address = format!("{}:{port}", cfg.address_host());
                info!(vm = %name, migration = id, %address, "receiver listening");
                let mut ready = migration_report(name, id, pb::MigrationReport::ReceiverReady, None, None, "");
                if let ReporterMsg::Migration(r) = &mut ready {
                    r.address = address;
                }
                let _ = self.reports.send(ready);
            }
            if !part.watching {
                part.watching = true;
                tokio::spawn(watch_receiver(socket, events, vm_name, token, pid, id));
            }
            return;
        }
        if m.phase != pb::MigrationPhase::Sending as i32 || m.receiver.is_empty() {
            return;
        }
        if !part.started {
            part.started = true;
            let mut args = serde_json::json!({ "peer": m.receiver });
            if m.downtime_budget_ms > 0 {
                args["downtime_ms"] = m.downtime_budget_ms.into();
            }
            if m.bandwidth_mib_s > 0 {
                args["bandwidth_mib_s"] = m.bandwidth_mib_s.into();
            }
            info!(vm = %name, migration = id, peer = %m.receiver, "sending the VM");
            tokio::spawn(drive_send(socket, args, events, vm_name, token, pid, id));
        } else if m.cancel_requested && !part.cancel_sent {
            part.cancel_sent = true;
            info!(vm = %name, migration = id, "cancelling the migration");
            tokio::task::spawn_blocking(move || {
                match basalt_vmm::control::call(&socket, "migrate-cancel", serde_json::Value::Null, CONTROL_TIMEOUT) {
                    Ok(r) if r.ok => {}
                    Ok(r) => warn!(vm = %vm_name, "migrate-cancel refused: {}", r.error.unwrap_or_default()),
                    Err(e) => warn!(vm = %vm_name, "migrate-cancel: {e}"),
                }
            });
        }
    }

    fn start(&mut self, name: &str, incoming: Option<u16>) {
        let token = self.token();
        let cfg = self.cfg.clone();
        let dir = VmDir::new(&cfg.state_dir, name);
        let Some(slot) = self.slots.get_mut(name) else { return };
        let Some(vm) = slot.vm.clone() else { return };
        slot.start_after = None;
        let fail = |slot: &mut Slot, reports: &mpsc::UnboundedSender<ReporterMsg>, msg: String| {
            warn!(vm = %name, "{msg}");
            slot.settled_generation = Some(vm.generation);
            set_phase(reports, name, slot, VmPhase::Failed, msg);
        };
        let vmcfg = match vm_config(&vm, &self.volumes, &cfg.ceph, &dir) {
            Ok(c) => c,
            Err(e) => return fail(slot, &self.reports, format!("cannot run on {}: {e}", cfg.host_id)),
        };
        // A tap the network code could not build would be created by the
        // VMM itself, on no bridge: a VM cut off without a word. Refuse instead.
        if let Some(n) = vmcfg.nics.iter().find(|n| !Path::new("/sys/class/net").join(&n.tap).exists()) {
            let why = format!("tap {} for NIC {} is not ready on {} (see the agent's network errors)", n.tap, n.mac, cfg.host_id);
            warn!(vm = %name, "{why}");
            slot.start_after = Some(Instant::now() + Duration::from_secs(5));
            set_phase(&self.reports, name, slot, VmPhase::Starting, why);
            return;
        }
        let prepared = (|| -> std::io::Result<std::fs::File> {
            std::fs::create_dir_all(&dir.0)?;
            let json = serde_json::to_vec_pretty(&vmcfg).map_err(std::io::Error::other)?;
            std::fs::write(dir.config(), json)?;
            std::fs::write(dir.0.join("generation"), vm.generation.to_string())?;
            match std::fs::remove_file(dir.control_socket()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::OpenOptions::new().create(true).append(true).open(dir.log())
        })();
        let log = match prepared {
            Ok(l) => l,
            Err(e) => return fail(slot, &self.reports, format!("cannot prepare {}: {e}", dir.0.display())),
        };
        let mut cmd = tokio::process::Command::new(&cfg.vmm);
        cmd.arg("--config").arg(dir.config()).arg("--control-socket").arg(dir.control_socket());
        if let Some(port) = incoming {
            // On this host's own address only: migration traffic stays between hosts.
            cmd.arg("--incoming").arg(format!("{}:{port}", cfg.address_host()));
        }
        cmd.stdin(Stdio::null());
        match log.try_clone() {
            Ok(l2) => {
                cmd.stdout(Stdio::from(log)).stderr(Stdio::from(l2));
            }
            Err(_) => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        // Its own process group: a Ctrl-C or SIGTERM meant for the agent must
        // not take the VMs down with it.
        cmd.process_group(0).kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return fail(slot, &self.reports, format!("cannot run {}: {e}", cfg.vmm.display())),
        };
        let Some(pid) = child.id().map(|p| p as i32) else {
            return fail(slot, &self.reports, "basalt-vmm exited before it could be watched".into());
        };
        let _ = std::fs::write(dir.pid_file(), pid.to_string());
        self.metrics.start();
        info!(vm = %name, pid, generation = vm.generation, incoming = ?incoming, "started basalt-vmm");
        slot.proc = Some(Proc {
            token,
            pid,
            generation: vm.generation,
            up: false,
            stop_requested: None,
            killed: false,
            receiving: incoming,
            receives_for: incoming.and(slot.part.as_ref().map(|p| p.id)),
        });
        if incoming.is_none() {
            set_phase(&self.reports, name, slot, VmPhase::Starting, format!("basalt-vmm pid {pid} on {}", cfg.host_id));
        }

        let events = self.events.clone();
        let vm_name = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = events.send(Event::Exited { vm: vm_name, token, status }).await;
        });
        let events = self.events.clone();
        let vm_name = name.to_string();
        let socket = dir.control_socket();
        tokio::spawn(async move {
            // Up once the control socket answers `status`; give up quietly if
            // the process exits first (its exit event says why).
            for _ in 0..600 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let s = socket.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    basalt_vmm::control::call(&s, "status", serde_json::Value::Null, Duration::from_secs(2))
                        .is_ok_and(|r| r.ok)
                })
                .await
                .unwrap_or(false);
                if ok {
                    let _ = events.send(Event::Up { vm: vm_name, token }).await;
                    return;
                }
                if events.is_closed() || !alive(pid) {
                    return;
                }
            }
        });
    }

    /// Polls an adopted process (not our child, so no wait()).
    fn watch_pid(&self, vm: String, token: u64, pid: i32) {
        let events = self.events.clone();
        tokio::spawn(async move {
            while alive(pid) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let _ = events.send(Event::Exited { vm, token, status: None }).await;
        });
    }

    fn update_metrics(&self) {
        let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        for s in self.slots.values() {
            if let Some((p, _)) = &s.phase {
                *counts.entry(p.as_str_name()).or_default() += 1;
            }
        }
        self.metrics.set_vm_phases(&counts);
    }
}

const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

fn migration_report(
    vm: &str,
    id: u64,
    report: pb::MigrationReport,
    downtime_ms: Option<u64>,
    total_ms: Option<u64>,
    reason: &str,
) -> ReporterMsg {
    let ms = |v: Option<u64>| v.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
    ReporterMsg::Migration(pb::ReportMigrationRequest {
        vm: vm.to_string(),
        migration_id: id,
        report: report as i32,
        downtime_ms: ms(downtime_ms),
        total_ms: ms(total_ms),
        reason: reason.chars().take(1000).collect(),
        ..Default::default()
    })
}

/// The VMM's `migrate-status`, or None if it did not answer.
async fn migrate_status(socket: &Path) -> Option<basalt_vmm::migration::Status> {
    let s = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let r = basalt_vmm::control::call(&s, "migrate-status", serde_json::Value::Null, CONTROL_TIMEOUT).ok()?;
        r.ok.then(|| serde_json::from_value(r.result).ok()).flatten()
    })
    .await
    .ok()
    .flatten()
}

/// Watches a receiving VMM until it runs the guest (or ends: its exit says why).
async fn watch_receiver(socket: PathBuf, events: mpsc::Sender<Event>, vm: String, token: u64, pid: i32, id: u64) {
    use basalt_vmm::migration::Phase;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match migrate_status(&socket).await {
            Some(mut st) if st.phase == Phase::Completed => {
                // The sender's report (with the downtime) follows the
                // guest's resumption by a moment; the arrival is not held
                // up long for it.
                for _ in 0..15 {
                    if st.report.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    match migrate_status(&socket).await {
                        Some(again) => st = again,
                        None => break,
                    }
                }
                let report = st.report.as_ref();
                let ev = Event::ReceiverResumed {
                    vm,
                    token,
                    migration: id,
                    downtime_ms: report.map(|r| r.downtime_ms),
                    total_ms: report.map(|r| r.total_ms),
                };
                let _ = events.send(ev).await;
                return;
            }
            Some(_) => {}
            None if !alive(pid) || events.is_closed() => return,
            None => {}
        }
    }
}

/// Starts the send on the VM's VMM (unless it is under way: an agent
/// restarted mid-migration) and watches it until it fails or the VMM hands
/// the guest over (and exits 4, which the exit event reports).
async fn drive_send(
    socket: PathBuf,
    args: serde_json::Value,
    events: mpsc::Sender<Event>,
    vm: String,
    token: u64,
    pid: i32,
    id: u64,
) {
    use basalt_vmm::migration::Phase;
    let ended = |error: String| Event::SendEnded { vm: vm.clone(), token, migration: id, error };
    let under_way = migrate_status(&socket)
        .await
        .is_some_and(|st| st.role == "send" && (st.phase.active() || st.phase == Phase::Completed));
    if !under_way {
        let s = socket.clone();
        let sent =
            tokio::task::spawn_blocking(move || basalt_vmm::control::call(&s, "migrate-send", args, CONTROL_TIMEOUT))
                .await;
        let refused = match sent {
            Ok(Ok(r)) if r.ok => None,
            Ok(Ok(r)) => Some(format!("basalt-vmm refused to send: {}", r.error.unwrap_or_default())),
            Ok(Err(e)) => Some(format!("basalt-vmm's control socket: {e}")),
            Err(e) => Some(format!("migrate-send: {e}")),
        };
        if let Some(why) = refused {
            let _ = events.send(ended(why)).await;
            return;
        }
    }
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match migrate_status(&socket).await {
            Some(st) if st.role == "send" && matches!(st.phase, Phase::Failed | Phase::Cancelled) => {
                let why = st.error.unwrap_or_else(|| format!("{:?}", st.phase).to_lowercase());
                let _ = events.send(ended(why)).await;
                return;
            }
            Some(_) => {}
            None if !alive(pid) || events.is_closed() => return,
            None => {}
        }
    }
}

/// The port an adopted VMM receives a migration on, from its command line.
fn incoming_port(pid: i32) -> Option<u16> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let i = args.iter().position(|a| *a == b"--incoming")?;
    let addr = std::str::from_utf8(args.get(i + 1)?).ok()?;
    addr.rsplit_once(':')?.1.parse().ok()
}

fn set_phase(reports: &mpsc::UnboundedSender<ReporterMsg>, vm: &str, slot: &mut Slot, phase: VmPhase, message: String) {
    let new = (phase, message);
    if slot.phase.as_ref() != Some(&new) {
        slot.phase = Some(new.clone());
        let _ = reports.send(ReporterMsg::Status { vm: vm.to_string(), phase: new.0, message: new.1 });
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a PID this agent started (or adopted after
    // checking its command line) and a constant signal; no memory is shared.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        warn!(pid, sig, "kill: {}", std::io::Error::last_os_error());
    }
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone: /proc/PID/stat's state is 'Z'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// An adopted PID must be a basalt-vmm started with this VM's config (the PID
/// may have been reused since the pid file was written).
fn is_our_vmm(pid: i32, dir: &VmDir) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let want = dir.config();
    alive(pid) && cmdline.split(|b| *b == 0).any(|a| Path::new(std::ffi::OsStr::from_bytes(a)) == want)
}

#[cfg(test)]
mod tests {
    //! The supervision logic against a stand-in for basalt-vmm (a shell
    //! script at the process seam that exits or sleeps as the VM's cmdline
    //! says); real VMMs are covered by tests/tests/agent_cluster.rs.
    use super::*;
    use crate::config::{FileConfig, Flags};

    struct Rig {
        _dir: tempfile::TempDir,
        kernel: String,
        events: mpsc::Sender<Event>,
        reports: mpsc::UnboundedReceiver<ReporterMsg>,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tmp");
        let vmm = dir.path().join("fake-vmm");
        std::fs::write(
            &vmm,
            "#!/bin/sh\n# args: --config FILE --control-socket SOCK\n\
             grep -q mode=crash \"$2\" && { echo 'guest failed: boom' >&2; exit 2; }\n\
             grep -q mode=poweroff \"$2\" && exit 0\n\
             exec sleep 600\n",
        )
        .expect("fake vmm");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let kernel = dir.path().join("Image");
        std::fs::write(&kernel, b"k").expect("kernel");
        let file: FileConfig = toml::from_str(&format!(
            "host_id = \"h1\"\naddress = \"127.0.0.1:7200\"\ncontrollers = [\"127.0.0.1:1\"]\nvcpus = 2\nmemory_mib = 1024\n\
             state_dir = \"{}\"\nvmm = \"{}\"\n[timing]\nrestart_backoff_ms = 50\nmax_restarts = 2\nstop_timeout_ms = 3000\n",
            dir.path().join("state").display(),
            vmm.display()
        ))
        .expect("config");
        let cfg = Arc::new(Config::resolve(file, Flags::default()).expect("valid"));
        let (ev_tx, ev_rx) = mpsc::channel(16);
        let (rep_tx, rep_rx) = mpsc::unbounded_channel();
        tokio::spawn(Supervisor::new(cfg, ev_tx.clone(), rep_tx, Arc::new(Metrics::new())).run(ev_rx));
        Rig { kernel: kernel.display().to_string(), _dir: dir, events: ev_tx, reports: rep_rx }
    }

    fn vm(kernel: &str, name: &str, mode: &str, power: pb::Power, generation: u64) -> pb::Vm {
        pb::Vm {
            name: name.into(),
            spec: Some(pb::VmSpec {
                vcpus: 1,
                memory_mib: 128,
                boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
                    kernel: kernel.into(),
                    initrd: String::new(),
                    cmdline: format!("mode={mode}"),
                })),
                ..Default::default()
            }),
            desired_power: power as i32,
            generation,
            placement: "h1".into(),
            ..Default::default()
        }
    }

    async fn assign(r: &Rig, vms: Vec<pb::Vm>) {
        r.events.send(Event::Assigned(pb::Assignments { revision: 1, vms, volumes: vec![], networks: vec![] })).await.expect("send");
    }

    /// The next status report (power-off notices are collected aside).
    async fn next(r: &mut Rig, offs: &mut Vec<(String, u64)>) -> (String, VmPhase, String) {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), r.reports.recv()).await.expect("a report in time");
            match m.expect("reporter channel open") {
                ReporterMsg::Status { vm, phase, message } => return (vm, phase, message),
                ReporterMsg::GuestPoweredOff { vm, generation } => offs.push((vm, generation)),
                ReporterMsg::Resync | ReporterMsg::Migration(_) => {}
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_crashing_vm_is_restarted_with_backoff_then_left_failed() {
        let mut r = rig();
        let mut offs = Vec::new();
        assign(&r, vec![vm(&r.kernel, "c", "crash", pb::Power::Running, 1)]).await;
        let mut failures = Vec::new();
        while failures.len() < 3 {
            let (vm, phase, msg) = next(&mut r, &mut offs).await;
            assert_eq!(vm, "c");
            if phase == VmPhase::Failed {
                assert!(msg.contains("the guest or KVM failed") && msg.contains("boom"), "{msg}");
                failures.push(msg);
            }
        }
        assert!(
            failures[0].contains("restarting in 0.1 s") || failures[0].contains("restarting in 0.0 s"),
            "{failures:?}"
        );
        assert!(failures[1].contains("restarting in 0.1 s"), "the backoff doubles: {failures:?}");
        assert!(failures[2].contains("not restarted again (2 restarts"), "{failures:?}");
        // No further start for this generation...
        assert!(tokio::time::timeout(Duration::from_millis(700), r.reports.recv()).await.is_err(), "no more reports");
        // ...until a new intent (generation) arrives.
        assign(&r, vec![vm(&r.kernel, "c", "crash", pb::Power::Running, 2)]).await;
        assert_eq!(next(&mut r, &mut offs).await.1, VmPhase::Starting);
        assert!(offs.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_guest_power_off_is_reported_and_becomes_the_desired_power() {
        let mut r = rig();
        let mut offs = Vec::new();
        assign(&r, vec![vm(&r.kernel, "p", "poweroff", pb::Power::Running, 7)]).await;
        assert_eq!(next(&mut r, &mut offs).await.1, VmPhase::Starting);
        let (_, phase, msg) = next(&mut r, &mut offs).await;
        assert_eq!((phase, msg.as_str()), (VmPhase::Stopped, "the guest powered off"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Ok(m) = r.reports.try_recv() {
            if let ReporterMsg::GuestPoweredOff { vm, generation } = m {
                offs.push((vm, generation));
            }
        }
        assert_eq!(offs, vec![("p".to_string(), 7)], "compare-and-set on the generation that ran");
        assert!(tokio::time::timeout(Duration::from_millis(700), r.reports.recv()).await.is_err(), "not restarted");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stopped_and_unassigned_vms_are_terminated() {
        let mut r = rig();
        let mut offs = Vec::new();
        assign(
            &r,
            vec![vm(&r.kernel, "a", "run", pb::Power::Running, 1), vm(&r.kernel, "b", "run", pb::Power::Running, 1)],
        )
        .await;
        for _ in 0..2 {
            assert_eq!(next(&mut r, &mut offs).await.1, VmPhase::Starting);
        }
        // a: desired Stopped; b: no longer assigned here.
        assign(&r, vec![vm(&r.kernel, "a", "run", pb::Power::Stopped, 2)]).await;
        // The two exits may come in either order.
        let mut stopped = BTreeMap::new();
        for _ in 0..2 {
            let (vm, phase, msg) = next(&mut r, &mut offs).await;
            stopped.insert(vm, (phase, msg));
        }
        assert_eq!(stopped["a"], (VmPhase::Stopped, "stopped".to_string()));
        assert_eq!(stopped["b"].0, VmPhase::Stopped);
        // A spec the host cannot run is refused without a process.
        let mut bad = vm("/nonexistent/Image", "x", "run", pb::Power::Running, 1);
        bad.name = "x".into();
        assign(&r, vec![bad]).await;
        let (vm_x, phase, msg) = next(&mut r, &mut offs).await;
        assert_eq!((vm_x.as_str(), phase), ("x", VmPhase::Failed));
        assert!(msg.contains("cannot run on h1") && msg.contains("kernel"), "{msg}");
    }
}
