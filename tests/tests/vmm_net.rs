//! basalt-vmm's virtio-net on real taps, inside an emulated arm64 host (real
//! KVM): two VMs, each with a NIC on its own tap, the taps on one Linux
//! bridge in the host. The guests see the MACs they were given, ping each
//! other, and one sends 16 MiB of random bytes to the other over TCP (the
//! guests' checksum and segmentation offloads on, through the taps' virtio-
//! net headers); the receiver's checksum matches the sender's. The receiver
//! gets its address by DHCP from its own VMM (`--nic ...,ip=`). The host
//! reads the sender's NIC counters.

use basalt_tests::rig::{guest, Artifacts};

/// Two roles from the kernel command line: `a` sends, `b` receives.
const GUEST: &str = r#"
role=$(sed -n 's/.*basalt.role=\([a-z]*\).*/\1/p' /proc/cmdline)
ip=$(sed -n 's/.*basalt.ip=\([0-9a-z./]*\).*/\1/p' /proc/cmdline)
ip link set lo up
ip link set eth0 up
if [ "$ip" = dhcp ] || [ -z "$ip" ]; then
    # B asks its VMM, which answers with the lease its --nic flag gives.
    printf '#!/bin/sh\n[ "$1" = bound ] && ifconfig "$interface" "$ip" netmask "$subnet" up && echo "DHCP-BOUND $ip/$subnet router=$router host=$hostname"\nexit 0\n' > /tmp/dhcp.sh
    chmod +x /tmp/dhcp.sh
    udhcpc -i eth0 -s /tmp/dhcp.sh -q -n -t 10 -T 2 2>/dev/null || echo "DHCP-FAILED"
    ip=$(ip -4 addr show eth0 | sed -n 's/.*inet \([0-9./]*\).*/\1/p')
else
    ip addr add "$ip" dev eth0
fi
echo "NIC $role mac=$(cat /sys/class/net/eth0/address) ip=$ip"
if [ "$role" = a ]; then
    i=0
    until ping -c 1 -W 1 10.9.0.3 >/dev/null 2>&1; do
        i=$((i+1)); [ $i -gt 120 ] && { echo "PING-FAILED"; break; }
    done
    ping -c 3 10.9.0.3 | grep -q ' 0% packet loss' && echo "PING-OK"
    dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null
    echo "SENT-MD5 $(md5sum < /tmp/blob | cut -c1-32)"
    i=0
    until nc -w 5 10.9.0.3 5000 < /tmp/blob; do
        i=$((i+1)); [ $i -gt 30 ] && { echo "SEND-FAILED"; break; }; sleep 1
    done
    echo "SENT-DONE"
    sleep 4 # for the host to read this VMM's counters
else
    nc -l -p 5000 > /tmp/got
    echo "RECV-MD5 $(md5sum < /tmp/got | cut -c1-32) bytes=$(wc -c < /tmp/got)"
    # Stay until the sender has seen its pings answered and its send close.
    sleep 2
fi
"#;

const HOST: &str = r#"
for m in llc stp bridge tun; do insmod /basalt/mod/$m.ko || echo "HOST: insmod $m failed"; done
brctl addbr br0 && ip link set br0 up
for t in ta tb; do tunctl -t $t >/dev/null && brctl addif br0 $t && ip link set $t up; done
run() {
    basalt-vmm --kernel guest/Image --initrd guest/initrd --memory 256 \
        --cmdline "console=ttyS0 panic=-1 quiet basalt.role=$1 basalt.ip=$2" \
        --nic "$3,$4" --console "file:/tmp/$1.log" --control-socket /tmp/$1.sock &
}
run b dhcp tb 52:54:00:00:0b:02,ip=10.9.0.3/24,gw=10.9.0.1,hostname=vm-b; pb=$!
run a 10.9.0.2/24 ta 52:54:00:00:0a:01; pa=$!
# The counters, read while the VMs still run (B waits for A's transfer).
i=0; while [ $i -lt 3000 ] && ! grep -q SENT-DONE /tmp/a.log 2>/dev/null; do sleep 0.3; i=$((i+1)); done
echo "COUNTERS-A $(basalt-vmm ctl --socket /tmp/a.sock counters)"
wait $pa; ra=$?; wait $pb; rb=$?
echo "--- guest a"; cat /tmp/a.log; echo "--- guest b"; cat /tmp/b.log
echo "VMM-EXIT a=$ra b=$rb"
"#;

#[test]
fn two_guests_on_taps_and_a_bridge_ping_and_move_16_mib_intact() {
    let arts = Artifacts::locate().expect("rig artifacts");
    let host = guest::vmm_host(&arts, "vmm-net", GUEST).expect("VMM host").script(HOST);
    let host = guest::with_modules(host, &arts, &guest::BRIDGE_MODULES).expect("modules");
    let out = host.run().expect("host runs");
    out.assert_success();
    let text = out.command_output();
    assert!(!text.contains("HOST: insmod"), "host modules load: {text}");
    assert!(text.contains("NIC a mac=52:54:00:00:0a:01 ip=10.9.0.2/24"), "the guest sees its MAC: {text}");
    assert!(
        text.contains("DHCP-BOUND 10.9.0.3/255.255.255.0 router=10.9.0.1 host=vm-b"),
        "B's VMM answered its DHCP: {text}"
    );
    assert!(text.contains("NIC b mac=52:54:00:00:0b:02 ip=10.9.0.3/24"), "{text}");
    assert!(text.contains("PING-OK"), "the guests reach each other: {text}");
    let sent = text.lines().find_map(|l| l.strip_prefix("SENT-MD5 ")).map(str::trim).expect("sender's checksum");
    let recv = text.lines().find_map(|l| l.strip_prefix("RECV-MD5 ")).expect("receiver's checksum");
    assert_eq!(sent.len(), 32, "{text}");
    assert_eq!(recv.trim(), format!("{sent} bytes={}", 16 << 20), "16 MiB arrived intact: {text}");
    assert!(text.contains("VMM-EXIT a=0 b=0"), "both guests powered off: {text}");
    let counters = text.lines().find_map(|l| l.strip_prefix("COUNTERS-A ")).expect("counters");
    let c: serde_json::Value = serde_json::from_str(counters).expect("counters JSON");
    let net = &c["result"]["nics"][0]["net"];
    assert!(net["tx_bytes"].as_u64().is_some_and(|b| b >= 16 << 20), "A sent the bytes through its NIC: {net}");
    assert!(net["rx_frames"].as_u64().is_some_and(|n| n > 0), "{net}");
    assert_eq!(net["tx_bad_chains"], 0, "{net}");
    assert_eq!(net["dhcp_replies"], 0, "A has no lease to give: {net}");
}
