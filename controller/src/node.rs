//! One controller: its Raft handle, its applied state, and the rule that
//! anything only a leader may do (writes, read-index, membership changes,
//! heartbeats) goes to the leader, from whichever controller received it.
//!
//! Writes carry a request id that the state machine remembers (see
//! [`crate::raft::store`]), so a write retried after an ambiguous failure
//! (leader died mid-call, leadership lost before the entry committed) is
//! applied at most once and the retry gets the first answer.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::error::CommandError;
use crate::metrics::Metrics;
use crate::raft::network::{decode, encode, Channels};
use crate::raft::store::Shared;
use crate::raft::{now_ms, NodeId, Raft, Reply, Request};
use crate::state_machine::{Command, Response};

/// Work only the leader does, as it travels from a follower to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forwarded {
    /// Boxed: a request (a whole VM spec) is far larger than the other
    /// variants. Serde writes a box as its content, so the wire is unchanged.
    Write(Box<Request>),
    ReadIndex,
    AddLearner {
        id: NodeId,
        addr: String,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
    Heartbeat {
        node: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Written(Reply),
    /// Log index a linearizable read must wait for.
    ReadIndex(Option<u64>),
    MembershipChanged,
    Heartbeat {
        known: bool,
    },
    NotLeader {
        leader: Option<(NodeId, String)>,
    },
    Refused(CommandError),
    Unavailable(String),
}

/// Why a call through [`Controller`] failed; becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        match e {
            NodeError::Command(c) => {
                let msg = c.message().to_string();
                match c {
                    CommandError::InvalidArgument(_) => Status::invalid_argument(msg),
                    CommandError::NotFound(_) => Status::not_found(msg),
                    CommandError::AlreadyExists(_) => Status::already_exists(msg),
                    CommandError::FailedPrecondition(_) => Status::failed_precondition(msg),
                }
            }
            NodeError::Unavailable(m) => Status::unavailable(m),
            NodeError::Internal(m) => Status::internal(m),
        }
    }
}

/// Timing knobs that tests shorten.
#[derive(Debug, Clone)]
pub struct Timing {
    /// How long a call waits for a leader to appear or answer before UNAVAILABLE.
    pub leader_wait: Duration,
    /// A node whose agent has not sent a heartbeat for this long becomes Unreachable.
    pub node_lease: Duration,
    /// An Unreachable node silent for this long is fenced (see storage::fencing).
    pub fence_after: Duration,
    pub heartbeat_interval: Duration,
    pub reconcile_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            leader_wait: Duration::from_secs(10),
            node_lease: Duration::from_secs(10),
            fence_after: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(2),
            reconcile_interval: Duration::from_millis(500),
        }
    }
}

pub struct Controller {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub shared: Arc<Shared>,
    pub channels: Channels,
    pub timing: Timing,
    pub metrics: Arc<Metrics>,
    /// Last heartbeat per node: the leader's memory only, by design (heartbeats
    /// are not worth a Raft write each). Reset when leadership changes.
    heartbeats: Mutex<LeaderMemory>,
    boot_ns: u128,
    next_request: AtomicU64,
}

#[derive(Default)]
struct LeaderMemory {
    /// (term, when) this controller last became leader: nodes get a full lease
    /// from then before a missing heartbeat counts.
    since: Option<(u64, Instant)>,
    last_seen: HashMap<String, Instant>,
}

fn refusal_of_write(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ForwardReply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ForwardReply::NotLeader { leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)) }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ForwardReply::Refused(CommandError::FailedPrecondition(c.to_string()))
        }
        RaftError::Fatal(f) => ForwardReply::Unavailable(format!("controller stopped: {f}")),
    }
}

impl Controller {
    pub fn new(
        id: NodeId,
        addr: String,
        raft: Raft,
        shared: Arc<Shared>,
        channels: Channels,
        timing: Timing,
        metrics: Arc<Metrics>,
    ) -> Self {
        let boot_ns =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Controller {
            id,
            addr,
            raft,
            shared,
            channels,
            timing,
            metrics,
            heartbeats: Mutex::new(LeaderMemory::default()),
            boot_ns,
            next_request: AtomicU64::new(1),
        }
    }

