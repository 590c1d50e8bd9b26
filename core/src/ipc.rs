//! The application ⇄ daemon protocol: fixed-size 64-byte frames, versioned, defined
//! once and used by the daemon and by the in-process runtime.
//!
//! Encoding and decoding touch only the caller's stack buffers: no allocation, no
//! formatting, no panics, so the runtime can use them inside malloc and inside a
//! SIGSEGV handler. This module depends on nothing but `core`.
//!
//! Frame: `magic u16 = 0x4741 ("GA") | version u8 | kind u8 | request_id u64 | payload`,
//! little-endian, zero-padded to 64 bytes. An `Error` frame keeps this layout in every
//! version, so a client can always read why it was refused.

pub const IPC_MAGIC: u16 = 0x4741;
pub const IPC_VERSION: u8 = 1;
pub const IPC_FRAME_BYTES: usize = 64;
/// Longest space name, in bytes (the rest of the field is zero).
pub const IPC_NAME_BYTES: usize = 36;
/// Most pages one `Fault` may ask for (a 16 MiB range).
pub const MAX_FAULT_PAGES: u32 = 4096;

pub type Frame = [u8; IPC_FRAME_BYTES];

/// `Hello` flag bits.
const HELLO_CREATE: u8 = 1;
const HELLO_PERSISTENT: u8 = 2;
/// Bits 2..5 of the flags: k for a space this hello creates (0: the daemon's default).
const HELLO_REPLICAS_SHIFT: u8 = 2;
const HELLO_REPLICAS_MASK: u8 = 0b111 << HELLO_REPLICAS_SHIFT;

/// What a connection is for, named in its `Hello`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// The first connection of a process: joins (or creates) the space, receives the
    /// memfd that backs it.
    Main = 1,
    /// Another connection of the same process (one per thread): requests only.
    Thread = 2,
    /// The process's service thread: receives revocations, answers when done.
    Service = 3,
    /// An administrative client (`gallocy status`): requests only, no space.
    Admin = 4,
}

/// Why the daemon refused a request. Codes are stable across versions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorCode {
    VersionMismatch = 1,
    UnknownSpace = 2,
    PermissionDenied = 3,
    BadFrame = 4,
    OutOfMemory = 5,
    InvalidFree = 6,
    NotMapped = 7,
    PageLost = 8,
    NodeDown = 9,
    Evicted = 10,
    Busy = 11,
    InvalidArgument = 12,
    SpaceRejected = 13,
    UnknownSession = 14,
    NotAttached = 15,
    Internal = 16,
    /// The program has no instance on that node (never launched there, or ended).
    NoInstance = 17,
    /// A membership change refused; `detail` is a `meta::MembershipRejection` code.
    MembershipRejected = 18,
}

impl ErrorCode {
    pub fn from_u32(code: u32) -> ErrorCode {
        match code {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::UnknownSpace,
            3 => ErrorCode::PermissionDenied,
            4 => ErrorCode::BadFrame,
            5 => ErrorCode::OutOfMemory,
            6 => ErrorCode::InvalidFree,
            7 => ErrorCode::NotMapped,
            8 => ErrorCode::PageLost,
            9 => ErrorCode::NodeDown,
            10 => ErrorCode::Evicted,
            11 => ErrorCode::Busy,
            12 => ErrorCode::InvalidArgument,
            13 => ErrorCode::SpaceRejected,
            14 => ErrorCode::UnknownSession,
            15 => ErrorCode::NotAttached,
            17 => ErrorCode::NoInstance,
            18 => ErrorCode::MembershipRejected,
            _ => ErrorCode::Internal,
        }
    }

