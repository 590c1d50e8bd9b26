//! Application requests: spaces, allocation, frees (local and remote), faults on
//! the requesting side.

use super::*;

impl Node {
    // -----------------------------------------------------------------------------
    // Application requests.

    pub(super) fn dispatch_request(&mut self, token: AppToken, request: AppRequest) {
        if self.evicted {
            self.reply_error(token, AppError::Evicted);
            return;
        }
        if !self.is_serving() {
            // Its metadata still has the earlier life (attached, leasing, homing), or
            // none yet (joining): nothing an application asks can be done before the
            // rejoin or the join.
            if self.rejoin_waiting.len() >= MAX_REJOIN_WAITING {
                self.reply_error(token, AppError::Busy);
            } else {
                let deadline_tick = self.now_ticks + self.config.metadata_wait_ticks;
                self.rejoin_waiting
                    .push_back((token, request, deadline_tick));
            }
            return;
        }
        match request {
            AppRequest::CreateSpace {
                name,
                base_addr,
                size_bytes,
                chunk_size_bytes,
                flexible_base,
                persistent,
                replicas,
            } => {
                // Checked here too: a command the log cannot carry would never commit.
                if !crate::types::is_valid_space_name(&name) {
                    self.reply_error(
                        token,
                        AppError::SpaceRejected("space name must be 1 to 64 bytes"),
                    );
                    return;
                }
                let command = Command::CreateSpace {
                    name,
                    base_addr,
                    size_bytes,
                    chunk_size_bytes,
                    flexible_base,
                    persistent,
                    root_size_bytes: DEFAULT_ROOT_SIZE_BYTES.min(chunk_size_bytes),
                    replicas,
                };
                self.propose_or_reply(token, command, Purpose::CreateSpace { token });
            }
            AppRequest::ReleaseChunks { space, addr, count } => {
                self.release_for_app(token, space, addr, count)
            }
            AppRequest::AttachSpace { name } => {
                if self.meta.space_by_name(&name).is_none() {
                    // It may be created meanwhile; joining it then takes a new hello.
                    self.reply_error(token, AppError::UnknownSpace);
                    return;
                }
                self.propose_or_reply(token, Command::Attach { name }, Purpose::Attach { token });
            }
            AppRequest::DetachSpace { space } => {
                if !self.meta.spaces.contains_key(&space) {
                    self.reply_error(token, AppError::UnknownSpace);
                    return;
                }
                self.propose_or_reply(token, Command::Detach { space }, Purpose::Detach { token });
            }
            AppRequest::Allocate {
                space,
                size_bytes,
                align_bytes,
            } => self.allocate(token, space, size_bytes, align_bytes),
            AppRequest::Free { space, addr } => self.free(token, space, addr),
            AppRequest::Fault {
                space,
                addr,
                access,
            } => self.fault(token, space, addr, access),
            AppRequest::Sync { space } => self.sync(token, space),
            AppRequest::AddMember { node } => self.propose_or_reply(
                token,
                Command::AddMember { node },
                Purpose::Membership { token },
            ),
            AppRequest::RemoveMember { node } => self.propose_or_reply(
                token,
                Command::RemoveMember { node },
                Purpose::Membership { token },
            ),
            AppRequest::Unpersist { name } => {
                if !crate::types::is_valid_space_name(&name) {
                    self.reply_error(token, AppError::UnknownSpace);
                    return;
                }
                self.propose_or_reply(
                    token,
                    Command::Unpersist { name },
                    Purpose::Unpersist { token },
                );
            }
            AppRequest::LeaseChunks { space, count } => {
                if !self.meta.spaces.contains_key(&space) {
                    self.reply_error(token, AppError::UnknownSpace);
                    return;
                }
                if count == 0 || count > crate::meta::MAX_CHUNKS_PER_LEASE {
                    self.reply_error(token, AppError::InvalidArgument("chunk count"));
                    return;
                }
                let command = Command::LeaseChunks {
                    space,
                    node: self.config.id,
                    count,
                };
                self.propose_or_reply(token, command, Purpose::LeaseForApp { token });
            }
        }
    }

    /// Proposes `command` for application request `token`, or answers the request with
    /// why it cannot be proposed.
    fn propose_or_reply(&mut self, token: AppToken, command: Command, purpose: Purpose) {
        if let Err(error) = self.propose(command, purpose) {
            self.reply_error(token, error);
        }
    }

