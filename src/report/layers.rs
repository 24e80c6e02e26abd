//! Per-point metric curves (full hidden dimension), and the same across models on normalized depth.

use plotly::common::{Line, Mode, Title};
use plotly::layout::Axis;
use plotly::{Layout, Plot, Scatter};

use super::view::{thin, RunView};
use super::{color, Figure, Section, MAX_DRAWN};

/// (metric, axis title, how to read it)
pub const METRICS: [(&str, &str, &str); 4] = [
    ("rel_step", "relative step ‖h(p+1) − h(p)‖ / ‖h(p)‖", "How far each block moves the state, relative to its size (log axis: the step out of point 0, the raw embedding, is often ten times any later one). Peaks are the blocks that rewrite most; a flat tail means late blocks only refine."),
    ("cos_final", "cos(h(p), h(last point))", "How much of the final direction is already there at each point. Where it rises steeply the model commits to its output representation."),
    ("turn_deg", "turning angle (degrees)", "Angle between consecutive steps, in the full hidden dimension: 0° keeps going the same way, 90° turns to a new direction, 180° reverses. Peaks are where the path changes course."),
    ("norm", "‖h(p)‖", "Size of the residual stream. It usually grows with depth; sudden jumps often come from a few very large dimensions."),
];

fn mean_curve(vals: &[&[f64]]) -> Vec<f64> {
    let n = vals.first().map(|v| v.len()).unwrap_or(0);
    (0..n)
        .map(|k| {
            let xs: Vec<f64> = vals
                .iter()
                .map(|v| v[k])
                .filter(|x| x.is_finite())
                .collect();
            if xs.is_empty() {
                f64::NAN
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            }
        })
        .collect()
}

/// The y axis of a metric's figure. The relative step is drawn on a log axis labelled with its
/// decades: the step out of point 0 (the raw embedding) is often an order of magnitude larger
/// than every later one and would flatten them all on a linear axis.
fn metric_axis<'a>(metric: &str, label: &str, curves: impl Iterator<Item = &'a [f64]>) -> Axis {
    if metric == "rel_step" {
        super::log_axis(label, curves.flatten().copied())
    } else {
        Axis::new().title(Title::with_text(label))
    }
}

pub fn section(v: &RunView) -> Section {
    let drawn = thin(v.n_prompts(), MAX_DRAWN);
    let x: Vec<usize> = v.points.clone();
    let figures = METRICS
        .iter()
        .map(|&(metric, axis, read)| {
            let mut plot = Plot::new();
            for &i in &drawn {
                let g = v
                    .groups
                    .iter()
                    .position(|g| g.label == v.labels[i])
                    .unwrap_or(0);
                plot.add_trace(
                    Scatter::new(x.clone(), v.metrics[i].get(metric).to_vec())
                        .mode(Mode::Lines)
                        .line(super::line(g).width(0.8))
                        .opacity(0.35)
                        .legend_group(&v.labels[i])
                        .show_legend(false)
                        .name(&v.labels[i]),
                );
            }
            for (g, grp) in v.groups.iter().enumerate() {
                let curves: Vec<&[f64]> = grp
                    .members
                    .iter()
                    .map(|&i| v.metrics[i].get(metric))
                    .collect();
                plot.add_trace(
                    Scatter::new(x.clone(), mean_curve(&curves))
                        .mode(Mode::Lines)
                        .line(super::line(g).width(4.0))
                        .legend_group(&grp.label)
                        .name(format!("{} (mean of {})", grp.label, grp.members.len())),
                );
            }
            plot.set_layout(
                Layout::new()
                    .height(420)
                    .x_axis(Axis::new().title(Title::with_text("point")))
                    .y_axis(metric_axis(
                        metric,
                        axis,
                        drawn.iter().map(|&i| v.metrics[i].get(metric)),
                    )),
            );
            Figure {
                title: axis.to_string(),
                caption: format!(
                    "{read} Thin lines: one per prompt; bold: the mean of each label."
                ),
                plot,
            }
        })
        .collect();
    Section {
        tabs: Vec::new(),
        title: "Per-point geometry".into(),
        note: "All metrics in the full hidden dimension, at the last prompt position.".into(),
        figures,
    }
}

/// Several runs: each model's mean curves on normalized depth (point / n_layer), so a 30-block
/// and an 18-block model compare directly.
pub fn compare_section(views: &[RunView]) -> Section {
    // Runs of one model file (other prompts, settings) are runs, not models.
    let same_model = views.iter().all(|v| {
        v.run.manifest.provenance.model_sha256 == views[0].run.manifest.provenance.model_sha256
    });
    let (what, each) = if same_model {
        ("runs", "run")
    } else {
        ("models", "model")
    };
    let mut figures: Vec<Figure> = METRICS
        .iter()
        .filter(|(m, _, _)| *m != "norm")
        .map(|&(metric, axis, read)| {
            let mut plot = Plot::new();
            let mut means = Vec::new();
            for (r, v) in views.iter().enumerate() {
                let curves: Vec<&[f64]> = v.metrics.iter().map(|m| m.get(metric)).collect();
                let mean = mean_curve(&curves);
                plot.add_trace(
                    Scatter::new(v.depth(), mean.clone())
                        .mode(Mode::LinesMarkers)
                        .line(Line::new().color(color(r)).dash(super::dash(r)).width(3.0))
                        .name(&v.name),
                );
                means.push(mean);
            }
            plot.set_layout(
                Layout::new()
                    .height(420)
                    .x_axis(
                        Axis::new()
                            .title(Title::with_text("depth (point / n_layer)"))
                            .range(vec![0.0, 1.0]),
                    )
                    .y_axis(metric_axis(
                        metric,
                        axis,
                        means.iter().map(|m| m.as_slice()),
                    )),
            );
            Figure {
                title: format!("{axis} across {what}"),
                caption: format!(
                    "{read} One line per run: the mean over its prompts, on normalized depth."
                ),
                plot,
            }
        })
        .collect();
    if views.iter().any(|v| v.delta.is_some()) {
        let mut plot = Plot::new();
        for (r, v) in views.iter().enumerate() {
            if let Some(d) = &v.delta {
                plot.add_trace(
                    Scatter::new(v.depth(), d.delta_centered.clone())
                        .mode(Mode::LinesMarkers)
                        .line(Line::new().color(color(r)).dash(super::dash(r)).width(3.0))
                        .name(format!("{} ({} − {})", v.name, d.a, d.b)),
                );
            }
        }
        plot.set_layout(
            Layout::new()
                .height(420)
                .x_axis(
                    Axis::new()
                        .title(Title::with_text("depth (point / n_layer)"))
                        .range(vec![0.0, 1.0]),
                )
                .y_axis(Axis::new().title(Title::with_text("ΔA centered"))),
        );
        figures.push(Figure {
            title: format!("Funnel across {what} (ΔA, centered)"),
            caption: format!("Centered alignment of the first label minus the second, per {each}, on normalized depth: where it rises, the first group converges more than the second."),
            plot,
        });
    }
    Section {
        tabs: Vec::new(),
        title: if same_model {
            "Runs compared".into()
        } else {
            "Models compared".into()
        },
        note: format!("{} runs overlaid on normalized depth.", views.len()),
        figures,
    }
}
