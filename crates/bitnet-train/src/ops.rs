//! The BitLinear quantizers as candle operations with a straight-through backward pass, and the
//! composite layers (RMSNorm, RoPE, softmax, cross-entropy) whose gradients candle derives.
//!
//! Forward, in f32, each quantizer calls the same `bitnet-core` function the inference engine
//! and the GGUF converter call, so a trained model's forward equals the exported file's: the
//! weights as transformers' `WeightQuant` computes them (absmean per tensor, `q / (1 / mean)`),
//! the activations as its `ActQuant` does (`127 / absmax` per token, rounded half to even,
//! divided back). Backward, both pass the gradient through unchanged (the STE), as transformers'
//! `WeightQuant.backward` / `ActQuant.backward` do
//! (transformers `src/transformers/integrations/bitnet.py`).

use bitnet_core::quant::{self, EPS, Granularity};
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};

fn contiguous<'a, T>(v: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

fn core_err(e: bitnet_core::CoreError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `q / s` per row of `cols` values, `q` the int8 codes and `s` the scale that bitnet-core's
/// activation quantizer (transformers' `ActQuant`, bit for bit) gives.
fn act_quant_f32(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; x.len()];
    let mut codes = vec![0i8; cols];
    for (row, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let s = quant::quantize_row_i8(row, &mut codes[..row.len()]).map_err(core_err)?;
        for (o, &q) in o.iter_mut().zip(&codes) {
            *o = f32::from(q) / s;
        }
    }
    Ok(out)
}

/// The ternarized tensor as transformers' `WeightQuant` returns it: `q / (1 / mean|W|)`.
fn weight_quant_f32(w: &[f32]) -> Result<Vec<f32>> {
    let t = quant::ternarize(w, 1, w.len(), Granularity::PerTensor).map_err(core_err)?;
    Ok(t.dequantize_torch())
}

/// Per-token int8 fake quantization of activations (rows of the last dimension).
#[derive(Debug, Clone, Copy)]
pub struct ActQuant;

impl CustomOp1 for ActQuant {
    fn name(&self) -> &'static str {
        "bitnet-act-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let out = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(act_quant_f32(contiguous(v, l, self.name())?, cols)?)
            }
            CpuStorage::F64(v) => {
                let x = contiguous(v, l, self.name())?;
                let mut out = vec![0f64; x.len()];
                for (row, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
                    let absmax = row.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let s = 127.0 / absmax.max(f64::from(EPS));
                    for (o, &v) in o.iter_mut().zip(row) {
                        *o = (v * s).round_ties_even().clamp(-128.0, 127.0) / s;
                    }
                }
                CpuStorage::F64(out)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// Absmean ternary fake quantization of a whole weight tensor.
#[derive(Debug, Clone, Copy)]
pub struct WeightQuant;

impl CustomOp1 for WeightQuant {
    fn name(&self) -> &'static str {
        "bitnet-weight-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(weight_quant_f32(contiguous(v, l, self.name())?)?)
            }
            CpuStorage::F64(v) => {
                let w = contiguous(v, l, self.name())?;
                let mean = (w.iter().map(|x| x.abs()).sum::<f64>() / w.len().max(1) as f64)
                    .max(f64::from(EPS));
                let s = 1.0 / mean;
                CpuStorage::F64(
                    w.iter()
                        .map(|&x| (x * s).round_ties_even().clamp(-1.0, 1.0) / s)
                        .collect(),
                )
            }
            _ => candle_core::bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// `x @ w.T` for `x: [n, in]`, `w: [out, in]`; BitLinear when `ternary`.
pub fn linear(x: &Tensor, w: &Tensor, ternary: bool) -> Result<Tensor> {
    if ternary {
        let xq = x.contiguous()?.apply_op1(ActQuant)?;
        let wq = w.apply_op1(WeightQuant)?;
        xq.matmul(&wq.t()?)
    } else {
        x.matmul(&w.t()?)
    }
}

/// RMSNorm over the last dimension, as transformers' `BitNetRMSNorm`: `x / sqrt(mean(x^2) +
/// eps)`, times the weight.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
        .broadcast_mul(w)
}

/// Rotary tables for positions `0..t`: `cos` and `sin` of shape `[t, head_dim]`, the frequencies
/// repeated for both halves (Hugging Face's `rotate_half` layout): `inv_freq = 1 / theta^(2i /
/// d)`, angle = position x inv_freq, as transformers' default rotary embedding computes them
/// (in f32 for an f32 model, in f64 for an f64 one).
pub fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(t * head_dim),
        Vec::with_capacity(t * head_dim),
    );
    if dtype == DType::F64 {
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        for p in 0..t {
            for &f in inv.iter().chain(&inv) {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    } else {
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        for p in 0..t {
            for &f in inv.iter().chain(&inv) {
                let a = p as f32 * f;
                cos.push(f64::from(a.cos()));
                sin.push(f64::from(a.sin()));
            }
        }
    }
    let c = Tensor::from_vec(cos, (t, head_dim), dev)?.to_dtype(dtype)?;
    let s = Tensor::from_vec(sin, (t, head_dim), dev)?.to_dtype(dtype)?;
    Ok((c, s))
}

/// `x * cos + rotate_half(x) * sin` for `x: [b, heads, t, head_dim]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// Softmax over the last dimension (composite, so candle differentiates it).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Mean cross-entropy of `logits: [n, vocab]` against `targets: [n]` (u32), as
/// `torch.nn.functional.cross_entropy` with the default mean reduction.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}
