//! Ceph administration through monitor commands: erasure-code profiles,
//! pools, OSD tunables, cephx client caps, the balancer, the blocklist
//! (fencing), health and capacity. Each call validates its input first;
//! nothing invalid is sent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::cluster::Cluster;
use super::error::CephError;
use super::profiles::{validate_name, ErasureCodeProfile, OsdTunables, PoolKind, PoolSpec, OSD_TUNABLES};

/// One blocklist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistEntry {
    pub addr: String,
    pub until: String,
}

/// Cluster health as the monitors summarise it.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// HEALTH_OK, HEALTH_WARN or HEALTH_ERR.
    pub status: String,
    /// Check name -> summary message.
    pub checks: BTreeMap<String, String>,
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Cluster {
    // ---- erasure-code profiles ----

    /// Creates an erasure-code profile. Ceph accepts the same values again
    /// (idempotent) and refuses different ones for an existing name; Basalt
    /// never sends `force`, which would rewrite a profile a pool may use.
    pub fn create_ec_profile(&self, p: &ErasureCodeProfile) -> Result<(), CephError> {
        p.validate()?;
        self.mon_command(
            &json!({"prefix": "osd erasure-code-profile set", "name": p.name, "profile": p.to_ceph_args()}),
        )?;
        Ok(())
    }

    pub fn ec_profiles(&self) -> Result<Vec<String>, CephError> {
        self.mon_json(&json!({"prefix": "osd erasure-code-profile ls", "format": "json"}))
    }

    /// The profile's settings as Ceph stores them (all strings).
    pub fn ec_profile(&self, name: &str) -> Result<BTreeMap<String, String>, CephError> {
        validate_name("erasure-code profile", name)?;
        let v: BTreeMap<String, Value> =
            self.mon_json(&json!({"prefix": "osd erasure-code-profile get", "name": name, "format": "json"}))?;
        Ok(v.iter().map(|(k, v)| (k.clone(), s(v))).collect())
    }

    pub fn remove_ec_profile(&self, name: &str) -> Result<(), CephError> {
        validate_name("erasure-code profile", name)?;
        self.mon_command(&json!({"prefix": "osd erasure-code-profile rm", "name": name}))?;
        Ok(())
    }

    // ---- pools ----

    pub fn create_pool(&self, spec: &PoolSpec) -> Result<(), CephError> {
        spec.validate()?;
        let mut cmd = json!({"prefix": "osd pool create", "pool": spec.name});
        if let Some(pg) = spec.pg_num {
            cmd["pg_num"] = json!(pg);
            cmd["pgp_num"] = json!(pg);
        }
        match &spec.kind {
            PoolKind::Replicated { .. } => cmd["pool_type"] = json!("replicated"),
            PoolKind::Erasure { profile, .. } => {
                if !self.ec_profiles()?.iter().any(|p| p == profile) {
                    return Err(CephError::invalid(
                        format!("pool {:?}", spec.name),
                        format!("erasure-code profile {profile:?} does not exist"),
                    ));
                }
                cmd["pool_type"] = json!("erasure");
                cmd["erasure_code_profile"] = json!(profile);
            }
        }
        self.mon_command(&cmd)?;
        match &spec.kind {
            PoolKind::Replicated { size, min_size } => {
                self.set_pool(&spec.name, "size", &size.to_string())?;
                self.set_pool(&spec.name, "min_size", &min_size.to_string())?;
            }
            PoolKind::Erasure { allow_ec_overwrites, .. } => {
                if *allow_ec_overwrites {
                    self.set_pool(&spec.name, "allow_ec_overwrites", "true")?;
                }
            }
        }
        if spec.pg_num.is_none() {
            self.set_pool(&spec.name, "pg_autoscale_mode", "on")?;
        }
        if let Some(app) = &spec.application {
            self.mon_command(&json!({"prefix": "osd pool application enable", "pool": spec.name, "app": app}))?;
        }
        Ok(())
    }

    /// Sets one pool property (`size`, `min_size`, `pg_num`, `allow_ec_overwrites`, ...).
    pub fn set_pool(&self, pool: &str, var: &str, val: &str) -> Result<(), CephError> {
        validate_name("pool", pool)?;
        if var.is_empty() || !var.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(CephError::invalid("pool property", format!("{var:?} is not a property name")));
        }
        self.mon_command(&json!({"prefix": "osd pool set", "pool": pool, "var": var, "val": val}))?;
        Ok(())
    }

    /// Reads one pool property, as a string.
    pub fn pool_property(&self, pool: &str, var: &str) -> Result<String, CephError> {
        validate_name("pool", pool)?;
        let v: BTreeMap<String, Value> =
            self.mon_json(&json!({"prefix": "osd pool get", "pool": pool, "var": var, "format": "json"}))?;
        v.get(var)
            .map(s)
            .ok_or_else(|| CephError::Reply { op: "osd pool get".into(), detail: format!("no {var} in {v:?}") })
    }

    pub fn pools(&self) -> Result<Vec<String>, CephError> {
        let v: Vec<Value> = self.mon_json(&json!({"prefix": "osd pool ls", "format": "json"}))?;
        Ok(v.iter().map(s).collect())
    }

    /// Deletes a pool and its data. Needs `mon_allow_pool_delete`.
    pub fn remove_pool(&self, pool: &str) -> Result<(), CephError> {
        validate_name("pool", pool)?;
        self.mon_command(
            &json!({"prefix": "osd pool rm", "pool": pool, "pool2": pool, "yes_i_really_really_mean_it": true}),
        )?;
        Ok(())
    }

    // ---- OSD tunables ----

    /// Puts each tunable in the monitors' config database for all OSDs.
    /// Validated as a whole first, so a bad set changes nothing.
    pub fn apply_osd_tunables(&self, t: &OsdTunables) -> Result<(), CephError> {
        t.validate()?;
        for (k, v) in &t.values {
            self.mon_command(&json!({"prefix": "config set", "who": "osd", "name": k, "value": v.to_string()}))?;
        }
        Ok(())
    }

    /// The value the config database holds for `who` (`osd` or `osd.N`).
    pub fn osd_config(&self, who: &str, name: &str) -> Result<String, CephError> {
        if !OSD_TUNABLES.iter().any(|(n, ..)| *n == name) {
            return Err(CephError::invalid("OSD tunable", format!("{name:?} is not a tunable Basalt manages")));
        }
        let reply = self.mon_command(&json!({"prefix": "config get", "who": who, "key": name, "format": "json"}))?;
        let v: Value = serde_json::from_slice(&reply.out)
            .map_err(|e| CephError::Reply { op: "config get".into(), detail: e.to_string() })?;
        Ok(s(&v))
    }

    /// Removes tunables from the config database (back to defaults).
    pub fn reset_osd_tunables(&self, names: &[&str]) -> Result<(), CephError> {
        for n in names {
            if !OSD_TUNABLES.iter().any(|(t, ..)| t == n) {
                return Err(CephError::invalid("OSD tunable", format!("{n:?} is not a tunable Basalt manages")));
            }
        }
        for n in names {
            self.mon_command(&json!({"prefix": "config rm", "who": "osd", "name": n}))?;
        }
        Ok(())
    }

    // ---- cephx clients ----

    /// The caps of `client.<id>` by service (`mon`, `osd`, `mgr`, ...), as
    /// Ceph stores them (`auth get`), or `None` if Ceph has no such client.
    /// The client's key is not returned.
    pub fn client_caps(&self, id: &str) -> Result<Option<BTreeMap<String, String>>, CephError> {
        validate_client_id(id)?;
        let entity = format!("client.{id}");
        let reply: Result<Vec<Value>, _> =
            self.mon_json(&json!({"prefix": "auth get", "entity": entity, "format": "json"}));
        let entries = match reply {
            Ok(e) => e,
            Err(e) if e.code() == Some(-libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let entry = entries.iter().find(|e| e.get("entity").and_then(Value::as_str) == Some(entity.as_str()));
        let Some(entry) = entry else {
            return Err(CephError::Reply { op: "auth get".into(), detail: format!("no entry for {entity}") });
        };
        let caps = entry.get("caps").and_then(Value::as_object).map(|c| c.iter().map(|(k, v)| (k.clone(), s(v))));
        Ok(Some(caps.into_iter().flatten().collect()))
    }

    /// Replaces every cap of `client.<id>` with `caps` (`auth caps`): a
    /// service not named loses its caps; the key is unchanged. The client
    /// must exist (Ceph answers ENOENT otherwise). Ceph checks the caps'
    /// grammar and refuses what it cannot parse.
    pub fn set_client_caps(&self, id: &str, caps: &BTreeMap<String, String>) -> Result<(), CephError> {
        validate_client_id(id)?;
        let mut args = Vec::new();
        for (service, cap) in caps {
            if service.is_empty() || !service.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(CephError::invalid(
                    "cap",
                    format!("{service:?} is not a service name (mon, osd, mgr, mds)"),
                ));
            }
            args.push(service.clone());
            args.push(cap.clone());
        }
        self.mon_command(&json!({"prefix": "auth caps", "entity": format!("client.{id}"), "caps": args}))?;
        Ok(())
    }

    // ---- balancer ----

    pub fn balancer_status(&self) -> Result<Value, CephError> {
        self.mon_json(&json!({"prefix": "balancer status", "format": "json"}))
    }

    /// The balancer's score of the current distribution (lower is better).
    pub fn balancer_eval(&self) -> Result<String, CephError> {
        let r = self.mon_command(&json!({"prefix": "balancer eval"}))?;
        let out = String::from_utf8_lossy(&r.out).trim().to_string();
        Ok(if out.is_empty() { r.status } else { out })
    }

    pub fn set_balancer_mode(&self, mode: &str) -> Result<(), CephError> {
        if !["none", "crush-compat", "upmap"].contains(&mode) {
            return Err(CephError::invalid("balancer mode", format!("{mode:?} is not none, crush-compat or upmap")));
        }
        self.mon_command(&json!({"prefix": "balancer mode", "mode": mode}))?;
        Ok(())
    }

    // ---- blocklist (fencing) ----

    /// Blocklists a client address (`ip:port/nonce`, or `ip:0/0` for every
    /// client of a host) so the OSDs refuse its I/O from now on.
    pub fn blocklist_add(&self, addr: &str, expire_secs: u32) -> Result<(), CephError> {
        validate_addr(addr)?;
        if expire_secs == 0 {
            return Err(CephError::invalid("blocklist expiry", "must be at least 1 second"));
        }
        self.mon_command(
            &json!({"prefix": "osd blocklist", "blocklistop": "add", "addr": addr, "expire": f64::from(expire_secs)}),
        )?;
        Ok(())
    }

    /// Fences a client: blocklists it, then makes sure this client holds
    /// the map that says so (see [`Cluster::wait_for_latest_osdmap`]).
    pub fn fence(&self, addr: &str, expire_secs: u32) -> Result<(), CephError> {
        self.blocklist_add(addr, expire_secs)?;
        self.wait_for_latest_osdmap()
    }

    pub fn blocklist_remove(&self, addr: &str) -> Result<(), CephError> {
        validate_addr(addr)?;
        self.mon_command(&json!({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}))?;
        Ok(())
    }

    pub fn blocklist(&self) -> Result<Vec<BlocklistEntry>, CephError> {
        let r = self.mon_command(&json!({"prefix": "osd blocklist ls", "format": "json"}))?;
        // Ceph prints two JSON arrays back to back (addresses, then ranges).
        let mut out = Vec::new();
        for doc in serde_json::Deserializer::from_slice(&r.out).into_iter::<Vec<Value>>() {
            let doc = doc.map_err(|e| CephError::Reply { op: "osd blocklist ls".into(), detail: e.to_string() })?;
            for e in doc {
                let addr = e.get("addr").or_else(|| e.get("range")).map(s).unwrap_or_default();
                out.push(BlocklistEntry { addr, until: e.get("until").map(s).unwrap_or_default() });
            }
        }
        Ok(out)
    }

    // ---- health and capacity ----

    pub fn health(&self) -> Result<Health, CephError> {
        let v: Value = self.mon_json(&json!({"prefix": "health", "format": "json"}))?;
        let status = v.get("status").map(s).unwrap_or_else(|| "UNKNOWN".into());
        let mut checks = BTreeMap::new();
        if let Some(c) = v.get("checks").and_then(Value::as_object) {
            for (k, d) in c {
                let msg = d.pointer("/summary/message").map(s).unwrap_or_default();
                checks.insert(k.clone(), msg);
            }
        }
        Ok(Health { status, checks })
    }

    /// `ceph df` as JSON: cluster totals and per-pool usage.
    pub fn df(&self) -> Result<Value, CephError> {
        self.mon_json(&json!({"prefix": "df", "format": "json"}))
    }
}

