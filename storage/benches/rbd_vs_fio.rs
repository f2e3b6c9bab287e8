//! Storage benchmark (not a test): Basalt's I/O engine over `RbdBackend`
//! against fio's rbd engine, same image, same workload, same run, librbd's
//! cache off on both sides. Prints a markdown table of IOPS, MiB/s, p99
//! latency, CPU per request and the ratio Basalt/fio.
//!
//! Needs the dev Ceph (`deploy/ceph-dev/up`) and fio (`deploy/install-deps`).
//!   cargo bench -p basalt-storage --bench rbd_vs_fio
//! Env: BENCH_RUNTIME (seconds per run, default 6), BENCH_REPEAT (3),
//! BENCH_IMAGE_MIB (256), BENCH_ONLY (run only cases whose "image workload"
//! contains this text, e.g. "EC 2+1 data pool 4K randwrite QD32"). Each case runs BENCH_REPEAT times per tool,
//! alternating which tool goes first; the table shows medians, because a
//! shared 2-core machine makes single runs vary by tens of percent.

use std::process::Command;
use std::time::Duration;

use basalt_storage::bench::{self, Limit, Mix, Pattern, Workload};
use basalt_storage::ceph::{ClientConfig, Cluster};
use basalt_storage::rbd::{self, ImageOptions, RbdBackend};
use basalt_storage::BlockBackend;

struct Case {
    name: &'static str,
    pattern: Pattern,
    mix: Mix,
    bs: u32,
    qd: u32,
}

struct Result_ {
    iops: f64,
    mib_s: f64,
    p99_us: f64,
    cpu_us_per_op: f64,
}

/// The run with the median IOPS (its other figures come with it).
fn median(v: &[Result_]) -> &Result_ {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*a].iops.total_cmp(&v[*b].iops));
    &v[idx[idx.len() / 2]]
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn ceph_dir() -> String {
    std::env::var("BASALT_CEPH_DIR").unwrap_or_else(|_| "/tmp/basalt-ceph".into())
}

fn basalt(c: &Cluster, image: &str, case: &Case, runtime: u64) -> Result<Result_, String> {
    let io = c.ioctx("rbd").map_err(|e| e.to_string())?;
    let b = RbdBackend::open(&io, image, false, false).map_err(|e| e.to_string())?;
    let w = Workload {
        pattern: case.pattern,
        mix: case.mix,
        block_size: case.bs,
        queue_depth: case.qd,
        jobs: 1,
        limit: Limit::Runtime(Duration::from_secs(runtime)),
        ramp: Duration::from_secs(2),
        ..Workload::default()
    };
    let boxed: Vec<Box<dyn BlockBackend>> = vec![Box::new(b)];
    let r = bench::run(&w, boxed).map_err(|e| e.to_string())?;
    Ok(Result_ {
        iops: r.total.iops,
        mib_s: r.total.mib_s,
        p99_us: r.total.latency_us.p99,
        cpu_us_per_op: r.cpu.us_per_op,
    })
}

