//! Harnesses that feed arbitrary bytes to the decoders and to running hosts, shared by
//! the coverage-guided fuzz targets (`core/fuzz`, `cargo fuzz`) and the property tests
//! (`proptests/tests/hostile.rs`). Each returns normally for any input; a panic is a
//! bug: no input from outside may crash a daemon.

#![allow(clippy::field_reassign_with_default)]

use std::collections::{BTreeMap, VecDeque};

use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType, Message as RaftMessage, MessageType};

use crate::futex::FutexMessage;
use crate::host::{ConnId, Credentials, Host, HostAction, HostConfig, ProcessState, SessionId};
use crate::ipc::{IpcMessage, Role, IPC_FRAME_BYTES, IPC_NAME_BYTES};
use crate::meta::{Command, Proposal, FIRST_INCARNATION};
use crate::node::Config;
use crate::programs::{ProgramMessage, SpawnOutcome, WorkerEvent, WorkerExit, WorkerSpec};
use crate::types::{Access, PageBytes, PageId, PAGE_SIZE_BYTES};
use crate::wire::{
    decode_peer_hello, BackupCopy, CopyReport, Envelope, FreeOutcome, PageDenial, PeerHello,
    PeerMessage, FINAL_CONTENTS,
};

const SPACE_BASE_ADDR: u64 = 0x1000_0000_0000;
const SPACE_SIZE_BYTES: u64 = 64 << 20;
const CHUNK_SIZE_BYTES: u64 = 64 << 10;
/// Most steps one input drives (inputs are cut, not rejected).
const MAX_STEPS: usize = 2048;
/// Most frames in flight between the two hosts.
const MAX_IN_FLIGHT: usize = 4096;

/// Reads fuzz bytes as numbers; zeroes once they run out.
struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    /// Up to 255 bytes, length first.
    fn blob(&mut self) -> Vec<u8> {
        let len = self.u8() as usize;
        self.take(len).to_vec()
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// A number that is often interesting: small, a boundary, or anything.
    fn number(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => 0,
            1 => self.u8() as u64,
            2 => u64::MAX - self.u8() as u64,
            3 => 1u64 << (self.u8() % 64),
            4 => u32::MAX as u64,
            _ => self.u64(),
        }
    }
    /// An address: inside the space most of the time.
    fn addr(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => self.number(),
            _ => {
                SPACE_BASE_ADDR
                    + (self.u16() as u64 % 4096) * PAGE_SIZE_BYTES as u64
                    + (self.u8() as u64 % 8) * 8
            }
        }
    }
}

/// Decodes arbitrary bytes as a peer frame, a peer hello and a Raft entry; whatever
/// decodes must encode back to something that decodes the same.
pub fn peer_frame(data: &[u8]) {
    if let Ok(envelope) = Envelope::decode(data) {
        let again = Envelope::decode(&envelope.encode()).expect("an encoded envelope decodes");
        assert_eq!(again, envelope);
    }
    let _ = decode_peer_hello(data);
    if let Ok(proposal) = Proposal::decode(data) {
        assert_eq!(Proposal::decode(&proposal.encode()).ok(), Some(proposal));
    }
}

/// Decodes arbitrary bytes as application frames; whatever decodes round-trips.
pub fn ipc_frame(data: &[u8]) {
    for chunk in data.chunks(IPC_FRAME_BYTES) {
        let mut frame = [0u8; IPC_FRAME_BYTES];
        frame[..chunk.len()].copy_from_slice(chunk);
        if let Ok((request_id, message)) = IpcMessage::decode(&frame) {
            let mut again = [0u8; IPC_FRAME_BYTES];
            message.encode(request_id, &mut again);
            assert_eq!(IpcMessage::decode(&again), Ok((request_id, message)));
        }
    }
}

struct Harness {
    hosts: [Host; 2],
    now: u64,
    /// Frames in flight: (to host index, bytes from member `from`).
    network: VecDeque<(usize, u64, Vec<u8>)>,
    conns: [Vec<ConnId>; 2],
    next_conn: ConnId,
    /// Sessions the hosts asked about (Probe or Kill), to answer later.
    asked: Vec<(usize, SessionId)>,
    /// Worker instances the hosts asked to start: (host, program).
    workers: Vec<(usize, u64)>,
    actions: Vec<HostAction>,
    /// Each host's memory as its `WritePage`s left it (futex words are read from it).
    memory: [BTreeMap<PageId, Box<PageBytes>>; 2],
}

