//! `gallocyd`: one single-threaded event loop (mio) that moves bytes between sockets,
//! the memfd of each space, the processes attached to this node, and the sans-IO
//! `gallocy_core::host::Host`. Every protocol decision, about peers and about processes,
//! is the core's; this file only does I/O: sockets, memory, pidfds, signals, logging.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gallocy_core::host::{
    refusal, ConnId, Credentials, Host, HostAction, PeerProof, ProcessState, SessionId,
};
use gallocy_core::ipc::{ErrorCode, Frame, IpcMessage, IPC_FRAME_BYTES};
use gallocy_core::programs::{
    ProgramId, WorkerEvent, MAX_EVENT_BACKLOG_BYTES, MAX_SPEC_BYTES, STREAM_STDERR, STREAM_STDOUT,
};
use gallocy_core::wire::{
    decode_peer_hello, encode_peer_hello, is_background_frame, PeerHello, MAX_FRAME_BYTES,
    PEER_HELLO_BYTES,
};
use gallocy_core::{Access, NodeId, SpaceId};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, info, warn};

use crate::config::{DaemonConfig, PeerAddr};
use crate::memory::{NodeSpaces, SpaceMemory};
use crate::raft_disk::RaftDisk;
use crate::tls::{cert_names_member, PeerTls, TlsStream};
use crate::workers::{self, Chunk, Worker};

const APP_LISTENER: Token = Token(0);
const PEER_LISTENER: Token = Token(1);
/// Bytes a peer's outgoing buffer may hold; beyond, frames are dropped (the protocol
/// retries) and counted.
const MAX_PEER_BUFFER_BYTES: usize = 64 << 20;
/// Frames kept for a peer that is not connected.
const MAX_PEER_PENDING_FRAMES: usize = 4096;
/// Bytes an application connection's outgoing buffer may hold before it is closed.
const MAX_APP_BUFFER_BYTES: usize = 1 << 20;
const RECONNECT_MIN: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Inbound peer connections at once: each member has at most one outgoing connection
/// to us at a time, plus a few being replaced; more is someone else.
const MAX_INBOUND_PEERS_EXTRA: usize = 8;
/// An inbound peer connection that has not said hello after this long is closed.
const PEER_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the CRL's file is looked at.
const CREDENTIALS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the loop sleeps when nothing is due (the core's deadlines are shorter).
const MAX_WAIT: Duration = Duration::from_secs(1);
/// How long the loop keeps polling without sleeping after an application's frame or a
/// peer's page traffic (not after Raft or lease chatter).
const BUSY_POLL: Duration = Duration::from_micros(100);

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_signal: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// SIGTERM and SIGINT end the loop cleanly (sockets removed).
pub fn install_signal_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing a handler that only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_terminate as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    // A peer that vanishes must not kill us with SIGPIPE.
    // SAFETY: ignoring SIGPIPE is always sound.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

enum PeerStream {
    Unix(UnixStream),
    /// Plain TCP: only with `plaintext_tcp` (trusted networks, measurements).
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl PeerStream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            PeerStream::Unix(s) => s,
            PeerStream::Tcp(s) => s,
            PeerStream::Tls(s) => &mut s.tcp,
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Unix(s) => s.read(buf),
            PeerStream::Tcp(s) => s.read(buf),
            PeerStream::Tls(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Unix(s) => s.write(buf),
            PeerStream::Tcp(s) => s.write(buf),
            PeerStream::Tls(s) => s.write(buf),
        }
    }
    /// Sends what TLS holds (records of written plaintext, handshake messages).
    fn push(&mut self) -> std::io::Result<()> {
        match self {
            PeerStream::Tls(s) => s.push(),
            _ => Ok(()),
        }
    }
    /// Bytes below `write` still wait for the socket.
    fn wants_write(&self) -> bool {
        matches!(self, PeerStream::Tls(s) if s.wants_write())
    }
    /// The TLS handshake is not done yet.
    fn handshaking(&self) -> bool {
        matches!(self, PeerStream::Tls(s) if s.handshaking())
    }
}

enum PeerListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

struct PeerConn {
    stream: PeerStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// Known from the configuration (outbound) or from the hello (inbound).
    peer: Option<NodeId>,
    outbound: bool,
    hello_received: bool,
    opened: Instant,
    /// Where it came from, for the log.
    remote: String,
}

struct AppConn {
    stream: UnixStream,
    inbuf: Frame,
    inlen: usize,
    outbuf: Vec<u8>,
    pid: i32,
    /// A `Launch` frame's spec being read: (request id, length, bytes so far).
    trailer: Option<(u64, usize, Vec<u8>)>,
}

enum Conn {
    Peer(PeerConn),
    App(AppConn),
    /// A killed process's pidfd, readable once it has exited.
    Exit(SessionId),
    /// A worker instance's stdout or stderr.
    WorkerPipe {
        program: ProgramId,
        stream: u8,
    },
    /// A worker instance's pidfd.
    WorkerExit {
        program: ProgramId,
    },
}

struct Outbound {
    addr: PeerAddr,
    token: Option<Token>,
    pending: VecDeque<Vec<u8>>,
    next_attempt: Instant,
    backoff: Duration,
}

impl Outbound {
    /// The connection failed or closed: try again after the backoff, then twice as late.
    fn back_off(&mut self, now: Instant) {
        self.next_attempt = now + self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
    }
}

/// What the driver keeps about an attached process: the handle that survives pid reuse.
struct ProcessHandle {
    pid: i32,
    space: SpaceId,
    pidfd: Option<OwnedFd>,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    peer_frames_dropped: u64,
    peer_disconnects: u64,
    peers_refused: u64,
}

pub struct Daemon {
    config: DaemonConfig,
    host: Host,
    poll: Poll,
    started: Instant,
    now_ms: u64,
    conns: BTreeMap<Token, Conn>,
    next_token: usize,
    app_listener: UnixListener,
    peer_listener: PeerListener,
    outbound: BTreeMap<NodeId, Outbound>,
    spaces: BTreeMap<SpaceId, SpaceMemory>,
    processes: BTreeMap<SessionId, ProcessHandle>,
    counters: Counters,
    actions: Vec<HostAction>,
    /// This daemon's life as a member: one more at every restart (see `PeerHello`).
    incarnation: u64,
    /// The Raft log and hard state on disk.
    raft_disk: RaftDisk,
    /// Set when the daemon cannot go on (its Raft state could not be written).
    fatal: Option<String>,
    /// The configuration file, re-read once a second for its peers (`watch_config`).
    config_path: Option<std::path::PathBuf>,
    config_checked: Instant,
    /// Credentials of the peer links (TLS over TCP), when configured.
    tls: Option<PeerTls>,
    credentials_checked: Instant,
    /// Set when an input may be followed at once by more (an application is waiting).
    busy_until: Option<Instant>,
    read_buffer: Vec<u8>,
    /// This node's worker instances, by program.
    workers: BTreeMap<ProgramId, Worker>,
    /// Workers whose output is not read while the origin has not acknowledged enough.
    stalled_workers: BTreeSet<ProgramId>,
}

