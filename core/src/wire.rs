//! The peer wire format: every message between two `gallocyd`s, defined once and used
//! by the simulator and the daemon alike.
//!
//! Frame: `magic u16 = 0x4759 ("GY") | version u8 | kind u8 | from u64 |
//! from_incarnation u64 | to u64 | to_incarnation u64 | body`.
//! All integers little-endian. Kinds 1..=31 are coherence and allocation, 32..=63 are
//! reserved for replication of page contents, 64..=127 for distributed threads and
//! locks; an unknown kind is an error, never a panic.

use crate::codec::{DecodeError, Reader, Writer};
use crate::futex::FutexMessage;
use crate::programs::ProgramMessage;
use crate::types::{Access, NodeId, PageBytes, PageId, SpaceId, PAGE_SIZE_BYTES};

pub const WIRE_MAGIC: u16 = 0x4759;
pub const WIRE_VERSION: u8 = 5;
/// Largest frame a peer may send (a page plus headers, or a batch of Raft entries).
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Largest embedded Raft message.
pub const MAX_RAFT_MESSAGE_BYTES: usize = MAX_FRAME_BYTES - 64;
const HEADER_BYTES: usize = 2 + 1 + 1 + 8 + 8 + 8 + 8;

/// The first bytes on every peer connection:
/// `b"GYHI" | version u8 | node id u64 | incarnation u64`.
/// A daemon refuses a peer that speaks another version, is not a member, or speaks for
/// an incarnation older than one it already heard (a connection of a life that ended).
pub const PEER_HELLO_BYTES: usize = 21;
const PEER_HELLO_MAGIC: [u8; 4] = *b"GYHI";

/// What a peer says of itself when it connects.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PeerHello {
    pub node: NodeId,
    /// The member's life: 1 at first, one more at every restart (kept on its disk).
    pub incarnation: u64,
}

pub fn encode_peer_hello(hello: PeerHello) -> [u8; PEER_HELLO_BYTES] {
    let mut out = [0u8; PEER_HELLO_BYTES];
    out[..4].copy_from_slice(&PEER_HELLO_MAGIC);
    out[4] = WIRE_VERSION;
    out[5..13].copy_from_slice(&hello.node.to_le_bytes());
    out[13..].copy_from_slice(&hello.incarnation.to_le_bytes());
    out
}

pub fn decode_peer_hello(bytes: &[u8]) -> Result<PeerHello, DecodeError> {
    if bytes.len() != PEER_HELLO_BYTES {
        return Err(DecodeError::Truncated);
    }
    if bytes[..4] != PEER_HELLO_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[4] != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion(bytes[4]));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[5..13]);
    let node = u64::from_le_bytes(word);
    if node == 0 {
        return Err(DecodeError::Invalid("node id 0"));
    }
    word.copy_from_slice(&bytes[13..]);
    Ok(PeerHello {
        node,
        incarnation: u64::from_le_bytes(word),
    })
}

/// Why a page request was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageDenial {
    /// The only copy of the page was on a node that is down.
    Lost = 1,
    /// The page is outside every leased chunk of its space.
    NotMapped = 2,
}

