//! Taps inside the block (`--taps`): every tap is identified from llama.cpp's graph and checked
//! by identities that hold bit for bit, because the graph adds exactly these f32 tensors:
//! `resid_mid[b] = resid[b] + attn_out[b]` and `resid[b+1] = resid_mid[b] + mlp_out[b]`
//! (f32 addition is commutative and llama.cpp's ADD computes one rounding of a + b). Capturing
//! taps must not change a single bit of the states or logits.

use crate::common::*;
use crate::require;
use gguf_trace::capture::engine::{Positions, PromptTrace};
use gguf_trace::capture::taps::Tap;
use gguf_trace::run::Run;
use ndarray::{s, Axis, Ix3};

const TAPS: [Tap; 5] = [
    Tap::ResidMid,
    Tap::AttnOut,
    Tap::MlpOut,
    Tap::Z,
    Tap::Neurons,
];

const PROMPTS: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog because",
    "Short one",
    "Paris is the capital of",
    "1, 2, 3, 4, 5,",
];

/// Assert both identities at every block and kept position, bit for bit; returns the number of
/// state vectors checked.
fn assert_identities(t: &PromptTrace, points: &[usize], blocks: &[usize], what: &str) -> usize {
    let (mid, attn, mlp) = (&t.taps[0], &t.taps[1], &t.taps[2]);
    let mut n = 0;
    for (k, &b) in blocks.iter().enumerate() {
        let (Some(pi), Some(po)) = (
            points.iter().position(|&p| p == b),
            points.iter().position(|&p| p == b + 1),
        ) else {
            continue;
        };
        for j in 0..t.positions.len() {
            let resid = t.states.slice(s![pi, j, ..]);
            let next = t.states.slice(s![po, j, ..]);
            let m = mid.slice(s![k, j, ..]);
            let a = attn.slice(s![k, j, ..]);
            let f = mlp.slice(s![k, j, ..]);
            for (d, (((r, a), m), (f, nx))) in resid
                .iter()
                .zip(a.iter())
                .zip(m.iter())
                .zip(f.iter().zip(next.iter()))
                .enumerate()
            {
                assert_eq!(
                    (r + a).to_bits(),
                    m.to_bits(),
                    "{what}: resid + attn_out != resid_mid at block {b}, position {j}, dim {d}"
                );
                assert_eq!(
                    (m + f).to_bits(),
                    nx.to_bits(),
                    "{what}: resid_mid + mlp_out != resid at block {}, position {j}, dim {d}",
                    b + 1
                );
            }
            n += 1;
        }
    }
    n
}

