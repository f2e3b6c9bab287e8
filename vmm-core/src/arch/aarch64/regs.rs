//! arm64 KVM register IDs for KVM_GET/SET_ONE_REG, encoded as the KVM API
//! documents them (Documentation/virt/kvm/api.rst, "KVM_SET_ONE_REG").
//! Plain arithmetic, so it is tested on any host.

pub const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
pub const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
pub const KVM_REG_SIZE_MASK: u64 = 0x00f0_0000_0000_0000;
pub const KVM_REG_SIZE_SHIFT: u32 = 52;
pub const KVM_REG_ARM_COPROC_MASK: u64 = 0x0000_0000_0fff_0000;
pub const KVM_REG_ARM_CORE: u64 = 0x0010 << 16;
pub const KVM_REG_ARM_FW: u64 = 0x0014 << 16;
pub const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << 16;

/// ID of a 64-bit core register at `byte_offset` in `struct kvm_regs`.
pub const fn core_reg(byte_offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (byte_offset / 4) as u64
}

/// Byte offsets in `struct kvm_regs` (x0..x30, sp, pc, pstate come first).
pub const fn xreg_offset(n: usize) -> usize {
    n * 8
}
pub const PC_OFFSET: usize = 32 * 8;
pub const PSTATE_OFFSET: usize = 33 * 8;

/// ID of a system register by its encoding.
pub const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

pub const MPIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 5);
pub const MIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 0);

/// The generic timer as KVM exposes it (arch/arm64/include/uapi/asm/kvm.h;
/// CNT and CVAL are swapped there for historical reasons, kept as is).
pub const TIMER_CTL: u64 = sys_reg(3, 3, 14, 3, 1);
pub const TIMER_CNT: u64 = sys_reg(3, 3, 14, 3, 2);
pub const TIMER_CVAL: u64 = sys_reg(3, 3, 14, 0, 2);
pub const PTIMER_CTL: u64 = sys_reg(3, 3, 14, 2, 1);
pub const PTIMER_CNT: u64 = sys_reg(3, 3, 14, 0, 1);
pub const PTIMER_CVAL: u64 = sys_reg(3, 3, 14, 2, 2);

pub const fn is_timer_reg(id: u64) -> bool {
    matches!(id, TIMER_CTL | TIMER_CNT | TIMER_CVAL | PTIMER_CTL | PTIMER_CNT | PTIMER_CVAL)
}

/// The feature ID registers (op0 3, op1 0, CRn 0, CRm 1-7): what a guest
/// may have seen of its CPU, so a migration target must offer the same.
pub const fn is_feature_id_reg(id: u64) -> bool {
    let sys = id & 0xffff;
    let (op0, op1, crn, crm) = ((sys >> 14) & 3, (sys >> 11) & 7, (sys >> 7) & 0xf, (sys >> 3) & 0xf);
    id & KVM_REG_ARM_COPROC_MASK == KVM_REG_ARM64_SYSREG && op0 == 3 && op1 == 0 && crn == 0 && crm >= 1 && crm <= 7
}

/// Size in bytes of the value a register ID names.
pub const fn reg_size(id: u64) -> usize {
    1 << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

/// Register classes, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegClass {
    Core,
    System,
    Firmware,
    Other,
}

pub const fn reg_class(id: u64) -> RegClass {
    match id & KVM_REG_ARM_COPROC_MASK {
        KVM_REG_ARM_CORE => RegClass::Core,
        KVM_REG_ARM64_SYSREG => RegClass::System,
        KVM_REG_ARM_FW => RegClass::Firmware,
        _ => RegClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_kernel_headers() {
        // Values as printed by a C program using <linux/kvm.h> on arm64.
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
        assert_eq!(MIDR_EL1, 0x6030_0000_0013_c000);
        assert_eq!(core_reg(PC_OFFSET), 0x6030_0000_0010_0040);
        assert_eq!(core_reg(xreg_offset(9)), 0x6030_0000_0010_0012);
        assert_eq!(reg_size(MPIDR_EL1), 8);
        assert_eq!(reg_size(0x6040_0000_0010_0054), 16); // a 128-bit FP register
        assert_eq!(reg_class(MPIDR_EL1), RegClass::System);
        assert_eq!(reg_class(core_reg(PC_OFFSET)), RegClass::Core);
        assert_eq!(reg_class(0x6030_0000_0014_0000), RegClass::Firmware);
        // KVM_REG_ARM_TIMER_CNT as <asm/kvm.h> defines it.
        assert_eq!(TIMER_CNT, 0x6030_0000_0013_df1a);
        assert!(is_timer_reg(TIMER_CVAL) && !is_timer_reg(MPIDR_EL1));
        assert!(is_feature_id_reg(sys_reg(3, 0, 0, 4, 0)), "ID_AA64PFR0_EL1");
        assert!(is_feature_id_reg(sys_reg(3, 0, 0, 7, 2)), "ID_AA64MMFR2_EL1");
        assert!(!is_feature_id_reg(MIDR_EL1) && !is_feature_id_reg(MPIDR_EL1));
    }
}