/// Outcome of a free executed by the node owning the block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FreeOutcome {
    Freed = 1,
    /// Not the start of a live block: a double free or a wild pointer.
    InvalidFree = 2,
    /// The chunk is not (or no longer) leased to the node asked: the asker's metadata
    /// is behind (the chunk was released and leased again), so it waits to catch up.
    NotLessee = 3,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum PeerMessage {
    /// A Raft message, protobuf-encoded by the raft crate.
    Raft(Vec<u8>),
    /// Node → home: give me this page with at least `mode` access.
    PageRequest {
        page: PageId,
        request_id: u64,
        mode: Access,
        /// The version of the bytes the requester still has in memory, if any.
        have_version: Option<u64>,
    },
    /// Home → node: access granted. `bytes` is absent when the requester's
    /// `have_version` equals `base_version` (its bytes are current).
    PageGrant {
        page: PageId,
        request_id: u64,
        seq: u64,
        mode: Access,
        version: u64,
        base_version: u64,
        bytes: Option<Box<PageBytes>>,
    },
    PageDenied {
        page: PageId,
        request_id: u64,
        reason: PageDenial,
    },
    /// Home → reader: drop your copy.
    Invalidate {
        page: PageId,
        seq: u64,
    },
    InvalidateAck {
        page: PageId,
        seq: u64,
    },
    /// Home → writer: stop writing, send the page; keep a read copy if `downgrade`.
    Recall {
        page: PageId,
        seq: u64,
        downgrade: bool,
    },
    /// `bytes` is absent when the node never received the write grant (so never
    /// wrote): the home's copy is still the latest.
    RecallAck {
        page: PageId,
        seq: u64,
        version: u64,
        bytes: Option<Box<PageBytes>>,
    },
    /// New home of a recovered chunk → every node up: what do you hold of this page?
    /// (docs/protocol.md "Recovery").
    Collect {
        page: PageId,
        seq: u64,
    },
    /// Node → new home: what this node holds of the page.
    CollectAck {
        page: PageId,
        seq: u64,
        report: CopyReport,
    },
    /// Writer (or former writer) → home: make this page durable (`gallocy_sync`):
    /// keep `bytes`, its contents now at `version`, as the master, and answer
    /// `FlushAck` once the page's contents are on k nodes. Without bytes (the node
    /// writes the page no more: its writes left with a recall) the home only makes
    /// sure of the k copies.
    Flush {
        page: PageId,
        request_id: u64,
        version: u64,
        bytes: Option<Box<PageBytes>>,
    },
    FlushAck {
        page: PageId,
        request_id: u64,
    },
    /// Home → node: keep this copy of the page for recovery (docs/protocol.md
    /// "Replication"); its applications do not see it.
    Backup {
        page: PageId,
        seq: u64,
        copy: BackupCopy,
    },
    BackupAck {
        page: PageId,
        seq: u64,
    },
    /// Node → a page's new home, once a node's copies are void: this node holds a copy
    /// of the page (in memory or as a backup), rebuild it and make its copies again now
    /// (docs/protocol.md "Replication", repairs). Never answered.
    RepairHint {
        page: PageId,
    },
    /// Any node → the node that carved the block: free it.
    FreeRequest {
        space: SpaceId,
        addr: u64,
        request_id: u64,
        /// The sender's oldest free still in flight: everything below was answered.
        oldest_in_flight: u64,
    },
    FreeReply {
        request_id: u64,
        outcome: FreeOutcome,
    },
    /// Node → leader: am I still part of the cluster? `sent_tick` is the sender's clock.
    LeaseRequest {
        sent_tick: u64,
    },
    /// Leader → node: I heard your request sent at `sent_tick` (your clock). A node may
    /// let its applications touch pages only while such a grant is recent; the leader
    /// declares a node down only after hearing nothing from it for much longer.
    LeaseGrant {
        sent_tick: u64,
    },
    /// Programs and their threads across nodes (`programs.rs`), handled by the host.
    Program(ProgramMessage),
    /// Futex wakes between nodes (`futex.rs`), handled by the host.
    Futex(FutexMessage),
}

/// What one node holds of a page being recovered (`PeerMessage::CollectAck`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CopyReport {
    pub held: Access,
    /// The version of the bytes in its memory (None: it never installed any).
    pub version: Option<u64>,
    pub seq_seen: u64,
    /// The memory's bytes, unless the node is the writer (they still change; a recall
    /// fetches them).
    pub bytes: Option<Box<PageBytes>>,
    /// The backup copy it keeps for the page's home, if any.
    pub backup: Option<BackupCopy>,
}

/// A copy kept for recovery only. Ordered by `(version, sub)`: the final contents of
/// a version (what left its writer with a recall) have `sub = FINAL_CONTENTS`, and a
/// writer's flushes of that version come before them in the order they were made.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BackupCopy {
    pub version: u64,
    pub sub: u64,
    pub bytes: Box<PageBytes>,
}

/// `BackupCopy::sub` of a version's final contents.
pub const FINAL_CONTENTS: u64 = u64::MAX;

impl BackupCopy {
    pub fn order(&self) -> (u64, u64) {
        (self.version, self.sub)
    }
}

fn put_backup(w: &mut Writer, copy: &BackupCopy) {
    w.u64(copy.version);
    w.u64(copy.sub);
    w.raw(&copy.bytes[..]);
}

fn get_backup(r: &mut Reader<'_>) -> Result<BackupCopy, DecodeError> {
    Ok(BackupCopy {
        version: r.u64()?,
        sub: r.u64()?,
        bytes: get_page_bytes(r)?,
    })
}

/// A message with its addressing.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    pub from: NodeId,
    /// The sender's life (`Config::incarnation`): a message of a life that ended, or of
    /// one the receiver has not seen rejoin yet, says nothing about the pages.
    pub from_incarnation: u64,
    pub to: NodeId,
    /// The receiver's life as the sender's metadata has it: a message meant for a life
    /// that ended (delayed, or sent before the sender learnt of the restart) is not
    /// taken by the next one, whose ids may repeat the earlier life's.
    pub to_incarnation: u64,
    pub message: PeerMessage,
}

