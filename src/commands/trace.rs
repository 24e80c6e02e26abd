//! `gguf-trace trace`: prompts → run directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::{bar, human_bytes, load_model};
use crate::analysis::lens;
use crate::capture::arch;
use crate::capture::engine::{
    Patch, PatchPositions, Positions, PromptTrace, TapInfo, TraceConfig, Tracer,
};
use crate::capture::taps::Tap;
use crate::chat;
use crate::cli::{parse_control_points, parse_points, PromptArgs, TraceArgs};
use crate::llama::backend;
use crate::llama::context::Edit;
use crate::llama::gguf::Gguf;
use crate::llama::lens::LensHead;
use crate::llama::model::{LoadOptions, Model};
use crate::model_info::{ModelFacts, Trust};
use crate::prompts::{self, Prompt};
use crate::run::{
    self, CaptureSettings, Dtype, Manifest, PromptRecord, Provenance, RunShape, RunWriter, Timings,
};
use crate::run::{LensInfo, PromptLens};
use crate::settings::CaptureArgs;

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

/// SHA-256 of the model, from the cache (`model_hash`) or computed on a background thread while
/// tracing runs.
fn hash_in_background(path: PathBuf) -> std::thread::JoinHandle<std::io::Result<String>> {
    std::thread::spawn(move || crate::model_hash::sha256(&path).map(|(sha, _)| sha))
}

/// The logit lens settings of a trace.
#[derive(Debug, Clone)]
pub struct LensOptions {
    /// Every stored position, not only the last prompt position.
    pub all: bool,
    /// Top tokens kept per point (≥ 1).
    pub k: usize,
}

/// Steering with control vectors.
#[derive(Debug, Clone)]
pub struct Patching {
    pub from: PathBuf,
    /// `--patch-points` and `--patch-positions`, parsed once the model's depth is known.
    pub points: String,
    pub positions: Option<String>,
    /// `--patch-taps`: what is replaced (default: the residual stream).
    pub taps: Vec<Tap>,
    /// `--patch-heads`: only these heads' slices of z (instead of points and taps).
    pub heads: Option<String>,
}

/// `--ablate-heads`: heads whose slice of `z` is set to zero, or to its mean over a run.
#[derive(Debug, Clone)]
pub struct HeadAblation {
    /// `--ablate-heads`, parsed once the model's shape is known.
    pub heads: String,
    pub mean_from: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Ablation {
    pub file: PathBuf,
    /// `--ablate-points`, parsed once the model's depth is known.
    pub points: Option<String>,
    /// `--ablate-direction`: "each", or the point whose direction is used everywhere.
    pub direction: Option<String>,
    /// `--ablate-taps`: the parts whose output loses the direction (empty: the residual stream).
    pub taps: Vec<Tap>,
}

#[derive(Debug, Clone)]
pub struct Steering {
    pub files: Vec<PathBuf>,
    pub scale: f32,
    /// `--control-points A-B`, parsed once the model's depth is known.
    pub points: Option<String>,
}

/// One trace, resolved from the command line (or built by `compare`) and validated before any
/// model is loaded: every command that traces runs this plan, and nothing downstream sees clap.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub model: PathBuf,
    pub input: PromptArgs,
    /// What is captured and how it is laid out: the one settings record (see `crate::settings`).
    pub capture: CaptureArgs,
    pub output: PathBuf,
    pub force: bool,
    pub use_mmap: bool,
    pub lens: Option<LensOptions>,
    /// `--attribution`: direct logit attribution of each prompt's answer.
    pub attribution: Option<super::attribute::AttributionOptions>,
    pub steering: Option<Steering>,
    /// Continue an interrupted trace of the same output (see [`RunWriter::open`]).
    pub resume: bool,
    /// How messages name the output when it is written somewhere else first (compare's runs).
    pub shown_as: Option<PathBuf>,
    /// `--ablate`: directional ablation at chosen points.
    pub ablation: Option<Ablation>,
    /// `--ablate-heads`: attention heads ablated.
    pub head_ablation: Option<HeadAblation>,
    /// `--patch-from`: activation patching from another run.
    pub patching: Option<Patching>,
    /// No progress bar and no "tracing"/"traced" lines (warnings still go to stderr): for
    /// commands that run many traces of their own (`direction --select`).
    pub quiet: bool,
}

impl TraceOptions {
    /// Defaults for tracing `input` through `model` into `output` (what `trace` does without
    /// options).
    pub fn new(model: PathBuf, input: PromptArgs, output: PathBuf) -> TraceOptions {
        let mut capture = CaptureArgs::default();
        // The defaults are valid; this resolves threads and layer placement.
        let _ = capture.validate();
        TraceOptions {
            model,
            input,
            capture,
            output,
            force: false,
            use_mmap: true,
            lens: None,
            attribution: None,
            steering: None,
            resume: false,
            shown_as: None,
            ablation: None,
            head_ablation: None,
            patching: None,
            quiet: false,
        }
    }

    /// The output as messages name it.
    fn shown(&self) -> String {
        self.shown_as
            .as_ref()
            .unwrap_or(&self.output)
            .display()
            .to_string()
    }

    /// Resolve and validate `trace`'s arguments.
    pub fn from_args(a: &TraceArgs) -> Result<TraceOptions> {
        if !a.control_scale.is_empty() && a.control_vectors.is_empty() {
            bail!("--control-scale needs --control-vector");
        }
        if a.control_points.is_some() && a.control_vectors.is_empty() {
            bail!("--control-points needs --control-vector");
        }
        if (a.ablate_points.is_some() || a.ablate_direction.is_some()) && a.ablate.is_none() {
            bail!("--ablate-points and --ablate-direction need --ablate");
        }
        if (a.patch_points.is_some() || a.patch_positions.is_some()) && a.patch_from.is_none() {
            bail!("--patch-points and --patch-positions need --patch-from");
        }
        if a.patch_from.is_some() && a.patch_points.is_none() && a.patch_heads.is_none() {
            bail!("--patch-from needs --patch-points (which points to patch) or --patch-heads");
        }
        if a.patch_taps.is_some() && a.patch_from.is_none() {
            bail!("--patch-taps needs --patch-from");
        }
        if a.patch_heads.is_some() {
            if a.patch_from.is_none() {
                bail!("--patch-heads needs --patch-from");
            }
            if a.patch_points.is_some() || a.patch_taps.is_some() {
                bail!("--patch-heads names the blocks and the tap (z) itself: leave out --patch-points and --patch-taps");
            }
        }
        if a.ablate_taps.is_some() && a.ablate.is_none() {
            bail!("--ablate-taps needs --ablate");
        }
        let ablate_taps = match &a.ablate_taps {
            None => Vec::new(),
            Some(list) => {
                let taps = parse_patch_taps(list).map_err(|e| {
                    anyhow::anyhow!(e.to_string().replace("--patch-taps", "--ablate-taps"))
                })?;
                if let Some(t) = taps
                    .iter()
                    .find(|t| !matches!(t, Tap::AttnOut | Tap::MlpOut | Tap::ResidMid))
                {
                    bail!("--ablate-taps {t}: a direction of the residual stream is removed from attn_out, mlp_out or resid_mid (vectors of its width)");
                }
                taps
            }
        };
        if a.ablate_heads_from.is_some() && a.ablate_heads.is_none() {
            bail!("--ablate-heads-from needs --ablate-heads");
        }
        let patch_taps = match &a.patch_taps {
            None => vec![Tap::Resid],
            Some(list) => parse_patch_taps(list)?,
        };
        let mut capture = a.capture.clone();
        // Taps that are edited must be located in the graph, so they are captured too.
        let mut edited: Vec<Tap> = patch_taps
            .iter()
            .copied()
            .filter(|t| t.in_block())
            .collect();
        if a.ablate_heads.is_some() || a.patch_heads.is_some() {
            edited.push(Tap::Z);
        }
        edited.extend(&ablate_taps);
        for t in edited {
            if !capture.taps.contains(&t) {
                capture.taps.push(t);
            }
        }
        if a.attribution {
            // The attribution reads what attention and the MLP add to the residual stream.
            for t in super::attribute::TAPS {
                if !capture.taps.contains(&t) {
                    capture.taps.push(t);
                }
            }
        }
        capture.validate()?;
        let o = TraceOptions {
            capture,
            force: a.force,
            use_mmap: !a.no_mmap,
            lens: a.lens.then_some(LensOptions {
                all: a.lens_all,
                k: a.lens_k,
            }),
            attribution: a.attribution.then(|| super::attribute::AttributionOptions {
                target: a.target.clone(),
                foil: a.foil.clone(),
            }),
            steering: (!a.control_vectors.is_empty()).then(|| Steering {
                files: a.control_vectors.clone(),
                scale: a.control_scale.first().copied().unwrap_or(1.0),
                points: a.control_points.clone(),
            }),
            resume: a.resume,
            ablation: a.ablate.clone().map(|file| Ablation {
                file,
                points: a.ablate_points.clone(),
                direction: a.ablate_direction.clone(),
                taps: ablate_taps,
            }),
            patching: a.patch_from.clone().map(|from| Patching {
                from,
                points: a.patch_points.clone().unwrap_or_default(),
                positions: a.patch_positions.clone(),
                taps: if a.patch_heads.is_some() {
                    vec![Tap::Z]
                } else {
                    patch_taps
                },
                heads: a.patch_heads.clone(),
            }),
            head_ablation: a.ablate_heads.clone().map(|heads| HeadAblation {
                heads,
                mean_from: a.ablate_heads_from.clone(),
            }),
            ..TraceOptions::new(
                a.model.path().to_path_buf(),
                a.input.clone(),
                a.output.clone(),
            )
        };
        o.validate()?;
        Ok(o)
    }

