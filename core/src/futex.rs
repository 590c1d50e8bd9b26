//! The futex waits of one node's processes: who sleeps on which word, until when.
//!
//! A distributed futex across nodes (see docs/protocol.md, "Futexes"): a wait sleeps
//! at the waiter's own node, and only while that node holds a valid copy of the page.
//! Any write on another node first takes that copy away, and losing it wakes every
//! waiter of the page; a wake on this node wakes waiters of the word here. So the
//! table is plain local bookkeeping: the host decides when to insert and to wake.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{PageId, SpaceId};

/// The driver's name for one application connection (same as `host::ConnId`).
pub type ConnId = u64;

/// One sleeping `FutexWait`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Waiter {
    pub conn: ConnId,
    pub request_id: u64,
    pub page: PageId,
    /// Offset of the word in its page.
    pub offset_bytes: u32,
    /// Tick at which it times out, if it has a limit.
    pub deadline_tick: Option<u64>,
}

/// Key of a wait: its page first (waking a page is a range), then arrival order (a
/// wake takes the oldest waiters first, as the kernel does).
type Key = (PageId, u64);

#[derive(Default)]
pub struct FutexTable {
    waits: BTreeMap<Key, Waiter>,
    /// One wait per connection: a thread sleeps in one futex at a time.
    by_conn: BTreeMap<ConnId, Key>,
    deadlines: BTreeSet<(u64, Key)>,
    next_seq: u64,
}

impl FutexTable {
    pub fn len(&self) -> usize {
        self.waits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }

    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.by_conn.contains_key(&conn)
    }

    /// Adds a wait; the connection must have none.
    pub fn insert(&mut self, waiter: Waiter) {
        assert!(
            !self.by_conn.contains_key(&waiter.conn),
            "connection {} already waits",
            waiter.conn
        );
        let key = (waiter.page, self.next_seq);
        self.next_seq += 1;
        self.by_conn.insert(waiter.conn, key);
        if let Some(deadline) = waiter.deadline_tick {
            self.deadlines.insert((deadline, key));
        }
        self.waits.insert(key, waiter);
        debug_assert_eq!(self.waits.len(), self.by_conn.len());
    }

    fn remove_key(&mut self, key: Key) -> Option<Waiter> {
        let waiter = self.waits.remove(&key)?;
        self.by_conn.remove(&waiter.conn);
        if let Some(deadline) = waiter.deadline_tick {
            self.deadlines.remove(&(deadline, key));
        }
        debug_assert_eq!(self.waits.len(), self.by_conn.len());
        Some(waiter)
    }

    /// Removes the wait of `conn` (its connection closed).
    pub fn remove_conn(&mut self, conn: ConnId) -> Option<Waiter> {
        let key = *self.by_conn.get(&conn)?;
        self.remove_key(key)
    }

    fn keys_of_pages(&self, first: PageId, pages: u64) -> Vec<Key> {
        let end = PageId {
            space: first.space,
            index: first.index.saturating_add(pages),
        };
        self.waits
            .range((first, 0)..(end, 0))
            .map(|(&key, _)| key)
            .collect()
    }

    /// Up to `count` of the oldest waiters on the word at `offset_bytes` of `page`.
    pub fn wake_word(&mut self, page: PageId, offset_bytes: u32, count: u32) -> Vec<Waiter> {
        let keys: Vec<Key> = self
            .waits
            .range((page, 0)..=(page, u64::MAX))
            .filter(|(_, w)| w.offset_bytes == offset_bytes)
            .take(count as usize)
            .map(|(&key, _)| key)
            .collect();
        keys.into_iter()
            .filter_map(|key| self.remove_key(key))
            .collect()
    }

    /// Every waiter on `pages` pages from `first` (the node lost its copies of them).
    pub fn wake_pages(&mut self, first: PageId, pages: u64) -> Vec<Waiter> {
        let keys = self.keys_of_pages(first, pages);
        keys.into_iter()
            .filter_map(|key| self.remove_key(key))
            .collect()
    }

    /// Every waiter in `space` (it was destroyed).
    pub fn wake_space(&mut self, space: SpaceId) -> Vec<Waiter> {
        self.wake_pages(PageId { space, index: 0 }, u64::MAX)
    }

    /// The waiters whose deadline is at or before `now_ticks`.
    pub fn expire(&mut self, now_ticks: u64) -> Vec<Waiter> {
        let due: Vec<Key> = self
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ticks)
            .map(|&(_, key)| key)
            .collect();
        due.into_iter()
            .filter_map(|key| self.remove_key(key))
            .collect()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(conn: ConnId, index: u64, offset_bytes: u32, deadline: Option<u64>) -> Waiter {
        Waiter {
            conn,
            request_id: conn * 10,
            page: PageId { space: 1, index },
            offset_bytes,
            deadline_tick: deadline,
        }
    }

    #[test]
    fn wakes_the_oldest_waiters_of_a_word_only() {
        let mut table = FutexTable::default();
        table.insert(waiter(1, 5, 8, None));
        table.insert(waiter(2, 5, 12, None));
        table.insert(waiter(3, 5, 8, Some(100)));
        table.insert(waiter(4, 5, 8, None));
        let woken: Vec<ConnId> = table
            .wake_word(PageId { space: 1, index: 5 }, 8, 2)
            .iter()
            .map(|w| w.conn)
            .collect();
        assert_eq!(woken, vec![1, 3]);
        assert_eq!(table.len(), 2);
        assert_eq!(table.next_deadline(), None);
        assert!(table.is_waiting(2) && table.is_waiting(4));
    }

    #[test]
    fn losing_pages_wakes_their_waiters_and_no_others() {
        let mut table = FutexTable::default();
        for (conn, index) in [(1, 3), (2, 4), (3, 5), (4, 6)] {
            table.insert(waiter(conn, index, 0, Some(50 + conn)));
        }
        let woken: Vec<ConnId> = table
            .wake_pages(PageId { space: 1, index: 4 }, 2)
            .iter()
            .map(|w| w.conn)
            .collect();
        assert_eq!(woken, vec![2, 3]);
        assert_eq!(table.expire(51).len(), 1);
        assert_eq!(table.next_deadline(), Some(54));
        assert_eq!(table.remove_conn(4).map(|w| w.conn), Some(4));
        assert!(table.is_empty());
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn a_destroyed_space_wakes_only_its_own_waiters() {
        let mut table = FutexTable::default();
        table.insert(waiter(1, 0, 0, None));
        let mut other = waiter(2, 0, 0, None);
        other.page.space = 2;
        table.insert(other);
        assert_eq!(table.wake_space(1).len(), 1);
        assert!(table.is_waiting(2));
    }
}
