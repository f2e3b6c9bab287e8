//! The in-kernel vGICv3: created through KVM_CREATE_DEVICE, placed at the
//! addresses of [`super::layout`], initialised after every vCPU exists (the
//! order arm-vgic-v3.rst requires), and read back through device attributes.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use serde::Serialize;
use kvm_ioctls::{DeviceFd, VmFd};

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum GicError {
    #[error("the kernel offers no in-kernel vGICv3 (KVM_CREATE_DEVICE: {0}); the host needs a GICv3 and KVM at EL2")]
    Unsupported(#[source] kvm_ioctls::Error),
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
}

impl VGicV3 {
    /// Creates the device and sets its addresses and interrupt count. Call
    /// [`VGicV3::finalize`] once every vCPU is created.
    pub fn create(vm: &VmFd, vcpus: u64) -> Result<Self, GicError> {
        let mut dev = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, fd: 0, flags: 0 };
        let fd = vm.create_device(&mut dev).map_err(GicError::Unsupported)?;
        let gic = VGicV3 { fd };
        assert!(vcpus <= layout::GIC_REDIST_MAX_CPUS, "vCPU count is validated by the VM config");
        gic.set_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST), layout::GIC_DIST_BASE, "distributor address")?;
        gic.set_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST), layout::GIC_REDIST_BASE, "redistributor address")?;
        gic.set_u32(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, layout::GIC_NR_IRQS, "number of IRQs")?;
        Ok(gic)
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
        let mut val: u32 = 0;
        let mut attr = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
            attr: u64::from(offset),
            addr: &mut val as *mut u32 as u64,
            flags: 0,
        };
        // SAFETY: `addr` points at a live u32, the size KVM writes for
        // distributor registers.
        unsafe { self.fd.get_device_attr(&mut attr) }.map_err(|source| GicError::Attr { what: "read distributor register", source })?;
        Ok(val)
    }

    /// Reads a 32-bit redistributor register of the vCPU with this MPIDR
    /// (SGI-frame registers are at 0x10000 + their offset).
    pub fn redist_reg(&self, mpidr: u64, offset: u32) -> Result<u32, GicError> {
        let mut val: u32 = 0;
        let mut attr = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
            attr: (packed_affinity(mpidr) << 32) | u64::from(offset),
            addr: &mut val as *mut u32 as u64,
            flags: 0,
        };
        // SAFETY: `addr` points at a live u32, the size KVM writes.
        unsafe { self.fd.get_device_attr(&mut attr) }
            .map_err(|source| GicError::Attr { what: "read redistributor register", source })?;
        Ok(val)
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
            let (en, pend, act) =
                (self.dist_reg(GICD_ISENABLER + word)?, self.dist_reg(GICD_ISPENDR + word)?, self.dist_reg(0x300 + word)?);
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
        self.set_u32(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset), val, "write distributor register")
    }

    fn set_u32(&self, group: u32, attr: u64, val: u32, what: &'static str) -> Result<(), GicError> {
        let a = kvm_device_attr { group, attr, addr: &val as *const u32 as u64, flags: 0 };
        self.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what, source })
    }

    fn set_u64(&self, group: u32, attr: u64, val: u64, what: &'static str) -> Result<(), GicError> {
        let a = kvm_device_attr { group, attr, addr: &val as *const u64 as u64, flags: 0 };
        self.fd.set_device_attr(&a).map_err(|source| GicError::Attr { what, source })
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
