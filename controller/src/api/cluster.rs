//! `basalt.v1.ClusterService`: every call either reads (after a read-index
//! barrier unless `allow_stale`) or commits one command through the leader.

use std::collections::BTreeMap;
use std::sync::Arc;

use basalt_proto::v1 as pb;
use basalt_proto::v1::cluster_service_server::ClusterService;
use tonic::{Request, Response, Status};

use super::convert;
use super::write_result;
use crate::error::CommandError;
use crate::model::{EventKind, EventQuery, Power};
use crate::node::{Controller, Forwarded};
use crate::raft::store::Applied;
use crate::state_machine::Command;

pub struct ClusterApi {
    pub ctl: Arc<Controller>,
}

fn not_found(what: &str, name: &str) -> Status {
    Status::not_found(format!("{what} {name} does not exist"))
}

fn matches(labels: &BTreeMap<String, String>, selector: &std::collections::HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Why a pending VM is waiting, from the reconciler's last recorded verdict.
fn unschedulable_reason(st: &Applied, vm: &crate::model::Vm) -> Option<String> {
    if vm.placement.is_some() || vm.desired_power != Power::Running {
        return None;
    }
    let q = EventQuery {
        subject: Some(format!("vm/{}", vm.name)),
        kind: Some(EventKind::VmUnschedulable),
        since_revision: Some(vm.updated_revision),
        limit: None,
    };
    st.cluster.query_events(&q).last().map(|e| e.message.clone())
}

impl ClusterApi {
    async fn commit(&self, cmd: Command) -> Result<Response<pb::WriteResult>, Status> {
        let r = self.ctl.write(cmd).await?;
        Ok(Response::new(write_result(r)))
    }

    async fn read<T>(&self, allow_stale: bool, f: impl FnOnce(&Applied) -> Result<T, Status>) -> Result<T, Status> {
        self.ctl.read_barrier(allow_stale).await?;
        let st = self.ctl.shared.read();
        f(&st)
    }

    fn controllers(&self) -> pb::ListControllersResponse {
        let m = self.ctl.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let controllers = membership
            .nodes()
            .map(|(id, n)| pb::ControllerInfo {
                id: *id,
                address: n.addr.clone(),
                is_leader: m.current_leader == Some(*id),
                is_voter: voters.contains(id),
            })
            .collect();
        pb::ListControllersResponse { controllers, leader_id: m.current_leader.unwrap_or(0) }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn get_cluster_status(
        &self,
        req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let _t = self.ctl.metrics.rpc("GetClusterStatus");
        self.ctl.read_barrier(req.get_ref().allow_stale).await?;
        let c = self.controllers();
        let term = self.ctl.raft.metrics().borrow().current_term;
        let st = self.ctl.shared.read();
        let cl = &st.cluster;
        Ok(Response::new(pb::ClusterStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            controllers: c.controllers,
            leader_id: c.leader_id,
            term,
            revision: cl.revision(),
            nodes: cl.nodes().count() as u32,
            nodes_ready: cl.nodes().filter(|n| n.state == crate::model::NodeState::Ready).count() as u32,
            vms: cl.vms().count() as u32,
            vms_running: cl.vms().filter(|v| v.observed.phase == crate::model::VmPhase::Running).count() as u32,
            vms_pending: cl.pending_vms().len() as u32,
            answered_by: self.ctl.id,
        }))
    }

    async fn list_controllers(
        &self,
        _req: Request<pb::ListControllersRequest>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListControllers");
        Ok(Response::new(self.controllers()))
    }

    async fn add_controller(
        &self,
        req: Request<pb::AddControllerRequest>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        let _t = self.ctl.metrics.rpc("AddController");
        let r = req.into_inner();
        self.ctl.membership(Forwarded::AddLearner { id: r.id, addr: r.address }).await?;
        Ok(Response::new(self.controllers()))
    }

    async fn promote_controller(
        &self,
        req: Request<pb::ControllerRef>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        let _t = self.ctl.metrics.rpc("PromoteController");
        self.ctl.membership(Forwarded::Promote { id: req.get_ref().id }).await?;
        Ok(Response::new(self.controllers()))
    }

    async fn remove_controller(
        &self,
        req: Request<pb::ControllerRef>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        let _t = self.ctl.metrics.rpc("RemoveController");
        self.ctl.membership(Forwarded::Remove { id: req.get_ref().id }).await?;
        Ok(Response::new(self.controllers()))
    }

    async fn list_nodes(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListNodes");
        let r = req.into_inner();
        let ctl = self.ctl.clone();
        self.read(r.allow_stale, |st| {
            let views = st.cluster.node_views();
            let nodes = st
                .cluster
                .nodes()
                .filter(|n| matches(&n.labels, &r.label_selector))
                .map(|n| {
                    let vms = st.cluster.vms_on(&n.id).map(|v| v.name.clone()).collect();
                    let age = ctl.heartbeat_age(&n.id).map(|d| d.as_millis() as u64);
                    convert::node(n, views.iter().find(|v| v.id == n.id), vms, age)
                })
                .collect();
            Ok(Response::new(pb::ListNodesResponse { nodes, revision: st.cluster.revision() }))
        })
        .await
    }

    async fn get_node(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Node>, Status> {
        let _t = self.ctl.metrics.rpc("GetNode");
        let r = req.into_inner();
        let ctl = self.ctl.clone();
        self.read(r.allow_stale, |st| {
            let n = st.cluster.node(&r.name).ok_or_else(|| not_found("node", &r.name))?;
            let views = st.cluster.node_views();
            let vms = st.cluster.vms_on(&n.id).map(|v| v.name.clone()).collect();
            let age = ctl.heartbeat_age(&n.id).map(|d| d.as_millis() as u64);
            Ok(Response::new(convert::node(n, views.iter().find(|v| v.id == n.id), vms, age)))
        })
        .await
    }

    async fn cordon_node(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("CordonNode");
        self.commit(Command::CordonNode { id: req.into_inner().name }).await
    }

    async fn uncordon_node(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("UncordonNode");
        self.commit(Command::UncordonNode { id: req.into_inner().name }).await
    }

    async fn remove_node(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("RemoveNode");
        self.commit(Command::RemoveNode { id: req.into_inner().name }).await
    }

    async fn create_vm(&self, req: Request<pb::CreateVmRequest>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("CreateVm");
        let r = req.into_inner();
        let spec = convert::vm_spec_from(r.spec).map_err(crate::node::NodeError::from)?;
        let desired_power =
            convert::power_from(r.desired_power, Some(Power::Running)).map_err(crate::node::NodeError::from)?;
        self.commit(Command::CreateVm { name: r.name, spec, desired_power }).await
    }

    async fn get_vm(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Vm>, Status> {
        let _t = self.ctl.metrics.rpc("GetVm");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let vm = st.cluster.vm(&r.name).ok_or_else(|| not_found("vm", &r.name))?;
            Ok(Response::new(convert::vm(vm, unschedulable_reason(st, vm), st.cluster.active_migration(&vm.name), |n| {
                st.cluster.network(n).cloned()
            })))
        })
        .await
    }

    async fn list_vms(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListVms");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let vms = st
                .cluster
                .vms()
                .filter(|v| matches(&v.spec.labels, &r.label_selector))
                .filter(|v| r.node.is_empty() || v.placement.as_deref() == Some(r.node.as_str()))
                .map(|v| {
                    convert::vm(v, unschedulable_reason(st, v), st.cluster.active_migration(&v.name), |n| {
                        st.cluster.network(n).cloned()
                    })
                })
                .collect();
            Ok(Response::new(pb::ListVmsResponse { vms, revision: st.cluster.revision() }))
        })
        .await
    }

    async fn update_vm(&self, req: Request<pb::UpdateVmRequest>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("UpdateVm");
        let r = req.into_inner();
        let spec = convert::vm_spec_from(r.spec).map_err(crate::node::NodeError::from)?;
        let expected_generation = (r.expected_generation != 0).then_some(r.expected_generation);
        self.commit(Command::UpdateVmSpec { name: r.name, expected_generation, spec }).await
    }

    async fn set_vm_power(&self, req: Request<pb::SetVmPowerRequest>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("SetVmPower");
        let r = req.into_inner();
        let power = convert::power_from(r.power, None).map_err(crate::node::NodeError::from)?;
        let expected_generation = (r.expected_generation != 0).then_some(r.expected_generation);
        self.commit(Command::SetVmPower { name: r.name, power, expected_generation }).await
    }

    async fn delete_vm(&self, req: Request<pb::DeleteVmRequest>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("DeleteVm");
        let r = req.into_inner();
        self.commit(Command::DeleteVm { name: r.name, delete_disks: r.delete_disks }).await
    }

    async fn create_volume(&self, req: Request<pb::Volume>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("CreateVolume");
        self.commit(Command::CreateVolume(convert::volume_from(req.into_inner()))).await
    }

    async fn get_volume(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Volume>, Status> {
        let _t = self.ctl.metrics.rpc("GetVolume");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let v = st.cluster.volume(&r.name).ok_or_else(|| not_found("volume", &r.name))?;
            Ok(Response::new(convert::volume(v, &st.cluster.volume_status(&v.name))))
        })
        .await
    }

    async fn list_volumes(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListVolumes");
        self.read(req.get_ref().allow_stale, |st| {
            let volumes =
                st.cluster.volumes().map(|v| convert::volume(v, &st.cluster.volume_status(&v.name))).collect();
            Ok(Response::new(pb::ListVolumesResponse { volumes, revision: st.cluster.revision() }))
        })
        .await
    }

    async fn resize_volume(&self, req: Request<pb::ResizeVolumeRequest>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("ResizeVolume");
        let r = req.into_inner();
        self.commit(Command::ResizeVolume { name: r.name, size_bytes: r.size_bytes }).await
    }

    async fn delete_volume(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("DeleteVolume");
        self.commit(Command::DeleteVolume { name: req.into_inner().name }).await
    }

    async fn create_profile(&self, req: Request<pb::StorageProfile>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("CreateProfile");
        let p = convert::profile_from(req.into_inner()).map_err(crate::node::NodeError::from)?;
        self.commit(Command::CreateProfile(p)).await
    }

    async fn get_profile(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::StorageProfile>, Status> {
        let _t = self.ctl.metrics.rpc("GetProfile");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let p = st.cluster.profile(&r.name).ok_or_else(|| not_found("storage profile", &r.name))?;
            Ok(Response::new(convert::profile(p, &st.cluster.profile_status(&p.name))))
        })
        .await
    }

    async fn list_profiles(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListProfiles");
        self.read(req.get_ref().allow_stale, |st| {
            let profiles =
                st.cluster.profiles().map(|p| convert::profile(p, &st.cluster.profile_status(&p.name))).collect();
            Ok(Response::new(pb::ListProfilesResponse { profiles, revision: st.cluster.revision() }))
        })
        .await
    }

    async fn delete_profile(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("DeleteProfile");
        self.commit(Command::DeleteProfile { name: req.into_inner().name }).await
    }

    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("CreateNetwork");
        self.commit(Command::CreateNetwork(convert::network_request(req.into_inner()))).await
    }

    async fn get_network(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Network>, Status> {
        let _t = self.ctl.metrics.rpc("GetNetwork");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let n = st.cluster.network(&r.name).ok_or_else(|| not_found("network", &r.name))?;
            let leases: Vec<pb::NetworkLease> = st
                .cluster
                .network_leases(&n.name)
                .map(|(ip, vm, nic)| pb::NetworkLease {
                    ip: ip.to_string(),
                    vm: vm.to_string(),
                    nic: nic as u32,
                    mac: st.cluster.vm(vm).and_then(|v| v.nics.get(nic)).map(|a| a.mac.clone()).unwrap_or_default(),
                })
                .collect();
            let used = leases.len();
            Ok(Response::new(convert::network(n, Some(leases), used)))
        })
        .await
    }

    async fn list_networks(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListNetworks");
        self.read(req.get_ref().allow_stale, |st| {
            let networks = st
                .cluster
                .networks()
                .map(|n| convert::network(n, None, st.cluster.network_leases(&n.name).count()))
                .collect();
            Ok(Response::new(pb::ListNetworksResponse { networks, revision: st.cluster.revision() }))
        })
        .await
    }

    async fn delete_network(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("DeleteNetwork");
        self.commit(Command::DeleteNetwork { name: req.into_inner().name }).await
    }

    async fn migrate_vm(&self, req: Request<pb::MigrateVmRequest>) -> Result<Response<pb::MigrateVmResponse>, Status> {
        let _t = self.ctl.metrics.rpc("MigrateVm");
        let r = req.into_inner();
        let target = if r.target.is_empty() {
            // The scheduler's choice, made on a linearizable read; the
            // command checks it again when it applies.
            self.read(false, |st| st.cluster.pick_migration_target(&r.name).map_err(Status::from)).await?
        } else {
            r.target
        };
        let cmd = Command::StartMigration {
            vm: r.name,
            target,
            downtime_ms: r.downtime_ms,
            bandwidth_mib_s: r.bandwidth_mib_s,
        };
        let resp = self.ctl.write(cmd).await?;
        let migration = match resp.outcome {
            // A follower forwarded the write: it applies it a moment after
            // the leader answered, so read once it has caught up.
            crate::state_machine::Outcome::Migration(id) => {
                self.read(false, |st| Ok(st.cluster.migration(id).map(convert::migration))).await?
            }
            _ => None,
        };
        Ok(Response::new(pb::MigrateVmResponse { revision: resp.revision, migration }))
    }

    async fn get_migration(&self, req: Request<pb::GetMigrationRequest>) -> Result<Response<pb::Migration>, Status> {
        let _t = self.ctl.metrics.rpc("GetMigration");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let m = st.cluster.migration(r.id).ok_or_else(|| {
                Status::not_found(format!("migration {} does not exist (or is too old to be kept)", r.id))
            })?;
            Ok(Response::new(convert::migration(m)))
        })
        .await
    }

    async fn list_migrations(
        &self,
        req: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListMigrations");
        let r = req.into_inner();
        self.read(r.allow_stale, |st| {
            let migrations = st
                .cluster
                .migrations()
                .rev()
                .filter(|m| r.vm.is_empty() || m.vm == r.vm)
                .filter(|m| !r.active_only || m.phase.is_active())
                .filter(|m| r.node.is_empty() || m.source == r.node || m.target == r.node)
                .map(convert::migration)
                .collect();
            Ok(Response::new(pb::ListMigrationsResponse { migrations }))
        })
        .await
    }

    async fn cancel_migration(&self, req: Request<pb::NameRef>) -> Result<Response<pb::WriteResult>, Status> {
        let _t = self.ctl.metrics.rpc("CancelMigration");
        self.commit(Command::CancelMigration { vm: req.into_inner().name }).await
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let _t = self.ctl.metrics.rpc("ListEvents");
        let r = req.into_inner();
        let kind = match r.kind.as_str() {
            "" => None,
            k => Some(convert::event_kind_from(k).map_err(crate::node::NodeError::from)?),
        };
        let q = EventQuery {
            subject: (!r.subject.is_empty()).then_some(r.subject),
            kind,
            since_revision: (r.since_revision != 0).then_some(r.since_revision),
            limit: (r.limit != 0).then_some(r.limit as usize),
        };
        self.read(r.allow_stale, |st| {
            let events = st.cluster.query_events(&q).into_iter().map(convert::event).collect();
            Ok(Response::new(pb::ListEventsResponse { events, dropped: st.cluster.events().dropped() }))
        })
        .await
    }
}

impl From<CommandError> for Status {
    fn from(e: CommandError) -> Status {
        crate::node::NodeError::Command(e).into()
    }
}
