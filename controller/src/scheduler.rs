//! Placement: which Ready node a VM goes to, or a count of why none fits.
//!
//! Pure functions over views of the nodes, so the leader's reconciler, the
//! state machine's `AssignVm` check and the tests all share one set of rules:
//! 1. the node is Ready (Cordoned, Unreachable and Fenced nodes take nothing new);
//! 2. it has every label the VM requires;
//! 3. no VM of the VM's anti-affinity group is on it;
//! 4. it has enough free vCPUs, then enough free memory.
//!
//! Among the nodes that fit, the one with the largest fraction of its memory
//! free wins (spread: failures and noisy neighbours hit fewer VMs), ties going
//! to the smallest node id so every controller computes the same answer.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::model::{Capacity, NodeId, NodeState, Vm};
use crate::state_machine::ClusterState;

/// What placement needs to know about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRequirements {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub required_labels: BTreeMap<String, String>,
    pub anti_affinity_group: Option<String>,
}

impl VmRequirements {
    pub fn of(vm: &Vm) -> Self {
        VmRequirements {
            name: vm.name.clone(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            required_labels: vm.spec.required_labels.clone(),
            anti_affinity_group: vm.spec.anti_affinity_group.clone(),
        }
    }
}

/// A node as placement sees it: what it has, what its assigned VMs use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: NodeId,
    pub state: NodeState,
    pub capacity: Capacity,
    /// Sum over the VMs assigned to it, whatever their power state: an
    /// assignment is a reservation, so a stopped VM can always start again.
    pub used: Capacity,
    pub labels: BTreeMap<String, String>,
    /// Anti-affinity groups of the VMs assigned to it.
    pub anti_affinity_groups: BTreeSet<String>,
}

impl NodeView {
    pub fn free(&self) -> Capacity {
        Capacity {
            vcpus: self.capacity.vcpus.saturating_sub(self.used.vcpus),
            memory_mib: self.capacity.memory_mib.saturating_sub(self.used.memory_mib),
        }
    }

    /// Account for a VM placed here (by a command or earlier in a planning pass).
    pub fn add(&mut self, vm: &VmRequirements) {
        self.used.vcpus = self.used.vcpus.saturating_add(vm.vcpus);
        self.used.memory_mib = self.used.memory_mib.saturating_add(vm.memory_mib);
        if let Some(g) = &vm.anti_affinity_group {
            self.anti_affinity_groups.insert(g.clone());
        }
    }

    /// Free memory as a fraction (numerator, denominator), compared exactly so
    /// no two controllers can round differently.
    fn free_fraction(&self) -> (u128, u128) {
        match self.capacity.memory_mib {
            0 => (0, 1),
            cap => (u128::from(self.free().memory_mib), u128::from(cap)),
        }
    }
}

/// Why one node cannot take a VM. The order of the variants is the order the
/// rules are checked in; a node is counted under the first rule it fails.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Cordoned,
    Unreachable,
    Fenced,
    MissingLabel { key: String, value: String },
    AntiAffinity { group: String },
    LacksVcpus,
    LacksMemory,
}

impl Reason {
    /// "`n` nodes ..." with the verb agreeing with `n`.
    fn describe(&self, n: usize) -> String {
        let one = n == 1;
        match self {
            Reason::Cordoned => format!("{n} cordoned"),
            Reason::Unreachable => format!("{n} unreachable"),
            Reason::Fenced => format!("{n} fenced"),
            Reason::MissingLabel { key, value } => format!("{n} missing label {key}={value}"),
            Reason::AntiAffinity { group } => {
                format!("{n} {} anti-affinity group {group}", if one { "has" } else { "have" })
            }
            Reason::LacksVcpus => format!("{n} {} vCPUs", if one { "lacks" } else { "lack" }),
            Reason::LacksMemory => format!("{n} {} memory", if one { "lacks" } else { "lack" }),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.describe(1);
        // Drop the leading count: "lacks memory", "has anti-affinity group web".
        f.write_str(s.split_once(' ').map_or(s.as_str(), |(_, rest)| rest))
    }
}

/// Whether `node` can take `vm` now.
pub fn check_node(vm: &VmRequirements, node: &NodeView) -> Result<(), Reason> {
    match node.state {
        NodeState::Ready => {}
        NodeState::Cordoned => return Err(Reason::Cordoned),
        NodeState::Unreachable => return Err(Reason::Unreachable),
        NodeState::Fenced => return Err(Reason::Fenced),
    }
    for (key, value) in &vm.required_labels {
        if node.labels.get(key) != Some(value) {
            return Err(Reason::MissingLabel { key: key.clone(), value: value.clone() });
        }
    }
    if let Some(g) = &vm.anti_affinity_group {
        if node.anti_affinity_groups.contains(g) {
            return Err(Reason::AntiAffinity { group: g.clone() });
        }
    }
    let free = node.free();
    if free.vcpus < vm.vcpus {
        return Err(Reason::LacksVcpus);
    }
    if free.memory_mib < vm.memory_mib {
        return Err(Reason::LacksMemory);
    }
    Ok(())
}

/// No node fits: how many nodes failed each rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub vm: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub nodes: usize,
    /// Most common reason first, then in rule order.
    pub reasons: Vec<(Reason, usize)>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no node fits vm {} ({} vCPUs, {} MiB): ", self.vm, self.vcpus, self.memory_mib)?;
        if self.nodes == 0 {
            return f.write_str("no nodes are registered");
        }
        let parts: Vec<String> = self.reasons.iter().map(|(r, n)| r.describe(*n)).collect();
        f.write_str(&parts.join(", "))
    }
}

