//! `basaltctl vm migrate`, `migration list|show|cancel` and `node drain`:
//! live migration as the controllers record it, with the pre-copy progress
//! read from the source host's VMM (through its agent) while it runs.

use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::cluster::{connect, runtime, spinner, CliError};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    name: String,
    /// Node to move to (default: the scheduler picks one).
    #[arg(long)]
    to: Option<String>,
    /// Longest pause of the guest to aim for (default: basalt-vmm's, 300 ms).
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..=60_000))]
    downtime_ms: Option<u32>,
    /// Cap the migration stream, MiB/s (default: no cap).
    #[arg(long = "bandwidth", value_name = "MIB/S", value_parser = clap::value_parser!(u32).range(1..))]
    bandwidth: Option<u32>,
    /// Follow it to the end with a progress bar; exit 1 if it fails.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up waiting after this many seconds (exit 4; the migration goes on).
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum MigrationCmd {
    /// Migrations, newest first.
    List {
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
        /// Only those from or to this node.
        #[arg(long)]
        node: Option<String>,
        /// Only those still running.
        #[arg(long)]
        active: bool,
    },
    /// One migration in detail.
    Show { id: u64 },
    /// Cancel a VM's migration; it runs on where it was. One past the switch completes anyway.
    Cancel { vm: String },
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    id: String,
    /// How many VMs move at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    parallel: u32,
    /// Give up waiting for a VM's migration after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

pub fn phase_name(p: i32) -> &'static str {
    match pb::MigrationPhase::try_from(p) {
        Ok(pb::MigrationPhase::Preparing) => "PREPARING",
        Ok(pb::MigrationPhase::Sending) => "SENDING",
        Ok(pb::MigrationPhase::Completed) => "COMPLETED",
        Ok(pb::MigrationPhase::Failed) => "FAILED",
        Ok(pb::MigrationPhase::Cancelled) => "CANCELLED",
        Ok(pb::MigrationPhase::Unspecified) | Err(_) => "-",
    }
}

fn active(m: &pb::Migration) -> bool {
    matches!(pb::MigrationPhase::try_from(m.phase), Ok(pb::MigrationPhase::Preparing | pb::MigrationPhase::Sending))
}

fn ms(v: i64) -> Value {
    if v < 0 {
        Value::Null
    } else {
        v.into()
    }
}

pub fn migration_json(m: &pb::Migration) -> Value {
    json!({
        "id": m.id, "vm": m.vm, "source": m.source, "target": m.target, "phase": phase_name(m.phase),
        "started_ms": m.started_ms, "ended_ms": (m.ended_ms != 0).then_some(m.ended_ms),
        "receiver": m.receiver, "downtime_budget_ms": m.downtime_budget_ms, "bandwidth_mib_s": m.bandwidth_mib_s,
        "cancel_requested": m.cancel_requested, "downtime_ms": ms(m.downtime_ms), "total_ms": ms(m.total_ms),
        "reason": m.reason,
    })
}

/// "moved from a to b in 4.2 s, downtime 180 ms" or why it did not.
fn outcome_line(m: &pb::Migration) -> String {
    let total = if m.total_ms >= 0 { format!(" in {:.1} s", m.total_ms as f64 / 1000.0) } else { String::new() };
    let downtime =
        if m.downtime_ms >= 0 { format!("downtime {} ms", m.downtime_ms) } else { "downtime not measured".into() };
    match pb::MigrationPhase::try_from(m.phase) {
        Ok(pb::MigrationPhase::Completed) => {
            format!(
                "vm {} moved from node {} to node {}{total}, {downtime} (migration {})",
                m.vm, m.source, m.target, m.id
            )
        }
        _ => format!(
            "vm {} stays on node {}: migration {} {} ({})",
            m.vm,
            m.source,
            m.id,
            phase_name(m.phase).to_lowercase(),
            m.reason
        ),
    }
}

async fn get_migration(c: &mut ClusterServiceClient<Channel>, id: u64) -> Result<pb::Migration, CliError> {
    Ok(c.get_migration(pb::GetMigrationRequest { id, allow_stale: false })
        .await
        .map_err(CliError::Refused)?
        .into_inner())
}

/// What the source's VMM says of the send, for the progress bar.
async fn progress(c: &mut ClusterServiceClient<Channel>, vm: &str) -> Option<(String, Option<u64>)> {
    progress_line(&crate::vm_host::control(c, vm, "migrate-status").await.ok()?)
}

