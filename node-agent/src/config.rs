//! Agent configuration: a TOML file and/or flags (flags win), validated as a
//! whole before anything starts: which host this is, which controllers to
//! dial, where VMs keep their files, how to reach Ceph.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_proto::names::{is_dns_label, is_host_port};
use serde::Deserialize;

use crate::nic::{Profile, ProfileConfig};

/// What the file may say; every field can also come from a flag.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub host_id: Option<String>,
    pub address: Option<String>,
    #[serde(default)]
    pub controllers: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state_dir: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    /// Where the node service listens (default: all addresses, the port of `address`).
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Ports a receiving basalt-vmm may listen on, one per incoming
    /// migration: `[first, last]`, default `[7400, 7499]`.
    pub migration_ports: Option<[u16; 2]>,
    #[serde(default)]
    pub ceph: CephConfig,
    #[serde(default)]
    pub timing: TimingConfig,
    /// The NIC tuning profile to apply at start: `none` (the default),
    /// `spread`, or one of `nic_profiles`.
    pub nic_profile: Option<String>,
    #[serde(default)]
    pub nic_profiles: BTreeMap<String, ProfileConfig>,
}

/// How the VMs' RBD disks reach Ceph: a restricted cephx client
/// (`profile rbd` on the VM pools), never the admin key.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CephConfig {
    pub conf: Option<PathBuf>,
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// Used until a controller says otherwise at registration.
    pub heartbeat_ms: u64,
    /// Longest pause between attempts to reach the controllers.
    pub retry_max_ms: u64,
    /// A VM asked to stop gets this long to power off before it is killed.
    pub stop_timeout_ms: u64,
    /// A VM that crashes is restarted after this, doubling each time...
    pub restart_backoff_ms: u64,
    /// ...at most this many times in `restart_window_ms`; then it stays Failed.
    pub max_restarts: u32,
    pub restart_window_ms: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        TimingConfig {
            heartbeat_ms: 2_000,
            retry_max_ms: 5_000,
            stop_timeout_ms: 15_000,
            restart_backoff_ms: 1_000,
            max_restarts: 3,
            restart_window_ms: 300_000,
        }
    }
}

/// The flags, as main parsed them (all optional: the file may say them).
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub host_id: Option<String>,
    pub address: Option<String>,
    pub controllers: Vec<String>,
    pub labels: Vec<String>,
    pub state_dir: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub ceph_conf: Option<PathBuf>,
    pub ceph_id: Option<String>,
    pub ceph_keyring: Option<PathBuf>,
    pub nic_profile: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host_id: String,
    /// How other hosts reach this one (migrations); reported at registration.
    pub address: String,
    pub controllers: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub arch: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// One directory per VM under `vms/`: its config, console log and control socket.
    pub state_dir: PathBuf,
    pub vmm: PathBuf,
    /// The node service (VM console, counters, vGIC state for basaltctl).
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Incoming migrations listen on one of these ports (inclusive).
    pub migration_ports: std::ops::RangeInclusive<u16>,
    pub ceph: CephConfig,
    pub timing: Timing,
    /// Applied to the host's NICs at start, and to each VM tap.
    pub nic_profile: Profile,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub heartbeat: Duration,
    pub retry_max: Duration,
    pub stop_timeout: Duration,
    pub restart_backoff: Duration,
    pub max_restarts: u32,
    pub restart_window: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(m: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(m.into()))
}

/// Memory kept for the host itself (kernel, agent, the VMMs' own overhead).
const HOST_RESERVED_MIB: u64 = 256;

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }
}

impl Config {
    /// The host part of `address`: what migrations listen on and are sent to.
    pub fn address_host(&self) -> &str {
        self.address.rsplit_once(':').map_or(self.address.as_str(), |(h, _)| h)
    }