/// How long a worker told to stop may take before it is killed.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(2);

fn io_error(what: &str, error: std::io::Error) -> String {
    format!("{what}: {error}")
}

fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| io_error(&format!("create {}", parent.display()), e))?;
    }
    if path.exists() {
        // A daemon still listening there would answer; a stale file would not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use by a running daemon", path.display()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| io_error(&format!("bind {}", path.display()), e))
}

fn conn_id(token: Token) -> ConnId {
    token.0 as ConnId
}

fn token_of(conn: ConnId) -> Token {
    Token(conn as usize)
}

impl Daemon {
    pub fn new(config: DaemonConfig) -> Result<Daemon, String> {
        config.validate()?;
        check_private_peer_dirs(&config)?;
        let tls = config.tls.as_ref().map(PeerTls::load).transpose()?;
        let uid = rustix::process::getuid().as_raw();
        let data_dir = config.data_dir();
        let opened = RaftDisk::open(&data_dir, config.node_id)?;
        let mut host_config = config.host_config(uid);
        host_config.node.incarnation = opened.incarnation;
        let host = match &opened.persisted {
            None if config.join => {
                info!(
                    node = config.node_id,
                    "started to join: waiting to be added"
                );
                Host::join_cluster(host_config)?
            }
            None => Host::new(host_config)?,
            Some(persisted) => {
                info!(
                    node = config.node_id,
                    incarnation = opened.incarnation,
                    entries = persisted.entries.len(),
                    snapshot_index = persisted.snapshot.get_metadata().index,
                    term = persisted.hard_state.term,
                    "restarting from the Raft state in {}",
                    data_dir.display()
                );
                Host::restart(host_config, persisted)?
            }
        };
        let incarnation = opened.incarnation;
        let raft_disk = opened.disk;
        let poll = Poll::new().map_err(|e| io_error("epoll", e))?;
        let mut app_listener = bind_unix(&config.app_socket)?;
        // Only this user (and a configured group) may attach: checked again with
        // SO_PEERCRED on every connection.
        let mode = if config.app_group.is_some() {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(
            &config.app_socket,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .map_err(|e| io_error("chmod app socket", e))?;
        if let Some(gid) = config.app_group {
            std::os::unix::fs::chown(&config.app_socket, None, Some(gid))
                .map_err(|e| io_error("chgrp app socket", e))?;
        }
        poll.registry()
            .register(&mut app_listener, APP_LISTENER, Interest::READABLE)
            .map_err(|e| io_error("register", e))?;
        let mut peer_listener = match &config.listen {
            PeerAddr::Unix(path) => PeerListener::Unix(bind_unix(path)?),
            PeerAddr::Tcp(addr) => PeerListener::Tcp(
                TcpListener::bind(*addr).map_err(|e| io_error(&format!("bind {addr}"), e))?,
            ),
        };
        match &mut peer_listener {
            PeerListener::Unix(l) => poll
                .registry()
                .register(l, PEER_LISTENER, Interest::READABLE),
            PeerListener::Tcp(l) => poll
                .registry()
                .register(l, PEER_LISTENER, Interest::READABLE),
        }
        .map_err(|e| io_error("register", e))?;
        let now = Instant::now();
        let outbound = config
            .peers
            .iter()
            .filter(|p| p.id != config.node_id)
            .map(|p| {
                (
                    p.id,
                    Outbound {
                        addr: p.addr.clone(),
                        token: None,
                        pending: VecDeque::new(),
                        next_attempt: now,
                        backoff: RECONNECT_MIN,
                    },
                )
            })
            .collect();
        info!(node = config.node_id, app_socket = %config.app_socket.display(), listen = %config.listen, "gallocyd started");
        Ok(Daemon {
            config,
            host,
            poll,
            started: now,
            now_ms: 0,
            conns: BTreeMap::new(),
            next_token: 2,
            app_listener,
            peer_listener,
            outbound,
            spaces: BTreeMap::new(),
            processes: BTreeMap::new(),
            counters: Counters::default(),
            actions: Vec::new(),
            incarnation,
            raft_disk,
            fatal: None,
            config_path: None,
            config_checked: now,
            busy_until: None,
            read_buffer: Vec::new(),
            workers: BTreeMap::new(),
            stalled_workers: BTreeSet::new(),
            tls,
            credentials_checked: now,
        })
    }

    /// Runs until SIGTERM/SIGINT.
    pub fn run(&mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        while !SHUTDOWN.load(Ordering::SeqCst) {
            if let Some(error) = self.fatal.take() {
                for worker in self.workers.values_mut() {
                    worker.kill();
                }
                return Err(format!("cannot go on: {error}"));
            }
            // Poll without sleeping for a short while after an application's request
            // or page traffic: a sleeping vCPU takes tens of microseconds to wake on
            // this kind of VM, which would dominate a request's latency. Otherwise
            // sleep until the core's next deadline (or the driver's own).
            let now = Instant::now();
            let timeout = if self.busy_until.is_some_and(|t| now < t) {
                // Other processes (applications, other daemons) may need this CPU.
                std::thread::yield_now();
                Duration::ZERO
            } else {
                self.busy_until = None;
                self.next_wait(now)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("epoll_wait", e)),
            }
            for event in events.iter() {
                match event.token() {
                    APP_LISTENER => self.accept_apps(),
                    PEER_LISTENER => self.accept_peers(),
                    token => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(token);
                        }
                        if event.is_writable() {
                            self.flush(token);
                        }
                    }
                }
            }
            let now_ms = self.elapsed_ms();
            if now_ms > self.now_ms {
                self.now_ms = now_ms;
                self.host.tick(now_ms);
                self.process_actions();
                self.service_workers();
                self.reconnect_due();
                self.close_silent_peers();
                self.check_credentials();
                self.reload_peers();
            }
        }
        info!("gallocyd stopping");
        for worker in self.workers.values_mut() {
            worker.kill();
        }
        let _ = std::fs::remove_file(&self.config.app_socket);
        if let PeerAddr::Unix(path) = &self.config.listen {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// How long the loop may sleep: until the core's next deadline, a reconnection
    /// attempt or a peer's hello deadline, whichever comes first.
    fn next_wait(&self, now: Instant) -> Duration {
        let mut wait = MAX_WAIT;
        if let Some(tick) = self.host.poll_timeout() {
            let due = self.started + Duration::from_millis(tick);
            wait = wait.min(due.saturating_duration_since(now));
        }
        for outbound in self.outbound.values() {
            if outbound.token.is_none() {
                wait = wait.min(outbound.next_attempt.saturating_duration_since(now));
            }
        }
        for conn in self.conns.values() {
            if let Conn::Peer(peer) = conn {
                if !peer.hello_received {
                    let due = peer.opened + PEER_HELLO_TIMEOUT;
                    wait = wait.min(due.saturating_duration_since(now));
                }
            }
        }
        // Node time is whole milliseconds: wake at the start of the due one.
        wait.max(Duration::from_millis(1)).min(MAX_WAIT)
    }

    fn stay_busy(&mut self) {
        self.busy_until = Some(Instant::now() + BUSY_POLL);
    }

    fn new_token(&mut self) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        token
    }

