//! The sending side, on its own thread while the guest keeps running:
//! hello and the receiver's verdict, a first pass over all of RAM (zero
//! pages skipped: the receiver's RAM starts zeroed), rounds of dirty pages
//! until what is left fits the downtime budget, auto-converge when the guest
//! dirties faster than the link, then stop-and-copy and the hand-over.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Message, PageRange, MAX_PAGES_PER_MESSAGE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::{compat::Offer, DirtyBitmap, Fallback, Phase, Report, RoundReport, SendParams, Source, StatusCell};
use crate::memory::GuestRam;

/// Largest run read from guest RAM at once, and the payload at which a
/// `Pages` message is sent.
const RUN_PAGES: u32 = 256;
const BATCH_BYTES: usize = 4 << 20;
/// Auto-converge: first step and increment, as QEMU's cpu-throttle does.
const THROTTLE_FIRST: u8 = 20;
const THROTTLE_STEP: u8 = 10;
/// What the pause costs beyond the last pages (draining and flushing the
/// disks, the state, the receiver's restore and lock): 70-210 ms measured in
/// the emulated hosts. Counted against the downtime budget, at most half of it.
const STOP_ALLOWANCE: Duration = Duration::from_millis(100);
/// From the pause, how long the last pages, the state and the receiver's
/// word that the guest runs may take beyond twice their expected transfer
/// time (the receiver restores and locks in well under a second). Past it
/// the stream is torn down and the sender falls back: the guest is never
/// stopped on both hosts much longer than the failure takes.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum Stop {
    Cancelled,
    TimedOut(Duration),
    Failed(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cancelled => write!(f, "cancelled"),
            Stop::TimedOut(t) => write!(f, "pre-copy did not converge within {}s", t.as_secs()),
            Stop::Failed(m) => write!(f, "{m}"),
        }
    }
}

impl From<protocol::ProtocolError> for Stop {
    fn from(e: protocol::ProtocolError) -> Self {
        match e {
            protocol::ProtocolError::Io(io) => io.into(),
            e => Stop::Failed(e.to_string()),
        }
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            return Stop::Failed("the receiver stopped taking data for 30 s: the link or the receiver is gone".into());
        }
        Stop::Failed(format!("the migration stream failed: {e}"))
    }
}

/// Writes pages on the wire and keeps the account.
struct Wire<W: Write> {
    w: W,
    bytes: u64,
    started: Instant,
    limit: Option<u64>,
}

impl<W: Write> Wire<W> {
    /// Tells the receiver (best effort: the stream may be what failed) and
    /// returns the VM to normal running: no throttle, no dirty log.
    fn abandon(&mut self, src: &mut dyn Source, reason: &str) {
        let _ = protocol::send(&mut self.w, &Message::Abandon { reason: reason.into() });
        let _ = self.w.flush();
        src.throttle(0);
        src.dirty_stop();
    }

