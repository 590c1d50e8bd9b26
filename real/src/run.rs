//! `gallocy run`: run a program with its heap in a gallocy space.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster;
use crate::config::SpaceDefaults;

/// The preload library next to the running executable, or `$GALLOCY_PRELOAD`.
pub fn preload_path() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("GALLOCY_PRELOAD") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let dir = exe.parent().ok_or("executable has no directory")?;
    for candidate in [
        dir.join("libgallocy_preload.so"),
        dir.join("../libgallocy_preload.so"),
    ] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "libgallocy_preload.so not found next to {} (cargo build --release builds it, or set GALLOCY_PRELOAD)",
        exe.display()
    ))
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
}

/// Runs the program; returns its exit status (128 + signal if killed).
pub fn run(options: &RunOptions<'_>) -> Result<i32, String> {
    let Some((program, args)) = options.program.split_first() else {
        return Err("no program given: gallocy run -- PROGRAM ARGS...".into());
    };
    let preload = preload_path()?;
    let (socket, embedded) = match std::env::var_os("GALLOCY_SOCKET") {
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
    let status = Command::new(program)
        .args(args)
        .env("LD_PRELOAD", ld_preload)
        .env("GALLOCY_SOCKET", &socket)
        .env("GALLOCY_SPACE", options.space)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
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
