//! The transformer: embeddings, decoder layers, final norm, lm_head; one forward pass over any
//! mix of sequences (prefill of one, decode of many, or both).

use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::linear::{DenseMatrix, Linear, TernaryLinear};
use crate::ops::{Rope, gated_activation, rms_norm_rows};
use crate::spec::{Family, ModelSpec};
use bitnet_kernels::attention::{self, KvHead};
use bitnet_kernels::pool;

thread_local! {
    /// Attention scores scratch, one per thread of the pool.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// BitNet: RMSNorm of the attention output before `o_proj`.
    pub attn_sub_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// BitNet: RMSNorm of `act(gate) * up` before `down_proj`.
    pub ffn_sub_norm: Option<Vec<f32>>,
}

/// Q, K, V (and gate, up) stacked into one matrix each when they are ternary: same outputs,
/// fewer and longer weight streams.
#[derive(Debug, Clone)]
struct Fused {
    qkv: Option<TernaryLinear>,
    gate_up: Option<TernaryLinear>,
}

impl Fused {
    /// Stack the layer's Q/K/V and gate/up, then point the separate layers into the stacks so
    /// the weights are held once.
    fn of(l: &mut Layer) -> Self {
        fn t(x: &Linear) -> Option<&TernaryLinear> {
            match x {
                Linear::Ternary(t) => Some(t),
                Linear::Dense(_) | Linear::Int8(_) | Linear::Int4(_) => None,
            }
        }
        let qkv = match (t(&l.q), t(&l.k), t(&l.v)) {
            (Some(q), Some(k), Some(v)) => TernaryLinear::fuse(&[q, k, v]),
            _ => None,
        };
        let gate_up = match (t(&l.gate), t(&l.up)) {
            (Some(g), Some(u)) => TernaryLinear::fuse(&[g, u]),
            _ => None,
        };
        if let (Some(f), Linear::Ternary(q), Linear::Ternary(k), Linear::Ternary(v)) =
            (&qkv, &mut l.q, &mut l.k, &mut l.v)
        {
            let (qr, kr) = (q.rows(), k.rows());
            q.share_rows_of(f, 0);
            k.share_rows_of(f, qr);
            v.share_rows_of(f, qr + kr);
        }
        if let (Some(f), Linear::Ternary(g), Linear::Ternary(u)) =
            (&gate_up, &mut l.gate, &mut l.up)
        {
            let gr = g.rows();
            g.share_rows_of(f, 0);
            u.share_rows_of(f, gr);
        }
        Self { qkv, gate_up }
    }
}

/// A loaded model.
#[derive(Debug, Clone)]
pub struct Model {
    pub spec: ModelSpec,
    /// `[vocab, hidden]`.
    pub embed: DenseMatrix,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; the embedding matrix itself when tied.
    pub lm_head: Linear,
    rope: Rope,
    fused: Vec<Fused>,
}

/// A compact integer form for the lm_head (`--head-quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadQuant {
    /// Int8 rows with a scale per row: half the bytes of f16.
    Int8,
    /// 4-bit weights with a scale per 128: 4.25 bits per weight, about a quarter of f16.
    Q4,
}

impl std::str::FromStr for HeadQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "int8" => Ok(Self::Int8),
            "q4" => Ok(Self::Q4),
            other => Err(format!(
                "unknown head quantization {other:?}: choose int8 or q4"
            )),
        }
    }
}

/// One token of one sequence to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Index into the caches passed to [`Model::forward`].
    pub seq: usize,
    pub token: u32,
    /// Whether to compute logits for this position.
    pub logits: bool,
}

