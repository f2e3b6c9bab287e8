//! The host's network interfaces, and the tuning operators apply to reach
//! wire speed: which CPUs take each queue's interrupt (IRQ affinity), which
//! ones do receive processing for each receive queue (RPS), and which
//! transmit queue each CPU uses (XPS).
//!
//! The agent finds the physical NICs in sysfs (a NIC with a `device`; the
//! bridges, VXLANs and taps it makes itself have none), asks each for its
//! time-stamping capabilities (`ETHTOOL_GET_TS_INFO`, what `ethtool -T`
//! shows), applies the profile its config names, and reports what it
//! found and what the kernel reads back to the controllers.
//!
//! Profiles: `none` changes nothing. `spread` gives queue i's interrupt and
//! transmit queue CPU i (modulo the CPUs there are) and lets every CPU do
//! receive processing, the usual recipe for a NIC with fewer queues than
//! CPUs. XPS is set only on NICs with more than one transmit queue. A profile in the config lists CPUs per queue itself; entry i
//! applies to queue or interrupt i, the list repeating when shorter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use basalt_proto::v1 as pb;
use serde::Deserialize;

/// CPUs, as the kernel writes them in list form (`0-3,6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet(BTreeSet<u32>);

impl CpuSet {
    /// Parses `0-3,6`; every CPU must be below `cpus`, and the set not empty.
    pub fn parse(list: &str, cpus: u32) -> Result<CpuSet, String> {
        let mut set = BTreeSet::new();
        for part in list.split(',').map(str::trim) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u32, u32) = match (a.parse(), b.parse()) {
                (Ok(a), Ok(b)) if a <= b => (a, b),
                _ => return Err(format!("CPU list {list:?}: {part:?} is not N or N-M")),
            };
            if b >= cpus {
                return Err(format!("CPU list {list:?}: CPU {b} does not exist (this host has {cpus})"));
            }
            set.extend(a..=b);
        }
        Ok(CpuSet(set))
    }

    pub fn all(cpus: u32) -> CpuSet {
        CpuSet((0..cpus.max(1)).collect())
    }

    /// Reads a hex mask as sysfs writes it (`ff`, `00000000,00000003`).
    pub fn from_mask(mask: &str) -> Option<CpuSet> {
        let mut set = BTreeSet::new();
        for (word, hex) in mask.trim().rsplit(',').enumerate() {
            let v = u32::from_str_radix(hex, 16).ok()?;
            set.extend((0..32).filter(|b| v & (1 << b) != 0).map(|b| b + 32 * word as u32));
        }
        Some(CpuSet(set))
    }

    /// The hex mask sysfs takes, in 32-bit words.
    pub fn to_mask(&self) -> String {
        let words = self.0.iter().next_back().map_or(1, |m| m / 32 + 1);
        (0..words)
            .rev()
            .map(|w| {
                let v = self.0.iter().filter(|c| *c / 32 == w).fold(0u32, |v, c| v | 1 << (c % 32));
                format!("{v:08x}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn to_list(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        let mut it = self.0.iter().copied().peekable();
        while let Some(a) = it.next() {
            let mut b = a;
            while it.peek() == Some(&(b + 1)) {
                b = it.next().unwrap_or(b);
            }
            out.push(if a == b { a.to_string() } else { format!("{a}-{b}") });
        }
        out.join(",")
    }
}

/// A profile as the agent's config writes it: CPU lists per queue.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Interrupt i of each NIC goes to entry i (repeating).
    #[serde(default)]
    pub irq_cpus: Vec<String>,
    /// Receive queue i's RPS CPUs; none: RPS as the kernel has it.
    #[serde(default)]
    pub rps_cpus: Vec<String>,
    /// Transmit queue i's XPS CPUs.
    #[serde(default)]
    pub xps_cpus: Vec<String>,
    /// RPS CPUs of the VMs' taps: what the guests send is then processed
    /// (bridged, VXLAN-encapsulated) there instead of on the VMM's thread.
    #[serde(default)]
    pub tap_rps_cpus: Option<String>,
    /// Only these NICs; none: every physical one.
    #[serde(default)]
    pub nics: Vec<String>,
}

/// A validated profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    irq: Vec<CpuSet>,
    rps: Vec<CpuSet>,
    xps: Vec<CpuSet>,
    pub tap_rps: Option<CpuSet>,
    nics: Vec<String>,
    /// `spread`: per queue from the host's CPU count.
    spread: bool,
}

