//! Basalt's embedded KVM VMM for arm64 guests.
//!
//! The library holds the pieces `basalt-vmm` and the diagnostics share. Code
//! that talks to arm64 KVM only builds for `target_arch = "aarch64"`; the
//! address layout and register encodings are plain data and are unit-tested on
//! any host.

pub mod arch;
pub mod config;
pub mod control;
pub mod devices;
#[cfg(target_arch = "aarch64")]
pub mod kvm_check;
pub mod kvm_stats;
pub mod memory;
pub mod migration;
pub mod persist;
#[cfg(target_arch = "aarch64")]
pub mod vm;
