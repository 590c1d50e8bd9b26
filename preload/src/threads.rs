//! A program's threads on every node (docs/runtime.md, "Threads on every node").
//!
//! A program launched by `gallocy run` has one instance per node: the main instance
//! (node of the launcher) runs `main`; every other node's daemon starts a worker
//! instance of the same executable, which runs the constructors and then only serves
//! threads. Before `main`, the main instance
//!
//! - records the address of every loaded module (workers refuse to run if theirs
//!   differ: the same code and data must sit at the same addresses everywhere);
//! - copies the executable's writable globals (`.data`, `.bss`, past RELRO) into a
//!   block of the space and maps that block over them (an alias): globals are space
//!   pages, coherent like the heap; workers map the same block over theirs;
//! - copies `argv` and the environment into the space (`environ` points there);
//! - publishes all of it in a program record whose address it writes at the end of
//!   the root block;
//! - runs `main` on a stack in the space.
//!
//! A thread is a record in the space (start routine, argument, stack, result, state
//! word) and a stack in the space; `pthread_t` is the record's address on every node.
//! The node that runs it creates a local thread (glibc's, small local stack) that
//! switches to the space stack and calls the start routine. Join waits on the state
//! word with the distributed futex.

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use gallocy_core::ipc::{ErrorCode, IpcMessage};

use crate::report::Message;
use crate::runtime::{self, getenv, CallError};
use crate::stack::{self, SwitchContext};
use crate::sys;

/// Exit status of a worker instance whose modules sit elsewhere than the main's.
pub const EXIT_LAYOUT_DIFFERS: i32 = 89;
/// Exit status of an instance that cannot set itself up (no record, no memory).
pub const EXIT_SETUP_FAILED: i32 = 90;

const RECORD_MAGIC: u64 = 0x6761_6c74_6872_6431; // "galthrd1"
const PROGRAM_MAGIC: u64 = 0x6761_6c70_726f_6731; // "galprog1"
const MAX_MODULES: usize = 128;
/// Bytes at the end of the root block where the program record's address is.
const ROOT_SLOT_BYTES: u64 = 64;
const DEFAULT_STACK_BYTES: u64 = 8 << 20;
const MAX_STACK_BYTES: u64 = 256 << 20;
/// The local stack of the glibc thread under a space thread: the trampoline only.
const LOCAL_STACK_BYTES: usize = 256 << 10;
const ALT_STACK_BYTES: usize = 64 << 10;
/// How long a worker waits for the main instance's record.
const RECORD_WAIT_MS: u32 = 60_000;
const PAGE: u64 = 4096;

const STATE_RUNNING: u32 = 0;
const STATE_EXITED: u32 = 1;
const FLAG_DETACHED: u32 = 1;
const FLAG_EXITED: u32 = 2;

static PROGRAM: AtomicU64 = AtomicU64::new(0);
static IS_WORKER: AtomicBool = AtomicBool::new(false);
static NODES: AtomicU64 = AtomicU64::new(1);
static PLACEMENT_LOCAL: AtomicBool = AtomicBool::new(false);
static NEXT_PLACEMENT: AtomicU64 = AtomicU64::new(0);
/// pthread key of the running space thread's `Current` (0 until created; key + 1).
static CURRENT_KEY: AtomicUsize = AtomicUsize::new(0);

/// A thread, in the space.
#[repr(C)]
pub struct ThreadRecord {
    magic: u64,
    /// The futex word joins wait on: `STATE_RUNNING`, then `STATE_EXITED`.
    state: AtomicU32,
    /// `FLAG_DETACHED | FLAG_EXITED`: whoever sets the second frees the thread.
    flags: AtomicU32,
    start: u64,
    arg: u64,
    result: AtomicU64,
    stack_base: u64,
    stack_bytes: u64,
    node: u64,
    /// The glibc thread running it, on `node` (0 before it starts).
    local: AtomicU64,
}

/// The main instance's description of the program, in the space.
#[repr(C)]
struct ProgramRecord {
    magic: u64,
    program: u64,
    module_count: u64,
    /// (hash of the module's name, load address).
    modules: [(u64, u64); MAX_MODULES],
    globals_addr: u64,
    globals_space: u64,
    globals_len: u64,
}

