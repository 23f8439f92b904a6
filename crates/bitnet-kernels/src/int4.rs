//! 4-bit matrices with one f32 scale per 128 weights of a row: the smallest lm_head we offer
//! (4.25 bits per weight, a quarter of the f16 head's bytes).
//!
//! Quantization follows ggml's Q4_0 rule on larger blocks: the block's value of largest
//! magnitude `m` sets `d = m / -8`, and `q = clamp(round(w / d) + 8, 0, 15)`, so `w ≈ d (q - 8)`
//! and the extreme value is exact. The activations are the same per-token int8 as the ternary
//! layers'. `vpdpbusd` multiplies the unsigned nibbles by the signed activations, and the
//! `- 8` is applied once per block from the block's activation sum.
//!
//! Layout: rows grouped by 4; for each group and each 128-weight block, the 4 rows' 64 bytes
//! one after another. Byte `j` of a row's block holds weight `j` in its low nibble and weight
//! `j + 64` in its high nibble, so the two nibble planes line up with two contiguous 64-byte
//! runs of the activations. Scales are kept apart, `[group][block][row]`.
//!
//! Every tier gives bit-identical results: the integer part is exact, and the float part (one
//! fused multiply-add per 16-lane vector per block, then a fixed reduction tree) is reproduced
//! lane by lane by the portable path.

use crate::buffer::AlignedBuf;
use crate::cpu::{Tier, features};

/// Weights per block (one scale each).
pub const BLOCK: usize = 128;
const ROWS: usize = 4;
const BLOCK_BYTES: usize = BLOCK / 2;

/// A `[rows, cols]` matrix of 4-bit weights with a scale per 128-weight block of each row.
#[derive(Debug, Clone)]
pub struct Int4Rows {
    rows: usize,
    cols: usize,
    blocks: usize,
    data: AlignedBuf,
    scales: Vec<f32>,
}

/// One token's activations as the 4-bit kernels read them: int8 values padded to whole blocks,
/// and each block's sum (for the `- 8`).
#[derive(Debug, Clone, Default)]
pub struct Int4Acts {
    values: Vec<i8>,
    block_sums: Vec<i32>,
}

impl Int4Acts {
    /// Pad `x` (int8 activations of one token) to `blocks` blocks and sum each block.
    pub fn new(x: &[i8], blocks: usize) -> Self {
        let mut values = vec![0i8; blocks * BLOCK];
        values[..x.len()].copy_from_slice(x);
        let block_sums = values
            .chunks_exact(BLOCK)
            .map(|b| b.iter().map(|&v| i32::from(v)).sum())
            .collect();
        Self { values, block_sums }
    }
}

impl Int4Rows {
    /// Quantize rows produced by `row(r, &mut buf)` (f32 values, `cols` long).
    pub fn quantize(rows: usize, cols: usize, mut row: impl FnMut(usize, &mut [f32])) -> Self {
        let blocks = cols.div_ceil(BLOCK).max(1);
        let groups = rows.div_ceil(ROWS);
        let mut data = AlignedBuf::zeroed(groups * blocks * ROWS * BLOCK_BYTES);
        let mut scales = vec![0.0f32; groups * blocks * ROWS];
        let mut buf = vec![0.0f32; blocks * BLOCK];
        for r in 0..groups * ROWS {
            buf.fill(0.0);
            if r < rows {
                row(r, &mut buf[..cols]);
            }
            let (g, ri) = (r / ROWS, r % ROWS);
            for (b, w) in buf.chunks_exact(BLOCK).enumerate() {
                let d = block_scale(w);
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                let at = ((g * blocks + b) * ROWS + ri) * BLOCK_BYTES;
                for j in 0..BLOCK_BYTES {
                    let q = |v: f32| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
                    data[at + j] = q(w[j]) | (q(w[j + BLOCK_BYTES]) << 4);
                }
                scales[(g * blocks + b) * ROWS + ri] = d;
            }
        }
        Self {
            rows,
            cols,
            blocks,
            data,
            scales,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Blocks per row (the activations are padded to `blocks * 128`).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Bytes one product streams: the nibbles and the scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    /// Number of 4-row groups (the unit of parallel work).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(ROWS)
    }

    /// The dequantized weight `(r, c)`.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        let (g, ri, b, k) = (r / ROWS, r % ROWS, c / BLOCK, c % BLOCK);
        let at = ((g * self.blocks + b) * ROWS + ri) * BLOCK_BYTES + k % BLOCK_BYTES;
        let q = (self.data[at] >> (4 * (k / BLOCK_BYTES))) & 0xF;
        self.scales[(g * self.blocks + b) * ROWS + ri] * (f32::from(q) - 8.0)
    }

