//! Test support for Basalt: the emulated arm64 host harness ([`rig`]).
//!
//! Real arm64 KVM on an x86_64 build machine: Debian's arm64 kernel boots
//! under `qemu-system-aarch64 -machine virt,virtualization=on,gic-version=3`
//! (TCG), so the kernel inside has a real `/dev/kvm` with a vGICv3. Basalt's
//! arm64 binaries run there.

pub mod controllers;

/// The few messages of etcd's v3 API the controller benchmark's baseline uses.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
pub mod linearizability;
pub mod rig;
