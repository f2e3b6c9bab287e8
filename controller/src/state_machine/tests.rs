use std::collections::BTreeMap;

use super::*;
use crate::error::Code;
use crate::model::{Boot, Capacity, Disk, HostNic, ImageRemoval, NicSetting, ProfileKind, StorageState, StorageStatus, StorageSubject};

const T: u64 = 1_700_000_000_000;

fn reg(id: &str, vcpus: u32, memory_mib: u64, labels: &[(&str, &str)]) -> Command {
    Command::RegisterNode(NodeRegistration {
        id: id.into(),
        address: format!("{id}.example:7100"),
        arch: "aarch64".into(),
        capacity: Capacity { vcpus, memory_mib },
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cpu_features: ["fp", "asimd", "aes"].map(String::from).into(),
        nics: vec![],
        nic_profile: String::new(),
    })
}

fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
    VmSpec {
        vcpus,
        memory_mib,
        boot: Boot::Kernel { kernel: "/var/lib/basalt/Image".into(), initrd: None, cmdline: "console=ttyS0".into() },
        disks: vec![],
        labels: BTreeMap::new(),
        anti_affinity_group: None,
        required_labels: BTreeMap::new(),
        ha: false,
        nics: vec![],
    }
}

fn create_vm(name: &str, spec: VmSpec) -> Command {
    Command::CreateVm { name: name.into(), spec, desired_power: Power::Running }
}

fn replicated(name: &str) -> StorageProfile {
    StorageProfile {
        name: name.into(),
        kind: ProfileKind::Replicated { size: 3, min_size: 2 },
        osd_tunables: BTreeMap::new(),
    }
}

fn volume(name: &str, profile: &str) -> Volume {
    Volume {
        name: name.into(),
        pool: "rbd".into(),
        image: format!("img-{name}"),
        size_bytes: 10 << 30,
        profile: profile.into(),
    }
}

fn ok(st: &mut ClusterState, cmd: Command) -> Response {
    let dbg = format!("{cmd:?}");
    let r = st.apply(cmd, T + st.revision()).unwrap_or_else(|e| panic!("{dbg} refused: {e}"));
    // The per-node index must always be what a snapshot restore would rebuild.
    let rebuilt = ClusterState::restore(&st.snapshot().expect("snapshot")).expect("restore");
    assert_eq!(st.by_node, rebuilt.by_node, "after {dbg}");
    assert_eq!(st.active_migrations, rebuilt.active_migrations, "after {dbg}");
    assert_eq!(st.leases, rebuilt.leases, "after {dbg}");
    r
}

/// Applies a command that must be refused with `code` and a message
/// containing `needle`, and checks it changed nothing at all.
#[track_caller]
fn refused(st: &mut ClusterState, cmd: Command, code: Code, needle: &str) -> CommandError {
    let before = st.clone();
    let bytes = st.snapshot().expect("snapshot");
    let dbg = format!("{cmd:?}");
    let e = st.apply(cmd, T + 999).expect_err(&format!("{dbg} must be refused"));
    assert_eq!(e.code(), code, "{dbg}: {e}");
    assert!(e.message().contains(needle), "{dbg}: {e:?} should mention {needle:?}");
    assert_eq!(*st, before, "{dbg} was refused but changed the state");
    assert_eq!(st.snapshot().expect("snapshot"), bytes);
    e
}

/// Two nodes, a profile, two volumes.
fn cluster() -> ClusterState {
    let mut st = ClusterState::new();
    ok(&mut st, reg("n1", 8, 16384, &[("rack", "r1")]));
    ok(&mut st, reg("n2", 8, 16384, &[("rack", "r2")]));
    ok(&mut st, Command::CreateProfile(replicated("fast")));
    ok(&mut st, Command::CreateVolume(volume("root", "fast")));
    ok(&mut st, Command::CreateVolume(volume("data", "fast")));
    st
}

fn report(st: &mut ClusterState, vm: &str, node: &str, phase: VmPhase) {
    ok(st, Command::ReportVmStatus { name: vm.into(), node: node.into(), phase, message: String::new() });
}

#[test]
fn register_node_is_validated() {
    let mut st = ClusterState::new();
    refused(&mut st, reg("N1", 8, 1024, &[]), Code::InvalidArgument, "node name \"N1\"");
    refused(&mut st, reg("n1", 0, 1024, &[]), Code::InvalidArgument, "0 vCPUs");
    refused(&mut st, reg("n1", 5000, 1024, &[]), Code::InvalidArgument, "5000 vCPUs");
    refused(&mut st, reg("n1", 8, 128, &[]), Code::InvalidArgument, "128 MiB");
    refused(&mut st, reg("n1", 8, 1024, &[("bad key", "x")]), Code::InvalidArgument, "label key");
    let Command::RegisterNode(mut r) = reg("n1", 8, 1024, &[]) else { unreachable!() };
    r.arch = "x86_64".into();
    refused(&mut st, Command::RegisterNode(r.clone()), Code::InvalidArgument, "arch \"x86_64\"");
    r.arch = "aarch64".into();
    r.address = "nohost".into();
    refused(&mut st, Command::RegisterNode(r.clone()), Code::InvalidArgument, "host:port");
    r.address = "h:99999".into();
    refused(&mut st, Command::RegisterNode(r.clone()), Code::InvalidArgument, "host:port");
    r.address = "n1.example:7100".into();
    r.nics = vec![HostNic { name: String::new(), ..Default::default() }];
    refused(&mut st, Command::RegisterNode(r.clone()), Code::InvalidArgument, "a name is needed");
    r.nics = vec![HostNic { name: "eth0".into(), driver: "x".repeat(300), ..Default::default() }];
    refused(&mut st, Command::RegisterNode(r.clone()), Code::InvalidArgument, "256 bytes");
    r.nics = vec![HostNic::default(); 65];
    refused(&mut st, Command::RegisterNode(r.clone()), Code::InvalidArgument, "at most 64");
    // What the agent found and tuned is kept with the node.
    r.nics = vec![HostNic {
        name: "eth0".into(),
        driver: "virtio_net".into(),
        speed_mbps: -1,
        rx_queues: 1,
        tx_queues: 1,
        timestamping: vec!["software-receive".into()],
        ptp_clock: -1,
        settings: vec![NicSetting { knob: "rx-0 rps".into(), cpus: "0-1".into(), error: String::new() }],
    }];
    r.nic_profile = "spread".into();
    ok(&mut st, Command::RegisterNode(r.clone()));
    let n = st.node("n1").expect("n1");
    assert_eq!((n.nics.clone(), n.nic_profile.as_str()), (r.nics.clone(), "spread"));

    ok(&mut st, reg("n1", 8, 1024, &[]));
    assert_eq!(st.node("n1").map(|n| n.state), Some(NodeState::Ready));
    // Re-registering refreshes what the agent reports but keeps the state an operator set.
    ok(&mut st, Command::CordonNode { id: "n1".into() });
    ok(&mut st, reg("n1", 16, 2048, &[("ssd", "yes")]));
    let n = st.node("n1").expect("n1");
    assert_eq!((n.capacity.vcpus, n.capacity.memory_mib, n.state), (16, 2048, NodeState::Cordoned));
    assert_eq!(st.events().iter().last().map(|e| e.kind), Some(EventKind::NodeUpdated));
}

