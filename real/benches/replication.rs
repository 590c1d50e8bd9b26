//! What k copies cost (docs/benchmarks.md, "Replication"), measured in one run on a
//! 3-node local cluster:
//!
//! 1. a read fault on a page whose latest copy is on another node, and a write
//!    ping-pong between two nodes on one page, in spaces with k = 1, 2 and 3,
//!    alternating, `RUNS` times each (k = 2 costs nothing more by design: the bytes that
//!    leave a writer are on two nodes already; k = 3 needs a backup per transfer);
//! 2. `gallocy_sync` after writing 1, 64 and 4096 pages this node homes (each flush
//!    then needs a backup on another node), with k = 2, against the same with k = 1
//!    (which answers at once: the floor of a daemon round trip).
//!
//! `cargo bench -p gallocy-real --bench replication`. Children are this executable in
//! another role (`GALLOCY_BENCH_ROLE`, `GALLOCY_BENCH_ARG` the space name).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{attach, pingpong, root_word, wait_word, write_block};
use gallocy::{gallocy_detach, gallocy_malloc, gallocy_sync};
use gallocy_real::cluster;

const FAULT_PAGES: u64 = 1_000;
const PINGPONG_ROUNDS: u64 = 2_000;
const RUNS: usize = 3;
const SYNC_SIZES: [u64; 3] = [1, 64, 4096];
const SYNC_REPEATS: usize = 5;

/// Root block words of a space: 0 the dirtied block is published, 1 its address, 2 the
/// reader is done; 3 the ping-pong counter is published, 4 its address.
fn spawn_role(role: &str, dir: &Path, node: u64, space: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("GALLOCY_BENCH_ROLE", role)
        .env("GALLOCY_BENCH_ARG", space)
        .env("GALLOCY_SOCKET", cluster::app_socket(dir, node))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn benchmark child")
}

/// Child on node 2: dirties FAULT_PAGES pages, publishes them, waits for the reader.
fn dirtier(space: &str) {
    attach(space);
    let first = write_block(FAULT_PAGES);
    // SAFETY: root block words.
    unsafe {
        root_word(1).write_volatile(first);
        root_word(0).write_volatile(1);
    }
    wait_word(root_word(2), 1);
    gallocy_detach();
}

