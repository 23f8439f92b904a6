//! Hugging Face BitNet directories converted to ternary GGUF load back and decode the same
//! greedy tokens as the directory itself.

#[path = "../../bitnet-formats/tests/common/mod.rs"]
mod common;

use common::repo_root as root;

use bitnet_formats::gguf::{GgmlType, GgufFile};
use bitnet_model::convert::{ConvertOptions, convert_hf_to_gguf};
use bitnet_model::generate::{GenerateOptions, generate};
use bitnet_model::load;

fn greedy(path: &std::path::Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let m = load(path).unwrap();
    let mut c = m.model.new_cache();
    let opts = GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    let g = generate(&m.model, None, prompt, &opts, &mut c, &mut |_| {}).unwrap();
    let logits = m.model.logits_all(prompt).unwrap().concat();
    (g.tokens, logits)
}

/// A packed (2B-4T layout) BitNet directory with random weights and shapes that fit TQ blocks.
fn synthetic_packed_dir(dir: &std::path::Path) {
    use bitnet_core::packed::hf;
    use safetensors::tensor::{Dtype, TensorView};
    let (h, inter, layers, heads, kv, vocab) =
        (256usize, 512usize, 2usize, 4usize, 2usize, 300usize);
    let hd = h / heads;
    let mut seed = 12345u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32s = |v: Vec<f32>| {
        v.into_iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    use bitnet_formats::names;
    tensors.push((
        names::EMBED.hf.into(),
        Dtype::F32,
        vec![vocab, h],
        f32s((0..vocab * h).map(|_| (rnd() - 0.5) * 2.0).collect()),
    ));
    tensors.push((
        names::OUTPUT_NORM.hf.into(),
        Dtype::F32,
        vec![h],
        f32s((0..h).map(|_| 1.0 + (rnd() - 0.5) * 0.2).collect()),
    ));
    let d = names::Dims {
        hidden: h,
        q: h,
        kv: kv * hd,
        inter,
    };
    for l in 0..layers {
        for t in names::LAYER {
            let shape = t.shape(&d);
            let Some(cols) = t.cols.map(|c| d.get(c)) else {
                let len = shape[0];
                tensors.push((
                    t.hf_weight(l),
                    Dtype::F32,
                    shape,
                    f32s((0..len).map(|_| 1.0 + (rnd() - 0.5) * 0.2).collect()),
                ));
                continue;
            };
            let rows = d.get(t.rows);
            let codes: Vec<i8> = (0..rows * cols).map(|_| (rnd() * 3.0) as i8 - 1).collect();
            tensors.push((
                t.hf_weight(l),
                Dtype::U8,
                vec![rows / 4, cols],
                hf::pack(&codes, rows, cols).unwrap(),
            ));
            // BitLinear divides by weight_scale: 1 / mean|W| for weights of mean magnitude ~0.03.
            tensors.push((
                format!("{}_scale", t.hf_weight(l)),
                Dtype::F32,
                vec![1],
                f32s(vec![30.0 + rnd() * 10.0]),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({"model_type": "bitnet", "architectures": ["BitNetForCausalLM"], "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "relu2", "tie_word_embeddings": true,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn converted_gguf_decodes_like_the_directory() {
    let prompt = [17u32, 42, 99, 5, 120, 7, 64, 3];
    let tmp = tempfile::tempdir().unwrap();
    let synth = tmp.path().join("synthetic");
    std::fs::create_dir(&synth).unwrap();
    synthetic_packed_dir(&synth);
    for name in [
        "tiny-bitnet-a-packed",
        "tiny-bitnet-a-float",
        "tiny-bitnet-b-packed",
        "synthetic",
    ] {
        let src = if name == "synthetic" {
            synth.clone()
        } else {
            root().join("testdata/models").join(name)
        };
        let (want, want_logits) = greedy(&src, &prompt, 12);
        let types: &[GgmlType] = if name == "synthetic" {
            &[GgmlType::TQ2_0, GgmlType::TQ1_0, GgmlType::I2_S]
        } else {
            &[GgmlType::I2_S]
        };
        if name != "synthetic" {
            // Rows of 64 / 96 weights are not whole TQ blocks of 256: refused, clearly.
            let e = convert_hf_to_gguf(
                &src,
                &tmp.path().join("x.gguf"),
                &ConvertOptions::default(),
                &mut |_, _, _| {},
            )
            .unwrap_err();
            assert!(e.to_string().contains("multiple of 256"), "{e}");
            assert!(!tmp.path().join("x.gguf").exists());
        }
        for &ty in types {
            for float in [GgmlType::F32, GgmlType::F16] {
                let out = tmp.path().join(format!("{name}-{ty}-{float}.gguf"));
                let mut calls = 0;
                let r = convert_hf_to_gguf(
                    &src,
                    &out,
                    &ConvertOptions {
                        ternary: ty,
                        float_type: float,
                        ..Default::default()
                    },
                    &mut |_, _, _| calls += 1,
                )
                .unwrap();
                assert_eq!(calls, r.tensors.len());
                assert_eq!(r.bytes_written, std::fs::metadata(&out).unwrap().len());
                let f = GgufFile::open(&out).unwrap();
                assert_eq!(f.header.architecture(), "bitnet-25");
                let linears = f.header.tensors.iter().filter(|t| t.ty == ty).count();
                let layers = if name.contains("-b-") { 3 } else { 2 };
                assert_eq!(linears, 7 * layers, "{name} {ty}");
                let (got, logits) = greedy(&out, &prompt, 12);
                let max = want_logits
                    .iter()
                    .zip(&logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                eprintln!(
                    "{name} -> {ty} (+{float} embeddings): max logit change {max:.3e}, greedy {}",
                    if got == want { "same" } else { "DIFFERENT" }
                );
                // The GGUF holds Q/K rows permuted for pairwise RoPE, so attention sums its dot
                // products in another order; TQ scales round to f16 and F16 embeddings drop 13
                // mantissa bits. Any of these can flip an int8 activation code, which moves these
                // tiny models' logits by up to ~0.25 (transformers' own float/packed forms differ
                // by 0.12 for the same reason). The file is held to the greedy tokens, and the
                // logits to moving by less than 10% of their largest magnitude (0.12 / 7.4 = 1.6%
                // for transformers' own pair).
                let scale = want_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    max < 0.10 * scale,
                    "{name} {ty} {float}: logits moved by {max} (largest logit {scale})"
                );
                assert_eq!(got, want, "{name} {ty} {float}: greedy tokens");
            }
        }
    }
}

/// Between ternary dialects the codes survive exactly, and the scales change only where a
/// format rounds them (TQ types store f16): TQ2_0 → I2_S → TQ2_0 and TQ1_0 → TQ2_0 → TQ1_0
/// give back the same bytes, a directory converted straight to TQ2_0 equals one converted
/// through I2_S, and `verify` passes on every output and catches a changed byte.
#[test]
fn dialects_convert_losslessly_and_verify() {
    use bitnet_model::convert::{convert_gguf_to_gguf, verify};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("synthetic");
    std::fs::create_dir(&src).unwrap();
    synthetic_packed_dir(&src);
    let p = |n: &str| tmp.path().join(n);
    let hf = |ty, out: &str| {
        let o = ConvertOptions {
            ternary: ty,
            float_type: GgmlType::F16,
            ..Default::default()
        };
        convert_hf_to_gguf(&src, &p(out), &o, &mut |_, _, _| {}).unwrap();
        let v = verify(&src, &p(out)).unwrap();
        assert_eq!(v.ternary, 14, "{out}");
    };
    let gg = |from: &str, ty, out: &str| {
        let o = ConvertOptions {
            ternary: ty,
            float_type: GgmlType::F16,
            ..Default::default()
        };
        let mut last = (0, 0);
        let r = convert_gguf_to_gguf(&p(from), &p(out), &o, true, &mut |d, t, _| last = (d, t))
            .unwrap();
        // Progress counts bytes and ends at the total.
        assert!(last.0 == last.1 && last.1 > 0, "{last:?}");
        assert_eq!(
            r.tensors.len(),
            GgufFile::open(p(from)).unwrap().header.tensors.len()
        );
        verify(&p(from), &p(out)).unwrap();
    };
    let bytes = |n: &str| std::fs::read(p(n)).unwrap();
    hf(GgmlType::TQ2_0, "a.tq2.gguf");
    hf(GgmlType::I2_S, "a.i2s.gguf");
    hf(GgmlType::TQ1_0, "a.tq1.gguf");
    gg("a.tq2.gguf", GgmlType::I2_S, "b.i2s.gguf");
    gg("b.i2s.gguf", GgmlType::TQ2_0, "b.tq2.gguf");
    assert!(
        bytes("b.tq2.gguf") == bytes("a.tq2.gguf"),
        "TQ2_0 -> I2_S -> TQ2_0"
    );
    gg("a.i2s.gguf", GgmlType::TQ2_0, "c.tq2.gguf");
    assert!(
        bytes("c.tq2.gguf") == bytes("a.tq2.gguf"),
        "HF -> I2_S -> TQ2_0"
    );
    gg("a.tq1.gguf", GgmlType::TQ2_0, "d.tq2.gguf");
    gg("d.tq2.gguf", GgmlType::TQ1_0, "d.tq1.gguf");
    assert!(
        bytes("d.tq1.gguf") == bytes("a.tq1.gguf"),
        "TQ1_0 -> TQ2_0 -> TQ1_0"
    );
    // Same greedy tokens from every file.
    let prompt = [5u32, 77, 13, 200];
    let (want, _) = greedy(&src, &prompt, 8);
    for f in ["b.i2s.gguf", "c.tq2.gguf", "d.tq1.gguf"] {
        assert_eq!(greedy(&p(f), &prompt, 8).0, want, "{f}");
    }
    // A flipped byte in a ternary tensor's codes is caught.
    let f = GgufFile::open(p("c.tq2.gguf")).unwrap();
    let t = f.tensor("blk.1.ffn_up.weight").unwrap();
    let at = (f.header.data_offset + t.offset) as usize + 3;
    drop(f);
    let mut b = bytes("c.tq2.gguf");
    b[at] ^= 0x01;
    std::fs::write(p("bad.gguf"), &b).unwrap();
    let e = verify(&p("a.i2s.gguf"), &p("bad.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("code"),
        "{e}"
    );
    let e = verify(&src, &p("bad.gguf")).unwrap_err().to_string();
    assert!(e.contains("blk.1.ffn_up.weight"), "{e}");
}

/// TQ2_0 and TQ1_0 files written from a transformers-made float-master directory read back in
/// the PyPI `gguf` package to transformers' ternarized weights (compiled `WeightQuant`, from
/// `make_model_golden.py` part C): the same codes, and values within the f16 rounding of the
/// stored scale. Our engine decodes the same greedy tokens from each file as from the directory.
#[test]
fn tq_files_read_back_in_gguf_py_as_transformers_ternarized_them() {
    let Some(py) = common::python() else { return };
    let src = root().join("testdata/models/tiny-bitnet-c-float");
    let gold = root().join("testdata/golden/models/tiny-bitnet-c-ternary.npz");
    let tmp = tempfile::tempdir().unwrap();
    let prompt = [3u32, 50, 100, 7, 64];
    let (want, _) = greedy(&src, &prompt, 10);
    for ty in [GgmlType::TQ2_0, GgmlType::TQ1_0] {
        let out = tmp.path().join(format!("c.{ty}.gguf"));
        let o = ConvertOptions {
            ternary: ty,
            float_type: GgmlType::F16,
            ..Default::default()
        };
        convert_hf_to_gguf(&src, &out, &o, &mut |_, _, _| {}).unwrap();
        let run = std::process::Command::new(&py)
            .arg(root().join("scripts/golden/tq_readback.py"))
            .arg(&out)
            .arg(&gold)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let m = v.as_object().unwrap();
        assert_eq!(m.len(), 7, "{v}");
        for (name, r) in m {
            assert_eq!(r["type"], ty.name(), "{name}");
            assert_eq!(
                r["codes_equal"], true,
                "{ty} {name}: codes differ from transformers'"
            );
            let rel = r["max_rel"].as_f64().unwrap();
            assert!(rel <= 2f64.powi(-11), "{ty} {name}: value off by {rel:e}");
            assert!(r["nonzero"].as_u64().unwrap() > 1000, "{name}");
        }
        assert_eq!(greedy(&out, &prompt, 10).0, want, "{ty}: greedy tokens");
    }
}

/// ONNX exports of tiny-bitnet-c load and convert exactly like the safetensors directory they
/// came from: the same GGUF bytes, the same greedy tokens. Two exporters:
/// - `scripts/golden/make_onnx_model.py`: torch.onnx's TorchScript exporter, every Linear weight
///   stored transposed under a generated name (`onnx::MatMul_123`), named by the node path;
/// - `scripts/golden/make_onnx_dynamo_model.py`: the dynamo exporter (the default since torch 2.9),
///   weights folded into `val_N` initializers named only in the metadata, the tied embedding
///   exported once as `lm_head.weight`.
#[test]
fn onnx_exports_convert_like_their_safetensors() {
    let st = root().join("testdata/models/tiny-bitnet-c-float");
    let tmp = tempfile::tempdir().unwrap();
    for (dir, generated) in [
        ("tiny-bitnet-c-onnx", "onnx::MatMul"),
        ("tiny-bitnet-c-onnx-dynamo", "val_"),
    ] {
        let onnx = root().join("testdata/models").join(dir);
        let m = bitnet_formats::onnx::OnnxModel::open(onnx.join("model.onnx")).unwrap();
        let transposed = m
            .initializers
            .iter()
            .filter(|t| t.name.starts_with(generated) && t.dims.len() == 2)
            .count();
        // The 7 linears (the TorchScript export also stores the tied head transposed).
        assert!(
            transposed >= 7,
            "{dir}: {transposed} transposed MatMul weights"
        );
        assert!(
            m.initializers.iter().any(|t| t.file == 1),
            "{dir}: external data"
        );
        let set = m.to_safetensors_set().unwrap();
        for lin in bitnet_formats::names::LINEARS {
            assert!(
                set.get(&lin.hf_weight(0)).is_some(),
                "{dir}: {}",
                lin.hf_weight(0)
            );
        }
        for ty in [GgmlType::TQ2_0, GgmlType::I2_S] {
            let o = ConvertOptions {
                ternary: ty,
                float_type: GgmlType::F16,
                ..Default::default()
            };
            let (a, b) = (tmp.path().join("a.gguf"), tmp.path().join("b.gguf"));
            convert_hf_to_gguf(&onnx, &a, &o, &mut |_, _, _| {}).unwrap();
            convert_hf_to_gguf(&st, &b, &o, &mut |_, _, _| {}).unwrap();
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{dir} {ty}: ONNX and safetensors conversions differ"
            );
        }
        let prompt = [3u32, 50, 100, 7];
        assert_eq!(
            greedy(&onnx, &prompt, 8).0,
            greedy(&st, &prompt, 8).0,
            "{dir}"
        );
    }
}
