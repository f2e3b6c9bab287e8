//! Shared setup for the tests that run against the real single-host Ceph
//! started by `deploy/ceph-dev/up` (`deploy/test` and `.ci/run` start it).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use basalt_storage::ceph::{ClientConfig, Cluster};

pub fn ceph_dir() -> PathBuf {
    std::env::var_os("BASALT_CEPH_DIR").map(PathBuf::from).unwrap_or_else(|| "/tmp/basalt-ceph".into())
}

pub fn client(id: &str) -> Cluster {
    let dir = ceph_dir();
    let conf = dir.join("ceph.conf");
    assert!(conf.is_file(), "{} is missing: start the dev Ceph with deploy/ceph-dev/up", conf.display());
    let cfg = ClientConfig {
        conf: Some(conf),
        id: id.into(),
        keyring: Some(dir.join(format!("ceph.client.{id}.keyring"))),
        // Fail fast instead of waiting minutes when the cluster is gone, and
        // measure the cluster, not librbd's cache.
        options: vec![("client_mount_timeout".into(), "30".into()), ("rbd_cache".into(), "false".into())],
    };
    Cluster::connect(&cfg).unwrap_or_else(|e| panic!("connect to the dev Ceph as client.{id}: {e}"))
}

pub fn admin() -> Cluster {
    client("admin")
}

/// The restricted `profile rbd` client VMs use.
pub fn vm() -> Cluster {
    client("vm")
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    format!("{prefix}-{}-{t}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Waits on a backend's eventfd until `n` completions have arrived.
pub fn wait_completions(
    b: &mut dyn basalt_storage::BlockBackend,
    n: usize,
    timeout: Duration,
) -> Vec<basalt_storage::Completion> {
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "only {} of {n} completions after {timeout:?}", out.len());
        let mut pfd = libc::pollfd { fd: b.completion_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        b.take_completions(&mut out);
    }
    out
}
