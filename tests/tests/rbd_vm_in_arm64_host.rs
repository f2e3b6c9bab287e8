//! A VM whose disk is an RBD image, on a real Ceph, inside an emulated arm64
//! host: the shape of the end-to-end tests (agents on emulated hosts).
//!
//! Ceph runs in the rig's network namespace on the bridge address
//! ([`NetnsCeph`]); the emulated host joins the bridge and runs the
//! dynamically linked `basalt-vmm` (librbd from the libs disk). Its guest
//! writes a pattern to the RBD disk with O_DIRECT and powers off; this test,
//! itself moved into the namespace, reads the pattern back from the image
//! with basalt-storage. While the first VMM runs, a second `basalt-vmm` on the
//! same image must refuse to start: the exclusive lock is held.

use std::time::{Duration, Instant};

mod common;
use common::vm_client;

use basalt_storage::rbd::{self, features, Image, ImageOptions};
use basalt_tests::rig::{guest, netns::BRIDGE_ADDR, Arm64Host, Artifacts, Netns, NetnsCeph};

const IMAGE: &str = "vm-disk-rig";
const IMAGE_SIZE: u64 = 64 << 20;
/// Where the guest writes: 32 KiB before the first 4 MiB object boundary,
/// so the write spans two RADOS objects.
const PATTERN_OFFSET: u64 = (4 << 20) - (32 << 10);
const PATTERN_LINES: usize = 2000;
/// The VMM's second disk, a file in the host's tmpfs: the guest waits until
/// the host writes GO into it (after the second VMM was refused).
const GO_SECTORS: u64 = 2048;

fn pattern() -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..PATTERN_LINES {
        p.extend_from_slice(format!("basalt-rbd-pattern-line-{i:05}\n").as_bytes());
    }
    p
}

