//! The in-process runtime: attachment, per-thread daemon connections, the SIGSEGV
//! handler that serves faults on space pages, and the service thread that applies
//! revocations. Nothing here allocates after `attach` returns: state lives in
//! statics, frames on the stack, and all I/O is raw system calls.

use core::cell::UnsafeCell;
use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use gallocy_core::ipc::{
    name_field, ErrorCode, FutexOutcome, IpcMessage, Role, IPC_FRAME_BYTES, IPC_VERSION,
};
use rustix::io::Errno;

use crate::report::Message;
use crate::sys;

pub const EXIT_DAEMON_GONE: i32 = 86;
pub const EXIT_FAULT_FAILED: i32 = 87;
const PAGE_BYTES: u64 = 4096;
/// Per-thread connections; beyond, a thread uses a connection per call.
const CONNECTION_SLOTS: usize = 256;
const SOCKET_PATH_BYTES: usize = 108;
/// How long a caller polls for the daemon's answer before blocking.
const SPIN_NANOS: u64 = 100_000;
/// How long the service thread polls for the next revocation before blocking.
const SERVICE_SPIN_NANOS: u64 = 100_000;
/// Frames answering other requests a call skips before it gives up on the daemon.
const MAX_STALE_REPLIES: usize = 64;

/// A spin lock for the rare paths (attach, detach, last error). Never held across a
/// blocking call that another thread's progress could depend on.
struct SpinLock(AtomicBool);

impl SpinLock {
    const fn new() -> SpinLock {
        SpinLock(AtomicBool::new(false))
    }
    fn lock(&self) -> SpinGuard<'_> {
        while self
            .0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        SpinGuard(self)
    }
}

struct SpinGuard<'a>(&'a SpinLock);

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

struct Runtime {
    attached: AtomicBool,
    detaching: AtomicBool,
    attach_lock: SpinLock,
    session: AtomicU64,
    base_addr: AtomicU64,
    size_bytes: AtomicU64,
    root_size_bytes: AtomicU64,
    chunk_size_bytes: AtomicU64,
    node: AtomicU32,
    /// The `Main` connection: its session lives as long as it is open, so it is
    /// never lent to a thread slot (a slot is reclaimed when its thread exits).
    main_fd: AtomicI32,
    service_fd: AtomicI32,
    /// The space's memfd, kept to map aliases of space pages (`add_alias`).
    memfd: AtomicI32,
    next_request_id: AtomicU64,
    /// `$GALLOCY_SOCKET` as given to attach, NUL-terminated. Written under
    /// `attach_lock` before `attached` is set, read-only afterwards.
    socket_path: UnsafeCell<[u8; SOCKET_PATH_BYTES]>,
    /// The SIGSEGV action installed before ours, to chain faults outside the space.
    previous_action: UnsafeCell<libc::sigaction>,
    service_thread: UnsafeCell<libc::pthread_t>,
    last_error_lock: SpinLock,
    last_error: UnsafeCell<Message>,
    slot_tid: [AtomicI32; CONNECTION_SLOTS],
    slot_fd: [AtomicI32; CONNECTION_SLOTS],
    /// A call is in progress on the slot's connection.
    slot_busy: [AtomicBool; CONNECTION_SLOTS],
}

// SAFETY: every UnsafeCell field is written only under a lock (attach_lock or
// last_error_lock) or before `attached` is published with Release ordering.
unsafe impl Sync for Runtime {}

#[allow(clippy::declare_interior_mutable_const)]
const NO_TID: AtomicI32 = AtomicI32::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);
#[allow(clippy::declare_interior_mutable_const)]
const NOT_BUSY: AtomicBool = AtomicBool::new(false);

static RT: Runtime = Runtime {
    attached: AtomicBool::new(false),
    detaching: AtomicBool::new(false),
    attach_lock: SpinLock::new(),
    session: AtomicU64::new(0),
    base_addr: AtomicU64::new(0),
    size_bytes: AtomicU64::new(0),
    root_size_bytes: AtomicU64::new(0),
    chunk_size_bytes: AtomicU64::new(0),
    node: AtomicU32::new(0),
    main_fd: AtomicI32::new(-1),
    service_fd: AtomicI32::new(-1),
    memfd: AtomicI32::new(-1),
    next_request_id: AtomicU64::new(1),
    socket_path: UnsafeCell::new([0u8; SOCKET_PATH_BYTES]),
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty mask).
    previous_action: UnsafeCell::new(unsafe { core::mem::zeroed() }),
    service_thread: UnsafeCell::new(0),
    last_error_lock: SpinLock::new(),
    last_error: UnsafeCell::new(Message::new()),
    slot_tid: [NO_TID; CONNECTION_SLOTS],
    slot_fd: [NO_FD; CONNECTION_SLOTS],
    slot_busy: [NOT_BUSY; CONNECTION_SLOTS],
};

/// How a call to the daemon failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The daemon refused: its reason.
    Refused(ErrorCode, u64),
    /// Not attached.
    NotAttached,
    /// A system call failed (the daemon is reachable but something local broke).
    Sys(Errno),
}

/// An environment variable's value, without allocating.
pub fn getenv(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv returns a pointer into the environment or null; no allocation.
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated environment string that lives for the process.
    Some(unsafe { CStr::from_ptr(value) }.to_bytes())
}

#[inline]
pub fn is_attached() -> bool {
    RT.attached.load(Ordering::Acquire)
}

#[inline]
pub fn base_addr() -> u64 {
    RT.base_addr.load(Ordering::Acquire)
}

pub fn root_size() -> u64 {
    RT.root_size_bytes.load(Ordering::Acquire)
}

#[inline]
pub fn chunk_size() -> u64 {
    RT.chunk_size_bytes.load(Ordering::Acquire)
}

