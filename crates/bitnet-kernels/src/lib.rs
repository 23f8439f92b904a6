//! The only crate in the workspace allowed to use `unsafe`.
//!
//! Each `unsafe` block is allowed one at a time and carries a `// SAFETY:` line. It holds
//! read-only file mapping ([`mmap`]), CPU feature detection ([`cpu`]) and the ternary × int8
//! kernels ([`ternary`]) in scalar, AVX2 and AVX-512 VNNI tiers that must equal each other.
//!
//! ```
//! use bitnet_kernels::ternary::{gemm, PackedTernary, QuantizedBatch};
//!
//! let w = PackedTernary::from_codes(&[1, -1, 0, 1], 2, 2);
//! let mut x = QuantizedBatch::default();
//! x.reset(1, w.padded_cols());
//! x.token_mut(0)[..2].copy_from_slice(&[3, 5]);
//! x.finish();
//! let mut out = [0i32; 2];
//! gemm(bitnet_kernels::cpu::tier(), &w, &x, 0..w.groups(), &mut out, 2);
//! assert_eq!(out, [3 - 5, 5]);
//! ```

pub mod attention;
pub mod bandwidth;
pub mod buffer;
pub mod cpu;
pub mod dense;
pub mod int4;
pub mod int8;
pub mod mmap;
pub mod pool;
pub mod system;
pub mod ternary;
