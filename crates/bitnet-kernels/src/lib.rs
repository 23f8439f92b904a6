//! The only crate in the workspace allowed to use `unsafe`.
//!
//! Each `unsafe` block is allowed one at a time and carries a `// SAFETY:` line. Today it holds
//! read-only file mapping ([`mmap`]); the SIMD ternary kernels join it as their tiers land.
//!
//! ```no_run
//! let map = bitnet_kernels::mmap::MappedFile::open("model.gguf").unwrap();
//! assert!(map.len() > 0);
//! ```

pub mod mmap;
