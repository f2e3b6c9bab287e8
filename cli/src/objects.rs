//! `basaltctl node|vm|volume|profile|events`: the cluster's objects through
//! `basalt.v1.ClusterService`. Tables for people, `--output json` for scripts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::cluster::{connect, runtime, CliError};
use crate::storage_bench::parse_size;

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List nodes: state, capacity, what their VMs reserve, heartbeat age.
    List,
    /// One node in detail.
    Show { id: String },
    /// Take no new VMs on this node (its VMs keep running). On a Fenced node:
    /// bring it back as Cordoned and lift its Ceph blocklist entry; only after
    /// the host has been rebooted or all its VMMs stopped.
    Cordon { id: String },
    /// Let the node take VMs again.
    Uncordon { id: String },
    /// Forget a node that has no VMs.
    Remove { id: String },
    /// Cordon the node, then live-migrate its VMs away, a few at a time;
    /// names each VM that could not move, with why. Exit 0 only if it ends empty.
    Drain(crate::migration::DrainArgs),
}

// Parsed once per run: the size of the Create variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM (started unless --stopped; the scheduler picks its node).
    Create(VmCreate),
    /// List VMs.
    List {
        /// Only VMs on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only VMs with this label, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    /// One VM in detail, with why it is pending if it is.
    Show { name: String },
    /// Set the desired power to running.
    Start(PowerArgs),
    /// Set the desired power to stopped.
    Stop(PowerArgs),
    /// Stop, wait until the VM is reported stopped, then start it.
    Restart(PowerArgs),
    /// Delete a VM (and with --delete-disks the volumes only it uses).
    Delete {
        name: String,
        #[arg(long)]
        delete_disks: bool,
    },
    /// Print the VM's serial console (from its host's agent); -f follows it.
    Console {
        name: String,
        /// Keep printing what the guest writes until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Start this many bytes before the end (0: from the beginning).
        #[arg(long, default_value_t = 0)]
        tail: u64,
    },
    /// The VMM's KVM exit counters (from its host's agent).
    Stats { name: String },
    /// The VM's vGICv3 state: distributor, redistributors, CPU interfaces.
    VgicState { name: String },
    /// Live-migrate a running VM to another node (its guest keeps running).
    Migrate(crate::migration::MigrateArgs),
}

