//! `gallocyd`: one single-threaded event loop (mio) that moves bytes between sockets,
//! the memfd of each space, and the sans-IO `gallocy_core::Node`. Every protocol
//! decision is the core's; this file only does I/O and bookkeeping of connections.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gallocy_core::ipc::{
    name_from_field, ErrorCode, Frame, IpcDecodeError, IpcMessage, IpcStats, Role, IPC_FRAME_BYTES,
    IPC_VERSION, MAX_FAULT_PAGES,
};
use gallocy_core::wire::{
    decode_peer_hello, encode_peer_hello, PeerHello, MAX_FRAME_BYTES, PEER_HELLO_BYTES,
};
use gallocy_core::{
    Access, Action, AppError, AppReply, AppRequest, AppToken, Config, Node, NodeId, PageId,
    SpaceId, SpaceLayout, PAGE_SIZE_BYTES,
};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, info, warn};

use crate::config::{DaemonConfig, PeerAddr};
use crate::memory::SpaceMemory;

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
/// Most application connections (each process has a few).
const MAX_APP_CONNECTIONS: usize = 4096;
/// How long an idle loop sleeps between timer checks. Node timers are at least 10 ms
/// (a Raft tick), so 5 ms keeps them on time at 200 wake-ups a second.
const IDLE_WAIT: Duration = Duration::from_millis(5);
/// How long the loop keeps polling without sleeping after the last event.
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
    Tcp(TcpStream),
}

impl PeerStream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            PeerStream::Unix(s) => s,
            PeerStream::Tcp(s) => s,
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Unix(s) => s.read(buf),
            PeerStream::Tcp(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Unix(s) => s.write(buf),
            PeerStream::Tcp(s) => s.write(buf),
        }
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
}

struct AppConn {
    stream: UnixStream,
    inbuf: Frame,
    inlen: usize,
    outbuf: Vec<u8>,
    role: Option<Role>,
    session: Option<u64>,
    pid: i32,
}

