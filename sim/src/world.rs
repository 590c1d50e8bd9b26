//! The simulated world: N gallocy-core nodes, the memory each node's applications see,
//! simulated applications running random workloads, and the checkers.
//!
//! turmoil carries the frames between nodes (see `run.rs`); everything here is plain
//! deterministic state, driven one turmoil step (2 ms of node time) at a time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use gallocy_core::node::Mutant;
use gallocy_core::{
    Access, Action, AppError, AppReply, AppRequest, AppToken, Config, Node, NodeId, PageBytes,
    PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::trace::TraceHash;

pub const SPACE_NAME: &str = "sim";
pub const SPACE_BASE_ADDR: u64 = 0x1000_0000_0000;
pub const SPACE_SIZE_BYTES: u64 = 64 << 20;
pub const CHUNK_SIZE_BYTES: u64 = 64 << 10;
const WORD_BYTES: u64 = 8;
/// Bound on reply/request cascades inside one input.
const MAX_SETTLE_STEPS: usize = 1 << 20;

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
    pub ops_issued: u64,
    pub ops_completed: u64,
    pub reads: u64,
    pub writes: u64,
    pub allocations: u64,
    pub frees: u64,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Allocate { size_bytes: u64 },
    Free { addr: u64, expect_valid: bool },
    Read { addr: u64 },
    Write { addr: u64, value: u64 },
    JoinSpace,
}

#[derive(Clone, Copy, Debug)]
struct PendingOp {
    kind: OpKind,
    token: AppToken,
    issued_tick: u64,
}

#[derive(Clone, Debug, Default)]
struct App {
    pending: Option<PendingOp>,
    /// Simulated think time: next tick this app may issue an operation.
    next_op_tick: u64,
}

struct NodeSlot {
    node: Option<Node>,
    /// What the node's applications see: page bytes and access.
    memory: BTreeMap<PageId, (Box<PageBytes>, Access)>,
    apps: Vec<App>,
    space: Option<SpaceLayout>,
}

#[derive(Clone, Copy, Debug)]
struct ScheduledRevoke {
    node_index: usize,
    page: PageId,
    access: Access,
    token: u64,
    want_bytes: bool,
}

#[derive(Clone, Debug)]
pub struct WorldParams {
    pub seed: u64,
    pub nodes: usize,
    pub ops: u64,
    pub apps_per_node: usize,
    pub max_revoke_delay_ticks: u64,
    pub mutant: Option<Mutant>,
}

pub struct World {
    pub params: WorldParams,
    pub now_ticks: u64,
    pub step: u64,
    slots: Vec<NodeSlot>,
    /// Frames each node has to send: (destination node id, bytes).
    pub outbox: Vec<Vec<(NodeId, Vec<u8>)>>,
    /// Wakes node i's host loop when its outbox gets frames (it sleeps otherwise).
    pub outbox_ready: Vec<std::rc::Rc<tokio::sync::Notify>>,
    revokes: BTreeMap<(u64, u64), ScheduledRevoke>,
    revoke_seq: u64,
    /// The latest value of every page, as the applications wrote it (the ghost).
    truth: BTreeMap<PageId, Box<PageBytes>>,
    /// Live allocations by start: (length, allocating node).
    live: BTreeMap<u64, (u64, NodeId)>,
    /// Starts of live allocations, for picking at random (published pointers).
    published: Vec<u64>,
    /// Blocks whose free is in flight: the application gave them up when it asked.
    freeing: BTreeMap<AppToken, (u64, u64, NodeId)>,
    /// Blocks whose free had an unknown outcome (the node was evicted, the owner went
    /// down): neither live nor safe to free twice.
    limbo: BTreeSet<u64>,
    /// Recently freed starts, for double frees (bounded).
    recently_freed: VecDeque<u64>,
    tokens: BTreeMap<AppToken, (usize, usize)>,
    next_token: AppToken,
    replies: VecDeque<(usize, AppToken, AppReply)>,
    dirty_pages: BTreeSet<PageId>,
    pub rng: ChaCha8Rng,
    pub trace: TraceHash,
    pub counters: Counters,
    pub violation: Option<Violation>,
    pub issuing: bool,
    /// Print every reply (GALLOCY_SIM_DEBUG=1), for debugging a failing seed.
    pub debug: bool,
    /// Print every message and access change of one page (GALLOCY_SIM_DEBUG_PAGE=N).
    pub debug_page: Option<u64>,
    actions_buffer: Vec<Action>,
}

