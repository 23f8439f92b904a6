//! The names of a llama-family model's tensors and GGUF metadata keys, in one table: Hugging Face
//! parameter names (transformers' `LlamaForCausalLM` / `BitNetForCausalLM` module paths) against
//! llama.cpp's GGUF names (`gguf-py/gguf/constants.py`: `MODEL_TENSOR` / `TENSOR_NAMES` for
//! tensors, `Keys` for metadata; bitnet.cpp's `attn_sub_norm` / `ffn_sub_norm` from its
//! `convert-hf-to-gguf-bitnet.py`). Loading, converting, inspecting and the test fixtures all
//! read these, so a name is spelled once.
//!
//! ```
//! use bitnet_formats::names::{self, Q};
//! assert_eq!(Q.hf_module(3), "model.layers.3.self_attn.q_proj");
//! assert_eq!(Q.gguf_weight(3), "blk.3.attn_q.weight");
//! assert_eq!(names::hf_for_gguf("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
//! ```

/// A size of a model, as a tensor's dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// The residual width (`hidden_size`, `embedding_length`).
    Hidden,
    /// Query heads x head size (`num_attention_heads * head_dim`).
    Q,
    /// Key/value heads x head size.
    Kv,
    /// The feed-forward width (`intermediate_size`, `feed_forward_length`).
    Inter,
}

/// The sizes [`Dim`] stands for, of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub q: usize,
    pub kv: usize,
    pub inter: usize,
}

impl Dims {
    pub fn get(&self, d: Dim) -> usize {
        match d {
            Dim::Hidden => self.hidden,
            Dim::Q => self.q,
            Dim::Kv => self.kv,
            Dim::Inter => self.inter,
        }
    }
}

/// One tensor of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerTensor {
    /// Below `model.layers.N.`, without `.weight` (a module path).
    pub hf: &'static str,
    /// Below `blk.N.`, without `.weight`.
    pub gguf: &'static str,
    /// Output rows (a norm's length).
    pub rows: Dim,
    /// Input columns; `None` for a norm (a vector).
    pub cols: Option<Dim>,
    /// Only BitNet b1.58 layers have it (the sub-norms).
    pub bitnet_only: bool,
}

impl LayerTensor {
    /// `model.layers.{layer}.{hf}`: the module (a linear's `.weight` / `.weight_scale` hang below).
    pub fn hf_module(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.hf)
    }

    /// `model.layers.{layer}.{hf}.weight`.
    pub fn hf_weight(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.hf)
    }

    /// `blk.{layer}.{gguf}.weight`.
    pub fn gguf_weight(&self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.gguf)
    }

    pub fn is_linear(&self) -> bool {
        self.cols.is_some()
    }

    /// The weight's shape in row-major order (`[rows, cols]`, or `[len]` for a norm).
    pub fn shape(&self, d: &Dims) -> Vec<usize> {
        let mut s = vec![d.get(self.rows)];
        s.extend(self.cols.map(|c| d.get(c)));
        s
    }
}

const fn norm(hf: &'static str, gguf: &'static str, len: Dim, bitnet_only: bool) -> LayerTensor {
    LayerTensor {
        hf,
        gguf,
        rows: len,
        cols: None,
        bitnet_only,
    }
}

const fn linear(hf: &'static str, gguf: &'static str, rows: Dim, cols: Dim) -> LayerTensor {
    LayerTensor {
        hf,
        gguf,
        rows,
        cols: Some(cols),
        bitnet_only: false,
    }
}

pub const ATTN_NORM: LayerTensor = norm("input_layernorm", "attn_norm", Dim::Hidden, false);
pub const Q: LayerTensor = linear("self_attn.q_proj", "attn_q", Dim::Q, Dim::Hidden);
pub const K: LayerTensor = linear("self_attn.k_proj", "attn_k", Dim::Kv, Dim::Hidden);
pub const V: LayerTensor = linear("self_attn.v_proj", "attn_v", Dim::Kv, Dim::Hidden);
pub const O: LayerTensor = linear("self_attn.o_proj", "attn_output", Dim::Hidden, Dim::Q);
pub const ATTN_SUB_NORM: LayerTensor =
    norm("self_attn.attn_sub_norm", "attn_sub_norm", Dim::Q, true);
pub const FFN_NORM: LayerTensor = norm("post_attention_layernorm", "ffn_norm", Dim::Hidden, false);
pub const GATE: LayerTensor = linear("mlp.gate_proj", "ffn_gate", Dim::Inter, Dim::Hidden);
pub const UP: LayerTensor = linear("mlp.up_proj", "ffn_up", Dim::Inter, Dim::Hidden);
pub const DOWN: LayerTensor = linear("mlp.down_proj", "ffn_down", Dim::Hidden, Dim::Inter);
pub const FFN_SUB_NORM: LayerTensor = norm("mlp.ffn_sub_norm", "ffn_sub_norm", Dim::Inter, true);

