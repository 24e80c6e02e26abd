//! Interventions written into the residual stream during a trace (`trace --ablate`): the write
//! reaches the next block, and nothing before it changes.

use std::path::Path;

use ndarray::{Array2, Array3, Axis};
use ndarray_npy::read_npy;

use super::common::*;
use crate::require;

/// Trace `args` on SmolLM2 into `out` (the refusal prompts, chat, last position).
fn trace_refusal(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "trace",
        "-m",
        s(model),
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/prompts/refusal.jsonl"),
        "--chat",
        "--positions",
        "last",
        "--threads",
        "2",
        "-o",
        s(out),
    ];
    args.extend_from_slice(extra);
    let o = run_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn last(run: &Path) -> Array3<f64> {
    let a: Array3<f32> = read_npy(run.join("last.npy")).unwrap();
    a.mapv(f64::from)
}

fn logits(run: &Path) -> Array2<f32> {
    read_npy(run.join("logits.npy")).unwrap()
}

/// Unit direction of point `p` in a control-vector file (`direction.<p-1>`).
fn unit(file: &Path, p: usize) -> Vec<f64> {
    let g = gguf_trace::llama::gguf::Gguf::open(file).unwrap();
    let d: Vec<f64> = g
        .read_f32(&format!("direction.{}", p - 1))
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let n = d.iter().map(|x| x * x).sum::<f64>().sqrt();
    d.into_iter().map(|x| x / n).collect()
}

/// Largest |h·r̂| / |h| over prompts at point `p`.
fn worst_projection(states: &Array3<f64>, p: usize, r: &[f64]) -> f64 {
    states
        .index_axis(Axis(1), p)
        .outer_iter()
        .map(|h| {
            let dot: f64 = h.iter().zip(r).map(|(a, b)| a * b).sum();
            dot.abs() / h.iter().map(|x| x * x).sum::<f64>().sqrt()
        })
        .fold(0f64, f64::max)
}

