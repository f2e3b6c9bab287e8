//! What only a VM's host can answer, asked of its agent's node service:
//! the serial console, the VMM's KVM exit counters, the vGIC state. The VM's
//! node and that node's address come from the controllers.

use std::io::Write;
use std::time::Duration;

use basalt_proto::v1 as pb;
use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use basalt_proto::v1::node_service_client::NodeServiceClient;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::CliError;

/// The node service of the host running `vm`.
async fn node_of(c: &mut ClusterServiceClient<Channel>, vm: &str) -> Result<NodeServiceClient<Channel>, CliError> {
    let v = c.get_vm(pb::GetRequest { name: vm.into(), allow_stale: false }).await.map_err(CliError::Refused)?;
    let node = v.into_inner().placement;
    if node.is_empty() {
        return Err(CliError::Refused(tonic::Status::failed_precondition(format!(
            "vm {vm} is not placed on any node (pending)"
        ))));
    }
    let n = c.get_node(pb::GetRequest { name: node.clone(), allow_stale: false }).await.map_err(CliError::Refused)?;
    let addr = n.into_inner().address;
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| CliError::Usage(format!("node {node} has address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| {
            CliError::Refused(tonic::Status::unavailable(format!("node {node}'s agent at {addr} does not answer: {e}")))
        })?;
    Ok(NodeServiceClient::new(ch))
}

/// A read-only VMM command (`counters`, `vgic-state`, `status`) as JSON.
pub async fn control(c: &mut ClusterServiceClient<Channel>, vm: &str, command: &str) -> Result<Value, CliError> {
    let mut n = node_of(c, vm).await?;
    let r = n
        .vm_control(pb::VmControlRequest { vm: vm.into(), command: command.into() })
        .await
        .map_err(CliError::Refused)?
        .into_inner();
    serde_json::from_str(&r.json).map_err(|e| CliError::Refused(tonic::Status::internal(format!("bad answer: {e}"))))
}

/// Copies the console to stdout: the last `tail` bytes (all with 0), then,
/// with `follow`, whatever the guest prints until interrupted.
pub async fn console(c: &mut ClusterServiceClient<Channel>, vm: &str, tail: u64, follow: bool) -> Result<(), CliError> {
    let mut n = node_of(c, vm).await?;
    let offset = if tail == 0 { 0 } else { -(tail.min(i64::MAX as u64) as i64) };
    let mut s = n
        .read_console(pb::ReadConsoleRequest { vm: vm.into(), offset, follow })
        .await
        .map_err(CliError::Refused)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = s.message().await.map_err(CliError::Refused)? {
        // The guest's serial output is bytes; a closed stdout ends the copy.
        if out.write_all(&chunk.data).and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

/// `counters` for people: one `name value` line each, sorted.
pub fn counters_table(v: &Value) -> String {
    let mut lines: Vec<String> = Vec::new();
    flatten("", v, &mut lines);
    lines.sort();
    lines.join("\n")
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, x, out);
            }
        }
        Value::Array(a) if a.iter().any(|x| x.is_object()) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        other => out.push(format!("{prefix:<40} {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_as_sorted_lines() {
        let v: Value = serde_json::from_str(r#"{"ids":[1,2],"exits":{"mmio":5,"hvc":1},"vcpus":[{"n":3},{"n":4}]}"#)
            .expect("json");
        let t = counters_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].starts_with("exits.hvc") && lines[0].ends_with(" 1"), "{t}");
        assert!(lines[1].starts_with("exits.mmio") && lines[1].ends_with(" 5"), "{t}");
        assert!(lines[2].starts_with("ids") && lines[2].ends_with("[1,2]"), "{t}");
        assert!(lines[3].starts_with("vcpus[0].n") && lines[3].ends_with(" 3"), "{t}");
        assert!(lines[4].starts_with("vcpus[1].n") && lines[4].ends_with(" 4"), "{t}");
    }
}
