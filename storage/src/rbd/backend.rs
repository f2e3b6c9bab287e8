//! The RBD block backend: librbd aio, many requests in flight, completions
//! delivered by librbd's callback into a queue plus an eventfd, so the VMM
//! polls one fd and no thread is spent per request.

use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_char, c_void};
use std::ptr;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::image::Image;
use crate::backend::{check_range, BlockBackend, BlockError, Completion, Op, Request};
use crate::ceph::cluster::IoCtx;
use crate::ceph::error::CephError;
use crate::ceph::ffi;

/// What completion callbacks share with the backend. Each in-flight request
/// holds an Arc, so a late callback never touches freed memory.
struct Shared {
    done: Mutex<Vec<Completion>>,
    evt: EventFd,
}

/// One request in flight; its buffer lives here until librbd is done with it.
struct Pending {
    tag: u64,
    op: &'static str,
    buf: Vec<u8>,
    is_read: bool,
    shared: Arc<Shared>,
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
    let Pending { tag, op, mut buf, is_read, shared } = *p;
    let result = if ret < 0 {
        Err(BlockError::Ceph(CephError::call(op, ret as i64)))
    } else if is_read {
        // librbd returns the bytes read; past the end of a short image it is
        // fewer, and those bytes read as zeroes.
        let n = (ret as usize).min(buf.len());
        buf[n..].fill(0);
        Ok(buf)
    } else {
        Ok(Vec::new())
    };
    shared.done.lock().unwrap_or_else(|e| e.into_inner()).push(Completion { tag, result });
    let _ = shared.evt.write(1);
}

pub struct RbdBackend {
    image: Image,
    size: u64,
    read_only: bool,
    shared: Arc<Shared>,
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
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| CephError::call("eventfd", -i64::from(e.raw_os_error().unwrap_or(libc::EIO))))?;
        Ok(RbdBackend { image, size, read_only, shared: Arc::new(Shared { done: Mutex::new(Vec::new()), evt }) })
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    fn start(&self, req: Request) -> Result<(), BlockError> {
        check_range(&req.op, self.size)?;
        if self.read_only && !matches!(req.op, Op::Read { .. } | Op::Flush) {
            return Err(BlockError::ReadOnly);
        }
        // (what, offset, length, buffer, is_read)
        let (op, offset, len, buf, is_read) = match req.op {
            Op::Read { offset, len } => ("rbd aio read", offset, u64::from(len), vec![0u8; len as usize], true),
            Op::Write { offset, data } => ("rbd aio write", offset, data.len() as u64, data, false),
            Op::Flush => ("rbd aio flush", 0, 0, Vec::new(), false),
            Op::Discard { offset, len } => ("rbd aio discard", offset, len, Vec::new(), false),
            Op::WriteZeroes { offset, len } => ("rbd aio write-zeroes", offset, len, Vec::new(), false),
        };
        let mut pending = Box::new(Pending { tag: req.tag, op, buf, is_read, shared: self.shared.clone() });
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
            match op {
                "rbd aio read" => ffi::rbd_aio_read(h, offset, len as usize, data, c),
                "rbd aio write" => ffi::rbd_aio_write(h, offset, len as usize, data, c),
                "rbd aio flush" => ffi::rbd_aio_flush(h, c),
                "rbd aio discard" => ffi::rbd_aio_discard(h, offset, len, c),
                _ => ffi::rbd_aio_write_zeroes(h, offset, len as usize, c, 0, 0),
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
            return Err(BlockError::Ceph(CephError::call(op, i64::from(r))));
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
            Err(e) => {
                self.shared.done.lock().unwrap_or_else(|p| p.into_inner()).push(Completion { tag, result: Err(e) });
                self.shared.evt.write(1).map_err(|e| BlockError::io("eventfd", &e))
            }
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.shared.evt.as_raw_fd()
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        let _ = self.shared.evt.read();
        out.append(&mut self.shared.done.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
