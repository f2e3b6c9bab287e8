//! arm64 vCPU setup: KVM_ARM_VCPU_INIT on the host's preferred target with
//! PSCI 0.2 (secondaries start powered off and are woken by the guest's
//! PSCI CPU_ON, which KVM handles), and the boot register state of
//! Documentation/arm64/booting.rst for the boot vCPU.

use kvm_bindings::{kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2};
use kvm_ioctls::{VcpuFd, VmFd};

use super::regs;

/// EL1h with D, A, I and F masked: how Linux expects to be entered.
const PSTATE_EL1H_ALL_MASKED: u64 = 0x3c5;

pub fn init(vm: &VmFd, vcpu: &VcpuFd, id: u32) -> Result<(), kvm_ioctls::Error> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if id > 0 {
        kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    vcpu.vcpu_init(&kvi)
}

pub fn set_boot_regs(vcpu: &VcpuFd, entry: u64, fdt: u64) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_one_reg(regs::core_reg(regs::PSTATE_OFFSET), &PSTATE_EL1H_ALL_MASKED.to_le_bytes())?;
    vcpu.set_one_reg(regs::core_reg(regs::PC_OFFSET), &entry.to_le_bytes())?;
    vcpu.set_one_reg(regs::core_reg(regs::xreg_offset(0)), &fdt.to_le_bytes())?;
    Ok(())
}

pub fn mpidr(vcpu: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    let mut b = [0u8; 8];
    vcpu.get_one_reg(regs::MPIDR_EL1, &mut b)?;
    Ok(u64::from_le_bytes(b))
}
