//! The migration commands (see `model::migrations` for the phases). Like
//! every handler, each checks everything before it changes anything.

use super::{not_found, Changes, ClusterState, Outcome};
use crate::error::{invalid, precondition, CommandError};
use crate::model::migrations::MAX_FINISHED_MIGRATIONS;
use crate::model::{
    EventKind, Migration, MigrationId, MigrationPhase, MigrationReport, NodeId, NodeState, Observed, Power, VmPhase,
};
use crate::scheduler::{place, VmRequirements};

/// A receiver address an agent reports: host:port, nothing else.
fn check_address(a: &str) -> Result<(), CommandError> {
    let ok = a.len() <= 255
        && a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("receiver address {a:?} is not host:port")))
    }
}

/// Longest reason kept with a migration.
const MAX_REASON: usize = 1024;

impl ClusterState {
    /// Refuses a change that would pull the VM out from under its migration.
    pub(super) fn not_migrating(&self, vm: &str) -> Result<(), CommandError> {
        match self.active_migration(vm) {
            Some(m) => Err(precondition(format!(
                "vm {vm} is migrating from node {} to node {} (migration {}); wait for it or cancel it first",
                m.source, m.target, m.id
            ))),
            None => Ok(()),
        }
    }

    /// Whether `vm` may start migrating now, and where from.
    fn migration_source(&self, vm_name: &str) -> Result<NodeId, CommandError> {
        let vm = self.vms.get(vm_name).ok_or_else(|| not_found("vm", vm_name))?;
        self.not_migrating(vm_name)?;
        let Some(source) = vm.placement.clone() else {
            return Err(precondition(format!(
                "vm {vm_name} is not placed on any node, so it has nowhere to move from"
            )));
        };
        if vm.desired_power != Power::Running
            || vm.observed.phase != VmPhase::Running
            || vm.observed.node.as_deref() != Some(source.as_str())
        {
            return Err(precondition(format!(
                "vm {vm_name} is not running (observed {} on node {source}): only a running VM can be live-migrated; a stopped one starts wherever it is placed",
                vm.observed.phase
            )));
        }
        let src = self.nodes.get(&source).ok_or_else(|| not_found("node", &source))?;
        if !matches!(src.state, NodeState::Ready | NodeState::Cordoned) {
            return Err(precondition(format!(
                "vm {vm_name}'s node {source} is {}; its agent cannot send it",
                src.state
            )));
        }
        if vm.spec.volumes().next().is_none() {
            // The RBD lock is what decides which host resumes the guest when
            // the last message of a migration is lost.
            return Err(precondition(format!(
                "vm {vm_name} has no RBD disk: live migration needs one, whose lock decides which host runs the guest"
            )));
        }
        Ok(source)
    }

