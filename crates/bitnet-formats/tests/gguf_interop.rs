//! Interop with the PyPI `gguf` package (gguf-py 0.19), both ways:
//! files it wrote (`testdata/golden/gguf/`) read here to the values it reports, and files written
//! here read back there (through `scripts/golden/gguf_check.py`) to the values we report.

mod common;

use bitnet_core::f16;
use bitnet_core::packed::{tq1, tq2};
use bitnet_formats::gguf::{
    GgmlType, GgufFile, GgufWriter, MetaValue, TensorData, ValueType, array, quantize_q8_0,
};
use bitnet_formats::safetensors_dir::SafetensorsSet;
use serde_json::{Value, json};

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "UINT8",
        ValueType::I8 => "INT8",
        ValueType::U16 => "UINT16",
        ValueType::I16 => "INT16",
        ValueType::U32 => "UINT32",
        ValueType::I32 => "INT32",
        ValueType::F32 => "FLOAT32",
        ValueType::Bool => "BOOL",
        ValueType::String => "STRING",
        ValueType::Array => "ARRAY",
        ValueType::U64 => "UINT64",
        ValueType::I64 => "INT64",
        ValueType::F64 => "FLOAT64",
    }
}

/// The typed JSON form `make_golden.py` writes.
fn typed(v: &MetaValue, top: bool) -> Value {
    let mut o = serde_json::Map::new();
    if top {
        o.insert("type".into(), json!(type_name(v.value_type())));
    }
    match v {
        MetaValue::Array(elem, items) => {
            o.insert("element_type".into(), json!(type_name(*elem)));
            let vals = items
                .iter()
                .map(|i| {
                    if matches!(i, MetaValue::Array(..)) {
                        typed(i, false)
                    } else {
                        i.to_json()
                    }
                })
                .collect();
            o.insert("value".into(), Value::Array(vals));
        }
        other => {
            o.insert("value".into(), other.to_json());
        }
    }
    Value::Object(o)
}

#[test]
fn reads_files_gguf_py_wrote() {
    let f = GgufFile::open(common::golden("gguf/py_written.gguf")).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden("gguf/py_written.expected.json")).unwrap(),
    )
    .unwrap();
    let values =
        SafetensorsSet::open(&[common::golden("gguf/py_written.expected.safetensors")]).unwrap();
    let h = &f.header;
    assert_eq!(u64::from(h.version), expected["version"].as_u64().unwrap());
    assert_eq!(h.alignment, expected["alignment"].as_u64().unwrap());
    assert_eq!(h.data_offset, expected["data_offset"].as_u64().unwrap());

    let meta = expected["metadata"].as_object().unwrap();
    assert_eq!(h.metadata.len(), meta.len());
    for (k, want) in meta {
        let got = h.get(k).unwrap_or_else(|| panic!("metadata {k} missing"));
        assert_eq!(&typed(got, true), want, "metadata {k}");
    }
    let keys: Vec<&str> = h.metadata.iter().map(|(k, _)| k.as_str()).collect();
    let want_keys: Vec<&str> = expected["metadata_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(keys, want_keys, "metadata order");

    let tensors = expected["tensors"].as_array().unwrap();
    assert_eq!(h.tensors.len(), tensors.len());
    let mut types_seen = std::collections::BTreeSet::new();
    for (t, want) in h.tensors.iter().zip(tensors) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), want["type"].as_str().unwrap(), "{}", t.name);
        assert_eq!(u64::from(t.ty.id()), want["type_id"].as_u64().unwrap());
        let shape: Vec<u64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, shape, "{}", t.name);
        assert_eq!(t.offset, want["offset"].as_u64().unwrap());
        assert_eq!(t.nbytes, want["nbytes"].as_u64().unwrap());
        let ours = f.dequantize(&t.name).unwrap();
        let theirs = values.to_f32(&t.name).unwrap();
        assert_eq!(ours.len(), theirs.len());
        let diff = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            diff, 0,
            "{} ({}): {diff} values differ from gguf-py's dequantize",
            t.name, t.ty
        );
        types_seen.insert(t.ty.name());
    }
    for ty in [
        "TQ1_0", "TQ2_0", "Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32",
    ] {
        assert!(types_seen.contains(ty), "golden file lacks {ty}");
    }
}

/// A small deterministic generator (no dependency needed for test data).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn f32(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }
}

