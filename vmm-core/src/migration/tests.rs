//! The protocol logic end to end, in one process over loopback TCP: a
//! stand-in VM whose "guest" keeps writing memory through the VMM's own
//! (tracked) path. No KVM here: real KVM migrations run in the emulated
//! arm64 hosts (tests/tests/vmm_migration.rs).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::compat::{HostCaps, Offer, VmShape};
use super::*;
use crate::persist::{GicState, SerialState, VmState, STATE_VERSION};

const BASE: u64 = 0x4000_0000;
const SIZE: usize = 16 << 20;

fn offer(memory: u64) -> Offer {
    Offer {
        host: HostCaps {
            arch: "aarch64".into(),
            page_size: 4096,
            cntfrq: 62_500_000,
            ipa_bits: 40,
            max_ipa_bits: 40,
            gic_iidr: 0x0300_243b,
            gic_nr_irqs: 64,
            id_regs: vec![],
            counter_offset: false,
        },
        vm: VmShape { vcpus: 1, memory_bytes: memory, its: false, disks: vec![], nics: vec![] },
    }
}

fn state() -> VmState {
    VmState {
        version: STATE_VERSION,
        memory_bytes: SIZE as u64,
        vcpus: vec![],
        gic: GicState { version: STATE_VERSION, ..Default::default() },
        its: None,
        serial: SerialState::default(),
        virtio: vec![],
        nics: vec![],
    }
}

fn ram() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(BASE), SIZE)]).expect("guest RAM")
}

/// A VM whose guest is a thread writing page-tagged values while not paused.
struct FakeVm {
    mem: GuestRam,
    paused: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<String>>>,
    fail_stop: bool,
    /// The state after the pause cannot be read.
    fail_state: bool,
}

impl Source for FakeVm {
    fn memory(&self) -> &GuestRam {
        &self.mem
    }
    fn dirty_start(&mut self) -> Result<(), String> {
        let mut discard = DirtyBitmap::new(BASE, SIZE as u64, 4096);
        dirty::take_vmm_writes(&self.mem, &mut discard);
        Ok(())
    }
    fn dirty_harvest(&mut self) -> Result<DirtyBitmap, String> {
        let mut b = DirtyBitmap::new(BASE, SIZE as u64, 4096);
        dirty::take_vmm_writes(&self.mem, &mut b);
        Ok(b)
    }
    fn dirty_stop(&mut self) {}
    fn throttle(&mut self, pct: u8) {
        self.events.lock().expect("events").push(format!("throttle {pct}"));
    }
    fn stop_and_copy(&mut self) -> Result<Paused, String> {
        if self.fail_stop {
            return Err("drain timed out".into());
        }
        self.paused.store(true, Ordering::SeqCst);
        // Let a write in progress land; it is in the final harvest.
        std::thread::sleep(Duration::from_millis(20));
        self.events.lock().expect("events").push("paused".into());
        let stopped = if self.fail_state {
            Err("vCPU 1 did not answer".to_string())
        } else {
            Ok(Stopped { state: state(), stop: Duration::ZERO, times: vec![("pause_us", 1)] })
        };
        Ok(Paused::with(Instant::now(), stopped))
    }
    fn fall_back(&mut self) -> Fallback {
        self.paused.store(false, Ordering::SeqCst);
        self.events.lock().expect("events").push("fell back".into());
        Fallback::Resumed
    }
    fn handed_over(&mut self) {
        self.events.lock().expect("events").push("handed over".into());
    }
}

struct FakeTarget {
    mem: GuestRam,
    offer: Offer,
    got: Option<VmState>,
    refuse_ready: bool,
}

impl Sink for FakeTarget {
    fn memory(&self) -> &GuestRam {
        &self.mem
    }
    fn offer(&self) -> &Offer {
        &self.offer
    }
    fn ready(&mut self, state: VmState) -> Result<(), String> {
        if self.refuse_ready {
            return Err("another client holds the image's exclusive lock".into());
        }
        self.got = Some(state);
        Ok(())
    }
}

/// Starts a guest that rewrites one page every `every` (page index and a
/// generation in each word) until paused; returns how many writes it made.
fn guest(mem: GuestRam, paused: Arc<AtomicBool>, every: Duration, stop: Arc<AtomicBool>) -> Arc<AtomicU64> {
    let writes = Arc::new(AtomicU64::new(0));
    let w = writes.clone();
    std::thread::spawn(move || {
        let mut gen = 1u64;
        while !stop.load(Ordering::SeqCst) {
            if paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            // Only the first half of RAM: the rest stays zero and is skipped.
            let page = gen % (SIZE as u64 / 4096 / 2);
            let v = (page << 32) | gen;
            let _ = mem.write_slice(&[v.to_le_bytes(); 512].concat(), GuestAddress(BASE + page * 4096));
            gen += 1;
            w.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(every);
        }
    });
    writes
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    (l, a)
}

