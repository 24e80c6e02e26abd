//! Trajectories through layer space: 3-D and 2-D PCA paths, and a layer slider.

use plotly::common::{Marker, Mode, Title};
use plotly::layout::{Axis, LayoutScene, Slider, SliderMethod, SliderStep};
use plotly::{Layout, Plot, Scatter, Scatter3D};
use serde_json::json;

use super::view::{thin, RunView};
use super::{color, equal_scale, Figure, Section, MAX_DRAWN};

/// Drawn prompts above which the 2-D figures switch to WebGL.
const GL_FROM: usize = 100;

fn hover(v: &RunView, i: usize, k: usize) -> String {
    let rec = &v.run.manifest.prompts[i];
    let text: String = rec.text.chars().take(80).collect();
    format!(
        "{}<br>{} · point {} · ‖h‖ = {:.1}",
        html_escape(&text),
        html_escape(&v.labels[i]),
        v.points[k],
        v.metrics[i].norm[k]
    )
}

pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn thinned_note(v: &RunView, drawn: &[usize]) -> String {
    if drawn.len() < v.n_prompts() {
        format!(
            " Showing {} of {} prompts (every {}th); the CSVs hold all of them.",
            drawn.len(),
            v.n_prompts(),
            v.n_prompts().div_ceil(drawn.len())
        )
    } else {
        String::new()
    }
}

fn var_label(v: &RunView, c: usize) -> String {
    format!(
        "PC{} ({:.1}%)",
        c + 1,
        100.0 * v.pca.explained_ratio.get(c).copied().unwrap_or(0.0)
    )
}

