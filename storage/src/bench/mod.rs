//! The I/O benchmark engine.
//!
//! A [`Workload`] (sequential or random; read, write or mixed; block size,
//! queue depth, jobs, runtime or total bytes, ramp) runs against any
//! [`BlockBackend`], so one workload measures a replicated RBD image, an
//! erasure-coded one and a local file alike. Each job is a thread that owns
//! one backend and keeps `queue_depth` requests in flight, waiting on the
//! backend's completion eventfd. The [`Report`] gives IOPS, MB/s and MiB/s,
//! latency percentiles from an HDR histogram and process CPU per request, as
//! text ([`std::fmt::Display`]) and JSON ([`Report::to_json`]).

mod cpu;
mod engine;
mod report;
mod workload;

#[cfg(test)]
mod tests;

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

pub use cpu::{cpu_us_per_op, CpuTime};
pub use engine::write_pattern;
pub use report::{CpuStats, DirectionStats, LatencyStats, Report};
pub use workload::{
    Limit, Mix, Pattern, Workload, WorkloadError, MAX_BLOCK_SIZE, MAX_DURATION, MAX_IN_FLIGHT_BYTES, MAX_JOBS,
    MAX_QUEUE_DEPTH, SECTOR,
};

use crate::backend::{BlockBackend, BlockError};
use engine::{run_job, JobFailure, JobOutput, JobPlan};
use report::Recorder;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid workload: {0}")]
    Workload(#[from] WorkloadError),
    #[error("{jobs} jobs need one backend each, got {backends}")]
    BackendCount { jobs: u32, backends: usize },
    #[error("job {job}: the backend is read-only and the workload writes")]
    ReadOnly { job: usize },
    #[error(
        "job {job}: block size {block_size} and range offset {offset} must be multiples of the backend's {backend_block_size}-byte blocks"
    )]
    BackendBlockSize { job: usize, block_size: u32, offset: u64, backend_block_size: u32 },
    #[error("job {job}: the backend refused {op}: {source}")]
    Submit { job: usize, op: String, source: BlockError },
    #[error("job {job}: {op} failed: {source} ({failed} failed requests in all)")]
    Io { job: usize, op: String, source: BlockError, failed: u64 },
    #[error("job {job}: none of {in_flight} in-flight requests completed within {timeout:?}")]
    Timeout { job: usize, in_flight: usize, timeout: Duration },
    #[error("job {job}: the backend completed tag {tag}, which is not in flight")]
    UnknownTag { job: usize, tag: u64 },
    #[error("job {job}: read of {expected} bytes at offset {offset} returned {got} bytes")]
    ShortRead { job: usize, offset: u64, expected: u32, got: usize },
    #[error("job {job}: waiting for completions failed: {source}")]
    Poll { job: usize, source: io::Error },
    #[error("job {job} panicked")]
    Panicked { job: usize },
    #[error("cannot start the thread of job {job}: {source}")]
    Spawn { job: usize, source: io::Error },
    #[error("latency histogram: {0}")]
    Histogram(String),
}

/// Runs `workload` with one job per backend (`backends.len()` must equal
/// `workload.jobs`). Everything is validated before the first request; the
/// first failed request, a backend that stops completing, or a panicking job
/// fails the whole run.
pub fn run(workload: &Workload, backends: Vec<Box<dyn BlockBackend>>) -> Result<Report, BenchError> {
    let plans = plan(workload, &backends)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(plans.len());
    let mut starts = Vec::with_capacity(plans.len());
    for (plan, mut backend) in plans.into_iter().zip(backends) {
        let job = plan.job;
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let stop_job = Arc::clone(&stop);
        let spawned = thread::Builder::new().name(format!("bench-job-{job}")).spawn(move || {
            // A panicking backend must still stop the other jobs, and its
            // backend must outlive the measured phase like the others'.
            let r = catch_unwind(AssertUnwindSafe(|| run_job(&plan, &mut *backend, &stop_job, go_rx)));
            let r = r.unwrap_or_else(|_| {
                stop_job.store(true, std::sync::atomic::Ordering::Release);
                Err(JobFailure { at: Instant::now(), error: BenchError::Panicked { job } })
            });
            (backend, r)
        });
        match spawned {
            Ok(h) => {
                handles.push(h);
                starts.push(go_tx);
            }
            Err(source) => {
                // Dropping the senders releases the jobs already waiting.
                drop(starts);
                for h in handles {
                    let _ = h.join();
                }
                return Err(BenchError::Spawn { job, source });
            }
        }
    }
    for go in &starts {
        // A job that already failed its setup has hung up; join reports why.
        let _ = go.send(());
    }

    let mut outputs = Vec::with_capacity(handles.len());
    let mut failures = Vec::new();
    // Closing a backend (librbd flushes and tears down its messengers) is not
    // part of the measured cost, so backends are dropped after the CPU snapshot.
    let mut backends = Vec::with_capacity(handles.len());
    for (job, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok((backend, r)) => {
                backends.push(backend);
                match r {
                    Ok(Some(out)) => outputs.push(out),
                    Ok(None) => {}
                    Err(f) => failures.push(f),
                }
            }
            Err(_) => failures.push(JobFailure { at: Instant::now(), error: BenchError::Panicked { job } }),
        }
    }
    let cpu_end = CpuTime::process().ok();
    drop(backends);

    if let Some(err) = first_failure(failures) {
        return Err(err);
    }
    summarize(workload, outputs, cpu_end)
}

