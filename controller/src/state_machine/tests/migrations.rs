//! Migration records: what starting one checks, the phases, where the VM is
//! placed after each outcome, and how fencing and HA treat a VM on the move.

use super::*;
use crate::model::MigrationPhase;

/// `web` (1 vCPU, 1 GiB, on RBD volume `root`) running on n1.
fn running_on_n1() -> ClusterState {
    let mut st = cluster();
    let mut s = spec(1, 1024);
    s.disks = vec![Disk { volume: "root".into(), read_only: false }];
    ok(&mut st, create_vm("web", s));
    ok(&mut st, Command::AssignVm { name: "web".into(), node: "n1".into() });
    report(&mut st, "web", "n1", VmPhase::Running);
    st
}

fn ha_running_on_n1() -> ClusterState {
    let mut st = running_on_n1();
    let mut s = st.vm("web").expect("web").spec.clone();
    s.ha = true;
    ok(&mut st, Command::UpdateVmSpec { name: "web".into(), expected_generation: None, spec: s });
    st
}

fn start(st: &mut ClusterState, target: &str) -> MigrationId {
    let cmd = Command::StartMigration { vm: "web".into(), target: target.into(), downtime_ms: 0, bandwidth_mib_s: 0 };
    match ok(st, cmd).outcome {
        Outcome::Migration(id) => id,
        o => panic!("StartMigration answered {o:?}"),
    }
}

fn say(st: &mut ClusterState, id: MigrationId, node: &str, report: MigrationReport) -> Response {
    ok(st, Command::ReportMigration { vm: "web".into(), id, node: Some(node.into()), report })
}

fn ready(addr: &str) -> MigrationReport {
    MigrationReport::ReceiverReady { address: addr.into() }
}

fn completed(downtime: Option<u64>) -> MigrationReport {
    MigrationReport::Completed { downtime_ms: downtime, total_ms: Some(4000) }
}

#[test]
fn a_migration_moves_the_placement_only_when_the_guest_runs_on_the_target() {
    let mut st = running_on_n1();
    let rev0 = (st.node_revision("n1"), st.node_revision("n2"));
    let id = start(&mut st, "n2");
    let m = st.active_migration("web").expect("active").clone();
    assert_eq!((m.source.as_str(), m.target.as_str(), m.phase), ("n1", "n2", MigrationPhase::Preparing));
    // Both agents hear of it; the target is sent the VM although it is not placed there.
    assert!(st.node_revision("n1") > rev0.0 && st.node_revision("n2") > rev0.1);
    assert_eq!(st.incoming_to("n2").map(|v| v.name.as_str()).collect::<Vec<_>>(), ["web"]);
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n1"));
    // The VM is reserved on both nodes meanwhile.
    let views = st.node_views();
    assert!(views.iter().all(|v| v.used.memory_mib == 1024), "{views:?}");

    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    let m = st.migration(id).expect("kept");
    assert_eq!((m.phase, m.receiver.as_deref()), (MigrationPhase::Sending, Some("10.0.0.2:7400")));
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n1"), "not moved yet");

    // The source's word (its VMM handed over) moves it; the target's later
    // word adds the downtime it measured.
    say(&mut st, id, "n1", completed(None));
    let vm = st.vm("web").expect("web");
    assert_eq!(vm.placement.as_deref(), Some("n2"));
    assert_eq!((vm.observed.phase, vm.observed.node.as_deref()), (VmPhase::Running, Some("n2")));
    assert_eq!(st.vms_on("n1").count(), 0);
    assert!(st.active_migration("web").is_none());
    say(&mut st, id, "n2", completed(Some(180)));
    let m = st.migration(id).expect("kept");
    assert_eq!((m.phase, m.downtime_ms, m.total_ms), (MigrationPhase::Completed, Some(180), Some(4000)));
    assert_eq!((st.migration_stats().completed, st.migration_stats().downtime_count), (1, 1));
    refused(
        &mut st,
        Command::ReportMigration { vm: "web".into(), id, node: Some("n2".into()), report: completed(Some(5)) },
        Code::FailedPrecondition,
        "already Completed",
    );
    let views = st.node_views();
    assert_eq!(views.iter().map(|v| v.used.memory_mib).collect::<Vec<_>>(), [0, 1024]);
    // And back: a second migration of the same VM.
    let back = start(&mut st, "n1");
    assert_ne!(back, id);
    let kinds: Vec<EventKind> = st.events().iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::MigrationCompleted) && kinds.contains(&EventKind::MigrationStarted));
}

