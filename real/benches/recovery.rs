//! How long a crashed node's pages take to come back (docs/benchmarks.md, "Recovery"),
//! measured in one run on a 3-node local cluster:
//!
//! - node 2 writes `PAGES` pages (it leased them, so it is their home), node 3 reads
//!   them all (so it holds a copy of each), node 2's daemon is SIGKILLed;
//! - node 1 then reads page 0: the time from the kill until that read is served is
//!   the recovery time (detection by the leader, the mark-down entry, the void delay,
//!   the collect of the page), then every other page: the time per recovered fault;
//! - then the time from the kill until every page is on k = 2 nodes again (node 3's
//!   repair hints reached the new home, which rebuilt the pages and backed them up);
//! - the baseline, measured before the kill in the same run: a read fault on a page
//!   whose latest copy is on another node (node 3 wrote `BASELINE_PAGES` pages).
//!
//! `cargo bench -p gallocy-real --bench recovery`. Children are this executable in
//! another role (`GALLOCY_BENCH_ROLE`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{attach, root_word, write_block};
use gallocy::gallocy_detach;
use gallocy_real::cluster;
use gallocy_real::config::SpaceDefaults;

const PAGES: u64 = 10_000;
const BASELINE_PAGES: u64 = 2_000;
const SPACE: &str = "recovery";
/// Root block words: 0 the recovered block, 1 set once node 3 read it, 2 the baseline
/// block.
const ROOT_BLOCK: usize = 0;
const ROOT_READ: usize = 1;
const ROOT_BASELINE: usize = 2;

/// Waits for a root block word to become non-zero (bounded), sleeping between looks:
/// two cores, three daemons.
fn wait_nonzero(index: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // SAFETY: a root block word shared by the processes of the space.
        let value = unsafe { root_word(index).read_volatile() };
        if value != 0 {
            return value;
        }
        assert!(Instant::now() < deadline, "benchmark peer stuck");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_page(first: u64, i: u64) {
    // SAFETY: a page of a block published through the root block.
    let value = unsafe { ((first + i * 4096) as *const u64).read_volatile() };
    assert_eq!(value, i + 1, "page {i} lost its contents");
}

/// Node 2: home and writer of the block that will be recovered; killed with its daemon.
fn writer() {
    attach(SPACE);
    let first = write_block(PAGES);
    // SAFETY: root block word.
    unsafe { root_word(ROOT_BLOCK).write_volatile(first) };
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Node 3: reads the block (so it holds every page), writes the baseline block.
fn reader() {
    attach(SPACE);
    let first = wait_nonzero(ROOT_BLOCK);
    for i in 0..PAGES {
        read_page(first, i);
    }
    let baseline = write_block(BASELINE_PAGES);
    // SAFETY: root block words.
    unsafe {
        root_word(ROOT_BASELINE).write_volatile(baseline);
        root_word(ROOT_READ).write_volatile(1);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn spawn_role(role: &str, dir: &Path, node: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("GALLOCY_BENCH_ROLE", role)
        .env("GALLOCY_SOCKET", cluster::app_socket(dir, node))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn benchmark child")
}

fn daemon_pid(dir: &Path, node: u64) -> i32 {
    std::fs::read_to_string(cluster::node_dir(dir, node).join("gallocyd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn run(dir: &Path, children: &mut Vec<Child>) {
    std::env::set_var("GALLOCY_SOCKET", cluster::app_socket(dir, 1));
    // Node 2 creates the space (so it homes the root block too): attach once it did.
    let mut writer = spawn_role("writer", dir, 2);
    let mut line = String::new();
    BufReader::new(writer.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("writer output");
    assert_eq!(line.trim(), "ready", "writer failed");
    children.push(writer);
    attach(SPACE);
    children.push(spawn_role("reader", dir, 3));
    wait_nonzero(ROOT_READ);
    let first = wait_nonzero(ROOT_BLOCK);
    let baseline = wait_nonzero(ROOT_BASELINE);

    let started = Instant::now();
    for i in 0..BASELINE_PAGES {
        read_page(baseline, i);
    }
    let baseline_us = started.elapsed().as_secs_f64() * 1e6 / BASELINE_PAGES as f64;

    let killed = Instant::now();
    // SAFETY: signalling the daemon this benchmark started.
    unsafe { libc::kill(daemon_pid(dir, 2), libc::SIGKILL) };
    read_page(first, 0);
    let first_served = killed.elapsed();
    let started = Instant::now();
    for i in 1..PAGES {
        read_page(first, i);
    }
    let rest = started.elapsed();
    let recovered_us = rest.as_secs_f64() * 1e6 / (PAGES - 1) as f64;
    // Node 3 hinted its copies to the new home, which rebuilds the pages and makes
    // their copies again (k = 2): until then a second loss could take them.
    let repaired_after = repairs_done(dir);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("gallocy recovery benchmark ({cpus} cpus), 3-node local cluster on Unix sockets");
    println!(
        "kill of the home of {PAGES} pages -> first recovered page served: {:.3} s",
        first_served.as_secs_f64()
    );
    println!(
        "all {PAGES} pages read again: {:.3} s after the first ({recovered_us:.1} us per recovered read fault)",
        rest.as_secs_f64()
    );
    println!(
        "kill -> every page on k = 2 nodes again (no repair pending on nodes 1 and 3): {:.3} s",
        (repaired_after - killed).as_secs_f64()
    );
    println!(
        "read fault, latest copy on another node (baseline, before the kill): {baseline_us:.1} us"
    );
    println!(
        "  recovered fault / baseline fault: {:.2}x",
        recovered_us / baseline_us
    );
}

/// When nodes 1 and 3 have no repair pending and have finished at least `PAGES`
/// between them (polled every 10 ms, bounded).
fn repairs_done(dir: &Path) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let statuses: Vec<serde_json::Value> = [1, 3]
            .iter()
            .map(|&n| gallocy_real::admin::status(&cluster::app_socket(dir, n)).expect("status"))
            .collect();
        let pending: u64 = statuses
            .iter()
            .map(|s| s["pages"]["repairs_pending"].as_u64().unwrap_or(0))
            .sum();
        let repaired: u64 = statuses
            .iter()
            .map(|s| s["counters"]["pages_repaired"].as_u64().unwrap_or(0))
            .sum();
        if pending == 0 && repaired >= PAGES {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "repairs not done: {statuses:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    match std::env::var("GALLOCY_BENCH_ROLE").as_deref() {
        Ok("writer") => return writer(),
        Ok("reader") => return reader(),
        _ => {}
    }
    let dir = PathBuf::from(format!("/tmp/gy-recovery-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gallocyd = PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    let space = SpaceDefaults {
        size_bytes: 256 << 20,
        ..SpaceDefaults::default()
    };
    cluster::up(3, &dir, space, "warn", &gallocyd).expect("cluster up");
    let mut children = Vec::new();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&dir, &mut children)));
    gallocy_detach();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = cluster::down(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if result.is_err() {
        std::process::exit(1);
    }
}