    fn request_id(&self) -> String {
        format!("{}-{:x}-{}", self.id, self.boot_ns, self.next_request.fetch_add(1, Ordering::Relaxed))
    }

    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.current_leader() == Some(self.id)
    }

    /// Do `op` here, as if this controller were the leader; a follower answers NotLeader.
    pub async fn execute_local(&self, op: Forwarded) -> ForwardReply {
        match op {
            Forwarded::Write(req) => match self.raft.client_write(*req).await {
                Ok(r) => ForwardReply::Written(r.data),
                Err(e) => refusal_of_write(e),
            },
            Forwarded::ReadIndex => match self.raft.get_read_log_id().await {
                Ok((read, _applied)) => ForwardReply::ReadIndex(read.map(|l| l.index)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    ForwardReply::NotLeader { leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)) }
                }
                Err(e) => ForwardReply::Unavailable(format!("cannot confirm leadership: {e}")),
            },
            Forwarded::AddLearner { id, addr } => {
                if let Err(e) = self.check_new_controller(id, &addr) {
                    return ForwardReply::Refused(e);
                }
                match self.raft.add_learner(id, BasicNode::new(&addr), true).await {
                    Ok(_) => ForwardReply::MembershipChanged,
                    Err(e) => refusal_of_write(e),
                }
            }
            Forwarded::Promote { id } => {
                let (voters, learners) = self.members();
                if voters.contains(&id) {
                    return ForwardReply::MembershipChanged;
                }
                if !learners.contains(&id) {
                    return ForwardReply::Refused(CommandError::NotFound(format!(
                        "controller {id} is not a learner; add it first (controller add {id} HOST:PORT)"
                    )));
                }
                match self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
                    Ok(_) => ForwardReply::MembershipChanged,
                    Err(e) => refusal_of_write(e),
                }
            }
            Forwarded::Remove { id } => {
                let (voters, learners) = self.members();
                let change = if voters.contains(&id) {
                    if voters.len() == 1 {
                        return ForwardReply::Refused(CommandError::FailedPrecondition(format!(
                            "controller {id} is the last voter; a cluster cannot remove its last voter"
                        )));
                    }
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else if learners.contains(&id) {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                } else {
                    return ForwardReply::Refused(CommandError::NotFound(format!("controller {id} is not a member")));
                };
                match self.raft.change_membership(change, false).await {
                    Ok(_) => ForwardReply::MembershipChanged,
                    Err(e) => refusal_of_write(e),
                }
            }
            Forwarded::Heartbeat { node } => {
                let m = self.raft.metrics().borrow().clone();
                if m.current_leader != Some(self.id) {
                    let leader = m
                        .current_leader
                        .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| (l, n.addr.clone())));
                    return ForwardReply::NotLeader { leader };
                }
                let known = self.shared.read().cluster.node(&node).is_some();
                if known {
                    self.leader_memory(m.current_term).last_seen.insert(node, Instant::now());
                }
                ForwardReply::Heartbeat { known }
            }
        }
    }

    fn check_new_controller(&self, id: NodeId, addr: &str) -> Result<(), CommandError> {
        if id == 0 {
            return Err(CommandError::InvalidArgument("controller id 0 is reserved; use 1 or more".into()));
        }
        if !crate::model::names::is_host_port(addr) {
            return Err(CommandError::InvalidArgument(format!("controller address {addr:?} must be host:port")));
        }
        let (voters, _) = self.members();
        if voters.contains(&id) {
            return Err(CommandError::AlreadyExists(format!("controller {id} is already a voter")));
        }
        Ok(())
    }

    /// (voters, learners) of the membership this controller knows.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        let learners: BTreeSet<NodeId> = m.membership().learner_ids().collect();
        (voters, learners)
    }

    fn leader_memory(&self, term: u64) -> std::sync::MutexGuard<'_, LeaderMemory> {
        let mut mem = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
        if mem.since.map(|(t, _)| t) != Some(term) {
            *mem = LeaderMemory { since: Some((term, Instant::now())), last_seen: HashMap::new() };
        }
        mem
    }

    /// How long since the leader (this controller) last heard from `node`;
    /// None if this controller is not the leader.
    pub fn heartbeat_age(&self, node: &str) -> Option<Duration> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            return None;
        }
        let mem = self.leader_memory(m.current_term);
        mem.last_seen.get(node).map(|t| t.elapsed())
    }

    /// Counts a node's silence from now, as a heartbeat would: for a node an
    /// operator brought back from Fenced, whose agent could not heartbeat
    /// while it was fenced, so it is not marked Unreachable (and fenced
    /// again) before it has had a full lease to come back.
    pub fn restart_silence(&self, node: &str, term: u64) {
        self.leader_memory(term).last_seen.insert(node.to_string(), Instant::now());
    }

    /// Time a node has been silent, counting from when this controller became
    /// leader if it has not heard from the node since.
    pub fn silence(&self, node: &str, term: u64) -> Duration {
        let mem = self.leader_memory(term);
        match mem.last_seen.get(node) {
            Some(t) => t.elapsed(),
            None => mem.since.map(|(_, t)| t.elapsed()).unwrap_or_default(),
        }
    }

    /// Run `op` on the leader, wherever it is, waiting for one to be elected
    /// if need be (up to `leader_wait`).
    pub async fn on_leader(&self, op: Forwarded) -> Result<ForwardReply, NodeError> {
        let deadline = Instant::now() + self.timing.leader_wait;
        let mut target: Option<(NodeId, String)> = None;
        let mut last_problem = String::from("no leader elected yet");
        loop {
            let reply = match &target {
                None => self.execute_local(op.clone()).await,
                Some((id, addr)) => match self.forward(addr, &op).await {
                    Ok(r) => r,
                    Err(status) => {
                        last_problem = format!("leader {id} at {addr}: {}", status.message());
                        ForwardReply::NotLeader { leader: None }
                    }
                },
            };
            match reply {
                ForwardReply::NotLeader { leader: Some(l) } if l.0 != self.id => target = Some(l),
                ForwardReply::NotLeader { .. } | ForwardReply::Unavailable(_) => {
                    if let ForwardReply::Unavailable(m) = &reply {
                        last_problem = m.clone();
                    }
                    if Instant::now() >= deadline {
                        return Err(NodeError::Unavailable(format!(
                            "no leader answered within {:?} ({last_problem}); retry later",
                            self.timing.leader_wait
                        )));
                    }
                    target = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ForwardReply::Refused(e) => return Err(NodeError::Command(e)),
                other => return Ok(other),
            }
        }
    }

    async fn forward(&self, addr: &str, op: &Forwarded) -> Result<ForwardReply, Status> {
        let mut client = self.channels.client(addr).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(encode(op)?);
        req.set_timeout(self.timing.leader_wait);
        let reply = client.forward(req).await?;
        decode(reply.get_ref())
    }

    /// Commit a command through the leader and return what the state machine answered.
    pub async fn write(&self, cmd: Command) -> Result<Response, NodeError> {
        let req = Request { cmd, now_ms: now_ms(), id: Some(self.request_id()) };
        match self.on_leader(Forwarded::Write(Box::new(req))).await? {
            ForwardReply::Written(reply) => reply.map_err(NodeError::Command),
            other => Err(NodeError::Internal(format!("unexpected answer to a write: {other:?}"))),
        }
    }

    /// Wait until this controller has applied everything committed before the
    /// call (read-index through the leader); a stale read returns at once.
    pub async fn read_barrier(&self, allow_stale: bool) -> Result<(), NodeError> {
        if allow_stale {
            return Ok(());
        }
        let index = match self.on_leader(Forwarded::ReadIndex).await? {
            ForwardReply::ReadIndex(i) => i,
            other => return Err(NodeError::Internal(format!("unexpected answer to read-index: {other:?}"))),
        };
        let Some(index) = index else { return Ok(()) };
        self.raft
            .wait(Some(self.timing.leader_wait))
            .applied_index_at_least(Some(index), "read-index")
            .await
            .map(|_| ())
            .map_err(|e| NodeError::Unavailable(format!("this controller did not catch up to index {index}: {e}")))
    }

    pub async fn membership(&self, op: Forwarded) -> Result<(), NodeError> {
        match self.on_leader(op).await? {
            ForwardReply::MembershipChanged => Ok(()),
            other => Err(NodeError::Internal(format!("unexpected answer to a membership change: {other:?}"))),
        }
    }
}

/// The rhythm of the leader's control loops (VM placement, storage): wakes
/// at every applied change and every reconcile tick, and says whether this
/// controller leads and in which term. `None` once the controller stops.
pub struct LeaderTicks {
    ctl: Arc<Controller>,
    tick: tokio::time::Interval,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl LeaderTicks {
    pub fn new(ctl: Arc<Controller>) -> Self {
        let mut tick = tokio::time::interval(ctl.timing.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changes = ctl.shared.subscribe();
        LeaderTicks { ctl, tick, changes }
    }

    /// Waits for the next wake-up: `(leads, term)`.
    pub async fn next(&mut self) -> Option<(bool, u64)> {
        tokio::select! {
            _ = self.tick.tick() => {}
            c = self.changes.changed() => if c.is_err() { return None },
        }
        let m = self.ctl.raft.metrics().borrow().clone();
        Some((m.current_leader == Some(self.ctl.id), m.current_term))
    }
}
