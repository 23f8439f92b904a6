//! What can go wrong while training, each with the file it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The TOML config or a flag is wrong: unknown key, bad value, shapes that do not divide.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The training data cannot be used.
    #[error("data {path}: {message}")]
    Data { path: PathBuf, message: String },
    /// A checkpoint cannot be read, or belongs to another run.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The loss or a gradient became NaN or infinite.
    #[error("step {step}: {message}")]
    Diverged { step: u64, message: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Format(#[from] bitnet_formats::FormatError),
    #[error(transparent)]
    Model(#[from] bitnet_model::ModelError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
