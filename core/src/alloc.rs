//! The allocator a node runs over the chunks it leased: first fit over coalesced free
//! extents, with a record of every live block so frees are checked, never trusted.

use std::collections::BTreeMap;

use crate::types::{align_up, MIN_ALIGN_BYTES};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FreeError {
    /// Not the start of a live block: a double free or a wild pointer.
    InvalidFree,
}

#[derive(Default, Debug, Clone)]
pub struct ExtentAllocator {
    /// Free extents: start → length, never adjacent (always coalesced), never overlapping.
    free: BTreeMap<u64, u64>,
    /// Live blocks: start → length.
    live: BTreeMap<u64, u64>,
    /// Reserved ranges (the root block): start → length. Never freed, so a `free` of
    /// them is refused like any other address that is not a live block.
    reserved: BTreeMap<u64, u64>,
    /// Address ranges handed to this allocator (leased chunks): start → length.
    regions: BTreeMap<u64, u64>,
    pub live_bytes: u64,
    pub region_bytes: u64,
}

impl ExtentAllocator {
    pub fn new() -> ExtentAllocator {
        ExtentAllocator::default()
    }

    /// Adds a leased range to carve from.
    pub fn add_region(&mut self, start: u64, len: u64) {
        assert!(len > 0);
        assert!(
            !self.overlaps_region(start, len),
            "region {start:#x}+{len:#x} added twice"
        );
        self.regions.insert(start, len);
        self.region_bytes += len;
        self.insert_free(start, len);
    }

    /// Marks `[start, start+len)` as used without carving (the root block).
    pub fn reserve(&mut self, start: u64, len: u64) -> bool {
        let Some((&free_start, &free_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if start + len > free_start + free_len {
            return false;
        }
        self.carve(free_start, free_len, start, len);
        self.reserved.insert(start, len);
        true
    }

    pub fn regions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.regions.iter().map(|(&s, &l)| (s, l))
    }

    pub fn live_blocks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.live.iter().map(|(&s, &l)| (s, l))
    }

    fn overlaps_region(&self, start: u64, len: u64) -> bool {
        if let Some((&s, &l)) = self.regions.range(..start + len).next_back() {
            if s + l > start {
                return true;
            }
        }
        false
    }

    pub fn owns(&self, addr: u64) -> bool {
        match self.regions.range(..=addr).next_back() {
            Some((&s, &l)) => addr < s + l,
            None => false,
        }
    }

    /// Rounds a request to the size actually reserved.
    pub fn block_size(size_bytes: u64) -> Option<u64> {
        align_up(size_bytes.max(1), MIN_ALIGN_BYTES)
    }

    /// First fit. `align_bytes` is a power of two. Returns the block start.
    pub fn allocate(&mut self, size_bytes: u64, align_bytes: u64) -> Option<u64> {
        debug_assert!(align_bytes.is_power_of_two());
        let align = align_bytes.max(MIN_ALIGN_BYTES);
        let size = Self::block_size(size_bytes)?;
        let mut found = None;
        for (&start, &len) in &self.free {
            let Some(aligned) = align_up(start, align) else {
                continue;
            };
            if aligned
                .checked_add(size)
                .is_some_and(|end| end <= start + len)
            {
                found = Some((start, len, aligned));
                break;
            }
        }
        let (free_start, free_len, aligned) = found?;
        self.take(free_start, free_len, aligned, size);
        Some(aligned)
    }

    /// Carves a live block out of the free extent at `free_start`.
    fn take(&mut self, free_start: u64, free_len: u64, start: u64, len: u64) {
        self.carve(free_start, free_len, start, len);
        let previous = self.live.insert(start, len);
        assert!(previous.is_none(), "live block carved twice at {start:#x}");
        self.live_bytes += len;
    }

