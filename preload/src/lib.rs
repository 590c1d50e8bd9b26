//! libgallocy: the explicit C API of gallocy (`preload/include/gallocy.h`) and the
//! in-process runtime under it.
//!
//! Everything after `gallocy_attach` — the allocation calls, the fault handler, the
//! IPC — runs on raw system calls and stack buffers: it never calls the system
//! allocator, so it can later serve as the allocator itself (LD_PRELOAD).

mod futex_trap;
pub mod heap;
pub mod report;
pub mod runtime;
mod stack;
pub mod sys;
pub mod threads;

use core::ffi::{c_char, c_int, c_void, CStr};

use gallocy_core::ipc::{ErrorCode, IpcMessage, IpcStats};

use crate::report::Message;
use crate::runtime::{call, describe, errno_of, set_errno, set_last_error, CallError};

/// Every block starts with this header: its usable size and a check word.
const HEADER_BYTES: u64 = 16;
const HEADER_MAGIC: u64 = 0x6761_6c6c_6f63_7921;

fn header_check(block: u64, size: u64) -> u64 {
    HEADER_MAGIC ^ block ^ size.rotate_left(17)
}

fn allocate(size: u64) -> *mut c_void {
    let Some(request) = size.checked_add(HEADER_BYTES) else {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    match call(IpcMessage::Allocate {
        size_bytes: request,
        align_bytes: 16,
    }) {
        Ok(IpcMessage::Allocated { addr, size_bytes }) => {
            let usable = size_bytes - HEADER_BYTES;
            let header = addr as *mut u64;
            // SAFETY: the daemon just carved [addr, addr+size_bytes) for us, inside the
            // mapped space; touching it faults in the page through our handler.
            unsafe {
                header.write(usable);
                header.add(1).write(header_check(addr, usable));
            }
            (addr + HEADER_BYTES) as *mut c_void
        }
        Ok(_) => {
            set_errno(libc::EIO);
            core::ptr::null_mut()
        }
        Err(error) => {
            note_error(b"malloc", error);
            set_errno(errno_of(error));
            core::ptr::null_mut()
        }
    }
}

fn note_error(what: &[u8], error: CallError) {
    set_last_error(|m| {
        m.str("gallocy_").text(what).str(": ");
        describe(m, error);
    });
}

/// The usable size recorded in a block's header, if `ptr` looks like one of ours.
fn usable_size(ptr: *mut c_void) -> Option<u64> {
    let addr = ptr as u64;
    let block = addr.wrapping_sub(HEADER_BYTES);
    // The header must lie wholly in the space: a pointer past its end would read
    // memory that is not ours.
    if !addr.is_multiple_of(16)
        || addr < HEADER_BYTES
        || !runtime::in_space(block)
        || !runtime::in_space(addr - 1)
    {
        return None;
    }
    let header = block as *const u64;
    // SAFETY: inside the attached space (checked above); reading faults the page in.
    let (size, check) = unsafe { (header.read(), header.add(1).read()) };
    (check == header_check(block, size)).then_some(size)
}

/// Marks the header of a live block (`usable_size` says so) freed, with a compare and
/// swap in the space (sequentially consistent across nodes, so two frees of one block
/// cannot both win). False if it was not a live block.
fn free_orphan(ptr: *mut c_void) -> bool {
    let Some(size) = usable_size(ptr) else {
        return false;
    };
    let block = (ptr as u64).wrapping_sub(HEADER_BYTES);
    let check = header_check(block, size);
    // SAFETY: the header's second word, 8-aligned inside the space (checked by
    // `usable_size`); atomics on it go through the page like any access.
    let word = unsafe { core::sync::atomic::AtomicU64::from_ptr((block + 8) as *mut u64) };
    word.compare_exchange(
        check,
        !check,
        core::sync::atomic::Ordering::AcqRel,
        core::sync::atomic::Ordering::Acquire,
    )
    .is_ok()
}

fn attach(space: *const c_char, create: bool) -> c_int {
    if space.is_null() {
        set_last_error(|m| {
            m.str("gallocy_attach: space name is NULL");
        });
        return -libc::EINVAL;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(space) };
    // An instance of a program `gallocy run` launched is attached to the program's
    // space before main (every instance must be): the program's own attach is that.
    if threads::program() != 0 && runtime::is_attached() {
        return 0;
    }
    runtime::attach(name.to_bytes(), create)
}

#[no_mangle]
pub extern "C" fn gallocy_attach(space: *const c_char) -> c_int {
    attach(space, true)
}

#[no_mangle]
pub extern "C" fn gallocy_attach_existing(space: *const c_char) -> c_int {
    attach(space, false)
}

#[no_mangle]
pub extern "C" fn gallocy_detach() -> c_int {
    runtime::detach()
}

#[no_mangle]
pub extern "C" fn gallocy_malloc(size: usize) -> *mut c_void {
    allocate(size.max(1) as u64)
}

#[no_mangle]
pub extern "C" fn gallocy_calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    let ptr = allocate(total.max(1) as u64);
    if !ptr.is_null() {
        // Reused blocks hold old data.
        // SAFETY: the block has at least `total` usable bytes.
        unsafe { core::ptr::write_bytes(ptr.cast::<u8>(), 0, total) };
    }
    ptr
}