pub fn session() -> u64 {
    RT.session.load(Ordering::Acquire)
}

#[inline]
pub fn space_size() -> u64 {
    RT.size_bytes.load(Ordering::Acquire)
}

/// In a forked child: the parent's connections and service thread are not ours.
/// Forget them without touching the daemon (the parent still uses them); the child
/// is no longer attached.
pub fn forget_after_fork() {
    RT.attached.store(false, Ordering::Release);
    RT.detaching.store(true, Ordering::Release);
    close_connections();
    let service = RT.service_fd.swap(-1, Ordering::AcqRel);
    sys::close(service);
    sys::close(RT.memfd.swap(-1, Ordering::AcqRel));
}

/// The aliases of space pages: (alias address, length), for a forked child to make
/// private like the space itself.
pub fn aliases() -> [(u64, u64); MAX_ALIASES] {
    let mut out = [(0, 0); MAX_ALIASES];
    for (i, entry) in out.iter_mut().enumerate() {
        *entry = (
            ALIAS_START[i].load(Ordering::Acquire),
            ALIAS_LEN[i].load(Ordering::Acquire),
        );
    }
    out
}

#[inline]
pub fn in_space(addr: u64) -> bool {
    let base = RT.base_addr.load(Ordering::Acquire);
    let size = RT.size_bytes.load(Ordering::Acquire);
    is_attached() && addr >= base && addr - base < size
}

fn socket_path() -> &'static CStr {
    // SAFETY: written once under attach_lock before `attached` is published, then
    // only read; always NUL-terminated (the last byte is never written).
    let bytes: &'static [u8; SOCKET_PATH_BYTES] = unsafe { &*RT.socket_path.get() };
    CStr::from_bytes_until_nul(bytes).unwrap_or(c"?")
}

/// Records the last error (for `gallocy_last_error`).
pub fn set_last_error(build: impl FnOnce(&mut Message)) {
    let _guard = RT.last_error_lock.lock();
    // SAFETY: exclusive access under last_error_lock.
    let message = unsafe { &mut *RT.last_error.get() };
    message.clear();
    build(message);
}

pub fn last_error_ptr() -> *const core::ffi::c_char {
    // The buffer lives forever and is always NUL-terminated; a concurrent writer may
    // change its text, never its validity.
    // SAFETY: reading the pointer of a static, not its contents.
    unsafe { (*RT.last_error.get()).as_c_ptr() }
}

/// The daemon is gone: say so and end the process with a distinctive status.
pub fn daemon_gone(context: &str) -> ! {
    let mut message = Message::new();
    message
        .str("gallocy: the daemon at ")
        .text(socket_path().to_bytes())
        .str(" is gone (")
        .str(context)
        .str("); exiting with status ")
        .dec(EXIT_DAEMON_GONE as i64);
    message.emit();
    sys::exit_now(EXIT_DAEMON_GONE)
}

// ---------------------------------------------------------------------------------
// Connections.

fn hello(
    fd: i32,
    role: Role,
    session: u64,
    create: bool,
    persistent: bool,
    replicas: u8,
    name: [u8; gallocy_core::ipc::IPC_NAME_BYTES],
) -> Result<u64, Errno> {
    let request_id = RT.next_request_id.fetch_add(1, Ordering::Relaxed);
    let mut frame = [0u8; IPC_FRAME_BYTES];
    IpcMessage::Hello {
        role,
        session,
        pid: sys::getpid() as u32,
        create,
        persistent,
        replicas,
        name,
    }
    .encode(request_id, &mut frame);
    sys::write_all(fd, &frame)?;
    Ok(request_id)
}

/// Opens a `Thread` or `Service` connection of this process's session. An
/// unreachable daemon is `CallError::Sys`: the caller decides whether that ends the
/// process (a thread mid-run) or is an error to return (attach).
fn open_session_connection(role: Role) -> Result<i32, CallError> {
    let fd = sys::connect_unix(socket_path()).map_err(CallError::Sys)?;
    let session = RT.session.load(Ordering::Acquire);
    let name = [0u8; gallocy_core::ipc::IPC_NAME_BYTES];
    if let Err(e) = hello(fd, role, session, false, false, 0, name) {
        sys::close(fd);
        return Err(CallError::Sys(e));
    }
    match receive(fd) {
        Ok((_, IpcMessage::Pong)) => Ok(fd),
        Ok((_, IpcMessage::Error { code, detail })) => {
            sys::close(fd);
            Err(CallError::Refused(code, detail))
        }
        _ => {
            sys::close(fd);
            Err(CallError::Refused(ErrorCode::BadFrame, 0))
        }
    }
}

fn receive(fd: i32) -> Result<(u64, IpcMessage), CallError> {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    // Spin briefly for the answer before sleeping: waking a sleeping vCPU costs more
    // than most daemon transactions take.
    let received = match sys::recv_spinning(fd, &mut frame, SPIN_NANOS) {
        Some(result) => result,
        None => sys::read_exact(fd, &mut frame),
    };
    match received {
        Ok(true) => {}
        Ok(false) => daemon_gone("connection closed"),
        Err(Errno::CONNRESET) => daemon_gone("connection reset"),
        Err(e) => return Err(CallError::Sys(e)),
    }
    match IpcMessage::decode(&frame) {
        Ok(decoded) => Ok(decoded),
        Err(gallocy_core::ipc::IpcDecodeError::Version(v)) => {
            Err(CallError::Refused(ErrorCode::VersionMismatch, v as u64))
        }
        Err(_) => Err(CallError::Refused(ErrorCode::BadFrame, 0)),
    }
}

