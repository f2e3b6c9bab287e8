//! A real single-host Ceph inside a rig network namespace, bound to the
//! bridge address, so that emulated arm64 hosts on that bridge (and a test
//! thread that entered the namespace) can use RBD.
//!
//! It is `deploy/ceph-dev/up` with `BASALT_CEPH_NETNS` and `BASALT_CEPH_ADDR`
//! set and a fresh cluster dir of its own; the dev Ceph on 127.0.0.1
//! (`/tmp/basalt-ceph`) is not touched and may run at the same time.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::netns::BRIDGE_ADDR;
use super::{io, Netns, RigError};

/// A Ceph (one mon, one mgr, three OSDs; pools `rbd` and `rbd-ec`, clients
/// `admin` and `vm`) inside a [`Netns`], on [`BRIDGE_ADDR`]. Dropping it (or
/// [`NetnsCeph::stop`]) runs `deploy/ceph-dev/down` for its dir, which stops
/// exactly the daemons whose pids `up` recorded, and removes the dir.
///
/// Drop it before the [`Netns`] (declare it after), and drop librados
/// handles on it before it.
pub struct NetnsCeph {
    dir: PathBuf,
    deploy: PathBuf,
    netns: String,
    stopped: bool,
}

impl NetnsCeph {
    /// Starts a new cluster in `ns` and waits until it is HEALTH_OK with
    /// every PG active+clean (`up` prints its progress on stderr).
    pub fn start(ns: &Netns) -> Result<NetnsCeph, RigError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let deploy = deploy_dir()?;
        reap_stale(&deploy);
        // Short: Ceph's admin sockets live in <dir>/run and a unix socket
        // path has at most 107 bytes.
        let dir = std::env::temp_dir().join(format!(
            "basalt-ceph-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        // create_dir, not create_dir_all: never adopt someone else's dir.
        // `up` accepts an empty dir and marks it as its own.
        std::fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
        // From here on, Drop runs down (which also cleans up a half-started cluster).
        let ceph = NetnsCeph { dir, deploy, netns: ns.name().to_string(), stopped: false };
        let out = Command::new(ceph.deploy.join("ceph-dev/up"))
            .env("BASALT_CEPH_DIR", &ceph.dir)
            .env("BASALT_CEPH_NETNS", &ceph.netns)
            .env("BASALT_CEPH_ADDR", BRIDGE_ADDR)
            .output()
            .map_err(io("run deploy/ceph-dev/up"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        for line in log.lines() {
            eprintln!("[ceph {}] {line}", ceph.netns);
        }
        if !out.status.success() {
            return Err(RigError::Setup(format!(
                "deploy/ceph-dev/up in namespace {} failed ({}); last lines:\n{}",
                ceph.netns,
                out.status,
                super::host::tail(&log, 15)
            )));
        }
        for p in [ceph.conf(), ceph.admin_keyring(), ceph.vm_keyring()] {
            if !p.is_file() {
                return Err(RigError::Setup(format!("deploy/ceph-dev/up succeeded but {} is missing", p.display())));
            }
        }
        Ok(ceph)
    }

    /// The cluster dir (conf, keyrings, data, `log/`, `pids/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace the daemons run in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// ceph.conf for clients in the namespace (this machine's paths).
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    pub fn admin_keyring(&self) -> PathBuf {
        self.dir.join("ceph.client.admin.keyring")
    }

    /// Keyring of `client.vm` (mon `profile rbd`, osd `profile rbd` on `rbd` and `rbd-ec`).
    pub fn vm_keyring(&self) -> PathBuf {
        self.dir.join("ceph.client.vm.keyring")
    }

    /// A ceph.conf for a client on an emulated host of the bridge: the
    /// cluster's fsid and `mon_host` (on [`BRIDGE_ADDR`]), cephx, the keyring
    /// at `keyring` (a path inside the host), no admin socket (the host has
    /// no /var/run/ceph), no librbd cache, and a one-minute mount timeout
    /// instead of five.
    pub fn host_conf(&self, keyring: &str) -> Result<String, RigError> {
        let text = std::fs::read_to_string(self.conf()).map_err(io(format!("read {}", self.conf().display())))?;
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
                .ok_or_else(|| RigError::Setup(format!("{} has no {key}", self.conf().display())))
        };
        let fsid = value("fsid")?;
        let mon_host = value("mon_host")?;
        if !mon_host.contains(&format!(":{BRIDGE_ADDR}:")) {
            return Err(RigError::Setup(format!("mon_host {mon_host} is not on the bridge address {BRIDGE_ADDR}")));
        }
        Ok(format!(
            "# written by basalt_tests::rig::NetnsCeph for an emulated host\n\
             [global]\n\
             fsid = {fsid}\n\
             mon_host = {mon_host}\n\
             auth_cluster_required = cephx\n\
             auth_service_required = cephx\n\
             auth_client_required = cephx\n\
             ms_bind_ipv6 = false\n\
             \n\
             [client]\n\
             keyring = {keyring}\n\
             admin_socket =\n\
             rbd_cache = false\n\
             client_mount_timeout = 60\n"
        ))
    }

    /// Stops the daemons (by pid, through `deploy/ceph-dev/down`) and removes the dir.
    pub fn stop(mut self) -> Result<(), RigError> {
        self.stopped = true;
        self.down()
    }

    fn down(&self) -> Result<(), RigError> {
        if !self.dir.join(".basalt-ceph-dev").exists() {
            // `up` stopped before it took the dir (a bad namespace or address):
            // nothing was started, only our empty dir is left.
            return std::fs::remove_dir_all(&self.dir)
                .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                .map_err(io(format!("remove {}", self.dir.display())));
        }
        let out = Command::new(self.deploy.join("ceph-dev/down"))
            .env("BASALT_CEPH_DIR", &self.dir)
            .env_remove("KEEP_DATA")
            .output()
            .map_err(io("run deploy/ceph-dev/down"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        for line in log.lines() {
            eprintln!("[ceph {}] {line}", self.netns);
        }
        if !out.status.success() {
            // Daemons may still run from this dir: leave it for them (and for a look).
            return Err(RigError::Setup(format!(
                "deploy/ceph-dev/down for {} failed ({}): {}",
                self.dir.display(),
                out.status,
                super::host::tail(&log, 5)
            )));
        }
        // down removes the dir itself; this covers an empty dir that `up` never marked.
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(io(format!("remove {}", self.dir.display())))?;
        }
        Ok(())
    }
}

impl Drop for NetnsCeph {
    fn drop(&mut self) {
        if !self.stopped {
            if let Err(e) = self.down() {
                eprintln!("[ceph {}] {e}", self.netns);
            }
        }
    }
}

/// Stops the clusters of earlier test processes that died without dropping
/// their [`NetnsCeph`] (killed by a timeout, say): dirs named
/// `basalt-ceph-<pid>-<n>` whose process is gone. `down` stops only the
/// pids recorded there, after checking their command line names that dir's
/// ceph.conf, and refuses dirs that `up` did not mark as its own.
fn reap_stale(deploy: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((pid, n)) = name.to_str().and_then(|s| s.strip_prefix("basalt-ceph-")).and_then(|s| s.split_once('-'))
        else {
            continue;
        };
        if pid.parse::<u32>().is_err() || n.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        eprintln!("[ceph] stopping the leftover cluster in {} (its test process {pid} is gone)", e.path().display());
        let _ = Command::new(deploy.join("ceph-dev/down"))
            .env("BASALT_CEPH_DIR", e.path())
            .env_remove("KEEP_DATA")
            .status();
    }
}

/// The repository's `deploy/` dir: `BASALT_DEPLOY_DIR`, or the one beside
/// this crate.
fn deploy_dir() -> Result<PathBuf, RigError> {
    let d = std::env::var_os("BASALT_DEPLOY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"));
    let up = d.join("ceph-dev/up");
    if up.is_file() {
        Ok(d)
    } else {
        Err(RigError::Missing(format!(
            "{} is missing: set BASALT_DEPLOY_DIR to the repository's deploy/",
            up.display()
        )))
    }
}
