//! What the VMs' networks need on this host, built with iproute2: per
//! network a Linux bridge (`bsn<VNI>`) with a VXLAN device (`bvx<VNI>`, the
//! network's VNI over the hosts' own addresses, UDP 4789), and per VM NIC a
//! tap (`bt…`) on that bridge, which the VM's basalt-vmm attaches to.
//!
//! Broadcast, unknown unicast and multicast go to every other host with a
//! NIC on the network by head-end replication: one all-zeros FDB entry per
//! peer on the VXLAN device, from the list the controllers send. Unicast
//! follows the VXLAN device's learning (the source host of each MAC seen),
//! so steady traffic between two VMs goes to one host only, and a migrated
//! VM's RARP re-teaches every peer at once. No multicast underlay is needed.
//!
//! [`HostNetworks::apply`] makes the host match what the assignments need:
//! missing devices are created, stale ones (a network or NIC no longer
//! used here) removed, and devices that already exist are left alone, so an
//! agent restarting under running VMs disturbs none of their traffic.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

/// VXLAN's 50 bytes of headers must fit in the hosts' 1500.
pub const OVERLAY_MTU: u16 = 1450;
const VXLAN_PORT: &str = "4789";

/// Runs one iproute2 command (`ip ...`, `bridge ...`); the seam for tests.
pub trait Runner: Send {
    fn run(&mut self, args: &[&str]) -> Result<String, String>;
}

/// The real thing: `ip` and `bridge` from PATH.
pub struct Iproute2;