/// The running space thread, on its local stack.
struct Current {
    record: u64,
    ctx: SwitchContext,
}

fn parse(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + (d - b'0') as u64)
    })
}

/// Reads the program's settings from the environment `gallocy run` and the daemons
/// set (`GALLOCY_PROGRAM`, `GALLOCY_INSTANCE`, `GALLOCY_NODES`, `GALLOCY_PLACEMENT`).
/// Returns whether this process is an instance of a launched program.
pub fn configure_from_env() -> bool {
    let Some(program) = getenv(c"GALLOCY_PROGRAM").and_then(parse) else {
        return false;
    };
    if program == 0 {
        return false;
    }
    PROGRAM.store(program, Ordering::Release);
    IS_WORKER.store(
        getenv(c"GALLOCY_INSTANCE") == Some(b"worker"),
        Ordering::Release,
    );
    let nodes = getenv(c"GALLOCY_NODES").and_then(parse).unwrap_or(1);
    NODES.store(nodes.clamp(1, 1 << 20), Ordering::Release);
    PLACEMENT_LOCAL.store(
        getenv(c"GALLOCY_PLACEMENT") == Some(b"local"),
        Ordering::Release,
    );
    true
}

pub fn program() -> u64 {
    PROGRAM.load(Ordering::Acquire)
}

pub fn is_worker() -> bool {
    IS_WORKER.load(Ordering::Acquire)
}

/// Threads go to other nodes: a launched program, attached, not placed locally.
pub fn distributes() -> bool {
    program() != 0 && runtime::is_attached()
}

fn fatal(code: i32, build: impl FnOnce(&mut Message)) -> ! {
    let mut message = Message::new();
    message.str("gallocy: ");
    build(&mut message);
    message.emit();
    sys::exit_now(code);
}

fn node() -> u64 {
    runtime::node_id() as u64
}

// ---------------------------------------------------------------------------------
// Space blocks for records, stacks, globals and arguments: carved by the daemon
// directly (not the heap), so they work with or without the preloaded allocator.

fn space_alloc(bytes: u64, align: u64) -> Option<u64> {
    match runtime::call(IpcMessage::Allocate {
        size_bytes: bytes,
        align_bytes: align,
    }) {
        Ok(IpcMessage::Allocated { addr, .. }) => Some(addr),
        _ => None,
    }
}

fn space_free(addr: u64) {
    let _ = runtime::call(IpcMessage::Free { addr });
}

// ---------------------------------------------------------------------------------
// Modules and globals.

struct Modules {
    count: usize,
    entries: [(u64, u64); MAX_MODULES],
    names: [*const c_char; MAX_MODULES],
    /// The executable's writable globals past RELRO: (start, end), page-aligned.
    globals: (u64, u64),
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

unsafe extern "C" fn collect_module(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: dl_iterate_phdr passes a valid info and our `Modules` as data.
    let (info, modules) = unsafe { (&*info, &mut *(data as *mut Modules)) };
    let first = modules.count == 0;
    if modules.count < MAX_MODULES {
        let name = if info.dlpi_name.is_null() {
            &b""[..]
        } else {
            // SAFETY: a NUL-terminated name owned by the dynamic linker.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        modules.entries[modules.count] = (fnv(name), info.dlpi_addr);
        modules.names[modules.count] = info.dlpi_name;
        modules.count += 1;
    }
    if first {
        // The executable: its last writable segment, past its RELRO part.
        let mut writable = (0u64, 0u64);
        let mut relro_end = 0u64;
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dlpi_phdr has dlpi_phnum entries.
            let phdr = unsafe { &*info.dlpi_phdr.add(i) };
            let start = info.dlpi_addr + phdr.p_vaddr;
            if phdr.p_type == libc::PT_LOAD && phdr.p_flags & libc::PF_W != 0 {
                writable = (start, start + phdr.p_memsz);
            }
            if phdr.p_type == libc::PT_GNU_RELRO {
                relro_end = start + phdr.p_memsz;
            }
        }
        let up = |v: u64| v.div_ceil(PAGE) * PAGE;
        let start = up(writable.0.max(relro_end));
        let end = up(writable.1);
        if writable.1 > 0 && start < end {
            modules.globals = (start, end);
        }
    }
    0
}

fn modules() -> Modules {
    let mut modules = Modules {
        count: 0,
        entries: [(0, 0); MAX_MODULES],
        names: [core::ptr::null(); MAX_MODULES],
        globals: (0, 0),
    };
    // SAFETY: the callback only writes into `modules`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect_module),
            &mut modules as *mut Modules as *mut c_void,
        )
    };
    modules
}

