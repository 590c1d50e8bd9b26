//! `Host`: one node and the processes attached to it, as one sans-IO state machine.
//!
//! The `Node` speaks to peers and thinks in node-level access. Every process attached
//! to this node maps the space itself and holds its own access per page, which only it
//! can change (`mprotect`). The host sits between the two and owns everything about
//! processes: sessions and their connections, each process's grants, multi-page fault
//! groups, revocation fan-out and deferral behind grants in flight, revocation timeouts
//! and the kill decision, what a closed connection or a `Detach` means, and which peer
//! may speak for which member.
//!
//! Inputs: application connections, frames and closes, the state of a process the host
//! asked about, peer hellos and frames, finished revocations, time. Outputs:
//! [`HostAction`]s (frames to send, pages to write, processes to probe or kill). The
//! daemon and the simulator drive the same code.
//!
//! Within one node every process maps the same memory (the daemon's memfd), so two
//! processes of one node may both write a page: the hardware keeps them coherent. What
//! the host guarantees is the node-level promise at process level: once the node has
//! given a page up (a revocation done), no process of this node exceeds what is left.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::dedupe::Seen;
use crate::futex::{FutexMessage, FutexTable, RemoteWake, RemoteWakes, Waiter, WakeTiming};
use crate::ipc::{
    name_from_field, ErrorCode, Frame, FutexOutcome, IpcDecodeError, IpcMessage, IpcStats, Role,
    IPC_FRAME_BYTES, IPC_VERSION, MAX_FAULT_PAGES,
};
use crate::meta::NodeStatus;
use crate::node::{
    Action, AppError, AppReply, AppRequest, AppToken, Config, Node, PersistedRaft, RaftWrite,
};
use crate::programs::{
    LauncherReport, ProgramEffect, ProgramId, ProgramTiming, Programs, SpawnError, SpawnRequest,
    WorkerEvent, WorkerExit, MAX_SPEC_BYTES,
};
use crate::types::{Access, NodeId, PageBytes, PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES};
use crate::wire::{Envelope, PeerHello, PeerMessage};

#[cfg(feature = "mutants")]
use crate::mutants::Mutant;

// Without the feature, `Mutant` names still resolve so the code reads the same.
#[cfg(not(feature = "mutants"))]
#[derive(Clone, Copy)]
enum Mutant {
    ForgetClosedSessionAccess,
    RevokeDoneBeforeProcessAnswered,
    RevokeDespiteGrantInFlight,
    LeaveSpaceWhileProcessEnding,
    FutexWaitSkipsCompare,
    FutexWakeSkipsPeers,
}

/// The driver's name for one application connection.
pub type ConnId = u64;
/// One attached process.
pub type SessionId = u64;

/// What a peer connection's transport proved about who is at its other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerProof {
    /// Nothing: a Unix socket in a private directory, or TCP in clear, trusted by the
    /// configuration.
    Unproven,
    /// A certificate of the cluster's CA, naming this member (None: naming no member).
    Certificate(Option<NodeId>),
}

/// This node's memory of its spaces, as the driver holds it (the daemon's memfds).
/// The host reads a futex word from it, at the moment it handles the wait, to decide
/// whether the wait may sleep: any write of this node's processes that a wake follows
/// happened before the wake reached the host, so compare-then-sleep here is atomic
/// with respect to this node's wakes.
pub trait NodeMemory {
    /// The 32-bit word at `offset_bytes` (4-aligned, inside the page) of `page`, read
    /// atomically; None if the driver holds no memory for the page's space.
    fn load_u32(&self, page: PageId, offset_bytes: usize) -> Option<u32>;
}

/// Memory as a map of the pages written so far (the simulator's and the tests'); a
/// page not in it is still the zero page.
impl NodeMemory for BTreeMap<PageId, Box<PageBytes>> {
    fn load_u32(&self, page: PageId, offset_bytes: usize) -> Option<u32> {
        let Some(bytes) = self.get(&page) else {
            return Some(0);
        };
        let word = bytes.get(offset_bytes..offset_bytes.checked_add(4)?)?;
        Some(u32::from_le_bytes(word.try_into().ok()?))
    }
}

/// Who is at the other end of an application connection (`SO_PEERCRED`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Credentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Most application connections at once (each process has a few).
pub const MAX_APP_CONNECTIONS: usize = 4096;
/// Most grants one connection may have sent and not yet reported applied.
const MAX_UNAPPLIED_PER_CONN: usize = 64;
/// Most page ranges one round of a detach revokes (the rest follow as they finish).
const MAX_DETACH_REVOKES_PER_ROUND: usize = 256;
/// Bound on node action rounds per input.
const MAX_ACTION_ROUNDS: usize = 1024;

#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The node's configuration (it holds `revoke_timeout_ticks` too: the node's
    /// failure-detection inequality depends on it).
    pub node: Config,
    /// The daemon's own user: it, root and `app_group` may attach.
    pub owner_uid: u32,
    pub app_group: Option<u32>,
    /// Layout of a space a `Main` hello with `create` makes when it does not exist.
    pub space_base_addr: u64,
    pub space_size_bytes: u64,
    pub space_chunk_size_bytes: u64,
    /// k of a space created without one (`SpaceLayout::replicas`).
    pub space_replicas: u8,
    /// A connection that has not said hello after this long is closed.
    pub hello_timeout_ticks: u64,
}

impl HostConfig {
    pub fn new(node: Config) -> HostConfig {
        HostConfig {
            node,
            owner_uid: 0,
            app_group: None,
            space_base_addr: 0x2000_0000_0000,
            space_size_bytes: 4 << 30,
            space_chunk_size_bytes: 1 << 20,
            space_replicas: crate::types::DEFAULT_REPLICAS,
            hello_timeout_ticks: 5000,
        }
    }

    /// The whole configuration, the node's safety inequalities included.
    pub fn validate(&self) -> Result<(), String> {
        self.node.validate()?;
        if self.hello_timeout_ticks == 0 {
            return Err("hello_timeout_ticks must be non-zero".into());
        }
        if self.space_replicas == 0 || self.space_replicas > crate::types::MAX_REPLICAS {
            return Err(format!(
                "space replicas (k) must be 1 to {}, not {}",
                crate::types::MAX_REPLICAS,
                self.space_replicas
            ));
        }
        Ok(())
    }
}

/// Why the host wants a process dead.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KillReason {
    /// It did not apply a revocation (or a grant) within `revoke_timeout_ticks`.
    RevokeTimeout,
    /// Its Main or Service connection closed while it still maps the space.
    ClosedWhileMapped,
    /// Its space was destroyed while it was attached (this node was declared down).
    SpaceDestroyed,
}

impl KillReason {
    pub fn describe(self) -> &'static str {
        match self {
            KillReason::RevokeTimeout => "it did not give pages back in time",
            KillReason::ClosedWhileMapped => {
                "it closed its daemon connection while still mapping the space"
            }
            KillReason::SpaceDestroyed => "its space was destroyed (this node was declared down)",
        }
    }
}

/// What the driver found when it looked at a process (`HostAction::Probe`), or learnt
/// later (a killed process exiting).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProcessState {
    /// The process has exited: it cannot touch the space.
    Exited,
    /// Alive, but the space is not mapped any more (it called `exec`, for example).
    Unmapped,
    /// Alive and still mapping the space: it may touch pages it was granted.
    Mapped,
}

#[derive(Clone, PartialEq, Debug)]
pub enum HostAction {
    /// Send a frame to a peer (`Envelope::encode`).
    SendPeer(Envelope),
    /// Send an application frame.
    SendApp { conn: ConnId, frame: Frame },
    /// Send the `Welcome` frame with the space's memory attached (`SCM_RIGHTS`). A
    /// driver that cannot back the space sends an `Internal` error and closes `conn`
    /// (telling the host with `app_closed`).
    Welcome {
        conn: ConnId,
        session: SessionId,
        space: SpaceId,
        pid: i32,
        frame: Frame,
    },
    /// The session is over: nothing more will be asked about its process.
    SessionEnded { session: SessionId },
    /// Answer a `Status` request: a `StatusReply` and the status document.
    Status { conn: ConnId, request_id: u64 },
    /// Close an application connection (after flushing what was sent). The host has
    /// already forgotten it; `app_closed` for it is ignored.
    CloseApp { conn: ConnId, why: &'static str },
    /// Write these bytes into this node's memory of `page`.
    WritePage { page: PageId, bytes: Box<PageBytes> },
    /// Every process has given `page` up: call `revoke_finished(token, bytes)`, with
    /// the page's bytes from this node's memory if `want_bytes`.
    FinishRevoke {
        token: u64,
        page: PageId,
        want_bytes: bool,
    },
    /// Find out whether the process of `session` still maps the space; answer with
    /// `process_state`.
    Probe { session: SessionId, pid: i32 },
    /// Kill the process (SIGKILL); answer `process_state(Exited)` once it has exited.
    Kill {
        session: SessionId,
        pid: i32,
        reason: KillReason,
    },
    /// The space is destroyed and no process of this node maps it: its memory can go.
    DropSpace { space: SpaceId },
    /// No process of this node can access these pages of a released run any more:
    /// zero this node's memory of them (punching a hole gives it back), then call
    /// `pages_dropped(token)`.
    DropPages {
        space: SpaceId,
        first_page: u64,
        pages: u64,
        token: u64,
    },
    /// Send an application frame followed by `data` (a `WorkerReport`'s bytes).
    SendAppData {
        conn: ConnId,
        frame: Frame,
        data: Vec<u8>,
    },
    /// Start this node's worker instance of `program` from the encoded
    /// `programs::WorkerSpec`; report what happens with `worker_event`.
    StartWorker { program: ProgramId, spec: Vec<u8> },
    /// End this node's worker instance of `program` (it was told on its connection;
    /// the driver makes sure the process ends, after a grace period).
    StopWorker { program: ProgramId },
    /// Make this change to the node's Raft state durable before carrying out any later
    /// action (`Action::PersistRaft`).
    PersistRaft(RaftWrite),
}

/// Host counters, for status displays.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct HostCounters {
    pub app_requests: u64,
    pub bad_app_frames: u64,
    pub revocations_sent: u64,
    pub processes_killed: u64,
    pub sessions_started: u64,
    pub sessions_ended: u64,
    pub peer_frames_refused: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Live,
    /// `Detach` asked on `conn`: every page is being revoked; the reply ends it.
    Detaching {
        conn: ConnId,
        request_id: u64,
    },
    /// A Main or Service connection closed without a finished detach (or the process
    /// is being killed): the process may still hold what it was granted, so its
    /// revocations wait until the driver says it cannot touch the space any more.
    Ending {
        killed: bool,
    },
}

