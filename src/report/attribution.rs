//! Direct logit attribution of one run (`trace --attribution`): which blocks' attention and MLP
//! wrote each prompt's answer, averaged over prompts with 95% intervals, per prompt, and built up
//! through depth by label.

use plotly::common::{ColorScale, ColorScalePalette, DashType, Fill, HoverInfo, Line, Mode, Title};
use plotly::layout::Axis;
use plotly::{HeatMap, Layout, Plot, Scatter};

use super::lens::RawTrace;
use super::trajectories::html_escape;
use super::view::{thin, RunView};
use super::{color, Figure, Section, MAX_DRAWN};
use crate::analysis::attribution::PromptAttribution;
use crate::analysis::bootstrap::{self, Interval};

/// Below this many prompts a mean share is indicative only.
const FEW: usize = 10;

/// Mean and 95% bootstrap interval of each column of `rows` (prompts × values).
fn intervals(rows: &[Vec<f64>], seed: u64) -> Vec<Interval> {
    let width = rows.first().map_or(0, Vec::len);
    (0..width)
        .map(|k| {
            let col: Vec<f64> = rows.iter().map(|r| r[k]).collect();
            bootstrap::mean_interval(&col, seed + k as u64).expect("at least one prompt")
        })
        .collect()
}

/// A mean line with its shaded 95% interval.
fn band(plot: &mut Plot, x: &[f64], iv: &[Interval], c: usize, name: &str, unit: &str) {
    let rgba = {
        let h = color(c).trim_start_matches('#');
        let v = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).unwrap_or(0);
        format!("rgba({},{},{},0.18)", v(0), v(2), v(4))
    };
    plot.add_trace(
        Scatter::new(x.to_vec(), iv.iter().map(|i| i.lo).collect())
            .mode(Mode::Lines)
            .line(Line::new().color(color(c)).width(0.0))
            .show_legend(false)
            .hover_info(HoverInfo::Skip)
            .name(format!("{name}, 95% interval (low)")),
    );
    plot.add_trace(
        Scatter::new(x.to_vec(), iv.iter().map(|i| i.hi).collect())
            .mode(Mode::Lines)
            .line(Line::new().color(color(c)).width(0.0))
            .fill(Fill::ToNextY)
            .fill_color(rgba)
            .hover_info(HoverInfo::Skip)
            .show_legend(false)
            .name(format!("{name}, 95% interval")),
    );
    let text: Vec<String> = iv
        .iter()
        .map(|i| format!("{:+.3} [{:+.3}, {:+.3}], n = {}", i.mean, i.lo, i.hi, i.n))
        .collect();
    plot.add_trace(
        Scatter::new(x.to_vec(), iv.iter().map(|i| i.mean).collect())
            .mode(Mode::LinesMarkers)
            .line(Line::new().color(color(c)).width(3.0))
            .text_array(text)
            .hover_template(format!("{name}, %{{x}}: %{{text}} {unit}<extra></extra>"))
            .name(name),
    );
}

/// A horizontal legend under the plot (anchored by its top, so that more rows grow downwards into
/// the bottom margin, never up into the data).
fn below_legend() -> plotly::layout::Legend {
    plotly::layout::Legend::new()
        .orientation(plotly::common::Orientation::Horizontal)
        .x(0.0)
        .y(-0.3)
        .y_anchor(plotly::common::Anchor::Top)
}

/// What the logit is of, in words: "the logit of the model's own answer" or "logit(" Paris") −
/// logit(" London")" when every prompt shares its target and foil.
fn what(a: &[&PromptAttribution]) -> String {
    let same = |f: &dyn Fn(&PromptAttribution) -> Option<i32>| {
        a.iter().all(|x| f(x) == f(a[0])).then(|| f(a[0])).flatten()
    };
    let piece = |s: &str| html_escape(&format!("{:?}", crate::answer::visible(s)));
    match (same(&|x| Some(x.target)), same(&|x| x.foil)) {
        (Some(_), Some(_)) => format!(
            "logit({}) − logit({})",
            piece(&a[0].target_piece),
            piece(a[0].foil_piece.as_deref().unwrap_or(""))
        ),
        (Some(_), None) if a.iter().all(|x| x.foil.is_none()) => {
            format!("the logit of {}", piece(&a[0].target_piece))
        }
        _ if a.iter().any(|x| x.foil.is_some()) => {
            "each prompt's target − foil logit difference".into()
        }
        _ => "the logit of each prompt's answer (its own top-1 next token, or its target)".into(),
    }
}

