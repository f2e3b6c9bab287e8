//! Live migration: moving a running VM to a `basalt-vmm` on another host.
//!
//! - [`protocol`]: the versioned messages on the wire, checked on the way in.
//! - [`compat`]: the receiver's refusal of a VM it cannot run, before any
//!   guest byte moves.
//! - [`dirty`]: which pages changed since the last look: KVM's dirty log
//!   (manual protect where the kernel has it) OR the VMM's own writes
//!   (vm-memory's bitmap on [`GuestRam`]).
//! - [`send`]: pre-copy rounds on their own thread, auto-converge, the
//!   bandwidth limit, stop-and-copy, and the fall-back to the source.
//! - [`receive`]: the other end, into a VM that was built but never booted.
//!
//! Guarantees: the guest runs on exactly one host. The sender releases its
//! disks' exclusive locks only once its vCPUs are paused and its disks
//! drained and flushed; the receiver takes them before it resumes the guest.
//! If anything fails before the receiver says the guest runs, the sender
//! takes its locks back and resumes; if it cannot, because the receiver
//! holds them, the receiver is running the guest and the sender exits. The
//! locks, not the messages, decide who runs the VM. A VM without disks has
//! no such arbiter: its sender hands over once the receiver says it runs.
//!
//! The VM itself is reached through [`Source`] and [`Sink`], so the
//! protocol logic is tested in-process against plain guest memory.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::memory::GuestRam;
use crate::persist::VmState;

pub mod compat;
pub mod dirty;
pub mod protocol;
pub mod receive;
pub mod send;
#[cfg(test)]
mod tests;

pub use dirty::DirtyBitmap;

/// What `migrate-send` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct SendParams {
    /// `host:port` of the receiving VMM.
    pub peer: String,
    /// Stop-and-copy once the remaining dirty memory fits this (QEMU and
    /// Cloud Hypervisor use 300 ms too).
    pub downtime: Duration,
    /// Bytes per second on the wire; `None`: as fast as the link goes.
    pub bandwidth: Option<u64>,
    /// Give up (the VM keeps running here) if pre-copy has not converged by then.
    pub timeout: Duration,
    /// Auto-converge never takes more than this share of the vCPUs' time.
    pub max_throttle_pct: u8,
}

pub const DEFAULT_DOWNTIME_MS: u64 = 300;
pub const DEFAULT_TIMEOUT_S: u64 = 600;
pub const DEFAULT_MAX_THROTTLE_PCT: u8 = 99;

impl SendParams {
    /// From the control socket's JSON: `{"peer": "10.0.0.2:7000",
    /// "downtime_ms": 300, "bandwidth_mib_s": 100, "timeout_s": 600,
    /// "max_throttle_pct": 99}`; only `peer` is required.
    pub fn from_args(args: &Value) -> Result<Self, String> {
        const KNOWN: [&str; 5] = ["peer", "downtime_ms", "bandwidth_mib_s", "timeout_s", "max_throttle_pct"];
        let obj = args.as_object().ok_or("needs args {\"peer\": \"HOST:PORT\", ...}")?;
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("unknown argument {k:?}; known: {}", KNOWN.join(", ")));
        }
        let peer = obj.get("peer").and_then(Value::as_str).ok_or("needs \"peer\": \"HOST:PORT\"")?;
        check_host_port(peer)?;
        let num = |k: &str, min: u64, max: u64, default: Option<u64>| -> Result<Option<u64>, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                    _ => Err(format!("{k} must be a whole number from {min} to {max}, not {v}")),
                },
            }
        };
        let downtime = num("downtime_ms", 1, 60_000, Some(DEFAULT_DOWNTIME_MS))?.unwrap_or(DEFAULT_DOWNTIME_MS);
        let bandwidth = num("bandwidth_mib_s", 1, 1 << 20, None)?.map(|m| m << 20);
        let timeout = num("timeout_s", 1, 86_400, Some(DEFAULT_TIMEOUT_S))?.unwrap_or(DEFAULT_TIMEOUT_S);
        let throttle = num("max_throttle_pct", 0, 99, Some(u64::from(DEFAULT_MAX_THROTTLE_PCT)))?
            .unwrap_or(u64::from(DEFAULT_MAX_THROTTLE_PCT));
        Ok(SendParams {
            peer: peer.into(),
            downtime: Duration::from_millis(downtime),
            bandwidth,
            timeout: Duration::from_secs(timeout),
            max_throttle_pct: throttle as u8,
        })
    }
}

