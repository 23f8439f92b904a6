//! ggml tensor types: ids, names and block sizes.
//!
//! Ids and sizes follow `ggml/include/ggml.h` and gguf-py `gguf/constants.py`
//! (`GGML_QUANT_SIZES`); I2_S, TL1 and TL2 are bitnet.cpp's additions (`3rdparty/llama.cpp`
//! fork, `ggml.h`), whose ids 36-38 upstream once gave to the since-removed IQ4_NL_4_x types.

/// A ggml tensor element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    /// bitnet.cpp's 2-bit ternary type (id 36 in its ggml fork).
    I2_S,
    /// bitnet.cpp's int8 activation type (id 37), not used for weights in files.
    I8_S,
    /// bitnet.cpp lookup-table layouts (ids 38, 39), tied to the kernel build that made them.
    TL1,
    TL2,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// Which ggml the type ids of a file mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// Upstream ggml / llama.cpp ids.
    #[default]
    Upstream,
    /// bitnet.cpp's fork: ids 36-39 are I2_S, I8_S, TL1, TL2.
    BitnetCpp,
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialect::Upstream => "llama.cpp (upstream ggml type ids)",
            Dialect::BitnetCpp => "bitnet.cpp (types 36-39 = I2_S, I8_S, TL1, TL2)",
        })
    }
}

use GgmlType::*;

const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    // (type, id, name, block elements, block bytes)
    (F32, 0, "F32", 1, 4),
    (F16, 1, "F16", 1, 2),
    (Q4_0, 2, "Q4_0", 32, 18),
    (Q4_1, 3, "Q4_1", 32, 20),
    (Q5_0, 6, "Q5_0", 32, 22),
    (Q5_1, 7, "Q5_1", 32, 24),
    (Q8_0, 8, "Q8_0", 32, 34),
    (Q8_1, 9, "Q8_1", 32, 40),
    (Q2_K, 10, "Q2_K", 256, 84),
    (Q3_K, 11, "Q3_K", 256, 110),
    (Q4_K, 12, "Q4_K", 256, 144),
    (Q5_K, 13, "Q5_K", 256, 176),
    (Q6_K, 14, "Q6_K", 256, 210),
    (Q8_K, 15, "Q8_K", 256, 292),
    (IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (IQ2_XS, 17, "IQ2_XS", 256, 74),
    (IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (IQ1_S, 19, "IQ1_S", 256, 50),
    (IQ4_NL, 20, "IQ4_NL", 32, 18),
    (IQ3_S, 21, "IQ3_S", 256, 110),
    (IQ2_S, 22, "IQ2_S", 256, 82),
    (IQ4_XS, 23, "IQ4_XS", 256, 136),
    (I8, 24, "I8", 1, 1),
    (I16, 25, "I16", 1, 2),
    (I32, 26, "I32", 1, 4),
    (I64, 27, "I64", 1, 8),
    (F64, 28, "F64", 1, 8),
    (IQ1_M, 29, "IQ1_M", 256, 56),
    (BF16, 30, "BF16", 1, 2),
    (TQ1_0, 34, "TQ1_0", 256, 54),
    (TQ2_0, 35, "TQ2_0", 256, 66),
    // I2_S is sized per tensor (n/4 + 32 bytes): see `GgmlType::nbytes`.
    (I2_S, 36, "I2_S", 4, 1),
    (I8_S, 37, "I8_S", 1, 1),
    (TL1, 38, "TL1", 0, 0),
    (TL2, 39, "TL2", 0, 0),
    (MXFP4, 39, "MXFP4", 32, 17),
    (NVFP4, 40, "NVFP4", 64, 36),
    (Q1_0, 41, "Q1_0", 128, 18),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every variant is in TABLE")
    }

    /// The type for an id under a dialect; `None` for ids neither dialect defines.
    pub fn from_id(id: u32, dialect: Dialect) -> Option<Self> {
        let bitnet_only = |t: GgmlType| matches!(t, I2_S | I8_S | TL1 | TL2);
        let mut rows = TABLE.iter().filter(|r| r.1 == id).map(|r| r.0);
        match dialect {
            // bitnet.cpp's meaning wins where the ids collide (39: TL2, not MXFP4).
            Dialect::BitnetCpp => {
                let all: Vec<GgmlType> = rows.collect();
                all.iter()
                    .copied()
                    .find(|&t| bitnet_only(t))
                    .or_else(|| all.first().copied())
            }
            Dialect::Upstream => rows.find(|&t| !bitnet_only(t)),
        }
    }

    pub fn id(self) -> u32 {
        self.row().1
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Parse a type name as llama.cpp spells it (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        TABLE
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }

    /// Elements per block (1 for plain types). 0 for types whose size is not known here.
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.row().4
    }

    /// Bytes of a tensor of `n` elements whose rows are `row_len` long; `None` on overflow or
    /// when `row_len` is not a whole number of blocks.
    pub fn nbytes(self, n: u64, row_len: u64) -> Option<u64> {
        match self {
            // bitnet.cpp: `ggml_nbytes` = n/4 codes + a 32-byte tail holding the f32 scale.
            I2_S => n.is_multiple_of(4).then(|| n / 4 + 32),
            TL1 | TL2 => None,
            _ => {
                let bs = self.block_size() as u64;
                if bs == 0 || !row_len.is_multiple_of(bs) {
                    return None;
                }
                (n / bs).checked_mul(self.block_bytes() as u64)
            }
        }
    }

    /// Bits per weight of the type (I2_S counted without its 32-byte tail).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            I2_S => 2.0,
            TL1 | TL2 => f64::NAN,
            I8_S => 8.0,
            _ => self.block_bytes() as f64 * 8.0 / self.block_size() as f64,
        }
    }

    /// True for the ternary types.
    pub fn is_ternary(self) -> bool {
        matches!(self, TQ1_0 | TQ2_0 | I2_S | TL1 | TL2)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip() {
        for r in TABLE {
            let d = if matches!(r.0, I2_S | I8_S | TL1 | TL2) {
                Dialect::BitnetCpp
            } else {
                Dialect::Upstream
            };
            assert_eq!(GgmlType::from_id(r.1, d), Some(r.0));
            assert_eq!(GgmlType::from_name(r.2), Some(r.0));
        }
        assert_eq!(GgmlType::from_id(36, Dialect::Upstream), None);
        assert_eq!(GgmlType::from_id(39, Dialect::Upstream), Some(MXFP4));
        assert_eq!(GgmlType::from_id(39, Dialect::BitnetCpp), Some(TL2));
        assert_eq!(GgmlType::from_id(35, Dialect::BitnetCpp), Some(TQ2_0));
        assert_eq!(GgmlType::from_id(4, Dialect::Upstream), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(TQ2_0.nbytes(512, 256), Some(132));
        assert_eq!(TQ2_0.nbytes(100, 100), None);
        assert_eq!(I2_S.nbytes(256, 128), Some(96));
        assert_eq!(Q8_0.nbytes(64, 32), Some(68));
        assert_eq!(F32.nbytes(u64::MAX, 1), None);
        assert_eq!(TQ1_0.bits_per_weight(), 1.6875);
    }
}
