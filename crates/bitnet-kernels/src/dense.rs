//! Float dot products for the non-ternary parts: f32 rows (attention, f32 weights) and f16 rows
//! (the lm_head and embeddings the anchors keep in f16), converted on the fly.

use crate::cpu::{Tier, features};

/// `sum a[i] * b[i]` in f32, with independent partial sums (vectorised on every tier).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if features().avx512bw && crate::cpu::tier() >= Tier::Avx512 {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512F was detected; lengths are equal (asserted).
        return unsafe { x86::dot_f32_avx512(a, b) };
    }
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// `sum f16(w[i]) * x[i]`, `w` as little-endian f16 bytes.
pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(w.len(), 2 * x.len());
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        if f.avx512bw && crate::cpu::tier() >= Tier::Avx512 {
            #[allow(unsafe_code)]
            // SAFETY: AVX-512F was detected; `w` holds exactly `x.len()` halves (asserted).
            return unsafe { x86::dot_f16_avx512(w, x) };
        }
        if f.avx2 && f.f16c && f.fma && crate::cpu::tier() >= Tier::Avx2 {
            #[allow(unsafe_code)]
            // SAFETY: AVX2, F16C and FMA were detected; lengths checked above.
            return unsafe { x86::dot_f16_avx2(w, x) };
        }
    }
    let mut s = 0.0f32;
    for (c, &v) in w.chunks_exact(2).zip(x) {
        s += half::f16::from_le_bytes([c[0], c[1]]).to_f32() * v;
    }
    s
}

/// `sum w[i] * x[i]` for a row of Q8_0 blocks (f16 `d`, 32 x i8; `w = d * q`), on AVX-512;
/// `None` on other tiers (callers dequantize the row instead).
pub fn dot_q8_0(row: &[u8], x: &[f32]) -> Option<f32> {
    assert_eq!(row.len() / 34 * 32, x.len());
    #[cfg(target_arch = "x86_64")]
    if block_dots_available() {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 detected; `row` holds `x.len() / 32` blocks of 34 bytes (asserted).
        return Some(unsafe { x86::dot_q8_0(row, x) });
    }
    None
}

