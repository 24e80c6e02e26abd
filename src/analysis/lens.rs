//! Logit-lens statistics from the lens logits of every point (`[n_points, n_vocab]`).

use serde::{Deserialize, Serialize};

/// The lens at one point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LensPoint {
    pub point: usize,
    /// Top-k token ids and probabilities.
    pub top_ids: Vec<i32>,
    pub top_probs: Vec<f64>,
    /// Entropy of the distribution, nats.
    pub entropy: f64,
    /// Probability and rank (0 = top) of the model's final prediction.
    pub p_final: f64,
    pub rank_final: usize,
    /// KL(P_final ‖ P_point), nats.
    pub kl_to_final: f64,
}

/// The lens of one position of one prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LensTrace {
    pub position: usize,
    /// The model's final prediction (top-1 of the last point).
    pub final_token: i32,
    pub points: Vec<LensPoint>,
    /// First point from which the final top-1 stays top-1 (n_layer when only the end decides).
    pub decision_point: usize,
}

/// log softmax of logits, in f64.
pub fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Lens statistics for one position: `logits` is `[n_points, n_vocab]` row-major, `points` the
/// point index of each row (the last row is the final distribution), `k` the top-k size.
pub fn lens(
    logits: &[f32],
    n_vocab: usize,
    points: &[usize],
    k: usize,
    position: usize,
) -> LensTrace {
    let rows: Vec<Vec<f64>> = logits.chunks(n_vocab).map(log_softmax).collect();
    let last = rows.last().expect("at least one point");
    let final_token = argmax(last);
    let mut out = Vec::with_capacity(rows.len());
    for (r, &p) in rows.iter().zip(points) {
        let mut idx: Vec<usize> = (0..n_vocab).collect();
        let kk = k.min(n_vocab);
        idx.select_nth_unstable_by(kk.saturating_sub(1), |&a, &b| r[b].total_cmp(&r[a]));
        let mut top: Vec<usize> = idx[..kk].to_vec();
        top.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
        let entropy = -r
            .iter()
            .map(|&l| if l.is_finite() { l.exp() * l } else { 0.0 })
            .sum::<f64>();
        let rank_final = r.iter().filter(|&&l| l > r[final_token]).count();
        let kl = last
            .iter()
            .zip(r)
            .map(|(&a, &b)| if a == b { 0.0 } else { a.exp() * (a - b) })
            .sum::<f64>()
            .max(0.0);
        out.push(LensPoint {
            point: p,
            top_ids: top.iter().map(|&i| i as i32).collect(),
            top_probs: top.iter().map(|&i| r[i].exp()).collect(),
            entropy,
            p_final: r[final_token].exp(),
            rank_final,
            kl_to_final: kl,
        });
    }
    // Decision point: the first point from which the final token stays top-1.
    let mut decision = *points.last().expect("points");
    for (k, lp) in out.iter().enumerate().rev() {
        if lp.rank_final == 0 {
            decision = points[k];
        } else {
            break;
        }
    }
    LensTrace {
        position,
        final_token: final_token as i32,
        points: out,
        decision_point: decision,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lens_by_hand() {
        // 3 points, vocab 3. Final (last row) picks token 2; point 1 already has 2 on top, point 0 has 0.
        let logits = [3.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 5.0];
        let t = lens(&logits, 3, &[0, 1, 2], 2, 7);
        assert_eq!((t.final_token, t.decision_point, t.position), (2, 1, 7));
        assert_eq!(t.points[0].rank_final, 1);
        assert_eq!(t.points[0].top_ids[0], 0);
        let p = [3f64.exp(), 1.0, 1.0];
        let z: f64 = p.iter().sum();
        assert!((t.points[0].top_probs[0] - p[0] / z).abs() < 1e-12);
        let h: f64 = -p.iter().map(|x| x / z * (x / z).ln()).sum::<f64>();
        assert!((t.points[0].entropy - h).abs() < 1e-12);
        assert_eq!(t.points[2].kl_to_final, 0.0);
        assert!(t.points[0].kl_to_final > t.points[1].kl_to_final);
        // A model that only decides at the end has decision point n_layer.
        let late = [0.0f32, 5.0, 0.0, 5.0, 0.0, 0.0];
        assert_eq!(lens(&late, 3, &[0, 18], 1, 0).decision_point, 18);
    }
}
