//! Thinking styles across models: decision depth and entropy on normalized depth, the debiased
//! linear CKA between every point of two models, a shuffled-prompt control, and a summary table.

use plotly::common::{ColorScale, ColorScalePalette, DashType, Line, Mode, Title};
use plotly::layout::Axis;
use plotly::{HeatMap, Histogram, Layout, Plot, Scatter};

use super::lens::valid_lens;
use super::trajectories::html_escape;
use super::view::{LensSummary, RunView};
use super::{color, Figure, Section};
use crate::analysis::bootstrap::{self, Interval};
use crate::analysis::cka;

/// Runs of different models over the same prompts, each with a valid lens.
pub fn candidates(views: &[RunView]) -> Vec<(usize, &LensSummary)> {
    let with_lens: Vec<(usize, &LensSummary)> = views
        .iter()
        .enumerate()
        .filter_map(|(i, v)| valid_lens(v).map(|l| (i, l)))
        .collect();
    if with_lens.len() < 2 {
        return vec![];
    }
    let first = &views[with_lens[0].0].run.manifest;
    let same_prompts = |i: usize| {
        let m = &views[i].run.manifest;
        m.prompts.len() == first.prompts.len()
            && m.prompts
                .iter()
                .zip(&first.prompts)
                .all(|(a, b)| a.text == b.text)
    };
    let distinct_models = with_lens
        .iter()
        .map(|(i, _)| &views[*i].run.manifest.provenance.model_sha256)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    if distinct_models && with_lens.iter().all(|(i, _)| same_prompts(*i)) {
        with_lens
    } else {
        vec![]
    }
}

/// Depth of the mean-entropy peak, and the first depth after it where the mean entropy has fallen
/// to half the peak. (Point 0 is no baseline: with tied embeddings the lens of the input embedding
/// predicts the input token itself, entropy ≈ 0.)
pub fn entropy_peak_and_half(depth: &[f64], ent: &[f64]) -> (f64, Option<f64>) {
    let peak = (0..ent.len())
        .max_by(|&a, &b| ent[a].total_cmp(&ent[b]))
        .unwrap_or(0);
    let half = (peak + 1..ent.len())
        .find(|&k| ent[k] <= ent[peak] / 2.0)
        .map(|k| depth[k]);
    (depth[peak], half)
}

/// Lens entropy (nats) at or below which a point counts as "confident": the top token then holds
/// most of the probability (one nat is the entropy of a uniform choice among e ≈ 2.7 tokens).
pub const CONFIDENT_NATS: f64 = 1.0;

/// Per point: the bootstrap interval over prompts of `f(prompt, point)`.
fn per_point(
    lens: &LensSummary,
    n_points: usize,
    seed: u64,
    f: impl Fn(usize, usize) -> f64,
) -> Vec<Interval> {
    (0..n_points)
        .map(|j| {
            let x: Vec<f64> = (0..lens.len()).map(|i| f(i, j)).collect();
            bootstrap::mean_interval(&x, seed + j as u64).expect("a valid lens has prompts")
        })
        .collect()
}

/// "43% [38–48%]": a share with its interval, in percent.
fn ci(i: &Interval) -> String {
    format!(
        "{:.0}% [{:.0}–{:.0}%]",
        100.0 * i.mean,
        100.0 * i.lo,
        100.0 * i.hi
    )
}

/// Mean and band (dotted lo/hi lines) of one model's per-point intervals.
fn band(plot: &mut Plot, depth: &[f64], iv: &[Interval], r: usize, name: &str, dash: DashType) {
    plot.add_trace(
        Scatter::new(depth.to_vec(), iv.iter().map(|i| i.mean).collect())
            .mode(Mode::LinesMarkers)
            .line(Line::new().color(color(r)).width(3.0).dash(dash))
            .name(name),
    );
    for (k, get) in [
        (0, (|i: &Interval| i.lo) as fn(&Interval) -> f64),
        (1, |i: &Interval| i.hi),
    ] {
        plot.add_trace(
            Scatter::new(depth.to_vec(), iv.iter().map(get).collect())
                .mode(Mode::Lines)
                .line(Line::new().color(color(r)).width(1.0).dash(DashType::Dot))
                .name(format!("{name} 95% interval"))
                .show_legend(k == 0),
        );
    }
}

