//! The leader's storage reconciler: makes Ceph hold what the volume and
//! profile records say, through the storage crate (librados/librbd), and
//! records what it found as each record's [`StorageStatus`].
//!
//! Each pass, in this order:
//! 1. images of deleted volumes (the state machine queued them when the
//!    volume went) are removed, and the removal committed (`ImageRemoved`);
//!    a failure is recorded on the pending removal and retried;
//! 2. for every profile: its erasure-code profile (EC only; Ceph keeps an
//!    existing one with the same values and refuses different ones — Basalt
//!    never forces), the pools its volumes use (see
//!    [`crate::model::profiles`] for the layout: created with the profile's
//!    spec, or brought to it if they exist with the right type; a pool of
//!    the wrong type is reported, never changed), then its OSD tunables.
//!    With `vm_client` set, the VMs' cephx client then gets `profile rbd` on
//!    exactly the pools volumes use (and `vm_client_pools`): its caps are
//!    read (`auth get`) when that set changes, after [`RECHECK_CAPS`], or
//!    [`RETRY_FAILED`] after a failure, and written (`auth caps`) only when
//!    they differ. A missing client is not created: every profile with pools
//!    is Failed with the reason until it exists;
//! 3. for every volume whose pool is in order: its image, created with the
//!    volume's size if missing, grown if smaller (never shrunk). An image
//!    that vanished after it was once Ready is reported, not recreated empty.
//!
//! Outcomes are committed (`SetStorageStatus`) only when they differ from the
//! recorded status, against the revision the record had when this pass read
//! it, so a stale outcome never lands on a newer spec. What was done is
//! remembered in leader memory: a Ready record is looked at again only after
//! it changes or [`RECHECK`] has passed, a Failed one after [`RETRY_FAILED`].
//! A new leader starts with an empty memory and so checks everything once.
//! Every librados call runs on the blocking pool, with bounded connect, mon
//! and OSD timeouts ([`CLIENT_OPTIONS`]); the whole loop runs beside, not
//! inside, the scheduling reconciler, so a slow Ceph delays only storage,
//! and nothing waits for a call in progress when the controller stops.
//!
//! Not done here: deleting pools (a pool outlives its last volume) or a
//! deleted profile's erasure-code profile and OSD tunables, shrinking
//! images, and growing an image whose exclusive lock a running VM holds
//! (Ceph refuses; the volume is Failed and retried until it succeeds).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_storage::ceph::profiles::{PoolKind, PoolSpec};
use basalt_storage::ceph::{CephError, ClientConfig, Cluster};
use basalt_storage::rbd::{self, features, Image, ImageOptions};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::config::CephConfig;
use crate::fencing;
use crate::model::storage::MAX_STATUS_MESSAGE;
use crate::model::{
    ImageRemoval, Node, NodeState, StorageProfile, StorageState, StorageStatus, StorageSubject, Volume,
};
use crate::node::{Controller, LeaderTicks, NodeError};
use crate::state_machine::Command;

/// A Failed record (or a failed removal) is tried again after this long.
pub const RETRY_FAILED: Duration = Duration::from_secs(5);
/// A Ready record is checked against Ceph again after this long.
pub const RECHECK: Duration = Duration::from_secs(600);
/// The VM client's caps are read from Ceph again after this long (someone
/// may have changed them), and at once when the pools change.
pub const RECHECK_CAPS: Duration = Duration::from_secs(60);
/// Wait between connection attempts while Ceph cannot be reached.
const RECONNECT: Duration = Duration::from_secs(5);
/// librados options of the reconciler's client, so that no call (connect
/// included; librados's defaults are 300 s and forever) holds a pass for
/// minutes when Ceph is unreachable: seconds.
pub const CLIENT_OPTIONS: [(&str, &str); 3] =
    [("client_mount_timeout", "15"), ("rados_mon_op_timeout", "30"), ("rados_osd_op_timeout", "30")];
/// "No such pool or image", as Ceph returns it (negative errno).
pub(crate) const ENOENT: i32 = -2;

/// What a pass did for one record, in leader memory.
struct Done {
    spec_revision: u64,
    state: StorageState,
    at: Instant,
}

impl Done {
    fn still_good(&self, status: &StorageStatus) -> bool {
        let wait = if self.state == StorageState::Ready { RECHECK } else { RETRY_FAILED };
        self.spec_revision == status.spec_revision && status.state == self.state && self.at.elapsed() < wait
    }
}

