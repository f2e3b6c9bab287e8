//! What a VM is made of, as `basalt-vmm` receives it (a JSON file or flags).
//! Validated as a whole before anything is created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::aarch64::layout;
use crate::devices::dhcp::Lease;

/// Largest guest the layout allows: RAM must fit below the 48-bit IPA limit
/// KVM gives every arm64 host; 256 GiB is far more than Basalt's hosts offer.
pub const MAX_MEMORY_MIB: u64 = 256 << 10;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default = "one")]
    pub vcpus: u32,
    pub memory_mib: u64,
    /// arm64 Linux `Image`.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Give the guest a GICv3 ITS (for MSIs).
    #[serde(default)]
    pub its: bool,
}

fn one() -> u32 {
    1
}

/// A virtio-net NIC on a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// The tap to attach (created if it does not exist).
    pub tap: String,
    /// `52:54:00:12:34:56`: unicast, as the guest will see it.
    pub mac: String,
    /// Offered to the guest (an overlay's, e.g. 1450 on VXLAN); none: 1500.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Answer the guest's DHCP with this address (from the IPAM); none:
    /// the guest's DHCP goes to the network.
    #[serde(default)]
    pub dhcp: Option<Lease>,
}

impl NicConfig {
    /// `--nic TAP,MAC[,mtu=N][,ip=ADDR/PREFIX[,gw=GATEWAY][,hostname=NAME]]`:
    /// with `ip`, the VMM answers the guest's DHCP with that address.
    pub fn from_flag(flag: &str) -> Result<NicConfig, String> {
        let bad = |why: String| format!("--nic {flag:?}: {why}");
        let mut parts = flag.split(',');
        let (Some(tap), Some(mac)) = (parts.next(), parts.next()) else {
            return Err(bad("want TAP,MAC[,mtu=N][,ip=ADDR/PREFIX[,gw=GATEWAY][,hostname=NAME]]".into()));
        };
        let mut nic = NicConfig { tap: tap.into(), mac: mac.into(), mtu: None, dhcp: None };
        let (mut ip, mut gateway, mut hostname) = (None, None, None);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else { return Err(bad(format!("{p:?} is not KEY=VALUE"))) };
            match k {
                "mtu" => nic.mtu = Some(v.parse().map_err(|_| bad(format!("mtu {v:?} is not a number")))?),
                "ip" => {
                    let (a, p) = v.split_once('/').ok_or_else(|| bad(format!("ip {v:?} wants ADDR/PREFIX")))?;
                    let a = a.parse().map_err(|_| bad(format!("{a:?} is not an IPv4 address")))?;
                    ip = Some((a, p.parse().map_err(|_| bad(format!("prefix {p:?} is not a number")))?));
                }
                "gw" => gateway = Some(v.parse().map_err(|_| bad(format!("gw {v:?} is not an IPv4 address")))?),
                "hostname" => hostname = Some(v.to_string()),
                _ => return Err(bad(format!("unknown key {k:?} (mtu, ip, gw, hostname)"))),
            }
        }
        match ip {
            Some((address, prefix)) => nic.dhcp = Some(Lease { address, prefix, gateway, hostname }),
            None if gateway.is_some() || hostname.is_some() => {
                return Err(bad("gw and hostname go with ip=ADDR/PREFIX".into()))
            }
            None => {}
        }
        Ok(nic)
    }
}

/// A MAC in colon notation, unicast.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("MAC {s:?} must be six hex bytes separated by ':'"));
    }
    for (b, p) in m.iter_mut().zip(&parts) {
        *b = (p.len() == 2)
            .then(|| u8::from_str_radix(p, 16).ok())
            .flatten()
            .ok_or_else(|| format!("MAC {s:?} must be six hex bytes separated by ':'"))?;
    }
    if m[0] & 1 != 0 {
        return Err(format!("MAC {s} is multicast; a NIC needs a unicast address"));
    }
    if m == [0; 6] {
        return Err("MAC 00:00:00:00:00:00 is not an address".into());
    }
    Ok(m)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub backend: DiskBackend,
    #[serde(default)]
    pub read_only: bool,
    /// Serial the guest reads with GET_ID (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBackend {
    File {
        path: PathBuf,
    },
    Rbd {
        pool: String,
        image: String,
        #[serde(default)]
        client: RbdClient,
    },
}