fn module_name(modules: &Modules, i: usize) -> &[u8] {
    let name = modules.names[i];
    if name.is_null() {
        return b"?";
    }
    // SAFETY: a NUL-terminated name owned by the dynamic linker.
    let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
    if bytes.is_empty() {
        b"the executable"
    } else {
        bytes
    }
}

/// A worker refuses to run when any module sits elsewhere than in the main instance.
fn check_modules(record: &ProgramRecord, mine: &Modules) {
    let theirs = &record.modules[..(record.module_count as usize).min(MAX_MODULES)];
    for i in 0..mine.count {
        let (hash, addr) = mine.entries[i];
        match theirs.iter().find(|(h, _)| *h == hash) {
            Some(&(_, main_addr)) if main_addr == addr => {}
            found => fatal(EXIT_LAYOUT_DIFFERS, |m| {
                m.text(module_name(mine, i)).str(" is at ").hex(addr);
                m.str(" in the instance on node ").dec(node() as i64);
                match found {
                    Some(&(_, main_addr)) => m.str(" but at ").hex(main_addr),
                    None => m.str(" but not loaded"),
                };
                m.str(" in the main instance: every instance must load the same libraries at the same addresses");
            }),
        }
    }
    if theirs.len() != mine.count {
        fatal(EXIT_LAYOUT_DIFFERS, |m| {
            m.str("the main instance loaded ")
                .dec(theirs.len() as i64)
                .str(" modules, the instance on node ")
                .dec(node() as i64)
                .str(" ")
                .dec(mine.count as i64)
                .str(": every instance must load the same libraries at the same addresses");
        });
    }
}

// ---------------------------------------------------------------------------------
// Program start.

fn root_slot() -> &'static [AtomicU64; 8] {
    let slot = runtime::base_addr() + runtime::root_size() - ROOT_SLOT_BYTES;
    // SAFETY: the last 64 bytes of the root block, mapped while attached; only
    // atomics touch them.
    unsafe { &*(slot as *const [AtomicU64; 8]) }
}

/// Copies NULL-terminated `strings` (argv, envp) into the space: a new vector.
///
/// # Safety
/// `strings` is a NULL-terminated array of NUL-terminated strings.
unsafe fn copy_vector(strings: *const *mut c_char) -> *mut *mut c_char {
    let mut count = 0usize;
    let mut bytes = 0u64;
    // SAFETY: per the contract.
    unsafe {
        while !(*strings.add(count)).is_null() {
            bytes += CStr::from_ptr(*strings.add(count))
                .to_bytes_with_nul()
                .len() as u64;
            count += 1;
        }
    }
    let table = (count as u64 + 1) * 8;
    let Some(block) = space_alloc(table + bytes, 16) else {
        return strings as *mut *mut c_char;
    };
    let vector = block as *mut *mut c_char;
    let mut text = block + table;
    for i in 0..count {
        // SAFETY: the block holds the table and every string; the source is valid.
        unsafe {
            let source = CStr::from_ptr(*strings.add(i)).to_bytes_with_nul();
            core::ptr::copy_nonoverlapping(source.as_ptr(), text as *mut u8, source.len());
            *vector.add(i) = text as *mut c_char;
            text += source.len() as u64;
        }
    }
    // SAFETY: the table's last entry.
    unsafe { *vector.add(count) = core::ptr::null_mut() };
    vector
}

extern "C" {
    fn pthread_attr_getdetachstate(attr: *const libc::pthread_attr_t, state: *mut c_int) -> c_int;
}

pub type MainFn = extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) -> c_int;

struct MainCall {
    main: MainFn,
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
}

