//! The attention viewer and per-head summaries (`--taps pattern`) on a real model, and the page
//! read back from Chromium.

use crate::common::*;
use gguf_trace::analysis::attention::{self, INDUCTION_MARK, PREVIOUS_TOKEN_MARK};
use gguf_trace::capture::taps::Tap;
use gguf_trace::run::Run;

/// SmolLM2 on prompts that repeat a sequence (prompts/induction.txt): it has previous-token and
/// induction heads (measured: L16.H0 attends 0.871 to the previous token, L18.H6 0.547 to the
/// induction target; marks 0.5 and 0.3), named on the page; the drawn attention map is the run's own pattern (read
/// back from Chromium: the sum of the drawn cells), masked cells are blank, and the summaries
/// cover every block and head.
#[test]
fn attention_page_names_heads_and_draws_the_runs_pattern() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let o = run_bin(&[
        "trace",
        "-m",
        s(&model),
        "-f",
        s(&repo_root().join("prompts/induction.txt")),
        "--taps",
        "pattern",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = Run::open(&out).unwrap();
    let (n_layer, n_head) = (run.manifest.model.n_layer, run.manifest.model.n_head);
    // Means over prompts, computed here from the run's files.
    let mut prev = vec![0f64; n_layer * n_head];
    let mut ind = vec![0f64; n_layer * n_head];
    let n = run.manifest.prompts.len();
    for (i, p) in run.manifest.prompts.iter().enumerate() {
        let pat = run
            .tap(Tap::Pattern, i)
            .unwrap()
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        let st = attention::head_stats(pat.view(), &p.positions, &p.tokens);
        let si = st.induction.expect("every prompt repeats a token");
        for b in 0..n_layer {
            for h in 0..n_head {
                prev[b * n_head + h] += st.previous[b][h] / n as f64;
                ind[b * n_head + h] += si[b][h] / n as f64;
            }
        }
    }
    let best = |v: &[f64]| {
        let (c, m) = v
            .iter()
            .enumerate()
            .fold((0, f64::MIN), |a, (c, &m)| if m > a.1 { (c, m) } else { a });
        (format!("L{}.H{}", c / n_head, c % n_head), m)
    };
    let (bp, mp) = best(&prev);
    let (bi, mi) = best(&ind);
    eprintln!("best previous-token head {bp} {mp:.3}, best induction head {bi} {mi:.3}");
    assert!(
        mp >= PREVIOUS_TOKEN_MARK,
        "no previous-token head: {bp} {mp}"
    );
    assert!(mi >= INDUCTION_MARK, "no induction head: {bi} {mi}");

    let page = dir.path().join("page.html");
    let o = run_bin(&["report", s(&out), "-o", s(&page)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("Attention to the previous token per head"));
    assert!(
        html.contains(&format!("{bp} (")),
        "the page does not name {bp}"
    );
    assert!(
        html.contains(&format!("{bi} (")),
        "the page does not name {bi}"
    );
    let shot = crate::report::shot_path(dir.path(), "attention");
    let c = crate::report::assert_page_reads_well(&page, &shot);
    // The first viewer map: block 0, head 0 of prompt 0, its first 40 tokens, masked cells blank.
    let p = &run.manifest.prompts[0];
    let pat = run.tap(Tap::Pattern, 0).unwrap();
    let n_tok = p.tokens.len().min(40);
    let (mut want, mut cells) = (0f64, 0usize);
    for (qi, &q) in p.positions.iter().enumerate() {
        if q < n_tok {
            for k in 0..=q {
                want += (pat[[0, 0, qi, k]] as f64 * 1e4).round() / 1e4;
                cells += 1;
            }
        }
    }
    let drawn: Vec<_> = c.heatmaps.iter().filter(|h| h.1 == "attention").collect();
    assert!(!drawn.is_empty(), "{:?}", c.heatmaps);
    let (_, _, sum, count) = drawn[0];
    eprintln!("drawn {count} cells summing to {sum}, the run's {cells} cells {want}");
    assert_eq!(*count, cells);
    assert!((sum - want).abs() < 1e-6 * cells as f64, "{sum} vs {want}");
    // The per-head summaries: one cell per block and head.
    let names = [
        "Entropy",
        "Attention to the first token",
        "Attention to the previous token",
        "Induction score",
    ];
    let summaries: Vec<_> = c
        .heatmaps
        .iter()
        .filter(|h| names.contains(&h.1.as_str()))
        .collect();
    assert_eq!(summaries.len(), 4, "{:?}", c.heatmaps);
    assert!(
        summaries.iter().all(|h| h.3 == n_layer * n_head),
        "{summaries:?}"
    );
}