    /// A static description, usable without allocation.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "protocol version mismatch between library and daemon",
            ErrorCode::UnknownSpace => "unknown space",
            ErrorCode::PermissionDenied => "permission denied by the daemon",
            ErrorCode::BadFrame => "malformed request",
            ErrorCode::OutOfMemory => "out of memory in the space",
            ErrorCode::InvalidFree => "invalid free (double free or not an allocated block)",
            ErrorCode::NotMapped => "address is not in any leased chunk of the space",
            ErrorCode::PageLost => "page lost: no copy of it survived the nodes that went down",
            ErrorCode::NodeDown => "the node that owns the block is down",
            ErrorCode::Evicted => "this node was declared down by the cluster",
            ErrorCode::Busy => "daemon busy, retry",
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::SpaceRejected => "space layout rejected",
            ErrorCode::UnknownSession => "unknown session",
            ErrorCode::NotAttached => "not attached to a space",
            ErrorCode::Internal => "internal daemon error",
            ErrorCode::NoInstance => "the program has no instance on that node",
            ErrorCode::MembershipRejected => "membership change refused",
        }
    }
}

/// Counters a process can ask for. `repr(C)`: it is also `struct gallocy_stats` of
/// gallocy.h, so the C API hands it out as it arrives.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IpcStats {
    pub faults_local: u64,
    pub faults_remote: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub allocations: u64,
    pub pages_held: u32,
    pub node_id: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IpcMessage {
    // Application → daemon.
    Hello {
        role: Role,
        /// For `Thread` and `Service`: the session the `Main` connection received.
        session: u64,
        pid: u32,
        /// Create the space with the daemon's default layout if it does not exist.
        create: bool,
        /// With `create`: a space this hello creates stays when its last process has
        /// gone (otherwise it is destroyed on every node then).
        persistent: bool,
        /// With `create`: k, the copies of each page (0: the daemon's default, at most 7
        /// on the wire; the space is refused (SpaceRejected) with more than `types::MAX_REPLICAS`).
        replicas: u8,
        name: [u8; IPC_NAME_BYTES],
    },
    Allocate {
        size_bytes: u64,
        align_bytes: u64,
    },
    Free {
        addr: u64,
    },
    /// `pages` consecutive pages from the one holding `addr` (1 for a plain fault;
    /// more to take a freshly leased range in one round trip).
    Fault {
        addr: u64,
        write: bool,
        pages: u32,
    },
    LeaseChunks {
        count: u32,
    },
    /// Give back `count` chunks from `addr` leased with `LeaseChunks`, holding no live
    /// block: the process touches them no more. Answered `Freed` once the release is in
    /// the log.
    ReleaseChunks {
        addr: u64,
        count: u32,
    },
    Ping,
    Stats,
    RevokeDone {
        token: u64,
    },
    /// The thread that received `Granted` for this page has applied the protection:
    /// the daemon may now send revocations for it (ordering across connections).
    GrantApplied {
        page_addr: u64,
        pages: u32,
    },
    /// Administrative: the daemon answers `StatusReply` followed by that many bytes of
    /// JSON on the same connection.
    Status,
    Detach,
    /// Administrative: the space named `name` is no longer kept when its last process
    /// has gone; it ends then (at once if none is attached). Answer: `Unpersisted`.
    Unpersist {
        name: [u8; IPC_NAME_BYTES],
    },
    /// A distributed `futex(FUTEX_WAIT)`: sleep while the 32-bit word at `addr` (space
    /// memory, 4-aligned) holds `expected`, at most `timeout_ticks` (0: no limit).
    /// Answered `FutexWaitDone` when woken, when the word differs, at the timeout, or
    /// with `NoCopy` when this node holds no copy of the page (touch it and ask again).
    FutexWait {
        addr: u64,
        expected: u32,
        timeout_ticks: u32,
    },
    /// A distributed `futex(FUTEX_WAKE)`: wakes up to `count` waiters on `addr` of
    /// this node, and asks every other live node to do the same. Answered `FutexWoken`
    /// once every one of them answered (or was declared down).
    FutexWake {
        addr: u64,
        count: u32,
    },
    /// From a launcher (`gallocy run`, on an `Admin` connection): followed by
    /// `spec_len` bytes of `programs::WorkerSpec`. The daemon starts a worker instance
    /// on every other member; answered `Launched`, then `WorkerReport`s on this
    /// connection until the program ends.
    Launch {
        spec_len: u32,
    },
    /// From the launcher: the main instance ended; end every worker instance.
    StopProgram {
        program: u64,
    },
    /// On a `Thread` connection of an instance of `program`: this connection runs the
    /// program's threads spawned to this node (`RunThread` frames arrive on it).
    ServeThreads {
        program: u64,
    },
    /// Run a thread of `program` on `node`: its record (start routine, argument, ...)
    /// is at `record_addr` in the space. Answered `ThreadSpawned` once it reached the
    /// instance there.
    SpawnThread {
        program: u64,
        node: u64,
        record_addr: u64,
    },
    /// `gallocy_sync`: every write this process made to the space before it is on k
    /// nodes once answered `Synced` (the daemon flushes every page of its node written
    /// since its last flush).
    Sync,
    /// Administrative: make `node` a member (its daemon was started to join), or
    /// remove it for good. Answered `MembershipChanged` once the change is applied.
    AddMember {
        node: u64,
    },
    RemoveMember {
        node: u64,
    },
    // Daemon → application.
    Launched {
        program: u64,
    },
    MembershipChanged {
        node: u64,
        added: bool,
    },
    Synced,
    /// About the worker instance on `node`; `what` is a `REPORT_*` value, followed by
    /// `len_bytes` of data (output bytes, a refusal reason).
    WorkerReport {
        node: u64,
        what: u8,
        value: u32,
        len_bytes: u32,
    },
    /// To a `ServeThreads` connection: run the thread whose record is at `record_addr`.
    RunThread {
        thread: u64,
        record_addr: u64,
    },
    ThreadSpawned {
        thread: u64,
    },
    /// To a `ServeThreads` connection: the program ended; flush and exit.
    StopThreads,
    Welcome {
        session: u64,
        space: u32,
        node: u32,
        base_addr: u64,
        size_bytes: u64,
        chunk_size_bytes: u64,
        root_size_bytes: u64,
    },
    Allocated {
        addr: u64,
        size_bytes: u64,
    },
    Freed,
    Granted {
        page_addr: u64,
        write: bool,
        pages: u32,
    },
    Leased {
        addr: u64,
        size_bytes: u64,
    },
    Pong,
    StatsReply(IpcStats),
    StatusReply {
        len_bytes: u32,
    },
    /// `destroyed`: no process was attached, and the space is gone.
    Unpersisted {
        destroyed: bool,
    },
    /// To the service thread: lower access to `[addr, addr+len)` to `access`
    /// (0 none, 1 read), then answer `RevokeDone { token }`.
    Revoke {
        addr: u64,
        len: u64,
        access: u8,
        token: u64,
    },
    FutexWaitDone {
        outcome: FutexOutcome,
    },
    /// How many waiters of this node the wake woke (waiters of other nodes are woken by
    /// losing their copy of the page, and not counted).
    FutexWoken {
        woken: u32,
    },
    Error {
        code: ErrorCode,
        /// Extra detail: the daemon's protocol version, a node id, ...
        detail: u64,
    },
}

