//! Contrast between two labels (refusal geometry, sentiment, ...): leave-one-out separation per
//! point with a shuffled-label control, the "Geiger counter" of every prompt's projection on the
//! per-point direction, and whether the switch is hard or soft.

use plotly::common::{DashType, Line, Mode, Title};
use plotly::layout::Axis;
use plotly::{Layout, Plot, Scatter};

use super::trajectories::html_escape;
use super::view::{thin, RunView};
use super::{color, Figure, Section, MAX_DRAWN};

pub fn section(v: &RunView) -> Option<Section> {
    let cp = v.contrast.as_ref()?;
    let (a, b, c, control) = (&cp.a, &cp.b, &cp.contrast, &cp.control);
    let x = v.points.clone();
    let mut sep = Plot::new();
    let (na, nb) = (v.groups[0].members.len(), v.groups[1].members.len());
    let (lo, hi): (Vec<f64>, Vec<f64>) = c
        .separation
        .iter()
        .map(|s| crate::analysis::contrast::d_interval(s.d, na, nb))
        .unzip();
    sep.add_trace(
        Scatter::new(x.clone(), lo)
            .mode(Mode::Lines)
            .line(Line::new().color(color(0)).width(0.0))
            .show_legend(false)
            .hover_info(plotly::common::HoverInfo::Skip)
            .name("d, 95% interval (low)"),
    );
    sep.add_trace(
        Scatter::new(x.clone(), hi)
            .mode(Mode::Lines)
            .line(Line::new().color(color(0)).width(0.0))
            .fill(plotly::common::Fill::ToNextY)
            .fill_color("rgba(31,119,180,0.15)")
            .hover_info(plotly::common::HoverInfo::Skip)
            .name(format!("d, approximate 95% interval (n = {na} vs {nb})")),
    );
    sep.add_trace(
        Scatter::new(x.clone(), c.separation.iter().map(|s| s.d).collect())
            .mode(Mode::LinesMarkers)
            .line(Line::new().color(color(0)).width(3.0))
            .name("Cohen's d (leave-one-out)"),
    );
    sep.add_trace(
        Scatter::new(x.clone(), control.separation.iter().map(|s| s.d).collect())
            .mode(Mode::Lines)
            .line(Line::new().color(color(7)).width(2.0).dash(DashType::Dot))
            .name("d, shuffled labels"),
    );
    sep.add_trace(
        Scatter::new(x.clone(), c.separation.iter().map(|s| s.accuracy).collect())
            .mode(Mode::Lines)
            .line(Line::new().color(color(2)).width(2.0))
            .name("accuracy (leave-one-out)")
            .y_axis("y2"),
    );
    sep.add_trace(
        Scatter::new(
            x.clone(),
            control.separation.iter().map(|s| s.accuracy).collect(),
        )
        .mode(Mode::Lines)
        .line(Line::new().color(color(7)).width(1.0).dash(DashType::Dash))
        .name("accuracy, shuffled")
        .y_axis("y2"),
    );
    sep.set_layout(
        Layout::new()
            .height(540)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text("Cohen's d")))
            .y_axis2(
                Axis::new()
                    .title(Title::with_text("nearest-mean accuracy"))
                    .overlaying("y")
                    .side(plotly::common::AxisSide::Right)
                    .range(vec![0.0, 1.0]),
            )
            // Below the plot: at its default place the legend sat on the right-hand axis.
            .legend(
                plotly::layout::Legend::new()
                    .orientation(plotly::common::Orientation::Horizontal)
                    .x(0.0)
                    .y(-0.3)
                    .y_anchor(plotly::common::Anchor::Top),
            )
            .margin(plotly::layout::Margin::new().bottom(150)),
    );
    let mut geiger = Plot::new();
    let drawn = thin(v.n_prompts(), MAX_DRAWN);
    let mut shown = [false, false];
    for &i in &drawn {
        let g = if &v.labels[i] == a {
            0
        } else if &v.labels[i] == b {
            1
        } else {
            continue;
        };
        geiger.add_trace(
            Scatter::new(x.clone(), c.projections.row(i).to_vec())
                .mode(Mode::Lines)
                .line(super::line(g).width(1.2))
                .opacity(0.6)
                .legend_group(&v.labels[i])
                .show_legend(!shown[g])
                .name(&v.labels[i])
                .hover_text(html_escape(&v.run.manifest.prompts[i].text)),
        );
        shown[g] = true;
    }
    geiger.set_layout(
        Layout::new()
            .height(480)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text(format!(
                "projection on the {a} − {b} direction"
            )))),
    );
    let (ae, be) = (html_escape(a), html_escape(b));
    let (na, nb) = (v.groups[0].members.len(), v.groups[1].members.len());
    let note = format!(
        "<b>{ae}</b> vs <b>{be}</b>. {}",
        html_escape(&crate::analysis::contrast::reading(
            c, control, na, nb, &v.points
        ))
    );
    Some(Section {
        tabs: Vec::new(),
        title: format!("Contrast: {a} vs {b}"),
        note,
        figures: vec![
            Figure {
                title: "Separation per point (leave-one-out)".into(),
                caption: format!("At each point the direction is the difference of the two groups' means; each prompt is projected on the direction fitted without it. Cohen's d and nearest-mean accuracy of those projections say how separable '{a}' and '{b}' are at that depth; the shaded band is d's approximate 95% interval for these group sizes; the dotted lines are the same with shuffled labels (near 0 and 50% when the separation is real). A peak whose band reaches down to the shuffled line is not established. The peak is where the contrast is strongest — the point to read a direction from (for refusal, see the README on choosing the intervention point by its effect)."),
                plot: sep,
            },
            Figure {
                title: "The Geiger counter: every prompt's projection through depth".into(),
                caption: format!("One line per prompt: its position along the per-point '{a} − {b}' direction, relative to the midpoint of the two means. Where the two colours split is where the model starts to treat them differently; a sudden split is a hard switch, a gradual fan-out a soft one."),
                plot: geiger,
            },
        ],
    })
}
