//! Direct logit attribution (`trace --attribution`) on the real models: the shares of the
//! embedding and of every block's attention and MLP must add up to the model's own logit.

use crate::common::*;
use crate::real_size::QWEN05;
use gguf_trace::analysis::attribution::{
    PROJECTION_TOLERANCE, RESIDUAL_TOLERANCE, UNEXPLAINED_TOLERANCE,
};
use gguf_trace::run::Run;

/// `trace --attribution --positions last` of the bundled factual prompts (plus `extra`) into `out`.
fn facts(model: &std::path::Path, extra: &[&str], out: &std::path::Path) -> gguf_trace::run::Run {
    let facts = repo_root().join("prompts/facts.jsonl");
    let mut args = vec!["-f", s(&facts), "--positions", "last", "--attribution"];
    args.extend(extra);
    trace_run(model, &args, out)
}

/// The DLA identity on the three test models (llama, gemma-3 with its post-norms and soft-capping
/// off, qwen2 with its output bias-free tied head), default target = the model's own top-1.
///
/// Measured on this machine's build (printed below): the largest residual relative to the shares'
/// spread Σ|share| is 0.4% (SmolLM2), 0.5% (Gemma-3), 0.6% (Qwen 0.5B) — llama.cpp quantizes the
/// normed state to 8 bits per block before a quantized output matrix, the shares are float64 dot
/// products with ggml's own dequantized rows — bound RESIDUAL_TOLERANCE (2%). The components
/// rebuild the last residual to ≤ 3e-7 (float32 additions): bound UNEXPLAINED_TOLERANCE (1e-4).
#[test]
fn shares_add_up_to_the_models_logit_on_every_test_model() {
    for name in [SMOL, GEMMA, QWEN05] {
        let Some(model) = model_path(name) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let run = facts(&model, &[], &dir.path().join("r"));
        let info = run.manifest.attribution.clone().expect("attribution info");
        eprintln!(
            "{name}: max |residual| / Σ|share| = {:.2e}, max unexplained = {:.2e} ({}, norm {})",
            info.max_relative_residual, info.max_unexplained, info.output_tensor, info.norm
        );
        assert!(info.valid, "{info:?}");
        assert!(info.max_relative_residual <= RESIDUAL_TOLERANCE, "{info:?}");
        assert!(info.max_unexplained <= UNEXPLAINED_TOLERANCE, "{info:?}");
        let logits = run.logits().unwrap();
        let n_layer = run.manifest.model.n_layer;
        for (i, rec) in run.manifest.prompts.iter().enumerate() {
            let a = rec.attribution.as_ref().expect("per-prompt attribution");
            // The default target is the model's own top-1 next token, and its logit is the model's.
            let row = logits.row(i);
            let own = argmax_ref(row.as_slice().unwrap());
            assert_eq!(a.target as usize, own, "{name} {}", rec.id);
            // (serde_json's float parsing may move the last bit of the f64 read back.)
            let own_logit = row[own] as f64;
            assert!(
                (a.logit - own_logit).abs() <= 1e-12 * own_logit.abs(),
                "{name} {}",
                rec.id
            );
            assert_eq!((a.attn.len(), a.mlp.len()), (n_layer, n_layer));
            assert_eq!(a.position, rec.n_prompt_tokens - 1);
            assert!((a.logit - a.total() - a.residual).abs() < 1e-9);
            // Not a degenerate decomposition: the blocks write most of the answer's logit.
            let blocks: f64 = a.attn.iter().chain(&a.mlp).map(|v| v.abs()).sum();
            assert!(blocks > a.embed.abs(), "{name} {}: {a:?}", rec.id);
        }
    }
}

/// `--target " Paris" --foil " London"` attributes the logit difference: it equals the model's
/// own logits' difference and the identity holds for it too; the foil's row must really be
/// subtracted (a difference, unlike the target alone, is not the top logit).
#[test]
fn a_target_and_foil_attribute_the_logit_difference() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = trace_run(
        &model,
        &[
            "-p",
            "The capital of France is",
            "-p",
            "The capital of Germany is",
            "--positions",
            "last",
            "--attribution",
            "--target",
            " Paris",
            "--foil",
            " London",
        ],
        &dir.path().join("r"),
    );
    let info = run.manifest.attribution.clone().unwrap();
    eprintln!(
        "paris − london: max relative residual {:.2e}",
        info.max_relative_residual
    );
    assert!(info.valid, "{info:?}");
    let logits = run.logits().unwrap();
    for (i, rec) in run.manifest.prompts.iter().enumerate() {
        let a = rec.attribution.as_ref().unwrap();
        assert_eq!(a.target_piece, " Paris");
        assert_eq!(a.foil_piece.as_deref(), Some(" London"));
        let (t, f) = (a.target as usize, a.foil.unwrap() as usize);
        let want = logits[[i, t]] as f64 - logits[[i, f]] as f64;
        assert!((a.logit - want).abs() < 1e-6, "{} vs {want}", a.logit);
        eprintln!(
            "{}: logit(Paris) − logit(London) = {:.3}, shares sum {:.3}",
            rec.id,
            a.logit,
            a.total()
        );
    }
    // France's prompt favours Paris over London more than Germany's does.
    let diff = |i: usize| run.manifest.prompts[i].attribution.as_ref().unwrap().logit;
    assert!(diff(0) > diff(1), "{} vs {}", diff(0), diff(1));
}

