//! On-disk ternary layouts and exact conversion between them.
//!
//! | format | unit | bytes | scale |
//! | --- | --- | --- | --- |
//! | [`hf`] (transformers 2B-4T) | 4 rows of one column per byte | `rows/4 * cols` | one per tensor, separate tensor |
//! | [`tq2`] (llama.cpp TQ2_0, ggml type 35) | 256 weights | 66 | f16 per block |
//! | [`tq1`] (llama.cpp TQ1_0, ggml type 34) | 256 weights | 54 | f16 per block |
//! | [`i2s`] (bitnet.cpp I2_S, type 36) | 128 weights | 32 (+32 B tail) | one f32 per tensor |
//!
//! Codes convert between all of them exactly. Scales do not always: TQ types round a scale to
//! f16 and carry one per 256 weights, I2_S carries a single f32. [`pack`] says what changed in a
//! [`Fidelity`].

pub mod hf;
pub mod i2s;
pub mod tq1;
pub mod tq2;

use crate::error::{CoreError, Result};
use crate::metrics::{ErrorMetrics, error_metrics_iter};
use crate::quant::{Granularity, TernaryMatrix};
use half::f16;

/// The ternary layouts this crate packs and unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TernaryFormat {
    /// Hugging Face packed (`microsoft/bitnet-b1.58-2B-4T`): uint8 `[rows/4, cols]`.
    HfPacked,
    /// llama.cpp TQ1_0: base-3, 1.6875 bits per weight.
    Tq1_0,
    /// llama.cpp TQ2_0: 2 bits per weight, f16 scale per 256.
    Tq2_0,
    /// bitnet.cpp I2_S: 2 bits per weight, one f32 scale per tensor.
    I2S,
}

impl TernaryFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::HfPacked => "hf-packed",
            Self::Tq1_0 => "TQ1_0",
            Self::Tq2_0 => "TQ2_0",
            Self::I2S => "I2_S",
        }
    }

    /// Bytes of packed data for a `[rows, cols]` matrix (I2_S includes its 32-byte scale tail;
    /// the HF layout excludes its separate scale tensor).
    pub fn packed_len(self, rows: usize, cols: usize) -> usize {
        let n = rows * cols;
        match self {
            Self::HfPacked => rows.div_ceil(4) * cols,
            Self::Tq1_0 => n / tq1::QK * tq1::BLOCK_BYTES,
            Self::Tq2_0 => n / tq2::QK * tq2::BLOCK_BYTES,
            Self::I2S => n / 4 + i2s::TAIL_BYTES,
        }
    }

    /// Check that a `[rows, cols]` matrix fits the format's block structure.
    pub fn check_shape(self, rows: usize, cols: usize) -> Result<()> {
        let (what, multiple, found) = match self {
            Self::HfPacked => ("the number of rows", 4, rows),
            Self::Tq1_0 | Self::Tq2_0 => ("the row length", 256, cols),
            Self::I2S => ("the element count", i2s::QK, rows * cols),
        };
        if found % multiple == 0 {
            Ok(())
        } else {
            Err(CoreError::NotMultiple {
                format: self.name(),
                what,
                multiple,
                found,
            })
        }
    }
}

impl std::fmt::Display for TernaryFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What packing into a format changed about the scales (codes always survive exactly).
#[derive(Debug, Clone, PartialEq)]
pub struct Fidelity {
    /// True when unpacking gives back exactly the same codes and scales.
    pub exact: bool,
    /// Largest relative change of any weight's scale, `|s' - s| / s`.
    pub max_rel_scale_change: f64,
    /// Dequantized packed weights against the dequantized input.
    pub metrics: ErrorMetrics,
    /// One line saying what changed, for reports.
    pub note: String,
}

/// A packed matrix: the bytes of one tensor plus, for the HF layout, its separate scale.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedTensor {
    pub format: TernaryFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    /// The HF layout's `weight_scale` (as `mean|W|`, multiply convention); `None` otherwise.
    pub scale: Option<f32>,
}

