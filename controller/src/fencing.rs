//! Fencing: a host is cut off from Ceph before any of its VMs runs elsewhere.
//!
//! The leader's storage loop (it holds the Ceph connection) fences a node
//! that is Unreachable and has been silent for `timing.fence_after`:
//!
//! 1. blocklists every Ceph client of the host's IP (`ip:0/0`: all ports and
//!    nonces, so every VMM there, whatever its address), for
//!    [`FENCE_EXPIRY_SECS`];
//! 2. waits until its own client holds the OSD map that says so, so the
//!    next steps are ordered after the fence;
//! 3. breaks the RBD exclusive locks on the disks of the node's VMs, so the
//!    VMM that restarts them elsewhere can take them at once;
//! 4. commits Fenced, which unassigns the node's HA VMs (the scheduler
//!    places them elsewhere) and marks the others Failed.
//!
//! Every step can be repeated, so a leader that dies half-way leaves the
//! node Unreachable and the next leader (silence counts from its own start)
//! does it all again. A host that still runs and lost only its network or
//! its agent can no longer write: its VMMs' I/O fails with ESHUTDOWN.
//!
//! A node whose IP cannot be fenced alone is not fenced (it stays
//! Unreachable, its VMs where they are): an address that is not an IP, an
//! IP another node shares, or the IP of the controller's own Ceph client.
//! Without `[ceph]` nothing is fenced, so nothing is restarted elsewhere.
//!
//! When an operator brings a fenced node back (Cordoned), the leader lifts
//! its blocklist entry.

use std::collections::BTreeSet;
use std::net::IpAddr;

use basalt_storage::ceph::{CephError, Cluster};

use crate::model::{Boot, Node};
use crate::state_machine::ClusterState;

/// How long the blocklist entry lasts. Ceph's default (one hour) is too
/// short: a host that came back after it would write to disks now used
/// elsewhere. Bringing the node back lifts the entry sooner.
pub const FENCE_EXPIRY_SECS: u32 = 30 * 24 * 3600;

/// The blocklist entry that fences every Ceph client of a host.
pub fn host_entry(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:0/0"),
        IpAddr::V6(v6) => format!("[{v6}]:0/0"),
    }
}

/// The IP whose clients fencing `node` blocklists, or why it cannot be
/// fenced alone. `own` are the controller's own Ceph client IPs.
pub fn fence_ip<'a>(node: &Node, all: impl Iterator<Item = &'a Node>, own: &[IpAddr]) -> Result<IpAddr, String> {
    let ip = node_ip(node)
        .ok_or_else(|| format!("its address {:?} is not ip:port, so there is no host to blocklist", node.address))?;
    if own.contains(&ip) {
        return Err(format!(
            "it shares IP {ip} with this controller's Ceph client; fencing it would fence the controller"
        ));
    }
    let sharing: Vec<&str> = all.filter(|n| n.id != node.id && node_ip(n) == Some(ip)).map(|n| n.id.as_str()).collect();
    if !sharing.is_empty() {
        return Err(format!("its IP {ip} is also node {}'s; fencing it would fence them too", sharing.join(", ")));
    }
    Ok(ip)
}

fn node_ip(n: &Node) -> Option<IpAddr> {
    let (host, _) = n.address.rsplit_once(':')?;
    host.trim_matches(['[', ']']).parse().ok()
}

/// The IPs in what `rados_getaddrs` prints (`v2:127.0.0.1:0/123`, or a
/// bracketed list of such).
pub fn client_ips(addrs: &str) -> Vec<IpAddr> {
    addrs
        .split([',', '[', ']'])
        .filter_map(|a| {
            let a = a.trim();
            let a =
                a.strip_prefix("v2:").or_else(|| a.strip_prefix("v1:")).or_else(|| a.strip_prefix("any:")).unwrap_or(a);
            let (hostport, _) = a.split_once('/').unwrap_or((a, ""));
            let (host, _) = hostport.rsplit_once(':')?;
            host.trim_matches(['[', ']']).parse().ok()
        })
        .collect()
}

