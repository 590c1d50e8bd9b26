//! `gallocy run` on several nodes: the launcher of a program with an instance on every
//! node (docs/runtime.md, "Threads on every node").
//!
//! It asks its daemon to start a worker instance on every other member (`Launch`: the
//! executable's path, arguments, environment, directory and SHA-256, which each
//! daemon checks), waits until each has started, then runs the main instance itself.
//! While the program runs it relays the workers' output to its own stdout and stderr,
//! and it decides how the program ends:
//!
//! - the main instance exits: the workers are stopped, the program's status is its;
//! - a worker exits on its own (`exit()` in a thread there, a fatal signal, a refusal):
//!   the main instance is killed and the program's status is the worker's (128 + the
//!   signal's number for a signal, with a message naming the node);
//! - a node is declared down: the program ends with `EXIT_NODE_DOWN` and a message;
//! - the daemon goes away: `EXIT_DAEMON_GONE`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gallocy_core::ipc::{
    IpcMessage, IPC_FRAME_BYTES, REPORT_EXIT_CODE, REPORT_EXIT_SIGNAL, REPORT_NODE_DOWN,
    REPORT_REFUSED, REPORT_STARTED, REPORT_STDERR, REPORT_STDOUT,
};
use gallocy_core::programs::{WorkerSpec, MAX_SPEC_BYTES};

use crate::daemon::frame_of;

/// A node of the program was declared down: its threads are lost.
pub const EXIT_NODE_DOWN: i32 = 85;
/// The daemon the launcher talks to went away.
pub const EXIT_DAEMON_GONE: i32 = 86;
/// A worker instance could not start (its executable or libraries differ, ...).
pub const EXIT_REFUSED: i32 = 89;
/// How long workers have to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopped workers have to report their end (their last output first).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the launcher hears.
enum Event {
    Report {
        node: u64,
        what: u8,
        value: u32,
        data: Vec<u8>,
    },
    DaemonGone(String),
    MainExited(std::process::ExitStatus),
}

fn read_frame(stream: &mut UnixStream) -> Result<IpcMessage, String> {
    let mut buf = [0u8; IPC_FRAME_BYTES];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("connection to the daemon: {e}"))?;
    match IpcMessage::decode(&buf) {
        Ok((_, message)) => Ok(message),
        Err(e) => Err(format!("bad frame from the daemon: {e:?}")),
    }
}

/// The executable `program` names, as `execvp` would find it.
pub fn resolve(program: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return std::fs::canonicalize(&path).map_err(|e| format!("{program}: {e}"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return std::fs::canonicalize(&candidate).map_err(|e| format!("{program}: {e}"));
        }
    }
    Err(format!("{program}: not found in PATH"))
}

pub struct Launch<'a> {
    pub socket: &'a Path,
    pub nodes: u64,
    pub program: &'a [String],
    /// Environment both kinds of instances get on top of the launcher's.
    pub env: Vec<(String, std::ffi::OsString)>,
}

fn signal_name(signal: i32) -> String {
    // SAFETY: strsignal returns a static (or thread-local) string for any number.
    let text = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(signal)) };
    text.to_string_lossy().into_owned()
}