pub fn section(views: &[RunView]) -> anyhow::Result<Option<Section>> {
    let runs = candidates(views);
    if runs.is_empty() {
        return Ok(None);
    }
    let mut dec = Plot::new();
    let mut ent = Plot::new();
    let mut cd = Plot::new();
    let mut rows = String::from("<table><tr><th>model</th><th>decides at (mean decision depth, 95% interval)</th><th>entropy peaks at</th><th>entropy halves (from its peak) at</th><th>decided at half depth</th><th>confident but not decided at half depth</th><th>prompts</th></tr>");
    let mut depths: Vec<Vec<f64>> = Vec::new();
    for (r, (i, lens)) in runs.iter().enumerate() {
        let v = &views[*i];
        let depth = v.depth();
        let decisions: Vec<f64> = lens
            .decisions
            .iter()
            .map(|&d| d as f64 / v.n_layer as f64)
            .collect();
        let dec_iv = bootstrap::mean_interval(&decisions, 0xdec).expect("prompts");
        dec.add_trace(
            Histogram::new(decisions.clone())
                .name(&v.name)
                .opacity(0.6)
                .hist_norm(plotly::histogram::HistNorm::Probability)
                .n_bins_x(20),
        );
        depths.push(decisions);
        let n_points = depth.len();
        let e_iv = per_point(lens, n_points, 0xe27, |i, j| lens.entropy[i][j] as f64);
        let decided = per_point(lens, n_points, 0xd1d, |i, j| {
            f64::from(u8::from(lens.decided[i][j]))
        });
        let confident = per_point(lens, n_points, 0xc0f, |i, j| {
            f64::from(u8::from(
                !lens.decided[i][j] && (lens.entropy[i][j] as f64) <= CONFIDENT_NATS,
            ))
        });
        let e = lens.mean_entropy.clone();
        let (peak, halves) = entropy_peak_and_half(&depth, &e);
        band(&mut ent, &depth, &e_iv, r, &v.name, DashType::Solid);
        band(
            &mut cd,
            &depth,
            &decided,
            r,
            &format!("{} — decided", v.name),
            DashType::Solid,
        );
        cd.add_trace(
            Scatter::new(depth.clone(), confident.iter().map(|i| i.mean).collect())
                .mode(Mode::LinesMarkers)
                .line(Line::new().color(color(r)).width(2.0).dash(DashType::Dash))
                .name(format!("{} — confident, not decided", v.name)),
        );
        // The point nearest half the depth.
        let half = (0..n_points)
            .min_by(|&a, &b| (depth[a] - 0.5).abs().total_cmp(&(depth[b] - 0.5).abs()))
            .unwrap_or(0);
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{} of the depth</td><td>{:.0}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&v.name),
            ci(&dec_iv),
            100.0 * peak,
            halves
                .map(|h| format!("{:.0}% of the depth", 100.0 * h))
                .unwrap_or_else(|| "not before the output".into()),
            ci(&decided[half]),
            ci(&confident[half]),
            lens.len()
        ));
    }
    rows.push_str("</table>");
    // Differences in decision depth, every pair: the same prompts through two models (paired).
    let mut diffs = String::new();
    for a in 0..runs.len() {
        for b in a + 1..runs.len() {
            let (na, nb) = (&views[runs[a].0].name, &views[runs[b].0].name);
            if let Some(d) = bootstrap::paired_difference_interval(&depths[a], &depths[b], 0xd1f) {
                let verdict = if d.excludes(0.0) {
                    format!(
                        "{} decides {} on these prompts",
                        html_escape(if d.mean < 0.0 { na } else { nb }),
                        "earlier"
                    )
                } else {
                    "<b>not supported</b>: the interval holds 0, so these prompts do not show that either model decides earlier".into()
                };
                diffs.push_str(&format!(
                    "<li>{} − {}: {:+.1} points of depth (%) [{:+.1}, {:+.1}], n = {} — {verdict}</li>",
                    html_escape(na),
                    html_escape(nb),
                    100.0 * d.mean,
                    100.0 * d.lo,
                    100.0 * d.hi,
                    d.n
                ));
            }
        }
    }
    if !diffs.is_empty() {
        rows.push_str(&format!(
            "<p>Difference in mean decision depth (paired over prompts, 95% bootstrap interval, {} resamples):</p><ul>{diffs}</ul>",
            bootstrap::RESAMPLES
        ));
    }
    dec.set_layout(
        Layout::new()
            .height(380)
            .bar_mode(plotly::layout::BarMode::Overlay)
            .x_axis(
                Axis::new()
                    .title(Title::with_text(
                        "decision depth (decision point / n_layer)",
                    ))
                    .range(vec![0.0, 1.05]),
            )
            .y_axis(Axis::new().title(Title::with_text("share of prompts"))),
    );
    for (p, y) in [
        (&mut ent, "mean lens entropy (nats)"),
        (&mut cd, "share of prompts"),
    ] {
        p.set_layout(
            Layout::new()
                .height(420)
                .x_axis(
                    Axis::new()
                        .title(Title::with_text("depth (point / n_layer)"))
                        .range(vec![0.0, 1.0]),
                )
                .y_axis(Axis::new().title(Title::with_text(y))),
        );
    }
    let mut figures = vec![
        Figure { title: "When each model decides".into(), caption: "Distribution of decision depths (the first point from which the final prediction stays top-1, as a fraction of the model's blocks). Early deciders pile up on the left; models that keep options open, on the right. The table gives each mean with its 95% bootstrap interval, and says whether a difference between two models is supported.".into(), plot: dec },
        Figure { title: "Uncertainty through depth".into(), caption: "Mean entropy of the lens distribution per model on normalized depth, with its 95% bootstrap interval over prompts (dotted). Low entropy means confident, not decided: a model can be sure of a token that is not its final answer (next figure).".into(), plot: ent },
        Figure { title: "Confident vs decided".into(), caption: format!("Solid: share of prompts whose lens already ranks the final prediction first (decided), with its 95% interval (dotted). Dashed: share whose lens is confident (entropy ≤ {CONFIDENT_NATS} nat) in a token that is not the final prediction. A low-entropy stretch in the previous figure that shows here as dashed is confidence in the wrong token, not an early decision."), plot: cd },
    ];
    // CKA between every pair of models.
    let mut note = rows;
    for a_i in 0..runs.len() {
        for b_i in a_i + 1..runs.len() {
            let (a, b) = (&views[runs[a_i].0], &views[runs[b_i].0]);
            cka_pair(a, b, &mut figures, &mut note)?;
        }
    }
    Ok(Some(Section {
        tabs: Vec::new(),
        title: "Thinking styles".into(),
        note,
        figures,
    }))
}

