//! The ghost copy (used by the simulator's world and by the coherence property
//! tests): what every page may hold, as the simulated processes wrote and saw
//! it, and the promise the checkers hold the cluster to after crashes (docs/protocol.md
//! "Recovery"): a page holds the newest state some surviving node's process saw, or a
//! later one. Writes only processes of dead nodes saw may be lost.
//!
//! Per page the ghost keeps the page's history as generations: each the states the
//! page may have been in after one access (one state while every node lives), with the
//! nodes whose processes made or saw it. The allowed states now run from the newest
//! generation a live node saw to the newest. A read keeps, as a new generation, the
//! allowed states that agree with what it read (none: a violation); a write applies to
//! every allowed state. So with every node alive the check is exact, and after a crash
//! the page is any state from the last one a survivor saw on, until reads narrow it.
//!
//! Replication (docs/protocol.md "Replication") adds a second reason to keep a
//! generation: once its contents reached a node other than their writer's (another
//! node's process could have observed them), or a sync of a node that saw them
//! completed, they are on k nodes, and so survive any k - 1 *losses* after that (a node
//! crashing, or marked down: either way its copies are gone). A generation is kept
//! while a live node saw it, or while fewer than k losses came after it was so
//! protected.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use gallocy_core::{PageBytes, PageId, PAGE_SIZE_BYTES};

/// Generations kept per page: more than any run accesses one page (runs are 2000
/// operations); beyond it the oldest go, which could only make the checker stricter
/// than the promise, and is counted.
const MAX_GENERATIONS_PER_PAGE: usize = 4096;
/// States one generation may hold (they differ only after crashes).
const MAX_STATES_PER_GENERATION: usize = 256;

struct Generation {
    states: Vec<Box<PageBytes>>,
    /// Nodes (indexes) whose processes made or saw this generation.
    observers: BTreeSet<usize>,
    /// The node, and its life, whose process wrote these contents (None: the zero
    /// page).
    origin: Option<(usize, u64)>,
    /// The loss count when these contents were put on k nodes (reached another node,
    /// or a sync covered them); the latest such moment.
    protected_at: Option<u64>,
    /// Names the generation for a sync that covers it (stable as old ones go).
    serial: u64,
    /// The loss count when its contents were written: their copies were all made
    /// after, so protection counts losses from here (a home may count a copy on a node
    /// that crashed unnoticed since).
    made_at: u64,
}

#[derive(Default)]
struct GhostPage {
    /// Oldest first. Starts with the zero page, which nobody has seen (a node may
    /// still hold it, from a grant its process never used).
    history: VecDeque<Generation>,
    next_serial: u64,
}

/// What keeps a generation: live observers, or protection that fewer than k losses
/// have come after.
#[derive(Clone, Copy)]
struct Keep<'a> {
    live: &'a [bool],
    losses: u64,
    replicas: u64,
}

impl Keep<'_> {
    fn keeps(&self, generation: &Generation) -> bool {
        generation.observers.iter().any(|&n| self.live[n])
            || generation
                .protected_at
                .is_some_and(|at| self.losses - at < self.replicas)
    }
}

#[derive(Default)]
pub struct Ghost {
    pages: BTreeMap<PageId, GhostPage>,
    /// Generations or states dropped past the bounds.
    pub states_dropped: u64,
    /// Accesses that found a page in more than one state after a crash.
    pub uncertain_accesses: u64,
    /// Nodes lost so far (crashed, or marked down while running).
    pub losses: u64,
    /// k of the pages' space: protected contents survive k - 1 losses.
    pub replicas: u64,
    /// Per node, crashes so far: its life (a restarted node's writes are not its
    /// earlier life's).
    lives: BTreeMap<usize, u64>,
}

fn zero_page() -> Box<PageBytes> {
    Box::new([0u8; PAGE_SIZE_BYTES])
}

