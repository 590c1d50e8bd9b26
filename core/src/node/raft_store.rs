//! The Raft log's storage: raft-rs's in-memory log, plus the latest metadata snapshot,
//! which raft-rs sends to a member that fell behind the compacted log.

use raft::eraftpb::{Entry, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

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
