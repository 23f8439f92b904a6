//! Hostile GGUF files: every one gives a typed error naming the problem, never a panic and never
//! an allocation sized by an unchecked header field.

use bitnet_formats::FormatError;
use bitnet_formats::gguf::{
    GgmlType, GgufHeader, GgufWriter, MetaValue, TensorData, ValueType, array,
};
use proptest::prelude::*;

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.name", "tiny")
        .set("a.list", array(ValueType::String, ["x", "yy", "zzz"]))
        .set("a.f", 0.5f32);
    w.add_f32("w", &[4, 2], &[0.0; 8]).unwrap();
    w.add_tensor(
        "q",
        GgmlType::Q8_0,
        &[32],
        TensorData::Bytes(vec![0u8; 34].into()),
    )
    .unwrap();
    let mut b = Vec::new();
    w.write_to(&mut b).unwrap();
    b
}

fn header_end(bytes: &[u8]) -> usize {
    let h = GgufHeader::parse(bytes).unwrap();
    h.tensors
        .iter()
        .map(|t| h.tensor_range(t).end)
        .max()
        .unwrap()
}

#[test]
fn every_truncation_is_an_error() {
    let b = sample();
    let end = header_end(&b);
    for len in 0..b.len() {
        let r = GgufHeader::parse(&b[..len]);
        if len < end {
            assert!(r.is_err(), "prefix of {len} bytes parsed");
        }
    }
}

fn patch_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    let mut b = sample();
    patch_u64(&mut b, 8, u64::MAX); // tensor count
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::ImpossibleCount { what: "tensor", .. })
    ));
    let mut b = sample();
    patch_u64(&mut b, 16, 1 << 60); // metadata count
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::ImpossibleCount {
            what: "metadata",
            ..
        })
    ));
    // The first key's length.
    let mut b = sample();
    patch_u64(&mut b, 24, u64::MAX - 3);
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn magic_version_and_endianness() {
    let mut b = sample();
    b[0] = b'X';
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::BadMagic { .. })
    ));
    for v in [0u32, 1, 4, 99] {
        let mut b = sample();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(
            matches!(GgufHeader::parse(&b), Err(FormatError::UnsupportedVersion { version }) if version == v)
        );
    }
    // Version 2 has the same layout as 3 (3 only added big-endian files): both are read.
    let mut b = sample();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufHeader::parse(&b).unwrap().version, 2);
    let mut b = sample();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = GgufHeader::parse(&b).unwrap_err();
    assert!(matches!(e, FormatError::BigEndian { .. }), "{e}");
    assert!(e.to_string().contains("big-endian"));
}

/// Build a file by hand so that individual fields can lie.
struct Raw(Vec<u8>);
impl Raw {
    fn new(n_tensors: u64, n_kv: u64) -> Self {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        Raw(b)
    }
    fn str(mut self, s: &[u8]) -> Self {
        self.0.extend((s.len() as u64).to_le_bytes());
        self.0.extend(s);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend(b);
        self
    }
    fn pad(mut self, to: usize) -> Self {
        self.0.resize(to, 0);
        self
    }
}

#[test]
fn lying_fields() {
    // Invalid UTF-8 in a key.
    let b = Raw::new(0, 1).str(b"bad\xff").u32(4).u32(1).0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::BadUtf8 { .. })
    ));
    // Unknown value type.
    let b = Raw::new(0, 1).str(b"k").u32(13).u32(1).0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::BadValueType { type_id: 13, .. })
    ));
    // A bool that is neither 0 nor 1.
    let b = Raw::new(0, 1).str(b"k").u32(7).bytes(&[2]).0;
    assert!(GgufHeader::parse(&b).is_err());
    // An array claiming 2^62 u64 elements.
    let b = Raw::new(0, 1).str(b"k").u32(9).u32(10).u64(1 << 62).0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::ImpossibleCount {
            what: "array element",
            ..
        })
    ));
    // Arrays nested beyond the limit.
    let mut r = Raw::new(0, 1).str(b"k").u32(9);
    for _ in 0..8 {
        r = r.u32(9).u64(1);
    }
    let b = r.u32(0).u64(0).0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::TooDeep { .. })
    ));
    // Duplicate key.
    let b = Raw::new(0, 2)
        .str(b"k")
        .u32(0)
        .bytes(&[1])
        .str(b"k")
        .u32(0)
        .bytes(&[2])
        .0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::Duplicate { .. })
    ));
    // Alignment that is not a power of two.
    let b = Raw::new(0, 1).str(b"general.alignment").u32(4).u32(24).0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::BadAlignment(24))
    ));
    // Alignment of the wrong type.
    let b = Raw::new(0, 1).str(b"general.alignment").u32(8).str(b"32").0;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(FormatError::WrongType { .. })
    ));
}