#[no_mangle]
pub extern "C" fn gallocy_free(ptr: *mut c_void) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: this thread's errno slot.
    let saved = unsafe { *libc::__errno_location() };
    let addr = ptr as u64;
    match call(IpcMessage::Free {
        addr: addr.wrapping_sub(HEADER_BYTES),
    }) {
        Ok(_) => {}
        // The node that carved it went down, and its allocator's record of the block
        // with it: the block's header (in the space, recovered with its page) says
        // whether it is live; freeing marks the header, once. Its memory stays unused.
        Err(CallError::Refused(ErrorCode::NodeDown, _)) if free_orphan(ptr) => {}
        Err(error) => {
            note_error(b"free", error);
            let mut message = Message::new();
            message.str("gallocy: free(").hex(addr).str("): ");
            describe(&mut message, error);
            message.emit();
        }
    }
    set_errno(saved);
}

#[no_mangle]
pub extern "C" fn gallocy_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    if ptr.is_null() {
        return gallocy_malloc(size);
    }
    if size == 0 {
        gallocy_free(ptr);
        return core::ptr::null_mut();
    }
    let Some(old) = usable_size(ptr) else {
        let mut message = Message::new();
        message
            .str("gallocy: realloc(")
            .hex(ptr as u64)
            .str("): not a gallocy block");
        message.emit();
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    };
    if size as u64 <= old {
        return ptr;
    }
    let new = gallocy_malloc(size);
    if new.is_null() {
        return new;
    }
    // SAFETY: both blocks are live, disjoint, and at least `old` bytes long.
    unsafe { core::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), old as usize) };
    gallocy_free(ptr);
    new
}

#[no_mangle]
pub extern "C" fn gallocy_usable_size(ptr: *mut c_void) -> usize {
    usable_size(ptr).unwrap_or(0) as usize
}

#[no_mangle]
pub extern "C" fn gallocy_root() -> *mut c_void {
    if !runtime::is_attached() {
        return core::ptr::null_mut();
    }
    runtime::base_addr() as *mut c_void
}

#[no_mangle]
pub extern "C" fn gallocy_root_size() -> usize {
    runtime::root_size() as usize
}

#[no_mangle]
pub extern "C" fn gallocy_ping() -> c_int {
    match call(IpcMessage::Ping) {
        Ok(IpcMessage::Pong) => 0,
        Ok(_) => -libc::EPROTO,
        Err(error) => {
            note_error(b"ping", error);
            -errno_of(error)
        }
    }
}

/// gallocy.h: sleeps while `*addr == expected` (a word of the space), at most
/// `timeout_ms` (0: no limit). 0 when woken (or spuriously), -EAGAIN if the word
/// differs, -ETIMEDOUT, or another negative errno.
#[no_mangle]
pub extern "C" fn gallocy_futex_wait(addr: *const u32, expected: u32, timeout_ms: u32) -> c_int {
    match runtime::futex_wait(addr as u64, expected, timeout_ms) {
        Ok(end) => end.result(),
        Err(error) => {
            note_error(b"futex wait", error);
            -errno_of(error)
        }
    }
}

