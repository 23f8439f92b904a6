//! Writes that never leave half a file: write a temporary file beside the target, fsync it,
//! rename it into place, fsync the directory.

use crate::error::{FormatError, Result, io_err};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Create `path` atomically from what `fill` writes. On any error (including a full disk) the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !dir.is_dir() {
        return Err(FormatError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the output's directory does not exist: create it first",
            ),
        });
    }
    let prefix = format!(".{name}.");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".tmp");
    // Created as any new file is (0666 less the umask), not tempfile's private 0600: the
    // result is an ordinary output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = b.tempfile_in(dir).map_err(io_err(dir))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    fill(&mut w)?;
    let tmp = w.into_inner().map_err(|e| FormatError::Io {
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| FormatError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// [`write_atomic`] of bytes already in memory.
pub fn write_atomic_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes).map_err(io_err(path)))
}
