//! Model file formats: GGUF (read, write, dequantize), Hugging Face model directories
//! (`config.json`, single and sharded safetensors) and tokenizers (`tokenizer.json` or GGUF
//! metadata).
//!
//! Parsers take bytes they do not trust: every count, offset and size is checked before it is
//! used, and a bad file is a typed [`FormatError`], never a panic.
//!
//! ```
//! use bitnet_formats::gguf::{GgufHeader, GgufWriter};
//!
//! let mut w = GgufWriter::new();
//! w.set("general.architecture", "llama");
//! w.add_f32("norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
//! let mut bytes = Vec::new();
//! w.write_to(&mut bytes).unwrap();
//! let h = GgufHeader::parse(&bytes).unwrap();
//! assert_eq!(h.architecture(), "llama");
//! assert_eq!(h.tensors[0].dims, [4]);
//! ```

pub mod archive;
pub mod atomic;
pub mod error;
pub mod gguf;
pub mod names;

pub use error::{FormatError, Result};
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod onnx;
pub mod safetensors_dir;
pub mod tokenizer;
