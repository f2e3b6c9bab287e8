//! The emulated arm64 host.
//!
//! [`Arm64Host`] boots one host with a command, streams its console, enforces
//! a timeout and returns the command's exit status and output. [`Netns`]
//! joins several hosts on a bridge inside a private network namespace;
//! [`NetnsCeph`] runs a real Ceph in that namespace, on the bridge address.
//!
//! Inputs come from `deploy/` (see [`Artifacts`]): the kernel and base
//! initramfs of `deploy/arm64-host`, the arm64 binaries of `deploy/cross/build`.

mod artifacts;
mod ceph;
pub mod cpio;
pub mod guest;
mod host;
pub mod netns;

pub use artifacts::Artifacts;
pub use ceph::NetnsCeph;
pub use host::{Arm64Host, Nic, Outcome, Running};
pub use netns::Netns;

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("{0}")]
    Missing(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RigError {
    let what = what.into();
    move |source| RigError::Io { what, source }
}
