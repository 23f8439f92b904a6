//! The error type of `bitnet-model`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] bitnet_formats::FormatError),
    #[error(transparent)]
    Core(#[from] bitnet_core::CoreError),
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tensor {name:?}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error(
        "the sequence would be {needed} tokens long, past the context of {ctx} (shorten the prompt, lower -n, or raise --ctx)"
    )]
    ContextFull { needed: usize, ctx: usize },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
