//! `bitnet train --config FILE`: the TOML a run is described by, the flags that override it, and
//! the checks that catch a bad run before it starts.
//!
//! Every table refuses unknown keys, so a misspelt setting is an error, not a silent default.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainSettings,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    pub export: ExportConfig,
    pub distill: DistillConfig,
}

/// How linear layers compute.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// BitLinear: absmean ternary weights per tensor and per-token int8 activations in the
    /// forward pass, the straight-through estimator in the backward pass.
    #[default]
    Ternary,
    /// Plain float linears: the baseline a ternary model is compared with.
    Float,
}

/// The architecture: BitNet b1.58 as in microsoft/bitnet-b1.58-2B-4T (sub-norms before
/// `o_proj` and `down_proj`, squared ReLU, GQA, NeoX RoPE).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    pub num_key_value_heads: Option<usize>,
    /// Taken from the tokenizer or the data when omitted.
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub quant: Quant,
    /// Standard deviation of the normal initialisation of linears and embeddings.
    pub init_std: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            hidden_size: 256,
            intermediate_size: 640,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: None,
            vocab_size: None,
            max_position_embeddings: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            quant: Quant::Ternary,
            init_std: 0.02,
        }
    }
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}

/// Where tokens come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Pre-tokenized rows: an int32 (or int64 / uint32) `.npy` array `[N, seq_len + 1]`, used in
    /// order, one row per sequence, no shuffling.
    pub npy: Option<PathBuf>,
    /// UTF-8 text files (globs allowed) to tokenize, pack and split.
    pub text: Vec<String>,
    /// An existing `tokenizer.json`; without it a byte-level BPE is trained on the text.
    pub tokenizer: Option<PathBuf>,
    /// The vocabulary size of a tokenizer trained here.
    pub tokenizer_vocab: usize,
    /// Tokens per training sequence (for `.npy` data: its width less one).
    pub seq_len: Option<usize>,
    /// Share of the packed text rows held out for evaluation.
    pub heldout_fraction: f64,
    /// Held-out rows as their own `.npy` file (the same layout as `npy`).
    pub heldout_npy: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            npy: None,
            text: Vec::new(),
            tokenizer: None,
            tokenizer_vocab: 4096,
            seq_len: None,
            heldout_fraction: 0.05,
            heldout_npy: None,
        }
    }
}

/// The learning-rate shape over the run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    #[default]
    Cosine,
    Linear,
    /// The BitNet b1.58 recipe's two stages: the first part of the run decays from `lr`
    /// (cosine), then the learning rate drops to `lr * stage2_lr_ratio`, decays linearly to
    /// `min_lr`, and weight decay is off.
    TwoStage,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            "two-stage" => Ok(Self::TwoStage),
            other => Err(format!(
                "unknown schedule {other:?} (constant, cosine, linear or two-stage)"
            )),
        }
    }
}

/// Float type of the master weights and of the whole computation.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// Double precision: slow, for comparing with a reference without rounding noise.
    F64,
    /// Mixed precision: f32 master weights, optimizer state, residual stream, norms, softmax and
    /// loss; the linears and attention products in bf16 (the tensor cores on a GPU).
    Bf16,
    /// bf16 master weights, gradients, residual stream and products (half the memory of f32
    /// weights and gradients); AdamW's moments and its update in f32, rounded to bf16 once per
    /// step; norms, softmax and the loss in f32.
    #[serde(rename = "bf16-masters")]
    Bf16Masters,
}

