//! The home side: the directory of each page this node manages, one transaction
//! per page at a time.

use super::*;

impl Node {
    // -----------------------------------------------------------------------------
    // Home side.

    /// A request for the page, or a flush of it (`request.flush`): admitted into the
    /// page's queue (one of each kind per node, the newer replacing the older), or
    /// started at once.
    pub(super) fn home_request(&mut self, page_id: PageId, request: PageRequestInfo) {
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
        if self.pending_voids.contains_key(&request.from) {
            // A node that rejoined before its earlier life's copies are void here: this
            // directory may still list that life's copies as its own. It asks again.
            return;
        }
        let members = self.meta.nodes.len().max(1);
        if !self.directory.contains_key(&page_id) {
            // Only a new entry asks whether its chunk was recovered.
            let entry = DirEntry {
                needs_collect: self.chunk_recovered(page_id),
                ..DirEntry::new()
            };
            self.directory.insert(page_id, entry);
        }
        let entry = self.directory.get_mut(&page_id).expect("present");
        let is_flush = request.flush.is_some();
        if is_flush
            && entry
                .flush_acked
                .get(&request.from)
                .is_some_and(|&acked| request.request_id <= acked)
        {
            // Acknowledged already: the ack was lost.
            let message = PeerMessage::FlushAck {
                page: page_id,
                request_id: request.request_id,
            };
            return self.send(request.from, message);
        }
        let newest_of_kind = if is_flush {
            &mut entry.newest_flush
        } else {
            &mut entry.newest_request
        };
        let newest = newest_of_kind.entry(request.from).or_insert(0);
        if request.request_id < *newest {
            self.stats.messages_rejected += 1;
            return;
        }
        *newest = request.request_id;
        if entry.lost {
            // A flush of it too: nothing to keep, and the sync says so.
            self.deny_lost(page_id, &request);
            return;
        }
        if let Some(txn) = &entry.txn {
            if txn.request.from == request.from && txn.request.request_id == request.request_id {
                return;
            }
            entry
                .queue
                .retain(|q| q.from != request.from || q.flush.is_some() != is_flush);
            if entry.queue.len() < members * MAX_QUEUED_PER_PAGE_PER_MEMBER {
                entry.queue.push_back(request);
            }
            return;
        }
        self.home_start(page_id, request);
    }

    /// Whether the page's chunk was moved off a home that went down: its directory
    /// entries start from what the survivors hold.
    pub(super) fn chunk_recovered(&self, page_id: PageId) -> bool {
        let Some(layout) = self.meta.spaces.get(&page_id.space) else {
            return false;
        };
        self.meta
            .chunk(page_id.space, layout.chunk_of_page(page_id.index))
            .is_some_and(|record| record.recovered(&self.meta))
    }

    pub(super) fn home_start(&mut self, page_id: PageId, request: PageRequestInfo) {
        let skip_invalidate = self.mutant(Mutant::GrantWriteWithoutInvalidate);
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        assert!(entry.txn.is_none());
        if entry.needs_collect {
            if !self.pending_voids.is_empty() {
                // A node marked down may still read its copies until its void is due,
                // and the old home may be among them: collect only after every void
                // (`void_due` starts the queue again).
                // Its older request (or flush) of the same kind gives way to this one.
                entry.queue.retain(|q| {
                    q.from != request.from || q.flush.is_some() != request.flush.is_some()
                });
                entry.queue.push_front(request);
                return;
            }
            entry.seq += 1;
            let phase = Phase::Collect {
                seq: entry.seq,
                pending: self.meta.up_nodes().collect(),
                reports: BTreeMap::new(),
            };
            self.stats.pages_collected += 1;
            return self.home_begin_phase(page_id, request, phase);
        }
        if request.repair {
            return self.home_repair_start(page_id, request);
        }
        if request.flush.is_some() {
            return self.home_flush_start(page_id, request);
        }
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
        // Before its contents reach another node's applications, they are on k nodes
        // (not for a re-grant to the writer: its contents are its own).
        // Nor for contents its own node's processes wrote: they reach no other node.
        let own = entry.writer == Some(requester) || entry.master_origin == Some(requester);
        let phase = match phase {
            None if !own => self.replicate_phase(page_id, Some(requester)),
            phase => phase,
        };
        match phase {
            None => self.home_grant(page_id, request),
            Some(phase) => self.home_begin_phase(page_id, request, phase),
        }
    }

