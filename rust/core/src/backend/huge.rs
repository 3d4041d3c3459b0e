//! Memory for the packed weights, on 2 MiB pages where the kernel gives them; and the KV
//! cache's, mapped on its own (`try_mapped`).
//!
//! Decode streams every weight each step. On 4 KiB pages that is a TLB miss per page, and the
//! hardware prefetchers stop at every page boundary. Linux backs memory with transparent huge
//! pages only in 2 MiB-aligned ranges that lie whole inside a mapping advised `MADV_HUGEPAGE`
//! (the common `madvise` mode). A model's matrices are mostly smaller than that (SmolLM2's are
//! 0.7-3.5 MB in bf16), so advising each allocation's aligned interior left 84% of the weights on
//! 4 KiB pages. Here they are carved one after another out of shared 32 MiB chunks, each one
//! mapping, aligned and advised whole: every weight then lies on huge pages, and only a chunk's
//! last partly used 2 MiB page is more than the weights need.
//!
//! A chunk lives while any buffer carved from it does; the allocator itself holds the current
//! chunk only weakly, so dropping a model returns its memory.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

/// Element types whose all-zero bit pattern is a value (chunks come zeroed from the kernel).
///
/// # Safety
/// Zeroed memory must be a valid `Self`.
pub unsafe trait Zeroed: Copy + Send + Sync + 'static {}
// SAFETY: zero bits are 0 (or 0.0) for each.
unsafe impl Zeroed for u8 {}
unsafe impl Zeroed for u16 {}
unsafe impl Zeroed for u32 {}
unsafe impl Zeroed for u64 {}
unsafe impl Zeroed for f32 {}
unsafe impl Zeroed for half::bf16 {}

const HUGE_PAGE: usize = 2 << 20;
/// A chunk's size; a buffer of half of it or more gets a chunk of its own.
const CHUNK: usize = 32 << 20;
/// Buffers start on cache lines.
const ALIGN: usize = 64;

/// `len` zeroed values on 2 MiB pages where the kernel gives them.
pub fn zeroed<T: Zeroed>(len: usize) -> HugeBuf<T> {
    let failed = || std::alloc::handle_alloc_error(std::alloc::Layout::array::<T>(len).expect("buffer size overflows"));
    let bytes = len.checked_mul(size_of::<T>()).expect("buffer size overflows");
    if bytes == 0 {
        return HugeBuf::empty();
    }
    let (chunk, offset) = if bytes >= CHUNK / 2 {
        (Arc::new(Chunk::map(bytes.next_multiple_of(HUGE_PAGE), true).unwrap_or_else(failed)), 0)
    } else {
        static CURRENT: Mutex<Option<(Weak<Chunk>, usize)>> = Mutex::new(None);
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let open = current.as_ref().and_then(|(weak, used)| Some((weak.upgrade()?, used.next_multiple_of(ALIGN))));
        let (chunk, offset) = match open {
            Some((chunk, at)) if at + bytes <= chunk.size => (chunk, at),
            _ => (Arc::new(Chunk::map(CHUNK, true).unwrap_or_else(failed)), 0),
        };
        *current = Some((Arc::downgrade(&chunk), offset + bytes));
        (chunk, offset)
    };
    // SAFETY: offset + bytes lies inside the chunk (checked or sized above), which no other
    // buffer covers (offsets only grow); ALIGN and the chunk's page alignment align T.
    let ptr = unsafe { chunk.base.add(offset) } as *mut T;
    HugeBuf { ptr, len, _chunk: Some(chunk) }
}

/// `len` zeroed values in a mapping of their own, on ordinary pages, or `None` where the memory
/// cannot be had: the KV cache, whose size the user picks (an error then, where an allocation
/// that fails ends the process). Its pages cost nothing until a block is written, and go back to
/// the kernel when it is dropped, where an allocator may keep them (and hand them to the next
/// engine a notebook makes zeroed again, all resident).
pub fn try_mapped<T: Zeroed>(len: usize) -> Option<HugeBuf<T>> {
    let bytes = len.checked_mul(size_of::<T>())?;
    if bytes == 0 {
        return Some(HugeBuf::empty());
    }
    let chunk = Arc::new(Chunk::map(bytes, false)?);
    Some(HugeBuf { ptr: chunk.base as *mut T, len, _chunk: Some(chunk) })
}

/// A fixed-length buffer carved from a chunk (`zeroed`): a slice that keeps its chunk mapped.
pub struct HugeBuf<T: Zeroed> {
    ptr: *mut T,
    len: usize,
    _chunk: Option<Arc<Chunk>>,
}

impl<T: Zeroed> HugeBuf<T> {
    fn empty() -> Self {
        HugeBuf { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, _chunk: None }
    }
}