/// The optimizer and the loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    pub steps: u64,
    /// Rows (sequences) per optimizer step.
    pub batch_size: usize,
    /// Rows per forward/backward pass; gradients of `batch_size / micro_batch_size` passes are
    /// accumulated. Defaults to `batch_size`.
    pub micro_batch_size: Option<usize>,
    pub lr: f64,
    /// Where the decaying schedules end.
    pub min_lr: f64,
    /// Decoupled (AdamW) weight decay, applied to matrices (linears, embeddings), not to norms.
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Steps of linear warmup (0 allowed).
    pub warmup: u64,
    pub schedule: Schedule,
    /// Where the second stage of `two-stage` starts, as a share of `steps`.
    pub stage2_start: f64,
    /// The second stage's peak, as a share of `lr`.
    pub stage2_lr_ratio: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub grad_clip: f64,
    pub seed: u64,
    pub precision: Precision,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            micro_batch_size: None,
            lr: 1.5e-3,
            min_lr: 0.0,
            weight_decay: 0.1,
            betas: [0.9, 0.95],
            eps: 1e-8,
            warmup: 100,
            schedule: Schedule::Cosine,
            stage2_start: 0.5,
            stage2_lr_ratio: 0.5,
            grad_clip: 1.0,
            seed: 0,
            precision: Precision::F32,
        }
    }
}

impl TrainSettings {
    pub fn micro(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate on the held-out rows every this many steps (0: only at the end).
    pub every: u64,
    /// At most this many held-out rows per evaluation (0: all).
    pub max_rows: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 200,
            max_rows: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (0: only at the end).
    pub every: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: 100 }
    }
}

/// Knowledge distillation from a float teacher (see [`crate::distill`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// A model the inference engine runs (GGUF file or Hugging Face directory) with the
    /// student's vocabulary. Text data is then tokenized with the teacher's tokenizer.
    pub teacher: Option<PathBuf>,
    /// Weight of the distillation term; the data's cross-entropy gets `1 - alpha`.
    pub alpha: f64,
    /// Softmax temperature of both distributions in the distillation term.
    pub temperature: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            teacher: None,
            alpha: 0.5,
            temperature: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Ternary GGUF type: TQ2_0, TQ1_0 or I2_S.
    pub gguf_type: String,
    /// Embedding / head type in the GGUF: F16, BF16, F32 or Q8_0.
    pub float_type: String,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            gguf_type: "TQ2_0".into(),
            float_type: "F16".into(),
        }
    }
}