    pub(super) fn home_begin_phase(
        &mut self,
        page_id: PageId,
        request: PageRequestInfo,
        phase: Phase,
    ) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        entry.txn = Some(Transaction {
            request,
            phase: phase.clone(),
            retry: RetrySchedule::starting(self.now_ticks, self.config.retry_base_ticks),
        });
        self.busy.insert(page_id);
        self.send_phase(page_id, &phase);
    }

    pub(super) fn send_phase(&mut self, page_id: PageId, phase: &Phase) {
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
            Phase::Collect { seq, pending, .. } => {
                for &node in pending {
                    self.send(
                        node,
                        PeerMessage::Collect {
                            page: page_id,
                            seq: *seq,
                        },
                    );
                }
            }
            Phase::Replicate { seq, pending } => self.send_backups(page_id, *seq, pending),
        }
    }

    /// Grants the request; no other node may hold a conflicting copy any more.
    pub(super) fn home_grant(&mut self, page_id: PageId, request: PageRequestInfo) {
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
                // Not a holder: only a node that said it has the bytes counts for
                // later (a grant may be lost; this one was counted before it went).
                entry.readers.insert(requester);
                (Access::Read, entry.version, entry.version)
            }
            (None, _) => {
                assert!(
                    entry.readers.iter().all(|&r| r == requester),
                    "write grant next to readers"
                );
                entry.readers.clear();
                // Its memory will hold its own writes, not the master's contents.
                entry.holders.remove(&requester);
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
            Some(entry.master_bytes())
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
    pub(super) fn home_next(&mut self, page_id: PageId) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        if entry.txn.is_some() {
            return;
        }
        self.busy.remove(&page_id);
        // A lost page has no transaction and an empty queue: losing it drained both.
        debug_assert!(!entry.lost || entry.queue.is_empty());
        if let Some(next) = entry.queue.pop_front() {
            self.home_start(page_id, next);
        }
    }

    pub(super) fn home_invalidate_ack(&mut self, from: NodeId, page_id: PageId, seq: u64) {
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

    pub(super) fn home_recall_ack(
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
        let had_bytes = bytes.is_some();
        if let Some(bytes) = bytes {
            if version != entry.version {
                self.stats.messages_rejected += 1;
            }
            entry.master = Some(bytes);
            // The version's final contents, here and in the old writer's memory.
            entry.master_order = (entry.version, FINAL_CONTENTS);
            entry.master_origin = Some(from);
            entry.holders = BTreeSet::from([from]);
            if downgrade {
                entry.readers.insert(from);
            }
        }
        entry.writer = None;
        let txn = entry.txn.take().expect("present");
        if std::mem::take(&mut entry.master_unknown) && !had_bytes {
            // A recovered writer that turned out never to have written, and no older
            // copy survived: nothing to serve.
            entry.lost = true;
            self.stats.pages_lost += 1;
            self.busy.remove(&page_id);
            self.deny_lost(page_id, &txn.request);
            self.deny_queue(page_id);
            return;
        }
        self.home_continue(page_id, txn.request);
    }

    pub(super) fn home_collect_ack(
        &mut self,
        from: NodeId,
        page_id: PageId,
        seq: u64,
        report: CopyReport,
    ) {
        // Peers are not authenticated: a report no honest node sends (counters near
        // overflow, a writer without a written version) is dropped, so it cannot make
        // the rebuilt entry's arithmetic overflow later.
        let sane = report.seq_seen < u64::MAX / 2
            && report.version.is_none_or(|v| v < u64::MAX / 2)
            && report
                .backup
                .as_ref()
                .is_none_or(|b| b.version < u64::MAX / 2)
            && (report.held != Access::Write || report.version.is_some_and(|v| v > 0));
        let Some(entry) = self.directory.get_mut(&page_id).filter(|_| sane) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let Some(Transaction {
            phase:
                Phase::Collect {
                    seq: want,
                    pending,
                    reports,
                },
            ..
        }) = entry.txn.as_mut()
        else {
            return;
        };
        if *want != seq || !pending.remove(&from) {
            return;
        }
        reports.insert(from, report);
        if pending.is_empty() {
            self.home_rebuild(page_id);
        }
    }

    /// Every node up has said what it holds of a recovered page: rebuild its directory
    /// entry. Every copy a node holds (accessible or not, in memory or as a backup) has
    /// the bytes of where it stands (`BackupCopy::order`), and that only grows, so the
    /// newest copy holds every write a survivor saw or a sync covered:
    /// - a node that holds the page for writing is its writer (no one else can
    ///   access it); the newest other copy becomes the master it would revert to;
    /// - else the newest copy is the master and the nodes holding it readable are its
    ///   readers;
    /// - no copy at all: the page is lost.
    fn home_rebuild(&mut self, page_id: PageId) {
        let oldest_copy = self.mutant(Mutant::RecoverFromOldestCopy);
        let skip_writer = self.mutant(Mutant::RecoverIgnoresWriter);
        let skip_backups = self.mutant(Mutant::RecoverIgnoresBackups);
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let txn = entry.txn.take().expect("collecting");
        let Phase::Collect { reports, .. } = txn.phase else {
            unreachable!("rebuild after a collect only")
        };
        // Newer than anything the old home said, so no node takes what this home says
        // next for a retransmission or a stale message.
        let newest_seen = reports.values().map(|r| r.seq_seen).max().unwrap_or(0);
        entry.seq = entry.seq.max(newest_seen) + 1;
        entry.needs_collect = false;
        let writer = reports
            .iter()
            .find(|(_, r)| r.held == Access::Write && r.version.is_some() && !skip_writer)
            .map(|(&node, r)| (node, r.version.expect("checked")));
        // Every copy but the writer's memory: memories hold their version's final
        // contents; backups say where they stand themselves.
        let mut copies: Vec<((u64, u64), NodeId, &PageBytes)> = Vec::new();
        for (&node, report) in &reports {
            if let (false, Some(version), Some(bytes)) = (
                Some(node) == writer.map(|w| w.0),
                report.version,
                report.bytes.as_deref(),
            ) {
                copies.push(((version, FINAL_CONTENTS), node, bytes));
            }
            if let (false, Some(backup)) = (skip_backups, &report.backup) {
                copies.push((backup.order(), node, &backup.bytes));
            }
        }
        copies.retain(|&((version, _), _, _)| writer.is_none_or(|(_, wv)| version <= wv));
        copies.sort_unstable_by_key(|&(order, node, _)| (order, node));
        let newest = if oldest_copy {
            copies.first()
        } else {
            copies.last()
        };
        let newest = newest.map(|&(order, _, bytes)| (order, Box::new(*bytes)));
        let holders: BTreeSet<NodeId> = match &newest {
            Some((order, _)) => copies
                .iter()
                .filter(|(o, node, _)| o == order && *node != self.config.id)
                .map(|&(_, node, _)| node)
                .collect(),
            None => BTreeSet::new(),
        };
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        match (writer, newest) {
            (Some((node, version)), newest) => {
                entry.writer = Some(node);
                entry.version = version;
                entry.master_unknown = newest.is_none();
                entry.master_order = newest
                    .as_ref()
                    .map_or((version.saturating_sub(1), FINAL_CONTENTS), |(o, _)| *o);
                entry.master = newest.map(|(_, bytes)| bytes);
                entry.holders = holders;
            }
            (None, Some((order, bytes))) => {
                if order.1 == FINAL_CONTENTS {
                    entry.version = order.0;
                    entry.readers = reports
                        .iter()
                        .filter(|(_, r)| r.held == Access::Read && r.version == Some(order.0))
                        .map(|(&node, _)| node)
                        .collect();
                } else {
                    // A flush of a writer that went down: the next version, which no
                    // memory holds (a copy of that version's later writes cannot pass
                    // for it).
                    entry.version = order.0 + 1;
                }
                entry.master_order = (entry.version, FINAL_CONTENTS);
                entry.master = Some(bytes);
                entry.holders = holders;
            }
            (None, None) => {
                entry.lost = true;
                self.stats.pages_lost += 1;
            }
        }
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        entry.check_invariants();
        if entry.lost {
            self.busy.remove(&page_id);
            self.deny_lost(page_id, &txn.request);
            self.deny_queue(page_id);
            return;
        }
        self.stats.pages_recovered += 1;
        self.home_continue(page_id, txn.request);
    }

    /// After a phase completes, run the request again from the top: it either needs
    /// another phase (a write after recalling the writer must still invalidate) or is
    /// granted.
    pub(super) fn home_continue(&mut self, page_id: PageId, request: PageRequestInfo) {
        if !self.meta.is_up(request.from) {
            self.home_next(page_id);
            return;
        }
        self.home_start(page_id, request);
    }

    /// Tells a requester its page is lost (its only latest copy was on a down node).
    /// A repair has nobody to tell.
    pub(super) fn deny_lost(&mut self, page_id: PageId, request: &PageRequestInfo) {
        if request.repair {
            return;
        }
        self.send(
            request.from,
            PeerMessage::PageDenied {
                page: page_id,
                request_id: request.request_id,
                reason: PageDenial::Lost,
            },
        );
    }

    pub(super) fn deny_queue(&mut self, page_id: PageId) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let queued: Vec<PageRequestInfo> = entry.queue.drain(..).collect();
        for request in queued {
            self.deny_lost(page_id, &request);
        }
    }

    pub(super) fn directory_node_down(&mut self, page_id: PageId, node: NodeId) {
        let entry = self.directory.get_mut(&page_id).expect("listed");
        // A copy of the master may have gone with it (a holder's; a reader's, a
        // writer's or a flusher's, never remembered as holders, though a grant may
        // have counted them): `run_repairs` counts the copies again.
        let was_reader = entry.readers.remove(&node);
        let had_copy = entry.holders.remove(&node)
            || was_reader
            || entry.writer == Some(node)
            || entry.master_origin == Some(node);
        if had_copy {
            self.repairs_due.insert(page_id);
        }
        let entry = self.directory.get_mut(&page_id).expect("listed");
        // Its life ended: a later life of it is another node for the contents.
        if entry.master_origin == Some(node) {
            entry.master_origin = None;
        }
        entry.queue.retain(|q| q.from != node);
        if entry.writer == Some(node) {
            // Its writes since the grant were only there, and no other node saw them:
            // go back to the master, the last contents that left a writer (the next
            // version, so no copy of the lost writes can pass for current). Lost only
            // if the master itself did not survive a recovery.
            entry.writer = None;
            if entry.master_unknown {
                entry.lost = true;
                self.stats.pages_lost += 1;
            } else {
                entry.version += 1;
                // The master (the last contents that left a writer, or its last flush)
                // is this version's final contents now.
                entry.master_order = (entry.version, FINAL_CONTENTS);
                self.stats.pages_reverted += 1;
            }
            entry.master_unknown = false;
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
                self.deny_lost(page_id, &txn.request);
            }
            self.busy.remove(&page_id);
            self.deny_queue(page_id);
            return;
        }
        // A transaction whose requester went down still finishes its phase: a writer
        // may already have given up its copy, and its ack carries the latest bytes.
        // `home_continue` then skips the grant.
        let replicate = matches!(txn.phase, Phase::Replicate { .. });
        match txn.phase {
            Phase::Recall { from, .. } if from == node => {
                // The writer is gone without answering: the master is the latest now.
                self.home_continue(page_id, txn.request);
            }
            Phase::Collect {
                seq,
                mut pending,
                mut reports,
            } => {
                // Its copy is void like every other copy of a node down.
                pending.remove(&node);
                reports.remove(&node);
                let done = pending.is_empty();
                let entry = self.directory.get_mut(&page_id).expect("listed");
                entry.txn = Some(Transaction {
                    phase: Phase::Collect {
                        seq,
                        pending,
                        reports,
                    },
                    ..txn
                });
                if done {
                    self.home_rebuild(page_id);
                }
            }
            // Its ack will not come. An invalidation waits for the others; a
            // replication is counted again from the top (another node takes its place).
            Phase::Invalidate { seq, mut pending } | Phase::Replicate { seq, mut pending } => {
                pending.remove(&node);
                if pending.is_empty() {
                    self.home_continue(page_id, txn.request);
                } else {
                    let phase = if replicate {
                        Phase::Replicate { seq, pending }
                    } else {
                        Phase::Invalidate { seq, pending }
                    };
                    let entry = self.directory.get_mut(&page_id).expect("listed");
                    entry.txn = Some(Transaction { phase, ..txn });
                }
            }
            phase @ Phase::Recall { .. } => {
                let entry = self.directory.get_mut(&page_id).expect("listed");
                entry.txn = Some(Transaction { phase, ..txn });
            }
        }
    }
}
