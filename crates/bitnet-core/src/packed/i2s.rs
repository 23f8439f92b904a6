//! bitnet.cpp I2_S (x86 layout): 128-weight blocks of 32 bytes and one f32 scale per tensor.
//!
//! Layout (microsoft/BitNet `src/ggml-bitnet-mad.cpp`, `quantize_i2_s`): byte `p` of a block
//! holds weights `p, p+32, p+64, p+96` at bits `7:6, 5:4, 3:2, 1:0`, each as `code + 1`. After
//! the `n/4` code bytes comes the f32 scale, in a 32-byte tail kept for alignment. A weight is
//! `code * scale`; bitnet.cpp's quantizer stores `max|W|` of the already-ternary weights, which
//! is the absmean scale.

use super::hf::{decode, encode};
use crate::error::{CoreError, Result, check_len};

/// Weights per block (`QK_I2_S` on x86).
pub const QK: usize = 128;
/// The scale tail after the codes.
pub const TAIL_BYTES: usize = 32;

/// Bytes of an I2_S tensor of `n` weights (`ggml_nbytes`: `n / 4 + 32`).
pub fn nbytes(n: usize) -> usize {
    n / 4 + TAIL_BYTES
}

#[inline]
fn place(i: usize) -> (usize, u32) {
    let (blk, j) = (i / QK, i % QK);
    (blk * 32 + j % 32, 6 - 2 * (j / 32) as u32)
}

/// Pack codes (a multiple of 128) with the tensor's scale.
pub fn pack(codes: &[i8], scale: f32) -> Result<Vec<u8>> {
    if !codes.len().is_multiple_of(QK) {
        return Err(CoreError::NotMultiple {
            format: "I2_S",
            what: "the element count",
            multiple: QK,
            found: codes.len(),
        });
    }
    let mut out = vec![0u8; nbytes(codes.len())];
    for (i, &c) in codes.iter().enumerate() {
        let (byte, shift) = place(i);
        out[byte] |= encode(c, i)? << shift;
    }
    let n4 = codes.len() / 4;
    out[n4..n4 + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(out)
}

fn scale_of(data: &[u8], n: usize) -> f32 {
    let n4 = n / 4;
    f32::from_le_bytes([data[n4], data[n4 + 1], data[n4 + 2], data[n4 + 3]])
}

/// Unpack `n` codes and the scale.
pub fn unpack(data: &[u8], n: usize) -> Result<(Vec<i8>, f32)> {
    check_len("I2_S bytes", nbytes(n), data.len())?;
    let codes = (0..n)
        .map(|i| {
            let (byte, shift) = place(i);
            decode((data[byte] >> shift) & 3, i)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((codes, scale_of(data, n)))
}

/// Dequantize as bitnet.cpp does: `(q - 1) * scale` (a 2-bit 3 gives `2 * scale`).
pub fn dequantize(data: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    check_len("I2_S bytes", nbytes(n), data.len())?;
    let s = scale_of(data, n);
    for (i, v) in out.iter_mut().enumerate() {
        let (byte, shift) = place(i);
        *v = f32::from(((data[byte] >> shift) & 3) as i8 - 1) * s;
    }
    Ok(())
}