#[test]
fn taps_hold_the_block_identities_bit_for_bit_and_change_nothing() {
    for (model, name, z_width, n_ff) in [
        (smol(), "smollm2", 9 * 64, 1536),
        (gemma(), "gemma3", 4 * 256, 2048),
    ] {
        let model = require!(model);
        let l = model.n_layer();
        let toks = tokens(model, &PROMPTS);
        let plain = trace_tokens(model, &toks, |c| c.n_seq = 2);
        // Every layout a trace can take: several sequences in tiny ubatches, last positions with
        // generation, a subset of points.
        type Layout = Box<dyn Fn(&mut gguf_trace::capture::engine::TraceConfig)>;
        let layouts: Vec<(&str, Layout)> = vec![
            (
                "all positions, 3 sequences, ubatch 5",
                Box::new(|c| {
                    c.n_seq = 3;
                    c.n_ubatch = 5;
                }),
            ),
            (
                "last position, generate 3",
                Box::new(|c| {
                    c.positions = Positions::Last;
                    c.generate = 3;
                }),
            ),
            (
                "points 2-5 and the last",
                Box::new(move |c| c.points = vec![2, 3, 4, 5, l]),
            ),
            // The last block without point L: its taps after the output-row selection still need
            // every kept token as an output.
            (
                "every block, not point L",
                Box::new(move |c| c.points = (0..l).collect()),
            ),
        ];
        let mut checked = 0;
        for (what, f) in layouts {
            let what = format!("{name}, {what}");
            let traced = trace_tokens(model, &toks, |c| {
                c.n_seq = 2;
                f(c);
                c.taps = TAPS.to_vec();
            });
            let untraced = trace_tokens(model, &toks, |c| {
                c.n_seq = 2;
                f(c);
            });
            for (t, u) in traced.iter().zip(&untraced) {
                assert_eq!(t.states, u.states, "{what}: taps changed the states");
                assert_eq!(t.logits, u.logits, "{what}: taps changed the logits");
                assert_eq!(t.tokens, u.tokens, "{what}: taps changed the generation");
                let points: Vec<usize> = if what.contains("points 2-5") {
                    vec![2, 3, 4, 5, l]
                } else if what.contains("not point L") {
                    (0..l).collect()
                } else {
                    (0..=l).collect()
                };
                let blocks: Vec<usize> = points.iter().copied().filter(|&p| p < l).collect();
                let n_pos = t.positions.len();
                assert_eq!(t.taps.len(), TAPS.len());
                for (k, tap) in TAPS.iter().enumerate() {
                    let width = match tap {
                        Tap::Z => z_width,
                        Tap::Neurons => n_ff,
                        _ => model.n_embd(),
                    };
                    assert_eq!(
                        t.taps[k].shape(),
                        &[blocks.len(), n_pos, width],
                        "{what}: {tap}"
                    );
                    assert!(
                        t.taps[k].iter().all(|x| x.is_finite()),
                        "{what}: {tap} not finite"
                    );
                    // No row left unfilled.
                    for (b, block) in blocks.iter().enumerate() {
                        for j in 0..n_pos {
                            assert!(
                                t.taps[k].slice(s![b, j, ..]).iter().any(|&x| x != 0.0),
                                "{what}: {tap} block {block} position {j} is all zeros"
                            );
                        }
                    }
                }
                checked += assert_identities(t, &points, &blocks, &what);
            }
        }
        // The plain trace of the default layout equals the traced one with taps.
        let with = trace_tokens(model, &toks, |c| {
            c.n_seq = 2;
            c.taps = TAPS.to_vec();
        });
        for (a, b) in with.iter().zip(&plain) {
            assert_eq!(a.states, b.states, "{name}");
        }
        assert!(
            checked > 100,
            "{name}: only {checked} state vectors checked"
        );
    }
}

