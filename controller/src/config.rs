//! Controller configuration: a TOML file and/or command-line flags (flags
//! win), validated as a whole before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::names::is_host_port;

/// What the file may say; every field can also come from a flag.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub bootstrap: bool,
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub timing: TimingConfig,
    pub event_capacity: Option<usize>,
    /// Without it volumes and profiles are records only.
    pub ceph: Option<CephFileConfig>,
}

/// `[ceph]`: how the leader's storage reconciler reaches Ceph.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CephFileConfig {
    /// ceph.conf (monitors, and the keyring unless `keyring` is given).
    pub conf: Option<PathBuf>,
    /// cephx client id without the `client.` prefix (default admin). It
    /// needs the caps to create pools, erasure-code profiles and config
    /// options (mon 'allow *' or equivalent) and RBD images.
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    /// Placement groups of each pool the controller creates; without it
    /// Ceph's `osd_pool_default_pg_num` with the PG autoscaler on.
    pub pg_num: Option<u32>,
    /// The restricted cephx client VMs open their disks with (id without
    /// `client.`, e.g. `vm`). When set, the leader owns its caps: `mon
    /// 'profile rbd'` and `osd`/`mgr` `profile rbd` on exactly the pools
    /// Basalt volumes use plus `vm_client_pools`. The client must exist.
    pub vm_client: Option<String>,
    /// Pools the VM client keeps access to besides the volumes' own.
    pub vm_client_pools: Option<Vec<String>>,
}

/// The validated `[ceph]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CephConfig {
    pub conf: PathBuf,
    pub id: String,
    pub keyring: Option<PathBuf>,
    pub pg_num: Option<u32>,
    /// The VM client whose caps the leader keeps in line with the pools.
    pub vm_client: Option<String>,
    /// Extra pools for the VM client, sorted, no duplicates.
    pub vm_client_pools: Vec<String>,
}

/// A cephx client id: not empty, A-Z a-z 0-9 - _ . only, no `client.`.
fn check_client_id(key: &str, id: &str) -> Result<(), ConfigError> {
    if id.starts_with("client.") {
        return Err(ConfigError::Invalid(format!("{key} {id:?}: give the client id without the \"client.\" prefix")));
    }
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(ConfigError::Invalid(format!("{key} {id:?} must be 1 or more of A-Z a-z 0-9 - _ .")));
    }
    Ok(())
}

impl CephFileConfig {
    fn validate(self) -> Result<CephConfig, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        let conf = self.conf.ok_or_else(|| bad("ceph.conf is required in [ceph] (--ceph-conf FILE)".into()))?;
        if !conf.is_file() {
            return Err(bad(format!("ceph.conf {} is not a file", conf.display())));
        }
        let id = self.id.unwrap_or_else(|| "admin".into());
        check_client_id("ceph.id", &id)?;
        if let Some(k) = &self.keyring {
            if !k.is_file() {
                return Err(bad(format!("ceph.keyring {} is not a file", k.display())));
            }
        }
        if let Some(pg) = self.pg_num {
            if pg == 0 || !pg.is_power_of_two() || pg > 32768 {
                return Err(bad(format!("ceph.pg_num {pg} must be a power of two between 1 and 32768")));
            }
        }
        if let Some(vm) = &self.vm_client {
            check_client_id("ceph.vm_client", vm)?;
            if *vm == id || vm == "admin" {
                return Err(bad(format!(
                    "ceph.vm_client {vm:?} would lose every cap but profile rbd; name the VMs' own client (e.g. \"vm\"), not the controller's or admin"
                )));
            }
        }
        let mut vm_client_pools = self.vm_client_pools.unwrap_or_default();
        if !vm_client_pools.is_empty() && self.vm_client.is_none() {
            return Err(bad("ceph.vm_client_pools needs ceph.vm_client".into()));
        }
        for p in &vm_client_pools {
            let ok = !p.is_empty()
                && p.len() <= 128
                && !p.starts_with('.')
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(bad(format!(
                    "ceph.vm_client_pools: pool {p:?} must be 1-128 of A-Z a-z 0-9 - _ . and not start with '.'"
                )));
            }
        }
        vm_client_pools.sort();
        vm_client_pools.dedup();
        Ok(CephConfig {
            conf,
            id,
            keyring: self.keyring,
            pg_num: self.pg_num,
            vm_client: self.vm_client,
            vm_client_pools,
        })
    }
}

