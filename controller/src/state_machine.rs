//! The replicated state machine: the cluster model plus the commands that
//! change it. Raft feeds it committed commands one at a time, in log order,
//! with the time the leader stamped on each; given the same commands every
//! controller reaches the same state, so nothing here reads a clock, a random
//! number or a hash map's iteration order.
//!
//! Every handler checks everything before changing anything, so a refused
//! command leaves the state exactly as it was (the revision included). Openraft
//! still counts the entry as applied; its last-applied log id is kept beside
//! this state, not in it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{invalid, precondition, CommandError};
use crate::model::names::validate_name;
use crate::model::storage::MAX_STATUS_MESSAGE;
use crate::model::{
    Event, EventKind, EventLog, EventQuery, ImageRemoval, Migration, MigrationId, MigrationReport, MigrationStats,
    Node, NodeId, NodeRegistration, NodeState, Observed, Power, StorageProfile, StorageState, StorageStatus,
    StorageSubject, Vm, VmPhase, VmSpec, Volume, Network, NetworkRequest,
};
use crate::scheduler::{check_node, NodeView, VmRequirements};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An agent announces its host; registering again refreshes address, capacity and labels.
    RegisterNode(NodeRegistration),
    /// The failure detector's and fencing's transitions (see [`NodeState::may_become`]).
    SetNodeState {
        id: NodeId,
        state: NodeState,
        reason: String,
    },
    CordonNode {
        id: NodeId,
    },
    UncordonNode {
        id: NodeId,
    },
    /// Forget a node that has no VMs assigned.
    RemoveNode {
        id: NodeId,
    },
    CreateProfile(StorageProfile),
    DeleteProfile {
        name: String,
    },
    CreateVolume(Volume),
    /// Volumes only grow: shrinking would cut off a guest's file system.
    ResizeVolume {
        name: String,
        size_bytes: u64,
    },
    DeleteVolume {
        name: String,
    },
    CreateVm {
        name: String,
        spec: VmSpec,
        desired_power: Power,
    },
    /// Replace the spec if the VM is still at `expected_generation`
    /// (`None`: whatever the generation, a blind write).
    UpdateVmSpec {
        name: String,
        expected_generation: Option<u64>,
        spec: VmSpec,
    },
    /// `expected_generation: None` sets the power whatever the generation.
    SetVmPower {
        name: String,
        power: Power,
        expected_generation: Option<u64>,
    },
    DeleteVm {
        name: String,
        delete_disks: bool,
    },
    AssignVm {
        name: String,
        node: NodeId,
    },
    UnassignVm {
        name: String,
        reason: String,
    },
    ReportVmStatus {
        name: String,
        node: NodeId,
        phase: VmPhase,
        message: String,
    },
    /// The reconciler could not place a VM; recorded so users can see why.
    RecordUnschedulable {
        name: String,
        reason: String,
    },
    /// The storage reconciler's outcome for a volume or profile, computed for
    /// the record at `spec_revision` (see [`StorageStatus::spec_revision`]):
    /// refused if the record changed since.
    SetStorageStatus {
        subject: StorageSubject,
        spec_revision: u64,
        state: StorageState,
        message: String,
    },
    /// A deleted volume's image is gone from Ceph: forget the pending removal.
    ImageRemoved {
        pool: String,
        image: String,
    },
    /// Removing a deleted volume's image failed; it stays pending, with why.
    ImageRemovalFailed {
        pool: String,
        image: String,
        message: String,
    },
    /// Live-migrate a running VM to `target` (chosen by the caller's
    /// scheduler pass when the user named none; checked again here).
    StartMigration {
        vm: String,
        target: NodeId,
        downtime_ms: u32,
        bandwidth_mib_s: u32,
    },
    /// An agent's word on its half of migration `id`; `node: None` is the
    /// leader's deadline (only before the receiver listens).
    ReportMigration {
        vm: String,
        id: MigrationId,
        node: Option<NodeId>,
        report: MigrationReport,
    },
    CreateNetwork(NetworkRequest),
    DeleteNetwork {
        name: String,
    },
    CancelMigration {
        vm: String,
    },
}

