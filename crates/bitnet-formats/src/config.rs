//! `config.json` of a Hugging Face model directory (llama family, BitNet b1.58).

use crate::error::{FormatError, Result, io_err};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// transformers' `quantization_config` for BitNet checkpoints.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct QuantizationConfig {
    pub quant_method: Option<String>,
    /// `bitlinear` (the 2B-4T packed layout: divide by `weight_scale`) or `autobitlinear`.
    pub linear_class: Option<String>,
    /// `offline` (weights stored ternary) or `online` (float master weights, ternarized at load).
    pub quantization_mode: Option<String>,
    #[serde(default)]
    pub modules_to_not_convert: Option<Vec<String>>,
    #[serde(default)]
    pub use_rms_norm: Option<bool>,
}

/// transformers v5 spells RoPE settings as `rope_parameters`; older configs use `rope_theta`
/// (and `rope_scaling`) at the top level.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The fields of `config.json` the runtime needs; everything else is kept in `extra`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    pub hidden_act: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub quantization_config: Option<QuantizationConfig>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// transformers' default when neither spelling gives a theta.
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl ModelConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text, path)
    }

    /// Parse and validate JSON text (`path` labels errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let c: ModelConfig = serde_json::from_str(text).map_err(|source| FormatError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        c.validate(path)?;
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| FormatError::Config {
            path: path.to_path_buf(),
            message,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 || v > 1 << 24 {
                return Err(bad(format!("{name} = {v} is out of range (1 to 2^24)")));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {} and no head_dim is given",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if let (Some(a), Some(b)) = (
            self.rope_theta,
            self.rope_parameters.as_ref().and_then(|r| r.rope_theta),
        ) && a != b
        {
            return Err(bad(format!(
                "rope_theta {a} disagrees with rope_parameters.rope_theta {b}"
            )));
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base from either spelling.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// `model_type`, else the first architecture name.
    pub fn architecture(&self) -> &str {
        self.model_type
            .as_deref()
            .or(self.architectures.first().map(String::as_str))
            .unwrap_or("unknown")
    }

    /// True for BitNet checkpoints (`model_type: bitnet` or a BitNet quantization config).
    pub fn is_bitnet(&self) -> bool {
        self.model_type.as_deref() == Some("bitnet")
            || self
                .quantization_config
                .as_ref()
                .and_then(|q| q.quant_method.as_deref())
                == Some("bitnet")
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }
}

/// `dir/config.json`, with a clear error when the directory has none.
pub fn config_path(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("config.json");
    if p.is_file() {
        Ok(p)
    } else {
        Err(FormatError::Config {
            path: dir.to_path_buf(),
            message: "no config.json here: a Hugging Face model directory needs config.json beside its *.safetensors".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn both_rope_spellings() {
        let p = Path::new("config.json");
        let a =
            ModelConfig::from_json(&format!("{{{BASE}, \"rope_theta\": 500000.0}}"), p).unwrap();
        assert_eq!(a.rope_theta(), 500000.0);
        let b = ModelConfig::from_json(
            &format!("{{{BASE}, \"rope_parameters\": {{\"rope_theta\": 500000.0, \"rope_type\": \"default\"}}}}"),
            p,
        )
        .unwrap();
        assert_eq!(b.rope_theta(), 500000.0);
        let c = ModelConfig::from_json(&format!("{{{BASE}}}"), p).unwrap();
        assert_eq!(c.rope_theta(), DEFAULT_ROPE_THETA);
        assert_eq!(c.head_dim(), 16);
        let d = ModelConfig::from_json(
            &format!(
                "{{{BASE}, \"rope_theta\": 1.0, \"rope_parameters\": {{\"rope_theta\": 2.0}}}}"
            ),
            p,
        );
        assert!(d.is_err());
    }

    #[test]
    fn rejects_bad_shapes() {
        let p = Path::new("config.json");
        let bad = BASE.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        assert!(ModelConfig::from_json(&format!("{{{bad}}}"), p).is_err());
        assert!(ModelConfig::from_json("{\"hidden_size\": 0}", p).is_err());
        assert!(ModelConfig::from_json("not json", p).is_err());
    }
}
