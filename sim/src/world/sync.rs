//! Simulated mutexes on the distributed futex, and their checkers.
//!
//! A lock is a 32-bit word in a block of the space (never published to the random
//! workload), with the classic futex mutex on it (Drepper, "Futexes are tricky",
//! mutex 2): 0 free, 1 locked, 2 locked with waiters. Lock: compare-and-swap 0 → 1;
//! else swap in 2 until the old value is 0, sleeping in `FutexWait(word, 2)` between
//! tries. Unlock: swap in 0; if the old value was 2, `FutexWake(word, 1)`. Each swap
//! is an access that needs write access to the page, faulted like any other. A wait
//! reaches the host a few ticks after the swap that decided it, as in a real process,
//! so waits race with unlocks.
//!
//! Checkers:
//! - mutual exclusion: a lock is never acquired while another thread holds it;
//! - no lost wake-up: a wait that reaches its host when the word no longer holds the
//!   expected value is answered at once (within `WAKE_BOUND_TICKS`); and after an
//!   unlock's `FutexWake(word, 1)`, at least one of the waits on the word asleep at the
//!   unlock's write is answered within `WAKE_BOUND_TICKS` of the wake's reply, whatever
//!   node it sleeps on (waits of processes that ended owe nothing).

use gallocy_core::host::NodeMemory as _;

use super::*;

/// Bytes of the block a lock lives in (the word is at its start).
pub(super) const LOCK_BYTES: u64 = 64;
/// Locks in use at once (abandoned ones not counted).
const MAX_LOCKS: usize = 3;
/// Sleeps one lock attempt may take before it gives up (a timed lock failing).
const MAX_LOCK_WAITS: u32 = 4;
pub(super) const FUTEX_TIMEOUT_TICKS: u32 = 1_000;
/// How soon an answer a wait is owed must reach its thread.
const WAKE_BOUND_TICKS: u64 = 200;
/// Longest delay between the swap that decides to sleep and the wait reaching the host.
const MAX_WAIT_SEND_DELAY_TICKS: u64 = 12;
/// `NoCopy` answers one lock attempt tolerates before it gives up.
const MAX_NO_COPY_RETRIES: u32 = 32;
/// How long a held lock is held.
const MAX_HOLD_TICKS: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rmw {
    /// Compare-and-swap 0 → 1.
    TryLock,
    /// Swap in 2.
    Contend,
    /// Swap in 0.
    Unlock,
    /// The holder increments the condition variable's sequence word (a signal).
    Signal,
    /// The holder reads the sequence word before it waits on it.
    CondRead,
}

/// Offset of a lock's condition variable (its sequence word) in the lock's block.
const COND_OFFSET_BYTES: u64 = 8;

/// A lock's word, or (`cond`) its condition variable's.
fn word_addr(lock_addr: u64, cond: bool) -> u64 {
    if cond {
        lock_addr + COND_OFFSET_BYTES
    } else {
        lock_addr
    }
}

/// The word an operation works on.
pub(super) fn rmw_word(lock_addr: u64, rmw: Rmw) -> u64 {
    word_addr(lock_addr, matches!(rmw, Rmw::Signal | Rmw::CondRead))
}

impl Rmw {
    pub(super) fn needs(self) -> Access {
        if self == Rmw::CondRead {
            Access::Read
        } else {
            Access::Write
        }
    }
}

impl SimLock {
    pub(super) fn holder_index(&self) -> Option<usize> {
        self.holder.map(|(index, _, _)| index)
    }
}

#[derive(Clone, Debug)]
pub(super) struct SimLock {
    pub(super) addr: u64,
    /// (node index, pid, thread) of the holder.
    holder: Option<(usize, i32, usize)>,
    /// Its holder's process ended while holding it: nobody will unlock it.
    abandoned: bool,
    /// Its holder's node crashed (it may have restarted since).
    pub(super) holder_crashed: bool,
}