    /// `out[i] = sum_c w[r, c] * x[c]` (in units of the int8 activations) for the rows of group
    /// `group`: up to 4 values.
    pub fn group_dot(&self, tier: Tier, group: usize, x: &Int4Acts, out: &mut [f32; ROWS]) {
        assert!(group < self.groups() && x.values.len() == self.blocks * BLOCK);
        let len = self.blocks * ROWS * BLOCK_BYTES;
        let w = &self.data[group * len..(group + 1) * len];
        let s = &self.scales[group * self.blocks * ROWS..(group + 1) * self.blocks * ROWS];
        let mut lanes = [[0.0f32; 16]; ROWS];
        #[cfg(target_arch = "x86_64")]
        if tier >= Tier::Avx512 && features().avx512vnni {
            #[allow(unsafe_code)]
            // SAFETY: AVX-512 VNNI detected; `w` holds `blocks` blocks of 4 rows, `s` their
            // scales, `x.values` `blocks * 128` activations and `x.block_sums` `blocks` sums
            // (asserted above).
            unsafe {
                x86::group_lanes(w, s, x, self.blocks, &mut lanes)
            };
        } else {
            portable_lanes(w, s, x, self.blocks, &mut lanes);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = tier;
            portable_lanes(w, s, x, self.blocks, &mut lanes);
        }
        for (o, l) in out.iter_mut().zip(&lanes) {
            *o = reduce16(l);
        }
    }
}

/// `out[t, r] = (w[r, :] . x_t) / xs[t]` for every token's prepared activations `acts[t]`
/// (its int8 values, see [`Int4Acts::new`]) and multiplier `xs[t]`, the 4-row groups split
/// between the pool's threads.
pub fn gemm_par(
    pool: &crate::pool::ThreadPool,
    tier: Tier,
    w: &Int4Rows,
    acts: &[Int4Acts],
    xs: &[f32],
    out: &mut [f32],
) {
    let (rows, n) = (w.rows(), acts.len());
    assert_eq!(xs.len(), n, "a multiplier per token");
    assert_eq!(out.len(), n * rows, "{n} tokens of {rows} outputs");
    crate::pool::par_columns(pool, out, rows, rows, ROWS, &|cols, wr| {
        for g in cols.start / ROWS..cols.end.div_ceil(ROWS) {
            let valid = (rows - ROWS * g).min(ROWS);
            for (t, a) in acts.iter().enumerate() {
                let mut d = [0.0f32; ROWS];
                w.group_dot(tier, g, a, &mut d);
                let run: [f32; ROWS] = std::array::from_fn(|i| d[i] / xs[t]);
                wr.set_run(t, ROWS * g, &run[..valid]);
            }
        }
    });
}