/// A cephx client id without the `client.` prefix.
fn validate_client_id(id: &str) -> Result<(), CephError> {
    if id.is_empty()
        || id.starts_with("client.")
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(CephError::invalid(
            "client id",
            format!("{id:?} must be 1 or more of A-Z a-z 0-9 - _ ., without the \"client.\" prefix"),
        ));
    }
    Ok(())
}

/// Accepts `ip:port/nonce` (one client) or `ip:port` forms Ceph parses.
fn validate_addr(addr: &str) -> Result<(), CephError> {
    let bad = || {
        CephError::invalid("client address", format!("{addr:?} is not ip:port/nonce (as `rados_getaddrs` prints it)"))
    };
    let a = addr
        .strip_prefix("v2:")
        .or_else(|| addr.strip_prefix("v1:"))
        .or_else(|| addr.strip_prefix("any:"))
        .unwrap_or(addr);
    let (hostport, nonce) = a.split_once('/').unwrap_or((a, "0"));
    nonce.parse::<u64>().map_err(|_| bad())?;
    let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().map_err(|_| bad())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{validate_addr, validate_client_id};

    #[test]
    fn client_ids_are_checked() {
        assert!(validate_client_id("vm").is_ok());
        assert!(validate_client_id("basalt-vm_1.a").is_ok());
        assert!(validate_client_id("").is_err());
        assert!(validate_client_id("client.vm").is_err());
        assert!(validate_client_id("vm x").is_err());
        assert!(validate_client_id("vm\"").is_err());
    }

    #[test]
    fn blocklist_addresses_are_checked() {
        assert!(validate_addr("127.0.0.1:0/3735928559").is_ok());
        assert!(validate_addr("v2:10.0.0.2:6800/12").is_ok());
        assert!(validate_addr("[::1]:0/1").is_ok());
        assert!(validate_addr("10.0.0.2").is_err());
        assert!(validate_addr("host:0/1").is_err());
        assert!(validate_addr("10.0.0.2:0/x").is_err());
    }
}