impl World {
    pub fn new(params: WorldParams, node_config: impl Fn(NodeId, Vec<NodeId>) -> Config) -> World {
        let members: Vec<NodeId> = (1..=params.nodes as NodeId).collect();
        let mut slots = Vec::new();
        for &id in &members {
            let mut config = node_config(id, members.clone());
            config.mutant = params.mutant;
            let node = Node::new(config).expect("valid simulator configuration");
            slots.push(NodeSlot {
                node: Some(node),
                memory: BTreeMap::new(),
                apps: vec![App::default(); params.apps_per_node],
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
            revokes: BTreeMap::new(),
            revoke_seq: 0,
            truth: BTreeMap::new(),
            live: BTreeMap::new(),
            published: Vec::new(),
            recently_freed: VecDeque::new(),
            freeing: BTreeMap::new(),
            limbo: BTreeSet::new(),
            tokens: BTreeMap::new(),
            next_token: 1,
            replies: VecDeque::new(),
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
        }
    }

    pub fn node(&self, index: usize) -> Option<&Node> {
        self.slots[index].node.as_ref()
    }

    pub fn is_alive(&self, index: usize) -> bool {
        self.slots[index].node.is_some()
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

    // -----------------------------------------------------------------------------
    // Driving nodes.

    pub fn crash(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.node = None;
        slot.memory.clear();
        for app in &mut slot.apps {
            app.pending = None;
        }
        self.outbox[index].clear();
        self.revokes.retain(|_, r| r.node_index != index);
        self.trace.event(1, &[index as u64, self.now_ticks]);
    }

    /// A frame arrived at node `index` from the network.
    pub fn deliver(&mut self, index: usize, bytes: &[u8]) {
        let now = self.now_ticks;
        let Some(node) = self.slots[index].node.as_mut() else {
            return;
        };
        self.counters.frames_delivered += 1;
        self.trace.event(2, &[index as u64, now]);
        self.trace.bytes(bytes);
        if let Some(watch) = self.debug_page {
            if let Ok(envelope) = gallocy_core::Envelope::decode(bytes) {
                if debug_page_of(&envelope.message) == Some(watch) {
                    eprintln!(
                        "[t={now}] {} -> {}: {:?}",
                        envelope.from,
                        envelope.to,
                        Brief(&envelope.message)
                    );
                }
            }
        }
        // Malformed frames are counted inside the node; the run goes on.
        let _ = node.handle_frame(now, bytes);
        self.pump(index);
        self.settle();
    }

    /// Whether any node has frames waiting to be sent.
    pub fn has_outbox(&self) -> bool {
        self.outbox.iter().any(|frames| !frames.is_empty())
    }

    pub fn take_outbox(&mut self, index: usize) -> Vec<(NodeId, Vec<u8>)> {
        std::mem::take(&mut self.outbox[index])
    }

    /// Everything that happens at the start of a tick: node timers, due revocations,
    /// applications issuing operations.
    pub fn tick(&mut self, now_ticks: u64) {
        self.now_ticks = now_ticks;
        for index in 0..self.slots.len() {
            if let Some(node) = self.slots[index].node.as_mut() {
                node.tick(now_ticks);
                self.pump(index);
            }
        }
        self.settle();
        self.run_due_revokes();
        if self.issuing {
            self.issue_operations();
        }
        self.settle();
    }

    fn pump(&mut self, index: usize) {
        let mut actions = std::mem::take(&mut self.actions_buffer);
        if let Some(node) = self.slots[index].node.as_mut() {
            node.drain_actions(&mut actions);
        }
        for action in actions.drain(..) {
            self.apply_action(index, action);
        }
        self.actions_buffer = actions;
    }

    fn apply_action(&mut self, index: usize, action: Action) {
        if let Some(watch) = self.debug_page {
            match &action {
                Action::Install {
                    page,
                    access,
                    version,
                    bytes,
                } if page.index == watch => eprintln!(
                    "[t={}] node {} install {access:?} v{version} bytes={}",
                    self.now_ticks,
                    index + 1,
                    bytes.is_some()
                ),
                Action::SetAccess { page, access } if page.index == watch => {
                    eprintln!(
                        "[t={}] node {} set-access {access:?}",
                        self.now_ticks,
                        index + 1
                    )
                }
                Action::Revoke { page, access, .. } if page.index == watch => {
                    eprintln!(
                        "[t={}] node {} revoke to {access:?}",
                        self.now_ticks,
                        index + 1
                    )
                }
                _ => {}
            }
        }
        match action {
            Action::Send(envelope) => {
                self.counters.frames_sent += 1;
                if self.outbox[index].is_empty() {
                    self.outbox_ready[index].notify_one();
                }
                self.outbox[index].push((envelope.to, envelope.encode()));
            }
            Action::Reply { token, reply } => self.replies.push_back((index, token, reply)),
            Action::Install {
                page,
                access,
                version,
                bytes,
            } => {
                self.trace
                    .event(3, &[index as u64, page.index, access as u64, version]);
                let entry = self.slots[index]
                    .memory
                    .entry(page)
                    .or_insert_with(|| (Box::new([0u8; PAGE_SIZE_BYTES]), Access::None));
                if let Some(bytes) = bytes {
                    entry.0 = bytes;
                }
                entry.1 = access;
                self.dirty_pages.insert(page);
            }
            Action::SetAccess { page, access } => {
                let entry = self.slots[index]
                    .memory
                    .entry(page)
                    .or_insert_with(|| (Box::new([0u8; PAGE_SIZE_BYTES]), Access::None));
                entry.1 = access;
                self.dirty_pages.insert(page);
            }
            Action::Revoke {
                page,
                access,
                token,
                want_bytes,
            } => {
                // The applications keep their access until the revocation lands: they
                // may be busy, blocked, or faulting themselves.
                let delay = if self.params.max_revoke_delay_ticks == 0 {
                    0
                } else {
                    self.rng.gen_range(0..=self.params.max_revoke_delay_ticks)
                };
                self.revoke_seq += 1;
                self.counters.revokes += 1;
                self.revokes.insert(
                    (self.now_ticks + delay, self.revoke_seq),
                    ScheduledRevoke {
                        node_index: index,
                        page,
                        access,
                        token,
                        want_bytes,
                    },
                );
                if delay == 0 {
                    self.run_due_revokes();
                }
            }
        }
    }

    fn run_due_revokes(&mut self) {
        loop {
            let Some((&key, _)) = self.revokes.iter().next() else {
                return;
            };
            if key.0 > self.now_ticks {
                return;
            }
            let revoke = self.revokes.remove(&key).expect("present");
            let index = revoke.node_index;
            let entry = self.slots[index]
                .memory
                .entry(revoke.page)
                .or_insert_with(|| (Box::new([0u8; PAGE_SIZE_BYTES]), Access::None));
            entry.1 = entry.1.min(revoke.access);
            let bytes = revoke.want_bytes.then(|| entry.0.clone());
            self.dirty_pages.insert(revoke.page);
            self.trace
                .event(4, &[index as u64, revoke.page.index, revoke.access as u64]);
            if let Some(node) = self.slots[index].node.as_mut() {
                node.handle_revoke_done(self.now_ticks, revoke.token, bytes);
                self.pump(index);
            }
            self.settle();
        }
    }

    // -----------------------------------------------------------------------------
    // Applications.

    fn request(&mut self, index: usize, app: usize, kind: OpKind, request: AppRequest) {
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, (index, app));
        self.slots[index].apps[app].pending = Some(PendingOp {
            kind,
            token,
            issued_tick: self.now_ticks,
        });
        let now = self.now_ticks;
        if let Some(node) = self.slots[index].node.as_mut() {
            node.handle_request(now, token, request);
            self.pump(index);
        }
    }

    fn issue_operations(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].node.is_none() {
                continue;
            }
            for app in 0..self.slots[index].apps.len() {
                if self.counters.ops_issued >= self.params.ops {
                    return;
                }
                let state = &self.slots[index].apps[app];
                if state.pending.is_some() || state.next_op_tick > self.now_ticks {
                    continue;
                }
                self.issue_one(index, app);
                self.settle();
            }
        }
    }

