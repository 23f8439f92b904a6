//! `bitnet perplexity`: perplexity of a text file, computed the way llama.cpp's `llama-perplexity`
//! does: the token stream is cut into chunks of `--ctx` tokens, each chunk is evaluated from an
//! empty cache, and only the second half of each chunk is scored (the first half is context).

use super::common::{ModelArgs, tokenizer};
use anyhow::{Context, Result, bail};
use bitnet_model::Step;
use bitnet_model::sampling::log_prob;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Plain text file to score.
    #[arg(short, long)]
    pub file: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Threads for the kernels.
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Quantize the lm_head first, to int8 or q4 (to measure what that costs).
    #[arg(long, value_name = "int8|q4")]
    pub head_quant: Option<bitnet_model::HeadQuant>,
}

/// Result of a perplexity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of the perplexity estimate (llama.cpp's `+/-`).
    pub ppl_err: f64,
    pub chunks: usize,
    pub scored_tokens: usize,
    pub chunk_nll: Vec<f64>,
}

pub fn compute(
    m: &bitnet_model::LoadedModel,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity> {
    if n_ctx < 4 {
        bail!("--ctx must be at least 4");
    }
    if n_ctx > m.model.spec.context {
        bail!(
            "--ctx {n_ctx} is longer than the model's context of {}",
            m.model.spec.context
        );
    }
    if max_chunks == Some(0) {
        bail!("--chunks 0 scores nothing: give at least 1, or leave it out to score every chunk");
    }
    let mut n_chunks = tokens.len() / n_ctx;
    if let Some(c) = max_chunks {
        n_chunks = n_chunks.min(c);
    }
    if n_chunks == 0 {
        bail!(
            "the text is {} tokens, fewer than one chunk of --ctx {n_ctx}: use a longer file or a smaller --ctx",
            tokens.len()
        );
    }
    let bos = m
        .tokenizer
        .as_ref()
        .filter(|t| t.add_bos)
        .and_then(|t| t.bos_id);
    let first = n_ctx / 2;
    let (mut nll_sum, mut nll2_sum, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut chunk_nll = Vec::with_capacity(n_chunks);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let steps: Vec<Step> = chunk
            .iter()
            .enumerate()
            .map(|(j, &token)| Step {
                seq: 0,
                token,
                logits: j >= first && j + 1 < n_ctx,
            })
            .collect();
        let mut cache = m.model.new_cache();
        let logits = m.model.forward(&steps, std::slice::from_mut(&mut cache))?;
        let mut nll_chunk = 0.0f64;
        for (row, j) in logits.iter().zip(first..n_ctx - 1) {
            let nll = -f64::from(log_prob(row, tokens[c * n_ctx + j + 1] as usize));
            nll_chunk += nll;
            nll_sum += nll;
            nll2_sum += nll * nll;
            count += 1;
        }
        chunk_nll.push(nll_chunk);
        progress(c + 1, (nll_sum / count as f64).exp());
    }
    let mean = nll_sum / count as f64;
    let var = (nll2_sum / count as f64 - mean * mean).max(0.0);
    let err = (var / (count as f64 - 1.0).max(1.0)).sqrt();
    let ppl = mean.exp();
    Ok(Perplexity {
        ppl,
        ppl_err: ppl * err,
        chunks: n_chunks,
        scored_tokens: count,
        chunk_nll,
    })
}

pub fn run(args: Args) -> Result<()> {
    let m = ModelArgs {
        model: args.model.clone(),
        ctx: None,
        threads: args.threads,
        head_quant: args.head_quant,
    }
    .load()?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let tokens = tokenizer(&m)?.encode(&text, false)?;
    eprintln!(
        "perplexity: {} tokens, {} chunks of {}",
        tokens.len(),
        tokens.len() / args.ctx.max(1),
        args.ctx
    );
    let json = args.json;
    let p = compute(&m, &tokens, args.ctx, args.chunks, &mut |c, ppl| {
        if !json {
            eprint!("[{c}]{ppl:.4},");
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        eprintln!();
        println!(
            "Final estimate: PPL = {:.4} +/- {:.5}  ({} chunks, {} tokens scored)",
            p.ppl, p.ppl_err, p.chunks, p.scored_tokens
        );
    }
    Ok(())
}