/// `host:port` with a port from 1 to 65535 (the name is resolved on connect).
pub fn check_host_port(s: &str) -> Result<(), String> {
    let bad = || Err(format!("{s:?} is not HOST:PORT"));
    let Some((host, port)) = s.rsplit_once(':') else { return bad() };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) || !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return bad();
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    None,
    /// Receiver: waiting for a sender.
    Listening,
    Connecting,
    Precopy,
    StopAndCopy,
    /// Sender: everything sent, waiting for the receiver to run the guest.
    WaitingForResume,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn active(self) -> bool {
        matches!(
            self,
            Phase::Listening | Phase::Connecting | Phase::Precopy | Phase::StopAndCopy | Phase::WaitingForResume
        )
    }
}

/// One round of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// Pages sent with their bytes, and pages sent as "all zeroes".
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub ms: u64,
    pub mib_s: f64,
    /// Pages the guest (or a device) dirtied while this round was sent.
    pub dirtied_after: u64,
    pub throttle_pct: u8,
}

/// What a finished migration tells: `migrate-status` shows it, the sender
/// logs it, the receiver keeps the sender's copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub outcome: String,
    pub total_ms: u64,
    /// From the pause on the sender to the receiver's word that the guest runs.
    pub downtime_ms: u64,
    /// Of which: draining and flushing the disks and saving the state.
    pub stop_ms: u64,
    /// The sender's steps after the pause, in µs: `pause_us` (vCPUs out of
    /// KVM_RUN), `devices_us` (disks drained), `vcpus_us` (registers read),
    /// `gic_us` (ITS flushed, vGIC read), `release_us` (disk locks
    /// released), `last_round_us` (final dirty pages), `state_us` (state on
    /// the wire), `resume_wait_us` (until the receiver said it runs).
    #[serde(default)]
    pub stop_steps_us: std::collections::BTreeMap<String, u64>,
    /// The receiver's own time from the state's arrival to its reply (it
    /// sends it with `resumed`, protocol version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    pub rounds: Vec<RoundReport>,
    pub bytes: u64,
    pub pages: u64,
    pub max_throttle_pct: u8,
}

/// `migrate-status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `send` or `receive`.
    pub role: String,
    pub phase: Phase,
    pub peer: String,
    pub round: u32,
    pub bytes: u64,
    pub pages: u64,
    pub remaining_bytes: u64,
    pub dirty_rate_mib_s: f64,
    pub bandwidth_mib_s: f64,
    pub expected_downtime_ms: u64,
    pub throttle_pct: u8,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
}

/// The status as both the migration thread and the control socket see it.
#[derive(Clone, Default)]
pub struct StatusCell(Arc<Mutex<Status>>);

