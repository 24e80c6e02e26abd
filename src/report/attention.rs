//! The attention viewer (`--taps pattern`): one prompt's attention, token by token, for any block
//! and head (a slider), and per-head summaries over every prompt so that known head types show
//! up by name. Patterns are read one prompt at a time; only what is drawn is kept.

use ndarray::Ix4;
use plotly::common::{ColorScale, ColorScalePalette, Title};
use plotly::layout::{Axis, Slider, SliderMethod, SliderStep};
use plotly::{HeatMap, Layout, Plot};
use serde_json::json;

use super::trajectories::html_escape;
use super::view::RunView;
use super::{Figure, Section};
use crate::analysis::attention::{self, HeadStats};
use crate::capture::taps::Tap;

/// Prompts drawn token by token.
const VIEW_PROMPTS: usize = 3;
/// Tokens (keys, and queries among them) drawn per prompt: a head's map is VIEW_TOKENS² cells and
/// the page carries one per head.
const VIEW_TOKENS: usize = 40;

/// Values drawn with 4 decimals (the page carries every head's map).
fn round4(x: f32) -> f64 {
    (x as f64 * 1e4).round() / 1e4
}

pub fn section(v: &RunView) -> anyhow::Result<Option<Section>> {
    let m = &v.run.manifest;
    let Some(rec) = m.capture.taps.iter().find(|t| t.tap == Tap::Pattern) else {
        return Ok(None);
    };
    let prompts = &m.prompts;
    let blocks = rec.blocks.clone();
    let n_head = rec.heads.unwrap_or(rec.width);
    let head_ids: Vec<usize> = if rec.head_ids.is_empty() {
        (0..n_head).collect()
    } else {
        rec.head_ids.clone()
    };
    let name = |bi: usize, hi: usize| format!("L{}.H{}", blocks[bi], head_ids[hi]);
    // Per (block, head): each prompt's statistic, for the means over prompts.
    let cells = blocks.len() * n_head;
    let mut per = [
        vec![Vec::new(); cells],
        vec![Vec::new(); cells],
        vec![Vec::new(); cells],
        vec![Vec::new(); cells],
    ];
    let mut figures = Vec::new();
    let mut viewed = 0;
    for (i, p) in prompts.iter().enumerate() {
        if !p.tap_files.contains_key(Tap::Pattern.name()) {
            continue;
        }
        let pattern = v
            .run
            .tap(Tap::Pattern, i)?
            .into_dimensionality::<Ix4>()
            .map_err(|e| anyhow::anyhow!("{}: pattern of prompt {}: {e}", v.name, p.id))?;
        let shape = pattern.shape();
        if shape[0] != blocks.len() || shape[1] != n_head || head_ids.len() != n_head {
            anyhow::bail!(
                "{}: the pattern of prompt {} is {:?}, run.json says {} block(s) of {n_head} head(s) ({} head number(s))",
                v.name,
                p.id,
                shape,
                blocks.len(),
                head_ids.len()
            );
        }
        let stats: HeadStats = attention::head_stats(pattern.view(), &p.positions, &p.tokens);
        for bi in 0..blocks.len() {
            for hi in 0..n_head {
                let c = bi * n_head + hi;
                per[0][c].push(stats.entropy[bi][hi]);
                per[1][c].push(stats.first[bi][hi]);
                per[2][c].push(stats.previous[bi][hi]);
                if let Some(ind) = &stats.induction {
                    per[3][c].push(ind[bi][hi]);
                }
            }
        }
        if viewed < VIEW_PROMPTS && p.positions.len() > 1 {
            figures.push(viewer(v, i, &pattern, &blocks, &head_ids));
            viewed += 1;
        }
    }
    let n = per[0].first().map_or(0, Vec::len);
    if n == 0 {
        return Ok(None);
    }
    let mean = |xs: &[f64]| {
        let f: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        (!f.is_empty()).then(|| f.iter().sum::<f64>() / f.len() as f64)
    };
    let means: Vec<Vec<Option<f64>>> = per
        .iter()
        .map(|s| s.iter().map(|c| mean(c.as_slice())).collect())
        .collect();
    // Named heads: mean over prompts past the mark.
    let named = |k: usize, mark: f64| -> Vec<String> {
        let mut v: Vec<(usize, f64)> = means[k]
            .iter()
            .enumerate()
            .filter_map(|(c, m)| m.filter(|&m| m >= mark).map(|m| (c, m)))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.iter()
            .take(8)
            .map(|&(c, m)| format!("{} ({m:.2})", name(c / n_head, c % n_head)))
            .collect()
    };
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let n_induction = per[3].first().map_or(0, Vec::len);
    let induction_names = if n_induction > 0 {
        list(named(3, attention::INDUCTION_MARK))
    } else {
        "not measured (no prompt repeats a token; a prompt that repeats a sequence, e.g. prompts/induction.txt, shows them)".into()
    };
    let heads_note = format!(
        "Heads by name (mean over {n} prompt(s) past the mark): previous-token heads (≥ {}): {}; first-token (sink) heads (≥ {}): {}; induction heads (≥ {}, over the {n_induction} prompt(s) that repeat a token): {induction_names}.",
        attention::PREVIOUS_TOKEN_MARK,
        list(named(2, attention::PREVIOUS_TOKEN_MARK)),
        attention::FIRST_TOKEN_MARK,
        list(named(1, attention::FIRST_TOKEN_MARK)),
        attention::INDUCTION_MARK,
    );
    let stats: [(&str, &str, usize); 4] = [
        ("Entropy", "nats: 0 = all attention on one token", 0),
        (
            "Attention to the first token",
            "share of attention (an attention sink when most of it)",
            1,
        ),
        ("Attention to the previous token", "share of attention", 2),
        (
            "Induction score",
            "share of attention to the token after the query token's previous occurrence",
            3,
        ),
    ];
    let ys: Vec<String> = blocks.iter().map(|b| format!("block {b}")).collect();
    let xs: Vec<String> = head_ids.iter().map(|h| format!("H{h}")).collect();
    for (title, unit, k) in stats {
        if k == 3 && n_induction == 0 {
            continue;
        }
        let z: Vec<Vec<Option<f64>>> = (0..blocks.len())
            .map(|bi| (0..n_head).map(|hi| means[k][bi * n_head + hi]).collect())
            .collect();
        let hm = HeatMap::new(xs.clone(), ys.clone(), z)
            .color_scale(ColorScale::Palette(ColorScalePalette::Viridis))
            .color_bar(
                plotly::common::ColorBar::new().title(Title::with_text(if k == 0 {
                    "nats"
                } else {
                    "share"
                })),
            )
            .hover_template(format!(
                "%{{y}}, %{{x}}: %{{z:.3f}} (mean over {} prompt(s))<extra></extra>",
                if k == 3 { n_induction } else { n }
            ))
            .name(title);
        let mut plot = Plot::new();
        plot.add_trace(hm);
        plot.set_layout(
            Layout::new()
                .height((160 + 18 * blocks.len()).clamp(320, 1200))
                .x_axis(Axis::new().title(Title::with_text("head")))
                .y_axis(Axis::new().title(Title::with_text("block"))),
        );
        figures.push(Figure {
            title: format!("{title} per head"),
            caption: format!(
                "How to read: one cell per block and head, the mean over {} prompt(s) of the head's mean over query positions ({unit}). {}",
                if k == 3 { n_induction } else { n },
                if k == 0 { heads_note.clone() } else { String::new() }
            ),
            plot,
        });
    }
    Ok(Some(Section {
        tabs: Vec::new(),
        title: "Attention".into(),
        note: format!(
            "The attention pattern llama.cpp computed (the softmax of every head, captured with --taps pattern){}. First, prompts token by token: pick a head with the slider. Then each head summarised over the {n} prompt(s), so that heads of known kinds show up by name. {heads_note}",
            if rec.attention_sinks {
                "; this model's softmax has attention sinks, so a row sums to less than 1"
            } else {
                ""
            }
        ),
        figures,
    }))
}

