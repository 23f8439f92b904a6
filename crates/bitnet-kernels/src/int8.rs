//! Int8 matrices with one f32 scale per row: the compact lm_head (half the bytes of f16).
//!
//! Rows are quantized symmetrically (`q = round(w * 127 / max|w|)`); the activations are the
//! same per-token int8 the ternary layers use. AVX-512 VNNI multiplies unsigned by signed bytes,
//! so the activations are offset by 128 and the kernel subtracts `128 * sum(q)` per row, kept
//! from load time.

use crate::buffer::AlignedBuf;
use crate::cpu::{Tier, features};

/// A `[rows, cols]` int8 matrix with per-row scales.
#[derive(Debug, Clone)]
pub struct Int8Rows {
    rows: usize,
    cols: usize,
    data: AlignedBuf,
    /// `max|w| / 127` per row: `w ≈ q * scale`.
    pub scales: Vec<f32>,
    sums: Vec<i32>,
}

impl Int8Rows {
    /// Quantize rows produced by `row(r, &mut buf)` (f32 values, `cols` long).
    pub fn quantize(rows: usize, cols: usize, mut row: impl FnMut(usize, &mut [f32])) -> Self {
        let mut data = AlignedBuf::zeroed(rows * cols);
        let (mut scales, mut sums) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut buf = vec![0.0f32; cols];
        for r in 0..rows {
            row(r, &mut buf);
            let amax = buf.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let dst = &mut data[r * cols..(r + 1) * cols];
            let mut sum = 0i32;
            for (d, &v) in dst.iter_mut().zip(&buf) {
                let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(q);
                *d = q as u8;
            }
            scales.push(scale);
            sums.push(sum);
        }
        Self {
            rows,
            cols,
            data,
            scales,
            sums,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.cols
    }

    /// Row `r` as int8 values.
    pub fn row(&self, r: usize) -> &[i8] {
        bytemuck::cast_slice(&self.data[r * self.cols..(r + 1) * self.cols])
    }

    /// `sum_c q[r, c] * x[c]` for one row; `x_u8` is the activations offset by 128 (`x ^ 0x80`),
    /// `x` the plain ones (for the portable path).
    pub fn dot(&self, tier: Tier, r: usize, x: &[i8], x_u8: &[u8]) -> i32 {
        let w = &self.data[r * self.cols..(r + 1) * self.cols];
        #[cfg(target_arch = "x86_64")]
        if tier >= Tier::Avx512 && features().avx512vnni && self.cols.is_multiple_of(64) {
            #[allow(unsafe_code)]
            // SAFETY: AVX-512 VNNI detected; `w` and `x_u8` hold `cols` bytes, a multiple of 64.
            return unsafe { dot_vnni(w, x_u8) } - 128 * self.sums[r];
        }
        let _ = (tier, x_u8);
        w.iter()
            .zip(x)
            .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
            .sum()
    }
}

impl Int8Rows {
    /// [`Self::dot`] of rows `r..r + 4` against four tokens (`out[row][token]`): each weight
    /// vector is loaded once for four tokens. Integer sums, so the same values as `dot`.
    pub fn dot_4x4(&self, tier: Tier, r: usize, x: [&[i8]; 4], x_u8: [&[u8]; 4]) -> [[i32; 4]; 4] {
        let cols = self.cols;
        assert!(r + 4 <= self.rows);
        for t in 0..4 {
            assert!(x[t].len() == cols && x_u8[t].len() == cols);
        }
        #[cfg(target_arch = "x86_64")]
        if tier >= Tier::Avx512 && features().avx512vnni && cols.is_multiple_of(64) {
            let w: [&[u8]; 4] =
                std::array::from_fn(|k| &self.data[(r + k) * cols..(r + k + 1) * cols]);
            #[allow(unsafe_code)]
            // SAFETY: AVX-512 VNNI detected; every row and token holds `cols` bytes, a multiple
            // of 64 (checked above).
            let mut d = unsafe { dot_vnni_4x4(w, x_u8) };
            for (k, row) in d.iter_mut().enumerate() {
                row.iter_mut().for_each(|v| *v -= 128 * self.sums[r + k]);
            }
            return d;
        }
        std::array::from_fn(|k| std::array::from_fn(|t| self.dot(tier, r + k, x[t], x_u8[t])))
    }
}

/// `out[t, r] = (w[r, :] . xq[t, :]) * scale[r] / xs[t]` for the `n = xs.len()` tokens of `xq`
/// (`[n, cols]` int8 activations, `xs` their per-token multipliers `127 / max|x|`), the rows
/// split between the pool's threads; batches take four rows against four tokens per pass (the
/// same integer sums).
pub fn gemm_par(
    pool: &crate::pool::ThreadPool,
    tier: Tier,
    w: &Int8Rows,
    xq: &[i8],
    xs: &[f32],
    out: &mut [f32],
) {
    let (rows, cols, n) = (w.rows, w.cols, xs.len());
    assert_eq!(xq.len(), n * cols, "{n} tokens of {cols}");
    assert_eq!(out.len(), n * rows, "{n} tokens of {rows} outputs");
    // The unsigned form VNNI multiplies (x + 128), once per product.
    let xu: Vec<u8> = xq.iter().map(|&v| (v as u8) ^ 0x80).collect();
    let q = |t: usize| &xq[t * cols..(t + 1) * cols];
    let u = |t: usize| &xu[t * cols..(t + 1) * cols];
    let value = |d: i32, r: usize, t: usize| d as f32 * w.scales[r] / xs[t];
    crate::pool::par_columns(pool, out, rows, rows, 16, &|range, wr| {
        let mut r = range.start;
        if n >= 4 {
            while r + 4 <= range.end {
                let mut t = 0;
                while t + 4 <= n {
                    let d = w.dot_4x4(
                        tier,
                        r,
                        [q(t), q(t + 1), q(t + 2), q(t + 3)],
                        [u(t), u(t + 1), u(t + 2), u(t + 3)],
                    );
                    for (k, dk) in d.iter().enumerate() {
                        for (j, &v) in dk.iter().enumerate() {
                            wr.set(t + j, r + k, value(v, r + k, t + j));
                        }
                    }
                    t += 4;
                }
                for t in t..n {
                    for k in r..r + 4 {
                        wr.set(t, k, value(w.dot(tier, k, q(t), u(t)), k, t));
                    }
                }
                r += 4;
            }
        }
        for r in r..range.end {
            for t in 0..n {
                wr.set(t, r, value(w.dot(tier, r, q(t), u(t)), r, t));
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
unsafe fn dot_vnni_4x4(w: [&[u8]; 4], x: [&[u8]; 4]) -> [[i32; 4]; 4] {
    use std::arch::x86_64::*;
    let n = w[0].len();
    let mut acc = [[_mm512_setzero_si512(); 4]; 4];
    let mut i = 0;
    // SAFETY: every load reads 64 bytes at `i + 64 <= n` of slices of length `n`.
    unsafe {
        while i + 64 <= n {
            let wv = [
                _mm512_loadu_si512(w[0].as_ptr().add(i) as *const _),
                _mm512_loadu_si512(w[1].as_ptr().add(i) as *const _),
                _mm512_loadu_si512(w[2].as_ptr().add(i) as *const _),
                _mm512_loadu_si512(w[3].as_ptr().add(i) as *const _),
            ];
            for t in 0..4 {
                let xv = _mm512_loadu_si512(x[t].as_ptr().add(i) as *const _);
                for k in 0..4 {
                    acc[k][t] = _mm512_dpbusd_epi32(acc[k][t], xv, wv[k]);
                }
            }
            i += 64;
        }
    }
    // Plain loops, not `map` closures: a closure does not inherit this function's target
    // features, and the reductions it held were not inlined (a call per sum).
    let mut out = [[0i32; 4]; 4];
    for k in 0..4 {
        for t in 0..4 {
            out[k][t] = _mm512_reduce_add_epi32(acc[k][t]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
unsafe fn dot_vnni(w: &[u8], x: &[u8]) -> i32 {
    use std::arch::x86_64::*;
    let n = w.len();
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut i = 0;
    // SAFETY: every load reads 64 bytes at `i + 64 <= n` of slices of length `n`; prefetches of
    // addresses past the end never fault.
    unsafe {
        while i + 256 <= n {
            _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(i + 8192) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(i + 8192 + 128) as *const i8);
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_si512(w.as_ptr().add(i + 64 * k) as *const _);
                let xv = _mm512_loadu_si512(x.as_ptr().add(i + 64 * k) as *const _);
                *a = _mm512_dpbusd_epi32(*a, xv, wv);
            }
            i += 256;
        }
        while i + 64 <= n {
            let wv = _mm512_loadu_si512(w.as_ptr().add(i) as *const _);
            let xv = _mm512_loadu_si512(x.as_ptr().add(i) as *const _);
            acc[0] = _mm512_dpbusd_epi32(acc[0], xv, wv);
            i += 64;
        }
    }
    let v = _mm512_add_epi32(
        _mm512_add_epi32(acc[0], acc[1]),
        _mm512_add_epi32(acc[2], acc[3]),
    );
    _mm512_reduce_add_epi32(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_agree_and_values_are_close() {
        let (rows, cols) = (7, 320);
        let m = Int8Rows::quantize(rows, cols, |r, buf| {
            for (c, v) in buf.iter_mut().enumerate() {
                *v = ((r * 31 + c * 17) % 41) as f32 / 20.0 - 1.0;
            }
        });
        let x: Vec<i8> = (0..cols).map(|c| ((c * 29) % 255) as u8 as i8).collect();
        let xu: Vec<u8> = x.iter().map(|&v| (v as u8) ^ 0x80).collect();
        for r in 0..rows {
            let reference: i32 = m
                .row(r)
                .iter()
                .zip(&x)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            for tier in crate::cpu::available_tiers() {
                assert_eq!(m.dot(tier, r, &x, &xu), reference, "{tier} row {r}");
            }
        }
        // Four rows against four tokens: the same integers.
        let xs: Vec<Vec<i8>> = (0..4)
            .map(|t| x.iter().map(|&v| v.wrapping_mul(t as i8 + 1)).collect())
            .collect();
        let xus: Vec<Vec<u8>> = xs
            .iter()
            .map(|x| x.iter().map(|&v| (v as u8) ^ 0x80).collect())
            .collect();
        for tier in crate::cpu::available_tiers() {
            let got = m.dot_4x4(
                tier,
                2,
                [&xs[0], &xs[1], &xs[2], &xs[3]],
                [&xus[0], &xus[1], &xus[2], &xus[3]],
            );
            for (k, gk) in got.iter().enumerate() {
                for (t, &g) in gk.iter().enumerate() {
                    assert_eq!(g, m.dot(tier, 2 + k, &xs[t], &xus[t]), "{tier}");
                }
            }
        }
        // The product: batches of 1 to 6 tokens give every token its one-row sums, scaled.
        let pool = crate::pool::ThreadPool::new(2);
        for n in 1..=6 {
            let xq: Vec<i8> = (0..n).flat_map(|t| xs[t % 4].clone()).collect();
            let scales: Vec<f32> = (0..n).map(|t| 1.0 + t as f32).collect();
            for tier in crate::cpu::available_tiers() {
                let mut out = vec![0.0f32; n * rows];
                gemm_par(&pool, tier, &m, &xq, &scales, &mut out);
                for t in 0..n {
                    for r in 0..rows {
                        let d = m.dot(Tier::Scalar, r, &xs[t % 4], &xus[t % 4]);
                        let want = d as f32 * m.scales[r] / scales[t];
                        assert_eq!(out[t * rows + r].to_bits(), want.to_bits(), "{tier} n {n}");
                    }
                }
            }
        }
    }
}
