//! Benchmarks behind `scripts/bench` (not a test): ratios measured in one run on one loaded
//! model, alternating the variants and taking medians, since these machines are noisy.
//!
//! Usage: cargo run --release --example bench -- MODEL.gguf [MODEL2.gguf ...]
//! Prints `name: value unit` lines, readable by a script.

use std::path::PathBuf;
use std::time::Instant;

use gguf_trace::capture::engine::{default_threads, Positions, TraceConfig, Tracer};
use gguf_trace::capture::plain;
use gguf_trace::chat::tokenize_prompt;
use gguf_trace::llama::context::{Context, ContextParams};
use gguf_trace::llama::model::{LoadOptions, Model};

const REPS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn prompts(n: usize) -> Vec<String> {
    let subjects = [
        "the ocean",
        "a violin",
        "the moon",
        "bread",
        "a glacier",
        "chess",
        "a library",
        "rain",
    ];
    (0..n)
        .map(|i| {
            format!(
                "Tell me one surprising fact about {} and why it matters (#{i}).",
                subjects[i % subjects.len()]
            )
        })
        .collect()
}

fn trace_time(model: &Model, toks: &[Vec<i32>], f: impl Fn(&mut TraceConfig)) -> f64 {
    let mut cfg = TraceConfig::new(model);
    f(&mut cfg);
    let mut tracer = Tracer::new(model, cfg).unwrap();
    let t = Instant::now();
    tracer.trace(toks, |_| Ok(()), |_| {}).unwrap();
    t.elapsed().as_secs_f64()
}

/// Untraced decode of the same prompts in the same groups; `embeddings` switches embeddings mode.
fn plain_time(
    model: &Model,
    toks: &[Vec<i32>],
    n_seq: usize,
    output_all: bool,
    embeddings: bool,
) -> f64 {
    let mut ctx = Context::new(
        model,
        ContextParams {
            n_ctx: 512 * n_seq,
            n_batch: 512,
            n_ubatch: 512,
            n_seq_max: n_seq,
            // As the tracer does: logits buffers sized for the outputs asked for.
            n_outputs_max: if output_all || embeddings { 0 } else { n_seq },
            n_threads: default_threads(),
            embeddings,
            capture: None,
            cache_type: Default::default(),
            no_flash_attn: false,
        },
    )
    .unwrap();
    let t = Instant::now();
    plain::decode_prompts(&mut ctx, toks, n_seq, 512, output_all).unwrap();
    t.elapsed().as_secs_f64()
}

/// Greedy generation of `n` tokens after each prompt, one prompt at a time, `reps` alternated
/// rounds: traced `--positions last` (every point's row at each generated token: one graph split
/// per point per token) [0] and untraced greedy decoding [1].
fn generation_overhead(model: &Model, toks: &[Vec<i32>], n: usize, reps: usize) -> Rounds<2> {
    let traced = || {
        trace_time(model, toks, |c| {
            c.n_seq = 1;
            c.generate = n;
            c.positions = Positions::Last;
        })
    };
    let plain = || {
        let mut ctx = plain::context(model, 512, 1, 512, default_threads()).unwrap();
        let t = Instant::now();
        // The tracer decodes each of its n tokens (their states are kept); greedy for n + 1
        // tokens decodes n of them, the same work.
        for p in toks {
            plain::greedy(&mut ctx, p, n + 1).unwrap();
        }
        t.elapsed().as_secs_f64()
    };
    plain();
    traced();
    Rounds(
        (0..reps)
            .map(|round| {
                if round % 2 == 0 {
                    let t = traced();
                    [t, plain()]
                } else {
                    let p = plain();
                    [traced(), p]
                }
            })
            .collect(),
    )
}

