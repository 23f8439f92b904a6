//! The error type of `bitnet-formats`: every variant names the file part that is wrong.

use std::path::PathBuf;

/// Errors reading or writing model files. Parsing never panics and never allocates by an
/// unchecked count: a hostile header ends here, with the byte offset where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: it starts with {}, not \"GGUF\"", show_magic(found))]
    BadMagic { found: [u8; 4] },
    #[error(
        "big-endian GGUF files are not supported (version field reads {version:#x} little-endian)"
    )]
    BigEndian { version: u32 },
    #[error("GGUF version {version} is not supported (this reader handles versions 2 and 3)")]
    UnsupportedVersion { version: u32 },
    #[error(
        "file truncated: {what} at byte {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error(
        "{what} count {count} at byte {offset} is impossible: the {available} remaining bytes hold at most {max}"
    )]
    ImpossibleCount {
        what: &'static str,
        count: u64,
        offset: u64,
        available: u64,
        max: u64,
    },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    BadUtf8 { what: String, offset: u64 },
    #[error("unknown GGUF metadata value type {type_id} for key {key:?} at byte {offset}")]
    BadValueType {
        key: String,
        type_id: u32,
        offset: u64,
    },
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels")]
    TooDeep { key: String, max: usize },
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("metadata {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("invalid general.alignment {0}: must be a power of two between 1 and 2^30")]
    BadAlignment(u64),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor {name:?}: unknown ggml type id {type_id}")]
    UnknownType { name: String, type_id: u32 },
    #[error("tensor {name:?} has type {ty}, which this build cannot dequantize")]
    CannotDequantize { name: String, ty: String },
    #[error("tensor {name:?} not found")]
    MissingTensor { name: String },
    #[error("metadata key {key:?} not found")]
    MissingKey { key: String },
    #[error("safetensors {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Core(#[from] bitnet_core::CoreError),
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// The first bytes of a file that is not GGUF, as text when they are printable.
fn show_magic(b: &[u8; 4]) -> String {
    if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        b.iter()
            .map(|c| format!("{c:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FormatError {
    let path = path.into();
    move |source| FormatError::Io { path, source }
}
