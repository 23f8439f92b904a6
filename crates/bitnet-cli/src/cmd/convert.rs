//! `bitnet convert`: a Hugging Face BitNet directory or a BitNet GGUF to a ternary GGUF.

use anyhow::{Context, Result, bail};
use bitnet_formats::gguf::GgmlType;
use bitnet_model::convert::{ConvertOptions, convert_gguf_to_gguf, convert_hf_to_gguf, verify};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source: a Hugging Face model directory (float master weights or the packed 2B-4T layout)
    /// or a BitNet GGUF file (any ternary dialect, or float weights to ternarize).
    pub src: PathBuf,
    /// Output GGUF file (written atomically: it appears only when complete).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Ternary type of the linear layers: tq2_0 (llama.cpp), tq1_0 (llama.cpp, 1.69 bpw), i2_s (bitnet.cpp).
    #[arg(long, default_value = "tq2_0")]
    pub to: String,
    /// Type of the embeddings and lm_head: f16, bf16, f32 or q8_0 (default: f16 from a
    /// Hugging Face directory; unchanged from a GGUF).
    #[arg(long)]
    pub embeddings: Option<String>,
    /// Re-read the output and check it against the source (codes, scales, every byte).
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object describing every tensor.
    #[arg(long)]
    pub json: bool,
}

fn parse_type(s: &str, allowed: &[GgmlType], flag: &str) -> Result<GgmlType> {
    let t = GgmlType::from_name(s).with_context(|| format!("{flag}: unknown type {s:?}"))?;
    if !allowed.contains(&t) {
        let names: Vec<&str> = allowed.iter().map(|t| t.name()).collect();
        bail!("{flag}: {t} is not one of {}", names.join(", "));
    }
    Ok(t)
}

pub fn run(args: Args) -> Result<()> {
    let opts = ConvertOptions {
        ternary: parse_type(
            &args.to,
            &[GgmlType::TQ2_0, GgmlType::TQ1_0, GgmlType::I2_S],
            "--to",
        )?,
        float_type: parse_type(
            args.embeddings.as_deref().unwrap_or("f16"),
            &[GgmlType::F16, GgmlType::BF16, GgmlType::F32, GgmlType::Q8_0],
            "--embeddings",
        )?,
        ..Default::default()
    };
    let from_dir = args.src.is_dir();
    if !from_dir && !args.src.is_file() {
        bail!("{} does not exist", args.src.display());
    }
    let t0 = Instant::now();
    // A byte-counting bar on a terminal (indicatif draws nothing when stderr is not one).
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    let mut progress = |done: u64, total: u64, name: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(name.to_string());
    };
    let report = if from_dir {
        convert_hf_to_gguf(&args.src, &args.out, &opts, &mut progress)
    } else {
        convert_gguf_to_gguf(
            &args.src,
            &args.out,
            &opts,
            args.embeddings.is_none(),
            &mut progress,
        )
    }
    .with_context(|| format!("cannot convert {}", args.src.display()))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let verified = if args.verify {
        let v = verify(&args.src, &args.out)
            .with_context(|| format!("verification of {} failed", args.out.display()))?;
        Some(v)
    } else {
        None
    };
    if args.json {
        let tensors: Vec<serde_json::Value> = report
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({"name": t.name, "type": t.ty.name(), "shape": t.shape,
                    "exact": t.fidelity.as_ref().map(|f| f.exact), "note": t.fidelity.as_ref().map(|f| f.note.clone())})
            })
            .collect();
        let verify = verified.as_ref().map(|v| {
            serde_json::json!({"tensors": v.tensors, "ternary": v.ternary,
                "max_rel_scale_change": v.max_rel_scale_change})
        });
        println!(
            "{}",
            serde_json::json!({"output": args.out, "bytes": report.bytes_written, "seconds": secs,
                "tensors": tensors, "verify": verify})
        );
    } else {
        let inexact: Vec<_> = report
            .tensors
            .iter()
            .filter(|t| t.fidelity.as_ref().is_some_and(|f| !f.exact))
            .collect();
        println!(
            "wrote {} ({:.1} MiB, {} tensors) in {secs:.1}s",
            args.out.display(),
            report.bytes_written as f64 / (1 << 20) as f64,
            report.tensors.len()
        );
        match inexact.first() {
            None => println!("ternary layers: codes and scales exact"),
            Some(t) => println!(
                "ternary layers: codes exact; {} of them had their scale rounded by {} (e.g. {}: {})",
                inexact.len(),
                opts.ternary,
                t.name,
                t.fidelity.as_ref().map(|f| f.note.as_str()).unwrap_or("")
            ),
        }
        if let Some(v) = verified {
            println!(
                "verified: {} tensors re-read; {} ternary with identical codes, scales within {:.1e}",
                v.tensors, v.ternary, v.max_rel_scale_change
            );
        }
    }
    Ok(())
}
