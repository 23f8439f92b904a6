//! Ternary × int8 matrix products: weights repacked once into a kernel layout, dispatched to the
//! best tier, every tier equal to the scalar reference (`==`, integer results).
//!
//! Layout ("R4B256"): rows are grouped by 4; the row length is padded to a multiple of 256; for
//! each group and each 256-weight block, the 4 rows' blocks are stored one after another, 64
//! bytes each. Byte `j` of a block holds the codes (`w + 1`, 0..=2) of weights `j`, `j + 64`,
//! `j + 128`, `j + 192` at bits `1:0`, `3:2`, `5:4`, `7:6`. Shifting a 64-byte (or 32-byte)
//! load by 0, 2, 4, 6 and masking gives codes that line up with contiguous 64-byte (32-byte)
//! runs of the activations, which is what `vpdpbusd` / `vpmaddubsw` want. The weight stream of
//! a row group is read strictly front to back.
//!
//! With codes `c = w + 1`, `sum(w * x) = sum(c * x) - sum(x)`: the kernels compute the unsigned
//! × signed product the instructions offer and subtract the activation sum once.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use crate::buffer::AlignedBuf;
use crate::cpu::Tier;
use std::sync::Arc;

/// Prompts of at least this many tokens use the AMX tiles on the `amx` tier.
pub const AMX_MIN_TOKENS: usize = 16;

/// Whether this process may use AMX tiles (asks the kernel once).
pub(crate) fn amx_permission() -> bool {
    #[cfg(target_arch = "x86_64")]
    return amx::request_permission();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Weights per block.
pub const BLOCK: usize = 256;
/// Bytes per block of one row.
pub const BLOCK_BYTES: usize = 64;
/// Rows interleaved per group.
pub const ROWS: usize = 4;

/// A ternary matrix in the kernel layout.
#[derive(Debug, Clone)]
pub struct PackedTernary {
    rows: usize,
    cols: usize,
    blocks: usize,
    /// Shared so that a stacked matrix and views of its parts hold one copy.
    data: Arc<AlignedBuf>,
    /// Byte offset of this matrix's first group in `data`.
    start: usize,
}

impl PackedTernary {
    /// Repack row-major codes in {-1, 0, 1}. Panics on other values: callers validate codes
    /// (`bitnet_core::quant::TernaryMatrix::new` does).
    pub fn from_codes(codes: &[i8], rows: usize, cols: usize) -> Self {
        assert_eq!(codes.len(), rows * cols, "codes for a {rows}x{cols} matrix");
        let blocks = cols.div_ceil(BLOCK);
        let groups = rows.div_ceil(ROWS);
        let mut data = AlignedBuf::zeroed(groups * blocks * ROWS * BLOCK_BYTES);
        for r in 0..rows {
            let (g, ri) = (r / ROWS, r % ROWS);
            for (c, &w) in codes[r * cols..(r + 1) * cols].iter().enumerate() {
                assert!((-1..=1).contains(&w), "ternary code {w}");
                let (b, k) = (c / BLOCK, c % BLOCK);
                let at = ((g * blocks + b) * ROWS + ri) * BLOCK_BYTES + k % 64;
                data[at] |= ((w + 1) as u8) << (2 * (k / 64));
            }
        }
        Self {
            rows,
            cols,
            blocks,
            data: Arc::new(data),
            start: 0,
        }
    }

    /// Random ternary weights straight in the packed layout (benchmarks: a 2B model's weights
    /// in a second instead of building codes first). Padding stays zero.
    pub fn random(rows: usize, cols: usize, seed: u64) -> Self {
        let mut p = Self::from_codes(&[], 0, cols);
        p.rows = rows;
        let groups = rows.div_ceil(ROWS);
        let mut data = AlignedBuf::zeroed(groups * p.blocks * ROWS * BLOCK_BYTES);
        let mut s = seed | 1;
        for chunk in data.chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mut v = s;
            for b in chunk.iter_mut() {
                // Four 2-bit fields, each mapped from 0..4 onto codes 0..=2.
                let mut byte = 0u8;
                for f in 0..4 {
                    let c = ((v & 3) as u8).min(2);
                    byte |= c << (2 * f);
                    v >>= 2;
                }
                *b = byte;
            }
        }
        // Zero the codes of padding columns and rows so they hold no weights.
        let cols_pad = p.blocks * BLOCK;
        if cols_pad != cols || groups * ROWS != rows {
            for r in 0..groups * ROWS {
                for c in 0..cols_pad {
                    if r >= rows || c >= cols {
                        let (g, ri, b, k) = (r / ROWS, r % ROWS, c / BLOCK, c % BLOCK);
                        let at = ((g * p.blocks + b) * ROWS + ri) * BLOCK_BYTES + k % 64;
                        data[at] &= !(3 << (2 * (k / 64)));
                    }
                }
            }
        }
        p.data = Arc::new(data);
        p
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Stack matrices with the same row length into one (rows of the first, then the second...),
    /// so products sharing an input stream through one longer matrix. Every part but the last
    /// needs a multiple of 4 rows; `None` otherwise.
    pub fn concat_rows(parts: &[&PackedTernary]) -> Option<Self> {
        let first = parts.first()?;
        let ok = parts.iter().all(|p| p.cols == first.cols)
            && parts[..parts.len() - 1].iter().all(|p| p.rows % ROWS == 0);
        if !ok {
            return None;
        }
        let mut data = AlignedBuf::zeroed(parts.iter().map(|p| p.bytes()).sum());
        let mut at = 0;
        for p in parts {
            data[at..at + p.bytes()].copy_from_slice(p.raw());
            at += p.bytes();
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            blocks: first.blocks,
            data: Arc::new(data),
            start: 0,
        })
    }

    /// Rows `first..first + rows` as a matrix of their own, sharing this one's storage.
    /// `first` must start a row group; `None` otherwise or when out of range.
    pub fn view_rows(&self, first: usize, rows: usize) -> Option<Self> {
        if !first.is_multiple_of(ROWS) || first + rows > self.rows {
            return None;
        }
        Some(Self {
            rows,
            cols: self.cols,
            blocks: self.blocks,
            data: Arc::clone(&self.data),
            start: self.start + first / ROWS * self.group_bytes(),
        })
    }

    fn group_bytes(&self) -> usize {
        self.blocks * ROWS * BLOCK_BYTES
    }

    /// This matrix's packed bytes.
    fn raw(&self) -> &[u8] {
        &self.data[self.start..self.start + self.bytes()]
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Activation length the kernels read (the row length padded to whole blocks).
    pub fn padded_cols(&self) -> usize {
        self.blocks * BLOCK
    }

    /// Bytes of packed weights (what a GEMV streams from memory).
    pub fn bytes(&self) -> usize {
        self.groups() * self.group_bytes()
    }

    /// Code of weight `(r, c)`, decoded from the packed bytes.
    pub fn code(&self, r: usize, c: usize) -> i8 {
        let (g, ri, b, k) = (r / ROWS, r % ROWS, c / BLOCK, c % BLOCK);
        let at = ((g * self.blocks + b) * ROWS + ri) * BLOCK_BYTES + k % 64;
        ((self.raw()[at] >> (2 * (k / 64))) & 3) as i8 - 1
    }

    fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks * ROWS * BLOCK_BYTES;
        &self.raw()[g * len..(g + 1) * len]
    }

    /// Number of 4-row groups (the unit of parallel work).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(ROWS)
    }
}