enum Conn {
    Peer(PeerConn),
    App(AppConn),
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

struct Session {
    space: SpaceId,
    pid: i32,
    main: Token,
    service: Option<Token>,
    conns: BTreeSet<Token>,
    /// Highest access granted to this process per page (what a revocation must lower),
    /// with the grant's number: a revocation answered after a newer grant of the page
    /// must not lower the record below what that grant gave.
    granted: BTreeMap<u64, (Access, u64)>,
    /// Grants made to this process so far (numbers the entries of `granted`).
    grants_issued: u64,
    /// Grants sent but not yet applied by the faulting thread, per page.
    granting: BTreeMap<u64, u32>,
    /// Revocations held back until the grants in flight for that page are applied.
    deferred: Vec<DeferredRevoke>,
}

impl Session {
    /// The highest access this process may hold on `page_index`, as far as we know.
    fn granted_access(&self, page_index: u64) -> Access {
        self.granted.get(&page_index).map_or(Access::None, |g| g.0)
    }
}

/// A revocation held back behind a grant in flight.
struct DeferredRevoke {
    page_index: u64,
    access: Access,
    /// The node's revocation waiting for it, or 0.
    node_token: u64,
    /// When it was held back: the revocation timeout counts from here.
    since: Instant,
}

/// A revocation sent to a process's service thread, until it answers.
struct ServiceRevoke {
    session: u64,
    page_index: u64,
    access: Access,
    node_token: u64,
    /// The number of the page's latest grant when this was sent.
    grant_number: u64,
    sent_at: Instant,
}

enum Pending {
    Join {
        conn: Token,
        request_id: u64,
        pid: i32,
    },
    Request {
        conn: Token,
        request_id: u64,
    },
    /// One page of a (possibly multi-page) fault.
    FaultPart {
        group: u64,
        page_index: u64,
    },
}

/// A `Fault` of one or more pages, answered once every page is granted.
struct FaultGroup {
    conn: Token,
    request_id: u64,
    session: u64,
    first_page_addr: u64,
    pages: u32,
    write: bool,
    remaining: u32,
    granted: Vec<u64>,
    error: Option<IpcMessage>,
}

struct RevokeWait {
    page: PageId,
    want_bytes: bool,
    waiting: BTreeSet<u64>,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    app_requests: u64,
    peer_frames_dropped: u64,
    peer_disconnects: u64,
    bad_app_frames: u64,
    revocations_sent: u64,
}

pub struct Daemon {
    config: DaemonConfig,
    node: Node,
    poll: Poll,
    started: Instant,
    now_ms: u64,
    conns: BTreeMap<Token, Conn>,
    next_token: usize,
    app_listener: UnixListener,
    peer_listener: PeerListener,
    outbound: BTreeMap<NodeId, Outbound>,
    sessions: BTreeMap<u64, Session>,
    next_session: u64,
    spaces: BTreeMap<SpaceId, SpaceMemory>,
    pending: BTreeMap<AppToken, Pending>,
    next_app_token: u64,
    revokes: BTreeMap<u64, RevokeWait>,
    fault_groups: BTreeMap<u64, FaultGroup>,
    next_fault_group: u64,
    /// Revocations sent to service threads, by service token.
    service_revokes: BTreeMap<u64, ServiceRevoke>,
    next_service_token: u64,
    counters: Counters,
    uid: u32,
    actions: Vec<Action>,
    /// This daemon's start, distinct across restarts (see `PeerHello`).
    incarnation: u64,
    /// The incarnation each peer had when first heard.
    peer_incarnations: BTreeMap<NodeId, u64>,
}

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

impl Daemon {
    pub fn new(config: DaemonConfig) -> Result<Daemon, String> {
        config.validate()?;
        let mut node_config = Config::new(config.node_id, config.members());
        // Real clocks: one tick is one millisecond.
        node_config.retry_base_ticks = 20;
        let node = Node::new(node_config)?;
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
            uid: rustix::process::getuid().as_raw(),
            config,
            node,
            poll,
            started: now,
            now_ms: 0,
            conns: BTreeMap::new(),
            next_token: 2,
            app_listener,
            peer_listener,
            outbound,
            sessions: BTreeMap::new(),
            next_session: 1,
            spaces: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_app_token: 1,
            revokes: BTreeMap::new(),
            fault_groups: BTreeMap::new(),
            next_fault_group: 1,
            service_revokes: BTreeMap::new(),
            next_service_token: 1,
            counters: Counters::default(),
            actions: Vec::new(),
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
            peer_incarnations: BTreeMap::new(),
        })
    }

    /// Runs until SIGTERM/SIGINT.
    pub fn run(&mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        let mut last_event = Instant::now();
        while !SHUTDOWN.load(Ordering::SeqCst) {
            // Poll without sleeping for a short while after activity: a sleeping vCPU
            // takes tens of microseconds to wake on this kind of VM, which would
            // dominate a request's latency. Idle, it sleeps up to IDLE_WAIT; node time is
            // whole milliseconds since start, so one wake-up may advance it several ticks.
            let timeout = if last_event.elapsed() < BUSY_POLL {
                // Other processes (applications, other daemons) may need this CPU.
                std::thread::yield_now();
                Duration::ZERO
            } else {
                IDLE_WAIT
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("epoll_wait", e)),
            }
            if !events.is_empty() {
                last_event = Instant::now();
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
            let now_ms = self.started.elapsed().as_millis() as u64;
            if now_ms > self.now_ms {
                self.now_ms = now_ms;
                self.node.tick(now_ms);
                self.process_actions();
                self.reconnect_due();
                self.stop_unresponsive_processes();
            }
        }
        info!("gallocyd stopping");
        let _ = std::fs::remove_file(&self.config.app_socket);
        if let PeerAddr::Unix(path) = &self.config.listen {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    /// A process that does not apply a revocation in time holds pages other nodes wait
    /// for, and nothing can take them back while it still maps them: it is killed
    /// (SIGKILL, so it cannot touch the pages again), then its session ends and the
    /// revocations complete.
    fn stop_unresponsive_processes(&mut self) {
        let timeout = Duration::from_millis(self.config.revoke_timeout_ms);
        let mut stalled: BTreeSet<u64> = self
            .service_revokes
            .values()
            .filter(|r| r.sent_at.elapsed() > timeout)
            .map(|r| r.session)
            .collect();
        stalled.extend(
            self.sessions
                .iter()
                .filter(|(_, s)| s.deferred.iter().any(|d| d.since.elapsed() > timeout))
                .map(|(&id, _)| id),
        );
        for session in stalled {
            let Some(state) = self.sessions.get(&session) else {
                continue;
            };
            let pid = state.pid;
            warn!(
                pid,
                session,
                "process did not give pages back within {} ms: killing it",
                self.config.revoke_timeout_ms
            );
            if pid > 0 {
                // SAFETY: kill has no memory effects; the pid is the peer of a session
                // socket (SO_PEERCRED) that is still open, so it is that process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let conns: Vec<Token> = state.conns.iter().copied().collect();
            for token in conns {
                self.close(token, "killed: revocation timeout");
            }
            // Closing the main connection ended the session.
            debug_assert!(!self.sessions.contains_key(&session));
        }
    }

    fn new_token(&mut self) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        token
    }

    // ---------------------------------------------------------------------------------
    // Peers.

    fn accept_peers(&mut self) {
        loop {
            let stream = match &self.peer_listener {
                PeerListener::Unix(l) => l.accept().map(|(s, _)| PeerStream::Unix(s)),
                PeerListener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    PeerStream::Tcp(s)
                }),
            };
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("peer accept failed: {e}");
                    return;
                }
            };
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
                }),
            );
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
            PeerAddr::Unix(path) => UnixStream::connect(path).map(PeerStream::Unix),
            PeerAddr::Tcp(addr) => TcpStream::connect(*addr).map(|s| {
                let _ = s.set_nodelay(true);
                PeerStream::Tcp(s)
            }),
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                debug!(peer, "connect failed: {e}");
                outbound.back_off(now);
                return;
            }
        };
        let token = Token(self.next_token);
        self.next_token += 1;
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
            }),
        );
        self.flush(token);
    }

    fn send_peer(&mut self, to: NodeId, frame: Vec<u8>) {
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

    fn close(&mut self, token: Token, why: &str) {
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
                let _ = self.poll.registry().deregister(&mut app.stream);
                if let Some(session) = app.session {
                    self.detach_conn(session, token);
                }
                debug!(pid = app.pid, "application connection closed: {why}");
            }
        }
    }

    fn on_peer_readable(&mut self, token: Token) {
        let mut buf = [0u8; 64 * 1024];
        loop {
            let Some(Conn::Peer(conn)) = self.conns.get_mut(&token) else {
                return;
            };
            match conn.stream.read(&mut buf) {
                Ok(0) => return self.close(token, "end of stream"),
                Ok(n) => {
                    if conn.outbound {
                        // Peers never send on a connection we opened.
                        continue;
                    }
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if let Err(why) = self.parse_peer_frames(token) {
                        warn!("disconnecting peer: {why}");
                        return self.close(token, &why);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
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
                let peer = hello.node;
                if !self.config.peers.iter().any(|p| p.id == peer) || peer == self.config.node_id {
                    return Err(format!("hello from node {peer}, not a member"));
                }
                let known = *self
                    .peer_incarnations
                    .entry(peer)
                    .or_insert(hello.incarnation);
                if known != hello.incarnation {
                    return Err(format!(
                        "node {peer} restarted (incarnation {} after {known}): its Raft state is gone, \
                         and a member that forgets its log could break Raft's safety; give the \
                         restarted daemon a new node id"
                        , hello.incarnation
                    ));
                }
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
            let peer = conn.peer;
            // The envelope's sender (bytes 4..12) must be the node that said hello.
            if let (Some(bytes), Some(peer)) = (frame.get(4..12), peer) {
                let claimed = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
                if claimed != peer {
                    return Err(format!(
                        "node {peer} sent a frame claiming to be from node {claimed}"
                    ));
                }
            }
            if let Err(e) = self.node.handle_frame(self.now_ms, &frame) {
                return Err(format!("malformed frame from node {peer:?}: {e}"));
            }
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
            let app_conns = self
                .conns
                .values()
                .filter(|c| matches!(c, Conn::App(_)))
                .count();
            let cred = rustix::net::sockopt::socket_peercred(stream.as_fd());
            let allowed = match &cred {
                Ok(cred) => {
                    let uid = cred.uid.as_raw();
                    uid == self.uid || uid == 0 || self.config.app_group == Some(cred.gid.as_raw())
                }
                Err(_) => false,
            };
            if !allowed || app_conns >= MAX_APP_CONNECTIONS {
                let mut frame = [0u8; IPC_FRAME_BYTES];
                let code = if allowed {
                    ErrorCode::Busy
                } else {
                    ErrorCode::PermissionDenied
                };
                IpcMessage::Error { code, detail: 0 }.encode(0, &mut frame);
                let _ = stream.write(&frame);
                warn!("refused an application connection: {}", code.describe());
                continue;
            }
            let pid = cred.map(|c| c.pid.as_raw_nonzero().get()).unwrap_or(0);
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
                    role: None,
                    session: None,
                    pid,
                }),
            );
        }
    }

    fn on_readable(&mut self, token: Token) {
        match self.conns.get(&token) {
            Some(Conn::Peer(_)) => self.on_peer_readable(token),
            Some(Conn::App(_)) => self.on_app_readable(token),
            None => {}
        }
    }

    fn on_app_readable(&mut self, token: Token) {
        loop {
            let Some(Conn::App(conn)) = self.conns.get_mut(&token) else {
                return;
            };
            let inlen = conn.inlen;
            match conn.stream.read(&mut conn.inbuf[inlen..]) {
                Ok(0) => return self.close(token, "end of stream"),
                Ok(n) => {
                    conn.inlen += n;
                    if conn.inlen < IPC_FRAME_BYTES {
                        continue;
                    }
                    conn.inlen = 0;
                    let frame = conn.inbuf;
                    match IpcMessage::decode(&frame) {
                        Ok((request_id, message)) => {
                            self.on_app_message(token, request_id, message)
                        }
                        Err(error) => {
                            self.counters.bad_app_frames += 1;
                            let (code, detail) = match error {
                                IpcDecodeError::Version(v) => {
                                    warn!(version = v, "application speaks another IPC version");
                                    (ErrorCode::VersionMismatch, IPC_VERSION as u64)
                                }
                                other => {
                                    warn!("malformed application frame: {other:?}");
                                    (ErrorCode::BadFrame, 0)
                                }
                            };
                            self.reply(token, 0, IpcMessage::Error { code, detail });
                            self.flush(token);
                            return self.close(token, "bad frame");
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return self.close(token, &e.to_string()),
            }
        }
    }

    fn reply(&mut self, token: Token, request_id: u64, message: IpcMessage) {
        let Some(Conn::App(conn)) = self.conns.get_mut(&token) else {
            return;
        };
        let mut frame = [0u8; IPC_FRAME_BYTES];
        message.encode(request_id, &mut frame);
        if conn.outbuf.is_empty() {
            match conn.stream.write(&frame) {
                Ok(n) if n == IPC_FRAME_BYTES => return,
                Ok(n) => conn.outbuf.extend_from_slice(&frame[n..]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.outbuf.extend_from_slice(&frame)
                }
                Err(_) => return self.close(token, "write failed"),
            }
        } else {
            conn.outbuf.extend_from_slice(&frame);
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
                let result = drain(&mut conn.outbuf, |bytes| stream.write(bytes));
                if result.is_ok() {
                    let interest = if conn.outbuf.is_empty() {
                        Interest::READABLE
                    } else {
                        Interest::READABLE | Interest::WRITABLE
                    };
                    let _ = self
                        .poll
                        .registry()
                        .reregister(conn.stream.source(), token, interest);
                    if conn.outbound && conn.outbuf.is_empty() {
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
            None => Ok(()),
        };
        if let Err(why) = result {
            self.close(token, &why);
        }
    }

    fn session_of(&self, token: Token) -> Option<u64> {
        match self.conns.get(&token) {
            Some(Conn::App(conn)) => conn.session,
            _ => None,
        }
    }

    fn on_app_message(&mut self, token: Token, request_id: u64, message: IpcMessage) {
        self.counters.app_requests += 1;
        let (role, pid) = match self.conns.get(&token) {
            Some(Conn::App(conn)) => (conn.role, conn.pid),
            _ => return,
        };
        match (role, message) {
            (
                None,
                IpcMessage::Hello {
                    role: Role::Main,
                    create,
                    name,
                    ..
                },
            ) => {
                let Ok(name) = std::str::from_utf8(name_from_field(&name)) else {
                    return self.reply(token, request_id, refusal(ErrorCode::InvalidArgument));
                };
                let name = name.to_string();
                if let Some(layout) = self.node.meta().space_by_name(&name).cloned() {
                    return self.welcome(token, request_id, pid, layout);
                }
                let request = if create {
                    AppRequest::CreateSpace {
                        name,
                        base_addr: self.config.space.base_addr,
                        size_bytes: self.config.space.size_bytes,
                        chunk_size_bytes: self.config.space.chunk_size_bytes,
                        flexible_base: true,
                    }
                } else {
                    AppRequest::LookupSpace { name }
                };
                self.submit(
                    Pending::Join {
                        conn: token,
                        request_id,
                        pid,
                    },
                    request,
                );
                self.process_actions();
            }
            (
                None,
                IpcMessage::Hello {
                    role: role @ (Role::Thread | Role::Service),
                    session,
                    ..
                },
            ) => {
                let Some(state) = self.sessions.get_mut(&session) else {
                    return self.reply(token, request_id, refusal(ErrorCode::UnknownSession));
                };
                if state.pid != pid {
                    return self.reply(token, request_id, refusal(ErrorCode::PermissionDenied));
                }
                state.conns.insert(token);
                if role == Role::Service {
                    state.service = Some(token);
                }
                if let Some(Conn::App(conn)) = self.conns.get_mut(&token) {
                    conn.role = Some(role);
                    conn.session = Some(session);
                }
                self.reply(token, request_id, IpcMessage::Pong);
            }
            (
                None,
                IpcMessage::Hello {
                    role: Role::Admin, ..
                },
            ) => {
                if let Some(Conn::App(conn)) = self.conns.get_mut(&token) {
                    conn.role = Some(Role::Admin);
                }
                self.reply(token, request_id, IpcMessage::Pong);
            }
            (_, IpcMessage::Ping) => self.reply(token, request_id, IpcMessage::Pong),
            (Some(_), IpcMessage::Stats) => {
                let stats = self.node.stats();
                let reply = IpcMessage::StatsReply(IpcStats {
                    faults_local: stats.faults_local,
                    faults_remote: stats.faults_remote,
                    frames_sent: stats.frames_sent,
                    frames_received: stats.frames_received,
                    allocations: stats.allocations,
                    pages_held: self.node.held_pages().count() as u32,
                    node_id: self.config.node_id as u32,
                });
                self.reply(token, request_id, reply);
            }
            (Some(_), IpcMessage::Status) => self.send_status(token, request_id),
            (
                Some(_),
                IpcMessage::RevokeDone {
                    token: service_token,
                },
            ) => {
                // Only the session the revocation went to may answer it.
                let sent_to = self.service_revokes.get(&service_token).map(|r| r.session);
                if sent_to.is_some() && sent_to == self.session_of(token) {
                    self.on_revoke_done(service_token);
                }
            }
            (Some(_), IpcMessage::GrantApplied { page_addr, pages }) => {
                if let Some(session) = self.session_of(token) {
                    for i in 0..pages.min(MAX_FAULT_PAGES) as u64 {
                        self.on_grant_applied(session, page_addr + i * PAGE_SIZE_BYTES as u64);
                    }
                }
            }
            (
                Some(Role::Main | Role::Thread | Role::Service),
                IpcMessage::Fault { addr, write, pages },
            ) => {
                self.fault_range(token, request_id, addr, write, pages);
            }
            (Some(Role::Main | Role::Thread | Role::Service), request) => {
                let Some(session) = self.session_of(token) else {
                    return self.reply(token, request_id, refusal(ErrorCode::NotAttached));
                };
                let space = self.sessions[&session].space;
                let request = match request {
                    IpcMessage::Allocate {
                        size_bytes,
                        align_bytes,
                    } => AppRequest::Allocate {
                        space,
                        size_bytes,
                        align_bytes,
                    },
                    IpcMessage::Free { addr } => AppRequest::Free { space, addr },
                    IpcMessage::LeaseChunks { count } => AppRequest::LeaseChunks { space, count },
                    IpcMessage::Detach => {
                        self.reply(token, request_id, IpcMessage::Pong);
                        self.flush(token);
                        return self.close(token, "detached");
                    }
                    _ => return self.reply(token, request_id, refusal(ErrorCode::BadFrame)),
                };
                self.submit(
                    Pending::Request {
                        conn: token,
                        request_id,
                    },
                    request,
                );
                self.process_actions();
            }
            _ => self.reply(token, request_id, refusal(ErrorCode::NotAttached)),
        }
    }

    fn fault_range(&mut self, token: Token, request_id: u64, addr: u64, write: bool, pages: u32) {
        let Some(session) = self.session_of(token) else {
            return self.reply(token, request_id, refusal(ErrorCode::NotAttached));
        };
        let state = &self.sessions[&session];
        if state.service.is_none() {
            return self.reply(token, request_id, refusal(ErrorCode::NotAttached));
        }
        let space = state.space;
        let Some(layout) = self.node.meta().spaces.get(&space) else {
            return self.reply(token, request_id, refusal(ErrorCode::UnknownSpace));
        };
        let Some(first) = layout.page_of(addr) else {
            return self.reply(token, request_id, refusal(ErrorCode::InvalidArgument));
        };
        if pages == 0 || pages > MAX_FAULT_PAGES || first.index + pages as u64 > layout.page_count()
        {
            return self.reply(token, request_id, refusal(ErrorCode::InvalidArgument));
        }
        let first_page_addr = layout.page_addr(first.index);
        let group = self.next_fault_group;
        self.next_fault_group += 1;
        self.fault_groups.insert(
            group,
            FaultGroup {
                conn: token,
                request_id,
                session,
                first_page_addr,
                pages,
                write,
                remaining: pages,
                granted: Vec::new(),
                error: None,
            },
        );
        let access = if write { Access::Write } else { Access::Read };
        for i in 0..pages as u64 {
            let addr = first_page_addr + i * PAGE_SIZE_BYTES as u64;
            self.submit(
                Pending::FaultPart {
                    group,
                    page_index: first.index + i,
                },
                AppRequest::Fault {
                    space,
                    addr,
                    access,
                },
            );
        }
        self.process_actions();
    }

    fn fault_part_done(&mut self, group_id: u64, page_index: u64, reply: AppReply) {
        let Some(group) = self.fault_groups.get_mut(&group_id) else {
            return;
        };
        group.remaining -= 1;
        match reply {
            AppReply::Granted { access, .. } if access != Access::None => {
                if let Some(state) = self.sessions.get_mut(&group.session) {
                    state.grants_issued += 1;
                    let number = state.grants_issued;
                    let granted = state.granted.entry(page_index).or_insert((Access::None, 0));
                    *granted = (granted.0.max(access), number);
                    *state.granting.entry(page_index).or_insert(0) += 1;
                    group.granted.push(page_index);
                }
            }
            AppReply::Error(e) => {
                group.error.get_or_insert(error_message(e));
            }
            _ => {
                group.error.get_or_insert(refusal(ErrorCode::Internal));
            }
        }
        if group.remaining > 0 {
            return;
        }
        let group = self.fault_groups.remove(&group_id).expect("present");
        match group.error {
            Some(error) => {
                // The process will not apply these grants: release their hold on
                // revocations.
                let space = self.sessions.get(&group.session).map(|s| s.space);
                if let Some(layout) = space.and_then(|s| self.node.meta().spaces.get(&s)) {
                    let addrs: Vec<u64> =
                        group.granted.iter().map(|&i| layout.page_addr(i)).collect();
                    for addr in addrs {
                        self.on_grant_applied(group.session, addr);
                    }
                }
                self.reply(group.conn, group.request_id, error);
            }
            None => self.reply(
                group.conn,
                group.request_id,
                IpcMessage::Granted {
                    page_addr: group.first_page_addr,
                    write: group.write,
                    pages: group.pages,
                },
            ),
        }
    }

    /// Hands `request` to the node, remembering what to do with its reply.
    fn submit(&mut self, pending: Pending, request: AppRequest) {
        let app_token = self.next_app_token;
        self.next_app_token += 1;
        self.pending.insert(app_token, pending);
        self.node.handle_request(self.now_ms, app_token, request);
    }

    fn welcome(&mut self, token: Token, request_id: u64, pid: i32, layout: SpaceLayout) {
        match self.conns.get(&token) {
            Some(Conn::App(conn)) if conn.session.is_none() => {}
            // A second Main hello on one connection: one connection, one session.
            Some(Conn::App(_)) => {
                return self.reply(token, request_id, refusal(ErrorCode::BadFrame))
            }
            _ => return,
        }
        if self.space_memory(layout.id).is_none() {
            warn!("cannot back space {}", layout.name);
            return self.reply(token, request_id, refusal(ErrorCode::Internal));
        }
        let session = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            session,
            Session {
                space: layout.id,
                pid,
                main: token,
                service: None,
                conns: BTreeSet::from([token]),
                granted: BTreeMap::new(),
                grants_issued: 0,
                granting: BTreeMap::new(),
                deferred: Vec::new(),
            },
        );
        let Some(Conn::App(conn)) = self.conns.get_mut(&token) else {
            unreachable!("checked above");
        };
        conn.role = Some(Role::Main);
        conn.session = Some(session);
        let mut frame = [0u8; IPC_FRAME_BYTES];
        IpcMessage::Welcome {
            session,
            space: layout.id,
            node: self.config.node_id as u32,
            base_addr: layout.base_addr,
            size_bytes: layout.size_bytes,
            chunk_size_bytes: layout.chunk_size_bytes,
            root_size_bytes: layout.root_size_bytes,
        }
        .encode(request_id, &mut frame);
        let memory = &self.spaces[&layout.id];
        let fds = [memory.fd()];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            conn.stream.as_fd(),
            &[IoSlice::new(&frame)],
            &mut control,
            rustix::net::SendFlags::NOSIGNAL,
        );
        info!(pid, space = %layout.name, session, "process attached");
        if !matches!(sent, Ok(n) if n == IPC_FRAME_BYTES) {
            self.close(token, "could not send the space memfd");
        }
    }

    fn detach_conn(&mut self, session_id: u64, token: Token) {
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return;
        };
        session.conns.remove(&token);
        if session.service == Some(token) {
            session.service = None;
        }
        if session.main != token && !session.conns.is_empty() {
            return;
        }
        // The process is gone (its main connection closed): it holds no access any more.
        let session = self.sessions.remove(&session_id).expect("present");
        for other in session.conns {
            if let Some(Conn::App(conn)) = self.conns.get_mut(&other) {
                conn.session = None;
            }
        }
        info!(pid = session.pid, session = session_id, "process detached");
        let tokens: Vec<u64> = self
            .service_revokes
            .iter()
            .filter(|(_, r)| r.session == session_id)
            .map(|(&t, _)| t)
            .collect();
        for token in tokens {
            self.on_revoke_done(token);
        }
        let waits: Vec<u64> = self
            .revokes
            .iter()
            .filter(|(_, w)| w.waiting.contains(&session_id))
            .map(|(&t, _)| t)
            .collect();
        for node_token in waits {
            self.revoke_progress(node_token, session_id);
        }
    }

    // ---------------------------------------------------------------------------------
    // The core's actions.

    fn process_actions(&mut self) {
        // Bounded: each round drains what the previous inputs produced.
        for _ in 0..1024 {
            let mut actions = std::mem::take(&mut self.actions);
            self.node.drain_actions(&mut actions);
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

    fn apply(&mut self, action: Action) {
        match action {
            Action::Send(envelope) => {
                let to = envelope.to;
                self.send_peer(to, envelope.encode());
            }
            Action::Reply { token, reply } => self.on_core_reply(token, reply),
            Action::Install { page, bytes, .. } => {
                if let Some(bytes) = bytes {
                    if let Some(memory) = self.space_memory(page.space) {
                        memory.write_page(page.index, &bytes);
                    }
                }
                // Raising access needs nothing here: each process faults and gets it.
            }
            Action::SetAccess { page, access } => self.lower(page, access, None),
            Action::Revoke {
                page,
                access,
                token,
                want_bytes,
            } => self.lower(page, access, Some((token, want_bytes))),
        }
    }

    fn space_memory(&mut self, space: SpaceId) -> Option<&SpaceMemory> {
        if !self.spaces.contains_key(&space) {
            let layout = self.node.meta().spaces.get(&space)?.clone();
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

    fn on_core_reply(&mut self, app_token: AppToken, reply: AppReply) {
        let Some(pending) = self.pending.remove(&app_token) else {
            return;
        };
        match pending {
            Pending::FaultPart { group, page_index } => {
                self.fault_part_done(group, page_index, reply)
            }
            Pending::Join {
                conn,
                request_id,
                pid,
            } => match reply {
                AppReply::Space(layout) => self.welcome(conn, request_id, pid, layout),
                AppReply::Error(e) => self.reply(conn, request_id, error_message(e)),
                _ => self.reply(conn, request_id, refusal(ErrorCode::Internal)),
            },
            Pending::Request { conn, request_id } => {
                let message = match reply {
                    AppReply::Allocated { addr, size_bytes } => {
                        IpcMessage::Allocated { addr, size_bytes }
                    }
                    AppReply::Freed => IpcMessage::Freed,
                    AppReply::Leased { addr, size_bytes } => {
                        IpcMessage::Leased { addr, size_bytes }
                    }
                    AppReply::Granted { .. } => refusal(ErrorCode::Internal),
                    AppReply::Error(e) => error_message(e),
                    AppReply::Space(_) => refusal(ErrorCode::Internal),
                };
                self.reply(conn, request_id, message);
            }
        }
    }

    /// Lowers every attached process's access to `page` to `access`. With `wait`, the
    /// core is told (with the bytes if asked) once all of them have done it.
    fn lower(&mut self, page: PageId, access: Access, wait: Option<(u64, bool)>) {
        let targets: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.space == page.space && s.granted_access(page.index) > access)
            .map(|(&id, _)| id)
            .collect();
        let node_token = wait.map_or(0, |(token, _)| token);
        if let Some((token, want_bytes)) = wait {
            self.revokes.insert(
                token,
                RevokeWait {
                    page,
                    want_bytes,
                    waiting: targets.iter().copied().collect(),
                },
            );
        }
        for &session in &targets {
            let state = self.sessions.get_mut(&session).expect("listed");
            if state.granting.get(&page.index).copied().unwrap_or(0) > 0 {
                state.deferred.push(DeferredRevoke {
                    page_index: page.index,
                    access,
                    node_token,
                    since: Instant::now(),
                });
            } else {
                self.send_revoke(session, page.index, access, node_token);
            }
        }
        if let Some((token, _)) = wait {
            if targets.is_empty() {
                self.finish_revoke(token);
            }
        }
    }

    fn send_revoke(&mut self, session: u64, page_index: u64, access: Access, node_token: u64) {
        let state = &self.sessions[&session];
        let Some(service) = state.service else {
            // No service thread: the process cannot hold access; nothing to lower.
            if node_token != 0 {
                self.revoke_progress(node_token, session);
            }
            return;
        };
        let layout = &self.node.meta().spaces[&state.space];
        let addr = layout.page_addr(page_index);
        let grant_number = state.granted.get(&page_index).map_or(0, |g| g.1);
        let service_token = self.next_service_token;
        self.next_service_token += 1;
        self.service_revokes.insert(
            service_token,
            ServiceRevoke {
                session,
                page_index,
                access,
                node_token,
                grant_number,
                sent_at: Instant::now(),
            },
        );
        self.counters.revocations_sent += 1;
        self.reply(
            service,
            0,
            IpcMessage::Revoke {
                addr,
                len: PAGE_SIZE_BYTES as u64,
                access: access as u8,
                token: service_token,
            },
        );
    }

    fn on_grant_applied(&mut self, session: u64, page_addr: u64) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(layout) = self.node.meta().spaces.get(&state.space) else {
            return;
        };
        let Some(page) = layout.page_of(page_addr) else {
            return;
        };
        let count = state.granting.entry(page.index).or_insert(0);
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        state.granting.remove(&page.index);
        let (ready, rest): (Vec<_>, Vec<_>) = state
            .deferred
            .drain(..)
            .partition(|d| d.page_index == page.index);
        state.deferred = rest;
        for DeferredRevoke {
            page_index: index,
            access,
            node_token,
            ..
        } in ready
        {
            let still_above = self.sessions[&session].granted_access(index) > access;
            if still_above {
                self.send_revoke(session, index, access, node_token);
            } else if node_token != 0 {
                self.revoke_progress(node_token, session);
            }
        }
    }

    fn on_revoke_done(&mut self, service_token: u64) {
        let Some(ServiceRevoke {
            session,
            page_index,
            access,
            node_token,
            grant_number,
            ..
        }) = self.service_revokes.remove(&service_token)
        else {
            return;
        };
        if let Some(state) = self.sessions.get_mut(&session) {
            if let Some(granted) = state.granted.get_mut(&page_index) {
                // A grant after the revocation was sent may have raised the access
                // again (its mprotect can land after the revocation's).
                if granted.1 <= grant_number {
                    granted.0 = granted.0.min(access);
                }
            }
        }
        if node_token != 0 {
            self.revoke_progress(node_token, session);
        }
    }

    fn revoke_progress(&mut self, node_token: u64, session: u64) {
        let Some(wait) = self.revokes.get_mut(&node_token) else {
            return;
        };
        wait.waiting.remove(&session);
        if wait.waiting.is_empty() {
            self.finish_revoke(node_token);
        }
    }

    fn finish_revoke(&mut self, node_token: u64) {
        let Some(wait) = self.revokes.remove(&node_token) else {
            return;
        };
        let bytes = if wait.want_bytes {
            self.space_memory(wait.page.space)
                .and_then(|m| m.read_page(wait.page.index))
        } else {
            None
        };
        self.node.handle_revoke_done(self.now_ms, node_token, bytes);
        self.process_actions();
    }

    // ---------------------------------------------------------------------------------
    // Status.

    fn send_status(&mut self, token: Token, request_id: u64) {
        let json = self.status_json().to_string();
        self.reply(
            token,
            request_id,
            IpcMessage::StatusReply {
                len_bytes: json.len() as u32,
            },
        );
        if let Some(Conn::App(conn)) = self.conns.get_mut(&token) {
            conn.outbuf.extend_from_slice(json.as_bytes());
        }
        self.flush(token);
    }

    pub fn status_json(&self) -> serde_json::Value {
        use serde_json::json;
        let meta = self.node.meta();
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
                json!({
                    "id": s.id, "name": s.name, "base": format!("{:#x}", s.base_addr),
                    "size_bytes": s.size_bytes, "chunk_size_bytes": s.chunk_size_bytes,
                    "chunks_per_node": chunks,
                })
            })
            .collect();
        let (mut read, mut write) = (0u64, 0u64);
        for (_, access) in self.node.held_pages() {
            match access {
                Access::Read => read += 1,
                Access::Write => write += 1,
                Access::None => {}
            }
        }
        let stats = self.node.stats();
        json!({
            "node": self.config.node_id,
            "incarnation": self.incarnation,
            "leader": self.node.leader_id(),
            "is_leader": self.node.is_leader(),
            "term": self.node.term(),
            "fenced": self.node.is_fenced(),
            "evicted": self.node.is_evicted(),
            "members": members,
            "spaces": spaces,
            "pages": {"read": read, "write": write, "homed": self.node.directory_len()},
            "sessions": self.sessions.len(),
            "counters": {
                "faults_local": stats.faults_local,
                "faults_remote": stats.faults_remote,
                "frames_sent": stats.frames_sent,
                "frames_received": stats.frames_received,
                "frames_malformed": stats.frames_malformed,
                "messages_rejected": stats.messages_rejected,
                "grants_sent": stats.grants_sent,
                "invalidations_sent": stats.invalidations_sent,
                "recalls_sent": stats.recalls_sent,
                "retries": stats.retries,
                "pages_lost": stats.pages_lost,
                "allocations": stats.allocations,
                "frees": stats.frees,
                "remote_frees": stats.remote_frees,
                "proposals": stats.proposals,
                "app_requests": self.counters.app_requests,
                "bad_app_frames": self.counters.bad_app_frames,
                "revocations_sent": self.counters.revocations_sent,
                "peer_frames_dropped": self.counters.peer_frames_dropped,
                "peer_disconnects": self.counters.peer_disconnects,
            },
        })
    }
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

/// A refusal with no detail.
fn refusal(code: ErrorCode) -> IpcMessage {
    IpcMessage::Error { code, detail: 0 }
}

fn error_message(error: AppError) -> IpcMessage {
    let (code, detail) = match error {
        AppError::UnknownSpace => (ErrorCode::UnknownSpace, 0),
        AppError::SpaceRejected(_) => (ErrorCode::SpaceRejected, 0),
        AppError::InvalidArgument(_) => (ErrorCode::InvalidArgument, 0),
        AppError::OutOfMemory => (ErrorCode::OutOfMemory, 0),
        AppError::InvalidFree => (ErrorCode::InvalidFree, 0),
        AppError::NotMapped => (ErrorCode::NotMapped, 0),
        AppError::PageLost => (ErrorCode::PageLost, 0),
        AppError::NodeDown(node) => (ErrorCode::NodeDown, node),
        AppError::Evicted => (ErrorCode::Evicted, 0),
        AppError::Busy => (ErrorCode::Busy, 0),
    };
    IpcMessage::Error { code, detail }
}
