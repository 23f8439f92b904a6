//! GGUF written here reads back here: every metadata type, arrays, alignment, every tensor type
//! we can produce, mmapped zero-copy views.

use bitnet_core::f16;
use bitnet_core::packed::{i2s, tq1, tq2};
use bitnet_formats::gguf::{
    Dialect, GgmlType, GgufFile, GgufHeader, GgufWriter, MetaValue, TensorData, ValueType, array,
    dequantize,
};

fn all_types_writer() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("t.u8", 200u8)
        .set("t.i8", -100i8)
        .set("t.u16", 60000u16)
        .set("t.i16", -30000i16)
        .set("t.u32", 4_000_000_000u32)
        .set("t.i32", -2_000_000_000i32)
        .set("t.f32", 1.5f32)
        .set("t.bool", true)
        .set("t.str", "héllo wörld ✓")
        .set("t.u64", u64::MAX)
        .set("t.i64", i64::MIN)
        .set("t.f64", -2.25f64)
        .set("t.arr_i32", array(ValueType::I32, [1i32, -2, 3]))
        .set("t.arr_str", array(ValueType::String, ["a", "", "ü"]))
        .set("t.arr_empty", MetaValue::Array(ValueType::F32, vec![]))
        .set(
            "t.arr_nested",
            MetaValue::Array(
                ValueType::Array,
                vec![array(ValueType::U8, [1u8, 2]), array(ValueType::U8, [3u8])],
            ),
        );
    w
}

#[test]
fn metadata_of_every_type_roundtrips() {
    let w = all_types_writer();
    let expected: Vec<(String, MetaValue)> = {
        let mut bytes = Vec::new();
        all_types_writer().write_to(&mut bytes).unwrap();
        GgufHeader::parse(&bytes).unwrap().metadata
    };
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let h = GgufHeader::parse(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.metadata, expected);
    assert_eq!(h.get("t.u64"), Some(&MetaValue::U64(u64::MAX)));
    assert_eq!(h.get("t.i64"), Some(&MetaValue::I64(i64::MIN)));
    assert_eq!(h.get_str("t.str"), Some("héllo wörld ✓"));
    assert_eq!(h.get("t.bool").and_then(MetaValue::as_bool), Some(true));
    assert_eq!(
        h.get("t.arr_nested")
            .and_then(MetaValue::as_array)
            .map(<[_]>::len),
        Some(2)
    );
    assert_eq!(
        h.get("t.arr_empty"),
        Some(&MetaValue::Array(ValueType::F32, vec![]))
    );
    assert_eq!(h.metadata.len(), 17);
}

#[test]
fn tensors_roundtrip_through_a_mapped_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let codes: Vec<i8> = (0..1024).map(|i| ((i * 7) % 3) as i8 - 1).collect();
    let d = vec![f16::from_f32(0.5); 4];
    let tq2b = tq2::pack(&codes, &d).unwrap();
    let tq1b = tq1::pack(&codes, &d).unwrap();
    let i2b = i2s::pack(&codes, 0.25).unwrap();
    let f16b: Vec<u8> = (0..6)
        .flat_map(|i| f16::from_f32(i as f32 - 2.5).to_le_bytes())
        .collect();
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.alignment", 64u32);
    w.add_f32("a", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        .unwrap();
    w.add_tensor("h", GgmlType::F16, &[6], TensorData::Bytes(f16b.into()))
        .unwrap();
    w.add_tensor(
        "t2",
        GgmlType::TQ2_0,
        &[512, 2],
        TensorData::Bytes(tq2b.clone().into()),
    )
    .unwrap();
    w.add_tensor(
        "t1",
        GgmlType::TQ1_0,
        &[256, 4],
        TensorData::Bytes(tq1b.clone().into()),
    )
    .unwrap();
    let streamed = tq2b.clone();
    w.add_tensor(
        "s",
        GgmlType::TQ2_0,
        &[1024],
        TensorData::Stream(Box::new(move |out| {
            out.write_all(&streamed)
                .map_err(|e| bitnet_formats::FormatError::Io {
                    path: "x".into(),
                    source: e,
                })
        })),
    )
    .unwrap();
    w.write_to_path(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.header.alignment, 64);
    assert_eq!(f.header.dialect, Dialect::Upstream);
    for t in &f.header.tensors {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    assert_eq!(f.dequantize("a").unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(f.tensor("a").unwrap().shape(), [2, 3]);
    assert_eq!(
        f.dequantize("h").unwrap(),
        [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    );
    let expect: Vec<f32> = codes.iter().map(|&c| f32::from(c) * 0.5).collect();
    assert_eq!(f.dequantize("t2").unwrap(), expect);
    assert_eq!(f.dequantize("t1").unwrap(), expect);
    assert_eq!(f.dequantize("s").unwrap(), expect);
    assert_eq!(f.tensor_bytes(f.tensor("t2").unwrap()), &tq2b[..]);
    assert!(f.dequantize("nope").is_err());

    // bitnet.cpp's I2_S under a bitnet architecture is read in its dialect.
    let path2 = dir.path().join("b.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", "bitnet-b1.58");
    w.add_tensor(
        "w",
        GgmlType::I2_S,
        &[256, 4],
        TensorData::Bytes(i2b.into()),
    )
    .unwrap();
    w.write_to_path(&path2).unwrap();
    let f = GgufFile::open(&path2).unwrap();
    assert_eq!(f.header.dialect, Dialect::BitnetCpp);
    let expect: Vec<f32> = codes.iter().map(|&c| f32::from(c) * 0.25).collect();
    assert_eq!(f.dequantize("w").unwrap(), expect);
}

#[test]
fn writer_refuses_inconsistent_tensors() {
    let mut w = GgufWriter::new();
    assert!(
        w.add_tensor(
            "x",
            GgmlType::TQ2_0,
            &[100],
            TensorData::Bytes(vec![0; 66].into())
        )
        .is_err()
    );
    assert!(
        w.add_tensor(
            "x",
            GgmlType::F32,
            &[2],
            TensorData::Bytes(vec![0; 7].into())
        )
        .is_err()
    );
    w.add_f32("x", &[1], &[1.0]).unwrap();
    assert!(w.add_f32("x", &[1], &[1.0]).is_err(), "duplicate name");
    // A stream that writes the wrong number of bytes is caught, and no file appears.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let mut w = GgufWriter::new();
    w.add_tensor(
        "y",
        GgmlType::F32,
        &[4],
        TensorData::Stream(Box::new(|out| {
            out.write_all(&[0; 8])
                .map_err(|e| bitnet_formats::FormatError::Io {
                    path: "x".into(),
                    source: e,
                })
        })),
    )
    .unwrap();
    let err = w.write_to_path(&path).unwrap_err();
    assert!(err.to_string().contains("wrote 8 bytes"), "{err}");
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temp file left behind"
    );
}

#[test]
fn dequantize_checks_sizes() {
    assert!(dequantize("x", GgmlType::Q8_0, &[0; 33], 32).is_err());
    assert!(dequantize("x", GgmlType::Q4_K, &[0; 144], 256).is_err());
    assert_eq!(
        dequantize("x", GgmlType::Q8_0, &[0; 34], 32).unwrap(),
        vec![0.0; 32]
    );
}
