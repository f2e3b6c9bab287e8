//! Live-migration benchmark (not a test): basalt-vmm against QEMU's own
//! migration (`qemu-system-aarch64 -accel kvm -incoming tcp:`), between the
//! same two emulated arm64 hosts on the rig's bridge, same guest kernel and
//! initramfs, 2 vCPUs, 256 MiB, the same 300 ms downtime limit, alternating
//! which VMM goes first, in one run. Two guests: idle (its init sleeps), and
//! one dirtying 64 MiB of memory at a fixed rate (`basalt-guest-load`).
//! Prints per-round total time and downtime as each VMM reports them, the
//! medians and the ratios basalt/qemu (the issue's goal: downtime <= 0.5,
//! total time <= 1).
//!
//! The guests have no disk: QEMU's Debian build would need its rbd block
//! driver and the same Ceph; memory, vCPU, vGIC and device state are what
//! both VMMs move here.
//!
//! First, as root: deploy/cross/build; deploy/arm64-host/build-initramfs;
//! deploy/arm64-host/build-qemudisk. Then:
//!   CARGO_TARGET_DIR=/var/cache/basalt/target cargo bench -p basalt-tests --bench vmm_migration
//! Env: BENCH_ROUNDS (rounds per VMM and guest, default 3), BENCH_DIRTY_MIB_S
//! (the dirtying guest's rate, default 16).
//!
//! Method: host B starts the receiver for each round (basalt-vmm --incoming,
//! or qemu -incoming), host A boots the guest, waits for its marker and 5 s
//! more, then starts the migration (basalt: `migrate-send`; qemu: HMP
//! `migrate_set_parameter downtime-limit 300`, `migrate_set_capability
//! return-path on`, `migrate -d`, then `info migrate` until completed). B
//! stops the guest once it runs there. Both VMMs report total time and
//! downtime themselves, both from the pause on A to B's word that the guest
//! runs there (QEMU's return path; without one QEMU's downtime would end at
//! A's last byte and leave B's load and restart out). Of basalt's,
//! `stop_ms` is pausing and saving the state on A and `last=` the
//! last round's pages and time; `steps=` the sender's steps after the pause
//! (µs) and `restore_ms=` the receiver's time from the state to the guest running.

use std::time::Duration;

mod common;
use common::{alternating, comparison_row, env_u32, field, median, qemu_disk};

use basalt_tests::rig::{guest, netns::BRIDGE_ADDR, Arm64Host, Artifacts, Netns};

const COMMON: &str = r#"
set -u
q=
for d in /dev/vd?; do
    [ -b "$d" ] || continue
    [ "$(dd if="$d" bs=1 skip=1144 count=11 2>/dev/null)" = basalt-qemu ] && q=$d
done
[ -n "$q" ] || { echo "BENCH: no disk labelled basalt-qemu"; exit 1; }
mkdir -p /qemu && mount -t ext4 -o ro "$q" /qemu || exit 1
L=/qemu/usr/lib/aarch64-linux-gnu
QEMU="$L/ld-linux-aarch64.so.1 --library-path $L /qemu/usr/bin/qemu-system-aarch64"
for i in $(seq 1 60); do ping -c 1 -W 1 BRIDGE >/dev/null 2>&1 && break; done
S=/tmp/vm.sock; C=/tmp/console
ctl() { basalt-vmm ctl --socket $S "$@" 2>&1; }
# hmp CMD: one monitor command; its answer is appended to /tmp/mon.log
hmp() { echo "$1" > /tmp/mon.in; sleep 0.3; }
start() { # vmm guest [incoming]
    rm -f $S $C /tmp/mon.in /tmp/mon.out /tmp/mon.log; : > $C
    initrd=guest/initrd-$2
    if [ $1 = basalt ]; then
        inc=""; [ -n "${3:-}" ] && inc="--incoming 0.0.0.0:7000"
        basalt-vmm --kernel guest/Image --initrd $initrd --memory 256 --vcpus 2 \
            --cmdline 'console=ttyS0 panic=-1 quiet' --console file:$C --control-socket $S $inc 2>/tmp/vmm.log &
    else
        mkfifo /tmp/mon.in /tmp/mon.out
        inc=""; [ -n "${3:-}" ] && inc="-incoming tcp:0.0.0.0:7001"
        $QEMU -accel kvm -M virt,gic-version=3 -cpu host -smp 2 -m 256 -nodefaults -display none \
            -serial file:$C -kernel guest/Image -initrd $initrd -append 'console=ttyAMA0 panic=-1 quiet' \
            -monitor pipe:/tmp/mon $inc > /tmp/vmm.log 2>&1 &
        cat /tmp/mon.out > /tmp/mon.log &
    fi
    VMM=$!
}
stop() { kill $VMM 2>/dev/null; wait $VMM 2>/dev/null; }
"#;

