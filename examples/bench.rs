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
            n_ctx: (512 * n_seq) as u32,
            n_batch: 512,
            n_ubatch: 512,
            n_seq_max: n_seq as u32,
            n_threads: default_threads(),
            embeddings,
            capture: None,
        },
    )
    .unwrap();
    let t = Instant::now();
    plain::decode_prompts(&mut ctx, toks, n_seq, 512, output_all).unwrap();
    t.elapsed().as_secs_f64()
}

/// Report time for synthetic runs of 200 and 2000 prompts × 31 points × 576 dims, and HTML size.
fn bench_report() {
    let dir = tempfile::tempdir().unwrap();
    for n in [200, 2000] {
        let run = dir.path().join(format!("run{n}"));
        gguf_trace::run::synthetic::write(&run, n, 30, 576, &["a", "b"], 1).unwrap();
        let out = dir.path().join(format!("report{n}.html"));
        let t = Instant::now();
        gguf_trace::commands::report::write_report(&[run.as_path()], &out, None, None, false)
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
    use gguf_trace::cli::{CompareArgs, PositionsArg, PromptArgs};
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
        input: PromptArgs {
            prompts: vec![],
            files: vec![pf],
            chat: false,
            system: None,
        },
        positions: PositionsArg::All,
        generate: 0,
        output: out.clone(),
        force: false,
        reference: None,
        lens: false,
        title: None,
        resume: false,
        ctx: 512,
        threads: None,
        n_gpu_layers: None,
        rpc: gguf_trace::cli::RpcArgs {
            rpc: None,
            tensor_split: None,
        },
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

fn main() {
    let paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    assert!(!paths.is_empty(), "usage: bench MODEL.gguf...");
    gguf_trace::llama::backend::init();
    bench_report();
    bench_compare(&paths[0]);
    for path in paths {
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
}