impl Harness {
    fn new() -> Harness {
        let host = |id| {
            let mut config = HostConfig::new(Config::new(id, vec![1, 2]));
            config.space_base_addr = SPACE_BASE_ADDR;
            config.space_size_bytes = SPACE_SIZE_BYTES;
            config.space_chunk_size_bytes = CHUNK_SIZE_BYTES;
            Host::new(config).expect("valid configuration")
        };
        Harness {
            hosts: [host(1), host(2)],
            now: 0,
            network: VecDeque::new(),
            conns: [Vec::new(), Vec::new()],
            next_conn: 1,
            asked: Vec::new(),
            workers: Vec::new(),
            actions: Vec::new(),
            memory: [BTreeMap::new(), BTreeMap::new()],
        }
    }

    fn drain(&mut self, h: usize) {
        for _ in 0..64 {
            let mut actions = std::mem::take(&mut self.actions);
            self.hosts[h].drain_actions(&mut actions);
            if actions.is_empty() {
                self.actions = actions;
                return;
            }
            for action in actions.drain(..) {
                match action {
                    HostAction::SendPeer(envelope) => {
                        let to = (envelope.to as usize).wrapping_sub(1);
                        if to < 2 && self.network.len() < MAX_IN_FLIGHT {
                            self.network
                                .push_back((to, envelope.from, envelope.encode()));
                        }
                    }
                    HostAction::CloseApp { conn, .. } => self.conns[h].retain(|&c| c != conn),
                    HostAction::FinishRevoke {
                        token, want_bytes, ..
                    } => {
                        let bytes = want_bytes.then(|| Box::new([7u8; PAGE_SIZE_BYTES]));
                        self.hosts[h].revoke_finished(self.now, token, bytes);
                    }
                    HostAction::DropPages { token, .. } => {
                        self.hosts[h].pages_dropped(self.now, token);
                    }
                    HostAction::WritePage { page, bytes } => {
                        // Bounded: a futex compare needs only a few pages' words.
                        if self.memory[h].len() < 64 {
                            self.memory[h].insert(page, bytes);
                        }
                    }
                    HostAction::Probe { session, .. } | HostAction::Kill { session, .. } => {
                        if self.asked.len() < 256 {
                            self.asked.push((h, session));
                        }
                    }
                    HostAction::StartWorker { program, .. } => {
                        if self.workers.len() < 64 {
                            self.workers.push((h, program));
                        }
                    }
                    HostAction::SendApp { .. }
                    | HostAction::SendAppData { .. }
                    | HostAction::StopWorker { .. }
                    | HostAction::Welcome { .. }
                    | HostAction::Status { .. }
                    | HostAction::SessionEnded { .. }
                    | HostAction::DropSpace { .. }
                    | HostAction::PersistRaft(_) => {}
                }
            }
            self.actions = actions;
        }
    }

    fn deliver(&mut self, count: usize, drop_mask: u8) {
        for i in 0..count {
            let Some((to, from, bytes)) = self.network.pop_front() else {
                return;
            };
            if drop_mask & (1 << (i % 8)) != 0 {
                continue;
            }
            let _ = self.hosts[to].peer_frame(self.now, from, &bytes);
            self.drain(to);
        }
    }

