//! Programs across nodes: a launched program has one instance on every node (the
//! launcher's own `main` instance at the origin, a worker instance elsewhere, started
//! by each node's daemon), and its threads are spawned on any of them.
//!
//! Three protocols, all retried until acknowledged and deduplicated at the receiver
//! (docs/protocol.md, "Programs and threads"):
//!
//! - **launch**: the origin sends the worker spec to every other member until each
//!   acknowledges; a member starts its worker once per program;
//! - **worker events** (started, refused, output bytes, exit): a stream per (program,
//!   worker node) to the origin, numbered, acknowledged cumulatively, resent in order,
//!   delivered to the launcher's connection exactly once and in order, so no output
//!   is lost or repeated;
//! - **spawn**: a thread record address to the node that runs it, delivered to that
//!   node's instance exactly once, answered to the spawner once delivered.
//!
//! Plain state machine: inputs are messages, requests and time; outputs are
//! [`ProgramEffect`]s the host turns into frames and driver actions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::codec::{DecodeError, Reader, Writer};
use crate::types::NodeId;

/// `origin << PROGRAM_ORIGIN_SHIFT | (origin's life - 1) << PROGRAM_LIFE_SHIFT | counter`:
/// unique in the cluster across restarts (a restarted origin's new programs must not
/// be mistaken for its earlier life's, which other nodes remember as ended).
pub type ProgramId = u64;
const PROGRAM_ORIGIN_SHIFT: u32 = 40;
const PROGRAM_LIFE_SHIFT: u32 = 24;
/// Programs one life of a node may launch (the counter's bits).
pub const MAX_PROGRAMS_PER_LIFE: u64 = (1 << PROGRAM_LIFE_SHIFT) - 1;

/// The node that launched `program`.
pub fn program_origin(program: ProgramId) -> NodeId {
    program >> PROGRAM_ORIGIN_SHIFT
}
pub type ThreadId = u64;
/// The driver's name for one application connection (same as `host::ConnId`).
pub type ConnId = u64;

/// Largest encoded worker spec (path, argv, environment, cwd, hash).
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// Largest output chunk in one event.
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 16 * 1024;
/// Largest refusal reason.
pub const MAX_REASON_BYTES: usize = 1024;
/// Unacknowledged event bytes a worker node keeps per program: above it the driver
/// stops reading the worker's output (backpressure, never loss).
pub const MAX_EVENT_BACKLOG_BYTES: usize = 4 << 20;
/// Programs one host knows at once (launched here or hosted here).
pub const MAX_PROGRAMS: usize = 64;
/// Spawns in flight from one host.
pub const MAX_SPAWNS_IN_FLIGHT: usize = 4096;
/// Programs never launched here whose spawns are remembered at once.
const MAX_UNKNOWN_SPAWNED_PROGRAMS: usize = 64;
/// Threads remembered per program as delivered, for deduplication of retried spawns.
pub const SPAWN_DEDUPE_WINDOW: usize = 4096;
/// Events resent per stream and retry.
const MAX_RESEND_EVENTS: usize = 64;
/// Thread ids are `node << THREAD_NODE_SHIFT | counter`: unique in the cluster.
const THREAD_NODE_SHIFT: u32 = 40;

pub const STREAM_STDOUT: u8 = 1;
pub const STREAM_STDERR: u8 = 2;

/// What a daemon needs to start a worker instance: the same executable, arguments,
/// environment and directory as the origin's instance. Strings are bytes (paths need
/// not be UTF-8). Encoded by the launcher, decoded by each worker's daemon: one format.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct WorkerSpec {
    pub path: Vec<u8>,
    pub argv: Vec<Vec<u8>>,
    /// `NAME=value` entries.
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    /// SHA-256 of the executable at the origin: a daemon whose file differs refuses.
    pub exe_sha256: [u8; 32],
}

const SPEC_MAGIC: u32 = 0x4753_5043; // "GSPC"
const MAX_SPEC_ITEMS: u32 = 8192;

impl WorkerSpec {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        w.u32(SPEC_MAGIC);
        w.blob(&self.path);
        w.u32(self.argv.len() as u32);
        for arg in &self.argv {
            w.blob(arg);
        }
        w.u32(self.env.len() as u32);
        for entry in &self.env {
            w.blob(entry);
        }
        w.blob(&self.cwd);
        w.raw(&self.exe_sha256);
        w.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<WorkerSpec, DecodeError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(DecodeError::Invalid("worker spec over size limit"));
        }
        let mut r = Reader::new(bytes);
        if r.u32()? != SPEC_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let path = r.blob(MAX_SPEC_BYTES)?.to_vec();
        let list = |r: &mut Reader<'_>| -> Result<Vec<Vec<u8>>, DecodeError> {
            let count = r.u32()?;
            if count > MAX_SPEC_ITEMS {
                return Err(DecodeError::Invalid("too many spec entries"));
            }
            (0..count)
                .map(|_| Ok(r.blob(MAX_SPEC_BYTES)?.to_vec()))
                .collect()
        };
        let argv = list(&mut r)?;
        let env = list(&mut r)?;
        let cwd = r.blob(MAX_SPEC_BYTES)?.to_vec();
        let mut exe_sha256 = [0u8; 32];
        exe_sha256.copy_from_slice(r.take(32)?);
        r.finish()?;
        if path.is_empty() || argv.is_empty() {
            return Err(DecodeError::Invalid("worker spec without path or argv"));
        }
        Ok(WorkerSpec {
            path,
            argv,
            env,
            cwd,
            exe_sha256,
        })
    }
}

