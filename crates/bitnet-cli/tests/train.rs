//! `bitnet train` end to end: the exported GGUF, run by `bitnet logits`, computes what the
//! trained model computes; an interrupted run resumed from its checkpoint ends bit for bit where
//! an uninterrupted one does; text is tokenized, packed and held out; bad input is a clear error
//! and a full disk leaves the previous checkpoint usable.

mod cli;
#[path = "../../bitnet-formats/tests/common/mod.rs"]
mod common;

use bitnet_train::config::Quant;
use bitnet_train::model::TrainModel;
use cli::{bitnet, succeeds};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_init() -> PathBuf {
    repo().join("testdata/models/tiny-bitnet-a-float")
}

fn golden_rows() -> PathBuf {
    repo().join("testdata/golden/train/data.npy")
}

/// `bitnet train` from the tiny model and the reference rows, with `extra` flags.
fn train(out: &Path, extra: &[&str]) -> Command {
    let mut c = bitnet();
    c.arg("train")
        .arg("--init")
        .arg(tiny_init())
        .arg("--data")
        .arg(golden_rows())
        .arg("--batch-size")
        .arg("4")
        .arg("--lr")
        .arg("3e-3")
        .arg("--warmup")
        .arg("2")
        .arg("--quiet")
        .arg("-o")
        .arg(out)
        .args(extra);
    c
}

/// `bitnet train -c CFG -o OUT --quiet`, more flags to follow.
fn train_config(cfg: &Path, out: &Path) -> Command {
    let mut c = bitnet();
    c.arg("train")
        .arg("-c")
        .arg(cfg)
        .arg("-o")
        .arg(out)
        .arg("--quiet");
    c
}

/// `bitnet run` of a trained GGUF prints some text.
fn generates(gguf: &Path, prompt: &str, n: usize) {
    let o = succeeds(
        bitnet()
            .arg("run")
            .arg("-m")
            .arg(gguf)
            .arg("-p")
            .arg(prompt)
            .arg("-n")
            .arg(n.to_string()),
    );
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Read a float32 `.npy` (as `bitnet logits` writes it): shape and values.
fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let v = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, v)
}

