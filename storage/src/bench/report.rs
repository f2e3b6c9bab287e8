//! Results of a run: throughput, latency percentiles and CPU cost, as text and JSON.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::cpu::{cpu_us_per_op, CpuTime};
use super::workload::Workload;
use super::BenchError;

/// An hour in nanoseconds: a request slower than that has already failed the
/// completion timeout; slower values are clamped, the exact max is kept aside.
const HIST_MAX_NS: u64 = 3_600_000_000_000;
/// 0.1% resolution: p99.9 of a 100 µs distribution stays distinguishable.
const HIST_SIGFIG: u8 = 3;

/// Latencies and volume of one direction (reads or writes) of one job.
pub(crate) struct Recorder {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    // The histogram rounds to bucket edges; mean and max are kept exactly.
    sum_ns: u128,
    max_ns: u64,
}

impl Recorder {
    pub(crate) fn new() -> Result<Self, BenchError> {
        let hist = Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG)
            .map_err(|e| BenchError::Histogram(e.to_string()))?;
        Ok(Recorder { hist, ops: 0, bytes: 0, sum_ns: 0, max_ns: 0 })
    }

    pub(crate) fn record(&mut self, latency: Duration, bytes: u64) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns);
        self.ops += 1;
        self.bytes += bytes;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub(crate) fn merge(&mut self, other: &Recorder) -> Result<(), BenchError> {
        self.hist.add(&other.hist).map_err(|e| BenchError::Histogram(e.to_string()))?;
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
        Ok(())
    }

    pub(crate) fn ops(&self) -> u64 {
        self.ops
    }

    pub(crate) fn summarize(&self, elapsed: Duration) -> DirectionStats {
        let secs = elapsed.as_secs_f64();
        let per_sec = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let us = |ns: u64| ns as f64 / 1e3;
        // Percentiles come from bucket upper edges and can overshoot the exact
        // max by the histogram's resolution; clamping keeps p99 <= max.
        let pct = |q: f64| us(self.hist.value_at_quantile(q).min(self.max_ns));
        let (mean, p50, p90, p99, p99_9, max) = if self.ops == 0 {
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        } else {
            (self.sum_ns as f64 / self.ops as f64 / 1e3, pct(0.5), pct(0.9), pct(0.99), pct(0.999), us(self.max_ns))
        };
        DirectionStats {
            ops: self.ops,
            bytes: self.bytes,
            iops: per_sec(self.ops as f64),
            mb_s: per_sec(self.bytes as f64) / 1e6,
            mib_s: per_sec(self.bytes as f64) / (1u64 << 20) as f64,
            latency_us: LatencyStats { mean, p50, p90, p99, p99_9, max },
        }
    }
}

/// Submit-to-completion latency in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyStats {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DirectionStats {
    pub ops: u64,
    pub bytes: u64,
    pub iops: f64,
    /// 10^6 bytes per second, as storage vendors quote.
    pub mb_s: f64,
    /// 2^20 bytes per second, as the kernel and fio's default quote.
    pub mib_s: f64,
    pub latency_us: LatencyStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuStats {
    pub user_s: f64,
    pub system_s: f64,
    /// Process CPU (user + system) per measured request.
    pub us_per_op: f64,
    /// Cores kept busy on average during the measured phase.
    pub cores: f64,
}

impl CpuStats {
    pub fn new(cpu: CpuTime, ops: u64, elapsed: Duration) -> CpuStats {
        let secs = elapsed.as_secs_f64();
        CpuStats {
            user_s: cpu.user.as_secs_f64(),
            system_s: cpu.system.as_secs_f64(),
            us_per_op: cpu_us_per_op(cpu.total(), ops),
            cores: if secs > 0.0 { cpu.total().as_secs_f64() / secs } else { 0.0 },
        }
    }
}

/// Everything measured after the ramp. Every rate uses the same elapsed time:
/// from the end of the ramp to the last measured completion across all jobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub elapsed_s: f64,
    pub read: DirectionStats,
    pub write: DirectionStats,
    pub total: DirectionStats,
    pub cpu: CpuStats,
}

impl Report {
    /// Pretty-printed JSON of the whole report.
    pub fn to_json(&self) -> String {
        // Only f64, integers and strings below: serialization cannot fail, but
        // a report must never panic, so a failure still produces valid JSON.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.workload)?;
        writeln!(
            f,
            "{:<6} {:>10} {:>11} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "", "ops", "IOPS", "MB/s", "MiB/s", "mean µs", "p50", "p90", "p99", "p99.9", "max"
        )?;
        let rows = [("read", &self.read), ("write", &self.write), ("total", &self.total)];
        let mixed = self.read.ops > 0 && self.write.ops > 0;
        for (name, d) in rows {
            // One direction alone makes its row and the total identical.
            if d.ops == 0 || (name == "total" && !mixed) {
                continue;
            }
            let l = &d.latency_us;
            writeln!(
                f,
                "{name:<6} {:>10} {:>11.1} {:>9.2} {:>9.2} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                d.ops, d.iops, d.mb_s, d.mib_s, l.mean, l.p50, l.p90, l.p99, l.p99_9, l.max
            )?;
        }
        write!(
            f,
            "elapsed {:.3}s, cpu {:.2} µs/op ({:.2} cores: user {:.3}s, sys {:.3}s)",
            self.elapsed_s, self.cpu.us_per_op, self.cpu.cores, self.cpu.user_s, self.cpu.system_s
        )
    }
}
