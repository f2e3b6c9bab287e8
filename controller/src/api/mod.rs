//! The gRPC services a controller serves on its one port: the public
//! `ClusterService`, the agents' `AgentService` (and the internal
//! `RaftService`, in [`crate::raft::service`]).

pub mod agent;
pub mod cluster;
pub mod convert;

use basalt_proto::v1 as pb;

use crate::state_machine::{Outcome, Response};

fn write_result(r: Response) -> pb::WriteResult {
    let mut out = pb::WriteResult { revision: r.revision, ..Default::default() };
    match r.outcome {
        Outcome::Done => {}
        Outcome::VmGeneration(g) => out.generation = g,
        Outcome::VmDeleted { deleted_volumes } => out.deleted_volumes = deleted_volumes,
        Outcome::Migration(_) => {}
    }
    out
}