/// (c) of the issue: train, export (I2_S linears, f32 embeddings), run the GGUF with
/// `bitnet logits`, and compare with the trained model's own forward (its exported float masters
/// loaded back): the engine's integer dot products and the training graph's float matmuls of the
/// same ternary weights and int8 activations agree to float rounding (measured 3e-7 of the
/// largest logit; the bound is 1e-5).
#[test]
fn exported_gguf_run_by_bitnet_logits_equals_the_trained_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    succeeds(&mut train(
        &out,
        &[
            "--steps",
            "10",
            "--gguf-type",
            "i2_s",
            "--gguf-embeddings",
            "f32",
        ],
    ));
    let gguf = out.join("model.gguf");
    assert!(gguf.is_file() && out.join("hf/config.json").is_file());
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 3, 200, 7, 7, 150, 249, 0, 64];
    let list = tokens
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let npy = tmp.path().join("logits.npy");
    succeeds(
        bitnet()
            .arg("logits")
            .arg("-m")
            .arg(&gguf)
            .arg("--tokens")
            .arg(&list)
            .arg("-o")
            .arg(&npy),
    );
    let (shape, engine) = read_npy_f32(&npy);
    assert_eq!(shape, vec![tokens.len(), 250]);

    // The logits of the tokens under a Hugging Face directory's float masters, as training
    // computes them.
    let logits = |dir: &Path| -> Vec<f32> {
        let m = TrainModel::from_hf_dir(dir, Quant::Ternary, candle_core::DType::F32).unwrap();
        let ids =
            candle_core::Tensor::from_vec(tokens.clone(), (1, tokens.len()), &m.device).unwrap();
        m.forward(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let own = logits(&out.join("hf"));
    assert_eq!(own.len(), engine.len());
    let max = own.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = own
        .iter()
        .zip(&engine)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("max |logit| {max}, max |engine - trained| {err:e}");
    assert!(
        err <= 1e-5 * max,
        "engine and trained forward differ by {err} (max {max})"
    );
    // The model learnt something: the trained logits are not the initial ones.
    let before = logits(&tiny_init());
    assert!(before.iter().zip(&own).any(|(a, b)| (a - b).abs() > 1e-2));
}

/// A run stopped after 3 of 8 steps and resumed ends with the same weights, optimizer state and
/// metrics, byte for byte, as the run that was never stopped.
/// The reference run from plain inputs and flags alone (no config file), in f64: its metrics CSV
/// follows PyTorch's curve (testdata/golden/train/reference.json) at every step. The command is
/// the one scripts/gpu/train-cuda.sh runs on a GPU.
#[test]
fn the_flag_only_reference_run_follows_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("metrics.csv");
    let mut c = bitnet();
    c.arg("train")
        .arg("--init")
        .arg(tiny_init())
        .arg("--data")
        .arg(golden_rows())
        .args([
            "--steps",
            "50",
            "--batch-size",
            "4",
            "--lr",
            "0.003",
            "--min-lr",
            "0.0003",
            "--weight-decay",
            "0.1",
            "--betas",
            "0.9,0.95",
            "--eps",
            "1e-8",
            "--warmup",
            "5",
            "--schedule",
            "cosine",
            "--grad-clip",
            "1",
            "--precision",
            "f64",
            "--device",
            "cpu",
            "--no-export",
            "--quiet",
            "-o",
        ])
        .arg(dir.path())
        .arg("--metrics")
        .arg(&csv);
    succeeds(&mut c);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("testdata/golden/train/reference.json")).unwrap(),
    )
    .unwrap();
    let want = &reference["runs"]["f64"];
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,loss,lr,grad_norm"));
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 50);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], i as f64);
        for (col, key) in [(1, "loss"), (2, "lr"), (3, "grad_norm")] {
            let w = want[key][i].as_f64().unwrap();
            assert!(
                (r[col] - w).abs() <= 1e-11 * w.abs(),
                "step {i} {key}: {} vs PyTorch {w}",
                r[col]
            );
        }
    }
    // The betas are two numbers.
    let mut bad = bitnet();
    bad.args(["train", "--betas", "0.9", "--data"])
        .arg(golden_rows());
    fails_with(&mut bad, "--betas takes two numbers");
    // Devices: a name it does not know, and CUDA in a build without it (the tests' build).
    let out = dir.path().join("d");
    fails_with(
        &mut train(&out, &["--device", "gpu"]),
        "expected cpu, cuda or cuda:N",
    );
    fails_with(
        &mut train(&out, &["--device", "cuda:1"]),
        "built without CUDA (build one with scripts/build-cuda.sh)",
    );
    fails_with(&mut train(&out, &["--tf32"]), "--tf32 is for --device cuda");
}

#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let parts = tmp.path().join("parts");
    let common = ["--steps", "8", "--no-export", "--checkpoint-every", "2"];
    succeeds(&mut train(&whole, &common));
    let mut first: Vec<&str> = common.to_vec();
    first.extend(["--stop-after", "3"]);
    let o = succeeds(&mut train(&parts, &first));
    assert!(
        stderr(&o).contains("stopped after step 3 of 8"),
        "{}",
        stderr(&o)
    );
    let mut again: Vec<&str> = common.to_vec();
    again.push("--resume");
    succeeds(&mut train(&parts, &again));
    let ck = |d: &Path| std::fs::read(d.join("checkpoint.safetensors")).unwrap();
    assert!(
        ck(&whole) == ck(&parts),
        "the resumed run's checkpoint differs"
    );
    let csv = |d: &Path| std::fs::read_to_string(d.join("metrics.csv")).unwrap();
    assert_eq!(csv(&whole), csv(&parts));
    assert_eq!(csv(&whole).lines().count(), 9);
}