/// The scale of one block: starting from Q4_0's `m / -8`, the candidate scales
/// `m / -(8 + k / 10)` for `k` in `-9..=9` are each refitted by least squares to the codes
/// they give, and the one with the smallest squared error is kept (the search llama.cpp's
/// `make_qx_quants` does, in `ggml-quants.c`).
fn block_scale(w: &[f32]) -> f32 {
    let m = w
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if m == 0.0 {
        return 0.0;
    }
    let error = |d: f32| -> (f32, f32) {
        let inv = 1.0 / d;
        let (mut wl, mut ll) = (0.0f64, 0.0f64);
        for &v in w {
            let l = ((v * inv).round().clamp(-8.0, 7.0)) as f64;
            wl += f64::from(v) * l;
            ll += l * l;
        }
        let fit = if ll > 0.0 { (wl / ll) as f32 } else { d };
        let inv = 1.0 / fit;
        let sse: f32 = w
            .iter()
            .map(|&v| {
                let l = (v * inv).round().clamp(-8.0, 7.0);
                (v - fit * l).powi(2)
            })
            .sum();
        (sse, fit)
    };
    let mut best = error(m / -8.0);
    for k in -9..=9 {
        let cand = error(m / -(8.0 + k as f32 / 10.0));
        if cand.0 < best.0 {
            best = cand;
        }
    }
    best.1
}