#[test]
fn node_state_transitions_go_through_unreachable_to_fenced() {
    let mut st = cluster();
    let set = |id: &str, state| Command::SetNodeState { id: id.into(), state, reason: "lease expired".into() };
    refused(&mut st, set("n9", NodeState::Cordoned), Code::NotFound, "node n9 does not exist");
    refused(&mut st, set("n1", NodeState::Fenced), Code::FailedPrecondition, "from Ready to Fenced");
    refused(&mut st, set("n1", NodeState::Ready), Code::FailedPrecondition, "already Ready");
    refused(&mut st, Command::UncordonNode { id: "n1".into() }, Code::FailedPrecondition, "not Cordoned");
    ok(&mut st, Command::CordonNode { id: "n1".into() });
    refused(&mut st, Command::CordonNode { id: "n1".into() }, Code::FailedPrecondition, "already Cordoned");
    ok(&mut st, Command::UncordonNode { id: "n1".into() });
    ok(&mut st, set("n1", NodeState::Unreachable));
    ok(&mut st, set("n1", NodeState::Ready)); // heartbeats came back before the fence
    ok(&mut st, set("n1", NodeState::Unreachable));
    ok(&mut st, set("n1", NodeState::Fenced));
    refused(&mut st, set("n1", NodeState::Ready), Code::FailedPrecondition, "Cordoned first");
    refused(&mut st, set("n1", NodeState::Unreachable), Code::FailedPrecondition, "from Fenced to Unreachable");
    refused(&mut st, reg("n1", 8, 16384, &[]), Code::FailedPrecondition, "is Fenced");
    ok(&mut st, set("n1", NodeState::Cordoned));
    ok(&mut st, Command::UncordonNode { id: "n1".into() });
    let msgs: Vec<&str> = st
        .query_events(&EventQuery {
            subject: Some("node/n1".into()),
            kind: Some(EventKind::NodeStateChanged),
            ..Default::default()
        })
        .into_iter()
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(msgs.len(), 8);
    assert_eq!(msgs[5], "Unreachable -> Fenced: lease expired");
}

#[test]
fn remove_node_needs_it_empty() {
    let mut st = cluster();
    refused(&mut st, Command::RemoveNode { id: "n9".into() }, Code::NotFound, "n9");
    ok(&mut st, create_vm("a", spec(1, 512)));
    ok(&mut st, Command::AssignVm { name: "a".into(), node: "n1".into() });
    refused(
        &mut st,
        Command::RemoveNode { id: "n1".into() },
        Code::FailedPrecondition,
        "1 VMs assigned or migrating to it: a",
    );
    ok(&mut st, Command::RemoveNode { id: "n2".into() });
    assert!(st.node("n2").is_none());
}

#[test]
fn profiles_reuse_the_storage_crate_rules() {
    let mut st = cluster();
    refused(
        &mut st,
        Command::CreateProfile(replicated("fast")),
        Code::AlreadyExists,
        "storage profile fast already exists",
    );
    refused(&mut st, Command::CreateProfile(replicated("Fast")), Code::InvalidArgument, "storage profile name");
    let mut p = replicated("bad");
    p.kind = ProfileKind::Replicated { size: 2, min_size: 3 };
    refused(&mut st, Command::CreateProfile(p), Code::InvalidArgument, "min_size 3 must be between 1 and size (2)");
    let ec = |k, plugin: &str| StorageProfile {
        name: "ec".into(),
        kind: ProfileKind::ErasureCoded {
            k,
            m: 2,
            plugin: plugin.into(),
            technique: None,
            crush_failure_domain: "host".into(),
            stripe_unit: None,
        },
        osd_tunables: BTreeMap::from([("osd_recovery_op_priority".to_string(), 3)]),
    };
    refused(&mut st, Command::CreateProfile(ec(1, "jerasure")), Code::InvalidArgument, "k (data chunks)");
    refused(&mut st, Command::CreateProfile(ec(4, "zfec")), Code::InvalidArgument, "unknown plugin \"zfec\"");
    let mut t = ec(4, "isa");
    t.osd_tunables.insert("osd_recovery_op_priority".into(), 64);
    refused(&mut st, Command::CreateProfile(t), Code::InvalidArgument, "osd_recovery_op_priority");
    ok(&mut st, Command::CreateProfile(ec(4, "isa")));
    refused(&mut st, Command::DeleteProfile { name: "nope".into() }, Code::NotFound, "storage profile nope");
    refused(
        &mut st,
        Command::DeleteProfile { name: "fast".into() },
        Code::FailedPrecondition,
        "used by 2 volumes: data, root",
    );
    ok(&mut st, Command::DeleteProfile { name: "ec".into() });
    assert!(st.profile("ec").is_none());
}

