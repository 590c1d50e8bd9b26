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
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message as RaftMessage,
};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};

use raft_store::RaftStore;
pub use raft_store::{PersistedRaft, RaftWrite};

use crate::alloc::ExtentAllocator;
use crate::codec::DecodeError;
use crate::dedupe::{Dedupe, Seen};
use crate::meta::{
    Command, MetaState, Outcome, Proposal, FIRST_INCARNATION, MAX_PROPOSALS_IN_FLIGHT,
};
use crate::retry::RetrySchedule;
use crate::types::{Access, NodeId, PageBytes, PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES};
use crate::wire::{
    BackupCopy, CopyReport, Envelope, FreeOutcome, PageDenial, PeerMessage, FINAL_CONTENTS,
};

mod consensus;
mod home;
mod peer;
mod raft_store;
mod replication;
mod requests;

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
/// Most application requests a rejoining node holds.
const MAX_REJOIN_WAITING: usize = 4096;
/// Most syncs waiting at once on a node.
const MAX_SYNCS_IN_FLIGHT: usize = 1024;
/// Repairs (copies made again after a node marked down took some) a home runs at once;
/// the rest wait in `Node::repairs_due`, so a crash does not send every backup at once.
const MAX_REPAIRS_IN_FLIGHT: usize = 64;
/// Largest single allocation.
pub const MAX_ALLOCATION_BYTES: u64 = 1 << 40;
/// Default size of a space's root block.
pub const DEFAULT_ROOT_SIZE_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// The members this node may hear from before its metadata says (this node
    /// included): the first configuration, or, for a node that joins, every member.
    /// Membership then follows the metadata (`AddMember`, `RemoveMember`).
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
    /// exceed `fence_after_ticks` plus two election timeouts plus
    /// `revoke_timeout_ticks`: a node cut off must have fenced itself and taken every
    /// page back from its processes before the others stop waiting for its copies.
    pub down_after_ticks: u64,
    /// The longest a process may take to apply a revocation before its node's host
    /// kills it: the bound on how long a fenced node's processes keep their access.
    pub revoke_timeout_ticks: u64,
    /// How long a fault on a chunk this node has not yet seen leased may wait for the
    /// metadata to arrive.
    pub metadata_wait_ticks: u64,
    /// Chunks of empty allocator regions a node keeps per space before it gives
    /// regions back, so a program that frees and allocates again does not pay two
    /// Raft commits per block.
    pub retain_empty_chunks: u64,
    /// Applied Raft entries kept in memory beyond the latest metadata snapshot: past
    /// this many, the node snapshots its metadata and drops the older half.
    pub raft_log_max_entries: u64,
    /// This life of the node: `FIRST_INCARNATION` at its first start, one more at each
    /// restart from its disk (`Node::restart`). Its request and proposal ids start at
    /// `id_base`, so no id of a later life repeats one of an earlier.
    pub incarnation: u64,
    #[cfg(feature = "mutants")]
    pub mutant: Option<Mutant>,
}