/// A thread's lock operation in progress.
#[derive(Clone, Copy, Debug)]
pub(super) struct LockRun {
    lock: usize,
    /// Sleeps so far (answered other than `NoCopy`).
    waits: u32,
    /// `NoCopy` answers so far (the page moved between the swap and the wait).
    no_copies: u32,
    holding: bool,
    /// It signalled the condition variable during this hold: it unlocks next.
    signalled: bool,
}

impl LockRun {
    pub(super) fn holding(&self) -> bool {
        self.holding
    }
}

/// A `FutexWait` that reached its host.
#[derive(Clone, Copy, Debug)]
pub(super) struct WaitRecord {
    node: usize,
    pid: i32,
    addr: u64,
    answered_tick: Option<u64>,
}

/// At least one of `waits` is owed an answer by `due_tick`.
#[derive(Clone, Debug)]
pub(super) struct WakeDue {
    waits: Vec<u64>,
    due_tick: u64,
    what: &'static str,
}

/// Whether the process `pid` of node `index` is still attached and running.
pub(super) fn is_live(slots: &[NodeSlot], index: usize, pid: i32) -> bool {
    slots[index]
        .processes
        .get(&pid)
        .is_some_and(|p| p.phase == ProcPhase::Live)
}

impl World {
    fn lock_word_offset(&self, index: usize, addr: u64) -> Option<(PageId, usize)> {
        let layout = self.slots[index].space.as_ref()?;
        let page = layout.page_of(addr)?;
        let offset = ((addr - layout.base_addr) % PAGE_SIZE_BYTES as u64) as usize;
        Some((page, offset))
    }

    /// Starts a lock operation, or allocates a new lock; false if neither applies.
    pub(super) fn start_lock(&mut self, index: usize, pid: i32, thread: usize) -> bool {
        let usable: Vec<usize> = (0..self.locks.len())
            .filter(|&l| !self.locks[l].abandoned)
            .collect();
        if usable.len() < MAX_LOCKS && self.rng.gen_range(0..8) == 0 {
            let op = self.new_op(index, pid, thread, OpKind::AllocateLock);
            let conn = self.slots[index].processes[&pid].threads[thread].conn;
            let allocate = IpcMessage::Allocate {
                size_bytes: LOCK_BYTES,
                align_bytes: 16,
            };
            self.send(index, conn, op.id, allocate);
            return true;
        }
        if usable.is_empty() {
            return false;
        }
        let lock = usable[self.rng.gen_range(0..usable.len())];
        let run = LockRun {
            lock,
            waits: 0,
            no_copies: 0,
            holding: false,
            signalled: false,
        };
        self.slots[index]
            .processes
            .get_mut(&pid)
            .expect("issuing")
            .threads[thread]
            .sync = Some(run);
        self.lock_step(index, pid, thread, lock, Rmw::TryLock);
        true
    }

    fn lock_step(&mut self, index: usize, pid: i32, thread: usize, lock: usize, rmw: Rmw) {
        let op = self.new_op(index, pid, thread, OpKind::LockRmw { lock, rmw });
        self.access(index, pid, thread, op, false);
    }

