//! Quantization ladder: `quantize` and `compare` on SmolLM2, drift ordered as precision.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::common::*;
use crate::require;

/// A ladder built once per process: F32 from the Q4_1 source (its exact reference), then Q8_0,
/// Q4_K_M and Q2_K quantized from the F32 file.
fn ladder() -> Option<&'static [PathBuf]> {
    static L: OnceLock<Option<(tempfile::TempDir, Vec<PathBuf>)>> = OnceLock::new();
    L.get_or_init(|| {
        let src = model_path(SMOL)?;
        let dir = tempfile::tempdir().unwrap();
        let o = run_bin(&["quantize", s(&src), "--type", "f32", "-o", s(dir.path())]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("already quantized") && err.contains("requantized from Q4_1"),
            "{err}"
        );
        let f32_path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let o = run_bin(&[
            "quantize",
            s(&f32_path),
            "--type",
            "q8_0,q4_k_m,q2_k",
            "-o",
            s(dir.path()),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        // SmolLM2's width 576 is not divisible by 256: its "Q2_K" holds no Q2_K tensor at all.
        assert!(
            err.contains("Q2_K - Medium — real tensor mix: Q4_0: 180, F32: 61, Q3_K: 30"),
            "{err}"
        );
        let mut files = vec![f32_path];
        files.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from),
        );
        Some((dir, files))
    })
    .as_ref()
    .map(|(_, f)| f.as_slice())
}

fn csv_rows(p: &Path) -> Vec<csv::StringRecord> {
    let mut r = csv::Reader::from_path(p).unwrap();
    r.records().map(|x| x.unwrap()).collect()
}

