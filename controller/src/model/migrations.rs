//! Live migrations: one record per attempt to move a running VM from its node
//! (the source) to another (the target). Only transitions are committed; the
//! rounds of pre-copy live in the VMMs and are read from the source's agent.
//!
//! ```text
//!  Preparing ──receiver ready──▶ Sending ──completed──▶ Completed (placed on the target)
//!      │                            │
//!      └──failed / cancelled────────┴──failed──▶ Failed / Cancelled (stays on the source)
//! ```
//!
//! Which host runs the guest is decided by the two VMMs (the RBD lock
//! hand-over, see vmm-core's migration docs), never by a controller guessing:
//! the record only moves to Completed on an agent's word that the guest runs
//! on the target, and to Failed on an agent's word that it runs on the source
//! (or, before any guest byte can have moved, on the leader's deadline).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::nodes::NodeId;

/// The revision of the command that started the migration.
pub type MigrationId = u64;

/// Finished migrations kept for `migration list`; older ones are dropped.
pub const MAX_FINISHED_MIGRATIONS: usize = 1000;

/// Upper bounds of the downtime histogram's buckets, in milliseconds (the
/// last bucket, beyond them, is +Inf).
pub const DOWNTIME_BUCKETS_MS: [u64; 9] = [50, 100, 200, 300, 500, 1000, 2000, 5000, 10_000];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MigrationPhase {
    Preparing,
    Sending,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationPhase {
    pub fn is_active(self) -> bool {
        matches!(self, MigrationPhase::Preparing | MigrationPhase::Sending)
    }

    /// The label of a finished migration's outcome in metrics.
    pub fn outcome_label(self) -> &'static str {
        match self {
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
            MigrationPhase::Preparing | MigrationPhase::Sending => "active",
        }
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: MigrationId,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub phase: MigrationPhase,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// host:port of the receiving VMM, once the target's agent reports it.
    pub receiver: Option<String>,
    /// 0: the VMM's default.
    pub downtime_budget_ms: u32,
    /// 0: unlimited.
    pub bandwidth_mib_s: u32,
    pub cancel_requested: bool,
    /// Set when the leader (not an operator) asked for the cancel, saying
    /// why: the migration then ends Failed with this reason, not Cancelled.
    #[serde(default)]
    pub abort_reason: Option<String>,
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    /// Why it failed or was cancelled; empty otherwise.
    pub reason: String,
}

/// What an agent (or the leader) says about a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationReport {
    /// The target's receiver listens at `address` (host:port).
    ReceiverReady { address: String },
    /// The guest runs on the target.
    Completed { downtime_ms: Option<u64>, total_ms: Option<u64> },
    /// The guest runs on the source.
    Failed { reason: String },
}

/// Outcome counters and the downtime histogram, for `/metrics`. Kept in the
/// replicated state so every controller counts the same and a new leader
/// carries on from the old one's numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Per bucket of [`DOWNTIME_BUCKETS_MS`] plus +Inf: how many completed
    /// migrations had a downtime up to that bound (not cumulative).
    pub downtime_buckets: Vec<u64>,
    pub downtime_sum_ms: u64,
    pub downtime_count: u64,
}

impl MigrationStats {
    pub fn count(&mut self, phase: MigrationPhase) {
        match phase {
            MigrationPhase::Completed => self.completed += 1,
            MigrationPhase::Failed => self.failed += 1,
            MigrationPhase::Cancelled => self.cancelled += 1,
            MigrationPhase::Preparing | MigrationPhase::Sending => {}
        }
    }

    pub fn observe_downtime(&mut self, ms: u64) {
        if self.downtime_buckets.len() != DOWNTIME_BUCKETS_MS.len() + 1 {
            self.downtime_buckets.resize(DOWNTIME_BUCKETS_MS.len() + 1, 0);
        }
        let i = DOWNTIME_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(DOWNTIME_BUCKETS_MS.len());
        self.downtime_buckets[i] += 1;
        self.downtime_sum_ms = self.downtime_sum_ms.saturating_add(ms);
        self.downtime_count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtimes_fall_in_their_buckets() {
        let mut s = MigrationStats::default();
        for ms in [10, 50, 51, 250, 99_999] {
            s.observe_downtime(ms);
        }
        assert_eq!(s.downtime_buckets, vec![2, 1, 0, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!((s.downtime_count, s.downtime_sum_ms), (5, 10 + 50 + 51 + 250 + 99_999));
    }
}
