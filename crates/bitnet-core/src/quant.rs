//! Ternary weight and int8 activation quantization.
//!
//! The per-tensor weight path and the per-token activation path reproduce Hugging Face
//! transformers (`src/transformers/integrations/bitnet.py`, `WeightQuant` and `ActQuant`) bit for
//! bit:
//!
//! * weights: `s = 1 / max(mean|W|, 1e-5)`, `Wq = clamp(round_half_even(W * s), -1, 1)`;
//! * activations, per row of the last dimension: `s = (1 / max(max|x|, 1e-5)) * 127` (PyTorch
//!   evaluates `127 / t` as `t.reciprocal() * 127`: two roundings),
//!   `xq = clamp(round_half_even(x * s), -128, 127)`;
//! * output: `y = (Wq . xq) * mean|W| / s`, the integer dot product exact in i32.
//!
//! Per-output-channel and per-group scales are offered beyond what transformers does, for
//! error studies and for formats that carry more than one scale.

use crate::error::{CoreError, Result, check_len};
use crate::reduce::TorchReduce;

/// transformers clamps both the mean and the max at this value before dividing.
pub const EPS: f32 = 1e-5;

/// Which weights share one absmean scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Granularity {
    /// One scale for the whole matrix, as BitNet b1.58 and transformers do.
    #[default]
    PerTensor,
    /// One scale per output channel (row of the `[out, in]` matrix).
    PerChannel,
    /// One scale per run of `n` consecutive weights within a row; `n` must divide the row.
    PerGroup(usize),
}

impl Granularity {
    /// Number of consecutive weights of a `[rows, cols]` matrix that share one scale.
    pub fn group_len(self, rows: usize, cols: usize) -> Result<usize> {
        match self {
            Granularity::PerTensor => Ok(rows * cols),
            Granularity::PerChannel => Ok(cols),
            Granularity::PerGroup(g) => {
                if g == 0 || !cols.is_multiple_of(g) {
                    Err(CoreError::BadGroup { group: g, cols })
                } else {
                    Ok(g)
                }
            }
        }
    }
}

impl std::fmt::Display for Granularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Granularity::PerTensor => f.write_str("per-tensor"),
            Granularity::PerChannel => f.write_str("per-channel"),
            Granularity::PerGroup(g) => write!(f, "per-group({g})"),
        }
    }
}

/// A ternarized `[rows, cols]` matrix: codes in {-1, 0, +1}, row-major, and the absmean scales
/// (already clamped at [`EPS`]). A weight is `code * scale` of its group.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    pub granularity: Granularity,
    /// One scale per group, in row-major group order.
    pub scales: Vec<f32>,
}

impl TernaryMatrix {
    /// Build from codes and scales, checking every code and the number of scales.
    pub fn new(
        rows: usize,
        cols: usize,
        codes: Vec<i8>,
        granularity: Granularity,
        scales: Vec<f32>,
    ) -> Result<Self> {
        check_len("codes", rows * cols, codes.len())?;
        let g = granularity.group_len(rows, cols)?;
        check_len(
            "scales",
            (rows * cols).checked_div(g).unwrap_or(1).max(1),
            scales.len(),
        )?;
        // One branch-free pass (vectorised); the index is looked up only for the error.
        if codes
            .iter()
            .fold(false, |bad, &c| bad | !(-1..=1).contains(&c))
            && let Some((index, &code)) = codes
                .iter()
                .enumerate()
                .find(|(_, c)| !(-1..=1).contains(*c))
        {
            return Err(CoreError::BadCode { index, code });
        }
        Ok(Self {
            rows,
            cols,
            codes,
            granularity,
            scales,
        })
    }

    /// Number of consecutive weights sharing one scale.
    pub fn group_len(&self) -> usize {
        self.granularity
            .group_len(self.rows, self.cols)
            .unwrap_or(self.rows * self.cols)
            .max(1)
    }

