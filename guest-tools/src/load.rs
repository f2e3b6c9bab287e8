//! `basalt-guest-load`: the guest side of the live-migration tests and
//! benchmark. It fills `--mib` MiB of its RAM with page-tagged values and
//! keeps verifying and rewriting them (at most `--rate-mib-s` MiB/s), counts
//! on its disk (block `i` holds `COUNT i`, checked empty before it is
//! written and read back after), and prints a heartbeat every second:
//!
//! `HB <n> mono_ms=<ms> count=<i> gen=<g> verify_errors=<e> disk_errors=<d>`
//!
//! Every mismatch is printed as `VERIFY-ERROR ...` or `DISK-ERROR ...`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static COUNT: AtomicU64 = AtomicU64::new(0);
static GEN: AtomicU64 = AtomicU64::new(0);
static VERIFY_ERRORS: AtomicU64 = AtomicU64::new(0);
static DISK_ERRORS: AtomicU64 = AtomicU64::new(0);

const PAGE_WORDS: usize = 4096 / 8;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.into())
}

fn tag(page: usize, gen: u64) -> u64 {
    ((page as u64) << 32) | (gen & 0xffff_ffff)
}

fn memory(mib: usize, rate_mib_s: f64) {
    let pages = mib << 8;
    let mut mem = vec![0u64; pages * PAGE_WORDS];
    for p in 0..pages {
        mem[p * PAGE_WORDS..(p + 1) * PAGE_WORDS].fill(tag(p, 0));
    }
    println!("LOAD-READY pages={pages}");
    let started = Instant::now();
    let mut written = 0f64;
    for gen in 1u64.. {
        GEN.store(gen, Ordering::Relaxed);
        for p in 0..pages {
            let page = &mut mem[p * PAGE_WORDS..(p + 1) * PAGE_WORDS];
            let want = tag(p, gen - 1);
            if let Some(bad) = page.iter().position(|&w| w != want) {
                VERIFY_ERRORS.fetch_add(1, Ordering::Relaxed);
                println!("VERIFY-ERROR page {p} word {bad}: {:#x}, expected {want:#x}", page[bad]);
            }
            page.fill(tag(p, gen));
            written += 4096.0;
            if rate_mib_s > 0.0 {
                let due = Duration::from_secs_f64(written / (rate_mib_s * 1048576.0));
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
    }
}

struct Block(*mut u8);

impl Block {
    fn new() -> Block {
        // SAFETY: a non-zero size and a power-of-two alignment.
        Block(unsafe { std::alloc::alloc_zeroed(std::alloc::Layout::from_size_align(4096, 4096).expect("layout")) })
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: 4096 bytes allocated in `new`, owned by this struct.
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}

fn disk(path: &str, every: Duration) {
    use std::os::unix::fs::FileExt;
    let f = match std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => f,
        Err(e) => {
            println!("DISK-ERROR open {path}: {e}");
            return;
        }
    };
    let blocks = f.metadata().map(|m| m.len()).unwrap_or(0) / 4096;
    let blocks = if blocks == 0 {
        // A block device's metadata says 0: ask the kernel.
        std::fs::read_to_string(format!("/sys/block/{}/size", path.trim_start_matches("/dev/")))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(0, |sectors| sectors / 8)
    } else {
        blocks
    };
    let mut b = Block::new();
    loop {
        let i = COUNT.load(Ordering::Relaxed) + 1;
        if i >= blocks {
            println!("DISK-FULL at {i}");
            return;
        }
        let at = i * 4096;
        let bad = |what: String| {
            DISK_ERRORS.fetch_add(1, Ordering::Relaxed);
            println!("DISK-ERROR {what}");
        };
        match f.read_exact_at(b.buf(), at) {
            Ok(()) if b.buf().iter().any(|&x| x != 0) => bad(format!("block {i} already written: count repeated")),
            Ok(()) => {}
            Err(e) => bad(format!("read block {i}: {e}")),
        }
        let line = format!("COUNT {i}\n");
        b.buf().fill(0);
        b.buf()[..line.len()].copy_from_slice(line.as_bytes());
        if let Err(e) = f.write_all_at(b.buf(), at) {
            bad(format!("write block {i}: {e}"));
        }
        b.buf().fill(0);
        match f.read_exact_at(b.buf(), at) {
            Ok(()) if &b.buf()[..line.len()] != line.as_bytes() => bad(format!("block {i} reads back wrong")),
            Ok(()) => {}
            Err(e) => bad(format!("read back block {i}: {e}")),
        }
        COUNT.store(i, Ordering::Relaxed);
        std::thread::sleep(every);
    }
}

fn main() {
    let mib: usize = arg("--mib", "64").parse().expect("--mib N");
    let rate: f64 = arg("--rate-mib-s", "8").parse().expect("--rate-mib-s R");
    let dev = arg("--disk", "");
    let disk_ms: u64 = arg("--disk-ms", "200").parse().expect("--disk-ms N");
    std::thread::spawn(move || memory(mib, rate));
    if !dev.is_empty() {
        std::thread::spawn(move || disk(&dev, Duration::from_millis(disk_ms)));
    }
    let start = Instant::now();
    for n in 1u64.. {
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "HB {n} mono_ms={} count={} gen={} verify_errors={} disk_errors={}",
            start.elapsed().as_millis(),
            COUNT.load(Ordering::Relaxed),
            GEN.load(Ordering::Relaxed),
            VERIFY_ERRORS.load(Ordering::Relaxed),
            DISK_ERRORS.load(Ordering::Relaxed)
        );
        let _ = std::io::stdout().flush();
    }
}
