//! The reference kernel: plain loops over the packed layout.

use super::{BLOCK, BLOCK_BYTES, ROWS};

pub(super) fn group_dot(
    w: &[u8],
    blocks: usize,
    x: &[i8],
    stride: usize,
    nt: usize,
    out: &mut [[i32; ROWS]; 4],
) {
    for (t, o) in out.iter_mut().enumerate().take(nt) {
        let xt = &x[t * stride..t * stride + blocks * BLOCK];
        for (r, acc) in o.iter_mut().enumerate() {
            let mut sum = 0i32;
            for b in 0..blocks {
                let wb = &w[(b * ROWS + r) * BLOCK_BYTES..(b * ROWS + r + 1) * BLOCK_BYTES];
                let xb = &xt[b * BLOCK..(b + 1) * BLOCK];
                for (j, &byte) in wb.iter().enumerate() {
                    for g in 0..4 {
                        sum += i32::from((byte >> (2 * g)) & 3) * i32::from(xb[j + 64 * g]);
                    }
                }
            }
            *acc = sum;
        }
    }
}
