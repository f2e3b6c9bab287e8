//! Real arm64 KVM inside the emulated arm64 host: `basalt-kvm-check` creates
//! a VM, guest memory, a PSCI 0.2 vCPU and a vGICv3, runs guest code to an
//! MMIO write and PSCI SYSTEM_OFF, and reads back registers and the
//! distributor. Without KVM in the host kernel it must fail, and say why.

use basalt_tests::rig::{Arm64Host, Artifacts};

fn kvm_check_host(name: &str) -> Arm64Host {
    let arts = Artifacts::locate().expect("rig artifacts");
    Arm64Host::new(name)
        .arm64_bin(&arts, "basalt-kvm-check")
        .expect("arm64 basalt-kvm-check")
        .script("ls -l /dev/kvm; basalt-kvm-check")
}

#[test]
fn kvm_check_runs_a_guest_with_vgicv3_in_the_emulated_host() {
    let out = kvm_check_host("kvm-check").run().expect("host runs");
    out.assert_success();
    let text = out.command_output();
    // The guest's one-byte store to the serial window, and its power-off.
    assert!(text.contains("MMIO write addr=0x9000000 data=[42]"), "{text}");
    assert!(text.contains("PSCI SYSTEM_OFF: yes"), "{text}");
    // Register list: a real vCPU exposes dozens of registers, all readable.
    let line = text.lines().find(|l| l.starts_with("REG_LIST")).expect("REG_LIST line");
    let field = |k: &str| -> u64 {
        let v = line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {line}"));
        v.parse().unwrap_or_else(|_| panic!("{k}{v}"))
    };
    let (n, core, sys, readable) = (field("n="), field("core="), field("sysreg="), field("readable="));
    assert!(n >= 100 && core >= 34 && sys >= 50, "{line}");
    assert_eq!(readable, n, "every listed register reads back: {line}");
    // Distributor state set through device attributes, read back.
    assert!(text.contains("ITLinesNumber 1 -> 64 IRQs"), "{text}");
    assert!(text.contains("basalt-kvm-check: PASS"), "{text}");
}

#[test]
fn kvm_check_fails_clearly_when_the_host_kernel_has_no_kvm() {
    let out = kvm_check_host("no-kvm").kernel_arg("kvm-arm.mode=none").run().expect("host runs");
    assert!(!out.timed_out, "host timed out");
    assert_eq!(out.exit_code, Some(1), "console:\n{}", out.console);
    let text = out.command_output();
    assert!(text.contains("basalt-kvm-check: FAIL: cannot open /dev/kvm"), "{text}");
    assert!(text.contains("kvm-arm.mode=none"), "the message names the likely cause: {text}");
}
