//! Float reductions that reproduce PyTorch's CPU results bit for bit.
//!
//! Absmean ternarization divides by `mean |W|`; for the codes and the stored scale to equal what
//! transformers produces, the mean must be summed in the same order as PyTorch's CPU `sum`
//! kernel (`aten/src/ATen/native/cpu/SumKernel.cpp`, "cascade sum"): the row is read as SIMD
//! vectors of `lanes` floats, the vectors are summed by a 4-way interleaved multi-level cascade,
//! and the scalar tail and the vector lanes are folded in at the end. Long inputs are split
//! between threads (`at::parallel_for` with a grain of 32768) and the per-thread partial sums
//! are added in thread order. `mean` on CPU is `sum(...) / numel` (`ReduceOps.cpp`).

/// How PyTorch would run the reduction: the SIMD width it dispatched (8 floats for AVX2, 16 for
/// AVX-512) and how many intra-op threads it had. Both change the summation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TorchReduce {
    pub lanes: usize,
    pub threads: usize,
}

impl Default for TorchReduce {
    /// The configuration golden files are generated with: AVX2 dispatch, one thread.
    fn default() -> Self {
        Self {
            lanes: 8,
            threads: 1,
        }
    }
}

/// `at::internal::GRAIN_SIZE`: below this many elements a reduction runs on one thread.
const GRAIN_SIZE: usize = 32768;
/// `row_sum` interprets a row as `(-1, ILP)` and keeps `ILP` independent accumulators.
const ILP: usize = 4;
/// `multi_row_sum` keeps this many cascade levels.
const LEVELS: usize = 4;

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

    fn sum_map(&self, x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f32 {
        let n = x.len();
        let threads = self.threads.max(1).min(n.div_ceil(GRAIN_SIZE)).max(1);
        if threads == 1 {
            return 0.0 + inner_sum(x, self.lanes, f);
        }
        // at::parallel_for: chunk = ceil(n / threads); each thread reduces into its own buffer
        // (starting at zero) and the buffers are then added in order.
        let chunk = n.div_ceil(threads);
        let mut total = 0.0f32;
        for part in x.chunks(chunk) {
            total += 0.0 + inner_sum(part, self.lanes, f);
        }
        total
    }
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
    fn small_sums_are_exact() {
        let r = TorchReduce::default();
        let x: Vec<f32> = (1..=1000).map(|i| i as f32).collect();
        assert_eq!(r.sum(&x), 500500.0);
        assert_eq!(r.mean_abs(&[-2.0, 2.0, 4.0, -4.0]), 3.0);
        assert!(r.mean_abs(&[]).is_nan());
    }

    #[test]
    fn accurate_on_long_inputs() {
        // The cascade keeps the error small where a naive loop would drift.
        let x = vec![0.1f32; 3_000_000];
        for lanes in [1, 8, 16] {
            for threads in [1, 2] {
                let s = TorchReduce { lanes, threads }.sum(&x) as f64;
                assert!(
                    (s - 300_000.0).abs() / 300_000.0 < 1e-6,
                    "lanes {lanes} threads {threads}: {s}"
                );
            }
        }
    }
}
