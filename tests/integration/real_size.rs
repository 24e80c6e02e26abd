//! Real size: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (an AWQ export, mostly Q5_0) in the normal suite,
//! Qwen2.5-Coder-1.5B-Instruct Q4_K_M in the opt-in tier (`GGUF_TRACE_REAL_SIZE=1 scripts/test`
//! runs the tests marked `#[ignore]` here).
//!
//! What "agrees" means for a quantized file: the reference is HF transformers' own GGUF loader,
//! which dequantizes the same weights and runs them in float64. llama.cpp quantizes the
//! *activations* too (each quantized matmul converts its input to 8-bit blocks, Q8_0/Q8_K), so its
//! states differ from the float64 reference by that rounding, compounded over the blocks: about a
//! percent, not the 1e-7 of the F32 architecture matrix. The bounds below were measured here
//! (printed by each test) and carry a margin; the README's "Exactness" section has the figures.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{s, Array2, Array3, ArrayView1, Axis};
use ndarray_npy::read_npy;

use crate::common::*;

pub const QWEN05: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const QWEN15: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";

const ORACLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle/real_size.py");

/// Prompts of several kinds: prose, a fact, code (a coder model), a repetition.
const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Water boils at a temperature of one hundred degrees",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "one two three four five six seven eight nine ten one two three four",
];

fn hf_extra() -> PathBuf {
    let p = std::env::var_os("GGUF_TRACE_HF_EXTRA")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("hf-gguf"));
    assert!(
        p.is_dir(),
        "the real-size oracle needs the gguf distribution and accelerate in {}; run scripts/test to install them",
        p.display()
    );
    p
}

/// Per point: (mean relative L2, worst relative L2, worst cosine) over positions ≥ 1, and the
/// cosine at position 0.
#[derive(Debug, Clone, Copy, Default)]
struct PointError {
    mean_rel: f64,
    max_rel: f64,
    min_cos: f64,
    cos_pos0: f64,
}

