//! Quick kernel throughput check: GB/s of weights streamed by the decode kernels.
use bitnet_kernels::ternary::{PackedTernary, QuantizedBatch, gemm_par};
use bitnet_kernels::{bandwidth, cpu, dense, pool};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let p = pool::ThreadPool::new(threads);
    let bw = bandwidth::read_bandwidth(&p, 1 << 30, 3);
    let mats: Vec<PackedTernary> = (0..60)
        .map(|i| PackedTernary::random(6912, 2560, i + 1))
        .collect();
    let mut x = QuantizedBatch::default();
    x.reset(1, mats[0].padded_cols());
    for (i, v) in x.token_mut(0).iter_mut().enumerate() {
        *v = (i % 251) as i8;
    }
    x.finish();
    let mut out = vec![0i32; 6912];
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum();
    for _ in 0..2 {
        let t0 = Instant::now();
        for m in &mats {
            gemm_par(&p, cpu::tier(), m, &x, &mut out, 6912);
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "ternary gemv: {:.1} GB/s ({:.0}% of {:.1})",
            bytes as f64 / s / 1e9,
            100.0 * bytes as f64 / s / bw,
            bw / 1e9
        );
    }
    let rows = 128256usize;
    let cols = 2560usize;
    let w: Vec<u8> = (0..rows * cols * 2)
        .map(|i| (i % 97) as u8 & 0x3b)
        .collect();
    let xf: Vec<f32> = (0..cols).map(|i| i as f32 * 1e-3).collect();
    let mut o = vec![0f32; rows];
    for _ in 0..2 {
        let t0 = Instant::now();
        pool::par_columns(&p, &mut o, rows, rows, 16, &|r, wr| {
            for i in r {
                wr.set(
                    0,
                    i,
                    dense::dot_f16(&w[i * cols * 2..(i + 1) * cols * 2], &xf),
                );
            }
        });
        let s = t0.elapsed().as_secs_f64();
        println!(
            "f16 gemv: {:.1} GB/s ({:.0}%)",
            w.len() as f64 / s / 1e9,
            100.0 * w.len() as f64 / s / bw
        );
    }
}
