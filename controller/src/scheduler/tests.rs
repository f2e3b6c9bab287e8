use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::model::{Boot, NodeRegistration, Power, VmSpec};
use crate::state_machine::Command;

fn node(id: &str, vcpus: u32, memory_mib: u64) -> NodeView {
    NodeView {
        id: id.into(),
        state: NodeState::Ready,
        capacity: Capacity { vcpus, memory_mib },
        used: Capacity::default(),
        labels: BTreeMap::new(),
        anti_affinity_groups: BTreeSet::new(),
    }
}

fn vm(name: &str, vcpus: u32, memory_mib: u64) -> VmRequirements {
    VmRequirements { name: name.into(), vcpus, memory_mib, required_labels: BTreeMap::new(), anti_affinity_group: None }
}

fn with_used(mut n: NodeView, vcpus: u32, memory_mib: u64) -> NodeView {
    n.used = Capacity { vcpus, memory_mib };
    n
}

#[test]
fn needs_free_vcpus_and_memory() {
    let nodes = [with_used(node("a", 8, 8192), 6, 0), with_used(node("b", 8, 8192), 0, 7168)];
    let r = place(&vm("x", 4, 2048), &nodes).expect_err("nothing fits");
    assert_eq!(r.to_string(), "no node fits vm x (4 vCPUs, 2048 MiB): 1 lacks vCPUs, 1 lacks memory");
    // Exactly what is free fits.
    assert_eq!(place(&vm("x", 4, 1024), &nodes), Ok("b".to_string()));
    assert_eq!(place(&vm("x", 2, 1025), &nodes), Ok("a".to_string()));
}

#[test]
fn only_ready_nodes() {
    let mut nodes: Vec<NodeView> = ["a", "b", "c", "d"].iter().map(|id| node(id, 8, 8192)).collect();
    nodes[0].state = NodeState::Cordoned;
    nodes[1].state = NodeState::Unreachable;
    nodes[2].state = NodeState::Fenced;
    assert_eq!(place(&vm("x", 1, 512), &nodes), Ok("d".to_string()));
    nodes[3].state = NodeState::Cordoned;
    let r = place(&vm("x", 1, 512), &nodes).expect_err("none ready");
    assert_eq!(r.reasons, vec![(Reason::Cordoned, 2), (Reason::Unreachable, 1), (Reason::Fenced, 1)]);
    assert_eq!(r.to_string(), "no node fits vm x (1 vCPUs, 512 MiB): 2 cordoned, 1 unreachable, 1 fenced");
}

#[test]
fn required_labels_all_match() {
    let mut a = node("a", 8, 8192);
    a.labels = BTreeMap::from([("rack".into(), "r1".into()), ("ssd".into(), "yes".into())]);
    let mut b = node("b", 8, 8192);
    b.labels = BTreeMap::from([("rack".into(), "r1".into())]);
    let mut x = vm("x", 1, 512);
    x.required_labels = BTreeMap::from([("rack".into(), "r1".into()), ("ssd".into(), "yes".into())]);
    assert_eq!(place(&x, &[b.clone(), a.clone()]), Ok("a".to_string()));
    x.required_labels.insert("rack".into(), "r2".into());
    let r = place(&x, &[a, b]).expect_err("no r2");
    assert_eq!(r.to_string(), "no node fits vm x (1 vCPUs, 512 MiB): 2 missing label rack=r2");
}

#[test]
fn anti_affinity_groups_keep_apart() {
    let mut a = node("a", 8, 8192);
    a.anti_affinity_groups.insert("web".into());
    let b = with_used(node("b", 8, 8192), 0, 4096);
    let mut x = vm("x", 1, 512);
    x.anti_affinity_group = Some("web".into());
    // a has more free memory but already runs a web VM.
    assert_eq!(place(&x, &[a.clone(), b.clone()]), Ok("b".to_string()));
    x.anti_affinity_group = Some("db".into());
    assert_eq!(place(&x, &[a.clone(), b.clone()]), Ok("a".to_string()));
    let mut b = b;
    b.anti_affinity_groups.insert("web".into());
    x.anti_affinity_group = Some("web".into());
    assert_eq!(
        place(&x, &[a, b]).expect_err("both have web").to_string(),
        "no node fits vm x (1 vCPUs, 512 MiB): 2 have anti-affinity group web"
    );
}

