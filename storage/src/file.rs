//! Raw-file backend: the default when no Ceph is configured, and the local
//! baseline in benchmarks. I/O is done at submit time (page cache or
//! O_DIRECT is the file's business); completions still go through the
//! eventfd so the device model is the same as for asynchronous backends.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::{check_request, BlockBackend, BlockError, Completion, CompletionQueue, Op, Request};

pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    done: CompletionQueue,
}

impl FileBackend {
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // Seeking to the end sizes block devices too (their metadata says 0).
        let size = {
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0))?
        };
        Ok(FileBackend { file, size, read_only, done: CompletionQueue::new()? })
    }

    fn execute(&self, op: Op) -> Result<Vec<u8>, BlockError> {
        check_request(&op, self.size, self.read_only)?;
        match op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                self.file.read_exact_at(&mut buf, offset).map_err(|e| BlockError::io("read", &e))?;
                Ok(buf)
            }
            Op::Write { offset, data } => {
                self.file.write_all_at(&data, offset).map_err(|e| BlockError::io("write", &e))?;
                Ok(Vec::new())
            }
            Op::Flush => {
                self.file.sync_data().map_err(|e| BlockError::io("flush", &e))?;
                Ok(Vec::new())
            }
            Op::Discard { offset, len } => {
                self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len, "discard")?;
                Ok(Vec::new())
            }
            Op::WriteZeroes { offset, len } => {
                // Punching a hole reads back as zeroes and frees space; fall back
                // to writing zeroes where the filesystem cannot punch.
                if self
                    .fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len, "write-zeroes")
                    .is_err()
                {
                    let chunk = vec![0u8; 1 << 20];
                    let mut pos = offset;
                    while pos < offset + len {
                        let n = (offset + len - pos).min(chunk.len() as u64) as usize;
                        self.file.write_all_at(&chunk[..n], pos).map_err(|e| BlockError::io("write-zeroes", &e))?;
                        pos += n as u64;
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64, op: &'static str) -> Result<(), BlockError> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(BlockError::OutOfRange { offset, len, size: self.size });
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r != 0 {
            return Err(BlockError::io(op, &std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&mut self, req: Request) -> Result<(), BlockError> {
        let result = self.execute(req.op);
        self.done.push(Completion { tag: req.tag, result })
    }

    fn completion_fd(&self) -> RawFd {
        self.done.fd()
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        self.done.take(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(size: u64) -> (tempfile::NamedTempFile, FileBackend) {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(size).expect("set_len");
        let b = FileBackend::open(f.path(), false).expect("open");
        (f, b)
    }

    fn run(b: &mut FileBackend, tag: u64, op: Op) -> Result<Vec<u8>, BlockError> {
        b.submit(Request { tag, op }).expect("accepted");
        let mut out = Vec::new();
        b.take_completions(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag, tag);
        out.pop().map(|c| c.result).expect("one completion")
    }

    #[test]
    fn write_read_discard_and_zero_round_trip() {
        let (_f, mut b) = backend(1 << 20);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        run(&mut b, 1, Op::Write { offset: 4096, data: pattern.clone() }).expect("write");
        assert_eq!(run(&mut b, 2, Op::Read { offset: 4096, len: 8192 }).expect("read"), pattern);
        run(&mut b, 3, Op::Flush).expect("flush");
        run(&mut b, 4, Op::WriteZeroes { offset: 4096, len: 4096 }).expect("zeroes");
        let back = run(&mut b, 5, Op::Read { offset: 4096, len: 8192 }).expect("read");
        assert!(back[..4096].iter().all(|&x| x == 0));
        assert_eq!(&back[4096..], &pattern[4096..]);
    }

    #[test]
    fn out_of_range_completes_with_an_error_and_changes_nothing() {
        let (f, mut b) = backend(4096);
        let err = run(&mut b, 9, Op::Write { offset: 4000, data: vec![1; 200] }).expect_err("refused");
        assert!(matches!(err, BlockError::OutOfRange { .. }), "{err}");
        assert_eq!(std::fs::read(f.path()).expect("read file"), vec![0u8; 4096]);
    }

    #[test]
    fn completions_signal_the_eventfd() {
        let (_f, mut b) = backend(4096);
        let fd = b.completion_fd();
        b.submit(Request { tag: 1, op: Op::Flush }).expect("accepted");
        b.submit(Request { tag: 2, op: Op::Read { offset: 0, len: 512 } }).expect("accepted");
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(n, 1, "eventfd readable after completions");
        let mut out = Vec::new();
        b.take_completions(&mut out);
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![1, 2]);
        // SAFETY: as above.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(n, 0, "eventfd reset after taking completions");
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(4096).expect("set_len");
        let mut b = FileBackend::open(f.path(), true).expect("open");
        assert_eq!(run(&mut b, 1, Op::Write { offset: 0, data: vec![1; 512] }), Err(BlockError::ReadOnly));
    }
}
