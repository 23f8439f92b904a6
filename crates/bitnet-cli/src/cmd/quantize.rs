//! `bitnet quantize`: what ternarization costs a model, per tensor (MSE, cosine, zeros for each
//! scale granularity) and end to end (perplexity of the source and of the converted file).

use crate::cmd::perplexity::compute;
use anyhow::{Context, Result, bail};
use bitnet_core::quant::Granularity;
use bitnet_formats::gguf::GgmlType;
use bitnet_model::convert::{ConvertOptions, convert_gguf_to_gguf, convert_hf_to_gguf};
use bitnet_model::quantize::{TensorQuantReport, report};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source with float linear weights: a Hugging Face directory or a GGUF file.
    pub src: PathBuf,
    /// Measure and print the per-tensor error report (the default unless `--out` is given).
    #[arg(long)]
    pub report: bool,
    /// Scale granularities to compare, comma-separated: tensor (BitNet b1.58), channel, or
    /// group:N (N weights of a row share a scale).
    #[arg(
        long,
        default_value = "tensor,channel,group:128",
        value_delimiter = ','
    )]
    pub granularity: Vec<String>,
    /// Also convert to this GGUF (as `bitnet convert` does).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Ternary type of the output: tq2_0, tq1_0 or i2_s.
    #[arg(long, default_value = "tq2_0")]
    pub to: String,
    /// Measure the perplexity of the source and of the output on this text file.
    #[arg(long, requires = "out")]
    pub perplexity: Option<PathBuf>,
    /// Context length for the perplexity.
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_granularity(s: &str) -> Result<Granularity> {
    Ok(match s {
        "tensor" => Granularity::PerTensor,
        "channel" => Granularity::PerChannel,
        g => match g.strip_prefix("group:").map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => Granularity::PerGroup(n),
            _ => bail!("--granularity {g:?}: use tensor, channel or group:N"),
        },
    })
}

fn label(g: Granularity) -> String {
    match g {
        Granularity::PerTensor => "tensor".into(),
        Granularity::PerChannel => "channel".into(),
        Granularity::PerGroup(n) => format!("group:{n}"),
    }
}

/// Element-weighted means over tensors, per granularity: (mse, cosine, zero fraction).
fn summary(reps: &[TensorQuantReport], k: usize) -> (f64, f64, f64) {
    let n: f64 = reps.iter().map(|r| (r.rows * r.cols) as f64).sum();
    let mut s = (0.0, 0.0, 0.0);
    for r in reps {
        let w = (r.rows * r.cols) as f64 / n.max(1.0);
        let m = &r.results[k].1;
        s.0 += w * m.mse;
        s.1 += w * m.cosine;
        s.2 += w * m.zero_fraction;
    }
    s
}

