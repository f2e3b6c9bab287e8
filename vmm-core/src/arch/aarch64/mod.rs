//! arm64 guests: address layout, KVM register encodings, the vGICv3.
pub mod boot;
pub mod fdt;
#[cfg(target_arch = "aarch64")]
pub mod gic;
pub mod layout;
pub mod regs;
#[cfg(target_arch = "aarch64")]
pub mod vcpu;