#[test]
fn volumes_are_validated() {
    let mut st = cluster();
    let with = |f: &dyn Fn(&mut Volume)| {
        let mut v = volume("v", "fast");
        f(&mut v);
        Command::CreateVolume(v)
    };
    refused(&mut st, with(&|v| v.size_bytes = 0), Code::InvalidArgument, "size 0 bytes");
    refused(&mut st, with(&|v| v.size_bytes = (1 << 30) + 1), Code::InvalidArgument, "multiple of 512");
    refused(&mut st, with(&|v| v.size_bytes = 1 << 51), Code::InvalidArgument, "1 PiB");
    refused(&mut st, with(&|v| v.image = "a/b".into()), Code::InvalidArgument, "image name \"a/b\"");
    refused(&mut st, with(&|v| v.pool = "bad pool".into()), Code::InvalidArgument, "volume v: invalid pool");
    refused(&mut st, with(&|v| v.profile = "slow".into()), Code::NotFound, "storage profile slow does not exist");
    refused(&mut st, Command::CreateVolume(volume("root", "fast")), Code::AlreadyExists, "volume root already exists");
    refused(
        &mut st,
        with(&|v| v.image = "img-root".into()),
        Code::AlreadyExists,
        "image rbd/img-root already belongs to volume root",
    );
    ok(&mut st, with(&|_| {}));

    let resize = |size_bytes| Command::ResizeVolume { name: "v".into(), size_bytes };
    refused(&mut st, resize(1 << 30), Code::InvalidArgument, "volumes only grow");
    refused(&mut st, Command::ResizeVolume { name: "w".into(), size_bytes: 1 << 30 }, Code::NotFound, "volume w");
    ok(&mut st, resize(20 << 30));
    assert_eq!(st.volume("v").map(|v| v.size_bytes), Some(20 << 30));

    let mut s = spec(1, 512);
    s.disks.push(Disk { volume: "v".into(), read_only: false });
    ok(&mut st, create_vm("a", s));
    refused(&mut st, Command::DeleteVolume { name: "v".into() }, Code::FailedPrecondition, "attached to vm a");
    refused(&mut st, Command::DeleteVolume { name: "zz".into() }, Code::NotFound, "volume zz");
    ok(&mut st, Command::DeleteVolume { name: "data".into() });
}

#[test]
fn create_vm_is_validated() {
    let mut st = cluster();
    let with = |f: &dyn Fn(&mut VmSpec)| {
        let mut s = spec(2, 1024);
        f(&mut s);
        create_vm("a", s)
    };
    refused(&mut st, with(&|s| s.vcpus = 0), Code::InvalidArgument, "0 vCPUs must be between 1 and 256");
    refused(&mut st, with(&|s| s.vcpus = 257), Code::InvalidArgument, "257 vCPUs");
    refused(&mut st, with(&|s| s.memory_mib = 32), Code::InvalidArgument, "32 MiB must be between 64");
    refused(&mut st, with(&|s| s.memory_mib = 8 << 20), Code::InvalidArgument, "8388608 MiB");
    refused(&mut st, with(&|s| s.memory_mib = 1025), Code::InvalidArgument, "multiple of 2 MiB");
    refused(
        &mut st,
        with(&|s| s.boot = Boot::Kernel { kernel: "Image".into(), initrd: None, cmdline: String::new() }),
        Code::InvalidArgument,
        "kernel \"Image\" must be an absolute path",
    );
    refused(
        &mut st,
        with(&|s| s.boot = Boot::Kernel { kernel: "/k".into(), initrd: None, cmdline: "x".repeat(2048) }),
        Code::InvalidArgument,
        "2048 bytes",
    );
    refused(
        &mut st,
        with(&|s| s.anti_affinity_group = Some("Web".into())),
        Code::InvalidArgument,
        "anti-affinity group",
    );
    refused(
        &mut st,
        with(&|s| {
            s.required_labels.insert("r k".into(), "x".into());
        }),
        Code::InvalidArgument,
        "required_labels",
    );
    refused(
        &mut st,
        with(&|s| s.disks = (0..17).map(|i| Disk { volume: format!("d{i}"), read_only: true }).collect()),
        Code::InvalidArgument,
        "17 disks",
    );
    refused(
        &mut st,
        with(&|s| {
            s.boot = Boot::Volume { volume: "root".into() };
            s.disks.push(Disk { volume: "root".into(), read_only: true });
        }),
        Code::InvalidArgument,
        "volume root is attached more than once",
    );
    refused(
        &mut st,
        with(&|s| s.boot = Boot::Volume { volume: "nope".into() }),
        Code::NotFound,
        "vm a: volume nope does not exist",
    );
    refused(&mut st, create_vm("A", spec(1, 512)), Code::InvalidArgument, "vm name \"A\"");

    ok(&mut st, with(&|s| s.boot = Boot::Volume { volume: "root".into() }));
    refused(&mut st, create_vm("a", spec(1, 512)), Code::AlreadyExists, "vm a already exists");
    // Written by a: nobody else may attach it, even read-only.
    let shares = |name: &str, volume: &str, read_only| {
        let mut s = spec(1, 512);
        s.disks.push(Disk { volume: volume.into(), read_only });
        create_vm(name, s)
    };
    refused(&mut st, shares("b", "root", true), Code::FailedPrecondition, "volume root is attached read-write to vm a");
    ok(&mut st, shares("b", "data", true));
    ok(&mut st, shares("c", "data", true));
    refused(&mut st, shares("d", "data", false), Code::FailedPrecondition, "attached read-only to vm b");
    let vm = st.vm("a").expect("a");
    assert_eq!((vm.generation, vm.placement.clone(), vm.observed.phase), (1, None, VmPhase::Unknown));
}