#[test]
fn files_written_here_read_back_in_gguf_py() {
    let Some(python) = common::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    let mut rng = Lcg(7);
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("ours.u8", 200u8)
        .set("ours.i8", -7i8)
        .set("ours.u16", 65535u16)
        .set("ours.i16", -32768i16)
        .set("ours.u32", 4_000_000_000u32)
        .set("ours.i32", i32::MIN)
        .set("ours.f32", 0.1f32)
        .set("ours.bool", false)
        .set("ours.str", "ünïcode ✓ 🤗")
        .set("ours.str_empty", "")
        .set("ours.u64", u64::MAX)
        .set("ours.i64", i64::MIN)
        .set("ours.f64", 1e300)
        .set("ours.arr_str", array(ValueType::String, ["a", "", "日本"]))
        .set("ours.arr_f32", array(ValueType::F32, [0.5f32, -1.25]))
        .set("ours.arr_bool", array(ValueType::Bool, [true, false]))
        .set(
            "ours.arr_nested",
            MetaValue::Array(
                ValueType::Array,
                vec![
                    array(ValueType::I32, [1i32, 2]),
                    array(ValueType::I32, [3i32]),
                ],
            ),
        );
    let n = 1024usize;
    let normal: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let codes: Vec<i8> = (0..n).map(|_| (rng.next() % 3) as i8 - 1).collect();
    let scales: Vec<f16> = (0..n / 256)
        .map(|i| f16::from_f32(0.01 * (i + 1) as f32))
        .collect();
    let random_blocks = |rng: &mut Lcg, block: usize, scales: usize| -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..n / 32 {
            for _ in 0..scales {
                b.extend(f16::from_f32(rng.f32() * 0.1).to_le_bytes());
            }
            b.extend((0..block - 2 * scales).map(|_| rng.next() as u8));
        }
        b
    };
    let dims = [256u64, 4];
    let f32b: Vec<u8> = normal.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16b: Vec<u8> = normal
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16b: Vec<u8> = normal
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let tensors: Vec<(&str, GgmlType, Vec<u8>)> = vec![
        ("f32", GgmlType::F32, f32b),
        ("f16", GgmlType::F16, f16b),
        ("bf16", GgmlType::BF16, bf16b),
        ("q8_0", GgmlType::Q8_0, quantize_q8_0(&normal).unwrap()),
        ("q4_0", GgmlType::Q4_0, random_blocks(&mut rng, 18, 1)),
        ("q4_1", GgmlType::Q4_1, random_blocks(&mut rng, 20, 2)),
        (
            "tq2_0",
            GgmlType::TQ2_0,
            tq2::pack(&codes, &scales).unwrap(),
        ),
        (
            "tq1_0",
            GgmlType::TQ1_0,
            tq1::pack(&codes, &scales).unwrap(),
        ),
    ];
    for (name, ty, bytes) in &tensors {
        w.add_tensor(*name, *ty, &dims, TensorData::Bytes(bytes.clone().into()))
            .unwrap();
    }
    w.write_to_path(&path).unwrap();

    // What we report, handed to gguf-py to confirm.
    let f = GgufFile::open(&path).unwrap();
    let mut meta = serde_json::Map::new();
    for (k, v) in &f.header.metadata {
        meta.insert(k.clone(), typed(v, true));
    }
    let mut tens = serde_json::Map::new();
    for t in &f.header.tensors {
        let vals = f.dequantize(&t.name).unwrap();
        tens.insert(t.name.clone(), json!({"type": t.ty.name(), "shape": t.dims, "offset": t.offset, "nbytes": t.nbytes, "values": vals}));
    }
    let expected = json!({"version": 3, "alignment": 32, "metadata": meta, "tensors": tens,
                          "tensor_order": tensors.iter().map(|t| t.0).collect::<Vec<_>>()});
    let check = |expected: &Value| {
        let exp_path = dir.path().join("expected.json");
        std::fs::write(&exp_path, expected.to_string()).unwrap();
        let out = std::process::Command::new(&python)
            .arg(common::repo_root().join("scripts/golden/gguf_check.py"))
            .arg(&path)
            .arg(&exp_path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = check(&expected);
    assert_eq!(
        code,
        Some(0),
        "gguf-py disagrees with what we wrote:\n{text}"
    );
    // The checker is not a rubber stamp: one value off by one ulp is caught.
    let mut wrong = expected.clone();
    let v = wrong["tensors"]["tq1_0"]["values"][5].as_f64().unwrap() as f32;
    wrong["tensors"]["tq1_0"]["values"][5] = json!(f32::from_bits(v.to_bits() + 1));
    let (code, _) = check(&wrong);
    assert_eq!(code, Some(1), "a perturbed value was not detected");
}

#[test]
fn q8_0_quantization_matches_gguf_py() {
    // The golden q8_0 tensor came from gguf.quants.quantize on float data; re-quantizing its
    // dequantized values must give back exactly its blocks.
    let f = GgufFile::open(common::golden("gguf/py_written.gguf")).unwrap();
    let t = f.tensor("q8_0").unwrap();
    let vals = f.dequantize("q8_0").unwrap();
    assert_eq!(quantize_q8_0(&vals).unwrap(), f.tensor_bytes(t));
}