#[test]
fn ladder_drift_and_kl_order_by_precision() {
    let Some(files) = ladder() else { return };
    assert_eq!(files.len(), 4);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Models in shuffled order: the reference is found by precision, not by position.
    let o = run_bin(&[
        "compare",
        "-m",
        s(&files[3]),
        "-m",
        s(&files[1]),
        "-m",
        s(&files[0]),
        "-m",
        s(&files[2]),
        "-f",
        s(&root.join("prompts/paraphrases.txt")),
        "-f",
        s(&root.join("prompts/facts.jsonl")),
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The page and its tables name the runs where they are, never the staging they were read from.
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        if e.path().is_file() {
            let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
            assert!(
                !text.contains(".gguf-trace-"),
                "{} names a staging path",
                e.path().display()
            );
        }
    }
    let drift = csv_rows(&out.join("report.drift.csv"));
    let last_err = |ft: &str| -> f64 {
        let r = drift
            .iter()
            .find(|r| &r[1] == ft && &r[4] == "30")
            .unwrap_or_else(|| panic!("no row for {ft}"));
        r[9].parse().unwrap()
    };
    let (q8, q4, q2, reference) = (
        last_err("Q8_0"),
        last_err("Q4_K - Medium"),
        last_err("Q2_K - Medium"),
        last_err("all F32"),
    );
    eprintln!("last-point relative error: Q8_0 {q8:.4}, Q4_K_M {q4:.4}, Q2_K {q2:.4}");
    assert!(
        q8 < q4 && q4 < q2,
        "drift must order Q8_0 < Q4_K_M < Q2_K: {q8} {q4} {q2}"
    );
    assert_eq!(
        reference, 0.0,
        "the reference against itself drifts exactly 0"
    );
    for r in drift.iter().filter(|r| &r[1] == "all F32") {
        assert_eq!((&r[3], &r[7], &r[8], &r[9]), ("true", "1", "1", "0"));
    }
    let kl = csv_rows(&out.join("report.kl.csv"));
    let mean_kl = |ft: &str| -> f64 {
        let v: Vec<f64> = kl
            .iter()
            .filter(|r| &r[1] == ft)
            .map(|r| r[4].parse().unwrap())
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (k8, k4, k2, k0) = (
        mean_kl("Q8_0"),
        mean_kl("Q4_K - Medium"),
        mean_kl("Q2_K - Medium"),
        mean_kl("all F32"),
    );
    eprintln!("mean KL: Q8_0 {k8:.5}, Q4_K_M {k4:.5}, Q2_K {k2:.5}");
    assert!(
        k8 < k4 && k4 < k2,
        "KL must order the same way: {k8} {k4} {k2}"
    );
    assert_eq!(k0, 0.0, "KL of the reference against itself is exactly 0");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    // The Answers section compares every level with the reference: as many moved answers as the
    // drift table's top-1 disagreements (counted on token ids there, on token text here).
    for (ft, file) in [("Q8_0", "Q8_0"), ("Q2_K - Medium", "Q2_K")] {
        let moved = kl
            .iter()
            .filter(|r| &r[1] == ft && &r[5] == "false")
            .count();
        let line = format!(
            "SmolLM2-135M-Instruct.{file}.gguf</b>: the most likely token differs from SmolLM2-135M-Instruct.F32.gguf in {moved} of {} prompts",
            kl.iter().filter(|r| &r[1] == ft).count()
        );
        assert!(html.contains(&line), "no {line:?}");
    }
    assert!(html.contains("Quantization drift"));
    // Each per-run view once, with a tab per level, not one repeated section per level.
    let nav = crate::report::nav(&html);
    for view in ["Trajectories", "Per-point geometry", "Per token"] {
        assert_eq!(
            nav.matches(&format!(">{view}</a>")).count(),
            1,
            "{view} once in {nav}"
        );
    }
    let levels = kl
        .iter()
        .map(|r| r[1].to_string())
        .collect::<std::collections::HashSet<_>>();
    let traj = html
        .split(">Trajectories</h2>")
        .nth(1)
        .unwrap()
        .split("<section")
        .next()
        .unwrap();
    assert_eq!(
        traj.matches("role=\"tab\"").count(),
        levels.len(),
        "one tab per level"
    );
    assert!(
        html.contains("Q4_0: 180, F32: 61, Q3_K: 30"),
        "the report shows the real tensor mix"
    );
    crate::report::assert_page_reads_well(
        &out.join("report.html"),
        &crate::report::shot_path(dir.path(), "ladder"),
    );
}

#[test]
fn a_quantized_file_loads_traces_and_inspects_as_requested() {
    let Some(files) = ladder() else { return };
    let q8 = &files[1];
    let o = run_bin(&["inspect", s(q8), "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["file_type"], "Q8_0");
    assert!(v["tensor_types"]["q8_0"].as_u64().unwrap() > 200);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = run_bin(&[
        "trace",
        "-m",
        s(q8),
        "-p",
        "The capital of France is",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = gguf_trace::run::Run::open(&out).unwrap();
    assert_eq!(run.manifest.model.file_type, "Q8_0");
}

#[test]
fn different_models_get_a_side_by_side_report_with_a_note() {
    let (Some(smol), Some(gemma)) = (model_path(SMOL), model_path(GEMMA)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    // The models given positionally, like every one-model command's; answers asked for.
    let o = run_bin(&[
        "compare",
        s(&smol),
        s(&gemma),
        "-p",
        "The capital of France is",
        "-p",
        "Water boils at",
        "-o",
        s(&out),
        "--answers",
        "always",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // stdout: a header naming both runs, a row per prompt with each model's top token as
    // run.json records it, then the report's path (last line, as scripts read it).
    let stdout = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("id") && lines[0].contains("SmolLM2") && lines[0].contains("gemma"),
        "{stdout}"
    );
    for (k, line) in lines[1..3].iter().enumerate() {
        assert!(line.starts_with(&format!("p{k}")), "{stdout}");
        for run in ["SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"] {
            let r = gguf_trace::run::Run::open(&out.join(run)).unwrap();
            let top = &r.manifest.prompts[k].top[0];
            let cell = format!(
                "{} {}",
                gguf_trace::answer::visible(&top.piece),
                gguf_trace::answer::percent(top.p)
            );
            assert!(line.contains(&cell), "{cell} in {stdout}");
        }
    }
    assert_eq!(
        *lines.last().unwrap(),
        out.join("report.html").display().to_string()
    );
    // Both forms at once is refused with the fix: one way to give the models per command line.
    let o = run_bin(&[
        "compare",
        s(&smol),
        "-m",
        s(&gemma),
        "-p",
        "x",
        "-o",
        s(&dir.path().join("no")),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("give the models either as arguments"));
    // The same model twice is refused: it would be compared with itself.
    let o = run_bin(&[
        "compare",
        s(&smol),
        s(&smol),
        "-p",
        "x",
        "-o",
        s(&dir.path().join("no")),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is given twice (models 1 and 2)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dir.path().join("no").exists());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("No quantization-drift section"),
        "the note says why"
    );
    assert!(html.contains("architectures differ (llama vs gemma3)"));
    // Runs named after their model are named once, not "x.gguf · x".
    assert!(
        !html.contains("gguf · SmolLM2"),
        "a run name repeats its model"
    );
    assert!(
        !html.contains("gguf · gemma"),
        "a run name repeats its model"
    );
    assert!(!out.join("report.drift.csv").exists());
    assert!(out.join("report.metrics.csv").exists());
}

#[test]
fn quantize_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let notgguf = dir.path().join("x.gguf");
    std::fs::write(&notgguf, "hello").unwrap();
    let o = run_bin(&[
        "quantize",
        s(&notgguf),
        "--type",
        "q8_0",
        "-o",
        s(dir.path()),
    ]);
    assert_clean_error(&o, "not a GGUF file", None);
    let Some(src) = model_path(SMOL) else { return };
    let o = run_bin(&[
        "quantize",
        s(&src),
        "--type",
        "q8_0,q9_k",
        "-o",
        s(dir.path()),
    ]);
    assert_clean_error(
        &o,
        "unknown quantization type \"q9_k\"; valid types: f32, f16",
        None,
    );
    let o = run_bin(&[
        "quantize",
        s(&src),
        "--type",
        "q8_0",
        "-o",
        "/proc/gguf-trace-quant",
    ]);
    assert_clean_error(
        &o,
        "cannot create output directory /proc/gguf-trace-quant",
        None,
    );
    let o = run_bin(&[
        "compare",
        "-m",
        s(&src),
        "-p",
        "x",
        "-o",
        s(&dir.path().join("c")),
    ]);
    assert_clean_error(&o, "at least two models", None);
}

/// Runs of one model traced with different `--positions` compare the same token positions: the
/// drift of a model against itself is ~0 at every point (matched by position, not by column).
#[test]
fn drift_matches_positions_across_runs_traced_differently() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(
        &prompts,
        "The capital of France is\nA short story about a lighthouse keeper begins",
    )
    .unwrap();
    for (name, pos) in [("all", "all"), ("last", "last")] {
        ok(
            dir.path(),
            &[
                "trace",
                "-m",
                s(&model),
                "-f",
                s(&prompts),
                "--positions",
                pos,
                "-o",
                name,
            ],
        );
    }
    ok(
        dir.path(),
        &[
            "report",
            "all",
            "last",
            "--reference",
            "all",
            "-o",
            "r.html",
        ],
    );
    let rows = csv_rows(&dir.path().join("r.drift.csv"));
    let level: Vec<_> = rows.iter().filter(|r| &r[3] == "false").collect();
    assert_eq!(level.len(), 31, "one row per point for the level");
    for r in level {
        // One compared position per prompt (the last), two prompts.
        assert_eq!(&r[6], "2", "{r:?}");
        let err: f64 = r[9].parse().unwrap();
        // Same model, same tokens: only batch-shape rounding (measured below 1e-5).
        assert!(err < 1e-4, "point {}: relative error {err}", &r[4]);
    }
}

/// Two runs of one model over different prompts are overlaid without a drift note that reads as
/// an error; the relative step is on a log axis (its point-0 jump would flatten the rest).
#[test]
fn same_model_runs_are_overlaid_without_a_drift_note() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("a", "The capital of France is"), ("b", "Water boils at")] {
        ok(
            dir.path(),
            &["trace", "-m", s(&model), "-p", text, "-o", name],
        );
    }
    ok(dir.path(), &["report", "a", "b", "-o", "r.html"]);
    let html = std::fs::read_to_string(dir.path().join("r.html")).unwrap();
    // Two runs of one model file are runs, not models.
    assert!(html.contains("Runs compared") && !html.contains("Models compared"));
    assert!(
        !html.contains("No quantization-drift section"),
        "no error-like note"
    );
    assert!(html.contains("SmolLM2-135M-Instruct.Q4_1.gguf · a"));
    assert!(
        html.contains(r#""type":"log""#),
        "relative step on a log axis"
    );
    // The log axis is labelled with its decades: ticks at powers of ten, written 10^k.
    assert!(
        html.contains(r#""tickmode":"array""#)
            && html.contains(r#""ticktext":["10\u003csup\u003e"#)
    );
    // The 2-D projections keep their proportions.
    assert!(html.contains(r#""scaleanchor":"x","scaleratio":1.0"#));
}