fn rel_cos(a: ArrayView1<'_, f64>, b: ArrayView1<'_, f64>) -> (f64, f64) {
    let (mut d, mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        d += (x - y) * (x - y);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ((d / bb).sqrt(), ab / (aa * bb).sqrt())
}

/// Trace `prompts` on `model` and compare every point and position with the float64 reference.
/// Returns per point errors over all prompts, and the worst relative error of the last-position
/// logits with whether every top-1 agrees.
fn agreement(model: &Path, prompts: &[&str]) -> (Vec<PointError>, f64, bool) {
    let py = hf_python("the real-size oracle");
    let extra = hf_extra();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut args = vec!["trace", "-m", s(model), "-o", s(&run_dir)];
    for p in prompts {
        args.extend(["-p", p]);
    }
    args.extend([
        "--positions",
        "all",
        "--threads",
        "2",
        "--cache-type",
        "f32",
    ]);
    let o = run_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = gguf_trace::run::Run::open(&run_dir).unwrap();
    let reqs: Vec<serde_json::Value> = run
        .manifest
        .prompts
        .iter()
        .map(|p| {
            serde_json::json!({
                "ids": p.tokens,
                "out": dir.path().join(format!("hf{}", p.index)).to_string_lossy(),
            })
        })
        .collect();
    let req = dir.path().join("requests.json");
    std::fs::write(&req, serde_json::to_vec(&reqs).unwrap()).unwrap();
    let out = Command::new(&py)
        .arg(ORACLE)
        .args(["hidden", "--gguf", s(model), "--requests", s(&req)])
        .env("GGUF_TRACE_HF_EXTRA", &extra)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "real_size.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n_points = run.manifest.model.n_layer + 1;
    let mut sums = vec![(0.0f64, 0usize); n_points];
    let mut errs = vec![
        PointError {
            min_cos: 1.0,
            cos_pos0: 1.0,
            ..Default::default()
        };
        n_points
    ];
    let logits: Array2<f32> = read_npy(run_dir.join("logits.npy")).unwrap();
    let (mut logit_rel, mut top1) = (0f64, true);
    for p in &run.manifest.prompts {
        let states: Array3<f32> = read_npy(run_dir.join(p.states_file.as_ref().unwrap())).unwrap();
        let states = states.mapv(f64::from);
        let prefix = dir.path().join(format!("hf{}", p.index));
        let hf: Array3<f64> = read_npy(prefix.with_extension("hidden.npy")).unwrap();
        assert_eq!(hf.shape(), states.shape(), "same points, positions, width");
        for (pt, e) in errs.iter_mut().enumerate() {
            for t in 0..states.len_of(Axis(1)) {
                let (r, c) = rel_cos(states.slice(s![pt, t, ..]), hf.slice(s![pt, t, ..]));
                if t == 0 {
                    e.cos_pos0 = e.cos_pos0.min(c);
                    continue;
                }
                sums[pt].0 += r;
                sums[pt].1 += 1;
                e.max_rel = e.max_rel.max(r);
                e.min_cos = e.min_cos.min(c);
            }
        }
        let hf_logits: Array2<f64> = read_npy(prefix.with_extension("logits.npy")).unwrap();
        let last = hf_logits.row(hf_logits.nrows() - 1);
        let ours = logits.row(p.index).mapv(f64::from);
        logit_rel = logit_rel.max(rel_cos(ours.view(), last).0);
        let am = |v: ArrayView1<'_, f64>| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        top1 &= am(ours.view()) == am(last);
    }
    for (e, (sum, n)) in errs.iter_mut().zip(&sums) {
        e.mean_rel = sum / *n as f64;
    }
    eprintln!("point  mean_rel  max_rel  min_cos(pos≥1)  cos(pos 0)");
    for (p, e) in errs.iter().enumerate() {
        eprintln!(
            "{p:5}  {:8.2e}  {:7.2e}  {:14.6}  {:10.6}",
            e.mean_rel, e.max_rel, e.min_cos, e.cos_pos0
        );
    }
    eprintln!("last-position logits: worst relative L2 {logit_rel:.3e}, top-1 agrees: {top1}");
    (errs, logit_rel, top1)
}

/// The 0.5B's states agree with transformers' dequantized float64 run of the same file within the
/// activation quantization's error. Measured here (4 prompts, 61 positions, f32 KV cache): point 0
/// exactly 0 (a row of the dequantized embedding); points 1–24 a mean relative L2 of 1.6–2.3% per
/// point, worst single state 3.7%, worst cosine 0.99935 (position 0 included: 0.99946); the
/// last-position logits 2.1% with the same top-1. Bounds: 3.5% mean, cosine 0.998, logits 5%.
#[test]
fn qwen05_agrees_with_transformers_dequantized() {
    let Some(model) = model_path(QWEN05) else {
        return;
    };
    let (errs, logit_rel, top1) = agreement(&model, &PROMPTS);
    assert!(
        errs[0].max_rel < 1e-6,
        "point 0 is the embedding row: {:?}",
        errs[0]
    );
    for (p, e) in errs.iter().enumerate().skip(1) {
        assert!(e.mean_rel < 0.035, "point {p}: {e:?}");
        assert!(e.min_cos > 0.998 && e.cos_pos0 > 0.998, "point {p}: {e:?}");
    }
    assert!(logit_rel < 0.05, "logits: {logit_rel}");
    assert!(top1, "the next token agrees with the float64 reference");
}

/// The 1.5B (opt-in tier): the same agreement everywhere but at the attention-sink token. Measured
/// here (2 prompts, 20 positions): points 1–28 a mean relative L2 of 2.0–2.7% per point, worst
/// state 3.6%, worst cosine 0.99940 at positions ≥ 1; logits 2.5%, same top-1. Position 0 — the
/// first token, an attention sink whose state grows to a norm of thousands — agrees to 0.99988 up
/// to point 26, then loses its direction at the last two points (cosine 0.654 at 27, 0.554 at 28):
/// the last blocks cancel most of that huge state, so the 8-bit rounding of the activations is
/// left large relative to what remains. Analyses that use every position should drop position 0
/// (the report's analyses read the last prompt position).
#[test]
#[ignore = "real-size tier: GGUF_TRACE_REAL_SIZE=1 scripts/test"]
fn qwen15_agrees_with_transformers_dequantized() {
    let Some(model) = model_path(QWEN15) else {
        return;
    };
    let (errs, logit_rel, top1) = agreement(&model, &PROMPTS[..2]);
    assert!(errs[0].max_rel < 1e-6, "{:?}", errs[0]);
    let n_layer = errs.len() - 1;
    for (p, e) in errs.iter().enumerate().skip(1) {
        assert!(e.mean_rel < 0.04, "point {p}: {e:?}");
        assert!(e.min_cos > 0.998, "point {p}: {e:?}");
        if p + 2 <= n_layer {
            assert!(e.cos_pos0 > 0.998, "point {p}: {e:?}");
        }
    }
    // The sink's last two points: the documented loss of direction (cosine well below 0.9).
    for e in &errs[n_layer - 1..] {
        assert!(e.cos_pos0 < 0.9, "the sink token's last points: {e:?}");
    }
    assert!(logit_rel < 0.05, "logits: {logit_rel}");
    assert!(top1);
}
