//! Guest-to-guest network benchmark (not a test): TCP throughput and ping
//! round-trip time between two guests, through basalt-vmm's virtio-net and
//! through QEMU's (`-netdev tap,vhost=off -device virtio-net-device`: the
//! same virtio-mmio transport, the same taps, in user space like ours), in
//! the same pair of emulated arm64 hosts, in one run. Same guest kernel and
//! initramfs, 1 vCPU and 256 MiB each. Two placements: the guests on the
//! two hosts (their taps on a bridge with each host's NIC, so frames cross
//! the rig's bridge), and both guests on one host's bridge (only the two
//! VMMs' datapaths and the host kernel between them). Prints per-round
//! numbers, medians and the ratios basalt/qemu (the networking issue's
//! goal: throughput >= 1.0x QEMU's, latency <= 1.0x).
//!
//! First, as root: deploy/cross/build; deploy/arm64-host/build-initramfs;
//! deploy/arm64-host/build-qemudisk. Then:
//!   CARGO_TARGET_DIR=/var/cache/basalt/target cargo bench -p basalt-tests --bench vmm_net
//! Env: BENCH_ROUNDS (rounds per VMM and placement, default 3), BENCH_MIB
//! (bytes per transfer, default 64).
//!
//! Method: the sender guest waits until the receiver answers a ping, warms
//! up with 5 pings, then sends 50 pings 100 ms apart (busybox ping's
//! average is the latency) and streams BENCH_MIB MiB of zeros through
//! busybox nc; its own /proc/uptime around the stream gives the time.
//! Rounds alternate which VMM goes first. Both VMs of a round run on the
//! same VMM.

use std::time::Duration;

mod common;
use common::{alternating, comparison_row, env_u32, field, median, qemu_disk};

use basalt_tests::rig::{guest, Arm64Host, Artifacts, Netns};

const GUEST: &str = r#"
arg() { sed -n "s/.*basalt.$1=\([0-9a-z./]*\).*/\1/p" /proc/cmdline; }
role=$(arg role); peer=$(arg peer); mib=$(arg mib)
ip link set lo up
ip link set eth0 up && ip addr add "$(arg ip)" dev eth0
if [ "$role" = send ]; then
    i=0; until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 600 ] && break; done
    ping -c 5 -i 0.2 "$peer" >/dev/null 2>&1
    rtt=$(ping -c 50 -i 0.1 "$peer" | sed -n 's/.*= [0-9.]*\/\([0-9.]*\)\/.*/\1/p')
    i=0; read -r a _ < /proc/uptime
    until dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null | nc -w 5 "$peer" 5001; do
        i=$((i+1)); [ $i -gt 30 ] && break; sleep 1; read -r a _ < /proc/uptime
    done
    read -r b _ < /proc/uptime
    echo "BENCH-NET rtt_avg_ms=${rtt:--} secs=$(echo "$b $a" | awk '{print $1 - $2}') mib=$mib tries=$i"
else
    nc -l -p 5001 > /dev/null
fi
"#;

const COMMON: &str = r#"
set -u
for m in llc stp bridge tun; do insmod /basalt/mod/$m.ko || echo "BENCH: insmod $m failed"; done
q=
for d in /dev/vd?; do
    [ -b "$d" ] || continue
    [ "$(dd if="$d" bs=1 skip=1144 count=11 2>/dev/null)" = basalt-qemu ] && q=$d
done
[ -n "$q" ] || { echo "BENCH: no disk labelled basalt-qemu"; exit 1; }
mkdir -p /qemu && mount -t ext4 -o ro "$q" /qemu || exit 1
L=/qemu/usr/lib/aarch64-linux-gnu
QEMU="$L/ld-linux-aarch64.so.1 --library-path $L /qemu/usr/bin/qemu-system-aarch64"
# The VMs' taps and the host's NIC on one bridge.
brctl addbr br0 && brctl addif br0 eth0 && ip link set br0 up
for t in ts tr; do tunctl -t $t >/dev/null && brctl addif br0 $t && ip link set $t up; done
vm() { # vmm name tap mac args
    C=/tmp/con-$2; : > $C
    if [ $1 = basalt ]; then
        basalt-vmm --kernel guest/Image --initrd guest/initrd --memory 256 --vcpus 1 \
            --cmdline "console=ttyS0 panic=-1 quiet $5" --nic "$3,$4" --console file:$C 2>/tmp/vmm-$2.log &
    else
        $QEMU -accel kvm -M virt,gic-version=3 -cpu host -smp 1 -m 256 -nodefaults -display none \
            -serial file:$C -kernel guest/Image -initrd guest/initrd -append "console=ttyAMA0 panic=-1 quiet $5" \
            -netdev tap,id=n0,ifname=$3,script=no,downscript=no,vhost=off \
            -device virtio-net-device,netdev=n0,mac=$4 > /tmp/vmm-$2.log 2>&1 &
    fi
}
"#;