/// The CKA map of two models and its shuffled-prompt control.
fn cka_pair(
    a: &RunView,
    b: &RunView,
    figures: &mut Vec<Figure>,
    note: &mut String,
) -> anyhow::Result<()> {
    let total = a.n_prompts();
    let rows_used = cka_sample(total);
    let n = rows_used.len();
    if n < 4 {
        return Ok(());
    }
    let order = crate::analysis::contrast::shuffled(&rows_used, 0xc0ffee);
    fn by_point<'a>(
        x: &'a RunView,
        rows: &'a [usize],
    ) -> impl FnMut(usize) -> anyhow::Result<ndarray::Array2<f32>> + 'a {
        move |k| x.point_rows(k, rows)
    }
    let (pa, pb) = (a.points.len(), b.points.len());
    let m = cka::cka_matrix_by_point(
        (pa, &mut by_point(a, &rows_used)),
        (pb, &mut by_point(b, &rows_used)),
    )?;
    let control = cka::cka_matrix_by_point(
        (pa, &mut by_point(a, &rows_used)),
        (pb, &mut by_point(b, &order)),
    )?;
    let mean_abs = |m: &ndarray::Array2<f64>| {
        m.iter()
            .filter(|x| x.is_finite())
            .map(|x| x.abs())
            .sum::<f64>()
            / m.len() as f64
    };
    let (diag, ctrl) = (cka::diagonal_mean(&m), mean_abs(&control));
    for (mat, title, cap) in [
        (&m, format!("Debiased linear CKA, {} × {} (n = {n})", a.name, b.name), "Similarity of the two models' representations of the same prompts at every pair of points (debiased linear CKA on the last-position states; the plain estimator reads high even for unrelated matrices at this n). A bright diagonal band means the models pass through the same stages in the same order.".to_string()),
        (&control, format!("Shuffled-prompt control, {} × {} (n = {n})", a.name, b.name), format!("The same with the second model's prompts shuffled: it should be near 0 everywhere (mean |CKA| = {ctrl:.3}). If it is not, n is too small for the numbers above.")),
    ] {
        let mut p = Plot::new();
        let z: Vec<Vec<f64>> = mat.outer_iter().map(|r| r.to_vec()).collect();
        p.add_trace(HeatMap::new(b.points.clone(), a.points.clone(), z).color_scale(ColorScale::Palette(ColorScalePalette::Viridis)).zmin(-0.2).zmax(1.0));
        // (The figure's heading names it; a title inside the plot was cut at the figure's edge.)
        p.set_layout(Layout::new().height(520).x_axis(Axis::new().title(Title::with_text(format!("{} point", b.name)))).y_axis(Axis::new().title(Title::with_text(format!("{} point", a.name)))));
        figures.push(Figure { title, caption: cap, plot: p });
    }
    let sampled = if n < total {
        format!(" — a sample of {n} of the {total} prompts, drawn with a fixed seed, since CKA's Gram matrices grow with the square of the prompts")
    } else {
        String::new()
    };
    note.push_str(&format!("<p>CKA {} × {} along the normalized-depth diagonal: mean {diag:.3}; shuffled control mean |CKA| {ctrl:.3} (n = {n} prompts{sampled}).</p>", html_escape(&a.name), html_escape(&b.name)));
    Ok(())
}

