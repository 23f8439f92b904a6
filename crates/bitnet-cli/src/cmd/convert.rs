//! `bitnet convert`: a Hugging Face BitNet directory to a ternary GGUF.

use anyhow::{Context, Result, bail};
use bitnet_formats::gguf::GgmlType;
use bitnet_model::convert::{ConvertOptions, convert_hf_to_gguf};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source: a Hugging Face model directory (float master weights or the packed 2B-4T layout).
    pub src: PathBuf,
    /// Output GGUF file (written atomically: it appears only when complete).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Ternary type of the linear layers: tq2_0 (llama.cpp), tq1_0 (llama.cpp, 1.69 bpw), i2_s (bitnet.cpp).
    #[arg(long, default_value = "tq2_0")]
    pub to: String,
    /// Type of the embeddings and lm_head: f16, bf16, f32 or q8_0.
    #[arg(long, default_value = "f16")]
    pub embeddings: String,
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
            &args.embeddings,
            &[GgmlType::F16, GgmlType::BF16, GgmlType::F32, GgmlType::Q8_0],
            "--embeddings",
        )?,
    };
    if !args.src.is_dir() {
        bail!(
            "{} is not a directory: `bitnet convert` reads a Hugging Face model directory",
            args.src.display()
        );
    }
    let t0 = Instant::now();
    let quiet = args.json;
    let report = convert_hf_to_gguf(&args.src, &args.out, &opts, &mut |done, total, name| {
        if !quiet {
            eprint!("\r[{done}/{total}] {name:<40}");
        }
    })
    .with_context(|| format!("cannot convert {}", args.src.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if args.json {
        let tensors: Vec<serde_json::Value> = report
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({"name": t.name, "type": t.ty.name(), "shape": t.shape,
                    "exact": t.fidelity.as_ref().map(|f| f.exact), "note": t.fidelity.as_ref().map(|f| f.note.clone())})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"output": args.out, "bytes": report.bytes_written, "seconds": secs, "tensors": tensors})
        );
    } else {
        eprintln!();
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
    }
    Ok(())
}
