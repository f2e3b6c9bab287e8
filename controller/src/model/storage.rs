//! What Ceph holds for the records: the status the leader's storage
//! reconciler ([`crate::storage`]) records per volume and per profile, and the
//! images of deleted volumes still to be removed. These are replicated like
//! everything else, so a new leader knows what its predecessor saw and what
//! it left undone.

use serde::{Deserialize, Serialize};

/// Longest status or error message kept in the replicated state; the
/// reconciler shortens Ceph's messages to fit.
pub const MAX_STATUS_MESSAGE: usize = 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageState {
    /// Not (yet) made real in Ceph: just created or changed, or no controller
    /// has a `[ceph]` section.
    #[default]
    Pending,
    /// Ceph holds what the record says.
    Ready,
    /// Ceph refused; the message says why. Retried by the reconciler.
    Failed,
}

impl std::fmt::Display for StorageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageStatus {
    pub state: StorageState,
    pub message: String,
    /// Revision of the last change to what Ceph must hold for this record
    /// (its creation, a resize, a new pool for a profile). An outcome is
    /// recorded only against the revision it was computed for, so a slow
    /// reconciler never marks a newer spec Ready.
    pub spec_revision: u64,
    /// It has been Ready before (a resize or a new pool makes it Pending
    /// again but keeps this): a volume whose image then vanishes from Ceph
    /// is reported Failed, never silently recreated empty.
    #[serde(default)]
    pub was_ready: bool,
}

impl StorageStatus {
    /// Pending again at `spec_revision`, remembering whether it was ever Ready.
    pub fn pending(spec_revision: u64, was_ready: bool) -> Self {
        StorageStatus { state: StorageState::Pending, message: String::new(), spec_revision, was_ready }
    }
}

/// Whose status a [`crate::state_machine::Command::SetStorageStatus`] sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageSubject {
    Volume(String),
    Profile(String),
}

impl std::fmt::Display for StorageSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageSubject::Volume(n) => write!(f, "volume/{n}"),
            StorageSubject::Profile(n) => write!(f, "profile/{n}"),
        }
    }
}

/// The image of a deleted volume, to be removed from Ceph. Recorded by the
/// command that deletes the volume and dropped by the one that reports the
/// image gone, so a removal survives leader changes and restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRemoval {
    pub pool: String,
    pub image: String,
    /// The volume it belonged to.
    pub volume: String,
    /// Revision of the deletion.
    pub requested_revision: u64,
    /// The volume had been Ready, so the image holds its data: a new volume
    /// may not take the image's name until it is removed. (Otherwise the
    /// image may not even exist, and a new volume of that name takes it
    /// over, cancelling the removal.)
    #[serde(default)]
    pub was_ready: bool,
    /// Why the last attempt failed (empty: none failed yet).
    #[serde(default)]
    pub last_error: String,
}