#[test]
fn update_vm_spec_is_compare_and_set() {
    let mut st = cluster();
    ok(&mut st, create_vm("a", spec(2, 1024)));
    let update = |g, s| Command::UpdateVmSpec { name: "a".into(), expected_generation: Some(g), spec: s };
    refused(&mut st, update(2, spec(4, 1024)), Code::FailedPrecondition, "vm a is at generation 1, not 2");
    refused(
        &mut st,
        Command::UpdateVmSpec { name: "x".into(), expected_generation: Some(1), spec: spec(1, 512) },
        Code::NotFound,
        "vm x",
    );
    refused(&mut st, update(1, spec(0, 1024)), Code::InvalidArgument, "0 vCPUs");
    let r = ok(&mut st, update(1, spec(4, 2048)));
    assert_eq!(r.outcome, Outcome::VmGeneration(2));
    // The same write again is now stale: exactly one of two racing writers wins.
    refused(&mut st, update(1, spec(4, 4096)), Code::FailedPrecondition, "generation 2, not 1");
    assert_eq!(st.vm("a").map(|v| v.spec.memory_mib), Some(2048));

    // A placed VM's new spec must still fit its node.
    ok(&mut st, Command::AssignVm { name: "a".into(), node: "n1".into() });
    refused(
        &mut st,
        update(2, spec(4, 32768)),
        Code::FailedPrecondition,
        "node n1, which cannot take the new spec: lacks memory",
    );
    let mut s = spec(4, 2048);
    s.required_labels.insert("rack".into(), "r2".into());
    refused(&mut st, update(2, s), Code::FailedPrecondition, "missing label rack=r2");
    ok(&mut st, update(2, spec(8, 16384)));
}

#[test]
fn power_changes_bump_the_generation() {
    let mut st = cluster();
    ok(&mut st, create_vm("a", spec(1, 512)));
    let power = |power, g| Command::SetVmPower { name: "a".into(), power, expected_generation: g };
    refused(&mut st, power(Power::Stopped, Some(7)), Code::FailedPrecondition, "not 7");
    assert_eq!(ok(&mut st, power(Power::Stopped, Some(1))).outcome, Outcome::VmGeneration(2));
    let events = st.events().len();
    assert_eq!(ok(&mut st, power(Power::Stopped, None)).outcome, Outcome::VmGeneration(2));
    assert_eq!(st.events().len(), events, "no change, no event");
    assert!(st.pending_vms().is_empty(), "a stopped VM is not pending");
    ok(&mut st, power(Power::Running, None));
    assert_eq!(st.pending_vms().len(), 1);
}

#[test]
fn delete_vm_and_its_disks() {
    let mut st = cluster();
    let mut s = spec(1, 512);
    s.boot = Boot::Volume { volume: "root".into() };
    s.disks.push(Disk { volume: "data".into(), read_only: true });
    ok(&mut st, create_vm("a", s));
    let mut s = spec(1, 512);
    s.disks.push(Disk { volume: "data".into(), read_only: true });
    ok(&mut st, create_vm("b", s));
    let del = |name: &str, delete_disks| Command::DeleteVm { name: name.into(), delete_disks };
    refused(&mut st, del("zz", false), Code::NotFound, "vm zz");
    refused(&mut st, del("a", true), Code::FailedPrecondition, "volume data is also attached to vm b");
    ok(&mut st, Command::AssignVm { name: "b".into(), node: "n1".into() });
    // Placed: its disks may be open until its node reports it down after a stop.
    refused(&mut st, del("b", true), Code::FailedPrecondition, "may still have its disks open on node n1");
    ok(&mut st, Command::SetVmPower { name: "b".into(), power: Power::Stopped, expected_generation: None });
    refused(&mut st, del("b", true), Code::FailedPrecondition, "may still have its disks open on node n1");
    let report = |phase| Command::ReportVmStatus { name: "b".into(), node: "n1".into(), phase, message: String::new() };
    ok(&mut st, report(VmPhase::Stopped));
    // Now only the shared volume stands in the way.
    refused(&mut st, del("b", true), Code::FailedPrecondition, "volume data is also attached to vm a");
    ok(&mut st, del("b", false));
    let r = ok(&mut st, del("a", true));
    assert_eq!(r.outcome, Outcome::VmDeleted { deleted_volumes: vec!["root".into(), "data".into()] });
    assert_eq!(st.volumes().count(), 0);
    let rev = r.revision;
    let kinds: Vec<EventKind> = st
        .query_events(&EventQuery { since_revision: Some(rev - 1), ..Default::default() })
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec![EventKind::VmDeleted, EventKind::VolumeDeleted, EventKind::VolumeDeleted]);
}