#[derive(Args, Debug)]
pub struct PowerArgs {
    name: String,
    /// Wait until the node reports the VM in that state.
    #[arg(long)]
    wait: bool,
    /// How long --wait (and restart) waits, seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(Args, Debug)]
pub struct VmCreate {
    name: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory, MiB (or with a suffix: 512m, 2g).
    #[arg(long, default_value = "512m", value_parser = parse_mib)]
    memory: u64,
    /// Kernel Image path on the hosts.
    #[arg(long, required_unless_present = "boot_volume", conflicts_with = "boot_volume")]
    kernel: Option<String>,
    #[arg(long, requires = "kernel")]
    initrd: Option<String>,
    #[arg(long, default_value = "", requires = "kernel")]
    cmdline: String,
    /// Boot from this volume instead of a kernel.
    #[arg(long)]
    boot_volume: Option<String>,
    /// Attach a volume, VOLUME or VOLUME:ro (repeatable).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Create a new volume and attach it, VOLUME:SIZE:PROFILE[:POOL] (pool
    /// default rbd; the image is named after the volume). Repeatable. If the
    /// VM cannot be created, the volumes created for it are deleted again.
    #[arg(long = "new-disk", value_parser = parse_new_disk)]
    new_disks: Vec<NewDisk>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// No two VMs of this group on one node.
    #[arg(long)]
    anti_affinity: Option<String>,
    /// Only on nodes with this label, KEY=VALUE (repeatable).
    #[arg(long = "require-label", value_parser = parse_kv)]
    require_labels: Vec<(String, String)>,
    /// Restart it elsewhere if its node fails (once the controllers have fenced
    /// that node out of Ceph; needs their [ceph] section).
    #[arg(long)]
    ha: bool,
    /// A NIC on a network, NETWORK or NETWORK:IP (repeatable, at most 8): the
    /// controllers give it a MAC and, without IP, a free address.
    #[arg(long = "nic", value_parser = parse_nic)]
    nics: Vec<pb::NicSpec>,
    /// Create it stopped.
    #[arg(long)]
    stopped: bool,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Record a volume (an RBD image in a pool of a storage profile).
    Create {
        name: String,
        /// Size (k, m, g, t suffixes: 10g).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        profile: String,
        #[arg(long, default_value = "rbd")]
        pool: String,
        /// RBD image name (default: the volume's name).
        #[arg(long)]
        image: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    /// Grow a volume (volumes never shrink).
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    /// Create a storage profile: replicated (--size, --min-size) or erasure-coded (--k, --m).
    Create(ProfileCreate),
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct ProfileCreate {
    name: String,
    /// Replicas (replicated profile).
    #[arg(long, conflicts_with_all = ["k", "m"], required_unless_present = "k")]
    size: Option<u32>,
    /// Replicas needed for I/O (default size-1, at least 1).
    #[arg(long, requires = "size")]
    min_size: Option<u32>,
    /// Data chunks (erasure-coded profile).
    #[arg(long, requires = "m")]
    k: Option<u32>,
    /// Coding chunks.
    #[arg(long, requires = "k")]
    m: Option<u32>,
    #[arg(long, default_value = "jerasure", requires = "k")]
    plugin: String,
    #[arg(long, requires = "k")]
    technique: Option<String>,
    #[arg(long, default_value = "host")]
    failure_domain: String,
    /// EC stripe unit (bytes, k/m suffixes).
    #[arg(long, value_parser = parse_size, requires = "k")]
    stripe_unit: Option<u64>,
    /// OSD tunable NAME=VALUE (repeatable), e.g. osd_max_backfills=2.
    #[arg(long = "osd", value_parser = parse_tunable)]
    tunables: Vec<(String, u64)>,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only events about this subject (vm/NAME, node/ID, volume/NAME, profile/NAME).
    #[arg(long)]
    subject: Option<String>,
    /// Only this kind (VmCreated, NodeStateChanged, VmUnschedulable, ...).
    #[arg(long)]
    kind: Option<String>,
    /// Only events after this revision.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// At most this many (0: all kept).
    #[arg(long, default_value_t = 0)]
    limit: u32,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_tunable(s: &str) -> Result<(String, u64), String> {
    let (k, v) = parse_kv(s)?;
    let n = parse_size(&v).map_err(|e| format!("{k}: {e}"))?;
    Ok((k, n))
}

/// MiB, from a plain number (MiB) or a size with a suffix.
fn parse_mib(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bytes = parse_size(s)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{s:?} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

fn state_name(s: i32) -> &'static str {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Ready) => "Ready",
        Ok(pb::NodeState::Cordoned) => "Cordoned",
        Ok(pb::NodeState::Unreachable) => "Unreachable",
        Ok(pb::NodeState::Fenced) => "Fenced",
        _ => "?",
    }
}

fn phase_name(p: i32) -> &'static str {
    match pb::VmPhase::try_from(p) {
        Ok(pb::VmPhase::Starting) => "Starting",
        Ok(pb::VmPhase::Running) => "Running",
        Ok(pb::VmPhase::Paused) => "Paused",
        Ok(pb::VmPhase::Stopped) => "Stopped",
        Ok(pb::VmPhase::Failed) => "Failed",
        _ => "Unknown",
    }
}

fn power_name(p: i32) -> &'static str {
    match pb::Power::try_from(p) {
        Ok(pb::Power::Running) => "running",
        Ok(pb::Power::Stopped) => "stopped",
        _ => "?",
    }
}

fn labels_text(m: &HashMap<String, String>) -> String {
    let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

fn node_json(n: &pb::Node) -> Value {
    let cap = n.capacity.unwrap_or_default();
    let used = n.used.unwrap_or_default();
    json!({
        "id": n.id, "address": n.address, "arch": n.arch, "state": state_name(n.state),
        "capacity": {"vcpus": cap.vcpus, "memory_mib": cap.memory_mib},
        "used": {"vcpus": used.vcpus, "memory_mib": used.memory_mib},
        "labels": n.labels, "vms": n.vms, "cpu_features": n.cpu_features,
        "last_heartbeat_age_ms": (n.last_heartbeat_age_ms >= 0).then_some(n.last_heartbeat_age_ms),
        "nic_profile": (!n.nic_profile.is_empty()).then_some(&n.nic_profile),
        "nics": n.nics.iter().map(|h| json!({
            "name": h.name, "driver": h.driver,
            "speed_mbps": (h.speed_mbps >= 0).then_some(h.speed_mbps),
            "rx_queues": h.rx_queues, "tx_queues": h.tx_queues,
            "timestamping": h.timestamping,
            "ptp_clock": (h.ptp_clock >= 0).then(|| format!("/dev/ptp{}", h.ptp_clock)),
            "tuned": h.settings.iter().map(|s| if s.error.is_empty() {
                json!({"knob": s.knob, "cpus": s.cpus})
            } else {
                json!({"knob": s.knob, "cpus": s.cpus, "error": s.error})
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn vm_json(v: &pb::Vm) -> Value {
    let s = v.spec.clone().unwrap_or_default();
    let boot = match &s.boot {
        Some(pb::vm_spec::Boot::Kernel(k)) => json!({"kernel": k.kernel, "initrd": k.initrd, "cmdline": k.cmdline}),
        Some(pb::vm_spec::Boot::BootVolume(b)) => json!({"volume": b}),
        None => Value::Null,
    };
    let o = v.observed.clone().unwrap_or_default();
    json!({
        "name": v.name, "vcpus": s.vcpus, "memory_mib": s.memory_mib, "boot": boot,
        "disks": s.disks.iter().map(|d| json!({"volume": d.volume, "read_only": d.read_only})).collect::<Vec<_>>(),
        "labels": s.labels, "anti_affinity_group": s.anti_affinity_group, "required_labels": s.required_labels,
        "ha": s.ha, "desired_power": power_name(v.desired_power), "node": v.placement,
        "nics": v.nics.iter().map(|n| json!({
            "network": n.network, "mac": n.mac, "ip": n.ip, "prefix": n.prefix,
            "gateway": (!n.gateway.is_empty()).then_some(&n.gateway),
        })).collect::<Vec<_>>(),
        "observed": {"phase": phase_name(o.phase), "node": o.node, "message": o.message, "at_ms": o.at_ms},
        "generation": v.generation, "unschedulable_reason": v.unschedulable_reason,
        "migration": v.migration.as_ref().map(crate::migration::migration_json),
    })
}

/// READY, PENDING, FAILED (what Ceph holds for a volume or profile).
fn storage_state_name(s: i32) -> &'static str {
    match pb::StorageState::try_from(s) {
        Ok(pb::StorageState::Pending) => "PENDING",
        Ok(pb::StorageState::Ready) => "READY",
        Ok(pb::StorageState::Failed) => "FAILED",
        Ok(pb::StorageState::Unspecified) | Err(_) => "-",
    }
}

/// The state, and for a failure why (the table's last column).
fn storage_state_text(state: i32, message: &str) -> String {
    match pb::StorageState::try_from(state) {
        Ok(pb::StorageState::Failed) if !message.is_empty() => format!("FAILED: {message}"),
        _ => storage_state_name(state).to_string(),
    }
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({"name": v.name, "pool": v.pool, "image": v.image, "size_bytes": v.size_bytes, "profile": v.profile,
        "state": storage_state_name(v.state), "status_message": v.status_message})
}

fn profile_json(p: &pb::StorageProfile) -> Value {
    let kind = match &p.kind {
        Some(pb::storage_profile::Kind::Replicated(r)) => {
            json!({"replicated": {"size": r.size, "min_size": r.min_size}})
        }
        Some(pb::storage_profile::Kind::ErasureCoded(e)) => json!({"erasure_coded": {
            "k": e.k, "m": e.m, "plugin": e.plugin, "technique": e.technique,
            "crush_failure_domain": e.crush_failure_domain, "stripe_unit": e.stripe_unit}}),
        None => Value::Null,
    };
    json!({"name": p.name, "kind": kind, "osd_tunables": p.osd_tunables,
        "state": storage_state_name(p.state), "status_message": p.status_message})
}

fn profile_kind_text(p: &pb::StorageProfile) -> String {
    match &p.kind {
        Some(pb::storage_profile::Kind::Replicated(r)) => format!("replicated size {} min {}", r.size, r.min_size),
        Some(pb::storage_profile::Kind::ErasureCoded(e)) => {
            format!("ec k={} m={} {} {}", e.k, e.m, e.plugin, e.crush_failure_domain)
        }
        None => "?".into(),
    }
}

pub(crate) fn written(w: &pb::WriteResult, what: &str, as_json: bool) -> String {
    if as_json {
        return json!({"revision": w.revision, "generation": w.generation, "deleted_volumes": w.deleted_volumes})
            .to_string();
    }
    let mut s = format!("{what} (revision {}", w.revision);
    if w.generation != 0 {
        s.push_str(&format!(", generation {}", w.generation));
    }
    s.push(')');
    if !w.deleted_volumes.is_empty() {
        s.push_str(&format!("; deleted volumes {}", w.deleted_volumes.join(", ")));
    }
    s
}

fn get(name: &str) -> pb::GetRequest {
    pb::GetRequest { name: name.to_string(), allow_stale: false }
}

fn nref(name: &str) -> pb::NameRef {
    pb::NameRef { name: name.to_string() }
}

pub fn node(endpoints: &[String], cmd: &NodeCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        Ok(match cmd {
            NodeCmd::List => {
                let r = c.list_nodes(pb::ListRequest::default()).await.map_err(CliError::Refused)?.into_inner();
                if as_json {
                    Value::Array(r.nodes.iter().map(node_json).collect()).to_string()
                } else {
                    let mut out = format!(
                        "{:<16} {:<12} {:<22} {:>11} {:>17} {:>5} {:>9}\n",
                        "NODE", "STATE", "ADDRESS", "VCPUS", "MEMORY MiB", "VMS", "HEARTBEAT"
                    );
                    for n in &r.nodes {
                        let (cap, used) = (n.capacity.unwrap_or_default(), n.used.unwrap_or_default());
                        let hb = if n.last_heartbeat_age_ms < 0 {
                            "-".to_string()
                        } else {
                            format!("{:.1}s", n.last_heartbeat_age_ms as f64 / 1000.0)
                        };
                        out.push_str(&format!(
                            "{:<16} {:<12} {:<22} {:>11} {:>17} {:>5} {:>9}\n",
                            n.id,
                            state_name(n.state),
                            n.address,
                            format!("{}/{}", used.vcpus, cap.vcpus),
                            format!("{}/{}", used.memory_mib, cap.memory_mib),
                            n.vms.len(),
                            hb
                        ));
                    }
                    out
                }
            }
            NodeCmd::Show { id } => {
                let n = c.get_node(get(id)).await.map_err(CliError::Refused)?.into_inner();
                let mut j = node_json(&n);
                let req = pb::ListMigrationsRequest { node: id.clone(), active_only: true, ..Default::default() };
                let m = c.list_migrations(req).await.map_err(CliError::Refused)?.into_inner().migrations;
                j["migrations"] = m.iter().map(crate::migration::migration_json).collect();
                if as_json {
                    j.to_string()
                } else {
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                }
            }
            NodeCmd::Cordon { id } => written(
                &c.cordon_node(nref(id)).await.map_err(CliError::Refused)?.into_inner(),
                &format!("node {id} cordoned"),
                as_json,
            ),
            NodeCmd::Uncordon { id } => written(
                &c.uncordon_node(nref(id)).await.map_err(CliError::Refused)?.into_inner(),
                &format!("node {id} uncordoned"),
                as_json,
            ),
            NodeCmd::Remove { id } => written(
                &c.remove_node(nref(id)).await.map_err(CliError::Refused)?.into_inner(),
                &format!("node {id} removed"),
                as_json,
            ),
            NodeCmd::Drain(_) => unreachable!("main runs node drain itself"),
        })
    })
}

#[derive(Debug, Clone)]
pub struct NewDisk {
    volume: String,
    size: u64,
    profile: String,
    pool: String,
}

fn parse_new_disk(s: &str) -> Result<NewDisk, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (volume, size, profile, pool) = match parts.as_slice() {
        [v, z, p] => (*v, *z, *p, "rbd"),
        [v, z, p, pool] => (*v, *z, *p, *pool),
        _ => return Err(format!("{s:?}: want VOLUME:SIZE:PROFILE[:POOL], e.g. web-root:10g:fast")),
    };
    if volume.is_empty() || profile.is_empty() || pool.is_empty() {
        return Err(format!("{s:?}: VOLUME, PROFILE and POOL must not be empty"));
    }
    let size = parse_size(size)?;
    Ok(NewDisk { volume: volume.into(), size, profile: profile.into(), pool: pool.into() })
}

/// `vm create --new-disk`: the volumes first, then the VM; on a refusal of
/// the VM the volumes made for it are deleted, so a failed create changes nothing.
async fn create_vm_with_new_disks(
    c: &mut ClusterServiceClient<Channel>,
    a: &VmCreate,
    req: pb::CreateVmRequest,
) -> Result<pb::WriteResult, CliError> {
    let mut made: Vec<String> = Vec::new();
    let undo = |made: Vec<String>, mut c: ClusterServiceClient<Channel>| async move {
        for v in made {
            let _ = c.delete_volume(nref(&v)).await;
        }
    };
    for d in &a.new_disks {
        let v = pb::Volume {
            name: d.volume.clone(),
            pool: d.pool.clone(),
            image: d.volume.clone(),
            size_bytes: d.size,
            profile: d.profile.clone(),
            ..Default::default()
        };
        if let Err(e) = c.create_volume(v).await {
            undo(made, c.clone()).await;
            return Err(CliError::Refused(e));
        }
        made.push(d.volume.clone());
    }
    match c.create_vm(req).await {
        Ok(w) => Ok(w.into_inner()),
        Err(e) => {
            undo(made, c.clone()).await;
            Err(CliError::Refused(e))
        }
    }
}

fn vm_spec(a: &VmCreate) -> Result<pb::VmSpec, CliError> {
    let boot = match (&a.kernel, &a.boot_volume) {
        (Some(k), _) => pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: k.clone(),
            initrd: a.initrd.clone().unwrap_or_default(),
            cmdline: a.cmdline.clone(),
        }),
        (None, Some(v)) => pb::vm_spec::Boot::BootVolume(v.clone()),
        (None, None) => return Err(CliError::Usage("give --kernel or --boot-volume".into())),
    };
    let mut disks = Vec::new();
    for d in &a.disks {
        let (volume, read_only) = match d.split_once(':') {
            None => (d.clone(), false),
            Some((v, "ro")) => (v.to_string(), true),
            Some((v, "rw")) => (v.to_string(), false),
            Some((_, m)) => return Err(CliError::Usage(format!("--disk {d}: mode {m:?} is not ro or rw"))),
        };
        disks.push(pb::Disk { volume, read_only });
    }
    disks.extend(a.new_disks.iter().map(|d| pb::Disk { volume: d.volume.clone(), read_only: false }));
    Ok(pb::VmSpec {
        vcpus: a.vcpus,
        memory_mib: a.memory,
        boot: Some(boot),
        disks,
        labels: a.labels.iter().cloned().collect(),
        anti_affinity_group: a.anti_affinity.clone().unwrap_or_default(),
        required_labels: a.require_labels.iter().cloned().collect(),
        ha: a.ha,
        nics: a.nics.clone(),
    })
}

fn parse_nic(s: &str) -> Result<pb::NicSpec, String> {
    let (network, ip) = s.split_once(':').unwrap_or((s, ""));
    if network.is_empty() {
        return Err(format!("{s:?}: want NETWORK or NETWORK:IP, e.g. blue or blue:10.10.0.20"));
    }
    if !ip.is_empty() && ip.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(format!("{s:?}: {ip:?} is not an IPv4 address"));
    }
    Ok(pb::NicSpec { network: network.into(), ip: ip.into() })
}

/// Poll until the VM is observed in `phase`, with a spinner on a terminal.
async fn wait_phase(
    c: &mut pb::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>,
    name: &str,
    phase: pb::VmPhase,
    timeout: Duration,
) -> Result<(), CliError> {
    let bar = crate::cluster::spinner();
    let deadline = Instant::now() + timeout;
    loop {
        let vm = c.get_vm(get(name)).await.map_err(CliError::Refused)?.into_inner();
        let o = vm.observed.unwrap_or_default();
        if o.phase == phase as i32 {
            bar.finish_and_clear();
            return Ok(());
        }
        let why = if vm.unschedulable_reason.is_empty() { o.message.clone() } else { vm.unschedulable_reason.clone() };
        bar.set_message(format!(
            "vm {name}: {} ({why}), waiting for {}",
            phase_name(o.phase),
            phase_name(phase as i32)
        ));
        if Instant::now() > deadline {
            bar.finish_and_clear();
            return Err(CliError::Timeout(format!(
                "vm {name} is {} after {}s, not {} ({why})",
                phase_name(o.phase),
                timeout.as_secs(),
                phase_name(phase as i32)
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn vm(endpoints: &[String], cmd: &VmCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        let power = |name: &str, p: pb::Power| pb::SetVmPowerRequest {
            name: name.to_string(),
            power: p as i32,
            expected_generation: 0,
        };
        Ok(match cmd {
            VmCmd::Create(a) => {
                let spec = vm_spec(a)?;
                let desired = if a.stopped { pb::Power::Stopped } else { pb::Power::Running };
                let req = pb::CreateVmRequest { name: a.name.clone(), spec: Some(spec), desired_power: desired as i32 };
                let w = create_vm_with_new_disks(&mut c, a, req).await?;
                written(&w, &format!("vm {} created", a.name), as_json)
            }
            VmCmd::List { node, labels } => {
                let req = pb::ListRequest {
                    allow_stale: false,
                    label_selector: labels.iter().cloned().collect(),
                    node: node.clone().unwrap_or_default(),
                };
                let r = c.list_vms(req).await.map_err(CliError::Refused)?.into_inner();
                if as_json {
                    Value::Array(r.vms.iter().map(vm_json).collect()).to_string()
                } else {
                    let mut out = format!(
                        "{:<20} {:>5} {:>8} {:<8} {:<10} {:<14} {}\n",
                        "VM", "VCPUS", "MEM MiB", "DESIRED", "PHASE", "NODE", "LABELS"
                    );
                    for v in &r.vms {
                        let s = v.spec.clone().unwrap_or_default();
                        let o = v.observed.clone().unwrap_or_default();
                        let node = if v.placement.is_empty() { "(pending)".to_string() } else { v.placement.clone() };
                        out.push_str(&format!(
                            "{:<20} {:>5} {:>8} {:<8} {:<10} {:<14} {}\n",
                            v.name,
                            s.vcpus,
                            s.memory_mib,
                            power_name(v.desired_power),
                            phase_name(o.phase),
                            node,
                            labels_text(&s.labels)
                        ));
                    }
                    out
                }
            }
            VmCmd::Show { name } => {
                let v = c.get_vm(get(name)).await.map_err(CliError::Refused)?.into_inner();
                let j = vm_json(&v);
                if as_json {
                    j.to_string()
                } else {
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                }
            }
            VmCmd::Start(p) | VmCmd::Stop(p) => {
                let (target, phase, verb) = match cmd {
                    VmCmd::Start(_) => (pb::Power::Running, pb::VmPhase::Running, "started"),
                    _ => (pb::Power::Stopped, pb::VmPhase::Stopped, "stopped"),
                };
                let w = c.set_vm_power(power(&p.name, target)).await.map_err(CliError::Refused)?.into_inner();
                if p.wait {
                    wait_phase(&mut c, &p.name, phase, Duration::from_secs(p.timeout)).await?;
                }
                written(&w, &format!("vm {} {verb}", p.name), as_json)
            }
            VmCmd::Restart(p) => {
                c.set_vm_power(power(&p.name, pb::Power::Stopped)).await.map_err(CliError::Refused)?;
                wait_phase(&mut c, &p.name, pb::VmPhase::Stopped, Duration::from_secs(p.timeout)).await?;
                let w =
                    c.set_vm_power(power(&p.name, pb::Power::Running)).await.map_err(CliError::Refused)?.into_inner();
                if p.wait {
                    wait_phase(&mut c, &p.name, pb::VmPhase::Running, Duration::from_secs(p.timeout)).await?;
                }
                written(&w, &format!("vm {} restarted", p.name), as_json)
            }
            VmCmd::Console { name, follow, tail } => {
                crate::vm_host::console(&mut c, name, *tail, *follow).await?;
                String::new()
            }
            VmCmd::Stats { name } => {
                let v = crate::vm_host::control(&mut c, name, "counters").await?;
                if as_json {
                    v.to_string()
                } else {
                    crate::vm_host::counters_table(&v)
                }
            }
            VmCmd::VgicState { name } => {
                let v = crate::vm_host::control(&mut c, name, "vgic-state").await?;
                if as_json {
                    v.to_string()
                } else {
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                }
            }
            VmCmd::Migrate(_) => unreachable!("main runs vm migrate itself"),
            VmCmd::Delete { name, delete_disks } => {
                let w = c
                    .delete_vm(pb::DeleteVmRequest { name: name.clone(), delete_disks: *delete_disks })
                    .await
                    .map_err(CliError::Refused)?
                    .into_inner();
                written(&w, &format!("vm {name} deleted"), as_json)
            }
        })
    })
}

pub fn volume(endpoints: &[String], cmd: &VolumeCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        Ok(match cmd {
            VolumeCmd::Create { name, size, profile, pool, image } => {
                let v = pb::Volume {
                    name: name.clone(),
                    pool: pool.clone(),
                    image: image.clone().unwrap_or_else(|| name.clone()),
                    size_bytes: *size,
                    profile: profile.clone(),
                    ..Default::default()
                };
                written(
                    &c.create_volume(v).await.map_err(CliError::Refused)?.into_inner(),
                    &format!("volume {name} created"),
                    as_json,
                )
            }
            VolumeCmd::List => {
                let r = c.list_volumes(pb::ListRequest::default()).await.map_err(CliError::Refused)?.into_inner();
                if as_json {
                    Value::Array(r.volumes.iter().map(volume_json).collect()).to_string()
                } else {
                    let mut out = format!(
                        "{:<20} {:<12} {:<24} {:>12} {:<16} {}\n",
                        "VOLUME", "POOL", "IMAGE", "SIZE MiB", "PROFILE", "STATE"
                    );
                    for v in &r.volumes {
                        out.push_str(&format!(
                            "{:<20} {:<12} {:<24} {:>12} {:<16} {}\n",
                            v.name,
                            v.pool,
                            v.image,
                            v.size_bytes >> 20,
                            v.profile,
                            storage_state_text(v.state, &v.status_message)
                        ));
                    }
                    out
                }
            }
            VolumeCmd::Show { name } => {
                let v = c.get_volume(get(name)).await.map_err(CliError::Refused)?.into_inner();
                let j = volume_json(&v);
                if as_json {
                    j.to_string()
                } else {
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                }
            }
            VolumeCmd::Resize { name, size } => written(
                &c.resize_volume(pb::ResizeVolumeRequest { name: name.clone(), size_bytes: *size })
                    .await
                    .map_err(CliError::Refused)?
                    .into_inner(),
                &format!("volume {name} resized"),
                as_json,
            ),
            VolumeCmd::Delete { name } => written(
                &c.delete_volume(nref(name)).await.map_err(CliError::Refused)?.into_inner(),
                &format!("volume {name} deleted"),
                as_json,
            ),
        })
    })
}

pub fn profile(endpoints: &[String], cmd: &ProfileCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        Ok(match cmd {
            ProfileCmd::Create(a) => {
                let kind = match (a.size, a.k, a.m) {
                    (Some(size), _, _) => pb::storage_profile::Kind::Replicated(pb::ReplicatedProfile {
                        size,
                        min_size: a.min_size.unwrap_or_else(|| size.saturating_sub(1).max(1)),
                    }),
                    (None, Some(k), Some(m)) => pb::storage_profile::Kind::ErasureCoded(pb::ErasureCodedProfile {
                        k,
                        m,
                        plugin: a.plugin.clone(),
                        technique: a.technique.clone().unwrap_or_default(),
                        crush_failure_domain: a.failure_domain.clone(),
                        stripe_unit: a.stripe_unit.unwrap_or(0),
                    }),
                    _ => return Err(CliError::Usage("give --size (replicated) or --k and --m (erasure-coded)".into())),
                };
                let p = pb::StorageProfile {
                    name: a.name.clone(),
                    kind: Some(kind),
                    osd_tunables: a.tunables.iter().cloned().collect(),
                    ..Default::default()
                };
                written(
                    &c.create_profile(p).await.map_err(CliError::Refused)?.into_inner(),
                    &format!("profile {} created", a.name),
                    as_json,
                )
            }
            ProfileCmd::List => {
                let r = c.list_profiles(pb::ListRequest::default()).await.map_err(CliError::Refused)?.into_inner();
                if as_json {
                    Value::Array(r.profiles.iter().map(profile_json).collect()).to_string()
                } else {
                    let mut out = format!("{:<16} {:<36} {:<32} {}\n", "PROFILE", "KIND", "OSD TUNABLES", "STATE");
                    for p in &r.profiles {
                        let mut t: Vec<String> = p.osd_tunables.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        t.sort();
                        let t = if t.is_empty() { "-".to_string() } else { t.join(",") };
                        out.push_str(&format!(
                            "{:<16} {:<36} {:<32} {}\n",
                            p.name,
                            profile_kind_text(p),
                            t,
                            storage_state_text(p.state, &p.status_message)
                        ));
                    }
                    out
                }
            }
            ProfileCmd::Show { name } => {
                let p = c.get_profile(get(name)).await.map_err(CliError::Refused)?.into_inner();
                let j = profile_json(&p);
                if as_json {
                    j.to_string()
                } else {
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                }
            }
            ProfileCmd::Delete { name } => written(
                &c.delete_profile(nref(name)).await.map_err(CliError::Refused)?.into_inner(),
                &format!("profile {name} deleted"),
                as_json,
            ),
        })
    })
}

pub fn events(endpoints: &[String], a: &EventsArgs, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        let req = pb::ListEventsRequest {
            allow_stale: false,
            subject: a.subject.clone().unwrap_or_default(),
            kind: a.kind.clone().unwrap_or_default(),
            since_revision: a.since,
            limit: a.limit,
        };
        let r = c.list_events(req).await.map_err(CliError::Refused)?.into_inner();
        if as_json {
            let ev: Vec<Value> = r
                .events
                .iter()
                .map(|e| json!({"revision": e.revision, "time_ms": e.time_ms, "kind": e.kind, "subject": e.subject, "message": e.message}))
                .collect();
            return Ok(json!({"events": ev, "dropped": r.dropped}).to_string());
        }
        let mut out = format!("{:>8} {:<18} {:<20} {}\n", "REV", "KIND", "SUBJECT", "MESSAGE");
        for e in &r.events {
            out.push_str(&format!("{:>8} {:<18} {:<20} {}\n", e.revision, e.kind, e.subject, e.message));
        }
        if r.dropped > 0 {
            out.push_str(&format!("({} older events no longer kept)\n", r.dropped));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_bad_ones_say_why() {
        assert_eq!(parse_mib("512").unwrap(), 512);
        assert_eq!(parse_mib("2g").unwrap(), 2048);
        assert!(parse_mib("1k").unwrap_err().contains("MiB"));
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_kv("=x").is_err());
        assert!(parse_kv("novalue").is_err());
        assert_eq!(parse_tunable("osd_memory_target=4g").unwrap().1, 4 << 30);
        assert!(parse_tunable("osd_max_backfills=lots").is_err());
    }
}