/// Checks the workload against every backend and splits it into jobs.
fn plan(w: &Workload, backends: &[Box<dyn BlockBackend>]) -> Result<Vec<JobPlan>, BenchError> {
    if w.jobs != 0 && backends.len() != w.jobs as usize {
        return Err(BenchError::BackendCount { jobs: w.jobs, backends: backends.len() });
    }
    // The range must fit the smallest device; then it fits them all.
    let size = backends.iter().map(|b| b.size()).min().unwrap_or(0);
    w.validate(size)?;
    let (range_start, length) = w.range(size)?;
    for (job, b) in backends.iter().enumerate() {
        if b.read_only() && w.mix.writes() {
            return Err(BenchError::ReadOnly { job });
        }
        let bbs = b.block_size();
        if bbs != 0 && (!w.block_size.is_multiple_of(bbs) || !range_start.is_multiple_of(u64::from(bbs))) {
            return Err(BenchError::BackendBlockSize {
                job,
                block_size: w.block_size,
                offset: range_start,
                backend_block_size: bbs,
            });
        }
    }
    let bs = u64::from(w.block_size);
    let blocks = length / bs;
    let jobs = u64::from(w.jobs);
    let total_ops = match w.limit {
        Limit::TotalBytes(b) => Some(b / bs),
        Limit::Runtime(_) => None,
    };
    let runtime = match w.limit {
        Limit::Runtime(d) => Some(d),
        Limit::TotalBytes(_) => None,
    };
    Ok((0..jobs)
        .map(|j| JobPlan {
            job: j as usize,
            pattern: w.pattern,
            read_percent: w.mix.read_percent(),
            block_size: w.block_size,
            queue_depth: w.queue_depth as usize,
            range_start,
            blocks,
            first_block: (u128::from(j) * u128::from(blocks) / u128::from(jobs)) as u64,
            // The remainder goes to the first jobs, so the total is exact.
            budget: total_ops.map(|t| t / jobs + u64::from(j < t % jobs)),
            runtime,
            ramp: w.ramp,
            completion_timeout: w.completion_timeout,
            seed: w.seed,
        })
        .collect())
}

/// The earliest failure, with the failed-request count summed over all jobs.
fn first_failure(failures: Vec<JobFailure>) -> Option<BenchError> {
    let total_failed: u64 = failures
        .iter()
        .map(|f| match f.error {
            BenchError::Io { failed, .. } => failed,
            _ => 0,
        })
        .sum();
    let first = failures.into_iter().min_by_key(|f| f.at)?;
    Some(match first.error {
        BenchError::Io { job, op, source, .. } => BenchError::Io { job, op, source, failed: total_failed },
        other => other,
    })
}

fn summarize(w: &Workload, outputs: Vec<JobOutput>, cpu_end: Option<CpuTime>) -> Result<Report, BenchError> {
    let mut read = Recorder::new()?;
    let mut write = Recorder::new()?;
    let mut total = Recorder::new()?;
    for o in &outputs {
        read.merge(&o.read)?;
        write.merge(&o.write)?;
        total.merge(&o.read)?;
        total.merge(&o.write)?;
    }
    let start = outputs.iter().map(|o| o.measure_start).min();
    let end = outputs.iter().filter_map(|o| o.measure_end).max();
    let elapsed = match (start, end) {
        (Some(s), Some(e)) => e.saturating_duration_since(s),
        _ => Duration::ZERO,
    };
    let cpu_start = outputs.iter().filter_map(|o| o.cpu_start).min_by_key(|(at, _)| *at).map(|(_, c)| c);
    let cpu = match (cpu_start, cpu_end) {
        (Some(s), Some(e)) => e.since(&s),
        _ => CpuTime::default(),
    };
    Ok(Report {
        workload: w.clone(),
        elapsed_s: elapsed.as_secs_f64(),
        read: read.summarize(elapsed),
        write: write.summarize(elapsed),
        total: total.summarize(elapsed),
        cpu: CpuStats::new(cpu, total.ops(), elapsed),
    })
}