#[test]
fn assign_checks_the_node() {
    let mut st = cluster();
    ok(&mut st, create_vm("a", spec(4, 8192)));
    let assign = |name: &str, node: &str| Command::AssignVm { name: name.into(), node: node.into() };
    refused(&mut st, assign("a", "n9"), Code::NotFound, "node n9 does not exist");
    refused(&mut st, assign("x", "n1"), Code::NotFound, "vm x does not exist");
    ok(&mut st, Command::CordonNode { id: "n2".into() });
    refused(&mut st, assign("a", "n2"), Code::FailedPrecondition, "node n2 cannot take vm a: cordoned");
    ok(&mut st, assign("a", "n1"));
    refused(&mut st, assign("a", "n1"), Code::FailedPrecondition, "already assigned to node n1");
    ok(&mut st, create_vm("b", spec(4, 10240)));
    refused(
        &mut st,
        assign("b", "n1"),
        Code::FailedPrecondition,
        "lacks memory (node Ready, 4 of 8 vCPUs and 8192 of 16384 MiB free; vm needs 4 vCPUs, 10240 MiB)",
    );
    ok(&mut st, create_vm("c", spec(5, 512)));
    refused(&mut st, assign("c", "n1"), Code::FailedPrecondition, "lacks vCPUs");
    let mut s = spec(1, 512);
    s.required_labels.insert("rack".into(), "r2".into());
    ok(&mut st, create_vm("d", s));
    refused(&mut st, assign("d", "n1"), Code::FailedPrecondition, "missing label rack=r2");
    let group = |name: &str| {
        let mut s = spec(1, 512);
        s.anti_affinity_group = Some("web".into());
        create_vm(name, s)
    };
    ok(&mut st, group("w1"));
    ok(&mut st, group("w2"));
    ok(&mut st, assign("w1", "n1"));
    refused(&mut st, assign("w2", "n1"), Code::FailedPrecondition, "has anti-affinity group web");
    assert_eq!(st.vms_on("n1").map(|v| v.name.as_str()).collect::<Vec<_>>(), vec!["a", "w1"]);
}

#[test]
fn unassign_only_when_stopped_or_fenced() {
    let mut st = cluster();
    ok(&mut st, create_vm("a", spec(1, 512)));
    let unassign = || Command::UnassignVm { name: "a".into(), reason: "moving".into() };
    refused(&mut st, unassign(), Code::FailedPrecondition, "vm a is not assigned");
    ok(&mut st, Command::AssignVm { name: "a".into(), node: "n1".into() });
    report(&mut st, "a", "n1", VmPhase::Running);
    refused(&mut st, unassign(), Code::FailedPrecondition, "vm a is Running on node n1; stop it first");
    // Unreachable is not enough: the VM may still be writing to its disks.
    let set = |state| Command::SetNodeState { id: "n1".into(), state, reason: String::new() };
    ok(&mut st, set(NodeState::Unreachable));
    refused(&mut st, unassign(), Code::FailedPrecondition, "wait until the node is fenced");
    ok(&mut st, set(NodeState::Fenced));
    ok(&mut st, unassign());
    assert_eq!(st.vm("a").and_then(|v| v.placement.clone()), None);

    ok(&mut st, Command::AssignVm { name: "a".into(), node: "n2".into() });
    report(&mut st, "a", "n2", VmPhase::Stopped);
    ok(&mut st, unassign());
}

#[test]
fn fencing_moves_ha_vms_off_the_node_and_fails_the_others() {
    let mut st = cluster();
    let mut ha = spec(1, 512);
    ha.ha = true;
    ok(&mut st, create_vm("ha", ha));
    ok(&mut st, create_vm("plain", spec(1, 512)));
    ok(&mut st, create_vm("elsewhere", spec(1, 512)));
    for (vm, node) in [("ha", "n1"), ("plain", "n1"), ("elsewhere", "n2")] {
        ok(&mut st, Command::AssignVm { name: vm.into(), node: node.into() });
        report(&mut st, vm, node, VmPhase::Running);
    }
    let set = |state| Command::SetNodeState { id: "n1".into(), state, reason: "lease expired".into() };
    ok(&mut st, set(NodeState::Unreachable));
    // Unreachable alone moves nothing: the host may still be running them.
    assert_eq!(st.vm("ha").and_then(|v| v.placement.clone()).as_deref(), Some("n1"));
    assert!(st.pending_vms().is_empty());
    let before = st.revision();
    ok(&mut st, set(NodeState::Fenced));
    let ha = st.vm("ha").expect("ha");
    assert_eq!((ha.placement.as_deref(), ha.observed.phase), (None, VmPhase::Unknown), "{ha:?}");
    assert_eq!(st.pending_vms().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["ha"], "HA VM waits for a node");
    let plain = st.vm("plain").expect("plain");
    assert_eq!((plain.placement.as_deref(), plain.observed.phase), (Some("n1"), VmPhase::Failed));
    assert!(plain.observed.message.contains("not HA"), "{:?}", plain.observed);
    let other = st.vm("elsewhere").expect("elsewhere");
    assert_eq!((other.placement.as_deref(), other.observed.phase), (Some("n2"), VmPhase::Running));
    let events = st.query_events(&EventQuery { since_revision: Some(before), ..Default::default() });
    let msgs: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert!(msgs[1].contains("unassigned from node n1: node n1 fenced; HA restarts it elsewhere"), "{msgs:?}");
    // The HA VM can be placed on the other node; the fenced node takes nothing.
    refused(&mut st, Command::AssignVm { name: "ha".into(), node: "n1".into() }, Code::FailedPrecondition, "Fenced");
    ok(&mut st, Command::AssignVm { name: "ha".into(), node: "n2".into() });
}