impl Profile {
    pub fn none() -> Profile {
        Profile {
            name: "none".into(),
            irq: vec![],
            rps: vec![],
            xps: vec![],
            tap_rps: None,
            nics: vec![],
            spread: false,
        }
    }

    /// `name` from the built-in ones (`none`, `spread`) or `defined`;
    /// every CPU list must name CPUs this host has.
    pub fn resolve(
        name: &str,
        defined: &std::collections::BTreeMap<String, ProfileConfig>,
        cpus: u32,
    ) -> Result<Profile, String> {
        match (name, defined.get(name)) {
            (_, Some(c)) => {
                let lists = |what: &str, l: &[String]| {
                    l.iter()
                        .map(|s| CpuSet::parse(s, cpus))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("NIC profile {name:?}: {what}: {e}"))
                };
                Ok(Profile {
                    name: name.into(),
                    irq: lists("irq_cpus", &c.irq_cpus)?,
                    rps: lists("rps_cpus", &c.rps_cpus)?,
                    xps: lists("xps_cpus", &c.xps_cpus)?,
                    tap_rps: c
                        .tap_rps_cpus
                        .as_deref()
                        .map(|s| CpuSet::parse(s, cpus))
                        .transpose()
                        .map_err(|e| format!("NIC profile {name:?}: tap_rps_cpus: {e}"))?,
                    nics: c.nics.clone(),
                    spread: false,
                })
            }
            ("none", None) => Ok(Profile::none()),
            ("spread", None) => Ok(Profile {
                name: name.into(),
                irq: vec![],
                rps: vec![CpuSet::all(cpus)],
                xps: vec![],
                tap_rps: Some(CpuSet::all(cpus)),
                nics: vec![],
                spread: true,
            }),
            _ => {
                let known: Vec<&str> =
                    ["none", "spread"].into_iter().chain(defined.keys().map(String::as_str)).collect();
                Err(format!("NIC profile {name:?} is not defined (known: {})", known.join(", ")))
            }
        }
    }

    fn pick<'a>(&'a self, list: &'a [CpuSet], i: usize, cpus: u32) -> Option<CpuSet> {
        if self.spread && list.is_empty() {
            return Some(CpuSet([i as u32 % cpus.max(1)].into()));
        }
        (!list.is_empty()).then(|| list[i % list.len()].clone())
    }
}

/// Where sysfs and procfs are (`/` on a host; a directory in tests).
#[derive(Debug, Clone)]
pub struct Root(pub PathBuf);

impl Root {
    fn p(&self, rel: &str) -> PathBuf {
        self.0.join(rel.trim_start_matches('/'))
    }
    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.p(rel)).ok().map(|s| s.trim().to_string())
    }
}

fn count(dir: &Path, prefix: &str) -> u32 {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).count() as u32)
        .unwrap_or(0)
}

