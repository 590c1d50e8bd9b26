//! `gallocy run`: run a program with its heap in a gallocy space.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::cluster;
use crate::config::SpaceDefaults;

/// The preload library next to the running executable, or `$GALLOCY_PRELOAD`.
pub fn preload_path() -> Result<PathBuf, String> {
    crate::cluster::find_beside_exe("GALLOCY_PRELOAD", "libgallocy_preload.so")
}

/// The program's pid while it runs, for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

/// The program's main instance, for the signal forwarder (0: none).
pub fn track_child(pid: i32) {
    CHILD.store(pid, Ordering::SeqCst);
}

/// While the program runs, this command must outlive it to stop the cluster: SIGINT
/// (which the terminal also sends to the program) is ignored here; SIGTERM and SIGHUP
/// are passed on to the program.
fn guard_signals() {
    // SAFETY: installing handlers that only read an atomic and call kill.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        for signal in [libc::SIGTERM, libc::SIGHUP] {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// A cluster this command started; stopped whatever happens.
struct Embedded {
    dir: PathBuf,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct RunOptions<'a> {
    pub nodes: u64,
    pub space: &'a str,
    pub program: &'a [String],
    /// Print each node's status (JSON) on stderr after the program exits.
    pub stats: bool,
    /// An existing cluster's daemon (else `$GALLOCY_SOCKET`, else an embedded cluster).
    pub socket: Option<&'a Path>,
}

/// Runs the program; returns its exit status (128 + signal if killed).
pub fn run(options: &RunOptions<'_>) -> Result<i32, String> {
    let Some((program, args)) = options.program.split_first() else {
        return Err("no program given: gallocy run -- PROGRAM ARGS...".into());
    };
    let preload = preload_path()?;
    let given = options
        .socket
        .map(|p| p.as_os_str().to_owned())
        .or_else(|| std::env::var_os("GALLOCY_SOCKET"));
    let (socket, embedded) = match given {
        Some(socket) => (PathBuf::from(socket), None),
        None => {
            let dir = PathBuf::from(format!(
                "/tmp/gallocy-run-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let embedded = Embedded { dir: dir.clone() };
            let gallocyd = cluster::gallocyd_path()?;
            cluster::up(
                options.nodes,
                &dir,
                SpaceDefaults::default(),
                "warn",
                &gallocyd,
            )?;
            (cluster::app_socket(&dir, 1), Some(embedded))
        }
    };
    let mut ld_preload = preload.into_os_string();
    if let Some(existing) = std::env::var_os("LD_PRELOAD") {
        ld_preload.push(":");
        ld_preload.push(existing);
    }
    guard_signals();
    // Against an existing cluster, `--socket` or `-n N` (N > 1) asks for an instance
    // on every member; with only $GALLOCY_SOCKET the program runs as one process.
    let nodes = match &embedded {
        Some(_) => options.nodes,
        None if options.nodes > 1 || options.socket.is_some() => crate::admin::status(&socket)
            .ok()
            .and_then(|doc| doc["members"].as_array().map(|m| m.len() as u64))
            .unwrap_or(1),
        None => 1,
    };
    if nodes > 1 {
        // An instance on every node; threads spread over them.
        let mut env: Vec<(String, std::ffi::OsString)> = vec![
            ("LD_PRELOAD".into(), ld_preload),
            ("GALLOCY_SPACE".into(), options.space.into()),
            ("GALLOCY_NODES".into(), nodes.to_string().into()),
            // Every symbol bound at start: no lazy binding writes the executable's
            // GOT (space pages once the globals are shared) later.
            ("LD_BIND_NOW".into(), "1".into()),
        ];
        if embedded.is_some() && std::env::var_os("GALLOCY_PERSISTENT").is_none() {
            env.push(("GALLOCY_PERSISTENT".into(), "1".into()));
        }
        let launch = crate::launch::Launch {
            socket: &socket,
            nodes,
            program: options.program,
            env,
        };
        let status = crate::launch::run(&launch);
        if options.stats {
            print_stats(
                &socket,
                embedded.as_ref().map(|e| e.dir.as_path()),
                options.nodes,
            );
        }
        drop(embedded);
        return status;
    }
    let mut child = Command::new(program);
    child
        .args(args)
        .env("LD_PRELOAD", ld_preload)
        .env("GALLOCY_SOCKET", &socket)
        .env("GALLOCY_SPACE", options.space)
        // Only the program itself attaches; what it execs gets a private heap unless
        // GALLOCY_CHILDREN=share (preload/interpose, `is_exec_descendant`).
        .env("GALLOCY_RUN_PARENT", std::process::id().to_string());
    if embedded.is_some() && std::env::var_os("GALLOCY_PERSISTENT").is_none() {
        // The embedded cluster ends with the run anyway; keeping the space until then
        // lets `--stats` show what the program left in it.
        child.env("GALLOCY_PERSISTENT", "1");
    }
    // The program gets the terminal's signals itself (it is in our process group), as
    // it would without gallocy: restore the defaults we changed.
    // SAFETY: signal() is async-signal-safe; this runs in the child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = child
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    CHILD.store(0, Ordering::SeqCst);
    if options.stats {
        print_stats(
            &socket,
            embedded.as_ref().map(|e| e.dir.as_path()),
            options.nodes,
        );
    }
    drop(embedded);
    Ok(match status.code() {
        Some(code) => code,
        None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
    })
}

fn print_stats(socket: &Path, dir: Option<&Path>, nodes: u64) {
    let sockets: Vec<PathBuf> = match dir {
        Some(dir) => (1..=nodes).map(|i| cluster::app_socket(dir, i)).collect(),
        None => vec![socket.to_path_buf()],
    };
    for socket in sockets {
        match crate::admin::status(&socket) {
            Ok(doc) => eprintln!("gallocy-stats: {doc}"),
            Err(e) => eprintln!("gallocy-stats: {e}"),
        }
    }
}
