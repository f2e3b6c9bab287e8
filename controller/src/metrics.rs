//! Prometheus metrics on their own HTTP port (`/metrics`): Raft's term,
//! leader, log and applied indexes, the apply lag, and per-method gRPC latency.
//! Raft figures are read from openraft's metrics at scrape time, so they are
//! never stale and cost nothing between scrapes.

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::raft::Metrics as RaftMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

type HistogramFn = fn() -> Histogram;

fn rpc_histogram() -> Histogram {
    // 100 µs .. ~3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    term: Gauge,
    leader: Gauge,
    last_log_index: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    apply_lag: Gauge,
    snapshot_index: Gauge,
    purged_index: Gauge,
    is_leader: Gauge,
    revision: Gauge,
    rpc_seconds: Family<MethodLabel, Histogram, HistogramFn>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut reg = Registry::with_prefix("basalt");
        let g = |reg: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            reg.register(name, help, gauge.clone());
            gauge
        };
        let term = g(&mut reg, "raft_term", "Current Raft term");
        let leader = g(&mut reg, "raft_leader_id", "Id of the current leader, 0 if none is known");
        let is_leader = g(&mut reg, "raft_is_leader", "1 if this controller is the leader");
        let last_log_index = g(&mut reg, "raft_last_log_index", "Index of the last entry in this controller's log");
        let commit_index = g(&mut reg, "raft_commit_index", "Index of the last entry known committed by a quorum");
        let applied_index = g(&mut reg, "raft_applied_index", "Index of the last entry applied to the state machine");
        let apply_lag = g(&mut reg, "raft_apply_lag", "Committed log entries not yet applied");
        let snapshot_index = g(&mut reg, "raft_snapshot_index", "Last log index covered by the latest snapshot");
        let purged_index = g(&mut reg, "raft_purged_index", "Last log index removed by compaction");
        let revision = g(&mut reg, "cluster_revision", "Revision of the applied cluster model");
        let rpc_seconds = Family::<MethodLabel, Histogram, HistogramFn>::new_with_constructor(rpc_histogram as _);
        reg.register("grpc_request_duration_seconds", "gRPC request latency by method", rpc_seconds.clone());
        Metrics {
            registry: Mutex::new(reg),
            term,
            leader,
            last_log_index,
            commit_index,
            applied_index,
            apply_lag,
            snapshot_index,
            purged_index,
            is_leader,
            revision,
            rpc_seconds,
        }
    }

    /// Times a request until the guard is dropped.
    pub fn rpc(&self, method: &'static str) -> RpcTimer<'_> {
        RpcTimer { metrics: self, method, start: Instant::now() }
    }

    /// The text exposition, with Raft's figures as of now.
    pub fn render(&self, raft: &RaftMetrics, commit_index: u64, revision: u64) -> String {
        let idx = |i: Option<u64>| i.map(|i| i as i64).unwrap_or(0);
        self.term.set(raft.current_term as i64);
        self.leader.set(raft.current_leader.unwrap_or(0) as i64);
        self.is_leader.set(i64::from(raft.current_leader == Some(raft.id)));
        let last = idx(raft.last_log_index);
        let applied = idx(raft.last_applied.map(|l| l.index));
        self.last_log_index.set(last);
        self.commit_index.set(commit_index as i64);
        self.applied_index.set(applied);
        self.apply_lag.set((commit_index as i64 - applied).max(0));
        self.snapshot_index.set(idx(raft.snapshot.map(|l| l.index)));
        self.purged_index.set(idx(raft.purged.map(|l| l.index)));
        self.revision.set(revision as i64);
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }
}

/// Migration outcomes and downtimes, from the replicated state (so every
/// controller reports the same numbers), added to an exposition before its
/// `# EOF`.
pub fn append_migrations(out: &mut String, s: &crate::model::MigrationStats, active: usize) {
    use crate::model::migrations::DOWNTIME_BUCKETS_MS;
    use std::fmt::Write;
    let eof = out.rfind("# EOF").unwrap_or(out.len());
    let tail = out.split_off(eof);
    let _ = writeln!(out, "# HELP basalt_migrations Live migrations by outcome.\n# TYPE basalt_migrations counter");
    for (outcome, n) in [("completed", s.completed), ("failed", s.failed), ("cancelled", s.cancelled)] {
        let _ = writeln!(out, "basalt_migrations_total{{outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP basalt_migrations_active Live migrations in progress.\n# TYPE basalt_migrations_active gauge"
    );
    let _ = writeln!(out, "basalt_migrations_active {active}");
    let _ = writeln!(
        out,
        "# HELP basalt_migration_downtime_seconds Guest downtime of completed live migrations.\n# TYPE basalt_migration_downtime_seconds histogram"
    );
    let mut cumulative = 0;
    for (i, le) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
        cumulative += s.downtime_buckets.get(i).copied().unwrap_or(0);
        let _ =
            writeln!(out, "basalt_migration_downtime_seconds_bucket{{le=\"{}\"}} {cumulative}", *le as f64 / 1000.0);
    }
    let _ = writeln!(out, "basalt_migration_downtime_seconds_bucket{{le=\"+Inf\"}} {}", s.downtime_count);
    let _ = writeln!(out, "basalt_migration_downtime_seconds_sum {}", s.downtime_sum_ms as f64 / 1000.0);
    let _ = writeln!(out, "basalt_migration_downtime_seconds_count {}", s.downtime_count);
    out.push_str(&tail);
}

pub struct RpcTimer<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    start: Instant,
}

impl Drop for RpcTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .rpc_seconds
            .get_or_create(&MethodLabel { method: self.method.to_string() })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