#[test]
fn ablation_removes_the_direction_and_changes_only_what_follows() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    trace_refusal(&model, &plain, &[]);
    let cv = dir.path().join("refusal.gguf");
    let o = run_bin(&[
        "direction",
        s(&plain),
        "--labels",
        "harmful,harmless",
        "-o",
        s(&cv),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base = last(&plain);
    let n_points = base.len_of(Axis(1));

    // Every point the file covers (2..=30), each with its own direction: the projection on each
    // point's direction is gone. Measured ≤ 1.5e-8 (f32 rounding of the subtraction); without
    // ablation 0.16 – 0.45.
    let all = dir.path().join("all");
    trace_refusal(
        &model,
        &all,
        &["--ablate", s(&cv), "--ablate-direction", "each"],
    );
    let ablated = last(&all);
    for p in 2..n_points {
        let r = unit(&cv, p);
        let before = worst_projection(&base, p, &r);
        let after = worst_projection(&ablated, p, &r);
        assert!(
            after <= 1e-6,
            "point {p}: |h·r|/|h| = {after:e} after ablation"
        );
        assert!(
            before > 0.05,
            "point {p}: the direction was there ({before})"
        );
    }
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(all.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["capture"]["ablation"]["points"]
            .as_array()
            .unwrap()
            .len(),
        n_points - 2
    );
    // The logits move (measured mean relative L2 change 0.30).
    let (a, b) = (logits(&plain), logits(&all));
    let change: f32 = a
        .outer_iter()
        .zip(b.outer_iter())
        .map(|(x, y)| {
            let d: f32 = x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum();
            (d / x.iter().map(|u| u * u).sum::<f32>()).sqrt()
        })
        .sum::<f32>()
        / a.nrows() as f32;
    assert!(change > 0.05, "ablation changed the logits by {change}");

    // The default: one direction, the peak point's that `direction` records (Arditi et al.),
    // projected out at every point.
    let peak = gguf_trace::llama::gguf::Gguf::open(&cv)
        .unwrap()
        .get_f64(gguf_trace::llama::gguf::PEAK_POINT_KEY)
        .expect("direction records its peak point") as usize;
    let single = dir.path().join("single");
    trace_refusal(&model, &single, &["--ablate", s(&cv)]);
    let single_states = last(&single);
    let r = unit(&cv, peak);
    for p in 2..n_points {
        let after = worst_projection(&single_states, p, &r);
        assert!(
            after <= 1e-6,
            "point {p}: |h·r_peak|/|h| = {after:e} after ablation"
        );
    }
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(single.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["capture"]["ablation"]["direction_point"], peak);

    // The report puts the runs side by side: refusal score (no generation here: none), damage,
    // projections.
    let page = dir.path().join("report.html");
    let o = run_bin(&["report", s(&plain), s(&single), s(&all), "-o", s(&page)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    for needle in [
        "Interventions",
        "Damage per label",
        &format!("point {peak}&#x27;s direction"),
    ] {
        assert!(html.contains(needle), "report lacks {needle:?}");
    }
    // It leads with what changed in the answers: one table, the unmodified run first, a cell
    // marked wherever the most likely token moved, and per condition how many moved — counted
    // here from run.json.
    let body = html.split("<main>").nth(1).unwrap();
    let answers = body.find("<h2>Answers</h2>").expect("an Answers section");
    assert!(answers < body.find("<h2>Interventions</h2>").unwrap());
    assert!(answers < body.find("<figure>").unwrap());
    assert_eq!(body.matches("<table class=\"answers\">").count(), 1);
    let tops = |run: &Path| -> Vec<String> {
        gguf_trace::run::Run::open(run)
            .unwrap()
            .manifest
            .prompts
            .iter()
            .map(|p| p.top[0].piece.clone())
            .collect()
    };
    let base_top = tops(&plain);
    let mut marked = 0;
    for (run, name) in [(&single, "single"), (&all, "all")] {
        let moved = tops(run)
            .iter()
            .zip(&base_top)
            .filter(|(a, b)| a != b)
            .count();
        marked += moved;
        let line = format!(
            "the most likely token differs from SmolLM2-135M-Instruct.Q4_1.gguf · plain in {moved} of {} prompts",
            base_top.len()
        );
        assert!(
            body.contains(&line),
            "no line {line:?} for {name}: {:?}",
            body.split("differs from")
                .skip(1)
                .map(|t| &t[..60.min(t.len())])
                .collect::<Vec<_>>()
        );
    }
    // Ablation moves answers (measured: 20 of 52 with the peak point's direction, 42 of 52 with
    // every point's own).
    assert!(marked > 0, "no ablation moved an answer");
    assert_eq!(body.matches("<td class=\"changed\">").count(), marked);
    crate::report::assert_page_reads_well(
        &page,
        &crate::report::shot_path(dir.path(), "interventions"),
    );

    // Calibrated steering, a list of scales in one command: one run per value; scale 0 is the
    // identity, the default point is the direction's peak, and the report draws the dose-response.
    let steer = dir.path().join("steer");
    trace_refusal(
        &model,
        &steer,
        &["--control-vector", s(&cv), "--control-scale", "0,1"],
    );
    let (s0, s1) = (
        dir.path().join("steer-scale0"),
        dir.path().join("steer-scale1"),
    );
    assert_same_data(&s0, &plain);
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s1.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["capture"]["control_points"],
        serde_json::json!([peak, peak])
    );
    assert_eq!(run["capture"]["control_scale"], 1.0);
    let o = run_bin(&[
        "report",
        s(&plain),
        s(&s0),
        s(&s1),
        "-o",
        s(&page),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("Dose–response of refusal.gguf"),
        "no dose-response figure"
    );

    // One point: everything before it is bit-identical, it has no projection left, and the
    // next block reads the ablated state (measured relative change at point 11: 0.137).
    let one = dir.path().join("one");
    trace_refusal(
        &model,
        &one,
        &[
            "--ablate",
            s(&cv),
            "--ablate-points",
            "10",
            "--ablate-direction",
            "each",
        ],
    );
    let at10 = last(&one);
    for p in 0..10 {
        assert_eq!(
            at10.index_axis(Axis(1), p),
            base.index_axis(Axis(1), p),
            "point {p} before the ablation changed"
        );
    }
    assert!(worst_projection(&at10, 10, &unit(&cv, 10)) <= 1e-6);
    let moved = at10
        .index_axis(Axis(1), 11)
        .outer_iter()
        .zip(base.index_axis(Axis(1), 11).outer_iter())
        .map(|(x, y)| {
            let d: f64 = x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum();
            (d / y.iter().map(|v| v * v).sum::<f64>()).sqrt()
        })
        .fold(0f64, f64::max);
    assert!(
        moved > 1e-2,
        "point 11 moved by {moved}: the write did not reach block 10"
    );

    // A zero direction is the identity: states and logits bit-identical.
    let zero = dir.path().join("zero.gguf");
    let width = base.len_of(Axis(2));
    gguf_trace::llama::gguf::write_control_vector(
        &zero,
        "llama",
        &(1..n_points - 1)
            .map(|il| (il, vec![0f32; width]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let z = dir.path().join("z");
    trace_refusal(&model, &z, &["--ablate", s(&zero)]);
    assert_same_data(&z, &plain);

    // Bad input: one clear line, nothing written.
    let bad = dir.path().join("bad");
    for (args, needle) in [
        (
            vec!["--ablate-points", "3"],
            "--ablate-points and --ablate-direction need --ablate",
        ),
        (
            vec!["--ablate", s(&cv), "--ablate-direction", "up"],
            "expected a point number or \"each\"",
        ),
        (
            vec!["--ablate", s(&cv), "--control-vector", s(&cv)],
            "is both steered (--control-points",
        ),
        (
            vec!["--ablate", s(&cv), "--ablate-points", "1"],
            "no direction for point 1 (the file has points 2-30)",
        ),
    ] {
        let mut a = vec!["trace", "-m", s(&model), "-p", "hi", "-o", s(&bad)];
        a.extend(args);
        assert_clean_error(&run_bin(&a), needle, Some(&bad));
    }
}

fn trace_texts(model: &Path, texts: &[&str], out: &Path, extra: &[&str]) {
    let mut args = vec!["trace", "-m", s(model), "--threads", "2", "-o", s(out)];
    for t in texts {
        args.extend(["-p", *t]);
    }
    args.extend_from_slice(extra);
    let o = run_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn states(run: &Path, i: usize) -> Array3<f32> {
    read_npy(run.join(format!("states/{i:05}.npy"))).unwrap()
}

#[test]
fn activation_patching_replaces_states_and_the_next_blocks_read_them() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    // Twins of the same token counts.
    let a_texts = [
        "The capital of France is",
        "Water boils at a temperature of",
    ];
    let b_texts = [
        "The capital of Italy is",
        "Water freezes at a temperature of",
    ];
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    trace_texts(&model, &a_texts, &a, &[]);
    trace_texts(&model, &b_texts, &b, &[]);

    // Patching every point and position from a run of the same prompts is the identity.
    let aa = dir.path().join("aa");
    trace_texts(
        &model,
        &a_texts,
        &aa,
        &["--patch-from", s(&a), "--patch-points", "all"],
    );
    assert_same_data(&aa, &a);

    // The last position at the last point from B into A: B's next-token distribution (measured
    // bit-identical; A's own logits differ from B's by up to 11.5).
    let ab = dir.path().join("ab");
    let last = "30";
    trace_texts(
        &model,
        &a_texts,
        &ab,
        &[
            "--patch-from",
            s(&b),
            "--patch-points",
            last,
            "--patch-positions",
            "last",
        ],
    );
    let (lab, lb, la) = (logits(&ab), logits(&b), logits(&a));
    let diff = |x: &Array2<f32>, y: &Array2<f32>| {
        x.iter()
            .zip(y)
            .map(|(u, v)| (u - v).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        diff(&lab, &lb) <= 1e-4,
        "patched logits differ from B's by {}",
        diff(&lab, &lb)
    );
    assert!(
        diff(&la, &lb) > 1.0,
        "A and B must differ for this to mean anything"
    );
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ab.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["capture"]["patch"]["points"], serde_json::json!([30]));
    assert_eq!(run["capture"]["patch"]["positions"], "last");

    // Every position at point 5: earlier points are A's, point 5 is B's, and the blocks after it
    // read B's states (every later point equals B's: measured bit-identical).
    let ab5 = dir.path().join("ab5");
    trace_texts(
        &model,
        &a_texts,
        &ab5,
        &["--patch-from", s(&b), "--patch-points", "5"],
    );
    for i in 0..2 {
        let (sa, sb, s5) = (states(&a, i), states(&b, i), states(&ab5, i));
        for p in 0..5 {
            assert_eq!(
                s5.index_axis(Axis(0), p),
                sa.index_axis(Axis(0), p),
                "point {p}"
            );
        }
        assert_eq!(s5.index_axis(Axis(0), 5), sb.index_axis(Axis(0), 5));
        let later = s5
            .slice(ndarray::s![6.., .., ..])
            .iter()
            .zip(sb.slice(ndarray::s![6.., .., ..]))
            .map(|(u, v)| (u - v).abs())
            .fold(0f32, f32::max);
        assert!(
            later <= 1e-4,
            "prompt {i}: points after 5 differ from B's by {later}"
        );
    }

    // Several groups and ubatches (one prompt per group, ubatches of 3 tokens): the row offsets
    // of every ubatch and the prompt of every group line up, so self-patching is still the
    // identity.
    let small = ["--n-seq", "1", "--ubatch-size", "3", "--batch-size", "3"];
    let three = [a_texts[0], a_texts[1], b_texts[1]];
    let (a3, aa3) = (dir.path().join("a3"), dir.path().join("aa3"));
    trace_texts(&model, &three, &a3, &small);
    let mut patched = small.to_vec();
    patched.extend(["--patch-from", s(&a3), "--patch-points", "all"]);
    trace_texts(&model, &three, &aa3, &patched);
    assert_same_data(&aa3, &a3);
    // The identity alone would pass if nothing were written back: in the same layout, patching
    // point 5 from other prompts of the same token counts makes every later point theirs (every
    // ubatch's rows written back where they belong; measured bit-identical, bound 1e-4).
    let other = [b_texts[0], b_texts[1], a_texts[1]];
    let (b3, ab3) = (dir.path().join("b3"), dir.path().join("ab3"));
    trace_texts(&model, &other, &b3, &small);
    let mut patched = small.to_vec();
    patched.extend(["--patch-from", s(&b3), "--patch-points", "5"]);
    trace_texts(&model, &three, &ab3, &patched);
    for i in 0..3 {
        let (s3, sb, sp) = (states(&a3, i), states(&b3, i), states(&ab3, i));
        let gap = |x: &ndarray::Array3<f32>, y: &ndarray::Array3<f32>| {
            x.slice(ndarray::s![5.., .., ..])
                .iter()
                .zip(y.slice(ndarray::s![5.., .., ..]))
                .map(|(u, v)| (u - v).abs())
                .fold(0f32, f32::max)
        };
        assert!(
            gap(&sp, &sb) <= 1e-4,
            "prompt {i}: points 5.. differ from the source's by {}",
            gap(&sp, &sb)
        );
        if i < 2 {
            assert!(
                gap(&s3, &sb) > 1.0,
                "prompt {i}: the twins must differ for this to mean anything"
            );
        }
    }

    // Bad input: one clear line, nothing written.
    let bad = dir.path().join("bad");
    let c = dir.path().join("c");
    let b_last = dir.path().join("b_last");
    trace_texts(&model, &b_texts, &b_last, &["--positions", "last"]);
    trace_texts(&model, &["Hi"], &c, &["--points", "0-3"]);
    for (texts, args, needle) in [
        (
            &a_texts[..],
            vec!["--patch-points", "3"],
            "--patch-points and --patch-positions need --patch-from",
        ),
        (
            &a_texts[..],
            vec!["--patch-from", s(&b)],
            "--patch-from needs --patch-points",
        ),
        (
            &["The capital of Germany is not"][..],
            vec!["--patch-from", s(&b), "--patch-points", "3"],
            "prompt 0 has 6 tokens here and 5 there",
        ),
        (
            &["Hi"][..],
            vec!["--patch-from", s(&c), "--patch-points", "9"],
            "the run does not hold point 9 (its points: 0-3)",
        ),
        (
            &a_texts[..],
            vec![
                "--patch-from",
                s(&dir.path().join("nope")),
                "--patch-points",
                "3",
            ],
            "--patch-from",
        ),
        (
            &a_texts[..],
            vec![
                "--patch-from",
                s(&b),
                "--patch-points",
                "3",
                "--patch-positions",
                "0,last",
            ],
            "\"last\" stands alone",
        ),
        (
            &a_texts[..],
            vec![
                "--patch-from",
                s(&b),
                "--patch-points",
                "3",
                "--patch-positions",
                "5",
            ],
            "position 5 is past the end of prompt 0 (5 tokens)",
        ),
        (
            &a_texts[..],
            vec![
                "--patch-from",
                s(&b),
                "--patch-points",
                "3",
                "--patch-positions",
                "0-99999999999",
            ],
            "--patch-positions: position 99999999999 is out of range",
        ),
        (
            &a_texts[..],
            vec!["--patch-from", s(&b_last), "--patch-points", "3"],
            "prompt 0 there holds no state at position 0",
        ),
    ] {
        let mut full = vec!["trace", "-m", s(&model), "-o", s(&bad)];
        for t in texts {
            full.extend(["-p", *t]);
        }
        full.extend(args);
        assert_clean_error(&run_bin(&full), needle, Some(&bad));
    }
}

/// Causal tracing on a factual prompt. Measured on SmolLM2 ("The Eiffel Tower is located in the
/// city of" → " Paris", P = 0.719; corrupted subject "The Colosseum": P(" Paris") < 0.001): the
/// answer is carried by the subject's distinguishing token ("iffel", position 2) at points 0–23
/// (up to P = 0.79 at points 8–9), then from point 24 on by the last position only (0.43 – 0.72).
/// The attention and MLP rows separate the two: the MLPs of early blocks at the subject, attention
/// of late blocks at the last position.
#[test]
fn causal_tracing_finds_the_subject_then_the_last_position() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("patch.html");
    let o = run_bin(&[
        "patch",
        "-m",
        s(&model),
        "--clean",
        "The Eiffel Tower is located in the city of",
        "--corrupt",
        "The Colosseum is located in the city of",
        // One thread: 910 small decodes, and ggml's worker threads spin while they wait, which on
        // two cores shared with the other tests costs far more than it saves.
        "--threads",
        "1",
        "-o",
        s(&page),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("answer \" Paris\""), "{err}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<meta name=\"generator\" content=\"gguf-trace"));
    // Both prompts' answers, in the terminal and first on the page (no empty Runs table).
    assert!(err.contains("clean → ␣Paris "), "{err}");
    assert!(err.contains("corrupted → "), "{err}");
    let body = html.split("<main>").nth(1).unwrap();
    assert!(
        body.contains("<td><code>␣Paris</code> "),
        "the page lacks the clean answer"
    );
    assert!(!body.contains("<h2>Runs</h2>") && !html.contains("0 run(s)"));
    crate::report::assert_page_reads_well(&page, &crate::report::shot_path(dir.path(), "patch"));
    let mut rdr = csv::Reader::from_path(dir.path().join("patch.csv")).unwrap();
    let mut p = vec![vec![0f64; 10]; 31];
    // The residual row, and the attention and MLP rows (block at the window's centre).
    let mut rows = std::collections::BTreeMap::<String, Vec<Vec<f64>>>::new();
    for r in rdr.records() {
        let r = r.unwrap();
        let (pt, pos): (usize, usize) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        let v: f64 = r[5].parse().unwrap();
        if &r[0] == "resid" {
            p[pt][pos] = v;
        } else {
            rows.entry(r[0].to_string())
                .or_insert_with(|| vec![vec![f64::NAN; 10]; 30])[pt][pos] = v;
        }
    }
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["attn_out", "mlp_out"],
        "the attention and MLP rows"
    );
    assert!(
        rows.values().flatten().flatten().all(|v| v.is_finite()),
        "a cell of the attention or MLP rows is missing"
    );
    // Meng et al.'s two sites, separated by the attention and MLP rows (10-block windows):
    // restoring the MLPs of early blocks at the subject's token "iffel" (position 2) brings the
    // answer back (measured P 0.19–0.23 for windows centred on blocks 0–5), while restoring
    // attention there does nothing (every cell of blocks 0–11 ≤ 0.0054); late, attention at the
    // last position does (0.52–0.75 for blocks 19–21).
    let (attn, mlp) = (&rows["attn_out"], &rows["mlp_out"]);
    let best = |row: &[f64]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    };
    for (b, row) in mlp.iter().enumerate().take(6) {
        assert_eq!(best(row), 2, "MLP row, block {b}: {row:?}");
        assert!(row[2] > 0.1, "MLP row, block {b}: {row:?}");
    }
    for (b, row) in attn.iter().enumerate().take(12) {
        assert!(
            row.iter().all(|&v| v < 0.01),
            "attention row, block {b}: {row:?}"
        );
    }
    for (b, row) in attn.iter().enumerate().take(22).skip(19) {
        assert_eq!(best(row), 9, "attention row, block {b}: {row:?}");
        assert!(row[9] > 0.3, "attention row, block {b}: {row:?}");
    }
    let last = 9;
    let argmax = |row: &[f64]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    };
    // Patching the last state restores the clean prediction exactly (P = 0.719 clean).
    assert!(
        p[30][last] > 0.5,
        "P(Paris) with the clean last state: {}",
        p[30][last]
    );
    // Early and middle points: the subject's tokens (positions 1–3 differ between the prompts).
    for (pt, row) in p.iter().enumerate().take(21).skip(1) {
        let j = argmax(row);
        assert!(
            (1..=3).contains(&j),
            "point {pt}: strongest at position {j}"
        );
        assert!(
            row[j] > 0.05,
            "point {pt}: the subject restores only {}",
            row[j]
        );
    }
    // Late points: the last position, by a margin — an argmax alone would also pick it from a row
    // of equal values (Iterator::max_by keeps the last maximum), as a patch that wrote nothing
    // gives. Measured: P(Paris) 0.427–0.719 at points 26–30, every other position ≤ 0.0043.
    for (pt, row) in p.iter().enumerate().skip(26) {
        assert!(
            row[last] > 0.3,
            "point {pt}: the last state restores only {}",
            row[last]
        );
        assert!(row[..last].iter().all(|&v| v < 0.05), "point {pt}: {row:?}");
    }
    // The hand-over happens once, between points 21 and 26 (measured: at 24).
    let handover = (0..31).find(|&pt| argmax(&p[pt]) == last).unwrap();
    assert!(
        (21..=26).contains(&handover),
        "hand-over at point {handover}"
    );
}