    fn app_message(r: &mut Bytes<'_>) -> IpcMessage {
        let mut name = [0u8; IPC_NAME_BYTES];
        name[..3].copy_from_slice(b"fz0");
        name[2] = b'0' + r.u8() % 3;
        match r.u8() % 20 {
            17 => IpcMessage::StopProgram {
                program: Self::program_id(r),
            },
            18 => IpcMessage::ServeThreads {
                program: Self::program_id(r),
            },
            19 => IpcMessage::SpawnThread {
                program: Self::program_id(r),
                node: r.u8() as u64 % 4,
                record_addr: r.addr(),
            },
            0 => {
                let flags = r.u8();
                IpcMessage::Hello {
                    role: match r.u8() % 4 {
                        0 => Role::Main,
                        1 => Role::Thread,
                        2 => Role::Service,
                        _ => Role::Admin,
                    },
                    session: r.u8() as u64 % 8,
                    pid: 100 + r.u8() as u32 % 4,
                    create: !flags.is_multiple_of(4),
                    persistent: flags & 4 != 0,
                    replicas: (flags >> 3) % 6,
                    name,
                }
            }
            1 => IpcMessage::Allocate {
                size_bytes: r.number(),
                align_bytes: r.number(),
            },
            2 => IpcMessage::Free { addr: r.addr() },
            3 | 4 => IpcMessage::Fault {
                addr: r.addr(),
                write: r.u8() & 1 == 1,
                pages: match r.u8() % 4 {
                    0 => r.u32(),
                    _ => 1 + r.u8() as u32 % 16,
                },
            },
            5 => IpcMessage::LeaseChunks {
                count: r.number() as u32,
            },
            6 => IpcMessage::Ping,
            7 => IpcMessage::Stats,
            8 => IpcMessage::RevokeDone {
                token: r.u8() as u64 % 64,
            },
            9 | 10 => IpcMessage::GrantApplied {
                page_addr: r.addr(),
                pages: match r.u8() % 4 {
                    0 => r.u32(),
                    _ => 1 + r.u8() as u32 % 16,
                },
            },
            11 => IpcMessage::Status,
            12 => IpcMessage::Detach,
            13 => IpcMessage::Unpersist { name },
            14 => IpcMessage::FutexWait {
                addr: r.addr() & !3,
                expected: r.u8() as u32 % 2,
                timeout_ticks: r.u8() as u32 * 8,
            },
            15 => IpcMessage::FutexWake {
                addr: r.addr(),
                count: r.u8() as u32 % 3,
            },
            _ => IpcMessage::ReleaseChunks {
                addr: r.addr(),
                count: r.number() as u32,
            },
        }
    }

    /// Program ids the hosts hand out (origin node << 32 | 1..4), or anything.
    fn program_id(r: &mut Bytes<'_>) -> u64 {
        match r.u8() % 4 {
            0 => r.u64(),
            _ => ((1 + r.u8() as u64 % 2) << 32) | (1 + r.u8() as u64 % 4),
        }
    }

    fn program_message(r: &mut Bytes<'_>, from: u64) -> ProgramMessage {
        let program = Self::program_id(r);
        let thread = match r.u8() % 2 {
            0 => r.u64(),
            _ => (from << 40) | (r.u8() as u64 % 8),
        };
        match r.u8() % 8 {
            0 => ProgramMessage::Launch {
                program,
                spec: r.blob(),
            },
            1 => ProgramMessage::LaunchAck { program },
            2 => ProgramMessage::Event {
                program,
                seq: r.u8() as u64 % 8,
                event: match r.u8() % 4 {
                    0 => WorkerEvent::Started { pid: r.u32() },
                    1 => WorkerEvent::Refused { reason: r.blob() },
                    2 => WorkerEvent::Output {
                        stream: 1 + r.u8() % 2,
                        bytes: r.blob(),
                    },
                    _ => WorkerEvent::Exited(WorkerExit::Code(r.u8() as i32)),
                },
            },
            3 => ProgramMessage::EventAck {
                program,
                seq: r.u8() as u64 % 8,
            },
            4 => ProgramMessage::Stop { program },
            5 => ProgramMessage::StopAck { program },
            6 => ProgramMessage::Spawn {
                program,
                thread,
                record_addr: r.addr(),
            },
            _ => ProgramMessage::SpawnAck {
                thread,
                outcome: match r.u8() % 3 {
                    0 => SpawnOutcome::Delivered,
                    1 => SpawnOutcome::Refused,
                    _ => SpawnOutcome::Ended,
                },
            },
        }
    }

