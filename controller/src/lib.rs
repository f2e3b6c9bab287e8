//! Basalt controller library: the cluster model, the deterministic state
//! machine that applies validated commands to it, and the scheduler. The Raft
//! node, storage and gRPC API are layered on top of these and add no rules of
//! their own.

pub mod config;
pub mod error;
pub mod model;
pub mod scheduler;
pub mod state_machine;

pub use error::{Code, CommandError};
pub use state_machine::{ClusterState, Command, Outcome, Response};
