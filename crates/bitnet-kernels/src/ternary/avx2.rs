//! AVX2: `vpmaddubsw` multiplies 32 unsigned codes by 32 signed activations into 16 i16 pair
//! sums (at most 2 * 128 * 2 = 512, no saturation), `vpmaddwd` widens them to i32.

use super::{BLOCK, BLOCK_BYTES, ROWS};
use std::arch::x86_64::*;

/// How far ahead of the current block the kernel prefetches weights into L2.
const PREFETCH: usize = 8192;

pub(super) fn group_dot(
    w: &[u8],
    blocks: usize,
    x: &[i8],
    stride: usize,
    nt: usize,
    out: &mut [[i32; ROWS]; 4],
) {
    assert!(w.len() >= blocks * ROWS * BLOCK_BYTES);
    assert!(x.len() >= (nt - 1) * stride + blocks * BLOCK && nt <= 4);
    for (t, o) in out.iter_mut().enumerate().take(nt) {
        #[allow(unsafe_code)]
        // SAFETY: dispatched here only when `avx2` was detected; the asserts above bound the
        // loads (blocks * 256 bytes per row of the group and per token).
        unsafe {
            dot1(w.as_ptr(), blocks, x.as_ptr().add(t * stride), o);
        }
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn madd(acc: __m256i, c: __m256i, x: __m256i, ones: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones))
}

#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn dot1(w: *const u8, blocks: usize, x: *const i8, out: &mut [i32; ROWS]) {
    // SAFETY: `group_dot` checked that every pointer offset below stays inside `w` and `x`,
    // and dispatches here only when the CPU has the enabled features.
    unsafe {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); ROWS];
        for b in 0..blocks {
            let xb = x.add(b * BLOCK);
            let wb = w.add(b * ROWS * BLOCK_BYTES);
            for r in 0..ROWS {
                _mm_prefetch::<_MM_HINT_T1>(
                    wb.wrapping_add(PREFETCH + r * BLOCK_BYTES) as *const i8
                );
            }
            for half in 0..2 {
                let xv = [
                    _mm256_loadu_si256(xb.add(32 * half) as *const _),
                    _mm256_loadu_si256(xb.add(64 + 32 * half) as *const _),
                    _mm256_loadu_si256(xb.add(128 + 32 * half) as *const _),
                    _mm256_loadu_si256(xb.add(192 + 32 * half) as *const _),
                ];
                for (r, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(wb.add(r * BLOCK_BYTES + 32 * half) as *const _);
                    *a = madd(*a, _mm256_and_si256(v, mask), xv[0], ones);
                    *a = madd(
                        *a,
                        _mm256_and_si256(_mm256_srli_epi16(v, 2), mask),
                        xv[1],
                        ones,
                    );
                    *a = madd(
                        *a,
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                        xv[2],
                        ones,
                    );
                    *a = madd(
                        *a,
                        _mm256_and_si256(_mm256_srli_epi16(v, 6), mask),
                        xv[3],
                        ones,
                    );
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let s = _mm_add_epi32(_mm256_castsi256_si128(*a), _mm256_extracti128_si256(*a, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            out[r] = _mm_cvtsi128_si32(s);
        }
    }
}