/// How a worker instance ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WorkerExit {
    Code(i32),
    Signal(i32),
}

/// What a worker node tells the origin about its instance.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum WorkerEvent {
    Started {
        pid: u32,
    },
    /// The daemon would not or could not start it (hash differs, exec failed, ...).
    Refused {
        reason: Vec<u8>,
    },
    Output {
        stream: u8,
        bytes: Vec<u8>,
    },
    Exited(WorkerExit),
}

impl WorkerEvent {
    fn size_bytes(&self) -> usize {
        match self {
            WorkerEvent::Refused { reason } => 16 + reason.len(),
            WorkerEvent::Output { bytes, .. } => 16 + bytes.len(),
            _ => 16,
        }
    }
}

/// Peer messages of this layer (one wire kind, `wire::PeerMessage::Program`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ProgramMessage {
    Launch {
        program: ProgramId,
        spec: Vec<u8>,
    },
    LaunchAck {
        program: ProgramId,
    },
    Event {
        program: ProgramId,
        seq: u64,
        event: WorkerEvent,
    },
    /// Every event up to `seq` arrived.
    EventAck {
        program: ProgramId,
        seq: u64,
    },
    Stop {
        program: ProgramId,
    },
    StopAck {
        program: ProgramId,
    },
    Spawn {
        program: ProgramId,
        thread: ThreadId,
        record_addr: u64,
    },
    SpawnAck {
        thread: ThreadId,
        outcome: SpawnOutcome,
    },
}

const PM_LAUNCH: u8 = 1;
const PM_LAUNCH_ACK: u8 = 2;
const PM_EVENT: u8 = 3;
const PM_EVENT_ACK: u8 = 4;
const PM_STOP: u8 = 5;
const PM_STOP_ACK: u8 = 6;
const PM_SPAWN: u8 = 7;
const PM_SPAWN_ACK: u8 = 8;

const EV_STARTED: u8 = 1;
const EV_REFUSED: u8 = 2;
const EV_OUTPUT: u8 = 3;
const EV_EXIT_CODE: u8 = 4;
const EV_EXIT_SIGNAL: u8 = 5;

impl ProgramMessage {
    pub fn put(&self, w: &mut Writer) {
        match self {
            ProgramMessage::Launch { program, spec } => {
                w.u8(PM_LAUNCH);
                w.u64(*program);
                w.blob(spec);
            }
            ProgramMessage::LaunchAck { program } => {
                w.u8(PM_LAUNCH_ACK);
                w.u64(*program);
            }
            ProgramMessage::Event {
                program,
                seq,
                event,
            } => {
                w.u8(PM_EVENT);
                w.u64(*program);
                w.u64(*seq);
                match event {
                    WorkerEvent::Started { pid } => {
                        w.u8(EV_STARTED);
                        w.u32(*pid);
                    }
                    WorkerEvent::Refused { reason } => {
                        w.u8(EV_REFUSED);
                        w.blob(reason);
                    }
                    WorkerEvent::Output { stream, bytes } => {
                        w.u8(EV_OUTPUT);
                        w.u8(*stream);
                        w.blob(bytes);
                    }
                    WorkerEvent::Exited(WorkerExit::Code(code)) => {
                        w.u8(EV_EXIT_CODE);
                        w.u32(*code as u32);
                    }
                    WorkerEvent::Exited(WorkerExit::Signal(signal)) => {
                        w.u8(EV_EXIT_SIGNAL);
                        w.u32(*signal as u32);
                    }
                }
            }
            ProgramMessage::EventAck { program, seq } => {
                w.u8(PM_EVENT_ACK);
                w.u64(*program);
                w.u64(*seq);
            }
            ProgramMessage::Stop { program } => {
                w.u8(PM_STOP);
                w.u64(*program);
            }
            ProgramMessage::StopAck { program } => {
                w.u8(PM_STOP_ACK);
                w.u64(*program);
            }
            ProgramMessage::Spawn {
                program,
                thread,
                record_addr,
            } => {
                w.u8(PM_SPAWN);
                w.u64(*program);
                w.u64(*thread);
                w.u64(*record_addr);
            }
            ProgramMessage::SpawnAck { thread, outcome } => {
                w.u8(PM_SPAWN_ACK);
                w.u64(*thread);
                w.u8(*outcome as u8);
            }
        }
    }