/// How a `FutexWait` ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FutexOutcome {
    /// A wake, or the node lost its copy of the page (a write elsewhere may have
    /// changed the word): like the kernel's, a waiter must check its condition again.
    Woken = 0,
    /// The word did not hold the expected value (`EAGAIN`).
    ValueChanged = 1,
    TimedOut = 2,
    /// This node holds no valid copy of the page, so the word cannot be compared:
    /// read the word (faulting the page in) and wait again.
    NoCopy = 3,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IpcDecodeError {
    BadMagic,
    /// A frame of another protocol version (its version byte).
    Version(u8),
    UnknownKind(u8),
    Invalid,
}

const KIND_HELLO: u8 = 1;
const KIND_ALLOCATE: u8 = 2;
const KIND_FREE: u8 = 3;
const KIND_FAULT: u8 = 4;
const KIND_LEASE: u8 = 5;
const KIND_PING: u8 = 6;
const KIND_STATS: u8 = 7;
const KIND_REVOKE_DONE: u8 = 8;
const KIND_DETACH: u8 = 9;
const KIND_GRANT_APPLIED: u8 = 10;
const KIND_STATUS: u8 = 11;
const KIND_RELEASE: u8 = 12;
const KIND_UNPERSIST: u8 = 13;
const KIND_FUTEX_WAIT: u8 = 14;
const KIND_FUTEX_WAKE: u8 = 15;
const KIND_LAUNCH: u8 = 16;
const KIND_STOP_PROGRAM: u8 = 17;
const KIND_SERVE_THREADS: u8 = 18;
const KIND_SPAWN_THREAD: u8 = 19;
const KIND_ADD_MEMBER: u8 = 20;
const KIND_REMOVE_MEMBER: u8 = 21;
const KIND_SYNC: u8 = 22;
const KIND_WELCOME: u8 = 65;
const KIND_ALLOCATED: u8 = 66;
const KIND_FREED: u8 = 67;
const KIND_GRANTED: u8 = 68;
const KIND_LEASED: u8 = 69;
const KIND_PONG: u8 = 70;
const KIND_STATS_REPLY: u8 = 71;
const KIND_REVOKE: u8 = 72;
const KIND_STATUS_REPLY: u8 = 73;
const KIND_UNPERSISTED: u8 = 74;
const KIND_FUTEX_WAIT_DONE: u8 = 75;
const KIND_FUTEX_WOKEN: u8 = 76;
const KIND_LAUNCHED: u8 = 77;
const KIND_WORKER_REPORT: u8 = 78;
const KIND_RUN_THREAD: u8 = 79;
const KIND_THREAD_SPAWNED: u8 = 80;
const KIND_STOP_THREADS: u8 = 81;
const KIND_MEMBERSHIP_CHANGED: u8 = 82;
const KIND_SYNCED: u8 = 83;

