//! The home side: the directory of each page this node manages, one transaction
//! per page at a time.

use super::*;

impl Node {
    // -----------------------------------------------------------------------------
    // Home side.

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
        let members = self.config.members.len();
        let entry = self.directory.entry(page_id).or_insert_with(DirEntry::new);
        let newest = entry.newest_request.entry(request.from).or_insert(0);
        if request.request_id < *newest {
            self.stats.messages_rejected += 1;
            return;
        }
        *newest = request.request_id;
        if entry.lost {
            self.deny_lost(page_id, request.from, request.request_id);
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

    pub(super) fn home_start(&mut self, page_id: PageId, request: PageRequestInfo) {
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
                    retry: RetrySchedule::starting(self.now_ticks, self.config.retry_base_ticks),
                });
                self.busy.insert(page_id);
                self.send_phase(page_id, &phase);
            }
        }
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
    pub(super) fn home_continue(&mut self, page_id: PageId, request: PageRequestInfo) {
        if !self.meta.is_up(request.from) {
            self.home_next(page_id);
            return;
        }
        self.home_start(page_id, request);
    }

    /// Tells a requester its page is lost (its only latest copy was on a down node).
    pub(super) fn deny_lost(&mut self, page_id: PageId, to: NodeId, request_id: u64) {
        self.send(
            to,
            PeerMessage::PageDenied {
                page: page_id,
                request_id,
                reason: PageDenial::Lost,
            },
        );
    }

    pub(super) fn deny_queue(&mut self, page_id: PageId) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let queued: Vec<PageRequestInfo> = entry.queue.drain(..).collect();
        for request in queued {
            self.deny_lost(page_id, request.from, request.request_id);
        }
    }

    pub(super) fn directory_node_down(&mut self, page_id: PageId, node: NodeId) {
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
                self.deny_lost(page_id, txn.request.from, txn.request.request_id);
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