impl Command {
    /// The VM whose assignment, spec or power this command may change: its
    /// node's agent must hear about it. Status reports come from the agent
    /// itself, so they are not echoed back.
    fn assignment_vm(&self) -> Option<&str> {
        match self {
            Command::CreateVm { name, .. }
            | Command::UpdateVmSpec { name, .. }
            | Command::SetVmPower { name, .. }
            | Command::DeleteVm { name, .. }
            | Command::AssignVm { name, .. }
            | Command::UnassignVm { name, .. } => Some(name),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The revision this command produced.
    pub revision: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// The VM's generation after the change, for the next compare-and-set.
    VmGeneration(u64),
    /// The VM is gone, and with it these volumes.
    VmDeleted {
        deleted_volumes: Vec<String>,
    },
    /// The migration started (its id).
    Migration(MigrationId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Snapshot")]
pub struct ClusterState {
    revision: u64,
    nodes: BTreeMap<NodeId, Node>,
    vms: BTreeMap<String, Vm>,
    volumes: BTreeMap<String, Volume>,
    profiles: BTreeMap<String, StorageProfile>,
    events: EventLog,
    /// Revision of the last change to the set of VMs assigned to each node
    /// (or to one of their specs or power states): what an agent's watch
    /// resumes from.
    #[serde(default)]
    node_revisions: BTreeMap<NodeId, u64>,
    /// What Ceph holds for each volume and profile (missing: Pending at
    /// revision 0, as for records from before statuses existed).
    #[serde(default)]
    volume_status: BTreeMap<String, StorageStatus>,
    #[serde(default)]
    profile_status: BTreeMap<String, StorageStatus>,
    /// Images of deleted volumes still to be removed, oldest first.
    #[serde(default)]
    image_removals: Vec<ImageRemoval>,
    /// Every migration still running, and the last finished ones.
    #[serde(default)]
    migrations: BTreeMap<MigrationId, Migration>,
    #[serde(default)]
    migration_stats: MigrationStats,
    #[serde(default)]
    networks: BTreeMap<String, Network>,
    /// How many MACs were ever handed out: the next one's number.
    #[serde(default)]
    macs_issued: u32,
    /// Names of the VMs placed on each node: derived from `vms`, so it is not
    /// in snapshots, but it keeps `AssignVm` from scanning every VM.
    #[serde(skip)]
    by_node: BTreeMap<NodeId, BTreeSet<String>>,
    /// The running migration of each VM that has one (derived from `migrations`).
    #[serde(skip)]
    active_migrations: BTreeMap<String, MigrationId>,
    /// Every address handed out, by network: which VM and NIC has it
    /// (derived from the VMs' `nics`).
    #[serde(skip)]
    leases: BTreeMap<String, BTreeMap<std::net::Ipv4Addr, (String, usize)>>,
}

/// What a snapshot holds; the derived index is rebuilt from it.
#[derive(Deserialize)]
struct Snapshot {
    revision: u64,
    nodes: BTreeMap<NodeId, Node>,
    vms: BTreeMap<String, Vm>,
    volumes: BTreeMap<String, Volume>,
    profiles: BTreeMap<String, StorageProfile>,
    events: EventLog,
    #[serde(default)]
    node_revisions: BTreeMap<NodeId, u64>,
    // Snapshot format 2; format 1 snapshots have none of these.
    #[serde(default)]
    volume_status: BTreeMap<String, StorageStatus>,
    #[serde(default)]
    profile_status: BTreeMap<String, StorageStatus>,
    #[serde(default)]
    image_removals: Vec<ImageRemoval>,
    // Format 3.
    #[serde(default)]
    migrations: BTreeMap<MigrationId, Migration>,
    #[serde(default)]
    migration_stats: MigrationStats,
    // Format 4.
    #[serde(default)]
    networks: BTreeMap<String, Network>,
    #[serde(default)]
    macs_issued: u32,
}

impl From<Snapshot> for ClusterState {
    fn from(s: Snapshot) -> Self {
        let mut by_node: BTreeMap<NodeId, BTreeSet<String>> = BTreeMap::new();
        for vm in s.vms.values() {
            if let Some(p) = &vm.placement {
                by_node.entry(p.clone()).or_default().insert(vm.name.clone());
            }
        }
        let leases = leases_of(&s.vms);
        ClusterState {
            revision: s.revision,
            nodes: s.nodes,
            vms: s.vms,
            volumes: s.volumes,
            profiles: s.profiles,
            events: s.events,
            node_revisions: s.node_revisions,
            volume_status: s.volume_status,
            profile_status: s.profile_status,
            image_removals: s.image_removals,
            active_migrations: s
                .migrations
                .values()
                .filter(|m| m.phase.is_active())
                .map(|m| (m.vm.clone(), m.id))
                .collect(),
            leases,
            migrations: s.migrations,
            migration_stats: s.migration_stats,
            networks: s.networks,
            macs_issued: s.macs_issued,
            by_node,
        }
    }
}

fn leases_of(vms: &BTreeMap<String, Vm>) -> BTreeMap<String, BTreeMap<std::net::Ipv4Addr, (String, usize)>> {
    let mut l: BTreeMap<String, BTreeMap<_, _>> = BTreeMap::new();
    for vm in vms.values() {
        for (i, n) in vm.nics.iter().enumerate() {
            l.entry(n.network.clone()).or_default().insert(n.ip, (vm.name.clone(), i));
        }
    }
    l
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState::new()
    }
}

/// Events a handler wants recorded once it has succeeded.
type Changes = Vec<(EventKind, String, String)>;

fn not_found(what: &str, name: &str) -> CommandError {
    CommandError::NotFound(format!("{what} {name} does not exist"))
}

fn list3(names: &[&str]) -> String {
    let mut s = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 3 {
        s.push_str(&format!(" and {} more", names.len() - 3));
    }
    s
}

impl ClusterState {
    pub fn new() -> Self {
        ClusterState::with_event_capacity(crate::model::events::DEFAULT_EVENT_CAPACITY)
    }

    pub fn with_event_capacity(capacity: usize) -> Self {
        ClusterState {
            revision: 0,
            nodes: BTreeMap::new(),
            vms: BTreeMap::new(),
            volumes: BTreeMap::new(),
            profiles: BTreeMap::new(),
            events: EventLog::with_capacity(capacity),
            node_revisions: BTreeMap::new(),
            volume_status: BTreeMap::new(),
            profile_status: BTreeMap::new(),
            image_removals: Vec::new(),
            migrations: BTreeMap::new(),
            migration_stats: MigrationStats::default(),
            networks: BTreeMap::new(),
            macs_issued: 0,
            leases: BTreeMap::new(),
            by_node: BTreeMap::new(),
            active_migrations: BTreeMap::new(),
        }
    }

    // ---- reads ----

    pub fn revision(&self) -> u64 {
        self.revision
    }
    /// Revision of the last change to what node `id` must run (0: none yet).
    pub fn node_revision(&self, id: &str) -> u64 {
        self.node_revisions.get(id).copied().unwrap_or(0)
    }
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.get(name)
    }
    pub fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }
    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.get(name)
    }
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }
    pub fn profile(&self, name: &str) -> Option<&StorageProfile> {
        self.profiles.get(name)
    }
    pub fn profiles(&self) -> impl Iterator<Item = &StorageProfile> {
        self.profiles.values()
    }
    /// What Ceph holds for volume `name` (Pending if nothing was recorded).
    pub fn volume_status(&self, name: &str) -> StorageStatus {
        self.volume_status.get(name).cloned().unwrap_or_default()
    }
    pub fn profile_status(&self, name: &str) -> StorageStatus {
        self.profile_status.get(name).cloned().unwrap_or_default()
    }
    /// Images of deleted volumes not yet removed from Ceph, oldest first.
    pub fn image_removals(&self) -> &[ImageRemoval] {
        &self.image_removals
    }
    pub fn events(&self) -> &EventLog {
        &self.events
    }
    pub fn query_events(&self, q: &EventQuery) -> Vec<&Event> {
        self.events.query(q)
    }

    /// VMs on a node, in name order: what the node's agent must run.
    pub fn vms_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.by_node.get(node).into_iter().flatten().filter_map(|name| self.vms.get(name))
    }

    /// VMs that should run but have no node, in the order the scheduler takes them.
    pub fn pending_vms(&self) -> Vec<&Vm> {
        let mut v: Vec<&Vm> =
            self.vms.values().filter(|v| v.desired_power == Power::Running && v.placement.is_none()).collect();
        v.sort_by(|a, b| a.created_revision.cmp(&b.created_revision).then_with(|| a.name.cmp(&b.name)));
        v
    }

    /// Every node with what its assigned VMs use, in id order. A VM
    /// migrating counts on both nodes until it has left one of them.
    pub fn node_views(&self) -> Vec<NodeView> {
        let mut views: BTreeMap<&str, NodeView> = self.nodes.values().map(|n| (n.id.as_str(), view(n))).collect();
        for vm in self.vms.values() {
            if let Some(v) = vm.placement.as_deref().and_then(|p| views.get_mut(p)) {
                v.add(&VmRequirements::of(vm));
            }
        }
        for m in self.active_migrations.values().filter_map(|id| self.migrations.get(id)) {
            if let (Some(v), Some(vm)) = (views.get_mut(m.target.as_str()), self.vms.get(&m.vm)) {
                v.add(&VmRequirements::of(vm));
            }
        }
        views.into_values().collect()
    }

    /// One node's view, leaving out VM `except` (a VM whose spec is being replaced).
    fn node_view(&self, node: &Node, except: Option<&str>) -> NodeView {
        let mut v = view(node);
        for vm in self.vms_on(&node.id).chain(self.incoming_to(&node.id)).filter(|vm| Some(vm.name.as_str()) != except)
        {
            v.add(&VmRequirements::of(vm));
        }
        v
    }

    /// VMs migrating to `node` (placed elsewhere until they arrive).
    pub fn incoming_to<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.active_migrations
            .values()
            .filter_map(|id| self.migrations.get(id))
            .filter(move |m| m.target == node)
            .filter_map(|m| self.vms.get(&m.vm))
    }

    pub fn migration(&self, id: MigrationId) -> Option<&Migration> {
        self.migrations.get(&id)
    }
    /// Oldest first.
    pub fn migrations(&self) -> impl DoubleEndedIterator<Item = &Migration> {
        self.migrations.values()
    }
    /// The VM's running migration, if it has one.
    pub fn active_migration(&self, vm: &str) -> Option<&Migration> {
        self.active_migrations.get(vm).and_then(|id| self.migrations.get(id))
    }
    pub fn migration_stats(&self) -> &MigrationStats {
        &self.migration_stats
    }

    // ---- apply ----

    /// Apply one committed command. On `Err` nothing changed.
    pub fn apply(&mut self, cmd: Command, now_ms: u64) -> Result<Response, CommandError> {
        let revision = self.revision + 1;
        let assignment_vm = cmd.assignment_vm().map(str::to_string);
        let placed_before = assignment_vm.as_deref().and_then(|n| self.vms.get(n)).and_then(|v| v.placement.clone());
        // The nodes on a VM's networks before the command: a VM with NICs
        // that leaves a node (or the cluster) changes their VXLAN peers.
        let migrating_vm = match &cmd {
            Command::ReportMigration { vm, .. } | Command::StartMigration { vm, .. } | Command::CancelMigration { vm } => {
                Some(vm.clone())
            }
            _ => None,
        };
        let neighbours_before: Vec<NodeId> = assignment_vm
            .iter()
            .chain(&migrating_vm)
            .flat_map(|vm| self.network_neighbours(vm))
            .collect();
        let mut changes = Changes::new();
        // Nodes whose agents must hear of a migration's change.
        let mut touched: Vec<NodeId> = Vec::new();
        let outcome = match cmd {
            Command::RegisterNode(reg) => self.register_node(reg, &mut changes)?,
            Command::SetNodeState { id, state, reason } => {
                self.set_node_state(&id, state, &reason, revision, now_ms, &mut changes, &mut touched)?
            }
            Command::CordonNode { id } => {
                self.set_node_state(&id, NodeState::Cordoned, "cordoned", revision, now_ms, &mut changes, &mut touched)?
            }
            Command::UncordonNode { id } => {
                match self.nodes.get(&id).map(|n| n.state) {
                    Some(NodeState::Cordoned) | None => {}
                    Some(s) => {
                        return Err(precondition(format!(
                            "node {id} is {s}, not Cordoned; only a cordoned node can be uncordoned"
                        )))
                    }
                }
                self.set_node_state(&id, NodeState::Ready, "uncordoned", revision, now_ms, &mut changes, &mut touched)?
            }
            Command::RemoveNode { id } => self.remove_node(&id, &mut changes)?,
            Command::CreateProfile(p) => self.create_profile(p, revision, &mut changes)?,
            Command::DeleteProfile { name } => self.delete_profile(&name, &mut changes)?,
            Command::CreateVolume(v) => self.create_volume(v, revision, &mut changes)?,
            Command::ResizeVolume { name, size_bytes } => {
                self.resize_volume(&name, size_bytes, revision, &mut changes)?
            }
            Command::DeleteVolume { name } => self.delete_volume(&name, revision, &mut changes)?,
            Command::CreateVm { name, spec, desired_power } => {
                self.create_vm(name, spec, desired_power, revision, &mut changes)?
            }
            Command::UpdateVmSpec { name, expected_generation, spec } => {
                self.update_vm_spec(&name, expected_generation, spec, revision, &mut changes)?
            }
            Command::SetVmPower { name, power, expected_generation } => {
                self.set_vm_power(&name, power, expected_generation, revision, &mut changes)?
            }
            Command::DeleteVm { name, delete_disks } => self.delete_vm(&name, delete_disks, revision, &mut changes)?,
            Command::AssignVm { name, node } => self.assign_vm(&name, &node, revision, now_ms, &mut changes)?,
            Command::UnassignVm { name, reason } => self.unassign_vm(&name, &reason, revision, now_ms, &mut changes)?,
            Command::ReportVmStatus { name, node, phase, message } => {
                self.report_vm_status(&name, &node, phase, message, revision, now_ms, &mut changes)?
            }
            Command::RecordUnschedulable { name, reason } => {
                if !self.vms.contains_key(&name) {
                    return Err(not_found("vm", &name));
                }
                changes.push((EventKind::VmUnschedulable, format!("vm/{name}"), reason));
                Outcome::Done
            }
            Command::SetStorageStatus { subject, spec_revision, state, message } => {
                self.set_storage_status(subject, spec_revision, state, message, &mut changes)?
            }
            Command::ImageRemoved { pool, image } => {
                let i = self.removal_index(&pool, &image)?;
                let r = self.image_removals.remove(i);
                changes.push((
                    EventKind::ImageRemoved,
                    format!("volume/{}", r.volume),
                    format!("image {pool}/{image} removed"),
                ));
                Outcome::Done
            }
            Command::ImageRemovalFailed { pool, image, message } => {
                check_message(&message)?;
                let i = self.removal_index(&pool, &image)?;
                let r = &mut self.image_removals[i];
                r.last_error = message.clone();
                let subject = format!("volume/{}", r.volume);
                changes.push((
                    EventKind::ImageRemovalFailed,
                    subject,
                    format!("removing image {pool}/{image}: {message}"),
                ));
                Outcome::Done
            }
            Command::StartMigration { vm, target, downtime_ms, bandwidth_mib_s } => self.start_migration(
                &vm,
                &target,
                (downtime_ms, bandwidth_mib_s),
                revision,
                now_ms,
                &mut changes,
                &mut touched,
            )?,
            Command::ReportMigration { vm, id, node, report } => {
                self.report_migration(&vm, id, node.as_deref(), report, revision, now_ms, &mut changes, &mut touched)?
            }
            Command::CancelMigration { vm } => {
                self.cancel_migration(&vm, revision, now_ms, &mut changes, &mut touched)?
            }
            Command::CreateNetwork(req) => self.create_network(&req, revision, &mut changes)?,
            Command::DeleteNetwork { name } => self.delete_network(&name, &mut changes)?,
        };
        self.revision = revision;
        let placed_after = assignment_vm.as_deref().and_then(|n| self.vms.get(n)).and_then(|v| v.placement.clone());
        let neighbours: Vec<NodeId> = if placed_before != placed_after || migrating_vm.is_some() {
            let after: Vec<NodeId> =
                assignment_vm.iter().chain(&migrating_vm).flat_map(|vm| self.network_neighbours(vm)).collect();
            neighbours_before.into_iter().chain(after).collect()
        } else {
            Vec::new()
        };
        for node in placed_before.into_iter().chain(placed_after).chain(touched).chain(neighbours) {
            self.node_revisions.insert(node, revision);
        }
        for (kind, subject, message) in changes {
            self.events.push(Event { revision, time_ms: now_ms, kind, subject, message });
        }
        Ok(Response { revision, outcome })
    }

    fn register_node(&mut self, reg: NodeRegistration, ch: &mut Changes) -> Result<Outcome, CommandError> {
        reg.validate()?;
        let subject = format!("node/{}", reg.id);
        let c = reg.capacity;
        match self.nodes.get_mut(&reg.id) {
            Some(n) if n.state == NodeState::Fenced => {
                return Err(precondition(format!(
                    "node {} is Fenced; an operator must set it Cordoned (after cleaning up the host) before it can register again",
                    reg.id
                )))
            }
            Some(n) => {
                n.address = reg.address;
                n.arch = reg.arch;
                n.capacity = reg.capacity;
                n.labels = reg.labels;
                n.cpu_features = reg.cpu_features;
                n.nics = reg.nics;
                n.nic_profile = reg.nic_profile;
                let msg = format!("re-registered at {} with {} vCPUs, {} MiB; state {}", n.address, c.vcpus, c.memory_mib, n.state);
                ch.push((EventKind::NodeUpdated, subject, msg));
            }
            None => {
                let msg = format!("registered at {} with {} vCPUs, {} MiB", reg.address, c.vcpus, c.memory_mib);
                let node = Node {
                    id: reg.id.clone(),
                    address: reg.address,
                    arch: reg.arch,
                    capacity: reg.capacity,
                    labels: reg.labels,
                    state: NodeState::Ready,
                    cpu_features: reg.cpu_features,
                    nics: reg.nics,
                    nic_profile: reg.nic_profile,
                };
                self.nodes.insert(reg.id, node);
                ch.push((EventKind::NodeRegistered, subject, msg));
            }
        }
        Ok(Outcome::Done)
    }

    #[allow(clippy::too_many_arguments)]
    fn set_node_state(
        &mut self,
        id: &str,
        to: NodeState,
        reason: &str,
        rev: u64,
        now: u64,
        ch: &mut Changes,
        touched: &mut Vec<NodeId>,
    ) -> Result<Outcome, CommandError> {
        let node = self.nodes.get_mut(id).ok_or_else(|| not_found("node", id))?;
        let from = node.state;
        if from == to {
            return Err(precondition(format!("node {id} is already {to}")));
        }
        if !from.may_become(to) {
            let hint = match to {
                NodeState::Fenced => " (a node is fenced only after it has been marked Unreachable)",
                NodeState::Ready if from == NodeState::Fenced => " (bring a fenced node back as Cordoned first)",
                _ => "",
            };
            return Err(precondition(format!("node {id} cannot go from {from} to {to}{hint}")));
        }
        node.state = to;
        let msg = if reason.is_empty() { format!("{from} -> {to}") } else { format!("{from} -> {to}: {reason}") };
        ch.push((EventKind::NodeStateChanged, format!("node/{id}"), msg));
        if matches!(to, NodeState::Unreachable | NodeState::Fenced) {
            self.migrations_meet_node_state(id, to, rev, now, ch, touched)?;
        }
        if to == NodeState::Fenced {
            self.evacuate_fenced(id, rev, now, ch)?;
        }
        Ok(Outcome::Done)
    }

    /// A fenced node's VMs: the HA ones leave it (unassigned, so the
    /// scheduler places them elsewhere; their disks can no longer be
    /// written from the fenced host), the others stay placed there, Failed,
    /// until the node comes back or an operator deletes or moves them.
    fn evacuate_fenced(&mut self, id: &str, rev: u64, now: u64, ch: &mut Changes) -> Result<(), CommandError> {
        // A VM still being sent away waits for the target's word: it may
        // already run there (see `migrations_meet_node_state`).
        let on: Vec<(String, bool)> = self
            .vms_on(id)
            .filter(|v| !self.active_migrations.contains_key(&v.name))
            .map(|v| (v.name.clone(), v.spec.ha))
            .collect();
        self.evacuate_vms(id, on, rev, now, ch)
    }

    /// The fenced-node policy for `vms` on node `id`: HA ones leave, the
    /// others stay there, Failed.
    fn evacuate_vms(
        &mut self,
        id: &str,
        on: Vec<(String, bool)>,
        rev: u64,
        now: u64,
        ch: &mut Changes,
    ) -> Result<(), CommandError> {
        for (name, ha) in on {
            if ha {
                self.unassign_vm(&name, &format!("node {id} fenced; HA restarts it elsewhere"), rev, now, ch)?;
            } else if let Some(vm) = self.vms.get_mut(&name) {
                let message =
                    format!("node {id} fenced; not HA, so it stays there until the node is back or it is deleted");
                vm.observed = Observed {
                    phase: VmPhase::Failed,
                    node: Some(id.to_string()),
                    message: message.clone(),
                    at_ms: now,
                };
                vm.updated_revision = rev;
                ch.push((EventKind::VmStatusChanged, format!("vm/{name}"), message));
            }
        }
        Ok(())
    }

    fn remove_node(&mut self, id: &str, ch: &mut Changes) -> Result<Outcome, CommandError> {
        if !self.nodes.contains_key(id) {
            return Err(not_found("node", id));
        }
        let on: Vec<&str> = self.vms_on(id).chain(self.incoming_to(id)).map(|v| v.name.as_str()).collect();
        if !on.is_empty() {
            return Err(precondition(format!(
                "node {id} still has {} VMs assigned or migrating to it: {}",
                on.len(),
                list3(&on)
            )));
        }
        self.nodes.remove(id);
        ch.push((EventKind::NodeRemoved, format!("node/{id}"), "removed".into()));
        Ok(Outcome::Done)
    }

    fn create_profile(&mut self, p: StorageProfile, rev: u64, ch: &mut Changes) -> Result<Outcome, CommandError> {
        p.validate()?;
        if self.profiles.contains_key(&p.name) {
            return Err(CommandError::AlreadyExists(format!("storage profile {} already exists", p.name)));
        }
        // Ceph has one value per OSD option for all OSDs (the storage crate
        // sets them for `osd`), so two profiles must not disagree on one.
        for (k, v) in &p.osd_tunables {
            if let Some(other) = self.profiles.values().find(|o| o.osd_tunables.get(k).is_some_and(|w| w != v)) {
                return Err(precondition(format!(
                    "storage profile {}: OSD tunable {k}={v} conflicts with storage profile {}, which sets {k}={}; OSD tunables apply to every OSD, so profiles must agree on them",
                    p.name, other.name, other.osd_tunables[k]
                )));
            }
        }
        let msg = match &p.kind {
            crate::model::ProfileKind::Replicated { size, min_size } => {
                format!("replicated size {size} min_size {min_size}")
            }
            crate::model::ProfileKind::ErasureCoded { k, m, plugin, .. } => {
                format!("erasure-coded k={k} m={m} {plugin}")
            }
        };
        ch.push((EventKind::ProfileCreated, format!("profile/{}", p.name), msg));
        self.profile_status.insert(p.name.clone(), StorageStatus::pending(rev, false));
        self.profiles.insert(p.name.clone(), p);
        Ok(Outcome::Done)
    }

    fn delete_profile(&mut self, name: &str, ch: &mut Changes) -> Result<Outcome, CommandError> {
        if !self.profiles.contains_key(name) {
            return Err(not_found("storage profile", name));
        }
        let users: Vec<&str> = self.volumes.values().filter(|v| v.profile == name).map(|v| v.name.as_str()).collect();
        if !users.is_empty() {
            return Err(precondition(format!(
                "storage profile {name} is used by {} volumes: {}",
                users.len(),
                list3(&users)
            )));
        }
        self.profiles.remove(name);
        self.profile_status.remove(name);
        ch.push((EventKind::ProfileDeleted, format!("profile/{name}"), "deleted".into()));
        Ok(Outcome::Done)
    }

    fn create_volume(&mut self, v: Volume, rev: u64, ch: &mut Changes) -> Result<Outcome, CommandError> {
        v.validate()?;
        if self.volumes.contains_key(&v.name) {
            return Err(CommandError::AlreadyExists(format!("volume {} already exists", v.name)));
        }
        let profile = self.profiles.get(&v.profile).ok_or_else(|| not_found("storage profile", &v.profile))?;
        for spec in profile.pools(&v.pool) {
            spec.validate().map_err(|e| invalid(format!("volume {}: {e}", v.name)))?;
        }
        if let Some(other) = self.volumes.values().find(|o| o.pool == v.pool && o.image == v.image) {
            return Err(CommandError::AlreadyExists(format!(
                "image {}/{} already belongs to volume {}",
                v.pool, v.image, other.name
            )));
        }
        // The image of a deleted volume that was Ready holds that volume's
        // data until it is removed: its name is taken until then. One never
        // made Ready (no `[ceph]` anywhere, or deleted before it was) is
        // simply taken over, as a record only cluster always allowed.
        let pending = self.image_removals.iter().position(|r| r.pool == v.pool && r.image == v.image);
        if let Some(r) = pending.map(|i| &self.image_removals[i]).filter(|r| r.was_ready) {
            return Err(precondition(format!(
                "image {}/{} of deleted volume {} is still being removed from Ceph; retry once it is gone",
                v.pool, v.image, r.volume
            )));
        }
        // A pool holds the volumes of one profile, and no pool is both a
        // volume's pool and an erasure-coded profile's data pool.
        let data_pool = profile.data_pool(&v.pool);
        for o in self.volumes.values() {
            if o.pool == v.pool && o.profile != v.profile {
                return Err(precondition(format!(
                    "volume {}: pool {} holds volumes of storage profile {} (volume {}); a pool belongs to one profile",
                    v.name, v.pool, o.profile, o.name
                )));
            }
            let other_data = self.profiles.get(&o.profile).and_then(|p| p.data_pool(&o.pool));
            if other_data.as_deref() == Some(v.pool.as_str()) || data_pool.as_deref() == Some(o.pool.as_str()) {
                let (data, of) = if other_data.as_deref() == Some(v.pool.as_str()) {
                    (v.pool.as_str(), o.pool.as_str())
                } else {
                    (o.pool.as_str(), v.pool.as_str())
                };
                return Err(precondition(format!(
                    "volume {}: pool {data} is the erasure-coded data pool of pool {of} (volume {}), so it cannot also hold volumes",
                    v.name, o.name
                )));
            }
        }
        let new_pool = !self.volumes.values().any(|o| o.pool == v.pool);
        let mut msg = format!("{}/{} {} bytes, profile {}", v.pool, v.image, v.size_bytes, v.profile);
        if let Some(i) = pending {
            let r = self.image_removals.remove(i);
            msg.push_str(&format!("; takes over the image of deleted volume {} (its removal is cancelled)", r.volume));
        }
        ch.push((EventKind::VolumeCreated, format!("volume/{}", v.name), msg));
        if new_pool {
            // The profile now needs one more pool in Ceph.
            let was_ready = self.profile_status.get(&v.profile).is_some_and(|s| s.was_ready);
            self.profile_status.insert(v.profile.clone(), StorageStatus::pending(rev, was_ready));
        }
        self.volume_status.insert(v.name.clone(), StorageStatus::pending(rev, false));
        self.volumes.insert(v.name.clone(), v);
        Ok(Outcome::Done)
    }

    fn resize_volume(&mut self, name: &str, size: u64, rev: u64, ch: &mut Changes) -> Result<Outcome, CommandError> {
        let vol = self.volumes.get(name).ok_or_else(|| not_found("volume", name))?;
        let mut resized = vol.clone();
        resized.size_bytes = size;
        resized.validate()?;
        if size < vol.size_bytes {
            return Err(invalid(format!(
                "volume {name}: {size} bytes is smaller than its {} bytes; volumes only grow",
                vol.size_bytes
            )));
        }
        let msg = format!("{} -> {size} bytes", vol.size_bytes);
        if size != vol.size_bytes {
            let was_ready = self.volume_status.get(name).is_some_and(|s| s.was_ready);
            self.volume_status.insert(name.to_string(), StorageStatus::pending(rev, was_ready));
        }
        self.volumes.insert(name.to_string(), resized);
        ch.push((EventKind::VolumeResized, format!("volume/{name}"), msg));
        Ok(Outcome::Done)
    }

    /// VMs other than `except` using `volume`, with whether each writes to it.
    fn volume_users<'a>(
        &'a self,
        volume: &'a str,
        except: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a str, bool)> + 'a {
        self.vms.values().filter(move |vm| Some(vm.name.as_str()) != except).flat_map(move |vm| {
            vm.spec.attachments().filter(move |(v, _)| *v == volume).map(move |(_, w)| (vm.name.as_str(), w))
        })
    }

    fn delete_volume(&mut self, name: &str, rev: u64, ch: &mut Changes) -> Result<Outcome, CommandError> {
        if !self.volumes.contains_key(name) {
            return Err(not_found("volume", name));
        }
        let users: Vec<&str> = self.volume_users(name, None).map(|(vm, _)| vm).collect();
        if !users.is_empty() {
            return Err(precondition(format!(
                "volume {name} is attached to vm {}; delete or change the vm first",
                list3(&users)
            )));
        }
        self.forget_volume(name, rev);
        ch.push((EventKind::VolumeDeleted, format!("volume/{name}"), "deleted".into()));
        Ok(Outcome::Done)
    }

    /// A spec's volumes exist, and none is written by two VMs: RBD's exclusive
    /// lock would let only one of them run, so refuse it up front.
    fn check_attachments(&self, vm: &str, spec: &VmSpec) -> Result<(), CommandError> {
        for (volume, writes) in spec.attachments() {
            if !self.volumes.contains_key(volume) {
                return Err(CommandError::NotFound(format!("vm {vm}: volume {volume} does not exist")));
            }
            if let Some((other, other_writes)) = self.volume_users(volume, Some(vm)).find(|(_, w)| writes || *w) {
                let how = if other_writes { "read-write" } else { "read-only" };
                return Err(precondition(format!(
                    "vm {vm}: volume {volume} is attached {how} to vm {other}; a volume shared by VMs must be read-only in all of them"
                )));
            }
        }
        Ok(())
    }

    fn create_vm(
        &mut self,
        name: String,
        spec: VmSpec,
        power: Power,
        rev: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        validate_name("vm", &name)?;
        spec.validate(&name)?;
        if self.vms.contains_key(&name) {
            return Err(CommandError::AlreadyExists(format!("vm {name} already exists")));
        }
        self.check_attachments(&name, &spec)?;
        let nics = self.allocate_nics(&name, &spec.nics)?;
        let msg = format!("{} vCPUs, {} MiB, desired {:?}", spec.vcpus, spec.memory_mib, power);
        let vm = Vm {
            name: name.clone(),
            spec,
            desired_power: power,
            placement: None,
            observed: Observed::default(),
            generation: 1,
            created_revision: rev,
            updated_revision: rev,
            nics: Vec::new(),
        };
        self.vms.insert(name.clone(), vm);
        self.give_nics(&name, nics, ch);
        ch.push((EventKind::VmCreated, format!("vm/{name}"), msg));
        Ok(Outcome::VmGeneration(1))
    }

    fn vm_at(&self, name: &str, expected: Option<u64>) -> Result<&Vm, CommandError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
        match expected {
            Some(g) if g != vm.generation => Err(precondition(format!(
                "vm {name} is at generation {}, not {g}: it changed since it was read; read it again and retry",
                vm.generation
            ))),
            _ => Ok(vm),
        }
    }

    fn update_vm_spec(
        &mut self,
        name: &str,
        expected: Option<u64>,
        spec: VmSpec,
        rev: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        let vm = self.vm_at(name, expected)?;
        self.not_migrating(name)?;
        spec.validate(name)?;
        if spec.nics != vm.spec.nics {
            return Err(precondition(format!(
                "vm {name}: its NICs are set when it is created and cannot be changed yet; create a new vm for other networks"
            )));
        }
        self.check_attachments(name, &spec)?;
        // A placed VM keeps its node, so the new spec must still fit there.
        if let Some(node_id) = &vm.placement {
            if let Some(node) = self.nodes.get(node_id) {
                let mut req = VmRequirements::of(vm);
                req.vcpus = spec.vcpus;
                req.memory_mib = spec.memory_mib;
                req.required_labels = spec.required_labels.clone();
                req.anti_affinity_group = spec.anti_affinity_group.clone();
                let mut v = self.node_view(node, Some(name));
                // Its node's state is not the new spec's concern.
                v.state = NodeState::Ready;
                if let Err(r) = check_node(&req, &v) {
                    return Err(precondition(format!(
                        "vm {name} is assigned to node {node_id}, which cannot take the new spec: {r}; unassign it first"
                    )));
                }
            }
        }
        let vm = self.vms.get_mut(name).ok_or_else(|| not_found("vm", name))?;
        vm.spec = spec;
        vm.generation += 1;
        vm.updated_revision = rev;
        let g = vm.generation;
        ch.push((EventKind::VmSpecUpdated, format!("vm/{name}"), format!("spec replaced, generation {g}")));
        Ok(Outcome::VmGeneration(g))
    }

    fn set_vm_power(
        &mut self,
        name: &str,
        power: Power,
        expected: Option<u64>,
        rev: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        let vm = self.vm_at(name, expected)?;
        if vm.desired_power == power {
            // Asking again is not a conflict: the caller's intent already holds.
            return Ok(Outcome::VmGeneration(vm.generation));
        }
        self.not_migrating(name)?;
        let vm = self.vms.get_mut(name).ok_or_else(|| not_found("vm", name))?;
        vm.desired_power = power;
        vm.generation += 1;
        vm.updated_revision = rev;
        ch.push((EventKind::VmPowerChanged, format!("vm/{name}"), format!("desired power {power:?}")));
        Ok(Outcome::VmGeneration(vm.generation))
    }

    fn delete_vm(
        &mut self,
        name: &str,
        delete_disks: bool,
        rev: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
        self.not_migrating(name)?;
        let volumes: Vec<String> = vm.spec.volumes().map(String::from).collect();
        if delete_disks {
            if let Some(node) = &vm.placement {
                // Its disks are closed once the node reported the VM down
                // after the stop, or once the node is fenced out of Ceph.
                let reported_down = vm.desired_power == Power::Stopped
                    && matches!(vm.observed.phase, VmPhase::Stopped | VmPhase::Failed)
                    && vm.observed.node.as_deref() == Some(node.as_str());
                let fenced = self.nodes.get(node).is_some_and(|n| n.state == NodeState::Fenced);
                if !reported_down && !fenced {
                    return Err(precondition(format!(
                        "vm {name} may still have its disks open on node {node} (observed {} there); stop it and wait until it is Stopped before deleting its disks",
                        vm.observed.phase
                    )));
                }
            }
            for v in &volumes {
                if let Some((other, _)) = self.volume_users(v, Some(name)).next() {
                    return Err(precondition(format!(
                        "vm {name}: volume {v} is also attached to vm {other}, so it cannot be deleted with it"
                    )));
                }
            }
        }
        self.take_nics(name, ch);
        if let Some(node) = self.vms.remove(name).and_then(|vm| vm.placement) {
            self.unindex(&node, name);
        }
        ch.push((EventKind::VmDeleted, format!("vm/{name}"), "deleted".into()));
        let mut deleted = Vec::new();
        if delete_disks {
            for v in volumes {
                // A dangling reference cannot exist (DeleteVolume refuses attached volumes), but be safe.
                if self.forget_volume(&v, rev) {
                    ch.push((EventKind::VolumeDeleted, format!("volume/{v}"), format!("deleted with vm {name}")));
                    deleted.push(v);
                }
            }
        }
        Ok(Outcome::VmDeleted { deleted_volumes: deleted })
    }

    fn assign_vm(
        &mut self,
        name: &str,
        node_id: &str,
        rev: u64,
        now: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
        let node = self.nodes.get(node_id).ok_or_else(|| not_found("node", node_id))?;
        if let Some(p) = &vm.placement {
            return Err(precondition(format!("vm {name} is already assigned to node {p}; unassign it first")));
        }
        self.check_fits(vm, node)?;
        let vm = self.vms.get_mut(name).ok_or_else(|| not_found("vm", name))?;
        vm.placement = Some(node_id.to_string());
        self.by_node.entry(node_id.to_string()).or_default().insert(name.to_string());
        vm.observed = Observed { phase: VmPhase::Unknown, node: None, message: String::new(), at_ms: now };
        vm.updated_revision = rev;
        ch.push((EventKind::VmAssigned, format!("vm/{name}"), format!("assigned to node {node_id}")));
        Ok(Outcome::Done)
    }

    /// Whether `node` can take `vm` now (what it runs and what is migrating
    /// to it counted), or a refusal with the numbers.
    fn check_fits(&self, vm: &Vm, node: &Node) -> Result<(), CommandError> {
        let req = VmRequirements::of(vm);
        let view = self.node_view(node, None);
        check_node(&req, &view).map_err(|r| {
            let free = view.free();
            precondition(format!(
                "node {} cannot take vm {}: {r} (node {}, {} of {} vCPUs and {} of {} MiB free; vm needs {} vCPUs, {} MiB)",
                node.id, vm.name, node.state, free.vcpus, view.capacity.vcpus, free.memory_mib, view.capacity.memory_mib, req.vcpus, req.memory_mib
            ))
        })
    }

    fn unassign_vm(
        &mut self,
        name: &str,
        reason: &str,
        rev: u64,
        now: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
        let Some(node_id) = vm.placement.clone() else {
            return Err(precondition(format!("vm {name} is not assigned to any node")));
        };
        self.not_migrating(name)?;
        // The one rule that keeps a VM from running writable on two hosts: it
        // leaves a node only once it is known stopped there or the node is fenced.
        let fenced = self.nodes.get(&node_id).is_none_or(|n| n.state == NodeState::Fenced);
        let live = matches!(vm.observed.phase, VmPhase::Starting | VmPhase::Running | VmPhase::Paused);
        if live && !fenced {
            return Err(precondition(format!(
                "vm {name} is {} on node {node_id}; stop it first, or wait until the node is fenced",
                vm.observed.phase
            )));
        }
        let vm = self.vms.get_mut(name).ok_or_else(|| not_found("vm", name))?;
        vm.placement = None;
        vm.observed =
            Observed { phase: VmPhase::Unknown, node: None, message: format!("unassigned from {node_id}"), at_ms: now };
        vm.updated_revision = rev;
        let msg = if reason.is_empty() {
            format!("unassigned from node {node_id}")
        } else {
            format!("unassigned from node {node_id}: {reason}")
        };
        self.unindex(&node_id, name);
        ch.push((EventKind::VmUnassigned, format!("vm/{name}"), msg));
        Ok(Outcome::Done)
    }

    #[allow(clippy::too_many_arguments)]
    fn report_vm_status(
        &mut self,
        name: &str,
        node_id: &str,
        phase: VmPhase,
        message: String,
        rev: u64,
        now: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
        let node = self.nodes.get(node_id).ok_or_else(|| not_found("node", node_id))?;
        if node.state == NodeState::Fenced {
            return Err(precondition(format!("node {node_id} is Fenced; its reports are not accepted")));
        }
        // A late report from a VM's previous node must not overwrite the new one's.
        if vm.placement.as_deref() != Some(node_id) {
            let at = vm.placement.as_deref().map_or("no node".to_string(), |p| format!("node {p}"));
            return Err(precondition(format!("vm {name} is assigned to {at}, not node {node_id}")));
        }
        if message.len() > 1024 {
            return Err(invalid(format!("vm {name}: status message is {} bytes, at most 1024", message.len())));
        }
        let changed = vm.observed.phase != phase;
        let vm = self.vms.get_mut(name).ok_or_else(|| not_found("vm", name))?;
        let from = vm.observed.phase;
        vm.observed = Observed { phase, node: Some(node_id.to_string()), message, at_ms: now };
        vm.updated_revision = rev;
        // Repeated reports of the same phase would flood the bounded log.
        if changed {
            let mut msg = format!("{from} -> {phase} on node {node_id}");
            if !vm.observed.message.is_empty() {
                msg.push_str(&format!(": {}", vm.observed.message));
            }
            ch.push((EventKind::VmStatusChanged, format!("vm/{name}"), msg));
        }
        Ok(Outcome::Done)
    }

    /// Drops a volume and its status, and queues its image for removal from
    /// Ceph. Returns whether it existed.
    fn forget_volume(&mut self, name: &str, rev: u64) -> bool {
        let Some(v) = self.volumes.remove(name) else { return false };
        let was_ready = self.volume_status.remove(name).is_some_and(|s| s.was_ready);
        if !self.image_removals.iter().any(|r| r.pool == v.pool && r.image == v.image) {
            self.image_removals.push(ImageRemoval {
                pool: v.pool,
                image: v.image,
                volume: v.name,
                requested_revision: rev,
                was_ready,
                last_error: String::new(),
            });
        }
        true
    }

    fn removal_index(&self, pool: &str, image: &str) -> Result<usize, CommandError> {
        self.image_removals
            .iter()
            .position(|r| r.pool == pool && r.image == image)
            .ok_or_else(|| CommandError::NotFound(format!("no removal of image {pool}/{image} is pending")))
    }

    fn set_storage_status(
        &mut self,
        subject: StorageSubject,
        spec_revision: u64,
        state: StorageState,
        message: String,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        check_message(&message)?;
        let (map, name, kind) = match &subject {
            StorageSubject::Volume(n) => {
                if !self.volumes.contains_key(n) {
                    return Err(not_found("volume", n));
                }
                (&mut self.volume_status, n, EventKind::VolumeStateChanged)
            }
            StorageSubject::Profile(n) => {
                if !self.profiles.contains_key(n) {
                    return Err(not_found("storage profile", n));
                }
                (&mut self.profile_status, n, EventKind::ProfileStateChanged)
            }
        };
        let current = map.get(name).cloned().unwrap_or_default();
        if current.spec_revision != spec_revision {
            return Err(precondition(format!(
                "{subject} changed at revision {} after the outcome for revision {spec_revision} was computed",
                current.spec_revision
            )));
        }
        if current.state != state || (state == StorageState::Failed && current.message != message) {
            let msg = if message.is_empty() {
                format!("{} -> {state}", current.state)
            } else {
                format!("{} -> {state}: {message}", current.state)
            };
            ch.push((kind, subject.to_string(), msg));
        }
        let was_ready = current.was_ready || state == StorageState::Ready;
        map.insert(name.clone(), StorageStatus { state, message, spec_revision, was_ready });
        Ok(Outcome::Done)
    }

    fn unindex(&mut self, node: &str, vm: &str) {
        if let Some(set) = self.by_node.get_mut(node) {
            set.remove(vm);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// The state as a versioned snapshot (what Raft snapshots carry).
    pub fn snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&SnapshotOut { format: SNAPSHOT_FORMAT, state: self })
    }

    /// Reads a snapshot; one of another format version is refused rather than guessed at.
    pub fn restore(bytes: &[u8]) -> Result<ClusterState, serde_json::Error> {
        use serde::de::Error;
        let s: SnapshotIn = serde_json::from_slice(bytes)?;
        if !(OLDEST_SNAPSHOT_FORMAT..=SNAPSHOT_FORMAT).contains(&s.format) {
            return Err(serde_json::Error::custom(format!(
                "snapshot format {} is not supported (this controller reads {OLDEST_SNAPSHOT_FORMAT} to {SNAPSHOT_FORMAT})",
                s.format
            )));
        }
        Ok(s.state)
    }
}

