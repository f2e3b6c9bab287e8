//! The in-kernel vGICv3: created through KVM_CREATE_DEVICE, placed at the
//! addresses of [`super::layout`], initialised after every vCPU exists (the
//! order arm-vgic-v3.rst requires), and read back through device attributes.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};
use serde::Serialize;

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum GicError {
    #[error("the kernel offers no in-kernel vGICv3 (KVM_CREATE_DEVICE: {0}); the host needs a GICv3 and KVM at EL2")]
    Unsupported(#[source] kvm_ioctls::Error),
    #[error("vGICv3 state: {0}")]
    Shape(String),
    #[error("vGICv3 {what}: {source}")]
    Attr {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Distributor register offsets used outside this module.
pub const GICD_CTLR: u32 = 0x0000;
pub const GICD_TYPER: u32 = 0x0004;
pub const GICD_IIDR: u32 = 0x0008;
pub const GICD_ISENABLER: u32 = 0x0100;
pub const GICD_ISPENDR: u32 = 0x0200;

pub struct VGicV3 {
    fd: DeviceFd,
    /// The vCPUs' MPIDRs, known once they are initialised (see `finalize`).
    mpidrs: Vec<u64>,
}

impl VGicV3 {
    /// Creates the device and sets its addresses and interrupt count. Call
    /// [`VGicV3::finalize`] once every vCPU is created.
    pub fn create(vm: &VmFd, vcpus: u64) -> Result<Self, GicError> {
        let mut dev = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, fd: 0, flags: 0 };
        let fd = vm.create_device(&mut dev).map_err(GicError::Unsupported)?;
        let gic = VGicV3 { fd, mpidrs: Vec::new() };
        assert!(vcpus <= layout::GIC_REDIST_MAX_CPUS, "vCPU count is validated by the VM config");
        gic.put_u64(
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
            layout::GIC_DIST_BASE,
            "distributor address",
        )?;
        gic.put_u64(
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
            layout::GIC_REDIST_BASE,
            "redistributor address",
        )?;
        gic.put_u32(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, layout::GIC_NR_IRQS, "number of IRQs")?;
        Ok(gic)
    }

    /// Initialises the vGIC once every vCPU exists; `mpidrs` name them for
    /// the per-CPU state views.
    pub fn finalize_with(&mut self, mpidrs: &[u64]) -> Result<(), GicError> {
        self.mpidrs = mpidrs.to_vec();
        self.finalize()
    }

    pub fn finalize(&self) -> Result<(), GicError> {
        let attr = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
            addr: 0,
            flags: 0,
        };
        self.fd.set_device_attr(&attr).map_err(|source| GicError::Attr { what: "CTRL_INIT", source })
    }

    /// Reads a 32-bit distributor register.
    pub fn dist_reg(&self, offset: u32) -> Result<u32, GicError> {
        self.get_u32(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset), "read distributor register")
    }

    /// Reads a 32-bit redistributor register of the vCPU with this MPIDR
    /// (SGI-frame registers are at 0x10000 + their offset).
    pub fn redist_reg(&self, mpidr: u64, offset: u32) -> Result<u32, GicError> {
        let attr = (packed_affinity(mpidr) << 32) | u64::from(offset);
        self.get_u32(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, attr, "read redistributor register")
    }

    /// Every interrupt's state, like the kernel's debugfs `vgic-state`:
    /// SGIs and PPIs per vCPU, then SPIs. KVM only answers while no vCPU is
    /// in KVM_RUN, so the caller pauses the VM first.
    pub fn state(&self, mpidrs: &[u64]) -> Result<Vec<IrqState>, GicError> {
        let bit = |reg: u32, i: u32| reg & (1 << (i % 32)) != 0;
        let mut out = Vec::new();
        for (cpu, &mpidr) in mpidrs.iter().enumerate() {
            let (en, pend, act) = (
                self.redist_reg(mpidr, 0x1_0100)?,
                self.redist_reg(mpidr, 0x1_0200)?,
                self.redist_reg(mpidr, 0x1_0300)?,
            );
            let cfg = [self.redist_reg(mpidr, 0x1_0c00)?, self.redist_reg(mpidr, 0x1_0c04)?];
            for i in 0..32u32 {
                let prio = self.redist_reg(mpidr, 0x1_0400 + (i & !3))?;
                out.push(IrqState {
                    kind: if i < 16 { "SGI" } else { "PPI" },
                    intid: i,
                    target: format!("vcpu{cpu}"),
                    enabled: bit(en, i),
                    pending: bit(pend, i),
                    active: bit(act, i),
                    priority: (prio >> ((i % 4) * 8)) as u8,
                    edge: (cfg[(i / 16) as usize] >> ((i % 16) * 2 + 1)) & 1 == 1,
                });
            }
        }
        for i in layout::GIC_SPI_BASE..layout::GIC_NR_IRQS {
            let word = 4 * (i / 32);
            let (en, pend, act) = (
                self.dist_reg(GICD_ISENABLER + word)?,
                self.dist_reg(GICD_ISPENDR + word)?,
                self.dist_reg(0x300 + word)?,
            );
            let prio = self.dist_reg(0x400 + (i & !3))?;
            let cfg = self.dist_reg(0xc00 + 4 * (i / 16))?;
            let route = u64::from(self.dist_reg(0x6000 + 8 * i)?) | (u64::from(self.dist_reg(0x6004 + 8 * i)?) << 32);
            out.push(IrqState {
                kind: "SPI",
                intid: i,
                target: format!("mpidr {:#x}", route & 0xff_00ff_ffff),
                enabled: bit(en, i),
                pending: bit(pend, i),
                active: bit(act, i),
                priority: (prio >> ((i % 4) * 8)) as u8,
                edge: (cfg >> ((i % 16) * 2 + 1)) & 1 == 1,
            });
        }
        Ok(out)
    }

    pub fn set_dist_reg(&self, offset: u32, val: u32) -> Result<(), GicError> {
        self.put_u32(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset), val, "write distributor register")
    }
}