#[test]
fn starting_a_migration_is_refused_with_the_reason_and_changes_nothing() {
    let mut st = running_on_n1();
    let mig = |vm: &str, target: &str| Command::StartMigration {
        vm: vm.into(),
        target: target.into(),
        downtime_ms: 0,
        bandwidth_mib_s: 0,
    };
    refused(&mut st, mig("nope", "n2"), Code::NotFound, "vm nope");
    refused(&mut st, mig("web", "n9"), Code::NotFound, "node n9");
    refused(&mut st, mig("web", "n1"), Code::FailedPrecondition, "already runs on node n1");
    refused(
        &mut st,
        Command::StartMigration { vm: "web".into(), target: "n2".into(), downtime_ms: 5, bandwidth_mib_s: 0 },
        Code::InvalidArgument,
        "between 10 ms",
    );
    // A target without room: the message names memory.
    ok(&mut st, reg("small", 8, 512, &[]));
    refused(&mut st, mig("web", "small"), Code::FailedPrecondition, "lacks memory");
    // A target whose CPU lacks a feature of the source's: named; and the
    // scheduler does not pick it. A node that reports none is left to the VMM.
    let Command::RegisterNode(mut r) = reg("older", 8, 16384, &[]) else { unreachable!() };
    r.cpu_features = ["fp", "asimd"].map(String::from).into();
    ok(&mut st, Command::RegisterNode(r.clone()));
    ok(&mut st, Command::CordonNode { id: "n2".into() });
    refused(&mut st, mig("web", "older"), Code::FailedPrecondition, "node older lacks CPU features of node n1 that the guest may use: aes");
    let e = st.pick_migration_target("web").expect_err("only older is Ready");
    assert!(e.message().contains("CPU features"), "{e}");
    r.cpu_features.clear();
    ok(&mut st, Command::RegisterNode(r.clone()));
    assert_eq!(st.pick_migration_target("web").expect("features unknown"), "older");
    ok(&mut st, Command::RemoveNode { id: "older".into() });
    ok(&mut st, Command::UncordonNode { id: "n2".into() });
    r.cpu_features = ["Fp"].map(String::from).into();
    refused(&mut st, Command::RegisterNode(r), Code::InvalidArgument, "CPU feature \"Fp\"");
    // Cordoned target.
    ok(&mut st, Command::CordonNode { id: "n2".into() });
    refused(&mut st, mig("web", "n2"), Code::FailedPrecondition, "cordoned");
    ok(&mut st, Command::UncordonNode { id: "n2".into() });
    // Anti-affinity on the target, and required labels.
    let mut other = spec(1, 256);
    other.anti_affinity_group = Some("g".into());
    ok(&mut st, create_vm("peer", other));
    ok(&mut st, Command::AssignVm { name: "peer".into(), node: "n2".into() });
    let mut s = st.vm("web").expect("web").spec.clone();
    s.anti_affinity_group = Some("g".into());
    ok(&mut st, Command::UpdateVmSpec { name: "web".into(), expected_generation: None, spec: s.clone() });
    refused(&mut st, mig("web", "n2"), Code::FailedPrecondition, "anti-affinity group g");
    s.anti_affinity_group = None;
    s.required_labels = [("rack".to_string(), "r1".to_string())].into();
    ok(&mut st, Command::UpdateVmSpec { name: "web".into(), expected_generation: None, spec: s });
    refused(&mut st, mig("web", "n2"), Code::FailedPrecondition, "missing label rack=r1");
    // The scheduler finds nothing either, and says why.
    let e = st.pick_migration_target("web").expect_err("nowhere to go");
    assert!(e.message().contains("missing label"), "{e}");

    // A stopped VM; a VM without disks; one already migrating.
    let mut st = running_on_n1();
    ok(&mut st, create_vm("diskless", spec(1, 256)));
    ok(&mut st, Command::AssignVm { name: "diskless".into(), node: "n1".into() });
    refused(&mut st, mig("diskless", "n2"), Code::FailedPrecondition, "not running");
    report(&mut st, "diskless", "n1", VmPhase::Running);
    refused(&mut st, mig("diskless", "n2"), Code::FailedPrecondition, "no RBD disk");
    assert_eq!(st.pick_migration_target("web").expect("n2 fits"), "n2");
    let id = start(&mut st, "n2");
    refused(&mut st, mig("web", "n2"), Code::FailedPrecondition, &format!("migration {id}"));
    // While it migrates, nothing may pull it away.
    refused(
        &mut st,
        Command::SetVmPower { name: "web".into(), power: Power::Stopped, expected_generation: None },
        Code::FailedPrecondition,
        "is migrating",
    );
    refused(
        &mut st,
        Command::DeleteVm { name: "web".into(), delete_disks: false },
        Code::FailedPrecondition,
        "is migrating",
    );
    refused(&mut st, Command::RemoveNode { id: "n2".into() }, Code::FailedPrecondition, "migrating to it");
    // Reports from a stranger, a wrong phase, a bad address.
    ok(&mut st, reg("n3", 8, 16384, &[]));
    let rep = |node: &str, report: MigrationReport| Command::ReportMigration {
        vm: "web".into(),
        id,
        node: Some(node.into()),
        report,
    };
    refused(&mut st, rep("n3", ready("10.0.0.3:1")), Code::FailedPrecondition, "takes no part");
    refused(&mut st, rep("n1", ready("10.0.0.1:1")), Code::FailedPrecondition, "only the target");
    refused(&mut st, rep("n2", ready("nohost")), Code::InvalidArgument, "host:port");
    refused(&mut st, rep("n2", completed(None)), Code::FailedPrecondition, "cannot complete");
    refused(
        &mut st,
        Command::ReportMigration { vm: "web".into(), id: 9999, node: Some("n2".into()), report: ready("h:1") },
        Code::NotFound,
        "no migration 9999",
    );
}

