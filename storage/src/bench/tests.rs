//! End-to-end runs of the engine against the real file backend and small fakes.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::backend::{Completion, Request};
use crate::FileBackend;

const MIB: u64 = 1 << 20;

fn temp_file(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().set_len(size).expect("set_len");
    f
}

fn file_backends(f: &tempfile::NamedTempFile, n: usize) -> Vec<Box<dyn BlockBackend>> {
    (0..n).map(|_| Box::new(FileBackend::open(f.path(), false).expect("open")) as Box<dyn BlockBackend>).collect()
}

fn assert_ordered(l: &LatencyStats) {
    assert!(l.p50 > 0.0, "{l:?}");
    assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p99_9 && l.p99_9 <= l.max, "{l:?}");
    assert!(l.mean > 0.0 && l.mean <= l.max, "{l:?}");
}

#[test]
fn a_total_bytes_write_does_exactly_its_ops_and_leaves_the_pattern() {
    let f = temp_file(MIB);
    let w = Workload {
        pattern: Pattern::Sequential,
        mix: Mix::Write,
        queue_depth: 8,
        jobs: 2,
        limit: Limit::TotalBytes(MIB),
        ..Workload::default()
    };
    let r = run(&w, file_backends(&f, 2)).expect("run");
    assert_eq!(r.write.ops, 256);
    assert_eq!(r.write.bytes, MIB);
    assert_eq!(r.read.ops, 0);
    assert_eq!(r.total.ops, 256);
    assert_ordered(&r.write.latency_us);
    // Two jobs each start on their own half, so together they cover the file once.
    let data = std::fs::read(f.path()).expect("read file");
    let pattern = write_pattern(4096);
    for (i, block) in data.chunks(4096).enumerate() {
        assert!(block == &pattern[..], "block {i} does not hold the write pattern");
    }
}

#[test]
fn total_bytes_rounds_down_to_whole_blocks_and_excludes_the_ramp() {
    let f = temp_file(MIB);
    let w = Workload {
        mix: Mix::Write,
        limit: Limit::TotalBytes(10 * 4096 + 100),
        ramp: Duration::from_millis(100),
        ..Workload::default()
    };
    let started = Instant::now();
    let r = run(&w, file_backends(&f, 1)).expect("run");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(r.write.ops, 10);
    assert!(r.elapsed_s < 0.1, "the ramp is not part of the measured time: {}", r.elapsed_s);
}

#[test]
fn a_random_read_run_reports_throughput_and_ordered_percentiles() {
    let f = temp_file(4 * MIB);
    std::fs::write(f.path(), vec![7u8; 4 * MIB as usize]).expect("fill");
    let w = Workload {
        pattern: Pattern::Random,
        mix: Mix::Read,
        queue_depth: 4,
        limit: Limit::Runtime(Duration::from_millis(200)),
        ..Workload::default()
    };
    let r = run(&w, file_backends(&f, 1)).expect("run");
    assert!(r.read.ops > 0 && r.read.iops > 0.0, "{r}");
    assert_eq!(r.read.bytes, r.read.ops * 4096);
    assert_eq!(r.write.ops, 0);
    assert!(r.elapsed_s >= 0.19 && r.elapsed_s < 2.0, "{}", r.elapsed_s);
    assert!((r.read.mb_s / r.read.mib_s - 1.048576).abs() < 1e-9);
    assert!((r.read.iops - r.read.ops as f64 / r.elapsed_s).abs() < 1e-6 * r.read.iops);
    assert_ordered(&r.read.latency_us);
    assert_eq!(r.total.ops, r.read.ops);
    assert!(r.cpu.us_per_op > 0.0, "{:?}", r.cpu);
}

#[test]
fn a_mixed_run_honours_the_read_ratio_and_stays_in_its_range() {
    let f = temp_file(4 * MIB);
    let w = Workload {
        pattern: Pattern::Random,
        mix: Mix::Mixed { read_percent: 70 },
        block_size: 512,
        queue_depth: 16,
        limit: Limit::TotalBytes(4000 * 512),
        offset: MIB,
        length: Some(MIB),
        seed: 1234,
        ..Workload::default()
    };
    let r = run(&w, file_backends(&f, 1)).expect("run");
    assert_eq!(r.total.ops, 4000);
    let ratio = r.read.ops as f64 / r.total.ops as f64;
    assert!((0.67..=0.73).contains(&ratio), "read ratio {ratio}");
    assert_ordered(&r.read.latency_us);
    assert_ordered(&r.write.latency_us);
    let data = std::fs::read(f.path()).expect("read file");
    let (m, e) = (MIB as usize, 2 * MIB as usize);
    assert!(data[..m].iter().chain(&data[e..]).all(|&b| b == 0), "writes outside the range");
    assert!(data[m..e].iter().any(|&b| b != 0), "no writes inside the range");
    // Same seed, same sequence of requests.
    let again = run(&w, file_backends(&f, 1)).expect("run");
    assert_eq!(again.read.ops, r.read.ops);
}

