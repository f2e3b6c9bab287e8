//! `basalt.v1.NodeService`, served on the agent's node address: read-only
//! control-socket commands of a VM's basalt-vmm (status, KVM exit counters,
//! vGIC state) and its serial console output. The VM is found by name in the
//! agent's state dir; names are checked first so a request can never reach
//! outside it.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use basalt_proto::names::is_dns_label;
use basalt_proto::v1 as pb;
use basalt_proto::v1::node_service_server::NodeService;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::vmm::VmDir;

/// What may be asked here; everything that changes a VM goes through the controllers.
const COMMANDS: &[&str] = &["status", "counters", "vgic-state", "migrate-status"];
const CHUNK: usize = 64 << 10;

pub struct NodeApi {
    pub state_dir: PathBuf,
}

impl NodeApi {
    fn vm_dir(&self, vm: &str) -> Result<VmDir, Status> {
        // The cluster's rule for VM names: nothing else can name a directory here.
        if !is_dns_label(vm) {
            return Err(Status::invalid_argument(format!("{vm:?} is not a VM name (1-63 characters of a-z 0-9 '-')")));
        }
        let d = VmDir::new(&self.state_dir, vm);
        if !d.0.is_dir() {
            return Err(Status::not_found(format!("vm {vm} has not run on this host")));
        }
        Ok(d)
    }
}

type ConsoleStream = Pin<Box<dyn Stream<Item = Result<pb::ConsoleChunk, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn vm_control(&self, req: Request<pb::VmControlRequest>) -> Result<Response<pb::VmControlResponse>, Status> {
        let r = req.into_inner();
        if !COMMANDS.contains(&r.command.as_str()) {
            return Err(Status::invalid_argument(format!(
                "command {:?} is not offered by the node: {} (power changes go through the controllers)",
                r.command,
                COMMANDS.join(", ")
            )));
        }
        let dir = self.vm_dir(&r.vm)?;
        let socket = dir.control_socket();
        if !socket.exists() {
            return Err(Status::failed_precondition(format!("vm {} is not running on this host", r.vm)));
        }
        let cmd = r.command.clone();
        let resp = tokio::task::spawn_blocking(move || {
            basalt_vmm::control::call(&socket, &cmd, serde_json::Value::Null, Duration::from_secs(5))
        })
        .await
        .map_err(|e| Status::internal(format!("control call: {e}")))?;
        match resp {
            Ok(v) if v.ok => Ok(Response::new(pb::VmControlResponse { json: v.result.to_string() })),
            Ok(v) => Err(Status::failed_precondition(format!(
                "basalt-vmm refused {:?}: {}",
                r.command,
                v.error.unwrap_or_default()
            ))),
            Err(e) => Err(Status::unavailable(format!("vm {}: its control socket does not answer: {e}", r.vm))),
        }
    }

    type ReadConsoleStream = ConsoleStream;

    async fn read_console(&self, req: Request<pb::ReadConsoleRequest>) -> Result<Response<ConsoleStream>, Status> {
        let r = req.into_inner();
        let path = self.vm_dir(&r.vm)?.console();
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::not_found(format!("vm {}: no console output yet ({e})", r.vm)))?;
        let len = f.metadata().await.map_err(|e| Status::internal(e.to_string()))?.len();
        let mut pos =
            if r.offset < 0 { len.saturating_sub(r.offset.unsigned_abs()) } else { (r.offset as u64).min(len) };
        f.seek(std::io::SeekFrom::Start(pos)).await.map_err(|e| Status::internal(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("console: {e}")))).await;
                        return;
                    }
                };
                if n > 0 {
                    let chunk = pb::ConsoleChunk { offset: pos, data: buf[..n].to_vec() };
                    pos += n as u64;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    continue;
                }
                if !r.follow || tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                // A restarted VM starts its console file afresh.
                if f.metadata().await.is_ok_and(|m| m.len() < pos) {
                    pos = 0;
                    if f.seek(std::io::SeekFrom::Start(0)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test(flavor = "current_thread")]
    async fn bad_requests_are_refused_and_the_console_is_read_from_an_offset() {
        let dir = tempfile::tempdir().expect("tmp");
        let api = NodeApi { state_dir: dir.path().into() };
        let call = |vm: &str, cmd: &str| pb::VmControlRequest { vm: vm.into(), command: cmd.into() };
        let code = |r: Result<_, Status>| r.err().map(|s| s.code());
        assert_eq!(code(api.vm_control(Request::new(call("web", "pause"))).await), Some(tonic::Code::InvalidArgument));
        assert_eq!(
            code(api.vm_control(Request::new(call("../x", "status"))).await),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(code(api.vm_control(Request::new(call("web", "status"))).await), Some(tonic::Code::NotFound));
        let d = VmDir::new(dir.path(), "web");
        std::fs::create_dir_all(&d.0).expect("vm dir");
        // The VM's dir exists but no VMM runs: refused, not hung.
        assert_eq!(
            code(api.vm_control(Request::new(call("web", "counters"))).await),
            Some(tonic::Code::FailedPrecondition)
        );
        std::fs::write(d.console(), b"line one\nline two\n").expect("console");
        let read = |offset: i64| pb::ReadConsoleRequest { vm: "web".into(), offset, follow: false };
        let mut s = api.read_console(Request::new(read(-9))).await.expect("stream").into_inner();
        let c = s.next().await.expect("a chunk").expect("ok");
        assert_eq!((c.offset, c.data.as_slice()), (9, b"line two\n".as_slice()));
        assert!(s.next().await.is_none(), "without follow the stream ends at the end of the file");
    }
}
