//! Memory read bandwidth, measured the way the decode bound needs it: every thread streams its
//! own share of a buffer much larger than the caches with full-width loads into several
//! independent accumulators, so neither the core nor a dependency chain is the limit.

use crate::pool::{ThreadPool, share};
use std::time::Instant;

/// Best of `reps` timed passes over a `bytes`-byte buffer read by all threads of `pool`, in
/// bytes per second.
pub fn read_bandwidth(pool: &ThreadPool, bytes: usize, reps: usize) -> f64 {
    let words = bytes / 8 / 64 * 64;
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0.0f64;
    for _ in 0..reps.max(1) + 1 {
        let t0 = Instant::now();
        pool.run(&|i, n| {
            let r = share(words / 64, i, n);
            let part = &buf[r.start * 64..r.end * 64];
            sink.fetch_xor(read_sum(part), std::sync::atomic::Ordering::Relaxed);
        });
        let secs = t0.elapsed().as_secs_f64();
        best = best.max((words * 8) as f64 / secs);
    }
    std::hint::black_box(sink.into_inner());
    best
}

fn read_sum(part: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx512bw {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512F was detected; `part` is a whole number of 64-word (512-byte) chunks.
        return unsafe { read_avx512(part) };
    }
    let mut acc = [0u64; 8];
    for c in part.chunks_exact(8) {
        for k in 0..8 {
            acc[k] ^= c[k];
        }
    }
    acc.iter().fold(0, |a, b| a ^ b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn read_avx512(part: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let p = part.as_ptr();
    let mut acc = [_mm512_setzero_si512(); 8];
    let mut i = 0;
    // SAFETY: each iteration reads 8 x 64 bytes at word `i`, and `part.len()` is a multiple of 64.
    unsafe {
        while i + 64 <= part.len() {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_xor_si512(*a, _mm512_loadu_si512(p.add(i + 8 * k) as *const _));
            }
            i += 64;
        }
    }
    let mut out = [0u64; 8];
    let v = acc
        .iter()
        .fold(_mm512_setzero_si512(), |x, y| _mm512_xor_si512(x, *y));
    // SAFETY: `out` holds 8 u64 = 64 bytes.
    unsafe { _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v) };
    out.iter().fold(0, |a, b| a ^ b)
}