#[test]
fn sequential_offsets_wrap_within_the_range() {
    let f = temp_file(MIB);
    let w = Workload {
        pattern: Pattern::Sequential,
        mix: Mix::Write,
        limit: Limit::TotalBytes(10 * 4096),
        offset: 8192,
        length: Some(3 * 4096 + 100),
        ..Workload::default()
    };
    let r = run(&w, file_backends(&f, 1)).expect("run");
    assert_eq!(r.write.ops, 10);
    let data = std::fs::read(f.path()).expect("read file");
    assert!(data[..8192].iter().all(|&b| b == 0));
    assert!(data[8192..8192 + 3 * 4096].chunks(4096).all(|b| b == &write_pattern(4096)[..]));
    assert!(data[8192 + 3 * 4096..].iter().all(|&b| b == 0), "the partial tail block is never touched");
}

#[test]
fn bad_workloads_are_refused_before_any_io() {
    let f = temp_file(MIB);
    let w = Workload { mix: Mix::Write, limit: Limit::TotalBytes(MIB), ..Workload::default() };
    let cases: Vec<(Workload, usize)> = vec![
        (Workload { block_size: 0, ..w.clone() }, 1),
        (Workload { block_size: 1000, ..w.clone() }, 1),
        (Workload { queue_depth: 0, ..w.clone() }, 1),
        (Workload { queue_depth: 2000, ..w.clone() }, 1),
        (Workload { jobs: 0, ..w.clone() }, 0),
        (Workload { mix: Mix::Mixed { read_percent: 150 }, ..w.clone() }, 1),
        (Workload { offset: 2 * MIB, ..w.clone() }, 1),
        (Workload { length: Some(2 * MIB), ..w.clone() }, 1),
        (Workload { length: Some(1024), ..w.clone() }, 1),
    ];
    for (bad, n) in cases {
        let err = run(&bad, file_backends(&f, n)).expect_err("refused");
        assert!(matches!(err, BenchError::Workload(_)), "{err}");
    }
    let err = run(&Workload { jobs: 2, ..w.clone() }, file_backends(&f, 1)).expect_err("refused");
    assert!(matches!(err, BenchError::BackendCount { jobs: 2, backends: 1 }), "{err}");
    let ro: Vec<Box<dyn BlockBackend>> = vec![Box::new(FileBackend::open(f.path(), true).expect("open"))];
    let err = run(&w, ro).expect_err("refused");
    assert!(matches!(err, BenchError::ReadOnly { job: 0 }), "{err}");
    assert_eq!(err.to_string(), "job 0: the backend is read-only and the workload writes");
    let big = FakeBackend::new(MIB, Behaviour::Complete { block_size: 4096 });
    let err = run(&Workload { block_size: 512, ..w.clone() }, vec![Box::new(big)]).expect_err("refused");
    assert!(matches!(err, BenchError::BackendBlockSize { backend_block_size: 4096, .. }), "{err}");
    assert!(std::fs::read(f.path()).expect("read file").iter().all(|&b| b == 0), "no byte was written");
}

#[test]
fn failed_completions_abort_naming_the_first_and_the_count() {
    let f = temp_file(MIB);
    let b = file_backends(&f, 1);
    // The backend still believes the file is 1 MiB: every read now hits EOF.
    f.as_file().set_len(0).expect("truncate");
    let w = Workload { pattern: Pattern::Sequential, queue_depth: 4, ..Workload::default() };
    let err = run(&w, b).expect_err("must fail");
    match &err {
        BenchError::Io { job: 0, op, failed: 4, .. } => assert_eq!(op, "read of 4096 bytes at offset 0"),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("(4 failed requests in all)"), "{err}");
}

#[test]
fn a_backend_that_never_completes_times_out_instead_of_hanging() {
    let w = Workload {
        queue_depth: 4,
        completion_timeout: Duration::from_millis(50),
        limit: Limit::Runtime(Duration::from_secs(60)),
        ..Workload::default()
    };
    let started = Instant::now();
    let err = run(&w, vec![Box::new(FakeBackend::new(MIB, Behaviour::Never))]).expect_err("must time out");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, BenchError::Timeout { job: 0, in_flight: 4, timeout } if timeout == Duration::from_millis(50)),
        "{err}"
    );
}

