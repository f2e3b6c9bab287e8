//! Binaries that link librbd cannot be static: the emulated host carries the
//! matching arm64 shared libraries on a read-only disk. A dynamically linked
//! Basalt binary runs there, and librbd's whole dependency tree resolves.

use basalt_tests::rig::{Arm64Host, Artifacts};

#[test]
fn dynamic_binaries_and_librbd_resolve_from_the_libs_disk() {
    let arts = Artifacts::locate().expect("rig artifacts");
    let out = Arm64Host::new("libs")
        .libs(&arts)
        .expect("libs disk")
        .arm64_dynamic_bin(&arts, "basalt-kvm-check")
        .expect("dynamic basalt-kvm-check")
        .script(
            "set -e\n\
             L=/usr/lib/aarch64-linux-gnu\n\
             /lib/ld-linux-aarch64.so.1 --list $L/librbd.so.1 > /tmp/deps\n\
             cat /tmp/deps\n\
             ! grep -q 'not found' /tmp/deps\n\
             grep -q 'librados.so.2 => ' /tmp/deps\n\
             grep -q 'libceph-common.so.2 => ' /tmp/deps\n\
             basalt-kvm-check",
        )
        .run()
        .expect("host runs");
    out.assert_success();
    let text = out.command_output();
    assert!(text.contains("arm64 libraries from /dev/vd"), "{text}");
    assert!(text.contains("basalt-kvm-check: PASS"), "{text}");
}

#[test]
fn without_the_libs_disk_a_dynamic_binary_cannot_start() {
    // The negative control: the test above is only meaningful if the base
    // initramfs alone cannot run dynamic binaries.
    let arts = Artifacts::locate().expect("rig artifacts");
    let out = Arm64Host::new("nolibs")
        .arm64_dynamic_bin(&arts, "basalt-kvm-check")
        .expect("dynamic basalt-kvm-check")
        .script("basalt-kvm-check")
        .run()
        .expect("host runs");
    assert!(!out.timed_out);
    assert_ne!(out.exit_code, Some(0), "{}", out.console);
    assert!(!out.console.contains("basalt-kvm-check: PASS"));
}
