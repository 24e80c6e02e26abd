//! Interventions on the parts of a block (issue: component-level ablation and patching):
//! `--ablate-heads` overwrites a head's slice of the `z` tap and `--patch-taps` replaces what
//! attention and the MLP add to the residual stream, both in the eval callback. The checks hold
//! bit for bit where the graph makes them exact (the residual stream of a sequential block is
//! `resid + attn_out + mlp_out`, the `taps` tests' identities) and within a measured bound where a
//! quantized matmul stands between (a head's share through the output projection).

use std::path::Path;

use crate::common::*;
use crate::require;
use gguf_trace::capture::taps::Tap;
use gguf_trace::run::Run;
use ndarray::{s, Array3, Ix3};

/// Prompts of the same token counts as their twins in `TWINS` (SmolLM2's and Gemma-3's tokenizers).
const PROMPTS: [&str; 2] = [
    "The capital of France is",
    "Water boils at a temperature of",
];

fn tap3(run: &Run, tap: Tap, i: usize) -> Array3<f32> {
    run.tap(tap, i)
        .unwrap()
        .into_dimensionality::<Ix3>()
        .unwrap()
}

fn prompt_args() -> Vec<&'static str> {
    PROMPTS.iter().flat_map(|p| ["-p", *p]).collect()
}

