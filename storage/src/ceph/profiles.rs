//! Storage profiles: how a pool stores data (replicated or erasure-coded)
//! and the OSD tunables that go with it. Validation lives here so a bad
//! profile is refused before anything reaches Ceph; the controller uses the
//! same checks for its records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::CephError;

/// Erasure-code plugins shipped with Ceph.
pub const EC_PLUGINS: &[&str] = &["jerasure", "isa", "lrc", "shec", "clay"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureCodeProfile {
    pub name: String,
    pub k: u32,
    pub m: u32,
    pub plugin: String,
    /// Plugin technique (`reed_sol_van`, `cauchy_good`, ...); `None` keeps the plugin's default.
    pub technique: Option<String>,
    pub crush_failure_domain: String,
    /// Bytes per chunk stripe; `None` keeps Ceph's default.
    pub stripe_unit: Option<u64>,
}

impl ErasureCodeProfile {
    /// A jerasure reed_sol_van profile with failure domain `osd`.
    pub fn new(name: &str, k: u32, m: u32) -> Self {
        ErasureCodeProfile {
            name: name.into(),
            k,
            m,
            plugin: "jerasure".into(),
            technique: Some("reed_sol_van".into()),
            crush_failure_domain: "osd".into(),
            stripe_unit: None,
        }
    }

    pub fn validate(&self) -> Result<(), CephError> {
        let bad = |why: String| Err(CephError::invalid(format!("erasure-code profile {:?}", self.name), why));
        validate_name("erasure-code profile", &self.name)?;
        if self.k < 2 {
            return bad(format!("k={} but k (data chunks) must be at least 2", self.k));
        }
        if self.m < 1 {
            return bad(format!("m={} but m (coding chunks) must be at least 1", self.m));
        }
        if self.k + self.m > 32 {
            return bad(format!("k+m={} is more than 32 chunks", self.k + self.m));
        }
        if !EC_PLUGINS.contains(&self.plugin.as_str()) {
            return bad(format!("unknown plugin {:?} (known: {})", self.plugin, EC_PLUGINS.join(", ")));
        }
        if let Some(t) = &self.technique {
            let known: &[&str] = match self.plugin.as_str() {
                "jerasure" => &[
                    "reed_sol_van",
                    "reed_sol_r6_op",
                    "cauchy_orig",
                    "cauchy_good",
                    "liberation",
                    "blaum_roth",
                    "liber8tion",
                ],
                "isa" => &["reed_sol_van", "cauchy"],
                _ => &[],
            };
            if !known.is_empty() && !known.contains(&t.as_str()) {
                return bad(format!("technique {t:?} is not one of plugin {}'s: {}", self.plugin, known.join(", ")));
            }
        }
        if !["osd", "host", "rack", "row", "room", "datacenter"].contains(&self.crush_failure_domain.as_str()) {
            return bad(format!("unknown crush failure domain {:?}", self.crush_failure_domain));
        }
        if let Some(su) = self.stripe_unit {
            if su == 0 || su % 4096 != 0 {
                return bad(format!("stripe_unit {su} must be a positive multiple of 4096"));
            }
        }
        Ok(())
    }

    /// The `profile` array of `osd erasure-code-profile set`.
    pub fn to_ceph_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("k={}", self.k),
            format!("m={}", self.m),
            format!("plugin={}", self.plugin),
            format!("crush-failure-domain={}", self.crush_failure_domain),
        ];
        if let Some(t) = &self.technique {
            v.push(format!("technique={t}"));
        }
        if let Some(su) = self.stripe_unit {
            v.push(format!("stripe_unit={su}"));
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolKind {
    Replicated {
        size: u32,
        min_size: u32,
    },
    /// An erasure-coded pool; `allow_ec_overwrites` must be on for RBD data.
    Erasure {
        profile: String,
        allow_ec_overwrites: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    pub kind: PoolKind,
    /// `None` leaves placement groups to the autoscaler.
    pub pg_num: Option<u32>,
    /// Application tag (`rbd` for VM disks).
    pub application: Option<String>,
}

impl PoolSpec {
    pub fn replicated(name: &str, size: u32, min_size: u32) -> Self {
        PoolSpec {
            name: name.into(),
            kind: PoolKind::Replicated { size, min_size },
            pg_num: None,
            application: Some("rbd".into()),
        }
    }

    pub fn erasure(name: &str, profile: &str) -> Self {
        PoolSpec {
            name: name.into(),
            kind: PoolKind::Erasure { profile: profile.into(), allow_ec_overwrites: true },
            pg_num: None,
            application: Some("rbd".into()),
        }
    }

    pub fn validate(&self) -> Result<(), CephError> {
        let bad = |why: String| Err(CephError::invalid(format!("pool {:?}", self.name), why));
        validate_name("pool", &self.name)?;
        match &self.kind {
            PoolKind::Replicated { size, min_size } => {
                if *size < 1 || *size > 10 {
                    return bad(format!("size {size} must be between 1 and 10"));
                }
                if *min_size < 1 || min_size > size {
                    return bad(format!("min_size {min_size} must be between 1 and size ({size})"));
                }
            }
            PoolKind::Erasure { profile, allow_ec_overwrites } => {
                validate_name("erasure-code profile", profile)?;
                if self.application.as_deref() == Some("rbd") && !allow_ec_overwrites {
                    return bad(
                        "an erasure-coded pool for RBD needs allow_ec_overwrites (RBD overwrites objects in place)"
                            .into(),
                    );
                }
            }
        }
        if let Some(pg) = self.pg_num {
            if pg == 0 || !pg.is_power_of_two() || pg > 32768 {
                return bad(format!("pg_num {pg} must be a power of two between 1 and 32768"));
            }
        }
        Ok(())
    }
}

pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), CephError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CephError::invalid(
            what,
            format!("name {name:?} must be 1-128 characters of A-Z a-z 0-9 - _ . and not start with '.'"),
        ))
    }
}

