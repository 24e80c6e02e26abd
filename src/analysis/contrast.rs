//! Contrast between two labeled groups on last-position states: the difference-of-means direction
//! per point (the "refusal direction" of Arditi et al. 2024), separation measured on leave-one-out
//! projections, the peak point, each prompt's projection against depth, and the sharpness of the
//! switch.
//!
//! A direction fitted on the same prompts it is evaluated on separates even pure noise (d ≈ 7 in
//! 576 dimensions with a few dozen prompts), so every separation number here is leave-one-out:
//! prompt i is projected on the direction fitted without it, relative to the midpoint of the two
//! group means fitted without it.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayView3};

/// Separation of the two groups at one point, from leave-one-out projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Separation {
    /// Cohen's d of the projections (group A minus group B, pooled standard deviation).
    pub d: f64,
    /// Share of prompts on their own group's side of the midpoint (nearest-mean accuracy).
    pub accuracy: f64,
    /// Every prompt's leave-one-out projection is the same number: the states do not differ
    /// along any direction the groups define (e.g. every prompt ends in one template token at
    /// point 0), so there is nothing to separate and `d` is 0 by definition, not by measurement.
    pub identical: bool,
}

#[derive(Debug, Clone)]
pub struct Contrast {
    /// `[n_points, d]`: mean(A) − mean(B) per point (raw, unnormalised: the control-vector scale).
    pub directions: Array2<f32>,
    pub separation: Vec<Separation>,
    /// Index (into the points) of the largest leave-one-out d.
    pub peak: usize,
    /// `[n_prompts, n_points]`: each prompt's projection on the unit direction at each point,
    /// relative to the midpoint of the two group means (positive = group A's side).
    pub projections: Array2<f64>,
    pub sharpness: Sharpness,
}

/// How sharply separation rises up to the peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sharpness {
    /// Rise of d from the first point to the peak.
    pub rise: f64,
    /// Largest share of that rise gained within `window` consecutive steps.
    pub max_window_share: f64,
    /// Index of the first point of that window.
    pub window_start: usize,
    pub window: usize,
    /// "hard" when max_window_share ≥ HARD_SHARE, else "soft".
    pub hard: bool,
}

/// Steps within which most of the rise must happen to call the switch hard.
pub const WINDOW: usize = 3;
/// Share of the rise that makes a switch hard.
pub const HARD_SHARE: f64 = 0.5;

fn mean_rows(x: ArrayView2<f64>, rows: &[usize]) -> Array1<f64> {
    let mut m = Array1::<f64>::zeros(x.ncols());
    for &r in rows {
        m += &x.row(r);
    }
    m / rows.len().max(1) as f64
}

/// Prompt `h`'s projection on the direction fitted without it, relative to the midpoint of the
/// two group means fitted without it. `ma`, `mb` are the group means (sizes `na`, `nb`) with it.
fn loo_projection(
    h: ArrayView1<f64>,
    ma: ArrayView1<f64>,
    mb: ArrayView1<f64>,
    na: f64,
    nb: f64,
    in_a: bool,
) -> f64 {
    let (ma_i, mb_i) = if in_a {
        ((&ma * na - h) / (na - 1.0), mb.to_owned())
    } else {
        (ma.to_owned(), (&mb * nb - h) / (nb - 1.0))
    };
    let u = &ma_i - &mb_i;
    let norm = u.dot(&u).sqrt();
    if norm == 0.0 {
        return 0.0;
    }
    let mid = (&ma_i + &mb_i) / 2.0;
    (&h - &mid).dot(&u) / norm
}

/// Separation from the leave-one-out projections of the two groups.
fn separation_of(pa: &[f64], pb: &[f64]) -> Separation {
    let (na, nb) = (pa.len() as f64, pb.len() as f64);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var = |v: &[f64], m: f64| {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() as f64 - 1.0)
    };
    let (mpa, mpb) = (mean(pa), mean(pb));
    let pooled = (((na - 1.0) * var(pa, mpa) + (nb - 1.0) * var(pb, mpb)) / (na + nb - 2.0)).sqrt();
    // A projection exactly on the midpoint is a tie: half right.
    let score = |p: f64, sign: f64| {
        if p * sign > 0.0 {
            1.0
        } else if p == 0.0 {
            0.5
        } else {
            0.0
        }
    };
    let correct: f64 = pa.iter().map(|&p| score(p, 1.0)).sum::<f64>()
        + pb.iter().map(|&p| score(p, -1.0)).sum::<f64>();
    // Identical states (e.g. every prompt ends in the same template token at point 0): no
    // separation, not an undefined one.
    let d = if pooled > 0.0 {
        (mpa - mpb) / pooled
    } else {
        0.0
    };
    let (lo, hi) = pa
        .iter()
        .chain(pb)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    Separation {
        d,
        accuracy: correct / (na + nb),
        identical: lo == hi,
    }
}

