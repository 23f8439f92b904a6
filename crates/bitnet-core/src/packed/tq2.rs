//! llama.cpp TQ2_0: 256 ternary weights in 64 bytes of 2-bit codes plus an f16 scale.
//!
//! Layout (`ggml/src/ggml-common.h` `block_tq2_0`, `ggml-quants.c` `quantize_row_tq2_0_ref`):
//! within each 32-byte half of `qs`, byte `m` holds weights `m, m+32, m+64, m+96` of that
//! 128-weight half at bits `1:0, 3:2, 5:4, 7:6`, each as `code + 1`. A weight is `(q - 1) * d`.

use super::hf::{decode, encode};
use crate::error::{Result, check_len};
use half::f16;

/// Weights per block (`QK_K`).
pub const QK: usize = 256;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 66;

/// `block_tq2_0` as ggml lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockTq2_0 {
    pub qs: [u8; QK / 4],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockTq2_0>() == BLOCK_BYTES);

/// Pack codes (a multiple of 256) with one f16 scale per block.
pub fn pack(codes: &[i8], d: &[f16]) -> Result<Vec<u8>> {
    check_len("TQ2_0 block scales", codes.len() / QK, d.len())?;
    check_len("TQ2_0 codes", d.len() * QK, codes.len())?;
    // Validate in one branch-free pass, then pack without per-weight checks.
    if codes
        .iter()
        .fold(false, |bad, &c| bad | !(-1..=1).contains(&c))
    {
        let (i, &c) = codes
            .iter()
            .enumerate()
            .find(|(_, c)| !(-1..=1).contains(*c))
            .expect("a bad code was seen");
        encode(c, i)?;
    }
    let mut out = Vec::with_capacity(d.len() * BLOCK_BYTES);
    for (block, &scale) in codes.chunks(QK).zip(d) {
        let mut qs = [0u8; QK / 4];
        for half in 0..2 {
            for l in 0..4 {
                let run = &block[half * 128 + l * 32..half * 128 + l * 32 + 32];
                for (q, &c) in qs[half * 32..half * 32 + 32].iter_mut().zip(run) {
                    *q |= ((c + 1) as u8) << (2 * l);
                }
            }
        }
        out.extend_from_slice(bytemuck::bytes_of(&BlockTq2_0 { qs, d: scale }));
    }
    Ok(out)
}

/// Unpack to codes and the per-block scales; a 2-bit code of 3 is an error.
pub fn unpack(data: &[u8]) -> Result<(Vec<i8>, Vec<f16>)> {
    check_len(
        "TQ2_0 bytes",
        data.len() / BLOCK_BYTES * BLOCK_BYTES,
        data.len(),
    )?;
    let nb = data.len() / BLOCK_BYTES;
    let (mut codes, mut d) = (vec![0i8; nb * QK], Vec::with_capacity(nb));
    for (b, (raw, out)) in data
        .chunks_exact(BLOCK_BYTES)
        .zip(codes.chunks_exact_mut(QK))
        .enumerate()
    {
        let blk: BlockTq2_0 = bytemuck::pod_read_unaligned(raw);
        // A field of 3 has both bits set: find it in one pass over the block's bytes.
        if blk.qs.iter().any(|&q| q & (q >> 1) & 0x55 != 0) {
            for i in 0..QK {
                let (half, l, m) = (i / 128, (i % 128) / 32, i % 32);
                decode((blk.qs[half * 32 + m] >> (2 * l)) & 3, b * QK + i)?;
            }
        }
        for half in 0..2 {
            for l in 0..4 {
                let run = &mut out[half * 128 + l * 32..half * 128 + l * 32 + 32];
                for (c, &q) in run.iter_mut().zip(&blk.qs[half * 32..half * 32 + 32]) {
                    *c = ((q >> (2 * l)) & 3) as i8 - 1;
                }
            }
        }
        d.push(blk.d);
    }
    Ok((codes, d))
}

/// Dequantize as ggml and gguf-py do: `(q - 1) * d` with `q` in 0..=3 (3 gives `2 d`).
pub fn dequantize(data: &[u8], out: &mut [f32]) -> Result<()> {
    check_len("TQ2_0 output", data.len() / BLOCK_BYTES * QK, out.len())?;
    check_len("TQ2_0 bytes", out.len() / QK * BLOCK_BYTES, data.len())?;
    for (raw, y) in data.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let blk: BlockTq2_0 = bytemuck::pod_read_unaligned(raw);
        let d = blk.d.to_f32();
        for (i, v) in y.iter_mut().enumerate() {
            let (half, l, m) = (i / 128, (i % 128) / 32, i % 32);
            let q = (blk.qs[half * 32 + m] >> (2 * l)) & 3;
            *v = d * f32::from(q as i8 - 1);
        }
    }
    Ok(())
}
