//! VMM boot-time benchmark (not a test): time from process start to the
//! guest's init marker, and to process exit, for basalt-vmm and for
//! `qemu-system-aarch64 -accel kvm -M virt`, same kernel, same initramfs,
//! same 1 vCPU and 256 MiB, inside one emulated arm64 host (real nested KVM)
//! in one run. Prints a markdown table with per-round times, medians and the
//! ratio basalt/qemu (the VMM issue's goal: <= 0.5 on time to init).
//!
//! First, as root (deploy/install-deps has made the chroot and the kernel):
//!   deploy/cross/build                   # static basalt-vmm
//!   deploy/arm64-host/build-initramfs    # base initramfs of the emulated host
//!   deploy/arm64-host/build-qemudisk     # Debian's arm64 qemu on an ext4 disk
//! Then:
//!   CARGO_TARGET_DIR=/var/cache/basalt/target cargo bench -p basalt-tests --bench vmm_boot
//! Env: BENCH_ROUNDS (measured rounds per VMM, default 5); BENCH_GUEST_KERNEL
//! (an arm64 Image for both guests instead of Debian's, such as the minimal
//! one of deploy/arm64-host/build-guest-kernel); BENCH_GUEST_CMDLINE (the
//! guests' kernel command line after the console, default "panic=-1 quiet");
//! BENCH_GUEST_DMESG=1 (warm-up guests print their kernel log).
//!
//! The guest's /init prints the marker first, right after mounting /proc
//! (guest::initramfs_bare): what init would do before it is guest work.
//!
//! Method: the host script (busybox sh) starts each VMM in the background
//! with its serial console going to a FIFO, reads the FIFO line by line and
//! stamps the marker line's arrival with /proc/uptime (10 ms resolution);
//! the start stamp is taken just before the fork, the exit stamp when the
//! VMM has been reaped. A FIFO instead of a polled file: the reader sleeps in
//! read(2) and wakes on the line, so it neither adds polling latency nor
//! steals the emulated host's CPUs from the VMM. The guest also prints its
//! own uptime at the marker, which splits the time into the guest's kernel +
//! init and what came before its clock started (VMM start-up, loading the
//! kernel, the kernel's earliest boot).
//! One unmeasured warm-up round per VMM first fills the page cache (qemu and
//! its 50 libraries come from a virtio disk, basalt-vmm from the initramfs).
//! Rounds alternate which VMM goes first, so drift in the machine's load
//! falls on both. At each marker the VM's KVM exit count is read from
//! debugfs; in the warm-up rounds (whose guests then wait 10 s) also how
//! guest RAM is mapped and backed.

use std::path::Path;
use std::time::Duration;

mod common;
use common::median;

use basalt_tests::rig::{guest, Arm64Host, Artifacts};

const MARKER: &str = "BASALT-BENCH-INIT";
/// The kernel command line of both guests, apart from the console device
/// (Basalt emulates a 16550, qemu's virt a PL011).
const CMDLINE: &str = "panic=-1 quiet";

struct Round {
    label: String,
    vmm: String,
    to_init: Option<f64>,
    /// The guest's own uptime at the marker: how long its kernel and init ran.
    guest_uptime: Option<f64>,
    /// KVM exits of the VM up to the marker (debugfs).
    exits: Option<f64>,
    to_exit: f64,
    rc: i32,
}

/// One column of the summary: a duration taken from a round, if it has one.
type Metric = fn(&Round) -> Option<f64>;

