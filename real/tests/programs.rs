//! Real programs under `gallocy run`: byte-identical output to a plain run, with the
//! heap in the space.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{describe, first_line, libgallocy_preload, temp_dir, Cluster};

fn gallocy_run(args: &[&str], program: &[&str], cwd: &Path, socket: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gallocy"));
    command
        .arg("run")
        .args(args)
        .arg("--")
        .args(program)
        .current_dir(cwd)
        .env("GALLOCY_PRELOAD", libgallocy_preload())
        .env("GALLOCYD", env!("CARGO_BIN_EXE_gallocyd"))
        .env_remove("GALLOCY_SOCKET");
    if let Some(socket) = socket {
        command.env("GALLOCY_SOCKET", socket);
    }
    command.output().unwrap()
}

fn plain(program: &[&str], cwd: &Path) -> Output {
    Command::new(program[0])
        .args(&program[1..])
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Runs under gallocy and plainly; same status and stdout; the space held the heap.
fn same_as_plain(program: &[&str], cwd: &Path) {
    let expected = plain(program, cwd);
    let got = gallocy_run(&["--stats"], program, cwd, None);
    assert!(got.status.success(), "{}", describe(&got));
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        String::from_utf8_lossy(&expected.stdout),
        "output differs; stderr:\n{}",
        String::from_utf8_lossy(&got.stderr)
    );
    heap_was_in_the_space(&got);
}

/// The `--stats` lines `gallocy run` printed show chunks leased and pages written.
/// Node 1's status document, from `--stats` output.
fn stats_of(output: &Output) -> serde_json::Value {
    let stats = String::from_utf8_lossy(&output.stderr);
    let line = stats
        .lines()
        .find_map(|l| l.strip_prefix("gallocy-stats: "))
        .unwrap_or_else(|| panic!("no stats:\n{stats}"));
    serde_json::from_str(line).unwrap()
}

/// Chunks node 1 leased in the run's space, from `--stats` output.
fn chunks_leased(output: &Output) -> u64 {
    stats_of(output)["spaces"][0]["chunks_per_node"]["1"]
        .as_u64()
        .unwrap_or(0)
}

