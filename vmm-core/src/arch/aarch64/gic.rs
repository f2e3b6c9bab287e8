//! The in-kernel vGICv3: created through KVM_CREATE_DEVICE, placed at the
//! addresses of [`super::layout`], initialised after every vCPU exists (the
//! order arm-vgic-v3.rst requires), and read back through device attributes.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
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