// Register ranges saved for migration (arm-vgic-v3.rst; offsets for the SGI
// frame of a redistributor are 0x10000 + the frame offset).
const GICR_CTLR: u32 = 0x0000;
const SGI_IGROUPR0: u32 = 0x1_0080;
const SGI_ISENABLER0: u32 = 0x1_0100;
const SGI_ICENABLER0: u32 = 0x1_0180;
const SGI_ISPENDR0: u32 = 0x1_0200;
const SGI_ICPENDR0: u32 = 0x1_0280;
const SGI_ISACTIVER0: u32 = 0x1_0300;
const SGI_ICACTIVER0: u32 = 0x1_0380;
const SGI_IPRIORITYR: u32 = 0x1_0400;
const SGI_ICFGR0: u32 = 0x1_0c00;

/// ICC_* registers as KVM encodes them (op0, op1, CRn, CRm, op2), in the
/// order they are restored: SRE first, as QEMU does, because it decides how
/// the others are interpreted.
fn icc_regs() -> Vec<u64> {
    let e = |op0: u64, op1: u64, crn: u64, crm: u64, op2: u64| op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2;
    let mut v = vec![
        e(3, 0, 12, 12, 5), // ICC_SRE_EL1
        e(3, 0, 12, 12, 4), // ICC_CTLR_EL1
        e(3, 0, 12, 12, 6), // ICC_IGRPEN0_EL1
        e(3, 0, 12, 12, 7), // ICC_IGRPEN1_EL1
        e(3, 0, 4, 6, 0),   // ICC_PMR_EL1
        e(3, 0, 12, 8, 3),  // ICC_BPR0_EL1
        e(3, 0, 12, 12, 3), // ICC_BPR1_EL1
    ];
    for n in 0..4 {
        v.push(e(3, 0, 12, 8, 4 + n)); // ICC_AP0R<n>_EL1
        v.push(e(3, 0, 12, 9, n)); // ICC_AP1R<n>_EL1
    }
    v
}

impl VGicV3 {
    fn get_u32(&self, group: u32, attr: u64, what: &'static str) -> Result<u32, GicError> {
        let mut val: u32 = 0;
        let mut a = kvm_device_attr { group, attr, addr: &mut val as *mut u32 as u64, flags: 0 };
        // SAFETY: `addr` points at a live u32.
        unsafe { self.fd.get_device_attr(&mut a) }.map_err(|source| GicError::Attr { what, source })?;
        Ok(val)
    }

    fn get_u64(&self, group: u32, attr: u64, what: &'static str) -> Result<u64, GicError> {
        let mut val: u64 = 0;
        let mut a = kvm_device_attr { group, attr, addr: &mut val as *mut u64 as u64, flags: 0 };
        // SAFETY: `addr` points at a live u64.
        unsafe { self.fd.get_device_attr(&mut a) }.map_err(|source| GicError::Attr { what, source })?;
        Ok(val)
    }

