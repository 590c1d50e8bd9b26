//! The memory that backs a space on this node: a memfd the daemon maps and hands to
//! every attached process (SCM_RIGHTS), so page bytes never cross a socket.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use gallocy_core::{PageBytes, SpaceLayout, PAGE_SIZE_BYTES};
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

pub struct SpaceMemory {
    fd: OwnedFd,
    map: *mut u8,
    size_bytes: u64,
}

impl SpaceMemory {
    pub fn create(layout: &SpaceLayout) -> Result<SpaceMemory, String> {
        let fd = memfd_create("gallocy-space", MemfdFlags::CLOEXEC)
            .map_err(|e| format!("memfd_create: {e}"))?;
        ftruncate(&fd, layout.size_bytes).map_err(|e| format!("ftruncate memfd: {e}"))?;
        // SAFETY: a fresh shared mapping of a memfd we own, at an address the kernel
        // picks; nothing else refers to that range.
        let map = unsafe {
            mmap(
                std::ptr::null_mut(),
                layout.size_bytes as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                &fd,
                0,
            )
        }
        .map_err(|e| format!("mmap of the space memfd: {e}"))?;
        Ok(SpaceMemory {
            fd,
            map: map.cast(),
            size_bytes: layout.size_bytes,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The memfd's inode number: how /proc/PID/maps names mappings of it.
    pub fn inode(&self) -> Option<u64> {
        rustix::fs::fstat(&self.fd).ok().map(|stat| stat.st_ino)
    }

    fn page_ptr(&self, page_index: u64) -> Option<*mut u8> {
        let offset = page_index.checked_mul(PAGE_SIZE_BYTES as u64)?;
        if offset + PAGE_SIZE_BYTES as u64 > self.size_bytes {
            return None;
        }
        // SAFETY: offset is inside the mapping (checked above).
        Some(unsafe { self.map.add(offset as usize) })
    }

    pub fn read_page(&self, page_index: u64) -> Option<Box<PageBytes>> {
        let ptr = self.page_ptr(page_index)?;
        let mut bytes = Box::new([0u8; PAGE_SIZE_BYTES]);
        // SAFETY: ptr..ptr+4096 is inside our mapping; the applications may still be
        // reading it, which is fine, and none may write it (their access was revoked
        // before the core asks for bytes).
        unsafe { std::ptr::copy_nonoverlapping(ptr, bytes.as_mut_ptr(), PAGE_SIZE_BYTES) };
        Some(bytes)
    }

    pub fn write_page(&self, page_index: u64, bytes: &PageBytes) -> bool {
        let Some(ptr) = self.page_ptr(page_index) else {
            return false;
        };
        // SAFETY: inside our mapping; no application has access to a page the core is
        // installing new contents into.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, PAGE_SIZE_BYTES) };
        true
    }
}

impl SpaceMemory {
    /// The 32-bit word at `offset_bytes` of page `page_index`, read atomically (the
    /// applications may be writing it with atomics at this moment).
    pub fn load_u32(&self, page_index: u64, offset_bytes: usize) -> Option<u32> {
        if !offset_bytes.is_multiple_of(4) || offset_bytes + 4 > PAGE_SIZE_BYTES {
            return None;
        }
        let ptr = self.page_ptr(page_index)?;
        // SAFETY: 4-aligned (pages are, and so is the offset) and inside our mapping,
        // which lives as long as `self`; AtomicU32 has u32's layout, and every access
        // to shared futex words is atomic or ordered by the kernel.
        let word = unsafe { &*(ptr.add(offset_bytes) as *const std::sync::atomic::AtomicU32) };
        Some(word.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// This node's memfds as the host reads futex words from them.
pub struct NodeSpaces<'a>(pub &'a std::collections::BTreeMap<gallocy_core::SpaceId, SpaceMemory>);

impl gallocy_core::host::NodeMemory for NodeSpaces<'_> {
    fn load_u32(&self, page: gallocy_core::PageId, offset_bytes: usize) -> Option<u32> {
        self.0.get(&page.space)?.load_u32(page.index, offset_bytes)
    }
}

impl SpaceMemory {
    /// Zeroes `pages` pages from `first_page` and gives their memory back to the
    /// kernel (a hole punched in the memfd reads as zeroes). False if out of range or
    /// the kernel refused.
    pub fn drop_pages(&self, first_page: u64, pages: u64) -> bool {
        let page = PAGE_SIZE_BYTES as u64;
        let (Some(offset), Some(len)) = (first_page.checked_mul(page), pages.checked_mul(page))
        else {
            return false;
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.size_bytes)
        {
            return false;
        }
        rustix::fs::fallocate(
            &self.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
    }

    /// Writes zeroes over the pages (when punching a hole is refused).
    pub fn zero_pages(&self, first_page: u64, pages: u64) {
        for index in first_page..first_page.saturating_add(pages) {
            let Some(ptr) = self.page_ptr(index) else {
                return;
            };
            // SAFETY: inside our mapping; no application has access to a released page.
            unsafe { std::ptr::write_bytes(ptr, 0, PAGE_SIZE_BYTES) };
        }
    }
}

impl Drop for SpaceMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the range mapped in `create`, which no reference outlives.
        let _ = unsafe { munmap(self.map.cast(), self.size_bytes as usize) };
    }
}