/// Targets that are not one token, and options that cannot go with attribution, are refused
/// before anything is traced, with one line that says what to do.
#[test]
fn attribution_refuses_what_it_cannot_decompose() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let base = [
        "trace",
        "-m",
        s(&model),
        "-o",
        s(&out),
        "-p",
        "The capital of France is",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend(extra);
        run_bin(&a)
    };
    let o = with(&["--attribution", "--target", " Parisian capital"]);
    assert_clean_error(&o, "tokens for this model", Some(&out));
    let o = with(&["--attribution", "--target", " Paris", "--foil", " Paris"]);
    assert_clean_error(&o, "foil is the target", Some(&out));
    let o = with(&["--attribution", "--points", "0,5,30"]);
    assert_clean_error(&o, "--points", Some(&out));
    // --target without --attribution is a usage error (clap's, exit 2).
    let o = with(&["--target", " Paris"]);
    assert_eq!(o.status.code(), Some(2));
    // A .jsonl target of several tokens names the prompt.
    let f = dir.path().join("p.jsonl");
    std::fs::write(
        &f,
        "{\"id\": \"a\", \"text\": \"The capital of France is\", \"target\": \" Paris France\"}\n",
    )
    .unwrap();
    let o = run_bin(&[
        "trace",
        "-m",
        s(&model),
        "-o",
        s(&out),
        "-f",
        s(&f),
        "--attribution",
    ]);
    assert_clean_error(&o, "target", Some(&out));
    // A foil that is a prompt's own answer (the default target): that prompt is left out with a
    // note, the others are attributed — the trace does not stop halfway.
    let out2 = dir.path().join("r2");
    let o = run_bin(&[
        "trace",
        "-m",
        s(&model),
        "-o",
        s(&out2),
        "-p",
        "The capital of France is",
        "-p",
        "The capital of Germany is",
        "--attribution",
        "--foil",
        " Paris",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the foil"));
    let run = Run::open(&out2).unwrap();
    assert!(run.manifest.prompts[0].attribution.is_none());
    assert!(run.manifest.prompts[1].attribution.is_some());
    assert!(run.manifest.attribution.as_ref().unwrap().valid);
}

/// The report of an attributed run draws the attribution section, with n stated, and the page
/// reads well in a real headless Chromium.
#[test]
fn the_report_draws_the_attribution_section() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    facts(&model, &[], &out);
    let page = dir.path().join("page.html");
    let o = run_bin(&["report", s(&out), "-o", s(&page)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    // The section's figures, by their titles: n stated; no heads figure without --taps z.
    assert!(
        html.contains("Which blocks write the logit of each prompt") && html.contains("(n = 8)"),
        "no per-block figure stating n"
    );
    assert!(html.contains("Built up through the blocks, by label"));
    assert!(!html.contains("The heads that write"));
    // In Chromium: every figure drawn with finite numbers, no label clipped, no legend over data.
    crate::report::assert_page_reads_well(
        &page,
        &crate::report::shot_path(dir.path(), "attribution"),
    );
}

/// `--taps z` splits each block's attention share by head through the output projection
/// (dequantized by ggml from the file): the heads add up to their block's share where attention
/// writes `W_O z + b` (SmolLM2, Qwen: measured gap 3.8e-4 and 9.2e-4 of Σ|share|, llama.cpp's
/// 8-bit rounding of z before the quantized projection), and do not on Gemma-3, whose
/// post-attention norm follows the projection (measured gap 0.19): there the run says so.
#[test]
fn head_shares_add_up_where_attention_is_the_output_projection() {
    for (name, linear) in [(SMOL, true), (QWEN05, true), (GEMMA, false)] {
        let Some(model) = model_path(name) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let run = facts(&model, &["--taps", "z"], &dir.path().join("r"));
        let info = run.manifest.attribution.clone().unwrap();
        eprintln!(
            "{name}: heads gap {:.2e} (valid {})",
            info.max_heads_gap, info.heads_valid
        );
        assert!(info.valid && info.heads, "{info:?}");
        assert_eq!(info.heads_valid, linear, "{info:?}");
        eprintln!("{name}: projection error {:.2e}", info.max_projection_error);
        if linear {
            assert!(info.max_heads_gap <= RESIDUAL_TOLERANCE / 5.0, "{info:?}");
            assert!(
                info.max_projection_error <= PROJECTION_TOLERANCE / 2.0,
                "{info:?}"
            );
        } else {
            assert!(info.max_heads_gap > 2.0 * RESIDUAL_TOLERANCE, "{info:?}");
            assert!(
                info.max_projection_error > 2.0 * PROJECTION_TOLERANCE,
                "{info:?}"
            );
        }
        let n_layer = run.manifest.model.n_layer;
        for rec in &run.manifest.prompts {
            let a = rec.attribution.as_ref().unwrap();
            assert_eq!(a.heads.len(), n_layer);
            assert_eq!(a.head_bias.len(), n_layer);
            // Heads differ: not one share spread evenly.
            let h = &a.heads[n_layer - 1];
            let (lo, hi) = h
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, u), &v| (l.min(v), u.max(v)));
            assert!(hi - lo > 1e-3, "{name}: {h:?}");
        }
    }
}
