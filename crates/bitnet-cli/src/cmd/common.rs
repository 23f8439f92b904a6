//! Flags and helpers shared by the commands that run a model.

use anyhow::{Context, Result, bail};
use bitnet_formats::tokenizer::TextTokenizer;
use bitnet_model::sampling::{SamplingDefaults, SamplingParams};
use bitnet_model::{HeadQuant, LoadedModel};
use std::path::PathBuf;

/// Which model to load.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (config.json + safetensors), or the name
    /// of one in the models directory (`bitnet models` lists them).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Context length to allow (default: the model's own).
    #[arg(long, short = 'c', visible_alias = "ctx-size")]
    pub ctx: Option<usize>,
    /// Threads for the kernels; 0 means every core (default: BITNET_THREADS, else every CPU
    /// this process may use).
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
        let path = super::models::resolve(&self.model);
        let mut m = bitnet_model::load(&path)
            .with_context(|| format!("cannot load model {}", path.display()))?;
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

/// Sampling flags. Each one left out takes the model's own setting (its
/// `generation_config.json`, or a GGUF's `general.sampling.*`), else llama.cpp's default.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 picks the most likely token (greedy, exact). [default: the
    /// model's, else 0.8]
    #[arg(long, visible_alias = "temp", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens (0: all). [default: the model's, else 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (1: all). [default: the
    /// model's, else 0.95]
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min_p times the most likely one (0: off). [default: the
    /// model's, else 0.05]
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the recent context (1: off; above 1 discourages repeats).
    /// [default: the model's, else 1.1]
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// The penalties look at the last N tokens (0: penalties off, -1: the whole context).
    /// [default: the model's, else 64]
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_last_n: Option<i64>,
    /// Subtract this times a token's count so far from its logit. [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    /// Subtract this from the logit of any token already present. [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    /// Random seed, to repeat a sampled generation exactly. [default: a new random seed each
    /// run]
    #[arg(long, short = 's')]
    pub seed: Option<u64>,
}

/// Sampling settings with where each came from, for the line commands print.
#[derive(Debug, Clone)]
pub struct ResolvedSampling {
    pub params: SamplingParams,
    /// `temperature 0.8 (llama.cpp default), top-k 40 (...), ..., seed 123 (random)`.
    pub summary: String,
}

impl SamplingArgs {
    /// The settings in use: the flags given, else the model's (`model`), else llama.cpp's.
    pub fn resolve(&self, model: &SamplingDefaults) -> Result<ResolvedSampling> {
        let base = SamplingParams::llama_cpp();
        let from_model = base.clone().with_model_defaults(model);
        let model_src = model.source.as_deref().unwrap_or("model");
        let origin = |flag: bool, set: bool| -> String {
            if flag {
                "flag".into()
            } else if set {
                format!("model, {model_src}")
            } else {
                "llama.cpp default".into()
            }
        };
        let last_n = match self.repeat_last_n {
            None => from_model.penalty_last_n,
            Some(-1) => None,
            Some(n) if n >= 0 => Some(n as usize),
            Some(n) => {
                bail!("--repeat-last-n must be -1 (whole context), 0 (off) or more, got {n}")
            }
        };
        let (seed, seed_src) = match self.seed {
            Some(s) => (s, "flag"),
            None => (random_seed(), "random; --seed to repeat"),
        };
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(from_model.temperature),
            top_k: self.top_k.unwrap_or(from_model.top_k),
            top_p: self.top_p.unwrap_or(from_model.top_p),
            min_p: self.min_p.unwrap_or(from_model.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(from_model.repetition_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            penalty_last_n: last_n,
            seed,
        };
        p.validate().map_err(anyhow::Error::msg)?;
        let mut parts = vec![format!(
            "temperature {} ({})",
            p.temperature,
            origin(self.temperature.is_some(), model.temperature.is_some())
        )];
        if !p.is_greedy() {
            parts.push(format!(
                "top-k {} ({})",
                p.top_k,
                origin(self.top_k.is_some(), model.top_k.is_some())
            ));
            parts.push(format!(
                "top-p {} ({})",
                p.top_p,
                origin(self.top_p.is_some(), model.top_p.is_some())
            ));
            parts.push(format!(
                "min-p {} ({})",
                p.min_p,
                origin(self.min_p.is_some(), model.min_p.is_some())
            ));
        }
        let window = match p.penalty_last_n {
            Some(n) => format!("last {n} tokens"),
            None => "whole context".into(),
        };
        parts.push(format!(
            "repeat penalty {} over the {window} ({})",
            p.repetition_penalty,
            origin(
                self.repeat_penalty.is_some(),
                model.repetition_penalty.is_some()
            )
        ));
        if !p.is_greedy() {
            parts.push(format!("seed {seed} ({seed_src})"));
        }
        Ok(ResolvedSampling {
            params: p,
            summary: parts.join(", "),
        })
    }
}

/// `-n`: a count of tokens, or -1 for "until the end of the text or the context" (llama.cpp).
pub fn n_predict(n: i64) -> Result<usize> {
    match n {
        -1 => Ok(usize::MAX),
        n if n >= 0 => Ok(n as usize),
        n => bail!(
            "-n must be a number of tokens, or -1 to go on until the end of the text or the context (got {n})"
        ),
    }
}

/// A seed from the OS's randomness (std's hasher keys are drawn from it per process).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
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
    /// Prompt text (`-` reads it from standard input).
    #[arg(short, long, allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Token ids instead of text, comma-separated.
    #[arg(long)]
    pub tokens: Option<String>,
}

