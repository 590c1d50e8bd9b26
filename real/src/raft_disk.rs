//! The daemon's Raft state on disk, in raft-engine (the log store TiKV uses for
//! raft-rs): the core's `RaftWrite`s are applied here, each as one atomic batch,
//! synced when the core says Raft needs it, and a restart reads `PersistedRaft` back.
//!
//! Two raft-engine groups: one holds the log entries, the other the hard state, the
//! latest metadata snapshot, the node id the directory belongs to and the node's life
//! (incarnation). Entries and the rest are apart so that dropping the whole log (a
//! snapshot from the leader replaces it) leaves the rest alone.

use std::path::Path;

use gallocy_core::eraftpb::{ConfState, Entry, HardState, Snapshot};
use gallocy_core::{NodeId, PersistedRaft, RaftWrite};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize};

/// The group of the log entries.
const LOG_GROUP: u64 = 1;
/// The group of the hard state, snapshot, node id and incarnation.
const STATE_GROUP: u64 = 2;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_INCARNATION: &[u8] = b"incarnation";
/// Log files are rotated at this size, and purged once this much is behind them: the
/// core keeps at most a few thousand entries, so the directory stays small.
const TARGET_FILE_BYTES: u64 = 8 << 20;
const PURGE_THRESHOLD_BYTES: u64 = 64 << 20;
/// Entries read back at a restart at most (the core keeps 4096 by default past its
/// latest snapshot, and compacts to half of that).
const MAX_RESTORED_ENTRIES: u64 = 1 << 20;

struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

pub struct RaftDisk {
    engine: Engine,
    /// Writes since the last purge of files the compacted log no longer needs.
    compactions_since_purge: u64,
    pub syncs: u64,
    pub writes: u64,
}

/// What a daemon finds in its data directory at start.
pub struct Opened {
    pub disk: RaftDisk,
    /// The life this start is: 1 on an empty directory, one more than the last start's
    /// otherwise (already written, synced, before anything else happens).
    pub incarnation: u64,
    /// The Raft state of the earlier life (None at a first start).
    pub persisted: Option<PersistedRaft>,
}

fn engine_error(what: &str, error: raft_engine::Error) -> String {
    format!("raft log store: {what}: {error}")
}

