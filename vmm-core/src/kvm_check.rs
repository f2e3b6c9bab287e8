//! `basalt-kvm-check`: proves that this host can run arm64 KVM guests the way
//! `basalt-vmm` does. It creates a VM with guest RAM, one vCPU (PSCI 0.2) and
//! an in-kernel vGICv3, runs a few guest instructions that write to MMIO and
//! power off through PSCI, then reads back the vCPU's register list and
//! distributor registers. Every step that fails says what is missing.

use std::fmt::Write as _;

use kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::aarch64::gic::{VGicV3, GICD_ISENABLER, GICD_TYPER};
use crate::arch::aarch64::{layout, regs, vcpu};

/// The byte the guest writes to the serial window.
pub const GUEST_BYTE: u8 = b'B';

/// Hand-encoded guest: store GUEST_BYTE to SERIAL_BASE, read SERIAL_BASE+8
/// into x9, then PSCI SYSTEM_OFF (0x84000008) through HVC.
pub const GUEST_CODE: [u32; 8] = [
    0xd2a1_2000, // movz x0, #0x900, lsl #16   x0 = 0x0900_0000 (SERIAL_BASE)
    0x5280_0841, // movz w1, #0x42             'B'
    0x3900_0001, // strb w1, [x0]
    0x3940_2009, // ldrb w9, [x0, #8]
    0x5280_0100, // movz w0, #0x8
    0x72b0_8000, // movk w0, #0x8400, lsl #16
    0xd400_0002, // hvc  #0
    0x1400_0000, // b    .
];
/// What the check answers to the guest's MMIO read; it must land in x9.
const MMIO_READ_VALUE: u8 = 0x5a;
const GUEST_RAM: usize = 0x1_0000;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot open /dev/kvm: {0}. This kernel offers no KVM: it must run at EL2 (a host with virtualization extensions, or qemu -machine virt,virtualization=on) and not be booted with kvm-arm.mode=none")]
    NoKvm(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Gic(#[from] crate::arch::aarch64::gic::GicError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the guest did not behave: {0}")]
    Guest(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CheckError {
    move |source| CheckError::Kvm { what, source }
}

/// What the check observed; `Display` prints it for operators and the rig.
#[derive(Debug, Default)]
pub struct Report {
    pub api_version: i32,
    pub target: u32,
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
    pub mmio_reads: usize,
    pub system_off: bool,
    pub reg_count: usize,
    pub core_regs: usize,
    pub sys_regs: usize,
    pub fw_regs: usize,
    pub regs_readable: usize,
    pub mpidr: u64,
    pub pc: u64,
    pub x9: u64,
    pub gicd_typer: u32,
    pub gicd_isenabler1: u32,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "KVM API version {}, preferred target {}", self.api_version, self.target);
        for (addr, data) in &self.mmio_writes {
            let _ = writeln!(s, "MMIO write addr={addr:#x} data={data:02x?}");
        }
        let _ = writeln!(s, "MMIO reads answered: {} (x9={:#x})", self.mmio_reads, self.x9);
        let _ = writeln!(s, "PSCI SYSTEM_OFF: {}", if self.system_off { "yes" } else { "no" });
        let _ = writeln!(
            s,
            "REG_LIST n={} core={} sysreg={} fw={} readable={} MPIDR_EL1={:#x} PC={:#x}",
            self.reg_count, self.core_regs, self.sys_regs, self.fw_regs, self.regs_readable, self.mpidr, self.pc
        );
        let _ = write!(
            s,
            "vGICv3 GICD_TYPER={:#010x} (ITLinesNumber {} -> {} IRQs) GICD_ISENABLER1={:#010x}",
            self.gicd_typer,
            self.gicd_typer & 0x1f,
            ((self.gicd_typer & 0x1f) + 1) * 32,
            self.gicd_isenabler1
        );
        f.write_str(&s)
    }
}

pub fn run() -> Result<Report, CheckError> {
    let mut report = Report::default();
    let kvm = Kvm::new().map_err(CheckError::NoKvm)?;
    report.api_version = kvm.get_api_version();
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;

    let (mem, _ram, _slots) = crate::memory::create(&vm, layout::RAM_BASE, GUEST_RAM).map_err(CheckError::Memory)?;
    let code: Vec<u8> = GUEST_CODE.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&code, GuestAddress(layout::RAM_BASE)).map_err(|e| CheckError::Memory(e.to_string()))?;

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let gic = VGicV3::create(&vm, 1)?;
    report.target = vcpu::init(&vm, &vcpu, 0).map_err(kvm_err("KVM_ARM_VCPU_INIT (PSCI 0.2)"))?;
    gic.finalize()?;
    vcpu.set_one_reg(regs::core_reg(regs::PC_OFFSET), &layout::RAM_BASE.to_le_bytes()).map_err(kvm_err("set PC"))?;

    for _ in 0..32 {
        match vcpu.run().map_err(kvm_err("KVM_RUN"))? {
            VcpuExit::MmioWrite(addr, data) => report.mmio_writes.push((addr, data.to_vec())),
            VcpuExit::MmioRead(_, data) => {
                data.fill(0);
                data[0] = MMIO_READ_VALUE;
                report.mmio_reads += 1;
            }
            VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                report.system_off = true;
                break;
            }
            other => return Err(CheckError::Guest(format!("unexpected exit {other:?}"))),
        }
    }
    if !report.system_off {
        return Err(CheckError::Guest("no PSCI SYSTEM_OFF within 32 exits".into()));
    }
    if report.mmio_writes.first() != Some(&(layout::SERIAL_BASE, vec![GUEST_BYTE])) {
        return Err(CheckError::Guest(format!(
            "expected one byte {GUEST_BYTE:#x} at {:#x}, saw {:x?}",
            layout::SERIAL_BASE,
            report.mmio_writes
        )));
    }

    // The register list, every register read back.
    let mut list = kvm_bindings::RegList::new(500).map_err(|e| CheckError::Memory(format!("{e:?}")))?;
    vcpu.get_reg_list(&mut list).map_err(kvm_err("KVM_GET_REG_LIST"))?;
    let ids = list.as_slice();
    report.reg_count = ids.len();
    let mut buf = [0u8; 256];
    for &id in ids {
        match regs::reg_class(id) {
            regs::RegClass::Core => report.core_regs += 1,
            regs::RegClass::System => report.sys_regs += 1,
            regs::RegClass::Firmware => report.fw_regs += 1,
            regs::RegClass::Other => {}
        }
        let size = regs::reg_size(id);
        if size <= buf.len() && vcpu.get_one_reg(id, &mut buf[..size]).is_ok() {
            report.regs_readable += 1;
        }
    }
    let read = |id| vcpu::read_u64(&vcpu, id).map_err(kvm_err("KVM_GET_ONE_REG"));
    report.mpidr = read(regs::MPIDR_EL1)?;
    report.pc = read(regs::core_reg(regs::PC_OFFSET))?;
    report.x9 = read(regs::core_reg(regs::xreg_offset(9)))?;
    if report.x9 != u64::from(MMIO_READ_VALUE) {
        return Err(CheckError::Guest(format!("MMIO read completion not in x9 ({:#x})", report.x9)));
    }

    // The distributor, read back and written through device attributes.
    report.gicd_typer = gic.dist_reg(GICD_TYPER)?;
    gic.set_dist_reg(GICD_ISENABLER + 4, 0x5)?;
    report.gicd_isenabler1 = gic.dist_reg(GICD_ISENABLER + 4)?;
    let irqs = ((report.gicd_typer & 0x1f) + 1) * 32;
    if irqs != layout::GIC_NR_IRQS || report.gicd_isenabler1 & 0x5 != 0x5 {
        return Err(CheckError::Guest(format!("vGIC state does not match what was set: {report}")));
    }
    Ok(report)
}