extern "C" fn call_main(arg: u64) -> u64 {
    // SAFETY: run_on_stack passes the MainCall the caller keeps alive.
    let call = unsafe { &*(arg as *const MainCall) };
    (call.main)(call.argc, call.argv, call.envp) as u32 as u64
}

/// The program's `main` in the main instance, or the worker's service in a worker.
///
/// # Safety
/// Called once, from `__libc_start_main`, with the arguments it got.
pub unsafe fn run(
    main: MainFn,
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
) -> c_int {
    if !runtime::is_attached() {
        // Not attached (fallback heap): the program runs alone.
        return main(argc, argv, envp);
    }
    create_current_key();
    if is_worker() {
        run_worker();
    }
    let mine = modules();
    let Some(record_addr) = space_alloc(core::mem::size_of::<ProgramRecord>() as u64, 64) else {
        fatal(EXIT_SETUP_FAILED, |m| {
            m.str("cannot allocate the program record in the space");
        });
    };
    // SAFETY: a fresh block of the record's size, ours.
    let record = unsafe { &mut *(record_addr as *mut ProgramRecord) };
    record.magic = PROGRAM_MAGIC;
    record.program = program();
    record.module_count = mine.count as u64;
    record.modules = mine.entries;
    let (globals_start, globals_end) = mine.globals;
    let globals_len = globals_end - globals_start;
    record.globals_addr = globals_start;
    record.globals_len = globals_len;
    record.globals_space = 0;
    if globals_len > 0 {
        let Some(image) = space_alloc(globals_len, PAGE) else {
            fatal(EXIT_SETUP_FAILED, |m| {
                m.str("cannot allocate the globals' image in the space");
            });
        };
        // SAFETY: the executable's writable globals are mapped and readable; the image
        // is a fresh block of their size.
        unsafe {
            core::ptr::copy_nonoverlapping(
                globals_start as *const u8,
                image as *mut u8,
                globals_len as usize,
            )
        };
        if let Err(e) = runtime::add_alias(globals_start, image, globals_len) {
            fatal(EXIT_SETUP_FAILED, |m| {
                m.str("cannot map the globals onto the space (errno ")
                    .dec(e.raw_os_error() as i64)
                    .str(")");
            });
        }
        record.globals_space = image;
    }
    // The arguments and environment, readable from every node.
    // SAFETY: argv and envp as the kernel and libc laid them out.
    let argv = unsafe { copy_vector(argv) };
    // SAFETY: as above.
    let envp = unsafe { copy_vector(envp) };
    // SAFETY: environ is libc's global; the new vector holds the same strings.
    unsafe {
        extern "C" {
            static mut environ: *mut *mut c_char;
        }
        environ = envp;
    }
    // Publish: workers wait on the first word.
    let slot = root_slot();
    slot[1].store(program(), Ordering::SeqCst);
    slot[2].store(record_addr, Ordering::SeqCst);
    slot[0].store(1, Ordering::SeqCst);
    let word = slot.as_ptr() as u64;
    let _ = runtime::futex_wake(word, u32::MAX);
    start_serving_thread();
    // main runs on a stack in the space: its locals are reachable from every node.
    let stack_bytes = main_stack_bytes();
    let Some(stack) = space_alloc(stack_bytes, PAGE) else {
        fatal(EXIT_SETUP_FAILED, |m| {
            m.str("cannot allocate main's stack in the space");
        });
    };
    let alt = alt_stack_on();
    let call = MainCall {
        main,
        argc,
        argv,
        envp,
    };
    let mut ctx = SwitchContext::new();
    // SAFETY: the stack is a fresh block of stack_bytes used by nothing else; ctx and
    // call live until run_on_stack returns.
    let status = unsafe {
        stack::run_on_stack(
            &mut ctx,
            stack + stack_bytes,
            call_main,
            &call as *const MainCall as u64,
        )
    };
    alt_stack_off(alt);
    status as c_int
}

fn main_stack_bytes() -> u64 {
    let mut limit: libc::rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) } == 0;
    if !ok || limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur == 0 {
        return DEFAULT_STACK_BYTES;
    }
    (limit.rlim_cur.div_ceil(PAGE) * PAGE).min(MAX_STACK_BYTES)
}

