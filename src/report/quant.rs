//! The quantization section: runs of one model at several precisions (a ladder), compared with
//! the reference run point by point on identical tokens, and at the output.

use plotly::common::{DashType, Line, Marker, Mode, Title};
use plotly::layout::Axis;
use plotly::{Bar, Layout, Plot, Scatter};

use super::trajectories::html_escape;
use super::view::RunView;
use super::{color, Figure, Section};
use crate::analysis::drift::{self, DriftAccumulator, OutputDrift, PointDrift};

/// Relative error above which a level counts as having left the reference's path.
pub const THRESHOLD: f64 = 0.05;

/// Trajectories overlaid per level in the reference basis.
const MAX_OVERLAY: usize = 6;

pub struct Level {
    /// Index into the views.
    pub run: usize,
    pub label: String,
    pub drift: Vec<PointDrift>,
    pub output: OutputDrift,
}

pub struct Ladder {
    pub reference: usize,
    pub levels: Vec<Level>,
}

/// Why these runs are not a ladder (None when they are).
pub fn incomparable(views: &[RunView]) -> Option<String> {
    let a = &views[0].run.manifest;
    for v in &views[1..] {
        let b = &v.run.manifest;
        let why = if a.model.architecture != b.model.architecture {
            Some(format!(
                "architectures differ ({} vs {})",
                a.model.architecture, b.model.architecture
            ))
        } else if a.model.n_layer != b.model.n_layer {
            Some(format!(
                "layer counts differ ({} vs {})",
                a.model.n_layer, b.model.n_layer
            ))
        } else if a.model.n_embd != b.model.n_embd {
            Some(format!(
                "widths differ ({} vs {})",
                a.model.n_embd, b.model.n_embd
            ))
        } else if a.model.n_vocab != b.model.n_vocab {
            Some(format!(
                "vocabularies differ ({} vs {} tokens)",
                a.model.n_vocab, b.model.n_vocab
            ))
        } else if a.capture.points != b.capture.points {
            Some("the runs keep different points".to_string())
        } else if a.prompts.len() != b.prompts.len()
            || a.prompts
                .iter()
                .zip(&b.prompts)
                .any(|(p, q)| p.tokens[..p.n_prompt_tokens] != q.tokens[..q.n_prompt_tokens])
        {
            Some("the runs do not hold the same prompts with identical tokens".to_string())
        } else {
            None
        };
        if let Some(w) = why {
            return Some(format!(
                "{} and {}: {w}",
                a.model.file_name, b.model.file_name
            ));
        }
    }
    None
}

/// Bits per weight: the reference is the highest-precision run.
fn bits_per_weight(v: &RunView) -> f64 {
    let m = &v.run.manifest.model;
    m.size_bytes as f64 * 8.0 / m.n_params.max(1) as f64
}

pub fn level_label(v: &RunView) -> String {
    let m = &v.run.manifest.model;
    format!("{} [{}]", m.file_type, m.tensor_mix())
}

/// Compute the ladder. `reference` is an index into `views` (default: highest bits per weight).
pub fn ladder(views: &[RunView], reference: Option<usize>) -> anyhow::Result<Ladder> {
    let r = reference.unwrap_or_else(|| {
        (0..views.len())
            .max_by(|&a, &b| bits_per_weight(&views[a]).total_cmp(&bits_per_weight(&views[b])))
            .unwrap_or(0)
    });
    let rv = &views[r];
    let ref_logits = rv.run.logit_rows()?;
    let mut levels = Vec::new();
    for (i, v) in views.iter().enumerate() {
        let mut acc = DriftAccumulator::new(v.points.len());
        let per_prompt = rv
            .run
            .manifest
            .prompts
            .iter()
            .all(|p| p.states_file.is_some())
            && v.run
                .manifest
                .prompts
                .iter()
                .all(|p| p.states_file.is_some());
        if per_prompt {
            for (p, rec) in rv.run.manifest.prompts.iter().enumerate() {
                // One position in memory at a time (long prompts can exceed memory).
                let a = rv.run.prompt_states(p)?;
                let b = v.run.prompt_states(p)?;
                // Prompt positions only (generated tokens differ between levels), and only those
                // both runs stored (they may have been traced with different --positions): the
                // same token position in both, matched by position, not by column.
                let other = &v.run.manifest.prompts[p].positions;
                for (ja, &pos) in rec.positions.iter().enumerate() {
                    if pos >= rec.n_prompt_tokens {
                        break;
                    }
                    if let Ok(jb) = other.binary_search(&pos) {
                        acc.add_position(a.position(ja)?.view(), b.position(jb)?.view());
                    }
                }
            }
        } else {
            // Last prompt position only, from last.npy.
            for p in 0..rv.n_prompts() {
                let (a, b) = (rv.trajectory(p)?, v.trajectory(p)?);
                acc.add(
                    a.view().insert_axis(ndarray::Axis(1)),
                    b.view().insert_axis(ndarray::Axis(1)),
                    1,
                );
            }
        }
        let logits = v.run.logit_rows()?;
        let mut output = OutputDrift::default();
        for p in 0..rv.n_prompts() {
            output.push(&ref_logits.prompt(p)?, &logits.prompt(p)?);
        }
        levels.push(Level {
            run: i,
            label: level_label(v),
            drift: acc.finish(),
            output,
        });
    }
    Ok(Ladder {
        reference: r,
        levels,
    })
}