/// gallocy.h: wakes up to `count` waiters on `addr` on this node and on each other
/// node. How many were woken in all, or a negative errno.
#[no_mangle]
pub extern "C" fn gallocy_futex_wake(addr: *const u32, count: u32) -> c_int {
    match runtime::futex_wake(addr as u64, count) {
        Ok(woken) => woken.min(c_int::MAX as u32) as c_int,
        Err(error) => {
            note_error(b"futex wake", error);
            -errno_of(error)
        }
    }
}

/// gallocy.h: returns once every write this process made to the space before the
/// call is on k nodes. 0 or a negative errno.
#[no_mangle]
pub extern "C" fn gallocy_sync() -> c_int {
    match runtime::sync() {
        Ok(()) => 0,
        Err(error) => {
            note_error(b"sync", error);
            -errno_of(error)
        }
    }
}

/// The start routine of a thread, as pthread_create takes it.
pub type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;

/// gallocy.h: `pthread_create` that places the thread by the program's policy (round
/// robin over the nodes unless `GALLOCY_PLACEMENT=local`); a plain glibc thread when
/// the process is not an instance of a program `gallocy run` launched.
///
/// # Safety
/// As `pthread_create`.
#[no_mangle]
pub unsafe extern "C" fn gallocy_pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    match threads::placement() {
        // SAFETY: per the contract.
        Some(node) => unsafe { threads::create(thread, attr, start, arg, node) },
        // SAFETY: per the contract.
        None => unsafe { threads::real().create(thread, attr, start, arg) },
    }
}

/// gallocy.h: `pthread_create` on node `node` (1-based) of the program's cluster.
/// EINVAL for a node that is not a member; ENOTSUP outside a launched program.
///
/// # Safety
/// As `pthread_create`.
#[no_mangle]
pub unsafe extern "C" fn gallocy_pthread_create_on(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
    node: u32,
) -> c_int {
    if !threads::distributes() {
        return libc::ENOTSUP;
    }
    // SAFETY: per the contract.
    unsafe { threads::create(thread, attr, start, arg, node as u64) }
}

/// gallocy.h: `pthread_join` of any thread, wherever it runs.
///
/// # Safety
/// As `pthread_join`.
#[no_mangle]
pub unsafe extern "C" fn gallocy_pthread_join(
    thread: libc::pthread_t,
    result: *mut *mut c_void,
) -> c_int {
    if threads::is_thread(thread) {
        // SAFETY: per the contract.
        return unsafe { threads::join(thread, result) };
    }
    // SAFETY: a glibc thread; per the contract.
    unsafe { libc::pthread_join(thread, result) }
}

/// `struct gallocy_stats` in gallocy.h: the IPC counters, laid out for C.
pub type GallocyStats = IpcStats;

// gallocy.h: five uint64_t then two uint32_t.
const _: () = assert!(core::mem::size_of::<GallocyStats>() == 48);

/// # Safety
/// `out` must be null or point to a writable `struct gallocy_stats`.
#[no_mangle]
pub unsafe extern "C" fn gallocy_stats(out: *mut GallocyStats) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    match call(IpcMessage::Stats) {
        Ok(IpcMessage::StatsReply(stats)) => {
            // SAFETY: the caller passes a valid struct gallocy_stats.
            unsafe { out.write(stats) };
            0
        }
        Ok(_) => -libc::EPROTO,
        Err(error) => {
            note_error(b"stats", error);
            -errno_of(error)
        }
    }
}

#[no_mangle]
pub extern "C" fn gallocy_last_error() -> *const c_char {
    runtime::last_error_ptr()
}

#[no_mangle]
pub extern "C" fn gallocy_strerror(error: c_int) -> *const c_char {
    let text: &'static CStr = match -error {
        0 => c"success",
        libc::ENOENT => c"no such daemon socket or space",
        libc::ECONNREFUSED => c"no daemon listening on the socket",
        libc::EACCES => c"permission denied by the daemon",
        libc::EPROTO => c"protocol version mismatch between library and daemon",
        libc::EEXIST => c"the space's address range clashes with an existing mapping",
        libc::ENOMEM => c"out of memory in the space",
        libc::ENOTCONN => c"not attached to a space",
        libc::EISCONN => c"already attached to a space",
        libc::ENAMETOOLONG => c"name too long",
        libc::EINVAL => c"invalid argument",
        libc::EIO => c"page lost or node down",
        libc::EAGAIN => c"daemon busy, retry",
        _ => c"unknown gallocy error",
    };
    text.as_ptr()
}
