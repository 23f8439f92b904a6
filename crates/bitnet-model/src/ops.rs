//! The float parts of the forward pass: RMSNorm, RoPE, activations (attention is a kernel:
//! `bitnet_kernels::attention`).

use crate::spec::{Activation, RopeStyle};

/// `x = w * x / sqrt(mean(x^2) + eps)` in place, as transformers' `LlamaRMSNorm` (f32
/// throughout; the mean accumulated in f64 so that it is correctly rounded).
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let var = (ss / x.len() as f64) as f32;
    let r = 1.0 / (var + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * r);
    }
}

/// In-place RMSNorm of each `dim`-long row.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for_each_row(x, w.len(), &|_, row| rms_norm(row, w, eps));
}

/// Rows from which per-row float work is worth handing to the pool.
const PARALLEL_ROWS: usize = 4;

/// `f(index, row)` for every `row_len`-long row of `x`: on the kernel threads when there are
/// several rows (batched decode, prefill), on this thread otherwise (one token's rows are too
/// little work to hand out).
pub fn for_each_row<T: Send>(x: &mut [T], row_len: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    if x.len() >= PARALLEL_ROWS * row_len {
        bitnet_kernels::pool::par_chunks_mut(&bitnet_kernels::pool::current(), x, row_len, f);
    } else {
        x.chunks_mut(row_len)
            .enumerate()
            .for_each(|(t, row)| f(t, row));
    }
}

/// Precomputed RoPE frequencies for one head dimension.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    /// `inv_freq[i] = 1 / theta^(2i/d)` in f32, as transformers' default RoPE computes it.
    pub fn new(head_dim: usize, theta: f32, style: RopeStyle) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq, style }
    }

    /// Rotate every head of `x` (`n_heads * head_dim` values) for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize, head_dim: usize) {
        let half = head_dim / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|&f| {
                let a = f64::from(pos as f32 * f);
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        for head in x.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::NeoX => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

/// `act(gate) * up`, in place into `gate`.
pub fn gated_activation(act: Activation, gate: &mut [f32], up: &[f32]) {
    match act {
        Activation::Silu => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        }
        Activation::Relu2 => {
            for (g, &u) in gate.iter_mut().zip(up) {
                let r = g.max(0.0);
                *g = r * r * u;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_agree_up_to_permutation() {
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| i as f32 * 0.3 - 1.0).collect();
        // Interleaved on the permutation [0, 4, 1, 5, 2, 6, 3, 7] of x equals NeoX on x.
        let perm = [0, 4, 1, 5, 2, 6, 3, 7];
        let mut neox = x.clone();
        Rope::new(d, 10000.0, RopeStyle::NeoX).apply(&mut neox, 7, d);
        let mut inter: Vec<f32> = perm.iter().map(|&p| x[p]).collect();
        Rope::new(d, 10000.0, RopeStyle::Interleaved).apply(&mut inter, 7, d);
        for (j, &p) in perm.iter().enumerate() {
            assert!((inter[j] - neox[p]).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_unit() {
        let mut out = [3.0, 4.0];
        rms_norm(&mut out, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
