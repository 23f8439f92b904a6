//! The Hugging Face packed ternary layout of `microsoft/bitnet-b1.58-2B-4T`.
//!
//! A `[rows, cols]` matrix is stored as uint8 `[rows/4, cols]`: bits `2i+1:2i` of byte `[r, c]`
//! hold weight `[i * rows/4 + r, c]` as `code + 1`, so the four quarters of the rows are packed
//! on top of each other (transformers `integrations/bitnet.py`, `pack_weights`/`unpack_weights`).

use crate::error::{CoreError, Result, check_len};

/// Pack row-major codes of a `[rows, cols]` matrix. Rows beyond a multiple of 4 are padded the
/// way transformers pads them (byte bits left zero, which unpack as -1: keep the true row count).
pub fn pack(codes: &[i8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    check_len("codes", rows * cols, codes.len())?;
    let prow = rows.div_ceil(4);
    let mut out = vec![0u8; prow * cols];
    for (r, row) in codes.chunks(cols.max(1)).enumerate().take(rows) {
        let (quarter, pr) = (r / prow.max(1), r % prow.max(1));
        let dst = &mut out[pr * cols..(pr + 1) * cols];
        for (i, (d, &c)) in dst.iter_mut().zip(row).enumerate() {
            *d |= encode(c, r * cols + i)? << (2 * quarter);
        }
    }
    Ok(out)
}

/// Unpack a uint8 `[packed_rows, cols]` tensor to the `[4 * packed_rows, cols]` codes.
pub fn unpack(packed: &[u8], packed_rows: usize, cols: usize) -> Result<Vec<i8>> {
    check_len("packed bytes", packed_rows * cols, packed.len())?;
    let mut out = vec![0i8; 4 * packed.len()];
    for quarter in 0..4 {
        let dst = &mut out[quarter * packed.len()..(quarter + 1) * packed.len()];
        for (i, (d, &b)) in dst.iter_mut().zip(packed).enumerate() {
            *d = decode((b >> (2 * quarter)) & 3, quarter * packed.len() + i)?;
        }
    }
    Ok(out)
}

pub(crate) fn encode(code: i8, index: usize) -> Result<u8> {
    match code {
        -1..=1 => Ok((code + 1) as u8),
        _ => Err(CoreError::BadCode { index, code }),
    }
}

pub(crate) fn decode(bits: u8, index: usize) -> Result<i8> {
    if bits == 3 {
        Err(CoreError::BadPackedCode {
            format: "2-bit ternary",
            index,
        })
    } else {
        Ok(bits as i8 - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_docstring_example() {
        // The example in transformers' `unpack_weights` docstring.
        let packed = [0b1010_0001u8, 0b0001_1000, 0b1001_0000, 0b0000_1010];
        let codes = unpack(&packed, 2, 2).unwrap();
        assert_eq!(
            codes,
            [0, -1, -1, 1, -1, 1, -1, 1, 1, 0, 0, -1, 1, -1, 1, -1]
        );
        assert_eq!(pack(&codes, 8, 2).unwrap(), packed);
    }

    #[test]
    fn code_three_is_an_error() {
        assert!(matches!(
            unpack(&[0b11], 1, 1),
            Err(CoreError::BadPackedCode { .. })
        ));
        assert!(pack(&[2], 1, 1).is_err());
    }
}
