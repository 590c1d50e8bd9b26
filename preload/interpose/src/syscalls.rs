//! System calls on space memory the process cannot access right now.
//!
//! `read(2)` into a PROT_NONE page fails with EFAULT instead of raising SIGSEGV (the
//! kernel, not the program, touches the page). These wrappers make the system call
//! directly; on EFAULT with a buffer in the space they take the buffer's pages from
//! the daemon (for writing when the kernel writes into it) and try again, a bounded
//! number of times.

use core::ffi::c_void;

use gallocy::runtime;

const ATTEMPTS: usize = 4;

/// Takes `[buf, buf+len)` from the daemon if it is in the space. True if it did.
fn take(buf: *const c_void, len: usize, write: bool) -> bool {
    let start = buf as u64;
    if len == 0 || !runtime::in_space(start) {
        return false;
    }
    runtime::take_range(start, len as u64, write).is_ok()
}

/// Makes the call; on EFAULT, takes the buffers back with `take` and tries again (at
/// most `ATTEMPTS` times), unless `take` had nothing to take.
fn retry_on_efault(mut take: impl FnMut() -> bool, mut call: impl FnMut() -> isize) -> isize {
    for _ in 0..ATTEMPTS {
        let result = call();
        if result >= 0 {
            return result;
        }
        // SAFETY: this thread's errno.
        let errno = unsafe { *libc::__errno_location() };
        if errno != libc::EFAULT || !take() {
            return result;
        }
    }
    call()
}

fn retry(
    buf: *const c_void,
    len: usize,
    kernel_writes: bool,
    call: impl FnMut() -> isize,
) -> isize {
    retry_on_efault(|| take(buf, len, kernel_writes), call)
}

/// msync(2): on space memory, makes this process's writes durable the gallocy way
/// (`gallocy_sync`: on k nodes); elsewhere the kernel's.
///
/// # Safety
/// As msync(2).
#[no_mangle]
pub unsafe extern "C" fn msync(addr: *mut c_void, len: usize, flags: i32) -> i32 {
    let start = addr as u64;
    if len > 0 && runtime::in_space(start) {
        // Invalid flags are refused as the kernel would (EINVAL), first.
        let known = libc::MS_ASYNC | libc::MS_SYNC | libc::MS_INVALIDATE;
        if flags & !known != 0 || (flags & libc::MS_ASYNC != 0 && flags & libc::MS_SYNC != 0) {
            // SAFETY: this thread's errno.
            unsafe { *libc::__errno_location() = libc::EINVAL };
            return -1;
        }
        return match runtime::sync() {
            Ok(()) => 0,
            Err(error) => {
                // SAFETY: this thread's errno.
                unsafe { *libc::__errno_location() = runtime::errno_of(error) };
                -1
            }
        };
    }
    // SAFETY: the caller's arguments, to the kernel as they are.
    unsafe { libc::syscall(libc::SYS_msync, addr, len, flags) as i32 }
}

/// # Safety
/// As read(2).
#[no_mangle]
pub unsafe extern "C" fn read(fd: i32, buf: *mut c_void, count: usize) -> isize {
    retry(buf, count, true, || {
        libc::syscall(libc::SYS_read, fd, buf, count) as isize
    })
}

/// # Safety
/// As write(2).
#[no_mangle]
pub unsafe extern "C" fn write(fd: i32, buf: *const c_void, count: usize) -> isize {
    retry(buf, count, false, || {
        libc::syscall(libc::SYS_write, fd, buf, count) as isize
    })
}

/// # Safety
/// As pread(2).
#[no_mangle]
pub unsafe extern "C" fn pread64(fd: i32, buf: *mut c_void, count: usize, offset: i64) -> isize {
    retry(buf, count, true, || {
        libc::syscall(libc::SYS_pread64, fd, buf, count, offset) as isize
    })
}

/// # Safety
/// As pread(2).
#[no_mangle]
pub unsafe extern "C" fn pread(fd: i32, buf: *mut c_void, count: usize, offset: i64) -> isize {
    pread64(fd, buf, count, offset)
}

/// # Safety
/// As pwrite(2).
#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: i32, buf: *const c_void, count: usize, offset: i64) -> isize {
    retry(buf, count, false, || {
        libc::syscall(libc::SYS_pwrite64, fd, buf, count, offset) as isize
    })
}

/// # Safety
/// As pwrite(2).
#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: i32, buf: *const c_void, count: usize, offset: i64) -> isize {
    pwrite64(fd, buf, count, offset)
}