const KIND_RAFT: u8 = 1;
const KIND_PAGE_REQUEST: u8 = 2;
const KIND_PAGE_GRANT: u8 = 3;
const KIND_PAGE_DENIED: u8 = 4;
const KIND_INVALIDATE: u8 = 5;
const KIND_INVALIDATE_ACK: u8 = 6;
const KIND_RECALL: u8 = 7;
const KIND_RECALL_ACK: u8 = 8;
const KIND_FREE_REQUEST: u8 = 9;
const KIND_FREE_REPLY: u8 = 10;
const KIND_LEASE_REQUEST: u8 = 11;
const KIND_LEASE_GRANT: u8 = 12;
const KIND_COLLECT: u8 = 32;
const KIND_COLLECT_ACK: u8 = 33;
const KIND_FLUSH: u8 = 34;
const KIND_FLUSH_ACK: u8 = 35;
const KIND_BACKUP: u8 = 36;
const KIND_BACKUP_ACK: u8 = 37;
const KIND_REPAIR_HINT: u8 = 38;
const KIND_PROGRAM: u8 = 64;
const KIND_FUTEX: u8 = 65;

/// Whether a frame is the cluster's background chatter (Raft, leases) rather than part
/// of an application's transaction: a driver may sleep right after background frames.
pub fn is_background_frame(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(3),
        Some(&KIND_RAFT) | Some(&KIND_LEASE_REQUEST) | Some(&KIND_LEASE_GRANT)
    )
}

pub(crate) fn put_page(w: &mut Writer, page: PageId) {
    w.u32(page.space);
    w.u64(page.index);
}

pub(crate) fn get_page(r: &mut Reader<'_>) -> Result<PageId, DecodeError> {
    Ok(PageId {
        space: r.u32()?,
        index: r.u64()?,
    })
}

fn get_access(r: &mut Reader<'_>) -> Result<Access, DecodeError> {
    match Access::from_u8(r.u8()?) {
        Some(Access::None) | None => Err(DecodeError::Invalid("access mode")),
        Some(mode) => Ok(mode),
    }
}

fn get_page_bytes(r: &mut Reader<'_>) -> Result<Box<PageBytes>, DecodeError> {
    let slice = r.take(PAGE_SIZE_BYTES)?;
    let mut bytes = Box::new([0u8; PAGE_SIZE_BYTES]);
    bytes.copy_from_slice(slice);
    Ok(bytes)
}

fn put_opt_bytes(w: &mut Writer, bytes: &Option<Box<PageBytes>>) {
    match bytes {
        None => w.u8(0),
        Some(bytes) => {
            w.u8(1);
            w.raw(&bytes[..]);
        }
    }
}

