//! The leader's control loop: marks nodes whose heartbeats stopped
//! Unreachable (and back to Ready when they return), assigns pending VMs with
//! the scheduler, records why a VM cannot be placed, and ends migrations
//! whose target never got a receiver going. It runs on every
//! controller but acts only while that controller leads; everything it
//! decides is committed as ordinary commands, so a new leader simply carries on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::{info, warn};

use crate::model::{MigrationPhase, MigrationReport, NodeState};

/// How long a target's agent has to start a receiver for a migration.
pub const PREPARE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
use crate::node::{Controller, LeaderTicks, NodeError};
use crate::scheduler::plan_pending;
use crate::state_machine::Command;

pub async fn run(ctl: Arc<Controller>) {
    let mut ticks = LeaderTicks::new(ctl.clone());
    // Last refusal recorded per VM, so an unchanged verdict is not re-recorded
    // every pass. Leader memory only: a new leader records each once more.
    let mut recorded: HashMap<String, String> = HashMap::new();
    // Nodes seen Fenced, to notice one brought back.
    let mut fenced: HashSet<String> = HashSet::new();
    while let Some((leads, term)) = ticks.next().await {
        if !leads {
            recorded.clear();
            fenced.clear();
            continue;
        }
        if let Err(e) = pass(&ctl, term, &mut recorded, &mut fenced).await {
            warn!("reconcile: {e}");
        }
    }
}

async fn pass(
    ctl: &Controller,
    term: u64,
    recorded: &mut HashMap<String, String>,
    fenced: &mut HashSet<String>,
) -> Result<(), NodeError> {
    let lease = ctl.timing.node_lease;
    let (transitions, plan, stalled) = {
        let st = ctl.shared.read();
        let mut transitions = Vec::new();
        for n in st.cluster.nodes() {
            // Brought back from Fenced: its agent gets a full lease from now.
            if n.state != NodeState::Fenced && fenced.remove(&n.id) {
                ctl.restart_silence(&n.id, term);
            }
            match n.state {
                NodeState::Ready | NodeState::Cordoned => {
                    let silent = ctl.silence(&n.id, term);
                    if silent > lease {
                        let why = format!(
                            "no heartbeat for {:.1} s (lease {:.1} s)",
                            silent.as_secs_f64(),
                            lease.as_secs_f64()
                        );
                        transitions.push((n.id.clone(), NodeState::Unreachable, why));
                    }
                }
                NodeState::Unreachable => {
                    if ctl.heartbeat_age(&n.id).is_some_and(|age| age < lease) {
                        transitions.push((n.id.clone(), NodeState::Ready, "heartbeats resumed".to_string()));
                    }
                }
                NodeState::Fenced => {
                    fenced.insert(n.id.clone());
                }
            }
        }
        let plan: Vec<_> = plan_pending(&st.cluster)
            .into_iter()
            .map(|(vm, r)| (vm, r.map_err(|refusal| refusal.to_string())))
            .collect();
        let now = crate::raft::now_ms();
        let stalled: Vec<(String, u64, String)> = st
            .cluster
            .migrations()
            .filter(|m| m.phase == MigrationPhase::Preparing)
            .filter(|m| now.saturating_sub(m.started_ms) > PREPARE_DEADLINE.as_millis() as u64)
            .map(|m| (m.vm.clone(), m.id, m.target.clone()))
            .collect();
        (transitions, plan, stalled)
    };
    // A target that never said its receiver listens: nothing was sent, so
    // the migration can end here.
    for (vm, id, target) in stalled {
        let reason = format!("node {target} did not start a receiver within {} s", PREPARE_DEADLINE.as_secs());
        warn!(vm = %vm, migration = id, "{reason}");
        let report = MigrationReport::Failed { reason };
        match ctl.write(Command::ReportMigration { vm, id, node: None, report }).await {
            Ok(_) | Err(NodeError::Command(_)) => {}
            Err(e) => return Err(e),
        }
    }
    for (id, state, reason) in transitions {
        info!(node = %id, to = %state, "{reason}");
        ctl.write(Command::SetNodeState { id, state, reason }).await?;
    }
    for (vm, verdict) in plan {
        match verdict {
            Ok(node) => {
                match ctl.write(Command::AssignVm { name: vm.clone(), node: node.clone() }).await {
                    Ok(_) => info!(vm = %vm, node = %node, "assigned"),
                    // The state moved on between planning and committing (a VM
                    // deleted, a node cordoned): the next pass plans again.
                    Err(NodeError::Command(e)) => info!(vm = %vm, "not assigned: {e}"),
                    Err(e) => return Err(e),
                }
                recorded.remove(&vm);
            }
            Err(reason) => {
                if recorded.get(&vm) != Some(&reason) {
                    info!(vm = %vm, "cannot place: {reason}");
                    match ctl.write(Command::RecordUnschedulable { name: vm.clone(), reason: reason.clone() }).await {
                        Ok(_) | Err(NodeError::Command(_)) => {}
                        Err(e) => return Err(e),
                    }
                    recorded.insert(vm, reason);
                }
            }
        }
    }
    Ok(())
}