/// A worker: waits for the main instance's record, checks its modules, maps the
/// globals, then runs the threads sent to this node until told to stop.
fn run_worker() -> ! {
    let slot = root_slot();
    let word = slot.as_ptr() as u64;
    let mut waited_ms = 0u32;
    let record_addr = loop {
        if slot[0].load(Ordering::SeqCst) == 1 && slot[1].load(Ordering::SeqCst) == program() {
            break slot[2].load(Ordering::SeqCst);
        }
        if waited_ms >= RECORD_WAIT_MS {
            fatal(EXIT_SETUP_FAILED, |m| {
                m.str("the main instance published no program record in ")
                    .dec(RECORD_WAIT_MS as i64 / 1000)
                    .str(" s");
            });
        }
        // The word is 0 until published (the low half of slot[0]).
        let _ = runtime::futex_wait(word, 0, 100);
        waited_ms += 100;
    };
    // SAFETY: the main instance wrote a ProgramRecord there before publishing it.
    let record = unsafe { &*(record_addr as *const ProgramRecord) };
    if record.magic != PROGRAM_MAGIC || record.program != program() {
        fatal(EXIT_SETUP_FAILED, |m| {
            m.str("the program record in the space is not this program's");
        });
    }
    let mine = modules();
    check_modules(record, &mine);
    if record.globals_len > 0 {
        if mine.globals
            != (
                record.globals_addr,
                record.globals_addr + record.globals_len,
            )
        {
            fatal(EXIT_LAYOUT_DIFFERS, |m| {
                m.str("the executable's globals are laid out differently here");
            });
        }
        if let Err(e) = runtime::add_alias(
            record.globals_addr,
            record.globals_space,
            record.globals_len,
        ) {
            fatal(EXIT_SETUP_FAILED, |m| {
                m.str("cannot map the globals onto the space (errno ")
                    .dec(e.raw_os_error() as i64)
                    .str(")");
            });
        }
    }
    serve(program())
}

fn start_serving_thread() {
    extern "C" fn serving(_: *mut c_void) -> *mut c_void {
        serve(program())
    }
    let mut thread: libc::pthread_t = 0;
    // SAFETY: a detached thread running `serving`, which uses only statics.
    let created = unsafe {
        real().create(
            &mut thread,
            core::ptr::null(),
            serving,
            core::ptr::null_mut(),
        )
    };
    if created != 0 {
        fatal(EXIT_SETUP_FAILED, |m| {
            m.str("cannot start the thread that serves this node's threads");
        });
    }
    // SAFETY: detaching the thread just created.
    unsafe { libc::pthread_detach(thread) };
}

/// Runs the threads the daemon sends to this instance; never returns.
fn serve(program: u64) -> ! {
    let fd = match runtime::serve_connection(program) {
        Ok(fd) => fd,
        // The program ended before this instance was ready (its main returned): there
        // is nothing to serve.
        Err(CallError::Refused(ErrorCode::NoInstance, _)) if is_worker() => {
            flush_output();
            sys::exit_now(0)
        }
        Err(error) => fatal(EXIT_SETUP_FAILED, |m| {
            m.str("cannot serve this node's threads: ");
            runtime::describe(m, error);
        }),
    };
    loop {
        match runtime::serve_next(fd) {
            Ok(IpcMessage::RunThread { record_addr, .. }) => {
                if start_local(record_addr) != 0 {
                    // Its joiner would wait forever: the program cannot go on.
                    fatal(EXIT_SETUP_FAILED, |m| {
                        m.str("cannot create a local thread for a thread of this program");
                    });
                }
            }
            Ok(IpcMessage::StopThreads) => {
                flush_output();
                sys::exit_now(0);
            }
            Ok(_) => {}
            Err(error) => fatal(EXIT_SETUP_FAILED, |m| {
                m.str("serving threads: ");
                runtime::describe(m, error);
            }),
        }
    }
}

fn flush_output() {
    // SAFETY: fflush(NULL) flushes every stdio stream of this process.
    unsafe { libc::fflush(core::ptr::null_mut()) };
}

// ---------------------------------------------------------------------------------
// glibc's own pthread functions, past any interposition (ours included).

type CreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    extern "C" fn(*mut c_void) -> *mut c_void,
    *mut c_void,
) -> c_int;

