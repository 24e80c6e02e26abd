//! Interventions: runs traced with `--ablate`, `--patch-from` or `--control-vector` next to the
//! unmodified run of the same model and prompts. Per label: the refusal score of the generations
//! (a keyword judge, `analysis::effects`) and the next-token KL divergence from the unmodified run
//! (the damage); the projection on the direction per point with and without; and, for several
//! control scales of one direction, the dose–response.

use std::collections::BTreeMap;
use std::path::Path;

use plotly::common::{DashType, Line, Mode, Title};
use plotly::layout::Axis;
use plotly::{Bar, Layout, Plot, Scatter};

use super::trajectories::html_escape;
use super::view::RunView;
use super::{color, Figure, Section};
use crate::analysis::drift::OutputDrift;
use crate::analysis::effects;
use crate::cli::format_points;
use crate::run::Run;

/// Whether a run was traced with an intervention.
pub fn intervened(v: &RunView) -> bool {
    let c = &v.run.manifest.capture;
    !c.control_vectors.is_empty()
        || c.ablation.is_some()
        || c.patch.is_some()
        || c.ablated_heads.is_some()
}

fn file_name(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.to_string())
}

/// "ablate refusal.gguf at 2-30", "add refusal.gguf × 0.5 at 25", "patch from clean at 12".
pub fn describe(v: &RunView) -> String {
    let c = &v.run.manifest.capture;
    let mut parts = Vec::new();
    if let Some(a) = &c.ablation {
        let which = a
            .direction_point
            .map(|q| format!(" (point {q}'s direction)"))
            .unwrap_or_default();
        let at = if a.taps.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = a.taps.iter().map(|t| t.name()).collect();
            format!(" from {} of blocks", names.join("+"))
        };
        parts.push(format!(
            "ablate {}{which}{at} at {}",
            file_name(&a.file),
            format_points(&a.points)
        ));
    }
    if !c.control_vectors.is_empty() {
        let files: Vec<String> = c.control_vectors.iter().map(|f| file_name(f)).collect();
        let at = c
            .control_points
            .map(|(a, b)| {
                if a == b {
                    format!("{a}")
                } else {
                    format!("{a}-{b}")
                }
            })
            .unwrap_or_default();
        parts.push(format!(
            "add {} × {} at {at}",
            files.join("+"),
            c.control_scale
        ));
    }
    if let Some(p) = &c.patch {
        let what = if !p.heads.is_empty() {
            let heads: Vec<String> = p.heads.iter().map(|(l, h)| format!("{l}.{h}")).collect();
            format!(" head(s) {}", heads.join(","))
        } else if p.taps.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = p.taps.iter().map(|t| t.name()).collect();
            format!(" {}", names.join("+"))
        };
        parts.push(format!(
            "patch{what} from {} at {} ({})",
            file_name(&p.from),
            format_points(&p.points),
            p.positions
        ));
    }
    if let Some(h) = &c.ablated_heads {
        let heads: Vec<String> = h.heads.iter().map(|(l, h)| format!("{l}.{h}")).collect();
        parts.push(format!(
            "ablate head(s) {}{}",
            heads.join(","),
            h.mean_from
                .as_ref()
                .map(|f| format!(" (mean of {})", file_name(f)))
                .unwrap_or_default()
        ));
    }
    if parts.is_empty() {
        "unmodified".into()
    } else {
        parts.join(", ")
    }
}

fn same_prompts(a: &RunView, b: &RunView) -> bool {
    let (ma, mb) = (&a.run.manifest, &b.run.manifest);
    ma.provenance.model_sha256 == mb.provenance.model_sha256
        && ma.capture.cache_type == mb.capture.cache_type
        && ma.prompts.len() == mb.prompts.len()
        && ma
            .prompts
            .iter()
            .zip(&mb.prompts)
            .all(|(x, y)| x.rendered == y.rendered)
}

/// Per label (in order of appearance): prompt indices.
fn by_label(v: &RunView) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, l) in v.labels.iter().enumerate() {
        match out.iter_mut().find(|(k, _)| k == l) {
            Some((_, ix)) => ix.push(i),
            None => out.push((l.clone(), vec![i])),
        }
    }
    out
}

/// Effects of one run against the unmodified base, per label.
#[derive(Debug, Clone)]
pub struct Effects {
    pub label: String,
    /// Share of generations judged refusals (None without generation).
    pub refusal: Option<f64>,
    /// Share of generations judged broken (degenerate) text (None without generation).
    pub broken: Option<f64>,
    /// Mean KL(base ‖ run) of the next-token distributions, nats.
    pub kl: f64,
    /// One generated text (the label's first prompt).
    pub example: Option<String>,
}

