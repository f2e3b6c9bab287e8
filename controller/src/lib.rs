//! Basalt controller library: the cluster model, the deterministic state
//! machine that applies validated commands to it, and the scheduler; then the
//! Raft node (openraft over RocksDB and gRPC), the gRPC API and the leader's
//! reconcilers (scheduling, and storage in Ceph) layered on top, adding no
//! rules of their own.

pub mod api;
pub mod config;
pub mod error;
pub mod fencing;
pub mod metrics;
pub mod model;
pub mod node;
pub mod raft;
pub mod reconciler;
pub mod scheduler;
pub mod server;
pub mod state_machine;
pub mod storage;

pub use error::{Code, CommandError};
pub use state_machine::{ClusterState, Command, Outcome, Response};
