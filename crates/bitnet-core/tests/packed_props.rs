//! Property tests: every packed layout round-trips codes exactly, and conversions between
//! layouts are lossless wherever the scales survive.

use bitnet_core::f16;
use bitnet_core::packed::{self, PackedTensor, TernaryFormat, hf, i2s, tq1, tq2};
use bitnet_core::quant::{Granularity, TernaryMatrix};
use proptest::prelude::*;

fn codes(n: usize) -> impl Strategy<Value = Vec<i8>> {
    prop::collection::vec(-1i8..=1, n)
}

/// A per-tensor matrix with rows a multiple of 4 and cols a multiple of 256 (fits every format).
fn matrix() -> impl Strategy<Value = TernaryMatrix> {
    (1usize..4, 1usize..3, 1e-4f32..10.0).prop_flat_map(|(r4, c256, scale)| {
        let (rows, cols) = (r4 * 4, c256 * 256);
        codes(rows * cols).prop_map(move |c| {
            TernaryMatrix::new(rows, cols, c, Granularity::PerTensor, vec![scale]).unwrap()
        })
    })
}

proptest! {
    #[test]
    fn hf_roundtrip(rows in 1usize..13, cols in 1usize..9, seed in codes(12 * 8)) {
        let c = &seed[..rows * cols];
        let p = hf::pack(c, rows, cols).unwrap();
        prop_assert_eq!(p.len(), rows.div_ceil(4) * cols);
        let back = hf::unpack(&p, rows.div_ceil(4), cols).unwrap();
        prop_assert_eq!(&back[..rows * cols], c);
    }

    #[test]
    fn tq2_roundtrip(c in codes(512), d0 in any::<u16>(), d1 in any::<u16>()) {
        let d = [f16::from_bits(d0), f16::from_bits(d1)];
        let p = tq2::pack(&c, &d).unwrap();
        prop_assert_eq!(p.len(), 2 * tq2::BLOCK_BYTES);
        let (back, dd) = tq2::unpack(&p).unwrap();
        prop_assert_eq!(back, c);
        prop_assert_eq!(dd.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), vec![d0, d1]);
    }

    #[test]
    fn tq1_roundtrip(c in codes(768), d in any::<u16>()) {
        let d = [f16::from_bits(d); 3];
        let p = tq1::pack(&c, &d).unwrap();
        prop_assert_eq!(p.len(), 3 * tq1::BLOCK_BYTES);
        let (back, _) = tq1::unpack(&p).unwrap();
        prop_assert_eq!(back, c);
    }

    #[test]
    fn i2s_roundtrip(c in codes(384), s in any::<f32>()) {
        let p = i2s::pack(&c, s).unwrap();
        prop_assert_eq!(p.len(), 384 / 4 + 32);
        let (back, s2) = i2s::unpack(&p, 384).unwrap();
        prop_assert_eq!(back, c);
        prop_assert_eq!(s.to_bits(), s2.to_bits());
    }

    #[test]
    fn dequantize_matches_codes_times_scale(m in matrix()) {
        let n = m.rows * m.cols;
        for fmt in [TernaryFormat::Tq2_0, TernaryFormat::Tq1_0, TernaryFormat::I2S] {
            let (p, _) = packed::pack(&m, fmt).unwrap();
            let mut y = vec![0.0f32; n];
            match fmt {
                TernaryFormat::Tq2_0 => tq2::dequantize(&p.data, &mut y).unwrap(),
                TernaryFormat::Tq1_0 => tq1::dequantize(&p.data, &mut y).unwrap(),
                _ => i2s::dequantize(&p.data, &mut y).unwrap(),
            }
            let s = if fmt == TernaryFormat::I2S { m.scales[0] } else { f16::from_f32(m.scales[0]).to_f32() };
            for (v, &c) in y.iter().zip(&m.codes) {
                prop_assert_eq!(v.to_bits(), (f32::from(c) * s).to_bits());
            }
        }
    }

    /// I2_S -> TQ2_0 rounds the scale to f16 (codes exact); TQ2_0 -> I2_S -> TQ2_0 is lossless.
    #[test]
    fn i2s_tq2_conversions(m in matrix()) {
        let (i2, exact) = packed::pack(&m, TernaryFormat::I2S).unwrap();
        prop_assert!(exact.exact);
        let (t2, f) = packed::convert(&i2, TernaryFormat::Tq2_0).unwrap();
        let rounded = f16::from_f32(m.scales[0]).to_f32();
        prop_assert_eq!(f.exact, rounded == m.scales[0]);
        prop_assert!(f.max_rel_scale_change <= 2f64.powi(-11) + 1e-12, "{}", f.max_rel_scale_change);
        let (i2b, f2) = packed::convert(&t2, TernaryFormat::I2S).unwrap();
        prop_assert!(f2.exact);
        let (t2b, f3) = packed::convert(&i2b, TernaryFormat::Tq2_0).unwrap();
        prop_assert!(f3.exact);
        prop_assert_eq!(&t2b.data, &t2.data);
        // TQ2_0 <-> TQ1_0 <-> HF are exact on codes and on f16-representable scales.
        let (t1, f4) = packed::convert(&t2, TernaryFormat::Tq1_0).unwrap();
        prop_assert!(f4.exact);
        let (hfp, f5) = packed::convert(&t1, TernaryFormat::HfPacked).unwrap();
        prop_assert!(f5.exact);
        prop_assert_eq!(packed::unpack(&hfp).unwrap().codes, m.codes.clone());
    }
}

#[test]
fn per_channel_scales_survive_tq_but_not_i2s() {
    let rows = 4;
    let cols = 256;
    let codes: Vec<i8> = (0..rows * cols).map(|i| (i % 3) as i8 - 1).collect();
    let m = TernaryMatrix::new(
        rows,
        cols,
        codes,
        Granularity::PerChannel,
        vec![0.5, 0.25, 1.0, 2.0],
    )
    .unwrap();
    let (p, f) = packed::pack(&m, TernaryFormat::Tq2_0).unwrap();
    assert!(f.exact, "{}", f.note);
    let back = packed::unpack(&p).unwrap();
    assert_eq!(back.granularity, Granularity::PerChannel);
    assert_eq!(back.scales, m.scales);
    let err = packed::pack(&m, TernaryFormat::I2S).unwrap_err();
    assert!(err.to_string().contains("one scale per tensor"), "{err}");
}

#[test]
fn shapes_that_do_not_fit_are_refused() {
    let m = TernaryMatrix::new(2, 100, vec![0; 200], Granularity::PerTensor, vec![1.0]).unwrap();
    for fmt in [
        TernaryFormat::Tq2_0,
        TernaryFormat::Tq1_0,
        TernaryFormat::HfPacked,
    ] {
        assert!(packed::pack(&m, fmt).is_err(), "{fmt}");
    }
    let bad = PackedTensor {
        format: TernaryFormat::Tq2_0,
        rows: 1,
        cols: 256,
        data: vec![0; 65],
        scale: None,
    };
    assert!(packed::unpack(&bad).is_err());
}