    pub fn get(r: &mut Reader<'_>) -> Result<ProgramMessage, DecodeError> {
        Ok(match r.u8()? {
            PM_LAUNCH => ProgramMessage::Launch {
                program: r.u64()?,
                spec: r.blob(MAX_SPEC_BYTES)?.to_vec(),
            },
            PM_LAUNCH_ACK => ProgramMessage::LaunchAck { program: r.u64()? },
            PM_EVENT => {
                let program = r.u64()?;
                let seq = r.u64()?;
                let event = match r.u8()? {
                    EV_STARTED => WorkerEvent::Started { pid: r.u32()? },
                    EV_REFUSED => WorkerEvent::Refused {
                        reason: r.blob(MAX_REASON_BYTES)?.to_vec(),
                    },
                    EV_OUTPUT => {
                        let stream = r.u8()?;
                        if stream != STREAM_STDOUT && stream != STREAM_STDERR {
                            return Err(DecodeError::Invalid("output stream"));
                        }
                        WorkerEvent::Output {
                            stream,
                            bytes: r.blob(MAX_OUTPUT_CHUNK_BYTES)?.to_vec(),
                        }
                    }
                    EV_EXIT_CODE => WorkerEvent::Exited(WorkerExit::Code(r.u32()? as i32)),
                    EV_EXIT_SIGNAL => WorkerEvent::Exited(WorkerExit::Signal(r.u32()? as i32)),
                    _ => return Err(DecodeError::Invalid("worker event kind")),
                };
                ProgramMessage::Event {
                    program,
                    seq,
                    event,
                }
            }
            PM_EVENT_ACK => ProgramMessage::EventAck {
                program: r.u64()?,
                seq: r.u64()?,
            },
            PM_STOP => ProgramMessage::Stop { program: r.u64()? },
            PM_STOP_ACK => ProgramMessage::StopAck { program: r.u64()? },
            PM_SPAWN => ProgramMessage::Spawn {
                program: r.u64()?,
                thread: r.u64()?,
                record_addr: r.u64()?,
            },
            PM_SPAWN_ACK => ProgramMessage::SpawnAck {
                thread: r.u64()?,
                outcome: match r.u8()? {
                    1 => SpawnOutcome::Delivered,
                    2 => SpawnOutcome::Refused,
                    3 => SpawnOutcome::Ended,
                    _ => return Err(DecodeError::Invalid("spawn outcome")),
                },
            },
            _ => return Err(DecodeError::Invalid("program message kind")),
        })
    }
}

/// What became of a spawn at its target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SpawnOutcome {
    /// The thread reached the program's instance there.
    Delivered = 1,
    /// It did not and never will: no instance served threads in time.
    Refused = 2,
    /// The program has ended there: whether the thread ran before is not known.
    Ended = 3,
}

/// What the launcher's connection hears.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LauncherReport {
    Event {
        node: NodeId,
        event: WorkerEvent,
    },
    /// The node was declared down: its instance and its threads are gone.
    NodeDown {
        node: NodeId,
    },
}

/// Why a spawn failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SpawnError {
    /// Not a member, or the program has no instance there: the thread never runs.
    NoInstance,
    /// The target is down, or the program ended there: it may have run before.
    NodeDown,
    /// Too many spawns in flight, or no answer within the spawn timeout.
    Busy,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ProgramEffect {
    Send {
        to: NodeId,
        message: ProgramMessage,
    },
    Report {
        conn: ConnId,
        report: LauncherReport,
    },
    /// Start this node's worker instance (the driver calls `worker_event` with what
    /// happened).
    StartWorker {
        program: ProgramId,
        spec: Vec<u8>,
    },
    /// End this node's instance: tell it to stop on `conn` if it serves threads, and
    /// the driver makes sure the process ends.
    StopWorker {
        program: ProgramId,
        conn: Option<ConnId>,
    },
    /// Run the thread whose record is at `record_addr` in the instance serving `conn`.
    RunThread {
        conn: ConnId,
        thread: ThreadId,
        record_addr: u64,
    },
    SpawnAnswer {
        conn: ConnId,
        request_id: u64,
        result: Result<ThreadId, SpawnError>,
    },
}

/// Timing of the layer, from the node's configuration.
#[derive(Clone, Copy, Debug)]
pub struct ProgramTiming {
    pub retry_base_ticks: u64,
    pub retry_max_ticks: u64,
    /// A thread that reached its node before the program's instance there served
    /// threads waits this long, then is refused (`NoInstance` at the spawner). A
    /// spawner itself waits without limit until the target answers or is declared down
    /// (an answer after a timeout could not say whether the thread runs).
    pub spawn_timeout_ticks: u64,
}

#[derive(Clone, Copy, Debug)]
struct Retry {
    next_tick: u64,
    backoff_ticks: u64,
}

impl Retry {
    fn new(now_ticks: u64, timing: &ProgramTiming) -> Retry {
        Retry {
            next_tick: now_ticks + timing.retry_base_ticks,
            backoff_ticks: timing.retry_base_ticks,
        }
    }
    fn due(&self, now_ticks: u64) -> bool {
        self.next_tick <= now_ticks
    }
    fn back_off(&mut self, now_ticks: u64, timing: &ProgramTiming) {
        self.backoff_ticks = (self.backoff_ticks * 2).min(timing.retry_max_ticks);
        self.next_tick = now_ticks + self.backoff_ticks;
    }
}

/// The origin's view of one worker node.
struct OriginPeer {
    launch_acked: bool,
    launch_retry: Retry,
    /// Next event sequence number expected from it.
    expected_seq: u64,
    /// Events that arrived ahead of a lost one (at most `MAX_RESEND_EVENTS`).
    ahead: BTreeMap<u64, WorkerEvent>,
    stop: Option<(bool, Retry)>,
    down_reported: bool,
    /// Its instance's end (exit or refusal) reached the launcher.
    ended: bool,
}

/// A program launched from this node.
struct Launched {
    launcher: ConnId,
    /// The launcher asked for the end (or left): forgotten once every peer settled.
    stopping: bool,
    spec: Vec<u8>,
    peers: BTreeMap<NodeId, OriginPeer>,
}

