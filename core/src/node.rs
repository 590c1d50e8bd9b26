//! `Node`: one gallocy node as a sans-IO state machine.
//!
//! Inputs: peer frames (`handle_frame`), application requests (`handle_request`),
//! completed revocations (`handle_revoke_done`) and time (`tick`). Outputs: `Action`s,
//! drained with `drain_actions`. The node never reads a clock, a socket or OS
//! randomness; the simulator and the daemon drive the same code.
//!
//! Coherence (see docs/protocol.md): home-based write-invalidate with a fixed home per
//! chunk (the node that leased it, recorded through Raft). The home keeps the directory
//! of each page (writer, readers, version, a master copy) and runs one transaction per
//! page at a time; every message it sends carries a per-page sequence number, so a
//! node can tell a stale grant from a fresh one whatever the network did to them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Message as RaftMessage};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};

use crate::alloc::ExtentAllocator;
use crate::codec::DecodeError;
use crate::dedupe::{Dedupe, Seen};
use crate::meta::{Command, MetaState, Outcome, Proposal, MAX_PROPOSALS_IN_FLIGHT};
use crate::types::{
    align_up, Access, NodeId, PageBytes, PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES,
};
use crate::wire::{Envelope, FreeOutcome, PageDenial, PeerMessage};

#[cfg(feature = "mutants")]
pub use crate::mutants::Mutant;

/// The driver's name for one application request; echoed in the reply.
pub type AppToken = u64;

/// Most application requests a node holds unanswered (beyond: `AppError::Busy`).
pub const MAX_PENDING_APP_REQUESTS: usize = 65536;
/// Most application threads waiting on one page.
pub const MAX_WAITERS_PER_PAGE: usize = 1024;
/// Most requests queued at a home behind the running transaction of one page
/// (each node has at most one outstanding request per page, so members suffice).
const MAX_QUEUED_PER_PAGE_PER_MEMBER: usize = 2;
/// Most remote frees in flight from one node.
pub const MAX_REMOTE_FREES_IN_FLIGHT: usize = 1024;
/// Bound on messages a node sends to itself while handling one input.
const MAX_LOOPBACK_STEPS: usize = 1 << 16;
/// Bound on Ready rounds per input (raft-rs needs at most a few).
const MAX_READY_ROUNDS: usize = 64;
/// Largest single allocation.
pub const MAX_ALLOCATION_BYTES: u64 = 1 << 40;
/// Default size of a space's root block.
pub const DEFAULT_ROOT_SIZE_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Every member of the cluster, this node included. Fixed for now.
    pub members: Vec<NodeId>,
    /// Node ticks per Raft tick.
    pub raft_tick_interval_ticks: u64,
    pub heartbeat_raft_ticks: usize,
    /// Base election timeout; each node gets `base + 3 * rank`, with no randomness.
    pub election_raft_ticks: usize,
    /// First retry of an unanswered message; doubles up to `retry_max_ticks`.
    pub retry_base_ticks: u64,
    pub retry_max_ticks: u64,
    /// A node whose newest lease request acknowledged by a leader is older than this
    /// masks all its pages.
    pub fence_after_ticks: u64,
    /// How often a follower asks the leader to renew its lease.
    pub lease_interval_ticks: u64,
    /// The leader marks a node down after this long without hearing from it. Must
    /// exceed `fence_after_ticks` plus an election timeout plus the revocation delay.
    pub down_after_ticks: u64,
    /// How long a fault on a chunk this node has not yet seen leased may wait for the
    /// metadata to arrive.
    pub metadata_wait_ticks: u64,
    #[cfg(feature = "mutants")]
    pub mutant: Option<Mutant>,
}

