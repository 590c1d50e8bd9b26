//! Properties of the Raft-replicated metadata state machine (`gallocy_core::meta`):
//! leases are exclusive, inside their space and granted only to live members; a
//! proposal runs exactly once however often it is retried or duplicated in the log;
//! replicas fed the same log agree.

use std::collections::{BTreeMap, BTreeSet};

use gallocy_core::meta::{ChunkRecord, Command, MetaState, NodeStatus, Outcome, Proposal};
use gallocy_core::types::{NodeId, SpaceId, SpaceLayout};
use gallocy_core::{Action, AppReply, AppRequest, Config, Node};
use proptest::prelude::*;
use proptest::sample::Index;

const MEMBERS: [NodeId; 3] = [1, 2, 3];

/// One step of the log, from the point of view of the proposing nodes.
#[derive(Clone, Debug)]
enum Step {
    /// A member proposes; the entry commits now, or is `lost` (a leader change dropped
    /// it) and stays in flight until retried.
    Propose {
        origin: NodeId,
        command: Command,
        lost: bool,
    },
    /// A member retries one of its proposals still in flight.
    Retry { origin: NodeId, pick: Index },
    /// An extra copy of an already applied proposal reaches the log (a retry that raced
    /// with the commit of the original).
    Duplicate(Index),
}

/// `overlong_names`: include names over the 64-byte limit. Such a proposal encodes but
/// does not decode (see `wire.rs`), so only logs applied directly may hold one.
fn create_space(overlong_names: bool) -> impl Strategy<Value = Command> {
    // Small domains on purpose: names and ranges collide, so joins, rejections and
    // overlaps all happen. Some layouts are invalid.
    let name = prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from),
        1 => Just(String::new()),
        u32::from(overlong_names) => Just("x".repeat(65)),
    ];
    let chunk_size = prop_oneof![
        Just(4096u64),
        Just(1u64 << 16),
        Just(1u64 << 20),
        Just(3000u64)
    ];
    (
        name,
        1u64..=8,
        0u64..=4,
        chunk_size,
        0u64..=3,
        any::<bool>(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(
                name,
                chunks,
                base_units,
                chunk_size_bytes,
                root_pages,
                misalign,
                flexible_base,
                persistent,
            )| {
                // Bases on a 1 MiB grid so different spaces overlap or abut.
                let base_addr = base_units * (1 << 20) + if misalign { 4096 } else { 0 };
                Command::CreateSpace {
                    name,
                    base_addr,
                    size_bytes: chunks * chunk_size_bytes,
                    chunk_size_bytes,
                    root_size_bytes: root_pages * 4096,
                    flexible_base,
                    persistent,
                    // 0 and 5 are refused like any other bad layout.
                    replicas: (root_pages % 6) as u8,
                }
            },
        )
}

