//! Quantization-aware training of BitNet b1.58 models.
//!
//! `bitnet train --config FILE` builds a [`trainer::Trainer`] from a [`config::TrainConfig`]:
//! the model ([`model::TrainModel`], float master weights under Hugging Face names) runs
//! BitLinear forward exactly as the inference engine computes it ([`ops::WeightQuant`],
//! [`ops::ActQuant`]) with the straight-through estimator backward; [`optim::AdamW`] updates the
//! masters; [`checkpoint`] saves and restores runs bit for bit; [`export`] writes a Hugging
//! Face directory and our GGUF.
//!
//! The framework is candle (`candle-core`): its CPU backend differentiates every operation the
//! model uses, and the two quantizers are custom operations with an identity backward.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod model;
pub mod ops;
pub mod optim;
pub mod tokenizer;
pub mod trainer;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use trainer::{RunOptions, StepReport, Summary, Trainer};