/// A receiver on a fresh listener, on its own thread: its address, and what
/// `serve` returned with the state it got.
fn receiver(refuse_ready: bool) -> (String, std::thread::JoinHandle<(Result<(), String>, Option<VmState>)>) {
    let (l, addr) = listener();
    let target = FakeTarget { mem: ram(), offer: offer(SIZE as u64), got: None, refuse_ready };
    let rx = std::thread::spawn(move || {
        let mut t = target;
        let r = receive::serve(&l, &mut t, &StatusCell::default(), &AtomicBool::new(false));
        (r, t.got)
    });
    (addr, rx)
}

/// A sender with no guest running, failing where it is told to.
fn idle_vm(events: &Arc<Mutex<Vec<String>>>, fail_stop: bool, fail_state: bool) -> FakeVm {
    FakeVm { mem: ram(), paused: Arc::new(AtomicBool::new(false)), events: events.clone(), fail_stop, fail_state }
}

fn params(peer: &str) -> SendParams {
    SendParams {
        peer: peer.into(),
        downtime: Duration::from_millis(300),
        bandwidth: None,
        timeout: Duration::from_secs(60),
        max_throttle_pct: 99,
    }
}

#[test]
fn a_running_guest_arrives_whole_and_bad_senders_change_nothing() {
    let src_mem = ram();
    // Some data before the migration starts (first pass), the rest written during it.
    src_mem.write_slice(b"written before the migration", GuestAddress(BASE + (SIZE as u64 / 2))).expect("seed");
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = guest(src_mem.clone(), paused.clone(), Duration::from_micros(200), stop.clone());
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut vm = FakeVm {
        mem: src_mem.clone(),
        paused: paused.clone(),
        events: events.clone(),
        fail_stop: false,
        fail_state: false,
    };

    let (l, addr) = listener();
    let dst_mem = ram();
    let target = FakeTarget { mem: dst_mem.clone(), offer: offer(SIZE as u64), got: None, refuse_ready: false };
    let rx_status = StatusCell::default();
    let rs = rx_status.clone();
    let receiver = std::thread::spawn(move || {
        let mut t = target;
        let r = receive::serve(&l, &mut t, &rs, &AtomicBool::new(false));
        (r, t.got)
    });

    // Garbage first: refused, and the receiver keeps listening.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("garbage");
    }
    // An incompatible VM (other memory size): refused before any byte moves.
    let mut other = FakeVm {
        mem: ram(),
        paused: Arc::new(AtomicBool::new(false)),
        events: events.clone(),
        fail_stop: false,
        fail_state: false,
    };
    let st = StatusCell::default();
    let e = send::run(&mut other, &offer(32 << 20), &params(&addr), &st, &AtomicBool::new(false)).expect_err("refused");
    assert!(e.contains("refused the VM: memory size differs"), "{e}");
    assert_eq!(st.get().phase, Phase::Failed);
    assert!(events.lock().expect("events").is_empty(), "a refused VM is never paused");

    std::thread::sleep(Duration::from_millis(100));
    let st = StatusCell::default();
    let report =
        send::run(&mut vm, &offer(SIZE as u64), &params(&addr), &st, &AtomicBool::new(false)).expect("migrates");
    stop.store(true, Ordering::SeqCst);
    let (served, got) = receiver.join().expect("receiver");
    served.expect("the receiver completed");
    assert_eq!(got, Some(state()), "the VM state arrived");
    assert!(writes.load(Ordering::Relaxed) > 100, "the guest ran during the migration");
    let (mut a, mut b) = (vec![0u8; SIZE], vec![0u8; SIZE]);
    src_mem.read_slice(&mut a, GuestAddress(BASE)).expect("read");
    dst_mem.read_slice(&mut b, GuestAddress(BASE)).expect("read");
    assert!(a == b, "the receiver's RAM is the sender's, byte for byte");
    assert_eq!(*events.lock().expect("events").last().expect("event"), "handed over");
    assert!(report.rounds.len() >= 2, "a first pass, then dirty pages: {report:?}");
    assert!(report.rounds[0].zero_pages >= (SIZE as u64 / 4096) / 2 - 1, "zero pages are not sent: {report:?}");
    assert_eq!(st.get().phase, Phase::Completed);
    let rxs = rx_status.get();
    assert_eq!(rxs.phase, Phase::Completed);
    assert_eq!(rxs.report.map(|r| r.outcome), Some("completed".into()), "the receiver keeps the sender's report");
}