    /// Removes `[start, start+len)` from the free extent at `free_start`, keeping the rest.
    fn carve(&mut self, free_start: u64, free_len: u64, start: u64, len: u64) {
        debug_assert!(free_start <= start && start + len <= free_start + free_len);
        self.free.remove(&free_start);
        if start > free_start {
            self.free.insert(free_start, start - free_start);
        }
        let end = start + len;
        let free_end = free_start + free_len;
        if end < free_end {
            self.free.insert(end, free_end - end);
        }
    }

    /// Frees the block starting at `addr`; returns its size.
    pub fn free(&mut self, addr: u64) -> Result<u64, FreeError> {
        let Some(len) = self.live.remove(&addr) else {
            return Err(FreeError::InvalidFree);
        };
        self.live_bytes -= len;
        self.insert_free(addr, len);
        Ok(len)
    }

    /// The leased region that holds `addr`: (start, length).
    pub fn region_of(&self, addr: u64) -> Option<(u64, u64)> {
        let (&start, &len) = self.regions.range(..=addr).next_back()?;
        (addr < start + len).then_some((start, len))
    }

    /// Whether no live or reserved byte lies in `[start, start+len)`.
    pub fn is_free_range(&self, start: u64, len: u64) -> bool {
        self.free
            .range(..=start)
            .next_back()
            .is_some_and(|(&s, &l)| s + l >= start + len)
    }

    /// Takes back a region that holds no block (to give it back to the cluster).
    /// Returns false, changing nothing, if it is not a region or not empty.
    pub fn remove_region(&mut self, start: u64) -> bool {
        let Some(&len) = self.regions.get(&start) else {
            return false;
        };
        let Some((&free_start, &free_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if free_start + free_len < start + len {
            return false;
        }
        self.carve(free_start, free_len, start, len);
        self.regions.remove(&start);
        self.region_bytes -= len;
        true
    }

    pub fn size_of(&self, addr: u64) -> Option<u64> {
        self.live.get(&addr).copied()
    }

    fn insert_free(&mut self, mut start: u64, mut len: u64) {
        // Coalesce with the previous extent.
        if let Some((&prev_start, &prev_len)) = self.free.range(..start).next_back() {
            assert!(prev_start + prev_len <= start, "free extents overlap");
            if prev_start + prev_len == start {
                self.free.remove(&prev_start);
                start = prev_start;
                len += prev_len;
            }
        }
        // Coalesce with the next extent.
        if let Some((&next_start, &next_len)) = self.free.range(start..).next() {
            assert!(start + len <= next_start, "free extents overlap");
            if start + len == next_start {
                self.free.remove(&next_start);
                len += next_len;
            }
        }
        self.free.insert(start, len);
    }

    /// Checks the allocator's own invariants; used by tests and the simulator.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut spans: Vec<(u64, u64, &str)> = Vec::new();
        spans.extend(self.free.iter().map(|(&s, &l)| (s, l, "free")));
        spans.extend(self.live.iter().map(|(&s, &l)| (s, l, "live")));
        spans.extend(self.reserved.iter().map(|(&s, &l)| (s, l, "reserved")));
        spans.sort();
        for pair in spans.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.0 + a.1 > b.0 {
                return Err(format!(
                    "{} extent {:#x}+{:#x} overlaps {} extent {:#x}+{:#x}",
                    a.2, a.0, a.1, b.2, b.0, b.1
                ));
            }
        }
        for &(s, l, kind) in &spans {
            if !self.owns(s) || !self.owns(s + l - 1) {
                return Err(format!(
                    "{kind} extent {s:#x}+{l:#x} outside leased regions"
                ));
            }
        }
        let live: u64 = self.live.values().sum();
        if live != self.live_bytes {
            return Err("live byte count drifted".into());
        }
        let regions: u64 = self.regions.values().sum();
        let covered: u64 = spans.iter().map(|&(_, l, _)| l).sum();
        if regions != self.region_bytes || covered != regions {
            return Err(format!(
                "regions hold {regions:#x} bytes (counted {:#x}) but extents cover {covered:#x}",
                self.region_bytes
            ));
        }
        Ok(())
    }
}
