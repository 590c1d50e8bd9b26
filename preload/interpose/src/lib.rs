//! libgallocy_preload.so: run an unmodified program with its whole heap in a gallocy
//! space. Loaded with LD_PRELOAD (`gallocy run` does it), it attaches to the daemon at
//! `$GALLOCY_SOCKET` (space `$GALLOCY_SPACE`, default `default`) from a constructor,
//! and serves the malloc family from the in-process heap (`gallocy::heap`) on chunks
//! leased from the daemon.
//!
//! Re-entry: nothing here calls the system allocator, `dlsym`, or allocating libc
//! functions. Before attach completes (ld.so, libc start-up, the attach itself), blocks
//! come from a static bootstrap arena; freeing them later is a no-op.

mod arena;
mod fork;
mod pthreads;
mod syscalls;

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use gallocy::heap::{self, ChunkSource, Heap, CHUNK_BYTES, MAX_HEAPS};
use gallocy::report::Message;
use gallocy::runtime::{self, getenv, set_errno};
use gallocy::sys;
use gallocy_core::ipc::IpcMessage;

/// Not yet initialised: the bootstrap arena serves.
const MODE_BOOT: u8 = 0;
/// Attached to a daemon: chunks are leased in the space.
const MODE_ATTACHED: u8 = 2;
/// A private heap: GALLOCY_FALLBACK=local, or a forked child.
const MODE_LOCAL: u8 = 3;

pub const EXIT_NO_DAEMON: i32 = 85;

static MODE: AtomicU8 = AtomicU8::new(MODE_BOOT);
static HEAP: Heap = Heap::new();
/// The pthread key whose destructor gives a thread's heap back.
static HEAP_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);