    fn pace(&self) {
        if let Some(limit) = self.limit {
            let due = Duration::from_secs_f64(self.bytes as f64 / limit as f64);
            if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }

    fn message(&mut self, m: &Message, payload: &[u8]) -> Result<(), Stop> {
        let mut json = Vec::new();
        protocol::send(&mut json, m)?;
        self.w.write_all(&json)?;
        self.w.write_all(payload)?;
        self.bytes += (json.len() + payload.len()) as u64;
        self.pace();
        Ok(())
    }

    /// Sends every page set in `dirty`. With `skip_zero`, all-zero pages
    /// are left out (the receiver's RAM is zero already); otherwise they go
    /// as zero ranges, without bytes. After each batch, `progress` hears how
    /// far the round got and may stop it.
    fn pages(
        &mut self,
        mem: &GuestRam,
        dirty: &DirtyBitmap,
        round: u32,
        skip_zero: bool,
        progress: &dyn Fn(Sent) -> Result<(), Stop>,
    ) -> Result<RoundReport, Stop> {
        let total = dirty.count();
        let mut done = 0u64;
        let t0 = Instant::now();
        let bytes0 = self.bytes;
        let page = dirty.page_size();
        let mut rep = RoundReport { round, ..Default::default() };
        let mut ranges: Vec<PageRange> = Vec::new();
        // Under a bandwidth limit a batch is a quarter second of it, so that
        // progress and a cancel are heard that often, not once per 4 MiB.
        let batch = self
            .limit
            .map_or(BATCH_BYTES, |l| usize::try_from(l / 4).unwrap_or(BATCH_BYTES).clamp(256 << 10, BATCH_BYTES));
        let mut payload: Vec<u8> = Vec::with_capacity(batch + (RUN_PAGES as usize) * page as usize);
        let mut batch_pages = 0u64;
        let mut run = vec![0u8; RUN_PAGES as usize * page as usize];
        for (gpa, n) in dirty.runs(RUN_PAGES) {
            let len = n as usize * page as usize;
            mem.read_slice(&mut run[..len], GuestAddress(gpa))
                .map_err(|e| Stop::Failed(format!("read guest memory at {gpa:#x}: {e}")))?;
            for (i, p) in run[..len].chunks_exact(page as usize).enumerate() {
                done += 1;
                let at = gpa + i as u64 * page;
                let zero = is_zero(p);
                if zero {
                    rep.zero_pages += 1;
                    if skip_zero {
                        continue;
                    }
                } else {
                    rep.pages += 1;
                    payload.extend_from_slice(p);
                }
                match ranges.last_mut() {
                    Some(r) if r.zero == zero && r.gpa + u64::from(r.pages) * page == at => r.pages += 1,
                    _ => ranges.push(PageRange { gpa: at, pages: 1, zero }),
                }
                batch_pages += 1;
                if payload.len() >= batch || batch_pages >= MAX_PAGES_PER_MESSAGE {
                    self.message(&Message::Pages { round, ranges: std::mem::take(&mut ranges) }, &payload)?;
                    payload.clear();
                    batch_pages = 0;
                    progress(Sent { wire_bytes: self.bytes, left_bytes: total.saturating_sub(done) * page })?;
                }
            }
        }
        if !ranges.is_empty() {
            self.message(&Message::Pages { round, ranges }, &payload)?;
        }
        self.w.flush()?;
        rep.bytes = self.bytes - bytes0;
        rep.ms = t0.elapsed().as_millis() as u64;
        rep.mib_s = mib_s(rep.bytes, t0.elapsed());
        Ok(rep)
    }
}

/// Whether a page is all zeroes. Every page of the first pass goes
/// through here, so it reads 64 bytes at a time as eight words folded
/// together (which LLVM vectorises), not byte by byte: on an emulated host
/// the byte loop alone took seconds for a 256 MiB guest.
fn is_zero(p: &[u8]) -> bool {
    let mut blocks = p.chunks_exact(64);
    let words_zero = blocks.by_ref().all(|b| {
        b.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]))) == 0
    });
    words_zero && blocks.remainder().iter().all(|&b| b == 0)
}

/// How far a round of pages has got.
struct Sent {
    /// Everything written to the wire so far, this round and before.
    wire_bytes: u64,
    /// What this round has still to look at.
    left_bytes: u64,
}

fn mib_s(bytes: u64, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / s / f64::from(1 << 20)
    } else {
        0.0
    }
}

fn connect(peer: &str) -> Result<TcpStream, Stop> {
    let fail = |e: &dyn std::fmt::Display| Stop::Failed(format!("cannot reach the receiver at {peer}: {e}"));
    let addrs: Vec<_> = peer.to_socket_addrs().map_err(|e| fail(&e))?.collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(fail(&last.map_or("no address".to_string(), |e| e.to_string())))
}