/// Pack a ternary matrix into `format`, reporting what the format's scales changed.
pub fn pack(m: &TernaryMatrix, format: TernaryFormat) -> Result<(PackedTensor, Fidelity)> {
    format.check_shape(m.rows, m.cols)?;
    let n = m.rows * m.cols;
    // The scales the packed bytes will give back, and how many weights each covers. Codes
    // survive every layout exactly (the layouts' round-trip tests check it, and debug builds
    // re-check every tensor below), so what packing changes is read off the scales alone.
    let (data, scale, stored, group) = match format {
        TernaryFormat::HfPacked => {
            let s = single_scale(m, format)?;
            (hf::pack(&m.codes, m.rows, m.cols)?, Some(s), vec![s], n)
        }
        TernaryFormat::I2S => {
            let s = single_scale(m, format)?;
            (i2s::pack(&m.codes, s)?, None, vec![s], n)
        }
        TernaryFormat::Tq2_0 | TernaryFormat::Tq1_0 => {
            let qk = if format == TernaryFormat::Tq2_0 {
                tq2::QK
            } else {
                tq1::QK
            };
            let d = block_scales_f16(m, qk)?;
            let data = if format == TernaryFormat::Tq2_0 {
                tq2::pack(&m.codes, &d)?
            } else {
                tq1::pack(&m.codes, &d)?
            };
            (data, None, d.iter().map(|d| d.to_f32()).collect(), qk)
        }
    };
    let packed = PackedTensor {
        format,
        rows: m.rows,
        cols: m.cols,
        data,
        scale,
    };
    debug_assert!(
        unpack(&packed).is_ok_and(|b| b.codes == m.codes),
        "{format} changed codes"
    );
    let fidelity = compare(m, &stored, group.max(1));
    Ok((packed, fidelity))
}

/// Unpack to codes and scales. TQ blocks become [`Granularity::PerGroup`]`(256)` scales, merged
/// into per-channel or per-tensor when every block of a row (or of the tensor) agrees.
pub fn unpack(p: &PackedTensor) -> Result<TernaryMatrix> {
    p.format.check_shape(p.rows, p.cols)?;
    let expected = p.format.packed_len(p.rows, p.cols);
    if p.data.len() != expected {
        return Err(CoreError::Length {
            what: "packed bytes",
            expected,
            found: p.data.len(),
        });
    }
    let n = p.rows * p.cols;
    match p.format {
        TernaryFormat::HfPacked => {
            let mut codes = hf::unpack(&p.data, p.rows.div_ceil(4), p.cols)?;
            codes.truncate(n);
            let s = p.scale.ok_or_else(|| {
                CoreError::Unsupported("HF packed tensor without its weight_scale".into())
            })?;
            TernaryMatrix::new(p.rows, p.cols, codes, Granularity::PerTensor, vec![s])
        }
        TernaryFormat::I2S => {
            let (codes, s) = i2s::unpack(&p.data, n)?;
            TernaryMatrix::new(p.rows, p.cols, codes, Granularity::PerTensor, vec![s])
        }
        TernaryFormat::Tq2_0 | TernaryFormat::Tq1_0 => {
            let (codes, d) = if p.format == TernaryFormat::Tq2_0 {
                tq2::unpack(&p.data)?
            } else {
                tq1::unpack(&p.data)?
            };
            let scales: Vec<f32> = d.iter().map(|d| d.to_f32()).collect();
            merge_scales(TernaryMatrix::new(
                p.rows,
                p.cols,
                codes,
                Granularity::PerGroup(256),
                scales,
            )?)
        }
    }
}

/// Convert packed bytes from one layout to another through exact codes.
pub fn convert(p: &PackedTensor, to: TernaryFormat) -> Result<(PackedTensor, Fidelity)> {
    pack(&unpack(p)?, to)
}

/// Collapse per-group scales into per-channel or per-tensor when they are all equal.
pub fn merge_scales(m: TernaryMatrix) -> Result<TernaryMatrix> {
    let g = m.group_len();
    if m.scales
        .windows(2)
        .all(|w| w[0].to_bits() == w[1].to_bits())
        && !m.scales.is_empty()
    {
        let s = m.scales[0];
        return TernaryMatrix::new(m.rows, m.cols, m.codes, Granularity::PerTensor, vec![s]);
    }
    if matches!(m.granularity, Granularity::PerGroup(_)) && g <= m.cols && m.cols.is_multiple_of(g)
    {
        let per_row = m.cols / g;
        if m.scales
            .chunks(per_row)
            .all(|r| r.windows(2).all(|w| w[0].to_bits() == w[1].to_bits()))
        {
            let scales = m.scales.chunks(per_row).map(|r| r[0]).collect();
            return TernaryMatrix::new(m.rows, m.cols, m.codes, Granularity::PerChannel, scales);
        }
    }
    Ok(m)
}