#[test]
fn status_reports_come_from_the_assigned_node() {
    let mut st = cluster();
    ok(&mut st, create_vm("a", spec(1, 512)));
    let rep = |node: &str, phase| Command::ReportVmStatus {
        name: "a".into(),
        node: node.into(),
        phase,
        message: "pid 42".into(),
    };
    refused(&mut st, rep("n1", VmPhase::Running), Code::FailedPrecondition, "vm a is assigned to no node, not node n1");
    ok(&mut st, Command::AssignVm { name: "a".into(), node: "n1".into() });
    refused(&mut st, rep("n2", VmPhase::Running), Code::FailedPrecondition, "assigned to node n1, not node n2");
    refused(&mut st, rep("n9", VmPhase::Running), Code::NotFound, "node n9");
    let before = st.revision();
    ok(&mut st, rep("n1", VmPhase::Starting));
    ok(&mut st, rep("n1", VmPhase::Running));
    ok(&mut st, rep("n1", VmPhase::Running));
    assert_eq!(st.revision(), before + 3, "every applied command is a revision");
    let changes = st.query_events(&EventQuery { kind: Some(EventKind::VmStatusChanged), ..Default::default() });
    assert_eq!(changes.len(), 2, "a repeated phase is not a change");
    assert_eq!(changes[1].message, "Starting -> Running on node n1: pid 42");
    let vm = st.vm("a").expect("a");
    assert_eq!(
        (vm.observed.phase, vm.observed.node.as_deref(), vm.updated_revision),
        (VmPhase::Running, Some("n1"), before + 3)
    );
    ok(&mut st, Command::SetNodeState { id: "n1".into(), state: NodeState::Unreachable, reason: String::new() });
    ok(&mut st, Command::SetNodeState { id: "n1".into(), state: NodeState::Fenced, reason: String::new() });
    refused(&mut st, rep("n1", VmPhase::Running), Code::FailedPrecondition, "node n1 is Fenced");
    refused(&mut st, Command::RecordUnschedulable { name: "q".into(), reason: "x".into() }, Code::NotFound, "vm q");
    ok(&mut st, Command::RecordUnschedulable { name: "a".into(), reason: "no node fits".into() });
}

#[test]
fn revisions_and_events_follow_applied_commands() {
    let mut st = ClusterState::with_event_capacity(4);
    assert_eq!(st.revision(), 0);
    for (i, id) in ["n1", "n2", "n3", "n4", "n5", "n6"].into_iter().enumerate() {
        let r = st.apply(reg(id, 4, 4096, &[]), 1000 + i as u64).expect("register");
        assert_eq!(r.revision, i as u64 + 1);
    }
    refused(&mut st, reg("n1", 0, 4096, &[]), Code::InvalidArgument, "vCPUs");
    assert_eq!(st.revision(), 6);
    assert_eq!(st.events().len(), 4, "bounded");
    assert_eq!(st.events().dropped(), 2);
    assert_eq!(st.events().oldest_revision(), Some(3));
    let e = st.query_events(&EventQuery { subject: Some("node/n5".into()), ..Default::default() });
    assert_eq!((e.len(), e[0].revision, e[0].time_ms, e[0].kind), (1, 5, 1004, EventKind::NodeRegistered));
    assert!(st.query_events(&EventQuery { subject: Some("node/n1".into()), ..Default::default() }).is_empty());
    assert_eq!(st.query_events(&EventQuery { since_revision: Some(4), ..Default::default() }).len(), 2);
}

fn busy_cluster() -> (ClusterState, Vec<Command>) {
    let mut cmds = vec![
        reg("n1", 8, 16384, &[("rack", "r1")]),
        reg("n2", 8, 16384, &[("rack", "r2")]),
        Command::CreateProfile(replicated("fast")),
        Command::CreateVolume(volume("root", "fast")),
    ];
    let mut s = spec(2, 2048);
    s.boot = Boot::Volume { volume: "root".into() };
    s.ha = true;
    cmds.push(create_vm("a", s));
    cmds.push(create_vm("b", spec(1, 512)));
    cmds.push(Command::AssignVm { name: "a".into(), node: "n2".into() });
    cmds.push(Command::ReportVmStatus {
        name: "a".into(),
        node: "n2".into(),
        phase: VmPhase::Running,
        message: String::new(),
    });
    cmds.push(Command::CordonNode { id: "n1".into() });
    cmds.push(Command::DeleteVm { name: "nope".into(), delete_disks: false }); // refused, still deterministic
    let mut st = ClusterState::new();
    for (i, c) in cmds.iter().enumerate() {
        let _ = st.apply(c.clone(), T + i as u64);
    }
    (st, cmds)
}

#[test]
fn snapshot_round_trip() {
    let (st, _) = busy_cluster();
    let bytes = st.snapshot().expect("snapshot");
    let mut restored = ClusterState::restore(&bytes).expect("restore");
    assert_eq!(restored, st);
    assert_eq!(restored.snapshot().expect("snapshot"), bytes);
    // A restored follower goes on exactly like the original.
    let mut original = st;
    let next = Command::UncordonNode { id: "n1".into() };
    assert_eq!(original.apply(next.clone(), T + 50), restored.apply(next, T + 50));
    assert_eq!(original, restored);
    assert!(ClusterState::restore(b"{\"revision\":1}").is_err());
    let future = String::from_utf8(bytes.clone()).expect("utf8").replacen(
        &format!("\"format\":{SNAPSHOT_FORMAT}"),
        &format!("\"format\":{}", SNAPSHOT_FORMAT + 1),
        1,
    );
    let e = ClusterState::restore(future.as_bytes()).expect_err("newer format refused");
    assert!(e.to_string().contains(&format!("format {}", SNAPSHOT_FORMAT + 1)), "{e}");
}

