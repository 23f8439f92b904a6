use super::*;
use crate::cpu::available_tiers;

struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    /// Values spread over a few binades, both signs, some exact zeros.
    fn value(&mut self) -> f32 {
        let v = self.next();
        if v.is_multiple_of(17) {
            return 0.0;
        }
        let mag = (v >> 8) as f32 / (1u32 << 24) as f32 * 4.0;
        let mag = mag * [1.0, 1e-2, 30.0][(v % 3) as usize];
        if v & 1 == 0 { mag } else { -mag }
    }

    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    /// A row of `n` weights of `ty` (`n` a multiple of 32 for the block types).
    fn row(&mut self, ty: DenseType, n: usize) -> Vec<u8> {
        match ty {
            DenseType::F32 => self
                .floats(n)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DenseType::F16 => (0..n)
                .flat_map(|_| half::f16::from_f32(self.value()).to_le_bytes())
                .collect(),
            DenseType::Q8_0 | DenseType::Q4_1 => {
                let mut out = Vec::new();
                for _ in 0..n / 32 {
                    let d = half::f16::from_f32((self.next() % 1000) as f32 * 1e-4 + 1e-4);
                    out.extend(d.to_le_bytes());
                    if ty == DenseType::Q4_1 {
                        let m = half::f16::from_f32(-((self.next() % 1000) as f32) * 1e-4);
                        out.extend(m.to_le_bytes());
                        out.extend((0..16).map(|_| self.next() as u8));
                    } else {
                        out.extend((0..32).map(|_| self.next() as u8));
                    }
                }
                out
            }
        }
    }
}

/// The weights of a row, dequantized as ggml does.
fn values(ty: DenseType, row: &[u8], n: usize) -> Vec<f32> {
    let h = |a: u8, b: u8| half::f16::from_le_bytes([a, b]).to_f32();
    let all: Vec<f32> = match ty {
        DenseType::F32 => row
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DenseType::F16 => row.chunks_exact(2).map(|c| h(c[0], c[1])).collect(),
        DenseType::Q8_0 => row
            .chunks_exact(Q8_0_BYTES)
            .flat_map(|b| {
                let d = h(b[0], b[1]);
                (0..32).map(move |k| f32::from(b[2 + k] as i8) * d)
            })
            .collect(),
        DenseType::Q4_1 => row
            .chunks_exact(Q4_1_BYTES)
            .flat_map(|b| {
                let (d, m) = (h(b[0], b[1]), h(b[2], b[3]));
                (0..32).map(move |k| {
                    let q = if k < 16 {
                        b[4 + k] & 0xF
                    } else {
                        b[4 + k - 16] >> 4
                    };
                    f32::from(q) * d + m
                })
            })
            .collect(),
    };
    all.into_iter().take(n).collect()
}

const TYPES: [DenseType; 4] = [
    DenseType::F32,
    DenseType::F16,
    DenseType::Q8_0,
    DenseType::Q4_1,
];

fn lengths(ty: DenseType) -> &'static [usize] {
    match ty {
        DenseType::F32 | DenseType::F16 => &[1, 7, 15, 16, 17, 31, 63, 64, 65, 130, 576, 2560],
        _ => &[32, 64, 96, 576, 1536],
    }
}

