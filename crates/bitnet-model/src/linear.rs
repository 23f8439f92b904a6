//! Linear layers: ternary (BitLinear: int8 activations × ternary codes, exact i32 dot products)
//! and dense (f32/f16/bf16/Q8_0/Q4_x weights read in place from the mapped file).
//!
//! These are the simple reference paths; the SIMD tiers of `bitnet-kernels` replace the inner
//! loops without changing results.

use crate::error::{ModelError, Result};
use bitnet_core::quant::{Granularity, ScaleConvention, TernaryMatrix, quantize_row_i8};
use bitnet_formats::gguf::{GgmlType, dequantize_into};
pub use bitnet_kernels::dense::dot_f32;
use bitnet_kernels::int4::{Int4Acts, Int4Rows};
use bitnet_kernels::int8::Int8Rows;
use bitnet_kernels::ternary::{PackedTernary, QuantizedBatch, gemm_par_map};
use bitnet_kernels::{cpu, dense, pool};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// Bytes that live either in a shared read-only mapping or in memory we own.
#[derive(Clone)]
pub struct WeightBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: std::ops::Range<usize>,
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.range.len())
    }
}

impl WeightBytes {
    /// A view into a mapping (zero-copy).
    pub fn mapped(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Self {
        Self { owner, range }
    }

    /// Bytes already in an aligned buffer.
    pub fn aligned(buf: bitnet_kernels::buffer::AlignedBuf) -> Self {
        let len = buf.len();
        Self {
            owner: Arc::new(buf),
            range: 0..len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

/// A `[rows, cols]` matrix in a ggml type, row-major (ggml's `ne0 = cols`).
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub ty: GgmlType,
    bytes: WeightBytes,
    row_bytes: usize,
}

impl DenseMatrix {
    pub fn new(
        name: &str,
        rows: usize,
        cols: usize,
        ty: GgmlType,
        bytes: WeightBytes,
    ) -> Result<Self> {
        let row_bytes = ty
            .nbytes(cols as u64, cols as u64)
            .filter(|_| ty != GgmlType::I2_S && bitnet_formats::gguf::can_dequantize(ty))
            .ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "tensor {name:?}: {ty} rows of {cols} cannot be read densely"
                ))
            })? as usize;
        if bytes.as_slice().len() != row_bytes * rows {
            return Err(ModelError::Invalid(format!(
                "tensor {name:?}: {} bytes for {rows} rows of {row_bytes}",
                bytes.as_slice().len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            ty,
            bytes,
            row_bytes,
        })
    }

    /// Dequantize row `r` into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let raw = &self.bytes.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes];
        dequantize_into("row", self.ty, raw, out).expect("row size validated at construction");
    }

