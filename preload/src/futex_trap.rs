//! `futex(2)` on space memory, redirected to the daemon's distributed futex.
//!
//! glibc's mutexes, condition variables, barriers, rwlocks, semaphores and
//! `pthread_once` sleep with inline `futex` system calls that no symbol interposition
//! can catch, and a kernel futex wakes only waiters of this machine. So attach installs
//! a seccomp filter that traps (`SECCOMP_RET_TRAP`, delivering SIGSYS) every `futex`
//! call whose address lies in the space, and the SIGSYS handler performs it with
//! `FutexWait`/`FutexWake` through the daemon (docs/protocol.md, "Futexes"). glibc's
//! algorithms then run unchanged, across processes and nodes.
//!
//! Calls elsewhere never trap. A trapped call the daemon cannot serve (the process is
//! no longer attached, e.g. a forked child whose copy of the heap is private) is made
//! for real from one `syscall` instruction the filter lets through.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::{self, FutexWaitEnd};

const SYS_FUTEX: u32 = 202;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const SECCOMP_SET_MODE_FILTER: u32 = 1;
const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;

const FUTEX_WAIT: i32 = 0;
const FUTEX_WAKE: i32 = 1;
const FUTEX_WAIT_BITSET: i32 = 9;
const FUTEX_WAKE_BITSET: i32 = 10;
const FUTEX_PRIVATE_FLAG: i32 = 128;
const FUTEX_CLOCK_REALTIME: i32 = 256;

/// The space range the last installed filter traps, so that attaching to the same
/// range again adds no filter (each one costs every system call a few instructions,
/// and the kernel bounds their total length).
static TRAPPED_BASE: AtomicU64 = AtomicU64::new(0);
static TRAPPED_END: AtomicU64 = AtomicU64::new(0);

// The one `futex` system call the filter allows from anywhere: the pass-through for
// calls the daemon cannot serve. C ABI arguments in rdi, rsi, rdx, rcx, r8, r9; the
// kernel wants the fourth in r10. Returns the raw result (a negative errno on error).
core::arch::global_asm!(
    ".pushsection .text.gallocy_futex_passthrough,\"ax\",@progbits",
    ".globl gallocy_futex_passthrough",
    ".hidden gallocy_futex_passthrough",
    ".type gallocy_futex_passthrough,@function",
    "gallocy_futex_passthrough:",
    "mov eax, 202",
    "mov r10, rcx",
    ".globl gallocy_futex_passthrough_syscall",
    ".hidden gallocy_futex_passthrough_syscall",
    "gallocy_futex_passthrough_syscall:",
    "syscall",
    "ret",
    ".size gallocy_futex_passthrough, . - gallocy_futex_passthrough",
    ".popsection",
);

extern "C" {
    fn gallocy_futex_passthrough(
        uaddr: u64,
        op: u64,
        val: u64,
        timeout: u64,
        uaddr2: u64,
        val3: u64,
    ) -> i64;
    static gallocy_futex_passthrough_syscall: u8;
}

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

const fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// Offsets in `struct seccomp_data` (little-endian halves of the 64-bit fields).
const NR: u32 = 0;
const ARCH: u32 = 4;
const IP_LO: u32 = 8;
const IP_HI: u32 = 12;
const ARG0_LO: u32 = 16;
const ARG0_HI: u32 = 20;

/// Installs the filter for `[base, base + size)` (on every thread of the process);
/// false if the kernel refused (then futexes on space memory stay machine-local).
pub fn install(base: u64, size: u64) -> bool {
    let end = base.saturating_add(size);
    if TRAPPED_BASE.load(Ordering::Acquire) == base && TRAPPED_END.load(Ordering::Acquire) == end {
        return true;
    }
    let installed = trap_range(base, end);
    if installed {
        TRAPPED_BASE.store(base, Ordering::Release);
        TRAPPED_END.store(end, Ordering::Release);
    }
    installed
}

