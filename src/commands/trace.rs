//! `gguf-trace trace`: prompts → run directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};

use super::{bar, human_bytes, load_model};
use crate::analysis::lens;
use crate::capture::arch;
use crate::capture::engine::{Positions, PromptTrace, TraceConfig, Tracer};
use crate::chat;
use crate::cli::{default_gpu_layers, parse_control_points, parse_points, TraceArgs};
use crate::llama::backend;
use crate::llama::gguf::Gguf;
use crate::llama::lens::LensHead;
use crate::llama::model::{LoadOptions, Model};
use crate::model_info::ModelFacts;
use crate::prompts::{self, Prompt};
use crate::run::{
    self, CaptureSettings, Manifest, PromptRecord, Provenance, RunShape, RunWriter, Timings,
};
use crate::run::{LensInfo, PromptLens};

/// A prompt ready to trace.
pub struct Prepared {
    pub prompt: Prompt,
    pub rendered: String,
    pub tokens: Vec<i32>,
}

/// Render (with --chat) and tokenize every prompt.
pub fn prepare(
    model: &Model,
    prompts: Vec<Prompt>,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<Prepared>> {
    prompts
        .into_iter()
        .map(|prompt| {
            let rendered = if chat {
                chat::render_chat(model, system, &prompt.text)?
            } else {
                prompt.text.clone()
            };
            let tokens = chat::tokenize_prompt(model, &rendered)
                .with_context(|| format!("{}: tokenizing", prompt.source))?;
            if tokens.is_empty() {
                bail!("{}: the prompt has no tokens", prompt.source);
            }
            Ok(Prepared {
                prompt,
                rendered,
                tokens,
            })
        })
        .collect()
}

/// SHA-256 of a file, computed on a background thread while tracing runs.
fn hash_in_background(path: PathBuf) -> std::thread::JoinHandle<std::io::Result<String>> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(format!("{:x}", h.finalize()))
    })
}