/// Report time for synthetic runs of 200 and 2000 prompts × 31 points × 576 dims, and HTML size.
fn bench_report() {
    let dir = tempfile::tempdir().unwrap();
    for n in [200, 2000] {
        let run = dir.path().join(format!("run{n}"));
        gguf_trace::run::synthetic::write(&run, n, 30, 576, &["a", "b"], 1).unwrap();
        let out = dir.path().join(format!("report{n}.html"));
        let t = Instant::now();
        gguf_trace::commands::report::write_report(
            &[run.as_path()],
            &out,
            None,
            None,
            false,
            None,
            None,
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let size = std::fs::metadata(&out).unwrap().len();
        println!("report_time_{n}_prompts: {secs:.2} s");
        println!("report_html_size_{n}_prompts: {:.2} MB", size as f64 / 1e6);
    }
}

/// `compare` of a 4-level ladder (F32 reference from the source, Q8_0, Q4_K_M, Q2_K) on 20 prompts:
/// wall time, and the share of it spent outside llama.cpp's decode (loading, tokenizing, writing,
/// analysis and the report).
fn bench_compare(source: &std::path::Path) {
    use gguf_trace::cli::{CompareArgs, PromptArgs};
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("ref.F32.gguf");
    let ty = |s: &str| gguf_trace::quant::parse_types(s).unwrap()[0].1;
    gguf_trace::llama::quantize::quantize(source, &f32_path, ty("f32"), default_threads(), true)
        .unwrap();
    let mut models = vec![f32_path.clone()];
    for (name, ftype) in [
        ("Q8_0", ty("q8_0")),
        ("Q4_K_M", ty("q4_k_m")),
        ("Q2_K", ty("q2_k")),
    ] {
        let p = dir.path().join(format!("ref.{name}.gguf"));
        gguf_trace::llama::quantize::quantize(&f32_path, &p, ftype, default_threads(), false)
            .unwrap();
        models.push(p);
    }
    let pf = dir.path().join("prompts.txt");
    std::fs::write(&pf, prompts(20).join("\n")).unwrap();
    let out = dir.path().join("cmp");
    let args = CompareArgs {
        models,
        models_pos: vec![],
        answers: gguf_trace::cli::When::Never,
        input: PromptArgs {
            prompts: vec![],
            files: vec![pf],
            chat: false,
            system: None,
        },
        output: out.clone(),
        force: false,
        reference: None,
        lens: false,
        title: None,
        resume: false,
        capture: gguf_trace::settings::CaptureArgs::default(),
    };
    let t = Instant::now();
    gguf_trace::commands::compare::run(&args, &mut std::io::sink()).unwrap();
    let wall = t.elapsed().as_secs_f64();
    let mut decode = 0.0;
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path().join("run.json");
        if p.exists() {
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            decode += m["timings"]["decode_s"].as_f64().unwrap();
        }
    }
    println!("compare_4_levels_20_prompts_wall: {wall:.2} s");
    println!(
        "compare_share_outside_decode: {:.1} %",
        100.0 * (wall - decode) / wall
    );
}

/// Peak resident memory (VmHWM) of a `gguf-trace` run, polled from /proc while it runs.
fn peak_rss_mib(args: &[&str]) -> f64 {
    peak_rss_and_time(args).0
}

/// Peak resident memory (MiB), wall time (s) and success of a `gguf-trace` run.
fn peak_rss_and_time(args: &[&str]) -> (f64, f64, bool) {
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("gguf-trace");
    let t = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("target/release/gguf-trace (scripts/bench builds it)");
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let ok = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.success();
        }
        if let Ok(t) = std::fs::read_to_string(&status) {
            if let Some(v) = t
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(v);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (peak_kib as f64 / 1024.0, t.elapsed().as_secs_f64(), ok)
}

