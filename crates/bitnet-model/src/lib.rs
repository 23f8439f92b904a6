//! Llama-family and BitNet b1.58 transformers on the CPU: loading from Hugging Face directories
//! (float master weights ternarized at load, or the packed 2B-4T layout) and GGUF (ours,
//! llama.cpp's TQ types, bitnet.cpp's I2_S, plain float/Q8_0/Q4 llama files), a KV cache,
//! batched prefill and multi-sequence decode, sampling, generation and chat templates.
//!
//! ```no_run
//! use bitnet_model::{generate::{generate, GenerateOptions}, load};
//!
//! let m = load("model.gguf").unwrap();
//! let tok = m.tokenizer.as_ref().unwrap();
//! let prompt = tok.encode("The capital of France is", true).unwrap();
//! let mut cache = m.model.new_cache();
//! let opts = GenerateOptions { max_new_tokens: 16, ..Default::default() };
//! let out = generate(&m.model, Some(tok), &prompt, &opts, &mut cache, &mut |t| print!("{t}")).unwrap();
//! println!("\n{:.1} tok/s", out.gen_tok_per_sec());
//! ```

pub mod chat;
pub mod convert;
pub mod error;
pub mod generate;
pub mod kv;
pub mod linear;
mod load;
pub mod model;
pub mod ops;
pub mod quantize;
pub mod sampling;
pub mod spec;
pub mod synthetic;

pub use error::{ModelError, Result};
pub use load::{LoadedModel, load};
pub use model::{HeadQuant, Model, Step};

/// Read fault-injection settings from `FAILPOINTS` (builds with the `failpoints` feature only;
/// a no-op otherwise). Tests use `model-forward-token=return(ID)`: a forward pass holding token
/// `ID` panics inside a thread-pool share, as a kernel bug would.
pub fn failpoints_from_env() {
    #[cfg(feature = "failpoints")]
    {
        // The scenario holds the registry for the life of the process.
        let scenario = fail::FailScenario::setup();
        std::mem::forget(scenario);
    }
}
