//! `bitnet-train` against the PyTorch reference (scripts/golden/make_train_golden.py: pinned
//! torch + transformers' own BitNetForCausalLM with AutoBitLinear, torch.optim.AdamW,
//! clip_grad_norm_): the same initial weights (testdata/models/tiny-bitnet-a-float), the same
//! rows of data and the same settings give (a) the same loss and every parameter's gradient at
//! step 0 and (b) the same loss at each of 50 AdamW steps, within the tolerances stated below.

use bitnet_train::config::{Precision, Schedule, TrainConfig};
use bitnet_train::{RunOptions, Trainer};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden() -> PathBuf {
    repo().join("testdata/golden/train")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden().join("reference.json")).unwrap())
        .unwrap()
}

fn config(precision: Precision, micro: Option<usize>) -> TrainConfig {
    let r = reference();
    let s = &r["settings"];
    let mut c = TrainConfig::default();
    c.data.npy = Some(golden().join("data.npy"));
    c.train.steps = s["steps"].as_u64().unwrap();
    c.train.batch_size = s["batch_size"].as_u64().unwrap() as usize;
    c.train.micro_batch_size = micro;
    c.train.lr = s["lr"].as_f64().unwrap();
    c.train.min_lr = s["min_lr"].as_f64().unwrap();
    c.train.weight_decay = s["weight_decay"].as_f64().unwrap();
    c.train.betas = [
        s["betas"][0].as_f64().unwrap(),
        s["betas"][1].as_f64().unwrap(),
    ];
    c.train.eps = s["eps"].as_f64().unwrap();
    c.train.warmup = s["warmup"].as_u64().unwrap();
    c.train.schedule = Schedule::Cosine;
    c.train.grad_clip = s["grad_clip"].as_f64().unwrap();
    c.train.precision = precision;
    c.checkpoint.every = 0;
    c.eval.every = 0;
    c
}

fn trainer(precision: Precision, micro: Option<usize>, out: &Path) -> Trainer {
    trainer_with(config(precision, micro), out, RunOptions::default())
}

/// A run of `c` from the tiny model's float masters into `out`, with the other options of `opts`.
fn trainer_with(c: TrainConfig, out: &Path, opts: RunOptions) -> Trainer {
    Trainer::new(
        c,
        Path::new("reference.toml"),
        RunOptions {
            out: out.to_path_buf(),
            init: Some(repo().join("testdata/models/tiny-bitnet-a-float")),
            ..opts
        },
    )
    .unwrap()
}

/// Worst gradient error of any parameter, relative to that parameter's largest golden entry.
fn grads_error(t: &Trainer, golden_file: &str) -> (f64, f64) {
    let bytes = std::fs::read(golden().join(golden_file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (loss, grads) = t.loss_and_grads().unwrap();
    let mut worst: f64 = 0.0;
    assert_eq!(st.names().len(), t.model.names.len(), "parameter count");
    for (name, g) in t.model.names.iter().zip(&grads) {
        let want = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden has no {name}"));
        assert_eq!(want.shape(), g.dims(), "{name}");
        let want: Vec<f64> = want
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got: Vec<f64> = g
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        let err = want
            .iter()
            .zip(&got)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(err / scale);
    }
    (loss, worst)
}

fn curve(out: &Path) -> Vec<(f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<f64> = l.split(',').map(|x| x.parse().unwrap()).collect();
            (f[1], f[2], f[3])
        })
        .collect()
}

fn golden_curve(run: &str) -> Vec<(f64, f64, f64)> {
    let r = reference();
    let c = &r["runs"][run];
    (0..c["loss"].as_array().unwrap().len())
        .map(|i| {
            (
                c["loss"][i].as_f64().unwrap(),
                c["lr"][i].as_f64().unwrap(),
                c["grad_norm"][i].as_f64().unwrap(),
            )
        })
        .collect()
}