    /// Merges the file (if any) with the flags, fills defaults from the host,
    /// and checks the result.
    pub fn resolve(file: FileConfig, flags: Flags) -> Result<Config, ConfigError> {
        let host_id = flags.host_id.or(file.host_id).unwrap_or_default();
        // The controllers' rule for node names: an id they would refuse is refused here.
        if !is_dns_label(&host_id) {
            return invalid(format!(
                "host_id {host_id:?} must be 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit (--host-id)"
            ));
        }
        let address = flags.address.or(file.address).unwrap_or_default();
        if !is_host_port(&address) {
            return invalid(format!(
                "address {address:?} (how other hosts reach this one, for migrations) must be host:port (--address)"
            ));
        }
        let port = address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(0);
        let listen = flags.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port)));
        let controllers = if flags.controllers.is_empty() { file.controllers } else { flags.controllers };
        if controllers.is_empty() {
            return invalid("controllers must list at least one controller host:port (--controller)");
        }
        if let Some(bad) = controllers.iter().find(|c| !is_host_port(c)) {
            return invalid(format!("controller address {bad:?} must be host:port"));
        }
        let mut labels = file.labels;
        for l in flags.labels {
            let Some((k, v)) = l.split_once('=') else {
                return invalid(format!("--label {l:?} must be KEY=VALUE"));
            };
            labels.insert(k.to_string(), v.to_string());
        }
        if let Some((k, _)) = labels.iter().find(|(k, _)| k.is_empty() || k.len() > 63) {
            return invalid(format!("label key {k:?} must be 1-63 characters"));
        }
        let vcpus = match flags.vcpus.or(file.vcpus) {
            Some(n) => n,
            None => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        };
        if vcpus == 0 {
            return invalid("vcpus must be at least 1");
        }
        let memory_mib = match flags.memory_mib.or(file.memory_mib) {
            Some(m) => m,
            None => host_memory_mib().map(|m| m.saturating_sub(HOST_RESERVED_MIB)).unwrap_or(0),
        };
        if memory_mib == 0 {
            return invalid("memory_mib must be at least 1 (and /proc/meminfo gave nothing to default from)");
        }
        let t = file.timing;
        if t.heartbeat_ms == 0 || t.retry_max_ms == 0 || t.stop_timeout_ms == 0 || t.restart_window_ms == 0 {
            return invalid("timing: heartbeat_ms, retry_max_ms, stop_timeout_ms and restart_window_ms must be > 0");
        }
        let [first, last] = file.migration_ports.unwrap_or([7400, 7499]);
        if first == 0 || first > last {
            return invalid(format!("migration_ports [{first}, {last}] must be [first, last] with 0 < first <= last"));
        }
        if (first..=last).contains(&port) {
            return invalid(format!(
                "migration_ports [{first}, {last}] must not include the node service's port {port}"
            ));
        }
        let mut ceph = file.ceph;
        ceph.conf = flags.ceph_conf.or(ceph.conf);
        ceph.id = flags.ceph_id.or(ceph.id);
        ceph.keyring = flags.ceph_keyring.or(ceph.keyring);
        if ceph.id.as_deref() == Some("admin") {
            return invalid("ceph.id: VMs must not use the admin key; give the agent a `profile rbd` client");
        }
        let name = flags.nic_profile.or(file.nic_profile).unwrap_or_else(|| "none".into());
        let nic_profile = Profile::resolve(&name, &file.nic_profiles, crate::nic::host_cpus())
            .map_err(|e| ConfigError::Invalid(format!("{e} (--nic-profile, nic_profiles)")))?;
        Ok(Config {
            nic_profile,
            host_id,
            address,
            controllers,
            labels,
            arch: std::env::consts::ARCH.to_string(),
            vcpus,
            memory_mib,
            state_dir: flags.state_dir.or(file.state_dir).unwrap_or_else(|| "/var/lib/basalt-agent".into()),
            vmm: flags.vmm.or(file.vmm).unwrap_or_else(|| "basalt-vmm".into()),
            listen,
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            migration_ports: first..=last,
            ceph,
            timing: Timing {
                heartbeat: Duration::from_millis(t.heartbeat_ms),
                retry_max: Duration::from_millis(t.retry_max_ms),
                stop_timeout: Duration::from_millis(t.stop_timeout_ms),
                restart_backoff: Duration::from_millis(t.restart_backoff_ms),
                max_restarts: t.max_restarts,
                restart_window: Duration::from_millis(t.restart_window_ms),
            },
        })
    }
}

fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "host_id = \"arm-1\"\naddress = \"10.0.0.2:7200\"\ncontrollers = [\"10.0.0.1:7001\"]\nvcpus = 4\nmemory_mib = 2048\n[labels]\nrack = \"r1\"\n[ceph]\nid = \"vm\"\n";

    fn resolve(text: &str, flags: Flags) -> Result<Config, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        Config::resolve(file, flags).map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_file_resolves_with_defaults() {
        let c = resolve(OK, Flags::default()).expect("valid");
        assert_eq!((c.host_id.as_str(), c.vcpus, c.memory_mib), ("arm-1", 4, 2048));
        assert_eq!(c.labels["rack"], "r1");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/basalt-agent"));
        assert_eq!(c.timing.max_restarts, 3);
        assert_eq!(c.listen, "0.0.0.0:7200".parse().expect("addr"), "the node service listens on the address's port");
        assert_eq!(c.ceph.id.as_deref(), Some("vm"));
        assert_eq!((c.migration_ports.clone(), c.address_host()), (7400..=7499, "10.0.0.2"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = Flags {
            host_id: Some("arm-2".into()),
            controllers: vec!["c1:1".into(), "c2:2".into()],
            labels: vec!["rack=r2".into(), "zone=z".into()],
            vcpus: Some(2),
            ..Flags::default()
        };
        let c = resolve(OK, flags).expect("valid");
        assert_eq!((c.host_id.as_str(), c.vcpus), ("arm-2", 2));
        assert_eq!(c.controllers, vec!["c1:1", "c2:2"]);
        assert_eq!((c.labels["rack"].as_str(), c.labels["zone"].as_str()), ("r2", "z"));
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        let bad = |text: &str, want: &str| {
            let e = resolve(text, Flags::default()).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        bad(&OK.replace("arm-1", "Arm_1"), "host_id");
        bad(&OK.replace("arm-1", "-arm1"), "host_id");
        bad(&OK.replace("[\"10.0.0.1:7001\"]", "[]"), "at least one");
        bad(&OK.replace("10.0.0.1:7001", "10.0.0.1"), "host:port");
        bad(&OK.replace("address = \"10.0.0.2:7200\"\n", ""), "address");
        bad(&OK.replace("10.0.0.2:7200", "10.0.0.2"), "must be host:port (--address)");
        bad(&OK.replace("vcpus = 4", "vcpus = 0"), "vcpus");
        bad(&OK.replace("id = \"vm\"", "id = \"admin\""), "admin");
        bad(&format!("{OK}\n[timing]\nstop_timeout_ms = 0\n"), "stop_timeout_ms");
        bad(&format!("{OK}\nfavourite_colour = \"red\"\n"), "unknown field");
        let ports = |p: &str| OK.replace("vcpus = 4\n", &format!("vcpus = 4\nmigration_ports = {p}\n"));
        bad(&ports("[7499, 7400]"), "migration_ports");
        bad(&ports("[0, 10]"), "migration_ports");
        bad(&ports("[7100, 7300]"), "node service's port 7200");
        let e = Config::resolve(
            toml::from_str(OK).expect("toml"),
            Flags { labels: vec!["novalue".into()], ..Flags::default() },
        )
        .unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }
}