fn get_opt_bytes(r: &mut Reader<'_>) -> Result<Option<Box<PageBytes>>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(get_page_bytes(r)?)),
        _ => Err(DecodeError::Invalid("page bytes tag")),
    }
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(HEADER_BYTES + 64);
        w.u16(WIRE_MAGIC);
        w.u8(WIRE_VERSION);
        let kind = match &self.message {
            PeerMessage::Raft(_) => KIND_RAFT,
            PeerMessage::PageRequest { .. } => KIND_PAGE_REQUEST,
            PeerMessage::PageGrant { .. } => KIND_PAGE_GRANT,
            PeerMessage::PageDenied { .. } => KIND_PAGE_DENIED,
            PeerMessage::Invalidate { .. } => KIND_INVALIDATE,
            PeerMessage::InvalidateAck { .. } => KIND_INVALIDATE_ACK,
            PeerMessage::Recall { .. } => KIND_RECALL,
            PeerMessage::RecallAck { .. } => KIND_RECALL_ACK,
            PeerMessage::Collect { .. } => KIND_COLLECT,
            PeerMessage::CollectAck { .. } => KIND_COLLECT_ACK,
            PeerMessage::Flush { .. } => KIND_FLUSH,
            PeerMessage::FlushAck { .. } => KIND_FLUSH_ACK,
            PeerMessage::Backup { .. } => KIND_BACKUP,
            PeerMessage::BackupAck { .. } => KIND_BACKUP_ACK,
            PeerMessage::RepairHint { .. } => KIND_REPAIR_HINT,
            PeerMessage::FreeRequest { .. } => KIND_FREE_REQUEST,
            PeerMessage::FreeReply { .. } => KIND_FREE_REPLY,
            PeerMessage::LeaseRequest { .. } => KIND_LEASE_REQUEST,
            PeerMessage::LeaseGrant { .. } => KIND_LEASE_GRANT,
            PeerMessage::Program(_) => KIND_PROGRAM,
            PeerMessage::Futex(_) => KIND_FUTEX,
        };
        w.u8(kind);
        w.u64(self.from);
        w.u64(self.from_incarnation);
        w.u64(self.to);
        w.u64(self.to_incarnation);
        match &self.message {
            PeerMessage::Raft(bytes) => w.blob(bytes),
            PeerMessage::PageRequest {
                page,
                request_id,
                mode,
                have_version,
            } => {
                put_page(&mut w, *page);
                w.u64(*request_id);
                w.u8(*mode as u8);
                w.opt_u64(*have_version);
            }
            PeerMessage::PageGrant {
                page,
                request_id,
                seq,
                mode,
                version,
                base_version,
                bytes,
            } => {
                put_page(&mut w, *page);
                w.u64(*request_id);
                w.u64(*seq);
                w.u8(*mode as u8);
                w.u64(*version);
                w.u64(*base_version);
                put_opt_bytes(&mut w, bytes);
            }
            PeerMessage::PageDenied {
                page,
                request_id,
                reason,
            } => {
                put_page(&mut w, *page);
                w.u64(*request_id);
                w.u8(*reason as u8);
            }
            PeerMessage::Invalidate { page, seq }
            | PeerMessage::InvalidateAck { page, seq }
            | PeerMessage::Collect { page, seq }
            | PeerMessage::BackupAck { page, seq } => {
                put_page(&mut w, *page);
                w.u64(*seq);
            }
            PeerMessage::Recall {
                page,
                seq,
                downgrade,
            } => {
                put_page(&mut w, *page);
                w.u64(*seq);
                w.bool(*downgrade);
            }
            PeerMessage::RecallAck {
                page,
                seq,
                version,
                bytes,
            } => {
                put_page(&mut w, *page);
                w.u64(*seq);
                w.u64(*version);
                put_opt_bytes(&mut w, bytes);
            }
            PeerMessage::CollectAck { page, seq, report } => {
                put_page(&mut w, *page);
                w.u64(*seq);
                w.u8(report.held as u8);
                w.opt_u64(report.version);
                w.u64(report.seq_seen);
                put_opt_bytes(&mut w, &report.bytes);
                match &report.backup {
                    None => w.u8(0),
                    Some(copy) => {
                        w.u8(1);
                        put_backup(&mut w, copy);
                    }
                }
            }
            PeerMessage::Flush {
                page,
                request_id,
                version,
                bytes,
            } => {
                put_page(&mut w, *page);
                w.u64(*request_id);
                w.u64(*version);
                put_opt_bytes(&mut w, bytes);
            }
            PeerMessage::FlushAck { page, request_id } => {
                put_page(&mut w, *page);
                w.u64(*request_id);
            }
            PeerMessage::RepairHint { page } => put_page(&mut w, *page),
            PeerMessage::Backup { page, seq, copy } => {
                put_page(&mut w, *page);
                w.u64(*seq);
                put_backup(&mut w, copy);
            }
            PeerMessage::FreeRequest {
                space,
                addr,
                request_id,
                oldest_in_flight,
            } => {
                w.u32(*space);
                w.u64(*addr);
                w.u64(*request_id);
                w.u64(*oldest_in_flight);
            }
            PeerMessage::FreeReply {
                request_id,
                outcome,
            } => {
                w.u64(*request_id);
                w.u8(*outcome as u8);
            }
            PeerMessage::LeaseRequest { sent_tick } | PeerMessage::LeaseGrant { sent_tick } => {
                w.u64(*sent_tick)
            }
            PeerMessage::Program(message) => message.put(&mut w),
            PeerMessage::Futex(message) => message.put(&mut w),
        }
        debug_assert!(w.bytes.len() <= MAX_FRAME_BYTES);
        w.bytes
    }

    /// Decodes one frame. Any malformed input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::Invalid("frame over size limit"));
        }
        let mut r = Reader::new(bytes);
        if r.u16()? != WIRE_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != WIRE_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = r.u8()?;
        let from = r.u64()?;
        let from_incarnation = r.u64()?;
        let to = r.u64()?;
        let to_incarnation = r.u64()?;
        if from == 0 || to == 0 {
            return Err(DecodeError::Invalid("node id 0"));
        }
        let message = match kind {
            KIND_RAFT => PeerMessage::Raft(r.blob(MAX_RAFT_MESSAGE_BYTES)?.to_vec()),
            KIND_PAGE_REQUEST => PeerMessage::PageRequest {
                page: get_page(&mut r)?,
                request_id: r.u64()?,
                mode: get_access(&mut r)?,
                have_version: r.opt_u64()?,
            },
            KIND_PAGE_GRANT => PeerMessage::PageGrant {
                page: get_page(&mut r)?,
                request_id: r.u64()?,
                seq: r.u64()?,
                mode: get_access(&mut r)?,
                version: r.u64()?,
                base_version: r.u64()?,
                bytes: get_opt_bytes(&mut r)?,
            },
            KIND_PAGE_DENIED => PeerMessage::PageDenied {
                page: get_page(&mut r)?,
                request_id: r.u64()?,
                reason: match r.u8()? {
                    1 => PageDenial::Lost,
                    2 => PageDenial::NotMapped,
                    _ => return Err(DecodeError::Invalid("denial reason")),
                },
            },
            KIND_INVALIDATE => PeerMessage::Invalidate {
                page: get_page(&mut r)?,
                seq: r.u64()?,
            },
            KIND_INVALIDATE_ACK => PeerMessage::InvalidateAck {
                page: get_page(&mut r)?,
                seq: r.u64()?,
            },
            KIND_RECALL => PeerMessage::Recall {
                page: get_page(&mut r)?,
                seq: r.u64()?,
                downgrade: r.bool()?,
            },
            KIND_RECALL_ACK => PeerMessage::RecallAck {
                page: get_page(&mut r)?,
                seq: r.u64()?,
                version: r.u64()?,
                bytes: get_opt_bytes(&mut r)?,
            },
            KIND_COLLECT => PeerMessage::Collect {
                page: get_page(&mut r)?,
                seq: r.u64()?,
            },
            KIND_COLLECT_ACK => PeerMessage::CollectAck {
                page: get_page(&mut r)?,
                seq: r.u64()?,
                report: CopyReport {
                    held: Access::from_u8(r.u8()?).ok_or(DecodeError::Invalid("held access"))?,
                    version: r.opt_u64()?,
                    seq_seen: r.u64()?,
                    bytes: get_opt_bytes(&mut r)?,
                    backup: match r.u8()? {
                        0 => None,
                        1 => Some(get_backup(&mut r)?),
                        _ => return Err(DecodeError::Invalid("backup tag")),
                    },
                },
            },
            KIND_FLUSH => PeerMessage::Flush {
                page: get_page(&mut r)?,
                request_id: r.u64()?,
                version: r.u64()?,
                bytes: get_opt_bytes(&mut r)?,
            },
            KIND_FLUSH_ACK => PeerMessage::FlushAck {
                page: get_page(&mut r)?,
                request_id: r.u64()?,
            },
            KIND_BACKUP => PeerMessage::Backup {
                page: get_page(&mut r)?,
                seq: r.u64()?,
                copy: get_backup(&mut r)?,
            },
            KIND_REPAIR_HINT => PeerMessage::RepairHint {
                page: get_page(&mut r)?,
            },
            KIND_BACKUP_ACK => PeerMessage::BackupAck {
                page: get_page(&mut r)?,
                seq: r.u64()?,
            },
            KIND_FREE_REQUEST => PeerMessage::FreeRequest {
                space: r.u32()?,
                addr: r.u64()?,
                request_id: r.u64()?,
                oldest_in_flight: r.u64()?,
            },
            KIND_FREE_REPLY => PeerMessage::FreeReply {
                request_id: r.u64()?,
                outcome: match r.u8()? {
                    1 => FreeOutcome::Freed,
                    2 => FreeOutcome::InvalidFree,
                    3 => FreeOutcome::NotLessee,
                    _ => return Err(DecodeError::Invalid("free outcome")),
                },
            },
            KIND_LEASE_REQUEST => PeerMessage::LeaseRequest {
                sent_tick: r.u64()?,
            },
            KIND_LEASE_GRANT => PeerMessage::LeaseGrant {
                sent_tick: r.u64()?,
            },
            KIND_PROGRAM => PeerMessage::Program(ProgramMessage::get(&mut r)?),
            KIND_FUTEX => PeerMessage::Futex(FutexMessage::get(&mut r)?),
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(Envelope {
            from,
            from_incarnation,
            to,
            to_incarnation,
            message,
        })
    }
}