    fn put_u32(&self, group: u32, attr: u64, val: u32, what: &'static str) -> Result<(), GicError> {
        let a = kvm_device_attr { group, attr, addr: &val as *const u32 as u64, flags: 0 };
        self.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what, source })
    }

    fn put_u64(&self, group: u32, attr: u64, val: u64, what: &'static str) -> Result<(), GicError> {
        let a = kvm_device_attr { group, attr, addr: &val as *const u64 as u64, flags: 0 };
        self.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what, source })
    }

    /// The distributor's implementation (GICD_IIDR): a migration target
    /// must run the same implementation, at the same or a later revision.
    pub fn iidr(&self) -> Result<u32, GicError> {
        self.get_u32(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(GICD_IIDR), "read GICD_IIDR")
    }

    /// Writes the pending state of every LPI into the pending tables in
    /// guest memory (KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES), so it travels
    /// with RAM. With the vCPUs paused, before the last copy of memory.
    pub fn save_pending_tables(&self) -> Result<(), GicError> {
        let attr = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: u64::from(kvm_bindings::KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES),
            addr: 0,
            flags: 0,
        };
        self.fd.set_device_attr(&attr).map_err(|source| GicError::Attr { what: "SAVE_PENDING_TABLES", source })
    }

    /// Distributor registers for SPIs, in the order they are restored.
    fn dist_offsets() -> Vec<u32> {
        let n = layout::GIC_NR_IRQS;
        let mut v = vec![GICD_CTLR];
        for w in 1..n / 32 {
            v.push(0x80 + 4 * w); // IGROUPR
        }
        for k in 8..n / 4 {
            v.push(0x400 + 4 * k); // IPRIORITYR
        }
        for k in 2..n / 16 {
            v.push(0xc00 + 4 * k); // ICFGR
        }
        for i in layout::GIC_SPI_BASE..n {
            v.push(0x6000 + 8 * i); // IROUTER, low and high words
            v.push(0x6004 + 8 * i);
        }
        for w in 1..n / 32 {
            v.push(0x200 + 4 * w); // ISPENDR
            v.push(0x300 + 4 * w); // ISACTIVER
            v.push(0x100 + 4 * w); // ISENABLER, last: nothing fires half-configured
        }
        v
    }

    fn redist_offsets() -> Vec<u32> {
        // GICR_PROPBASER and GICR_PENDBASER (LPI tables, used with an ITS)
        // as 32-bit halves, before GICR_CTLR: once EnableLPIs is set they
        // can no longer be written.
        let mut v = vec![0x70, 0x74, 0x78, 0x7c, GICR_CTLR, SGI_IGROUPR0, SGI_ICFGR0, SGI_ICFGR0 + 4];
        for k in 0..8 {
            v.push(SGI_IPRIORITYR + 4 * k);
        }
        v.extend([SGI_ISPENDR0, SGI_ISACTIVER0, SGI_ISENABLER0]);
        v
    }

    /// The ICC registers this CPU interface implements: the active-priority
    /// registers exist only for the priority bits it has (ICC_CTLR_EL1.PRIbits:
    /// 5 bits → AP{0,1}R0, 6 → R0-R1, 7 → R0-R3, as the GICv3 spec says).
    fn icc_regs_for(&self, aff: u64) -> Result<Vec<u64>, GicError> {
        let grp = KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
        let all = icc_regs();
        let ctlr = self.get_u64(grp, aff | all[1], "read ICC_CTLR_EL1")?;
        let aprs = match ((ctlr >> 8) & 7) + 1 {
            5 => 1,
            6 => 2,
            _ => 4,
        };
        Ok(all.into_iter().filter(|enc| ap_index(*enc).is_none_or(|n| n < aprs)).collect())
    }
}

/// Which ICC_AP{0,1}R<n>_EL1 an encoding is, if it is one.
fn ap_index(enc: u64) -> Option<u64> {
    let (crm, op2) = ((enc >> 3) & 0xf, enc & 7);
    match (crm, op2) {
        (8, 4..=7) => Some(op2 - 4),
        (9, 0..=3) => Some(op2),
        _ => None,
    }
}

impl crate::persist::Persist for VGicV3 {
    type State = crate::persist::GicState;
    type Error = GicError;

