//! Scaled dot-product attention for one token against a sequence's cached keys and values,
//! a group of query heads at a time: with grouped-query attention every key and value row of a
//! KV head is loaded once for all the query heads that share it (four in BitNet 2B-4T), rather
//! than once per head and position through a general dot product.

use crate::cpu::{Tier, features};

/// Where one KV head's keys and values lie in a cache: `len` positions, `stride` floats from
/// one position to the next, this head's `hd` floats starting at `offset` in each.
#[derive(Debug, Clone, Copy)]
pub struct KvHead<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub stride: usize,
    pub offset: usize,
    pub len: usize,
}

impl KvHead<'_> {
    fn check(&self, hd: usize) {
        assert!(self.offset + hd <= self.stride, "head outside its row");
        let need = if self.len == 0 {
            0
        } else {
            (self.len - 1) * self.stride + self.offset + hd
        };
        assert!(
            self.keys.len() >= need && self.values.len() >= need,
            "cache shorter than {} positions",
            self.len
        );
    }
}

/// `out[g] = softmax(q[g] . K^T * scale) V` for the query heads `q` (`g * hd` floats, head after
/// head) that share `kv`. `scores` is scratch (resized here).
pub fn attend(
    q: &[f32],
    kv: KvHead<'_>,
    hd: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(hd > 0 && q.len().is_multiple_of(hd) && out.len() == q.len());
    kv.check(hd);
    let g = q.len() / hd;
    let len = kv.len;
    scores.clear();
    scores.resize(g * len, 0.0);
    if len == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(16) && features().avx512bw && crate::cpu::tier() >= Tier::Avx512 {
        for (h0, (qc, oc)) in q.chunks(4 * hd).zip(out.chunks_mut(4 * hd)).enumerate() {
            let sc = &mut scores[h0 * 4 * len..(h0 * 4 * len + qc.len() / hd * len)];
            #[allow(unsafe_code)]
            // SAFETY: AVX-512F was detected; `check` bounded every key and value row read and
            // the chunks hold whole heads.
            unsafe {
                x86::scores(qc, kv, hd, scale, sc);
            }
            for s in sc.chunks_mut(len) {
                softmax(s);
            }
            #[allow(unsafe_code)]
            // SAFETY: as above.
            unsafe {
                x86::weighted_values(sc, kv, hd, oc);
            }
        }
        return;
    }
    let _ = (Tier::Scalar, features);
    for (h, (qh, oh)) in q.chunks(hd).zip(out.chunks_mut(hd)).enumerate() {
        let s = &mut scores[h * len..(h + 1) * len];
        for (p, sp) in s.iter_mut().enumerate() {
            let k = &kv.keys[p * kv.stride + kv.offset..][..hd];
            *sp = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
        softmax(s);
        oh.fill(0.0);
        for (p, &w) in s.iter().enumerate() {
            let v = &kv.values[p * kv.stride + kv.offset..][..hd];
            for (o, &x) in oh.iter_mut().zip(v) {
                *o += w * x;
            }
        }
    }
}

/// In-place softmax (max subtracted first).
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::KvHead;
    use std::arch::x86_64::*;

    /// `scores[h * len + p] = q[h] . k[p] * scale` for up to four heads; each key row is loaded
    /// once for all of them.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn scores(
        q: &[f32],
        kv: KvHead<'_>,
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let g = q.len() / hd;
        debug_assert!((1..=4).contains(&g) && scores.len() == g * kv.len);
        let len = kv.len;
        let qp = q.as_ptr();
        // SAFETY: `attend` checked that every key row `p < len` has `hd` floats at
        // `offset`, `q` holds `g` heads of `hd`, and `scores` `g * len` entries.
        unsafe {
            for p in 0..len {
                let k = kv.keys.as_ptr().add(p * kv.stride + kv.offset);
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i < hd {
                    let kv = _mm512_loadu_ps(k.add(i));
                    for (h, a) in acc.iter_mut().enumerate().take(g) {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(h * hd + i)), kv, *a);
                    }
                    i += 16;
                }
                for (h, a) in acc.iter().enumerate().take(g) {
                    *scores.get_unchecked_mut(h * len + p) = _mm512_reduce_add_ps(*a) * scale;
                }
            }
        }
    }

    /// `out[h] = sum_p w[h * len + p] * v[p]` for up to four heads, 64 dimensions at a time
    /// (16 accumulators plus the value vectors stay in registers); each value row is loaded once
    /// for all the heads.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn weighted_values(w: &[f32], kv: KvHead<'_>, hd: usize, out: &mut [f32]) {
        let g = out.len() / hd;
        let len = kv.len;
        debug_assert!((1..=4).contains(&g) && w.len() == g * len);
        // SAFETY: as in `scores`, for the value rows; `out` holds `g` heads.
        unsafe {
            let mut d = 0;
            while d < hd {
                let width = (hd - d).min(64) / 16;
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                for p in 0..len {
                    let v = kv.values.as_ptr().add(p * kv.stride + kv.offset + d);
                    let mut vv = [_mm512_setzero_ps(); 4];
                    for (j, x) in vv.iter_mut().enumerate().take(width) {
                        *x = _mm512_loadu_ps(v.add(16 * j));
                    }
                    for (h, a) in acc.iter_mut().enumerate().take(g) {
                        let wh = _mm512_set1_ps(*w.get_unchecked(h * len + p));
                        for j in 0..width {
                            a[j] = _mm512_fmadd_ps(wh, vv[j], a[j]);
                        }
                    }
                }
                for (h, a) in acc.iter().enumerate().take(g) {
                    for (j, x) in a.iter().enumerate().take(width) {
                        _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + d + 16 * j), *x);
                    }
                }
                d += 16 * width;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in f64: softmax over the scaled dot products, then the weighted values.
    fn reference(q: &[f32], kv: KvHead<'_>, hd: usize, scale: f32) -> Vec<f64> {
        let mut out = Vec::new();
        for qh in q.chunks(hd) {
            let s: Vec<f64> = (0..kv.len)
                .map(|p| {
                    let k = &kv.keys[p * kv.stride + kv.offset..][..hd];
                    qh.iter()
                        .zip(k)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for d in 0..hd {
                out.push(
                    (0..kv.len)
                        .map(|p| e[p] / total * f64::from(kv.values[p * kv.stride + kv.offset + d]))
                        .sum(),
                );
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_for_every_group_size_and_head_width() {
        let mut seed = 0x1234_5678u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 2001) as f32 / 1000.0 - 1.0
        };
        for (hd, g, len) in [
            (128, 4, 37),
            (64, 1, 1),
            (64, 3, 200),
            (16, 4, 5),
            (80, 2, 9),
            (8, 4, 3),
            (128, 5, 17),
        ] {
            let kv_heads = 2;
            let stride = kv_heads * hd;
            let keys: Vec<f32> = (0..len * stride).map(|_| rnd()).collect();
            let values: Vec<f32> = (0..len * stride).map(|_| rnd()).collect();
            let q: Vec<f32> = (0..g * hd).map(|_| rnd() * 3.0).collect();
            let kv = KvHead {
                keys: &keys,
                values: &values,
                stride,
                offset: hd,
                len,
            };
            let scale = 1.0 / (hd as f32).sqrt();
            let mut out = vec![0.0; g * hd];
            attend(&q, kv, hd, scale, &mut Vec::new(), &mut out);
            let want = reference(&q, kv, hd, scale);
            for (i, (&a, &b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(a) - b).abs() < 1e-5,
                    "hd {hd} g {g} len {len} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "cache shorter")]
    fn a_short_cache_is_refused() {
        let keys = vec![0.0; 100];
        let kv = KvHead {
            keys: &keys,
            values: &keys,
            stride: 64,
            offset: 0,
            len: 2,
        };
        attend(&[0.0; 64], kv, 64, 1.0, &mut Vec::new(), &mut [0.0; 64]);
    }
}