    /// Threads holding a lock whose hold time is over release it (also after the
    /// workload stopped issuing, so nobody waits on a lock for nothing).
    pub(super) fn issue_unlocks(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].host.is_none() || self.slots[index].space.is_none() {
                continue;
            }
            let pids: Vec<i32> = self.slots[index].processes.keys().copied().collect();
            for pid in pids {
                let Some(process) = self.slots[index].processes.get(&pid) else {
                    continue;
                };
                if process.phase != ProcPhase::Live {
                    continue;
                }
                let due: Vec<(usize, usize, bool)> = process
                    .threads
                    .iter()
                    .enumerate()
                    .filter_map(|(t, state)| match state.sync {
                        Some(run)
                            if run.holding
                                && state.ready
                                && state.pending.is_none()
                                && state.next_op_tick <= self.now_ticks =>
                        {
                            Some((t, run.lock, run.signalled))
                        }
                        _ => None,
                    })
                    .collect();
                for (thread, lock, signalled) in due {
                    // A holder signals the condition variable, or waits on it, or
                    // just unlocks.
                    let rmw = match self.rng.gen_range(0..6) {
                        0 if !signalled => Rmw::Signal,
                        1 => Rmw::CondRead,
                        _ => Rmw::Unlock,
                    };
                    self.lock_step(index, pid, thread, lock, rmw);
                    self.settle();
                }
            }
        }
    }

    /// Performs a swap on the lock word (the thread has write access) and goes on.
    pub(super) fn perform_rmw(
        &mut self,
        index: usize,
        pid: i32,
        thread: usize,
        lock: usize,
        rmw: Rmw,
    ) {
        let lock_addr = self.locks[lock].addr;
        let addr = rmw_word(lock_addr, rmw);
        let Some((page, offset)) = self.lock_word_offset(index, addr) else {
            return;
        };
        // Read as the host reads futex words; both maps hold zero pages implicitly.
        let old = self.slots[index].memory.load_u32(page, offset).unwrap_or(0);
        let live = self.live_nodes();
        let seen = self
            .ghost
            .read(page, offset, &old.to_le_bytes(), index, &live);
        let new = match rmw {
            Rmw::TryLock if old == 0 => 1,
            Rmw::TryLock | Rmw::CondRead => old,
            Rmw::Contend => 2,
            Rmw::Unlock => 0,
            Rmw::Signal => old.wrapping_add(1),
        };
        let bytes = self.slots[index]
            .memory
            .entry(page)
            .or_insert_with(|| Box::new([0u8; PAGE_SIZE_BYTES]));
        bytes[offset..offset + 4].copy_from_slice(&new.to_le_bytes());
        self.ghost
            .write(page, offset, &new.to_le_bytes(), index, &live);
        self.dirty_pages.insert(page);
        self.counters.writes += 1;
        self.trace
            .event(18, &[index as u64, addr, old as u64, new as u64]);
        if self.debug {
            eprintln!(
                "[t={}] node {} process {pid} thread {thread} {rmw:?} {addr:#x}: {old} -> {new}",
                self.now_ticks,
                index + 1
            );
        }
        if let Err(allowed) = seen {
            let allowed: Vec<String> = allowed
                .iter()
                .map(|b| u32::from_le_bytes(b[..].try_into().expect("4 bytes")).to_string())
                .collect();
            return self.violate(
                "memory consistency",
                format!(
                    "process {pid} on node {} swapped lock word {addr:#x} holding {old} but it may only hold {}",
                    index + 1,
                    allowed.join(" or ")
                ),
            );
        }
        if matches!(rmw, Rmw::Signal | Rmw::CondRead)
            && self.locks[lock].holder != Some((index, pid, thread))
        {
            return self.violate(
                "mutual exclusion",
                format!(
                    "node {} process {pid} used the condition variable of lock {lock_addr:#x} without holding it",
                    index + 1
                ),
            );
        }
        match rmw {
            Rmw::Signal => {
                self.counters.cond_signals += 1;
                if let Some(mut run) = self.sync_of(index, pid, thread) {
                    run.signalled = true;
                    self.set_sync(index, pid, thread, Some(run));
                }
                self.wake_one(index, pid, thread, lock, true);
            }
            Rmw::CondRead => {
                // Unlock, then wait on the value read (pthread_cond_wait).
                if let Some(process) = self.slots[index].processes.get_mut(&pid) {
                    process.threads[thread].cond_wait = Some((lock, old));
                }
                self.lock_step(index, pid, thread, lock, Rmw::Unlock);
            }
            Rmw::TryLock | Rmw::Contend if old == 0 => self.acquired(index, pid, thread, lock),
            Rmw::TryLock => self.lock_step(index, pid, thread, lock, Rmw::Contend),
            Rmw::Contend => self.sleep_on_lock(index, pid, thread, lock),
            Rmw::Unlock => {
                let holder = self.locks[lock].holder.take();
                if holder != Some((index, pid, thread)) {
                    return self.violate(
                        "mutual exclusion",
                        format!(
                            "node {} process {pid} released lock {addr:#x} held by {holder:?}",
                            index + 1
                        ),
                    );
                }
                self.set_sync(index, pid, thread, None);
                if old == 2 {
                    self.wake_one(index, pid, thread, lock, false);
                } else {
                    self.finish_op(index, pid, thread);
                }
            }
        }
    }

    /// After a write of the lock's word (or, `cond`, its condition variable's), sends
    /// `FutexWake(word, 1)`: the waits on the word asleep at the write are owed one
    /// answer by it.
    fn wake_one(&mut self, index: usize, pid: i32, thread: usize, lock: usize, cond: bool) {
        let addr = word_addr(self.locks[lock].addr, cond);
        let owed: Vec<u64> = self
            .futex_waits
            .iter()
            .filter(|(_, r)| r.addr == addr && r.answered_tick.is_none())
            .map(|(&id, _)| id)
            .collect();
        let op = self.new_op(index, pid, thread, OpKind::FutexWake { lock, cond });
        self.wakes_owed.insert(op.id, owed);
        let conn = self.slots[index].processes[&pid].threads[thread].conn;
        self.counters.futex_wakes += 1;
        self.send(index, conn, op.id, IpcMessage::FutexWake { addr, count: 1 });
    }

    /// Starts a futex wait that reaches the host 0 to `MAX_WAIT_SEND_DELAY_TICKS` later.
    fn wait_later(&mut self, index: usize, pid: i32, thread: usize, wait: OpKind) {
        let op = self.new_op(index, pid, thread, wait);
        let delay = self.rng.gen_range(0..=MAX_WAIT_SEND_DELAY_TICKS);
        if delay == 0 {
            self.send_wait(index, pid, thread, op.id);
        } else {
            let event = Scheduled::SendFutexWait {
                node: index,
                pid,
                thread,
                op_id: op.id,
            };
            self.schedule(delay, event);
        }
    }

    fn set_sync(&mut self, index: usize, pid: i32, thread: usize, run: Option<LockRun>) {
        if let Some(process) = self.slots[index].processes.get_mut(&pid) {
            process.threads[thread].sync = run;
        }
    }

    fn sync_of(&self, index: usize, pid: i32, thread: usize) -> Option<LockRun> {
        self.slots[index]
            .processes
            .get(&pid)
            .and_then(|p| p.threads[thread].sync)
    }

    fn acquired(&mut self, index: usize, pid: i32, thread: usize, lock: usize) {
        let addr = self.locks[lock].addr;
        // A holder whose node crashed before anyone saw its lock word may lose the
        // lock with its writes (the word reverts): the lock is free again.
        if let Some((holder_index, _, _)) = self.locks[lock].holder {
            if !self.live_nodes()[holder_index] || self.locks[lock].holder_crashed {
                self.locks[lock].holder = None;
                self.locks[lock].holder_crashed = false;
            }
        }
        if let Some(holder) = self.locks[lock].holder {
            return self.violate(
                "mutual exclusion",
                format!(
                    "node {} process {pid} thread {thread} acquired lock {addr:#x} held by {holder:?}",
                    index + 1
                ),
            );
        }
        self.locks[lock].holder = Some((index, pid, thread));
        self.locks[lock].holder_crashed = false;
        self.counters.locks_acquired += 1;
        self.trace.event(19, &[index as u64, pid as u64, addr]);
        let Some(mut run) = self.sync_of(index, pid, thread) else {
            return;
        };
        run.holding = true;
        self.set_sync(index, pid, thread, Some(run));
        self.finish_op(index, pid, thread);
        let hold = self.rng.gen_range(1..=MAX_HOLD_TICKS);
        if let Some(process) = self.slots[index].processes.get_mut(&pid) {
            process.threads[thread].next_op_tick = self.now_ticks + hold;
        }
    }

    fn sleep_on_lock(&mut self, index: usize, pid: i32, thread: usize, lock: usize) {
        let Some(mut run) = self.sync_of(index, pid, thread) else {
            return;
        };
        if run.waits >= MAX_LOCK_WAITS || run.no_copies >= MAX_NO_COPY_RETRIES {
            self.counters.lock_gave_up += 1;
            self.set_sync(index, pid, thread, None);
            return self.finish_op(index, pid, thread);
        }
        run.waits += 1;
        self.set_sync(index, pid, thread, Some(run));
        let wait = OpKind::FutexWait {
            lock,
            expected: 2,
            cond: false,
        };
        self.wait_later(index, pid, thread, wait);
    }

    /// A thread that read the condition variable's sequence and unlocked sleeps on it.
    pub(super) fn start_cond_wait(
        &mut self,
        index: usize,
        pid: i32,
        thread: usize,
        lock: usize,
        expected: u32,
    ) {
        if self.locks.get(lock).is_none_or(|l| l.abandoned) {
            return;
        }
        self.counters.cond_waits += 1;
        let wait = OpKind::FutexWait {
            lock,
            expected,
            cond: true,
        };
        self.wait_later(index, pid, thread, wait);
    }

    /// The thread's wait reaches its host.
    pub(super) fn send_wait(&mut self, index: usize, pid: i32, thread: usize, op_id: u64) {
        let Some(process) = self.slots[index].processes.get(&pid) else {
            return;
        };
        let state = &process.threads[thread];
        let Some(op) = state.pending.filter(|op| op.id == op_id) else {
            return;
        };
        let OpKind::FutexWait {
            lock,
            expected,
            cond,
        } = op.kind
        else {
            return;
        };
        if process.phase != ProcPhase::Live {
            self.set_sync(index, pid, thread, None);
            return self.finish_op(index, pid, thread);
        }
        let conn = state.conn;
        let addr = word_addr(self.locks[lock].addr, cond);
        let live = self.live_nodes();
        let current = self
            .lock_word_offset(index, addr)
            .map(|(page, offset)| self.ghost.certain_u32(page, offset, &live))
            .unwrap_or(Some(0));
        self.futex_waits.insert(
            op_id,
            WaitRecord {
                node: index,
                pid,
                addr,
                answered_tick: None,
            },
        );
        // Unknown after a crash (the page is one of several states): no bound then.
        if current.is_some_and(|current| current != expected) {
            self.wake_dues.push(WakeDue {
                waits: vec![op_id],
                due_tick: self.now_ticks + WAKE_BOUND_TICKS,
                what: "a wait whose word had already changed",
            });
        }
        self.counters.futex_waits += 1;
        if self.debug {
            eprintln!(
                "[t={}] node {} process {pid} thread {thread} waits on {addr:#x} for {expected} (word {current:?}, request {op_id})",
                self.now_ticks,
                index + 1
            );
        }
        self.trace.event(20, &[index as u64, addr, expected as u64]);
        let wait = IpcMessage::FutexWait {
            addr,
            expected,
            timeout_ticks: FUTEX_TIMEOUT_TICKS,
        };
        self.send(index, conn, op_id, wait);
    }

    /// Any answer to a wait, an error included.
    pub(super) fn wait_answered(&mut self, op_id: u64) {
        if let Some(record) = self.futex_waits.get_mut(&op_id) {
            record.answered_tick.get_or_insert(self.now_ticks);
        }
    }

    pub(super) fn on_wait_done(
        &mut self,
        index: usize,
        pid: i32,
        thread: usize,
        lock: usize,
        outcome: FutexOutcome,
        cond: bool,
    ) {
        if cond {
            // Woken, changed, timed out or moved: relock (pthread_cond_wait's return).
            self.trace
                .event(21, &[index as u64, pid as u64, outcome as u64]);
            let run = LockRun {
                lock,
                waits: 0,
                no_copies: 0,
                holding: false,
                signalled: false,
            };
            self.set_sync(index, pid, thread, Some(run));
            return self.lock_step(index, pid, thread, lock, Rmw::TryLock);
        }
        match outcome {
            FutexOutcome::Woken => self.counters.futex_woken += 1,
            FutexOutcome::ValueChanged => self.counters.futex_value_changed += 1,
            FutexOutcome::TimedOut => self.counters.futex_timed_out += 1,
            FutexOutcome::NoCopy => {
                self.counters.futex_no_copy += 1;
                // Not a sleep: the thread touches the page and tries again.
                if let Some(mut run) = self.sync_of(index, pid, thread) {
                    run.waits -= 1;
                    run.no_copies += 1;
                    self.set_sync(index, pid, thread, Some(run));
                }
            }
        }
        self.trace
            .event(21, &[index as u64, pid as u64, outcome as u64]);
        // Like glibc: whatever woke it, try again (a NoCopy retry faults the page in).
        self.lock_step(index, pid, thread, lock, Rmw::Contend);
    }

    /// `FutexWake(word, 1)` answered (`wake_id`): of the waits that slept when the
    /// unlock wrote the word, one is owed an answer.
    pub(super) fn on_woken(&mut self, lock: usize, wake_id: u64, woken: u32) {
        let addr = self.locks[lock].addr;
        let owed = self.wakes_owed.remove(&wake_id).unwrap_or_default();
        self.trace
            .event(22, &[addr, woken as u64, owed.len() as u64]);
        if self.debug {
            eprintln!(
                "[t={}] wake on {addr:#x} woke {woken}, owed by {owed:?}",
                self.now_ticks
            );
        }
        if !owed.is_empty() {
            self.wake_dues.push(WakeDue {
                waits: owed,
                due_tick: self.now_ticks + WAKE_BOUND_TICKS,
                what: "waits asleep at the unlock a wake followed",
            });
        }
    }

    /// The lock checkers' periodic part: owed answers, abandoned locks, old records.
    pub fn check_wakes(&mut self) {
        for lock in &mut self.locks {
            if let Some((index, pid, _)) = lock.holder {
                lock.abandoned |= !is_live(&self.slots, index, pid);
            }
        }
        let now = self.now_ticks;
        let (due, later): (Vec<WakeDue>, Vec<WakeDue>) = std::mem::take(&mut self.wake_dues)
            .into_iter()
            .partition(|d| d.due_tick <= now);
        self.wake_dues = later;
        for owed in due {
            // A wait of a process that is gone or leaving owes nothing (its host
            // forgot it with the connection).
            let settled = owed
                .waits
                .iter()
                .filter(|id| {
                    let Some(record) = self.futex_waits.get(id) else {
                        return true;
                    };
                    record.answered_tick.is_some() || !is_live(&self.slots, record.node, record.pid)
                })
                .count();
            if settled == 0 {
                let detail = format!(
                    "lost wake-up: {} of {} (requests {:?}) answered {WAKE_BOUND_TICKS} ticks after they were owed one",
                    settled,
                    owed.what,
                    &owed.waits[..owed.waits.len().min(6)]
                );
                return self.violate("no lost wake-up", detail);
            }
        }
        // Records nobody can owe anything any more: answered long ago, or of a
        // process that is gone (bounded by the waits of live threads and recent ones).
        let owed: BTreeSet<u64> = self
            .wake_dues
            .iter()
            .flat_map(|d| d.waits.iter().copied())
            .chain(self.wakes_owed.values().flatten().copied())
            .collect();
        let slots = &self.slots;
        self.futex_waits.retain(|id, r| {
            let live = is_live(slots, r.node, r.pid);
            let recent = r
                .answered_tick
                .is_none_or(|t| now.saturating_sub(t) <= WAKE_BOUND_TICKS);
            owed.contains(id) || (live && recent)
        });
    }

    /// A new lock's block was allocated.
    pub(super) fn add_lock(&mut self, addr: u64) {
        self.counters.locks_created += 1;
        self.locks.push(SimLock {
            addr,
            holder: None,
            abandoned: false,
            holder_crashed: false,
        });
    }
}