/// `FAILPOINTS=model-forward-token=return(ID)`: panic inside a pool share when a step feeds
/// token `ID` (see [`crate::failpoints_from_env`]).
#[cfg(feature = "failpoints")]
fn failpoint_forward_token(steps: &[Step]) {
    let bad = fail::eval("model-forward-token", |arg| arg?.parse::<u32>().ok()).flatten();
    if let Some(bad) = bad {
        bitnet_kernels::pool::current().run_shares(steps.len().min(64), &|i, n| {
            for st in &steps[bitnet_kernels::pool::share(steps.len(), i, n)] {
                assert!(
                    st.token != bad,
                    "failpoint model-forward-token: token {bad}"
                );
            }
        });
    }
}

impl Model {
    pub fn new(
        spec: ModelSpec,
        embed: DenseMatrix,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Result<Self> {
        let check = |name: &str, l: &Linear, rows: usize, cols: usize| -> Result<()> {
            if l.rows() == rows && l.cols() == cols {
                Ok(())
            } else {
                Err(ModelError::Shape {
                    name: name.to_string(),
                    expected: vec![rows, cols],
                    found: vec![l.rows(), l.cols()],
                })
            }
        };
        let s = &spec;
        if embed.rows != s.vocab || embed.cols != s.hidden {
            return Err(ModelError::Shape {
                name: "embeddings".into(),
                expected: vec![s.vocab, s.hidden],
                found: vec![embed.rows, embed.cols],
            });
        }
        if layers.len() != s.n_layers {
            return Err(ModelError::Invalid(format!(
                "{} layers loaded, config says {}",
                layers.len(),
                s.n_layers
            )));
        }
        for (i, l) in layers.iter().enumerate() {
            check(&format!("layer {i} q"), &l.q, s.q_dim(), s.hidden)?;
            check(&format!("layer {i} k"), &l.k, s.kv_dim(), s.hidden)?;
            check(&format!("layer {i} v"), &l.v, s.kv_dim(), s.hidden)?;
            check(&format!("layer {i} o"), &l.o, s.hidden, s.q_dim())?;
            check(
                &format!("layer {i} gate"),
                &l.gate,
                s.intermediate,
                s.hidden,
            )?;
            check(&format!("layer {i} up"), &l.up, s.intermediate, s.hidden)?;
            check(
                &format!("layer {i} down"),
                &l.down,
                s.hidden,
                s.intermediate,
            )?;
            let norms = [
                (l.attn_norm.len(), s.hidden),
                (l.ffn_norm.len(), s.hidden),
                (
                    l.attn_sub_norm.as_ref().map_or(s.q_dim(), Vec::len),
                    s.q_dim(),
                ),
                (
                    l.ffn_sub_norm.as_ref().map_or(s.intermediate, Vec::len),
                    s.intermediate,
                ),
            ];
            if norms.iter().any(|(a, b)| a != b) {
                return Err(ModelError::Invalid(format!(
                    "layer {i}: a norm weight has the wrong length"
                )));
            }
            if s.family == Family::BitNet && (l.attn_sub_norm.is_none() || l.ffn_sub_norm.is_none())
            {
                return Err(ModelError::Invalid(format!(
                    "layer {i}: BitNet layers need attn_sub_norm and ffn_sub_norm"
                )));
            }
        }
        check("lm_head", &lm_head, s.vocab, s.hidden)?;
        if norm.len() != s.hidden {
            return Err(ModelError::Invalid(
                "final norm has the wrong length".into(),
            ));
        }
        let rope = Rope::new(s.head_dim, s.rope_theta, s.rope_style);
        let mut layers = layers;
        let fused = layers.iter_mut().map(Fused::of).collect();
        Ok(Self {
            spec,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            fused,
        })
    }

    /// A linear layer by its Hugging Face module path (`model.layers.3.self_attn.q_proj`,
    /// `lm_head`), for tests and reports.
    pub fn linear(&self, path: &str) -> Option<&Linear> {
        if path == "lm_head" {
            return Some(&self.lm_head);
        }
        let (i, t) = bitnet_formats::names::parse_hf(path)?;
        let l = self.layers.get(i)?;
        use bitnet_formats::names::{DOWN, GATE, K, O, Q, UP, V};
        Some(match t {
            Q => &l.q,
            K => &l.k,
            V => &l.v,
            O => &l.o,
            GATE => &l.gate,
            UP => &l.up,
            DOWN => &l.down,
            _ => return None,
        })
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.spec.n_layers, self.spec.kv_dim())
    }