pub struct Real {
    create: CreateFn,
}

impl Real {
    /// # Safety
    /// As `pthread_create`.
    pub unsafe fn create(
        &self,
        thread: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        start: extern "C" fn(*mut c_void) -> *mut c_void,
        arg: *mut c_void,
    ) -> c_int {
        // SAFETY: per the contract.
        unsafe { (self.create)(thread, attr, start, arg) }
    }
}

static REAL_CREATE: AtomicUsize = AtomicUsize::new(0);

pub fn real() -> Real {
    let mut create = REAL_CREATE.load(Ordering::Acquire);
    if create == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        create = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        if create == 0 {
            fatal(EXIT_SETUP_FAILED, |m| {
                m.str("cannot find glibc's pthread_create");
            });
        }
        REAL_CREATE.store(create, Ordering::Release);
    }
    Real {
        // SAFETY: glibc's pthread_create has this signature.
        create: unsafe { core::mem::transmute::<usize, CreateFn>(create) },
    }
}

// ---------------------------------------------------------------------------------
// Threads.

fn create_current_key() {
    if CURRENT_KEY.load(Ordering::Acquire) != 0 {
        return;
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: creating a key without destructor.
    if unsafe { libc::pthread_key_create(&mut key, None) } == 0 {
        CURRENT_KEY.store(key as usize + 1, Ordering::Release);
    }
}

fn current() -> Option<&'static Current> {
    let key = CURRENT_KEY.load(Ordering::Acquire).checked_sub(1)?;
    // SAFETY: reading this thread's value of our key.
    let value = unsafe { libc::pthread_getspecific(key as libc::pthread_key_t) };
    // SAFETY: set by `trampoline` to its `Current`, which outlives the thread's run.
    (!value.is_null()).then(|| unsafe { &*(value as *const Current) })
}

fn set_current(value: *const Current) {
    if let Some(key) = CURRENT_KEY.load(Ordering::Acquire).checked_sub(1) {
        // SAFETY: setting this thread's value of our key.
        unsafe { libc::pthread_setspecific(key as libc::pthread_key_t, value as *const c_void) };
    }
}

fn record_of(handle: u64) -> Option<&'static ThreadRecord> {
    if !handle.is_multiple_of(8) || !runtime::in_space(handle) || !runtime::in_space(handle + 63) {
        return None;
    }
    // SAFETY: an aligned address inside the mapped space; reading faults it in.
    let record = unsafe { &*(handle as *const ThreadRecord) };
    (record.magic == RECORD_MAGIC).then_some(record)
}

/// Whether `handle` is a thread of this program (not a glibc `pthread_t`).
pub fn is_thread(handle: u64) -> bool {
    distributes() && record_of(handle).is_some()
}

/// Where a new thread goes: `GALLOCY_PLACEMENT=local` keeps it here (None: create it
/// as glibc does); round robin otherwise, starting with the next node.
pub fn placement() -> Option<u64> {
    if !distributes() || PLACEMENT_LOCAL.load(Ordering::Acquire) {
        return None;
    }
    let nodes = NODES.load(Ordering::Acquire);
    let n = NEXT_PLACEMENT.fetch_add(1, Ordering::Relaxed);
    Some((node() - 1 + 1 + n) % nodes + 1)
}

fn alt_stack_on() -> u64 {
    let Some(base) = sys::map_private_chunks(ALT_STACK_BYTES as u64, PAGE) else {
        return 0;
    };
    let alt = libc::stack_t {
        ss_sp: base as *mut c_void,
        ss_flags: 0,
        ss_size: ALT_STACK_BYTES,
    };
    // SAFETY: a fresh private mapping of ALT_STACK_BYTES as this thread's signal stack.
    unsafe { libc::sigaltstack(&alt, core::ptr::null_mut()) };
    base
}

fn alt_stack_off(base: u64) {
    if base == 0 {
        return;
    }
    let off = libc::stack_t {
        ss_sp: core::ptr::null_mut(),
        ss_flags: libc::SS_DISABLE,
        ss_size: 0,
    };
    // SAFETY: disabling this thread's signal stack before unmapping it.
    unsafe { libc::sigaltstack(&off, core::ptr::null_mut()) };
    sys::unmap(base, ALT_STACK_BYTES as u64);
}