impl RaftDisk {
    /// Opens (creating) the store in `dir` for node `node`, and starts the next life.
    pub fn open(dir: &Path, node: NodeId) -> Result<Opened, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("create the data directory {}: {e}", dir.display()))?;
        let config = Config {
            dir: dir
                .to_str()
                .ok_or_else(|| format!("data directory {} is not UTF-8", dir.display()))?
                .to_string(),
            target_file_size: ReadableSize(TARGET_FILE_BYTES),
            purge_threshold: ReadableSize(PURGE_THRESHOLD_BYTES),
            recovery_threads: 1,
            ..Config::default()
        };
        let engine = Engine::open(config).map_err(|e| engine_error("open", e))?;
        let disk = RaftDisk {
            engine,
            compactions_since_purge: 0,
            syncs: 0,
            writes: 0,
        };
        let stored_node = disk.get_u64(KEY_NODE_ID);
        if let Some(stored) = stored_node {
            if stored != node {
                return Err(format!(
                    "the data directory {} belongs to node {stored}, not node {node}",
                    dir.display()
                ));
            }
        }
        let previous = disk.get_u64(KEY_INCARNATION);
        let persisted = match previous {
            None => None,
            Some(_) => Some(disk.read()?),
        };
        // A start that wrote its life but no Raft state (it failed before its first
        // write: a port in use, say) sent nothing of that life: start it again.
        let (incarnation, persisted) = match (previous, persisted) {
            (None, _) => (gallocy_core::meta::FIRST_INCARNATION, None),
            (Some(life), Some(persisted)) if persisted.is_empty() => (life, None),
            (Some(life), persisted) => (
                life.checked_add(1)
                    .filter(|&next| next <= gallocy_core::node::MAX_INCARNATION)
                    .ok_or_else(|| {
                        format!("node {node} has restarted {life} times: no incarnation is left")
                    })?,
                persisted,
            ),
        };
        // The new life is on the disk before any message of it leaves: a crash during
        // this start must not reuse it.
        let mut batch = LogBatch::default();
        batch
            .put(
                STATE_GROUP,
                KEY_NODE_ID.to_vec(),
                node.to_le_bytes().to_vec(),
            )
            .map_err(|e| engine_error("write node id", e))?;
        batch
            .put(
                STATE_GROUP,
                KEY_INCARNATION.to_vec(),
                incarnation.to_le_bytes().to_vec(),
            )
            .map_err(|e| engine_error("write incarnation", e))?;
        disk.engine
            .write(&mut batch, true)
            .map_err(|e| engine_error("write incarnation", e))?;
        Ok(Opened {
            disk,
            incarnation,
            persisted,
        })
    }

    fn get_u64(&self, key: &[u8]) -> Option<u64> {
        let bytes = self.engine.get(STATE_GROUP, key)?;
        Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    /// What the earlier lives left: the hard state, the latest snapshot, the entries.
    fn read(&self) -> Result<PersistedRaft, String> {
        let hard_state = self
            .engine
            .get_message::<HardState>(STATE_GROUP, KEY_HARD_STATE)
            .map_err(|e| engine_error("read hard state", e))?
            .unwrap_or_default();
        let snapshot = self
            .engine
            .get_message::<Snapshot>(STATE_GROUP, KEY_SNAPSHOT)
            .map_err(|e| engine_error("read snapshot", e))?
            .unwrap_or_default();
        let conf_state = self
            .engine
            .get_message::<ConfState>(STATE_GROUP, KEY_CONF_STATE)
            .map_err(|e| engine_error("read membership", e))?
            .unwrap_or_default();
        let mut entries = Vec::new();
        if let (Some(first), Some(last)) = (
            self.engine.first_index(LOG_GROUP),
            self.engine.last_index(LOG_GROUP),
        ) {
            if last - first >= MAX_RESTORED_ENTRIES {
                return Err(format!(
                    "raft log store: {} entries, more than the {MAX_RESTORED_ENTRIES} a node keeps",
                    last - first + 1
                ));
            }
            self.engine
                .fetch_entries_to::<EntryExt>(LOG_GROUP, first, last + 1, None, &mut entries)
                .map_err(|e| engine_error("read entries", e))?;
        }
        Ok(PersistedRaft {
            hard_state,
            snapshot,
            entries,
            conf_state,
        })
    }

    /// Applies one `RaftWrite` as one atomic batch, synced if the core asks.
    pub fn write(&mut self, write: &RaftWrite) -> Result<(), String> {
        let mut batch = LogBatch::default();
        if let Some(snapshot) = &write.snapshot {
            batch
                .put_message(STATE_GROUP, KEY_SNAPSHOT.to_vec(), snapshot)
                .map_err(|e| engine_error("write snapshot", e))?;
        }
        // The engine panics on a log with a hole or on entries written below its
        // compacted start: checked here, an error instead.
        let mut first_kept = self.engine.first_index(LOG_GROUP);
        let mut last = self.engine.last_index(LOG_GROUP);
        if write.clear_log {
            batch.add_command(LOG_GROUP, Command::Clean);
            (first_kept, last) = (None, None);
        }
        if let Some(index) = write.first_kept_index {
            if last.is_some_and(|last| index > last + 1) {
                return Err(format!(
                    "raft log store: compaction to {index} past the log's end {}",
                    last.unwrap_or(0)
                ));
            }
            if first_kept.is_some_and(|first| index > first) {
                batch.add_command(LOG_GROUP, Command::Compact { index });
                self.compactions_since_purge += 1;
                first_kept = Some(index);
                if last.is_some_and(|last| index > last) {
                    (first_kept, last) = (None, None);
                }
            }
        }
        if let Some(first_new) = write.entries.first().map(|e| e.index) {
            for (offset, entry) in write.entries.iter().enumerate() {
                if entry.index != first_new + offset as u64 {
                    return Err("raft log store: entries to write are not consecutive".into());
                }
            }
            if let (Some(first), Some(last)) = (first_kept, last) {
                if first_new < first || first_new > last + 1 {
                    return Err(format!(
                        "raft log store: entries from {first_new} do not follow the log {first}..={last}"
                    ));
                }
            }
            batch
                .add_entries::<EntryExt>(LOG_GROUP, &write.entries)
                .map_err(|e| engine_error("write entries", e))?;
        }
        if let Some(hard_state) = &write.hard_state {
            batch
                .put_message(STATE_GROUP, KEY_HARD_STATE.to_vec(), hard_state)
                .map_err(|e| engine_error("write hard state", e))?;
        }
        if let Some(conf_state) = &write.conf_state {
            batch
                .put_message(STATE_GROUP, KEY_CONF_STATE.to_vec(), conf_state)
                .map_err(|e| engine_error("write membership", e))?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.engine
            .write(&mut batch, write.must_sync)
            .map_err(|e| engine_error("write", e))?;
        self.writes += 1;
        if write.must_sync {
            self.syncs += 1;
        }
        if self.compactions_since_purge >= 8 {
            self.compactions_since_purge = 0;
            self.engine
                .purge_expired_files()
                .map_err(|e| engine_error("purge", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        indexes
            .map(|index| Entry {
                index,
                term,
                data: vec![index as u8; 3].into(),
                ..Default::default()
            })
            .collect()
    }

    fn hard_state(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote: 2,
            commit,
            ..Default::default()
        }
    }

    /// The same writes applied to raft-engine and to the core's model of a disk
    /// (`PersistedRaft::apply`) read back the same, across a reopen.
    #[test]
    fn writes_read_back_as_the_core_model_says_across_restarts() {
        let dir = std::env::temp_dir().join(format!("gallocy-raft-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 12;
        snapshot.mut_metadata().term = 3;
        snapshot.data = vec![7; 100].into();
        let writes = vec![
            RaftWrite {
                conf_state: Some(ConfState {
                    voters: vec![1, 2, 3],
                    ..Default::default()
                }),
                must_sync: true,
                ..Default::default()
            },
            RaftWrite {
                entries: entries(1..=10, 1),
                hard_state: Some(hard_state(1, 0)),
                must_sync: true,
                ..Default::default()
            },
            // A new leader overwrites the tail.
            RaftWrite {
                entries: entries(8..=12, 2),
                hard_state: Some(hard_state(2, 7)),
                must_sync: true,
                ..Default::default()
            },
            // Compaction behind a snapshot of our own, with a membership change.
            RaftWrite {
                snapshot: Some(snapshot.clone()),
                first_kept_index: Some(6),
                conf_state: Some(ConfState {
                    voters: vec![1, 2, 3, 4],
                    ..Default::default()
                }),
                must_sync: true,
                ..Default::default()
            },
            RaftWrite {
                hard_state: Some(hard_state(2, 12)),
                ..Default::default()
            },
        ];
        let mut model = PersistedRaft::default();
        {
            let opened = RaftDisk::open(&dir, 3).expect("opens");
            assert_eq!(opened.incarnation, 1);
            assert!(opened.persisted.is_none());
            let mut disk = opened.disk;
            for write in &writes {
                disk.write(write).expect("writes");
                model.apply(write);
            }
        }
        {
            let opened = RaftDisk::open(&dir, 3).expect("reopens");
            assert_eq!(opened.incarnation, 2);
            assert_eq!(opened.persisted.as_ref(), Some(&model));
            // A snapshot from the leader replaces the whole log.
            let mut disk = opened.disk;
            let mut leader_snapshot = snapshot.clone();
            leader_snapshot.mut_metadata().index = 40;
            let write = RaftWrite {
                snapshot: Some(leader_snapshot),
                clear_log: true,
                hard_state: Some(hard_state(4, 40)),
                must_sync: true,
                ..Default::default()
            };
            disk.write(&write).expect("writes");
            model.apply(&write);
            let write = RaftWrite {
                entries: entries(41..=42, 4),
                must_sync: true,
                ..Default::default()
            };
            disk.write(&write).expect("writes");
            model.apply(&write);
            // A hole is an error, not a panic.
            let hole = RaftWrite {
                entries: entries(50..=51, 4),
                ..Default::default()
            };
            assert!(disk.write(&hole).is_err());
        }
        let opened = RaftDisk::open(&dir, 3).expect("reopens");
        assert_eq!(opened.incarnation, 3);
        assert_eq!(opened.persisted.as_ref(), Some(&model));
        drop(opened);
        let other = RaftDisk::open(&dir, 4);
        assert!(other.is_err_and(|e| e.contains("belongs to node 3")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