/// Traps futex calls on `[base, end)` too (an alias of space pages: the executable's
/// globals). Filters stack: each one sees every call.
pub fn trap_range(base: u64, end: u64) -> bool {
    // The address of a code label (never read through).
    let syscall_ip = (&raw const gallocy_futex_passthrough_syscall) as u64;
    let (ip_lo, ip_hi) = (syscall_ip as u32, (syscall_ip >> 32) as u32);
    let (base_lo, base_hi) = (base as u32, (base >> 32) as u32);
    let (end_lo, end_hi) = (end as u32, (end >> 32) as u32);
    // The instruction pointer the kernel reports is the one after `syscall` (2 bytes);
    // both are accepted. Jumps are relative to the next instruction.
    let program = [
        /* 0 */ stmt(LD_W_ABS, ARCH),
        /* 1 */ jump(JEQ_K, AUDIT_ARCH_X86_64, 0, 17), // -> 19 allow
        /* 2 */ stmt(LD_W_ABS, NR),
        /* 3 */ jump(JEQ_K, SYS_FUTEX, 0, 15), // -> 19 allow
        /* 4 */ stmt(LD_W_ABS, IP_HI),
        /* 5 */ jump(JEQ_K, ip_hi, 0, 3), // -> 9 check the address
        /* 6 */ stmt(LD_W_ABS, IP_LO),
        /* 7 */ jump(JGE_K, ip_lo, 0, 1), // -> 9
        /* 8 */ jump(JGT_K, ip_lo.wrapping_add(2), 0, 10), // <= ip+2: -> 19 allow
        /* 9 */ stmt(LD_W_ABS, ARG0_HI),
        /* 10 */ jump(JGT_K, base_hi, 3, 0), // -> 14: above the base
        /* 11 */ jump(JEQ_K, base_hi, 0, 7), // below: -> 19 allow
        /* 12 */ stmt(LD_W_ABS, ARG0_LO),
        /* 13 */ jump(JGE_K, base_lo, 0, 5), // below: -> 19 allow
        /* 14 */ stmt(LD_W_ABS, ARG0_HI),
        /* 15 */ jump(JGT_K, end_hi, 3, 0), // beyond: -> 19 allow
        /* 16 */ jump(JEQ_K, end_hi, 0, 3), // below the end's high half: -> 20 trap
        /* 17 */ stmt(LD_W_ABS, ARG0_LO),
        /* 18 */ jump(JGE_K, end_lo, 0, 1), // >= end: -> 19 allow, else -> 20 trap
        /* 19 */ stmt(RET_K, SECCOMP_RET_ALLOW),
        /* 20 */ stmt(RET_K, SECCOMP_RET_TRAP),
    ];
    let prog = SockFprog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    // SAFETY: a fully initialised sigaction for a handler with the SA_SIGINFO
    // signature. No SA_NODEFER: a futex inside the handler is never trapped (not in
    // the space or through the pass-through), and SIGSEGV stays unblocked so the
    // handler can fault pages in.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, core::ptr::null_mut()) != 0 {
            return false;
        }
    }
    // SAFETY: prctl and seccomp with valid arguments; `prog` and `program` outlive the
    // call (the kernel copies the filter).
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_TSYNC,
                &prog as *const SockFprog,
            ) == 0
    }
}

/// Milliseconds until a `timespec`-style duration has passed, rounded up (at least 1:
/// 0 means "no limit" to the daemon).
fn timespec_ms(seconds: i64, nanos: i64) -> u32 {
    let ms = seconds
        .saturating_mul(1000)
        .saturating_add((nanos + 999_999) / 1_000_000);
    ms.clamp(1, u32::MAX as i64 - 1) as u32
}

