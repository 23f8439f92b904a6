//! Flags and helpers shared by the commands that run a model.

use anyhow::{Context, Result, bail};
use bitnet_formats::tokenizer::TextTokenizer;
use bitnet_model::sampling::SamplingParams;
use bitnet_model::{HeadQuant, LoadedModel};
use std::path::PathBuf;

/// Which model to load.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (config.json + safetensors).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Context length to allow (default: the model's own).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Threads for the kernels (default: every CPU this process may use, or BITNET_THREADS).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Quantize the lm_head: int8 (a scale per row, half the bytes of f16 per token) or q4
    /// (4 bits, a scale per 128 weights, about a quarter); `perplexity` measures what it costs.
    #[arg(long, value_name = "int8|q4")]
    pub head_quant: Option<HeadQuant>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        set_threads(self.threads)?;
        let mut m = bitnet_model::load(&self.model)
            .with_context(|| format!("cannot load model {}", self.model.display()))?;
        if let Some(c) = self.ctx {
            if c == 0 {
                bail!("--ctx must be at least 1");
            }
            m.model.spec.context = c;
        }
        if let Some(q) = self.head_quant {
            m.model.quantize_head(q);
        }
        Ok(m)
    }
}

/// Sampling flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens already in the context (1.0: off; >1 discourages repeats).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Subtract this times a token's count so far from its logit.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Subtract this from the logit of any token already present.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed, for reproducible sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        };
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}

/// `1,2,3` → token ids.
pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .with_context(|| format!("--tokens: {t:?} is not a token id"))
        })
        .collect()
}

pub fn tokenizer(m: &LoadedModel) -> Result<&TextTokenizer> {
    m.tokenizer
        .as_ref()
        .context("this model ships no tokenizer: pass token ids with --tokens instead of text")
}

/// The input of the commands that read one prompt: text or token ids.
#[derive(Debug, Clone, clap::Args)]
pub struct PromptArgs {
    /// Prompt text.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Token ids instead of text, comma-separated.
    #[arg(long)]
    pub tokens: Option<String>,
}

impl PromptArgs {
    /// Token ids from `--tokens` or by encoding `--prompt`, checked against the vocabulary.
    pub fn ids(&self, m: &LoadedModel) -> Result<Vec<u32>> {
        let ids = match (self.tokens.as_deref(), self.prompt.as_deref()) {
            (Some(t), None) => parse_tokens(t)?,
            (None, Some(p)) => tokenizer(m)?.encode(p, true)?,
            (Some(_), Some(_)) => bail!("give either --prompt or --tokens, not both"),
            (None, None) => {
                bail!("give a prompt with --prompt TEXT or token ids with --tokens 1,2,3")
            }
        };
        if ids.is_empty() {
            bail!("the prompt encodes to no tokens");
        }
        let vocab = m.model.spec.vocab;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        Ok(ids)
    }
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Apply `--threads` (the kernels' pool is process-wide).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        bitnet_kernels::pool::set_threads(t);
    }
    Ok(())
}