#[test]
fn spreads_by_free_memory_fraction_then_id() {
    // Fractions, not absolute amounts: c has the most MiB free but is 75% full.
    let nodes = [with_used(node("a", 8, 4096), 0, 1024), node("b", 8, 2048), with_used(node("c", 64, 65536), 0, 49152)];
    assert_eq!(place(&vm("x", 1, 512), &nodes), Ok("b".to_string()));
    // Equal fractions: the smallest id, whatever order the nodes come in.
    let tie = [node("n3", 4, 4096), node("n1", 8, 8192), node("n2", 4, 4096)];
    assert_eq!(place(&vm("x", 1, 512), &tie), Ok("n1".to_string()));
    let mut rev = tie.to_vec();
    rev.reverse();
    assert_eq!(place(&vm("x", 1, 512), &rev), Ok("n1".to_string()));
}

#[test]
fn explains_refusals_by_count() {
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(with_used(node(&format!("m{i}"), 8, 4096), 0, 4000));
    }
    for i in 0..2 {
        let mut n = node(&format!("c{i}"), 8, 65536);
        n.state = NodeState::Cordoned;
        nodes.push(n);
    }
    let mut l = node("l", 8, 65536);
    l.labels.insert("rack".into(), "r2".into());
    nodes.push(l);
    let mut w = node("w", 8, 65536);
    w.labels.insert("rack".into(), "r1".into());
    w.anti_affinity_groups.insert("web".into());
    nodes.push(w);
    for n in &mut nodes[..3] {
        n.labels.insert("rack".into(), "r1".into());
    }
    let mut x = vm("web-1", 1, 1024);
    x.required_labels.insert("rack".into(), "r1".into());
    x.anti_affinity_group = Some("web".into());
    let r = place(&x, &nodes).expect_err("nothing fits");
    assert_eq!(r.nodes, 7);
    assert_eq!(
        r.to_string(),
        "no node fits vm web-1 (1 vCPUs, 1024 MiB): 3 lack memory, 2 cordoned, 1 missing label rack=r1, 1 has anti-affinity group web"
    );
    assert_eq!(
        place(&x, &[]).expect_err("empty").to_string(),
        "no node fits vm web-1 (1 vCPUs, 1024 MiB): no nodes are registered"
    );
    assert_eq!(Reason::LacksMemory.to_string(), "lacks memory");
    assert_eq!(Reason::AntiAffinity { group: "web".into() }.to_string(), "has anti-affinity group web");
}

fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
    VmSpec {
        vcpus,
        memory_mib,
        boot: Boot::Kernel { kernel: "/k".into(), initrd: None, cmdline: String::new() },
        disks: vec![],
        labels: BTreeMap::new(),
        anti_affinity_group: None,
        required_labels: BTreeMap::new(),
        ha: false,
        nics: vec![],
    }
}

fn apply(st: &mut ClusterState, cmd: Command) {
    let dbg = format!("{cmd:?}");
    if let Err(e) = st.apply(cmd, 0) {
        panic!("{dbg}: {e}");
    }
}

fn register(st: &mut ClusterState, id: &str, vcpus: u32, memory_mib: u64, labels: &[(&str, &str)]) {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let reg = NodeRegistration {
        id: id.into(),
        address: format!("{id}:7100"),
        arch: "aarch64".into(),
        capacity: Capacity { vcpus, memory_mib },
        labels,
        cpu_features: Default::default(),
        nics: Default::default(),
        nic_profile: Default::default(),
    };
    apply(st, Command::RegisterNode(reg));
}

