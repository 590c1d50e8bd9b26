//! `gallocy cluster up|down`: a local cluster of daemons (Unix-socket peers in private
//! directories, or TCP peers on 127.0.0.1 with TLS); `gallocy cluster init|revoke`:
//! configurations and credentials for a cluster of several hosts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{DaemonConfig, PeerAddr, PeerConfig, SpaceDefaults};
use crate::tls::{ClusterCa, TlsFiles};

/// Longest Unix socket path the kernel accepts (sun_path minus the terminator).
const MAX_SOCKET_PATH_BYTES: usize = 107;
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How the daemons of a local cluster reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Unix sockets in private (0700) directories.
    Unix,
    /// TCP on 127.0.0.1 with mutual TLS (credentials from a CA made for the cluster).
    Tls,
    /// TCP on 127.0.0.1 in clear (to measure what TLS costs).
    PlainTcp,
}

/// Creates `dir` (and its parents) and makes it reachable by this user only.
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| format!("chmod 700 {}: {e}", dir.display()))
}

pub fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}"))
}

pub fn app_socket(dir: &Path, id: u64) -> PathBuf {
    node_dir(dir, id).join("app.sock")
}

/// The `gallocyd` next to the running executable, or `$GALLOCYD`.
pub fn gallocyd_path() -> Result<PathBuf, String> {
    find_beside_exe("GALLOCYD", "gallocyd")
}

/// A file installed with this executable: `$env_var` if set, else `file_name` in the
/// executable's directory or its parent (cargo puts test binaries in `deps/`).
pub fn find_beside_exe(env_var: &str, file_name: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let dir = exe.parent().ok_or("executable has no directory")?;
    for candidate in [dir.join(file_name), dir.join("..").join(file_name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{file_name} not found next to {} (cargo build --release builds it, or set {env_var})",
        exe.display()
    ))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn is_gallocyd(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| String::from_utf8_lossy(&cmd).contains("gallocyd"))
        .unwrap_or(false)
}

/// Starts `nodes` daemons under `dir` (Unix-socket peers) and returns once they agree
/// on a leader.
pub fn up(
    nodes: u64,
    dir: &Path,
    space: SpaceDefaults,
    log: &str,
    gallocyd: &Path,
) -> Result<(), String> {
    up_over(nodes, dir, space, log, gallocyd, Transport::Unix)
}

/// Free TCP ports on 127.0.0.1, one per node (bound, read, released: another program
/// could take one in between, and the daemon then says so).
pub fn free_local_ports(nodes: u64) -> Result<Vec<SocketAddr>, String> {
    let listeners: Vec<std::net::TcpListener> = (0..nodes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}")))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect()
}

