//! What ternarization does to a model's float linear weights, tensor by tensor: the error of
//! absmean ternary codes with one scale per tensor (BitNet b1.58), per output channel, or per
//! group of weights, against the float weights.
//!
//! The source is a Hugging Face directory with float linear weights (BitNet float masters, or a
//! llama-family model, to see what post-training ternarization would cost it) or a GGUF file
//! whose linear weights are in a float or block-quantized type. One tensor is in memory at a
//! time and its mapped pages are released behind it.

use crate::error::{ModelError, Result};
use crate::load::HfLoader;
use bitnet_core::metrics::{ErrorMetrics, error_metrics};
use bitnet_core::quant::{Granularity, ternarize};
use bitnet_formats::gguf::{GgufFile, can_dequantize, dequantize};
use bitnet_formats::names::{LINEARS, is_gguf_linear};
use bitnet_formats::safetensors_dir::HfModelDir;
use std::path::Path;

/// One tensor's errors, one entry per granularity asked for.
#[derive(Debug, Clone)]
pub struct TensorQuantReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub results: Vec<(Granularity, ErrorMetrics)>,
}

fn measure(
    name: String,
    w: &[f32],
    rows: usize,
    cols: usize,
    granularities: &[Granularity],
) -> Result<TensorQuantReport> {
    let mut results = Vec::with_capacity(granularities.len());
    for &g in granularities {
        // A group that does not divide the row falls back to the largest size below it that
        // does (SmolLM2's rows of 576 take groups of 96 for 128); the result says which.
        let g = match g {
            Granularity::PerGroup(n) if n > 0 && !cols.is_multiple_of(n) => Granularity::PerGroup(
                (1..=n.min(cols))
                    .rev()
                    .find(|d| cols.is_multiple_of(*d))
                    .unwrap_or(1),
            ),
            g => g,
        };
        let m = ternarize(w, rows, cols, g)
            .map_err(|e| ModelError::Invalid(format!("{name}: {g}: {e}")))?;
        results.push((g, error_metrics(w, &m.dequantize())?));
    }
    Ok(TensorQuantReport {
        name,
        rows,
        cols,
        results,
    })
}

/// Measure every linear weight of `src` under each granularity; `each` sees the tensors as
/// they are done (for progress).
pub fn report(
    src: &Path,
    granularities: &[Granularity],
    each: &mut dyn FnMut(&TensorQuantReport, usize, usize),
) -> Result<Vec<TensorQuantReport>> {
    let mut out = Vec::new();
    if src.is_dir() {
        let dir = HfModelDir::open(src)?;
        let (loader, spec) = HfLoader::new(&dir)?;
        let total = spec.n_layers * LINEARS.len();
        for i in 0..spec.n_layers {
            for (j, lin) in LINEARS.iter().enumerate() {
                let name = lin.hf_weight(i);
                let Some(t) = dir.weights.get(&name) else {
                    return Err(ModelError::MissingTensor(name));
                };
                use bitnet_formats::safetensors_dir::Dtype;
                let float = matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
                if t.shape.len() != 2 || !float {
                    return Err(ModelError::Unsupported(format!(
                        "{name} is {:?} {:?}: already packed, there are no float weights to measure",
                        t.dtype, t.shape
                    )));
                }
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let m = loader.dense(&name, rows, cols)?;
                let mut w = vec![0.0f32; rows * cols];
                for r in 0..rows {
                    m.row_into(r, &mut w[r * cols..(r + 1) * cols]);
                }
                let rep = measure(name.clone(), &w, rows, cols, granularities)?;
                dir.weights.release(&name);
                each(&rep, i * LINEARS.len() + j + 1, total);
                out.push(rep);
            }
        }
        return Ok(out);
    }
    let f = GgufFile::open(src)?;
    let names: Vec<&bitnet_formats::gguf::TensorInfo> = f
        .header
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && is_gguf_linear(&t.name))
        .collect();
    if names.is_empty() {
        return Err(ModelError::Invalid(format!(
            "{} has no linear layer weights (blk.N.attn_q.weight ...)",
            src.display()
        )));
    }
    for (k, t) in names.iter().enumerate() {
        if t.ty.is_ternary() {
            return Err(ModelError::Unsupported(format!(
                "{} is already {}: there are no float weights to measure",
                t.name, t.ty
            )));
        }
        if !can_dequantize(t.ty) {
            return Err(ModelError::Unsupported(format!(
                "{}: cannot read {} weights",
                t.name, t.ty
            )));
        }
        let (cols, rows) = (
            t.row_len() as usize,
            (t.n_elements() / t.row_len()) as usize,
        );
        let w = dequantize(&t.name, t.ty, f.tensor_bytes(t), rows * cols)?;
        let rep = measure(t.name.clone(), &w, rows, cols, granularities)?;
        f.release(t);
        each(&rep, k + 1, names.len());
        out.push(rep);
    }
    Ok(out)
}
