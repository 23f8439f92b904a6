//! `bitnet train`: quantization-aware training of a BitNet b1.58 model (see `bitnet-train`).
//! The tensor work uses every core; `RAYON_NUM_THREADS=N` limits it (candle reads it).

use anyhow::{Context, Result, bail};
use bitnet_train::config::{Precision, Quant, Schedule, TrainConfig};
use bitnet_train::{RunOptions, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run's TOML config ([model], [data], [train], [eval], [checkpoint], [export]); the
    /// flags below override it. Without it, the defaults, and the data must come from --data.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Start from a Hugging Face BitNet directory with float master weights
    /// (quantization_mode "online"); its config replaces [model].
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Pre-tokenized rows: int32 .npy [N, seq_len + 1], used in order, no shuffling.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The tokenizer.json that text data is tokenized with (in place of one trained on it).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Held-out rows for evaluation (.npy, the same width).
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows per optimizer step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Rows per forward/backward pass (gradients accumulate up to --batch-size).
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW's betas: B1,B2.
    #[arg(long, value_delimiter = ',')]
    pub betas: Option<Vec<f64>>,
    #[arg(long)]
    pub eps: Option<f64>,
    /// Steps of linear warmup (0 allowed).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// constant, cosine, linear or two-stage.
    #[arg(long)]
    pub schedule: Option<Schedule>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// f32 (default), f64, bf16 (mixed: f32 masters, bf16 linears and attention), or
    /// bf16-masters (bf16 weights and gradients, AdamW's moments and update in f32).
    #[arg(long, value_parser = parse_precision)]
    pub precision: Option<Precision>,
    /// Where to train: cpu, cuda (GPU 0) or cuda:N. CUDA needs a bitnet built with
    /// `--features cuda` (scripts/build-cuda.sh) and CUDA 13's libraries on the library path.
    #[arg(long, env = "BITNET_TRAIN_DEVICE", default_value = "cpu")]
    pub device: String,
    /// On CUDA, let cuBLAS multiply f32 matrices on the tensor cores in TF32 (about 1e-3
    /// relative error per product; faster).
    #[arg(long)]
    pub tf32: bool,
    /// Distil from this float teacher (a GGUF file or Hugging Face directory the engine runs,
    /// with the student's vocabulary): the loss becomes ALPHA * T² * KL(teacher || student) +
    /// (1 - ALPHA) * cross-entropy. Text data is tokenized with the teacher's tokenizer.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Weight ALPHA of the distillation term (default 0.5).
    #[arg(long)]
    pub distill_alpha: Option<f64>,
    /// Softmax temperature T of the distillation term (default 1).
    #[arg(long)]
    pub distill_temperature: Option<f64>,
    /// Train plain float linears instead of BitLinear (the baseline to compare with).
    #[arg(long)]
    pub float: bool,
    /// Where checkpoints, metrics, the tokenizer and the exports go.
    #[arg(short, long, default_value = "runs/train")]
    pub out: PathBuf,
    /// The per-step CSV (step,loss,lr,grad_norm); default OUT/metrics.csv.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Continue from OUT/checkpoint.safetensors (bit for bit, the same config).
    #[arg(long)]
    pub resume: bool,
    /// Skip writing OUT/hf/ and OUT/model.gguf at the end.
    #[arg(long)]
    pub no_export: bool,
    /// Write checkpoints every N steps (0: only at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Ternary type of the exported GGUF: TQ2_0, TQ1_0 or I2_S.
    #[arg(long)]
    pub gguf_type: Option<String>,
    /// Embedding / head type of the exported GGUF: F16, BF16, F32 or Q8_0.
    #[arg(long)]
    pub gguf_embeddings: Option<String>,
    /// Stop after this many steps (with a checkpoint); continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// No progress bar: one line per evaluation instead.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    match s {
        "f32" => Ok(Precision::F32),
        "f64" => Ok(Precision::F64),
        "bf16" => Ok(Precision::Bf16),
        "bf16-masters" => Ok(Precision::Bf16Masters),
        o => Err(format!(
            "unknown precision {o:?} (f32, f64, bf16 or bf16-masters)"
        )),
    }
}

/// The config file with the flags applied.
pub fn build_config(args: &Args) -> Result<(TrainConfig, PathBuf)> {
    let (mut c, origin) = match &args.config {
        Some(p) => (TrainConfig::from_file(p)?, p.clone()),
        None => (TrainConfig::default(), PathBuf::from("(flags)")),
    };
    if let Some(d) = &args.data {
        c.data.npy = Some(d.clone());
        c.data.text.clear();
    }
    if let Some(t) = &args.tokenizer {
        c.data.tokenizer = Some(t.clone());
    }
    if let Some(h) = &args.heldout {
        c.data.heldout_npy = Some(h.clone());
    }
    let t = &mut c.train;
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = args.$field.clone() { t.$field = v; } )* };
    }
    set!(
        steps,
        batch_size,
        lr,
        min_lr,
        weight_decay,
        eps,
        warmup,
        schedule,
        grad_clip,
        seed,
        precision
    );
    if let Some(m) = args.micro_batch_size {
        t.micro_batch_size = Some(m);
    }
    if let Some(b) = &args.betas {
        let [b1, b2] = b[..] else {
            bail!("--betas takes two numbers, B1,B2 (got {})", b.len());
        };
        t.betas = [b1, b2];
    }
    if args.float {
        c.model.quant = Quant::Float;
    }
    if let Some(t) = &args.teacher {
        c.distill.teacher = Some(t.clone());
    }
    if let Some(a) = args.distill_alpha {
        c.distill.alpha = a;
    }
    if let Some(t) = args.distill_temperature {
        c.distill.temperature = t;
    }
    if let Some(t) = &args.gguf_type {
        c.export.gguf_type = t.to_ascii_uppercase();
    }
    if let Some(t) = &args.gguf_embeddings {
        c.export.float_type = t.to_ascii_uppercase();
    }
    if let Some(e) = args.checkpoint_every {
        c.checkpoint.every = e;
    }
    if c.data.npy.is_none() && c.data.text.is_empty() {
        bail!("no training data: give --data FILE.npy, or [data] text = [...] in --config");
    }
    Ok((c, origin))
}

