//! The logit lens of one run: a lens table per prompt, entropy and final-token probability per
//! point, and the distribution of decision points.

use plotly::common::{ColorScale, ColorScalePalette, Line, Mode, Title};
use plotly::layout::update_menu::{Button, ButtonMethod, UpdateMenu};
use plotly::layout::Axis;
use plotly::{HeatMap, Histogram, Layout, Plot, Scatter};

use super::trajectories::html_escape;
use super::view::{LensSummary, RunView};
use super::{Figure, Section};

/// The lens summary of a run, if it was traced with a valid lens.
pub fn valid_lens(v: &RunView) -> Option<&LensSummary> {
    v.lens.as_ref()
}

pub fn section(v: &RunView) -> Option<Section> {
    let info = v.run.manifest.lens.as_ref()?;
    if !info.valid {
        return Some(Section {
            tabs: Vec::new(),
            title: "Logit lens".into(),
            note: format!(
                "Not shown: the lens does not reproduce this model's own logits (max |difference| {:.3e} > {:.0e}), so its numbers would be wrong for this architecture.",
                info.self_check_max_abs_diff, info.tolerance
            ),
            figures: vec![],
        });
    }
    let lens = valid_lens(v)?;
    let n_layer = v.n_layer;
    let mut figures = Vec::new();
    // One lens table per prompt, in one figure: a dropdown picks the prompt.
    let shown = &lens.shown;
    let mut table = Plot::new();
    let mut buttons = Vec::new();
    for (n, (index, pieces, tr)) in shown.iter().enumerate() {
        let rec = &v.run.manifest.prompts[*index];
        let k = tr.points[0].top_ids.len();
        let ys: Vec<String> = tr
            .points
            .iter()
            .map(|p| format!("point {}", p.point))
            .collect();
        let xs: Vec<String> = (1..=k).map(|r| format!("#{r}")).collect();
        let z: Vec<Vec<f64>> = tr.points.iter().map(|p| p.top_probs.clone()).collect();
        let text: Vec<Vec<String>> = tr
            .points
            .iter()
            .map(|p| {
                p.top_ids
                    .iter()
                    .map(|id| {
                        html_escape(&crate::answer::visible(
                            &pieces.get(id).cloned().unwrap_or_default(),
                        ))
                    })
                    .collect()
            })
            .collect();
        let hm = HeatMap::new(xs, ys, z)
            .color_scale(ColorScale::Palette(ColorScalePalette::Viridis))
            .zmin(0.0)
            .zmax(1.0)
            .show_scale(n == 0);
        // Token pieces written into the cells (plotly's texttemplate), set through serde.
        let mut trace = serde_json::to_value(&hm).expect("serialisable");
        trace["text"] = serde_json::json!(text);
        trace["texttemplate"] = serde_json::json!("%{text}");
        trace["hovertemplate"] =
            serde_json::json!("%{y} %{x}: %{text} (p = %{z:.3f})<extra></extra>");
        trace["visible"] = serde_json::json!(n == 0);
        table.add_trace(Box::new(RawTrace(trace)));
        let final_piece = pieces.get(&tr.final_token).cloned().unwrap_or_default();
        let label = format!(
            "{}: {} → {} (decides at {})",
            html_escape(&rec.id),
            html_escape(&crate::answer::cut_front(
                &crate::answer::one_line(&rec.text),
                40
            )),
            html_escape(&crate::answer::visible(&final_piece)),
            tr.decision_point
        );
        let vis: Vec<bool> = (0..shown.len()).map(|j| j == n).collect();
        buttons.push(
            Button::new()
                .method(ButtonMethod::Restyle)
                .label(label)
                .args(serde_json::json!([{ "visible": vis }])),
        );
    }
    let rows = v.points.len();
    table.set_layout(
        Layout::new()
            .height(120 + 22 * rows)
            .x_axis(Axis::new().title(Title::with_text("rank")))
            .y_axis(Axis::new().title(Title::with_text("point")))
            .update_menus(vec![UpdateMenu::new()
                .buttons(buttons)
                .x(0.0)
                .x_anchor(plotly::common::Anchor::Left)
                .y(1.12)
                .y_anchor(plotly::common::Anchor::Top)]),
    );
    figures.push(Figure {
        title: format!("Lens table per prompt ({} prompts; pick one in the menu)", shown.len()),
        caption: "Each row is one point's state read through the model's final norm and unembedding: its top next tokens (text in the cells), colour = probability. The menu names each prompt's final prediction and its decision point — the first point from which that prediction stays top-1.".into(),
        plot: table,
    });
    let x = v.points.clone();
    let mut ent = Plot::new();
    let mut pf = Plot::new();
    for (i, (index, _, tr)) in shown.iter().enumerate() {
        let g = v
            .groups
            .iter()
            .position(|g| g.label == v.labels[*index])
            .unwrap_or(0);
        ent.add_trace(
            Scatter::new(x.clone(), tr.points.iter().map(|p| p.entropy).collect())
                .mode(Mode::Lines)
                .line(super::line(g).width(0.8))
                .opacity(0.35)
                .show_legend(false)
                .name(format!("{i}")),
        );
        pf.add_trace(
            Scatter::new(x.clone(), tr.points.iter().map(|p| p.p_final).collect())
                .mode(Mode::Lines)
                .line(super::line(g).width(0.8))
                .opacity(0.35)
                .show_legend(false)
                .name(format!("{i}")),
        );
    }
    ent.add_trace(
        Scatter::new(x.clone(), lens.mean_entropy.clone())
            .mode(Mode::Lines)
            .line(Line::new().color("#111").width(4.0))
            .name("mean"),
    );
    pf.add_trace(
        Scatter::new(x.clone(), lens.mean_p_final.clone())
            .mode(Mode::Lines)
            .line(Line::new().color("#111").width(4.0))
            .name("mean"),
    );
    ent.set_layout(
        Layout::new()
            .height(400)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text("entropy of the lens distribution (nats)"))),
    );
    pf.set_layout(
        Layout::new()
            .height(400)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text("probability of the final prediction"))),
    );
    let decisions = &lens.decisions;
    let mut hist = Plot::new();
    hist.add_trace(Histogram::new(decisions.clone()).name("prompts"));
    hist.set_layout(
        Layout::new()
            .height(360)
            .x_axis(
                Axis::new()
                    .title(Title::with_text("decision point"))
                    .range(vec![-0.5, n_layer as f64 + 0.5]),
            )
            .y_axis(Axis::new().title(Title::with_text("prompts"))),
    );
    figures.push(Figure { title: "Entropy per point".into(), caption: "How uncertain the lens distribution is at each depth (thin: prompts, bold: mean). A model that keeps options open stays high until late; one that commits early drops early.".into(), plot: ent });
    figures.push(Figure { title: "Probability of the final prediction per point".into(), caption: "The lens probability of the token the model finally predicts: where it rises is where the answer forms.".into(), plot: pf });
    figures.push(Figure { title: "Decision points".into(), caption: format!("For each prompt, the first point from which the final prediction stays top-1 (a model that only decides at the end has decision point {n_layer}). {}", decision_summary(decisions, n_layer)), plot: hist });
    Some(Section {
        tabs: Vec::new(),
        title: "Logit lens".into(),
        note: format!(
            "Lens = the model's own final norm ({}, eps {}) and unembedding (<code>{}</code>{}) applied to every point, computed with ggml on the quantized matrix. Self-check: at the last point it reproduces the model's logits to max |difference| {:.2e} (tolerance {:.0e}).",
            info.norm,
            info.eps,
            html_escape(&info.output_tensor),
            if info.softcap > 0.0 { format!(", soft-cap {}", info.softcap) } else { String::new() },
            info.self_check_max_abs_diff,
            info.tolerance
        ),
        figures,
    })
}