fn command(overlong_names: bool) -> impl Strategy<Value = Command> {
    prop_oneof![
        2 => create_space(overlong_names),
        // Space 0 never exists; node 4 is not a member; count 0 is invalid.
        6 => (0u32..=4, 1u64..=4, prop_oneof![4 => 1u32..=4, 1 => 0u32..=70_000])
            .prop_map(|(space, node, count)| Command::LeaseChunks { space, node, count }),
        1 => (1u64..=4, 1u64..=3)
            .prop_map(|(node, incarnation)| Command::MarkDown { node, incarnation }),
        1 => (1u64..=4, 1u64..=3)
            .prop_map(|(node, incarnation)| Command::Rejoin { node, incarnation }),
        2 => prop::sample::select(vec!["a", "b", "c", "e"])
            .prop_map(|name| Command::Attach { name: name.to_string() }),
        3 => (0u32..=6).prop_map(|space| Command::Detach { space }),
        1 => prop::sample::select(vec!["a", "b", "c", "e"])
            .prop_map(|name| Command::Unpersist { name: name.to_string() }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let origin = prop::sample::select(MEMBERS.to_vec());
    prop_oneof![
        6 => (origin.clone(), command(false), prop::bool::weighted(0.25))
            .prop_map(|(origin, command, lost)| Step::Propose { origin, command, lost }),
        2 => (origin, any::<Index>()).prop_map(|(origin, pick)| Step::Retry { origin, pick }),
        2 => any::<Index>().prop_map(Step::Duplicate),
    ]
}

/// Everything observable about a state, for "nothing changed" and "replicas agree".
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    nodes: BTreeMap<NodeId, NodeStatus>,
    incarnations: BTreeMap<NodeId, u64>,
    spaces: BTreeMap<SpaceId, SpaceLayout>,
    names: BTreeMap<String, SpaceId>,
    chunks: BTreeMap<(SpaceId, u64), ChunkRecord>,
    attached: BTreeMap<SpaceId, BTreeSet<NodeId>>,
    persistent: BTreeSet<SpaceId>,
    next_space_id: SpaceId,
    applied: u64,
}

fn snapshot(state: &MetaState) -> Snapshot {
    Snapshot {
        nodes: state.nodes.clone(),
        incarnations: state.incarnations.clone(),
        spaces: state.spaces.clone(),
        names: state.space_ids_by_name.clone(),
        chunks: state.chunks.clone(),
        attached: state.attached.clone(),
        persistent: state.persistent.clone(),
        next_space_id: state.next_space_id,
        applied: state.applied_commands,
    }
}

/// A fresh state; `double_lease` plants gallocy-core's double-lease bug (only with the
/// `mutants` feature) to show that these properties catch it.
fn new_state(double_lease: bool) -> MetaState {
    #[allow(unused_mut)]
    let mut state = MetaState::new(&MEMBERS);
    #[cfg(feature = "mutants")]
    {
        state.mutant_double_lease = double_lease;
    }
    #[cfg(not(feature = "mutants"))]
    assert!(!double_lease, "planting bugs needs the `mutants` feature");
    state
}

/// Structural invariants of one state.
fn check_state(state: &MetaState) -> Result<(), TestCaseError> {
    for (&(space, chunk), record) in &state.chunks {
        let layout = state
            .spaces
            .get(&space)
            .ok_or_else(|| TestCaseError::fail(format!("chunk of unknown space {space}")))?;
        prop_assert!(
            chunk < layout.chunk_count(),
            "chunk {chunk} outside space {space} of {} chunks",
            layout.chunk_count()
        );
        prop_assert!(
            MEMBERS.contains(&record.lessee),
            "lessee {} not a member",
            record.lessee
        );
        // The home is the lessee until the lessee is marked down; then a node up (if
        // any is left), also once the lessee rejoined.
        let any_up = state.nodes.values().any(|s| *s == NodeStatus::Up);
        prop_assert!(
            record.home == record.lessee || record.lessee_lost(state),
            "chunk {chunk} of space {space} homed on {} while its lessee {} is up",
            record.home,
            record.lessee
        );
        prop_assert!(
            state.is_up(record.home) || !any_up,
            "chunk {chunk} of space {space} homed on down node {}",
            record.home
        );
    }
    for (id, layout) in &state.spaces {
        prop_assert_eq!(*id, layout.id);
        prop_assert!(
            layout.validate().is_ok(),
            "invalid layout stored: {:?}",
            layout
        );
        prop_assert_eq!(state.space_ids_by_name.get(&layout.name), Some(id));
        // The creator holds the root chunk.
        prop_assert!(
            state.chunks.contains_key(&(*id, 0)),
            "space {id} without root chunk"
        );
        for (other_id, other) in &state.spaces {
            if other_id != id {
                prop_assert!(
                    layout.end_addr() <= other.base_addr || other.end_addr() <= layout.base_addr,
                    "spaces {id} and {other_id} overlap"
                );
            }
        }
    }
    prop_assert_eq!(state.space_ids_by_name.len(), state.spaces.len());
    // A space lives while a node is attached to it, or for good if persistent.
    for id in state.spaces.keys() {
        prop_assert!(
            *id < state.next_space_id,
            "space id {id} not below the next id"
        );
        let attached = state.attached.get(id).map_or(0, |set| set.len());
        prop_assert!(
            attached > 0 || state.persistent.contains(id),
            "space {id} lives with no node attached and is not persistent"
        );
    }
    for id in state.attached.keys().chain(state.persistent.iter()) {
        prop_assert!(
            state.spaces.contains_key(id),
            "attach record of gone space {id}"
        );
    }
    Ok(())
}

/// Spaces present before and gone after: they must have been left by all but `leaver`
/// (or by nobody) and not be persistent; their chunks leave the model.
fn check_destroyed(
    before: &Snapshot,
    state: &MetaState,
    leaver: NodeId,
    owners: &mut BTreeMap<(SpaceId, u64), NodeId>,
) -> Result<Vec<SpaceId>, TestCaseError> {
    let gone: Vec<SpaceId> = before
        .spaces
        .keys()
        .copied()
        .filter(|id| !state.spaces.contains_key(id))
        .collect();
    for &id in &gone {
        let set = before.attached.get(&id).cloned().unwrap_or_default();
        prop_assert!(
            set.iter().all(|&n| n == leaver),
            "space {id} destroyed while {set:?} were attached"
        );
        prop_assert!(
            !before.persistent.contains(&id),
            "persistent space {id} destroyed"
        );
        prop_assert!(
            !state.chunks.keys().any(|&(s, _)| s == id),
            "destroyed space {id} kept chunks"
        );
        owners.retain(|&(s, _), _| s != id);
    }
    Ok(gone)
}

/// What one proposing node knows: the model of `Node`'s proposal bookkeeping.
#[derive(Default)]
struct Proposer {
    next_id: u64,
    in_flight: BTreeMap<u64, Proposal>,
    /// Highest `oldest_in_flight` the state machine has seen from this origin: ids
    /// below it were answered and may be forgotten.
    floor: u64,
}

impl Proposer {
    fn oldest_in_flight(&self, or: u64) -> u64 {
        self.in_flight.keys().next().copied().unwrap_or(or)
    }
}

struct Log {
    state: MetaState,
    /// A second replica that sees every entry through the Raft encoding.
    replica: MetaState,
    proposers: BTreeMap<NodeId, Proposer>,
    /// Every applied proposal (a copy as it entered the log) with its first outcome.
    applied: Vec<(Proposal, Outcome)>,
    /// Model of the lease table: who holds each chunk. Never reassigned.
    owners: BTreeMap<(SpaceId, u64), NodeId>,
}

impl Log {
    fn new(double_lease: bool) -> Log {
        Log {
            state: new_state(double_lease),
            replica: new_state(double_lease),
            proposers: MEMBERS
                .iter()
                .map(|&m| {
                    (
                        m,
                        Proposer {
                            next_id: 1,
                            ..Proposer::default()
                        },
                    )
                })
                .collect(),
            applied: Vec::new(),
            owners: BTreeMap::new(),
        }
    }

    /// Applies one entry to both replicas; they must agree.
    fn apply(&mut self, proposal: &Proposal) -> Result<Outcome, TestCaseError> {
        let outcome = self.state.apply(proposal);
        let decoded = Proposal::decode(&proposal.encode())
            .map_err(|e| TestCaseError::fail(format!("entry does not decode: {e}")))?;
        prop_assert_eq!(&decoded, proposal);
        let replica_outcome = self.replica.apply(&decoded);
        prop_assert_eq!(
            &replica_outcome,
            &outcome,
            "replicas disagree on {:?}",
            proposal
        );
        let proposer = self.proposers.get_mut(&proposal.origin).expect("member");
        proposer.floor = proposer.floor.max(proposal.oldest_in_flight);
        Ok(outcome)
    }

    /// The first time a proposal reaches the log: it must execute, exactly once.
    fn first_apply(&mut self, proposal: Proposal) -> Result<(), TestCaseError> {
        let before = snapshot(&self.state);
        let outcome = self.apply(&proposal)?;
        prop_assert!(
            outcome != Outcome::Stale,
            "in-flight proposal {:?} dropped as stale",
            proposal
        );
        prop_assert_eq!(self.state.applied_commands, before.applied + 1);
        check_fresh(&proposal, &outcome, &before, &self.state, &mut self.owners)?;
        // An immediate retry is answered from memory and changes nothing.
        let again_before = snapshot(&self.state);
        let again = self.apply(&proposal)?;
        prop_assert_eq!(&again, &outcome, "immediate retry of {:?}", proposal);
        prop_assert_eq!(
            snapshot(&self.state),
            again_before,
            "immediate retry changed the state"
        );
        prop_assert_eq!(
            self.state.outcome_of(proposal.origin, proposal.proposal_id),
            Some(&outcome)
        );
        self.applied.push((proposal, outcome));
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Propose {
                origin,
                command,
                lost,
            } => {
                let proposer = self.proposers.get_mut(origin).expect("member");
                let id = proposer.next_id;
                proposer.next_id += 1;
                let proposal = Proposal {
                    origin: *origin,
                    proposal_id: id,
                    oldest_in_flight: proposer.oldest_in_flight(id),
                    command: command.clone(),
                };
                if *lost {
                    proposer.in_flight.insert(id, proposal);
                } else {
                    self.first_apply(proposal)?;
                }
            }
            Step::Retry { origin, pick } => {
                let proposer = self.proposers.get_mut(origin).expect("member");
                if proposer.in_flight.is_empty() {
                    return Ok(());
                }
                let id = *proposer
                    .in_flight
                    .keys()
                    .nth(pick.index(proposer.in_flight.len()))
                    .expect("in range");
                // Like `Node`, a retry carries the current oldest in flight (maybe itself).
                let oldest = proposer.oldest_in_flight(id);
                let mut proposal = proposer.in_flight.remove(&id).expect("listed");
                proposal.oldest_in_flight = oldest;
                self.first_apply(proposal)?;
            }
            Step::Duplicate(pick) => {
                if self.applied.is_empty() {
                    return Ok(());
                }
                let (proposal, first) = self.applied[pick.index(self.applied.len())].clone();
                let before = snapshot(&self.state);
                let outcome = self.apply(&proposal)?;
                // Remembered while the origin may still retry it; forgotten (Stale) once
                // the origin said everything below a newer id was answered.
                let floor = self.proposers[&proposal.origin].floor;
                let expected = if proposal.proposal_id >= floor {
                    first
                } else {
                    Outcome::Stale
                };
                prop_assert_eq!(
                    &outcome,
                    &expected,
                    "duplicate of {:?} (floor {})",
                    proposal,
                    floor
                );
                prop_assert_eq!(
                    snapshot(&self.state),
                    before,
                    "a duplicate changed the state"
                );
            }
        }
        check_state(&self.state)?;
        let leased: BTreeMap<(SpaceId, u64), NodeId> = self
            .state
            .chunks
            .iter()
            .map(|(&k, r)| (k, r.lessee))
            .collect();
        prop_assert_eq!(&leased, &self.owners, "lease table differs from the model");
        prop_assert_eq!(
            snapshot(&self.replica),
            snapshot(&self.state),
            "replicas diverged"
        );
        Ok(())
    }
}