/// A program with an instance on this node (the origin included).
struct Hosted {
    origin: NodeId,
    /// The instance's connection that serves threads, once it said so.
    serving: Option<ConnId>,
    /// Whether this node's daemon starts the instance (false at the origin).
    worker: bool,
    next_seq: u64,
    unacked: VecDeque<(u64, WorkerEvent)>,
    backlog_bytes: usize,
    resend: Option<Retry>,
    /// Threads delivered, for retried spawns (bounded window).
    delivered: BTreeSet<ThreadId>,
    /// Threads refused because the instance never served threads in time: a late copy
    /// of their spawn must not run them (the spawner was told they failed).
    refused: BTreeSet<ThreadId>,
    /// Threads that arrived before the instance served threads, with their deadline.
    waiting: BTreeMap<ThreadId, (NodeId, u64, u64)>,
    stopped: bool,
    /// The daemon reported the worker's end (exit or refusal).
    ended: bool,
}

/// An instance's request for a thread on `target`.
#[derive(Clone, Copy, Debug)]
pub struct SpawnRequest {
    pub conn: ConnId,
    pub request_id: u64,
    pub program: ProgramId,
    pub target: NodeId,
    pub record_addr: u64,
}

struct Spawn {
    conn: ConnId,
    request_id: u64,
    program: ProgramId,
    target: NodeId,
    record_addr: u64,
    retry: Retry,
}

pub struct Programs {
    node: NodeId,
    timing: ProgramTiming,
    now_ticks: u64,
    /// This node's and life's part of its program ids.
    program_base: u64,
    next_program: u64,
    next_thread: u64,
    launched: BTreeMap<ProgramId, Launched>,
    hosted: BTreeMap<ProgramId, Hosted>,
    spawns: BTreeMap<ThreadId, Spawn>,
    /// Programs that ended here (bounded): a late spawn of one is answered `Ended`,
    /// a late launch does not start it again.
    ended: BTreeSet<ProgramId>,
    /// Programs never launched here that spawns came for, with the tick the first came
    /// (bounded): past `spawn_timeout_ticks` they are refused, since a launch that far
    /// behind will not come (this node restarted after the program began, say).
    /// With the threads refused so (a late launch must not run them: their spawners
    /// were told they never run).
    unknown_spawned: BTreeMap<ProgramId, (u64, BTreeSet<ThreadId>)>,
    effects: Vec<ProgramEffect>,
    /// Mutant switches (the host sets them from its configuration).
    pub mutant_spawn_not_retried: bool,
    pub mutant_spawn_not_deduplicated: bool,
}

impl Programs {
    /// `incarnation`: this node's life (`Config::incarnation`), part of its program ids.
    pub fn new(node: NodeId, incarnation: u64, timing: ProgramTiming) -> Programs {
        assert!(
            node < (1 << (64 - THREAD_NODE_SHIFT.max(PROGRAM_ORIGIN_SHIFT))),
            "node id too large for thread and program ids"
        );
        assert!(
            incarnation >= 1
                && incarnation - 1 < (1 << (PROGRAM_ORIGIN_SHIFT - PROGRAM_LIFE_SHIFT)),
            "incarnation too large for program ids"
        );
        assert!(timing.retry_base_ticks > 0 && timing.retry_max_ticks >= timing.retry_base_ticks);
        Programs {
            node,
            timing,
            now_ticks: 0,
            program_base: (node << PROGRAM_ORIGIN_SHIFT)
                | ((incarnation - 1) << PROGRAM_LIFE_SHIFT),
            next_program: 1,
            next_thread: 1,
            launched: BTreeMap::new(),
            hosted: BTreeMap::new(),
            spawns: BTreeMap::new(),
            ended: BTreeSet::new(),
            unknown_spawned: BTreeMap::new(),
            effects: Vec::new(),
            mutant_spawn_not_retried: false,
            mutant_spawn_not_deduplicated: false,
        }
    }

    pub fn drain_effects(&mut self) -> Vec<ProgramEffect> {
        std::mem::take(&mut self.effects)
    }

    /// Event bytes not yet acknowledged by the origin (the driver reads a worker's
    /// output only below `MAX_EVENT_BACKLOG_BYTES`).
    pub fn backlog_bytes(&self, program: ProgramId) -> usize {
        self.hosted.get(&program).map_or(0, |h| h.backlog_bytes)
    }

    /// Whether `program` has an instance on this node.
    pub fn hosts(&self, program: ProgramId) -> bool {
        self.hosted.contains_key(&program)
    }

    fn send(&mut self, to: NodeId, message: ProgramMessage) {
        debug_assert_ne!(to, self.node);
        self.effects.push(ProgramEffect::Send { to, message });
    }

    // -----------------------------------------------------------------------------
    // Launch (origin side).

    /// A launcher asks for a worker instance on each of `peers` (every other member
    /// up). The origin's own instance is the launcher's to start.
    pub fn launch(
        &mut self,
        now_ticks: u64,
        launcher: ConnId,
        spec: Vec<u8>,
        peers: &[NodeId],
    ) -> Result<ProgramId, SpawnError> {
        self.now_ticks = now_ticks;
        if self.launched.len() + self.hosted.len() >= MAX_PROGRAMS
            || spec.len() > MAX_SPEC_BYTES
            || self.next_program > MAX_PROGRAMS_PER_LIFE
        {
            return Err(SpawnError::Busy);
        }
        let program = self.program_base | self.next_program;
        self.next_program += 1;
        let mut launched = Launched {
            launcher,
            stopping: false,
            spec,
            peers: BTreeMap::new(),
        };
        let me = self.node;
        for &peer in peers.iter().filter(|&&p| p != me) {
            launched.peers.insert(
                peer,
                OriginPeer {
                    launch_acked: false,
                    launch_retry: Retry::new(now_ticks, &self.timing),
                    expected_seq: 1,
                    ahead: BTreeMap::new(),
                    stop: None,
                    down_reported: false,
                    ended: false,
                },
            );
            self.send(
                peer,
                ProgramMessage::Launch {
                    program,
                    spec: launched.spec.clone(),
                },
            );
        }
        self.launched.insert(program, launched);
        self.hosted.insert(program, Hosted::new(self.node, false));
        Ok(program)
    }

