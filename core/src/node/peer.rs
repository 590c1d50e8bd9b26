//! Peer messages: dispatch, and the requesting side's handling of grants,
//! denials, invalidations, recalls and remote frees.

use super::*;

impl Node {
    // -----------------------------------------------------------------------------
    // Peer messages.

    /// A message off the network (or the loopback): from a member, so it counts as
    /// hearing from that member.
    pub(super) fn handle_envelope(&mut self, envelope: Envelope) {
        let Envelope {
            from,
            from_incarnation,
            to,
            to_incarnation,
            message,
        } = envelope;
        if to != self.config.id || !self.is_member(from) {
            self.stats.messages_rejected += 1;
            return;
        }
        self.last_heard_tick.insert(from, self.now_ticks);
        // Raft copes with messages of any life (its state is on the sender's disk);
        // everything else is about pages and threads of the life the metadata names.
        // The loopback is always of this life (the metadata may not have it yet).
        let of_other_life = from != self.config.id
            && (from_incarnation != self.meta.incarnation(from)
                || to_incarnation != self.config.incarnation);
        if of_other_life && !matches!(message, PeerMessage::Raft(_)) {
            self.stats.messages_other_life += 1;
            return;
        }
        self.dispatch(from, message);
    }

    /// Handles an accepted message; also replays messages deferred during a revocation,
    /// which say nothing about whether their sender is alive now.
    pub(super) fn dispatch(&mut self, from: NodeId, message: PeerMessage) {
        if (self.evicted || !self.is_serving())
            && !matches!(
                message,
                PeerMessage::Raft(_) | PeerMessage::LeaseRequest { .. }
            )
        {
            return;
        }
        match message {
            PeerMessage::Raft(bytes) => self.handle_raft(from, &bytes),
            PeerMessage::PageRequest {
                page,
                request_id,
                mode,
                have_version,
            } => self.home_request(
                page,
                PageRequestInfo {
                    from,
                    request_id,
                    mode,
                    have_version,
                    flush: None,
                    repair: false,
                },
            ),
            PeerMessage::PageGrant {
                page,
                request_id,
                seq,
                mode,
                version,
                base_version,
                bytes,
            } => self.on_grant(
                from,
                page,
                request_id,
                seq,
                mode,
                version,
                base_version,
                bytes,
            ),
            PeerMessage::PageDenied {
                page,
                request_id,
                reason,
            } => self.on_denied(from, page, request_id, reason),
            PeerMessage::Invalidate { page, seq } => self.on_invalidate(from, page, seq),
            PeerMessage::InvalidateAck { page, seq } => self.home_invalidate_ack(from, page, seq),
            PeerMessage::Recall {
                page,
                seq,
                downgrade,
            } => self.on_recall(from, page, seq, downgrade),
            PeerMessage::RecallAck {
                page,
                seq,
                version,
                bytes,
            } => self.home_recall_ack(from, page, seq, version, bytes),
            PeerMessage::Collect { page, seq } => self.on_collect(from, page, seq),
            PeerMessage::CollectAck { page, seq, report } => {
                self.home_collect_ack(from, page, seq, report)
            }
            PeerMessage::Flush {
                page,
                request_id,
                version,
                bytes,
            } => self.home_flush(from, page, request_id, FlushData { version, bytes }),
            PeerMessage::FlushAck { page, request_id } => self.on_flush_ack(from, page, request_id),
            PeerMessage::Backup { page, seq, copy } => self.on_backup(from, page, seq, copy),
            PeerMessage::BackupAck { page, seq } => self.home_backup_ack(from, page, seq),
            PeerMessage::RepairHint { page } => self.home_repair_hint(from, page),
            PeerMessage::FreeRequest {
                space,
                addr,
                request_id,
                oldest_in_flight,
            } => self.on_free_request(from, space, addr, request_id, oldest_in_flight),
            PeerMessage::FreeReply {
                request_id,
                outcome,
            } => self.on_free_reply(from, request_id, outcome),
            PeerMessage::LeaseRequest { sent_tick } => {
                // Never to a node this leader is marking down or that is down.
                if self.is_leader && self.meta.is_up(from) && !self.down_proposed.contains(&from) {
                    self.send(from, PeerMessage::LeaseGrant { sent_tick });
                }
            }
            PeerMessage::LeaseGrant { sent_tick } => {
                if sent_tick <= self.now_ticks {
                    self.lease_sent_tick = Some(self.lease_sent_tick.unwrap_or(0).max(sent_tick));
                } else {
                    self.stats.messages_rejected += 1;
                }
            }
            // Not the node's business: the host's program layer handles it.
            PeerMessage::Program(message) => self.actions.push(Action::Program { from, message }),
            PeerMessage::Futex(message) => self.actions.push(Action::Futex { from, message }),
        }
    }

