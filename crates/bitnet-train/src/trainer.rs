//! The training loop: data in order, gradient accumulation, clipping, AdamW, the schedule,
//! metrics, evaluation on held-out rows, checkpoints, `--resume` and the exports.

use crate::checkpoint;
use crate::config::{Quant, TrainConfig};
use crate::data::{self, TokenRows};
use crate::distill::{EngineTeacher, Teacher, TeacherFeed};
use crate::error::{Result, TrainError, io_err};
use crate::export;
use crate::model::{self, Shape, TrainModel};
use crate::optim::{self, AdamW};
use candle_core::{DType, Device, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What the command line adds to a config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where the model, its gradients and the optimizer's state live (`cpu` by default; see
    /// [`crate::device`]). Not part of the config's fingerprint: a run checkpointed on one device
    /// resumes on another.
    pub device: Device,
    /// Where checkpoints, metrics and exports go.
    pub out: PathBuf,
    /// Continue from `out/checkpoint.safetensors`.
    pub resume: bool,
    /// The per-step CSV (`step,loss,lr,grad_norm`); default `out/metrics.csv`.
    pub metrics: Option<PathBuf>,
    /// Start from this Hugging Face BitNet directory's float weights.
    pub init: Option<PathBuf>,
    /// Write `out/hf/` and `out/model.gguf` at the end.
    pub export: bool,
    /// Stop after this many updates in this invocation, with a checkpoint, to be continued by
    /// `resume` (a time-sliced or preemptible job).
    pub stop_after: Option<u64>,
    /// Distil from this teacher (in place of loading `distill.teacher` from the config).
    pub teacher: Option<Arc<dyn Teacher>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            out: PathBuf::new(),
            resume: false,
            metrics: None,
            init: None,
            export: false,
            stop_after: None,
            teacher: None,
        }
    }
}

/// One optimizer step, as reported.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// 0-based index of the update just made.
    pub step: u64,
    pub steps: u64,
    /// The objective of the step's batch, before the update: the mean cross-entropy, or with
    /// a teacher `alpha * kl + (1 - alpha) * ce`.
    pub loss: f64,
    /// The data's mean cross-entropy.
    pub ce: f64,
    /// The distillation term, when there is a teacher.
    pub kl: Option<f64>,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens scored per step.
    pub tokens: usize,
    pub seconds: f64,
    /// Held-out loss, when this step evaluated.
    pub eval_loss: Option<f64>,
}

/// What a finished run leaves.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    /// Over the whole invocation: steps, evaluations and checkpoints.
    pub tokens_per_second: f64,
    /// Over the training steps after this invocation's first two (which load kernels and warm
    /// caches), steps alone; `None` when it ran three steps or fewer.
    pub steady_tokens_per_second: Option<f64>,
    pub hf_dir: Option<PathBuf>,
    pub gguf: Option<PathBuf>,
}

/// A run in progress.
#[derive(Debug)]
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: TrainModel,
    opt: AdamW,
    /// Updates done.
    pub step: u64,
    train: TokenRows,
    heldout: Option<TokenRows>,
    tokenizer: Option<PathBuf>,
    opts: RunOptions,
    metrics_path: PathBuf,
    fingerprint: String,
    decay: Vec<bool>,
    feed: Option<TeacherFeed>,
    lookahead: bool,
}

/// The objective of one batch, as [`Trainer::batch_grads`] reports it.
#[derive(Debug, Clone, Copy)]
pub struct BatchLoss {
    pub loss: f64,
    pub ce: f64,
    pub kl: Option<f64>,
}

fn data_err(path: &Path, message: String) -> TrainError {
    TrainError::Data {
        path: path.into(),
        message,
    }
}

