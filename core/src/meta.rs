//! The metadata replicated through Raft: membership, spaces, chunk leases and page homes.
//!
//! Every node applies the same committed commands in the same order, so every node holds
//! the same `MetaState`. Commands are idempotent per `(origin, proposal_id)`: a proposer
//! that retries after a leader change gets the first outcome back and never a second lease.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{DecodeError, Reader, Writer};
use crate::dedupe::{Dedupe, Seen};
use crate::types::{NodeId, SpaceId, SpaceLayout, SPACE_NAME_MAX_BYTES};

/// Most proposals a node keeps in flight.
pub const MAX_PROPOSALS_IN_FLIGHT: usize = 64;
/// Most spaces a cluster holds.
pub const MAX_SPACES: usize = 1024;
/// Largest number of chunks one lease may take.
pub const MAX_CHUNKS_PER_LEASE: u32 = 1 << 16;

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    CreateSpace {
        name: String,
        base_addr: u64,
        size_bytes: u64,
        chunk_size_bytes: u64,
        root_size_bytes: u64,
        /// Place the space at the lowest free range at or above `base_addr` instead of
        /// exactly there; joining then needs only the size to agree.
        flexible_base: bool,
        /// Keep the space when its last process has gone (set by whoever creates it).
        persistent: bool,
        /// k, the copies of each page (`SpaceLayout::replicas`).
        replicas: u8,
    },
    /// The origin has a process that joins the space named `name`: add the origin to
    /// its attach set. Creating (or joining by `CreateSpace`) attaches too.
    Attach { name: String },
    /// The origin's last process of `space` has gone: remove the origin from the
    /// attach set. The space is destroyed when the set empties, unless persistent.
    Detach { space: SpaceId },
    /// Lease `count` contiguous free chunks of `space` to `node`.
    LeaseChunks {
        space: SpaceId,
        node: NodeId,
        count: u32,
    },
    /// The origin, lessee of `count` chunks from `first_chunk`, holds no block in them
    /// any more: every node drops its copies of their pages and says so with
    /// `ReleaseDone`; the chunks are free once all nodes up have (see "Chunk release").
    ReleaseChunks {
        space: SpaceId,
        first_chunk: u64,
        count: u32,
    },
    /// The origin holds nothing of the released run starting at `first_chunk` any more:
    /// no page state, no process access, its memory of the pages zeroed.
    ReleaseDone { space: SpaceId, first_chunk: u64 },
    /// `node` stopped answering: its leases stay (nothing is reused), its page copies
    /// are void, and pages only it held are lost. It leaves every attach set. Only
    /// about the life of `node` named by `incarnation`: a mark-down decided before the
    /// node restarted and rejoined does nothing to its new life.
    MarkDown { node: NodeId, incarnation: u64 },
    /// The origin, down, restarted as `incarnation` (greater than every earlier one)
    /// with its Raft log but none of its pages: it is up again, holding nothing, homing
    /// nothing (its chunks moved when it went down).
    Rejoin { node: NodeId, incarnation: u64 },
    /// The space named `name` is kept no longer: it ends when its attach set is empty,
    /// at once if it is (an administrator's `gallocy space unpersist`).
    Unpersist { name: String },
    /// `node` becomes a member (a Raft voter), up, in its first life, holding and
    /// homing nothing. Carried by a Raft configuration change (`EntryConfChange`), so
    /// the metadata and Raft's own membership change at the same entry.
    AddMember { node: NodeId },
    /// `node` leaves the cluster for good: marked down first if it is up (its copies
    /// void, its chunks moved), then forgotten; its id is never a member again.
    RemoveMember { node: NodeId },
}

/// Why a membership change was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MembershipRejection {
    AlreadyMember = 1,
    /// Ids of removed members are never reused: their messages must never count.
    IdRemoved = 2,
    NotMember = 3,
    /// The last member up cannot be removed (nobody would be left to serve).
    LastMemberUp = 4,
    TooManyMembers = 5,
    /// Node id 0, or one past the id space.
    BadNodeId = 6,
}

