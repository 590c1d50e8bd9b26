//! Application ⇄ daemon latency against the machine's floor, measured in one run:
//!
//! 1. the floor: a blocking 64-byte Unix-socket ping-pong between two processes;
//! 2. `gallocy_ping`: one application → daemon transaction (same frame size);
//! 3. a read fault on a fresh page homed on this node, and on a page whose latest copy
//!    is on another node;
//! 4. write ping-pong: two processes on two nodes alternately writing one page;
//! 5. a glibc mutex + condition variable hand-off (process-shared, in space memory)
//!    between two processes on two nodes, against 4; and the CPU a thread sleeping in
//!    a futex on space memory uses.
//!
//! `cargo bench -p gallocy-real --bench ipc` (a 2-node local cluster is started and
//! stopped by the benchmark). Child processes are this executable in another role.
//! `cargo bench -p gallocy-real --bench ipc -- --peers` measures 3 and 4 over TCP, in
//! clear and with TLS, alternating, to show what encryption costs.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{attach, pingpong, wait_word};
use gallocy::{gallocy_detach, gallocy_malloc, gallocy_ping, gallocy_root};

const ROUNDS: usize = 20_000;
const FAULT_PAGES: usize = 2_000;
const PINGPONG_ROUNDS: u64 = 5_000;
const HANDOFF_ROUNDS: u64 = 2_000;
/// How long the sleeping waiter sleeps.
const SLEEP_MS: u32 = 2_000;
/// Runs of each peer transport in `--peers`.
const PEER_RUNS: usize = 3;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn summarize(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let median = percentile(&samples, 0.5);
    let p99 = percentile(&samples, 0.99);
    println!(
        "{name:<44} median {:>8.2} us   p99 {:>8.2} us   ({} samples)",
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        samples.len()
    );
    (median, p99)
}

fn spawn_role(role: &str, socket: Option<&Path>, arg: &str) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env("GALLOCY_BENCH_ROLE", role)
        .env("GALLOCY_BENCH_ARG", arg)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if let Some(socket) = socket {
        command.env("GALLOCY_SOCKET", socket);
    }
    command.spawn().expect("spawn benchmark child")
}

fn root() -> *mut u64 {
    gallocy_root().cast()
}

