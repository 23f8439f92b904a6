//! Kernel micro-benchmarks: `cargo bench -p bitnet-kernels`.
//!
//! Decode (GEMV) is reported in bytes of weights streamed per second, prefill (GEMM) in int8
//! multiply-accumulates per second, for every tier the CPU has, on 2B-4T layer shapes. The
//! matrices total more than the last-level cache so decode reads come from memory.

use bitnet_kernels::cpu::{self, Tier};
use bitnet_kernels::pool::ThreadPool;
use bitnet_kernels::ternary::{PackedTernary, QuantizedBatch, gemm_par};
use bitnet_kernels::{bandwidth, dense};
use divan::counter::{BytesCount, ItemsCount};
use divan::{Bencher, black_box};
use std::sync::OnceLock;

fn main() {
    let pool = ThreadPool::new(1);
    let bw = bandwidth::read_bandwidth(&pool, 1 << 30, 3);
    eprintln!(
        "tiers: {:?}; single-thread read bandwidth in this run: {:.1} GB/s",
        cpu::available_tiers(),
        bw / 1e9
    );
    divan::main();
}

/// 64 FFN-shaped matrices (6912 x 2560): 283 MB of 2-bit weights, more than the last-level cache.
fn mats() -> &'static Vec<PackedTernary> {
    static M: OnceLock<Vec<PackedTernary>> = OnceLock::new();
    M.get_or_init(|| {
        (0..64)
            .map(|i| PackedTernary::random(6912, 2560, i + 1))
            .collect()
    })
}

fn batch(n: usize, cols: usize) -> QuantizedBatch {
    let mut x = QuantizedBatch::default();
    x.reset(n, cols);
    for t in 0..n {
        for (i, v) in x.token_mut(t).iter_mut().enumerate() {
            *v = ((i * 31 + t * 7) % 255) as i8;
        }
    }
    x.finish();
    x
}

fn tiers() -> Vec<Tier> {
    cpu::available_tiers()
}

#[divan::bench(args = tiers())]
fn ternary_gemv(b: Bencher, tier: Tier) {
    let pool = ThreadPool::new(1);
    let ms = mats();
    let x = batch(1, ms[0].padded_cols());
    let mut out = vec![0i32; 6912];
    let bytes: usize = ms.iter().map(PackedTernary::bytes).sum();
    b.counter(BytesCount::new(bytes)).bench_local(|| {
        for m in ms {
            gemm_par(&pool, tier, m, &x, &mut out, 6912);
        }
        black_box(&out);
    });
}

#[divan::bench(args = tiers())]
fn ternary_gemm_64_tokens(b: Bencher, tier: Tier) {
    let pool = ThreadPool::new(1);
    let m = &mats()[0];
    let x = batch(64, m.padded_cols());
    let mut out = vec![0i32; 64 * 6912];
    b.counter(ItemsCount::new(64 * 6912 * 2560usize))
        .bench_local(|| {
            gemm_par(&pool, tier, m, &x, &mut out, 6912);
            black_box(&out);
        });
}

#[divan::bench(args = tiers())]
fn f16_gemv_lm_head(b: Bencher, tier: Tier) {
    let (rows, cols) = (128256usize, 2560usize);
    let w: Vec<u8> = (0..rows * cols * 2)
        .map(|i| (i % 97) as u8 & 0x3b)
        .collect();
    let x: Vec<f32> = (0..cols).map(|i| i as f32 * 1e-3).collect();
    let mut o = vec![0f32; rows];
    b.counter(BytesCount::new(w.len())).bench_local(|| {
        for (r, v) in o.iter_mut().enumerate() {
            *v = dense::dot(
                tier,
                dense::DenseType::F16,
                &w[r * cols * 2..(r + 1) * cols * 2],
                &x,
            );
        }
        black_box(&o);
    });
}

#[divan::bench(args = tiers())]
fn int8_gemv_lm_head(b: Bencher, tier: Tier) {
    let (rows, cols) = (128256usize, 2560usize);
    let m = bitnet_kernels::int8::Int8Rows::quantize(rows, cols, |r, buf| {
        for (c, v) in buf.iter_mut().enumerate() {
            *v = ((r * 31 + c * 17) % 41) as f32 - 20.0;
        }
    });
    let x: Vec<i8> = (0..cols).map(|i| (i % 251) as u8 as i8).collect();
    let xu: Vec<u8> = x.iter().map(|&v| (v as u8) ^ 0x80).collect();
    let mut o = vec![0i32; rows];
    b.counter(BytesCount::new(m.bytes())).bench_local(|| {
        for (r, v) in o.iter_mut().enumerate() {
            *v = m.dot(tier, r, &x, &xu);
        }
        black_box(&o);
    });
}
