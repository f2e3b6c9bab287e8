//! Live migration between two emulated arm64 hosts on the rig's bridge,
//! with the VM's disk an RBD image on a real Ceph in the namespace.
//!
//! The guest (2 vCPUs, 256 MiB, a GICv3 ITS) runs `basalt-guest-load`: 64 MiB
//! of page-tagged memory verified and rewritten at 4 MiB/s, a counter on its
//! RBD disk (block i holds `COUNT i`, checked empty before it is written), a
//! heartbeat a second. It moves A→B→A five times, then meets three faults,
//! each of which must leave it running on A with its disk: a receiver that
//! refuses it (other memory size), a receiver killed during pre-copy, and
//! A's link cut during stop-and-copy. Then it moves to B once more. Then the
//! same VM without an ITS (on a disk of its own) moves A→B→A five times. This
//! test meanwhile watches each image's exclusive-lock owner with the storage
//! crate: never two, and exactly one new owner per completed migration.
//!
//! One Ceph and one pair of hosts for all of it (a warm run is a few minutes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::vm_client;

use basalt_storage::rbd::{self, features, Image, ImageOptions};
use basalt_tests::rig::{guest, netns::BRIDGE_ADDR, Arm64Host, Artifacts, Netns, NetnsCeph};

const IMAGE: &str = "vm-migrate";
/// The disk of the same VM without an ITS.
const IMAGE_NOITS: &str = "vm-migrate-noits";
const IMAGE_SIZE: u64 = 64 << 20;
const ROUND_TRIPS: usize = 5;

fn vm_json(memory_mib: u32, its: bool, image: &str) -> String {
    serde_json::json!({
        "vcpus": 2,
        "memory_mib": memory_mib,
        "kernel": "/basalt/guest/Image",
        "initrd": "/basalt/guest/initrd",
        "cmdline": "console=ttyS0 panic=-1 quiet",
        "its": its,
        "console": { "file": { "path": "/tmp/console" } },
        "disks": [{
            "backend": { "rbd": {
                "pool": "rbd",
                "image": image,
                "client": {
                    "conf": "/basalt/ceph/ceph.conf",
                    "id": "vm",
                    "keyring": "/basalt/ceph/ceph.client.vm.keyring",
                },
            } },
        }],
    })
    .to_string()
}