// Per-thread allocator state: `[heap index + 1 (0: none yet), inside the allocator]`.
//
// Initial-exec TLS, as the allocator of a preloaded library must use: one `fs`-relative
// load, no `__tls_get_addr` call (which may allocate, and costs more than a malloc).
// Stable Rust cannot ask for the TLS model, so the variable is declared in assembly.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".section .tbss,\"awT\",@nobits",
    ".p2align 4",
    "gallocy_thread_state:",
    ".zero 16",
    ".text",
);

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn thread_state() -> *mut [u64; 2] {
    let state: *mut [u64; 2];
    // SAFETY: reads the thread pointer and the static TLS offset of our variable
    // (initial-exec model); the result is this thread's 16 bytes.
    unsafe {
        core::arch::asm!(
            "mov {0}, qword ptr fs:[0]",
            "add {0}, qword ptr [rip + gallocy_thread_state@GOTTPOFF]",
            out(reg) state,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    state
}

#[cfg(not(target_arch = "x86_64"))]
thread_local! {
    static THREAD_STATE: core::cell::UnsafeCell<[u64; 2]> = const { core::cell::UnsafeCell::new([0, 0]) };
}

#[cfg(not(target_arch = "x86_64"))]
fn thread_state() -> *mut [u64; 2] {
    THREAD_STATE.with(|cell| cell.get())
}

/// Times the allocator was entered from inside itself (must stay zero).
static REENTRIES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Runs `f` as one allocator entry with this thread's heap index, counting re-entries.
#[inline(always)]
fn entry<T>(f: impl FnOnce(usize) -> T) -> T {
    let state = thread_state();
    // SAFETY: this thread's own state; nothing else touches it.
    unsafe {
        let nested = (*state)[1];
        if nested != 0 {
            REENTRIES.fetch_add(1, Ordering::Relaxed);
        }
        (*state)[1] = 1;
        let mut index = (*state)[0];
        if index == 0 {
            index = claim_heap() as u64 + 1;
            (*state)[0] = index;
        }
        let result = f(index as usize - 1);
        (*state)[1] = nested;
        result
    }
}

/// How often the allocator was re-entered (tests assert zero).
#[no_mangle]
pub extern "C" fn gallocy_preload_reentries() -> u64 {
    REENTRIES.load(Ordering::Relaxed)
}

/// Chunks leased from the daemon, taken for writing in one round trip per 16 MiB.
struct DaemonChunks;

impl ChunkSource for DaemonChunks {
    fn lease(&self, count: u64) -> Option<u64> {
        let Ok(IpcMessage::Leased { addr, size_bytes }) = runtime::call(IpcMessage::LeaseChunks {
            count: count as u32,
        }) else {
            return None;
        };
        runtime::take_range(addr, size_bytes, true).ok()?;
        Some(addr)
    }

    fn release(&self, start: u64, count: u64) -> bool {
        let Ok(count) = u32::try_from(count) else {
            return false;
        };
        matches!(
            runtime::call(IpcMessage::ReleaseChunks { addr: start, count }),
            Ok(IpcMessage::Freed)
        )
    }
}

/// Private chunks, when no daemon serves this process.
struct LocalChunks;

impl ChunkSource for LocalChunks {
    fn lease(&self, count: u64) -> Option<u64> {
        let start = sys::map_private_chunks(count * CHUNK_BYTES, CHUNK_BYTES)?;
        fork::register_local_region(start, count * CHUNK_BYTES);
        Some(start)
    }
}

fn source(mode: u8) -> &'static dyn ChunkSource {
    if mode == MODE_ATTACHED {
        &DaemonChunks
    } else {
        &LocalChunks
    }
}

extern "C" fn release_heap(value: *mut c_void) {
    let index = value as usize;
    if index > 0 {
        HEAP.release(index - 1);
    }
    // SAFETY: this thread's own state.
    unsafe { (*thread_state())[0] = 0 };
}

/// A heap for this thread, given back by `release_heap` when the thread exits.
fn claim_heap() -> usize {
    let index = HEAP.claim();
    let key = HEAP_KEY.load(Ordering::Acquire);
    if key != usize::MAX && index != MAX_HEAPS - 1 {
        // SAFETY: a key created at init; low key numbers never allocate.
        unsafe {
            libc::pthread_setspecific(key as libc::pthread_key_t, (index + 1) as *const c_void)
        };
    }
    index
}

/// Whether `ptr` is a block of our heap (not the arena, not foreign memory).
fn ours(ptr: u64) -> bool {
    match MODE.load(Ordering::Acquire) {
        MODE_ATTACHED => runtime::in_space(ptr) || fork::in_local_region(ptr),
        MODE_LOCAL => fork::in_private_space(ptr) || fork::in_local_region(ptr),
        _ => false,
    }
}

fn allocate(index: usize, size: usize, align: usize) -> *mut c_void {
    let mode = MODE.load(Ordering::Acquire);
    if mode != MODE_ATTACHED && mode != MODE_LOCAL {
        return arena::allocate(size, align);
    }
    let align = align.max(16) as u64;
    let Some(request) = (size.max(1) as u64).checked_add(align - 16) else {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    match HEAP.alloc(index, request, source(mode)) {
        Some(block) => ((block + align - 1) & !(align - 1)) as *mut c_void,
        None => {
            set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

fn usable(ptr: *mut c_void) -> usize {
    let addr = ptr as u64;
    if arena::contains(addr) {
        return arena::usable(addr);
    }
    if !ours(addr) {
        return 0;
    }
    // SAFETY: a live block of our heap.
    unsafe { heap::usable_size(addr) }.unwrap_or(0) as usize
}

#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    entry(|index| allocate(index, size, 16))
}

#[no_mangle]
pub extern "C" fn free(ptr: *mut c_void) {
    if ptr.is_null() {
        return;
    }
    let addr = ptr as u64;
    if arena::contains(addr) || !ours(addr) {
        return;
    }
    // SAFETY: the block is ours and freed once by contract. (Freeing makes no system
    // call, so errno is preserved.)
    entry(|index| unsafe { HEAP.free(index, addr, source(MODE.load(Ordering::Acquire))) });
}

#[no_mangle]
pub extern "C" fn cfree(ptr: *mut c_void) {
    free(ptr)
}

#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    let ptr = entry(|index| allocate(index, total, 16));
    if !ptr.is_null() {
        // SAFETY: the block has at least `total` bytes; recycled blocks hold old data.
        unsafe { core::ptr::write_bytes(ptr.cast::<u8>(), 0, total) };
    }
    ptr
}

#[no_mangle]
pub extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    if ptr.is_null() {
        return malloc(size);
    }
    if size == 0 {
        free(ptr);
        return core::ptr::null_mut();
    }
    let old = usable(ptr);
    if old == 0 && !arena::contains(ptr as u64) {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    if size <= old && !arena::contains(ptr as u64) {
        return ptr;
    }
    let new = malloc(size);
    if new.is_null() {
        return new;
    }
    // SAFETY: both blocks live and disjoint; copy what both hold.
    unsafe { core::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), old.min(size)) };
    free(ptr);
    new
}

#[no_mangle]
pub extern "C" fn reallocarray(ptr: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => realloc(ptr, total),
        None => {
            set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

fn valid_alignment(align: usize) -> bool {
    align.is_power_of_two() && align <= (CHUNK_BYTES / 4) as usize
}

#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if !valid_alignment(align) {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    entry(|index| allocate(index, size, align))
}

#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    memalign(align, size)
}

/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !valid_alignment(align) || align < core::mem::size_of::<usize>() {
        return libc::EINVAL;
    }
    let ptr = entry(|index| allocate(index, size, align));
    if ptr.is_null() {
        return libc::ENOMEM;
    }
    out.write(ptr);
    0
}

#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    memalign(4096, size)
}

#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(rounded) = size.max(1).checked_add(4095) else {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    memalign(4096, rounded & !4095)
}

#[no_mangle]
pub extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() {
        return 0;
    }
    usable(ptr)
}