/// Runs the program with an instance on every node; its exit status.
pub fn run(launch: &Launch<'_>) -> Result<i32, String> {
    use std::os::unix::ffi::OsStrExt;
    let (program, args) = launch.program.split_first().expect("checked by the caller");
    let exe = resolve(program)?;
    let exe_sha256 = crate::workers::sha256_file(&exe)?;
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != "GALLOCY_SOCKET" && k != "GALLOCY_RUN_PARENT")
        .collect();
    for (k, v) in &launch.env {
        env.retain(|(name, _)| name != k.as_str());
        env.push((k.into(), v.clone()));
    }
    let spec = WorkerSpec {
        path: exe.as_os_str().as_bytes().to_vec(),
        argv: launch
            .program
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
        env: env
            .iter()
            .map(|(k, v)| {
                let mut entry = k.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                entry
            })
            .collect(),
        cwd: std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .as_os_str()
            .as_bytes()
            .to_vec(),
        exe_sha256,
    }
    .encode();
    if spec.len() > MAX_SPEC_BYTES {
        return Err(format!(
            "the program's arguments and environment take {} bytes; at most {MAX_SPEC_BYTES} fit in a launch",
            spec.len()
        ));
    }
    let mut stream = crate::admin::connect_admin(launch.socket, START_TIMEOUT)?;
    // Reports come whenever the program has something to say.
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    stream
        .write_all(&frame_of(IpcMessage::Launch {
            spec_len: spec.len() as u32,
        }))
        .and_then(|_| stream.write_all(&spec))
        .map_err(|e| format!("send: {e}"))?;
    let program_id = match read_frame(&mut stream)? {
        IpcMessage::Launched { program } => program,
        IpcMessage::Error { code, .. } => {
            return Err(format!(
                "the daemon refused the launch: {}",
                code.describe()
            ))
        }
        other => return Err(format!("unexpected answer to a launch: {other:?}")),
    };
    let (events, heard) = mpsc::channel::<Event>();
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let reports = events.clone();
    std::thread::spawn(move || loop {
        let message = match read_frame(&mut reader) {
            Ok(message) => message,
            Err(e) => {
                let _ = reports.send(Event::DaemonGone(e));
                return;
            }
        };
        if let IpcMessage::WorkerReport {
            node,
            what,
            value,
            len_bytes,
        } = message
        {
            let mut data = vec![0u8; len_bytes as usize];
            if let Err(e) = reader.read_exact(&mut data) {
                let _ = reports.send(Event::DaemonGone(e.to_string()));
                return;
            }
            if reports
                .send(Event::Report {
                    node,
                    what,
                    value,
                    data,
                })
                .is_err()
            {
                return;
            }
        }
    });
    // Orphans of the main instance come to us, to be ended with the program.
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let mut ended = Ending::default();
    // Every worker started (or the program cannot run).
    let mut started = std::collections::BTreeSet::new();
    let deadline = Instant::now() + START_TIMEOUT;
    while (started.len() as u64) < launch.nodes - 1 {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Ok(event) = heard.recv_timeout(wait) else {
            stop(&mut stream, program_id);
            return Err(format!(
                "only {} of {} worker instances started within {} s",
                started.len(),
                launch.nodes - 1,
                START_TIMEOUT.as_secs()
            ));
        };
        if let Event::Report {
            node,
            what: REPORT_STARTED,
            ..
        } = event
        {
            started.insert(node);
            ended.started.insert(node);
            continue;
        }
        if let Some(status) = ended.event(event) {
            stop(&mut stream, program_id);
            ended.drain(&heard);
            return Ok(status);
        }
    }
    // The main instance: this node, this process's child.
    let mut child = Command::new(&exe);
    child
        .arg0(program)
        .args(args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env("GALLOCY_SOCKET", launch.socket)
        .env("GALLOCY_PROGRAM", program_id.to_string())
        .env("GALLOCY_INSTANCE", "main")
        .env("GALLOCY_RUN_PARENT", std::process::id().to_string());
    // SAFETY: personality and signal are async-signal-safe; between fork and exec.
    unsafe {
        child.pre_exec(|| {
            libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = match child.spawn() {
        Ok(child) => child,
        Err(e) => {
            stop(&mut stream, program_id);
            return Err(format!("cannot run {program}: {e}"));
        }
    };
    let pid = child.id() as i32;
    crate::run::track_child(pid);
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = events.send(Event::MainExited(status));
        }
    });
    let status = loop {
        let Ok(event) = heard.recv() else {
            break EXIT_DAEMON_GONE;
        };
        if let Some(status) = ended.event(event) {
            break status;
        }
    };
    if !ended.main_exited {
        // SAFETY: kill on our own child's pid (not reaped: the waiter thread reaps it).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    crate::run::track_child(0);
    stop(&mut stream, program_id);
    ended.drain(&heard);
    reap_orphans();
    Ok(status)
}

/// Kills what the main instance left running: processes it started that this
/// launcher inherited as their subreaper (a wrapper script's child when the wrapper
/// was killed). Daemons of an embedded cluster are left to its shutdown.
fn reap_orphans() {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the comm may hold spaces, so split after ')'.
        let Some((comm, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).unwrap_or("");
        if ppid == me && !comm.ends_with("(gallocyd") {
            // SAFETY: SIGKILL to a process whose parent is this launcher.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
    }
}

fn stop(stream: &mut UnixStream, program: u64) {
    let _ = stream.write_all(&frame_of(IpcMessage::StopProgram { program }));
}

#[derive(Default)]
struct Ending {
    main_exited: bool,
    /// Workers whose end was reported.
    exited: std::collections::BTreeSet<u64>,
    started: std::collections::BTreeSet<u64>,
}

impl Ending {
    /// Handles one event; the program's exit status if it ends with it.
    fn event(&mut self, event: Event) -> Option<i32> {
        match event {
            Event::Report {
                node,
                what,
                value,
                data,
            } => match what {
                REPORT_STARTED => {
                    self.started.insert(node);
                    None
                }
                REPORT_STDOUT => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&data);
                    let _ = out.flush();
                    None
                }
                REPORT_STDERR => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&data);
                    let _ = err.flush();
                    None
                }
                REPORT_REFUSED => {
                    eprintln!(
                        "gallocy: node {node} could not start the program: {}",
                        String::from_utf8_lossy(&data)
                    );
                    self.exited.insert(node);
                    Some(EXIT_REFUSED)
                }
                REPORT_EXIT_CODE => {
                    self.exited.insert(node);
                    Some(value as i32)
                }
                REPORT_EXIT_SIGNAL => {
                    self.exited.insert(node);
                    eprintln!(
                        "gallocy: the program's instance on node {node} was killed by signal {value} ({})",
                        signal_name(value as i32)
                    );
                    Some(128 + value as i32)
                }
                REPORT_NODE_DOWN => {
                    self.exited.insert(node);
                    eprintln!(
                        "gallocy: node {node} went down; the program's threads there are lost"
                    );
                    Some(EXIT_NODE_DOWN)
                }
                _ => None,
            },
            Event::DaemonGone(why) => {
                eprintln!("gallocy: the daemon is gone ({why}); the program cannot go on");
                Some(EXIT_DAEMON_GONE)
            }
            Event::MainExited(status) => {
                self.main_exited = true;
                use std::os::unix::process::ExitStatusExt;
                Some(match (status.code(), status.signal()) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => 255,
                })
            }
        }
    }

    /// After the end: relays what the stopped workers still write, until each has
    /// reported its exit (bounded).
    fn drain(&mut self, heard: &mpsc::Receiver<Event>) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.exited.len() < self.started.len() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match heard.recv_timeout(wait) {
                Ok(Event::Report {
                    node,
                    what,
                    value,
                    data,
                }) => match what {
                    REPORT_STDOUT | REPORT_STDERR => {
                        let _ = self.event(Event::Report {
                            node,
                            what,
                            value,
                            data,
                        });
                    }
                    REPORT_EXIT_CODE | REPORT_EXIT_SIGNAL | REPORT_NODE_DOWN | REPORT_REFUSED => {
                        self.exited.insert(node);
                    }
                    _ => {}
                },
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}
