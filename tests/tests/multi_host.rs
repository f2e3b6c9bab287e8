//! Several emulated arm64 hosts on one bridge inside a private network
//! namespace, each with a virtio-net NIC and a second virtio-blk disk: the
//! shape later migration and failover tests use.

use std::time::Duration;

use basalt_tests::rig::{netns::BRIDGE_ADDR, Arm64Host, Netns};

const DISK_SIZE: u64 = 16 << 20;

fn host_script(me: u8, peer: u8) -> String {
    format!(
        r#"
set -e
# the scratch disk: the only 16 MiB virtio disk
d=""; for b in /sys/block/vd*; do [ "$(cat $b/size)" = "{sectors}" ] && d=/dev/${{b##*/}}; done
[ -n "$d" ] || {{ echo "no scratch disk"; exit 3; }}
echo "basalt-host-{me}-wrote-this" | dd of=$d bs=512 seek=8 conv=sync 2>/dev/null
sync
ip addr show eth0 | grep inet
# wait for the peer (it boots at the same time), then for the bridge
ok=0
for i in $(seq 1 120); do
    if ping -c 1 -W 1 10.77.0.{peer} >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || {{ echo "peer 10.77.0.{peer} unreachable"; exit 4; }}
ping -c 1 -W 2 {bridge} >/dev/null
echo "PEER-REACHED 10.77.0.{peer}"
# stay up a little so the peer's last pings find us
sleep 3
"#,
        sectors = DISK_SIZE / 512,
        bridge = BRIDGE_ADDR,
    )
}

#[test]
fn two_hosts_on_a_bridge_reach_each_other_and_their_disks() {
    let mut ns = Netns::create("basalt-rig").expect("network namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut running = Vec::new();
    let mut disks = Vec::new();
    for (me, peer) in [(11u8, 12u8), (12, 11)] {
        let disk = dir.path().join(format!("scratch-{me}.img"));
        std::fs::File::create(&disk).and_then(|f| f.set_len(DISK_SIZE)).expect("scratch disk");
        let nic = ns.add_host_nic(me).expect("tap");
        let host = Arm64Host::new(&format!("host{me}"))
            .smp(1)
            .memory_mib(512)
            .timeout(Duration::from_secs(300))
            .disk(&disk)
            .nic(nic)
            .script(&host_script(me, peer));
        running.push(host.spawn().expect("spawn host"));
        disks.push((me, disk));
    }
    let outcomes: Vec<_> = running.into_iter().map(|r| r.wait().expect("host runs")).collect();
    for (o, (me, disk)) in outcomes.iter().zip(&disks) {
        o.assert_success();
        assert!(o.command_output().contains("PEER-REACHED"), "{}", o.command_output());
        let bytes = std::fs::read(disk).expect("read scratch disk");
        let want = format!("basalt-host-{me}-wrote-this\n");
        assert_eq!(&bytes[4096..4096 + want.len()], want.as_bytes(), "host {me}'s write reached its disk");
    }
    // The namespace holds the bridge; nothing was created outside it.
    let out = ns.command("ip").args(["-br", "link", "show", "master", "br0"]).output().expect("ip");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2, "two taps on br0");
}
