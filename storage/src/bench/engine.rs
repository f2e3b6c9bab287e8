//! One job: a thread that keeps `queue_depth` requests in flight on its backend.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::cpu::CpuTime;
use super::report::Recorder;
use super::workload::Pattern;
use super::BenchError;
use crate::backend::{BlockBackend, BlockError, Completion, Op, Request};

/// SplitMix64: a full-period 64-bit generator that is fast, statistically good
/// for picking offsets, and repeatable from a seed without pulling in `rand`.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0) by multiply-high: no division, and the bias
    /// is below 2^-40 for any range a disk can have.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The data every benchmark write carries. Non-zero so that thin-provisioned
/// backends (RBD, sparse files) cannot short-cut it as zeroes, and with a
/// prime period so blocks do not look like trivially repeated sectors.
pub fn write_pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

/// What one job does, resolved from the workload before any thread starts.
#[derive(Debug, Clone)]
pub(crate) struct JobPlan {
    pub job: usize,
    pub pattern: Pattern,
    pub read_percent: u8,
    pub block_size: u32,
    pub queue_depth: usize,
    pub range_start: u64,
    /// Whole blocks in the range; at least 1.
    pub blocks: u64,
    /// Where a sequential job starts, so jobs sharing an image cover it
    /// instead of all re-reading the same (cached) blocks.
    pub first_block: u64,
    /// Measured requests this job submits under a total-bytes limit.
    pub budget: Option<u64>,
    pub runtime: Option<Duration>,
    pub ramp: Duration,
    pub completion_timeout: Duration,
    pub seed: u64,
}

pub(crate) struct JobOutput {
    pub read: Recorder,
    pub write: Recorder,
    pub measure_start: Instant,
    /// When the last measured request completed; `None` if none did.
    pub measure_end: Option<Instant>,
    /// CPU snapshot taken as the job left the ramp.
    pub cpu_start: Option<(Instant, CpuTime)>,
}

pub(crate) struct JobFailure {
    /// When it happened, so the run reports the first failure across jobs.
    pub at: Instant,
    pub error: BenchError,
}

struct Pending {
    submitted: Instant,
    offset: u64,
    read: bool,
    measured: bool,
}

impl Pending {
    fn describe(&self, len: u32) -> String {
        let what = if self.read { "read" } else { "write" };
        format!("{what} of {len} bytes at offset {}", self.offset)
    }
}

/// Runs one job until its limit, then drains. Returns `Ok(None)` if the run was
/// abandoned before the start signal. Any failure raises `stop` so the other
/// jobs wind down instead of running their full course for a doomed report.
pub(crate) fn run_job(
    plan: &JobPlan,
    backend: &mut dyn BlockBackend,
    stop: &AtomicBool,
    go: mpsc::Receiver<()>,
) -> Result<Option<JobOutput>, JobFailure> {
    let r = job_loop(plan, backend, stop, go);
    if r.is_err() {
        stop.store(true, Ordering::Release);
    }
    r
}

