//! Hugging Face model directories: config.json, single and sharded safetensors, lying headers.

use bitnet_formats::FormatError;
use bitnet_formats::safetensors_dir::{HfModelDir, SafetensorsSet};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

const CONFIG: &str = r#"{"model_type": "bitnet", "hidden_size": 8, "intermediate_size": 16,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10,
  "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
  "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}}"#;

fn write_st(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, _, s), b)| {
            (
                n.to_string(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn single_and_sharded() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), CONFIG).unwrap();
    write_st(
        &d.path().join("model.safetensors"),
        &[
            ("a", vec![1.0, 2.0], vec![2]),
            ("b", vec![3.0; 4], vec![2, 2]),
        ],
    );
    let m = HfModelDir::open(d.path()).unwrap();
    assert!(m.config.is_bitnet());
    assert_eq!(m.config.rope_theta(), 500000.0);
    assert_eq!(m.config.num_kv_heads(), 1);
    assert_eq!(m.weights.to_f32("a").unwrap(), [1.0, 2.0]);
    assert_eq!(m.weights.get("b").unwrap().shape, [2, 2]);

    let s = tempfile::tempdir().unwrap();
    std::fs::write(s.path().join("config.json"), CONFIG).unwrap();
    write_st(
        &s.path().join("model-00001-of-00002.safetensors"),
        &[("a", vec![1.0, 2.0], vec![2])],
    );
    write_st(
        &s.path().join("model-00002-of-00002.safetensors"),
        &[("b", vec![5.0], vec![1])],
    );
    std::fs::write(
        s.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let m = HfModelDir::open(s.path()).unwrap();
    assert_eq!(m.weights.shard_paths().len(), 2);
    assert_eq!(m.weights.to_f32("b").unwrap(), [5.0]);
    assert_eq!(m.weights.get("b").unwrap().shard, 1);
}

#[test]
fn broken_directories() {
    let d = tempfile::tempdir().unwrap();
    let e = HfModelDir::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("no config.json"), "{e}");
    std::fs::write(d.path().join("config.json"), CONFIG).unwrap();
    let e = HfModelDir::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("no *.safetensors"), "{e}");
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let e = HfModelDir::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("not a plain file name"), "{e}");
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "gone.safetensors"}}"#,
    )
    .unwrap();
    let e = HfModelDir::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::write(d.path().join("model.safetensors.index.json"), "{").unwrap();
    assert!(matches!(
        HfModelDir::open(d.path()),
        Err(FormatError::Json { .. })
    ));
}

fn st_with_header(header: &str, data: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.resize(b.len() + data, 0);
    b
}

#[test]
fn lying_safetensors_headers() {
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", vec![]),
        ("header longer than file", {
            let mut b = (1u64 << 40).to_le_bytes().to_vec();
            b.extend(b"{}");
            b
        }),
        ("not json", st_with_header("{not json", 0)),
        (
            "offsets past the end",
            st_with_header(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
            ),
        ),
        (
            "size disagrees with shape",
            st_with_header(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
                12,
            ),
        ),
        (
            "overlapping tensors",
            st_with_header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
        ),
        (
            "shape overflow",
            st_with_header(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
                16,
            ),
        ),
        ("invalid utf-8", {
            let h = b"{\"\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend(h);
            b.extend([0; 4]);
            b
        }),
    ];
    for (what, bytes) in cases {
        let p = d.path().join("x.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let r = SafetensorsSet::open(&[p]);
        assert!(
            matches!(r, Err(FormatError::Safetensors { .. })),
            "{what}: {r:?}"
        );
    }
}
