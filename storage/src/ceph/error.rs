//! Errors from Ceph carry the (negative errno) code Ceph returned and what
//! it means in Ceph's terms, so an operator can act on them.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CephError {
    /// A librados/librbd call failed.
    #[error("{op}: {meaning} (ceph error {code})")]
    Call { op: String, code: i32, meaning: String },
    /// A monitor command was refused; `message` is the monitor's own text.
    #[error("{op}: {message} (ceph error {code})")]
    Command { op: String, code: i32, message: String },
    /// Refused before anything was sent to Ceph.
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    /// Ceph answered something this code does not understand.
    #[error("{op}: unexpected reply: {detail}")]
    Reply { op: String, detail: String },
}

impl CephError {
    pub fn call(op: impl Into<String>, ret: i64) -> Self {
        let code = ret.unsigned_abs() as i32;
        CephError::Call { op: op.into(), code: -code, meaning: meaning(code) }
    }

    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        CephError::Invalid { what: what.into(), why: why.into() }
    }

    /// The negative errno, when Ceph returned one.
    pub fn code(&self) -> Option<i32> {
        match self {
            CephError::Call { code, .. } | CephError::Command { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What an errno means when Ceph returns it; falls back to strerror.
pub fn meaning(errno: i32) -> String {
    let ceph = match errno {
        libc::ESHUTDOWN => Some("this client is blocklisted (fenced) or shut down"),
        libc::EROFS => Some("read-only: another client holds the image's exclusive lock, or the image is a snapshot"),
        libc::EBUSY => Some("busy: the image is open elsewhere (watchers) or has a lock"),
        libc::ENOTEMPTY => Some("not empty: the image has snapshots or clones"),
        libc::ETIMEDOUT => Some("timed out waiting for the cluster (monitors or OSDs unreachable?)"),
        libc::ENOENT => Some("no such pool, image, snapshot or profile"),
        libc::EEXIST => Some("already exists"),
        libc::EACCES | libc::EPERM => Some("permission denied (check the client's cephx caps)"),
        libc::EDQUOT => Some("quota exceeded"),
        libc::ENOSPC => Some("the cluster is full"),
        _ => None,
    };
    let sys = std::io::Error::from_raw_os_error(errno).to_string();
    let sys = sys.split(" (os error").next().unwrap_or(&sys).to_string();
    match ceph {
        Some(c) => format!("{c} [{sys}]"),
        None => sys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_keep_their_sign_and_get_a_ceph_meaning() {
        let e = CephError::call("rbd_aio_write", -108);
        assert_eq!(e.code(), Some(-108));
        let s = e.to_string();
        assert!(s.contains("blocklisted") && s.contains("-108"), "{s}");
        assert!(CephError::call("x", -2).to_string().contains("no such pool"));
        assert!(CephError::call("x", -5).to_string().contains("Input/output error"));
    }
}
