//! Why a command was refused. The variants are the gRPC status codes the API
//! will return, so the mapping there is one line and clients can branch on
//! the code rather than parse the message.

use serde::{Deserialize, Serialize};

/// A refused command. It changed nothing; the message says exactly what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The command is malformed whatever the cluster's state (bad size, bad name, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// It names a node, VM, volume or profile that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// It would create something whose name is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// It is well formed but the cluster is not in a state that allows it
    /// (stale generation, volume in use, node not Ready, ...).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
}

/// The gRPC code a [`CommandError`] maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
}

impl CommandError {
    pub fn code(&self) -> Code {
        match self {
            CommandError::InvalidArgument(_) => Code::InvalidArgument,
            CommandError::NotFound(_) => Code::NotFound,
            CommandError::AlreadyExists(_) => Code::AlreadyExists,
            CommandError::FailedPrecondition(_) => Code::FailedPrecondition,
        }
    }

    /// The message without the code prefix, for a gRPC status whose code already says it.
    pub fn message(&self) -> &str {
        match self {
            CommandError::InvalidArgument(m)
            | CommandError::NotFound(m)
            | CommandError::AlreadyExists(m)
            | CommandError::FailedPrecondition(m) => m,
        }
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> CommandError {
    CommandError::InvalidArgument(msg.into())
}

pub(crate) fn precondition(msg: impl Into<String>) -> CommandError {
    CommandError::FailedPrecondition(msg.into())
}