    /// Dequantize `out.len()` weights from flat (row-major) index `start`, across rows. Only for
    /// element types (F32, F16, BF16), whose values do not share blocks.
    pub fn flat_into(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let size = match self.ty {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "flat reads of {other} weights (a block type)"
                )));
            }
        };
        let raw = self
            .bytes
            .as_slice()
            .get(start * size..(start + out.len()) * size)
            .ok_or_else(|| ModelError::Unsupported("read past the end of a weight".into()))?;
        Ok(dequantize_into("weights", self.ty, raw, out)?)
    }

    /// `out[t, r] = x[t, :] . W[r, :]` for `t` in `0..n`, rows split between the pool's threads.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        let pool = pool::current();
        let cols = self.cols;
        // Q8_0 / Q4_1 rows are multiplied in their blocks (no dequantized copy), one row alone
        // or two rows against four tokens with the same sums: a token's numbers do not depend
        // on its batch.
        let blocks: Option<(BlockDot, BlockDot2x4)> = match self.ty {
            GgmlType::Q8_0 if dense::block_dots_available() => {
                Some((dense::dot_q8_0, dense::dot_q8_0_2x4))
            }
            GgmlType::Q4_1 if dense::block_dots_available() => {
                Some((dense::dot_q4_1, dense::dot_q4_1_2x4))
            }
            _ => None,
        };
        pool::par_columns(&pool, out, self.rows, self.rows, 16, &|rows, w| {
            let mut buf = vec![0.0f32; cols];
            let mut rows = rows;
            let row =
                |r: usize| &self.bytes.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes];
            let xt = |t: usize| &x[t * cols..(t + 1) * cols];
            if let Some((one, two_by_four)) = blocks {
                let one = |r: usize, t: usize| one(row(r), xt(t)).expect("block dots available");
                while n >= 4 && rows.len() >= 2 {
                    let r = rows.start;
                    let mut t = 0;
                    while t + 4 <= n {
                        let v = two_by_four(
                            [row(r), row(r + 1)],
                            [xt(t), xt(t + 1), xt(t + 2), xt(t + 3)],
                        )
                        .expect("block dots available");
                        for (k, tk) in (t..t + 4).enumerate() {
                            w.set(tk, r, v[0][k]);
                            w.set(tk, r + 1, v[1][k]);
                        }
                        t += 4;
                    }
                    for t in t..n {
                        w.set(t, r, one(r, t));
                        w.set(t, r + 1, one(r + 1, t));
                    }
                    rows.start += 2;
                }
                for r in rows {
                    for t in 0..n {
                        w.set(t, r, one(r, t));
                    }
                }
                return;
            }
            if self.ty == GgmlType::F16 {
                // Four rows at a time share each activation load (bitwise the same sums).
                // Batches take four tokens at a time too (each weight widened once per four
                // tokens); every (row, token) sum is bitwise the one-token result.
                while rows.len() >= 4 {
                    let r = rows.start;
                    let ws = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                    let mut t = 0;
                    while t + 4 <= n {
                        let v = dense::dot_f16_4x4(ws, [xt(t), xt(t + 1), xt(t + 2), xt(t + 3)]);
                        for (k, tk) in (t..t + 4).enumerate() {
                            w.set_run(tk, r, &v.map(|row| row[k]));
                        }
                        t += 4;
                    }
                    for t in t..n {
                        w.set_run(t, r, &dense::dot_f16_x4(ws, xt(t)));
                    }
                    rows.start += 4;
                }
            }
            for r in rows {
                let raw = &self.bytes.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes];
                let f32_row: Option<&[f32]> = if self.ty == GgmlType::F32 {
                    bytemuck::try_cast_slice(raw).ok()
                } else {
                    None
                };
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    // Other types: a row is dequantized once and reused for every token.
                    let v = match (self.ty, f32_row) {
                        (GgmlType::F16, _) => dense::dot_f16(raw, xt),
                        (_, Some(row)) => dense::dot_f32(row, xt),
                        _ => {
                            if t == 0 {
                                self.row_into(r, &mut buf);
                            }
                            dense::dot_f32(&buf, xt)
                        }
                    };
                    w.set(t, r, v);
                }
            }
        });
    }

    pub fn bytes(&self) -> usize {
        self.bytes.as_slice().len()
    }
}

/// A one-row block dot ([`dense::dot_q8_0`], [`dense::dot_q4_1`]).
type BlockDot = fn(&[u8], &[f32]) -> Option<f32>;
/// Its two-rows-by-four-tokens form.
type BlockDot2x4 = fn([&[u8]; 2], [&[f32]; 4]) -> Option<[[f32; 4]; 2]>;

/// Exact int8 × ternary dot product.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    let tail: i32 = ra
        .iter()
        .zip(rb)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    acc.iter().sum::<i32>() + tail
}

/// A BitLinear layer: per-token int8 activations times ternary weights, the weights repacked
/// once into the kernel layout.
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    packed: PackedTernary,
    pub granularity: Granularity,
    /// The scales as stored (`mean|W|` for `Multiply`, the divisor for `Divide`), per group.
    pub scales: Vec<f32>,
    pub convention: ScaleConvention,
    /// Per-row scale when the granularity is per tensor or per channel.
    row_scales: Vec<f32>,
    /// Codes kept for the per-group path (scales finer than a row), which the fused kernels
    /// do not cover.
    grouped: Option<TernaryMatrix>,
}