    /// Bytes of weights one decode step reads (all linear layers and the lm_head).
    pub fn weight_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|x| x.weight_bytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// Replace a float lm_head by a compact integer form (fewer bytes per decoded token; the
    /// cost in accuracy is measured with `bitnet perplexity --head-quant`). The embedding
    /// lookup keeps the original matrix.
    pub fn quantize_head(&mut self, quant: HeadQuant) {
        if let Linear::Dense(d) = &self.lm_head {
            let row = |r: usize, buf: &mut [f32]| d.row_into(r, buf);
            self.lm_head = match quant {
                HeadQuant::Int8 => Linear::Int8(bitnet_kernels::int8::Int8Rows::quantize(
                    d.rows, d.cols, row,
                )),
                HeadQuant::Q4 => Linear::Int4(bitnet_kernels::int4::Int4Rows::quantize(
                    d.rows, d.cols, row,
                )),
            };
        }
    }

    /// Logits of every position of `tokens`, run as one fresh sequence in one batched pass.
    pub fn logits_all(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let steps: Vec<Step> = tokens
            .iter()
            .map(|&token| Step {
                seq: 0,
                token,
                logits: true,
            })
            .collect();
        let mut cache = self.new_cache();
        self.forward(&steps, std::slice::from_mut(&mut cache))
    }

