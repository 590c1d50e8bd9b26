//! The bootstrap arena: blocks for allocations made before the runtime is attached
//! (ld.so, libc start-up, the attach itself). A bump allocator over a static buffer;
//! freeing is a no-op (these blocks are few and small).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

const ARENA_BYTES: usize = 16 << 20;
const HEADER_BYTES: usize = 16;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: disjoint ranges are handed out by an atomic bump pointer.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0u8; ARENA_BYTES]));
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn base() -> usize {
    ARENA.0.get() as usize
}

#[inline]
pub fn contains(addr: u64) -> bool {
    let addr = addr as usize;
    addr >= base() && addr < base() + ARENA_BYTES
}

pub fn allocate(size: usize, align: usize) -> *mut core::ffi::c_void {
    let align = align.max(16);
    let mut current = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base() + current + HEADER_BYTES).next_multiple_of(align);
        let Some(end) = start.checked_add(size.max(1)) else {
            return core::ptr::null_mut();
        };
        if end > base() + ARENA_BYTES {
            gallocy::runtime::set_errno(libc::ENOMEM);
            return core::ptr::null_mut();
        }
        let next = end - base();
        match NEXT.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: [start-16, end) is ours alone; record the size before it.
                unsafe { ((start - HEADER_BYTES) as *mut usize).write(size) };
                return start as *mut core::ffi::c_void;
            }
            Err(seen) => current = seen,
        }
    }
}

pub fn usable(addr: u64) -> usize {
    // SAFETY: every arena block is preceded by its size.
    unsafe { ((addr as usize - HEADER_BYTES) as *const usize).read() }
}