/// (a) and (b) in double precision, against the reference run in float64 throughout: equal to
/// rounding (measured: loss 8e-16 relative over the 50 steps, gradients 2.5e-15 of each
/// parameter's largest), so the tolerances are 1e-11.
#[test]
fn double_precision_matches_pytorch_at_step_0_and_along_50_steps() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(Precision::F64, None, dir.path());
    let (loss, gerr) = grads_error(&t, "grads_f64.safetensors");
    let want = golden_curve("f64");
    eprintln!(
        "f64 step 0: loss {loss} vs {}, worst gradient error {gerr:e}",
        want[0].0
    );
    assert!(
        (loss - want[0].0).abs() < 1e-11 * want[0].0,
        "loss {loss} vs {}",
        want[0].0
    );
    assert!(gerr < 1e-11, "gradient error {gerr}");
    t.run(&mut |_| {}).unwrap();
    let worst = compare_curve(&curve(dir.path()), &want, 1e-11);
    eprintln!("f64: worst relative loss error over 50 steps {worst:e}");
}

/// The same with gradients accumulated over two micro-batches of 2 rows: the same updates.
#[test]
fn gradient_accumulation_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(Precision::F64, Some(2), dir.path());
    let (_, gerr) = grads_error(&t, "grads_f64.safetensors");
    assert!(gerr < 1e-11, "gradient error {gerr}");
    t.run(&mut |_| {}).unwrap();
    let worst = compare_curve(&curve(dir.path()), &golden_curve("f64"), 1e-11);
    eprintln!("accumulated: worst relative loss error {worst:e}");
}

/// Every step's loss, learning rate and gradient norm within `tol` (relative); returns the
/// worst loss error.
fn compare_curve(got: &[(f64, f64, f64)], want: &[(f64, f64, f64)], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "steps");
    let mut worst: f64 = 0.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g.1 - w.1).abs() <= 1e-12 * w.1,
            "lr at step {i}: {} vs {}",
            g.1,
            w.1
        );
        let e = (g.0 - w.0).abs() / w.0;
        worst = worst.max(e);
        assert!(e <= tol, "loss at step {i}: {} vs {} ({e:e})", g.0, w.0);
        let e = (g.2 - w.2).abs() / w.2;
        assert!(
            e <= tol,
            "grad norm at step {i}: {} vs {} ({e:e})",
            g.2,
            w.2
        );
    }
    worst
}

/// (a) in single precision against transformers as shipped (float32, its quantizers compiled):
/// the step-0 loss and gradients agree to float32 rounding. Along the run, rounding differences
/// flip ternary codes and the runs part (the reference's own float32 and float64 runs end 2%
/// apart), so (b) holds in double precision above; here the curve is checked against the band
/// that PyTorch itself spans.
#[test]
fn single_precision_matches_transformers_at_step_0_and_stays_in_its_band() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(Precision::F32, None, dir.path());
    let (loss, gerr) = grads_error(&t, "grads_f32.safetensors");
    let want = golden_curve("f32");
    eprintln!(
        "f32 step 0: loss {loss} vs {}, worst gradient error {gerr:e}",
        want[0].0
    );
    assert!(
        (loss - want[0].0).abs() < 1e-6 * want[0].0,
        "loss {loss} vs {}",
        want[0].0
    );
    assert!(gerr < 1e-5, "gradient error {gerr}");
    t.run(&mut |_| {}).unwrap();
    let got = curve(dir.path());
    let f64_run = golden_curve("f64");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ours_vs_torch = mean(
        &got.iter()
            .zip(&want)
            .map(|(g, w)| (g.0 - w.0).abs())
            .collect::<Vec<_>>(),
    );
    let torch_vs_torch = mean(
        &want
            .iter()
            .zip(&f64_run)
            .map(|(a, b)| (a.0 - b.0).abs())
            .collect::<Vec<_>>(),
    );
    let tail =
        |c: &[(f64, f64, f64)]| mean(&c[c.len() - 10..].iter().map(|x| x.0).collect::<Vec<_>>());
    let head = |c: &[(f64, f64, f64)]| mean(&c[..10].iter().map(|x| x.0).collect::<Vec<_>>());
    eprintln!(
        "f32: mean |ours - torch f32| {ours_vs_torch:.4}, mean |torch f32 - torch f64| {torch_vs_torch:.4}; \
         last 10 steps: ours {:.4}, torch {:.4}",
        tail(&got),
        tail(&want)
    );
    // lr follows the same schedule exactly; the loss stays within twice PyTorch's own spread.
    for (g, w) in got.iter().zip(&want) {
        assert!((g.1 - w.1).abs() <= 1e-6 * w.1);
    }
    assert!(
        ours_vs_torch <= 2.0 * torch_vs_torch,
        "{ours_vs_torch} vs {torch_vs_torch}"
    );
    assert!((tail(&got) - tail(&want)).abs() <= 0.02 * tail(&want));
    assert!(tail(&got) < head(&got) - 0.5, "the loss did not fall");
}