/// Version of the snapshot format; bump when a field is added or changes
/// meaning, so an older controller refuses a snapshot it would misread.
/// 2 added storage statuses, pending image removals and their event kinds;
/// a format 1 snapshot reads as having none (every field has a default).
/// 3 added migrations and their counters (absent: none).
/// 4 added networks, the VMs' NICs and their addresses (absent: none).
pub const SNAPSHOT_FORMAT: u32 = 4;
/// The oldest format this controller still reads.
pub const OLDEST_SNAPSHOT_FORMAT: u32 = 1;

fn check_message(message: &str) -> Result<(), CommandError> {
    if message.len() > MAX_STATUS_MESSAGE {
        return Err(invalid(format!("status message is {} bytes, at most {MAX_STATUS_MESSAGE}", message.len())));
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct SnapshotOut<'a> {
    format: u32,
    state: &'a ClusterState,
}

#[derive(serde::Deserialize)]
struct SnapshotIn {
    format: u32,
    state: ClusterState,
}

fn view(n: &Node) -> NodeView {
    NodeView {
        id: n.id.clone(),
        state: n.state,
        capacity: n.capacity,
        used: Default::default(),
        labels: n.labels.clone(),
        anti_affinity_groups: Default::default(),
    }
}

mod migrations;
mod networks;
#[cfg(test)]
mod tests;
