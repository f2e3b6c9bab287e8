//! Three (and four) real `basalt-controller` processes on 127.0.0.1: the
//! public API through followers, a leader killed while a client writes, a
//! whole-cluster restart, membership changes with a snapshot install, the
//! agent API and the reconciler, and refusals that change nothing.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_proto::v1::agent_service_client::AgentServiceClient;
use basalt_tests::controllers::{ControllerCluster, Options};
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(30);

fn basaltctl(args: &[&str]) -> std::process::Output {
    let bin = basalt_tests::controllers::host_bin("basaltctl");
    std::process::Command::new(&bin).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}

fn spec(vcpus: u32, memory_mib: u64) -> pb::VmSpec {
    pb::VmSpec {
        vcpus,
        memory_mib,
        boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: "/var/lib/basalt/Image".into(),
            initrd: String::new(),
            cmdline: "console=ttyS0".into(),
        })),
        ..Default::default()
    }
}

fn create(name: &str, vcpus: u32, memory_mib: u64, power: pb::Power) -> pb::CreateVmRequest {
    pb::CreateVmRequest { name: name.into(), spec: Some(spec(vcpus, memory_mib)), desired_power: power as i32 }
}

fn get(name: &str) -> pb::GetRequest {
    pb::GetRequest { name: name.into(), allow_stale: false }
}

async fn revision(c: &ControllerCluster, id: u64) -> u64 {
    c.client(id)
        .get_cluster_status(pb::GetClusterStatusRequest { allow_stale: false })
        .await
        .expect("status")
        .into_inner()
        .revision
}