struct AppConn {
    creds: Credentials,
    role: Option<Role>,
    session: Option<SessionId>,
    hello_deadline_tick: u64,
}

struct Session {
    layout: SpaceLayout,
    pid: i32,
    main: ConnId,
    service: Option<ConnId>,
    conns: BTreeSet<ConnId>,
    phase: Phase,
    /// Highest access granted to this process per page (what a revocation must lower),
    /// with the number of the grant that gave it.
    granted: BTreeMap<u64, (Access, u64)>,
    /// Grants made to this process so far (numbers the entries of `granted`).
    grants_issued: u64,
    /// Pages granted and not yet applied, with how many grants of each are in flight.
    granting: BTreeMap<u64, u32>,
    /// Grants sent per connection and not yet reported applied: (first page, pages).
    unapplied: BTreeMap<ConnId, VecDeque<(u64, u32)>>,
    /// Revocations held back until the grants in flight for that page are applied.
    deferred: Vec<DeferredRevoke>,
}

impl Session {
    fn granted_access(&self, page_index: u64) -> Access {
        self.granted.get(&page_index).map_or(Access::None, |g| g.0)
    }
}

struct DeferredRevoke {
    page_index: u64,
    access: Access,
    /// The node's revocation waiting for it, or 0.
    node_token: u64,
    since_tick: u64,
}

/// A revocation sent to a process's service thread, until it answers.
struct ServiceRevoke {
    session: SessionId,
    first_index: u64,
    pages: u64,
    access: Access,
    node_token: u64,
    /// `grants_issued` when it was sent: a grant numbered above it may have raised the
    /// access again after this revocation's `mprotect`.
    issued_before: u64,
    sent_tick: u64,
    /// The release (`ReleaseWait`) waiting for it, or 0.
    release_token: u64,
}

/// A released run whose pages every process of this node must give up.
struct ReleaseWait {
    space: SpaceId,
    first_index: u64,
    pages: u64,
    since_tick: u64,
    /// Sessions with a grant of these pages still being applied: revoked once applied.
    blocked: BTreeSet<SessionId>,
    /// Sessions whose revocation of the run was sent (or that are ending), until done.
    waiting: BTreeSet<SessionId>,
}

enum Pending {
    Join {
        conn: ConnId,
        request_id: u64,
        name: String,
    },
    /// This node's `DetachSpace` for the space named `name`.
    Leave {
        name: String,
    },
    Request {
        conn: ConnId,
        request_id: u64,
    },
    FaultPart {
        group: u64,
        page_index: u64,
    },
}

struct FaultGroup {
    conn: ConnId,
    request_id: u64,
    session: SessionId,
    first_index: u64,
    pages: u32,
    write: bool,
    remaining: u32,
    granted: Vec<u64>,
    error: Option<IpcMessage>,
}

/// A `Main` hello waiting for this node's membership of its space to settle.
struct Join {
    conn: ConnId,
    request_id: u64,
    create: bool,
    persistent: bool,
    /// k asked (0: `HostConfig::space_replicas`).
    replicas: u8,
}

/// This node's membership of the space with one name, while it changes. One change
/// (create, attach or detach) is in flight at a time: two of them could commit in
/// either order, and a detach that commits after an attach would leave a process
/// attached to a space the cluster may destroy.
#[derive(Default)]
struct Membership {
    changing: bool,
    /// Hellos that wait for the change (at most one per connection).
    waiting: VecDeque<Join>,
}

struct RevokeWait {
    page: PageId,
    want_bytes: bool,
    waiting: BTreeSet<SessionId>,
}

pub struct Host {
    config: HostConfig,
    node: Node,
    now_ticks: u64,
    conns: BTreeMap<ConnId, AppConn>,
    sessions: BTreeMap<SessionId, Session>,
    next_session: SessionId,
    pending: BTreeMap<AppToken, Pending>,
    next_app_token: AppToken,
    fault_groups: BTreeMap<u64, FaultGroup>,
    next_fault_group: u64,
    revokes: BTreeMap<u64, RevokeWait>,
    service_revokes: BTreeMap<u64, ServiceRevoke>,
    /// Released runs, by the node's token.
    release_waits: BTreeMap<u64, ReleaseWait>,
    next_service_token: u64,
    /// The newest incarnation each peer said hello as (see `PeerHello`).
    peer_incarnations: BTreeMap<NodeId, u64>,
    /// Each member's life in the metadata at the last tick (a change is a restart).
    peer_lives: BTreeMap<NodeId, u64>,
    memberships: BTreeMap<String, Membership>,
    /// Names whose membership change was refused at once (`Busy`): tried again at
    /// `membership_retry_tick`, never in a loop within one input.
    membership_retry: BTreeSet<String>,
    membership_retry_tick: u64,
    /// Futex waits of this node's processes.
    futexes: FutexTable,
    /// Futex wakes sent to peers and not yet acknowledged, and those received.
    remote_wakes: RemoteWakes,
    /// Launched programs, worker instances here, thread spawns.
    programs: Programs,
    actions: Vec<HostAction>,
    node_actions: Vec<Action>,
    counters: HostCounters,
}

/// A refusal with no detail.
pub fn refusal(code: ErrorCode) -> IpcMessage {
    IpcMessage::Error { code, detail: 0 }
}

/// The application error frame for a node error.
pub fn error_message(error: AppError) -> IpcMessage {
    let (code, detail) = match error {
        AppError::UnknownSpace => (ErrorCode::UnknownSpace, 0),
        AppError::SpaceRejected(_) => (ErrorCode::SpaceRejected, 0),
        AppError::InvalidArgument(_) => (ErrorCode::InvalidArgument, 0),
        AppError::MembershipRejected(why) => (ErrorCode::MembershipRejected, why as u64),
        AppError::OutOfMemory => (ErrorCode::OutOfMemory, 0),
        AppError::InvalidFree => (ErrorCode::InvalidFree, 0),
        AppError::NotMapped => (ErrorCode::NotMapped, 0),
        AppError::PageLost => (ErrorCode::PageLost, 0),
        AppError::NodeDown(node) => (ErrorCode::NodeDown, node),
        AppError::Evicted => (ErrorCode::Evicted, 0),
        AppError::Busy => (ErrorCode::Busy, 0),
    };
    IpcMessage::Error { code, detail }
}

fn frame_of(request_id: u64, message: IpcMessage) -> Frame {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    message.encode(request_id, &mut frame);
    frame
}

impl Host {
    pub fn new(config: HostConfig) -> Result<Host, String> {
        config.validate()?;
        Host::with_node(Node::new(config.node.clone())?, config)
    }

    /// A daemon restarting from its disk as `config.node.incarnation`
    /// (`Node::restart`): it serves applications once it has rejoined.
    pub fn restart(config: HostConfig, persisted: &PersistedRaft) -> Result<Host, String> {
        config.validate()?;
        Host::with_node(Node::restart(config.node.clone(), persisted)?, config)
    }

    /// A daemon's first start as a node the cluster will add (`Node::join`).
    pub fn join_cluster(config: HostConfig) -> Result<Host, String> {
        config.validate()?;
        Host::with_node(Node::join(config.node.clone())?, config)
    }

    fn with_node(node: Node, config: HostConfig) -> Result<Host, String> {
        let timing = ProgramTiming {
            retry_base_ticks: config.node.retry_base_ticks,
            retry_max_ticks: config.node.retry_max_ticks,
            // A spawn waits at most as long as it takes to declare the target down.
            spawn_timeout_ticks: config.node.down_after_ticks,
        };
        #[allow(unused_mut)]
        let mut programs = Programs::new(config.node.id, config.node.incarnation, timing);
        #[allow(unused_mut)]
        let mut remote_wakes = RemoteWakes::new(
            WakeTiming {
                retry_base_ticks: config.node.retry_base_ticks,
                retry_max_ticks: config.node.retry_max_ticks,
            },
            config.node.id_base(),
        );
        #[cfg(feature = "mutants")]
        {
            remote_wakes.mutant_not_retried =
                config.node.mutant == Some(Mutant::FutexRemoteWakeNotRetried);
        }
        #[cfg(feature = "mutants")]
        {
            programs.mutant_spawn_not_retried = config.node.mutant == Some(Mutant::SpawnNotRetried);
            programs.mutant_spawn_not_deduplicated =
                config.node.mutant == Some(Mutant::SpawnNotDeduplicated);
        }
        Ok(Host {
            config,
            node,
            now_ticks: 0,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 1,
            pending: BTreeMap::new(),
            next_app_token: 1,
            fault_groups: BTreeMap::new(),
            next_fault_group: 1,
            revokes: BTreeMap::new(),
            service_revokes: BTreeMap::new(),
            release_waits: BTreeMap::new(),
            next_service_token: 1,
            peer_incarnations: BTreeMap::new(),
            peer_lives: BTreeMap::new(),
            memberships: BTreeMap::new(),
            membership_retry: BTreeSet::new(),
            membership_retry_tick: 0,
            futexes: FutexTable::default(),
            remote_wakes,
            programs,
            actions: Vec::new(),
            node_actions: Vec::new(),
            counters: HostCounters::default(),
        })
    }

    #[cfg(feature = "mutants")]
    fn mutant(&self, mutant: Mutant) -> bool {
        self.config.node.mutant == Some(mutant)
    }

    #[cfg(not(feature = "mutants"))]
    #[inline(always)]
    fn mutant<T>(&self, _mutant: T) -> bool {
        false
    }

    // -----------------------------------------------------------------------------
    // Inspection.

    pub fn node(&self) -> &Node {
        &self.node
    }
    pub fn config(&self) -> &HostConfig {
        &self.config
    }
    pub fn counters(&self) -> HostCounters {
        self.counters
    }
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
    /// The session a connection belongs to.
    pub fn session_of(&self, conn: ConnId) -> Option<SessionId> {
        self.conns.get(&conn).and_then(|c| c.session)
    }

