//! Storage profiles as records. The rules for what Ceph accepts live in
//! `basalt_storage::ceph::profiles`; this module only translates a record into
//! the storage crate's types so both sides refuse exactly the same things.

use std::collections::BTreeMap;

use basalt_storage::ceph::profiles::{ErasureCodeProfile, OsdTunables, PoolSpec};
use basalt_storage::ceph::CephError;
use serde::{Deserialize, Serialize};

use super::names::validate_name;
use crate::error::{invalid, CommandError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProfileKind {
    Replicated {
        size: u32,
        min_size: u32,
    },
    ErasureCoded {
        k: u32,
        m: u32,
        plugin: String,
        technique: Option<String>,
        crush_failure_domain: String,
        stripe_unit: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageProfile {
    pub name: String,
    pub kind: ProfileKind,
    #[serde(default)]
    pub osd_tunables: BTreeMap<String, u64>,
}

impl StorageProfile {
    pub fn validate(&self) -> Result<(), CommandError> {
        validate_name("storage profile", &self.name)?;
        let map = |e: CephError| invalid(format!("storage profile {}: {e}", self.name));
        if let Some(ec) = self.erasure_code_profile() {
            ec.validate().map_err(map)?;
        }
        // The profile's own name stands in for the pool here; each volume's
        // pool name is checked against the same spec when it is created.
        self.pool_spec(&self.name).validate().map_err(map)?;
        self.tunables().validate().map_err(map)
    }

    /// The erasure-code profile Ceph needs, named after this profile.
    pub fn erasure_code_profile(&self) -> Option<ErasureCodeProfile> {
        match &self.kind {
            ProfileKind::Replicated { .. } => None,
            ProfileKind::ErasureCoded { k, m, plugin, technique, crush_failure_domain, stripe_unit } => {
                Some(ErasureCodeProfile {
                    name: self.name.clone(),
                    k: *k,
                    m: *m,
                    plugin: plugin.clone(),
                    technique: technique.clone(),
                    crush_failure_domain: crush_failure_domain.clone(),
                    stripe_unit: *stripe_unit,
                })
            }
        }
    }

    /// The pool a volume of this profile lives in.
    pub fn pool_spec(&self, pool: &str) -> PoolSpec {
        match &self.kind {
            ProfileKind::Replicated { size, min_size } => PoolSpec::replicated(pool, *size, *min_size),
            ProfileKind::ErasureCoded { .. } => PoolSpec::erasure(pool, &self.name),
        }
    }

    pub fn tunables(&self) -> OsdTunables {
        OsdTunables { name: self.name.clone(), values: self.osd_tunables.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec(k: u32, m: u32) -> StorageProfile {
        StorageProfile {
            name: "ec".into(),
            kind: ProfileKind::ErasureCoded {
                k,
                m,
                plugin: "jerasure".into(),
                technique: Some("reed_sol_van".into()),
                crush_failure_domain: "host".into(),
                stripe_unit: Some(16384),
            },
            osd_tunables: BTreeMap::new(),
        }
    }

    #[test]
    fn storage_crate_rules_apply() {
        assert!(ec(4, 2).validate().is_ok());
        let e = ec(1, 1).validate().unwrap_err();
        assert!(matches!(e, CommandError::InvalidArgument(_)));
        assert!(e.message().starts_with("storage profile ec: "), "{e}");
        assert!(e.message().contains("k (data chunks) must be at least 2"), "{e}");
        let rep = |size, min_size| StorageProfile {
            name: "rep".into(),
            kind: ProfileKind::Replicated { size, min_size },
            osd_tunables: BTreeMap::new(),
        };
        assert!(rep(3, 2).validate().is_ok());
        assert!(rep(2, 3).validate().unwrap_err().message().contains("min_size 3"));
        let mut t = rep(3, 2);
        t.osd_tunables.insert("osd_max_backfills".into(), 0);
        assert!(t.validate().unwrap_err().message().contains("osd_max_backfills"));
        t.osd_tunables.insert("osd_max_backfills".into(), 4);
        assert!(t.validate().is_ok());
        assert_eq!(ec(4, 2).erasure_code_profile().map(|p| p.to_ceph_args().len()), Some(6));
    }
}
