//! Token rows: pre-tokenized `.npy` arrays, or text packed into rows by a tokenizer.
//!
//! A row holds `seq_len + 1` tokens: the model reads the first `seq_len` and predicts the last
//! `seq_len`.

use crate::error::{Result, TrainError};
use std::path::Path;

/// `rows` rows of `width` token ids, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRows {
    pub width: usize,
    pub ids: Vec<u32>,
}

impl TokenRows {
    pub fn new(width: usize, ids: Vec<u32>) -> Self {
        Self { width, ids }
    }

    pub fn rows(&self) -> usize {
        self.ids.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.width..(i + 1) * self.width]
    }

    /// The largest id plus one (0 when empty).
    pub fn vocab_needed(&self) -> usize {
        self.ids.iter().max().map_or(0, |&m| m as usize + 1)
    }

    /// `count` rows starting at row `start`, wrapping around at the end (rows are used in
    /// order; a run longer than the data starts over).
    pub fn take_wrapping(&self, start: u64, count: usize) -> Vec<u32> {
        let n = self.rows() as u64;
        let mut out = Vec::with_capacity(count * self.width);
        for k in 0..count as u64 {
            out.extend_from_slice(self.row(((start + k) % n) as usize));
        }
        out
    }
}

/// Read a 2-D C-order `.npy` array of int32, int64 or uint32 token ids.
pub fn read_npy(path: &Path) -> Result<TokenRows> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::Data {
        path: path.into(),
        message: e.to_string(),
    })?;
    parse_npy(&bytes).map_err(|message| TrainError::Data {
        path: path.into(),
        message,
    })
}

/// Parse `.npy` bytes (format versions 1 to 3).
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<TokenRows, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("the .npy header runs past the end of the file")?;
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let k = format!("'{key}':");
        let at = header
            .find(&k)
            .ok_or_else(|| format!("the .npy header has no {key:?}"))?;
        Ok(header[at + k.len()..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("malformed descr in the .npy header")?;
    let elem = match descr {
        "<i4" => 4,
        "<u4" => 4,
        "<i8" => 8,
        "<u8" => 8,
        "|u1" | "|i1" => 1,
        other => {
            return Err(format!(
                "token ids must be little-endian int32, int64 or uint32; this array is {other:?}"
            ));
        }
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("the array is in Fortran order; save it in C order".into());
    }
    let shape = field("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("malformed shape in the .npy header")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension {s:?}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let [rows, width] = dims[..] else {
        return Err(format!(
            "token rows must be a 2-D array [N, seq_len + 1]; this one has shape {dims:?}"
        ));
    };
    if rows == 0 || width < 2 {
        return Err(format!(
            "the array [{rows}, {width}] holds no sequence (need at least one row of 2 tokens)"
        ));
    }
    let n = rows
        .checked_mul(width)
        .filter(|n| n.checked_mul(elem).is_some())
        .ok_or("the array's size overflows")?;
    let data = &bytes[end..];
    if data.len() != n * elem {
        return Err(format!(
            "the header promises {} bytes of data, the file holds {}",
            n * elem,
            data.len()
        ));
    }
    let mut ids = Vec::with_capacity(n);
    for (i, c) in data.chunks_exact(elem).enumerate() {
        let v: i128 = match descr {
            "<i4" => i32::from_le_bytes(c.try_into().expect("4 bytes")).into(),
            "<u4" => u32::from_le_bytes(c.try_into().expect("4 bytes")).into(),
            "<i8" => i64::from_le_bytes(c.try_into().expect("8 bytes")).into(),
            "<u8" => u64::from_le_bytes(c.try_into().expect("8 bytes")).into(),
            "|i1" => (c[0] as i8).into(),
            _ => c[0].into(),
        };
        let id = u32::try_from(v).map_err(|_| {
            format!(
                "token id {v} at row {}, column {} is not a valid id",
                i / width,
                i % width
            )
        })?;
        ids.push(id);
    }
    Ok(TokenRows { width, ids })
}

/// Write token rows as an int32 `.npy` (format 1.0), for tools and tests.
pub fn npy_bytes(rows: &TokenRows) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<i4', 'fortran_order': False, 'shape': ({}, {}), }}",
        rows.rows(),
        rows.width
    );
    // Pad so that the data starts on a 64-byte boundary, ending in a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.next_multiple_of(64) - total));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.ids.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &id in &rows.ids {
        out.extend_from_slice(&(id as i32).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips_and_hostile_headers_are_errors() {
        let rows = TokenRows::new(3, vec![1, 2, 3, 4, 5, 6]);
        let b = npy_bytes(&rows);
        assert_eq!(parse_npy(&b).unwrap(), rows);
        assert!(parse_npy(b"junk").is_err());
        let mut short = b.clone();
        short.truncate(b.len() - 1);
        assert!(parse_npy(&short).unwrap_err().contains("bytes of data"));
        let mut neg = b.clone();
        let at = neg.len() - 4;
        neg[at..].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(parse_npy(&neg).unwrap_err().contains("not a valid id"));
        // Same-length edits of the header's shape.
        let with_shape = |shape: &[u8; 6]| {
            let mut v = b.clone();
            let at = v.windows(6).position(|w| w == b"(2, 3)").unwrap();
            v[at..at + 6].copy_from_slice(shape);
            v
        };
        assert!(
            parse_npy(&with_shape(b"(6,)  "))
                .unwrap_err()
                .contains("2-D")
        );
        assert!(
            parse_npy(&with_shape(b"(9, 9)"))
                .unwrap_err()
                .contains("bytes of data")
        );
        assert!(
            parse_npy(&with_shape(b"(0, 3)"))
                .unwrap_err()
                .contains("no sequence")
        );
        let mut huge = b.clone();
        let at = huge.windows(6).position(|w| w == b"(2, 3)").unwrap();
        huge.splice(at..at + 6, b"(99999999999999999999, 3)".iter().copied());
        assert!(parse_npy(&huge).is_err());
    }
}