/// Int8 activations for `n` tokens, each padded with zeros to the matrix's padded length, plus
/// each token's sum (for the `c = w + 1` correction).
#[derive(Debug, Clone, Default)]
pub struct QuantizedBatch {
    pub n: usize,
    pub stride: usize,
    pub values: Vec<i8>,
    pub sums: Vec<i32>,
}

impl QuantizedBatch {
    /// Room for `n` tokens of `stride` values (a multiple of [`BLOCK`]), zeroed.
    pub fn reset(&mut self, n: usize, stride: usize) {
        debug_assert_eq!(stride % BLOCK, 0);
        self.n = n;
        self.stride = stride;
        self.values.clear();
        self.values.resize(n * stride, 0);
        self.sums.clear();
        self.sums.resize(n, 0);
    }

    /// Token `t`'s values, to be filled by the caller (then call [`QuantizedBatch::finish`]).
    pub fn token_mut(&mut self, t: usize) -> &mut [i8] {
        &mut self.values[t * self.stride..(t + 1) * self.stride]
    }

    /// Compute the per-token sums after the values are written.
    pub fn finish(&mut self) {
        for t in 0..self.n {
            self.sums[t] = self.values[t * self.stride..(t + 1) * self.stride]
                .iter()
                .map(|&v| i32::from(v))
                .sum();
        }
    }
}

/// `out[t * out_stride + r] = sum_c w[r, c] * x[t, c]` for the rows of groups `groups` and every
/// token of `x`, on `tier`. Exact in i32.
pub fn gemm(
    tier: Tier,
    w: &PackedTernary,
    x: &QuantizedBatch,
    groups: std::ops::Range<usize>,
    out: &mut [i32],
    out_stride: usize,
) {
    assert!(
        out.len() >= x.n.saturating_sub(1) * out_stride + w.rows.min(groups.end * ROWS),
        "output buffer too small"
    );
    let acts = amx_acts(tier, x);
    gemm_into(tier, w, x, acts.as_ref(), groups, &mut |t, r, v| {
        out[t * out_stride + r..t * out_stride + r + v.len()].copy_from_slice(v)
    });
}

