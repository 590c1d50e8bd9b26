//! gallocy-core: the sans-IO heart of gallocy.
//!
//! No sockets, threads, clocks or OS randomness live here: time and messages come in
//! as arguments, and what must happen comes out as [`node::Action`]s. The simulator
//! (`gallocy-sim`) and the daemon drive the same [`node::Node`].
//!
//! Without the default `node` feature the crate is `no_std` and exports only [`ipc`],
//! the application ⇄ daemon frame format used by the in-process runtime.

#![cfg_attr(not(feature = "node"), no_std)]

pub mod ipc;

#[cfg(feature = "node")]
pub mod alloc;
#[cfg(feature = "node")]
pub mod codec;
#[cfg(feature = "node")]
pub mod dedupe;
#[cfg(feature = "node")]
pub mod futex;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
#[cfg(feature = "node")]
pub mod host;
#[cfg(feature = "node")]
pub mod meta;
#[cfg(feature = "mutants")]
pub mod mutants;
#[cfg(feature = "node")]
pub mod node;
#[cfg(feature = "node")]
pub mod programs;
#[cfg(feature = "node")]
mod retry;
#[cfg(feature = "node")]
pub mod types;
#[cfg(feature = "node")]
pub mod wire;

#[cfg(feature = "node")]
pub use codec::DecodeError;
#[cfg(feature = "node")]
pub use node::{
    Action, AppError, AppReply, AppRequest, AppToken, Config, Node, PersistedRaft, RaftWrite, Stats,
};
/// Raft's message types, for drivers that store a node's `RaftWrite`s.
#[cfg(feature = "node")]
pub use raft::eraftpb;
#[cfg(feature = "node")]
pub use types::{Access, NodeId, PageBytes, PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES};
#[cfg(feature = "node")]
pub use wire::{Envelope, PeerMessage};