#[test]
fn one_stuck_job_stops_the_others() {
    let f = temp_file(MIB);
    let w = Workload {
        jobs: 2,
        completion_timeout: Duration::from_millis(50),
        limit: Limit::Runtime(Duration::from_secs(60)),
        ..Workload::default()
    };
    let mut backends = file_backends(&f, 1);
    backends.push(Box::new(FakeBackend::new(MIB, Behaviour::Never)));
    let started = Instant::now();
    let err = run(&w, backends).expect_err("must time out");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, BenchError::Timeout { job: 1, .. }), "{err}");
}

#[test]
fn a_backend_that_submits_with_an_error_or_panics_fails_the_run() {
    let w = Workload { limit: Limit::Runtime(Duration::from_secs(60)), ..Workload::default() };
    let err = run(&w, vec![Box::new(FakeBackend::new(MIB, Behaviour::Refuse))]).expect_err("refused");
    assert!(matches!(err, BenchError::Submit { job: 0, .. }), "{err}");
    let err = run(&w, vec![Box::new(FakeBackend::new(MIB, Behaviour::Panic))]).expect_err("panicked");
    assert!(matches!(err, BenchError::Panicked { job: 0 }), "{err}");
    let err = run(&w, vec![Box::new(FakeBackend::new(MIB, Behaviour::WrongTag))]).expect_err("bad tag");
    assert!(matches!(err, BenchError::UnknownTag { job: 0, tag: 999 }), "{err}");
}

#[test]
fn the_json_report_parses_back_with_every_field() {
    let f = temp_file(MIB);
    let w =
        Workload { mix: Mix::Mixed { read_percent: 50 }, limit: Limit::TotalBytes(64 * 4096), ..Workload::default() };
    let r = run(&w, file_backends(&f, 1)).expect("run");
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("valid JSON");
    assert_eq!(v["workload"]["block_size"], 4096);
    assert_eq!(v["workload"]["mix"]["mixed"]["read_percent"], 50);
    assert_eq!(v["workload"]["limit"]["total_bytes"], 64 * 4096);
    assert_eq!(v["total"]["ops"], 64);
    assert!(v["elapsed_s"].as_f64().is_some_and(|e| e > 0.0));
    for dir in ["read", "write", "total"] {
        for k in ["ops", "bytes", "iops", "mb_s", "mib_s"] {
            assert!(v[dir][k].is_number(), "{dir}.{k} in {v}");
        }
        for k in ["mean", "p50", "p90", "p99", "p99_9", "max"] {
            assert!(v[dir]["latency_us"][k].is_number(), "{dir}.latency_us.{k} in {v}");
        }
    }
    for k in ["user_s", "system_s", "us_per_op", "cores"] {
        assert!(v["cpu"][k].is_number(), "cpu.{k} in {v}");
    }
    let back: Workload = serde_json::from_value(v["workload"].clone()).expect("workload parses back");
    assert_eq!(back, w);
    let text = r.to_string();
    for needle in ["rand mixed 50% read", "IOPS", "MiB/s", "p99.9", "read ", "write ", "total ", "µs/op"] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
}

enum Behaviour {
    /// Completes every request successfully with the given logical block size.
    Complete {
        block_size: u32,
    },
    /// Accepts requests and never completes them: a wedged cluster.
    Never,
    /// Refuses every submission.
    Refuse,
    Panic,
    /// Completes with a tag that was never submitted.
    WrongTag,
}

struct FakeBackend {
    size: u64,
    behaviour: Behaviour,
    done: Vec<Completion>,
    evt: EventFd,
}

impl FakeBackend {
    fn new(size: u64, behaviour: Behaviour) -> Self {
        FakeBackend { size, behaviour, done: Vec::new(), evt: EventFd::new(EFD_NONBLOCK).expect("eventfd") }
    }
}

impl BlockBackend for FakeBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        match self.behaviour {
            Behaviour::Complete { block_size } => block_size,
            _ => 512,
        }
    }

    fn read_only(&self) -> bool {
        false
    }

    fn submit(&mut self, req: Request) -> Result<(), BlockError> {
        match self.behaviour {
            Behaviour::Never => return Ok(()),
            Behaviour::Refuse => return Err(BlockError::ReadOnly),
            Behaviour::Panic => panic!("fake backend panics on submit"),
            Behaviour::WrongTag => self.done.push(Completion { tag: 999, result: Ok(Vec::new()) }),
            Behaviour::Complete { .. } => self.done.push(Completion { tag: req.tag, result: Ok(Vec::new()) }),
        }
        self.evt.write(1).map_err(|e| BlockError::io("eventfd", &e))
    }

    fn completion_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        let _ = self.evt.read();
        out.append(&mut self.done);
    }
}