#[cfg(target_arch = "x86_64")]
type Acts = amx::PackedActs;
#[cfg(not(target_arch = "x86_64"))]
type Acts = ();

/// Activations prepacked for the AMX tiles, when this product runs on them.
fn amx_acts(tier: Tier, x: &QuantizedBatch) -> Option<Acts> {
    #[cfg(target_arch = "x86_64")]
    if tier == Tier::Amx && x.n >= AMX_MIN_TOKENS && crate::cpu::features().amx_usable {
        return Some(amx::PackedActs::new(x));
    }
    let _ = (tier, x);
    None
}

/// [`gemm`] over all rows, split between the threads of `pool` by row groups.
pub fn gemm_par(
    pool: &crate::pool::ThreadPool,
    tier: Tier,
    w: &PackedTernary,
    x: &QuantizedBatch,
    out: &mut [i32],
    out_stride: usize,
) {
    gemm_par_map(pool, tier, w, x, out, out_stride, &|_, _, d, o| {
        o.copy_from_slice(d)
    });
}

/// `map(token, first_row, dots, out)` of [`gemm_par_map`].
pub type RunMap<'a, T> = dyn Fn(usize, usize, &[i32], &mut [T]) + Sync + 'a;

/// [`gemm_par`] that hands the dot products to `map(token, first_row, dots, out)` inside the
/// threads, a run of consecutive rows of one token at a time, and writes what it leaves in
/// `out` (as long as `dots`): the float scaling of a layer runs in parallel, over whole runs.
pub fn gemm_par_map<T: Copy + Send + Default>(
    pool: &crate::pool::ThreadPool,
    tier: Tier,
    w: &PackedTernary,
    x: &QuantizedBatch,
    out: &mut [T],
    out_stride: usize,
    map: &RunMap<'_, T>,
) {
    assert!(
        out_stride >= w.rows && out.len() >= x.n * out_stride,
        "output buffer too small"
    );
    let acts = amx_acts(tier, x);
    // AMX works on pairs of 16-row tiles: hand each thread whole pairs.
    let align = if acts.is_some() { 32 } else { ROWS };
    crate::pool::par_columns(pool, out, out_stride, w.rows, align, &|cols, writer| {
        let groups = cols.start / ROWS..cols.end.div_ceil(ROWS);
        // This share's dots for every token, gathered first so the map and the writes run
        // over whole rows of the share rather than a few values per call.
        let width = cols.len();
        let mut dots = vec![0i32; x.n * width];
        gemm_into(tier, w, x, acts.as_ref(), groups, &mut |t, r, v| {
            let at = t * width + (r - cols.start);
            let dst = &mut dots[at..at + v.len()];
            if let (Ok(d), Ok(s)) = (
                <&mut [i32; ROWS]>::try_from(&mut *dst),
                <&[i32; ROWS]>::try_from(v),
            ) {
                // A group's run: a fixed-size copy, not a `memcpy` call per four values.
                *d = *s;
            } else {
                dst.copy_from_slice(v);
            }
        });
        let mut vals = vec![T::default(); width];
        for (t, d) in dots.chunks_exact(width).enumerate() {
            map(t, cols.start, d, &mut vals);
            writer.set_run(t, cols.start, &vals);
        }
    });
}

