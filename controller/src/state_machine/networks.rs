//! Network commands and the IPAM of VM NICs (see `model::networks`). Like
//! every handler, each checks everything before it changes anything.

use std::net::Ipv4Addr;

use super::{not_found, Changes, ClusterState, Outcome};
use crate::error::{invalid, precondition, CommandError};
use crate::model::networks::{mac, FIRST_AUTO_VNI, MAX_MACS, MAX_NICS_PER_VM, MAX_VNI};
use crate::model::{EventKind, Network, NetworkRequest, NicAddress, NicSpec};

impl ClusterState {
    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.values()
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.get(name)
    }

    /// Addresses handed out on `network`: (ip, vm, nic index).
    pub fn network_leases(&self, network: &str) -> impl Iterator<Item = (Ipv4Addr, &str, usize)> {
        self.leases.get(network).into_iter().flatten().map(|(ip, (vm, i))| (*ip, vm.as_str(), *i))
    }

    /// Nodes with a VM on `network` (placed there, or migrating there).
    pub fn nodes_on_network(&self, network: &str) -> std::collections::BTreeSet<&str> {
        let mut out = std::collections::BTreeSet::new();
        for (vm, _) in self.leases.get(network).into_iter().flat_map(|l| l.values()) {
            if let Some(p) = self.vms.get(vm).and_then(|v| v.placement.as_deref()) {
                out.insert(p);
            }
            if let Some(m) = self.active_migration(vm) {
                out.insert(m.target.as_str());
            }
        }
        out
    }

    /// Nodes sharing a network with `vm`: their VXLAN peers change when it
    /// arrives on or leaves a node.
    pub(super) fn network_neighbours(&self, vm: &str) -> Vec<String> {
        let Some(v) = self.vms.get(vm) else { return Vec::new() };
        let mut out: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for n in &v.nics {
            out.extend(self.nodes_on_network(&n.network).into_iter().map(String::from));
        }
        out.into_iter().collect()
    }

    pub(super) fn create_network(
        &mut self,
        req: &NetworkRequest,
        rev: u64,
        ch: &mut Changes,
    ) -> Result<Outcome, CommandError> {
        if self.networks.contains_key(&req.name) {
            return Err(CommandError::AlreadyExists(format!("network {} already exists", req.name)));
        }
        let vni = match req.vni {
            Some(v) => v,
            None => (FIRST_AUTO_VNI..=MAX_VNI)
                .find(|v| !self.networks.values().any(|n| n.vni == *v))
                .ok_or_else(|| precondition("every VNI is in use"))?,
        };
        let n = req.build(vni, rev)?;
        if let Some(o) = self.networks.values().find(|o| o.vni == vni) {
            return Err(CommandError::AlreadyExists(format!(
                "network {}: VNI {vni} is network {}'s",
                n.name, o.name
            )));
        }
        if let Some(o) = self.networks.values().find(|o| o.overlaps(&n)) {
            return Err(precondition(format!(
                "network {}: {} overlaps network {} ({})",
                n.name,
                n.cidr(),
                o.name,
                o.cidr()
            )));
        }
        let gw = n.gateway.map_or("no gateway".to_string(), |g| format!("gateway {g}"));
        ch.push((EventKind::NetworkCreated, format!("network/{}", n.name), format!("{} VNI {vni}, {gw}", n.cidr())));
        self.networks.insert(n.name.clone(), n);
        Ok(Outcome::Done)
    }

    pub(super) fn delete_network(&mut self, name: &str, ch: &mut Changes) -> Result<Outcome, CommandError> {
        if !self.networks.contains_key(name) {
            return Err(not_found("network", name));
        }
        let users: Vec<String> = self.network_leases(name).map(|(ip, vm, i)| format!("vm {vm} nic {i} ({ip})")).collect();
        if !users.is_empty() {
            let more = if users.len() > 3 { format!(" and {} more", users.len() - 3) } else { String::new() };
            return Err(precondition(format!(
                "network {name} is in use by {}{more}; delete those VMs first",
                users[..users.len().min(3)].join(", ")
            )));
        }
        self.networks.remove(name);
        self.leases.remove(name);
        ch.push((EventKind::NetworkDeleted, format!("network/{name}"), "deleted".into()));
        Ok(Outcome::Done)
    }

    /// The MAC and IP each of `nics` would get, without taking them: every
    /// network exists, a requested address is a free host address of its
    /// subnet, and the subnet has room for the rest.
    pub(super) fn allocate_nics(&self, vm: &str, nics: &[NicSpec]) -> Result<Vec<NicAddress>, CommandError> {
        if nics.len() > MAX_NICS_PER_VM {
            return Err(invalid(format!("vm {vm}: {} NICs, at most {MAX_NICS_PER_VM}", nics.len())));
        }
        if u64::from(self.macs_issued) + nics.len() as u64 > u64::from(MAX_MACS) {
            return Err(precondition("the cluster has handed out every MAC it can"));
        }
        let mut out: Vec<NicAddress> = Vec::new();
        let taken = |st: &Self, out: &[NicAddress], net: &str, ip: Ipv4Addr| {
            st.leases.get(net).and_then(|l| l.get(&ip)).map(|(v, i)| format!("vm {v} nic {i}")).or_else(|| {
                out.iter().position(|a| a.network == net && a.ip == ip).map(|i| format!("this vm's nic {i}"))
            })
        };
        // Requested addresses first, so a free pick never takes one of them.
        let mut picks: Vec<Option<Ipv4Addr>> = vec![None; nics.len()];
        for (i, s) in nics.iter().enumerate() {
            let n = self
                .networks
                .get(&s.network)
                .ok_or_else(|| CommandError::NotFound(format!("vm {vm} nic {i}: network {} does not exist", s.network)))?;
            if let Some(ip) = s.ip {
                if let Some(why) = n.refuse_host(ip) {
                    return Err(invalid(format!("vm {vm} nic {i}: {why}")));
                }
                let so_far: Vec<NicAddress> = nics[..i]
                    .iter()
                    .zip(&picks)
                    .filter_map(|(s, p)| p.map(|ip| NicAddress { network: s.network.clone(), mac: String::new(), ip }))
                    .collect();
                if let Some(who) = taken(self, &so_far, &n.name, ip) {
                    return Err(precondition(format!("vm {vm} nic {i}: {ip} on network {} is taken by {who}", n.name)));
                }
                picks[i] = Some(ip);
            }
        }
        for (i, s) in nics.iter().enumerate() {
            let n = &self.networks[&s.network];
            let ip = match picks[i] {
                Some(ip) => ip,
                None => {
                    let reserved: Vec<NicAddress> = nics
                        .iter()
                        .zip(&picks)
                        .filter_map(|(s, p)| p.map(|ip| NicAddress { network: s.network.clone(), mac: String::new(), ip }))
                        .chain(out.iter().cloned())
                        .collect();
                    n.hosts()
                        .find(|ip| n.gateway != Some(*ip) && taken(self, &reserved, &n.name, *ip).is_none())
                        .ok_or_else(|| {
                            precondition(format!(
                                "vm {vm} nic {i}: network {} ({}) has no free address",
                                n.name,
                                n.cidr()
                            ))
                        })?
                }
            };
            out.push(NicAddress { network: s.network.clone(), mac: mac(self.macs_issued + i as u32), ip });
        }
        Ok(out)
    }

    /// Gives `vm` the addresses [`Self::allocate_nics`] chose.
    pub(super) fn give_nics(&mut self, vm: &str, nics: Vec<NicAddress>, ch: &mut Changes) {
        for (i, n) in nics.iter().enumerate() {
            self.leases.entry(n.network.clone()).or_default().insert(n.ip, (vm.to_string(), i));
            ch.push((
                EventKind::VmSpecUpdated,
                format!("vm/{vm}"),
                format!("nic {i} on network {}: {} {}", n.network, n.mac, n.ip),
            ));
        }
        self.macs_issued += nics.len() as u32;
        if let Some(v) = self.vms.get_mut(vm) {
            v.nics = nics;
        }
    }

    /// Releases `vm`'s addresses (it is being deleted). MACs are not reused.
    pub(super) fn take_nics(&mut self, vm: &str, ch: &mut Changes) {
        let Some(v) = self.vms.get_mut(vm) else { return };
        for n in std::mem::take(&mut v.nics) {
            if let Some(l) = self.leases.get_mut(&n.network) {
                l.remove(&n.ip);
                if l.is_empty() {
                    self.leases.remove(&n.network);
                }
            }
            ch.push((EventKind::VmDeleted, format!("vm/{vm}"), format!("released {} on network {}", n.ip, n.network)));
        }
    }
}