/// How the VMM reaches Ceph for RBD disks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdClient {
    /// ceph.conf; default: `CEPH_CONF` or /etc/ceph/ceph.conf.
    pub conf: Option<PathBuf>,
    /// Client id (default `admin`); VMs normally use a restricted `profile rbd` id.
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    #[default]
    Stdout,
    File {
        path: PathBuf,
    },
    /// A new pseudo-terminal; its path is logged and shown by `status`.
    /// Attach with any terminal program (screen, picocom, `basaltctl vm console`).
    Pty,
    None,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid VM config: {0}")]
pub struct ConfigError(pub String);

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.vcpus == 0 || u64::from(self.vcpus) > layout::GIC_REDIST_MAX_CPUS {
            return bad(format!("vcpus {} must be between 1 and {}", self.vcpus, layout::GIC_REDIST_MAX_CPUS));
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > MAX_MEMORY_MIB {
            return bad(format!(
                "memory_mib {} must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}",
                self.memory_mib
            ));
        }
        if !self.kernel.is_file() {
            return bad(format!("kernel {} is not a readable file", self.kernel.display()));
        }
        if let Some(i) = &self.initrd {
            if !i.is_file() {
                return bad(format!("initrd {} is not a readable file", i.display()));
            }
        }
        if self.cmdline.len() > 2048 || self.cmdline.contains('\0') {
            return bad("cmdline must be at most 2048 bytes without NUL".into());
        }
        if self.disks.len() > MAX_DISKS {
            return bad(format!("{} disks; at most {MAX_DISKS}", self.disks.len()));
        }
        if self.nics.len() > MAX_NICS {
            return bad(format!("{} NICs; at most {MAX_NICS}", self.nics.len()));
        }
        for (i, n) in self.nics.iter().enumerate() {
            crate::devices::tap::check_name(&n.tap).map_err(|e| ConfigError(format!("nic {i}: {e}")))?;
            parse_mac(&n.mac).map_err(|e| ConfigError(format!("nic {i}: {e}")))?;
            if let Some(m) = n.mtu.filter(|m| *m < crate::devices::virtio::net::MIN_MTU) {
                return bad(format!("nic {i}: MTU {m} is below {}", crate::devices::virtio::net::MIN_MTU));
            }
            if let Some(l) = &n.dhcp {
                l.validate().map_err(|e| ConfigError(format!("nic {i}: {e}")))?;
            }
            if let Some(j) = self.nics[..i].iter().position(|o| o.tap == n.tap || o.mac.eq_ignore_ascii_case(&n.mac)) {
                return bad(format!("nic {i}: tap {} or MAC {} is nic {j}'s too", n.tap, n.mac));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            match &d.backend {
                DiskBackend::File { path } if !is_file_or_block_device(path) => {
                    return bad(format!("disk {i}: {} is not a file or block device", path.display()));
                }
                DiskBackend::Rbd { pool, image, .. } if pool.is_empty() || image.is_empty() => {
                    return bad(format!("disk {i}: rbd disks need a pool and an image"));
                }
                _ => {}
            }
            if d.serial.as_ref().is_some_and(|s| s.len() > 20) {
                return bad(format!("disk {i}: serial is longer than 20 bytes"));
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

fn is_file_or_block_device(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).map(|m| m.is_file() || m.file_type().is_block_device()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kernel: &std::path::Path) -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_mib: 256,
            kernel: kernel.into(),
            initrd: None,
            nics: vec![],
            cmdline: "console=ttyS0".into(),
            disks: vec![],
            console: ConsoleConfig::Stdout,
            its: false,
        }
    }

    #[test]
    fn nics_are_checked_before_anything_is_built() {
        let k = tempfile::NamedTempFile::new().expect("tmp");
        let nic =
            |tap: &str, mac: &str, mtu: Option<u16>| NicConfig { tap: tap.into(), mac: mac.into(), mtu, dhcp: None };
        let mut c = base(k.path());
        c.nics = vec![nic("tap0", "52:54:00:12:34:56", Some(1450)), nic("tap1", "02:ba:5a:00:00:01", None)];
        assert!(c.validate().is_ok());
        for (n, needle) in [
            (nic("tap0", "52:54:00:12:34", None), "six hex bytes"),
            (nic("tap0", "52:54:00:12:34:zz", None), "six hex bytes"),
            (nic("tap0", "01:00:5e:00:00:01", None), "multicast"),
            (nic("tap0", "00:00:00:00:00:00", None), "not an address"),
            (nic("a/b", "52:54:00:12:34:56", None), "tap name"),
            (nic("sixteen-bytes-xx", "52:54:00:12:34:56", None), "tap name"),
            (nic("tap0", "52:54:00:12:34:56", Some(60)), "MTU 60"),
        ] {
            let mut c = base(k.path());
            c.nics = vec![n];
            let e = c.validate().expect_err(needle).0;
            assert!(e.contains("nic 0") && e.contains(needle), "{e}");
        }
        let mut c = base(k.path());
        c.nics = vec![nic("tap0", "52:54:00:12:34:56", None), nic("tap0", "52:54:00:12:34:57", None)];
        assert!(c.validate().expect_err("same tap").0.contains("nic 1"));
        let mut c = base(k.path());
        c.nics = (0..=MAX_NICS).map(|i| nic(&format!("tap{i}"), &format!("52:54:00:00:00:{i:02x}"), None)).collect();
        assert!(c.validate().expect_err("too many").0.contains("at most 8"));
        // A lease the guest could not use is refused with the NIC's number.
        let mut c = base(k.path());
        let mut n = NicConfig::from_flag("tap0,52:54:00:12:34:56,ip=10.0.0.0/24").expect("flag");
        c.nics = vec![n.clone()];
        assert!(c.validate().expect_err("network address").0.contains("nic 0: DHCP address"));
        n.dhcp = Some(Lease { address: "10.0.0.5".parse().expect("ip"), prefix: 24, gateway: None, hostname: None });
        c.nics = vec![n];
        assert!(c.validate().is_ok());
    }

    #[test]
    fn nic_flags_parse_with_their_lease() {
        let n = NicConfig::from_flag("tap0,52:54:00:12:34:56,mtu=1450,ip=10.0.0.5/24,gw=10.0.0.1,hostname=web")
            .expect("flag");
        assert_eq!((n.tap.as_str(), n.mac.as_str(), n.mtu), ("tap0", "52:54:00:12:34:56", Some(1450)));
        let l = n.dhcp.expect("lease");
        assert_eq!(
            (l.address.to_string(), l.prefix, l.gateway.map(|g| g.to_string())),
            ("10.0.0.5".into(), 24, Some("10.0.0.1".into()))
        );
        assert_eq!(l.hostname.as_deref(), Some("web"));
        assert_eq!(NicConfig::from_flag("tap0,52:54:00:12:34:56").expect("plain").dhcp, None);
        for (flag, needle) in [
            ("tap0", "want TAP,MAC"),
            ("tap0,52:54:00:12:34:56,ip=10.0.0.5", "ADDR/PREFIX"),
            ("tap0,52:54:00:12:34:56,ip=10.0.0/24", "not an IPv4"),
            ("tap0,52:54:00:12:34:56,gw=10.0.0.1", "go with ip"),
            ("tap0,52:54:00:12:34:56,speed=10", "unknown key"),
            ("tap0,52:54:00:12:34:56,mtu", "KEY=VALUE"),
        ] {
            let e = NicConfig::from_flag(flag).expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn json_configs_parse_and_bad_ones_are_refused() {
        let k = tempfile::NamedTempFile::new().expect("tmp");
        let json = format!(
            r#"{{"vcpus":2,"memory_mib":512,"kernel":"{}","cmdline":"x","disks":[{{"backend":{{"rbd":{{"pool":"rbd","image":"vm1"}}}}}}],"console":"none"}}"#,
            k.path().display()
        );
        let c: VmConfig = serde_json::from_str(&json).expect("parses");
        assert!(c.validate().is_ok());
        assert!(matches!(c.disks[0].backend, DiskBackend::Rbd { .. }));
        assert!(serde_json::from_str::<VmConfig>(r#"{"memory_mib":1,"kernel":"/k","bogus":1}"#).is_err());

        let mut c = base(k.path());
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().0.contains("vcpus"));
        let mut c = base(k.path());
        c.memory_mib = 1;
        assert!(c.validate().unwrap_err().0.contains("memory_mib"));
        let mut c = base(k.path());
        c.kernel = "/nonexistent".into();
        assert!(c.validate().unwrap_err().0.contains("kernel"));
        let mut c = base(k.path());
        c.disks.push(DiskConfig {
            backend: DiskBackend::File { path: "/nope".into() },
            read_only: false,
            serial: None,
        });
        assert!(c.validate().unwrap_err().0.contains("disk 0"));
    }
}
