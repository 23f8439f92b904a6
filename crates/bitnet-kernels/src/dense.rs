//! Float dot products for the non-ternary parts: f32 rows (attention, f32 weights) and f16 rows
//! (the lm_head and embeddings the anchors keep in f16), converted on the fly.

use crate::cpu::{Tier, features};

/// `sum a[i] * b[i]` in f32, with independent partial sums (vectorised on every tier).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if features().avx512bw && crate::cpu::tier() >= Tier::Avx512 {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512F was detected; lengths are equal (asserted).
        return unsafe { x86::dot_f32_avx512(a, b) };
    }
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// `sum f16(w[i]) * x[i]`, `w` as little-endian f16 bytes.
pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(w.len(), 2 * x.len());
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        if f.avx512bw && crate::cpu::tier() >= Tier::Avx512 {
            #[allow(unsafe_code)]
            // SAFETY: AVX-512F was detected; `w` holds exactly `x.len()` halves (asserted).
            return unsafe { x86::dot_f16_avx512(w, x) };
        }
        if f.avx2 && f.f16c && f.fma && crate::cpu::tier() >= Tier::Avx2 {
            #[allow(unsafe_code)]
            // SAFETY: AVX2, F16C and FMA were detected; lengths checked above.
            return unsafe { x86::dot_f16_avx2(w, x) };
        }
    }
    let mut s = 0.0f32;
    for (c, &v) in w.chunks_exact(2).zip(x) {
        s += half::f16::from_le_bytes([c[0], c[1]]).to_f32() * v;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Bytes ahead of the loads that the f16 row kernels prefetch into L2.
    const PREFETCH: usize = 8192;

    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 16 floats at `i < n - 15` of slices of length `n`.
        unsafe {
            while i + 64 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(
                        _mm512_loadu_ps(pa.add(i + 16 * k)),
                        _mm512_loadu_ps(pb.add(i + 16 * k)),
                        *a,
                    );
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i)),
                    _mm512_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 16;
            }
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut s = _mm512_reduce_add_ps(v);
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f16_avx512(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: loads read 16 halves (32 bytes) at element `i < n - 15`; `w` has `2n` bytes.
        unsafe {
            while i + 64 <= n {
                // Rows are streamed once, back to back: keep the L2 ahead of the loads
                // (prefetches past the end never fault).
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(2 * i + PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(2 * i + PREFETCH + 64) as *const i8);
                for (k, a) in acc.iter_mut().enumerate() {
                    let h = _mm256_loadu_si256(pw.add(2 * (i + 16 * k)) as *const __m256i);
                    *a = _mm512_fmadd_ps(
                        _mm512_cvtph_ps(h),
                        _mm512_loadu_ps(px.add(i + 16 * k)),
                        *a,
                    );
                }
                i += 64;
            }
            while i + 16 <= n {
                let h = _mm256_loadu_si256(pw.add(2 * i) as *const __m256i);
                acc[0] = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(px.add(i)), acc[0]);
                i += 16;
            }
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut s = _mm512_reduce_add_ps(v);
        for j in i..n {
            s += half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32() * x[j];
        }
        s
    }

    #[target_feature(enable = "avx2,f16c,fma")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_f16_avx2(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: loads read 8 halves (16 bytes) at element `i < n - 7`; `w` has `2n` bytes.
        unsafe {
            while i + 32 <= n {
                _mm_prefetch::<_MM_HINT_T1>(pw.wrapping_add(2 * i + PREFETCH) as *const i8);
                for (k, a) in acc.iter_mut().enumerate() {
                    let h = _mm_loadu_si128(pw.add(2 * (i + 8 * k)) as *const __m128i);
                    *a =
                        _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(px.add(i + 8 * k)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                let h = _mm_loadu_si128(pw.add(2 * i) as *const __m128i);
                acc[0] = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(px.add(i)), acc[0]);
                i += 8;
            }
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let hi = _mm256_extractf128_ps(v, 1);
        let q = _mm_add_ps(_mm256_castps256_ps128(v), hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut s = _mm_cvtss_f32(q);
        for j in i..n {
            s += half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32() * x[j];
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_agree_with_f64() {
        for n in [1usize, 7, 16, 63, 64, 65, 1000, 2560] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0)
                .collect();
            let h: Vec<u8> = a
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let exact_h: f64 = h
                .chunks(2)
                .zip(&b)
                .map(|(c, &y)| {
                    f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()) * f64::from(y)
                })
                .sum();
            let mag: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from((x * y).abs()))
                .sum();
            assert!(
                (f64::from(dot_f32(&a, &b)) - exact).abs() <= 1e-6 * mag + 1e-6,
                "f32 n={n}"
            );
            assert!(
                (f64::from(dot_f16(&h, &b)) - exact_h).abs() <= 1e-6 * mag + 1e-6,
                "f16 n={n}"
            );
        }
    }
}
