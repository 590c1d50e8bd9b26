//! The simulated world: N gallocy-core hosts (a node and its process layer each), the
//! memory each node backs its spaces with, simulated processes attached to every node
//! (each with threads, a service thread and its own access map), and the checkers.
//!
//! turmoil carries the frames between nodes (see `run.rs`); processes talk to their
//! node's host with the real 64-byte IPC frames. Everything here is plain
//! deterministic state, driven one turmoil step (2 ms of node time) at a time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use gallocy_core::host::{
    ConnId, Credentials, Host, HostAction, HostConfig, ProcessState, SessionId,
};
use gallocy_core::ipc::{
    ErrorCode, Frame, FutexOutcome, IpcMessage, Role, IPC_FRAME_BYTES, IPC_NAME_BYTES,
};
use gallocy_core::meta::NodeStatus;
use gallocy_core::node::Mutant;
use gallocy_core::{
    Access, Config, Node, NodeId, PageBytes, PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::trace::TraceHash;

mod sync;
mod threads;
use crate::disk::SimDisk;
use crate::ghost::Ghost;
use sync::{LockRun, Rmw, SimLock, WaitRecord, WakeDue};

pub const SPACE_NAME: &str = "sim";
pub const SPACE_BASE_ADDR: u64 = 0x1000_0000_0000;
pub const SPACE_SIZE_BYTES: u64 = 64 << 20;
pub const CHUNK_SIZE_BYTES: u64 = 64 << 10;
const WORD_BYTES: u64 = 8;
/// Bound on reply/request cascades inside one input.
const MAX_SETTLE_STEPS: usize = 1 << 20;
/// Processes attached to a node at once, and below how many a new one starts.
const MAX_PROCESSES_PER_NODE: usize = 3;
const MIN_PROCESSES_PER_NODE: usize = 2;
/// Per tick and process, the chance (in 1/100000) that it ends during the workload.
const END_PER_100K_TICKS: u32 = 40;
/// How long a stalled process's service thread takes to apply a revocation: longer
/// than any revocation timeout, so its host kills it.
const STALL_TICKS: u64 = 5_000;

/// A broken invariant: what, where and when.
#[derive(Clone, Debug)]
pub struct Violation {
    pub checker: &'static str,
    pub detail: String,
    pub step: u64,
    pub tick: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Crashed nodes started again from their disks.
    pub restarts: u64,
    /// Membership changes asked by the administrator and applied on every node up.
    pub members_added: u64,
    pub members_removed: u64,
    pub ops_issued: u64,
    pub ops_completed: u64,
    pub reads: u64,
    pub writes: u64,
    pub allocations: u64,
    pub frees: u64,
    /// Syncs answered (`gallocy_sync`).
    pub syncs: u64,
    pub remote_frees_ok: u64,
    pub invalid_frees_rejected: u64,
    pub faults_requested: u64,
    pub page_lost: u64,
    pub node_down_errors: u64,
    pub evicted_errors: u64,
    pub not_mapped: u64,
    pub out_of_memory: u64,
    pub busy: u64,
    pub frames_sent: u64,
    pub frames_delivered: u64,
    pub frames_dropped: u64,
    pub frames_duplicated: u64,
    pub revokes: u64,
    pub processes_started: u64,
    pub processes_killed: u64,
    pub processes_exited: u64,
    pub detaches: u64,
    /// Times every process of the cluster was ended at once, so the space must go.
    pub drains: u64,
    /// `DropSpace` actions (one per node per destroyed space).
    pub spaces_dropped: u64,
    /// Times processes were welcomed into a new space after the old one was destroyed.
    pub new_spaces: u64,
    /// Spaces created persistent, and `Unpersist` requests sent by an administrator.
    pub persistent_creates: u64,
    pub unpersists: u64,
    /// Runs of chunks given back to the cluster (counted once, at the first node that
    /// dropped their pages), and how many of them are free again.
    pub runs_released: u64,
    pub runs_freed: u64,
    pub locks_created: u64,
    pub locks_acquired: u64,
    /// Lock attempts that slept `MAX_LOCK_WAITS` times without the lock (timed out).
    pub lock_gave_up: u64,
    pub futex_waits: u64,
    pub futex_wakes: u64,
    pub futex_woken: u64,
    pub futex_value_changed: u64,
    pub futex_timed_out: u64,
    pub futex_no_copy: u64,
    pub cond_waits: u64,
    pub cond_signals: u64,
    pub programs_launched: u64,
    pub workers_started: u64,
    pub threads_spawned: u64,
    pub threads_ran: u64,
    pub spawns_refused: u64,
    pub joins: u64,
    pub joins_given_up: u64,
    pub output_bytes: u64,
    /// Record blocks not used (the workload might still write them).
    pub records_unused: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Allocate {
        size_bytes: u64,
    },
    Free {
        addr: u64,
        expect_valid: bool,
    },
    Read {
        addr: u64,
    },
    Write {
        addr: u64,
        value: u64,
    },
    /// Allocates a block for a new lock.
    AllocateLock,
    /// An atomic swap on a lock word (needs write access).
    LockRmw {
        lock: usize,
        rmw: Rmw,
    },
    /// On the lock's word, or (`cond`) on its condition variable's sequence word.
    FutexWait {
        lock: usize,
        expected: u32,
        cond: bool,
    },
    FutexWake {
        lock: usize,
        cond: bool,
    },
    /// Allocates a thread record for a spawn.
    AllocateRecord,
    /// Asks for a thread whose record is at `record`.
    Spawn {
        record: u64,
    },
    /// `gallocy_sync`: what its node's processes wrote or saw is on k nodes once
    /// answered.
    Sync,
    /// A join's read of its thread's record.
    JoinRead {
        addr: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct PendingOp {
    kind: OpKind,
    /// Unique in the run; the request id of its frames.
    id: u64,
    issued_tick: u64,
}

#[derive(Clone, Debug)]
struct Thread {
    conn: ConnId,
    /// Answered its hello: may issue.
    ready: bool,
    pending: Option<PendingOp>,
    /// Simulated think time: next tick this thread may issue an operation.
    next_op_tick: u64,
    /// The lock operation it is in, if any.
    sync: Option<LockRun>,
    /// The thread it joins: (record, reads so far).
    join: Option<(u64, u32)>,
    /// A record it initialised: the spawn to send next.
    spawn_next: Option<u64>,
    /// A condition variable wait to start once its unlock is done: (lock, sequence).
    cond_wait: Option<(usize, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcPhase {
    /// Waiting for the Welcome.
    Joining,
    Live,
    /// Asked to detach; waiting for the answer.
    Detaching,
    /// Closed its Main connection but goes on running with what it was granted
    /// (a program that closes every descriptor, say).
    Hostile,
    /// Killed: dies at `ProcDeath`.
    Dying,
}

#[derive(Clone, Debug)]
struct Process {
    pid: i32,
    main: ConnId,
    service: Option<ConnId>,
    session: Option<SessionId>,
    threads: Vec<Thread>,
    phase: ProcPhase,
    /// What this process can do with each page: its own mprotect state.
    access: BTreeMap<PageId, Access>,
    max_revoke_delay_ticks: u64,
    /// The service thread answers nothing in time.
    stalled: bool,
    /// The thread connections' grants are applied this much later, at most.
    max_grant_delay_ticks: u64,
    /// When the service thread applies the last revocation it received: it applies
    /// them one at a time, in order.
    service_free_tick: u64,
    /// Revocations received and not applied yet.
    revokes_queued: u32,
    /// The space it was welcomed into.
    space: Option<SpaceId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnKind {
    Main,
    Service,
    Thread(usize),
    /// An administrator's connection (`gallocy space unpersist`); its pid is 0.
    Admin,
    /// The program launcher's connection; its pid is 0.
    Launcher,
    /// A process's connection serving the program's threads.
    Serve,
}

struct NodeSlot {
    host: Option<Host>,
    /// Survives crashes: what a restart reads.
    disk: SimDisk,
    /// The life the host runs (or last ran) as.
    incarnation: u64,
    /// Its configuration, for restarts.
    host_config: HostConfig,
    /// The node's memory for its spaces (the daemon's memfd): what every process of
    /// the node reads and writes, under its own access.
    memory: BTreeMap<PageId, Box<PageBytes>>,
    processes: BTreeMap<i32, Process>,
    conns: BTreeMap<ConnId, (i32, ConnKind)>,
    next_conn: ConnId,
    space: Option<SpaceLayout>,
}

#[derive(Clone, Copy, Debug)]
enum Scheduled {
    /// A service thread applies a revocation, then answers.
    ApplyRevoke {
        node: usize,
        pid: i32,
        addr: u64,
        len: u64,
        access: Access,
        token: u64,
    },
    /// A faulting thread applies its grant, then reports it and retries.
    ApplyGrant {
        node: usize,
        pid: i32,
        thread: usize,
        page_addr: u64,
        pages: u32,
        write: bool,
        op_id: u64,
    },
    /// A killed process is gone.
    Death { node: usize, pid: i32 },
    /// A thread's futex wait reaches its host (a while after it decided to sleep).
    SendFutexWait {
        node: usize,
        pid: i32,
        thread: usize,
        op_id: u64,
    },
}

#[derive(Clone, Debug)]
pub struct WorldParams {
    pub seed: u64,
    pub nodes: usize,
    pub ops: u64,
    pub threads_per_process: usize,
    pub max_revoke_delay_ticks: u64,
    pub mutant: Option<Mutant>,
    /// A node (by index) outside the first configuration: it starts to join, and an
    /// administrator adds it during the run (`request_membership`).
    pub joiner: Option<usize>,
    /// k of the spaces the workload creates.
    pub replicas: u8,
}

/// How often the administrator asks again for a membership change not applied yet.
const MEMBERSHIP_RETRY_TICKS: u64 = 400;

/// How many ticks a drain waits for the space to be destroyed before processes may
/// start again (a partitioned node may hold its detach back for long).
const DRAIN_WAIT_TICKS: u64 = 4_000;
/// How often a drain left with a persistent space asks again to unpersist it.
const UNPERSIST_RETRY_TICKS: u64 = 500;

pub struct World {
    pub params: WorldParams,
    pub now_ticks: u64,
    pub step: u64,
    slots: Vec<NodeSlot>,
    /// Frames each node has to send: (destination node id, bytes).
    pub outbox: Vec<Vec<(NodeId, Vec<u8>)>>,
    /// Wakes node i's host loop when its outbox gets frames (it sleeps otherwise).
    pub outbox_ready: Vec<std::rc::Rc<tokio::sync::Notify>>,
    scheduled: BTreeMap<(u64, u64), Scheduled>,
    schedule_seq: u64,
    /// Frames hosts sent to processes, delivered in order.
    inbox: VecDeque<(usize, ConnId, Frame)>,
    /// What every page may hold, as the applications wrote and saw it (`ghost.rs`).
    ghost: Ghost,
    /// Live allocations by start: (length, allocating node).
    live: BTreeMap<u64, (u64, NodeId)>,
    /// Starts of live allocations, for picking at random (published pointers).
    published: Vec<u64>,
    /// Blocks whose free is in flight, by operation id.
    freeing: BTreeMap<u64, (u64, u64, NodeId)>,
    /// Blocks whose free had an unknown outcome: neither live nor safe to free twice.
    limbo: BTreeSet<u64>,
    /// Recently freed starts, for double frees (bounded).
    recently_freed: VecDeque<u64>,
    next_op_id: u64,
    next_pid: i32,
    dirty_pages: BTreeSet<PageId>,
    pub rng: ChaCha8Rng,
    pub trace: TraceHash,
    pub counters: Counters,
    pub violation: Option<Violation>,
    pub issuing: bool,
    /// Print every reply (GALLOCY_SIM_DEBUG=1), for debugging a failing seed.
    pub debug: bool,
    /// Print every access change of one page (GALLOCY_SIM_DEBUG_PAGE=N).
    pub debug_page: Option<u64>,
    actions_buffer: Vec<HostAction>,
    /// The space the processes of the current generation were welcomed into.
    generation_space: Option<SpaceId>,
    /// When (in operations issued) every process ends at once, if in this run.
    drain_at_ops: Option<u64>,
    /// Tick the drain started, while it runs.
    draining_since: Option<u64>,
    /// When a drain left with a persistent space next asks to unpersist it.
    unpersist_due_tick: u64,
    /// Released runs not yet free again, by (space, first page): (pages, the nodes
    /// that have dropped them). Their pages hold no live block: the ghost forgot them
    /// when the first node dropped them, and the coherence checker skips them until
    /// they are free (a node that has not dropped them yet still shows the old bytes).
    releasing_runs: BTreeMap<(SpaceId, u64), (u64, BTreeSet<usize>)>,
    /// Simulated mutexes of the current space (see `sync.rs`).
    locks: Vec<SimLock>,
    /// Membership changes the administrator wants, by node index: (add, next ask tick).
    membership_goals: BTreeMap<usize, (bool, u64)>,
    /// Which nodes were live when last looked at (`live_nodes` counts losses).
    was_live: Vec<bool>,
    /// Per sync in flight (by op id): what it covers (`Ghost::seen_by` at its start).
    /// The node whose process had the last sync answered.
    last_synced: Option<usize>,
    /// The run's next crash is of this node (the driver decides when).
    pub crash_next: Option<usize>,
    /// With the ghost's loss count then (its flushes come after).
    sync_covers: BTreeMap<u64, (u64, Vec<(PageId, u64)>)>,
    /// Futex waits that reached their host, by operation id.
    futex_waits: BTreeMap<u64, WaitRecord>,
    /// Answers waits are owed.
    wake_dues: Vec<WakeDue>,
    /// Per unlock's wake (operation id): the waits asleep when the unlock wrote.
    wakes_owed: BTreeMap<u64, Vec<u64>>,
    /// The simulated program (see `threads.rs`).
    launch: threads::Launch,
    program: Option<threads::SimProgram>,
    /// Spawned threads by record address.
    sim_threads: BTreeMap<u64, threads::SimThread>,
    /// Threads a serving process must run: (record, value) per (node, pid).
    thread_jobs: BTreeMap<(usize, i32), VecDeque<(u64, u64)>>,
    /// Worker starts heard before the launch's answer.
    early_workers: Vec<(usize, u64)>,
    /// Records of spaces destroyed since: a late run of one is dropped, and a new
    /// record at the same address is not used.
    stale_records: BTreeSet<u64>,
}

fn name_field() -> [u8; IPC_NAME_BYTES] {
    let mut field = [0u8; IPC_NAME_BYTES];
    field[..SPACE_NAME.len()].copy_from_slice(SPACE_NAME.as_bytes());
    field
}

/// Prints `what` node `index` did to `page` if it is the page watched
/// (GALLOCY_SIM_DEBUG_PAGE).
fn watch(
    debug_page: Option<u64>,
    now_ticks: u64,
    page: PageId,
    index: usize,
    what: std::fmt::Arguments<'_>,
) {
    if debug_page == Some(page.index) {
        eprintln!("[t={now_ticks}] node {} {what}", index + 1);
    }
}

fn encode(request_id: u64, message: IpcMessage) -> Frame {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    message.encode(request_id, &mut frame);
    frame
}

impl World {
    pub fn new(params: WorldParams, node_config: impl Fn(NodeId, Vec<NodeId>) -> Config) -> World {
        let (node_count, replicas) = (params.nodes, params.replicas);
        let everyone: Vec<NodeId> = (1..=params.nodes as NodeId).collect();
        let joiner = params.joiner.map(|index| index as NodeId + 1);
        // The first configuration: everyone but the joiner, who knows them all.
        let members: Vec<NodeId> = everyone
            .iter()
            .copied()
            .filter(|&id| Some(id) != joiner)
            .collect();
        let mut slots = Vec::new();
        for &id in &everyone {
            let known = if Some(id) == joiner {
                everyone.clone()
            } else {
                members.clone()
            };
            let mut config = node_config(id, known);
            config.mutant = params.mutant;
            let mut host_config = HostConfig::new(config);
            host_config.space_base_addr = SPACE_BASE_ADDR;
            host_config.space_size_bytes = SPACE_SIZE_BYTES;
            host_config.space_chunk_size_bytes = CHUNK_SIZE_BYTES;
            let host = if Some(id) == joiner {
                Host::join_cluster(host_config.clone())
            } else {
                Host::new(host_config.clone())
            }
            .expect("valid simulator configuration");
            slots.push(NodeSlot {
                host: Some(host),
                disk: SimDisk::default(),
                incarnation: host_config.node.incarnation,
                host_config,
                memory: BTreeMap::new(),
                processes: BTreeMap::new(),
                conns: BTreeMap::new(),
                next_conn: 1,
                space: None,
            });
        }
        World {
            rng: ChaCha8Rng::seed_from_u64(params.seed ^ 0x0067_616c_6c6f_6379),
            outbox: vec![Vec::new(); params.nodes],
            outbox_ready: (0..params.nodes)
                .map(|_| std::rc::Rc::new(tokio::sync::Notify::new()))
                .collect(),
            params,
            now_ticks: 0,
            step: 0,
            slots,
            scheduled: BTreeMap::new(),
            schedule_seq: 0,
            inbox: VecDeque::new(),
            ghost: Ghost::with_replicas(replicas as u64),
            live: BTreeMap::new(),
            published: Vec::new(),
            recently_freed: VecDeque::new(),
            freeing: BTreeMap::new(),
            limbo: BTreeSet::new(),
            next_op_id: 1,
            next_pid: 1000,
            dirty_pages: BTreeSet::new(),
            trace: TraceHash::new(),
            counters: Counters::default(),
            violation: None,
            issuing: true,
            debug: std::env::var_os("GALLOCY_SIM_DEBUG").is_some(),
            debug_page: std::env::var("GALLOCY_SIM_DEBUG_PAGE")
                .ok()
                .and_then(|v| v.parse().ok()),
            actions_buffer: Vec::new(),
            generation_space: None,
            drain_at_ops: None,
            draining_since: None,
            unpersist_due_tick: 0,
            releasing_runs: BTreeMap::new(),
            locks: Vec::new(),
            membership_goals: BTreeMap::new(),
            was_live: vec![true; node_count],
            sync_covers: BTreeMap::new(),
            last_synced: None,
            crash_next: None,
            futex_waits: BTreeMap::new(),
            wake_dues: Vec::new(),
            wakes_owed: BTreeMap::new(),
            launch: threads::Launch::NotYet,
            program: None,
            sim_threads: BTreeMap::new(),
            thread_jobs: BTreeMap::new(),
            early_workers: Vec::new(),
            stale_records: BTreeSet::new(),
        }
        .with_drain()
    }

    /// Half the runs end every process once, in the middle of the workload.
    fn with_drain(mut self) -> World {
        let ops = self.params.ops;
        if ops >= 8 && self.rng.gen_bool(0.5) {
            self.drain_at_ops = Some(self.rng.gen_range(ops / 4..ops * 3 / 4));
        }
        self
    }

    pub fn node(&self, index: usize) -> Option<&Node> {
        self.slots[index].host.as_ref().map(|h| h.node())
    }

    /// Node numbers (1-based) of running, non-evicted nodes whose repairs are not
    /// settled (`Node::repairs_settled`): after the final heal they must settle.
    pub fn repairs_unsettled(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&index| {
                self.node(index)
                    .is_some_and(|node| !node.is_evicted() && !node.repairs_settled())
            })
            .map(|index| index + 1)
            .collect()
    }

    pub fn is_alive(&self, index: usize) -> bool {
        self.slots[index].host.is_some()
    }

    /// Per node index: its host runs and no running node has it marked down (then
    /// its copies are void, or soon will be, like a crashed node's).
    fn live_nodes(&mut self) -> Vec<bool> {
        let mut live: Vec<bool> = self.slots.iter().map(|s| s.host.is_some()).collect();
        for slot in &self.slots {
            let Some(host) = &slot.host else {
                continue;
            };
            // Marked down or removed in its metadata (a node that is not a member yet,
            // or a metadata that knows none yet, marks nobody down).
            let meta = host.node().meta();
            for (index, up) in live.iter_mut().enumerate() {
                let node = index as NodeId + 1;
                *up &= meta.nodes.get(&node) != Some(&NodeStatus::Down)
                    && !meta.removed.contains(&node);
            }
        }
        // A node that stops being live loses its copies: one loss for the ghost.
        for (index, &now) in live.iter().enumerate() {
            if self.was_live[index] && !now {
                self.ghost.losses += 1;
            }
        }
        self.was_live.clone_from(&live);
        live
    }

    fn violate(&mut self, checker: &'static str, detail: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                checker,
                detail,
                step: self.step,
                tick: self.now_ticks,
            });
        }
    }

    fn schedule(&mut self, delay_ticks: u64, event: Scheduled) {
        self.schedule_seq += 1;
        self.scheduled
            .insert((self.now_ticks + delay_ticks, self.schedule_seq), event);
    }

    // -----------------------------------------------------------------------------
    // Driving hosts.

    pub fn crash(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.host = None;
        slot.disk.crash(&mut self.rng);
        slot.memory.clear();
        slot.processes.clear();
        slot.conns.clear();
        // Its copies are gone: one loss for the ghost, counted now.
        self.live_nodes();
        if self.debug {
            eprintln!("[t={}] node {} crashed", self.now_ticks, index + 1);
        }
        self.ghost.forget_observer(index);
        for lock in self.locks.iter_mut() {
            if lock.holder_index() == Some(index) {
                lock.holder_crashed = true;
            }
        }
        self.outbox[index].clear();
        self.scheduled.retain(|_, event| {
            !matches!(event,
                Scheduled::ApplyRevoke { node, .. }
                | Scheduled::ApplyGrant { node, .. }
                | Scheduled::Death { node, .. } if *node == index)
        });
        self.inbox.retain(|(node, _, _)| *node != index);
        self.trace.event(1, &[index as u64, self.now_ticks]);
    }

    /// Starts crashed node `index` again from its disk, as its next incarnation: it
    /// rejoins with its Raft log and none of its pages.
    pub fn restart(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        assert!(slot.host.is_none(), "restart of a running node");
        slot.incarnation += 1;
        let mut config = slot.host_config.clone();
        config.node.incarnation = slot.incarnation;
        let host = match Host::restart(config, slot.disk.read()) {
            Ok(host) => host,
            Err(error) => {
                return self.violate(
                    "restart",
                    format!(
                        "node {} could not restart from its disk: {error}",
                        index + 1
                    ),
                );
            }
        };
        slot.host = Some(host);
        self.counters.restarts += 1;
        if self.debug {
            eprintln!("[t={}] node {} restarted", self.now_ticks, index + 1);
        }
        self.trace.event(11, &[index as u64, self.now_ticks]);
        self.pump(index);
        self.settle();
    }

    /// A frame arrived at node `index` from the network.
    pub fn deliver(&mut self, index: usize, bytes: &[u8]) {
        let now = self.now_ticks;
        let Some(host) = self.slots[index].host.as_mut() else {
            return;
        };
        self.counters.frames_delivered += 1;
        self.trace.event(2, &[index as u64, now]);
        self.trace.bytes(bytes);
        // Malformed frames are counted inside the node; the run goes on.
        host.peer_datagram(now, bytes);
        self.pump(index);
        self.settle();
    }

    /// Whether any node has frames waiting to be sent.
    pub fn has_outbox(&self) -> bool {
        self.outbox.iter().any(|frames| !frames.is_empty())
    }

    pub fn take_outbox(&mut self, index: usize) -> Vec<(NodeId, Vec<u8>)> {
        if !self.outbox[index].is_empty() {
            self.slots[index].disk.frames_sent();
        }
        std::mem::take(&mut self.outbox[index])
    }

    /// Everything that happens at the start of a tick: host timers, due process
    /// events, processes starting and ending, threads issuing operations.
    pub fn tick(&mut self, now_ticks: u64) {
        self.now_ticks = now_ticks;
        for index in 0..self.slots.len() {
            if let Some(host) = self.slots[index].host.as_mut() {
                host.tick(now_ticks);
                self.pump(index);
            }
        }
        self.settle();
        self.run_scheduled();
        self.manage_membership();
        self.manage_processes();
        self.manage_program();
        self.start_early_workers();
        self.issue_unlocks();
        if self.issuing {
            self.issue_operations();
        }
        self.settle();
        self.check_wakes();
    }

    fn pump(&mut self, index: usize) {
        let mut actions = std::mem::take(&mut self.actions_buffer);
        if let Some(host) = self.slots[index].host.as_mut() {
            host.drain_actions(&mut actions);
        }
        for action in actions.drain(..) {
            self.apply_action(index, action);
        }
        self.actions_buffer = actions;
    }

    fn apply_action(&mut self, index: usize, action: HostAction) {
        match action {
            HostAction::PersistRaft(write) => self.slots[index].disk.write(write),
            HostAction::SendPeer(envelope) => {
                self.counters.frames_sent += 1;
                if self.outbox[index].is_empty() {
                    self.outbox_ready[index].notify_one();
                }
                self.outbox[index].push((envelope.to, envelope.encode()));
            }
            HostAction::SendApp { conn, frame } => {
                match IpcMessage::decode(&frame) {
                    Ok((_, IpcMessage::RunThread { record_addr, .. })) => {
                        // Recorded as it leaves the host: the spawner's answer cannot
                        // be earlier than this.
                        self.on_run_thread(index, conn, record_addr)
                    }
                    _ => self.inbox.push_back((index, conn, frame)),
                }
            }
            HostAction::Welcome { conn, frame, .. } => self.inbox.push_back((index, conn, frame)),
            HostAction::Status { .. } | HostAction::SessionEnded { .. } => {}
            HostAction::SendAppData { conn, frame, data } => {
                if self.is_launcher(index, conn) {
                    self.on_launcher_data(&frame, &data);
                }
                self.inbox.push_back((index, conn, frame));
            }
            HostAction::StartWorker { program, .. } => self.on_start_worker(index, program),
            // The simulated program is never stopped.
            HostAction::StopWorker { .. } => {}
            HostAction::DropSpace { space } => self.on_drop_space(index, space),
            HostAction::DropPages {
                space,
                first_page,
                pages,
                token,
            } => self.on_drop_pages(index, space, first_page, pages, token),
            HostAction::CloseApp { conn, why } => {
                if self.debug {
                    eprintln!(
                        "[t={}] node {} closes connection {conn}: {why}",
                        self.now_ticks,
                        index + 1
                    );
                }
                self.closed_by_host(index, conn)
            }
            HostAction::WritePage { page, bytes } => {
                self.trace.event(3, &[index as u64, page.index]);
                watch(
                    self.debug_page,
                    self.now_ticks,
                    page,
                    index,
                    format_args!("writes page bytes"),
                );
                // No process of this node may write a page while it is being installed.
                if let Some((pid, access)) = self.slots[index]
                    .processes
                    .values()
                    .map(|p| (p.pid, p.access.get(&page).copied().unwrap_or(Access::None)))
                    .find(|&(_, a)| a == Access::Write)
                {
                    self.violate(
                        "coherence",
                        format!(
                            "node {} installs page {} while its process {pid} has {access:?} access",
                            index + 1,
                            page.index
                        ),
                    );
                }
                self.slots[index].memory.insert(page, bytes);
                self.dirty_pages.insert(page);
            }
            HostAction::FinishRevoke {
                token,
                page,
                want_bytes,
            } => {
                let bytes = want_bytes.then(|| {
                    self.slots[index]
                        .memory
                        .get(&page)
                        .cloned()
                        .unwrap_or_else(|| Box::new([0u8; PAGE_SIZE_BYTES]))
                });
                self.trace.event(4, &[index as u64, page.index]);
                watch(
                    self.debug_page,
                    self.now_ticks,
                    page,
                    index,
                    format_args!("revocation {token} done"),
                );
                let now = self.now_ticks;
                if let Some(host) = self.slots[index].host.as_mut() {
                    host.revoke_finished(now, token, bytes);
                }
                self.pump(index);
            }
            HostAction::Probe { session, pid } => {
                let state = match self.slots[index].processes.get(&pid) {
                    None => ProcessState::Exited,
                    Some(_) => ProcessState::Mapped,
                };
                let now = self.now_ticks;
                if let Some(host) = self.slots[index].host.as_mut() {
                    host.process_state(now, session, state);
                }
                self.pump(index);
            }
            HostAction::Kill { session, pid, .. } => {
                self.counters.processes_killed += 1;
                self.trace.event(11, &[index as u64, pid as u64]);
                match self.slots[index].processes.get_mut(&pid) {
                    // A killed process runs on for a moment before it is gone.
                    Some(process) => {
                        process.phase = ProcPhase::Dying;
                        let delay = self.rng.gen_range(0..20);
                        self.schedule(delay, Scheduled::Death { node: index, pid });
                    }
                    None => {
                        let now = self.now_ticks;
                        if let Some(host) = self.slots[index].host.as_mut() {
                            host.process_state(now, session, ProcessState::Exited);
                        }
                        self.pump(index);
                    }
                }
            }
        }
    }

    /// The host says space `space` is destroyed and unmapped here: its memory goes.
    fn on_drop_space(&mut self, index: usize, space: SpaceId) {
        self.counters.spaces_dropped += 1;
        self.trace.event(15, &[index as u64, space as u64]);
        if self.debug {
            eprintln!(
                "[t={}] node {} drops space {space}",
                self.now_ticks,
                index + 1
            );
        }
        let slot = &mut self.slots[index];
        slot.memory.retain(|page, _| page.space != space);
        let holder = slot.processes.values().find(|p| {
            p.access
                .iter()
                .any(|(page, &a)| page.space == space && a != Access::None)
        });
        if let Some(process) = holder {
            let detail = format!(
                "node {} drops space {space} while its process {} can still access it",
                index + 1,
                process.pid
            );
            return self.violate("space lifetime", detail);
        }
        if let Some(host) = slot.host.as_ref() {
            if host.node().holds_space(space) {
                let detail = format!("node {} keeps state of destroyed space {space}", index + 1);
                self.violate("space lifetime", detail);
            }
        }
    }

    /// Node `index` zeroes its memory of a released run: none of its processes may
    /// still access a page of it.
    fn on_drop_pages(
        &mut self,
        index: usize,
        space: SpaceId,
        first_page: u64,
        pages: u64,
        token: u64,
    ) {
        self.trace.event(16, &[index as u64, first_page, pages]);
        if self.debug {
            eprintln!(
                "[t={}] node {} drops released pages {first_page}+{pages} of space {space}",
                self.now_ticks,
                index + 1
            );
        }
        let range = PageId {
            space,
            index: first_page,
        }..PageId {
            space,
            index: first_page + pages,
        };
        let holder = self.slots[index].processes.values().find_map(|p| {
            p.access
                .range(range.clone())
                .find(|(_, &a)| a != Access::None)
                .map(|(page, &a)| (p.pid, page.index, a))
        });
        if let Some((pid, page, access)) = holder {
            let detail = format!(
                "node {} zeroes released page {page} while its process {pid} has {access:?} access",
                index + 1
            );
            return self.violate("coherence", detail);
        }
        self.slots[index]
            .memory
            .retain(|page, _| !range.contains(page));
        // A node declared down may apply the release after the run was freed without
        // it (and leased again): its drop says nothing about the ghost.
        // So may a restarted node replaying its log before it rejoined.
        let evicted = self.slots[index]
            .host
            .as_ref()
            .is_none_or(|h| h.node().is_evicted() || h.node().is_rejoining());
        if evicted {
            let now = self.now_ticks;
            if let Some(host) = self.slots[index].host.as_mut() {
                host.pages_dropped(now, token);
            }
            return self.pump(index);
        }
        let run = self
            .releasing_runs
            .entry((space, first_page))
            .or_insert_with(|| (pages, BTreeSet::new()));
        if run.1.is_empty() {
            self.counters.runs_released += 1;
            self.ghost.retain(|page| !range.contains(page));
        }
        run.1.insert(index);
        let now = self.now_ticks;
        if let Some(host) = self.slots[index].host.as_mut() {
            host.pages_dropped(now, token);
        }
        self.pump(index);
    }

    /// Released runs that are free again (on a node that had dropped them, so in the
    /// log after every node did): the coherence checker covers their pages again.
    fn track_releases(&mut self) {
        let mut freed = Vec::new();
        for (&(space, first_page), (_, seen_by)) in &self.releasing_runs {
            let done = seen_by.iter().any(|&i| {
                // A restarted node's metadata is its disk's until it rejoined: behind.
                self.slots[i].host.as_ref().is_some_and(|h| {
                    let meta = h.node().meta();
                    if !h.node().is_serving() {
                        return false;
                    }
                    match meta.spaces.get(&space) {
                        None => true,
                        Some(layout) => {
                            let chunk = layout.chunk_of_page(first_page);
                            meta.releasing_run(space, chunk).is_none()
                        }
                    }
                })
            });
            if done {
                freed.push((space, first_page));
            }
        }
        for key in freed {
            self.releasing_runs.remove(&key);
            self.counters.runs_freed += 1;
        }
    }

    fn is_releasing(&self, page: PageId) -> bool {
        self.releasing_runs
            .range(..=(page.space, page.index))
            .next_back()
            .is_some_and(|(&(space, first), &(pages, _))| {
                space == page.space && page.index < first + pages
            })
    }

    /// A process was welcomed into `space`. A space other than the current one means
    /// the old one was destroyed, which only a cluster with no process left in it may
    /// do: the ghost starts over with the new space.
    fn enter_space(&mut self, space: SpaceId) {
        let Some(old) = self.generation_space else {
            self.generation_space = Some(space);
            return;
        };
        if old == space {
            return;
        }
        self.counters.new_spaces += 1;
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(host) = slot.host.as_ref() else {
                continue;
            };
            // A node declared down leaves every attach set while its processes live on
            // (fenced, holding nothing) until it kills them.
            if host.node().is_evicted() {
                continue;
            }
            let attached = slot.processes.values().find(|p| {
                p.space == Some(old)
                    && (p.phase == ProcPhase::Live
                        || p.access
                            .iter()
                            .any(|(page, &a)| page.space == old && a != Access::None))
            });
            if let Some(process) = attached {
                let detail = format!(
                    "space {old} was replaced by space {space} while process {} on node {} is attached to it",
                    process.pid,
                    index + 1
                );
                return self.violate("space lifetime", detail);
            }
        }
        self.generation_space = Some(space);
        for slot in &mut self.slots {
            slot.space = None;
        }
        self.ghost.retain(|page| page.space != old);
        self.dirty_pages.retain(|page| page.space != old);
        self.live.clear();
        self.published.clear();
        self.freeing.clear();
        self.limbo.clear();
        self.recently_freed.clear();
        self.locks.clear();
        // Records were blocks of the old space: spawns of them may still arrive.
        let stale: Vec<u64> = self.sim_threads.keys().copied().collect();
        self.stale_records.extend(stale);
        self.sim_threads.clear();
        self.thread_jobs.clear();
        self.futex_waits.clear();
        self.wake_dues.clear();
        self.wakes_owed.clear();
    }

    /// The host closed `conn`.
    fn closed_by_host(&mut self, index: usize, conn: ConnId) {
        let Some((pid, _)) = self.slots[index].conns.remove(&conn) else {
            return;
        };
        let Some(process) = self.slots[index].processes.get(&pid) else {
            return;
        };
        match process.phase {
            ProcPhase::Dying | ProcPhase::Hostile => {}
            // The runtime exits when the daemon closes one of its connections.
            _ => self.process_exits(index, pid, "connection closed by the daemon"),
        }
    }

    // -----------------------------------------------------------------------------
    // Processes.

    fn send(&mut self, index: usize, conn: ConnId, request_id: u64, message: IpcMessage) {
        let frame = encode(request_id, message);
        let now = self.now_ticks;
        let slot = &mut self.slots[index];
        if let Some(host) = slot.host.as_mut() {
            host.app_frame(now, conn, &frame, &slot.memory);
            self.pump(index);
        }
    }

    fn open_conn(&mut self, index: usize, pid: i32, kind: ConnKind) -> ConnId {
        let slot = &mut self.slots[index];
        let conn = slot.next_conn;
        slot.next_conn += 1;
        slot.conns.insert(conn, (pid, kind));
        let now = self.now_ticks;
        if let Some(host) = slot.host.as_mut() {
            host.app_connected(
                now,
                conn,
                Credentials {
                    pid,
                    uid: 0,
                    gid: 0,
                },
            );
            self.pump(index);
        }
        conn
    }

    fn start_process(&mut self, index: usize) {
        let pid = self.next_pid;
        self.next_pid += 1;
        self.counters.processes_started += 1;
        self.trace.event(12, &[index as u64, pid as u64]);
        let stalled = self.rng.gen_ratio(1, 12);
        let max_grant_delay_ticks = if self.rng.gen_bool(0.5) {
            0
        } else {
            self.rng.gen_range(0..=6)
        };
        // One process in six is slow to give pages back (a busy service thread), but
        // within the revocation timeout: it is not killed, others wait for it.
        let slow_revoke_ticks = self.slots[index]
            .host
            .as_ref()
            .map_or(0, |h| h.config().node.revoke_timeout_ticks / 2);
        let max_revoke_delay_ticks = if self.rng.gen_ratio(1, 6) {
            slow_revoke_ticks
        } else {
            self.params.max_revoke_delay_ticks
        };
        let process = Process {
            pid,
            main: 0,
            service: None,
            session: None,
            threads: Vec::new(),
            phase: ProcPhase::Joining,
            access: BTreeMap::new(),
            max_revoke_delay_ticks,
            stalled,
            max_grant_delay_ticks,
            service_free_tick: 0,
            revokes_queued: 0,
            space: None,
        };
        self.slots[index].processes.insert(pid, process);
        let main = self.open_conn(index, pid, ConnKind::Main);
        if let Some(p) = self.slots[index].processes.get_mut(&pid) {
            p.main = main;
        }
        // Some creators ask for a persistent space (it outlives a drain until an
        // administrator unpersists it); the flag only matters to the hello that creates.
        let persistent = self.rng.gen_ratio(1, 6);
        if persistent {
            self.counters.persistent_creates += 1;
        }
        self.send(
            index,
            main,
            1,
            IpcMessage::Hello {
                role: Role::Main,
                session: 0,
                pid: pid as u32,
                create: true,
                persistent,
                replicas: self.params.replicas,
                name: name_field(),
            },
        );
    }

    /// The process ends now: its memory mapping goes with it, then its connections
    /// close. Its threads' operations never complete.
    fn process_exits(&mut self, index: usize, pid: i32, why: &str) {
        let Some(process) = self.slots[index].processes.remove(&pid) else {
            return;
        };
        self.counters.processes_exited += 1;
        self.trace.event(13, &[index as u64, pid as u64]);
        if self.debug {
            eprintln!(
                "[t={}] node {} process {pid} exits: {why}",
                self.now_ticks,
                index + 1
            );
        }
        for page in process.access.keys() {
            self.dirty_pages.insert(*page);
        }
        self.forget_ops(&process);
        self.scheduled.retain(|_, event| {
            !matches!(event,
                Scheduled::ApplyRevoke { node, pid: p, .. }
                | Scheduled::ApplyGrant { node, pid: p, .. }
                | Scheduled::Death { node, pid: p } if *node == index && *p == pid)
        });
        let conns: Vec<ConnId> = self.slots[index]
            .conns
            .iter()
            .filter(|(_, (p, _))| *p == pid)
            .map(|(&c, _)| c)
            .collect();
        let now = self.now_ticks;
        for conn in conns {
            self.slots[index].conns.remove(&conn);
            if let Some(host) = self.slots[index].host.as_mut() {
                host.app_closed(now, conn);
            }
            self.pump(index);
        }
        // A killed process's host is waiting to hear it has exited.
        if let (Some(session), Some(host)) = (process.session, self.slots[index].host.as_mut()) {
            host.process_state(now, session, ProcessState::Exited);
            self.pump(index);
        }
        self.settle();
    }

    /// The operations of a process that died have unknown outcomes: a free may have
    /// happened, and an allocation may have taken a recently freed block (which a
    /// double free would then free for real).
    fn forget_ops(&mut self, process: &Process) {
        for thread in &process.threads {
            if let Some(op) = thread.pending {
                self.sync_covers.remove(&op.id);
                if let Some((addr, _, _)) = self.freeing.remove(&op.id) {
                    self.limbo.insert(addr);
                }
                if let OpKind::Allocate { .. } = op.kind {
                    self.recently_freed.clear();
                }
                self.wakes_owed.remove(&op.id);
            }
        }
    }

    /// Starts processes where few are attached, and ends some at random. Once in some
    /// runs, ends every process of the cluster so that the space is destroyed, then lets
    /// new ones start (and create it again).
    fn manage_processes(&mut self) {
        if self
            .drain_at_ops
            .is_some_and(|at| self.counters.ops_issued >= at)
        {
            self.drain_at_ops = None;
            self.draining_since = Some(self.now_ticks);
            self.counters.drains += 1;
        }
        if let Some(since) = self.draining_since {
            self.drain_step(since);
            return;
        }
        // Now and then an administrator unpersists the space while processes use it:
        // it must stay until the last one has gone.
        if self.issuing && self.rng.gen_ratio(1, 20_000) {
            self.unpersist();
        }
        for index in 0..self.slots.len() {
            if self.slots[index].host.is_none() {
                continue;
            }
            let running = self.slots[index].processes.len();
            if running < MIN_PROCESSES_PER_NODE
                || (running < MAX_PROCESSES_PER_NODE && self.issuing && self.rng.gen_ratio(1, 4000))
            {
                self.start_process(index);
            }
            if !self.issuing {
                continue;
            }
            let pids: Vec<i32> = self.slots[index].processes.keys().copied().collect();
            for pid in pids {
                if !self.rng.gen_ratio(END_PER_100K_TICKS, 100_000) {
                    continue;
                }
                let Some(process) = self.slots[index].processes.get(&pid) else {
                    continue;
                };
                if process.phase != ProcPhase::Live {
                    continue;
                }
                let main = process.main;
                match self.rng.gen_range(0..10) {
                    0..=3 => {
                        // A clean detach: the host revokes everything first.
                        self.counters.detaches += 1;
                        self.slots[index]
                            .processes
                            .get_mut(&pid)
                            .expect("listed")
                            .phase = ProcPhase::Detaching;
                        let id = self.next_op_id;
                        self.next_op_id += 1;
                        self.send(index, main, id, IpcMessage::Detach);
                    }
                    4..=7 => self.process_exits(index, pid, "exit"),
                    _ => {
                        // Closes its Main connection and goes on touching what it has.
                        self.trace.event(14, &[index as u64, pid as u64]);
                        // Its requests in flight will never be answered.
                        let process = self.slots[index].processes[&pid].clone();
                        self.forget_ops(&process);
                        let process = self.slots[index].processes.get_mut(&pid).expect("listed");
                        process.phase = ProcPhase::Hostile;
                        for thread in &mut process.threads {
                            thread.pending = None;
                        }
                        self.slots[index].conns.remove(&main);
                        let now = self.now_ticks;
                        if let Some(host) = self.slots[index].host.as_mut() {
                            host.app_closed(now, main);
                        }
                        self.pump(index);
                    }
                }
                self.settle();
            }
        }
    }

    /// The node whose process had a sync answered since the last call (a crash there
    /// tests that synced writes are elsewhere too).
    pub fn take_synced_node(&mut self) -> Option<usize> {
        self.last_synced.take()
    }

    /// The administrator wants node `index` added (`add`) or removed for good: asked
    /// of a random serving member now and again until every serving node applied it.
    pub fn request_membership(&mut self, index: usize, add: bool) {
        self.membership_goals.insert(index, (add, self.now_ticks));
        self.trace.event(23, &[index as u64, add as u64]);
    }

    fn manage_membership(&mut self) {
        let goals: Vec<(usize, bool, u64)> = self
            .membership_goals
            .iter()
            .map(|(&index, &(add, due))| (index, add, due))
            .collect();
        for (index, add, due) in goals {
            let node = index as NodeId + 1;
            let serving: Vec<usize> = (0..self.slots.len())
                .filter(|&i| {
                    self.slots[i]
                        .host
                        .as_ref()
                        .is_some_and(|h| h.node().is_serving() && !h.node().is_evicted())
                })
                .collect();
            let applied = !serving.is_empty()
                && serving.iter().all(|&i| {
                    let meta = self.slots[i].host.as_ref().expect("serving").node().meta();
                    // A removal is done once it is no member (removed, or never added).
                    meta.nodes.contains_key(&node) == add
                });
            if applied {
                self.membership_goals.remove(&index);
                if add {
                    self.counters.members_added += 1;
                } else {
                    self.counters.members_removed += 1;
                }
                if self.debug {
                    eprintln!(
                        "[t={}] node {node} {} on every serving node",
                        self.now_ticks,
                        if add { "added" } else { "removed" }
                    );
                }
                continue;
            }
            let candidates: Vec<usize> = serving.into_iter().filter(|&i| i != index).collect();
            if due > self.now_ticks || candidates.is_empty() {
                continue;
            }
            self.membership_goals
                .insert(index, (add, self.now_ticks + MEMBERSHIP_RETRY_TICKS));
            let via = candidates[self.rng.gen_range(0..candidates.len())];
            let message = if add {
                IpcMessage::AddMember { node }
            } else {
                IpcMessage::RemoveMember { node }
            };
            // Not awaited: the goal is checked on the nodes' metadata.
            let conn = self.open_conn(via, 0, ConnKind::Admin);
            self.send(via, conn, 1, IpcMessage::admin_hello(0));
            self.send(via, conn, 2, message);
            self.slots[via].conns.remove(&conn);
            let now = self.now_ticks;
            if let Some(host) = self.slots[via].host.as_mut() {
                host.app_closed(now, conn);
                self.pump(via);
            }
        }
    }

    /// An administrator asks a random serving node to keep the space no longer (it
    /// must then end with its last process, and never while one is attached: the
    /// space-lifetime checker). The reply is not awaited.
    fn unpersist(&mut self) {
        let serving: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].host.is_some())
            .collect();
        if serving.is_empty() {
            return;
        }
        let index = serving[self.rng.gen_range(0..serving.len())];
        self.counters.unpersists += 1;
        self.trace.event(17, &[index as u64]);
        let conn = self.open_conn(index, 0, ConnKind::Admin);
        self.send(index, conn, 1, IpcMessage::admin_hello(0));
        self.send(index, conn, 2, IpcMessage::Unpersist { name: name_field() });
        self.slots[index].conns.remove(&conn);
        let now = self.now_ticks;
        if let Some(host) = self.slots[index].host.as_mut() {
            host.app_closed(now, conn);
            self.pump(index);
        }
    }

    /// Ends every live process (a detach or an exit); the drain is over once none is
    /// left and the space is gone from every node still serving (or after a bound).
    fn drain_step(&mut self, since: u64) {
        for index in 0..self.slots.len() {
            let pids: Vec<i32> = self.slots[index]
                .processes
                .iter()
                .filter(|(_, p)| p.phase == ProcPhase::Live)
                .map(|(&pid, _)| pid)
                .collect();
            // Detaches first, some of them slow to give pages back (but within the
            // revocation timeout), then exits: the node's last exit then comes while
            // processes of the space are still detaching.
            let (detachers, leavers): (Vec<i32>, Vec<i32>) =
                pids.into_iter().partition(|_| self.rng.gen_bool(0.4));
            let Some(revoke_timeout_ticks) = self.slots[index]
                .host
                .as_ref()
                .map(|h| h.config().node.revoke_timeout_ticks)
            else {
                continue;
            };
            let slow_revoke_ticks = revoke_timeout_ticks / 2;
            for pid in detachers {
                self.counters.detaches += 1;
                let slow = self.rng.gen_bool(0.5);
                let process = self.slots[index].processes.get_mut(&pid).expect("listed");
                process.phase = ProcPhase::Detaching;
                if slow {
                    process.max_revoke_delay_ticks = slow_revoke_ticks;
                }
                let main = process.main;
                let id = self.next_op_id;
                self.next_op_id += 1;
                self.send(index, main, id, IpcMessage::Detach);
                self.settle();
            }
            for pid in leavers {
                self.process_exits(index, pid, "drain");
                self.settle();
            }
        }
        let processes_left = self.slots.iter().any(|s| !s.processes.is_empty());
        let space_left = self.slots.iter().any(|s| {
            s.host.as_ref().is_some_and(|h| {
                !h.node().is_evicted() && h.node().meta().space_by_name(SPACE_NAME).is_some()
            })
        });
        // A persistent space outlives its processes: an administrator ends it (asked
        // again now and then: the request may meet no leader, or a lost proposal).
        if !processes_left && space_left && self.now_ticks >= self.unpersist_due_tick {
            self.unpersist_due_tick = self.now_ticks + UNPERSIST_RETRY_TICKS;
            self.unpersist();
        }
        if !processes_left && (!space_left || self.now_ticks >= since + DRAIN_WAIT_TICKS) {
            self.draining_since = None;
        }
    }

    fn run_scheduled(&mut self) {
        loop {
            let Some((&key, _)) = self.scheduled.iter().next() else {
                return;
            };
            if key.0 > self.now_ticks {
                return;
            }
            let event = self.scheduled.remove(&key).expect("present");
            match event {
                Scheduled::ApplyRevoke {
                    node,
                    pid,
                    addr,
                    len,
                    access,
                    token,
                } => {
                    if let Some(p) = self.slots[node].processes.get_mut(&pid) {
                        p.revokes_queued -= 1;
                    }
                    self.apply_revoke(node, pid, addr, len, access, token)
                }
                Scheduled::ApplyGrant {
                    node,
                    pid,
                    thread,
                    page_addr,
                    pages,
                    write,
                    op_id,
                } => self.apply_grant(node, pid, thread, page_addr, pages, write, op_id),
                Scheduled::Death { node, pid } => self.process_exits(node, pid, "killed"),
                Scheduled::SendFutexWait {
                    node,
                    pid,
                    thread,
                    op_id,
                } => self.send_wait(node, pid, thread, op_id),
            }
            self.settle();
        }
    }

    fn pages_of(&self, index: usize, addr: u64, len: u64) -> Vec<PageId> {
        let Some(layout) = self.slots[index].space.as_ref() else {
            return Vec::new();
        };
        let pages = len.div_ceil(PAGE_SIZE_BYTES as u64);
        (0..pages)
            .filter_map(|i| layout.page_of(addr + i * PAGE_SIZE_BYTES as u64))
            .collect()
    }

    fn apply_revoke(
        &mut self,
        index: usize,
        pid: i32,
        addr: u64,
        len: u64,
        access: Access,
        token: u64,
    ) {
        let pages = self.pages_of(index, addr, len);
        let Some(process) = self.slots[index].processes.get_mut(&pid) else {
            return;
        };
        // mprotect sets the protection: what is left is exactly `access`.
        for page in &pages {
            if access == Access::None {
                process.access.remove(page);
            } else {
                process.access.insert(*page, access);
            }
            watch(
                self.debug_page,
                self.now_ticks,
                *page,
                index,
                format_args!("process {pid} revoked to {access:?}"),
            );
        }
        let service = process.service;
        let alive = process.phase != ProcPhase::Dying;
        for page in pages {
            self.dirty_pages.insert(page);
        }
        self.counters.revokes += 1;
        self.trace
            .event(15, &[index as u64, pid as u64, addr, access as u64]);
        if let (Some(service), true) = (service, alive) {
            if self.slots[index].conns.contains_key(&service) {
                self.send(index, service, 0, IpcMessage::RevokeDone { token });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_grant(
        &mut self,
        index: usize,
        pid: i32,
        thread: usize,
        page_addr: u64,
        pages: u32,
        write: bool,
        op_id: u64,
    ) {
        let page_list = self.pages_of(index, page_addr, pages as u64 * PAGE_SIZE_BYTES as u64);
        let Some(process) = self.slots[index].processes.get_mut(&pid) else {
            return;
        };
        let access = if write { Access::Write } else { Access::Read };
        for page in &page_list {
            process.access.insert(*page, access);
            watch(
                self.debug_page,
                self.now_ticks,
                *page,
                index,
                format_args!("process {pid} granted {access:?}"),
            );
        }
        let conn = process.threads[thread].conn;
        for page in page_list {
            self.dirty_pages.insert(page);
        }
        self.trace
            .event(16, &[index as u64, pid as u64, page_addr, access as u64]);
        if self.slots[index].conns.contains_key(&conn) {
            self.send(
                index,
                conn,
                0,
                IpcMessage::GrantApplied { page_addr, pages },
            );
        }
        // The faulting instruction runs again.
        let pending = self.slots[index]
            .processes
            .get(&pid)
            .and_then(|p| p.threads[thread].pending);
        if let Some(op) = pending.filter(|op| op.id == op_id) {
            self.access(index, pid, thread, op, true);
        }
    }

    // -----------------------------------------------------------------------------
    // Frames from hosts to processes.

    fn settle(&mut self) {
        let mut steps = 0;
        while let Some((index, conn, frame)) = self.inbox.pop_front() {
            steps += 1;
            if steps > MAX_SETTLE_STEPS {
                self.inbox.clear();
                self.violate(
                    "liveness",
                    "replies and faults cycle without progress (a grant the memory does not show)"
                        .into(),
                );
                return;
            }
            self.on_frame(index, conn, &frame);
        }
    }

    fn on_frame(&mut self, index: usize, conn: ConnId, frame: &Frame) {
        let Some(&(pid, kind)) = self.slots[index].conns.get(&conn) else {
            return;
        };
        let Ok((request_id, message)) = IpcMessage::decode(frame) else {
            self.violate(
                "protocol",
                format!("node {} sent an undecodable frame", index + 1),
            );
            return;
        };
        if self.debug {
            eprintln!(
                "[t={} node {}] to process {pid} {kind:?}: {message:?} (request {request_id})",
                self.now_ticks,
                index + 1
            );
        }
        if matches!(kind, ConnKind::Launcher | ConnKind::Serve) {
            return self.on_program_frame(index, conn, kind, message);
        }
        let Some(process) = self.slots[index].processes.get(&pid) else {
            return;
        };
        let phase = process.phase;
        match (kind, message) {
            (ConnKind::Main, IpcMessage::Welcome { session, space, .. }) => {
                self.on_welcome(index, pid, session, space);
            }
            (ConnKind::Main, IpcMessage::Error { code, .. }) if phase == ProcPhase::Joining => {
                // Not yet joinable (no leader, a fenced node): try again later.
                let _ = code;
                self.process_exits(index, pid, "attach refused");
            }
            (ConnKind::Main, IpcMessage::Pong) if phase == ProcPhase::Detaching => {
                let held: Vec<(PageId, Access)> = process
                    .access
                    .iter()
                    .filter(|(_, &a)| a != Access::None)
                    .map(|(&p, &a)| (p, a))
                    .collect();
                if let Some((page, access)) = held.first() {
                    self.violate(
                        "coherence",
                        format!(
                            "node {} answered a detach while process {pid} still had {access:?} on page {}",
                            index + 1,
                            page.index
                        ),
                    );
                }
                self.process_exits(index, pid, "detached");
            }
            (ConnKind::Service, IpcMessage::Pong) => {}
            (
                ConnKind::Service,
                IpcMessage::Revoke {
                    addr,
                    len,
                    access,
                    token,
                },
            ) => {
                let Some(access) = Access::from_u8(access) else {
                    self.violate("protocol", format!("revocation to access {access}"));
                    return;
                };
                let delay = if process.stalled {
                    STALL_TICKS
                } else if process.max_revoke_delay_ticks == 0 {
                    0
                } else {
                    self.rng.gen_range(0..=process.max_revoke_delay_ticks)
                };
                // In order: not before the revocations received earlier.
                let due = (self.now_ticks + delay).max(process.service_free_tick);
                let delay = due - self.now_ticks;
                let queued = process.revokes_queued;
                if let Some(p) = self.slots[index].processes.get_mut(&pid) {
                    p.service_free_tick = due;
                    if delay > 0 || queued > 0 {
                        p.revokes_queued += 1;
                    }
                }
                let event = Scheduled::ApplyRevoke {
                    node: index,
                    pid,
                    addr,
                    len,
                    access,
                    token,
                };
                if delay == 0 && queued == 0 {
                    self.apply_revoke(index, pid, addr, len, access, token);
                } else {
                    self.schedule(delay, event);
                }
            }
            (ConnKind::Thread(thread), IpcMessage::Pong) => {
                if let Some(p) = self.slots[index].processes.get_mut(&pid) {
                    p.threads[thread].ready = true;
                }
            }
            (ConnKind::Thread(thread), reply) => {
                self.on_reply(index, pid, thread, request_id, reply)
            }
            (kind, message) => self.violate(
                "protocol",
                format!(
                    "node {} sent {message:?} on a {kind:?} connection",
                    index + 1
                ),
            ),
        }
    }

    fn on_welcome(&mut self, index: usize, pid: i32, session: SessionId, space: SpaceId) {
        self.enter_space(space);
        if self.slots[index].space.is_none() {
            let layout = self.slots[index]
                .host
                .as_ref()
                .and_then(|h| h.node().meta().spaces.get(&space).cloned());
            if layout.is_none() {
                let detail = format!(
                    "node {} welcomed a process into unknown space {space}",
                    index + 1
                );
                return self.violate("protocol", detail);
            }
            self.slots[index].space = layout;
        }
        let threads = self.params.threads_per_process;
        if let Some(process) = self.slots[index].processes.get_mut(&pid) {
            process.session = Some(session);
            process.phase = ProcPhase::Live;
            process.space = Some(space);
        }
        let service = self.open_conn(index, pid, ConnKind::Service);
        if let Some(process) = self.slots[index].processes.get_mut(&pid) {
            process.service = Some(service);
        }
        self.send(
            index,
            service,
            2,
            IpcMessage::Hello {
                role: Role::Service,
                session,
                pid: pid as u32,
                create: false,
                persistent: false,
                replicas: self.params.replicas,
                name: [0u8; IPC_NAME_BYTES],
            },
        );
        for thread in 0..threads {
            let conn = self.open_conn(index, pid, ConnKind::Thread(thread));
            let Some(process) = self.slots[index].processes.get_mut(&pid) else {
                return;
            };
            process.threads.push(Thread {
                conn,
                ready: false,
                pending: None,
                next_op_tick: 0,
                sync: None,
                join: None,
                spawn_next: None,
                cond_wait: None,
            });
            self.send(
                index,
                conn,
                3,
                IpcMessage::Hello {
                    role: Role::Thread,
                    session,
                    pid: pid as u32,
                    create: false,
                    persistent: false,
                    replicas: self.params.replicas,
                    name: [0u8; IPC_NAME_BYTES],
                },
            );
        }
    }

    // -----------------------------------------------------------------------------
    // Operations.

    fn issue_operations(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].host.is_none() || self.slots[index].space.is_none() {
                continue;
            }
            let pids: Vec<i32> = self.slots[index].processes.keys().copied().collect();
            for pid in pids {
                let threads = self.slots[index]
                    .processes
                    .get(&pid)
                    .map_or(0, |p| p.threads.len());
                for thread in 0..threads {
                    if self.counters.ops_issued >= self.params.ops {
                        return;
                    }
                    let Some(process) = self.slots[index].processes.get(&pid) else {
                        break;
                    };
                    let state = &process.threads[thread];
                    let can = match process.phase {
                        ProcPhase::Live => state.ready,
                        // Without its connection only what it holds is reachable.
                        ProcPhase::Hostile | ProcPhase::Dying => true,
                        ProcPhase::Joining | ProcPhase::Detaching => false,
                    };
                    if !can || state.pending.is_some() || state.next_op_tick > self.now_ticks {
                        continue;
                    }
                    self.issue_one(index, pid, thread);
                    self.settle();
                }
            }
        }
    }

    fn new_op(&mut self, index: usize, pid: i32, thread: usize, kind: OpKind) -> PendingOp {
        let op = PendingOp {
            kind,
            id: self.next_op_id,
            issued_tick: self.now_ticks,
        };
        self.next_op_id += 1;
        if let Some(process) = self.slots[index].processes.get_mut(&pid) {
            process.threads[thread].pending = Some(op);
        }
        op
    }

    fn issue_one(&mut self, index: usize, pid: i32, thread: usize) {
        let phase = self.slots[index].processes[&pid].phase;
        let conn = self.slots[index].processes[&pid].threads[thread].conn;
        let Some(layout) = self.slots[index].space.clone() else {
            return;
        };
        let connected = phase == ProcPhase::Live;
        let roll: u32 = self.rng.gen_range(0..100);
        let have_blocks = !self.published.is_empty();
        if !connected {
            // A process without its daemon touches only pages it can already access.
            if !have_blocks {
                return;
            }
            let addr = self.pick_word();
            let Some(page) = layout.page_of(addr) else {
                return;
            };
            let have = self.slots[index].processes[&pid]
                .access
                .get(&page)
                .copied()
                .unwrap_or(Access::None);
            let kind = match have {
                Access::Write if self.rng.gen_bool(0.5) => OpKind::Write {
                    addr,
                    value: (self.counters.ops_issued << 8) | (index as u64 + 1),
                },
                Access::None => return,
                _ => OpKind::Read { addr },
            };
            self.counters.ops_issued += 1;
            let op = self.new_op(index, pid, thread, kind);
            self.access(index, pid, thread, op, false);
            return;
        }
        let sync = self.slots[index].processes[&pid].threads[thread].sync;
        match sync {
            // Its unlock is issued by `issue_unlocks` when the hold is over.
            Some(run) if run.holding() => return,
            // A lock attempt that ended in an error: the thread moves on.
            Some(_) => {
                self.slots[index]
                    .processes
                    .get_mut(&pid)
                    .expect("issuing")
                    .threads[thread]
                    .sync = None
            }
            None => {}
        }
        self.counters.ops_issued += 1;
        // A thread of this process was spawned here: it writes its value.
        if let Some((addr, value)) = self.take_job(index, pid) {
            let op = self.new_op(index, pid, thread, OpKind::Write { addr, value });
            return self.access(index, pid, thread, op, false);
        }
        let cond_wait = self.slots[index]
            .processes
            .get_mut(&pid)
            .and_then(|p| p.threads[thread].cond_wait.take());
        if let Some((lock, expected)) = cond_wait {
            return self.start_cond_wait(index, pid, thread, lock, expected);
        }
        let spawn_next = self.slots[index]
            .processes
            .get_mut(&pid)
            .and_then(|p| p.threads[thread].spawn_next.take());
        if let Some(record) = spawn_next {
            return self.spawn_with_record(index, pid, thread, record);
        }
        if let Some((record, _)) = self.slots[index].processes[&pid].threads[thread].join {
            let op = self.new_op(index, pid, thread, OpKind::JoinRead { addr: record });
            return self.access(index, pid, thread, op, false);
        }
        if (25..35).contains(&roll) && self.start_lock(index, pid, thread) {
            return;
        }
        if (35..39).contains(&roll) && self.start_spawn(index, pid, thread) {
            return;
        }
        if (39..42).contains(&roll) {
            let op = self.new_op(index, pid, thread, OpKind::Sync);
            let covers = (self.ghost.losses, self.ghost.written_by(index));
            self.sync_covers.insert(op.id, covers);
            return self.send(index, conn, op.id, IpcMessage::Sync);
        }
        if roll < 14 || !have_blocks {
            let size_bytes = match self.rng.gen_range(0..100) {
                0..=4 => self.rng.gen_range(CHUNK_SIZE_BYTES..3 * CHUNK_SIZE_BYTES),
                5..=12 => self.rng.gen_range(512..8192),
                _ => self.rng.gen_range(8..512),
            };
            let op = self.new_op(index, pid, thread, OpKind::Allocate { size_bytes });
            self.send(
                index,
                conn,
                op.id,
                IpcMessage::Allocate {
                    size_bytes,
                    align_bytes: 16,
                },
            );
        } else if roll < 22 {
            // Free a published block from any node: often another node's.
            let pick = self.rng.gen_range(0..self.published.len());
            let addr = self.published.swap_remove(pick);
            let block = self.live.remove(&addr);
            let op = self.new_op(
                index,
                pid,
                thread,
                OpKind::Free {
                    addr,
                    expect_valid: true,
                },
            );
            if let Some((len, owner)) = block {
                self.freeing.insert(op.id, (addr, len, owner));
            }
            self.send(index, conn, op.id, IpcMessage::Free { addr });
        } else if roll < 25 {
            // A double free or a wild free (inside a live block). Only of blocks this
            // node carved: a remote one could be reallocated while the bad free is in
            // flight, which is a bug of the application, not of gallocy.
            let node_id = index as NodeId + 1;
            // Not a block the node has handed out again to an allocation whose process
            // died before hearing of it (a local free runs at once: no race).
            let allocator = self.slots[index]
                .host
                .as_ref()
                .and_then(|h| h.node().allocator(layout.id));
            let double = self.recently_freed.iter().rev().copied().find(|a| {
                !self.live.contains_key(a)
                    && !self.limbo.contains(a)
                    && !self.freeing.values().any(|f| f.0 == *a)
                    && self.owner_of(index, *a) == Some(node_id)
                    && allocator.is_some_and(|al| al.size_of(*a).is_none())
            });
            let wild = self.published.iter().copied().find(|a| {
                self.live
                    .get(a)
                    .is_some_and(|&(len, owner)| owner == node_id && len >= 32)
            });
            let addr = match (double, wild, self.rng.gen_bool(0.5)) {
                (Some(a), _, true) | (Some(a), None, _) => a,
                (_, Some(a), _) => a + 16,
                (None, None, _) => {
                    self.counters.ops_issued -= 1;
                    return;
                }
            };
            let op = self.new_op(
                index,
                pid,
                thread,
                OpKind::Free {
                    addr,
                    expect_valid: false,
                },
            );
            self.send(index, conn, op.id, IpcMessage::Free { addr });
        } else {
            let addr = self.pick_word();
            let write = self.rng.gen_bool(0.5);
            let kind = if write {
                let value = (self.counters.ops_issued << 8) | (index as u64 + 1);
                OpKind::Write { addr, value }
            } else {
                OpKind::Read { addr }
            };
            let op = self.new_op(index, pid, thread, kind);
            self.access(index, pid, thread, op, false);
        }
    }

    /// The node whose chunk holds `addr`, per node `index`'s lease table (chunks are
    /// leased again after a release, so only the asking node's own view tells where
    /// its free will go). A chunk being given back has no lessee here: a free of it waits for the
    /// metadata (the chunk may have been leased again), so its outcome is not known.
    fn owner_of(&self, index: usize, addr: u64) -> Option<NodeId> {
        let slot = &self.slots[index];
        let layout = slot.space.as_ref()?;
        let chunk = layout.chunk_of_addr(addr)?;
        let meta = slot.host.as_ref()?.node().meta();
        if meta.releasing_run(layout.id, chunk).is_some() {
            return None;
        }
        meta.chunk(layout.id, chunk).map(|r| r.lessee)
    }

    /// A word inside a live block; half the time from a small hot set, so nodes contend.
    fn pick_word(&mut self) -> u64 {
        let hot = self.published.len().min(4);
        let pick = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..hot)
        } else {
            self.rng.gen_range(0..self.published.len())
        };
        let start = self.published[pick];
        let len = self.live.get(&start).map_or(WORD_BYTES, |&(len, _)| len);
        let words = (len / WORD_BYTES).max(1);
        start + self.rng.gen_range(0..words) * WORD_BYTES
    }

    /// Performs a read or write if the process has access; otherwise the thread
    /// faults to its host and retries once the grant is applied.
    fn access(&mut self, index: usize, pid: i32, thread: usize, op: PendingOp, retry: bool) {
        let Some(layout) = self.slots[index].space.clone() else {
            return;
        };
        let (addr, need) = match op.kind {
            OpKind::Read { addr } | OpKind::JoinRead { addr } => (addr, Access::Read),
            OpKind::Write { addr, .. } => (addr, Access::Write),
            OpKind::LockRmw { lock, rmw } => {
                (sync::rmw_word(self.locks[lock].addr, rmw), rmw.needs())
            }
            _ => unreachable!("not an access"),
        };
        let page = layout.page_of(addr).expect("address in space");
        let offset = ((addr - layout.base_addr) % PAGE_SIZE_BYTES as u64) as usize;
        let Some(process) = self.slots[index].processes.get(&pid) else {
            return;
        };
        let have = process.access.get(&page).copied().unwrap_or(Access::None);
        if have < need {
            if process.phase != ProcPhase::Live {
                // Nobody to fault to: the operation ends here (a real program would
                // crash or exit; the workload just moves on).
                self.finish_op(index, pid, thread);
                return;
            }
            let _ = retry;
            let conn = process.threads[thread].conn;
            self.counters.faults_requested += 1;
            self.send(
                index,
                conn,
                op.id,
                IpcMessage::Fault {
                    addr,
                    write: need == Access::Write,
                    pages: 1,
                },
            );
            return;
        }
        // A block freed while this access waited, in a run now being given back: its
        // bytes mean nothing (the ghost forgot them) and a write to it is lost with the
        // run. It reads and writes this node's memory only.
        // The run may be free again (and leased anew) since the last check: the ghost
        // must know before it decides what this access means.
        if let OpKind::LockRmw { lock, rmw } = op.kind {
            // A lock's block is never freed: its run is never released.
            return self.perform_rmw(index, pid, thread, lock, rmw);
        }
        self.track_releases();
        let releasing = self.is_releasing(page);
        let live = self.live_nodes();
        let record = self.slots[index].host.as_ref().and_then(|h| {
            let meta = h.node().meta();
            let layout = meta.spaces.get(&page.space)?;
            meta.chunk(page.space, layout.chunk_of_page(page.index))
        });
        let memory = self.slots[index]
            .memory
            .entry(page)
            .or_insert_with(|| Box::new([0u8; PAGE_SIZE_BYTES]));
        if releasing {
            if let OpKind::Write { value, .. } = op.kind {
                memory[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
            }
            self.finish_op(index, pid, thread);
            return;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&memory[offset..offset + 8]);
        let memory = self.slots[index].memory.get(&page).expect("inserted");
        self.ghost.exposed(page, index, memory);
        let memory = self.slots[index].memory.get_mut(&page).expect("inserted");
        if self.debug_page == Some(page.index) {
            eprintln!(
                "[t={}] node {} process {pid} touches page (word {:#x} at {offset}; chunk {record:?}); ghost: {}",
                self.now_ticks,
                index + 1,
                u64::from_le_bytes(word),
                self.ghost.protection(page)
            );
        }
        match op.kind {
            OpKind::Read { .. } | OpKind::JoinRead { .. } => {
                let value = u64::from_le_bytes(word);
                self.counters.reads += 1;
                self.trace.event(5, &[index as u64, addr, value]);
                if let Err(allowed) = self.ghost.read(page, offset, &word, index, &live) {
                    let allowed: Vec<String> = allowed
                        .iter()
                        .map(|b| {
                            format!(
                                "{:#x}",
                                u64::from_le_bytes(b[..].try_into().expect("8 bytes"))
                            )
                        })
                        .collect();
                    self.violate(
                        "memory consistency",
                        format!(
                            "process {pid} on node {} read {value:#x} at {addr:#x} but the page may only hold {} there",
                            index + 1,
                            allowed.join(" or ")
                        ),
                    );
                }
                if let OpKind::JoinRead { addr } = op.kind {
                    self.on_join_read(index, pid, thread, addr, value);
                }
            }
            OpKind::Write { value, .. } => {
                memory[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
                self.ghost
                    .write(page, offset, &value.to_le_bytes(), index, &live);
                self.counters.writes += 1;
                self.trace.event(6, &[index as u64, addr, value]);
                self.dirty_pages.insert(page);
            }
            _ => unreachable!(),
        }
        self.finish_op(index, pid, thread);
    }

    fn finish_op(&mut self, index: usize, pid: i32, thread: usize) {
        self.counters.ops_completed += 1;
        let think = self.rng.gen_range(0..10);
        if let Some(process) = self.slots[index].processes.get_mut(&pid) {
            let state = &mut process.threads[thread];
            state.pending = None;
            state.next_op_tick = self.now_ticks + think;
        }
    }

    fn on_reply(
        &mut self,
        index: usize,
        pid: i32,
        thread: usize,
        request_id: u64,
        reply: IpcMessage,
    ) {
        let answers_wait = self.slots[index]
            .processes
            .get(&pid)
            .and_then(|p| p.threads[thread].pending)
            .filter(|op| op.id == request_id && matches!(op.kind, OpKind::FutexWait { .. }));
        if answers_wait.is_some() {
            self.wait_answered(request_id);
        }
        let Some(process) = self.slots[index].processes.get(&pid) else {
            return;
        };
        let Some(pending) = process.threads[thread].pending else {
            return;
        };
        if pending.id != request_id {
            self.violate(
                "protocol",
                format!(
                    "reply to request {request_id}, thread waits for {}",
                    pending.id
                ),
            );
            return;
        }
        self.trace.event(7, &[index as u64, request_id]);
        if self.debug {
            eprintln!("    (request {request_id} was {:?})", pending.kind);
        }

        if let IpcMessage::Error { code, detail } = reply {
            // A wake refused: nobody is owed anything by it.
            self.wakes_owed.remove(&pending.id);
            // A detaching process's last requests are refused: it is leaving.
            let leaving = process.phase != ProcPhase::Live;
            if let OpKind::Spawn { record } = pending.kind {
                // Refused: it never runs. Node down (or the program ended there):
                // whether it ran is not known.
                self.spawn_refused(record, code == ErrorCode::NoInstance);
            }
            if !(leaving && code == ErrorCode::NotAttached) {
                self.on_error(index, pending, code, detail);
            }
            self.finish_op(index, pid, thread);
            return;
        }
        match (pending.kind, reply) {
            (
                OpKind::Allocate { size_bytes },
                IpcMessage::Allocated {
                    addr,
                    size_bytes: got,
                },
            ) => {
                self.check_allocation(index, addr, size_bytes, got);
                self.counters.allocations += 1;
                self.finish_op(index, pid, thread);
            }
            (OpKind::Sync, IpcMessage::Synced) => {
                self.last_synced = Some(index);
                if let Some((losses, covers)) = self.sync_covers.remove(&pending.id) {
                    self.ghost.synced(&covers, losses);
                    if let Some(debug) = self.debug_page {
                        for (page, serial) in covers.iter().filter(|(p, _)| p.index == debug) {
                            eprintln!(
                                "[t={}] node {} synced page {} generation {serial}; ghost: {}",
                                self.now_ticks,
                                index + 1,
                                page.index,
                                self.ghost.protection(*page)
                            );
                        }
                    }
                }
                self.counters.syncs += 1;
                self.trace.event(24, &[index as u64, pending.id]);
                self.finish_op(index, pid, thread);
            }
            (OpKind::Free { addr, expect_valid }, IpcMessage::Freed) => {
                match self.freeing.remove(&pending.id) {
                    Some((_, _, owner)) if expect_valid => {
                        self.counters.frees += 1;
                        if self.recently_freed.len() >= 64 {
                            self.recently_freed.pop_front();
                        }
                        self.recently_freed.push_back(addr);
                        if owner != index as NodeId + 1 {
                            self.counters.remote_frees_ok += 1;
                        }
                    }
                    _ => self.violate(
                        "allocation safety",
                        format!(
                            "free of {addr:#x}, not a live block, succeeded (double or wild free not caught)"
                        ),
                    ),
                }
                self.finish_op(index, pid, thread);
            }
            (OpKind::AllocateLock, IpcMessage::Allocated { addr, size_bytes }) => {
                self.check_allocation(index, addr, sync::LOCK_BYTES, size_bytes);
                // Live, but not published: the random workload never touches it.
                self.published.retain(|&a| a != addr);
                self.add_lock(addr);
                self.finish_op(index, pid, thread);
            }
            (OpKind::AllocateRecord, IpcMessage::Allocated { addr, size_bytes }) => {
                self.check_allocation(index, addr, threads::RECORD_BYTES, size_bytes);
                // Live, but not published: the random workload never touches it.
                self.published.retain(|&a| a != addr);
                self.init_record(index, pid, thread, addr);
            }
            (OpKind::Spawn { record }, IpcMessage::ThreadSpawned { .. }) => {
                self.on_spawned(index, pid, thread, record)
            }
            (OpKind::FutexWait { lock, cond, .. }, IpcMessage::FutexWaitDone { outcome }) => {
                self.on_wait_done(index, pid, thread, lock, outcome, cond)
            }
            (OpKind::FutexWake { lock, .. }, IpcMessage::FutexWoken { woken }) => {
                self.on_woken(lock, pending.id, woken);
                self.finish_op(index, pid, thread);
            }
            (
                OpKind::Read { .. }
                | OpKind::JoinRead { .. }
                | OpKind::Write { .. }
                | OpKind::LockRmw { .. },
                IpcMessage::Granted {
                    page_addr,
                    write,
                    pages,
                },
            ) => {
                let delay = if process.max_grant_delay_ticks == 0 {
                    0
                } else {
                    self.rng.gen_range(0..=process.max_grant_delay_ticks)
                };
                let event = Scheduled::ApplyGrant {
                    node: index,
                    pid,
                    thread,
                    page_addr,
                    pages,
                    write,
                    op_id: pending.id,
                };
                if delay == 0 {
                    self.apply_grant(index, pid, thread, page_addr, pages, write, pending.id);
                } else {
                    self.schedule(delay, event);
                }
            }
            (kind, reply) => {
                self.violate(
                    "protocol",
                    format!("unexpected reply {reply:?} to {kind:?}"),
                );
            }
        }
    }

    /// A page some live node's process saw is never lost: that node holds a copy, and
    /// the page's home (or its new home, after a crash) rebuilds from the copies.
    fn check_not_lost(&mut self, index: usize, op: PendingOp) {
        let addr = match op.kind {
            OpKind::Read { addr } | OpKind::Write { addr, .. } | OpKind::JoinRead { addr } => addr,
            OpKind::LockRmw { lock, rmw } => sync::rmw_word(self.locks[lock].addr, rmw),
            _ => return,
        };
        let Some(page) = self.slots[index]
            .space
            .as_ref()
            .and_then(|layout| layout.page_of(addr))
        else {
            return;
        };
        let live = self.live_nodes();
        if self.ghost.seen_by_live(page, &live) && !self.is_releasing(page) {
            self.violate(
                "no lost observed write",
                format!(
                    "page {} of space {} is lost to node {}, but a live node's process saw it, or it is still on k nodes ({})",
                    page.index,
                    page.space,
                    index + 1,
                    self.ghost.protection(page)
                ),
            );
        }
    }

    fn on_error(&mut self, index: usize, op: PendingOp, code: ErrorCode, detail: u64) {
        match (op.kind, code) {
            (_, ErrorCode::PageLost) => {
                self.counters.page_lost += 1;
                self.check_not_lost(index, op);
            }
            (_, ErrorCode::NodeDown) => self.counters.node_down_errors += 1,
            (_, ErrorCode::Evicted) => self.counters.evicted_errors += 1,
            (_, ErrorCode::NotMapped) => self.counters.not_mapped += 1,
            (_, ErrorCode::OutOfMemory) => self.counters.out_of_memory += 1,
            (_, ErrorCode::Busy) => self.counters.busy += 1,
            // A spawn to a node without an instance of the program (yet, or any more).
            (OpKind::Spawn { .. }, ErrorCode::NoInstance) => {}
            (OpKind::Free { addr, expect_valid }, ErrorCode::InvalidFree) => {
                if expect_valid {
                    self.violate(
                        "allocation safety",
                        format!(
                            "valid free of live block {addr:#x} refused on node {}",
                            index + 1
                        ),
                    );
                }
                self.counters.invalid_frees_rejected += 1;
            }
            (kind, code) => self.violate(
                "protocol",
                format!(
                    "node {} failed {kind:?} with {code:?} ({detail})",
                    index + 1
                ),
            ),
        }
        self.sync_covers.remove(&op.id);
        // A free refused as Busy was never sent: the block is still live. After Evicted
        // or NodeDown the outcome is unknown (the owner may have freed it), so the block
        // is forgotten: never reused by the workload, never counted as live.
        if let OpKind::Free {
            addr,
            expect_valid: true,
        } = op.kind
        {
            if let Some((_, len, owner)) = self.freeing.remove(&op.id) {
                if code == ErrorCode::Busy {
                    self.live.insert(addr, (len, owner));
                    self.published.push(addr);
                } else {
                    self.limbo.insert(addr);
                }
            }
        }
    }

    fn check_allocation(&mut self, index: usize, addr: u64, asked: u64, got: u64) {
        let node_id = index as NodeId + 1;
        if got < asked || !addr.is_multiple_of(16) {
            self.violate(
                "allocation safety",
                format!("block {addr:#x} has {got} bytes for {asked} asked, or is misaligned"),
            );
        }
        let end = addr + got;
        if let Some((&start, &(len, owner))) = self.live.range(..end).next_back() {
            if start + len > addr {
                self.violate(
                    "allocation safety",
                    format!(
                        "node {node_id} allocated {addr:#x}+{got} overlapping live {start:#x}+{len} of node {owner}"
                    ),
                );
                return;
            }
        }
        // No other node may own the chunk this block came from.
        let space = self.slots[index].space.as_ref().map(|l| l.id).unwrap_or(1);
        for (other, slot) in self.slots.iter().enumerate() {
            if other == index {
                continue;
            }
            if let Some(host) = slot.host.as_ref() {
                if host.node().allocator(space).is_some_and(|a| a.owns(addr)) {
                    let detail = format!(
                        "chunk of {addr:#x} is carved by node {node_id} and node {}",
                        other + 1
                    );
                    self.violate("allocation safety", detail);
                    return;
                }
            }
        }
        self.limbo.remove(&addr);
        self.live.insert(addr, (got, node_id));
        self.published.push(addr);
    }

    // -----------------------------------------------------------------------------
    // Checkers.

    /// Coherence safety over the pages touched since the last check, at process level:
    /// no process may hold write access to a page while a process of another node holds
    /// any access to it, and every process that can access a page sees its latest bytes.
    /// (Processes of one node share the node's memory, so they may all write.)
    pub fn check_coherence(&mut self) {
        self.track_releases();
        let dirty = std::mem::take(&mut self.dirty_pages);
        for page in dirty {
            if self.is_releasing(page) {
                continue;
            }
            let live = self.live_nodes();
            let mut writers: Vec<(usize, i32)> = Vec::new();
            let mut readers: Vec<(usize, i32)> = Vec::new();
            for (index, slot) in self.slots.iter().enumerate() {
                if slot.host.is_none() {
                    continue;
                }
                for process in slot.processes.values() {
                    let access = process.access.get(&page).copied().unwrap_or(Access::None);
                    match access {
                        Access::Write => writers.push((index + 1, process.pid)),
                        Access::Read => readers.push((index + 1, process.pid)),
                        Access::None => continue,
                    }
                    let bytes = slot.memory.get(&page).map(|b| &**b);
                    let current = self.ghost.allows(page, bytes, &live);
                    if !current {
                        let detail = format!(
                            "process {} on node {} can access page {} of space {} ({access:?}) holding stale bytes ({})",
                            process.pid,
                            index + 1,
                            page.index,
                            page.space,
                            self.ghost.describe(page, bytes, &live)
                        );
                        self.violate("coherence", detail);
                        return;
                    }
                }
            }
            if let Some(&(node, pid)) = writers.first() {
                let other = writers
                    .iter()
                    .chain(readers.iter())
                    .find(|&&(n, _)| n != node);
                if let Some(&(other_node, other_pid)) = other {
                    self.violate(
                        "coherence",
                        format!(
                            "page {} writable by process {pid} on node {node} while process {other_pid} on node {other_node} can access it",
                            page.index
                        ),
                    );
                    return;
                }
            }
        }
    }

    /// A space is destroyed only when no process can touch it: once any serving node
    /// has applied its destruction, no process anywhere is still attached to it or
    /// holds access to one of its pages (a node declared down excepted: it kills its
    /// processes, which hold nothing once it fenced itself).
    pub fn check_space_lifetime(&mut self) {
        let mut problem = None;
        'scan: for (index, slot) in self.slots.iter().enumerate() {
            let Some(host) = slot.host.as_ref() else {
                continue;
            };
            if host.node().is_evicted() {
                continue;
            }
            for process in slot.processes.values() {
                let Some(space) = process.space else {
                    continue;
                };
                let holds = process.phase == ProcPhase::Live
                    || process
                        .access
                        .iter()
                        .any(|(page, &a)| page.space == space && a != Access::None);
                if !holds {
                    continue;
                }
                let destroyed_at = self.slots.iter().position(|other| {
                    other.host.as_ref().is_some_and(|h| {
                        let meta = h.node().meta();
                        !h.node().is_evicted()
                            && space < meta.next_space_id
                            && !meta.spaces.contains_key(&space)
                    })
                });
                if let Some(other) = destroyed_at {
                    problem = Some(format!(
                        "node {} destroyed space {space} while process {} on node {} ({:?}) is attached to it",
                        other + 1,
                        process.pid,
                        index + 1,
                        process.phase
                    ));
                    break 'scan;
                }
            }
        }
        if let Some(detail) = problem {
            self.violate("space lifetime", detail);
        }
    }

    /// Once the run has settled (every repair done): every page a running home has at
    /// rest, whose master holds contents the ghost protects (they reached another
    /// node's process, or a sync covered them), has its master's bytes on at least
    /// `copies_needed` (min(k, nodes up)) of the nodes its metadata has up: itself,
    /// and nodes whose memory or backup holds the same bytes. Copies lost with a node
    /// were made again (repairs), and no home counts a copy that is not there.
    /// (Contents that reached no other node's process need not be on k nodes: a grant
    /// counts its requester, and one never installed leaves them on fewer.) A home whose metadata has up a node that is
    /// not running, or evicted, is skipped: that node's copies cannot be judged.
    pub fn check_copies(&mut self) {
        let mut problem = None;
        'homes: for (index, slot) in self.slots.iter().enumerate() {
            let Some(host) = slot.host.as_ref() else {
                continue;
            };
            let node = host.node();
            if node.is_evicted() || !node.repairs_settled() {
                continue;
            }
            let me = index as NodeId + 1;
            let up: Vec<NodeId> = node.meta().up_nodes().collect();
            let running = |id: NodeId| {
                self.slots
                    .get(id as usize - 1)
                    .and_then(|s| s.host.as_ref())
                    .is_some_and(|h| !h.node().is_evicted())
            };
            if !up.iter().all(|&id| running(id)) {
                continue;
            }
            for (page, master) in node.masters_at_rest() {
                if self.is_releasing(page) || !self.ghost.protects(page, master) {
                    continue;
                }
                let holds = |id: NodeId| {
                    let other = &self.slots[id as usize - 1];
                    id == me
                        || other.memory.get(&page).is_some_and(|b| **b == *master)
                        || other
                            .host
                            .as_ref()
                            .and_then(|h| h.node().backup_bytes(page))
                            .is_some_and(|b| *b == *master)
                };
                let holding: Vec<NodeId> = up.iter().copied().filter(|&id| holds(id)).collect();
                let need = node.copies_needed(page);
                if holding.len() < need {
                    problem = Some(format!(
                        "page {} of space {} homed on node {me} is on {} of the {need} nodes it needs after every repair ({holding:?} of {up:?} hold its master)",
                        page.index,
                        page.space,
                        holding.len()
                    ));
                    break 'homes;
                }
            }
        }
        if let Some(detail) = problem {
            self.violate("copies", detail);
        }
    }

    /// Allocator and lease invariants, checked now and then (they are wider scans).
    pub fn check_allocators(&mut self) {
        let mut owners: BTreeMap<(SpaceId, u64), usize> = BTreeMap::new();
        let mut problem: Option<String> = None;
        'scan: for (index, slot) in self.slots.iter().enumerate() {
            let Some(host) = slot.host.as_ref() else {
                continue;
            };
            let Some(layout) = slot.space.as_ref() else {
                continue;
            };
            let Some(allocator) = host.node().allocator(layout.id) else {
                continue;
            };
            if let Err(why) = allocator.check_invariants() {
                problem = Some(format!("node {}: {why}", index + 1));
                break 'scan;
            }
            for (start, len) in allocator.regions() {
                let mut chunk = (start - layout.base_addr) / layout.chunk_size_bytes;
                let end_chunk = (start + len - layout.base_addr) / layout.chunk_size_bytes;
                while chunk < end_chunk {
                    if let Some(previous) = owners.insert((layout.id, chunk), index) {
                        problem = Some(format!(
                            "chunk {chunk} leased to nodes {} and {}",
                            previous + 1,
                            index + 1
                        ));
                        break 'scan;
                    }
                    chunk += 1;
                }
            }
        }
        if let Some(detail) = problem {
            self.violate("allocation safety", detail);
            return;
        }
        // Every node's replicated chunk table agrees with the carving nodes, if it has
        // applied at least as much of the log (chunks given back are leased again, so a
        // node behind may still name an earlier lessee).
        let applied = |index: usize| {
            self.slots[index]
                .host
                .as_ref()
                .map_or(0, |h| h.node().meta().applied_commands)
        };
        for slot in &self.slots {
            let Some(host) = slot.host.as_ref() else {
                continue;
            };
            let node = host.node();
            for (&(space, chunk), &owner) in &owners {
                if problem.is_some() {
                    break;
                }
                if node.meta().applied_commands < applied(owner) {
                    continue;
                }
                if let Some(record) = node.meta().chunk(space, chunk) {
                    if record.lessee != owner as NodeId + 1 {
                        problem = Some(format!(
                            "node {} says chunk {chunk} is leased to {} but node {} carves it",
                            node.id(),
                            record.lessee,
                            owner + 1
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(detail) = problem {
            self.violate("allocation safety", detail);
        }
    }

    /// Operations still waiting, in processes that can still complete them (attached,
    /// on live nodes): (node, issued tick).
    pub fn pending_ops(&self) -> Vec<(usize, u64)> {
        let mut pending = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(host) = slot.host.as_ref() else {
                continue;
            };
            for process in slot.processes.values() {
                if process.phase != ProcPhase::Live {
                    continue;
                }
                for thread in &process.threads {
                    if let Some(op) = thread.pending {
                        if self.debug {
                            let node = host.node();
                            eprintln!(
                                "pending on node {} process {}: {:?} since {} (fenced {}, leader {:?}, term {})",
                                index + 1,
                                process.pid,
                                op.kind,
                                op.issued_tick,
                                node.is_fenced(),
                                node.leader_id(),
                                node.term()
                            );
                        }
                        pending.push((index + 1, op.issued_tick));
                    }
                }
            }
        }
        pending
    }

    pub fn all_joined(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.host.is_none() || s.space.is_some())
    }

    pub fn node_count(&self) -> usize {
        self.slots.len()
    }
}
