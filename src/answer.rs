//! What the model answered: the top next tokens at the last prompt position (recorded per prompt in
//! run.json as `top`), made readable — invisible characters shown (⏎, ␣, ⇥), probabilities with a
//! precision that fits their size — for the terminal after a trace and for the report's pages.

use std::io::Write;

use serde::{Deserialize, Serialize};

/// How many next tokens a trace records per prompt.
pub const TOP_K: usize = 5;

/// One of the most likely next tokens at the last prompt position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopToken {
    /// Token id in the model's vocabulary.
    pub id: i32,
    /// The token's text as the model writes it (special tokens by name, e.g. `<|im_end|>`).
    pub piece: String,
    /// Its probability under the model's next-token distribution (softmax of the logits).
    pub p: f64,
}

/// The `k` most likely next tokens of `logits`, most likely first (ties: lower id first). Empty
/// when a logit is not finite (a run traced with `--allow-nonfinite`): there is no distribution.
pub fn top_k(logits: &[f32], k: usize, piece: impl Fn(i32) -> String) -> Vec<TopToken> {
    if logits.is_empty() || logits.iter().any(|x| !x.is_finite()) {
        return Vec::new();
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(ids.len());
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k < ids.len() {
        ids.select_nth_unstable_by(k, by_logit);
        ids.truncate(k);
    }
    ids.sort_by(by_logit);
    ids.into_iter()
        .map(|i| TopToken {
            id: i as i32,
            piece: piece(i as i32),
            p: (logits[i] as f64 - max).exp() / z,
        })
        .collect()
}

/// A token's text with what would be invisible made visible: ␣ for a space (the open box, which
/// common fonts have; ␠ drew as an empty box in DejaVu), ⏎ for a newline, ⇥
/// for a tab, ␍ for a carriage return, other control characters as `\u{..}`, and ∅ for a token
/// with no text.
pub fn visible(piece: &str) -> String {
    if piece.is_empty() {
        return "∅".into();
    }
    piece
        .chars()
        .map(|c| match c {
            ' ' => "␣".to_string(),
            '\n' => "⏎".to_string(),
            '\t' => "⇥".to_string(),
            '\r' => "␍".to_string(),
            c if c.is_control() => format!("\\u{{{:x}}}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// Running text on one line: newlines as ⏎, tabs as ⇥, other control characters dropped; spaces
/// stay spaces.
pub fn one_line(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            '\n' => Some('⏎'),
            '\t' => Some('⇥'),
            '\r' => None,
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// Text with its control characters (newlines included) made visible, spaces kept.
pub fn visible_text(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' => "⏎".to_string(),
            '\t' => "⇥".to_string(),
            c if c.is_control() => format!("\\u{{{:x}}}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// Display width in terminal columns (wide characters count two).
pub fn measure(s: &str) -> usize {
    console::measure_text_width(s)
}

/// The start of `s` in at most `n` columns, with "…" when cut. (console's `truncate_str` alone
/// also cuts a text that fits exactly: "p0" in two columns became "p…".)
pub fn cut(s: &str, n: usize) -> String {
    if measure(s) <= n {
        return s.to_string();
    }
    console::truncate_str(s, n, "…").into_owned()
}

/// The end of `s` in at most `n` columns, with "…" in front when cut (a prompt's end is what the
/// model answers).
pub fn cut_front(s: &str, n: usize) -> String {
    if measure(s) <= n {
        return s.to_string();
    }
    let mut kept: Vec<char> = Vec::new();
    let mut w = 1; // the "…"
    for c in s.chars().rev() {
        let cw = measure(c.encode_utf8(&mut [0; 4]));
        if w + cw > n {
            break;
        }
        w += cw;
        kept.push(c);
    }
    let mut t = String::from("…");
    t.extend(kept.into_iter().rev());
    t
}

/// A probability as a percentage with the precision its size needs: "62%", "4.1%", "0.03%",
/// "<0.01%".
pub fn percent(p: f64) -> String {
    let x = 100.0 * p;
    if !x.is_finite() {
        "–".into()
    } else if x >= 9.5 {
        format!("{x:.0}%")
    } else if x >= 0.95 {
        format!("{x:.1}%")
    } else if x >= 0.01 {
        format!("{x:.2}%")
    } else {
        "<0.01%".into()
    }
}

/// "␣Paris 62% · ␣the 4.1% · …": the first `k` of `top`.
pub fn top_line(top: &[TopToken], k: usize) -> String {
    top.iter()
        .take(k)
        .map(|t| format!("{} {}", visible(&t.piece), percent(t.p)))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// One prompt's answer as printed.
pub struct Answer<'a> {
    pub id: &'a str,
    pub label: Option<&'a str>,
    pub text: &'a str,
    pub top: &'a [TopToken],
    pub generated: &'a str,
}

impl<'a> Answer<'a> {
    /// A prompt's answer as its run.json records it.
    pub fn of(p: &'a crate::run::PromptRecord) -> Self {
        Answer {
            id: &p.id,
            label: p.label.as_deref(),
            text: &p.text,
            top: &p.top,
            generated: &p.generated_text,
        }
    }
}

/// Columns of the terminal on stdout (100 when it is not one).
pub fn terminal_width() -> usize {
    console::Term::stdout()
        .size_checked()
        .map(|(_, w)| w as usize)
        .unwrap_or(100)
}

/// Width of the id column: the widest of the first [`MAX_PRINTED`] ids, within 2..=16.
fn id_width(answers: &[Answer]) -> usize {
    answers
        .iter()
        .take(MAX_PRINTED)
        .map(|a| measure(&visible_text(a.id)))
        .max()
        .unwrap_or(2)
        .clamp(2, 16)
}

/// At most this many prompts are printed in full; beyond it the first ones and a count.
pub const MAX_PRINTED: usize = 40;
/// Up to this many prompts, each gets a block of lines; beyond it, one line each.
const MAX_BLOCKS: usize = 4;

/// Print the answers for the terminal: a block per prompt for a few prompts, a table of one line
/// each for many (the first [`MAX_PRINTED`], then where the rest are), lines cut to `width`.
pub fn print(
    out: &mut dyn Write,
    answers: &[Answer],
    width: usize,
    run_json: &str,
) -> std::io::Result<()> {
    let width = width.max(60);
    if answers.len() <= MAX_BLOCKS {
        for a in answers {
            // Ids and labels come from the user's files: control characters are made visible.
            let name = match a.label {
                Some(l) => format!("[{} · {}]", visible_text(a.id), visible_text(l)),
                None => format!("[{}]", visible_text(a.id)),
            };
            let name = cut(&name, width / 2);
            // The prompt's end is cut, never the name that tells the blocks apart.
            let room = width.saturating_sub(measure(&name) + 1);
            writeln!(out, "{name} {}", cut_front(&one_line(a.text), room))?;
            if a.top.is_empty() {
                writeln!(
                    out,
                    "  → (no next-token distribution: the logits were not finite)"
                )?;
            } else {
                writeln!(
                    out,
                    "{}",
                    cut(&format!("  → {}", top_line(a.top, TOP_K)), width)
                )?;
            }
            if !a.generated.is_empty() {
                let g = format!("  generated: “{}”", one_line(a.generated));
                writeln!(out, "{}", cut(&g, width))?;
            }
        }
        return Ok(());
    }
    let any_generated = answers.iter().any(|a| !a.generated.is_empty());
    let id_w = id_width(answers);
    let prompt_w = (width / 4).clamp(16, 36);
    let rest = width - id_w - prompt_w - 6;
    let top_w = if any_generated { rest * 3 / 5 } else { rest };
    let mut header = format!(
        "{:<id_w$}  {:<prompt_w$}  {:<top_w$}",
        "id", "prompt (its end)", "→ top next tokens"
    );
    if any_generated {
        header.push_str("  generated");
    }
    writeln!(out, "{}", header.trim_end())?;
    for a in answers.iter().take(MAX_PRINTED) {
        let id = cut(&visible_text(a.id), id_w);
        let prompt = cut_front(&one_line(a.text), prompt_w);
        let top = if a.top.is_empty() {
            "(not finite)".to_string()
        } else {
            cut(&top_line(a.top, 3), top_w)
        };
        let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(measure(s))));
        let mut line = format!(
            "{}  {}  {}",
            pad(&id, id_w),
            pad(&prompt, prompt_w),
            pad(&top, top_w)
        );
        if any_generated {
            line.push_str("  ");
            line.push_str(&one_line(a.generated));
        }
        writeln!(out, "{}", cut(line.trim_end(), width))?;
    }
    if answers.len() > MAX_PRINTED {
        writeln!(
            out,
            "… and {} more prompt(s): jq '.prompts[] | {{id, top, generated_text}}' {run_json}",
            answers.len() - MAX_PRINTED
        )?;
    }
    Ok(())
}

/// Several models' answers to the same prompts (a `compare`), as one table: a row per prompt
/// (the first [`MAX_PRINTED`]) with the end of its text, a column per model with its most likely
/// next token and its probability; `≠` marks a model whose top token differs from the first
/// model's (by its text: models of different families number their vocabularies differently).
pub fn print_compare(
    out: &mut dyn Write,
    models: &[String],
    answers: &[Vec<Answer>],
    width: usize,
    more: &str,
) -> std::io::Result<()> {
    let width = width.max(60);
    let n = answers.iter().map(|a| a.len()).min().unwrap_or(0);
    let id_w = answers.first().map(|a| id_width(a)).unwrap_or(2);
    let prompt_w = (width / 4).clamp(12, 28);
    let col = (width.saturating_sub(id_w + prompt_w + 2) / models.len().max(1)).clamp(12, 40) - 2;
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(measure(s))));
    let mut header = format!("{}  {}", pad("id", id_w), pad("prompt (its end)", prompt_w));
    for m in models {
        header.push_str("  ");
        // The end of a model's name tells quantizations of one model apart.
        header.push_str(&pad(&cut_front(&visible_text(m), col), col));
    }
    writeln!(out, "{}", header.trim_end())?;
    let top1 = |a: &Answer| a.top.first().map(|t| t.piece.clone());
    for k in 0..n.min(MAX_PRINTED) {
        let mut line = format!(
            "{}  {}",
            pad(&cut(&visible_text(answers[0][k].id), id_w), id_w),
            pad(
                &cut_front(&one_line(answers[0][k].text), prompt_w),
                prompt_w
            )
        );
        let first = top1(&answers[0][k]);
        for a in answers {
            let cell = match a[k].top.first() {
                None => "(not finite)".to_string(),
                Some(t) => format!(
                    "{} {}{}",
                    visible(&t.piece),
                    percent(t.p),
                    if Some(&t.piece) != first.as_ref() {
                        " ≠"
                    } else {
                        ""
                    }
                ),
            };
            line.push_str("  ");
            line.push_str(&pad(&cut(&cell, col), col));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    if n > MAX_PRINTED {
        writeln!(out, "… and {} more prompt(s): {more}", n - MAX_PRINTED)?;
    }
    let moved = |a: &Vec<Answer>| {
        a.iter()
            .zip(&answers[0])
            .filter(|(x, y)| top1(x) != top1(y))
            .count()
    };
    if answers.iter().skip(1).any(|a| moved(a) > 0) {
        writeln!(
            out,
            "≠ the most likely next token differs from the first model's ({})",
            models
                .iter()
                .zip(answers)
                .skip(1)
                .map(|(m, a)| format!("{}: {} of {n}", visible_text(m), moved(a)))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_that_fits_exactly_is_not_cut() {
        assert_eq!(cut("p0", 2), "p0");
        assert_eq!(cut("p10", 2), "p…");
        assert_eq!(cut("日本", 4), "日本");
        assert_eq!(cut_front("p0", 2), "p0");
    }

    #[test]
    fn a_compare_prints_one_row_per_prompt_and_marks_moved_answers() {
        let tok = |id: i32, piece: &str, p: f64| TopToken {
            id,
            piece: piece.into(),
            p,
        };
        let (paris, rome) = (vec![tok(7, " Paris", 0.78)], vec![tok(9, " Rome", 0.5)]);
        fn a(top: &[TopToken]) -> Answer<'_> {
            Answer {
                id: "p0",
                label: None,
                text: "The capital of France is",
                top,
                generated: "",
            }
        }
        let mut buf = Vec::new();
        print_compare(
            &mut buf,
            &["model.F32.gguf".into(), "model.Q2_K.gguf".into()],
            &[vec![a(&paris)], vec![a(&rome)]],
            100,
            "see report.answers.csv",
        )
        .unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("model.F32.gguf") && lines[0].contains("model.Q2_K.gguf"));
        assert!(
            lines[1].starts_with("p0  The capital of France is"),
            "{text}"
        );
        assert!(
            lines[1].contains("␣Paris 78%") && !lines[1].contains("78% ≠"),
            "{text}"
        );
        assert!(lines[1].contains("␣Rome 50% ≠"), "{text}");
        assert!(
            lines[2].starts_with("≠ the most likely")
                && lines[2].ends_with("(model.Q2_K.gguf: 1 of 1)"),
            "{text}"
        );
        assert!(lines.iter().all(|l| measure(l) <= 100), "{text}");
    }

    #[test]
    fn top_tokens_are_the_softmax_of_the_logits_in_order() {
        let logits = [0.0f32, 2.0, 1.0, 2.0, -1.0];
        let top = top_k(&logits, 3, |i| format!("t{i}"));
        assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 3, 2]);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        assert!((top[0].p - 2f64.exp() / z).abs() < 1e-12);
        assert!((top[2].p - 1f64.exp() / z).abs() < 1e-12);
        assert_eq!(top[1].piece, "t3");
        assert!(top_k(&[0.0, f32::NAN], 2, |_| String::new()).is_empty());
        assert_eq!(top_k(&[1.0], 5, |_| String::new()).len(), 1);
    }

    #[test]
    fn invisible_characters_are_shown() {
        assert_eq!(visible(" Paris"), "␣Paris");
        assert_eq!(visible("\n\n"), "⏎⏎");
        assert_eq!(visible(""), "∅");
        assert_eq!(visible("\u{7}x"), "\\u{7}x");
        assert_eq!(visible_text("a b\n\u{1b}[31m"), "a b⏎\\u{1b}[31m");
        // Columns, not characters: a wide character counts two.
        assert_eq!(measure("東京"), 4);
        assert_eq!(cut("東京都庁", 5), "東京…");
        assert_eq!(cut_front("東京都庁", 5), "…都庁");
        assert_eq!(one_line("a\nb\tc\r"), "a⏎b⇥c");
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut_front("abcdef", 4), "…def");
        assert_eq!(cut("abc", 4), "abc");
        assert_eq!(percent(0.6234), "62%");
        assert_eq!(percent(0.041), "4.1%");
        assert_eq!(percent(0.0003), "0.03%");
        assert_eq!(percent(1e-7), "<0.01%");
    }

    #[test]
    fn many_prompts_are_a_table_of_cut_lines() {
        let top = vec![
            TopToken {
                id: 1,
                piece: " Paris".into(),
                p: 0.6,
            },
            TopToken {
                id: 2,
                piece: "\n".into(),
                p: 0.1,
            },
        ];
        let answers: Vec<Answer> = (0..50)
            .map(|_| Answer {
                id: "p",
                label: None,
                text: "The capital of France is a city whose name is",
                top: &top,
                generated: "Paris.\nIt is",
            })
            .collect();
        let mut out = Vec::new();
        print(&mut out, &answers, 80, "r/run.json").unwrap();
        let s = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 1 + MAX_PRINTED + 1, "{s}");
        assert!(lines.iter().all(|l| measure(l) <= 80), "{s}");
        assert!(lines[1].contains("␣Paris 60%"), "{s}");
        assert!(lines.last().unwrap().contains("10 more"), "{s}");
        let mut out = Vec::new();
        print(&mut out, &answers[..2], 80, "r/run.json").unwrap();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.lines().count(), 6, "{s}");
        assert!(
            s.contains("→ ␣Paris 60% · ⏎ 10%") && s.contains("generated: “Paris.⏎It is”"),
            "{s}"
        );
        // A long prompt is cut at its start, never the name; a newline in an id is shown.
        let long = "word ".repeat(40);
        let one = [Answer {
            id: "a\nb",
            label: Some("x"),
            text: &long,
            top: &top,
            generated: "",
        }];
        let mut out = Vec::new();
        print(&mut out, &one, 60, "r/run.json").unwrap();
        let s = String::from_utf8(out).unwrap();
        let first = s.lines().next().unwrap();
        assert!(first.starts_with("[a⏎b · x] …"), "{s}");
        assert!(measure(first) <= 60, "{s}");
    }
}