pub fn section(v: &RunView) -> Section {
    let drawn = thin(v.n_prompts(), MAX_DRAWN);
    // WebGL only where SVG would struggle: browsers keep ~16 WebGL contexts per page and drop the
    // oldest beyond that, so small runs draw in SVG and only the 3-D figure always uses WebGL.
    let gl = drawn.len() > GL_FROM;
    let groups = v.group_names();
    let n_pts = v.points.len();
    let k3 = v.pca.components.nrows().min(3);

    // 3-D
    let mut plot3 = Plot::new();
    let mut shown = vec![false; groups.len()];
    for &i in &drawn {
        let g = groups.iter().position(|g| *g == v.labels[i]).unwrap_or(0);
        let c = |k: usize, a: usize| if a < k3 { v.proj[[i, k, a]] } else { 0.0 };
        let sizes: Vec<usize> = (0..n_pts)
            .map(|k| if k == 0 || k + 1 == n_pts { 7 } else { 2 })
            .collect();
        let mut tr = Scatter3D::new(
            (0..n_pts).map(|k| c(k, 0)).collect(),
            (0..n_pts).map(|k| c(k, 1)).collect(),
            (0..n_pts).map(|k| c(k, 2)).collect(),
        )
        .mode(Mode::LinesMarkers)
        .name(&v.labels[i])
        .legend_group(&v.labels[i])
        .show_legend(!shown[g])
        .line(super::line(g).width(2.0))
        .marker(Marker::new().color(color(g)).size_array(sizes))
        .hover_text_array((0..n_pts).map(|k| hover(v, i, k)).collect::<Vec<_>>())
        .hover_info(plotly::common::HoverInfo::Text);
        shown[g] = true;
        tr = tr.opacity(0.8);
        plot3.add_trace(tr);
    }
    plot3.set_layout(
        Layout::new()
            .height(620)
            .scene(
                LayoutScene::new()
                    .x_axis(Axis::new().title(Title::with_text(var_label(v, 0))))
                    .y_axis(Axis::new().title(Title::with_text(var_label(v, 1))))
                    .z_axis(Axis::new().title(Title::with_text(var_label(v, 2))))
                    // Equal scales on the three axes: a cube would stretch PC3 to PC1's size.
                    .aspect_mode(plotly::layout::AspectMode::Data)
                    // Farther out and a little lower than plotly's default view, which cut the
                    // lowest tick labels and the cube's near corner off at the bottom.
                    .camera(
                        plotly::layout::Camera::new()
                            .eye((1.55, 1.55, 1.1).into())
                            .center((0.0, 0.0, -0.12).into()),
                    ),
            )
            .legend(plotly::layout::Legend::new().title(Title::with_text("label"))),
    );

    // 2-D
    let mut plot2 = Plot::new();
    let mut shown = vec![false; groups.len()];
    for &i in &drawn {
        let g = groups.iter().position(|g| *g == v.labels[i]).unwrap_or(0);
        let sizes: Vec<usize> = (0..n_pts)
            .map(|k| if k == 0 || k + 1 == n_pts { 9 } else { 3 })
            .collect();
        let tr = Scatter::new(
            (0..n_pts).map(|k| v.proj[[i, k, 0]]).collect(),
            (0..n_pts).map(|k| v.proj[[i, k, 1.min(k3 - 1)]]).collect(),
        )
        .mode(Mode::LinesMarkers)
        .web_gl_mode(gl)
        .name(&v.labels[i])
        .legend_group(&v.labels[i])
        .show_legend(!shown[g])
        .line(super::line(g).width(1.5))
        .marker(Marker::new().color(color(g)).size_array(sizes))
        .hover_text_array((0..n_pts).map(|k| hover(v, i, k)).collect::<Vec<_>>())
        .hover_info(plotly::common::HoverInfo::Text)
        .opacity(0.8);
        shown[g] = true;
        plot2.add_trace(tr);
    }
    plot2.set_layout(
        Layout::new()
            .height(520)
            .x_axis(Axis::new().title(Title::with_text(var_label(v, 0))))
            .y_axis(equal_scale(
                Axis::new().title(Title::with_text(var_label(v, 1))),
            )),
    );

    // Layer slider: one trace per point holding every drawn prompt there; the slider shows one.
    let mut slider_plot = Plot::new();
    let (xs, ys): (Vec<f64>, Vec<f64>) = drawn
        .iter()
        .flat_map(|&i| (0..n_pts).map(move |k| (i, k)))
        .map(|(i, k)| (v.proj[[i, k, 0]], v.proj[[i, k, 1.min(k3 - 1)]]))
        .unzip();
    let pad = |vals: &[f64]| {
        let (lo, hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let m = (hi - lo).max(1e-9) * 0.05;
        vec![lo - m, hi + m]
    };
    for k in 0..n_pts {
        let colors: Vec<&str> = drawn
            .iter()
            .map(|&i| color(groups.iter().position(|g| *g == v.labels[i]).unwrap_or(0)))
            .collect();
        let tr = Scatter::new(
            drawn.iter().map(|&i| v.proj[[i, k, 0]]).collect(),
            drawn
                .iter()
                .map(|&i| v.proj[[i, k, 1.min(k3 - 1)]])
                .collect(),
        )
        .mode(Mode::Markers)
        .web_gl_mode(gl)
        .name(format!("point {}", v.points[k]))
        .show_legend(false)
        .visible(if k == 0 {
            plotly::common::Visible::True
        } else {
            plotly::common::Visible::False
        })
        .marker(Marker::new().color_array(colors).size(8))
        .hover_text_array(drawn.iter().map(|&i| hover(v, i, k)).collect::<Vec<_>>())
        .hover_info(plotly::common::HoverInfo::Text);
        slider_plot.add_trace(tr);
    }
    let steps: Vec<SliderStep> = (0..n_pts)
        .map(|k| {
            let vis: Vec<bool> = (0..n_pts).map(|j| j == k).collect();
            SliderStep::new()
                .method(SliderMethod::Restyle)
                .label(v.points[k].to_string())
                .args(json!([{ "visible": vis }]))
        })
        .collect();
    slider_plot.set_layout(
        Layout::new()
            .height(640)
            .x_axis(
                Axis::new()
                    .title(Title::with_text(var_label(v, 0)))
                    .range(pad(&xs)),
            )
            .y_axis(equal_scale(
                Axis::new()
                    .title(Title::with_text(var_label(v, 1)))
                    .range(pad(&ys)),
            ))
            // The slider sits below the x axis's labels and title, never over them.
            .margin(plotly::layout::Margin::new().bottom(220))
            .sliders(vec![Slider::new()
                .active(0)
                .steps(steps)
                .pad(plotly::common::Pad::new(75, 0, 0))
                .current_value(
                    plotly::layout::SliderCurrentValue::new().prefix("point "),
                )]),
    );

    let note = thinned_note(v, &drawn);
    let how = match v.pca.method {
        crate::analysis::pca::PcaMethod::Covariance => {
            "eigenvectors of the covariance matrix".to_string()
        }
        crate::analysis::pca::PcaMethod::Subspace => format!(
            "subspace iteration over {} passes of the states, the width being too large for a covariance matrix",
            v.pca.passes
        ),
    };
    let expl = format!(
        "Axes are the first principal components of this model's states at the last prompt position, fitted on every point of every prompt ({how}; PC1–3 explain {:.1}% of the variance). ",
        100.0 * v.pca.explained_ratio.iter().take(3).sum::<f64>()
    );
    Section {
        tabs: Vec::new(),
        title: "Trajectories".into(),
        note: format!("{} prompts, {} points each (point 0 = input of block 0, point {} = output of the last block).{note}", v.n_prompts(), n_pts, v.n_layer),
        figures: vec![
            Figure {
                title: "Trajectories through the layers (3-D)".into(),
                caption: format!("{expl}Each line is one prompt's last-position state moving from point 0 (large circle) through every block to the output (large marker at the end); colours are labels. Prompts that mean the same thing should end close together. Drag to rotate; hover for the prompt, point and norm."),
                plot: plot3,
            },
            Figure {
                title: "Trajectories (2-D, PC1 × PC2)".into(),
                caption: format!("{expl}The same paths flattened onto the first two components, drawn with equal scales on both axes so that the picture keeps its true proportions. Distances here are only the projected part of the real ones; the metrics sections are computed in the full hidden dimension."),
                plot: plot2,
            },
            Figure {
                title: "Layer by layer".into(),
                caption: "Move the slider to see where every prompt sits at one point. Watch groups spread apart or collapse into one basin (the funnel) as depth grows. Axis ranges stay fixed and the two axes share one scale, so motion is real motion.".into(),
                plot: slider_plot,
            },
        ],
    }
}
