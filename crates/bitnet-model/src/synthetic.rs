//! Models with real shapes and random weights, built in memory, for benchmarks.

use crate::error::Result;
use crate::linear::{DenseMatrix, Linear, TernaryLinear, WeightBytes};
use crate::model::{Layer, Model};
use crate::spec::{Activation, Family, ModelSpec, RopeStyle};
use bitnet_core::quant::ScaleConvention;
use bitnet_formats::gguf::GgmlType;
use bitnet_kernels::ternary::PackedTernary;

/// The shapes of microsoft/bitnet-b1.58-2B-4T: hidden 2560, 30 layers, 20 heads / 5 KV heads,
/// FFN 6912, vocabulary 128256, tied embeddings.
pub fn spec_2b4t() -> ModelSpec {
    ModelSpec {
        family: Family::BitNet,
        arch_name: "bitnet-25 (synthetic 2B-4T)".into(),
        hidden: 2560,
        intermediate: 6912,
        n_layers: 30,
        n_heads: 20,
        n_kv_heads: 5,
        head_dim: 128,
        vocab: 128256,
        context: 4096,
        rms_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_style: RopeStyle::NeoX,
        activation: Activation::Relu2,
        tied_embeddings: true,
    }
}

/// A model of `spec`'s shapes with random ternary linears (2-bit, packed) and an embedding /
/// lm_head matrix of `head_type` (F16 as the anchors keep it).
pub fn random_model(spec: ModelSpec, head_type: GgmlType, seed: u64) -> Result<Model> {
    let s = &spec;
    let lin = |rows: usize, cols: usize, k: u64| {
        Linear::Ternary(TernaryLinear::from_packed(
            PackedTernary::random(rows, cols, seed ^ k.wrapping_mul(0x9E37_79B9)),
            0.02,
            ScaleConvention::Multiply,
        ))
    };
    let mut layers = Vec::with_capacity(s.n_layers);
    for l in 0..s.n_layers as u64 {
        let k = l * 16;
        layers.push(Layer {
            attn_norm: vec![1.0; s.hidden],
            q: lin(s.q_dim(), s.hidden, k + 1),
            k: lin(s.kv_dim(), s.hidden, k + 2),
            v: lin(s.kv_dim(), s.hidden, k + 3),
            o: lin(s.hidden, s.q_dim(), k + 4),
            attn_sub_norm: Some(vec![1.0; s.q_dim()]),
            ffn_norm: vec![1.0; s.hidden],
            gate: lin(s.intermediate, s.hidden, k + 5),
            up: lin(s.intermediate, s.hidden, k + 6),
            down: lin(s.hidden, s.intermediate, k + 7),
            ffn_sub_norm: Some(vec![1.0; s.intermediate]),
        });
    }
    let n = s.vocab * s.hidden;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let elem = match head_type {
        GgmlType::F16 => 2,
        GgmlType::F32 => 4,
        other => {
            return Err(crate::ModelError::Unsupported(format!(
                "synthetic head type {other}"
            )));
        }
    };
    // Written in place: a 2B-4T head is 0.66 GB in f16, not worth holding twice.
    let mut buf = bitnet_kernels::buffer::AlignedBuf::zeroed(n * elem);
    for c in buf.chunks_exact_mut(elem) {
        let v = ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        if elem == 2 {
            c.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        } else {
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
    let bytes = WeightBytes::aligned(buf);
    let embed = DenseMatrix::new("token_embd", s.vocab, s.hidden, head_type, bytes)?;
    let lm_head = Linear::Dense(embed.clone());
    let norm = vec![1.0; s.hidden];
    Model::new(spec, embed, layers, norm, lm_head)
}