#[test]
fn format_1_snapshots_still_load() {
    let (mut st, _) = busy_cluster();
    ok(&mut st, Command::DeleteVm { name: "a".into(), delete_disks: false });
    ok(&mut st, Command::DeleteVolume { name: "root".into() });
    ok(&mut st, Command::CreateVolume(volume("data", "fast")));
    // What a controller from before storage statuses wrote.
    let mut v: serde_json::Value = serde_json::from_slice(&st.snapshot().expect("snapshot")).expect("json");
    v["format"] = 1.into();
    for k in ["volume_status", "profile_status", "image_removals"] {
        assert!(v["state"].as_object_mut().and_then(|s| s.remove(k)).is_some(), "{k}");
    }
    let old = ClusterState::restore(&serde_json::to_vec(&v).expect("bytes")).expect("format 1 loads");
    assert_eq!((old.revision(), old.vms().count(), old.volumes().count()), (st.revision(), 1, 1));
    assert!(old.image_removals().is_empty());
    // Records without a status are Pending at revision 0, and can be given one.
    assert_eq!(old.volume_status("data"), StorageStatus::default());
    let mut old = old;
    let set = Command::SetStorageStatus {
        subject: StorageSubject::Volume("data".into()),
        spec_revision: 0,
        state: StorageState::Ready,
        message: "image rbd/img-data, 10737418240 bytes".into(),
    };
    ok(&mut old, set);
    assert_eq!(old.volume_status("data").state, StorageState::Ready);
}

fn set_status(subject: StorageSubject, spec_revision: u64, state: StorageState, message: &str) -> Command {
    Command::SetStorageStatus { subject, spec_revision, state, message: message.into() }
}

fn vol(name: &str) -> StorageSubject {
    StorageSubject::Volume(name.into())
}

#[test]
fn storage_statuses_are_recorded_against_the_spec_they_were_computed_for() {
    let mut st = cluster();
    // Created Pending; the profile became Pending again when its first volume
    // brought it a pool to create (root, at revision 4).
    let root = st.volume_status("root");
    assert_eq!((root.state, root.spec_revision, root.was_ready), (StorageState::Pending, 4, false));
    assert_eq!(st.volume_status("data").spec_revision, 5);
    assert_eq!(st.profile_status("fast").spec_revision, 4);

    refused(&mut st, set_status(vol("nope"), 4, StorageState::Ready, ""), Code::NotFound, "volume nope");
    refused(
        &mut st,
        set_status(StorageSubject::Profile("nope".into()), 4, StorageState::Ready, ""),
        Code::NotFound,
        "storage profile nope",
    );
    refused(
        &mut st,
        set_status(vol("root"), 3, StorageState::Ready, ""),
        Code::FailedPrecondition,
        "changed at revision 4",
    );
    let long = "x".repeat(crate::model::storage::MAX_STATUS_MESSAGE + 1);
    refused(&mut st, set_status(vol("root"), 4, StorageState::Failed, &long), Code::InvalidArgument, "at most 1024");

    ok(&mut st, set_status(vol("root"), 4, StorageState::Ready, "image rbd/img-root, 10737418240 bytes"));
    let root = st.volume_status("root");
    assert_eq!((root.state, root.was_ready), (StorageState::Ready, true));
    assert_eq!(root.message, "image rbd/img-root, 10737418240 bytes");
    let last = st.events().iter().last().expect("event").clone();
    assert_eq!((last.kind, last.subject.as_str()), (EventKind::VolumeStateChanged, "volume/root"));
    assert_eq!(last.message, "Pending -> Ready: image rbd/img-root, 10737418240 bytes");

    // A resize makes it Pending at the resize's revision; an outcome computed
    // for the old size is refused, one for the new size lands.
    let r = ok(&mut st, Command::ResizeVolume { name: "root".into(), size_bytes: 20 << 30 });
    let root = st.volume_status("root");
    assert_eq!((root.state, root.spec_revision, root.was_ready), (StorageState::Pending, r.revision, true));
    refused(&mut st, set_status(vol("root"), 4, StorageState::Ready, "old"), Code::FailedPrecondition, "root");
    ok(&mut st, set_status(vol("root"), r.revision, StorageState::Failed, "resize: busy"));
    let events = st.events().len();
    // The same failure again records no second event; a different one does.
    ok(&mut st, set_status(vol("root"), r.revision, StorageState::Failed, "resize: busy"));
    assert_eq!(st.events().len(), events);
    ok(&mut st, set_status(vol("root"), r.revision, StorageState::Failed, "resize: gone"));
    assert_eq!(st.events().len(), events + 1);
    // Growing to the same size changes nothing Ceph must do.
    ok(&mut st, Command::ResizeVolume { name: "root".into(), size_bytes: 20 << 30 });
    assert_eq!(st.volume_status("root").spec_revision, r.revision);

    // A volume in a pool the profile did not use yet makes the profile Pending.
    let p = st.profile_status("fast").spec_revision;
    ok(&mut st, set_status(StorageSubject::Profile("fast".into()), p, StorageState::Ready, "pools rbd"));
    let mut v = volume("other", "fast");
    v.pool = "rbd2".into();
    let r = ok(&mut st, Command::CreateVolume(v));
    let fast = st.profile_status("fast");
    assert_eq!((fast.state, fast.spec_revision, fast.was_ready), (StorageState::Pending, r.revision, true));
    // One more volume in a pool it already uses does not.
    let mut v = volume("more", "fast");
    v.pool = "rbd2".into();
    ok(&mut st, Command::CreateVolume(v));
    assert_eq!(st.profile_status("fast").spec_revision, r.revision);

    // Deleting forgets the status.
    ok(&mut st, Command::DeleteVolume { name: "more".into() });
    assert_eq!(st.volume_status("more"), StorageStatus::default());
    ok(&mut st, Command::CreateProfile(replicated("spare")));
    ok(&mut st, Command::DeleteProfile { name: "spare".into() });
    assert_eq!(st.profile_status("spare"), StorageStatus::default());
}

