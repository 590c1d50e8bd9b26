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
}

#[derive(Default)]
struct GhostPage {
    /// Oldest first. Starts with the zero page, which nobody has seen (a node may
    /// still hold it, from a grant its process never used).
    history: VecDeque<Generation>,
}

#[derive(Default)]
pub struct Ghost {
    pages: BTreeMap<PageId, GhostPage>,
    /// Generations or states dropped past the bounds.
    pub states_dropped: u64,
    /// Accesses that found a page in more than one state after a crash.
    pub uncertain_accesses: u64,
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
            });
        }
    }

    /// Index of the first generation whose states are allowed now.
    fn anchor(&self, live: &[bool]) -> usize {
        self.history
            .iter()
            .rposition(|g| g.observers.iter().any(|&n| live[n]))
            .unwrap_or(0)
    }

    /// The states the page may hold now, each once.
    fn allowed(&self, live: &[bool]) -> Vec<&PageBytes> {
        let mut allowed: Vec<&PageBytes> = Vec::new();
        for generation in self.history.iter().skip(self.anchor(live)) {
            for state in &generation.states {
                if !allowed.iter().any(|a| a[..] == state[..]) {
                    allowed.push(state);
                }
            }
        }
        allowed
    }

    fn push(&mut self, mut states: Vec<Box<PageBytes>>, node: usize, dropped: &mut u64) {
        if states.len() > MAX_STATES_PER_GENERATION {
            *dropped += (states.len() - MAX_STATES_PER_GENERATION) as u64;
            states.drain(..states.len() - MAX_STATES_PER_GENERATION);
        }
        if self.history.len() >= MAX_GENERATIONS_PER_PAGE {
            self.history.pop_front();
            *dropped += 1;
        }
        self.history.push_back(Generation {
            states,
            observers: BTreeSet::from([node]),
        });
    }
}

fn allowed_words(ghost: &GhostPage, live: &[bool], at: usize) -> Vec<u64> {
    ghost
        .allowed(live)
        .into_iter()
        .map(|b| u64::from_le_bytes(b[at..at + 8].try_into().expect("8")))
        .collect()
}

impl Ghost {
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
        let ghost = self.pages.entry(page).or_default();
        ghost.start_zeroed();
        let anchor = ghost.anchor(live);
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
        let allowed = ghost.allowed(live);
        let matching: Vec<Box<PageBytes>> = allowed
            .iter()
            .filter(|s| s[offset..end] == *read)
            .map(|s| Box::new(**s))
            .collect();
        if matching.is_empty() {
            return Err(allowed.iter().map(|s| s[offset..end].to_vec()).collect());
        }
        ghost.push(matching, node, &mut self.states_dropped);
        Ok(())
    }

    /// A process of node `node` wrote `bytes` at `offset` of `page`.
    pub fn write(&mut self, page: PageId, offset: usize, bytes: &[u8], node: usize, live: &[bool]) {
        let end = offset + bytes.len();
        let ghost = self.pages.entry(page).or_default();
        ghost.start_zeroed();
        let mut next: Vec<Box<PageBytes>> = Vec::new();
        for state in ghost.allowed(live) {
            let mut state = Box::new(*state);
            state[offset..end].copy_from_slice(bytes);
            if !next.iter().any(|n| n[..] == state[..]) {
                next.push(state);
            }
        }
        if next.len() > 1 {
            self.uncertain_accesses += 1;
        }
        ghost.push(next, node, &mut self.states_dropped);
    }

    /// The bytes at `offset`, if the page may hold only one value there.
    pub fn certain_u32(&self, page: PageId, offset: usize, live: &[bool]) -> Option<u32> {
        let Some(ghost) = self.pages.get(&page) else {
            return Some(0);
        };
        let mut values = ghost
            .allowed(live)
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
                .allowed(live)
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
        let allowed = ghost.allowed(live);
        let mut out = format!(
            "{} allowed state(s), {} generation(s) kept, from {}",
            allowed.len(),
            ghost.history.len(),
            ghost.anchor(live)
        );
        let at = (0..PAGE_SIZE_BYTES / 8).map(|w| w * 8).find(|&at| {
            allowed_words(ghost, live, at)
                .into_iter()
                .all(|w| w != word(memory, at))
        });
        if let Some(at) = at {
            let words: Vec<String> = allowed_words(ghost, live, at)
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

    /// Whether a live node's process saw a state of `page`: that node holds a copy, so
    /// the page must not be lost.
    pub fn seen_by_live(&self, page: PageId, live: &[bool]) -> bool {
        self.pages.get(&page).is_some_and(|ghost| {
            ghost
                .history
                .iter()
                .any(|g| g.observers.iter().any(|&n| live[n]))
        })
    }

    /// Node `node` crashed: what its processes made or saw is gone with them (a
    /// restarted node starts with nothing seen).
    pub fn forget_observer(&mut self, node: usize) {
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