/// Most lives a node may have: ids of each life get 2^40 values (`Config::id_base`),
/// and program ids keep 16 bits for it.
pub const MAX_INCARNATION: u64 = 1 << 16;

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
            down_after_ticks: 4000,
            revoke_timeout_ticks: 2000,
            metadata_wait_ticks: 2000,
            retain_empty_chunks: 4,
            raft_log_max_entries: 4096,
            incarnation: FIRST_INCARNATION,
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }

    /// The first request, proposal, free and wake id of this life (minus one).
    pub fn id_base(&self) -> u64 {
        (self.incarnation - 1) << 40
    }

    /// Checks the configuration as a whole; the error names the values that disagree.
    pub fn validate(&self) -> Result<(), String> {
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
        if self.incarnation == 0 || self.incarnation > MAX_INCARNATION {
            return Err(format!(
                "incarnation must be 1 to {MAX_INCARNATION}, not {}",
                self.incarnation
            ));
        }
        if self.raft_log_max_entries < 4 {
            return Err("raft_log_max_entries must be at least 4".into());
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
        if self.revoke_timeout_ticks == 0 {
            return Err("revoke_timeout_ticks must be non-zero".into());
        }
        let election_ticks = (self.election_raft_ticks + 3 * self.members.len() + 1) as u64
            * self.raft_tick_interval_ticks;
        let needed = self.fence_after_ticks + 2 * election_ticks + self.revoke_timeout_ticks;
        if self.down_after_ticks <= needed {
            return Err(format!(
                "down_after_ticks ({}) must exceed fence_after_ticks ({}) plus two election \
                 timeouts ({}) plus revoke_timeout_ticks ({}) = {needed}: a node cut off must have \
                 taken its pages back from its processes before the others are told it is down",
                self.down_after_ticks,
                self.fence_after_ticks,
                2 * election_ticks,
                self.revoke_timeout_ticks
            ));
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
        /// Keep it when its last process has gone.
        persistent: bool,
        /// k (`SpaceLayout::replicas`).
        replicas: u8,
    },
    /// Join the existing space `name`: this node enters its attach set.
    AttachSpace {
        name: String,
    },
    /// This node's last process of `space` has gone: leave its attach set (which
    /// destroys the space if the set empties and it is not persistent).
    DetachSpace {
        space: SpaceId,
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
    /// Make every write this node's processes made to `space` durable: on k nodes
    /// (`gallocy_sync`). Answered `Synced`.
    Sync {
        space: SpaceId,
    },
    /// Administrative: make `node` a member (it was started to join), or remove it.
    /// Answered `MembershipChanged` once applied.
    AddMember {
        node: NodeId,
    },
    RemoveMember {
        node: NodeId,
    },
    /// Keep the space named `name` no longer when its last process has gone.
    Unpersist {
        name: String,
    },
    /// Give back `count` chunks from `addr` that an allocator in the application leased
    /// (`LeaseChunks`) and holds no block in any more.
    ReleaseChunks {
        space: SpaceId,
        addr: u64,
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
    /// A membership change the metadata refused.
    MembershipRejected(crate::meta::MembershipRejection),
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AppReply {
    Space(SpaceLayout),
    Allocated {
        addr: u64,
        size_bytes: u64,
    },
    Freed,
    Granted {
        page: PageId,
        access: Access,
    },
    Leased {
        addr: u64,
        size_bytes: u64,
    },
    /// Left the attach set; `destroyed` if the space went with it.
    Detached {
        destroyed: bool,
    },
    MembershipChanged {
        node: NodeId,
        added: bool,
    },
    Synced,
    /// No longer kept; `destroyed` if it ended at once (nobody attached).
    Unpersisted {
        destroyed: bool,
    },
    Error(AppError),
}

impl From<FreeOutcome> for AppReply {
    fn from(outcome: FreeOutcome) -> AppReply {
        match outcome {
            FreeOutcome::Freed => AppReply::Freed,
            FreeOutcome::InvalidFree | FreeOutcome::NotLessee => {
                AppReply::Error(AppError::InvalidFree)
            }
        }
    }
}

#[derive(Clone, PartialEq, Debug)]
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
    /// A released run: lower every process's access to these pages to `None`, then
    /// zero this node's memory of them (giving it back), then call
    /// `handle_release_done(token)`. The node already holds no state of them.
    ReleasePages {
        space: SpaceId,
        first_page: u64,
        pages: u64,
        token: u64,
    },
    /// The space was destroyed: this node holds nothing of it any more (pending
    /// requests on it were answered `UnknownSpace`, revocations of its pages dropped).
    /// Its memory can be given back.
    DropSpace { space: SpaceId },
    /// A program-layer message from a member (`programs.rs`), for the host.
    Program {
        from: NodeId,
        message: crate::programs::ProgramMessage,
    },
    /// A futex wake or its acknowledgement from a member (`futex.rs`), for the host.
    Futex {
        from: NodeId,
        message: crate::futex::FutexMessage,
    },
    /// Make this change to the node's Raft log and hard state durable, as one atomic
    /// write (`RaftWrite`), before carrying out any later action; if `must_sync`,
    /// synced to the disk first. What a restart reads back is `PersistedRaft`.
    PersistRaft(RaftWrite),
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
    /// Recovered pages whose directory this node started collecting (it is their
    /// new home), and rebuilt from the survivors' copies.
    pub pages_collected: u64,
    pub pages_recovered: u64,
    /// Pages whose writer went down, served again from the last contents that left
    /// a writer.
    pub pages_reverted: u64,
    /// Times this node, restarted, was applied back up (`Rejoin`).
    pub rejoins: u64,
    /// Members added or removed (applied here).
    pub membership_changes: u64,
    /// Syncs answered, flushes sent to homes, flushes that replaced a master here, and
    /// backups sent (homes) and kept (any node) for k copies.
    pub syncs: u64,
    pub flushes_sent: u64,
    pub flushes_applied: u64,
    pub backups_sent: u64,
    pub backups_kept: u64,
    /// Pages whose copies a node marked down took, made to be on k nodes again by their
    /// home (repairs finished here).
    pub pages_repaired: u64,
    /// Messages dropped for their sender's incarnation: of a life that ended, or of one
    /// this node has not seen rejoin yet.
    pub messages_other_life: u64,
    pub allocations: u64,
    pub frees: u64,
    pub remote_frees: u64,
    pub proposals: u64,
    pub raft_errors: u64,
    /// Chunks this node's allocator gave back to the cluster.
    pub chunks_released: u64,
    /// Times this node snapshotted its metadata and dropped older log entries.
    pub log_compactions: u64,
    /// Metadata snapshots this node installed (it had fallen behind a leader's log).
    pub snapshots_installed: u64,
}

// Local side: what this node holds of a page.

#[derive(Clone, Debug)]
struct OutstandingRequest {
    request_id: u64,
    mode: Access,
    home: NodeId,
    retry: RetrySchedule,
}

/// The answer to send the home once a revocation is done (each is an ack).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug)]
enum RevokeReply {
    InvalidateAck {
        seq: u64,
    },
    RecallAck {
        seq: u64,
        with_bytes: bool,
    },
    /// The new home of a recovered page asked what this node holds (`Collect`).
    CollectAck {
        seq: u64,
    },
    /// A sync takes the applications' write access (their next write faults and marks
    /// the page written again) and reads the bytes to flush.
    Flush,
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
    deferred: Vec<(NodeId, PeerMessage)>,
    /// The node holds `Write` but its applications may only read: a flush took their
    /// write access, so their next write faults (served here) and marks the page
    /// written again.
    clean: bool,
    /// Its applications may have written it since its last flush was captured (or
    /// since the write grant): a sync must flush it.
    written: bool,
    /// The flush in flight to the home, until its `FlushAck`.
    flush: Option<LocalFlush>,
    /// A sync wants another flush once the running revocation or flush is done.
    flush_wanted: bool,
    /// Flushes started and acknowledged, counted: a sync waits for a number.
    flushes_started: u64,
    flushes_acked: u64,
}

/// A flush of a page (`gallocy_sync`) in flight to its home.
#[derive(Clone, Debug)]
struct LocalFlush {
    request_id: u64,
    version: u64,
    /// None when the node no longer writes the page (its writes left with a recall).
    bytes: Option<Box<PageBytes>>,
    retry: RetrySchedule,
}

/// A sync waiting for its pages' flushes, by page: the flush number that covers it.
#[derive(Clone, Debug)]
struct SyncWait {
    token: AppToken,
    pages: BTreeMap<PageId, u64>,
    /// A page it covers is lost: answered `PageLost` once the others are done.
    lost: bool,
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

    /// The version of the bytes in memory as a recovery copy: None if none were
    /// ever installed (or their version is unknown).
    fn copy_version(&self) -> Option<u64> {
        self.mem_version.filter(|_| self.installed)
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
            clean: false,
            written: false,
            flush: None,
            flush_wanted: false,
            flushes_started: 0,
            flushes_acked: 0,
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
    /// A flush (`PeerMessage::Flush`) rather than a request for access: queued and run
    /// like one, answered `FlushAck` once the page's contents are on k nodes.
    flush: Option<FlushData>,
    /// The home's own repair of a page whose copies went with a node marked down
    /// (`Node::run_repairs`): never queued, never answered, `from` is the home.
    repair: bool,
}

#[derive(Clone, Debug)]
struct FlushData {
    version: u64,
    bytes: Option<Box<PageBytes>>,
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
    /// A recovered page (its home went down): every node up reports what it holds,
    /// and the directory is rebuilt from the reports (`home_rebuild`).
    Collect {
        seq: u64,
        pending: BTreeSet<NodeId>,
        reports: BTreeMap<NodeId, CopyReport>,
    },
    /// The master's contents are on fewer than k nodes: backups to these nodes first.
    Replicate {
        seq: u64,
        pending: BTreeSet<NodeId>,
    },
}

#[derive(Clone, Debug)]
struct Transaction {
    request: PageRequestInfo,
    phase: Phase,
    retry: RetrySchedule,
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
    /// The page's chunk was recovered from a down home and this directory entry has
    /// not been rebuilt from the survivors' copies yet: the first request collects.
    needs_collect: bool,
    /// Rebuilt with a writer and no other copy: nothing older than the writer's bytes
    /// survives, so if the writer goes down too the page is lost.
    master_unknown: bool,
    /// Where the master's contents stand in the page's history, as a backup of them
    /// is labelled (`BackupCopy::order`): a version's final contents, or a writer's
    /// flush of its version.
    master_order: (u64, u64),
    /// The node whose processes wrote the master's contents (a recalled writer, a
    /// flusher); None if not known (a recovery) or the zero page. Its processes seeing
    /// them is no exposure to another node: a grant to it needs no copies first.
    master_origin: Option<NodeId>,
    /// Nodes other than this one that said they hold the master's contents (a recalled
    /// writer, a backup's ack, a recovery report): with this node, the copies that
    /// count toward k.
    holders: BTreeSet<NodeId>,
    /// Per node, its newest flush seen and its newest flush acknowledged.
    newest_flush: BTreeMap<NodeId, u64>,
    flush_acked: BTreeMap<NodeId, u64>,
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
            needs_collect: false,
            master_unknown: false,
            master_order: (0, FINAL_CONTENTS),
            master_origin: None,
            holders: BTreeSet::new(),
            newest_flush: BTreeMap::new(),
            flush_acked: BTreeMap::new(),
            txn: None,
            queue: VecDeque::new(),
            newest_request: BTreeMap::new(),
        }
    }

    /// The master's bytes: the zero page while there is no copy (version 0).
    fn master_bytes(&self) -> Box<PageBytes> {
        self.master
            .clone()
            .unwrap_or_else(|| Box::new([0u8; PAGE_SIZE_BYTES]))
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
        if self.needs_collect {
            assert!(self.writer.is_none() && self.readers.is_empty() && !self.lost);
        }
        if self.master_unknown {
            assert!(
                self.writer.is_some(),
                "the master is only unknown under a writer"
            );
        }
        assert!(
            self.queue.iter().all(|q| !q.repair),
            "a repair runs only on an idle page, never queued"
        );
    }
}

// ---------------------------------------------------------------------------------

/// How a node starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// A member of the cluster's first configuration, on an empty disk.
    First,
    /// From what its disk kept, as a later life.
    Restart(&'a PersistedRaft),
    /// Not in the first configuration: added later by `AddMember`.
    Join,
}

#[derive(Clone, Debug)]
enum Purpose {
    CreateSpace {
        token: AppToken,
    },
    /// A lease of `count` chunks for the head of the space's allocation queue.
    LeaseForAllocator {
        space: SpaceId,
        count: u64,
    },
    LeaseForApp {
        token: AppToken,
    },
    Attach {
        token: AppToken,
    },
    Detach {
        token: AppToken,
    },
    /// The allocator region `[start, start + len)` holds no block and goes back.
    ReleaseRegion {
        space: SpaceId,
        start: u64,
        len: u64,
    },
    ReleaseDone,
    ReleaseForApp {
        token: AppToken,
    },
    Unpersist {
        token: AppToken,
    },
    MarkDown,
    /// A step of this restarted node's rejoin (`drive_rejoin`).
    Rejoin,
    /// An administrator's `AddMember` or `RemoveMember`.
    Membership {
        token: AppToken,
    },
}

#[derive(Clone, Debug)]
struct PendingProposal {
    proposal: Proposal,
    purpose: Purpose,
    retry: RetrySchedule,
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
    retry: RetrySchedule,
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
    /// For a free: the node that said it is not the lessee. Waits until this node's
    /// metadata names another (the chunk was released and leased again).
    stale_lessee: Option<NodeId>,
}

pub struct Node {
    config: Config,
    raft: RawNode<RaftStore>,
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
    /// Restarted, and its `Rejoin` entry not applied yet: Raft only, no pages.
    rejoining: bool,
    /// Copies kept for other homes' pages (`PeerMessage::Backup`): reported when a
    /// page is recovered, never seen by this node's applications.
    backups: BTreeMap<PageId, BackupCopy>,
    /// Pages this node homes that lost a copy with a node marked down, waiting for a
    /// repair (the repairs running, at most `MAX_REPAIRS_IN_FLIGHT`, are transactions:
    /// `Node::repairs_running`).
    repairs_due: BTreeSet<PageId>,
    /// Syncs waiting for flushes, by id.
    syncs: BTreeMap<u64, SyncWait>,
    /// Pages with a flush in flight (`LocalPage::flush`), for its retries.
    flushing: BTreeSet<PageId>,
    next_sync_id: u64,
    /// Started to join, and not yet a member in its metadata: Raft only, no pages.
    joining: bool,
    /// Application requests made while rejoining, with their deadline tick: served
    /// once rejoined, `Busy` past the deadline.
    rejoin_waiting: VecDeque<(AppToken, AppRequest, u64)>,
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
    /// Released runs whose pages the driver is dropping: token → (space, first chunk).
    releases: BTreeMap<u64, (SpaceId, u64)>,
    next_release_token: u64,
    /// `ReleaseDone`s refused at once (`Busy`), proposed again on the next tick.
    release_acks_due: VecDeque<(SpaceId, u64)>,
    next_free_id: u64,

    pending_app_requests: usize,
    /// True while a Raft `Ready` is being handled: proposals made then (from applied
    /// entries) wait in `queued_proposals` until the Ready is advanced.
    in_ready: bool,
    /// Members sent a snapshot in this Ready round: reported delivered once it is
    /// advanced (see `drive_raft_rounds`).
    snapshots_sent: Vec<NodeId>,
    queued_proposals: Vec<Proposal>,
    /// A membership change was applied: snapshot and compact at once (`compact_log`).
    membership_changed: bool,
    loopback: VecDeque<Envelope>,
    actions: Vec<Action>,
    stats: Stats,
}

fn raft_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Node {
    /// A node's first start: an empty log, every member up.
    pub fn new(config: Config) -> Result<Node, String> {
        Node::start(config, Start::First)
    }

    /// A node restarting from its disk, as the next incarnation (`config.incarnation`
    /// above the one that wrote `persisted`). It has its Raft log but no page, no
    /// directory and no allocator: until its `Rejoin` entry is applied it takes part
    /// in Raft only (docs/protocol.md "Restart and rejoin").
    pub fn restart(config: Config, persisted: &PersistedRaft) -> Result<Node, String> {
        if config.incarnation == FIRST_INCARNATION {
            return Err("a restart needs an incarnation above the first".into());
        }
        Node::start(config, Start::Restart(persisted))
    }

    /// A node's first start when it is not in the cluster's first configuration: it
    /// knows no member's state until the leader sends it the metadata, once an
    /// administrator added it (`AddMember`); it serves nothing before.
    /// `config.members` lists the nodes it may hear from.
    pub fn join(config: Config) -> Result<Node, String> {
        Node::start(config, Start::Join)
    }

    fn start(config: Config, start: Start) -> Result<Node, String> {
        let persisted = match start {
            Start::Restart(persisted) => Some(persisted),
            Start::First | Start::Join => None,
        };
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
        #[allow(unused_mut)]
        let (store, mut meta) = match start {
            Start::First => {
                let storage =
                    MemStorage::new_with_conf_state(ConfState::from((members.clone(), vec![])));
                (RaftStore::new(storage), MetaState::new(&members))
            }
            // No voter: raft-rs waits for the leader, which sends a snapshot (the
            // leader's log starts past index 1 once a member is added).
            Start::Join => (RaftStore::new(MemStorage::new()), MetaState::default()),
            Start::Restart(persisted) => {
                let store = RaftStore::restore(persisted)?;
                // The metadata at the snapshot; the entries after it are applied again
                // as raft-rs hands them over. Without a snapshot, membership never
                // changed (every change writes one with it), so the persisted voters are
                // the first configuration's.
                let meta = if persisted.snapshot.get_metadata().index > 0 {
                    MetaState::decode_snapshot(&persisted.snapshot.data)
                        .map_err(|e| format!("persisted metadata snapshot: {e}"))?
                } else if persisted.conf_state.voters.is_empty() {
                    MetaState::default()
                } else {
                    let mut voters = persisted.conf_state.voters.clone();
                    voters.sort_unstable();
                    MetaState::new(&voters)
                };
                (store, meta)
            }
        };
        let raft = RawNode::new(&raft_config, store, &raft_logger()).map_err(|e| e.to_string())?;
        #[cfg(feature = "mutants")]
        {
            meta.mutant_double_lease = config.mutant == Some(Mutant::DoubleLease);
        }
        let single = members.len() == 1 && matches!(start, Start::First);
        let id_base = config.id_base();
        let rejoining = persisted.is_some();
        let joining = matches!(start, Start::Join);
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
            rejoining,
            joining,
            backups: BTreeMap::new(),
            repairs_due: BTreeSet::new(),
            syncs: BTreeMap::new(),
            flushing: BTreeSet::new(),
            next_sync_id: 1,
            rejoin_waiting: VecDeque::new(),
            pending_voids: BTreeMap::new(),
            next_proposal_id: id_base + 1,
            proposals: BTreeMap::new(),
            next_request_id: id_base + 1,
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
            releases: BTreeMap::new(),
            next_release_token: 1,
            release_acks_due: VecDeque::new(),
            next_free_id: id_base + 1,
            pending_app_requests: 0,
            in_ready: false,
            snapshots_sent: Vec::new(),
            queued_proposals: Vec::new(),
            membership_changed: false,
            loopback: VecDeque::new(),
            actions: Vec::new(),
            stats: Stats::default(),
        };
        if matches!(start, Start::First) {
            // The first configuration, durable before anything else: a restart before
            // any membership change replays the log from it.
            node.actions.push(Action::PersistRaft(RaftWrite {
                conf_state: Some(ConfState::from((members.clone(), vec![]))),
                must_sync: true,
                ..RaftWrite::default()
            }));
        }
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
    /// Pages this node homes whose copies are being made again, or wait to be.
    pub fn repairs_pending(&self) -> usize {
        self.repairs_due.len() + self.repairs_running()
    }
    /// For the simulator's copies checker: the pages this node homes that are at rest
    /// (no writer, no transaction or queue, rebuilt, not lost) with a master, and the
    /// master's bytes. A repair made sure they are on `copies_needed` nodes.
    pub fn masters_at_rest(&self) -> impl Iterator<Item = (PageId, &PageBytes)> + '_ {
        self.directory
            .iter()
            .filter(|(_, e)| {
                e.writer.is_none()
                    && e.txn.is_none()
                    && e.queue.is_empty()
                    && !e.lost
                    && !e.needs_collect
            })
            .filter_map(|(&id, e)| e.master.as_deref().map(|bytes| (id, bytes)))
    }
    /// The bytes of the backup this node keeps of `page`, if any.
    pub fn backup_bytes(&self, page: PageId) -> Option<&PageBytes> {
        self.backups.get(&page).map(|copy| &*copy.bytes)
    }
    /// No repair is due or running here, and none can become due from a node already
    /// marked down (its copies are void here).
    pub fn repairs_settled(&self) -> bool {
        self.pending_voids.is_empty() && self.repairs_pending() == 0
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
    /// Restarted and not rejoined yet (serves no page).
    pub fn is_rejoining(&self) -> bool {
        self.rejoining
    }
    /// Started to join the cluster and not a member yet (serves no page).
    pub fn is_joining(&self) -> bool {
        self.joining
    }
    /// Whether the node may serve applications: a member in its own metadata, neither
    /// rejoining nor joining.
    pub fn is_serving(&self) -> bool {
        !self.rejoining && !self.joining
    }
    /// Whether `node` may send to this one: a member in the metadata, or (for a node
    /// whose metadata is behind) one of the configured members never removed.
    pub fn is_member(&self, node: NodeId) -> bool {
        self.meta.nodes.contains_key(&node)
            || (self.config.members.contains(&node) && !self.meta.removed.contains(&node))
    }
    pub fn allocator(&self, space: SpaceId) -> Option<&ExtentAllocator> {
        self.allocators.get(&space)
    }
    /// Pages this node holds, with their access.
    pub fn held_pages(&self) -> impl Iterator<Item = (PageId, Access)> + '_ {
        self.pages
            .iter()
            .filter(|(_, p)| p.held != Access::None)
            .map(|(&id, p)| (id, p.held))
    }
    /// What the applications may do with `page` now, as far as a futex wait is
    /// concerned: `None` while a revocation of it runs (its waiters are about to be
    /// woken, so no new one may sleep on a copy that is going away).
    pub fn futex_access(&self, page: PageId) -> Access {
        match self.pages.get(&page) {
            Some(local) if local.revoke.is_none() => self.page_access(local),
            _ => Access::None,
        }
    }
    /// Whether this node holds any state of `space` (pages, directory entries, an
    /// allocator, requests waiting on it).
    pub fn holds_space(&self, space: SpaceId) -> bool {
        let first = PageId { space, index: 0 };
        let in_space = |page: &PageId| page.space == space;
        self.allocators.contains_key(&space)
            || self.pending_allocations.contains_key(&space)
            || self.lease_in_flight.contains(&space)
            || self
                .pages
                .range(first..)
                .next()
                .is_some_and(|(p, _)| in_space(p))
            || self
                .directory
                .range(first..)
                .next()
                .is_some_and(|(p, _)| in_space(p))
            || self.unmapped.iter().any(|f| f.space == space)
            || self.remote_frees.values().any(|f| f.space == space)
    }

    pub fn directory_len(&self) -> usize {
        self.directory.len()
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
            // One Raft tick per interval elapsed, however late this call is, so Raft
            // counts the same time as fencing and failure detection. Past a few election
            // timeouts every Raft timer has fired: the rest is skipped, not replayed.
            let interval = self.config.raft_tick_interval_ticks;
            let max_catch_up = 4 * self.election_timeout_raft_ticks();
            let behind = (self.now_ticks - self.next_raft_tick) / interval + 1;
            if behind > max_catch_up {
                self.next_raft_tick += (behind - max_catch_up) * interval;
            }
            while self.now_ticks >= self.next_raft_tick {
                self.next_raft_tick += interval;
                self.raft.tick();
                self.drive_raft();
            }
            if !self.is_leader
                && self.is_serving()
                && self.leader_id != 0
                && self.now_ticks >= self.next_lease_request_tick
            {
                self.next_lease_request_tick = self.now_ticks + self.config.lease_interval_ticks;
                let sent_tick = self.now_ticks;
                self.send(self.leader_id, PeerMessage::LeaseRequest { sent_tick });
            }
        }
        self.drive_rejoin();
        while self
            .rejoin_waiting
            .front()
            .is_some_and(|&(_, _, deadline)| deadline <= self.now_ticks)
        {
            let (token, _, _) = self.rejoin_waiting.pop_front().expect("checked");
            self.reply_error(token, AppError::Busy);
        }
        self.update_fence();
        self.void_due();
        self.run_repairs();
        self.retry_due();
        for _ in 0..self.release_acks_due.len() {
            let (space, first_chunk) = self.release_acks_due.pop_front().expect("counted");
            self.acknowledge_release(space, first_chunk);
        }
        // An evicted node still votes and may lead: it keeps detecting failures so the
        // cluster's metadata moves on.
        if self.is_leader {
            self.detect_down_nodes();
        }
        self.run_loopback();
    }

    /// The longest election timeout of any member, in Raft ticks.
    fn election_timeout_raft_ticks(&self) -> u64 {
        let members = self.config.members.len().max(self.meta.nodes.len());
        (self.config.election_raft_ticks + 3 * members + 1) as u64
    }

    /// The next tick at which `tick` has something to do: a Raft tick, a retry, a
    /// fence, a void, a metadata wait or a failure-detector deadline. A driver may
    /// sleep until then unless an input arrives.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next = self.next_raft_tick;
        let mut consider = |tick: u64| next = next.min(tick);
        if !self.fenced && !self.is_leader {
            if let Some(sent) = self.lease_sent_tick {
                consider(sent + self.config.fence_after_ticks + 1);
            }
        }
        for &at in self.pending_voids.values() {
            consider(at);
        }
        for pending in self.proposals.values() {
            consider(pending.retry.next_tick);
        }
        for id in &self.requesting {
            if let Some(request) = self.pages.get(id).and_then(|p| p.request.as_ref()) {
                consider(request.retry.next_tick);
            }
        }
        for id in &self.busy {
            if let Some(txn) = self.directory.get(id).and_then(|e| e.txn.as_ref()) {
                consider(txn.retry.next_tick);
            }
        }
        for free in self.remote_frees.values() {
            consider(free.retry.next_tick);
        }
        if let Some(at) = self.next_flush_retry() {
            consider(at);
        }
        for fault in &self.unmapped {
            consider(fault.deadline_tick);
        }
        if self.is_leader {
            for (&member, &heard) in &self.last_heard_tick {
                if member != self.config.id && self.meta.is_up(member) {
                    consider(heard + self.config.down_after_ticks + 1);
                }
            }
        }
        Some(next.max(self.now_ticks + 1))
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
            RevokeReply::CollectAck { seq } => {
                let page = &self.pages[&page_id];
                let report = CopyReport {
                    held: page.held,
                    version: page.copy_version(),
                    seq_seen: page.seq_seen,
                    // Nothing to recover from without its version.
                    bytes: page.mem_version.and(bytes),
                    backup: self.backups.get(&page_id).cloned(),
                };
                self.send(
                    home,
                    PeerMessage::CollectAck {
                        page: page_id,
                        seq,
                        report,
                    },
                );
            }
            RevokeReply::Flush => self.flush_captured(page_id, bytes),
        }
        let deferred = std::mem::take(&mut self.pages.get_mut(&page_id).expect("present").deferred);
        // Replayed as from their sender: one from a home that went down since is
        // rejected like any message from a node that is not the page's home.
        for (from, message) in deferred {
            self.dispatch(from, message);
        }
        // A sync that came while the page was being revoked flushes it now.
        let page = self.pages.get_mut(&page_id).expect("present");
        if page.revoke.is_none() && page.flush.is_none() && std::mem::take(&mut page.flush_wanted) {
            self.start_flush(page_id);
        }
        self.advance_local(page_id);
        self.run_loopback();
    }

    /// The driver finished an `Action::ReleasePages`: this node holds nothing of the run.
    pub fn handle_release_done(&mut self, now_ticks: u64, token: u64) {
        self.set_now(now_ticks);
        let Some((space, first_chunk)) = self.releases.remove(&token) else {
            self.stats.messages_rejected += 1;
            return;
        };
        self.acknowledge_release(space, first_chunk);
        self.run_loopback();
    }

    fn acknowledge_release(&mut self, space: SpaceId, first_chunk: u64) {
        let me = self.config.id;
        let waited_for = self
            .meta
            .releasing
            .get(&(space, first_chunk))
            .is_some_and(|r| r.waiting.contains(&me));
        if self.evicted || !waited_for {
            return;
        }
        let command = Command::ReleaseDone { space, first_chunk };
        if self.propose(command, Purpose::ReleaseDone).is_err() {
            self.release_acks_due.push_back((space, first_chunk));
        }
    }

    /// Holds a home message back while a revocation of the page runs. True if deferred.
    fn defer_during_revoke(
        &mut self,
        page_id: PageId,
        from: NodeId,
        message: &PeerMessage,
    ) -> bool {
        let Some(page) = self.pages.get_mut(&page_id) else {
            return false;
        };
        if page.revoke.is_none() {
            return false;
        }
        if page.deferred.len() >= MAX_DEFERRED_PER_PAGE {
            page.deferred.remove(0);
        }
        page.deferred.push((from, message.clone()));
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

    /// A message from this node's current life to `to`.
    pub fn envelope(&self, to: NodeId, message: PeerMessage) -> Envelope {
        Envelope {
            from: self.config.id,
            from_incarnation: self.config.incarnation,
            to,
            to_incarnation: self.meta.incarnation(to),
            message,
        }
    }

    fn send(&mut self, to: NodeId, message: PeerMessage) {
        let envelope = self.envelope(to, message);
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
        if !page.validated {
            Access::None
        } else if page.clean && page.held == Access::Write {
            // A flush took the applications' write access (`LocalPage::clean`).
            self.effective(Access::Read)
        } else {
            self.effective(page.held)
        }
    }

    // -----------------------------------------------------------------------------
    // Retries.

    fn retry_due(&mut self) {
        self.retry_flushes();
        let now = self.now_ticks;
        let max = self.config.retry_max_ticks;
        // Proposals: re-propose; the state machine dedupes by (origin, proposal_id).
        let due: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.retry.is_due(now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let oldest_in_flight = *self.proposals.keys().next().expect("listed");
            let pending = self.proposals.get_mut(&id).expect("listed");
            pending.proposal.oldest_in_flight = oldest_in_flight;
            pending.retry.backed_off(now, max);
            let proposal = pending.proposal.clone();
            self.stats.retries += 1;
            self.submit_proposal(&proposal);
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
                    .is_some_and(|r| r.retry.is_due(now))
            })
            .copied()
            .collect();
        for page_id in due {
            let page = self.pages.get_mut(&page_id).expect("listed");
            let have_version = page.have_version();
            let request = page.request.as_mut().expect("listed");
            request.retry.backed_off(now, max);
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
                    .is_some_and(|t| t.retry.is_due(now))
            })
            .copied()
            .collect();
        for page_id in due {
            let txn = self
                .directory
                .get_mut(&page_id)
                .and_then(|e| e.txn.as_mut())
                .expect("listed");
            txn.retry.backed_off(now, max);
            if matches!(txn.phase, Phase::Replicate { .. }) {
                self.widen_replication(page_id);
            }
            let txn = self.directory[&page_id].txn.as_ref().expect("listed");
            let phase = txn.phase.clone();
            self.stats.retries += 1;
            self.send_phase(page_id, &phase);
        }
        // Remote frees.
        let due: Vec<u64> = self
            .remote_frees
            .iter()
            .filter(|(_, f)| f.retry.is_due(now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let oldest_in_flight = *self.remote_frees.keys().next().expect("listed");
            let free = self.remote_frees.get_mut(&id).expect("listed");
            free.retry.backed_off(now, max);
            let message = PeerMessage::FreeRequest {
                space: free.space,
                addr: free.addr,
                request_id: id,
                oldest_in_flight,
            };
            let target = free.target;
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
                .is_some_and(|chunk| {
                    self.meta.releasing_run(fault.space, chunk).is_none()
                        && self
                            .meta
                            .chunk(fault.space, chunk)
                            .is_some_and(|r| Some(r.lessee) != fault.stale_lessee)
                });
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
    AckReleaseBeforePagesDropped,
    RecoverFromOldestCopy,
    RecoverIgnoresWriter,
    AckBeforeBackup,
    RecoverIgnoresBackups,
    SkipRepairs,
}