/// `WorkerReport::what`.
pub const REPORT_STARTED: u8 = 1;
pub const REPORT_REFUSED: u8 = 2;
pub const REPORT_STDOUT: u8 = 3;
pub const REPORT_STDERR: u8 = 4;
pub const REPORT_EXIT_CODE: u8 = 5;
pub const REPORT_EXIT_SIGNAL: u8 = 6;
pub const REPORT_NODE_DOWN: u8 = 7;
const KIND_ERROR: u8 = 0xff;

struct Out<'a> {
    frame: &'a mut Frame,
    offset: usize,
}

impl Out<'_> {
    fn bytes(&mut self, value: &[u8]) {
        self.frame[self.offset..self.offset + value.len()].copy_from_slice(value);
        self.offset += value.len();
    }
    fn u8(&mut self, value: u8) {
        self.bytes(&[value]);
    }
    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }
}

struct In<'a> {
    frame: &'a Frame,
    offset: usize,
}

impl In<'_> {
    fn u8(&mut self) -> u8 {
        let value = self.frame[self.offset];
        self.offset += 1;
        value
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.frame[self.offset..self.offset + 4]);
        self.offset += 4;
        u32::from_le_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.frame[self.offset..self.offset + 8]);
        self.offset += 8;
        u64::from_le_bytes(b)
    }
    fn bool(&mut self) -> Result<bool, IpcDecodeError> {
        match self.u8() {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(IpcDecodeError::Invalid),
        }
    }
}

