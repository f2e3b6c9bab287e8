use std::process::Command;

use super::{io, Nic, RigError};

/// A private network namespace with a bridge (`br0`, 10.77.0.1/24) that
/// emulated hosts join through tap devices. Nothing outside the namespace is
/// touched; dropping it deletes the namespace with its bridge and taps.
pub struct Netns {
    name: String,
    taps: u32,
}

pub const BRIDGE_ADDR: &str = "10.77.0.1";

impl Netns {
    pub fn create(prefix: &str) -> Result<Self, RigError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = Netns { name, taps: 0 };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new tap on the bridge, and the NIC description for a host using it
    /// with address 10.77.0.`host_octet`.
    pub fn add_host_nic(&mut self, host_octet: u8) -> Result<Nic, RigError> {
        let tap = format!("tap{}", self.taps);
        self.taps += 1;
        self.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.ip(&["link", "set", &tap, "master", "br0"])?;
        self.ip(&["link", "set", &tap, "up"])?;
        Ok(Nic {
            netns: self.name.clone(),
            tap,
            mac: format!("52:54:00:77:00:{host_octet:02x}"),
            ip_cidr: format!("10.77.0.{host_octet}/24"),
        })
    }

    /// Moves the calling thread into the namespace (setns(2) on
    /// `/var/run/netns/NAME`). Threads it spawns afterwards (a tokio runtime,
    /// librados's own threads) and processes it starts are in the namespace
    /// too; the process's other threads are not. This lets a test talk to
    /// [`BRIDGE_ADDR`] and to the emulated hosts directly, e.g. to a
    /// [`super::NetnsCeph`] through basalt-storage. There is no way back
    /// short of entering the original namespace the same way; a test thread
    /// simply ends.
    pub fn enter_current_thread(&self) -> Result<(), RigError> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        let f = std::fs::File::open(&path).map_err(io(format!("open {path}")))?;
        // SAFETY: `f` is an open namespace file for the whole call; setns
        // reads nothing from our memory and only changes this thread's
        // network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(RigError::Io {
                what: format!("setns into network namespace {}", self.name),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn ip(&self, args: &[&str]) -> Result<(), RigError> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), RigError> {
    let out = Command::new("ip").args(args).output().map_err(io("run ip (iproute2)"))?;
    if !out.status.success() {
        return Err(RigError::Setup(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}