/// Most prompts whose CKA is computed: the second model's Gram matrices are kept, n² × 8 bytes per
/// point (2 MB per point at 500: 62 MB for SmolLM2's 31 points, 162 MB for 81), so larger runs use
/// a seeded sample of this many prompts, said on the page. (The shuffled control reads the states
/// again rather than keeping a permuted copy of every Gram matrix.)
pub const CKA_MAX_PROMPTS: usize = 500;

/// The prompts the CKA uses: all, or a seeded sample of [`CKA_MAX_PROMPTS`] in prompt order.
pub fn cka_sample(n: usize) -> Vec<usize> {
    let all: Vec<usize> = (0..n).collect();
    if n <= CKA_MAX_PROMPTS {
        return all;
    }
    let mut s = crate::analysis::contrast::shuffled(&all, 0xc4a)[..CKA_MAX_PROMPTS].to_vec();
    s.sort_unstable();
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn entropy_peak_and_half_by_hand() {
        let depth = [0.0, 0.25, 0.5, 0.75, 1.0];
        assert_eq!(
            super::entropy_peak_and_half(&depth, &[0.0, 4.0, 3.0, 1.5, 2.0]),
            (0.25, Some(0.75))
        );
        assert_eq!(
            super::entropy_peak_and_half(&depth, &[0.0, 1.0, 2.0, 3.0, 2.0]),
            (0.75, None)
        );
    }
}