pub fn effects(base: &RunView, run: &RunView, phrases: &[String]) -> anyhow::Result<Vec<Effects>> {
    effects_by_group(&base.run, &run.run, by_label(base), phrases)
}

/// Effects of `run` against the unmodified `base` (the same prompts), for each named group of
/// prompt indices: the judge's shares of the generations and the mean next-token KL.
pub fn effects_by_group(
    base: &Run,
    run: &Run,
    groups: Vec<(String, Vec<usize>)>,
    phrases: &[String],
) -> anyhow::Result<Vec<Effects>> {
    let (lb, lr) = (base.logit_rows()?, run.logit_rows()?);
    let generated = run.manifest.capture.generate > 0;
    groups
        .into_iter()
        .map(|(label, ix)| {
            let mut drift = OutputDrift::default();
            for &i in &ix {
                drift.push(&lb.prompt(i)?, &lr.prompt(i)?);
            }
            let prompts = &run.manifest.prompts;
            let judged = if generated {
                effects::judge_all(
                    ix.iter().map(|&i| prompts[i].generated_text.as_str()),
                    phrases,
                )
            } else {
                None
            };
            Ok(Effects {
                refusal: judged.map(|j| j.refusal),
                broken: judged.map(|j| j.broken),
                kl: drift.kl.iter().sum::<f64>() / drift.kl.len().max(1) as f64,
                example: ix
                    .first()
                    .filter(|_| generated)
                    .map(|&i| prompts[i].generated_text.clone()),
                label,
            })
        })
        .collect()
}

/// Unit direction per stored point of `v` from a control-vector file (`direction.<p-1>` is point
/// p's; with `from`, point `from`'s everywhere), None where the file has none or cannot be read.
fn directions(file: &str, from: Option<usize>, v: &RunView) -> Option<Vec<Option<Vec<f64>>>> {
    let cv = crate::cvec::load(&[(Path::new(file), 1.0)], v.run.manifest.model.n_embd).ok()?;
    Some(
        v.points
            .iter()
            .map(|&p| {
                cv.unit_at(from.unwrap_or(p))
                    .filter(|d| d.iter().any(|&x| x != 0.0))
            })
            .collect(),
    )
}

/// Mean projection per label and stored point on the unit directions.
fn projections(
    v: &RunView,
    dirs: &[Option<Vec<f64>>],
) -> anyhow::Result<Vec<(String, Vec<Option<f64>>)>> {
    let last = v.run.last_states()?;
    let groups = by_label(v);
    let mut sums: Vec<Vec<f64>> = vec![vec![0.0; dirs.len()]; groups.len()];
    for (g, (_, ix)) in groups.iter().enumerate() {
        for &i in ix {
            let h = last.prompt(i)?;
            for (k, d) in dirs.iter().enumerate() {
                if let Some(d) = d {
                    sums[g][k] += h
                        .row(k)
                        .iter()
                        .zip(d)
                        .map(|(&a, b)| a as f64 * b)
                        .sum::<f64>();
                }
            }
        }
    }
    Ok(groups
        .into_iter()
        .zip(sums)
        .map(|((label, ix), s)| {
            let n = ix.len() as f64;
            (
                label,
                dirs.iter()
                    .zip(s)
                    .map(|(d, x)| d.as_ref().map(|_| x / n))
                    .collect(),
            )
        })
        .collect())
}

/// The file whose directions an intervention uses, and the one point whose direction an
/// ablation used everywhere.
fn direction_file(v: &RunView) -> Option<(String, Option<usize>)> {
    let c = &v.run.manifest.capture;
    c.ablation
        .as_ref()
        .map(|a| (a.file.clone(), a.direction_point))
        .or_else(|| c.control_vectors.first().map(|f| (f.clone(), None)))
        .filter(|(f, _)| Path::new(f).is_file())
}

/// Sections: one per unmodified run that has intervened twins among `views`.
pub fn sections(views: &[RunView], phrases: &[String]) -> anyhow::Result<Vec<Section>> {
    let mut out = Vec::new();
    for (b, base) in views.iter().enumerate() {
        if intervened(base) {
            continue;
        }
        let runs: Vec<usize> = (0..views.len())
            .filter(|&i| i != b && intervened(&views[i]) && same_prompts(base, &views[i]))
            .collect();
        if runs.is_empty() {
            continue;
        }
        out.push(section(views, b, &runs, phrases)?);
    }
    Ok(out)
}

