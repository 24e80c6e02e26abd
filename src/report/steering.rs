//! Steering and system prompts: steered runs overlaid on their unsteered twin (in the unsteered
//! run's PCA basis), and generation of the same user prompts under two system prompts side by side.

use plotly::common::{DashType, Line, Marker, Mode, Title};
use plotly::layout::Axis;
use plotly::{Layout, Plot, Scatter};

use super::trajectories::html_escape;
use super::view::RunView;
use super::{color, Figure, Section};
use crate::analysis::metrics;

const MAX_PROMPTS: usize = 6;

fn same_model(a: &RunView, b: &RunView) -> bool {
    a.run.manifest.provenance.model_sha256 == b.run.manifest.provenance.model_sha256
}

fn same_texts(a: &RunView, b: &RunView) -> bool {
    let (pa, pb) = (&a.run.manifest.prompts, &b.run.manifest.prompts);
    pa.len() == pb.len() && pa.iter().zip(pb).all(|(x, y)| x.text == y.text)
}

fn steered(v: &RunView) -> bool {
    !v.run.manifest.capture.control_vectors.is_empty()
}

/// Steered runs with their unsteered twin (same model file, same prompts): (steered, unsteered).
pub fn steering_pairs(views: &[RunView]) -> Vec<(usize, usize)> {
    (0..views.len())
        .filter(|&s| steered(&views[s]))
        .filter_map(|s| {
            (0..views.len())
                .find(|&u| {
                    !super::interventions::intervened(&views[u])
                        && same_model(&views[s], &views[u])
                        && same_texts(&views[s], &views[u])
                })
                .map(|u| (s, u))
        })
        .collect()
}

/// Runs of the same model and user prompts with generation under different system prompts.
pub fn system_pairs(views: &[RunView]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..views.len() {
        for j in i + 1..views.len() {
            let (a, b) = (&views[i].run.manifest, &views[j].run.manifest);
            if a.capture.generate > 0
                && b.capture.generate > 0
                && a.capture.system != b.capture.system
                && same_model(&views[i], &views[j])
                && same_texts(&views[i], &views[j])
                && !super::interventions::intervened(&views[i])
                && !super::interventions::intervened(&views[j])
            {
                out.push((i, j));
            }
        }
    }
    out
}

fn describe(v: &RunView) -> String {
    let c = &v.run.manifest.capture;
    if steered(v) {
        format!(
            "steered ×{} at points {:?}",
            c.control_scale,
            c.control_points.unwrap_or((0, 0))
        )
    } else if let Some(s) = &c.system {
        format!("system: “{}”", s.chars().take(60).collect::<String>())
    } else {
        "the template's default system prompt".into()
    }
}

pub fn steering_section(views: &[RunView], s: usize, u: usize) -> anyhow::Result<Section> {
    let (vs, vu) = (&views[s], &views[u]);
    let mut plot = Plot::new();
    let n = vu.n_prompts().min(MAX_PROMPTS);
    for p in 0..n {
        for (v, dash, w, tag) in [
            (vu, DashType::Solid, 2.5, "unsteered"),
            (vs, DashType::Dash, 1.5, "steered"),
        ] {
            let proj = vu.pca.transform(v.trajectory(p)?.view());
            plot.add_trace(
                Scatter::new(
                    proj.column(0).to_vec(),
                    proj.column(1.min(proj.ncols() - 1)).to_vec(),
                )
                .mode(Mode::LinesMarkers)
                .line(Line::new().color(color(p)).dash(dash).width(w))
                .marker(Marker::new().size(4))
                .name(format!("{} · {tag}", vu.run.manifest.prompts[p].id)),
            );
        }
    }
    plot.set_layout(
        Layout::new()
            .height(540)
            .x_axis(Axis::new().title(Title::with_text("unsteered PC1")))
            .y_axis(super::equal_scale(
                Axis::new().title(Title::with_text("unsteered PC2")),
            )),
    );
    let texts: Vec<String> = (0..n)
        .filter(|&p| {
            !vu.run.manifest.prompts[p].generated_text.is_empty()
                || !vs.run.manifest.prompts[p].generated_text.is_empty()
        })
        .map(|p| {
            format!(
                "<b>{}</b> — unsteered: <i>{}</i><br>steered: <i>{}</i>",
                html_escape(&vu.run.manifest.prompts[p].text),
                html_escape(&vu.run.manifest.prompts[p].generated_text),
                html_escape(&vs.run.manifest.prompts[p].generated_text)
            )
        })
        .collect();
    Ok(Section {
        tabs: Vec::new(),
        title: format!("Steering: {} vs unsteered", describe(vs)),
        note: format!("Control vector(s): {}. {}", html_escape(&vs.run.manifest.capture.control_vectors.join(", ")), texts.join("<br>")),
        figures: vec![Figure {
            title: "Steered and unsteered trajectories (unsteered basis)".into(),
            caption: "Each prompt's last-position path without (solid) and with (dashed) the control vector, in the unsteered run's principal components. Points before the first steered point coincide; from there the steered path moves along the direction.".into(),
            plot,
        }],
    })
}