impl Config {
    pub fn new(id: NodeId, members: Vec<NodeId>) -> Config {
        Config {
            id,
            members,
            raft_tick_interval_ticks: 10,
            heartbeat_raft_ticks: 2,
            election_raft_ticks: 10,
            retry_base_ticks: 50,
            retry_max_ticks: 800,
            fence_after_ticks: 500,
            lease_interval_ticks: 50,
            down_after_ticks: 2500,
            metadata_wait_ticks: 2000,
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("node id must be non-zero".into());
        }
        if !self.members.contains(&self.id) {
            return Err(format!("node {} is not in the member list", self.id));
        }
        let unique: BTreeSet<_> = self.members.iter().collect();
        if unique.len() != self.members.len() || self.members.contains(&0) {
            return Err("member ids must be unique and non-zero".into());
        }
        if self.raft_tick_interval_ticks == 0 || self.heartbeat_raft_ticks == 0 {
            return Err("tick intervals must be non-zero".into());
        }
        if self.election_raft_ticks <= self.heartbeat_raft_ticks {
            return Err("election timeout must exceed the heartbeat interval".into());
        }
        if self.retry_base_ticks == 0 || self.retry_max_ticks < self.retry_base_ticks {
            return Err("retry_max_ticks must be at least retry_base_ticks > 0".into());
        }
        if self.lease_interval_ticks == 0 || self.lease_interval_ticks * 3 > self.fence_after_ticks
        {
            return Err(
                "lease_interval_ticks must be non-zero and at most a third of fence_after_ticks"
                    .into(),
            );
        }
        let election_ticks = (self.election_raft_ticks + 3 * self.members.len() + 1) as u64
            * self.raft_tick_interval_ticks;
        if self.down_after_ticks <= self.fence_after_ticks + 2 * election_ticks {
            return Err(
                "down_after_ticks must exceed fence_after_ticks plus two election timeouts".into(),
            );
        }
        Ok(())
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AppRequest {
    /// Create a space, or join it if it exists with the same layout.
    CreateSpace {
        name: String,
        base_addr: u64,
        size_bytes: u64,
        chunk_size_bytes: u64,
        /// Place it at the lowest free range at or above `base_addr`.
        flexible_base: bool,
    },
    LookupSpace {
        name: String,
    },
    Allocate {
        space: SpaceId,
        size_bytes: u64,
        align_bytes: u64,
    },
    Free {
        space: SpaceId,
        addr: u64,
    },
    /// The application touched `addr` and needs `access` (Read or Write).
    Fault {
        space: SpaceId,
        addr: u64,
        access: Access,
    },
    /// Lease whole chunks for an allocator running inside the application.
    LeaseChunks {
        space: SpaceId,
        count: u32,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AppError {
    UnknownSpace,
    SpaceRejected(&'static str),
    InvalidArgument(&'static str),
    OutOfMemory,
    /// Not the start of a live block: a double free or a wild pointer.
    InvalidFree,
    /// The address is in the space but in no leased chunk.
    NotMapped,
    /// The only copy of the page was on a node that is down.
    PageLost,
    /// The node that carved the block is down.
    NodeDown(NodeId),
    /// This node was declared down by the cluster and serves nothing.
    Evicted,
    /// Too many requests in flight; retry later.
    Busy,
}

impl AppError {
    pub fn describe(&self) -> String {
        match self {
            AppError::UnknownSpace => "unknown space".into(),
            AppError::SpaceRejected(why) => format!("space rejected: {why}"),
            AppError::InvalidArgument(why) => format!("invalid argument: {why}"),
            AppError::OutOfMemory => "out of memory: the space has no free chunk".into(),
            AppError::InvalidFree => "invalid free (double free or not an allocated block)".into(),
            AppError::NotMapped => "address is not in any leased chunk".into(),
            AppError::PageLost => "page lost: its only copy was on a node that is down".into(),
            AppError::NodeDown(node) => format!("node {node} that owns the block is down"),
            AppError::Evicted => "this node was declared down by the cluster".into(),
            AppError::Busy => "too many requests in flight".into(),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AppReply {
    Space(SpaceLayout),
    Allocated { addr: u64, size_bytes: u64 },
    Freed,
    Granted { page: PageId, access: Access },
    Leased { addr: u64, size_bytes: u64 },
    Error(AppError),
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Action {
    /// Send a frame to a peer (`Envelope::encode`).
    Send(Envelope),
    /// Answer an application request.
    Reply { token: AppToken, reply: AppReply },
    /// Write `bytes` (if any) into the node's memory for `page`, then let the
    /// applications access it with `access`.
    Install {
        page: PageId,
        access: Access,
        version: u64,
        bytes: Option<Box<PageBytes>>,
    },
    /// Change what the applications may do with `page`; no reply needed.
    SetAccess { page: PageId, access: Access },
    /// Lower the applications' access to `page` to `access`; once no application can
    /// exceed it any more, call `handle_revoke_done(token, bytes)`, with the page's
    /// bytes if `want_bytes`.
    Revoke {
        page: PageId,
        access: Access,
        token: u64,
        want_bytes: bool,
    },
}

/// Counters for status displays and the simulator's summary.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    pub frames_received: u64,
    pub frames_sent: u64,
    /// Frames that failed to decode.
    pub frames_malformed: u64,
    /// Well-formed messages that made no sense here (wrong node, stale, unknown page).
    pub messages_rejected: u64,
    pub faults_local: u64,
    pub faults_remote: u64,
    pub grants_sent: u64,
    pub invalidations_sent: u64,
    pub recalls_sent: u64,
    pub retries: u64,
    pub pages_lost: u64,
    pub allocations: u64,
    pub frees: u64,
    pub remote_frees: u64,
    pub proposals: u64,
    pub raft_errors: u64,
}

// ---------------------------------------------------------------------------------
// Local side: what this node holds of a page.

#[derive(Clone, Debug)]
struct OutstandingRequest {
    request_id: u64,
    mode: Access,
    home: NodeId,
    next_retry_tick: u64,
    backoff_ticks: u64,
}

#[derive(Clone, Copy, Debug)]
enum RevokeReply {
    InvalidateAck { seq: u64 },
    RecallAck { seq: u64, with_bytes: bool },
}

/// Most home messages held back while a revocation runs (the home retransmits).
const MAX_DEFERRED_PER_PAGE: usize = 8;

#[derive(Clone, Debug)]
struct LocalPage {
    /// What the home granted and has not taken back.
    held: Access,
    /// Version of the bytes in local memory (accessible or not). None: unknown, or
    /// (if `installed` is false) the zero page memory starts as.
    mem_version: Option<u64>,
    /// Whether bytes were ever installed for this page here. Until then the node's
    /// memory for it is zero (memory starts zeroed and nothing writes a page without
    /// access), which is version 0: a grant of version 0 needs no bytes.
    installed: bool,
    /// Newest home sequence number processed.
    seq_seen: u64,
    request: Option<OutstandingRequest>,
    waiters: Vec<(AppToken, Access)>,
    revoke: Option<(u64, RevokeReply)>,
    /// The last recall answered, to re-send on a duplicate recall.
    last_recall_ack: Option<(u64, u64, Option<Box<PageBytes>>)>,
    /// False after a fence: the home may have taken the page away while this node
    /// could not hear it, so the next access asks the home again before any
    /// application may touch the page (cheap: no bytes move if they are current).
    validated: bool,
    /// Home messages that arrived while a revocation ran; handled when it is done, so
    /// access changes reach the applications in the order the home sent them.
    deferred: Vec<PeerMessage>,
}

impl LocalPage {
    /// The version of the bytes this node's memory holds for the page, as claimed in
    /// requests: version 0 (zeroes) if nothing was ever installed.
    fn have_version(&self) -> Option<u64> {
        if self.installed {
            self.mem_version
        } else {
            Some(0)
        }
    }

    fn new() -> LocalPage {
        LocalPage {
            held: Access::None,
            mem_version: None,
            installed: false,
            seq_seen: 0,
            request: None,
            waiters: Vec::new(),
            revoke: None,
            last_recall_ack: None,
            validated: true,
            deferred: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Home side: the directory entry of a page this node manages.

#[derive(Clone, Debug)]
struct PageRequestInfo {
    from: NodeId,
    request_id: u64,
    mode: Access,
    have_version: Option<u64>,
}

#[derive(Clone, Debug)]
enum Phase {
    Recall {
        from: NodeId,
        seq: u64,
        downgrade: bool,
    },
    Invalidate {
        seq: u64,
        pending: BTreeSet<NodeId>,
    },
}

#[derive(Clone, Debug)]
struct Transaction {
    request: PageRequestInfo,
    phase: Phase,
    next_retry_tick: u64,
    backoff_ticks: u64,
}

#[derive(Clone, Debug)]
struct DirEntry {
    /// Version of the latest contents. Bumped on every write grant.
    version: u64,
    seq: u64,
    writer: Option<NodeId>,
    /// Nodes holding a read copy of `version` (never the writer).
    readers: BTreeSet<NodeId>,
    /// Latest contents whenever `writer` is None; None while the page is still the
    /// zero page of version 0 (most fresh pages never need a copy).
    master: Option<Box<PageBytes>>,
    lost: bool,
    txn: Option<Transaction>,
    queue: VecDeque<PageRequestInfo>,
    newest_request: BTreeMap<NodeId, u64>,
}

impl DirEntry {
    fn new() -> DirEntry {
        DirEntry {
            version: 0,
            seq: 0,
            writer: None,
            readers: BTreeSet::new(),
            master: None,
            lost: false,
            txn: None,
            queue: VecDeque::new(),
            newest_request: BTreeMap::new(),
        }
    }

    fn check_invariants(&self) {
        if let Some(writer) = self.writer {
            assert!(
                !self.readers.contains(&writer),
                "writer is also listed as a reader"
            );
        }
        if self.lost {
            assert!(self.writer.is_none() && self.txn.is_none());
        }
    }
}

/// A snapshot of one page's directory entry, for checkers and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryView {
    pub version: u64,
    pub writer: Option<NodeId>,
    pub readers: Vec<NodeId>,
    pub lost: bool,
    pub busy: bool,
}

// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Purpose {
    CreateSpace { token: AppToken },
    LeaseForAllocator { space: SpaceId },
    LeaseForApp { token: AppToken },
    MarkDown,
}

#[derive(Clone, Debug)]
struct PendingProposal {
    proposal: Proposal,
    purpose: Purpose,
    next_retry_tick: u64,
    backoff_ticks: u64,
}

#[derive(Clone, Debug)]
struct PendingAllocation {
    token: AppToken,
    size_bytes: u64,
    align_bytes: u64,
}

#[derive(Clone, Debug)]
struct RemoteFree {
    token: AppToken,
    target: NodeId,
    space: SpaceId,
    addr: u64,
    next_retry_tick: u64,
    backoff_ticks: u64,
}

#[derive(Clone, Debug)]
/// A fault (`access` Some) or a free (`access` None) on a chunk whose lease this node
/// has not applied yet: the allocating node replies after its own apply, so a pointer
/// can travel faster than the metadata.
struct UnmappedFault {
    token: AppToken,
    space: SpaceId,
    addr: u64,
    access: Option<Access>,
    deadline_tick: u64,
}

pub struct Node {
    config: Config,
    raft: RawNode<MemStorage>,
    meta: MetaState,
    now_ticks: u64,
    next_raft_tick: u64,
    is_leader: bool,
    leader_id: NodeId,
    /// Newest `sent_tick` a leader acknowledged: the lease that lets this node's
    /// applications touch pages.
    lease_sent_tick: Option<u64>,
    next_lease_request_tick: u64,
    last_heard_tick: BTreeMap<NodeId, u64>,
    down_proposed: BTreeSet<NodeId>,
    fenced: bool,
    evicted: bool,
    /// Nodes marked down whose copies the home voids at the given tick.
    pending_voids: BTreeMap<NodeId, u64>,

    next_proposal_id: u64,
    proposals: BTreeMap<u64, PendingProposal>,
    next_request_id: u64,
    next_revoke_token: u64,

    allocators: BTreeMap<SpaceId, ExtentAllocator>,
    pending_allocations: BTreeMap<SpaceId, VecDeque<PendingAllocation>>,
    lease_in_flight: BTreeSet<SpaceId>,

    pages: BTreeMap<PageId, LocalPage>,
    /// Pages with an outstanding request (retry scan).
    requesting: BTreeSet<PageId>,
    revokes: BTreeMap<u64, PageId>,
    directory: BTreeMap<PageId, DirEntry>,
    /// Directory entries with a running transaction (retry scan).
    busy: BTreeSet<PageId>,
    unmapped: VecDeque<UnmappedFault>,

    remote_frees: BTreeMap<u64, RemoteFree>,
    free_outcomes: Dedupe<FreeOutcome>,
    next_free_id: u64,

    pending_app_requests: usize,
    /// True while a Raft `Ready` is being handled: proposals made then (from applied
    /// entries) wait in `queued_proposals` until the Ready is advanced.
    in_ready: bool,
    queued_proposals: Vec<Vec<u8>>,
    loopback: VecDeque<Envelope>,
    actions: Vec<Action>,
    stats: Stats,
}

fn raft_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Node {
    pub fn new(config: Config) -> Result<Node, String> {
        config.validate()?;
        let mut members = config.members.clone();
        members.sort_unstable();
        let rank = members.iter().position(|&m| m == config.id).unwrap_or(0);
        // raft-rs draws the election timeout from thread_rng in [min, max); a range of
        // one value makes it deterministic, and distinct values per node avoid ties.
        let min_election_tick = config.election_raft_ticks + 3 * rank;
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_raft_ticks,
            heartbeat_tick: config.heartbeat_raft_ticks,
            min_election_tick,
            max_election_tick: min_election_tick + 1,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 256 * 1024,
            max_inflight_msgs: 64,
            ..Default::default()
        };
        raft_config.validate().map_err(|e| e.to_string())?;
        let storage = MemStorage::new_with_conf_state(ConfState::from((members.clone(), vec![])));
        let raft =
            RawNode::new(&raft_config, storage, &raft_logger()).map_err(|e| e.to_string())?;
        #[allow(unused_mut)]
        let mut meta = MetaState::new(&members);
        #[cfg(feature = "mutants")]
        {
            meta.mutant_double_lease = config.mutant == Some(Mutant::DoubleLease);
        }
        let single = members.len() == 1;
        let mut node = Node {
            config,
            raft,
            meta,
            now_ticks: 0,
            next_raft_tick: 0,
            is_leader: false,
            leader_id: 0,
            lease_sent_tick: None,
            next_lease_request_tick: 0,
            last_heard_tick: BTreeMap::new(),
            down_proposed: BTreeSet::new(),
            fenced: true,
            evicted: false,
            pending_voids: BTreeMap::new(),
            next_proposal_id: 1,
            proposals: BTreeMap::new(),
            next_request_id: 1,
            next_revoke_token: 1,
            allocators: BTreeMap::new(),
            pending_allocations: BTreeMap::new(),
            lease_in_flight: BTreeSet::new(),
            pages: BTreeMap::new(),
            requesting: BTreeSet::new(),
            revokes: BTreeMap::new(),
            directory: BTreeMap::new(),
            busy: BTreeSet::new(),
            unmapped: VecDeque::new(),
            remote_frees: BTreeMap::new(),
            free_outcomes: Dedupe::default(),
            next_free_id: 1,
            pending_app_requests: 0,
            in_ready: false,
            queued_proposals: Vec::new(),
            loopback: VecDeque::new(),
            actions: Vec::new(),
            stats: Stats::default(),
        };
        if single {
            // A one-node cluster elects itself at once.
            let _ = node.raft.campaign();
            node.drive_raft();
        }
        Ok(node)
    }

    #[cfg(feature = "mutants")]
    fn mutant(&self, mutant: Mutant) -> bool {
        self.config.mutant == Some(mutant)
    }

    #[cfg(not(feature = "mutants"))]
    #[inline(always)]
    fn mutant<T>(&self, _mutant: T) -> bool {
        false
    }

    // -----------------------------------------------------------------------------
    // Inspection.

    pub fn id(&self) -> NodeId {
        self.config.id
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn meta(&self) -> &MetaState {
        &self.meta
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    pub fn is_leader(&self) -> bool {
        self.is_leader
    }
    pub fn leader_id(&self) -> Option<NodeId> {
        (self.leader_id != 0).then_some(self.leader_id)
    }
    pub fn term(&self) -> u64 {
        self.raft.raft.term
    }
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }
    pub fn is_evicted(&self) -> bool {
        self.evicted
    }
    pub fn allocator(&self, space: SpaceId) -> Option<&ExtentAllocator> {
        self.allocators.get(&space)
    }
    /// What the home granted this node for `page` (before fencing masks it).
    pub fn held(&self, page: PageId) -> Access {
        self.pages.get(&page).map_or(Access::None, |p| p.held)
    }
    /// What the applications of this node may do with `page` right now.
    pub fn app_access(&self, page: PageId) -> Access {
        self.pages
            .get(&page)
            .map_or(Access::None, |p| self.page_access(p))
    }
    pub fn directory_view(&self, page: PageId) -> Option<DirectoryView> {
        self.directory.get(&page).map(|e| DirectoryView {
            version: e.version,
            writer: e.writer,
            readers: e.readers.iter().copied().collect(),
            lost: e.lost,
            busy: e.txn.is_some(),
        })
    }
    /// Pages this node holds, with their access.
    pub fn held_pages(&self) -> impl Iterator<Item = (PageId, Access)> + '_ {
        self.pages
            .iter()
            .filter(|(_, p)| p.held != Access::None)
            .map(|(&id, p)| (id, p.held))
    }
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }
    /// Application requests not yet answered.
    pub fn pending_app_requests(&self) -> usize {
        self.pending_app_requests
    }

    pub fn drain_actions(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    // -----------------------------------------------------------------------------
    // Inputs.

    /// Advance time. Call at least every few ticks; `now_ticks` never goes back.
    pub fn tick(&mut self, now_ticks: u64) {
        self.set_now(now_ticks);
        if self.now_ticks >= self.next_raft_tick {
            self.next_raft_tick = self.now_ticks + self.config.raft_tick_interval_ticks;
            self.raft.tick();
            self.drive_raft();
            if !self.is_leader
                && self.leader_id != 0
                && self.now_ticks >= self.next_lease_request_tick
            {
                self.next_lease_request_tick = self.now_ticks + self.config.lease_interval_ticks;
                let sent_tick = self.now_ticks;
                self.send(self.leader_id, PeerMessage::LeaseRequest { sent_tick });
            }
        }
        self.update_fence();
        self.void_due();
        self.retry_due();
        // An evicted node still votes and may lead: it keeps detecting failures so the
        // cluster's metadata moves on.
        if self.is_leader {
            self.detect_down_nodes();
        }
        self.run_loopback();
    }

    /// A frame from a peer. Malformed or out-of-protocol input is counted and dropped.
    pub fn handle_frame(&mut self, now_ticks: u64, bytes: &[u8]) -> Result<(), DecodeError> {
        self.set_now(now_ticks);
        self.stats.frames_received += 1;
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                self.stats.frames_malformed += 1;
                return Err(error);
            }
        };
        self.handle_envelope(envelope);
        self.run_loopback();
        Ok(())
    }

    /// An already-decoded message (the daemon decodes on its I/O threads).
    pub fn handle_message(&mut self, now_ticks: u64, envelope: Envelope) {
        self.set_now(now_ticks);
        self.stats.frames_received += 1;
        self.handle_envelope(envelope);
        self.run_loopback();
    }

    pub fn handle_request(&mut self, now_ticks: u64, token: AppToken, request: AppRequest) {
        self.set_now(now_ticks);
        if self.pending_app_requests >= MAX_PENDING_APP_REQUESTS {
            self.actions.push(Action::Reply {
                token,
                reply: AppReply::Error(AppError::Busy),
            });
            return;
        }
        self.pending_app_requests += 1;
        self.dispatch_request(token, request);
        self.run_loopback();
    }

    /// The driver finished an `Action::Revoke`.
    pub fn handle_revoke_done(
        &mut self,
        now_ticks: u64,
        token: u64,
        bytes: Option<Box<PageBytes>>,
    ) {
        self.set_now(now_ticks);
        let Some(page_id) = self.revokes.remove(&token) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let Some(page) = self.pages.get_mut(&page_id) else {
            return;
        };
        let Some((expected, reply)) = page.revoke.take() else {
            return;
        };
        assert_eq!(expected, token, "revoke token mismatch");
        let Some(home) = self.home_of(page_id) else {
            return;
        };
        match reply {
            RevokeReply::InvalidateAck { seq } => {
                if !self.mutant(Mutant::AckInvalidateBeforeRevoke) {
                    self.send(home, PeerMessage::InvalidateAck { page: page_id, seq });
                }
            }
            RevokeReply::RecallAck { seq, with_bytes } => {
                let page = self.pages.get_mut(&page_id).expect("page present");
                let version = page.mem_version.unwrap_or(0);
                let bytes = if with_bytes { bytes } else { None };
                page.last_recall_ack = Some((seq, version, bytes.clone()));
                self.send(
                    home,
                    PeerMessage::RecallAck {
                        page: page_id,
                        seq,
                        version,
                        bytes,
                    },
                );
            }
        }
        let deferred = std::mem::take(&mut self.pages.get_mut(&page_id).expect("present").deferred);
        for message in deferred {
            self.handle_envelope(Envelope {
                from: home,
                to: self.config.id,
                message,
            });
        }
        self.advance_local(page_id);
        self.run_loopback();
    }

    /// Holds a home message back while a revocation of the page runs. True if deferred.
    fn defer_during_revoke(&mut self, page_id: PageId, message: &PeerMessage) -> bool {
        let Some(page) = self.pages.get_mut(&page_id) else {
            return false;
        };
        if page.revoke.is_none() {
            return false;
        }
        if page.deferred.len() >= MAX_DEFERRED_PER_PAGE {
            page.deferred.remove(0);
        }
        page.deferred.push(message.clone());
        true
    }

    fn set_now(&mut self, now_ticks: u64) {
        debug_assert!(now_ticks >= self.now_ticks, "time went backwards");
        self.now_ticks = self.now_ticks.max(now_ticks);
    }

    fn reply(&mut self, token: AppToken, reply: AppReply) {
        assert!(
            self.pending_app_requests > 0,
            "reply without a pending request"
        );
        self.pending_app_requests -= 1;
        self.actions.push(Action::Reply { token, reply });
    }

    fn reply_error(&mut self, token: AppToken, error: AppError) {
        self.reply(token, AppReply::Error(error));
    }

    fn send(&mut self, to: NodeId, message: PeerMessage) {
        let envelope = Envelope {
            from: self.config.id,
            to,
            message,
        };
        if to == self.config.id {
            self.loopback.push_back(envelope);
        } else {
            self.stats.frames_sent += 1;
            self.actions.push(Action::Send(envelope));
        }
    }

    fn run_loopback(&mut self) {
        let mut steps = 0;
        while let Some(envelope) = self.loopback.pop_front() {
            steps += 1;
            assert!(steps <= MAX_LOOPBACK_STEPS, "loopback does not converge");
            self.handle_envelope(envelope);
        }
    }

    fn effective(&self, held: Access) -> Access {
        if self.fenced || self.evicted {
            Access::None
        } else {
            held
        }
    }

    fn page_access(&self, page: &LocalPage) -> Access {
        if page.validated {
            self.effective(page.held)
        } else {
            Access::None
        }
    }

    fn retry_backoff(&self, backoff_ticks: u64) -> u64 {
        (backoff_ticks * 2).min(self.config.retry_max_ticks)
    }

    // -----------------------------------------------------------------------------
    // Raft.

    fn drive_raft(&mut self) {
        if self.in_ready {
            return;
        }
        self.in_ready = true;
        self.drive_raft_rounds();
        self.in_ready = false;
    }

    fn drive_raft_rounds(&mut self) {
        for _ in 0..MAX_READY_ROUNDS {
            for data in std::mem::take(&mut self.queued_proposals) {
                let _ = self.raft.propose(vec![], data);
            }
            if !self.raft.has_ready() {
                return;
            }
            let mut ready = self.raft.ready();
            if let Some(soft) = ready.ss() {
                self.leader_id = soft.leader_id;
                let was_leader = self.is_leader;
                self.is_leader = soft.raft_state == StateRole::Leader;
                if self.is_leader && !was_leader {
                    // Start every failure detector afresh: a new leader has no history.
                    let now = self.now_ticks;
                    for &member in &self.config.members {
                        self.last_heard_tick.insert(member, now);
                    }
                }
            }
            let messages = ready.take_messages();
            self.send_raft(messages);
            if !ready.snapshot().is_empty() {
                // Snapshots are never produced (the log is not compacted), so none arrive
                // from a correct peer.
                self.stats.messages_rejected += 1;
            }
            let committed = ready.take_committed_entries();
            self.apply_entries(committed);
            if !ready.entries().is_empty() {
                if let Err(error) = self.raft.mut_store().wl().append(ready.entries()) {
                    self.stats.raft_errors += 1;
                    let _ = error;
                }
            }
            if let Some(hard_state) = ready.hs() {
                self.raft.mut_store().wl().set_hardstate(hard_state.clone());
            }
            let persisted = ready.take_persisted_messages();
            self.send_raft(persisted);
            let mut light = self.raft.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raft
                    .mut_store()
                    .wl()
                    .mut_hard_state()
                    .set_commit(commit);
            }
            let messages = light.take_messages();
            self.send_raft(messages);
            let committed = light.take_committed_entries();
            self.apply_entries(committed);
            self.raft.advance_apply();
        }
    }

    fn send_raft(&mut self, messages: Vec<RaftMessage>) {
        for message in messages {
            match message.write_to_bytes() {
                Ok(bytes) => self.send(message.to, PeerMessage::Raft(bytes)),
                Err(_) => self.stats.raft_errors += 1,
            }
        }
    }

    fn handle_raft(&mut self, from: NodeId, bytes: &[u8]) {
        let message = match RaftMessage::parse_from_bytes(bytes) {
            Ok(message) => message,
            Err(_) => {
                self.stats.frames_malformed += 1;
                return;
            }
        };
        if message.from != from || message.to != self.config.id {
            self.stats.messages_rejected += 1;
            return;
        }
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            self.stats.messages_rejected += 1;
            return;
        }
        // raft-rs trusts its peers and panics on a heartbeat committing past our log;
        // a correct leader never sends one. (Peers are not authenticated yet; other
        // raft-rs assertions remain reachable by a forged message.)
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat
            && message.commit > self.raft.raft.raft_log.last_index()
        {
            self.stats.messages_rejected += 1;
            return;
        }
        if self.raft.step(message).is_err() {
            self.stats.raft_errors += 1;
            return;
        }
        self.drive_raft();
    }

    fn propose(&mut self, command: Command, purpose: Purpose) -> Result<(), AppError> {
        if self.proposals.len() >= MAX_PROPOSALS_IN_FLIGHT {
            return Err(AppError::Busy);
        }
        let proposal_id = self.next_proposal_id;
        self.next_proposal_id += 1;
        let oldest_in_flight = self.proposals.keys().next().copied().unwrap_or(proposal_id);
        let proposal = Proposal {
            origin: self.config.id,
            proposal_id,
            oldest_in_flight,
            command,
        };
        self.stats.proposals += 1;
        if self.in_ready {
            self.queued_proposals.push(proposal.encode());
        } else {
            let _ = self.raft.propose(vec![], proposal.encode());
        }
        self.proposals.insert(
            proposal_id,
            PendingProposal {
                proposal,
                purpose,
                next_retry_tick: self.now_ticks + self.config.retry_base_ticks * 4,
                backoff_ticks: self.config.retry_base_ticks * 4,
            },
        );
        self.drive_raft();
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let proposal = match Proposal::decode(&entry.data) {
                Ok(proposal) => proposal,
                Err(_) => {
                    // Every replica skips the same entry, so they stay identical.
                    self.stats.raft_errors += 1;
                    continue;
                }
            };
            let outcome = self.meta.apply(&proposal);
            if let Command::MarkDown { node } = proposal.command {
                self.on_node_down(node);
            }
            if proposal.origin == self.config.id {
                if let Some(pending) = self.proposals.remove(&proposal.proposal_id) {
                    self.complete_proposal(pending.purpose, outcome);
                }
            }
            self.retry_unmapped(false);
        }
    }

    fn complete_proposal(&mut self, purpose: Purpose, outcome: Outcome) {
        match (purpose, outcome) {
            (Purpose::CreateSpace { token }, Outcome::SpaceCreated(layout)) => {
                self.adopt_root_chunk(&layout);
                self.reply(token, AppReply::Space(layout));
            }
            (Purpose::CreateSpace { token }, Outcome::SpaceRejected(why)) => {
                self.reply_error(token, AppError::SpaceRejected(why));
            }
            (
                Purpose::LeaseForAllocator { space },
                Outcome::Leased {
                    first_chunk, count, ..
                },
            ) => {
                self.lease_in_flight.remove(&space);
                if let Some(layout) = self.meta.spaces.get(&space).cloned() {
                    let start = layout.chunk_addr(first_chunk);
                    let len = count as u64 * layout.chunk_size_bytes;
                    let before_commit = self.mutant(Mutant::ReplyBeforeCommit);
                    let allocator = self.allocators.entry(space).or_default();
                    if before_commit {
                        if !(start..start + len)
                            .any(|a| a % layout.chunk_size_bytes == 0 && allocator.owns(a))
                        {
                            allocator.add_region(start, len);
                        }
                    } else {
                        allocator.add_region(start, len);
                    }
                }
                self.serve_pending_allocations(space);
            }
            (Purpose::LeaseForAllocator { space }, _) => {
                self.lease_in_flight.remove(&space);
                let waiting = self.pending_allocations.remove(&space).unwrap_or_default();
                for pending in waiting {
                    self.reply_error(pending.token, AppError::OutOfMemory);
                }
            }
            (
                Purpose::LeaseForApp { token },
                Outcome::Leased {
                    space,
                    first_chunk,
                    count,
                },
            ) => {
                let layout = self.meta.spaces.get(&space).expect("leased space exists");
                let reply = AppReply::Leased {
                    addr: layout.chunk_addr(first_chunk),
                    size_bytes: count as u64 * layout.chunk_size_bytes,
                };
                self.reply(token, reply);
            }
            (Purpose::LeaseForApp { token }, _) => self.reply_error(token, AppError::OutOfMemory),
            (Purpose::MarkDown, _) => {}
            (Purpose::CreateSpace { token }, _) => {
                self.reply_error(token, AppError::SpaceRejected("unexpected outcome"))
            }
        }
    }

    /// The creator of a space carves from chunk 0, after the root block.
    fn adopt_root_chunk(&mut self, layout: &SpaceLayout) {
        let Some(record) = self.meta.chunk(layout.id, 0) else {
            return;
        };
        if record.lessee != self.config.id {
            return;
        }
        let allocator = self.allocators.entry(layout.id).or_default();
        if allocator.owns(layout.base_addr) {
            return;
        }
        allocator.add_region(layout.base_addr, layout.chunk_size_bytes);
        let reserved = allocator.reserve(layout.base_addr, layout.root_size_bytes);
        assert!(reserved, "root block must fit in a fresh chunk");
    }

    fn detect_down_nodes(&mut self) {
        let now = self.now_ticks;
        let mut suspects = Vec::new();
        for &member in &self.config.members {
            if member == self.config.id
                || !self.meta.is_up(member)
                || self.down_proposed.contains(&member)
            {
                continue;
            }
            let heard = self.last_heard_tick.get(&member).copied().unwrap_or(now);
            if now.saturating_sub(heard) > self.config.down_after_ticks {
                suspects.push(member);
            }
        }
        for node in suspects {
            if self
                .propose(Command::MarkDown { node }, Purpose::MarkDown)
                .is_ok()
            {
                self.down_proposed.insert(node);
            }
        }
    }

    fn update_fence(&mut self) {
        let in_contact = !self.evicted
            && (self.is_leader
                || self.lease_sent_tick.is_some_and(|t| {
                    self.now_ticks.saturating_sub(t) <= self.config.fence_after_ticks
                }));
        if in_contact != self.fenced {
            return;
        }
        self.fenced = !in_contact;
        if self.fenced {
            let held: Vec<PageId> = self.held_pages().map(|(page, _)| page).collect();
            for page in held {
                self.pages.get_mut(&page).expect("held").validated = false;
                self.actions.push(Action::SetAccess {
                    page,
                    access: Access::None,
                });
            }
        } else {
            // Metadata could not arrive while fenced: give waiting requests a full wait.
            let deadline_tick = self.now_ticks + self.config.metadata_wait_ticks;
            for fault in self.unmapped.iter_mut() {
                fault.deadline_tick = fault.deadline_tick.max(deadline_tick);
            }
            let waiting: Vec<PageId> = self
                .pages
                .iter()
                .filter(|(_, p)| !p.waiters.is_empty())
                .map(|(&id, _)| id)
                .collect();
            for page in waiting {
                self.advance_local(page);
            }
        }
    }

    fn on_node_down(&mut self, node: NodeId) {
        if node == self.config.id {
            self.evict_self();
            return;
        }
        // Home side: the node's copies become void, but not at once: a leader may have
        // renewed its lease until the mark-down committed, so it may read its copies
        // for up to a lease period more. Until then invalidations keep waiting for it.
        let void_at =
            self.now_ticks + self.config.fence_after_ticks + self.config.lease_interval_ticks;
        self.pending_voids.insert(node, void_at);
        // Local side: requests to it fail.
        let affected: Vec<PageId> = self
            .pages
            .iter()
            .filter(|(_, p)| p.request.as_ref().is_some_and(|r| r.home == node))
            .map(|(&id, _)| id)
            .collect();
        for page in affected {
            self.fail_local_page(page, AppError::PageLost);
        }
        let frees: Vec<u64> = self
            .remote_frees
            .iter()
            .filter(|(_, f)| f.target == node)
            .map(|(&id, _)| id)
            .collect();
        for id in frees {
            let free = self.remote_frees.remove(&id).expect("listed");
            self.reply_error(free.token, AppError::NodeDown(node));
        }
    }

    fn evict_self(&mut self) {
        if self.evicted {
            return;
        }
        self.evicted = true;
        let held: Vec<PageId> = self.held_pages().map(|(p, _)| p).collect();
        for page in held {
            self.actions.push(Action::SetAccess {
                page,
                access: Access::None,
            });
        }
        let waiting: Vec<PageId> = self.pages.keys().copied().collect();
        for page in waiting {
            self.fail_local_page(page, AppError::Evicted);
        }
        let allocations: Vec<SpaceId> = self.pending_allocations.keys().copied().collect();
        for space in allocations {
            for pending in self.pending_allocations.remove(&space).unwrap_or_default() {
                self.reply_error(pending.token, AppError::Evicted);
            }
        }
        let frees: Vec<RemoteFree> = std::mem::take(&mut self.remote_frees)
            .into_values()
            .collect();
        for free in frees {
            self.reply_error(free.token, AppError::Evicted);
        }
        let unmapped: Vec<UnmappedFault> = self.unmapped.drain(..).collect();
        for fault in unmapped {
            self.reply_error(fault.token, AppError::Evicted);
        }
        // Failure-detector proposals stay: an evicted node may still lead.
        let proposals: Vec<(u64, PendingProposal)> =
            std::mem::take(&mut self.proposals).into_iter().collect();
        for (id, proposal) in proposals {
            match proposal.purpose {
                Purpose::CreateSpace { token } | Purpose::LeaseForApp { token } => {
                    self.reply_error(token, AppError::Evicted)
                }
                Purpose::LeaseForAllocator { .. } => {}
                Purpose::MarkDown => {
                    self.proposals.insert(id, proposal);
                }
            }
        }
        self.lease_in_flight.clear();
    }

    /// Voids the copies of nodes marked down once their last lease has expired.
    fn void_due(&mut self) {
        let due: Vec<NodeId> = self
            .pending_voids
            .iter()
            .filter(|(_, &at)| at <= self.now_ticks)
            .map(|(&node, _)| node)
            .collect();
        for node in due {
            self.pending_voids.remove(&node);
            let pages: Vec<PageId> = self.directory.keys().copied().collect();
            for page in pages {
                self.directory_node_down(page, node);
            }
        }
    }

    // -----------------------------------------------------------------------------
    // Retries.

    fn retry_due(&mut self) {
        let now = self.now_ticks;
        // Proposals: re-propose; the state machine dedupes by (origin, proposal_id).
        let due: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.next_retry_tick <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let backoff = self.retry_backoff(self.proposals[&id].backoff_ticks);
            let oldest_in_flight = *self.proposals.keys().next().expect("listed");
            let pending = self.proposals.get_mut(&id).expect("listed");
            pending.proposal.oldest_in_flight = oldest_in_flight;
            pending.backoff_ticks = backoff;
            pending.next_retry_tick = now + backoff;
            let data = pending.proposal.encode();
            self.stats.retries += 1;
            let _ = self.raft.propose(vec![], data);
            self.drive_raft();
        }
        // Page requests.
        let due: Vec<PageId> = self
            .requesting
            .iter()
            .filter(|id| {
                self.pages[id]
                    .request
                    .as_ref()
                    .is_some_and(|r| r.next_retry_tick <= now)
            })
            .copied()
            .collect();
        for page_id in due {
            let backoff = {
                let request = self.pages[&page_id].request.as_ref().expect("listed");
                self.retry_backoff(request.backoff_ticks)
            };
            let page = self.pages.get_mut(&page_id).expect("listed");
            let have_version = page.have_version();
            let request = page.request.as_mut().expect("listed");
            request.backoff_ticks = backoff;
            request.next_retry_tick = now + backoff;
            let message = PeerMessage::PageRequest {
                page: page_id,
                request_id: request.request_id,
                mode: request.mode,
                have_version,
            };
            let home = request.home;
            self.stats.retries += 1;
            self.send(home, message);
        }
        // Home transactions.
        let due: Vec<PageId> = self
            .busy
            .iter()
            .filter(|id| {
                self.directory[id]
                    .txn
                    .as_ref()
                    .is_some_and(|t| t.next_retry_tick <= now)
            })
            .copied()
            .collect();
        for page_id in due {
            let backoff = {
                let txn = self.directory[&page_id].txn.as_ref().expect("listed");
                self.retry_backoff(txn.backoff_ticks)
            };
            let txn = self
                .directory
                .get_mut(&page_id)
                .and_then(|e| e.txn.as_mut())
                .expect("listed");
            txn.backoff_ticks = backoff;
            txn.next_retry_tick = now + backoff;
            let phase = txn.phase.clone();
            self.stats.retries += 1;
            self.send_phase(page_id, &phase);
        }
        // Remote frees.
        let due: Vec<u64> = self
            .remote_frees
            .iter()
            .filter(|(_, f)| f.next_retry_tick <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let backoff = self.retry_backoff(self.remote_frees[&id].backoff_ticks);
            let oldest_in_flight = *self.remote_frees.keys().next().expect("listed");
            let free = self.remote_frees.get_mut(&id).expect("listed");
            free.backoff_ticks = backoff;
            free.next_retry_tick = now + backoff;
            let (target, message) = (
                free.target,
                PeerMessage::FreeRequest {
                    space: free.space,
                    addr: free.addr,
                    request_id: id,
                    oldest_in_flight,
                },
            );
            self.stats.retries += 1;
            self.send(target, message);
        }
        self.retry_unmapped(true);
    }

    fn retry_unmapped(&mut self, expire: bool) {
        if self.unmapped.is_empty() {
            return;
        }
        let waiting: Vec<UnmappedFault> = self.unmapped.drain(..).collect();
        for fault in waiting {
            let mapped = self
                .meta
                .spaces
                .get(&fault.space)
                .and_then(|l| l.chunk_of_addr(fault.addr))
                .is_some_and(|chunk| self.meta.chunk(fault.space, chunk).is_some());
            if mapped {
                match fault.access {
                    Some(access) => self.fault(fault.token, fault.space, fault.addr, access),
                    None => self.free(fault.token, fault.space, fault.addr),
                }
            } else if expire && !self.fenced && fault.deadline_tick <= self.now_ticks {
                let error = match fault.access {
                    Some(_) => AppError::NotMapped,
                    None => AppError::InvalidFree,
                };
                self.reply_error(fault.token, error);
            } else {
                self.unmapped.push_back(fault);
            }
        }
    }

    // -----------------------------------------------------------------------------
    // Application requests.

    fn dispatch_request(&mut self, token: AppToken, request: AppRequest) {
        if self.evicted {
            self.reply_error(token, AppError::Evicted);
            return;
        }
        match request {
            AppRequest::CreateSpace {
                name,
                base_addr,
                size_bytes,
                chunk_size_bytes,
                flexible_base,
            } => {
                // Checked here too: a command the log cannot carry would never commit.
                if name.is_empty() || name.len() > crate::types::SPACE_NAME_MAX_BYTES {
                    self.reply_error(
                        token,
                        AppError::SpaceRejected("space name must be 1 to 64 bytes"),
                    );
                    return;
                }
                let command = Command::CreateSpace {
                    name,
                    base_addr,
                    size_bytes,
                    chunk_size_bytes,
                    flexible_base,
                    root_size_bytes: DEFAULT_ROOT_SIZE_BYTES.min(chunk_size_bytes),
                };
                if let Err(error) = self.propose(command, Purpose::CreateSpace { token }) {
                    self.reply_error(token, error);
                }
            }
            AppRequest::LookupSpace { name } => match self.meta.space_by_name(&name) {
                Some(layout) => {
                    let layout = layout.clone();
                    self.reply(token, AppReply::Space(layout));
                }
                None => self.reply_error(token, AppError::UnknownSpace),
            },
            AppRequest::Allocate {
                space,
                size_bytes,
                align_bytes,
            } => self.allocate(token, space, size_bytes, align_bytes),
            AppRequest::Free { space, addr } => self.free(token, space, addr),
            AppRequest::Fault {
                space,
                addr,
                access,
            } => self.fault(token, space, addr, access),
            AppRequest::LeaseChunks { space, count } => {
                if !self.meta.spaces.contains_key(&space) {
                    self.reply_error(token, AppError::UnknownSpace);
                    return;
                }
                if count == 0 || count > crate::meta::MAX_CHUNKS_PER_LEASE {
                    self.reply_error(token, AppError::InvalidArgument("chunk count"));
                    return;
                }
                let command = Command::LeaseChunks {
                    space,
                    node: self.config.id,
                    count,
                };
                if let Err(error) = self.propose(command, Purpose::LeaseForApp { token }) {
                    self.reply_error(token, error);
                }
            }
        }
    }

    fn allocate(&mut self, token: AppToken, space: SpaceId, size_bytes: u64, align_bytes: u64) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        if !align_bytes.is_power_of_two() || align_bytes > layout.chunk_size_bytes {
            self.reply_error(
                token,
                AppError::InvalidArgument("alignment must be a power of two up to the chunk size"),
            );
            return;
        }
        if size_bytes > MAX_ALLOCATION_BYTES || size_bytes > layout.size_bytes {
            self.reply_error(token, AppError::OutOfMemory);
            return;
        }
        self.pending_allocations
            .entry(space)
            .or_default()
            .push_back(PendingAllocation {
                token,
                size_bytes,
                align_bytes,
            });
        self.serve_pending_allocations(space);
    }

    /// Serves waiting allocations in order; leases more chunks when the head does not fit.
    fn serve_pending_allocations(&mut self, space: SpaceId) {
        loop {
            let Some(head) = self
                .pending_allocations
                .get(&space)
                .and_then(|q| q.front())
                .cloned()
            else {
                return;
            };
            let allocator = self.allocators.entry(space).or_default();
            if let Some(addr) = allocator.allocate(head.size_bytes, head.align_bytes) {
                let size_bytes = allocator.size_of(addr).expect("just allocated");
                self.pending_allocations
                    .get_mut(&space)
                    .expect("present")
                    .pop_front();
                self.stats.allocations += 1;
                self.reply(head.token, AppReply::Allocated { addr, size_bytes });
                continue;
            }
            if self.lease_in_flight.contains(&space) {
                return;
            }
            let layout = self.meta.spaces[&space].clone();
            let need = head.size_bytes.saturating_add(head.align_bytes);
            let count = need.div_ceil(layout.chunk_size_bytes).max(1);
            if count > layout.chunk_count() {
                self.pending_allocations
                    .get_mut(&space)
                    .expect("present")
                    .pop_front();
                self.reply_error(head.token, AppError::OutOfMemory);
                continue;
            }
            if self.mutant(Mutant::ReplyBeforeCommit) {
                self.carve_before_commit(&layout, count);
            }
            let command = Command::LeaseChunks {
                space,
                node: self.config.id,
                count: count as u32,
            };
            // Marked before proposing: on a one-node cluster the entry commits and
            // applies inside `propose`.
            self.lease_in_flight.insert(space);
            match self.propose(command, Purpose::LeaseForAllocator { space }) {
                Ok(()) => {}
                Err(error) => {
                    self.lease_in_flight.remove(&space);
                    self.pending_allocations
                        .get_mut(&space)
                        .expect("present")
                        .pop_front();
                    self.reply_error(head.token, error);
                }
            }
            if !self.mutant(Mutant::ReplyBeforeCommit) {
                return;
            }
        }
    }

    /// Mutant: add the chunks this node *expects* its lease to get, before commit.
    fn carve_before_commit(&mut self, layout: &SpaceLayout, count: u64) {
        let mut run = 0;
        for chunk in 0..layout.chunk_count() {
            if self.meta.chunk(layout.id, chunk).is_none() {
                run += 1;
                if run == count {
                    let first = chunk + 1 - count;
                    let start = layout.chunk_addr(first);
                    let allocator = self.allocators.entry(layout.id).or_default();
                    if !(first..first + count).any(|c| allocator.owns(layout.chunk_addr(c))) {
                        allocator.add_region(start, count * layout.chunk_size_bytes);
                    }
                    return;
                }
            } else {
                run = 0;
            }
        }
    }

    fn free(&mut self, token: AppToken, space: SpaceId, addr: u64) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        let Some(chunk) = layout.chunk_of_addr(addr) else {
            self.reply_error(token, AppError::InvalidFree);
            return;
        };
        let Some(record) = self.meta.chunk(space, chunk) else {
            if self.unmapped.len() >= MAX_WAITERS_PER_PAGE {
                self.reply_error(token, AppError::Busy);
                return;
            }
            self.unmapped.push_back(UnmappedFault {
                token,
                space,
                addr,
                access: None,
                deadline_tick: self.now_ticks + self.config.metadata_wait_ticks,
            });
            return;
        };
        if record.lessee == self.config.id {
            let outcome = self.free_local(space, addr);
            self.reply(
                token,
                match outcome {
                    FreeOutcome::Freed => AppReply::Freed,
                    FreeOutcome::InvalidFree => AppReply::Error(AppError::InvalidFree),
                },
            );
            return;
        }
        if !self.meta.is_up(record.lessee) {
            self.reply_error(token, AppError::NodeDown(record.lessee));
            return;
        }
        if self.remote_frees.len() >= MAX_REMOTE_FREES_IN_FLIGHT {
            self.reply_error(token, AppError::Busy);
            return;
        }
        let request_id = self.next_free_id;
        self.next_free_id += 1;
        self.remote_frees.insert(
            request_id,
            RemoteFree {
                token,
                target: record.lessee,
                space,
                addr,
                next_retry_tick: self.now_ticks + self.config.retry_base_ticks,
                backoff_ticks: self.config.retry_base_ticks,
            },
        );
        self.stats.remote_frees += 1;
        let oldest_in_flight = *self.remote_frees.keys().next().expect("just inserted");
        self.send(
            record.lessee,
            PeerMessage::FreeRequest {
                space,
                addr,
                request_id,
                oldest_in_flight,
            },
        );
    }

    fn free_local(&mut self, space: SpaceId, addr: u64) -> FreeOutcome {
        match self.allocators.get_mut(&space).map(|a| a.free(addr)) {
            Some(Ok(_)) => {
                self.stats.frees += 1;
                FreeOutcome::Freed
            }
            _ => FreeOutcome::InvalidFree,
        }
    }

    fn home_of(&self, page: PageId) -> Option<NodeId> {
        let layout = self.meta.spaces.get(&page.space)?;
        let chunk = layout.chunk_of_page(page.index);
        self.meta.chunk(page.space, chunk).map(|r| r.home)
    }

    fn fault(&mut self, token: AppToken, space: SpaceId, addr: u64, access: Access) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        let Some(page_id) = layout.page_of(addr) else {
            self.reply_error(
                token,
                AppError::InvalidArgument("address outside the space"),
            );
            return;
        };
        if access == Access::None {
            self.reply_error(
                token,
                AppError::InvalidArgument("fault needs read or write"),
            );
            return;
        }
        if self.home_of(page_id).is_none() {
            // Possibly leased by a commit this node has not applied yet: wait, bounded.
            if self.unmapped.len() >= MAX_WAITERS_PER_PAGE {
                self.reply_error(token, AppError::Busy);
                return;
            }
            self.unmapped.push_back(UnmappedFault {
                token,
                space,
                addr,
                access: Some(access),
                deadline_tick: self.now_ticks + self.config.metadata_wait_ticks,
            });
            return;
        }
        let page = self.pages.entry(page_id).or_insert_with(LocalPage::new);
        if page.waiters.len() >= MAX_WAITERS_PER_PAGE {
            self.reply_error(token, AppError::Busy);
            return;
        }
        page.waiters.push((token, access));
        let page = &self.pages[&page_id];
        if self.page_access(page) >= access {
            self.stats.faults_local += 1;
        } else {
            self.stats.faults_remote += 1;
        }
        self.advance_local(page_id);
    }