#[test]
fn a_failed_or_cancelled_migration_leaves_the_vm_where_it_was() {
    let mut st = running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    // The leader may only end one that has not let the receiver listen.
    refused(
        &mut st,
        Command::ReportMigration {
            vm: "web".into(),
            id,
            node: None,
            report: MigrationReport::Failed { reason: "late".into() },
        },
        Code::FailedPrecondition,
        "only its agents",
    );
    say(&mut st, id, "n1", MigrationReport::Failed { reason: "the receiver went away".into() });
    let m = st.migration(id).expect("kept");
    assert_eq!((m.phase, m.reason.as_str()), (MigrationPhase::Failed, "the receiver went away"));
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n1"));
    assert_eq!(st.incoming_to("n2").count(), 0, "the target no longer hears of it");

    // Cancelled before anything was sent: it ends at once.
    let id = start(&mut st, "n2");
    ok(&mut st, Command::CancelMigration { vm: "web".into() });
    assert_eq!(st.migration(id).map(|m| m.phase), Some(MigrationPhase::Cancelled));
    refused(&mut st, Command::CancelMigration { vm: "web".into() }, Code::FailedPrecondition, "not migrating");
    // Cancelled while sending: the source's VMM decides; its failure reads as Cancelled.
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7401"));
    ok(&mut st, Command::CancelMigration { vm: "web".into() });
    assert!(st.active_migration("web").is_some_and(|m| m.cancel_requested));
    say(&mut st, id, "n1", MigrationReport::Failed { reason: "cancelled".into() });
    assert_eq!(st.migration(id).map(|m| m.phase), Some(MigrationPhase::Cancelled));
    let s = st.migration_stats();
    assert_eq!((s.completed, s.failed, s.cancelled), (0, 1, 2));
}

#[test]
fn fencing_meets_migrations_and_ha_never_starts_a_second_copy() {
    // Fenced before the receiver listened: the migration fails and HA acts as usual.
    let mut st = ha_running_on_n1();
    let id = start(&mut st, "n2");
    let fence = |st: &mut ClusterState, n: &str| {
        ok(st, Command::SetNodeState { id: n.into(), state: NodeState::Unreachable, reason: String::new() });
        ok(st, Command::SetNodeState { id: n.into(), state: NodeState::Fenced, reason: String::new() });
    };
    fence(&mut st, "n1");
    assert_eq!(st.migration(id).map(|m| m.phase), Some(MigrationPhase::Failed));
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()), None, "HA: unassigned, to restart elsewhere");

    // The source fenced while sending: the VM waits for the target's word.
    let mut st = ha_running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    fence(&mut st, "n1");
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n1"), "not restarted yet");
    // The guest runs on the target: it stays there, and nothing restarts it.
    say(&mut st, id, "n2", completed(Some(200)));
    let vm = st.vm("web").expect("web");
    assert_eq!((vm.placement.as_deref(), vm.observed.phase), (Some("n2"), VmPhase::Running));
    assert!(st.pending_vms().is_empty(), "no second copy is scheduled");
    // The fenced source's word is no longer taken.
    refused(
        &mut st,
        Command::ReportMigration { vm: "web".into(), id, node: Some("n1".into()), report: completed(None) },
        Code::FailedPrecondition,
        "Fenced",
    );

    // The same, but the target says it did not arrive: HA restarts it.
    let mut st = ha_running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    fence(&mut st, "n1");
    say(&mut st, id, "n2", MigrationReport::Failed { reason: "the sender went away".into() });
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()), None);
    assert_eq!(st.pending_vms().len(), 1, "restarted elsewhere, once");
}

