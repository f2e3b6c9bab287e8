//! Three real `basalt-controller` processes, each with a `[ceph]` section,
//! against the real dev Ceph of `deploy/ceph-dev/up` (127.0.0.1; its dir is
//! `BASALT_CEPH_DIR`, default /tmp/basalt-ceph, as for the storage crate's
//! tests): the leader's storage reconciler creates pools, erasure-code
//! profiles, OSD tunables and RBD images, grows and removes images, records
//! each volume's and profile's state (with Ceph's own reason when Ceph
//! refuses), and a removal left pending by a killed leader is done by the
//! next one; with `vm_client`, the VMs' cephx client gets caps on exactly
//! the pools volumes use. Everything is checked in Ceph through the storage
//! crate. And a controller whose Ceph cannot be reached stops on SIGTERM.
//!
//! Every pool, erasure-code profile and cephx client is named uniquely per
//! run and removed at the end (the dev Ceph sets mon_allow_pool_delete); the
//! dev Ceph's own `rbd`, `rbd-ec`, `ec21` and `client.vm` are only read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_proto::v1::agent_service_client::AgentServiceClient;
use basalt_storage::ceph::{ClientConfig, Cluster};
use basalt_storage::rbd::{self, Image};
use basalt_tests::controllers::{ControllerCluster, Options};
use serde_json::{json, Value};

const LEADER_WAIT: Duration = Duration::from_secs(30);
/// Pool creation, PG peering and image creation on the dev Ceph take seconds.
const CEPH_WAIT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

fn ceph_dir() -> PathBuf {
    std::env::var_os("BASALT_CEPH_DIR").map(PathBuf::from).unwrap_or_else(|| "/tmp/basalt-ceph".into())
}

fn admin() -> Cluster {
    let dir = ceph_dir();
    let conf = dir.join("ceph.conf");
    assert!(conf.is_file(), "{} is missing: start the dev Ceph with deploy/ceph-dev/up", conf.display());
    let cfg = ClientConfig {
        conf: Some(conf),
        id: "admin".into(),
        keyring: Some(dir.join("ceph.client.admin.keyring")),
        options: vec![("client_mount_timeout".into(), "30".into())],
    };
    Cluster::connect(&cfg).unwrap_or_else(|e| panic!("connect to the dev Ceph as client.admin: {e}"))
}

/// A name (volume, profile, pool) no other test or earlier run uses; a DNS label.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    format!("{prefix}-{}-{t}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Removes the pools, erasure-code profiles and cephx clients a test made,
/// also when it fails. Declare it before the controllers, so they are
/// killed first and cannot recreate what this removes.
struct Cleanup {
    ceph: Cluster,
    pools: Vec<String>,
    ec_profiles: Vec<String>,
    tunables: Vec<&'static str>,
    clients: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.pools {
            if let Err(e) = self.ceph.remove_pool(p) {
                if e.code() != Some(-libc::ENOENT) {
                    eprintln!("cleanup: remove pool {p}: {e}");
                }
            }
        }
        for p in &self.ec_profiles {
            let _ = self.ceph.remove_ec_profile(p);
        }
        if !self.tunables.is_empty() {
            let _ = self.ceph.reset_osd_tunables(&self.tunables);
        }
        for c in &self.clients {
            if let Err(e) = self.ceph.mon_command(&json!({"prefix": "auth rm", "entity": format!("client.{c}")})) {
                eprintln!("cleanup: remove client.{c}: {e}");
            }
        }
    }
}

/// A directory of the test's own, removed on drop (also when it fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cleanup() -> Cleanup {
    Cleanup { ceph: admin(), pools: Vec::new(), ec_profiles: Vec::new(), tunables: Vec::new(), clients: Vec::new() }
}

/// Three controllers that all know the dev Ceph. Small pools (8 PGs): the dev
/// Ceph's three OSDs allow only a few default-sized ones.
fn start() -> ControllerCluster {
    start_with("")
}

/// As [`start`], with more keys in `[ceph]`.
fn start_with(ceph: &str) -> ControllerCluster {
    let dir = ceph_dir();
    let config = format!(
        "[timing]\nreconcile_ms = 200\n[ceph]\nconf = {:?}\nid = \"admin\"\nkeyring = {:?}\npg_num = 8\n{ceph}",
        dir.join("ceph.conf"),
        dir.join("ceph.client.admin.keyring")
    );
    ControllerCluster::start(3, Options { config, ..Default::default() })
}