/// The largest |a − b| over two runs' logits.
fn logit_gap(a: &Run, b: &Run) -> f32 {
    let (la, lb) = (a.logits().unwrap(), b.logits().unwrap());
    la.iter()
        .zip(lb.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Patching every block's attn_out and mlp_out: from a run of the same prompts it changes no bit
/// of anything; into a run whose heads were ablated (three heads in each of three blocks: a run
/// whose blocks computed other outputs from the same embeddings) from the clean run it restores
/// every state and the logits bit for bit, since each block's output is then
/// `resid + attn_out + mlp_out` of clean terms. The ablated run differs (it must, for the check to
/// mean anything): measured logit gaps up to 6.8 (SmolLM2) and 15.6 (Gemma-3).
fn patching_components_is_exact(name: &str, heads: &str) {
    let model = require!(model_path(name));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = prompt_args();
    args.extend(["--taps", "attn_out,mlp_out"]);
    let clean_dir = d.join("clean");
    let clean = trace_run(&model, &args, &clean_dir);

    let mut same = args.clone();
    same.extend([
        "--patch-from",
        s(&clean_dir),
        "--patch-points",
        "all",
        "--patch-taps",
        "attn_out,mlp_out",
    ]);
    trace_run(&model, &same, &d.join("same"));
    assert_same_data(&d.join("same"), &d.join("clean"));

    let mut ablated = args.clone();
    ablated.extend(["--ablate-heads", heads]);
    let abl = trace_run(&model, &ablated, &d.join("ablated"));
    let gap = logit_gap(&abl, &clean);
    eprintln!("{name}: ablating {heads} moves the logits by up to {gap}");
    assert!(
        gap > 0.5,
        "{name}: ablating {heads} moved the logits by only {gap}"
    );

    let mut restored = ablated.clone();
    restored.extend([
        "--patch-from",
        s(&clean_dir),
        "--patch-points",
        "all",
        "--patch-taps",
        "attn_out,mlp_out",
    ]);
    let r = trace_run(&model, &restored, &d.join("restored"));
    for i in 0..PROMPTS.len() {
        assert_eq!(
            r.states(i).unwrap(),
            clean.states(i).unwrap(),
            "{name}: prompt {i}: restoring every attn_out and mlp_out did not restore the states"
        );
    }
    assert_eq!(logit_gap(&r, &clean), 0.0, "{name}: logits not restored");
    let rec = r.manifest.capture.patch.as_ref().unwrap();
    assert_eq!(rec.taps, vec![Tap::AttnOut, Tap::MlpOut]);
    assert_eq!(
        r.manifest
            .capture
            .ablated_heads
            .as_ref()
            .unwrap()
            .heads
            .len(),
        9
    );
}

#[test]
fn patching_attention_and_mlp_outputs_is_exact_smollm2() {
    patching_components_is_exact(SMOL, "2.0,2.1,2.2,9.4,9.5,9.6,20.0,20.1,20.2");
}

#[test]
fn patching_attention_and_mlp_outputs_is_exact_gemma3() {
    patching_components_is_exact(GEMMA, "1.0,1.1,1.2,6.0,6.1,6.2,12.0,12.1,12.2");
}

/// Per head, `W_O[:, h] z_h` in float64: the head's share of the block's attention output, from
/// the GGUF's own output projection dequantized by ggml.
fn head_share(model: &Path, block: usize, head: usize, z: &[f32], n_head: usize) -> Vec<f64> {
    let gguf = gguf_trace::llama::gguf::Gguf::open(model).unwrap();
    let name = format!("blk.{block}.attn_output.weight");
    let t = gguf.tensors().into_iter().find(|t| t.name == name).unwrap();
    let w = gguf_trace::llama::lens::dequantized(model, &t, 2).unwrap();
    let width = z.len();
    let d = width / n_head;
    let n_embd = w.len() / width;
    (0..n_embd)
        .map(|e| {
            (0..d)
                .map(|k| w[e * width + head * d + k] as f64 * z[head * d + k] as f64)
                .sum()
        })
        .collect()
}

/// Ablating one head (SmolLM2, block 12, head 3): every point up to the block's input and every
/// tap of earlier blocks are bit-identical; the head's slice of z is zero and the others are
/// untouched; the block's attn_out drops by exactly that head's share W_O,h z_h within the
/// quantized matmul's rounding (llama.cpp rounds z to 8 bits per 32 values before the Q4_1
/// projection: measured relative L2 error at most 1.8% over every position, bound 3%); the
/// answer moves.
/// Mean ablation sets the slice to the head's mean over the reference run (to f32 rounding of a
/// float64 mean).
#[test]
fn ablating_a_head_removes_exactly_its_share() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (block, head, n_head) = (12usize, 3usize, 9usize);
    let mut args = prompt_args();
    args.extend(["--taps", "z,attn_out"]);
    let clean_dir = d.join("clean");
    let clean = trace_run(&model, &args, &clean_dir);
    let mut a = args.clone();
    let spec = format!("{block}.{head}");
    a.extend(["--ablate-heads", &spec]);
    let abl = trace_run(&model, &a, &d.join("ablated"));
    let mut worst = 0f64;
    for i in 0..PROMPTS.len() {
        let (sc, sa) = (clean.states(i).unwrap(), abl.states(i).unwrap());
        assert_eq!(
            sc.slice(s![..=block, .., ..]),
            sa.slice(s![..=block, .., ..]),
            "prompt {i}: a point before the ablated block changed"
        );
        assert_ne!(
            sc.slice(s![block + 1, .., ..]),
            sa.slice(s![block + 1, .., ..]),
            "prompt {i}: the ablated block's output did not change"
        );
        let (zc, za) = (tap3(&clean, Tap::Z, i), tap3(&abl, Tap::Z, i));
        let (ac, aa) = (tap3(&clean, Tap::AttnOut, i), tap3(&abl, Tap::AttnOut, i));
        assert_eq!(zc.slice(s![..block, .., ..]), za.slice(s![..block, .., ..]));
        assert_eq!(ac.slice(s![..block, .., ..]), aa.slice(s![..block, .., ..]));
        let hd = zc.shape()[2] / n_head;
        for j in 0..zc.shape()[1] {
            let (rc, ra) = (zc.slice(s![block, j, ..]), za.slice(s![block, j, ..]));
            for (k, (x, y)) in rc.iter().zip(ra.iter()).enumerate() {
                if k / hd == head {
                    assert_eq!(
                        *y, 0.0,
                        "prompt {i}, position {j}: z of the head not zeroed"
                    );
                } else {
                    assert_eq!(x, y, "prompt {i}, position {j}: another head's z changed");
                }
            }
            let z: Vec<f32> = rc.to_vec();
            let share = head_share(&model, block, head, &z, n_head);
            let (mut err, mut norm) = (0f64, 0f64);
            for (e, sh) in share.iter().enumerate() {
                let delta = ac[[block, j, e]] as f64 - aa[[block, j, e]] as f64;
                err += (delta - sh).powi(2);
                norm += sh * sh;
            }
            let rel = (err / norm.max(1e-30)).sqrt();
            worst = worst.max(rel);
            assert!(
                rel <= 0.03,
                "prompt {i}, position {j}: attn_out moved by the head's share within {rel:.4} (relative L2)"
            );
        }
    }
    eprintln!("worst relative error of the head's share: {worst:.5}");
    assert!(
        logit_gap(&abl, &clean) > 1e-3,
        "ablating the head changed no logit"
    );

    // Mean ablation over the clean run.
    let mut m = a.clone();
    m.extend(["--ablate-heads-from", s(&clean_dir)]);
    let mean_run = trace_run(&model, &m, &d.join("mean"));
    let hd = 64;
    let mut sum = vec![0f64; hd];
    let mut n = 0;
    for i in 0..PROMPTS.len() {
        let z = tap3(&clean, Tap::Z, i);
        for j in 0..z.shape()[1] {
            for k in 0..hd {
                sum[k] += z[[block, j, head * hd + k]] as f64;
            }
            n += 1;
        }
    }
    for i in 0..PROMPTS.len() {
        let z = tap3(&mean_run, Tap::Z, i);
        for j in 0..z.shape()[1] {
            for k in 0..hd {
                let want = (sum[k] / n as f64) as f32;
                assert_eq!(
                    z[[block, j, head * hd + k]],
                    want,
                    "mean ablation at {j}, {k}"
                );
            }
        }
    }
    let rec = mean_run.manifest.capture.ablated_heads.as_ref().unwrap();
    assert_eq!(rec.heads, vec![(block, head)]);
    assert!(rec.mean_from.is_some());
}

/// Bad component interventions end with one clear line and write nothing.
#[test]
fn bad_component_interventions_are_refused() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain = d.join("plain");
    trace_run(&model, &["-p", "The capital of France is"], &plain);
    let out = d.join("out");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--ablate-heads", "30.0"], "this model has blocks 0-29"),
        (vec!["--ablate-heads", "3.9"], "this model has heads 0-8"),
        (vec!["--ablate-heads", "3"], "expected BLOCK.HEAD"),
        (vec!["--ablate-heads", ""], "name at least one head"),
        (
            vec!["--ablate-heads", "3.1", "--points", "0,10-30"],
            "block 3 is not traced",
        ),
        (
            vec!["--ablate-heads-from", s(&plain)],
            "needs --ablate-heads",
        ),
        (
            vec!["--ablate-heads", "3.1", "--ablate-heads-from", s(&plain)],
            "the run holds no z tap",
        ),
        (
            vec!["--patch-taps", "attn_out"],
            "--patch-taps needs --patch-from",
        ),
        (
            vec![
                "--patch-from",
                s(&plain),
                "--patch-points",
                "3",
                "--patch-taps",
                "pattern",
            ],
            "choose from resid",
        ),
        (
            vec![
                "--patch-from",
                s(&plain),
                "--patch-points",
                "3",
                "--patch-taps",
                "attn_out",
            ],
            "the run holds no tap `attn_out`",
        ),
        (
            vec![
                "--patch-from",
                s(&plain),
                "--patch-points",
                "30",
                "--patch-taps",
                "mlp_out",
            ],
            "patched at blocks 0-29",
        ),
    ];
    for (extra, needle) in cases {
        let mut a = vec![
            "trace",
            "-m",
            s(&model),
            "-p",
            "The capital of France is",
            "-o",
            s(&out),
        ];
        a.extend(extra.iter().copied());
        assert_clean_error(&run_bin(&a), needle, Some(&out));
    }
}