/// The OSD settings a storage profile may tune, with what each accepts.
/// Values go to the monitors' config database (`config set who=osd`), never
/// to ceph.conf, whose values would silently win over them.
pub const OSD_TUNABLES: &[(&str, u64, u64)] = &[
    // name, min, max
    ("osd_memory_target", 939_524_096, 1 << 40),
    ("osd_max_write_size", 1, 4096), // MiB
    ("osd_client_message_size_cap", 1 << 20, 1 << 34),
    ("osd_deep_scrub_stride", 4096, 1 << 30),
    ("osd_map_cache_size", 1, 100_000),
    ("osd_recovery_op_priority", 1, 63),
    ("osd_recovery_max_active", 0, 1000),
    ("osd_max_backfills", 1, 1000),
    ("osd_min_pg_log_entries", 1, 1_000_000),
    ("osd_max_pg_log_entries", 1, 1_000_000),
    ("osd_mon_heartbeat_interval", 1, 3600), // seconds
];

/// A named set of OSD tunables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdTunables {
    pub name: String,
    pub values: BTreeMap<String, u64>,
}

impl OsdTunables {
    pub fn validate(&self) -> Result<(), CephError> {
        validate_name("tunable set", &self.name)?;
        for (k, v) in &self.values {
            let Some(&(_, min, max)) = OSD_TUNABLES.iter().find(|(n, ..)| n == k) else {
                let known: Vec<&str> = OSD_TUNABLES.iter().map(|t| t.0).collect();
                return Err(CephError::invalid(
                    format!("OSD tunable {k:?}"),
                    format!("not a tunable Basalt manages (known: {})", known.join(", ")),
                ));
            };
            if *v < min || *v > max {
                return Err(CephError::invalid(format!("OSD tunable {k}"), format!("{v} is outside {min}..={max}")));
            }
        }
        let (lo, hi) = (self.values.get("osd_min_pg_log_entries"), self.values.get("osd_max_pg_log_entries"));
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo > hi {
                return Err(CephError::invalid(
                    "OSD tunables",
                    format!("osd_min_pg_log_entries {lo} is above osd_max_pg_log_entries {hi}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: Result<(), CephError>, needle: &str) {
        let e = r.expect_err("must be refused").to_string();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    }

    #[test]
    fn erasure_code_profiles_are_checked() {
        assert!(ErasureCodeProfile::new("ec21", 2, 1).validate().is_ok());
        refused(ErasureCodeProfile::new("ec11", 1, 1).validate(), "at least 2");
        refused(ErasureCodeProfile::new("ec20", 2, 0).validate(), "at least 1");
        let mut p = ErasureCodeProfile::new("x", 2, 1);
        p.plugin = "zfec".into();
        refused(p.validate(), "unknown plugin");
        let mut p = ErasureCodeProfile::new("x", 2, 1);
        p.technique = Some("fast".into());
        refused(p.validate(), "technique");
        let mut p = ErasureCodeProfile::new("x", 4, 2);
        p.stripe_unit = Some(1000);
        refused(p.validate(), "stripe_unit");
        refused(ErasureCodeProfile::new("bad name", 2, 1).validate(), "name");
        let mut p = ErasureCodeProfile::new("x", 4, 2);
        p.stripe_unit = Some(16384);
        assert_eq!(
            p.to_ceph_args(),
            vec![
                "k=4",
                "m=2",
                "plugin=jerasure",
                "crush-failure-domain=osd",
                "technique=reed_sol_van",
                "stripe_unit=16384"
            ]
        );
    }

    #[test]
    fn pools_are_checked() {
        assert!(PoolSpec::replicated("rbd", 3, 2).validate().is_ok());
        refused(PoolSpec::replicated("rbd", 2, 3).validate(), "min_size");
        refused(PoolSpec::replicated("rbd", 0, 0).validate(), "size");
        let mut ec = PoolSpec::erasure("rbd-ec", "ec21");
        assert!(ec.validate().is_ok());
        ec.kind = PoolKind::Erasure { profile: "ec21".into(), allow_ec_overwrites: false };
        refused(ec.validate(), "allow_ec_overwrites");
        let mut p = PoolSpec::replicated("rbd", 3, 2);
        p.pg_num = Some(30);
        refused(p.validate(), "power of two");
    }

    #[test]
    fn tunables_are_checked() {
        let mut t = OsdTunables { name: "small".into(), values: BTreeMap::new() };
        t.values.insert("osd_max_backfills".into(), 2);
        t.values.insert("osd_memory_target".into(), 1 << 30);
        assert!(t.validate().is_ok());
        t.values.insert("osd_memory_target".into(), 512 << 20);
        refused(t.validate(), "outside");
        t.values.insert("osd_memory_target".into(), 1 << 30);
        t.values.insert("osd_op_threads".into(), 2);
        refused(t.validate(), "not a tunable");
        t.values.remove("osd_op_threads");
        t.values.insert("osd_min_pg_log_entries".into(), 500);
        t.values.insert("osd_max_pg_log_entries".into(), 100);
        refused(t.validate(), "above");
        assert_eq!(OSD_TUNABLES.len(), 11);
    }
}