enum Connection {
    /// This thread's own connection, kept; marked busy (its slot) while in use.
    Slot(i32, usize),
    /// A connection for this call only (all slots taken by live threads, or this
    /// thread's own is busy below us: a fault taken inside a call, on a buffer of a
    /// stack in the space).
    Temporary(i32),
}

impl Connection {
    fn fd(&self) -> i32 {
        match *self {
            Connection::Slot(fd, _) | Connection::Temporary(fd) => fd,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        match *self {
            Connection::Temporary(fd) => sys::close(fd),
            Connection::Slot(_, slot) => RT.slot_busy[slot].store(false, Ordering::Release),
        }
    }
}

fn slot_start(tid: i32) -> usize {
    (tid as u32 as usize).wrapping_mul(0x9E37_79B9) % CONNECTION_SLOTS
}

/// This thread's connection to the daemon, opened on first use.
fn thread_connection() -> Result<Connection, CallError> {
    if !is_attached() {
        return Err(CallError::NotAttached);
    }
    let tid = sys::gettid();
    let start = slot_start(tid);
    for i in 0..CONNECTION_SLOTS {
        let slot = (start + i) % CONNECTION_SLOTS;
        if RT.slot_tid[slot].load(Ordering::Acquire) == tid {
            let fd = RT.slot_fd[slot].load(Ordering::Acquire);
            if fd >= 0 {
                if RT.slot_busy[slot].swap(true, Ordering::AcqRel) {
                    // A call of this thread waits on it (we are in its fault).
                    return match open_session_connection(Role::Thread) {
                        Ok(fd) => Ok(Connection::Temporary(fd)),
                        Err(CallError::Sys(_)) => daemon_gone("cannot connect"),
                        Err(refused) => Err(refused),
                    };
                }
                return Ok(Connection::Slot(fd, slot));
            }
        }
    }
    let fd = match open_session_connection(Role::Thread) {
        Ok(fd) => fd,
        Err(CallError::Sys(_)) => daemon_gone("cannot connect"),
        Err(refused) => return Err(refused),
    };
    for i in 0..CONNECTION_SLOTS {
        let slot = (start + i) % CONNECTION_SLOTS;
        let owner = RT.slot_tid[slot].load(Ordering::Acquire);
        // A slot is free if unused or its thread has exited (its connection is idle).
        if owner != 0 && sys::thread_alive(owner) {
            continue;
        }
        if RT.slot_tid[slot]
            .compare_exchange(owner, tid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let old = RT.slot_fd[slot].swap(fd, Ordering::AcqRel);
            sys::close(old);
            RT.slot_busy[slot].store(true, Ordering::Release);
            return Ok(Connection::Slot(fd, slot));
        }
    }
    Ok(Connection::Temporary(fd))
}

/// Closes the thread connections and the `Main` connection (not the service one).
fn close_connections() {
    for slot in 0..CONNECTION_SLOTS {
        let fd = RT.slot_fd[slot].swap(-1, Ordering::AcqRel);
        sys::close(fd);
        RT.slot_tid[slot].store(0, Ordering::Release);
    }
    let main = RT.main_fd.swap(-1, Ordering::AcqRel);
    sys::close(main);
}

/// One request, one reply, on this thread's connection.
pub fn call(message: IpcMessage) -> Result<IpcMessage, CallError> {
    let connection = thread_connection()?;
    call_on(&connection, message)
}

fn call_on(connection: &Connection, message: IpcMessage) -> Result<IpcMessage, CallError> {
    let request_id = RT.next_request_id.fetch_add(1, Ordering::Relaxed);
    let mut frame = [0u8; IPC_FRAME_BYTES];
    message.encode(request_id, &mut frame);
    match sys::write_all(connection.fd(), &frame) {
        Ok(()) => {}
        Err(Errno::PIPE) | Err(Errno::CONNRESET) => daemon_gone("send failed"),
        Err(e) => return Err(CallError::Sys(e)),
    }
    // The daemon answers each request once, in order, on this connection: a frame for
    // another request is a leftover (a reply to a call that gave up). A daemon that sends
    // nothing but those is broken: give up rather than spin.
    for _ in 0..MAX_STALE_REPLIES {
        let (reply_id, reply) = receive(connection.fd())?;
        if reply_id != request_id {
            continue;
        }
        return match reply {
            IpcMessage::Error { code, detail } => Err(CallError::Refused(code, detail)),
            reply => Ok(reply),
        };
    }
    Err(CallError::Refused(ErrorCode::BadFrame, 0))
}

/// A message with no reply (GrantApplied), on the connection of the call it follows.
fn notify_on(connection: &Connection, message: IpcMessage) {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    message.encode(0, &mut frame);
    if sys::write_all(connection.fd(), &frame).is_err() {
        daemon_gone("send failed");
    }
}

// ---------------------------------------------------------------------------------
// Futexes (docs/protocol.md, "Futexes").

/// `NoCopy` answers one wait tolerates: each means the page moved between the read
/// of the word and the daemon's compare, i.e. another node is writing it.
const MAX_FUTEX_NO_COPY_RETRIES: u32 = 1024;

/// How a futex wait ended, for the caller.
pub enum FutexWaitEnd {
    Woken,
    /// The word did not hold `expected` (`EAGAIN`).
    ValueChanged,
    TimedOut,
}

impl FutexWaitEnd {
    /// What `futex(2)` returns for it (gallocy_futex_wait returns the same).
    pub fn result(self) -> i32 {
        match self {
            FutexWaitEnd::Woken => 0,
            FutexWaitEnd::ValueChanged => -libc::EAGAIN,
            FutexWaitEnd::TimedOut => -libc::ETIMEDOUT,
        }
    }
}

/// A futex word must be a 4-aligned address of the space.
fn check_futex_word(addr: u64) -> Result<(), CallError> {
    if in_space(addr) && addr.is_multiple_of(4) {
        Ok(())
    } else {
        Err(CallError::Refused(ErrorCode::InvalidArgument, 0))
    }
}

/// Reads a futex word of the space (faulting its page in if needed), as the kernel
/// does before it sleeps.
pub fn load_futex_word(addr: u64) -> u32 {
    // SAFETY: callers pass a 4-aligned address of the space (check_futex_word), mapped
    // for the life of the attachment; the read is atomic.
    unsafe { &*(addr as *const AtomicU32) }.load(Ordering::SeqCst)
}

/// Sleeps while the 32-bit word at `addr` (in the space) holds `expected`, at most
/// `timeout_ms` (0: no limit), woken by a `futex_wake` on any node.
pub fn futex_wait(addr: u64, expected: u32, timeout_ms: u32) -> Result<FutexWaitEnd, CallError> {
    let addr = space_addr(addr).unwrap_or(addr);
    check_futex_word(addr)?;
    for _ in 0..MAX_FUTEX_NO_COPY_RETRIES {
        let wait = IpcMessage::FutexWait {
            addr,
            expected,
            timeout_ticks: timeout_ms,
        };
        match call(wait)? {
            IpcMessage::FutexWaitDone { outcome } => match outcome {
                FutexOutcome::Woken => return Ok(FutexWaitEnd::Woken),
                FutexOutcome::ValueChanged => return Ok(FutexWaitEnd::ValueChanged),
                FutexOutcome::TimedOut => return Ok(FutexWaitEnd::TimedOut),
                // The page moved: read the word again, then wait again.
                FutexOutcome::NoCopy if load_futex_word(addr) != expected => {
                    return Ok(FutexWaitEnd::ValueChanged)
                }
                FutexOutcome::NoCopy => {}
            },
            _ => return Err(CallError::Refused(ErrorCode::BadFrame, 0)),
        }
    }
    // Another node keeps taking the page: report a spurious wake-up (callers loop).
    Ok(FutexWaitEnd::Woken)
}

/// Returns once every write this process made to the space before the call is on k
/// nodes (the space's replicas): the daemon flushes every page of its node written
/// since its last flush to the page's home, which keeps k copies.
pub fn sync() -> Result<(), CallError> {
    match call(IpcMessage::Sync)? {
        IpcMessage::Synced => Ok(()),
        _ => Err(CallError::Refused(ErrorCode::BadFrame, 0)),
    }
}

/// Wakes up to `count` waiters on `addr` on this node and on each other node; how
/// many were woken in all.
pub fn futex_wake(addr: u64, count: u32) -> Result<u32, CallError> {
    let addr = space_addr(addr).unwrap_or(addr);
    check_futex_word(addr)?;
    match call(IpcMessage::FutexWake { addr, count })? {
        IpcMessage::FutexWoken { woken } => Ok(woken),
        _ => Err(CallError::Refused(ErrorCode::BadFrame, 0)),
    }
}

// ---------------------------------------------------------------------------------
// Faults.

// ---------------------------------------------------------------------------------
// Aliases: other addresses of space pages (the executable's globals, which must stay
// where the code expects them). An alias follows its pages' protection: every grant
// and revocation applies to both.

const MAX_ALIASES: usize = 4;
#[allow(clippy::declare_interior_mutable_const)]
const NO_ALIAS: AtomicU64 = AtomicU64::new(0);
static ALIAS_START: [AtomicU64; MAX_ALIASES] = [NO_ALIAS; MAX_ALIASES];
static ALIAS_SPACE: [AtomicU64; MAX_ALIASES] = [NO_ALIAS; MAX_ALIASES];
static ALIAS_LEN: [AtomicU64; MAX_ALIASES] = [NO_ALIAS; MAX_ALIASES];

/// Maps the space pages `[space_addr, space_addr + len)` a second time at
/// `alias_addr`, replacing what was there, with no access (the first touch faults
/// and is served like one of the space). All page-aligned.
pub fn add_alias(alias_addr: u64, space_addr: u64, len: u64) -> Result<(), Errno> {
    let aligned = |v: u64| v.is_multiple_of(PAGE_BYTES);
    if !aligned(alias_addr) || !aligned(space_addr) || !aligned(len) || len == 0 {
        return Err(Errno::INVAL);
    }
    if !in_space(space_addr) || !in_space(space_addr + len - 1) {
        return Err(Errno::INVAL);
    }
    let slot = (0..MAX_ALIASES)
        .find(|&i| ALIAS_LEN[i].load(Ordering::Acquire) == 0)
        .ok_or(Errno::NOSPC)?;
    let memfd = RT.memfd.load(Ordering::Acquire);
    let offset = space_addr - base_addr();
    sys::map_alias(alias_addr, len, memfd, offset)?;
    ALIAS_START[slot].store(alias_addr, Ordering::Release);
    ALIAS_SPACE[slot].store(space_addr, Ordering::Release);
    ALIAS_LEN[slot].store(len, Ordering::Release);
    // Locks in globals sleep and wake through the daemon too.
    if !crate::futex_trap::trap_range(alias_addr, alias_addr + len) {
        return Err(Errno::PERM);
    }
    Ok(())
}

/// The space address of `addr`: itself in the space, the page behind it in an alias.
pub fn space_addr(addr: u64) -> Option<u64> {
    if in_space(addr) {
        Some(addr)
    } else {
        alias_to_space(addr)
    }
}

fn alias_to_space(addr: u64) -> Option<u64> {
    (0..MAX_ALIASES).find_map(|i| {
        let len = ALIAS_LEN[i].load(Ordering::Acquire);
        let start = ALIAS_START[i].load(Ordering::Acquire);
        (len != 0 && addr >= start && addr - start < len)
            .then(|| ALIAS_SPACE[i].load(Ordering::Acquire) + (addr - start))
    })
}

/// Sets the access of space pages and of every alias of them.
fn protect_all(addr: u64, len: u64, access: u8) -> Result<(), Errno> {
    sys::protect(addr, len, access)?;
    for i in 0..MAX_ALIASES {
        let alias_len = ALIAS_LEN[i].load(Ordering::Acquire);
        if alias_len == 0 {
            continue;
        }
        let space = ALIAS_SPACE[i].load(Ordering::Acquire);
        let start = addr.max(space);
        let end = (addr + len).min(space + alias_len);
        if start < end {
            let alias = ALIAS_START[i].load(Ordering::Acquire) + (start - space);
            sys::protect(alias, end - start, access)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Serving a program's threads (docs/runtime.md, "Threads on every node").

/// Opens this process's connection that serves `program`'s threads: `RunThread`
/// frames arrive on it (read them with `serve_next`).
pub fn serve_connection(program: u64) -> Result<i32, CallError> {
    let fd = open_session_connection(Role::Thread)?;
    let mut frame = [0u8; IPC_FRAME_BYTES];
    IpcMessage::ServeThreads { program }.encode(0, &mut frame);
    if let Err(e) = sys::write_all(fd, &frame) {
        sys::close(fd);
        return Err(CallError::Sys(e));
    }
    match receive(fd)? {
        (_, IpcMessage::Pong) => Ok(fd),
        (_, IpcMessage::Error { code, detail }) => {
            sys::close(fd);
            Err(CallError::Refused(code, detail))
        }
        _ => {
            sys::close(fd);
            Err(CallError::Refused(ErrorCode::BadFrame, 0))
        }
    }
}

/// The next frame on a serving connection (blocking). The daemon gone ends the
/// process, as for any connection.
pub fn serve_next(fd: i32) -> Result<IpcMessage, CallError> {
    receive(fd).map(|(_, message)| message)
}

/// Asks for a thread of `program` on `node` whose record is at `record_addr`.
pub fn spawn_thread(program: u64, node: u64, record_addr: u64) -> Result<u64, CallError> {
    match call(IpcMessage::SpawnThread {
        program,
        node,
        record_addr,
    })? {
        IpcMessage::ThreadSpawned { thread } => Ok(thread),
        _ => Err(CallError::Refused(ErrorCode::BadFrame, 0)),
    }
}

/// Asks the daemon for access to the page holding `addr` and applies the grant.
pub fn fault(addr: u64, write: bool) -> Result<(), CallError> {
    fault_range(addr, 1, write)
}

/// Takes `pages` pages from the one holding `addr` in one round trip (at most
/// `MAX_FAULT_PAGES`): a freshly leased chunk, or the buffer of a system call.
pub fn fault_range(addr: u64, pages: u32, write: bool) -> Result<(), CallError> {
    let asked_page = addr & !(PAGE_BYTES - 1);
    // The grant and its GrantApplied go on one connection (the daemon holds the
    // page's revocations until that connection says it is applied).
    let connection = thread_connection()?;
    match call_on(&connection, IpcMessage::Fault { addr, write, pages })? {
        // Only what was asked for, inside the space, is protected as granted.
        IpcMessage::Granted {
            page_addr,
            write: granted_write,
            pages: granted_pages,
        } if page_addr == asked_page
            && granted_pages == pages
            && granted_write == write
            && in_space(page_addr)
            && in_space(page_addr + (pages as u64).saturating_sub(1) * PAGE_BYTES) =>
        {
            let access = if write { 2 } else { 1 };
            let applied = protect_all(page_addr, pages as u64 * PAGE_BYTES, access);
            // Only now may the daemon revoke these pages from us: tell it (also when
            // mprotect failed, so revocations are not held forever).
            notify_on(&connection, IpcMessage::GrantApplied { page_addr, pages });
            applied.map_err(CallError::Sys)
        }
        _ => Err(CallError::Refused(ErrorCode::BadFrame, 0)),
    }
}

/// Takes every page of `[addr, addr + len_bytes)`, in batches of at most
/// `MAX_FAULT_PAGES` (one round trip each): a freshly leased run, or a system call's
/// buffer.
pub fn take_range(addr: u64, len_bytes: u64, write: bool) -> Result<(), CallError> {
    let end = addr.saturating_add(len_bytes);
    let mut page = addr & !(PAGE_BYTES - 1);
    while page < end {
        let pages = (end - page)
            .div_ceil(PAGE_BYTES)
            .min(gallocy_core::ipc::MAX_FAULT_PAGES as u64);
        fault_range(page, pages as u32, write)?;
        page += pages * PAGE_BYTES;
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn is_write_fault(context: *mut libc::c_void) -> bool {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let context = unsafe { &*(context as *const libc::ucontext_t) };
    // Bit 1 of the page-fault error code: the access was a write.
    context.uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn is_write_fault(_context: *mut libc::c_void) -> bool {
    // Without the error code, ask for write: correct, if pessimistic.
    true
}

extern "C" fn on_segv(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSEGV.
    let fault_addr = unsafe { (*info).si_addr() } as u64;
    // A page of an alias (the executable's globals) is the space page behind it.
    let addr = if in_space(fault_addr) {
        fault_addr
    } else if let Some(addr) = alias_to_space(fault_addr) {
        addr
    } else {
        chain(signal, info, context);
        return;
    };
    let saved_errno = errno();
    let write = is_write_fault(context);
    if let Err(error) = fault(addr, write) {
        let mut message = Message::new();
        message.str("gallocy: cannot serve a ");
        message.str(if write { "write" } else { "read" });
        message.str(" fault at ").hex(addr).str(": ");
        describe(&mut message, error);
        message
            .str("; exiting with status ")
            .dec(EXIT_FAULT_FAILED as i64);
        message.emit();
        sys::exit_now(EXIT_FAULT_FAILED);
    }
    set_errno(saved_errno);
}

/// A fault outside the space: whoever handled SIGSEGV before us, or the default
/// action (the faulting instruction runs again and the process dies as it should).
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: previous_action was written under attach_lock before `attached`.
    let previous = unsafe { *RT.previous_action.get() };
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: restoring the default action for SIGSEGV; async-signal-safe.
        unsafe {
            let mut default: libc::sigaction = core::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGSEGV, &default, core::ptr::null_mut());
        }
        return;
    }
    if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this type.
        let function: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(handler) };
        function(signal, info, context);
    } else {
        // SAFETY: a plain handler takes the signal number.
        let function: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(handler) };
        function(signal);
    }
}

pub fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

#[inline]
pub fn set_errno(value: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = value };
}

