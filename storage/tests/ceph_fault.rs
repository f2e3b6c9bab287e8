//! I/O keeps working while one OSD is killed (pools have min_size 2) and
//! after it returns. Kills osd.1 by its pid file and restarts it with
//! `deploy/ceph-dev/up`, as an operator would.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_storage::rbd::{self, ImageOptions, RbdBackend};
use basalt_storage::{BlockBackend, Op, Request};
use common::{ceph_dir, unique, vm, wait_completions};

const BLOCK: usize = 64 * 1024;
const SLOTS: u64 = 256;

fn block(gen: u64, slot: u64) -> Vec<u8> {
    let mut v = vec![(gen as u8) ^ (slot as u8); BLOCK];
    v[..16].copy_from_slice(&[gen.to_le_bytes(), slot.to_le_bytes()].concat());
    v
}

/// Writes generation after generation over SLOTS blocks, 16 in flight,
/// until told to stop; returns (generations completed, failed requests).
fn writer(mut b: RbdBackend, stop: Arc<AtomicBool>) -> (RbdBackend, u64, u64) {
    let (mut gen, mut failed) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        gen += 1;
        for chunk in (0..SLOTS).collect::<Vec<_>>().chunks(16) {
            for &slot in chunk {
                let op = Op::Write { offset: slot * BLOCK as u64, data: block(gen, slot) };
                b.submit(Request { tag: slot, op }).expect("submit");
            }
            let done = wait_completions(&mut b, chunk.len(), Duration::from_secs(120));
            failed += done.iter().filter(|c| c.result.is_err()).count() as u64;
        }
    }
    (b, gen, failed)
}

fn up_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ceph-dev/up")
}

#[test]
fn io_continues_while_an_osd_is_down_and_after_it_returns() {
    let c = vm();
    let io = c.ioctx("rbd").expect("pool");
    let mut backends = Vec::new();
    let mut names = Vec::new();
    for (prefix, opts) in [
        ("fault-rep", ImageOptions::default()),
        ("fault-ec", ImageOptions { data_pool: Some("rbd-ec".into()), ..Default::default() }),
    ] {
        let name = unique(prefix);
        rbd::create(&io, &name, SLOTS * BLOCK as u64, &opts).expect("create");
        backends.push(RbdBackend::open(&io, &name, true, false).expect("open"));
        names.push(name);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = backends
        .into_iter()
        .map(|b| {
            let s = stop.clone();
            std::thread::spawn(move || writer(b, s))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));

    let pidfile = ceph_dir().join("pids/osd.1.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile).expect("osd.1 pid file").trim().parse().expect("pid");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.contains("ceph-osd"), "pid {pid} from {} is not the OSD: {cmdline:?}", pidfile.display());
    // SAFETY: plain kill(2) of the OSD process this cluster started (checked above).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    std::thread::sleep(Duration::from_secs(15));

    let t = Instant::now();
    let st = Command::new("bash").arg(up_script()).status().expect("run deploy/ceph-dev/up");
    assert!(st.success(), "deploy/ceph-dev/up could not bring osd.1 back");
    eprintln!(
        "osd.1 back and all PGs clean {:?} after the restart began ({:?} after the kill)",
        t.elapsed(),
        killed_at.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);

    for (w, name) in workers.into_iter().zip(&names) {
        let (mut b, gens, failed) = w.join().expect("writer thread");
        assert_eq!(failed, 0, "{name}: writes failed while an OSD was down");
        assert!(gens >= 3, "{name}: only {gens} generations written: I/O stalled");
        // Every block holds the last generation written to it.
        for slot in 0..SLOTS {
            b.submit(Request { tag: slot, op: Op::Read { offset: slot * BLOCK as u64, len: BLOCK as u32 } })
                .expect("submit");
        }
        for c in wait_completions(&mut b, SLOTS as usize, Duration::from_secs(120)) {
            let data = c.result.expect("read");
            assert_eq!(data, block(gens, c.tag), "{name} slot {}", c.tag);
        }
        drop(b);
        rbd::remove(&io, name).expect("remove");
    }
}