/// Shell functions both hosts use. `$ME` and `$PEER` are host octets.
const COMMON: &str = r#"
S=/tmp/vm.sock; C=/tmp/console; n=0
log() { echo "HOST-$ME $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
ctl() { basalt-vmm ctl --socket $S "$@" 2>&1; }
: > $C
tail -f $C &
for i in $(seq 1 60); do ping -c 1 -W 1 BRIDGE >/dev/null 2>&1 && break; done
# start_vmm CONFIG [ARGS...]: a VMM in the background, its log in /tmp/vmm.N.log
start_vmm() {
    n=$((n+1)); cfg=$1; shift
    rm -f $S
    basalt-vmm --config /basalt/$cfg --control-socket $S "$@" 2>/tmp/vmm.$n.log &
    VMM=$!
    for i in $(seq 1 300); do [ -S $S ] && break; kill -0 $VMM 2>/dev/null || break; sleep 0.1; done
}
# finish_vmm: waits for the VMM to exit, prints its log, sets rc
finish_vmm() { wait $VMM; rc=$?; sed "s/^/HOST-$ME vmm$n: /" /tmp/vmm.$n.log; }
# wait_running: until the VMM runs a guest (incoming VMMs first wait), or exits
wait_running() {
    for i in $(seq 1 3000); do
        ctl status | grep -q '"state":"running"' && return 0
        kill -0 $VMM 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
phase() { ctl migrate-status | sed -n 's/.*"phase":"\([a-z-]*\)".*/\1/p'; }
# send ARGS: starts a migration to the peer, retrying while the peer is not
# listening (or, with RETRY_REFUSED, refuses); waits until it ends.
# Sets out=completed (the VMM exited; rc is its status) or out=failed.
send() {
    for try in $(seq 1 600); do
        resp=$(ctl migrate-send --args "{\"peer\":\"10.77.0.$PEER:7000\"$1}")
        echo "$resp" | grep -q '"ok":true' || { log "SEND-REFUSED $resp"; out=failed; return; }
        while kill -0 $VMM 2>/dev/null; do
            p=$(phase)
            [ -n "$ON_PHASE" ] && [ "$p" = "$ON_PHASE" ] && { eval "$ON_ACTION"; ON_PHASE=""; }
            case $p in failed|cancelled) break;; esac
            sleep 0.2
        done
        if ! kill -0 $VMM 2>/dev/null; then finish_vmm; out=completed; return; fi
        st=$(ctl migrate-status)
        # not listening yet, or still busy with the last sender (backlog)
        if echo "$st" | grep -q -e 'cannot reach the receiver' -e 'did not answer the hello' || { [ -n "$RETRY_REFUSED" ] && echo "$st" | grep -q 'refused the VM'; }; then
            sleep 0.5; continue
        fi
        log "SEND-FAILED $st"; out=failed; return
    done
    out=failed
}
last_hb() { grep -a -o 'HB [0-9]* mono_ms=[0-9]*' $C | tail -1; }
# clock: the host's uptime beside a heartbeat printed just now (waits for a
# new one: right after an arrival the newest in the file is from before it left)
clock() {
    h=$(grep -a -c 'HB ' $C)
    for i in $(seq 1 100); do [ $(grep -a -c 'HB ' $C) -gt $h ] && break; sleep 0.1; done
    log "CLOCK host=$(up) $(last_hb)"
}
"#;

const HOST_A: &str = r#"
start_vmm vm.json
for i in $(seq 1 3000); do grep -q 'HB 1 ' $C && break; sleep 0.1; done
clock
# Once, during the first pre-copy: a second migration of the same VM.
ON_PHASE=precopy
ON_ACTION='log SECOND $(ctl migrate-send --args "{\"peer\":\"10.77.0.12:7000\"}")'
for r in $(seq 1 ROUNDS); do
    send ""
    log "OUT $r $out rc=$rc"
    start_vmm vm.json --incoming 0.0.0.0:7000
    wait_running && log "IN $r" || { finish_vmm; log "IN $r FAILED rc=$rc"; exit 1; }
    clock
done
# F1: the peer's receiver has another memory size.
RETRY_REFUSED="" send ""
log "F1 $out running=$(ctl status | grep -c '"state":"running"')"
# Bad input changes nothing: bad arguments (and, in the first migration
# above, a second migration of the same VM).
log "BAD-ARGS $(ctl migrate-send --args '{"peer":"nohost"}') $(ctl migrate-send --args '{"peer":"10.77.0.12:7000","downtime_ms":0}')"
# F2: the peer kills its receiver during pre-copy (slowed to 16 MiB/s).
RETRY_REFUSED=1 send ',"bandwidth_mib_s":16'
log "F2 $out running=$(ctl status | grep -c '"state":"running"')"
# F3: this host's link goes down during stop-and-copy (a 60 s budget makes
# the last copy big; 16 MiB/s makes it last), for longer than the sender's
# 30 s timeouts: a shorter cut is simply bridged by TCP (seen: a 40 s cut
# ended in a completed migration with 56 s of downtime).
ON_PHASE=stop-and-copy ON_ACTION='log F3-CUT; ip link set eth0 down; sleep 45; ip link set eth0 up; log F3-UP' \
    send ',"downtime_ms":60000,"bandwidth_mib_s":16'
log "F3 $out running=$(ctl status | grep -c '"state":"running"')"
sleep 3
clock
# Still movable after all that.
send ""
log "OUT-LAST $out rc=$rc"
# The same VM without an ITS (SPIs only, a disk of its own), moved as often.
: > $C
start_vmm vm-noits.json
wait_running || { finish_vmm; log "NOITS-BOOT FAILED rc=$rc"; exit 1; }
for i in $(seq 1 3000); do grep -q 'HB 2 ' $C && break; sleep 0.1; done
for r in $(seq 1 ROUNDS); do
    send ""
    log "NOITS-OUT $r $out rc=$rc"
    start_vmm vm-noits.json --incoming 0.0.0.0:7000
    wait_running && log "NOITS-IN $r" || { finish_vmm; log "NOITS-IN $r FAILED rc=$rc"; exit 1; }
done
h=$(grep -a -c 'HB ' $C); for i in $(seq 1 100); do [ $(grep -a -c 'HB ' $C) -gt $((h+2)) ] && break; sleep 0.1; done
ctl shutdown >/dev/null; finish_vmm; log "NOITS-END rc=$rc"
"#;

const HOST_B: &str = r#"
for r in $(seq 1 ROUNDS); do
    start_vmm vm.json --incoming 0.0.0.0:7000
    wait_running && log "IN $r" || { finish_vmm; log "IN $r FAILED rc=$rc"; exit 1; }
    # let the guest write here for a moment
    h=$(grep -a -c 'HB ' $C); for i in $(seq 1 100); do [ $(grep -a -c 'HB ' $C) -gt $((h+1)) ] && break; sleep 0.1; done
    send ""
    log "OUT $r $out rc=$rc"
done
# F1: a receiver for a VM of another memory size: it refuses the sender
# and keeps listening until told to stop.
start_vmm vm-512.json --incoming 0.0.0.0:7000
for i in $(seq 1 1200); do ctl migrate-status | grep -q 'refused sender' && break; sleep 0.1; done
log "F1-RECEIVER $(ctl migrate-status)"
ctl shutdown >/dev/null; finish_vmm; log "F1-RECEIVER-EXIT rc=$rc"
# F2: killed once pre-copy has begun.
start_vmm vm.json --incoming 0.0.0.0:7000
# (the status is JSON with sorted keys: match its fields one at a time)
for i in $(seq 1 3000); do st=$(ctl migrate-status); echo "$st" | grep -q '"phase":"precopy"' && echo "$st" | grep -q '"bytes":[1-9]' && break; sleep 0.1; done
kill -9 $VMM; finish_vmm; log "F2-RECEIVER-KILLED rc=$rc"
# F3: the sender's link goes away mid-stop-and-copy: this receiver fails.
start_vmm vm.json --incoming 0.0.0.0:7000
finish_vmm; log "F3-RECEIVER-EXIT rc=$rc"
# The last migration arrives; run a little, then stop the guest.
start_vmm vm.json --incoming 0.0.0.0:7000
wait_running && log "IN-LAST" || { finish_vmm; log "IN-LAST FAILED rc=$rc"; exit 1; }
h=$(grep -a -c 'HB ' $C); for i in $(seq 1 100); do [ $(grep -a -c 'HB ' $C) -gt $((h+2)) ] && break; sleep 0.1; done
ctl shutdown >/dev/null; finish_vmm; log "END rc=$rc"
# The VM without an ITS, back and forth.
for r in $(seq 1 ROUNDS); do
    start_vmm vm-noits.json --incoming 0.0.0.0:7000
    wait_running && log "NOITS-IN $r" || { finish_vmm; log "NOITS-IN $r FAILED rc=$rc"; exit 1; }
    h=$(grep -a -c 'HB ' $C); for i in $(seq 1 100); do [ $(grep -a -c 'HB ' $C) -gt $((h+1)) ] && break; sleep 0.1; done
    send ""
    log "NOITS-OUT $r $out rc=$rc"
done
"#;

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

#[test]
fn a_loaded_guest_moves_between_hosts_and_survives_failed_migrations() {
    let arts = Artifacts::locate().expect("rig artifacts");
    let mut ns = Netns::create("basalt-mig").expect("network namespace");
    let ceph = NetnsCeph::start(&ns).expect("Ceph in the namespace");
    ns.enter_current_thread().expect("enter the namespace");
    let vm = vm_client(&ceph);
    let io = vm.ioctx("rbd").expect("pool rbd");
    let opts = ImageOptions { features: Some(features::VM_DEFAULT), ..Default::default() };
    for image in [IMAGE, IMAGE_NOITS] {
        let _ = rbd::remove(&io, image);
        rbd::create(&io, image, IMAGE_SIZE, &opts).expect("create the image");
    }

    // Who holds each image's lock, sampled all along: never two owners, and
    // the sequence of distinct owners is the sequence of VMMs that ran it.
    let done = Arc::new(AtomicBool::new(false));
    let watch = |image: &str| {
        let owners: Arc<Mutex<Vec<String>>> = Arc::default();
        let too_many: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let (o, t, done) = (owners.clone(), too_many.clone(), done.clone());
        let img = Image::open(&io, image).expect("open the image");
        let thread = std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Ok(now) = img.lock_owners() {
                    if now.len() > 1 {
                        t.lock().expect("lock").push(now.clone());
                    }
                    let mut seq = o.lock().expect("lock");
                    if let Some(first) = now.first() {
                        if seq.last() != Some(first) {
                            seq.push(first.clone());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        (owners, too_many, thread)
    };
    let (owners, too_many, watcher) = watch(IMAGE);
    let (owners_noits, too_many_noits, watcher_noits) = watch(IMAGE_NOITS);

    let keyring = std::fs::read(ceph.vm_keyring()).expect("vm keyring");
    let conf = ceph.host_conf("/basalt/ceph/ceph.client.vm.keyring").expect("host ceph.conf");
    let load = std::fs::read(arts.arm64_bin("basalt-guest-load").expect("basalt-guest-load (deploy/cross/build)"))
        .expect("read basalt-guest-load");
    let initrd = guest::initramfs_with(
        &arts,
        "echo GUEST-UP\nexec /bin/basalt-guest-load --mib 64 --rate-mib-s 4 --disk /dev/vda",
        &[("bin/basalt-guest-load", load)],
    )
    .expect("guest initramfs");
    let mut running = Vec::new();
    for (me, peer, script) in [(11u8, 12u8, HOST_A), (12, 11, HOST_B)] {
        let script = format!("ME={me}; PEER={peer}\n{COMMON}\n{script}")
            .replace("BRIDGE", BRIDGE_ADDR)
            .replace("ROUNDS", &ROUND_TRIPS.to_string());
        let host = Arm64Host::new(&format!("host{me}"))
            .memory_mib(2048)
            .timeout(Duration::from_secs(1500))
            .nic(ns.add_host_nic(me).expect("tap"))
            .libs(&arts)
            .expect("libs disk")
            .arm64_dynamic_bin(&arts, "basalt-vmm")
            .expect("dynamic basalt-vmm (deploy/cross/build)")
            .file("guest/Image", guest::kernel(&arts).expect("guest kernel"), 0o644)
            .file("guest/initrd", initrd.clone(), 0o644)
            .file("ceph/ceph.conf", conf.clone().into_bytes(), 0o644)
            .file("ceph/ceph.client.vm.keyring", keyring.clone(), 0o600)
            .file("vm.json", vm_json(256, true, IMAGE).into_bytes(), 0o644)
            .file("vm-512.json", vm_json(512, true, IMAGE).into_bytes(), 0o644)
            .file("vm-noits.json", vm_json(256, false, IMAGE_NOITS).into_bytes(), 0o644)
            .script(&script);
        running.push(host.spawn().expect("spawn host"));
    }
    let t0 = Instant::now();
    let outcomes: Vec<_> = running.into_iter().map(|r| r.wait().expect("host runs")).collect();
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let _ = watcher_noits.join();
    eprintln!("both hosts done after {:.0?}", t0.elapsed());
    let a = outcomes[0].command_output().to_string();
    let b = outcomes[1].command_output().to_string();
    let all = format!("{a}\n{b}");
    let has = |text: &str, needle: &str| text.lines().any(|l| l.contains(needle));

    // Every planned migration completed, with the sender's "moved away" status.
    for r in 1..=ROUND_TRIPS {
        assert!(has(&a, &format!("HOST-11 OUT {r} completed rc=4")), "A→B #{r}:\n{a}");
        assert!(has(&b, &format!("HOST-12 IN {r}")), "B received #{r}:\n{b}");
        assert!(has(&b, &format!("HOST-12 OUT {r} completed rc=4")), "B→A #{r}:\n{b}");
        assert!(has(&a, &format!("HOST-11 IN {r}")), "A received #{r}:\n{a}");
    }
    assert!(all.contains("ms downtime"), "the senders report their downtime:\n{all}");

    // The faults: each leaves the guest running on A.
    assert!(has(&a, "HOST-11 F1 failed running=1"), "{a}");
    assert!(
        a.contains("refused the VM: memory size differs: the VM has 256 MiB, this receiver was started with 512 MiB"),
        "{a}"
    );
    assert!(has(&b, "F1-RECEIVER") && b.contains("refused sender"), "the refusing receiver kept listening:\n{b}");
    assert!(has(&b, "F1-RECEIVER-EXIT rc=0"), "{b}");
    assert!(a.contains("\\\"nohost\\\" is not HOST:PORT") && a.contains("downtime_ms must be a whole number"), "{a}");
    assert!(has(&a, "SECOND") && a.contains("migrate-send: a migration of this VM is under way"), "{a}");
    assert!(has(&a, "HOST-11 F2 failed running=1"), "{a}");
    assert!(has(&b, "F2-RECEIVER-KILLED rc=137"), "{b}");
    assert!(has(&a, "F3-CUT") && has(&a, "F3-UP"), "the link was cut during stop-and-copy:\n{a}");
    assert!(has(&a, "HOST-11 F3 failed running=1"), "{a}");
    assert!(a.contains("the VM runs on here"), "the sender fell back:\n{a}");
    assert!(has(&b, "F3-RECEIVER-EXIT rc=1"), "the cut-off receiver failed, having run nothing:\n{b}");
    assert!(b.contains("nothing from the sender for 60 s"), "and said why:\n{b}");
    assert!(!a.contains("soft lockup"), "the fall-back resume rewound the guest's counter:\n{a}");
    assert!(
        has(&a, "HOST-11 OUT-LAST completed rc=4") && has(&b, "HOST-12 IN-LAST"),
        "a later migration succeeds:\n{all}"
    );
    assert!(has(&b, "HOST-12 END rc=0"), "{b}");
    // The same VM without an ITS, as many times back and forth.
    for r in 1..=ROUND_TRIPS {
        assert!(has(&a, &format!("HOST-11 NOITS-OUT {r} completed rc=4")), "no ITS, A→B #{r}:\n{a}");
        assert!(has(&b, &format!("HOST-12 NOITS-IN {r}")), "no ITS, B received #{r}:\n{b}");
        assert!(has(&b, &format!("HOST-12 NOITS-OUT {r} completed rc=4")), "no ITS, B→A #{r}:\n{b}");
        assert!(has(&a, &format!("HOST-11 NOITS-IN {r}")), "no ITS, A received #{r}:\n{a}");
    }
    assert!(has(&a, "HOST-11 NOITS-END rc=0"), "{a}");

    // The guest: no memory or disk error, ever, on either host.
    assert!(!all.contains("VERIFY-ERROR") && !all.contains("DISK-ERROR"), "{all}");
    // A heartbeat cut by the pause ends on the other host, after other lines:
    // judge the lines whose error fields are whole, and demand plenty of them.
    let hbs: Vec<&str> = all.lines().filter(|l| l.contains("HB ") && l.contains("verify_errors=")).collect();
    let judged: Vec<(f64, f64)> =
        hbs.iter().filter_map(|l| Some((field(l, "verify_errors=")?, field(l, "disk_errors=")?))).collect();
    assert!(judged.len() * 10 >= hbs.len() * 9 && judged.len() > 100, "{hbs:?}");
    assert!(judged.iter().all(|&(v, d)| v == 0.0 && d == 0.0), "{hbs:?}");
    let last_count = hbs.iter().filter_map(|l| field(l, "count=")).fold(0f64, f64::max) as u64;
    let last_gen = hbs.iter().filter_map(|l| field(l, "gen=")).fold(0f64, f64::max);
    assert!(last_gen >= 5.0, "the guest rewrote its 64 MiB many times: gen {last_gen}");

    // Its clock never ran ahead of the host's (A's view between its samples).
    let clocks: Vec<(f64, f64)> = a
        .lines()
        // The guest's console shares the host's: a CLOCK line may follow part of another.
        .filter_map(|l| l.split("CLOCK ").nth(1))
        .filter_map(|l| Some((field(l, "host=")?, field(l, "mono_ms=")? / 1000.0)))
        .collect();
    assert!(clocks.len() >= ROUND_TRIPS + 2, "{a}");
    for w in clocks.windows(2) {
        let (host, guest) = (w[1].0 - w[0].0, w[1].1 - w[0].1);
        assert!(guest >= 0.0 && guest <= host + 1.5, "guest clock advanced {guest:.1}s in {host:.1}s of host time");
    }

    // Each disk: every count from 1 on is there, in its block, and after
    // the last one nothing; the heartbeats' last count is on one of them.
    let counted = |image: &str| -> u64 {
        let img = Image::open(&io, image).expect("open the image");
        let mut i = 1u64;
        loop {
            let block = img.read_at(i * 4096, 4096).expect("read a block");
            if block.starts_with(format!("COUNT {i}\n").as_bytes()) {
                i += 1;
                continue;
            }
            assert!(block.iter().all(|&b| b == 0), "{image}: block {i} after the count holds something else");
            return i - 1;
        }
    };
    let (n, n_noits) = (counted(IMAGE), counted(IMAGE_NOITS));
    assert!(n > 50 && n_noits > 10, "the guests kept counting on their disks: {n}, {n_noits}");
    assert!(n.max(n_noits) >= last_count, "the heartbeats' count {last_count} is on a disk ({n}, {n_noits})");
    let img = Image::open(&io, IMAGE).expect("open the image");

    // The lock: never two owners; one new owner per VMM that ran the guest
    // (the first boot, 2 × ROUND_TRIPS migrations, the last one), no other;
    // for the VM without an ITS its boot and 2 × ROUND_TRIPS migrations.
    assert!(too_many.lock().expect("lock").is_empty(), "two lock owners at once: {:?}", too_many.lock());
    let seq = owners.lock().expect("lock").clone();
    assert_eq!(seq.len(), 2 * ROUND_TRIPS + 2, "lock owners in turn: {seq:?}");
    assert!(too_many_noits.lock().expect("lock").is_empty(), "no ITS: two lock owners at once");
    let seq = owners_noits.lock().expect("lock").clone();
    assert_eq!(seq.len(), 2 * ROUND_TRIPS + 1, "no ITS: lock owners in turn: {seq:?}");
    assert!(img.lock_owners().expect("owners").is_empty(), "the last VMM released its lock when it stopped");
    drop(img);
    rbd::remove(&io, IMAGE).expect("remove the image");
    let img = Image::open(&io, IMAGE_NOITS).expect("open the image");
    assert!(img.lock_owners().expect("owners").is_empty(), "no ITS: the last VMM released its lock");
    drop(img);
    rbd::remove(&io, IMAGE_NOITS).expect("remove the image");
    drop(io);
    drop(vm);
    ceph.stop().expect("Ceph stops");
}