/// As `up`, with the peers on `transport`.
pub fn up_over(
    nodes: u64,
    dir: &Path,
    space: SpaceDefaults,
    log: &str,
    gallocyd: &Path,
    transport: Transport,
) -> Result<(), String> {
    if nodes == 0 || nodes > 64 {
        return Err("a local cluster has 1 to 64 nodes".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("resolve {}: {e}", dir.display()))?;
    for id in 1..=nodes {
        let pid_file = node_dir(&dir, id).join("gallocyd.pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                if pid_alive(pid) && is_gallocyd(pid) {
                    return Err(format!(
                        "a cluster is already running in {} (node {id}, pid {pid}); run gallocy cluster down --dir {}",
                        dir.display(),
                        dir.display()
                    ));
                }
            }
        }
    }
    let peers: Vec<PeerConfig> = match transport {
        Transport::Unix => (1..=nodes)
            .map(|id| PeerConfig {
                id,
                addr: PeerAddr::Unix(node_dir(&dir, id).join("peer.sock")),
            })
            .collect(),
        Transport::Tls | Transport::PlainTcp => free_local_ports(nodes)?
            .into_iter()
            .zip(1..=nodes)
            .map(|(addr, id)| PeerConfig {
                id,
                addr: PeerAddr::Tcp(addr),
            })
            .collect(),
    };
    for id in 1..=nodes {
        create_private_dir(&node_dir(&dir, id))?;
    }
    // With TLS, a CA for this cluster only: made anew by each `up`.
    let ca = match transport {
        Transport::Tls => {
            let ca_dir = dir.join("ca");
            let _ = std::fs::remove_dir_all(&ca_dir);
            Some(ClusterCa::create(&ca_dir)?)
        }
        Transport::Unix | Transport::PlainTcp => None,
    };
    for peer in &peers {
        if let PeerAddr::Unix(path) = &peer.addr {
            if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
                return Err(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH_BYTES} bytes; use a shorter --dir",
                    path.display()
                ));
            }
        }
    }
    let mut started = Vec::new();
    for id in 1..=nodes {
        let tls = match &ca {
            Some(ca) => match ca.issue(id, &node_dir(&dir, id)) {
                Ok(files) => Some(files),
                Err(why) => {
                    let _ = down(&dir);
                    return Err(why);
                }
            },
            None => None,
        };
        let node = NodeSetup {
            id,
            listen: peers[id as usize - 1].addr.clone(),
            tls,
            plaintext_tcp: transport == Transport::PlainTcp,
        };
        match start_daemon(&dir, &node, &peers, &space, log, gallocyd) {
            Ok(child) => started.push((id, child)),
            Err(why) => {
                // Leave nothing half-started behind.
                let _ = down(&dir);
                return Err(why);
            }
        }
    }
    let deadline = Instant::now() + LEADER_TIMEOUT;
    loop {
        for (id, child) in &mut started {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(node_dir(&dir, *id).join("gallocyd.log"))
                    .unwrap_or_default();
                let _ = down(&dir);
                return Err(format!("gallocyd of node {id} exited ({status}):\n{log}"));
            }
        }
        let leaders: Vec<Option<u64>> = (1..=nodes)
            .map(|id| {
                crate::admin::status(&app_socket(&dir, id))
                    .ok()
                    .and_then(|s| s["leader"].as_u64())
            })
            .collect();
        if let Some(Some(leader)) = leaders.first() {
            if leaders.iter().all(|l| *l == Some(*leader)) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let _ = down(&dir);
            return Err(format!(
                "the cluster found no leader within {} s",
                LEADER_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What differs between the nodes of a local cluster.
struct NodeSetup {
    id: u64,
    listen: PeerAddr,
    tls: Option<TlsFiles>,
    plaintext_tcp: bool,
}

/// Writes node `id`'s configuration and starts its daemon, as a new member: whatever
/// Raft state an earlier cluster left in the node's directory goes.
fn start_daemon(
    dir: &Path,
    node: &NodeSetup,
    peers: &[PeerConfig],
    space: &SpaceDefaults,
    log: &str,
    gallocyd: &Path,
) -> Result<std::process::Child, String> {
    let id = node.id;
    let home = node_dir(dir, id);
    create_private_dir(&home)?;
    let config = DaemonConfig {
        space: space.clone(),
        log: log.to_string(),
        tls: node.tls.clone(),
        plaintext_tcp: node.plaintext_tcp,
        ..DaemonConfig::new(
            id,
            node.listen.clone(),
            peers.to_vec(),
            home.join("app.sock"),
            home.clone(),
        )
    };
    let data_dir = config.data_dir();
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .map_err(|e| format!("remove {}: {e}", data_dir.display()))?;
    }
    let config_path = home.join("gallocyd.toml");
    std::fs::write(&config_path, config.to_toml())
        .map_err(|e| format!("write {}: {e}", config_path.display()))?;
    spawn_daemon(&home, gallocyd, false)
}

/// Starts the daemon configured in `home/gallocyd.toml`, in a session of its own, its
/// output in `home/gallocyd.log` (appended to if `append_log`), its pid in
/// `home/gallocyd.pid`.
fn spawn_daemon(
    home: &Path,
    gallocyd: &Path,
    append_log: bool,
) -> Result<std::process::Child, String> {
    let config_path = home.join("gallocyd.toml");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append_log)
        .truncate(!append_log)
        .open(home.join("gallocyd.log"))
        .map_err(|e| format!("open log: {e}"))?;
    let mut command = Command::new(gallocyd);
    command
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file);
    // Its own session: the daemon outlives this command and its terminal.
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("start {}: {e}", gallocyd.display()))?;
    if let Err(e) = std::fs::write(home.join("gallocyd.pid"), child.id().to_string()) {
        // Without its pid file `down` cannot find it: stop it here.
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("write pid file: {e}"));
    }
    Ok(child)
}

