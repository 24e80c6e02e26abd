//! Per-token view of one prompt: relative step size over (point × position).

use plotly::common::{ColorScale, ColorScalePalette, Title};
use plotly::layout::Axis;
use plotly::{HeatMap, Layout, Plot};

use super::trajectories::html_escape;
use super::view::RunView;
use super::{Figure, Section};
use crate::analysis::metrics;

pub fn section(v: &RunView) -> anyhow::Result<Option<Section>> {
    let prompts = &v.run.manifest.prompts;
    // The first prompt with several stored positions and an NPY states file.
    let Some(i) = prompts
        .iter()
        .position(|p| p.positions.len() > 1 && p.states_file.is_some())
    else {
        return Ok(None);
    };
    // One position in memory at a time: a long prompt's states can exceed memory.
    let states = v.run.prompt_states(i)?;
    let rec = &prompts[i];
    let n_pts = states.n_points;
    let cols: Vec<Vec<f64>> = (0..states.n_positions)
        .map(|t| Ok(metrics::trajectory(states.position(t)?.view()).rel_step))
        .collect::<anyhow::Result<_>>()?;
    // z[k][t] for k = 0..n_pts-1 (the step out of point k).
    let z: Vec<Vec<f64>> = (0..n_pts - 1)
        .map(|k| cols.iter().map(|c| c[k]).collect())
        .collect();
    let labels: Vec<String> = rec
        .positions
        .iter()
        .map(|&p| {
            format!(
                "{p}: {}",
                html_escape(&crate::answer::visible(&rec.pieces[p]))
            )
        })
        .collect();
    let ys: Vec<String> = v.points[..n_pts - 1]
        .iter()
        .map(|p| format!("{p}→{}", p + 1))
        .collect();
    let mut plot = Plot::new();
    // The step out of point 0 (the raw embedding) is often ten times any later one: on a linear
    // scale over the data's range it would leave every other cell dark.
    let range = super::robust_range(z.iter().flatten());
    let mut hm = HeatMap::new(labels, ys, z)
        .color_scale(ColorScale::Palette(ColorScalePalette::Viridis))
        .color_bar(plotly::common::ColorBar::new().title(Title::with_text("relative step")))
        .name("relative step");
    if let Some(r) = range {
        hm = hm.zmin(r.lo).zmax(r.hi);
    }
    plot.add_trace(hm);
    plot.set_layout(
        Layout::new()
            .height(560)
            .x_axis(
                Axis::new()
                    .title(Title::with_text("position: token"))
                    // Vertical: a slanted first label ran past the figure's left edge.
                    .tick_angle(-90.0)
                    .auto_margin(true),
            )
            .y_axis(Axis::new().title(Title::with_text("step out of point"))),
    );
    let text = crate::answer::cut(&crate::answer::one_line(&rec.text), 120);
    let answer = if rec.top.is_empty() {
        String::new()
    } else {
        format!(" → {}", super::answers::top_html(&rec.top, 3))
    };
    Ok(Some(Section {
        tabs: Vec::new(),
        title: "Per token".into(),
        note: format!(
            "Prompt {} ({}): “{}”{answer}",
            rec.index,
            html_escape(&rec.id),
            html_escape(&text)
        ),
        figures: vec![Figure {
            title: "Relative step size per token and block".into(),
            caption: format!("Each cell is ‖h(p+1) − h(p)‖ / ‖h(p)‖ for one token position (column) and one block (row): how much that block rewrites that token's state. Bright rows are blocks that work hard on every token; bright cells at single tokens show where a block attends to something specific. {}", range.map(|r| r.sentence()).unwrap_or_default()),
            plot,
        }],
    }))
}