/// Text data: a byte-level BPE is trained, documents are packed into rows and a share is held
/// out; the GGUF carries the tokenizer, so `bitnet run` generates from a text prompt.
#[test]
fn text_is_tokenized_packed_held_out_and_the_gguf_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
hidden_size = 128
intermediate_size = 256
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 64

[data]
text = ["{}"]
tokenizer_vocab = 400
seq_len = 32
heldout_fraction = 0.1

[train]
steps = 20
batch_size = 8
lr = 3e-3
warmup = 2

[eval]
every = 10

[export]
gguf_type = "I2_S"
"#,
            repo().join("testdata/text/*.txt").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = succeeds(&mut train_config(&cfg, &out));
    let err = stderr(&o);
    assert!(err.contains("held-out loss"), "{err}");
    let eval = std::fs::read_to_string(out.join("eval.csv")).unwrap();
    let losses: Vec<f64> = eval
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 2, "{eval}");
    assert!(
        losses[1] < (400f64).ln(),
        "held-out loss {losses:?} is no better than uniform"
    );
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(tok["model"]["type"], "BPE");
    // The end-of-text token reaches the GGUF, so generation can stop on it.
    let o = succeeds(bitnet().arg("inspect").arg(out.join("model.gguf")));
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(info.contains("eos <|endoftext|> (0)"), "{info}");
    generates(&out.join("model.gguf"), "The", 8);
}

/// Distillation from the real SmolLM2-135M-Instruct that the engine runs: text is tokenized with
/// the teacher's tokenizer (written to OUT/tokenizer.json and carried into the GGUF), the student
/// takes the teacher's vocabulary, the metrics carry both terms, the KL divergence to the teacher
/// falls, and a student whose vocabulary differs, or a teacher without a tokenizer for text, is a
/// clear error.
#[test]
fn distillation_from_smollm2_moves_the_student_toward_it() {
    let Some(teacher) = common::smollm2() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
max_position_embeddings = 64

[data]
text = ["{}"]
seq_len = 32
heldout_fraction = 0.1

[train]
steps = 12
batch_size = 4
lr = 1e-2
warmup = 2

[export]
gguf_type = "I2_S"

[distill]
teacher = "{}"
alpha = 0.9
"#,
            repo().join("testdata/text/*.txt").display(),
            teacher.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = succeeds(&mut train_config(&cfg, &out));
    let err = stderr(&o);
    assert!(
        err.contains("distilling from") && err.contains("vocab 49152"),
        "{err}"
    );
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
            .unwrap();
    assert!(
        tok["added_tokens"].to_string().contains("<|im_start|>"),
        "not SmolLM2's tokenizer"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = metrics.lines();
    assert_eq!(lines.next(), Some("step,loss,lr,grad_norm,ce,kl"));
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 12);
    for r in &rows {
        let mix = 0.9 * r[5] + 0.1 * r[4];
        assert!((r[1] - mix).abs() <= 1e-5 * r[1], "objective {r:?}");
    }
    let (first, last) = (rows[0][5], rows[11][5]);
    eprintln!("KL to SmolLM2: {first} -> {last}");
    assert!(last < 0.8 * first, "the KL did not fall: {first} -> {last}");
    generates(&out.join("model.gguf"), "To be", 4);
    // The tiny model's vocabulary (250) is not SmolLM2's.
    fails_with(
        train(&tmp.path().join("v"), &["--teacher"]).arg(&teacher),
        "the teacher's vocabulary has 49152 entries, the student's 250",
    );
    // A teacher with no tokenizer cannot tokenize text.
    fails_with(
        train_config(&cfg, &tmp.path().join("t"))
            .arg("--teacher")
            .arg(tiny_init()),
        "the teacher ships no tokenizer",
    );
    fails_with(
        train_config(&cfg, &tmp.path().join("a")).args(["--distill-alpha", "1.5"]),
        "distill.alpha must lie in [0, 1]",
    );
}