    pub fn drain_actions(&mut self, out: &mut Vec<HostAction>) {
        out.append(&mut self.actions);
    }

    /// The next tick at which `tick` has something to do, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        let timeout = self.config.node.revoke_timeout_ticks;
        let revokes = self
            .service_revokes
            .values()
            .map(|r| r.sent_tick + timeout)
            .chain(
                self.sessions
                    .values()
                    .flat_map(|s| s.deferred.iter().map(|d| d.since_tick + timeout)),
            );
        let releases = self
            .release_waits
            .values()
            .filter(|w| !w.blocked.is_empty())
            .map(|w| w.since_tick + timeout);
        let hellos = self
            .conns
            .values()
            .filter(|c| c.role.is_none())
            .map(|c| c.hello_deadline_tick);
        let retry = (!self.membership_retry.is_empty()).then_some(self.membership_retry_tick);
        let futex = self.futexes.next_deadline();
        let wakes = self.remote_wakes.next_deadline();
        let programs = self.programs.next_deadline();
        // A deadline already past is due now (the next tick).
        let own = revokes
            .chain(releases)
            .chain(hellos)
            .chain(retry)
            .chain(futex)
            .chain(wakes)
            .chain(programs)
            .min()
            .map(|t| t.max(self.now_ticks + 1));
        match (own, self.node.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn set_now(&mut self, now_ticks: u64) {
        debug_assert!(now_ticks >= self.now_ticks, "time went backwards");
        self.now_ticks = self.now_ticks.max(now_ticks);
    }

    // -----------------------------------------------------------------------------
    // Time.

    pub fn tick(&mut self, now_ticks: u64) {
        self.set_now(now_ticks);
        self.node.tick(self.now_ticks);
        self.process_node_actions();
        self.kill_unresponsive();
        self.close_silent_connections();
        for waiter in self.futexes.expire(self.now_ticks) {
            self.answer_wait(waiter, FutexOutcome::TimedOut);
        }
        let meta = self.node.meta();
        // A node the cluster declared down hears from nobody: to it, everyone is.
        let evicted = self.node.is_evicted();
        // A member that restarted since the last tick lost its instances, waits and
        // threads like one that went down: for one tick it counts as down.
        let restarted: BTreeSet<NodeId> = meta
            .incarnations
            .iter()
            .filter(|&(node, life)| self.peer_lives.get(node).is_some_and(|known| known != life))
            .map(|(&node, _)| node)
            .collect();
        self.peer_lives.clone_from(&meta.incarnations);
        let is_down = |node: NodeId| {
            evicted
                || restarted.contains(&node)
                || !matches!(meta.nodes.get(&node), Some(NodeStatus::Up))
        };
        self.programs.tick(self.now_ticks, &is_down);
        let resends = self.remote_wakes.tick(self.now_ticks, &is_down);
        self.apply_program_effects();
        self.send_futex_messages(resends);
        self.answer_settled_wakes();
        if evicted {
            // Peers send this node no wakes any more: its waiters go back to the
            // program, whose next fault gets the eviction's error.
            for waiter in self.futexes.wake_all() {
                self.answer_wait(waiter, FutexOutcome::Woken);
            }
        }
        if !self.membership_retry.is_empty() && self.membership_retry_tick <= self.now_ticks {
            for name in std::mem::take(&mut self.membership_retry) {
                self.membership_settled(&name);
            }
            self.process_node_actions();
        }
    }

    /// A process that does not apply a revocation in time holds pages other nodes wait
    /// for, and nothing can take them back while it maps them: it is killed, and its
    /// revocations complete once it has exited.
    fn kill_unresponsive(&mut self) {
        let timeout = self.config.node.revoke_timeout_ticks;
        let now = self.now_ticks;
        let mut stalled: BTreeSet<SessionId> = self
            .service_revokes
            .values()
            .filter(|r| now.saturating_sub(r.sent_tick) > timeout)
            .map(|r| r.session)
            .collect();
        stalled.extend(
            self.sessions
                .iter()
                .filter(|(_, s)| {
                    s.deferred
                        .iter()
                        .any(|d| now.saturating_sub(d.since_tick) > timeout)
                })
                .map(|(&id, _)| id),
        );
        // A grant never reported applied holds a release back like a revocation.
        for wait in self.release_waits.values() {
            if now.saturating_sub(wait.since_tick) > timeout {
                stalled.extend(wait.blocked.iter().copied());
            }
        }
        for session in stalled {
            self.kill(session, KillReason::RevokeTimeout);
        }
    }

    fn close_silent_connections(&mut self) {
        let now = self.now_ticks;
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.role.is_none() && c.hello_deadline_tick <= now)
            .map(|(&id, _)| id)
            .collect();
        for conn in silent {
            self.close(conn, "no hello in time");
        }
    }

    // -----------------------------------------------------------------------------
    // Peers.

    /// A peer connection said hello: the member it speaks for, or why it is refused.
    /// A connection whose transport proved a member (a certificate) may speak only for
    /// that member. A later incarnation of a member is welcome (a restart, with its
    /// Raft state from its disk); an earlier one than heard already is refused.
    pub fn peer_hello(&mut self, hello: PeerHello, proof: PeerProof) -> Result<NodeId, String> {
        let peer = hello.node;
        if !self.node.is_member(peer) || peer == self.config.node.id {
            self.counters.peer_frames_refused += 1;
            return Err(format!("hello from node {peer}, not a member"));
        }
        if let PeerProof::Certificate(named) = proof {
            if named != Some(peer) {
                self.counters.peer_frames_refused += 1;
                return Err(format!(
                    "claims to be node {peer} but its certificate is not that member's"
                ));
            }
        }
        // A restarted member keeps its Raft state on its disk: a later life is welcome
        // (the node sorts out which of its messages still count), an earlier one is a
        // connection of a life that ended.
        let known = self
            .peer_incarnations
            .entry(peer)
            .or_insert(hello.incarnation);
        if hello.incarnation < *known {
            let known = *known;
            self.counters.peer_frames_refused += 1;
            return Err(format!(
                "node {peer} speaks for incarnation {}, but incarnation {known} of it was heard \
                 already",
                hello.incarnation
            ));
        }
        *known = hello.incarnation;
        Ok(peer)
    }

