//! What the model answered, first on every page: prompt → top next tokens (and any generated text)
//! for each run. Runs of the same prompts share one table, a column per run (the unmodified run
//! first), and every cell whose answer differs from the first column's is marked: for an
//! intervention that is the before → after of each condition.

use super::interventions::{describe, intervened};
use super::trajectories::html_escape;
use super::view::RunView;
use super::Section;
use crate::answer::{cut, cut_front, one_line, percent, visible, TopToken};
use crate::run::PromptRecord;

/// Most prompts shown in a table; every prompt is in `<stem>.answers.csv`.
pub const MAX_ROWS: usize = 60;
/// Tables of more prompts than this start folded (a click opens them).
const FOLDED_FROM: usize = 12;

/// Whether two runs hold the same prompts (by id and text), so their answers line up row by row.
fn same_prompts(a: &RunView, b: &RunView) -> bool {
    let (pa, pb) = (&a.run.manifest.prompts, &b.run.manifest.prompts);
    pa.len() == pb.len()
        && pa
            .iter()
            .zip(pb)
            .all(|(x, y)| x.id == y.id && x.text == y.text)
}

fn top1(r: &PromptRecord) -> Option<&TopToken> {
    r.top.first()
}

/// The first `k` top tokens as HTML: "<code>␣Paris</code> 72% · …".
pub fn top_html(top: &[TopToken], k: usize) -> String {
    top.iter()
        .take(k)
        .map(|t| {
            format!(
                "<code>{}</code> {}",
                html_escape(&visible(&t.piece)),
                percent(t.p)
            )
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// One answer cell: the top three next tokens and the start of the generated text.
fn cell(r: &PromptRecord) -> String {
    let mut s = if r.top.is_empty() {
        if r.nonfinite.is_some() {
            "<i>logits not finite</i>".to_string()
        } else {
            "<i>not recorded</i>".to_string()
        }
    } else {
        top_html(&r.top, 3)
    };
    if !r.generated_text.is_empty() {
        s.push_str(&format!(
            "<br><span class=\"gen\">“{}”</span>",
            html_escape(&cut(&one_line(&r.generated_text), 160))
        ));
    }
    s
}

/// Whether `r`'s answer differs from `base`'s: another most likely token (by its text, so runs
/// of differently tokenized models compare), or other generated text.
fn differs(base: &PromptRecord, r: &PromptRecord) -> bool {
    top_moved(base, r) || base.generated_text != r.generated_text
}

/// Whether the most likely token differs: another token, or a distribution on one side only (the
/// logits went non-finite). Two runs that both recorded none do not count.
fn top_moved(base: &PromptRecord, r: &PromptRecord) -> bool {
    match (top1(base), top1(r)) {
        (Some(a), Some(b)) => a.piece != b.piece,
        (None, None) => false,
        _ => true,
    }
}

fn prompt_cell(r: &PromptRecord) -> String {
    let label = r
        .label
        .as_deref()
        .map(|l| format!(" <span class=\"label\">{}</span>", html_escape(l)))
        .unwrap_or_default();
    format!(
        "<b>{}</b>{label}<br>{}",
        html_escape(&r.id),
        html_escape(&cut_front(&one_line(&r.text), 120))
    )
}

fn column_name(v: &RunView) -> String {
    if intervened(v) {
        format!(
            "{}<br><small>{}</small>",
            html_escape(&v.name),
            html_escape(&describe(v))
        )
    } else {
        html_escape(&v.name)
    }
}

/// The section, or None when no run has a prompt. `first`: the run every other is compared with
/// (a ladder's reference); by default the first unmodified run.
pub fn section(views: &[RunView], first: Option<usize>) -> Option<Section> {
    if views.iter().all(|v| v.run.manifest.prompts.is_empty()) {
        return None;
    }
    // The reference, then unmodified runs, then intervened ones.
    let mut order: Vec<usize> = first.into_iter().collect();
    order.extend((0..views.len()).filter(|&i| !intervened(&views[i]) && Some(i) != first));
    order.extend((0..views.len()).filter(|&i| intervened(&views[i]) && Some(i) != first));
    let together = order
        .iter()
        .all(|&i| same_prompts(&views[order[0]], &views[i]));
    let groups: Vec<Vec<usize>> = if together {
        vec![order]
    } else {
        order.into_iter().map(|i| vec![i]).collect()
    };
    let mut note = String::from(
        "The most likely next tokens at the last prompt position with their probabilities (␣ a space, ⏎ a newline), and the start of any generated text.",
    );
    if groups[0].len() > 1 {
        note.push_str(" One column per run; a highlighted cell answers differently from the first column (another most likely token or other generated text).");
    }
    let no_top = views.iter().any(|v| {
        v.run
            .manifest
            .prompts
            .iter()
            .all(|p| p.top.is_empty() && p.nonfinite.is_none())
            && !v.run.manifest.prompts.is_empty()
    });
    if no_top {
        note.push_str(" Runs traced by an earlier gguf-trace recorded no top tokens (“not recorded”): trace them again to see them.");
    }
    for cols in &groups {
        let first = &views[cols[0]];
        let prompts = &first.run.manifest.prompts;
        let n = prompts.len();
        let mut t = String::from("<table class=\"answers\"><tr><th>prompt</th>");
        for &c in cols {
            t.push_str(&format!("<th>{}</th>", column_name(&views[c])));
        }
        t.push_str("</tr>");
        for (i, r) in prompts.iter().enumerate().take(MAX_ROWS) {
            t.push_str(&format!("<tr><td>{}</td>", prompt_cell(r)));
            for (k, &c) in cols.iter().enumerate() {
                let rc = &views[c].run.manifest.prompts[i];
                let class = if k > 0 && differs(r, rc) {
                    " class=\"changed\""
                } else {
                    ""
                };
                t.push_str(&format!("<td{class}>{}</td>", cell(rc)));
            }
            t.push_str("</tr>");
        }
        t.push_str("</table>");
        if n > MAX_ROWS {
            t.push_str(&format!(
                "<p>The first {MAX_ROWS} of {n} prompts; every prompt is in the answers CSV beside this page.</p>"
            ));
        }
        // What changed, per run, above the table; the table folds away beyond a screenful.
        let mut summary = String::new();
        if cols.len() > 1 {
            let lines: Vec<String> = cols[1..]
                .iter()
                .map(|&c| {
                    let v = &views[c];
                    let ps = &v.run.manifest.prompts;
                    let top = prompts
                        .iter()
                        .zip(ps)
                        .filter(|(a, b)| top_moved(a, b))
                        .count();
                    let gen = prompts
                        .iter()
                        .zip(ps)
                        .filter(|(a, b)| a.generated_text != b.generated_text)
                        .count();
                    let any_gen = ps.iter().any(|p| !p.generated_text.is_empty());
                    format!(
                        "<b>{}</b>: the most likely token differs from {} in {top} of {n} prompts{}.",
                        column_name(v).replace("<br>", " — "),
                        html_escape(&first.name),
                        if any_gen {
                            format!("; the generated text in {gen} of {n}")
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            summary = format!("<p>{}</p>", lines.join("<br>"));
        }
        if cols.len() == 1 && groups.len() > 1 {
            note.push_str(&format!("<h3>{}</h3>", html_escape(&first.name)));
        }
        note.push_str(&summary);
        let open = if n <= FOLDED_FROM { " open" } else { "" };
        note.push_str(&format!(
            "<details{open}><summary>Prompt by prompt ({n} prompts)</summary>{t}</details>"
        ));
    }
    Some(Section {
        tabs: Vec::new(),
        title: "Answers".into(),
        note,
        figures: vec![],
    })
}

/// One row per run and prompt for `<stem>.answers.csv`: run, prompt, id, label, text, then for
/// each of the top tokens its id, text and probability, then the generated text.
pub fn csv_header() -> Vec<String> {
    let mut h: Vec<String> = ["run", "prompt", "id", "label", "text"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for k in 1..=crate::answer::TOP_K {
        h.extend([format!("top{k}_id"), format!("top{k}"), format!("p{k}")]);
    }
    h.push("generated".into());
    h
}

pub fn csv_rows(v: &RunView) -> Vec<Vec<String>> {
    v.run
        .manifest
        .prompts
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row = vec![
                v.shown_dir.clone(),
                i.to_string(),
                r.id.clone(),
                r.label.clone().unwrap_or_default(),
                r.text.clone(),
            ];
            for k in 0..crate::answer::TOP_K {
                match r.top.get(k) {
                    Some(t) => row.extend([t.id.to_string(), t.piece.clone(), t.p.to_string()]),
                    None => row.extend([String::new(), String::new(), String::new()]),
                }
            }
            row.push(r.generated_text.clone());
            row
        })
        .collect()
}
