//! How far a quantized tensor is from its float original.

use crate::error::{Result, check_len};

/// Error of a reconstruction against the reference, accumulated in f64.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ErrorMetrics {
    /// Mean squared error.
    pub mse: f64,
    /// Cosine similarity; 1 when both are all zero, 0 when exactly one is.
    pub cosine: f64,
    /// `acos(cosine) / π`, in [0, 1]: 0 same direction, 0.5 orthogonal.
    pub angular_distance: f64,
    /// Signal-to-quantization-noise ratio in dB (`+inf` for an exact reconstruction).
    pub sqnr_db: f64,
    /// Fraction of reconstructed values that are exactly zero.
    pub zero_fraction: f64,
}

/// Compare `approx` against `reference` element by element.
pub fn error_metrics(reference: &[f32], approx: &[f32]) -> Result<ErrorMetrics> {
    check_len("reconstruction", reference.len(), approx.len())?;
    Ok(error_metrics_iter(
        reference.iter().copied().zip(approx.iter().copied()),
    ))
}

/// [`error_metrics`] over (reference, approx) pairs produced on the fly (no vectors built).
pub fn error_metrics_iter(pairs: impl Iterator<Item = (f32, f32)>) -> ErrorMetrics {
    let (mut se, mut dot, mut nr, mut na, mut zeros) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    let mut count = 0usize;
    for (r, a) in pairs {
        count += 1;
        let (r, a) = (f64::from(r), f64::from(a));
        se += (r - a) * (r - a);
        dot += r * a;
        nr += r * r;
        na += a * a;
        zeros += usize::from(a == 0.0);
    }
    ErrorMetrics::from_sums(se, dot, nr, na, zeros, count)
}

impl ErrorMetrics {
    /// The metrics from their sums over `n` pairs (reference `r`, approximation `a`):
    /// `se = Σ(r-a)²`, `dot = Σra`, `nr = Σr²`, `na = Σa²`, `zeros` = how many `a` are 0.
    pub fn from_sums(se: f64, dot: f64, nr: f64, na: f64, zeros: usize, n: usize) -> Self {
        if n == 0 {
            return ErrorMetrics {
                cosine: 1.0,
                ..Default::default()
            };
        }
        let nf = n as f64;
        let cosine = match (nr == 0.0, na == 0.0) {
            (true, true) => 1.0,
            (true, false) | (false, true) => 0.0,
            (false, false) => (dot / (nr.sqrt() * na.sqrt())).clamp(-1.0, 1.0),
        };
        let sqnr_db = if se == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (nr / se).log10()
        };
        ErrorMetrics {
            mse: se / nf,
            cosine,
            angular_distance: cosine.acos() / std::f64::consts::PI,
            sqnr_db,
            zero_fraction: zeros as f64 / nf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_and_opposite() {
        let x = [1.0f32, -2.0, 0.0, 3.0];
        let m = error_metrics(&x, &x).unwrap();
        assert_eq!(m.mse, 0.0);
        assert_eq!(m.cosine, 1.0);
        assert_eq!(m.angular_distance, 0.0);
        assert_eq!(m.zero_fraction, 0.25);
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        let m = error_metrics(&x, &neg).unwrap();
        assert_eq!(m.cosine, -1.0);
        assert_eq!(m.angular_distance, 1.0);
        assert_eq!(m.mse, (4.0 + 16.0 + 0.0 + 36.0) / 4.0);
        assert!(error_metrics(&x, &x[..3]).is_err());
    }

    #[test]
    fn orthogonal() {
        let m = error_metrics(&[1.0, 0.0], &[0.0, 1.0]).unwrap();
        assert_eq!(m.cosine, 0.0);
        assert!((m.angular_distance - 0.5).abs() < 1e-12);
    }
}