/// Every tensor of a layer, in the order the converters write them.
pub const LAYER: [LayerTensor; 11] = [
    ATTN_NORM,
    Q,
    K,
    V,
    O,
    ATTN_SUB_NORM,
    FFN_NORM,
    GATE,
    UP,
    DOWN,
    FFN_SUB_NORM,
];

/// A layer's linear weights (BitLinear in BitNet models).
pub const LINEARS: [LayerTensor; 7] = [Q, K, V, O, GATE, UP, DOWN];

/// A tensor outside the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalTensor {
    pub hf: &'static str,
    pub gguf: &'static str,
}

pub const EMBED: GlobalTensor = GlobalTensor {
    hf: "model.embed_tokens.weight",
    gguf: "token_embd.weight",
};
pub const OUTPUT_NORM: GlobalTensor = GlobalTensor {
    hf: "model.norm.weight",
    gguf: "output_norm.weight",
};
pub const LM_HEAD: GlobalTensor = GlobalTensor {
    hf: "lm_head.weight",
    gguf: "output.weight",
};
const GLOBALS: [GlobalTensor; 3] = [EMBED, OUTPUT_NORM, LM_HEAD];

/// `blk.N.{gguf}.weight` → (N, the layer tensor).
pub fn parse_gguf(name: &str) -> Option<(usize, LayerTensor)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = part.strip_suffix(".weight")?;
    let t = LAYER.iter().find(|t| t.gguf == part)?;
    Some((layer.parse().ok()?, *t))
}

/// `model.layers.N.{hf}` (a module path, or a parameter below it: `.weight`) → (N, the tensor).
pub fn parse_hf(name: &str) -> Option<(usize, LayerTensor)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = part
        .strip_suffix(".weight")
        .or_else(|| part.strip_suffix(".weight_scale"))
        .unwrap_or(part);
    let t = LAYER.iter().find(|t| t.hf == part)?;
    Some((layer.parse().ok()?, *t))
}

/// The Hugging Face parameter a GGUF tensor holds.
pub fn hf_for_gguf(name: &str) -> Option<String> {
    if let Some(g) = GLOBALS.iter().find(|g| g.gguf == name) {
        return Some(g.hf.to_string());
    }
    parse_gguf(name).map(|(i, t)| t.hf_weight(i))
}

/// Whether a GGUF tensor is one of a layer's linear weights.
pub fn is_gguf_linear(name: &str) -> bool {
    parse_gguf(name).is_some_and(|(_, t)| t.is_linear())
}

/// GGUF metadata keys (`gguf-py/gguf/constants.py`, class `Keys`). Keys under the architecture's
/// namespace are given without it: `{arch}.` + the constant, see [`key::arch`].
pub mod key {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const ALIGNMENT: &str = "general.alignment";
    pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const SAMPLING_TEMP: &str = "general.sampling.temp";
    pub const SAMPLING_TOP_K: &str = "general.sampling.top_k";
    pub const SAMPLING_TOP_P: &str = "general.sampling.top_p";
    pub const SAMPLING_MIN_P: &str = "general.sampling.min_p";
    pub const SAMPLING_PENALTY_REPEAT: &str = "general.sampling.penalty_repeat";
    pub const SAMPLING_PENALTY_LAST_N: &str = "general.sampling.penalty_last_n";

    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const VOCAB_SIZE: &str = "vocab_size";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const KEY_LENGTH: &str = "attention.key_length";
    pub const VALUE_LENGTH: &str = "attention.value_length";
    pub const RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";

    pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
    pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

    /// `{arch}.{suffix}`: a key in the architecture's namespace.
    pub fn arch(arch: &str, suffix: &str) -> String {
        format!("{arch}.{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_tensor_maps_both_ways() {
        for t in LAYER {
            assert_eq!(parse_gguf(&t.gguf_weight(7)), Some((7, t)));
            assert_eq!(parse_hf(&t.hf_weight(7)), Some((7, t)));
            assert_eq!(parse_hf(&t.hf_module(7)), Some((7, t)));
            assert_eq!(hf_for_gguf(&t.gguf_weight(7)), Some(t.hf_weight(7)));
        }
        for g in GLOBALS {
            assert_eq!(hf_for_gguf(g.gguf).as_deref(), Some(g.hf));
        }
        assert!(is_gguf_linear("blk.0.ffn_down.weight"));
        assert!(!is_gguf_linear("blk.0.ffn_norm.weight"));
        assert!(!is_gguf_linear("blk.x.attn_q.weight"));
        assert_eq!(hf_for_gguf("blk.0.attn_q.bias"), None);
    }

    #[test]
    fn shapes_follow_the_dims() {
        let d = Dims {
            hidden: 8,
            q: 8,
            kv: 4,
            inter: 20,
        };
        assert_eq!(K.shape(&d), [4, 8]);
        assert_eq!(DOWN.shape(&d), [8, 20]);
        assert_eq!(FFN_SUB_NORM.shape(&d), [20]);
    }
}
