//! Per-point metrics in the full hidden dimension (definitions in DESIGN.md).
//!
//! A trajectory is `[n_points, d]`: h_0 … h_L for one prompt at one position.

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
            let c = cos(diffs[l - 1].view(), diffs[l].view()).clamp(-1.0, 1.0);
            m.turn_deg[l] = c.acos().to_degrees();
        }
    }
    m
}

/// Alignment A(l) of a group: mean over pairs i<j of (cos(h_i,l, h_j,l) + 1) / 2.
/// `states` is `[n_prompts, n_points, d]`; `members` the prompts of the group; `center`, when
/// given (`[n_points, d]`), is subtracted first (the centered variant).
pub fn alignment(
    states: ArrayView3<f32>,
    members: &[usize],
    center: Option<ArrayView2<f32>>,
) -> Vec<f64> {
    let n_points = states.shape()[1];
    (0..n_points)
        .map(|l| {
            let rows: Vec<Array1<f32>> = members
                .iter()
                .map(|&i| {
                    let r = states.slice(ndarray::s![i, l, ..]).to_owned();
                    match center {
                        Some(c) => r - c.row(l),
                        None => r,
                    }
                })
                .collect();
            let mut sum = 0.0;
            let mut pairs = 0usize;
            for i in 0..rows.len() {
                for j in i + 1..rows.len() {
                    sum += (cos(rows[i].view(), rows[j].view()) + 1.0) / 2.0;
                    pairs += 1;
                }
            }
            if pairs == 0 {
                f64::NAN
            } else {
                sum / pairs as f64
            }
        })
        .collect()
}

/// Per-point mean over all prompts, `[n_points, d]` — the center for the centered alignment.
pub fn point_means(states: ArrayView3<f32>) -> Array2<f32> {
    states.mean_axis(Axis(0)).expect("at least one prompt")
}

/// Funnel width(l): mean distance of the group's states to the group centroid, divided by the
/// group's mean norm.
pub fn funnel_width(states: ArrayView3<f32>, members: &[usize]) -> Vec<f64> {
    let n_points = states.shape()[1];
    (0..n_points)
        .map(|l| {
            if members.is_empty() {
                return f64::NAN;
            }
            let rows: Vec<ArrayView1<f32>> = members
                .iter()
                .map(|&i| states.slice(ndarray::s![i, l, ..]))
                .collect();
            let d = rows[0].len();
            let mut centroid = Array1::<f32>::zeros(d);
            for r in &rows {
                centroid += r;
            }
            centroid /= rows.len() as f32;
            let mean_dist = rows
                .iter()
                .map(|r| norm((r - &centroid).view()))
                .sum::<f64>()
                / rows.len() as f64;
            let mean_norm = rows.iter().map(|r| norm(*r)).sum::<f64>() / rows.len() as f64;
            mean_dist / mean_norm
        })
        .collect()
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
        assert!(close(m.cos_next[1], 2.0 / (2.0 * 5f64.sqrt())));
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