    /// Check every option that can be checked without the model (the capture settings are
    /// checked by [`CaptureArgs::validate`] when they are made).
    pub fn validate(&self) -> Result<()> {
        self.capture.clone().validate()?;
        if let Some(l) = &self.lens {
            if l.k == 0 {
                bail!("--lens-k 0: the lens needs at least one top token per point");
            }
        }
        if self.attribution.is_some() {
            let taps = self.capture.block_taps();
            if let Some(t) = super::attribute::TAPS.iter().find(|t| !taps.contains(t)) {
                bail!("--attribution reads the {t} tap: add it to --taps");
            }
            for (on, flag) in [
                (self.steering.is_some(), "--control-vector"),
                (self.ablation.is_some(), "--ablate"),
                (self.patching.is_some(), "--patch-from"),
            ] {
                if on {
                    bail!("--attribution splits the residual stream the blocks wrote, and {flag} edits it between blocks: trace the attribution without {flag}");
                }
            }
        }
        if let Some(st) = &self.steering {
            if !st.scale.is_finite() {
                bail!("--control-scale {}: must be a finite number", st.scale);
            }
            for f in &st.files {
                crate::paths::read_back(f, "--control-vector")?;
            }
        }
        // run.json records these for `report` to open again: they must be text.
        if let Some(a) = &self.ablation {
            crate::paths::read_back(&a.file, "--ablate")?;
        }
        if let Some(p) = &self.patching {
            crate::paths::read_back(&p.from, "--patch-from")?;
        }
        if let Some(h) = self
            .head_ablation
            .as_ref()
            .and_then(|h| h.mean_from.as_ref())
        {
            crate::paths::read_back(h, "--ablate-heads-from")?;
        }
        Ok(())
    }
}