/// Creates a thread of this program on `node` running `start(arg)`; its handle (the
/// record's address) in `*thread`. An errno on failure.
///
/// # Safety
/// As `pthread_create`; `attr` null or initialised.
pub unsafe fn create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: extern "C" fn(*mut c_void) -> *mut c_void,
    arg: *mut c_void,
    target: u64,
) -> c_int {
    if target == 0 || target > NODES.load(Ordering::Acquire) {
        return libc::EINVAL;
    }
    let mut detached = false;
    let mut stack_bytes = DEFAULT_STACK_BYTES;
    if !attr.is_null() {
        let mut state = 0;
        // SAFETY: an initialised attribute object.
        if unsafe { pthread_attr_getdetachstate(attr, &mut state) } == 0 {
            detached = state == libc::PTHREAD_CREATE_DETACHED;
        }
        let mut size = 0usize;
        // SAFETY: as above.
        if unsafe { libc::pthread_attr_getstacksize(attr, &mut size) } == 0 && size > 0 {
            stack_bytes = (size as u64).div_ceil(PAGE) * PAGE;
        }
    }
    let stack_bytes = stack_bytes.clamp(16 * PAGE, MAX_STACK_BYTES);
    let Some(record_addr) = space_alloc(core::mem::size_of::<ThreadRecord>() as u64, 64) else {
        return libc::EAGAIN;
    };
    let Some(stack) = space_alloc(stack_bytes, PAGE) else {
        space_free(record_addr);
        return libc::EAGAIN;
    };
    // SAFETY: a fresh block of the record's size, ours until published.
    unsafe {
        (record_addr as *mut ThreadRecord).write(ThreadRecord {
            magic: RECORD_MAGIC,
            state: AtomicU32::new(STATE_RUNNING),
            flags: AtomicU32::new(if detached { FLAG_DETACHED } else { 0 }),
            start: start as usize as u64,
            arg: arg as u64,
            result: AtomicU64::new(0),
            stack_base: stack,
            stack_bytes,
            node: target,
            local: AtomicU64::new(0),
        })
    };
    let result = if target == node() {
        start_local(record_addr)
    } else {
        match runtime::spawn_thread(program(), target, record_addr) {
            Ok(_) => 0,
            Err(error) => {
                runtime::set_last_error(|m| {
                    m.str("gallocy: cannot spawn a thread on node ")
                        .dec(target as i64)
                        .str(": ");
                    runtime::describe(m, error);
                });
                match error {
                    CallError::Refused(ErrorCode::InvalidArgument, _) => libc::EINVAL,
                    _ => libc::EAGAIN,
                }
            }
        }
    };
    if result != 0 {
        space_free(stack);
        space_free(record_addr);
        return result;
    }
    // SAFETY: the caller's pthread_t.
    unsafe { *thread = record_addr as libc::pthread_t };
    0
}

/// Runs the thread of `record_addr` here: a detached glibc thread with a small local
/// stack, which switches to the thread's space stack.
fn start_local(record_addr: u64) -> c_int {
    let mut attr: libc::pthread_attr_t = unsafe { core::mem::zeroed() };
    // SAFETY: initialising and configuring an attribute object we own.
    unsafe {
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        libc::pthread_attr_setstacksize(&mut attr, LOCAL_STACK_BYTES);
    }
    let mut local: libc::pthread_t = 0;
    // SAFETY: the trampoline takes the record's address, which stays valid until the
    // thread is joined or, detached, has finished.
    let created =
        unsafe { real().create(&mut local, &attr, trampoline, record_addr as *mut c_void) };
    // SAFETY: destroying the attribute object we initialised.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    created
}

extern "C" fn thread_entry(record_addr: u64) -> u64 {
    // SAFETY: the record this thread runs.
    let record = unsafe { &*(record_addr as *const ThreadRecord) };
    // SAFETY: `start` is the routine pthread_create was given.
    let start: extern "C" fn(*mut c_void) -> *mut c_void =
        unsafe { core::mem::transmute(record.start as usize) };
    start(record.arg as *mut c_void) as u64
}

