//! Storage profiles as records. The rules for what Ceph accepts live in
//! `basalt_storage::ceph::profiles`; this module only translates a record into
//! the storage crate's types so both sides refuse exactly the same things.
//!
//! Pool layout. A volume's `pool` is always the pool its RBD image lives in,
//! the one clients (agents, VMMs) open. For a replicated profile that pool is
//! replicated with the profile's size and min_size. For an erasure-coded
//! profile RBD needs a replicated pool for the image's header, object map and
//! omap (EC pools cannot hold omap), so `pool` is that replicated metadata
//! pool (size m+2, at most 10, min_size 2: it survives at least the m
//! failures the data survives) and the image's data objects go to the
//! erasure-coded pool `<pool>-data` (this profile's erasure-code profile,
//! `allow_ec_overwrites`). Every pool is tagged with the `rbd` application.
//! A pool holds the volumes of one profile only.

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
        // pool name is checked against the same specs when it is created.
        for spec in self.pools(&self.name) {
            spec.validate().map_err(map)?;
        }
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

    /// The pools a volume of this profile in `pool` needs, the image's own
    /// (replicated) pool first, then for an erasure-coded profile its data
    /// pool (see the module's documentation).
    pub fn pools(&self, pool: &str) -> Vec<PoolSpec> {
        match &self.kind {
            ProfileKind::Replicated { size, min_size } => vec![PoolSpec::replicated(pool, *size, *min_size)],
            ProfileKind::ErasureCoded { m, .. } => vec![
                PoolSpec::replicated(pool, m.saturating_add(2).min(10), 2),
                PoolSpec::erasure(&data_pool_name(pool), &self.name),
            ],
        }
    }

    /// Where the data objects of this profile's images in `pool` go, when
    /// not in `pool` itself.
    pub fn data_pool(&self, pool: &str) -> Option<String> {
        match self.kind {
            ProfileKind::Replicated { .. } => None,
            ProfileKind::ErasureCoded { .. } => Some(data_pool_name(pool)),
        }
    }

    pub fn tunables(&self) -> OsdTunables {
        OsdTunables { name: self.name.clone(), values: self.osd_tunables.clone() }
    }
}

/// The erasure-coded data pool beside an erasure-coded profile's pool.
pub fn data_pool_name(pool: &str) -> String {
    format!("{pool}-data")
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

    #[test]
    fn erasure_coded_volumes_keep_their_headers_in_a_replicated_pool() {
        use basalt_storage::ceph::profiles::PoolKind;
        let pools = ec(4, 2).pools("vms");
        assert_eq!(pools.len(), 2);
        assert_eq!((pools[0].name.as_str(), &pools[0].kind), ("vms", &PoolKind::Replicated { size: 4, min_size: 2 }));
        assert_eq!(pools[1].name, "vms-data");
        assert_eq!(pools[1].kind, PoolKind::Erasure { profile: "ec".into(), allow_ec_overwrites: true });
        assert!(pools.iter().all(|p| p.application.as_deref() == Some("rbd") && p.validate().is_ok()));
        assert_eq!(ec(4, 2).data_pool("vms").as_deref(), Some("vms-data"));
        assert_eq!(ec(2, 9).pools("vms")[0].kind, PoolKind::Replicated { size: 10, min_size: 2 });
        let rep = StorageProfile {
            name: "rep".into(),
            kind: ProfileKind::Replicated { size: 3, min_size: 2 },
            osd_tunables: BTreeMap::new(),
        };
        assert_eq!(rep.pools("vms").len(), 1);
        assert_eq!(rep.data_pool("vms"), None);
        // The data pool's name must fit Ceph's rules too.
        let long = "p".repeat(124);
        assert!(rep.pools(&long)[0].validate().is_ok());
        assert!(ec(2, 1).pools(&long)[1].validate().is_err());
    }
}