#[test]
fn plan_pending_counts_earlier_placements() {
    let mut st = ClusterState::new();
    register(&mut st, "n1", 8, 8192, &[]);
    register(&mut st, "n2", 8, 8192, &[]);
    // Created in this order; names sort the other way to show creation order wins.
    for name in ["c", "b", "a"] {
        apply(&mut st, Command::CreateVm { name: name.into(), spec: spec(6, 1024), desired_power: Power::Running });
    }
    apply(&mut st, Command::CreateVm { name: "off".into(), spec: spec(1, 512), desired_power: Power::Stopped });
    let plan = plan_pending(&st);
    let got: Vec<(&str, Result<&str, String>)> =
        plan.iter().map(|(v, r)| (v.as_str(), r.as_ref().map(String::as_str).map_err(|e| e.to_string()))).collect();
    assert_eq!(
        got,
        vec![
            ("c", Ok("n1")),
            ("b", Ok("n2")),
            ("a", Err("no node fits vm a (6 vCPUs, 1024 MiB): 2 lack vCPUs".to_string())),
        ]
    );
    // Placed VMs are not pending and count against their node.
    apply(&mut st, Command::AssignVm { name: "b".into(), node: "n1".into() });
    let plan = plan_pending(&st);
    assert_eq!(plan.len(), 2);
    assert_eq!(plan[0], ("c".to_string(), Ok("n2".to_string())));
    assert!(plan[1].1.is_err());
}

/// xorshift: deterministic "random" clusters without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn plan_pending_equals_placing_one_by_one() {
    for seed in 1..=5u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut st = ClusterState::new();
        for i in 0..40 {
            let labels = [("rack", ["r1", "r2", "r3"][rng.next(3) as usize])];
            register(&mut st, &format!("n{i:02}"), 4 + rng.next(29) as u32, 2048 * (1 + rng.next(16)), &labels);
            match rng.next(8) {
                0 => apply(&mut st, Command::CordonNode { id: format!("n{i:02}") }),
                1 => apply(
                    &mut st,
                    Command::SetNodeState {
                        id: format!("n{i:02}"),
                        state: NodeState::Unreachable,
                        reason: String::new(),
                    },
                ),
                _ => {}
            }
        }
        for i in 0..400 {
            let mut s = spec(1 + rng.next(8) as u32, 512 * (1 + rng.next(16)));
            if rng.next(4) == 0 {
                s.anti_affinity_group = Some(format!("g{}", rng.next(5)));
            }
            if rng.next(5) == 0 {
                s.required_labels.insert("rack".into(), format!("r{}", 1 + rng.next(3)));
            }
            apply(&mut st, Command::CreateVm { name: format!("vm{i:03}"), spec: s, desired_power: Power::Running });
        }
        // The reference: one linear place() per VM, in the same order.
        let mut views = st.node_views();
        let mut expected = Vec::new();
        for vm in st.pending_vms() {
            let req = VmRequirements::of(vm);
            let r = place(&req, &views);
            if let Ok(id) = &r {
                if let Some(v) = views.iter_mut().find(|v| &v.id == id) {
                    v.add(&req);
                }
            }
            expected.push((vm.name.clone(), r));
        }
        let plan = plan_pending(&st);
        assert_eq!(plan, expected, "seed {seed}");
        assert!(
            plan.iter().any(|(_, r)| r.is_err()) && plan.iter().any(|(_, r)| r.is_ok()),
            "seed {seed} exercises both"
        );
        // And committing the plan is accepted by the state machine, in order.
        for (name, r) in plan {
            if let Ok(node) = r {
                apply(&mut st, Command::AssignVm { name, node });
            }
        }
        assert!(plan_pending(&st).iter().all(|(_, r)| r.is_err()), "seed {seed}: what is left cannot be placed");
    }
}
