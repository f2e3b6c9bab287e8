//! Saving and restoring a VM's state, Firecracker-style: every stateful part
//! (vCPU, vGIC, devices) implements [`Persist`], so a snapshot or a
//! migration walks one interface. The formats are explicit, versioned serde
//! structs; a reader refuses a version it does not know instead of guessing.

use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::aarch64::layout;
use crate::memory::GuestRam;

/// Version of every state struct below. Bump it when a field changes
/// meaning; add fields with `#[serde(default)]` to stay readable.
pub const STATE_VERSION: u32 = 1;

pub trait Persist {
    type State;
    type Error;
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Restores into a freshly created instance (same shape as the saved one).
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// One vCPU: every register KVM_GET_REG_LIST names (core, system, timer,
/// firmware pseudo-registers), in that order, plus its power state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub version: u32,
    pub mpidr: u64,
    /// (register id, little-endian value of the register's size)
    pub regs: Vec<(u64, Vec<u8>)>,
    /// KVM_MP_STATE_RUNNABLE (0) or KVM_MP_STATE_STOPPED (1, PSCI CPU_OFF).
    pub mp_state: u32,
}

/// The in-kernel vGICv3, read through its device attributes in the groups
/// and order Documentation/virt/kvm/devices/arm-vgic-v3.rst describes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicState {
    pub version: u32,
    pub nr_irqs: u32,
    /// (offset, value) of distributor registers.
    pub dist: Vec<(u32, u32)>,
    /// Per vCPU (by MPIDR): (offset, value) of redistributor registers.
    pub redist: Vec<(u64, Vec<(u32, u32)>)>,
    /// Per vCPU: (sysreg encoding, value) of the ICC_* CPU interface registers.
    pub icc: Vec<(u64, Vec<(u64, u64)>)>,
    /// (first interrupt ID, line-level bits) of level-triggered SPIs.
    pub line_level: Vec<(u32, u32)>,
    /// Per vCPU (by MPIDR): line-level bits of its SGIs and PPIs (ID 0-31).
    #[serde(default)]
    pub ppi_level: Vec<(u64, u32)>,
}

/// The GICv3 ITS: its registers after KVM_DEV_ARM_ITS_SAVE_TABLES has
/// flushed its tables into guest memory (arm-vgic-its.rst).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItsState {
    pub version: u32,
    /// (offset, value) of GITS_* registers, GITS_CTLR included.
    pub regs: Vec<(u32, u64)>,
}

/// The 16550 console's registers and unread input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub version: u32,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// A whole VM, minus guest memory (which travels as raw bytes beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub gic: GicState,
    #[serde(default)]
    pub its: Option<ItsState>,
    pub serial: SerialState,
    /// Per virtio-mmio device, its transport+device state (serialized by the device).
    #[serde(default)]
    pub virtio: Vec<serde_json::Value>,
    /// Per NIC, its transport+device state.
    #[serde(default)]
    pub nics: Vec<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state version {found} is not supported (this VMM reads version {STATE_VERSION})")]
    Version { found: u32 },
    #[error("the saved VM does not match this one: {0}")]
    Shape(String),
    #[error("{0}")]
    Io(String),
}

impl VmState {
    /// The guest's virtual counter when it was saved (vCPU 0's
    /// KVM_REG_ARM_TIMER_CNT; KVM keeps one virtual offset for all vCPUs).
    pub fn guest_counter(&self) -> Option<u64> {
        let (_, v) = self.vcpus.first()?.regs.iter().find(|(id, _)| *id == crate::arch::aarch64::regs::TIMER_CNT)?;
        <[u8; 8]>::try_from(v.as_slice()).ok().map(u64::from_le_bytes)
    }

    pub fn check(&self) -> Result<(), StateError> {
        let bad = |found| Err(StateError::Version { found });
        if self.version != STATE_VERSION {
            return bad(self.version);
        }
        if let Some(v) = self.vcpus.iter().find(|v| v.version != STATE_VERSION) {
            return bad(v.version);
        }
        if self.gic.version != STATE_VERSION {
            return bad(self.gic.version);
        }
        if self.gic.redist.len() != self.vcpus.len() || self.gic.icc.len() != self.vcpus.len() {
            return Err(StateError::Shape(format!(
                "{} vCPUs but vGIC state for {} redistributors",
                self.vcpus.len(),
                self.gic.redist.len()
            )));
        }
        Ok(())
    }