impl Trainer {
    /// Check the config, read the data, build (or restore) the model.
    pub fn new(mut cfg: TrainConfig, origin: &Path, opts: RunOptions) -> Result<Self> {
        cfg.validate(origin)?;
        let dtype = model::dtype(cfg.train.precision);
        let teacher = load_teacher(&mut cfg, &opts)?;
        let (train, heldout, tokenizer) = load_data(&cfg, &opts.out)?;
        let seq = train.width - 1;
        if let Some(s) = cfg.data.seq_len
            && s != seq
        {
            return Err(data_err(
                cfg.data.npy.as_deref().unwrap_or(origin),
                format!("its rows hold {seq} + 1 tokens, data.seq_len says {s}"),
            ));
        }
        cfg.data.seq_len = Some(seq);
        let model = match &opts.init {
            Some(dir) => {
                let m = TrainModel::from_hf_dir(dir, cfg.model.quant, dtype)?;
                cfg.model = m.model_config();
                m
            }
            None => {
                let vocab = cfg
                    .model
                    .vocab_size
                    .or(teacher.as_ref().map(|t| t.vocab()))
                    .or(tokenizer.as_ref().map(|t| t.1))
                    .unwrap_or_else(|| train.vocab_needed());
                cfg.model.vocab_size = Some(vocab);
                TrainModel::init(
                    Shape::from_config(&cfg.model, vocab),
                    dtype,
                    cfg.model.init_std,
                    cfg.train.seed,
                )?
            }
        };
        if let Some(t) = &teacher
            && t.vocab() != model.shape.vocab
        {
            return Err(TrainError::Config {
                path: cfg.distill.teacher.clone().unwrap_or_else(|| origin.into()),
                message: format!(
                    "the teacher's vocabulary has {} entries, the student's {}: distillation \
                     needs the same vocabulary",
                    t.vocab(),
                    model.shape.vocab
                ),
            });
        }
        if opts.export && model.shape.quant == Quant::Ternary {
            // Before any step: a run that cannot be exported fails now, not at the end.
            cfg.check_export(origin)?;
        }
        if seq > model.shape.max_pos {
            return Err(TrainError::Config {
                path: origin.into(),
                message: format!(
                    "sequences of {seq} tokens exceed max_position_embeddings {}",
                    model.shape.max_pos
                ),
            });
        }
        for rows in std::iter::once(&train).chain(heldout.as_ref()) {
            let need = rows.vocab_needed();
            if need > model.shape.vocab {
                return Err(data_err(
                    cfg.data.npy.as_deref().unwrap_or(origin),
                    format!(
                        "token id {} is outside the model's vocabulary of {}",
                        need - 1,
                        model.shape.vocab
                    ),
                ));
            }
        }
        if let Some(h) = &heldout
            && h.width != train.width
        {
            return Err(data_err(
                cfg.data.heldout_npy.as_deref().unwrap_or(origin),
                format!(
                    "held-out rows hold {} tokens, training rows {}",
                    h.width, train.width
                ),
            ));
        }
        std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
        let mut model = model.to_device(&opts.device)?;
        model.compute = model::compute_dtype(cfg.train.precision);
        let mut opt = AdamW::new(&model.vars, &cfg.train)?;
        let fingerprint = cfg.fingerprint(teacher.is_some());
        let mut step = 0;
        if opts.resume {
            step = checkpoint::load(&opts.out, &model, &mut opt, &fingerprint)?;
        }
        let metrics_path = opts
            .metrics
            .clone()
            .unwrap_or_else(|| opts.out.join("metrics.csv"));
        let header = if teacher.is_some() {
            "step,loss,lr,grad_norm,ce,kl"
        } else {
            "step,loss,lr,grad_norm"
        };
        start_csv(&metrics_path, header, step)?;
        start_csv(
            &opts.out.join("eval.csv"),
            "step,eval_loss,eval_ppl",
            step + 1,
        )?;
        // Scoring ahead overlaps the teacher's CPU work with a GPU student's step; a CPU
        // student would only fight the teacher for the same cores.
        let lookahead = !opts.device.is_cpu();
        let decay = (0..model.vars.len()).map(|i| model.decays(i)).collect();
        Ok(Self {
            cfg,
            model,
            opt,
            step,
            train,
            heldout,
            tokenizer: tokenizer.map(|t| t.0),
            opts,
            metrics_path,
            fingerprint,
            decay,
            feed: teacher.map(TeacherFeed::new).transpose()?,
            lookahead,
        })
    }

    /// Whether the teacher scores the next micro-batch while the student trains on this one
    /// (by default when the student is not on the CPU). The run is the same either way.
    pub fn set_teacher_lookahead(&mut self, on: bool) {
        self.lookahead = on;
    }

    /// The teacher of a distillation run.
    pub fn teacher(&self) -> Option<&dyn Teacher> {
        self.feed.as_ref().map(TeacherFeed::teacher)
    }

