//! The trainable BitNet b1.58 model: float master weights as candle variables under their
//! Hugging Face names, and the forward pass over a batch of token rows.

use crate::config::{ModelConfig, Precision, Quant};
use crate::error::{Result, TrainError};
use crate::ops;
use bitnet_formats::names::{self, LayerTensor};
use candle_core::{D, DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// The resolved shape of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub tied: bool,
    pub quant: Quant,
}

impl Shape {
    pub fn from_config(m: &ModelConfig, vocab: usize) -> Self {
        Self {
            hidden: m.hidden_size,
            intermediate: m.intermediate_size,
            layers: m.num_hidden_layers,
            heads: m.num_attention_heads,
            kv_heads: m.kv_heads(),
            head_dim: m.head_dim(),
            vocab,
            max_pos: m.max_position_embeddings,
            rms_eps: m.rms_norm_eps,
            rope_theta: m.rope_theta,
            tied: m.tie_word_embeddings,
            quant: m.quant,
        }
    }

    pub fn dims(&self) -> names::Dims {
        names::Dims {
            hidden: self.hidden,
            q: self.heads * self.head_dim,
            kv: self.kv_heads * self.head_dim,
            inter: self.intermediate,
        }
    }

    /// Every parameter's name and shape, in a fixed order (the order of checkpoints and of
    /// the optimizer's state).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.dims();
        let mut out = vec![(names::EMBED.hf.to_string(), vec![self.vocab, self.hidden])];
        for l in 0..self.layers {
            for t in names::LAYER {
                out.push((t.hf_weight(l), t.shape(&d)));
            }
        }
        out.push((names::OUTPUT_NORM.hf.to_string(), vec![self.hidden]));
        if !self.tied {
            out.push((names::LM_HEAD.hf.to_string(), vec![self.vocab, self.hidden]));
        }
        out
    }

    pub fn parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The master weights' float type for a precision.
pub fn dtype(p: Precision) -> DType {
    match p {
        Precision::F32 | Precision::Bf16 => DType::F32,
        Precision::F64 => DType::F64,
        Precision::Bf16Masters => DType::BF16,
    }
}

/// The float type the linears and attention compute in.
pub fn compute_dtype(p: Precision) -> DType {
    match p {
        Precision::Bf16 | Precision::Bf16Masters => DType::BF16,
        p => dtype(p),
    }
}

/// A deterministic normal generator (SplitMix64 and Box-Muller), so that a seed gives the same
/// initial weights on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A parameter by name: its shape and its values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The trainable model.
#[derive(Debug)]
pub struct TrainModel {
    pub shape: Shape,
    /// The master weights' type.
    pub dtype: DType,
    /// The linears' and attention's type: `dtype`, or bf16 in mixed precision.
    pub compute: DType,
    pub device: Device,
    /// In [`Shape::parameters`] order.
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    index: HashMap<String, usize>,
}

