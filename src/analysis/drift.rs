//! Drift of one model's states and outputs against a reference on identical tokens
//! (quantization ladders): per-point cosine / relative L2 error, and next-token KL divergence,
//! top-1 agreement and Δp of the reference's top token, as llama.cpp's perplexity tool reports
//! them at the output.

use ndarray::{ArrayView1, ArrayView2, ArrayView3, Axis};

/// Drift statistics at one point, over every compared (prompt, position).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointDrift {
    pub mean_cos: f64,
    pub min_cos: f64,
    /// Mean of ‖h − h_ref‖ / ‖h_ref‖.
    pub mean_rel_err: f64,
    pub n: usize,
}

/// Accumulates per-point drift prompt by prompt (so states never all sit in memory).
pub struct DriftAccumulator {
    cos_sum: Vec<f64>,
    cos_min: Vec<f64>,
    err_sum: Vec<f64>,
    n: usize,
}

impl DriftAccumulator {
    pub fn new(n_points: usize) -> Self {
        DriftAccumulator {
            cos_sum: vec![0.0; n_points],
            cos_min: vec![f64::INFINITY; n_points],
            err_sum: vec![0.0; n_points],
            n: 0,
        }
    }

    /// Add one prompt: `reference` and `level` are `[n_points, n_positions, d]` over the same
    /// tokens; only the first `n_positions` positions are compared.
    pub fn add(&mut self, reference: ArrayView3<f32>, level: ArrayView3<f32>, n_positions: usize) {
        for t in 0..n_positions {
            self.add_position(
                reference.index_axis(Axis(1), t),
                level.index_axis(Axis(1), t),
            );
        }
    }

    /// Add one position of one prompt: `[n_points, d]` each.
    pub fn add_position(&mut self, reference: ArrayView2<f32>, level: ArrayView2<f32>) {
        for k in 0..self.cos_sum.len() {
            let (c, e) = cos_and_rel_err(reference.row(k), level.row(k));
            self.cos_sum[k] += c;
            self.cos_min[k] = self.cos_min[k].min(c);
            self.err_sum[k] += e;
        }
        self.n += 1;
    }

    pub fn finish(&self) -> Vec<PointDrift> {
        let n = self.n.max(1) as f64;
        (0..self.cos_sum.len())
            .map(|k| PointDrift {
                mean_cos: self.cos_sum[k] / n,
                min_cos: self.cos_min[k],
                mean_rel_err: self.err_sum[k] / n,
                n: self.n,
            })
            .collect()
    }
}

/// (cos(a, b), ‖b − a‖ / ‖a‖) in f64. Identical vectors give exactly (1, 0).
pub fn cos_and_rel_err(a: ArrayView1<f32>, b: ArrayView1<f32>) -> (f64, f64) {
    let (mut ab, mut aa, mut bb, mut dd) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b.iter()) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
        dd += (y - x) * (y - x);
    }
    let cos = if a == b {
        1.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    };
    (cos, dd.sqrt() / aa.sqrt())
}

/// The first point whose mean relative error exceeds `threshold`, if any.
pub fn first_over(drift: &[PointDrift], points: &[usize], threshold: f64) -> Option<usize> {
    drift
        .iter()
        .position(|d| d.mean_rel_err > threshold)
        .map(|k| points[k])
}

/// Output-level comparison per prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutputDrift {
    /// KL(P_ref ‖ P_level) of the next-token distributions, nats.
    pub kl: Vec<f64>,
    pub top1_agree: Vec<bool>,
    /// p_level(t) − p_ref(t) for the reference's top token t.
    pub dp: Vec<f64>,
}

fn log_softmax(x: ArrayView1<f32>) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

impl OutputDrift {
    /// Add one prompt: the reference's and the level's next-token logits.
    pub fn push(&mut self, reference: &[f32], level: &[f32]) {
        let (lr, ll) = (
            log_softmax(ArrayView1::from(reference)),
            log_softmax(ArrayView1::from(level)),
        );
        let kl: f64 = lr
            .iter()
            .zip(&ll)
            .map(|(a, b)| if a == b { 0.0 } else { a.exp() * (a - b) })
            .sum();
        let top_r = argmax(&lr);
        self.kl.push(kl.max(0.0));
        self.top1_agree.push(argmax(&ll) == top_r);
        self.dp.push(ll[top_r].exp() - lr[top_r].exp());
    }
}

/// Output drift of every prompt (`[n_prompts, n_vocab]` logits in memory; the report pushes one
/// prompt at a time with [`OutputDrift::push`]).
pub fn output_drift(reference: ArrayView2<f32>, level: ArrayView2<f32>) -> OutputDrift {
    let mut out = OutputDrift::default();
    for (r, l) in reference.outer_iter().zip(level.outer_iter()) {
        out.push(
            r.as_slice().expect("row-major"),
            l.as_slice().expect("row-major"),
        );
    }
    out
}

fn argmax(v: &[f64]) -> usize {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b
}

/// The q-quantile (0..=1) of `v` by linear interpolation between order statistics.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, Array3};

    #[test]
    fn identical_states_and_logits_give_exactly_zero() {
        let s = Array3::from_shape_fn((3, 4, 5), |(a, b, c)| {
            (a * 7 + b * 3 + c) as f32 * 0.37 - 2.0
        });
        let mut acc = DriftAccumulator::new(3);
        acc.add(s.view(), s.view(), 4);
        for d in acc.finish() {
            assert_eq!(
                (d.mean_cos, d.min_cos, d.mean_rel_err, d.n),
                (1.0, 1.0, 0.0, 4)
            );
        }
        let l = arr2(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 9.0]]);
        let o = output_drift(l.view(), l.view());
        assert_eq!(o.kl, vec![0.0, 0.0]);
        assert_eq!(o.top1_agree, vec![true, true]);
        assert_eq!(o.dp, vec![0.0, 0.0]);
    }

    #[test]
    fn drift_and_kl_by_hand() {
        let a = ndarray::arr1(&[3.0f32, 4.0]);
        let b = ndarray::arr1(&[3.0f32, 4.5]);
        let (c, e) = cos_and_rel_err(a.view(), b.view());
        assert!((e - 0.1).abs() < 1e-12);
        assert!((c - (9.0 + 18.0) / (5.0 * (9.0f64 + 20.25).sqrt())).abs() < 1e-12);
        // Two-token distributions: p = (0.5, 0.5) vs q = (e/(1+e), 1/(1+e)).
        let r = arr2(&[[0.0f32, 0.0]]);
        let l = arr2(&[[1.0f32, 0.0]]);
        let o = output_drift(r.view(), l.view());
        let q0 = 1f64.exp() / (1.0 + 1f64.exp());
        let want = 0.5 * (0.5f64 / q0).ln() + 0.5 * (0.5f64 / (1.0 - q0)).ln();
        assert!((o.kl[0] - want).abs() < 1e-12);
        assert!(o.top1_agree[0]); // both pick token 0 (ties go to the first)
        assert!((o.dp[0] - (q0 - 0.5)).abs() < 1e-12);
        assert_eq!(
            first_over(
                &[
                    PointDrift {
                        mean_cos: 1.0,
                        min_cos: 1.0,
                        mean_rel_err: 0.01,
                        n: 1
                    },
                    PointDrift {
                        mean_cos: 0.9,
                        min_cos: 0.9,
                        mean_rel_err: 0.2,
                        n: 1
                    }
                ],
                &[0, 5],
                0.05
            ),
            Some(5)
        );
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.5).abs() < 1e-12);
    }
}
