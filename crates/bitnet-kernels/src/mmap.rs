//! Read-only memory-mapped files: weights are read in place, never copied.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A whole file mapped read-only. Dereferences to its bytes.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Option<memmap2::Mmap>,
    /// Bytes held in memory instead of a mapping (derived tensors, e.g. a transposed weight).
    owned: Option<Vec<u8>>,
}

impl MappedFile {
    /// Map `path` read-only. An empty file maps to an empty slice.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Self {
                path,
                map: None,
                owned: None,
            });
        }
        #[allow(unsafe_code)]
        // SAFETY: the map is read-only and private. The one hazard is another process
        // truncating or rewriting the file while it is mapped; model files are written by
        // rename-into-place (ours) and treated as immutable, which is the contract every
        // mmap-based model loader (llama.cpp, candle, safetensors) relies on.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Self {
            path,
            map: Some(map),
            owned: None,
        })
    }

    /// Bytes in memory behind the same interface (`path` labels them in messages).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Self {
        Self {
            path: path.into(),
            map: None,
            owned: Some(bytes),
        }
    }

    /// Drop this process's pages of `range` (widened to whole pages): they stop counting in its
    /// resident set, and a later read faults them back in from the page cache with the same
    /// bytes. Streaming a file larger than memory should hold (conversion) calls this behind
    /// itself. Best effort: errors (and platforms without `madvise`) are ignored.
    pub fn release(&self, range: std::ops::Range<usize>) {
        let Some(map) = &self.map else { return };
        let end = range.end.min(map.len());
        if range.start >= end {
            return;
        }
        #[cfg(unix)]
        #[allow(unsafe_code)]
        // SAFETY: MADV_DONTNEED on a read-only file mapping that is never written only drops
        // page-table entries; every byte reads back unchanged (from the page cache or the file),
        // so references into the map stay valid and see the same values.
        unsafe {
            let _ = map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                end - range.start,
            );
        }
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match (&self.map, &self.owned) {
            (Some(m), _) => m,
            (None, Some(v)) => v,
            (None, None) => &[],
        }
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_and_reads() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"GGUF1234").unwrap();
        let m = MappedFile::open(f.path()).unwrap();
        assert_eq!(&m[..4], b"GGUF");
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(MappedFile::open(empty.path()).unwrap().len(), 0);
        assert!(MappedFile::open("/nonexistent/file").is_err());
        // Released pages read back the same.
        m.release(0..8);
        #[allow(clippy::reversed_empty_ranges)] // an empty (backwards) range is a no-op
        m.release(4..2);
        m.release(0..1 << 40);
        assert_eq!(&m[..], b"GGUF1234");
    }
}