impl GhostPage {
    fn start_zeroed(&mut self) {
        if self.history.is_empty() {
            self.history.push_back(Generation {
                states: vec![zero_page()],
                observers: BTreeSet::new(),
                origin: None,
                protected_at: None,
                serial: 0,
                made_at: 0,
            });
            self.next_serial = 1;
        }
    }

    /// Index of the first generation whose states are allowed now.
    fn anchor(&self, keep: Keep) -> usize {
        self.history
            .iter()
            .rposition(|g| keep.keeps(g))
            .unwrap_or(0)
    }

    /// The states the page may hold now, each once.
    fn allowed(&self, keep: Keep) -> Vec<&PageBytes> {
        let mut allowed: Vec<&PageBytes> = Vec::new();
        for generation in self.history.iter().skip(self.anchor(keep)) {
            for state in &generation.states {
                if !allowed.iter().any(|a| a[..] == state[..]) {
                    allowed.push(state);
                }
            }
        }
        allowed
    }

    fn push(
        &mut self,
        mut states: Vec<Box<PageBytes>>,
        node: usize,
        origin: Option<(usize, u64)>,
        made_at: u64,
        dropped: &mut u64,
    ) {
        if states.len() > MAX_STATES_PER_GENERATION {
            *dropped += (states.len() - MAX_STATES_PER_GENERATION) as u64;
            states.drain(..states.len() - MAX_STATES_PER_GENERATION);
        }
        if self.history.len() >= MAX_GENERATIONS_PER_PAGE {
            self.history.pop_front();
            *dropped += 1;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        self.history.push_back(Generation {
            states,
            observers: BTreeSet::from([node]),
            origin,
            protected_at: None,
            serial,
            made_at,
        });
    }
}

fn allowed_words(ghost: &GhostPage, keep: Keep, at: usize) -> Vec<u64> {
    ghost
        .allowed(keep)
        .into_iter()
        .map(|b| u64::from_le_bytes(b[at..at + 8].try_into().expect("8")))
        .collect()
}

impl Ghost {
    /// A ghost for a space with k = `replicas`.
    pub fn with_replicas(replicas: u64) -> Ghost {
        Ghost {
            replicas,
            ..Ghost::default()
        }
    }

    fn life(&self, node: usize) -> u64 {
        self.lives.get(&node).copied().unwrap_or(0)
    }

