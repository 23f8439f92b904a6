//! AMX-INT8 prefill: `tdpbusd` multiplies a 16 x 64 tile of unsigned codes by a 64 x 16 tile of
//! signed activations (VNNI layout) into 16 x 16 i32 accumulators — 16384 MACs per instruction.
//!
//! The tile instructions have no stable intrinsics, so they are written with `asm!`. Per pair of
//! 16-row tiles the codes are unpacked once from the 2-bit layout into bytes, then streamed
//! against every pair of 16-token activation tiles, prepacked once per product.

use super::{BLOCK, BLOCK_BYTES, PackedTernary, QuantizedBatch, ROWS};
use std::arch::asm;

/// Rows and tokens per accumulator tile; K per tile step.
const TM: usize = 16;
const TN: usize = 16;
const TK: usize = 64;

/// The 64-byte tile configuration: palette 1; tiles 0-3 accumulators (16 x 16 i32), 4-5 codes
/// (16 x 64 u8), 6-7 activations (16 x 64 i8).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

/// Activations of all tokens, prepacked per 16-token tile and per 64-K step in the VNNI layout
/// `tdpbusd` reads: row `k/4`, bytes `4 n .. 4 n + 4` = tokens `n`'s values `k .. k + 4`.
pub(super) struct PackedActs {
    tiles: usize,
    ksteps: usize,
    data: Vec<i8>,
}

impl PackedActs {
    pub(super) fn new(x: &QuantizedBatch) -> Self {
        let ksteps = x.stride / TK;
        let tiles = x.n.div_ceil(TN).next_multiple_of(2);
        let mut data = vec![0i8; tiles * ksteps * 1024];
        for t in 0..x.n {
            let (tile, n) = (t / TN, t % TN);
            let row = &x.values[t * x.stride..(t + 1) * x.stride];
            for (k, &v) in row.iter().enumerate() {
                let (ks, kk) = (k / TK, k % TK);
                data[(tile * ksteps + ks) * 1024 + (kk / 4) * 64 + n * 4 + kk % 4] = v;
            }
        }
        Self {
            tiles,
            ksteps,
            data,
        }
    }
}

