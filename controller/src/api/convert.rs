//! Between the wire types of `basalt.v1` and the cluster model. Proto3 has no
//! "absent" for scalars, so empty strings and zeros mean "not given" here, and
//! a missing required oneof is an INVALID_ARGUMENT naming the field.

use std::collections::BTreeMap;

use basalt_proto::v1 as pb;

use crate::error::CommandError;
use crate::model::{
    Boot, Capacity, Disk, Event, EventKind, Migration, MigrationPhase, MigrationReport, Network, NetworkRequest,
    HostNic, NicSetting, NicSpec, Node, NodeRegistration, NodeState, Power, ProfileKind, StorageProfile, StorageState, StorageStatus, Vm, VmPhase, VmSpec, Volume,
};
use crate::model::networks::Gateway;
use crate::scheduler::NodeView;

fn invalid(msg: impl Into<String>) -> CommandError {
    CommandError::InvalidArgument(msg.into())
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

pub fn node_state(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Ready => pb::NodeState::Ready,
        NodeState::Cordoned => pb::NodeState::Cordoned,
        NodeState::Unreachable => pb::NodeState::Unreachable,
        NodeState::Fenced => pb::NodeState::Fenced,
    }
}

fn capacity(c: Capacity) -> pb::Capacity {
    pb::Capacity { vcpus: c.vcpus, memory_mib: c.memory_mib }
}

pub fn node(n: &Node, view: Option<&NodeView>, vms: Vec<String>, heartbeat_age_ms: Option<u64>) -> pb::Node {
    pb::Node {
        id: n.id.clone(),
        address: n.address.clone(),
        arch: n.arch.clone(),
        capacity: Some(capacity(n.capacity)),
        labels: n.labels.clone().into_iter().collect(),
        state: node_state(n.state) as i32,
        used: view.map(|v| capacity(v.used)),
        vms,
        last_heartbeat_age_ms: heartbeat_age_ms.map(|a| a as i64).unwrap_or(-1),
        cpu_features: n.cpu_features.iter().cloned().collect(),
        nics: n
            .nics
            .iter()
            .map(|h| pb::HostNic {
                name: h.name.clone(),
                driver: h.driver.clone(),
                speed_mbps: h.speed_mbps,
                rx_queues: h.rx_queues,
                tx_queues: h.tx_queues,
                timestamping: h.timestamping.clone(),
                ptp_clock: h.ptp_clock,
                settings: h
                    .settings
                    .iter()
                    .map(|s| pb::NicSetting { knob: s.knob.clone(), cpus: s.cpus.clone(), error: s.error.clone() })
                    .collect(),
            })
            .collect(),
        nic_profile: n.nic_profile.clone(),
    }
}

pub fn registration(r: pb::RegisterRequest) -> NodeRegistration {
    let c = r.capacity.unwrap_or_default();
    NodeRegistration {
        id: r.id,
        address: r.address,
        arch: r.arch,
        capacity: Capacity { vcpus: c.vcpus, memory_mib: c.memory_mib },
        labels: labels(r.labels),
        cpu_features: r.cpu_features.into_iter().collect(),
        nics: r
            .nics
            .into_iter()
            .map(|h| HostNic {
                name: h.name,
                driver: h.driver,
                speed_mbps: h.speed_mbps,
                rx_queues: h.rx_queues,
                tx_queues: h.tx_queues,
                timestamping: h.timestamping,
                ptp_clock: h.ptp_clock,
                settings: h.settings.into_iter().map(|s| NicSetting { knob: s.knob, cpus: s.cpus, error: s.error }).collect(),
            })
            .collect(),
        nic_profile: r.nic_profile,
    }
}

pub fn power(p: Power) -> pb::Power {
    match p {
        Power::Running => pb::Power::Running,
        Power::Stopped => pb::Power::Stopped,
    }
}

