//! Controller configuration: a TOML file, validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Raft node id, unique in the cluster, never 0.
    pub node_id: u64,
    /// Address the gRPC port (public API and Raft) listens on.
    pub listen: SocketAddr,
    /// Where RocksDB keeps this controller's log and state machine.
    pub data_dir: PathBuf,
    /// The other controllers, `id = "host:port"`.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid { path: path.into(), message })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.node_id == 0 {
            return Err("node_id must be at least 1 (0 means \"no node\" in Raft)".into());
        }
        for (id, addr) in &cfg.peers {
            let n: u64 = id.parse().map_err(|_| format!("peer id {id:?} is not a number"))?;
            if n == cfg.node_id {
                return Err(format!("peer {n} has this controller's own node_id"));
            }
            if !addr.contains(':') {
                return Err(format!("peer {n} address {addr:?} must be host:port"));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_config_parses() {
        let cfg = Config::parse(
            "node_id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/var/lib/basalt/c1\"\n[peers]\n2 = \"127.0.0.1:7002\"\n",
        )
        .expect("valid");
        assert_eq!(cfg.node_id, 1);
        assert_eq!(cfg.peers.get("2").map(String::as_str), Some("127.0.0.1:7002"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = "listen = \"127.0.0.1:7001\"\ndata_dir = \"/d\"\n";
        assert!(Config::parse(&format!("node_id = 0\n{base}")).unwrap_err().contains("node_id"));
        assert!(Config::parse(&format!("node_id = 1\n{base}[peers]\n1 = \"h:1\"\n")).unwrap_err().contains("own node_id"));
        assert!(Config::parse(&format!("node_id = 1\n{base}[peers]\nx = \"h:1\"\n")).unwrap_err().contains("not a number"));
        assert!(Config::parse(&format!("node_id = 1\n{base}bogus = 3\n")).unwrap_err().contains("bogus"));
        assert!(Config::parse("node_id = 1\nlisten = \"nowhere\"\ndata_dir = \"/d\"\n").is_err());
    }
}
