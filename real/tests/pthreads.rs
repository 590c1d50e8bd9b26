//! Unmodified pthreads programs under `gallocy run -n 3`: their threads run in the
//! instances of other nodes, and their stdout and exit status are the plain run's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{describe, finish, libgallocy_preload, temp_dir};

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

const LIMIT: Duration = Duration::from_secs(120);

fn compile(dir: &Path, source: &str) -> PathBuf {
    let name = Path::new(source).file_stem().unwrap();
    let out = dir.join(name);
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(source);
    let output = Command::new("cc")
        .args(["-O2", "-g", "-Wall", "-pthread", "-o"])
        .arg(&out)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("run cc");
    assert!(
        output.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

fn spawn_output(command: &mut Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    finish(child, LIMIT)
}

fn plain(program: &Path) -> Output {
    spawn_output(&mut Command::new(program))
}

/// `gallocy run -n 3` with its own cluster.
fn distributed(program: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gallocy"));
    command
        .args(["run", "-n", "3", "--"])
        .arg(program)
        .env("GALLOCY_PRELOAD", libgallocy_preload())
        .env("GALLOCYD", env!("CARGO_BIN_EXE_gallocyd"))
        .env_remove("GALLOCY_SOCKET")
        .env_remove("GALLOCY_PLACEMENT");
    for (k, v) in env {
        command.env(k, v);
    }
    spawn_output(&mut command)
}

/// The `pids: N` line the suite's programs write on stderr: the processes their
/// threads ran in.
fn pids(output: &Output) -> usize {
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("pids: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pids line; {}", describe(output)))
}

fn run_suite(env: &[(&str, &str)], spread: bool) {
    let dir = temp_dir("pthreads");
    for name in SUITE {
        let program = compile(&dir, &format!("suite/{name}.c"));
        let expected = plain(&program);
        let got = distributed(&program, env);
        assert_eq!(
            got.status.code(),
            expected.status.code(),
            "{name}: exit status\nplain: {}\ngallocy: {}",
            describe(&expected),
            describe(&got)
        );
        assert_eq!(
            String::from_utf8_lossy(&got.stdout),
            String::from_utf8_lossy(&expected.stdout),
            "{name}: stdout\n{}",
            describe(&got)
        );
        let processes = pids(&got);
        if spread {
            assert!(
                processes > 1,
                "{name}: every thread ran in one process\n{}",
                describe(&got)
            );
        } else {
            assert_eq!(processes, 1, "{name}: {}", describe(&got));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_pthreads_suite_spreads_over_three_nodes_and_matches_a_plain_run() {
    run_suite(&[], true);
}

#[test]
fn the_pthreads_suite_with_local_placement_matches_a_plain_run() {
    run_suite(&[("GALLOCY_PLACEMENT", "local")], false);
}

#[test]
fn an_instance_whose_libraries_differ_is_refused_with_the_library_named() {
    let dir = temp_dir("layout");
    let program = compile(&dir, "layout.c");
    let got = distributed(&program, &[]);
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert_eq!(got.status.code(), Some(89), "{}", describe(&got));
    assert!(
        stderr.contains("libm.so.6") && stderr.contains("same libraries at the same addresses"),
        "{}",
        describe(&got)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_a_thread_on_another_node_writes_reaches_the_launcher() {
    let dir = temp_dir("threadout");
    let program = compile(&dir, "threadout.c");
    let got = distributed(&program, &[]);
    assert!(got.status.success(), "{}", describe(&got));
    let stdout = String::from_utf8_lossy(&got.stdout);
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert!(
        stdout.contains("a line from a thread\n")
            && stdout.contains("main done, thread in another process\n"),
        "{}",
        describe(&got)
    );
    assert!(
        stderr.contains("an error line from a thread\n"),
        "{}",
        describe(&got)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fatal_signal_in_a_thread_on_another_node_ends_the_program_naming_the_node() {
    let dir = temp_dir("crash");
    let program = compile(&dir, "crash.c");
    let got = distributed(&program, &[]);
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert_eq!(got.status.code(), Some(128 + 6), "{}", describe(&got));
    assert!(
        stderr.contains("instance on node 2 was killed by signal 6"),
        "{}",
        describe(&got)
    );
    assert!(!String::from_utf8_lossy(&got.stdout).contains("unreachable"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_that_dies_ends_the_program_with_a_message_and_its_own_status() {
    use std::io::{BufRead, BufReader};
    let cluster = common::Cluster::start("nodedown", 3);
    let program = compile(&cluster.dir, "nodedown.c");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gallocy"))
        .args(["run", "-n", "3", "--"])
        .arg(&program)
        .env("GALLOCY_PRELOAD", libgallocy_preload())
        .env("GALLOCY_SOCKET", cluster.socket(1))
        .env_remove("GALLOCY_PLACEMENT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // stderr is read as it comes: the program says when its threads wait.
    let (lines, heard) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = lines.send(line);
        }
        all
    });
    let waiting = loop {
        match heard.recv_timeout(LIMIT) {
            Ok(line) if line == "waiting" => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(waiting, "the program never reported its threads waiting");
    // SAFETY: SIGKILL to the pid of a daemon this test started.
    unsafe { libc::kill(cluster.daemon_pid(2), libc::SIGKILL) };
    let output = finish(child, LIMIT);
    let stderr = reader.join().unwrap();
    assert_eq!(output.status.code(), Some(85), "stderr:\n{stderr}");
    assert!(
        stderr.contains("node 2 went down; the program's threads there are lost"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn the_explicit_api_places_threads_on_the_nodes_it_names() {
    let dir = temp_dir("capi-threads");
    let program = common::build_c(&dir.join("capi_threads"), &["capi_threads.c"], &[]);
    let got = distributed(&program, &[]);
    assert!(got.status.success(), "{}", describe(&got));
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "sum 21, distinct 3\n",
        "{}",
        describe(&got)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