    /// Reads the distributor (GICD_IIDR first), every redistributor and CPU
    /// interface, and the line levels of SPIs and of every vCPU's PPIs. KVM
    /// answers only while no vCPU runs. Any register that fails to read fails
    /// the save: a state with holes would restore a different GIC.
    fn save(&self) -> Result<Self::State, GicError> {
        let grp_d = KVM_DEV_ARM_VGIC_GRP_DIST_REGS;
        let mut dist = vec![(GICD_IIDR, self.iidr()?)];
        for o in Self::dist_offsets() {
            dist.push((o, self.get_u32(grp_d, u64::from(o), "read distributor register")?));
        }
        let mut redist = Vec::new();
        let mut icc = Vec::new();
        let mut ppi_level = Vec::new();
        for &m in &self.mpidrs {
            let aff = packed_affinity(m) << 32;
            let mut r = Vec::new();
            for o in Self::redist_offsets() {
                r.push((
                    o,
                    self.get_u32(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, aff | u64::from(o), "read redistributor register")?,
                ));
            }
            redist.push((m, r));
            let mut c = Vec::new();
            for enc in self.icc_regs_for(aff)? {
                c.push((enc, self.get_u64(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, aff | enc, "read ICC register")?));
            }
            icc.push((m, c));
            // VGIC_LEVEL_INFO_LINE_LEVEL (0) in the info field; vINTID 0: SGIs
            // (read as zero) and this vCPU's PPIs.
            ppi_level.push((m, self.get_u32(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, aff, "read PPI line levels")?));
        }
        let mut line_level = Vec::new();
        for intid in (layout::GIC_SPI_BASE..layout::GIC_NR_IRQS).step_by(32) {
            line_level.push((
                intid,
                self.get_u32(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, u64::from(intid), "read SPI line levels")?,
            ));
        }
        Ok(crate::persist::GicState {
            version: crate::persist::STATE_VERSION,
            nr_irqs: layout::GIC_NR_IRQS,
            dist,
            redist,
            icc,
            line_level,
            ppi_level,
        })
    }

    /// Restores into a freshly initialised vGIC: GICD_IIDR first (it decides
    /// how KVM interprets the rest), then QEMU's proven order: GICD_CTLR,
    /// redistributors, distributor, line levels, CPU interfaces.
    fn restore(&mut self, s: &Self::State) -> Result<(), GicError> {
        if s.nr_irqs != layout::GIC_NR_IRQS {
            return Err(GicError::Shape(format!(
                "the saved vGIC has {} interrupt IDs, this VM's {} (saved by another basalt-vmm version)",
                s.nr_irqs,
                layout::GIC_NR_IRQS
            )));
        }
        let grp_d = KVM_DEV_ARM_VGIC_GRP_DIST_REGS;
        let get = |off: u32| s.dist.iter().find(|(o, _)| *o == off).map(|(_, v)| *v);
        if let Some(iidr) = get(GICD_IIDR) {
            self.put_u32(grp_d, u64::from(GICD_IIDR), iidr, "restore GICD_IIDR")?;
        }
        if let Some(ctlr) = get(GICD_CTLR) {
            self.put_u32(grp_d, u64::from(GICD_CTLR), ctlr, "restore GICD_CTLR")?;
        }
        for (m, regs) in &s.redist {
            let aff = packed_affinity(*m) << 32;
            let g = KVM_DEV_ARM_VGIC_GRP_REDIST_REGS;
            for clear in [SGI_ICENABLER0, SGI_ICPENDR0, SGI_ICACTIVER0] {
                self.put_u32(g, aff | u64::from(clear), u32::MAX, "clear redistributor state")?;
            }
            for (o, v) in regs {
                self.put_u32(g, aff | u64::from(*o), *v, "restore redistributor register")?;
            }
        }
        for w in 1..s.nr_irqs / 32 {
            for clear in [0x180, 0x280, 0x380] {
                self.put_u32(grp_d, u64::from(clear + 4 * w), u32::MAX, "clear distributor state")?;
            }
        }
        for (o, v) in s.dist.iter().filter(|(o, _)| *o != GICD_CTLR && *o != GICD_IIDR) {
            self.put_u32(grp_d, u64::from(*o), *v, "restore distributor register")?;
        }
        for (intid, v) in &s.line_level {
            self.put_u32(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, u64::from(*intid), *v, "restore SPI line levels")?;
        }
        for (m, v) in &s.ppi_level {
            self.put_u32(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, packed_affinity(*m) << 32, *v, "restore PPI line levels")?;
        }
        for (m, regs) in &s.icc {
            let aff = packed_affinity(*m) << 32;
            for (enc, v) in regs {
                self.put_u64(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, aff | enc, *v, "restore ICC register")?;
            }
        }
        Ok(())
    }
}

