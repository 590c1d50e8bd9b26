//! Raw system calls for the runtime path, through rustix's linux_raw backend: no libc
//! wrapper that could allocate, no `std` I/O. File descriptors are plain `i32`s kept
//! in atomics, so every call borrows them.

use core::mem::MaybeUninit;

use rustix::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

/// Borrows a raw descriptor for one call.
fn fd(raw: i32) -> BorrowedFd<'static> {
    // SAFETY: callers pass descriptors they own and keep open for the call's duration.
    unsafe { BorrowedFd::borrow_raw(raw) }
}

/// Connects a stream socket to the Unix socket at `path` (NUL-terminated bytes).
pub fn connect_unix(path: &core::ffi::CStr) -> Result<i32, Errno> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::connect(&socket, &addr)?;
    Ok(socket.into_raw_fd())
}

pub fn close(raw: i32) {
    if raw >= 0 {
        // SAFETY: the descriptor is ours and nothing uses it after this call.
        unsafe { rustix::io::close(raw) };
    }
}

pub fn shutdown(raw: i32) {
    let _ = rustix::net::shutdown(fd(raw), rustix::net::Shutdown::Both);
}

/// Times a call whose buffer was not accessible is tried again after touching it.
const MAX_FAULT_RETRIES: u32 = 64;

/// Makes the pages of `[ptr, ptr + len)` accessible for reading and writing by
/// touching them: a buffer on a stack in the space may have lost its access (another
/// node read the page), and the kernel fails a system call on such a buffer with
/// EFAULT instead of faulting. Each touch rewrites the byte it read.
fn touch(ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let start = ptr as usize & !4095;
    let end = ptr as usize + len;
    let mut page = start;
    while page < end {
        let at = (page.max(ptr as usize)) as *mut u8;
        // SAFETY: `at` lies inside the caller's buffer, which it owns exclusively for
        // the call; reading and writing back the same byte changes nothing.
        unsafe { at.write_volatile(at.read_volatile()) };
        page += 4096;
    }
}