extern "C" fn trampoline(arg: *mut c_void) -> *mut c_void {
    let record_addr = arg as u64;
    // SAFETY: the record this thread runs, in the space.
    let record = unsafe { &*(record_addr as *const ThreadRecord) };
    // SAFETY: pthread_self of this glibc thread.
    record
        .local
        .store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
    let alt = alt_stack_on();
    let mut current = Current {
        record: record_addr,
        ctx: SwitchContext::new(),
    };
    set_current(&current);
    let top = record.stack_base + record.stack_bytes;
    // SAFETY: the thread's own stack block, used by nothing else; `current` lives
    // until run_on_stack returns (pthread_exit comes back here too).
    let result = unsafe { stack::run_on_stack(&mut current.ctx, top, thread_entry, record_addr) };
    set_current(core::ptr::null());
    finish(record, result);
    alt_stack_off(alt);
    core::ptr::null_mut()
}

/// The thread's end: its output out first (workers' stdout is a pipe), then the
/// result, then its joiner woken; a detached thread frees itself.
fn finish(record: &ThreadRecord, result: u64) {
    if is_worker() {
        flush_output();
    }
    record.result.store(result, Ordering::SeqCst);
    let before = record.flags.fetch_or(FLAG_EXITED, Ordering::SeqCst);
    record.state.store(STATE_EXITED, Ordering::SeqCst);
    let _ = runtime::futex_wake(&record.state as *const AtomicU32 as u64, u32::MAX);
    if before & FLAG_DETACHED != 0 {
        release(record);
    }
}

fn release(record: &ThreadRecord) {
    let stack = record.stack_base;
    let addr = record as *const ThreadRecord as u64;
    space_free(stack);
    space_free(addr);
}

/// `pthread_join` of a thread of this program.
///
/// # Safety
/// `result` null or writable.
pub unsafe fn join(handle: u64, result: *mut *mut c_void) -> c_int {
    let Some(record) = record_of(handle) else {
        return libc::ESRCH;
    };
    if record.flags.load(Ordering::SeqCst) & FLAG_DETACHED != 0 {
        return libc::EINVAL;
    }
    if current().is_some_and(|c| c.record == handle) {
        return libc::EDEADLK;
    }
    let word = &record.state as *const AtomicU32 as u64;
    while record.state.load(Ordering::SeqCst) != STATE_EXITED {
        if let Err(error) = runtime::futex_wait(word, STATE_RUNNING, 0) {
            runtime::set_last_error(|m| {
                m.str("gallocy: pthread_join: ");
                runtime::describe(m, error);
            });
            return libc::EIO;
        }
    }
    // Written before the state became EXITED.
    let value = record.result.load(Ordering::SeqCst);
    if !result.is_null() {
        // SAFETY: the caller's result slot.
        unsafe { *result = value as *mut c_void };
    }
    release(record);
    0
}

/// `pthread_detach` of a thread of this program.
pub fn detach(handle: u64) -> c_int {
    let Some(record) = record_of(handle) else {
        return libc::ESRCH;
    };
    let before = record.flags.fetch_or(FLAG_DETACHED, Ordering::SeqCst);
    if before & FLAG_DETACHED != 0 {
        return libc::EINVAL;
    }
    if before & FLAG_EXITED != 0 {
        release(record);
    }
    0
}

/// The running thread's handle, if it is a thread of this program.
pub fn self_handle() -> Option<u64> {
    current().map(|c| c.record)
}

/// `pthread_exit` in a thread of this program: back to its trampoline with `value`
/// (frames on its stack are abandoned: their cleanup handlers do not run).
pub fn exit_thread(value: *mut c_void) {
    if let Some(current) = current() {
        // SAFETY: this thread runs on the stack its trampoline switched to.
        unsafe { stack::leave_stack(&current.ctx, value as u64) }
    }
}

/// The glibc thread behind a handle, when it runs on this node.
pub fn local_thread(handle: u64) -> Option<libc::pthread_t> {
    let record = record_of(handle)?;
    if record.node != node() {
        return None;
    }
    let local = record.local.load(Ordering::SeqCst);
    (local != 0).then_some(local as libc::pthread_t)
}