fn run_log(steps: &[Step], double_lease: bool) -> Result<(), TestCaseError> {
    let mut log = Log::new(double_lease);
    for step in steps {
        log.step(step)?;
    }
    Ok(())
}

/// What a first execution may do.
fn check_fresh(
    proposal: &Proposal,
    outcome: &Outcome,
    before: &Snapshot,
    state: &MetaState,
    owners: &mut BTreeMap<(SpaceId, u64), NodeId>,
) -> Result<(), TestCaseError> {
    match (&proposal.command, outcome) {
        (
            Command::LeaseChunks { space, node, count },
            Outcome::Leased {
                space: got_space,
                first_chunk,
                count: got_count,
            },
        ) => {
            prop_assert_eq!(got_space, space);
            prop_assert_eq!(got_count, count);
            prop_assert_eq!(
                before.nodes.get(node),
                Some(&NodeStatus::Up),
                "leased to a node not up"
            );
            let layout = &before.spaces[space];
            prop_assert!(
                first_chunk + *count as u64 <= layout.chunk_count(),
                "lease {first_chunk}+{count} outside a space of {} chunks",
                layout.chunk_count()
            );
            for chunk in *first_chunk..first_chunk + *count as u64 {
                if let Some(previous) = owners.insert((*space, chunk), *node) {
                    return Err(TestCaseError::fail(format!(
                        "chunk {chunk} of space {space} leased to {node}, already held by {previous}"
                    )));
                }
            }
        }
        (Command::LeaseChunks { .. }, Outcome::LeaseRejected(_)) => {
            prop_assert_eq!(
                &state.chunks,
                &before.chunks,
                "rejected lease changed chunks"
            );
        }
        (
            Command::CreateSpace {
                name,
                base_addr,
                size_bytes,
                flexible_base,
                ..
            },
            Outcome::SpaceCreated(layout),
        ) => {
            prop_assert_eq!(&layout.name, name);
            prop_assert_eq!(layout.size_bytes, *size_bytes);
            prop_assert_eq!(state.spaces.get(&layout.id), Some(layout));
            prop_assert!(state.is_attached(layout.id, proposal.origin));
            match before.spaces.get(&layout.id) {
                // Joining an existing space: it is returned unchanged, at its base
                // unless the request let the base float.
                Some(existing) => {
                    prop_assert_eq!(existing, layout);
                    prop_assert!(*flexible_base || layout.base_addr == *base_addr);
                }
                // A new space, exactly where asked or (flexible) no lower; its root
                // chunk goes to the creator.
                None => {
                    prop_assert!(!before.names.contains_key(name));
                    if *flexible_base {
                        prop_assert!(layout.base_addr >= *base_addr);
                    } else {
                        prop_assert_eq!(layout.base_addr, *base_addr);
                    }
                    let previous = owners.insert((layout.id, 0), proposal.origin);
                    prop_assert_eq!(previous, None, "new space id {} reused", layout.id);
                    prop_assert!(layout.id >= before.next_space_id, "space id reused");
                }
            }
        }
        (Command::CreateSpace { .. }, Outcome::SpaceRejected(_)) => {
            prop_assert_eq!(&state.spaces, &before.spaces, "rejected space stored");
            prop_assert_eq!(
                &state.chunks,
                &before.chunks,
                "rejected space leased chunks"
            );
        }
        (Command::MarkDown { node, incarnation }, Outcome::MarkedDown(marked))
            if before.nodes.get(node) != Some(&NodeStatus::Up)
                || before.incarnations.get(node) != Some(incarnation) =>
        {
            // Down already, or about an earlier life: nothing changes.
            prop_assert_eq!(marked, node);
            prop_assert_eq!(&state.nodes, &before.nodes, "stale mark-down changed nodes");
            prop_assert_eq!(
                &state.chunks,
                &before.chunks,
                "stale mark-down moved chunks"
            );
        }
        (Command::Rejoin { node, incarnation }, Outcome::Rejoined(rejoined)) => {
            prop_assert_eq!(rejoined, node);
            prop_assert_eq!(proposal.origin, *node, "rejoined for another node");
            prop_assert_eq!(before.nodes.get(node), Some(&NodeStatus::Down));
            prop_assert!(before
                .incarnations
                .get(node)
                .is_some_and(|i| i < incarnation));
            prop_assert!(state.is_up(*node));
            prop_assert_eq!(state.incarnation(*node), *incarnation);
            prop_assert!(
                state.chunks.iter().all(|(key, record)| {
                    let old = before.chunks[key];
                    old == *record || before.nodes.get(&old.home) == Some(&NodeStatus::Down)
                }),
                "rejoin moved chunks homed by a node up"
            );
        }
        (Command::Rejoin { node, incarnation }, Outcome::RejoinRejected(_)) => {
            let acceptable = proposal.origin == *node
                && before.nodes.get(node) == Some(&NodeStatus::Down)
                && before
                    .incarnations
                    .get(node)
                    .is_some_and(|i| i < incarnation);
            prop_assert!(!acceptable, "a valid rejoin was refused");
            prop_assert_eq!(&state.nodes, &before.nodes, "refused rejoin changed nodes");
            prop_assert_eq!(&state.incarnations, &before.incarnations);
        }
        (Command::MarkDown { node, .. }, Outcome::MarkedDown(marked)) => {
            prop_assert_eq!(marked, node);
            prop_assert!(!state.is_up(*node));
            let gone = check_destroyed(before, state, *node, owners)?;
            // Leases stay; homes on the node move to one node up per space.
            let up: Vec<NodeId> = state.up_nodes().collect();
            let kept: BTreeMap<_, _> = before
                .chunks
                .iter()
                .filter(|((s, _), _)| !gone.contains(s))
                .map(|(&(s, c), &v)| {
                    let mut record = v;
                    if record.home == *node && !up.is_empty() {
                        record.home = up[s as usize % up.len()];
                    }
                    ((s, c), record)
                })
                .collect();
            prop_assert_eq!(
                &state.chunks,
                &kept,
                "mark-down moved leases or homes wrongly"
            );
            prop_assert!(
                state.attached.values().all(|set| !set.contains(node)),
                "a node marked down is still attached"
            );
        }
        (Command::Attach { name }, Outcome::SpaceCreated(layout)) => {
            prop_assert_eq!(&layout.name, name);
            prop_assert_eq!(before.spaces.get(&layout.id), Some(layout));
            prop_assert!(state.is_attached(layout.id, proposal.origin));
            prop_assert_eq!(&state.chunks, &before.chunks, "attach moved leases");
        }
        (Command::Attach { .. }, Outcome::SpaceRejected(_)) => {
            prop_assert_eq!(
                &state.spaces,
                &before.spaces,
                "refused attach changed spaces"
            );
            prop_assert_eq!(&state.attached, &before.attached, "refused attach attached");
        }
        (
            Command::Detach { space },
            Outcome::Detached {
                space: got,
                destroyed,
            },
        ) => {
            prop_assert_eq!(got, space);
            prop_assert!(!state.is_attached(*space, proposal.origin));
            let gone = check_destroyed(before, state, proposal.origin, owners)?;
            prop_assert_eq!(*destroyed, gone == vec![*space], "destroyed {:?}", gone);
            prop_assert!(gone.len() <= 1, "one detach destroyed {:?}", gone);
        }
        (Command::Unpersist { name }, Outcome::Unpersisted { space, destroyed }) => {
            prop_assert_eq!(
                *space,
                before.names.get(name).copied(),
                "unpersisted the wrong space"
            );
            if let Some(id) = space {
                prop_assert!(!state.persistent.contains(id), "still persistent");
                let attached = before.attached.get(id).is_some_and(|set| !set.is_empty());
                prop_assert_eq!(
                    *destroyed,
                    !attached,
                    "destroyed {} with attach set {:?}",
                    destroyed,
                    before.attached.get(id)
                );
                prop_assert_eq!(state.spaces.contains_key(id), attached);
                if *destroyed {
                    prop_assert!(
                        !state.chunks.keys().any(|&(s, _)| s == *id),
                        "destroyed space kept chunks"
                    );
                    owners.retain(|&(s, _), _| s != *id);
                }
            } else {
                prop_assert!(!destroyed);
                prop_assert_eq!(&state.spaces, &before.spaces);
            }
            let others: Vec<_> = before
                .spaces
                .keys()
                .filter(|k| Some(**k) != *space)
                .collect();
            prop_assert!(
                others.iter().all(|k| state.spaces.contains_key(k)),
                "unpersist destroyed another space"
            );
        }
        (command, outcome) => {
            return Err(TestCaseError::fail(format!(
                "outcome {outcome:?} does not answer {command:?}"
            )))
        }
    }
    Ok(())
}