    pub fn seq_len(&self) -> usize {
        self.train.width - 1
    }

    pub fn tokens_per_step(&self) -> usize {
        self.cfg.train.batch_size * self.seq_len()
    }

    /// Rows of training and of held-out data.
    pub fn data_rows(&self) -> (usize, usize) {
        (
            self.train.rows(),
            self.heldout.as_ref().map_or(0, |h| h.rows()),
        )
    }

    fn rows_tensor(&self, ids: Vec<u32>, n: usize) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            ids,
            (n, self.train.width),
            &self.model.device,
        )?)
    }

    /// Loss and gradients of one batch, accumulated over micro-batches.
    pub fn loss_and_grads(&self) -> Result<(f64, Vec<Tensor>)> {
        let (l, g) = self.batch_grads()?;
        Ok((l.loss, g))
    }

    /// The token rows of micro-batch `a` of update `step`.
    fn micro_rows(&self, step: u64, a: usize) -> Vec<u32> {
        let t = &self.cfg.train;
        let micro = t.micro();
        self.train
            .take_wrapping(step * t.batch_size as u64 + (a * micro) as u64, micro)
    }

    /// What the teacher scores for `rows`: every row less its last token.
    fn teacher_job(&self, rows: &[u32]) -> (Vec<u32>, usize, usize) {
        let w = self.train.width;
        let ids = rows.chunks(w).flat_map(|r| &r[..w - 1]).copied().collect();
        (ids, rows.len() / w, w - 1)
    }

    /// The objective of one batch and its gradients, accumulated over micro-batches.
    pub fn batch_grads(&self) -> Result<(BatchLoss, Vec<Tensor>)> {
        let t = &self.cfg.train;
        let micro = t.micro();
        let accum = t.batch_size / micro;
        let alpha = self.cfg.distill.alpha;
        let mut grads: Option<Vec<Tensor>> = None;
        let (mut loss_sum, mut ce_sum, mut kl_sum) = (0.0, 0.0, 0.0);
        let scalar =
            |x: &Tensor| -> Result<f64> { Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        for a in 0..accum {
            let ids = self.micro_rows(self.step, a);
            let teacher = match &self.feed {
                Some(feed) => {
                    let next = self.lookahead.then(|| {
                        let rows = if a + 1 < accum {
                            self.micro_rows(self.step, a + 1)
                        } else {
                            self.micro_rows(self.step + 1, 0)
                        };
                        self.teacher_job(&rows)
                    });
                    let v = feed.teacher().vocab();
                    let logits = feed.logits(self.teacher_job(&ids), next)?;
                    let n = logits.len() / v;
                    Some(Tensor::from_vec(logits, (n, v), &self.model.device)?)
                }
                None => None,
            };
            let rows = self.rows_tensor(ids, micro)?;
            let (ce, kl) = self.model.loss_terms(
                &rows,
                teacher.as_ref().map(|l| (l, self.cfg.distill.temperature)),
            )?;
            let loss = match &kl {
                Some(kl) => {
                    ce_sum += scalar(&ce)?;
                    kl_sum += scalar(kl)?;
                    ((kl * alpha)? + (&ce * (1.0 - alpha))?)?
                }
                None => ce,
            };
            loss_sum += scalar(&loss)?;
            let scaled = if accum == 1 {
                loss
            } else {
                (loss / accum as f64)?
            };
            let store = scaled.backward()?;
            let g = self
                .model
                .vars
                .iter()
                .map(|v| match store.get(v.as_tensor()) {
                    Some(g) => Ok(g.clone()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let n = accum as f64;
        let loss = loss_sum / n;
        let report = match self.feed {
            Some(_) => BatchLoss {
                loss,
                ce: ce_sum / n,
                kl: Some(kl_sum / n),
            },
            None => BatchLoss {
                loss,
                ce: loss,
                kl: None,
            },
        };
        Ok((report, grads.expect("at least one micro-batch")))
    }

    /// One optimizer update; appends its row to the metrics.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let (lr, wd) = optim::schedule(&self.cfg.train, self.step);
        let (batch, mut grads) = self.batch_grads()?;
        let loss = batch.loss;
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step,
                message: format!("the loss is {loss}; lower lr or turn on grad_clip"),
            });
        }
        let norm = optim::global_norm(&grads)?;
        if !norm.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step,
                message: format!("the gradient norm is {norm}"),
            });
        }
        optim::clip(&mut grads, norm, self.cfg.train.grad_clip)?;
        self.opt
            .step(&self.model.vars, &grads, &self.decay, lr, wd)?;
        let report = StepReport {
            step: self.step,
            steps: self.cfg.train.steps,
            loss,
            ce: batch.ce,
            kl: batch.kl,
            lr,
            grad_norm: norm,
            tokens: self.tokens_per_step(),
            seconds: started.elapsed().as_secs_f64(),
            eval_loss: None,
        };
        let mut row = format!("{},{},{},{}", self.step, loss, lr, norm);
        if let Some(kl) = batch.kl {
            row.push_str(&format!(",{},{kl}", batch.ce));
        }
        append_line(&self.metrics_path, &row)?;
        self.step += 1;
        Ok(report)
    }

    /// The held-out rows an evaluation reads: at most `eval.max_rows` of them.
    fn eval_rows(&self) -> Option<(&TokenRows, usize)> {
        let h = self.heldout.as_ref()?;
        let n = match self.cfg.eval.max_rows {
            0 => h.rows(),
            m => h.rows().min(m),
        };
        (n > 0).then_some((h, n))
    }

    /// The teacher's own mean cross-entropy over the rows [`Self::evaluate`] reads: what the
    /// student is measured against. `None` without a teacher or held-out rows.
    pub fn teacher_heldout_loss(&self) -> Result<Option<f64>> {
        let (Some(feed), Some((h, n))) = (&self.feed, self.eval_rows()) else {
            return Ok(None);
        };
        let (w, v) = (h.width, feed.teacher().vocab());
        let (mut sum, mut count) = (0.0, 0usize);
        let micro = self.cfg.train.micro();
        let mut done = 0;
        while done < n {
            let k = micro.min(n - done);
            let rows = h.take_wrapping(done as u64, k);
            let (ids, r, seq) = self.teacher_job(&rows);
            let logits = feed.teacher().logits(&ids, r, seq)?;
            for (i, z) in logits.chunks(v).enumerate() {
                let target = rows[(i / seq) * w + i % seq + 1] as usize;
                sum -= f64::from(bitnet_model::sampling::log_prob(z, target));
                count += 1;
            }
            done += k;
        }
        Ok(Some(sum / count as f64))
    }

    /// Mean cross-entropy over the held-out rows (at most `eval.max_rows` of them).
    pub fn evaluate(&self) -> Result<Option<f64>> {
        let Some((h, n)) = self.eval_rows() else {
            return Ok(None);
        };
        let micro = self.cfg.train.micro();
        let mut sum = 0.0;
        let mut done = 0;
        while done < n {
            let k = micro.min(n - done);
            let rows = self.rows_tensor(h.take_wrapping(done as u64, k), k)?;
            let loss = self.model.loss(&rows)?.detach();
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
            done += k;
        }
        Ok(Some(sum / n as f64))
    }

    fn record_eval(&self, loss: f64) -> Result<()> {
        append_line(
            &self.opts.out.join("eval.csv"),
            &format!("{},{},{}", self.step, loss, loss.exp()),
        )
    }

    pub fn save_checkpoint(&self) -> Result<()> {
        checkpoint::save(
            &self.opts.out,
            &self.model,
            &self.opt,
            self.step,
            &self.fingerprint,
        )
    }

    /// Run to `train.steps`, checkpointing and evaluating as configured; `on_step` sees every
    /// report (the progress bar).
    pub fn run(&mut self, on_step: &mut dyn FnMut(&StepReport)) -> Result<Summary> {
        let steps = self.cfg.train.steps;
        let started = Instant::now();
        let first = self.step;
        let mut last_loss = f64::NAN;
        let mut eval_loss = None;
        let until = match self.opts.stop_after {
            Some(n) => steps.min(first + n),
            None => steps,
        };
        let mut steady = (0usize, 0f64);
        while self.step < until {
            let mut r = self.train_step()?;
            last_loss = r.loss;
            if self.step - first > 2 {
                steady = (steady.0 + r.tokens, steady.1 + r.seconds);
            }
            let every = self.cfg.eval.every;
            if (every > 0 && self.step.is_multiple_of(every)) || self.step == steps {
                eval_loss = self.evaluate()?;
                if let Some(l) = eval_loss {
                    self.record_eval(l)?;
                }
                r.eval_loss = eval_loss;
            }
            let every = self.cfg.checkpoint.every;
            if (every > 0 && self.step.is_multiple_of(every)) || self.step == until {
                self.save_checkpoint()?;
            }
            on_step(&r);
        }
        if eval_loss.is_none() && self.step == first {
            eval_loss = self.evaluate()?;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let tokens = (self.step - first) as f64 * self.tokens_per_step() as f64;
        let (mut hf_dir, mut gguf) = (None, None);
        if self.opts.export && self.step == steps {
            let (h, g) = self.export()?;
            hf_dir = Some(h);
            gguf = g;
        }
        Ok(Summary {
            steps: self.step,
            final_loss: last_loss,
            eval_loss,
            tokens_per_second: tokens / secs,
            steady_tokens_per_second: (steady.1 > 0.0).then(|| steady.0 as f64 / steady.1),
            hf_dir,
            gguf,
        })
    }

    /// Write `out/hf/` and, for a ternary model, `out/model.gguf`.
    pub fn export(&self) -> Result<(PathBuf, Option<PathBuf>)> {
        let hf = self.opts.out.join("hf");
        export::write_hf_dir(&self.model, &hf, self.tokenizer.as_deref())?;
        let gguf = if self.model.shape.quant == Quant::Ternary {
            Some(export::write_gguf(
                &hf,
                &self.opts.out.join("model.gguf"),
                &self.cfg.export,
            )?)
        } else {
            None
        };
        Ok((hf, gguf))
    }
}