pub fn describe(message: &mut Message, error: CallError) {
    match error {
        CallError::Refused(ErrorCode::VersionMismatch, theirs) => {
            message
                .str("protocol version mismatch: this library speaks version ")
                .dec(IPC_VERSION as i64)
                .str(", the daemon at ")
                .text(socket_path().to_bytes())
                .str(" speaks version ")
                .dec(theirs as i64);
        }
        CallError::Refused(ErrorCode::NodeDown, node) => {
            message
                .str("the node ")
                .dec(node as i64)
                .str(" that owns it is down");
        }
        CallError::Refused(code, _) => {
            message.str(code.describe());
        }
        CallError::NotAttached => {
            message.str("not attached (call gallocy_attach first)");
        }
        CallError::Sys(errno) => {
            message
                .str("system call failed with errno ")
                .dec(errno.raw_os_error() as i64);
        }
    }
}

/// The errno a failed call maps to.
pub fn errno_of(error: CallError) -> i32 {
    match error {
        CallError::Refused(code, _) => match code {
            ErrorCode::VersionMismatch => libc::EPROTO,
            ErrorCode::UnknownSpace => libc::ENOENT,
            ErrorCode::PermissionDenied => libc::EACCES,
            ErrorCode::OutOfMemory => libc::ENOMEM,
            ErrorCode::InvalidFree | ErrorCode::InvalidArgument | ErrorCode::BadFrame => {
                libc::EINVAL
            }
            ErrorCode::NotMapped => libc::EFAULT,
            ErrorCode::PageLost | ErrorCode::NodeDown | ErrorCode::Evicted => libc::EIO,
            ErrorCode::Busy => libc::EAGAIN,
            ErrorCode::SpaceRejected | ErrorCode::MembershipRejected => libc::EINVAL,
            ErrorCode::UnknownSession | ErrorCode::NotAttached => libc::ENOTCONN,
            ErrorCode::Internal => libc::EIO,
            ErrorCode::NoInstance => libc::EAGAIN,
        },
        CallError::NotAttached => libc::ENOTCONN,
        CallError::Sys(errno) => errno.raw_os_error(),
    }
}

