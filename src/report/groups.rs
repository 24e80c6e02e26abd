//! Labeled groups: alignment A, centered A, ΔA and funnel width per point — the confidence funnel.

use plotly::common::{DashType, Line, Mode, Title};
use plotly::layout::Axis;
use plotly::{Layout, Plot, Scatter};

use super::view::RunView;
use super::{color, Figure, Section};

pub fn section(v: &RunView) -> Option<Section> {
    if v.groups.iter().all(|g| g.members.len() < 2) {
        return None;
    }
    let x = v.points.clone();
    let mut a = Plot::new();
    for (g, grp) in v.groups.iter().enumerate() {
        a.add_trace(
            Scatter::new(x.clone(), grp.alignment.clone())
                .mode(Mode::Lines)
                .line(super::line(g).width(2.0).dash(DashType::Dot))
                .name(format!("{} A (raw)", grp.label)),
        );
        a.add_trace(
            Scatter::new(x.clone(), grp.alignment_centered.clone())
                .mode(Mode::Lines)
                .line(super::line(g).width(3.0))
                .name(format!("{} A (centered)", grp.label)),
        );
    }
    a.set_layout(
        Layout::new()
            .height(440)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text("alignment A"))),
    );
    let mut w = Plot::new();
    for (g, grp) in v.groups.iter().enumerate() {
        w.add_trace(
            Scatter::new(x.clone(), grp.funnel_width.clone())
                .mode(Mode::Lines)
                .line(super::line(g).width(3.0))
                .name(format!("{} (n = {})", grp.label, grp.members.len())),
        );
    }
    w.set_layout(
        Layout::new()
            .height(420)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text(
                "funnel width (mean distance to centroid / mean norm)",
            ))),
    );
    let mut figures = vec![
        Figure {
            title: "Alignment per group".into(),
            caption: "A(l) is the mean over pairs of prompts in a group of (cos + 1) / 2 at each point: 1 = all point the same way. Residual streams are anisotropic (one shared direction dominates), so raw A (dotted) is near 1 for any prompts; centered A (solid) first subtracts the mean state of all prompts of the run at that point and shows what is specific to the group.".into(),
            plot: a,
        },
        Figure {
            title: "Funnel width per group".into(),
            caption: "Mean distance of a group's states to their centroid, divided by their mean norm. A group that converges into one attractor basin narrows with depth.".into(),
            plot: w,
        },
    ];
    if let Some(d) = &v.delta {
        let mut p = Plot::new();
        p.add_trace(
            Scatter::new(x.clone(), d.delta_centered.clone())
                .mode(Mode::LinesMarkers)
                .line(Line::new().color(color(0)).width(3.0))
                .name("ΔA centered"),
        );
        p.add_trace(
            Scatter::new(x.clone(), d.delta.clone())
                .mode(Mode::Lines)
                .line(Line::new().color(color(7)).width(2.0).dash(DashType::Dot))
                .name("ΔA raw"),
        );
        p.set_layout(
            Layout::new()
                .height(420)
                .x_axis(Axis::new().title(Title::with_text("point")))
                .y_axis(
                    Axis::new().title(Title::with_text(format!("ΔA = A({}) − A({})", d.a, d.b))),
                ),
        );
        figures.push(Figure {
            title: format!("The confidence funnel: ΔA = A({}) − A({})", d.a, d.b),
            caption: format!("How much more the '{}' prompts agree with each other than the '{}' prompts do, point by point. Above 0 the first group has converged more; the point where it rises is where the model recognises that they ask the same thing.", d.a, d.b),
            plot: p,
        });
    }
    Some(Section {
        tabs: Vec::new(),
        title: "Groups and the confidence funnel".into(),
        note: format!(
            "Groups are the prompts' labels: {}.",
            v.groups
                .iter()
                .map(|g| format!("{} ({})", g.label, g.members.len()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        figures,
    })
}