/// `--patch-heads`: one head's slice of z at the last position comes from the twin prompt's run
/// (SmolLM2, head 12.3, "The capital of Italy is" into "... France is"): that slice is the twin's,
/// every other value of z and every point up to block 12's input are the prompt's own, and the
/// block's output moves.
#[test]
fn patching_one_head_replaces_only_its_slice() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (block, head, hd) = (12usize, 3usize, 64usize);
    let a_dir = d.join("a");
    let b_dir = d.join("b");
    let a = trace_run(
        &model,
        &["-p", "The capital of France is", "--taps", "z"],
        &a_dir,
    );
    let b = trace_run(
        &model,
        &["-p", "The capital of Italy is", "--taps", "z"],
        &b_dir,
    );
    let p = trace_run(
        &model,
        &[
            "-p",
            "The capital of France is",
            "--patch-from",
            s(&b_dir),
            "--patch-heads",
            "12.3",
            "--patch-positions",
            "last",
        ],
        &d.join("p"),
    );
    let (za, zb, zp) = (
        tap3(&a, Tap::Z, 0),
        tap3(&b, Tap::Z, 0),
        tap3(&p, Tap::Z, 0),
    );
    let last = za.shape()[1] - 1;
    for j in 0..=last {
        for k in 0..za.shape()[2] {
            let want = if j == last && k / hd == head {
                zb[[block, j, k]]
            } else {
                za[[block, j, k]]
            };
            assert_eq!(zp[[block, j, k]], want, "z of block {block} at {j}, {k}");
        }
    }
    assert_ne!(
        za.slice(s![block, last, head * hd..(head + 1) * hd]),
        zb.slice(s![block, last, head * hd..(head + 1) * hd]),
        "the twins' head must differ for this to mean anything"
    );
    let (sa, sp) = (a.states(0).unwrap(), p.states(0).unwrap());
    assert_eq!(
        sa.slice(s![..=block, .., ..]),
        sp.slice(s![..=block, .., ..])
    );
    assert_ne!(
        sa.slice(s![block + 1, last, ..]),
        sp.slice(s![block + 1, last, ..])
    );
    let rec = p.manifest.capture.patch.as_ref().unwrap();
    assert_eq!(rec.heads, vec![(block, head)]);
    assert_eq!(rec.taps, vec![Tap::Z]);
}