/// [`dot_f16`] of four rows at once (the activation loads are shared); each result is bitwise
/// what `dot_f16` gives for its row (the same accumulators in the same order).
pub fn dot_f16_x4(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    for r in &w {
        assert_eq!(r.len(), 2 * x.len());
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx512bw && crate::cpu::tier() >= Tier::Avx512 {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512F was detected; every row holds exactly `x.len()` halves (asserted).
        return unsafe { x86::dot_f16_x4_avx512(w, x) };
    }
    w.map(|r| dot_f16(r, x))
}

/// [`dot_f16`] of four rows against four tokens (`out[row][token]`): each weight vector is
/// widened once for all four tokens; each result is bitwise what `dot_f16` gives.
pub fn dot_f16_4x4(w: [&[u8]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = x[0].len();
    for r in &w {
        assert_eq!(r.len(), 2 * n);
    }
    for t in &x {
        assert_eq!(t.len(), n);
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx512bw && crate::cpu::tier() >= Tier::Avx512 {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512F was detected; every row holds `n` halves and every token `n` floats
        // (asserted).
        return unsafe { x86::dot_f16_4x4_avx512(w, x) };
    }
    w.map(|r| x.map(|t| dot_f16(r, t)))
}

/// `sum w[i] * x[i]` for a row of Q4_1 blocks (f16 `d`, f16 `m`, 16 bytes of nibbles;
/// `w = d * q + m`, the dequantized values exactly), on AVX-512; `None` on other tiers.
pub fn dot_q4_1(row: &[u8], x: &[f32]) -> Option<f32> {
    assert_eq!(row.len() / 20 * 32, x.len());
    #[cfg(target_arch = "x86_64")]
    if block_dots_available() {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 detected; `row` holds `x.len() / 32` blocks of 20 bytes (asserted).
        return Some(unsafe { x86::dot_q4_1(row, x) });
    }
    None
}

/// Whether [`dot_q8_0`], [`dot_q4_1`] and their 2x4 forms run on this CPU (else they return
/// `None` and callers dequantize).
pub fn block_dots_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    if features().avx512bw && crate::cpu::tier() >= Tier::Avx512 {
        return true;
    }
    false
}

/// [`dot_q8_0`] of two rows against four tokens (`out[row][token]`): each block is widened once
/// for four tokens, and each result is bitwise what `dot_q8_0` gives (the same accumulators in
/// the same order), so a batch gives every token its one-token numbers. `None` on other tiers.
pub fn dot_q8_0_2x4(w: [&[u8]; 2], x: [&[f32]; 4]) -> Option<[[f32; 4]; 2]> {
    blocks_2x4::<34>(w, x)
}

/// [`dot_q4_1`] of two rows against four tokens, as [`dot_q8_0_2x4`].
pub fn dot_q4_1_2x4(w: [&[u8]; 2], x: [&[f32]; 4]) -> Option<[[f32; 4]; 2]> {
    blocks_2x4::<20>(w, x)
}

/// Two rows of `BYTES`-byte blocks (34: Q8_0, 20: Q4_1) against four tokens.
fn blocks_2x4<const BYTES: usize>(w: [&[u8]; 2], x: [&[f32]; 4]) -> Option<[[f32; 4]; 2]> {
    let n = x[0].len();
    assert!(
        n.is_multiple_of(32),
        "quantized rows hold whole 32-value blocks"
    );
    for r in &w {
        assert_eq!(r.len(), n / 32 * BYTES);
    }
    for t in &x {
        assert_eq!(t.len(), n);
    }
    #[cfg(target_arch = "x86_64")]
    if block_dots_available() {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 detected; both rows hold `n / 32` blocks of `BYTES` bytes and every
        // token `n` floats (asserted).
        return Some(unsafe { x86::dot_blocks_2x4::<BYTES>(w, x) });
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Two rows of 32-value blocks against four tokens; per (row, token) the two accumulators
    /// of `dot_q8_0` / `dot_q4_1`, fed in the same order.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_blocks_2x4<const BYTES: usize>(
        w: [&[u8]; 2],
        x: [&[f32]; 4],
    ) -> [[f32; 4]; 2] {
        let blocks = x[0].len() / 32;
        let mut acc = [[[_mm512_setzero_ps(); 2]; 4]; 2];
        // SAFETY: `check_2x4` checked that both rows hold `blocks` blocks and every token
        // `32 * blocks` floats.
        unsafe {
            for b in 0..blocks {
                // Each block's 32 weights as two vectors, computed exactly as the one-row
                // kernels do: Q8_0 (34-byte blocks) `q * d`, Q4_1 (20-byte blocks) `q * d + m`.
                // (Written out here: a helper function would not be inlined.)
                let mut wv = [[_mm512_setzero_ps(); 2]; 2];
                for (r, wr) in wv.iter_mut().enumerate() {
                    let blk = w[r].as_ptr().add(b * BYTES);
                    let d = half(u16::from_le_bytes([*blk, *blk.add(1)]));
                    if BYTES == 34 {
                        let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                        let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                        wr[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
                        wr[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
                    } else {
                        let m = half(u16::from_le_bytes([*blk.add(2), *blk.add(3)]));
                        let bytes =
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
                        let lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0xF));
                        let hi = _mm512_srli_epi32(bytes, 4);
                        wr[0] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m);
                        wr[1] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m);
                    }
                }
                for t in 0..4 {
                    for h in 0..2 {
                        let xv = _mm512_loadu_ps(x[t].as_ptr().add(32 * b + 16 * h));
                        for r in 0..2 {
                            acc[r][t][h] = _mm512_fmadd_ps(wv[r][h], xv, acc[r][t][h]);
                        }
                    }
                }
            }
        }
        let mut out = [[0.0f32; 4]; 2];
        for r in 0..2 {
            for t in 0..4 {
                out[r][t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
            }
        }
        out
    }

    /// Bytes ahead of the loads that the f16 row kernels prefetch into L2.
    const PREFETCH: usize = 8192;

    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 16 floats at `i < n - 15` of slices of length `n`.
        unsafe {
            while i + 64 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(
                        _mm512_loadu_ps(pa.add(i + 16 * k)),
                        _mm512_loadu_ps(pb.add(i + 16 * k)),
                        *a,
                    );
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i)),
                    _mm512_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 16;
            }
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut s = _mm512_reduce_add_ps(v);
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn half(bits: u16) -> __m512 {
        _mm512_set1_ps(half::f16::from_bits(bits).to_f32())
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(unsafe_code)]
    #[allow(clippy::needless_range_loop)] // `h` selects the half of the block for quants, activations and accumulator alike
    pub(super) unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 2];
        for (b, blk) in row.chunks_exact(34).enumerate() {
            let d = half(u16::from_le_bytes([blk[0], blk[1]]));
            // SAFETY: each load reads 16 bytes of the block's 32 quants and 16 floats of the
            // block's 32 activations, both in bounds.
            unsafe {
                for h in 0..2 {
                    let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.as_ptr().add(2 + 16 * h) as *const __m128i,
                    )));
                    let xv = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16 * h));
                    acc[h] = _mm512_fmadd_ps(_mm512_mul_ps(q, d), xv, acc[h]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_q4_1(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 2];
        let low = _mm512_set1_epi32(0xF);
        for (b, blk) in row.chunks_exact(20).enumerate() {
            let d = half(u16::from_le_bytes([blk[0], blk[1]]));
            let m = half(u16::from_le_bytes([blk[2], blk[3]]));
            // SAFETY: reads the block's 16 nibble bytes and its 32 activations, in bounds.
            unsafe {
                let bytes =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i));
                let qs = [_mm512_and_si512(bytes, low), _mm512_srli_epi32(bytes, 4)];
                for h in 0..2 {
                    // d * q + m with two roundings, as the dequantized values are.
                    let w = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(qs[h]), d), m);
                    let xv = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16 * h));
                    acc[h] = _mm512_fmadd_ps(w, xv, acc[h]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f16_avx512(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        // One accumulator, elements in order: the order every f16 kernel of this tier shares,
        // so one row gives the same bits alone, four at a time, or against four tokens.
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        // SAFETY: loads read 16 halves (32 bytes) at element `i < n - 15`; `w` has `2n` bytes.
        unsafe {
            while i + 16 <= n {
                if i % 64 == 0 {
                    // Rows are streamed once, back to back: keep the L2 ahead of the loads
                    // (prefetches past the end never fault).
                    _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(2 * i + PREFETCH) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(2 * i + PREFETCH + 64) as *const i8);
                }
                let h = _mm256_loadu_si256(pw.add(2 * i) as *const __m256i);
                acc = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(px.add(i)), acc);
                i += 16;
            }
        }
        let mut s = _mm512_reduce_add_ps(acc);
        for j in i..n {
            s += half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32() * x[j];
        }
        s
    }

    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f16_x4_avx512(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        let px = x.as_ptr();
        let pw = w.map(|r| r.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: loads read 16 halves (32 bytes) at element `i < n - 15` of rows of `2n` bytes
        // and 16 floats of `x`; prefetches past the end never fault.
        unsafe {
            while i + 16 <= n {
                let xv = _mm512_loadu_ps(px.add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    if i % 64 == 0 {
                        _mm_prefetch::<_MM_HINT_T1>(
                            pw[r].wrapping_add(2 * i + PREFETCH) as *const i8
                        );
                        _mm_prefetch::<_MM_HINT_T1>(
                            pw[r].wrapping_add(2 * i + PREFETCH + 64) as *const i8
                        );
                    }
                    let h = _mm256_loadu_si256(pw[r].add(2 * i) as *const __m256i);
                    *a = _mm512_fmadd_ps(_mm512_cvtph_ps(h), xv, *a);
                }
                i += 16;
            }
        }
        let mut out = [0.0f32; 4];
        for (r, a) in acc.iter().enumerate() {
            let mut s = _mm512_reduce_add_ps(*a);
            for j in i..n {
                s += half::f16::from_le_bytes([w[r][2 * j], w[r][2 * j + 1]]).to_f32() * x[j];
            }
            out[r] = s;
        }
        out
    }

    /// Four rows against four tokens: each weight vector is widened once for four tokens, and
    /// each of the 16 (row, token) sums has its own accumulator in the shared order.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f16_4x4_avx512(w: [&[u8]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = x[0].len();
        let px = x.map(|t| t.as_ptr());
        let pw = w.map(|r| r.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut i = 0;
        // SAFETY: loads read 16 halves at element `i < n - 15` of rows of `2n` bytes and 16
        // floats of each token of `n` floats (the caller checks the lengths).
        unsafe {
            while i + 16 <= n {
                let wv: [__m512; 4] = std::array::from_fn(|r| {
                    _mm512_cvtph_ps(_mm256_loadu_si256(pw[r].add(2 * i) as *const __m256i))
                });
                for t in 0..4 {
                    let xv = _mm512_loadu_ps(px[t].add(i));
                    for r in 0..4 {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                    }
                }
                i += 16;
            }
        }
        let mut out = [[0.0f32; 4]; 4];
        for r in 0..4 {
            for t in 0..4 {
                let mut s = _mm512_reduce_add_ps(acc[r][t]);
                for j in i..n {
                    s +=
                        half::f16::from_le_bytes([w[r][2 * j], w[r][2 * j + 1]]).to_f32() * x[t][j];
                }
                out[r][t] = s;
            }
        }
        out
    }

    #[target_feature(enable = "avx2,f16c,fma")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f16_avx2(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: loads read 8 halves (16 bytes) at element `i < n - 7`; `w` has `2n` bytes.
        unsafe {
            while i + 32 <= n {
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(2 * i + PREFETCH) as *const i8);
                for (k, a) in acc.iter_mut().enumerate() {
                    let h = _mm_loadu_si128(pw.add(2 * (i + 8 * k)) as *const __m128i);
                    *a =
                        _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(px.add(i + 8 * k)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                let h = _mm_loadu_si128(pw.add(2 * i) as *const __m128i);
                acc[0] = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(px.add(i)), acc[0]);
                i += 8;
            }
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let hi = _mm256_extractf128_ps(v, 1);
        let q = _mm_add_ps(_mm256_castps256_ps128(v), hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut s = _mm_cvtss_f32(q);
        for j in i..n {
            s += half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32() * x[j];
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_row_dots_match_dequantized() {
        let n = 256;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 13 % 37) as f32 - 18.0) / 7.0)
            .collect();
        let mut q8 = Vec::new();
        let mut q8_vals = Vec::new();
        let mut q41 = Vec::new();
        let mut q41_vals = Vec::new();
        for b in 0..n / 32 {
            let d = half::f16::from_f32(0.01 * (b + 1) as f32);
            let m = half::f16::from_f32(-0.05 * b as f32);
            q8.extend(d.to_le_bytes());
            q41.extend(d.to_le_bytes());
            q41.extend(m.to_le_bytes());
            for j in 0..32 {
                let q = ((b * 7 + j * 11) % 255) as u8 as i8;
                q8.push(q as u8);
                q8_vals.push(d.to_f32() * f32::from(q));
            }
            let nib: Vec<u8> = (0..16).map(|j| ((b * 5 + j * 3) % 256) as u8).collect();
            let mut vals = [0.0f32; 32];
            for (j, &v) in nib.iter().enumerate() {
                vals[j] = d.to_f32() * f32::from(v & 0xF) + m.to_f32();
                vals[j + 16] = d.to_f32() * f32::from(v >> 4) + m.to_f32();
            }
            q41.extend(&nib);
            q41_vals.extend(vals);
        }
        for (got, vals) in [
            (dot_q8_0(&q8, &x), &q8_vals),
            (dot_q4_1(&q41, &x), &q41_vals),
        ] {
            let exact: f64 = vals
                .iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let mag: f64 = vals
                .iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from((a * b).abs()))
                .sum();
            if let Some(g) = got {
                assert!(
                    (f64::from(g) - exact).abs() <= 1e-6 * mag + 1e-6,
                    "{g} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn two_by_four_block_dots_equal_single_row_dots_bitwise() {
        let mut seed = 9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for n in [32usize, 64, 576, 1536] {
            let blocks = n / 32;
            let mut rows8 = [Vec::new(), Vec::new()];
            let mut rows41 = [Vec::new(), Vec::new()];
            for r in 0..2 {
                for _ in 0..blocks {
                    let d = half::f16::from_f32((next() % 1000) as f32 * 1e-4 + 1e-4);
                    let m = half::f16::from_f32(-((next() % 1000) as f32) * 1e-4);
                    rows8[r].extend(d.to_le_bytes());
                    rows8[r].extend((0..32).map(|_| next() as u8));
                    rows41[r].extend(d.to_le_bytes());
                    rows41[r].extend(m.to_le_bytes());
                    rows41[r].extend((0..16).map(|_| next() as u8));
                }
            }
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|_| {
                    (0..n)
                        .map(|_| (next() % 2001) as f32 / 100.0 - 10.0)
                        .collect()
                })
                .collect();
            let x = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let w8 = [&rows8[0][..], &rows8[1][..]];
            let w41 = [&rows41[0][..], &rows41[1][..]];
            if let Some(got) = dot_q8_0_2x4(w8, x) {
                for r in 0..2 {
                    for t in 0..4 {
                        let one = dot_q8_0(w8[r], x[t]).unwrap();
                        assert_eq!(got[r][t].to_bits(), one.to_bits(), "q8_0 n {n} [{r}][{t}]");
                    }
                }
            }
            if let Some(got) = dot_q4_1_2x4(w41, x) {
                for r in 0..2 {
                    for t in 0..4 {
                        let one = dot_q4_1(w41[r], x[t]).unwrap();
                        assert_eq!(got[r][t].to_bits(), one.to_bits(), "q4_1 n {n} [{r}][{t}]");
                    }
                }
            }
        }
    }

    #[test]
    fn four_row_f16_dots_equal_single_row_dots_bitwise() {
        for n in [1usize, 15, 16, 63, 64, 65, 130, 576, 2560] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 29 % 97) as f32 - 48.0) / 13.0)
                .collect();
            let rows: Vec<Vec<u8>> = (0..4)
                .map(|r| {
                    (0..n)
                        .flat_map(|i| {
                            half::f16::from_f32(((i * 7 + r * 31) % 53) as f32 / 9.0 - 2.5)
                                .to_le_bytes()
                        })
                        .collect()
                })
                .collect();
            let got = dot_f16_x4([&rows[0], &rows[1], &rows[2], &rows[3]], &x);
            for r in 0..4 {
                assert_eq!(
                    got[r].to_bits(),
                    dot_f16(&rows[r], &x).to_bits(),
                    "n={n} row {r}"
                );
            }
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|t| x.iter().map(|v| v * (t as f32 + 0.5) - 0.1).collect())
                .collect();
            let got = dot_f16_4x4(
                [&rows[0], &rows[1], &rows[2], &rows[3]],
                [&xs[0], &xs[1], &xs[2], &xs[3]],
            );
            for r in 0..4 {
                for t in 0..4 {
                    assert_eq!(
                        got[r][t].to_bits(),
                        dot_f16(&rows[r], &xs[t]).to_bits(),
                        "n={n} row {r} token {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn dots_agree_with_f64() {
        for n in [1usize, 7, 16, 63, 64, 65, 1000, 2560] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0)
                .collect();
            let h: Vec<u8> = a
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let exact_h: f64 = h
                .chunks(2)
                .zip(&b)
                .map(|(c, &y)| {
                    f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()) * f64::from(y)
                })
                .sum();
            let mag: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from((x * y).abs()))
                .sum();
            assert!(
                (f64::from(dot_f32(&a, &b)) - exact).abs() <= 1e-6 * mag + 1e-6,
                "f32 n={n}"
            );
            assert!(
                (f64::from(dot_f16(&h, &b)) - exact_h).abs() <= 1e-6 * mag + 1e-6,
                "f16 n={n}"
            );
        }
    }
}
