//! Per-point metrics in the full hidden dimension.
//!
//! A trajectory is `[n_points, d]`: h_0 … h_L for one prompt at one position. Per point l:
//! norm ‖h_l‖; step s_l = ‖h_{l+1} − h_l‖ and relative step s_l / ‖h_l‖; cos(h_l, h_{l+1});
//! cos(h_l, h_L); turning angle θ_l between (h_l − h_{l−1}) and (h_{l+1} − h_l). Over a group of
//! prompts: alignment A(l) = mean over pairs of (cos + 1) / 2 (raw, and centered on the run's
//! per-point mean, since residual streams are anisotropic), and funnel width = mean distance to
//! the group centroid / mean norm.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayView3, Axis};

fn norm(v: ArrayView1<f32>) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

fn dot(a: ArrayView1<f32>, b: ArrayView1<f32>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// Cosine similarity; NaN when either vector is zero.
pub fn cos(a: ArrayView1<f32>, b: ArrayView1<f32>) -> f64 {
    dot(a, b) / (norm(a) * norm(b))
}

/// Angle between two vectors in radians, accurate near 0 and π (Kahan: 2·atan2(‖â − b̂‖, ‖â + b̂‖),
/// where acos of a cosine loses half the digits). NaN when either vector is zero.
pub fn angle(a: ArrayView1<f32>, b: ArrayView1<f32>) -> f64 {
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        return f64::NAN;
    }
    let (mut diff, mut sum) = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b.iter()) {
        let (u, v) = (x as f64 / na, y as f64 / nb);
        diff += (u - v) * (u - v);
        sum += (u + v) * (u + v);
    }
    2.0 * diff.sqrt().atan2(sum.sqrt())
}

/// Metrics of one trajectory, one value per point; NaN where undefined (the step after the last
/// point, the turning angle at the first and last points).
#[derive(Debug, Clone, PartialEq)]
pub struct TrajectoryMetrics {
    /// ‖h_l‖
    pub norm: Vec<f64>,
    /// s_l = ‖h_{l+1} − h_l‖
    pub step: Vec<f64>,
    /// s_l / ‖h_l‖
    pub rel_step: Vec<f64>,
    /// cos(h_l, h_{l+1})
    pub cos_next: Vec<f64>,
    /// cos(h_l, h_L)
    pub cos_final: Vec<f64>,
    /// angle in degrees between (h_l − h_{l−1}) and (h_{l+1} − h_l)
    pub turn_deg: Vec<f64>,
}

impl TrajectoryMetrics {
    pub const NAMES: [&'static str; 6] = [
        "norm",
        "step",
        "rel_step",
        "cos_next",
        "cos_final",
        "turn_deg",
    ];

    pub fn get(&self, name: &str) -> &[f64] {
        match name {
            "norm" => &self.norm,
            "step" => &self.step,
            "rel_step" => &self.rel_step,
            "cos_next" => &self.cos_next,
            "cos_final" => &self.cos_final,
            "turn_deg" => &self.turn_deg,
            _ => panic!("unknown metric {name}"),
        }
    }
}

pub fn trajectory(h: ArrayView2<f32>) -> TrajectoryMetrics {
    let n = h.nrows();
    let last = h.row(n - 1);
    let diffs: Vec<Array1<f32>> = (0..n.saturating_sub(1))
        .map(|l| &h.row(l + 1) - &h.row(l))
        .collect();
    let mut m = TrajectoryMetrics {
        norm: vec![f64::NAN; n],
        step: vec![f64::NAN; n],
        rel_step: vec![f64::NAN; n],
        cos_next: vec![f64::NAN; n],
        cos_final: vec![f64::NAN; n],
        turn_deg: vec![f64::NAN; n],
    };
    for l in 0..n {
        let hl = h.row(l);
        m.norm[l] = norm(hl);
        m.cos_final[l] = cos(hl, last);
        if l + 1 < n {
            m.step[l] = norm(diffs[l].view());
            m.rel_step[l] = m.step[l] / m.norm[l];
            m.cos_next[l] = cos(hl, h.row(l + 1));
        }
        if l >= 1 && l + 1 < n {
            m.turn_deg[l] = angle(diffs[l - 1].view(), diffs[l].view()).to_degrees();
        }
    }
    m
}

/// Group statistics, one value per point: alignment A(l) = mean over pairs i<j of
/// (cos(h_i,l, h_j,l) + 1) / 2, raw and centered, and funnel width.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    pub alignment: Vec<f64>,
    /// A(l) after subtracting the per-point mean over all prompts of the run.
    pub alignment_centered: Vec<f64>,
    pub funnel_width: Vec<f64>,
}