// ---------------------------------------------------------------------------------
// The service thread: applies revocations whatever the other threads are doing.

/// `arg`: the service connection's fd. Passed, not read from `RT`: a detach that comes
/// before this thread first runs has set `RT.service_fd` to -1 already (then the fd
/// is shut down, and the first receive ends the thread).
extern "C" fn service_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    let fd = arg as usize as i32;
    let mut frame = [0u8; IPC_FRAME_BYTES];
    loop {
        // Revocations come in bursts (one per page another node takes): poll a while
        // after each before sleeping, as callers do for their answers.
        let received = match sys::recv_spinning(fd, &mut frame, SERVICE_SPIN_NANOS) {
            Some(result) => result,
            None => sys::read_exact(fd, &mut frame),
        };
        match received {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                if RT.detaching.load(Ordering::Acquire) {
                    return core::ptr::null_mut();
                }
                daemon_gone("service connection closed");
            }
        }
        let Ok((
            _,
            IpcMessage::Revoke {
                addr,
                len,
                access,
                token,
            },
        )) = IpcMessage::decode(&frame)
        else {
            continue;
        };
        if in_space(addr) {
            // Failure would leave more access than the daemon believes: fatal.
            if protect_all(addr, len, access).is_err() {
                let mut message = Message::new();
                message.str("gallocy: cannot revoke access to ").hex(addr);
                message.emit();
                sys::exit_now(EXIT_FAULT_FAILED);
            }
        }
        let mut reply = [0u8; IPC_FRAME_BYTES];
        IpcMessage::RevokeDone { token }.encode(0, &mut reply);
        if sys::write_all(fd, &reply).is_err() {
            if RT.detaching.load(Ordering::Acquire) {
                return core::ptr::null_mut();
            }
            daemon_gone("service connection closed");
        }
    }
}

