//! Worker instances: a program's instance on this node, started by the daemon at the
//! origin's request (`HostAction::StartWorker`), mpirun style: the launcher forks
//! nothing on other nodes.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::Instant;

use gallocy_core::programs::{WorkerExit, WorkerSpec, MAX_OUTPUT_CHUNK_BYTES};

/// A running worker instance.
pub struct Worker {
    pub child: Child,
    pub pidfd: OwnedFd,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    /// Asked to stop: killed if still running then.
    pub kill_at: Option<Instant>,
}

/// SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => context.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    Ok(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the worker instance of `program` described by `spec_bytes`, attached to
/// this daemon (`app_socket`). An error is the refusal reason the launcher prints.
pub fn start(
    spec_bytes: &[u8],
    program: u64,
    node: u64,
    app_socket: &Path,
) -> Result<Worker, String> {
    let spec = WorkerSpec::decode(spec_bytes).map_err(|e| format!("malformed worker spec: {e}"))?;
    let path = Path::new(std::ffi::OsStr::from_bytes(&spec.path));
    let hash = sha256_file(path).map_err(|e| format!("cannot read the executable: {e}"))?;
    if hash != spec.exe_sha256 {
        return Err(format!(
            "the executable {} differs from the origin's (sha256 {} here, {} there)",
            path.display(),
            hex(&hash),
            hex(&spec.exe_sha256)
        ));
    }
    let mut command = Command::new(path);
    command
        .arg0(std::ffi::OsStr::from_bytes(&spec.argv[0]))
        .args(
            spec.argv[1..]
                .iter()
                .map(|a| std::ffi::OsStr::from_bytes(a)),
        )
        .env_clear()
        .current_dir(std::ffi::OsStr::from_bytes(&spec.cwd))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for entry in &spec.env {
        let split = entry.iter().position(|&b| b == b'=').unwrap_or(entry.len());
        let (name, value) = entry.split_at(split);
        if name.is_empty() {
            continue;
        }
        command.env(
            std::ffi::OsStr::from_bytes(name),
            std::ffi::OsStr::from_bytes(value.get(1..).unwrap_or(&[])),
        );
    }
    // The instance attaches to this node's daemon, as a worker of this program.
    command
        .env("GALLOCY_SOCKET", app_socket)
        .env("GALLOCY_PROGRAM", program.to_string())
        .env("GALLOCY_INSTANCE", "worker")
        // The instance attaches; programs it execs do not (preload's
        // `is_exec_descendant`).
        .env("GALLOCY_RUN_PARENT", std::process::id().to_string())
        .env("GALLOCY_NODE", node.to_string());
    // SAFETY: personality and prctl are async-signal-safe system calls; this runs in
    // the child between fork and exec and touches nothing else.
    unsafe {
        command.pre_exec(|| {
            // The same addresses as every other instance (no ASLR), and the instance
            // dies with this daemon.
            libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // A group of its own: ending the instance ends what it started too.
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
    let pid = child.id() as i32;
    let pidfd = match rustix::process::Pid::from_raw(pid)
        .map(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()))
    {
        Some(Ok(fd)) => fd,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cannot watch the started instance (pidfd_open)".into());
        }
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    for fd in [
        stdout.as_ref().map(|s| s.as_raw_fd()),
        stderr.as_ref().map(|s| s.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    Ok(Worker {
        child,
        pidfd,
        stdout,
        stderr,
        kill_at: None,
    })
}

impl Worker {
    /// Kills the instance and every process of its group.
    pub fn kill(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: kill on the process group this instance leads (setpgid at start).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.kill();
    }
}

/// What one read of a worker's output pipe gave.
pub enum Chunk {
    Bytes(Vec<u8>),
    /// Nothing now.
    Empty,
    /// The pipe is closed (the instance and everything it started are gone).
    End,
}

pub fn read_chunk(pipe: &mut dyn Read) -> Chunk {
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK_BYTES];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return Chunk::End,
            Ok(n) => {
                buf.truncate(n);
                return Chunk::Bytes(buf);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Chunk::Empty,
            Err(_) => return Chunk::End,
        }
    }
}

/// The exit of a reaped worker.
pub fn exit_of(status: std::process::ExitStatus) -> WorkerExit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => WorkerExit::Code(code),
        (None, Some(signal)) => WorkerExit::Signal(signal),
        (None, None) => WorkerExit::Code(255),
    }
}