/// Runs a whole migration of `src` to `p.peer`. `Ok` once the receiver runs
/// the guest (the caller's VM then ends); `Err` with the VM running here,
/// unless the message says otherwise.
pub fn run(
    src: &mut dyn Source,
    offer: &Offer,
    p: &SendParams,
    st: &StatusCell,
    cancel: &AtomicBool,
) -> Result<Report, String> {
    let started = Instant::now();
    st.update(|s| {
        *s = super::Status { role: "send".into(), phase: Phase::Connecting, peer: p.peer.clone(), ..Default::default() }
    });
    let result = connect(&p.peer).and_then(|stream| migrate(src, offer, p, st, cancel, stream, started));
    let phase = match &result {
        Ok(_) => Phase::Completed,
        Err(Stop::Cancelled) => Phase::Cancelled,
        Err(_) => Phase::Failed,
    };
    st.update(|s| {
        s.phase = phase;
        s.elapsed_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = &result {
            s.error = Some(e.to_string());
        }
        if let Ok(r) = &result {
            s.report = Some(r.clone());
        }
    });
    result.map_err(|e| e.to_string())
}

fn migrate(
    src: &mut dyn Source,
    offer: &Offer,
    p: &SendParams,
    st: &StatusCell,
    cancel: &AtomicBool,
    stream: TcpStream,
    started: Instant,
) -> Result<Report, Stop> {
    let _ = stream.set_nodelay(true);
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::with_capacity(1 << 20, stream.try_clone()?);
    protocol::write_magic(&mut w)?;
    protocol::send(
        &mut w,
        &Message::Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            offer: Box::new(offer.clone()),
        },
    )?;
    w.flush()?;
    // A receiver busy with another sender leaves this connection in its
    // backlog: say so, so a caller can tell it from a refusal and retry.
    // One that cannot read the offer (an older basalt-vmm, which refuses
    // fields it does not know) closes the connection without a word.
    let hello = |e: protocol::ProtocolError| {
        Stop::Failed(format!(
            "the receiver did not answer the hello (a basalt-vmm that cannot read this one's offer closes the connection): {e}"
        ))
    };
    match protocol::recv(&mut r).map_err(hello)? {
        Message::Accept { version } if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) => {}
        Message::Accept { version } => {
            return Err(Stop::Failed(format!(
                "the receiver chose protocol version {version}, which this VMM does not speak"
            )))
        }
        Message::Refuse { reason } => return Err(Stop::Failed(format!("the receiver refused the VM: {reason}"))),
        m => return Err(Stop::Failed(format!("expected accept or refuse, got {}", m.name()))),
    }

    src.dirty_start().map_err(Stop::Failed)?;
    let mut wire = Wire { w, bytes: 0, started: Instant::now(), limit: p.bandwidth };
    let pre = precopy(src, &mut wire, p, st, cancel, started);
    let (rounds, pending, max_throttle, expected) = match pre {
        Ok(x) => x,
        Err(e) => {
            wire.abandon(src, &format!("the sender stopped: {e}"));
            return Err(e);
        }
    };
    let deadline = STOP_DEADLINE + expected * 2;
    stop_and_copy(src, wire, r, stream, st, Precopy { rounds, pending, max_throttle, deadline }, started)
}

/// What pre-copy hands to stop-and-copy.
struct Precopy {
    rounds: Vec<RoundReport>,
    pending: DirtyBitmap,
    max_throttle: u8,
    deadline: Duration,
}

/// Tears the stream down so that nothing still queued in it reaches the
/// receiver: SO_LINGER 0 makes the last close reset the connection and drop
/// unsent bytes, instead of delivering them (a "Complete" arriving after the
/// sender fell back would have the receiver try to run the guest too; the
/// lock would stop it, but nobody needs the race).
fn reset(stream: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a socket fd this stream owns; a pointer to a live linger of the
    // size given. Failure only means a FIN instead of a reset.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Rounds sent although the rest already fitted the downtime budget, while
/// each one still more than halves it.
const MAX_EXTRA_ROUNDS: u32 = 3;

#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Stop-and-copy now.
    Stop,
    /// Another round: the rest does not fit the budget.
    Round,
    /// Another round although the rest fits: it still shrinks fast.
    ExtraRound,
}

