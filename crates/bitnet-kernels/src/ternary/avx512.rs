//! AVX-512 BW + VNNI: `vpdpbusd` multiplies 64 unsigned codes by 64 signed activations and adds
//! groups of four into 16 i32 lanes, so one instruction does 64 ternary MACs.

use super::{BLOCK, BLOCK_BYTES, ROWS};
use std::arch::x86_64::*;

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
    #[allow(unsafe_code)]
    // SAFETY: the caller dispatches here only when `avx512bw` and `avx512vnni` were detected;
    // the asserts above bound every load the kernels make (blocks * 256 bytes per weight row of
    // the group, blocks * 256 values per token, nt tokens).
    unsafe {
        match nt {
            1 => dot1(w.as_ptr(), blocks, x.as_ptr(), out),
            2 => dotn::<2>(w.as_ptr(), blocks, x.as_ptr(), stride, out),
            3 => dotn::<3>(w.as_ptr(), blocks, x.as_ptr(), stride, out),
            _ => dotn::<4>(w.as_ptr(), blocks, x.as_ptr(), stride, out),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn codes(v: __m512i, mask: __m512i) -> [__m512i; 4] {
    [
        _mm512_and_si512(v, mask),
        _mm512_and_si512(_mm512_srli_epi16(v, 2), mask),
        _mm512_and_si512(_mm512_srli_epi16(v, 4), mask),
        _mm512_and_si512(_mm512_srli_epi16(v, 6), mask),
    ]
}

/// One token (decode): the four 64-byte activation runs of a block are loaded once and shared
/// by the group's four rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
unsafe fn dot1(w: *const u8, blocks: usize, x: *const i8, out: &mut [[i32; ROWS]; 4]) {
    // SAFETY: `group_dot` checked that every pointer offset below stays inside `w` and `x`,
    // and dispatches here only when the CPU has the enabled features.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [_mm512_setzero_si512(); ROWS];
        for b in 0..blocks {
            let xb = x.add(b * BLOCK);
            let xv = [
                _mm512_loadu_si512(xb as *const _),
                _mm512_loadu_si512(xb.add(64) as *const _),
                _mm512_loadu_si512(xb.add(128) as *const _),
                _mm512_loadu_si512(xb.add(192) as *const _),
            ];
            let wb = w.add(b * ROWS * BLOCK_BYTES);
            for (r, a) in acc.iter_mut().enumerate() {
                let c = codes(
                    _mm512_loadu_si512(wb.add(r * BLOCK_BYTES) as *const _),
                    mask,
                );
                *a = _mm512_dpbusd_epi32(*a, c[0], xv[0]);
                *a = _mm512_dpbusd_epi32(*a, c[1], xv[1]);
                *a = _mm512_dpbusd_epi32(*a, c[2], xv[2]);
                *a = _mm512_dpbusd_epi32(*a, c[3], xv[3]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[0][r] = _mm512_reduce_add_epi32(*a);
        }
    }
}

/// Several tokens (prefill): each row's codes are unpacked once per block and applied to every
/// token.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
unsafe fn dotn<const NT: usize>(
    w: *const u8,
    blocks: usize,
    x: *const i8,
    stride: usize,
    out: &mut [[i32; ROWS]; 4],
) {
    // SAFETY: `group_dot` checked that every pointer offset below stays inside `w` and `x`,
    // and dispatches here only when the CPU has the enabled features.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [[_mm512_setzero_si512(); ROWS]; NT];
        for b in 0..blocks {
            let wb = w.add(b * ROWS * BLOCK_BYTES);
            for r in 0..ROWS {
                let c = codes(
                    _mm512_loadu_si512(wb.add(r * BLOCK_BYTES) as *const _),
                    mask,
                );
                for (t, at) in acc.iter_mut().enumerate() {
                    let xb = x.add(t * stride + b * BLOCK);
                    let mut a = at[r];
                    a = _mm512_dpbusd_epi32(a, c[0], _mm512_loadu_si512(xb as *const _));
                    a = _mm512_dpbusd_epi32(a, c[1], _mm512_loadu_si512(xb.add(64) as *const _));
                    a = _mm512_dpbusd_epi32(a, c[2], _mm512_loadu_si512(xb.add(128) as *const _));
                    a = _mm512_dpbusd_epi32(a, c[3], _mm512_loadu_si512(xb.add(192) as *const _));
                    at[r] = a;
                }
            }
        }
        for (t, at) in acc.iter().enumerate() {
            for (r, a) in at.iter().enumerate() {
                out[t][r] = _mm512_reduce_add_epi32(*a);
            }
        }
    }
}