impl std::error::Error for Refusal {}

fn refusal(vm: &VmRequirements, nodes: &[NodeView]) -> Refusal {
    let mut counts: BTreeMap<Reason, usize> = BTreeMap::new();
    for n in nodes {
        if let Err(r) = check_node(vm, n) {
            *counts.entry(r).or_default() += 1;
        }
    }
    let mut reasons: Vec<(Reason, usize)> = counts.into_iter().collect();
    // Stable sort keeps rule order among equal counts.
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    Refusal { vm: vm.name.clone(), vcpus: vm.vcpus, memory_mib: vm.memory_mib, nodes: nodes.len(), reasons }
}

/// Spread order: more free memory fraction first, then smaller id.
fn spread_order(a: &NodeView, b: &NodeView) -> Ordering {
    let ((fa, ca), (fb, cb)) = (a.free_fraction(), b.free_fraction());
    (fb * ca).cmp(&(fa * cb)).then_with(|| a.id.cmp(&b.id))
}

/// The node `vm` goes to, by the rules in the module documentation.
pub fn place(vm: &VmRequirements, nodes: &[NodeView]) -> Result<NodeId, Refusal> {
    let mut best: Option<&NodeView> = None;
    for n in nodes.iter().filter(|n| check_node(vm, n).is_ok()) {
        if best.is_none_or(|b| spread_order(n, b) == Ordering::Less) {
            best = Some(n);
        }
    }
    match best {
        Some(n) => Ok(n.id.clone()),
        None => Err(refusal(vm, nodes)),
    }
}

/// Key of a Ready node in the planning index; orders like [`spread_order`].
#[derive(Debug, PartialEq, Eq)]
struct SpreadKey {
    free: u128,
    cap: u128,
    /// Index into the id-sorted views, so comparing it compares ids.
    index: usize,
}

impl Ord for SpreadKey {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.free * self.cap).cmp(&(self.free * o.cap)).then(self.index.cmp(&o.index))
    }
}

impl PartialOrd for SpreadKey {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

fn key(views: &[NodeView], index: usize) -> SpreadKey {
    let (free, cap) = views[index].free_fraction();
    SpreadKey { free, cap, index }
}

/// Place every pending VM (desired Running, no node) in first-come order
/// (creation revision, then name), each placement counting against the nodes
/// for the ones after it. The leader turns each `Ok` into an `AssignVm`.
///
/// Gives exactly what calling [`place`] for each VM in turn and adding it to
/// the chosen view would, but keeps the Ready nodes ordered by spread so a
/// placement usually looks at a handful of nodes instead of all of them.
pub fn plan_pending(state: &ClusterState) -> Vec<(String, Result<NodeId, Refusal>)> {
    let mut views = state.node_views();
    views.sort_by(|a, b| a.id.cmp(&b.id));
    let mut ready: BTreeSet<SpreadKey> =
        (0..views.len()).filter(|&i| views[i].state == NodeState::Ready).map(|i| key(&views, i)).collect();
    let mut plan = Vec::new();
    for vm in state.pending_vms() {
        let req = VmRequirements::of(vm);
        let found = ready.iter().find(|k| check_node(&req, &views[k.index]).is_ok()).map(|k| k.index);
        let result = match found {
            Some(i) => {
                ready.remove(&key(&views, i));
                views[i].add(&req);
                ready.insert(key(&views, i));
                Ok(views[i].id.clone())
            }
            None => Err(refusal(&req, &views)),
        };
        plan.push((req.name, result));
    }
    plan
}

#[cfg(test)]
mod tests;