impl IpcMessage {
    fn kind(&self) -> u8 {
        match self {
            IpcMessage::Hello { .. } => KIND_HELLO,
            IpcMessage::Allocate { .. } => KIND_ALLOCATE,
            IpcMessage::Free { .. } => KIND_FREE,
            IpcMessage::Fault { .. } => KIND_FAULT,
            IpcMessage::LeaseChunks { .. } => KIND_LEASE,
            IpcMessage::ReleaseChunks { .. } => KIND_RELEASE,
            IpcMessage::Ping => KIND_PING,
            IpcMessage::Stats => KIND_STATS,
            IpcMessage::Sync => KIND_SYNC,
            IpcMessage::Synced => KIND_SYNCED,
            IpcMessage::RevokeDone { .. } => KIND_REVOKE_DONE,
            IpcMessage::Detach => KIND_DETACH,
            IpcMessage::GrantApplied { .. } => KIND_GRANT_APPLIED,
            IpcMessage::Status => KIND_STATUS,
            IpcMessage::StatusReply { .. } => KIND_STATUS_REPLY,
            IpcMessage::Unpersist { .. } => KIND_UNPERSIST,
            IpcMessage::Unpersisted { .. } => KIND_UNPERSISTED,
            IpcMessage::FutexWait { .. } => KIND_FUTEX_WAIT,
            IpcMessage::FutexWake { .. } => KIND_FUTEX_WAKE,
            IpcMessage::FutexWaitDone { .. } => KIND_FUTEX_WAIT_DONE,
            IpcMessage::FutexWoken { .. } => KIND_FUTEX_WOKEN,
            IpcMessage::Launch { .. } => KIND_LAUNCH,
            IpcMessage::StopProgram { .. } => KIND_STOP_PROGRAM,
            IpcMessage::AddMember { .. } => KIND_ADD_MEMBER,
            IpcMessage::RemoveMember { .. } => KIND_REMOVE_MEMBER,
            IpcMessage::MembershipChanged { .. } => KIND_MEMBERSHIP_CHANGED,
            IpcMessage::ServeThreads { .. } => KIND_SERVE_THREADS,
            IpcMessage::SpawnThread { .. } => KIND_SPAWN_THREAD,
            IpcMessage::Launched { .. } => KIND_LAUNCHED,
            IpcMessage::WorkerReport { .. } => KIND_WORKER_REPORT,
            IpcMessage::RunThread { .. } => KIND_RUN_THREAD,
            IpcMessage::ThreadSpawned { .. } => KIND_THREAD_SPAWNED,
            IpcMessage::StopThreads => KIND_STOP_THREADS,
            IpcMessage::Welcome { .. } => KIND_WELCOME,
            IpcMessage::Allocated { .. } => KIND_ALLOCATED,
            IpcMessage::Freed => KIND_FREED,
            IpcMessage::Granted { .. } => KIND_GRANTED,
            IpcMessage::Leased { .. } => KIND_LEASED,
            IpcMessage::Pong => KIND_PONG,
            IpcMessage::StatsReply(_) => KIND_STATS_REPLY,
            IpcMessage::Revoke { .. } => KIND_REVOKE,
            IpcMessage::Error { .. } => KIND_ERROR,
        }
    }