// ---------------------------------------------------------------------------------
// Attach and detach.

fn fail(error: i32, build: impl FnOnce(&mut Message)) -> i32 {
    set_last_error(build);
    -error
}

/// Attaches this process to `space` on the daemon at `$GALLOCY_SOCKET`, creating the
/// space with the daemon's default layout if `create` and it does not exist.
pub fn attach(space: &[u8], create: bool) -> i32 {
    let _guard = RT.attach_lock.lock();
    if is_attached() {
        return fail(libc::EISCONN, |m| {
            m.str("already attached to a space");
        });
    }
    let Some(name) = name_field(space) else {
        return fail(libc::ENAMETOOLONG, |m| {
            m.str("space name must be 1 to 36 bytes without NUL");
        });
    };
    // SAFETY: getenv returns a pointer into the environment or null; no allocation.
    let path = unsafe { libc::getenv(c"GALLOCY_SOCKET".as_ptr()) };
    if path.is_null() {
        return fail(libc::ENOENT, |m| {
            m.str("GALLOCY_SOCKET is not set: it must name the daemon's application socket");
        });
    }
    // SAFETY: getenv's result is a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(path) };
    let path_bytes = path.to_bytes_with_nul();
    if path_bytes.len() > SOCKET_PATH_BYTES - 1 {
        return fail(libc::ENAMETOOLONG, |m| {
            m.str("GALLOCY_SOCKET is longer than a Unix socket path may be");
        });
    }
    // SAFETY: exclusive under attach_lock; readers only read after `attached`.
    unsafe {
        let buffer = &mut *RT.socket_path.get();
        *buffer = [0u8; SOCKET_PATH_BYTES];
        buffer[..path_bytes.len()].copy_from_slice(path_bytes);
    }
    let main_fd = match sys::connect_unix(path) {
        Ok(fd) => fd,
        Err(e) => {
            return fail(e.raw_os_error(), |m| {
                m.str("no gallocy daemon at ")
                    .text(path.to_bytes())
                    .str(" (connect failed with errno ")
                    .dec(e.raw_os_error() as i64)
                    .str("; is gallocyd running?)");
            })
        }
    };
    // A space this process creates outlives its last process only if asked.
    let persistent = getenv(c"GALLOCY_PERSISTENT") == Some(b"1");
    // And has k copies of each page as asked (else the daemon's default).
    let replicas = match getenv(c"GALLOCY_REPLICAS") {
        None => 0,
        Some(&[digit @ b'1'..=b'4']) => digit - b'0',
        Some(_) => {
            sys::close(main_fd);
            return fail(libc::EINVAL, |m| {
                m.str("GALLOCY_REPLICAS must be 1 to 4 (copies of each page)");
            });
        }
    };
    if hello(main_fd, Role::Main, 0, create, persistent, replicas, name).is_err() {
        sys::close(main_fd);
        return fail(libc::ECONNRESET, |m| {
            m.str("the daemon at ")
                .text(path.to_bytes())
                .str(" closed the connection");
        });
    }
    let mut frame = [0u8; IPC_FRAME_BYTES];
    let (complete, memfd) = match sys::recv_with_fd(main_fd, &mut frame) {
        Ok(result) => result,
        Err(e) => {
            sys::close(main_fd);
            return fail(e.raw_os_error(), |m| {
                m.str("no answer from the daemon at ").text(path.to_bytes());
            });
        }
    };
    let decoded = if complete {
        IpcMessage::decode(&frame)
    } else {
        Err(gallocy_core::ipc::IpcDecodeError::Invalid)
    };
    let welcome = match decoded {
        Ok((
            _,
            IpcMessage::Welcome {
                session,
                node,
                base_addr,
                size_bytes,
                root_size_bytes,
                chunk_size_bytes,
                ..
            },
        )) => (
            session,
            node,
            base_addr,
            size_bytes,
            root_size_bytes,
            chunk_size_bytes,
        ),
        refused => {
            // Whatever came instead of a welcome, nothing of it is kept.
            sys::close(main_fd);
            if let Some(fd) = memfd {
                sys::close(fd);
            }
            return match refused {
                Ok((_, IpcMessage::Error { code, detail })) => {
                    let error = CallError::Refused(code, detail);
                    fail(errno_of(error), |m| {
                        m.str("attach to ").text(space).str(" refused: ");
                        describe(m, error);
                    })
                }
                Err(gallocy_core::ipc::IpcDecodeError::Version(theirs)) => {
                    let error = CallError::Refused(ErrorCode::VersionMismatch, theirs as u64);
                    fail(libc::EPROTO, |m| describe(m, error))
                }
                _ => fail(libc::EPROTO, |m| {
                    m.str("unexpected answer from the daemon at ")
                        .text(path.to_bytes());
                }),
            };
        }
    };
    let (session, node, base_addr, size_bytes, root_size_bytes, chunk_size_bytes) = welcome;
    let Some(memfd) = memfd else {
        sys::close(main_fd);
        return fail(libc::EPROTO, |m| {
            m.str("the daemon sent no memory for the space");
        });
    };
    let mapped = sys::map_space(base_addr, size_bytes, memfd);
    if mapped.is_ok() {
        let old = RT.memfd.swap(memfd, Ordering::AcqRel);
        sys::close(old);
    } else {
        sys::close(memfd);
    }
    if let Err(e) = mapped {
        sys::close(main_fd);
        return fail(e.raw_os_error(), |m| {
            m.str("cannot map space ")
                .text(space)
                .str(" at [")
                .hex(base_addr)
                .str(", ")
                .hex(base_addr + size_bytes)
                .str(")");
            if e == Errno::EXIST {
                describe_clash(m, base_addr, base_addr + size_bytes);
            } else {
                m.str(": errno ").dec(e.raw_os_error() as i64);
            }
        });
    }
    // futex(2) on space memory goes to the daemon, so glibc's locks work across nodes.
    if !crate::futex_trap::install(base_addr, size_bytes) {
        let errno = errno();
        sys::unmap(base_addr, size_bytes);
        sys::close(main_fd);
        return fail(libc::EPERM, |m| {
            m.str("cannot trap futex calls on space memory (seccomp refused, errno ")
                .dec(errno as i64)
                .str("): locks in the space would not work across nodes");
        });
    }
    RT.session.store(session, Ordering::Release);
    RT.base_addr.store(base_addr, Ordering::Release);
    RT.size_bytes.store(size_bytes, Ordering::Release);
    RT.root_size_bytes.store(root_size_bytes, Ordering::Release);
    RT.chunk_size_bytes
        .store(chunk_size_bytes, Ordering::Release);
    RT.node.store(node, Ordering::Release);
    RT.detaching.store(false, Ordering::Release);
    // Faults in the space come to us; others go where they went before.
    // SAFETY: a fully initialised sigaction for a handler with the SA_SIGINFO signature;
    // previous_action is written under attach_lock.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = on_segv as *const () as usize;
        // On the alternate stack where a thread has one: a thread whose stack is in
        // the space faults on its own stack, where no signal frame fits.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSEGV, &action, RT.previous_action.get());
    }
    // Publish now: the service connection below needs the session and socket path.
    RT.attached.store(true, Ordering::Release);
    RT.main_fd.store(main_fd, Ordering::Release);
    let service_fd = match open_session_connection(Role::Service) {
        Ok(fd) => fd,
        Err(error) => {
            undo_attach();
            return fail(errno_of(error), |m| {
                m.str("cannot open the service connection: ");
                describe(m, error);
            });
        }
    };
    RT.service_fd.store(service_fd, Ordering::Release);
    // SAFETY: creating a thread running service_main, which only uses statics and the
    // fd passed as its argument; the pthread_t is stored under attach_lock.
    let created = unsafe {
        libc::pthread_create(
            RT.service_thread.get(),
            core::ptr::null(),
            service_main,
            service_fd as usize as *mut libc::c_void,
        )
    };
    if created != 0 {
        undo_attach();
        return fail(created, |m| {
            m.str("cannot start the service thread");
        });
    }
    0
}