/// `default` for an unspecified power (create: running); None refuses it.
pub fn power_from(p: i32, default: Option<Power>) -> Result<Power, CommandError> {
    match pb::Power::try_from(p) {
        Ok(pb::Power::Running) => Ok(Power::Running),
        Ok(pb::Power::Stopped) => Ok(Power::Stopped),
        Ok(pb::Power::Unspecified) => default.ok_or_else(|| invalid("power: give POWER_RUNNING or POWER_STOPPED")),
        Err(_) => Err(invalid(format!("power: {p} is not a known power state"))),
    }
}

pub fn phase(p: VmPhase) -> pb::VmPhase {
    match p {
        VmPhase::Unknown => pb::VmPhase::Unknown,
        VmPhase::Starting => pb::VmPhase::Starting,
        VmPhase::Running => pb::VmPhase::Running,
        VmPhase::Paused => pb::VmPhase::Paused,
        VmPhase::Stopped => pb::VmPhase::Stopped,
        VmPhase::Failed => pb::VmPhase::Failed,
    }
}

pub fn phase_from(p: i32) -> Result<VmPhase, CommandError> {
    Ok(match pb::VmPhase::try_from(p).map_err(|_| invalid(format!("phase: {p} is not a known VM phase")))? {
        pb::VmPhase::Unknown => VmPhase::Unknown,
        pb::VmPhase::Starting => VmPhase::Starting,
        pb::VmPhase::Running => VmPhase::Running,
        pb::VmPhase::Paused => VmPhase::Paused,
        pb::VmPhase::Stopped => VmPhase::Stopped,
        pb::VmPhase::Failed => VmPhase::Failed,
    })
}

pub fn vm_spec(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        boot: Some(match &s.boot {
            Boot::Kernel { kernel, initrd, cmdline } => pb::vm_spec::Boot::Kernel(pb::KernelBoot {
                kernel: kernel.clone(),
                initrd: initrd.clone().unwrap_or_default(),
                cmdline: cmdline.clone(),
            }),
            Boot::Volume { volume } => pb::vm_spec::Boot::BootVolume(volume.clone()),
        }),
        disks: s.disks.iter().map(|d| pb::Disk { volume: d.volume.clone(), read_only: d.read_only }).collect(),
        labels: s.labels.clone().into_iter().collect(),
        anti_affinity_group: s.anti_affinity_group.clone().unwrap_or_default(),
        required_labels: s.required_labels.clone().into_iter().collect(),
        ha: s.ha,
        nics: s
            .nics
            .iter()
            .map(|n| pb::NicSpec { network: n.network.clone(), ip: n.ip.map(|i| i.to_string()).unwrap_or_default() })
            .collect(),
    }
}

pub fn vm_spec_from(s: Option<pb::VmSpec>) -> Result<VmSpec, CommandError> {
    let s = s.ok_or_else(|| invalid("spec is missing"))?;
    let boot = match s.boot {
        Some(pb::vm_spec::Boot::Kernel(k)) => {
            Boot::Kernel { kernel: k.kernel, initrd: opt(k.initrd), cmdline: k.cmdline }
        }
        Some(pb::vm_spec::Boot::BootVolume(v)) => Boot::Volume { volume: v },
        None => return Err(invalid("spec.boot is missing: give a kernel (kernel, initrd, cmdline) or a boot_volume")),
    };
    Ok(VmSpec {
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        boot,
        disks: s.disks.into_iter().map(|d| Disk { volume: d.volume, read_only: d.read_only }).collect(),
        labels: labels(s.labels),
        anti_affinity_group: opt(s.anti_affinity_group),
        required_labels: labels(s.required_labels),
        ha: s.ha,
        nics: s
            .nics
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                let ip = match n.ip.as_str() {
                    "" => None,
                    a => Some(a.parse().map_err(|_| invalid(format!("nic {i}: {a:?} is not an IPv4 address")))?),
                };
                Ok(NicSpec { network: n.network, ip })
            })
            .collect::<Result<_, CommandError>>()?,
    })
}