fn fio(image: &str, case: &Case, runtime: u64) -> Result<Result_, String> {
    let rw = match (case.pattern, case.mix) {
        (Pattern::Random, Mix::Read) => "randread",
        (Pattern::Random, Mix::Write) => "randwrite",
        (Pattern::Sequential, Mix::Read) => "read",
        (Pattern::Sequential, Mix::Write) => "write",
        _ => return Err("mixed workloads are not in this benchmark".into()),
    };
    let dir = ceph_dir();
    let cpu0 = children_cpu();
    let out = Command::new("fio")
        .env("CEPH_CONF", format!("{dir}/ceph.conf"))
        .env("CEPH_ARGS", "--rbd_cache=false")
        .args(["--name=b", "--ioengine=rbd", "--clientname=admin", "--pool=rbd", &format!("--rbdname={image}")])
        .args([&format!("--rw={rw}"), &format!("--bs={}", case.bs), &format!("--iodepth={}", case.qd)])
        .args(["--numjobs=1", "--time_based", &format!("--runtime={runtime}"), "--ramp_time=2", "--output-format=json"])
        .output()
        .map_err(|e| format!("run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("fio json: {e}"))?;
    let job = &v["jobs"][0];
    let dir_ = if rw.contains("read") { &job["read"] } else { &job["write"] };
    let iops = dir_["iops"].as_f64().unwrap_or(0.0);
    let bw_kib = dir_["bw"].as_f64().unwrap_or(0.0);
    let p99_ns = dir_["clat_ns"]["percentile"]["99.000000"].as_f64().unwrap_or(0.0);
    // fio's own usr_cpu/sys_cpu count only its submitting thread (RUSAGE_THREAD),
    // not librbd's threads; our engine counts the whole process. So measure
    // fio whole, as a child, and charge the measured share to its ops.
    let cpu = children_cpu() - cpu0;
    let ops = dir_["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
    let runtime_s = job["job_runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    let share = runtime_s / (runtime_s + 2.0);
    Ok(Result_ { iops, mib_s: bw_kib / 1024.0, p99_us: p99_ns / 1000.0, cpu_us_per_op: cpu * share / ops * 1e6 })
}

/// CPU seconds (user + system) of all waited-for children so far.
fn children_cpu() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    // SAFETY: zero-initialised and filled by getrusage.
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches probes with --list
    }
    let runtime = env_u64("BENCH_RUNTIME", 6);
    let repeat = env_u64("BENCH_REPEAT", 3).max(1);
    let size = env_u64("BENCH_IMAGE_MIB", 256) << 20;
    let dir = ceph_dir();
    let cfg = ClientConfig {
        conf: Some(format!("{dir}/ceph.conf").into()),
        keyring: Some(format!("{dir}/ceph.client.admin.keyring").into()),
        ..ClientConfig::default()
    }
    .option("rbd_cache", "false");
    let c = Cluster::connect(&cfg).unwrap_or_else(|e| panic!("dev Ceph (deploy/ceph-dev/up): {e}"));
    let io = c.ioctx("rbd").expect("pool rbd");
    let cases = [
        Case { name: "4K randread QD1", pattern: Pattern::Random, mix: Mix::Read, bs: 4096, qd: 1 },
        Case { name: "4K randread QD16", pattern: Pattern::Random, mix: Mix::Read, bs: 4096, qd: 16 },
        Case { name: "4K randread QD32", pattern: Pattern::Random, mix: Mix::Read, bs: 4096, qd: 32 },
        Case { name: "4K randwrite QD1", pattern: Pattern::Random, mix: Mix::Write, bs: 4096, qd: 1 },
        Case { name: "4K randwrite QD16", pattern: Pattern::Random, mix: Mix::Write, bs: 4096, qd: 16 },
        Case { name: "4K randwrite QD32", pattern: Pattern::Random, mix: Mix::Write, bs: 4096, qd: 32 },
        Case { name: "4M seq read QD4", pattern: Pattern::Sequential, mix: Mix::Read, bs: 4 << 20, qd: 4 },
        Case { name: "4M seq write QD4", pattern: Pattern::Sequential, mix: Mix::Write, bs: 4 << 20, qd: 4 },
    ];
    println!("| image | workload | Basalt IOPS | fio IOPS | ratio | Basalt MiB/s | fio MiB/s | Basalt p99 µs | fio p99 µs | Basalt CPU µs/op | fio CPU µs/op |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let kinds = [
        ("replicated", ImageOptions::default()),
        ("EC 2+1 data pool", ImageOptions { data_pool: Some("rbd-ec".into()), ..Default::default() }),
    ];
    for (kind, opts) in
        kinds.into_iter().filter(|(k, _)| cases.iter().any(|c| format!("{k} {}", c.name).contains(&only)))
    {
        let image = format!("bench-{}-{}", kind.split(' ').next().unwrap_or("x"), std::process::id());
        rbd::create(&io, &image, size, &opts).expect("create bench image");
        // Reads of never-written objects cost nothing in Ceph: fill the image first.
        let fill = Case { name: "fill", pattern: Pattern::Sequential, mix: Mix::Write, bs: 4 << 20, qd: 8 };
        let fill_w = Workload {
            pattern: fill.pattern,
            mix: fill.mix,
            block_size: fill.bs,
            queue_depth: fill.qd,
            limit: Limit::TotalBytes(size),
            ..Workload::default()
        };
        let b: Vec<Box<dyn BlockBackend>> = vec![Box::new(RbdBackend::open(&io, &image, false, false).expect("open"))];
        bench::run(&fill_w, b).expect("fill image");
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        for case in cases.iter().filter(|c| format!("{kind} {}", c.name).contains(&only)) {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let mut err = None;
            for r in 0..repeat {
                let run_ours = || basalt(&c, &image, case, runtime);
                let run_fio = || fio(&image, case, runtime);
                let (o, f) = if r % 2 == 0 {
                    let o = run_ours();
                    (o, run_fio())
                } else {
                    let f = run_fio();
                    (run_ours(), f)
                };
                match (o, f) {
                    (Ok(o), Ok(f)) => {
                        ours.push(o);
                        theirs.push(f);
                    }
                    (o, f) => err = Some(format!("{:?} / {:?}", o.err(), f.err())),
                }
            }
            if let Some(e) = err {
                println!("| {kind} | {} | error: {e} |", case.name);
                continue;
            }
            let (o, f) = (median(&ours), median(&theirs));
            println!(
                "| {kind} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |",
                case.name,
                o.iops,
                f.iops,
                o.iops / f.iops.max(1e-9),
                o.mib_s,
                f.mib_s,
                o.p99_us,
                f.p99_us,
                o.cpu_us_per_op,
                f.cpu_us_per_op
            );
        }
        rbd::remove(&io, &image).expect("remove bench image");
    }
}
