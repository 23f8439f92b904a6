//! AVX2 tier (with FMA and F16C): each 16-lane accumulator of the shared order is two 256-bit
//! registers (lanes 0-7 and 8-15), so every function here equals its `scalar` twin bit for bit.
//! The row-blocked forms (4 rows, 4 tokens) would need more registers than AVX2 has; they run
//! one dot at a time on this tier, with the same results.

use super::{Q4_1_BYTES, Q8_0_BYTES};
use std::arch::x86_64::*;

const PREFETCH: usize = 8192;

/// Lanes `(i, i + 4)`, `(i, i + 2)`, `(0, 1)` of 8: the tail of the shared reduction tree.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn reduce8(s8: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// A 16-lane accumulator as (lanes 0-7, lanes 8-15), reduced in the shared order.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce(lo: __m256, hi: __m256) -> f32 {
    reduce8(_mm256_add_ps(lo, hi))
}

/// 8 weights at element `i` of a row of `W`-byte floats, from pointer `p` (a macro: see
/// `avx512::load16`).
macro_rules! load8 {
    ($w:expr, $p:expr, $i:expr) => {
        if $w == 2 {
            _mm256_cvtph_ps(_mm_loadu_si128($p.add(2 * $i) as *const __m128i))
        } else {
            _mm256_loadu_ps($p.add(4 * $i) as *const f32)
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

/// A row of `W`-byte floats (f32: 4, f16: 2): `w` holds `x.len()` of them (the caller checks).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot<const W: usize>(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: loads read 16 weights and 16 floats at element `i <= n - 16`; prefetches past
    // the end never fault.
    unsafe {
        while i + 16 <= n {
            if (W * i).is_multiple_of(128) {
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(W * i + PREFETCH) as *const i8);
            }
            lo = _mm256_fmadd_ps(load8!(W, pw, i), _mm256_loadu_ps(px.add(i)), lo);
            hi = _mm256_fmadd_ps(load8!(W, pw, i + 8), _mm256_loadu_ps(px.add(i + 8)), hi);
            i += 16;
        }
    }
    let mut s = reduce(lo, hi);
    for (j, &xj) in x.iter().enumerate().skip(i) {
        s += weight::<W>(w, j) * xj;
    }
    s
}

/// 8 of a block's weights (`$part` 0..4: values `8 * part ..`) at pointer `$blk`, rounded as
/// the dequantized values are: Q8_0 `q * d`, Q4_1 `q * d + m` (a macro: see `load8`).
macro_rules! block8 {
    ($bytes:expr, $blk:expr, $part:expr) => {{
        let (blk, part): (*const u8, usize) = ($blk, $part);
        let d =
            _mm256_set1_ps(half::f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32());
        if $bytes == Q8_0_BYTES {
            let q = _mm_loadl_epi64(blk.add(2 + 8 * part) as *const __m128i);
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
        } else {
            debug_assert_eq!($bytes, Q4_1_BYTES);
            let m = _mm256_set1_ps(
                half::f16::from_bits(u16::from_le_bytes([*blk.add(2), *blk.add(3)])).to_f32(),
            );
            // Values 0-15 are the low nibbles of bytes 0-15, values 16-31 the high ones.
            let bytes = _mm_loadl_epi64(blk.add(4 + 8 * (part % 2)) as *const __m128i);
            let v = _mm256_cvtepu8_epi32(bytes);
            let q = if part < 2 {
                _mm256_and_si256(v, _mm256_set1_epi32(0xF))
            } else {
                _mm256_srli_epi32(v, 4)
            };
            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m)
        }
    }};
}

/// A row of Q8_0 / Q4_1 blocks: the two block-half accumulators as four registers.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
pub(super) unsafe fn dot_blocks<const BYTES: usize>(row: &[u8], x: &[f32]) -> f32 {
    // acc[h][k]: block half h, lanes 8k..8k+8.
    let mut acc = [[_mm256_setzero_ps(); 2]; 2];
    for b in 0..row.len() / BYTES {
        // SAFETY: block `b` lies in `row`, and its 32 activations in `x` (the caller checks).
        unsafe {
            let blk = row.as_ptr().add(b * BYTES);
            for (part, a) in acc.iter_mut().flatten().enumerate() {
                let xv = _mm256_loadu_ps(x.as_ptr().add(32 * b + 8 * part));
                *a = _mm256_fmadd_ps(block8!(BYTES, blk, part), xv, *a);
            }
        }
    }
    reduce(
        _mm256_add_ps(acc[0][0], acc[1][0]),
        _mm256_add_ps(acc[0][1], acc[1][1]),
    )
}
