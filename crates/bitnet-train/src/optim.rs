//! AdamW with decoupled weight decay (Loshchilov & Hutter), global-norm gradient clipping and
//! the learning-rate schedules, written over candle tensors so that the optimizer's state can be
//! checkpointed and restored exactly.
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor path): `p *= 1 - lr * wd`;
//! `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! For bf16 (or f16) masters the moments are f32 and the update is computed in f32 from the
//! widened weight, then rounded back once.

use crate::config::{Schedule, TrainSettings};
use crate::ops::wide;
use candle_core::{Result, Tensor, Var};

#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates done so far.
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[Var], s: &TrainSettings) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like()?.to_dtype(wide(v.dtype()));
        Ok(Self {
            beta1: s.betas[0],
            beta2: s.betas[1],
            eps: s.eps,
            t: 0,
            m: vars.iter().map(zeros).collect::<Result<_>>()?,
            v: vars.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// One update of every variable; `decay[i]` says whether variable `i` gets weight decay.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        decay: &[bool],
        lr: f64,
        weight_decay: f64,
    ) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for i in 0..vars.len() {
            let dt = vars[i].dtype();
            let g = &grads[i].to_dtype(wide(dt))?;
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mut p = vars[i].as_tensor().to_dtype(wide(dt))?;
            if decay[i] && weight_decay > 0.0 {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let denom = ((v.sqrt()? / bc2_sqrt)? + self.eps)?;
            let p = (p - (m.div(&denom)? * step_size)?)?;
            vars[i].set(&p.to_dtype(dt)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients, computed in f64.
///
/// The per-tensor sums stay on the device and are read back once (one synchronization per
/// step on a GPU, not one per tensor).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let sums = Tensor::stack(&sums, 0)?.to_vec1::<f64>()?;
    Ok(sums.iter().sum::<f64>().sqrt())
}

/// Scale gradients so that their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does: by `max_norm / (norm + 1e-6)` when that is below 1.
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

/// The learning rate and weight decay of update `step` (0-based) of a run of `s.steps`.
///
/// Warmup rises linearly to `lr` over the first `warmup` updates (`lr * (step + 1) / warmup`).
/// After it, with `p` the share of the remaining updates done (0 to 1): `constant` keeps `lr`;
/// `cosine` is `min + (lr - min) (1 + cos(pi p)) / 2`; `linear` is `lr - (lr - min) p`.
/// `two-stage`: cosine from `lr` towards `lr * stage2_lr_ratio` until `stage2_start` of the run,
/// then linear from `lr * stage2_lr_ratio` to `min`, with weight decay off.
pub fn schedule(s: &TrainSettings, step: u64) -> (f64, f64) {
    let (lr, min) = (s.lr, s.min_lr);
    if step < s.warmup {
        return (lr * (step + 1) as f64 / s.warmup as f64, s.weight_decay);
    }
    let span = s.steps.saturating_sub(s.warmup).max(1) as f64;
    let p = ((step - s.warmup) as f64 / span).clamp(0.0, 1.0);
    let cosine = |from: f64, to: f64, p: f64| {
        to + (from - to) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    };
    match s.schedule {
        Schedule::Constant => (lr, s.weight_decay),
        Schedule::Cosine => (cosine(lr, min, p), s.weight_decay),
        Schedule::Linear => (lr - (lr - min) * p, s.weight_decay),
        Schedule::TwoStage => {
            let boundary = s.stage2_start;
            let peak2 = lr * s.stage2_lr_ratio;
            if p < boundary {
                (cosine(lr, peak2, p / boundary), s.weight_decay)
            } else {
                let q = if boundary < 1.0 {
                    (p - boundary) / (1.0 - boundary)
                } else {
                    1.0
                };
                (peak2 - (peak2 - min) * q, 0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_min() {
        let mut s = TrainSettings {
            steps: 110,
            warmup: 10,
            lr: 1.0,
            min_lr: 0.1,
            ..TrainSettings::default()
        };
        assert_eq!(schedule(&s, 0).0, 0.1);
        assert_eq!(schedule(&s, 9).0, 1.0);
        assert_eq!(schedule(&s, 10).0, 1.0);
        assert!((schedule(&s, 60).0 - 0.55).abs() < 1e-12);
        s.schedule = Schedule::Linear;
        assert!((schedule(&s, 60).0 - 0.55).abs() < 1e-12);
        assert!((schedule(&s, 110).0 - 0.1).abs() < 1e-12);
        s.schedule = Schedule::Constant;
        assert_eq!(schedule(&s, 100).0, 1.0);
        s.schedule = Schedule::TwoStage;
        s.stage2_lr_ratio = 0.5;
        let (before, wd1) = schedule(&s, 59);
        let (after, wd2) = schedule(&s, 61);
        assert!(before > 0.5 && after <= 0.5, "{before} {after}");
        assert_eq!((wd1, wd2), (s.weight_decay, 0.0));
        s.warmup = 0;
        assert_eq!(schedule(&s, 0).0, 1.0);
    }
}