    // ---------------------------------------------------------------------------------
    // The core's actions.

    fn process_actions(&mut self) {
        // Bounded: every action is handled once; handling one may add more (a finished
        // revocation's bytes), which the next rounds take.
        for _ in 0..1024 {
            let mut actions = std::mem::take(&mut self.actions);
            self.host.drain_actions(&mut actions);
            if actions.is_empty() {
                self.actions = actions;
                return;
            }
            for action in actions.drain(..) {
                self.apply(action);
            }
            self.actions = actions;
        }
        warn!("action processing did not settle");
    }

    fn apply(&mut self, action: HostAction) {
        if self.fatal.is_some() {
            // Nothing after a Raft write that failed may happen (the run loop ends).
            return;
        }
        match action {
            HostAction::PersistRaft(write) => {
                // Carried out before any later action (a vote before the message that
                // casts it); a write that fails ends the daemon: a member that cannot
                // keep its promises must not go on making them.
                if self.fatal.is_none() {
                    if let Err(error) = self.raft_disk.write(&write) {
                        self.fatal = Some(error);
                    }
                }
            }
            HostAction::SendPeer(envelope) => {
                let to = envelope.to;
                self.send_peer(to, envelope.encode());
            }
            HostAction::SendApp { conn, frame } => self.send_app(token_of(conn), &frame),
            HostAction::Welcome {
                conn,
                session,
                space,
                pid,
                frame,
            } => self.welcome(token_of(conn), session, space, pid, &frame),
            HostAction::SessionEnded { session } => {
                if let Some(handle) = self.processes.remove(&session) {
                    debug!(pid = handle.pid, session, "session ended");
                }
            }
            HostAction::Status { conn, request_id } => self.send_status(token_of(conn), request_id),
            HostAction::CloseApp { conn, why } => self.drop_conn(token_of(conn), why),
            HostAction::WritePage { page, bytes } => {
                if let Some(memory) = self.space_memory(page.space) {
                    memory.write_page(page.index, &bytes);
                }
            }
            HostAction::FinishRevoke {
                token,
                page,
                want_bytes,
            } => {
                let bytes = if want_bytes {
                    self.space_memory(page.space)
                        .and_then(|m| m.read_page(page.index))
                } else {
                    None
                };
                self.host.revoke_finished(self.now_ms, token, bytes);
            }
            HostAction::Probe { session, pid } => {
                let state = self.probe(session);
                debug!(
                    pid,
                    session,
                    ?state,
                    "probed a process whose connection closed"
                );
                self.host.process_state(self.now_ms, session, state);
            }
            HostAction::Kill {
                session,
                pid,
                reason,
            } => self.kill(session, pid, reason.describe()),
            HostAction::DropPages {
                space,
                first_page,
                pages,
                token,
            } => {
                // A space this daemon never backed has nothing to zero. One it backs
                // must be zeroed: a page the core later treats as never written must
                // read as zeroes.
                if let Some(memory) = self.spaces.get(&space) {
                    if !memory.drop_pages(first_page, pages) {
                        warn!(space, first_page, pages, "cannot zero released pages");
                        memory.zero_pages(first_page, pages);
                    }
                }
                debug!(space, first_page, pages, "released pages dropped");
                self.host.pages_dropped(self.now_ms, token);
            }
            HostAction::SendAppData { conn, frame, data } => {
                let token = token_of(conn);
                self.send_app(token, &frame);
                if let Some(Conn::App(app)) = self.conns.get_mut(&token) {
                    app.outbuf.extend_from_slice(&data);
                }
                self.flush(token);
            }
            HostAction::StartWorker { program, spec } => self.start_worker(program, &spec),
            HostAction::StopWorker { program } => {
                if let Some(worker) = self.workers.get_mut(&program) {
                    worker
                        .kill_at
                        .get_or_insert(Instant::now() + WORKER_STOP_GRACE);
                }
            }
            HostAction::DropSpace { space } => {
                // No process of this node maps it any more: closing the memfd gives
                // its memory back.
                if self.spaces.remove(&space).is_some() {
                    info!(space, "space destroyed: its memory is given back");
                }
            }
        }
    }

    fn space_memory(&mut self, space: SpaceId) -> Option<&SpaceMemory> {
        if !self.spaces.contains_key(&space) {
            let layout = self.host.node().meta().spaces.get(&space)?.clone();
            match SpaceMemory::create(&layout) {
                Ok(memory) => {
                    self.spaces.insert(space, memory);
                }
                Err(e) => {
                    warn!("cannot back space {space}: {e}");
                    return None;
                }
            }
        }
        self.spaces.get(&space)
    }