    /// Serves the waiters of a page that now can be, and asks the home for more if needed.
    fn advance_local(&mut self, page_id: PageId) {
        let Some(page) = self.pages.get(&page_id) else {
            return;
        };
        let access = self.page_access(page);
        if page.waiters.iter().any(|&(_, want)| want <= access) {
            let page = self.pages.get_mut(&page_id).expect("present");
            let (served, waiting): (Vec<_>, Vec<_>) = page
                .waiters
                .drain(..)
                .partition(|&(_, want)| want <= access);
            page.waiters = waiting;
            for (token, _) in served {
                self.reply(
                    token,
                    AppReply::Granted {
                        page: page_id,
                        access,
                    },
                );
            }
        }
        let page = &self.pages[&page_id];
        if page.waiters.is_empty()
            || page.request.is_some()
            || page.revoke.is_some()
            || self.fenced
            || self.evicted
        {
            return;
        }
        // After a fence, ask for at least what we held: a writer must not lose its writes.
        let mut mode = page
            .waiters
            .iter()
            .map(|&(_, want)| want)
            .max()
            .expect("non-empty");
        if !page.validated {
            mode = mode.max(page.held);
        }
        let Some(home) = self.home_of(page_id) else {
            self.fail_local_page(page_id, AppError::NotMapped);
            return;
        };
        if !self.meta.is_up(home) {
            self.fail_local_page(page_id, AppError::PageLost);
            return;
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let page = self.pages.get_mut(&page_id).expect("present");
        page.request = Some(OutstandingRequest {
            request_id,
            mode,
            home,
            next_retry_tick: self.now_ticks + self.config.retry_base_ticks,
            backoff_ticks: self.config.retry_base_ticks,
        });
        let message = PeerMessage::PageRequest {
            page: page_id,
            request_id,
            mode,
            have_version: page.have_version(),
        };
        self.requesting.insert(page_id);
        self.send(home, message);
    }

    fn fail_local_page(&mut self, page_id: PageId, error: AppError) {
        let Some(page) = self.pages.get_mut(&page_id) else {
            return;
        };
        page.request = None;
        self.requesting.remove(&page_id);
        let waiters: Vec<_> = page.waiters.drain(..).collect();
        if error == AppError::PageLost && !waiters.is_empty() {
            self.stats.pages_lost += 1;
        }
        for (token, _) in waiters {
            self.reply_error(token, error);
        }
    }

    // -----------------------------------------------------------------------------
    // Peer messages.

    fn handle_envelope(&mut self, envelope: Envelope) {
        let Envelope { from, to, message } = envelope;
        if to != self.config.id || !self.config.members.contains(&from) {
            self.stats.messages_rejected += 1;
            return;
        }
        self.last_heard_tick.insert(from, self.now_ticks);
        if self.evicted
            && !matches!(
                message,
                PeerMessage::Raft(_) | PeerMessage::LeaseRequest { .. }
            )
        {
            return;
        }
        match message {
            PeerMessage::Raft(bytes) => self.handle_raft(from, &bytes),
            PeerMessage::PageRequest {
                page,
                request_id,
                mode,
                have_version,
            } => self.home_request(
                page,
                PageRequestInfo {
                    from,
                    request_id,
                    mode,
                    have_version,
                },
            ),
            PeerMessage::PageGrant {
                page,
                request_id,
                seq,
                mode,
                version,
                base_version,
                bytes,
            } => self.on_grant(
                from,
                page,
                request_id,
                seq,
                mode,
                version,
                base_version,
                bytes,
            ),
            PeerMessage::PageDenied {
                page,
                request_id,
                reason,
            } => self.on_denied(from, page, request_id, reason),
            PeerMessage::Invalidate { page, seq } => self.on_invalidate(from, page, seq),
            PeerMessage::InvalidateAck { page, seq } => self.home_invalidate_ack(from, page, seq),
            PeerMessage::Recall {
                page,
                seq,
                downgrade,
            } => self.on_recall(from, page, seq, downgrade),
            PeerMessage::RecallAck {
                page,
                seq,
                version,
                bytes,
            } => self.home_recall_ack(from, page, seq, version, bytes),
            PeerMessage::FreeRequest {
                space,
                addr,
                request_id,
                oldest_in_flight,
            } => self.on_free_request(from, space, addr, request_id, oldest_in_flight),
            PeerMessage::FreeReply {
                request_id,
                outcome,
            } => self.on_free_reply(from, request_id, outcome),
            PeerMessage::LeaseRequest { sent_tick } => {
                // Never to a node this leader is marking down or that is down.
                if self.is_leader && self.meta.is_up(from) && !self.down_proposed.contains(&from) {
                    self.send(from, PeerMessage::LeaseGrant { sent_tick });
                }
            }
            PeerMessage::LeaseGrant { sent_tick } => {
                if sent_tick <= self.now_ticks {
                    self.lease_sent_tick = Some(self.lease_sent_tick.unwrap_or(0).max(sent_tick));
                } else {
                    self.stats.messages_rejected += 1;
                }
            }
        }
    }

    /// A message from `from` about `page` is only meaningful if `from` is its home.
    fn sent_by_home(&self, from: NodeId, page: PageId) -> bool {
        self.home_of(page) == Some(from)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_grant(
        &mut self,
        from: NodeId,
        page_id: PageId,
        request_id: u64,
        seq: u64,
        mode: Access,
        version: u64,
        base_version: u64,
        bytes: Option<Box<PageBytes>>,
    ) {
        let accept_stale = self.mutant(Mutant::AcceptStaleGrant);
        let fenced_or_evicted = self.fenced || self.evicted;
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let message = PeerMessage::PageGrant {
            page: page_id,
            request_id,
            seq,
            mode,
            version,
            base_version,
            bytes,
        };
        if self.defer_during_revoke(page_id, &message) {
            return;
        }
        let PeerMessage::PageGrant { bytes, .. } = message else {
            unreachable!()
        };
        let Some(page) = self.pages.get_mut(&page_id) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let matches = page
            .request
            .as_ref()
            .is_some_and(|r| r.request_id == request_id && r.mode <= mode);
        if !matches || (seq <= page.seq_seen && !accept_stale) {
            // A duplicate or a grant overtaken by a newer invalidation.
            self.stats.messages_rejected += 1;
            return;
        }
        if bytes.is_none() && page.have_version() != Some(base_version) {
            // The home thinks our bytes are current and they are not: ask again with
            // nothing claimed. Happens only after a protocol anomaly; never install.
            self.stats.messages_rejected += 1;
            page.mem_version = None;
            page.installed = true;
            page.request = None;
            self.requesting.remove(&page_id);
            self.advance_local(page_id);
            return;
        }
        page.seq_seen = page.seq_seen.max(seq);
        page.held = mode;
        // A grant that lands while fenced is as suspect as any older one.
        page.validated = !fenced_or_evicted;
        page.mem_version = Some(version);
        page.installed = true;
        page.request = None;
        page.last_recall_ack = None;
        self.requesting.remove(&page_id);
        let access = if fenced_or_evicted {
            Access::None
        } else {
            mode
        };
        self.actions.push(Action::Install {
            page: page_id,
            access,
            version,
            bytes,
        });
        self.advance_local(page_id);
    }

    fn on_denied(&mut self, from: NodeId, page_id: PageId, request_id: u64, reason: PageDenial) {
        let matches = self.sent_by_home(from, page_id)
            && self.pages.get(&page_id).is_some_and(|p| {
                p.request
                    .as_ref()
                    .is_some_and(|r| r.request_id == request_id)
            });
        if !matches {
            self.stats.messages_rejected += 1;
            return;
        }
        let error = match reason {
            PageDenial::Lost => AppError::PageLost,
            PageDenial::NotMapped => AppError::NotMapped,
        };
        self.fail_local_page(page_id, error);
    }

    fn on_invalidate(&mut self, from: NodeId, page_id: PageId, seq: u64) {
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let ack_early = self.mutant(Mutant::AckInvalidateBeforeRevoke);
        let page = self.pages.entry(page_id).or_insert_with(LocalPage::new);
        if seq < page.seq_seen {
            self.stats.messages_rejected += 1;
            return;
        }
        if seq == page.seq_seen {
            // A retransmission: ack again unless the revoke is still running.
            if page.revoke.is_none() {
                self.send(from, PeerMessage::InvalidateAck { page: page_id, seq });
            }
            return;
        }
        if page.revoke.is_some() {
            self.defer_during_revoke(page_id, &PeerMessage::Invalidate { page: page_id, seq });
            return;
        }
        let page = self.pages.get_mut(&page_id).expect("present");
        page.seq_seen = seq;
        if page.held == Access::Write {
            // The home would recall a writer, not invalidate it: a stale view. Revoke
            // anyway; safety first.
            self.stats.messages_rejected += 1;
        }
        let was = page.held;
        page.held = Access::None;
        if was == Access::None {
            self.send(from, PeerMessage::InvalidateAck { page: page_id, seq });
            return;
        }
        let token = self.next_revoke_token;
        self.next_revoke_token += 1;
        page.revoke = Some((token, RevokeReply::InvalidateAck { seq }));
        self.revokes.insert(token, page_id);
        self.actions.push(Action::Revoke {
            page: page_id,
            access: Access::None,
            token,
            want_bytes: false,
        });
        if ack_early {
            self.send(from, PeerMessage::InvalidateAck { page: page_id, seq });
        }
    }

    fn on_recall(&mut self, from: NodeId, page_id: PageId, seq: u64, downgrade: bool) {
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let page = self.pages.entry(page_id).or_insert_with(LocalPage::new);
        if seq < page.seq_seen {
            self.stats.messages_rejected += 1;
            return;
        }
        if seq == page.seq_seen {
            if page.revoke.is_none() {
                if let Some((ack_seq, version, bytes)) = page.last_recall_ack.clone() {
                    if ack_seq == seq {
                        self.send(
                            from,
                            PeerMessage::RecallAck {
                                page: page_id,
                                seq,
                                version,
                                bytes,
                            },
                        );
                    }
                }
            }
            return;
        }
        if page.revoke.is_some() {
            let message = PeerMessage::Recall {
                page: page_id,
                seq,
                downgrade,
            };
            self.defer_during_revoke(page_id, &message);
            return;
        }
        let page = self.pages.get_mut(&page_id).expect("present");
        page.seq_seen = seq;
        // A node that never received its write grant never wrote: the home's copy is
        // the latest, and any read copy it still has is unknown to the home, so drop it.
        let (to, with_bytes) = if page.held == Access::Write {
            (
                if downgrade {
                    Access::Read
                } else {
                    Access::None
                },
                true,
            )
        } else {
            (Access::None, false)
        };
        let was = page.held;
        page.held = to;
        if was == Access::None {
            let version = page.mem_version.unwrap_or(0);
            page.last_recall_ack = Some((seq, version, None));
            self.send(
                from,
                PeerMessage::RecallAck {
                    page: page_id,
                    seq,
                    version,
                    bytes: None,
                },
            );
            return;
        }
        let token = self.next_revoke_token;
        self.next_revoke_token += 1;
        page.revoke = Some((token, RevokeReply::RecallAck { seq, with_bytes }));
        let validated = page.validated;
        self.revokes.insert(token, page_id);
        let access = if validated {
            self.effective(to)
        } else {
            Access::None
        };
        self.actions.push(Action::Revoke {
            page: page_id,
            access,
            token,
            want_bytes: with_bytes,
        });
    }

    fn on_free_request(
        &mut self,
        from: NodeId,
        space: SpaceId,
        addr: u64,
        request_id: u64,
        oldest_in_flight: u64,
    ) {
        let outcome = match self.free_outcomes.check(from, request_id, oldest_in_flight) {
            Seen::Done(outcome) => outcome,
            Seen::Stale => {
                // Answered and acknowledged long ago: a late duplicate.
                self.stats.messages_rejected += 1;
                return;
            }
            Seen::New => {
                let owned = self
                    .meta
                    .spaces
                    .get(&space)
                    .and_then(|l| l.chunk_of_addr(addr))
                    .and_then(|chunk| self.meta.chunk(space, chunk))
                    .is_some_and(|r| r.lessee == self.config.id);
                let outcome = if owned {
                    self.free_local(space, addr)
                } else {
                    FreeOutcome::InvalidFree
                };
                self.free_outcomes.record(from, request_id, outcome);
                outcome
            }
        };
        self.send(
            from,
            PeerMessage::FreeReply {
                request_id,
                outcome,
            },
        );
    }

    fn on_free_reply(&mut self, from: NodeId, request_id: u64, outcome: FreeOutcome) {
        let matches = self
            .remote_frees
            .get(&request_id)
            .is_some_and(|f| f.target == from);
        if !matches {
            self.stats.messages_rejected += 1;
            return;
        }
        let free = self.remote_frees.remove(&request_id).expect("checked");
        let reply = match outcome {
            FreeOutcome::Freed => AppReply::Freed,
            FreeOutcome::InvalidFree => AppReply::Error(AppError::InvalidFree),
        };
        self.reply(free.token, reply);
    }

    // -----------------------------------------------------------------------------
    // Home side.

    fn home_request(&mut self, page_id: PageId, request: PageRequestInfo) {
        match self.home_of(page_id) {
            Some(home) if home == self.config.id => {}
            Some(_) => {
                self.stats.messages_rejected += 1;
                return;
            }
            // Not yet applied the lease: the requester will retry.
            None => return,
        }
        if !self.meta.is_up(request.from) {
            self.stats.messages_rejected += 1;
            return;
        }
        let members = self.config.members.len();
        let entry = self.directory.entry(page_id).or_insert_with(DirEntry::new);
        let newest = entry.newest_request.entry(request.from).or_insert(0);
        if request.request_id < *newest {
            self.stats.messages_rejected += 1;
            return;
        }
        *newest = request.request_id;
        if entry.lost {
            self.send(
                request.from,
                PeerMessage::PageDenied {
                    page: page_id,
                    request_id: request.request_id,
                    reason: PageDenial::Lost,
                },
            );
            return;
        }
        if let Some(txn) = &entry.txn {
            if txn.request.from == request.from && txn.request.request_id == request.request_id {
                return;
            }
            entry.queue.retain(|q| q.from != request.from);
            if entry.queue.len() < members * MAX_QUEUED_PER_PAGE_PER_MEMBER {
                entry.queue.push_back(request);
            }
            return;
        }
        self.home_start(page_id, request);
    }

    fn home_start(&mut self, page_id: PageId, request: PageRequestInfo) {
        let skip_invalidate = self.mutant(Mutant::GrantWriteWithoutInvalidate);
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        assert!(entry.txn.is_none());
        let requester = request.from;
        let phase = match entry.writer {
            Some(writer) if writer == requester => None,
            Some(writer) => {
                entry.seq += 1;
                Some(Phase::Recall {
                    from: writer,
                    seq: entry.seq,
                    downgrade: request.mode == Access::Read,
                })
            }
            None if request.mode == Access::Write => {
                let others: BTreeSet<NodeId> = entry
                    .readers
                    .iter()
                    .copied()
                    .filter(|&r| r != requester)
                    .collect();
                if others.is_empty() {
                    None
                } else if skip_invalidate {
                    entry.readers.retain(|&r| r == requester);
                    None
                } else {
                    entry.seq += 1;
                    Some(Phase::Invalidate {
                        seq: entry.seq,
                        pending: others,
                    })
                }
            }
            None => None,
        };
        match phase {
            None => self.home_grant(page_id, request),
            Some(phase) => {
                let entry = self.directory.get_mut(&page_id).expect("entry exists");
                entry.txn = Some(Transaction {
                    request,
                    phase: phase.clone(),
                    next_retry_tick: self.now_ticks + self.config.retry_base_ticks,
                    backoff_ticks: self.config.retry_base_ticks,
                });
                self.busy.insert(page_id);
                self.send_phase(page_id, &phase);
            }
        }
    }

    fn send_phase(&mut self, page_id: PageId, phase: &Phase) {
        match phase {
            Phase::Recall {
                from,
                seq,
                downgrade,
            } => {
                self.stats.recalls_sent += 1;
                self.send(
                    *from,
                    PeerMessage::Recall {
                        page: page_id,
                        seq: *seq,
                        downgrade: *downgrade,
                    },
                );
            }
            Phase::Invalidate { seq, pending } => {
                for &node in pending {
                    self.stats.invalidations_sent += 1;
                    self.send(
                        node,
                        PeerMessage::Invalidate {
                            page: page_id,
                            seq: *seq,
                        },
                    );
                }
            }
        }
    }

    /// Grants the request; no other node may hold a conflicting copy any more.
    fn home_grant(&mut self, page_id: PageId, request: PageRequestInfo) {
        let skip_bump = self.mutant(Mutant::SkipVersionBump);
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let requester = request.from;
        let (mode, version, base_version) = match (entry.writer, request.mode) {
            (Some(writer), _) => {
                // Re-grant to a writer that never received its grant; it never wrote.
                assert_eq!(writer, requester, "grant while another node writes");
                // A writer that has this version's grant may have written: keep its
                // bytes. One that never received the grant starts from the master.
                let base = if skip_bump || request.have_version == Some(entry.version) {
                    entry.version
                } else {
                    entry.version - 1
                };
                (Access::Write, entry.version, base)
            }
            (None, Access::Read) => {
                entry.readers.insert(requester);
                (Access::Read, entry.version, entry.version)
            }
            (None, _) => {
                assert!(
                    entry.readers.iter().all(|&r| r == requester),
                    "write grant next to readers"
                );
                entry.readers.clear();
                let base = entry.version;
                if !skip_bump {
                    entry.version += 1;
                }
                entry.writer = Some(requester);
                (Access::Write, entry.version, base)
            }
        };
        entry.seq += 1;
        let bytes = if request.have_version == Some(base_version) {
            None
        } else {
            Some(
                entry
                    .master
                    .clone()
                    .unwrap_or_else(|| Box::new([0u8; PAGE_SIZE_BYTES])),
            )
        };
        entry.check_invariants();
        let message = PeerMessage::PageGrant {
            page: page_id,
            request_id: request.request_id,
            seq: entry.seq,
            mode,
            version,
            base_version,
            bytes,
        };
        self.stats.grants_sent += 1;
        self.send(requester, message);
        self.home_next(page_id);
    }

    /// Starts the next queued request, if any.
    fn home_next(&mut self, page_id: PageId) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        if entry.txn.is_some() {
            return;
        }
        self.busy.remove(&page_id);
        if let Some(next) = entry.queue.pop_front() {
            if entry.lost {
                self.deny_queue(page_id);
                return;
            }
            self.home_start(page_id, next);
        }
    }

    fn home_invalidate_ack(&mut self, from: NodeId, page_id: PageId, seq: u64) {
        let Some(entry) = self.directory.get_mut(&page_id) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let Some(Transaction {
            phase: Phase::Invalidate { seq: want, pending },
            ..
        }) = entry.txn.as_mut()
        else {
            return;
        };
        if *want != seq || !pending.remove(&from) {
            return;
        }
        entry.readers.remove(&from);
        if pending.is_empty() {
            let txn = entry.txn.take().expect("present");
            self.home_continue(page_id, txn.request);
        }
    }

    fn home_recall_ack(
        &mut self,
        from: NodeId,
        page_id: PageId,
        seq: u64,
        version: u64,
        bytes: Option<Box<PageBytes>>,
    ) {
        let Some(entry) = self.directory.get_mut(&page_id) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let Some(Transaction {
            phase:
                Phase::Recall {
                    from: writer,
                    seq: want,
                    downgrade,
                },
            ..
        }) = entry.txn.as_ref()
        else {
            return;
        };
        if *want != seq || *writer != from {
            return;
        }
        let downgrade = *downgrade;
        if let Some(bytes) = bytes {
            if version != entry.version {
                self.stats.messages_rejected += 1;
            }
            entry.master = Some(bytes);
            if downgrade {
                entry.readers.insert(from);
            }
        }
        entry.writer = None;
        let txn = entry.txn.take().expect("present");
        self.home_continue(page_id, txn.request);
    }

    /// After a phase completes, run the request again from the top: it either needs
    /// another phase (a write after recalling the writer must still invalidate) or is
    /// granted.
    fn home_continue(&mut self, page_id: PageId, request: PageRequestInfo) {
        if !self.meta.is_up(request.from) {
            self.home_next(page_id);
            return;
        }
        self.home_start(page_id, request);
    }

    fn deny_queue(&mut self, page_id: PageId) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let queued: Vec<PageRequestInfo> = entry.queue.drain(..).collect();
        for request in queued {
            self.send(
                request.from,
                PeerMessage::PageDenied {
                    page: page_id,
                    request_id: request.request_id,
                    reason: PageDenial::Lost,
                },
            );
        }
    }

