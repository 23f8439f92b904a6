//! Tensor data to f32, computing exactly what gguf-py's `gguf.quants.dequantize` computes
//! (same operations, same order, f32 throughout), so results compare with `==`.

use super::types::GgmlType;
use crate::error::{FormatError, Result};
use bitnet_core::packed::{i2s, tq1, tq2};
use half::f16;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `data` holding `n` elements of type `ty` (in file order) into a new vector.
/// `name` only labels errors.
pub fn dequantize(name: &str, ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; n];
    dequantize_into(name, ty, data, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into a caller's buffer; `out.len()` is the element count.
pub fn dequantize_into(name: &str, ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    let expected = ty.nbytes(n as u64, ty.block_size().max(1) as u64);
    if expected != Some(data.len() as u64) {
        return Err(FormatError::BadTensor {
            name: name.to_string(),
            reason: format!("{} bytes of {ty} data cannot hold {n} elements", data.len()),
        });
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(data, 2 * i);
            }
        }
        GgmlType::BF16 => {
            // bf16 is the high half of an f32: a shift, bit for bit what `bf16::to_f32` and
            // PyTorch's widening give (NaN payloads included), in a loop the compiler
            // vectorises.
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        GgmlType::F64 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
        GgmlType::I8 => {
            for (o, &b) in out.iter_mut().zip(data) {
                *o = f32::from(b as i8);
            }
        }
        GgmlType::I16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32::from(i16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::I32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        // block_q8_0: f16 d, 32 x i8. x = d * q.
        GgmlType::Q8_0 => {
            for (b, y) in data.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for (v, &q) in y.iter_mut().zip(&b[2..]) {
                    *v = d * f32::from(q as i8);
                }
            }
        }
        // block_q4_0: f16 d, 16 bytes; low nibbles are elements 0..16, high nibbles 16..32.
        GgmlType::Q4_0 => {
            for (b, y) in data.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..].iter().enumerate() {
                    y[j] = d * f32::from((q & 0xF) as i8 - 8);
                    y[j + 16] = d * f32::from((q >> 4) as i8 - 8);
                }
            }
        }
        // block_q4_1: f16 d, f16 m, 16 bytes. x = d * q + m (two roundings, as numpy does).
        GgmlType::Q4_1 => {
            for (b, y) in data.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..].iter().enumerate() {
                    y[j] = d * f32::from(q & 0xF) + m;
                    y[j + 16] = d * f32::from(q >> 4) + m;
                }
            }
        }
        // block_q5_0: f16 d, u32 qh (the 5th bits), 16 bytes of nibbles. x = d * (q - 16).
        GgmlType::Q5_0 => {
            for (b, y) in data.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (j, &q) in b[6..].iter().enumerate() {
                    let h0 = ((qh >> j) & 1) << 4;
                    let h1 = ((qh >> (j + 16)) & 1) << 4;
                    y[j] = d * ((u32::from(q & 0xF) | h0) as i32 - 16) as f32;
                    y[j + 16] = d * ((u32::from(q >> 4) | h1) as i32 - 16) as f32;
                }
            }
        }
        // block_q5_1: f16 d, f16 m, u32 qh, 16 bytes. x = d * q + m.
        GgmlType::Q5_1 => {
            for (b, y) in data.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for (j, &q) in b[8..].iter().enumerate() {
                    let h0 = ((qh >> j) & 1) << 4;
                    let h1 = ((qh >> (j + 16)) & 1) << 4;
                    y[j] = d * (u32::from(q & 0xF) | h0) as f32 + m;
                    y[j + 16] = d * (u32::from(q >> 4) | h1) as f32 + m;
                }
            }
        }
        GgmlType::TQ2_0 => tq2::dequantize(data, out)?,
        GgmlType::TQ1_0 => tq1::dequantize(data, out)?,
        GgmlType::I2_S => i2s::dequantize(data, out)?,
        other => {
            return Err(FormatError::CannotDequantize {
                name: name.to_string(),
                ty: other.to_string(),
            });
        }
    }
    Ok(())
}

/// Types [`dequantize`] supports.
pub fn can_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | F64
            | I8
            | I16
            | I32
            | Q8_0
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | TQ1_0
            | TQ2_0
            | I2_S
    )
}

/// Quantize to Q8_0 exactly as ggml's `quantize_row_q8_0_ref` and gguf-py do: per 32 values,
/// `d = max|x| / 127`, `q = round_half_away(x / d)` (as `x * (1/d)`), `d` stored as f16.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(32) {
        return Err(FormatError::BadTensor {
            name: "Q8_0 input".into(),
            reason: format!(
                "{} values are not a whole number of 32-value blocks",
                x.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let d = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}