    /// The launcher asks for the end of every instance (its main instance ended), or
    /// its connection closed.
    pub fn stop(&mut self, now_ticks: u64, program: ProgramId) {
        self.now_ticks = now_ticks;
        let Some(launched) = self.launched.get_mut(&program) else {
            return;
        };
        launched.stopping = true;
        let mut sends = Vec::new();
        for (&peer, state) in launched.peers.iter_mut() {
            if state.stop.is_none() && !state.down_reported {
                state.stop = Some((false, Retry::new(now_ticks, &self.timing)));
                sends.push(peer);
            }
        }
        for peer in sends {
            self.send(peer, ProgramMessage::Stop { program });
        }
        self.stop_local(program);
        self.maybe_forget_launched(program);
    }

    /// The launcher's connection closed: nobody hears the events any more.
    pub fn launcher_gone(&mut self, now_ticks: u64, conn: ConnId) {
        let programs: Vec<ProgramId> = self
            .launched
            .iter()
            .filter(|(_, l)| l.launcher == conn)
            .map(|(&p, _)| p)
            .collect();
        for program in programs {
            self.stop(now_ticks, program);
        }
    }

    fn maybe_forget_launched(&mut self, program: ProgramId) {
        let Some(launched) = self.launched.get(&program) else {
            return;
        };
        // Until each instance's end has been told (or its node is down): the launcher
        // waits to hear it, with the output before it.
        let settled = launched
            .peers
            .values()
            .all(|p| p.down_reported || (p.ended && matches!(p.stop, Some((true, _)))));
        if launched.stopping && settled {
            self.launched.remove(&program);
        }
    }

    // -----------------------------------------------------------------------------
    // Worker side.

    /// This node's daemon reports on its worker instance of `program` (or the origin's
    /// instance ends: not reported here, the launcher sees it itself).
    pub fn worker_event(&mut self, now_ticks: u64, program: ProgramId, event: WorkerEvent) {
        self.now_ticks = now_ticks;
        let Some(hosted) = self.hosted.get_mut(&program) else {
            return;
        };
        debug_assert!(hosted.worker, "events come from worker instances only");
        if let WorkerEvent::Output { bytes, .. } = &event {
            assert!(
                bytes.len() <= MAX_OUTPUT_CHUNK_BYTES,
                "output chunk over bound"
            );
        }
        let exited = matches!(event, WorkerEvent::Exited(_) | WorkerEvent::Refused { .. });
        let seq = hosted.next_seq;
        hosted.next_seq += 1;
        hosted.backlog_bytes += event.size_bytes();
        hosted.unacked.push_back((seq, event.clone()));
        if hosted.resend.is_none() {
            hosted.resend = Some(Retry::new(now_ticks, &self.timing));
        }
        if exited {
            hosted.serving = None;
            hosted.ended = true;
        }
        let origin = hosted.origin;
        self.send(
            origin,
            ProgramMessage::Event {
                program,
                seq,
                event,
            },
        );
    }

    /// A connection of an instance on this node serves `program`'s threads.
    pub fn serve_threads(&mut self, program: ProgramId, conn: ConnId) -> bool {
        let Some(hosted) = self.hosted.get_mut(&program) else {
            return false;
        };
        if hosted.stopped || hosted.serving.is_some() {
            return false;
        }
        hosted.serving = Some(conn);
        let waiting = std::mem::take(&mut hosted.waiting);
        for (thread, (from, record_addr, _)) in waiting {
            self.deliver(program, thread, record_addr, from);
        }
        true
    }

    /// A connection closed: it serves no threads, and launched programs it heard lose
    /// their launcher.
    pub fn conn_closed(&mut self, now_ticks: u64, conn: ConnId) {
        for hosted in self.hosted.values_mut() {
            if hosted.serving == Some(conn) {
                hosted.serving = None;
            }
        }
        let spawns: Vec<ThreadId> = self
            .spawns
            .iter()
            .filter(|(_, s)| s.conn == conn)
            .map(|(&t, _)| t)
            .collect();
        // The spawn goes on (the thread will run), but nobody hears the answer.
        for thread in spawns {
            self.spawns.get_mut(&thread).expect("listed").conn = ConnId::MAX;
        }
        self.launcher_gone(now_ticks, conn);
    }

    fn stop_local(&mut self, program: ProgramId) {
        let Some(hosted) = self.hosted.get_mut(&program) else {
            return;
        };
        if hosted.stopped {
            return;
        }
        hosted.stopped = true;
        hosted.waiting.clear();
        let conn = hosted.serving.take();
        let is_worker = hosted.worker;
        self.end_spawns_of(program);
        if is_worker || conn.is_some() {
            self.effects
                .push(ProgramEffect::StopWorker { program, conn });
        }
        self.maybe_forget_hosted(program);
    }

