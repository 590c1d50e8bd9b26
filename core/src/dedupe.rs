//! Exactly-once execution of retried requests, per origin.
//!
//! Each request carries its id and the origin's *oldest id still in flight*. Every id
//! below that floor has been answered and acknowledged by the origin, so its
//! duplicates can be ignored; outcomes at or above the floor are kept to answer
//! retries. Memory is bounded by what an origin has in flight, plus a hard cap.

use std::collections::BTreeMap;

use crate::codec::{DecodeError, Reader, Writer};
use crate::types::NodeId;

/// Most origins a decoded table may name (members are far fewer).
const MAX_ORIGINS: usize = 4096;

/// Outcomes kept per origin at most; beyond, the oldest are forgotten (only a
/// pathological origin with one request stuck behind thousands of newer ones gets there).
pub const MAX_OUTCOMES_PER_ORIGIN: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen<T> {
    /// Never executed: execute it and `record` the outcome.
    New,
    /// Executed before: answer with the same outcome.
    Done(T),
    /// Below the origin's floor: answered long ago; drop it.
    Stale,
}

#[derive(Clone, Debug)]
struct Origin<T> {
    floor: u64,
    outcomes: BTreeMap<u64, T>,
}

#[derive(Clone, Debug)]
pub struct Dedupe<T> {
    origins: BTreeMap<NodeId, Origin<T>>,
}

impl<T> Default for Dedupe<T> {
    fn default() -> Self {
        Dedupe {
            origins: BTreeMap::new(),
        }
    }
}

impl<T: Clone> Dedupe<T> {
    pub fn check(&mut self, origin: NodeId, id: u64, oldest_in_flight: u64) -> Seen<T> {
        let state = self.origins.entry(origin).or_insert_with(|| Origin {
            floor: 0,
            outcomes: BTreeMap::new(),
        });
        if oldest_in_flight > state.floor {
            state.floor = oldest_in_flight;
            state.outcomes = state.outcomes.split_off(&oldest_in_flight);
        }
        if id < state.floor {
            return Seen::Stale;
        }
        match state.outcomes.get(&id) {
            Some(outcome) => Seen::Done(outcome.clone()),
            None => Seen::New,
        }
    }

    pub fn record(&mut self, origin: NodeId, id: u64, outcome: T) {
        let state = self.origins.entry(origin).or_insert_with(|| Origin {
            floor: 0,
            outcomes: BTreeMap::new(),
        });
        state.outcomes.insert(id, outcome);
        while state.outcomes.len() > MAX_OUTCOMES_PER_ORIGIN {
            if let Some((oldest, _)) = state.outcomes.pop_first() {
                state.floor = state.floor.max(oldest + 1);
            }
        }
    }

    /// The outcome of `id` from `origin`, if still remembered.
    pub fn get(&self, origin: NodeId, id: u64) -> Option<&T> {
        self.origins.get(&origin)?.outcomes.get(&id)
    }

    /// Encodes the table (for a metadata snapshot), each outcome by `put_outcome`.
    pub fn encode(&self, w: &mut Writer, put_outcome: impl Fn(&mut Writer, &T)) {
        w.u32(self.origins.len() as u32);
        for (&origin, state) in &self.origins {
            w.u64(origin);
            w.u64(state.floor);
            w.u32(state.outcomes.len() as u32);
            for (&id, outcome) in &state.outcomes {
                w.u64(id);
                put_outcome(w, outcome);
            }
        }
    }

    /// Decodes what `encode` wrote; bounded, so a hostile snapshot cannot exhaust memory.
    pub fn decode(
        r: &mut Reader<'_>,
        get_outcome: impl Fn(&mut Reader<'_>) -> Result<T, DecodeError>,
    ) -> Result<Dedupe<T>, DecodeError> {
        let origin_count = r.u32()? as usize;
        if origin_count > MAX_ORIGINS {
            return Err(DecodeError::Invalid("too many origins"));
        }
        let mut origins = BTreeMap::new();
        for _ in 0..origin_count {
            let origin = r.u64()?;
            let floor = r.u64()?;
            let outcome_count = r.u32()? as usize;
            if outcome_count > MAX_OUTCOMES_PER_ORIGIN {
                return Err(DecodeError::Invalid("too many outcomes"));
            }
            let mut outcomes = BTreeMap::new();
            for _ in 0..outcome_count {
                let id = r.u64()?;
                if id < floor {
                    return Err(DecodeError::Invalid("outcome below its floor"));
                }
                outcomes.insert(id, get_outcome(r)?);
            }
            origins.insert(origin, Origin { floor, outcomes });
        }
        Ok(Dedupe { origins })
    }
}