    fn welcome(
        &mut self,
        token: Token,
        session: SessionId,
        space: SpaceId,
        pid: i32,
        frame: &Frame,
    ) {
        // A pidfd names this process however its pid is reused later.
        let pidfd = rustix::process::Pid::from_raw(pid).and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        });
        self.processes
            .insert(session, ProcessHandle { pid, space, pidfd });
        if self.space_memory(space).is_none() {
            self.send_app(token, &frame_of(refusal(ErrorCode::Internal)));
            return self.close(token, "cannot back the space");
        }
        let Some(Conn::App(conn)) = self.conns.get(&token) else {
            return;
        };
        let memory = &self.spaces[&space];
        let fds = [memory.fd()];
        let mut buffer = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut buffer);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            conn.stream.as_fd(),
            &[IoSlice::new(frame)],
            &mut control,
            rustix::net::SendFlags::NOSIGNAL,
        );
        info!(pid, space, session, "process attached");
        if !matches!(sent, Ok(n) if n == IPC_FRAME_BYTES) {
            self.close(token, "could not send the space memfd");
        }
    }

    /// Whether a process whose connection closed can still touch its space.
    fn probe(&self, session: SessionId) -> ProcessState {
        let Some(handle) = self.processes.get(&session) else {
            return ProcessState::Exited;
        };
        let Some(pidfd) = &handle.pidfd else {
            // pidfd_open failed: the process was already gone when it attached.
            return ProcessState::Exited;
        };
        if has_exited(pidfd) {
            return ProcessState::Exited;
        }
        let Some(inode) = self.spaces.get(&handle.space).and_then(|m| m.inode()) else {
            return ProcessState::Mapped;
        };
        let mapped = maps_inode(handle.pid, inode);
        // Read after the maps: if it exited in between, the pid may name another process.
        if has_exited(pidfd) {
            return ProcessState::Exited;
        }
        match mapped {
            Some(false) => ProcessState::Unmapped,
            // Unreadable maps: assume the worst.
            Some(true) | None => ProcessState::Mapped,
        }
    }

    fn kill(&mut self, session: SessionId, pid: i32, why: &str) {
        warn!(pid, session, "killing process: {why}");
        let Some(handle) = self.processes.get_mut(&session) else {
            return self
                .host
                .process_state(self.now_ms, session, ProcessState::Exited);
        };
        let Some(pidfd) = handle.pidfd.take() else {
            return self
                .host
                .process_state(self.now_ms, session, ProcessState::Exited);
        };
        if rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).is_err()
            || has_exited(&pidfd)
        {
            return self
                .host
                .process_state(self.now_ms, session, ProcessState::Exited);
        }
        // Its pages are taken back once it has really exited: the pidfd says when.
        let token = self.new_token();
        let raw = pidfd.as_raw_fd();
        if self
            .poll
            .registry()
            .register(&mut SourceFd(&raw), token, Interest::READABLE)
            .is_err()
        {
            warn!(pid, "cannot watch the killed process; assuming it exited");
            return self
                .host
                .process_state(self.now_ms, session, ProcessState::Exited);
        }
        self.processes.get_mut(&session).expect("present").pidfd = Some(pidfd);
        self.conns.insert(token, Conn::Exit(session));
    }

    // ---------------------------------------------------------------------------------
    // Peers.

    fn accept_peers(&mut self) {
        loop {
            let accepted = match &self.peer_listener {
                PeerListener::Unix(l) => l
                    .accept()
                    .map(|(s, _)| (PeerStream::Unix(s), "unix peer".to_string())),
                PeerListener::Tcp(l) => l.accept().map(|(s, addr)| {
                    let _ = s.set_nodelay(true);
                    (PeerStream::Tcp(s), addr.to_string())
                }),
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("peer accept failed: {e}");
                    return;
                }
            };
            let mut stream = match (stream, &mut self.tls) {
                (PeerStream::Tcp(tcp), Some(tls)) => match tls.accept(tcp) {
                    Ok(tls_stream) => PeerStream::Tls(Box::new(tls_stream)),
                    Err(why) => {
                        warn!(from = %remote, "refused a peer connection: {why}");
                        continue;
                    }
                },
                (stream, _) => stream,
            };
            let inbound = self
                .conns
                .values()
                .filter(|c| matches!(c, Conn::Peer(p) if !p.outbound))
                .count();
            if inbound >= self.config.peers.len() + MAX_INBOUND_PEERS_EXTRA {
                // Full: the oldest connection that has not said hello makes room (so
                // silent connections cannot keep members out), else this one is refused.
                let oldest_silent = self
                    .conns
                    .iter()
                    .filter_map(|(&t, c)| match c {
                        Conn::Peer(p) if !p.outbound && !p.hello_received => Some((p.opened, t)),
                        _ => None,
                    })
                    .min();
                self.counters.peers_refused += 1;
                match oldest_silent {
                    Some((_, silent)) => {
                        warn!(from = %remote, "too many inbound peer connections: closing the oldest that said no hello");
                        self.close(silent, "room for a new connection");
                    }
                    None => {
                        warn!(from = %remote, "refused a peer connection: too many inbound connections");
                        continue;
                    }
                }
            }
            let token = self.new_token();
            if self
                .poll
                .registry()
                .register(stream.source(), token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                token,
                Conn::Peer(PeerConn {
                    stream,
                    inbuf: Vec::new(),
                    outbuf: Vec::new(),
                    peer: None,
                    outbound: false,
                    hello_received: false,
                    opened: Instant::now(),
                    remote,
                }),
            );
        }
    }

    /// Once a second: a changed CRL is read again and every TLS peer connection is
    /// closed, so each is checked against it when it reconnects (a revoked member's
    /// links end within about a second).
    fn check_credentials(&mut self) {
        let Some(tls) = &mut self.tls else {
            return;
        };
        if self.credentials_checked.elapsed() < CREDENTIALS_CHECK_INTERVAL {
            return;
        }
        self.credentials_checked = Instant::now();
        match tls.refresh() {
            Ok(true) => {}
            Ok(false) => return,
            Err(why) => {
                warn!("keeping the previous peer credentials: {why}");
                return;
            }
        }
        info!("the CRL changed: peer credentials reloaded, peer connections re-checked");
        let tls_conns: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c, Conn::Peer(p) if matches!(p.stream, PeerStream::Tls(_))))
            .map(|(&t, _)| t)
            .collect();
        for token in tls_conns {
            self.close(token, "credentials reloaded");
        }
    }

    /// Follows the peers of the configuration file at `path` (see `reload_peers`).
    pub fn watch_config(&mut self, path: std::path::PathBuf) {
        self.config_path = Some(path);
    }

    /// Once a second: the peers listed in the configuration file, where a member added
    /// at run time is found (`gallocy cluster add` writes it into every member's file).
    /// A peer new to the file is connected to, one whose address changed is reconnected,
    /// one gone from the file is no longer. Other settings take a restart.
    fn reload_peers(&mut self) {
        let Some(path) = &self.config_path else {
            return;
        };
        if self.config_checked.elapsed() < CREDENTIALS_CHECK_INTERVAL {
            return;
        }
        self.config_checked = Instant::now();
        let peers = match DaemonConfig::load(path) {
            Ok(config) if config.node_id == self.config.node_id => config.peers,
            Ok(_) => {
                warn!("{} names another node: peers not reloaded", path.display());
                return;
            }
            Err(why) => {
                warn!("peers not reloaded: {why}");
                return;
            }
        };
        if peers == self.config.peers {
            return;
        }
        let now = Instant::now();
        let me = self.config.node_id;
        let mut close = Vec::new();
        for peer in peers.iter().filter(|p| p.id != me) {
            match self.outbound.get_mut(&peer.id) {
                Some(outbound) if outbound.addr == peer.addr => {}
                Some(outbound) => {
                    info!(peer = peer.id, addr = %peer.addr, "peer address changed");
                    outbound.addr = peer.addr.clone();
                    close.extend(outbound.token.take());
                    outbound.next_attempt = now;
                }
                None => {
                    info!(peer = peer.id, addr = %peer.addr, "peer added to the configuration");
                    self.outbound.insert(
                        peer.id,
                        Outbound {
                            addr: peer.addr.clone(),
                            token: None,
                            pending: VecDeque::new(),
                            next_attempt: now,
                            backoff: RECONNECT_MIN,
                        },
                    );
                }
            }
        }
        let gone: Vec<NodeId> = self
            .outbound
            .keys()
            .copied()
            .filter(|id| !peers.iter().any(|p| p.id == *id))
            .collect();
        for id in gone {
            info!(peer = id, "peer removed from the configuration");
            if let Some(outbound) = self.outbound.remove(&id) {
                close.extend(outbound.token);
            }
        }
        self.config.peers = peers;
        for token in close {
            self.close(token, "peer configuration changed");
        }
    }

    fn close_silent_peers(&mut self) {
        let silent: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c, Conn::Peer(p)
                    if (!p.hello_received || p.stream.handshaking())
                        && p.opened.elapsed() > PEER_HELLO_TIMEOUT)
            })
            .map(|(&t, _)| t)
            .collect();
        for token in silent {
            self.counters.peers_refused += 1;
            if let Some(Conn::Peer(peer)) = self.conns.get(&token) {
                warn!(from = %peer.remote, "closing a peer connection: no hello or TLS handshake in time");
            }
            self.close(token, "no hello in time");
        }
    }

    fn reconnect_due(&mut self) {
        let now = Instant::now();
        let due: Vec<NodeId> = self
            .outbound
            .iter()
            .filter(|(_, o)| o.token.is_none() && o.next_attempt <= now)
            .map(|(&id, _)| id)
            .collect();
        for peer in due {
            self.connect_peer(peer, now);
        }
    }

    fn connect_peer(&mut self, peer: NodeId, now: Instant) {
        let outbound = self.outbound.get_mut(&peer).expect("listed");
        let stream = match &outbound.addr {
            PeerAddr::Unix(path) => match check_private_socket_dir(path) {
                Ok(()) => UnixStream::connect(path).map(PeerStream::Unix),
                Err(why) => {
                    warn!(peer, "not connecting: {why}");
                    outbound.back_off(now);
                    return;
                }
            },
            PeerAddr::Tcp(addr) => TcpStream::connect(*addr).map(|s| {
                let _ = s.set_nodelay(true);
                PeerStream::Tcp(s)
            }),
        };
        let remote = outbound.addr.to_string();
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                debug!(peer, "connect failed: {e}");
                outbound.back_off(now);
                return;
            }
        };
        let mut stream = match (stream, &mut self.tls) {
            (PeerStream::Tcp(tcp), Some(tls)) => match tls.connect(tcp, peer) {
                Ok(tls_stream) => PeerStream::Tls(Box::new(tls_stream)),
                Err(why) => {
                    warn!(peer, "cannot start TLS: {why}");
                    self.outbound.get_mut(&peer).expect("listed").back_off(now);
                    return;
                }
            },
            (stream, _) => stream,
        };
        let token = self.new_token();
        if self
            .poll
            .registry()
            .register(
                stream.source(),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return;
        }
        let outbound = self.outbound.get_mut(&peer).expect("listed");
        outbound.token = Some(token);
        let mut outbuf = encode_peer_hello(PeerHello {
            node: self.config.node_id,
            incarnation: self.incarnation,
        })
        .to_vec();
        for frame in outbound.pending.drain(..) {
            outbuf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            outbuf.extend_from_slice(&frame);
        }
        debug!(peer, "connected");
        self.conns.insert(
            token,
            Conn::Peer(PeerConn {
                stream,
                inbuf: Vec::new(),
                outbuf,
                peer: Some(peer),
                outbound: true,
                hello_received: true,
                opened: now,
                remote,
            }),
        );
        self.flush(token);
    }

    fn send_peer(&mut self, to: NodeId, frame: Vec<u8>) {
        if !is_background_frame(&frame) {
            self.stay_busy();
        }
        let Some(outbound) = self.outbound.get_mut(&to) else {
            return;
        };
        let Some(token) = outbound.token else {
            if outbound.pending.len() >= MAX_PEER_PENDING_FRAMES {
                outbound.pending.pop_front();
                self.counters.peer_frames_dropped += 1;
            }
            outbound.pending.push_back(frame);
            return;
        };
        let Some(Conn::Peer(conn)) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.outbuf.len() + frame.len() > MAX_PEER_BUFFER_BYTES {
            self.counters.peer_frames_dropped += 1;
            return;
        }
        let was_empty = conn.outbuf.is_empty();
        conn.outbuf
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        conn.outbuf.extend_from_slice(&frame);
        if was_empty {
            self.flush(token);
        }
    }

    /// Closes a connection because of something seen on it: an application
    /// connection's close is an input of the core.
    fn close(&mut self, token: Token, why: &str) {
        let is_app = matches!(self.conns.get(&token), Some(Conn::App(_)));
        self.drop_conn(token, why);
        if is_app {
            self.host.app_closed(self.now_ms, conn_id(token));
        }
    }

    /// Forgets a connection and its socket (the core already knows, or is told by
    /// `close`).
    fn drop_conn(&mut self, token: Token, why: &str) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        match conn {
            Conn::Peer(mut peer) => {
                let _ = self.poll.registry().deregister(peer.stream.source());
                self.counters.peer_disconnects += 1;
                if peer.outbound {
                    if let Some(id) = peer.peer {
                        if let Some(outbound) = self.outbound.get_mut(&id) {
                            outbound.token = None;
                            outbound.back_off(Instant::now());
                        }
                    }
                }
                debug!(peer = ?peer.peer, "peer connection closed: {why}");
            }
            Conn::App(mut app) => {
                // Flush what the core said last (a refusal, a detach's answer).
                let stream = &mut app.stream;
                let _ = drain(&mut app.outbuf, |bytes| stream.write(bytes));
                let _ = self.poll.registry().deregister(&mut app.stream);
                debug!(pid = app.pid, "application connection closed: {why}");
            }
            Conn::Exit(session) => {
                if let Some(pidfd) = self.processes.get(&session).and_then(|p| p.pidfd.as_ref()) {
                    let raw = pidfd.as_raw_fd();
                    let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
                }
            }
            Conn::WorkerPipe { .. } | Conn::WorkerExit { .. } => {}
        }
    }

    fn on_peer_readable(&mut self, token: Token) {
        // One buffer for every read (zeroing 64 KiB per wake-up shows in an idle
        // daemon's profile).
        let mut buf = std::mem::take(&mut self.read_buffer);
        buf.resize(64 * 1024, 0);
        self.read_peer(token, &mut buf);
        self.read_buffer = buf;
    }

    fn read_peer(&mut self, token: Token, buf: &mut [u8]) {
        loop {
            let Some(Conn::Peer(conn)) = self.conns.get_mut(&token) else {
                return;
            };
            match conn.stream.read(buf) {
                Ok(0) => return self.close(token, "end of stream"),
                Ok(n) => {
                    if conn.outbound {
                        // Peers never send on a connection we opened.
                        continue;
                    }
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if let Err(why) = self.parse_peer_frames(token) {
                        self.counters.peers_refused += 1;
                        let remote = match self.conns.get(&token) {
                            Some(Conn::Peer(p)) => p.remote.clone(),
                            _ => String::new(),
                        };
                        warn!(from = %remote, "disconnecting peer: {why}");
                        return self.close(token, &why);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // A handshake message may wait for the socket, and a handshake
                    // just finished lets the frames held back go.
                    if conn.stream.wants_write() || !conn.outbuf.is_empty() {
                        self.flush(token);
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::InvalidData => {
                    // TLS refused the peer (no or a wrong certificate, a revoked one,
                    // garbage): nothing it sent reached the core.
                    self.counters.peers_refused += 1;
                    warn!(from = %conn.remote, "refused a peer: {e}");
                    return self.close(token, &e.to_string());
                }
                Err(e) => return self.close(token, &e.to_string()),
            }
        }
    }

    fn parse_peer_frames(&mut self, token: Token) -> Result<(), String> {
        loop {
            let Some(Conn::Peer(conn)) = self.conns.get_mut(&token) else {
                return Ok(());
            };
            if !conn.hello_received {
                if conn.inbuf.len() < PEER_HELLO_BYTES {
                    return Ok(());
                }
                let hello = decode_peer_hello(&conn.inbuf[..PEER_HELLO_BYTES])
                    .map_err(|e| format!("bad hello: {e}"))?;
                let proof = match &conn.stream {
                    PeerStream::Tls(tls) => {
                        PeerProof::Certificate(tls.peer_cert().and_then(|cert| {
                            self.config
                                .peers
                                .iter()
                                .map(|p| p.id)
                                .find(|&id| cert_names_member(cert, id))
                        }))
                    }
                    PeerStream::Unix(_) | PeerStream::Tcp(_) => PeerProof::Unproven,
                };
                let peer = self.host.peer_hello(hello, proof)?;
                let Some(Conn::Peer(conn)) = self.conns.get_mut(&token) else {
                    return Ok(());
                };
                conn.inbuf.drain(..PEER_HELLO_BYTES);
                conn.hello_received = true;
                conn.peer = Some(peer);
                continue;
            }
            if conn.inbuf.len() < 4 {
                return Ok(());
            }
            let len =
                u32::from_le_bytes([conn.inbuf[0], conn.inbuf[1], conn.inbuf[2], conn.inbuf[3]])
                    as usize;
            if len > MAX_FRAME_BYTES {
                return Err(format!("frame of {len} bytes over the limit"));
            }
            if conn.inbuf.len() < 4 + len {
                return Ok(());
            }
            let frame: Vec<u8> = conn.inbuf.drain(..4 + len).skip(4).collect();
            let peer = conn.peer.expect("said hello");
            if !is_background_frame(&frame) {
                self.stay_busy();
            }
            self.host.peer_frame(self.now_ms, peer, &frame)?;
            self.process_actions();
        }
    }

    // ---------------------------------------------------------------------------------
    // Applications.

    fn accept_apps(&mut self) {
        loop {
            let mut stream = match self.app_listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("application accept failed: {e}");
                    return;
                }
            };
            let creds = match rustix::net::sockopt::socket_peercred(stream.as_fd()) {
                Ok(cred) => Credentials {
                    pid: cred.pid.as_raw_nonzero().get(),
                    uid: cred.uid.as_raw(),
                    gid: cred.gid.as_raw(),
                },
                Err(e) => {
                    warn!("refused an application connection: no credentials ({e})");
                    continue;
                }
            };
            let token = self.new_token();
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                token,
                Conn::App(AppConn {
                    stream,
                    inbuf: [0u8; IPC_FRAME_BYTES],
                    inlen: 0,
                    outbuf: Vec::new(),
                    pid: creds.pid,
                    trailer: None,
                }),
            );
            self.host.app_connected(self.now_ms, conn_id(token), creds);
            self.process_actions();
        }
    }

    fn on_readable(&mut self, token: Token) {
        match self.conns.get(&token) {
            Some(Conn::Peer(_)) => self.on_peer_readable(token),
            Some(Conn::App(_)) => self.on_app_readable(token),
            Some(&Conn::Exit(session)) => {
                self.drop_conn(token, "process exited");
                info!(session, "killed process has exited");
                self.host
                    .process_state(self.now_ms, session, ProcessState::Exited);
                self.process_actions();
            }
            Some(&Conn::WorkerPipe { program, stream }) => {
                self.read_worker(program, stream, false);
                self.process_actions();
            }
            Some(&Conn::WorkerExit { program }) => {
                self.worker_exited(program);
                self.process_actions();
            }
            None => {}
        }
    }

    // ---------------------------------------------------------------------------------
    // Worker instances.

    fn start_worker(&mut self, program: ProgramId, spec: &[u8]) {
        let node = self.host.config().node.id;
        let started = workers::start(spec, program, node, &self.config.app_socket);
        let mut worker = match started {
            Ok(worker) => worker,
            Err(reason) => {
                warn!(program, "worker instance refused: {reason}");
                let reason = reason.into_bytes();
                let reason =
                    reason[..reason.len().min(gallocy_core::programs::MAX_REASON_BYTES)].to_vec();
                self.host
                    .worker_event(self.now_ms, program, WorkerEvent::Refused { reason });
                return;
            }
        };
        let pid = worker.child.id();
        info!(program, pid, "worker instance started");
        let mut fds = vec![(worker.pidfd.as_raw_fd(), Conn::WorkerExit { program })];
        if let Some(out) = &worker.stdout {
            fds.push((
                out.as_raw_fd(),
                Conn::WorkerPipe {
                    program,
                    stream: STREAM_STDOUT,
                },
            ));
        }
        if let Some(err) = &worker.stderr {
            fds.push((
                err.as_raw_fd(),
                Conn::WorkerPipe {
                    program,
                    stream: STREAM_STDERR,
                },
            ));
        }
        self.host
            .worker_event(self.now_ms, program, WorkerEvent::Started { pid });
        for (fd, conn) in fds {
            let token = self.new_token();
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
                .is_err()
            {
                // Without its events the instance cannot be served: end it.
                worker.kill();
            }
            self.conns.insert(token, conn);
        }
        self.workers.insert(program, worker);
    }

    /// Reads a worker's output into the core, while the origin keeps up (or all that
    /// is there, once the instance has exited).
    fn read_worker(&mut self, program: ProgramId, stream: u8, all: bool) {
        for _ in 0..64 {
            if !all && self.host.worker_backlog_bytes(program) >= MAX_EVENT_BACKLOG_BYTES {
                self.stalled_workers.insert(program);
                return;
            }
            let Some(worker) = self.workers.get_mut(&program) else {
                return;
            };
            let chunk = match stream {
                STREAM_STDOUT => worker.stdout.as_mut().map(|p| workers::read_chunk(p)),
                _ => worker.stderr.as_mut().map(|p| workers::read_chunk(p)),
            };
            match chunk {
                Some(Chunk::Bytes(bytes)) => {
                    self.host.worker_event(
                        self.now_ms,
                        program,
                        WorkerEvent::Output { stream, bytes },
                    );
                }
                Some(Chunk::Empty) => return,
                Some(Chunk::End) => return self.close_worker_pipe(program, stream),
                None => return,
            }
        }
        // More may be there: come back on the next loop.
        self.stalled_workers.insert(program);
    }

    fn close_worker_pipe(&mut self, program: ProgramId, stream: u8) {
        let Some(worker) = self.workers.get_mut(&program) else {
            return;
        };
        let fd = match stream {
            STREAM_STDOUT => worker.stdout.take().map(OwnedFd::from),
            _ => worker.stderr.take().map(OwnedFd::from),
        };
        if let Some(fd) = fd {
            let raw = fd.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        self.conns
            .retain(|_, c| !matches!(c, Conn::WorkerPipe { program: p, stream: s } if *p == program && *s == stream));
    }

    /// The instance exited: what it wrote before goes first, then its exit.
    fn worker_exited(&mut self, program: ProgramId) {
        for stream in [STREAM_STDOUT, STREAM_STDERR] {
            self.read_worker(program, stream, true);
            self.close_worker_pipe(program, stream);
        }
        let Some(mut worker) = self.workers.remove(&program) else {
            return;
        };
        let raw = worker.pidfd.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        self.conns
            .retain(|_, c| !matches!(c, Conn::WorkerExit { program: p } if *p == program));
        self.stalled_workers.remove(&program);
        let exit = match worker.child.wait() {
            Ok(status) => workers::exit_of(status),
            Err(_) => gallocy_core::programs::WorkerExit::Code(255),
        };
        info!(program, ?exit, "worker instance exited");
        self.host
            .worker_event(self.now_ms, program, WorkerEvent::Exited(exit));
    }

    /// Resumes stalled output and kills workers past their stop grace.
    fn service_workers(&mut self) {
        for program in std::mem::take(&mut self.stalled_workers) {
            self.read_worker(program, STREAM_STDOUT, false);
            self.read_worker(program, STREAM_STDERR, false);
        }
        let now = Instant::now();
        for worker in self.workers.values_mut() {
            if worker.kill_at.is_some_and(|t| t <= now) {
                worker.kill();
                worker.kill_at = None;
            }
        }
        self.process_actions();
    }

    fn on_app_readable(&mut self, token: Token) {
        // Bounded: a connection that keeps sending yields after this many frames.
        for _ in 0..1024 {
            let Some(Conn::App(conn)) = self.conns.get_mut(&token) else {
                return;
            };
            if let Some((request_id, want, bytes)) = &mut conn.trailer {
                let have = bytes.len();
                bytes.resize(*want, 0);
                match conn.stream.read(&mut bytes[have..]) {
                    Ok(0) => {
                        self.close(token, "end of stream in a launch spec");
                        return self.process_actions();
                    }
                    Ok(n) => {
                        bytes.truncate(have + n);
                        if bytes.len() == *want {
                            let request_id = *request_id;
                            let (_, _, spec) = conn.trailer.take().expect("present");
                            self.host
                                .app_launch(self.now_ms, conn_id(token), request_id, spec);
                            self.process_actions();
                        }
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        bytes.truncate(have);
                        return;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        bytes.truncate(have);
                        continue;
                    }
                    Err(e) => {
                        self.close(token, &e.to_string());
                        return self.process_actions();
                    }
                }
            }
            let inlen = conn.inlen;
            match conn.stream.read(&mut conn.inbuf[inlen..]) {
                Ok(0) => {
                    self.close(token, "end of stream");
                    return self.process_actions();
                }
                Ok(n) => {
                    conn.inlen += n;
                    if conn.inlen < IPC_FRAME_BYTES {
                        continue;
                    }
                    conn.inlen = 0;
                    let frame = conn.inbuf;
                    // A launch spec follows its frame: read it before the next frame.
                    if let Ok((request_id, IpcMessage::Launch { spec_len })) =
                        IpcMessage::decode(&frame)
                    {
                        let spec_len = spec_len as usize;
                        if spec_len == 0 || spec_len > MAX_SPEC_BYTES {
                            let frame = frame_of(refusal(ErrorCode::InvalidArgument));
                            self.send_app(token, &frame);
                            self.close(token, "launch spec over its size limit");
                            return self.process_actions();
                        }
                        conn.trailer = Some((request_id, spec_len, Vec::with_capacity(spec_len)));
                        continue;
                    }
                    self.stay_busy();
                    let memory = NodeSpaces(&self.spaces);
                    self.host
                        .app_frame(self.now_ms, conn_id(token), &frame, &memory);
                    self.process_actions();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(token, &e.to_string());
                    return self.process_actions();
                }
            }
        }
    }

    fn send_app(&mut self, token: Token, frame: &Frame) {
        let Some(Conn::App(conn)) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.outbuf.is_empty() {
            match conn.stream.write(frame) {
                Ok(n) if n == IPC_FRAME_BYTES => return,
                Ok(n) => conn.outbuf.extend_from_slice(&frame[n..]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.outbuf.extend_from_slice(frame),
                Err(_) => return self.close(token, "write failed"),
            }
        } else {
            conn.outbuf.extend_from_slice(frame);
        }
        if conn.outbuf.len() > MAX_APP_BUFFER_BYTES {
            return self.close(token, "application does not read its replies");
        }
        let _ = self.poll.registry().reregister(
            &mut conn.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        );
    }

    fn flush(&mut self, token: Token) {
        let result = match self.conns.get_mut(&token) {
            Some(Conn::Peer(conn)) => {
                let stream = &mut conn.stream;
                let mut result = drain(&mut conn.outbuf, |bytes| stream.write(bytes));
                if result.is_ok() {
                    result = stream.push().map_err(|e| e.to_string());
                }
                if result.is_ok() {
                    // While TLS handshakes it takes no more plaintext: waiting for the
                    // socket to be writable then would spin; the handshake goes on
                    // when the peer answers (readable).
                    let more = !conn.outbuf.is_empty() && !conn.stream.handshaking();
                    let interest = if !more && !conn.stream.wants_write() {
                        Interest::READABLE
                    } else {
                        Interest::READABLE | Interest::WRITABLE
                    };
                    let _ = self
                        .poll
                        .registry()
                        .reregister(conn.stream.source(), token, interest);
                    // A link that carried everything, handshake done: it works.
                    if conn.outbound && conn.outbuf.is_empty() && !conn.stream.handshaking() {
                        if let Some(id) = conn.peer {
                            if let Some(o) = self.outbound.get_mut(&id) {
                                o.backoff = RECONNECT_MIN;
                            }
                        }
                    }
                }
                result
            }
            Some(Conn::App(conn)) => {
                let stream = &mut conn.stream;
                let result = drain(&mut conn.outbuf, |bytes| stream.write(bytes));
                if conn.outbuf.is_empty() {
                    let _ = self.poll.registry().reregister(
                        &mut conn.stream,
                        token,
                        Interest::READABLE,
                    );
                }
                result
            }
            Some(Conn::Exit(_) | Conn::WorkerPipe { .. } | Conn::WorkerExit { .. }) | None => {
                Ok(())
            }
        };
        if let Err(why) = result {
            self.close(token, &why);
            self.process_actions();
        }
    }

    // ---------------------------------------------------------------------------------
    // Status.

    fn send_status(&mut self, token: Token, request_id: u64) {
        let json = self.status_json().to_string();
        let mut frame = [0u8; IPC_FRAME_BYTES];
        IpcMessage::StatusReply {
            len_bytes: json.len() as u32,
        }
        .encode(request_id, &mut frame);
        self.send_app(token, &frame);
        if let Some(Conn::App(conn)) = self.conns.get_mut(&token) {
            conn.outbuf.extend_from_slice(json.as_bytes());
        }
        self.flush(token);
    }

    pub fn status_json(&self) -> serde_json::Value {
        use serde_json::json;
        let node = self.host.node();
        let meta = node.meta();
        let members: Vec<_> = meta
            .nodes
            .iter()
            .map(|(&id, status)| {
                let connected = id == self.config.node_id
                    || self.outbound.get(&id).is_some_and(|o| o.token.is_some());
                json!({"id": id, "status": format!("{status:?}").to_lowercase(), "connected": connected})
            })
            .collect();
        let spaces: Vec<_> = meta
            .spaces
            .values()
            .map(|s| {
                let mut chunks: BTreeMap<u64, u64> = BTreeMap::new();
                for (_, record) in meta.chunks.range((s.id, 0)..=(s.id, u64::MAX)) {
                    *chunks.entry(record.lessee).or_default() += 1;
                }
                let attached: Vec<u64> = meta
                    .attached
                    .get(&s.id)
                    .map(|set| set.iter().copied().collect())
                    .unwrap_or_default();
                json!({
                    "id": s.id, "name": s.name, "base": format!("{:#x}", s.base_addr),
                    "size_bytes": s.size_bytes, "chunk_size_bytes": s.chunk_size_bytes,
                    "chunks_per_node": chunks, "attached_nodes": attached,
                    "persistent": meta.persistent.contains(&s.id),
                })
            })
            .collect();
        let (mut read, mut write) = (0u64, 0u64);
        for (_, access) in node.held_pages() {
            match access {
                Access::Read => read += 1,
                Access::Write => write += 1,
                Access::None => {}
            }
        }
        let stats = node.stats();
        let host = self.host.counters();
        json!({
            "node": self.config.node_id,
            "incarnation": self.incarnation,
            "leader": node.leader_id(),
            "is_leader": node.is_leader(),
            "term": node.term(),
            "fenced": node.is_fenced(),
            "evicted": node.is_evicted(),
            // Restarted and not yet applied back up: serves no page until then.
            "rejoining": node.is_rejoining(),
            // Started to join, not yet added: serves nothing until then.
            "joining": node.is_joining(),
            "raft_disk": {"writes": self.raft_disk.writes, "syncs": self.raft_disk.syncs},
            "members": members,
            "spaces": spaces,
            "pages": {"read": read, "write": write, "homed": node.directory_len(), "repairs_pending": node.repairs_pending()},
            "sessions": self.host.session_count(),
            // Spaces this daemon holds memory for (a memfd each).
            "backed_spaces": self.spaces.len(),
            "counters": {
                "faults_local": stats.faults_local,
                "faults_remote": stats.faults_remote,
                "frames_sent": stats.frames_sent,
                "frames_received": stats.frames_received,
                "frames_malformed": stats.frames_malformed,
                "messages_rejected": stats.messages_rejected,
                "messages_other_life": stats.messages_other_life,
                "rejoins": stats.rejoins,
                "membership_changes": stats.membership_changes,
                "syncs": stats.syncs,
                "flushes_sent": stats.flushes_sent,
                "flushes_applied": stats.flushes_applied,
                "backups_sent": stats.backups_sent,
                "backups_kept": stats.backups_kept,
                "pages_repaired": stats.pages_repaired,
                "grants_sent": stats.grants_sent,
                "invalidations_sent": stats.invalidations_sent,
                "recalls_sent": stats.recalls_sent,
                "retries": stats.retries,
                "pages_lost": stats.pages_lost,
                "pages_collected": stats.pages_collected,
                "pages_recovered": stats.pages_recovered,
                "pages_reverted": stats.pages_reverted,
                "allocations": stats.allocations,
                "frees": stats.frees,
                "remote_frees": stats.remote_frees,
                "proposals": stats.proposals,
                "chunks_released": stats.chunks_released,
                "raft_errors": stats.raft_errors,
                "log_compactions": stats.log_compactions,
                "snapshots_installed": stats.snapshots_installed,
                "app_requests": host.app_requests,
                "bad_app_frames": host.bad_app_frames,
                "revocations_sent": host.revocations_sent,
                "processes_killed": host.processes_killed,
                "peer_frames_refused": host.peer_frames_refused,
                "peer_frames_dropped": self.counters.peer_frames_dropped,
                "peer_disconnects": self.counters.peer_disconnects,
                "peers_refused": self.counters.peers_refused,
            },
        })
    }
}

/// An application frame with request id 0.
pub(crate) fn frame_of(message: IpcMessage) -> Frame {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    message.encode(0, &mut frame);
    frame
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable).
fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let now = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
}