#[test]
fn a_target_lost_while_sending_is_asked_to_stop_and_both_hosts_fenced_ends_it() {
    let lose = |st: &mut ClusterState, n: &str, state: NodeState| {
        ok(st, Command::SetNodeState { id: n.into(), state, reason: String::new() });
    };
    // Lost before the receiver listened: nothing moved, it ends at once.
    let mut st = running_on_n1();
    let id = start(&mut st, "n2");
    lose(&mut st, "n2", NodeState::Unreachable);
    let m = st.migration(id).expect("kept");
    assert_eq!(m.phase, MigrationPhase::Failed);
    assert!(m.reason.contains("node n2 became Unreachable before the receiver listened"), "{m:?}");
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n1"));

    // Lost while sending: the source is asked to stop, and its word ends it
    // Failed (not Cancelled: no operator asked), naming the lost target.
    let mut st = running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    let rev = st.node_revision("n1");
    lose(&mut st, "n2", NodeState::Unreachable);
    let m = st.active_migration("web").expect("still active").clone();
    assert!(m.cancel_requested && m.phase == MigrationPhase::Sending, "{m:?}");
    assert!(st.node_revision("n1") > rev, "the source's agent hears of the request");
    refused(&mut st, Command::CancelMigration { vm: "web".into() }, Code::FailedPrecondition, "already being cancelled");
    say(&mut st, id, "n1", MigrationReport::Failed { reason: "the send was cancelled".into() });
    let m = st.migration(id).expect("kept");
    assert_eq!(m.phase, MigrationPhase::Failed);
    assert_eq!(m.reason, "target node n2 became Unreachable; the send was cancelled");
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n1"));
    assert_eq!(st.migration_stats().failed, 1);

    // Past its switch already: the request is too late, the guest moved.
    let mut st = running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    lose(&mut st, "n2", NodeState::Unreachable);
    say(&mut st, id, "n1", completed(Some(150)));
    assert_eq!(st.migration(id).map(|m| m.phase), Some(MigrationPhase::Completed));
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()).as_deref(), Some("n2"));

    // Both hosts fenced while sending: nobody can say where the guest runs
    // and neither can write its disks, so it ends and HA restarts it once.
    let mut st = ha_running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    for n in ["n1", "n2"] {
        lose(&mut st, n, NodeState::Unreachable);
        lose(&mut st, n, NodeState::Fenced);
    }
    let m = st.migration(id).expect("kept");
    assert_eq!(m.phase, MigrationPhase::Failed, "{m:?}");
    assert!(m.reason.contains("both fenced"), "{m:?}");
    assert_eq!(st.vm("web").and_then(|v| v.placement.clone()), None, "unassigned for HA");
    assert_eq!(st.pending_vms().len(), 1, "restarted elsewhere, once");
}

#[test]
fn migrations_survive_a_snapshot() {
    let mut st = running_on_n1();
    let id = start(&mut st, "n2");
    say(&mut st, id, "n2", ready("10.0.0.2:7400"));
    let back = ClusterState::restore(&st.snapshot().expect("snapshot")).expect("restore");
    assert_eq!(back, st);
    assert_eq!(back.active_migration("web").map(|m| m.id), Some(id));
    // A format-2 snapshot (before migrations) reads as having none.
    let mut v: serde_json::Value = serde_json::from_slice(&st.snapshot().expect("snapshot")).expect("json");
    v["format"] = 2.into();
    let state = v["state"].as_object_mut().expect("state");
    state.remove("migrations");
    state.remove("migration_stats");
    let old = ClusterState::restore(&serde_json::to_vec(&v).expect("json")).expect("format 2 reads");
    assert!(old.active_migration("web").is_none() && old.migrations().next().is_none());
}

#[test]
fn finished_migrations_are_kept_to_a_bound_and_counted() {
    use crate::model::migrations::MAX_FINISHED_MIGRATIONS;
    let mut st = running_on_n1();
    let n = MAX_FINISHED_MIGRATIONS + 5;
    let mut last = 0;
    for _ in 0..n {
        let cmd = Command::StartMigration { vm: "web".into(), target: "n2".into(), downtime_ms: 0, bandwidth_mib_s: 0 };
        last = st.apply(cmd, T).expect("start").revision;
        st.apply(Command::CancelMigration { vm: "web".into() }, T).expect("cancel");
    }
    assert_eq!(st.migrations().count(), MAX_FINISHED_MIGRATIONS);
    assert!(st.migration(last).is_some(), "the newest is kept");
    assert_eq!(st.migration_stats().cancelled, n as u64, "the counters count every one");
}