/// After a round: `fits` whether the dirty rest (`remaining` bytes) fits
/// the downtime budget, `sizeable` whether it would take more than a tenth
/// of it (a budget of minutes says the rest's seconds are fine: more rounds
/// would only make the migration longer), `before` what was left after the
/// round before.
fn next_step(fits: bool, sizeable: bool, remaining: u64, before: Option<u64>, extra_rounds: u32) -> Next {
    let shrinking = remaining > 0 && before.is_none_or(|b| remaining * 2 < b);
    match (fits, sizeable && shrinking && extra_rounds < MAX_EXTRA_ROUNDS) {
        (false, _) => Next::Round,
        (true, true) => Next::ExtraRound,
        (true, false) => Next::Stop,
    }
}

/// Rounds so far, the dirty set left, the highest throttle, the expected
/// time to send that set.
type Precopied = (Vec<RoundReport>, DirtyBitmap, u8, Duration);

fn precopy(
    src: &mut dyn Source,
    wire: &mut Wire<BufWriter<TcpStream>>,
    p: &SendParams,
    st: &StatusCell,
    cancel: &AtomicBool,
    started: Instant,
) -> Result<Precopied, Stop> {
    let (base, size) = crate::memory::extent(src.memory());
    let page = crate::memory::host_page_size();
    let stop = || -> Result<(), Stop> {
        if cancel.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        if started.elapsed() > p.timeout {
            return Err(Stop::TimedOut(p.timeout));
        }
        Ok(())
    };
    st.update(|s| s.phase = Phase::Precopy);
    // Between a round's batches: `migrate-status` moves on with the round,
    // which at a low bandwidth or on a big guest takes minutes.
    let wire_started = wire.started;
    let progress = |sent: Sent| -> Result<(), Stop> {
        stop()?;
        st.update(|s| {
            s.bytes = sent.wire_bytes;
            s.remaining_bytes = sent.left_bytes;
            s.bandwidth_mib_s = mib_s(sent.wire_bytes, wire_started.elapsed());
            s.elapsed_ms = started.elapsed().as_millis() as u64;
        });
        Ok(())
    };
    let mut rounds = Vec::new();
    let mut throttle = 0u8;
    let mut max_throttle = 0u8;
    let mut dirty = DirtyBitmap::all(base, size, page);
    let mut round = 0u32;
    let mut last_remaining: Option<u64> = None;
    let mut extra_rounds = 0u32;
    loop {
        stop()?;
        st.update(|s| s.round = round);
        let rep = wire.pages(src.memory(), &dirty, round, round == 0, &progress)?;
        let bandwidth = rep.bytes as f64 / (rep.ms.max(1) as f64 / 1000.0);
        dirty = src.dirty_harvest().map_err(Stop::Failed)?;
        let remaining = dirty.count() * page;
        let dirty_rate = remaining as f64 / (rep.ms.max(1) as f64 / 1000.0);
        // A short round measures latency more than bandwidth: take the
        // better of this round's rate and the whole migration's.
        let wire_rate = (wire.bytes as f64 / wire.started.elapsed().as_secs_f64().max(0.001)).max(bandwidth);
        let expected =
            Duration::from_secs_f64(remaining as f64 / wire_rate.max(1.0)) + STOP_ALLOWANCE.min(p.downtime / 2);
        let mut rep = rep;
        rep.dirtied_after = dirty.count();
        rep.throttle_pct = throttle;
        log::info!(
            "migration round {round}: {} pages + {} zero in {} ms ({:.1} MiB/s); {} MiB dirty since ({:.1} MiB/s), expected downtime {} ms",
            rep.pages,
            rep.zero_pages,
            rep.ms,
            rep.mib_s,
            remaining >> 20,
            dirty_rate / f64::from(1 << 20),
            expected.as_millis()
        );
        st.update(|s| {
            s.round = round;
            s.bytes = wire.bytes;
            s.pages += rep.pages + rep.zero_pages;
            s.remaining_bytes = remaining;
            s.dirty_rate_mib_s = dirty_rate / f64::from(1 << 20);
            s.bandwidth_mib_s = wire_rate / f64::from(1 << 20);
            s.expected_downtime_ms = expected.as_millis() as u64;
            s.throttle_pct = throttle;
            s.elapsed_ms = started.elapsed().as_millis() as u64;
        });
        let sent = rep.bytes;
        rounds.push(rep);
        // It fits: stop, unless the rest is a sizeable share of the budget
        // and the last round more than halved it. The first pass is long and
        // leaves everything the guest wrote meanwhile; a round after it is
        // short and leaves only what the guest writes in that time (an idle
        // guest's timer-tick pages), which is then all the pause carries.
        match next_step(expected <= p.downtime, expected * 10 > p.downtime, remaining, last_remaining, extra_rounds) {
            Next::Stop => return Ok((rounds, dirty, max_throttle, expected)),
            Next::ExtraRound => extra_rounds += 1,
            Next::Round => {}
        }
        last_remaining = Some(remaining);
        // Auto-converge: the guest dirtied more than half of what the link
        // moved in the same time; take more of its vCPUs' time.
        if round >= 1 && remaining > sent / 2 && throttle < p.max_throttle_pct {
            throttle = if throttle == 0 { THROTTLE_FIRST } else { throttle.saturating_add(THROTTLE_STEP) }
                .min(p.max_throttle_pct);
            max_throttle = max_throttle.max(throttle);
            log::info!(
                "migration: guest dirties memory faster than it can be sent; throttling its vCPUs to {throttle}%"
            );
            src.throttle(throttle);
        }
        round += 1;
    }
}

