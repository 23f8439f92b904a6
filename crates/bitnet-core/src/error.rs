//! The error type of `bitnet-core`.

/// Errors from quantization and packing. Each variant says what was expected and what was found.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CoreError {
    #[error("shape mismatch: {what} expects {expected} values, got {found}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{format} needs {what} to be a multiple of {multiple}, got {found}")]
    NotMultiple {
        format: &'static str,
        what: &'static str,
        multiple: usize,
        found: usize,
    },
    #[error("invalid ternary code {code} at index {index} (codes must be -1, 0 or +1)")]
    BadCode { index: usize, code: i8 },
    #[error("invalid 2-bit code 3 in {format} data at element {index} (valid codes are 0, 1, 2)")]
    BadPackedCode { format: &'static str, index: usize },
    #[error("group size must be at least 1 and divide the row length {cols}, got {group}")]
    BadGroup { group: usize, cols: usize },
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

pub(crate) fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(CoreError::Length {
            what,
            expected,
            found,
        })
    }
}