impl PromptArgs {
    /// The prompt text from `--prompt` (`-` for standard input) or `--file`, if given.
    pub fn text(&self) -> Result<Option<String>> {
        match (&self.prompt, &self.file) {
            (Some(_), Some(_)) => bail!("give either --prompt or --file, not both"),
            (Some(p), None) if p == "-" => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("cannot read the prompt from standard input")?;
                Ok(Some(s))
            }
            (Some(p), None) => Ok(Some(p.clone())),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(Some)
                .with_context(|| format!("cannot read the prompt file {}", f.display())),
            (None, None) => Ok(None),
        }
    }

    /// Token ids from `--tokens`, or the prompt text encoded by `encode`, checked against the
    /// vocabulary.
    pub fn ids_with(
        &self,
        m: &LoadedModel,
        encode: impl FnOnce(&TextTokenizer, &str) -> Result<Vec<u32>>,
    ) -> Result<Vec<u32>> {
        let text = self.text()?;
        let ids = match (self.tokens.as_deref(), text) {
            (Some(t), None) => parse_tokens(t)?,
            (None, Some(p)) => encode(tokenizer(m)?, &p)?,
            (Some(_), Some(_)) => bail!("give either a prompt or --tokens, not both"),
            (None, None) => {
                bail!(
                    "give a prompt with --prompt TEXT (or -p - for standard input, -f FILE), or token ids with --tokens 1,2,3"
                )
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

    /// Token ids from `--tokens` or by encoding the prompt (with the tokenizer's BOS).
    pub fn ids(&self, m: &LoadedModel) -> Result<Vec<u32>> {
        self.ids_with(m, |t, p| Ok(t.encode(p, true)?))
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = match threads {
        Some(t) => t,
        None => match std::env::var("BITNET_THREADS") {
            Ok(v) => v.trim().parse::<usize>().map_err(|_| {
                anyhow::anyhow!(
                    "BITNET_THREADS={v:?} is not a number of threads: use a count, or 0 for every core"
                )
            })?,
            Err(_) => return Ok(()),
        },
    };
    // 0: every core, as the configuration file's `runtime.threads` says.
    let t = if t == 0 { cores } else { t };
    if t > cores {
        eprintln!(
            "warning: {t} threads on {cores} cores: the kernels' threads will wait for each other; \
             use at most {cores} (or 0 for every core)"
        );
    }
    bitnet_kernels::pool::set_threads(t);
    Ok(())
}
