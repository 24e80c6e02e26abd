//! The report at scale: statistics streamed over prompts agree with their direct definitions on
//! real runs, groups beyond one pass's memory are batched, and a run larger than the memory the
//! report may take renders.

use std::path::Path;

use gguf_trace::analysis::metrics;
use gguf_trace::analysis::pca::{Pca, PcaMethod};
use gguf_trace::report::view::RunView;
use gguf_trace::run::Run;
use ndarray::{Array2, ArrayView1, ArrayView3, Axis};

use crate::common::*;
use crate::require;

fn view(dir: &Path) -> RunView {
    let run = Run::open(dir).unwrap();
    RunView::new(run, &indicatif::ProgressBar::hidden(), "test").unwrap()
}

fn f64s(v: ArrayView1<f32>) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// A(l) by its definition: the mean over pairs of (cos + 1) / 2, O(n²); centered on `center`.
fn alignment_by_pairs(
    last: ArrayView3<f32>,
    members: &[usize],
    center: Option<&Array2<f64>>,
) -> Vec<f64> {
    (0..last.shape()[1])
        .map(|l| {
            let rows: Vec<Vec<f64>> = members
                .iter()
                .map(|&i| {
                    let mut v = f64s(last.slice(ndarray::s![i, l, ..]));
                    if let Some(c) = center {
                        v.iter_mut().zip(c.row(l)).for_each(|(x, m)| *x -= m);
                    }
                    v
                })
                .collect();
            let (mut sum, mut pairs) = (0.0, 0.0);
            for a in 0..rows.len() {
                for b in a + 1..rows.len() {
                    sum += (cos(&rows[a], &rows[b]) + 1.0) / 2.0;
                    pairs += 1.0;
                }
            }
            sum / pairs
        })
        .collect()
}

/// Funnel width by its definition, with an f64 centroid.
fn funnel_direct(last: ArrayView3<f32>, members: &[usize]) -> Vec<f64> {
    (0..last.shape()[1])
        .map(|l| {
            let rows: Vec<Vec<f64>> = members
                .iter()
                .map(|&i| f64s(last.slice(ndarray::s![i, l, ..])))
                .collect();
            let d = rows[0].len();
            let c: Vec<f64> = (0..d)
                .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64)
                .collect();
            let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let dist: f64 = rows
                .iter()
                .map(|r| n(&r.iter().zip(&c).map(|(x, m)| x - m).collect::<Vec<_>>()))
                .sum::<f64>();
            let norm: f64 = rows.iter().map(|r| n(r)).sum();
            dist / norm
        })
        .collect()
}

/// Largest |a − b| over finite pairs; both must be NaN at the same places.
fn max_diff(a: &[f64], b: &[f64], what: &str) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.is_nan(), y.is_nan(), "{what}: {x} vs {y}");
            if x.is_nan() {
                0.0
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f64::max)
}

/// Each group's streamed statistics against their definitions. Tolerances: the pairwise sum and
/// the unit-vector identity round differently (measured ≤ 1e-13 on these runs); 1e-9 leaves room
/// and still catches any wrong member, center or pass.
fn assert_groups_match(v: &RunView, last: ArrayView3<f32>) {
    let center = {
        // The mean in f64 (the report's), not f32's.
        let mut c = Array2::<f64>::zeros((last.shape()[1], last.shape()[2]));
        for h in last.outer_iter() {
            c.zip_mut_with(&h, |s, &x| *s += x as f64);
        }
        c / last.shape()[0] as f64
    };
    let mut worst = 0.0f64;
    for g in &v.groups {
        if g.members.len() < 2 {
            continue;
        }
        let raw = alignment_by_pairs(last, &g.members, None);
        worst = worst.max(max_diff(&g.alignment, &raw, "alignment"));
        // Centered: points where every state equals the mean have no direction (NaN) there.
        let cen = alignment_by_pairs(last, &g.members, Some(&center));
        worst = worst.max(max_diff(&g.alignment_centered, &cen, "centered alignment"));
        let fw = funnel_direct(last, &g.members);
        worst = worst.max(max_diff(&g.funnel_width, &fw, "funnel width"));
    }
    eprintln!("groups: largest difference from the definitions {worst:e}");
    assert!(worst < 1e-9, "{worst:e}");
}

