//! Delivers what the supervisor observed to the controllers: the latest phase
//! of each VM (older unsent ones are superseded, never queued up), and the
//! guests' own power-offs. While the controllers are unreachable everything
//! waits here; when they return, every VM's phase is sent again (re-sync), so
//! the cluster state matches the host whatever was lost in between.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::v1 as pb;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::controllers::{is_transport, Controllers};
use crate::metrics::Metrics;

#[derive(Debug)]
pub enum ReporterMsg {
    Status {
        vm: String,
        phase: pb::VmPhase,
        message: String,
    },
    /// The guest powered off by itself: make its desired power Stopped.
    GuestPoweredOff {
        vm: String,
        generation: u64,
    },
    /// This host's word on a migration (a `ReportMigrationRequest` without
    /// the node, which the reporter fills in).
    Migration(pb::ReportMigrationRequest),
    /// The controllers are back (or a new watch began): send everything again.
    Resync,
}

pub async fn run(
    node: String,
    ctl: Arc<Controllers>,
    metrics: Arc<Metrics>,
    retry_max: Duration,
    mut rx: mpsc::UnboundedReceiver<ReporterMsg>,
) {
    // Everything known (for re-syncs) and what is still to send.
    let mut known: BTreeMap<String, (pb::VmPhase, String)> = BTreeMap::new();
    let mut pending: BTreeMap<String, (pb::VmPhase, String)> = BTreeMap::new();
    let mut power_offs: BTreeMap<String, u64> = BTreeMap::new();
    // In the order they happened; never superseded (each is one transition).
    let mut migrations: Vec<pb::ReportMigrationRequest> = Vec::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        let idle = pending.is_empty() && power_offs.is_empty() && migrations.is_empty();
        let msg = if idle {
            match rx.recv().await {
                Some(m) => Some(m),
                None => return,
            }
        } else {
            tokio::select! {
                m = rx.recv() => match m { Some(m) => Some(m), None => return },
                _ = tokio::time::sleep(backoff) => None,
            }
        };
        let mut apply = |m: ReporterMsg| match m {
            ReporterMsg::Status { vm, phase, message } => {
                known.insert(vm.clone(), (phase, message.clone()));
                pending.insert(vm, (phase, message));
            }
            ReporterMsg::GuestPoweredOff { vm, generation } => {
                power_offs.insert(vm, generation);
            }
            ReporterMsg::Migration(mut r) => {
                r.node = node.clone();
                migrations.push(r);
            }
            ReporterMsg::Resync => pending.extend(known.iter().map(|(k, v)| (k.clone(), v.clone()))),
        };
        if let Some(m) = msg {
            apply(m);
        }
        while let Ok(m) = rx.try_recv() {
            apply(m);
        }
        metrics.set_reports_pending(pending.len() + power_offs.len() + migrations.len());
        match send_all(&node, &ctl, &mut known, &mut pending, &mut power_offs, &mut migrations).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                ctl.failed();
                if backoff >= retry_max / 2 {
                    warn!("status reports wait for the controllers: {e}");
                }
                backoff = (backoff * 2).min(retry_max);
            }
        }
        metrics.set_reports_pending(pending.len() + power_offs.len() + migrations.len());
    }
}

/// Sends in order until a transport error (returned: try later). Refusals
/// (the VM was deleted or moved to another host) are logged and dropped.
/// Power-offs go before phases: a VM seen Stopped after its guest powered
/// off already has desired power Stopped. Migration reports go before
/// phases too: a VM that arrived here is placed here before its phase is.
async fn send_all(
    node: &str,
    ctl: &Controllers,
    known: &mut BTreeMap<String, (pb::VmPhase, String)>,
    pending: &mut BTreeMap<String, (pb::VmPhase, String)>,
    power_offs: &mut BTreeMap<String, u64>,
    migrations: &mut Vec<pb::ReportMigrationRequest>,
) -> Result<(), String> {
    while !migrations.is_empty() {
        let mut client = ctl.agent().await?;
        let r = migrations[0].clone();
        let kind = pb::MigrationReport::try_from(r.report).map_or("?", |k| k.as_str_name());
        match client.report_migration(r.clone()).await {
            Ok(_) => info!(vm = r.vm, migration = r.migration_id, report = kind, "migration reported"),
            Err(s) if is_transport(&s) => return Err(s.message().to_string()),
            // The other side's word came first, or the migration ended.
            Err(s) => info!(vm = r.vm, migration = r.migration_id, report = kind, "not taken: {}", s.message()),
        }
        migrations.remove(0);
    }
    while let Some((vm, generation)) = power_offs.pop_first() {
        let mut client = match ctl.cluster().await {
            Ok(c) => c,
            Err(e) => {
                power_offs.insert(vm, generation);
                return Err(e);
            }
        };
        let req = pb::SetVmPowerRequest {
            name: vm.clone(),
            power: pb::Power::Stopped as i32,
            expected_generation: generation,
        };
        match client.set_vm_power(req).await {
            Ok(_) => info!(vm, "desired power set to stopped after the guest powered off"),
            Err(s) if is_transport(&s) => {
                power_offs.insert(vm, generation);
                return Err(s.message().to_string());
            }
            // A newer request (a start, a delete) won: it stands.
            Err(s) => info!(vm, "guest power-off not recorded as desired power: {}", s.message()),
        }
    }
    while let Some((vm, (phase, message))) = pending.pop_first() {
        let mut client = match ctl.agent().await {
            Ok(c) => c,
            Err(e) => {
                pending.insert(vm, (phase, message));
                return Err(e);
            }
        };
        let req = pb::ReportVmStatusRequest {
            node: node.into(),
            vm: vm.clone(),
            phase: phase as i32,
            message: message.clone(),
        };
        match client.report_vm_status(req).await {
            Ok(_) => info!(vm, phase = phase.as_str_name(), "reported"),
            Err(s) if is_transport(&s) => {
                pending.insert(vm, (phase, message));
                return Err(s.message().to_string());
            }
            Err(s) => {
                warn!(vm, "report refused, dropped: {}", s.message());
                known.remove(&vm);
            }
        }
    }
    Ok(())
}