/// The teacher of scripts/golden/make_distill_golden.py: a fixed function of the input tokens,
/// computed exactly as the script does (integer arithmetic, one float64 division and product,
/// rounded to float32).
struct FormulaTeacher {
    vocab: usize,
}

impl bitnet_train::distill::Teacher for FormulaTeacher {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn logits(&self, ids: &[u32], rows: usize, seq: usize) -> bitnet_train::Result<Vec<f32>> {
        assert_eq!(ids.len(), rows * seq);
        let mut out = Vec::with_capacity(ids.len() * self.vocab);
        for row in ids.chunks(seq) {
            for (p, &x) in row.iter().enumerate() {
                let prev = if p == 0 { 0 } else { row[p - 1] as i64 };
                for v in 0..self.vocab as i64 {
                    let k = (31 * x as i64 + 17 * v + 7 * prev + 3 * p as i64) % 97;
                    out.push((k as f64 / 97.0 * 8.0 - 4.0) as f32);
                }
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        "the golden's formula teacher".into()
    }
}

fn distill_golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden().join("distill.json")).unwrap()).unwrap()
}

/// A distillation run against PyTorch (make_distill_golden.py): alpha * T² * KL + (1 - alpha) *
/// CE with kl_div's batchmean over positions, in float64: the step-0 objective and every
/// gradient, then the objective, both terms, lr and grad norm along 20 steps, within 1e-11; with
/// gradients accumulated over two micro-batches (the teacher then scores one micro-batch ahead)
/// the same run.
#[test]
fn distillation_matches_pytorch_in_double_precision() {
    let g = distill_golden();
    let want = &g["f64"];
    let steps = want["loss"].as_array().unwrap().len() as u64;
    for micro in [None, Some(2)] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(Precision::F64, micro);
        c.distill.alpha = g["settings"]["alpha"].as_f64().unwrap();
        c.distill.temperature = g["settings"]["temperature"].as_f64().unwrap();
        let mut t = trainer_with(
            c,
            dir.path(),
            RunOptions {
                teacher: Some(std::sync::Arc::new(FormulaTeacher { vocab: 250 })),
                stop_after: Some(steps),
                ..RunOptions::default()
            },
        );
        // With two micro-batches, the teacher also scores ahead (as it does for a GPU student).
        t.set_teacher_lookahead(micro.is_some());
        let (loss, gerr) = grads_error(&t, "distill_grads_f64.safetensors");
        let l0 = want["loss"][0].as_f64().unwrap();
        eprintln!("distill micro {micro:?}: step-0 objective {loss} vs {l0}, gradients {gerr:e}");
        assert!((loss - l0).abs() < 1e-11 * l0, "objective {loss} vs {l0}");
        assert!(gerr < 1e-11, "gradient error {gerr}");
        t.run(&mut |_| {}).unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("step,loss,lr,grad_norm,ce,kl"));
        let rows: Vec<Vec<f64>> = lines
            .map(|l| l.split(',').map(|x| x.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len() as u64, steps);
        let mut worst: f64 = 0.0;
        for (i, r) in rows.iter().enumerate() {
            for (col, key) in [
                (1, "loss"),
                (2, "lr"),
                (3, "grad_norm"),
                (4, "ce"),
                (5, "kl"),
            ] {
                let w = want[key][i].as_f64().unwrap();
                let e = (r[col] - w).abs() / w.abs();
                worst = worst.max(e);
                assert!(e < 1e-11, "{key} at step {i}: {} vs {w} ({e:e})", r[col]);
            }
        }
        eprintln!("distill micro {micro:?}: worst relative error over {steps} steps {worst:e}");
        // Distillation moved the student toward the teacher.
        let kl = |i: usize| rows[i][5];
        assert!(kl(steps as usize - 1) < kl(0) - 0.5);
    }
}