/// Host A: the sender of every round, and the receiver of same-host rounds.
const HOST_A: &str = r#"
send() { # placement vmm round
    if [ $1 = same ]; then
        vm $2 r tr 52:54:00:91:00:02 "basalt.role=recv basalt.ip=10.91.0.2/24"; pr=$!
        net=10.91.0
    else
        net=10.90.0
    fi
    vm $2 s ts 52:54:00:90:00:01 "basalt.role=send basalt.ip=$net.1/24 basalt.peer=$net.2 basalt.mib=MIB"
    wait $!; rc=$?
    [ $1 = same ] && wait $pr
    l=$(grep -a BENCH-NET /tmp/con-s | tr -d '\r')
    echo "BENCH-ROUND placement=$1 vmm=$2 round=$3 rc=$rc ${l#*BENCH-NET }"
    [ -n "$l" ] || sed 's/^/BENCH-STDERR: /' /tmp/vmm-s.log | tail -20
}
"#;

/// Host B: the receiver of cross-host rounds.
const HOST_B: &str = r#"
send() { # placement vmm round
    [ $1 = cross ] || return 0
    vm $2 r tr 52:54:00:90:00:02 "basalt.role=recv basalt.ip=10.90.0.2/24"
    wait $!
}
"#;

struct Round {
    vmm: String,
    placement: String,
    rtt_ms: Option<f64>,
    mib_s: Option<f64>,
}

fn main() {
    let rounds = env_u32("BENCH_ROUNDS", 3);
    let mib = env_u32("BENCH_MIB", 64);
    let arts = Artifacts::locate().expect("rig artifacts");
    let qemu_disk = qemu_disk(&arts);
    let initrd = guest::initramfs(&arts, GUEST).expect("initrd");
    let plan: Vec<String> =
        alternating(rounds, &["cross", "same"]).iter().map(|(v, p, r)| format!("{p} {v} {r}")).collect();
    let mut ns = Netns::create("basalt-nbench").expect("network namespace");
    let started = std::time::Instant::now();
    let mut running = Vec::new();
    for (me, body) in [(11u8, HOST_A), (12, HOST_B)] {
        let steps: String = plan.iter().map(|p| format!("send {p}\n")).collect();
        let script = format!("{COMMON}\n{body}\n{steps}umount /qemu 2>/dev/null\n").replace("MIB", &mib.to_string());
        let host = Arm64Host::new(&format!("nbench{me}"))
            .memory_mib(2048)
            .timeout(Duration::from_secs(900 + 600 * u64::from(rounds)))
            .nic(ns.add_host_nic(me).expect("tap"))
            .arm64_bin(&arts, "basalt-vmm")
            .expect("basalt-vmm")
            .file("guest/Image", guest::kernel(&arts).expect("kernel"), 0o644)
            .file("guest/initrd", initrd.clone(), 0o644)
            .read_only_disk(&qemu_disk)
            .script(&script);
        let host = guest::with_modules(host, &arts, &guest::BRIDGE_MODULES).expect("modules");
        running.push(host.spawn().expect("spawn host"));
    }
    let outs: Vec<_> = running.into_iter().map(|r| r.wait().expect("host runs")).collect();
    let a = outs[0].command_output();
    let mut all = Vec::new();
    for line in a.lines() {
        let Some(r) = line.split("BENCH-ROUND ").nth(1) else { continue };
        let kv = |k: &str| field(r, k);
        let secs: Option<f64> = kv("secs").parse().ok().filter(|s: &f64| *s > 0.0);
        let ok = kv("tries") == "0";
        all.push(Round {
            vmm: kv("vmm"),
            placement: kv("placement"),
            rtt_ms: kv("rtt_avg_ms").parse().ok(),
            mib_s: secs.filter(|_| ok).map(|s| f64::from(mib) / s),
        });
        println!("- {r}");
    }
    for line in
        a.lines().chain(outs[1].command_output().lines()).filter(|l| l.contains("BENCH-STDERR") || l.contains("BENCH:"))
    {
        println!("    {line}");
    }
    println!(
        "\n### Guest-to-guest network, {rounds} rounds per VMM and placement, {mib} MiB per transfer, whole run {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    println!("| placement | metric | basalt-vmm (median) | qemu (median) | ratio basalt/qemu |");
    println!("|---|---|---|---|---|");
    for p in ["cross", "same"] {
        let metrics: [(&str, fn(&Round) -> Option<f64>); 2] =
            [("TCP throughput, MiB/s", |r| r.mib_s), ("ping round trip, ms", |r| r.rtt_ms)];
        for (name, f) in metrics {
            let med = |v: &str| median(all.iter().filter(|r| r.vmm == v && r.placement == p).filter_map(f).collect());
            let place = if p == "cross" { "two hosts" } else { "one host" };
            println!("{}", comparison_row(&[place, name], med("basalt"), med("qemu"), 2));
        }
    }
    println!("\nGoal: throughput >= 1.0x QEMU's, round trip <= 1.0x.");
}