/// Starts node `id` of the local cluster in `dir` again, after its daemon died: the
/// same configuration and data directory, so it comes back as the next life of the
/// same member (its Raft log from its disk, its pages from the other nodes). Returns
/// once it has rejoined (its status says so), or with its log if it exits first.
pub fn restart(dir: &Path, id: u64, gallocyd: &Path) -> Result<(), String> {
    let home = node_dir(dir, id);
    if !home.join("gallocyd.toml").exists() {
        return Err(format!("{} has no gallocyd.toml", home.display()));
    }
    if let Ok(pid) = std::fs::read_to_string(home.join("gallocyd.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            if pid_alive(pid) && is_gallocyd(pid) {
                return Err(format!("node {id} is running (pid {pid})"));
            }
        }
    }
    let mut child = spawn_daemon(&home, gallocyd, true)?;
    wait_serving(dir, id, &mut child)
}

/// The configurations of the local cluster in `dir`, by node id (every `node<i>`
/// directory with a `gallocyd.toml`).
fn node_configs(dir: &Path) -> Result<BTreeMap<u64, DaemonConfig>, String> {
    let mut configs = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))? {
        let home = entry.map_err(|e| e.to_string())?.path();
        let path = home.join("gallocyd.toml");
        if path.exists() {
            let config = DaemonConfig::load(&path)?;
            configs.insert(config.node_id, config);
        }
    }
    if configs.is_empty() {
        return Err(format!("no cluster in {}", dir.display()));
    }
    Ok(configs)
}

/// Writes `config` as its node's configuration, whole or not at all (a daemon re-reads
/// it once a second).
fn write_config(dir: &Path, config: &DaemonConfig) -> Result<(), String> {
    let home = node_dir(dir, config.node_id);
    let path = home.join("gallocyd.toml");
    let partial = home.join("gallocyd.toml.new");
    std::fs::write(&partial, config.to_toml())
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// The first member of `configs` other than `not` whose daemon answers and serves (to
/// send it a membership change).
fn answering_member(
    dir: &Path,
    configs: &BTreeMap<u64, DaemonConfig>,
    not: u64,
) -> Result<u64, String> {
    configs
        .keys()
        .copied()
        .filter(|&id| id != not)
        .find(|&id| {
            crate::admin::status(&app_socket(dir, id)).is_ok_and(|s| {
                s["evicted"] == false && s["joining"] == false && s["rejoining"] == false
            })
        })
        .ok_or_else(|| format!("no daemon of the cluster in {} serves", dir.display()))
}

/// Adds a node to the running local cluster in `dir`: the next free id, its directory
/// and configuration (its peers: every member, itself included, reached as the others
/// are), credentials from the cluster's CA if it has one; every member's configuration
/// gets the new peer (their daemons read it within a second); its daemon starts to
/// join, a member adds it (a Raft configuration change), and this returns once the new
/// node has the metadata and serves. Returns its id.
pub fn add(dir: &Path, gallocyd: &Path) -> Result<u64, String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("resolve {}: {e}", dir.display()))?;
    let mut configs = node_configs(&dir)?;
    if configs.len() >= gallocy_core::meta::MAX_MEMBERS {
        return Err("the cluster has the most members it may have".into());
    }
    let template = configs.values().next().expect("non-empty").clone();
    // Ids of removed nodes are never reused: their directories stay.
    let mut id = configs
        .values()
        .flat_map(|c| c.peers.iter().map(|p| p.id))
        .max()
        .unwrap_or(0)
        + 1;
    while node_dir(&dir, id).exists() {
        id += 1;
    }
    let home = node_dir(&dir, id);
    create_private_dir(&home)?;
    let listen = match &template.listen {
        PeerAddr::Unix(_) => {
            let path = home.join("peer.sock");
            if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
                return Err(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH_BYTES} bytes; use a shorter --dir",
                    path.display()
                ));
            }
            PeerAddr::Unix(path)
        }
        PeerAddr::Tcp(_) => PeerAddr::Tcp(free_local_ports(1)?[0]),
    };
    let tls = match &template.tls {
        Some(_) => Some(ClusterCa::open(&dir.join("ca"))?.issue(id, &home)?),
        None => None,
    };
    let mut peers = template.peers.clone();
    peers.push(PeerConfig {
        id,
        addr: listen.clone(),
    });
    let config = DaemonConfig {
        space: template.space.clone(),
        log: template.log.clone(),
        tls,
        plaintext_tcp: template.plaintext_tcp,
        revoke_timeout_ms: template.revoke_timeout_ms,
        down_after_ms: template.down_after_ms,
        join: true,
        ..DaemonConfig::new(
            id,
            listen,
            peers.clone(),
            home.join("app.sock"),
            home.clone(),
        )
    };
    // Every configuration must still hold (the timing inequalities grow with the
    // members) before anything is written.
    config
        .validate()
        .map_err(|e| format!("node {id} would not start: {e}"))?;
    for member in configs.values_mut() {
        member.peers = peers.clone();
        member
            .validate()
            .map_err(|e| format!("node {} would not restart: {e}", member.node_id))?;
    }
    write_config(&dir, &config)?;
    for member in configs.values() {
        write_config(&dir, member)?;
    }
    let member = answering_member(&dir, &configs, id)?;
    let mut child = spawn_daemon(&home, gallocyd, false)?;
    if let Err(why) = crate::admin::change_membership(&app_socket(&dir, member), id, true) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("node {member} did not add node {id}: {why}"));
    }
    wait_serving(&dir, id, &mut child)?;
    Ok(id)
}

