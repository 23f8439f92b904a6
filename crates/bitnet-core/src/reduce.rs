//! Float reductions that reproduce PyTorch's CPU results bit for bit.
//!
//! Absmean ternarization divides by `mean |W|`; for the codes and the stored scale to equal what
//! transformers produces, the mean must be summed in the same order PyTorch sums it. There are two
//! orders, because transformers' `WeightQuant.forward` is `@torch.compile`d:
//!
//! * [`TorchReduce::Aten`], eager PyTorch (`aten/src/ATen/native/cpu/SumKernel.cpp`, "cascade
//!   sum"): the row is read as 8-float vectors (the AVX2 kernel; AVX-512 builds register none for
//!   sums), summed by a 4-way interleaved multi-level cascade, the scalar tail and then the lanes
//!   folded in at the end. Above 32768 elements the range is split between threads
//!   (`at::parallel_for`) and the partial sums added in thread order, so the thread count matters.
//!   `mean` on CPU is `sum / numel` (`ReduceOps.cpp`). This order is machine-independent.
//! * [`TorchReduce::Inductor`], the C++ TorchInductor generates for the compiled function (one
//!   thread): `lanes`-wide running vector sums (16 on AVX-512, 8 on AVX2) with a cascade over
//!   4096-vector chunks, the tail added into the first lanes, then a butterfly horizontal sum.
//!   This is what `WeightQuant.apply` returns on a machine of that vector width.
//!
//! Both were checked against torch 2.15 on thousands of lengths (`scripts/golden/make_golden.py`).

/// Which PyTorch summation order to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchReduce {
    /// Eager ATen, with the intra-op thread count of the run being reproduced.
    Aten { threads: usize },
    /// TorchInductor's compiled reduction with this many f32 lanes, one thread.
    Inductor { lanes: usize },
}

impl Default for TorchReduce {
    /// Eager PyTorch on one thread: the machine-independent order the converter uses.
    fn default() -> Self {
        Self::Aten { threads: 1 }
    }
}

/// `at::internal::GRAIN_SIZE`: below this many elements a reduction runs on one thread.
const GRAIN_SIZE: usize = 32768;
/// `Vectorized<float>::size()` of the AVX2 kernel ATen's sum dispatches to on x86.
const ATEN_LANES: usize = 8;
/// `row_sum` interprets a row as `(-1, ILP)` and keeps `ILP` independent accumulators.
const ILP: usize = 4;
/// `multi_row_sum` keeps this many cascade levels.
const LEVELS: usize = 4;
/// Inductor's `CascadeSumHelper` chunk, in vectors.
const INDUCTOR_CHUNK: usize = 4096;

impl TorchReduce {
    /// `torch.sum` of a contiguous float32 tensor, all dimensions reduced.
    pub fn sum(&self, x: &[f32]) -> f32 {
        self.sum_map(x, |v| v)
    }

    /// `t.abs().sum()`, without materialising `|t|`.
    pub fn sum_abs(&self, x: &[f32]) -> f32 {
        self.sum_map(x, f32::abs)
    }

    /// `t.abs().mean()`: the sum divided by the element count, in f32.
    pub fn mean_abs(&self, x: &[f32]) -> f32 {
        if x.is_empty() {
            return f32::NAN;
        }
        self.sum_abs(x) / x.len() as f32
    }

    /// [`Self::sum_abs`] of `n` elements that `read(start, out)` fills in a block at a time
    /// (`out.len()` elements from flat index `start`), so a caller can widen a large tensor
    /// block by block instead of into one buffer. The Inductor order reads blocks of
    /// `4096 * lanes` elements; the ATen order reads everything into one buffer first.
    pub fn sum_abs_read(&self, n: usize, read: &mut dyn FnMut(usize, &mut [f32])) -> f32 {
        match *self {
            TorchReduce::Inductor { lanes } => match lanes {
                4 => inductor_sum_read::<4>(n, f32::abs, read),
                8 => inductor_sum_read::<8>(n, f32::abs, read),
                16 => inductor_sum_read::<16>(n, f32::abs, read),
                32 => inductor_sum_read::<32>(n, f32::abs, read),
                _ => inductor_sum_read::<1>(n, f32::abs, read),
            },
            TorchReduce::Aten { .. } => {
                let mut all = vec![0.0f32; n];
                read(0, &mut all);
                self.sum_abs(&all)
            }
        }
    }