/// `report` on the traced SmolLM2 runs of [`bench_memory`] (200 and 2,000 labeled prompts) and
/// on a synthetic run the size of a big-model study — 2,000 prompts × 81 points × 8,192 wide
/// (last.npy 5.3 GB in f32, states 2.7 GB in f16), written with the run-format code: time and
/// peak RSS. Memory must follow what is drawn, not the number of prompts or the width.
fn bench_report_scale(traced: &std::path::Path) {
    for n in [200, 2000] {
        let run = traced.join(format!("r{n}"));
        let out = traced.join(format!("report{n}.html"));
        let (rss, secs, ok) =
            peak_rss_and_time(&["report", run.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(ok, "report of r{n}");
        println!("report_smollm2_{n}_prompts: {secs:.2} s, peak RSS {rss:.0} MiB");
    }
    let (n, layers, width) = (2000, 80, 8192);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("big");
    let t = Instant::now();
    gguf_trace::run::synthetic::write_with(
        &run,
        n,
        layers,
        width,
        &["a", "b"],
        3,
        gguf_trace::run::Dtype::F16,
    )
    .unwrap();
    let last = std::fs::metadata(run.join("last.npy")).unwrap().len();
    println!(
        "synthetic_run: {n} prompts x {} points x {width} wide, last.npy {:.2} GB (written in {:.0} s)",
        layers + 1,
        last as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let out = dir.path().join("big.html");
    let (rss, secs, ok) =
        peak_rss_and_time(&["report", run.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "report of the synthetic run");
    println!(
        "report_synthetic_{n}x{}x{width}: {secs:.1} s, peak RSS {rss:.0} MiB",
        layers + 1
    );
}

/// `n` bench prompts labeled "even"/"odd" in `dir/p<n>.jsonl`.
fn labeled_prompts(dir: &std::path::Path, n: usize) -> PathBuf {
    let pf = dir.join(format!("p{n}.jsonl"));
    let lines: Vec<String> = prompts(n)
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let label = if i % 2 == 0 { "even" } else { "odd" };
            serde_json::json!({"text": t, "label": label}).to_string()
        })
        .collect();
    std::fs::write(&pf, lines.join("\n")).unwrap();
    pf
}

/// `gguf-trace trace -m model -f prompts --positions pos -o out`: peak RSS (MiB), seconds, success.
fn trace_cli(
    model: &str,
    prompts: &std::path::Path,
    pos: &str,
    out: &std::path::Path,
) -> (f64, f64, bool) {
    peak_rss_and_time(&[
        "trace",
        "-m",
        model,
        "-f",
        prompts.to_str().unwrap(),
        "--positions",
        pos,
        "-o",
        out.to_str().unwrap(),
    ])
}

/// Seconds of `K` configurations per round, run side by side so that each round's runs share
/// this machine's speed at that moment (it drifts by ±10% between rounds here).
struct Rounds<const K: usize>(Vec<[f64; K]>);

impl<const K: usize> Rounds<K> {
    fn median(&self, k: usize) -> f64 {
        median(self.0.iter().map(|r| r[k]).collect())
    }

    /// Configuration `a` over `b`: the median of the paired (same-round) ratios with their range,
    /// and the ratio of the fastest runs (the least disturbed estimate of the intrinsic cost).
    fn ratio(&self, a: usize, b: usize) -> String {
        let r: Vec<f64> = self.0.iter().map(|x| x[a] / x[b]).collect();
        let (n, lo, hi) = (r.len(), r[0], r[0]);
        let (lo, hi) = r.iter().fold((lo, hi), |(l, h), &x| (l.min(x), h.max(x)));
        let fastest = |k: usize| self.0.iter().map(|x| x[k]).fold(f64::INFINITY, f64::min);
        format!(
            "{:.3} x (paired rounds {lo:.3}–{hi:.3}, n {n}; fastest runs {:.3} x)",
            median(r),
            fastest(a) / fastest(b)
        )
    }
}

/// Traced vs untraced decoding, `reps` rounds of: [0] traced (every position), [1] untraced with
/// the same outputs, [2] traced `--positions last`, [3] untraced last-token decoding, [4] traced
/// `--positions last` at the last point only (one graph split per decode instead of one per
/// point); `n_seq` sequences per batch. Each round alternates which of a pair runs first.
fn traced_vs_untraced(model: &Model, toks: &[Vec<i32>], n_seq: usize, reps: usize) -> Rounds<5> {
    plain_time(model, &toks[..4], n_seq, true, false);
    trace_time(model, &toks[..4], |c| c.n_seq = n_seq);
    let last_point = model.n_layer();
    let traced_all = || trace_time(model, toks, |c| c.n_seq = n_seq);
    let plain_all = || plain_time(model, toks, n_seq, true, false);
    let traced_last = || {
        trace_time(model, toks, |c| {
            c.n_seq = n_seq;
            c.positions = Positions::Last
        })
    };
    let plain_last = || plain_time(model, toks, n_seq, false, false);
    let one_point = || {
        trace_time(model, toks, |c| {
            c.n_seq = n_seq;
            c.positions = Positions::Last;
            c.points = vec![last_point];
        })
    };
    Rounds(
        (0..reps)
            .map(|round| {
                if round % 2 == 0 {
                    let (ta, pa) = (traced_all(), plain_all());
                    let (tl, pl, tp) = (traced_last(), plain_last(), one_point());
                    [ta, pa, tl, pl, tp]
                } else {
                    let (pa, ta) = (plain_all(), traced_all());
                    let (tp, pl, tl) = (one_point(), plain_last(), traced_last());
                    [ta, pa, tl, pl, tp]
                }
            })
            .collect(),
    )
}

/// Peak memory of `trace` for 200 vs 2,000 prompts (`--positions last`) and one ~2,000-token
/// prompt: memory must not grow with the number or length of prompts beyond one batch.
fn bench_memory(model: &std::path::Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let m = model.to_str().unwrap();
    for n in [200, 2000] {
        // Labeled (two labels) so the report of these runs has groups and a contrast.
        let pf = labeled_prompts(dir.path(), n);
        let out = dir.path().join(format!("r{n}"));
        let (rss, _, _) = trace_cli(m, &pf, "last", &out);
        println!("trace_peak_rss_{n}_prompts: {rss:.0} MiB");
    }
    let long = "The river bends past the old mill and the valley widens. ".repeat(170);
    let out = dir.path().join("long");
    let rss = peak_rss_mib(&[
        "trace",
        "-m",
        m,
        "-p",
        &long,
        "--ctx",
        "2200",
        "--positions",
        "last",
        "-o",
        out.to_str().unwrap(),
    ]);
    println!("trace_peak_rss_one_2000_token_prompt: {rss:.0} MiB");
    dir
}

/// Traced over an in-process loopback RPC server vs local, same prompts: time ratio and bytes read
/// from the backend per token, with every position and with the last only.
fn bench_rpc(path: &std::path::Path) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let ep = endpoint.clone();
    std::thread::spawn(move || gguf_trace::llama::rpc::serve(&ep, default_threads() as usize));
    while std::net::TcpStream::connect(&endpoint).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let local = Model::load(path, &LoadOptions::default()).unwrap();
    gguf_trace::llama::rpc::add_servers(std::slice::from_ref(&endpoint)).unwrap();
    let remote = Model::load(
        path,
        &LoadOptions {
            n_gpu_layers: 999,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let toks: Vec<Vec<i32>> = prompts(16)
        .iter()
        .map(|t| tokenize_prompt(&local, t).unwrap())
        .collect();
    let n_tokens: usize = toks.iter().map(Vec::len).sum();
    let timed = |model: &Model, last: bool| -> (f64, u64) {
        let mut cfg = TraceConfig::new(model);
        if last {
            cfg.positions = Positions::Last;
        }
        let mut tracer = Tracer::new(model, cfg).unwrap();
        let t = Instant::now();
        tracer.trace(&toks, |_| Ok(()), |_| {}).unwrap();
        (t.elapsed().as_secs_f64(), tracer.bytes_read())
    };
    timed(&remote, false);
    for (label, last) in [("all", false), ("last", true)] {
        let (mut r, mut l, mut bytes) = (vec![], vec![], 0);
        for _ in 0..3 {
            let (t, b) = timed(&remote, last);
            r.push(t);
            bytes = b;
            l.push(timed(&local, last).0);
        }
        println!(
            "rpc_loopback_vs_local_traced_positions_{label}: {:.2} x",
            median(r) / median(l)
        );
        println!(
            "bytes_read_per_token_positions_{label}: {:.0} B ({n_tokens} prompt tokens)",
            bytes as f64 / n_tokens as f64
        );
    }
}

/// Real size (`GGUF_TRACE_BENCH=real`, the 1.5B): traced vs untraced with the same outputs, the
/// last position vs untraced last-token decoding, tokens/s, peak RSS of `trace` (24 prompts, every
/// position and the last), and `report` of a 200-prompt run.
fn bench_real(path: &std::path::Path) {
    let model = Model::load(path, &LoadOptions::default()).expect("model loads");
    let name = model.meta("general.name").unwrap_or_default();
    let toks: Vec<Vec<i32>> = prompts(16)
        .iter()
        .map(|t| tokenize_prompt(&model, t).unwrap())
        .collect();
    let n_tokens: usize = toks.iter().map(Vec::len).sum();
    let o = traced_vs_untraced(&model, &toks, 8, REPS);
    let [ta, tl, pl] = [0, 2, 3].map(|k| o.median(k));
    println!(
        "[{name}] {} prompts, {n_tokens} tokens, {} threads",
        toks.len(),
        default_threads()
    );
    println!(
        "real traced_all_vs_untraced_same_outputs: {}",
        o.ratio(0, 1)
    );
    println!("real traced_last_vs_plain_last_token: {}", o.ratio(2, 3));
    println!(
        "real traced_last_one_point_vs_plain_last_token: {}",
        o.ratio(4, 3)
    );
    println!(
        "real traced_last_vs_untraced_generation (4 prompts x 32 tokens, one at a time): {}",
        generation_overhead(&model, &toks[..4], 32, REPS).ratio(0, 1)
    );
    println!(
        "real tokens_per_s: traced all {:.1}, traced last {:.1}, untraced last {:.1}",
        n_tokens as f64 / ta,
        n_tokens as f64 / tl,
        n_tokens as f64 / pl
    );
    drop(model);
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("p24.txt");
    std::fs::write(&pf, prompts(24).join("\n")).unwrap();
    let m = path.to_str().unwrap();
    for pos in ["all", "last"] {
        let (rss, secs, ok) = trace_cli(m, &pf, pos, &dir.path().join(format!("r24{pos}")));
        assert!(ok, "trace --positions {pos}");
        println!("real trace_24_prompts_positions_{pos}: {secs:.1} s, peak RSS {rss:.0} MiB");
    }
    let pf = labeled_prompts(dir.path(), 200);
    let run = dir.path().join("r200");
    let (rss, secs, ok) = trace_cli(m, &pf, "last", &run);
    assert!(ok, "trace of 200 prompts");
    println!("real trace_200_prompts_positions_last: {secs:.1} s, peak RSS {rss:.0} MiB");
    let out = dir.path().join("r200.html");
    let (rss, secs, ok) =
        peak_rss_and_time(&["report", run.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "report of 200 prompts");
    println!("real report_200_prompts: {secs:.2} s, peak RSS {rss:.0} MiB");
}

/// On a GPU build (`GGUF_TRACE_BENCH=gpu`): every layer offloaded, traced vs untraced with the
/// same outputs and the last position vs untraced last-token decoding, tokens/s.
fn bench_gpu(path: &std::path::Path) {
    let model = Model::load(
        path,
        &LoadOptions {
            n_gpu_layers: 999,
            ..LoadOptions::default()
        },
    )
    .expect("model loads");
    let name = model.meta("general.name").unwrap_or_default();
    let toks: Vec<Vec<i32>> = prompts(64)
        .iter()
        .map(|t| tokenize_prompt(&model, t).unwrap())
        .collect();
    let n_tokens: usize = toks.iter().map(Vec::len).sum();
    let o = traced_vs_untraced(&model, &toks, 16, REPS);
    let [ta, pa, tl, pl] = [0, 1, 2, 3].map(|k| o.median(k));
    println!("[gpu {name}] {} prompts, {n_tokens} tokens", toks.len());
    println!("gpu traced_all_vs_untraced_same_outputs: {}", o.ratio(0, 1));
    println!("gpu traced_last_vs_plain_last_token: {}", o.ratio(2, 3));
    println!(
        "gpu tokens_per_s: traced all {:.0}, untraced all {:.0}, traced last {:.0}, untraced last {:.0}",
        n_tokens as f64 / ta,
        n_tokens as f64 / pa,
        n_tokens as f64 / tl,
        n_tokens as f64 / pl
    );
}

/// Taps inside the block (`GGUF_TRACE_BENCH=taps`, and part of the default run): traced with
/// resid + attn_out + mlp_out, and with every tap, vs untraced with the same outputs and vs a
/// residual-only trace; every position, medians of alternated runs.
fn bench_taps(path: &std::path::Path) {
    use gguf_trace::capture::taps::Tap;
    let model = Model::load(path, &LoadOptions::default()).expect("model loads");
    let name = model.meta("general.architecture").unwrap_or_default();
    let toks: Vec<Vec<i32>> = prompts(16)
        .iter()
        .map(|t| tokenize_prompt(&model, t).unwrap())
        .collect();
    let three = vec![Tap::AttnOut, Tap::MlpOut];
    let all = vec![
        Tap::ResidMid,
        Tap::AttnOut,
        Tap::MlpOut,
        Tap::Z,
        Tap::Neurons,
    ];
    plain_time(&model, &toks, 8, true, false);
    trace_time(&model, &toks, |c| c.taps = all.clone());
    let mut t: [Vec<f64>; 6] = Default::default();
    for _ in 0..REPS {
        // `pattern` decodes one prompt at a time without flash attention: against a residual
        // trace of one prompt at a time with it.
        t[4].push(trace_time(&model, &toks, |c| {
            c.n_seq = 1;
            c.taps = vec![Tap::Pattern];
        }));
        t[5].push(trace_time(&model, &toks, |c| c.n_seq = 1));
        t[0].push(plain_time(&model, &toks, 8, true, false));
        t[1].push(trace_time(&model, &toks, |c| c.n_seq = 8));
        t[2].push(trace_time(&model, &toks, |c| {
            c.n_seq = 8;
            c.taps = three.clone();
        }));
        t[3].push(trace_time(&model, &toks, |c| {
            c.n_seq = 8;
            c.taps = all.clone();
        }));
    }
    let [plain, resid, ram, every, pattern, one] = t.map(median);
    println!(
        "{name} taps_pattern_vs_resid_one_prompt_at_a_time: {:.3} x",
        pattern / one
    );
    println!(
        "{name} taps_resid_attn_mlp_vs_untraced_same_outputs: {:.3} x",
        ram / plain
    );
    println!(
        "{name} taps_resid_only_vs_untraced_same_outputs: {:.3} x",
        resid / plain
    );
    println!(
        "{name} taps_resid_attn_mlp_vs_resid_only: {:.3} x",
        ram / resid
    );
    println!(
        "{name} taps_all_five_vs_untraced_same_outputs: {:.3} x",
        every / plain
    );
}

fn main() {
    let paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    assert!(!paths.is_empty(), "usage: bench MODEL.gguf...");
    gguf_trace::llama::backend::init();
    if std::env::var("GGUF_TRACE_BENCH").as_deref() == Ok("taps") {
        for p in &paths {
            bench_taps(p);
        }
        return;
    }
    if std::env::var("GGUF_TRACE_BENCH").as_deref() == Ok("gpu") {
        for p in &paths {
            bench_gpu(p);
        }
        return;
    }
    if std::env::var("GGUF_TRACE_BENCH").as_deref() == Ok("real") {
        bench_real(&paths[0]);
        return;
    }
    if std::env::var("GGUF_TRACE_BENCH").as_deref() == Ok("report") {
        // Only the report's scale benchmark.
        let traced = bench_memory(&paths[0]);
        bench_report_scale(traced.path());
        return;
    }
    bench_report();
    for p in &paths {
        bench_taps(p);
    }
    bench_compare(&paths[0]);
    let traced = bench_memory(&paths[0]);
    bench_report_scale(traced.path());
    drop(traced);
    for path in paths.clone() {
        let model = Model::load(&path, &LoadOptions::default()).expect("model loads");
        let name = model.meta("general.architecture").unwrap_or_default();
        let texts = prompts(64);
        let toks: Vec<Vec<i32>> = texts
            .iter()
            .map(|t| tokenize_prompt(&model, t).unwrap())
            .collect();
        let n_tokens: usize = toks.iter().map(Vec::len).sum();
        let set = &toks[..16];
        let n_seq = TraceConfig::new(&model).n_seq;
        // Warm up (page in the weights, build graphs).
        plain_time(&model, set, 8, true, false);
        trace_time(&model, set, |_| {});

        let (mut traced_all, mut traced_last, mut plain_all, mut plain_last, mut embd_all) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..REPS {
            traced_all.push(trace_time(&model, set, |_| {}));
            plain_all.push(plain_time(&model, set, 8, true, false));
            traced_last.push(trace_time(&model, set, |c| c.positions = Positions::Last));
            plain_last.push(plain_time(&model, set, 8, false, false));
            embd_all.push(plain_time(&model, set, 8, true, true));
        }
        let (ta, pa, tl, pl, ea) = (
            median(traced_all),
            median(plain_all),
            median(traced_last),
            median(plain_last),
            median(embd_all),
        );
        println!(
            "[{name}] {} prompts, {} tokens, {} threads",
            set.len(),
            set.iter().map(Vec::len).sum::<usize>(),
            default_threads()
        );
        println!(
            "{name} traced_all_vs_untraced_same_outputs: {:.3} x",
            ta / pa
        );
        println!("{name} traced_last_vs_plain_last_token: {:.3} x", tl / pl);
        println!("{name} traced_all_vs_plain_last_token: {:.3} x", ta / pl);
        println!(
            "{name} untraced_all_outputs_vs_last_token: {:.3} x",
            pa / pl
        );
        println!(
            "{name} embeddings_mode_all_outputs_vs_last_token: {:.3} x",
            ea / pl
        );

        let (mut batched, mut single) = (vec![], vec![]);
        for _ in 0..3 {
            batched.push(trace_time(&model, &toks, |c| c.positions = Positions::Last));
            single.push(trace_time(&model, &toks, |c| {
                c.positions = Positions::Last;
                c.n_seq = 1;
            }));
        }
        let (b, s) = (median(batched), median(single));
        let pb = median(
            (0..3)
                .map(|_| plain_time(&model, &toks, n_seq, false, false))
                .collect(),
        );
        let ps = median(
            (0..3)
                .map(|_| plain_time(&model, &toks, 1, false, false))
                .collect(),
        );
        println!(
            "{name} untraced_batched_vs_one_at_a_time_speedup: {:.2} x",
            ps / pb
        );
        println!("{name} prompts_per_s_batched: {:.1} prompts/s ({} prompts, {n_tokens} tokens, {n_seq} sequences per batch)", toks.len() as f64 / b, toks.len());
        println!(
            "{name} prompts_per_s_one_at_a_time: {:.1} prompts/s",
            toks.len() as f64 / s
        );
        println!("{name} batched_vs_one_at_a_time_speedup: {:.2} x", s / b);
    }
    // Last: once an RPC server is registered it joins every later load's device list.
    bench_rpc(&paths[0]);
}
