//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as
//! an initramfs. The harness appends one such archive (the run's binaries and
//! command) to the base initramfs.

use std::io::Write;

#[derive(Default)]
pub struct Archive {
    buf: Vec<u8>,
    ino: u32,
}

impl Archive {
    pub fn new() -> Self {
        Archive { buf: Vec::new(), ino: 0x4000 }
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, 0o040_755, &[]);
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, 0o100_000 | (mode & 0o7777), data);
        self
    }

    /// Finishes the archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        let name = path.trim_start_matches('/');
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040_000 != 0 { 2 } else { 1 },
            0, // mtime
            u32::try_from(data.len()).expect("cpio newc entries are below 4 GiB"),
            0,
            0,
            0,
            0,
            (name.len() + 1) as u32,
            0, // check
        ];
        let _ = write!(self.buf, "070701");
        for f in fields {
            let _ = write!(self.buf, "{f:08x}");
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn gnu_cpio_reads_what_we_write() {
        let mut a = Archive::new();
        a.dir("basalt")
            .dir("basalt/bin")
            .file("basalt/run.sh", 0o755, b"#!/bin/sh\necho hi\n")
            .file("basalt/x", 0o644, b"abc");
        let bytes = a.finish();
        assert_eq!(bytes.len() % 4, 0);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("cpio from deploy/install-deps");
        child.stdin.take().expect("stdin").write_all(&bytes).expect("write");
        assert!(child.wait().expect("wait").success());
        let run = dir.path().join("basalt/run.sh");
        assert_eq!(std::fs::read(&run).expect("run.sh"), b"#!/bin/sh\necho hi\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&run).expect("meta").permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read(dir.path().join("basalt/x")).expect("x"), b"abc");
    }
}
