//! Networks and the IPAM of VM NICs: what creating and deleting a network
//! checks, how addresses are handed out and given back, and that no address
//! or MAC is ever handed out twice.

use std::net::Ipv4Addr;

use super::*;
use crate::model::networks::Gateway;
use crate::model::{NetworkRequest, NicSpec};

fn net(name: &str, cidr: &str) -> Command {
    Command::CreateNetwork(NetworkRequest { name: name.into(), cidr: cidr.into(), vni: None, gateway: Gateway::First })
}

fn with_nics(nics: &[(&str, Option<&str>)]) -> VmSpec {
    let mut s = spec(1, 256);
    s.nics = nics
        .iter()
        .map(|(n, ip)| NicSpec { network: n.to_string(), ip: ip.map(|i| i.parse().expect("ip")) })
        .collect();
    s
}

fn ips(st: &ClusterState, vm: &str) -> Vec<String> {
    st.vm(vm).expect("vm").nics.iter().map(|n| format!("{}:{}", n.network, n.ip)).collect()
}

#[test]
fn networks_are_checked_when_created_and_kept_while_used() {
    let mut st = cluster();
    ok(&mut st, net("blue", "10.10.0.0/24"));
    let blue = st.network("blue").expect("blue").clone();
    assert_eq!((blue.vni, blue.gateway), (1000, Some(Ipv4Addr::new(10, 10, 0, 1))), "VNI and gateway picked");
    ok(&mut st, net("green", "10.20.0.0/24"));
    assert_eq!(st.network("green").map(|n| n.vni), Some(1001));
    refused(&mut st, net("blue", "10.30.0.0/24"), Code::AlreadyExists, "network blue already exists");
    refused(&mut st, net("wide", "10.10.0.0/16"), Code::FailedPrecondition, "overlaps network blue (10.10.0.0/24)");
    refused(&mut st, net("bad", "10.40.0.9/24"), Code::InvalidArgument, "host bits set");
    let taken_vni =
        NetworkRequest { name: "red".into(), cidr: "10.50.0.0/24".into(), vni: Some(1001), gateway: Gateway::First };
    refused(&mut st, Command::CreateNetwork(taken_vni), Code::AlreadyExists, "VNI 1001 is network green's");
    let bad_gw = NetworkRequest {
        name: "red".into(),
        cidr: "10.50.0.0/24".into(),
        vni: Some(7),
        gateway: Gateway::At("10.50.1.1".into()),
    };
    refused(&mut st, Command::CreateNetwork(bad_gw), Code::InvalidArgument, "outside");

    // In use: refused, naming the user; free again once the VM is gone.
    ok(&mut st, create_vm("web", with_nics(&[("blue", None)])));
    refused(&mut st, Command::DeleteNetwork { name: "blue".into() }, Code::FailedPrecondition, "vm web nic 0 (10.10.0.2)");
    refused(&mut st, Command::DeleteNetwork { name: "nope".into() }, Code::NotFound, "network nope");
    ok(&mut st, Command::DeleteVm { name: "web".into(), delete_disks: false });
    ok(&mut st, Command::DeleteNetwork { name: "blue".into() });
    assert!(st.network("blue").is_none());
}

#[test]
fn nics_get_addresses_once_and_give_them_back() {
    let mut st = cluster();
    ok(&mut st, net("blue", "10.10.0.0/29")); // hosts .1-.6; .1 is the gateway
    ok(&mut st, net("green", "10.20.0.0/24"));
    // A requested address is kept for its NIC; free picks go around it.
    ok(&mut st, create_vm("a", with_nics(&[("blue", None), ("blue", Some("10.10.0.3")), ("green", None)])));
    assert_eq!(ips(&st, "a"), ["blue:10.10.0.2", "blue:10.10.0.3", "green:10.20.0.2"]);
    let macs: Vec<String> = st.vm("a").expect("a").nics.iter().map(|n| n.mac.clone()).collect();
    assert_eq!(macs, ["02:ba:5a:00:00:00", "02:ba:5a:00:00:01", "02:ba:5a:00:00:02"]);

    // Refusals that change nothing: taken, gateway, outside, unknown network, too many.
    refused(&mut st, create_vm("b", with_nics(&[("blue", Some("10.10.0.3"))])), Code::FailedPrecondition, "taken by vm a nic 1");
    refused(&mut st, create_vm("b", with_nics(&[("blue", Some("10.10.0.1"))])), Code::InvalidArgument, "gateway");
    refused(&mut st, create_vm("b", with_nics(&[("blue", Some("10.10.0.7"))])), Code::InvalidArgument, "broadcast");
    refused(&mut st, create_vm("b", with_nics(&[("blue", Some("10.99.0.7"))])), Code::InvalidArgument, "outside");
    refused(&mut st, create_vm("b", with_nics(&[("red", None)])), Code::NotFound, "network red does not exist");
    let nine: Vec<(&str, Option<&str>)> = (0..9).map(|_| ("green", None)).collect();
    refused(&mut st, create_vm("b", with_nics(&nine)), Code::InvalidArgument, "at most 8");
    refused(
        &mut st,
        create_vm("b", with_nics(&[("blue", Some("10.10.0.4")), ("blue", Some("10.10.0.4"))])),
        Code::FailedPrecondition,
        "taken by this vm's nic 0",
    );

    // The subnet fills up: .4 .5 .6 left, then none.
    ok(&mut st, create_vm("b", with_nics(&[("blue", None), ("blue", None), ("blue", None)])));
    assert_eq!(ips(&st, "b"), ["blue:10.10.0.4", "blue:10.10.0.5", "blue:10.10.0.6"]);
    refused(&mut st, create_vm("c", with_nics(&[("blue", None)])), Code::FailedPrecondition, "has no free address");

    // NICs are fixed once created.
    let mut s = st.vm("b").expect("b").spec.clone();
    s.nics.pop();
    refused(
        &mut st,
        Command::UpdateVmSpec { name: "b".into(), expected_generation: None, spec: s },
        Code::FailedPrecondition,
        "NICs are set when it is created",
    );

    // Deleting a VM gives its addresses back; MACs are never reused.
    ok(&mut st, Command::DeleteVm { name: "a".into(), delete_disks: false });
    ok(&mut st, create_vm("c", with_nics(&[("blue", None)])));
    assert_eq!(ips(&st, "c"), ["blue:10.10.0.2"]);
    assert_eq!(st.vm("c").expect("c").nics[0].mac, "02:ba:5a:00:00:06");
    let leases: Vec<(Ipv4Addr, String)> = st.network_leases("blue").map(|(ip, vm, _)| (ip, vm.to_string())).collect();
    assert_eq!(leases.len(), 4, "{leases:?}");
    let mut seen = std::collections::BTreeSet::new();
    assert!(leases.iter().all(|(ip, _)| seen.insert(*ip)), "no address twice: {leases:?}");

    // All of it survives a snapshot (the `ok` helper checks the index too).
    let back = ClusterState::restore(&st.snapshot().expect("snapshot")).expect("restore");
    assert_eq!(back.vm("c").map(|v| v.nics.clone()), st.vm("c").map(|v| v.nics.clone()));
    assert_eq!(back.network("green"), st.network("green"));
}
