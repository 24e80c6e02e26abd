//! Logit lens and thinking styles on the real models.

use crate::common::*;
use gguf_trace::analysis::cka;

/// The lens of the last point reproduces the model's own logits (same ggml kernels on the same
/// quantized matrix: measured bit-identical; tolerance 1e-2 documented in commands/trace.rs).
#[test]
fn lens_self_check_on_both_models() {
    for name in [SMOL, GEMMA] {
        let Some(model) = model_path(name) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let run = trace_run(
            &model,
            &[
                "-f",
                s(&repo_root().join("prompts/facts.jsonl")),
                "--positions",
                "last",
                "--lens",
            ],
            &dir.path().join("r"),
        );
        let info = run.manifest.lens.clone().unwrap();
        eprintln!(
            "{name}: lens self-check max |diff| = {:e} ({})",
            info.self_check_max_abs_diff, info.output_tensor
        );
        // The lens runs the same ggml kernels on the same quantized matrix as the model's own
        // output layer: measured exactly 0 on both models; 1e-5 allows for float re-association
        // only (the tool's own tolerance, 1e-2, is far looser).
        assert!(info.self_check_max_abs_diff <= 1e-5, "{info:?}");
        assert!(info.valid, "{info:?}");
        let lens = run.lens().unwrap().unwrap();
        let logits = run.logits().unwrap();
        for pl in &lens {
            let t = &pl.traces[0];
            assert_eq!(t.points.len(), run.manifest.model.n_layer + 1);
            assert_eq!(
                t.position,
                run.manifest.prompts[pl.index].n_prompt_tokens - 1
            );
            // The final prediction is the model's own top-1.
            let own = argmax_ref(logits.row(pl.index).as_slice().unwrap());
            assert_eq!(t.final_token as usize, own);
            let last = t.points.last().unwrap();
            assert_eq!((last.rank_final, last.kl_to_final), (0, 0.0));
            assert!(t
                .points
                .iter()
                .all(|p| p.entropy >= 0.0 && (0.0..=1.0).contains(&p.p_final)));
        }
    }
}

/// "The capital of France is": SmolLM2's final top-1 is " Paris". Measured with this exact lens,
/// Paris is rank 2 at point 29 and becomes top-1 only at point 30 (the last block's output): this
/// 135M model decides in its last block, so the decision point equals n_layer here.
#[test]
fn paris_forms_in_the_last_blocks() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = trace_run(
        &model,
        &[
            "-p",
            "The capital of France is",
            "--positions",
            "last",
            "--lens",
            "--lens-k",
            "10",
        ],
        &dir.path().join("r"),
    );
    let pl = &run.lens().unwrap().unwrap()[0];
    let t = &pl.traces[0];
    assert_eq!(pl.pieces[&t.final_token], " Paris");
    let n = run.manifest.model.n_layer;
    assert!(t.decision_point <= n);
    let p = |k: usize| t.points[k].p_final;
    assert!(
        p(n - 3) < p(n - 2) && p(n - 2) < p(n - 1) && p(n - 1) < p(n),
        "Paris's probability rises through the last blocks"
    );
    assert!(
        t.points[n - 1].rank_final <= 2,
        "Paris is already in the top 3 before the last block"
    );
    assert!(
        t.points[n / 2].rank_final > 100,
        "and nowhere near the top at mid-depth"
    );
}

#[test]
fn lens_all_positions_on_request() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = trace_run(
        &model,
        &["-p", "Water boils at", "--lens", "--lens-all"],
        &dir.path().join("r"),
    );
    let pl = &run.lens().unwrap().unwrap()[0];
    assert_eq!(pl.traces.len(), run.manifest.prompts[0].positions.len());
    assert_eq!(
        pl.last_prompt().position,
        run.manifest.prompts[0].n_prompt_tokens - 1
    );
    assert_eq!(run.manifest.lens.as_ref().unwrap().positions, "all");
}

/// CKA of a real model with itself is 1 on the diagonal; between SmolLM2 and Gemma-3 on 320
/// prompts the shuffled-prompt control stays near 0 while the real comparison does not.
#[test]
fn cka_real_models_and_shuffled_control() {
    let (Some(a), Some(b)) = (model_path(SMOL), model_path(GEMMA)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let styles = repo_root().join("prompts/styles.txt");
    let ra = trace_run(
        &a,
        &["-f", s(&styles), "--positions", "last"],
        &dir.path().join("a"),
    );
    let rb = trace_run(
        &b,
        &["-f", s(&styles), "--positions", "last"],
        &dir.path().join("b"),
    );
    let (la, lb) = (ra.last().unwrap(), rb.last().unwrap());
    let n = la.shape()[0];
    assert!(n >= 300);
    let self_m = cka::cka_matrix(la.view(), la.view(), None);
    for p in 1..self_m.nrows() {
        assert!(
            (self_m[[p, p]] - 1.0).abs() < 1e-9,
            "self-CKA at point {p}: {}",
            self_m[[p, p]]
        );
    }
    let m = cka::cka_matrix(la.view(), lb.view(), None);
    let order: Vec<usize> = (0..n).map(|i| (i * 7919 + 13) % n).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation");
    let control = cka::cka_matrix(la.view(), lb.view(), Some(&order));
    let mean_abs = control
        .iter()
        .filter(|x| x.is_finite())
        .map(|x| x.abs())
        .sum::<f64>()
        / control.len() as f64;
    let diag = cka::diagonal_mean(&m);
    eprintln!("SmolLM2 × Gemma-3, n = {n}: diagonal mean CKA {diag:.3}, shuffled control mean |CKA| {mean_abs:.4}");
    assert!(mean_abs < 0.05, "shuffled control {mean_abs}");
    assert!(
        diag > 0.3,
        "the real comparison should be well above the control: {diag}"
    );
}

#[test]
fn three_model_report_renders() {
    let (Some(a), Some(b), Some(c)) = (
        model_path(SMOL),
        model_path(GEMMA),
        model_path(crate::real_size::QWEN05),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let o = run_bin(&[
        "compare",
        "--lens",
        "-m",
        s(&a),
        "-m",
        s(&b),
        "-m",
        s(&c),
        "-f",
        s(&repo_root().join("prompts/facts.jsonl")),
        "--positions",
        "last",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for t in [
        "Thinking styles",
        "Debiased linear CKA",
        "(n = 8)",
        "Logit lens",
        "Lens table",
        "decides at",
        "Confident vs decided",
        "95% interval",
        "Difference in mean decision depth",
    ] {
        assert!(html.contains(t), "missing {t}");
    }
    // CKA for every pair of the three models (not only the first two), each with its control.
    let pairs = html.matches("<p>CKA ").count();
    assert_eq!(pairs, 3, "one CKA summary per pair");
    // Eight prompts decide nothing: every difference names its interval and n.
    assert_eq!(html.matches("n = 8 — ").count(), 3, "a verdict per pair");
    crate::report::assert_page_reads_well(
        &out.join("report.html"),
        &crate::report::shot_path(dir.path(), "styles"),
    );
}
