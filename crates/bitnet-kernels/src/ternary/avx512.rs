//! AVX-512 BW + VNNI: `vpdpbusd` multiplies 64 unsigned bytes by 64 signed activations and adds
//! groups of four into 16 i32 lanes, so one instruction does 64 ternary MACs.
//!
//! The four 2-bit fields of a weight byte are isolated with an AND only, never shifted: field
//! `g` then reads as `c * 4^g` (at most 128, still an unsigned byte), so its products land in
//! their own accumulator scaled by `4^g`, and each accumulator is shifted back, exactly, once at
//! the end. That leaves one AND and one `vpdpbusd` per 64 weights.

use super::{BLOCK, BLOCK_BYTES, ROWS};
use std::arch::x86_64::*;

/// How far ahead of the current block the decode kernel prefetches weights.
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

/// The four fields of 64 weight bytes, each still scaled by `4^g`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn fields(v: __m512i) -> [__m512i; 4] {
    [
        _mm512_and_si512(v, _mm512_set1_epi8(0x03)),
        _mm512_and_si512(v, _mm512_set1_epi8(0x0C)),
        _mm512_and_si512(v, _mm512_set1_epi8(0x30)),
        _mm512_and_si512(v, _mm512_set1_epi8(0xC0u8 as i8)),
    ]
}

/// Undo the `4^g` scaling (exact: every lane is a sum of multiples of `4^g`) and add up.
#[inline]
#[target_feature(enable = "avx512f")]
fn combine(acc: &[__m512i; 4]) -> i32 {
    let v = _mm512_add_epi32(
        _mm512_add_epi32(acc[0], _mm512_srai_epi32(acc[1], 2)),
        _mm512_add_epi32(_mm512_srai_epi32(acc[2], 4), _mm512_srai_epi32(acc[3], 6)),
    );
    _mm512_reduce_add_epi32(v)
}

/// Decode over a run of row groups at once: `w` holds `out.len() / 4` consecutive groups.
pub(super) fn gemv_groups(w: &[u8], blocks: usize, x: &[i8], out: &mut [i32]) {
    let groups = out.len() / ROWS;
    assert!(w.len() >= groups * blocks * ROWS * BLOCK_BYTES && x.len() >= blocks * BLOCK);
    let stride = blocks * ROWS * BLOCK_BYTES;
    for (g, o) in out.chunks_exact_mut(ROWS).enumerate() {
        let mut d = [[0i32; ROWS]; 4];
        #[allow(unsafe_code)]
        // SAFETY: dispatched only with `avx512bw` + `avx512vnni`; group `g` lies inside `w`
        // (asserted above) and the token inside `x`.
        unsafe {
            dot1(w.as_ptr().add(g * stride), blocks, x.as_ptr(), &mut d);
        }
        o.copy_from_slice(&d[0]);
    }
}

/// One token (decode): the four 64-byte activation runs of a block are loaded once and shared
/// by the group's four rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
#[inline]
unsafe fn dot1(w: *const u8, blocks: usize, x: *const i8, out: &mut [[i32; ROWS]; 4]) {
    let mut acc = [[_mm512_setzero_si512(); 4]; ROWS];
    // SAFETY: `group_dot` checked that every pointer offset below stays inside `w` and `x`;
    // prefetches of addresses past the end never fault.
    unsafe {
        for b in 0..blocks {
            let xb = x.add(b * BLOCK);
            let xv = [
                _mm512_loadu_si512(xb as *const _),
                _mm512_loadu_si512(xb.add(64) as *const _),
                _mm512_loadu_si512(xb.add(128) as *const _),
                _mm512_loadu_si512(xb.add(192) as *const _),
            ];
            let wb = w.add(b * ROWS * BLOCK_BYTES);
            for r in 0..ROWS {
                _mm_prefetch::<_MM_HINT_T1>(
                    wb.wrapping_add(PREFETCH + r * BLOCK_BYTES) as *const i8
                );
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let c = fields(_mm512_loadu_si512(wb.add(r * BLOCK_BYTES) as *const _));
                for g in 0..4 {
                    a[g] = _mm512_dpbusd_epi32(a[g], c[g], xv[g]);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        out[0][r] = combine(a);
    }
}

/// Several tokens (prefill): the group's four rows and up to four tokens are blocked in
/// registers (16 accumulators), so each activation load feeds four rows and each weight field
/// four tokens. Fields are shifted down to plain codes here (their cost is shared by the
/// tokens), which lets the four fields of a row and token share one accumulator.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
unsafe fn dotn<const NT: usize>(
    w: *const u8,
    blocks: usize,
    x: *const i8,
    stride: usize,
    out: &mut [[i32; ROWS]; 4],
) {
    let mut acc = [[_mm512_setzero_si512(); ROWS]; NT];
    let mask = _mm512_set1_epi8(0x03);
    // SAFETY: `group_dot` checked that every pointer offset below stays inside `w` and `x`.
    unsafe {
        for b in 0..blocks {
            let wb = w.add(b * ROWS * BLOCK_BYTES);
            let raw: [__m512i; ROWS] =
                std::array::from_fn(|r| _mm512_loadu_si512(wb.add(r * BLOCK_BYTES) as *const _));
            for g in 0..4 {
                let f: [__m512i; ROWS] = std::array::from_fn(|r| {
                    let v = match g {
                        0 => raw[r],
                        1 => _mm512_srli_epi16(raw[r], 2),
                        2 => _mm512_srli_epi16(raw[r], 4),
                        _ => _mm512_srli_epi16(raw[r], 6),
                    };
                    _mm512_and_si512(v, mask)
                });
                for (t, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_si512(x.add(t * stride + b * BLOCK + 64 * g) as *const _);
                    for r in 0..ROWS {
                        a[r] = _mm512_dpbusd_epi32(a[r], f[r], xv);
                    }
                }
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        for r in 0..ROWS {
            out[t][r] = _mm512_reduce_add_epi32(a[r]);
        }
    }
}
