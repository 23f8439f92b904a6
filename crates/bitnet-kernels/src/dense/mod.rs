//! Float rows times float activations, for the parts of a model that are not ternary: f32 and
//! f16 rows (the lm_head and embeddings the anchors keep in f16), and llama.cpp's Q8_0 / Q4_1
//! blocks multiplied in place (no dequantized copy).
//!
//! **One order for every tier.** Each dot product accumulates in 16 lanes with fused
//! multiply-adds (element `i` of a run of 16 into lane `i % 16`; Q8_0 / Q4_1 keep one 16-lane
//! accumulator per block half and add the two at the end), reduces the lanes in one fixed tree
//! (`(i, i + 8)`, `(i, i + 4)`, `(i, i + 2)`, `(0, 1)`), then adds the elements past the last
//! whole run in order. AVX-512 holds a 16-lane accumulator in one register, AVX2 in two, the
//! scalar tier in an array with `mul_add`: all three give the same bits, which the tests check
//! with `==` on every tier the CPU has. The blocked forms (4 f16 rows x 4 tokens, 2 block rows x 4
//! tokens) keep one accumulator per (row, token) in that order, so a token's numbers never depend
//! on its batch (the server relies on it).
//!
//! [`gemm_par`] is the entry point, shaped like the ternary one: the rows of a product split
//! between the pool's threads, each thread blocking its rows against the tokens.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod scalar;

use crate::cpu::{Tier, features};
use crate::pool::{self, ThreadPool};

/// Bytes of a Q8_0 block (ggml `block_q8_0`: f16 scale, 32 x i8), `ggml-common.h`.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of a Q4_1 block (ggml `block_q4_1`: f16 scale, f16 minimum, 16 bytes of nibbles).
pub const Q4_1_BYTES: usize = 20;

/// The shared reduction tree of 16 lanes.
#[inline]
pub(crate) fn reduce16(a: &[f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2: [f32; 2] = std::array::from_fn(|i| s4[i] + s4[i + 2]);
    s2[0] + s2[1]
}

/// A row type these kernels multiply in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseType {
    F32,
    F16,
    Q8_0,
    Q4_1,
}

impl DenseType {
    /// Bytes of a row of `cols` weights; `None` when the blocks do not tile the row.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        match self {
            DenseType::F32 => Some(4 * cols),
            DenseType::F16 => Some(2 * cols),
            DenseType::Q8_0 => cols.is_multiple_of(32).then_some(cols / 32 * Q8_0_BYTES),
            DenseType::Q4_1 => cols.is_multiple_of(32).then_some(cols / 32 * Q4_1_BYTES),
        }
    }
}

/// The SIMD level a tier gives the float kernels on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn level(tier: Tier) -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        if tier >= Tier::Avx512 && f.avx512bw {
            return Level::Avx512;
        }
        if tier >= Tier::Avx2 && f.avx2 && f.fma && f.f16c {
            return Level::Avx2;
        }
    }
    let _ = (tier, features);
    Level::Scalar
}

/// One row's dot product: `sum w[i] * x[i]`, `w` the row's bytes, `x` its activations.
pub type RowDot = fn(&[u8], &[f32]) -> f32;