/// The NIC's interrupts: its MSI vectors if it has them, else the lines of
/// /proc/interrupts named after it or its device (`virtio0` for virtio-mmio).
fn irqs(root: &Root, name: &str) -> Vec<u32> {
    let dev = root.p(&format!("sys/class/net/{name}/device"));
    let mut v: Vec<u32> = std::fs::read_dir(dev.join("msi_irqs"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    if v.is_empty() {
        let devname =
            std::fs::canonicalize(&dev).ok().and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
        let interrupts = root.read("proc/interrupts").unwrap_or_default();
        v = interrupts
            .lines()
            .filter_map(|l| {
                let (irq, rest) = l.trim().split_once(':')?;
                let label = rest.split_whitespace().last()?;
                let ours = label == name
                    || label.starts_with(&format!("{name}-"))
                    || devname.as_deref().is_some_and(|d| label == d || label.starts_with(&format!("{d}-")));
                ours.then(|| irq.trim().parse().ok()).flatten()
            })
            .collect();
    }
    v.sort_unstable();
    v
}

/// The physical NICs (those with a `device`), sorted by name.
pub fn discover(root: &Root) -> Vec<pb::HostNic> {
    let mut names: Vec<String> = std::fs::read_dir(root.p("sys/class/net"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| root.p(&format!("sys/class/net/{n}/device")).exists());
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let base = root.p(&format!("sys/class/net/{name}"));
            let driver = std::fs::read_link(base.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let speed = root
                .read(&format!("sys/class/net/{name}/speed"))
                .and_then(|s| s.parse::<i32>().ok())
                .filter(|s| *s > 0);
            let (timestamping, ptp_clock) = timestamping(&name).unwrap_or((vec![], -1));
            pb::HostNic {
                driver,
                speed_mbps: speed.unwrap_or(-1),
                rx_queues: count(&base.join("queues"), "rx-"),
                tx_queues: count(&base.join("queues"), "tx-"),
                timestamping,
                ptp_clock,
                settings: vec![],
                name,
            }
        })
        .collect()
}

/// Writes `value` to `rel` and reads the CPUs back; the setting as reported.
fn set(root: &Root, knob: String, rel: &str, value: String, mask: bool) -> pb::NicSetting {
    let path = root.p(rel);
    let error = std::fs::write(&path, &value).err().map(|e| format!("{}: {e}", path.display())).unwrap_or_default();
    let back = root.read(rel).unwrap_or_default();
    let cpus = if mask { CpuSet::from_mask(&back).map(|c| c.to_list()).unwrap_or(back) } else { back };
    pb::NicSetting { knob, cpus, error }
}

/// Applies `profile` to `nics` (as [`discover`] found them), recording each
/// setting as the kernel reads it back.
pub fn apply(root: &Root, profile: &Profile, nics: &mut [pb::HostNic], cpus: u32) {
    for nic in nics.iter_mut().filter(|n| profile.nics.is_empty() || profile.nics.contains(&n.name)) {
        let name = nic.name.clone();
        for (i, irq) in irqs(root, &name).into_iter().enumerate() {
            if let Some(c) = profile.pick(&profile.irq, i, cpus) {
                nic.settings.push(set(
                    root,
                    format!("irq {irq}"),
                    &format!("proc/irq/{irq}/smp_affinity_list"),
                    c.to_list(),
                    false,
                ));
            }
        }
        for q in 0..nic.rx_queues as usize {
            if let Some(c) = profile.pick(&profile.rps, q, cpus).filter(|_| !profile.rps.is_empty()) {
                let rel = format!("sys/class/net/{name}/queues/rx-{q}/rps_cpus");
                nic.settings.push(set(root, format!("rx-{q} rps"), &rel, c.to_mask(), true));
            }
        }
        // XPS picks among transmit queues: with one there is no choice, and
        // the kernel refuses the file (ENOENT) on a single-queue device.
        for q in (0..nic.tx_queues as usize).filter(|_| nic.tx_queues > 1) {
            if let Some(c) = profile.pick(&profile.xps, q, cpus) {
                let rel = format!("sys/class/net/{name}/queues/tx-{q}/xps_cpus");
                nic.settings.push(set(root, format!("tx-{q} xps"), &rel, c.to_mask(), true));
            }
        }
        for s in nic.settings.iter().filter(|s| !s.error.is_empty()) {
            tracing::warn!(nic = %name, knob = %s.knob, error = %s.error, "NIC tuning not applied");
        }
        let applied: Vec<String> =
            nic.settings.iter().filter(|s| s.error.is_empty()).map(|s| format!("{}={}", s.knob, s.cpus)).collect();
        tracing::info!(nic = %name, profile = %profile.name, settings = %applied.join(" "), "NIC tuned");
    }
}

/// Sets a tap's RPS CPUs (the profile's `tap_rps_cpus`); an error is why not.
pub fn tune_tap(root: &Root, profile: &Profile, tap: &str) -> Result<(), String> {
    let Some(c) = &profile.tap_rps else { return Ok(()) };
    let s = set(root, format!("{tap} rps"), &format!("sys/class/net/{tap}/queues/rx-0/rps_cpus"), c.to_mask(), true);
    if s.error.is_empty() {
        Ok(())
    } else {
        Err(s.error)
    }
}

/// The CPUs this host has online.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// `struct ethtool_ts_info` (linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct TsInfo {
    cmd: u32,
    so_timestamping: u32,
    phc_index: i32,
    tx_types: u32,
    tx_reserved: [u32; 3],
    rx_filters: u32,
    rx_reserved: [u32; 3],
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GET_TS_INFO: u32 = 0x41;
/// SOF_TIMESTAMPING_* bits in `ethtool -T`'s words.
const TS_CAPS: [(u32, &str); 7] = [
    (1 << 0, "hardware-transmit"),
    (1 << 1, "software-transmit"),
    (1 << 2, "hardware-receive"),
    (1 << 3, "software-receive"),
    (1 << 4, "software-system-clock"),
    (1 << 5, "hardware-legacy-clock"),
    (1 << 6, "hardware-raw-clock"),
];

/// The NIC's time-stamping capabilities and PTP clock index.
fn timestamping(name: &str) -> Option<(Vec<String>, i32)> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = TsInfo { cmd: ETHTOOL_GET_TS_INFO, ..Default::default() };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above) with its NUL.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut TsInfo).cast();
    // SAFETY: a plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads the ifreq and writes at most
    // size_of::<TsInfo>() bytes to `info`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr) };
    // SAFETY: fd is ours and open.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return None;
    }
    let caps = TS_CAPS.iter().filter(|(b, _)| info.so_timestamping & b != 0).map(|(_, n)| n.to_string()).collect();
    Some((caps, info.phc_index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn cpu_lists_and_masks_round_trip_and_bad_ones_are_refused() {
        let c = CpuSet::parse("0-3,6", 8).expect("list");
        assert_eq!((c.to_list(), c.to_mask()), ("0-3,6".to_string(), "0000004f".to_string()));
        assert_eq!(CpuSet::from_mask("00000001,00000003").expect("mask").to_list(), "0-1,32");
        assert_eq!(CpuSet::parse("33", 40).expect("list").to_mask(), "00000002,00000000");
        for (bad, needle) in
            [("8", "does not exist"), ("3-1", "N or N-M"), ("x", "N or N-M"), ("", "N or N-M"), ("0,,1", "N or N-M")]
        {
            let e = CpuSet::parse(bad, 8).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn profiles_resolve_and_bad_masks_or_names_are_refused() {
        let mut defined = BTreeMap::new();
        defined.insert("pin".to_string(), ProfileConfig { irq_cpus: vec!["1".into()], ..Default::default() });
        defined.insert("bad".to_string(), ProfileConfig { rps_cpus: vec!["0-9".into()], ..Default::default() });
        assert_eq!(Profile::resolve("none", &defined, 2).expect("none"), Profile::none());
        assert!(Profile::resolve("spread", &defined, 2).expect("spread").spread);
        assert_eq!(Profile::resolve("pin", &defined, 2).expect("pin").irq, vec![CpuSet::parse("1", 2).expect("1")]);
        let e = Profile::resolve("bad", &defined, 2).expect_err("CPU 9");
        assert!(e.contains("\"bad\": rps_cpus") && e.contains("CPU 9 does not exist"), "{e}");
        let e = Profile::resolve("fast", &defined, 2).expect_err("unknown");
        assert!(e.contains("known: none, spread, bad, pin"), "{e}");
    }

    /// A host's sysfs and procfs as files: two NICs (one with two queues and
    /// MSI vectors, one virtio-mmio with a line in /proc/interrupts), a bridge.
    fn fake_host() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tmp");
        let w = |rel: &str, v: &str| {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, v).expect("write");
        };
        for q in ["rx-0", "rx-1", "tx-0", "tx-1"] {
            w(
                &format!("sys/class/net/enp1/queues/{q}/{}_cpus", if q.starts_with("rx") { "rps" } else { "xps" }),
                "0\n",
            );
        }
        w("sys/class/net/enp1/speed", "25000\n");
        std::fs::create_dir_all(d.path().join("sys/bus/pci/drivers/mlx5_core")).expect("driver");
        std::fs::create_dir_all(d.path().join("sys/class/net/enp1/device/msi_irqs/40")).expect("msi");
        std::fs::create_dir_all(d.path().join("sys/class/net/enp1/device/msi_irqs/41")).expect("msi");
        std::os::unix::fs::symlink(
            d.path().join("sys/bus/pci/drivers/mlx5_core"),
            d.path().join("sys/class/net/enp1/device/driver"),
        )
        .expect("link");
        w("sys/devices/virtio0/uevent", "");
        w("sys/class/net/eth0/queues/rx-0/rps_cpus", "0\n");
        w("sys/class/net/eth0/queues/tx-0/xps_cpus", "0\n");
        w("sys/class/net/eth0/speed", "-1\n");
        std::os::unix::fs::symlink(d.path().join("sys/devices/virtio0"), d.path().join("sys/class/net/eth0/device"))
            .expect("link");
        w("sys/class/net/bsn1000/queues/rx-0/rps_cpus", "0\n");
        w("proc/interrupts", "           CPU0       CPU1\n 13:        100          0     GICv3  48 Level     virtio0\n 14:  5 0 GICv3 49 Level virtio1\n");
        for irq in [13, 14, 40, 41] {
            w(&format!("proc/irq/{irq}/smp_affinity_list"), "0-3\n");
        }
        d
    }

    #[test]
    fn physical_nics_are_found_and_a_profile_is_applied_and_read_back() {
        let d = fake_host();
        let root = Root(d.path().to_path_buf());
        let mut nics = discover(&root);
        let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["enp1", "eth0"], "the bridge is not a physical NIC");
        assert_eq!(
            (nics[0].driver.as_str(), nics[0].speed_mbps, nics[0].rx_queues, nics[0].tx_queues),
            ("mlx5_core", 25000, 2, 2)
        );
        assert_eq!((nics[1].speed_mbps, nics[1].rx_queues), (-1, 1));
        assert_eq!(irqs(&root, "eth0"), [13], "virtio-mmio: the line named after its device");
        assert_eq!(irqs(&root, "enp1"), [40, 41]);

        let spread = Profile::resolve("spread", &BTreeMap::new(), 4).expect("spread");
        apply(&root, &spread, &mut nics, 4);
        let read = |rel: &str| std::fs::read_to_string(d.path().join(rel)).expect("read");
        assert_eq!(read("proc/irq/40/smp_affinity_list"), "0");
        assert_eq!(read("proc/irq/41/smp_affinity_list"), "1");
        assert_eq!(read("sys/class/net/enp1/queues/rx-1/rps_cpus"), "0000000f");
        assert_eq!(read("sys/class/net/enp1/queues/tx-1/xps_cpus"), "00000002");
        assert_eq!(read("proc/irq/13/smp_affinity_list"), "0");
        assert_eq!(read("sys/class/net/eth0/queues/tx-0/xps_cpus"), "0\n", "one transmit queue: no XPS");
        assert!(!nics[1].settings.iter().any(|s| s.knob.contains("xps")), "{:?}", nics[1].settings);
        let knobs: Vec<(String, String)> = nics[0].settings.iter().map(|s| (s.knob.clone(), s.cpus.clone())).collect();
        assert!(
            knobs.contains(&("irq 41".into(), "1".into())) && knobs.contains(&("rx-0 rps".into(), "0-3".into())),
            "{knobs:?}"
        );
        assert!(nics.iter().flat_map(|n| &n.settings).all(|s| s.error.is_empty()));

        // A knob the kernel refuses is reported with its error, the rest applied.
        std::fs::remove_dir_all(d.path().join("proc/irq/14")).ok();
        std::fs::remove_file(d.path().join("proc/irq/13/smp_affinity_list")).expect("rm");
        std::fs::create_dir(d.path().join("proc/irq/13/smp_affinity_list")).expect("a directory cannot be written");
        let mut nics = discover(&root);
        apply(&root, &spread, &mut nics, 4);
        let irq = nics[1].settings.iter().find(|s| s.knob == "irq 13").expect("irq 13");
        assert!(!irq.error.is_empty(), "{irq:?}");
        assert!(tune_tap(&root, &spread, "bsn1000").is_ok());
        assert_eq!(read("sys/class/net/bsn1000/queues/rx-0/rps_cpus"), "0000000f");
        assert!(tune_tap(&root, &spread, "tap-gone").is_err());
        assert!(tune_tap(&root, &Profile::none(), "tap-gone").is_ok(), "no tap RPS in the profile: nothing to do");
    }
}