/// Names the mappings that overlap `[start, end)`, from /proc/self/maps.
fn describe_clash(message: &mut Message, start: u64, end: u64) {
    message.str(": it overlaps an existing mapping");
    let mut reported = 0;
    for_each_mapping(|a, b, line| {
        if a < end && start < b && reported < 3 {
            message.str(" [").hex(a).str(", ").hex(b).str(")");
            // The path, if any, is the last field.
            if let Some(at) = line.iter().position(|&c| c == b'/' || c == b'[') {
                message.str(" ").text(&line[at..]);
            }
            reported += 1;
        }
    });
}

/// Calls `f(start, end, line)` for each line of /proc/self/maps, reading it with raw
/// system calls into stack buffers (lines longer than 256 bytes are cut). False if the
/// file could not be opened.
pub fn for_each_mapping(mut f: impl FnMut(u64, u64, &[u8])) -> bool {
    let Ok(fd) = sys::open_read(c"/proc/self/maps") else {
        return false;
    };
    let mut buffer = [0u8; 4096];
    let mut line = [0u8; 256];
    let mut line_len = 0;
    while let Ok(n) = sys::read_some(fd, &mut buffer) {
        if n == 0 {
            break;
        }
        for &byte in &buffer[..n] {
            if byte != b'\n' {
                if line_len < line.len() {
                    line[line_len] = byte;
                    line_len += 1;
                }
                continue;
            }
            if let Some((a, b)) = parse_range(&line[..line_len]) {
                f(a, b, &line[..line_len]);
            }
            line_len = 0;
        }
    }
    sys::close(fd);
    true
}