pub fn section(v: &RunView) -> Option<Section> {
    let info = v.run.manifest.attribution.as_ref()?;
    let title = "Attribution".to_string();
    if !info.valid {
        return Some(Section {
            tabs: Vec::new(),
            title,
            note: format!(
                "Not shown: the shares do not add up to this model's own logits (largest residual {:.1e} of the shares' spread, tolerance {:.0e}; the captured components rebuild the residual stream to {:.1e}, tolerance {:.0e}), so a split of them would not be the model's.",
                info.max_relative_residual,
                info.residual_tolerance,
                info.max_unexplained,
                info.unexplained_tolerance
            ),
            figures: vec![],
        });
    }
    let prompts = &v.run.manifest.prompts;
    // The attributed prompts' records, and their attributions in the same order.
    let recs: Vec<&crate::run::PromptRecord> =
        prompts.iter().filter(|p| p.attribution.is_some()).collect();
    let all: Vec<&PromptAttribution> = recs.iter().filter_map(|p| p.attribution.as_ref()).collect();
    if all.is_empty() {
        return None;
    }
    let n = all.len();
    let n_block = all[0].attn.len();
    let blocks: Vec<f64> = (0..n_block).map(|b| b as f64).collect();
    let of = what(&all);
    let few = if n < FEW {
        format!(" With {n} prompt(s) these means are indicative only.")
    } else {
        String::new()
    };
    let capped = if info.softcap > 0.0 {
        format!(
            " This model soft-caps its logits (cap {}): the shares add up to the logit before capping, recovered from the model's own through atanh; capping is not linear, so no share of the capped logit exists.",
            info.softcap
        )
    } else {
        String::new()
    };
    let identity = format!(
        "The shares add up to the model's own logit on every prompt: largest residual {:.1e} of the sum of |shares| (tolerance {:.0e}; llama.cpp rounds the normed state to 8 bits before a quantized output matrix, the shares are exact dot products with its dequantized rows), and the captured attention and MLP outputs rebuild the last residual to {:.1e}.",
        info.max_relative_residual, info.residual_tolerance, info.max_unexplained
    );

    // 1. Mean share per block, attention and MLP.
    let attn_rows: Vec<Vec<f64>> = all.iter().map(|a| a.attn.clone()).collect();
    let mlp_rows: Vec<Vec<f64>> = all.iter().map(|a| a.mlp.clone()).collect();
    let attn_iv = intervals(&attn_rows, 0xa77);
    let mlp_iv = intervals(&mlp_rows, 0x31b);
    let mut per_block = Plot::new();
    band(&mut per_block, &blocks, &attn_iv, 0, "attention", "");
    band(&mut per_block, &blocks, &mlp_iv, 1, "MLP", "");
    per_block.set_layout(
        Layout::new()
            .height(440)
            .x_axis(Axis::new().title(Title::with_text("block")))
            .y_axis(Axis::new().title(Title::with_text("share of the logit")))
            .legend(below_legend())
            .margin(plotly::layout::Margin::new().bottom(150)),
    );
    let embed_iv =
        bootstrap::mean_interval(&all.iter().map(|a| a.embed).collect::<Vec<_>>(), 0xe3b)
            .expect("prompts");
    let logit_iv =
        bootstrap::mean_interval(&all.iter().map(|a| a.logit).collect::<Vec<_>>(), 0x10f)
            .expect("prompts");
    let constant = all.iter().map(|a| a.constant).sum::<f64>() / n as f64;
    // The three components that write the most, by mean share.
    let mut ranked: Vec<(String, Interval)> = attn_iv
        .iter()
        .enumerate()
        .map(|(b, i)| (format!("attention {b}"), *i))
        .chain(
            mlp_iv
                .iter()
                .enumerate()
                .map(|(b, i)| (format!("MLP {b}"), *i)),
        )
        .collect();
    ranked.sort_by(|a, b| b.1.mean.total_cmp(&a.1.mean));
    let top: Vec<String> = ranked
        .iter()
        .take(3)
        .map(|(name, i)| format!("{name} ({:+.2} [{:+.2}, {:+.2}])", i.mean, i.lo, i.hi))
        .collect();
    let fmt_iv = |i: &Interval| format!("{:+.2} [{:+.2}, {:+.2}]", i.mean, i.lo, i.hi);
    let mut figures = vec![Figure {
        title: format!("Which blocks write {of} (n = {n})"),
        caption: format!(
            "How to read: each block's attention and MLP add a vector to the residual stream; its share is how much that vector alone raises {of} through the model's final norm and unembedding. Lines are means over the {n} prompt(s), shaded bands 95% bootstrap intervals; a band that stays clear of 0 is a block that writes the answer on most prompts, a wide band one that helps some prompts and hurts others. Largest mean shares: {}. The embedding contributes {} and the norm and output biases {:+.2}; the model's own logit averages {}.{few}{capped} {identity} Convention: {}.",
            top.join(", "),
            fmt_iv(&embed_iv),
            constant,
            fmt_iv(&logit_iv),
            html_escape(&info.convention)
        ),
        plot: per_block,
    }];

    // 1b. The heads that write the most, where per-head shares were computed and add up.
    let heads_note = match top_heads(info, &all, &of, &few) {
        Some(Ok(f)) => {
            figures.push(f);
            String::new()
        }
        Some(Err(why)) => format!(" {why}"),
        None => String::new(),
    };

    // 2. Per prompt: every share, hover for the value.
    let drawn = thin(n, MAX_DRAWN);
    let mut cols = vec!["embed".to_string()];
    for b in 0..n_block {
        cols.push(format!("attn {b}"));
        cols.push(format!("MLP {b}"));
    }
    let mut ys = Vec::new();
    let mut z = Vec::new();
    let mut text = Vec::new();
    let mut longest = 0;
    // Plotly draws a heat map's first row at the bottom: the rows go in reversed so that the
    // first prompt reads at the top.
    for &i in drawn.iter().rev() {
        let (a, rec) = (all[i], recs[i]);
        let mut row = vec![a.embed];
        for b in 0..n_block {
            row.push(a.attn[b]);
            row.push(a.mlp[b]);
        }
        let answer = match &a.foil_piece {
            Some(f) => format!(
                "{:?} − {:?}",
                crate::answer::visible(&a.target_piece),
                crate::answer::visible(f)
            ),
            None => format!("{:?}", crate::answer::visible(&a.target_piece)),
        };
        let label = format!(
            "{} → {}",
            crate::answer::cut_front(&crate::answer::one_line(&rec.text), 40),
            answer
        );
        text.push(
            row.iter()
                .map(|_| {
                    html_escape(&format!(
                        "{}: {} (logit {:.2}, residual {:.1e})",
                        rec.id, label, a.logit, a.residual
                    ))
                })
                .collect::<Vec<_>>(),
        );
        // The row's name: the prompt's id and the token attributed (the text is on hover).
        let name = format!("{} → {answer}", crate::answer::cut_front(&rec.id, 24));
        longest = longest.max(name.chars().count());
        ys.push(html_escape(&name));
        z.push(row);
    }
    let range = super::robust_range(
        z.iter()
            .flatten()
            .map(|v| v.abs())
            .collect::<Vec<_>>()
            .iter(),
    );
    let zmax = range.map_or(1.0, |r| r.hi.max(1e-9));
    let hm = HeatMap::new(cols, ys.clone(), z)
        .color_scale(ColorScale::Palette(ColorScalePalette::RdBu))
        .reverse_scale(true)
        .zmin(-zmax)
        .zmax(zmax)
        .zmid(0.0);
    let mut trace = serde_json::to_value(&hm).expect("serialisable");
    trace["text"] = serde_json::json!(text);
    trace["hovertemplate"] = serde_json::json!("%{text}<br>%{x}: %{z:+.3f}<extra></extra>");
    trace["colorbar"] = serde_json::json!({"title": {"text": "share"}});
    let mut per_prompt = Plot::new();
    per_prompt.add_trace(Box::new(RawTrace(trace)));
    per_prompt.set_layout(
        Layout::new()
            .height((220 + 16 * ys.len()).min(1400))
            // Room for the longest row name (~7 px a character at the tick font's size).
            .margin(plotly::layout::Margin::new().left((40 + 8 * longest).min(420))),
    );
    let thinned = if drawn.len() < n {
        format!(
            " Every {}th of the {n} prompts is drawn (run.json holds every prompt's shares).",
            n.div_ceil(drawn.len())
        )
    } else {
        String::new()
    };
    figures.push(Figure {
        title: "Per prompt".into(),
        caption: format!(
            "How to read: one row per prompt (its id → the token attributed), one column per component; red raises the logit, blue lowers it. Hover for the prompt, the model's logit and the residual of its decomposition.{thinned} {}",
            range.map(|r| r.sentence().replace("Colour scale", "Colour scale (by |share|)")).unwrap_or_default()
        ),
        plot: per_prompt,
    });

    // 3. The logit built up through depth, by label when there are several.
    let labels = v.group_names();
    let groups: Vec<(String, Vec<&PromptAttribution>)> = if labels.len() > 1 {
        labels
            .iter()
            .map(|l| {
                (
                    l.to_string(),
                    all.iter()
                        .zip(&recs)
                        .filter(|(_, r)| r.label.as_deref() == Some(*l))
                        .map(|(a, _)| *a)
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|(_, g)| !g.is_empty())
            .collect()
    } else {
        vec![("all prompts".to_string(), all.clone())]
    };
    let mut built = Plot::new();
    let depth: Vec<f64> = (0..=n_block).map(|p| p as f64).collect();
    for (g, (name, members)) in groups.iter().enumerate() {
        let rows: Vec<Vec<f64>> = members
            .iter()
            .map(|a| {
                let mut acc = a.embed + a.constant;
                let mut r = vec![acc];
                for b in 0..n_block {
                    acc += a.attn[b] + a.mlp[b];
                    r.push(acc);
                }
                r
            })
            .collect();
        let iv = intervals(&rows, 0xb17 + g as u64 * 977);
        band(
            &mut built,
            &depth,
            &iv,
            g,
            &format!("{name} (n = {})", members.len()),
            "",
        );
    }
    built.add_trace(
        Scatter::new(vec![n_block as f64], vec![logit_iv.mean])
            .mode(Mode::Markers)
            .marker(
                plotly::common::Marker::new()
                    .size(12)
                    .color(color(7))
                    .symbol(plotly::common::MarkerSymbol::Diamond),
            )
            .line(Line::new().dash(DashType::Dot))
            .name("the model's own logit (mean)"),
    );
    built.set_layout(
        Layout::new()
            .height(440)
            .x_axis(Axis::new().title(Title::with_text("point (the residual after block p − 1)")))
            .y_axis(Axis::new().title(Title::with_text("logit so far")))
            .legend(below_legend())
            .margin(plotly::layout::Margin::new().bottom(150)),
    );
    figures.push(Figure {
        title: if groups.len() > 1 {
            "Built up through the blocks, by label".into()
        } else {
            "Built up through the blocks".into()
        },
        caption: format!(
            "How to read: the sum of the shares written so far (embedding and biases at point 0, then each block's attention and MLP), so the last point is the model's own logit (diamond). Where a curve climbs is where the answer gets written; where labels part is where the model starts treating them differently. Means with 95% bootstrap intervals over each label's prompts.{few}"
        ),
        plot: built,
    });
    Some(Section {
        tabs: Vec::new(),
        title,
        note: format!(
            "Direct logit attribution of {of} at each prompt's last position: what the embedding and every block's attention and MLP contribute, read through the final norm and unembedding as the model reads them. It attributes the answer to what writes it directly; a block whose output is only read by later blocks (an indirect effect) shows here as little, and is found by patching (gguf-trace patch).{heads_note}"
        ),
        figures,
    })
}

/// How many heads the top-heads figure draws.
const TOP_HEADS: usize = 12;

/// The heads with the largest mean |share|, with 95% intervals; Err: why none are shown (None:
/// the run has no per-head shares).
fn top_heads(
    info: &crate::run::AttributionInfo,
    all: &[&PromptAttribution],
    of: &str,
    few: &str,
) -> Option<Result<Figure, String>> {
    if !info.heads {
        return None;
    }
    let mut plot = Plot::new();
    if !info.heads_valid {
        return Some(Err(format!(
            "Heads are not shown: this model's attention output is not the output projection of its heads alone (recomputed W_O z + b is {:.1e} from the captured output, relative; tolerance {:.0e}) — a norm or a scale follows the projection, as in Gemma 2/3, OLMo 2/3 or Granite — so no share of a single head exists.",
            info.max_projection_error,
            crate::analysis::attribution::PROJECTION_TOLERANCE
        )));
    }
    let n_block = all[0].heads.len();
    let n_head = all[0].heads.first().map_or(0, Vec::len);
    let mut ranked: Vec<(usize, usize, Interval)> = Vec::new();
    for b in 0..n_block {
        for h in 0..n_head {
            let v: Vec<f64> = all.iter().map(|a| a.heads[b][h]).collect();
            let iv = bootstrap::mean_interval(&v, 0x4ead + (b * n_head + h) as u64)
                .expect("at least one prompt");
            ranked.push((b, h, iv));
        }
    }
    ranked.sort_by(|a, b| b.2.mean.abs().total_cmp(&a.2.mean.abs()));
    ranked.truncate(TOP_HEADS);
    let names: Vec<String> = ranked
        .iter()
        .map(|(b, h, _)| format!("L{b}.H{h}"))
        .collect();
    let means: Vec<f64> = ranked.iter().map(|r| r.2.mean).collect();
    let bar = plotly::Bar::new(names.clone(), means.clone())
        .marker(plotly::common::Marker::new().color(color(0)))
        .error_y(
            plotly::common::ErrorData::new(plotly::common::ErrorType::Data)
                .array(ranked.iter().map(|r| r.2.hi - r.2.mean).collect())
                .array_minus(ranked.iter().map(|r| r.2.mean - r.2.lo).collect())
                .symmetric(false),
        )
        .text_array(
            ranked
                .iter()
                .map(|r| {
                    format!(
                        "{:+.3} [{:+.3}, {:+.3}], n = {}",
                        r.2.mean, r.2.lo, r.2.hi, r.2.n
                    )
                })
                .collect(),
        )
        .hover_template("%{x}: %{text}<extra></extra>")
        .name("mean share");
    plot.add_trace(bar);
    plot.set_layout(
        Layout::new()
            .height(400)
            .x_axis(Axis::new().title(Title::with_text("block.head")))
            .y_axis(Axis::new().title(Title::with_text("share of the logit")))
            .show_legend(false),
    );
    Some(Ok(Figure {
        title: format!("The heads that write {of}"),
        caption: format!(
            "How to read: each block's attention share split by head (the head's slice of z times its columns of the output projection, dequantized by ggml from the file, read through the same frozen norm); the {} heads with the largest mean |share|, with 95% bootstrap intervals over prompts. The heads of each block add up to its attention share to {:.1e} of Σ|share|, and the output projection of the captured heads is the captured attention output to {:.1e} (llama.cpp rounds z to 8 bits before a quantized output projection).{few}",
            ranked.len(),
            info.max_heads_gap,
            info.max_projection_error
        ),
        plot,
    }))
}