    /// A message from `from` about `page` is only meaningful if `from` is its home.
    pub(super) fn sent_by_home(&self, from: NodeId, page: PageId) -> bool {
        self.home_of(page) == Some(from)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_grant(
        &mut self,
        from: NodeId,
        page_id: PageId,
        request_id: u64,
        seq: u64,
        mode: Access,
        version: u64,
        base_version: u64,
        bytes: Option<Box<PageBytes>>,
    ) {
        let accept_stale = self.mutant(Mutant::AcceptStaleGrant);
        let fenced_or_evicted = self.fenced || self.evicted;
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let message = PeerMessage::PageGrant {
            page: page_id,
            request_id,
            seq,
            mode,
            version,
            base_version,
            bytes,
        };
        if self.defer_during_revoke(page_id, from, &message) {
            return;
        }
        let PeerMessage::PageGrant { bytes, .. } = message else {
            unreachable!()
        };
        let Some(page) = self.pages.get_mut(&page_id) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let matches = page
            .request
            .as_ref()
            .is_some_and(|r| r.request_id == request_id && r.mode <= mode);
        if !matches || (seq <= page.seq_seen && !accept_stale) {
            // A duplicate or a grant overtaken by a newer invalidation.
            self.stats.messages_rejected += 1;
            return;
        }
        if bytes.is_none() && page.have_version() != Some(base_version) {
            // The home thinks our bytes are current and they are not: ask again with
            // nothing claimed. Happens only after a protocol anomaly; never install.
            self.stats.messages_rejected += 1;
            page.mem_version = None;
            page.installed = true;
            page.request = None;
            self.requesting.remove(&page_id);
            self.advance_local(page_id);
            return;
        }
        page.seq_seen = page.seq_seen.max(seq);
        page.held = mode;
        // Its applications may write from now: a sync must flush it.
        page.clean = false;
        page.written |= mode == Access::Write;
        // A grant that lands while fenced is as suspect as any older one.
        page.validated = !fenced_or_evicted;
        page.mem_version = Some(version);
        page.installed = true;
        page.request = None;
        page.last_recall_ack = None;
        self.requesting.remove(&page_id);
        let access = if fenced_or_evicted {
            Access::None
        } else {
            mode
        };
        self.actions.push(Action::Install {
            page: page_id,
            access,
            version,
            bytes,
        });
        self.advance_local(page_id);
    }

    pub(super) fn on_denied(
        &mut self,
        from: NodeId,
        page_id: PageId,
        request_id: u64,
        reason: PageDenial,
    ) {
        let flush_lost = self.sent_by_home(from, page_id)
            && reason == PageDenial::Lost
            && self
                .pages
                .get(&page_id)
                .is_some_and(|p| p.flush.as_ref().is_some_and(|f| f.request_id == request_id));
        if flush_lost {
            return self.flush_lost(page_id);
        }
        let matches = self.sent_by_home(from, page_id)
            && self.pages.get(&page_id).is_some_and(|p| {
                p.request
                    .as_ref()
                    .is_some_and(|r| r.request_id == request_id)
            });
        if !matches {
            self.stats.messages_rejected += 1;
            return;
        }
        let error = match reason {
            PageDenial::Lost => AppError::PageLost,
            PageDenial::NotMapped => AppError::NotMapped,
        };
        self.fail_local_page(page_id, error);
    }

    pub(super) fn on_invalidate(&mut self, from: NodeId, page_id: PageId, seq: u64) {
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let ack_early = self.mutant(Mutant::AckInvalidateBeforeRevoke);
        let page = self.pages.entry(page_id).or_insert_with(LocalPage::new);
        if seq < page.seq_seen {
            self.stats.messages_rejected += 1;
            return;
        }
        if seq == page.seq_seen {
            // A retransmission: ack again unless the revoke is still running.
            if page.revoke.is_none() {
                self.send(from, PeerMessage::InvalidateAck { page: page_id, seq });
            }
            return;
        }
        if page.revoke.is_some() {
            self.defer_during_revoke(
                page_id,
                from,
                &PeerMessage::Invalidate { page: page_id, seq },
            );
            return;
        }
        let page = self.pages.get_mut(&page_id).expect("present");
        page.seq_seen = seq;
        // Only a recall of this seq could be answered again: an older ack (and its
        // page copy) is dead weight from here.
        page.last_recall_ack = None;
        if page.held == Access::Write {
            // The home would recall a writer, not invalidate it: a stale view. Revoke
            // anyway; safety first.
            self.stats.messages_rejected += 1;
        }
        let was = page.held;
        page.held = Access::None;
        page.clean = false;
        if was == Access::None {
            self.send(from, PeerMessage::InvalidateAck { page: page_id, seq });
            return;
        }
        self.start_revoke(
            page_id,
            RevokeReply::InvalidateAck { seq },
            Access::None,
            false,
        );
        if ack_early {
            self.send(from, PeerMessage::InvalidateAck { page: page_id, seq });
        }
    }

    pub(super) fn on_recall(&mut self, from: NodeId, page_id: PageId, seq: u64, downgrade: bool) {
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let page = self.pages.entry(page_id).or_insert_with(LocalPage::new);
        if seq < page.seq_seen {
            self.stats.messages_rejected += 1;
            return;
        }
        if seq == page.seq_seen {
            if page.revoke.is_none() {
                if let Some((ack_seq, version, bytes)) = page.last_recall_ack.clone() {
                    if ack_seq == seq {
                        self.send(
                            from,
                            PeerMessage::RecallAck {
                                page: page_id,
                                seq,
                                version,
                                bytes,
                            },
                        );
                    }
                }
            }
            return;
        }
        if page.revoke.is_some() {
            let message = PeerMessage::Recall {
                page: page_id,
                seq,
                downgrade,
            };
            self.defer_during_revoke(page_id, from, &message);
            return;
        }
        let page = self.pages.get_mut(&page_id).expect("present");
        page.seq_seen = seq;
        // Only a recall of this seq could be answered again: an older ack (and its
        // page copy) is dead weight from here.
        page.last_recall_ack = None;
        // A node that never received its write grant never wrote: the home's copy is
        // the latest, and any read copy it still has is unknown to the home, so drop it.
        let (to, with_bytes) = if page.held == Access::Write {
            (
                if downgrade {
                    Access::Read
                } else {
                    Access::None
                },
                true,
            )
        } else {
            (Access::None, false)
        };
        let was = page.held;
        page.held = to;
        page.clean = false;
        if was == Access::None {
            let version = page.mem_version.unwrap_or(0);
            page.last_recall_ack = Some((seq, version, None));
            self.send(
                from,
                PeerMessage::RecallAck {
                    page: page_id,
                    seq,
                    version,
                    bytes: None,
                },
            );
            return;
        }
        let access = if page.validated {
            self.effective(to)
        } else {
            Access::None
        };
        self.start_revoke(
            page_id,
            RevokeReply::RecallAck { seq, with_bytes },
            access,
            with_bytes,
        );
    }

    /// The new home of a recovered page asks what this node holds of it. Answered only
    /// once this node also takes `from` for the home: it has then applied the entry
    /// that moved the chunk and ignores the old home, so what it reports stays true.
    /// A copy's bytes are read through a revocation to the access the applications
    /// already have (nothing changes for them; the host reads the page once every
    /// earlier access change is done). A writer sends no bytes: they still change.
    pub(super) fn on_collect(&mut self, from: NodeId, page_id: PageId, seq: u64) {
        if !self.sent_by_home(from, page_id) {
            self.stats.messages_rejected += 1;
            return;
        }
        let message = PeerMessage::Collect { page: page_id, seq };
        if self.defer_during_revoke(page_id, from, &message) {
            return;
        }
        let report = match self.pages.get(&page_id) {
            None => None,
            Some(page) => {
                let version = page.copy_version();
                if page.held != Access::Write && version.is_some() {
                    let access = self.page_access(page);
                    self.start_revoke(page_id, RevokeReply::CollectAck { seq }, access, true);
                    return;
                }
                Some((page.held, version, page.seq_seen))
            }
        };
        let (held, version, seq_seen) = report.unwrap_or((Access::None, None, 0));
        let report = CopyReport {
            held,
            version,
            seq_seen,
            bytes: None,
            backup: self.backups.get(&page_id).cloned(),
        };
        self.send(
            from,
            PeerMessage::CollectAck {
                page: page_id,
                seq,
                report,
            },
        );
    }

    /// A home asks this node to keep a copy of its page for recovery. Kept if newer
    /// than the one it has; acknowledged either way (the home counts this node).
    pub(super) fn on_backup(&mut self, from: NodeId, page_id: PageId, seq: u64, copy: BackupCopy) {
        // A version no honest home reaches (its arithmetic would overflow later).
        if !self.sent_by_home(from, page_id) || copy.version >= u64::MAX / 2 {
            self.stats.messages_rejected += 1;
            return;
        }
        let newer = self
            .backups
            .get(&page_id)
            .is_none_or(|kept| kept.order() <= copy.order());
        if newer {
            if !self.backups.contains_key(&page_id) {
                self.stats.backups_kept += 1;
            }
            self.backups.insert(page_id, copy);
        }
        self.send(from, PeerMessage::BackupAck { page: page_id, seq });
    }

    /// The home made this node's flush durable.
    pub(super) fn on_flush_ack(&mut self, from: NodeId, page_id: PageId, request_id: u64) {
        let matches = self.sent_by_home(from, page_id)
            && self
                .pages
                .get(&page_id)
                .is_some_and(|p| p.flush.as_ref().is_some_and(|f| f.request_id == request_id));
        if !matches {
            self.stats.messages_rejected += 1;
            return;
        }
        let page = self.pages.get_mut(&page_id).expect("checked");
        page.flush = None;
        page.flushes_acked = page.flushes_started;
        self.flushing.remove(&page_id);
        self.flush_done(page_id, false);
        let page = self.pages.get_mut(&page_id).expect("checked");
        // A running revocation starts it when done (`handle_revoke_done`).
        if page.revoke.is_none() && std::mem::take(&mut page.flush_wanted) {
            self.start_flush(page_id);
        }
    }

    /// Asks the driver to lower the applications' access to `page_id`; `reply` is sent
    /// to the home once it has (`handle_revoke_done`).
    pub(super) fn start_revoke(
        &mut self,
        page_id: PageId,
        reply: RevokeReply,
        access: Access,
        want_bytes: bool,
    ) {
        let token = self.next_revoke_token;
        self.next_revoke_token += 1;
        let page = self
            .pages
            .get_mut(&page_id)
            .expect("revoked pages are known");
        debug_assert!(page.revoke.is_none(), "one revocation per page at a time");
        page.revoke = Some((token, reply));
        self.revokes.insert(token, page_id);
        self.actions.push(Action::Revoke {
            page: page_id,
            access,
            token,
            want_bytes,
        });
    }

    pub(super) fn on_free_request(
        &mut self,
        from: NodeId,
        space: SpaceId,
        addr: u64,
        request_id: u64,
        oldest_in_flight: u64,
    ) {
        let outcome = match self.free_outcomes.check(from, request_id, oldest_in_flight) {
            Seen::Done(outcome) => outcome,
            Seen::Stale => {
                // Answered and acknowledged long ago: a late duplicate.
                self.stats.messages_rejected += 1;
                return;
            }
            Seen::New => {
                let owned = self
                    .meta
                    .spaces
                    .get(&space)
                    .and_then(|l| l.chunk_of_addr(addr))
                    .is_some_and(|chunk| {
                        self.meta.releasing_run(space, chunk).is_none()
                            && self.meta.chunk(space, chunk).is_some_and(|r| {
                                r.lessee == self.config.id
                                    && r.lessee_incarnation == self.config.incarnation
                            })
                    });
                let outcome = if owned {
                    self.free_local(space, addr)
                } else {
                    FreeOutcome::NotLessee
                };
                self.free_outcomes.record(from, request_id, outcome);
                outcome
            }
        };
        self.send(
            from,
            PeerMessage::FreeReply {
                request_id,
                outcome,
            },
        );
    }

    pub(super) fn on_free_reply(&mut self, from: NodeId, request_id: u64, outcome: FreeOutcome) {
        let matches = self
            .remote_frees
            .get(&request_id)
            .is_some_and(|f| f.target == from);
        if !matches {
            self.stats.messages_rejected += 1;
            return;
        }
        let free = self.remote_frees.remove(&request_id).expect("checked");
        if outcome == FreeOutcome::NotLessee {
            // Asked the node this node's metadata names; it knows better.
            return self.wait_for_lease(free.token, free.space, free.addr, None, Some(from));
        }
        self.reply(free.token, AppReply::from(outcome));
    }
}
