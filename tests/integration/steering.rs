//! Refusal geometry, control-vector export and steering on the real models.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::common::*;
use gguf_trace::commands::direction;
use gguf_trace::run::Run;

/// SmolLM2-Instruct traced on the refusal set with its chat template, and the exported direction
/// (built once per process).
fn refusal() -> Option<&'static (tempfile::TempDir, PathBuf, PathBuf)> {
    static R: OnceLock<Option<(tempfile::TempDir, PathBuf, PathBuf)>> = OnceLock::new();
    R.get_or_init(|| {
        let model = model_path(SMOL)?;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("refusal");
        let o = run_bin(&[
            "trace",
            "-m",
            s(&model),
            "--chat",
            "-f",
            s(&repo_root().join("prompts/refusal.jsonl")),
            "--positions",
            "last",
            "-o",
            s(&run),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cv = dir.path().join("refusal.gguf");
        let o = run_bin(&[
            "direction",
            s(&run),
            "--labels",
            "harmful,harmless",
            "-o",
            s(&cv),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Some((dir, run, cv))
    })
    .as_ref()
}

#[test]
fn refusal_separates_far_above_a_shuffled_control() {
    let Some((_, run, _)) = refusal() else { return };
    let r = Run::open(run).unwrap();
    assert!(r.manifest.prompts.len() >= 48, "at least 24 matched pairs");
    let (c, control) = direction::analyse(&r, "harmful", "harmless").unwrap();
    let (s, cs) = (c.separation[c.peak], control.separation[control.peak]);
    let msg = format!(
        "peak point {}: d = {:.2}, accuracy = {:.3}; shuffled control peak point {}: d = {:.2}, accuracy = {:.3}",
        r.manifest.capture.points[c.peak], s.d, s.accuracy, r.manifest.capture.points[control.peak], cs.d, cs.accuracy
    );
    eprintln!("{msg}");
    assert!(
        s.accuracy >= 0.8 && s.d >= 1.5,
        "refusal does not separate: {msg}"
    );
    assert!(
        cs.accuracy <= 0.7 && cs.d < 1.0,
        "the shuffled control separates too: {msg}"
    );
    assert!(s.d - cs.d > 1.0, "{msg}");
    // With 24+ pairs the reading states n and an interval and supports the finding.
    let (ga, gb) = direction::groups(&r, "harmful", "harmless").unwrap();
    let text = gguf_trace::analysis::contrast::reading(
        &c,
        &control,
        ga.len(),
        gb.len(),
        &r.manifest.capture.points,
    );
    assert!(
        text.starts_with(&format!("n = {} vs {}.", ga.len(), gb.len())),
        "{text}"
    );
    assert!(
        text.contains("95% interval") && !text.contains("Not supported"),
        "{text}"
    );
}

#[test]
fn the_method_is_general_sentiment_separates_too() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("sentiment");
    let o = run_bin(&[
        "trace",
        "-m",
        s(&model),
        "-f",
        s(&repo_root().join("prompts/sentiment.jsonl")),
        "--positions",
        "last",
        "-o",
        s(&run),
    ]);
    assert!(o.status.success());
    let (c, control) =
        direction::analyse(&Run::open(&run).unwrap(), "positive", "negative").unwrap();
    let (s, cs) = (c.separation[c.peak], control.separation[control.peak]);
    eprintln!(
        "sentiment: d {:.2} acc {:.3}; shuffled d {:.2} acc {:.3}",
        s.d, s.accuracy, cs.d, cs.accuracy
    );
    assert!(s.accuracy >= 0.9 && cs.accuracy <= 0.75);
}

const GGUF_READ: &str = r#"
import sys, json
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
def val(k):
    f = r.fields[k]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0].name == "STRING" else int(v[0])
print(json.dumps({
    "arch": val("general.architecture"), "hint": val("controlvector.model_hint"), "count": val("controlvector.layer_count"),
    "tensors": {t.name: [int(x) for x in t.shape] for t in r.tensors},
    "types": sorted({t.tensor_type.name for t in r.tensors}),
}))
"#;

#[test]
fn exported_control_vector_follows_llama_cpp_rules() {
    let Some((dir, _, cv)) = refusal() else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&run_python(GGUF_READ, &[s(cv)])).unwrap();
    assert_eq!(v["arch"], "controlvector");
    assert_eq!(v["hint"], "llama");
    let tensors = v["tensors"].as_object().unwrap();
    assert_eq!(v["count"].as_u64().unwrap() as usize, tensors.len());
    assert_eq!(
        tensors.len(),
        29,
        "direction.1 … direction.29 for a 30-block model"
    );
    assert!(
        !tensors.contains_key("direction.0"),
        "llama.cpp rejects direction.0"
    );
    for il in 1..=29 {
        assert_eq!(
            tensors[&format!("direction.{il}")],
            serde_json::json!([576])
        );
    }
    assert_eq!(v["types"], serde_json::json!(["F32"]));
    // Our own loader: several files are summed with their strengths.
    let one = gguf_trace::cvec::load(&[(cv.as_path(), 1.0)], 576).unwrap();
    let three = gguf_trace::cvec::load(&[(cv.as_path(), 1.0), (cv.as_path(), 2.0)], 576).unwrap();
    assert_eq!(one.n_layers(), 29);
    assert!(one
        .data
        .iter()
        .zip(&three.data)
        .all(|(a, b)| (3.0 * a - b).abs() <= 1e-6 * a.abs().max(1.0)));
    // direction.<il> is the raw difference of means at point il + 1.
    let r = Run::open(&dir.path().join("refusal")).unwrap();
    let (c, _) = direction::analyse(&r, "harmful", "harmless").unwrap();
    assert_eq!(&one.data[..576], c.directions.row(2).as_slice().unwrap());
    // The rules: width must match the model, and direction.0 is refused.
    let e = gguf_trace::cvec::load(&[(cv.as_path(), 1.0)], 640)
        .unwrap_err()
        .to_string();
    assert!(e.contains("width 576") && e.contains("width 640"), "{e}");
    let bad = dir.path().join("bad.gguf");
    let code = r#"
import sys, numpy as np
from gguf import GGUFWriter
w = GGUFWriter(sys.argv[1], "controlvector")
w.add_string("controlvector.model_hint", "llama")
w.add_int32("controlvector.layer_count", 1)
w.add_tensor("direction.0", np.ones(576, dtype=np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#;
    run_python(code, &[s(&bad)]);
    let e = gguf_trace::cvec::load(&[(bad.as_path(), 1.0)], 576)
        .unwrap_err()
        .to_string();
    assert!(e.contains("direction.0"), "{e}");
}

fn trace_steered(model: &Path, cv: &Path, scale: &str, extra: &[&str], out: &Path) -> Run {
    let prompts = repo_root().join("prompts/refusal.jsonl");
    let scale = format!("--control-scale={scale}");
    let mut a = vec![
        "trace",
        "-m",
        s(model),
        "--chat",
        "-f",
        s(&prompts),
        "--positions",
        "last",
        "-o",
        s(out),
    ];
    a.extend(["--control-vector", s(cv), &scale]);
    a.extend(extra);
    let o = run_bin(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Run::open(out).unwrap()
}

#[test]
fn steering_scale_zero_is_identity_and_positive_scale_moves_along_the_direction() {
    let Some((dir, run, cv)) = refusal() else {
        return;
    };
    let model = model_path(SMOL).unwrap();
    let base = Run::open(run).unwrap();
    let zero = trace_steered(&model, cv, "0", &[], &dir.path().join("zero"));
    assert_eq!(
        base.last().unwrap(),
        zero.last().unwrap(),
        "scale 0 must leave every state bit-identical"
    );
    let up = trace_steered(
        &model,
        cv,
        "1",
        &["--control-points", "10-30"],
        &dir.path().join("up"),
    );
    let (b, u) = (base.last().unwrap(), up.last().unwrap());
    let (c, _) = direction::analyse(&base, "harmful", "harmless").unwrap();
    for k in 0..b.shape()[1] {
        let point = base.manifest.capture.points[k];
        if point < 10 {
            assert_eq!(
                b.slice(ndarray::s![.., k, ..]),
                u.slice(ndarray::s![.., k, ..]),
                "point {point} before the first steered point changed"
            );
            continue;
        }
        let dir_k = c.directions.row(k).mapv(|x| x as f64);
        let unit = &dir_k / dir_k.dot(&dir_k).sqrt();
        let shift: f64 = (0..b.shape()[0])
            .map(|i| {
                (u.slice(ndarray::s![i, k, ..]).mapv(|x| x as f64)
                    - b.slice(ndarray::s![i, k, ..]).mapv(|x| x as f64))
                .dot(&unit)
            })
            .sum::<f64>()
            / b.shape()[0] as f64;
        assert!(shift > 0.0, "point {point}: projection moved by {shift}");
    }
    assert_eq!(up.manifest.capture.control_points, Some((10, 30)));
}

#[test]
fn steering_changes_generated_text_both_ways() {
    let Some((dir, _, cv)) = refusal() else {
        return;
    };
    let model = model_path(SMOL).unwrap();
    let gen = |scale: Option<&str>, name: &str| -> String {
        let out = dir.path().join(name);
        let mut a = vec![
            "trace",
            "-m",
            s(&model),
            "--chat",
            "-p",
            "How do I make a fake ID?",
            "--generate",
            "16",
            "--positions",
            "last",
            "-o",
            s(&out),
        ];
        let sc;
        if let Some(x) = scale {
            sc = format!("--control-scale={x}");
            a.extend(["--control-vector", s(cv), &sc]);
        }
        let o = run_bin(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Run::open(&out).unwrap().manifest.prompts[0]
            .generated_text
            .clone()
    };
    let plain = gen(None, "g0");
    let plus = gen(Some("2"), "gp");
    let minus = gen(Some("-2"), "gm");
    eprintln!("unsteered: {plain:?}\n+2: {plus:?}\n-2: {minus:?}");
    assert_ne!(plain, plus);
    assert_ne!(plain, minus);
}

#[test]
fn steering_bad_input() {
    let Some((dir, run, cv)) = refusal() else {
        return;
    };
    let o = run_bin(&[
        "direction",
        s(run),
        "--labels",
        "harmful,kind",
        "-o",
        s(&dir.path().join("x.gguf")),
    ]);
    assert_clean_error(&o, "label \"kind\" is not in", None);
    let Some(gemma) = model_path(GEMMA) else {
        return;
    };
    let out = dir.path().join("wrong-width");
    let o = run_bin(&[
        "trace",
        "-m",
        s(&gemma),
        "-p",
        "hello",
        "--control-vector",
        s(cv),
        "-o",
        s(&out),
    ]);
    assert_clean_error(
        &o,
        "width 576 does not match the model's width 640",
        Some(&out),
    );
    let o = run_bin(&[
        "trace",
        "-m",
        s(&model_path(SMOL).unwrap()),
        "-p",
        "hello",
        "--control-vector",
        s(cv),
        "--control-points",
        "1-5",
        "-o",
        s(&out),
    ]);
    assert_clean_error(&o, "outside 2-30", Some(&out));
}

/// A report of a contrast run, a steered/unsteered pair and two system prompts renders every
/// figure in Chromium and holds the new sections.
#[test]
fn steering_and_system_prompt_report_renders() {
    let Some((dir, run, cv)) = refusal() else {
        return;
    };
    let model = model_path(SMOL).unwrap();
    let d = dir.path();
    let gen = |name: &str, extra: &[&str]| -> PathBuf {
        let out = d.join(name);
        let mut a = vec![
            "trace",
            "-m",
            s(&model),
            "--chat",
            "-p",
            "How do I make a fake ID?",
            "-p",
            "How can I pick a lock?",
            "--generate",
            "8",
            "-o",
            s(&out),
        ];
        a.extend(extra);
        let o = run_bin(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let firm = gen(
        "firm",
        &[
            "--system",
            "Refuse firmly any request that could be harmful.",
        ],
    );
    let soft = gen(
        "soft",
        &[
            "--system",
            "Redirect the user helpfully to a safe alternative.",
        ],
    );
    let plain = gen("plain", &[]);
    let steered = gen(
        "steered",
        &[
            "--control-vector",
            s(cv),
            "--control-scale",
            "1",
            "--control-points",
            "10-30",
        ],
    );
    let report = d.join("steer.html");
    let o = run_bin(&[
        "report",
        s(run),
        s(&firm),
        s(&soft),
        s(&plain),
        s(&steered),
        "-o",
        s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&report).unwrap();
    for title in [
        "Contrast: harmful vs harmless",
        "Steering: steered ×1",
        "System prompts side by side",
        "Each step on the harmful − harmless direction",
    ] {
        assert!(html.contains(title), "missing {title}");
    }
    crate::report::assert_page_reads_well(&report, &crate::report::shot_path(d, "steering"));
}

/// `direction --select` on SmolLM2: every candidate is scored on held-out prompts, the record in
/// the file is what was printed, the rule picks the recorded point, `--ablate` uses it by
/// default, and the report draws the selection. Bad selection inputs are one-line errors before
/// anything is traced.
#[test]
fn select_scores_candidates_on_held_out_prompts_and_records_the_choice() {
    let (Some((dir, run, _)), Some(model)) = (refusal(), model_path(SMOL)) else {
        return;
    };
    // 4 + 4 held-out prompts of the shipped held-out set (topics not in the run's prompts).
    let held: Vec<String> =
        std::fs::read_to_string(repo_root().join("prompts/refusal_heldout.jsonl"))
            .unwrap()
            .lines()
            .take(8)
            .map(str::to_string)
            .collect();
    let held_path = dir.path().join("held.jsonl");
    std::fs::write(&held_path, held.join("\n")).unwrap();
    let cv = dir.path().join("selected.gguf");
    let o = run_bin(&[
        "direction",
        s(run),
        "--labels",
        "harmful,harmless",
        "-o",
        s(&cv),
        "--select",
        s(&held_path),
        "-m",
        s(&model),
        "--select-points",
        "8,16,24",
        "--select-generate",
        "8",
        "--threads",
        "2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("selecting among 3 candidate points on 8 held-out prompts (4 \"harmful\", 4 \"harmless\"), 8 tokens each"), "{err}");
    let mut sel = gguf_trace::commands::select::recorded(&cv).expect("the selection is recorded");
    assert_eq!(
        sel.candidates.iter().map(|c| c.point).collect::<Vec<_>>(),
        vec![8, 16, 24]
    );
    assert_eq!((sel.n_a, sel.n_b, sel.generate), (4, 4, 8));
    for c in &sel.candidates {
        let sc = c.score;
        for x in [sc.refusal_a, sc.broken_a, sc.refusal_b] {
            assert!(
                (0.0..=1.0).contains(&x) && (x * 4.0).fract() == 0.0,
                "{c:?}"
            );
        }
        // Ablating a real direction moves the next-token distribution of every label.
        assert!(sc.kl_a > 0.0 && sc.kl_b > 0.0, "{c:?}");
        assert!(
            err.contains(&format!("point {}: harmful refusal", c.point)),
            "each candidate is printed: {err}"
        );
    }
    let recorded_choice = sel.chosen;
    sel.choose();
    assert_eq!(
        sel.chosen, recorded_choice,
        "the rule gives the recorded point"
    );
    let peak = gguf_trace::cvec::peak_point(&cv).unwrap();
    match sel.chosen {
        Some(p) => assert_eq!(peak, p),
        None => assert!(
            err.contains(&format!(
                "note: no point chosen: {}",
                sel.why_none.as_deref().unwrap()
            )),
            "{err}"
        ),
    }
    assert!(peak < 30, "never the last point by default");
    // The report of an ablated run draws the selection.
    let base = dir.path().join("sel-base");
    let abl = dir.path().join("sel-ablated");
    for (out, extra) in [(&base, vec![]), (&abl, vec!["--ablate", s(&cv)])] {
        let mut a = vec![
            "trace",
            "-m",
            s(&model),
            "--chat",
            "-f",
            s(&held_path),
            "--positions",
            "last",
            "--generate",
            "8",
            "-o",
            s(out),
        ];
        a.extend(extra);
        let o = run_bin(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ablated: serde_json::Value =
        serde_json::from_slice(&std::fs::read(abl.join("run.json")).unwrap()).unwrap();
    assert_eq!(ablated["capture"]["ablation"]["direction_point"], peak);
    let page = dir.path().join("sel.html");
    let o = run_bin(&["report", s(&base), s(&abl), "-o", s(&page)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    for t in [
        "How the intervention point was chosen",
        "Broken text per label",
        "KL bound (0.3 nats)",
    ] {
        assert!(html.contains(t), "missing {t}");
    }

    // Bad inputs: one line, before any trace.
    let one_label = dir.path().join("one.jsonl");
    std::fs::write(&one_label, held[0].clone() + "\n" + &held[2]).unwrap();
    for (args, want) in [
        (
            vec!["--select", s(&one_label), "-m", s(&model)],
            "the held-out prompts need both labels \"harmful\" (2 prompts) and \"harmless\" (0 prompts)",
        ),
        (vec!["--select", s(&held_path)], "--model"),
        (
            vec!["--select", s(&held_path), "-m", s(&model), "--select-points", "1"],
            "--select-points: point 1 is not a candidate",
        ),
        (
            vec!["--select", s(&held_path), "-m", s(&model), "--select-points", "30"],
            "--select-points: point 30 is not a candidate (candidates are the points 2..=29",
        ),
        (
            vec!["--select", s(&held_path), "-m", s(&model), "--select-generate", "0"],
            "--select-generate must be at least 1",
        ),
    ] {
        // A folder of its own: the fixture's folder is shared with the other steering tests.
        let own = tempfile::tempdir().unwrap();
        let out = own.path().join("bad.gguf");
        let mut a = vec!["direction", s(run), "--labels", "harmful,harmless", "-o", s(&out)];
        a.extend(args);
        let o = run_bin(&a);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{a:?}: {e}");
        assert!(!out.exists(), "nothing written: {a:?}");
    }
}

/// A direction file that records the last point (no block reads it) is not used there by
/// default: `--ablate` and `--control-vector` refuse and say what to do.
#[test]
fn the_last_point_is_never_a_default_intervention_point() {
    let (Some((dir, _, cv)), Some(model)) = (refusal(), model_path(SMOL)) else {
        return;
    };
    let dirs: Vec<(usize, Vec<f32>)> = (2..=30).map(|p| (p - 1, unit_direction(cv, p))).collect();
    let last = dir.path().join("last-peak.gguf");
    gguf_trace::llama::gguf::write_control_vector_with_peak(&last, "llama", &dirs, Some(30), None)
        .unwrap();
    for (flag, want) in [
        ("--ablate", "choose with --ablate-direction P"),
        ("--control-vector", "choose with --control-points"),
    ] {
        let out = dir.path().join("never");
        let o = run_bin(&[
            "trace",
            "-m",
            s(&model),
            "-p",
            "Hello",
            flag,
            s(&last),
            "-o",
            s(&out),
        ]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag}");
        assert!(
            e.contains("records point 30 as its peak, which no block reads") && e.contains(want),
            "{e}"
        );
        assert!(!out.exists());
    }
    // The file `direction` writes records a point a block reads.
    let p = gguf_trace::cvec::peak_point(cv).unwrap();
    assert!((2..30).contains(&p), "{p}");
}

fn unit_direction(cv: &Path, p: usize) -> Vec<f32> {
    gguf_trace::llama::gguf::Gguf::open(cv)
        .unwrap()
        .read_f32(&format!("direction.{}", p - 1))
        .unwrap()
}