/// A trace given as raw plotly JSON (for attributes the typed builders do not expose).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
pub struct RawTrace(pub serde_json::Value);

impl plotly::Trace for RawTrace {
    fn to_json(&self) -> String {
        self.0.to_string()
    }
}

/// The mean decision point with its n and 95% bootstrap interval: a mean over a handful of prompts
/// is stated with how far it can be trusted, and below 10 prompts it says it is only indicative.
fn decision_summary(decisions: &[usize], n_layer: usize) -> String {
    let x: Vec<f64> = decisions.iter().map(|&d| d as f64).collect();
    let Some(ci) = crate::analysis::bootstrap::mean_interval(&x, 0x1e45) else {
        return "No prompt has a decision point.".into();
    };
    let pct = |v: f64| 100.0 * v / n_layer.max(1) as f64;
    let mut s = format!(
        "Mean {:.1} = {:.0}% of the depth (n = {}, 95% bootstrap interval {:.0}–{:.0}%).",
        ci.mean,
        pct(ci.mean),
        ci.n,
        pct(ci.lo),
        pct(ci.hi)
    );
    if ci.n < 10 {
        s.push_str(" Fewer than 10 prompts: indicative only.");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_decision_summary_states_n_and_marks_small_groups() {
        let s = super::decision_summary(&[10, 20, 30], 30);
        assert!(
            s.starts_with("Mean 20.0 = 67% of the depth (n = 3, 95% bootstrap interval"),
            "{s}"
        );
        assert!(s.contains("indicative only"), "{s}");
        let many: Vec<usize> = (0..40).map(|i| 20 + i % 5).collect();
        let s = super::decision_summary(&many, 30);
        assert!(s.contains("n = 40") && !s.contains("indicative"), "{s}");
        assert_eq!(
            super::decision_summary(&[], 30),
            "No prompt has a decision point."
        );
    }
}