    fn issue_one(&mut self, index: usize, app: usize) {
        let Some(layout) = self.slots[index].space.clone() else {
            // Node 1's first application creates the space; the others join it.
            if index == 0 && app == 0 {
                self.request(
                    index,
                    app,
                    OpKind::JoinSpace,
                    AppRequest::CreateSpace {
                        name: SPACE_NAME.into(),
                        base_addr: SPACE_BASE_ADDR,
                        size_bytes: SPACE_SIZE_BYTES,
                        chunk_size_bytes: CHUNK_SIZE_BYTES,
                        flexible_base: false,
                    },
                );
            } else if app == 0 {
                self.request(
                    index,
                    app,
                    OpKind::JoinSpace,
                    AppRequest::LookupSpace {
                        name: SPACE_NAME.into(),
                    },
                );
            }
            return;
        };
        self.counters.ops_issued += 1;
        let space = layout.id;
        let roll: u32 = self.rng.gen_range(0..100);
        let have_blocks = !self.published.is_empty();
        if roll < 14 || !have_blocks {
            let size_bytes = match self.rng.gen_range(0..100) {
                0..=1 => self.rng.gen_range(CHUNK_SIZE_BYTES..3 * CHUNK_SIZE_BYTES),
                2..=9 => self.rng.gen_range(512..8192),
                _ => self.rng.gen_range(8..512),
            };
            self.request(
                index,
                app,
                OpKind::Allocate { size_bytes },
                AppRequest::Allocate {
                    space,
                    size_bytes,
                    align_bytes: 16,
                },
            );
        } else if roll < 22 {
            // Free a published block from any node: often another node's.
            let pick = self.rng.gen_range(0..self.published.len());
            let addr = self.published.swap_remove(pick);
            let block = self.live.remove(&addr);
            self.request(
                index,
                app,
                OpKind::Free {
                    addr,
                    expect_valid: true,
                },
                AppRequest::Free { space, addr },
            );
            if let Some((len, owner)) = block {
                self.freeing.insert(self.next_token - 1, (addr, len, owner));
            }
        } else if roll < 25 {
            // A double free or a wild free (inside a live block). Only of blocks this
            // node carved: a remote one could be reallocated while the bad free is in
            // flight, which is a bug of the application, not of gallocy.
            let node_id = index as NodeId + 1;
            let double = self.recently_freed.iter().rev().copied().find(|a| {
                !self.live.contains_key(a)
                    && !self.limbo.contains(a)
                    && !self.freeing.values().any(|f| f.0 == *a)
                    && self.owner_of(*a) == Some(node_id)
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
            self.request(
                index,
                app,
                OpKind::Free {
                    addr,
                    expect_valid: false,
                },
                AppRequest::Free { space, addr },
            );
        } else {
            let addr = self.pick_word();
            let write = self.rng.gen_bool(0.5);
            let kind = if write {
                let value = (self.counters.ops_issued << 8) | (index as u64 + 1);
                OpKind::Write { addr, value }
            } else {
                OpKind::Read { addr }
            };
            self.access(index, app, kind, None);
        }
    }

    /// The node whose chunk holds `addr`, per node 1's view of the lease table.
    fn owner_of(&self, addr: u64) -> Option<NodeId> {
        let slot = self
            .slots
            .iter()
            .find(|s| s.node.is_some() && s.space.is_some())?;
        let layout = slot.space.as_ref()?;
        let chunk = layout.chunk_of_addr(addr)?;
        slot.node
            .as_ref()?
            .meta()
            .chunk(layout.id, chunk)
            .map(|r| r.lessee)
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

    /// Performs a read or write if the node's applications have access; otherwise
    /// faults to the node and retries on the grant.
    fn access(&mut self, index: usize, app: usize, kind: OpKind, token: Option<AppToken>) {
        let layout = self.slots[index].space.clone().expect("joined");
        let (addr, need) = match kind {
            OpKind::Read { addr } => (addr, Access::Read),
            OpKind::Write { addr, .. } => (addr, Access::Write),
            _ => unreachable!("not an access"),
        };
        let page = layout.page_of(addr).expect("address in space");
        let offset = ((addr - layout.base_addr) % PAGE_SIZE_BYTES as u64) as usize;
        let have = self.slots[index]
            .memory
            .get(&page)
            .map_or(Access::None, |e| e.1);
        if have < need {
            if let Some(token) = token {
                self.tokens.remove(&token);
            }
            self.counters.faults_requested += 1;
            self.request(
                index,
                app,
                kind,
                AppRequest::Fault {
                    space: layout.id,
                    addr,
                    access: need,
                },
            );
            return;
        }
        if let Some(token) = token {
            self.tokens.remove(&token);
        }
        let memory = &mut self.slots[index].memory.get_mut(&page).expect("present").0;
        let truth = self
            .truth
            .entry(page)
            .or_insert_with(|| Box::new([0u8; PAGE_SIZE_BYTES]));
        match kind {
            OpKind::Read { .. } => {
                let mut word = [0u8; 8];
                word.copy_from_slice(&memory[offset..offset + 8]);
                let value = u64::from_le_bytes(word);
                let mut expected = [0u8; 8];
                expected.copy_from_slice(&truth[offset..offset + 8]);
                let expected = u64::from_le_bytes(expected);
                self.counters.reads += 1;
                self.trace.event(5, &[index as u64, addr, value]);
                if value != expected {
                    self.violate(
                        "memory consistency",
                        format!(
                            "node {} read {value:#x} at {addr:#x} but the latest write was {expected:#x}",
                            index + 1
                        ),
                    );
                }
            }
            OpKind::Write { value, .. } => {
                memory[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
                truth[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
                self.counters.writes += 1;
                self.trace.event(6, &[index as u64, addr, value]);
                self.dirty_pages.insert(page);
            }
            _ => unreachable!(),
        }
        self.finish_op(index, app);
    }

    fn finish_op(&mut self, index: usize, app: usize) {
        self.counters.ops_completed += 1;
        let think = self.rng.gen_range(0..10);
        let state = &mut self.slots[index].apps[app];
        state.pending = None;
        state.next_op_tick = self.now_ticks + think;
    }

    fn settle(&mut self) {
        let mut steps = 0;
        while let Some((index, token, reply)) = self.replies.pop_front() {
            steps += 1;
            if steps > MAX_SETTLE_STEPS {
                self.replies.clear();
                self.violate(
                    "liveness",
                    "replies and faults cycle without progress (a grant the memory does not show)"
                        .into(),
                );
                return;
            }
            self.on_reply(index, token, reply);
        }
    }

    fn on_reply(&mut self, index: usize, token: AppToken, reply: AppReply) {
        let Some(&(owner, app)) = self.tokens.get(&token) else {
            self.violate("protocol", format!("reply to unknown token {token}"));
            return;
        };
        if owner != index {
            self.violate(
                "protocol",
                format!("node {} answered node {}'s request", index + 1, owner + 1),
            );
            return;
        }
        let Some(pending) = self.slots[index].apps[app].pending else {
            return;
        };
        if pending.token != token {
            self.violate("protocol", format!("reply to a stale token {token}"));
            return;
        }
        self.trace.event(7, &[index as u64, token]);
        if self.debug {
            eprintln!(
                "[t={} node {}] {:?} -> {:?}",
                self.now_ticks,
                index + 1,
                pending.kind,
                reply
            );
        }
        if let AppReply::Error(error) = reply {
            self.tokens.remove(&token);
            self.on_error(index, token, pending.kind, error);
            if self.slots[index].space.is_none() {
                // Joining failed (not created yet): try again later.
                let state = &mut self.slots[index].apps[app];
                state.pending = None;
                state.next_op_tick = self.now_ticks + 20;
                return;
            }
            self.finish_op(index, app);
            return;
        }
        match (pending.kind, reply) {
            (OpKind::JoinSpace, AppReply::Space(layout)) => {
                self.tokens.remove(&token);
                self.slots[index].space = Some(layout);
                let state = &mut self.slots[index].apps[app];
                state.pending = None;
            }
            (
                OpKind::Allocate { size_bytes },
                AppReply::Allocated {
                    addr,
                    size_bytes: got,
                },
            ) => {
                self.tokens.remove(&token);
                self.check_allocation(index, addr, size_bytes, got);
                self.counters.allocations += 1;
                self.finish_op(index, app);
            }
            (OpKind::Free { addr, expect_valid }, AppReply::Freed) => {
                self.tokens.remove(&token);
                match self.freeing.remove(&token) {
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
                self.finish_op(index, app);
            }
            (kind @ (OpKind::Read { .. } | OpKind::Write { .. }), AppReply::Granted { .. }) => {
                self.access(index, app, kind, Some(token));
            }
            (kind, reply) => {
                self.violate(
                    "protocol",
                    format!("unexpected reply {reply:?} to {kind:?}"),
                );
            }
        }
    }

    fn on_error(&mut self, index: usize, token: AppToken, kind: OpKind, error: AppError) {
        match (kind, error) {
            (_, AppError::PageLost) => self.counters.page_lost += 1,
            (_, AppError::NodeDown(_)) => self.counters.node_down_errors += 1,
            (_, AppError::Evicted) => self.counters.evicted_errors += 1,
            (_, AppError::NotMapped) => self.counters.not_mapped += 1,
            (_, AppError::OutOfMemory) => self.counters.out_of_memory += 1,
            (_, AppError::Busy) => self.counters.busy += 1,
            (OpKind::JoinSpace, AppError::UnknownSpace) => {}
            (OpKind::Free { addr, expect_valid }, AppError::InvalidFree) => {
                if expect_valid {
                    self.violate(
                        "allocation safety",
                        format!("valid free of live block {addr:#x} refused"),
                    );
                }
                self.counters.invalid_frees_rejected += 1;
            }
            (kind, error) => self.violate(
                "protocol",
                format!("node {} failed {kind:?} with {error:?}", index + 1),
            ),
        }
        // A free refused as Busy was never sent: the block is still live. After Evicted
        // or NodeDown the outcome is unknown (the owner may have freed it), so the block
        // is forgotten: never reused by the workload, never counted as live.
        if let OpKind::Free {
            addr,
            expect_valid: true,
        } = kind
        {
            if let Some((_, len, owner)) = self.freeing.remove(&token) {
                if error == AppError::Busy {
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
            if let Some(node) = slot.node.as_ref() {
                if node.allocator(space).is_some_and(|a| a.owns(addr)) {
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

    /// Coherence safety over the pages touched since the last check.
    pub fn check_coherence(&mut self) {
        let dirty = std::mem::take(&mut self.dirty_pages);
        for page in dirty {
            let mut writers = Vec::new();
            let mut readers = Vec::new();
            for (index, slot) in self.slots.iter().enumerate() {
                if slot.node.is_none() {
                    continue;
                }
                let Some((bytes, access)) = slot.memory.get(&page) else {
                    continue;
                };
                match access {
                    Access::Write => writers.push(index + 1),
                    Access::Read => readers.push(index + 1),
                    Access::None => continue,
                }
                let truth = self.truth.get(&page);
                let current = match truth {
                    Some(truth) => bytes[..] == truth[..],
                    None => bytes.iter().all(|&b| b == 0),
                };
                if !current {
                    let detail = format!(
                        "node {} can access page {} of space {} ({access:?}) holding stale bytes",
                        index + 1,
                        page.index,
                        page.space
                    );
                    self.violate("coherence", detail);
                    return;
                }
            }
            if writers.len() > 1 {
                self.violate(
                    "coherence",
                    format!("page {} writable on nodes {writers:?}", page.index),
                );
                return;
            }
            if !writers.is_empty() && !readers.is_empty() {
                self.violate(
                    "coherence",
                    format!(
                        "page {} writable on node {} and readable on {readers:?}",
                        page.index, writers[0]
                    ),
                );
                return;
            }
        }
    }

    /// Allocator and lease invariants, checked now and then (they are wider scans).
    pub fn check_allocators(&mut self) {
        let mut owners: BTreeMap<(SpaceId, u64), usize> = BTreeMap::new();
        let mut problem: Option<String> = None;
        'scan: for (index, slot) in self.slots.iter().enumerate() {
            let Some(node) = slot.node.as_ref() else {
                continue;
            };
            let Some(layout) = slot.space.as_ref() else {
                continue;
            };
            let Some(allocator) = node.allocator(layout.id) else {
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
        // Every node's replicated chunk table agrees with the carving nodes.
        for slot in &self.slots {
            let Some(node) = slot.node.as_ref() else {
                continue;
            };
            for (&(space, chunk), &owner) in &owners {
                if problem.is_some() {
                    break;
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

    /// Operations still waiting, on nodes that are alive: (node, issued tick).
    pub fn pending_ops(&self) -> Vec<(usize, u64)> {
        if self.debug {
            for (index, slot) in self.slots.iter().enumerate() {
                for app in &slot.apps {
                    if let (Some(op), Some(node)) = (app.pending, slot.node.as_ref()) {
                        eprintln!(
                            "pending on node {}: {:?} since {} (fenced {}, leader {:?}, term {})",
                            index + 1,
                            op.kind,
                            op.issued_tick,
                            node.is_fenced(),
                            node.leader_id(),
                            node.term()
                        );
                    }
                }
            }
        }
        let mut pending = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.node.is_none() {
                continue;
            }
            for app in &slot.apps {
                if let Some(op) = app.pending {
                    pending.push((index + 1, op.issued_tick));
                }
            }
        }
        pending
    }

    pub fn all_joined(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.node.is_none() || s.space.is_some())
    }

    pub fn node_count(&self) -> usize {
        self.slots.len()
    }
}

fn debug_page_of(message: &gallocy_core::PeerMessage) -> Option<u64> {
    use gallocy_core::PeerMessage as M;
    match message {
        M::PageRequest { page, .. }
        | M::PageGrant { page, .. }
        | M::PageDenied { page, .. }
        | M::Invalidate { page, .. }
        | M::InvalidateAck { page, .. }
        | M::Recall { page, .. }
        | M::RecallAck { page, .. } => Some(page.index),
        _ => None,
    }
}

/// A message without its page bytes, for debug output.
struct Brief<'a>(&'a gallocy_core::PeerMessage);

impl std::fmt::Debug for Brief<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use gallocy_core::PeerMessage as M;
        match self.0 {
            M::PageGrant {
                request_id,
                seq,
                mode,
                version,
                base_version,
                bytes,
                ..
            } => write!(
                f,
                "Grant req={request_id} seq={seq} {mode:?} v{version} base={base_version} bytes={}",
                bytes.is_some()
            ),
            M::RecallAck {
                seq,
                version,
                bytes,
                ..
            } => {
                write!(
                    f,
                    "RecallAck seq={seq} v{version} bytes={}",
                    bytes.is_some()
                )
            }
            other => write!(f, "{other:?}"),
        }
    }
}