fn table(views: &[RunView], l: &Ladder) -> String {
    let mut rows = String::from(
        "<table><tr><th>level</th><th>real tensor mix</th><th>last-point cos (mean / min)</th><th>last-point rel. error</th>\
         <th>first point over 5%</th><th>KL mean</th><th>KL p99</th><th>top-1 agreement</th><th>Δp(ref top)</th></tr>",
    );
    for lv in &l.levels {
        let v = &views[lv.run];
        let last = lv.drift.last().copied().unwrap_or(PointDrift {
            mean_cos: f64::NAN,
            min_cos: f64::NAN,
            mean_rel_err: f64::NAN,
            n: 0,
        });
        let over = drift::first_over(&lv.drift, &v.points, THRESHOLD)
            .map(|p| p.to_string())
            .unwrap_or_else(|| "never".into());
        let agree = lv.output.top1_agree.iter().filter(|&&a| a).count() as f64
            / lv.output.top1_agree.len().max(1) as f64;
        rows.push_str(&format!(
            "<tr><td>{}{}</td><td>{}</td><td>{:.5} / {:.5}</td><td>{:.4}</td><td>{}</td><td>{:.5}</td><td>{:.5}</td><td>{:.1}%</td><td>{:+.4}</td></tr>",
            html_escape(&v.run.manifest.model.file_type),
            if lv.run == l.reference { " (reference)" } else { "" },
            html_escape(&v.run.manifest.model.tensor_mix()),
            last.mean_cos,
            last.min_cos,
            last.mean_rel_err,
            over,
            drift::mean(&lv.output.kl),
            drift::quantile(&lv.output.kl, 0.99),
            100.0 * agree,
            drift::mean(&lv.output.dp),
        ));
    }
    rows.push_str("</table>");
    rows
}

