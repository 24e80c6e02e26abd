//! Expert usage of a mixture-of-experts model (`--taps router`): how often the router chose each
//! expert at each block, over every stored token, and by label. Read one prompt at a time.

use std::collections::BTreeMap;

use plotly::common::{ColorScale, ColorScalePalette, Title};
use plotly::layout::Axis;
use plotly::{HeatMap, Layout, Plot};

use super::trajectories::html_escape;
use super::view::RunView;
use super::{Figure, Section};
use crate::capture::taps::Tap;

/// Labels drawn one figure each.
const MAX_LABELS: usize = 4;

/// Chosen-expert counts `[block][expert]` and the token slots counted (tokens × experts used).
#[derive(Debug, Clone, Default)]
struct Usage {
    counts: Vec<Vec<u64>>,
    tokens: u64,
}

impl Usage {
    fn new(n_block: usize, n_expert: usize) -> Usage {
        Usage {
            counts: vec![vec![0; n_expert]; n_block],
            tokens: 0,
        }
    }

    /// Share of the block's choices per expert (`None` where nothing was counted).
    fn shares(&self) -> Vec<Vec<Option<f64>>> {
        self.counts
            .iter()
            .map(|row| {
                let total: u64 = row.iter().sum();
                row.iter()
                    .map(|&c| (total > 0).then(|| c as f64 / total as f64))
                    .collect()
            })
            .collect()
    }
}

