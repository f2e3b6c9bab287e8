//! A Linux tap device as virtio-net's backend: frames with the 12-byte
//! virtio-net header in front (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), the
//! guest's receive offloads set with `TUNSETOFFLOAD`, non-blocking.
//!
//! The tap is attached by name: the agent creates it (and plugs it into its
//! network's bridge) before the VMM starts; one that does not exist yet is
//! created, non-persistent, and goes away with the VMM.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::virtio::net::{NetBackend, Offloads, HDR_LEN};

/// Linux's IFNAMSIZ, with the terminating NUL.
const IFNAMSIZ: usize = 16;

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

/// A tap name Linux accepts: 1 to 15 bytes, no '/', no whitespace, not "." or "..".
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(format!("tap name {name:?} must be 1 to 15 printable characters without '/' or ':'"))
    }
}

impl Tap {
    pub fn open(name: &str) -> std::io::Result<Tap> {
        check_name(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: a tun fd we own; `req` is a live ifreq-sized struct the
        // ioctl reads the name and flags from and may write the name back to.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("attach tap {name}: {e}")));
        }
        let hdr: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: a tap fd; the ioctl reads one int.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("tap {name}: set the virtio-net header size: {e}")));
        }
        let tap = Tap { file, name: name.to_string() };
        tap.offload(Offloads::default())?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn offload(&self, o: Offloads) -> std::io::Result<()> {
        let mut flags: libc::c_uint = 0;
        if o.csum {
            flags |= libc::TUN_F_CSUM;
            // Segmentation offloads need checksum offload (the kernel refuses them alone).
            if o.tso4 {
                flags |= libc::TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= libc::TUN_F_TSO6;
            }
            if o.ecn && (o.tso4 || o.tso6) {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        // SAFETY: a tap fd; TUNSETOFFLOAD takes its flags by value.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD as _, flags as libc::c_ulong) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, parts: &[IoSlice<'_>]) -> std::io::Result<()> {
        // A tap takes a frame per write; a short write does not happen.
        self.file.write_vectored(parts).map(|_| ())
    }

    fn set_offloads(&mut self, o: Offloads) -> std::io::Result<()> {
        self.offload(o)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}
