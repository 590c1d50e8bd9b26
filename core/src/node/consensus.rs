//! Raft: the Ready loop, proposals and applied metadata, failure detection, fencing
//! and eviction.

use super::*;

/// Whether a command changes membership (carried by a Raft configuration change).
fn is_membership(command: &Command) -> bool {
    matches!(
        command,
        Command::AddMember { .. } | Command::RemoveMember { .. }
    )
}

impl Node {
    // -----------------------------------------------------------------------------
    // Raft.

    pub(super) fn drive_raft(&mut self) {
        if self.in_ready {
            return;
        }
        self.in_ready = true;
        self.drive_raft_rounds();
        self.in_ready = false;
    }

    pub(super) fn drive_raft_rounds(&mut self) {
        for _ in 0..MAX_READY_ROUNDS {
            for proposal in std::mem::take(&mut self.queued_proposals) {
                self.submit_proposal(&proposal);
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
                    let members: Vec<NodeId> = self.meta.nodes.keys().copied().collect();
                    for member in members {
                        self.last_heard_tick.insert(member, now);
                    }
                }
            }
            let messages = ready.take_messages();
            self.send_raft(messages);
            let mut write = RaftWrite {
                must_sync: ready.must_sync(),
                ..RaftWrite::default()
            };
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                if self.install_snapshot(snapshot.clone()) {
                    write.conf_state = Some(snapshot.get_metadata().get_conf_state().clone());
                    write.snapshot = Some(snapshot);
                    write.clear_log = true;
                }
            }
            let committed = ready.take_committed_entries();
            self.apply_entries(committed);
            if !ready.entries().is_empty() {
                if let Err(error) = self.raft.mut_store().entries.wl().append(ready.entries()) {
                    self.stats.raft_errors += 1;
                    let _ = error;
                }
                write.entries = ready.entries().to_vec();
            }
            if let Some(hard_state) = ready.hs() {
                self.raft
                    .mut_store()
                    .entries
                    .wl()
                    .set_hardstate(hard_state.clone());
                write.hard_state = Some(hard_state.clone());
            }
            // Durable before any message that depends on it leaves (the driver carries
            // out actions in order).
            if write != RaftWrite::default() {
                self.actions.push(Action::PersistRaft(write));
            }
            let persisted = ready.take_persisted_messages();
            self.send_raft(persisted);
            let mut light = self.raft.advance(ready);
            if let Some(commit) = light.commit_index() {
                let store = self.raft.mut_store();
                store.entries.wl().mut_hard_state().set_commit(commit);
                // A commit index may be lost in a crash (Raft learns it again).
                let hard_state = store.entries.rl().hard_state().clone();
                self.actions.push(Action::PersistRaft(RaftWrite {
                    hard_state: Some(hard_state),
                    ..RaftWrite::default()
                }));
            }
            let messages = light.take_messages();
            self.send_raft(messages);
            let committed = light.take_committed_entries();
            self.apply_entries(committed);
            self.raft.advance_apply();
            self.compact_log();
            // raft-rs stops replicating to a member it sent a snapshot until told how
            // the sending went; the transport cannot tell, so every snapshot is
            // reported delivered. One that was lost makes the member refuse the next
            // append, and the leader sends the snapshot again.
            for to in std::mem::take(&mut self.snapshots_sent) {
                self.raft.report_snapshot(to, raft::SnapshotStatus::Finish);
            }
        }
    }

    /// Past `raft_log_max_entries` applied entries beyond the latest snapshot, takes a
    /// snapshot of the metadata at the applied index and drops the older half of the
    /// log: the log stays bounded, and a member behind the kept entries is sent the
    /// snapshot instead.
    ///
    /// After a membership change it does so at once, whatever the log's length, and
    /// durably with the new membership: a node added has an empty log, and the leader
    /// sends it a snapshot only once its own log no longer starts at index 1. A restart
    /// then finds the membership with the metadata it goes with.
    fn compact_log(&mut self) {
        let applied = self.raft.raft.raft_log.applied;
        let snapshot_index = self.raft.store().snapshot.get_metadata().index;
        let max_entries = self.config.raft_log_max_entries;
        // Cleared only once done: a forced snapshot that failed is tried again at the
        // next round (a joining node must not be sent the log from index 1).
        let membership_changed = self.membership_changed;
        if applied < snapshot_index + max_entries && !membership_changed {
            return;
        }
        let data = self.meta.encode_snapshot();
        if data.len() > crate::meta::MAX_SNAPSHOT_BYTES {
            // Cannot travel in one message: keep the log (counted, never silent).
            self.stats.raft_errors += 1;
            return;
        }
        let Ok(term) = self.raft.raft.raft_log.term(applied) else {
            self.stats.raft_errors += 1;
            return;
        };
        let mut snapshot = raft::eraftpb::Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = term;
        let conf_state = self.raft.raft.prs().conf().to_conf_state();
        metadata.set_conf_state(conf_state.clone());
        let store = self.raft.mut_store();
        store.snapshot = snapshot.clone();
        // At least entry 1 goes after a membership change (see above).
        let first_kept = applied
            .saturating_add(1)
            .saturating_sub(max_entries / 2)
            .max(if membership_changed { 2 } else { 1 })
            .min(applied + 1);
        if store.compact(first_kept).is_err() {
            self.stats.raft_errors += 1;
            return;
        }
        self.membership_changed = false;
        self.stats.log_compactions += 1;
        // Not synced unless membership changed: lost, the log it stands for is still on
        // the disk.
        self.actions.push(Action::PersistRaft(RaftWrite {
            snapshot: Some(snapshot),
            first_kept_index: Some(first_kept),
            conf_state: membership_changed.then_some(conf_state),
            must_sync: membership_changed,
            ..RaftWrite::default()
        }));
    }

    /// A leader sent the metadata at an index past this node's log: replace the state
    /// with it, then do what the skipped entries would have done to this node (drop
    /// destroyed spaces, take part in releases, void the copies of nodes gone down).
    /// Returns whether it was installed (to be made durable).
    fn install_snapshot(&mut self, snapshot: raft::eraftpb::Snapshot) -> bool {
        // Checked before it was stepped (`raft_message_is_sane`).
        let Ok(mut state) = MetaState::decode_snapshot(&snapshot.data) else {
            self.stats.raft_errors += 1;
            return false;
        };
        let metadata = snapshot.get_metadata().clone();
        let store = self.raft.mut_store();
        if store.entries.wl().apply_snapshot(snapshot.clone()).is_err() {
            self.stats.raft_errors += 1;
            return false;
        }
        store.snapshot = snapshot;
        store.compacted = (metadata.index, metadata.term);
        #[cfg(feature = "mutants")]
        {
            state.mutant_double_lease = self.meta.mutant_double_lease;
        }
        std::mem::swap(&mut self.meta, &mut state);
        let old = state;
        self.stats.snapshots_installed += 1;
        let gone: Vec<SpaceId> = old
            .spaces
            .keys()
            .filter(|id| !self.meta.spaces.contains_key(id))
            .copied()
            .collect();
        for space in gone {
            self.drop_space(space);
        }
        let me = self.config.id;
        let releases: Vec<(SpaceId, u64, u32)> = self
            .meta
            .releasing
            .iter()
            .filter(|(key, release)| {
                release.waiting.contains(&me) && !old.releasing.contains_key(key)
            })
            .map(|(&(space, first), release)| (space, first, release.count))
            .collect();
        for (space, first_chunk, count) in releases {
            self.begin_release(space, first_chunk, count);
        }
        // A life that ended in the skipped entries: down now, or up as a later life.
        let downed: Vec<NodeId> = old
            .nodes
            .keys()
            .filter(|&&node| {
                old.is_up(node)
                    && (!self.meta.is_up(node)
                        || self.meta.incarnation(node) != old.incarnation(node))
            })
            .copied()
            .collect();
        for node in downed {
            self.on_node_down(node);
        }
        let rejoined: Vec<NodeId> = self
            .meta
            .nodes
            .keys()
            .filter(|&&node| {
                // A member new to this node (it joined, or this node is joining) did
                // not rejoin: it starts its first life.
                old.nodes.contains_key(&node)
                    && self.meta.is_up(node)
                    && self.meta.incarnation(node) > old.incarnation(node)
            })
            .copied()
            .collect();
        for node in rejoined {
            self.on_node_rejoined(node);
        }
        if self.joining && self.meta.nodes.contains_key(&self.config.id) {
            if !self.meta.is_up(self.config.id) {
                // Marked down before it heard it was added: this life is over (a
                // restart rejoins as the next); what waited is answered `Evicted`.
                self.evict_self();
            }
            self.joined();
        }
        self.retry_unmapped(false);
        true
    }

    pub(super) fn send_raft(&mut self, messages: Vec<RaftMessage>) {
        for message in messages {
            if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                self.snapshots_sent.push(message.to);
            }
            match message.write_to_bytes() {
                Ok(bytes) => self.send(message.to, PeerMessage::Raft(bytes)),
                Err(_) => self.stats.raft_errors += 1,
            }
        }
    }

    pub(super) fn handle_raft(&mut self, from: NodeId, bytes: &[u8]) {
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
        // raft-rs trusts its peers and panics on a heartbeat committing past our log;
        // a correct leader never sends one. (Peers are authenticated by TLS on TCP, not
        // trusted: other raft-rs assertions remain reachable by a member's forged
        // message.)
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat
            && message.commit > self.raft.raft.raft_log.last_index()
        {
            self.stats.messages_rejected += 1;
            return;
        }
        if !self.raft_message_is_sane(from, &message) {
            self.stats.messages_rejected += 1;
            return;
        }
        if self.raft.step(message).is_err() {
            self.stats.raft_errors += 1;
            return;
        }
        self.drive_raft();
    }

    /// Checks a peer's Raft message for what raft-rs trusts and a correct peer never
    /// sends: a proposal must carry the sender's own commands, and appended entries
    /// must follow on from the index they claim to (raft-rs aborts on entries that
    /// conflict with committed ones).
    fn raft_message_is_sane(&self, from: NodeId, message: &RaftMessage) -> bool {
        use raft::eraftpb::MessageType;
        // Only what gallocy's Raft use sends: no read-index requests, leadership transfers
        // or snapshots (raft-rs indexes a read-index request's entries unchecked).
        let used = matches!(
            message.get_msg_type(),
            MessageType::MsgPropose
                | MessageType::MsgAppend
                | MessageType::MsgAppendResponse
                | MessageType::MsgRequestVote
                | MessageType::MsgRequestVoteResponse
                | MessageType::MsgRequestPreVote
                | MessageType::MsgRequestPreVoteResponse
                | MessageType::MsgHeartbeat
                | MessageType::MsgHeartbeatResponse
                | MessageType::MsgSnapshot
        );
        // Term 0 marks a message raft-rs handles without a term check: only a proposal a
        // follower forwards carries it, and a proposal always does (raft-rs aborts when
        // it forwards one that names a term).
        let is_proposal = message.get_msg_type() == MessageType::MsgPropose;
        if !used || (message.term == 0) != is_proposal {
            return false;
        }
        match message.get_msg_type() {
            // raft-rs aborts on a proposal without entries ("stepped empty MsgProp").
            MessageType::MsgPropose => {
                !message.entries.is_empty()
                    && message.entries.iter().all(|entry| {
                        let data = match entry.get_entry_type() {
                            EntryType::EntryNormal => Some(entry.data.to_vec()),
                            EntryType::EntryConfChange => ConfChange::parse_from_bytes(&entry.data)
                                .ok()
                                .map(|change| change.context.to_vec()),
                            EntryType::EntryConfChangeV2 => None,
                        };
                        // A membership command travels only as a configuration change
                        // (else the metadata and raft-rs would disagree on members).
                        let conf_change = entry.get_entry_type() == EntryType::EntryConfChange;
                        data.is_some_and(|data| {
                            Proposal::decode(&data).is_ok_and(|p| {
                                p.origin == from && is_membership(&p.command) == conf_change
                            })
                        })
                    })
            }
            // A snapshot must be of this cluster's members and decode as metadata:
            // raft-rs restores whatever it is given.
            MessageType::MsgSnapshot => {
                let snapshot = message.get_snapshot();
                let metadata = snapshot.get_metadata();
                let mut voters = metadata.get_conf_state().voters.clone();
                voters.sort_unstable();
                // Raft's members are the metadata's: changed by the same entries.
                let members_agree = MetaState::decode_snapshot(&snapshot.data)
                    .is_ok_and(|state| state.nodes.keys().copied().eq(voters.iter().copied()));
                metadata.index > 0
                    && metadata.term > 0
                    && metadata.term <= message.term
                    && !voters.is_empty()
                    && metadata.get_conf_state().learners.is_empty()
                    && metadata.get_conf_state().voters_outgoing.is_empty()
                    && members_agree
            }
            MessageType::MsgAppend => {
                // Term 0 holds no entries: a previous entry of term 0 past index 0
                // would match any missing index (raft-rs reads their term as 0).
                if message.index > 0 && message.log_term == 0 {
                    return false;
                }
                let mut expected = message.index;
                let mut term = message.log_term;
                message.entries.iter().all(|entry| {
                    expected = expected.saturating_add(1);
                    let ordered = entry.index == expected
                        && entry.term >= term.max(1)
                        && entry.term <= message.term;
                    term = entry.term;
                    ordered
                })
            }
            _ => true,
        }
    }

    pub(super) fn propose(&mut self, command: Command, purpose: Purpose) -> Result<(), AppError> {
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
            self.queued_proposals.push(proposal.clone());
        } else {
            self.submit_proposal(&proposal);
        }
        self.proposals.insert(
            proposal_id,
            PendingProposal {
                proposal,
                purpose,
                retry: RetrySchedule::starting(self.now_ticks, self.config.retry_base_ticks * 4),
            },
        );
        self.drive_raft();
        Ok(())
    }

    /// Hands a proposal to raft-rs: a membership command as a configuration change
    /// (the proposal is its context), any other as a normal entry.
    pub(super) fn submit_proposal(&mut self, proposal: &Proposal) {
        let data = proposal.encode();
        let change = match proposal.command {
            Command::AddMember { node } => Some((ConfChangeType::AddNode, node)),
            Command::RemoveMember { node } => Some((ConfChangeType::RemoveNode, node)),
            _ => None,
        };
        match change {
            Some((change_type, node_id)) => {
                let mut change = ConfChange::default();
                change.set_change_type(change_type);
                change.node_id = node_id;
                change.context = data.into();
                // Refused while another change is pending: the retry proposes it again.
                let _ = self.raft.propose_conf_change(vec![], change);
            }
            None => {
                let _ = self.raft.propose(vec![], data);
            }
        }
    }

    /// A committed configuration change: its proposal (the context) is applied to the
    /// metadata like any other, and Raft's membership follows when the metadata took it.
    fn apply_membership_entry(&mut self, entry: &Entry) -> Option<(Proposal, Outcome)> {
        let change = ConfChange::parse_from_bytes(&entry.data).ok();
        let proposal = change
            .as_ref()
            .and_then(|change| Proposal::decode(&change.context).ok());
        let (Some(change), Some(proposal)) = (change, proposal) else {
            // Every replica skips the same entry, so they stay identical.
            self.stats.raft_errors += 1;
            return None;
        };
        let matches = match proposal.command {
            Command::AddMember { node } => {
                change.get_change_type() == ConfChangeType::AddNode && change.node_id == node
            }
            Command::RemoveMember { node } => {
                change.get_change_type() == ConfChangeType::RemoveNode && change.node_id == node
            }
            _ => false,
        };
        if !matches {
            self.stats.raft_errors += 1;
            return None;
        }
        let removed_up = match proposal.command {
            Command::RemoveMember { node } => self.meta.is_up(node).then_some(node),
            _ => None,
        };
        let executed_before = self.meta.applied_commands;
        let outcome = self.meta.apply(&proposal);
        let executed = self.meta.applied_commands > executed_before;
        // A removed member leaves every attach set: a space may end with it.
        for space in self.meta.take_destroyed() {
            self.drop_space(space);
        }
        if let (true, Outcome::MembershipChanged { node, added }) = (executed, &outcome) {
            let (node, added) = (*node, *added);
            match self.raft.apply_conf_change(&change) {
                Ok(conf_state) => {
                    self.raft
                        .mut_store()
                        .entries
                        .wl()
                        .set_conf_state(conf_state);
                }
                Err(_) => self.stats.raft_errors += 1,
            }
            self.membership_changed = true;
            self.stats.membership_changes += 1;
            if added {
                self.last_heard_tick.insert(node, self.now_ticks);
                if node == self.config.id && self.joining {
                    self.joined();
                }
            } else {
                self.on_node_down(node);
                if removed_up == Some(node) {
                    // Removed while up: unlike a node the failure detector marks down
                    // (after `down_after_ticks`), its processes may still hold pages;
                    // its copies are void only once they must have given them back.
                    if let Some(at) = self.pending_voids.get_mut(&node) {
                        *at += self.config.revoke_timeout_ticks;
                    }
                }
                self.last_heard_tick.remove(&node);
                self.down_proposed.remove(&node);
            }
        }
        Some((proposal, outcome))
    }

    /// This node, started to join, is a member in its metadata: it serves from now on.
    pub(super) fn joined(&mut self) {
        self.joining = false;
        for (token, request, _) in std::mem::take(&mut self.rejoin_waiting) {
            self.dispatch_request(token, request);
        }
    }

    pub(super) fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.data.is_empty() {
                continue;
            }
            if entry.get_entry_type() == EntryType::EntryConfChange {
                if let Some((proposal, outcome)) = self.apply_membership_entry(&entry) {
                    if proposal.origin == self.config.id {
                        if let Some(pending) = self.proposals.remove(&proposal.proposal_id) {
                            self.complete_proposal(pending.purpose, outcome);
                        }
                    }
                }
                continue;
            }
            if entry.get_entry_type() != EntryType::EntryNormal {
                // Never proposed (joint changes are not used).
                self.stats.raft_errors += 1;
                continue;
            }
            let proposal = match Proposal::decode(&entry.data) {
                // A membership command outside a configuration change (forged): skipped.
                Ok(proposal) if is_membership(&proposal.command) => {
                    self.stats.raft_errors += 1;
                    continue;
                }
                Ok(proposal) => proposal,
                Err(_) => {
                    // Every replica skips the same entry, so they stay identical.
                    self.stats.raft_errors += 1;
                    continue;
                }
            };
            let was_up = match proposal.command {
                Command::MarkDown { node, .. } => self.meta.is_up(node),
                _ => false,
            };
            let executed_before = self.meta.applied_commands;
            let outcome = self.meta.apply(&proposal);
            for space in self.meta.take_destroyed() {
                self.drop_space(space);
            }
            // Every node drops the released run, on its first execution only.
            if let Outcome::Releasing {
                space,
                first_chunk,
                count,
            } = outcome
            {
                if self.meta.applied_commands > executed_before {
                    self.begin_release(space, first_chunk, count);
                }
            }
            // On the Up→Down transition only: a retried or second leader's MarkDown
            // must not postpone the void or rescan the directory again.
            if let Command::MarkDown { node, .. } = proposal.command {
                if was_up && !self.meta.is_up(node) {
                    self.on_node_down(node);
                }
            }
            if let Outcome::Rejoined(node) = outcome {
                self.on_node_rejoined(node);
            }
            if proposal.origin == self.config.id {
                if let Some(pending) = self.proposals.remove(&proposal.proposal_id) {
                    self.complete_proposal(pending.purpose, outcome);
                }
            }
            self.retry_unmapped(false);
        }
    }

    pub(super) fn complete_proposal(&mut self, purpose: Purpose, outcome: Outcome) {
        match (purpose, outcome) {
            (Purpose::CreateSpace { token }, Outcome::SpaceCreated(layout)) => {
                self.adopt_root_chunk(&layout);
                self.reply(token, AppReply::Space(layout));
            }
            (Purpose::CreateSpace { token }, Outcome::SpaceRejected(why)) => {
                self.reply_error(token, AppError::SpaceRejected(why));
            }
            (Purpose::Attach { token }, Outcome::SpaceCreated(layout)) => {
                self.reply(token, AppReply::Space(layout));
            }
            (Purpose::Attach { token }, Outcome::SpaceRejected("unknown space")) => {
                self.reply_error(token, AppError::UnknownSpace);
            }
            (Purpose::Attach { token }, Outcome::SpaceRejected(why)) => {
                self.reply_error(token, AppError::SpaceRejected(why));
            }
            (Purpose::Detach { token }, Outcome::Detached { destroyed, .. }) => {
                self.reply(token, AppReply::Detached { destroyed });
            }
            (
                Purpose::Unpersist { token },
                Outcome::Unpersisted {
                    space: Some(_),
                    destroyed,
                },
            ) => self.reply(token, AppReply::Unpersisted { destroyed }),
            (Purpose::Unpersist { token }, Outcome::Unpersisted { space: None, .. }) => {
                self.reply_error(token, AppError::UnknownSpace)
            }
            (
                Purpose::LeaseForAllocator { space, .. },
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
            (Purpose::LeaseForAllocator { space, count }, _) => {
                self.lease_in_flight.remove(&space);
                // The lease was refused: the head fails only if it needs at least as
                // many chunks (it may have been served since, by a free); the requests
                // behind it may fit what is free or a smaller lease.
                let Some(chunk_size_bytes) =
                    self.meta.spaces.get(&space).map(|l| l.chunk_size_bytes)
                else {
                    // Destroyed: `drop_space` answered the queue.
                    return;
                };
                let queue = self.pending_allocations.entry(space).or_default();
                let head_needs_as_many = queue
                    .front()
                    .is_some_and(|head| head.size_bytes.div_ceil(chunk_size_bytes).max(1) >= count);
                if head_needs_as_many {
                    let head = queue.pop_front().expect("checked");
                    self.reply_error(head.token, AppError::OutOfMemory);
                }
                self.serve_pending_allocations(space);
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
            (Purpose::ReleaseRegion { .. }, Outcome::Releasing { count, .. }) => {
                self.stats.chunks_released += count as u64;
            }
            (Purpose::ReleaseRegion { space, start, len }, _) => {
                // Refused (the space went, or a lease changed): keep the region if the
                // chunks are still ours to carve.
                let me = self.config.id;
                let ours = self.meta.spaces.get(&space).is_some_and(|layout| {
                    let first = (start - layout.base_addr) / layout.chunk_size_bytes;
                    let count = len / layout.chunk_size_bytes;
                    (first..first + count).all(|c| {
                        self.meta.chunk(space, c).is_some_and(|r| r.lessee == me)
                            && self.meta.releasing_run(space, c).is_none()
                    })
                });
                if ours {
                    self.allocators
                        .entry(space)
                        .or_default()
                        .add_region(start, len);
                    self.serve_pending_allocations(space);
                }
            }
            (Purpose::ReleaseDone, _) => {}
            (Purpose::ReleaseForApp { token }, Outcome::Releasing { count, .. }) => {
                self.stats.chunks_released += count as u64;
                self.reply(token, AppReply::Freed);
            }
            (Purpose::ReleaseForApp { token }, Outcome::ReleaseRejected(why)) => {
                self.reply_error(token, AppError::InvalidArgument(why));
            }
            (Purpose::ReleaseForApp { token }, _) => {
                self.reply_error(token, AppError::InvalidArgument("unexpected outcome"))
            }
            (Purpose::MarkDown | Purpose::Rejoin, _) => {}
            (Purpose::Membership { token }, Outcome::MembershipChanged { node, added }) => {
                self.reply(token, AppReply::MembershipChanged { node, added })
            }
            (Purpose::Membership { token }, Outcome::MembershipRejected(why)) => {
                self.reply_error(token, AppError::MembershipRejected(why))
            }
            (Purpose::Membership { token }, _) => {
                self.reply_error(token, AppError::InvalidArgument("unexpected outcome"))
            }
            (
                Purpose::CreateSpace { token }
                | Purpose::Attach { token }
                | Purpose::Detach { token }
                | Purpose::Unpersist { token },
                _,
            ) => self.reply_error(token, AppError::SpaceRejected("unexpected outcome")),
        }
    }

    /// The creator of a space carves from chunk 0, after the root block.
    pub(super) fn adopt_root_chunk(&mut self, layout: &SpaceLayout) {
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

    pub(super) fn detect_down_nodes(&mut self) {
        let now = self.now_ticks;
        let mut suspects = Vec::new();
        let members: Vec<NodeId> = self.meta.nodes.keys().copied().collect();
        for member in members {
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
                .propose(
                    Command::MarkDown {
                        node,
                        incarnation: self.meta.incarnation(node),
                    },
                    Purpose::MarkDown,
                )
                .is_ok()
            {
                self.down_proposed.insert(node);
            }
        }
    }

    /// A restarted node first ends its previous life in the metadata (a `MarkDown` of
    /// the incarnation the metadata has, which voids its copies and moves its chunks
    /// like any crash), then comes back up as this life (`Rejoin`). One step at a time;
    /// proposals retry on their own, and a step refused because the metadata here was
    /// behind is followed by the right one once it caught up.
    pub(super) fn drive_rejoin(&mut self) {
        let me = self.config.id;
        if self.rejoining
            && self.meta.is_up(me)
            && self.meta.incarnation(me) == self.config.incarnation
        {
            // Applied already (learnt from a snapshot that skipped the entry).
            self.on_node_rejoined(me);
            return;
        }
        // Not a member in the metadata it has yet (behind, or it joined and never
        // learnt it): nothing to rejoin until it catches up.
        if !self.rejoining
            || self.leader_id == 0
            || !self.meta.nodes.contains_key(&me)
            || self
                .proposals
                .values()
                .any(|p| matches!(p.purpose, Purpose::Rejoin))
        {
            return;
        }
        let command = if self.meta.is_up(me) {
            Command::MarkDown {
                node: me,
                incarnation: self.meta.incarnation(me),
            }
        } else {
            Command::Rejoin {
                node: me,
                incarnation: self.config.incarnation,
            }
        };
        let _ = self.propose(command, Purpose::Rejoin);
    }

    pub(super) fn update_fence(&mut self) {
        let in_contact = !self.evicted
            && self.is_serving()
            && (self.is_leader
                || self.lease_sent_tick.is_some_and(|t| {
                    self.now_ticks.saturating_sub(t) <= self.config.fence_after_ticks
                }));
        if in_contact != self.fenced {
            return;
        }
        self.fenced = !in_contact;
        if self.fenced {
            // Fenced pages must be revalidated before the applications see them again.
            self.mask_held_pages(true);
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

    /// A run of chunks is being released (every node applies the same entry): drop
    /// every page state of it, answer what waits on its pages, and have the driver
    /// take the pages from the processes and zero them before `ReleaseDone`.
    pub(super) fn begin_release(&mut self, space: SpaceId, first_chunk: u64, count: u32) {
        let Some(layout) = self.meta.spaces.get(&space).cloned() else {
            return;
        };
        let pages_per_chunk = layout.chunk_size_bytes / PAGE_SIZE_BYTES as u64;
        let first_page = first_chunk * pages_per_chunk;
        let pages = count as u64 * pages_per_chunk;
        let start = layout.chunk_addr(first_chunk);
        let still_carved = self.allocators.get(&space).is_some_and(|a| {
            (0..count as u64).any(|i| a.owns(start + i * layout.chunk_size_bytes))
        });
        if still_carved {
            // This node's allocator never proposes a run it still carves: the entry was
            // forged (by a member: peers are authenticated, not trusted). Counted; the run is dropped all
            // the same, as on every other node.
            self.stats.raft_errors += 1;
        }
        let range = PageId {
            space,
            index: first_page,
        }..PageId {
            space,
            index: first_page + pages,
        };
        // Nothing is allocated there any more, unless this node is behind and the run was
        // leased again already: waiters wait for the metadata (bounded).
        for (page_id, token, access) in self.forget_pages(range) {
            let addr = layout.page_addr(page_id.index);
            self.wait_for_metadata(token, space, addr, Some(access));
        }
        let token = self.next_release_token;
        self.next_release_token += 1;
        if self.mutant(Mutant::AckReleaseBeforePagesDropped) {
            self.acknowledge_release(space, first_chunk);
        } else {
            self.releases.insert(token, (space, first_chunk));
        }
        self.actions.push(Action::ReleasePages {
            space,
            first_page,
            pages,
            token,
        });
    }

    /// Forgets this node's state of the pages in `range`: local pages (their request,
    /// revocation and retry entries) and directory entries. Returns the application
    /// requests that waited on those pages, for the caller to answer or park.
    fn forget_pages(
        &mut self,
        range: impl std::ops::RangeBounds<PageId> + Clone,
    ) -> Vec<(PageId, AppToken, Access)> {
        let mut waiting = Vec::new();
        let held: Vec<PageId> = self.pages.range(range.clone()).map(|(&id, _)| id).collect();
        for page_id in held {
            let page = self.pages.remove(&page_id).expect("listed");
            waiting.extend(page.waiters.into_iter().map(|(t, a)| (page_id, t, a)));
            if let Some((token, _)) = page.revoke {
                self.revokes.remove(&token);
            }
            self.requesting.remove(&page_id);
            self.flushing.remove(&page_id);
        }
        let homed: Vec<PageId> = self
            .directory
            .range(range.clone())
            .map(|(&id, _)| id)
            .collect();
        for page_id in homed {
            self.directory.remove(&page_id);
            self.busy.remove(&page_id);
        }
        self.forget_replication(range);
        waiting
    }

    /// The space was destroyed (every node applies the same entry): drop everything
    /// held of it and answer what waits on it. Messages about it that are still in
    /// flight find no page and no chunk, and are rejected like any unknown page.
    pub(super) fn drop_space(&mut self, space: SpaceId) {
        let range = PageId { space, index: 0 }..=PageId {
            space,
            index: u64::MAX,
        };
        self.allocators.remove(&space);
        self.lease_in_flight.remove(&space);
        for waiting in self.pending_allocations.remove(&space).unwrap_or_default() {
            self.reply_error(waiting.token, AppError::UnknownSpace);
        }
        for (_, token, _) in self.forget_pages(range) {
            self.reply_error(token, AppError::UnknownSpace);
        }
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.unmapped)
            .into_iter()
            .partition(|fault| fault.space == space);
        self.unmapped = kept;
        for fault in gone {
            self.reply_error(fault.token, AppError::UnknownSpace);
        }
        let frees: Vec<u64> = self
            .remote_frees
            .iter()
            .filter(|(_, free)| free.space == space)
            .map(|(&id, _)| id)
            .collect();
        for id in frees {
            let free = self.remote_frees.remove(&id).expect("listed");
            self.reply_error(free.token, AppError::UnknownSpace);
        }
        debug_assert!(self.revokes.values().all(|page| page.space != space));
        self.releases.retain(|_, (s, _)| *s != space);
        self.release_acks_due.retain(|(s, _)| *s != space);
        self.actions.push(Action::DropSpace { space });
    }

    pub(super) fn on_node_down(&mut self, node: NodeId) {
        if node == self.config.id {
            // While rejoining, the life marked down is an earlier one.
            if !self.rejoining {
                self.evict_self();
            }
            return;
        }
        // Home side: the node's copies become void, but not at once: a leader may have
        // renewed its lease until the mark-down committed, so it may read its copies
        // for up to a lease period more. Until then invalidations keep waiting for it.
        let void_at =
            self.now_ticks + self.config.fence_after_ticks + self.config.lease_interval_ticks;
        self.pending_voids.insert(node, void_at);
        // Local side: requests to it go to the page's new home (the entry that marked
        // it down moved its chunks, `MetaState::rehome_chunks_of`), or fail.
        let affected: Vec<PageId> = self
            .pages
            .iter()
            .filter(|(_, p)| p.request.as_ref().is_some_and(|r| r.home == node))
            .map(|(&id, _)| id)
            .collect();
        for page_id in affected {
            let page = self.pages.get_mut(&page_id).expect("listed");
            page.request = None;
            self.requesting.remove(&page_id);
            self.advance_local(page_id);
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

    /// `node` came back up as a new life (its previous one was marked down first, so
    /// its copies are void or pending void, and its chunks have new homes).
    fn on_node_rejoined(&mut self, node: NodeId) {
        if node == self.config.id {
            if self.rejoining && self.meta.incarnation(node) == self.config.incarnation {
                self.rejoining = false;
                self.stats.rejoins += 1;
                for (token, request, _) in std::mem::take(&mut self.rejoin_waiting) {
                    self.dispatch_request(token, request);
                }
            }
            return;
        }
        // It may be marked down again if it goes silent again.
        self.down_proposed.remove(&node);
        self.last_heard_tick.insert(node, self.now_ticks);
    }

    /// Takes the applications' access to every page this node holds (the node keeps
    /// what it holds); `unvalidate` also marks each page as needing revalidation.
    fn mask_held_pages(&mut self, unvalidate: bool) {
        let held: Vec<PageId> = self.held_pages().map(|(page, _)| page).collect();
        for page in held {
            if unvalidate {
                self.pages.get_mut(&page).expect("held").validated = false;
            }
            self.actions.push(Action::SetAccess {
                page,
                access: Access::None,
            });
        }
    }

    pub(super) fn evict_self(&mut self) {
        if self.evicted {
            return;
        }
        self.evicted = true;
        self.fail_syncs(AppError::Evicted);
        for page_id in std::mem::take(&mut self.flushing) {
            if let Some(page) = self.pages.get_mut(&page_id) {
                page.flush = None;
                page.flush_wanted = false;
            }
        }
        self.mask_held_pages(false);
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
                Purpose::CreateSpace { token }
                | Purpose::LeaseForApp { token }
                | Purpose::ReleaseForApp { token }
                | Purpose::Attach { token }
                | Purpose::Detach { token }
                | Purpose::Membership { token }
                | Purpose::Unpersist { token } => self.reply_error(token, AppError::Evicted),
                Purpose::LeaseForAllocator { .. }
                | Purpose::ReleaseRegion { .. }
                | Purpose::ReleaseDone => {}
                Purpose::MarkDown | Purpose::Rejoin => {
                    self.proposals.insert(id, proposal);
                }
            }
        }
        self.lease_in_flight.clear();
    }

    /// Voids the copies of nodes marked down once their last lease has expired.
    pub(super) fn void_due(&mut self) {
        let due: Vec<NodeId> = self
            .pending_voids
            .iter()
            .filter(|(_, &at)| at <= self.now_ticks)
            .map(|(&node, _)| node)
            .collect();
        let voided = !due.is_empty();
        for node in due {
            self.pending_voids.remove(&node);
            let pages: Vec<PageId> = self.directory.keys().copied().collect();
            for page in pages {
                self.directory_node_down(page, node);
            }
        }
        if voided {
            self.hint_recovered_pages();
        }
        if voided && self.pending_voids.is_empty() {
            // Recovered pages whose collect waited for the voids.
            let waiting: Vec<PageId> = self
                .directory
                .iter()
                .filter(|(_, e)| e.needs_collect && e.txn.is_none() && !e.queue.is_empty())
                .map(|(&id, _)| id)
                .collect();
            for page in waiting {
                self.home_next(page);
            }
        }
    }
}