pub fn parse_range(line: &[u8]) -> Option<(u64, u64)> {
    let dash = line.iter().position(|&c| c == b'-')?;
    let space = line.iter().position(|&c| c == b' ')?;
    Some((
        parse_hex(&line[..dash])?,
        parse_hex(&line[dash + 1..space])?,
    ))
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for &d in digits {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        value = value.checked_mul(16)?.checked_add(nibble as u64)?;
    }
    Some(value)
}

/// Tears down what attach set up (under attach_lock).
fn undo_attach() {
    RT.detaching.store(true, Ordering::Release);
    RT.attached.store(false, Ordering::Release);
    // SAFETY: restoring the action saved by attach, under attach_lock.
    unsafe {
        libc::sigaction(
            libc::SIGSEGV,
            RT.previous_action.get(),
            core::ptr::null_mut(),
        );
    }
    // Unmap before closing the connections: once the daemon sees them close it
    // assumes this process holds no page.
    let base = RT.base_addr.swap(0, Ordering::AcqRel);
    let size = RT.size_bytes.swap(0, Ordering::AcqRel);
    if base != 0 {
        sys::unmap(base, size);
    }
    // The aliases map the memfd too; without them nothing of the space is mapped.
    for i in 0..MAX_ALIASES {
        let len = ALIAS_LEN[i].swap(0, Ordering::AcqRel);
        if len != 0 {
            sys::unmap(ALIAS_START[i].load(Ordering::Acquire), len);
        }
    }
    sys::close(RT.memfd.swap(-1, Ordering::AcqRel));
    close_connections();
}

pub fn detach() -> i32 {
    let _guard = RT.attach_lock.lock();
    if !is_attached() {
        return -libc::ENOTCONN;
    }
    // Unmap and close the other connections first: the daemon takes a closed service
    // connection to mean this process holds nothing.
    undo_attach();
    let service_fd = RT.service_fd.swap(-1, Ordering::AcqRel);
    sys::shutdown(service_fd);
    // SAFETY: joining the thread created in attach, once.
    unsafe {
        libc::pthread_join(*RT.service_thread.get(), core::ptr::null_mut());
    }
    sys::close(service_fd);
    0
}

pub fn node_id() -> u32 {
    RT.node.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_maps_ranges() {
        assert_eq!(
            parse_range(b"7f00000000-7f00001000 r--p 00000000 00:00 0 /usr/lib/x"),
            Some((0x7f00000000, 0x7f00001000))
        );
        assert_eq!(parse_range(b"garbage"), None);
    }

    #[test]
    fn messages_format_numbers_without_allocating() {
        let mut m = Message::new();
        m.str("a ").hex(0x2a).str(" ").dec(-17).str(" ").hex(0);
        assert_eq!(m.as_bytes(), b"a 0x2a -17 0x0");
    }
}
