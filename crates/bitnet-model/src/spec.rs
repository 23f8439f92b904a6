//! The shape of a model, from `config.json` or from GGUF metadata.

use crate::error::{ModelError, Result};
use bitnet_formats::config::ModelConfig;
use bitnet_formats::gguf::GgufHeader;
use bitnet_formats::names::{self, Dims, key};

/// Which transformer block the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama: SiLU-gated MLP, no sub-norms.
    Llama,
    /// BitNet b1.58 (2B-4T layout): squared-ReLU gate, RMSNorm before `o_proj` and `down_proj`.
    BitNet,
}

/// The gate activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `relu(x)^2`.
    Relu2,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face `rotate_half`: dimension `i` pairs with `i + d/2` (GPT-NeoX).
    NeoX,
    /// ggml's normal mode: dimension `2i` pairs with `2i + 1`. llama.cpp's converter permutes the
    /// rows of Q and K so that this mode on its files equals `rotate_half` on the originals.
    Interleaved,
}

/// Everything the forward pass needs to know about the architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub family: Family,
    pub arch_name: String,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Longest sequence the model was trained for.
    pub context: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    pub tied_embeddings: bool,
}

impl ModelSpec {
    /// From a Hugging Face `config.json`.
    pub fn from_hf(c: &ModelConfig) -> Result<Self> {
        let family = match c.model_type.as_deref() {
            Some("bitnet") => Family::BitNet,
            Some("llama") | Some("mistral") | None if !c.is_bitnet() => Family::Llama,
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "architecture {other:?} (supported: \"bitnet\", \"llama\" and llama-shaped \"mistral\")"
                )));
            }
            None => Family::BitNet,
        };
        let activation = match c.hidden_act.as_deref() {
            Some("relu2") => Activation::Relu2,
            Some("silu") | Some("swish") => Activation::Silu,
            None => match family {
                Family::BitNet => Activation::Relu2,
                Family::Llama => Activation::Silu,
            },
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "hidden_act {other:?} (supported: relu2, silu)"
                )));
            }
        };
        if let Some(r) = &c.rope_parameters
            && let Some(t) = r.rope_type.as_deref()
            && t != "default"
        {
            return Err(ModelError::Unsupported(format!(
                "rope_type {t:?} (only \"default\" RoPE is implemented)"
            )));
        }
        if let Some(s) = &c.rope_scaling
            && !s.is_null()
        {
            return Err(ModelError::Unsupported(format!(
                "rope_scaling {s} (only unscaled RoPE is implemented)"
            )));
        }
        Ok(Self {
            family,
            arch_name: c.architecture().to_string(),
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            n_layers: c.num_hidden_layers,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
            context: c.max_position_embeddings.unwrap_or(2048),
            rms_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: c.rope_theta() as f32,
            rope_style: RopeStyle::NeoX,
            activation,
            tied_embeddings: c.tie_word_embeddings(),
        })
    }

    /// From GGUF metadata (`{arch}.*` keys as llama.cpp writes them).
    pub fn from_gguf(h: &GgufHeader) -> Result<Self> {
        let arch = h.architecture();
        let family = match arch {
            "llama" | "mistral" => Family::Llama,
            "bitnet" | "bitnet-b1.58" | "bitnet-25" => Family::BitNet,
            "" => {
                return Err(ModelError::Unsupported(
                    "the GGUF file has no general.architecture".into(),
                ));
            }
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF architecture {other:?} (supported: llama, mistral, bitnet, bitnet-b1.58, bitnet-25)"
                )));
            }
        };
        let req = |k: &str| -> Result<usize> {
            h.arch_get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Invalid(format!("GGUF metadata {arch}.{k} is missing")))
        };
        let hidden = req(key::EMBEDDING_LENGTH)?;
        let n_heads = req(key::HEAD_COUNT)?;
        let n_kv_heads = h
            .arch_get(key::HEAD_COUNT_KV)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || hidden % n_heads != 0 {
            return Err(ModelError::Invalid(format!(
                "{n_heads} heads / {n_kv_heads} KV heads do not fit hidden size {hidden}"
            )));
        }
        let head_dim = h
            .arch_get(key::KEY_LENGTH)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(hidden / n_heads);
        let vocab = match h.arch_get(key::VOCAB_SIZE).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => h
                .get(key::TOKENS)
                .and_then(|v| v.as_array())
                .map(<[_]>::len)
                .or_else(|| {
                    h.tensor(names::EMBED.gguf)
                        .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                })
                .ok_or_else(|| ModelError::Invalid("cannot tell the vocabulary size".into()))?,
        };
        let spec = Self {
            family,
            arch_name: arch.to_string(),
            hidden,
            intermediate: req(key::FEED_FORWARD_LENGTH)?,
            n_layers: req(key::BLOCK_COUNT)?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            context: req(key::CONTEXT_LENGTH).unwrap_or(2048),
            rms_eps: h
                .arch_get(key::RMS_EPS)
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5) as f32,
            rope_theta: h
                .arch_get(key::ROPE_FREQ_BASE)
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0) as f32,
            // llama.cpp permutes Q/K of llama models for its pairwise RoPE; no BitNet converter
            // (upstream or bitnet.cpp) does, and their graphs use NeoX RoPE.
            rope_style: match family {
                Family::Llama => RopeStyle::Interleaved,
                Family::BitNet => RopeStyle::NeoX,
            },
            // Upstream llama.cpp's `bitnet` graph (1bitLLM models) gates with SiLU; bitnet.cpp's
            // `bitnet-b1.58` and `bitnet-25` (2B-4T) use squared ReLU.
            activation: match arch {
                "bitnet-b1.58" | "bitnet-25" => Activation::Relu2,
                _ => Activation::Silu,
            },
            tied_embeddings: h.tensor(names::LM_HEAD.gguf).is_none(),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Sanity limits so a hostile header cannot make the loader allocate absurd buffers.
    pub fn validate(&self) -> Result<()> {
        let limits = [
            ("hidden size", self.hidden, 1 << 16),
            ("intermediate size", self.intermediate, 1 << 18),
            ("layer count", self.n_layers, 1 << 10),
            ("vocabulary", self.vocab, 1 << 22),
            ("head dimension", self.head_dim, 1 << 10),
        ];
        for (what, v, max) in limits {
            if v == 0 || v > max {
                return Err(ModelError::Invalid(format!(
                    "{what} {v} is out of range (1 to {max})"
                )));
            }
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The sizes the tensor table's shapes are given in.
    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.hidden,
            q: self.q_dim(),
            kv: self.kv_dim(),
            inter: self.intermediate,
        }
    }
}
