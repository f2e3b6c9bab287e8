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
    }
}