    /// The node the scheduler would move `vm` to (any Ready node but its own
    /// that can take it on top of what it runs and what is migrating to it).
    pub fn pick_migration_target(&self, vm_name: &str) -> Result<NodeId, CommandError> {
        let source = self.migration_source(vm_name)?;
        let vm = &self.vms[vm_name];
        let src = self.nodes.get(&source).ok_or_else(|| not_found("node", &source))?;
        let can_take = |n: &crate::model::Node| n.arch == src.arch && n.missing_cpu_features(src).is_empty();
        let views: Vec<_> = self
            .node_views()
            .into_iter()
            .filter(|v| v.id != source && self.nodes.get(&v.id).is_some_and(can_take))
            .collect();
        place(&VmRequirements::of(vm), &views)
            .map_err(|r| precondition(format!("vm {vm_name} cannot move: {r} (among nodes of its architecture with its CPU features, besides its own node {source})")))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_migration(
        &mut self,
        vm_name: &str,
        target: &str,
        (downtime_ms, bandwidth_mib_s): (u32, u32),
        rev: u64,
        now: u64,
        ch: &mut Changes,
        touched: &mut Vec<NodeId>,
    ) -> Result<Outcome, CommandError> {
        if downtime_ms != 0 && !(10..=60_000).contains(&downtime_ms) {
            return Err(invalid(format!("downtime of {downtime_ms} ms must be between 10 ms and 60 s (0: default)")));
        }
        let source = self.migration_source(vm_name)?;
        let vm = &self.vms[vm_name];
        if target == source {
            return Err(precondition(format!("vm {vm_name} already runs on node {target}")));
        }
        let node = self.nodes.get(target).ok_or_else(|| not_found("node", target))?;
        let src_arch = self.nodes.get(&source).map(|n| n.arch.clone()).unwrap_or_default();
        if node.arch != src_arch {
            return Err(precondition(format!(
                "node {target} is {}, node {source} is {src_arch}: a VM moves only between hosts of one architecture",
                node.arch
            )));
        }
        if let Some(src) = self.nodes.get(&source) {
            let missing = node.missing_cpu_features(src);
            if !missing.is_empty() {
                return Err(precondition(format!(
                    "node {target} lacks CPU features of node {source} that the guest may use: {}",
                    missing.join(" ")
                )));
            }
        }
        self.check_fits(vm, node)?;
        let m = Migration {
            id: rev,
            vm: vm_name.to_string(),
            source: source.clone(),
            target: target.to_string(),
            phase: MigrationPhase::Preparing,
            started_ms: now,
            ended_ms: None,
            receiver: None,
            downtime_budget_ms: downtime_ms,
            bandwidth_mib_s,
            cancel_requested: false,
            abort_reason: None,
            downtime_ms: None,
            total_ms: None,
            reason: String::new(),
        };
        self.migrations.insert(rev, m);
        self.active_migrations.insert(vm_name.to_string(), rev);
        if let Some(vm) = self.vms.get_mut(vm_name) {
            vm.updated_revision = rev;
        }
        touched.extend([source.clone(), target.to_string()]);
        ch.push((
            EventKind::MigrationStarted,
            format!("vm/{vm_name}"),
            format!("migration {rev} from node {source} to node {target} started"),
        ));
        Ok(Outcome::Migration(rev))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn report_migration(
        &mut self,
        vm_name: &str,
        id: MigrationId,
        node: Option<&str>,
        report: MigrationReport,
        rev: u64,
        now: u64,
        ch: &mut Changes,
        touched: &mut Vec<NodeId>,
    ) -> Result<Outcome, CommandError> {
        let m = self.migrations.get(&id).ok_or_else(|| CommandError::NotFound(format!("no migration {id}")))?;
        if m.vm != vm_name {
            return Err(invalid(format!("migration {id} is vm {}'s, not vm {vm_name}'s", m.vm)));
        }
        let who = node.map_or("the leader".to_string(), |n| format!("node {n}"));
        if let Some(n) = node {
            if n != m.source && n != m.target {
                return Err(precondition(format!("node {n} takes no part in migration {id}")));
            }
            if self.nodes.get(n).is_some_and(|x| x.state == NodeState::Fenced) {
                return Err(precondition(format!("node {n} is Fenced; its reports are not accepted")));
            }
        }
        let subject = format!("vm/{vm_name}");
        match report {
            MigrationReport::ReceiverReady { address } => {
                check_address(&address)?;
                if node != Some(m.target.as_str()) {
                    return Err(precondition(format!("only the target node {} has a receiver", m.target)));
                }
                if m.phase != MigrationPhase::Preparing {
                    return Err(precondition(format!("migration {id} is {}, not waiting for a receiver", m.phase)));
                }
                let m = self.migrations.get_mut(&id).expect("checked above");
                m.phase = MigrationPhase::Sending;
                m.receiver = Some(address.clone());
                ch.push((
                    EventKind::MigrationProgressed,
                    subject,
                    format!("migration {id}: the receiver listens at {address}; node {} sends", m.source),
                ));
            }
            MigrationReport::Completed { downtime_ms, total_ms } => {
                if node.is_none() {
                    return Err(invalid("only an agent can say a migration completed"));
                }
                if m.phase == MigrationPhase::Completed {
                    // The other side's word on a finished migration: it may
                    // know the downtime the first one did not.
                    if m.downtime_ms.is_some() || downtime_ms.is_none() {
                        return Err(precondition(format!("migration {id} is already Completed")));
                    }
                    let m = self.migrations.get_mut(&id).expect("checked above");
                    m.downtime_ms = downtime_ms;
                    m.total_ms = m.total_ms.or(total_ms);
                    if let Some(d) = downtime_ms {
                        self.migration_stats.observe_downtime(d);
                    }
                    return Ok(Outcome::Done);
                }
                if m.phase != MigrationPhase::Sending {
                    return Err(precondition(format!("migration {id} is {}; it cannot complete", m.phase)));
                }
                let (source, target) = (m.source.clone(), m.target.clone());
                let m = self.migrations.get_mut(&id).expect("checked above");
                m.downtime_ms = downtime_ms;
                m.total_ms = total_ms;
                // Last: it may drop the oldest finished records.
                self.finish(id, MigrationPhase::Completed, String::new(), now);
                if let Some(d) = downtime_ms {
                    self.migration_stats.observe_downtime(d);
                }
                // The placement follows the guest.
                self.unindex(&source, vm_name);
                self.by_node.entry(target.clone()).or_default().insert(vm_name.to_string());
                let vm = self.vms.get_mut(vm_name).ok_or_else(|| not_found("vm", vm_name))?;
                vm.placement = Some(target.clone());
                vm.observed = Observed {
                    phase: VmPhase::Running,
                    node: Some(target.clone()),
                    message: format!("migrated from node {source}"),
                    at_ms: now,
                };
                vm.updated_revision = rev;
                let downtime = downtime_ms.map_or(String::new(), |d| format!(", downtime {d} ms"));
                let total = total_ms.map_or(String::new(), |t| format!(" in {:.1} s", t as f64 / 1000.0));
                ch.push((
                    EventKind::MigrationCompleted,
                    subject,
                    format!("migration {id}: moved from node {source} to node {target}{total}{downtime} ({who})"),
                ));
                // It arrived on a host fenced meanwhile: that host's policy.
                if self.nodes.get(&target).is_some_and(|n| n.state == NodeState::Fenced) {
                    let ha = self.vms.get(vm_name).is_some_and(|v| v.spec.ha);
                    self.evacuate_vms(&target, vec![(vm_name.to_string(), ha)], rev, now, ch)?;
                }
            }
            MigrationReport::Failed { reason } => {
                if reason.len() > MAX_REASON {
                    return Err(invalid(format!("reason is {} bytes, at most {MAX_REASON}", reason.len())));
                }
                if !m.phase.is_active() {
                    return Err(precondition(format!("migration {id} is already {}", m.phase)));
                }
                if node.is_none() && m.phase != MigrationPhase::Preparing {
                    // Once the receiver listens, only the VMMs know where the guest runs.
                    return Err(precondition(format!("migration {id} is Sending; only its agents can end it")));
                }
                let source = m.source.clone();
                let (phase, reason) = match (&m.abort_reason, m.cancel_requested) {
                    (Some(why), _) => (MigrationPhase::Failed, format!("{why}; {reason}")),
                    (None, true) => (MigrationPhase::Cancelled, reason),
                    (None, false) => (MigrationPhase::Failed, reason),
                };
                let (kind, verb) = match phase {
                    MigrationPhase::Cancelled => (EventKind::MigrationCancelled, "cancelled"),
                    _ => (EventKind::MigrationFailed, "failed"),
                };
                let msg = format!("migration {id} {verb}; vm {vm_name} runs on at node {source}: {reason} ({who})");
                self.finish(id, phase, reason, now);
                ch.push((kind, subject, msg));
                // Its source was fenced while it was being sent: now that it
                // is known not to have left, that host's policy applies.
                if self.nodes.get(&source).is_some_and(|n| n.state == NodeState::Fenced) {
                    let ha = self.vms.get(vm_name).is_some_and(|v| v.spec.ha);
                    self.evacuate_vms(&source, vec![(vm_name.to_string(), ha)], rev, now, ch)?;
                }
            }
        }
        if let Some(m) = self.migrations.get(&id) {
            touched.extend([m.source.clone(), m.target.clone()]);
        }
        if let Some(vm) = self.vms.get_mut(vm_name) {
            vm.updated_revision = rev;
        }
        Ok(Outcome::Done)
    }

    pub(super) fn cancel_migration(
        &mut self,
        vm_name: &str,
        rev: u64,
        now: u64,
        ch: &mut Changes,
        touched: &mut Vec<NodeId>,
    ) -> Result<Outcome, CommandError> {
        if !self.vms.contains_key(vm_name) {
            return Err(not_found("vm", vm_name));
        }
        let m = self.active_migration(vm_name).ok_or_else(|| precondition(format!("vm {vm_name} is not migrating")))?;
        let (id, phase) = (m.id, m.phase);
        if m.cancel_requested {
            return Err(precondition(format!("migration {id} is already being cancelled")));
        }
        touched.extend([m.source.clone(), m.target.clone()]);
        let subject = format!("vm/{vm_name}");
        if phase == MigrationPhase::Preparing {
            // Nothing has been sent: it ends here.
            self.finish(id, MigrationPhase::Cancelled, "cancelled by request".into(), now);
            ch.push((
                EventKind::MigrationCancelled,
                subject,
                format!("migration {id} cancelled before it sent anything"),
            ));
        } else {
            // The source's VMM decides: a migration past its switch completes.
            if let Some(m) = self.migrations.get_mut(&id) {
                m.cancel_requested = true;
            }
            ch.push((EventKind::MigrationProgressed, subject, format!("migration {id}: cancel requested")));
        }
        if let Some(vm) = self.vms.get_mut(vm_name) {
            vm.updated_revision = rev;
        }
        Ok(Outcome::Done)
    }

    /// Node `id` became `to` (Unreachable or Fenced).
    ///
    /// - A migration whose receiver does not listen yet ends Failed: no
    ///   guest byte can have moved.
    /// - One sending to a target the controllers lost is asked to stop, so
    ///   the guest is not pushed onto a host that may be fenced next: the
    ///   source VMM keeps it unless it is already past its switch, in which
    ///   case the migration completes and that host's fate applies.
    /// - One sending while the source is lost waits for the target's word
    ///   (its receiver gives up on a silent sender by itself) — unless both
    ///   hosts are now fenced: nobody is left to say where the guest runs
    ///   and neither host can write its disks, so it ends Failed and the VM
    ///   gets the fenced-node policy.
    pub(super) fn migrations_meet_node_state(
        &mut self,
        id: &str,
        to: NodeState,
        rev: u64,
        now: u64,
        ch: &mut Changes,
        touched: &mut Vec<NodeId>,
    ) -> Result<(), CommandError> {
        let fenced = |st: &Self, n: &str| st.nodes.get(n).is_some_and(|x| x.state == NodeState::Fenced);
        let touching: Vec<MigrationId> = self
            .active_migrations
            .values()
            .filter(|m| self.migrations.get(m).is_some_and(|m| m.source == id || m.target == id))
            .copied()
            .collect();
        for mid in touching {
            let Some(m) = self.migrations.get(&mid) else { continue };
            let (vm, source, target, phase) = (m.vm.clone(), m.source.clone(), m.target.clone(), m.phase);
            touched.extend([source.clone(), target.clone()]);
            let subject = format!("vm/{vm}");
            if phase == MigrationPhase::Preparing {
                let reason = format!("node {id} became {to} before the receiver listened");
                ch.push((EventKind::MigrationFailed, subject, format!("migration {mid} failed: {reason}")));
                self.finish(mid, MigrationPhase::Failed, reason, now);
            } else if fenced(self, &source) && fenced(self, &target) {
                let reason = format!("nodes {source} and {target} were both fenced while it was sent");
                ch.push((EventKind::MigrationFailed, subject, format!("migration {mid} failed: {reason}")));
                self.finish(mid, MigrationPhase::Failed, reason, now);
                let ha = self.vms.get(&vm).is_some_and(|v| v.spec.ha);
                self.evacuate_vms(&source, vec![(vm, ha)], rev, now, ch)?;
            } else if target == id && m.abort_reason.is_none() {
                let why = format!("target node {id} became {to}");
                if let Some(m) = self.migrations.get_mut(&mid) {
                    m.cancel_requested = true;
                    m.abort_reason = Some(why.clone());
                }
                ch.push((
                    EventKind::MigrationProgressed,
                    subject,
                    format!("migration {mid}: {why}; node {source} is asked to stop sending"),
                ));
            }
        }
        Ok(())
    }

    /// Ends migration `id` in `phase` and drops the oldest finished ones beyond the bound.
    fn finish(&mut self, id: MigrationId, phase: MigrationPhase, reason: String, now: u64) {
        let Some(m) = self.migrations.get_mut(&id) else { return };
        m.phase = phase;
        m.ended_ms = Some(now);
        m.reason = reason;
        if m.total_ms.is_none() && phase == MigrationPhase::Completed {
            m.total_ms = Some(now.saturating_sub(m.started_ms));
        }
        let vm = m.vm.clone();
        self.active_migrations.remove(&vm);
        self.migration_stats.count(phase);
        let finished = self.migrations.len() - self.active_migrations.len();
        if finished > MAX_FINISHED_MIGRATIONS {
            let drop: Vec<MigrationId> = self
                .migrations
                .values()
                .filter(|m| !m.phase.is_active() && m.id != id)
                .take(finished - MAX_FINISHED_MIGRATIONS)
                .map(|m| m.id)
                .collect();
            for d in drop {
                self.migrations.remove(&d);
            }
        }
    }
}
