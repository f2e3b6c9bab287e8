//! The receiving side: one sender at a time on a TCP listener, into a VM
//! that was built but never booted. A sender that is refused, or that is
//! not a migration stream at all, leaves this receiver as it was, still
//! listening. Once guest bytes have arrived, a broken stream ends the
//! receiver: its RAM holds part of a VM and must not be mixed with another.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::{Phase, Sink, StatusCell};
use crate::persist::VmState;

/// Longer than the sender's longest silence (draining its disks at the
/// pause, at most 30 s). A sender cut off without a word is given up on then.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

enum Fail {
    /// Nothing of the VM arrived: keep listening.
    Before(String),
    /// Guest bytes or state arrived: this receiver is done.
    After(String),
}

impl From<protocol::ProtocolError> for Fail {
    fn from(e: protocol::ProtocolError) -> Self {
        match e {
            protocol::ProtocolError::Io(io) => io.into(),
            e => Fail::After(e.to_string()),
        }
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            return Fail::After(format!(
                "nothing from the sender for {} s: the link or the sender is gone",
                READ_TIMEOUT.as_secs()
            ));
        }
        Fail::After(format!("the migration stream failed: {e}"))
    }
}

/// Serves senders until one migration has completed (`Ok`: the guest runs
/// here) or failed past the point of no return (`Err`), or `cancel` is set
/// while no migration is under way.
pub fn serve(listener: &TcpListener, sink: &mut dyn Sink, st: &StatusCell, cancel: &AtomicBool) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| format!("migration listener: {e}"))?;
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    st.update(|s| {
        *s =
            super::Status { role: "receive".into(), phase: Phase::Listening, peer: local.clone(), ..Default::default() }
    });
    loop {
        if cancel.load(Ordering::SeqCst) {
            st.update(|s| s.phase = Phase::Cancelled);
            return Err("cancelled before any sender connected".into());
        }
        let conn = match listener.accept() {
            Ok((c, peer)) => {
                log::info!("migration: sender {peer} connected");
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(format!("migration listener {local}: {e}")),
        };
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let started = Instant::now();
        match receive(conn, sink, st, started) {
            Ok(()) => return Ok(()),
            Err(Fail::Before(why)) => {
                log::warn!("migration: refused sender {peer}: {why}");
                st.update(|s| {
                    s.phase = Phase::Listening;
                    s.error = Some(format!("refused sender {peer}: {why}"));
                });
            }
            Err(Fail::After(why)) => {
                st.update(|s| {
                    s.phase = Phase::Failed;
                    s.error = Some(why.clone());
                    s.elapsed_ms = started.elapsed().as_millis() as u64;
                });
                return Err(why);
            }
        }
    }
}