/// One group's statistics streamed over its members' trajectories (`[n_points, d]` each): a
/// first pass ([`GroupAccumulator::first`]) and, once the group centroid and the run's per-point
/// mean are known, a second ([`GroupAccumulator::second`]). Memory: three `[n_points, d]` f64
/// arrays ([`GroupAccumulator::bytes`]), whatever the group's size.
///
/// Alignment uses the identity Σ_{i<j} u_i·u_j = (‖Σ u_i‖² − n) / 2 for unit vectors u_i (exact;
/// f64 accumulation): O(n·d) per point instead of O(n²·d) over pairs. Undefined (NaN) with fewer
/// than two members or when a state (or centered state) is the zero vector.
#[derive(Debug, Clone)]
pub struct GroupAccumulator {
    n: usize,
    /// Σ h/‖h‖ per point.
    unit: Array2<f64>,
    /// Σ h per point; after the first pass, the centroid.
    sum: Array2<f64>,
    /// Σ (h − c)/‖h − c‖ per point (c: the run's per-point mean).
    unit_c: Array2<f64>,
    norm_sum: Vec<f64>,
    dist_sum: Vec<f64>,
    zero: Vec<bool>,
    zero_c: Vec<bool>,
    centroid_ready: bool,
}

impl GroupAccumulator {
    pub fn new(n_points: usize, d: usize) -> Self {
        GroupAccumulator {
            n: 0,
            unit: Array2::zeros((n_points, d)),
            sum: Array2::zeros((n_points, d)),
            unit_c: Array2::zeros((n_points, d)),
            norm_sum: vec![0.0; n_points],
            dist_sum: vec![0.0; n_points],
            zero: vec![false; n_points],
            zero_c: vec![false; n_points],
            centroid_ready: false,
        }
    }

    /// Memory one accumulator takes.
    pub fn bytes(n_points: usize, d: usize) -> usize {
        3 * n_points * d * std::mem::size_of::<f64>()
    }

    /// First pass: one member's trajectory.
    pub fn first(&mut self, h: ArrayView2<f32>) {
        self.n += 1;
        for (l, row) in h.outer_iter().enumerate() {
            let nv = norm(row);
            self.norm_sum[l] += nv;
            if nv == 0.0 {
                self.zero[l] = true;
            }
            let mut unit = self.unit.row_mut(l);
            let mut sum = self.sum.row_mut(l);
            for ((u, s), &x) in unit.iter_mut().zip(sum.iter_mut()).zip(row.iter()) {
                *u += x as f64 / nv;
                *s += x as f64;
            }
        }
    }

    /// Second pass: the same members again, in the same order; `center` (`[n_points, d]`) is the
    /// run's per-point mean (None: no centered alignment).
    pub fn second(&mut self, h: ArrayView2<f32>, center: Option<ArrayView2<f64>>) {
        if !self.centroid_ready {
            self.sum /= self.n.max(1) as f64;
            self.centroid_ready = true;
        }
        for (l, row) in h.outer_iter().enumerate() {
            let c = self.sum.row(l);
            self.dist_sum[l] += row
                .iter()
                .zip(c.iter())
                .map(|(&x, &m)| (x as f64 - m) * (x as f64 - m))
                .sum::<f64>()
                .sqrt();
            if let Some(center) = center {
                let v: Vec<f64> = row
                    .iter()
                    .zip(center.row(l).iter())
                    .map(|(&x, &m)| x as f64 - m)
                    .collect();
                let nv = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                if nv == 0.0 {
                    self.zero_c[l] = true;
                }
                for (u, x) in self.unit_c.row_mut(l).iter_mut().zip(&v) {
                    *u += x / nv;
                }
            }
        }
    }

    fn alignment_of(&self, unit: &Array2<f64>, zero: &[bool]) -> Vec<f64> {
        let n = self.n;
        unit.outer_iter()
            .zip(zero)
            .map(|(sum, &zero)| {
                if n < 2 || zero {
                    return f64::NAN;
                }
                let pairs = (n * (n - 1) / 2) as f64;
                let dots = (sum.iter().map(|x| x * x).sum::<f64>() - n as f64) / 2.0;
                (dots / pairs + 1.0) / 2.0
            })
            .collect()
    }

    pub fn finish(&self) -> GroupStats {
        let n = self.n.max(1) as f64;
        GroupStats {
            alignment: self.alignment_of(&self.unit, &self.zero),
            alignment_centered: self.alignment_of(&self.unit_c, &self.zero_c),
            funnel_width: (0..self.norm_sum.len())
                .map(|l| {
                    if self.n == 0 {
                        f64::NAN
                    } else {
                        (self.dist_sum[l] / n) / (self.norm_sum[l] / n)
                    }
                })
                .collect(),
        }
    }
}

/// [`GroupStats`] of the prompts `members` of `states` (`[n_prompts, n_points, d]`, in memory);
/// `center` as in [`GroupAccumulator::second`]. For small arrays and tests: the report streams
/// through [`GroupAccumulator`] (its tests compare with the pairwise definitions independently).
pub fn group_stats(
    states: ArrayView3<f32>,
    members: &[usize],
    center: Option<ArrayView2<f64>>,
) -> GroupStats {
    let (_, n_points, d) = states.dim();
    let mut acc = GroupAccumulator::new(n_points, d);
    for &i in members {
        acc.first(states.index_axis(Axis(0), i));
    }
    for &i in members {
        acc.second(states.index_axis(Axis(0), i), center);
    }
    acc.finish()
}