fn any_proposal() -> impl Strategy<Value = Proposal> {
    (
        prop::sample::select(MEMBERS.to_vec()),
        1u64..=40,
        0u64..=40,
        command(true),
    )
        .prop_map(|(origin, proposal_id, oldest, command)| Proposal {
            origin,
            proposal_id,
            oldest_in_flight: oldest.min(proposal_id),
            command,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn leases_are_exclusive_and_proposals_run_exactly_once(
        steps in proptest::collection::vec(step(), 1..300)
    ) {
        run_log(&steps, false)?;
    }

    /// Replicas applying the same log end identical, whatever the log (ids reused,
    /// out of order, floors anywhere).
    #[test]
    fn replicas_fed_the_same_log_agree(log in proptest::collection::vec(any_proposal(), 1..200)) {
        let mut a = MetaState::new(&MEMBERS);
        let mut b = MetaState::new(&MEMBERS);
        let outcomes_a: Vec<Outcome> = log.iter().map(|p| a.apply(p)).collect();
        let outcomes_b: Vec<Outcome> = log.iter().map(|p| b.apply(p)).collect();
        prop_assert_eq!(outcomes_a, outcomes_b);
        prop_assert_eq!(snapshot(&a), snapshot(&b));
        check_state(&a)?;
    }
}

/// Known gallocy-core bug. `AppRequest::CreateSpace` proposes a name of any length;
/// `Proposal::encode` writes it but `Proposal::decode` refuses names over 64 bytes, so
/// every replica skips the entry, the proposer re-proposes it forever and the
/// application never gets an answer (it should get `SpaceRejected`).
#[test]
fn create_space_with_overlong_name_is_answered() {
    // A one-node cluster commits at once: no network needed.
    let mut node = Node::new(Config::new(1, vec![1])).expect("valid config");
    node.handle_request(
        0,
        7,
        AppRequest::CreateSpace {
            name: "x".repeat(65),
            base_addr: 1 << 32,
            size_bytes: 1 << 20,
            chunk_size_bytes: 1 << 16,
            flexible_base: false,
            persistent: false,
            replicas: 2,
        },
    );
    let mut actions = Vec::new();
    let mut reply = None;
    for now in 1..5_000 {
        node.tick(now);
        node.drain_actions(&mut actions);
        for action in actions.drain(..) {
            if let Action::Reply { token: 7, reply: r } = action {
                reply = Some(r);
            }
        }
    }
    assert!(
        matches!(reply, Some(AppReply::Error(_))),
        "no answer after 5000 ticks ({} retries so far)",
        node.stats().retries
    );
}

#[cfg(feature = "mutants")]
#[test]
fn planted_double_lease_is_caught() {
    use proptest::test_runner::{RngSeed, TestRunner};
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x6761_6c6c),
        ..ProptestConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(step(), 1..300), |steps| {
        run_log(&steps, true)
    });
    assert!(result.is_err(), "the double-lease mutant survived");
}