/// The RBD images (pool, image) of the VMs placed on `node`.
pub fn node_images(st: &ClusterState, node: &str) -> Vec<(String, String)> {
    let mut out = BTreeSet::new();
    for vm in st.vms_on(node) {
        let boot = match &vm.spec.boot {
            Boot::Volume { volume } => Some(volume.as_str()),
            Boot::Kernel { .. } => None,
        };
        for name in boot.into_iter().chain(vm.spec.disks.iter().map(|d| d.volume.as_str())) {
            if let Some(v) = st.volume(name) {
                out.insert((v.pool.clone(), v.image.clone()));
            }
        }
    }
    out.into_iter().collect()
}

/// Steps 1–3 for one host (blocking: librados). Returns what was done, for
/// the node's event.
pub fn fence_host(c: &Cluster, ip: IpAddr, images: &[(String, String)]) -> Result<String, CephError> {
    let entry = host_entry(ip);
    c.fence(&entry, FENCE_EXPIRY_SECS)?;
    let mut broken = 0;
    for (pool, image) in images {
        let io = match c.ioctx(pool) {
            Ok(io) => io,
            Err(e) if e.code() == Some(crate::storage::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let img = match basalt_storage::rbd::Image::open(&io, image) {
            Ok(i) => i,
            // No image, no lock to break.
            Err(e) if e.code() == Some(crate::storage::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        for owner in img.lock_owners()? {
            img.break_lock(&owner)?;
            broken += 1;
        }
    }
    Ok(format!(
        "fenced: Ceph blocklists {entry} for {} days; {broken} RBD lock(s) broken on {} image(s)",
        FENCE_EXPIRY_SECS / 86_400,
        images.len()
    ))
}

/// Each lifted entry's IP and whether its removal worked.
pub type Lifted = Vec<(IpAddr, Result<(), CephError>)>;

/// Lifts the fences of hosts that are back (blocking: librados): removes
/// the entries of `ips` that are on the blocklist, which is read once.
/// Returns each removal's outcome; an IP without an entry is left out.
pub fn unfence_hosts(c: &Cluster, ips: &[IpAddr]) -> Result<Lifted, CephError> {
    let listed: BTreeSet<String> = c.blocklist()?.into_iter().map(|e| e.addr).collect();
    Ok(ips
        .iter()
        .filter(|ip| listed.contains(&host_entry(**ip)))
        .map(|&ip| (ip, c.blocklist_remove(&host_entry(ip))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Capacity, NodeState};

    fn node(id: &str, address: &str) -> Node {
        Node {
            id: id.into(),
            address: address.into(),
            arch: "aarch64".into(),
            capacity: Capacity { vcpus: 4, memory_mib: 4096 },
            labels: Default::default(),
            state: NodeState::Unreachable,
            cpu_features: Default::default(),
            nics: Default::default(),
            nic_profile: Default::default(),
        }
    }

    #[test]
    fn a_host_is_fenced_by_its_ip_alone() {
        let a = node("a", "10.0.0.11:7200");
        let b = node("b", "10.0.0.12:7200");
        let own = client_ips("v2:10.0.0.1:0/2263410817");
        assert_eq!(own, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        let ip = fence_ip(&a, [&a, &b].into_iter(), &own).expect("fenceable");
        assert_eq!(host_entry(ip), "10.0.0.11:0/0");
        assert_eq!(host_entry("fd00::5".parse().unwrap()), "[fd00::5]:0/0");
        let v6 = node("c", "[fd00::5]:7200");
        assert_eq!(fence_ip(&v6, [&v6].into_iter(), &own), Ok("fd00::5".parse().unwrap()));
    }

    #[test]
    fn a_host_that_cannot_be_fenced_alone_is_refused() {
        let a = node("a", "127.0.0.1:7200");
        let b = node("b", "127.0.0.1:7201");
        let own = client_ips("[v2:127.0.0.1:0/1,v1:127.0.0.1:0/1]");
        let e = fence_ip(&a, [&a, &b].into_iter(), &own).unwrap_err();
        assert!(e.contains("this controller's Ceph client"), "{e}");
        let e = fence_ip(&a, [&a, &b].into_iter(), &[]).unwrap_err();
        assert!(e.contains("also node b's"), "{e}");
        let named = node("n", "host-a.example:7200");
        assert!(fence_ip(&named, [&named].into_iter(), &[]).unwrap_err().contains("not ip:port"));
    }
}
