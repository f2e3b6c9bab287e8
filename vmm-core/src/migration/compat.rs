//! Can this host take that VM? The sender describes its host and its VM in
//! an [`Offer`]; the receiver compares it with its own before any guest
//! byte moves and refuses with the first reason it finds.

use serde::{Deserialize, Serialize};

/// What a guest may have seen of its host, and what KVM must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCaps {
    pub arch: String,
    pub page_size: u64,
    /// The generic timer's frequency (CNTFRQ_EL0), Hz.
    pub cntfrq: u64,
    /// The VM's guest-physical address size, and the most this host's KVM offers.
    pub ipa_bits: u32,
    pub max_ipa_bits: u32,
    /// The vGIC's GICD_IIDR: implementer, product and KVM's implementation revision.
    pub gic_iidr: u32,
    /// Interrupt IDs the VM's vGIC was created with (absent before protocol
    /// version 2, whose VMMs made 128).
    #[serde(default = "nr_irqs_before_v2")]
    pub gic_nr_irqs: u32,
    /// vCPU feature ID registers (KVM id, value), as KVM shows them to the guest.
    pub id_regs: Vec<(u64, u64)>,
    /// KVM_CAP_COUNTER_OFFSET: one counter offset for the whole VM.
    pub counter_offset: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskShape {
    /// `rbd` or `file`.
    pub kind: String,
    /// `pool/image`, or the file's path.
    pub target: String,
    pub read_only: bool,
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub its: bool,
    pub disks: Vec<DiskShape>,
    /// The NICs' MACs, in order.
    #[serde(default)]
    pub nics: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub host: HostCaps,
    pub vm: VmShape,
}

fn nr_irqs_before_v2() -> u32 {
    128
}

/// GICD_IIDR's revision field; the other fields name the implementation.
const IIDR_REVISION: u32 = 0xf << 12;

/// Why `ours` (the receiver) cannot take the VM `theirs` describes.
pub fn check(ours: &Offer, theirs: &Offer) -> Result<(), String> {
    let (h, t) = (&ours.host, &theirs.host);
    if h.arch != t.arch || h.page_size != t.page_size {
        return Err(format!(
            "the sender is {} with {}-byte pages, this host {} with {}-byte pages",
            t.arch, t.page_size, h.arch, h.page_size
        ));
    }
    let (v, w) = (&ours.vm, &theirs.vm);
    if v.memory_bytes != w.memory_bytes {
        return Err(format!(
            "memory size differs: the VM has {} MiB, this receiver was started with {} MiB",
            w.memory_bytes >> 20,
            v.memory_bytes >> 20
        ));
    }
    if v.vcpus != w.vcpus {
        return Err(format!("vCPU count differs: the VM has {}, this receiver {}", w.vcpus, v.vcpus));
    }
    if v.its != w.its {
        return Err(format!("device set differs: the VM {} ITS, this receiver {}", has(w.its), has(v.its)));
    }
    if v.nics != w.nics {
        return Err(format!("device set differs: the VM has NICs {:?}, this receiver {:?}", w.nics, v.nics));
    }
    if v.disks.len() != w.disks.len() {
        return Err(format!("device set differs: the VM has {} disks, this receiver {}", w.disks.len(), v.disks.len()));
    }
    for (i, (a, b)) in v.disks.iter().zip(&w.disks).enumerate() {
        if b.kind != "rbd" {
            return Err(format!(
                "disk {i} ({}) is a local {}: only RBD disks can move between hosts",
                b.target, b.kind
            ));
        }
        if a != b {
            return Err(format!(
                "disk {i} differs: the VM has {} {}{} of {} bytes, this receiver {} {}{} of {} bytes",
                b.kind,
                b.target,
                if b.read_only { " (read-only)" } else { "" },
                b.capacity_bytes,
                a.kind,
                a.target,
                if a.read_only { " (read-only)" } else { "" },
                a.capacity_bytes
            ));
        }
    }
    if h.cntfrq != t.cntfrq {
        return Err(format!(
            "timer frequency (CNTFRQ) differs: the sender's is {} Hz, this host's {} Hz",
            t.cntfrq, h.cntfrq
        ));
    }
    if h.max_ipa_bits < t.ipa_bits {
        return Err(format!(
            "the VM uses a {}-bit IPA space, this host's KVM offers at most {} bits",
            t.ipa_bits, h.max_ipa_bits
        ));
    }
    if (h.gic_iidr & !IIDR_REVISION) != (t.gic_iidr & !IIDR_REVISION)
        || h.gic_iidr & IIDR_REVISION < t.gic_iidr & IIDR_REVISION
    {
        return Err(format!(
            "GIC implementation differs: the VM's GICD_IIDR is {:#x}, this host's {:#x} (same implementation, same or later revision needed)",
            t.gic_iidr, h.gic_iidr
        ));
    }
    if h.gic_nr_irqs != t.gic_nr_irqs {
        return Err(format!(
            "the VM's vGIC has {} interrupt IDs, this receiver's {}: the two basalt-vmm versions cannot hand a VM over live",
            t.gic_nr_irqs, h.gic_nr_irqs
        ));
    }
    for (id, val) in &t.id_regs {
        match h.id_regs.iter().find(|(i, _)| i == id) {
            Some((_, mine)) if mine == val => {}
            Some((_, mine)) => {
                return Err(format!(
                    "vCPU feature register {} differs: the VM sees {val:#018x}, this host offers {mine:#018x}",
                    id_reg_name(*id)
                ))
            }
            None => return Err(format!("this host's KVM has no vCPU feature register {}", id_reg_name(*id))),
        }
    }
    Ok(())
}

