//! The Raft log's storage: raft-rs's in-memory log, plus the latest metadata snapshot,
//! which raft-rs sends to a member that fell behind the compacted log. The node keeps
//! it in memory and tells the driver every change (`RaftWrite`) to make durable; a
//! restart starts from what the driver read back (`PersistedRaft`).

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// One change to the durable Raft state, applied atomically in this order: `snapshot`
/// (with `clear_log`, the log is replaced by it), then the entries before
/// `first_kept_index` dropped, then `entries` written (replacing any persisted entry
/// at or past the first one's index), then `hard_state`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RaftWrite {
    pub snapshot: Option<Snapshot>,
    /// The snapshot came from the leader: every entry persisted before goes.
    pub clear_log: bool,
    pub first_kept_index: Option<u64>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// Raft's membership after an applied change (and the first configuration).
    pub conf_state: Option<ConfState>,
    /// Raft needs this on the disk before the node's next message leaves (votes,
    /// terms, appended entries); a commit index alone may be lost in a crash.
    pub must_sync: bool,
}

/// What a node's disk holds of its Raft state: what `RaftWrite`s applied in order
/// leave (`apply`). A driver with its own storage engine rebuilds the same from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PersistedRaft {
    pub hard_state: HardState,
    /// Empty (index 0) until the first compaction or installed snapshot.
    pub snapshot: Snapshot,
    /// Consecutive entries, oldest first.
    pub entries: Vec<Entry>,
    /// The latest membership written (empty for a node that joined and never learnt
    /// one).
    pub conf_state: ConfState,
}

impl PersistedRaft {
    pub fn apply(&mut self, write: &RaftWrite) {
        if let Some(snapshot) = &write.snapshot {
            self.snapshot = snapshot.clone();
        }
        if write.clear_log {
            self.entries.clear();
        }
        if let Some(first_kept) = write.first_kept_index {
            self.entries.retain(|e| e.index >= first_kept);
        }
        if let Some(first) = write.entries.first() {
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend(write.entries.iter().cloned());
        }
        if let Some(hard_state) = &write.hard_state {
            self.hard_state = hard_state.clone();
        }
        if let Some(conf_state) = &write.conf_state {
            self.conf_state = conf_state.clone();
        }
    }

    /// Whether anything was ever persisted (a first start has nothing).
    pub fn is_empty(&self) -> bool {
        self.hard_state == HardState::default()
            && self.snapshot.get_metadata().index == 0
            && self.entries.is_empty()
            && self.conf_state == ConfState::default()
    }
}

pub(super) struct RaftStore {
    pub(super) entries: MemStorage,
    /// The latest snapshot (empty until the first compaction): its index is at or
    /// past the compacted entries, so it can stand in for all of them.
    pub(super) snapshot: Snapshot,
    /// (index, term) of the last compacted entry: raft-rs matches against it.
    pub(super) compacted: (u64, u64),
}

impl RaftStore {
    pub(super) fn new(entries: MemStorage) -> RaftStore {
        RaftStore {
            entries,
            snapshot: Snapshot::default(),
            compacted: (0, 0),
        }
    }

    /// The store a restart begins with: the persisted snapshot, the entries after it,
    /// the hard state. An inconsistent disk (a gap in the entries, a commit past the
    /// log) is an error, never a panic.
    pub(super) fn restore(persisted: &PersistedRaft) -> Result<RaftStore, String> {
        let mut store = RaftStore::new(MemStorage::new());
        let snapshot_index = persisted.snapshot.get_metadata().index;
        if snapshot_index > 0 {
            store
                .entries
                .wl()
                .apply_snapshot(persisted.snapshot.clone())
                .map_err(|e| format!("persisted snapshot: {e}"))?;
            store.compacted = (snapshot_index, persisted.snapshot.get_metadata().term);
            store.snapshot = persisted.snapshot.clone();
        }
        // Entries the snapshot covers stay behind it (compaction keeps some for members
        // slightly behind); the in-memory log starts after it.
        let after: Vec<Entry> = persisted
            .entries
            .iter()
            .filter(|e| e.index > snapshot_index)
            .cloned()
            .collect();
        for (offset, entry) in after.iter().enumerate() {
            if entry.index != snapshot_index + 1 + offset as u64 {
                return Err(format!(
                    "persisted Raft log has a gap: entry {} where {} was expected",
                    entry.index,
                    snapshot_index + 1 + offset as u64
                ));
            }
        }
        if !after.is_empty() {
            store
                .entries
                .wl()
                .append(&after)
                .map_err(|e| format!("persisted entries: {e}"))?;
        }
        let last_index = snapshot_index + after.len() as u64;
        if persisted.hard_state.commit > last_index {
            return Err(format!(
                "persisted commit index {} is past the log's last entry {last_index}",
                persisted.hard_state.commit
            ));
        }
        let mut hard_state = persisted.hard_state.clone();
        hard_state.commit = hard_state.commit.max(snapshot_index);
        store.entries.wl().set_hardstate(hard_state);
        // The membership last written; a snapshot's is older or the same (they are
        // written together when membership changes).
        if !persisted.conf_state.voters.is_empty() {
            store
                .entries
                .wl()
                .set_conf_state(persisted.conf_state.clone());
        }
        Ok(store)
    }

    /// Drops the entries before `first_kept`, which must be at most one past the
    /// snapshot's index (so the snapshot covers every dropped entry).
    pub(super) fn compact(&mut self, first_kept: u64) -> raft::Result<()> {
        assert!(first_kept <= self.snapshot.get_metadata().index + 1);
        if first_kept <= self.entries.first_index()? {
            return Ok(());
        }
        let term = self.term(first_kept - 1)?;
        self.entries.wl().compact(first_kept)?;
        self.compacted = (first_kept - 1, term);
        Ok(())
    }
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.entries.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.entries.entries(low, high, max_size, context)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.compacted.0 && index > 0 {
            return Ok(self.compacted.1);
        }
        self.entries.term(index)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.entries.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.entries.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index == 0
            || self.snapshot.get_metadata().index < request_index
        {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}
