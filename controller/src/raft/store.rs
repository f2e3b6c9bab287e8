//! Storage of one controller, in one RocksDB under its data dir:
//!
//! - column family `log`: Raft entries keyed by big-endian index, JSON values;
//! - `meta`: the vote, the committed log id and the last purged log id;
//! - `snapshot`: the latest snapshot (meta + data).
//!
//! Log writes are synced (fsync) before openraft is told they are durable:
//! a vote or an entry acknowledged to a peer must survive a crash, or Raft's
//! safety argument does not hold.
//!
//! The cluster model itself lives in memory ([`Shared`]); after a restart it
//! is rebuilt from the latest snapshot plus the committed log entries after
//! it, which openraft re-applies at start-up because the committed log id is
//! saved (`save_committed`).

// openraft's traits fix the error type (`StorageError`, some 224 bytes); the
// helpers here return it as is rather than boxing it only to unbox it again.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageIOError, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Entry, LogId, Membership, NodeId, Reply, StorageError, TypeConfig};
use crate::state_machine::ClusterState;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SNAPSHOT: &str = "snapshot";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// Version of the snapshot data layout; a controller refuses a snapshot whose
/// format it does not know rather than guessing. Same numbering as
/// [`crate::state_machine::SNAPSHOT_FORMAT`]: 2 added storage statuses and
/// pending image removals, which a format 1 snapshot reads as empty.
pub use crate::state_machine::{OLDEST_SNAPSHOT_FORMAT, SNAPSHOT_FORMAT};

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    format: u32,
    cluster: ClusterState,
    #[serde(default)]
    recent: RecentRequests,
}

/// How many answered request ids the state machine remembers. A retry comes
/// within seconds; this covers thousands of writes per second of it.
pub const RECENT_REQUESTS: usize = 20_000;

/// Answers to the most recent requests by id, oldest evicted first. Part of
/// the replicated state (and of snapshots), so every controller dedups alike.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RecentRequests {
    order: VecDeque<String>,
    replies: BTreeMap<String, Reply>,
}

impl RecentRequests {
    fn get(&self, id: &str) -> Option<&Reply> {
        self.replies.get(id)
    }

    fn insert(&mut self, id: String, reply: Reply) {
        if self.replies.insert(id.clone(), reply).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > RECENT_REQUESTS {
            if let Some(old) = self.order.pop_front() {
                self.replies.remove(&old);
            }
        }
    }
}

/// Open (or create) the controller's RocksDB.
pub fn open(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = [CF_LOG, CF_META, CF_SNAPSHOT].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    DB::open_cf_descriptors(&opts, dir, cfs).map(Arc::new)
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name).ok_or_else(|| {
        StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, AnyError::error(format!("no column family {name}")))
            .into()
    })
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn key_index(k: &[u8]) -> Option<u64> {
    k.try_into().ok().map(u64::from_be_bytes)
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn get_json<T: serde::de::DeserializeOwned>(db: &DB, cf_name: &str, key: &[u8]) -> Result<Option<T>, StorageError> {
    match db.get_cf(cf(db, cf_name)?, key).map_err(read_err)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
    }
}

fn put_json<T: Serialize>(db: &DB, cf_name: &str, key: &[u8], value: &T) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    db.put_cf_opt(cf(db, cf_name)?, key, bytes, &synced()).map_err(write_err)
}

/// The Raft log, behind openraft's `RaftLogStorage`.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The commit index openraft last reported, for metrics (openraft's own
    /// metrics do not carry it).
    committed: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        LogStore { db, committed: Arc::new(AtomicU64::new(0)) }
    }

    pub fn commit_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG)?, IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let e: Entry = serde_json::from_slice(&v).map_err(read_err)?;
                Ok(Some(e.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let key = index_key(start);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_LOG)?, IteratorMode::From(&key, Direction::Forward)) {
            let (k, v) = item.map_err(read_err)?;
            let Some(i) = key_index(&k) else { continue };
            if !range.contains(&i) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = get_json(&self.db, CF_META, KEY_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        put_json(&self.db, CF_META, KEY_VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(AnyError::error(e.to_string())).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        get_json(&self.db, CF_META, KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: it only lets a restart re-apply committed entries before
        // hearing from a leader; losing the last value just means waiting for one.
        self.committed.store(committed.map(|c| c.index).unwrap_or(0), Ordering::Relaxed);
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.db.put_cf(cf(&self.db, CF_META)?, KEY_COMMITTED, bytes).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(get_json::<Option<LogId>>(&self.db, CF_META, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let log = cf(&self.db, CF_LOG)?;
        let mut batch = WriteBatch::default();
        for e in entries {
            batch.put_cf(log, index_key(e.log_id.index), serde_json::to_vec(&e).map_err(write_err)?);
        }
        let res = self.db.write_opt(batch, &synced());
        let io = res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io);
        res.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(&self.db, CF_LOG)?, index_key(log_id.index), index_key(u64::MAX));
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two writes leaves
        // entries that are merely unreachable, never a gap openraft would read.
        put_json(&self.db, CF_META, KEY_PURGED, &log_id)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(&self.db, CF_LOG)?, index_key(0), index_key(log_id.index.saturating_add(1)));
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }
}

/// What has been applied: the cluster model plus Raft's bookkeeping.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: Membership,
    pub cluster: ClusterState,
    pub recent: RecentRequests,
}

