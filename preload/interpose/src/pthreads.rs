//! The program's start and pthread's thread functions, for a program `gallocy run`
//! launched on several nodes (gallocy::threads has the machinery; docs/runtime.md,
//! "Threads on every node"). Anything else goes to glibc unchanged.

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicUsize, Ordering};

use gallocy::threads::{self, MainFn};

/// glibc's function `name`, found past this library once and cached in `cache`.
fn next(cache: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let mut f = cache.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        if f == 0 {
            gallocy::sys::write_stderr(b"gallocy: a pthread function is missing from libc\n");
            gallocy::sys::exit_now(threads::EXIT_SETUP_FAILED);
        }
        cache.store(f, Ordering::Release);
    }
    f
}

macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static CACHE: AtomicUsize = AtomicUsize::new(0);
        let f = next(&CACHE, $name);
        // SAFETY: glibc's function of that name has this signature.
        #[allow(unused_unsafe)]
        let f = unsafe { core::mem::transmute::<usize, $ty>(f) };
        f
    }};
}

type StartMain = unsafe extern "C" fn(
    MainFn,
    c_int,
    *mut *mut c_char,
    *const c_void,
    *const c_void,
    *const c_void,
    *mut c_void,
) -> c_int;

static PROGRAM_MAIN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn program_main(argc: c_int, argv: *mut *mut c_char, envp: *mut *mut c_char) -> c_int {
    // SAFETY: stored by __libc_start_main below before it calls us.
    let main: MainFn = unsafe { core::mem::transmute(PROGRAM_MAIN.load(Ordering::Acquire)) };
    // SAFETY: called once, by glibc's __libc_start_main, with its arguments.
    unsafe { threads::run(main, argc, argv, envp) }
}

/// Every dynamically linked program starts here (from `_start`). An instance of a
/// launched program runs `main` through `threads::run` (globals and stack in the
/// space; a worker instance serves threads instead); any other program is untouched.
///
/// # Safety
/// Called by the C runtime's `_start`, as glibc's.
#[no_mangle]
pub unsafe extern "C" fn __libc_start_main(
    main: MainFn,
    argc: c_int,
    argv: *mut *mut c_char,
    init: *const c_void,
    fini: *const c_void,
    rtld_fini: *const c_void,
    stack_end: *mut c_void,
) -> c_int {
    let start: StartMain = real!(c"__libc_start_main", StartMain);
    if threads::program() == 0 {
        // SAFETY: glibc's, with the arguments we were given.
        return unsafe { start(main, argc, argv, init, fini, rtld_fini, stack_end) };
    }
    PROGRAM_MAIN.store(main as usize, Ordering::Release);
    // SAFETY: as above, with our main in place of the program's.
    unsafe { start(program_main, argc, argv, init, fini, rtld_fini, stack_end) }
}

type CreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    gallocy::StartRoutine,
    *mut c_void,
) -> c_int;

/// # Safety
/// As glibc's.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: gallocy::StartRoutine,
    arg: *mut c_void,
) -> c_int {
    match threads::placement() {
        // SAFETY: per the contract.
        Some(node) => unsafe { threads::create(thread, attr, start, arg, node) },
        // SAFETY: per the contract.
        None => unsafe { real!(c"pthread_create", CreateFn)(thread, attr, start, arg) },
    }
}

/// # Safety
/// As glibc's.
#[no_mangle]
pub unsafe extern "C" fn pthread_join(thread: libc::pthread_t, result: *mut *mut c_void) -> c_int {
    if threads::is_thread(thread) {
        // SAFETY: per the contract.
        return unsafe { threads::join(thread, result) };
    }
    type F = unsafe extern "C" fn(libc::pthread_t, *mut *mut c_void) -> c_int;
    // SAFETY: a glibc thread.
    unsafe { real!(c"pthread_join", F)(thread, result) }
}

