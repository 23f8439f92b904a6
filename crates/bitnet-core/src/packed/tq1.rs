//! llama.cpp TQ1_0: 256 ternary weights in 54 bytes (1.6875 bits per weight).
//!
//! Layout (`ggml/src/ggml-common.h` `block_tq1_0`, `ggml-quants.c` `quantize_row_tq1_0_ref`):
//! `qs[48]` packs five trits per byte and `qh[4]` four, as a fixed-point fraction of 3^5 so
//! that multiplying the byte by 3 and keeping the high byte peels off the next trit:
//! byte `= ceil(v * 256 / 243)` where `v` is the base-3 number of the trits, most significant
//! first. Weights `n*32 + m` (n < 5) live in `qs[m]`, weights `160 + n*16 + m` in `qs[32 + m]`,
//! weights `240 + n*4 + j` in `qh[j]`; trit `n` is the `n`-th most significant. Then an f16 `d`.

use crate::error::{CoreError, Result, check_len};
use half::f16;

/// Weights per block (`QK_K`).
pub const QK: usize = 256;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 54;

/// `block_tq1_0` as ggml lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockTq1_0 {
    pub qs: [u8; (QK - 4 * QK / 64) / 5],
    pub qh: [u8; QK / 64],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockTq1_0>() == BLOCK_BYTES);

/// `(byte index, trit position)` of weight `i` in a block; bytes 48..52 are `qh`.
#[inline]
fn place(i: usize) -> (usize, u32) {
    match i {
        0..160 => (i % 32, (i / 32) as u32),
        160..240 => (32 + (i - 160) % 16, ((i - 160) / 16) as u32),
        _ => (48 + (i - 240) % 4, ((i - 240) / 4) as u32),
    }
}

/// Extract trit `n` (0 = most significant) of a packed byte.
#[inline]
fn trit(byte: u8, n: u32) -> u8 {
    let q = byte.wrapping_mul(3u8.pow(n));
    ((u16::from(q) * 3) >> 8) as u8
}

/// Pack codes (a multiple of 256) with one f16 scale per block.
pub fn pack(codes: &[i8], d: &[f16]) -> Result<Vec<u8>> {
    check_len("TQ1_0 block scales", codes.len() / QK, d.len())?;
    check_len("TQ1_0 codes", d.len() * QK, codes.len())?;
    let mut out = Vec::with_capacity(d.len() * BLOCK_BYTES);
    for (b, (block, &scale)) in codes.chunks(QK).zip(d).enumerate() {
        // Base-3 value of each byte, most significant trit first; qh bytes hold 4 trits and a
        // trailing zero trit.
        let mut v = [0u16; 52];
        for (i, &c) in block.iter().enumerate() {
            if !(-1..=1).contains(&c) {
                return Err(CoreError::BadCode {
                    index: b * QK + i,
                    code: c,
                });
            }
            let (byte, n) = place(i);
            v[byte] += (c + 1) as u16 * 3u16.pow(4 - n);
        }
        let mut raw = [0u8; 52];
        for (r, &val) in raw.iter_mut().zip(&v) {
            // Ceiling division so that the trit extraction in `trit` rounds back exactly.
            *r = (val * 256).div_ceil(243) as u8;
        }
        let mut blk = BlockTq1_0 {
            qs: [0; 48],
            qh: [0; 4],
            d: scale,
        };
        blk.qs.copy_from_slice(&raw[..48]);
        blk.qh.copy_from_slice(&raw[48..]);
        out.extend_from_slice(bytemuck::bytes_of(&blk));
    }
    Ok(out)
}

fn codes_of(blk: &BlockTq1_0) -> [u8; QK] {
    std::array::from_fn(|i| {
        let (byte, n) = place(i);
        let raw = if byte < 48 {
            blk.qs[byte]
        } else {
            blk.qh[byte - 48]
        };
        trit(raw, n)
    })
}

/// Unpack to codes and the per-block scales. Every byte value decodes to valid trits.
pub fn unpack(data: &[u8]) -> Result<(Vec<i8>, Vec<f16>)> {
    check_len(
        "TQ1_0 bytes",
        data.len() / BLOCK_BYTES * BLOCK_BYTES,
        data.len(),
    )?;
    let nb = data.len() / BLOCK_BYTES;
    let (mut codes, mut d) = (Vec::with_capacity(nb * QK), Vec::with_capacity(nb));
    for raw in data.chunks_exact(BLOCK_BYTES) {
        let blk: BlockTq1_0 = bytemuck::pod_read_unaligned(raw);
        codes.extend(codes_of(&blk).iter().map(|&t| t as i8 - 1));
        d.push(blk.d);
    }
    Ok((codes, d))
}

/// Dequantize as ggml and gguf-py do: `(trit - 1) * d`.
pub fn dequantize(data: &[u8], out: &mut [f32]) -> Result<()> {
    check_len("TQ1_0 output", data.len() / BLOCK_BYTES * QK, out.len())?;
    check_len("TQ1_0 bytes", out.len() / QK * BLOCK_BYTES, data.len())?;
    for (raw, y) in data.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let blk: BlockTq1_0 = bytemuck::pod_read_unaligned(raw);
        let d = blk.d.to_f32();
        for (v, t) in y.iter_mut().zip(codes_of(&blk)) {
            *v = d * f32::from(t as i8 - 1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_decodes_to_trits() {
        for b in 0..=255u8 {
            for n in 0..5 {
                assert!(trit(b, n) <= 2, "byte {b} trit {n}");
            }
        }
    }
}
