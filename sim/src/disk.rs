//! A node's simulated disk: where its Raft log and hard state go (`RaftWrite`s), and
//! what a crash leaves of them.
//!
//! A synced write is durable once the next action runs, but a crash may still tear
//! it, as long as nothing that depended on it left the node (no frame queued after it
//! was sent: then the crash came in the middle of writing it). Writes not synced
//! (commit indexes, compaction snapshots) sit in the page cache until the next synced
//! write: a crash keeps any prefix of them. Torn or lost writes are dropped whole, as
//! a checksummed record is.

use gallocy_core::{PersistedRaft, RaftWrite};
use rand::Rng;

/// Unsynced writes kept apart at most; past this the oldest reach the disk (the
/// kernel flushes dirty pages too).
const MAX_UNSYNCED_WRITES: usize = 64;

#[derive(Default)]
pub struct SimDisk {
    /// Everything up to (not including) `last_synced`.
    durable: PersistedRaft,
    last_synced: Option<RaftWrite>,
    /// `last_synced` may still be torn by a crash: no frame sent since.
    tearable: bool,
    unsynced: Vec<RaftWrite>,
    pub writes: u64,
    pub torn_writes: u64,
    pub lost_unsynced_writes: u64,
}

impl SimDisk {
    pub fn write(&mut self, write: RaftWrite) {
        self.writes += 1;
        if write.must_sync {
            // A sync also syncs every earlier write.
            self.settle();
            self.last_synced = Some(write);
            self.tearable = true;
            return;
        }
        if self.unsynced.len() >= MAX_UNSYNCED_WRITES {
            self.settle();
        }
        self.unsynced.push(write);
    }

    /// A frame left the node: the writes before it were complete.
    pub fn frames_sent(&mut self) {
        self.tearable = false;
    }

    /// Moves every write so far onto the disk.
    fn settle(&mut self) {
        if let Some(write) = self.last_synced.take() {
            self.durable.apply(&write);
        }
        for write in self.unsynced.drain(..) {
            self.durable.apply(&write);
        }
        self.tearable = false;
    }

    /// The node crashed: a write in progress may be torn, the page cache lost (any
    /// prefix of it kept). What is left is what a restart reads.
    pub fn crash(&mut self, rng: &mut impl Rng) {
        if self.last_synced.is_some() && self.tearable && rng.gen_bool(0.5) {
            // Torn: it and everything after it are gone.
            self.last_synced = None;
            self.torn_writes += 1;
            self.lost_unsynced_writes += self.unsynced.len() as u64;
            self.unsynced.clear();
        } else if !self.unsynced.is_empty() {
            let kept = rng.gen_range(0..=self.unsynced.len());
            self.lost_unsynced_writes += (self.unsynced.len() - kept) as u64;
            self.unsynced.truncate(kept);
        }
        self.settle();
    }

    /// What a restarted node reads (after `crash`).
    pub fn read(&self) -> &PersistedRaft {
        debug_assert!(self.last_synced.is_none() && self.unsynced.is_empty());
        &self.durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gallocy_core::eraftpb::{Entry, HardState};
    use rand::SeedableRng;

    fn entries(indexes: std::ops::Range<u64>) -> Vec<Entry> {
        indexes
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect()
    }

    fn hard_state(commit: u64) -> HardState {
        HardState {
            term: 1,
            vote: 1,
            commit,
            ..Default::default()
        }
    }

    #[test]
    fn a_sent_frame_makes_the_synced_write_survive_every_crash() {
        for seed in 0..64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut disk = SimDisk::default();
            disk.write(RaftWrite {
                entries: entries(1..4),
                hard_state: Some(hard_state(0)),
                must_sync: true,
                ..Default::default()
            });
            disk.frames_sent();
            disk.write(RaftWrite {
                hard_state: Some(hard_state(3)),
                ..Default::default()
            });
            disk.crash(&mut rng);
            let persisted = disk.read();
            assert_eq!(persisted.entries.len(), 3, "seed {seed}");
            assert!(persisted.hard_state.commit == 0 || persisted.hard_state.commit == 3);
        }
    }

    #[test]
    fn an_unsent_synced_write_can_be_torn_whole() {
        let mut torn = 0;
        for seed in 0..64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut disk = SimDisk::default();
            disk.write(RaftWrite {
                entries: entries(1..3),
                must_sync: true,
                ..Default::default()
            });
            disk.write(RaftWrite {
                entries: entries(2..5),
                hard_state: Some(hard_state(1)),
                must_sync: true,
                ..Default::default()
            });
            disk.crash(&mut rng);
            let persisted = disk.read();
            match persisted.entries.len() {
                // The second write (overwriting entry 2 on) is gone whole.
                2 => {
                    torn += 1;
                    assert_eq!(persisted.hard_state, HardState::default());
                }
                4 => assert_eq!(persisted.hard_state.commit, 1),
                n => panic!("seed {seed}: {n} entries"),
            }
        }
        assert!(torn > 0 && torn < 64, "torn {torn} of 64");
    }
}