pub fn system_section(views: &[RunView], i: usize, j: usize) -> anyhow::Result<Section> {
    let (va, vb) = (&views[i], &views[j]);
    // The contrast direction at the last point, from any run of the same model in the report.
    let dir = views.iter().filter(|v| same_model(v, va)).find_map(|v| {
        v.contrast.as_ref().map(|cp| {
            let c = &cp.contrast;
            (
                cp.a.clone(),
                cp.b.clone(),
                c.directions.row(c.directions.nrows() - 1).to_owned(),
            )
        })
    });
    let mut path = Plot::new();
    let mut turn = Plot::new();
    let mut proj_plot = Plot::new();
    let mut texts = Vec::new();
    for p in 0..va.n_prompts().min(MAX_PROMPTS) {
        for (k, v) in [va, vb].into_iter().enumerate() {
            let Some((h, _)) = v.generated_path(p)? else {
                continue;
            };
            let dash = if k == 0 {
                DashType::Solid
            } else {
                DashType::Dash
            };
            let name = format!("{} · {}", v.run.manifest.prompts[p].id, describe(v));
            let pr = va.pca.transform(h.view());
            path.add_trace(
                Scatter::new(
                    pr.column(0).to_vec(),
                    pr.column(1.min(pr.ncols() - 1)).to_vec(),
                )
                .mode(Mode::LinesMarkers)
                .line(Line::new().color(color(p)).dash(dash.clone()))
                .name(name.clone()),
            );
            let steps: Vec<usize> = (0..h.nrows()).collect();
            turn.add_trace(
                Scatter::new(steps.clone(), metrics::trajectory(h.view()).turn_deg)
                    .mode(Mode::LinesMarkers)
                    .line(Line::new().color(color(p)).dash(dash.clone()))
                    .name(name.clone()),
            );
            if let Some((_, _, d)) = &dir {
                let norm = d
                    .iter()
                    .map(|x| (*x as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-30);
                let y: Vec<f64> = h
                    .outer_iter()
                    .map(|r| {
                        r.iter()
                            .zip(d.iter())
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / norm
                    })
                    .collect();
                proj_plot.add_trace(
                    Scatter::new(steps, y)
                        .mode(Mode::LinesMarkers)
                        .line(Line::new().color(color(p)).dash(dash))
                        .name(name),
                );
            }
        }
        texts.push(format!(
            "<b>{}</b><br>{}: <i>{}</i><br>{}: <i>{}</i>",
            html_escape(&va.run.manifest.prompts[p].text),
            html_escape(&describe(va)),
            html_escape(&va.run.manifest.prompts[p].generated_text),
            html_escape(&describe(vb)),
            html_escape(&vb.run.manifest.prompts[p].generated_text)
        ));
    }
    path.set_layout(
        Layout::new()
            .height(480)
            .x_axis(Axis::new().title(Title::with_text("PC1")))
            .y_axis(super::equal_scale(
                Axis::new().title(Title::with_text("PC2")),
            )),
    );
    turn.set_layout(
        Layout::new()
            .height(400)
            .x_axis(Axis::new().title(Title::with_text("generation step (0 = last prompt token)")))
            .y_axis(Axis::new().title(Title::with_text("turning angle (degrees)"))),
    );
    let mut figures = vec![
        Figure { title: "Generated-token trajectories under both system prompts".into(), caption: "The last-point state of each generated token (solid: first system prompt, dashed: second), in the first run's PCA basis.".into(), plot: path },
        Figure { title: "Turning angle per step".into(), caption: "Angle between consecutive steps of each path in the full hidden dimension: a hard refusal shows as an early spike, a soft redirect as a gradual bend.".into(), plot: turn },
    ];
    if let Some((a, b, _)) = &dir {
        proj_plot.set_layout(
            Layout::new()
                .height(400)
                .x_axis(Axis::new().title(Title::with_text("generation step")))
                .y_axis(Axis::new().title(Title::with_text(format!(
                    "projection on the {a} − {b} direction"
                )))),
        );
        figures.push(Figure { title: format!("Each step on the {a} − {b} direction"), caption: format!("The projection of every generated token's last-point state on the contrast direction (from the '{a}' vs '{b}' run of this model in the report): how far each continuation leans towards '{a}'."), plot: proj_plot });
    }
    Ok(Section {
        tabs: Vec::new(),
        title: format!(
            "System prompts side by side: {} vs {}",
            describe(va),
            describe(vb)
        ),
        note: texts.join("<br>"),
        figures,
    })
}