/// # Safety
/// As recv(2).
#[no_mangle]
pub unsafe extern "C" fn recv(fd: i32, buf: *mut c_void, len: usize, flags: i32) -> isize {
    retry(buf, len, true, || {
        libc::syscall(libc::SYS_recvfrom, fd, buf, len, flags, 0usize, 0usize) as isize
    })
}

/// # Safety
/// As recvfrom(2).
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: i32,
    buf: *mut c_void,
    len: usize,
    flags: i32,
    addr: *mut libc::sockaddr,
    addr_len: *mut libc::socklen_t,
) -> isize {
    retry(buf, len, true, || {
        libc::syscall(libc::SYS_recvfrom, fd, buf, len, flags, addr, addr_len) as isize
    })
}

/// # Safety
/// As send(2).
#[no_mangle]
pub unsafe extern "C" fn send(fd: i32, buf: *const c_void, len: usize, flags: i32) -> isize {
    retry(buf, len, false, || {
        libc::syscall(libc::SYS_sendto, fd, buf, len, flags, 0usize, 0usize) as isize
    })
}

/// # Safety
/// As sendto(2).
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: i32,
    buf: *const c_void,
    len: usize,
    flags: i32,
    addr: *const libc::sockaddr,
    addr_len: libc::socklen_t,
) -> isize {
    retry(buf, len, false, || {
        libc::syscall(libc::SYS_sendto, fd, buf, len, flags, addr, addr_len) as isize
    })
}

/// Takes every in-space buffer of an iovec array. True if any was taken.
///
/// # Safety
/// `iov` points to `count` iovecs.
unsafe fn take_iov(iov: *const libc::iovec, count: i32, write: bool) -> bool {
    if iov.is_null() || !(0..=1024).contains(&count) {
        return false;
    }
    let mut taken = false;
    for i in 0..count as usize {
        let entry = &*iov.add(i);
        taken |= take(entry.iov_base, entry.iov_len, write);
    }
    taken
}

/// # Safety
/// `iov` points to `count` iovecs.
unsafe fn retry_iov(
    iov: *const libc::iovec,
    count: i32,
    kernel_writes: bool,
    call: impl FnMut() -> isize,
) -> isize {
    // SAFETY: the caller's contract.
    retry_on_efault(|| unsafe { take_iov(iov, count, kernel_writes) }, call)
}

/// # Safety
/// As readv(2).
#[no_mangle]
pub unsafe extern "C" fn readv(fd: i32, iov: *const libc::iovec, count: i32) -> isize {
    retry_iov(iov, count, true, || {
        libc::syscall(libc::SYS_readv, fd, iov, count) as isize
    })
}

/// # Safety
/// As writev(2).
#[no_mangle]
pub unsafe extern "C" fn writev(fd: i32, iov: *const libc::iovec, count: i32) -> isize {
    retry_iov(iov, count, false, || {
        libc::syscall(libc::SYS_writev, fd, iov, count) as isize
    })
}

/// # Safety
/// As preadv(2).
#[no_mangle]
pub unsafe extern "C" fn preadv(
    fd: i32,
    iov: *const libc::iovec,
    count: i32,
    offset: i64,
) -> isize {
    // The kernel takes the offset as two halves (low, high).
    retry_iov(iov, count, true, || {
        libc::syscall(
            libc::SYS_preadv,
            fd,
            iov,
            count,
            offset,
            (offset as u64 >> 32) as i64,
        ) as isize
    })
}

/// # Safety
/// As pwritev(2).
#[no_mangle]
pub unsafe extern "C" fn pwritev(
    fd: i32,
    iov: *const libc::iovec,
    count: i32,
    offset: i64,
) -> isize {
    retry_iov(iov, count, false, || {
        libc::syscall(
            libc::SYS_pwritev,
            fd,
            iov,
            count,
            offset,
            (offset as u64 >> 32) as i64,
        ) as isize
    })
}

/// # Safety
/// As recvmsg(2).
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: i32, message: *mut libc::msghdr, flags: i32) -> isize {
    let (iov, count) = if message.is_null() {
        (core::ptr::null(), 0)
    } else {
        (
            (*message).msg_iov as *const libc::iovec,
            (*message).msg_iovlen as i32,
        )
    };
    retry_iov(iov, count, true, || {
        libc::syscall(libc::SYS_recvmsg, fd, message, flags) as isize
    })
}

/// # Safety
/// As sendmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: i32, message: *const libc::msghdr, flags: i32) -> isize {
    let (iov, count) = if message.is_null() {
        (core::ptr::null(), 0)
    } else {
        (
            (*message).msg_iov as *const libc::iovec,
            (*message).msg_iovlen as i32,
        )
    };
    retry_iov(iov, count, false, || {
        libc::syscall(libc::SYS_sendmsg, fd, message, flags) as isize
    })
}