/// Host A: boots each round's guest and sends it.
const HOST_A: &str = r#"
send() { # vmm guest round
    start $1 $2
    for i in $(seq 1 1200); do grep -q BENCH-GUEST-READY $C && break; sleep 0.1; done
    sleep 5
    if [ $1 = basalt ]; then
        for t in $(seq 1 600); do
            ctl migrate-send --args '{"peer":"10.77.0.12:7000","downtime_ms":300}' >/dev/null
            while kill -0 $VMM 2>/dev/null; do
                ctl migrate-status | grep -q '"phase":"failed"' && break
                sleep 0.2
            done
            kill -0 $VMM 2>/dev/null || break
            sleep 0.5
        done
        wait $VMM; rc=$?
        r=$(grep -o 'report {.*}' /tmp/vmm.log | tail -1)
        tot=$(echo "$r" | sed -n 's/.*"total_ms":\([0-9]*\).*/\1/p')
        down=$(echo "$r" | sed -n 's/.*"downtime_ms":\([0-9]*\).*/\1/p')
        rounds=$(echo "$r" | grep -o '"round":' | wc -l)
        stopms=$(echo "$r" | sed -n 's/.*"stop_ms":\([0-9]*\).*/\1/p')
        # the last round (after the pause): its pages and milliseconds
        lastr=$(echo "$r" | grep -o '{"round":[^}]*}' | tail -1 | sed 's/[{}"]//g')
        firstr=$(echo "$r" | grep -o '{"round":[^}]*}' | head -1 | sed 's/[{}"]//g')
        # where the downtime went: the sender's steps (µs) and the receiver's restore
        steps=$(echo "$r" | grep -o '"stop_steps_us":{[^}]*}' | sed 's/"stop_steps_us"://; s/[{}"]//g')
        restore=$(echo "$r" | sed -n 's/.*"restore_ms":\([0-9]*\).*/\1/p')
        echo "BENCH-ROUND vmm=basalt guest=$2 round=$3 total_ms=$tot downtime_ms=$down rounds=$rounds stop_ms=$stopms restore_ms=$restore rc=$rc first=$firstr last=$lastr steps=$steps"
        [ "$rc" = 4 ] || sed 's/^/BENCH-STDERR basalt: /' /tmp/vmm.log
    else
        hmp "migrate_set_parameter downtime-limit 300"
        # With a return path QEMU's downtime runs to the destination's word
        # that the guest runs again, as basalt's does; without one it stops
        # at the source's last byte and leaves out the destination's load.
        hmp "migrate_set_capability return-path on"
        for t in $(seq 1 600); do
            hmp "migrate -d tcp:10.77.0.12:7001"
            st=
            for i in $(seq 1 1200); do
                hmp "info migrate"
                st=$(grep -a -i -o -E 'status: *[a-z-]+' /tmp/mon.log | tail -1 | sed 's/.*: *//')
                case $st in completed|failed|cancelled) break;; esac
            done
            [ "$st" = completed ] && break
            sleep 0.5
        done
        tot=$(grep -a -o -E 'total=[0-9]+|total time: [0-9]+' /tmp/mon.log | tail -1 | grep -o -E '[0-9]+')
        down=$(grep -a -o -E 'down=[0-9]+|downtime: [0-9]+' /tmp/mon.log | tail -1 | grep -o -E '[0-9]+')
        echo "BENCH-ROUND vmm=qemu guest=$2 round=$3 total_ms=$tot downtime_ms=$down status=$st"
        [ "$st" = completed ] || sed 's/^/BENCH-MONITOR qemu: /' /tmp/mon.log | tail -30
        [ "$3" = 1 ] && sed 's/^/BENCH-MONITOR qemu: /' /tmp/mon.log | grep -a -A12 -i 'status: *completed' | head -14
        hmp quit
        stop
    fi
}
"#;

/// Host B: a receiver for each round; stops the guest once it runs here.
const HOST_B: &str = r#"
receive() { # vmm guest round
    start $1 $2 incoming
    if [ $1 = basalt ]; then
        for i in $(seq 1 6000); do ctl status | grep -q '"state":"running"' && break; kill -0 $VMM 2>/dev/null || break; sleep 0.1; done
    else
        for i in $(seq 1 6000); do hmp "info status"; grep -a -q 'VM status: running' /tmp/mon.log && break; kill -0 $VMM 2>/dev/null || break; done
    fi
    # The guest runs here: its console keeps going.
    n=$(wc -l < $C); sleep 3
    echo "BENCH-ARRIVED vmm=$1 guest=$2 round=$3 console_lines_in_3s=$(( $(wc -l < $C) - n ))"
    [ $1 = qemu ] && hmp quit
    stop
}
"#;

