//! Shared helpers of the multi-process tests: temporary local clusters that always
//! stop, C programs built against libgallocy.so, processes with timeouts.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gallocy_real::cluster;
use gallocy_real::config::SpaceDefaults;

/// target/<profile>, from this test executable's path (target/<profile>/deps/x).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// libgallocy.so of this profile.
pub fn libgallocy() -> PathBuf {
    built_library("gallocy-preload", "libgallocy.so")
}

/// libgallocy_preload.so of this profile.
pub fn libgallocy_preload() -> PathBuf {
    built_library("gallocy-interpose", "libgallocy_preload.so")
}

/// A cdylib of this workspace in this profile, brought up to date once per test
/// process (`cargo test -p gallocy-real` alone does not build other packages' cdylibs,
/// and a stale one would test old code).
fn built_library(package: &str, file: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = profile_dir();
    let lib = dir.join(file);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|p| p == package) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "-p", package]);
        if dir.file_name().is_some_and(|n| n == "release") {
            command.arg("--release");
        }
        let status = command
            .status()
            .unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
        assert!(status.success(), "building {file} failed");
        built.push(package.to_string());
    }
    assert!(lib.exists(), "{} missing", lib.display());
    lib
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A reproducible stream of pseudo-random numbers (xorshift64*), without a dependency.
#[allow(dead_code)]
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A fresh short directory (Unix socket paths are limited to 107 bytes).
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = PathBuf::from(format!("/tmp/gy-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Compiles C sources (from real/tests/c) into `out`, linked with libgallocy.
pub fn build_c(out: &Path, sources: &[&str], extra: &[&str]) -> PathBuf {
    let lib = libgallocy();
    let lib_dir = lib.parent().unwrap();
    let c_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../preload/include");
    let mut command = Command::new("cc");
    command
        .args(["-O2", "-g", "-Wall", "-pthread", "-o"])
        .arg(out);
    for source in sources {
        command.arg(c_dir.join(source));
    }
    command
        .arg("-I")
        .arg(&include)
        .args(extra)
        .arg("-L")
        .arg(lib_dir)
        .arg("-lgallocy")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    let output = command.output().expect("run cc");
    assert!(
        output.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out.to_path_buf()
}

/// The e2e.c program, built once per test process.
pub fn e2e_program(dir: &Path) -> PathBuf {
    build_c(&dir.join("e2e"), &["e2e.c"], &[])
}

/// A local cluster that is always stopped, whatever the test does.
pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: u64,
}

impl Cluster {
    pub fn start(tag: &str, nodes: u64) -> Cluster {
        let dir = temp_dir(tag);
        let gallocyd = PathBuf::from(env!("CARGO_BIN_EXE_gallocyd"));
        let space = SpaceDefaults {
            size_bytes: 256 << 20,
            ..SpaceDefaults::default()
        };
        cluster::up(nodes, &dir, space, "info", &gallocyd).expect("cluster up");
        Cluster { dir, nodes }
    }

    pub fn socket(&self, node: u64) -> PathBuf {
        cluster::app_socket(&self.dir, node)
    }

    pub fn daemon_pid(&self, node: u64) -> i32 {
        std::fs::read_to_string(cluster::node_dir(&self.dir, node).join("gallocyd.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// SIGKILLs node `node`'s daemon and waits (bounded) until it is gone.
    #[allow(dead_code)]
    pub fn kill_daemon(&self, node: u64) {
        let pid = self.daemon_pid(node);
        // SAFETY: signalling a daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.daemon_alive(node) {
            // SAFETY: waitpid with WNOHANG on a pid; harmless if not our child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            assert!(
                Instant::now() < deadline,
                "node {node}'s daemon did not die"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether node `node`'s daemon is still running (signal 0 reaches it).
    #[allow(dead_code)]
    pub fn daemon_alive(&self, node: u64) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(self.daemon_pid(node), 0) == 0 }
    }

    pub fn log(&self, node: u64) -> String {
        std::fs::read_to_string(cluster::node_dir(&self.dir, node).join("gallocyd.log"))
            .unwrap_or_default()
    }

    /// Polls node `node`'s status until `done` holds (every 20 ms, at most `limit`);
    /// panics with the last status otherwise.
    #[allow(dead_code)]
    pub fn wait_for_status(
        &self,
        node: u64,
        limit: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let status = gallocy_real::admin::status(&self.socket(node)).expect("status");
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {node}: {what} not reached within {limit:?}; status: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `program args` attached to `node` to its end (killed after `limit`).
    #[allow(dead_code)]
    pub fn run(&self, node: u64, program: &Path, args: &[&str], limit: Duration) -> Output {
        finish(
            self.command(node, program, args).spawn().expect("spawn"),
            limit,
        )
    }

    /// As `run`, with one more environment variable.
    #[allow(dead_code)]
    pub fn run_with_env(
        &self,
        node: u64,
        program: &Path,
        args: &[&str],
        (key, value): (&str, &str),
        limit: Duration,
    ) -> Output {
        let child = self.command(node, program, args).env(key, value).spawn();
        finish(child.expect("spawn"), limit)
    }

    /// Starts `program args` attached to `node` and waits for its first line, which
    /// must be `expected` (else panics with the node's log). The child runs on.
    #[allow(dead_code)]
    pub fn spawn_expecting(
        &self,
        node: u64,
        program: &Path,
        args: &[&str],
        expected: &str,
    ) -> Child {
        let mut child = self.command(node, program, args).spawn().expect("spawn");
        assert_eq!(
            first_line(&mut child),
            expected,
            "log {node}:\n{}",
            self.log(node)
        );
        child
    }

    /// Runs `program args` attached to `node`.
    pub fn command(&self, node: u64, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("GALLOCY_SOCKET", self.socket(node))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Daemons' files in a directory `gallocy cluster init` wrote (node i in
/// `dir/node<i>`, its application socket in `run/`, its log in `gallocyd.log`).
#[allow(dead_code)]
pub struct InitDir {
    pub dir: PathBuf,
}

#[allow(dead_code)]
impl InitDir {
    pub fn socket(&self, node: u64) -> PathBuf {
        cluster::node_dir(&self.dir, node).join("run/app.sock")
    }

    pub fn log(&self, node: u64) -> String {
        std::fs::read_to_string(cluster::node_dir(&self.dir, node).join("gallocyd.log"))
            .unwrap_or_default()
    }

    pub fn status(&self, node: u64) -> serde_json::Value {
        gallocy_real::admin::status(&self.socket(node))
            .unwrap_or_else(|e| panic!("node {node}: {e}\n{}", self.log(node)))
    }

    /// Polls node `node`'s status until `done` holds (every 20 ms, at most `limit`).
    pub fn wait_for(
        &self,
        node: u64,
        limit: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let status = gallocy_real::admin::status(&self.socket(node));
            if status.as_ref().is_ok_and(&done) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {node}: {what} not reached within {limit:?}: {status:?}\n{}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs e2e.c's `consume` (started first) and `publish`, each to its end; both must
/// succeed. Their outputs: (publisher, consumer).
#[allow(dead_code)]
pub fn publish_then_consume(
    publisher: &mut Command,
    consumer: &mut Command,
    limit: Duration,
) -> (Output, Output) {
    let (consumed, published) = run_pair(consumer, publisher, limit);
    (published, consumed)
}

/// Starts `first`, then `second`, and runs both to their end; both must succeed.
/// Their outputs, in that order.
#[allow(dead_code)]
pub fn run_pair(first: &mut Command, second: &mut Command, limit: Duration) -> (Output, Output) {
    let first = first.spawn().expect("spawn the first process");
    let second = second.spawn().expect("spawn the second process");
    let first = finish(first, limit);
    let second = finish(second, limit);
    assert!(first.status.success(), "first: {}", describe(&first));
    assert!(second.status.success(), "second: {}", describe(&second));
    (first, second)
}

/// The next line a child printed (its stdout piped), without the newline; read a byte
/// at a time, so nothing after it is taken from the pipe.
#[allow(dead_code)]
pub fn first_line(child: &mut Child) -> String {
    use std::io::Read;
    let out = child.stdout.as_mut().expect("stdout piped");
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        text.push(byte[0]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Kills a child (it may have ended already) and reaps it.
#[allow(dead_code)]
pub fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for a child, killing it after `limit`.
pub fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("output"),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("output");
                panic!(
                    "process timed out after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
