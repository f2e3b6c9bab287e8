//! A guest that reboots (PSCI SYSTEM_RESET) is restarted by basalt-vmm in the
//! same process: it boots a second time, remembers on its disk that it
//! already rebooted, and powers off; the VMM then exits 0.

use basalt_tests::rig::{guest, Artifacts};

const GUEST: &str = r#"
if [ "$(head -c 7 /dev/vda)" = "REBOOTED" ] || [ "$(head -c 8 /dev/vda)" = "REBOOTED" ]; then
  echo "SECOND-BOOT"
else
  echo "FIRST-BOOT"
  echo REBOOTED | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
  reboot -f
fi
"#;

#[test]
fn a_rebooting_guest_is_restarted_then_powers_off() {
    let arts = Artifacts::locate().expect("rig artifacts");
    let out = guest::vmm_host(&arts, "vmm-reset", GUEST)
        .expect("VMM host")
        .script(
            "dd if=/dev/zero of=/tmp/disk bs=1M count=4 2>/dev/null\n\
             basalt-vmm --kernel guest/Image --initrd guest/initrd --memory 256 --disk /tmp/disk \
               --cmdline 'console=ttyS0 panic=-1 quiet'\n\
             rc=$?; echo \"VMM-EXIT rc=$rc\"; exit $rc",
        )
        .run()
        .expect("host runs");
    out.assert_success();
    let text = out.command_output();
    let first = text.find("FIRST-BOOT").expect("first boot");
    let reset = text.find("the guest asked for a reset").expect("reset seen by the VMM");
    let second = text.find("SECOND-BOOT").expect("second boot");
    assert!(first < reset && reset < second, "{text}");
    assert!(text.contains("basalt-vmm: the guest powered off"), "{text}");
    assert!(text.contains("VMM-EXIT rc=0"), "{text}");
}