/// The last check of the VM client's caps.
struct CapsDone {
    want: BTreeMap<String, String>,
    outcome: Result<(), String>,
    at: Instant,
}

#[derive(Default)]
struct Memory {
    profiles: HashMap<String, Done>,
    /// Outcome of the last check of each volume pool (with, for EC, its data pool).
    pools: HashMap<String, Result<(), String>>,
    volumes: HashMap<String, Done>,
    /// When removing (pool, image) last failed.
    removals: HashMap<(String, String), Instant>,
    vm_caps: Option<CapsDone>,
    /// Why a node could not be fenced, last said (said again only when it changes).
    fence_refused: HashMap<String, String>,
    /// Nodes seen Fenced: when one is back, its blocklist entry is lifted.
    fenced: BTreeSet<String>,
    /// When every back-in-service node's entry was last looked for.
    unfence_checked: Option<Instant>,
}

struct Reconciler {
    cfg: CephConfig,
    cluster: Option<Cluster>,
    next_connect: Instant,
    last_connect_error: String,
    memory: Memory,
    term: u64,
}

pub async fn run(ctl: Arc<Controller>, cfg: CephConfig) {
    let mut ticks = LeaderTicks::new(ctl.clone());
    let mut r = Reconciler {
        cfg,
        cluster: None,
        next_connect: Instant::now(),
        last_connect_error: String::new(),
        memory: Memory::default(),
        term: 0,
    };
    while let Some((leads, term)) = ticks.next().await {
        if !leads || term != r.term {
            // What another leader did meanwhile is unknown: look again.
            r.memory = Memory::default();
            r.term = term;
            if !leads {
                continue;
            }
        }
        if let Err(e) = r.pass(&ctl).await {
            warn!("storage: {e}");
        }
    }
}

/// Runs `f` with the cluster on the blocking pool.
async fn blocking<T: Send + 'static>(
    cluster: &Cluster,
    f: impl FnOnce(&Cluster) -> T + Send + 'static,
) -> Result<T, NodeError> {
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| NodeError::Internal(format!("storage task failed: {e}")))
}