/// On a real SmolLM2 run (labels, lens): every statistic the report streams equals the one
/// computed from the whole array in memory.
#[test]
fn streamed_statistics_equal_their_in_memory_definitions() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let (label, text) = if i % 2 == 0 {
                ("ocean", format!("Describe the ocean at dawn, take {i}."))
            } else {
                ("city", format!("Describe a busy city street, take {i}."))
            };
            serde_json::json!({"text": text, "label": label}).to_string()
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let run = dir.path().join("run");
    ok(
        dir.path(),
        &[
            "trace",
            "-m",
            s(&model),
            "-f",
            s(&prompts),
            "--positions",
            "last",
            "--lens",
            "-o",
            s(&run),
        ],
    );
    let v = view(&run);
    let r = Run::open(&run).unwrap();
    let last = r.last().unwrap();
    let (n, p, d) = last.dim();
    // Metrics: the same function on the same rows: identical.
    for i in 0..n {
        let direct = metrics::trajectory(last.index_axis(Axis(0), i));
        for name in metrics::TrajectoryMetrics::NAMES {
            let (a, b) = (v.metrics[i].get(name), direct.get(name));
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "prompt {i} {name}"
            );
        }
    }
    assert_groups_match(&v, last.view());
    // PCA: the whole array in one chunk vs streamed prompt by prompt; and subspace iteration
    // (the method for wide models) on the same real rows.
    let flat = last.view().into_shape_with_order((n * p, d)).unwrap();
    let whole = Pca::fit(flat, 3).unwrap();
    let sub = Pca::fit_rows(&flat, 3, PcaMethod::Subspace).unwrap();
    for (other, what, tol) in [(&v.pca, "streamed", 1e-9), (&sub, "subspace", 1e-6)] {
        for c in 0..3 {
            let dr = (whole.explained_ratio[c] - other.explained_ratio[c]).abs();
            let cs = whole.components.row(c).dot(&other.components.row(c)).abs();
            eprintln!(
                "PCA {what} component {c}: Δ explained {dr:e}, 1 − |cos| {:e}",
                1.0 - cs
            );
            assert!(dr <= tol && cs >= 1.0 - tol, "{what} component {c}");
        }
    }
    let proj = whole.transform(flat);
    let streamed = v.proj.view().into_shape_with_order((n * p, 3)).unwrap();
    let worst = (&proj - &streamed)
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs()));
    let scale = proj.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(
        worst <= 1e-9 * scale,
        "projections differ by {worst:e} (scale {scale})"
    );
    // Contrast: the difference of group means, and leave-one-out separation at every point.
    let cp = v.contrast.as_ref().expect("two labels of 8 prompts");
    let (a, b) = (&v.groups[0].members, &v.groups[1].members);
    for k in 0..p {
        let x = last.index_axis(Axis(1), k).mapv(|x| x as f64);
        let mean = |m: &[usize]| x.select(Axis(0), m).mean_axis(Axis(0)).unwrap();
        let dir = mean(a) - mean(b);
        let got = cp.contrast.directions.row(k).mapv(|x| x as f64);
        let dd = (&dir - &got).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(dd <= 1e-5 * dir.iter().fold(1e-30f64, |m, x| m.max(x.abs())));
        let sep = gguf_trace::analysis::contrast::loo_separation(x.view(), a, b);
        assert!((sep.d - cp.contrast.separation[k].d).abs() <= 1e-9 * sep.d.abs().max(1.0));
        assert_eq!(sep.accuracy, cp.contrast.separation[k].accuracy);
    }
    // Lens: means and decisions over every prompt; the first prompts kept for drawing.
    let lens = r.lens().unwrap().unwrap();
    let summary = v.lens.as_ref().expect("a valid lens");
    assert_eq!(summary.len(), n);
    for k in 0..p {
        let e = lens
            .iter()
            .map(|l| l.last_prompt().points[k].entropy)
            .sum::<f64>()
            / n as f64;
        assert!((e - summary.mean_entropy[k]).abs() <= 1e-12 * e.abs().max(1.0));
    }
    let decisions: Vec<usize> = lens
        .iter()
        .map(|l| l.last_prompt().decision_point)
        .collect();
    assert_eq!(summary.decisions, decisions);
    assert_eq!(summary.shown.len(), n);
}

/// More groups than one pass's memory holds: the report makes more passes, with the same result.
#[test]
fn many_groups_are_batched_and_still_exact() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 100 labels of 2 prompts at width 4096 × 31 points: 3 MB of sums per group, 2 batches.
    let labels: Vec<String> = (0..100).map(|i| format!("g{i}")).collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    gguf_trace::run::synthetic::write(&run, 200, 30, 4096, &labels, 11).unwrap();
    let per_batch =
        gguf_trace::report::view::GROUP_MEMORY / metrics::GroupAccumulator::bytes(31, 4096);
    assert!(
        per_batch < 100,
        "the test needs several batches ({per_batch} per batch)"
    );
    let v = view(&run);
    assert_eq!(v.groups.len(), 100);
    assert_eq!(
        v.pca.method,
        PcaMethod::Subspace,
        "width 4096 takes subspace iteration"
    );
    let last = Run::open(&run).unwrap().last().unwrap();
    assert_groups_match(&v, last.view());
}

/// A run larger than the memory the report may take renders: `ulimit -d` caps the process's
/// private memory (heap and anonymous maps; the page cache of the files read is not counted) below
/// the size of `last.npy` alone, which the whole-array report needed several times over.
#[test]
fn a_run_larger_than_the_memory_limit_renders() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    gguf_trace::run::synthetic::write_with(
        &run,
        1600,
        30,
        4096,
        &["a", "b"],
        5,
        gguf_trace::run::Dtype::F16,
    )
    .unwrap();
    let last_bytes = std::fs::metadata(run.join("last.npy")).unwrap().len();
    // 640 MiB: what the program needs before any run is read (llama.cpp, OpenBLAS buffers;
    // measured below 350 MiB) plus room for the report, and less than last.npy (812 MB).
    let limit_kib: u64 = 640 * 1024;
    assert!(last_bytes > limit_kib * 1024, "{last_bytes}");
    let report = dir.path().join("r.html");
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -d {limit_kib} && exec \"$0\" report \"$1\" -o \"$2\""
        ))
        .arg(env!("CARGO_BIN_EXE_gguf-trace"))
        .arg(&run)
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "report under a {limit_kib} KiB limit: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let html = std::fs::read_to_string(&report).unwrap();
    // Every 6th prompt drawn (1600 / 300 rounded up), and the page says so.
    assert!(
        html.contains("Showing 267 of 1600 prompts"),
        "thinned and said"
    );
    let rows = std::fs::read_to_string(dir.path().join("r.metrics.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows, 1 + 1600 * 31, "every prompt in the CSV");
}