/// A SIMD row kernel behind a safe signature: it checks the row's length itself, and is only
/// handed out by [`row_dot`] once its tier's features were detected.
macro_rules! checked {
    ($name:ident, $ty:expr, $kernel:expr) => {
        pub(super) fn $name(w: &[u8], x: &[f32]) -> f32 {
            assert_eq!(
                $ty.row_bytes(x.len()),
                Some(w.len()),
                "{:?} row of {}",
                $ty,
                x.len()
            );
            #[allow(unsafe_code)]
            // SAFETY: `row_dot` returns this function only after detecting the features the
            // kernel is compiled for, and the row holds exactly `x.len()` weights (asserted).
            unsafe {
                $kernel(w, x)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod checked {
    use super::*;
    checked!(avx512_f32, DenseType::F32, avx512::dot::<4>);
    checked!(avx512_f16, DenseType::F16, avx512::dot::<2>);
    checked!(
        avx512_q8_0,
        DenseType::Q8_0,
        avx512::dot_blocks::<Q8_0_BYTES>
    );
    checked!(
        avx512_q4_1,
        DenseType::Q4_1,
        avx512::dot_blocks::<Q4_1_BYTES>
    );
    checked!(avx2_f32, DenseType::F32, avx2::dot::<4>);
    checked!(avx2_f16, DenseType::F16, avx2::dot::<2>);
    checked!(avx2_q8_0, DenseType::Q8_0, avx2::dot_blocks::<Q8_0_BYTES>);
    checked!(avx2_q4_1, DenseType::Q4_1, avx2::dot_blocks::<Q4_1_BYTES>);
}

/// The row kernel for `ty` on `tier`, chosen once per product (a product calls it per row and
/// token: short rows make a per-call dispatch visible).
pub fn row_dot(tier: Tier, ty: DenseType) -> RowDot {
    match level(tier) {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => match ty {
            DenseType::F32 => checked::avx512_f32,
            DenseType::F16 => checked::avx512_f16,
            DenseType::Q8_0 => checked::avx512_q8_0,
            DenseType::Q4_1 => checked::avx512_q4_1,
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => match ty {
            DenseType::F32 => checked::avx2_f32,
            DenseType::F16 => checked::avx2_f16,
            DenseType::Q8_0 => checked::avx2_q8_0,
            DenseType::Q4_1 => checked::avx2_q4_1,
        },
        Level::Scalar => match ty {
            DenseType::F32 => scalar::dot_f32,
            DenseType::F16 => scalar::dot_f16,
            DenseType::Q8_0 => scalar::dot_q8_0,
            DenseType::Q4_1 => scalar::dot_q4_1,
        },
    }
}

/// `sum w[i] * x[i]` over one row of `ty` (`w` its bytes, `x` its `cols` activations).
pub fn dot(tier: Tier, ty: DenseType, w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(
        ty.row_bytes(x.len()),
        Some(w.len()),
        "{ty:?} row of {}",
        x.len()
    );
    row_dot(tier, ty)(w, x)
}

/// `sum a[i] * b[i]` of two f32 slices, in the shared order.
pub fn dot_f32(tier: Tier, a: &[f32], b: &[f32]) -> f32 {
    dot(tier, DenseType::F32, bytemuck::cast_slice(a), b)
}

/// Four f16 rows against one token, each result bitwise its [`dot`].
pub fn dot_f16_x4(tier: Tier, w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    for r in &w {
        assert_eq!(r.len(), 2 * x.len());
    }
    #[cfg(target_arch = "x86_64")]
    if level(tier) == Level::Avx512 {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 detected; every row holds exactly `x.len()` halves (asserted).
        return unsafe { avx512::dot_f16_x4(w, x) };
    }
    w.map(|r| dot(tier, DenseType::F16, r, x))
}

/// Four f16 rows against four tokens (`out[row][token]`), each result bitwise its [`dot`].
pub fn dot_f16_4x4(tier: Tier, w: [&[u8]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = x[0].len();
    for r in &w {
        assert_eq!(r.len(), 2 * n);
    }
    for t in &x {
        assert_eq!(t.len(), n);
    }
    #[cfg(target_arch = "x86_64")]
    if level(tier) == Level::Avx512 {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 detected; every row holds `n` halves and every token `n` floats
        // (asserted).
        return unsafe { avx512::dot_f16_4x4(w, x) };
    }
    w.map(|r| x.map(|t| dot(tier, DenseType::F16, r, t)))
}

/// Two rows of Q8_0 or Q4_1 blocks against four tokens (`out[row][token]`), each result
/// bitwise its [`dot`].
pub fn dot_blocks_2x4(tier: Tier, ty: DenseType, w: [&[u8]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    let n = x[0].len();
    for r in &w {
        assert_eq!(ty.row_bytes(n), Some(r.len()), "{ty:?} row of {n}");
    }
    for t in &x {
        assert_eq!(t.len(), n);
    }
    #[cfg(target_arch = "x86_64")]
    if level(tier) == Level::Avx512 && matches!(ty, DenseType::Q8_0 | DenseType::Q4_1) {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 detected; both rows hold `n / 32` whole blocks of `ty` and every
        // token `n` floats (asserted).
        return unsafe {
            if ty == DenseType::Q8_0 {
                avx512::dot_blocks_2x4::<Q8_0_BYTES>(w, x)
            } else {
                avx512::dot_blocks_2x4::<Q4_1_BYTES>(w, x)
            }
        };
    }
    w.map(|r| x.map(|t| dot(tier, ty, r, t)))
}

/// `rows` rows of `ty`, `row_bytes` each, back to back.
#[derive(Debug, Clone, Copy)]
pub struct DenseRows<'a> {
    pub ty: DenseType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    row_bytes: usize,
}

impl<'a> DenseRows<'a> {
    /// `None` when `data` is not `rows` whole rows of `cols` weights of `ty`.
    pub fn new(ty: DenseType, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        let rb = ty.row_bytes(cols)?;
        (rb.checked_mul(rows)? == data.len()).then_some(Self {
            ty,
            rows,
            cols,
            data,
            row_bytes: rb,
        })
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// `out[t, r] = w[r, :] . x[t, :]` for the `n` tokens of `x` (`[n, cols]`; `out` `[n, rows]`),
/// the rows split between the pool's threads. Q8_0 / Q4_1 take two rows against four tokens
/// per pass, f16 four rows against four tokens (or four rows against one), each weight widened
/// once for all of them; every result is bitwise the one-token [`dot`].
pub fn gemm_par(
    pool: &ThreadPool,
    tier: Tier,
    w: &DenseRows<'_>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), n * cols, "{n} tokens of {cols}");
    assert_eq!(out.len(), n * rows, "{n} tokens of {rows} outputs");
    let xt = |t: usize| &x[t * cols..(t + 1) * cols];
    let one = row_dot(tier, w.ty);
    pool::par_columns(pool, out, rows, rows, 16, &|range, wr| {
        let mut r = range.start;
        match w.ty {
            DenseType::Q8_0 | DenseType::Q4_1 if n >= 4 => {
                while r + 2 <= range.end {
                    let ws = [w.row(r), w.row(r + 1)];
                    let mut t = 0;
                    while t + 4 <= n {
                        let v = dot_blocks_2x4(
                            tier,
                            w.ty,
                            ws,
                            [xt(t), xt(t + 1), xt(t + 2), xt(t + 3)],
                        );
                        for (k, tk) in (t..t + 4).enumerate() {
                            wr.set_run(tk, r, &[v[0][k], v[1][k]]);
                        }
                        t += 4;
                    }
                    for t in t..n {
                        wr.set_run(t, r, &ws.map(|row| one(row, xt(t))));
                    }
                    r += 2;
                }
            }
            DenseType::F16 => {
                while r + 4 <= range.end {
                    let ws = [w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)];
                    let mut t = 0;
                    while t + 4 <= n {
                        let v = dot_f16_4x4(tier, ws, [xt(t), xt(t + 1), xt(t + 2), xt(t + 3)]);
                        for (k, tk) in (t..t + 4).enumerate() {
                            wr.set_run(tk, r, &v.map(|row| row[k]));
                        }
                        t += 4;
                    }
                    for t in t..n {
                        wr.set_run(t, r, &dot_f16_x4(tier, ws, xt(t)));
                    }
                    r += 4;
                }
            }
            _ => {}
        }
        for r in r..range.end {
            for t in 0..n {
                wr.set(t, r, one(w.row(r), xt(t)));
            }
        }
    });
}

/// [`gemm_par`] for row types without a kernel of their own: each thread dequantizes a row
/// once (`row(r, buf)`, `cols` floats) and multiplies it with every token as f32.
#[allow(clippy::too_many_arguments)] // the product's shape, as gemm_par's plus the row source
pub fn gemm_par_rows(
    pool: &ThreadPool,
    tier: Tier,
    rows: usize,
    cols: usize,
    row: &(dyn Fn(usize, &mut [f32]) + Sync),
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(x.len(), n * cols, "{n} tokens of {cols}");
    assert_eq!(out.len(), n * rows, "{n} tokens of {rows} outputs");
    let one = row_dot(tier, DenseType::F32);
    pool::par_columns(pool, out, rows, rows, 16, &|range, wr| {
        let mut buf = vec![0.0f32; cols];
        for r in range {
            row(r, &mut buf);
            let w: &[u8] = bytemuck::cast_slice(&buf);
            for t in 0..n {
                wr.set(t, r, one(w, &x[t * cols..(t + 1) * cols]));
            }
        }
    });
}

#[cfg(test)]
mod tests;