    pub(super) fn allocate(
        &mut self,
        token: AppToken,
        space: SpaceId,
        size_bytes: u64,
        align_bytes: u64,
    ) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        if !align_bytes.is_power_of_two() || align_bytes > layout.chunk_size_bytes {
            self.reply_error(
                token,
                AppError::InvalidArgument("alignment must be a power of two up to the chunk size"),
            );
            return;
        }
        if size_bytes > MAX_ALLOCATION_BYTES || size_bytes > layout.size_bytes {
            self.reply_error(token, AppError::OutOfMemory);
            return;
        }
        self.pending_allocations
            .entry(space)
            .or_default()
            .push_back(PendingAllocation {
                token,
                size_bytes,
                align_bytes,
            });
        self.serve_pending_allocations(space);
    }

    /// Serves waiting allocations in order; leases more chunks when the head does not fit.
    pub(super) fn serve_pending_allocations(&mut self, space: SpaceId) {
        loop {
            let Some(head) = self
                .pending_allocations
                .get(&space)
                .and_then(|q| q.front())
                .cloned()
            else {
                return;
            };
            let allocator = self.allocators.entry(space).or_default();
            if let Some(addr) = allocator.allocate(head.size_bytes, head.align_bytes) {
                let size_bytes = allocator.size_of(addr).expect("just allocated");
                self.pending_allocations
                    .get_mut(&space)
                    .expect("present")
                    .pop_front();
                self.stats.allocations += 1;
                self.reply(head.token, AppReply::Allocated { addr, size_bytes });
                continue;
            }
            if self.lease_in_flight.contains(&space) {
                return;
            }
            let layout = self.meta.spaces[&space].clone();
            // A leased run starts on a chunk boundary and alignment is at most a chunk,
            // so the run's start is aligned for the head: its size alone decides.
            let count = head.size_bytes.div_ceil(layout.chunk_size_bytes).max(1);
            // A lease the metadata would reject is refused here, for this request
            // only (a rejected lease fails every allocation waiting on it).
            if count > layout.chunk_count() || count > crate::meta::MAX_CHUNKS_PER_LEASE as u64 {
                self.pending_allocations
                    .get_mut(&space)
                    .expect("present")
                    .pop_front();
                self.reply_error(head.token, AppError::OutOfMemory);
                continue;
            }
            if self.mutant(Mutant::ReplyBeforeCommit) {
                self.carve_before_commit(&layout, count);
            }
            let command = Command::LeaseChunks {
                space,
                node: self.config.id,
                count: count as u32,
            };
            // Marked before proposing: on a one-node cluster the entry commits and
            // applies inside `propose`.
            self.lease_in_flight.insert(space);
            match self.propose(command, Purpose::LeaseForAllocator { space, count }) {
                Ok(()) => {}
                Err(error) => {
                    self.lease_in_flight.remove(&space);
                    self.pending_allocations
                        .get_mut(&space)
                        .expect("present")
                        .pop_front();
                    self.reply_error(head.token, error);
                    // No lease is in flight to wake the rest: serve the next head now.
                    continue;
                }
            }
            if !self.mutant(Mutant::ReplyBeforeCommit) {
                return;
            }
        }
    }

    /// Mutant: add the chunks this node *expects* its lease to get, before commit.
    pub(super) fn carve_before_commit(&mut self, layout: &SpaceLayout, count: u64) {
        let mut run = 0;
        for chunk in 0..layout.chunk_count() {
            if self.meta.chunk(layout.id, chunk).is_none() {
                run += 1;
                if run == count {
                    let first = chunk + 1 - count;
                    let start = layout.chunk_addr(first);
                    let allocator = self.allocators.entry(layout.id).or_default();
                    if !(first..first + count).any(|c| allocator.owns(layout.chunk_addr(c))) {
                        allocator.add_region(start, count * layout.chunk_size_bytes);
                    }
                    return;
                }
            } else {
                run = 0;
            }
        }
    }

    pub(super) fn free(&mut self, token: AppToken, space: SpaceId, addr: u64) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        let Some(chunk) = layout.chunk_of_addr(addr) else {
            self.reply_error(token, AppError::InvalidFree);
            return;
        };
        let Some(record) = self.meta.chunk(space, chunk) else {
            self.wait_for_metadata(token, space, addr, None);
            return;
        };
        if self.meta.releasing_run(space, chunk).is_some() {
            // Given back: no block is live there, unless this node is behind and the
            // chunk was leased again (the pointer came faster than the metadata).
            self.wait_for_metadata(token, space, addr, None);
            return;
        }
        if record.lessee_lost(&self.meta) {
            // Which blocks are live there ended with the life that carved them.
            self.reply_error(token, AppError::NodeDown(record.lessee));
            return;
        }
        if record.lessee == self.config.id {
            let outcome = self.free_local(space, addr);
            self.reply(token, AppReply::from(outcome));
            return;
        }
        if self.remote_frees.len() >= MAX_REMOTE_FREES_IN_FLIGHT {
            self.reply_error(token, AppError::Busy);
            return;
        }
        let request_id = self.next_free_id;
        self.next_free_id += 1;
        self.remote_frees.insert(
            request_id,
            RemoteFree {
                token,
                target: record.lessee,
                space,
                addr,
                retry: RetrySchedule::starting(self.now_ticks, self.config.retry_base_ticks),
            },
        );
        self.stats.remote_frees += 1;
        let oldest_in_flight = *self.remote_frees.keys().next().expect("just inserted");
        self.send(
            record.lessee,
            PeerMessage::FreeRequest {
                space,
                addr,
                request_id,
                oldest_in_flight,
            },
        );
    }

    /// A fault (`access` Some) or free (None) on a chunk whose lease this node has not
    /// applied yet: possibly committed but not yet here, so it waits, bounded in number
    /// and time (`retry_unmapped`).
    pub(super) fn wait_for_metadata(
        &mut self,
        token: AppToken,
        space: SpaceId,
        addr: u64,
        access: Option<Access>,
    ) {
        self.wait_for_lease(token, space, addr, access, None);
    }

    /// Waits (bounded) for this node's metadata to show `addr`'s chunk leased, and
    /// leased to another node than `stale_lessee`.
    pub(super) fn wait_for_lease(
        &mut self,
        token: AppToken,
        space: SpaceId,
        addr: u64,
        access: Option<Access>,
        stale_lessee: Option<NodeId>,
    ) {
        if self.unmapped.len() >= MAX_WAITERS_PER_PAGE {
            self.reply_error(token, AppError::Busy);
            return;
        }
        self.unmapped.push_back(UnmappedFault {
            token,
            space,
            addr,
            access,
            deadline_tick: self.now_ticks + self.config.metadata_wait_ticks,
            stale_lessee,
        });
    }

    pub(super) fn free_local(&mut self, space: SpaceId, addr: u64) -> FreeOutcome {
        match self.allocators.get_mut(&space).map(|a| a.free(addr)) {
            Some(Ok(_)) => {
                self.stats.frees += 1;
                self.release_if_empty(space, addr);
                FreeOutcome::Freed
            }
            _ => FreeOutcome::InvalidFree,
        }
    }

    /// The node that serves the page: none while its chunk is unleased or released.
    pub(super) fn home_of(&self, page: PageId) -> Option<NodeId> {
        let layout = self.meta.spaces.get(&page.space)?;
        let chunk = layout.chunk_of_page(page.index);
        if self.meta.releasing_run(page.space, chunk).is_some() {
            return None;
        }
        self.meta.chunk(page.space, chunk).map(|r| r.home)
    }

    /// An application gives back chunks it leased: they must be this node's, whole,
    /// never the root's, and not carved by the node's own allocator.
    fn release_for_app(&mut self, token: AppToken, space: SpaceId, addr: u64, count: u32) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        let chunk_size = layout.chunk_size_bytes;
        let Some(first_chunk) = layout.chunk_of_addr(addr) else {
            self.reply_error(
                token,
                AppError::InvalidArgument("address outside the space"),
            );
            return;
        };
        let in_space = first_chunk
            .checked_add(count as u64)
            .is_some_and(|end| end <= layout.chunk_count());
        let aligned = layout.chunk_addr(first_chunk) == addr;
        if count == 0 || count > crate::meta::MAX_CHUNKS_PER_LEASE || !in_space || !aligned {
            self.reply_error(token, AppError::InvalidArgument("chunk range"));
            return;
        }
        let me = self.config.id;
        let allocator = self.allocators.get(&space);
        let releasable = first_chunk > 0
            && (first_chunk..first_chunk + count as u64).all(|chunk| {
                let start = layout.base_addr + chunk * chunk_size;
                self.meta.chunk(space, chunk).is_some_and(|r| {
                    r.lessee == me && r.lessee_incarnation == self.config.incarnation
                }) && self.meta.releasing_run(space, chunk).is_none()
                    && allocator.is_none_or(|a| a.region_of(start).is_none())
            });
        if !releasable {
            self.reply_error(
                token,
                AppError::InvalidArgument("chunks not leased to the application here"),
            );
            return;
        }
        let command = Command::ReleaseChunks {
            space,
            first_chunk,
            count,
        };
        self.propose_or_reply(token, command, Purpose::ReleaseForApp { token });
    }

    /// After a free: an allocator region left without a block goes back to the
    /// cluster (the root block's chunk never does).
    pub(super) fn release_if_empty(&mut self, space: SpaceId, addr: u64) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            return;
        };
        let chunk_size = layout.chunk_size_bytes;
        let base = layout.base_addr;
        let Some(allocator) = self.allocators.get_mut(&space) else {
            return;
        };
        let Some((start, len)) = allocator.region_of(addr) else {
            return;
        };
        if start == base || !allocator.is_free_range(start, len) {
            return;
        }
        let kept_chunks: u64 = allocator
            .regions()
            .filter(|&(s, l)| s != base && s != start && allocator.is_free_range(s, l))
            .map(|(_, l)| l / chunk_size)
            .sum();
        if kept_chunks + len / chunk_size <= self.config.retain_empty_chunks {
            return;
        }
        let removed = allocator.remove_region(start);
        debug_assert!(removed, "an empty region is removable");
        let command = Command::ReleaseChunks {
            space,
            first_chunk: (start - base) / chunk_size,
            count: (len / chunk_size) as u32,
        };
        let purpose = Purpose::ReleaseRegion { space, start, len };
        if self.propose(command, purpose).is_err() {
            // Too many proposals in flight: keep the region for now.
            self.allocators
                .get_mut(&space)
                .expect("present")
                .add_region(start, len);
        }
    }

    pub(super) fn fault(&mut self, token: AppToken, space: SpaceId, addr: u64, access: Access) {
        let Some(layout) = self.meta.spaces.get(&space) else {
            self.reply_error(token, AppError::UnknownSpace);
            return;
        };
        let Some(page_id) = layout.page_of(addr) else {
            self.reply_error(
                token,
                AppError::InvalidArgument("address outside the space"),
            );
            return;
        };
        if access == Access::None {
            self.reply_error(
                token,
                AppError::InvalidArgument("fault needs read or write"),
            );
            return;
        }
        // Unleased, or given back: nothing is allocated there unless this node is
        // behind (the chunk was leased, or leased again, and the pointer came faster
        // than the metadata). `home_of` is None for both.
        if self.home_of(page_id).is_none() {
            self.wait_for_metadata(token, space, addr, Some(access));
            return;
        }
        let page = self.pages.entry(page_id).or_insert_with(LocalPage::new);
        if page.waiters.len() >= MAX_WAITERS_PER_PAGE {
            self.reply_error(token, AppError::Busy);
            return;
        }
        page.waiters.push((token, access));
        self.unclean_for_writers(page_id);
        let page = &self.pages[&page_id];
        if self.page_access(page) >= access {
            self.stats.faults_local += 1;
        } else {
            self.stats.faults_remote += 1;
        }
        self.advance_local(page_id);
    }

    /// Serves the waiters of a page that now can be, and asks the home for more if needed.
    pub(super) fn advance_local(&mut self, page_id: PageId) {
        self.unclean_for_writers(page_id);
        let Some(page) = self.pages.get(&page_id) else {
            return;
        };
        let access = self.page_access(page);
        if page.waiters.iter().any(|&(_, want)| want <= access) {
            let page = self.pages.get_mut(&page_id).expect("present");
            let (served, waiting): (Vec<_>, Vec<_>) = page
                .waiters
                .drain(..)
                .partition(|&(_, want)| want <= access);
            page.waiters = waiting;
            for (token, _) in served {
                self.reply(
                    token,
                    AppReply::Granted {
                        page: page_id,
                        access,
                    },
                );
            }
        }
        let page = &self.pages[&page_id];
        if page.waiters.is_empty()
            || page.request.is_some()
            || page.revoke.is_some()
            || self.fenced
            || self.evicted
        {
            return;
        }
        // After a fence, ask for at least what we held: a writer must not lose its writes.
        let mut mode = page
            .waiters
            .iter()
            .map(|&(_, want)| want)
            .max()
            .expect("non-empty");
        if !page.validated {
            mode = mode.max(page.held);
        }
        let Some(home) = self.home_of(page_id) else {
            self.fail_local_page(page_id, AppError::NotMapped);
            return;
        };
        if !self.meta.is_up(home) {
            self.fail_local_page(page_id, AppError::PageLost);
            return;
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let page = self.pages.get_mut(&page_id).expect("present");
        page.request = Some(OutstandingRequest {
            request_id,
            mode,
            home,
            retry: RetrySchedule::starting(self.now_ticks, self.config.retry_base_ticks),
        });
        let message = PeerMessage::PageRequest {
            page: page_id,
            request_id,
            mode,
            have_version: page.have_version(),
        };
        self.requesting.insert(page_id);
        self.send(home, message);
    }

    pub(super) fn fail_local_page(&mut self, page_id: PageId, error: AppError) {
        let Some(page) = self.pages.get_mut(&page_id) else {
            return;
        };
        page.request = None;
        self.requesting.remove(&page_id);
        let waiters: Vec<_> = page.waiters.drain(..).collect();
        if error == AppError::PageLost && !waiters.is_empty() {
            self.stats.pages_lost += 1;
        }
        for (token, _) in waiters {
            self.reply_error(token, error);
        }
    }
}
