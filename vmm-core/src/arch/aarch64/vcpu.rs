//! arm64 vCPU setup: KVM_ARM_VCPU_INIT on the host's preferred target with
//! PSCI 0.2 (secondaries start powered off and are woken by the guest's
//! PSCI CPU_ON, which KVM handles), and the boot register state of
//! Documentation/arm64/booting.rst for the boot vCPU.

use kvm_bindings::{kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2};
use kvm_ioctls::{VcpuFd, VmFd};

use super::regs;

/// EL1h with D, A, I and F masked: how Linux expects to be entered.
const PSTATE_EL1H_ALL_MASKED: u64 = 0x3c5;

/// Initialises vCPU `id`; returns the target KVM chose (for reports).
pub fn init(vm: &VmFd, vcpu: &VcpuFd, id: u32) -> Result<u32, kvm_ioctls::Error> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if id > 0 {
        kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    vcpu.vcpu_init(&kvi)?;
    Ok(kvi.target)
}

pub fn set_boot_regs(vcpu: &VcpuFd, entry: u64, fdt: u64) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_one_reg(regs::core_reg(regs::PSTATE_OFFSET), &PSTATE_EL1H_ALL_MASKED.to_le_bytes())?;
    vcpu.set_one_reg(regs::core_reg(regs::PC_OFFSET), &entry.to_le_bytes())?;
    vcpu.set_one_reg(regs::core_reg(regs::xreg_offset(0)), &fdt.to_le_bytes())?;
    Ok(())
}

/// Reads a 64-bit register by its KVM id.
pub fn read_u64(vcpu: &VcpuFd, id: u64) -> Result<u64, kvm_ioctls::Error> {
    let mut b = [0u8; 8];
    vcpu.get_one_reg(id, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn mpidr(vcpu: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    read_u64(vcpu, regs::MPIDR_EL1)
}

impl crate::persist::Persist for VcpuFd {
    type State = crate::persist::VcpuState;
    type Error = kvm_ioctls::Error;

    /// Reads every register KVM lists for this vCPU; the vCPU must not be running.
    fn save(&self) -> Result<Self::State, Self::Error> {
        let mut list = kvm_bindings::RegList::new(500).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        self.get_reg_list(&mut list)?;
        let mut regs = Vec::with_capacity(list.as_slice().len());
        for &id in list.as_slice() {
            let mut buf = vec![0u8; regs::reg_size(id)];
            self.get_one_reg(id, &mut buf)?;
            regs.push((id, buf));
        }
        Ok(crate::persist::VcpuState {
            version: crate::persist::STATE_VERSION,
            mpidr: mpidr(self)?,
            regs,
            mp_state: self.get_mp_state()?.mp_state,
        })
    }

    /// Writes the registers back in the order they were listed (core, then
    /// system and timer registers, then firmware), then the power state.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        for (id, value) in &state.regs {
            if value.len() != regs::reg_size(*id) {
                return Err(kvm_ioctls::Error::new(libc::EINVAL));
            }
            self.set_one_reg(*id, value)?;
        }
        self.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: state.mp_state })
    }
}
