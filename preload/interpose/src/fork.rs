//! Fork, and private chunks.
//!
//! The space is a MAP_SHARED mapping of the daemon's memfd, so a forked child would
//! share its parent's pages. The child handler replaces every page of the space the
//! child can read with a private copy (pages it cannot read become private and
//! inaccessible), forgets the parent's daemon connections, and switches the child to
//! a private heap: it keeps its parent's blocks (copies) and allocates new ones from
//! private chunks. A child that execs starts afresh (LD_PRELOAD attaches it anew).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use gallocy::{runtime, sys};

const MAX_LOCAL_REGIONS: usize = 4096;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static LOCAL_START: [AtomicU64; MAX_LOCAL_REGIONS] = [ZERO; MAX_LOCAL_REGIONS];
static LOCAL_END: [AtomicU64; MAX_LOCAL_REGIONS] = [ZERO; MAX_LOCAL_REGIONS];
/// The space's range, kept in a forked child (its private copy).
static PRIVATE_BASE: AtomicU64 = AtomicU64::new(0);
static PRIVATE_SIZE: AtomicU64 = AtomicU64::new(0);

pub fn register_local_region(start: u64, len: u64) {
    for i in 0..MAX_LOCAL_REGIONS {
        if LOCAL_START[i]
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            LOCAL_END[i].store(start + len, Ordering::Release);
            return;
        }
    }
    // Beyond the table, blocks of this region are never freed (a leak, not a crash).
}

#[inline]
pub fn in_local_region(addr: u64) -> bool {
    for i in 0..MAX_LOCAL_REGIONS {
        let start = LOCAL_START[i].load(Ordering::Acquire);
        if start == 0 {
            return false;
        }
        if addr >= start && addr < LOCAL_END[i].load(Ordering::Acquire) {
            return true;
        }
    }
    false
}

#[inline]
pub fn in_private_space(addr: u64) -> bool {
    let base = PRIVATE_BASE.load(Ordering::Acquire);
    base != 0 && addr >= base && addr - base < PRIVATE_SIZE.load(Ordering::Acquire)
}

/// The forking thread waits on this pipe until the child has copied the space, so that
/// thread's later writes are not in the copy. Other threads of the parent (and other
/// nodes) may still write before the copy is taken (docs/preload.md).
static HANDSHAKE_READ: AtomicI32 = AtomicI32::new(-1);
static HANDSHAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Before fork, in the parent.
pub extern "C" fn before_fork() {
    if !crate::attached() {
        return;
    }
    let mut fds = [-1i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        HANDSHAKE_READ.store(fds[0], Ordering::Release);
        HANDSHAKE_WRITE.store(fds[1], Ordering::Release);
    }
}

/// After fork, in the parent: wait until the child has its private copy.
pub extern "C" fn after_fork_in_parent() {
    let read = HANDSHAKE_READ.swap(-1, Ordering::AcqRel);
    let write = HANDSHAKE_WRITE.swap(-1, Ordering::AcqRel);
    sys::close(write);
    if read >= 0 {
        let mut byte = [0u8; 1];
        // Returns when the child writes, or at end of file if it died first.
        let _ = sys::read_some(read, &mut byte);
        sys::close(read);
    }
}

/// Runs in the child after fork, before fork() returns there: one thread.
pub extern "C" fn after_fork_in_child() {
    let read = HANDSHAKE_READ.swap(-1, Ordering::AcqRel);
    let write = HANDSHAKE_WRITE.swap(-1, Ordering::AcqRel);
    sys::close(read);
    if crate::attached() {
        let base = runtime::base_addr();
        let size = runtime::space_size();
        let aliases = runtime::aliases();
        runtime::forget_after_fork();
        privatize(base, base + size);
        // The executable's globals, when they are space pages: the child keeps its
        // own copy, readable parts with their bytes.
        for (start, len) in aliases {
            if len != 0 {
                privatize(start, start + len);
            }
        }
        PRIVATE_BASE.store(base, Ordering::Release);
        PRIVATE_SIZE.store(size, Ordering::Release);
        crate::become_local();
    }
    if write >= 0 {
        let _ = sys::write_all_fd(write, b"1");
        sys::close(write);
    }
}

const MAX_RANGES: usize = 16384;

struct Ranges(UnsafeCell<[(u64, u64, bool); MAX_RANGES]>);

// SAFETY: used only by the child handler, when the child has a single thread.
unsafe impl Sync for Ranges {}

static RANGES: Ranges = Ranges(UnsafeCell::new([(0, 0, false); MAX_RANGES]));

/// Replaces the shared mapping of `[start, end)` with private memory holding the same
/// bytes where the process could read them.
fn privatize(start: u64, end: u64) {
    // Collect the space's mappings first: remapping changes /proc/self/maps.
    // SAFETY: the child has one thread; nothing else uses RANGES.
    let ranges = unsafe { &mut *RANGES.0.get() };
    let mut count = 0;
    let listed = runtime::for_each_mapping(|a, b, line| {
        if a >= start && b <= end && count < ranges.len() {
            let perms = line.iter().position(|&c| c == b' ').map(|p| p + 1);
            let read = matches!(perms, Some(p) if p < line.len() && line[p] == b'r');
            ranges[count] = (a, b, read);
            count += 1;
        }
    });
    if !listed {
        // Without the map, make everything private and inaccessible: the child
        // cannot write the parent's pages.
        remap_private(start, end - start, false);
        return;
    }
    for &(a, b, read) in &ranges[..count] {
        remap_private(a, b - a, read);
    }
}

/// Private memory over `[addr, addr+len)`: a copy of the bytes if readable, read-write
/// in the child; inaccessible otherwise.
fn remap_private(addr: u64, len: u64, readable: bool) {
    if readable {
        if let Some(copy) = sys::map_private_chunks(len, 4096) {
            // SAFETY: both ranges are mapped and readable; disjoint.
            unsafe {
                core::ptr::copy_nonoverlapping(addr as *const u8, copy as *mut u8, len as usize)
            };
            sys::map_private_fixed(addr, len, true);
            // SAFETY: the private range is now writable.
            unsafe {
                core::ptr::copy_nonoverlapping(copy as *const u8, addr as *mut u8, len as usize)
            };
            sys::unmap(copy, len);
            return;
        }
    }
    sys::map_private_fixed(addr, len, false);
}