    fn peer_message(r: &mut Bytes<'_>, from: u64) -> PeerMessage {
        let page = PageId {
            space: r.u8() as u32 % 3,
            index: r.number() % 32,
        };
        let access = if r.u8() & 1 == 1 {
            Access::Write
        } else {
            Access::Read
        };
        let bytes = (r.u8() & 1 == 1).then(|| Box::new([r.u8(); PAGE_SIZE_BYTES]));
        let backup = |r: &mut Bytes<'_>| BackupCopy {
            version: r.number(),
            sub: if r.u8() & 1 == 1 {
                FINAL_CONTENTS
            } else {
                r.number()
            },
            bytes: Box::new([r.u8(); PAGE_SIZE_BYTES]),
        };
        match r.u8() % 23 {
            16 => PeerMessage::Collect {
                page,
                seq: r.number(),
            },
            17 => PeerMessage::CollectAck {
                page,
                seq: r.number(),
                report: CopyReport {
                    held: Access::from_u8(r.u8() % 3).expect("in range"),
                    version: (r.u8() & 1 == 1).then(|| r.number()),
                    seq_seen: r.number(),
                    bytes,
                    backup: (r.u8() & 1 == 1).then(|| backup(r)),
                },
            },
            18 => PeerMessage::Flush {
                page,
                request_id: r.number(),
                version: r.number(),
                bytes,
            },
            19 => PeerMessage::FlushAck {
                page,
                request_id: r.number(),
            },
            20 => PeerMessage::Backup {
                page,
                seq: r.number(),
                copy: backup(r),
            },
            21 => PeerMessage::BackupAck {
                page,
                seq: r.number(),
            },
            22 => PeerMessage::RepairHint { page },
            13 => PeerMessage::Program(Self::program_message(r, from)),
            14 => PeerMessage::Futex(FutexMessage::Wake {
                wake_id: r.number(),
                oldest_in_flight: r.number(),
                page,
                offset_bytes: r.number() as u32,
                count: r.number() as u32,
            }),
            15 => PeerMessage::Futex(FutexMessage::WakeAck {
                wake_id: r.number(),
                woken: r.number() as u32,
            }),
            0 => PeerMessage::PageRequest {
                page,
                request_id: r.number(),
                mode: access,
                have_version: (r.u8() & 1 == 1).then(|| r.number()),
            },
            1 => PeerMessage::PageGrant {
                page,
                request_id: r.number(),
                seq: r.number(),
                mode: access,
                version: r.number(),
                base_version: r.number(),
                bytes,
            },
            2 => PeerMessage::PageDenied {
                page,
                request_id: r.number(),
                reason: if r.u8() & 1 == 1 {
                    PageDenial::Lost
                } else {
                    PageDenial::NotMapped
                },
            },
            3 => PeerMessage::Invalidate {
                page,
                seq: r.number(),
            },
            4 => PeerMessage::InvalidateAck {
                page,
                seq: r.number(),
            },
            5 => PeerMessage::Recall {
                page,
                seq: r.number(),
                downgrade: r.u8() & 1 == 1,
            },
            6 => PeerMessage::RecallAck {
                page,
                seq: r.number(),
                version: r.number(),
                bytes,
            },
            7 => PeerMessage::FreeRequest {
                space: page.space,
                addr: r.addr(),
                request_id: r.number(),
                oldest_in_flight: r.number(),
            },
            8 => PeerMessage::FreeReply {
                request_id: r.number(),
                outcome: match r.u8() % 3 {
                    0 => FreeOutcome::InvalidFree,
                    1 => FreeOutcome::Freed,
                    _ => FreeOutcome::NotLessee,
                },
            },
            9 => PeerMessage::LeaseRequest {
                sent_tick: r.number(),
            },
            10 => PeerMessage::LeaseGrant {
                sent_tick: r.number(),
            },
            _ => PeerMessage::Raft(Self::raft_message(r, from)),
        }
    }

    /// A well-formed Raft message with arbitrary contents: what a forging peer sends.
    fn raft_message(r: &mut Bytes<'_>, from: u64) -> Vec<u8> {
        let mut message = RaftMessage::default();
        let kinds = [
            MessageType::MsgPropose,
            MessageType::MsgAppend,
            MessageType::MsgAppendResponse,
            MessageType::MsgRequestVote,
            MessageType::MsgRequestVoteResponse,
            MessageType::MsgHeartbeat,
            MessageType::MsgHeartbeatResponse,
            MessageType::MsgTransferLeader,
            MessageType::MsgTimeoutNow,
            MessageType::MsgReadIndex,
            MessageType::MsgReadIndexResp,
            MessageType::MsgRequestPreVote,
            MessageType::MsgRequestPreVoteResponse,
            MessageType::MsgHup,
            MessageType::MsgSnapshot,
        ];
        message.set_msg_type(kinds[r.u8() as usize % kinds.len()]);
        message.from = if r.u8().is_multiple_of(8) {
            r.number()
        } else {
            from
        };
        message.to = 1 + r.u8() as u64 % 2;
        message.term = r.u8() as u64 % 8;
        message.log_term = r.u8() as u64 % 8;
        message.index = r.u8() as u64 % 16;
        message.commit = r.u8() as u64 % 16;
        message.reject = r.u8() & 1 == 1;
        message.reject_hint = r.u8() as u64 % 16;
        let entries = r.u8() % 4;
        for i in 0..entries {
            let mut entry = Entry::default();
            entry.index = message.index + 1 + i as u64;
            if r.u8().is_multiple_of(4) {
                entry.index = r.u8() as u64 % 16;
            }
            entry.term = r.u8() as u64 % 8;
            if r.u8().is_multiple_of(8) {
                entry.set_entry_type(EntryType::EntryConfChange);
            }
            let origin = if r.u8().is_multiple_of(4) {
                r.u8() as u64 % 4
            } else {
                from
            };
            let command = match r.u8() % 8 {
                0 => Command::LeaseChunks {
                    space: r.u8() as u32 % 3,
                    node: r.u8() as u64 % 4,
                    count: r.number() as u32,
                },
                1 if r.u8().is_multiple_of(2) => Command::Rejoin {
                    node: r.u8() as u64 % 4,
                    incarnation: r.u8() as u64 % 4,
                },
                1 => Command::MarkDown {
                    node: r.u8() as u64 % 4,
                    incarnation: r.u8() as u64 % 3,
                },
                2 => Command::Attach { name: "fz".into() },
                3 => Command::Detach {
                    space: r.u8() as u32 % 3,
                },
                4 => Command::ReleaseChunks {
                    space: r.u8() as u32 % 3,
                    first_chunk: r.u8() as u64 % 8,
                    count: r.u8() as u32 % 4,
                },
                5 => Command::ReleaseDone {
                    space: r.u8() as u32 % 3,
                    first_chunk: r.u8() as u64 % 8,
                },
                6 => Command::Unpersist { name: "fz".into() },
                _ => Command::CreateSpace {
                    name: "fz".into(),
                    base_addr: SPACE_BASE_ADDR,
                    size_bytes: SPACE_SIZE_BYTES,
                    chunk_size_bytes: CHUNK_SIZE_BYTES,
                    root_size_bytes: 65536,
                    flexible_base: r.u8() & 1 == 1,
                    persistent: false,
                    replicas: r.u8() % 6,
                },
            };
            entry.data = Proposal {
                origin,
                proposal_id: r.u8() as u64 % 8,
                oldest_in_flight: r.u8() as u64 % 8,
                command,
            }
            .encode()
            .into();
            message.entries.push(entry);
        }
        message.write_to_bytes().unwrap_or_default()
    }
}