/// Alignment A(l) of a group (see [`GroupAccumulator`]); centered on `center` when given.
pub fn alignment(
    states: ArrayView3<f32>,
    members: &[usize],
    center: Option<ArrayView2<f64>>,
) -> Vec<f64> {
    let s = group_stats(states, members, center);
    if center.is_some() {
        s.alignment_centered
    } else {
        s.alignment
    }
}

/// Per-point mean over all prompts in f64, `[n_points, d]` — the center for the centered
/// alignment.
pub fn point_means(states: ArrayView3<f32>) -> Array2<f64> {
    let (n, p, d) = states.dim();
    let mut sum = Array2::<f64>::zeros((p, d));
    for h in states.outer_iter() {
        sum.zip_mut_with(&h, |s, &x| *s += x as f64);
    }
    sum / n.max(1) as f64
}

/// Funnel width(l): mean distance of the group's states to the group centroid, divided by the
/// group's mean norm.
pub fn funnel_width(states: ArrayView3<f32>, members: &[usize]) -> Vec<f64> {
    group_stats(states, members, None).funnel_width
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, Array3};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn trajectory_metrics_by_hand() {
        // (0,0) is not allowed as h_0 for cos; use a right-angle path: (1,0) → (2,0) → (2,1).
        let h = arr2(&[[1.0f32, 0.0], [2.0, 0.0], [2.0, 1.0]]);
        let m = trajectory(h.view());
        assert!(close(m.norm[0], 1.0) && close(m.norm[1], 2.0) && close(m.norm[2], 5f64.sqrt()));
        assert!(close(m.step[0], 1.0) && close(m.step[1], 1.0) && m.step[2].is_nan());
        assert!(close(m.rel_step[0], 1.0) && close(m.rel_step[1], 0.5));
        assert!(close(m.cos_next[0], 1.0));
        assert!(close(m.cos_next[1], 4.0 / (2.0 * 5f64.sqrt())));
        assert!(close(m.cos_final[2], 1.0) && close(m.cos_final[0], 2.0 / 5f64.sqrt()));
        assert!(m.turn_deg[0].is_nan() && m.turn_deg[2].is_nan());
        assert!(close(m.turn_deg[1], 90.0), "{}", m.turn_deg[1]);
        // A straight line does not turn; a reversal turns 180°.
        let line = arr2(&[[1.0f32, 1.0], [2.0, 2.0], [3.0, 3.0]]);
        assert!(trajectory(line.view()).turn_deg[1].abs() < 1e-6);
        let back = arr2(&[[1.0f32, 0.0], [2.0, 0.0], [1.5, 0.0]]);
        assert!(close(trajectory(back.view()).turn_deg[1], 180.0));
    }

    #[test]
    fn alignment_identity_matches_pairwise_definition() {
        let mut seed = 9u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let s = Array3::from_shape_fn((7, 3, 5), |_| rnd());
        let members = [0usize, 2, 3, 6];
        let fast = alignment(s.view(), &members, None);
        for (l, &f) in fast.iter().enumerate() {
            let mut sum = 0.0;
            let mut pairs = 0.0;
            for a in 0..members.len() {
                for b in a + 1..members.len() {
                    let (x, y) = (
                        s.slice(ndarray::s![members[a], l, ..]),
                        s.slice(ndarray::s![members[b], l, ..]),
                    );
                    sum += (cos(x, y) + 1.0) / 2.0;
                    pairs += 1.0;
                }
            }
            assert!(
                (f - sum / pairs).abs() < 1e-12,
                "point {l}: {f} vs {}",
                sum / pairs
            );
        }
    }

    #[test]
    fn alignment_and_funnel_by_hand() {
        // Point 0: two orthogonal vectors (cos 0 → A = 0.5); point 1: identical (A = 1);
        // point 2: opposite (A = 0).
        let s = Array3::from_shape_vec(
            (2, 3, 2),
            vec![
                1.0f32, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0,
            ],
        )
        .unwrap();
        let a = alignment(s.view(), &[0, 1], None);
        assert!(
            close(a[0], 0.5) && close(a[1], 1.0) && close(a[2], 0.0),
            "{a:?}"
        );
        // Single member: undefined.
        assert!(alignment(s.view(), &[0], None)[0].is_nan());
        // Funnel: identical states have width 0; (1,0) and (0,1): centroid (.5,.5), dist √.5, norm 1.
        let w = funnel_width(s.view(), &[0, 1]);
        assert!(close(w[1], 0.0) && close(w[0], 0.5f64.sqrt()), "{w:?}");
        // Centering at the mean of all prompts: at point 1 both rows equal the mean → zero
        // vectors, cosine undefined.
        let c = point_means(s.view());
        let ac = alignment(s.view(), &[0, 1], Some(c.view()));
        assert!(ac[1].is_nan());
        // At point 0 the centered rows are (.5,-.5) and (-.5,.5): opposite → 0.
        assert!(close(ac[0], 0.0));
    }
}
