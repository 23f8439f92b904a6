//! AVX-512 tier: one 512-bit register per 16-lane accumulator of the shared order (see the
//! module above), so every function here equals its `scalar` twin bit for bit. Rows are
//! prefetched 8 KiB ahead into L2: the lm_head streams each row once.

use super::{Q4_1_BYTES, Q8_0_BYTES};
use std::arch::x86_64::*;

/// Bytes ahead of the loads that the row kernels prefetch into L2.
const PREFETCH: usize = 8192;

/// The shared reduction tree: lanes `(i, i + 8)`, then `(i, i + 4)`, `(i, i + 2)`, `(0, 1)`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn reduce(v: __m512) -> f32 {
    // Swap the 256-bit halves and add: lane i < 8 holds a[i] + a[i + 8].
    let s8 = _mm512_castps512_ps256(_mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0b11_10_11_10)));
    super::avx2::reduce8(s8)
}

/// 16 weights at element `i` of a row of `W`-byte floats (f32: 4, f16: 2), from pointer `p`.
/// A macro, not a function: LLVM does not inline `#[target_feature]` helpers reliably, and a
/// call per vector that returns through memory halves the kernel's speed (measured).
macro_rules! load16 {
    ($w:expr, $p:expr, $i:expr) => {
        if $w == 2 {
            _mm512_cvtph_ps(_mm256_loadu_si256($p.add(2 * $i) as *const __m256i))
        } else {
            _mm512_loadu_ps($p.add(4 * $i) as *const f32)
        }
    };
}

#[inline]
fn weight<const W: usize>(w: &[u8], i: usize) -> f32 {
    if W == 2 {
        half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32()
    } else {
        f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]])
    }
}

/// A row of `W`-byte floats: `w` holds `x.len()` of them (the caller checks).
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot<const W: usize>(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY: loads read 16 weights and 16 floats at element `i <= n - 16`; prefetches past
    // the end never fault.
    unsafe {
        while i + 16 <= n {
            if (W * i).is_multiple_of(128) {
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(W * i + PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(W * i + PREFETCH + 64) as *const i8);
            }
            acc = _mm512_fmadd_ps(load16!(W, pw, i), _mm512_loadu_ps(px.add(i)), acc);
            i += 16;
        }
    }
    let mut s = reduce(acc);
    for (j, &xj) in x.iter().enumerate().skip(i) {
        s += weight::<W>(w, j) * xj;
    }
    s
}

/// Four f16 rows against one token (each activation load shared), as four [`dot`]s.
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot_f16_x4(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    let px = x.as_ptr();
    let pw = w.map(|r| r.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: loads read 16 halves at element `i <= n - 16` of rows of `2n` bytes and 16
    // floats of `x`; prefetches past the end never fault.
    unsafe {
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(px.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                if i.is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T1>(pw[r].wrapping_add(2 * i + PREFETCH) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(
                        pw[r].wrapping_add(2 * i + PREFETCH + 64) as *const i8
                    );
                }
                *a = _mm512_fmadd_ps(load16!(2, pw[r], i), xv, *a);
            }
            i += 16;
        }
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        let mut s = reduce(acc[r]);
        for (j, &xj) in x.iter().enumerate().skip(i) {
            s += weight::<2>(w[r], j) * xj;
        }
        out[r] = s;
    }
    out
}

/// Four f16 rows against four tokens (`out[row][token]`): each weight vector is widened once
/// for four tokens; each of the 16 sums has its own accumulator in the shared order.
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot_f16_4x4(w: [&[u8]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = x[0].len();
    let px = x.map(|t| t.as_ptr());
    let pw = w.map(|r| r.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    // SAFETY: loads read 16 halves at element `i <= n - 16` of rows of `2n` bytes and 16
    // floats of each token of `n` floats (the caller checks the lengths).
    unsafe {
        while i + 16 <= n {
            let wv = [
                load16!(2, pw[0], i),
                load16!(2, pw[1], i),
                load16!(2, pw[2], i),
                load16!(2, pw[3], i),
            ];
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
            let mut s = reduce(acc[r][t]);
            for (j, &xj) in x[t].iter().enumerate().skip(i) {
                s += weight::<2>(w[r], j) * xj;
            }
            out[r][t] = s;
        }
    }
    out
}

/// A Q8_0 (`$bytes` = 34) or Q4_1 (20) block's 32 weights at pointer `$blk` as two vectors,
/// rounded as the dequantized values are: `q * d`, or `q * d + m` (a macro for the reason
/// [`load16`] is one).
macro_rules! block32 {
    ($bytes:expr, $blk:expr) => {{
        let blk: *const u8 = $blk;
        let d =
            _mm512_set1_ps(half::f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32());
        if $bytes == Q8_0_BYTES {
            let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
            [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d),
            ]
        } else {
            debug_assert_eq!($bytes, Q4_1_BYTES);
            let m = _mm512_set1_ps(
                half::f16::from_bits(u16::from_le_bytes([*blk.add(2), *blk.add(3)])).to_f32(),
            );
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
            let lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0xF));
            let hi = _mm512_srli_epi32(bytes, 4);
            [
                _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m),
                _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m),
            ]
        }
    }};
}

/// A row of Q8_0 / Q4_1 blocks: two accumulators (the block halves), added, reduced.
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot_blocks<const BYTES: usize>(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 2];
    for b in 0..row.len() / BYTES {
        // SAFETY: block `b` lies in `row`, and its 32 activations in `x` (the caller checks).
        unsafe {
            let wv = block32!(BYTES, row.as_ptr().add(b * BYTES));
            for h in 0..2 {
                let xv = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16 * h));
                acc[h] = _mm512_fmadd_ps(wv[h], xv, acc[h]);
            }
        }
    }
    reduce(_mm512_add_ps(acc[0], acc[1]))
}

/// Two rows of blocks against four tokens (`out[row][token]`): each block widened once for
/// four tokens, each sum in [`dot_blocks`]'s order.
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot_blocks_2x4<const BYTES: usize>(
    w: [&[u8]; 2],
    x: [&[f32]; 4],
) -> [[f32; 4]; 2] {
    let blocks = x[0].len() / 32;
    let mut acc = [[[_mm512_setzero_ps(); 2]; 4]; 2];
    for b in 0..blocks {
        // SAFETY: both rows hold `blocks` blocks and every token `32 * blocks` floats (the
        // caller checks).
        unsafe {
            let wv = [
                block32!(BYTES, w[0].as_ptr().add(b * BYTES)),
                block32!(BYTES, w[1].as_ptr().add(b * BYTES)),
            ];
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
            out[r][t] = reduce(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
        }
    }
    out
}