/// The one scale a per-tensor format can store; refuses matrices whose scales differ.
fn single_scale(m: &TernaryMatrix, format: TernaryFormat) -> Result<f32> {
    let first = m.scales.first().copied().unwrap_or(0.0);
    if m.scales.iter().all(|s| s.to_bits() == first.to_bits()) {
        Ok(first)
    } else {
        Err(CoreError::Unsupported(format!(
            "{format} stores one scale per tensor but this matrix has {} different {} scales; \
             re-quantize per tensor or choose TQ2_0/TQ1_0 (one scale per 256 weights)",
            m.scales.len(),
            m.granularity
        )))
    }
}

/// One f16 scale per `qk`-weight block, from whatever scale covers that block.
fn block_scales_f16(m: &TernaryMatrix, qk: usize) -> Result<Vec<f16>> {
    let g = m.group_len();
    if !g.is_multiple_of(qk) {
        return Err(CoreError::Unsupported(format!(
            "TQ formats carry one scale per {qk} weights; {} scales cover {g} weights, which is not a multiple",
            m.granularity
        )));
    }
    let n = m.rows * m.cols;
    Ok((0..n / qk)
        .map(|b| f16::from_f32(m.scales[b * qk / g]))
        .collect())
}

/// [`error_metrics_iter`] of `a` against the same codes under `scales` (one per `group`
/// weights), when both scales are constant over every run of `run` weights: each run adds its
/// count of non-zero codes times the per-weight terms.
fn scaled_code_metrics(
    a: &TernaryMatrix,
    scales: &[f32],
    group: usize,
    run: usize,
) -> ErrorMetrics {
    let ga = a.group_len().max(1);
    let n = a.codes.len();
    let (mut se, mut dot, mut nr, mut na, mut zeros) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    for (k, chunk) in a.codes.chunks(run).enumerate() {
        let i = k * run;
        let nz = nonzero_count(chunk);
        let (ra, rb) = (f64::from(a.scales[i / ga]), f64::from(scales[i / group]));
        let w = nz as f64;
        se += w * (ra - rb) * (ra - rb);
        dot += w * ra * rb;
        nr += w * ra * ra;
        na += w * rb * rb;
        zeros += chunk.len() - if rb == 0.0 { 0 } else { nz };
    }
    ErrorMetrics::from_sums(se, dot, nr, na, zeros, n)
}

/// How many codes are not zero, counted in 64 byte-wide lanes (the plain `filter().count()`
/// compiled to two bytes per step).
fn nonzero_count(codes: &[i8]) -> usize {
    let mut total = 0;
    for block in codes.chunks(64 * 255) {
        let mut lanes = [0u8; 64];
        let mut vectors = block.chunks_exact(64);
        for v in &mut vectors {
            for (l, &c) in lanes.iter_mut().zip(v) {
                *l += u8::from(c != 0);
            }
        }
        total += lanes.iter().map(|&l| usize::from(l)).sum::<usize>();
        total += vectors.remainder().iter().filter(|&&c| c != 0).count();
    }
    total
}

/// What storing `a`'s codes with `scales` (one per `gb` weights) instead of its own changes.
fn compare(a: &TernaryMatrix, scales: &[f32], gb: usize) -> Fidelity {
    let ga = a.group_len();
    let mut max_rel = 0.0f64;
    let mut i = 0;
    while i < a.rows * a.cols {
        let (sa, sb) = (f64::from(a.scales[i / ga]), f64::from(scales[i / gb]));
        let rel = if sa == 0.0 {
            (sb != 0.0) as u8 as f64
        } else {
            (sb - sa).abs() / sa.abs()
        };
        max_rel = max_rel.max(rel);
        i += ga.min(gb);
    }
    let (lo, hi) = (ga.min(gb).max(1), ga.max(gb).max(1));
    let metrics = if hi % lo == 0 {
        // Nested groups: in each run of `lo` weights both scales are constant, so the sums
        // need only the run's count of non-zero codes.
        scaled_code_metrics(a, scales, gb, lo)
    } else {
        // The same values `dequantize` gives, streamed: no matrix-sized vectors per tensor.
        error_metrics_iter(a.codes.iter().enumerate().map(|(i, &c)| {
            (
                f32::from(c) * a.scales[i / ga],
                f32::from(c) * scales[i / gb],
            )
        }))
    };
    let exact = max_rel == 0.0;
    let note = if exact {
        "exact: same codes and scales".to_string()
    } else {
        format!(
            "codes exact; scales changed by up to {:.3e} (relative), MSE {:.3e}, cosine {:.9}",
            max_rel, metrics.mse, metrics.cosine
        )
    };
    Fidelity {
        exact,
        max_rel_scale_change: max_rel,
        metrics,
        note,
    }
}