    fn keep<'a>(&self, live: &'a [bool]) -> Keep<'a> {
        Keep {
            live,
            losses: self.losses,
            replicas: self.replicas.max(1),
        }
    }

    /// A process of node `node` read `read` at `offset` of `page`: Err(what the page
    /// may hold there) if no allowed state has those bytes.
    pub fn read(
        &mut self,
        page: PageId,
        offset: usize,
        read: &[u8],
        node: usize,
        live: &[bool],
    ) -> Result<(), Vec<Vec<u8>>> {
        let end = offset + read.len();
        let keep = Keep {
            live,
            losses: self.losses,
            replicas: self.replicas.max(1),
        };
        let ghost = self.pages.entry(page).or_default();
        ghost.start_zeroed();
        let anchor = ghost.anchor(keep);
        let newest = ghost.history.len() - 1;
        if anchor == newest && ghost.history[newest].states.len() == 1 {
            // Certain: the common case, checked without copying the page.
            let generation = &mut ghost.history[newest];
            if generation.states[0][offset..end] != *read {
                return Err(vec![generation.states[0][offset..end].to_vec()]);
            }
            generation.observers.insert(node);
            return Ok(());
        }
        self.uncertain_accesses += 1;
        let allowed = ghost.allowed(keep);
        let matching: Vec<Box<PageBytes>> = allowed
            .iter()
            .filter(|s| s[offset..end] == *read)
            .map(|s| Box::new(**s))
            .collect();
        if matching.is_empty() {
            return Err(allowed.iter().map(|s| s[offset..end].to_vec()).collect());
        }
        let (origin, made_at) = ghost
            .history
            .back()
            .map_or((None, 0), |g| (g.origin, g.made_at));
        ghost.push(matching, node, origin, made_at, &mut self.states_dropped);
        Ok(())
    }

    /// A process of node `node` wrote `bytes` at `offset` of `page`.
    pub fn write(&mut self, page: PageId, offset: usize, bytes: &[u8], node: usize, live: &[bool]) {
        let end = offset + bytes.len();
        let keep = Keep {
            live,
            losses: self.losses,
            replicas: self.replicas.max(1),
        };
        let ghost = self.pages.entry(page).or_default();
        ghost.start_zeroed();
        let mut next: Vec<Box<PageBytes>> = Vec::new();
        for state in ghost.allowed(keep) {
            let mut state = Box::new(*state);
            state[offset..end].copy_from_slice(bytes);
            if !next.iter().any(|n| n[..] == state[..]) {
                next.push(state);
            }
        }
        if next.len() > 1 {
            self.uncertain_accesses += 1;
        }
        let life = self.life(node);
        let losses = self.losses;
        let ghost = self.pages.get_mut(&page).expect("started");
        ghost.push(
            next,
            node,
            Some((node, life)),
            losses,
            &mut self.states_dropped,
        );
    }

    /// The bytes at `offset`, if the page may hold only one value there.
    pub fn certain_u32(&self, page: PageId, offset: usize, live: &[bool]) -> Option<u32> {
        let Some(ghost) = self.pages.get(&page) else {
            return Some(0);
        };
        let mut values = ghost
            .allowed(self.keep(live))
            .into_iter()
            .map(|s| u32::from_le_bytes(s[offset..offset + 4].try_into().expect("4 bytes")));
        let first = values.next().unwrap_or(0);
        values.all(|v| v == first).then_some(first)
    }

    /// Whether a node's memory of `page` (None: never installed, so zeroes) is a state
    /// the page may hold.
    pub fn allows(&self, page: PageId, memory: Option<&PageBytes>, live: &[bool]) -> bool {
        let zero = zero_page();
        let memory = memory.unwrap_or(&zero);
        match self.pages.get(&page) {
            None => memory.iter().all(|&b| b == 0),
            Some(ghost) => ghost
                .allowed(self.keep(live))
                .into_iter()
                .any(|state| state[..] == memory[..]),
        }
    }

    /// For a violation report: where `memory` differs from what the page may hold.
    pub fn describe(&self, page: PageId, memory: Option<&PageBytes>, live: &[bool]) -> String {
        let zero = zero_page();
        let memory = memory.unwrap_or(&zero);
        let Some(ghost) = self.pages.get(&page) else {
            return "never written".into();
        };
        let word =
            |b: &PageBytes, at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
        let keep = self.keep(live);
        let allowed = ghost.allowed(keep);
        let mut out = format!(
            "{} allowed state(s), {} generation(s) kept, from {}",
            allowed.len(),
            ghost.history.len(),
            ghost.anchor(keep)
        );
        let at = (0..PAGE_SIZE_BYTES / 8).map(|w| w * 8).find(|&at| {
            allowed_words(ghost, keep, at)
                .into_iter()
                .all(|w| w != word(memory, at))
        });
        if let Some(at) = at {
            let words: Vec<String> = allowed_words(ghost, keep, at)
                .into_iter()
                .map(|w| format!("{w:#x}"))
                .collect();
            out += &format!(
                "; at offset {at} memory has {:#x}, allowed {words:?}",
                word(memory, at)
            );
        }
        out
    }

    /// Whether a live node's process saw a state of `page`, or one is still protected
    /// (on k nodes, fewer than k losses ago): the page must not be lost.
    pub fn seen_by_live(&self, page: PageId, live: &[bool]) -> bool {
        let keep = self.keep(live);
        self.pages
            .get(&page)
            .is_some_and(|ghost| ghost.history.iter().any(|g| keep.keeps(g)))
    }

    /// Whether `bytes` are contents of `page` that were put on k nodes (they reached
    /// another node's process, or a sync covered them): some protected generation
    /// holds them.
    pub fn protects(&self, page: PageId, bytes: &PageBytes) -> bool {
        self.pages.get(&page).is_some_and(|ghost| {
            ghost.history.iter().any(|g| {
                g.protected_at.is_some() && g.states.iter().any(|state| state[..] == bytes[..])
            })
        })
    }

    /// A process of `node` touches `page`, whose bytes in the node's memory are
    /// `memory`: if they are contents another node's process wrote, they reached this
    /// node by a grant, before which the home put them on k nodes; they survive k - 1
    /// losses from now. (Checked on the whole page: a read of a few bytes may agree
    /// with several generations.)
    pub fn exposed(&mut self, page: PageId, node: usize, memory: &PageBytes) {
        let me = (node, self.life(node));
        let Some(ghost) = self.pages.get_mut(&page) else {
            return;
        };
        let holding = ghost
            .history
            .iter_mut()
            .rev()
            .find(|g| g.states.iter().any(|state| state[..] == memory[..]));
        if let Some(generation) = holding {
            // The first time only: a later access may be of the copy this node already
            // holds, served without the home (which re-replicates only on a grant).
            if generation.origin.is_some_and(|origin| origin != me)
                && generation.protected_at.is_none()
            {
                generation.protected_at = Some(generation.made_at);
            }
        }
    }

    /// For debugging a seed: each generation's serial, origin, observers and
    /// protection.
    pub fn protection(&self, page: PageId) -> String {
        let Some(ghost) = self.pages.get(&page) else {
            return "untouched".into();
        };
        let mut out = format!("losses {}:", self.losses);
        for g in ghost.history.iter().rev().take(6) {
            out += &format!(
                " [#{} origin {:?} seen {:?} protected {:?} word0 {:#x}]",
                g.serial,
                g.origin.map(|(o, life)| (o + 1, life)),
                g.observers.iter().map(|o| o + 1).collect::<Vec<_>>(),
                g.protected_at,
                u64::from_le_bytes(g.states[0][..8].try_into().expect("8"))
            );
        }
        out
    }

    /// For a sync node `node` starts: per page, the newest generation its processes
    /// wrote (what the sync must make durable; contents it only read were put on k
    /// nodes when they reached it).
    pub fn written_by(&self, node: usize) -> Vec<(PageId, u64)> {
        let life = self.life(node);
        self.pages
            .iter()
            .filter_map(|(&page, ghost)| {
                ghost
                    .history
                    .iter()
                    .rev()
                    .find(|g| g.origin == Some((node, life)))
                    .map(|g| (page, g.serial))
            })
            .collect()
    }

    /// A sync answered: the generations it covered are on k nodes from now, unless
    /// they were so before (an earlier sync, or they reached another node): a sync
    /// flushes only what was written since the node's last flush, so their copies date
    /// from then, and losses since may have taken some.
    /// `losses`: the loss count when the sync started (its copies are made after, but
    /// a flush of a page its node writes no more counts copies made since the write).
    pub fn synced(&mut self, covered: &[(PageId, u64)], losses: u64) {
        for &(page, serial) in covered {
            let Some(ghost) = self.pages.get_mut(&page) else {
                continue;
            };
            if let Some(generation) = ghost.history.iter_mut().find(|g| g.serial == serial) {
                let at = losses.min(generation.made_at);
                generation.protected_at.get_or_insert(at);
            }
        }
    }

    /// Node `node` crashed: what its processes made or saw is gone with them (a
    /// restarted node starts with nothing seen).
    pub fn forget_observer(&mut self, node: usize) {
        *self.lives.entry(node).or_insert(0) += 1;
        for page in self.pages.values_mut() {
            for generation in page.history.iter_mut() {
                generation.observers.remove(&node);
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&PageId) -> bool) {
        self.pages.retain(|page, _| keep(page));
    }
}