pub fn run(args: Args) -> Result<()> {
    let (cfg, origin) = build_config(&args)?;
    let device = bitnet_train::device(&args.device)?;
    if args.tf32 {
        if device.is_cpu() {
            bail!("--tf32 is for --device cuda");
        }
        bitnet_train::set_tf32(true);
    }
    let opts = RunOptions {
        device,
        out: args.out.clone(),
        resume: args.resume,
        metrics: args.metrics.clone(),
        init: args.init.clone(),
        export: !args.no_export,
        stop_after: args.stop_after,
        teacher: None,
    };
    let mut t = Trainer::new(cfg, &origin, opts).context("cannot start the run")?;
    let steps = t.cfg.train.steps;
    let s = &t.model.shape;
    eprintln!(
        "training on {} a {} model: {} layers, hidden {}, {} heads ({} kv), vocab {}, {:.2} M parameters; \
         {} steps of {} rows x {} tokens ({}); data: {} rows, {} held out",
        args.device,
        if s.quant == Quant::Ternary {
            "ternary (BitLinear)"
        } else {
            "float"
        },
        s.layers,
        s.hidden,
        s.heads,
        s.kv_heads,
        s.vocab,
        s.parameter_count() as f64 / 1e6,
        steps,
        t.cfg.train.batch_size,
        t.seq_len(),
        if t.step > 0 {
            format!("resuming after step {}", t.step)
        } else {
            "from step 0".into()
        },
        t.data_rows().0,
        t.data_rows().1,
    );
    if let Some(teacher) = t.teacher() {
        eprintln!(
            "distilling from {} (alpha {}, temperature {})",
            teacher.describe(),
            t.cfg.distill.alpha,
            t.cfg.distill.temperature
        );
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(steps);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("a valid template"),
        );
        b.set_position(t.step);
        b.reset_eta();
        b
    };
    let mut tok_per_s = 0.0;
    let summary = t.run(&mut |r| {
        let rate = r.tokens as f64 / r.seconds.max(1e-9);
        tok_per_s = if tok_per_s == 0.0 {
            rate
        } else {
            0.9 * tok_per_s + 0.1 * rate
        };
        bar.set_position(r.step + 1);
        let kl =
            r.kl.map(|kl| format!(" (ce {:.4}, kl {kl:.4})", r.ce))
                .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{kl}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            r.loss, r.lr, r.grad_norm, tok_per_s
        ));
        if let Some(e) = r.eval_loss {
            bar.println(format!(
                "step {:>6}: held-out loss {e:.4}, perplexity {:.2}",
                r.step + 1,
                e.exp()
            ));
        }
    })?;
    bar.finish_and_clear();
    if summary.steps < steps {
        eprintln!(
            "stopped after step {} of {steps}: continue with the same command and --resume",
            summary.steps
        );
    }
    let held = summary
        .eval_loss
        .map(|e| format!("held-out loss {e:.4} (perplexity {:.2})", e.exp()))
        .unwrap_or_else(|| "no held-out rows".into());
    if summary.final_loss.is_nan() {
        eprintln!("nothing left to train at step {}: {held}", summary.steps);
    } else {
        let steady = summary
            .steady_tokens_per_second
            .map(|r| format!(" ({r:.0} tokens/s in the steps after the first two)"))
            .unwrap_or_default();
        eprintln!(
            "done: {} steps, last batch loss {:.4}, {held}, {:.0} tokens/s{steady}",
            summary.steps, summary.final_loss, summary.tokens_per_second
        );
    }
    if let Some(e) = t.teacher_heldout_loss()? {
        eprintln!(
            "the teacher on the same held-out rows: loss {e:.4} (perplexity {:.2})",
            e.exp()
        );
    }
    print_path("checkpoint", &args.out.join(bitnet_train::checkpoint::FILE));
    if let Some(h) = &summary.hf_dir {
        print_path("Hugging Face directory", h);
    }
    if let Some(g) = &summary.gguf {
        print_path("GGUF", g);
        eprintln!("try it: bitnet run -m {} -p \"...\"", g.display());
    }
    Ok(())
}

fn print_path(what: &str, p: &Path) {
    eprintln!("{what}: {}", p.display());
}
