//! The seam between a virtio-blk device and whatever stores its bytes.
//!
//! Requests are submitted without waiting; completions are collected later.
//! Each backend owns an eventfd that becomes readable when completions are
//! ready, so a VMM polls it with its other file descriptors instead of
//! spending a thread per request.

use std::os::fd::RawFd;

/// One block operation. Buffers are owned so that an asynchronous backend
/// (librbd aio) can keep them alive until the operation completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Flush,
    /// The range may read back as anything afterwards (usually zeroes).
    Discard {
        offset: u64,
        len: u64,
    },
    /// The range must read back as zeroes afterwards.
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

impl Op {
    /// The byte range the operation touches, if it has one.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Read { offset, len } => Some((*offset, u64::from(*len))),
            Op::Write { offset, data } => Some((*offset, data.len() as u64)),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => Some((*offset, *len)),
            Op::Flush => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the submitter and echoed in the completion.
    pub tag: u64,
    pub op: Op,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    /// For reads, the data; for other operations, empty.
    pub result: Result<Vec<u8>, BlockError>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("range {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error(transparent)]
    Ceph(#[from] crate::ceph::CephError),
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: IoErrno,
    },
}

/// An `errno` with its meaning; comparable so completions can be asserted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoErrno(pub i32);

impl std::fmt::Display for IoErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", std::io::Error::from_raw_os_error(self.0), self.0)
    }
}

impl std::error::Error for IoErrno {}

impl BlockError {
    pub fn io(op: &'static str, e: &std::io::Error) -> Self {
        BlockError::Io { op, source: IoErrno(e.raw_os_error().unwrap_or(libc::EIO)) }
    }
}

pub trait BlockBackend: Send {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Logical block size the guest should see.
    fn block_size(&self) -> u32 {
        512
    }
    fn read_only(&self) -> bool;
    /// Queues a request. An error here means the request was not accepted and
    /// no completion will be delivered for it.
    fn submit(&mut self, req: Request) -> Result<(), BlockError>;
    /// Readable (eventfd semantics) when [`BlockBackend::take_completions`] has work.
    fn completion_fd(&self) -> RawFd;
    /// Moves every finished request into `out` and resets the eventfd.
    fn take_completions(&mut self, out: &mut Vec<Completion>);
    /// Why this disk cannot change hands between hosts (live migration), or
    /// `None` when it can: shared storage with an ownership lock.
    fn handover_refusal(&self) -> Option<String> {
        Some("only RBD disks can move between hosts; this disk is a local file".into())
    }
    /// Writes back what a cache holds while the guest still runs, so that
    /// the flush in [`BlockBackend::release_ownership`], after the guest is
    /// paused for a migration's last step, has little left to do.
    fn prepare_handover(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
    /// Gives up exclusive ownership after flushing everything written, so
    /// another host can take the disk. Nothing may be in flight.
    fn release_ownership(&mut self) -> Result<(), BlockError> {
        Err(BlockError::Unsupported("releasing ownership"))
    }
    /// Takes exclusive ownership; fails while another client holds it.
    fn acquire_ownership(&mut self) -> Result<(), BlockError> {
        Err(BlockError::Unsupported("acquiring ownership"))
    }
}

/// Checks a request before any backend acts on it: its range (see
/// [`check_range`]) and, on a read-only device, that it does not write.
pub fn check_request(op: &Op, size: u64, read_only: bool) -> Result<(), BlockError> {
    check_range(op, size)?;
    if read_only && !matches!(op, Op::Read { .. } | Op::Flush) {
        return Err(BlockError::ReadOnly);
    }
    Ok(())
}

/// Finished requests waiting to be taken, and the eventfd that says so.
/// Shared by every backend; safe to push from another thread (librbd's
/// completion callbacks).
pub struct CompletionQueue {
    done: std::sync::Mutex<Vec<Completion>>,
    evt: vmm_sys_util::eventfd::EventFd,
}

impl CompletionQueue {
    pub fn new() -> std::io::Result<Self> {
        Ok(CompletionQueue {
            done: std::sync::Mutex::new(Vec::new()),
            evt: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
        })
    }

    pub fn push(&self, c: Completion) -> Result<(), BlockError> {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        self.evt.write(1).map_err(|e| BlockError::io("eventfd", &e))
    }

    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.evt)
    }

    /// Moves every finished request into `out`. The counter is reset first:
    /// a completion that lands after this read re-arms the eventfd, so none
    /// is ever missed.
    pub fn take(&self, out: &mut Vec<Completion>) {
        let _ = self.evt.read();
        out.append(&mut self.done.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Checks a request's range against the device size, with overflow in mind:
/// offsets and lengths come from the guest.
pub fn check_range(op: &Op, size: u64) -> Result<(), BlockError> {
    if let Some((offset, len)) = op.range() {
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => return Err(BlockError::OutOfRange { offset, len, size }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_that_overflow_or_pass_the_end_are_refused() {
        assert!(check_range(&Op::Read { offset: 0, len: 512 }, 512).is_ok());
        assert!(check_range(&Op::Read { offset: 1, len: 512 }, 512).is_err());
        assert!(check_range(&Op::Discard { offset: u64::MAX, len: 2 }, u64::MAX).is_err());
        assert!(check_range(&Op::Flush, 0).is_ok());
    }
}