fn heap_was_in_the_space(output: &Output) {
    let doc = stats_of(output);
    let chunks = chunks_leased(output);
    assert!(chunks >= 2, "the heap did not go to the space: {doc}");
    assert!(doc["pages"]["write"].as_u64().unwrap() > 0, "{doc}");
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn python_dicts_json_and_a_subprocess() {
    let dir = temp_dir("py");
    let script = r#"
import json, subprocess
data = {str(i): {"n": i, "sq": [i * i] * 5, "s": "x" * (i % 50)} for i in range(20000)}
text = json.dumps(data, sort_keys=True)
back = json.loads(text)
assert back == data
words = sorted(set(w for v in back.values() for w in v["s"].split()))
out = subprocess.run(["echo", "from a child"], capture_output=True, text=True).stdout
print(len(text), len(back), words[:3], out.strip())
"#;
    same_as_plain(&["python3", "-c", script], &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sqlite_inserts_and_aggregates() {
    if !have("sqlite3") {
        eprintln!("sqlite3 is not installed; skipped");
        return;
    }
    let dir = temp_dir("sqlite");
    let sql = "create table t(a integer, b text); \
        with recursive c(x) as (select 1 union all select x+1 from c where x < 100000) \
        insert into t select x, 'row' || x from c; \
        select count(*), sum(a), max(length(b)), avg(a) from t;";
    let expected = plain(&["sqlite3", "plain.db", sql], &dir);
    let got = gallocy_run(&["--stats"], &["sqlite3", "gallocy.db", sql], &dir, None);
    assert!(got.status.success(), "{}", describe(&got));
    assert_eq!(got.stdout, expected.stdout);
    assert!(String::from_utf8_lossy(&got.stdout).starts_with("100000|5000050000|9|"));
    heap_was_in_the_space(&got);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn git_init_add_commit_log() {
    if !have("git") {
        return;
    }
    let dir = temp_dir("git");
    let script = "git init -q repo && cd repo && git config user.email t@example.org && \
        git config user.name t && for i in 1 2 3; do echo $i > f$i; git add f$i; \
        GIT_COMMITTER_DATE='2026-01-01T00:00:0'$i GIT_AUTHOR_DATE='2026-01-01T00:00:0'$i \
        git commit -qm c$i; done && git log --format='%H %s' && git status --short | wc -l";
    let expected = plain(&["sh", "-c", script], &dir);
    let _ = std::fs::remove_dir_all(dir.join("repo"));
    let got = gallocy_run(&[], &["sh", "-c", script], &dir, None);
    assert!(got.status.success(), "{}", describe(&got));
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        String::from_utf8_lossy(&expected.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sort_of_a_20_mb_file() {
    let dir = temp_dir("sort");
    let mut text = String::with_capacity(20 << 20);
    let mut x: u64 = 1;
    while text.len() < 20 << 20 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(&format!("{:016x} line\n", x >> 8));
    }
    std::fs::write(dir.join("big.txt"), &text).unwrap();
    same_as_plain(&["sort", "big.txt"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_threads_allocate_and_free_across_threads() {
    let dir = temp_dir("threads");
    let program = dir.join("threads");
    let status = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&program)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/threads.c"))
        .status()
        .unwrap();
    assert!(status.success());
    same_as_plain(&[program.to_str().unwrap()], &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A program's heap that shrinks gives its chunks back while the program runs: large
/// runs beyond the 16 MiB the runtime keeps for reuse go back to the cluster.
#[test]
fn a_heap_that_shrinks_gives_chunks_back() {
    use std::io::{BufRead, BufReader, Write};
    let cluster = Cluster::start("shrink", 2);
    let program = common::build_c(&cluster.dir.join("shrink"), &["shrink.c"], &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["run", "--space", "shrink", "--"])
        .arg(&program)
        .current_dir(&cluster.dir)
        .env("GALLOCY_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", cluster.socket(1))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let chunks = |status: &serde_json::Value| {
        status["spaces"][0]["chunks_per_node"]["1"]
            .as_u64()
            .unwrap_or(0)
    };
    let limit = std::time::Duration::from_secs(60);
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "grown\n");
    let grown =
        chunks(&cluster.wait_for_status(1, limit, "the heap's chunks", |s| chunks(s) >= 128));
    writeln!(stdin, "free").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "shrunk\n");
    // Both nodes see what node 1 still holds: the root's chunk, spans, 16 chunks of runs
    // kept for reuse.
    for node in 1..=2 {
        cluster.wait_for_status(node, limit, "chunks given back", |s| chunks(s) <= 24);
    }
    writeln!(stdin, "again").unwrap();
    drop(stdin);
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let output = common::finish(child, limit);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        line,
        "done\n",
        "grown to {grown} chunks; {}",
        describe(&output)
    );
}

#[test]
fn a_linked_list_built_on_one_node_is_walked_on_another() {
    let cluster = Cluster::start("list", 2);
    let program = cluster.dir.join("list");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&program)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/list.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success());
    let program = program.to_str().unwrap().to_string();
    let socket1 = cluster.socket(1);
    let socket2 = cluster.socket(2);
    let dir = cluster.dir.clone();
    let walker = {
        let program = program.clone();
        let dir = dir.clone();
        std::thread::spawn(move || {
            gallocy_run(
                &["--space", "list"],
                &[&program, "walk", "5000"],
                &dir,
                Some(&socket2),
            )
        })
    };
    let built = gallocy_run(
        &["--space", "list"],
        &[&program, "build", "5000"],
        &dir,
        Some(&socket1),
    );
    let walked = walker.join().unwrap();
    assert!(built.status.success(), "{}", describe(&built));
    assert!(walked.status.success(), "{}", describe(&walked));
    let expected: i64 = (0..5000i64).map(|i| i * i).sum();
    assert_eq!(
        String::from_utf8_lossy(&walked.stdout).trim(),
        format!("walked 5000 nodes, sum {expected}")
    );
}

#[test]
fn no_daemon_is_a_clear_error_unless_fallback_is_asked() {
    let dir = temp_dir("nodaemon");
    let missing = dir.join("nobody.sock");
    let output = Command::new("python3")
        .args(["-c", "print('ran')"])
        .env("LD_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", &missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(85), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no gallocy daemon at") && stderr.contains("nobody.sock"),
        "{stderr}"
    );
    let output = Command::new("python3")
        .args(["-c", "print('ran')"])
        .env("LD_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", &missing)
        .env("GALLOCY_FALLBACK", "local")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ran\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_malloc_family_keeps_glibc_semantics_and_fork_is_safe() {
    let dir = temp_dir("semantics");
    let program = dir.join("semantics");
    let status = Command::new("cc")
        .args(["-O1", "-Wno-alloc-size-larger-than", "-o"])
        .arg(&program)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/semantics.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success());
    let got = gallocy_run(&[], &[program.to_str().unwrap()], &dir, None);
    assert!(got.status.success(), "{}", describe(&got));
    assert_eq!(String::from_utf8_lossy(&got.stdout), "semantics ok\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_into_pages_another_node_took_is_retried_not_efault() {
    let cluster = Cluster::start("efault", 2);
    let program = cluster.dir.join("efault");
    let status = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&program)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/efault.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success());
    let program = program.to_str().unwrap().to_string();
    let (dir, socket2) = (cluster.dir.clone(), cluster.socket(2));
    let thief = {
        let program = program.clone();
        std::thread::spawn(move || {
            gallocy_run(
                &["--space", "efault"],
                &[&program, "thief"],
                &dir,
                Some(&socket2),
            )
        })
    };
    let owner = gallocy_run(
        &["--space", "efault"],
        &[&program, "owner"],
        &cluster.dir,
        Some(&cluster.socket(1)),
    );
    let thief = thief.join().unwrap();
    assert!(owner.status.success(), "{}", describe(&owner));
    assert!(thief.status.success(), "{}", describe(&thief));
}

#[test]
fn a_program_whose_daemon_dies_says_so_and_exits_86() {
    let cluster = Cluster::start("dies", 1);
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import time, sys\nprint('up', flush=True)\nfor _ in range(600): time.sleep(0.1)",
        ])
        .env("LD_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", cluster.socket(1))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut up).unwrap();
    assert_eq!(&up, b"up\n");
    // SAFETY: killing the daemon this test started.
    unsafe { libc::kill(cluster.daemon_pid(1), libc::SIGKILL) };
    let output = common::finish(child, std::time::Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(86), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is gone"),
        "{}",
        describe(&output)
    );
}