/// One prompt's attention as a heat map (queries × keys, the first VIEW_TOKENS tokens), every
/// head on a slider.
fn viewer(
    v: &RunView,
    i: usize,
    pattern: &ndarray::Array4<f32>,
    blocks: &[usize],
    head_ids: &[usize],
) -> Figure {
    let p = &v.run.manifest.prompts[i];
    let n_tok = p.tokens.len().min(VIEW_TOKENS);
    let label = |t: usize| {
        format!(
            "{t}: {}",
            html_escape(&crate::answer::visible(&p.pieces[t]))
        )
    };
    let keys: Vec<String> = (0..n_tok).map(label).collect();
    // Stored query positions inside the window, with their row in the pattern.
    let queries: Vec<(usize, usize)> = p
        .positions
        .iter()
        .enumerate()
        .filter(|&(_, &q)| q < n_tok)
        .map(|(qi, &q)| (qi, q))
        .collect();
    let qlabels: Vec<String> = queries.iter().map(|&(_, q)| label(q)).collect();
    // Masked cells (keys after the query) are left empty, not drawn as 0.
    let cells_of = |bi: usize, hi: usize| -> Vec<Vec<Option<f64>>> {
        queries
            .iter()
            .map(|&(qi, q)| {
                (0..n_tok)
                    .map(|k| (k <= q).then(|| round4(pattern[[bi, hi, qi, k]])))
                    .collect()
            })
            .collect()
    };
    let n_head = head_ids.len();
    let hm = HeatMap::new(keys.clone(), qlabels.clone(), cells_of(0, 0))
        .color_scale(ColorScale::Palette(ColorScalePalette::Viridis))
        .zmin(0.0)
        .zmax(1.0)
        .color_bar(plotly::common::ColorBar::new().title(Title::with_text("attention")))
        .hover_template("query %{y} → key %{x}: %{z:.4f}<extra></extra>")
        .name("attention");
    let mut plot = Plot::new();
    plot.add_trace(hm);
    let steps: Vec<SliderStep> = (0..blocks.len())
        .flat_map(|bi| (0..n_head).map(move |hi| (bi, hi)))
        .map(|(bi, hi)| {
            SliderStep::new()
                .method(SliderMethod::Restyle)
                .label(format!("L{}.H{}", blocks[bi], head_ids[hi]))
                .args(json!([{ "z": [cells_of(bi, hi)] }]))
        })
        .collect();
    let longest = keys.iter().map(|k| k.chars().count()).max().unwrap_or(4);
    plot.set_layout(
        Layout::new()
            .height((260 + 16 * queries.len()).clamp(420, 1000))
            .x_axis(
                Axis::new()
                    .title(Title::with_text("key (attended to)"))
                    .tick_angle(-60.0),
            )
            .y_axis(
                Axis::new()
                    .title(Title::with_text("query"))
                    .auto_margin(true),
            )
            .margin(
                plotly::layout::Margin::new()
                    .bottom((120 + 6 * longest).min(320))
                    .left((40 + 7 * longest).min(300)),
            )
            .sliders(vec![Slider::new()
                .active(0)
                .steps(steps)
                .pad(plotly::common::Pad::new((80 + 6 * longest).min(280), 0, 0))
                .current_value(
                    plotly::layout::SliderCurrentValue::new().prefix("head "),
                )]),
    );
    let cut = if p.tokens.len() > n_tok {
        format!(" Its first {n_tok} of {} tokens are drawn.", p.tokens.len())
    } else {
        String::new()
    };
    Figure {
        title: format!("Attention of {}", html_escape(&p.id)),
        caption: format!(
            "How to read: row = the token attending (query), column = the token attended to (key), colour = the share of the head's attention; a row sums to 1 over the keys up to the query (later keys are masked, left blank). The slider picks the block and head (L block . H head); hover for values.{cut}"
        ),
        plot,
    }
}
