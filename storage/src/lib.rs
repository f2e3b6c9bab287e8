//! Basalt's storage layer: the [`BlockBackend`] trait that virtio-blk drives,
//! and its backends. No tokio, tonic or prost here: the VMM links this crate.

pub mod backend;
pub mod bench;
pub mod ceph;
pub mod file;
#[cfg(feature = "rbd")]
pub mod rbd;

pub use backend::{BlockBackend, BlockError, Completion, Op, Request};
pub use file::FileBackend;
#[cfg(feature = "rbd")]
pub use rbd::RbdBackend;