pub fn write_all(raw: i32, mut bytes: &[u8]) -> Result<(), Errno> {
    let mut faults = 0;
    while !bytes.is_empty() {
        match rustix::net::send(fd(raw), bytes, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(Errno::PIPE),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::INTR) => continue,
            Err(Errno::FAULT) if faults < MAX_FAULT_RETRIES => {
                faults += 1;
                touch(bytes.as_ptr(), bytes.len());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at end of stream.
pub fn read_exact(raw: i32, buf: &mut [u8]) -> Result<bool, Errno> {
    let mut filled = 0;
    let mut faults = 0;
    while filled < buf.len() {
        match rustix::io::read(fd(raw), &mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(Errno::INTR) => continue,
            Err(Errno::FAULT) if faults < MAX_FAULT_RETRIES => {
                faults += 1;
                touch(buf[filled..].as_ptr(), buf.len() - filled);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Receives exactly `buf.len()` bytes and at most one descriptor passed with them.
pub fn recv_with_fd(raw: i32, buf: &mut [u8]) -> Result<(bool, Option<i32>), Errno> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [rustix::io::IoSliceMut::new(buf)];
    let mut faults = 0;
    let received = loop {
        match rustix::net::recvmsg(fd(raw), &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(Errno::INTR) => continue,
            Err(Errno::FAULT) if faults < MAX_FAULT_RETRIES => {
                faults += 1;
                touch(iov[0].as_ptr(), iov[0].len());
            }
            other => break other?,
        }
    };
    let mut passed = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for owned in fds {
                if passed.is_none() {
                    passed = Some(owned.into_raw_fd());
                }
                // Extra descriptors are dropped (closed) here.
            }
        }
    }
    if received.bytes == 0 {
        return Ok((false, passed));
    }
    let got = received.bytes;
    if got < iov[0].len() {
        let rest = &mut buf[got..];
        if !read_exact(raw, rest)? {
            return Ok((false, passed));
        }
    }
    Ok((true, passed))
}

pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

pub fn getpid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// Whether thread `tid` of this process still exists.
pub fn thread_alive(tid: i32) -> bool {
    // SAFETY: tgkill with signal 0 only checks existence.
    unsafe { libc::syscall(libc::SYS_tgkill, getpid(), tid, 0) == 0 }
}

/// Maps `len` bytes of `memfd` at exactly `addr`, inaccessible, refusing to replace
/// any existing mapping.
pub fn map_space(addr: u64, len: u64, memfd: i32) -> Result<(), Errno> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory the
    // process uses can be affected; the result is checked against `addr` below.
    let got = unsafe {
        rustix::mm::mmap(
            addr as *mut core::ffi::c_void,
            len as usize,
            rustix::mm::ProtFlags::empty(),
            rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::FIXED_NOREPLACE,
            fd(memfd),
            0,
        )?
    };
    if got as u64 != addr {
        // A kernel that ignores FIXED_NOREPLACE treats the address as a hint.
        unmap(got as u64, len);
        return Err(Errno::EXIST);
    }
    Ok(())
}

/// Maps `len` bytes of the space's memfd from `offset` at `addr`, replacing what is
/// there (an alias of space pages), with no access.
pub fn map_alias(addr: u64, len: u64, memfd: i32, offset: u64) -> Result<(), Errno> {
    // SAFETY: MAP_FIXED replaces the range; callers alias only memory whose contents
    // they copied into the space first (the executable's globals), and no Rust
    // reference points into it.
    let got = unsafe {
        rustix::mm::mmap(
            addr as *mut core::ffi::c_void,
            len as usize,
            rustix::mm::ProtFlags::empty(),
            rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::FIXED,
            fd(memfd),
            offset,
        )?
    };
    if got as u64 != addr {
        return Err(Errno::INVAL);
    }
    Ok(())
}

pub fn unmap(addr: u64, len: u64) {
    // SAFETY: only the space's own range, which no Rust reference points into.
    let _ = unsafe { rustix::mm::munmap(addr as *mut core::ffi::c_void, len as usize) };
}

/// Sets the protection of `[addr, addr+len)`: 0 none, 1 read, 2 read+write.
pub fn protect(addr: u64, len: u64, access: u8) -> Result<(), Errno> {
    use rustix::mm::MprotectFlags;
    let flags = match access {
        0 => MprotectFlags::empty(),
        1 => MprotectFlags::READ,
        _ => MprotectFlags::READ | MprotectFlags::WRITE,
    };
    // SAFETY: the range is inside the space mapping; changing its protection cannot
    // invalidate Rust references (the runtime holds none into the space).
    unsafe { rustix::mm::mprotect(addr as *mut core::ffi::c_void, len as usize, flags) }
}

pub fn open_read(path: &core::ffi::CStr) -> Result<i32, Errno> {
    let owned = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    Ok(owned.into_raw_fd())
}

pub fn read_some(raw: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match rustix::io::read(fd(raw), &mut *buf) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Writes to standard error, ignoring failures (there is nowhere else to report).
pub fn write_stderr(bytes: &[u8]) {
    let stderr = rustix::stdio::stderr();
    let mut rest = bytes;
    while !rest.is_empty() {
        match rustix::io::write(stderr, rest) {
            Ok(0) | Err(_) => return,
            Ok(n) => rest = &rest[n..],
        }
    }
    let _ = stderr.as_raw_fd();
}

/// Ends the process at once, without running atexit handlers (they may allocate or
/// touch the space).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// `bytes` of private zeroed memory aligned to `align` (a power of two), or None.
/// Used for chunks when no daemon serves this process (fallback mode).
pub fn map_private_chunks(bytes: u64, align: u64) -> Option<u64> {
    let span = bytes.checked_add(align)?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let raw = unsafe {
        rustix::mm::mmap_anonymous(
            core::ptr::null_mut(),
            span as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
        )
    }
    .ok()? as u64;
    let start = (raw + align - 1) & !(align - 1);
    // Trim the unaligned head and the tail.
    if start > raw {
        unmap(raw, start - raw);
    }
    let end = start + bytes;
    if raw + span > end {
        unmap(end, raw + span - end);
    }
    Some(start)
}

/// Replaces `[addr, addr+len)` with private zeroed memory, read-write or inaccessible.
pub fn map_private_fixed(addr: u64, len: u64, accessible: bool) {
    let prot = if accessible {
        rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
    } else {
        rustix::mm::ProtFlags::empty()
    };
    // SAFETY: only used on the space's own range in a forked child, which no Rust
    // reference points into.
    let _ = unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut core::ffi::c_void,
            len as usize,
            prot,
            rustix::mm::MapFlags::PRIVATE
                | rustix::mm::MapFlags::FIXED
                | rustix::mm::MapFlags::NORESERVE,
        )
    };
}

/// `write_all` for a pipe or file (not a socket).
pub fn write_all_fd(raw: i32, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        match rustix::io::write(fd(raw), bytes) {
            Ok(0) => return Err(Errno::PIPE),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn monotonic_nanos() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Polls for a whole frame without blocking for up to `spin_nanos`. `None` if nothing
/// arrived (the caller then blocks); partial frames are completed by blocking reads.
pub fn recv_spinning(raw: i32, buf: &mut [u8], spin_nanos: u64) -> Option<Result<bool, Errno>> {
    let deadline = monotonic_nanos() + spin_nanos;
    let mut faults = 0;
    loop {
        match rustix::net::recv(fd(raw), &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => return Some(Ok(false)),
            Ok((n, _)) if n == buf.len() => return Some(Ok(true)),
            Ok((n, _)) => return Some(read_exact(raw, &mut buf[n..])),
            Err(Errno::AGAIN) | Err(Errno::INTR) => {}
            Err(Errno::FAULT) if faults < MAX_FAULT_RETRIES => {
                faults += 1;
                touch(buf.as_ptr(), buf.len());
                continue;
            }
            Err(e) => return Some(Err(e)),
        }
        if monotonic_nanos() > deadline {
            return None;
        }
        // Let the daemon (or whoever the answer depends on) have this CPU if it needs it.
        rustix::thread::sched_yield();
    }
}