    fn directory_node_down(&mut self, page_id: PageId, node: NodeId) {
        let entry = self.directory.get_mut(&page_id).expect("listed");
        entry.readers.remove(&node);
        entry.queue.retain(|q| q.from != node);
        if entry.writer == Some(node) {
            // The latest contents were only there.
            entry.writer = None;
            entry.lost = true;
            self.stats.pages_lost += 1;
        }
        let entry = self.directory.get_mut(&page_id).expect("listed");
        let Some(txn) = entry.txn.take() else {
            if entry.lost {
                self.deny_queue(page_id);
            }
            return;
        };
        if entry.lost {
            if txn.request.from != node {
                self.send(
                    txn.request.from,
                    PeerMessage::PageDenied {
                        page: page_id,
                        request_id: txn.request.request_id,
                        reason: PageDenial::Lost,
                    },
                );
            }
            self.busy.remove(&page_id);
            self.deny_queue(page_id);
            return;
        }
        // A transaction whose requester went down still finishes its phase: a writer
        // may already have given up its copy, and its ack carries the latest bytes.
        // `home_continue` then skips the grant.
        match txn.phase {
            Phase::Invalidate { seq, mut pending } => {
                pending.remove(&node);
                if pending.is_empty() {
                    self.home_continue(page_id, txn.request);
                } else {
                    let entry = self.directory.get_mut(&page_id).expect("listed");
                    entry.txn = Some(Transaction {
                        phase: Phase::Invalidate { seq, pending },
                        ..txn
                    });
                }
            }
            phase @ Phase::Recall { .. } => {
                let entry = self.directory.get_mut(&page_id).expect("listed");
                entry.txn = Some(Transaction { phase, ..txn });
            }
        }
    }
}

// Without the feature, `Mutant` names still resolve so the code reads the same.
#[cfg(not(feature = "mutants"))]
#[allow(dead_code)]
#[derive(Clone, Copy)]
enum Mutant {
    GrantWriteWithoutInvalidate,
    AckInvalidateBeforeRevoke,
    AcceptStaleGrant,
    SkipVersionBump,
    ReplyBeforeCommit,
}

/// Rounds an allocation the way the node's allocator does (for clients that size ahead).
pub fn allocation_size(size_bytes: u64) -> Option<u64> {
    align_up(size_bytes.max(1), crate::types::MIN_ALIGN_BYTES)
}
