//! Not a test: the scheduler placing 10,000 pending VMs on 1,000 nodes.
//!
//! `cargo bench -p basalt-controller --bench scheduler`
//!
//! Three ways over the same cluster, in the same run:
//! - `plan_pending`: what the leader's reconciler calls (spread, index of Ready nodes);
//! - `place` per VM: the same rules and answer by a linear scan of every node;
//! - baseline: naive first-fit (same rules, first node in id order that fits, no spread).
//!
//! Each is run several times and the fastest run is reported, with ratios against the baseline.
//! Applying the resulting `AssignVm` commands to the state machine is timed too.

use std::hint::black_box;
use std::time::{Duration, Instant};

use basalt_controller::model::{Boot, Capacity, NodeRegistration, Power, VmSpec};
use basalt_controller::scheduler::{check_node, place, plan_pending, NodeView, VmRequirements};
use basalt_controller::state_machine::{ClusterState, Command};

const NODES: usize = 1_000;
const VMS: usize = 10_000;
const RUNS: usize = 5;

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn cluster() -> Result<ClusterState, String> {
    let mut rng = Rng(0x5EED_BA5A_17C0_FFEE);
    let mut st = ClusterState::new();
    let apply = |st: &mut ClusterState, cmd: Command| st.apply(cmd, 0).map(|_| ()).map_err(|e| e.to_string());
    for i in 0..NODES {
        let reg = NodeRegistration {
            id: format!("node-{i:04}"),
            address: format!("10.0.{}.{}:7100", i / 250, i % 250),
            arch: "aarch64".into(),
            capacity: Capacity {
                vcpus: [32, 64, 96, 128][rng.next(4) as usize],
                memory_mib: 1024 * [128, 256, 512][rng.next(3) as usize],
            },
            labels: [("rack".to_string(), format!("r{}", i % 20)), ("zone".to_string(), format!("z{}", i % 3))].into(),
            cpu_features: Default::default(),
            nics: Default::default(),
            nic_profile: Default::default(),
        };
        apply(&mut st, Command::RegisterNode(reg))?;
        if rng.next(50) == 0 {
            apply(&mut st, Command::CordonNode { id: format!("node-{i:04}") })?;
        }
    }
    for i in 0..VMS {
        let mut spec = VmSpec {
            vcpus: [1, 2, 4, 8][rng.next(4) as usize],
            memory_mib: 1024 * [1, 2, 4, 8, 16][rng.next(5) as usize],
            boot: Boot::Kernel {
                kernel: "/var/lib/basalt/Image".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            disks: vec![],
            labels: Default::default(),
            anti_affinity_group: None,
            required_labels: Default::default(),
            ha: false,
            nics: vec![],
        };
        if rng.next(10) == 0 {
            spec.anti_affinity_group = Some(format!("group-{}", rng.next(100)));
        }
        if rng.next(10) == 0 {
            spec.required_labels.insert("zone".into(), format!("z{}", rng.next(3)));
        }
        apply(&mut st, Command::CreateVm { name: format!("vm-{i:05}"), spec, desired_power: Power::Running })?;
    }
    Ok(st)
}

fn linear(st: &ClusterState) -> usize {
    let mut views = st.node_views();
    let mut placed = 0;
    for vm in st.pending_vms() {
        let req = VmRequirements::of(vm);
        if let Ok(id) = place(&req, &views) {
            if let Some(v) = views.iter_mut().find(|v| v.id == id) {
                v.add(&req);
                placed += 1;
            }
        }
    }
    placed
}

fn first_fit(st: &ClusterState) -> usize {
    let mut views: Vec<NodeView> = st.node_views();
    let mut placed = 0;
    for vm in st.pending_vms() {
        let req = VmRequirements::of(vm);
        if let Some(v) = views.iter_mut().find(|v| check_node(&req, v).is_ok()) {
            v.add(&req);
            placed += 1;
        }
    }
    placed
}

fn best_of(f: impl Fn() -> usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut placed = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        placed = black_box(f());
        best = best.min(t.elapsed());
    }
    (best, placed)
}

fn main() {
    let t = Instant::now();
    let st = match cluster() {
        Ok(st) => st,
        Err(e) => {
            eprintln!("building the cluster failed: {e}");
            std::process::exit(1);
        }
    };
    println!("cluster: {NODES} nodes, {VMS} pending VMs, built through the state machine in {:.1?}", t.elapsed());

    let (t_plan, n_plan) = best_of(|| plan_pending(&st).iter().filter(|(_, r)| r.is_ok()).count());
    let (t_lin, n_lin) = best_of(|| linear(&st));
    let (t_ff, n_ff) = best_of(|| first_fit(&st));
    let per = |d: Duration| d.as_secs_f64() * 1e6 / VMS as f64;
    println!("best of {RUNS} runs:");
    for (name, d, n) in [
        ("plan_pending (spread, indexed)", t_plan, n_plan),
        ("place() per VM (spread, linear)", t_lin, n_lin),
        ("baseline first-fit (linear)", t_ff, n_ff),
    ] {
        println!("  {name:<33} {:>9.2} ms total  {:>7.2} µs/VM  placed {n}/{VMS}", d.as_secs_f64() * 1e3, per(d));
    }
    println!("  ratio plan_pending / first-fit   {:.2}", t_plan.as_secs_f64() / t_ff.as_secs_f64());
    println!("  ratio place() linear / first-fit {:.2}", t_lin.as_secs_f64() / t_ff.as_secs_f64());
    assert_eq!(n_plan, n_lin, "plan_pending and place() must agree");

    // The reconciler then commits one AssignVm per placement.
    let plan = plan_pending(&st);
    let mut applied = st.clone();
    let t = Instant::now();
    let mut n = 0;
    for (name, r) in plan {
        if let Ok(node) = r {
            if applied.apply(Command::AssignVm { name, node }, 1).is_ok() {
                n += 1;
            }
        }
    }
    let d = t.elapsed();
    println!(
        "  applying {n} AssignVm commands     {:>9.2} ms total  {:>7.2} µs/command",
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e6 / n.max(1) as f64
    );
}