/// Removes node `id` from the local cluster in `dir` for good, dead or alive: a
/// member applies the change (the node is marked down first if it is up: its copies
/// void, its chunks moved), its daemon is stopped if it runs, and it leaves every
/// member's configuration. Its directory stays (with its log), so its id is never
/// given again by `add`.
pub fn remove(dir: &Path, id: u64) -> Result<(), String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("resolve {}: {e}", dir.display()))?;
    let mut configs = node_configs(&dir)?;
    if !configs.contains_key(&id) {
        return Err(format!(
            "node {id} is not in the cluster in {}",
            dir.display()
        ));
    }
    let member = answering_member(&dir, &configs, id)?;
    crate::admin::change_membership(&app_socket(&dir, member), id, false)?;
    let home = node_dir(&dir, id);
    if let Ok(pid) = std::fs::read_to_string(home.join("gallocyd.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            stop_daemon(pid);
        }
        let _ = std::fs::remove_file(home.join("gallocyd.pid"));
    }
    configs.remove(&id);
    // Kept for the record under another name: not a member's configuration any more.
    std::fs::rename(
        home.join("gallocyd.toml"),
        home.join("gallocyd.toml.removed"),
    )
    .map_err(|e| format!("rename {}: {e}", home.join("gallocyd.toml").display()))?;
    for member in configs.values_mut() {
        member.peers.retain(|p| p.id != id);
        write_config(&dir, member)?;
    }
    Ok(())
}