fn section(
    views: &[RunView],
    b: usize,
    runs: &[usize],
    phrases: &[String],
) -> anyhow::Result<Section> {
    let base = &views[b];
    let all: Vec<usize> = std::iter::once(b).chain(runs.iter().copied()).collect();
    let fx: Vec<Vec<Effects>> = all
        .iter()
        .map(|&i| effects(base, &views[i], phrases))
        .collect::<anyhow::Result<_>>()?;
    let names: Vec<String> = all.iter().map(|&i| describe(&views[i])).collect();
    let labels: Vec<String> = fx[0].iter().map(|e| e.label.clone()).collect();
    let mut figures = Vec::new();

    // Effects: refusal score and KL per label, one group of bars per run.
    let generated = fx.iter().flatten().any(|e| e.refusal.is_some());
    // Category labels wrapped onto lines: a long description on one line ran past the figure.
    let categories: Vec<String> = names.iter().map(|n| wrap(&html_escape(n), 22)).collect();
    for (what, get, unit) in [
        (
            "Refusal score",
            (|e: &Effects| e.refusal.unwrap_or(f64::NAN)) as fn(&Effects) -> f64,
            "share of generations judged refusals",
        ),
        (
            "Broken text",
            |e: &Effects| e.broken.unwrap_or(f64::NAN),
            "share of generations judged broken (repetition)",
        ),
        (
            "Damage",
            |e: &Effects| e.kl,
            "mean next-token KL(unmodified ‖ run), nats",
        ),
    ] {
        if what != "Damage" && !generated {
            continue;
        }
        let mut plot = Plot::new();
        for (l, label) in labels.iter().enumerate() {
            let ys: Vec<f64> = fx.iter().map(|f| get(&f[l])).collect();
            plot.add_trace(
                Bar::new(categories.clone(), ys)
                    .name(html_escape(label))
                    .marker(plotly::common::Marker::new().color(color(l))),
            );
        }
        plot.set_layout(
            Layout::new()
                .height(420)
                .bar_mode(plotly::layout::BarMode::Group)
                .x_axis(Axis::new().auto_margin(true))
                .y_axis(Axis::new().title(Title::with_text(unit))),
        );
        figures.push(Figure {
            title: format!("{what} per label"),
            caption: if what == "Refusal score" {
                "The share of each label's generations judged refusals: text that is not broken and opens with a refusal phrase (prompts/refusal_phrases.txt, or report --refusal-phrases). The judge reads the opening words only — it counts “I can't …” and misses a refusal phrased otherwise.".into()
            } else if what == "Broken text" {
                "The share of each label's generations that degenerate — one word three times in a row, a doubled function word (“a a”), a loop in which half the word pairs repeat, or no letter or digit at all. Broken text is neither a refusal nor an answer: an intervention that removes refusals by breaking the model shows here, not as compliance.".into()
            } else {
                "How far each intervention moves the next-token distribution at the last prompt position from the unmodified run's, averaged over the label's prompts. An intervention meant for one label should leave the other label's prompts near 0: anything else is collateral damage.".into()
            },
            plot,
        });
    }

    // Projection on the direction per point, with and without.
    let mut missing = String::new();
    if runs.iter().all(|&i| direction_file(&views[i]).is_none()) {
        missing = " (No projection figure: the direction files these runs recorded are not readable from here.)".into();
    }
    if let Some(sel) = runs
        .iter()
        .find_map(|&i| direction_file(&views[i]))
        .and_then(|(file, _)| crate::commands::select::recorded(Path::new(&file)))
    {
        figures.push(selection_figure(&sel));
    }
    if let Some((file, from)) = runs.iter().find_map(|&i| direction_file(&views[i])) {
        if let Some(dirs) = directions(&file, from, base) {
            let mut plot = Plot::new();
            for (n, &i) in all.iter().enumerate() {
                if views[i].points != base.points {
                    continue;
                }
                for (l, (label, proj)) in projections(&views[i], &dirs)?.into_iter().enumerate() {
                    let (xs, ys): (Vec<usize>, Vec<f64>) = base
                        .points
                        .iter()
                        .zip(&proj)
                        .filter_map(|(&p, y)| y.map(|y| (p, y)))
                        .unzip();
                    let line = super::line(l);
                    plot.add_trace(
                        Scatter::new(xs, ys)
                            .mode(Mode::Lines)
                            .name(format!(
                                "{} — {}",
                                html_escape(&label),
                                html_escape(&names[n])
                            ))
                            .line(if n == 0 {
                                line.dash(DashType::Dash)
                            } else {
                                line
                            }),
                    );
                }
            }
            plot.set_layout(
                Layout::new()
                    .height(480)
                    .x_axis(Axis::new().title(Title::with_text("point")))
                    .y_axis(
                        Axis::new()
                            .title(Title::with_text("mean projection on the unit direction")),
                    ),
            );
            figures.push(Figure {
                title: format!(
                    "Projection on {}{} per point",
                    html_escape(&file_name(&file)),
                    from.map(|q| format!(" (point {q}'s direction)")).unwrap_or_default()
                ),
                caption: "Each label's mean state at the last prompt position projected on that point's unit direction; dashed: unmodified, solid: with the intervention. An ablation of the residual stream holds the projection at 0 at the ablated points (one inside blocks, --ablate-taps, removes it only from what those parts write); an addition lifts it from the steered point on.".into(),
                plot,
            });
        }
    }

    // Dose–response: runs steered with the same files at several scales (the base is scale 0).
    type DoseKey = (Vec<String>, Option<(usize, usize)>);
    let mut doses: BTreeMap<DoseKey, Vec<(f64, usize)>> = BTreeMap::new();
    for (n, &i) in all.iter().enumerate().skip(1) {
        let c = &views[i].run.manifest.capture;
        if !c.control_vectors.is_empty()
            && c.ablation.is_none()
            && c.patch.is_none()
            && c.ablated_heads.is_none()
        {
            doses
                .entry((c.control_vectors.clone(), c.control_points))
                .or_default()
                .push((c.control_scale as f64, n));
        }
    }
    for ((files, _), mut pts) in doses.into_iter().filter(|(_, v)| v.len() >= 2) {
        pts.push((0.0, 0));
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut plot = Plot::new();
        for (l, label) in labels.iter().enumerate() {
            let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
            if generated {
                plot.add_trace(
                    Scatter::new(
                        xs.clone(),
                        pts.iter()
                            .map(|p| fx[p.1][l].refusal.unwrap_or(f64::NAN))
                            .collect(),
                    )
                    .mode(Mode::LinesMarkers)
                    .name(format!("{} refusal score", html_escape(label)))
                    .line(super::line(l)),
                );
                plot.add_trace(
                    Scatter::new(
                        xs.clone(),
                        pts.iter()
                            .map(|p| fx[p.1][l].broken.unwrap_or(f64::NAN))
                            .collect(),
                    )
                    .mode(Mode::LinesMarkers)
                    .name(format!("{} broken text", html_escape(label)))
                    .line(super::line(l).dash(DashType::DashDot)),
                );
            }
            plot.add_trace(
                Scatter::new(xs, pts.iter().map(|p| fx[p.1][l].kl).collect())
                    .mode(Mode::LinesMarkers)
                    .name(format!("{} KL (nats)", html_escape(label)))
                    .line(super::line(l).dash(DashType::Dot)),
            );
        }
        plot.set_layout(
            Layout::new()
                .height(440)
                .x_axis(Axis::new().title(Title::with_text("--control-scale")))
                .y_axis(Axis::new().title(Title::with_text("refusal · broken share / KL"))),
        );
        let shown: Vec<String> = files.iter().map(|f| file_name(f)).collect();
        figures.push(Figure {
            title: format!("Dose–response of {}", html_escape(&shown.join("+"))),
            caption: "Refusal score (solid), broken text (dash-dot) and damage (dotted) per label against the control scale; scale 0 is the unmodified run. A useful scale moves the target label's refusal score without breaking the text or lifting the other label's KL.".into(),
            plot,
        });
    }

    // The numbers, and one generation per condition, in the note.
    let mut note = format!(
        "Unmodified: {}. Per run and label: refusal score · broken text (the judge: README, “The refusal judge”) · KL from the unmodified run.{}",
        html_escape(&base.name),
        html_escape(&missing)
    );
    for (n, f) in fx.iter().enumerate() {
        note.push_str(&format!("<br><b>{}</b>: ", html_escape(&names[n])));
        let cells: Vec<String> = f
            .iter()
            .map(|e| {
                let pct = |x: Option<f64>| {
                    x.map(|r| format!("{:.0}%", 100.0 * r))
                        .unwrap_or_else(|| "–".into())
                };
                let r = format!("{} · {}", pct(e.refusal), pct(e.broken));
                let ex = e
                    .example
                    .as_deref()
                    .map(|t| {
                        let t: String = t.chars().take(80).collect();
                        format!(" (“{}”)", html_escape(&t))
                    })
                    .unwrap_or_default();
                format!("{} {r} · {:.3}{ex}", html_escape(&e.label), e.kl)
            })
            .collect();
        note.push_str(&cells.join("; "));
    }
    Ok(Section {
        tabs: Vec::new(),
        title: "Interventions".into(),
        note,
        figures,
    })
}