#[test]
fn taps_through_the_cli_run_format_2_and_every_reader() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Gemma-3's residual stream exceeds f16's range: refused, never written as infinity.
    let g = model_path(GEMMA).unwrap();
    let o = run_bin(&[
        "trace",
        "-m",
        s(&g),
        "-p",
        "Paris is the capital of",
        "--taps",
        "attn_out",
        "--dtype",
        "f16",
        "-o",
        s(&w.join("g")),
    ]);
    assert_clean_error(&o, "beyond f16's largest value 65504", Some(&w.join("g")));
    let m = model_path(SMOL).unwrap();
    ok(
        w,
        &[
            "trace",
            "-m",
            s(&m),
            "-p",
            "Paris is the capital of",
            "-p",
            "Hello there",
            "--taps",
            "resid,hook_attn_out,hook_mlp_out,hook_resid_mid,z",
            "--points",
            "3,4,5,30",
            "--dtype",
            "f16",
            "-o",
            "run",
        ],
    );
    let run = Run::open(&w.join("run")).unwrap();
    let m = &run.manifest;
    assert_eq!(m.schema_version, 2);
    let taps: Vec<Tap> = m.capture.taps.iter().map(|t| t.tap).collect();
    assert_eq!(taps, vec![Tap::ResidMid, Tap::AttnOut, Tap::MlpOut, Tap::Z]);
    for t in &m.capture.taps {
        assert_eq!(t.blocks, vec![3, 4, 5], "point 30 = L has no block");
        assert_eq!(t.dir, format!("taps/{}", t.tap));
        assert_eq!(t.tensors.len(), 3);
    }
    assert_eq!(m.capture.taps[3].heads, Some(9));
    assert_eq!(m.capture.taps[3].width, 576);
    // f16 files widen to what the identities need within f16 rounding.
    let states = run.states(0).unwrap();
    let mid = run
        .tap(Tap::ResidMid, 0)
        .unwrap()
        .into_dimensionality::<Ix3>()
        .unwrap();
    let attn = run
        .tap(Tap::AttnOut, 0)
        .unwrap()
        .into_dimensionality::<Ix3>()
        .unwrap();
    assert_eq!(mid.shape(), &[3, states.shape()[1], 576]);
    // point 3 is states[0]; block 3 is taps[0].
    let sum = &states.slice(s![0, .., ..]) + &attn.slice(s![0, .., ..]);
    let err = (&sum - &mid.slice(s![0, .., ..]))
        .mapv(|x| x.abs())
        .fold(0f32, |a, &b| a.max(b));
    let scale = mid.mapv(|x| x.abs()).fold(0f32, |a, &b| a.max(b));
    // Three f16 roundings of values up to `scale`: at most 3 × 2^-11 relative.
    assert!(
        err <= scale * 3.0 / 2048.0,
        "f16 identity off by {err} (scale {scale})"
    );
    // numpy reads every tap in one line.
    let out = run_python(
        "import json,sys,numpy as np\nd=sys.argv[1]\nr=json.load(open(d+'/run.json'))\np=r['prompts'][1]\nprint(*[np.load(d+'/'+p['tap_files'][t['tap']]).shape for t in r['capture']['taps']])",
        &[s(&w.join("run"))],
    );
    assert_eq!(
        out.trim(),
        "(3, 2, 576) (3, 2, 576) (3, 2, 576) (3, 2, 576)"
    );
    // The report reads a version-2 run.
    ok(w, &["report", "run", "-o", "report.html"]);
    // compare takes the same settings record: its runs hold the taps.
    let smol = model_path(SMOL).unwrap();
    // The same model under a second path (compare refuses one file given twice).
    let copy = w.join("copy").join(smol.file_name().unwrap());
    std::fs::create_dir(w.join("copy")).unwrap();
    std::fs::copy(&smol, &copy).unwrap();
    ok(
        w,
        &[
            "compare",
            "-m",
            s(&smol),
            "-m",
            s(&copy),
            "-p",
            "Paris is the capital of",
            "--taps",
            "mlp_out",
            "--points",
            "5-9",
            "-o",
            "cmp",
        ],
    );
    let stem = smol.file_stem().unwrap().to_string_lossy().into_owned();
    for sub in [stem.clone(), format!("{stem}-1")] {
        let r = Run::open(&w.join("cmp").join(&sub)).unwrap();
        assert_eq!(
            r.manifest.capture.taps[0].blocks,
            vec![5, 6, 7, 8, 9],
            "{sub}"
        );
        assert_eq!(r.tap(Tap::MlpOut, 0).unwrap().shape()[0], 5);
    }
    assert!(w.join("report.html").exists());
    // A tap file that does not match run.json is refused by every reader.
    std::fs::write(w.join("run/taps/z/00001.npy"), b"not an npy").unwrap();
    let o = run_bin(&["report", s(&w.join("run")), "-o", s(&w.join("r2.html"))]);
    assert_clean_error(&o, "taps/z/00001.npy", Some(&w.join("r2.html")));
}

