//! The HTML report: one self-contained page, plotly.js embedded once, one file per section.
//!
//! `build` turns run views into sections of figures; `page` lays them out with a minijinja
//! template; `csv` writes the numbers beside the report.

pub mod answers;
pub mod attention;
pub mod attribution;
pub mod contrast;
pub mod csv_out;
pub mod experts;
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

/// Line dashes that go with [`color`]: the first ten conditions are solid, the next ten dashed,
/// and so on, so that no two of up to 40 overlaid conditions share a style.
pub fn dash(i: usize) -> plotly::common::DashType {
    use plotly::common::DashType;
    [
        DashType::Solid,
        DashType::Dash,
        DashType::Dot,
        DashType::DashDot,
    ][(i / PALETTE.len()) % 4]
        .clone()
}

/// The line of condition `i` among many overlaid: its colour and its dash ([`color`], [`dash`]).
pub fn line(i: usize) -> plotly::common::Line {
    plotly::common::Line::new().color(color(i)).dash(dash(i))
}

/// The y axis of a 2-D projection, its unit drawn as long as the x axis's: the projection keeps
/// its true shape (PC1 usually spans several times PC2; free scales would draw it as round).
pub fn equal_scale(y: plotly::layout::Axis) -> plotly::layout::Axis {
    y.scale_anchor("x").scale_ratio(1.0)
}