/// The teacher of a distillation run: the one given in `opts`, or `distill.teacher` loaded by
/// the engine. Text data without a tokenizer of its own is tokenized with the teacher's (written
/// to `out/tokenizer.json`, which the exports then carry).
fn load_teacher(cfg: &mut TrainConfig, opts: &RunOptions) -> Result<Option<Arc<dyn Teacher>>> {
    if let Some(t) = &opts.teacher {
        return Ok(Some(t.clone()));
    }
    let Some(path) = cfg.distill.teacher.clone() else {
        return Ok(None);
    };
    let (teacher, tokenizer) = EngineTeacher::load(&path)?;
    if !cfg.data.text.is_empty() && cfg.data.tokenizer.is_none() {
        let Some(tok) = tokenizer else {
            return Err(TrainError::Config {
                path,
                message: "the teacher ships no tokenizer: give data.tokenizer (the teacher's \
                          tokenizer.json)"
                    .into(),
            });
        };
        let json = tok
            .inner()
            .to_string(false)
            .map_err(|e| TrainError::Config {
                path: path.clone(),
                message: format!("cannot write the teacher's tokenizer: {e}"),
            })?;
        std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
        let p = opts.out.join("tokenizer.json");
        bitnet_formats::atomic::write_atomic_bytes(&p, json.as_bytes())?;
        cfg.data.tokenizer = Some(p);
    }
    Ok(Some(Arc::new(teacher)))
}