#[test]
fn taps_that_cannot_be_captured_are_refused_by_name() {
    let m = model_path(SMOL).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    for (taps, needle) in [
        (
            "attn",
            "unknown tap `attn`: choose from resid, resid_mid, attn_out",
        ),
        (
            "router",
            "tap `router_logits` cannot be identified at block 0 for architecture `llama`: no matrix product with `blk.0.ffn_gate_inp.weight`: block 0 is not a mixture-of-experts block",
        ),
        ("router_weights,router", "`router_weights` is named twice"),
        (
            "blocks.3.hook_attn_out",
            "names block 3: give the tap without its block and choose blocks with --points (--taps hook_attn_out --points 3)",
        ),
        ("z,z", "`z` is named twice"),
        ("resid,", "an empty entry"),
    ] {
        let o = run_bin(&[
            "trace",
            "-m",
            s(&m),
            "-p",
            "x",
            "--taps",
            taps,
            "-o",
            s(&w.join("o")),
        ]);
        assert_clean_error(&o, needle, Some(&w.join("o")));
    }
    for (extra, needle) in [
        (
            vec!["--taps", "attn_out", "--points", "last"],
            "taps inside blocks need a block: --points names none below point 30",
        ),
        (
            vec!["--taps", "pattern", "--cache-type", "q8_0"],
            "llama.cpp's quantized KV cache needs flash attention",
        ),
    ] {
        let o = run_bin(
            &[
                &["trace", "-m", s(&m), "-p", "x", "-o", s(&w.join("o"))][..],
                &extra,
            ]
            .concat(),
        );
        assert_clean_error(&o, needle, Some(&w.join("o")));
    }
}

