//! The futex waits of one node's processes, and the wakes they exchange with peers.
//!
//! A distributed futex across nodes (see docs/protocol.md, "Futexes"): a wait sleeps
//! at the waiter's own node, after comparing the word in a valid copy of its page. A
//! wait stays asleep when the copy goes later: any write elsewhere needs that copy
//! gone first, so the waiter was asleep before the write, and the wake that follows
//! the write reaches it. A wake wakes waiters of the word here, and sends a
//! [`FutexMessage::Wake`] to every other live node, retried until each acknowledges
//! (deduplicated there): the waker's `FutexWoken` answers once all did. A wake of `n`
//! may so wake up to `n` per node, which futex callers take as spurious wake-ups.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{DecodeError, Reader, Writer};
use crate::dedupe::{Dedupe, Seen};
use crate::retry::RetrySchedule;
use crate::types::{NodeId, PageId, SpaceId};
use crate::wire::{get_page, put_page};

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

    /// Every waiter (the node was evicted: no wake can reach it any more).
    pub fn wake_all(&mut self) -> Vec<Waiter> {
        let keys: Vec<Key> = self.waits.keys().copied().collect();
        keys.into_iter()
            .filter_map(|key| self.remove_key(key))
            .collect()
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

/// Futex traffic between nodes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FutexMessage {
    /// Wake up to `count` waiters of the word at `offset_bytes` of `page`.
    /// `oldest_in_flight` is the sender's oldest wake not yet acknowledged (every id
    /// below it is settled, so the receiver forgets their outcomes).
    Wake {
        wake_id: u64,
        oldest_in_flight: u64,
        page: PageId,
        offset_bytes: u32,
        count: u32,
    },
    /// The receiver woke `woken` waiters for `wake_id` (the same answer to a retry).
    WakeAck { wake_id: u64, woken: u32 },
}

const FM_WAKE: u8 = 1;
const FM_WAKE_ACK: u8 = 2;

impl FutexMessage {
    pub fn put(&self, w: &mut Writer) {
        match *self {
            FutexMessage::Wake {
                wake_id,
                oldest_in_flight,
                page,
                offset_bytes,
                count,
            } => {
                w.u8(FM_WAKE);
                w.u64(wake_id);
                w.u64(oldest_in_flight);
                put_page(w, page);
                w.u32(offset_bytes);
                w.u32(count);
            }
            FutexMessage::WakeAck { wake_id, woken } => {
                w.u8(FM_WAKE_ACK);
                w.u64(wake_id);
                w.u32(woken);
            }
        }
    }

    pub fn get(r: &mut Reader<'_>) -> Result<FutexMessage, DecodeError> {
        Ok(match r.u8()? {
            FM_WAKE => FutexMessage::Wake {
                wake_id: r.u64()?,
                oldest_in_flight: r.u64()?,
                page: get_page(r)?,
                offset_bytes: r.u32()?,
                count: r.u32()?,
            },
            FM_WAKE_ACK => FutexMessage::WakeAck {
                wake_id: r.u64()?,
                woken: r.u32()?,
            },
            _ => return Err(DecodeError::Invalid("futex message kind")),
        })
    }
}

/// How a remote wake is resent while a peer has not acknowledged it.
#[derive(Clone, Copy, Debug)]
pub struct WakeTiming {
    pub retry_base_ticks: u64,
    pub retry_max_ticks: u64,
}

/// A `FutexWake` of this node's process whose remote part is in flight.
#[derive(Clone, Debug)]
pub struct RemoteWake {
    pub conn: ConnId,
    pub request_id: u64,
    pub page: PageId,
    pub offset_bytes: u32,
    /// Waiters each peer is asked to wake.
    pub count: u32,
    /// Woken so far: here, and by the peers that acknowledged.
    pub woken: u32,
    /// Peers that have not acknowledged.
    pub unacked: BTreeSet<NodeId>,
    retry: RetrySchedule,
}

/// The remote wakes this node sent (at most one per connection: a thread waits for
/// its `FutexWoken`), and the outcomes of wakes it received, for retries.
pub struct RemoteWakes {
    timing: WakeTiming,
    sent: BTreeMap<u64, RemoteWake>,
    next_wake_id: u64,
    received: Dedupe<u32>,
    /// Planted bug: each wake goes out once, never resent.
    pub mutant_not_retried: bool,
}