impl MembershipRejection {
    pub fn from_code(code: u64) -> Option<MembershipRejection> {
        Some(match code {
            1 => MembershipRejection::AlreadyMember,
            2 => MembershipRejection::IdRemoved,
            3 => MembershipRejection::NotMember,
            4 => MembershipRejection::LastMemberUp,
            5 => MembershipRejection::TooManyMembers,
            6 => MembershipRejection::BadNodeId,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            MembershipRejection::AlreadyMember => "the node is already a member",
            MembershipRejection::IdRemoved => {
                "that node id belonged to a removed member; give the new node another id"
            }
            MembershipRejection::NotMember => "the node is not a member",
            MembershipRejection::LastMemberUp => "it is the last member up",
            MembershipRejection::TooManyMembers => "the cluster has the most members it may have",
            MembershipRejection::BadNodeId => "node ids are 1 to 2^24 - 1",
        }
    }
}

/// Most members a cluster may have (node ids must also fit program and thread ids).
pub const MAX_MEMBERS: usize = 64;
/// Node ids are below this (they are part of thread and program ids).
pub const NODE_ID_LIMIT: NodeId = 1 << 24;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Proposal {
    pub origin: NodeId,
    pub proposal_id: u64,
    /// The origin's oldest proposal still in flight (see `dedupe`).
    pub oldest_in_flight: u64,
    pub command: Command,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome {
    SpaceCreated(SpaceLayout),
    SpaceRejected(&'static str),
    Leased {
        space: SpaceId,
        first_chunk: u64,
        count: u32,
    },
    LeaseRejected(&'static str),
    /// The origin left the space's attach set; `destroyed` if the space went with it.
    Detached {
        space: SpaceId,
        destroyed: bool,
    },
    /// The run is being released: its pages are served to nobody any more.
    Releasing {
        space: SpaceId,
        first_chunk: u64,
        count: u32,
    },
    ReleaseRejected(&'static str),
    /// `freed`: this acknowledgement was the last one, and the chunks are free.
    ReleaseAcknowledged {
        freed: bool,
    },
    MarkedDown(NodeId),
    Rejoined(NodeId),
    RejoinRejected(&'static str),
    /// `added`: the node became a member; else it was removed.
    MembershipChanged {
        node: NodeId,
        added: bool,
    },
    MembershipRejected(MembershipRejection),
    /// `space`: None if no space has that name; `destroyed` if it ended at once.
    Unpersisted {
        space: Option<SpaceId>,
        destroyed: bool,
    },
    /// A stale duplicate beyond the dedupe window: not executed again.
    Stale,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkRecord {
    /// The node that may carve allocations from this chunk.
    pub lessee: NodeId,
    /// The node that manages coherence of this chunk's pages (owner and copy set):
    /// the lessee, until the home is marked down and the chunk moves to a survivor
    /// (`rehome_chunks_of`).
    pub home: NodeId,
    /// The lessee's life that leased it: its allocator state (which blocks are live)
    /// ended with that life.
    pub lessee_incarnation: u64,
}

impl ChunkRecord {
    /// Whether the lessee's life that carved this chunk has ended (it was marked down,
    /// and may have rejoined since as a later life).
    pub fn lessee_lost(&self, meta: &MetaState) -> bool {
        !meta.is_up(self.lessee) || meta.incarnation(self.lessee) != self.lessee_incarnation
    }

    /// Whether the chunk's directory no longer lives where it began (with the lessee's
    /// life that leased it): its pages are rebuilt from the copies that survive.
    pub fn recovered(&self, meta: &MetaState) -> bool {
        self.home != self.lessee || meta.incarnation(self.lessee) != self.lessee_incarnation
    }
}

/// A run of chunks being released, until every node up has dropped its pages.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Release {
    pub count: u32,
    /// Nodes that have not said `ReleaseDone` yet (only nodes up; a node marked down
    /// leaves the set).
    pub waiting: BTreeSet<NodeId>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NodeStatus {
    Up,
    Down,
}

#[derive(Clone, Debug, Default)]
pub struct MetaState {
    pub nodes: BTreeMap<NodeId, NodeStatus>,
    /// Per member, its current life: 1 until it first restarts and rejoins.
    pub incarnations: BTreeMap<NodeId, u64>,
    /// Ids of members removed: never members again.
    pub removed: BTreeSet<NodeId>,
    pub spaces: BTreeMap<SpaceId, SpaceLayout>,
    pub space_ids_by_name: BTreeMap<String, SpaceId>,
    pub chunks: BTreeMap<(SpaceId, u64), ChunkRecord>,
    /// Per space, the nodes with a process attached (as they proposed it).
    pub attached: BTreeMap<SpaceId, BTreeSet<NodeId>>,
    /// Spaces kept when their attach set empties.
    pub persistent: BTreeSet<SpaceId>,
    /// Runs being released, by (space, first chunk). Their chunk records stay (nobody
    /// may lease them) until the run is free.
    pub releasing: BTreeMap<(SpaceId, u64), Release>,
    /// Ids are never reused, so a message about a destroyed space can never be taken
    /// for one about a later space.
    pub next_space_id: SpaceId,
    /// Spaces destroyed by the commands applied since the last `take_destroyed`: every
    /// node drops what it holds of them.
    destroyed: Vec<SpaceId>,
    /// Outcomes of proposals still possibly retried, for exactly-once execution.
    outcomes: Dedupe<Outcome>,
    pub applied_commands: u64,
    #[cfg(feature = "mutants")]
    pub mutant_double_lease: bool,
}

impl MetaState {
    pub fn new(members: &[NodeId]) -> MetaState {
        let mut state = MetaState {
            next_space_id: 1,
            ..MetaState::default()
        };
        for &node in members {
            state.nodes.insert(node, NodeStatus::Up);
            state.incarnations.insert(node, FIRST_INCARNATION);
        }
        state
    }

    /// The member's current incarnation (0 for a node that is not a member).
    pub fn incarnation(&self, node: NodeId) -> u64 {
        self.incarnations.get(&node).copied().unwrap_or(0)
    }

    /// The nodes up, in id order.
    pub fn up_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes
            .iter()
            .filter(|(_, &status)| status == NodeStatus::Up)
            .map(|(&id, _)| id)
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node) == Some(&NodeStatus::Up)
    }

    pub fn chunk(&self, space: SpaceId, chunk: u64) -> Option<ChunkRecord> {
        self.chunks.get(&(space, chunk)).copied()
    }

    /// Whether `node` is in the attach set of `space`.
    pub fn is_attached(&self, space: SpaceId, node: NodeId) -> bool {
        self.attached
            .get(&space)
            .is_some_and(|set| set.contains(&node))
    }

    /// The released run that holds `chunk`, if any: (first chunk, count).
    pub fn releasing_run(&self, space: SpaceId, chunk: u64) -> Option<(u64, u32)> {
        let (&(s, first), release) = self.releasing.range(..=(space, chunk)).next_back()?;
        (s == space && chunk < first + release.count as u64).then_some((first, release.count))
    }

    /// Frees the chunks of a released run once no node is left to drop it.
    fn free_if_released(&mut self, space: SpaceId, first_chunk: u64) -> bool {
        let Some(release) = self.releasing.get(&(space, first_chunk)) else {
            return false;
        };
        if !release.waiting.is_empty() {
            return false;
        }
        let count = release.count as u64;
        self.releasing.remove(&(space, first_chunk));
        for chunk in first_chunk..first_chunk + count {
            self.chunks.remove(&(space, chunk));
        }
        true
    }

    /// The spaces destroyed since the last call, in the order they went.
    pub fn take_destroyed(&mut self) -> Vec<SpaceId> {
        std::mem::take(&mut self.destroyed)
    }

    /// Drops a space and every chunk record of it; its range is free again.
    fn destroy(&mut self, space: SpaceId) {
        let Some(layout) = self.spaces.remove(&space) else {
            return;
        };
        self.space_ids_by_name.remove(&layout.name);
        self.attached.remove(&space);
        self.persistent.remove(&space);
        self.releasing.retain(|&(s, _), _| s != space);
        let chunks: Vec<(SpaceId, u64)> = self
            .chunks
            .range((space, 0)..=(space, u64::MAX))
            .map(|(&k, _)| k)
            .collect();
        for key in chunks {
            self.chunks.remove(&key);
        }
        self.destroyed.push(space);
    }

    /// Removes `node` from the attach set of `space`; destroys the space if that
    /// empties it and it is not persistent. Returns whether it was destroyed.
    fn leave(&mut self, space: SpaceId, node: NodeId) -> bool {
        let Some(set) = self.attached.get_mut(&space) else {
            return false;
        };
        set.remove(&node);
        if set.is_empty() && !self.persistent.contains(&space) {
            self.destroy(space);
            return true;
        }
        false
    }

    pub fn space_by_name(&self, name: &str) -> Option<&SpaceLayout> {
        self.space_ids_by_name
            .get(name)
            .and_then(|id| self.spaces.get(id))
    }

    /// The outcome of an already-applied proposal, if it is still remembered.
    pub fn outcome_of(&self, origin: NodeId, proposal_id: u64) -> Option<&Outcome> {
        self.outcomes.get(origin, proposal_id)
    }

    pub fn apply(&mut self, proposal: &Proposal) -> Outcome {
        match self.outcomes.check(
            proposal.origin,
            proposal.proposal_id,
            proposal.oldest_in_flight,
        ) {
            Seen::Done(previous) => return previous,
            Seen::Stale => return Outcome::Stale,
            Seen::New => {}
        }
        let outcome = self.execute(proposal);
        self.outcomes
            .record(proposal.origin, proposal.proposal_id, outcome.clone());
        self.applied_commands += 1;
        outcome
    }

    fn execute(&mut self, proposal: &Proposal) -> Outcome {
        match &proposal.command {
            Command::CreateSpace {
                name,
                base_addr,
                size_bytes,
                chunk_size_bytes,
                root_size_bytes,
                flexible_base,
                persistent,
                replicas,
            } => {
                if !self.is_up(proposal.origin) {
                    return Outcome::SpaceRejected("creating node is down");
                }
                if let Some(existing) = self.space_by_name(name).cloned() {
                    // Creating a space that exists is joining it, if the layout agrees.
                    let base_agrees = *flexible_base || existing.base_addr == *base_addr;
                    if base_agrees && existing.size_bytes == *size_bytes {
                        self.attached
                            .entry(existing.id)
                            .or_default()
                            .insert(proposal.origin);
                        return Outcome::SpaceCreated(existing);
                    }
                    return Outcome::SpaceRejected(
                        "a space with this name and another layout exists",
                    );
                }
                if self.spaces.len() >= MAX_SPACES {
                    return Outcome::SpaceRejected("too many spaces");
                }
                let id = self.next_space_id;
                if id == SpaceId::MAX {
                    return Outcome::SpaceRejected("space ids exhausted");
                }
                let base_addr = if *flexible_base {
                    self.free_base(*base_addr, *size_bytes, *chunk_size_bytes)
                } else {
                    *base_addr
                };
                let layout = SpaceLayout {
                    id,
                    name: name.clone(),
                    base_addr,
                    size_bytes: *size_bytes,
                    chunk_size_bytes: *chunk_size_bytes,
                    root_size_bytes: *root_size_bytes,
                    replicas: *replicas,
                };
                if let Err(why) = layout.validate() {
                    return Outcome::SpaceRejected(why);
                }
                let overlaps = self.spaces.values().any(|other| {
                    layout.base_addr < other.end_addr() && other.base_addr < layout.end_addr()
                });
                if overlaps {
                    return Outcome::SpaceRejected("range overlaps another space");
                }
                self.next_space_id = id + 1;
                // Chunk 0 holds the root block; its home is the creator.
                self.chunks.insert(
                    (id, 0),
                    ChunkRecord {
                        lessee: proposal.origin,
                        home: proposal.origin,
                        lessee_incarnation: self.incarnation(proposal.origin),
                    },
                );
                self.space_ids_by_name.insert(name.clone(), id);
                self.spaces.insert(id, layout.clone());
                self.attached.insert(id, BTreeSet::from([proposal.origin]));
                if *persistent {
                    self.persistent.insert(id);
                }
                Outcome::SpaceCreated(layout)
            }
            Command::Attach { name } => {
                if !self.is_up(proposal.origin) {
                    return Outcome::SpaceRejected("attaching node is down");
                }
                let Some(layout) = self.space_by_name(name).cloned() else {
                    return Outcome::SpaceRejected("unknown space");
                };
                self.attached
                    .entry(layout.id)
                    .or_default()
                    .insert(proposal.origin);
                Outcome::SpaceCreated(layout)
            }
            Command::ReleaseChunks {
                space,
                first_chunk,
                count,
            } => {
                let Some(layout) = self.spaces.get(space) else {
                    return Outcome::ReleaseRejected("unknown space");
                };
                let first = *first_chunk;
                let count = *count;
                let in_space = first
                    .checked_add(count as u64)
                    .is_some_and(|end| end <= layout.chunk_count());
                if count == 0 || count > MAX_CHUNKS_PER_LEASE || !in_space {
                    return Outcome::ReleaseRejected("bad chunk range");
                }
                if first == 0 {
                    return Outcome::ReleaseRejected("chunk 0 holds the root block");
                }
                let all_leased_to_origin = (first..first + count as u64).all(|chunk| {
                    self.chunks.get(&(*space, chunk)).is_some_and(|r| {
                        r.lessee == proposal.origin
                            && r.lessee_incarnation == self.incarnation(proposal.origin)
                    }) && self.releasing_run(*space, chunk).is_none()
                });
                if !all_leased_to_origin {
                    return Outcome::ReleaseRejected("not leased to the origin");
                }
                let waiting: BTreeSet<NodeId> = self
                    .nodes
                    .iter()
                    .filter(|(_, &status)| status == NodeStatus::Up)
                    .map(|(&node, _)| node)
                    .collect();
                self.releasing
                    .insert((*space, first), Release { count, waiting });
                Outcome::Releasing {
                    space: *space,
                    first_chunk: first,
                    count,
                }
            }
            Command::ReleaseDone { space, first_chunk } => {
                let Some(release) = self.releasing.get_mut(&(*space, *first_chunk)) else {
                    return Outcome::ReleaseAcknowledged { freed: false };
                };
                release.waiting.remove(&proposal.origin);
                Outcome::ReleaseAcknowledged {
                    freed: self.free_if_released(*space, *first_chunk),
                }
            }
            Command::Detach { space } => Outcome::Detached {
                space: *space,
                destroyed: self.leave(*space, proposal.origin),
            },
            Command::Unpersist { name } => {
                let Some(space) = self.space_ids_by_name.get(name).copied() else {
                    return Outcome::Unpersisted {
                        space: None,
                        destroyed: false,
                    };
                };
                self.persistent.remove(&space);
                let unattached = self.attached.get(&space).is_none_or(|set| set.is_empty());
                if unattached {
                    self.destroy(space);
                }
                Outcome::Unpersisted {
                    space: Some(space),
                    destroyed: unattached,
                }
            }
            Command::LeaseChunks { space, node, count } => {
                let Some(layout) = self.spaces.get(space) else {
                    return Outcome::LeaseRejected("unknown space");
                };
                if *count == 0 || *count > MAX_CHUNKS_PER_LEASE {
                    return Outcome::LeaseRejected("bad chunk count");
                }
                if !self.is_up(*node) {
                    return Outcome::LeaseRejected("node is down");
                }
                let chunk_count = layout.chunk_count();
                let count = *count as u64;
                let Some(first) = self.find_free_run(*space, chunk_count, count, *node) else {
                    return Outcome::LeaseRejected("space exhausted");
                };
                for chunk in first..first + count {
                    self.chunks.insert(
                        (*space, chunk),
                        ChunkRecord {
                            lessee: *node,
                            home: *node,
                            lessee_incarnation: self.incarnation(*node),
                        },
                    );
                }
                Outcome::Leased {
                    space: *space,
                    first_chunk: first,
                    count: count as u32,
                }
            }
            Command::MarkDown { node, incarnation } => {
                if !self.is_up(*node) || *incarnation != self.incarnation(*node) {
                    // Already down, or about a life that already ended.
                    return Outcome::MarkedDown(*node);
                }
                self.mark_down(*node);
                Outcome::MarkedDown(*node)
            }
            Command::AddMember { node } => {
                if *node == 0 || *node >= NODE_ID_LIMIT {
                    return Outcome::MembershipRejected(MembershipRejection::BadNodeId);
                }
                if self.nodes.contains_key(node) {
                    return Outcome::MembershipRejected(MembershipRejection::AlreadyMember);
                }
                if self.removed.contains(node) {
                    return Outcome::MembershipRejected(MembershipRejection::IdRemoved);
                }
                if self.nodes.len() >= MAX_MEMBERS {
                    return Outcome::MembershipRejected(MembershipRejection::TooManyMembers);
                }
                self.nodes.insert(*node, NodeStatus::Up);
                self.incarnations.insert(*node, FIRST_INCARNATION);
                // Chunks left on down homes (no node was up when they went down) get a
                // home now that one is.
                self.rehome_chunks_of_down_nodes();
                Outcome::MembershipChanged {
                    node: *node,
                    added: true,
                }
            }
            Command::RemoveMember { node } => {
                if !self.nodes.contains_key(node) {
                    return Outcome::MembershipRejected(MembershipRejection::NotMember);
                }
                if self.is_up(*node) && self.up_nodes().count() == 1 {
                    return Outcome::MembershipRejected(MembershipRejection::LastMemberUp);
                }
                if self.is_up(*node) {
                    self.mark_down(*node);
                }
                self.nodes.remove(node);
                self.incarnations.remove(node);
                self.removed.insert(*node);
                Outcome::MembershipChanged {
                    node: *node,
                    added: false,
                }
            }
            Command::Rejoin { node, incarnation } => {
                if proposal.origin != *node {
                    return Outcome::RejoinRejected("rejoin for another node");
                }
                if !self.nodes.contains_key(node) {
                    return Outcome::RejoinRejected("not a member");
                }
                if self.is_up(*node) {
                    return Outcome::RejoinRejected("node is up");
                }
                if *incarnation <= self.incarnation(*node) {
                    return Outcome::RejoinRejected("stale incarnation");
                }
                self.nodes.insert(*node, NodeStatus::Up);
                self.incarnations.insert(*node, *incarnation);
                // Chunks left on down homes (no node was up when they went down) get a
                // home now that one is.
                self.rehome_chunks_of_down_nodes();
                Outcome::Rejoined(*node)
            }
        }
    }

    /// Every chunk `down` was home of gets a new home among the nodes up, so its pages
    /// can be recovered from the copies that survive (docs/protocol.md "Recovery").
    /// One node per space (`space id mod nodes up`), so a space's chunk records stay
    /// runs and the homes of a cluster's spaces spread over its survivors. The lessee
    /// stays: nobody carves new blocks from a down node's chunks.
    /// `node` is down: it leaves every attach set and every release it was part of,
    /// and its chunks get new homes.
    fn mark_down(&mut self, node: NodeId) {
        if let Some(status) = self.nodes.get_mut(&node) {
            *status = NodeStatus::Down;
        }
        let spaces: Vec<SpaceId> = self.attached.keys().copied().collect();
        for space in spaces {
            self.leave(space, node);
        }
        self.rehome_chunks_of(node);
        // A node down drops nothing any more: its processes were fenced.
        let runs: Vec<(SpaceId, u64)> = self.releasing.keys().copied().collect();
        for (space, first) in runs {
            if let Some(release) = self.releasing.get_mut(&(space, first)) {
                release.waiting.remove(&node);
            }
            self.free_if_released(space, first);
        }
    }

    /// Chunks homed on nodes that are down or no longer members move to nodes up.
    fn rehome_chunks_of_down_nodes(&mut self) {
        let gone: BTreeSet<NodeId> = self
            .chunks
            .values()
            .map(|record| record.home)
            .filter(|home| !self.is_up(*home))
            .collect();
        for home in gone {
            self.rehome_chunks_of(home);
        }
    }

    fn rehome_chunks_of(&mut self, down: NodeId) {
        let up: Vec<NodeId> = self.up_nodes().collect();
        if up.is_empty() {
            return;
        }
        for (&(space, _), record) in self.chunks.iter_mut() {
            if record.home == down {
                record.home = up[space as usize % up.len()];
            }
        }
    }

    /// The lowest chunk-aligned base at or above `hint` where `size` bytes overlap no
    /// space (spaces are few; this scans them in address order).
    fn free_base(&self, hint: u64, size: u64, chunk: u64) -> u64 {
        let align = chunk.max(1 << 30);
        let mut base = hint;
        let mut ranges: Vec<(u64, u64)> = self
            .spaces
            .values()
            .map(|s| (s.base_addr, s.end_addr()))
            .collect();
        ranges.sort_unstable();
        for (start, end) in ranges {
            if base < end && start < base.saturating_add(size) {
                base = end.div_ceil(align).saturating_mul(align);
            }
        }
        base
    }

    /// Lowest run of `count` unleased chunks. Deterministic, so every replica agrees.
    fn find_free_run(
        &self,
        space: SpaceId,
        chunk_count: u64,
        count: u64,
        node: NodeId,
    ) -> Option<u64> {
        let mut run_start = 0u64;
        let mut run_len = 0u64;
        for chunk in 0..chunk_count {
            let free = match self.chunks.get(&(space, chunk)) {
                None => true,
                #[cfg(feature = "mutants")]
                Some(record) if self.mutant_double_lease => record.lessee != node && chunk != 0,
                Some(_) => false,
            };
            let _ = node;
            if free {
                if run_len == 0 {
                    run_start = chunk;
                }
                run_len += 1;
                if run_len == count {
                    return Some(run_start);
                }
            } else {
                run_len = 0;
            }
        }
        None
    }
}

const CMD_CREATE_SPACE: u8 = 1;
const CMD_LEASE_CHUNKS: u8 = 2;
const CMD_MARK_DOWN: u8 = 3;
const CMD_ATTACH: u8 = 4;
const CMD_DETACH: u8 = 5;
const CMD_RELEASE_CHUNKS: u8 = 6;
const CMD_RELEASE_DONE: u8 = 7;
const CMD_UNPERSIST: u8 = 8;
const CMD_REJOIN: u8 = 9;
const CMD_ADD_MEMBER: u8 = 10;
const CMD_REMOVE_MEMBER: u8 = 11;
const ENTRY_VERSION: u8 = 3;
/// A member's life before it first restarts.
pub const FIRST_INCARNATION: u64 = 1;

impl Proposal {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(ENTRY_VERSION);
        w.u64(self.origin);
        w.u64(self.proposal_id);
        w.u64(self.oldest_in_flight);
        match &self.command {
            Command::CreateSpace {
                name,
                base_addr,
                size_bytes,
                chunk_size_bytes,
                root_size_bytes,
                flexible_base,
                persistent,
                replicas,
            } => {
                w.u8(CMD_CREATE_SPACE);
                w.blob(name.as_bytes());
                w.u64(*base_addr);
                w.u64(*size_bytes);
                w.u64(*chunk_size_bytes);
                w.u64(*root_size_bytes);
                w.bool(*flexible_base);
                w.bool(*persistent);
                w.u8(*replicas);
            }
            Command::Attach { name } => {
                w.u8(CMD_ATTACH);
                w.blob(name.as_bytes());
            }
            Command::Detach { space } => {
                w.u8(CMD_DETACH);
                w.u32(*space);
            }
            Command::ReleaseChunks {
                space,
                first_chunk,
                count,
            } => {
                w.u8(CMD_RELEASE_CHUNKS);
                w.u32(*space);
                w.u64(*first_chunk);
                w.u32(*count);
            }
            Command::ReleaseDone { space, first_chunk } => {
                w.u8(CMD_RELEASE_DONE);
                w.u32(*space);
                w.u64(*first_chunk);
            }
            Command::LeaseChunks { space, node, count } => {
                w.u8(CMD_LEASE_CHUNKS);
                w.u32(*space);
                w.u64(*node);
                w.u32(*count);
            }
            Command::MarkDown { node, incarnation } => {
                w.u8(CMD_MARK_DOWN);
                w.u64(*node);
                w.u64(*incarnation);
            }
            Command::Rejoin { node, incarnation } => {
                w.u8(CMD_REJOIN);
                w.u64(*node);
                w.u64(*incarnation);
            }
            Command::AddMember { node } => {
                w.u8(CMD_ADD_MEMBER);
                w.u64(*node);
            }
            Command::RemoveMember { node } => {
                w.u8(CMD_REMOVE_MEMBER);
                w.u64(*node);
            }
            Command::Unpersist { name } => {
                w.u8(CMD_UNPERSIST);
                w.blob(name.as_bytes());
            }
        }
        w.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Proposal, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != ENTRY_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let origin = r.u64()?;
        let proposal_id = r.u64()?;
        let oldest_in_flight = r.u64()?;
        let command = match r.u8()? {
            CMD_CREATE_SPACE => Command::CreateSpace {
                name: space_name(&mut r)?,
                base_addr: r.u64()?,
                size_bytes: r.u64()?,
                chunk_size_bytes: r.u64()?,
                root_size_bytes: r.u64()?,
                flexible_base: r.bool()?,
                persistent: r.bool()?,
                replicas: r.u8()?,
            },
            CMD_ATTACH => Command::Attach {
                name: space_name(&mut r)?,
            },
            CMD_DETACH => Command::Detach { space: r.u32()? },
            CMD_RELEASE_CHUNKS => Command::ReleaseChunks {
                space: r.u32()?,
                first_chunk: r.u64()?,
                count: r.u32()?,
            },
            CMD_RELEASE_DONE => Command::ReleaseDone {
                space: r.u32()?,
                first_chunk: r.u64()?,
            },
            CMD_LEASE_CHUNKS => Command::LeaseChunks {
                space: r.u32()?,
                node: r.u64()?,
                count: r.u32()?,
            },
            CMD_MARK_DOWN => Command::MarkDown {
                node: r.u64()?,
                incarnation: r.u64()?,
            },
            CMD_REJOIN => Command::Rejoin {
                node: r.u64()?,
                incarnation: r.u64()?,
            },
            CMD_ADD_MEMBER => Command::AddMember { node: r.u64()? },
            CMD_REMOVE_MEMBER => Command::RemoveMember { node: r.u64()? },
            CMD_UNPERSIST => Command::Unpersist {
                name: space_name(&mut r)?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(Proposal {
            origin,
            proposal_id,
            oldest_in_flight,
            command,
        })
    }
}

fn space_name(r: &mut Reader) -> Result<String, DecodeError> {
    let name = r.blob(SPACE_NAME_MAX_BYTES)?;
    std::str::from_utf8(name)
        .map(str::to_string)
        .map_err(|_| DecodeError::Invalid("space name is not UTF-8"))
}

// ---------------------------------------------------------------------------------
// Snapshots: the whole state at an applied index, for log compaction (a member that
// fell behind the compacted log is sent it by Raft instead of the entries).

const SNAPSHOT_VERSION: u8 = 2;
/// Largest encoded snapshot: it travels in one Raft message, in one frame.
pub const MAX_SNAPSHOT_BYTES: usize = 768 << 10;
/// Most nodes a decoded snapshot may list.
const MAX_SNAPSHOT_NODES: usize = 4096;
/// Most chunk runs a decoded snapshot may list (each at least 36 bytes).
const MAX_SNAPSHOT_RUNS: usize = MAX_SNAPSHOT_BYTES / 36;
/// Most chunk records a decoded snapshot may hold (every chunk of `MAX_SPACES` spaces
/// of 4 GiB in 1 MiB chunks).
const MAX_SNAPSHOT_CHUNKS: u64 = 1 << 22;

/// Every reason an outcome can give, so a decoded one is the same `&'static str`.
const REJECTIONS: [&str; 24] = [
    "attaching node is down",
    "bad chunk count",
    "bad chunk range",
    "chunk 0 holds the root block",
    "creating node is down",
    "node is down",
    "not leased to the origin",
    "range overlaps another space",
    "space exhausted",
    "space ids exhausted",
    "space name must be 1 to 64 bytes",
    "too many spaces",
    "unexpected outcome",
    "unknown space",
    "chunk size must be a power of two between 4 KiB and 1 GiB",
    "space base must be non-zero and chunk-aligned",
    "space size must be a non-zero multiple of the chunk size",
    "space must end below the 47-bit user address limit",
    "root size must be a non-zero page multiple no larger than a chunk",
    "replicas must be 1 to 4",
    "rejoin for another node",
    "not a member",
    "node is up",
    "stale incarnation",
];
/// Written for a reason missing from `REJECTIONS` (a new one nobody added).
const UNLISTED_REJECTION: u8 = u8::MAX;

fn put_reason(w: &mut Writer, why: &str) {
    let index = REJECTIONS.iter().position(|&r| r == why);
    debug_assert!(index.is_some(), "rejection {why:?} is not in REJECTIONS");
    w.u8(index.map_or(UNLISTED_REJECTION, |i| i as u8));
}

fn get_reason(r: &mut Reader) -> Result<&'static str, DecodeError> {
    match r.u8()? {
        UNLISTED_REJECTION => Ok("rejected"),
        i => REJECTIONS
            .get(i as usize)
            .copied()
            .ok_or(DecodeError::Invalid("rejection reason")),
    }
}

fn put_layout(w: &mut Writer, layout: &SpaceLayout) {
    w.u32(layout.id);
    w.blob(layout.name.as_bytes());
    w.u64(layout.base_addr);
    w.u64(layout.size_bytes);
    w.u64(layout.chunk_size_bytes);
    w.u64(layout.root_size_bytes);
    w.u8(layout.replicas);
}

fn get_layout(r: &mut Reader) -> Result<SpaceLayout, DecodeError> {
    let layout = SpaceLayout {
        id: r.u32()?,
        name: space_name(r)?,
        base_addr: r.u64()?,
        size_bytes: r.u64()?,
        chunk_size_bytes: r.u64()?,
        root_size_bytes: r.u64()?,
        replicas: r.u8()?,
    };
    layout
        .validate()
        .map_err(|_| DecodeError::Invalid("space layout"))?;
    Ok(layout)
}

fn put_node_set(w: &mut Writer, nodes: &BTreeSet<NodeId>) {
    w.u32(nodes.len() as u32);
    for &node in nodes {
        w.u64(node);
    }
}

fn get_node_set(r: &mut Reader) -> Result<BTreeSet<NodeId>, DecodeError> {
    let count = r.u32()? as usize;
    if count > MAX_SNAPSHOT_NODES {
        return Err(DecodeError::Invalid("too many nodes"));
    }
    (0..count).map(|_| r.u64()).collect()
}

impl Outcome {
    fn put(&self, w: &mut Writer) {
        match self {
            Outcome::SpaceCreated(layout) => {
                w.u8(1);
                put_layout(w, layout);
            }
            Outcome::SpaceRejected(why) => {
                w.u8(2);
                put_reason(w, why);
            }
            Outcome::Leased {
                space,
                first_chunk,
                count,
            } => {
                w.u8(3);
                w.u32(*space);
                w.u64(*first_chunk);
                w.u32(*count);
            }
            Outcome::LeaseRejected(why) => {
                w.u8(4);
                put_reason(w, why);
            }
            Outcome::Detached { space, destroyed } => {
                w.u8(5);
                w.u32(*space);
                w.bool(*destroyed);
            }
            Outcome::Releasing {
                space,
                first_chunk,
                count,
            } => {
                w.u8(6);
                w.u32(*space);
                w.u64(*first_chunk);
                w.u32(*count);
            }
            Outcome::ReleaseRejected(why) => {
                w.u8(7);
                put_reason(w, why);
            }
            Outcome::ReleaseAcknowledged { freed } => {
                w.u8(8);
                w.bool(*freed);
            }
            Outcome::MarkedDown(node) => {
                w.u8(9);
                w.u64(*node);
            }
            Outcome::Unpersisted { space, destroyed } => {
                w.u8(10);
                w.opt_u64(space.map(u64::from));
                w.bool(*destroyed);
            }
            Outcome::Stale => w.u8(11),
            Outcome::Rejoined(node) => {
                w.u8(12);
                w.u64(*node);
            }
            Outcome::RejoinRejected(why) => {
                w.u8(13);
                put_reason(w, why);
            }
            Outcome::MembershipChanged { node, added } => {
                w.u8(14);
                w.u64(*node);
                w.bool(*added);
            }
            Outcome::MembershipRejected(why) => {
                w.u8(15);
                w.u8(*why as u8);
            }
        }
    }

    fn get(r: &mut Reader) -> Result<Outcome, DecodeError> {
        Ok(match r.u8()? {
            1 => Outcome::SpaceCreated(get_layout(r)?),
            2 => Outcome::SpaceRejected(get_reason(r)?),
            3 => Outcome::Leased {
                space: r.u32()?,
                first_chunk: r.u64()?,
                count: r.u32()?,
            },
            4 => Outcome::LeaseRejected(get_reason(r)?),
            5 => Outcome::Detached {
                space: r.u32()?,
                destroyed: r.bool()?,
            },
            6 => Outcome::Releasing {
                space: r.u32()?,
                first_chunk: r.u64()?,
                count: r.u32()?,
            },
            7 => Outcome::ReleaseRejected(get_reason(r)?),
            8 => Outcome::ReleaseAcknowledged { freed: r.bool()? },
            9 => Outcome::MarkedDown(r.u64()?),
            10 => Outcome::Unpersisted {
                space: match r.opt_u64()? {
                    None => None,
                    Some(id) => {
                        Some(SpaceId::try_from(id).map_err(|_| DecodeError::Invalid("space id"))?)
                    }
                },
                destroyed: r.bool()?,
            },
            11 => Outcome::Stale,
            12 => Outcome::Rejoined(r.u64()?),
            13 => Outcome::RejoinRejected(get_reason(r)?),
            14 => Outcome::MembershipChanged {
                node: r.u64()?,
                added: r.bool()?,
            },
            15 => Outcome::MembershipRejected(
                MembershipRejection::from_code(r.u8()? as u64)
                    .ok_or(DecodeError::Invalid("membership rejection"))?,
            ),
            _ => return Err(DecodeError::Invalid("outcome kind")),
        })
    }
}

impl MetaState {
    /// The whole state, for a Raft snapshot. Chunk records go as runs of consecutive
    /// chunks with the same lessee and home (leases are runs), so a snapshot stays
    /// small however many chunks are leased.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        debug_assert!(self.destroyed.is_empty(), "taken after every apply");
        let mut w = Writer::with_capacity(4096);
        w.u8(SNAPSHOT_VERSION);
        w.u32(self.nodes.len() as u32);
        for (&node, &status) in &self.nodes {
            w.u64(node);
            w.bool(status == NodeStatus::Up);
            w.u64(self.incarnation(node));
        }
        put_node_set(&mut w, &self.removed);
        w.u32(self.spaces.len() as u32);
        for layout in self.spaces.values() {
            put_layout(&mut w, layout);
            w.bool(self.persistent.contains(&layout.id));
            put_node_set(
                &mut w,
                self.attached.get(&layout.id).unwrap_or(&BTreeSet::new()),
            );
        }
        let mut runs: Vec<(SpaceId, u64, u64, ChunkRecord)> = Vec::new();
        for (&(space, chunk), &record) in &self.chunks {
            match runs.last_mut() {
                Some((s, first, count, r))
                    if *s == space && *first + *count == chunk && *r == record =>
                {
                    *count += 1
                }
                _ => runs.push((space, chunk, 1, record)),
            }
        }
        w.u32(runs.len() as u32);
        for (space, first, count, record) in runs {
            w.u32(space);
            w.u64(first);
            w.u64(count);
            w.u64(record.lessee);
            w.u64(record.home);
            w.u64(record.lessee_incarnation);
        }
        w.u32(self.releasing.len() as u32);
        for (&(space, first), release) in &self.releasing {
            w.u32(space);
            w.u64(first);
            w.u32(release.count);
            put_node_set(&mut w, &release.waiting);
        }
        w.u32(self.next_space_id);
        w.u64(self.applied_commands);
        self.outcomes.encode(&mut w, |w, outcome| outcome.put(w));
        w.bytes
    }

    /// Decodes `encode_snapshot`'s bytes; anything malformed or inconsistent is an
    /// error, never a panic.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<MetaState, DecodeError> {
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(DecodeError::Invalid("snapshot over size limit"));
        }
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != SNAPSHOT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let mut state = MetaState::default();
        let node_count = r.u32()? as usize;
        if node_count > MAX_SNAPSHOT_NODES {
            return Err(DecodeError::Invalid("too many nodes"));
        }
        for _ in 0..node_count {
            let node = r.u64()?;
            let status = if r.bool()? {
                NodeStatus::Up
            } else {
                NodeStatus::Down
            };
            let incarnation = r.u64()?;
            if incarnation == 0 {
                return Err(DecodeError::Invalid("incarnation 0"));
            }
            state.nodes.insert(node, status);
            state.incarnations.insert(node, incarnation);
        }
        state.removed = get_node_set(&mut r)?;
        if state
            .removed
            .iter()
            .any(|node| state.nodes.contains_key(node))
        {
            return Err(DecodeError::Invalid("a removed node is a member"));
        }
        let space_count = r.u32()? as usize;
        if space_count > MAX_SPACES {
            return Err(DecodeError::Invalid("too many spaces"));
        }
        for _ in 0..space_count {
            let layout = get_layout(&mut r)?;
            let id = layout.id;
            if r.bool()? {
                state.persistent.insert(id);
            }
            state.attached.insert(id, get_node_set(&mut r)?);
            if state
                .space_ids_by_name
                .insert(layout.name.clone(), id)
                .is_some()
                || state.spaces.insert(id, layout).is_some()
            {
                return Err(DecodeError::Invalid("space listed twice"));
            }
        }
        let run_count = r.u32()? as usize;
        if run_count > MAX_SNAPSHOT_RUNS {
            return Err(DecodeError::Invalid("too many chunk runs"));
        }
        for _ in 0..run_count {
            let space = r.u32()?;
            let first = r.u64()?;
            let count = r.u64()?;
            let record = ChunkRecord {
                lessee: r.u64()?,
                home: r.u64()?,
                lessee_incarnation: r.u64()?,
            };
            let Some(layout) = state.spaces.get(&space) else {
                return Err(DecodeError::Invalid("chunk of an unknown space"));
            };
            let in_space = count > 0
                && first
                    .checked_add(count)
                    .is_some_and(|end| end <= layout.chunk_count());
            if !in_space {
                return Err(DecodeError::Invalid("chunk run outside its space"));
            }
            // Records are kept one per chunk: bounded, or a forged run of 2^35 chunks
            // would take all memory.
            if state.chunks.len() as u64 + count > MAX_SNAPSHOT_CHUNKS {
                return Err(DecodeError::Invalid("too many chunks"));
            }
            for chunk in first..first + count {
                state.chunks.insert((space, chunk), record);
            }
        }
        let release_count = r.u32()? as usize;
        if release_count > MAX_SNAPSHOT_RUNS {
            return Err(DecodeError::Invalid("too many released runs"));
        }
        for _ in 0..release_count {
            let space = r.u32()?;
            let first = r.u64()?;
            let count = r.u32()?;
            let waiting = get_node_set(&mut r)?;
            if !state.spaces.contains_key(&space) || count == 0 || count > MAX_CHUNKS_PER_LEASE {
                return Err(DecodeError::Invalid("released run"));
            }
            state
                .releasing
                .insert((space, first), Release { count, waiting });
        }
        state.next_space_id = r.u32()?;
        state.applied_commands = r.u64()?;
        state.outcomes = Dedupe::decode(&mut r, Outcome::get)?;
        r.finish()?;
        Ok(state)
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    fn propose(state: &mut MetaState, origin: NodeId, id: u64, command: Command) -> Outcome {
        state.apply(&Proposal {
            origin,
            proposal_id: id,
            // Every proposal stays in flight: all outcomes are kept.
            oldest_in_flight: 1,
            command,
        })
    }

    #[test]
    fn a_snapshot_decodes_to_the_same_state_and_answers_retries_the_same() {
        let mut state = MetaState::new(&[1, 2, 3]);
        let created = propose(
            &mut state,
            1,
            1,
            Command::CreateSpace {
                name: "heap".into(),
                base_addr: 1 << 40,
                size_bytes: 64 << 20,
                chunk_size_bytes: 1 << 20,
                root_size_bytes: 4096,
                flexible_base: false,
                persistent: true,
                replicas: 2,
            },
        );
        let Outcome::SpaceCreated(layout) = created else {
            panic!("{created:?}");
        };
        propose(
            &mut state,
            2,
            1,
            Command::Attach {
                name: "heap".into(),
            },
        );
        let space = layout.id;
        let leased = propose(
            &mut state,
            2,
            2,
            Command::LeaseChunks {
                space,
                node: 2,
                count: 3,
            },
        );
        propose(
            &mut state,
            3,
            1,
            Command::LeaseChunks {
                space,
                node: 3,
                count: 2,
            },
        );
        propose(
            &mut state,
            2,
            3,
            Command::ReleaseChunks {
                space,
                first_chunk: 1,
                count: 3,
            },
        );
        let rejected = propose(
            &mut state,
            3,
            2,
            Command::Attach {
                name: "nope".into(),
            },
        );
        propose(
            &mut state,
            1,
            2,
            Command::MarkDown {
                node: 3,
                incarnation: 1,
            },
        );
        let bytes = state.encode_snapshot();
        let mut copy = MetaState::decode_snapshot(&bytes).expect("decodes");
        assert_eq!(copy.encode_snapshot(), bytes);
        assert_eq!(copy.nodes, state.nodes);
        assert_eq!(copy.spaces, state.spaces);
        assert_eq!(copy.chunks, state.chunks);
        assert_eq!(copy.releasing, state.releasing);
        assert_eq!(copy.attached, state.attached);
        assert_eq!(copy.space_by_name("heap").map(|l| l.id), Some(space));
        // A retried proposal gets its first outcome from the copy too.
        let retried = Proposal {
            origin: 2,
            proposal_id: 2,
            oldest_in_flight: 1,
            command: Command::LeaseChunks {
                space,
                node: 2,
                count: 3,
            },
        };
        assert_eq!(copy.apply(&retried), leased);
        assert_eq!(copy.outcome_of(3, 2), Some(&rejected));
        for cut in 0..bytes.len() {
            assert!(
                MetaState::decode_snapshot(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