/// A well-formed peer frame from `from` to `to` with arbitrary contents, drawn from
/// `data`: what a forging peer could send (page messages, frees, leases, Raft).
pub fn forged_peer_frame(data: &[u8], from: u64, to: u64) -> Vec<u8> {
    let mut r = Bytes { data };
    let message = Harness::peer_message(&mut r, from);
    Envelope {
        from,
        from_incarnation: FIRST_INCARNATION,
        to,
        to_incarnation: FIRST_INCARNATION,
        message,
    }
    .encode()
}

/// Drives two hosts of one cluster with an arbitrary sequence of application
/// connections, frames, closes and process states, peer frames (garbage, forged or
/// delivered), revocation answers and time.
pub fn host_sequence(data: &[u8]) {
    let mut r = Bytes { data };
    let mut h = Harness::new();
    for _ in 0..MAX_STEPS {
        if r.is_empty() {
            break;
        }
        let host = (r.u8() & 1) as usize;
        match r.u8() % 14 {
            12 => {
                // A launcher's spec, well-formed or not.
                if h.conns[host].is_empty() {
                    continue;
                }
                let conn = h.conns[host][r.u8() as usize % h.conns[host].len()];
                let spec = match r.u8() % 2 {
                    0 => r.blob(),
                    _ => WorkerSpec {
                        path: b"/bin/true".to_vec(),
                        argv: vec![b"true".to_vec()],
                        ..WorkerSpec::default()
                    }
                    .encode(),
                };
                h.hosts[host].app_launch(h.now, conn, r.u8() as u64, spec);
            }
            13 => {
                // What a daemon reports about a worker it was asked to start.
                if h.workers.is_empty() {
                    continue;
                }
                let (worker_host, program) = h.workers[r.u8() as usize % h.workers.len()];
                let event = match r.u8() % 4 {
                    0 => WorkerEvent::Started { pid: r.u32() },
                    1 => WorkerEvent::Output {
                        stream: 1 + r.u8() % 2,
                        bytes: r.blob(),
                    },
                    2 => WorkerEvent::Refused {
                        reason: b"hash differs".to_vec(),
                    },
                    _ => WorkerEvent::Exited(WorkerExit::Signal(r.u8() as i32)),
                };
                h.hosts[worker_host].worker_event(h.now, program, event);
                h.drain(worker_host);
            }
            0 => {
                h.now += r.u8() as u64 * 4;
                for i in 0..2 {
                    h.hosts[i].tick(h.now);
                    h.drain(i);
                }
            }
            1 => {
                let conn = h.next_conn;
                h.next_conn += 1;
                let creds = Credentials {
                    pid: 100 + r.u8() as i32 % 4,
                    uid: if r.u8().is_multiple_of(8) { 1000 } else { 0 },
                    gid: 0,
                };
                h.hosts[host].app_connected(h.now, conn, creds);
                h.conns[host].push(conn);
            }
            2..=4 => {
                if h.conns[host].is_empty() {
                    continue;
                }
                let conn = h.conns[host][r.u8() as usize % h.conns[host].len()];
                let message = Harness::app_message(&mut r);
                let mut frame = [0u8; IPC_FRAME_BYTES];
                message.encode(r.u8() as u64, &mut frame);
                if r.u8().is_multiple_of(16) {
                    let at = r.u8() as usize % IPC_FRAME_BYTES;
                    frame[at] = r.u8();
                }
                let memory = &h.memory[host];
                h.hosts[host].app_frame(h.now, conn, &frame, memory);
            }
            5 => {
                if h.conns[host].is_empty() {
                    continue;
                }
                let at = r.u8() as usize % h.conns[host].len();
                let conn = h.conns[host].remove(at);
                h.hosts[host].app_closed(h.now, conn);
            }
            6 => {
                if h.asked.is_empty() {
                    continue;
                }
                let (asked_host, session) = h.asked.remove(r.u8() as usize % h.asked.len());
                let state = match r.u8() % 3 {
                    0 => ProcessState::Exited,
                    1 => ProcessState::Unmapped,
                    _ => ProcessState::Mapped,
                };
                h.hosts[asked_host].process_state(h.now, session, state);
                h.drain(asked_host);
            }
            7 => {
                let len = r.u8() as usize;
                let from = 1 + r.u8() as u64 % 3;
                let bytes = r.take(len).to_vec();
                let _ = h.hosts[host].peer_frame(h.now, from, &bytes);
            }
            8 => {
                let from = if host == 0 { 2 } else { 1 };
                let message = Harness::peer_message(&mut r, from);
                let envelope = Envelope {
                    from,
                    from_incarnation: FIRST_INCARNATION,
                    to: host as u64 + 1,
                    to_incarnation: FIRST_INCARNATION,
                    message,
                };
                let _ = h.hosts[host].peer_frame(h.now, from, &envelope.encode());
            }
            9 => {
                let token = r.u8() as u64 % 64;
                let bytes = (r.u8() & 1 == 1).then(|| Box::new([1u8; PAGE_SIZE_BYTES]));
                h.hosts[host].revoke_finished(h.now, token, bytes);
            }
            10 => {
                let count = 1 + r.u8() as usize;
                let drop_mask = if r.u8().is_multiple_of(4) { r.u8() } else { 0 };
                h.deliver(count, drop_mask);
            }
            _ => {
                let hello = PeerHello {
                    node: r.u8() as u64 % 4,
                    incarnation: r.u8() as u64 % 3,
                };
                let proof = match r.u8() % 3 {
                    0 => crate::host::PeerProof::Unproven,
                    1 => crate::host::PeerProof::Certificate(None),
                    _ => crate::host::PeerProof::Certificate(Some(r.u8() as u64 % 4)),
                };
                let _ = h.hosts[host].peer_hello(hello, proof);
            }
        }
        h.drain(host);
    }
    // Whatever happened, time and the network still work.
    for _ in 0..8 {
        h.now += 100;
        for i in 0..2 {
            h.hosts[i].tick(h.now);
            h.drain(i);
        }
        h.deliver(MAX_IN_FLIGHT, 0);
    }
}