impl TernaryLinear {
    pub fn new(weights: TernaryMatrix, convention: ScaleConvention) -> Self {
        let g = weights.group_len();
        let packed = PackedTernary::from_codes(&weights.codes, weights.rows, weights.cols);
        let row_scales: Vec<f32> = if g >= weights.cols {
            (0..weights.rows)
                .map(|r| weights.scales[(r * weights.cols) / g])
                .collect()
        } else {
            Vec::new()
        };
        let grouped = row_scales.is_empty().then(|| weights.clone());
        Self {
            packed,
            granularity: weights.granularity,
            scales: weights.scales,
            convention,
            row_scales,
            grouped,
        }
    }

    /// From weights already in the kernel layout, with one scale for the whole matrix.
    pub fn from_packed(packed: PackedTernary, scale: f32, convention: ScaleConvention) -> Self {
        let rows = packed.rows();
        Self {
            packed,
            granularity: Granularity::PerTensor,
            scales: vec![scale],
            convention,
            row_scales: vec![scale; rows],
            grouped: None,
        }
    }

    pub fn rows(&self) -> usize {
        self.packed.rows()
    }

    pub fn cols(&self) -> usize {
        self.packed.cols()
    }

    /// One layer computing several layers that read the same input (Q, K, V; gate and up): their
    /// outputs side by side. The activations are quantized once either way, so every output is
    /// the same bit for bit; the weights stream as one longer matrix. `None` when the parts
    /// cannot be stacked (per-group scales, different conventions or row lengths).
    pub fn fuse(parts: &[&TernaryLinear]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.grouped.is_some() || p.convention != first.convention)
        {
            return None;
        }
        let packed =
            PackedTernary::concat_rows(&parts.iter().map(|p| &p.packed).collect::<Vec<_>>())?;
        Some(Self {
            packed,
            granularity: Granularity::PerChannel,
            scales: parts
                .iter()
                .flat_map(|p| p.row_scales.iter().copied())
                .collect(),
            convention: first.convention,
            row_scales: parts
                .iter()
                .flat_map(|p| p.row_scales.iter().copied())
                .collect(),
            grouped: None,
        })
    }

    /// Point this layer's weights at rows `first..` of `stacked` (which holds the same codes,
    /// see [`TernaryLinear::fuse`]), so the two share one copy in memory.
    pub fn share_rows_of(&mut self, stacked: &TernaryLinear, first: usize) {
        if let Some(v) = stacked.packed.view_rows(first, self.rows()) {
            self.packed = v;
        }
    }

    /// Weight `(r, c)` as a code in {-1, 0, 1}.
    pub fn code(&self, r: usize, c: usize) -> i8 {
        self.packed.code(r, c)
    }

    /// Bytes of packed weights a product streams.
    pub fn packed_bytes(&self) -> usize {
        self.packed.bytes()
    }

    #[inline]
    /// Float outputs of rows `r0..` of one token from their dots (`xs` the token's scale).
    fn scale_run(&self, dots: &[i32], r0: usize, xs: f32, out: &mut [f32]) {
        let scales = &self.row_scales[r0..r0 + dots.len()];
        let it = out.iter_mut().zip(dots).zip(scales);
        match self.convention {
            ScaleConvention::Divide => it.for_each(|((o, &d), &s)| *o = d as f32 / (s * xs)),
            ScaleConvention::Multiply => it.for_each(|((o, &d), &s)| *o = d as f32 / xs * s),
        }
    }

    /// Output of one row given its quantized activations: transformers' `BitLinear` computes
    /// `dot / (weight_scale * input_scale)` (`Divide`); `AutoBitLinear` multiplies by `mean|W|`.
    pub fn forward_quantized(&self, xq: &[i8], xs: f32, out: &mut [f32]) {
        let mut batch = QuantizedBatch::default();
        batch.reset(1, self.packed.padded_cols());
        batch.token_mut(0)[..xq.len()].copy_from_slice(xq);
        batch.finish();
        self.forward_batch(&batch, &[xs], out);
    }

    fn forward_batch(&self, batch: &QuantizedBatch, xs: &[f32], out: &mut [f32]) {
        let rows = self.rows();
        if let Some(w) = &self.grouped {
            let g = w.group_len();
            for (t, &s) in xs.iter().enumerate() {
                let xq = &batch.values[t * batch.stride..t * batch.stride + w.cols];
                for r in 0..rows {
                    let row = &w.codes[r * w.cols..(r + 1) * w.cols];
                    let mut acc = 0.0f32;
                    for (gi, (wc, xc)) in row.chunks(g).zip(xq.chunks(g)).enumerate() {
                        let sc = w.scales[(r * w.cols) / g + gi];
                        let dot = dot_i8(wc, xc) as f32;
                        acc += match self.convention {
                            ScaleConvention::Divide => dot / sc,
                            ScaleConvention::Multiply => dot * sc,
                        };
                    }
                    out[t * rows + r] = acc / s;
                }
            }
            return;
        }
        gemm_par_map(
            &pool::current(),
            cpu::tier(),
            &self.packed,
            batch,
            &mut out[..batch.n * rows],
            rows,
            &|t, r0, dots, out| self.scale_run(dots, r0, xs[t], out),
        );
    }

    /// `n` rows of float activations in, `n` rows out.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let cols = self.cols();
        let mut batch = QuantizedBatch::default();
        let stride = self.packed.padded_cols();
        batch.reset(n, stride);
        // Each token quantized on its own (absmax scale, then the sum the kernel corrects by),
        // spread over the kernel threads when there are several.
        let scales: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        let sums: Vec<AtomicI32> = (0..n).map(|_| AtomicI32::new(0)).collect();
        let quantize = |t: usize, dst: &mut [i8]| {
            let s = quantize_row_i8(&x[t * cols..(t + 1) * cols], &mut dst[..cols])
                .expect("row length matches");
            scales[t].store(s.to_bits(), Ordering::Relaxed);
            sums[t].store(dst.iter().map(|&v| i32::from(v)).sum(), Ordering::Relaxed);
        };
        crate::ops::for_each_row(&mut batch.values, stride, &quantize);
        // Every row is done, so every store above happened before these loads.
        batch.sums = sums.into_iter().map(AtomicI32::into_inner).collect();
        let xs: Vec<f32> = scales
            .into_iter()
            .map(|s| f32::from_bits(s.into_inner()))
            .collect();
        self.forward_batch(&batch, &xs, out);
    }
}