#[test]
fn failures_leave_the_vm_on_the_sender() {
    // The receiver cannot start the VM (say, the disk lock is held): the
    // sender falls back and resumes.
    let run = |vm: &mut FakeVm, addr: &str| {
        send::run(vm, &offer(SIZE as u64), &params(addr), &StatusCell::default(), &AtomicBool::new(false))
            .expect_err("fails")
    };
    let (addr, rx) = receiver(true);
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = run(&mut idle_vm(&events, false, false), &addr);
    assert!(e.contains("exclusive lock") && e.contains("the VM runs on here"), "{e}");
    assert_eq!(*events.lock().expect("events"), ["paused", "throttle 0", "fell back"]);
    let (served, _) = rx.join().expect("receiver");
    assert!(served.expect_err("receiver failed").contains("could not start here"));

    // Stop-and-copy itself fails: nothing was paused, the receiver is told.
    let (addr, rx) = receiver(false);
    let e = run(&mut idle_vm(&Arc::default(), true, false), &addr);
    assert!(e.contains("drain timed out") && e.contains("runs on here"), "{e}");
    assert!(rx.join().expect("receiver").0.expect_err("abandoned").contains("abandoned"));

    // The state cannot be read once paused (the last pages are already on
    // their way): the receiver never runs the VM, the sender falls back.
    let (addr, rx) = receiver(false);
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = run(&mut idle_vm(&events, false, true), &addr);
    assert!(e.contains("vCPU 1 did not answer") && e.contains("the VM runs on here"), "{e}");
    assert_eq!(*events.lock().expect("events"), ["paused", "throttle 0", "fell back"]);
    let (served, got) = rx.join().expect("receiver");
    assert!(served.is_err() && got.is_none(), "the receiver never ran the VM: {served:?}");

    // Cancelled during pre-copy, and nobody listening at all.
    let (addr, rx) = receiver(false);
    let mut vm = idle_vm(&Arc::default(), false, false);
    let st = StatusCell::default();
    let e =
        send::run(&mut vm, &offer(SIZE as u64), &params(&addr), &st, &AtomicBool::new(true)).expect_err("cancelled");
    assert_eq!(e, "cancelled");
    assert_eq!(st.get().phase, Phase::Cancelled);
    assert!(rx.join().expect("receiver").0.expect_err("abandoned").contains("cancelled"));
    drop(TcpListener::bind(&addr));
    let e = send::run(&mut vm, &offer(SIZE as u64), &params(&addr), &StatusCell::default(), &AtomicBool::new(false))
        .expect_err("nobody there");
    assert!(e.contains("cannot reach the receiver"), "{e}");
}

#[test]
fn a_guest_faster_than_the_link_is_throttled_or_given_up_on() {
    let mem = ram();
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // ~8 MiB/s of dirtying against a 1 MiB/s link: never converges.
    let _w = guest(mem.clone(), paused.clone(), Duration::from_micros(500), stop.clone());
    let (l, addr) = listener();
    let target = FakeTarget { mem: ram(), offer: offer(SIZE as u64), got: None, refuse_ready: false };
    let rx = std::thread::spawn(move || {
        let mut t = target;
        receive::serve(&l, &mut t, &StatusCell::default(), &AtomicBool::new(false))
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut vm = FakeVm { mem, paused, events: events.clone(), fail_stop: false, fail_state: false };
    let mut p = params(&addr);
    p.bandwidth = Some(1 << 20);
    // Rounds 0 and 1 each send the dirtied half of RAM, 8 s at 1 MiB/s
    // (paced a quarter second at a time); auto-converge decides after round
    // 1, so the limit leaves room for it, however busy the machine is.
    p.timeout = Duration::from_secs(20);
    let st = StatusCell::default();
    let t0 = Instant::now();
    let e = send::run(&mut vm, &offer(SIZE as u64), &p, &st, &AtomicBool::new(false)).expect_err("gives up");
    stop.store(true, Ordering::SeqCst);
    assert!(e.contains("did not converge within 20s"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(30), "gave up in time: {:?}", t0.elapsed());
    let ev = events.lock().expect("events").clone();
    assert!(ev.iter().any(|e| e == "throttle 20"), "auto-converge stepped in: {ev:?}");
    assert_eq!(ev.last().map(String::as_str), Some("throttle 0"), "the throttle is lifted when giving up: {ev:?}");
    assert!(!ev.iter().any(|e| e == "paused"), "never paused: {ev:?}");
    let s = st.get();
    assert!(s.bandwidth_mib_s < 1.5, "the bandwidth limit held: {s:?}");
    assert!(rx.join().expect("receiver").is_err());
}