impl TrainConfig {
    /// Read a TOML file; unknown keys and wrong types are errors that name the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Config {
            path: path.into(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let mut cfg: TrainConfig = toml::from_str(text).map_err(|e| TrainError::Config {
            path: path.into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        // Relative data paths are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = cfg.data.npy.as_mut() {
            rebase(p);
        }
        if let Some(p) = cfg.data.heldout_npy.as_mut() {
            rebase(p);
        }
        if let Some(p) = cfg.data.tokenizer.as_mut() {
            rebase(p);
        }
        if let Some(p) = cfg.distill.teacher.as_mut() {
            rebase(p);
        }
        for t in cfg.data.text.iter_mut() {
            if Path::new(t).is_relative() {
                *t = base.join(&*t).to_string_lossy().into_owned();
            }
        }
        Ok(cfg)
    }

    /// The checks that need no data: shapes that divide, values in range.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(TrainError::Config {
                path: origin.into(),
                message,
            })
        };
        let m = &self.model;
        if m.hidden_size == 0 || m.intermediate_size == 0 || m.num_hidden_layers == 0 {
            return bad("model sizes must be positive".into());
        }
        if m.num_attention_heads == 0 || !m.hidden_size.is_multiple_of(m.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                m.hidden_size, m.num_attention_heads
            ));
        }
        if m.kv_heads() == 0 || !m.num_attention_heads.is_multiple_of(m.kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                m.num_attention_heads,
                m.kv_heads()
            ));
        }
        if !m.head_dim().is_multiple_of(2) {
            return bad(format!(
                "the head size {} must be even for rotary embeddings",
                m.head_dim()
            ));
        }
        if !(m.rms_norm_eps > 0.0 && m.rope_theta > 0.0 && m.init_std > 0.0) {
            return bad("rms_norm_eps, rope_theta and init_std must be positive".into());
        }
        let t = &self.train;
        if t.batch_size == 0 || t.micro() == 0 || !t.batch_size.is_multiple_of(t.micro()) {
            return bad(format!(
                "batch_size {} is not a multiple of micro_batch_size {}",
                t.batch_size,
                t.micro()
            ));
        }
        if !(t.lr.is_finite() && t.lr > 0.0 && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return bad(format!(
                "lr must be positive and min_lr within [0, lr] (lr {}, min_lr {})",
                t.lr, t.min_lr
            ));
        }
        if !(t.weight_decay >= 0.0 && t.eps > 0.0 && t.grad_clip >= 0.0) {
            return bad("weight_decay and grad_clip must be >= 0 and eps > 0".into());
        }
        if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad(format!("betas {:?} must lie in [0, 1)", t.betas));
        }
        if !(0.0..=1.0).contains(&t.stage2_start) || !(0.0..=1.0).contains(&t.stage2_lr_ratio) {
            return bad("stage2_start and stage2_lr_ratio must lie in [0, 1]".into());
        }
        let d = &self.distill;
        if !((0.0..=1.0).contains(&d.alpha) && d.temperature.is_finite() && d.temperature > 0.0) {
            return bad(format!(
                "distill.alpha must lie in [0, 1] and distill.temperature be positive (alpha {}, \
                 temperature {})",
                d.alpha, d.temperature
            ));
        }
        if self.data.npy.is_some() != self.data.text.is_empty() {
            return bad("give the data as exactly one of data.npy or data.text".into());
        }
        if !(0.0..1.0).contains(&self.data.heldout_fraction) {
            return bad("data.heldout_fraction must lie in [0, 1)".into());
        }
        if let Some(s) = self.data.seq_len
            && (s == 0 || s > m.max_position_embeddings)
        {
            return bad(format!(
                "data.seq_len {s} must be between 1 and max_position_embeddings {}",
                m.max_position_embeddings
            ));
        }
        Ok(())
    }

    /// The ternary GGUF type packs rows in blocks: TQ2_0 and TQ1_0 need every linear's input
    /// width to be a multiple of 256, I2_S every matrix's size a multiple of 128.
    pub fn check_export(&self, origin: &Path) -> Result<()> {
        let m = &self.model;
        let e = &self.export;
        let bad = |message: String| {
            Err(TrainError::Config {
                path: origin.into(),
                message,
            })
        };
        let kv = m.kv_heads() * m.head_dim();
        match e.gguf_type.to_ascii_uppercase().as_str() {
            "TQ2_0" | "TQ1_0" => {
                for (name, cols) in [
                    ("hidden_size", m.hidden_size),
                    ("intermediate_size", m.intermediate_size),
                ] {
                    if !cols.is_multiple_of(256) {
                        return bad(format!(
                            "{name} {cols} is not a multiple of 256, which export.gguf_type {} needs \
                             (choose I2_S, which needs matrices of a multiple of 128 weights, or resize)",
                            e.gguf_type
                        ));
                    }
                }
            }
            "I2_S" => {
                for (what, n) in [
                    ("hidden_size x hidden_size", m.hidden_size * m.hidden_size),
                    ("kv width x hidden_size", kv * m.hidden_size),
                    (
                        "intermediate_size x hidden_size",
                        m.intermediate_size * m.hidden_size,
                    ),
                ] {
                    if !n.is_multiple_of(128) {
                        return bad(format!(
                            "{what} = {n} weights is not a multiple of 128, which I2_S needs"
                        ));
                    }
                }
            }
            other => {
                return bad(format!(
                    "export.gguf_type {other:?} is not a ternary type (TQ2_0, TQ1_0 or I2_S)"
                ));
            }
        }
        if !matches!(
            e.float_type.to_ascii_uppercase().as_str(),
            "F16" | "BF16" | "F32" | "Q8_0"
        ) {
            return bad(format!(
                "export.float_type {:?} must be F16, BF16, F32 or Q8_0",
                e.float_type
            ));
        }
        Ok(())
    }

    /// What must match for a checkpoint to continue this run: the model, the optimizer's
    /// settings and the objective (distillation's weights), not the step count or where things
    /// are written.
    pub fn fingerprint(&self, distilling: bool) -> String {
        let mut t = self.train.clone();
        t.steps = 0;
        let mut j =
            serde_json::json!({ "model": self.model, "train": t, "seq_len": self.data.seq_len });
        if distilling {
            j["distill"] = serde_json::json!([self.distill.alpha, self.distill.temperature]);
        }
        j.to_string()
    }
}
