//! `basaltctl storage bench`: the storage crate's benchmark engine against
//! an RBD image (through librbd, as a VM's disk would be) or a local file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use basalt_storage::bench::{self, Limit, Mix, Pattern, Workload};
use basalt_storage::BlockBackend;
use clap::{Args, ValueEnum};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// RBD image to measure, `POOL/IMAGE`.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub image: Option<String>,
    /// A local file or block device to measure instead.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// ceph.conf (default: CEPH_CONF, then /etc/ceph/ceph.conf).
    #[arg(long, env = "CEPH_CONF")]
    pub conf: Option<PathBuf>,
    /// Ceph client id (without `client.`).
    #[arg(long, default_value = "admin")]
    pub id: String,
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Percent of reads for `--rw randrw` / `rw`.
    #[arg(long, default_value_t = 70)]
    pub rwmix_read: u8,
    /// Block size in bytes (k, m suffixes allowed: 4k, 4m).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    #[arg(long, default_value_t = 32)]
    pub iodepth: u32,
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10, conflicts_with = "size")]
    pub runtime: u64,
    /// Bytes to transfer instead of a runtime (k, m, g suffixes allowed).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 2)]
    pub ramp: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    Read,
    Write,
    /// Sequential mixed reads and writes.
    #[value(name = "rw")]
    Mixed,
    Randread,
    Randwrite,
    Randrw,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s.as_str(), 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (like 4096, 4k, 4m, 1g)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

impl BenchArgs {
    pub fn workload(&self) -> Result<Workload, String> {
        let (pattern, mix) = match self.rw {
            Rw::Read => (Pattern::Sequential, Mix::Read),
            Rw::Write => (Pattern::Sequential, Mix::Write),
            Rw::Mixed => (Pattern::Sequential, Mix::Mixed { read_percent: self.rwmix_read }),
            Rw::Randread => (Pattern::Random, Mix::Read),
            Rw::Randwrite => (Pattern::Random, Mix::Write),
            Rw::Randrw => (Pattern::Random, Mix::Mixed { read_percent: self.rwmix_read }),
        };
        let block_size = u32::try_from(self.bs).map_err(|_| format!("--bs {} is too large", self.bs))?;
        Ok(Workload {
            pattern,
            mix,
            block_size,
            queue_depth: self.iodepth,
            jobs: self.jobs,
            limit: match self.size {
                Some(b) => Limit::TotalBytes(b),
                None => Limit::Runtime(Duration::from_secs(self.runtime)),
            },
            ramp: Duration::from_secs(self.ramp),
            ..Workload::default()
        })
    }

    fn open(&self) -> Result<Vec<Box<dyn BlockBackend>>, String> {
        let ro = !matches!(self.rw, Rw::Write | Rw::Mixed | Rw::Randwrite | Rw::Randrw);
        let mut v: Vec<Box<dyn BlockBackend>> = Vec::new();
        if let Some(f) = &self.file {
            for _ in 0..self.jobs {
                let b = basalt_storage::FileBackend::open(f, ro).map_err(|e| format!("{}: {e}", f.display()))?;
                v.push(Box::new(b));
            }
            return Ok(v);
        }
        let spec = self.image.as_deref().unwrap_or_default();
        let Some((pool, image)) = spec.split_once('/') else {
            return Err(format!("--image {spec:?} must be POOL/IMAGE"));
        };
        self.open_rbd(pool, image, ro, &mut v)?;
        Ok(v)
    }

    #[cfg(feature = "rbd")]
    fn open_rbd(&self, pool: &str, image: &str, ro: bool, v: &mut Vec<Box<dyn BlockBackend>>) -> Result<(), String> {
        use basalt_storage::ceph::{ClientConfig, Cluster};
        let cfg = ClientConfig {
            conf: self.conf.clone(),
            id: self.id.clone(),
            keyring: self.keyring.clone(),
            options: vec![],
        }
        .option("rbd_cache", "false");
        let c = Cluster::connect(&cfg).map_err(|e| e.to_string())?;
        let io = c.ioctx(pool).map_err(|e| e.to_string())?;
        for _ in 0..self.jobs {
            v.push(Box::new(basalt_storage::RbdBackend::open(&io, image, false, ro).map_err(|e| e.to_string())?));
        }
        Ok(())
    }

    #[cfg(not(feature = "rbd"))]
    fn open_rbd(&self, _: &str, _: &str, _: bool, _: &mut Vec<Box<dyn BlockBackend>>) -> Result<(), String> {
        Err("this basaltctl was built without RBD support".into())
    }
}

/// Runs the benchmark; the report as text (with a progress bar on a
/// terminal meanwhile) or as JSON.
pub fn run(args: &BenchArgs, json: bool) -> Result<String, String> {
    let w = args.workload()?;
    let backends = args.open()?;
    let size = backends.iter().map(|b| b.size()).min().unwrap_or(0);
    w.validate(size).map_err(|e| e.to_string())?;
    let bar = (!json && matches!(w.limit, Limit::Runtime(_))).then(|| {
        let total = w.ramp + if let Limit::Runtime(d) = w.limit { d } else { Duration::ZERO };
        let pb = indicatif::ProgressBar::new(total.as_secs().max(1));
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} s")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message(format!("{} {}", w.pattern_name(), human(w.block_size)));
        pb
    });
    let start = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = bar.clone().map(|pb| {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                pb.set_position(start.elapsed().as_secs());
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    });
    let report = bench::run(&w, backends);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.join();
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let report = report.map_err(|e| e.to_string())?;
    Ok(if json { report.to_json() } else { report.to_string() })
}

fn human(b: u32) -> String {
    match b {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

trait PatternName {
    fn pattern_name(&self) -> String;
}

impl PatternName for Workload {
    fn pattern_name(&self) -> String {
        let p = match self.pattern {
            Pattern::Sequential => "seq",
            Pattern::Random => "rand",
        };
        let m = match self.mix {
            Mix::Read => "read".to_string(),
            Mix::Write => "write".to_string(),
            Mix::Mixed { read_percent } => format!("rw {read_percent}% read"),
        };
        format!("{p} {m} QD{}", self.queue_depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_bad_ones_are_refused() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("99999999999g").is_err());
    }
}
