//! Generation runs (`--generate`): the last-point trajectory over generated tokens and its turns.

use plotly::common::{Marker, Mode, Title};
use plotly::layout::Axis;
use plotly::{Layout, Plot, Scatter};

use super::trajectories::html_escape;
use super::view::RunView;
use super::{Figure, Section};
use crate::analysis::metrics;

/// Prompts drawn in the generation figures.
const MAX_GEN: usize = 8;

pub fn section(v: &RunView) -> anyhow::Result<Option<Section>> {
    let m = &v.run.manifest;
    if m.capture.generate == 0 {
        return Ok(None);
    }
    let mut path = Plot::new();
    let mut turn = Plot::new();
    let mut texts = Vec::new();
    let kp = v.points.len() - 1;
    for (n, rec) in m
        .prompts
        .iter()
        .filter(|p| p.states_file.is_some() && p.tokens.len() > p.n_prompt_tokens)
        .take(MAX_GEN)
        .enumerate()
    {
        let Some((h, cols)) = v.generated_path(rec.index)? else {
            continue;
        };
        let proj = v.pca.transform(h.view());
        let steps: Vec<usize> = (0..cols.len()).collect();
        let hover: Vec<String> = cols
            .iter()
            .map(|&j| html_escape(&rec.pieces[rec.positions[j]]))
            .collect();
        path.add_trace(
            Scatter::new(
                proj.column(0).to_vec(),
                proj.column(1.min(proj.ncols() - 1)).to_vec(),
            )
            .mode(Mode::LinesMarkers)
            .line(super::line(n).width(2.0))
            .marker(Marker::new().size(6))
            .hover_text_array(hover)
            .name(rec.id.as_str()),
        );
        let t = metrics::trajectory(h.view());
        turn.add_trace(
            Scatter::new(steps, t.turn_deg)
                .mode(Mode::LinesMarkers)
                .line(super::line(n).width(2.0))
                .name(rec.id.as_str()),
        );
        // The prompt, then what the model wrote after it: marked apart, or a continuation that
        // starts without a space reads as part of the prompt.
        texts.push(format!(
            "<b>{}</b>: “{}” → <i>“{}”</i>",
            html_escape(&rec.id),
            html_escape(&crate::answer::one_line(&rec.text)),
            html_escape(&crate::answer::visible_text(&rec.generated_text))
        ));
    }
    if texts.is_empty() {
        return Ok(None);
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
            .x_axis(Axis::new().title(Title::with_text("step (0 = last prompt token)")))
            .y_axis(Axis::new().title(Title::with_text("turning angle (degrees)"))),
    );
    Ok(Some(Section {
        tabs: Vec::new(),
        title: "Generation".into(),
        note: texts.join("<br>"),
        figures: vec![
            Figure {
                title: "Last-point trajectory over generated tokens".into(),
                caption: format!("The state at point {} for the last prompt token and each greedily generated token, in this model's PCA basis. Hover for the token.", v.points[kp]),
                plot: path,
            },
            Figure {
                title: "Turning angle per generation step".into(),
                caption: "Angle between consecutive steps of that path, in the full hidden dimension: spikes are where the continuation changes course (a new clause, a refusal, a topic switch).".into(),
                plot: turn,
            },
        ],
    }))
}