fn fails_with(cmd: &mut Command, needle: &str) {
    let o = cmd.output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{cmd:?} succeeded");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let run = |c: &Path| train_config(c, &tmp.path().join("o"));
    // An unknown key, named.
    let c = cfg(
        "typo.toml",
        "[train]\nlearning_rate = 1e-3\n[data]\nnpy = \"x.npy\"\n",
    );
    fails_with(&mut run(&c), "learning_rate");
    // Shapes that do not divide.
    let c = cfg(
        "shape.toml",
        "[model]\nhidden_size = 100\nnum_attention_heads = 3\n[data]\nnpy = \"x.npy\"\n",
    );
    fails_with(&mut run(&c), "not a multiple of num_attention_heads");
    let c = cfg(
        "batch.toml",
        "[train]\nbatch_size = 6\nmicro_batch_size = 4\n[data]\nnpy = \"x.npy\"\n",
    );
    fails_with(&mut run(&c), "not a multiple of micro_batch_size");
    // An empty corpus, and one that is not UTF-8.
    std::fs::write(tmp.path().join("empty.txt"), "  \n").unwrap();
    let c = cfg("empty.toml", "[data]\ntext = [\"empty.txt\"]\n");
    fails_with(&mut run(&c), "holds no text");
    std::fs::write(tmp.path().join("latin1.txt"), b"caf\xe9 au lait").unwrap();
    let c = cfg("latin1.toml", "[data]\ntext = [\"latin1.txt\"]\n");
    fails_with(&mut run(&c), "not UTF-8");
    // Data that is not token rows.
    std::fs::write(tmp.path().join("junk.npy"), b"not numpy").unwrap();
    let c = cfg("junk.toml", "[data]\nnpy = \"junk.npy\"\n");
    fails_with(&mut run(&c), "not a .npy file");

    // A checkpoint from another config is refused, and nothing is overwritten.
    let out = tmp.path().join("ck");
    succeeds(&mut train(&out, &["--steps", "2", "--no-export"]));
    let before = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    fails_with(
        &mut train(
            &out,
            &[
                "--steps",
                "4",
                "--no-export",
                "--resume",
                "--weight-decay",
                "0.5",
            ],
        ),
        "train.weight_decay was 0.1, is 0.5",
    );
    assert!(std::fs::read(out.join("checkpoint.safetensors")).unwrap() == before);
    // A full disk while checkpointing: the write fails clearly, the previous checkpoint
    // survives whole, and the run resumes from it.
    let bin = env!("CARGO_BIN_EXE_bitnet");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {}; exec '{bin}' train --init '{}' --data '{}' --batch-size 4 \
             --lr 3e-3 --warmup 2 --steps 4 --no-export --resume --quiet -o '{}'",
            before.len() / 1024 / 2,
            tiny_init().display(),
            golden_rows().display(),
            out.display()
        ))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "a checkpoint fit in half its size?");
    assert!(
        err.contains("File too large") && !err.contains("panicked"),
        "{err}"
    );
    assert!(std::fs::read(out.join("checkpoint.safetensors")).unwrap() == before);
    let leftovers = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0, "temporary files left behind");
    let o = succeeds(&mut train(
        &out,
        &["--steps", "4", "--no-export", "--resume"],
    ));
    assert!(
        stderr(&o).contains("resuming after step 2"),
        "{}",
        stderr(&o)
    );
}

/// The model `scripts/demo.sh` runs: ours, ternary (TQ2_0 linears), and it writes.
#[test]
fn the_demo_model_is_ternary_and_writes() {
    let m = repo().join("models/shakespeare-ternary.gguf");
    let o = succeeds(bitnet().arg("inspect").arg(&m));
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("bitnet-25") && info.contains("2.0625 bits/weight"),
        "{info}"
    );
    let o = succeeds(
        bitnet()
            .arg("run")
            .arg("-m")
            .arg(&m)
            .arg("-p")
            .arg("KING HENRY.\n")
            .arg("-n")
            .arg("24")
            .arg("--seed")
            .arg("1"),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let words = text.split_whitespace().count();
    assert!(words >= 8, "{text}");
}