/// Int8 weights with a scale per row (the compact lm_head), times per-token int8 activations.
pub fn int8_matmul(w: &Int8Rows, x: &[f32], n: usize, out: &mut [f32]) {
    let cols = w.cols();
    let mut xq = vec![0i8; n * cols];
    let mut xs = Vec::with_capacity(n);
    for t in 0..n {
        xs.push(
            quantize_row_i8(
                &x[t * cols..(t + 1) * cols],
                &mut xq[t * cols..(t + 1) * cols],
            )
            .expect("row length matches"),
        );
    }
    let xu: Vec<u8> = xq.iter().map(|&v| (v as u8) ^ 0x80).collect();
    let tier = cpu::tier();
    pool::par_columns(
        &pool::current(),
        out,
        w.rows(),
        w.rows(),
        16,
        &|rows, wr| {
            let q = |t: usize| &xq[t * cols..(t + 1) * cols];
            let u = |t: usize| &xu[t * cols..(t + 1) * cols];
            let mut rows = rows;
            // Batches: four rows against four tokens per pass (the same integer sums).
            if n >= 4 {
                while rows.len() >= 4 {
                    let r = rows.start;
                    let mut t = 0;
                    while t + 4 <= n {
                        let d = w.dot_4x4(
                            tier,
                            r,
                            [q(t), q(t + 1), q(t + 2), q(t + 3)],
                            [u(t), u(t + 1), u(t + 2), u(t + 3)],
                        );
                        for (k, dk) in d.iter().enumerate() {
                            for (j, &v) in dk.iter().enumerate() {
                                wr.set(t + j, r + k, v as f32 * w.scales[r + k] / xs[t + j]);
                            }
                        }
                        t += 4;
                    }
                    for (t, &s) in xs.iter().enumerate().skip(t) {
                        for k in r..r + 4 {
                            let d = w.dot(tier, k, q(t), u(t));
                            wr.set(t, k, d as f32 * w.scales[k] / s);
                        }
                    }
                    rows.start += 4;
                }
            }
            for r in rows {
                for (t, &s) in xs.iter().enumerate() {
                    let d = w.dot(tier, r, q(t), u(t));
                    wr.set(t, r, d as f32 * w.scales[r] / s);
                }
            }
        },
    );
}

