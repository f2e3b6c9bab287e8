//! `basalt.v1.AgentService`: what node agents call. Registration and status
//! reports are commands; heartbeats go to the leader's memory only; the
//! assignment watch is served from this controller's applied state.

use std::pin::Pin;
use std::sync::Arc;

use basalt_proto::v1 as pb;
use basalt_proto::v1::agent_service_server::AgentService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::write_result;
use crate::node::{Controller, ForwardReply, Forwarded, NodeError};
use crate::state_machine::Command;

pub struct AgentApi {
    pub ctl: Arc<Controller>,
    /// Becomes true when the controller is stopping: open assignment
    /// streams end with UNAVAILABLE, so agents watch another controller and
    /// the server's drain is not held up by streams that never end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<pb::Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let _t = self.ctl.metrics.rpc("Register");
        let reg = convert::registration(req.into_inner());
        let node = reg.id.clone();
        let r = self.ctl.write(Command::RegisterNode(reg)).await?;
        // Registering counts as a sign of life, so a node is not marked
        // Unreachable between its registration and its first heartbeat.
        self.ctl.on_leader(Forwarded::Heartbeat { node }).await?;
        Ok(Response::new(pb::RegisterResponse {
            revision: r.revision,
            heartbeat_interval_ms: self.ctl.timing.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let _t = self.ctl.metrics.rpc("Heartbeat");
        let node = req.into_inner().node;
        match self.ctl.on_leader(Forwarded::Heartbeat { node: node.clone() }).await? {
            ForwardReply::Heartbeat { known: true } => Ok(Response::new(pb::HeartbeatResponse {
                leader_id: self.ctl.current_leader().unwrap_or(0),
                lease_ms: self.ctl.timing.node_lease.as_millis() as u64,
            })),
            ForwardReply::Heartbeat { known: false } => {
                Err(Status::not_found(format!("node {node} is not registered; call Register first")))
            }
            other => Err(NodeError::Internal(format!("unexpected answer to a heartbeat: {other:?}")).into()),
        }
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        req: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let _t = self.ctl.metrics.rpc("WatchAssignments");
        let r = req.into_inner();
        // The first answer is linearizable, so an agent never starts from a
        // set older than something it was already sent by another controller.
        self.ctl.read_barrier(false).await?;
        if self.ctl.shared.read().cluster.node(&r.node).is_none() {
            return Err(Status::not_found(format!("node {} is not registered; call Register first", r.node)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let shared = self.ctl.shared.clone();
        let mut changes = shared.subscribe();
        let node = r.node;
        let mut sent = r.from_revision;
        let mut first = true;
        let mut stopping = self.stopping.clone();
        if *stopping.borrow() {
            return Err(Status::unavailable("this controller is stopping; watch another one"));
        }
        tokio::spawn(async move {
            loop {
                let msg = {
                    let st = shared.read();
                    let rev = st.cluster.node_revision(&node);
                    if rev > sent || (first && sent == 0) {
                        sent = rev;
                        // Its VMs, and those migrating to it (their `migration` says so).
                        let all = || st.cluster.vms_on(&node).chain(st.cluster.incoming_to(&node));
                        let vms: Vec<pb::Vm> =
                            all().map(|v| convert::vm(v, None, st.cluster.active_migration(&v.name), |n| st.cluster.network(n).cloned())).collect();
                        let names: std::collections::BTreeSet<&str> = all().flat_map(|v| v.spec.volumes()).collect();
                        let volumes = names
                            .into_iter()
                            .filter_map(|n| st.cluster.volume(n))
                            .map(|v| convert::volume(v, &st.cluster.volume_status(&v.name)))
                            .collect();
                        let nets: std::collections::BTreeSet<&str> =
                            all().flat_map(|v| v.nics.iter().map(|n| n.network.as_str())).collect();
                        let networks = nets
                            .into_iter()
                            .filter_map(|n| st.cluster.network(n))
                            .map(|n| {
                                let peers = st
                                    .cluster
                                    .nodes_on_network(&n.name)
                                    .into_iter()
                                    .filter(|p| *p != node)
                                    .filter_map(|p| st.cluster.node(p))
                                    .filter_map(|p| p.address_host().map(String::from))
                                    .collect();
                                pb::NetworkAttachment {
                                    name: n.name.clone(),
                                    vni: n.vni,
                                    cidr: n.cidr(),
                                    gateway: n.gateway.map(|g| g.to_string()).unwrap_or_default(),
                                    peers,
                                }
                            })
                            .collect();
                        Some(pb::Assignments { revision: rev, vms, volumes, networks })
                    } else {
                        None
                    }
                };
                first = false;
                if let Some(m) = msg {
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => {
                        let _ = tx.try_send(Err(Status::unavailable("this controller is stopping; watch another one")));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn report_vm_status(
        &self,
        req: Request<pb::ReportVmStatusRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("ReportVmStatus");
        let r = req.into_inner();
        let phase = convert::phase_from(r.phase).map_err(NodeError::from)?;
        let resp =
            self.ctl.write(Command::ReportVmStatus { name: r.vm, node: r.node, phase, message: r.message }).await?;
        Ok(Response::new(write_result(resp)))
    }

    async fn report_migration(
        &self,
        req: Request<pb::ReportMigrationRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("ReportMigration");
        let r = req.into_inner();
        let report = convert::migration_report_from(&r).map_err(NodeError::from)?;
        if r.node.is_empty() {
            return Err(Status::invalid_argument("node is missing"));
        }
        let cmd = Command::ReportMigration { vm: r.vm, id: r.migration_id, node: Some(r.node), report };
        Ok(Response::new(write_result(self.ctl.write(cmd).await?)))
    }
}