    /// Writes the frame for this message; `request_id` is echoed in the reply.
    pub fn encode(&self, request_id: u64, frame: &mut Frame) {
        *frame = [0u8; IPC_FRAME_BYTES];
        let mut out = Out { frame, offset: 0 };
        out.bytes(&IPC_MAGIC.to_le_bytes());
        out.u8(IPC_VERSION);
        out.u8(self.kind());
        out.u64(request_id);
        match *self {
            IpcMessage::Hello {
                role,
                session,
                pid,
                create,
                persistent,
                replicas,
                name,
            } => {
                out.u8(role as u8);
                out.u8(create as u8
                    | (persistent as u8) << 1
                    | (replicas.min(7) << HELLO_REPLICAS_SHIFT) & HELLO_REPLICAS_MASK);
                out.u64(session);
                out.u32(pid);
                out.bytes(&name);
            }
            IpcMessage::Allocate {
                size_bytes,
                align_bytes,
            } => {
                out.u64(size_bytes);
                out.u64(align_bytes);
            }
            IpcMessage::Free { addr } => out.u64(addr),
            IpcMessage::Fault { addr, write, pages } => {
                out.u64(addr);
                out.u8(write as u8);
                out.u32(pages);
            }
            IpcMessage::LeaseChunks { count } => out.u32(count),
            IpcMessage::ReleaseChunks { addr, count } => {
                out.u64(addr);
                out.u32(count);
            }
            IpcMessage::Ping
            | IpcMessage::Stats
            | IpcMessage::Detach
            | IpcMessage::Status
            | IpcMessage::Sync
            | IpcMessage::Synced => {}
            IpcMessage::GrantApplied { page_addr, pages } => {
                out.u64(page_addr);
                out.u32(pages);
            }
            IpcMessage::StatusReply { len_bytes } => out.u32(len_bytes),
            IpcMessage::Unpersist { name } => out.bytes(&name),
            IpcMessage::Unpersisted { destroyed } => out.u8(destroyed as u8),
            IpcMessage::FutexWait {
                addr,
                expected,
                timeout_ticks,
            } => {
                out.u64(addr);
                out.u32(expected);
                out.u32(timeout_ticks);
            }
            IpcMessage::FutexWake { addr, count } => {
                out.u64(addr);
                out.u32(count);
            }
            IpcMessage::FutexWaitDone { outcome } => out.u8(outcome as u8),
            IpcMessage::FutexWoken { woken } => out.u32(woken),
            IpcMessage::Launch { spec_len } => out.u32(spec_len),
            IpcMessage::AddMember { node } | IpcMessage::RemoveMember { node } => out.u64(node),
            IpcMessage::MembershipChanged { node, added } => {
                out.u64(node);
                out.u8(added as u8);
            }
            IpcMessage::StopProgram { program }
            | IpcMessage::ServeThreads { program }
            | IpcMessage::Launched { program } => out.u64(program),
            IpcMessage::SpawnThread {
                program,
                node,
                record_addr,
            } => {
                out.u64(program);
                out.u64(node);
                out.u64(record_addr);
            }
            IpcMessage::WorkerReport {
                node,
                what,
                value,
                len_bytes,
            } => {
                out.u64(node);
                out.u8(what);
                out.u32(value);
                out.u32(len_bytes);
            }
            IpcMessage::RunThread {
                thread,
                record_addr,
            } => {
                out.u64(thread);
                out.u64(record_addr);
            }
            IpcMessage::ThreadSpawned { thread } => out.u64(thread),
            IpcMessage::StopThreads => {}
            IpcMessage::Freed | IpcMessage::Pong => {}
            IpcMessage::RevokeDone { token } => out.u64(token),
            IpcMessage::Welcome {
                session,
                space,
                node,
                base_addr,
                size_bytes,
                chunk_size_bytes,
                root_size_bytes,
            } => {
                out.u64(session);
                out.u32(space);
                out.u32(node);
                out.u64(base_addr);
                out.u64(size_bytes);
                out.u64(chunk_size_bytes);
                out.u64(root_size_bytes);
            }
            IpcMessage::Allocated { addr, size_bytes }
            | IpcMessage::Leased { addr, size_bytes } => {
                out.u64(addr);
                out.u64(size_bytes);
            }
            IpcMessage::Granted {
                page_addr,
                write,
                pages,
            } => {
                out.u64(page_addr);
                out.u8(write as u8);
                out.u32(pages);
            }
            IpcMessage::StatsReply(stats) => {
                out.u64(stats.faults_local);
                out.u64(stats.faults_remote);
                out.u64(stats.frames_sent);
                out.u64(stats.frames_received);
                out.u64(stats.allocations);
                out.u32(stats.pages_held);
                out.u32(stats.node_id);
            }
            IpcMessage::Revoke {
                addr,
                len,
                access,
                token,
            } => {
                out.u64(addr);
                out.u64(len);
                out.u8(access);
                out.u64(token);
            }
            IpcMessage::Error { code, detail } => {
                out.u32(code as u32);
                out.u64(detail);
            }
        }
        debug_assert!(out.offset <= IPC_FRAME_BYTES);
    }

