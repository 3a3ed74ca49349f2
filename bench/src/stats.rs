//! Order statistics over latency and memory samples.

use serde::Serialize;

/// Linear-interpolated percentile (`p` in 0..=100) of unsorted samples; NaN when empty.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p95: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let n = samples.len();
        let mean = if n == 0 {
            f64::NAN
        } else {
            samples.iter().sum::<f64>() / n as f64
        };
        Summary {
            n,
            min: percentile(samples, 0.0),
            p25: percentile(samples, 25.0),
            p50: percentile(samples, 50.0),
            p75: percentile(samples, 75.0),
            p95: percentile(samples, 95.0),
            max: percentile(samples, 100.0),
            mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let s = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 50.0), 3.0);
        assert_eq!(percentile(&s, 100.0), 5.0);
        assert_eq!(percentile(&s, 25.0), 2.0);
        assert!((percentile(&[1.0, 2.0], 50.0) - 1.5).abs() < 1e-12);
        assert!(
            (percentile(&(1..=100).map(f64::from).collect::<Vec<_>>(), 95.0) - 95.05).abs() < 1e-9
        );
    }

    #[test]
    fn empty_and_single() {
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        let s = Summary::of(&[2.0, 4.0]);
        assert_eq!((s.n, s.min, s.max, s.mean, s.p50), (2, 2.0, 4.0, 3.0, 3.0));
    }

    #[test]
    fn ignores_non_finite() {
        assert_eq!(percentile(&[f64::NAN, 1.0, 3.0], 50.0), 2.0);
    }
}