fn follower(c: &ControllerCluster, leader: u64) -> u64 {
    c.running().into_iter().find(|id| *id != leader).expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_through_followers_and_refusals_change_nothing() {
    let c = ControllerCluster::start(3, Options::default());
    let leader = c.wait_leader(LEADER_WAIT).await;
    let f = follower(&c, leader);
    let other = c.running().into_iter().find(|id| *id != leader && *id != f).expect("second follower");
    let mut fc = c.client(f);
    let mut oc = c.client(other);

    // Profile, volume and VM created through one follower, read through the other.
    let profile = pb::StorageProfile {
        name: "ec21".into(),
        kind: Some(pb::storage_profile::Kind::ErasureCoded(pb::ErasureCodedProfile {
            k: 2,
            m: 1,
            crush_failure_domain: "osd".into(),
            ..Default::default()
        })),
        osd_tunables: [("osd_max_backfills".to_string(), 2u64)].into(),
        ..Default::default()
    };
    fc.create_profile(profile).await.expect("create profile");
    let vol = pb::Volume {
        name: "data".into(),
        pool: "rbd-ec".into(),
        image: "data".into(),
        size_bytes: 64 << 20,
        profile: "ec21".into(),
        ..Default::default()
    };
    fc.create_volume(vol.clone()).await.expect("create volume");
    let mut req = create("web", 2, 1024, pb::Power::Stopped);
    if let Some(s) = req.spec.as_mut() {
        s.disks.push(pb::Disk { volume: "data".into(), read_only: false });
    }
    let w = fc.create_vm(req).await.expect("create vm").into_inner();
    assert_eq!(w.generation, 1);

    let vm = oc.get_vm(get("web")).await.expect("linearizable read on the other follower").into_inner();
    assert_eq!(vm.spec.as_ref().map(|s| (s.vcpus, s.memory_mib)), Some((2, 1024)));
    assert_eq!(vm.spec.as_ref().map(|s| s.disks.len()), Some(1));
    assert_eq!(vm.desired_power, pb::Power::Stopped as i32);
    let got = oc.get_volume(get("data")).await.expect("volume").into_inner();
    // No controller has a [ceph] section: the volume is a record only.
    assert_eq!(got, pb::Volume { state: pb::StorageState::Pending as i32, ..vol.clone() });
    let p = oc.get_profile(get("ec21")).await.expect("profile").into_inner();
    assert!(
        matches!(p.kind, Some(pb::storage_profile::Kind::ErasureCoded(ref e)) if e.k == 2 && e.plugin == "jerasure")
    );
    let list = oc.list_vms(pb::ListRequest::default()).await.expect("list").into_inner();
    assert_eq!(list.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["web"]);

    // Compare-and-set on the spec: the right generation wins, a stale one is refused.
    let mut bigger = spec(4, 2048);
    bigger.disks.push(pb::Disk { volume: "data".into(), read_only: false });
    let upd = |g| pb::UpdateVmRequest { name: "web".into(), spec: Some(bigger.clone()), expected_generation: g };
    let w2 = oc.update_vm(upd(1)).await.expect("update at generation 1").into_inner();
    assert_eq!(w2.generation, 2);
    let rev = revision(&c, leader).await;
    let err = fc.update_vm(upd(1)).await.expect_err("stale generation");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("generation"), "{}", err.message());
    assert_eq!(revision(&c, f).await, rev, "a refused write changed the revision");

    // Refusals, each with the code that says why, none changing anything.
    type Refusal = (&'static str, Result<tonic::Response<pb::WriteResult>, tonic::Status>, Code);
    let cases: Vec<Refusal> = vec![
        ("zero vCPUs", fc.create_vm(create("bad", 0, 1024, pb::Power::Stopped)).await, Code::InvalidArgument),
        ("odd memory", fc.create_vm(create("bad", 1, 1023, pb::Power::Stopped)).await, Code::InvalidArgument),
        ("duplicate name", fc.create_vm(create("web", 1, 512, pb::Power::Stopped)).await, Code::AlreadyExists),
        (
            "no boot",
            fc.create_vm(pb::CreateVmRequest {
                name: "nb".into(),
                spec: Some(pb::VmSpec { vcpus: 1, memory_mib: 512, ..Default::default() }),
                desired_power: 0,
            })
            .await,
            Code::InvalidArgument,
        ),
        ("bad name", fc.create_vm(create("Bad Name!", 1, 512, pb::Power::Stopped)).await, Code::InvalidArgument),
        ("unknown node", fc.cordon_node(pb::NameRef { name: "nowhere".into() }).await, Code::NotFound),
        (
            "unknown vm",
            fc.delete_vm(pb::DeleteVmRequest { name: "ghost".into(), delete_disks: false }).await,
            Code::NotFound,
        ),
        ("volume in use", fc.delete_volume(pb::NameRef { name: "data".into() }).await, Code::FailedPrecondition),
        ("profile in use", fc.delete_profile(pb::NameRef { name: "ec21".into() }).await, Code::FailedPrecondition),
        (
            "volume of unknown profile",
            fc.create_volume(pb::Volume { profile: "nope".into(), name: "v2".into(), ..vol.clone() }).await,
            Code::NotFound,
        ),
        (
            "tiny volume",
            fc.create_volume(pb::Volume { size_bytes: 4096, name: "v3".into(), ..vol.clone() }).await,
            Code::InvalidArgument,
        ),
        (
            "shrink volume",
            fc.resize_volume(pb::ResizeVolumeRequest { name: "data".into(), size_bytes: 32 << 20 }).await,
            Code::InvalidArgument,
        ),
        (
            "EC profile with k=1",
            fc.create_profile(pb::StorageProfile {
                name: "ec11".into(),
                kind: Some(pb::storage_profile::Kind::ErasureCoded(pb::ErasureCodedProfile {
                    k: 1,
                    m: 1,
                    ..Default::default()
                })),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        ),
        (
            "unknown OSD tunable",
            fc.create_profile(pb::StorageProfile {
                name: "rep".into(),
                kind: Some(pb::storage_profile::Kind::Replicated(pb::ReplicatedProfile { size: 3, min_size: 2 })),
                osd_tunables: [("osd_bogus".to_string(), 1u64)].into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        ),
        (
            "profile without kind",
            fc.create_profile(pb::StorageProfile { name: "x".into(), ..Default::default() }).await,
            Code::InvalidArgument,
        ),
        (
            "power unspecified",
            fc.set_vm_power(pb::SetVmPowerRequest { name: "web".into(), power: 0, expected_generation: 0 }).await,
            Code::InvalidArgument,
        ),
    ];
    for (what, res, code) in cases {
        let err = res.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}: empty message");
    }
    assert_eq!(revision(&c, other).await, rev, "refusals changed the revision");
    let events =
        oc.list_events(pb::ListEventsRequest { subject: "vm/web".into(), ..Default::default() }).await.expect("events");
    let kinds: Vec<String> = events.into_inner().events.into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["VmCreated", "VmSpecUpdated"]);
    let bad_kind = oc.list_events(pb::ListEventsRequest { kind: "Nonsense".into(), ..Default::default() }).await;
    assert_eq!(bad_kind.expect_err("unknown kind").code(), Code::InvalidArgument);

    // Delete through the leader; gone everywhere (linearizable reads).
    let d = c
        .client(leader)
        .delete_vm(pb::DeleteVmRequest { name: "web".into(), delete_disks: true })
        .await
        .expect("delete");
    assert_eq!(d.into_inner().deleted_volumes, ["data"]);
    for id in c.running() {
        assert_eq!(c.client(id).get_vm(get("web")).await.expect_err("deleted").code(), Code::NotFound);
        assert_eq!(c.client(id).get_volume(get("data")).await.expect_err("deleted with the VM").code(), Code::NotFound);
    }

    // Health, reflection's service list and metrics are served.
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel(f));
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "basalt.v1.ClusterService".into() })
        .await
        .expect("health");
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let m = c.scrape_metrics(leader).expect("metrics");
    assert!(m.contains("basalt_raft_is_leader 1"), "{m}");
    assert!(m.contains("basalt_raft_term "), "{m}");
    assert!(m.contains("basalt_raft_apply_lag"), "{m}");
    let commit =
        m.lines().find_map(|l| l.strip_prefix("basalt_raft_commit_index ")).and_then(|v| v.trim().parse::<u64>().ok());
    assert!(commit.is_some_and(|c| c > 0), "commit index not reported: {m}");
    let fm = c.scrape_metrics(f).expect("follower metrics");
    assert!(fm.contains("basalt_raft_is_leader 0"), "{fm}");
    assert!(fm.contains("method=\"CreateVm\""), "{fm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let mut c = ControllerCluster::start(3, Options::default());
    let leader = c.wait_leader(LEADER_WAIT).await;
    let ids = c.ids();
    // A client writing as fast as it can, round-robin over all controllers,
    // recording what was acknowledged.
    let clients: HashMap<u64, _> = ids.iter().map(|id| (*id, c.client(*id))).collect();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = 0u32;
        let mut i = 0u64;
        let mut first_ack_after: Vec<Instant> = Vec::new();
        while !*stop_rx.borrow_and_update() {
            let id = ids[(i as usize) % ids.len()];
            let mut cl = clients[&id].clone();
            let name = format!("vm-{i}");
            match cl.create_vm(create(&name, 1, 128, pb::Power::Stopped)).await {
                Ok(_) => {
                    acked.push(name);
                    first_ack_after.push(Instant::now());
                }
                Err(_) => failed += 1,
            }
            i += 1;
        }
        (acked, failed, first_ack_after)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    c.kill(leader);
    let new_leader = c.wait_leader(LEADER_WAIT).await;
    assert_ne!(new_leader, leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let (acked, failed, ack_times) = writer.await.expect("writer");
    let before = ack_times.iter().filter(|t| **t < killed_at).count();
    let first_after = ack_times.iter().find(|t| **t > killed_at).map(|t| t.duration_since(killed_at));
    eprintln!(
        "acknowledged {} writes ({before} before the kill), {failed} failed; first ack after the kill: {first_after:?}",
        acked.len()
    );
    assert!(before > 0, "no write acknowledged before the kill\n{}", c.logs());
    assert!(first_after.is_some(), "no write acknowledged after the kill\n{}", c.logs());

    let list = c.client(new_leader).list_vms(pb::ListRequest::default()).await.expect("list").into_inner();
    let present: BTreeSet<String> = list.vms.into_iter().map(|v| v.name).collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // The old leader comes back as a follower and catches up.
    c.restart(leader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = c.client(leader).get_vm(get(&acked[acked.len() - 1])).await;
    assert!(r.is_ok(), "restarted controller does not serve the last write: {r:?}\n{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_and_restarting_every_controller_keeps_the_state() {
    let mut c = ControllerCluster::start(3, Options::default());
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut cl = c.client(leader);
    for i in 0..20 {
        cl.create_vm(create(&format!("keep-{i}"), 1, 256, pb::Power::Stopped)).await.expect("create");
    }
    let mut agent = AgentServiceClient::new(c.channel(leader));
    agent
        .register(pb::RegisterRequest {
            id: "host-a".into(),
            address: "10.0.0.1:7100".into(),
            arch: "aarch64".into(),
            capacity: Some(pb::Capacity { vcpus: 8, memory_mib: 16384 }),
            labels: Default::default(),
            cpu_features: vec![],
            nics: vec![],
            nic_profile: String::new(),
        })
        .await
        .expect("register");
    let before = cl.get_cluster_status(pb::GetClusterStatusRequest::default()).await.expect("status").into_inner();
    for id in c.ids() {
        c.stop(id);
    }
    for id in c.ids() {
        c.restart(id);
    }
    let leader = c.wait_leader(LEADER_WAIT).await;
    for id in c.ids() {
        let after = c
            .client(id)
            .get_cluster_status(pb::GetClusterStatusRequest::default())
            .await
            .expect("status after restart")
            .into_inner();
        assert_eq!(after.revision, before.revision, "controller {id}");
        assert_eq!((after.vms, after.nodes), (20, 1), "controller {id}");
    }
    let vm = c.client(leader).get_vm(get("keep-7")).await.expect("vm survives").into_inner();
    assert_eq!(vm.spec.map(|s| s.memory_mib), Some(256));
    c.client(leader).create_vm(create("after-restart", 1, 256, pb::Power::Stopped)).await.expect("write after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_controller_joins_as_learner_from_a_snapshot_is_promoted_and_one_is_removed() {
    // Snapshots every 20 entries, keeping 5: the new controller cannot catch
    // up from the log alone and must install a snapshot.
    let opts = Options {
        config: "[raft]\nsnapshot_after_entries = 20\nkeep_entries_after_snapshot = 5\n".into(),
        ..Default::default()
    };
    let mut c = ControllerCluster::start(3, opts);
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut cl = c.client(leader);
    for i in 0..60 {
        cl.create_vm(create(&format!("s-{i}"), 1, 128, pb::Power::Stopped)).await.expect("create");
    }
    // Compaction happened on the leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = c.scrape_metrics(leader).expect("metrics");
        let purged = m
            .lines()
            .find_map(|l| l.strip_prefix("basalt_raft_purged_index "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if purged > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the log was never compacted:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Bad membership requests are refused.
    let e = cl.promote_controller(pb::ControllerRef { id: 9 }).await.expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e =
        cl.add_controller(pb::AddControllerRequest { id: 0, address: "127.0.0.1:1".into() }).await.expect_err("id 0");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = cl.add_controller(pb::AddControllerRequest { id: 5, address: "nohost".into() }).await.expect_err("address");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = cl.remove_controller(pb::ControllerRef { id: 9 }).await.expect_err("not a member");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    c.start_new(4);
    let f = follower(&c, leader);
    // Added with basaltctl through a follower (forwarded to the leader).
    let eps = format!("127.0.0.1:1,{}", c.addr(f)); // a dead endpoint first: the CLI moves on
    let out = basaltctl(&["--endpoints", &eps, "controller", "add", "4", &c.addr(4)]);
    assert!(out.status.success(), "controller add: {}\n{}", String::from_utf8_lossy(&out.stderr), c.logs());
    let list = basaltctl(&["--endpoints", &eps, "-o", "json", "controller", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    let four = v["controllers"].as_array().and_then(|a| a.iter().find(|x| x["id"] == 4)).cloned().expect("4 listed");
    assert_eq!(four["voter"], false, "a new controller must join as a learner: {v}");
    // It has the whole state, which had been compacted out of the log.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.client(4).get_vm(pb::GetRequest { name: "s-59".into(), allow_stale: true }).await;
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "learner never caught up: {r:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m4 = c.scrape_metrics(4).expect("metrics of 4");
    assert!(!m4.contains("basalt_raft_snapshot_index 0\n"), "controller 4 did not install a snapshot:\n{m4}");

    let out = basaltctl(&["--endpoints", &eps, "controller", "promote", "4"]);
    assert!(out.status.success(), "promote: {}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("4 ") && l.contains("voter")), "{table}");
    let bad = basaltctl(&["--endpoints", &eps, "controller", "promote", "9"]);
    assert_eq!(bad.status.code(), Some(1), "refusal exit code");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a learner"), "{}", String::from_utf8_lossy(&bad.stderr));
    let none = basaltctl(&["--endpoints", "127.0.0.1:1", "cluster", "status"]);
    assert_eq!(none.status.code(), Some(3), "unreachable exit code");
    let st = basaltctl(&["--endpoints", &c.addr(4), "cluster", "status"]);
    assert!(
        String::from_utf8_lossy(&st.stdout).contains(&format!("leader {leader}")),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
    // Remove one of the founders (a follower), then stop its process.
    let gone = c.running().into_iter().find(|id| *id != leader && *id != 4).expect("a founder follower");
    let r = cl.remove_controller(pb::ControllerRef { id: gone }).await.expect("remove").into_inner();
    let ids: BTreeSet<u64> = r.controllers.iter().map(|x| x.id).collect();
    assert!(!ids.contains(&gone) && ids.contains(&4) && ids.len() == 3, "{ids:?}");
    c.stop(gone);
    let e = cl.remove_controller(pb::ControllerRef { id: leader }).await;
    // Removing the leader itself is allowed (it steps down); do not: keep the
    // cluster at three and check it still elects without the removed one.
    drop(e);
    c.kill(leader);
    let new_leader = c.wait_leader(LEADER_WAIT).await;
    c.client(new_leader)
        .create_vm(create("after-change", 1, 128, pb::Power::Stopped))
        .await
        .expect("write with {4, the rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_register_heartbeat_and_watch_their_assignments() {
    let opts = Options {
        config: "[timing]\nnode_lease_ms = 1500\nagent_heartbeat_ms = 300\nreconcile_ms = 200\n".into(),
        ..Default::default()
    };
    let c = ControllerCluster::start(3, opts);
    let leader = c.wait_leader(LEADER_WAIT).await;
    let f = follower(&c, leader);
    let mut agent = AgentServiceClient::new(c.channel(f));
    let reg = |id: &str, vcpus| pb::RegisterRequest {
        id: id.into(),
        address: format!("10.77.0.{}:7100", if id == "a" { 11 } else { 12 }),
        arch: "aarch64".into(),
        capacity: Some(pb::Capacity { vcpus, memory_mib: 4096 }),
        labels: Default::default(),
        cpu_features: vec![],
        nics: vec![],
        nic_profile: String::new(),
    };
    let r = agent.register(reg("a", 4)).await.expect("register a").into_inner();
    assert!(r.heartbeat_interval_ms > 0);
    let bad = agent.register(pb::RegisterRequest { arch: "x86_64".into(), ..reg("b", 4) }).await;
    assert_eq!(bad.expect_err("x86 host").code(), Code::InvalidArgument);
    let hb = agent.heartbeat(pb::HeartbeatRequest { node: "stranger".into() }).await;
    assert_eq!(hb.expect_err("unregistered").code(), Code::NotFound);

    let mut watch = agent
        .watch_assignments(pb::WatchAssignmentsRequest { node: "a".into(), from_revision: 0 })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("stream").expect("first set");
    assert!(first.vms.is_empty());

    // Keep node a alive from a background task.
    let mut hb_client = agent.clone();
    let hb_task = tokio::spawn(async move {
        loop {
            let _ = hb_client.heartbeat(pb::HeartbeatRequest { node: "a".into() }).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    let mut cl = c.client(leader);
    cl.create_vm(create("fits", 2, 1024, pb::Power::Running)).await.expect("create");
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("assignment in time");
    let set = next.expect("stream").expect("a set");
    assert_eq!(set.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["fits"]);
    assert_eq!(set.vms[0].placement, "a");

    // Too big for any node: refused with a reason, stays pending.
    cl.create_vm(create("huge", 64, 1024, pb::Power::Running)).await.expect("create huge");
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let vm = cl.get_vm(get("huge")).await.expect("get").into_inner();
        if !vm.unschedulable_reason.is_empty() {
            break vm.unschedulable_reason;
        }
        assert!(Instant::now() < deadline, "no unschedulable reason recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("vCPU"), "{reason}");

    // Status report from the agent.
    agent
        .report_vm_status(pb::ReportVmStatusRequest {
            node: "a".into(),
            vm: "fits".into(),
            phase: pb::VmPhase::Running as i32,
            message: "pid 42".into(),
        })
        .await
        .expect("report");
    let vm = c.client(f).get_vm(get("fits")).await.expect("get").into_inner();
    assert_eq!(vm.observed.map(|o| o.phase), Some(pb::VmPhase::Running as i32));

    // Resuming from the last revision seen sends nothing until a change.
    let mut resumed = agent
        .watch_assignments(pb::WatchAssignmentsRequest { node: "a".into(), from_revision: set.revision })
        .await
        .expect("resume")
        .into_inner();
    let quiet = tokio::time::timeout(Duration::from_millis(800), resumed.message()).await;
    assert!(quiet.is_err(), "resumed watch re-sent an unchanged set: {quiet:?}");
    cl.set_vm_power(pb::SetVmPowerRequest {
        name: "fits".into(),
        power: pb::Power::Stopped as i32,
        expected_generation: 0,
    })
    .await
    .expect("stop");
    let changed = tokio::time::timeout(Duration::from_secs(5), resumed.message()).await.expect("change seen");
    let changed = changed.expect("stream").expect("set");
    assert_eq!(changed.vms[0].desired_power, pb::Power::Stopped as i32);

    // Node b registers and then goes silent: Unreachable after the lease.
    agent.register(reg("b", 4)).await.expect("register b");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = cl.get_node(get("b")).await.expect("node b").into_inner();
        if n.state == pb::NodeState::Unreachable as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "node b never became Unreachable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = cl.get_node(get("a")).await.expect("node a").into_inner();
    assert_eq!(a.state, pb::NodeState::Ready as i32, "a heartbeating node was marked down");
    assert!(a.last_heartbeat_age_ms >= 0 && a.last_heartbeat_age_ms < 1500, "{}", a.last_heartbeat_age_ms);
    hb_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basaltctl_manages_profiles_volumes_vms_and_nodes() {
    let c = ControllerCluster::start(3, Options::default());
    let leader = c.wait_leader(LEADER_WAIT).await;
    let eps = c.ids().iter().map(|id| c.addr(*id)).collect::<Vec<_>>().join(",");
    let ok = |args: &[&str]| {
        let mut all = vec!["--endpoints", eps.as_str()];
        all.extend_from_slice(args);
        let out = basaltctl(&all);
        assert!(out.status.success(), "basaltctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let fails = |args: &[&str], code: i32, needle: &str| {
        let mut all = vec!["--endpoints", eps.as_str()];
        all.extend_from_slice(args);
        let out = basaltctl(&all);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "basaltctl {args:?}: {err}");
        assert!(err.contains(needle), "basaltctl {args:?}: {err:?} lacks {needle:?}");
    };
    ok(&[
        "profile",
        "create",
        "ec21",
        "--k",
        "2",
        "--m",
        "1",
        "--failure-domain",
        "osd",
        "--osd",
        "osd_max_backfills=2",
    ]);
    ok(&["profile", "create", "rep3", "--size", "3"]);
    let profiles: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "profile", "list"])).expect("json");
    assert_eq!(profiles.as_array().map(Vec::len), Some(2));
    assert_eq!(profiles[1]["kind"]["replicated"]["min_size"], 2);
    ok(&["volume", "create", "root", "--size", "1g", "--profile", "ec21", "--pool", "rbd-ec"]);
    ok(&[
        "vm",
        "create",
        "web-1",
        "--vcpus",
        "2",
        "--memory",
        "1g",
        "--kernel",
        "/images/Image",
        "--disk",
        "root",
        "--label",
        "app=web",
        "--stopped",
    ]);
    let vms: serde_json::Value =
        serde_json::from_str(&ok(&["-o", "json", "vm", "list", "--label", "app=web"])).expect("json");
    assert_eq!(vms[0]["name"], "web-1");
    assert_eq!(vms[0]["memory_mib"], 1024);
    assert_eq!(vms[0]["disks"][0]["volume"], "root");
    assert_eq!(vms[0]["desired_power"], "stopped");
    let table = ok(&["vm", "list"]);
    assert!(table.lines().any(|l| l.starts_with("web-1") && l.contains("(pending)")), "{table}");
    ok(&["vm", "start", "web-1"]);
    let shown: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "vm", "show", "web-1"])).expect("json");
    assert_eq!(shown["desired_power"], "running");
    // No node exists, so the reconciler says why it is pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "vm", "show", "web-1"])).expect("json");
        if v["unschedulable_reason"].as_str().is_some_and(|r| r.contains("no node")) {
            break;
        }
        assert!(Instant::now() < deadline, "no reason recorded: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // --wait gives up with exit code 4 when nothing runs the VM.
    fails(&["vm", "stop", "web-1", "--wait", "--timeout", "1"], 4, "not Stopped");

    // Refusals: the cluster's (exit 1, with its reason) and the command line's (exit 2).
    fails(&["vm", "create", "web-1", "--kernel", "/k"], 1, "already exists");
    fails(&["vm", "create", "big", "--vcpus", "0", "--kernel", "/k"], 1, "vCPUs");
    fails(&["vm", "create", "x", "--kernel", "/k", "--disk", "root:rx"], 2, "not ro or rw");
    fails(&["vm", "create", "x"], 2, "--kernel");
    fails(&["volume", "delete", "root"], 1, "attached");
    fails(&["node", "cordon", "nowhere"], 1, "does not exist");
    fails(&["profile", "create", "p", "--size", "3", "--k", "2"], 2, "cannot be used with");
    let none = basaltctl(&["--endpoints", "127.0.0.1:1", "vm", "list"]);
    assert_eq!(none.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no controller reachable"));

    // --new-disk: the volume is created with the VM, and rolled back when the VM is refused.
    ok(&["vm", "create", "nd", "--kernel", "/k", "--new-disk", "nd-root:1g:rep3", "--stopped"]);
    let nd: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "vm", "show", "nd"])).expect("json");
    assert_eq!(nd["disks"][0]["volume"], "nd-root", "{nd}");
    let vol: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "volume", "show", "nd-root"])).expect("json");
    assert_eq!((vol["pool"].as_str(), vol["size_bytes"].as_u64()), (Some("rbd"), Some(1 << 30)), "{vol}");
    fails(&["vm", "create", "nd", "--kernel", "/k", "--new-disk", "nd-data:1g:rep3"], 1, "already exists");
    fails(&["volume", "show", "nd-data"], 1, "not found");
    fails(&["vm", "create", "x", "--kernel", "/k", "--new-disk", "nd-data:1g"], 2, "VOLUME:SIZE:PROFILE");
    ok(&["vm", "delete", "nd", "--delete-disks"]);

    // Networks and the addresses of VM NICs (IPAM in the replicated state).
    ok(&["network", "create", "blue", "--cidr", "10.10.0.0/24"]);
    ok(&["network", "create", "green", "--cidr", "10.20.0.0/29", "--vni", "42", "--gateway", "none"]);
    fails(&["network", "create", "wide", "--cidr", "10.10.0.0/16"], 1, "overlaps network blue");
    fails(&["network", "create", "dup", "--cidr", "10.30.0.0/24", "--vni", "42"], 1, "VNI 42");
    fails(&["network", "create", "bad", "--cidr", "10.30.0.7/24"], 1, "host bits");
    ok(&["vm", "create", "n1", "--kernel", "/k", "--nic", "blue", "--nic", "green:10.20.0.5", "--stopped"]);
    let n1: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "vm", "show", "n1"])).expect("json");
    let nics = &n1["nics"];
    assert_eq!((nics[0]["ip"].as_str(), nics[0]["prefix"].as_u64()), (Some("10.10.0.2"), Some(24)), "{n1}");
    assert_eq!(nics[0]["gateway"], "10.10.0.1", "{n1}");
    assert!(nics[0]["mac"].as_str().is_some_and(|m| m.starts_with("02:ba:5a:")), "{n1}");
    assert_eq!((nics[1]["ip"].as_str(), &nics[1]["gateway"]), (Some("10.20.0.5"), &serde_json::Value::Null), "{n1}");
    assert_ne!(nics[0]["mac"], nics[1]["mac"]);
    fails(&["vm", "create", "n2", "--kernel", "/k", "--nic", "green:10.20.0.5"], 1, "taken by vm n1 nic 1");
    fails(&["vm", "create", "n2", "--kernel", "/k", "--nic", "blue:10.10.9.1"], 1, "outside");
    fails(&["vm", "create", "n2", "--kernel", "/k", "--nic", "blue:x"], 2, "not an IPv4 address");
    fails(&["vm", "create", "n2", "--kernel", "/k", "--nic", "red"], 1, "network red does not exist");
    let table = ok(&["network", "list"]);
    assert!(table.lines().any(|l| l.starts_with("blue") && l.contains("1000") && l.contains("1/253")), "{table}");
    let blue: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "network", "show", "blue"])).expect("json");
    assert_eq!((blue["leases"][0]["vm"].as_str(), blue["leases"][0]["ip"].as_str()), (Some("n1"), Some("10.10.0.2")));
    fails(&["network", "delete", "blue"], 1, "in use by vm n1 nic 0");
    ok(&["vm", "delete", "n1"]);
    ok(&["network", "delete", "blue"]);
    fails(&["network", "show", "blue"], 1, "not found");

    let events = ok(&["events", "--subject", "vm/web-1"]);
    assert!(events.contains("VmCreated") && events.contains("VmPowerChanged"), "{events}");
    let out = ok(&["vm", "delete", "web-1", "--delete-disks"]);
    assert!(out.contains("deleted volumes root"), "{out}");
    let vols: serde_json::Value = serde_json::from_str(&ok(&["-o", "json", "volume", "list"])).expect("json");
    assert_eq!(vols.as_array().map(Vec::len), Some(0));
    let nodes = ok(&["node", "list"]);
    assert!(nodes.starts_with("NODE"), "{nodes}");
    let _ = leader;
}