/// Child on node 2: the odd side of the write ping-pong.
fn pingpong_odd(space: &str) {
    attach(space);
    wait_word(root_word(3), 1);
    // SAFETY: a root block word.
    let counter = unsafe { root_word(4).read_volatile() } as *mut u64;
    pingpong(counter, PINGPONG_ROUNDS, false);
    gallocy_detach();
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Median read fault (us) on pages last written on node 2, and the write ping-pong's
/// time per page transfer (us), in a fresh space with k = `replicas`.
fn transfers(dir: &Path, replicas: u8, run: usize) -> (f64, f64) {
    let space = format!("k{replicas}-{run}");
    std::env::set_var("GALLOCY_REPLICAS", replicas.to_string());
    attach(&space);
    let mut dirtier = spawn_role("dirtier", dir, 2, &space);
    wait_word(root_word(0), 1);
    // SAFETY: a root block word.
    let first = unsafe { root_word(1).read_volatile() };
    let mut faults = Vec::with_capacity(FAULT_PAGES as usize);
    for i in 0..FAULT_PAGES {
        let word = (first + i * 4096) as *const u64;
        let start = Instant::now();
        // SAFETY: a page of the block the other process published.
        let value = unsafe { word.read_volatile() };
        faults.push(start.elapsed());
        assert_eq!(value, i + 1, "read fault returned stale data");
    }
    // SAFETY: a root block word.
    unsafe { root_word(2).write_volatile(1) };
    let _ = dirtier.wait();

    let counter = gallocy_malloc(64) as *mut u64;
    // SAFETY: a block just allocated, and root block words.
    unsafe {
        counter.write_volatile(0);
        root_word(4).write_volatile(counter as u64);
        root_word(3).write_volatile(1);
    }
    let mut odd = spawn_role("pingpong", dir, 2, &space);
    let start = Instant::now();
    pingpong(counter, PINGPONG_ROUNDS, true);
    wait_word(counter, 2 * PINGPONG_ROUNDS);
    let elapsed = start.elapsed();
    let _ = odd.wait();
    gallocy_detach();
    let fault_us = median(faults).as_secs_f64() * 1e6;
    let transfer_us = elapsed.as_secs_f64() * 1e6 / (2 * PINGPONG_ROUNDS) as f64;
    (fault_us, transfer_us)
}

/// Median time (us) of `gallocy_sync` after writing `pages` pages this node homes, in
/// a fresh space with k = `replicas`.
fn sync_cost(replicas: u8, pages: u64) -> f64 {
    let space = format!("sync-k{replicas}-{pages}");
    std::env::set_var("GALLOCY_REPLICAS", replicas.to_string());
    attach(&space);
    let first = write_block(pages);
    assert_eq!(gallocy_sync(), 0, "sync");
    let mut samples = Vec::with_capacity(SYNC_REPEATS);
    for round in 0..SYNC_REPEATS as u64 {
        for i in 0..pages {
            // SAFETY: inside the block dirtied above.
            unsafe { ((first + i * 4096) as *mut u64).write_volatile(round + 2) };
        }
        let start = Instant::now();
        assert_eq!(gallocy_sync(), 0, "sync");
        samples.push(start.elapsed());
    }
    gallocy_detach();
    median(samples).as_secs_f64() * 1e6
}

fn run(dir: &Path) {
    std::env::set_var("GALLOCY_SOCKET", cluster::app_socket(dir, 1));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("gallocy replication benchmark ({cpus} cpus), 3-node local cluster on Unix sockets");
    let (mut k1, mut k2, mut k3) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        // Alternating, so drift of the machine's load hits all alike.
        k1.push(transfers(dir, 1, run));
        k2.push(transfers(dir, 2, run));
        k3.push(transfers(dir, 3, run));
    }
    for run in 0..RUNS {
        let (a, b, c) = (k1[run], k2[run], k3[run]);
        println!(
            "run {run}: remote read fault median k=1 {:.1} us, k=2 {:.1} us ({:.2}x), k=3 {:.1} us ({:.2}x); ping-pong per transfer k=1 {:.1} us, k=2 {:.1} us ({:.2}x), k=3 {:.1} us ({:.2}x)",
            a.0,
            b.0,
            b.0 / a.0,
            c.0,
            c.0 / a.0,
            a.1,
            b.1,
            b.1 / a.1,
            c.1,
            c.1 / a.1
        );
    }
    let mid = |v: &Vec<(f64, f64)>, f: fn(&(f64, f64)) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (f1, f2) = (mid(&k1, |r| r.0), mid(&k2, |r| r.0));
    let (p1, p2) = (mid(&k1, |r| r.1), mid(&k2, |r| r.1));
    let (f3, p3) = (mid(&k3, |r| r.0), mid(&k3, |r| r.1));
    println!(
        "median of runs: remote read fault k=2/k=1 {:.2}x, k=3/k=1 {:.2}x ({f1:.1}, {f2:.1}, {f3:.1} us); ping-pong transfer k=2/k=1 {:.2}x, k=3/k=1 {:.2}x ({p1:.1}, {p2:.1}, {p3:.1} us)",
        f2 / f1,
        f3 / f1,
        p2 / p1,
        p3 / p1
    );
    for pages in SYNC_SIZES {
        let floor = sync_cost(1, pages);
        let cost = sync_cost(2, pages);
        println!(
            "gallocy_sync after writing {pages:>4} pages: k=2 {cost:>10.1} us ({:.1} us per page), k=1 {floor:.1} us (answered at once)",
            cost / pages as f64
        );
    }
}

fn main() {
    let space = std::env::var("GALLOCY_BENCH_ARG").unwrap_or_default();
    match std::env::var("GALLOCY_BENCH_ROLE").as_deref() {
        Ok("dirtier") => return dirtier(&space),
        Ok("pingpong") => return pingpong_odd(&space),
        _ => {}
    }
    let dir = PathBuf::from(format!("/tmp/gy-repl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gallocyd = PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    cluster::up(3, &dir, Default::default(), "warn", &gallocyd).expect("cluster up");
    let result = std::panic::catch_unwind(|| run(&dir));
    gallocy_detach();
    let _ = cluster::down(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if result.is_err() {
        std::process::exit(1);
    }
}