/// Rows `groups` (a multiple of 8 groups = 32 rows, except at the end) times all tokens.
pub(super) fn gemm_groups(
    w: &PackedTernary,
    x: &QuantizedBatch,
    acts: &PackedActs,
    groups: std::ops::Range<usize>,
    sink: &mut dyn FnMut(usize, usize, &[i32]),
) {
    let k = w.padded_cols();
    assert_eq!(acts.ksteps * TK, k);
    let cfg = TileConfig::new();
    let mut codes = vec![0u8; 2 * TM * k];
    let mut c = [[0i32; TM * TN]; 4];
    #[allow(unsafe_code)]
    // SAFETY: the caller checked that the CPU has AMX-INT8 and that this process was granted
    // the tile state; `cfg` is a valid palette-1 configuration and 64-byte aligned.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    }
    let mut g = groups.start;
    while g < groups.end {
        let ng = (groups.end - g).min(2 * TM / ROWS);
        unpack_codes(w, g, ng, &mut codes);
        for tp in (0..acts.tiles).step_by(2) {
            #[allow(unsafe_code)]
            // SAFETY: tiles were configured above; every tile load reads 16 rows of 64 bytes:
            // `codes` holds 32 rows of `k` bytes (stride `k`), and each activation step is
            // 16 x 64 bytes inside `acts.data` (tiles `tp`, `tp + 1` < `acts.tiles`); the
            // stores write 16 rows of 64 bytes into each of the four `c` buffers.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for ks in 0..acts.ksteps {
                    let a0 = codes.as_ptr().add(ks * TK);
                    let a1 = codes.as_ptr().add(TM * k + ks * TK);
                    let b0 = acts.data.as_ptr().add((tp * acts.ksteps + ks) * 1024);
                    let b1 = acts.data.as_ptr().add(((tp + 1) * acts.ksteps + ks) * 1024);
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tdpbusd tmm1, tmm4, tmm7",
                        "tdpbusd tmm2, tmm5, tmm6",
                        "tdpbusd tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a1,
                        b0 = in(reg) b0,
                        b1 = in(reg) b1,
                        sa = in(reg) k,
                        sb = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    "tilestored [{c2} + {s}*1], tmm2",
                    "tilestored [{c3} + {s}*1], tmm3",
                    c0 = in(reg) c[0].as_mut_ptr(),
                    c1 = in(reg) c[1].as_mut_ptr(),
                    c2 = in(reg) c[2].as_mut_ptr(),
                    c3 = in(reg) c[3].as_mut_ptr(),
                    s = in(reg) 64usize,
                    options(nostack),
                );
            }
            // c[mi * 2 + ni][r * 16 + n]: rows g*4 + mi*16 + r, tokens (tp + ni) * 16 + n.
            // Hand out each token's run of (up to) 16 consecutive rows.
            let row_end = w.rows().min((g + ng) * ROWS);
            for (ti, acc) in c.iter().enumerate() {
                let (mi, ni) = (ti / 2, ti % 2);
                let first = g * ROWS + mi * TM;
                if first >= row_end {
                    continue;
                }
                let rows = (row_end - first).min(TM);
                for n in 0..TN {
                    let t = (tp + ni) * TN + n;
                    if t >= x.n {
                        break;
                    }
                    let run: [i32; TM] = std::array::from_fn(|r| acc[r * TN + n] - x.sums[t]);
                    sink(t, first, &run[..rows]);
                }
            }
        }
        g += ng;
    }
    #[allow(unsafe_code)]
    // SAFETY: releases the tile state configured above.
    unsafe {
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Codes of `ng` groups (up to 32 rows) from group `g` as bytes, row-major with stride `k`;
/// missing rows stay zero.
fn unpack_codes(w: &PackedTernary, g: usize, ng: usize, out: &mut [u8]) {
    let k = w.padded_cols();
    if ng * ROWS < 2 * TM {
        out[ng * ROWS * k..].fill(0);
    }
    for gi in 0..ng {
        let data = w.group(g + gi);
        for b in 0..w.blocks {
            for ri in 0..ROWS {
                let src = &data[(b * ROWS + ri) * BLOCK_BYTES..(b * ROWS + ri + 1) * BLOCK_BYTES];
                let dst = &mut out[(gi * ROWS + ri) * k + b * BLOCK..][..BLOCK];
                #[allow(unsafe_code)]
                // SAFETY: AMX implies AVX-512 (checked with the tier); `src` is 64 bytes and
                // `dst` 256, the exact extents the loads and stores below touch.
                unsafe {
                    split_fields(src.as_ptr(), dst.as_mut_ptr());
                }
            }
        }
    }
}

/// The four 2-bit fields of 64 bytes, as four runs of 64 codes.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(unsafe_code)]
unsafe fn split_fields(src: *const u8, dst: *mut u8) {
    use std::arch::x86_64::*;
    let m = _mm512_set1_epi8(3);
    // SAFETY: see `unpack_codes`.
    unsafe {
        let v = _mm512_loadu_si512(src as *const _);
        _mm512_storeu_si512(dst as *mut _, _mm512_and_si512(v, m));
        _mm512_storeu_si512(
            dst.add(64) as *mut _,
            _mm512_and_si512(_mm512_srli_epi16(v, 2), m),
        );
        _mm512_storeu_si512(
            dst.add(128) as *mut _,
            _mm512_and_si512(_mm512_srli_epi16(v, 4), m),
        );
        _mm512_storeu_si512(
            dst.add(192) as *mut _,
            _mm512_and_si512(_mm512_srli_epi16(v, 6), m),
        );
    }
}

/// Ask Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// without it the first tile instruction faults. True when granted.
pub(crate) fn request_permission() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        #[allow(unsafe_code)]
        // SAFETY: a plain system call with integer arguments; it only changes this process's
        // permitted XSAVE features.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}
