//! basalt-vmm boots Debian's arm64 kernel with a small initramfs inside the
//! emulated arm64 host (real KVM, real vGICv3), with 1 and 2 vCPUs, and
//! gives the guest two disks backed by the host's block devices (which are files
//! on this machine): the guest writes a pattern, reads it back, discards a
//! range, reads its serial, and fails to write the read-only disk. The test
//! then checks the bytes in the backing file itself.

use basalt_tests::rig::{guest, Artifacts};

const RW_SIZE: u64 = 64 << 20;
const RO_SIZE: u64 = 16 << 20;
const MIB: usize = 1 << 20;

const GUEST: &str = r#"
rw=""; ro=""
for b in /sys/block/vd*; do
  case $(cat $b/size) in 131072) rw=/dev/${b##*/};; 32768) ro=/dev/${b##*/};; esac
done
echo "BOOTED cpus=$(nproc)"
echo "DISKS rw=$rw ro=$ro serial=$(cat /sys/block/${rw#/dev/}/serial) ro-flag=$(cat /sys/block/${ro#/dev/}/ro)"
: > /tmp/p; i=0
while [ $i -lt 200 ]; do echo "basalt-disk-pattern-line-$i" >> /tmp/p; i=$((i+1)); done
n=$(wc -c < /tmp/p)
dd if=/tmp/p of=$rw bs=512 seek=8 conv=fsync 2>/dev/null || echo "WRITE-FAILED"
echo 3 > /proc/sys/vm/drop_caches
dd if=$rw bs=512 skip=8 count=$(( (n + 511) / 512 )) 2>/dev/null | head -c $n > /tmp/q
cmp /tmp/p /tmp/q && echo "PATTERN-READBACK-OK bytes=$n"
blkdiscard -o 1048576 -l 1048576 $rw && echo "DISCARD-OK"
sync
echo "RO-HEAD $(head -c 22 $ro)"
if dd if=/dev/zero of=$ro bs=512 count=1 conv=fsync 2>/dev/null; then echo "RO-WRITE-ACCEPTED"; else echo "RO-WRITE-REFUSED"; fi
"#;

const HOST: &str = r#"
d0=""; d1=""
for b in /sys/block/vd*; do
  case $(cat $b/size) in 131072) d0=/dev/${b##*/};; 32768) d1=/dev/${b##*/};; esac
done
echo "HOST-DISKS $d0 $d1"
basalt-vmm --kernel guest/Image --initrd guest/initrd --memory 256 --vcpus VCPUS \
    --cmdline 'console=ttyS0 panic=-1 quiet' --disk $d0 --disk $d1,ro
rc=$?
echo "VMM-EXIT rc=$rc"
exit $rc
"#;

#[test]
fn one_vcpu_guest_boots_and_uses_its_disks() {
    boot_and_use_disks(1);
}

#[test]
fn two_vcpu_guest_boots_and_uses_its_disks() {
    boot_and_use_disks(2);
}

fn boot_and_use_disks(vcpus: u32) {
    let arts = Artifacts::locate().expect("rig artifacts");
    let dir = tempfile::tempdir().expect("tmp");
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    let mut rw_bytes = vec![0u8; RW_SIZE as usize];
    rw_bytes[MIB..2 * MIB].fill(0xaa); // the guest discards this range
    std::fs::write(&rw, &rw_bytes).expect("rw disk");
    let mut ro_bytes = vec![0u8; RO_SIZE as usize];
    ro_bytes[..22].copy_from_slice(b"BASALT-RO-DISK-CONTENT");
    std::fs::write(&ro, &ro_bytes).expect("ro disk");

    let out = guest::vmm_host(&arts, &format!("vmm-block-{vcpus}"), GUEST)
        .expect("VMM host")
        .disk(&rw)
        .disk(&ro)
        .script(&HOST.replace("VCPUS", &vcpus.to_string()))
        .run()
        .expect("host runs");
    out.assert_success();
    let text = out.command_output();
    assert!(text.contains(&format!("BOOTED cpus={vcpus}")), "{text}");
    assert!(text.contains("BASALT-GUEST-END"), "the guest's init ran to its end: {text}");
    assert!(text.contains("basalt-vmm: the guest powered off"), "{text}");
    assert!(text.contains("serial=basalt-disk0 ro-flag=1"), "{text}");
    assert!(text.contains("PATTERN-READBACK-OK"), "{text}");
    assert!(!text.contains("WRITE-FAILED"), "{text}");
    assert!(text.contains("DISCARD-OK"), "{text}");
    assert!(text.contains("RO-HEAD BASALT-RO-DISK-CONTENT"), "{text}");
    assert!(text.contains("RO-WRITE-REFUSED"), "{text}");
    assert!(text.contains("VMM-EXIT rc=0"), "{text}");

    let after = std::fs::read(&rw).expect("read back");
    let mut want = String::new();
    for i in 0..200 {
        want.push_str(&format!("basalt-disk-pattern-line-{i}\n"));
    }
    assert_eq!(&after[4096..4096 + want.len()], want.as_bytes(), "the guest's pattern is in the backing file");
    assert!(after[MIB..2 * MIB].iter().all(|&b| b == 0), "the discarded range reads as zeroes");
    assert_eq!(std::fs::read(&ro).expect("ro"), ro_bytes, "the read-only disk is untouched");
}