impl RemoteWakes {
    /// `id_base`: this life's first wake id minus one (`Config::id_base`), so a
    /// restarted node's wakes are never taken for its earlier life's by the receivers'
    /// deduplication.
    pub fn new(timing: WakeTiming, id_base: u64) -> RemoteWakes {
        assert!(timing.retry_base_ticks > 0 && timing.retry_base_ticks <= timing.retry_max_ticks);
        RemoteWakes {
            timing,
            sent: BTreeMap::new(),
            next_wake_id: id_base + 1,
            received: Dedupe::default(),
            mutant_not_retried: false,
        }
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    fn oldest_in_flight(&self) -> u64 {
        self.sent
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_wake_id)
    }

    fn message(wake_id: u64, oldest_in_flight: u64, wake: &RemoteWake) -> FutexMessage {
        FutexMessage::Wake {
            wake_id,
            oldest_in_flight,
            page: wake.page,
            offset_bytes: wake.offset_bytes,
            count: wake.count,
        }
    }

    /// Starts the remote part of a wake of `count` that woke `woken_here` waiters
    /// here: returns what to send to each of `peers` (none must be this node).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        now_ticks: u64,
        (conn, request_id): (ConnId, u64),
        page: PageId,
        offset_bytes: u32,
        count: u32,
        woken_here: u32,
        peers: &[NodeId],
    ) -> Vec<(NodeId, FutexMessage)> {
        assert!(woken_here <= count && count > 0 && !peers.is_empty());
        assert!(
            self.sent.values().all(|w| w.conn != conn),
            "one wake per connection"
        );
        let wake_id = self.next_wake_id;
        self.next_wake_id += 1;
        let wake = RemoteWake {
            conn,
            request_id,
            page,
            offset_bytes,
            count,
            woken: woken_here,
            unacked: peers.iter().copied().collect(),
            retry: RetrySchedule::starting(now_ticks, self.timing.retry_base_ticks),
        };
        // Inserted first: the message's floor must not pass its own id.
        self.sent.insert(wake_id, wake);
        let message = Self::message(wake_id, self.oldest_in_flight(), &self.sent[&wake_id]);
        debug_assert!(
            matches!(message, FutexMessage::Wake { oldest_in_flight, .. } if oldest_in_flight <= wake_id)
        );
        if self.mutant_not_retried {
            // Answered at once, as if every peer had heard it.
            self.sent
                .get_mut(&wake_id)
                .expect("inserted")
                .unacked
                .clear();
        }
        peers.iter().map(|&peer| (peer, message)).collect()
    }

    /// Wakes that every peer acknowledged (or was declared down), to answer now:
    /// only the mutant leaves any right after `start`.
    pub fn take_settled(&mut self) -> Vec<RemoteWake> {
        let settled: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, w)| w.unacked.is_empty())
            .map(|(&id, _)| id)
            .collect();
        settled
            .into_iter()
            .filter_map(|id| self.sent.remove(&id))
            .collect()
    }

    /// `from` acknowledged `wake_id` with `woken` waiters woken there.
    pub fn on_ack(&mut self, from: NodeId, wake_id: u64, woken: u32) -> Option<RemoteWake> {
        let wake = self.sent.get_mut(&wake_id)?;
        if !wake.unacked.remove(&from) {
            return None;
        }
        wake.woken = wake.woken.saturating_add(woken);
        if wake.unacked.is_empty() {
            self.sent.remove(&wake_id)
        } else {
            None
        }
    }

    /// Resends due wakes; peers `is_down` says are down no longer count (their
    /// processes are gone). Returns what to send; settled wakes wait in `take_settled`.
    pub fn tick(
        &mut self,
        now_ticks: u64,
        is_down: &dyn Fn(NodeId) -> bool,
    ) -> Vec<(NodeId, FutexMessage)> {
        let mut sends = Vec::new();
        let oldest_in_flight = self.oldest_in_flight();
        for (&wake_id, wake) in self.sent.iter_mut() {
            wake.unacked.retain(|&peer| !is_down(peer));
            if wake.unacked.is_empty() || !wake.retry.is_due(now_ticks) {
                continue;
            }
            wake.retry
                .backed_off(now_ticks, self.timing.retry_max_ticks);
            let message = Self::message(wake_id, oldest_in_flight, wake);
            sends.extend(wake.unacked.iter().map(|&peer| (peer, message)));
        }
        sends
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.sent
            .values()
            .filter(|w| !w.unacked.is_empty())
            .map(|w| w.retry.next_tick)
            .min()
    }

    /// The connection closed: nobody waits for its wake's answer. The peers may still
    /// wake waiters for it (spurious at worst).
    pub fn remove_conn(&mut self, conn: ConnId) {
        self.sent.retain(|_, w| w.conn != conn);
    }

    /// Whether a received wake is new (then `record_received` its outcome), a retry
    /// of one answered before (its outcome), or settled long ago (ignore it).
    pub fn check_received(&mut self, from: NodeId, wake_id: u64, oldest: u64) -> Seen<u32> {
        self.received.check(from, wake_id, oldest)
    }

    pub fn record_received(&mut self, from: NodeId, wake_id: u64, woken: u32) {
        self.received.record(from, wake_id, woken);
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
    fn timing() -> WakeTiming {
        WakeTiming {
            retry_base_ticks: 10,
            retry_max_ticks: 40,
        }
    }

    #[test]
    fn a_remote_wake_is_resent_with_backoff_until_each_live_peer_acknowledged() {
        let mut wakes = RemoteWakes::new(timing(), 0);
        let page = PageId { space: 1, index: 3 };
        let sends = wakes.start(100, (7, 70), page, 8, 2, 1, &[2, 3]);
        assert_eq!(sends.len(), 2);
        let FutexMessage::Wake {
            wake_id,
            oldest_in_flight,
            count,
            ..
        } = sends[0].1
        else {
            panic!("{sends:?}");
        };
        assert_eq!(
            (oldest_in_flight, count),
            (wake_id, 2),
            "asks for the count"
        );
        assert!(wakes.tick(109, &|_| false).is_empty(), "not due yet");
        assert_eq!(wakes.tick(110, &|_| false).len(), 2);
        assert!(wakes.on_ack(2, wake_id, 1).is_none(), "node 3 is missing");
        assert!(
            wakes.on_ack(2, wake_id, 1).is_none(),
            "a duplicate counts once"
        );
        // Backoff doubled: due again at 110 + 20, and only to node 3.
        assert!(wakes.tick(129, &|_| false).is_empty());
        assert_eq!(
            wakes
                .tick(130, &|_| false)
                .iter()
                .map(|s| s.0)
                .collect::<Vec<_>>(),
            vec![3]
        );
        let done = wakes.on_ack(3, wake_id, 0).expect("all acknowledged");
        assert_eq!((done.conn, done.request_id, done.woken), (7, 70, 2));
        assert!(wakes.is_empty() && wakes.next_deadline().is_none());
    }

    #[test]
    fn a_peer_declared_down_no_longer_holds_a_wake_back() {
        let mut wakes = RemoteWakes::new(timing(), 0);
        let page = PageId { space: 1, index: 0 };
        wakes.start(0, (1, 10), page, 0, 1, 0, &[2]);
        assert!(wakes.take_settled().is_empty());
        assert!(wakes.tick(5, &|node| node == 2).is_empty());
        let settled = wakes.take_settled();
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].woken, 0);
    }

    #[test]
    fn a_received_wake_is_executed_once_and_forgotten_below_the_senders_floor() {
        let mut wakes = RemoteWakes::new(timing(), 0);
        assert_eq!(wakes.check_received(2, 5, 5), Seen::New);
        wakes.record_received(2, 5, 1);
        assert_eq!(wakes.check_received(2, 5, 5), Seen::Done(1));
        assert_eq!(wakes.check_received(3, 5, 5), Seen::New, "per sender");
        assert_eq!(wakes.check_received(2, 5, 6), Seen::Stale);
    }

    #[test]
    fn encoded_messages_decode_to_themselves() {
        for message in [
            FutexMessage::Wake {
                wake_id: 9,
                oldest_in_flight: 4,
                page: PageId {
                    space: 2,
                    index: 77,
                },
                offset_bytes: 4092,
                count: u32::MAX,
            },
            FutexMessage::WakeAck {
                wake_id: 1,
                woken: 3,
            },
        ] {
            let mut w = Writer::with_capacity(64);
            message.put(&mut w);
            let mut r = Reader::new(&w.bytes);
            assert_eq!(FutexMessage::get(&mut r), Ok(message));
            assert!(r.finish().is_ok());
        }
        assert!(FutexMessage::get(&mut Reader::new(&[9])).is_err());
    }
}