#[test]
fn every_tier_equals_the_scalar_twin_bitwise() {
    let tiers = available_tiers();
    let mut rng = Rng(7);
    let mut checked = 0;
    for ty in TYPES {
        for &n in lengths(ty) {
            for _ in 0..4 {
                let w = rng.row(ty, n);
                let x = rng.floats(n);
                let want = dot(Tier::Scalar, ty, &w, &x);
                for &tier in &tiers {
                    let got = dot(tier, ty, &w, &x);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{ty:?} n {n} {tier}: {got} vs {want}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 4 * 22 * tiers.len());
}

#[test]
fn dots_agree_with_f64() {
    let mut rng = Rng(11);
    for ty in TYPES {
        for &n in lengths(ty) {
            let w = rng.row(ty, n);
            let x = rng.floats(n);
            let v = values(ty, &w, n);
            let exact: f64 = v
                .iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let mag: f64 = v
                .iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from((a * b).abs()))
                .sum();
            let got = f64::from(dot(Tier::Scalar, ty, &w, &x));
            assert!(
                (got - exact).abs() <= 4e-7 * mag * (n as f64).log2().max(1.0) + 1e-30,
                "{ty:?} n {n}: {got} vs {exact}"
            );
        }
    }
}

#[test]
fn blocked_forms_equal_single_dots_bitwise_on_every_tier() {
    let mut rng = Rng(3);
    for tier in available_tiers() {
        for n in [1usize, 15, 16, 63, 64, 65, 130, 576] {
            let rows: Vec<Vec<u8>> = (0..4).map(|_| rng.row(DenseType::F16, n)).collect();
            let xs: Vec<Vec<f32>> = (0..4).map(|_| rng.floats(n)).collect();
            let w = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let x = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let four = dot_f16_x4(tier, w, x[0]);
            let sixteen = dot_f16_4x4(tier, w, x);
            for r in 0..4 {
                let one = dot(tier, DenseType::F16, w[r], x[0]);
                assert_eq!(
                    four[r].to_bits(),
                    one.to_bits(),
                    "{tier} f16 x4 n {n} row {r}"
                );
                for t in 0..4 {
                    let one = dot(tier, DenseType::F16, w[r], x[t]);
                    assert_eq!(
                        sixteen[r][t].to_bits(),
                        one.to_bits(),
                        "{tier} f16 4x4 n {n}"
                    );
                }
            }
        }
        for ty in [DenseType::Q8_0, DenseType::Q4_1] {
            for &n in lengths(ty) {
                let rows: Vec<Vec<u8>> = (0..2).map(|_| rng.row(ty, n)).collect();
                let xs: Vec<Vec<f32>> = (0..4).map(|_| rng.floats(n)).collect();
                let w = [&rows[0][..], &rows[1][..]];
                let x = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
                let got = dot_blocks_2x4(tier, ty, w, x);
                for r in 0..2 {
                    for t in 0..4 {
                        let one = dot(tier, ty, w[r], x[t]);
                        assert_eq!(
                            got[r][t].to_bits(),
                            one.to_bits(),
                            "{tier} {ty:?} 2x4 n {n}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_gives_every_token_its_single_token_numbers_on_every_tier() {
    let mut rng = Rng(5);
    let pool = ThreadPool::new(2);
    for tier in available_tiers() {
        for ty in TYPES {
            let (rows, cols) = (37, 96);
            let data: Vec<u8> = (0..rows).flat_map(|_| rng.row(ty, cols)).collect();
            let w = DenseRows::new(ty, rows, cols, &data).unwrap();
            for n in [1usize, 3, 4, 5, 9] {
                let x = rng.floats(n * cols);
                let mut out = vec![0.0f32; n * rows];
                gemm_par(&pool, tier, &w, &x, n, &mut out);
                for t in 0..n {
                    for r in 0..rows {
                        let want = dot(Tier::Scalar, ty, w.row(r), &x[t * cols..(t + 1) * cols]);
                        assert_eq!(
                            out[t * rows + r].to_bits(),
                            want.to_bits(),
                            "{tier} {ty:?} n {n} token {t} row {r}"
                        );
                    }
                }
                // The dequantizing path gives the same numbers for the same values.
                let mut deq = vec![0.0f32; n * rows];
                let row =
                    |r: usize, buf: &mut [f32]| buf.copy_from_slice(&values(ty, w.row(r), cols));
                gemm_par_rows(&pool, tier, rows, cols, &row, &x, n, &mut deq);
                if matches!(ty, DenseType::F32 | DenseType::F16) {
                    assert_eq!(
                        deq.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{tier} {ty:?} n {n}"
                    );
                }
            }
        }
    }
}

#[test]
fn rows_that_do_not_tile_are_refused() {
    assert!(DenseRows::new(DenseType::Q8_0, 2, 48, &[0; 100]).is_none());
    assert!(DenseRows::new(DenseType::F16, 2, 8, &[0; 31]).is_none());
    assert!(DenseRows::new(DenseType::F16, 2, 8, &[0; 32]).is_some());
}