/// Whether `/proc/PID/maps` shows a mapping of the file with this inode (the space's
/// memfd; other mappings at the space's addresses are not the space); None if
/// unreadable.
fn maps_inode(pid: i32, inode: u64) -> Option<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    // start-end perms offset dev inode path
    Some(maps.lines().any(|line| {
        line.split_whitespace()
            .nth(4)
            .and_then(|field| field.parse::<u64>().ok())
            == Some(inode)
    }))
}

/// Unix-socket peers are not authenticated: whoever can reach the socket is a member.
/// So the directory of this node's peer socket (made private if missing) and that of
/// every peer socket must be reachable by this user only, and owned by it. Peers'
/// directories are checked again before every connection (one made later by someone
/// else is refused then).
fn check_private_peer_dirs(config: &DaemonConfig) -> Result<(), String> {
    if let PeerAddr::Unix(path) = &config.listen {
        let dir = socket_dir(path);
        if !dir.exists() {
            crate::cluster::create_private_dir(dir)?;
        }
        check_private_socket_dir(path)?;
    }
    for peer in &config.peers {
        if let PeerAddr::Unix(path) = &peer.addr {
            if socket_dir(path).exists() {
                check_private_socket_dir(path)?;
            }
        }
    }
    Ok(())
}

fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The directory of Unix socket `path` is this user's and mode 700 (see above).
fn check_private_socket_dir(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let uid = rustix::process::geteuid().as_raw();
    let dir = socket_dir(path);
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("peer socket directory {}: {e}", dir.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 || meta.uid() != uid {
        return Err(format!(
            "the directory of peer socket {} is mode {mode:o}, owned by uid {}: Unix-socket \
             peers are trusted because only this user (uid {uid}) can reach them, so it \
             must be this user's and mode 700 (chmod 700 {}), or use TCP peers with TLS",
            path.display(),
            meta.uid(),
            dir.display()
        ));
    }
    Ok(())
}

/// Writes as much of `outbuf` as the socket takes now; an error if it is closed.
fn drain(
    outbuf: &mut Vec<u8>,
    mut write: impl FnMut(&[u8]) -> std::io::Result<usize>,
) -> Result<(), String> {
    while !outbuf.is_empty() {
        match write(outbuf) {
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => {
                outbuf.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