/// The engine as a teacher, with the student started from the teacher's own weights: the
/// engine's logits and the trainer's forward are the same model, so the distillation term of
/// the first batch is zero to rounding while the cross-entropy is not. A teacher scoring the
/// wrong rows or positions (or one position off) gives a KL of the order of the cross-entropy.
#[test]
fn an_engine_teacher_equal_to_the_student_gives_no_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let init = repo().join("testdata/models/tiny-bitnet-a-float");
    let mut c = config(Precision::F32, Some(2));
    c.distill.teacher = Some(init);
    c.distill.alpha = 1.0;
    c.data.heldout_npy = Some(golden().join("data.npy"));
    c.eval.max_rows = 24;
    let t = trainer_with(c, dir.path(), RunOptions::default());
    assert!(
        t.teacher()
            .unwrap()
            .describe()
            .contains("tiny-bitnet-a-float")
    );
    let (l, _) = t.batch_grads().unwrap();
    let kl = l.kl.unwrap();
    eprintln!("engine teacher = student: ce {}, kl {kl:e}", l.ce);
    assert!(l.ce > 4.0, "{}", l.ce);
    assert!(kl.abs() < 1e-5, "kl {kl}");
    assert_eq!(l.loss, kl, "alpha 1 leaves the KL alone");
    // The teacher's own held-out loss, computed from its logits, is the student's.
    let (teacher, student) = (
        t.teacher_heldout_loss().unwrap().unwrap(),
        t.evaluate().unwrap().unwrap(),
    );
    eprintln!("held-out loss: teacher {teacher}, student {student}");
    assert!(
        (teacher - student).abs() < 1e-4 * student,
        "{teacher} vs {student}"
    );
}

/// bf16 master weights (`--precision bf16-masters`): the weights are bf16, AdamW's moments f32;
/// the reference run's loss ends within 5% of PyTorch's f32 run (measured 2.7%: bf16 weights round
/// each update; a run whose updates were lost would stay 23% above it),
/// and a run stopped at step 20 and resumed from its checkpoint (bf16 weights, f32 moments)
/// ends exactly where the uninterrupted one does.
#[test]
fn bf16_masters_train_like_f32_and_resume_exactly() {
    let whole = tempfile::tempdir().unwrap();
    let mut t = trainer(Precision::Bf16Masters, None, whole.path());
    assert!(
        t.model
            .vars
            .iter()
            .all(|v| v.dtype() == candle_core::DType::BF16)
    );
    t.run(&mut |_| {}).unwrap();
    let got = curve(whole.path());
    let want = golden_curve("f32");
    let tail = |c: &[(f64, f64, f64)]| c[c.len() - 10..].iter().map(|x| x.0).sum::<f64>() / 10.0;
    eprintln!(
        "bf16 masters: first loss {} (torch f32 {}), last 10 steps {:.4} (torch f32 {:.4})",
        got[0].0,
        want[0].0,
        tail(&got),
        tail(&want)
    );
    assert!((got[0].0 - want[0].0).abs() < 0.01 * want[0].0);
    assert!((tail(&got) - tail(&want)).abs() < 0.05 * tail(&want));

    let parts = tempfile::tempdir().unwrap();
    let run = |resume: bool, stop: Option<u64>| {
        let mut t = trainer_with(
            config(Precision::Bf16Masters, None),
            parts.path(),
            RunOptions {
                resume,
                stop_after: stop,
                ..RunOptions::default()
            },
        );
        t.run(&mut |_| {}).unwrap();
    };
    run(false, Some(20));
    let bytes = std::fs::read(parts.path().join("checkpoint.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dtype_of = |prefix: &str| {
        let (_, t) = st
            .tensors()
            .into_iter()
            .find(|(n, _)| n.starts_with(prefix))
            .unwrap();
        t.dtype()
    };
    assert_eq!(dtype_of("param/model.layers"), safetensors::Dtype::BF16);
    assert_eq!(dtype_of("adam_m/"), safetensors::Dtype::F32);
    run(true, None);
    assert_eq!(curve(parts.path()), got, "the resumed run differs");
}
