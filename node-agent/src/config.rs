//! Agent configuration: which host this is and which controllers to dial.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Stable host id; names the host in the cluster.
    pub host_id: String,
    /// Controllers to dial (any of them; the agent finds the leader).
    pub controllers: Vec<String>,
    /// Address peers use to reach this host for migrations.
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
        let id_ok = !cfg.host_id.is_empty()
            && cfg.host_id.len() <= 63
            && cfg.host_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(format!("host_id {:?} must be 1-63 characters of a-z, 0-9 and '-'", cfg.host_id));
        }
        if cfg.controllers.is_empty() {
            return Err("controllers must list at least one controller address".into());
        }
        if let Some(bad) =
            cfg.controllers.iter().find(|c| c.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none())
        {
            return Err(format!("controller address {bad:?} must be host:port"));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_configs() {
        let ok =
            "host_id = \"arm-1\"\naddress = \"10.0.0.2\"\ncontrollers = [\"10.0.0.1:7001\"]\n[labels]\nrack = \"r1\"\n";
        let cfg = Config::parse(ok).expect("valid");
        assert_eq!(cfg.labels["rack"], "r1");
        assert!(Config::parse(&ok.replace("arm-1", "Arm_1")).unwrap_err().contains("host_id"));
        assert!(Config::parse(&ok.replace("[\"10.0.0.1:7001\"]", "[]")).unwrap_err().contains("at least one"));
        assert!(Config::parse(&ok.replace("10.0.0.1:7001", "10.0.0.1")).unwrap_err().contains("host:port"));
    }
}
