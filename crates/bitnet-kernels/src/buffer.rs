//! Aligned byte buffers for weights. Large ones are aligned to 2 MiB and offered to the kernel
//! as transparent huge pages (`madvise(MADV_HUGEPAGE)`), so streaming a matrix walks one TLB
//! entry per 2 MiB instead of per 4 KiB.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};

/// Sizes from which a buffer asks for huge pages.
const HUGE: usize = 2 << 20;

/// A zero-initialised, aligned, owned byte buffer.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer owns its memory exclusively, like a `Vec<u8>`.
#[allow(unsafe_code)]
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
#[allow(unsafe_code)]
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes, 64-byte aligned (2 MiB aligned and huge-page advised when large).
    pub fn zeroed(len: usize) -> Self {
        let align = if len >= HUGE { HUGE } else { 64 };
        let layout = Layout::from_size_align(len.max(1), align).expect("valid buffer layout");
        #[allow(unsafe_code)]
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if len >= HUGE {
            #[allow(unsafe_code)]
            // SAFETY: advice on memory this buffer owns; failure only means no huge pages.
            unsafe {
                libc::madvise(raw as *mut libc::c_void, layout.size(), libc::MADV_HUGEPAGE);
            }
        }
        Self { ptr, len, layout }
    }

    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        #[allow(unsafe_code)]
        // SAFETY: `ptr` points to `len` initialised (zeroed or written) bytes owned by `self`.
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        #[allow(unsafe_code)]
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len)
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe {
            dealloc(self.ptr.as_ptr(), self.layout)
        }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}
