//! Ternary (1.58-bit) quantization math and packed block formats.
//!
//! Everything here is pure computation on slices: no I/O, no `unsafe`, no threads.
//!
//! * [`quant`]: absmean weight ternarization (per tensor, per output channel, per group) and
//!   per-token int8 absmax activation quantization, bit-exact with Hugging Face transformers
//!   (`src/transformers/integrations/bitnet.py`).
//! * [`metrics`]: error of a quantized tensor against its float original.
//! * [`packed`]: the on-disk ternary layouts (Hugging Face packed 2B-4T, llama.cpp TQ1_0 / TQ2_0,
//!   bitnet.cpp I2_S) with exact pack/unpack and conversion between them.
//!
//! ```
//! use bitnet_core::quant::{ternarize, Granularity};
//!
//! let w = [0.4f32, -0.05, -0.9, 0.2, 0.0, 1.3];
//! let t = ternarize(&w, 2, 3, Granularity::PerTensor).unwrap();
//! assert_eq!(t.codes, [1, 0, -1, 0, 0, 1]);
//! // Dequantized weight = code * scale, scale = mean |W|.
//! assert!((t.scales[0] - 0.475).abs() < 1e-6);
//! ```

pub mod error;
pub mod metrics;
pub mod packed;
pub mod quant;
pub mod reduce;

pub use error::{CoreError, Result};
pub use half::{bf16, f16};
