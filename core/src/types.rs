//! Basic identifiers and the address-space layout shared by every part of gallocy.

/// A node (one `gallocyd`, one Raft peer). Never zero: Raft reserves id 0.
pub type NodeId = u64;

/// A space: one fixed virtual range shared by all processes of one distributed program.
pub type SpaceId = u32;

/// Coherence unit.
pub const PAGE_SIZE_BYTES: usize = 4096;

/// Contents of one page.
pub type PageBytes = [u8; PAGE_SIZE_BYTES];

/// Smallest alignment every allocation gets (glibc's guarantee on 64-bit).
pub const MIN_ALIGN_BYTES: u64 = 16;

/// A page of a space, by index from the space base.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub struct PageId {
    pub space: SpaceId,
    pub index: u64,
}

/// What the local applications may do with a page.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub enum Access {
    None = 0,
    Read = 1,
    Write = 2,
}

impl Access {
    pub fn from_u8(value: u8) -> Option<Access> {
        match value {
            0 => Some(Access::None),
            1 => Some(Access::Read),
            2 => Some(Access::Write),
            _ => None,
        }
    }
}

/// The layout of a space, identical on every node (it is replicated through Raft).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SpaceLayout {
    pub id: SpaceId,
    pub name: String,
    pub base_addr: u64,
    pub size_bytes: u64,
    pub chunk_size_bytes: u64,
    /// A zero-initialised block at the start of the space, reserved at creation, at the
    /// same address everywhere: how processes publish their first pointers.
    pub root_size_bytes: u64,
    /// k: a page's contents are on this many nodes before another node's process may
    /// see them, and `gallocy_sync` makes a process's writes so (docs/protocol.md
    /// "Replication"). 1 to `MAX_REPLICAS`.
    pub replicas: u8,
}

/// Most copies of a page a space may ask for.
pub const MAX_REPLICAS: u8 = 4;
/// The daemon's default k.
pub const DEFAULT_REPLICAS: u8 = 2;

/// Largest space name, in bytes.
pub const SPACE_NAME_MAX_BYTES: usize = 64;

/// A space name the log can carry: 1 to `SPACE_NAME_MAX_BYTES` bytes.
pub fn is_valid_space_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= SPACE_NAME_MAX_BYTES
}

impl SpaceLayout {
    pub fn end_addr(&self) -> u64 {
        self.base_addr + self.size_bytes
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_addr && addr < self.end_addr()
    }

    pub fn page_count(&self) -> u64 {
        self.size_bytes / PAGE_SIZE_BYTES as u64
    }

    pub fn chunk_count(&self) -> u64 {
        self.size_bytes / self.chunk_size_bytes
    }

    pub fn pages_per_chunk(&self) -> u64 {
        self.chunk_size_bytes / PAGE_SIZE_BYTES as u64
    }

    /// The page holding `addr`, if `addr` is inside the space.
    pub fn page_of(&self, addr: u64) -> Option<PageId> {
        if !self.contains(addr) {
            return None;
        }
        Some(PageId {
            space: self.id,
            index: (addr - self.base_addr) / PAGE_SIZE_BYTES as u64,
        })
    }

    pub fn chunk_of_page(&self, page_index: u64) -> u64 {
        page_index / self.pages_per_chunk()
    }

    pub fn chunk_of_addr(&self, addr: u64) -> Option<u64> {
        self.page_of(addr)
            .map(|page| self.chunk_of_page(page.index))
    }

    pub fn chunk_addr(&self, chunk: u64) -> u64 {
        self.base_addr + chunk * self.chunk_size_bytes
    }

    pub fn page_addr(&self, page_index: u64) -> u64 {
        self.base_addr + page_index * PAGE_SIZE_BYTES as u64
    }

    /// Checks a layout proposed by a user or a peer; the error says what is wrong.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !is_valid_space_name(&self.name) {
            return Err("space name must be 1 to 64 bytes");
        }
        if !self.chunk_size_bytes.is_power_of_two()
            || self.chunk_size_bytes < PAGE_SIZE_BYTES as u64
            || self.chunk_size_bytes > (1 << 30)
        {
            return Err("chunk size must be a power of two between 4 KiB and 1 GiB");
        }
        if !self.base_addr.is_multiple_of(self.chunk_size_bytes) || self.base_addr == 0 {
            return Err("space base must be non-zero and chunk-aligned");
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(self.chunk_size_bytes) {
            return Err("space size must be a non-zero multiple of the chunk size");
        }
        if self.base_addr.checked_add(self.size_bytes).is_none() || self.end_addr() > (1u64 << 47) {
            return Err("space must end below the 47-bit user address limit");
        }
        if self.root_size_bytes == 0
            || !self.root_size_bytes.is_multiple_of(PAGE_SIZE_BYTES as u64)
            || self.root_size_bytes > self.chunk_size_bytes
        {
            return Err("root size must be a non-zero page multiple no larger than a chunk");
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err("replicas must be 1 to 4");
        }
        Ok(())
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two). None on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}