#[test]
fn resume_with_taps_checks_and_repairs_their_files() {
    let m = model_path(SMOL).unwrap();
    let m = s(&m);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let body: String = (0..64)
        .map(|i| format!("Prompt number {i} asks about something long and winding, again.\n"))
        .collect();
    std::fs::write(w.join("p.txt"), body).unwrap();
    let args = |out: &'static str| {
        vec![
            "trace",
            "-m",
            m,
            "-f",
            "p.txt",
            "--generate",
            "2",
            "--taps",
            "attn_out,neurons",
            "--points",
            "0-6",
            "-o",
            out,
        ]
    };
    ok(w, &args("reference"));
    let a = args("run");
    let (code, _) = interrupt_when(w, &a, || journaled(w, "") > 0, "KILL");
    assert_eq!(code, None);
    // Damage the first journaled prompt's neurons file: it must be traced again.
    let partial = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".partial"))
        .unwrap()
        .join("run");
    let p = partial.join("taps/neurons/00000.npy");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let o = ok(w, &[&a[..], &["--resume"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("traced again") || err.contains("tracing from the start"),
        "{err}"
    );
    assert_same_data(&w.join("run"), &w.join("reference"));
}

/// `pattern`: every (block, head, query) row is a probability distribution over the keys up to the
/// query (sums to 1 within float32 rounding of llama.cpp's softmax: measured 1.9e-7 / 1.7e-7, bound 1e-5),
/// with exact zeros after the query (the causal mask); the trace equals one without taps that
/// also turns flash attention off, bit for bit; the positions kept by `--positions last` are the
/// same rows as with every position.
#[test]
fn pattern_rows_are_distributions_over_earlier_tokens() {
    for (model, name) in [(smol(), "smollm2"), (gemma(), "gemma3")] {
        let model = require!(model);
        let toks = tokens(model, &PROMPTS);
        let heads = model.n_head();
        let all = trace_tokens(model, &toks, |c| {
            c.n_seq = 1;
            c.taps = vec![Tap::Pattern];
        });
        let plain = trace_tokens(model, &toks, |c| {
            c.n_seq = 1;
            c.no_flash_attn = true;
        });
        let last = trace_tokens(model, &toks, |c| {
            c.n_seq = 1;
            c.positions = Positions::Last;
            c.generate = 3;
            c.taps = vec![Tap::Pattern];
        });
        let mut worst = 0f64;
        for ((t, p), l) in all.iter().zip(&plain).zip(&last) {
            assert_eq!(t.states, p.states, "{name}: pattern changed the states");
            assert_eq!(t.logits, p.logits, "{name}: pattern changed the logits");
            let n = t.tokens.len();
            let a = &t.taps[0];
            assert_eq!(a.shape(), &[model.n_layer(), heads, n, n], "{name}");
            for b in 0..model.n_layer() {
                for h in 0..heads {
                    for q in 0..n {
                        let row = a.slice(s![b, h, q, ..]);
                        let sum: f64 = row.iter().map(|&x| x as f64).sum();
                        worst = worst.max((sum - 1.0).abs());
                        assert!(
                            (sum - 1.0).abs() < 1e-5,
                            "{name}: block {b} head {h} query {q} sums to {sum}"
                        );
                        assert!(
                            row.iter().skip(q + 1).all(|&x| x == 0.0),
                            "{name}: a key after query {q}"
                        );
                        assert!(row.iter().all(|&x| (0.0..=1.0).contains(&x)));
                    }
                }
            }
            // --positions last with generation: the last prompt query and every generated one,
            // keys over prompt and generated tokens; the prompt query's row is the same as above.
            let la = &l.taps[0];
            assert_eq!(la.shape()[2], l.positions.len());
            assert_eq!(la.shape()[3], l.tokens.len());
            let q = t.n_prompt - 1;
            let from_all = a.index_axis(Axis(2), q);
            let from_last = la.index_axis(Axis(2), 0);
            assert_eq!(
                from_all.slice(s![.., .., ..n]),
                from_last.slice(s![.., .., ..n]),
                "{name}: the last prompt query differs between --positions all and last"
            );
        }
        eprintln!("{name}: worst |row sum - 1| = {worst:.1e}");
    }
    // pattern needs one sequence at a time: the tracer refuses otherwise.
    let model = require!(smol());
    let mut cfg = gguf_trace::capture::engine::TraceConfig::new(model);
    cfg.n_seq = 2;
    cfg.taps = vec![Tap::Pattern];
    let e = gguf_trace::capture::engine::Tracer::new(model, cfg)
        .unwrap()
        .trace(&tokens(model, &PROMPTS), |_| Ok(()), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tap `pattern` needs one prompt at a time"),
        "{e}"
    );
}

/// Version-1 runs (before taps and the settings record) are still read by every command that
/// reads runs: report, direction, --patch-from and --ablate (with a direction from a v1 run).
#[test]
fn version_1_runs_are_still_read() {
    let m = model_path(SMOL).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let lines: String = (0..6)
        .map(|i| {
            let (label, text) = if i % 2 == 0 {
                ("a", format!("Write a poem about the sea, number {i}."))
            } else {
                ("b", format!("List three prime numbers, number {i}."))
            };
            format!("{{\"text\": \"{text}\", \"label\": \"{label}\"}}\n")
        })
        .collect();
    std::fs::write(w.join("p.jsonl"), lines).unwrap();
    ok(w, &["trace", "-m", s(&m), "-f", "p.jsonl", "-o", "v1"]);
    // Make it a version-1 run: what version 1 wrote, nothing more.
    let p = w.join("v1/run.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["schema_version"] = 1.into();
    let capture = v["capture"].as_object_mut().unwrap();
    capture.remove("settings");
    capture.remove("taps");
    for p in v["prompts"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("tap_files");
    }
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    assert_eq!(Run::open(&w.join("v1")).unwrap().manifest.schema_version, 1);
    ok(w, &["report", "v1", "-o", "r.html"]);
    ok(w, &["direction", "v1", "--labels", "a,b", "-o", "d.gguf"]);
    ok(
        w,
        &[
            "trace",
            "-m",
            s(&m),
            "-f",
            "p.jsonl",
            "--patch-from",
            "v1",
            "--patch-points",
            "5",
            "-o",
            "patched",
        ],
    );
    // Self-patching from the v1 run is the identity.
    assert_same_data(&w.join("patched"), &w.join("v1"));
    ok(
        w,
        &[
            "trace",
            "-m",
            s(&m),
            "-f",
            "p.jsonl",
            "--ablate",
            "d.gguf",
            "--ablate-points",
            "5-10",
            "-o",
            "ablated",
        ],
    );
    // A schema this version does not know is refused by name.
    v["schema_version"] = 3.into();
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let o = run_bin(&["report", s(&w.join("v1")), "-o", s(&w.join("r3.html"))]);
    assert_clean_error(
        &o,
        "unsupported schema_version 3 (this gguf-trace reads 1 to 2)",
        Some(&w.join("r3.html")),
    );
}

/// `--heads` keeps the chosen heads of `z` and `pattern`: the same numbers as those heads' slices
/// of a full capture; bad specs are refused by name.
#[test]
fn heads_keep_the_chosen_heads_of_z_and_pattern() {
    let m = model_path(SMOL).unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base = [
        "trace",
        "-m",
        s(&m),
        "-p",
        "Paris is the capital of",
        "--taps",
        "z,pattern",
        "--points",
        "2-4",
    ];
    ok(w, &[&base[..], &["-o", "full"]].concat());
    ok(
        w,
        &[&base[..], &["--heads", "1,4-5", "-o", "some"]].concat(),
    );
    let (full, some) = (
        Run::open(&w.join("full")).unwrap(),
        Run::open(&w.join("some")).unwrap(),
    );
    let z = &some.manifest.capture.taps[0];
    assert_eq!(
        (z.tap, z.width, z.heads, z.head_ids.clone()),
        (Tap::Z, 3 * 64, Some(3), vec![1, 4, 5])
    );
    let (zf, zs) = (full.tap(Tap::Z, 0).unwrap(), some.tap(Tap::Z, 0).unwrap());
    for (k, h) in [1usize, 4, 5].into_iter().enumerate() {
        assert_eq!(
            zs.slice(s![.., .., k * 64..(k + 1) * 64]),
            zf.slice(s![.., .., h * 64..(h + 1) * 64]),
            "z head {h}"
        );
    }
    let (pf, ps) = (
        full.tap(Tap::Pattern, 0).unwrap(),
        some.tap(Tap::Pattern, 0).unwrap(),
    );
    assert_eq!(ps.shape()[1], 3);
    for (k, h) in [1usize, 4, 5].into_iter().enumerate() {
        assert_eq!(
            ps.index_axis(Axis(1), k),
            pf.index_axis(Axis(1), h),
            "pattern head {h}"
        );
    }
    for (heads, taps, needle) in [
        (
            "9",
            "z",
            "--heads: head 9 is out of range; this model has heads 0..=8",
        ),
        (
            "1",
            "attn_out",
            "--heads chooses heads of the z and pattern taps",
        ),
        ("3-1", "z", "--heads: range 3-1 is backwards"),
    ] {
        let o = run_bin(&[
            "trace",
            "-m",
            s(&m),
            "-p",
            "x",
            "--taps",
            taps,
            "--heads",
            heads,
            "-o",
            s(&w.join("bad")),
        ]);
        assert_clean_error(&o, needle, Some(&w.join("bad")));
    }
}

/// A run with taps is gguf-trace's own: `--force` replaces it (the taps/<tap>/NNNNN.npy folders
/// were once taken for a user's files), while a file of someone else's inside taps/ still stops it.
#[test]
fn force_replaces_a_run_with_taps_but_not_a_users_file_in_it() {
    let Some(model) = model_path(SMOL) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let args = [
        "trace",
        "-m",
        s(&model),
        "-p",
        "Hello there",
        "--taps",
        "z,attn_out",
        "-o",
        s(&out),
        "--force",
    ];
    for _ in 0..2 {
        let o = run_bin(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::write(out.join("taps/z/notes.txt"), "mine").unwrap();
    let o = run_bin(&args);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("taps/z/notes.txt"));
    assert!(out.join("taps/z/notes.txt").exists());
}