struct Round {
    vmm: String,
    guest: String,
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
}

fn main() {
    let rounds = env_u32("BENCH_ROUNDS", 3);
    let rate = env_u32("BENCH_DIRTY_MIB_S", 16);
    let arts = Artifacts::locate().expect("rig artifacts");
    let qemu_disk = qemu_disk(&arts);
    let load = std::fs::read(arts.arm64_bin("basalt-guest-load").expect("basalt-guest-load")).expect("read it");
    let idle =
        guest::initramfs(&arts, "echo BENCH-GUEST-READY\nwhile true; do sleep 1; echo tick; done").expect("initrd");
    let dirty = guest::initramfs_with(
        &arts,
        &format!("echo BENCH-GUEST-READY\nexec /bin/basalt-guest-load --mib 64 --rate-mib-s {rate}"),
        &[("bin/basalt-guest-load", load)],
    )
    .expect("initrd");
    // The same order of rounds on both hosts.
    let plan: Vec<String> =
        alternating(rounds, &["idle", "dirty"]).iter().map(|(v, g, r)| format!("{v} {g} {r}")).collect();
    let mut ns = Netns::create("basalt-mbench").expect("network namespace");
    let started = std::time::Instant::now();
    let mut running = Vec::new();
    for (me, body, verb) in [(11u8, HOST_A, "send"), (12, HOST_B, "receive")] {
        let steps: String = plan.iter().map(|p| format!("{verb} {p}\n")).collect();
        let script = format!("{COMMON}\n{body}\n{steps}umount /qemu 2>/dev/null\n").replace("BRIDGE", BRIDGE_ADDR);
        let host = Arm64Host::new(&format!("bench{me}"))
            .memory_mib(2048)
            .timeout(Duration::from_secs(900 + 400 * u64::from(rounds)))
            .nic(ns.add_host_nic(me).expect("tap"))
            .arm64_bin(&arts, "basalt-vmm")
            .expect("basalt-vmm")
            .file("guest/Image", guest::kernel(&arts).expect("kernel"), 0o644)
            .file("guest/initrd-idle", idle.clone(), 0o644)
            .file("guest/initrd-dirty", dirty.clone(), 0o644)
            .read_only_disk(&qemu_disk)
            .script(&script);
        running.push(host.spawn().expect("spawn host"));
    }
    let outs: Vec<_> = running.into_iter().map(|r| r.wait().expect("host runs")).collect();
    let a = outs[0].command_output();
    let b = outs[1].command_output();
    let mut all = Vec::new();
    for line in a.lines() {
        let Some(r) = line.split("BENCH-ROUND ").nth(1) else { continue };
        let kv = |k: &str| field(r, k);
        all.push(Round {
            vmm: kv("vmm"),
            guest: kv("guest"),
            total_ms: kv("total_ms").parse().ok(),
            downtime_ms: kv("downtime_ms").parse().ok(),
        });
        println!("- {r}");
    }
    for line in b.lines().filter(|l| l.contains("BENCH-ARRIVED")) {
        println!("- {}", line.split("BENCH-ARRIVED ").nth(1).unwrap_or(line));
    }
    for line in a.lines().filter(|l| l.contains("BENCH-MONITOR") || l.contains("BENCH-STDERR")) {
        println!("    {line}");
    }
    println!(
        "\n### Live migration, {rounds} rounds per VMM and guest, whole run {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    println!("| guest | metric | basalt-vmm (median ms) | qemu (median ms) | ratio basalt/qemu |");
    println!("|---|---|---|---|---|");
    for g in ["idle", "dirty"] {
        let metrics: [(&str, fn(&Round) -> Option<f64>); 2] =
            [("downtime", |r| r.downtime_ms), ("total time", |r| r.total_ms)];
        for (name, f) in metrics {
            let med = |v: &str| median(all.iter().filter(|r| r.vmm == v && r.guest == g).filter_map(f).collect());
            println!("{}", comparison_row(&[g, name], med("basalt"), med("qemu"), 0));
        }
    }
    println!("\nGoal: downtime <= 0.5 x QEMU's, total time <= QEMU's. The dirtying guest writes {rate} MiB/s.");
}
