//! Hosts that run VMs: what they offer and whether the scheduler may use them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::names::{is_host_port, validate_labels, validate_name};
use crate::error::{invalid, CommandError};

pub type NodeId = String;

/// The only guest architecture Basalt's VMM runs.
pub const SUPPORTED_ARCH: &str = "aarch64";
pub const MAX_NODE_VCPUS: u32 = 4096;
pub const MIN_NODE_MEMORY_MIB: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    /// Runs what it has but takes nothing new (maintenance).
    Cordoned,
    /// Missed heartbeats past the lease; its VMs may still be running.
    Unreachable,
    /// Blocklisted in Ceph and its RBD locks broken: nothing it runs can write,
    /// so its HA VMs may start elsewhere.
    Fenced,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "Ready",
            NodeState::Cordoned => "Cordoned",
            NodeState::Unreachable => "Unreachable",
            NodeState::Fenced => "Fenced",
        })
    }
}

impl NodeState {
    /// The transitions a command may make. Fencing is one-way through
    /// Unreachable so a node is never fenced while it is known to be healthy,
    /// and a fenced node never goes straight back to Ready: an operator first
    /// brings it back Cordoned after making sure the host was cleaned up.
    pub fn may_become(self, to: NodeState) -> bool {
        use NodeState::*;
        matches!(
            (self, to),
            (Ready, Cordoned)
                | (Cordoned, Ready)
                | (Ready, Unreachable)
                | (Cordoned, Unreachable)
                | (Unreachable, Ready)
                | (Unreachable, Cordoned)
                | (Unreachable, Fenced)
                | (Fenced, Cordoned)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// `host:port` the node's VMMs use for migration traffic.
    pub address: String,
    pub arch: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    /// The host CPU's feature flags as its kernel lists them (`/proc/cpuinfo`);
    /// empty from an agent that does not report them.
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    #[serde(default)]
    pub nics: Vec<HostNic>,
    /// The NIC tuning profile its agent applied; empty from an agent that
    /// does not report it.
    #[serde(default)]
    pub nic_profile: String,
}

/// A host network interface as its agent reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNic {
    pub name: String,
    pub driver: String,
    /// -1: not known.
    pub speed_mbps: i32,
    pub rx_queues: u32,
    pub tx_queues: u32,
    pub timestamping: Vec<String>,
    /// -1: none.
    pub ptp_clock: i32,
    pub settings: Vec<NicSetting>,
}

/// A tuned interrupt or queue: its CPUs as read back, or why it failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSetting {
    pub knob: String,
    pub cpus: String,
    pub error: String,
}

/// Bounds on what an agent may report of its NICs.
pub const MAX_HOST_NICS: usize = 64;
const MAX_NIC_SETTINGS: usize = 1024;
const MAX_NIC_TEXT: usize = 256;

impl Node {
    /// The host part of `address` (`10.0.0.11` of `10.0.0.11:7200`; an
    /// IPv6 address without its brackets).
    pub fn address_host(&self) -> Option<&str> {
        let (h, _) = self.address.rsplit_once(':')?;
        Some(h.trim_start_matches('[').trim_end_matches(']'))
    }

    /// The features of `from` this node lacks: a guest started on `from` may
    /// use them, so it cannot be moved here.
    pub fn missing_cpu_features(&self, from: &Node) -> Vec<String> {
        if self.cpu_features.is_empty() || from.cpu_features.is_empty() {
            return Vec::new(); // not known: basalt-vmm's own check decides
        }
        from.cpu_features.difference(&self.cpu_features).cloned().collect()
    }
}

/// What an agent reports when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub id: NodeId,
    pub address: String,
    pub arch: String,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    #[serde(default)]
    pub nics: Vec<HostNic>,
    #[serde(default)]
    pub nic_profile: String,
}

/// Bounds on what an agent may report of its CPU.
pub const MAX_CPU_FEATURES: usize = 512;
const MAX_CPU_FEATURE_LEN: usize = 32;

impl NodeRegistration {
    pub fn validate(&self) -> Result<(), CommandError> {
        validate_name("node", &self.id)?;
        let what = format!("node {}", self.id);
        if !is_host_port(&self.address) {
            return Err(invalid(format!("{what}: address {:?} must be host:port", self.address)));
        }
        if self.arch != SUPPORTED_ARCH {
            return Err(invalid(format!(
                "{what}: arch {:?} is not supported (Basalt runs {SUPPORTED_ARCH} guests only)",
                self.arch
            )));
        }
        let c = self.capacity;
        if c.vcpus == 0 || c.vcpus > MAX_NODE_VCPUS {
            return Err(invalid(format!(
                "{what}: capacity of {} vCPUs must be between 1 and {MAX_NODE_VCPUS}",
                c.vcpus
            )));
        }
        if c.memory_mib < MIN_NODE_MEMORY_MIB {
            return Err(invalid(format!(
                "{what}: capacity of {} MiB memory is below the minimum of {MIN_NODE_MEMORY_MIB} MiB",
                c.memory_mib
            )));
        }
        if self.cpu_features.len() > MAX_CPU_FEATURES {
            return Err(invalid(format!(
                "{what}: {} CPU features reported, at most {MAX_CPU_FEATURES}",
                self.cpu_features.len()
            )));
        }
        if let Some(f) = self.cpu_features.iter().find(|f| {
            f.is_empty()
                || f.len() > MAX_CPU_FEATURE_LEN
                || !f.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        }) {
            return Err(invalid(format!(
                "{what}: CPU feature {f:?} must be 1 to {MAX_CPU_FEATURE_LEN} of a-z, 0-9 and _"
            )));
        }
        if self.nics.len() > MAX_HOST_NICS {
            return Err(invalid(format!("{what}: {} NICs reported, at most {MAX_HOST_NICS}", self.nics.len())));
        }
        let long = |t: &str| t.len() > MAX_NIC_TEXT;
        for n in &self.nics {
            if n.settings.len() > MAX_NIC_SETTINGS || n.timestamping.len() > MAX_NIC_SETTINGS {
                return Err(invalid(format!("{what}: NIC {:?} reports more than {MAX_NIC_SETTINGS} settings", n.name)));
            }
            let texts = [&n.name, &n.driver].into_iter().chain(&n.timestamping);
            let texts = texts.chain(n.settings.iter().flat_map(|s| [&s.knob, &s.cpus, &s.error]));
            if n.name.is_empty() || texts.into_iter().any(|t| long(t)) {
                return Err(invalid(format!(
                    "{what}: NIC {:?}: a name is needed, and no field may pass {MAX_NIC_TEXT} bytes",
                    n.name
                )));
            }
        }
        if long(&self.nic_profile) {
            return Err(invalid(format!("{what}: NIC profile name longer than {MAX_NIC_TEXT} bytes")));
        }
        validate_labels(&what, &self.labels)
    }
}