    fn maybe_forget_hosted(&mut self, program: ProgramId) {
        // A worker stays until its end is reported and acknowledged.
        let forget = self
            .hosted
            .get(&program)
            .is_some_and(|h| h.stopped && h.unacked.is_empty() && (h.ended || !h.worker));
        if forget {
            self.hosted.remove(&program);
            self.note_ended(program);
        }
    }

    fn note_ended(&mut self, program: ProgramId) {
        if self.ended.len() >= MAX_PROGRAMS {
            let oldest = *self.ended.iter().next().expect("non-empty");
            self.ended.remove(&oldest);
        }
        self.ended.insert(program);
    }

    /// Spawns of `program` from here end with it (they may have run).
    fn end_spawns_of(&mut self, program: ProgramId) {
        let threads: Vec<ThreadId> = self
            .spawns
            .iter()
            .filter(|(_, s)| s.program == program)
            .map(|(&t, _)| t)
            .collect();
        for thread in threads {
            let spawn = self.spawns.remove(&thread).expect("listed");
            self.answer_spawn(spawn, Err(SpawnError::NodeDown));
        }
    }

    // -----------------------------------------------------------------------------
    // Spawns.

    /// An instance on this node asks for a thread on `target`.
    pub fn spawn(&mut self, now_ticks: u64, request: SpawnRequest, target_up: bool) {
        self.now_ticks = now_ticks;
        let SpawnRequest {
            conn,
            request_id,
            program,
            target,
            record_addr,
        } = request;
        let answer = |result| ProgramEffect::SpawnAnswer {
            conn,
            request_id,
            result,
        };
        if self.hosted.get(&program).is_none_or(|h| h.stopped) {
            return self.effects.push(answer(Err(SpawnError::NoInstance)));
        }
        if !target_up {
            return self.effects.push(answer(Err(SpawnError::NodeDown)));
        }
        if self.spawns.len() >= MAX_SPAWNS_IN_FLIGHT {
            return self.effects.push(answer(Err(SpawnError::Busy)));
        }
        let thread = (self.node << THREAD_NODE_SHIFT) | self.next_thread;
        self.next_thread += 1;
        if target == self.node {
            // This node's instance runs it now, or there is none to run it.
            let serving = self.hosted[&program].serving.is_some();
            let result = if serving {
                self.deliver(program, thread, record_addr, self.node);
                Ok(thread)
            } else {
                Err(SpawnError::NoInstance)
            };
            return self.effects.push(answer(result));
        }
        if self.mutant_spawn_not_retried {
            self.send(
                target,
                ProgramMessage::Spawn {
                    program,
                    thread,
                    record_addr,
                },
            );
            return self.effects.push(answer(Ok(thread)));
        }
        self.spawns.insert(
            thread,
            Spawn {
                conn,
                request_id,
                program,
                target,
                record_addr,
                retry: Retry::new(now_ticks, &self.timing),
            },
        );
        self.send(
            target,
            ProgramMessage::Spawn {
                program,
                thread,
                record_addr,
            },
        );
    }

    /// Hands a thread to this node's instance, or keeps it until the instance serves
    /// threads. Returns whether it is kept waiting.
    fn deliver(
        &mut self,
        program: ProgramId,
        thread: ThreadId,
        record_addr: u64,
        from: NodeId,
    ) -> bool {
        let now = self.now_ticks;
        let deadline = now + self.timing.spawn_timeout_ticks;
        let Some(hosted) = self.hosted.get_mut(&program) else {
            return false;
        };
        if hosted.stopped {
            return false;
        }
        if (hosted.delivered.contains(&thread) && !self.mutant_spawn_not_deduplicated)
            || hosted.refused.contains(&thread)
        {
            return false;
        }
        match hosted.serving {
            Some(conn) => {
                if hosted.delivered.len() >= SPAWN_DEDUPE_WINDOW {
                    let oldest = *hosted.delivered.iter().next().expect("non-empty");
                    hosted.delivered.remove(&oldest);
                }
                hosted.delivered.insert(thread);
                self.effects.push(ProgramEffect::RunThread {
                    conn,
                    thread,
                    record_addr,
                });
                false
            }
            None => {
                if hosted.waiting.len() < SPAWN_DEDUPE_WINDOW {
                    hosted.waiting.insert(thread, (from, record_addr, deadline));
                }
                true
            }
        }
    }

    // -----------------------------------------------------------------------------
    // Peer messages.