/// How `direction --select` chose the intervention point: each candidate's scores on the held-out
/// prompts, the bounds, the baseline and the choice.
fn selection_figure(sel: &crate::commands::select::Selection) -> Figure {
    let (a, b) = (&sel.labels.0, &sel.labels.1);
    let xs: Vec<usize> = sel.candidates.iter().map(|c| c.point).collect();
    let mut plot = Plot::new();
    type Get = fn(&crate::commands::select::Score) -> f64;
    for (name, get, k, dash) in [
        (
            format!("{a}: refusal score after ablation"),
            (|s| s.refusal_a) as Get,
            0,
            DashType::Solid,
        ),
        (
            format!("{a}: broken text"),
            |s| s.broken_a,
            0,
            DashType::DashDot,
        ),
        (
            format!("{b}: refusal score"),
            |s| s.refusal_b,
            1,
            DashType::Solid,
        ),
        (
            format!("{b}: next-token KL (nats)"),
            |s| s.kl_b,
            1,
            DashType::Dot,
        ),
    ] {
        plot.add_trace(
            Scatter::new(
                xs.clone(),
                sel.candidates.iter().map(|c| get(&c.score)).collect(),
            )
            .mode(Mode::LinesMarkers)
            .name(html_escape(&name))
            .line(Line::new().color(color(k)).dash(dash)),
        );
    }
    let (lo, hi) = (
        xs.first().copied().unwrap_or(0),
        xs.last().copied().unwrap_or(0),
    );
    plot.add_trace(
        Scatter::new(vec![lo, hi], vec![sel.baseline.refusal_a; 2])
            .mode(Mode::Lines)
            .name(html_escape(&format!("{a}: refusal score without ablation")))
            .line(Line::new().color(color(0)).dash(DashType::Dash).width(1.0)),
    );
    plot.add_trace(
        Scatter::new(vec![lo, hi], vec![sel.max_kl; 2])
            .mode(Mode::Lines)
            .name(format!("KL bound ({} nats)", sel.max_kl))
            .line(Line::new().color("#888888").dash(DashType::Dash).width(1.0)),
    );
    if let Some(p) = sel.chosen {
        let y = sel
            .candidates
            .iter()
            .find(|c| c.point == p)
            .map_or(0.0, |c| c.score.refusal_a);
        plot.add_trace(
            Scatter::new(vec![p], vec![y])
                .mode(Mode::Markers)
                .name(format!("chosen: point {p}"))
                .marker(plotly::common::Marker::new().size(16).color("#d62728")),
        );
    }
    plot.set_layout(
        Layout::new()
            .height(460)
            .x_axis(Axis::new().title(Title::with_text(
                "candidate point (its direction ablated at every point)",
            )))
            .y_axis(Axis::new().title(Title::with_text("share of prompts / KL (nats)"))),
    );
    let chosen = match sel.chosen {
        Some(p) => format!("Chosen: point {p}."),
        None => format!(
            "No point was chosen ({}), so the file records the best-separating point a block reads.",
            html_escape(sel.why_none.as_deref().unwrap_or("no candidate met both bounds"))
        ),
    };
    Figure {
        title: "How the intervention point was chosen".into(),
        caption: format!(
            "`direction --select` ablated each candidate point's direction at every point while the model answered {} held-out prompts ({} {a}, {} {b}; {} generated tokens each, {}). The rule: the lowest {a} refusal score among candidates whose {b} next-token KL is at most {} nats and whose {a} text is at most {:.0}% broken. {chosen} The best-separating point is not the answer: separation often peaks at the last point, which no block reads.",
            sel.n_a + sel.n_b,
            sel.n_a,
            sel.n_b,
            sel.generate,
            sel.held_out,
            sel.max_kl,
            100.0 * sel.max_broken
        ),
        plot,
    }
}

/// `s` broken into lines of about `width` characters at spaces, joined by `<br>` (plotly's line
/// break in labels).
fn wrap(s: &str, width: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    for word in s.split(' ') {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines.join("<br>")
}