/// The applied state, shared between the state machine (the only writer)
/// and the API handlers, the reconciler and the watchers (readers).
pub struct Shared {
    state: RwLock<Applied>,
    /// The cluster revision after each apply, for watchers and the reconciler.
    revision: watch::Sender<u64>,
}

impl Shared {
    /// A poisoned lock means a panic while applying; the data is still the
    /// last consistent state (handlers change nothing before validating), so
    /// readers go on rather than cascade the panic.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

/// The state machine, behind openraft's `RaftStateMachine`.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    shared: Arc<Shared>,
}

impl StateMachineStore {
    /// Loads the latest snapshot, if any, as the starting state.
    pub fn new(db: Arc<DB>, event_capacity: usize) -> Result<Self, StorageError> {
        let mut applied = Applied { cluster: ClusterState::with_event_capacity(event_capacity), ..Default::default() };
        if let Some(meta) = get_json::<SnapshotMeta<NodeId, openraft::BasicNode>>(&db, CF_SNAPSHOT, KEY_SNAPSHOT_META)?
        {
            let bytes = db
                .get_cf(cf(&db, CF_SNAPSHOT)?, KEY_SNAPSHOT_DATA)
                .map_err(read_err)?
                .ok_or_else(|| read_err(std::io::Error::other("snapshot meta without data")))?;
            (applied.cluster, applied.recent) = decode_snapshot(&bytes)?;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership;
        }
        let (revision, _) = watch::channel(applied.cluster.revision());
        Ok(StateMachineStore { db, shared: Arc::new(Shared { state: RwLock::new(applied), revision }) })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn save_snapshot(&self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>, data: &[u8]) -> Result<(), StorageError> {
        let snap = cf(&self.db, CF_SNAPSHOT)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(snap, KEY_SNAPSHOT_DATA, data);
        batch.put_cf(snap, KEY_SNAPSHOT_META, serde_json::to_vec(meta).map_err(write_err)?);
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)).into())
    }
}

fn decode_snapshot(bytes: &[u8]) -> Result<(ClusterState, RecentRequests), StorageError> {
    let data: SnapshotData = serde_json::from_slice(bytes).map_err(read_err)?;
    if !(OLDEST_SNAPSHOT_FORMAT..=SNAPSHOT_FORMAT).contains(&data.format) {
        return Err(read_err(std::io::Error::other(format!(
            "snapshot format {} is not one this controller reads ({OLDEST_SNAPSHOT_FORMAT} to {SNAPSHOT_FORMAT})",
            data.format
        ))));
    }
    Ok((data.cluster, data.recent))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, bytes) = {
            let st = self.shared.read();
            let bytes = serde_json::to_vec(&SnapshotData {
                format: SNAPSHOT_FORMAT,
                cluster: st.cluster.clone(),
                recent: st.recent.clone(),
            })
            .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)))?;
            let id = match st.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, st.cluster.revision()),
                None => format!("empty-{}", st.cluster.revision()),
            };
            let meta =
                SnapshotMeta { last_log_id: st.last_applied, last_membership: st.membership.clone(), snapshot_id: id };
            (meta, bytes)
        };
        self.save_snapshot(&meta, &bytes)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let st = self.shared.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let revision = {
            let mut st = self.shared.write();
            for entry in entries {
                st.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {
                        replies.push(Err(crate::error::CommandError::FailedPrecondition("blank entry".into())))
                    }
                    EntryPayload::Normal(req) => {
                        if let Some(first) = req.id.as_deref().and_then(|id| st.recent.get(id)) {
                            replies.push(first.clone());
                            continue;
                        }
                        let reply = st.cluster.apply(req.cmd, req.now_ms);
                        if let Some(id) = req.id {
                            st.recent.insert(id, reply.clone());
                        }
                        replies.push(reply);
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = Membership::new(Some(entry.log_id), m);
                        replies.push(Err(crate::error::CommandError::FailedPrecondition("membership entry".into())));
                    }
                }
            }
            st.cluster.revision()
        };
        self.shared.revision.send_replace(revision);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let (cluster, recent) = decode_snapshot(&bytes)?;
        self.save_snapshot(meta, &bytes)?;
        let revision = {
            let mut st = self.shared.write();
            st.cluster = cluster;
            st.recent = recent;
            st.last_applied = meta.last_log_id;
            st.membership = meta.last_membership.clone();
            st.cluster.revision()
        };
        self.shared.revision.send_replace(revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta) =
            get_json::<SnapshotMeta<NodeId, openraft::BasicNode>>(&self.db, CF_SNAPSHOT, KEY_SNAPSHOT_META)?
        else {
            return Ok(None);
        };
        let Some(bytes) = self.db.get_cf(cf(&self.db, CF_SNAPSHOT)?, KEY_SNAPSHOT_DATA).map_err(read_err)? else {
            return Ok(None);
        };
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}