fn guest_script() -> String {
    format!(
        r#"
rbd=""; go=""
for b in /sys/block/vd*; do
  case $(cat $b/size) in {rbd_sectors}) rbd=/dev/${{b##*/}};; {go_sectors}) go=/dev/${{b##*/}};; esac
done
echo "GUEST-DISKS rbd=$rbd go=$go serial=$(cat /sys/block/${{rbd#/dev/}}/serial)"
: > /tmp/p; i=0
while [ $i -lt {lines} ]; do printf 'basalt-rbd-pattern-line-%05d\n' $i >> /tmp/p; i=$((i+1)); done
n=$(wc -c < /tmp/p)
# whole 4 KiB blocks for O_DIRECT; conv=sync pads the last one with zeroes
dd if=/tmp/p of=/tmp/pp bs=4096 conv=sync 2>/dev/null
blocks=$(( $(wc -c < /tmp/pp) / 4096 ))
if dd if=/tmp/pp of=$rbd bs=4096 seek={seek} oflag=direct conv=fsync 2>/tmp/dd.err; then
  echo "GUEST-PATTERN-WRITTEN bytes=$n blocks=$blocks"
else
  echo "GUEST-WRITE-FAILED $(cat /tmp/dd.err)"
fi
dd if=$rbd of=/tmp/q bs=4096 skip={seek} count=$blocks iflag=direct 2>/dev/null
cmp /tmp/pp /tmp/q && echo "GUEST-READBACK-OK"
echo "GUEST-WAITING-FOR-GO"
while ! dd if=$go bs=4096 count=1 iflag=direct 2>/dev/null | grep -q BASALT-GO; do sleep 1; done
echo "GUEST-GOT-GO"
"#,
        rbd_sectors = IMAGE_SIZE / 512,
        go_sectors = GO_SECTORS,
        lines = PATTERN_LINES,
        seek = PATTERN_OFFSET / 4096,
    )
}

fn vm_json(go_disk: &str) -> String {
    serde_json::json!({
        "vcpus": 1,
        "memory_mib": 256,
        "kernel": "/basalt/guest/Image",
        "initrd": "/basalt/guest/initrd",
        "cmdline": "console=ttyS0 panic=-1 quiet",
        "disks": [
            {
                "backend": { "rbd": {
                    "pool": "rbd",
                    "image": IMAGE,
                    "client": {
                        "conf": "/basalt/ceph/ceph.conf",
                        "id": "vm",
                        "keyring": "/basalt/ceph/ceph.client.vm.keyring",
                    },
                } },
                "serial": "basalt-rbd0",
            },
            { "backend": { "file": { "path": go_disk } } },
        ],
    })
    .to_string()
}

const HOST: &str = r#"
echo "HOST-DATE $(date -u +%Y-%m-%dT%H:%M:%S)"
ok=0
for i in $(seq 1 60); do
  if ping -c 1 -W 1 BRIDGE >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || { echo "HOST: BRIDGE unreachable"; exit 4; }
echo "HOST-REACHED-BRIDGE"
dd if=/dev/zero of=/tmp/go1.img bs=512 count=GO_SECTORS 2>/dev/null
# the second VMM's go disk says GO already: if it wrongly started, its guest ends at once
dd if=/dev/zero of=/tmp/go2.img bs=512 count=GO_SECTORS 2>/dev/null
printf 'BASALT-GO' | dd of=/tmp/go2.img conv=notrunc 2>/dev/null

( basalt-vmm --config /basalt/vm1.json; echo "VMM1-EXIT rc=$?" ) 2>&1 | tee /tmp/vmm1.log &
# the first VMM takes the exclusive lock when it opens the disk, before the guest boots;
# wait until the guest has written its pattern
while ! grep -q -e GUEST-WAITING-FOR-GO -e VMM1-EXIT /tmp/vmm1.log 2>/dev/null; do sleep 1; done

echo "HOST-STARTING-VMM2"
t0=$(cut -d' ' -f1 /proc/uptime)
timeout 240 basalt-vmm --config /basalt/vm2.json > /tmp/vmm2.log 2>&1
rc2=$?
sed 's/^/vmm2: /' /tmp/vmm2.log
echo "VMM2-EXIT rc=$rc2 started=$t0 ended=$(cut -d' ' -f1 /proc/uptime)"

printf 'BASALT-GO' | dd of=/tmp/go1.img conv=notrunc 2>/dev/null
wait
grep -q "VMM1-EXIT rc=0" /tmp/vmm1.log
"#;

#[test]
fn a_vm_in_an_emulated_host_uses_an_rbd_disk_on_ceph_in_the_netns() {
    let arts = Artifacts::locate().expect("rig artifacts");
    // Dropped in reverse order: the client, then Ceph (down by pid), then the namespace.
    let mut ns = Netns::create("basalt-rbd").expect("network namespace");
    let t = Instant::now();
    let ceph = NetnsCeph::start(&ns).expect("Ceph in the namespace");
    eprintln!("Ceph in namespace {} up in {:.1?}", ns.name(), t.elapsed());
    ns.enter_current_thread().expect("enter the namespace");

    let vm = vm_client(&ceph);
    let io = vm.ioctx("rbd").expect("pool rbd");
    let opts = ImageOptions { features: Some(features::VM_DEFAULT), ..Default::default() };
    rbd::create(&io, IMAGE, IMAGE_SIZE, &opts).expect("create the image");

    let keyring = std::fs::read(ceph.vm_keyring()).expect("vm keyring");
    let conf = ceph.host_conf("/basalt/ceph/ceph.client.vm.keyring").expect("host ceph.conf");
    let host = Arm64Host::new("rbd-host")
        .memory_mib(2048)
        .timeout(Duration::from_secs(480))
        .nic(ns.add_host_nic(11).expect("tap"))
        .libs(&arts)
        .expect("libs disk")
        .arm64_dynamic_bin(&arts, "basalt-vmm")
        .expect("dynamic basalt-vmm (deploy/cross/build)")
        .file("guest/Image", guest::kernel(&arts).expect("guest kernel"), 0o644)
        .file("guest/initrd", guest::initramfs(&arts, &guest_script()).expect("guest initramfs"), 0o644)
        .file("ceph/ceph.conf", conf.into_bytes(), 0o644)
        .file("ceph/ceph.client.vm.keyring", keyring, 0o600)
        .file("vm1.json", vm_json("/tmp/go1.img").into_bytes(), 0o644)
        .file("vm2.json", vm_json("/tmp/go2.img").into_bytes(), 0o644)
        .script(&HOST.replace("BRIDGE", BRIDGE_ADDR).replace("GO_SECTORS", &GO_SECTORS.to_string()));
    let out = host.run().expect("host runs");
    eprintln!("emulated host ran {:.1?}", out.wall);
    let text = out.command_output();

    // The second VMM was refused because the first held the lock.
    let vmm2: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("vmm2: ")).collect();
    let vmm2 = vmm2.join("\n");
    assert!(text.contains("HOST-STARTING-VMM2"), "{}", out.console);
    assert!(text.contains("VMM2-EXIT rc=1 "), "the second VMM must fail to start (exit 1): {text}");
    assert!(
        vmm2.contains("cannot start the VM")
            && vmm2.contains(&format!("disk 0: acquire exclusive lock on rbd/{IMAGE}")),
        "the second VMM names the lock it could not take: {vmm2}"
    );
    assert!(!vmm2.contains("GUEST-"), "the second VMM's guest never ran: {vmm2}");

    // The first VMM ran its guest to the end.
    out.assert_success();
    assert!(text.contains("GUEST-DISKS rbd=/dev/vd") && text.contains("serial=basalt-rbd0"), "{text}");
    assert!(!text.contains("GUEST-WRITE-FAILED"), "{text}");
    assert!(text.contains("GUEST-PATTERN-WRITTEN"), "{text}");
    assert!(text.contains("GUEST-READBACK-OK"), "{text}");
    assert!(text.contains("GUEST-GOT-GO") && text.contains("BASALT-GUEST-END"), "{text}");
    assert!(text.contains("basalt-vmm: the guest powered off"), "{text}");
    assert!(text.contains("VMM1-EXIT rc=0"), "{text}");

    // The bytes are in the image, read by another client (this test).
    let img = Image::open(&io, IMAGE).expect("open the image");
    assert!(img.lock_owners().expect("lock owners").is_empty(), "the VMM released its lock when it exited");
    let want = pattern();
    let padded = want.len().div_ceil(4096) * 4096;
    let got = img.read_at(PATTERN_OFFSET, padded).expect("read the image");
    assert!(got[..want.len()] == want[..], "the guest's pattern is in the RBD image");
    assert!(got[want.len()..].iter().all(|&b| b == 0), "the padding of the last block is zeroes");
    assert!(
        img.read_at(PATTERN_OFFSET - 4096, 4096).expect("read").iter().all(|&b| b == 0),
        "nothing written before the pattern"
    );
    drop(img);
    rbd::remove(&io, IMAGE).expect("remove the image");
    drop(io);
    drop(vm);
    ceph.stop().expect("Ceph stops");
}
