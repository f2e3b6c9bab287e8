//! arm64 guests: address layout, KVM register encodings, the vGICv3.
pub mod boot;
pub mod fdt;
pub mod layout;
pub mod regs;
#[cfg(target_arch = "aarch64")]
pub mod gic;
#[cfg(target_arch = "aarch64")]
pub mod vcpu;
