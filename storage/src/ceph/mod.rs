//! Ceph: connection, administration and storage profiles.
//!
//! `profiles` and `error` are plain Rust and always built; the rest links
//! librados (feature `rbd`).

pub mod error;
pub mod profiles;

#[cfg(feature = "rbd")]
pub mod admin;
#[cfg(feature = "rbd")]
pub mod cluster;
#[cfg(feature = "rbd")]
pub(crate) mod ffi;

#[cfg(feature = "rbd")]
pub use cluster::{ClientConfig, Cluster, ClusterStat, IoCtx, MonReply};
pub use error::CephError;