fn tensor_file(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut r = Raw::new(1, 0).str(b"t").u32(dims.len() as u32);
    for &d in dims {
        r = r.u64(d);
    }
    r = r.u32(ty).u64(offset);
    let start = r.0.len().div_ceil(32) * 32;
    r.pad(start + data).0
}

#[test]
fn lying_tensor_infos() {
    let ok = tensor_file(&[4], 0, 0, 16);
    assert!(GgufHeader::parse(&ok).is_ok());
    // Data past the end of the file.
    let e = GgufHeader::parse(&tensor_file(&[4], 0, 0, 15)).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    let e = GgufHeader::parse(&tensor_file(&[4], 0, 1 << 40, 16)).unwrap_err();
    assert!(matches!(e, FormatError::BadTensor { .. }), "{e}");
    // Offset so large that offset + size overflows.
    assert!(GgufHeader::parse(&tensor_file(&[4], 0, u64::MAX - 31, 16)).is_err());
    // Misaligned offset.
    let e = GgufHeader::parse(&tensor_file(&[1], 0, 4, 64)).unwrap_err();
    assert!(e.to_string().contains("alignment"), "{e}");
    // Dimensions whose product overflows.
    let e = GgufHeader::parse(&tensor_file(&[1 << 32, 1 << 32, 16], 0, 0, 16)).unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
    // Too many dimensions, and zero.
    assert!(GgufHeader::parse(&tensor_file(&[1, 1, 1, 1, 1], 0, 0, 4)).is_err());
    assert!(GgufHeader::parse(&tensor_file(&[], 0, 0, 4)).is_err());
    // Unknown type id, and a row that is not a whole number of blocks.
    assert!(matches!(
        GgufHeader::parse(&tensor_file(&[4], 77, 0, 16)),
        Err(FormatError::UnknownType { type_id: 77, .. })
    ));
    assert!(GgufHeader::parse(&tensor_file(&[100], GgmlType::TQ2_0.id(), 0, 66)).is_err());
    // Id 36 outside a bitnet architecture: read as I2_S when its size is exactly I2_S's, with the
    // dialect reported; refused, not guessed, when it is not.
    let h = GgufHeader::parse(&tensor_file(&[256], 36, 0, 96)).unwrap();
    assert_eq!(h.dialect, bitnet_formats::gguf::Dialect::BitnetCpp);
    assert_eq!(h.tensors[0].ty, GgmlType::I2_S);
    assert_eq!(h.tensors[0].nbytes, 96);
    let e = GgufHeader::parse(&tensor_file(&[1000], 36, 0, 18)).unwrap_err();
    assert!(
        e.to_string().contains("36") || e.to_string().contains("past the end"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Corrupting any bytes of a valid file never panics.
    #[test]
    fn random_corruption_never_panics(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut b = sample();
        for (i, v) in flips {
            let at = i.index(b.len());
            b[at] = v;
        }
        let _ = GgufHeader::parse(&b);
    }

    #[test]
    fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
        with_magic.extend(&b);
        let _ = GgufHeader::parse(&with_magic);
        let _ = GgufHeader::parse(&b);
    }
}

#[test]
fn metavalue_accessors() {
    assert_eq!(MetaValue::I32(-1).as_u64(), None);
    assert_eq!(MetaValue::U8(7).as_i64(), Some(7));
    assert_eq!(MetaValue::F32(0.5).as_f64(), Some(0.5));
}