impl StatusCell {
    pub fn get(&self) -> Status {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The VM stopped for the last copy. Its memory is final from `at` on
/// (disks drained, ITS tables and pending LPIs flushed into RAM); the rest
/// of its state follows on `state`, read while the last pages go out.
pub struct Paused {
    pub at: Instant,
    pub state: std::sync::mpsc::Receiver<Result<Stopped, String>>,
}

/// The paused VM's state, its disks released.
pub struct Stopped {
    pub state: VmState,
    /// Time spent pausing, draining and flushing disks, saving state.
    pub stop: Duration,
    /// Of which, step by step (µs): see [`Report::stop_steps_us`].
    pub times: Vec<(&'static str, u64)>,
}

impl Paused {
    /// A pause whose state is already known (or already failed).
    pub fn with(at: Instant, state: Result<Stopped, String>) -> Paused {
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = tx.send(state);
        Paused { at, state: rx }
    }
}

/// What happened when the sender fell back after a failure past the pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// Locks taken back, guest running here again.
    Resumed,
    /// Another client holds the disks: the receiver runs the guest.
    MovedAway(String),
    /// Neither: the guest is stopped here (the message says why).
    Failed(String),
}

/// The sending VM, as the migration thread drives it.
pub trait Source {
    fn memory(&self) -> &GuestRam;
    /// Starts dirty tracking; pages written from now on show up in `harvest`.
    fn dirty_start(&mut self) -> Result<(), String>;
    /// Pages written since the last harvest (or the start), then forgotten.
    fn dirty_harvest(&mut self) -> Result<DirtyBitmap, String>;
    fn dirty_stop(&mut self);
    /// Share of the vCPUs' time spent parked (auto-converge); 0 is none.
    fn throttle(&mut self, pct: u8);
    /// Pauses the vCPUs, drains the disks, flushes ITS tables and pending
    /// LPIs into RAM, and returns; then saves the rest of the state and
    /// releases the disks' locks, and sends that on [`Paused::state`]. On
    /// failure before it returns, the VM is running again, as before; a
    /// failure on `state` leaves it paused for [`Source::fall_back`].
    fn stop_and_copy(&mut self) -> Result<Paused, String>;
    /// After a failure past `stop_and_copy`: take the disks back and resume.
    fn fall_back(&mut self) -> Fallback;
    /// The receiver runs the guest: this VM ends.
    fn handed_over(&mut self);
}

/// The receiving VM: built, never booted.
pub trait Sink {
    fn memory(&self) -> &GuestRam;
    fn offer(&self) -> &compat::Offer;
    /// Everything arrived: restore the state, take the disks, and start the
    /// guest. `Ok` means it runs (or will at once) here.
    fn ready(&mut self, state: VmState) -> Result<(), String>;
}

#[cfg(test)]
mod params_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn migrate_send_arguments_are_checked() {
        let p = SendParams::from_args(&json!({"peer": "10.77.0.12:7000"})).expect("defaults");
        assert_eq!(p.downtime, Duration::from_millis(300));
        assert_eq!((p.bandwidth, p.timeout, p.max_throttle_pct), (None, Duration::from_secs(600), 99));
        let p = SendParams::from_args(&json!({"peer": "[::1]:7000", "downtime_ms": 50, "bandwidth_mib_s": 10}))
            .expect("ipv6");
        assert_eq!((p.downtime, p.bandwidth), (Duration::from_millis(50), Some(10 << 20)));
        for (args, want) in [
            (json!(null), "needs args"),
            (json!({}), "needs \"peer\""),
            (json!({"peer": "nohost"}), "not HOST:PORT"),
            (json!({"peer": "h:0"}), "not HOST:PORT"),
            (json!({"peer": "h:70000"}), "not HOST:PORT"),
            (json!({"peer": "h:1", "downtime_ms": 0}), "downtime_ms must be"),
            (json!({"peer": "h:1", "downtime_ms": "fast"}), "downtime_ms must be"),
            (json!({"peer": "h:1", "bandwidth_mib_s": -1}), "bandwidth_mib_s must be"),
            (json!({"peer": "h:1", "max_throttle_pct": 100}), "max_throttle_pct must be"),
            (json!({"peer": "h:1", "downtime": 5}), "unknown argument \"downtime\""),
        ] {
            let e = SendParams::from_args(&args).expect_err(want);
            assert!(e.contains(want), "{args}: {e:?} should say {want:?}");
        }
    }
}