impl TrainModel {
    fn from_values(
        shape: Shape,
        dtype: DType,
        values: Vec<(String, Vec<usize>, Vec<f64>)>,
    ) -> Result<Self> {
        let device = Device::Cpu;
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for (name, dims, v) in values {
            let t = Tensor::from_vec(v, dims, &device)?.to_dtype(dtype)?;
            names.push(name);
            vars.push(Var::from_tensor(&t)?);
        }
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Self {
            shape,
            dtype,
            compute: dtype,
            device,
            names,
            vars,
            index,
        })
    }

    /// Fresh weights: norms at 1, everything else `N(0, std^2)` from `seed`.
    pub fn init(shape: Shape, dtype: DType, std: f64, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let values = shape
            .parameters()
            .into_iter()
            .map(|(name, dims)| {
                let n: usize = dims.iter().product();
                let v = if dims.len() == 1 {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| rng.normal() * std).collect()
                };
                (name, dims, v)
            })
            .collect();
        Self::from_values(shape, dtype, values)
    }

    /// Start from a Hugging Face BitNet directory with float master weights (the layout
    /// transformers saves a `BitNetForCausalLM` in, `quantization_mode: online`).
    pub fn from_hf_dir(dir: &Path, quant: Quant, dtype: DType) -> Result<Self> {
        let hf = bitnet_formats::safetensors_dir::HfModelDir::open(dir)?;
        let c = &hf.config;
        let bad = |message: String| TrainError::Config {
            path: dir.into(),
            message,
        };
        if c.model_type.as_deref() != Some("bitnet") {
            return Err(bad(format!(
                "model_type {:?}: --init takes a BitNet (model_type \"bitnet\") directory",
                c.model_type
            )));
        }
        if let Some(q) = &c.quantization_config
            && q.quantization_mode.as_deref() == Some("offline")
        {
            return Err(bad(
                "its weights are already packed ternary (quantization_mode \"offline\"); \
                 training needs the float masters (\"online\")"
                    .into(),
            ));
        }
        if c.hidden_act.as_deref().is_some_and(|a| a != "relu2") {
            return Err(bad(format!(
                "hidden_act {:?}: only relu2 is trained",
                c.hidden_act
            )));
        }
        let m = ModelConfig {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: Some(c.num_kv_heads()),
            vocab_size: Some(c.vocab_size),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: c.rope_theta(),
            tie_word_embeddings: c.tie_word_embeddings(),
            quant,
            init_std: 0.02,
        };
        if c.head_dim() != m.head_dim() {
            return Err(bad(format!(
                "head_dim {} is not hidden_size / num_attention_heads",
                c.head_dim()
            )));
        }
        let shape = Shape::from_config(&m, c.vocab_size);
        let mut values = Vec::new();
        for (name, dims) in shape.parameters() {
            let info = hf
                .weights
                .get(&name)
                .ok_or_else(|| bad(format!("missing tensor {name}")))?;
            if info.shape != dims {
                return Err(bad(format!(
                    "tensor {name} has shape {:?}, the config makes it {dims:?}",
                    info.shape
                )));
            }
            let v = hf.weights.to_f32(&name)?;
            values.push((name, dims, v.into_iter().map(f64::from).collect()));
        }
        Self::from_values(shape, dtype, values)
    }

    /// The same parameters on `device` (a copy; the CPU is where every model starts).
    pub fn to_device(self, device: &Device) -> Result<Self> {
        if self.device.same_device(device) {
            return Ok(self);
        }
        let vars = self
            .vars
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().to_device(device)?))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            device: device.clone(),
            ..self
        })
    }

    /// The model config that describes this model (for checks and exports).
    pub fn model_config(&self) -> ModelConfig {
        let s = &self.shape;
        ModelConfig {
            hidden_size: s.hidden,
            intermediate_size: s.intermediate,
            num_hidden_layers: s.layers,
            num_attention_heads: s.heads,
            num_key_value_heads: Some(s.kv_heads),
            vocab_size: Some(s.vocab),
            max_position_embeddings: s.max_pos,
            rms_norm_eps: s.rms_eps,
            rope_theta: s.rope_theta,
            tie_word_embeddings: s.tied,
            quant: s.quant,
            init_std: 0.02,
        }
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.index
            .get(name)
            .map(|&i| &self.vars[i])
            .ok_or_else(|| TrainError::Config {
                path: "model".into(),
                message: format!("no parameter {name}"),
            })
    }

    fn layer(&self, t: LayerTensor, l: usize) -> Result<&Tensor> {
        Ok(self.var(&t.hf_weight(l))?.as_tensor())
    }

    /// Whether a parameter gets weight decay: matrices do, norms do not.
    pub fn decays(&self, i: usize) -> bool {
        self.vars[i].as_tensor().rank() >= 2
    }

    /// Logits `[b * t, vocab]` for token rows `ids: [b, t]` (u32).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let s = &self.shape;
        let (b, t) = ids.dims2()?;
        if t > s.max_pos {
            return Err(TrainError::Config {
                path: "model".into(),
                message: format!(
                    "sequences of {t} tokens exceed max_position_embeddings {}",
                    s.max_pos
                ),
            });
        }
        let ternary = s.quant == Quant::Ternary;
        let eps = s.rms_eps;
        let (hd, nh, nkv) = (s.head_dim, s.heads, s.kv_heads);
        // Mixed precision as autocast does it: the residual stream, norms, softmax and logits
        // in the masters' type; the linears and attention products in `compute`.
        let cd = self.compute;
        let c = |t: &Tensor| t.to_dtype(cd);
        let embed = self.var(names::EMBED.hf)?.as_tensor();
        let mut x = embed.index_select(&ids.flatten_all()?, 0)?;
        let (cos, sin) = ops::rope_tables(t, hd, s.rope_theta, cd, &self.device)?;
        let mask: Vec<f64> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?.to_dtype(cd)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in 0..s.layers {
            let h = c(&ops::rms_norm(&x, self.layer(names::ATTN_NORM, l)?, eps)?)?;
            let heads = |w: LayerTensor, n: usize| -> Result<Tensor> {
                let y = ops::linear(&h, self.layer(w, l)?, ternary)?;
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = ops::rope(&heads(names::Q, nh)?, &cos, &sin)?;
            let mut k = ops::rope(&heads(names::K, nkv)?, &cos, &sin)?;
            let mut v = heads(names::V, nkv)?;
            if nh != nkv {
                let rep = nh / nkv;
                let expand = |x: Tensor| -> candle_core::Result<Tensor> {
                    x.unsqueeze(2)?
                        .broadcast_as((b, nkv, rep, t, hd))?
                        .contiguous()?
                        .reshape((b, nh, t, hd))
                };
                k = expand(k)?;
                v = expand(v)?;
            }
            let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let att = ops::softmax_last(&att)?.matmul(&v)?;
            let att = att.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            let att = ops::rms_norm(&att, self.layer(names::ATTN_SUB_NORM, l)?, eps)?;
            let o = ops::linear(&att, self.layer(names::O, l)?, ternary)?;
            x = (x + o.to_dtype(self.dtype)?)?;
            let h = c(&ops::rms_norm(&x, self.layer(names::FFN_NORM, l)?, eps)?)?;
            let g = ops::linear(&h, self.layer(names::GATE, l)?, ternary)?;
            let u = ops::linear(&h, self.layer(names::UP, l)?, ternary)?;
            let a = (g.relu()?.sqr()? * u)?;
            let a = ops::rms_norm(&a, self.layer(names::FFN_SUB_NORM, l)?, eps)?;
            let d = ops::linear(&a, self.layer(names::DOWN, l)?, ternary)?;
            x = (x + d.to_dtype(self.dtype)?)?;
        }
        let x = c(&ops::rms_norm(
            &x,
            self.var(names::OUTPUT_NORM.hf)?.as_tensor(),
            eps,
        )?)?;
        let head = if s.tied {
            embed
        } else {
            self.var(names::LM_HEAD.hf)?.as_tensor()
        };
        // The logits (and the loss) in the masters' type, or in f32 for bf16 masters.
        Ok(x.matmul(&c(head)?.t()?)?.to_dtype(ops::wide(self.dtype))?)
    }

    /// Mean next-token cross-entropy of rows `[b, t + 1]` (u32): the model reads the first `t`
    /// tokens of each row and is scored on the last `t`.
    pub fn loss(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(self.loss_terms(rows, None)?.0)
    }

    /// The cross-entropy of [`Self::loss`] and, given the teacher's logits of the same positions
    /// (`[b * t, vocab]`) and a temperature, the distillation term [`ops::distill_kl`]; one
    /// forward pass serves both.
    pub fn loss_terms(
        &self,
        rows: &Tensor,
        teacher: Option<(&Tensor, f64)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = rows.dim(D::Minus1)?;
        let input = rows.narrow(1, 0, w - 1)?.contiguous()?;
        let target = rows.narrow(1, 1, w - 1)?.flatten_all()?.contiguous()?;
        let logits = self.forward(&input)?;
        let ce = ops::cross_entropy(&logits, &target)?;
        let kl = match teacher {
            Some((t, temperature)) => Some(ops::distill_kl(
                &logits,
                &t.to_dtype(logits.dtype())?,
                temperature,
            )?),
            None => None,
        };
        Ok((ce, kl))
    }

    /// Every parameter as f32 values, by name (for exports).
    pub fn tensors_f32(&self) -> Result<Vec<NamedTensor>> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| {
                let t = v.as_tensor();
                Ok((
                    n.clone(),
                    t.dims().to_vec(),
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(seed: u64) -> Vec<f32> {
        let m = ModelConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            ..ModelConfig::default()
        };
        let t = TrainModel::init(Shape::from_config(&m, 50), DType::F32, 0.02, seed).unwrap();
        t.tensors_f32()
            .unwrap()
            .into_iter()
            .flat_map(|(_, _, v)| v)
            .collect()
    }

    /// Mixed precision (bf16 linears and attention, f32 everything else) computes the f32 model's
    /// loss and gradients to bf16's accuracy.
    #[test]
    fn bf16_mixed_precision_follows_f32() {
        let m = ModelConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            ..ModelConfig::default()
        };
        let mut model = TrainModel::init(Shape::from_config(&m, 97), DType::F32, 0.05, 3).unwrap();
        let ids: Vec<u32> = (0..3 * 17).map(|i| (i * 31 + 7) % 97).collect();
        let rows = Tensor::from_vec(ids, (3, 17), &Device::Cpu).unwrap();
        let run = |model: &TrainModel| {
            let loss = model.loss(&rows).unwrap();
            let g = loss.backward().unwrap();
            let grads: Vec<f32> = model
                .vars
                .iter()
                .flat_map(|v| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), grads)
        };
        let (l32, g32) = run(&model);
        model.compute = DType::BF16;
        let (l16, g16) = run(&model);
        assert!((l32 - l16).abs() < 0.01 * l32, "loss {l32} vs {l16}");
        let dot: f64 = g32.iter().zip(&g16).map(|(a, b)| f64::from(a * b)).sum();
        let norm = |g: &[f32]| g.iter().map(|v| f64::from(v * v)).sum::<f64>().sqrt();
        let cos = dot / (norm(&g32) * norm(&g16));
        assert!(cos > 0.99, "gradient cosine {cos}");
    }

    #[test]
    fn a_seed_gives_the_same_initial_weights() {
        let a = weights(7);
        assert_eq!(a, weights(7));
        assert_ne!(a, weights(8));
        let n = a.len() as f64;
        let mean_sq = a
            .iter()
            .filter(|v| **v != 1.0)
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean_sq > 1e-4 && mean_sq < 1e-3, "{mean_sq}");
    }
}