    pub fn on_message(&mut self, now_ticks: u64, from: NodeId, message: ProgramMessage) {
        self.now_ticks = now_ticks;
        match message {
            ProgramMessage::Launch { program, spec } => {
                if program_origin(program) != from {
                    return;
                }
                if !self.hosted.contains_key(&program) && !self.ended.contains(&program) {
                    if self.launched.len() + self.hosted.len() >= MAX_PROGRAMS {
                        // Not acknowledged: the origin retries, and we may have room then.
                        return;
                    }
                    let mut hosted = Hosted::new(from, true);
                    if let Some((_, refused)) = self.unknown_spawned.remove(&program) {
                        hosted.refused = refused;
                    }
                    self.hosted.insert(program, hosted);
                    self.effects
                        .push(ProgramEffect::StartWorker { program, spec });
                }
                self.send(from, ProgramMessage::LaunchAck { program });
            }
            ProgramMessage::LaunchAck { program } => {
                if let Some(peer) = self
                    .launched
                    .get_mut(&program)
                    .and_then(|l| l.peers.get_mut(&from))
                {
                    peer.launch_acked = true;
                }
            }
            ProgramMessage::Event {
                program,
                seq,
                event,
            } => {
                let Some(launched) = self.launched.get_mut(&program) else {
                    // Forgotten (stopped and settled): acknowledge so the sender ends.
                    if program_origin(program) == self.node {
                        self.send(from, ProgramMessage::EventAck { program, seq });
                    }
                    return;
                };
                let launcher = launched.launcher;
                let Some(peer) = launched.peers.get_mut(&from) else {
                    return;
                };
                if seq >= peer.expected_seq && seq < peer.expected_seq + MAX_RESEND_EVENTS as u64 {
                    peer.ahead.insert(seq, event);
                }
                // Everything contiguous from the expected one, in order.
                while let Some(event) = peer.ahead.remove(&peer.expected_seq) {
                    peer.expected_seq += 1;
                    peer.launch_acked = true;
                    if matches!(event, WorkerEvent::Exited(_) | WorkerEvent::Refused { .. }) {
                        peer.ended = true;
                    }
                    self.effects.push(ProgramEffect::Report {
                        conn: launcher,
                        report: LauncherReport::Event { node: from, event },
                    });
                }
                let acked = peer.expected_seq - 1;
                if acked > 0 {
                    self.send(
                        from,
                        ProgramMessage::EventAck {
                            program,
                            seq: acked,
                        },
                    );
                }
                self.maybe_forget_launched(program);
            }
            ProgramMessage::EventAck { program, seq } => {
                let Some(hosted) = self.hosted.get_mut(&program) else {
                    return;
                };
                if hosted.origin != from {
                    return;
                }
                while hosted.unacked.front().is_some_and(|(s, _)| *s <= seq) {
                    let (_, event) = hosted.unacked.pop_front().expect("front");
                    hosted.backlog_bytes -= event.size_bytes();
                }
                hosted.resend = if hosted.unacked.is_empty() {
                    None
                } else {
                    Some(Retry::new(now_ticks, &self.timing))
                };
                self.maybe_forget_hosted(program);
            }
            ProgramMessage::Stop { program } => {
                if self.hosted.get(&program).is_some_and(|h| h.origin == from) {
                    self.stop_local(program);
                }
                self.send(from, ProgramMessage::StopAck { program });
            }
            ProgramMessage::StopAck { program } => {
                if let Some(peer) = self
                    .launched
                    .get_mut(&program)
                    .and_then(|l| l.peers.get_mut(&from))
                {
                    if let Some((acked, _)) = &mut peer.stop {
                        *acked = true;
                    }
                }
                self.maybe_forget_launched(program);
            }
            ProgramMessage::Spawn {
                program,
                thread,
                record_addr,
            } => {
                if thread >> THREAD_NODE_SHIFT != from {
                    return;
                }
                let live = self.hosted.get(&program).is_some_and(|h| !h.stopped);
                if !live {
                    // Not launched here yet: no answer, the spawner tries again, for a
                    // while. Ended here: it may have run before.
                    if self.ended.contains(&program) || self.hosted.contains_key(&program) {
                        let outcome = SpawnOutcome::Ended;
                        self.send(from, ProgramMessage::SpawnAck { thread, outcome });
                        return;
                    }
                    if !self.unknown_spawned.contains_key(&program)
                        && self.unknown_spawned.len() >= MAX_UNKNOWN_SPAWNED_PROGRAMS
                    {
                        let oldest = self
                            .unknown_spawned
                            .iter()
                            .min_by_key(|&(_, (tick, _))| *tick)
                            .map(|(&p, _)| p)
                            .expect("non-empty");
                        self.unknown_spawned.remove(&oldest);
                    }
                    let (first, refused) = self
                        .unknown_spawned
                        .entry(program)
                        .or_insert((self.now_ticks, BTreeSet::new()));
                    if self.now_ticks.saturating_sub(*first) >= self.timing.spawn_timeout_ticks {
                        // Bounded like a program's own window: past it, a refused thread
                        // is not remembered (a launch that late is not expected).
                        if refused.len() < SPAWN_DEDUPE_WINDOW {
                            refused.insert(thread);
                        }
                        let outcome = SpawnOutcome::Refused;
                        self.send(from, ProgramMessage::SpawnAck { thread, outcome });
                    }
                    return;
                }
                let waiting = self.deliver(program, thread, record_addr, from);
                if !waiting {
                    let outcome = if self.hosted[&program].delivered.contains(&thread) {
                        SpawnOutcome::Delivered
                    } else {
                        SpawnOutcome::Refused
                    };
                    self.send(from, ProgramMessage::SpawnAck { thread, outcome });
                }
            }
            ProgramMessage::SpawnAck { thread, outcome } => {
                let Some(spawn) = self.spawns.get(&thread) else {
                    return;
                };
                if spawn.target != from {
                    return;
                }
                let spawn = self.spawns.remove(&thread).expect("present");
                let result = match outcome {
                    SpawnOutcome::Delivered => Ok(thread),
                    SpawnOutcome::Refused => Err(SpawnError::NoInstance),
                    SpawnOutcome::Ended => Err(SpawnError::NodeDown),
                };
                self.answer_spawn(spawn, result);
            }
        }
    }

    fn answer_spawn(&mut self, spawn: Spawn, result: Result<ThreadId, SpawnError>) {
        if spawn.conn != ConnId::MAX {
            self.effects.push(ProgramEffect::SpawnAnswer {
                conn: spawn.conn,
                request_id: spawn.request_id,
                result,
            });
        }
    }

