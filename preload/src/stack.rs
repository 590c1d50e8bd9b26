//! Running a function on another stack (a stack in the space), and leaving it early
//! (`pthread_exit` from a thread whose stack is in the space).
//!
//! `gallocy_run_on_stack(ctx, top, f, arg)` saves the callee-saved registers on the
//! current stack, records the stack pointer in `*ctx`, switches to `top` and calls
//! `f(arg)`; when `f` returns, or when `gallocy_leave_stack(ctx, value)` is called from
//! anywhere on the new stack, the old stack and registers come back and
//! `gallocy_run_on_stack` returns `f`'s result (or `value`). Frames on the new stack are
//! abandoned, not unwound: no cleanup handler or destructor of them runs.

#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .text.gallocy_stack,\"ax\",@progbits",
    ".globl gallocy_run_on_stack",
    ".hidden gallocy_run_on_stack",
    ".type gallocy_run_on_stack,@function",
    // rdi = ctx, rsi = top (16-aligned), rdx = f, rcx = arg
    "gallocy_run_on_stack:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov r12, rdi",
    "mov rsp, rsi",
    "mov rdi, rcx",
    "call rdx",
    "mov rsp, [r12]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size gallocy_run_on_stack, . - gallocy_run_on_stack",
    ".globl gallocy_leave_stack",
    ".hidden gallocy_leave_stack",
    ".type gallocy_leave_stack,@function",
    // rdi = ctx, rsi = value
    "gallocy_leave_stack:",
    "mov rsp, [rdi]",
    "mov rax, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size gallocy_leave_stack, . - gallocy_leave_stack",
    ".popsection",
);

extern "C" {
    fn gallocy_run_on_stack(ctx: *mut u64, top: u64, f: extern "C" fn(u64) -> u64, arg: u64)
        -> u64;
    fn gallocy_leave_stack(ctx: *const u64, value: u64) -> !;
}

/// Where a switch came from: the saved stack pointer of the old stack.
#[repr(C)]
pub struct SwitchContext {
    saved_rsp: u64,
}

impl SwitchContext {
    pub const fn new() -> SwitchContext {
        SwitchContext { saved_rsp: 0 }
    }
}

impl Default for SwitchContext {
    fn default() -> Self {
        SwitchContext::new()
    }
}

/// Runs `f(arg)` on the stack whose highest address is `top`.
///
/// # Safety
/// `[top - size, top)` must be writable memory no one else uses while `f` runs, large
/// enough for `f`; `ctx` must stay valid (and unmoved) until this returns.
pub unsafe fn run_on_stack(
    ctx: &mut SwitchContext,
    top: u64,
    f: extern "C" fn(u64) -> u64,
    arg: u64,
) -> u64 {
    debug_assert!(top.is_multiple_of(16));
    // SAFETY: the caller guarantees the stack and the context; the assembly saves and
    // restores every callee-saved register and the stack pointer.
    unsafe { gallocy_run_on_stack(&mut ctx.saved_rsp, top, f, arg) }
}

/// Returns from the `run_on_stack` that recorded `ctx`, with `value`.
///
/// # Safety
/// Must be called on the stack that `run_on_stack(ctx, ..)` switched to, while that
/// call has not returned.
pub unsafe fn leave_stack(ctx: *const SwitchContext, value: u64) -> ! {
    // SAFETY: per the contract, ctx holds the saved stack pointer of a live switch.
    unsafe { gallocy_leave_stack(ctx as *const u64, value) }
}
