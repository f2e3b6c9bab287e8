//! `basaltctl network`: tenant networks and the addresses handed out on them.

use basalt_proto::v1 as pb;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cluster::{connect, runtime, CliError};
use crate::objects::written;

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network: an IPv4 subnet carried between hosts on a VXLAN segment.
    Create {
        name: String,
        /// The subnet, /16 to /29 (e.g. 10.10.0.0/24).
        #[arg(long)]
        cidr: String,
        /// VXLAN segment id, 1-16777215 (default: the lowest free one from 1000).
        #[arg(long)]
        vni: Option<u32>,
        /// Reserved for the subnet's router (default: its first address; "none": no gateway).
        #[arg(long)]
        gateway: Option<String>,
    },
    List,
    /// A network and every address handed out on it.
    Show { name: String },
    /// Refused while a VM has a NIC on it.
    Delete { name: String },
}

fn network_json(n: &pb::Network) -> Value {
    json!({
        "name": n.name, "cidr": n.cidr, "vni": n.vni,
        "gateway": (!n.gateway.is_empty()).then_some(&n.gateway),
        "used": n.used, "size": n.size, "created_revision": n.created_revision,
        "leases": n.leases.iter().map(|l| json!({"ip": l.ip, "vm": l.vm, "nic": l.nic, "mac": l.mac})).collect::<Vec<_>>(),
    })
}

pub fn network(endpoints: &[String], cmd: &NetworkCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        Ok(match cmd {
            NetworkCmd::Create { name, cidr, vni, gateway } => {
                let req = pb::CreateNetworkRequest {
                    name: name.clone(),
                    cidr: cidr.clone(),
                    vni: vni.unwrap_or(0),
                    gateway: gateway.clone().unwrap_or_default(),
                };
                let w = c.create_network(req).await.map_err(CliError::Refused)?.into_inner();
                written(&w, &format!("network {name} created"), as_json)
            }
            NetworkCmd::List => {
                let r = c.list_networks(pb::ListRequest::default()).await.map_err(CliError::Refused)?.into_inner();
                if as_json {
                    Value::Array(r.networks.iter().map(network_json).collect()).to_string()
                } else {
                    let mut out = format!("{:<16} {:<18} {:>8} {:<15} {:>11}\n", "NETWORK", "CIDR", "VNI", "GATEWAY", "USED");
                    for n in &r.networks {
                        let gw = if n.gateway.is_empty() { "-" } else { n.gateway.as_str() };
                        let used = format!("{}/{}", n.used, n.size);
                        out.push_str(&format!("{:<16} {:<18} {:>8} {:<15} {:>11}\n", n.name, n.cidr, n.vni, gw, used));
                    }
                    out
                }
            }
            NetworkCmd::Show { name } => {
                let req = pb::GetRequest { name: name.clone(), allow_stale: false };
                let n = c.get_network(req).await.map_err(CliError::Refused)?.into_inner();
                let j = network_json(&n);
                if as_json {
                    j.to_string()
                } else {
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                }
            }
            NetworkCmd::Delete { name } => {
                let w = c.delete_network(pb::NameRef { name: name.clone() }).await.map_err(CliError::Refused)?.into_inner();
                written(&w, &format!("network {name} deleted"), as_json)
            }
        })
    })
}