pub fn vm(
    v: &Vm,
    unschedulable_reason: Option<String>,
    migrating: Option<&Migration>,
    network: impl Fn(&str) -> Option<Network>,
) -> pb::Vm {
    pb::Vm {
        name: v.name.clone(),
        spec: Some(vm_spec(&v.spec)),
        desired_power: power(v.desired_power) as i32,
        placement: v.placement.clone().unwrap_or_default(),
        observed: Some(pb::VmStatus {
            phase: phase(v.observed.phase) as i32,
            node: v.observed.node.clone().unwrap_or_default(),
            message: v.observed.message.clone(),
            at_ms: v.observed.at_ms,
        }),
        generation: v.generation,
        created_revision: v.created_revision,
        updated_revision: v.updated_revision,
        unschedulable_reason: unschedulable_reason.unwrap_or_default(),
        migration: migrating.map(migration),
        nics: v
            .nics
            .iter()
            .map(|a| {
                let n = network(&a.network);
                pb::NicAddress {
                    network: a.network.clone(),
                    mac: a.mac.clone(),
                    ip: a.ip.to_string(),
                    prefix: n.as_ref().map_or(0, |n| u32::from(n.prefix)),
                    gateway: n.and_then(|n| n.gateway).map(|g| g.to_string()).unwrap_or_default(),
                }
            })
            .collect(),
    }
}

pub fn network(n: &Network, leases: Option<Vec<pb::NetworkLease>>, used: usize) -> pb::Network {
    pb::Network {
        name: n.name.clone(),
        cidr: n.cidr(),
        vni: n.vni,
        gateway: n.gateway.map(|g| g.to_string()).unwrap_or_default(),
        created_revision: n.created_revision,
        leases: leases.unwrap_or_default(),
        used: used as u32,
        size: n.hosts().filter(|h| n.gateway != Some(*h)).count() as u32,
    }
}

pub fn network_request(r: pb::CreateNetworkRequest) -> NetworkRequest {
    NetworkRequest {
        name: r.name,
        cidr: r.cidr,
        vni: (r.vni != 0).then_some(r.vni),
        gateway: match r.gateway.as_str() {
            "" => Gateway::First,
            "none" => Gateway::None,
            g => Gateway::At(g.to_string()),
        },
    }
}

pub fn migration_phase(p: MigrationPhase) -> pb::MigrationPhase {
    match p {
        MigrationPhase::Preparing => pb::MigrationPhase::Preparing,
        MigrationPhase::Sending => pb::MigrationPhase::Sending,
        MigrationPhase::Completed => pb::MigrationPhase::Completed,
        MigrationPhase::Failed => pb::MigrationPhase::Failed,
        MigrationPhase::Cancelled => pb::MigrationPhase::Cancelled,
    }
}

fn ms(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| v.min(i64::MAX as u64) as i64)
}

pub fn migration(m: &Migration) -> pb::Migration {
    pb::Migration {
        id: m.id,
        vm: m.vm.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        phase: migration_phase(m.phase) as i32,
        started_ms: m.started_ms,
        ended_ms: m.ended_ms.unwrap_or(0),
        receiver: m.receiver.clone().unwrap_or_default(),
        downtime_budget_ms: m.downtime_budget_ms,
        bandwidth_mib_s: m.bandwidth_mib_s,
        cancel_requested: m.cancel_requested,
        downtime_ms: ms(m.downtime_ms),
        total_ms: ms(m.total_ms),
        reason: if m.phase.is_active() { m.abort_reason.clone().unwrap_or_default() } else { m.reason.clone() },
    }
}

/// An agent's migration report; negative durations mean "not known".
pub fn migration_report_from(r: &pb::ReportMigrationRequest) -> Result<MigrationReport, CommandError> {
    let known = |v: i64| u64::try_from(v).ok();
    match pb::MigrationReport::try_from(r.report) {
        Ok(pb::MigrationReport::ReceiverReady) => Ok(MigrationReport::ReceiverReady { address: r.address.clone() }),
        Ok(pb::MigrationReport::Completed) => {
            Ok(MigrationReport::Completed { downtime_ms: known(r.downtime_ms), total_ms: known(r.total_ms) })
        }
        Ok(pb::MigrationReport::Failed) => Ok(MigrationReport::Failed { reason: r.reason.clone() }),
        Ok(pb::MigrationReport::Unspecified) | Err(_) => {
            Err(invalid(format!("report: {} is not RECEIVER_READY, COMPLETED or FAILED", r.report)))
        }
    }
}