fn gemm_into(
    tier: Tier,
    w: &PackedTernary,
    x: &QuantizedBatch,
    acts: Option<&Acts>,
    groups: std::ops::Range<usize>,
    sink: &mut dyn FnMut(usize, usize, &[i32]),
) {
    assert_eq!(
        x.stride,
        w.padded_cols(),
        "activations padded to the matrix's blocks"
    );
    assert!(groups.end <= w.groups());
    #[cfg(target_arch = "x86_64")]
    if let Some(acts) = acts {
        amx::gemm_groups(w, x, acts, groups, sink);
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = acts;
    #[cfg(target_arch = "x86_64")]
    if x.n == 1 && matches!(tier, Tier::Avx512 | Tier::Amx) && crate::cpu::features().avx512vnni {
        // Decode: one call over the whole run of groups, results gathered then handed out.
        let len = w.blocks * ROWS * BLOCK_BYTES;
        let mut dots = vec![0i32; groups.len() * ROWS];
        avx512::gemv_groups(
            &w.raw()[groups.start * len..groups.end * len],
            w.blocks,
            &x.values,
            &mut dots,
        );
        let first = groups.start * ROWS;
        let valid = w.rows.saturating_sub(first).min(dots.len());
        dots.truncate(valid);
        dots.iter_mut().for_each(|d| *d -= x.sums[0]);
        sink(0, first, &dots);
        return;
    }
    for g in groups {
        let rows = (w.rows - g * ROWS).min(ROWS);
        let mut t = 0;
        while t < x.n {
            let nt = (x.n - t).min(4);
            let mut dots = [[0i32; ROWS]; 4];
            kernel(
                tier,
                w.group(g),
                w.blocks,
                &x.values[t * x.stride..],
                x.stride,
                nt,
                &mut dots,
            );
            for (j, d) in dots.iter().enumerate().take(nt) {
                let run: [i32; ROWS] = std::array::from_fn(|r| d[r] - x.sums[t + j]);
                sink(t + j, g * ROWS, &run[..rows]);
            }
            t += nt;
        }
    }
}

/// Sum of `c * x` for one row group and up to 4 tokens.
fn kernel(
    tier: Tier,
    w: &[u8],
    blocks: usize,
    x: &[i8],
    stride: usize,
    nt: usize,
    out: &mut [[i32; ROWS]; 4],
) {
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 | Tier::Amx if crate::cpu::features().avx512vnni => {
            avx512::group_dot(w, blocks, x, stride, nt, out)
        }
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 | Tier::Avx512 | Tier::Amx if crate::cpu::features().avx2 => {
            avx2::group_dot(w, blocks, x, stride, nt, out)
        }
        _ => scalar::group_dot(w, blocks, x, stride, nt, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// Every tier equals the plain definition, on shapes that are not multiples of the block or
    /// the row group, and on extreme activations.
    #[test]
    fn every_tier_equals_the_reference() {
        let mut seed = 1u64;
        for &(rows, cols, n) in &[
            (1, 1, 1),
            (3, 7, 2),
            (4, 256, 1),
            (5, 300, 3),
            (17, 513, 5),
            (8, 1024, 4),
            (33, 2560, 9),
            (6, 6912, 2),
            (70, 600, 37),
            (64, 256, 16),
            (100, 2560, 33),
        ] {
            let codes: Vec<i8> = (0..rows * cols)
                .map(|_| (lcg(&mut seed) % 3) as i8 - 1)
                .collect();
            let w = PackedTernary::from_codes(&codes, rows, cols);
            for (r, c) in [(0, 0), (rows - 1, cols - 1), (rows / 2, cols / 2)] {
                assert_eq!(w.code(r, c), codes[r * cols + c]);
            }
            let mut x = QuantizedBatch::default();
            x.reset(n, w.padded_cols());
            let mut xs = vec![0i8; n * cols];
            for t in 0..n {
                for c in 0..cols {
                    let v = match lcg(&mut seed) % 7 {
                        0 => -128,
                        1 => 127,
                        _ => lcg(&mut seed) as u8 as i8,
                    };
                    xs[t * cols + c] = v;
                    x.token_mut(t)[c] = v;
                }
            }
            x.finish();
            let want: Vec<i32> = (0..n)
                .flat_map(|t| {
                    let (codes, xs) = (&codes, &xs);
                    (0..rows).map(move |r| {
                        (0..cols)
                            .map(|c| i32::from(codes[r * cols + c]) * i32::from(xs[t * cols + c]))
                            .sum()
                    })
                })
                .collect();
            let pool = crate::pool::ThreadPool::new(2);
            for tier in crate::cpu::available_tiers() {
                let mut out = vec![0i32; n * rows];
                gemm(tier, &w, &x, 0..w.groups(), &mut out, rows);
                assert_eq!(out, want, "{tier} on {rows}x{cols} with {n} tokens");
                let mut par = vec![0i32; n * rows];
                gemm_par(&pool, tier, &w, &x, &mut par, rows);
                assert_eq!(
                    par, want,
                    "{tier} on 2 threads, {rows}x{cols} with {n} tokens"
                );
                let mut mapped = vec![0i64; n * rows];
                gemm_par_map(&pool, tier, &w, &x, &mut mapped, rows, &|t, r0, d, o| {
                    for (i, (o, &d)) in o.iter_mut().zip(d).enumerate() {
                        *o = i64::from(d) * 1000 + (t * rows + r0 + i) as i64;
                    }
                });
                let want_mapped: Vec<i64> = want
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| i64::from(d) * 1000 + i as i64)
                    .collect();
                assert_eq!(
                    mapped, want_mapped,
                    "{tier} mapped, {rows}x{cols}, {n} tokens"
                );
            }
        }
    }
}