    /// Reads a frame: `(request_id, message)`.
    pub fn decode(frame: &Frame) -> Result<(u64, IpcMessage), IpcDecodeError> {
        let mut r = In { frame, offset: 0 };
        let magic = u16::from_le_bytes([r.u8(), r.u8()]);
        if magic != IPC_MAGIC {
            return Err(IpcDecodeError::BadMagic);
        }
        let version = r.u8();
        let kind = r.u8();
        let request_id = r.u64();
        if kind == KIND_ERROR {
            // Stable in every version.
            let code = ErrorCode::from_u32(r.u32());
            let detail = r.u64();
            return Ok((request_id, IpcMessage::Error { code, detail }));
        }
        if version != IPC_VERSION {
            return Err(IpcDecodeError::Version(version));
        }
        let message = match kind {
            KIND_HELLO => {
                let role = match r.u8() {
                    1 => Role::Main,
                    2 => Role::Thread,
                    3 => Role::Service,
                    4 => Role::Admin,
                    _ => return Err(IpcDecodeError::Invalid),
                };
                let flags = r.u8();
                if flags & !(HELLO_CREATE | HELLO_PERSISTENT | HELLO_REPLICAS_MASK) != 0 {
                    return Err(IpcDecodeError::Invalid);
                }
                let create = flags & HELLO_CREATE != 0;
                let persistent = flags & HELLO_PERSISTENT != 0;
                let replicas = (flags & HELLO_REPLICAS_MASK) >> HELLO_REPLICAS_SHIFT;
                let session = r.u64();
                let pid = r.u32();
                let mut name = [0u8; IPC_NAME_BYTES];
                name.copy_from_slice(&frame[r.offset..r.offset + IPC_NAME_BYTES]);
                IpcMessage::Hello {
                    role,
                    session,
                    pid,
                    create,
                    persistent,
                    replicas,
                    name,
                }
            }
            KIND_ALLOCATE => IpcMessage::Allocate {
                size_bytes: r.u64(),
                align_bytes: r.u64(),
            },
            KIND_FREE => IpcMessage::Free { addr: r.u64() },
            KIND_FAULT => IpcMessage::Fault {
                addr: r.u64(),
                write: r.bool()?,
                pages: r.u32(),
            },
            KIND_LEASE => IpcMessage::LeaseChunks { count: r.u32() },
            KIND_RELEASE => IpcMessage::ReleaseChunks {
                addr: r.u64(),
                count: r.u32(),
            },
            KIND_PING => IpcMessage::Ping,
            KIND_STATS => IpcMessage::Stats,
            KIND_SYNC => IpcMessage::Sync,
            KIND_SYNCED => IpcMessage::Synced,
            KIND_REVOKE_DONE => IpcMessage::RevokeDone { token: r.u64() },
            KIND_DETACH => IpcMessage::Detach,
            KIND_GRANT_APPLIED => IpcMessage::GrantApplied {
                page_addr: r.u64(),
                pages: r.u32(),
            },
            KIND_STATUS => IpcMessage::Status,
            KIND_STATUS_REPLY => IpcMessage::StatusReply { len_bytes: r.u32() },
            KIND_UNPERSIST => {
                let mut name = [0u8; IPC_NAME_BYTES];
                name.copy_from_slice(&frame[r.offset..r.offset + IPC_NAME_BYTES]);
                IpcMessage::Unpersist { name }
            }
            KIND_UNPERSISTED => IpcMessage::Unpersisted {
                destroyed: match r.u8() {
                    0 => false,
                    1 => true,
                    _ => return Err(IpcDecodeError::Invalid),
                },
            },
            KIND_FUTEX_WAIT => IpcMessage::FutexWait {
                addr: r.u64(),
                expected: r.u32(),
                timeout_ticks: r.u32(),
            },
            KIND_FUTEX_WAKE => IpcMessage::FutexWake {
                addr: r.u64(),
                count: r.u32(),
            },
            KIND_FUTEX_WAIT_DONE => IpcMessage::FutexWaitDone {
                outcome: match r.u8() {
                    0 => FutexOutcome::Woken,
                    1 => FutexOutcome::ValueChanged,
                    2 => FutexOutcome::TimedOut,
                    3 => FutexOutcome::NoCopy,
                    _ => return Err(IpcDecodeError::Invalid),
                },
            },
            KIND_FUTEX_WOKEN => IpcMessage::FutexWoken { woken: r.u32() },
            KIND_LAUNCH => IpcMessage::Launch { spec_len: r.u32() },
            KIND_STOP_PROGRAM => IpcMessage::StopProgram { program: r.u64() },
            KIND_ADD_MEMBER => IpcMessage::AddMember { node: r.u64() },
            KIND_REMOVE_MEMBER => IpcMessage::RemoveMember { node: r.u64() },
            KIND_MEMBERSHIP_CHANGED => IpcMessage::MembershipChanged {
                node: r.u64(),
                added: match r.u8() {
                    0 => false,
                    1 => true,
                    _ => return Err(IpcDecodeError::Invalid),
                },
            },
            KIND_SERVE_THREADS => IpcMessage::ServeThreads { program: r.u64() },
            KIND_SPAWN_THREAD => IpcMessage::SpawnThread {
                program: r.u64(),
                node: r.u64(),
                record_addr: r.u64(),
            },
            KIND_LAUNCHED => IpcMessage::Launched { program: r.u64() },
            KIND_WORKER_REPORT => IpcMessage::WorkerReport {
                node: r.u64(),
                what: match r.u8() {
                    w @ REPORT_STARTED..=REPORT_NODE_DOWN => w,
                    _ => return Err(IpcDecodeError::Invalid),
                },
                value: r.u32(),
                len_bytes: r.u32(),
            },
            KIND_RUN_THREAD => IpcMessage::RunThread {
                thread: r.u64(),
                record_addr: r.u64(),
            },
            KIND_THREAD_SPAWNED => IpcMessage::ThreadSpawned { thread: r.u64() },
            KIND_STOP_THREADS => IpcMessage::StopThreads,
            KIND_WELCOME => IpcMessage::Welcome {
                session: r.u64(),
                space: r.u32(),
                node: r.u32(),
                base_addr: r.u64(),
                size_bytes: r.u64(),
                chunk_size_bytes: r.u64(),
                root_size_bytes: r.u64(),
            },
            KIND_ALLOCATED => IpcMessage::Allocated {
                addr: r.u64(),
                size_bytes: r.u64(),
            },
            KIND_FREED => IpcMessage::Freed,
            KIND_GRANTED => IpcMessage::Granted {
                page_addr: r.u64(),
                write: r.bool()?,
                pages: r.u32(),
            },
            KIND_LEASED => IpcMessage::Leased {
                addr: r.u64(),
                size_bytes: r.u64(),
            },
            KIND_PONG => IpcMessage::Pong,
            KIND_STATS_REPLY => IpcMessage::StatsReply(IpcStats {
                faults_local: r.u64(),
                faults_remote: r.u64(),
                frames_sent: r.u64(),
                frames_received: r.u64(),
                allocations: r.u64(),
                pages_held: r.u32(),
                node_id: r.u32(),
            }),
            KIND_REVOKE => IpcMessage::Revoke {
                addr: r.u64(),
                len: r.u64(),
                access: match r.u8() {
                    a @ (0 | 1) => a,
                    _ => return Err(IpcDecodeError::Invalid),
                },
                token: r.u64(),
            },
            other => return Err(IpcDecodeError::UnknownKind(other)),
        };
        Ok((request_id, message))
    }
}

impl IpcMessage {
    /// The hello of an administrative connection (status, unpersist), from `pid`.
    pub fn admin_hello(pid: u32) -> IpcMessage {
        IpcMessage::Hello {
            role: Role::Admin,
            session: 0,
            pid,
            create: false,
            persistent: false,
            replicas: 0,
            name: [0u8; IPC_NAME_BYTES],
        }
    }
}

/// A space name as the fixed field of `Hello`; None if it does not fit or is empty.
pub fn name_field(name: &[u8]) -> Option<[u8; IPC_NAME_BYTES]> {
    if name.is_empty() || name.len() > IPC_NAME_BYTES || name.contains(&0) {
        return None;
    }
    let mut field = [0u8; IPC_NAME_BYTES];
    field[..name.len()].copy_from_slice(name);
    Some(field)
}

/// The name in a `Hello` field (up to the first zero byte).
pub fn name_from_field(field: &[u8; IPC_NAME_BYTES]) -> &[u8] {
    let len = field.iter().position(|&b| b == 0).unwrap_or(IPC_NAME_BYTES);
    &field[..len]
}