    /// `code * scale` for every weight: the dequantized matrix, as the runtime multiplies it.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.group_len();
        self.codes
            .chunks(g)
            .zip(&self.scales)
            .flat_map(|(c, &s)| c.iter().map(move |&q| f32::from(q) * s))
            .collect()
    }

    /// The dequantized matrix exactly as transformers' `WeightQuant` returns it: `q / (1 / scale)`.
    pub fn dequantize_torch(&self) -> Vec<f32> {
        let g = self.group_len();
        self.codes
            .chunks(g)
            .zip(&self.scales)
            .flat_map(|(c, &s)| {
                let inv = 1.0 / s;
                c.iter().map(move |&q| f32::from(q) / inv)
            })
            .collect()
    }

    /// Fraction of codes that are zero.
    pub fn zero_fraction(&self) -> f64 {
        if self.codes.is_empty() {
            return 0.0;
        }
        self.codes.iter().filter(|&&c| c == 0).count() as f64 / self.codes.len() as f64
    }
}

/// Absmean ternarization of a row-major `[rows, cols]` float matrix.
///
/// Per tensor, the result equals transformers' `WeightQuant` bit for bit (codes and scale), with
/// the mean summed in PyTorch's order ([`TorchReduce::default`]).
pub fn ternarize(
    w: &[f32],
    rows: usize,
    cols: usize,
    granularity: Granularity,
) -> Result<TernaryMatrix> {
    ternarize_with(w, rows, cols, granularity, TorchReduce::default())
}

/// [`ternarize`] with an explicit summation order (SIMD width and thread count of the PyTorch run
/// being reproduced).
pub fn ternarize_with(
    w: &[f32],
    rows: usize,
    cols: usize,
    granularity: Granularity,
    reduce: TorchReduce,
) -> Result<TernaryMatrix> {
    let n = rows.checked_mul(cols).ok_or(CoreError::Length {
        what: "weights",
        expected: usize::MAX,
        found: w.len(),
    })?;
    check_len("weights", n, w.len())?;
    let g = granularity.group_len(rows, cols)?.max(1);
    let mut codes = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(n.div_ceil(g).max(1));
    if n == 0 {
        scales.push(EPS);
    }
    for group in w.chunks(g) {
        let mean = reduce.mean_abs(group).max(EPS);
        let s = 1.0 / mean;
        let start = codes.len();
        codes.resize(start + group.len(), 0);
        for (c, &x) in codes[start..].iter_mut().zip(group) {
            *c = ternary_code(x * s);
        }
        scales.push(mean);
    }
    Ok(TernaryMatrix {
        rows,
        cols,
        codes,
        granularity,
        scales,
    })
}

/// [`ternarize_with`] per tensor, over `rows * cols` weights that `read(start, out)` produces a
/// block at a time (`out.len()` weights from flat index `start`): the same codes and scale,
/// without a matrix-sized float buffer. The weights are read twice, once for the mean and once
/// for the codes.
pub fn ternarize_read(
    rows: usize,
    cols: usize,
    reduce: TorchReduce,
    read: &mut dyn FnMut(usize, &mut [f32]),
) -> Result<TernaryMatrix> {
    const BLOCK: usize = 1 << 16;
    let n = rows.checked_mul(cols).ok_or(CoreError::Length {
        what: "weights",
        expected: usize::MAX,
        found: 0,
    })?;
    if n == 0 {
        return ternarize_with(&[], rows, cols, Granularity::PerTensor, reduce);
    }
    let mean = (reduce.sum_abs_read(n, read) / n as f32).max(EPS);
    let s = 1.0 / mean;
    let mut codes = vec![0i8; n];
    let mut buf = vec![0.0f32; BLOCK.min(n)];
    for (k, c) in codes.chunks_mut(BLOCK).enumerate() {
        let b = &mut buf[..c.len()];
        read(k * BLOCK, b);
        for (c, &x) in c.iter_mut().zip(b.iter()) {
            *c = ternary_code(x * s);
        }
    }
    Ok(TernaryMatrix {
        rows,
        cols,
        codes,
        granularity: Granularity::PerTensor,
        scales: vec![mean],
    })
}

/// `clamp(round_half_even(v), -1, 1)`; NaN maps to 0 as `torch.round(nan).clamp(...)` casts to 0.
#[inline]
pub fn ternary_code(v: f32) -> i8 {
    // Rounding half to even sends |v| <= 0.5 to 0 (0.5 is a tie that goes to the even 0) and
    // anything above to ±1 or beyond, which the clamp brings back to ±1: two comparisons say
    // it, both false for NaN. Branch-free and vectorisable without SSE4.1's `roundps`.
    i8::from(v > 0.5) - i8::from(v < -0.5)
}