pub fn run(args: &TraceArgs, out: &mut dyn Write) -> Result<()> {
    let t0 = Instant::now();
    // Everything that can be checked without the model is checked first: no waiting for a load
    // to learn that the output exists or a prompt file is malformed.
    let prompts = prompts::collect(&args.input.prompts, &args.input.files)?;
    run::check_output(&args.output, args.force)?;
    if args.ctx == 0 || args.n_seq == 0 || args.batch_size == 0 || args.ubatch_size == 0 {
        bail!("--ctx, --n-seq, --batch-size and --ubatch-size must be at least 1");
    }
    let n_gpu_layers = args.n_gpu_layers.unwrap_or_else(default_gpu_layers);
    let model = load_model(
        &args.model,
        LoadOptions {
            n_gpu_layers,
            vocab_only: false,
        },
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let hasher = hash_in_background(args.model.clone());
    if let Some(why) = arch::untraceable_reason(&model) {
        bail!("{}: cannot be traced: {why}", args.model.display());
    }
    let gguf = Gguf::open(&args.model)?;
    let facts = ModelFacts::gather(&args.model, &model, &gguf);
    let points = parse_points(&args.points, model.n_layer()).map_err(anyhow::Error::msg)?;
    let prepared = prepare(
        &model,
        prompts,
        args.input.chat,
        args.input.system.as_deref(),
    )?;

    let positions: Positions = args.positions.into();
    let cfg = TraceConfig {
        positions,
        points: points.clone(),
        generate: args.generate,
        ctx: args.ctx,
        n_seq: args.n_seq.min(prepared.len()),
        n_batch: args.batch_size,
        n_ubatch: args.ubatch_size,
        threads: args
            .threads
            .unwrap_or_else(crate::capture::engine::default_threads),
    };
    let token_lists: Vec<Vec<i32>> = prepared.iter().map(|p| p.tokens.clone()).collect();

    // Size estimate (generation may stop early at an end-of-generation token, so this is an upper bound).
    let kept: Vec<usize> = token_lists
        .iter()
        .map(|t| match positions {
            Positions::All => t.len() + args.generate,
            Positions::Last => 1 + args.generate,
        })
        .collect();
    let (dtype, format) = (args.dtype.into(), args.format.into());
    let estimate = run::estimate_bytes(
        points.len(),
        &kept,
        model.n_embd(),
        model.n_vocab(),
        dtype,
        format,
    );
    let parent = match args.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let free = fs4::available_space(&parent).ok();
    eprintln!(
        "tracing {} prompt(s) through {} ({} points × {} width); estimated output {}{}",
        prepared.len(),
        facts.file_name,
        points.len(),
        model.n_embd(),
        human_bytes(estimate),
        free.map(|f| format!(", {} free", human_bytes(f)))
            .unwrap_or_default()
    );
    if let Some(free) = free {
        if free < estimate {
            bail!(
                "not enough disk space in {}: the run needs about {}, {} is free",
                parent.display(),
                human_bytes(estimate),
                human_bytes(free)
            );
        }
    }

    let mut tracer = Tracer::new(&model, cfg.clone())?;
    tracer.check_prompts(&token_lists)?;
    let control_points = steer(&mut tracer, args, &model)?;
    let shape = RunShape {
        n_prompts: prepared.len(),
        n_points: points.len(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
    };
    let mut lens = match args.lens {
        false => None,
        true => {
            if points.len() != model.n_layer() + 1 {
                bail!("--lens needs every point (the last point is the model's own output); drop --points");
            }
            let head = LensHead::load(&args.model, &gguf, cfg.threads).with_context(|| {
                format!("{}: loading the logit-lens head", args.model.display())
            })?;
            Some(LensState {
                head,
                prompts: Vec::new(),
                max_diff: 0.0,
            })
        }
    };
    let mut writer = RunWriter::create(&args.output, args.force, shape, dtype, format)?;

    let total_tokens: usize = token_lists.iter().map(|t| t.len() + args.generate).sum();
    let pb = bar(total_tokens as u64, "tokens");
    pb.set_message("tracing");
    let mut records: Vec<PromptRecord> = Vec::with_capacity(prepared.len());
    let t_trace = Instant::now();
    let mut decoded = 0usize;
    let result = tracer.trace(
        &token_lists,
        |t: PromptTrace| {
            let p = &prepared[t.index];
            let pieces: Vec<String> = t.tokens.iter().map(|&tok| model.token_piece(tok)).collect();
            let states_file = writer.write_prompt(
                &t,
                &points,
                &p.prompt.id,
                p.prompt.label.as_deref(),
                &pieces,
            )?;
            if let Some(l) = lens.as_mut() {
                l.add(&t, &points, args.lens_all, args.lens_k, &model)?;
            }
            records.push(PromptRecord {
                index: t.index,
                id: p.prompt.id.clone(),
                label: p.prompt.label.clone(),
                source: p.prompt.source.clone(),
                text: p.prompt.text.clone(),
                rendered: p.rendered.clone(),
                generated_text: model.detokenize(t.generated(), false),
                tokens: t.tokens,
                pieces,
                n_prompt_tokens: t.n_prompt,
                positions: t.positions,
                states_file,
            });
            Ok(())
        },
        |n| {
            decoded += n;
            pb.inc(n as u64);
        },
    );
    pb.finish_and_clear();
    if let Err(e) = result {
        if backend::interrupted() {
            bail!("interrupted: no run was written");
        }
        return Err(e.into());
    }
    let trace_s = t_trace.elapsed().as_secs_f64();
    let lens_info = match lens {
        None => None,
        Some(l) => {
            writer.write_json(run::LENS_JSON, &l.prompts)?;
            let valid = l.max_diff <= LENS_TOLERANCE;
            if !valid {
                eprintln!(
                    "warning: the logit lens does not reproduce this model's own logits (max |difference| {:.3e} > {LENS_TOLERANCE:e}); its numbers are marked invalid and the report will not show them",
                    l.max_diff
                );
            }
            Some(LensInfo {
                k: args.lens_k,
                positions: if args.lens_all {
                    "all".into()
                } else {
                    "last".into()
                },
                output_tensor: l.head.output_tensor.clone(),
                norm: format!("{:?}", l.head.norm).to_lowercase(),
                eps: l.head.eps,
                softcap: l.head.softcap,
                self_check_max_abs_diff: l.max_diff,
                tolerance: LENS_TOLERANCE,
                valid,
            })
        }
    };
    let sha = hasher
        .join()
        .map_err(|_| anyhow::anyhow!("hashing thread panicked"))?
        .with_context(|| format!("{}: hashing", args.model.display()))?;

    let manifest = Manifest {
        schema_version: run::SCHEMA_VERSION,
        complete: false,
        tool: env!("CARGO_PKG_NAME").into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        created: chrono::Utc::now().to_rfc3339(),
        provenance: Provenance {
            model_sha256: sha,
            llama_cpp_sys_2: crate::llama::LLAMA_CPP_SYS_VERSION.into(),
            system_info: backend::system_info(),
            devices: backend::devices(),
            command_line: std::env::args().collect(),
        },
        capture: CaptureSettings {
            point_tensors: points
                .iter()
                .map(|&p| arch::point_tensor(&facts.architecture, p))
                .collect(),
            points,
            positions,
            generate: args.generate,
            chat: args.input.chat,
            system: args.input.system.clone(),
            dtype,
            format,
            ctx: cfg.ctx,
            n_seq: cfg.n_seq,
            n_batch: cfg.n_batch,
            n_ubatch: cfg.n_ubatch,
            threads: cfg.threads,
            n_gpu_layers,
            control_vectors: args
                .control_vectors
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            control_scale: if args.control_vectors.is_empty() {
                0.0
            } else {
                args.control_scale
            },
            control_points,
        },
        model: facts,
        prompts: records,
        timings: Timings {
            load_s,
            trace_s,
            decode_s: tracer.decode_seconds(),
            total_s: t0.elapsed().as_secs_f64(),
            tokens_decoded: decoded,
            tokens_per_s: decoded as f64 / trace_s.max(1e-9),
        },
        lens: lens_info,
    };
    let dir = writer.finish(&manifest)?;
    eprintln!(
        "traced {} prompt(s), {} tokens in {:.1} s ({:.0} tokens/s)",
        manifest.prompts.len(),
        decoded,
        trace_s,
        manifest.timings.tokens_per_s
    );
    writeln!(out, "{}", display_path(&dir))?;
    Ok(())
}

/// Largest |lens logit − model logit| accepted by the self-check. The lens runs the same ggml CPU
/// kernels on the same quantized matrix as llama.cpp's output layer, so it agrees to float rounding
/// of the norm (measured ~1e-5 on SmolLM2 and Gemma-3); anything large means the architecture's
/// output head is not what the lens computes.
pub const LENS_TOLERANCE: f64 = 1e-2;

/// The logit lens during a trace: the head, the per-prompt results, the self-check.
struct LensState {
    head: LensHead,
    prompts: Vec<PromptLens>,
    max_diff: f64,
}

impl LensState {
    fn add(
        &mut self,
        t: &PromptTrace,
        points: &[usize],
        all: bool,
        k: usize,
        model: &Model,
    ) -> Result<()> {
        let last = t.last_prompt_slot();
        let cols: Vec<usize> = if all {
            (0..t.positions.len()).collect()
        } else {
            vec![last]
        };
        let (n_points, n_vocab) = (points.len(), self.head.n_vocab);
        let mut traces = Vec::with_capacity(cols.len());
        let mut pieces = std::collections::BTreeMap::new();
        for j in cols {
            let x: Vec<f32> = t
                .states
                .slice(ndarray::s![.., j, ..])
                .iter()
                .copied()
                .collect();
            let logits = self.head.logits(&x, n_points)?;
            if j == last {
                let lens_final = &logits[(n_points - 1) * n_vocab..];
                let d = lens_final
                    .iter()
                    .zip(&t.logits)
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
                self.max_diff = self.max_diff.max(d);
            }
            let tr = lens::lens(&logits, n_vocab, points, k, t.positions[j]);
            for lp in &tr.points {
                for &id in &lp.top_ids {
                    pieces.entry(id).or_insert_with(|| model.token_piece(id));
                }
            }
            pieces
                .entry(tr.final_token)
                .or_insert_with(|| model.token_piece(tr.final_token));
            traces.push(tr);
        }
        self.prompts.push(PromptLens {
            index: t.index,
            pieces,
            traces,
            last_prompt_position: t.n_prompt - 1,
        });
        Ok(())
    }
}

/// Load `--control-vector` files (llama.cpp's loader rules) and apply them scaled to the chosen
/// points. Returns the steered points.
fn steer(tracer: &mut Tracer, args: &TraceArgs, model: &Model) -> Result<Option<(usize, usize)>> {
    if args.control_vectors.is_empty() {
        if args.control_points.is_some() {
            bail!("--control-points needs --control-vector");
        }
        return Ok(None);
    }
    let files: Vec<(&Path, f32)> = args
        .control_vectors
        .iter()
        .map(|p| (p.as_path(), args.control_scale))
        .collect();
    for (p, _) in &files {
        super::check_gguf_path(p)?;
    }
    let cv = crate::cvec::load(&files, model.n_embd())?;
    let n_layer = model.n_layer();
    let (a, b) = match &args.control_points {
        Some(spec) => parse_control_points(spec, n_layer).map_err(anyhow::Error::msg)?,
        None => (2, (cv.n_layers() + 1).min(n_layer)),
    };
    // The buffer llama.cpp takes covers layers 1..n_layer-1; pad (or cut) to that.
    let mut data = cv.data.clone();
    data.resize(model.n_embd() * (n_layer - 1), 0.0);
    tracer.set_control_vector(Some((&data, (a - 1) as i32, (b - 1) as i32)))?;
    Ok(Some((a, b)))
}

fn display_path(p: &Path) -> String {
    p.display().to_string()
}
