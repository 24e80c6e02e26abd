//! The HTML report: one self-contained page, plotly.js embedded once, one file per section.
//!
//! `build` turns run views into sections of figures; `page` lays them out with a minijinja
//! template; `csv` writes the numbers beside the report.

pub mod answers;
pub mod contrast;
pub mod csv_out;
pub mod generation;
pub mod groups;
pub mod interventions;
pub mod layers;
pub mod lens;
pub mod page;
pub mod quant;
pub mod steering;
pub mod styles;
pub mod tokens;
pub mod trajectories;
pub mod view;

use plotly::Plot;

use view::RunView;

/// Most trajectories drawn in one figure; beyond that every k-th prompt is drawn (the CSVs keep
/// every prompt) and the caption says so.
pub const MAX_DRAWN: usize = 300;

/// Categorical colours, one per label.
pub const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// One figure of the report.
pub struct Figure {
    pub title: String,
    /// "How to read this": a few sentences under the figure.
    pub caption: String,
    pub plot: Plot,
}

/// A section: a heading, an optional note, figures.
pub struct Section {
    pub title: String,
    pub note: String,
    pub figures: Vec<Figure>,
}

/// Every section of the report for these runs, and the quantization ladder when the runs form
/// one. `reference` indexes the reference run of a ladder (default: the highest precision).
pub fn build(
    views: &[RunView],
    reference: Option<usize>,
    refusal_phrases: &[String],
) -> anyhow::Result<(Vec<Section>, Option<quant::Ladder>)> {
    let mut sections = Vec::new();
    let mut ladder = None;
    sections.extend(interventions::sections(views, refusal_phrases)?);
    if let Some(s) = styles::section(views)? {
        sections.push(s);
    }
    let steer_pairs = steering::steering_pairs(views);
    let sys_pairs = steering::system_pairs(views);
    for &(s, u) in &steer_pairs {
        sections.push(steering::steering_section(views, s, u)?);
    }
    for &(i, j) in &sys_pairs {
        sections.push(steering::system_section(views, i, j)?);
    }
    if views.len() > 1 {
        let why = if views.iter().any(interventions::intervened) {
            Some(
                "some runs are traced with an intervention (steering, ablation or patching)"
                    .to_string(),
            )
        } else {
            quant::incomparable(views)
        };
        match why {
            None => {
                let l = quant::ladder(views, reference)?;
                sections.push(quant::section(views, &l)?);
                ladder = Some(l);
            }
            Some(why) => {
                if reference.is_some() {
                    anyhow::bail!(
                        "--reference: these runs cannot be compared point by point ({why})"
                    );
                }
                let mut s = layers::compare_section(views);
                let same_model = views.iter().all(|v| {
                    v.run.manifest.provenance.model_sha256
                        == views[0].run.manifest.provenance.model_sha256
                });
                // Runs of one model (other prompts, steering, settings) are simply overlaid; the
                // drift section is for one prompt set through several quantizations of a model.
                if !same_model {
                    s.note = format!(
                        "{} No quantization-drift section (that needs one prompt set through several quantizations of one model): {}.",
                        s.note,
                        trajectories::html_escape(&why)
                    );
                }
                sections.push(s);
            }
        }
    }
    for v in views {
        let prefix = if views.len() > 1 {
            format!("{} — ", v.name)
        } else {
            String::new()
        };
        sections.push(trajectories::section(v, &prefix));
        sections.push(layers::section(v, &prefix));
        if let Some(s) = groups::section(v, &prefix) {
            sections.push(s);
        }
        if let Some(s) = contrast::section(v, &prefix) {
            sections.push(s);
        }
        if let Some(s) = lens::section(v, &prefix) {
            sections.push(s);
        }
        if let Some(s) = tokens::section(v, &prefix)? {
            sections.push(s);
        }
        if let Some(s) = generation::section(v, &prefix)? {
            sections.push(s);
        }
    }
    if ladder.is_some() {
        sections.push(layers::compare_section(views));
    }
    // What the model answered comes first: for interventions, the before → after of each; for a
    // quantization ladder, each level against its reference.
    if let Some(s) = answers::section(views, ladder.as_ref().map(|l| l.reference)) {
        sections.insert(0, s);
    }
    Ok((sections, ladder))
}