    // -----------------------------------------------------------------------------
    // Time and membership.

    /// Retries what is unacknowledged, gives up on what waited too long, and ends what
    /// concerns nodes declared down (`is_down`).
    pub fn tick(&mut self, now_ticks: u64, is_down: &dyn Fn(NodeId) -> bool) {
        self.now_ticks = now_ticks;
        let timing = self.timing;
        let mut sends: Vec<(NodeId, ProgramMessage)> = Vec::new();
        let mut reports: Vec<(ConnId, LauncherReport)> = Vec::new();
        for (&program, launched) in self.launched.iter_mut() {
            for (&peer, state) in launched.peers.iter_mut() {
                if state.down_reported {
                    continue;
                }
                if is_down(peer) {
                    state.down_reported = true;
                    reports.push((launched.launcher, LauncherReport::NodeDown { node: peer }));
                    continue;
                }
                if !state.launch_acked && state.launch_retry.due(now_ticks) {
                    state.launch_retry.back_off(now_ticks, &timing);
                    sends.push((
                        peer,
                        ProgramMessage::Launch {
                            program,
                            spec: launched.spec.clone(),
                        },
                    ));
                }
                if let Some((false, retry)) = &mut state.stop {
                    if retry.due(now_ticks) {
                        retry.back_off(now_ticks, &timing);
                        sends.push((peer, ProgramMessage::Stop { program }));
                    }
                }
            }
        }
        let mut ended: Vec<ProgramId> = Vec::new();
        for (&program, hosted) in self.hosted.iter_mut() {
            if hosted.origin != self.node && is_down(hosted.origin) {
                // Nobody to report to: the program has lost its main instance.
                ended.push(program);
                hosted.unacked.clear();
                hosted.backlog_bytes = 0;
                continue;
            }
            let expired: Vec<ThreadId> = hosted
                .waiting
                .iter()
                .filter(|(_, &(_, _, deadline))| deadline <= now_ticks)
                .map(|(&t, _)| t)
                .collect();
            for thread in expired {
                let (from, _, _) = hosted.waiting.remove(&thread).expect("listed");
                if hosted.refused.len() >= SPAWN_DEDUPE_WINDOW {
                    let oldest = *hosted.refused.iter().next().expect("non-empty");
                    hosted.refused.remove(&oldest);
                }
                hosted.refused.insert(thread);
                sends.push((
                    from,
                    ProgramMessage::SpawnAck {
                        thread,
                        outcome: SpawnOutcome::Refused,
                    },
                ));
            }
            if let Some(retry) = &mut hosted.resend {
                if retry.due(now_ticks) {
                    retry.back_off(now_ticks, &timing);
                    for (seq, event) in hosted.unacked.iter().take(MAX_RESEND_EVENTS) {
                        sends.push((
                            hosted.origin,
                            ProgramMessage::Event {
                                program,
                                seq: *seq,
                                event: event.clone(),
                            },
                        ));
                    }
                }
            }
        }
        for program in ended {
            self.stop_local(program);
            self.hosted.remove(&program);
            self.note_ended(program);
        }
        let mut failed: Vec<(ThreadId, SpawnError)> = Vec::new();
        for (&thread, spawn) in self.spawns.iter_mut() {
            if is_down(spawn.target) {
                failed.push((thread, SpawnError::NodeDown));
            } else if spawn.retry.due(now_ticks) {
                spawn.retry.back_off(now_ticks, &timing);
                sends.push((
                    spawn.target,
                    ProgramMessage::Spawn {
                        program: spawn.program,
                        thread,
                        record_addr: spawn.record_addr,
                    },
                ));
            }
        }
        for (thread, error) in failed {
            let spawn = self.spawns.remove(&thread).expect("listed");
            self.answer_spawn(spawn, Err(error));
        }
        for (conn, report) in reports {
            self.effects.push(ProgramEffect::Report { conn, report });
        }
        for (to, message) in sends {
            self.send(to, message);
        }
        let programs: Vec<ProgramId> = self.launched.keys().copied().collect();
        for program in programs {
            self.maybe_forget_launched(program);
        }
    }

    /// The next tick at which `tick` has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let launches = self.launched.values().flat_map(|l| {
            l.peers.values().filter_map(|p| {
                if !p.launch_acked {
                    Some(p.launch_retry.next_tick)
                } else if let Some((false, retry)) = &p.stop {
                    Some(retry.next_tick)
                } else {
                    None
                }
            })
        });
        let resends = self
            .hosted
            .values()
            .filter_map(|h| h.resend.map(|r| r.next_tick));
        let spawns = self.spawns.values().map(|s| s.retry.next_tick);
        let waiting = self
            .hosted
            .values()
            .flat_map(|h| h.waiting.values().map(|&(_, _, deadline)| deadline));
        launches.chain(resends).chain(spawns).chain(waiting).min()
    }
}

impl Hosted {
    fn new(origin: NodeId, worker: bool) -> Hosted {
        Hosted {
            origin,
            serving: None,
            worker,
            next_seq: 1,
            unacked: VecDeque::new(),
            backlog_bytes: 0,
            resend: None,
            delivered: BTreeSet::new(),
            refused: BTreeSet::new(),
            waiting: BTreeMap::new(),
            stopped: false,
            ended: false,
        }
    }
}