    /// A frame from a peer connection that said hello as `member`. An error means the
    /// connection should be dropped (a malformed frame, or one claiming another sender).
    pub fn peer_frame(
        &mut self,
        now_ticks: u64,
        member: NodeId,
        bytes: &[u8],
    ) -> Result<(), String> {
        self.set_now(now_ticks);
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                self.counters.peer_frames_refused += 1;
                // Counted by the node as malformed too.
                let _ = self.node.handle_frame(self.now_ticks, bytes);
                return Err(format!("malformed frame from node {member}: {error}"));
            }
        };
        if envelope.from != member {
            self.counters.peer_frames_refused += 1;
            return Err(format!(
                "node {member} sent a frame claiming to be from node {}",
                envelope.from
            ));
        }
        self.node.handle_message(self.now_ticks, envelope);
        self.process_node_actions();
        Ok(())
    }

    /// A frame from the network whose sender the transport cannot vouch for (the
    /// simulator's datagrams): decoded and handed to the node as it is.
    pub fn peer_datagram(&mut self, now_ticks: u64, bytes: &[u8]) {
        self.set_now(now_ticks);
        let _ = self.node.handle_frame(self.now_ticks, bytes);
        self.process_node_actions();
    }

    // -----------------------------------------------------------------------------
    // Applications.

    /// A process connected. Refused (an error frame, then closed) if its user may not
    /// attach or there are too many connections.
    pub fn app_connected(&mut self, now_ticks: u64, conn: ConnId, creds: Credentials) {
        self.set_now(now_ticks);
        let allowed = creds.uid == self.config.owner_uid
            || creds.uid == 0
            || self.config.app_group == Some(creds.gid);
        let code = if !allowed {
            Some(ErrorCode::PermissionDenied)
        } else if self.conns.len() >= MAX_APP_CONNECTIONS || self.conns.contains_key(&conn) {
            Some(ErrorCode::Busy)
        } else {
            None
        };
        if let Some(code) = code {
            self.actions.push(HostAction::SendApp {
                conn,
                frame: frame_of(0, refusal(code)),
            });
            self.actions.push(HostAction::CloseApp {
                conn,
                why: code.describe(),
            });
            return;
        }
        self.conns.insert(
            conn,
            AppConn {
                creds,
                role: None,
                session: None,
                hello_deadline_tick: self.now_ticks + self.config.hello_timeout_ticks,
            },
        );
    }

    /// A connection ended (end of stream, error, or a close the driver decided).
    pub fn app_closed(&mut self, now_ticks: u64, conn: ConnId) {
        self.set_now(now_ticks);
        self.forget_conn(conn);
        self.process_node_actions();
    }

    /// The driver learnt what a process is doing (after `Probe` or `Kill`).
    pub fn process_state(&mut self, now_ticks: u64, session: SessionId, state: ProcessState) {
        self.set_now(now_ticks);
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        match (state, s.phase) {
            (ProcessState::Exited, _) => self.end_session(session),
            (ProcessState::Unmapped, Phase::Ending { killed: false }) => self.end_session(session),
            (ProcessState::Mapped, Phase::Ending { killed: false }) => {
                self.kill(session, KillReason::ClosedWhileMapped)
            }
            // A killed process is waited for until it has exited; a live session was
            // not asked about.
            _ => {}
        }
        self.process_node_actions();
    }

    /// A 64-byte frame arrived on `conn`; `memory` is this node's memory of its spaces
    /// (read for a futex wait).
    pub fn app_frame(
        &mut self,
        now_ticks: u64,
        conn: ConnId,
        frame: &Frame,
        memory: &dyn NodeMemory,
    ) {
        self.set_now(now_ticks);
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.counters.app_requests += 1;
        match IpcMessage::decode(frame) {
            Ok((request_id, message)) => self.on_app_message(conn, request_id, message, memory),
            Err(error) => {
                self.counters.bad_app_frames += 1;
                let (code, detail) = match error {
                    IpcDecodeError::Version(_) => (ErrorCode::VersionMismatch, IPC_VERSION as u64),
                    _ => (ErrorCode::BadFrame, 0),
                };
                self.send_app(conn, 0, IpcMessage::Error { code, detail });
                self.close(conn, "bad frame");
            }
        }
        self.process_node_actions();
    }

    /// The driver zeroed this node's memory of a released run (`HostAction::DropPages`).
    pub fn pages_dropped(&mut self, now_ticks: u64, token: u64) {
        self.set_now(now_ticks);
        self.node.handle_release_done(self.now_ticks, token);
        self.process_node_actions();
    }

    /// The bytes of a finished revocation (`HostAction::FinishRevoke`).
    pub fn revoke_finished(&mut self, now_ticks: u64, token: u64, bytes: Option<Box<PageBytes>>) {
        self.set_now(now_ticks);
        self.node.handle_revoke_done(self.now_ticks, token, bytes);
        self.process_node_actions();
    }

    fn send_app(&mut self, conn: ConnId, request_id: u64, message: IpcMessage) {
        if self.conns.contains_key(&conn) {
            self.actions.push(HostAction::SendApp {
                conn,
                frame: frame_of(request_id, message),
            });
        }
    }

    /// Closes a connection from this side, with what a close means.
    fn close(&mut self, conn: ConnId, why: &'static str) {
        if self.conns.contains_key(&conn) {
            self.actions.push(HostAction::CloseApp { conn, why });
            self.forget_conn(conn);
        }
    }

    fn forget_conn(&mut self, conn: ConnId) {
        let Some(state) = self.conns.remove(&conn) else {
            return;
        };
        self.futexes.remove_conn(conn);
        self.remote_wakes.remove_conn(conn);
        self.programs.conn_closed(self.now_ticks, conn);
        self.apply_program_effects();
        let Some(session_id) = state.session else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return;
        };
        session.conns.remove(&conn);
        // Grants sent on this connection that its thread never reported applied: the
        // thread is gone, so nothing will apply them later and undo a revocation.
        let unapplied = session.unapplied.remove(&conn).unwrap_or_default();
        for (first, pages) in unapplied {
            self.release_grants(session_id, first, pages);
        }
        let forget = self.mutant(Mutant::ForgetClosedSessionAccess);
        let session = self.sessions.get_mut(&session_id).expect("present");
        let vital = conn == session.main || session.service == Some(conn);
        if session.service == Some(conn) {
            session.service = None;
        }
        if !vital {
            return;
        }
        match session.phase {
            Phase::Live | Phase::Detaching { .. } => {
                if forget {
                    self.end_session(session_id);
                    return;
                }
                // The process may still map the space with what it was granted: find
                // out before anything it holds is given away.
                let pid = session.pid;
                session.phase = Phase::Ending { killed: false };
                self.close_session_conns(session_id);
                self.actions.push(HostAction::Probe {
                    session: session_id,
                    pid,
                });
            }
            Phase::Ending { .. } => {}
        }
    }

    /// Closes every connection still open for `session` (no more grants reach it).
    fn close_session_conns(&mut self, session_id: SessionId) {
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return;
        };
        let conns: Vec<ConnId> = std::mem::take(&mut session.conns).into_iter().collect();
        session.service = None;
        for conn in conns {
            if let Some(state) = self.conns.remove(&conn) {
                let _ = state;
                self.futexes.remove_conn(conn);
                self.remote_wakes.remove_conn(conn);
                self.programs.conn_closed(self.now_ticks, conn);
                self.actions.push(HostAction::CloseApp {
                    conn,
                    why: "session ending",
                });
            }
        }
        // Grants sent and not reported applied may still be applied by a thread that
        // is alive: the session's revocations wait for its end (`end_session`), not
        // for them.
        self.sessions
            .get_mut(&session_id)
            .expect("present")
            .unapplied
            .clear();
    }

    fn kill(&mut self, session_id: SessionId, reason: KillReason) {
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return;
        };
        if session.phase == (Phase::Ending { killed: true }) {
            return;
        }
        session.phase = Phase::Ending { killed: true };
        let pid = session.pid;
        self.counters.processes_killed += 1;
        self.close_session_conns(session_id);
        self.actions.push(HostAction::Kill {
            session: session_id,
            pid,
            reason,
        });
    }

    /// A detached process holds nothing: its connections stay open (it closes them),
    /// but belong to no session any more.
    fn end_session_detached(&mut self, session_id: SessionId) {
        if let Some(session) = self.sessions.get_mut(&session_id) {
            for conn in std::mem::take(&mut session.conns) {
                if let Some(state) = self.conns.get_mut(&conn) {
                    state.session = None;
                }
            }
            session.service = None;
        }
        self.end_session(session_id);
    }

    /// The process of `session_id` cannot touch the space any more: what it held is
    /// free, and every revocation waiting for it goes on.
    fn end_session(&mut self, session_id: SessionId) {
        self.close_session_conns(session_id);
        let Some(session) = self.sessions.remove(&session_id) else {
            return;
        };
        self.counters.sessions_ended += 1;
        self.actions.push(HostAction::SessionEnded {
            session: session_id,
        });
        for DeferredRevoke { node_token, .. } in session.deferred {
            if node_token != 0 {
                self.revoke_progress(node_token, session_id);
            }
        }
        let tokens: Vec<u64> = self
            .service_revokes
            .iter()
            .filter(|(_, r)| r.session == session_id)
            .map(|(&t, _)| t)
            .collect();
        for token in tokens {
            let revoke = self.service_revokes.remove(&token).expect("listed");
            if revoke.node_token != 0 {
                self.revoke_progress(revoke.node_token, session_id);
            }
        }
        let waits: Vec<u64> = self
            .revokes
            .iter()
            .filter(|(_, w)| w.waiting.contains(&session_id))
            .map(|(&t, _)| t)
            .collect();
        for node_token in waits {
            self.revoke_progress(node_token, session_id);
        }
        let releases: Vec<u64> = self
            .release_waits
            .iter()
            .filter(|(_, w)| w.blocked.contains(&session_id) || w.waiting.contains(&session_id))
            .map(|(&t, _)| t)
            .collect();
        for token in releases {
            let wait = self.release_waits.get_mut(&token).expect("listed");
            wait.blocked.remove(&session_id);
            wait.waiting.remove(&session_id);
            self.release_progress(token);
        }
        if self.node.meta().spaces.contains_key(&session.layout.id) {
            self.maybe_leave(&session.layout.name);
        } else {
            self.drop_space_memory_if_unmapped(session.layout.id);
        }
    }

    fn on_app_message(
        &mut self,
        conn: ConnId,
        request_id: u64,
        message: IpcMessage,
        memory: &dyn NodeMemory,
    ) {
        let (role, creds) = match self.conns.get(&conn) {
            Some(c) => (c.role, c.creds),
            None => return,
        };
        match (role, message) {
            (
                None,
                IpcMessage::Hello {
                    role: Role::Main,
                    create,
                    persistent,
                    replicas,
                    name,
                    ..
                },
            ) => {
                let Ok(name) = std::str::from_utf8(name_from_field(&name)) else {
                    return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
                };
                let name = name.to_string();
                // Answered once: a second Main hello before the first is answered is
                // refused like one after it.
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.role = Some(Role::Main);
                }
                let join = Join {
                    conn,
                    request_id,
                    create,
                    persistent,
                    replicas,
                };
                self.join(name, join);
            }
            (
                None,
                IpcMessage::Hello {
                    role: role @ (Role::Thread | Role::Service),
                    session,
                    ..
                },
            ) => {
                let Some(state) = self.sessions.get_mut(&session) else {
                    return self.send_app(conn, request_id, refusal(ErrorCode::UnknownSession));
                };
                if state.pid != creds.pid {
                    return self.send_app(conn, request_id, refusal(ErrorCode::PermissionDenied));
                }
                if state.phase != Phase::Live || (role == Role::Service && state.service.is_some())
                {
                    return self.send_app(conn, request_id, refusal(ErrorCode::BadFrame));
                }
                state.conns.insert(conn);
                if role == Role::Service {
                    state.service = Some(conn);
                }
                let c = self.conns.get_mut(&conn).expect("present");
                c.role = Some(role);
                c.session = Some(session);
                self.send_app(conn, request_id, IpcMessage::Pong);
            }
            (
                None,
                IpcMessage::Hello {
                    role: Role::Admin, ..
                },
            ) => {
                self.conns.get_mut(&conn).expect("present").role = Some(Role::Admin);
                self.send_app(conn, request_id, IpcMessage::Pong);
            }
            (Some(_), IpcMessage::Hello { .. }) => {
                self.send_app(conn, request_id, refusal(ErrorCode::BadFrame))
            }
            (_, IpcMessage::Ping) => self.send_app(conn, request_id, IpcMessage::Pong),
            (Some(_), IpcMessage::Stats) => {
                let stats = self.node.stats();
                let reply = IpcMessage::StatsReply(IpcStats {
                    faults_local: stats.faults_local,
                    faults_remote: stats.faults_remote,
                    frames_sent: stats.frames_sent,
                    frames_received: stats.frames_received,
                    allocations: stats.allocations,
                    pages_held: self.node.held_pages().count().min(u32::MAX as usize) as u32,
                    node_id: self.config.node.id.min(u32::MAX as u64) as u32,
                });
                self.send_app(conn, request_id, reply);
            }
            (Some(_), IpcMessage::Status) => {
                self.actions.push(HostAction::Status { conn, request_id })
            }
            (Some(Role::Admin), IpcMessage::AddMember { node }) => {
                self.submit(
                    Pending::Request { conn, request_id },
                    AppRequest::AddMember { node },
                );
            }
            (Some(Role::Admin), IpcMessage::RemoveMember { node }) => {
                self.submit(
                    Pending::Request { conn, request_id },
                    AppRequest::RemoveMember { node },
                );
            }
            (Some(Role::Admin), IpcMessage::Unpersist { name }) => {
                let Ok(name) = std::str::from_utf8(name_from_field(&name)) else {
                    return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
                };
                let request = AppRequest::Unpersist {
                    name: name.to_string(),
                };
                self.submit(Pending::Request { conn, request_id }, request);
            }
            (Some(Role::Admin), IpcMessage::StopProgram { program }) => {
                self.programs.stop(self.now_ticks, program);
                self.apply_program_effects();
                self.send_app(conn, request_id, IpcMessage::Pong);
            }
            // The spec follows the frame: the driver reads it and calls `app_launch`.
            (_, IpcMessage::Launch { .. }) => {
                self.send_app(conn, request_id, refusal(ErrorCode::BadFrame))
            }
            (Some(Role::Thread), IpcMessage::ServeThreads { program }) => {
                let reply = if self.session_of(conn).is_none() {
                    refusal(ErrorCode::NotAttached)
                } else if self.programs.serve_threads(program, conn) {
                    IpcMessage::Pong
                } else {
                    refusal(ErrorCode::NoInstance)
                };
                // The answer first, then the threads that waited for this connection.
                self.send_app(conn, request_id, reply);
                self.apply_program_effects();
            }
            (
                Some(Role::Main | Role::Thread),
                IpcMessage::SpawnThread {
                    program,
                    node,
                    record_addr,
                },
            ) => {
                if self.session_of(conn).is_none() {
                    return self.send_app(conn, request_id, refusal(ErrorCode::NotAttached));
                }
                if !self.node.meta().nodes.contains_key(&node) {
                    return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
                }
                let up = matches!(self.node.meta().nodes.get(&node), Some(NodeStatus::Up));
                let request = SpawnRequest {
                    conn,
                    request_id,
                    program,
                    target: node,
                    record_addr,
                };
                self.programs.spawn(self.now_ticks, request, up);
                self.apply_program_effects();
            }
            (Some(_), IpcMessage::RevokeDone { token }) => {
                // Only the session the revocation went to may answer it.
                let sent_to = self.service_revokes.get(&token).map(|r| r.session);
                if sent_to.is_some() && sent_to == self.session_of(conn) {
                    self.on_revoke_done(token);
                }
            }
            (Some(_), IpcMessage::GrantApplied { page_addr, pages }) => {
                if let Some(session) = self.session_of(conn) {
                    self.on_grant_applied(session, conn, page_addr, pages);
                }
            }
            (Some(Role::Main | Role::Thread | Role::Service), request) => {
                let Some(session_id) = self.session_of(conn) else {
                    return self.send_app(conn, request_id, refusal(ErrorCode::NotAttached));
                };
                let session = &self.sessions[&session_id];
                if session.phase != Phase::Live {
                    return self.send_app(conn, request_id, refusal(ErrorCode::NotAttached));
                }
                let space = session.layout.id;
                let request = match request {
                    IpcMessage::Fault { addr, write, pages } => {
                        return self.fault_range(conn, request_id, session_id, addr, write, pages)
                    }
                    IpcMessage::Detach => return self.start_detach(session_id, conn, request_id),
                    IpcMessage::FutexWait {
                        addr,
                        expected,
                        timeout_ticks,
                    } => {
                        let wait = (addr, expected, timeout_ticks);
                        return self.futex_wait(conn, request_id, session_id, wait, memory);
                    }
                    IpcMessage::FutexWake { addr, count } => {
                        return self.futex_wake(conn, request_id, session_id, addr, count)
                    }
                    IpcMessage::Allocate {
                        size_bytes,
                        align_bytes,
                    } => AppRequest::Allocate {
                        space,
                        size_bytes,
                        align_bytes,
                    },
                    IpcMessage::Free { addr } => AppRequest::Free { space, addr },
                    IpcMessage::Sync => AppRequest::Sync { space },
                    IpcMessage::LeaseChunks { count } => AppRequest::LeaseChunks { space, count },
                    IpcMessage::ReleaseChunks { addr, count } => {
                        AppRequest::ReleaseChunks { space, addr, count }
                    }
                    _ => return self.send_app(conn, request_id, refusal(ErrorCode::BadFrame)),
                };
                self.submit(Pending::Request { conn, request_id }, request);
            }
            _ => self.send_app(conn, request_id, refusal(ErrorCode::NotAttached)),
        }
    }

    // -----------------------------------------------------------------------------
    // Membership: which spaces this node is attached to, through Raft. A process is
    // welcomed only once the node is in the space's attach set, and the node leaves it
    // when its last process of the space has gone; the space is destroyed everywhere
    // when its set empties (unless persistent).

    fn join(&mut self, name: String, join: Join) {
        if !self.conns.contains_key(&join.conn) {
            return;
        }
        let membership = self.memberships.entry(name.clone()).or_default();
        if membership.changing {
            membership.waiting.push_back(join);
            return;
        }
        let me = self.config.node.id;
        let meta = self.node.meta();
        if let Some(layout) = meta.space_by_name(&name) {
            // A rejoining node's metadata is its earlier life's: the request waits.
            if meta.is_attached(layout.id, me) && self.node.is_serving() {
                let layout = layout.clone();
                let pid = self.conns[&join.conn].creds.pid;
                return self.welcome(join.conn, join.request_id, pid, layout);
            }
        }
        let request = if join.create {
            AppRequest::CreateSpace {
                name: name.clone(),
                base_addr: self.config.space_base_addr,
                size_bytes: self.config.space_size_bytes,
                chunk_size_bytes: self.config.space_chunk_size_bytes,
                flexible_base: true,
                persistent: join.persistent,
                replicas: match join.replicas {
                    0 => self.config.space_replicas,
                    k => k,
                },
            }
        } else {
            AppRequest::AttachSpace { name: name.clone() }
        };
        self.memberships.get_mut(&name).expect("entry").changing = true;
        let pending = Pending::Join {
            conn: join.conn,
            request_id: join.request_id,
            name,
        };
        self.submit(pending, request);
    }

    /// A membership change of `name` is over: the hellos behind it go on, and the node
    /// leaves the space if no process of it is left here.
    fn membership_settled(&mut self, name: &str) {
        let Some(membership) = self.memberships.get_mut(name) else {
            return;
        };
        if membership.changing {
            return;
        }
        let waiting = std::mem::take(&mut membership.waiting);
        for join in waiting {
            self.join(name.to_string(), join);
        }
        self.maybe_leave(name);
        if self
            .memberships
            .get(name)
            .is_some_and(|m| !m.changing && m.waiting.is_empty())
        {
            self.memberships.remove(name);
        }
    }

    /// A change refused at once is tried again later, so a refusal never loops.
    fn retry_membership_later(&mut self, name: String) {
        if self.membership_retry.is_empty() {
            self.membership_retry_tick = self.now_ticks + self.config.node.retry_base_ticks;
        }
        self.membership_retry.insert(name);
    }

    /// Leaves the attach set of `name` if this node is in it and has no process of it.
    fn maybe_leave(&mut self, name: &str) {
        if self
            .memberships
            .get(name)
            .is_some_and(|m| m.changing || !m.waiting.is_empty())
        {
            return;
        }
        let me = self.config.node.id;
        let meta = self.node.meta();
        let Some(space) = meta.space_by_name(name).map(|l| l.id) else {
            return;
        };
        let only_live = self.mutant(Mutant::LeaveSpaceWhileProcessEnding);
        let has_process = self
            .sessions
            .values()
            .any(|s| s.layout.id == space && (!only_live || s.phase == Phase::Live));
        if !meta.is_attached(space, me) || has_process {
            return;
        }
        self.memberships
            .entry(name.to_string())
            .or_default()
            .changing = true;
        let pending = Pending::Leave {
            name: name.to_string(),
        };
        self.submit(pending, AppRequest::DetachSpace { space });
    }

    /// The space is gone on every node. Only a node declared down can still have a
    /// process of it (its own mark-down left every attach set): those are killed.
    fn on_space_dropped(&mut self, space: SpaceId) {
        let orphans: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.layout.id == space)
            .map(|(&id, _)| id)
            .collect();
        for session in orphans {
            self.kill(session, KillReason::SpaceDestroyed);
        }
        for waiter in self.futexes.wake_space(space) {
            self.answer_wait(waiter, FutexOutcome::Woken);
        }
        // The node has forgotten these revocations and releases: nobody waits for them.
        self.revokes.retain(|_, wait| wait.page.space != space);
        self.release_waits.retain(|_, wait| wait.space != space);
        self.drop_space_memory_if_unmapped(space);
    }

    /// Once a destroyed space has no process left here, the driver may free its memory.
    fn drop_space_memory_if_unmapped(&mut self, space: SpaceId) {
        let destroyed = !self.node.meta().spaces.contains_key(&space);
        if destroyed && self.sessions.values().all(|s| s.layout.id != space) {
            self.actions.push(HostAction::DropSpace { space });
        }
    }

    fn submit(&mut self, pending: Pending, request: AppRequest) {
        let token = self.next_app_token;
        self.next_app_token += 1;
        self.pending.insert(token, pending);
        self.node.handle_request(self.now_ticks, token, request);
    }

    fn welcome(&mut self, conn: ConnId, request_id: u64, pid: i32, layout: SpaceLayout) {
        match self.conns.get(&conn) {
            Some(c) if c.session.is_none() => {}
            // One connection, one session.
            Some(_) => return self.send_app(conn, request_id, refusal(ErrorCode::BadFrame)),
            None => return,
        }
        let session = self.next_session;
        self.next_session += 1;
        self.counters.sessions_started += 1;
        let frame = frame_of(
            request_id,
            IpcMessage::Welcome {
                session,
                space: layout.id,
                node: self.config.node.id.min(u32::MAX as u64) as u32,
                base_addr: layout.base_addr,
                size_bytes: layout.size_bytes,
                chunk_size_bytes: layout.chunk_size_bytes,
                root_size_bytes: layout.root_size_bytes,
            },
        );
        let space = layout.id;
        self.sessions.insert(
            session,
            Session {
                layout,
                pid,
                main: conn,
                service: None,
                conns: BTreeSet::from([conn]),
                phase: Phase::Live,
                granted: BTreeMap::new(),
                grants_issued: 0,
                granting: BTreeMap::new(),
                unapplied: BTreeMap::new(),
                deferred: Vec::new(),
            },
        );
        let c = self.conns.get_mut(&conn).expect("present");
        c.role = Some(Role::Main);
        c.session = Some(session);
        self.actions.push(HostAction::Welcome {
            conn,
            session,
            space,
            pid,
            frame,
        });
    }

    // -----------------------------------------------------------------------------
    // Futexes (docs/protocol.md, "Futexes").

    /// The page and in-page offset of a futex word: 4-aligned and in the space.
    fn futex_word(&self, session_id: SessionId, addr: u64) -> Option<(PageId, u32)> {
        let layout = &self.sessions[&session_id].layout;
        let page = layout.page_of(addr)?;
        let offset_bytes = (addr - layout.page_addr(page.index)) as u32;
        addr.is_multiple_of(4).then_some((page, offset_bytes))
    }

    fn futex_wait(
        &mut self,
        conn: ConnId,
        request_id: u64,
        session_id: SessionId,
        (addr, expected, timeout_ticks): (u64, u32, u32),
        memory: &dyn NodeMemory,
    ) {
        let Some((page, offset_bytes)) = self.futex_word(session_id, addr) else {
            return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
        };
        if self.futexes.is_waiting(conn) {
            // A thread sleeps in one futex at a time.
            return self.send_app(conn, request_id, refusal(ErrorCode::BadFrame));
        }
        let done = |outcome| IpcMessage::FutexWaitDone { outcome };
        if self.node.futex_access(page) == Access::None {
            return self.send_app(conn, request_id, done(FutexOutcome::NoCopy));
        }
        let Some(word) = memory.load_u32(page, offset_bytes as usize) else {
            return self.send_app(conn, request_id, refusal(ErrorCode::Internal));
        };
        if word != expected && !self.mutant(Mutant::FutexWaitSkipsCompare) {
            return self.send_app(conn, request_id, done(FutexOutcome::ValueChanged));
        }
        debug_assert!(
            self.futexes.len() < MAX_APP_CONNECTIONS,
            "one wait per connection"
        );
        self.futexes.insert(Waiter {
            conn,
            request_id,
            page,
            offset_bytes,
            deadline_tick: (timeout_ticks > 0).then(|| self.now_ticks + timeout_ticks as u64),
        });
    }

    /// A wake wakes up to `count` waiters of the word here and asks every other live
    /// node to wake up to `count` there too, and is answered once they all answered.
    /// Not only when too few woke here: a thread of this node that started waiting
    /// after the write would otherwise take the wake that an older waiter elsewhere
    /// is owed, and local contention could starve remote waiters for good.
    fn futex_wake(
        &mut self,
        conn: ConnId,
        request_id: u64,
        session_id: SessionId,
        addr: u64,
        count: u32,
    ) {
        let Some((page, offset_bytes)) = self.futex_word(session_id, addr) else {
            return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
        };
        let woken_here = self.wake_here(page, offset_bytes, count);
        let peers = self.live_peers();
        if count == 0 || peers.is_empty() || self.mutant(Mutant::FutexWakeSkipsPeers) {
            return self.send_app(
                conn,
                request_id,
                IpcMessage::FutexWoken { woken: woken_here },
            );
        }
        debug_assert!(
            self.remote_wakes.len() < MAX_APP_CONNECTIONS,
            "one wake per connection"
        );
        let sends = self.remote_wakes.start(
            self.now_ticks,
            (conn, request_id),
            page,
            offset_bytes,
            count,
            woken_here,
            &peers,
        );
        self.send_futex_messages(sends);
        self.answer_settled_wakes();
    }

    /// The other members the cluster has up: where a thread of a program may run.
    fn live_peers(&self) -> Vec<NodeId> {
        self.node
            .meta()
            .up_nodes()
            .filter(|m| *m != self.config.node.id)
            .collect()
    }

    fn send_futex_messages(&mut self, sends: Vec<(NodeId, FutexMessage)>) {
        for (to, message) in sends {
            let envelope = self.node.envelope(to, PeerMessage::Futex(message));
            self.actions.push(HostAction::SendPeer(envelope));
        }
    }

    fn answer_settled_wakes(&mut self) {
        for wake in self.remote_wakes.take_settled() {
            self.answer_remote_wake(wake);
        }
    }

    fn answer_remote_wake(&mut self, wake: RemoteWake) {
        let message = IpcMessage::FutexWoken { woken: wake.woken };
        self.send_app(wake.conn, wake.request_id, message);
    }

    /// A futex message from member `from`.
    fn on_futex_message(&mut self, from: NodeId, message: FutexMessage) {
        match message {
            FutexMessage::Wake {
                wake_id,
                oldest_in_flight,
                page,
                offset_bytes,
                count,
            } => {
                let woken = match self
                    .remote_wakes
                    .check_received(from, wake_id, oldest_in_flight)
                {
                    Seen::Stale => return,
                    Seen::Done(woken) => woken,
                    Seen::New => {
                        let n = self.wake_here(page, offset_bytes, count);
                        self.remote_wakes.record_received(from, wake_id, n);
                        n
                    }
                };
                let ack = FutexMessage::WakeAck { wake_id, woken };
                self.send_futex_messages(vec![(from, ack)]);
            }
            FutexMessage::WakeAck { wake_id, woken } => {
                if let Some(wake) = self.remote_wakes.on_ack(from, wake_id, woken) {
                    self.answer_remote_wake(wake);
                }
            }
        }
    }

    /// Wakes up to `count` waiters of the word on this node; how many it woke.
    fn wake_here(&mut self, page: PageId, offset_bytes: u32, count: u32) -> u32 {
        let woken = self.futexes.wake_word(page, offset_bytes, count);
        let n = woken.len() as u32;
        for waiter in woken {
            self.answer_wait(waiter, FutexOutcome::Woken);
        }
        n
    }

    fn answer_wait(&mut self, waiter: Waiter, outcome: FutexOutcome) {
        let message = IpcMessage::FutexWaitDone { outcome };
        self.send_app(waiter.conn, waiter.request_id, message);
    }

    fn fault_range(
        &mut self,
        conn: ConnId,
        request_id: u64,
        session_id: SessionId,
        addr: u64,
        write: bool,
        pages: u32,
    ) {
        let session = &self.sessions[&session_id];
        if session.service.is_none() {
            return self.send_app(conn, request_id, refusal(ErrorCode::NotAttached));
        }
        let layout = &session.layout;
        let Some(first) = layout.page_of(addr) else {
            return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
        };
        let in_range = first
            .index
            .checked_add(pages as u64)
            .is_some_and(|end| end <= layout.page_count());
        if pages == 0 || pages > MAX_FAULT_PAGES || !in_range {
            return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
        }
        let space = layout.id;
        let first_addr = layout.page_addr(first.index);
        let group = self.next_fault_group;
        self.next_fault_group += 1;
        self.fault_groups.insert(
            group,
            FaultGroup {
                conn,
                request_id,
                session: session_id,
                first_index: first.index,
                pages,
                write,
                remaining: pages,
                granted: Vec::new(),
                error: None,
            },
        );
        let access = if write { Access::Write } else { Access::Read };
        for i in 0..pages as u64 {
            self.submit(
                Pending::FaultPart {
                    group,
                    page_index: first.index + i,
                },
                AppRequest::Fault {
                    space,
                    addr: first_addr + i * PAGE_SIZE_BYTES as u64,
                    access,
                },
            );
        }
    }

    fn fault_part_done(&mut self, group_id: u64, page_index: u64, reply: AppReply) {
        let Some(group) = self.fault_groups.get_mut(&group_id) else {
            return;
        };
        debug_assert!(group.remaining > 0);
        group.remaining -= 1;
        match reply {
            AppReply::Granted { access, .. } if access != Access::None => {
                // Recorded before the grant is sent: what the host believes a process
                // holds is never less than what it may have applied.
                if let Some(session) = self.sessions.get_mut(&group.session) {
                    if session.phase == Phase::Live {
                        session.grants_issued += 1;
                        let number = session.grants_issued;
                        let entry = session
                            .granted
                            .entry(page_index)
                            .or_insert((Access::None, 0));
                        *entry = (entry.0.max(access), number);
                        *session.granting.entry(page_index).or_insert(0) += 1;
                        group.granted.push(page_index);
                    } else {
                        group.error.get_or_insert(refusal(ErrorCode::NotAttached));
                    }
                } else {
                    group.error.get_or_insert(refusal(ErrorCode::NotAttached));
                }
            }
            AppReply::Error(e) => {
                group.error.get_or_insert(error_message(e));
            }
            _ => {
                group.error.get_or_insert(refusal(ErrorCode::Internal));
            }
        }
        if group.remaining > 0 {
            return;
        }
        let group = self.fault_groups.remove(&group_id).expect("present");
        let deliverable = self
            .conns
            .get(&group.conn)
            .is_some_and(|c| c.session == Some(group.session));
        match (group.error, deliverable) {
            (None, true) => {
                let session = self.sessions.get_mut(&group.session).expect("live");
                let queue = session.unapplied.entry(group.conn).or_default();
                let full = queue.len() >= MAX_UNAPPLIED_PER_CONN;
                if !full {
                    queue.push_back((group.first_index, group.pages));
                }
                let page_addr = session.layout.page_addr(group.first_index);
                if full {
                    // A thread that never reports its grants applied holds every
                    // revocation of those pages back: a broken or hostile process.
                    for index in group.granted {
                        self.release_grants(group.session, index, 1);
                    }
                    self.send_app(group.conn, group.request_id, refusal(ErrorCode::BadFrame));
                    return self.close(group.conn, "grants never reported applied");
                }
                self.send_app(
                    group.conn,
                    group.request_id,
                    IpcMessage::Granted {
                        page_addr,
                        write: group.write,
                        pages: group.pages,
                    },
                );
            }
            (error, _) => {
                // Nobody will apply these grants: release their hold on revocations.
                for index in group.granted {
                    self.release_grants(group.session, index, 1);
                }
                let error = error.unwrap_or(refusal(ErrorCode::NotAttached));
                self.send_app(group.conn, group.request_id, error);
            }
        }
    }

    fn on_grant_applied(
        &mut self,
        session_id: SessionId,
        conn: ConnId,
        page_addr: u64,
        pages: u32,
    ) {
        let session = self.sessions.get_mut(&session_id).expect("conn's session");
        let Some(first) = session.layout.page_of(page_addr) else {
            return;
        };
        let Some(queue) = session.unapplied.get_mut(&conn) else {
            return;
        };
        // Only a grant sent on this connection, as it was sent, counts.
        let Some(position) = queue.iter().position(|&g| g == (first.index, pages)) else {
            return;
        };
        queue.remove(position);
        self.release_grants(session_id, first.index, pages);
    }

    /// `pages` grants from `first` are applied (or never will be): revocations held
    /// back behind them go out.
    fn release_grants(&mut self, session_id: SessionId, first: u64, pages: u32) {
        let mut released = Vec::new();
        {
            let Some(session) = self.sessions.get_mut(&session_id) else {
                return;
            };
            if let Phase::Ending { .. } = session.phase {
                // Nothing can reach it: its revocations wait for `end_session`.
                return;
            }
            for index in first..first + pages as u64 {
                let Some(count) = session.granting.get_mut(&index) else {
                    continue;
                };
                *count -= 1;
                if *count == 0 {
                    session.granting.remove(&index);
                    released.push(index);
                }
            }
        }
        for index in released {
            let session = self.sessions.get_mut(&session_id).expect("present");
            let (ready, rest): (Vec<_>, Vec<_>) = session
                .deferred
                .drain(..)
                .partition(|d| d.page_index == index);
            session.deferred = rest;
            for deferred in ready {
                let still_above = self.sessions[&session_id].granted_access(deferred.page_index)
                    > deferred.access;
                if still_above {
                    self.send_revoke(
                        session_id,
                        deferred.page_index,
                        1,
                        deferred.access,
                        deferred.node_token,
                    );
                } else if deferred.node_token != 0 {
                    self.revoke_progress(deferred.node_token, session_id);
                }
            }
        }
        self.unblock_releases(session_id);
        self.detach_progress(session_id);
    }

    fn start_detach(&mut self, session_id: SessionId, conn: ConnId, request_id: u64) {
        let session = self.sessions.get_mut(&session_id).expect("live");
        session.phase = Phase::Detaching { conn, request_id };
        // Its sleeping threads leave the space: woken now, so that no later wake is
        // spent on a thread that will not take the lock it was for.
        let conns: Vec<ConnId> = session.conns.iter().copied().collect();
        for conn in conns {
            if let Some(waiter) = self.futexes.remove_conn(conn) {
                self.answer_wait(waiter, FutexOutcome::Woken);
            }
        }
        self.detach_progress(session_id);
    }

    /// A detaching process gives every page up through its service thread; once it
    /// holds nothing, the session ends and the detach is answered.
    fn detach_progress(&mut self, session_id: SessionId) {
        let Some(session) = self.sessions.get(&session_id) else {
            return;
        };
        let Phase::Detaching { conn, request_id } = session.phase else {
            return;
        };
        let revoking = self
            .service_revokes
            .values()
            .any(|r| r.session == session_id);
        if !session.granting.is_empty() || !session.deferred.is_empty() || revoking {
            return;
        }
        // Runs of pages still held, revoked a range at a time.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (&index, &(access, _)) in &session.granted {
            if access == Access::None {
                continue;
            }
            match runs.last_mut() {
                Some((start, len)) if *start + *len == index => *len += 1,
                _ => {
                    if runs.len() == MAX_DETACH_REVOKES_PER_ROUND {
                        break;
                    }
                    runs.push((index, 1));
                }
            }
        }
        if runs.is_empty() {
            // Answered first: the process closes its connections itself.
            self.send_app(conn, request_id, IpcMessage::Pong);
            self.end_session_detached(session_id);
            return;
        }
        if session.service.is_none() {
            // Cannot happen in Detaching (losing the service connection ends it), but
            // nothing could revoke: treat it as a close.
            return;
        }
        for (start, len) in runs {
            self.send_revoke(session_id, start, len, Access::None, 0);
        }
    }

    // -----------------------------------------------------------------------------
    // Programs and threads (docs/protocol.md, "Programs and threads").

    /// A launcher's `Launch` frame and the spec bytes that followed it (the driver
    /// reads them: at most `MAX_SPEC_BYTES`). Answered `Launched`, or an error.
    pub fn app_launch(&mut self, now_ticks: u64, conn: ConnId, request_id: u64, spec: Vec<u8>) {
        self.set_now(now_ticks);
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        if state.role != Some(Role::Admin) {
            return self.send_app(conn, request_id, refusal(ErrorCode::NotAttached));
        }
        if spec.len() > MAX_SPEC_BYTES {
            return self.send_app(conn, request_id, refusal(ErrorCode::InvalidArgument));
        }
        let peers = self.live_peers();
        match self.programs.launch(self.now_ticks, conn, spec, &peers) {
            Ok(program) => self.send_app(conn, request_id, IpcMessage::Launched { program }),
            Err(_) => self.send_app(conn, request_id, refusal(ErrorCode::Busy)),
        }
        self.apply_program_effects();
    }

    /// The driver reports on this node's worker instance of `program` (after
    /// `StartWorker`): started or refused, output, exit.
    pub fn worker_event(&mut self, now_ticks: u64, program: ProgramId, event: WorkerEvent) {
        self.set_now(now_ticks);
        self.programs.worker_event(self.now_ticks, program, event);
        self.apply_program_effects();
    }

    /// Whether `program` has an instance on this node (launched here, or a worker).
    pub fn hosts_program(&self, program: ProgramId) -> bool {
        self.programs.hosts(program)
    }

    /// Output bytes of `program`'s worker not yet acknowledged by the origin: the
    /// driver reads more only below `programs::MAX_EVENT_BACKLOG_BYTES`.
    pub fn worker_backlog_bytes(&self, program: ProgramId) -> usize {
        self.programs.backlog_bytes(program)
    }

    fn apply_program_effects(&mut self) {
        for effect in self.programs.drain_effects() {
            match effect {
                ProgramEffect::Send { to, message } => {
                    let envelope = self.node.envelope(to, PeerMessage::Program(message));
                    self.actions.push(HostAction::SendPeer(envelope))
                }
                ProgramEffect::Report { conn, report } => self.report(conn, report),
                ProgramEffect::StartWorker { program, spec } => {
                    self.actions.push(HostAction::StartWorker { program, spec })
                }
                ProgramEffect::StopWorker { program, conn } => {
                    if let Some(conn) = conn {
                        self.send_app(conn, 0, IpcMessage::StopThreads);
                    }
                    self.actions.push(HostAction::StopWorker { program });
                }
                ProgramEffect::RunThread {
                    conn,
                    thread,
                    record_addr,
                } => self.send_app(
                    conn,
                    0,
                    IpcMessage::RunThread {
                        thread,
                        record_addr,
                    },
                ),
                ProgramEffect::SpawnAnswer {
                    conn,
                    request_id,
                    result,
                } => {
                    let reply = match result {
                        Ok(thread) => IpcMessage::ThreadSpawned { thread },
                        Err(SpawnError::NoInstance) => refusal(ErrorCode::NoInstance),
                        Err(SpawnError::NodeDown) => refusal(ErrorCode::NodeDown),
                        Err(SpawnError::Busy) => refusal(ErrorCode::Busy),
                    };
                    self.send_app(conn, request_id, reply);
                }
            }
        }
    }

    fn report(&mut self, conn: ConnId, report: LauncherReport) {
        use crate::ipc::{
            REPORT_EXIT_CODE, REPORT_EXIT_SIGNAL, REPORT_NODE_DOWN, REPORT_REFUSED, REPORT_STARTED,
            REPORT_STDERR, REPORT_STDOUT,
        };
        use crate::programs::STREAM_STDOUT;
        let (node, what, value, data) = match report {
            LauncherReport::NodeDown { node } => (node, REPORT_NODE_DOWN, 0, Vec::new()),
            LauncherReport::Event { node, event } => match event {
                WorkerEvent::Started { pid } => (node, REPORT_STARTED, pid, Vec::new()),
                WorkerEvent::Refused { reason } => (node, REPORT_REFUSED, 0, reason),
                WorkerEvent::Output { stream, bytes } => {
                    let what = if stream == STREAM_STDOUT {
                        REPORT_STDOUT
                    } else {
                        REPORT_STDERR
                    };
                    (node, what, 0, bytes)
                }
                WorkerEvent::Exited(WorkerExit::Code(code)) => {
                    (node, REPORT_EXIT_CODE, code as u32, Vec::new())
                }
                WorkerEvent::Exited(WorkerExit::Signal(signal)) => {
                    (node, REPORT_EXIT_SIGNAL, signal as u32, Vec::new())
                }
            },
        };
        if !self.conns.contains_key(&conn) {
            return;
        }
        let frame = frame_of(
            0,
            IpcMessage::WorkerReport {
                node,
                what,
                value,
                len_bytes: data.len() as u32,
            },
        );
        if data.is_empty() {
            self.actions.push(HostAction::SendApp { conn, frame });
        } else {
            self.actions
                .push(HostAction::SendAppData { conn, frame, data });
        }
    }

    // -----------------------------------------------------------------------------
    // The node's actions.

    fn process_node_actions(&mut self) {
        for _ in 0..MAX_ACTION_ROUNDS {
            let mut actions = std::mem::take(&mut self.node_actions);
            self.node.drain_actions(&mut actions);
            if actions.is_empty() {
                self.node_actions = actions;
                return;
            }
            for action in actions.drain(..) {
                self.apply(action);
            }
            self.node_actions = actions;
        }
        panic!("node actions did not settle in {MAX_ACTION_ROUNDS} rounds");
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Send(envelope) => self.actions.push(HostAction::SendPeer(envelope)),
            Action::Reply { token, reply } => self.on_node_reply(token, reply),
            Action::Install { page, bytes, .. } => {
                // Raising access needs nothing here: each process faults and gets it.
                if let Some(bytes) = bytes {
                    self.actions.push(HostAction::WritePage { page, bytes });
                }
            }
            Action::SetAccess { page, access } => self.lower(page, access, None),
            Action::Revoke {
                page,
                access,
                token,
                want_bytes,
            } => self.lower(page, access, Some((token, want_bytes))),
            Action::DropSpace { space } => self.on_space_dropped(space),
            Action::ReleasePages {
                space,
                first_page,
                pages,
                token,
            } => self.start_release(space, first_page, pages, token),
            Action::Program { from, message } => {
                self.programs.on_message(self.now_ticks, from, message);
                self.apply_program_effects();
            }
            Action::Futex { from, message } => self.on_futex_message(from, message),
            Action::PersistRaft(write) => self.actions.push(HostAction::PersistRaft(write)),
        }
    }

    fn on_node_reply(&mut self, token: AppToken, reply: AppReply) {
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        match pending {
            Pending::FaultPart { group, page_index } => {
                self.fault_part_done(group, page_index, reply)
            }
            Pending::Join {
                conn,
                request_id,
                name,
            } => {
                if let Some(membership) = self.memberships.get_mut(&name) {
                    membership.changing = false;
                }
                let pid = self.conns.get(&conn).map(|c| c.creds.pid);
                let refused_at_once = matches!(reply, AppReply::Error(AppError::Busy));
                match (reply, pid) {
                    (AppReply::Space(layout), Some(pid)) => {
                        self.welcome(conn, request_id, pid, layout)
                    }
                    (AppReply::Error(e), _) => self.send_app(conn, request_id, error_message(e)),
                    (_, None) => {}
                    _ => self.send_app(conn, request_id, refusal(ErrorCode::Internal)),
                }
                if refused_at_once {
                    self.retry_membership_later(name);
                } else {
                    self.membership_settled(&name);
                }
            }
            Pending::Leave { name } => {
                if let Some(membership) = self.memberships.get_mut(&name) {
                    membership.changing = false;
                }
                if reply == AppReply::Error(AppError::Busy) {
                    self.retry_membership_later(name);
                } else {
                    self.membership_settled(&name);
                }
            }
            Pending::Request { conn, request_id } => {
                let message = match reply {
                    AppReply::Allocated { addr, size_bytes } => {
                        IpcMessage::Allocated { addr, size_bytes }
                    }
                    AppReply::Freed => IpcMessage::Freed,
                    AppReply::Leased { addr, size_bytes } => {
                        IpcMessage::Leased { addr, size_bytes }
                    }
                    AppReply::Unpersisted { destroyed } => IpcMessage::Unpersisted { destroyed },
                    AppReply::MembershipChanged { node, added } => {
                        IpcMessage::MembershipChanged { node, added }
                    }
                    AppReply::Synced => IpcMessage::Synced,
                    AppReply::Error(e) => error_message(e),
                    AppReply::Granted { .. } | AppReply::Space(_) | AppReply::Detached { .. } => {
                        refusal(ErrorCode::Internal)
                    }
                };
                self.send_app(conn, request_id, message);
            }
        }
    }

    /// Lowers every attached process's access to `page` to `access`. With `wait`, the
    /// node is told (with the bytes if asked) once none of them can exceed it.
    fn lower(&mut self, page: PageId, access: Access, wait: Option<(u64, bool)>) {
        // Futex waiters of the page sleep on: a write elsewhere, which needs this
        // copy gone first, is followed by a wake that reaches them.
        let targets: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.layout.id == page.space && s.granted_access(page.index) > access)
            .map(|(&id, _)| id)
            .collect();
        let node_token = wait.map_or(0, |(token, _)| token);
        if let Some((token, want_bytes)) = wait {
            let waiting = if self.mutant(Mutant::RevokeDoneBeforeProcessAnswered) {
                BTreeSet::new()
            } else {
                targets.iter().copied().collect()
            };
            let previous = self.revokes.insert(
                token,
                RevokeWait {
                    page,
                    want_bytes,
                    waiting,
                },
            );
            assert!(previous.is_none(), "node revocation token {token} reused");
        }
        let send_at_once = self.mutant(Mutant::RevokeDespiteGrantInFlight);
        for &session_id in &targets {
            let session = self.sessions.get_mut(&session_id).expect("listed");
            if let Phase::Ending { .. } = session.phase {
                // Unreachable until the driver says it is gone: `end_session` counts it.
                continue;
            }
            if session.granting.contains_key(&page.index) && !send_at_once {
                session.deferred.push(DeferredRevoke {
                    page_index: page.index,
                    access,
                    node_token,
                    since_tick: self.now_ticks,
                });
            } else {
                self.send_revoke(session_id, page.index, 1, access, node_token);
            }
        }
        if let Some((token, _)) = wait {
            if self
                .revokes
                .get(&token)
                .is_some_and(|w| w.waiting.is_empty())
            {
                self.finish_revoke(token);
            }
        }
    }

    /// Every process of this node gives up the pages of a released run; the node has
    /// already stopped granting them.
    fn start_release(&mut self, space: SpaceId, first_index: u64, pages: u64, token: u64) {
        let end = first_index + pages;
        let first = PageId {
            space,
            index: first_index,
        };
        for waiter in self.futexes.wake_pages(first, pages) {
            self.answer_wait(waiter, FutexOutcome::Woken);
        }
        let mut wait = ReleaseWait {
            space,
            first_index,
            pages,
            since_tick: self.now_ticks,
            blocked: BTreeSet::new(),
            waiting: BTreeSet::new(),
        };
        let targets: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.layout.id == space
                    && (s.granted.range(first_index..end).next().is_some()
                        || s.granting.range(first_index..end).next().is_some())
            })
            .map(|(&id, _)| id)
            .collect();
        let mut reachable = Vec::new();
        for session_id in targets {
            let session = &self.sessions[&session_id];
            if let Phase::Ending { .. } = session.phase {
                // Unreachable until the driver says it is gone: `end_session` counts it.
                wait.waiting.insert(session_id);
            } else if session.granting.range(first_index..end).next().is_some() {
                wait.blocked.insert(session_id);
            } else {
                reachable.push(session_id);
            }
        }
        let previous = self.release_waits.insert(token, wait);
        assert!(previous.is_none(), "release token {token} reused");
        for session_id in reachable {
            self.send_release_revoke(session_id, token);
        }
        self.release_progress(token);
    }

    /// Revokes a session's access to release `token`'s run; the release then waits for
    /// its answer (unless it was never granted anything there).
    fn send_release_revoke(&mut self, session_id: SessionId, token: u64) {
        let wait = &self.release_waits[&token];
        let (first_index, pages) = (wait.first_index, wait.pages);
        if let Some(service_token) =
            self.send_revoke(session_id, first_index, pages, Access::None, 0)
        {
            let revoke = self.service_revokes.get_mut(&service_token).expect("sent");
            revoke.release_token = token;
            let wait = self.release_waits.get_mut(&token).expect("listed");
            wait.waiting.insert(session_id);
        }
    }

    /// A session's grants of a released run are all applied: its revocation goes out.
    fn unblock_releases(&mut self, session_id: SessionId) {
        let Some(session) = self.sessions.get(&session_id) else {
            return;
        };
        let ready: Vec<u64> = self
            .release_waits
            .iter()
            .filter(|(_, w)| {
                w.blocked.contains(&session_id)
                    && session
                        .granting
                        .range(w.first_index..w.first_index + w.pages)
                        .next()
                        .is_none()
            })
            .map(|(&t, _)| t)
            .collect();
        for token in ready {
            let wait = self.release_waits.get_mut(&token).expect("listed");
            wait.blocked.remove(&session_id);
            self.send_release_revoke(session_id, token);
            self.release_progress(token);
        }
    }

    fn release_progress(&mut self, token: u64) {
        let Some(wait) = self.release_waits.get(&token) else {
            return;
        };
        if !wait.blocked.is_empty() || !wait.waiting.is_empty() {
            return;
        }
        let wait = self.release_waits.remove(&token).expect("present");
        self.actions.push(HostAction::DropPages {
            space: wait.space,
            first_page: wait.first_index,
            pages: wait.pages,
            token,
        });
    }

    /// Sends a revocation to the session's service thread; its token, or None if the
    /// session cannot be reached (ending) or was never granted anything.
    fn send_revoke(
        &mut self,
        session_id: SessionId,
        first_index: u64,
        pages: u64,
        access: Access,
        node_token: u64,
    ) -> Option<u64> {
        let session = &self.sessions[&session_id];
        if let Phase::Ending { .. } = session.phase {
            // Unreachable until the driver says it is gone: `end_session` counts it.
            return None;
        }
        let Some(service) = session.service else {
            // A live session without its service thread yet was never granted a page
            // (faults need one); nothing to lower.
            if node_token != 0 {
                self.revoke_progress(node_token, session_id);
            }
            return None;
        };
        // The service thread sets the protection it is told: a revocation must never
        // raise what an earlier one, still in flight, lowers to.
        let access = self
            .service_revokes
            .values()
            .filter(|r| {
                r.session == session_id
                    && r.first_index < first_index + pages
                    && first_index < r.first_index + r.pages
            })
            .map(|r| r.access)
            .fold(access, Access::min);
        let addr = session.layout.page_addr(first_index);
        let token = self.next_service_token;
        self.next_service_token += 1;
        self.service_revokes.insert(
            token,
            ServiceRevoke {
                session: session_id,
                first_index,
                pages,
                access,
                node_token,
                issued_before: session.grants_issued,
                sent_tick: self.now_ticks,
                release_token: 0,
            },
        );
        self.counters.revocations_sent += 1;
        self.send_app(
            service,
            0,
            IpcMessage::Revoke {
                addr,
                len: pages * PAGE_SIZE_BYTES as u64,
                access: access as u8,
                token,
            },
        );
        Some(token)
    }

    fn on_revoke_done(&mut self, token: u64) {
        let Some(revoke) = self.service_revokes.remove(&token) else {
            return;
        };
        if let Some(session) = self.sessions.get_mut(&revoke.session) {
            for index in revoke.first_index..revoke.first_index + revoke.pages {
                if let Some(granted) = session.granted.get_mut(&index) {
                    // A grant after the revocation was sent may have raised the access
                    // again (its mprotect can land after the revocation's).
                    if granted.1 <= revoke.issued_before {
                        granted.0 = granted.0.min(revoke.access);
                    }
                }
            }
            session.granted.retain(|_, g| g.0 != Access::None);
        }
        if revoke.node_token != 0 {
            self.revoke_progress(revoke.node_token, revoke.session);
        }
        if revoke.release_token != 0 {
            if let Some(wait) = self.release_waits.get_mut(&revoke.release_token) {
                wait.waiting.remove(&revoke.session);
            }
            self.release_progress(revoke.release_token);
        }
        self.detach_progress(revoke.session);
    }

    fn revoke_progress(&mut self, node_token: u64, session: SessionId) {
        let Some(wait) = self.revokes.get_mut(&node_token) else {
            return;
        };
        wait.waiting.remove(&session);
        if wait.waiting.is_empty() {
            self.finish_revoke(node_token);
        }
    }

    fn finish_revoke(&mut self, node_token: u64) {
        let Some(wait) = self.revokes.remove(&node_token) else {
            return;
        };
        self.actions.push(HostAction::FinishRevoke {
            token: node_token,
            page: wait.page,
            want_bytes: wait.want_bytes,
        });
    }
}