fn stop_and_copy(
    src: &mut dyn Source,
    mut wire: Wire<BufWriter<TcpStream>>,
    mut r: BufReader<TcpStream>,
    stream: TcpStream,
    st: &StatusCell,
    pre: Precopy,
    started: Instant,
) -> Result<Report, Stop> {
    let Precopy { mut rounds, mut pending, max_throttle, deadline } = pre;
    st.update(|s| s.phase = Phase::StopAndCopy);
    let paused = match src.stop_and_copy() {
        Ok(p) => p,
        Err(e) => {
            wire.abandon(src, &format!("the sender could not stop the VM: {e}"));
            return Err(Stop::Failed(format!("stop-and-copy: {e}; the VM runs on here")));
        }
    };
    // After the pause, nothing but a failure path touches this VM again:
    // any error from here is answered by falling back to it. A watchdog
    // holds the whole of it to the deadline: a blocked write or read (a cut
    // link) is woken by tearing the stream down.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let dog = stream.try_clone().map(|s| {
        std::thread::spawn(move || {
            let fired = matches!(done_rx.recv_timeout(deadline), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
            if fired {
                reset(&s);
            }
            fired
        })
    });
    let last = rounds.len() as u32;
    let mut steps = std::collections::BTreeMap::new();
    let mut restore_ms = None;
    let mut stop = Duration::ZERO;
    let finish = (|| -> Result<(RoundReport, Duration), Stop> {
        let _ = dog.as_ref().map_err(|e| Stop::Failed(format!("the stream's watchdog: {e}")))?;
        let mut t = Instant::now();
        let lap = |steps: &mut std::collections::BTreeMap<String, u64>, what: &str, t: &mut Instant| {
            steps.insert(what.to_string(), t.elapsed().as_micros() as u64);
            *t = Instant::now();
        };
        // The ITS tables and pending LPIs were flushed into RAM by the pause:
        // this harvest has them.
        let last_dirty = src.dirty_harvest().map_err(Stop::Failed)?;
        pending.merge(&last_dirty);
        lap(&mut steps, "harvest_us", &mut t);
        let rep = wire.pages(src.memory(), &pending, last, false, &|_| Ok(()))?;
        wire.w.flush()?;
        lap(&mut steps, "last_round_us", &mut t);
        // Read by the VMM thread while the pages went out.
        let stopped = paused.state.recv().unwrap_or_else(|_| Err("the VM has stopped".into()));
        let stopped = stopped.map_err(|e| Stop::Failed(format!("saving the paused VM's state: {e}")))?;
        lap(&mut steps, "state_wait_us", &mut t);
        steps.extend(stopped.times.iter().map(|(k, v)| ((*k).to_string(), *v)));
        stop = stopped.stop;
        wire.message(&Message::State { state: Box::new(stopped.state) }, &[])?;
        wire.message(&Message::Complete, &[])?;
        wire.w.flush()?;
        lap(&mut steps, "state_us", &mut t);
        st.update(|s| s.phase = Phase::WaitingForResume);
        stream.set_read_timeout(Some(deadline))?;
        if let Message::Resumed { restore_ms: ms } = protocol::expect(&mut r, "resumed")? {
            restore_ms = ms;
        }
        lap(&mut steps, "resume_wait_us", &mut t);
        Ok((rep, paused.at.elapsed()))
    })();
    drop(done_tx);
    let fired = dog.map(|d| d.join().unwrap_or(false)).unwrap_or(false);
    let (rep, downtime) = match finish {
        Ok(x) => x,
        Err(e) => {
            let e = if fired {
                format!("{e} (nothing from the receiver within {}s of the pause)", deadline.as_secs())
            } else {
                e.to_string()
            };
            // Every handle on the stream closes before the disks are taken back.
            reset(&stream);
            drop((wire, r, stream));
            src.throttle(0);
            src.dirty_stop();
            return Err(match src.fall_back() {
                Fallback::Resumed => Stop::Failed(format!("{e}; the VM runs on here")),
                Fallback::MovedAway(why) => {
                    src.handed_over();
                    Stop::Failed(format!("{e}; but the receiver runs the VM ({why}): this VMM ends"))
                }
                Fallback::Failed(why) => Stop::Failed(format!("{e}; and the VM could not be resumed here: {why}")),
            });
        }
    };
    rounds.push(rep);
    let report = Report {
        outcome: "completed".into(),
        total_ms: started.elapsed().as_millis() as u64,
        downtime_ms: downtime.as_millis() as u64,
        stop_ms: stop.as_millis() as u64,
        stop_steps_us: steps,
        restore_ms,
        bytes: wire.bytes,
        pages: rounds.iter().map(|r| r.pages + r.zero_pages).sum(),
        rounds,
        max_throttle_pct: max_throttle,
    };
    // Best effort: the receiver keeps it for its own migrate-status.
    let _ = wire.message(&Message::Done { report: Box::new(report.clone()) }, &[]);
    let _ = wire.w.flush();
    src.dirty_stop();
    src.handed_over();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn a_rest_that_fits_gets_more_rounds_only_while_they_halve_it() {
        use super::{next_step, Next, MAX_EXTRA_ROUNDS};
        // After the first pass, one more round even though the rest fits.
        assert_eq!(next_step(true, true, 1 << 20, None, 0), Next::ExtraRound);
        assert_eq!(next_step(true, false, 1 << 20, None, 0), Next::Stop, "a small share of the budget");
        assert_eq!(next_step(true, true, 0, None, 0), Next::Stop, "nothing left");
        assert_eq!(next_step(true, true, 400 << 10, Some(1 << 20), 1), Next::ExtraRound, "more than halved");
        assert_eq!(next_step(true, true, 600 << 10, Some(1 << 20), 1), Next::Stop, "no longer halving");
        assert_eq!(next_step(true, true, 1, Some(1 << 20), MAX_EXTRA_ROUNDS), Next::Stop, "at most so many");
        assert_eq!(next_step(false, true, 600 << 10, Some(1 << 20), MAX_EXTRA_ROUNDS), Next::Round, "does not fit");
    }

    #[test]
    fn zero_pages_are_told_from_pages_with_any_byte_set() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        for at in [0, 7, 63, 64, 2047, 4095] {
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at} set");
            p[at] = 0;
        }
        assert!(is_zero(&p[..100]) && !is_zero(&[0, 0, 0, 9][..]), "lengths that are not a multiple of 64");
    }
}