fn host_script(rounds: u32, cmdline: &str) -> String {
    format!(
        r#"set -u
q=
for d in /dev/vd?; do
    [ -b "$d" ] || continue
    [ "$(dd if="$d" bs=1 skip=1144 count=11 2>/dev/null)" = basalt-qemu ] && q=$d
done
[ -n "$q" ] || {{ echo "BENCH: no disk labelled basalt-qemu"; exit 1; }}
mkdir -p /qemu && mount -t ext4 -o ro "$q" /qemu || exit 1
L=/qemu/usr/lib/aarch64-linux-gnu
# The guest's tty ends lines with CR LF; read strips only the LF.
CR=$(printf '\r')
echo "BENCH-INFO emulated host kernel $(uname -r), emulated host cpus $(nproc) mem-kib $(sed -n 's/MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)"
# KVM's per-VM exit counters live in debugfs.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# The disk carries its own glibc: its loader runs qemu, with no change to /init.
QEMU="$L/ld-linux-aarch64.so.1 --library-path $L /qemu/usr/bin/qemu-system-aarch64"
# Process start-up alone (qemu: 50 libraries to load and relocate, its QOM
# types registered by constructors), without any VM.
cs() {{ echo "${{1%.*}}${{1#*.}}"; }}
startup() {{ # name command...
    n=$1; shift
    read -r a _ < /proc/uptime
    for k in 1 2 3 4 5; do "$@" --version > /dev/null; done
    read -r b _ < /proc/uptime
    echo "BENCH-INFO $n --version, mean of 5 runs: $(( ($(cs $b) - $(cs $a)) * 2 )) ms"
}}
# At the marker: the VM's KVM exits so far and, in warm-up rounds, how its
# RAM is backed. Stage-2 block (2 MiB) mappings need transparent huge pages
# and a host address congruent to the guest address modulo 2 MiB.
probe() {{ # vmm label
    ex=- vd= vp=
    for d in /sys/kernel/debug/kvm/*-*; do
        [ -r "$d/exits" ] && read -r ex < "$d/exits" && vd=$d && vp=${{d##*/}} && vp=${{vp%%-*}}
    done
    [ "$2" = warmup ] && [ "$ex" != - ] || return 0
    k=$(for f in exits mmio_exit_user mmio_exit_kernel wfi_exit_stat hvc_exit_stat; do printf ' %s %s' $f $(cat $vd/$f); done)
    echo "BENCH-INFO $1 KVM exits at the marker:$k"
    while read -r range _; do
        a=${{range%-*}} b=${{range#*-}}
        [ $((0x$b - 0x$a)) -ge $((256 << 20)) ] || continue
        thp=$(awk -v r="$range" '$1 == r {{ f = 1 }} f && /^AnonHugePages:/ {{ print $2 " kB"; exit }}' /proc/$vp/smaps)
        echo "BENCH-INFO $1 guest RAM at the marker: mapping $range, start mod 2 MiB = $((0x$a % (2 << 20))) bytes, AnonHugePages $thp"
    done < /proc/$vp/maps
}}
measure() {{ # vmm label initrd
    rm -f /tmp/con; mkfifo /tmp/con
    # Read-write: the open does not wait for a writer, and read never sees
    # EOF; the line the launcher writes after the VMM exits ends the loop.
    # No read -t: on timeout it drops a partly read line.
    exec 3<>/tmp/con
    read -r t0 _ < /proc/uptime
    if [ "$1" = basalt ]; then
        # Warm-up: basalt-vmm logs its own set-up steps with their times.
        vlog=warn; [ "$2" = warmup ] && vlog=info
        {{ BASALT_VMM_LOG=$vlog basalt-vmm --kernel guest/Image --initrd "$3" --memory 256 --vcpus 1 \
            --cmdline 'console=ttyS0 {cmdline}' --console file:/tmp/con > /tmp/out 2>&1 3>&-
          echo "BENCH-VMM-EXIT rc=$?" >&3; }} &
    else
        {{ $QEMU -accel kvm -M virt,gic-version=3 -cpu host -smp 1 -m 256 -nodefaults -display none \
            -serial file:/tmp/con -kernel guest/Image -initrd "$3" \
            -append 'console=ttyAMA0 {cmdline}' -no-reboot > /tmp/out 2>&1 3>&-
          echo "BENCH-VMM-EXIT rc=$?" >&3; }} &
    fi
    pid=$!
    ti=- gu=- ex=- rc=- con=
    while read -r line <&3; do
        case $line in
            *BENCH-VMM-EXIT*) rc=${{line##*rc=}}; break;;
            *{MARKER}*)
                read -r ti _ < /proc/uptime
                gu=${{line##*guest-uptime=}} gu=${{gu%$CR}}
                probe $1 $2;;
        esac
        con="$con$line
"
    done
    wait $pid
    read -r te _ < /proc/uptime
    exec 3<&-
    echo "BENCH-ROUND label=$2 vmm=$1 t0=$t0 init=$ti guest=$gu exits=$ex exit=$te rc=$rc"
    if [ "$2" = warmup ] || [ "$rc" != 0 ] || [ $ti = - ]; then
        printf '%s' "$con" | sed "s/^/BENCH-CONSOLE $1: /"
        sed "s/^/BENCH-STDERR $1: /" /tmp/out
    fi
}}
echo "BENCH-INFO qemu $($QEMU --version | head -1)"
echo "BENCH-INFO basalt $(basalt-vmm --version)"
# Warm-up guests hold still for a while after the marker, for probe.
measure basalt warmup guest/initrd-hold
measure qemu warmup guest/initrd-hold
startup basalt-vmm basalt-vmm
startup qemu-system-aarch64 $QEMU
i=1
while [ $i -le {rounds} ]; do
    if [ $((i % 2)) = 1 ]; then measure basalt $i guest/initrd; measure qemu $i guest/initrd
    else measure qemu $i guest/initrd; measure basalt $i guest/initrd; fi
    i=$((i + 1))
done
umount /qemu
"#
    )
}

fn parse(out: &str) -> (Vec<String>, Vec<Round>) {
    let mut info = Vec::new();
    let mut rounds = Vec::new();
    for line in out.lines() {
        if let Some(i) = line.strip_prefix("BENCH-INFO ") {
            info.push(i.to_string());
        }
        let Some(r) = line.strip_prefix("BENCH-ROUND ") else { continue };
        let kv = |k: &str| {
            r.split_whitespace()
                .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .unwrap_or("-")
                .to_string()
        };
        let num = |k: &str| kv(k).parse::<f64>().ok();
        let Some(t0) = num("t0") else { continue };
        rounds.push(Round {
            label: kv("label"),
            vmm: kv("vmm"),
            to_init: num("init").map(|t| t - t0),
            guest_uptime: num("guest"),
            exits: num("exits"),
            to_exit: num("exit").map(|t| t - t0).unwrap_or(f64::NAN),
            rc: kv("rc").parse().unwrap_or(-1),
        });
    }
    (info, rounds)
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| format!("{x:.decimals$}")).unwrap_or_else(|| "—".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    // Arguments (cargo's `--bench`) are ignored: there is one benchmark.
    let rounds: u32 = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let arts = Artifacts::locate().expect("rig artifacts (deploy/arm64-host/fetch, build-initramfs)");
    let qemu_disk = arts.kernel.parent().unwrap_or(Path::new(".")).join("qemu.img");
    assert!(qemu_disk.is_file(), "{} is missing: run deploy/arm64-host/build-qemudisk", qemu_disk.display());
    // read and echo are shell builtins: the stamp costs the guest no fork.
    let mark = format!("read -r u _ < /proc/uptime; echo \"{MARKER} guest-uptime=$u\"");
    let initrd = guest::initramfs_bare(&arts, &mark).expect("guest initramfs");
    // BENCH_GUEST_DMESG=1: the warm-up guests print their kernel log after
    // the marker (with initcall_debug in BENCH_GUEST_CMDLINE: where boot time goes).
    let dmesg = if std::env::var_os("BENCH_GUEST_DMESG").is_some() { "/bin/busybox dmesg\n" } else { "" };
    let initrd_hold =
        guest::initramfs_bare(&arts, &format!("{mark}\n{dmesg}/bin/busybox sleep 10")).expect("guest initramfs");

    // The guest kernel: Debian's (the emulated host's own) unless
    // BENCH_GUEST_KERNEL names another Image, such as the minimal one of
    // deploy/arm64-host/build-guest-kernel.
    let (kernel_name, kernel) = match std::env::var("BENCH_GUEST_KERNEL") {
        Ok(p) => (p.clone(), std::fs::read(&p).unwrap_or_else(|e| panic!("BENCH_GUEST_KERNEL={p}: {e}"))),
        Err(_) => (arts.kernel.display().to_string(), guest::kernel(&arts).expect("kernel")),
    };
    let cmdline = std::env::var("BENCH_GUEST_CMDLINE").unwrap_or_else(|_| CMDLINE.to_string());
    let kernel_size = kernel.len();
    let load_before = loadavg();
    let started = std::time::Instant::now();
    let out = Arm64Host::new("vmm-bench")
        .smp(2)
        .memory_mib(2048)
        .timeout(Duration::from_secs(600 + 300 * u64::from(rounds)))
        .arm64_bin(&arts, "basalt-vmm")
        .expect("arm64 basalt-vmm (deploy/cross/build)")
        .file("guest/Image", kernel, 0o644)
        .file("guest/initrd", initrd, 0o644)
        .file("guest/initrd-hold", initrd_hold, 0o644)
        .read_only_disk(&qemu_disk)
        .script(&host_script(rounds, &cmdline))
        .run()
        .expect("host runs");
    out.assert_success();
    let (info, all) = parse(out.command_output());

    let measured: Vec<&Round> = all.iter().filter(|r| r.label != "warmup").collect();
    let failed: Vec<&&Round> = measured.iter().filter(|r| r.rc != 0 || r.to_init.is_none()).collect();
    let pick = |vmm: &str, f: Metric| -> Vec<f64> {
        measured.iter().filter(|r| r.vmm == vmm && r.rc == 0).filter_map(|r| f(r)).collect()
    };
    let med = |vmm: &str, f: Metric| median(pick(vmm, f));
    let rows: [(&str, Metric, usize); 5] = [
        ("start → init marker (s)", |r| r.to_init, 2),
        ("guest kernel+init, its own uptime (s)", |r| r.guest_uptime, 2),
        ("before the guest clock: VMM setup + early boot (s)", |r| Some(r.to_init? - r.guest_uptime?), 2),
        ("start → exit (s)", |r| Some(r.to_exit), 2),
        ("KVM exits up to the marker", |r| r.exits, 0),
    ];
    let ratio = |b: Option<f64>, q: Option<f64>| match (b, q) {
        (Some(b), Some(q)) if q > 0.0 => format!("{:.2}", b / q),
        _ => "—".into(),
    };

    println!(
        "### VMM boot time, {rounds} rounds (+1 warm-up each), whole run {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    println!(
        "- outer machine: {} x86_64 CPUs, load average before {load_before}, after {} (the machine is shared)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        loadavg()
    );
    println!("- guest kernel (both): {kernel_name}, {} MiB", kernel_size >> 20);
    println!("- guest kernel command line (both, after the console): `{cmdline}`");
    for i in &info {
        println!("- {i}");
    }
    println!(
        "\n| round | VMM | start → init marker (s) | guest uptime at marker (s) | start → exit (s) | KVM exits to marker | exit status |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &all {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} | {} |",
            r.label,
            r.vmm,
            fmt(r.to_init, 2),
            fmt(r.guest_uptime, 2),
            r.to_exit,
            fmt(r.exits, 0),
            r.rc
        );
    }
    println!("\nWarm-up rounds are not counted; their guests wait 10 s after the marker so the probes above can read the live VM.");
    println!("\n| median of measured rounds | basalt-vmm | qemu -accel kvm | ratio basalt/qemu |");
    println!("|---|---|---|---|");
    for (name, f, decimals) in rows {
        let (b, q) = (med("basalt", f), med("qemu", f));
        println!("| {name} | {} | {} | {} |", fmt(b, decimals), fmt(q, decimals), ratio(b, q));
    }
    let goal = match (med("basalt", rows[0].1), med("qemu", rows[0].1)) {
        (Some(b), Some(q)) if q > 0.0 => {
            if b / q <= 0.5 {
                "met"
            } else {
                "NOT met"
            }
        }
        _ => "not measured",
    };
    println!("\nGoal (start → init marker, basalt/qemu <= 0.5): {goal}.");
    if !failed.is_empty() {
        println!("\n{} measured round(s) failed (non-zero exit or no marker); medians leave them out.", failed.len());
    }
}