pub fn section(v: &RunView) -> anyhow::Result<Option<Section>> {
    let m = &v.run.manifest;
    let Some(rec) = m.capture.taps.iter().find(|t| t.tap == Tap::RouterExperts) else {
        return Ok(None);
    };
    let blocks = rec.blocks.clone();
    let k = rec.width;
    // The number of experts: the router's logits are one per expert; without them, the largest
    // expert number chosen + 1 (said on the page).
    let logits_width = m
        .capture
        .taps
        .iter()
        .find(|t| t.tap == Tap::RouterLogits)
        .map(|t| t.width);
    // One pass to read the choices (a prompt at a time), counting as we go; experts beyond the
    // count known so far grow the tables.
    let mut n_expert = logits_width.unwrap_or(0);
    let mut all = Usage::new(blocks.len(), n_expert);
    let mut by_label: BTreeMap<String, Usage> = BTreeMap::new();
    let mut bad = 0u64;
    for (i, p) in m.prompts.iter().enumerate() {
        if !p.tap_files.contains_key(Tap::RouterExperts.name()) {
            continue;
        }
        let ids = v.run.tap(Tap::RouterExperts, i)?;
        let label = p.label.clone();
        let shape = ids.shape().to_vec();
        let (n_b, n_pos) = (shape[0], shape.get(1).copied().unwrap_or(0));
        let flat = ids
            .as_slice()
            .map(<[f32]>::to_vec)
            .unwrap_or_else(|| ids.iter().copied().collect());
        for b in 0..n_b.min(blocks.len()) {
            for t in 0..n_pos {
                for j in 0..k {
                    let e = flat[(b * n_pos + t) * k + j];
                    if !(e >= 0.0 && e.fract() == 0.0)
                        || (logits_width.is_some() && e as usize >= n_expert)
                    {
                        bad += 1;
                        continue;
                    }
                    let e = e as usize;
                    if e >= n_expert {
                        n_expert = e + 1;
                        for u in std::iter::once(&mut all).chain(by_label.values_mut()) {
                            u.counts.iter_mut().for_each(|r| r.resize(n_expert, 0));
                        }
                    }
                    all.counts[b][e] += 1;
                    if let Some(l) = &label {
                        by_label
                            .entry(l.clone())
                            .or_insert_with(|| Usage::new(blocks.len(), n_expert))
                            .counts[b][e] += 1;
                    }
                }
            }
        }
        all.tokens += n_pos as u64;
        if let Some(l) = &label {
            if let Some(u) = by_label.get_mut(l) {
                u.tokens += n_pos as u64;
            }
        }
    }
    if all.tokens == 0 || n_expert == 0 {
        return Ok(None);
    }
    let xs: Vec<String> = (0..n_expert).map(|e| format!("E{e}")).collect();
    let ys: Vec<String> = blocks.iter().map(|b| format!("block {b}")).collect();
    let uniform = 1.0 / n_expert as f64;
    let figure = |u: &Usage, title: String, what: &str| -> Figure {
        let shares = u.shares();
        let text: Vec<Vec<String>> = u
            .counts
            .iter()
            .map(|row| {
                row.iter()
                    .map(|c| format!("{c} of {} choices", row.iter().sum::<u64>()))
                    .collect()
            })
            .collect();
        let hm = HeatMap::new(xs.clone(), ys.clone(), shares)
            .color_scale(ColorScale::Palette(ColorScalePalette::Viridis))
            .zmin(0.0)
            .color_bar(plotly::common::ColorBar::new().title(Title::with_text("share")))
            .name(title.clone());
        let mut trace = serde_json::to_value(&hm).expect("serialisable");
        trace["text"] = serde_json::json!(text);
        trace["hovertemplate"] = serde_json::json!("%{y}, %{x}: %{z:.3f} (%{text})<extra></extra>");
        let mut plot = Plot::new();
        plot.add_trace(Box::new(super::lens::RawTrace(trace)));
        plot.set_layout(
            Layout::new()
                .height((160 + 18 * blocks.len()).clamp(320, 1200))
                .x_axis(Axis::new().title(Title::with_text("expert")))
                .y_axis(Axis::new().title(Title::with_text("block"))),
        );
        Figure {
            title,
            caption: format!(
                "How to read: one row per block, one cell per expert: the share of the router's choices at that block that went to the expert, over {what} ({} token(s), {k} expert(s) chosen per token). An even router gives every expert {uniform:.3}; a bright column is an expert many tokens share, a dark one an expert rarely used.",
                u.tokens
            ),
            plot,
        }
    };
    let mut figures = vec![figure(
        &all,
        "Expert usage".into(),
        "every stored token of every prompt",
    )];
    let labels: Vec<&String> = by_label.keys().collect();
    if labels.len() > 1 {
        for l in labels.iter().take(MAX_LABELS) {
            figures.push(figure(
                &by_label[*l],
                format!("Expert usage: {}", html_escape(l)),
                &format!("the tokens of the prompts labelled {}", html_escape(l)),
            ));
        }
    }
    // The block whose usage is least even: its busiest expert's share against uniform.
    let shares = all.shares();
    let (busiest_block, busiest) = shares
        .iter()
        .enumerate()
        .map(|(b, row)| (b, row.iter().flatten().fold(0f64, |a, &x| a.max(x))))
        .fold((0, 0f64), |a, x| if x.1 > a.1 { x } else { a });
    let more = if labels.len() > MAX_LABELS {
        format!(
            " The first {MAX_LABELS} of {} labels are drawn.",
            labels.len()
        )
    } else {
        String::new()
    };
    let invalid = if bad > 0 {
        format!(" {bad} recorded choice(s) are not expert numbers of this model and are left out.")
    } else {
        String::new()
    };
    let counted = match logits_width {
        Some(_) => format!("{n_expert} experts (the router's width)"),
        None => format!("{n_expert} experts (the largest number chosen + 1: without router_logits the model's count is not recorded)"),
    };
    Ok(Some(Section {
        tabs: Vec::new(),
        title: "Experts".into(),
        note: format!(
            "Which experts the router of this mixture-of-experts model chose (the router_experts tap: llama.cpp's own choices, as it ranks them), {counted}. The least even block is block {} (its busiest expert takes {busiest:.2} of the choices; even: {uniform:.3}).{more}{invalid}",
            blocks[busiest_block]
        ),
        figures,
    }))
}
