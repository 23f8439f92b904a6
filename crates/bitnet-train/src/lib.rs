//! Quantization-aware training of BitNet b1.58 models.
//!
//! `bitnet train --config FILE` builds a [`trainer::Trainer`] from a [`config::TrainConfig`]:
//! the model ([`model::TrainModel`], float master weights under Hugging Face names) runs
//! BitLinear forward exactly as the inference engine computes it ([`ops::WeightQuant`],
//! [`ops::ActQuant`]) with the straight-through estimator backward; [`optim::AdamW`] updates the
//! masters; [`checkpoint`] saves and restores runs bit for bit; [`export`] writes a Hugging
//! Face directory and our GGUF.
//!
//! The framework is candle (`candle-core`): it differentiates every operation the model uses.
//! On the CPU the two quantizers are custom operations (bitnet-core's functions) with an identity
//! backward; on a CUDA GPU (the `cuda` feature, built by `scripts/build-cuda.sh`) they are the
//! same formulas as tensor operations with a straight-through gradient ([`ops::act_quant_ste`]).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distill;
pub mod error;
pub mod export;
pub mod model;
pub mod ops;
pub mod optim;
pub mod tokenizer;
pub mod trainer;

pub use config::TrainConfig;

/// Whether cuBLAS may multiply f32 matrices in TF32 on the tensor cores (CUDA only; off by
/// default, and a no-op in a build without CUDA).
pub fn set_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

/// The device a run trains on: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn device(spec: &str) -> Result<candle_core::Device> {
    let bad = |message: String| TrainError::Config {
        path: "--device".into(),
        message,
    };
    let ordinal = match spec.trim() {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(bad(format!("{spec:?}: expected cpu, cuda or cuda:N"))),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(bad(format!(
            "{spec}: this bitnet was built without CUDA (build one with scripts/build-cuda.sh)"
        )));
    }
    candle_core::Device::new_cuda(ordinal)
        .map_err(|e| bad(format!("{spec}: cannot open the GPU: {e}")))
}

pub use error::{Result, TrainError};
pub use trainer::{RunOptions, StepReport, Summary, Trainer};