fn has(b: bool) -> &'static str {
    if b {
        "has an"
    } else {
        "has no"
    }
}

/// `ID_AA64PFR0_EL1` and friends by their encoding, for messages.
pub fn id_reg_name(id: u64) -> String {
    let crm = (id >> 3) & 0xf;
    let op2 = id & 7;
    let name = match (crm, op2) {
        (4, 0) => "ID_AA64PFR0_EL1",
        (4, 1) => "ID_AA64PFR1_EL1",
        (4, 4) => "ID_AA64ZFR0_EL1",
        (5, 0) => "ID_AA64DFR0_EL1",
        (5, 1) => "ID_AA64DFR1_EL1",
        (6, 0) => "ID_AA64ISAR0_EL1",
        (6, 1) => "ID_AA64ISAR1_EL1",
        (6, 2) => "ID_AA64ISAR2_EL1",
        (7, 0) => "ID_AA64MMFR0_EL1",
        (7, 1) => "ID_AA64MMFR1_EL1",
        (7, 2) => "ID_AA64MMFR2_EL1",
        _ => return format!("S3_0_C0_C{crm}_{op2}"),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            host: HostCaps {
                arch: "aarch64".into(),
                page_size: 4096,
                cntfrq: 62_500_000,
                ipa_bits: 40,
                max_ipa_bits: 44,
                gic_iidr: 0x0300_243b,
                gic_nr_irqs: 64,
                id_regs: vec![(crate::arch::aarch64::regs::sys_reg(3, 0, 0, 4, 0), 0x1100_0011)],
                counter_offset: false,
            },
            vm: VmShape {
                vcpus: 2,
                memory_bytes: 256 << 20,
                its: true,
                nics: vec!["52:54:00:00:00:01".into()],
                disks: vec![DiskShape {
                    kind: "rbd".into(),
                    target: "rbd/vm1".into(),
                    read_only: false,
                    capacity_bytes: 1 << 30,
                }],
            },
        }
    }

    #[test]
    fn the_receiver_refuses_what_it_cannot_run_and_says_why() {
        assert_eq!(check(&offer(), &offer()), Ok(()));
        let refused = |f: &dyn Fn(&mut Offer), want: &str| {
            let mut theirs = offer();
            f(&mut theirs);
            let e = check(&offer(), &theirs).expect_err(want);
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        refused(&|o| o.vm.memory_bytes = 512 << 20, "memory size differs: the VM has 512 MiB");
        refused(&|o| o.vm.vcpus = 4, "vCPU count differs");
        refused(&|o| o.vm.its = false, "the VM has no ITS, this receiver has an");
        refused(&|o| o.vm.disks.clear(), "the VM has 0 disks");
        refused(&|o| o.vm.disks[0].target = "rbd/other".into(), "disk 0 differs");
        refused(&|o| o.vm.disks[0].kind = "file".into(), "only RBD disks can move");
        refused(&|o| o.host.cntfrq = 100_000_000, "CNTFRQ");
        refused(&|o| o.host.ipa_bits = 48, "48-bit IPA");
        refused(&|o| o.host.gic_iidr = 0x0400_243b, "GIC implementation differs");
        refused(&|o| o.host.gic_iidr = 0x0300_343b, "later revision");
        refused(&|o| o.host.gic_nr_irqs = 128, "vGIC has 128 interrupt IDs, this receiver's 64");
        refused(&|o| o.host.id_regs[0].1 = 0x1100_0022, "ID_AA64PFR0_EL1 differs");
        refused(
            &|o| o.host.id_regs.push((crate::arch::aarch64::regs::sys_reg(3, 0, 0, 6, 2), 0)),
            "no vCPU feature register ID_AA64ISAR2_EL1",
        );
        // An older GIC revision on the sender is fine: KVM restores it.
        let mut older = offer();
        older.host.gic_iidr = 0x0300_143b;
        assert_eq!(check(&offer(), &older), Ok(()));
    }
}