fn replicated(name: &str, size: u32, min_size: u32) -> pb::StorageProfile {
    pb::StorageProfile {
        name: name.into(),
        kind: Some(pb::storage_profile::Kind::Replicated(pb::ReplicatedProfile { size, min_size })),
        ..Default::default()
    }
}

fn erasure(name: &str, k: u32, m: u32) -> pb::StorageProfile {
    pb::StorageProfile {
        name: name.into(),
        kind: Some(pb::storage_profile::Kind::ErasureCoded(pb::ErasureCodedProfile {
            k,
            m,
            crush_failure_domain: "osd".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn volume(name: &str, pool: &str, size_bytes: u64, profile: &str) -> pb::Volume {
    pb::Volume {
        name: name.into(),
        pool: pool.into(),
        image: format!("img-{name}"),
        size_bytes,
        profile: profile.into(),
        ..Default::default()
    }
}

fn get(name: &str) -> pb::GetRequest {
    pb::GetRequest { name: name.into(), allow_stale: false }
}

fn state_name(s: i32) -> String {
    pb::StorageState::try_from(s).map(|s| s.as_str_name().to_string()).unwrap_or_else(|_| s.to_string())
}

/// Polls until the volume is in `want` (and `ok` accepts it); returns it.
async fn wait_volume(
    c: &ControllerCluster,
    name: &str,
    want: pb::StorageState,
    ok: impl Fn(&pb::Volume) -> bool,
) -> pb::Volume {
    let deadline = Instant::now() + CEPH_WAIT;
    let mut last = None;
    loop {
        let id = c.running()[0];
        if let Ok(v) = c.client(id).get_volume(get(name)).await {
            let v = v.into_inner();
            if v.state == want as i32 && ok(&v) {
                return v;
            }
            last = Some(v);
        }
        if Instant::now() > deadline {
            let l = last.map(|v| format!("{} {:?}", state_name(v.state), v.status_message));
            panic!("volume {name} not {} within {CEPH_WAIT:?} (last {l:?})\n{}", want.as_str_name(), c.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_profile(c: &ControllerCluster, name: &str, want: pb::StorageState) -> pb::StorageProfile {
    let deadline = Instant::now() + CEPH_WAIT;
    let mut last = None;
    loop {
        let id = c.running()[0];
        if let Ok(p) = c.client(id).get_profile(get(name)).await {
            let p = p.into_inner();
            if p.state == want as i32 {
                return p;
            }
            last = Some(p);
        }
        if Instant::now() > deadline {
            let l = last.map(|p| format!("{} {:?}", state_name(p.state), p.status_message));
            panic!("profile {name} not {} within {CEPH_WAIT:?} (last {l:?})\n{}", want.as_str_name(), c.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events about `subject` of `kind`, through any running controller.
async fn events(c: &ControllerCluster, subject: &str, kind: &str) -> Vec<pb::Event> {
    let id = c.running()[0];
    let req = pb::ListEventsRequest { subject: subject.into(), kind: kind.into(), ..Default::default() };
    c.client(id).list_events(req).await.expect("events").into_inner().events
}

async fn wait_event(c: &ControllerCluster, subject: &str, kind: &str) -> pb::Event {
    let deadline = Instant::now() + CEPH_WAIT;
    loop {
        if let Some(e) = events(c, subject, kind).await.pop() {
            return e;
        }
        assert!(Instant::now() < deadline, "no {kind} event for {subject} within {CEPH_WAIT:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn images(ceph: &Cluster, pool: &str) -> Vec<String> {
    rbd::list(&ceph.ioctx(pool).expect("open pool")).expect("list images")
}

async fn wait_image_gone(c: &ControllerCluster, ceph: &Cluster, pool: &str, image: &str) {
    let deadline = Instant::now() + CEPH_WAIT;
    while images(ceph, pool).iter().any(|i| i == image) {
        assert!(Instant::now() < deadline, "image {pool}/{image} still there after {CEPH_WAIT:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn image_size(ceph: &Cluster, pool: &str, image: &str) -> u64 {
    let io = ceph.ioctx(pool).expect("open pool");
    Image::open(&io, image).expect("open image").size().expect("size")
}

/// `osd pool ls detail` for one pool.
fn pool_detail(ceph: &Cluster, pool: &str) -> Option<Value> {
    let pools: Vec<Value> =
        ceph.mon_json(&json!({"prefix": "osd pool ls", "detail": "detail", "format": "json"})).expect("pool ls");
    pools.into_iter().find(|p| p["pool_name"] == pool)
}

fn basaltctl(c: &ControllerCluster, args: &[&str]) -> String {
    let bin = basalt_tests::controllers::host_bin("basaltctl");
    let eps = c.ids().iter().map(|id| c.addr(*id)).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(&bin)
        .arg("--endpoints")
        .arg(eps)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(out.status.success(), "basaltctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_volumes_are_created_grown_and_removed_in_ceph() {
    let t0 = Instant::now();
    let mut clean = cleanup();
    let ceph = admin();
    let (profile, pool) = (unique("rep"), unique("basalt-rep"));
    clean.pools.push(pool.clone());
    clean.tunables.push("osd_recovery_op_priority");
    let c = start();
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut api = c.client(leader);

    let mut p = replicated(&profile, 2, 1);
    p.osd_tunables = BTreeMap::from([("osd_recovery_op_priority".to_string(), 4u64)]).into_iter().collect();
    api.create_profile(p).await.expect("create profile");
    let v1 = unique("v");
    api.create_volume(volume(&v1, &pool, 64 * MIB, &profile)).await.expect("create volume");

    // The image exists with the volume's size, in a pool made to the profile.
    let got = wait_volume(&c, &v1, pb::StorageState::Ready, |_| true).await;
    assert_eq!(got.status_message, format!("image {pool}/img-{v1}, {} bytes", 64 * MIB));
    assert_eq!(image_size(&ceph, &pool, &format!("img-{v1}")), 64 * MIB);
    let d = pool_detail(&ceph, &pool).expect("pool created");
    assert_eq!((d["type"].as_i64(), d["size"].as_u64(), d["min_size"].as_u64()), (Some(1), Some(2), Some(1)), "{d}");
    assert_eq!(d["pg_num"].as_u64(), Some(8), "pg_num from [ceph]");
    assert!(d["application_metadata"].get("rbd").is_some(), "rbd application: {d}");
    let p = wait_profile(&c, &profile, pb::StorageState::Ready).await;
    assert!(p.status_message.contains(&format!("pools {pool}")), "{}", p.status_message);
    // The profile's OSD tunables are in the monitors' config database.
    assert!(p.status_message.contains("OSD tunables osd_recovery_op_priority=4"), "{}", p.status_message);
    assert_eq!(ceph.osd_config("osd", "osd_recovery_op_priority").expect("config get"), "4");
    // basaltctl shows the state.
    let table = basaltctl(&c, &["volume", "list"]);
    let line = table.lines().find(|l| l.starts_with(&v1)).unwrap_or_else(|| panic!("{table}"));
    assert!(line.ends_with("READY"), "{table}");
    assert!(table.lines().next().is_some_and(|h| h.ends_with("STATE")), "{table}");
    let table = basaltctl(&c, &["profile", "list"]);
    assert!(table.lines().any(|l| l.starts_with(&profile) && l.ends_with("READY")), "{table}");
    let shown: Value = serde_json::from_str(&basaltctl(&c, &["-o", "json", "volume", "show", &v1])).expect("json");
    assert_eq!(shown["state"], "READY");

    // A resize grows the image.
    api.resize_volume(pb::ResizeVolumeRequest { name: v1.clone(), size_bytes: 128 * MIB }).await.expect("resize");
    wait_volume(&c, &v1, pb::StorageState::Ready, |v| v.status_message.contains(&(128 * MIB).to_string())).await;
    assert_eq!(image_size(&ceph, &pool, &format!("img-{v1}")), 128 * MIB);

    // Deleting the volume removes its image.
    api.delete_volume(pb::NameRef { name: v1.clone() }).await.expect("delete volume");
    wait_image_gone(&c, &ceph, &pool, &format!("img-{v1}")).await;
    let e = wait_event(&c, &format!("volume/{v1}"), "ImageRemoved").await;
    assert_eq!(e.message, format!("image {pool}/img-{v1} removed"));

    // So does deleting a VM with its disks.
    let v2 = unique("v");
    api.create_volume(volume(&v2, &pool, 16 * MIB, &profile)).await.expect("create volume");
    wait_volume(&c, &v2, pb::StorageState::Ready, |_| true).await;
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 512,
        boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: "/var/lib/basalt/Image".into(),
            ..Default::default()
        })),
        disks: vec![pb::Disk { volume: v2.clone(), read_only: false }],
        ..Default::default()
    };
    let vm = unique("vm");
    let req = pb::CreateVmRequest { name: vm.clone(), spec: Some(spec), desired_power: pb::Power::Stopped as i32 };
    api.create_vm(req).await.expect("create vm");
    let w = api.delete_vm(pb::DeleteVmRequest { name: vm, delete_disks: true }).await.expect("delete vm").into_inner();
    assert_eq!(w.deleted_volumes, vec![v2.clone()]);
    wait_image_gone(&c, &ceph, &pool, &format!("img-{v2}")).await;
    assert!(images(&ceph, &pool).is_empty(), "{:?}", images(&ceph, &pool));
    eprintln!("replicated volumes: {:.1} s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_coded_volumes_keep_their_data_in_an_erasure_coded_pool() {
    let t0 = Instant::now();
    let mut clean = cleanup();
    let ceph = admin();
    let (profile, pool) = (unique("ec"), unique("basalt-ec"));
    let data_pool = format!("{pool}-data");
    clean.pools.extend([pool.clone(), data_pool.clone()]);
    clean.ec_profiles.push(profile.clone());
    let c = start();
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut api = c.client(leader);

    api.create_profile(erasure(&profile, 2, 1)).await.expect("create profile");
    let v = unique("v");
    api.create_volume(volume(&v, &pool, 32 * MIB, &profile)).await.expect("create volume");
    let got = wait_volume(&c, &v, pb::StorageState::Ready, |_| true).await;
    assert_eq!(got.status_message, format!("image {pool}/img-{v}, {} bytes, data in pool {data_pool}", 32 * MIB));
    let p = wait_profile(&c, &profile, pb::StorageState::Ready).await;
    assert!(p.status_message.contains(&format!("erasure-code profile {profile}; pools {pool}, {data_pool}")), "{p:?}");

    // Ceph's erasure-code profile is the profile's.
    let ec = ceph.ec_profile(&profile).expect("erasure-code profile");
    assert_eq!((ec["k"].as_str(), ec["m"].as_str(), ec["crush-failure-domain"].as_str()), ("2", "1", "osd"));
    // The image lives in a replicated pool (m+2 copies), its data in the EC pool.
    let meta = pool_detail(&ceph, &pool).expect("metadata pool");
    assert_eq!((meta["type"].as_i64(), meta["size"].as_u64(), meta["min_size"].as_u64()), (Some(1), Some(3), Some(2)));
    let data = pool_detail(&ceph, &data_pool).expect("data pool");
    assert_eq!(data["type"].as_i64(), Some(3), "{data}");
    assert_eq!(data["erasure_code_profile"], profile.as_str());
    assert!(data["flags_names"].as_str().is_some_and(|f| f.split(',').any(|f| f == "ec_overwrites")), "{data}");
    assert!(data["application_metadata"].get("rbd").is_some(), "{data}");
    let io = ceph.ioctx(&pool).expect("pool");
    let img = Image::open(&io, &format!("img-{v}")).expect("open image");
    let info = img.info().expect("info");
    assert_eq!(info.size, 32 * MIB);
    assert_eq!(info.data_pool_id, data["pool_id"].as_i64(), "data objects go to {data_pool}");
    // And it works: a write reads back.
    img.write_at(MIB, b"erasure-coded bytes").expect("write");
    assert_eq!(img.read_at(MIB, 19).expect("read"), b"erasure-coded bytes");
    drop(img);

    api.delete_volume(pb::NameRef { name: v.clone() }).await.expect("delete volume");
    wait_image_gone(&c, &ceph, &pool, &format!("img-{v}")).await;
    eprintln!("erasure-coded volume: {:.1} s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_ceph_refuses_is_failed_with_cephs_reason() {
    let t0 = Instant::now();
    let mut clean = cleanup();
    let ceph = admin();
    let size_one_pool = unique("basalt-one");
    clean.pools.push(size_one_pool.clone());
    let rbd_ec_before = pool_detail(&ceph, "rbd-ec").expect("the dev Ceph's rbd-ec");
    let c = start();
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut api = c.client(leader);

    // Our checks accept an EC profile named like one Ceph already has with
    // other values; Ceph refuses to override it (and Basalt never forces).
    api.create_profile(erasure("ec21", 4, 2)).await.expect("valid for Basalt");
    let p = wait_profile(&c, "ec21", pb::StorageState::Failed).await;
    assert!(p.status_message.contains("will not override erasure code profile ec21"), "{}", p.status_message);
    assert_eq!(ceph.ec_profile("ec21").expect("ec21")["k"], "2", "the dev Ceph's ec21 is unchanged");

    // Our checks accept one replica; Ceph refuses it unless told to allow it.
    let one = unique("one");
    api.create_profile(replicated(&one, 1, 1)).await.expect("valid for Basalt");
    let v = unique("v");
    api.create_volume(volume(&v, &size_one_pool, 16 * MIB, &one)).await.expect("create volume");
    let p = wait_profile(&c, &one, pb::StorageState::Failed).await;
    assert!(p.status_message.contains("configuring pool size as 1 is disabled by default"), "{}", p.status_message);
    let got = wait_volume(&c, &v, pb::StorageState::Failed, |_| true).await;
    assert!(got.status_message.starts_with(&format!("pool {size_one_pool}: ")), "{}", got.status_message);
    assert!(images(&ceph, &size_one_pool).is_empty(), "no image in a pool that is not as asked");

    // A pool that exists with another type is reported, never changed.
    let rep = unique("rep");
    api.create_profile(replicated(&rep, 3, 2)).await.expect("create profile");
    let clash = unique("v");
    api.create_volume(volume(&clash, "rbd-ec", 16 * MIB, &rep)).await.expect("create volume");
    let got = wait_volume(&c, &clash, pb::StorageState::Failed, |_| true).await;
    assert!(got.status_message.contains("pool rbd-ec exists and is not replicated"), "{}", got.status_message);
    wait_profile(&c, &rep, pb::StorageState::Failed).await;
    let table = basaltctl(&c, &["volume", "list"]);
    assert!(table.lines().any(|l| l.starts_with(&clash) && l.contains("FAILED: pool rbd-ec exists")), "{table}");
    let rbd_ec = pool_detail(&ceph, "rbd-ec").expect("rbd-ec");
    for k in ["type", "size", "min_size", "erasure_code_profile", "flags_names", "application_metadata"] {
        assert_eq!(rbd_ec[k], rbd_ec_before[k], "rbd-ec {k} changed");
    }
    assert!(!images(&ceph, "rbd-ec").contains(&format!("img-{clash}")));

    // Failures are retried but recorded once per distinct reason.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let changes = events(&c, &format!("volume/{clash}"), "VolumeStateChanged").await;
    assert_eq!(changes.len(), 1, "{changes:?}");
    eprintln!("refusals: {:.1} s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_left_by_a_killed_leader_is_done_by_the_next() {
    let t0 = Instant::now();
    let mut clean = cleanup();
    let ceph = admin();
    let (profile, pool) = (unique("rep"), unique("basalt-rm"));
    clean.pools.push(pool.clone());
    let mut c = start();
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut api = c.client(leader);
    api.create_profile(replicated(&profile, 2, 1)).await.expect("create profile");
    let v = unique("v");
    let image = format!("img-{v}");
    api.create_volume(volume(&v, &pool, 16 * MIB, &profile)).await.expect("create volume");
    wait_volume(&c, &v, pb::StorageState::Ready, |_| true).await;

    // While this test has the image open, Ceph refuses to remove it: the
    // deletion is committed, the removal stays pending with Ceph's reason.
    let io = ceph.ioctx(&pool).expect("pool");
    let held = Image::open(&io, &image).expect("open image");
    api.delete_volume(pb::NameRef { name: v.clone() }).await.expect("delete volume");
    let e = wait_event(&c, &format!("volume/{v}"), "ImageRemovalFailed").await;
    assert!(e.message.contains(&format!("removing image {pool}/{image}")), "{}", e.message);
    assert!(e.message.contains("ceph error -16"), "busy: {}", e.message);
    assert!(images(&ceph, &pool).contains(&image));
    // The image still holds the deleted volume's data: its name is not free.
    let err = api.create_volume(volume(&v, &pool, 16 * MIB, &profile)).await.expect_err("image not removed yet");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("still being removed"), "{}", err.message());

    // The leader dies with the removal undone; the next leader does it.
    c.kill(leader);
    drop(held);
    let next = c.wait_leader(LEADER_WAIT).await;
    assert_ne!(next, leader);
    wait_image_gone(&c, &ceph, &pool, &image).await;
    let e = wait_event(&c, &format!("volume/{v}"), "ImageRemoved").await;
    assert_eq!(e.message, format!("image {pool}/{image} removed"));
    // The image name is free again once the removal is done.
    let mut api = c.client(next);
    api.create_volume(volume(&v, &pool, 16 * MIB, &profile)).await.expect("same image name again");
    wait_volume(&c, &v, pb::StorageState::Ready, |_| true).await;
    eprintln!("removal across a leader change: {:.1} s", t0.elapsed().as_secs_f64());
}

/// SIGTERM to `id`; waits up to `within` for it to exit and returns how it
/// exited and how long it took. Not the harness's `stop()`, which SIGKILLs
/// after 10 s and does not say whether it had to.
async fn sigterm(c: &mut ControllerCluster, id: u64, within: Duration) -> (std::process::ExitStatus, Duration) {
    let pid = c.pid(id).expect("running");
    let t = Instant::now();
    // SAFETY: kill(2) on the PID of a child the harness spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    loop {
        if let Some(status) = c.exited(id) {
            let took = t.elapsed();
            c.kill(id); // already reaped: only marks it stopped
            return (status, took);
        }
        if t.elapsed() > within {
            let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| {
                    d.filter_map(|t| t.ok())
                        .map(|t| {
                            let p = t.path();
                            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                            let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                            format!("{} {}", comm.trim(), wchan.trim())
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            c.kill(id);
            panic!("controller {id} still running {within:?} after SIGTERM (threads: {threads})\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A controller whose Ceph cannot be reached (a ceph.conf naming a monitor
/// port nobody listens on) still stops on SIGTERM alone, with exit code 0,
/// within a few seconds: while the leader's reconciler is inside
/// `rados_connect`, and with an agent's assignment stream open on it. Its
/// connect attempts are bounded (`client_mount_timeout`) and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_cannot_reach_ceph_stops_on_sigterm() {
    let t0 = Instant::now();
    let port = basalt_tests::controllers::free_port();
    let dir = TempDir::new("basalt-no-ceph");
    let conf = dir.0.join("ceph.conf");
    let keyring = dir.0.join("ceph.client.admin.keyring");
    std::fs::write(&conf, format!("[global]\nmon_host = 127.0.0.1:{port}\n")).expect("write conf");
    std::fs::copy(ceph_dir().join("ceph.client.admin.keyring"), &keyring).expect("copy the admin keyring");
    let config = format!("[timing]\nreconcile_ms = 200\n[ceph]\nconf = {conf:?}\nkeyring = {keyring:?}\n");
    let mut c = ControllerCluster::start(3, Options { config, ..Default::default() });
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut api = c.client(leader);
    api.create_profile(replicated("rep", 2, 1)).await.expect("create profile");
    api.create_volume(volume("v", "basalt-unreachable", 16 * MIB, "rep")).await.expect("create volume");
    // An agent watching its assignments on every controller: a stream that
    // never ends by itself.
    let mut agent = AgentServiceClient::new(c.channel(leader));
    let reg = pb::RegisterRequest {
        id: "n1".into(),
        address: "10.77.0.11:7100".into(),
        arch: "aarch64".into(),
        capacity: Some(pb::Capacity { vcpus: 2, memory_mib: 2048 }),
        labels: Default::default(),
        cpu_features: vec![],
        nics: vec![],
        nic_profile: String::new(),
    };
    agent.register(reg).await.expect("register");
    let mut watches = BTreeMap::new();
    for id in c.ids() {
        let mut w = AgentServiceClient::new(c.channel(id))
            .watch_assignments(pb::WatchAssignmentsRequest { node: "n1".into(), from_revision: 0 })
            .await
            .expect("watch")
            .into_inner();
        w.message().await.expect("stream").expect("first set");
        watches.insert(id, w);
    }
    // The leader has been connecting since it was elected: SIGTERM it there.
    let log = std::fs::read_to_string(c.log_path(leader)).unwrap_or_default();
    assert!(!log.contains("connected to Ceph"), "nothing listens on port {port}\n{log}");
    let (status, took) = sigterm(&mut c, leader, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "leader {leader}: {status} (a signal means it did not stop by itself)");
    assert!(took < Duration::from_secs(6), "leader {leader} took {took:?} to stop");
    eprintln!("leader stopped {:.2} s after SIGTERM", took.as_secs_f64());
    // Its agents were told, rather than left waiting on a dead stream.
    let mut w = watches.remove(&leader).expect("watch");
    let end = tokio::time::timeout(Duration::from_secs(5), w.message()).await.expect("the stream ended");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");

    // The next leader gives up each connect attempt after client_mount_timeout and says so.
    let next = c.wait_leader(LEADER_WAIT).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = std::fs::read_to_string(c.log_path(next)).unwrap_or_default();
        if log.contains("storage: cannot connect to Ceph") {
            break;
        }
        assert!(Instant::now() < deadline, "no connect failure reported\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in c.running() {
        let (status, took) = sigterm(&mut c, id, Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "controller {id}: {status}");
        assert!(took < Duration::from_secs(6), "controller {id} took {took:?} to stop");
        eprintln!("controller {id} stopped {:.2} s after SIGTERM", took.as_secs_f64());
    }
    eprintln!("unreachable Ceph, SIGTERM: {:.1} s", t0.elapsed().as_secs_f64());
}

/// `ceph auth get-or-create client.<id>` with these caps; writes its keyring
/// to `keyring`.
fn create_client(ceph: &Cluster, id: &str, caps: &[&str], keyring: &std::path::Path) {
    let cmd = json!({"prefix": "auth get-or-create", "entity": format!("client.{id}"), "caps": caps, "format": "json"});
    let entries: Vec<Value> = ceph.mon_json(&cmd).unwrap_or_else(|e| panic!("create client.{id}: {e}"));
    let key = entries[0]["key"].as_str().expect("key");
    std::fs::write(keyring, format!("[client.{id}]\n\tkey = {key}\n")).expect("write keyring");
}

/// Connects as `client.<id>` (a new session, so a new ticket with the
/// client's current caps), opens the image, writes and reads back a few bytes.
fn open_as(
    id: &str,
    keyring: &std::path::Path,
    pool: &str,
    image: &str,
) -> Result<(), basalt_storage::ceph::CephError> {
    let cfg = ClientConfig {
        conf: Some(ceph_dir().join("ceph.conf")),
        id: id.into(),
        keyring: Some(keyring.into()),
        options: vec![("client_mount_timeout".into(), "30".into()), ("rados_osd_op_timeout".into(), "30".into())],
    };
    let c = Cluster::connect(&cfg)?;
    let io = c.ioctx(pool)?;
    let img = Image::open(&io, image)?;
    img.write_at(4096, b"a VM's bytes")?;
    assert_eq!(img.read_at(4096, 12)?, b"a VM's bytes");
    Ok(())
}

/// Polls until the client's caps are `want`.
async fn wait_caps(c: &ControllerCluster, ceph: &Cluster, id: &str, want: &BTreeMap<String, String>) {
    let deadline = Instant::now() + CEPH_WAIT;
    loop {
        let have = ceph.client_caps(id).expect("auth get");
        if have.as_ref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "client.{id} caps {have:?}, not {want:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn caps(pools: &[&str]) -> BTreeMap<String, String> {
    let mut pools = pools.to_vec();
    pools.sort();
    let each = pools.iter().map(|p| format!("profile rbd pool={p}")).collect::<Vec<_>>().join(", ");
    BTreeMap::from([("mon".into(), "profile rbd".into()), ("osd".into(), each.clone()), ("mgr".into(), each)])
}

/// With `vm_client`, the leader gives the VMs' cephx client `profile rbd` on
/// exactly the pools volumes use (EC data pools included) plus
/// `vm_client_pools`, and VMs can then open their images as that client; a
/// client that does not exist is reported on the profiles, not created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vm_client_may_open_exactly_the_pools_volumes_use() {
    let t0 = Instant::now();
    let mut clean = cleanup();
    let ceph = admin();
    let client = unique("basalt-vm");
    let kept = unique("basalt-kept");
    let (rep, ec) = (unique("rep"), unique("ec"));
    let (old_pool, new_pool, ec_pool, late_pool) =
        (unique("basalt-old"), unique("basalt-new"), unique("basalt-vmec"), unique("basalt-late"));
    let ec_data = format!("{ec_pool}-data");
    clean.pools.extend([old_pool.clone(), new_pool.clone(), ec_pool.clone(), ec_data.clone(), late_pool.clone()]);
    clean.ec_profiles.push(ec.clone());
    clean.clients.push(client.clone());
    let dir = TempDir::new("basalt-vm-client");
    let keyring = dir.0.join(format!("ceph.client.{client}.keyring"));

    // A VM client whose caps name another pool, and an image in a pool it
    // cannot use: opening it is refused.
    let other = format!("profile rbd pool={kept}");
    create_client(&ceph, &client, &["mon", "profile rbd", "osd", &other, "mgr", &other], &keyring);
    ceph.create_pool(&basalt_storage::ceph::profiles::PoolSpec {
        pg_num: Some(8),
        ..basalt_storage::ceph::profiles::PoolSpec::replicated(&old_pool, 2, 1)
    })
    .expect("create pool");
    let old_image = "img-old";
    let opts = rbd::ImageOptions { features: Some(rbd::features::VM_DEFAULT), ..Default::default() };
    rbd::create(&ceph.ioctx(&old_pool).expect("pool"), old_image, 16 * MIB, &opts).expect("create image");
    let err = open_as(&client, &keyring, &old_pool, old_image).expect_err("not its pool");
    assert_eq!(err.code(), Some(-libc::EPERM), "permission denied: {err}");

    // The controllers own its caps from now on: a volume on that image, one
    // in a pool they create, one erasure-coded.
    let c = start_with(&format!("vm_client = {client:?}\nvm_client_pools = [{kept:?}]\n"));
    let leader = c.wait_leader(LEADER_WAIT).await;
    let mut api = c.client(leader);
    api.create_profile(replicated(&rep, 2, 1)).await.expect("create profile");
    api.create_profile(erasure(&ec, 2, 1)).await.expect("create EC profile");
    let (v_old, v_new, v_ec) = (unique("v"), unique("v"), unique("v"));
    api.create_volume(pb::Volume { image: old_image.into(), ..volume(&v_old, &old_pool, 16 * MIB, &rep) })
        .await
        .expect("volume on the existing image");
    api.create_volume(volume(&v_new, &new_pool, 16 * MIB, &rep)).await.expect("volume in a new pool");
    api.create_volume(volume(&v_ec, &ec_pool, 16 * MIB, &ec)).await.expect("EC volume");
    for v in [&v_old, &v_new, &v_ec] {
        wait_volume(&c, v, pb::StorageState::Ready, |_| true).await;
    }
    let want = caps(&[&kept, &old_pool, &new_pool, &ec_pool, &ec_data]);
    wait_caps(&c, &ceph, &client, &want).await;
    eprintln!("caps: {:?}", want["osd"]);
    // The VM's opens now work, the EC one writing to its data pool.
    open_as(&client, &keyring, &old_pool, old_image).expect("open the image that was refused");
    open_as(&client, &keyring, &new_pool, &format!("img-{v_new}")).expect("open in the new pool");
    open_as(&client, &keyring, &ec_pool, &format!("img-{v_ec}")).expect("open the EC image");
    assert_eq!(wait_profile(&c, &rep, pb::StorageState::Ready).await.state, pb::StorageState::Ready as i32);

    // Without the client, a new pool cannot be given to it: the profile says
    // why, and the client is not created behind the operator's back.
    ceph.mon_command(&json!({"prefix": "auth rm", "entity": format!("client.{client}")})).expect("auth rm");
    let v_late = unique("v");
    api.create_volume(volume(&v_late, &late_pool, 16 * MIB, &rep)).await.expect("volume in another pool");
    let p = wait_profile(&c, &rep, pb::StorageState::Failed).await;
    assert!(p.status_message.contains(&format!("client.{client} (ceph.vm_client) does not exist")), "{p:?}");
    eprintln!("without the client: {}", p.status_message);
    assert_eq!(ceph.client_caps(&client).expect("auth get"), None, "not created by the controller");
    // The image is made all the same; once the operator creates the client
    // the leader gives it every pool, and the profile is Ready again.
    wait_volume(&c, &v_late, pb::StorageState::Ready, |_| true).await;
    create_client(&ceph, &client, &["mon", "profile rbd"], &keyring);
    wait_caps(&c, &ceph, &client, &caps(&[&kept, &old_pool, &new_pool, &ec_pool, &ec_data, &late_pool])).await;
    wait_profile(&c, &rep, pb::StorageState::Ready).await;
    open_as(&client, &keyring, &late_pool, &format!("img-{v_late}")).expect("open in the late pool");
    eprintln!("VM client caps: {:.1} s", t0.elapsed().as_secs_f64());
}
