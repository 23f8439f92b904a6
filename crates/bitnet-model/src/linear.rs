//! Linear layers: ternary (BitLinear: int8 activations × ternary codes, exact i32 dot products)
//! and dense (f32/f16/bf16/Q8_0/Q4_x weights read in place from the mapped file).
//!
//! These are the simple reference paths; the SIMD tiers of `bitnet-kernels` replace the inner
//! loops without changing results.

use crate::error::{ModelError, Result};
use bitnet_core::quant::{Granularity, ScaleConvention, TernaryMatrix, quantize_row_i8};
use bitnet_formats::gguf::{GgmlType, dequantize_into};
use bitnet_kernels::dense::{self, DenseRows, DenseType};
use bitnet_kernels::int4::{Int4Acts, Int4Rows};
use bitnet_kernels::int8::Int8Rows;
use bitnet_kernels::ternary::{PackedTernary, QuantizedBatch, gemm_par_map};
use bitnet_kernels::{cpu, pool};
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

    /// `out[t, r] = x[t, :] . W[r, :]` for `t` in `0..n`, rows split between the pool's threads
    /// (`bitnet_kernels::dense`: F32, F16, Q8_0 and Q4_1 rows in place, each token's numbers
    /// the same alone or batched; other types dequantized a row at a time).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let (pool, tier) = (pool::current(), cpu::tier());
        let ty = match self.ty {
            GgmlType::F32 => Some(DenseType::F32),
            GgmlType::F16 => Some(DenseType::F16),
            GgmlType::Q8_0 => Some(DenseType::Q8_0),
            GgmlType::Q4_1 => Some(DenseType::Q4_1),
            _ => None,
        };
        let rows =
            ty.and_then(|ty| DenseRows::new(ty, self.rows, self.cols, self.bytes.as_slice()));
        match rows {
            Some(w) => dense::gemm_par(&pool, tier, &w, x, n, &mut out[..n * self.rows]),
            None => dense::gemm_par_rows(
                &pool,
                tier,
                self.rows,
                self.cols,
                &|r, buf| self.row_into(r, buf),
                x,
                n,
                &mut out[..n * self.rows],
            ),
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.as_slice().len()
    }
}

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

/// Each token of `x` (`[n, cols]`) quantized to int8 on its own (transformers' absmax), with its
/// multiplier `127 / max|x|`.
fn quantize_tokens(x: &[f32], n: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut xq = vec![0i8; n * cols];
    let xs = (0..n)
        .map(|t| {
            let row = t * cols..(t + 1) * cols;
            quantize_row_i8(&x[row.clone()], &mut xq[row]).expect("row length matches")
        })
        .collect();
    (xq, xs)
}

/// Int8 weights with a scale per row (the compact lm_head), times per-token int8 activations.
pub fn int8_matmul(w: &Int8Rows, x: &[f32], n: usize, out: &mut [f32]) {
    let (xq, xs) = quantize_tokens(x, n, w.cols());
    bitnet_kernels::int8::gemm_par(
        &pool::current(),
        cpu::tier(),
        w,
        &xq,
        &xs,
        &mut out[..n * w.rows()],
    );
}

/// 4-bit weights with a scale per 128-weight block (the smallest lm_head), times per-token int8
/// activations.
pub fn int4_matmul(w: &Int4Rows, x: &[f32], n: usize, out: &mut [f32]) {
    let cols = w.cols();
    let (xq, xs) = quantize_tokens(x, n, cols);
    let acts: Vec<Int4Acts> = (0..n)
        .map(|t| Int4Acts::new(&xq[t * cols..(t + 1) * cols], w.blocks()))
        .collect();
    bitnet_kernels::int4::gemm_par(
        &pool::current(),
        cpu::tier(),
        w,
        &acts,
        &xs,
        &mut out[..n * w.rows()],
    );
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
