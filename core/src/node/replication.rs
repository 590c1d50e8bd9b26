//! k copies of every page's contents (docs/protocol.md "Replication").
//!
//! Node side: `gallocy_sync` flushes every page this node's applications wrote since
//! its last flush: their write access is taken (so their next write faults and marks
//! the page written again), the bytes are read and sent to the home, which answers
//! once they are on k nodes. Home side: a flush replaces the master (the contents a
//! crash of the writer goes back to), and before a flush is acknowledged or a page is
//! granted to a node, the master's contents are made to be on k nodes (this one, the
//! nodes known to hold them, the requester), with `Backup`s to more nodes if needed.

use super::*;

impl Node {
    // -----------------------------------------------------------------------------
    // Node side.

    /// `AppRequest::Sync`: flush every written page of `space`; answered `Synced` once
    /// each flush is acknowledged (at once with k = 1: the writes are on this node).
    pub(super) fn sync(&mut self, token: AppToken, space: SpaceId) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        if layout.replicas <= 1 {
            self.stats.syncs += 1;
            self.reply(token, AppReply::Synced);
            return;
        }
        if self.syncs.len() >= MAX_SYNCS_IN_FLIGHT {
            self.reply_error(token, AppError::Busy);
            return;
        }
        let pages: Vec<PageId> = self
            .pages
            .range(
                PageId { space, index: 0 }..=PageId {
                    space,
                    index: u64::MAX,
                },
            )
            .filter(|(_, page)| page.written || page.flush.is_some())
            .map(|(&id, _)| id)
            .collect();
        let mut waits = BTreeMap::new();
        for page_id in pages {
            let page = self.pages.get_mut(&page_id).expect("listed");
            // A flush in flight covers what was captured when it started; writes since
            // need the next one.
            let covering = if page.written {
                if page.flush.is_some() || page.revoke.is_some() {
                    page.flush_wanted = true;
                    page.flushes_started + 1
                } else {
                    self.start_flush(page_id);
                    self.pages[&page_id].flushes_started
                }
            } else {
                page.flushes_started
            };
            waits.insert(page_id, covering);
        }
        if waits.is_empty() {
            self.stats.syncs += 1;
            self.reply(token, AppReply::Synced);
            return;
        }
        let id = self.next_sync_id;
        self.next_sync_id += 1;
        self.syncs.insert(
            id,
            SyncWait {
                token,
                pages: waits,
                lost: false,
            },
        );
    }

    /// Starts a flush of a written page: takes the applications' write access and reads
    /// the bytes (`RevokeReply::Flush`), or, if this node writes the page no more, asks
    /// the home to make sure of the k copies its writes went to.
    pub(super) fn start_flush(&mut self, page_id: PageId) {
        let page = self
            .pages
            .get_mut(&page_id)
            .expect("flushed pages are known");
        debug_assert!(page.flush.is_none() && page.revoke.is_none());
        page.flushes_started += 1;
        if page.held == Access::Write {
            // Read only from now (nothing, while fenced): the bytes stay as they are
            // until a write faults again.
            page.clean = true;
            let access = self.page_access(&self.pages[&page_id]);
            self.start_revoke(page_id, RevokeReply::Flush, access, true);
            return;
        }
        self.send_new_flush(page_id, None);
    }

    /// The flush revocation is done: the applications may only read, and `bytes` are
    /// the page as they left it.
    pub(super) fn flush_captured(&mut self, page_id: PageId, bytes: Option<Box<PageBytes>>) {
        self.send_new_flush(page_id, bytes);
    }

    /// Sends the home a flush of the page as it is now: with `bytes` if this node
    /// still writes it at a known version (the home keeps them), else without (the home
    /// only counts the copies of what it has).
    fn send_new_flush(&mut self, page_id: PageId, bytes: Option<Box<PageBytes>>) {
        let now = self.now_ticks;
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let page = self.pages.get_mut(&page_id).expect("present");
        page.written = false;
        let version = page.mem_version.unwrap_or(0);
        let bytes = if page.held == Access::Write {
            page.mem_version.and(bytes)
        } else {
            None
        };
        page.flush = Some(LocalFlush {
            request_id,
            version,
            bytes,
            retry: RetrySchedule::starting(now, self.config.retry_base_ticks),
        });
        self.flushing.insert(page_id);
        self.send_flush(page_id);
    }

    /// (Re)sends the page's flush to its home, if it has one now.
    pub(super) fn send_flush(&mut self, page_id: PageId) {
        let Some(home) = self.home_of(page_id) else {
            return;
        };
        let Some(flush) = self.pages.get(&page_id).and_then(|p| p.flush.clone()) else {
            return;
        };
        self.stats.flushes_sent += 1;
        self.send(
            home,
            PeerMessage::Flush {
                page: page_id,
                request_id: flush.request_id,
                version: flush.version,
                bytes: flush.bytes,
            },
        );
    }

    /// A flush of `page_id` was acknowledged (or, `lost`, the page is lost), or the
    /// page went away (released, dropped): every sync it covers is one page closer.
    pub(super) fn flush_done(&mut self, page_id: PageId, lost: bool) {
        let acked = self
            .pages
            .get(&page_id)
            .map_or(u64::MAX, |p| p.flushes_acked);
        let mut finished = Vec::new();
        for (&id, wait) in self.syncs.iter_mut() {
            if wait
                .pages
                .get(&page_id)
                .is_some_and(|&needed| needed <= acked)
            {
                wait.pages.remove(&page_id);
                wait.lost |= lost;
                if wait.pages.is_empty() {
                    finished.push(id);
                }
            }
        }
        for id in finished {
            let wait = self.syncs.remove(&id).expect("listed");
            if wait.lost {
                self.reply_error(wait.token, AppError::PageLost);
            } else {
                self.stats.syncs += 1;
                self.reply(wait.token, AppReply::Synced);
            }
        }
    }

    /// The home says the page of this node's flush is lost.
    pub(super) fn flush_lost(&mut self, page_id: PageId) {
        let page = self.pages.get_mut(&page_id).expect("checked by the caller");
        page.flush = None;
        page.flush_wanted = false;
        page.flushes_acked = page.flushes_started;
        self.flushing.remove(&page_id);
        self.flush_done(page_id, true);
    }

    /// Pages this node forgets (released, their space dropped): nothing of them is left
    /// to make durable, and their backups go too. Call after the local pages are gone.
    pub(super) fn forget_replication(&mut self, range: impl std::ops::RangeBounds<PageId> + Clone) {
        let backed: Vec<PageId> = self
            .backups
            .range(range.clone())
            .map(|(&id, _)| id)
            .collect();
        for page_id in backed {
            self.backups.remove(&page_id);
        }
        let waited: BTreeSet<PageId> = self
            .syncs
            .values()
            .flat_map(|w| w.pages.range(range.clone()).map(|(&id, _)| id))
            .collect();
        for page_id in waited {
            debug_assert!(!self.pages.contains_key(&page_id));
            self.flush_done(page_id, false);
        }
    }

    /// Flushes whose retry is due go to the page's home again (a new one, if it moved).
    pub(super) fn retry_flushes(&mut self) {
        let now = self.now_ticks;
        let max = self.config.retry_max_ticks;
        let due: Vec<PageId> = self
            .flushing
            .iter()
            .copied()
            .filter(|id| {
                self.pages[id]
                    .flush
                    .as_ref()
                    .is_some_and(|f| f.retry.is_due(now))
            })
            .collect();
        for page_id in due {
            let page = self.pages.get_mut(&page_id).expect("listed");
            page.flush
                .as_mut()
                .expect("listed")
                .retry
                .backed_off(now, max);
            self.stats.retries += 1;
            self.send_flush(page_id);
        }
    }

    /// The earliest flush retry, for `poll_timeout`.
    pub(super) fn next_flush_retry(&self) -> Option<u64> {
        self.flushing
            .iter()
            .filter_map(|id| self.pages[id].flush.as_ref().map(|f| f.retry.next_tick))
            .min()
    }

    /// A write fault on a page this node holds for writing whose applications may
    /// only read since a flush: they may write again, and the page is written.
    pub(super) fn unclean_for_writers(&mut self, page_id: PageId) {
        let Some(page) = self.pages.get_mut(&page_id) else {
            return;
        };
        if page.clean
            && page.held == Access::Write
            && page.revoke.is_none()
            && page.waiters.iter().any(|&(_, want)| want == Access::Write)
        {
            page.clean = false;
            page.written = true;
        }
    }

    /// Evicted: no sync can complete any more.
    pub(super) fn fail_syncs(&mut self, error: AppError) {
        for (_, wait) in std::mem::take(&mut self.syncs) {
            self.reply_error(wait.token, error);
        }
    }

    // -----------------------------------------------------------------------------
    // Home side.

    /// k for the page, bounded by the nodes up (a flush or grant never waits for nodes
    /// that are not there).
    pub fn copies_needed(&self, page_id: PageId) -> usize {
        let k = self
            .meta
            .spaces
            .get(&page_id.space)
            .map_or(1, |layout| layout.replicas as usize);
        k.min(self.meta.up_nodes().count()).max(1)
    }

    /// `PeerMessage::Flush` from `from`: queued and run like a page request.
    pub(super) fn home_flush(
        &mut self,
        from: NodeId,
        page_id: PageId,
        request_id: u64,
        flush: FlushData,
    ) {
        let request = PageRequestInfo {
            from,
            request_id,
            mode: Access::Write,
            have_version: None,
            flush: Some(flush),
            repair: false,
        };
        self.home_request(page_id, request);
    }

    /// A flush's turn: a writer's bytes become the master (if it still writes the page
    /// at that version), then the page's contents are made to be on k nodes, then the
    /// flush is acknowledged.
    pub(super) fn home_flush_start(&mut self, page_id: PageId, request: PageRequestInfo) {
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let flush = request.flush.as_ref().expect("a flush");
        let applies = entry.writer == Some(request.from)
            && entry.version == flush.version
            && entry.master_order < (flush.version, request.request_id);
        let mut flusher_holds = false;
        if let (true, Some(bytes)) = (applies, &flush.bytes) {
            entry.master = Some(bytes.clone());
            entry.master_order = (flush.version, request.request_id);
            entry.master_origin = Some(request.from);
            entry.master_unknown = false;
            entry.holders.clear();
            flusher_holds = true;
            self.stats.flushes_applied += 1;
        }
        // The writer holds what it flushed (it sent the bytes); any other copy counts
        // only once its node said so.
        let writer_copy = (flusher_holds
            || entry.master_order == (flush.version, request.request_id))
            .then_some(request.from);
        if let Some(phase) = self.replicate_phase(page_id, writer_copy) {
            return self.home_begin_phase(page_id, request, phase);
        }
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        entry.flush_acked.insert(request.from, request.request_id);
        self.send(
            request.from,
            PeerMessage::FlushAck {
                page: page_id,
                request_id: request.request_id,
            },
        );
        self.home_next(page_id);
    }

    /// The nodes that should take a backup for the master's contents to be on k nodes:
    /// none if they are on k already, counting this node, the nodes that said they
    /// hold them, and `also` (a grant brings them to the requester before its processes
    /// see them; a writer holds what it flushed); none if there is nothing to keep (the
    /// zero page) or no other node up could take one.
    fn replication_targets(&self, page_id: PageId, also: Option<NodeId>) -> BTreeSet<NodeId> {
        let need = self.copies_needed(page_id);
        let me = self.config.id;
        let entry = self.directory.get(&page_id).expect("entry exists");
        // Nothing to copy: the zero page, or a master lost in a recovery (its writer
        // holds the only contents; a recall brings them).
        if need <= 1 || (entry.master.is_none() && entry.version == 0) || entry.master_unknown {
            return BTreeSet::new();
        }
        let mut have: BTreeSet<NodeId> = entry.holders.clone();
        have.insert(me);
        have.extend(also);
        have.retain(|&node| self.meta.is_up(node));
        if have.len() >= need {
            return BTreeSet::new();
        }
        // Nodes up after this one, in id order around the ring: the same choice for
        // the same membership, spread by home.
        let up: Vec<NodeId> = self.meta.up_nodes().collect();
        let start = up.iter().position(|&n| n > me).unwrap_or(0);
        up[start..]
            .iter()
            .chain(up[..start].iter())
            .copied()
            .filter(|node| !have.contains(node))
            .take(need - have.len())
            .collect()
    }

    /// The phase that puts the master's contents on k nodes, if they are on fewer
    /// (`replication_targets`).
    pub(super) fn replicate_phase(
        &mut self,
        page_id: PageId,
        also: Option<NodeId>,
    ) -> Option<Phase> {
        let skip = self.mutant(Mutant::AckBeforeBackup);
        let targets = self.replication_targets(page_id, also);
        if targets.is_empty() {
            return None;
        }
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        entry.seq += 1;
        let seq = entry.seq;
        if skip {
            // The planted bug: acknowledge and grant without waiting for the backups
            // (sent, but counted before they arrive).
            entry.holders.extend(targets.iter().copied());
            self.send_backups(page_id, seq, &targets);
            return None;
        }
        Some(Phase::Replicate {
            seq,
            pending: targets,
        })
    }

    /// Starts the repairs due, up to `MAX_REPAIRS_IN_FLIGHT` running: pages this node
    /// homes whose master lost a copy with a node marked down get it made again, so
    /// copies lost with one node are replaced before the next loss, not at the page's
    /// next grant or flush. A repair is a transaction of its own (a `Replicate` phase
    /// if copies are missing), started only on an idle page: a page with a
    /// transaction or a queue waits (the request it serves may make the copies).
    pub(super) fn run_repairs(&mut self) {
        if self.mutant(Mutant::SkipRepairs) {
            // The planted bug: copies lost with a node are never made again.
            self.repairs_due.clear();
        }
        if self.fenced || self.evicted {
            return;
        }
        let me = self.config.id;
        let mut busy_pages = Vec::new();
        let mut running = self.repairs_running();
        while running < MAX_REPAIRS_IN_FLIGHT {
            let Some(page_id) = self.repairs_due.pop_first() else {
                break;
            };
            let Some(entry) = self.directory.get(&page_id) else {
                continue;
            };
            if entry.lost || self.home_of(page_id) != Some(me) {
                continue;
            }
            // A recovered page is collected first, once every void is due (as for a
            // request: `home_start`).
            let collect_later = entry.needs_collect && !self.pending_voids.is_empty();
            if entry.txn.is_some() || !entry.queue.is_empty() || collect_later {
                busy_pages.push(page_id);
                continue;
            }
            if !entry.needs_collect && self.replication_targets(page_id, None).is_empty() {
                continue;
            }
            let request = PageRequestInfo {
                from: me,
                request_id: 0,
                mode: Access::Read,
                have_version: None,
                flush: None,
                repair: true,
            };
            self.home_start(page_id, request);
            // Done at once if no copy was missing after all (a recovered page's
            // collect, or a backup, keeps it running).
            if self.directory[&page_id]
                .txn
                .as_ref()
                .is_some_and(|txn| txn.request.repair)
            {
                running += 1;
            }
        }
        // Tried again at the next tick.
        self.repairs_due.extend(busy_pages);
        debug_assert!(self.repairs_running() <= MAX_REPAIRS_IN_FLIGHT);
    }

    /// Repairs running: transactions (pages in `busy`) that serve a repair.
    pub(super) fn repairs_running(&self) -> usize {
        self.busy
            .iter()
            .filter(|id| {
                self.directory
                    .get(id)
                    .and_then(|entry| entry.txn.as_ref())
                    .is_some_and(|txn| txn.request.repair)
            })
            .count()
    }

    /// Once a node's copies are void here: every page this node holds a copy of (in
    /// memory or as a backup) whose chunk was recovered from a home that went down is
    /// told to its home (`RepairHint`), which rebuilds it and makes its copies again
    /// without waiting for a request; a page homed here is due a repair at once.
    /// Pages nobody holds need nothing: they are lost or were never written.
    pub(super) fn hint_recovered_pages(&mut self) {
        let me = self.config.id;
        let held = self
            .pages
            .iter()
            .filter(|(_, page)| page.mem_version.is_some())
            .map(|(&id, _)| id);
        let pages: BTreeSet<PageId> = held
            .chain(self.backups.keys().copied())
            .filter(|&id| self.chunk_recovered(id))
            .collect();
        for page_id in pages {
            match self.home_of(page_id) {
                Some(home) if home == me => self.home_repair_hint(me, page_id),
                Some(home) => self.send(home, PeerMessage::RepairHint { page: page_id }),
                None => {}
            }
        }
    }

    /// `PeerMessage::RepairHint`: `from` holds a copy of a recovered page homed here.
    /// Its entry (to be collected, if new) is due a repair.
    pub(super) fn home_repair_hint(&mut self, from: NodeId, page_id: PageId) {
        if self.home_of(page_id) != Some(self.config.id)
            || !self.meta.is_up(from)
            || !self.chunk_recovered(page_id)
        {
            self.stats.messages_rejected += 1;
            return;
        }
        self.directory.entry(page_id).or_insert_with(|| DirEntry {
            needs_collect: true,
            ..DirEntry::new()
        });
        self.repairs_due.insert(page_id);
    }

    /// A repair's turn (and its continuation after each backup ack): a phase while
    /// copies are missing, then done.
    pub(super) fn home_repair_start(&mut self, page_id: PageId, request: PageRequestInfo) {
        debug_assert!(request.repair && request.from == self.config.id);
        if let Some(phase) = self.replicate_phase(page_id, None) {
            return self.home_begin_phase(page_id, request, phase);
        }
        self.stats.pages_repaired += 1;
        self.home_next(page_id);
    }

    /// The `Backup`s of a replicate phase.
    pub(super) fn send_backups(&mut self, page_id: PageId, seq: u64, pending: &BTreeSet<NodeId>) {
        let entry = &self.directory[&page_id];
        let copy = BackupCopy {
            version: entry.master_order.0,
            sub: entry.master_order.1,
            bytes: entry.master_bytes(),
        };
        for &node in pending {
            self.stats.backups_sent += 1;
            self.send(
                node,
                PeerMessage::Backup {
                    page: page_id,
                    seq,
                    copy: copy.clone(),
                },
            );
        }
    }

    pub(super) fn home_backup_ack(&mut self, from: NodeId, page_id: PageId, seq: u64) {
        let Some(entry) = self.directory.get_mut(&page_id) else {
            self.stats.messages_rejected += 1;
            return;
        };
        let Some(Transaction {
            phase: Phase::Replicate { seq: want, pending },
            ..
        }) = entry.txn.as_mut()
        else {
            return;
        };
        if *want != seq || !pending.remove(&from) {
            return;
        }
        entry.holders.insert(from);
        // Counted again from the top: enough copies now, or a phase for the rest (a
        // target still silent is asked again, beside others).
        let txn = entry.txn.take().expect("present");
        self.home_continue(page_id, txn.request);
    }

    /// A replication whose retry is due: one more target, the next node up not yet
    /// asked, so a target that is up but cut off from this node (not marked down yet)
    /// does not hold the page's transaction until it is.
    pub(super) fn widen_replication(&mut self, page_id: PageId) {
        let me = self.config.id;
        let up: Vec<NodeId> = self.meta.up_nodes().collect();
        let entry = self.directory.get_mut(&page_id).expect("entry exists");
        let Some(Transaction {
            phase: Phase::Replicate { pending, .. },
            ..
        }) = entry.txn.as_mut()
        else {
            return;
        };
        let start = up.iter().position(|&n| n > me).unwrap_or(0);
        let next = up[start..]
            .iter()
            .chain(up[..start].iter())
            .copied()
            .find(|node| *node != me && !entry.holders.contains(node) && !pending.contains(node));
        if let Some(node) = next {
            pending.insert(node);
        }
    }
}