    fn sum_map(&self, x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f32 {
        match *self {
            TorchReduce::Aten { threads } => aten_sum(x, threads, f),
            TorchReduce::Inductor { lanes } => match lanes {
                4 => inductor_sum::<4>(x, f),
                8 => inductor_sum::<8>(x, f),
                16 => inductor_sum::<16>(x, f),
                32 => inductor_sum::<32>(x, f),
                _ => inductor_sum::<1>(x, f),
            },
        }
    }
}

fn aten_sum(x: &[f32], threads: usize, f: impl Fn(f32) -> f32 + Copy) -> f32 {
    let n = x.len();
    let threads = threads.max(1).min(n.div_ceil(GRAIN_SIZE)).max(1);
    if threads == 1 {
        return 0.0 + inner_sum(x, ATEN_LANES, f);
    }
    // at::parallel_for: chunk = ceil(n / threads); each thread reduces into its own buffer
    // (starting at zero) and the buffers are then added in order.
    let chunk = n.div_ceil(threads);
    let mut total = 0.0f32;
    for part in x.chunks(chunk) {
        total += 0.0 + inner_sum(part, ATEN_LANES, f);
    }
    total
}

/// Inductor's vectorised sum (one thread).
fn inductor_sum<const L: usize>(x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f32 {
    let mut sum = InductorSum::<L>::new(x.len());
    let body = x.len() / L * L;
    for chunk in x[..body].chunks(INDUCTOR_CHUNK * L) {
        sum.chunk(chunk, f);
    }
    sum.finish(&x[body..], f)
}

/// Inductor's sum of `n` elements, fed one chunk of `INDUCTOR_CHUNK * L` elements at a time.
struct InductorSum<const L: usize> {
    depth: usize,
    stk: Vec<[f32; L]>,
    num_chunks: usize,
}

impl<const L: usize> InductorSum<L> {
    fn new(n: usize) -> Self {
        let depth = ceil_log2((n / L).div_ceil(INDUCTOR_CHUNK)) as usize;
        Self {
            depth,
            stk: vec![[0.0f32; L]; depth.max(1)],
            num_chunks: 0,
        }
    }

    /// The next chunk: whole vectors, `INDUCTOR_CHUNK` of them except for the last.
    fn chunk(&mut self, chunk: &[f32], f: impl Fn(f32) -> f32 + Copy) {
        let (depth, stk) = (self.depth, &mut self.stk);
        for v in chunk.chunks_exact(L) {
            for (a, &e) in stk[0].iter_mut().zip(v) {
                *a += f(e);
            }
        }
        if depth > 0 && chunk.len() == INDUCTOR_CHUNK * L {
            self.num_chunks += 1;
            let (mut mask, mut j) = (self.num_chunks, 1);
            while j < depth && mask & 1 == 0 {
                let lower = std::mem::replace(&mut stk[j - 1], [0.0; L]);
                for (a, b) in stk[j].iter_mut().zip(lower) {
                    *a += b;
                }
                mask >>= 1;
                j += 1;
            }
        }
    }

    /// Fold the levels, add the `n % L` tail elements into the first lanes and sum the lanes.
    fn finish(self, tail: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f32 {
        let mut acc = self.stk[0];
        for level in &self.stk[1..] {
            for (a, &b) in acc.iter_mut().zip(level) {
                *a += b;
            }
        }
        for (a, &e) in acc.iter_mut().zip(tail) {
            *a += f(e);
        }
        // Butterfly horizontal sum: lane i += lane i ^ d for d = L/2 .. 1.
        let mut d = L / 2;
        while d >= 1 {
            let prev = acc;
            for (i, a) in acc.iter_mut().enumerate() {
                *a = prev[i] + prev[i ^ d];
            }
            d /= 2;
        }
        0.0 + acc[0]
    }
}

/// [`InductorSum`] over elements produced a chunk at a time by `read(start, out)`.
fn inductor_sum_read<const L: usize>(
    n: usize,
    f: impl Fn(f32) -> f32 + Copy,
    read: &mut dyn FnMut(usize, &mut [f32]),
) -> f32 {
    let mut sum = InductorSum::<L>::new(n);
    let body = n / L * L;
    let mut buf = vec![0.0f32; (INDUCTOR_CHUNK * L).min(body)];
    let mut start = 0;
    while start < body {
        let len = (INDUCTOR_CHUNK * L).min(body - start);
        read(start, &mut buf[..len]);
        sum.chunk(&buf[..len], f);
        start += len;
    }
    let mut tail = [0.0f32; L];
    let tail = &mut tail[..n - body];
    read(body, tail);
    sum.finish(tail, f)
}

/// The inner (contiguous) reduction of one range: vectorised when at least one full vector fits.
fn inner_sum(x: &[f32], lanes: usize, f: impl Fn(f32) -> f32 + Copy) -> f32 {
    match lanes {
        4 => inner_sum_vec::<4>(x, f),
        8 => inner_sum_vec::<8>(x, f),
        16 => inner_sum_vec::<16>(x, f),
        _ => row_sum_scalar(x, f),
    }
}

fn inner_sum_vec<const L: usize>(x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f32 {
    if x.len() < L {
        return row_sum_scalar(x, f);
    }
    let nvec = x.len() / L;
    let vacc = row_sum_vec::<L>(&x[..nvec * L], f);
    let mut acc = 0.0f32;
    for &v in &x[nvec * L..] {
        acc += f(v);
    }
    for lane in vacc {
        acc += lane;
    }
    acc
}

/// `row_sum` over scalars.
fn row_sum_scalar(x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f32 {
    let rows = x.len() / ILP;
    let mut partial = multi_row_sum(
        rows,
        |i, k| f(x[i * ILP + k]),
        |a: &mut f32, b: f32| *a += b,
        0.0f32,
    );
    for &v in &x[rows * ILP..] {
        partial[0] += f(v);
    }
    let mut acc = partial[0];
    for p in &partial[1..] {
        acc += *p;
    }
    acc
}

/// `row_sum` over vectors of `L` floats; returns the lanes of the final vector accumulator.
fn row_sum_vec<const L: usize>(x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> [f32; L] {
    let nvec = x.len() / L;
    let rows = nvec / ILP;
    let load = |v: usize| -> [f32; L] { std::array::from_fn(|l| f(x[v * L + l])) };
    let add = |a: &mut [f32; L], b: [f32; L]| {
        for (ai, bi) in a.iter_mut().zip(b) {
            *ai += bi;
        }
    };
    let mut partial = multi_row_sum(rows, |i, k| load(i * ILP + k), add, [0.0f32; L]);
    for v in rows * ILP..nvec {
        add(&mut partial[0], load(v));
    }
    let [mut acc, rest @ ..] = partial;
    for p in rest {
        add(&mut acc, p);
    }
    acc
}

#[allow(clippy::needless_range_loop)] // indices mirror the accumulator layout being reproduced
/// `multi_row_sum`: `ILP` interleaved accumulators, each a `LEVELS`-deep cascade whose level `j`
/// is flushed into level `j + 1` every `2^(j * level_power)` rows.
fn multi_row_sum<T: Clone>(
    rows: usize,
    load: impl Fn(usize, usize) -> T,
    add: impl Fn(&mut T, T),
    zero: T,
) -> [T; ILP] {
    let level_power = 4.max(ceil_log2(rows) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc: [[T; ILP]; LEVELS] =
        std::array::from_fn(|_| std::array::from_fn(|_| zero.clone()));
    let mut i = 0usize;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = std::mem::replace(&mut acc[j - 1][k], zero.clone());
                add(&mut acc[j][k], lower);
            }
            let mask = level_mask << (j as u32 * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < rows {
        for k in 0..ILP {
            add(&mut acc[0][k], load(i, k));
        }
        i += 1;
    }
    let [mut first, rest @ ..] = acc;
    for level in rest {
        for (k, v) in level.into_iter().enumerate() {
            add(&mut first[k], v);
        }
    }
    first
}

/// `c10::utils::CeilLog2`: 0 for 0 and 1, else the bit length of `n - 1`.
fn ceil_log2(n: usize) -> u32 {
    if n <= 1 {
        0
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_reads_sum_in_the_same_order() {
        // Lengths around the chunk (65536 at 16 lanes), several cascade levels and tails.
        let mut x = 0x2545_f491u32;
        let data: Vec<f32> = (0..300_001)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 0.02
            })
            .collect();
        for lanes in [1, 8, 16] {
            let r = TorchReduce::Inductor { lanes };
            for n in [
                0,
                5,
                16,
                65_535,
                65_536,
                65_537,
                131_072 + 7,
                262_144,
                300_001,
            ] {
                let v = &data[..n];
                let mut reads = 0;
                let got = r.sum_abs_read(n, &mut |s, out| {
                    reads += 1;
                    out.copy_from_slice(&v[s..s + out.len()]);
                });
                assert_eq!(
                    got.to_bits(),
                    r.sum_abs(v).to_bits(),
                    "lanes {lanes}, n {n}"
                );
                assert!(n < 65_536 * lanes || reads > 1);
            }
        }
        let aten = TorchReduce::default();
        let got = aten.sum_abs_read(1000, &mut |s, out| {
            out.copy_from_slice(&data[s..s + out.len()])
        });
        assert_eq!(got.to_bits(), aten.sum_abs(&data[..1000]).to_bits());
    }

    #[test]
    fn small_sums_are_exact() {
        for r in [TorchReduce::default(), TorchReduce::Inductor { lanes: 16 }] {
            let x: Vec<f32> = (1..=1000).map(|i| i as f32).collect();
            assert_eq!(r.sum(&x), 500500.0);
            assert_eq!(r.mean_abs(&[-2.0, 2.0, 4.0, -4.0]), 3.0);
            assert!(r.mean_abs(&[]).is_nan());
        }
    }

    #[test]
    fn accurate_on_long_inputs() {
        // The cascade keeps the error small where a naive loop would drift.
        let x = vec![0.1f32; 3_000_000];
        for r in [
            TorchReduce::Aten { threads: 1 },
            TorchReduce::Aten { threads: 2 },
            TorchReduce::Inductor { lanes: 16 },
        ] {
            let s = r.sum(&x) as f64;
            // ATen's cascade stays within 1e-6; Inductor's running sums over 4096-vector chunks
            // drift more but stay close.
            let tol = if matches!(r, TorchReduce::Aten { .. }) {
                1e-6
            } else {
                1e-3
            };
            assert!((s - 300_000.0).abs() / 300_000.0 < tol, "{r:?}: {s}");
        }
    }
}