    /// Writes `memory.bin` (straight from guest RAM, no copy on the heap)
    /// and `state.json` into `dir`, each through a temporary file, fsync and
    /// rename. The old `state.json` goes first and the new one comes last, so
    /// an interrupted save never leaves a state paired with other memory.
    pub fn write(&self, dir: &Path, mem: &GuestRam) -> Result<(), StateError> {
        let io = |what: &str| {
            let at = dir.display().to_string();
            let what = what.to_string();
            move |e: std::io::Error| StateError::Io(format!("{at}: {what}: {e}"))
        };
        std::fs::create_dir_all(dir).map_err(io("create"))?;
        let json = serde_json::to_vec(self).map_err(|e| StateError::Io(e.to_string()))?;
        match std::fs::remove_file(dir.join(STATE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove the old state")(e)),
            _ => {}
        }
        let tmp = dir.join("memory.bin.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io("create memory.bin.tmp"))?;
        mem.write_all_volatile_to(GuestAddress(layout::RAM_BASE), &mut f, self.memory_bytes as usize)
            .map_err(|e| StateError::Io(format!("{}: write guest memory: {e}", tmp.display())))?;
        f.sync_all().map_err(io("fsync memory.bin.tmp"))?;
        std::fs::rename(&tmp, dir.join(MEMORY_FILE)).map_err(io("rename memory.bin"))?;
        let tmp = dir.join("state.json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io("create state.json.tmp"))?;
        std::io::Write::write_all(&mut f, &json).map_err(io("write state.json.tmp"))?;
        f.sync_all().map_err(io("fsync state.json.tmp"))?;
        std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(io("rename state.json"))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync the directory"))
    }

    /// Reads and checks `state.json`, and that `memory.bin` has the size it
    /// names; the memory itself is loaded by [`VmState::load_memory`].
    pub fn read(dir: &Path) -> Result<VmState, StateError> {
        let io = |e: std::io::Error| StateError::Io(format!("{}: {e}", dir.display()));
        let s: VmState = serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE)).map_err(io)?)
            .map_err(|e| StateError::Io(format!("{}/{STATE_FILE}: {e}", dir.display())))?;
        s.check()?;
        let len = std::fs::metadata(dir.join(MEMORY_FILE)).map_err(io)?.len();
        if len != s.memory_bytes {
            return Err(StateError::Shape(format!("{MEMORY_FILE} has {len} bytes, the state says {}", s.memory_bytes)));
        }
        Ok(s)
    }

    /// Reads `memory.bin` straight into guest RAM.
    pub fn load_memory(&self, dir: &Path, mem: &GuestRam) -> Result<(), StateError> {
        let path = dir.join(MEMORY_FILE);
        let mut f = std::fs::File::open(&path).map_err(|e| StateError::Io(format!("{}: {e}", path.display())))?;
        mem.read_exact_volatile_from(GuestAddress(layout::RAM_BASE), &mut f, self.memory_bytes as usize)
            .map_err(|e| StateError::Io(format!("{}: {e}", path.display())))
    }
}

pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory.bin";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            version: STATE_VERSION,
            memory_bytes: 8192,
            vcpus: vec![VcpuState {
                version: 1,
                mpidr: 0x8000_0000,
                regs: vec![(0x6030_0000_0010_0040, vec![0; 8])],
                mp_state: 0,
            }],
            gic: GicState {
                version: 1,
                nr_irqs: 64,
                redist: vec![(0, vec![])],
                icc: vec![(0, vec![])],
                ..Default::default()
            },
            its: None,
            serial: SerialState::default(),
            virtio: vec![],
            nics: vec![],
        }
    }

    #[test]
    fn snapshots_round_trip_and_foreign_versions_are_refused() {
        let d = tempfile::tempdir().expect("dir");
        let mem = GuestRam::from_ranges(&[(GuestAddress(layout::RAM_BASE), 8192)]).expect("mem");
        mem.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8], GuestAddress(layout::RAM_BASE)).expect("fill");
        sample().write(d.path(), &mem).expect("write");
        assert!(!d.path().join("state.json.tmp").exists() && !d.path().join("memory.bin.tmp").exists());
        let s = VmState::read(d.path()).expect("read");
        assert_eq!(s, sample());
        let back = GuestRam::from_ranges(&[(GuestAddress(layout::RAM_BASE), 8192)]).expect("mem");
        s.load_memory(d.path(), &back).expect("load");
        let mut m = [0u8; 8];
        back.read_slice(&mut m, GuestAddress(layout::RAM_BASE)).expect("read back");
        assert_eq!(m, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut v2 = sample();
        v2.version = 2;
        v2.write(d.path(), &mem).expect("write");
        assert!(VmState::read(d.path()).unwrap_err().to_string().contains("version 2"));
        let mut bad = sample();
        bad.gic.redist.clear();
        assert!(bad.check().is_err());
        sample().write(d.path(), &mem).expect("write");
        std::fs::write(d.path().join("memory.bin"), [0u8; 4]).expect("truncate");
        assert!(VmState::read(d.path()).unwrap_err().to_string().contains("memory.bin"));
    }
}