fn receive(conn: TcpStream, sink: &mut dyn Sink, st: &StatusCell, started: Instant) -> Result<(), Fail> {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let setup = |e: std::io::Error| Fail::Before(format!("connection set-up: {e}"));
    conn.set_nonblocking(false).map_err(setup)?;
    conn.set_read_timeout(Some(READ_TIMEOUT)).map_err(setup)?;
    conn.set_write_timeout(Some(Duration::from_secs(30))).map_err(setup)?;
    let _ = conn.set_nodelay(true);
    let mut r = BufReader::with_capacity(1 << 20, conn.try_clone().map_err(setup)?);
    let mut w = BufWriter::new(conn);
    let before = |e: protocol::ProtocolError| Fail::Before(e.to_string());
    protocol::read_magic(&mut r).map_err(before)?;
    let (min, max, offer) = match protocol::recv(&mut r).map_err(before)? {
        Message::Hello { min_version, max_version, offer } => (min_version, max_version, offer),
        m => return Err(Fail::Before(format!("expected hello, got {}", m.name()))),
    };
    let refuse = |w: &mut BufWriter<TcpStream>, reason: String| {
        let _ = protocol::send(w, &Message::Refuse { reason: reason.clone() });
        let _ = w.flush();
        Fail::Before(reason)
    };
    let version = max.min(PROTOCOL_VERSION);
    if version < min.max(MIN_PROTOCOL_VERSION) {
        return Err(refuse(
            &mut w,
            format!("protocol versions {min}-{max} offered; this VMM speaks {MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}"),
        ));
    }
    if let Err(why) = super::compat::check(sink.offer(), &offer) {
        return Err(refuse(&mut w, why));
    }
    protocol::send(&mut w, &Message::Accept { version }).map_err(before)?;
    w.flush().map_err(|e| Fail::Before(e.to_string()))?;
    st.update(|s| {
        s.phase = Phase::Precopy;
        s.peer = peer.clone();
    });

    let mem = sink.memory().clone();
    let (base, size) = crate::memory::extent(&mem);
    let page = crate::memory::host_page_size();
    let mut buf = vec![0u8; 1 << 20];
    let zeroes = vec![0u8; 1 << 20];
    let mut state: Option<VmState> = None;
    let mut bytes = 0u64;
    loop {
        match protocol::recv(&mut r)? {
            Message::Pages { round, ranges } => {
                protocol::check_ranges(&ranges, page, base, size)?;
                let mut pages = 0u64;
                for range in &ranges {
                    let mut left = u64::from(range.pages) * page;
                    let mut at = range.gpa;
                    pages += u64::from(range.pages);
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        let data = if range.zero {
                            &zeroes[..n]
                        } else {
                            r.read_exact(&mut buf[..n])?;
                            &buf[..n]
                        };
                        mem.write_slice(data, GuestAddress(at))
                            .map_err(|e| Fail::After(format!("write guest memory at {at:#x}: {e}")))?;
                        at += n as u64;
                        left -= n as u64;
                        if !range.zero {
                            bytes += n as u64;
                        }
                    }
                }
                st.update(|s| {
                    s.round = round;
                    s.bytes = bytes;
                    s.pages += pages;
                    s.elapsed_ms = started.elapsed().as_millis() as u64;
                });
            }
            Message::State { state: s } => {
                s.check().map_err(|e| Fail::After(format!("the VM state: {e}")))?;
                st.update(|x| x.phase = Phase::StopAndCopy);
                state = Some(*s);
            }
            Message::Complete => break,
            Message::Abandon { reason } => {
                return Err(Fail::After(format!("the sender abandoned the migration: {reason}")))
            }
            m => return Err(Fail::After(format!("unexpected {} message during the transfer", m.name()))),
        }
    }
    let state = state.ok_or_else(|| Fail::After("the sender completed without sending the VM state".into()))?;
    let restoring = Instant::now();
    if let Err(why) = sink.ready(state) {
        let _ = protocol::send(&mut w, &Message::Abandon { reason: why.clone() });
        let _ = w.flush();
        return Err(Fail::After(format!("the VM could not start here: {why}")));
    }
    // The guest runs here now; telling the sender is all that is left.
    let restore_ms = restoring.elapsed().as_millis() as u64;
    let resumed = Message::Resumed { restore_ms: (version >= 2).then_some(restore_ms) };
    let told = protocol::send(&mut w, &resumed).and_then(|()| w.flush().map_err(protocol::ProtocolError::from));
    st.update(|s| {
        s.phase = Phase::Completed;
        s.elapsed_ms = started.elapsed().as_millis() as u64;
    });
    if let Err(e) = told {
        log::warn!("migration: the guest runs here, but the sender was not told ({e}); it will find the disks taken");
        return Ok(());
    }
    let _ = r.get_ref().set_read_timeout(Some(Duration::from_secs(10)));
    if let Ok(Message::Done { report }) = protocol::recv(&mut r) {
        log::info!(
            "migration: received from {peer}: {} ms in all, {} ms downtime ({restore_ms} ms of it restoring here)",
            report.total_ms,
            report.downtime_ms
        );
        st.update(|s| s.report = Some(*report));
    }
    Ok(())
}
