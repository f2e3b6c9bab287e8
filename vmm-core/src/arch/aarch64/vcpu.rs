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

vmm_sys_util::ioctl_iowr_nr!(KVM_GET_REG_LIST, kvm_bindings::KVMIO, 0xb0, kvm_bindings::kvm_reg_list);

/// Every register id KVM lists for this vCPU. The list's length depends on
/// the host (SVE, PMU, new ID registers) and may exceed kvm-bindings' fixed
/// 500-entry `RegList`: ask KVM for the count first (it answers E2BIG with
/// the count filled in), then for the list.
pub fn reg_list(vcpu: &VcpuFd) -> Result<Vec<u64>, kvm_ioctls::Error> {
    let mut n = 0u64;
    loop {
        // struct kvm_reg_list { __u64 n; __u64 reg[]; } in one buffer.
        let mut buf = vec![0u64; n as usize + 1];
        buf[0] = n;
        // SAFETY: a vCPU fd; `buf` holds the header and room for `n` ids,
        // which is what `n` tells KVM it may write.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ptr(vcpu, KVM_GET_REG_LIST(), buf.as_mut_ptr()) };
        if r == 0 {
            let got = buf[0] as usize;
            buf.truncate(got + 1);
            buf.remove(0);
            return Ok(buf);
        }
        let e = kvm_ioctls::Error::last();
        if e.errno() != libc::E2BIG || buf[0] <= n {
            return Err(e);
        }
        n = buf[0];
    }
}

/// The order registers are written back in: core registers, then the
/// firmware pseudo-registers (they select PSCI/SMCCC behaviour), then the
/// timer registers, then every other system register.
fn restore_rank(id: u64) -> u8 {
    match regs::reg_class(id) {
        regs::RegClass::Core => 0,
        regs::RegClass::Firmware => 1,
        _ if regs::is_timer_reg(id) => 2,
        regs::RegClass::System => 3,
        regs::RegClass::Other => 4,
    }
}

/// Writes `state`'s registers (but those in `skip`) in [`restore_rank`]
/// order, then the power state.
pub fn restore_regs(vcpu: &VcpuFd, state: &crate::persist::VcpuState, skip: &[u64]) -> Result<(), kvm_ioctls::Error> {
    let mut order: Vec<&(u64, Vec<u8>)> = state.regs.iter().filter(|(id, _)| !skip.contains(id)).collect();
    order.sort_by_key(|(id, _)| restore_rank(*id));
    for (id, value) in order {
        if value.len() != regs::reg_size(*id) {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        vcpu.set_one_reg(*id, value)?;
    }
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: state.mp_state })
}

/// Saves every register KVM lists for this vCPU (which must not be
/// running), but takes the feature ID registers found in `known` from there
/// instead of asking KVM: they are the same for every vCPU of a VM and never
/// change once it runs, and each read is an ioctl in a migration's downtime.
pub fn save_knowing(vcpu: &VcpuFd, known: &[(u64, u64)]) -> Result<crate::persist::VcpuState, kvm_ioctls::Error> {
    let ids = reg_list(vcpu)?;
    let mut saved = Vec::with_capacity(ids.len());
    for id in ids {
        let value = known.iter().find(|(k, _)| *k == id && regs::is_feature_id_reg(id) && regs::reg_size(id) == 8);
        let buf = match value {
            Some((_, v)) => v.to_le_bytes().to_vec(),
            None => {
                let mut buf = vec![0u8; regs::reg_size(id)];
                vcpu.get_one_reg(id, &mut buf)?;
                buf
            }
        };
        saved.push((id, buf));
    }
    Ok(crate::persist::VcpuState {
        version: crate::persist::STATE_VERSION,
        mpidr: mpidr(vcpu)?,
        regs: saved,
        mp_state: vcpu.get_mp_state()?.mp_state,
    })
}

impl crate::persist::Persist for VcpuFd {
    type State = crate::persist::VcpuState;
    type Error = kvm_ioctls::Error;

    /// Reads every register KVM lists for this vCPU; the vCPU must not be running.
    fn save(&self) -> Result<Self::State, Self::Error> {
        save_knowing(self, &[])
    }

    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        restore_regs(self, state, &[])
    }
}
