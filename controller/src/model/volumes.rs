//! Volumes: records of RBD images. Creating the image in Ceph is the
//! leader's storage reconciler's job ([`crate::storage`]); here the record
//! is checked and reserved.

use serde::{Deserialize, Serialize};

use super::names::validate_name;
use crate::error::{invalid, CommandError};

/// RBD images are addressed in 512-byte sectors by the guest.
pub const SECTOR: u64 = 512;
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;
/// librbd's limit (the storage crate checks the same before creating one).
pub const MAX_IMAGE_NAME: usize = 95;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub pool: String,
    /// RBD image name inside the pool.
    pub image: String,
    pub size_bytes: u64,
    /// Storage profile the pool was made with.
    pub profile: String,
}

impl Volume {
    /// Checks that need only the record. The pool name is checked by the
    /// storage crate when the state machine builds the profile's pool spec.
    pub fn validate(&self) -> Result<(), CommandError> {
        validate_name("volume", &self.name)?;
        let what = format!("volume {}", self.name);
        // librbd refuses '/' and '@' (namespace and snapshot separators) and
        // names of 96 bytes or more (RBD_MAX_IMAGE_NAME_SIZE).
        let image_ok = !self.image.is_empty()
            && self.image.len() <= MAX_IMAGE_NAME
            && self.image.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@');
        if !image_ok {
            return Err(invalid(format!(
                "{what}: image name {:?} must be 1-{MAX_IMAGE_NAME} printable characters without '/', '@' or spaces",
                self.image
            )));
        }
        let s = self.size_bytes;
        if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&s) || !s.is_multiple_of(SECTOR) {
            return Err(invalid(format!(
                "{what}: size {s} bytes must be a multiple of {SECTOR} between {MIN_VOLUME_BYTES} (1 MiB) and {MAX_VOLUME_BYTES} (1 PiB)"
            )));
        }
        validate_name("storage profile", &self.profile)
    }
}