/// The fixed reduction tree both paths use (halves added pairwise).
fn reduce16(v: &[f32; 16]) -> f32 {
    let mut a = *v;
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

/// The kernel's arithmetic, lane by lane: lane `l` of block `b` sums weights `4l..4l+4` and
/// `64+4l..64+4l+4` of the block (exact in i32; lane 0 also takes the block's `- 8 * sum(x)`),
/// then `lane = fma(float(sum), d, lane)`.
fn portable_lanes(w: &[u8], s: &[f32], x: &Int4Acts, blocks: usize, lanes: &mut [[f32; 16]; ROWS]) {
    for b in 0..blocks {
        let xb = &x.values[b * BLOCK..(b + 1) * BLOCK];
        for (ri, lane) in lanes.iter_mut().enumerate() {
            let wb = &w[(b * ROWS + ri) * BLOCK_BYTES..][..BLOCK_BYTES];
            let d = s[b * ROWS + ri];
            for (l, acc) in lane.iter_mut().enumerate() {
                let mut sum = if l == 0 { -8 * x.block_sums[b] } else { 0 };
                for j in 4 * l..4 * l + 4 {
                    sum += i32::from(wb[j] & 0xF) * i32::from(xb[j]);
                    sum += i32::from(wb[j] >> 4) * i32::from(xb[j + BLOCK_BYTES]);
                }
                *acc = (sum as f32).mul_add(d, *acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, BLOCK_BYTES, Int4Acts, ROWS};
    use std::arch::x86_64::*;

    /// How far ahead of the current block the kernel prefetches weights.
    const PREFETCH: usize = 8192;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn group_lanes(
        w: &[u8],
        s: &[f32],
        x: &Int4Acts,
        blocks: usize,
        lanes: &mut [[f32; 16]; ROWS],
    ) {
        let mut acc = [_mm512_setzero_ps(); ROWS];
        let nib = _mm512_set1_epi8(0x0F);
        // SAFETY: the caller checked that `w` has `blocks * 4 * 64` bytes, `s` `blocks * 4`
        // scales and `x` `blocks * 128` values; prefetches past the end never fault.
        unsafe {
            for b in 0..blocks {
                let xb = x.values.as_ptr().add(b * BLOCK);
                // The block's `- 8 * sum(x)` enters lane 0 before the products.
                let corr = _mm512_maskz_mov_epi32(1, _mm512_set1_epi32(-8 * x.block_sums[b]));
                let lo_x = _mm512_loadu_si512(xb as *const _);
                let hi_x = _mm512_loadu_si512(xb.add(BLOCK_BYTES) as *const _);
                let wb = w.as_ptr().add(b * ROWS * BLOCK_BYTES);
                for r in 0..ROWS {
                    _mm_prefetch::<_MM_HINT_T1>(
                        wb.wrapping_add(PREFETCH + r * BLOCK_BYTES) as *const i8
                    );
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let v = _mm512_loadu_si512(wb.add(r * BLOCK_BYTES) as *const _);
                    let lo = _mm512_and_si512(v, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                    let i = _mm512_dpbusd_epi32(corr, lo, lo_x);
                    let i = _mm512_dpbusd_epi32(i, hi, hi_x);
                    let d = _mm512_set1_ps(*s.get_unchecked(b * ROWS + r));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), d, *a);
                }
            }
        }
        for (l, a) in lanes.iter_mut().zip(acc) {
            // SAFETY: `l` is 16 floats, exactly one 512-bit store.
            unsafe { _mm512_storeu_ps(l.as_mut_ptr(), a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_agree_bitwise_and_values_are_close() {
        for &(rows, cols) in &[(7, 320), (1, 1), (4, 128), (9, 576), (33, 2560)] {
            let f = |r: usize, c: usize| ((r * 31 + c * 17) % 41) as f32 / 20.0 - 1.0;
            let m = Int4Rows::quantize(rows, cols, |r, buf| {
                for (c, v) in buf.iter_mut().enumerate() {
                    *v = f(r, c);
                }
            });
            // Within half a step, or one step for a value of the opposite sign to the block's
            // extreme and nearly its size (it clips to 15, as in Q4_0).
            for r in 0..rows {
                for c in 0..cols {
                    let b0 = c / BLOCK * BLOCK;
                    let step = (b0..(b0 + BLOCK).min(cols))
                        .map(|k| f(r, k).abs())
                        .fold(0.0f32, f32::max)
                        / 8.0;
                    assert!((m.value(r, c) - f(r, c)).abs() <= step + 1e-6);
                }
            }
            let x: Vec<i8> = (0..cols)
                .map(|c| match c % 7 {
                    0 => -128,
                    1 => 127,
                    _ => ((c * 29) % 255) as u8 as i8,
                })
                .collect();
            let acts = Int4Acts::new(&x, m.blocks());
            for g in 0..m.groups() {
                let mut want = [0.0f32; 4];
                let mut lanes = [[0.0f32; 16]; 4];
                let len = m.blocks * ROWS * BLOCK_BYTES;
                let s = &m.scales[g * m.blocks * ROWS..(g + 1) * m.blocks * ROWS];
                portable_lanes(
                    &m.data[g * len..(g + 1) * len],
                    s,
                    &acts,
                    m.blocks,
                    &mut lanes,
                );
                for ri in 0..4 {
                    want[ri] = reduce16(&lanes[ri]);
                    // And the portable value is the true dot of the dequantized weights.
                    let r = g * 4 + ri;
                    if r < rows {
                        let exact: f64 = (0..cols)
                            .map(|c| f64::from(m.value(r, c)) * f64::from(x[c]))
                            .sum();
                        assert!(
                            (f64::from(want[ri]) - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                            "{rows}x{cols} row {r}: {} vs {exact}",
                            want[ri]
                        );
                    }
                }
                for tier in crate::cpu::available_tiers() {
                    let mut got = [0.0f32; 4];
                    m.group_dot(tier, g, &acts, &mut got);
                    assert_eq!(
                        got.map(f32::to_bits),
                        want.map(f32::to_bits),
                        "{tier} {rows}x{cols} group {g}"
                    );
                }
            }
            // The product over tokens: each token's row of outputs is its groups' dots.
            let pool = crate::pool::ThreadPool::new(2);
            let xs = [3.0f32, 0.5];
            let acts2 = [Int4Acts::new(&x, m.blocks()), acts];
            for tier in crate::cpu::available_tiers() {
                let mut out = vec![0.0f32; 2 * rows];
                gemm_par(&pool, tier, &m, &acts2, &xs, &mut out);
                for (t, a) in acts2.iter().enumerate() {
                    for g in 0..m.groups() {
                        let mut d = [0.0f32; 4];
                        m.group_dot(Tier::Scalar, g, a, &mut d);
                        for i in 0..(rows - 4 * g).min(4) {
                            assert_eq!(
                                out[t * rows + 4 * g + i].to_bits(),
                                (d[i] / xs[t]).to_bits()
                            );
                        }
                    }
                }
            }
        }
    }
}