/// The wait's limit in ms from its timeout argument: relative for `FUTEX_WAIT`,
/// absolute on the monotonic (or realtime) clock for `FUTEX_WAIT_BITSET`. Err(()) if
/// it is already over.
fn wait_limit_ms(cmd: i32, op: i32, timeout: u64) -> Result<Option<u32>, ()> {
    if timeout == 0 {
        return Ok(None);
    }
    // SAFETY: the caller's timeout argument points to a timespec (the kernel would read
    // it the same way; a bad pointer faults here as it would fail there).
    let ts = unsafe { *(timeout as *const libc::timespec) };
    if cmd == FUTEX_WAIT {
        if ts.tv_sec == 0 && ts.tv_nsec == 0 {
            return Err(());
        }
        return Ok(Some(timespec_ms(ts.tv_sec, ts.tv_nsec)));
    }
    let clock = if op & FUTEX_CLOCK_REALTIME != 0 {
        libc::CLOCK_REALTIME
    } else {
        libc::CLOCK_MONOTONIC
    };
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass (vDSO, async-signal-safe).
    unsafe { libc::clock_gettime(clock, &mut now) };
    let left_ns = (ts.tv_sec - now.tv_sec)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec - now.tv_nsec);
    if left_ns <= 0 {
        return Err(());
    }
    Ok(Some(timespec_ms(0, left_ns)))
}

/// Performs a trapped futex call; the kernel's return convention (negative errno).
fn emulate(uaddr: u64, op: u64, val: u64, timeout: u64, uaddr2: u64, val3: u64) -> i64 {
    let op32 = op as i32;
    let cmd = op32 & !(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME);
    let served = matches!(
        cmd,
        FUTEX_WAIT | FUTEX_WAIT_BITSET | FUTEX_WAKE | FUTEX_WAKE_BITSET
    );
    // A word of an alias (a global) is the space word behind it.
    let space_addr = runtime::space_addr(uaddr);
    if !served || space_addr.is_none() {
        // Requeue and the rest are not used by glibc's algorithms on this machine's
        // glibc; they, and calls of a process no longer attached, go to the kernel.
        // SAFETY: the caller's own arguments, to the system call it made.
        return unsafe { gallocy_futex_passthrough(uaddr, op, val, timeout, uaddr2, val3) };
    }
    let uaddr = space_addr.expect("checked");
    if cmd == FUTEX_WAKE || cmd == FUTEX_WAKE_BITSET {
        let count = (val as u32).min(i32::MAX as u32);
        return match runtime::futex_wake(uaddr, count) {
            Ok(woken) => woken as i64,
            Err(error) => -(runtime::errno_of(error) as i64),
        };
    }
    let limit_ms = match wait_limit_ms(cmd, op32, timeout) {
        Ok(limit) => limit,
        // A limit already over: compare only, as the kernel does.
        Err(()) if !uaddr.is_multiple_of(4) => return -(libc::EINVAL as i64),
        Err(()) if runtime::load_futex_word(uaddr) != val as u32 => {
            return FutexWaitEnd::ValueChanged.result() as i64
        }
        Err(()) => return FutexWaitEnd::TimedOut.result() as i64,
    };
    match runtime::futex_wait(uaddr, val as u32, limit_ms.unwrap_or(0)) {
        Ok(end) => end.result() as i64,
        // glibc retries a wait that returns EINTR; an error of the daemon (a page lost,
        // this node evicted) was already reported by the fault path when it mattered.
        Err(_) => -(libc::EINTR as i64),
    }
}

extern "C" fn on_sigsys(_signal: i32, _info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted thread's ucontext; only the filter's
    // futex traps raise SIGSYS here, with the call's arguments in the registers.
    unsafe {
        let errno = *libc::__errno_location();
        let uc = &mut *(context as *mut libc::ucontext_t);
        let regs = &mut uc.uc_mcontext.gregs;
        let arg = |r: i32| regs[r as usize] as u64;
        let result = emulate(
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        );
        regs[libc::REG_RAX as usize] = result;
        *libc::__errno_location() = errno;
    }
}
