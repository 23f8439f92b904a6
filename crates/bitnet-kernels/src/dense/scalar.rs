//! The portable tier and the reference every SIMD tier equals bit for bit: the same 16 lanes,
//! fused multiply-adds (`mul_add` rounds once, as `vfmadd` does) and the same reduction tree.

use super::{Q4_1_BYTES, Q8_0_BYTES, reduce16};

#[inline]
fn f16_at(w: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32()
}

#[inline]
fn f32_at(w: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]])
}

/// One 16-lane accumulator over whole runs of 16, reduced, then the tail added in order.
#[inline]
fn lanes16(n: usize, weight: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let full = n / 16 * 16;
    for i in (0..full).step_by(16) {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = weight(i + j).mul_add(x[i + j], *a);
        }
    }
    let mut s = reduce16(&acc);
    for (i, &xi) in x.iter().enumerate().skip(full) {
        s += weight(i) * xi;
    }
    s
}

pub fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    lanes16(x.len(), |i| f32_at(w, i), x)
}

pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    lanes16(x.len(), |i| f16_at(w, i), x)
}

/// Two 16-lane accumulators, one per half of each 32-value block, added lane-wise at the end.
#[inline]
fn blocks(row: &[u8], bytes: usize, x: &[f32], value: impl Fn(&[u8], usize) -> f32) -> f32 {
    let mut acc = [[0.0f32; 16]; 2];
    for (b, blk) in row.chunks_exact(bytes).enumerate() {
        for (h, a) in acc.iter_mut().enumerate() {
            for (j, l) in a.iter_mut().enumerate() {
                let k = 16 * h + j;
                *l = value(blk, k).mul_add(x[32 * b + k], *l);
            }
        }
    }
    let sum: [f32; 16] = std::array::from_fn(|j| acc[0][j] + acc[1][j]);
    reduce16(&sum)
}

/// Q8_0 (ggml `block_q8_0`: f16 `d`, 32 x i8): `w = q * d`, one rounding.
pub fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    blocks(row, Q8_0_BYTES, x, |blk, k| {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        f32::from(blk[2 + k] as i8) * d
    })
}

/// Q4_1 (ggml `block_q4_1`: f16 `d`, f16 `m`, 16 bytes of nibbles, value `k < 16` in the low
/// nibble of byte `k`, `k + 16` in its high nibble): `w = q * d + m`, two roundings, as the
/// dequantized values are.
pub fn dot_q4_1(row: &[u8], x: &[f32]) -> f32 {
    blocks(row, Q4_1_BYTES, x, |blk, k| {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let m = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32();
        let byte = blk[4 + k % 16];
        let q = if k < 16 { byte & 0xF } else { byte >> 4 };
        f32::from(q) * d + m
    })
}
