//! Virtual machines: the spec users write, and the placement and observed
//! state the scheduler and agents fill in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::names::{validate_labels, validate_name};
use super::nodes::NodeId;
use crate::error::{invalid, CommandError};

pub const MAX_VM_VCPUS: u32 = 256;
pub const MIN_VM_MEMORY_MIB: u64 = 64;
/// 4 TiB: beyond that a single guest is not something one host offers.
pub const MAX_VM_MEMORY_MIB: u64 = 4 << 20;
pub const MAX_DISKS: usize = 16;
/// arm64's COMMAND_LINE_SIZE, including the terminating NUL.
pub const MAX_CMDLINE_BYTES: usize = 2047;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// A Linux arm64 `Image` (and optional initrd) by path on the host.
    Kernel { kernel: String, initrd: Option<String>, cmdline: String },
    /// Boot from a volume's bootloader; the volume is attached read-write.
    Volume { volume: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub volume: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Power {
    Running,
    Stopped,
}

/// What the agent last reported about the VM's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmPhase {
    /// Nothing reported yet (new, or just (un)assigned).
    Unknown,
    Starting,
    Running,
    Paused,
    Stopped,
    /// The VMM exited on its own or could not start.
    Failed,
}

impl fmt::Display for VmPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub phase: VmPhase,
    /// The node that reported it, `None` before any report.
    pub node: Option<NodeId>,
    /// The agent's own words (exit status, error), for `basaltctl vm get`.
    pub message: String,
    pub at_ms: u64,
}

impl Default for Observed {
    fn default() -> Self {
        Observed { phase: VmPhase::Unknown, node: None, message: String::new(), at_ms: 0 }
    }
}

/// The part of a VM its owner writes; guarded by the VM's generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot: Boot,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// VMs sharing a group never share a node.
    #[serde(default)]
    pub anti_affinity_group: Option<String>,
    /// Node selector: every pair must be among the node's labels.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
    /// Restart elsewhere when its node is fenced.
    #[serde(default)]
    pub ha: bool,
    /// Network interfaces, in the order the guest sees them.
    #[serde(default)]
    pub nics: Vec<super::NicSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub spec: VmSpec,
    pub desired_power: Power,
    pub placement: Option<NodeId>,
    pub observed: Observed,
    /// Bumped by every change its owner makes (spec, power); compare-and-set uses it.
    pub generation: u64,
    /// Revision of the command that created it: the scheduler's first-come order.
    pub created_revision: u64,
    /// Revision of the last command that changed it, so an agent's watch can
    /// resume from a revision.
    pub updated_revision: u64,
    /// What each of `spec.nics` was given (IPAM), in the same order.
    #[serde(default)]
    pub nics: Vec<super::NicAddress>,
}

impl VmSpec {
    /// Checks that need nothing but the spec; references to volumes are the state machine's.
    pub fn validate(&self, vm: &str) -> Result<(), CommandError> {
        let what = format!("vm {vm}");
        if self.vcpus == 0 || self.vcpus > MAX_VM_VCPUS {
            return Err(invalid(format!("{what}: {} vCPUs must be between 1 and {MAX_VM_VCPUS}", self.vcpus)));
        }
        if self.memory_mib < MIN_VM_MEMORY_MIB || self.memory_mib > MAX_VM_MEMORY_MIB {
            return Err(invalid(format!(
                "{what}: memory of {} MiB must be between {MIN_VM_MEMORY_MIB} and {MAX_VM_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        // Guest RAM is backed by 2 MiB huge pages (stage-2 blocks).
        if !self.memory_mib.is_multiple_of(2) {
            return Err(invalid(format!("{what}: memory of {} MiB must be a multiple of 2 MiB", self.memory_mib)));
        }
        match &self.boot {
            Boot::Kernel { kernel, initrd, cmdline } => {
                check_path(&what, "kernel", kernel)?;
                if let Some(initrd) = initrd {
                    check_path(&what, "initrd", initrd)?;
                }
                if cmdline.len() > MAX_CMDLINE_BYTES {
                    return Err(invalid(format!(
                        "{what}: kernel command line is {} bytes, arm64 allows at most {MAX_CMDLINE_BYTES}",
                        cmdline.len()
                    )));
                }
                if cmdline.bytes().any(|b| b == 0 || b == b'\n') {
                    return Err(invalid(format!("{what}: kernel command line contains a NUL or newline")));
                }
            }
            Boot::Volume { volume } => validate_name("boot volume", volume)?,
        }
        if self.disks.len() > MAX_DISKS {
            return Err(invalid(format!("{what}: {} disks, at most {MAX_DISKS} are allowed", self.disks.len())));
        }
        let mut seen = BTreeSet::new();
        for v in self.volumes() {
            validate_name("disk volume", v)?;
            if !seen.insert(v) {
                return Err(invalid(format!("{what}: volume {v} is attached more than once")));
            }
        }
        validate_labels(&what, &self.labels)?;
        validate_labels(&format!("{what} required_labels"), &self.required_labels)?;
        if let Some(g) = &self.anti_affinity_group {
            validate_name("anti-affinity group", g)?;
        }
        Ok(())
    }

    /// Every volume the VM uses, boot volume first, with whether it writes to it.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, bool)> {
        let boot = match &self.boot {
            Boot::Volume { volume } => Some((volume.as_str(), true)),
            Boot::Kernel { .. } => None,
        };
        boot.into_iter().chain(self.disks.iter().map(|d| (d.volume.as_str(), !d.read_only)))
    }

    pub fn volumes(&self) -> impl Iterator<Item = &str> {
        self.attachments().map(|(v, _)| v)
    }
}

fn check_path(what: &str, field: &str, path: &str) -> Result<(), CommandError> {
    if !path.starts_with('/') || path.len() > 4096 || path.bytes().any(|b| b == 0) {
        return Err(invalid(format!("{what}: {field} {path:?} must be an absolute path on the host")));
    }
    Ok(())
}