/// Leave-one-out separation at one point. `x` is `[n, d]`; `a`, `b` the two groups' rows.
pub fn loo_separation(x: ArrayView2<f64>, a: &[usize], b: &[usize]) -> Separation {
    let (ma, mb) = (mean_rows(x, a), mean_rows(x, b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let pa: Vec<f64> = a
        .iter()
        .map(|&i| loo_projection(x.row(i), ma.view(), mb.view(), na, nb, true))
        .collect();
    let pb: Vec<f64> = b
        .iter()
        .map(|&i| loo_projection(x.row(i), ma.view(), mb.view(), na, nb, false))
        .collect();
    separation_of(&pa, &pb)
}

/// Contrast of groups `a` and `b` streamed over the prompts' trajectories (`[n_points, d]` each):
/// a first pass sums each group ([`ContrastAccumulator::first`]), a second projects every prompt
/// on the full and on its leave-one-out direction ([`ContrastAccumulator::second`]). Memory: the
/// two group sums (`[n_points, d]` f64 each) and one number per prompt and point.
#[derive(Debug, Clone)]
pub struct ContrastAccumulator {
    a: Vec<usize>,
    b: Vec<usize>,
    /// Per prompt: Some(true) in a, Some(false) in b, None in neither.
    side: Vec<Option<bool>>,
    /// Σ of each group's trajectories; divided in place into the means when the second pass starts.
    sum_a: Array2<f64>,
    sum_b: Array2<f64>,
    means_ready: bool,
    projections: Array2<f64>,
    /// `[n_prompts, n_points]`: each member's leave-one-out projection.
    loo: Array2<f64>,
}

impl ContrastAccumulator {
    /// Groups `a` and `b` (prompt indices, at least 3 each) of `n_prompts` prompts.
    pub fn new(n_prompts: usize, n_points: usize, d: usize, a: &[usize], b: &[usize]) -> Self {
        assert!(
            a.len() >= 3 && b.len() >= 3,
            "each group needs at least 3 prompts"
        );
        let mut side = vec![None; n_prompts];
        for &i in a {
            side[i] = Some(true);
        }
        for &i in b {
            side[i] = Some(false);
        }
        ContrastAccumulator {
            a: a.to_vec(),
            b: b.to_vec(),
            side,
            sum_a: Array2::zeros((n_points, d)),
            sum_b: Array2::zeros((n_points, d)),
            means_ready: false,
            projections: Array2::zeros((n_prompts, n_points)),
            loo: Array2::zeros((n_prompts, n_points)),
        }
    }

    /// Whether prompt `i` is in either group (only those are needed in the first pass).
    pub fn member(&self, i: usize) -> bool {
        self.side[i].is_some()
    }

    /// First pass: prompt `i`'s trajectory (prompts in increasing order).
    pub fn first(&mut self, i: usize, h: ArrayView2<f32>) {
        let sum = match self.side[i] {
            Some(true) => &mut self.sum_a,
            Some(false) => &mut self.sum_b,
            None => return,
        };
        sum.zip_mut_with(&h, |s, &x| *s += x as f64);
    }

    /// Second pass: every prompt `i`'s trajectory again.
    pub fn second(&mut self, i: usize, h: ArrayView2<f32>) {
        let (na, nb) = (self.a.len() as f64, self.b.len() as f64);
        if !self.means_ready {
            self.sum_a /= na;
            self.sum_b /= nb;
            self.means_ready = true;
        }
        let (ma, mb) = (&self.sum_a, &self.sum_b);
        for (k, row) in h.outer_iter().enumerate() {
            let x = row.mapv(|v| v as f64);
            let (ma, mb) = (ma.row(k), mb.row(k));
            let u = &ma - &mb;
            let norm = u.dot(&u).sqrt();
            self.projections[[i, k]] = if norm > 0.0 {
                let mid = (&ma + &mb) / 2.0;
                (&x - &mid).dot(&u) / norm
            } else {
                0.0
            };
            if let Some(in_a) = self.side[i] {
                self.loo[[i, k]] = loo_projection(x.view(), ma, mb, na, nb, in_a);
            }
        }
    }

    pub fn finish(self) -> Contrast {
        assert!(self.means_ready, "ContrastAccumulator::second was called");
        let directions = (&self.sum_a - &self.sum_b).mapv(|v| v as f32);
        let n_points = directions.nrows();
        let separation: Vec<Separation> = (0..n_points)
            .map(|k| {
                let pa: Vec<f64> = self.a.iter().map(|&i| self.loo[[i, k]]).collect();
                let pb: Vec<f64> = self.b.iter().map(|&i| self.loo[[i, k]]).collect();
                separation_of(&pa, &pb)
            })
            .collect();
        let finite = |x: f64| if x.is_finite() { x } else { f64::NEG_INFINITY };
        let peak = (0..n_points)
            .max_by(|&i, &j| finite(separation[i].d).total_cmp(&finite(separation[j].d)))
            .unwrap_or(0);
        let sharpness = sharpness(&separation.iter().map(|s| s.d).collect::<Vec<_>>(), peak);
        Contrast {
            directions,
            separation,
            peak,
            projections: self.projections,
            sharpness,
        }
    }
}

/// Full contrast of groups `a` and `b` in `states` (`[n_prompts, n_points, d]`, in memory) —
/// for callers holding small arrays and for tests; the report and `direction` stream through
/// [`ContrastAccumulator`]. Both groups need at least 3 prompts.
pub fn contrast(states: ArrayView3<f32>, a: &[usize], b: &[usize]) -> Contrast {
    let (n, n_points, d) = states.dim();
    let mut acc = ContrastAccumulator::new(n, n_points, d, a, b);
    for (i, h) in states.outer_iter().enumerate() {
        acc.first(i, h);
    }
    for (i, h) in states.outer_iter().enumerate() {
        acc.second(i, h);
    }
    acc.finish()
}

/// Sharpness of the rise of `d` from the first point to `peak`. Negative leave-one-out d (no
/// separation; it happens with clusters of identical states) counts as 0. The rise is that of
/// the running maximum of d, which climbs monotonically from d(0) to d(peak): a window's share
/// of it is therefore between 0 and 100% even when d dips and recovers on the way (the raw
/// differences gave shares such as 1222% when the total rise was small).
pub fn sharpness(d: &[f64], peak: usize) -> Sharpness {
    let d: Vec<f64> = d
        .iter()
        .scan(0.0f64, |best, &x| {
            *best = best.max(if x.is_finite() { x.max(0.0) } else { 0.0 });
            Some(*best)
        })
        .collect();
    let rise = d[peak] - d[0];
    let (mut best, mut start) = (0.0f64, 0usize);
    if rise > 0.0 && peak > 0 {
        for s in 0..peak {
            let e = (s + WINDOW).min(peak);
            let share = (d[e] - d[s]) / rise;
            if share > best {
                best = share;
                start = s;
            }
        }
    }
    Sharpness {
        rise,
        max_window_share: best,
        window_start: start,
        window: WINDOW,
        hard: best >= HARD_SHARE,
    }
}

/// Groups smaller than this (in either label) give a d whose 95% interval is wider than the
/// effects usually read from it: the report and `direction` mark the figures as small-n.
pub const SMALL_GROUP: usize = 10;

/// Approximate 95% interval of Cohen's d for groups of `na` and `nb` (normal approximation of
/// Hedges & Olkin 1985: var(d) ≈ (na + nb) / (na·nb) + d² / (2 (na + nb))). For the leave-one-out
/// d it is a guide to its spread, not an exact interval.
pub fn d_interval(d: f64, na: usize, nb: usize) -> (f64, f64) {
    let (na, nb) = (na as f64, nb as f64);
    let se = ((na + nb) / (na * nb) + d * d / (2.0 * (na + nb))).sqrt();
    (d - 1.96 * se, d + 1.96 * se)
}

/// What the data support, in one paragraph of plain text shared by the report and `direction`:
/// the peak with its interval and the shuffled control, the switch, and when the groups are too
/// small or the rise is within what shuffled labels reach, that the reading is not supported.
pub fn reading(c: &Contrast, control: &Contrast, na: usize, nb: usize, points: &[usize]) -> String {
    let (s, cs, sh) = (
        c.separation[c.peak],
        control.separation[control.peak],
        c.sharpness,
    );
    let (lo, hi) = d_interval(s.d, na, nb);
    let mut out = format!(
        "n = {na} vs {nb}. Peak at point {}: leave-one-out d = {:.2} (approximate 95% interval {:.2} to {:.2}), accuracy = {:.1}%; shuffled-label control at its own peak (point {}): d = {:.2}, accuracy = {:.1}%",
        points[c.peak],
        s.d,
        lo,
        hi,
        100.0 * s.accuracy,
        points[control.peak],
        cs.d,
        100.0 * cs.accuracy,
    );
    if cs.identical {
        out.push_str(&format!(
            " (at point {} every prompt's state is the same: shuffled labels separate nothing anywhere, and that point is their peak only because every other point is below 0)",
            points[control.peak]
        ));
    }
    out.push('.');
    let resolved = lo > cs.d;
    if !resolved {
        out.push_str(&format!(
            " Not supported: the peak's interval reaches down to what shuffled labels give ({:.2}), so neither the separation nor the peak's location is established{}.",
            cs.d,
            if na.min(nb) < SMALL_GROUP {
                format!(" — too few prompts (fewer than {SMALL_GROUP} per label)")
            } else {
                String::new()
            }
        ));
    } else if na.min(nb) < SMALL_GROUP {
        out.push_str(&format!(
            " Small groups (fewer than {SMALL_GROUP} per label): the separation is real, but the peak's location and the switch's shape are rough."
        ));
    }
    if sh.rise <= cs.d {
        out.push_str(&format!(
            " Switch: not resolved — the rise in d ({:.2}) is within what shuffled labels reach ({:.2}).",
            sh.rise, cs.d
        ));
    } else {
        out.push_str(&format!(
            " Switch: {} — {:.0}% of the rise in d ({:.2}) happens within {} steps from point {} (hard when ≥ {:.0}%).",
            if sh.hard { "hard" } else { "soft" },
            100.0 * sh.max_window_share,
            sh.rise,
            sh.window,
            points[sh.window_start],
            100.0 * HARD_SHARE
        ));
    }
    out
}

/// `items` shuffled with a fixed seed (Fisher–Yates on an LCG).
pub fn shuffled(items: &[usize], seed: u64) -> Vec<usize> {
    let mut all = items.to_vec();
    let mut s = seed;
    for i in (1..all.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = ((s >> 33) as usize) % (i + 1);
        all.swap(i, j);
    }
    all
}

/// Labels shuffled with a fixed seed: the control whose separation should stay near chance when
/// its peak is chosen the same way. Returns the two shuffled groups (sizes of `a` and `b`), each
/// in prompt order (the order streamed statistics see them in).
pub fn shuffled_groups(a: &[usize], b: &[usize], seed: u64) -> (Vec<usize>, Vec<usize>) {
    let all: Vec<usize> = a.iter().chain(b).copied().collect();
    let all = shuffled(&all, seed);
    let (x, y) = all.split_at(a.len());
    let (mut x, mut y) = (x.to_vec(), y.to_vec());
    x.sort_unstable();
    y.sort_unstable();
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn lcg(s: &mut u64) -> f32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn planted_direction_separates_and_noise_does_not() {
        // 20 + 20 prompts, 4 points, 576 dims of noise; from point 2 on group A is shifted along
        // axis 0 by 8 (noise: uniform ±1 in every dimension).
        let mut s = 5u64;
        let (n, p, d) = (40, 4, 576);
        let mut x = Array3::from_shape_fn((n, p, d), |_| lcg(&mut s));
        for i in 0..20 {
            for k in 2..p {
                x[[i, k, 0]] += 8.0;
            }
        }
        let a: Vec<usize> = (0..20).collect();
        let b: Vec<usize> = (20..40).collect();
        let c = contrast(x.view(), &a, &b);
        assert!(c.peak >= 2);
        assert!(
            c.separation[c.peak].d > 2.0 && c.separation[c.peak].accuracy > 0.9,
            "{:?}",
            c.separation
        );
        // Pure noise (points 0, 1): in-sample the difference of means would separate strongly;
        // leave-one-out does not.
        for k in 0..2 {
            assert!(
                c.separation[k].d < 1.0 && c.separation[k].accuracy < 0.75,
                "noise point {k}: {:?}",
                c.separation[k]
            );
        }
        assert!(
            c.sharpness.hard,
            "a jump from point 1 to 2 is a hard switch: {:?}",
            c.sharpness
        );
        // The raw direction at the peak is mean(A) − mean(B): ≈ 8 along axis 0.
        assert!((c.directions[[c.peak, 0]] - 8.0).abs() < 0.5);
        // Projections are positive for A at the peak.
        assert!(
            (0..20)
                .filter(|&i| c.projections[[i, c.peak]] > 0.0)
                .count()
                >= 18
        );
    }

    #[test]
    fn gradual_rise_is_soft_and_shuffle_keeps_group_sizes() {
        let d = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0];
        let sh = sharpness(&d, 8);
        assert!(
            !sh.hard && (sh.max_window_share - 3.0 / 8.0).abs() < 1e-12,
            "{sh:?}"
        );
        // d dips below its start on the way to a peak barely above it: the raw differences gave
        // (0.55 − 0) / (0.55 − 0.5) = 1100%; the running maximum keeps every share within 100%.
        let dip = [0.5, 0.0, -0.2, 0.55];
        let sh = sharpness(&dip, 3);
        assert!((sh.max_window_share - 1.0).abs() < 1e-12, "{sh:?}");
        let (x, y) = shuffled_groups(&[0, 1, 2, 3], &[4, 5, 6], 1);
        assert_eq!((x.len(), y.len()), (4, 3));
        let mut all: Vec<usize> = x.iter().chain(&y).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn small_groups_of_noise_are_not_supported_and_identical_states_say_so() {
        // 3 + 3 prompts of pure noise: whatever d the peak reaches, its interval is wide and
        // reaches the shuffled control: the reading says the data do not support a finding.
        let mut s = 11u64;
        let x = Array3::from_shape_fn((6, 5, 64), |_| lcg(&mut s));
        let (a, b) = ([0, 1, 2], [3, 4, 5]);
        let c = contrast(x.view(), &a, &b);
        let (sa, sb) = shuffled_groups(&a, &b, 0x5eed);
        let control = contrast(x.view(), &sa, &sb);
        let points = [0, 1, 2, 3, 4];
        let text = reading(&c, &control, 3, 3, &points);
        assert!(text.starts_with("n = 3 vs 3."), "{text}");
        assert!(text.contains("Not supported"), "{text}");
        assert!(text.contains("too few prompts"), "{text}");
        let (lo, hi) = d_interval(c.separation[c.peak].d, 3, 3);
        assert!(
            hi - lo > 3.0,
            "the interval at n = 3 vs 3 spans more than 3: {lo}..{hi}"
        );
        // Every prompt's state identical at every point: d is 0 by definition and says so.
        let same = Array3::from_shape_fn((6, 5, 64), |(_, k, j)| (k * 64 + j) as f32);
        let c = contrast(same.view(), &a, &b);
        let control = contrast(same.view(), &sa, &sb);
        assert!(c.separation.iter().all(|s| s.identical && s.d == 0.0));
        let text = reading(&c, &control, 3, 3, &points);
        assert!(text.contains("every prompt's state is the same"), "{text}");
        assert!(text.contains("Switch: not resolved"), "{text}");
    }

    #[test]
    fn d_interval_matches_the_normal_approximation() {
        // n = 20 vs 20, d = 1: se = sqrt(40/400 + 1/80) = sqrt(0.1125) = 0.33541.
        let (lo, hi) = d_interval(1.0, 20, 20);
        assert!((lo - (1.0 - 1.96 * 0.1125f64.sqrt())).abs() < 1e-12);
        assert!((hi - (1.0 + 1.96 * 0.1125f64.sqrt())).abs() < 1e-12);
    }
}