/// Raft timing and compaction. Defaults suit a LAN (or loopback) cluster.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a snapshot (and compact the log) after this many entries.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging
    /// followers catch up from the log rather than a full snapshot.
    pub keep_entries_after_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 700,
            election_timeout_max_ms: 1400,
            snapshot_after_entries: 5000,
            keep_entries_after_snapshot: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    pub node_lease_ms: u64,
    pub agent_heartbeat_ms: u64,
    pub reconcile_ms: u64,
    /// How long a call waits for a leader before answering UNAVAILABLE.
    pub leader_wait_ms: u64,
    /// Silence after which an Unreachable node is fenced out of Ceph (and
    /// its HA VMs restarted elsewhere). Longer than the lease, so a short
    /// network blip makes a node Unreachable without fencing it.
    pub fence_after_ms: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        TimingConfig {
            node_lease_ms: 10_000,
            agent_heartbeat_ms: 2_000,
            reconcile_ms: 500,
            leader_wait_ms: 10_000,
            fence_after_ms: 20_000,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Raft node id, unique in the cluster, never 0.
    pub node_id: u64,
    /// Address the gRPC port (public API, agent API and Raft) listens on.
    pub listen: SocketAddr,
    /// host:port other controllers and clients use to reach this one.
    pub advertise: String,
    /// Where RocksDB keeps this controller's log and state machine.
    pub data_dir: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    /// Initialise a new cluster of this controller and `peers` if this data
    /// dir has never been part of one. Give it to one controller only.
    pub bootstrap: bool,
    pub peers: BTreeMap<u64, String>,
    pub raft: RaftTuning,
    pub timing: TimingConfig,
    pub event_capacity: usize,
    /// Ceph for the leader's storage reconciler; `None`: records only.
    pub ceph: Option<CephConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        let node_id = self.node_id.ok_or_else(|| bad("node_id is required (--node-id or node_id = N)".into()))?;
        if node_id == 0 {
            return Err(bad("node_id must be at least 1 (0 means \"no node\" in Raft)".into()));
        }
        let listen = self.listen.ok_or_else(|| bad("listen is required (--listen HOST:PORT)".into()))?;
        let data_dir = self.data_dir.ok_or_else(|| bad("data_dir is required (--data-dir DIR)".into()))?;
        let advertise = self.advertise.unwrap_or_else(|| listen.to_string());
        if !is_host_port(&advertise) {
            return Err(bad(format!("advertise address {advertise:?} must be host:port")));
        }
        if listen.ip().is_unspecified() && advertise == listen.to_string() {
            return Err(bad(format!("listen is {listen}: give --advertise, the address peers should dial")));
        }
        let mut peers = BTreeMap::new();
        for (id, addr) in self.peers {
            let n: u64 = id.parse().map_err(|_| bad(format!("peer id {id:?} is not a number")))?;
            if n == 0 {
                return Err(bad("peer id 0 is reserved".into()));
            }
            if n == node_id {
                return Err(bad(format!("peer {n} has this controller's own node_id")));
            }
            if !is_host_port(&addr) {
                return Err(bad(format!("peer {n} address {addr:?} must be host:port")));
            }
            peers.insert(n, addr);
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return Err(bad(format!(
                "raft.election_timeout_min_ms ({}) must exceed twice raft.heartbeat_ms ({})",
                r.election_timeout_min_ms, r.heartbeat_ms
            )));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(bad("raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into()));
        }
        if r.snapshot_after_entries == 0 {
            return Err(bad("raft.snapshot_after_entries must be at least 1".into()));
        }
        let t = &self.timing;
        if t.node_lease_ms <= t.agent_heartbeat_ms {
            return Err(bad(format!(
                "timing.node_lease_ms ({}) must exceed timing.agent_heartbeat_ms ({})",
                t.node_lease_ms, t.agent_heartbeat_ms
            )));
        }
        if t.fence_after_ms <= t.node_lease_ms {
            return Err(bad(format!(
                "timing.fence_after_ms ({}) must exceed timing.node_lease_ms ({}): a node is fenced only after it has been Unreachable for a while",
                t.fence_after_ms, t.node_lease_ms
            )));
        }
        if t.reconcile_ms == 0 || t.leader_wait_ms == 0 || t.agent_heartbeat_ms == 0 {
            return Err(bad("timing values must be positive".into()));
        }
        let ceph = self.ceph.map(CephFileConfig::validate).transpose()?;
        Ok(Config {
            ceph,
            node_id,
            listen,
            advertise,
            data_dir,
            metrics_listen: self.metrics_listen,
            bootstrap: self.bootstrap,
            peers,
            raft: self.raft,
            timing: self.timing,
            event_capacity: self.event_capacity.unwrap_or(crate::model::events::DEFAULT_EVENT_CAPACITY),
        })
    }
}

impl Config {
    pub fn timing(&self) -> crate::node::Timing {
        let ms = Duration::from_millis;
        crate::node::Timing {
            leader_wait: ms(self.timing.leader_wait_ms),
            node_lease: ms(self.timing.node_lease_ms),
            fence_after: ms(self.timing.fence_after_ms),
            heartbeat_interval: ms(self.timing.agent_heartbeat_ms),
            reconcile_interval: ms(self.timing.reconcile_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let f: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        f.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_config_parses() {
        let cfg = parse(
            "node_id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/var/lib/basalt/c1\"\nbootstrap = true\n\
             [peers]\n2 = \"127.0.0.1:7002\"\n[raft]\nheartbeat_ms = 50\n",
        )
        .expect("valid");
        assert_eq!(cfg.node_id, 1);
        assert_eq!(cfg.advertise, "127.0.0.1:7001");
        assert_eq!(cfg.peers.get(&2).map(String::as_str), Some("127.0.0.1:7002"));
        assert_eq!(cfg.raft.heartbeat_ms, 50);
        assert_eq!(cfg.raft.election_timeout_min_ms, RaftTuning::default().election_timeout_min_ms);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = "listen = \"127.0.0.1:7001\"\ndata_dir = \"/d\"\n";
        let err = |t: String| parse(&t).unwrap_err();
        assert!(err(format!("node_id = 0\n{base}")).contains("node_id"));
        assert!(err(base.to_string()).contains("node_id is required"));
        assert!(err(format!("node_id = 1\n{base}[peers]\n1 = \"h:1\"\n")).contains("own node_id"));
        assert!(err(format!("node_id = 1\n{base}[peers]\nx = \"h:1\"\n")).contains("not a number"));
        assert!(err(format!("node_id = 1\n{base}[peers]\n2 = \"h\"\n")).contains("host:port"));
        assert!(err(format!("node_id = 1\n{base}bogus = 3\n")).contains("bogus"));
        assert!(err(format!("node_id = 1\n{base}[raft]\nheartbeat_ms = 500\n")).contains("twice"));
        assert!(err(format!("node_id = 1\n{base}[timing]\nnode_lease_ms = 100\n")).contains("node_lease_ms"));
        assert!(err(format!("node_id = 1\n{base}[timing]\nfence_after_ms = 5000\n"))
            .contains("fence_after_ms (5000) must exceed"));
        assert!(err("node_id = 1\nlisten = \"0.0.0.0:7001\"\ndata_dir = \"/d\"\n".into()).contains("advertise"));
        assert!(parse("node_id = 1\nlisten = \"nowhere\"\ndata_dir = \"/d\"\n").is_err());
    }

    #[test]
    fn the_ceph_section_is_optional_and_checked() {
        let base = "node_id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/d\"\n";
        assert_eq!(parse(base).expect("valid").ceph, None);
        let dir = std::env::temp_dir().join(format!("basalt-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let conf = dir.join("ceph.conf");
        let keyring = dir.join("ceph.client.basalt.keyring");
        std::fs::write(&conf, "[global]\n").expect("conf");
        std::fs::write(&keyring, "").expect("keyring");
        let with = |section: &str| parse(&format!("{base}[ceph]\n{section}"));
        let c = with(&format!("conf = {conf:?}\n")).expect("valid").ceph.expect("ceph");
        assert_eq!((c.conf.as_path(), c.id.as_str(), c.keyring, c.pg_num), (conf.as_path(), "admin", None, None));
        let c = with(&format!("conf = {conf:?}\nid = \"basalt\"\nkeyring = {keyring:?}\npg_num = 16\n"))
            .expect("valid")
            .ceph
            .expect("ceph");
        assert_eq!((c.id.as_str(), c.keyring.as_deref(), c.pg_num), ("basalt", Some(keyring.as_path()), Some(16)));
        let err = |section: String| with(&section).unwrap_err();
        assert!(err(String::new()).contains("ceph.conf is required"));
        assert!(err("conf = \"/nonexistent/ceph.conf\"\n".into()).contains("not a file"));
        assert!(err(format!("conf = {conf:?}\nid = \"client.admin\"\n")).contains("prefix"));
        assert!(err(format!("conf = {conf:?}\nid = \"a b\"\n")).contains("ceph.id"));
        assert!(err(format!("conf = {conf:?}\nkeyring = {:?}\n", dir)).contains("ceph.keyring"));
        assert!(err(format!("conf = {conf:?}\npg_num = 12\n")).contains("power of two"));
        assert!(err(format!("conf = {conf:?}\nmonitors = 1\n")).contains("monitors"));
        // The VMs' client, whose caps the leader owns.
        assert_eq!(with(&format!("conf = {conf:?}\n")).expect("valid").ceph.expect("ceph").vm_client, None);
        let c =
            with(&format!("conf = {conf:?}\nvm_client = \"vm\"\nvm_client_pools = [\"rbd-ec\", \"rbd\", \"rbd\"]\n"))
                .expect("valid")
                .ceph
                .expect("ceph");
        assert_eq!((c.vm_client.as_deref(), c.vm_client_pools), (Some("vm"), vec!["rbd".to_string(), "rbd-ec".into()]));
        assert!(err(format!("conf = {conf:?}\nvm_client = \"client.vm\"\n")).contains("prefix"));
        assert!(err(format!("conf = {conf:?}\nvm_client = \"\"\n")).contains("ceph.vm_client"));
        assert!(err(format!("conf = {conf:?}\nvm_client = \"admin\"\n")).contains("not the controller's"));
        assert!(
            err(format!("conf = {conf:?}\nid = \"basalt\"\nvm_client = \"basalt\"\n")).contains("not the controller's")
        );
        assert!(err(format!("conf = {conf:?}\nvm_client_pools = [\"rbd\"]\n")).contains("needs ceph.vm_client"));
        assert!(err(format!("conf = {conf:?}\nvm_client = \"vm\"\nvm_client_pools = [\"a b\"]\n")).contains("\"a b\""));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