pub fn run(args: &TraceArgs, out: &mut dyn Write) -> Result<()> {
    let opts = TraceOptions::from_args(args)?;
    let answers = args
        .answers
        .print(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if args.control_scale.len() <= 1 {
        let dir = trace(&opts)?;
        if answers {
            print_answers(&dir, out)?;
        }
        writeln!(out, "{}", display_path(&dir))?;
        return Ok(());
    }
    // A list of scales: one run per value, RUN_DIR-scale<value>, each a run of its own (with
    // every check and --force rule of a single trace).
    let mut seen = Vec::new();
    for &scale in &args.control_scale {
        if seen.contains(&scale.to_bits()) {
            bail!("--control-scale lists {scale} twice");
        }
        seen.push(scale.to_bits());
    }
    let base = opts.output.clone();
    let mut name = base
        .file_name()
        .context("the output path names no directory")?
        .to_os_string();
    name.push("-scale");
    let outputs: Vec<PathBuf> = args
        .control_scale
        .iter()
        .map(|scale| {
            let mut n = name.clone();
            n.push(scale.to_string());
            base.with_file_name(n)
        })
        .collect();
    // Every output must be free before the first is written (no half-done series).
    for o in &outputs {
        if !opts.resume {
            crate::output::check_target(o, crate::output::Kind::Run, opts.force)?;
        }
    }
    let n = outputs.len();
    for (k, (&scale, out_dir)) in args.control_scale.iter().zip(&outputs).enumerate() {
        eprintln!(
            "--control-scale {scale} ({} of {n}) → {}",
            k + 1,
            display_path(out_dir)
        );
        let mut o = opts.clone();
        if let Some(s) = o.steering.as_mut() {
            s.scale = scale;
        }
        o.output = out_dir.clone();
        let dir = trace(&o)?;
        if answers {
            writeln!(out, "scale {scale}:")?;
            print_answers(&dir, out)?;
        }
        writeln!(out, "{}", display_path(&dir))?;
    }
    Ok(())
}

/// Print what the model answered in the run at `dir` (read back from its run.json: what the
/// terminal shows is what the run records).
fn print_answers(dir: &Path, out: &mut dyn Write) -> Result<()> {
    let run = crate::run::Run::open(dir)?;
    let answers: Vec<crate::answer::Answer> = run
        .manifest
        .prompts
        .iter()
        .map(crate::answer::Answer::of)
        .collect();
    let run_json = dir.join("run.json");
    crate::answer::print(
        out,
        &answers,
        crate::answer::terminal_width(),
        &display_path(&run_json),
    )?;
    if let Some(line) = super::attribute::summary(&run.manifest) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}
/// Run a trace plan in the steps a reader can name: check what needs no model, load, prepare the
/// prompts, lay out the batches (and check the disk), trace (checkpointing for `--resume`), write.
/// Returns the run directory.
pub fn trace(opts: &TraceOptions) -> Result<PathBuf> {
    let t0 = Instant::now();
    let prompts = check(opts)?;
    let loaded = load(opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let hasher = hash_in_background(opts.model.clone());
    let model = &loaded.model;
    let prepared = prepare(
        model,
        prompts,
        opts.input.chat,
        opts.input.system.as_deref(),
    )?;
    let cfg = batch_config(opts, &loaded, prepared.len());
    let token_lists: Vec<Vec<i32>> = prepared.iter().map(|p| p.tokens.clone()).collect();
    cfg.check_prompts(&token_lists)?;
    if opts.capture.block_taps().is_empty() {
        check_disk(opts, &loaded, &token_lists, &[])?;
    }
    let mut tracer = Tracer::new(model, cfg)?;
    // What run.json records: the sizes the tracer runs with (a batch larger than the KV cache is
    // lowered to it, as llama.cpp does).
    let cfg = tracer.config().clone();
    let control_points = steer(&mut tracer, opts.steering.as_ref(), model)?;
    let (ablated, ablated_from) = ablate(&mut tracer, opts.ablation.as_ref(), model)?;
    // Taps inside blocks are found in the graph first: their widths size the output.
    let taps = tracer.identify(&token_lists)?;
    let ablated_heads = ablate_heads(&mut tracer, opts.head_ablation.as_ref(), &loaded, model)?;
    if !opts.capture.block_taps().is_empty() {
        check_disk(opts, &loaded, &token_lists, &taps)?;
    }
    let n_blocks = cfg.tap_blocks(model.n_layer()).len();
    let loaded_heads = loaded.heads.clone();
    // Ablated points of the residual stream (an ablation inside blocks touches no point).
    let stream_ablated: Vec<usize> = match &opts.ablation {
        Some(a) if !a.taps.is_empty() => Vec::new(),
        _ => ablated.clone(),
    };
    if let Some((a, b)) = control_points {
        if let Some(p) = stream_ablated.iter().find(|&&p| (a..=b).contains(&p)) {
            // llama.cpp adds the control vector before l_out is named, so the ablation would
            // remove the steering's own component there.
            bail!("point {p} is both steered (--control-points {a}-{b}) and ablated: choose one intervention per point");
        }
    }
    let patch = open_patch(
        opts.patching.as_ref(),
        &loaded,
        &token_lists,
        &stream_ablated,
    )?;
    let mut lens = open_lens(opts, &loaded, cfg.threads)?;
    let mut attribution = match &opts.attribution {
        None => None,
        Some(_) if loaded.points.len() != model.n_layer() + 1 => {
            bail!("--attribution reads every block's output and the last point: drop --points")
        }
        Some(a) => Some(super::attribute::AttributionState::open(
            a,
            &opts.model,
            &loaded.gguf,
            model,
            &taps,
            &prepared.iter().map(|p| &p.prompt).collect::<Vec<_>>(),
            cfg.threads,
        )?),
    };
    let plan = plan_fingerprint(opts, &cfg, &prepared)?;
    if opts.resume {
        if let Ok(done) = crate::run::Run::open(&opts.output) {
            if done.manifest.plan.as_deref() == Some(plan.as_str()) {
                eprintln!(
                    "{} is already complete (same model, options and prompts): nothing to resume",
                    opts.shown()
                );
                return Ok(opts.output.clone());
            }
        }
    }
    let shape = RunShape {
        n_prompts: prepared.len(),
        n_points: loaded.points.len(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
        taps: taps.iter().map(|t| (t.tap, n_blocks, t.width)).collect(),
    };
    let (writer, journal) = RunWriter::open(
        &opts.output,
        opts.force,
        shape,
        opts.capture.dtype,
        opts.capture.format,
        &plan,
        opts.resume,
        // A journaled prompt is kept only if it is the prompt at that index now.
        &|e: &run::JournalEntry| {
            let r = &e.record;
            prepared.get(r.index).is_some_and(|p| {
                r.id == p.prompt.id
                    && r.label == p.prompt.label
                    && r.text == p.prompt.text
                    && r.rendered == p.rendered
                    && r.n_prompt_tokens == p.tokens.len()
                    && r.tokens.get(..p.tokens.len()) == Some(&p.tokens[..])
            })
        },
    )?;
    let t_trace = Instant::now();
    let (writer, records, decoded) = trace_prompts(
        opts,
        &loaded,
        &mut tracer,
        writer,
        journal,
        &prepared,
        &token_lists,
        lens.as_mut(),
        attribution.as_mut(),
        patch.as_ref(),
    )?;
    if let Some(p) = &patch {
        // Rows read from a source replaced meanwhile may mix two runs.
        p.run.identity().check().context("--patch-from")?;
    }
    let trace_s = t_trace.elapsed().as_secs_f64();
    let sha = hasher
        .join()
        .map_err(|_| anyhow::anyhow!("hashing thread panicked"))?
        .with_context(|| format!("{}: hashing", opts.model.display()))?;
    let timings = Timings {
        load_s,
        trace_s,
        decode_s: tracer.decode_seconds(),
        total_s: t0.elapsed().as_secs_f64(),
        tokens_decoded: decoded,
        tokens_per_s: decoded as f64 / trace_s.max(1e-9),
        bytes_read: tracer.bytes_read(),
    };
    write_run(
        opts,
        loaded.facts,
        &cfg,
        writer,
        records,
        lens,
        attribution.as_ref(),
        Applied {
            control_points,
            ablated,
            ablated_from,
            ablated_heads,
            patch: patch.map(|p| p.settings),
            taps: taps
                .into_iter()
                .map(|t| run::TapRecord {
                    tap: t.tap,
                    blocks: cfg.tap_blocks(model.n_layer()),
                    width: t.width,
                    heads: match t.tap {
                        Tap::Z => Some(loaded_heads.as_ref().map_or(model.n_head(), Vec::len)),
                        Tap::Pattern => Some(t.width),
                        _ => None,
                    },
                    head_ids: match t.tap {
                        Tap::Z | Tap::Pattern => loaded_heads.clone().unwrap_or_default(),
                        _ => Vec::new(),
                    },
                    dtype: opts.capture.dtype.for_tap(t.tap),
                    dir: format!("{}/{}", run::TAPS_DIR, t.tap.name()),
                    tensors: t.tensors,
                    last_block_output_rows: t.last_block_output_rows,
                    attention_sinks: t.sinks,
                })
                .collect(),
        },
        sha,
        timings,
        plan,
    )
}

/// What a trace knows once its model is loaded.
struct Loaded {
    model: Model,
    gguf: Gguf,
    facts: ModelFacts,
    /// Points kept, resolved against the model's depth.
    points: Vec<usize>,
    /// `--heads`, resolved against the model's heads.
    heads: Option<Vec<usize>>,
}

/// Step 1: everything that can be checked without the model, so nobody waits for a load to learn
/// that the output exists, a prompt file is malformed or an RPC worker is unreachable. Returns the
/// prompts.
fn check(opts: &TraceOptions) -> Result<Vec<Prompt>> {
    opts.validate()?;
    let prompts = prompts::collect(&opts.input.prompts, &opts.input.files)?;
    // (--resume of a run that is already complete is answered once its plan is known.)
    // An interrupted trace of this output is named first (never discarded without --force).
    if !opts.resume && !opts.force {
        run::refuse_interrupted(&opts.output)?;
    }
    if !(opts.resume && crate::run::Run::open(&opts.output).is_ok()) {
        run::check_output(&opts.output, opts.force)?;
    }
    if let Some(st) = &opts.steering {
        for p in &st.files {
            super::check_gguf_path(p)?;
        }
    }
    if !opts.capture.rpc().0.is_empty() {
        crate::llama::rpc::add_servers(&opts.capture.rpc().0)?;
        crate::llama::rpc::watch(&opts.capture.rpc().0, opts.capture.rpc.rpc_timeout);
    }
    Ok(prompts)
}

/// Step 2: load the model (on the RPC workers registered in step 1, when asked) and resolve what
/// depends on it.
fn load(opts: &TraceOptions) -> Result<Loaded> {
    let model = load_model(
        &opts.model,
        LoadOptions {
            n_gpu_layers: opts.capture.n_gpu_layers(),
            vocab_only: false,
            use_mmap: opts.use_mmap,
            tensor_split: opts.capture.rpc().1.clone(),
            cpu_repack: !opts.capture.no_repack,
        },
    )?;
    if opts.capture.n_gpu_layers() != 0
        && opts.capture.rpc().0.is_empty()
        && !cfg!(any(feature = "cuda", feature = "metal", feature = "vulkan"))
    {
        eprintln!(
            "note: this gguf-trace was built without a GPU backend; --n-gpu-layers has no effect"
        );
    }
    if let Some(why) = arch::untraceable_reason(&model) {
        bail!("{}: cannot be traced: {why}", opts.model.display());
    }
    let gguf = Gguf::open(&opts.model)?;
    let facts = ModelFacts::gather(&opts.model, &model, &gguf);
    if !opts.quiet {
        // What the graph check cannot see (also in run.json, model.assumptions).
        for a in &facts.assumptions {
            eprintln!("note: {a}");
        }
    }
    let points = parse_points(&opts.capture.points, model.n_layer()).map_err(anyhow::Error::msg)?;
    let heads = match &opts.capture.heads {
        None => None,
        Some(spec) => Some(
            parse_points(spec, model.n_head().saturating_sub(1)).map_err(|e| {
                anyhow::anyhow!(
                    "{}",
                    e.replace("--points", "--heads").replace("point", "head")
                )
            })?,
        ),
    };
    if let Some(l) = &opts.lens {
        if l.k > model.n_vocab() {
            bail!(
                "--lens-k {}: the model has only {} tokens",
                l.k,
                model.n_vocab()
            );
        }
    }
    Ok(Loaded {
        model,
        gguf,
        facts,
        points,
        heads,
    })
}

/// Step 4: how prompts are grouped into batches.
fn batch_config(opts: &TraceOptions, loaded: &Loaded, n_prompts: usize) -> TraceConfig {
    // Generation decodes one token of every sequence at once, and llama.cpp sizes its output
    // buffers by the batch size: more sequences than --batch-size would abort inside llama.cpp.
    let mut n_seq = opts.capture.n_seq.min(n_prompts);
    if opts.capture.block_taps().contains(&Tap::Pattern) && n_seq > 1 {
        // Key positions are the KV cache's cells of one sequence.
        if !opts.quiet {
            eprintln!("note: tap `pattern` traces one prompt at a time (--n-seq 1)");
        }
        n_seq = 1;
    }
    if n_seq > opts.capture.batch_size {
        eprintln!(
            "note: decoding {} sequences together instead of {n_seq}, to fit --batch-size {}",
            opts.capture.batch_size, opts.capture.batch_size
        );
        n_seq = opts.capture.batch_size;
    }
    TraceConfig {
        positions: opts.capture.positions,
        points: loaded.points.clone(),
        generate: opts.capture.generate,
        ctx: opts.capture.ctx,
        n_seq,
        n_batch: opts.capture.batch_size,
        n_ubatch: opts.capture.ubatch_size,
        threads: opts.capture.threads(),
        allow_nonfinite: opts.capture.allow_nonfinite,
        cache_type: opts.capture.cache_type,
        taps: opts.capture.block_taps(),
        no_flash_attn: false,
        heads: loaded.heads.clone(),
    }
}

/// The output's estimated size (printed, with cheaper alternatives when large), refused when the
/// disk lacks room.
fn check_disk(
    opts: &TraceOptions,
    loaded: &Loaded,
    token_lists: &[Vec<i32>],
    taps: &[TapInfo],
) -> Result<()> {
    let model = &loaded.model;
    let n_points = loaded.points.len();
    let n_blocks = loaded
        .points
        .iter()
        .filter(|&&p| p < model.n_layer())
        .count() as u64;
    let tap_width: u64 = taps
        .iter()
        .filter(|t| t.tap != Tap::Pattern)
        .map(|t| t.width as u64)
        .sum();
    // `pattern`: heads × kept positions × tokens per block and prompt, so it grows with tokens².
    let heads: u64 = taps
        .iter()
        .filter(|t| t.tap == Tap::Pattern)
        .map(|t| t.width as u64)
        .sum();
    let estimate_for = |positions: Positions, dtype: Dtype| {
        let kept: Vec<usize> = token_lists
            .iter()
            .map(|t| match positions {
                Positions::All => t.len() + opts.capture.generate,
                Positions::Last => 1 + opts.capture.generate,
            })
            .collect();
        let positions: u64 = kept.iter().map(|&k| k as u64).sum();
        let pattern: u64 = kept
            .iter()
            .zip(token_lists)
            .map(|(&k, t)| k as u64 * (t.len() + opts.capture.generate) as u64)
            .sum::<u64>()
            .saturating_mul(n_blocks)
            .saturating_mul(heads)
            .saturating_mul(dtype.bytes() as u64);
        run::estimate_bytes(
            n_points,
            &kept,
            model.n_embd(),
            model.n_vocab(),
            dtype,
            opts.capture.format,
        )
        .saturating_add(
            positions
                .saturating_mul(n_blocks)
                .saturating_mul(tap_width)
                .saturating_mul(dtype.bytes() as u64),
        )
        .saturating_add(pattern)
        .saturating_add(taps.len() as u64 * kept.len() as u64 * 128)
    };
    // Generation may stop early at an end-of-generation token: an upper bound.
    let estimate = estimate_for(opts.capture.positions, opts.capture.dtype);
    let mut cheaper = Vec::new();
    if estimate > LARGE_OUTPUT {
        if opts.capture.dtype == Dtype::F32 && opts.capture.format.npy() {
            cheaper.push(format!(
                "--dtype f16: {}",
                human_bytes(estimate_for(opts.capture.positions, Dtype::F16))
            ));
        }
        if opts.capture.positions == Positions::All {
            cheaper.push(format!(
                "--positions last: {}",
                human_bytes(estimate_for(Positions::Last, opts.capture.dtype))
            ));
        }
    }
    let parent = crate::output::parent_dir(&opts.output);
    let free = fs4::available_space(&parent).ok();
    if !opts.quiet {
        eprintln!(
            "tracing {} prompt(s) through {} ({} points × {} width); estimated output {}{}{}",
            token_lists.len(),
            loaded.facts.file_name,
            n_points,
            model.n_embd(),
            human_bytes(estimate),
            free.map(|f| format!(", {} free", human_bytes(f)))
                .unwrap_or_default(),
            if cheaper.is_empty() {
                String::new()
            } else {
                format!(" (with {})", cheaper.join("; "))
            }
        );
    }
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
    Ok(())
}

/// Estimates above this size also say what `--dtype f16` or `--positions last` would take.
const LARGE_OUTPUT: u64 = 1 << 30;

/// The logit-lens head, when asked for.
fn open_lens(opts: &TraceOptions, loaded: &Loaded, threads: i32) -> Result<Option<LensState>> {
    let (model, gguf, points) = (&loaded.model, &loaded.gguf, &loaded.points);
    Ok(match &opts.lens {
        None => None,
        Some(lo) => {
            if points.len() != model.n_layer() + 1 {
                bail!("--lens needs every point (the last point is the model's own output); drop --points");
            }
            let head = LensHead::load(&opts.model, gguf, threads).with_context(|| {
                format!("{}: loading the logit-lens head", opts.model.display())
            })?;
            if head.n_embd() != model.n_embd() || head.n_vocab() != model.n_vocab() {
                bail!(
                    "{}: the output matrix is {}×{}, the model {}×{}: the logit lens cannot read this file",
                    opts.model.display(),
                    head.n_embd(),
                    head.n_vocab(),
                    model.n_embd(),
                    model.n_vocab()
                );
            }
            Some(LensState {
                head,
                opts: lo.clone(),
                prompts: Vec::new(),
                max_diff: 0.0,
            })
        }
    })
}

/// Step 5: trace the prompts not yet on disk into `writer`, checkpointing on batch-group
/// boundaries. Returns the writer, every prompt's record (resumed ones first) and the tokens
/// decoded.
#[allow(clippy::too_many_arguments)]
fn trace_prompts(
    opts: &TraceOptions,
    loaded: &Loaded,
    tracer: &mut Tracer,
    mut writer: RunWriter,
    journal: Vec<run::JournalEntry>,
    prepared: &[Prepared],
    token_lists: &[Vec<i32>],
    mut lens: Option<&mut LensState>,
    mut attribution: Option<&mut super::attribute::AttributionState>,
    patch: Option<&PatchPlan>,
) -> Result<(RunWriter, Vec<PromptRecord>, usize)> {
    let (model, points) = (&loaded.model, &loaded.points);
    let n_seq = tracer.n_seq();
    let start = journal.len();
    let mut records: Vec<PromptRecord> = Vec::with_capacity(prepared.len());
    for e in journal {
        if let (Some(l), Some(pl)) = (lens.as_mut(), e.lens) {
            l.prompts.push(pl);
            l.max_diff = l.max_diff.max(e.lens_diff);
        }
        records.push(e.record);
    }
    if writer.resumed() {
        eprintln!(
            "resuming {}: {start} of {} prompt(s) already on disk",
            opts.shown(),
            prepared.len()
        );
    } else if opts.resume {
        eprintln!(
            "note: no interrupted trace of {} to resume; tracing from the start",
            opts.shown()
        );
    }
    let total_tokens: usize = token_lists[start..]
        .iter()
        .map(|t| t.len() + opts.capture.generate)
        .sum();
    let pb = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        bar(total_tokens as u64, "tokens")
    };
    pb.set_message(match &opts.shown_as {
        // A compare's run: say which model.
        Some(_) => format!("tracing {}", opts.shown()),
        None => "tracing".to_string(),
    });
    let mut decoded = 0usize;
    // Prompts written since the last checkpoint; a checkpoint (at most one a second) makes them
    // durable and journals them, so an interrupted trace resumes after them.
    let mut pending: Vec<run::JournalEntry> = Vec::new();
    let mut last_checkpoint = Instant::now();
    let n_prompts = prepared.len();
    if let Some(plan) = patch {
        tracer.set_patch(Some(plan.patch(start, n_seq)?))?;
    }
    if start % n_seq != 0 {
        bail!("internal error: the journal of the interrupted trace ends inside a batch group");
    }
    let result = tracer.trace(
        &token_lists[start..],
        |mut t: PromptTrace| {
            t.index += start;
            let t_index = t.index;
            let p = &prepared[t.index];
            let pieces: Vec<String> = t.tokens.iter().map(|&tok| model.token_piece(tok)).collect();
            let (states_file, tap_files) = writer.write_prompt(
                &t,
                points,
                &p.prompt.id,
                p.prompt.label.as_deref(),
                &pieces,
            )?;
            let mut lens_entry = (None, 0.0);
            if let Some(l) = lens.as_mut() {
                lens_entry = l.add(&t, points, model)?;
            }
            let attributed = match attribution.as_mut() {
                Some(a) => a.add(&t, &p.prompt, model)?,
                None => None,
            };
            let record = PromptRecord {
                attribution: attributed,
                index: t.index,
                id: p.prompt.id.clone(),
                label: p.prompt.label.clone(),
                source: p.prompt.source.clone(),
                text: p.prompt.text.clone(),
                rendered: p.rendered.clone(),
                generated_text: model.detokenize(t.generated(), false),
                top: crate::answer::top_k(&t.logits, crate::answer::TOP_K, |id| {
                    model.token_piece(id)
                }),
                nonfinite: t.nonfinite.map(|(k, j)| run::NonFinite {
                    point: points[k],
                    position: t.positions[j],
                }),
                tokens: t.tokens,
                pieces,
                n_prompt_tokens: t.n_prompt,
                positions: t.positions,
                states_file,
                tap_files,
            };
            pending.push(run::JournalEntry {
                record: record.clone(),
                lens: lens_entry.0,
                lens_diff: lens_entry.1,
                csv_lengths: [0; 3],
                checkpoint_size: 0,
                checksums: Default::default(),
            });
            records.push(record);
            // Checkpoints fall on group boundaries: a resumed trace then decodes the same groups
            // of sequences as an uninterrupted one, so its states are the same bits.
            let group_end = (t_index + 1) % n_seq == 0 || t_index + 1 == n_prompts;
            if group_end && last_checkpoint.elapsed().as_secs_f64() >= CHECKPOINT_SECONDS {
                writer.checkpoint(&mut pending)?;
                pending.clear();
                last_checkpoint = Instant::now();
            }
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
            // Every prompt handed to the sink is complete on disk: journal them and keep the
            // staging directory for --resume (when there is anything to resume).
            if !records.is_empty() && writer.checkpoint(&mut pending).is_ok() {
                writer.keep_for_resume();
                bail!(
                    "interrupted after {} of {} prompt(s); run the same command with --resume to continue",
                    records.len(),
                    prepared.len()
                );
            }
            bail!("interrupted: no run was written");
        }
        return Err(e.into());
    }
    Ok((writer, records, decoded))
}

/// Step 6: the manifest, written last; the run directory swapped into place.
#[allow(clippy::too_many_arguments)]
fn write_run(
    opts: &TraceOptions,
    facts: ModelFacts,
    cfg: &TraceConfig,
    writer: RunWriter,
    records: Vec<PromptRecord>,
    lens: Option<LensState>,
    attribution: Option<&super::attribute::AttributionState>,
    applied: Applied,
    sha: String,
    timings: Timings,
    plan: String,
) -> Result<PathBuf> {
    let Applied {
        control_points,
        ablated,
        ablated_from,
        ablated_heads,
        patch,
        taps,
    } = applied;
    let points = cfg.points.clone();
    let mut facts = facts;
    if facts.trust == Trust::Unchecked {
        // Every decode refuses to go on until the graph self-check covered every block, so every
        // prompt on disk (this process's, or a resumed journal's) was traced past the check.
        facts.trust = Trust::SelfChecked;
    }
    let bad: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.nonfinite
                .as_ref()
                .map(|n| format!("prompt {} from point {}", r.index, n.point))
        })
        .collect();
    if !bad.is_empty() {
        eprintln!(
            "warning: {} prompt(s) went non-finite ({}); recorded in run.json (prompts[].nonfinite)",
            bad.len(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
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
                k: l.opts.k,
                positions: if l.opts.all {
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
    let attribution = attribution.map(|a| {
        let info = a.info(
            &records
                .iter()
                .filter_map(|r| r.attribution.as_ref())
                .collect::<Vec<_>>(),
        );
        if !info.valid {
            eprintln!(
                "warning: the attribution's shares do not add up to this model's own logits (largest residual {:.1e} of the shares' spread, tolerance {:.0e}; components rebuild the residual to {:.1e}, tolerance {:.0e}); marked invalid and not drawn",
                info.max_relative_residual,
                info.residual_tolerance,
                info.max_unexplained,
                info.unexplained_tolerance
            );
        }
        info
    });
    let manifest = Manifest {
        attribution,
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
            command_line: std::env::args_os()
                .map(|a| crate::paths::recorded(&a))
                .collect(),
        },
        capture: CaptureSettings {
            point_tensors: points
                .iter()
                .map(|&p| arch::point_tensor(&facts.architecture, p))
                .collect(),
            points,
            positions: cfg.positions,
            generate: opts.capture.generate,
            chat: opts.input.chat,
            system: opts.input.system.clone(),
            dtype: opts.capture.dtype,
            format: opts.capture.format,
            ctx: cfg.ctx,
            n_seq: cfg.n_seq,
            n_batch: cfg.n_batch,
            n_ubatch: cfg.n_ubatch,
            threads: cfg.threads,
            n_gpu_layers: opts.capture.n_gpu_layers(),
            control_vectors: opts
                .steering
                .iter()
                .flat_map(|s| {
                    s.files
                        .iter()
                        .map(|p| crate::paths::recorded(p.as_os_str()))
                })
                .collect(),
            control_scale: opts.steering.as_ref().map_or(0.0, |s| s.scale),
            control_points,
            allow_nonfinite: opts.capture.allow_nonfinite,
            rpc: opts.capture.rpc().0.clone(),
            tensor_split: opts.capture.rpc().1.clone(),
            cpu_repack: !opts.capture.no_repack && crate::llama::backend::cpu_repack_usable(),
            cache_type: opts.capture.cache_type,
            ablation: opts.ablation.as_ref().map(|a| run::AblationSettings {
                // Absolute, so a report run from elsewhere finds the direction.
                file: crate::paths::recorded(
                    std::fs::canonicalize(&a.file)
                        .unwrap_or_else(|_| a.file.clone())
                        .as_os_str(),
                ),
                points: ablated,
                direction_point: ablated_from,
                taps: a.taps.clone(),
            }),
            patch,
            ablated_heads,
            taps,
            settings: Some(opts.capture.clone()),
            flash_attn_off: cfg.taps.contains(&Tap::Pattern)
                || cfg.cache_type == crate::llama::context::CacheType::F32,
        },
        model: facts,
        prompts: records,
        timings,
        lens: lens_info,
        plan: Some(plan),
    };
    let dir = writer.finish(&manifest)?;
    if opts.quiet {
        return Ok(dir);
    }
    eprintln!(
        "traced {} prompt(s), {} tokens in {:.1} s ({} tokens/s)",
        manifest.prompts.len(),
        manifest.timings.tokens_decoded,
        manifest.timings.trace_s,
        super::rate(manifest.timings.tokens_per_s)
    );
    if opts.shown_as.is_none() {
        // (A compare's runs are not in place yet; compare says what it wrote.)
        let shown = opts.shown();
        let shown = shown.trim_end_matches('/');
        let word = super::shell_word(Path::new(shown));
        let html = super::shell_word(Path::new(&format!("{shown}.html")));
        eprintln!("wrote {shown}/ — next: gguf-trace report {word} -o {html}");
    }
    Ok(dir)
}

/// Seconds between checkpoints of a running trace (what `--resume` can continue from).
const CHECKPOINT_SECONDS: f64 = 1.0;

/// A fingerprint of what makes a run: the model file (path, size, modification time, inode —
/// as the sha256 cache identifies it), the capture settings record (RPC endpoints and tensor
/// split included), the interventions and their files, the tool and llama.cpp versions, and every
/// prompt as tokenized. A resumed trace must match it exactly.
fn plan_fingerprint(
    opts: &TraceOptions,
    cfg: &TraceConfig,
    prepared: &[Prepared],
) -> Result<String> {
    let value = serde_json::json!({
        "model": crate::model_hash::stamp(&opts.model)
            .with_context(|| format!("{}: cannot read", opts.model.display()))?,
        // The whole settings record: a new option is in the fingerprint without an edit here.
        "capture": opts.capture,
        // What the settings resolve to for this model and these prompts.
        "points": cfg.points,
        "n_seq_used": cfg.n_seq,
        "tool_version": env!("CARGO_PKG_VERSION"),
        "llama_cpp_sys_2": crate::llama::LLAMA_CPP_SYS_VERSION,
        "patching": opts.patching.as_ref().map(|p| (
            crate::model_hash::stamp(&p.from.join(run::RUN_JSON)).ok(),
            &p.points,
            &p.positions,
            &p.taps,
            &p.heads,
        )),
        "ablation": opts.ablation.as_ref().map(|a| (
            crate::model_hash::stamp(&a.file).ok(),
            a.points.clone(),
            a.direction.clone(),
            &a.taps,
        )),
        "head_ablation": opts.head_ablation.as_ref().map(|h| (
            &h.heads,
            h.mean_from.as_ref().map(|f| crate::model_hash::stamp(&f.join(run::RUN_JSON)).ok()),
        )),
        "chat": opts.input.chat,
        "system": opts.input.system,
        "lens": opts.lens.as_ref().map(|l| (l.all, l.k)),
        "attribution": opts.attribution.as_ref().map(|a| (&a.target, &a.foil)),
        "steering": opts.steering.as_ref().map(|s| (
            s.files.iter().map(|f| crate::model_hash::stamp(f).ok()).collect::<Vec<_>>(),
            s.scale,
            s.points.clone(),
        )),
        "prompts": prepared.iter().map(|p| (
            &p.prompt.id, &p.prompt.label, &p.prompt.text, &p.rendered, &p.tokens,
            &p.prompt.target, &p.prompt.foil,
        )).collect::<Vec<_>>(),
    });
    Ok(crate::model_hash::hex_sha256(value.to_string().as_bytes()))
}

/// Largest |lens logit − model logit| accepted by the self-check. The lens runs the same ggml CPU
/// kernels on the same quantized matrix as llama.cpp's output layer, so it agrees to float rounding
/// of the norm (measured ~1e-5 on SmolLM2 and Gemma-3); anything large means the architecture's
/// output head is not what the lens computes.
pub const LENS_TOLERANCE: f64 = 1e-2;

/// The logit lens during a trace: the head, the per-prompt results, the self-check.
struct LensState {
    head: LensHead,
    opts: LensOptions,
    prompts: Vec<PromptLens>,
    max_diff: f64,
}

impl LensState {
    /// Add a prompt's lens; returns it and its self-check difference (for the journal).
    fn add(
        &mut self,
        t: &PromptTrace,
        points: &[usize],
        model: &Model,
    ) -> Result<(Option<PromptLens>, f64)> {
        let mut diff = 0f64;
        let (all, k) = (self.opts.all, self.opts.k);
        let last = t.last_prompt_slot();
        let cols: Vec<usize> = if all {
            (0..t.positions.len()).collect()
        } else {
            vec![last]
        };
        let (n_points, n_vocab) = (points.len(), self.head.n_vocab());
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
                diff = d;
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
        let pl = PromptLens {
            index: t.index,
            pieces,
            traces,
            last_prompt_position: t.n_prompt - 1,
        };
        self.prompts.push(pl.clone());
        Ok((Some(pl), diff))
    }
}

/// The interventions a trace applied, for run.json.
struct Applied {
    control_points: Option<(usize, usize)>,
    ablated: Vec<usize>,
    ablated_from: Option<usize>,
    ablated_heads: Option<run::HeadAblationSettings>,
    patch: Option<run::PatchSettings>,
    taps: Vec<run::TapRecord>,
}

/// A prompt's arrays of taps inside blocks, as read from a run.
type TapArrays = Vec<(Tap, ndarray::ArrayD<f32>)>;

/// `--patch-from`, validated: the source run, the points and positions to patch.
struct PatchPlan {
    run: std::sync::Arc<crate::run::Run>,
    points: Vec<usize>,
    taps: Vec<Tap>,
    heads: Option<Vec<(usize, usize)>>,
    positions: PatchPositions,
    settings: run::PatchSettings,
}

impl PatchPlan {
    /// The tracer's patch for prompts `start..` (a resumed trace starts past the journal).
    fn patch<'m>(&self, start: usize, n_seq: usize) -> Result<Patch<'m>> {
        let run = self.run.clone();
        let mut open: Option<(usize, crate::run::read::PromptStates)> = None;
        // Taps inside blocks: each prompt's arrays, read whole once while its group is decoded
        // (a decode asks for the rows of every sequence of the group in turn, tap by tap).
        let mut open_taps: Vec<(usize, TapArrays)> = Vec::new();
        let taps = self.taps.clone();
        Ok(Patch {
            points: self.points.clone(),
            taps: self.taps.clone(),
            heads: self.heads.clone(),
            positions: self.positions.clone(),
            source: Box::new(move |i, tap, point, pos| {
                let index = i + start;
                let rec = &run.manifest.prompts[index];
                let j = rec.positions.iter().position(|&q| q == pos).ok_or_else(|| {
                    format!(
                        "prompt {index} of {} has no state at position {pos} (trace it with --positions all)",
                        run.dir.display()
                    )
                })?;
                // A read that fails because the source was replaced meanwhile says so.
                let why =
                    |e: crate::run::RunError| run.identity().check().err().unwrap_or(e).to_string();
                if tap != Tap::Resid {
                    if !open_taps.iter().any(|(k, _)| *k == index) {
                        let mut arrays = Vec::new();
                        for &t in taps.iter().filter(|t| t.in_block()) {
                            arrays.push((t, run.tap(t, index).map_err(why)?));
                        }
                        if open_taps.len() >= n_seq.max(1) {
                            open_taps.remove(0);
                        }
                        open_taps.push((index, arrays));
                    }
                    let arrays = &open_taps
                        .iter()
                        .find(|(k, _)| *k == index)
                        .expect("opened above")
                        .1;
                    let a = &arrays
                        .iter()
                        .find(|(t, _)| *t == tap)
                        .ok_or_else(|| format!("tap `{tap}` was not opened"))?
                        .1;
                    let rec = run
                        .manifest
                        .capture
                        .taps
                        .iter()
                        .find(|r| r.tap == tap)
                        .ok_or_else(|| format!("{} holds no tap `{tap}`", run.dir.display()))?;
                    let b = rec.blocks.iter().position(|&b| b == point).ok_or_else(|| {
                        format!(
                            "{} holds tap `{tap}` at no block {point}",
                            run.dir.display()
                        )
                    })?;
                    if a.ndim() != 3 || b >= a.shape()[0] || j >= a.shape()[1] {
                        return Err(format!(
                            "tap `{tap}` of prompt {index} in {} has shape {:?}",
                            run.dir.display(),
                            a.shape()
                        ));
                    }
                    return Ok(a.slice(ndarray::s![b, j, ..]).iter().copied().collect());
                }
                if open.as_ref().is_none_or(|(k, _)| *k != index) {
                    open = Some((index, run.prompt_states(index).map_err(why)?));
                }
                let k = run.manifest.capture.points.iter().position(|&q| q == point);
                let states = &open.as_ref().expect("opened above").1;
                let row = states
                    .point_positions(k.expect("checked by open_patch"), &[j])
                    .map_err(why)?;
                Ok(row.into_raw_vec_and_offset().0)
            }),
        })
    }
}

/// Check `--patch-from`: a complete run of the same model holding the points to patch, with a
/// twin of every prompt of the same token count.
fn open_patch(
    patching: Option<&Patching>,
    loaded: &Loaded,
    token_lists: &[Vec<i32>],
    ablated: &[usize],
) -> Result<Option<PatchPlan>> {
    let Some(p) = patching else {
        return Ok(None);
    };
    let shown = display_path(&p.from);
    let run = crate::run::Run::open(&p.from).with_context(|| format!("--patch-from {shown}"))?;
    let (ours, theirs) = (&loaded.facts, &run.manifest.model);
    if (
        &ours.architecture,
        ours.n_layer,
        ours.n_embd,
        ours.n_vocab,
        ours.n_params,
    ) != (
        &theirs.architecture,
        theirs.n_layer,
        theirs.n_embd,
        theirs.n_vocab,
        theirs.n_params,
    ) {
        bail!(
            "--patch-from {shown}: traced with another model ({}, {} blocks × {}), not {} ({} blocks × {})",
            theirs.file_name, theirs.n_layer, theirs.n_embd, ours.file_name, ours.n_layer, ours.n_embd
        );
    }
    let heads = match &p.heads {
        Some(spec) => Some(parse_heads(spec, ours.n_layer, ours.n_head).map_err(|e| {
            anyhow::anyhow!(e.to_string().replace("--ablate-heads", "--patch-heads"))
        })?),
        None => None,
    };
    let points = match &heads {
        Some(h) => {
            let mut blocks: Vec<usize> = h.iter().map(|&(l, _)| l).collect();
            blocks.dedup();
            blocks
        }
        None => parse_points(&p.points, ours.n_layer)
            .map_err(|e| anyhow::anyhow!(e.replacen("--points", "--patch-points", 1)))?,
    };
    if p.taps.contains(&Tap::Resid) {
        if let Some(q) = points
            .iter()
            .find(|q| !run.manifest.capture.points.contains(q))
        {
            bail!(
                "--patch-from {shown}: the run does not hold point {q} (its points: {})",
                crate::cli::format_points(&run.manifest.capture.points)
            );
        }
        if let Some(q) = points.iter().find(|q| ablated.contains(q)) {
            bail!("point {q} is both ablated and patched: choose one intervention per point");
        }
    }
    for &tap in p.taps.iter().filter(|t| t.in_block()) {
        // Point n_layer names no block: a tap inside the block is patched at the others.
        let points: Vec<usize> = points
            .iter()
            .copied()
            .filter(|&q| q < ours.n_layer)
            .collect();
        if points.is_empty() {
            bail!(
                "--patch-points {} with --patch-taps {tap}: a tap inside the block is patched at blocks 0-{}",
                p.points,
                ours.n_layer - 1
            );
        }
        let Some(rec) = run.manifest.capture.taps.iter().find(|r| r.tap == tap) else {
            bail!(
                "--patch-from {shown}: the run holds no tap `{tap}` (trace it with --taps {tap})"
            );
        };
        if let Some(q) = points.iter().find(|q| !rec.blocks.contains(q)) {
            bail!(
                "--patch-from {shown}: the run holds tap `{tap}` at blocks {}, not at block {q}",
                crate::cli::format_points(&rec.blocks)
            );
        }
        if tap == Tap::Z && !rec.head_ids.is_empty() {
            bail!("--patch-from {shown}: its z holds only some heads (--heads); patching z needs every head");
        }
    }
    let longest = token_lists.iter().map(Vec::len).max().unwrap_or(1);
    let positions = match p.positions.as_deref().map(str::trim) {
        None | Some("all") => PatchPositions::All,
        Some("last") => PatchPositions::Last,
        Some(spec) if spec.to_ascii_lowercase().contains("last") => {
            bail!("--patch-positions: \"last\" stands alone; list positions as numbers, e.g. 0,3-5")
        }
        Some(spec) => PatchPositions::List(parse_points(spec, longest - 1).map_err(|e| {
            anyhow::anyhow!(e
                .replacen("--points", "--patch-positions", 1)
                .replace("this model has points", "the longest prompt has positions")
                .replace("point ", "position "))
        })?),
    };
    let prompts = &run.manifest.prompts;
    if prompts.len() < token_lists.len() {
        bail!(
            "--patch-from {shown}: the run has {} prompt(s), this trace {}: every prompt needs its same-index twin",
            prompts.len(),
            token_lists.len()
        );
    }
    for (i, t) in token_lists.iter().enumerate() {
        let rec = &prompts[i];
        if rec.n_prompt_tokens != t.len() {
            bail!(
                "--patch-from {shown}: prompt {i} has {} tokens here and {} there; patching needs the same token count",
                t.len(),
                rec.n_prompt_tokens
            );
        }
        if rec.states_file.is_none() {
            bail!("--patch-from {shown}: the run was written with --format csv; patching reads its NPY states");
        }
        let needed: Vec<usize> = match &positions {
            PatchPositions::All => (0..t.len()).collect(),
            PatchPositions::Last => vec![t.len() - 1],
            PatchPositions::List(l) => l.clone(),
        };
        for &pos in &needed {
            if pos >= t.len() {
                bail!(
                    "--patch-positions: position {pos} is past the end of prompt {i} ({} tokens)",
                    t.len()
                );
            }
            if !rec.positions.contains(&pos) {
                bail!(
                    "--patch-from {shown}: prompt {i} there holds no state at position {pos} (trace it with --positions all)"
                );
            }
        }
    }
    let settings = run::PatchSettings {
        from: crate::paths::recorded(p.from.as_os_str()),
        // What was patched: point L names no block, so taps inside the block alone skip it.
        points: if p.taps.contains(&Tap::Resid) {
            points.clone()
        } else {
            points
                .iter()
                .copied()
                .filter(|&q| q < ours.n_layer)
                .collect()
        },
        positions: p.positions.clone().unwrap_or_else(|| "all".into()),
        taps: if p.taps == [Tap::Resid] {
            Vec::new()
        } else {
            p.taps.clone()
        },
        heads: heads.clone().unwrap_or_default(),
    };
    Ok(Some(PatchPlan {
        run: std::sync::Arc::new(run),
        points,
        taps: p.taps.clone(),
        heads,
        positions,
        settings,
    }))
}

/// `--patch-taps`: the residual stream (`resid`) and taps inside the block whose rows are vectors
/// a block adds or reads (not `pattern` or the router's choices).
pub(crate) fn parse_patch_taps(list: &str) -> Result<Vec<Tap>> {
    let mut taps = Vec::new();
    for item in list.split(',').filter(|s| !s.trim().is_empty()) {
        let t: Tap = item
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--patch-taps: {e}"))?;
        if !matches!(
            t,
            Tap::Resid | Tap::ResidMid | Tap::AttnOut | Tap::MlpOut | Tap::Z | Tap::Neurons
        ) {
            bail!("--patch-taps {t}: patching replaces vectors of the residual stream or a block's parts: choose from resid, resid_mid, attn_out, mlp_out, z, neurons");
        }
        if taps.contains(&t) {
            bail!("--patch-taps: `{t}` is named twice");
        }
        taps.push(t);
    }
    if taps.is_empty() {
        bail!("--patch-taps: name at least one, e.g. attn_out,mlp_out");
    }
    taps.sort();
    Ok(taps)
}

/// `--ablate-heads L.H,...`: (block, head) pairs, checked against the model's shape.
fn parse_heads(spec: &str, n_layer: usize, n_head: usize) -> Result<Vec<(usize, usize)>> {
    let mut heads = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = item.split_once('.').and_then(|(l, h)| {
            Some((
                l.trim().parse::<usize>().ok()?,
                h.trim().parse::<usize>().ok()?,
            ))
        });
        let Some((l, h)) = parsed else {
            bail!("--ablate-heads {item:?}: expected BLOCK.HEAD, e.g. 5.3 (block 5, head 3; both from 0)");
        };
        if l >= n_layer {
            bail!(
                "--ablate-heads {item}: this model has blocks 0-{}",
                n_layer - 1
            );
        }
        if h >= n_head {
            bail!(
                "--ablate-heads {item}: this model has heads 0-{} per block",
                n_head - 1
            );
        }
        if !heads.contains(&(l, h)) {
            heads.push((l, h));
        }
    }
    if heads.is_empty() {
        bail!("--ablate-heads: name at least one head, e.g. 5.3");
    }
    heads.sort();
    Ok(heads)
}

/// `--ablate-heads`: set each head's slice of `z` to zero, or to its mean over the prompts and
/// stored positions of `--ablate-heads-from`, at every position. Returns what run.json records.
fn ablate_heads(
    tracer: &mut Tracer,
    ab: Option<&HeadAblation>,
    loaded: &Loaded,
    model: &Model,
) -> Result<Option<run::HeadAblationSettings>> {
    let Some(ab) = ab else {
        return Ok(None);
    };
    let (n_layer, n_head) = (model.n_layer(), model.n_head());
    let heads = parse_heads(&ab.heads, n_layer, n_head)?;
    let blocks = tracer.config().tap_blocks(n_layer);
    if let Some((l, _)) = heads.iter().find(|(l, _)| !blocks.contains(l)) {
        bail!("--ablate-heads: block {l} is not traced (it needs point {l} among --points)");
    }
    let mut widths = Vec::new();
    for &(l, _) in &heads {
        let w = tracer
            .tap_width(Tap::Z, l)
            .context("--ablate-heads: the z tap was not identified")?;
        if w % n_head != 0 {
            bail!("--ablate-heads: block {l}'s z has {w} values per token, not a multiple of its {n_head} heads");
        }
        widths.push(w / n_head);
    }
    let mean = match &ab.mean_from {
        None => None,
        Some(from) => Some(head_means(from, loaded, &heads, &widths)?),
    };
    // One edit per block, with the slice of every head ablated there.
    let mut edits: Vec<(Tap, usize, Edit)> = Vec::new();
    for (k, &(l, h)) in heads.iter().enumerate() {
        let d = widths[k];
        let v = match &mean {
            Some(m) => m[k].clone(),
            None => vec![0f32; d],
        };
        match edits.iter_mut().find(|(_, b, _)| *b == l) {
            Some((_, _, Edit::SetSlices(s))) => s.push((h * d, v)),
            _ => edits.push((Tap::Z, l, Edit::SetSlices(vec![(h * d, v)]))),
        }
    }
    tracer.add_tap_edits(edits)?;
    eprintln!(
        "ablating head(s) {} ({})",
        heads
            .iter()
            .map(|(l, h)| format!("{l}.{h}"))
            .collect::<Vec<_>>()
            .join(", "),
        if mean.is_some() {
            "set to their mean"
        } else {
            "set to zero"
        }
    );
    Ok(Some(run::HeadAblationSettings {
        heads,
        mean_from: ab
            .mean_from
            .as_ref()
            .map(|p| crate::paths::recorded(p.as_os_str())),
    }))
}

/// Each head's mean slice of `z` (`head_dims[k]` values) over every prompt and stored position of
/// `from`, a run of the same model traced with --taps z at the head's block.
fn head_means(
    from: &Path,
    loaded: &Loaded,
    heads: &[(usize, usize)],
    head_dims: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let shown = display_path(from);
    let run =
        crate::run::Run::open(from).with_context(|| format!("--ablate-heads-from {shown}"))?;
    let (ours, theirs) = (&loaded.facts, &run.manifest.model);
    if (&ours.architecture, ours.n_layer, ours.n_embd, ours.n_params)
        != (
            &theirs.architecture,
            theirs.n_layer,
            theirs.n_embd,
            theirs.n_params,
        )
    {
        bail!(
            "--ablate-heads-from {shown}: traced with another model ({}), not {}",
            theirs.file_name,
            ours.file_name
        );
    }
    let Some(rec) = run.manifest.capture.taps.iter().find(|r| r.tap == Tap::Z) else {
        bail!("--ablate-heads-from {shown}: the run holds no z tap (trace it with --taps z)");
    };
    let mut place = Vec::new();
    for (k, &(l, h)) in heads.iter().enumerate() {
        let Some(b) = rec.blocks.iter().position(|&b| b == l) else {
            bail!("--ablate-heads-from {shown}: its z holds no block {l}");
        };
        let slot = if rec.head_ids.is_empty() {
            Some(h)
        } else {
            rec.head_ids.iter().position(|&x| x == h)
        };
        let Some(slot) = slot else {
            bail!("--ablate-heads-from {shown}: its z holds no head {h} (--heads)");
        };
        if rec.width % head_dims[k] != 0 || (slot + 1) * head_dims[k] > rec.width {
            bail!(
                "--ablate-heads-from {shown}: its z rows ({} values) do not hold head {h}",
                rec.width
            );
        }
        place.push((b, slot * head_dims[k]));
    }
    let mut sums: Vec<Vec<f64>> = head_dims.iter().map(|&d| vec![0f64; d]).collect();
    let mut n = 0usize;
    for i in 0..run.manifest.prompts.len() {
        let z = run
            .tap(Tap::Z, i)
            .with_context(|| format!("--ablate-heads-from {shown}"))?;
        let z = z
            .into_dimensionality::<ndarray::Ix3>()
            .map_err(|e| anyhow::anyhow!("--ablate-heads-from {shown}: z of prompt {i}: {e}"))?;
        for pos in 0..z.shape()[1] {
            for (k, &(b, start)) in place.iter().enumerate() {
                for (s, &x) in sums[k].iter_mut().zip(z.slice(ndarray::s![
                    b,
                    pos,
                    start..start + head_dims[k]
                ])) {
                    *s += x as f64;
                }
            }
            n += 1;
        }
    }
    if n == 0 {
        bail!("--ablate-heads-from {shown}: the run holds no positions");
    }
    Ok(sums
        .into_iter()
        .map(|v| v.into_iter().map(|x| (x / n as f64) as f32).collect())
        .collect())
}

/// `--ablate`: load the file's directions (llama.cpp's control-vector rules), make each chosen
/// point's direction unit length, and have the tracer project it out there. Returns the points.
pub(crate) fn ablate(
    tracer: &mut Tracer,
    ablation: Option<&Ablation>,
    model: &Model,
) -> Result<(Vec<usize>, Option<usize>)> {
    let Some(ab) = ablation else {
        return Ok((Vec::new(), None));
    };
    let (n, n_layer) = (model.n_embd(), model.n_layer());
    let cv = crate::cvec::load(&[(ab.file.as_path(), 1.0)], n)?;
    // Direction `direction.<il>` belongs to point il + 1 (see README, control vectors).
    let available: Vec<usize> = cv
        .layers
        .iter()
        .map(|&il| il + 1)
        .filter(|&p| p <= n_layer)
        .collect();
    // With --ablate-taps the chosen numbers are blocks, and block b's parts write into point
    // b + 1: that point's direction is theirs (default: every block whose point has one).
    let in_blocks = !ab.taps.is_empty();
    let own = |p: usize| if in_blocks { p + 1 } else { p };
    let points = match &ab.points {
        Some(spec) => parse_points(spec, n_layer)
            .map_err(|e| anyhow::anyhow!(e.replacen("--points", "--ablate-points", 1)))?,
        None if in_blocks => available.iter().map(|&p| p - 1).collect(),
        None => available.clone(),
    };
    if points.is_empty() {
        bail!(
            "{}: no direction for any point of this {n_layer}-block model",
            display_path(&ab.file)
        );
    }
    let single = ab.direction.as_deref().is_some_and(|d| d.trim() != "each");
    if in_blocks {
        if let Some(b) = points.iter().find(|&&b| b >= n_layer) {
            bail!(
                "--ablate-points {b} with --ablate-taps: the points name blocks, 0-{}",
                n_layer - 1
            );
        }
        if let Some(b) = points
            .iter()
            .find(|&&b| !single && !available.contains(&own(b)))
        {
            bail!(
                "{}: no direction for point {} (what block {b} writes into; the file has points {}); choose --ablate-points among the blocks before them, or one direction with --ablate-direction P",
                display_path(&ab.file),
                b + 1,
                crate::cli::format_points(&available)
            );
        }
    } else if let Some(p) = points.iter().find(|p| !available.contains(p)) {
        bail!(
            "{}: no direction for point {p} (the file has points {}); choose --ablate-points among them",
            display_path(&ab.file),
            crate::cli::format_points(&available)
        );
    }
    // One direction everywhere (Arditi et al.), or each point its own.
    let from: Option<usize> = match ab.direction.as_deref().map(str::trim) {
        None => crate::cvec::default_point(&ab.file, n_layer, "--ablate-direction P")?
            .filter(|p| available.contains(p)),
        Some("each") => None,
        Some(s) => {
            let q: usize = s.parse().map_err(|_| {
                anyhow::anyhow!("--ablate-direction {s:?}: expected a point number or \"each\"")
            })?;
            if !available.contains(&q) {
                bail!(
                    "{}: no direction for point {q} (the file has points {})",
                    display_path(&ab.file),
                    crate::cli::format_points(&available)
                );
            }
            Some(q)
        }
    };
    match from {
        Some(q) => eprintln!(
            "ablating point {q}'s direction at {} {}",
            if in_blocks { "blocks" } else { "points" },
            crate::cli::format_points(&points)
        ),
        None if ab.direction.is_none() => eprintln!(
            "note: {} records no peak point, so each point's own direction is ablated (--ablate-direction P ablates one)",
            display_path(&ab.file)
        ),
        None => {}
    }
    let unit = |p: usize| -> Vec<f32> {
        // A zero direction projects nothing out (the identity).
        cv.unit_at(from.unwrap_or(own(p)))
            .expect("every chosen point has a direction (checked above)")
            .into_iter()
            .map(|x| x as f32)
            .collect()
    };
    if in_blocks {
        let blocks = points;
        let mut edits = Vec::new();
        for &tap in &ab.taps {
            for &b in &blocks {
                edits.push((tap, b, Edit::Ablate(unit(b))));
            }
        }
        tracer.add_tap_edits(edits)?;
        return Ok((blocks, from));
    }
    let mut edits = vec![None; n_layer + 1];
    for &p in &points {
        edits[p] = Some(Edit::Ablate(unit(p)));
    }
    tracer.set_edits(edits);
    Ok((points, from))
}

/// Load `--control-vector` files (llama.cpp's loader rules) and apply them scaled to the chosen
/// points. Returns the steered points.
pub(crate) fn steer(
    tracer: &mut Tracer,
    steering: Option<&Steering>,
    model: &Model,
) -> Result<Option<(usize, usize)>> {
    let Some(st) = steering else {
        return Ok(None);
    };
    let files: Vec<(&Path, f32)> = st.files.iter().map(|p| (p.as_path(), st.scale)).collect();
    let cv = crate::cvec::load(&files, model.n_embd())?;
    let n_layer = model.n_layer();
    if n_layer < 2 {
        bail!("a control vector needs a model of at least 2 blocks (llama.cpp has no slot for block 0)");
    }
    // Default: the point where the direction separates its labels best, when `direction` wrote
    // it (there, scale 1 shifts the state by one difference of the label means: additions at
    // every block compound through the residual stream into a shift nobody can read).
    let peak = if st.points.is_some() {
        None
    } else {
        let peaks = st
            .files
            .iter()
            .map(|f| crate::cvec::default_point(f, n_layer, "--control-points"))
            .collect::<Result<Vec<_>, _>>()?;
        match peaks.first() {
            Some(&Some(p)) if peaks.iter().all(|&q| q == Some(p)) && (2..n_layer).contains(&p) => {
                Some(p)
            }
            _ => None,
        }
    };
    let (a, b) = match (&st.points, peak) {
        (Some(spec), _) => parse_control_points(spec, n_layer).map_err(anyhow::Error::msg)?,
        (None, Some(p)) => {
            eprintln!(
                "steering at point {p}, where the direction separates its labels best (scale 1 = one difference of the label means there; --control-points to choose)"
            );
            (p, p)
        }
        (None, None) => (2, (cv.n_layers() + 1).clamp(2, n_layer)),
    };
    // The buffer llama.cpp takes covers layers 1..n_layer-1; pad (or cut) to that.
    let mut data = cv.data.clone();
    data.resize(model.n_embd() * (n_layer - 1), 0.0);
    // Something must be steered: a direction of the files at one of the chosen points (point
    // il + 1 is shifted through layer il; a scale of 0 still counts, as the identity).
    if !cv.layers.iter().any(|&il| (a..=b).contains(&(il + 1))) {
        bail!(
            "the control vector has no direction at points {a}-{b} of this {n_layer}-block model (it holds llama.cpp layers {:?}), so nothing would be steered",
            cv.layers.iter().take(8).collect::<Vec<_>>()
        );
    }
    tracer.set_control_vector(Some((&data, (a - 1) as i32, (b - 1) as i32)))?;
    Ok(Some((a, b)))
}

fn display_path(p: &Path) -> String {
    p.display().to_string()
}