/// SIGTERM to a gallocyd, SIGKILL if it has not ended within `STOP_TIMEOUT`.
fn stop_daemon(pid: i32) {
    if !(pid_alive(pid) && is_gallocyd(pid)) {
        return;
    }
    // SAFETY: signalling a daemon of this cluster (checked by name above).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while pid_alive(pid) && is_gallocyd(pid) && Instant::now() < deadline {
        // SAFETY: waitpid with WNOHANG; harmless if not our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(10));
    }
    if pid_alive(pid) && is_gallocyd(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Waits until node `id`'s daemon serves: no longer joining or rejoining, with a
/// leader; or returns its log if it exits first.
fn wait_serving(dir: &Path, id: u64, child: &mut std::process::Child) -> Result<(), String> {
    let home = node_dir(dir, id);
    let deadline = Instant::now() + LEADER_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(home.join("gallocyd.log")).unwrap_or_default();
            return Err(format!("gallocyd of node {id} exited ({status}):\n{log}"));
        }
        let status = crate::admin::status(&app_socket(dir, id)).ok();
        if status.is_some_and(|s| {
            s["rejoining"] == false
                && s["joining"] == false
                && s["leader"].as_u64().is_some_and(|l| l != 0)
        }) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {id} did not come to serve within {} s (see {})",
                LEADER_TIMEOUT.as_secs(),
                home.join("gallocyd.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops every daemon of the cluster in `dir` and removes its sockets and pid files.
pub fn down(dir: &Path) -> Result<usize, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let home = entry.path();
        let pid_file = home.join("gallocyd.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        if let Ok(pid) = text.trim().parse::<i32>() {
            if pid_alive(pid) && is_gallocyd(pid) {
                // SAFETY: signalling a process we started (checked by name above).
                unsafe { libc::kill(pid, libc::SIGTERM) };
                pids.push(pid);
            }
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for &pid in &pids {
        while pid_alive(pid) && is_gallocyd(pid) && Instant::now() < deadline {
            // Reap it if it is our child (tests); ignore otherwise.
            // SAFETY: waitpid with WNOHANG on a pid; harmless if not our child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(10));
        }
        if pid_alive(pid) && is_gallocyd(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for name in ["app.sock", "peer.sock"] {
            let _ = std::fs::remove_file(entry.path().join(name));
        }
    }
    Ok(pids.len())
}

/// Configurations and credentials for a cluster of several hosts, one directory per
/// host (`OUT/node<i>`, for the i-th address) to copy there, and the CA (`OUT/ca`, which
/// stays with whoever administers the cluster: it signs members and revokes them).
/// Each daemon then runs with `gallocyd --config DIR/gallocyd.toml`.
pub fn init(hosts: &[SocketAddr], out: &Path, space: &SpaceDefaults) -> Result<(), String> {
    if hosts.is_empty() || hosts.len() > 64 {
        return Err("a cluster has 1 to 64 hosts".into());
    }
    for (i, a) in hosts.iter().enumerate() {
        if hosts[..i].contains(a) {
            return Err(format!("{a} is listed twice"));
        }
    }
    if out.join("ca").exists() {
        return Err(format!(
            "{} already holds a cluster (its ca/); choose another --out",
            out.display()
        ));
    }
    let ca = ClusterCa::create(&out.join("ca"))?;
    let peers: Vec<PeerConfig> = hosts
        .iter()
        .zip(1u64..)
        .map(|(&addr, id)| PeerConfig {
            id,
            addr: PeerAddr::Tcp(addr),
        })
        .collect();
    for peer in &peers {
        let home = node_dir(out, peer.id);
        create_private_dir(&home)?;
        let tls = ca.issue(peer.id, &home)?;
        let config = DaemonConfig {
            space: space.clone(),
            tls: Some(tls),
            // Relative paths: the configuration's directory, wherever it is copied.
            ..DaemonConfig::new(
                peer.id,
                peer.addr.clone(),
                peers.clone(),
                PathBuf::from("run/app.sock"),
                PathBuf::from("run"),
            )
        };
        let path = home.join("gallocyd.toml");
        std::fs::write(&path, config.to_toml())
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Revokes member `node`'s certificate with the CA in `dir/ca`, and puts the new CRL
/// beside the credentials of every member directory under `dir` (a daemon reads it
/// once a second). Returns the member directories updated.
pub fn revoke(dir: &Path, node: u64) -> Result<Vec<PathBuf>, String> {
    let ca = ClusterCa::open(&dir.join("ca"))?;
    let crl = ca.revoke(node)?;
    let mut updated = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))? {
        let home = entry.map_err(|e| e.to_string())?.path();
        if home.join("node.pem").exists() {
            let path = home.join("crl.pem");
            // Written whole, then renamed: a daemon never reads half a CRL.
            let partial = home.join("crl.pem.new");
            std::fs::write(&partial, &crl)
                .and_then(|()| std::fs::rename(&partial, &path))
                .map_err(|e| format!("write {}: {e}", path.display()))?;
            updated.push(home);
        }
    }
    updated.sort();
    Ok(updated)
}
