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

/// Fake quantization with the straight-through estimator, written as tensor operations (as
/// PyTorch BitNet trainers write it): the value `round(x * s).clamp(lo, hi) / s`, the gradient of
/// `x`, as `x + (q - x).detach()`.
fn fake_quant_ste(
    x: &Tensor,
    s: impl Fn(&Tensor) -> Result<Tensor>,
    lo: f64,
    hi: f64,
) -> Result<Tensor> {
    let xd = x.detach();
    let s = s(&xd)?;
    let q = xd
        .broadcast_mul(&s)?
        .round()?
        .clamp(lo, hi)?
        .broadcast_div(&s)?;
    x + (q - xd)?
}

/// [`ActQuant`] built from tensor operations, for devices other than the CPU (CUDA): the same
/// formula (`127 / absmax` per row, clamped at [`EPS`], rounded, clamped to [-128, 127], divided
/// back), but rounding half away from zero where the CPU path rounds half to even, which differs
/// only where `x * 127 / absmax` is an exact tie.
pub fn act_quant_ste(x: &Tensor) -> Result<Tensor> {
    let scale = |x: &Tensor| {
        let absmax = x.abs()?.max_keepdim(D::Minus1)?.maximum(f64::from(EPS))?;
        (absmax.ones_like()? * 127.0)?.div(&absmax)
    };
    fake_quant_ste(x, scale, -128.0, 127.0)
}

/// [`WeightQuant`] built from tensor operations, for devices other than the CPU: `1 / mean|W|`
/// over the whole tensor (clamped at [`EPS`]), rounded, clamped to [-1, 1], divided back.
pub fn weight_quant_ste(w: &Tensor) -> Result<Tensor> {
    let scale = |w: &Tensor| {
        let mean = w.abs()?.mean_all()?.maximum(f64::from(EPS))?;
        mean.ones_like()?.div(&mean)
    };
    fake_quant_ste(w, scale, -1.0, 1.0)
}

/// Where a half-precision type (bf16, f16) computes what it cannot hold well (quantizers, the
/// loss, AdamW's moments): f32; any other type is its own.
pub fn wide(dt: DType) -> DType {
    match dt {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// `x @ w.T` for `x: [n, in]`, `w: [out, in]` (the master weight, cast to `x`'s type); BitLinear
/// when `ternary`. On the CPU in f32 and f64 the quantizers are bitnet-core's own functions (the
/// inference engine's, bit for bit); elsewhere they are the same formulas as tensor operations
/// on the device, computed in f32 for a bf16 or f16 `x` and cast after.
pub fn linear(x: &Tensor, w: &Tensor, ternary: bool) -> Result<Tensor> {
    let dt = x.dtype();
    if !ternary {
        return x.matmul(&w.to_dtype(dt)?.t()?);
    }
    let (xq, wq) = if x.device().is_cpu() && matches!(dt, DType::F32 | DType::F64) {
        (
            x.contiguous()?.apply_op1(ActQuant)?,
            w.to_dtype(dt)?.apply_op1(WeightQuant)?,
        )
    } else {
        let wide = wide(dt);
        (
            act_quant_ste(&x.to_dtype(wide)?)?.to_dtype(dt)?,
            weight_quant_ste(&w.to_dtype(wide)?)?.to_dtype(dt)?,
        )
    };
    xq.matmul(&wq.t()?)
}

/// RMSNorm over the last dimension, as transformers' `BitNetRMSNorm`: `x / sqrt(mean(x^2) +
/// eps)`, times the weight.
/// A bf16 or f16 `x` is normalized in f32 and returned in its own type.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    if matches!(dt, DType::BF16 | DType::F16) {
        return rms_norm(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, eps)?.to_dtype(dt);
    }
    let w = &w.to_dtype(dt)?;
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

/// Softmax over the last dimension (composite, so candle differentiates it); in f32 for a bf16
/// or f16 `x`, returned in its type.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    if matches!(dt, DType::BF16 | DType::F16) {
        return softmax_last(&x.to_dtype(DType::F32)?)?.to_dtype(dt);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `log_softmax` over the last dimension, shifted by the (constant) row maximum.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits: [n, vocab]` against `targets: [n]` (u32), as
/// `torch.nn.functional.cross_entropy` with the default mean reduction.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// The distillation term `T² * KL(softmax(teacher / T) || softmax(student / T))` of
/// `[n, vocab]` logits, summed over the vocabulary and averaged over the `n` positions: as
/// `T**2 * kl_div(log_softmax(s / T), log_softmax(t / T), reduction="batchmean",
/// log_target=True)`. No gradient flows into `teacher`.
pub fn distill_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let log_q = log_softmax_last(&(student / temperature)?)?;
    let log_p = log_softmax_last(&(teacher.detach() / temperature)?)?.detach();
    let kl = (log_p.exp()? * (log_p - log_q)?)?
        .sum(D::Minus1)?
        .mean_all()?;
    kl * (temperature * temperature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: f64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f64 * 0.7311 + seed).sin() * (i as f64 * 0.131).cos()) as f32)
            .collect()
    }

    /// The device path (tensor operations) computes what the CPU path (bitnet-core) does, value
    /// and straight-through gradient, so a model trained on a GPU is the model the engine runs.
    #[test]
    fn device_quantizers_equal_the_engine_quantizers() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(values(6 * 64, 0.3), (6, 64), &dev).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(values(32 * 64, 1.9), (32, 64), &dev).unwrap())
            .unwrap();
        let target = Tensor::from_vec(values(6 * 32, 4.2), (6, 32), &dev).unwrap();
        let run = |xq: Tensor, wq: Tensor| {
            let y = xq.matmul(&wq.t().unwrap()).unwrap();
            let loss = (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                flat(&xq),
                flat(&wq),
                flat(g.get(x.as_tensor()).unwrap()),
                flat(g.get(w.as_tensor()).unwrap()),
            )
        };
        let engine = run(
            x.as_tensor().apply_op1(ActQuant).unwrap(),
            w.as_tensor().apply_op1(WeightQuant).unwrap(),
        );
        let device = run(
            act_quant_ste(x.as_tensor()).unwrap(),
            weight_quant_ste(w.as_tensor()).unwrap(),
        );
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst <= 1e-6 * scale, "{what}: {worst} of {scale}");
        };
        close(&engine.0, &device.0, "quantized activations");
        close(&engine.1, &device.1, "ternarized weights");
        close(&engine.2, &device.2, "gradient of x");
        close(&engine.3, &device.3, "gradient of w");
        // Ternary: the device path's weights take three values.
        let s = device.1.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            device
                .1
                .iter()
                .all(|v| v.abs() < 1e-6 * s || (v.abs() - s).abs() <= 1e-6 * s)
        );
    }
}
