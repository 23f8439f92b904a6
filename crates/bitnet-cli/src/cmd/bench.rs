//! `bitnet bench`: prompt processing and generation speed, shaped like llama-bench, with the
//! memory bandwidth measured in the same run and the fraction of the bandwidth bound reached.

use super::common::{ModelArgs, peak_rss_bytes, set_threads};
use anyhow::{Result, bail};
use bitnet_formats::gguf::GgmlType;
use bitnet_kernels::{bandwidth, cpu, pool};
use bitnet_model::{Model, Step};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to benchmark (GGUF file or Hugging Face directory).
    #[arg(short, long, conflicts_with = "synthetic")]
    pub model: Option<std::path::PathBuf>,
    /// Build a model with real shapes and random weights instead: `2b4t` (BitNet b1.58 2B-4T).
    #[arg(long)]
    pub synthetic: Option<String>,
    /// The synthetic model's embeddings / lm_head type: f16 (as bitnet.cpp and llama.cpp keep
    /// it) or f32.
    #[arg(long, default_value = "f16")]
    pub head: String,
    /// Quantize the lm_head after loading: int8 (a scale per row) or q4 (a scale per 128
    /// weights); the embeddings keep their type. Fewer bytes per token.
    #[arg(long, value_name = "int8|q4")]
    pub head_quant: Option<bitnet_model::HeadQuant>,
    /// Prompt length to process (0 to skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub prompt: usize,
    /// Tokens to generate (0 to skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Thread counts to test, comma-separated.
    #[arg(
        short = 't',
        long = "threads",
        default_value = "1,2",
        value_delimiter = ','
    )]
    pub threads: Vec<usize>,
    /// Sequences decoded together in the generation test, comma-separated (as a server's
    /// continuous batching runs them): `tg128x16` is 16 sequences of 128 tokens, one batched
    /// forward pass per step, and its tok/s counts every sequence's tokens.
    #[arg(
        short = 'b',
        long = "batch",
        default_value = "1",
        value_delimiter = ','
    )]
    pub batch: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    samples: Vec<f64>,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Self {
        let samples = v.clone();
        v.sort_by(f64::total_cmp);
        Stat {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            samples,
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    threads: usize,
    test: String,
    tokens_per_sec: Stat,
    /// Measured read bandwidth with this many threads, bytes/s.
    bandwidth_bytes_per_sec: f64,
    /// For generation: weight bytes per token × tokens/s ÷ bandwidth.
    #[serde(skip_serializing_if = "Option::is_none")]
    bandwidth_fraction: Option<f64>,
}

/// A timed test: tokens per second for `n` tokens (per sequence).
type SpeedTest = Box<dyn Fn(&Model, usize) -> Result<f64>>;

fn prefill(m: &Model, n: usize) -> Result<f64> {
    let steps: Vec<Step> = (0..n)
        .map(|i| Step {
            seq: 0,
            token: (i * 7919 % m.spec.vocab) as u32,
            logits: i + 1 == n,
        })
        .collect();
    let mut cache = m.new_cache();
    let t0 = Instant::now();
    m.forward(&steps, std::slice::from_mut(&mut cache))?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// `batch` sequences generating `n` tokens each in lockstep (greedy), one forward pass per
/// step for all of them; tokens per second over all sequences.
fn generate(m: &Model, n: usize, batch: usize) -> Result<f64> {
    let mut caches: Vec<_> = (0..batch).map(|_| m.new_cache()).collect();
    let mut tokens: Vec<u32> = (0..batch).map(|s| 1 + s as u32).collect();
    let t0 = Instant::now();
    for _ in 0..n {
        let steps: Vec<Step> = tokens
            .iter()
            .enumerate()
            .map(|(seq, &token)| Step {
                seq,
                token,
                logits: true,
            })
            .collect();
        let logits = m.forward(&steps, &mut caches)?;
        for (t, l) in tokens.iter_mut().zip(&logits) {
            *t = bitnet_model::sampling::argmax(l) as u32;
        }
    }
    Ok((n * batch) as f64 / t0.elapsed().as_secs_f64())
}

pub fn run(args: Args) -> Result<()> {
    if args.threads.is_empty() || args.reps == 0 || args.batch.is_empty() {
        bail!("need at least one thread count, one batch size and one repetition");
    }
    if args.batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    // Bandwidth first, before the model occupies memory (its 1 GiB buffer would otherwise
    // count in the model's peak RSS).
    let mut bandwidths = Vec::new();
    for &t in &args.threads {
        set_threads(Some(t))?;
        bandwidths.push(bandwidth::read_bandwidth(&pool::current(), 1 << 30, 5));
    }
    // Reset the peak-RSS mark (Linux: "5" to clear_refs) so the figure reported is the model's,
    // not the bandwidth buffer's. Best effort: elsewhere the peak includes the buffer.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (model, name) = match (&args.model, args.synthetic.as_deref()) {
        (Some(p), None) => {
            let m = ModelArgs {
                model: p.clone(),
                ctx: None,
                threads: None,
                head_quant: args.head_quant,
            }
            .load()?;
            (m.model, p.display().to_string())
        }
        (None, Some("2b4t")) => {
            let head = match args.head.as_str() {
                "f16" => GgmlType::F16,
                "f32" => GgmlType::F32,
                other => bail!("--head {other:?}: choose f16 or f32 (and --head-quant int8|q4)"),
            };
            let label = match args.head_quant {
                Some(bitnet_model::HeadQuant::Int8) => "int8".to_string(),
                Some(bitnet_model::HeadQuant::Q4) => "q4".to_string(),
                None => head.to_string(),
            };
            eprintln!(
                "building a synthetic BitNet b1.58 2B-4T-shaped model (random ternary weights, {label} head)..."
            );
            let mut m = bitnet_model::synthetic::random_model(
                bitnet_model::synthetic::spec_2b4t(),
                head,
                42,
            )?;
            if let Some(q) = args.head_quant {
                m.quantize_head(q);
            }
            (m, format!("synthetic 2b4t ({label} head)"))
        }
        (None, Some(other)) => bail!("--synthetic {other:?}: the only synthetic model is 2b4t"),
        _ => bail!("give --model PATH or --synthetic 2b4t"),
    };
    if args.prompt + args.n_gen > model.spec.context {
        bail!(
            "-p {} + -n {} exceeds the model's context of {}",
            args.prompt,
            args.n_gen,
            model.spec.context
        );
    }
    let bytes_per_token = model.weight_bytes_per_token() as f64;
    let mut rows = Vec::new();
    for (&t, &bw) in args.threads.iter().zip(&bandwidths) {
        set_threads(Some(t))?;
        // (name, tokens per sequence, sequences, test)
        let mut tests: Vec<(String, usize, usize, SpeedTest)> = Vec::new();
        if args.prompt > 0 {
            tests.push((
                format!("pp{}", args.prompt),
                args.prompt,
                1,
                Box::new(prefill),
            ));
        }
        if args.n_gen > 0 {
            for &b in &args.batch {
                let name = if b == 1 {
                    format!("tg{}", args.n_gen)
                } else {
                    format!("tg{}x{b}", args.n_gen)
                };
                tests.push((name, args.n_gen, b, Box::new(move |m, n| generate(m, n, b))));
            }
        }
        for (test, n, batch, f) in tests {
            f(&model, n.min(16))?; // warm up: page in the weights, spin up the pool
            let samples = (0..args.reps)
                .map(|_| f(&model, n))
                .collect::<Result<Vec<f64>>>()?;
            let stat = Stat::of(samples);
            // A batched step reads the weights once for all of its sequences.
            let frac = test
                .starts_with("tg")
                .then(|| bytes_per_token * stat.median / batch as f64 / bw);
            if !args.json {
                eprintln!(
                    "{test:>6} t={t}: {:8.2} tok/s (min {:.2}, max {:.2}){}",
                    stat.median,
                    stat.min,
                    stat.max,
                    frac.map(|f| format!(
                        ", {:.1}% of the {:.1} GB/s bandwidth bound",
                        100.0 * f,
                        bw / 1e9
                    ))
                    .unwrap_or_default()
                );
            }
            rows.push(Row {
                threads: t,
                test,
                tokens_per_sec: stat,
                bandwidth_bytes_per_sec: bw,
                bandwidth_fraction: frac,
            });
        }
    }
    let f = cpu::features();
    let features = serde_json::json!({"avx2": f.avx2, "fma": f.fma, "f16c": f.f16c,
        "avx_vnni": f.avx_vnni, "avx512bw": f.avx512bw, "avx512vnni": f.avx512vnni,
        "avx512fp16": f.avx512fp16, "amx_int8": f.amx_int8, "amx_usable": f.amx_usable});
    let report = serde_json::json!({
        "model": name,
        "tier": cpu::tier().name(),
        "features": features,
        "weight_bytes_per_token": bytes_per_token,
        "peak_rss_bytes": peak_rss_bytes(),
        "results": rows,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model: {name}\nkernel tier: {} | weights read per token: {:.3} GB | peak RSS: {:.0} MiB",
            cpu::tier(),
            bytes_per_token / 1e9,
            peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
        );
        println!(
            "| threads | test | tok/s (median) | min | max | bandwidth GB/s | fraction of bound |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for r in &rows {
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} |",
                r.threads,
                r.test,
                r.tokens_per_sec.median,
                r.tokens_per_sec.min,
                r.tokens_per_sec.max,
                r.bandwidth_bytes_per_sec / 1e9,
                r.bandwidth_fraction
                    .map(|f| format!("{:.1}%", 100.0 * f))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(())
}
