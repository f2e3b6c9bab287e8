//! A pseudo-terminal for the serial console: the guest's output goes to the
//! master side, whatever an operator types on the slave side comes back as
//! console input. The VMM keeps its own slave fd open so the master never
//! reports hang-up while nobody is attached, and the master is non-blocking
//! so an unread console drops bytes instead of stalling a vCPU.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

pub struct Pty {
    pub master: File,
    pub path: PathBuf,
    _slave: File,
}

fn check(what: &str, r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

impl Pty {
    pub fn open() -> std::io::Result<Pty> {
        // SAFETY: plain libc calls on a descriptor we create and own.
        let fd =
            check("posix_openpt", unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) })?;
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let master = unsafe { File::from_raw_fd(fd) };
        // SAFETY: as above, on the master fd.
        check("grantpt", unsafe { libc::grantpt(fd) })?;
        // SAFETY: as above.
        check("unlockpt", unsafe { libc::unlockpt(fd) })?;
        let mut buf = [0 as libc::c_char; 128];
        // SAFETY: the buffer and its length are valid; ptsname_r NUL-terminates.
        check("ptsname_r", unsafe { libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) })?;
        // SAFETY: ptsname_r succeeded, so `buf` holds a NUL-terminated path.
        let path = PathBuf::from(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned());
        let slave = std::fs::OpenOptions::new().read(true).write(true).custom_flags_noctty().open(&path)?;
        // Raw mode: bytes pass through untouched, as a serial line would.
        let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr fills the termios it is given.
        check("tcgetattr", unsafe { libc::tcgetattr(slave.as_raw_fd(), t.as_mut_ptr()) })?;
        // SAFETY: initialised by tcgetattr above.
        let mut t = unsafe { t.assume_init() };
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: valid fd and termios.
        check("tcsetattr", unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) })?;
        Ok(Pty { master, path, _slave: slave })
    }
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_flow_both_ways_through_the_pty() {
        let mut p = Pty::open().expect("pty");
        assert!(p.path.starts_with("/dev/pts"), "{:?}", p.path);
        let mut user = std::fs::OpenOptions::new().read(true).write(true).open(&p.path).expect("attach");
        p.master.write_all(b"guest says hi").expect("write");
        let mut buf = [0u8; 13];
        user.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"guest says hi");
        user.write_all(b"typed").expect("type");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut got = [0u8; 5];
        p.master.read_exact(&mut got).expect("input");
        assert_eq!(&got, b"typed");
    }
}