/// Waits without burning a core (two cores, two daemons): for peers idle during a
/// measurement.
fn sleep_until_word(word: *const u64, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // SAFETY: a word of the root block, shared by the processes of the space.
    while unsafe { word.read_volatile() } != value {
        assert!(Instant::now() < deadline, "benchmark peer stuck");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Child: echo 64-byte frames on a Unix socket (the floor's other process).
fn echo(path: &str) {
    let listener = UnixListener::bind(path).unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    let mut frame = [0u8; 64];
    while stream.read_exact(&mut frame).is_ok() {
        if stream.write_all(&frame).is_err() {
            break;
        }
    }
}

/// Child: dirty FAULT_PAGES pages on its node, publish them, wait for the reader.
fn dirtier() {
    attach("bench");
    let pages = gallocy_malloc(FAULT_PAGES * 4096 + 4096) as u64;
    let first = (pages + 4095) & !4095;
    for i in 0..FAULT_PAGES as u64 {
        // SAFETY: inside the block just allocated.
        unsafe { ((first + i * 4096) as *mut u64).write_volatile(i + 1) };
    }
    let root = root();
    // SAFETY: root block words.
    unsafe {
        root.add(1).write_volatile(first);
        root.add(0).write_volatile(1);
    }
    sleep_until_word(unsafe { root.add(2) }, 1);
    gallocy_detach();
}

/// Child: the odd side of the write ping-pong.
fn pingpong_odd() {
    attach("bench");
    let root = root();
    // SAFETY: words of the root block, shared by the processes of the space.
    wait_word(unsafe { root.add(3) }, 1);
    // SAFETY: as above.
    let counter = unsafe { root.add(4).read_volatile() } as *mut u64;
    pingpong(counter, PINGPONG_ROUNDS, false);
    gallocy_detach();
}

/// Read faults, from this process on node 1, on FAULT_PAGES pages a process on node 2
/// has just written (so their latest copy is there).
fn remote_read_faults(dir: &Path) -> Vec<Duration> {
    let node2 = gallocy_real::cluster::app_socket(dir, 2);
    let mut dirtier = spawn_role("dirtier", Some(&node2), "");
    let root = root();
    // SAFETY: words of the root block, shared by the processes of the space.
    wait_word(unsafe { root.add(0) }, 1);
    // SAFETY: as above.
    let first = unsafe { root.add(1).read_volatile() };
    let mut faults = Vec::with_capacity(FAULT_PAGES);
    for i in 0..FAULT_PAGES as u64 {
        let word = (first + i * 4096) as *const u64;
        let start = Instant::now();
        // SAFETY: a page of the block the other process published.
        let value = unsafe { word.read_volatile() };
        faults.push(start.elapsed());
        assert_eq!(value, i + 1, "read fault returned stale data");
    }
    // SAFETY: a root block word.
    unsafe { root.add(2).write_volatile(1) };
    let _ = dirtier.wait();
    faults
}

/// PINGPONG_ROUNDS rounds of alternate writes to one page by this process (node 1) and
/// a process on node 2; the time they took.
fn write_pingpong(dir: &Path) -> Duration {
    let node2 = gallocy_real::cluster::app_socket(dir, 2);
    let root = root();
    let counter = gallocy_malloc(64) as *mut u64;
    // SAFETY: a block just allocated in the space, and root block words.
    unsafe {
        counter.write_volatile(0);
        root.add(4).write_volatile(counter as u64);
        root.add(3).write_volatile(1);
    }
    let mut odd = spawn_role("pingpong", Some(&node2), "");
    let start = Instant::now();
    pingpong(counter, PINGPONG_ROUNDS, true);
    wait_word(counter, 2 * PINGPONG_ROUNDS);
    let elapsed = start.elapsed();
    let _ = odd.wait();
    elapsed
}

/// The state of the condition-variable hand-off, in space memory.
#[repr(C)]
struct Handoff {
    mutex: libc::pthread_mutex_t,
    turn_changed: libc::pthread_cond_t,
    turn: u64,
}

/// Takes `HANDOFF_ROUNDS` turns as `me` (0 or 1): lock, wait for its turn, pass it on,
/// signal, unlock.
fn take_turns(state: *mut Handoff, me: u64) {
    // SAFETY: `state` is the initialised, process-shared state in the space.
    unsafe {
        let s = &mut *state;
        for _ in 0..HANDOFF_ROUNDS {
            libc::pthread_mutex_lock(&mut s.mutex);
            while (&raw const s.turn).read_volatile() != me {
                libc::pthread_cond_wait(&mut s.turn_changed, &mut s.mutex);
            }
            (&raw mut s.turn).write_volatile(1 - me);
            libc::pthread_cond_signal(&mut s.turn_changed);
            libc::pthread_mutex_unlock(&mut s.mutex);
        }
    }
}

/// Child: the odd side of the hand-off.
fn handoff_odd() {
    attach("bench");
    let root = root();
    // SAFETY: words of the root block, shared by the processes of the space.
    wait_word(unsafe { root.add(5) }, 1);
    // SAFETY: as above.
    let state = unsafe { root.add(6).read_volatile() } as *mut Handoff;
    take_turns(state, 1);
    gallocy_detach();
}

/// `HANDOFF_ROUNDS` turns each between this process (node 1) and one on node 2; the
/// time they took.
fn condvar_handoff(dir: &Path) -> Duration {
    let node2 = gallocy_real::cluster::app_socket(dir, 2);
    let root = root();
    let state = gallocy_malloc(std::mem::size_of::<Handoff>()) as *mut Handoff;
    assert!(!state.is_null());
    // SAFETY: a block just allocated in the space, initialised as process-shared
    // objects before the other process can see it; root block words.
    unsafe {
        let mut ma: libc::pthread_mutexattr_t = std::mem::zeroed();
        libc::pthread_mutexattr_init(&mut ma);
        libc::pthread_mutexattr_setpshared(&mut ma, libc::PTHREAD_PROCESS_SHARED);
        libc::pthread_mutex_init(&raw mut (*state).mutex, &ma);
        let mut ca: libc::pthread_condattr_t = std::mem::zeroed();
        libc::pthread_condattr_init(&mut ca);
        libc::pthread_condattr_setpshared(&mut ca, libc::PTHREAD_PROCESS_SHARED);
        libc::pthread_cond_init(&raw mut (*state).turn_changed, &ca);
        (&raw mut (*state).turn).write_volatile(0);
        root.add(6).write_volatile(state as u64);
        root.add(5).write_volatile(1);
    }
    let mut odd = spawn_role("handoff", Some(&node2), "");
    let start = Instant::now();
    take_turns(state, 0);
    let elapsed = start.elapsed();
    let _ = odd.wait();
    elapsed
}

/// CPU time of this thread while it sleeps `SLEEP_MS` in a futex on space memory (a
/// glibc-style wait that times out: nobody wakes it).
fn sleeping_waiter_cpu() -> (Duration, Duration) {
    let word = gallocy_malloc(64) as *mut u32;
    assert!(!word.is_null());
    // SAFETY: a block just allocated in the space.
    unsafe { word.write_volatile(0) };
    let cpu = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec passed.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let (cpu_start, wall_start) = (cpu(), Instant::now());
    let rc = gallocy::gallocy_futex_wait(word, 0, SLEEP_MS);
    let (cpu_used, wall) = (cpu() - cpu_start, wall_start.elapsed());
    assert_eq!(rc, -libc::ETIMEDOUT, "nobody wakes the sleeper");
    (cpu_used, wall)
}

/// What TLS costs on the peer links: the remote read fault and the write ping-pong on
/// a 2-node cluster over TCP on 127.0.0.1, in clear and with TLS, alternating
/// (PEER_RUNS runs of each, a fresh cluster for each run).
fn compare_peer_transports() {
    use gallocy_real::cluster::Transport;
    let gallocyd = PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "gallocy peer-link benchmark ({cpus} cpus): 2 nodes over TCP on 127.0.0.1, clear vs TLS"
    );
    let mut results: Vec<(Transport, Duration, Duration, Duration)> = Vec::new();
    for run in 0..PEER_RUNS {
        for transport in [Transport::PlainTcp, Transport::Tls] {
            let dir = PathBuf::from(format!("/tmp/gy-bench-{}-{run}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            // A port probed free may be taken before the daemon binds it: try again.
            let up = (0..3).find_map(|_| {
                gallocy_real::cluster::up_over(
                    2,
                    &dir,
                    Default::default(),
                    "warn",
                    &gallocyd,
                    transport,
                )
                .ok()
            });
            up.expect("cluster up over TCP");
            std::env::set_var("GALLOCY_SOCKET", gallocy_real::cluster::app_socket(&dir, 1));
            attach("bench");
            let result = std::panic::catch_unwind(|| {
                let mut faults = remote_read_faults(&dir);
                faults.sort_unstable();
                let pingpong = write_pingpong(&dir);
                (
                    percentile(&faults, 0.5),
                    percentile(&faults, 0.99),
                    pingpong / (2 * PINGPONG_ROUNDS as u32),
                )
            });
            gallocy_detach();
            let _ = gallocy_real::cluster::down(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            let (median, p99, transfer) = result.unwrap_or_else(|_| std::process::exit(1));
            println!(
                "run {run} {:<10} remote read fault median {:>7.2} us  p99 {:>7.2} us   ping-pong {:>6.2} us per transfer",
                format!("{transport:?}"),
                median.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                transfer.as_secs_f64() * 1e6
            );
            results.push((transport, median, p99, transfer));
        }
    }
    let mean = |transport: Transport,
                pick: fn(&(Transport, Duration, Duration, Duration)) -> Duration| {
        let picked: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == transport)
            .map(|r| pick(r).as_secs_f64())
            .collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    for (what, pick) in [
        (
            "remote read fault, median",
            (|r: &(Transport, Duration, Duration, Duration)| r.1) as fn(&_) -> Duration,
        ),
        ("remote read fault, p99", |r| r.2),
        ("write ping-pong, per transfer", |r| r.3),
    ] {
        let (plain, tls) = (mean(Transport::PlainTcp, pick), mean(Transport::Tls, pick));
        println!(
            "{what:<32} clear {:>7.2} us   TLS {:>7.2} us   TLS/clear {:.2}x (mean of {PEER_RUNS} runs)",
            plain * 1e6,
            tls * 1e6,
            tls / plain
        );
    }
}

fn main() {
    match std::env::var("GALLOCY_BENCH_ROLE").as_deref() {
        Ok("echo") => return echo(&std::env::var("GALLOCY_BENCH_ARG").unwrap()),
        Ok("dirtier") => return dirtier(),
        Ok("pingpong") => return pingpong_odd(),
        Ok("handoff") => return handoff_odd(),
        _ => {}
    }
    if std::env::args().any(|a| a == "--peers") {
        return compare_peer_transports();
    }
    let dir = PathBuf::from(format!("/tmp/gy-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gallocyd = PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
    gallocy_real::cluster::up(2, &dir, Default::default(), "warn", &gallocyd).expect("cluster up");
    let result = std::panic::catch_unwind(|| run(&dir));
    gallocy_detach();
    let _ = gallocy_real::cluster::down(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run(dir: &Path) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("gallocy IPC benchmark ({cpus} cpus), 2-node local cluster on Unix sockets");

    // 1. The floor.
    let echo_path = dir.join("echo.sock");
    let mut echo_child = spawn_role("echo", None, echo_path.to_str().unwrap());
    let mut stream = loop {
        match UnixStream::connect(&echo_path) {
            Ok(stream) => break stream,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut frame = [7u8; 64];
    let mut floor = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        stream.write_all(&frame).unwrap();
        stream.read_exact(&mut frame).unwrap();
        floor.push(start.elapsed());
    }
    drop(stream);
    let _ = echo_child.wait();
    let (floor_median, floor_p99) = summarize("floor: Unix socket 64 B ping-pong", floor);

    // 2. gallocy_ping.
    std::env::set_var("GALLOCY_SOCKET", gallocy_real::cluster::app_socket(dir, 1));
    attach("bench");
    let mut pings = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        assert_eq!(gallocy_ping(), 0);
        pings.push(start.elapsed());
    }
    let (ping_median, ping_p99) = summarize("gallocy_ping (app -> daemon -> app)", pings);
    println!(
        "  ratio to the floor: median {:.2}x, p99 {:.2}x (target <= 1.3x)",
        ping_median.as_secs_f64() / floor_median.as_secs_f64(),
        ping_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );

    // 3a. Read faults on fresh pages homed on this node (no other node involved).
    let block = gallocy_malloc(FAULT_PAGES * 4096 + 8192) as u64;
    assert_ne!(block, 0, "allocation for local faults");
    // Skip the page holding the block's header: the allocation already touched it.
    let first_local = (block + 4096 + 4095) & !4095;
    let mut local_faults = Vec::with_capacity(FAULT_PAGES);
    for i in 0..FAULT_PAGES as u64 {
        let word = (first_local + i * 4096) as *const u64;
        let start = Instant::now();
        // SAFETY: a page of the block just allocated.
        let value = unsafe { word.read_volatile() };
        local_faults.push(start.elapsed());
        assert_eq!(value, 0, "a fresh page reads as zero");
    }
    let (local_median, local_p99) =
        summarize("read fault, fresh page homed on this node", local_faults);
    println!(
        "  ratio to the floor: median {:.2}x, p99 {:.2}x",
        local_median.as_secs_f64() / floor_median.as_secs_f64(),
        local_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );

    // 3b. Read faults on pages last written on node 2.
    let faults = remote_read_faults(dir);
    let (fault_median, fault_p99) = summarize("read fault, latest copy on another node", faults);
    println!(
        "  ratio to the floor: median {:.2}x, p99 {:.2}x (target <= 4x)",
        fault_median.as_secs_f64() / floor_median.as_secs_f64(),
        fault_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );

    // 4. Write ping-pong between node 1 (this process) and node 2.
    let elapsed = write_pingpong(dir);
    let transfer_us = elapsed.as_secs_f64() * 1e6 / (2.0 * PINGPONG_ROUNDS as f64);
    println!(
        "{:<44} {} rounds in {:.3} s: {:.0} page transfers/s ({:.1} us per transfer)",
        "write ping-pong, two nodes, one page",
        PINGPONG_ROUNDS,
        elapsed.as_secs_f64(),
        2.0 * PINGPONG_ROUNDS as f64 / elapsed.as_secs_f64(),
        transfer_us
    );

    // 5. glibc mutex + condvar hand-off between the two nodes, and a sleeping waiter.
    let elapsed = condvar_handoff(dir);
    let handoff_us = elapsed.as_secs_f64() * 1e6 / (2.0 * HANDOFF_ROUNDS as f64);
    println!(
        "{:<44} {} hand-offs in {:.3} s: {:.1} us per hand-off, {:.2} page transfers (target <= 2)",
        "mutex+condvar hand-off, two nodes",
        2 * HANDOFF_ROUNDS,
        elapsed.as_secs_f64(),
        handoff_us,
        handoff_us / transfer_us
    );
    let (cpu_used, wall) = sleeping_waiter_cpu();
    println!(
        "{:<44} {:.3} ms CPU in {:.3} s asleep ({:.4} % of a core)",
        "futex waiter sleeping on space memory",
        cpu_used.as_secs_f64() * 1e3,
        wall.as_secs_f64(),
        100.0 * cpu_used.as_secs_f64() / wall.as_secs_f64()
    );
}