/// Ceph's messages can be long; the replicated state keeps at most
/// [`MAX_STATUS_MESSAGE`] bytes of each.
fn clip(mut s: String) -> String {
    if s.len() > MAX_STATUS_MESSAGE {
        let mut end = MAX_STATUS_MESSAGE - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl Reconciler {
    async fn connected(&mut self) -> Option<Cluster> {
        if self.cluster.is_none() && Instant::now() >= self.next_connect {
            let cfg = ClientConfig {
                conf: Some(self.cfg.conf.clone()),
                id: self.cfg.id.clone(),
                keyring: self.cfg.keyring.clone(),
                // Fail a call rather than hang the loop when Ceph is unreachable.
                options: CLIENT_OPTIONS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            };
            let res = tokio::task::spawn_blocking(move || Cluster::connect(&cfg)).await;
            match res {
                Ok(Ok(c)) => {
                    info!(conf = %self.cfg.conf.display(), id = %self.cfg.id, "storage: connected to Ceph");
                    self.last_connect_error.clear();
                    self.cluster = Some(c);
                }
                Ok(Err(e)) => {
                    let e = e.to_string();
                    if e != self.last_connect_error {
                        warn!("storage: cannot connect to Ceph (retrying every {RECONNECT:?}): {e}");
                        self.last_connect_error = e;
                    }
                    self.next_connect = Instant::now() + RECONNECT;
                }
                Err(e) => warn!("storage: connect task failed: {e}"),
            }
        }
        self.cluster.clone()
    }

    async fn pass(&mut self, ctl: &Controller) -> Result<(), NodeError> {
        let Some(cluster) = self.connected().await else { return Ok(()) };
        // First: a host that went silent may hold disks that HA VMs wait for.
        self.fence(ctl, &cluster).await?;
        let (removals, profiles, volumes) = {
            let st = ctl.shared.read();
            let c = &st.cluster;
            let removals: Vec<ImageRemoval> = c.image_removals().to_vec();
            let profiles: Vec<(StorageProfile, StorageStatus, Vec<String>)> = c
                .profiles()
                .map(|p| {
                    let mut pools: Vec<String> =
                        c.volumes().filter(|v| v.profile == p.name).map(|v| v.pool.clone()).collect();
                    pools.sort();
                    pools.dedup();
                    (p.clone(), c.profile_status(&p.name), pools)
                })
                .collect();
            let volumes: Vec<(Volume, StorageStatus, Option<String>)> = c
                .volumes()
                .map(|v| {
                    let data_pool = c.profile(&v.profile).and_then(|p| p.data_pool(&v.pool));
                    (v.clone(), c.volume_status(&v.name), data_pool)
                })
                .collect();
            (removals, profiles, volumes)
        };
        // Every pool a VM may open: volume pools, EC data pools, and the
        // ones the operator keeps.
        let mut vm_pools: BTreeSet<String> = self.cfg.vm_client_pools.iter().cloned().collect();
        for (v, _, data_pool) in &volumes {
            vm_pools.insert(v.pool.clone());
            vm_pools.extend(data_pool.clone());
        }

        for r in removals {
            if !ctl.is_leader() {
                return Ok(());
            }
            let key = (r.pool.clone(), r.image.clone());
            if self.memory.removals.get(&key).is_some_and(|t| t.elapsed() < RETRY_FAILED) {
                continue;
            }
            let (pool, image) = key.clone();
            match blocking(&cluster, move |c| remove_image(c, &pool, &image)).await? {
                Ok(()) => {
                    info!(volume = %r.volume, "storage: image {}/{} removed", r.pool, r.image);
                    self.memory.removals.remove(&key);
                    match ctl.write(Command::ImageRemoved { pool: r.pool, image: r.image }).await {
                        Ok(_) | Err(NodeError::Command(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    let message = clip(e.to_string());
                    self.memory.removals.insert(key, Instant::now());
                    if message != r.last_error {
                        warn!(volume = %r.volume, "storage: cannot remove image {}/{}: {message}", r.pool, r.image);
                        let cmd = Command::ImageRemovalFailed { pool: r.pool, image: r.image, message };
                        match ctl.write(cmd).await {
                            Ok(_) | Err(NodeError::Command(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }

        let mut outcomes = Vec::new();
        for (p, status, pools) in profiles {
            if !ctl.is_leader() {
                return Ok(());
            }
            if self.memory.profiles.get(&p.name).is_some_and(|d| d.still_good(&status)) {
                continue;
            }
            let name = p.name.clone();
            let has_pools = !pools.is_empty();
            let pg_num = self.cfg.pg_num;
            let (outcome, pool_results) = blocking(&cluster, move |c| ensure_profile(c, &p, &pools, pg_num)).await?;
            self.memory.pools.extend(pool_results);
            outcomes.push((name, status, has_pools, outcome));
        }
        // After the pools: the VMs' client may open exactly these.
        let caps = self.vm_client_caps(&cluster, &vm_pools).await?;
        for (name, status, has_pools, outcome) in outcomes {
            if !ctl.is_leader() {
                return Ok(());
            }
            let (state, message) = match (outcome, &caps) {
                (Ok(m), Some(Err(e))) if has_pools => {
                    (StorageState::Failed, format!("VMs cannot open its pools: {e}; {m}"))
                }
                (Ok(m), _) => (StorageState::Ready, m),
                (Err(m), _) => (StorageState::Failed, m),
            };
            if self.record(ctl, StorageSubject::Profile(name.clone()), &status, state, message).await? {
                self.memory
                    .profiles
                    .insert(name, Done { spec_revision: status.spec_revision, state, at: Instant::now() });
            }
        }

        for (v, status, data_pool) in volumes {
            if !ctl.is_leader() {
                return Ok(());
            }
            if self.memory.volumes.get(&v.name).is_some_and(|d| d.still_good(&status)) {
                continue;
            }
            let outcome = match self.memory.pools.get(&v.pool) {
                // Its profile has not looked at the pool yet (it is next pass's work).
                None => continue,
                Some(Err(e)) => Err(e.clone()),
                Some(Ok(())) => {
                    let (pool, image, size, was_ready) =
                        (v.pool.clone(), v.image.clone(), v.size_bytes, status.was_ready);
                    blocking(&cluster, move |c| ensure_image(c, &pool, &image, size, data_pool, was_ready)).await?
                }
            };
            let (state, message) = match outcome {
                Ok(m) => (StorageState::Ready, m),
                Err(m) => (StorageState::Failed, m),
            };
            if self.record(ctl, StorageSubject::Volume(v.name.clone()), &status, state, message).await? {
                self.memory
                    .volumes
                    .insert(v.name, Done { spec_revision: status.spec_revision, state, at: Instant::now() });
            }
        }
        Ok(())
    }

    /// Fences nodes silent for `fence_after` and lifts the fence of nodes an
    /// operator brought back (see [`crate::fencing`]).
    async fn fence(&mut self, ctl: &Controller, cluster: &Cluster) -> Result<(), NodeError> {
        let term = self.term;
        let (to_fence, back, all) = {
            let st = ctl.shared.read();
            let c = &st.cluster;
            let mut to_fence = Vec::new();
            let mut back = Vec::new();
            for n in c.nodes() {
                match n.state {
                    NodeState::Unreachable if ctl.silence(&n.id, term) >= ctl.timing.fence_after => {
                        to_fence.push((n.clone(), fencing::node_images(c, &n.id)));
                    }
                    NodeState::Fenced => {
                        self.memory.fenced.insert(n.id.clone());
                    }
                    NodeState::Ready | NodeState::Cordoned => back.push(n.clone()),
                    NodeState::Unreachable => {}
                }
            }
            (to_fence, back, c.nodes().cloned().collect::<Vec<Node>>())
        };
        // Lift the entries of nodes that are back: at once for one seen
        // Fenced by this leader, else once a minute (a fence by an earlier
        // leader, or one made before a crash).
        let recheck_all = self.memory.unfence_checked.is_none_or(|t| t.elapsed() >= RECHECK_CAPS);
        let lift: Vec<Node> = back.into_iter().filter(|n| recheck_all || self.memory.fenced.contains(&n.id)).collect();
        if recheck_all {
            self.memory.unfence_checked = Some(Instant::now());
        }
        if to_fence.is_empty() && lift.is_empty() {
            return Ok(());
        }
        let own = match blocking(cluster, |c| c.client_addrs()).await? {
            Ok(a) => fencing::client_ips(&a),
            Err(e) => {
                warn!("storage: own Ceph address unknown, no fencing this pass: {e}");
                return Ok(());
            }
        };
        for (node, images) in to_fence {
            if !ctl.is_leader() {
                return Ok(());
            }
            let ip = match fencing::fence_ip(&node, all.iter(), &own) {
                Ok(ip) => ip,
                Err(why) => {
                    if self.memory.fence_refused.get(&node.id) != Some(&why) {
                        warn!(node = %node.id, "cannot fence: {why}; it stays Unreachable and its VMs stay there");
                        self.memory.fence_refused.insert(node.id.clone(), why);
                    }
                    continue;
                }
            };
            warn!(node = %node.id, "fencing: silent for more than {:?}; blocklisting {ip} in Ceph", ctl.timing.fence_after);
            let done = blocking(cluster, move |c| fencing::fence_host(c, ip, &images)).await?;
            match done {
                Ok(reason) => {
                    info!(node = %node.id, "{reason}");
                    let cmd = Command::SetNodeState { id: node.id.clone(), state: NodeState::Fenced, reason };
                    match ctl.write(cmd).await {
                        Ok(_) => {
                            self.memory.fenced.insert(node.id.clone());
                        }
                        // Heartbeats came back meanwhile (it is Ready again): the
                        // entry is lifted once it is seen back.
                        Err(NodeError::Command(e)) => {
                            warn!(node = %node.id, "fenced in Ceph but not marked Fenced: {e}");
                            self.memory.fenced.insert(node.id.clone());
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => warn!(node = %node.id, "fencing failed (retried next pass): {e}"),
            }
        }
        let mut hosts: Vec<(String, std::net::IpAddr)> = Vec::new();
        for n in lift {
            self.memory.fenced.remove(&n.id);
            if let Ok(ip) = fencing::fence_ip(&n, all.iter(), &own) {
                hosts.push((n.id, ip));
            }
        }
        if hosts.is_empty() {
            return Ok(());
        }
        let ips: Vec<std::net::IpAddr> = hosts.iter().map(|(_, ip)| *ip).collect();
        let lifted = match blocking(cluster, move |c| fencing::unfence_hosts(c, &ips)).await? {
            Ok(l) => l,
            Err(e) => {
                warn!("cannot read Ceph's blocklist to lift fences (retried): {e}");
                self.memory.fenced.extend(hosts.into_iter().map(|(id, _)| id));
                return Ok(());
            }
        };
        for (id, ip) in hosts {
            match lifted.iter().find(|(l, _)| *l == ip).map(|(_, r)| r) {
                Some(Ok(())) => {
                    info!(node = %id, "fence lifted: {} removed from Ceph's blocklist", fencing::host_entry(ip))
                }
                Some(Err(e)) => {
                    warn!(node = %id, "cannot lift the fence (retried): {e}");
                    self.memory.fenced.insert(id);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Brings the VM client's caps to the pools (see the module docs).
    /// `None` without `vm_client`; else whether its caps are as they should be.
    async fn vm_client_caps(
        &mut self,
        cluster: &Cluster,
        pools: &BTreeSet<String>,
    ) -> Result<Option<Result<(), String>>, NodeError> {
        let Some(id) = self.cfg.vm_client.clone() else { return Ok(None) };
        let want = vm_caps(pools);
        let last = self.memory.vm_caps.as_ref();
        if let Some(d) = last {
            let wait = if d.outcome.is_ok() { RECHECK_CAPS } else { RETRY_FAILED };
            if d.want == want && d.at.elapsed() < wait {
                return Ok(Some(d.outcome.clone()));
            }
        }
        let last_outcome = last.map(|d| d.outcome.clone());
        let w = want.clone();
        let who = id.clone();
        let (outcome, changed) = match blocking(cluster, move |c| sync_caps(c, &who, &w)).await? {
            Ok(changed) => (Ok(()), changed),
            Err(e) => (Err(clip(e)), false),
        };
        match &outcome {
            Ok(()) if changed => {
                let osd = want.get("osd").map(String::as_str).unwrap_or("(none: no pools)");
                info!("storage: client.{id} caps set for the VMs' pools: osd '{osd}'");
            }
            Ok(()) => {}
            Err(e) if last_outcome.as_ref() != Some(&outcome) => warn!("storage: VM client: {e}"),
            Err(_) => {}
        }
        if last_outcome.is_some_and(|o| o != outcome) {
            // Profiles carry this outcome: look at them all again.
            self.memory.profiles.clear();
        }
        self.memory.vm_caps = Some(CapsDone { want, outcome: outcome.clone(), at: Instant::now() });
        Ok(Some(outcome))
    }

    /// Commits an outcome unless the recorded status already says it.
    /// Returns false if the record changed meanwhile (the next pass redoes it).
    async fn record(
        &self,
        ctl: &Controller,
        subject: StorageSubject,
        status: &StorageStatus,
        state: StorageState,
        message: String,
    ) -> Result<bool, NodeError> {
        let message = clip(message);
        if status.state == state && status.message == message {
            return Ok(true);
        }
        match state {
            StorageState::Failed => warn!("storage: {subject} failed: {message}"),
            _ => info!("storage: {subject} {state}: {message}"),
        }
        let cmd = Command::SetStorageStatus { subject, spec_revision: status.spec_revision, state, message };
        match ctl.write(cmd).await {
            Ok(_) => Ok(true),
            Err(NodeError::Command(e)) => {
                info!("storage: outcome not recorded: {e}");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

// ---- what runs on the blocking pool ----

fn remove_image(c: &Cluster, pool: &str, image: &str) -> Result<(), CephError> {
    let gone = |e: &CephError| e.code() == Some(ENOENT);
    let io = match c.ioctx(pool) {
        Ok(io) => io,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    match rbd::remove(&io, image) {
        Err(e) if !gone(&e) => Err(e),
        _ => Ok(()),
    }
}

/// The VM client's caps for these pools: `profile rbd` on the monitors,
/// and on the OSDs and managers for each pool; no osd/mgr caps at all
/// without pools (`profile rbd` with no pool would mean every pool).
fn vm_caps(pools: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut caps = BTreeMap::from([("mon".to_string(), "profile rbd".to_string())]);
    if !pools.is_empty() {
        let each: Vec<String> = pools.iter().map(|p| format!("profile rbd pool={p}")).collect();
        caps.insert("osd".into(), each.join(", "));
        caps.insert("mgr".into(), each.join(", "));
    }
    caps
}

/// Sets `client.<id>`'s caps to `want` if Ceph has others. Returns whether
/// it changed them; a client that does not exist is an error (not created).
fn sync_caps(c: &Cluster, id: &str, want: &BTreeMap<String, String>) -> Result<bool, String> {
    match c.client_caps(id) {
        Ok(None) => Err(format!(
            "cephx client client.{id} (ceph.vm_client) does not exist; create it (ceph auth get-or-create client.{id}) and the controller sets its caps"
        )),
        Ok(Some(have)) if have == *want => Ok(false),
        Ok(Some(_)) => c.set_client_caps(id, want).map(|()| true).map_err(|e| format!("client.{id} caps: {e}")),
        Err(e) => Err(format!("client.{id}: {e}")),
    }
}

/// Every pool by name, with what `osd pool ls detail` says of it.
fn pool_details(c: &Cluster) -> Result<BTreeMap<String, Value>, CephError> {
    let pools: Vec<Value> = c.mon_json(&json!({"prefix": "osd pool ls", "detail": "detail", "format": "json"}))?;
    Ok(pools.into_iter().filter_map(|p| Some((p.get("pool_name")?.as_str()?.to_string(), p))).collect())
}

/// The profile's erasure-code profile, its volumes' pools and its OSD
/// tunables. Returns the profile's outcome and each pool's.
#[allow(clippy::type_complexity)]
fn ensure_profile(
    c: &Cluster,
    p: &StorageProfile,
    pools: &[String],
    pg_num: Option<u32>,
) -> (Result<String, String>, Vec<(String, Result<(), String>)>) {
    let all_failed = |msg: String| {
        let each = pools.iter().map(|pool| (pool.clone(), Err(msg.clone()))).collect();
        (Err(msg), each)
    };
    let mut done = Vec::new();
    if let Some(ec) = p.erasure_code_profile() {
        if let Err(e) = c.create_ec_profile(&ec) {
            return all_failed(format!("erasure-code profile {}: {e}", ec.name));
        }
        done.push(format!("erasure-code profile {}", ec.name));
    }
    let details = match pool_details(c) {
        Ok(d) => d,
        Err(e) => return all_failed(e.to_string()),
    };
    let mut first_error = None;
    let mut results = Vec::new();
    let mut names = Vec::new();
    for pool in pools {
        let r = p.pools(pool).into_iter().try_for_each(|spec| {
            names.push(spec.name.clone());
            let spec = PoolSpec { pg_num, ..spec };
            ensure_pool(c, &spec, details.get(&spec.name))
        });
        if let Err(e) = &r {
            first_error.get_or_insert_with(|| e.clone());
        }
        results.push((pool.clone(), r));
    }
    if names.is_empty() {
        done.push("no pools yet (no volumes)".into());
    } else {
        done.push(format!("pools {}", names.join(", ")));
    }
    if !p.osd_tunables.is_empty() {
        match c.apply_osd_tunables(&p.tunables()) {
            Ok(()) => {
                let t: Vec<String> = p.osd_tunables.iter().map(|(k, v)| format!("{k}={v}")).collect();
                done.push(format!("OSD tunables {}", t.join(", ")));
            }
            Err(e) => {
                first_error.get_or_insert_with(|| format!("OSD tunables: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => (Err(e), results),
        None => (Ok(done.join("; ")), results),
    }
}

/// Creates the pool, or brings an existing one of the right type to the spec.
fn ensure_pool(c: &Cluster, spec: &PoolSpec, existing: Option<&Value>) -> Result<(), String> {
    let name = &spec.name;
    let ceph = |e: CephError| format!("pool {name}: {e}");
    let Some(info) = existing else {
        return c.create_pool(spec).map_err(ceph);
    };
    // `type` in the OSD map: 1 replicated, 3 erasure.
    let ty = info.get("type").and_then(Value::as_i64);
    let ec_profile = info.get("erasure_code_profile").and_then(Value::as_str).unwrap_or_default();
    match &spec.kind {
        PoolKind::Replicated { size, min_size } => {
            if ty != Some(1) {
                return Err(format!(
                    "pool {name} exists and is not replicated (erasure-code profile {ec_profile:?}); this profile needs it replicated, and Basalt does not change a pool's type"
                ));
            }
            let num = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or(0);
            let (cur_size, cur_min) = (num("size"), num("min_size"));
            let set = |var: &str, v: u32| c.set_pool(name, var, &v.to_string()).map_err(ceph);
            // Keep min_size <= size at every step.
            if u64::from(*size) >= cur_size {
                if u64::from(*size) != cur_size {
                    set("size", *size)?;
                }
                if u64::from(*min_size) != cur_min {
                    set("min_size", *min_size)?;
                }
            } else {
                if u64::from(*min_size) != cur_min {
                    set("min_size", *min_size)?;
                }
                set("size", *size)?;
            }
        }
        PoolKind::Erasure { profile, allow_ec_overwrites } => {
            if ty != Some(3) {
                return Err(format!(
                    "pool {name} exists and is replicated; it is needed as the erasure-coded data pool (erasure-code profile {profile}), and Basalt does not change a pool's type"
                ));
            }
            if ec_profile != profile {
                return Err(format!(
                    "pool {name} exists with erasure-code profile {ec_profile:?}, not {profile:?}; a pool's erasure-code profile cannot change"
                ));
            }
            let flags = info.get("flags_names").and_then(Value::as_str).unwrap_or_default();
            if *allow_ec_overwrites && !flags.split(',').any(|f| f == "ec_overwrites") {
                c.set_pool(name, "allow_ec_overwrites", "true").map_err(ceph)?;
            }
        }
    }
    if let Some(app) = &spec.application {
        if info.pointer(&format!("/application_metadata/{app}")).is_none() {
            // Ceph refuses a second application on a pool unless forced;
            // Basalt never forces, so that refusal is reported as is.
            c.mon_command(&json!({"prefix": "osd pool application enable", "pool": name, "app": app})).map_err(ceph)?;
        }
    }
    Ok(())
}

/// The volume's image with at least its size. Returns what Ceph now holds.
fn ensure_image(
    c: &Cluster,
    pool: &str,
    image: &str,
    size: u64,
    data_pool: Option<String>,
    was_ready: bool,
) -> Result<String, String> {
    let err = |e: CephError| e.to_string();
    let io = c.ioctx(pool).map_err(err)?;
    let have = match Image::open(&io, image) {
        Ok(img) => {
            let cur = img.size().map_err(err)?;
            if cur < size {
                // Grow only: re-read just before, so nothing smaller than
                // what is there is ever asked for.
                img.resize(size).map_err(err)?;
                img.size().map_err(err)?
            } else {
                cur
            }
        }
        Err(e) if e.code() == Some(ENOENT) => {
            if was_ready {
                return Err(format!(
                    "image {pool}/{image} is gone from Ceph although it was created; not recreating it empty (restore it, or delete the volume)"
                ));
            }
            let opts = ImageOptions {
                features: Some(features::VM_DEFAULT),
                data_pool: data_pool.clone(),
                ..Default::default()
            };
            rbd::create(&io, image, size, &opts).map_err(err)?;
            size
        }
        Err(e) => return Err(err(e)),
    };
    Ok(match data_pool {
        Some(dp) => format!("image {pool}/{image}, {have} bytes, data in pool {dp}"),
        None => format!("image {pool}/{image}, {have} bytes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("short".into()), "short");
        let long = "é".repeat(MAX_STATUS_MESSAGE);
        let c = clip(long);
        assert!(c.len() <= MAX_STATUS_MESSAGE && c.ends_with("..."), "{}", c.len());
    }

    #[test]
    fn vm_caps_name_every_pool_and_nothing_else() {
        let pools: BTreeSet<String> = ["vms", "vms-data", "rbd"].into_iter().map(String::from).collect();
        let caps = vm_caps(&pools);
        let each = "profile rbd pool=rbd, profile rbd pool=vms, profile rbd pool=vms-data";
        let want: BTreeMap<String, String> = [("mgr", each), ("mon", "profile rbd"), ("osd", each)]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert_eq!(caps, want);
        // No pools: no OSD access at all, never an unrestricted `profile rbd`.
        let none = vm_caps(&BTreeSet::new());
        assert_eq!(none.into_iter().collect::<Vec<_>>(), vec![("mon".to_string(), "profile rbd".to_string())]);
    }

    #[test]
    fn a_remembered_outcome_expires() {
        let status =
            |state, spec_revision| StorageStatus { state, message: String::new(), spec_revision, was_ready: false };
        let d = Done { spec_revision: 7, state: StorageState::Ready, at: Instant::now() };
        assert!(d.still_good(&status(StorageState::Ready, 7)));
        assert!(!d.still_good(&status(StorageState::Ready, 8)), "the record changed");
        assert!(!d.still_good(&status(StorageState::Pending, 7)), "the recorded status is not ours");
        let old = Done { spec_revision: 7, state: StorageState::Failed, at: Instant::now() - RETRY_FAILED };
        assert!(!old.still_good(&status(StorageState::Failed, 7)), "failures are retried");
    }
}