pub fn section(views: &[RunView], l: &Ladder) -> anyhow::Result<Section> {
    let rv = &views[l.reference];
    let x = rv.points.clone();
    let mut err = Plot::new();
    let mut cos = Plot::new();
    for (n, lv) in l
        .levels
        .iter()
        .enumerate()
        .filter(|(_, lv)| lv.run != l.reference)
    {
        err.add_trace(
            Scatter::new(x.clone(), lv.drift.iter().map(|d| d.mean_rel_err).collect())
                .mode(Mode::LinesMarkers)
                .line(super::line(n).width(3.0))
                .name(&lv.label),
        );
        cos.add_trace(
            Scatter::new(x.clone(), lv.drift.iter().map(|d| d.mean_cos).collect())
                .mode(Mode::LinesMarkers)
                .line(super::line(n).width(3.0))
                .name(format!("{} mean", lv.label)),
        );
        cos.add_trace(
            Scatter::new(x.clone(), lv.drift.iter().map(|d| d.min_cos).collect())
                .mode(Mode::Lines)
                .line(super::line(n).width(1.5).dash(DashType::Dot))
                .name(format!("{} min", lv.label)),
        );
    }
    err.add_trace(
        Scatter::new(vec![x[0], *x.last().unwrap()], vec![THRESHOLD, THRESHOLD])
            .mode(Mode::Lines)
            .line(Line::new().color("#999").dash(DashType::Dash))
            .name("5% threshold"),
    );
    err.set_layout(
        Layout::new()
            .height(460)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text("relative L2 error vs reference"))),
    );
    cos.set_layout(
        Layout::new()
            .height(460)
            .x_axis(Axis::new().title(Title::with_text("point")))
            .y_axis(Axis::new().title(Title::with_text("cosine similarity to reference"))),
    );

    let names: Vec<String> = l
        .levels
        .iter()
        .map(|lv| views[lv.run].run.manifest.model.file_type.clone())
        .collect();
    let mut kl = Plot::new();
    kl.add_trace(
        Bar::new(
            names.clone(),
            l.levels
                .iter()
                .map(|lv| drift::mean(&lv.output.kl))
                .collect(),
        )
        .name("mean KL"),
    );
    kl.add_trace(
        Bar::new(
            names,
            l.levels
                .iter()
                .map(|lv| drift::quantile(&lv.output.kl, 0.99))
                .collect(),
        )
        .name("99th percentile KL"),
    );
    kl.set_layout(
        Layout::new()
            .height(400)
            .y_axis(Axis::new().title(Title::with_text("KL(reference ‖ level), nats"))),
    );

    // Every level's trajectories in the reference's PCA basis: colour = prompt, dash = level.
    let dashes = [
        DashType::Solid,
        DashType::Dash,
        DashType::Dot,
        DashType::DashDot,
        DashType::LongDash,
        DashType::LongDashDot,
    ];
    let mut overlay = Plot::new();
    for p in 0..rv.n_prompts().min(MAX_OVERLAY) {
        for (n, lv) in l.levels.iter().enumerate() {
            let v = &views[lv.run];
            let proj = rv.pca.transform(v.trajectory(p)?.view());
            overlay.add_trace(
                Scatter::new(
                    proj.column(0).to_vec(),
                    proj.column(1.min(proj.ncols() - 1)).to_vec(),
                )
                .mode(Mode::LinesMarkers)
                .line(
                    Line::new()
                        .color(color(p))
                        .dash(dashes[n % dashes.len()].clone())
                        .width(if lv.run == l.reference { 3.0 } else { 1.5 }),
                )
                .marker(Marker::new().size(4))
                .name(format!(
                    "{} · {}",
                    v.run.manifest.prompts[p].id, v.run.manifest.model.file_type
                )),
            );
        }
    }
    overlay.set_layout(
        Layout::new()
            .height(560)
            .x_axis(Axis::new().title(Title::with_text("reference PC1")))
            .y_axis(super::equal_scale(
                Axis::new().title(Title::with_text("reference PC2")),
            )),
    );

    let positions = if l
        .levels
        .first()
        .map(|lv| lv.drift.first().map(|d| d.n).unwrap_or(0))
        .unwrap_or(0)
        > rv.n_prompts()
    {
        "every prompt position"
    } else {
        "the last prompt position"
    };
    Ok(Section {
        tabs: Vec::new(),
        title: "Quantization drift".into(),
        note: format!(
            "Reference: <b>{}</b> (the highest precision unless --reference says otherwise). Compared on identical tokens, over {positions} of {} prompts (generated tokens differ between levels and are left out).{}",
            html_escape(&level_label(rv)),
            rv.n_prompts(),
            table(views, l)
        ),
        figures: vec![
            Figure {
                title: "Error vs depth".into(),
                caption: "Mean relative L2 error ‖h − h_ref‖ / ‖h_ref‖ per point, one line per quantization level. Where a line leaves the floor is where that level starts to leave the reference's path; the dashed line is the 5% threshold of the table.".into(),
                plot: err,
            },
            Figure {
                title: "Cosine similarity vs depth".into(),
                caption: "Mean (solid) and minimum (dotted) cosine between each level's state and the reference's, per point: direction kept even where the size drifts.".into(),
                plot: cos,
            },
            Figure {
                title: "Next-token KL divergence".into(),
                caption: "KL(P_ref ‖ P_level) of the next-token distributions at the last prompt position, mean and 99th percentile over prompts — the numbers llama.cpp's perplexity tool prints in KL mode, here next to the inner drift.".into(),
                plot: kl,
            },
            Figure {
                title: "Trajectories of every level in the reference basis".into(),
                caption: format!(
                    "The same prompts (one colour each) through every level (one dash style each; the reference is the thick line), projected on the reference run's principal components.{}",
                    if rv.n_prompts() > MAX_OVERLAY {
                        format!(
                            " Only the first {MAX_OVERLAY} of the {} prompts are drawn (more would be unreadable); the drift table and the CSVs cover all of them.",
                            rv.n_prompts()
                        )
                    } else {
                        String::new()
                    }
                ),
                plot: overlay,
            },
        ],
    })
}