/// `--ablate-taps`: a direction removed from what attention and the MLP of blocks 5–7 write
/// (SmolLM2): their attn_out and mlp_out lose it (projection ≤ 1e-5 of the norm: the edit is
/// computed in float64 and stored as f32), the residual stream after them is the sum of the edited
/// terms bit for bit (`resid_mid = resid + attn_out`: the block's own add read the edited tensor),
/// and everything before block 5 is unchanged.
#[test]
fn ablating_a_direction_from_attention_and_mlp_outputs() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let n = 576;
    // A fixed direction, the same at points 5-7 (direction.<il> is point il + 1).
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let cv = d.join("dir.gguf");
    gguf_trace::llama::gguf::write_control_vector(
        &cv,
        "llama",
        &[(4, v.clone()), (5, v.clone()), (6, v.clone())],
    )
    .unwrap();
    let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let unit: Vec<f64> = v.iter().map(|&x| x as f64 / norm).collect();
    let mut args = prompt_args();
    args.extend(["--taps", "resid_mid,attn_out,mlp_out"]);
    let plain = trace_run(&model, &args, &d.join("plain"));
    let mut a = args.clone();
    a.extend([
        "--ablate",
        s(&cv),
        "--ablate-points",
        "5-7",
        "--ablate-direction",
        "6",
        "--ablate-taps",
        "attn_out,mlp_out",
    ]);
    let abl = trace_run(&model, &a, &d.join("abl"));
    for i in 0..PROMPTS.len() {
        let (sp, sa) = (plain.states(i).unwrap(), abl.states(i).unwrap());
        assert_eq!(sp.slice(s![..=5, .., ..]), sa.slice(s![..=5, .., ..]));
        assert_ne!(sp.slice(s![6, .., ..]), sa.slice(s![6, .., ..]));
        let (mid, attn, mlp) = (
            tap3(&abl, Tap::ResidMid, i),
            tap3(&abl, Tap::AttnOut, i),
            tap3(&abl, Tap::MlpOut, i),
        );
        for b in 5..=7 {
            for j in 0..attn.shape()[1] {
                for t in [&attn, &mlp] {
                    let row = t.slice(s![b, j, ..]);
                    let dot: f64 = row.iter().zip(&unit).map(|(&x, u)| x as f64 * u).sum();
                    let len = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                    assert!(
                        dot.abs() <= 1e-5 * len,
                        "block {b}, position {j}: projection {dot} of {len}"
                    );
                }
                for e in 0..n {
                    assert_eq!(
                        (sa[[b, j, e]] + attn[[b, j, e]]).to_bits(),
                        mid[[b, j, e]].to_bits(),
                        "block {b}, position {j}: the add did not read the edited attn_out"
                    );
                    assert_eq!(
                        (mid[[b, j, e]] + mlp[[b, j, e]]).to_bits(),
                        sa[[b + 1, j, e]].to_bits(),
                        "block {b}, position {j}: the add did not read the edited mlp_out"
                    );
                }
            }
        }
    }
    let rec = abl.manifest.capture.ablation.as_ref().unwrap();
    assert_eq!(rec.taps, vec![Tap::AttnOut, Tap::MlpOut]);
    assert_eq!(rec.points, vec![5, 6, 7]);
}

/// `--resume` tells a run with other component interventions from its own: the same
/// `--ablate-heads` is "already complete", another head is not the same run (the fingerprint
/// holds the heads, not only the taps they add).
#[test]
fn resume_tells_component_interventions_apart() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let base = ["-p", "Hello there", "--taps", "z", "--ablate-heads"];
    trace_run(&model, &[&base[..], &["3.1"]].concat(), &out);
    let again = |heads: &str| {
        let mut a = vec!["trace", "-m", s(&model), "-o", s(&out), "--resume"];
        a.extend(base);
        a.push(heads);
        run_bin(&a)
    };
    let o = again("3.1");
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already complete"));
    let o = again("4.1");
    assert!(!o.status.success(), "another head resumed the run");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("already complete"));
}
