//! Ternary weight and int8 activation quantization equal Hugging Face transformers bit for bit.
//! Golden files: `scripts/golden/make_golden.py` (pinned versions) → `testdata/golden/quant/`.

mod common;

use bitnet_core::quant::{Granularity, quantize_activations, ternarize_with};
use bitnet_core::reduce::TorchReduce;
use bitnet_formats::safetensors_dir::{Dtype, SafetensorsSet};
use std::collections::BTreeSet;

fn cases(set: &SafetensorsSet) -> BTreeSet<String> {
    set.tensors()
        .iter()
        .filter_map(|t| t.name.split_once('.').map(|(c, _)| c.to_string()))
        .collect()
}

fn i8s(set: &SafetensorsSet, name: &str) -> Vec<i8> {
    let t = set.get(name).unwrap_or_else(|| panic!("{name} missing"));
    set.bytes(t).iter().map(|&b| b as i8).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
fn meta(set: &SafetensorsSet, key: &str) -> usize {
    let meta = set.metadata[0]
        .as_ref()
        .expect("golden files carry metadata");
    meta.get(key)
        .unwrap_or_else(|| panic!("{key} not recorded"))
        .parse()
        .unwrap()
}

/// Equal as transformers' outputs are compared: NaN equals NaN. `-0.0 == 0.0` too, because the
/// int8 codes cannot carry the sign of a weight that rounds to zero (torch's `round` keeps it).
fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

/// Eager PyTorch (`scale`, `codes`, `dequant_eager`) and the `@torch.compile`d function
/// transformers actually runs (`scale_compiled`, `codes_compiled`, `dequant` = the real
/// `WeightQuant.apply(w)` output), each reproduced with its own summation order.
#[test]
fn weights_match_transformers_weightquant() {
    for file in ["weights", "weights_bf16"] {
        weights_file(file);
    }
}

/// Our f32 output rounded to the golden tensor's dtype (transformers casts back with `.to(dtype)`).
fn as_stored(set: &SafetensorsSet, name: &str, ours: Vec<f32>) -> Vec<f32> {
    match set.get(name).unwrap().dtype {
        Dtype::BF16 => ours
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect(),
        _ => ours,
    }
}

fn weights_file(file: &str) {
    let set =
        SafetensorsSet::open(&[common::golden(&format!("quant/{file}.safetensors"))]).unwrap();
    let eager = TorchReduce::Aten {
        threads: meta(&set, "torch_threads"),
    };
    let compiled = TorchReduce::Inductor {
        lanes: meta(&set, "inductor_f32_lanes"),
    };
    let cases = cases(&set);
    assert!(
        cases.len() >= 2,
        "expected the full golden set, found {cases:?}"
    );
    let mut scales_differ = 0;
    for c in &cases {
        let w = set.to_f32(&format!("{c}.w")).unwrap();
        let shape = &set.get(&format!("{c}.w")).unwrap().shape;
        let (rows, cols) = (shape[0], shape[1]);
        for (reduce, sfx, dq) in [
            (eager, "", "dequant_eager"),
            (compiled, "_compiled", "dequant"),
        ] {
            let t = ternarize_with(&w, rows, cols, Granularity::PerTensor, reduce).unwrap();
            let scale = set.to_f32(&format!("{c}.scale{sfx}")).unwrap();
            assert_eq!(
                t.scales[0].to_bits(),
                scale[0].to_bits(),
                "{c} {shape:?} {reduce:?}: scale {} vs transformers {}",
                t.scales[0],
                scale[0]
            );
            let codes = i8s(&set, &format!("{c}.codes{sfx}"));
            let diff = t.codes.iter().zip(&codes).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{c} {shape:?} {reduce:?}: {diff} codes differ");
            let want = set.to_f32(&format!("{c}.{dq}")).unwrap();
            let ours = as_stored(&set, &format!("{c}.{dq}"), t.dequantize_torch());
            assert!(
                same(&ours, &want),
                "{c} {reduce:?}: dequantized weights differ"
            );
        }
        scales_differ += usize::from(
            set.to_f32(&format!("{c}.scale")).unwrap()
                != set.to_f32(&format!("{c}.scale_compiled")).unwrap(),
        );
    }
    // The two orders really are different on these cases: the test could tell them apart.
    if file == "weights" {
        assert!(
            cases.len() >= 8,
            "expected the full golden set, found {cases:?}"
        );
        assert!(
            scales_differ >= 3,
            "only {scales_differ} cases separate eager from compiled"
        );
    }
}

#[test]
fn activations_match_transformers_actquant() {
    for (file, min_cases) in [("activations", 6), ("activations_bf16", 2)] {
        activations_file(file, min_cases);
    }
}

fn activations_file(file: &str, min_cases: usize) {
    let set =
        SafetensorsSet::open(&[common::golden(&format!("quant/{file}.safetensors"))]).unwrap();
    let cases = cases(&set);
    assert!(
        cases.len() >= min_cases,
        "expected the full golden set, found {cases:?}"
    );
    for c in &cases {
        let x = set.to_f32(&format!("{c}.x")).unwrap();
        let shape = &set.get(&format!("{c}.x")).unwrap().shape;
        let (rows, cols) = (shape[0], shape[1]);
        let a = quantize_activations(&x, rows, cols).unwrap();
        let scale = set.to_f32(&format!("{c}.scale")).unwrap();
        assert_eq!(
            bits(&a.scales),
            bits(&scale),
            "{c} {shape:?}: scales differ"
        );
        assert_eq!(
            a.codes,
            i8s(&set, &format!("{c}.codes")),
            "{c}: codes differ"
        );
        let dq = set.to_f32(&format!("{c}.dequant")).unwrap();
        let ours = as_stored(&set, &format!("{c}.dequant"), a.dequantize());
        assert!(same(&ours, &dq), "{c}: dequantized activations differ");
    }
}
