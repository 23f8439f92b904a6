//! Model packages as users upload them: a GGUF file, an ONNX file, or a tar (optionally
//! gzip-compressed) of a Hugging Face directory. [`sniff`] tells them apart by their first
//! bytes; [`unpack_model_tar`] unpacks a tar into a fresh directory while refusing what a
//! hostile archive may carry: paths that climb out (`..`, absolute paths), links and device
//! files, duplicate names, more entries or bytes than the limits (a gzip bomb stops at the byte
//! limit, counted as it inflates), and a directory without `config.json`.

use crate::error::{FormatError, Result, io_err};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// What a model upload is, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageKind {
    Gguf,
    /// A tar archive (POSIX `ustar` magic at byte 257).
    Tar,
    /// gzip: a compressed tar, as far as models go.
    GzipTar,
    /// An ONNX model (a protobuf `ModelProto`: it opens with `ir_version`, field 1, a varint).
    Onnx,
    Unknown,
}

/// Bytes [`sniff`] wants (a tar's magic sits at 257..262).
pub const SNIFF_BYTES: usize = 512;

/// What the first bytes of a model upload are.
pub fn sniff(head: &[u8]) -> PackageKind {
    if head.starts_with(b"GGUF") {
        PackageKind::Gguf
    } else if head.starts_with(&[0x1f, 0x8b]) {
        PackageKind::GzipTar
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        PackageKind::Tar
    } else if head.first() == Some(&0x08) && head.get(1).is_some_and(|b| (3..=20).contains(b)) {
        // Field 1 (`ir_version`) as a varint with a plausible version: ONNX's files start so.
        PackageKind::Onnx
    } else {
        PackageKind::Unknown
    }
}

/// How much an archive may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    /// Bytes of all files together, after decompression.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 256 << 30,
        }
    }
}

/// An unpacked Hugging Face directory.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The directory that holds `config.json` (the archive's root, or its one top directory).
    pub model_dir: PathBuf,
    pub files: usize,
    pub bytes: u64,
}

fn refuse(message: impl Into<String>) -> FormatError {
    FormatError::Config {
        path: PathBuf::from("the archive"),
        message: message.into(),
    }
}

/// A path inside the archive made safe to join: relative, no `..`, no root, no prefix.
fn safe_path(p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(format!(
                    "entry {:?} points outside the archive",
                    p.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Counts the bytes read, refusing more than `left` (a decompression bomb stops here).
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| std::io::Error::other("the archive inflates past the size limit"))?;
        Ok(n)
    }
}

/// Unpack a tar (gzip-compressed when `gzip`) into `dest`, which must not exist yet, and find
/// its Hugging Face directory.
pub fn unpack_model_tar<R: Read>(
    reader: R,
    gzip: bool,
    dest: &Path,
    limits: Limits,
) -> Result<Unpacked> {
    std::fs::create_dir(dest).map_err(io_err(dest))?;
    // A tar of n bytes of files is a little more than n bytes: headers and padding.
    let cap = limits
        .max_bytes
        .saturating_add(limits.max_entries as u64 * 1536)
        .saturating_add(1 << 20);
    let input: Box<dyn Read> = if gzip {
        Box::new(Capped {
            inner: flate2::read::GzDecoder::new(reader),
            left: cap,
        })
    } else {
        Box::new(Capped {
            inner: reader,
            left: cap,
        })
    };
    let mut archive = tar::Archive::new(input);
    let mut seen = std::collections::HashSet::new();
    let (mut files, mut bytes) = (0usize, 0u64);
    let entries = archive
        .entries()
        .map_err(|e| refuse(format!("not a tar archive: {e}")))?;
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| refuse(format!("entry {i} is unreadable: {e}")))?;
        if i >= limits.max_entries {
            return Err(refuse(format!("more than {} entries", limits.max_entries)));
        }
        let raw = entry
            .path()
            .map_err(|e| refuse(format!("entry {i} has an unreadable name: {e}")))?
            .into_owned();
        let rel = safe_path(&raw)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if !rel.as_os_str().is_empty() {
                std::fs::create_dir_all(dest.join(&rel)).map_err(io_err(dest.join(&rel)))?;
            }
            continue;
        }
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
        {
            continue;
        }
        if !kind.is_file() {
            return Err(refuse(format!(
                "entry {:?} is a {}; only files and directories are taken",
                raw.display(),
                match kind {
                    tar::EntryType::Symlink => "symbolic link",
                    tar::EntryType::Link => "hard link",
                    tar::EntryType::Char | tar::EntryType::Block => "device",
                    tar::EntryType::Fifo => "fifo",
                    _ => "special entry",
                }
            )));
        }
        if rel.as_os_str().is_empty() {
            return Err(refuse(format!("entry {i} has an empty name")));
        }
        if !seen.insert(rel.clone()) {
            return Err(refuse(format!("entry {:?} appears twice", raw.display())));
        }
        let size = entry.size();
        bytes = bytes.saturating_add(size);
        if bytes > limits.max_bytes {
            return Err(refuse(format!(
                "the files hold more than {} bytes (entry {:?} says {size})",
                limits.max_bytes,
                raw.display()
            )));
        }
        let path = dest.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let copied = std::io::copy(&mut (&mut entry).take(size), &mut out)
            .map_err(|e| refuse(format!("entry {:?} is cut short: {e}", raw.display())))?;
        if copied != size {
            return Err(refuse(format!(
                "entry {:?} is cut short: {copied} of {size} bytes",
                raw.display()
            )));
        }
        out.flush().map_err(io_err(&path))?;
        files += 1;
    }
    if files == 0 {
        return Err(refuse("the archive holds no files"));
    }
    // config.json at the root, or in the one directory the archive holds.
    let model_dir = if dest.join("config.json").is_file() {
        dest.to_path_buf()
    } else {
        let subdirs: Vec<PathBuf> = std::fs::read_dir(dest)
            .map_err(io_err(dest))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        match subdirs.as_slice() {
            [one] if one.join("config.json").is_file() => one.clone(),
            _ => {
                return Err(refuse(
                    "no config.json: a Hugging Face model directory has config.json at its top",
                ));
            }
        }
    };
    Ok(Unpacked {
        model_dir,
        files,
        bytes,
    })
}