pub fn storage_state(s: StorageState) -> pb::StorageState {
    match s {
        StorageState::Pending => pb::StorageState::Pending,
        StorageState::Ready => pb::StorageState::Ready,
        StorageState::Failed => pb::StorageState::Failed,
    }
}

/// A volume with what Ceph holds for it.
pub fn volume(v: &Volume, status: &StorageStatus) -> pb::Volume {
    pb::Volume {
        name: v.name.clone(),
        pool: v.pool.clone(),
        image: v.image.clone(),
        size_bytes: v.size_bytes,
        profile: v.profile.clone(),
        state: storage_state(status.state) as i32,
        status_message: status.message.clone(),
    }
}

/// The status fields are output only and ignored here.
pub fn volume_from(v: pb::Volume) -> Volume {
    Volume { name: v.name, pool: v.pool, image: v.image, size_bytes: v.size_bytes, profile: v.profile }
}

pub fn profile(p: &StorageProfile, status: &StorageStatus) -> pb::StorageProfile {
    pb::StorageProfile {
        state: storage_state(status.state) as i32,
        status_message: status.message.clone(),
        name: p.name.clone(),
        kind: Some(match &p.kind {
            ProfileKind::Replicated { size, min_size } => {
                pb::storage_profile::Kind::Replicated(pb::ReplicatedProfile { size: *size, min_size: *min_size })
            }
            ProfileKind::ErasureCoded { k, m, plugin, technique, crush_failure_domain, stripe_unit } => {
                pb::storage_profile::Kind::ErasureCoded(pb::ErasureCodedProfile {
                    k: *k,
                    m: *m,
                    plugin: plugin.clone(),
                    technique: technique.clone().unwrap_or_default(),
                    crush_failure_domain: crush_failure_domain.clone(),
                    stripe_unit: stripe_unit.unwrap_or(0),
                })
            }
        }),
        osd_tunables: p.osd_tunables.clone().into_iter().collect(),
    }
}

/// The status fields are output only and ignored here.
pub fn profile_from(p: pb::StorageProfile) -> Result<StorageProfile, CommandError> {
    let kind = match p.kind {
        Some(pb::storage_profile::Kind::Replicated(r)) => {
            ProfileKind::Replicated { size: r.size, min_size: r.min_size }
        }
        Some(pb::storage_profile::Kind::ErasureCoded(e)) => ProfileKind::ErasureCoded {
            k: e.k,
            m: e.m,
            plugin: opt(e.plugin).unwrap_or_else(|| "jerasure".into()),
            technique: opt(e.technique),
            crush_failure_domain: opt(e.crush_failure_domain).unwrap_or_else(|| "host".into()),
            stripe_unit: (e.stripe_unit != 0).then_some(e.stripe_unit),
        },
        None => {
            return Err(invalid(format!(
                "storage profile {}: kind is missing: give replicated (size, min_size) or erasure_coded (k, m, ...)",
                p.name
            )))
        }
    };
    Ok(StorageProfile { name: p.name, kind, osd_tunables: p.osd_tunables.into_iter().collect() })
}

pub fn event_kind_name(k: EventKind) -> String {
    format!("{k:?}")
}

pub fn event_kind_from(s: &str) -> Result<EventKind, CommandError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| invalid(format!("event kind {s:?} is not known (e.g. VmCreated, NodeStateChanged)")))
}

pub fn event(e: &Event) -> pb::Event {
    pb::Event {
        revision: e.revision,
        time_ms: e.time_ms,
        kind: event_kind_name(e.kind),
        subject: e.subject.clone(),
        message: e.message.clone(),
    }
}
