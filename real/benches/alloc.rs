//! The preloaded allocator against glibc (and mimalloc, where the distribution's
//! package is installed) in the same run: small random sizes, single thread, and two
//! threads with cross-thread frees; then the wall time of real programs (python3,
//! sqlite3) under `gallocy run` against a plain run.
//!
//! `cargo bench -p gallocy-real --bench alloc`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PAIRS: &str = "5000000";
const REPEATS: usize = 5;

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn gallocy(args: &[&str]) -> Command {
    let dir = target_dir();
    let mut command = Command::new(dir.join("gallocy"));
    command
        .arg("run")
        .arg("--")
        .args(args)
        .env("GALLOCY_PRELOAD", dir.join("libgallocy_preload.so"))
        .env("GALLOCYD", env!("CARGO_BIN_EXE_gallocyd"))
        .env_remove("GALLOCY_SOCKET");
    command
}

/// ns per pair reported by the program, median of REPEATS runs.
fn measure(make: &dyn Fn() -> Command) -> f64 {
    median(
        (0..REPEATS)
            .map(|_| {
                let output = make().output().expect("run benchmark");
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                String::from_utf8_lossy(&output.stdout)
                    .trim()
                    .parse::<f64>()
                    .expect("ns per pair")
            })
            .collect(),
    )
}

fn wall(make: &dyn Fn() -> Command) -> f64 {
    median(
        (0..REPEATS)
            .map(|_| {
                let start = Instant::now();
                let output = make().output().expect("run program");
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let dir = std::env::temp_dir().join(format!("gallocy-allocbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bench = dir.join("allocbench");
    let status = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&bench)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/c/allocbench.c"
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        target_dir().join("libgallocy_preload.so").exists(),
        "build it first: cargo build --release"
    );
    let mimalloc = [
        "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
        "/usr/lib/x86_64-linux-gnu/libmimalloc.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    println!("allocator: ns per malloc+free pair, median of {REPEATS} runs of {PAIRS} pairs");
    println!(
        "{:<40} {:>10} {:>10} {:>12}",
        "workload", "glibc", "gallocy", "mimalloc"
    );
    for mode in ["single", "threads"] {
        let b = bench.clone();
        let glibc = measure(&|| {
            let mut c = Command::new(&b);
            c.args([mode, PAIRS]);
            c
        });
        let b = bench.clone();
        let ours = measure(&|| gallocy(&[b.to_str().unwrap(), mode, PAIRS]));
        let mi = mimalloc.as_ref().map(|lib| {
            let b = bench.clone();
            measure(&|| {
                let mut c = Command::new(&b);
                c.args([mode, PAIRS]).env("LD_PRELOAD", lib);
                c
            })
        });
        println!(
            "{:<40} {:>10.2} {:>10.2} {:>12}   gallocy/glibc {:.2}x (target <= 1.5x)",
            if mode == "single" {
                "1 thread, small random sizes"
            } else {
                "2 threads, half the frees cross-thread"
            },
            glibc,
            ours,
            mi.map_or("n/a".to_string(), |m| format!("{m:.2}")),
            ours / glibc
        );
    }
    println!();
    println!("real programs: wall seconds, median of {REPEATS} (gallocy run includes starting and stopping a 1-node cluster)");
    let py = "import json; d={str(i):[i]*10 for i in range(200000)}; s=json.dumps(d); print(len(json.loads(s)))";
    let sql = "create table t(a integer, b text); with recursive c(x) as (select 1 union all select x+1 from c where x < 100000) insert into t select x, 'row' || x from c; select count(*), sum(a) from t;";
    let db = dir.join("bench.db");
    let plain_py = wall(&|| {
        let mut c = Command::new("python3");
        c.args(["-c", py]);
        c
    });
    let ours_py = wall(&|| gallocy(&["python3", "-c", py]));
    println!(
        "{:<40} plain {:>7.3}  gallocy {:>7.3}  ratio {:.2}x",
        "python3 dicts + json",
        plain_py,
        ours_py,
        ours_py / plain_py
    );
    // The same heap on private chunks, no daemon: separates the allocator's cost from
    // the daemon path's.
    let local_py = wall(&|| {
        let mut c = Command::new("python3");
        c.args(["-c", py])
            .env("LD_PRELOAD", target_dir().join("libgallocy_preload.so"))
            .env("GALLOCY_FALLBACK", "local")
            .env_remove("GALLOCY_SOCKET");
        c
    });
    println!(
        "{:<40} plain {:>7.3}  local   {:>7.3}  ratio {:.2}x",
        "python3, GALLOCY_FALLBACK=local",
        plain_py,
        local_py,
        local_py / plain_py
    );
    // What `gallocy run` costs by itself: starting and stopping the 1-node cluster.
    let startup = wall(&|| gallocy(&["true"]));
    println!(
        "{:<40} {startup:>7.3} s",
        "gallocy run -- true (start-up alone)"
    );
    let plain_sql = wall(&|| {
        let _ = std::fs::remove_file(&db);
        let mut c = Command::new("sqlite3");
        c.arg(&db).arg(sql);
        c
    });
    let ours_sql = wall(&|| {
        let _ = std::fs::remove_file(&db);
        gallocy(&["sqlite3", db.to_str().unwrap(), sql])
    });
    println!(
        "{:<40} plain {:>7.3}  gallocy {:>7.3}  ratio {:.2}x",
        "sqlite3 100,000 inserts + aggregate",
        plain_sql,
        ours_sql,
        ours_sql / plain_sql
    );
    let _ = std::fs::remove_dir_all(&dir);
}
