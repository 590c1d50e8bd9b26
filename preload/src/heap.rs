//! The in-process allocator: chunks leased on demand (from the daemon, or from a private
//! mapping in fallback mode) carved locally into size classes, with one heap per
//! thread. Steady-state malloc and free do no IPC and no system call.
//!
//! Layout: a chunk (1 MiB) is either split into 16 spans of 64 KiB (small classes), or
//! is one span (big classes), or starts a run of chunks holding one large block. Every
//! span starts with a 64-byte header *in the space*, so a free from any thread, process
//! or node finds the block's class and owner from the pointer alone.
//!
//! Frees: a block freed by the thread heap that owns its span goes on that heap's
//! local list. Any other free (another thread, process or node) pushes the block onto
//! the span's `remote` list with a compare-and-swap on the header; the owner collects
//! these lists when its local list runs dry. Across nodes this is coherent because the
//! space is sequentially consistent: the CAS runs on a page the freeing node holds
//! exclusively at that instant.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

pub const CHUNK_BYTES: u64 = 1 << 20;
pub const SPAN_BYTES: u64 = 64 << 10;
const HEADER_BYTES: u64 = 64;
const MAGIC: u32 = 0x6761_6c79;
const KIND_SMALL: u32 = 1;
const KIND_BIG: u32 = 2;
const KIND_LARGE: u32 = 3;
/// Largest block of a small class (spans of 64 KiB).
const SMALL_MAX_BYTES: u64 = 8 << 10;
/// Largest block of a big class (one span per chunk); larger blocks get chunk runs.
pub const BIG_MAX_BYTES: u64 = 256 << 10;
/// Thread heaps; beyond, threads share the last one under a lock.
pub const MAX_HEAPS: usize = 256;
/// Freed large runs kept for reuse.
const MAX_FREE_RUNS: usize = 256;
/// Chunks of freed large runs kept for reuse; a run freed beyond goes back to where
/// chunks come from (the cluster), so a heap that shrinks gives memory back.
const MAX_CACHED_RUN_CHUNKS: u64 = 16;
/// Blocks carved from a span at once when a free list runs dry.
const CARVE_BATCH: usize = 32;
/// Span chunks `give_back_at_exit` can account for (a process with more gives back
/// only its cached runs). 8,192 chunks: 8 GiB of small and big blocks, 128 KiB of table.
const MAX_EXIT_CHUNKS: usize = 8192;
/// Chunks in one release request (a run of adjacent chunks).
const MAX_RELEASE_RUN_CHUNKS: u64 = 1 << 16;

/// Where chunks come from: the daemon (leases) or a private mapping (fallback).
pub trait ChunkSource {
    /// `count` contiguous, chunk-aligned, zeroed chunks; their start address.
    fn lease(&self, count: u64) -> Option<u64>;
    /// Gives back `count` chunks from `start` (leased by `lease`, no live block in them);
    /// false if they stay (the caller keeps them for reuse).
    fn release(&self, start: u64, count: u64) -> bool {
        let _ = (start, count);
        false
    }
}

#[repr(C)]
struct SpanHeader {
    magic: u32,
    kind: u32,
    class: u32,
    run_chunks: u32,
    /// The owning thread heap: (process token << 16) | heap index.
    owner: AtomicU64,
    block_bytes: u64,
    /// First block.
    data_start: u64,
    /// Next uncarved byte (owner only).
    bump: u64,
    /// Blocks freed by others: a Treiber stack threaded through the blocks.
    remote: AtomicU64,
    /// The owner's next span of the same class (owner only).
    next: u64,
}

const _: () = assert!(core::mem::size_of::<SpanHeader>() <= HEADER_BYTES as usize);

/// Class sizes: 16-byte steps to 128, then four steps per doubling up to 256 KiB.
const fn class_sizes() -> [u64; CLASSES] {
    let mut sizes = [0u64; CLASSES];
    let mut i = 0;
    while i < 8 {
        sizes[i] = 16 * (i as u64 + 1);
        i += 1;
    }
    let mut base = 128u64;
    while i < CLASSES {
        let mut step = 1;
        while step <= 4 && i < CLASSES {
            sizes[i] = base + base / 4 * step;
            i += 1;
            step += 1;
        }
        base *= 2;
    }
    sizes
}

/// 8 + 4 per doubling from 128 to 256 KiB (11 doublings).
pub const CLASSES: usize = 8 + 4 * 11;
pub static CLASS_BYTES: [u64; CLASSES] = class_sizes();

const _: () = assert!(class_sizes()[CLASSES - 1] == BIG_MAX_BYTES);

/// Class by size in 16-byte steps, for sizes up to 1 KiB (the common case).
const fn small_class_table() -> [u8; 65] {
    let sizes = class_sizes();
    let mut table = [0u8; 65];
    let mut i = 1;
    while i < 65 {
        let size = i as u64 * 16;
        let mut class = 0;
        while sizes[class] < size {
            class += 1;
        }
        table[i] = class as u8;
        i += 1;
    }
    table
}

