//! The internal `RaftService`: openraft's three RPCs plus `Forward`, by which
//! a follower hands the leader what only the leader can do.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use super::network::{decode, encode};
use super::{NodeId, TypeConfig};
use crate::node::{Controller, Forwarded};
use basalt_proto::raft::v1::raft_service_server::RaftService;
use basalt_proto::raft::v1::Payload;

pub struct RaftRpc {
    pub ctl: Arc<Controller>,
}

#[tonic::async_trait]
impl RaftService for RaftRpc {
    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        let res = self.ctl.raft.append_entries(rpc).await;
        Ok(Response::new(encode(&res)?))
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        let res = self.ctl.raft.vote(rpc).await;
        Ok(Response::new(encode(&res)?))
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        let res = self.ctl.raft.install_snapshot(rpc).await;
        Ok(Response::new(encode(&res)?))
    }

    async fn forward(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let op: Forwarded = decode(req.get_ref())?;
        let reply = self.ctl.execute_local(op).await;
        Ok(Response::new(encode(&reply)?))
    }
}