#[test]
fn deleted_volumes_leave_their_images_to_remove() {
    let mut st = cluster();
    ok(&mut st, set_status(vol("data"), 5, StorageState::Ready, "image rbd/img-data, 10737418240 bytes"));
    let r = ok(&mut st, Command::DeleteVolume { name: "data".into() });
    assert_eq!(
        st.image_removals(),
        [ImageRemoval {
            pool: "rbd".into(),
            image: "img-data".into(),
            volume: "data".into(),
            requested_revision: r.revision,
            was_ready: true,
            last_error: String::new(),
        }]
    );
    // Its image holds the volume's data: the name is not free until it is gone.
    let again = Command::CreateVolume(volume("data", "fast"));
    refused(&mut st, again.clone(), Code::FailedPrecondition, "still being removed");
    let mut renamed = volume("data2", "fast");
    renamed.image = "img-data".into();
    refused(&mut st, Command::CreateVolume(renamed), Code::FailedPrecondition, "deleted volume data");

    let failed =
        |m: &str| Command::ImageRemovalFailed { pool: "rbd".into(), image: "img-data".into(), message: m.into() };
    ok(&mut st, failed("image has watchers"));
    assert_eq!(st.image_removals()[0].last_error, "image has watchers");
    let last = st.events().iter().last().expect("event").clone();
    assert_eq!((last.kind, last.subject.as_str()), (EventKind::ImageRemovalFailed, "volume/data"));
    assert!(last.message.contains("removing image rbd/img-data: image has watchers"), "{}", last.message);
    let nope = Command::ImageRemoved { pool: "rbd".into(), image: "nope".into() };
    refused(&mut st, nope, Code::NotFound, "no removal of image rbd/nope");

    ok(&mut st, Command::ImageRemoved { pool: "rbd".into(), image: "img-data".into() });
    assert!(st.image_removals().is_empty());
    assert_eq!(st.events().iter().last().map(|e| e.kind), Some(EventKind::ImageRemoved));
    ok(&mut st, again);

    // A volume that never became Ready (no [ceph] anywhere, say) leaves a
    // removal too, but a new volume may take its image over, as before.
    ok(&mut st, Command::DeleteVolume { name: "data".into() });
    assert!(st.image_removals().iter().any(|r| r.image == "img-data" && !r.was_ready));
    ok(&mut st, Command::CreateVolume(volume("data", "fast")));
    assert!(st.image_removals().is_empty());
    let last = st.events().iter().last().expect("event").clone();
    assert!(
        last.message.ends_with("takes over the image of deleted volume data (its removal is cancelled)"),
        "{}",
        last.message
    );

    // DeleteVm with delete_disks queues every volume it takes along.
    let mut s = spec(1, 512);
    s.boot = Boot::Volume { volume: "root".into() };
    s.disks.push(Disk { volume: "data".into(), read_only: false });
    ok(&mut st, create_vm("a", s));
    ok(&mut st, Command::DeleteVm { name: "a".into(), delete_disks: true });
    let queued: Vec<(&str, &str)> = st.image_removals().iter().map(|r| (r.image.as_str(), r.volume.as_str())).collect();
    assert_eq!(queued, [("img-root", "root"), ("img-data", "data")]);
    assert_eq!(st.volume_status("root"), StorageStatus::default());
}

#[test]
fn a_pool_belongs_to_one_profile() {
    let mut st = cluster();
    ok(&mut st, Command::CreateProfile(replicated("slow")));
    let mut ec = replicated("ec");
    ec.kind = ProfileKind::ErasureCoded {
        k: 2,
        m: 1,
        plugin: "jerasure".into(),
        technique: None,
        crush_failure_domain: "osd".into(),
        stripe_unit: None,
    };
    ok(&mut st, Command::CreateProfile(ec));
    let at = |name: &str, profile: &str, pool: &str| {
        let mut v = volume(name, profile);
        v.pool = pool.into();
        Command::CreateVolume(v)
    };
    refused(
        &mut st,
        at("v", "slow", "rbd"),
        Code::FailedPrecondition,
        "pool rbd holds volumes of storage profile fast",
    );
    ok(&mut st, at("e", "ec", "vms"));
    refused(
        &mut st,
        at("v", "slow", "vms-data"),
        Code::FailedPrecondition,
        "vms-data is the erasure-coded data pool of pool vms",
    );
    ok(&mut st, at("s", "slow", "x-data"));
    refused(&mut st, at("v", "ec", "x"), Code::FailedPrecondition, "x-data is the erasure-coded data pool of pool x");
    // The data pool's name must be a valid pool name too.
    refused(&mut st, at("v", "ec", &"p".repeat(124)), Code::InvalidArgument, "-data");
}

#[test]
fn profiles_agree_on_osd_tunables() {
    let mut st = cluster();
    let with = |name: &str, k: &str, v: u64| {
        let mut p = replicated(name);
        p.osd_tunables.insert(k.into(), v);
        Command::CreateProfile(p)
    };
    ok(&mut st, with("a", "osd_max_backfills", 2));
    refused(
        &mut st,
        with("b", "osd_max_backfills", 3),
        Code::FailedPrecondition,
        "osd_max_backfills=3 conflicts with storage profile a, which sets osd_max_backfills=2",
    );
    ok(&mut st, with("c", "osd_max_backfills", 2));
    ok(&mut st, with("d", "osd_recovery_op_priority", 5));
}

#[test]
fn same_commands_same_state() {
    let (a, cmds) = busy_cluster();
    let (b, _) = busy_cluster();
    assert_eq!(a.snapshot().expect("a"), b.snapshot().expect("b"));
    assert_eq!(a.revision(), 9);
    // Commands are what the Raft log stores.
    for c in cmds {
        let json = serde_json::to_string(&c).expect("serialize");
        assert_eq!(serde_json::from_str::<Command>(&json).expect("deserialize"), c);
    }
    let e = CommandError::NotFound("vm x does not exist".into());
    let json = serde_json::to_string(&e).expect("serialize");
    assert_eq!(serde_json::from_str::<CommandError>(&json).expect("deserialize"), e);
    assert_eq!(e.to_string(), "not found: vm x does not exist");
}

mod migrations;
mod networks;