/// A sender's `migrate-status` as a line, and the bytes its current round
/// has still to look at once it has sent any (before that, nothing is known).
fn progress_line(v: &Value) -> Option<(String, Option<u64>)> {
    if v["role"] != "send" {
        return None;
    }
    let mib = |b: &Value| b.as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    let started = v["bytes"].as_u64().is_some_and(|b| b > 0);
    if !started {
        return Some((format!("{}, nothing sent yet", v["phase"].as_str().unwrap_or("?")), None));
    }
    // The first estimate of the downtime comes at the end of round 0.
    let downtime = match v["expected_downtime_ms"].as_u64() {
        Some(d) if d > 0 => format!(", expected downtime {d} ms"),
        _ => String::new(),
    };
    let throttle = match v["throttle_pct"].as_u64() {
        Some(t) if t > 0 => format!(", vCPUs throttled {t}%"),
        _ => String::new(),
    };
    let line = format!(
        "{} round {}, {:.0} MiB left, {:.1} MiB/s{downtime}{throttle}",
        v["phase"].as_str().unwrap_or("?"),
        v["round"],
        mib(&v["remaining_bytes"]),
        v["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
    );
    Some((line, v["remaining_bytes"].as_u64()))
}

/// `vm migrate --wait`'s bar: the guest's RAM, filled as the current
/// pre-copy round gets through it (the first round reads all of it, later
/// ones only what the guest dirtied meanwhile, so the bar stays near full).
fn ram_bar(memory_bytes: u64) -> indicatif::ProgressBar {
    let bar = spinner();
    bar.set_length(memory_bytes.max(1));
    let style = indicatif::ProgressStyle::with_template("{spinner} [{bar:24}] {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Follows migration `id` to its end.
async fn follow(
    c: &mut ClusterServiceClient<Channel>,
    id: u64,
    timeout: Duration,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<pb::Migration, CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = get_migration(c, id).await?;
        if !active(&m) {
            // The source's word (its VMM handed over) may come before the
            // target's, which carries the measured downtime: give it a moment.
            if m.phase == pb::MigrationPhase::Completed as i32 && m.downtime_ms < 0 {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let again = get_migration(c, id).await?;
                    if again.downtime_ms >= 0 {
                        return Ok(again);
                    }
                }
            }
            return Ok(m);
        }
        if let Some(bar) = bar {
            let detail = if m.phase == pb::MigrationPhase::Sending as i32 {
                match progress(c, &m.vm).await {
                    Some((line, left)) => {
                        if let Some(left) = left {
                            bar.set_position(bar.length().unwrap_or(0).saturating_sub(left));
                        }
                        line
                    }
                    None => "sending".into(),
                }
            } else {
                format!("node {} is starting a receiver", m.target)
            };
            bar.set_message(format!("vm {} {} -> {}: {detail}", m.vm, m.source, m.target));
        }
        if Instant::now() > deadline {
            return Err(CliError::Timeout(format!(
                "migration {id} of vm {} is still {} after {} s (it goes on; see `basaltctl migration show {id}`)",
                m.vm,
                phase_name(m.phase),
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn start(
    c: &mut ClusterServiceClient<Channel>,
    vm: &str,
    to: Option<&str>,
    downtime_ms: Option<u32>,
    bandwidth: Option<u32>,
) -> Result<pb::Migration, CliError> {
    let req = pb::MigrateVmRequest {
        name: vm.to_string(),
        target: to.unwrap_or_default().to_string(),
        downtime_ms: downtime_ms.unwrap_or(0),
        bandwidth_mib_s: bandwidth.unwrap_or(0),
    };
    let r = c.migrate_vm(req).await.map_err(CliError::Refused)?.into_inner();
    r.migration.ok_or_else(|| CliError::Refused(tonic::Status::internal("the controller did not say which migration")))
}

pub fn migrate(endpoints: &[String], a: &MigrateArgs, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        let m = start(&mut c, &a.name, a.to.as_deref(), a.downtime_ms, a.bandwidth).await?;
        if !a.wait {
            return Ok(if as_json {
                migration_json(&m).to_string()
            } else {
                format!(
                    "migration {} of vm {} from node {} to node {} started (follow it: basaltctl migration show {})",
                    m.id, m.vm, m.source, m.target, m.id
                )
            });
        }
        let memory = c
            .get_vm(pb::GetRequest { name: m.vm.clone(), allow_stale: true })
            .await
            .ok()
            .and_then(|v| v.into_inner().spec)
            .map_or(0, |s| s.memory_mib << 20);
        let bar = ram_bar(memory);
        let end = follow(&mut c, m.id, Duration::from_secs(a.timeout), Some(&bar)).await;
        bar.finish_and_clear();
        let end = end?;
        if end.phase != pb::MigrationPhase::Completed as i32 {
            return Err(CliError::Refused(tonic::Status::failed_precondition(outcome_line(&end))));
        }
        Ok(if as_json { migration_json(&end).to_string() } else { outcome_line(&end) })
    })
}

pub fn migration(endpoints: &[String], cmd: &MigrationCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        Ok(match cmd {
            MigrationCmd::List { vm, node, active } => {
                let req = pb::ListMigrationsRequest {
                    allow_stale: false,
                    vm: vm.clone().unwrap_or_default(),
                    active_only: *active,
                    node: node.clone().unwrap_or_default(),
                };
                let r = c.list_migrations(req).await.map_err(CliError::Refused)?.into_inner();
                if as_json {
                    Value::Array(r.migrations.iter().map(migration_json).collect()).to_string()
                } else {
                    let mut out = format!(
                        "{:>8} {:<20} {:<14} {:<14} {:<10} {:>9} {:>9} {}\n",
                        "ID", "VM", "SOURCE", "TARGET", "PHASE", "TOTAL", "DOWNTIME", "REASON"
                    );
                    for m in &r.migrations {
                        let t = |v: i64, unit: &str| if v < 0 { "-".to_string() } else { format!("{v}{unit}") };
                        out.push_str(&format!(
                            "{:>8} {:<20} {:<14} {:<14} {:<10} {:>9} {:>9} {}\n",
                            m.id,
                            m.vm,
                            m.source,
                            m.target,
                            phase_name(m.phase),
                            t(m.total_ms, "ms"),
                            t(m.downtime_ms, "ms"),
                            m.reason
                        ));
                    }
                    out
                }
            }
            MigrationCmd::Show { id } => {
                let m = get_migration(&mut c, *id).await?;
                let mut j = migration_json(&m);
                if m.phase == pb::MigrationPhase::Sending as i32 {
                    if let Ok(p) = crate::vm_host::control(&mut c, &m.vm, "migrate-status").await {
                        j["progress"] = p;
                    }
                }
                if as_json {
                    j.to_string()
                } else {
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                }
            }
            MigrationCmd::Cancel { vm } => {
                let w = c.cancel_migration(pb::NameRef { name: vm.clone() }).await.map_err(CliError::Refused)?;
                let rev = w.into_inner().revision;
                if as_json {
                    json!({"revision": rev}).to_string()
                } else {
                    format!("cancel of vm {vm}'s migration requested (revision {rev})")
                }
            }
        })
    })
}

/// Cordons the node, then moves its running VMs away a few at a time. The
/// result names each VM with where it went or why it could not; exit 1
/// unless the node ends with no VM running on it.
pub fn drain(endpoints: &[String], a: &DrainArgs, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        let node = c
            .get_node(pb::GetRequest { name: a.id.clone(), allow_stale: false })
            .await
            .map_err(CliError::Refused)?
            .into_inner();
        if node.state == pb::NodeState::Ready as i32 {
            c.cordon_node(pb::NameRef { name: a.id.clone() }).await.map_err(CliError::Refused)?;
        }
        let vms = c
            .list_vms(pb::ListRequest { node: a.id.clone(), ..Default::default() })
            .await
            .map_err(CliError::Refused)?
            .into_inner()
            .vms;
        let mut results: Vec<(String, Result<String, String>)> = Vec::new();
        let mut queue: std::collections::VecDeque<String> = vms.iter().map(|v| v.name.clone()).collect();
        let mut running: Vec<(String, u64)> = Vec::new();
        let bar = spinner();
        while !queue.is_empty() || !running.is_empty() {
            while running.len() < a.parallel as usize {
                let Some(vm) = queue.pop_front() else { break };
                match start(&mut c, &vm, None, None, None).await {
                    Ok(m) => running.push((vm, m.id)),
                    Err(e) => results.push((vm, Err(e.to_string()))),
                }
            }
            let mut still = Vec::new();
            for (vm, id) in running.drain(..) {
                match get_migration(&mut c, id).await {
                    Ok(m) if active(&m) => still.push((vm, id)),
                    Ok(m) if m.phase == pb::MigrationPhase::Completed as i32 => {
                        results.push((vm, Ok(outcome_line(&m))))
                    }
                    Ok(m) => results.push((vm, Err(outcome_line(&m)))),
                    Err(e) => results.push((vm, Err(e.to_string()))),
                }
            }
            running = still;
            bar.set_message(format!(
                "draining node {}: {} moving, {} waiting, {} done",
                a.id,
                running.len(),
                queue.len(),
                results.len()
            ));
            if !running.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        bar.finish_and_clear();
        // What is left running there decides the exit status.
        let left: Vec<String> = c
            .list_vms(pb::ListRequest { node: a.id.clone(), ..Default::default() })
            .await
            .map_err(CliError::Refused)?
            .into_inner()
            .vms
            .into_iter()
            .filter(|v| v.desired_power == pb::Power::Running as i32)
            .map(|v| v.name)
            .collect();
        let text = if as_json {
            json!({
                "node": a.id,
                "vms": results.iter().map(|(vm, r)| match r {
                    Ok(m) => json!({"vm": vm, "moved": true, "message": m}),
                    Err(e) => json!({"vm": vm, "moved": false, "message": e}),
                }).collect::<Vec<_>>(),
                "still_running": left,
            })
            .to_string()
        } else {
            let mut out = String::new();
            for (vm, r) in &results {
                match r {
                    Ok(m) => out.push_str(&format!("moved   {vm}: {m}\n")),
                    Err(e) => out.push_str(&format!("stayed  {vm}: {e}\n")),
                }
            }
            if left.is_empty() {
                out.push_str(&format!("node {} is cordoned and runs no VM", a.id));
            } else {
                out.push_str(&format!("node {} still runs {}: {}", a.id, left.len(), left.join(", ")));
            }
            out
        };
        if left.is_empty() {
            Ok(text)
        } else {
            println!("{}", text.trim_end());
            Err(CliError::Refused(tonic::Status::failed_precondition(format!(
                "node {} is not empty: {} VMs could not move",
                a.id,
                left.len()
            ))))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_one_line() {
        let m = pb::Migration {
            id: 7,
            vm: "web".into(),
            source: "a".into(),
            target: "b".into(),
            phase: pb::MigrationPhase::Completed as i32,
            downtime_ms: 180,
            total_ms: 4200,
            ..Default::default()
        };
        assert_eq!(outcome_line(&m), "vm web moved from node a to node b in 4.2 s, downtime 180 ms (migration 7)");
        let f = pb::Migration {
            phase: pb::MigrationPhase::Failed as i32,
            reason: "receiver gone".into(),
            downtime_ms: -1,
            total_ms: -1,
            ..m
        };
        assert_eq!(outcome_line(&f), "vm web stays on node a: migration 7 failed (receiver gone)");
        assert_eq!(migration_json(&f)["downtime_ms"], Value::Null);
    }

    #[test]
    fn the_senders_status_reads_as_a_progress_line() {
        let v = serde_json::json!({"role": "send", "phase": "connecting", "bytes": 0, "remaining_bytes": 0});
        assert_eq!(progress_line(&v), Some(("connecting, nothing sent yet".to_string(), None)));
        let v = serde_json::json!({"role": "send", "phase": "precopy", "round": 0, "bytes": 4 << 20,
            "remaining_bytes": 120u64 << 20, "bandwidth_mib_s": 8.04, "expected_downtime_ms": 0, "throttle_pct": 0});
        let (line, left) = progress_line(&v).expect("a line");
        assert_eq!(line, "precopy round 0, 120 MiB left, 8.0 MiB/s");
        assert_eq!(left, Some(120 << 20));
        let v = serde_json::json!({"role": "send", "phase": "precopy", "round": 3, "bytes": 200 << 20,
            "remaining_bytes": 2u64 << 20, "bandwidth_mib_s": 90.0, "expected_downtime_ms": 140, "throttle_pct": 30});
        let (line, _) = progress_line(&v).expect("a line");
        assert_eq!(line, "precopy round 3, 2 MiB left, 90.0 MiB/s, expected downtime 140 ms, vCPUs throttled 30%");
        assert_eq!(progress_line(&serde_json::json!({"role": "receive"})), None);
    }
}
