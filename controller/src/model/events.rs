//! The event log: what changed and why, newest last. It is part of the
//! replicated state, so it is bounded (old events fall off the front) and its
//! times come from the command, never from the local clock.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub const DEFAULT_EVENT_CAPACITY: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventKind {
    NodeRegistered,
    NodeUpdated,
    NodeStateChanged,
    NodeRemoved,
    ProfileCreated,
    ProfileDeleted,
    VolumeCreated,
    VolumeResized,
    VolumeDeleted,
    VmCreated,
    VmSpecUpdated,
    VmPowerChanged,
    VmDeleted,
    VmAssigned,
    VmUnassigned,
    VmStatusChanged,
    /// The scheduler found no node; recorded by the reconciler.
    VmUnschedulable,
    /// The storage reconciler found a profile's or volume's state in Ceph
    /// changed (Pending / Ready / Failed).
    ProfileStateChanged,
    VolumeStateChanged,
    /// A deleted volume's image is gone from Ceph.
    ImageRemoved,
    /// Removing it failed (it is retried).
    ImageRemovalFailed,
    /// A live migration started, changed phase or ended.
    MigrationStarted,
    MigrationProgressed,
    MigrationCompleted,
    MigrationFailed,
    MigrationCancelled,
    NetworkCreated,
    NetworkDeleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Revision of the command that made the change; one command may record several events.
    pub revision: u64,
    pub time_ms: u64,
    pub kind: EventKind,
    /// `node/<id>`, `vm/<name>`, `volume/<name>` or `profile/<name>`.
    pub subject: String,
    pub message: String,
}

/// Filters for [`EventLog::query`]; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    pub subject: Option<String>,
    pub kind: Option<EventKind>,
    /// Only events with a revision strictly greater than this (resume after the last one seen).
    pub since_revision: Option<u64>,
    /// At most this many, the oldest matching first.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    capacity: usize,
    events: VecDeque<Event>,
    /// How many fell off the front, so a reader can tell it missed some.
    dropped: u64,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::with_capacity(DEFAULT_EVENT_CAPACITY)
    }
}

impl EventLog {
    /// A capacity of 0 is treated as 1: a log that keeps nothing would hide every change.
    pub fn with_capacity(capacity: usize) -> Self {
        EventLog { capacity: capacity.max(1), events: VecDeque::new(), dropped: 0 }
    }

    pub fn push(&mut self, event: Event) {
        while self.events.len() >= self.capacity {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Revision of the oldest event still kept; a watcher resuming from before
    /// it has missed events and must re-list.
    pub fn oldest_revision(&self) -> Option<u64> {
        self.events.front().map(|e| e.revision)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Event> {
        self.events.iter()
    }

    pub fn query(&self, q: &EventQuery) -> Vec<&Event> {
        // Revisions only grow, so skip the prefix by binary search rather than scanning it.
        let start = match q.since_revision {
            Some(since) => self.events.partition_point(|e| e.revision <= since),
            None => 0,
        };
        self.events
            .range(start..)
            .filter(|e| q.subject.as_deref().is_none_or(|s| e.subject == s))
            .filter(|e| q.kind.is_none_or(|k| e.kind == k))
            .take(q.limit.unwrap_or(usize::MAX))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: u64, kind: EventKind, subject: &str) -> Event {
        Event { revision, time_ms: revision * 10, kind, subject: subject.into(), message: format!("r{revision}") }
    }

    #[test]
    fn bounded_and_queryable() {
        let mut log = EventLog::with_capacity(3);
        log.push(ev(1, EventKind::VmCreated, "vm/a"));
        log.push(ev(2, EventKind::VmCreated, "vm/b"));
        log.push(ev(3, EventKind::VmAssigned, "vm/a"));
        log.push(ev(3, EventKind::VolumeDeleted, "volume/d"));
        assert_eq!(log.len(), 3);
        assert_eq!(log.dropped(), 1);
        assert_eq!(log.oldest_revision(), Some(2));
        let q = |q: EventQuery| log.query(&q).iter().map(|e| (e.revision, e.subject.clone())).collect::<Vec<_>>();
        assert_eq!(q(EventQuery { subject: Some("vm/a".into()), ..Default::default() }), vec![(3, "vm/a".into())]);
        assert_eq!(q(EventQuery { kind: Some(EventKind::VmCreated), ..Default::default() }), vec![(2, "vm/b".into())]);
        assert_eq!(
            q(EventQuery { since_revision: Some(2), ..Default::default() }),
            vec![(3, "vm/a".into()), (3, "volume/d".into())]
        );
        assert_eq!(q(EventQuery { limit: Some(1), ..Default::default() }), vec![(2, "vm/b".into())]);
        assert!(q(EventQuery { since_revision: Some(3), ..Default::default() }).is_empty());
        assert_eq!(EventLog::with_capacity(0).capacity(), 1);
    }
}