pub fn run(args: Args) -> Result<()> {
    let grans: Vec<Granularity> = args
        .granularity
        .iter()
        .map(|g| parse_granularity(g))
        .collect::<Result<_>>()?;
    let quiet = args.json;
    // The running count only on a terminal (a log gets the summary).
    let progress = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let reps = if args.report || args.out.is_none() {
        let r = report(&args.src, &grans, &mut |r, done, total| {
            if progress {
                eprint!("\r[{done}/{total}] {:<48}", r.name);
            }
        })
        .with_context(|| format!("cannot measure {}", args.src.display()))?;
        if progress {
            eprintln!();
        }
        r
    } else {
        Vec::new()
    };
    // Say where a group size did not divide a tensor's rows and a smaller one was measured.
    for (k, g) in grans.iter().enumerate() {
        let mut used: Vec<String> = reps
            .iter()
            .filter_map(|r| r.results.get(k).map(|(u, _)| label(*u)))
            .filter(|u| *u != label(*g))
            .collect();
        used.sort();
        used.dedup();
        if !used.is_empty() && !quiet {
            eprintln!(
                "note: {} does not divide every row; those tensors were measured with {}",
                label(*g),
                used.join(", ")
            );
        }
    }
    // The source's perplexity first: a model without a tokenizer is refused before any file
    // is written.
    let text = match &args.perplexity {
        Some(f) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        None => None,
    };
    let measure = |path: &PathBuf, text: &str| -> Result<f64> {
        let m =
            bitnet_model::load(path).with_context(|| format!("cannot load {}", path.display()))?;
        let tok = m.tokenizer.as_ref().with_context(|| {
            format!(
                "--perplexity needs the model's tokenizer, and {} ships none",
                path.display()
            )
        })?;
        let tokens = tok.encode(text, false)?;
        Ok(compute(&m, &tokens, args.ctx, None, &mut |_, _| {})?.ppl)
    };
    let src_ppl = match (&text, &args.out) {
        (Some(t), Some(_)) => Some(measure(&args.src, t)?),
        (Some(_), None) => bail!("--perplexity compares the source with the output: give -o FILE"),
        _ => None,
    };
    let mut ppl = None;
    if let Some(out) = &args.out {
        let ternary = GgmlType::from_name(&args.to)
            .filter(|t| matches!(t, GgmlType::TQ2_0 | GgmlType::TQ1_0 | GgmlType::I2_S))
            .with_context(|| format!("--to {:?}: choose tq2_0, tq1_0 or i2_s", args.to))?;
        let opts = ConvertOptions {
            ternary,
            ..ConvertOptions::default()
        };
        let mut progress = |_: u64, _: u64, _: &str| {};
        if args.src.is_dir() {
            convert_hf_to_gguf(&args.src, out, &opts, &mut progress)
        } else {
            convert_gguf_to_gguf(&args.src, out, &opts, true, &mut progress)
        }
        .with_context(|| format!("cannot convert {}", args.src.display()))?;
        if let (Some(a), Some(t)) = (src_ppl, &text) {
            ppl = Some((a, measure(out, t)?));
        }
    }
    if args.json {
        let tensors: Vec<serde_json::Value> = reps
            .iter()
            .map(|r| {
                let per: serde_json::Map<String, serde_json::Value> = r
                    .results
                    .iter()
                    .map(|(g, m)| {
                        (
                            label(*g),
                            serde_json::json!({"mse": m.mse, "cosine": m.cosine,
                                "zero_fraction": m.zero_fraction, "sqnr_db": m.sqnr_db}),
                        )
                    })
                    .collect();
                serde_json::json!({"name": r.name, "shape": [r.rows, r.cols], "granularities": per})
            })
            .collect();
        let sums: serde_json::Map<String, serde_json::Value> = grans
            .iter()
            .enumerate()
            .map(|(k, g)| {
                let (mse, cos, z) = summary(&reps, k);
                (
                    label(*g),
                    serde_json::json!({"mse": mse, "cosine": cos, "zero_fraction": z}),
                )
            })
            .collect();
        let ppl = ppl.map(|(a, b)| serde_json::json!({"source": a, "output": b}));
        println!(
            "{}",
            serde_json::json!({"source": args.src, "tensors": tensors, "summary": sums, "perplexity": ppl})
        );
        return Ok(());
    }
    if !reps.is_empty() {
        print!("{:<44} {:>13}", "tensor", "shape");
        for g in &grans {
            print!(" | {:>26}", format!("{} mse / cos / zeros", label(*g)));
        }
        println!();
        for r in &reps {
            print!("{:<44} {:>13}", r.name, format!("{}x{}", r.rows, r.cols));
            for (_, m) in &r.results {
                print!(
                    " | {:>10.3e} {:>7.5} {:>6.1}%",
                    m.mse,
                    m.cosine,
                    100.0 * m.zero_fraction
                );
            }
            println!();
        }
        println!("\nsummary (weighted by elements):");
        for (k, g) in grans.iter().enumerate() {
            let (mse, cos, z) = summary(&reps, k);
            println!(
                "  {:<10} mse {mse:.4e}  cosine {cos:.5}  zeros {:.1}%",
                label(*g),
                100.0 * z
            );
        }
    }
    if let Some((a, b)) = ppl {
        println!(
            "perplexity (ctx {}): source {a:.4}, output {b:.4} ({:+.2}%)",
            args.ctx,
            100.0 * (b - a) / a
        );
    }
    Ok(())
}
