//! Shared by the benchmarks that run several processes on a local cluster (children are
//! the benchmark's own executable in another role).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use gallocy::{gallocy_attach, gallocy_malloc, gallocy_root};

/// Attaches this process to the space named `space` (creating it), or panics.
pub fn attach(space: &str) {
    let name = std::ffi::CString::new(space).unwrap();
    assert_eq!(gallocy_attach(name.as_ptr()), 0, "attach to {space} failed");
}

/// A word of the space's root block (indexes below 8 here).
pub fn root_word(index: usize) -> *mut u64 {
    assert!(index < 8);
    // SAFETY: the root block is at least a page.
    unsafe { gallocy_root().cast::<u64>().add(index) }
}

/// Spins, yielding (two cores, several daemons), until a space word holds `value`;
/// panics after a minute.
pub fn wait_word(word: *const u64, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // SAFETY: a word of the space, shared by the processes of the benchmark.
    while unsafe { word.read_volatile() } != value {
        assert!(Instant::now() < deadline, "benchmark peer stuck");
        std::thread::yield_now();
    }
}

/// One side of the write ping-pong on a shared counter word, `rounds` times: the side
/// that goes `first` waits for 2i and writes 2i + 1, the other waits for 2i + 1 and
/// writes 2i + 2 (each write faults the counter's page over from the other node).
pub fn pingpong(counter: *mut u64, rounds: u64, first: bool) {
    let turn = u64::from(!first);
    for i in 0..rounds {
        wait_word(counter, 2 * i + turn);
        // SAFETY: the shared counter block.
        unsafe { counter.write_volatile(2 * i + turn + 1) };
    }
}

/// The first page of a page-aligned run of `pages` pages of a fresh block, each page's
/// first word set to its index + 1.
pub fn write_block(pages: u64) -> u64 {
    let block = gallocy_malloc((pages as usize + 1) * 4096) as u64;
    assert_ne!(block, 0, "allocation");
    let first = (block + 4095) & !4095;
    for i in 0..pages {
        // SAFETY: inside the block just allocated.
        unsafe { ((first + i * 4096) as *mut u64).write_volatile(i + 1) };
    }
    first
}