extern "C" fn init() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: creating a key with a destructor; glibc keeps low keys in a static table.
    if unsafe { libc::pthread_key_create(&mut key, Some(release_heap)) } == 0 {
        HEAP_KEY.store(key as usize, Ordering::Release);
    }
    // SAFETY: registering a child handler that only uses raw system calls and statics.
    unsafe {
        libc::pthread_atfork(
            Some(fork::before_fork),
            Some(fork::after_fork_in_parent),
            Some(fork::after_fork_in_child),
        )
    };
    let space = getenv(c"GALLOCY_SPACE").unwrap_or(b"default");
    let fallback = getenv(c"GALLOCY_FALLBACK") == Some(b"local");
    if getenv(c"GALLOCY_SOCKET").is_none() && fallback {
        start_local();
        return;
    }
    if is_exec_descendant() {
        start_local();
        return;
    }
    let rc = runtime::attach(space, true);
    if rc == 0 && runtime::chunk_size() == CHUNK_BYTES {
        HEAP.set_process_token(((runtime::node_id() as u64) << 32) | runtime::session());
        MODE.store(MODE_ATTACHED, Ordering::Release);
        // An instance of a program `gallocy run` launched: threads go to every node.
        gallocy::threads::configure_from_env();
        // SAFETY: registering a handler that only uses statics and raw system calls;
        // one of the first registrations, so glibc's static block holds it (no malloc).
        unsafe {
            __cxa_atexit(
                give_back_at_exit,
                core::ptr::null_mut(),
                core::ptr::null_mut(),
            )
        };
        return;
    }
    if rc == 0 {
        let mut message = Message::new();
        message
            .str("gallocy: the space's chunk size is ")
            .dec(runtime::chunk_size() as i64)
            .str(" bytes; this runtime needs ")
            .dec(CHUNK_BYTES as i64);
        message.emit();
        sys::exit_now(EXIT_NO_DAEMON);
    }
    if fallback {
        start_local();
        return;
    }
    let mut message = Message::new();
    message.str("gallocy: ");
    // SAFETY: the last error is a NUL-terminated static buffer.
    let reason = unsafe { CStr::from_ptr(gallocy::gallocy_last_error()) };
    message
        .text(reason.to_bytes())
        .str("; set GALLOCY_FALLBACK=local to run on a private heap instead");
    message.emit();
    sys::exit_now(EXIT_NO_DAEMON);
}

/// Whether this process is a program exec'd by the program `gallocy run` started (a
/// shell command, a compiler, a worker script), not that program itself. It is not part
/// of the distributed program: it shares no pointer with its parent, so by default it
/// gets a private heap, which the kernel reclaims when it exits (an attached process
/// would lease chunks that outlive it). `GALLOCY_CHILDREN=share` attaches it to the
/// parent's space instead. Without `GALLOCY_RUN_PARENT` (LD_PRELOAD set by hand) every
/// process attaches.
fn is_exec_descendant() -> bool {
    let Some(parent) = getenv(c"GALLOCY_RUN_PARENT") else {
        return false;
    };
    if getenv(c"GALLOCY_CHILDREN") == Some(b"share") {
        return false;
    }
    let mut pid: i64 = 0;
    for &digit in parent {
        if !digit.is_ascii_digit() || pid > i32::MAX as i64 {
            return false;
        }
        pid = pid * 10 + (digit - b'0') as i64;
    }
    // SAFETY: getppid has no preconditions and does not allocate.
    let ppid = unsafe { libc::getppid() } as i64;
    ppid != pid
}

fn start_local() {
    HEAP.set_process_token(sys::getpid() as u64);
    MODE.store(MODE_LOCAL, Ordering::Release);
}

/// Switches a forked child to its private heap (see `fork`).
pub(crate) fn become_local() {
    MODE.store(MODE_LOCAL, Ordering::Release);
}

pub(crate) fn attached() -> bool {
    MODE.load(Ordering::Acquire) == MODE_ATTACHED
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

extern "C" {
    /// glibc's: registers `func(arg)` to run at `exit`; `dso` NULL ties it to no
    /// library (`atexit` would tie it to this one, and our own finalisation would run
    /// it early).
    fn __cxa_atexit(func: extern "C" fn(*mut c_void), arg: *mut c_void, dso: *mut c_void) -> c_int;
}

/// At exit, the chunks holding no live block go back to the cluster: the space may
/// outlive this process (others attached, or persistent). Registered by `init`, which
/// runs before `__libc_start_main` registers the dynamic linker's finalisation, so it
/// runs after that: after the destructors of the program and of every library. A
/// process killed by a signal, or one that ends with `_exit` or `exec`, skips this; its
/// chunks stay leased until the space ends.
extern "C" fn give_back_at_exit(_: *mut c_void) {
    if !attached() {
        return;
    }
    let state = thread_state();
    // SAFETY: this thread's own state.
    unsafe {
        let heap_index = (*state)[0];
        let nested = (*state)[1];
        if nested != 0 {
            // `exit` from a signal handler that interrupted this thread's malloc: the
            // heap's locks may be held below us. Give nothing back rather than hang.
            return;
        }
        // Marked inside the allocator while the release calls run.
        (*state)[1] = 1;
        let own = heap_index.checked_sub(1).map(|index| index as usize);
        HEAP.give_back_at_exit(own, &DaemonChunks);
        (*state)[1] = 0;
    }
}
