//! Intervals for the results tables: Wilson score intervals for proportions (passkey accuracy)
//! and normal-approximation intervals for means and paired differences (QA F1).

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval of `k` successes in `n` trials at `z` (95%: [`Z95`]), as
/// proportions in [0, 1]. `n = 0` gives the whole range.
pub fn wilson(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // At k = 0 or k = n the bound is exactly 0 or 1; rounding must not push it past.
    let lo = if k == 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if k == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// `k/n` with the 95% Wilson interval in percent: `7/10 (40–89%)`.
pub fn wilson_cell(k: usize, n: usize) -> String {
    let (lo, hi) = wilson(k, n, Z95);
    format!("{k}/{n} ({:.0}–{:.0}%)", 100.0 * lo, 100.0 * hi)
}

/// Mean and the half-width of its 95% interval (normal approximation, sample standard
/// deviation); the half-width is NaN below two values.
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Z95 * (var / n).sqrt())
}

/// The median of `xs` (sorted in place); NaN when empty.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from the closed form (Wilson 1927; e.g. Newcombe 1998, table I) at z =
    /// 1.96: 0/10 → [0, 0.2775], 10/10 → [0.7225, 1], 5/10 → [0.2366, 0.7634], 81/263 →
    /// [0.2553, 0.3662] (Newcombe's example).
    #[test]
    fn wilson_matches_published_values() {
        let close = |a: (f64, f64), b: (f64, f64)| {
            assert!(
                (a.0 - b.0).abs() < 5e-4 && (a.1 - b.1).abs() < 5e-4,
                "{a:?} vs {b:?}"
            )
        };
        close(wilson(0, 10, Z95), (0.0, 0.2775));
        close(wilson(10, 10, Z95), (0.7225, 1.0));
        close(wilson(5, 10, Z95), (0.2366, 0.7634));
        close(wilson(81, 263, Z95), (0.2553, 0.3662));
        assert_eq!(wilson(0, 0, Z95), (0.0, 1.0));
        // Symmetric: k of n and n-k of n mirror each other.
        let (a, b) = (wilson(3, 17, Z95), wilson(14, 17, Z95));
        close((a.0, a.1), (1.0 - b.1, 1.0 - b.0));
        assert_eq!(wilson_cell(7, 10), "7/10 (40–89%)");
    }

    #[test]
    fn mean_interval_of_known_samples() {
        let (m, h) = mean_ci(&[1.0, 2.0, 3.0, 4.0]);
        // sd = 1.2910, se = 0.6455, 1.96 se = 1.2652
        assert!((m - 2.5).abs() < 1e-12);
        assert!((h - 1.2652).abs() < 1e-3, "{h}");
        assert!(mean_ci(&[0.3]).1.is_nan());
        assert!(mean_ci(&[]).0.is_nan());
        assert_eq!(mean_ci(&[0.5; 9]), (0.5, 0.0));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2382.7]), 3.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