/// # Safety
/// As glibc's. A thread of another node: joined like `pthread_join` (the timeout is
/// not applied).
#[no_mangle]
pub unsafe extern "C" fn pthread_timedjoin_np(
    thread: libc::pthread_t,
    result: *mut *mut c_void,
    abstime: *const libc::timespec,
) -> c_int {
    if threads::is_thread(thread) {
        // SAFETY: per the contract.
        return unsafe { threads::join(thread, result) };
    }
    type F =
        unsafe extern "C" fn(libc::pthread_t, *mut *mut c_void, *const libc::timespec) -> c_int;
    // SAFETY: a glibc thread.
    unsafe { real!(c"pthread_timedjoin_np", F)(thread, result, abstime) }
}

/// # Safety
/// As glibc's.
#[no_mangle]
pub unsafe extern "C" fn pthread_detach(thread: libc::pthread_t) -> c_int {
    if threads::is_thread(thread) {
        return threads::detach(thread);
    }
    type F = unsafe extern "C" fn(libc::pthread_t) -> c_int;
    // SAFETY: a glibc thread.
    unsafe { real!(c"pthread_detach", F)(thread) }
}

#[no_mangle]
pub extern "C" fn pthread_self() -> libc::pthread_t {
    if let Some(handle) = threads::self_handle() {
        return handle as libc::pthread_t;
    }
    type F = unsafe extern "C" fn() -> libc::pthread_t;
    // SAFETY: glibc's, no arguments.
    unsafe { real!(c"pthread_self", F)() }
}

/// # Safety
/// As glibc's.
#[no_mangle]
pub unsafe extern "C" fn pthread_exit(value: *mut c_void) -> ! {
    // Returns only outside a thread of the program.
    threads::exit_thread(value);
    type F = unsafe extern "C" fn(*mut c_void) -> !;
    // SAFETY: glibc's.
    unsafe { real!(c"pthread_exit", F)(value) }
}

/// The glibc thread for `thread`: itself, the local thread of a program's thread on
/// this node, or None for one running on another node.
fn local(thread: libc::pthread_t) -> Option<libc::pthread_t> {
    if threads::is_thread(thread) {
        threads::local_thread(thread)
    } else {
        Some(thread)
    }
}

/// # Safety
/// As glibc's. A thread of another node cannot be signalled: ESRCH.
#[no_mangle]
pub unsafe extern "C" fn pthread_kill(thread: libc::pthread_t, signal: c_int) -> c_int {
    let Some(thread) = local(thread) else {
        return libc::ESRCH;
    };
    type F = unsafe extern "C" fn(libc::pthread_t, c_int) -> c_int;
    // SAFETY: a glibc thread of this process.
    unsafe { real!(c"pthread_kill", F)(thread, signal) }
}

/// # Safety
/// As glibc's. A thread of another node cannot be cancelled: ENOTSUP.
#[no_mangle]
pub unsafe extern "C" fn pthread_cancel(thread: libc::pthread_t) -> c_int {
    let Some(thread) = local(thread) else {
        return libc::ENOTSUP;
    };
    type F = unsafe extern "C" fn(libc::pthread_t) -> c_int;
    // SAFETY: a glibc thread of this process.
    unsafe { real!(c"pthread_cancel", F)(thread) }
}

/// # Safety
/// As glibc's. A thread of another node keeps its name: ENOTSUP.
#[no_mangle]
pub unsafe extern "C" fn pthread_setname_np(thread: libc::pthread_t, name: *const c_char) -> c_int {
    let Some(thread) = local(thread) else {
        return libc::ENOTSUP;
    };
    type F = unsafe extern "C" fn(libc::pthread_t, *const c_char) -> c_int;
    // SAFETY: a glibc thread of this process.
    unsafe { real!(c"pthread_setname_np", F)(thread, name) }
}

/// # Safety
/// As glibc's. A thread of another node: ENOTSUP.
#[no_mangle]
pub unsafe extern "C" fn pthread_getattr_np(
    thread: libc::pthread_t,
    attr: *mut libc::pthread_attr_t,
) -> c_int {
    let Some(thread) = local(thread) else {
        return libc::ENOTSUP;
    };
    type F = unsafe extern "C" fn(libc::pthread_t, *mut libc::pthread_attr_t) -> c_int;
    // SAFETY: a glibc thread of this process.
    unsafe { real!(c"pthread_getattr_np", F)(thread, attr) }
}