/// KVM's 32-bit packing of an MPIDR for redistributor attributes: Aff3 in
/// bits 31:24, then Aff2, Aff1, Aff0.
pub fn packed_affinity(mpidr: u64) -> u64 {
    ((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff)
}

/// One interrupt in the `vgic-state` view.
#[derive(Debug, Clone, Serialize)]
pub struct IrqState {
    pub kind: &'static str,
    pub intid: u32,
    pub target: String,
    pub enabled: bool,
    pub pending: bool,
    pub active: bool,
    pub priority: u8,
    pub edge: bool,
}

/// The in-kernel GICv3 ITS (Documentation/virt/kvm/devices/arm-vgic-its.rst).
pub struct Its {
    fd: DeviceFd,
}

// GITS_* register offsets: CBASER first and CTLR last when restoring.
const GITS_CTLR: u32 = 0x0000;
const GITS_IIDR: u32 = 0x0004;
const GITS_CBASER: u32 = 0x0080;
const GITS_CWRITER: u32 = 0x0088;
const GITS_CREADR: u32 = 0x0090;
const GITS_BASER: u32 = 0x0100;

impl Its {
    /// Creates the ITS at [`layout::GIC_ITS_BASE`] and initialises it; the
    /// GICv3 must exist already.
    pub fn create(vm: &VmFd) -> Result<Self, GicError> {
        use kvm_bindings::{kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS, KVM_VGIC_ITS_ADDR_TYPE};
        let mut dev = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS, fd: 0, flags: 0 };
        let fd = vm.create_device(&mut dev).map_err(GicError::Unsupported)?;
        let its = Its { fd };
        let base = layout::GIC_ITS_BASE;
        let a = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_ADDR,
            attr: u64::from(KVM_VGIC_ITS_ADDR_TYPE),
            addr: &base as *const u64 as u64,
            flags: 0,
        };
        its.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what: "ITS address", source })?;
        its.ctrl(u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT), "ITS CTRL_INIT")?;
        Ok(its)
    }

    fn ctrl(&self, attr: u64, what: &'static str) -> Result<(), GicError> {
        let a = kvm_device_attr { group: KVM_DEV_ARM_VGIC_GRP_CTRL, attr, addr: 0, flags: 0 };
        self.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what, source })
    }

    fn reg(&self, offset: u32) -> Result<u64, GicError> {
        let mut val: u64 = 0;
        let mut a = kvm_device_attr {
            group: kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
            attr: u64::from(offset),
            addr: &mut val as *mut u64 as u64,
            flags: 0,
        };
        // SAFETY: `addr` points at a live u64, the size of ITS register accesses.
        unsafe { self.fd.get_device_attr(&mut a) }
            .map_err(|source| GicError::Attr { what: "read ITS register", source })?;
        Ok(val)
    }

    fn set_reg(&self, offset: u32, val: u64) -> Result<(), GicError> {
        let a = kvm_device_attr {
            group: kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
            attr: u64::from(offset),
            addr: &val as *const u64 as u64,
            flags: 0,
        };
        self.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what: "write ITS register", source })
    }
}

impl crate::persist::Persist for Its {
    type State = crate::persist::ItsState;
    type Error = GicError;

    /// Flushes the ITS tables (device, collection, interrupt translation)
    /// into guest memory, then reads the registers that locate them.
    fn save(&self) -> Result<Self::State, GicError> {
        self.ctrl(u64::from(kvm_bindings::KVM_DEV_ARM_ITS_SAVE_TABLES), "ITS SAVE_TABLES")?;
        let mut regs = Vec::new();
        for o in
            [GITS_IIDR, GITS_CBASER, GITS_CREADR, GITS_CWRITER].into_iter().chain((0..8).map(|n| GITS_BASER + 8 * n))
        {
            regs.push((o, self.reg(o)?));
        }
        regs.push((GITS_CTLR, self.reg(GITS_CTLR)?));
        Ok(crate::persist::ItsState { version: crate::persist::STATE_VERSION, regs })
    }

    /// arm-vgic-its.rst's order: GITS_CBASER, the other registers but
    /// GITS_CTLR, RESTORE_TABLES (guest memory must hold them), GITS_CTLR.
    fn restore(&mut self, s: &Self::State) -> Result<(), GicError> {
        let get = |o: u32| s.regs.iter().find(|(r, _)| *r == o).map(|(_, v)| *v);
        if let Some(v) = get(GITS_IIDR) {
            self.set_reg(GITS_IIDR, v)?;
        }
        if let Some(v) = get(GITS_CBASER) {
            self.set_reg(GITS_CBASER, v)?;
        }
        for (o, v) in s.regs.iter().filter(|(o, _)| ![GITS_CTLR, GITS_IIDR, GITS_CBASER].contains(o)) {
            self.set_reg(*o, *v)?;
        }
        self.ctrl(u64::from(kvm_bindings::KVM_DEV_ARM_ITS_RESTORE_TABLES), "ITS RESTORE_TABLES")?;
        if let Some(v) = get(GITS_CTLR) {
            self.set_reg(GITS_CTLR, v)?;
        }
        Ok(())
    }
}
