//! The controller's Raft node: openraft's type configuration, the RocksDB log
//! and state machine behind openraft's storage traits, and the gRPC transport
//! behind its network traits. Everything else talks to [`crate::node`].

pub mod network;
pub mod service;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::error::CommandError;
use crate::state_machine::{Command, Response};

/// What a Raft log entry carries: a command and the time the proposing
/// controller stamped on it, so applying it never reads a clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub cmd: Command,
    pub now_ms: u64,
    /// Set by the controller that took the call: a retry of the same request
    /// gets the first answer instead of being applied twice.
    #[serde(default)]
    pub id: Option<String>,
}

/// The state machine's answer to one entry. A refused command is a normal
/// applied entry whose answer is the refusal.
pub type Reply = Result<Response, CommandError>;

openraft::declare_raft_types!(
    /// Basalt's openraft configuration: u64 controller ids, `host:port` nodes.
    pub TypeConfig:
        D = Request,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type StorageError = openraft::StorageError<NodeId>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Membership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type Metrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