/// The colour range of a heat map, robust to outliers: from the smallest finite value to the
/// 99th percentile when the top 1% would stretch the scale by more than half (outliers), with how
/// many cells lie above it (they take the top colour; hover still shows their value); otherwise
/// the data's full range. `None` when no value is finite.
pub fn robust_range<'a>(values: impl IntoIterator<Item = &'a f64>) -> Option<RobustRange> {
    let mut v: Vec<f64> = values
        .into_iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let (lo, max) = (v[0], v[v.len() - 1]);
    let q = v[((v.len() - 1) as f64 * 0.99).round() as usize];
    let hi = if max - lo > 1.5 * (q - lo) { q } else { max };
    Some(RobustRange {
        lo,
        hi,
        max,
        clipped: v.iter().filter(|&&x| x > hi).count(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustRange {
    pub lo: f64,
    pub hi: f64,
    pub max: f64,
    /// Cells above `hi`.
    pub clipped: usize,
}

impl RobustRange {
    /// The sentence a caption adds: what the colour scale shows.
    pub fn sentence(&self) -> String {
        if self.clipped == 0 {
            format!(
                "Colour scale: the data's full range ({:.3} to {:.3}).",
                self.lo, self.max
            )
        } else {
            format!(
                "Colour scale clipped at the 99th percentile ({:.3}) so that a few outliers do not wash out the rest: {} cell(s) above it, up to {:.3}, take the top colour; hover shows every cell's value.",
                self.hi, self.clipped, self.max
            )
        }
    }
}

/// A log y axis over `values` (finite, > 0 are used) that spans whole decades, from the decade
/// at or below the smallest value to the one at or above the largest, with a tick at every decade
/// labelled 10^k (and at 2× and 5× when it spans fewer than two decades, so that the axis always
/// carries several labels). With no usable value, plotly's own log axis.
pub fn log_axis(title: &str, values: impl IntoIterator<Item = f64>) -> plotly::layout::Axis {
    use plotly::common::TickMode;
    use plotly::common::Title;
    use plotly::layout::{Axis, AxisType};
    let axis = Axis::new()
        .title(Title::with_text(title))
        .type_(AxisType::Log);
    let (lo, hi) = values
        .into_iter()
        .filter(|x| x.is_finite() && *x > 0.0)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
            (l.min(x), h.max(x))
        });
    if !lo.is_finite() {
        return axis;
    }
    let k0 = lo.log10().floor() as i32;
    let k1 = (hi.log10().ceil() as i32).max(k0 + 1);
    let mults: &[f64] = if k1 - k0 < 2 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let mut vals = Vec::new();
    let mut text = Vec::new();
    for k in k0..=k1 {
        for &m in mults.iter().filter(|&&m| k < k1 || m == 1.0) {
            vals.push(m * 10f64.powi(k));
            text.push(if m == 1.0 {
                format!("10<sup>{k}</sup>")
            } else {
                format!("{m}·10<sup>{k}</sup>")
            });
        }
    }
    axis.range(vec![k0 as f64, k1 as f64])
        .tick_mode(TickMode::Array)
        .tick_values(vals)
        .tick_text(text)
}

/// One figure of the report.
pub struct Figure {
    pub title: String,
    /// "How to read this": a few sentences under the figure.
    pub caption: String,
    pub plot: Plot,
}

/// A section: a heading, an optional note, figures — and, for a view repeated for each of
/// several runs, one tab per run instead of one section per run.
pub struct Section {
    pub title: String,
    pub note: String,
    pub figures: Vec<Figure>,
    pub tabs: Vec<Tab>,
}

/// One run's part of a tabbed section: the note and figures that run's own section would have.
pub struct Tab {
    pub run: String,
    pub note: String,
    pub figures: Vec<Figure>,
}

/// Per-run sections (in run order, each `(run, section)`) merged into one section per view: a
/// view that several runs have becomes one section with a tab per run, in the order the views
/// first appear. A view only one run has stays one tab, so the page reads the same everywhere.
fn tabbed(per_run: Vec<(String, Section)>, n_runs: usize) -> Vec<Section> {
    let mut merged: Vec<Section> = Vec::new();
    for (run, s) in per_run {
        let tab = Tab {
            run,
            note: s.note,
            figures: s.figures,
        };
        match merged.iter_mut().find(|m| m.title == s.title) {
            Some(m) => m.tabs.push(tab),
            None => merged.push(Section {
                title: s.title,
                note: String::new(),
                figures: Vec::new(),
                tabs: vec![tab],
            }),
        }
    }
    for m in &mut merged {
        let only = if m.tabs.len() < n_runs {
            format!(" (only {} of the {n_runs} runs have it)", m.tabs.len())
        } else {
            String::new()
        };
        m.note = format!(
            "The same view for each run{only}, one run at a time: pick the run on the tabs above the figures."
        );
    }
    merged
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
    // One run: its sections in order. Several: each view once, with a tab per run.
    let mut per_run: Vec<(String, Section)> = Vec::new();
    for v in views {
        let mut own = vec![trajectories::section(v), layers::section(v)];
        own.extend(groups::section(v));
        own.extend(contrast::section(v));
        own.extend(lens::section(v));
        own.extend(attribution::section(v));
        own.extend(attention::section(v)?);
        own.extend(experts::section(v)?);
        own.extend(tokens::section(v)?);
        own.extend(generation::section(v)?);
        per_run.extend(own.into_iter().map(|s| (v.name.clone(), s)));
    }
    if views.len() == 1 {
        sections.extend(per_run.into_iter().map(|(_, s)| s));
    } else {
        sections.extend(tabbed(per_run, views.len()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn axis_json(a: plotly::layout::Axis) -> serde_json::Value {
        serde_json::to_value(a).unwrap()
    }

    #[test]
    fn a_log_axis_spans_whole_decades_and_labels_each() {
        // 0.03 .. 4.2: from 10^-2 to 10^1, three decades, a tick at each.
        let a = axis_json(log_axis("step", [0.03, 0.5, 4.2, f64::NAN, 0.0, -1.0]));
        assert_eq!(a["type"], "log");
        assert_eq!(a["range"], serde_json::json!([-2.0, 1.0]));
        assert_eq!(a["tickvals"], serde_json::json!([0.01, 0.1, 1.0, 10.0]));
        assert_eq!(a["ticktext"][0], "10<sup>-2</sup>");
        // Within one decade: 2× and 5× join the decades so the axis keeps several labels.
        let a = axis_json(log_axis("step", [0.21, 0.33]));
        assert_eq!(a["range"], serde_json::json!([-1.0, 0.0]));
        assert_eq!(a["tickvals"], serde_json::json!([0.1, 0.2, 0.5, 1.0]));
        assert_eq!(a["ticktext"][2], "5·10<sup>-1</sup>");
        // Nothing usable: plotly's own log axis, no ticks invented.
        let a = axis_json(log_axis("step", [f64::NAN, 0.0]));
        assert!(a.get("tickvals").is_none() && a["type"] == "log");
    }

    #[test]
    fn robust_range_clips_the_top_percent_and_says_so() {
        // 1000 cells in 0..1 and five outliers at 50: the scale stops at the 99th percentile
        // (0.994 of 1005 finite values), above which lie 0.995..0.999 and the outliers.
        let mut z: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        z.extend([50.0; 5]);
        z.push(f64::NAN);
        let r = robust_range(&z).unwrap();
        assert_eq!(r.lo, 0.0);
        assert_eq!((r.hi, r.clipped, r.max), (0.994, 10, 50.0));
        assert!(r.sentence().contains("10 cell(s) above it"));
        // No outlier (the top 1% stretches the scale by little): the full range, nothing clipped.
        let even: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let r = robust_range(&even).unwrap();
        assert_eq!((r.lo, r.hi, r.clipped), (0.0, 999.0, 0));
        assert!(r.sentence().contains("full range"));
        assert!(robust_range(&[f64::NAN]).is_none());
    }

    #[test]
    fn many_conditions_never_share_a_style_and_views_merge_into_tabs() {
        let styles: std::collections::HashSet<String> = (0..40)
            .map(|i| format!("{}{:?}", color(i), dash(i)))
            .collect();
        assert_eq!(styles.len(), 40);
        let sec = |title: &str, note: &str| Section {
            tabs: Vec::new(),
            title: title.into(),
            note: note.into(),
            figures: vec![Figure {
                title: "f".into(),
                caption: "c".into(),
                plot: Plot::new(),
            }],
        };
        let merged = tabbed(
            vec![
                ("a".into(), sec("Trajectories", "a's")),
                ("a".into(), sec("Logit lens", "a lens")),
                ("b".into(), sec("Trajectories", "b's")),
            ],
            2,
        );
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].title, "Trajectories");
        let runs: Vec<&str> = merged[0].tabs.iter().map(|t| t.run.as_str()).collect();
        assert_eq!(runs, ["a", "b"]);
        assert_eq!(merged[0].tabs[1].note, "b's");
        assert!(merged[0].figures.is_empty());
        assert!(merged[1].note.contains("only 1 of the 2 runs"));
        assert_eq!(page::n_figures(&merged), 3);
    }
}
