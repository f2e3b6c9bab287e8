//! basalt-vmm boots Debian's arm64 kernel with a small initramfs, inside the
//! emulated arm64 host (real KVM, real vGICv3), with 1 and 2 vCPUs, and exits
//! 0 when the guest powers off.

use std::time::Duration;

use basalt_tests::rig::{guest, Arm64Host, Artifacts};

fn boot(vcpus: u32) {
    let arts = Artifacts::locate().expect("rig artifacts");
    let initrd = guest::initramfs(&arts, "echo BASALT-GUEST-INIT-OK cpus=$(nproc) mem=$(grep MemTotal /proc/meminfo | tr -s ' ')")
        .expect("guest initramfs");
    let out = Arm64Host::new(&format!("vmm-boot-{vcpus}"))
        .memory_mib(1536)
        .timeout(Duration::from_secs(900))
        .arm64_bin(&arts, "basalt-vmm")
        .expect("arm64 basalt-vmm")
        .file("guest/Image", guest::kernel(&arts).expect("kernel"), 0o644)
        .file("guest/initrd", initrd, 0o644)
        .script(&format!(
            "t0=$(cut -d' ' -f1 /proc/uptime)\n\
             basalt-vmm --kernel guest/Image --initrd guest/initrd --memory 256 --vcpus {vcpus} \
               --cmdline 'console=ttyS0 panic=-1 quiet'\n\
             rc=$?\n\
             echo \"VMM-EXIT rc=$rc after $(cut -d' ' -f1 /proc/uptime) (started $t0)\"\n\
             exit $rc"
        ))
        .run()
        .expect("host runs");
    out.assert_success();
    let text = out.command_output();
    assert!(text.contains(&format!("BASALT-GUEST-INIT-OK cpus={vcpus}")), "{text}");
    assert!(text.contains("basalt-vmm: the guest powered off"), "{text}");
    assert!(text.contains("VMM-EXIT rc=0"), "{text}");
}

#[test]
fn boots_linux_with_one_vcpu() {
    boot(1);
}

#[test]
fn boots_linux_with_two_vcpus() {
    boot(2);
}
