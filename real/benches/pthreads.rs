//! Threads across nodes, measured in one run (docs/benchmarks.md, "Threads across
//! nodes"):
//!
//! 1. a write ping-pong between two threads on two nodes (the page-transfer figure);
//! 2. a mutex + condition variable hand-off between two threads on two nodes, and a
//!    3-thread barrier on three nodes, each against 1;
//! 3. each program of the pthreads suite (real/tests/c/suite) under `gallocy run -n 1`
//!    against `-n 3` (wall time of the whole run, cluster start included).
//!
//! `cargo bench -p gallocy-real --bench pthreads`. Each figure is the median of
//! `RUNS` runs; every run starts its own local cluster (`gallocy run -n N`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const RUNS: usize = 5;
const SUITE: [&str; 9] = [
    "matmul",
    "mutexkinds",
    "workqueue",
    "stencil",
    "atomics",
    "rwlock",
    "once",
    "semdetach",
    "exit7",
];

fn target_dir() -> PathBuf {
    // target/release/deps/pthreads-HASH -> target/release
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn compile(out_dir: &Path, source: &Path) -> PathBuf {
    let out = out_dir.join(source.file_stem().unwrap());
    let status = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(source)
        .status()
        .expect("cc");
    assert!(status.success(), "cc {}", source.display());
    out
}

/// One `gallocy run -n nodes`: (wall seconds, the `us_per_op` it printed).
fn run(nodes: u64, program: &Path, arg: Option<&str>) -> (f64, Option<f64>) {
    let bin = target_dir();
    let started = Instant::now();
    let mut command = Command::new(bin.join("gallocy"));
    command
        .args(["run", "-n", &nodes.to_string(), "--"])
        .arg(program)
        .env("GALLOCY_PRELOAD", bin.join("libgallocy_preload.so"))
        .env("GALLOCYD", bin.join("gallocyd"))
        .env_remove("GALLOCY_SOCKET")
        .env_remove("GALLOCY_PLACEMENT");
    if let Some(arg) = arg {
        command.arg(arg);
    }
    let output = command.output().expect("gallocy run");
    let wall = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let per_op = stdout
        .lines()
        .find_map(|l| l.strip_prefix("us_per_op "))
        .and_then(|v| v.trim().parse().ok());
    (wall, per_op)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn per_op(program: &Path, arg: &str) -> f64 {
    median(
        (0..RUNS)
            .map(|_| run(3, program, Some(arg)).1.expect("us_per_op line"))
            .collect(),
    )
}

fn main() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("gallocy-bench-pthreads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bench_c = manifest.join("benches/c");
    let pingpong = compile(&dir, &bench_c.join("pingpong.c"));
    let handoff = compile(&dir, &bench_c.join("handoff.c"));
    let barrier = compile(&dir, &bench_c.join("barrier.c"));

    println!("threads across nodes, {RUNS} runs each, medians (3-node local cluster)");
    let transfer = per_op(&pingpong, "2000");
    println!(
        "{:<52} {transfer:>9.1} us",
        "write ping-pong, 2 threads on 2 nodes, per turn"
    );
    let hand = per_op(&handoff, "600");
    println!(
        "{:<52} {hand:>9.1} us  {:.2}x a ping-pong turn",
        "mutex+condvar hand-off, 2 threads on 2 nodes",
        hand / transfer
    );
    let round = per_op(&barrier, "300");
    println!(
        "{:<52} {round:>9.1} us  {:.2}x a ping-pong turn",
        "barrier round, 3 threads on 3 nodes",
        round / transfer
    );

    println!();
    println!("pthreads suite, wall time of gallocy run (cluster start included), medians");
    for name in SUITE {
        let program = compile(&dir, &manifest.join(format!("tests/c/suite/{name}.c")));
        let one = median((0..RUNS).map(|_| run(1, &program, None).0).collect());
        let three = median((0..RUNS).map(|_| run(3, &program, None).0).collect());
        println!(
            "{name:<12} 1 node {:>7.3} s   3 nodes {:>7.3} s   {:.2}x",
            one,
            three,
            three / one
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
