//! gallocy-core: the sans-IO heart of gallocy.
//!
//! No sockets, threads, clocks or OS randomness live here: time and messages come in
//! as arguments, and what must happen comes out as [`node::Action`]s. The simulator
//! (`gallocy-sim`) and the daemon drive the same [`node::Node`].

pub mod alloc;
pub mod codec;
pub mod meta;
#[cfg(feature = "mutants")]
pub mod mutants;
pub mod node;
pub mod types;
pub mod wire;

pub use codec::DecodeError;
pub use node::{Action, AppError, AppReply, AppRequest, AppToken, Config, Node, Stats};
pub use types::{Access, NodeId, PageBytes, PageId, SpaceId, SpaceLayout, PAGE_SIZE_BYTES};
pub use wire::{Envelope, PeerMessage};