    /// Run `steps` (tokens appended to their sequences' caches, in order) and return the logits
    /// of the steps that asked for them, in order.
    pub fn forward(&self, steps: &[Step], caches: &mut [KvCache]) -> Result<Vec<Vec<f32>>> {
        let s = &self.spec;
        let n = steps.len();
        // Positions: each sequence continues from its cache length, in step order.
        let mut next: Vec<usize> = caches.iter().map(KvCache::len).collect();
        let mut pos = Vec::with_capacity(n);
        for st in steps {
            let p = next.get_mut(st.seq).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "step for sequence {} but only {} caches",
                    st.seq,
                    caches.len()
                ))
            })?;
            if st.token as usize >= s.vocab {
                return Err(ModelError::BadToken {
                    id: st.token,
                    vocab: s.vocab,
                });
            }
            if *p >= s.context {
                return Err(ModelError::ContextFull {
                    needed: *p + 1,
                    ctx: s.context,
                });
            }
            pos.push(*p);
            *p += 1;
        }
        #[cfg(feature = "failpoints")]
        failpoint_forward_token(steps);
        let (hd, qd, kvd, h) = (s.head_dim, s.q_dim(), s.kv_dim(), s.hidden);
        let mut x = vec![0.0f32; n * h];
        for (t, st) in steps.iter().enumerate() {
            self.embed
                .row_into(st.token as usize, &mut x[t * h..(t + 1) * h]);
        }
        let mut buf = vec![0.0f32; n * h];
        let (mut q, mut k, mut v) = (
            vec![0.0f32; n * qd],
            vec![0.0f32; n * kvd],
            vec![0.0f32; n * kvd],
        );
        let mut attn = vec![0.0f32; n * qd];
        let (mut gate, mut up) = (
            vec![0.0f32; n * s.intermediate],
            vec![0.0f32; n * s.intermediate],
        );
        let group = s.n_heads / s.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut qkv = Vec::new();
        let kernel_pool = pool::current();
        for (li, layer) in self.layers.iter().enumerate() {
            buf.copy_from_slice(&x);
            rms_norm_rows(&mut buf, &layer.attn_norm, s.rms_eps);
            match &self.fused[li].qkv {
                Some(f) => {
                    qkv.resize(n * (qd + 2 * kvd), 0.0);
                    f.matmul(&buf, n, &mut qkv);
                    for t in 0..n {
                        let row = &qkv[t * (qd + 2 * kvd)..(t + 1) * (qd + 2 * kvd)];
                        q[t * qd..(t + 1) * qd].copy_from_slice(&row[..qd]);
                        k[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                        v[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
                    }
                }
                None => {
                    layer.q.matmul(&buf, n, &mut q);
                    layer.k.matmul(&buf, n, &mut k);
                    layer.v.matmul(&buf, n, &mut v);
                }
            }
            for t in 0..n {
                self.rope.apply(&mut q[t * qd..(t + 1) * qd], pos[t], hd);
                self.rope.apply(&mut k[t * kvd..(t + 1) * kvd], pos[t], hd);
                caches[steps[t].seq].push(
                    li,
                    &k[t * kvd..(t + 1) * kvd],
                    &v[t * kvd..(t + 1) * kvd],
                );
            }
            // Attention: one unit per (token, KV head), the query heads sharing that KV head
            // together, spread over the threads.
            let kv: Vec<(&[f32], &[f32])> =
                steps.iter().map(|st| caches[st.seq].layer(li)).collect();
            pool::par_chunks_mut(&kernel_pool, &mut attn, group * hd, &|u, out| {
                let (t, kvh) = (u / s.n_kv_heads, u % s.n_kv_heads);
                let (keys, values) = kv[t];
                let head = KvHead {
                    keys,
                    values,
                    stride: kvd,
                    offset: kvh * hd,
                    len: pos[t] + 1,
                };
                let q0 = t * qd + kvh * group * hd;
                SCORES.with_borrow_mut(|scores| {
                    attention::attend(&q[q0..q0 + group * hd], head, hd, scale, scores, out)
                });
            });
            if let Some(w) = &layer.attn_sub_norm {
                rms_norm_rows(&mut attn, w, s.rms_eps);
            }
            layer.o.matmul(&attn, n, &mut buf);
            for (xv, &b) in x.iter_mut().zip(&buf) {
                *xv += b;
            }
            buf.copy_from_slice(&x);
            rms_norm_rows(&mut buf, &layer.ffn_norm, s.rms_eps);
            match &self.fused[li].gate_up {
                Some(f) => {
                    // One product for gate and up, activated straight out of its rows.
                    let inter = s.intermediate;
                    qkv.resize(n * 2 * inter, 0.0);
                    f.matmul(&buf, n, &mut qkv);
                    let gu = &qkv;
                    let act = |t: usize, g: &mut [f32]| {
                        let row = &gu[t * 2 * inter..(t + 1) * 2 * inter];
                        g.copy_from_slice(&row[..inter]);
                        gated_activation(s.activation, g, &row[inter..]);
                    };
                    crate::ops::for_each_row(&mut gate, inter, &act);
                }
                None => {
                    layer.gate.matmul(&buf, n, &mut gate);
                    layer.up.matmul(&buf, n, &mut up);
                    gated_activation(s.activation, &mut gate, &up);
                }
            }
            if let Some(w) = &layer.ffn_sub_norm {
                rms_norm_rows(&mut gate, w, s.rms_eps);
            }
            layer.down.matmul(&gate, n, &mut buf);
            for (xv, &b) in x.iter_mut().zip(&buf) {
                *xv += b;
            }
        }
        for (c, &len) in caches.iter_mut().zip(&next) {
            c.set_len(len);
        }
        let want: Vec<usize> = (0..n).filter(|&t| steps[t].logits).collect();
        let mut hs = Vec::with_capacity(want.len() * h);
        for &t in &want {
            hs.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        rms_norm_rows(&mut hs, &self.norm, s.rms_eps);
        let mut logits = vec![0.0f32; want.len() * s.vocab];
        self.lm_head.matmul(&hs, want.len(), &mut logits);
        Ok(logits.chunks(s.vocab).map(<[f32]>::to_vec).collect())
    }
}
