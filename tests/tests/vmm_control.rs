//! basalt-vmm's control socket on a running guest, inside the emulated arm64
//! host: status, counters (KVM's binary stats), vgic-state, pause and resume
//! (the guest's clock-driven output stops and restarts), shutdown — with the
//! console on a pseudo-terminal that carries input to the guest too.

use basalt_tests::rig::{guest, Artifacts};
use serde_json::Value;

const HOST_SCRIPT: &str = r#"
S=/tmp/vm.sock; C=/tmp/console
basalt-vmm --kernel guest/Image --initrd guest/initrd --memory 256 --vcpus 2 \
    --cmdline 'console=ttyS0 panic=-1 quiet' --console pty --control-socket $S &
VMM=$!
for i in $(seq 1 100); do [ -S $S ] && break; sleep 0.1; done
PTY=$(basalt-vmm ctl --socket $S status | sed -n 's/.*"console":"\([^"]*\)".*/\1/p')
echo "PTY $PTY"
cat $PTY > $C &
CAT=$!
for i in $(seq 1 600); do grep -q GUEST-READY $C 2>/dev/null && break; sleep 0.2; done
grep -q GUEST-READY $C || { echo "guest never became ready"; cat $C; exit 5; }
echo "typed-on-the-console" > $PTY
for i in $(seq 1 100); do grep -q GOT-INPUT $C && break; sleep 0.1; done
echo "GUEST-SAID $(grep GOT-INPUT $C)"
ctl() { echo "CTL-$1 $(basalt-vmm ctl --socket $S $1)"; }
ctl status
ctl counters
ctl vgic-state
ctl pause
a=$(wc -c < $C); sleep 3; b=$(wc -c < $C)
echo "PAUSED-GROWTH $((b - a))"
ctl status
ctl resume
sleep 3; c=$(wc -c < $C)
echo "RESUMED-GROWTH $((c - b))"
echo "CTL-bogus $(basalt-vmm ctl --socket $S reboot-now)"
echo "CTL-badsave $(basalt-vmm ctl --socket $S save)"
ctl migrate-cancel
echo "CTL-receive $(basalt-vmm ctl --socket $S migrate-receive --args '{"listen":"0.0.0.0:7000"}')"
ctl status
ctl shutdown
wait $VMM; rc=$?
kill $CAT 2>/dev/null
echo "VMM-EXIT rc=$rc"
exit $rc
"#;

fn ctl(text: &str, name: &str) -> Vec<Value> {
    let prefix = format!("CTL-{name} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("{name}: {e}: {j}")))
        .collect()
}

fn growth(text: &str, key: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key}"))
}

#[test]
fn control_socket_status_counters_vgic_pause_resume_shutdown() {
    let arts = Artifacts::locate().expect("rig artifacts");
    let out = guest::vmm_host(&arts, "vmm-control", "echo GUEST-READY\nread -t 60 line\necho \"GOT-INPUT $line\"\ni=0\nwhile [ $i -lt 400 ]; do echo TICK $i; i=$((i+1)); sleep 0.1; done")
        .expect("VMM host")
        .script(HOST_SCRIPT)
        .run()
        .expect("host runs");
    out.assert_success();
    let text = out.command_output();

    assert!(text.contains("PTY /dev/pts/"), "{text}");
    assert!(text.contains("GUEST-SAID GOT-INPUT typed-on-the-console"), "console input reaches the guest: {text}");
    let status = &ctl(text, "status")[0];
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["state"], "running");
    assert_eq!(status["result"]["vcpus"], 2);

    let counters = &ctl(text, "counters")[0]["result"];
    let vcpus = counters["vcpus"].as_array().expect("per-vCPU counters");
    assert_eq!(vcpus.len(), 2);
    for v in vcpus {
        let kvm = &v["kvm"];
        assert!(kvm["exits"].as_u64().unwrap_or(0) > 0, "KVM exits > 0: {v}");
        assert!(kvm.get("mmio_exit_user").is_some() && kvm.get("wfi_exit_stat").is_some(), "{v}");
    }
    assert!(vcpus[0]["mmio_exits_handled"].as_u64().unwrap_or(0) > 0, "the console is MMIO");
    assert!(counters["serial_tx_bytes"].as_u64().unwrap_or(0) > 10);

    let irqs = ctl(text, "vgic-state")[0]["result"]["irqs"].as_array().expect("irqs").clone();
    for cpu in ["vcpu0", "vcpu1"] {
        let timer = irqs.iter().find(|i| i["intid"] == 27 && i["target"] == cpu).expect("PPI 27");
        assert_eq!(timer["kind"], "PPI");
        assert_eq!(timer["enabled"], true, "the guest enabled its virtual timer on {cpu}: {timer}");
    }
    let serial = irqs.iter().find(|i| i["intid"] == 32).expect("serial SPI");
    assert_eq!(serial["kind"], "SPI");

    assert_eq!(ctl(text, "pause")[0]["ok"], true);
    assert_eq!(growth(text, "PAUSED-GROWTH "), 0, "a paused guest prints nothing");
    assert_eq!(ctl(text, "status")[1]["result"]["state"], "paused");
    assert_eq!(ctl(text, "resume")[0]["ok"], true);
    assert!(growth(text, "RESUMED-GROWTH ") > 0, "the guest runs again after resume");
    let bogus = &ctl(text, "bogus")[0];
    assert_eq!(bogus["ok"], false);
    assert!(bogus["error"].as_str().unwrap_or("").contains("unknown command"), "{bogus}");
    let badsave = &ctl(text, "badsave")[0];
    assert_eq!(badsave["ok"], false, "save without a path is refused: {badsave}");
    assert!(badsave["error"].as_str().unwrap_or("").contains("path"), "{badsave}");
    // Migration commands that do not apply to a running VM change nothing.
    let cancel = &ctl(text, "migrate-cancel")[0];
    assert_eq!(cancel["ok"], false, "{cancel}");
    assert!(cancel["error"].as_str().unwrap_or("").contains("no migration of this VM is under way"), "{cancel}");
    let receive = &ctl(text, "receive")[0];
    assert_eq!(receive["ok"], false, "{receive}");
    assert!(receive["error"].as_str().unwrap_or("").contains("this VM is running"), "{receive}");
    assert_eq!(ctl(text, "status")[2]["result"]["state"], "running", "still running after the refusals");
    assert_eq!(ctl(text, "shutdown")[0]["ok"], true);
    assert!(text.contains("VMM-EXIT rc=0"), "{text}");
}
