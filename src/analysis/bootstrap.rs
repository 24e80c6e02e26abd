//! Percentile bootstrap over prompts: how far a mean drawn from a handful of prompts can be
//! trusted. Seeded, so a report is the same every time it is written.

/// Resamples drawn for an interval.
pub const RESAMPLES: usize = 1000;

/// A mean with its 95% percentile-bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
}

impl Interval {
    /// Whether the interval excludes `x` (e.g. 0 for a difference).
    pub fn excludes(&self, x: f64) -> bool {
        x < self.lo || x > self.hi
    }
}

struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let k = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[k]
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// The mean of `x` with a 95% percentile-bootstrap interval; None for no values.
pub fn mean_interval(x: &[f64], seed: u64) -> Option<Interval> {
    if x.is_empty() {
        return None;
    }
    let mut rng = Lcg(seed);
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..x.len()).map(|_| x[rng.below(x.len())]).sum::<f64>() / x.len() as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    Some(Interval {
        mean: mean(x),
        lo: percentile(&means, 0.025),
        hi: percentile(&means, 0.975),
        n: x.len(),
    })
}

/// The difference of paired samples (the same prompts through two models): mean(a − b), resampling
/// prompts; None when empty or of different lengths.
pub fn paired_difference_interval(a: &[f64], b: &[f64], seed: u64) -> Option<Interval> {
    if a.len() != b.len() {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    mean_interval(&d, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cover_the_mean_and_shrink_with_n() {
        // A two-valued sample: the mean is 0.5; its standard error is 0.5/√n.
        let small: Vec<f64> = (0..16).map(|i| (i % 2) as f64).collect();
        let large: Vec<f64> = (0..1600).map(|i| (i % 2) as f64).collect();
        let (s, l) = (
            mean_interval(&small, 1).unwrap(),
            mean_interval(&large, 1).unwrap(),
        );
        assert_eq!((s.mean, l.mean), (0.5, 0.5));
        assert!(s.lo < 0.5 && s.hi > 0.5 && l.lo < 0.5 && l.hi > 0.5);
        // ±1.96·0.5/√n: 0.245 at n = 16, 0.0245 at n = 1600 (bootstrap: within 25%).
        assert!(((s.hi - s.lo) / 2.0 - 0.245).abs() < 0.06, "{s:?}");
        assert!(((l.hi - l.lo) / 2.0 - 0.0245).abs() < 0.006, "{l:?}");
        assert_eq!(mean_interval(&[], 1), None);
        assert_eq!(mean_interval(&small, 7), mean_interval(&small, 7));
    }

    #[test]
    fn differences_say_when_the_data_cannot_tell() {
        let a: Vec<f64> = (0..32).map(|i| 0.9 + 0.01 * (i % 5) as f64).collect();
        let b: Vec<f64> = (0..32).map(|i| 0.5 + 0.01 * (i % 7) as f64).collect();
        let d = paired_difference_interval(&a, &b, 3).unwrap();
        assert!(d.excludes(0.0) && d.lo > 0.3, "{d:?}");
        // The same values in another order: the paired differences average 0 and the interval
        // holds it.
        let c: Vec<f64> = (0..32).map(|i| 0.9 + 0.01 * ((i + 2) % 5) as f64).collect();
        assert!(!paired_difference_interval(&a, &c, 3).unwrap().excludes(0.0));
        assert_eq!(paired_difference_interval(&a, &b[..3], 3), None);
    }
}