/// Token rows for training and evaluation, and the tokenizer when there is one.
fn load_data(cfg: &TrainConfig, out: &Path) -> Result<crate::tokenizer::TextData> {
    if let Some(p) = &cfg.data.npy {
        let train = data::read_npy(p)?;
        let heldout = cfg
            .data
            .heldout_npy
            .as_deref()
            .map(data::read_npy)
            .transpose()?;
        let tok = match &cfg.data.tokenizer {
            Some(t) => Some((t.clone(), crate::tokenizer::vocab_size(t)?)),
            None => None,
        };
        return Ok((train, heldout, tok));
    }
    crate::tokenizer::load_text(cfg, out)
}

/// Create `path` with `header`, or keep the rows of steps before `keep_before` (a resumed run
/// rewrites what its checkpoint had not reached).
fn start_csv(path: &Path, header: &str, keep_before: u64) -> Result<()> {
    let mut out = format!("{header}\n");
    if keep_before > 0
        && let Ok(text) = std::fs::read_to_string(path)
    {
        for line in text.lines().skip(1) {
            let step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
            if step.is_some_and(|s| s < keep_before) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    bitnet_formats::atomic::write_atomic_bytes(path, out.as_bytes())?;
    Ok(())
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    writeln!(f, "{line}").map_err(io_err(path))
}
