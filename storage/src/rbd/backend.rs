//! The RBD block backend: librbd aio, many requests in flight, completions
//! delivered by librbd's callback into a queue plus an eventfd, so the VMM
//! polls one fd and no thread is spent per request.

use std::os::fd::RawFd;
use std::os::raw::{c_char, c_void};
use std::ptr;
use std::sync::Arc;

use super::image::Image;
use crate::backend::{check_request, BlockBackend, BlockError, Completion, CompletionQueue, Op, Request};
use crate::ceph::cluster::IoCtx;
use crate::ceph::error::CephError;
use crate::ceph::ffi;

/// Which librbd aio call a request becomes.
#[derive(Clone, Copy)]
enum AioKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl AioKind {
    fn name(self) -> &'static str {
        match self {
            AioKind::Read => "rbd aio read",
            AioKind::Write => "rbd aio write",
            AioKind::Flush => "rbd aio flush",
            AioKind::Discard => "rbd aio discard",
            AioKind::WriteZeroes => "rbd aio write-zeroes",
        }
    }
}

/// One request in flight; its buffer lives here until librbd is done with
/// it. It holds an Arc of the queue, so a late callback never touches freed
/// memory.
struct Pending {
    tag: u64,
    kind: AioKind,
    buf: Vec<u8>,
    done: Arc<CompletionQueue>,
}

unsafe extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Pending> leaked in `submit` for this very
    // completion; librbd calls this exactly once.
    let p = unsafe { Box::from_raw(arg as *mut Pending) };
    // SAFETY: `c` is the completion this callback belongs to; released once.
    let ret = unsafe {
        let r = ffi::rbd_aio_get_return_value(c);
        ffi::rbd_aio_release(c);
        r
    };
    let Pending { tag, kind, mut buf, done } = *p;
    let result = if ret < 0 {
        Err(BlockError::Ceph(CephError::call(kind.name(), ret as i64)))
    } else if matches!(kind, AioKind::Read) {
        // librbd returns the bytes read; past the end of a short image it is
        // fewer, and those bytes read as zeroes.
        let n = (ret as usize).min(buf.len());
        buf[n..].fill(0);
        Ok(buf)
    } else {
        Ok(Vec::new())
    };
    // Nothing to do if the eventfd write fails: the completion is queued and
    // the next take collects it.
    let _ = done.push(Completion { tag, result });
}

pub struct RbdBackend {
    image: Image,
    size: u64,
    read_only: bool,
    done: Arc<CompletionQueue>,
}

impl RbdBackend {
    /// Opens an image for a VM. With `exclusive`, takes the exclusive lock
    /// and refuses to open when another client holds it: a VM never runs
    /// writable on two hosts.
    pub fn open(io: &IoCtx, name: &str, exclusive: bool, read_only: bool) -> Result<Self, CephError> {
        let image = Image::open(io, name)?;
        if exclusive && !read_only {
            image.lock_exclusive()?;
        }
        let size = image.size()?;
        let done = CompletionQueue::new()
            .map_err(|e| CephError::call("eventfd", -i64::from(e.raw_os_error().unwrap_or(libc::EIO))))?;
        Ok(RbdBackend { image, size, read_only, done: Arc::new(done) })
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    fn start(&self, req: Request) -> Result<(), BlockError> {
        check_request(&req.op, self.size, self.read_only)?;
        let (kind, offset, len, buf) = match req.op {
            Op::Read { offset, len } => (AioKind::Read, offset, u64::from(len), vec![0u8; len as usize]),
            Op::Write { offset, data } => (AioKind::Write, offset, data.len() as u64, data),
            Op::Flush => (AioKind::Flush, 0, 0, Vec::new()),
            Op::Discard { offset, len } => (AioKind::Discard, offset, len, Vec::new()),
            Op::WriteZeroes { offset, len } => (AioKind::WriteZeroes, offset, len, Vec::new()),
        };
        let mut pending = Box::new(Pending { tag: req.tag, kind, buf, done: self.done.clone() });
        // The Vec's heap buffer does not move when the Box is turned into a raw pointer.
        let data = pending.buf.as_mut_ptr() as *mut c_char;
        let arg = Box::into_raw(pending) as *mut c_void;
        let mut c: ffi::rbd_completion_t = ptr::null_mut();
        // SAFETY: `arg` stays valid until on_complete reclaims it; out-pointer to a local.
        let r = unsafe { ffi::rbd_aio_create_completion(arg, Some(on_complete), &mut c) };
        if r < 0 {
            // SAFETY: no completion exists, so no callback will run: reclaim `arg`.
            drop(unsafe { Box::from_raw(arg as *mut Pending) });
            return Err(BlockError::Ceph(CephError::call("rbd_aio_create_completion", i64::from(r))));
        }
        let h = self.image.h;
        // SAFETY: open image; `data` points at `len` bytes owned by the
        // Pending that on_complete frees, so it outlives the operation.
        let r = unsafe {
            match kind {
                AioKind::Read => ffi::rbd_aio_read(h, offset, len as usize, data, c),
                AioKind::Write => ffi::rbd_aio_write(h, offset, len as usize, data, c),
                AioKind::Flush => ffi::rbd_aio_flush(h, c),
                AioKind::Discard => ffi::rbd_aio_discard(h, offset, len, c),
                AioKind::WriteZeroes => ffi::rbd_aio_write_zeroes(h, offset, len as usize, c, 0, 0),
            }
        };
        if r < 0 {
            // Not queued: librbd will not call back. Free what we handed it.
            // SAFETY: the completion and `arg` are unused by librbd after a
            // failed submission.
            unsafe {
                ffi::rbd_aio_release(c);
                drop(Box::from_raw(arg as *mut Pending));
            }
            return Err(BlockError::Ceph(CephError::call(kind.name(), i64::from(r))));
        }
        Ok(())
    }
}

impl BlockBackend for RbdBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&mut self, req: Request) -> Result<(), BlockError> {
        let tag = req.tag;
        match self.start(req) {
            Ok(()) => Ok(()),
            // Like the file backend: a request refused up front still
            // completes, with its error, so the device model has one path.
            Err(e) => self.done.push(Completion { tag, result: Err(e) }),
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.done.fd()
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        self.done.take(out);
    }

    fn handover_refusal(&self) -> Option<String> {
        None
    }

    fn prepare_handover(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        // librbd's write-back cache: writes the guest made are acked before
        // they reach the OSDs; pushing them out now keeps them out of the pause.
        Ok(self.image.flush()?)
    }

    /// Flushes, then releases the exclusive lock. A read-only disk holds no
    /// lock, so there is nothing to hand over.
    fn release_ownership(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.image.flush()?;
        Ok(self.image.lock_release()?)
    }

    fn acquire_ownership(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.image.lock_exclusive()?)
    }
}