impl Runner for Iproute2 {
    fn run(&mut self, args: &[&str]) -> Result<String, String> {
        let (prog, rest) = args.split_first().ok_or("no command")?;
        let out = std::process::Command::new(prog)
            .args(rest)
            .output()
            .map_err(|e| format!("cannot run {prog} (iproute2 must be installed): {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("`{}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

/// A network as this host must carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub vni: u32,
    /// The other hosts' addresses.
    pub peers: BTreeSet<String>,
}

pub fn bridge_name(vni: u32) -> String {
    format!("bsn{vni}")
}

pub fn vxlan_name(vni: u32) -> String {
    format!("bvx{vni}")
}

/// The tap of a VM's NIC `index`: unique per host (VM names are unique in
/// the cluster) and within Linux's 15 bytes.
pub fn tap_name(vm: &str, index: usize) -> String {
    // FNV-1a: stable across agent versions and restarts, unlike std's hasher.
    let h = vm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("bt{:010x}{index:x}", h & 0xff_ffff_ffff)
}

pub struct HostNetworks<R: Runner> {
    runner: R,
    /// This host's address on the underlay (the VXLAN devices' source).
    local: String,
    /// RPS for new taps (the NIC profile's `tap_rps_cpus`), in this sysfs.
    tap_tuning: Option<(crate::nic::Root, crate::nic::Profile)>,
}

impl<R: Runner> HostNetworks<R> {
    pub fn new(runner: R, local: String) -> Self {
        HostNetworks { runner, local, tap_tuning: None }
    }

    pub fn with_tap_tuning(mut self, root: crate::nic::Root, profile: crate::nic::Profile) -> Self {
        self.tap_tuning = Some((root, profile));
        self
    }

    fn run(&mut self, args: &[&str]) -> Result<String, String> {
        self.runner.run(args)
    }

    /// Basalt's devices on this host (by name prefix), from `ip -o link show`.
    fn devices(&mut self) -> Result<BTreeSet<String>, String> {
        let out = self.run(&["ip", "-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("bsn") || n.starts_with("bvx") || n.starts_with("bt"))
            .collect())
    }

    /// The peers a VXLAN device replicates to now.
    fn peers(&mut self, vxlan: &str) -> Result<BTreeSet<String>, String> {
        let out = self.run(&["bridge", "fdb", "show", "dev", vxlan])?;
        Ok(out
            .lines()
            .filter(|l| l.starts_with("00:00:00:00:00:00 "))
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "dst").nth(1).map(String::from))
            .collect())
    }

    /// Makes the host carry exactly `segments` and `taps` (tap name → VNI).
    /// Returns what could not be done, one line each; what could, is.
    pub fn apply(&mut self, segments: &BTreeMap<u32, Segment>, taps: &BTreeMap<String, u32>) -> Vec<String> {
        let mut errors = Vec::new();
        let have = match self.devices() {
            Ok(d) => d,
            Err(e) => return vec![e],
        };
        let mtu = OVERLAY_MTU.to_string();
        for (vni, seg) in segments {
            let (br, vx) = (bridge_name(*vni), vxlan_name(*vni));
            let id = vni.to_string();
            let mut steps: Vec<Vec<&str>> = Vec::new();
            if !have.contains(&br) {
                steps.push(vec!["ip", "link", "add", &br, "type", "bridge"]);
                steps.push(vec!["ip", "link", "set", &br, "mtu", &mtu, "up"]);
            }
            if !have.contains(&vx) {
                steps.push(vec![
                    "ip", "link", "add", &vx, "mtu", &mtu, "type", "vxlan", "id", &id, "local", &self.local, "dstport",
                    VXLAN_PORT, "learning",
                ]);
                steps.push(vec!["ip", "link", "set", &vx, "master", &br]);
                steps.push(vec!["ip", "link", "set", &vx, "up"]);
            }
            let mut ok = true;
            for s in &steps {
                if let Err(e) = self.runner.run(s) {
                    errors.push(e);
                    ok = false;
                    break;
                }
            }
            if !steps.is_empty() && ok {
                info!(vni, bridge = %br, vxlan = %vx, local = %self.local, "network segment built");
            }
            if !ok {
                continue;
            }
            match self.peers(&vx) {
                Ok(now) => {
                    for p in seg.peers.difference(&now) {
                        if let Err(e) = self.run(&["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", &vx, "dst", p]) {
                            errors.push(e);
                        }
                    }
                    for p in now.difference(&seg.peers) {
                        if let Err(e) = self.run(&["bridge", "fdb", "del", "00:00:00:00:00:00", "dev", &vx, "dst", p]) {
                            errors.push(e);
                        }
                    }
                    if now != seg.peers {
                        info!(vni, peers = ?seg.peers, "VXLAN peers");
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for (tap, vni) in taps {
            if have.contains(tap) {
                continue;
            }
            if !segments.contains_key(vni) {
                errors.push(format!("tap {tap}: network with VNI {vni} is not on this host"));
                continue;
            }
            let br = bridge_name(*vni);
            let steps: [Vec<&str>; 3] = [
                vec!["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"],
                vec!["ip", "link", "set", tap, "mtu", &mtu, "master", &br],
                vec!["ip", "link", "set", tap, "up"],
            ];
            match steps.iter().try_for_each(|s| self.runner.run(s).map(|_| ())) {
                Ok(()) => {
                    info!(tap = %tap, bridge = %br, "tap ready");
                    if let Some((root, profile)) = &self.tap_tuning {
                        if let Err(e) = crate::nic::tune_tap(root, profile, tap) {
                            // The tap works untuned; said, not fatal.
                            warn!(tap = %tap, "tap RPS not set: {e}");
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        // What nothing here needs any more: taps first, then the segments.
        let wanted_segments: BTreeSet<String> =
            segments.keys().flat_map(|v| [bridge_name(*v), vxlan_name(*v)]).collect();
        let stale: Vec<&String> = have
            .iter()
            .filter(|d| d.starts_with("bt") && !taps.contains_key(*d))
            .chain(have.iter().filter(|d| d.starts_with("bvx") && !wanted_segments.contains(*d)))
            .chain(have.iter().filter(|d| d.starts_with("bsn") && !wanted_segments.contains(*d)))
            .collect();
        for d in stale {
            match self.run(&["ip", "link", "del", d]) {
                Ok(_) => info!(device = %d, "removed: no longer used on this host"),
                Err(e) => {
                    warn!("{e}");
                    errors.push(e);
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host as iproute2 would show it: devices and VXLAN FDB entries.
    #[derive(Default)]
    struct FakeHost {
        devices: BTreeSet<String>,
        fdb: BTreeMap<String, BTreeSet<String>>,
        log: Vec<String>,
        fail: Option<String>,
    }

    impl Runner for FakeHost {
        fn run(&mut self, args: &[&str]) -> Result<String, String> {
            let line = args.join(" ");
            if self.fail.as_deref().is_some_and(|f| line.contains(f)) {
                return Err(format!("`{line}`: RTNETLINK answers: Operation not permitted"));
            }
            let out = match args {
                ["ip", "-o", "link", "show"] => {
                    self.devices.iter().enumerate().map(|(i, d)| format!("{}: {d}: <UP> mtu 1450\n", i + 1)).collect()
                }
                ["bridge", "fdb", "show", "dev", vx] => self
                    .fdb
                    .get(*vx)
                    .into_iter()
                    .flatten()
                    .map(|p| format!("00:00:00:00:00:00 dst {p} self permanent\n"))
                    .collect(),
                ["ip", "link", "add", name, ..] | ["ip", "tuntap", "add", "dev", name, ..] => {
                    assert!(self.devices.insert(name.to_string()), "{name} created twice");
                    String::new()
                }
                ["ip", "link", "del", name] => {
                    assert!(self.devices.remove(*name), "{name} deleted but absent");
                    self.fdb.remove(*name);
                    String::new()
                }
                ["bridge", "fdb", "append", _, "dev", vx, "dst", p] => {
                    self.fdb.entry(vx.to_string()).or_default().insert(p.to_string());
                    String::new()
                }
                ["bridge", "fdb", "del", _, "dev", vx, "dst", p] => {
                    self.fdb.entry(vx.to_string()).or_default().remove(*p);
                    String::new()
                }
                _ => String::new(),
            };
            self.log.push(line);
            Ok(out)
        }
    }

    fn seg(vni: u32, peers: &[&str]) -> (u32, Segment) {
        (vni, Segment { vni, peers: peers.iter().map(|p| p.to_string()).collect() })
    }

    #[test]
    fn segments_and_taps_are_built_once_kept_while_used_and_removed_after() {
        let mut h = HostNetworks::new(FakeHost::default(), "10.77.0.11".into());
        let tap = tap_name("web", 0);
        assert!(tap.len() <= 15 && tap.starts_with("bt"), "{tap}");
        assert_ne!(tap_name("web", 0), tap_name("web", 1));
        assert_ne!(tap_name("web", 0), tap_name("db", 0));
        let segs = BTreeMap::from([seg(1000, &["10.77.0.12"])]);
        let taps = BTreeMap::from([(tap.clone(), 1000)]);
        assert!(h.apply(&segs, &taps).is_empty());
        let fake = &h.runner;
        assert_eq!(fake.devices, BTreeSet::from(["bsn1000".into(), "bvx1000".into(), tap.clone()]));
        assert!(fake.log.iter().any(|l| l.contains("type vxlan id 1000 local 10.77.0.11 dstport 4789")), "{:?}", fake.log);
        assert!(fake.log.iter().any(|l| l == &format!("ip link set {tap} mtu 1450 master bsn1000")), "{:?}", fake.log);
        assert_eq!(fake.fdb["bvx1000"], BTreeSet::from(["10.77.0.12".to_string()]));

        // Again, as after an agent restart: nothing is touched.
        h.runner.log.clear();
        assert!(h.apply(&segs, &taps).is_empty());
        assert!(h.runner.log.iter().all(|l| l.contains("show")), "only looked: {:?}", h.runner.log);

        // Peers change: one added, one removed.
        let segs = BTreeMap::from([seg(1000, &["10.77.0.13"])]);
        assert!(h.apply(&segs, &taps).is_empty());
        assert_eq!(h.runner.fdb["bvx1000"], BTreeSet::from(["10.77.0.13".to_string()]));

        // The NIC goes, then the network: their devices go with them.
        assert!(h.apply(&segs, &BTreeMap::new()).is_empty());
        assert!(!h.runner.devices.contains(&tap));
        assert!(h.apply(&BTreeMap::new(), &BTreeMap::new()).is_empty());
        assert!(h.runner.devices.is_empty(), "{:?}", h.runner.devices);
    }

    #[test]
    fn failures_are_reported_and_the_rest_still_done() {
        let mut fake = FakeHost::default();
        fake.devices.insert("eth0".into()); // not Basalt's: never touched
        fake.fail = Some("id 2000".into());
        let mut h = HostNetworks::new(fake, "10.77.0.11".into());
        let segs = BTreeMap::from([seg(1000, &[]), seg(2000, &[])]);
        let taps = BTreeMap::from([(tap_name("a", 0), 1000), (tap_name("b", 0), 2000), (tap_name("c", 0), 3000)]);
        let errors = h.apply(&segs, &taps);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("Operation not permitted"), "{errors:?}");
        assert!(errors[1].contains("VNI 3000 is not on this host"), "{errors:?}");
        assert!(h.runner.devices.contains(&tap_name("a", 0)), "network 1000 was built");
        assert!(h.runner.devices.contains("eth0"));
    }
}