fn job_loop(
    plan: &JobPlan,
    backend: &mut dyn BlockBackend,
    stop: &AtomicBool,
    go: mpsc::Receiver<()>,
) -> Result<Option<JobOutput>, JobFailure> {
    let job = plan.job;
    let fail = |error: BenchError| JobFailure { at: Instant::now(), error };
    let bs = plan.block_size;
    let qd = plan.queue_depth;

    // Everything that allocates happens before the start signal, so jobs
    // begin together and the ramp is not spent in setup.
    let mut read = Recorder::new().map_err(fail)?;
    let mut write = Recorder::new().map_err(fail)?;
    let pattern = write_pattern(bs as usize);
    let mut slots: Vec<Option<Pending>> = (0..qd).map(|_| None).collect();
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut done: Vec<Completion> = Vec::with_capacity(qd);
    let mut rng = SplitMix64::new(plan.seed ^ (job as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut next_block = plan.first_block % plan.blocks;
    let fd = backend.completion_fd();

    if go.recv().is_err() {
        return Ok(None);
    }
    let t0 = Instant::now();
    // Validation caps durations far below Instant's range; the fallbacks only
    // keep this panic-free.
    let measure_start = t0.checked_add(plan.ramp).unwrap_or(t0);
    let deadline = plan.runtime.and_then(|r| measure_start.checked_add(r));

    let mut measuring = false;
    let mut cpu_start = None;
    let mut measured_submitted = 0u64;
    let mut submitting = true;
    let mut in_flight = 0usize;
    let mut last_progress = t0;
    let mut measure_end = None;
    let mut first_error: Option<(String, BlockError, Instant)> = None;
    let mut failed = 0u64;

    loop {
        while submitting && in_flight < qd {
            if stop.load(Ordering::Acquire) {
                submitting = false;
                break;
            }
            let now = Instant::now();
            if !measuring && now >= measure_start {
                measuring = true;
                cpu_start = CpuTime::process().ok().map(|c| (now, c));
            }
            if measuring {
                let out_of_time = deadline.is_some_and(|d| now >= d);
                let out_of_budget = plan.budget.is_some_and(|b| measured_submitted >= b);
                if out_of_time || out_of_budget {
                    submitting = false;
                    break;
                }
            }
            let is_read = match plan.read_percent {
                100 => true,
                0 => false,
                p => rng.below(100) < u64::from(p),
            };
            let block = match plan.pattern {
                Pattern::Sequential => {
                    let b = next_block;
                    next_block = if b + 1 >= plan.blocks { 0 } else { b + 1 };
                    b
                }
                Pattern::Random => rng.below(plan.blocks),
            };
            let offset = plan.range_start + block * u64::from(bs);
            let op = if is_read { Op::Read { offset, len: bs } } else { Op::Write { offset, data: pattern.clone() } };
            let Some(slot) = free.pop() else {
                // Unreachable while in_flight < qd; stop submitting rather than panic.
                break;
            };
            let pending = Pending { submitted: Instant::now(), offset, read: is_read, measured: measuring };
            if let Err(source) = backend.submit(Request { tag: slot as u64, op }) {
                return Err(fail(BenchError::Submit { job, op: pending.describe(bs), source }));
            }
            slots[slot] = Some(pending);
            in_flight += 1;
            if measuring {
                measured_submitted += 1;
            }
        }
        if in_flight == 0 {
            break;
        }

        // The timeout runs from the last completion, not from each poll, so
        // spurious wake-ups cannot stretch it.
        let now = Instant::now();
        let give_up = last_progress.checked_add(plan.completion_timeout).unwrap_or(now);
        let remaining = give_up.saturating_duration_since(now);
        if remaining.is_zero() {
            return Err(fail(BenchError::Timeout { job, in_flight, timeout: plan.completion_timeout }));
        }
        if !wait_readable(fd, remaining).map_err(|source| fail(BenchError::Poll { job, source }))? {
            continue;
        }
        backend.take_completions(&mut done);
        // One timestamp per batch: the moment this job learnt of the completions.
        let now = Instant::now();
        if !done.is_empty() {
            last_progress = now;
        }
        for c in done.drain(..) {
            let pending = usize::try_from(c.tag).ok().filter(|&s| s < qd).and_then(|s| slots[s].take().map(|p| (s, p)));
            let Some((slot, p)) = pending else {
                return Err(fail(BenchError::UnknownTag { job, tag: c.tag }));
            };
            free.push(slot);
            in_flight -= 1;
            match c.result {
                Ok(data) => {
                    if p.read && data.len() != bs as usize {
                        return Err(fail(BenchError::ShortRead {
                            job,
                            offset: p.offset,
                            expected: bs,
                            got: data.len(),
                        }));
                    }
                    if p.measured {
                        let rec = if p.read { &mut read } else { &mut write };
                        rec.record(now.saturating_duration_since(p.submitted), u64::from(bs));
                        measure_end = Some(now);
                    }
                }
                Err(source) => {
                    failed += 1;
                    if first_error.is_none() {
                        first_error = Some((p.describe(bs), source, now));
                        // Drain what is in flight to count the failures, but
                        // submit nothing more here or in the other jobs.
                        submitting = false;
                        stop.store(true, Ordering::Release);
                    }
                }
            }
        }
    }

    if let Some((op, source, at)) = first_error {
        return Err(JobFailure { at, error: BenchError::Io { job, op, source, failed } });
    }
    Ok(Some(JobOutput { read, write, measure_start, measure_end, cpu_start }))
}

/// Waits until `fd` is readable or `timeout` passes. `Ok(false)` covers both a
/// timeout and an interrupted wait; the caller re-checks its deadline.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    // Round up: a sub-millisecond remainder must not become a busy 0 ms poll.
    let ms = i32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid, exclusively borrowed pollfd; the count is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    // Without this a closed or broken fd would spin until the completion timeout.
    if pfd.revents & (libc::POLLNVAL | libc::POLLERR) != 0 {
        return Err(io::Error::other(format!("completion fd {fd} reported poll events {:#x}", pfd.revents)));
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_repeatable_and_below_stays_in_range() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let mut r = SplitMix64::new(42);
        assert_eq!(a, (0..8).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut r = SplitMix64::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let x = r.below(10);
            assert!(x < 10);
            seen[x as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_eq!(SplitMix64::new(1).below(1), 0);
    }

    #[test]
    fn the_write_pattern_has_no_zero_byte() {
        let p = write_pattern(4096);
        assert_eq!(p.len(), 4096);
        assert!(p.iter().all(|&b| b != 0));
        assert_ne!(p[..512], p[512..1024]);
    }
}