/// Per-token int8 activations of a `[rows, cols]` matrix: codes and one scale per row.
/// `x ≈ q / scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedActivations {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    /// `127 / max(max|x|, 1e-5)` per row, computed as PyTorch does.
    pub scales: Vec<f32>,
}

impl QuantizedActivations {
    /// `q / scale`, as transformers' `ActQuant` returns it.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .chunks(self.cols.max(1))
            .zip(&self.scales)
            .flat_map(|(c, &s)| c.iter().map(move |&q| f32::from(q) / s))
            .collect()
    }
}

/// The per-token activation scale: `(1 / max(absmax, 1e-5)) * 127`, two f32 roundings.
#[inline]
pub fn activation_scale(absmax: f32) -> f32 {
    (1.0 / absmax.max(EPS)) * 127.0
}

/// Quantize one row of activations into `out`, returning its scale.
pub fn quantize_row_i8(x: &[f32], out: &mut [i8]) -> Result<f32> {
    check_len("activation output", x.len(), out.len())?;
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = activation_scale(absmax);
    // Clamping first changes nothing (a value in (127, 127.5] rounds to 127 either way) and
    // leaves |v| <= 128, where adding and subtracting 1.5 * 2^23 rounds to nearest, ties to
    // even, exactly as `round_ties_even` does, but in a form the compiler vectorises (without
    // SSE4.1 in the baseline target, `round_ties_even` is a libm call per value). NaN stays NaN
    // and casts to 0.
    const MAGIC: f32 = 12_582_912.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (((v * s).clamp(-128.0, 127.0) + MAGIC) - MAGIC) as i8;
    }
    Ok(s)
}

/// Per-token (per row) int8 absmax quantization of a row-major `[rows, cols]` matrix.
pub fn quantize_activations(x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActivations> {
    check_len("activations", rows.saturating_mul(cols), x.len())?;
    let mut codes = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(rows);
    if cols > 0 {
        for (row, out) in x.chunks(cols).zip(codes.chunks_mut(cols)) {
            scales.push(quantize_row_i8(row, out)?);
        }
    } else {
        scales.resize(rows, activation_scale(0.0));
    }
    Ok(QuantizedActivations {
        rows,
        cols,
        codes,
        scales,
    })
}

/// How a checkpoint's stored `weight_scale` relates to `mean|W|`, from its
/// `quantization_config.linear_class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleConvention {
    /// `autobitlinear`: the stored scale is `mean|W|` and multiplies the output.
    Multiply,
    /// `bitlinear` (microsoft/bitnet-b1.58-2B-4T): the output is divided by the stored scale.
    Divide,
}

impl ScaleConvention {
    /// From `quantization_config.linear_class`; unknown classes are refused, never guessed.
    pub fn from_linear_class(class: &str) -> Result<Self> {
        match class {
            "autobitlinear" => Ok(Self::Multiply),
            "bitlinear" => Ok(Self::Divide),
            other => Err(CoreError::Unsupported(format!(
                "unknown quantization_config.linear_class {other:?} (known: \"bitlinear\", \"autobitlinear\")"
            ))),
        }
    }
}