// SAFETY: the buffer owns its values (no other buffer overlaps them), like a Vec<T>.
unsafe impl<T: Zeroed> Send for HugeBuf<T> {}
// SAFETY: shared access only reads.
unsafe impl<T: Zeroed> Sync for HugeBuf<T> {}

impl<T: Zeroed> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised (zeroed) values at `ptr`, alive while the chunk is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Zeroed> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and this buffer is the only one over these values.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// One mapping of `size` zeroed bytes: 2 MiB-aligned and advised onto huge pages where `huge`.
struct Chunk {
    base: *mut u8,
    size: usize,
}

// SAFETY: plain memory; buffers carved from it do not overlap.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

#[cfg(target_os = "linux")]
impl Chunk {
    fn map(size: usize, huge: bool) -> Option<Chunk> {
        // Map a huge page more than asked, then trim to an aligned range (the kernel aligns only
        // some anonymous mappings itself).
        let span = if huge { size.checked_add(HUGE_PAGE)? } else { size };
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        if !huge {
            return Some(Chunk { base: raw as *mut u8, size });
        }
        let start = (raw as usize).next_multiple_of(HUGE_PAGE);
        let (head, tail) = (start - raw as usize, raw as usize + span - (start + size));
        // SAFETY: the head and tail are parts of the mapping just made, outside [start, start +
        // size); the advice only changes how untouched pages get backed (failure is harmless).
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        Some(Chunk { base: start as *mut u8, size })
    }
}

#[cfg(target_os = "linux")]
impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `map`; every buffer carved from it is gone (they hold it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

#[cfg(not(target_os = "linux"))]
impl Chunk {
    fn map(size: usize, _huge: bool) -> Option<Chunk> {
        let layout = std::alloc::Layout::from_size_align(size, HUGE_PAGE).ok()?;
        // SAFETY: a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        (!base.is_null()).then_some(Chunk { base, size })
    }
}

#[cfg(not(target_os = "linux"))]
impl Drop for Chunk {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.size, HUGE_PAGE).expect("layout");
        // SAFETY: allocated by `map` with this layout.
        unsafe { std::alloc::dealloc(self.base, layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_aligned_and_outlive_each_other() {
        let mut a = zeroed::<f32>(1000);
        let mut b = zeroed::<u16>(3);
        let big = zeroed::<u8>(CHUNK);
        assert!(a.iter().all(|&x| x == 0.0) && b.iter().all(|&x| x == 0) && big.iter().all(|&x| x == 0));
        assert_eq!((a.len(), b.len(), big.len()), (1000, 3, CHUNK));
        assert!((a.as_ptr() as usize).is_multiple_of(ALIGN) && (b.as_ptr() as usize).is_multiple_of(ALIGN));
        assert!((big.as_ptr() as usize).is_multiple_of(HUGE_PAGE), "a chunk of its own starts on a huge page");
        a.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        b.fill(7);
        // Writing one buffer leaves the others as they were.
        assert!(a.iter().enumerate().all(|(i, &x)| x == i as f32) && b.iter().all(|&x| x == 7));
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert!(pb >= pa + 4000 || pb + 6 <= pa, "overlapping buffers");
        drop(a);
        // b keeps the shared chunk mapped after a is gone.
        assert!(b.iter().all(|&x| x == 7));
        assert!(zeroed::<u64>(0).is_empty());
    }

    #[test]
    fn a_chunk_is_unmapped_with_its_last_buffer() {
        // A chunk of its own (half a chunk or more), so no other test's buffer shares it.
        let first = zeroed::<u8>(CHUNK / 2);
        let weak = Arc::downgrade(first._chunk.as_ref().unwrap());
        let second = HugeBuf { ptr: first.ptr, len: 0, _chunk: first._chunk.clone() };
        drop(first);
        assert!(weak.upgrade().is_some(), "a buffer still holds it");
        drop(second);
        assert!(weak.upgrade().is_none(), "nothing holds it: unmapped");
    }

    #[test]
    fn a_mapping_of_its_own_is_zeroed_or_refused() {
        let mut kv = try_mapped::<f32>(3000).unwrap();
        assert!(kv.len() == 3000 && kv.iter().all(|&x| x == 0.0));
        kv[2999] = 1.5;
        assert_eq!(kv[2999], 1.5);
        assert!(try_mapped::<half::bf16>(0).unwrap().is_empty());
        // More than any address space, and more than a usize of bytes: `None`, not an abort.
        assert!(try_mapped::<u8>(1 << 62).is_none());
        assert!(try_mapped::<f32>(usize::MAX / 2).is_none());
    }
}