static SMALL_CLASS: [u8; 65] = small_class_table();

/// Multipliers that divide by each class size exactly for offsets below 2^32:
/// `offset / size == (offset * MAGIC) >> 64`. A free from an aligned interior
/// pointer needs its block's start, and a division is ten times slower.
const fn division_magic() -> [u64; CLASSES] {
    let sizes = class_sizes();
    let mut magic = [0u64; CLASSES];
    let mut i = 0;
    while i < CLASSES {
        magic[i] = u64::MAX / sizes[i] + 1;
        i += 1;
    }
    magic
}

static DIVISION_MAGIC: [u64; CLASSES] = division_magic();

/// The class serving `size`, if it is not a large block.
#[inline]
pub fn class_of(size: u64) -> Option<usize> {
    if size <= 1024 {
        return Some(SMALL_CLASS[(size.max(1) as usize).div_ceil(16)] as usize);
    }
    if size > BIG_MAX_BYTES {
        return None;
    }
    // Binary search: the first class at least `size`.
    let (mut lo, mut hi) = (8usize, CLASSES - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if CLASS_BYTES[mid] >= size {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

struct ThreadHeap {
    in_use: AtomicBool,
    /// Local free lists, threaded through the blocks.
    free: [UnsafeCell<u64>; CLASSES],
    /// Spans this heap owns, per class (through `SpanHeader::next`).
    spans: [UnsafeCell<u64>; CLASSES],
    /// The span blocks are being carved from, per class.
    carving: [UnsafeCell<u64>; CLASSES],
    /// For the shared last heap only.
    lock: AtomicBool,
}

// SAFETY: a heap's cells are touched only by the thread holding it (`in_use`), or under
// its `lock` for the shared heap.
unsafe impl Sync for ThreadHeap {}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO_CELL: UnsafeCell<u64> = UnsafeCell::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_HEAP: ThreadHeap = ThreadHeap {
    in_use: AtomicBool::new(false),
    free: [ZERO_CELL; CLASSES],
    spans: [ZERO_CELL; CLASSES],
    carving: [ZERO_CELL; CLASSES],
    lock: AtomicBool::new(false),
};

/// Chunks leased but not yet split into spans, and freed large runs (process-wide).
struct Pool {
    lock: AtomicBool,
    /// Next unused span in the current small-span chunk, and its end.
    span_cursor: UnsafeCell<u64>,
    span_end: UnsafeCell<u64>,
    free_runs: UnsafeCell<[(u64, u64); MAX_FREE_RUNS]>,
    /// Chunks in `free_runs`.
    cached_run_chunks: UnsafeCell<u64>,
    /// `give_back_at_exit`'s table: (span chunk, its blocks still live), open addressing.
    exit_chunks: UnsafeCell<[(u64, i64); MAX_EXIT_CHUNKS]>,
}

// SAFETY: cells touched only under `lock`.
unsafe impl Sync for Pool {}

pub struct Heap {
    heaps: [ThreadHeap; MAX_HEAPS],
    pool: Pool,
    /// Distinguishes this process's heaps from every other process's (node, session).
    process_token: AtomicU64,
    pub leased_bytes: AtomicU64,
    pub large_blocks: AtomicU32,
    /// `give_back_at_exit` ran.
    gave_back: AtomicBool,
}

impl Heap {
    pub const fn new() -> Heap {
        Heap {
            heaps: [EMPTY_HEAP; MAX_HEAPS],
            pool: Pool {
                lock: AtomicBool::new(false),
                span_cursor: UnsafeCell::new(0),
                span_end: UnsafeCell::new(0),
                free_runs: UnsafeCell::new([(0, 0); MAX_FREE_RUNS]),
                cached_run_chunks: UnsafeCell::new(0),
                exit_chunks: UnsafeCell::new([(0, 0); MAX_EXIT_CHUNKS]),
            },
            process_token: AtomicU64::new(0),
            leased_bytes: AtomicU64::new(0),
            large_blocks: AtomicU32::new(0),
            gave_back: AtomicBool::new(false),
        }
    }

    /// Sets the token that makes owners unique across processes; call before use.
    pub fn set_process_token(&self, token: u64) {
        self.process_token
            .store(token & 0xffff_ffff_ffff, Ordering::Release);
    }

    #[inline]
    fn owner_id(&self, heap: usize) -> u64 {
        (self.process_token.load(Ordering::Relaxed) << 16) | heap as u64
    }

    /// Claims a free thread heap; `MAX_HEAPS - 1` (shared) when all are taken.
    pub fn claim(&self) -> usize {
        for (index, heap) in self.heaps.iter().enumerate().take(MAX_HEAPS - 1) {
            if !heap.in_use.load(Ordering::Relaxed)
                && heap
                    .in_use
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return index;
            }
        }
        MAX_HEAPS - 1
    }

    /// Gives a heap back (its thread exited); the next thread to claim it inherits its
    /// spans and free lists.
    pub fn release(&self, index: usize) {
        if index < MAX_HEAPS - 1 {
            self.heaps[index].in_use.store(false, Ordering::Release);
        }
    }

    fn lock(flag: &AtomicBool) {
        while flag
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
    }

    fn unlock(flag: &AtomicBool) {
        flag.store(false, Ordering::Release);
    }

    /// Allocates `size` bytes with heap `index`. None when no chunk can be had.
    #[inline]
    pub fn alloc(&self, index: usize, size: u64, source: &dyn ChunkSource) -> Option<u64> {
        let Some(class) = class_of(size) else {
            return self.alloc_large(size, source);
        };
        let shared = index == MAX_HEAPS - 1;
        let heap = &self.heaps[index];
        if shared {
            Heap::lock(&heap.lock);
        }
        // SAFETY: this thread holds heap `index` (or its lock).
        let result = unsafe { self.alloc_in(index, class, source) };
        if shared {
            Heap::unlock(&heap.lock);
        }
        result
    }

    /// # Safety
    /// The caller holds heap `index`.
    #[inline]
    unsafe fn alloc_in(&self, index: usize, class: usize, source: &dyn ChunkSource) -> Option<u64> {
        let heap = &self.heaps[index];
        let free = heap.free[class].get();
        if *free == 0 && !self.refill(index, class, source) {
            return None;
        }
        let block = *free;
        // The first word of a free block links to the next.
        *free = (block as *const u64).read();
        Some(block)
    }

    /// # Safety
    /// The caller holds heap `index`.
    unsafe fn refill(&self, index: usize, class: usize, source: &dyn ChunkSource) -> bool {
        let heap = &self.heaps[index];
        // 1. Blocks others freed into our spans.
        let mut span = *heap.spans[class].get();
        let mut scanned = 0;
        while span != 0 && scanned < 4096 {
            let header = &*(span as *const SpanHeader);
            if header.remote.load(Ordering::Relaxed) != 0 {
                let list = header.remote.swap(0, Ordering::Acquire);
                if list != 0 {
                    // Append our (empty) local list: the remote list becomes it.
                    *heap.free[class].get() = list;
                    return true;
                }
            }
            span = header.next;
            scanned += 1;
        }
        // 2. Carve a batch from the span being carved, or a new span.
        let block_bytes = CLASS_BYTES[class];
        let mut carving = *heap.carving[class].get();
        if carving != 0 {
            let header = &*(carving as *const SpanHeader);
            if header.bump + block_bytes > span_end(header) {
                carving = 0;
            }
        }
        if carving == 0 {
            let Some(new_span) = self.new_span(class, source) else {
                return false;
            };
            let header = &mut *(new_span as *mut SpanHeader);
            header.owner.store(self.owner_id(index), Ordering::Release);
            header.next = *heap.spans[class].get();
            *heap.spans[class].get() = new_span;
            *heap.carving[class].get() = new_span;
            carving = new_span;
        }
        // Through a raw pointer: other threads, processes or nodes may CAS the span's
        // `remote` meanwhile, so no `&mut` to the header.
        let header = carving as *mut SpanHeader;
        let end = span_end(&*header);
        let mut list = 0u64;
        let mut carved = 0;
        // Carve in address order, link in reverse so the list pops ascending.
        let mut blocks = [0u64; CARVE_BATCH];
        while carved < CARVE_BATCH && (*header).bump + block_bytes <= end {
            blocks[carved] = (*header).bump;
            (*header).bump += block_bytes;
            carved += 1;
        }
        for &block in blocks[..carved].iter().rev() {
            (block as *mut u64).write(list);
            list = block;
        }
        *heap.free[class].get() = list;
        carved > 0
    }

    fn new_span(&self, class: usize, source: &dyn ChunkSource) -> Option<u64> {
        let block_bytes = CLASS_BYTES[class];
        if block_bytes > SMALL_MAX_BYTES {
            // A whole chunk for one big-class span.
            let chunk = self.lease(1, source)?;
            // SAFETY: a fresh chunk of ours.
            unsafe { init_header(chunk, KIND_BIG, class, 1, block_bytes) };
            return Some(chunk);
        }
        Heap::lock(&self.pool.lock);
        // SAFETY: pool cells under the pool lock.
        let span = unsafe {
            let cursor = &mut *self.pool.span_cursor.get();
            let end = &mut *self.pool.span_end.get();
            if *cursor >= *end {
                Heap::unlock(&self.pool.lock);
                let chunk = self.lease(1, source)?;
                Heap::lock(&self.pool.lock);
                *cursor = chunk;
                *end = chunk + CHUNK_BYTES;
            }
            let span = *cursor;
            *cursor += SPAN_BYTES;
            span
        };
        Heap::unlock(&self.pool.lock);
        // SAFETY: a fresh span of ours.
        unsafe { init_header(span, KIND_SMALL, class, 0, block_bytes) };
        Some(span)
    }

    fn lease(&self, count: u64, source: &dyn ChunkSource) -> Option<u64> {
        let start = source.lease(count)?;
        debug_assert!(start % CHUNK_BYTES == 0, "chunks must be chunk-aligned");
        self.leased_bytes
            .fetch_add(count * CHUNK_BYTES, Ordering::Relaxed);
        Some(start)
    }

    fn alloc_large(&self, size: u64, source: &dyn ChunkSource) -> Option<u64> {
        let count = size.checked_add(HEADER_BYTES)?.div_ceil(CHUNK_BYTES);
        // Reuse the smallest freed run that fits.
        Heap::lock(&self.pool.lock);
        let mut reused = None;
        // SAFETY: under the pool lock.
        unsafe {
            let runs = &mut *self.pool.free_runs.get();
            let mut best: Option<usize> = None;
            for (i, &(start, chunks)) in runs.iter().enumerate() {
                if start != 0 && chunks >= count && best.is_none_or(|b| runs[b].1 > chunks) {
                    best = Some(i);
                }
            }
            if let Some(i) = best {
                reused = Some(runs[i]);
                *self.pool.cached_run_chunks.get() -= runs[i].1;
                runs[i] = (0, 0);
            }
        }
        Heap::unlock(&self.pool.lock);
        let (start, chunks) = match reused {
            Some(run) => run,
            None => (self.lease(count, source)?, count),
        };
        // SAFETY: a run of ours.
        unsafe { init_header(start, KIND_LARGE, 0, chunks as u32, size) };
        self.large_blocks.fetch_add(1, Ordering::Relaxed);
        Some(start + HEADER_BYTES)
    }

    /// Frees a block of this heap's allocator. `index` is the calling thread's heap;
    /// a large run may go back to `source`.
    ///
    /// # Safety
    /// `ptr` was returned by `alloc` (of any heap, process or node) and is not freed yet.
    #[inline]
    pub unsafe fn free(&self, index: usize, ptr: u64, source: &dyn ChunkSource) {
        let Some((header, block)) = locate(ptr) else {
            return;
        };
        if header.kind == KIND_LARGE {
            self.free_large(header, source);
            return;
        }
        let class = header.class as usize;
        let shared = index == MAX_HEAPS - 1;
        if header.owner.load(Ordering::Relaxed) == self.owner_id(index) {
            let heap = &self.heaps[index];
            if shared {
                Heap::lock(&heap.lock);
            }
            let free = heap.free[class].get();
            (block as *mut u64).write(*free);
            *free = block;
            if shared {
                Heap::unlock(&heap.lock);
            }
            return;
        }
        // Another thread's, process's or node's span: its remote list.
        let mut head = header.remote.load(Ordering::Relaxed);
        loop {
            (block as *mut u64).write(head);
            match header.remote.compare_exchange_weak(
                head,
                block,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    fn free_large(&self, header: &SpanHeader, source: &dyn ChunkSource) {
        let start = header as *const SpanHeader as u64;
        let chunks = header.run_chunks as u64;
        self.large_blocks.fetch_sub(1, Ordering::Relaxed);
        if self.cache_run(start, chunks, true) {
            return;
        }
        // Beyond the cache the run goes back (nothing is live in it: its only block was
        // just freed). A run that cannot go back is kept if there is room, else it
        // stays leased and unused.
        if !self.release_run(start, chunks, source) {
            self.cache_run(start, chunks, false);
        }
    }

    /// Keeps a freed run for reuse, if a slot is free and (`within_limit`) the cache
    /// stays within `MAX_CACHED_RUN_CHUNKS`. Takes the pool lock.
    fn cache_run(&self, start: u64, chunks: u64, within_limit: bool) -> bool {
        Heap::lock(&self.pool.lock);
        // SAFETY: under the pool lock.
        let cached = unsafe {
            let runs = &mut *self.pool.free_runs.get();
            let cached_chunks = &mut *self.pool.cached_run_chunks.get();
            let fits = !within_limit || *cached_chunks + chunks <= MAX_CACHED_RUN_CHUNKS;
            match runs.iter_mut().find(|r| r.0 == 0) {
                Some(slot) if fits => {
                    *slot = (start, chunks);
                    *cached_chunks += chunks;
                    true
                }
                _ => false,
            }
        };
        Heap::unlock(&self.pool.lock);
        cached
    }

    /// Gives back to `source` a run with no live block; false if it stays leased.
    fn release_run(&self, start: u64, chunks: u64, source: &dyn ChunkSource) -> bool {
        let released = source.release(start, chunks);
        if released {
            self.leased_bytes
                .fetch_sub(chunks * CHUNK_BYTES, Ordering::Relaxed);
        }
        released
    }
}

impl Heap {
    /// At process exit, while still attached: gives back to `source` every chunk that
    /// holds no live block, so a process that leaves a space others still use keeps out
    /// of the cluster's reach only the chunks of its live blocks. That is the freed large
    /// runs kept for reuse and, when no other thread holds a heap (a thread still
    /// running could allocate from them), the span chunks all of whose blocks are free.
    /// `own` is the calling thread's heap. What runs after (later destructors) may still
    /// allocate: the blocks given back leave every list first. Runs once; returns the
    /// chunks given back.
    pub fn give_back_at_exit(&self, own: Option<usize>, source: &dyn ChunkSource) -> u64 {
        if self.gave_back.swap(true, Ordering::AcqRel) {
            return 0;
        }
        let mut claimed = [false; MAX_HEAPS];
        let mut all_held = true;
        for (index, heap) in self.heaps.iter().enumerate().take(MAX_HEAPS - 1) {
            if own == Some(index) {
                continue;
            }
            if heap
                .in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                claimed[index] = true;
            } else {
                all_held = false;
            }
        }
        let shared = &self.heaps[MAX_HEAPS - 1];
        Heap::lock(&shared.lock);
        Heap::lock(&self.pool.lock);
        // SAFETY: the pool's cells under its lock; the heaps' cells with every heap held
        // (claimed, the caller's own, the shared one locked).
        let (runs, span_chunks) = unsafe {
            let runs = *self.pool.free_runs.get();
            *self.pool.free_runs.get() = [(0, 0); MAX_FREE_RUNS];
            *self.pool.cached_run_chunks.get() = 0;
            let span_chunks = if all_held {
                self.drop_empty_span_chunks()
            } else {
                0
            };
            (runs, span_chunks)
        };
        Heap::unlock(&self.pool.lock);
        Heap::unlock(&shared.lock);
        for (index, heap) in self.heaps.iter().enumerate() {
            if claimed[index] {
                heap.in_use.store(false, Ordering::Release);
            }
        }
        let mut given_chunks = 0;
        for &(start, chunks) in runs.iter().filter(|run| run.0 != 0) {
            if self.release_run(start, chunks, source) {
                given_chunks += chunks;
            } else {
                // Leased by another node: it stays for reuse.
                self.cache_run(start, chunks, false);
            }
        }
        let mut give = |start: u64, chunks: u64| {
            if self.release_run(start, chunks, source) {
                given_chunks += chunks;
            }
        };
        // SAFETY: only this call (once, `gave_back`) touches the table; its first
        // `span_chunks` entries are the chunks just dropped, in address order.
        let dropped = unsafe { &(&*self.pool.exit_chunks.get())[..span_chunks] };
        let mut run: Option<(u64, u64)> = None;
        for &(chunk, _) in dropped {
            run = match run {
                Some((start, chunks))
                    if start + chunks * CHUNK_BYTES == chunk && chunks < MAX_RELEASE_RUN_CHUNKS =>
                {
                    Some((start, chunks + 1))
                }
                Some((start, chunks)) => {
                    give(start, chunks);
                    Some((chunk, 1))
                }
                None => Some((chunk, 1)),
            };
        }
        if let Some((start, chunks)) = run {
            give(start, chunks);
        }
        given_chunks
    }

    /// Finds the span chunks with no live block, takes their spans and blocks out of
    /// every list, and leaves their addresses, sorted, at the start of the exit table.
    /// Gives up (returns 0, changes nothing) on a table overflow or a list longer than
    /// what was carved (a corrupted heap).
    ///
    /// # Safety
    /// The caller holds every heap and the pool.
    unsafe fn drop_empty_span_chunks(&self) -> usize {
        let table = &mut *self.pool.exit_chunks.get();
        table.fill((0, 0));
        // 1. Blocks carved, per chunk.
        let mut carved_blocks: u64 = 0;
        let mut spans_seen: u64 = 0;
        let span_limit = (MAX_EXIT_CHUNKS as u64) * (CHUNK_BYTES / SPAN_BYTES);
        for heap in &self.heaps {
            for class in 0..CLASSES {
                let mut span = *heap.spans[class].get();
                while span != 0 {
                    spans_seen += 1;
                    if spans_seen > span_limit {
                        return 0;
                    }
                    let header = &*(span as *const SpanHeader);
                    if !span_header_is_sane(header, class) {
                        return 0;
                    }
                    let Some(slot) = exit_slot(table, span & !(CHUNK_BYTES - 1), true) else {
                        return 0;
                    };
                    let carved = (header.bump - header.data_start) / header.block_bytes;
                    table[slot].1 += carved as i64;
                    carved_blocks += carved;
                    span = header.next;
                }
            }
        }
        // 2. Free blocks: the local lists, and each span's remote list (others' frees
        // only prepend to it, so the chain under the head read stays as it is).
        let mut free_left = carved_blocks;
        let mut count_free = |mut block: u64, table: &mut [(u64, i64); MAX_EXIT_CHUNKS]| {
            while block != 0 {
                if free_left == 0 {
                    return false;
                }
                free_left -= 1;
                let Some(slot) = exit_slot(table, block & !(CHUNK_BYTES - 1), false) else {
                    return false;
                };
                table[slot].1 -= 1;
                block = (block as *const u64).read();
            }
            true
        };
        for heap in &self.heaps {
            for class in 0..CLASSES {
                if !count_free(*heap.free[class].get(), table) {
                    return 0;
                }
                let mut span = *heap.spans[class].get();
                while span != 0 {
                    let header = &*(span as *const SpanHeader);
                    if !count_free(header.remote.load(Ordering::Acquire), table) {
                        return 0;
                    }
                    span = header.next;
                }
            }
        }
        // 3. Chunks with nothing live leave the span lists, the free lists, the spans
        // being carved and the pool's cursor.
        let dropped = |table: &[(u64, i64); MAX_EXIT_CHUNKS], addr: u64| {
            exit_probe(table, addr & !(CHUNK_BYTES - 1))
                .is_some_and(|(slot, found)| found && table[slot].1 == 0)
        };
        for heap in &self.heaps {
            for class in 0..CLASSES {
                let mut link: *mut u64 = heap.spans[class].get();
                while *link != 0 {
                    // Through raw pointers: others may CAS the header's `remote`.
                    let header = *link as *mut SpanHeader;
                    if dropped(table, *link) {
                        *link = (*header).next;
                    } else {
                        link = core::ptr::addr_of_mut!((*header).next);
                    }
                }
                let carving = heap.carving[class].get();
                if *carving != 0 && dropped(table, *carving) {
                    *carving = 0;
                }
                let mut link: *mut u64 = heap.free[class].get();
                while *link != 0 {
                    let block = *link as *mut u64;
                    if dropped(table, *link) {
                        *link = block.read();
                    } else {
                        link = block;
                    }
                }
            }
        }
        let cursor = &mut *self.pool.span_cursor.get();
        let end = &mut *self.pool.span_end.get();
        if *cursor < *end && dropped(table, *cursor) {
            *cursor = 0;
            *end = 0;
        }
        // 4. The dropped chunks, in address order, at the table's start.
        let mut count = 0;
        for index in 0..MAX_EXIT_CHUNKS {
            let (chunk, live) = table[index];
            if chunk != 0 && live == 0 {
                table[count] = (chunk, 0);
                count += 1;
            }
        }
        table[..count].sort_unstable();
        count
    }
}

/// A span header as this allocator writes it (of `class`, its bump inside the span,
/// its next span aligned): the exit count divides and follows links only through these.
fn span_header_is_sane(header: &SpanHeader, class: usize) -> bool {
    let start = header as *const SpanHeader as u64;
    header.magic == MAGIC
        && (header.kind == KIND_SMALL || header.kind == KIND_BIG)
        && header.class as usize == class
        && header.block_bytes == CLASS_BYTES[class]
        && header.data_start == start + HEADER_BYTES
        && header.data_start <= header.bump
        && header.bump <= span_end(header)
        && header.next.is_multiple_of(SPAN_BYTES)
}

/// Where `chunk` is in the exit table (open addressing): `(slot, true)` if there,
/// `(slot, false)` for the empty slot it would take; None when absent and full.
fn exit_probe(table: &[(u64, i64); MAX_EXIT_CHUNKS], chunk: u64) -> Option<(usize, bool)> {
    debug_assert!(chunk != 0 && chunk.is_multiple_of(CHUNK_BYTES));
    let start = ((chunk / CHUNK_BYTES) as usize).wrapping_mul(0x9e37_79b9) % MAX_EXIT_CHUNKS;
    (0..MAX_EXIT_CHUNKS)
        .map(|probe| (start + probe) % MAX_EXIT_CHUNKS)
        .find(|&slot| table[slot].0 == chunk || table[slot].0 == 0)
        .map(|slot| (slot, table[slot].0 == chunk))
}

/// The slot of `chunk` in the exit table, inserted if `insert`.
fn exit_slot(table: &mut [(u64, i64); MAX_EXIT_CHUNKS], chunk: u64, insert: bool) -> Option<usize> {
    match exit_probe(table, chunk)? {
        (slot, true) => Some(slot),
        (slot, false) if insert => {
            table[slot] = (chunk, 0);
            Some(slot)
        }
        _ => None,
    }
}

impl Default for Heap {
    fn default() -> Self {
        Heap::new()
    }
}

fn span_end(header: &SpanHeader) -> u64 {
    let start = header as *const SpanHeader as u64;
    match header.kind {
        KIND_SMALL => start + SPAN_BYTES,
        _ => start + CHUNK_BYTES,
    }
}

/// # Safety
/// `[at, at+bytes)` is memory of ours with no live blocks.
unsafe fn init_header(at: u64, kind: u32, class: usize, run_chunks: u32, block_bytes: u64) {
    let header = at as *mut SpanHeader;
    header.write(SpanHeader {
        magic: MAGIC,
        kind,
        class: class as u32,
        run_chunks,
        owner: AtomicU64::new(0),
        block_bytes,
        data_start: at + HEADER_BYTES,
        bump: at + HEADER_BYTES,
        remote: AtomicU64::new(0),
        next: 0,
    });
}

/// The header of the span holding `ptr`, and the start of `ptr`'s block (interior
/// pointers from aligned allocations map to their block).
///
/// # Safety
/// `ptr` is inside a chunk carved by this allocator.
#[inline]
unsafe fn locate(ptr: u64) -> Option<(&'static SpanHeader, u64)> {
    let chunk = ptr & !(CHUNK_BYTES - 1);
    let first = &*(chunk as *const SpanHeader);
    if first.magic != MAGIC {
        return None;
    }
    let header = match first.kind {
        KIND_SMALL => &*((ptr & !(SPAN_BYTES - 1)) as *const SpanHeader),
        KIND_BIG | KIND_LARGE => first,
        _ => return None,
    };
    if header.magic != MAGIC || ptr < header.data_start {
        return None;
    }
    if header.kind == KIND_LARGE {
        return Some((header, header.data_start));
    }
    // A stray pointer may land on bytes that look like a header: `free` indexes the
    // free lists by class, so an impossible class is not ours.
    if header.class as usize >= CLASSES {
        return None;
    }
    let offset = ptr - header.data_start;
    let magic = DIVISION_MAGIC[header.class as usize];
    let index = ((offset as u128 * magic as u128) >> 64) as u64;
    debug_assert_eq!(index, offset / header.block_bytes);
    Some((header, header.data_start + index * header.block_bytes))
}

/// Usable bytes of the block holding `ptr` from its start, if it is one of ours.
///
/// # Safety
/// As `locate`.
pub unsafe fn usable_size(ptr: u64) -> Option<u64> {
    let (header, block) = locate(ptr)?;
    Some(header.block_bytes - (ptr - block))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks from a private anonymous mapping (what fallback mode uses).
    struct Private;

    impl ChunkSource for Private {
        fn lease(&self, count: u64) -> Option<u64> {
            crate::sys::map_private_chunks(count * CHUNK_BYTES, CHUNK_BYTES)
        }
    }

    #[test]
    fn division_magic_is_exact_for_every_offset_in_a_chunk() {
        for class in 0..CLASSES {
            let size = CLASS_BYTES[class];
            for offset in (0..CHUNK_BYTES).step_by(7).chain([CHUNK_BYTES - 1]) {
                let magic = DIVISION_MAGIC[class];
                assert_eq!(
                    ((offset as u128 * magic as u128) >> 64) as u64,
                    offset / size
                );
            }
        }
    }

    #[test]
    fn classes_cover_every_size_in_order() {
        for size in 1..=BIG_MAX_BYTES {
            let class = class_of(size).unwrap();
            assert!(CLASS_BYTES[class] >= size);
            if class > 0 {
                assert!(CLASS_BYTES[class - 1] < size, "size {size} class {class}");
            }
        }
        assert_eq!(class_of(BIG_MAX_BYTES + 1), None);
        assert!(CLASS_BYTES.iter().all(|s| s % 16 == 0));
    }

    #[test]
    fn blocks_are_distinct_aligned_and_reused() {
        let heap = Box::new(Heap::new());
        heap.set_process_token(1);
        let index = heap.claim();
        let mut blocks = Vec::new();
        for i in 0..5000u64 {
            let size = 1 + (i * 37) % 3000;
            let block = heap.alloc(index, size, &Private).unwrap();
            assert_eq!(block % 16, 0);
            // SAFETY: a live block of `size` bytes.
            unsafe {
                assert!(usable_size(block).unwrap() >= size);
                core::ptr::write_bytes(block as *mut u8, (i % 251) as u8, size as usize);
            }
            blocks.push((block, size, (i % 251) as u8));
        }
        blocks.sort_unstable();
        for pair in blocks.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "blocks overlap");
        }
        for &(block, size, fill) in &blocks {
            // SAFETY: live blocks written above.
            let bytes = unsafe { core::slice::from_raw_parts(block as *const u8, size as usize) };
            assert!(bytes.iter().all(|&b| b == fill));
        }
        let leased = heap.leased_bytes.load(Ordering::Relaxed);
        for &(block, _, _) in &blocks {
            // SAFETY: each freed once.
            unsafe { heap.free(index, block, &Private) };
        }
        for i in 0..5000u64 {
            heap.alloc(index, 1 + (i * 37) % 3000, &Private).unwrap();
        }
        assert_eq!(
            heap.leased_bytes.load(Ordering::Relaxed),
            leased,
            "freed blocks were not reused"
        );
    }

    #[test]
    fn other_threads_frees_come_back_to_the_owner() {
        let heap: &'static Heap = Box::leak(Box::new(Heap::new()));
        heap.set_process_token(2);
        let owner = heap.claim();
        let blocks: Vec<u64> = (0..1000)
            .map(|_| heap.alloc(owner, 48, &Private).unwrap())
            .collect();
        let leased = heap.leased_bytes.load(Ordering::Relaxed);
        std::thread::scope(|scope| {
            for part in blocks.chunks(250) {
                scope.spawn(move || {
                    let mine = heap.claim();
                    for &block in part {
                        // SAFETY: freed once, by one thread.
                        unsafe { heap.free(mine, block, &Private) };
                    }
                    heap.release(mine);
                });
            }
        });
        let again: Vec<u64> = (0..1000)
            .map(|_| heap.alloc(owner, 48, &Private).unwrap())
            .collect();
        assert_eq!(heap.leased_bytes.load(Ordering::Relaxed), leased);
        let mut sorted = again.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 1000, "a block was handed out twice");
    }

    #[test]
    fn large_blocks_get_runs_and_are_reused() {
        let heap = Box::new(Heap::new());
        heap.set_process_token(3);
        let index = heap.claim();
        let a = heap.alloc(index, 3 << 20, &Private).unwrap();
        // SAFETY: a live large block.
        unsafe {
            assert!(usable_size(a).unwrap() >= 3 << 20);
            core::ptr::write_bytes(a as *mut u8, 1, 3 << 20);
            heap.free(index, a, &Private);
        }
        let b = heap.alloc(index, 2 << 20, &Private).unwrap();
        assert_eq!(a, b, "the freed run is reused");
    }

    /// Chunks from private mappings; given back chunks become inaccessible, so a block
    /// handed out from one after `give_back_at_exit` crashes the test.
    struct Recording {
        released: std::sync::Mutex<Vec<(u64, u64)>>,
    }

    impl ChunkSource for Recording {
        fn lease(&self, count: u64) -> Option<u64> {
            Private.lease(count)
        }
        fn release(&self, start: u64, count: u64) -> bool {
            // SAFETY: chunks this source mapped, with no live block in them.
            let rc = unsafe {
                libc::mprotect(
                    start as *mut libc::c_void,
                    (count * CHUNK_BYTES) as usize,
                    libc::PROT_NONE,
                )
            };
            assert_eq!(rc, 0);
            self.released.lock().unwrap().push((start, count));
            true
        }
    }

    fn recording() -> Recording {
        Recording {
            released: std::sync::Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn at_exit_chunks_without_live_blocks_go_back_and_live_ones_stay() {
        let heap = Box::new(Heap::new());
        heap.set_process_token(4);
        let source = recording();
        let main = heap.claim();
        let other = heap.claim();
        let sizes = [24u64, 200, 3000, 20_000, 100_000, 2 << 20, 5 << 20];
        let mut blocks: Vec<u64> = (0..3000)
            .map(|i| heap.alloc(main, sizes[i % sizes.len()], &source).unwrap())
            .collect();
        let keep = blocks.remove(1234);
        // SAFETY: live blocks of this heap; half freed by another thread's heap
        // (remote lists), half by the owner.
        unsafe {
            (keep as *mut u64).write(0x5eed);
            for (i, &block) in blocks.iter().enumerate() {
                heap.free(if i % 2 == 0 { main } else { other }, block, &source);
            }
        }
        heap.release(other);
        let leased = heap.leased_bytes.load(Ordering::Relaxed) / CHUNK_BYTES;
        // Runs beyond the cache went back at their free.
        let at_free = source.released.lock().unwrap().len();
        let given = heap.give_back_at_exit(Some(main), &source);
        let released = source.released.lock().unwrap().clone();
        assert_eq!(released[at_free..].iter().map(|r| r.1).sum::<u64>(), given);
        // Everything but the chunk holding `keep`.
        let keep_chunk = keep & !(CHUNK_BYTES - 1);
        assert!(
            released
                .iter()
                .all(|&(start, count)| keep_chunk < start
                    || keep_chunk >= start + count * CHUNK_BYTES)
        );
        assert_eq!(heap.leased_bytes.load(Ordering::Relaxed) / CHUNK_BYTES, 1);
        assert!(given + 1 >= leased, "gave {given} of {leased}");
        // The live block is intact, and later allocations never land in a chunk given
        // back (they would fault: those chunks are PROT_NONE).
        // SAFETY: a live block.
        unsafe { assert_eq!((keep as *const u64).read(), 0x5eed) };
        for &size in &sizes {
            let block = heap.alloc(main, size, &source).unwrap();
            // SAFETY: a fresh block of `size` bytes.
            unsafe { core::ptr::write_bytes(block as *mut u8, 7, size as usize) };
        }
        assert_eq!(heap.give_back_at_exit(Some(main), &source), 0, "runs once");
    }

    #[test]
    fn at_exit_spans_stay_while_another_thread_holds_a_heap() {
        let heap = Box::new(Heap::new());
        heap.set_process_token(5);
        let source = recording();
        let main = heap.claim();
        let _running = heap.claim();
        let small = heap.alloc(main, 64, &source).unwrap();
        let large = heap.alloc(main, 3 << 20, &source).unwrap();
        // SAFETY: live blocks of this heap.
        unsafe {
            heap.free(main, small, &source);
            heap.free(main, large, &source);
        }
        // The cached run goes back; the small span's chunk stays for the running thread.
        assert_eq!(heap.give_back_at_exit(Some(main), &source), 4);
        assert_eq!(heap.leased_bytes.load(Ordering::Relaxed), CHUNK_BYTES);
        assert_eq!(heap.alloc(main, 64, &source), Some(small));
    }
}