#[test]
fn gallocy_run_stopped_by_sigterm_stops_the_program_and_its_cluster() {
    let dir = temp_dir("sigterm");
    let mut run = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args([
            "run",
            "--",
            "python3",
            "-c",
            "import time\nprint('up', flush=True)\ntime.sleep(60)",
        ])
        .current_dir(&dir)
        .env("GALLOCY_PRELOAD", libgallocy_preload())
        .env("GALLOCYD", env!("CARGO_BIN_EXE_gallocyd"))
        .env_remove("GALLOCY_SOCKET")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    std::io::Read::read_exact(run.stdout.as_mut().unwrap(), &mut up).unwrap();
    let pid = run.id();
    // SAFETY: signalling the command this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let output = common::finish(run, std::time::Duration::from_secs(30));
    assert_eq!(
        output.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        describe(&output)
    );
    // Its cluster is gone: no directory, no daemon serving it.
    let prefix = format!("gallocy-run-{pid}-");
    let leftovers: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(leftovers.is_empty(), "cluster directory left behind");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmdline).contains(&prefix),
                "a daemon of the run is still running"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A program that runs 1,000 other programs leaks nothing into the space: what it execs
/// gets a private heap by default. With `GALLOCY_CHILDREN=share` every child attaches to
/// the space: one that exits with a live block keeps that block's chunk leased (which
/// shows the check can fail), one that freed everything gives its chunks back.
#[test]
fn a_thousand_subprocesses_leak_no_chunks() {
    let dir = temp_dir("spawn");
    let spawner = common::build_c(&dir.join("spawner"), &["spawner.c"], &[]);
    let spawner = spawner.to_str().unwrap();
    let none = gallocy_run(&["--stats"], &[spawner, "0"], &dir, None);
    assert!(none.status.success(), "{}", describe(&none));
    let thousand = gallocy_run(&["--stats"], &[spawner, "1000"], &dir, None);
    assert!(thousand.status.success(), "{}", describe(&thousand));
    assert_eq!(String::from_utf8_lossy(&thousand.stdout), "spawned 1000\n");
    let (before, after) = (chunks_leased(&none), chunks_leased(&thousand));
    assert!(before >= 1, "{}", describe(&none));
    assert!(
        after <= before + 1,
        "1000 subprocesses left {after} chunks leased against {before} without them"
    );
    let shared = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_gallocy"))
            .args(["run", "--stats", "--", spawner])
            .args(args)
            .current_dir(&dir)
            .env("GALLOCY_PRELOAD", common::libgallocy_preload())
            .env("GALLOCYD", env!("CARGO_BIN_EXE_gallocyd"))
            .env("GALLOCY_CHILDREN", "share")
            .env_remove("GALLOCY_SOCKET")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", describe(&output));
        chunks_leased(&output)
    };
    // Children that exit with a block live keep its chunk: they share the space, and
    // another process could hold a pointer to it.
    let kept = shared(&["20"]);
    assert!(
        kept >= before + 20,
        "sharing children should each lease: {kept} against {before}"
    );
    // Children that free everything give every chunk back at exit (small, big and
    // large blocks).
    let freed = shared(&["20", "free"]);
    eprintln!("chunks leased: {before} alone, {kept} after 20 sharing children that keep a block, {freed} after 20 that free all");
    assert!(
        freed <= before + 1,
        "20 sharing children that freed all their blocks left {freed} chunks leased against {before}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// msync(2) on space memory, in an unmodified program under LD_PRELOAD: 64 pages
/// written on node 2 and no other node reads, then msync; node 2's daemon is killed;
/// a process on node 1 reads all 64 (from the backups the sync made).
#[test]
fn msync_makes_a_preloaded_programs_writes_survive_its_node() {
    let cluster = Cluster::start("msync", 3);
    let program = cluster.dir.join("msync");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&program)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/msync.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success());
    let mut writer = Command::new(&program)
        .arg("write")
        .env("LD_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", cluster.socket(2))
        .env("GALLOCY_SPACE", "msync")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(
        first_line(&mut writer),
        "synced",
        "log 2:\n{}",
        cluster.log(2)
    );
    cluster.kill_daemon(2);
    let reader = Command::new(&program)
        .arg("read")
        .env("LD_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", cluster.socket(1))
        .env("GALLOCY_SPACE", "msync")
        .output()
        .unwrap();
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(
        reader.status.success(),
        "{}\nlog 1:\n{}",
        describe(&reader),
        cluster.log(1)
    );
    assert_eq!(
        String::from_utf8_lossy(&reader.stdout).trim(),
        "read 64 pages"
    );
}