/// 4-bit weights with a scale per 128-weight block (the smallest lm_head), times per-token int8
/// activations.
pub fn int4_matmul(w: &Int4Rows, x: &[f32], n: usize, out: &mut [f32]) {
    let cols = w.cols();
    let mut acts = Vec::with_capacity(n);
    let mut xs = Vec::with_capacity(n);
    let mut xq = vec![0i8; cols];
    for t in 0..n {
        xs.push(
            quantize_row_i8(&x[t * cols..(t + 1) * cols], &mut xq).expect("row length matches"),
        );
        acts.push(Int4Acts::new(&xq, w.blocks()));
    }
    let tier = cpu::tier();
    let rows = w.rows();
    pool::par_columns(&pool::current(), out, rows, rows, 4, &|cols, wr| {
        for g in cols.start / 4..cols.end.div_ceil(4) {
            let valid = (rows - 4 * g).min(4);
            for (t, a) in acts.iter().enumerate() {
                let mut d = [0.0f32; 4];
                w.group_dot(tier, g, a, &mut d);
                let run: [f32; 4] = std::array::from_fn(|i| d[i] / xs[t]);
                wr.set_run(t, 4 * g, &run[..valid]);
            }
        }
    });
}

/// Any linear layer of a model.
#[derive(Debug, Clone)]
pub enum Linear {
    Ternary(TernaryLinear),
    Dense(DenseMatrix),
    /// Int8 rows with per-row scales (`--head-quant int8`).
    Int8(Int8Rows),
    /// 4-bit rows with a scale per 128 weights (`--head-quant q4`).
    Int4(Int4Rows),
}

impl Linear {
    pub fn rows(&self) -> usize {
        match self {
            Linear::Ternary(t) => t.rows(),
            Linear::Dense(d) => d.rows,
            Linear::Int8(q) => q.rows(),
            Linear::Int4(q) => q.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Linear::Ternary(t) => t.cols(),
            Linear::Dense(d) => d.cols,
            Linear::Int8(q) => q.cols(),
            Linear::Int4(q) => q.cols(),
        }
    }

    /// `x` is `[n, cols]`, `out` is `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        match self {
            Linear::Ternary(t) => t.matmul(x, n, out),
            Linear::Dense(d) => d.matmul(x, n, out),
            Linear::Int8(q) => int8_matmul(q, x, n, out),
            Linear::Int4(q) => int4_matmul(q, x, n, out),
        }
    }

    /// Bytes of weights one forward pass reads.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Ternary(t) => t.packed_bytes(),
            Linear::Dense(d) => d.bytes(),
            Linear::Int8(q) => q.bytes(),
            Linear::Int4(q) => q.bytes(),
        }
    }

    pub fn kind(&self) -> String {
        match self {
            Linear::Ternary(t) => {
                format!("ternary ({}, {:?})", t.granularity, t.convention)
            }
            Linear::Dense(d) => d.ty.to_string(),
            Linear::Int8(_) => "int8 (per-row scale)".to_string(),
            Linear::Int4(_) => "q4 (scale per 128 weights)".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch gives every token bitwise the result it gets alone (the server relies on it).
    #[test]
    fn f16_batches_equal_single_tokens() {
        let (rows, cols, n) = (13, 80, 7);
        let mut buf = bitnet_kernels::buffer::AlignedBuf::zeroed(rows * cols * 2);
        for (i, c) in buf.chunks_exact_mut(2).enumerate() {
            let v = ((i * 37 % 101) as f32 - 50.0) / 61.0;
            c.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        let m =
            DenseMatrix::new("w", rows, cols, GgmlType::F16, WeightBytes::aligned(buf)).unwrap();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 29 % 97) as f32 - 48.0) / 13.0)
            .collect();
        let mut batch = vec![0.0f32; n * rows];
        m.matmul(&x, n, &mut batch);
        for t in 0..n {
            let mut one = vec![0.0f32; rows];
            m.matmul(&x[t * cols..(t + 1) * cols], 1, &mut one);
            let got: Vec<u32> = batch[t * rows..(t + 1) * rows]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "token {t}");
        }
    }
}
