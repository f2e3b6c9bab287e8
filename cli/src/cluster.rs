//! Commands that talk to the controllers: `cluster status` and controller
//! membership. Any controller answers (followers forward to the leader), so
//! the endpoints are tried in order until one accepts a connection.

use std::time::Duration;

use basalt_proto::v1 as pb;
use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use clap::Subcommand;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

#[derive(Subcommand, Debug)]
pub enum ControllerCmd {
    /// List the controllers (Raft members), their role and the leader.
    List,
    /// Add a controller as a learner: it receives the log (or a snapshot) but does not vote yet.
    Add {
        /// Its node id (as in its --node-id).
        id: u64,
        /// Its gRPC address, host:port.
        address: String,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a controller (voter or learner) from the cluster.
    Remove { id: u64 },
}

/// Why a command failed, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No endpoint answered: exit 3.
    #[error("no controller reachable at {endpoints}: {last}")]
    Unreachable { endpoints: String, last: String },
    /// The cluster refused or failed the call: exit 1.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Refused(tonic::Status),
    /// The arguments make no sense together: exit 2, like clap's own refusals.
    #[error("{0}")]
    Usage(String),
    /// Waited for a state that did not come: exit 4.
    #[error("{0}")]
    Timeout(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => 3,
            CliError::Refused(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Timeout(_) => 4,
        }
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "timed out",
        _ => "error",
    }
}

pub(crate) async fn connect(endpoints: &[String]) -> Result<ClusterServiceClient<Channel>, CliError> {
    let mut last = String::from("no endpoints given");
    for e in endpoints {
        let ep = Endpoint::from_shared(format!("http://{e}"))
            .map_err(|err| CliError::Unreachable { endpoints: e.clone(), last: err.to_string() })?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30));
        match ep.connect().await {
            Ok(ch) => return Ok(ClusterServiceClient::new(ch)),
            Err(err) => last = format!("{e}: {err}"),
        }
    }
    Err(CliError::Unreachable { endpoints: endpoints.join(","), last })
}

/// A spinner on stderr, drawn only on a terminal (scripts see just the result).
pub(crate) fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

fn controllers_table(r: &pb::ListControllersResponse) -> String {
    let mut out = format!("{:<4} {:<22} {:<8} {}\n", "ID", "ADDRESS", "ROLE", "LEADER");
    for c in &r.controllers {
        let role = if c.is_voter { "voter" } else { "learner" };
        out.push_str(&format!("{:<4} {:<22} {:<8} {}\n", c.id, c.address, role, if c.is_leader { "*" } else { "" }));
    }
    if r.leader_id == 0 {
        out.push_str("no leader elected\n");
    }
    out
}

fn controllers_json(r: &pb::ListControllersResponse) -> serde_json::Value {
    json!({
        "leader_id": r.leader_id,
        "controllers": r.controllers.iter().map(|c| json!({
            "id": c.id, "address": c.address, "voter": c.is_voter, "leader": c.is_leader,
        })).collect::<Vec<_>>(),
    })
}

pub fn controller(endpoints: &[String], cmd: &ControllerCmd, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        let r = match cmd {
            ControllerCmd::List => c.list_controllers(pb::ListControllersRequest {}).await,
            ControllerCmd::Add { id, address } => {
                c.add_controller(pb::AddControllerRequest { id: *id, address: address.clone() }).await
            }
            ControllerCmd::Promote { id } => c.promote_controller(pb::ControllerRef { id: *id }).await,
            ControllerCmd::Remove { id } => c.remove_controller(pb::ControllerRef { id: *id }).await,
        }
        .map_err(CliError::Refused)?
        .into_inner();
        Ok(if as_json { controllers_json(&r).to_string() } else { controllers_table(&r) })
    })
}

pub fn status(endpoints: &[String], stale: bool, as_json: bool) -> Result<String, CliError> {
    runtime().block_on(async {
        let mut c = connect(endpoints).await?;
        let s = c
            .get_cluster_status(pb::GetClusterStatusRequest { allow_stale: stale })
            .await
            .map_err(CliError::Refused)?
            .into_inner();
        if as_json {
            return Ok(json!({
                "version": s.version, "leader_id": s.leader_id, "term": s.term, "revision": s.revision,
                "answered_by": s.answered_by,
                "nodes": {"total": s.nodes, "ready": s.nodes_ready},
                "vms": {"total": s.vms, "running": s.vms_running, "pending": s.vms_pending},
                "controllers": controllers_json(&pb::ListControllersResponse { controllers: s.controllers.clone(), leader_id: s.leader_id })["controllers"],
            })
            .to_string());
        }
        let mut out = format!(
            "leader {}  term {}  revision {}  (answered by controller {})\nnodes {} ({} ready)  vms {} ({} running, {} pending)\n\n",
            s.leader_id, s.term, s.revision, s.answered_by, s.nodes, s.nodes_ready, s.vms, s.vms_running, s.vms_pending
        );
        out.push_str(&controllers_table(&pb::ListControllersResponse { controllers: s.controllers, leader_id: s.leader_id }));
        Ok(out)
    })
}