/// One ternary linear layer applied to one quantized row: `(Wq . xq) * w_scale / x_scale`, with
/// the integer dot products exact. The reference every SIMD kernel is checked against.
pub fn ternary_gemv_ref(w: &TernaryMatrix, x: &[i8], x_scale: f32, out: &mut [f32]) -> Result<()> {
    check_len("input", w.cols, x.len())?;
    check_len("output", w.rows, out.len())?;
    let g = w.group_len();
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w.codes[r * w.cols..(r + 1) * w.cols];
        if g >= w.cols {
            let dot: i32 = row
                .iter()
                .zip(x)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            let scale = w.scales[(r * w.cols) / g];
            *o = dot as f32 * scale / x_scale;
        } else {
            let mut acc = 0.0f32;
            for (gi, (wc, xc)) in row.chunks(g).zip(x.chunks(g)).enumerate() {
                let dot: i32 = wc
                    .iter()
                    .zip(xc)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
                acc += dot as f32 * w.scales[(r * w.cols) / g + gi];
            }
            *o = acc / x_scale;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_reads_ternarize_alike() {
        let mut x = 0x9e37_79b9u32;
        let (rows, cols) = (37, 4096 + 16);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Some exact ties at half the mean, and a NaN.
                if i == 5 {
                    f32::NAN
                } else {
                    (x as f32 / u32::MAX as f32 - 0.5) * 0.04
                }
            })
            .collect();
        for reduce in [TorchReduce::Inductor { lanes: 16 }, TorchReduce::default()] {
            let want = ternarize_with(&w, rows, cols, Granularity::PerTensor, reduce).unwrap();
            let got = ternarize_read(rows, cols, reduce, &mut |s, out| {
                out.copy_from_slice(&w[s..s + out.len()])
            })
            .unwrap();
            assert_eq!(got, want);
        }
        for v in [
            0.5f32,
            -0.5,
            0.500_001,
            -0.500_001,
            1.5,
            -7.0,
            f32::NAN,
            0.0,
            -0.0,
        ] {
            let torch = v.round_ties_even().clamp(-1.0, 1.0);
            let want = if v.is_nan() { 0 } else { torch as i8 };
            assert_eq!(ternary_code(v), want, "{v}");
        }
    }

    #[test]
    fn rounds_half_to_even() {
        // mean|W| = 1 so W * s = W: 0.5 rounds to 0, 1.5 to 2 (then clamps to 1), -0.5 to -0.
        let w = [0.5f32, 1.5, -0.5, -1.5, 1.0, 0.5];
        let t = ternarize(&w, 1, 6, Granularity::PerTensor).unwrap();
        assert_eq!(t.scales, [0.9166667]);
        let t = ternarize(&[0.5, -0.5, 2.0, 1.0], 1, 4, Granularity::PerTensor).unwrap();
        assert_eq!(t.scales, [1.0]);
        assert_eq!(t.codes, [0, 0, 1, 1]);
    }

    #[test]
    fn all_zero_uses_eps() {
        let t = ternarize(&[0.0; 8], 2, 4, Granularity::PerChannel).unwrap();
        assert_eq!(t.codes, [0; 8]);
        assert_eq!(t.scales, [EPS, EPS]);
        let a = quantize_activations(&[0.0; 4], 1, 4).unwrap();
        assert_eq!(a.codes, [0; 4]);
        assert_eq!(a.scales[0], (1.0f32 / 1e-5) * 127.0);
    }

    #[test]
    fn per_group_scales() {
        let w = [1.0f32, 1.0, 4.0, 0.0, 2.0, -2.0, 0.1, -0.1];
        let t = ternarize(&w, 2, 4, Granularity::PerGroup(2)).unwrap();
        assert_eq!(t.scales, [1.0, 2.0, 2.0, 0.1]);
        assert_eq!(t.codes, [1, 1, 1, 0, 1, -1, 1, -1]);
        assert!(ternarize(&w, 2, 4, Granularity::PerGroup(3)).is_err());
        assert!(ternarize(&w, 2, 4, Granularity::PerGroup(0)).is_err());
    }

    #[test]
    fn activation_extremes_clamp() {
        let x = [f32::MAX, -f32::MAX, 1.0, 0.0];
        let a = quantize_activations(&x, 1, 4).unwrap();
        assert_eq!(a.codes[0], 127);
        assert_eq!(a.codes[1], -127);
        let x = [-1.0f32, 0.999];
        let a = quantize_activations(&x, 1, 2).unwrap();
        assert_eq!(a.codes, [-127, 127]);
    }

    #[test]
    fn gemv_reference_matches_float() {
        let w = ternarize(
            &[0.3, -0.2, 0.0, 0.5, 0.1, -0.6],
            2,
            3,
            Granularity::PerTensor,
        )
        .unwrap();
        let a = quantize_activations(&[1.0, -0.5, 0.25], 1, 3).unwrap();
        let mut y = [0.0f32; 2];
        ternary_gemv_ref(&w, &a.codes, a.scales[0], &mut y).unwrap();
        let wd = w.dequantize();
        let xd = a.dequantize();
        for r in 0..2 {
            let expect: f32 = (0..3).map(|c| wd[r * 3 + c] * xd[c]).sum();
            assert!((y[r] - expect).abs() < 1e-5, "{} vs {}", y[r], expect);
        }
    }

    #[test]
    fn convention_from_linear_class() {
        assert_eq!(
            ScaleConvention::from_linear_class("bitlinear").unwrap(),
            ScaleConvention::Divide
        );
        assert!(ScaleConvention::from_linear_class("magic").is_err());
    }
}
