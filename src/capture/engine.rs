//! The tracer: prompts → batches → eval callback → per-prompt states, and the generation loop.
//!
//! Prompts are decoded in *groups* of up to `n_seq` sequences that share one KV cache (sized
//! `ctx × n_seq`). Within a group, prompt tokens are packed into batches of at most `n_batch`
//! tokens (a long prompt may span several batches; positions continue). After each decode the
//! rows the callback captured are mapped back to (sequence, position) from the batch layout.
//! With `--generate N`, each group then runs N greedy steps, one token per live sequence per
//! decode, reusing the KV cache (no prefix is re-run). When a group is done its prompts are handed
//! to the caller one by one (so the caller can stream them to disk) and the KV cache is cleared.

use ndarray::{Array3, ArrayD, IxDyn};

use super::arch;
use super::taps::Tap;
use crate::llama::context::{
    Batch, CacheType, CaptureSpec, Context, ContextError, ContextParams, Edit,
};
use crate::llama::model::Model;
use crate::llama::Token;

/// Largest |sum − 1| of a captured row of attention probabilities: llama.cpp's softmax in float32
/// over at most a few thousand keys (measured 1.9e-7 on SmolLM2, 1.7e-7 on Gemma-3).
const PATTERN_SUM_TOLERANCE: f64 = 1e-4;

/// Which positions of a prompt are stored.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Every prompt position (and every generated one).
    All,
    /// Only the last prompt position (and every generated one).
    Last,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("prompt {index} has {tokens} tokens{}, more than --ctx {ctx}; raise --ctx or shorten the prompt",
        if *.generate > 0 { format!(" + {} to generate", .generate) } else { String::new() })]
    TooLong {
        index: usize,
        tokens: usize,
        generate: usize,
        ctx: usize,
    },
    #[error("prompt {0} has no tokens")]
    Empty(usize),
    #[error("incomplete capture: point {point} (tensor `{tensor}`) delivered {got} rows, expected {want}; \
             this architecture ({arch}) does not expose the residual stream under the expected names")]
    Incomplete {
        point: usize,
        tensor: String,
        got: usize,
        want: usize,
        arch: String,
    },
    #[error(
        "the structural self-check of llama.cpp's graph confirmed {checked} of {n_layer} blocks \
             of this architecture ({arch}); its trace cannot be trusted"
    )]
    Unchecked {
        checked: usize,
        n_layer: usize,
        arch: String,
    },
    #[error("the intervention at point {point} reached {got} rows of a decode, expected {want}")]
    Intervention {
        point: usize,
        got: usize,
        want: usize,
    },
    #[error("activation patching: {0}")]
    Patch(String),
    #[error("{0}")]
    Tap(String),
    #[error("llama.cpp returned no logits for prompt {0}")]
    NoLogits(usize),
    #[error("prompt {index}: the {what} at point {point}, position {position} is NaN or infinite, \
             or saturated beyond llama.cpp's f32 arithmetic (a squared norm over 3.4e38, every logit \
             equal) — a broken model or an extreme control vector; nothing was written. Pass \
             --allow-nonfinite to record such prompts instead")]
    NonFinite {
        index: usize,
        what: &'static str,
        point: usize,
        position: usize,
    },
    #[error("the sink rejected prompt {index}: {source}")]
    Sink { index: usize, source: anyhow::Error },
}

/// A state llama.cpp computed with: finite, and with a squared norm f32 holds. Beyond it every
/// norm llama.cpp takes in f32 overflows (an RMS norm of such a state is exactly 0), so what
/// follows is not the model's computation but the overflow's (`--control-scale 1e30` makes every
/// logit 0 and the generation empty).
fn measurable_state(row: &[f32]) -> bool {
    let mut sq = 0f64;
    for &x in row {
        if !x.is_finite() {
            return false;
        }
        sq += x as f64 * x as f64;
    }
    sq <= f32::MAX as f64
}

/// Next-token logits that are a distribution: finite and not all equal (every logit equal —
/// exactly 0 after an overflowed final norm — says nothing about the next token).
fn measurable_logits(row: &[f32]) -> bool {
    row.iter().all(|x| x.is_finite()) && (row.len() < 2 || row.iter().any(|&x| x != row[0]))
}

/// Settings of a tracer.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub positions: Positions,
    /// Points to keep (0..=n_layer), sorted and unique.
    pub points: Vec<usize>,
    /// Greedy tokens to generate after each prompt.
    pub generate: usize,
    /// Limit for one prompt plus its generation, in tokens.
    pub ctx: usize,
    /// Sequences decoded together.
    pub n_seq: usize,
    /// Largest number of tokens in one decode.
    pub n_batch: usize,
    /// Physical micro-batch size (llama.cpp splits a batch into ubatches of this size).
    pub n_ubatch: usize,
    pub threads: i32,
    /// Record the first non-finite state of each prompt (in [`PromptTrace::nonfinite`]) instead
    /// of failing with [`TraceError::NonFinite`].
    pub allow_nonfinite: bool,
    /// Element type of the KV cache.
    pub cache_type: CacheType,
    /// Taps inside blocks to capture (never `resid`: that is `points`), at the blocks `points`
    /// names (point p < n_layer names block p).
    pub taps: Vec<Tap>,
    /// Compute attention without flash attention (always with the `pattern` tap).
    pub no_flash_attn: bool,
    /// Heads kept by the `z` and `pattern` taps (sorted, unique; None: every head).
    pub heads: Option<Vec<usize>>,
}

impl TraceConfig {
    /// Defaults for a model: every point, every position, 16 sequences, 512-token batches.
    pub fn new(model: &Model) -> TraceConfig {
        TraceConfig {
            positions: Positions::All,
            points: (0..=model.n_layer()).collect(),
            generate: 0,
            ctx: 512,
            n_seq: 16,
            n_batch: 512,
            n_ubatch: 512,
            threads: default_threads(),
            allow_nonfinite: false,
            cache_type: CacheType::F16,
            taps: Vec::new(),
            no_flash_attn: false,
            heads: None,
        }
    }

    /// Blocks the in-block taps are captured at: the kept points below n_layer.
    pub fn tap_blocks(&self, n_layer: usize) -> Vec<usize> {
        self.points
            .iter()
            .copied()
            .filter(|&p| p < n_layer)
            .collect()
    }

    /// Whether something kept is computed by the last block after llama.cpp's output-row
    /// selection (point L, or a tap at block L−1), so that every kept token must be an output.
    pub fn reads_last_block(&self, n_layer: usize) -> bool {
        self.points.last() == Some(&n_layer)
            || (!self.taps.is_empty() && self.points.contains(&(n_layer - 1)))
    }
}

impl TraceConfig {
    /// Check every prompt (plus its generation) fits the context, before any work is done.
    pub fn check_prompts(&self, prompts: &[Vec<Token>]) -> Result<(), TraceError> {
        for (index, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(TraceError::Empty(index));
            }
            if p.len().saturating_add(self.generate) > self.ctx {
                return Err(TraceError::TooLong {
                    index,
                    tokens: p.len(),
                    generate: self.generate,
                    ctx: self.ctx,
                });
            }
        }
        Ok(())
    }
}

/// Physical cores are what llama.cpp's matmuls scale with; use all available ones.
pub fn default_threads() -> i32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as i32)
        .unwrap_or(4)
}

/// The states of one prompt.
#[derive(Debug, Clone)]
pub struct PromptTrace {
    /// Index of the prompt in the input list.
    pub index: usize,
    /// `[n_points, n_positions, n_embd]`: kept points × kept positions.
    pub states: Array3<f32>,
    /// Per in-block tap of the config (in its order): `[n_blocks, n_positions, width]`, and for
    /// `pattern` `[n_blocks, n_head, n_positions, n_tokens]` (queries at the kept positions, keys
    /// at every token; zero where a key comes after its query).
    pub taps: Vec<ArrayD<f32>>,
    /// Token position (into prompt + generated tokens) of every kept position.
    pub positions: Vec<usize>,
    /// Prompt tokens followed by generated tokens.
    pub tokens: Vec<Token>,
    pub n_prompt: usize,
    /// Next-token logits at the last prompt position.
    pub logits: Vec<f32>,
    /// With `allow_nonfinite`: the first (point slot, position slot) holding a NaN or infinity
    /// (non-finite logits are reported at the last kept point and the last prompt position).
    pub nonfinite: Option<(usize, usize)>,
}

impl PromptTrace {
    /// Index (into `positions`) of the last prompt position.
    pub fn last_prompt_slot(&self) -> usize {
        self.positions
            .iter()
            .position(|&p| p == self.n_prompt - 1)
            .expect("last prompt position is always kept")
    }

    pub fn generated(&self) -> &[Token] {
        &self.tokens[self.n_prompt..]
    }
}

/// A token generation chose, as [`Tracer::trace_streaming`] hands it over.
pub struct GeneratedToken<'a> {
    /// Index of the prompt in the input list.
    pub index: usize,
    pub token: Token,
    /// Tokens generated for this prompt before this one.
    pub n_generated: usize,
    /// Per kept point: the row at the position whose logits chose `token`.
    pub rows: Vec<&'a [f32]>,
}

/// What [`Tracer::serve`] asks its caller for.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// Sequences that may join now.
    pub free: usize,
    /// Nothing is generating: the caller may wait for a prompt.
    pub idle: bool,
    /// KV cells left for joining prompts (each needs its prompt plus its budget).
    pub cells: usize,
}

/// A prompt that joins [`Tracer::serve`]: its index (as `done` and `on_token` see it), tokens,
/// and the most tokens it may generate.
#[derive(Debug, Clone)]
pub struct Joining {
    pub index: usize,
    pub tokens: Vec<Token>,
    pub budget: usize,
}

/// One sequence being traced in the current group.
struct Seq {
    index: usize,
    tokens: Vec<Token>,
    n_prompt: usize,
    /// Per kept point, then per tap slot: rows of the kept positions so far.
    rows: Vec<Vec<f32>>,
    positions: Vec<usize>,
    logits: Option<Vec<f32>>,
    /// Next token to decode during generation, None once finished.
    next: Option<Token>,
    /// First (point slot, position slot) that was not finite.
    nonfinite: Option<(usize, usize)>,
}

/// What a tap inside blocks turned out to be in this model's graph.
#[derive(Debug, Clone)]
pub struct TapInfo {
    pub tap: Tap,
    /// Values per token (for `pattern`: the heads; its keys are the prompt's tokens).
    pub width: usize,
    pub last_block_output_rows: bool,
    pub tensors: Vec<String>,
    /// `pattern` only: the softmax has attention sinks at some block, so rows there sum below 1.
    pub sinks: bool,
}

/// Where each token of the last batch came from.
#[derive(Clone, Copy)]
struct Slot {
    seq: usize,
    pos: usize,
    kept: bool,
}

pub struct Tracer<'m> {
    ctx: Context<'m>,
    cfg: TraceConfig,
    arch: String,
    n_layer: usize,
    n_embd: usize,
    batch: Batch,
    layout: Vec<Slot>,
    decode_s: f64,
    point0: String,
    /// Points with an intervention.
    edited: Vec<usize>,
    /// Interventions at fixed points (ablation), and activation patching applied per decode.
    edits: Vec<Option<Edit>>,
    /// Interventions at fixed tap slots (head ablation), and the tap slots with an intervention
    /// in the current decode (fixed or patched).
    tap_edits: Vec<Option<Edit>>,
    tap_edited: Vec<usize>,
    patch: Option<Patch<'m>>,
}

/// Which prompt positions activation patching replaces.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchPositions {
    All,
    Last,
    List(Vec<usize>),
}

/// Where patched states come from: `source(prompt index, tap, at, position)` is the row that
/// replaces the traced one: the residual stream at point `at` for [`Tap::Resid`], else the tap's
/// row at block `at`.
pub type PatchSource<'m> =
    Box<dyn FnMut(usize, Tap, usize, usize) -> Result<Vec<f32>, String> + 'm>;

/// Activation patching: at `points` and the chosen prompt positions (generated tokens are never
/// patched), replace the rows of each of `taps` with those from `source`. For [`Tap::Resid`]
/// `points` are points (0..=n_layer); for a tap inside the block they are its blocks (those below
/// n_layer; the tracer must capture it there).
pub struct Patch<'m> {
    pub points: Vec<usize>,
    pub taps: Vec<Tap>,
    /// For [`Tap::Z`]: only these (block, head) slices are replaced (None: every head).
    pub heads: Option<Vec<(usize, usize)>>,
    pub positions: PatchPositions,
    pub source: PatchSource<'m>,
}

impl<'m> Tracer<'m> {
    pub fn new(model: &'m Model, cfg: TraceConfig) -> Result<Tracer<'m>, TraceError> {
        let arch = model.meta("general.architecture").unwrap_or_default();
        Self::with_point0(model, cfg, arch::point0_tensor(&arch))
    }

    /// A tracer that captures `point0` as point 0 instead of the architecture table's name (for
    /// checking what happens when a name does not exist in the graph).
    pub fn with_point0(
        model: &'m Model,
        mut cfg: TraceConfig,
        point0: &str,
    ) -> Result<Tracer<'m>, TraceError> {
        let arch = model.meta("general.architecture").unwrap_or_default();
        let blocks = cfg.tap_blocks(model.n_layer());
        let spec = CaptureSpec {
            arch: arch.clone(),
            point0_name: point0.to_string(),
            n_layer: model.n_layer(),
            n_embd: model.n_embd(),
            points: cfg.points.clone(),
            taps: cfg.taps.iter().map(|&t| (t, blocks.clone())).collect(),
        };
        // A decode never holds more tokens than the KV cache (llama.cpp's own rule, applied here
        // so that the sizes asked for are the sizes that run).
        let n_ctx = cfg.ctx.saturating_mul(cfg.n_seq);
        cfg.n_batch = cfg.n_batch.min(n_ctx);
        cfg.n_ubatch = cfg.n_ubatch.min(cfg.n_batch);
        let n_batch = cfg.n_batch;
        let ctx = Context::new(
            model,
            ContextParams {
                n_ctx,
                n_batch,
                n_ubatch: cfg.n_ubatch,
                n_seq_max: cfg.n_seq,
                // Logits are needed at the last prompt token and each generated one (≤ one per
                // sequence in a decode) — and at every kept position when the last point is kept
                // there, since llama.cpp's last block computes only the rows it outputs.
                n_outputs_max: if cfg.positions == Positions::All
                    && cfg.reads_last_block(model.n_layer())
                {
                    0
                } else {
                    cfg.n_seq
                },
                n_threads: cfg.threads,
                embeddings: false,
                capture: Some(spec),
                cache_type: cfg.cache_type,
                no_flash_attn: cfg.no_flash_attn || cfg.taps.contains(&Tap::Pattern),
            },
        )?;
        Ok(Tracer {
            ctx,
            batch: Batch::new(n_batch.max(cfg.n_seq))?,
            n_layer: model.n_layer(),
            n_embd: model.n_embd(),
            arch,
            cfg,
            layout: Vec::new(),
            decode_s: 0.0,
            point0: point0.to_string(),
            edited: Vec::new(),
            edits: vec![None; model.n_layer() + 1],
            tap_edits: Vec::new(),
            tap_edited: Vec::new(),
            patch: None,
        })
    }

    /// Interventions written into the residual stream (see [`Edit`]): `edits[p]` at point p.
    pub fn set_edits(&mut self, edits: Vec<Option<Edit>>) {
        self.edits = edits;
        self.edits.resize(self.n_layer + 1, None);
        self.apply_edits(self.edits.clone(), self.tap_edits.clone());
    }

    /// The tap slot of `tap` at `block`: the tracer must capture the tap there.
    fn tap_slot(&self, tap: Tap, block: usize) -> Result<usize, TraceError> {
        let blocks = self.cfg.tap_blocks(self.n_layer);
        match (
            self.cfg.taps.iter().position(|&t| t == tap),
            blocks.iter().position(|&b| b == block),
        ) {
            (Some(t), Some(b)) => Ok(t * blocks.len() + b),
            _ => Err(TraceError::Tap(format!(
                "an intervention on tap `{tap}` at block {block} needs that tap captured at that block (--taps {tap}, and point {block} among --points)"
            ))),
        }
    }

    /// Add interventions written into taps inside blocks (see [`Edit`]): `(tap, block, edit)`, at
    /// every row of the tap's tensor (e.g. a head's slice of `z` set to zero). Each tap must be
    /// captured at its block, and carry one intervention.
    pub fn add_tap_edits(&mut self, edits: Vec<(Tap, usize, Edit)>) -> Result<(), TraceError> {
        let mut slots = self.tap_edits.clone();
        slots.resize(self.n_tap_slots(), None);
        for (tap, block, edit) in edits {
            let k = self.tap_slot(tap, block)?;
            if slots[k].is_some() {
                return Err(TraceError::Tap(format!(
                    "tap `{tap}` at block {block} would carry two interventions: choose one"
                )));
            }
            slots[k] = Some(edit);
        }
        self.tap_edits = slots;
        self.apply_edits(self.edits.clone(), self.tap_edits.clone());
        Ok(())
    }

    /// Activation patching for the next traces (see [`Patch`]); points must not be ablated too.
    pub fn set_patch(&mut self, patch: Option<Patch<'m>>) -> Result<(), TraceError> {
        if let Some(p) = &patch {
            for &tap in p.taps.iter().filter(|&&t| t != Tap::Resid) {
                for &b in p.points.iter().filter(|&&b| b < self.n_layer) {
                    let k = self.tap_slot(tap, b)?;
                    if self.tap_edits.get(k).is_some_and(Option::is_some) {
                        return Err(TraceError::Tap(format!(
                            "tap `{tap}` at block {b} is both ablated and patched: choose one intervention per tap"
                        )));
                    }
                }
            }
        }
        self.patch = patch;
        // Without a patch, the next decodes carry only the fixed edits (no stale rows).
        self.apply_edits(self.edits.clone(), self.tap_edits.clone());
        Ok(())
    }

    fn apply_edits(&mut self, edits: Vec<Option<Edit>>, tap_edits: Vec<Option<Edit>>) {
        self.edited = edits
            .iter()
            .enumerate()
            .filter_map(|(p, e)| e.as_ref().map(|_| p))
            .collect();
        self.tap_edited = tap_edits
            .iter()
            .enumerate()
            .filter_map(|(k, e)| e.as_ref().map(|_| k))
            .collect();
        self.ctx.set_edits(edits);
        self.ctx.set_tap_edits(tap_edits);
    }

    /// The patching edits of the batch about to be decoded.
    fn patch_edits(&mut self, seqs: &[Seq], outputs: &[usize]) -> Result<(), TraceError> {
        let n_tap_slots = self.n_tap_slots();
        let n_head = self.ctx.model().n_head();
        let Some(patch) = self.patch.as_mut() else {
            return Ok(());
        };
        let mut edits = self.edits.clone();
        let mut tap_edits = self.tap_edits.clone();
        tap_edits.resize(n_tap_slots, None);
        let blocks = self.cfg.tap_blocks(self.n_layer);
        let tap_layout = self.ctx.tap_layout();
        for &tap in &patch.taps {
            // A tap inside the block is patched at the points that name blocks (< n_layer).
            for &p in patch
                .points
                .iter()
                .filter(|&&p| tap == Tap::Resid || p < self.n_layer)
            {
                // The edit's rows: every batch token, or the outputs where the tensor holds only
                // those (the last block's output; a tap after its output-row selection).
                let slot = if tap == Tap::Resid {
                    None
                } else {
                    let t = self.cfg.taps.iter().position(|&t| t == tap);
                    let b = blocks.iter().position(|&b| b == p);
                    match (t, b) {
                        (Some(t), Some(b)) => Some(t * blocks.len() + b),
                        _ => {
                            return Err(TraceError::Patch(format!(
                                "tap `{tap}` is not captured at block {p}"
                            )))
                        }
                    }
                };
                let out_rows = match slot {
                    None => p == self.n_layer,
                    Some(k) => tap_layout.get(k).is_some_and(|l| l.1),
                };
                let rows: Vec<usize> = if out_rows {
                    outputs.to_vec()
                } else {
                    (0..self.layout.len()).collect()
                };
                let mut values = Vec::with_capacity(rows.len());
                for i in rows {
                    let slot = self.layout[i];
                    let seq = &seqs[slot.seq];
                    let chosen = slot.pos < seq.n_prompt
                        && match &patch.positions {
                            PatchPositions::All => true,
                            PatchPositions::Last => slot.pos + 1 == seq.n_prompt,
                            PatchPositions::List(l) => l.contains(&slot.pos),
                        };
                    values.push(if chosen {
                        Some(
                            (patch.source)(seq.index, tap, p, slot.pos)
                                .map_err(TraceError::Patch)?,
                        )
                    } else {
                        None
                    });
                }
                match (slot, &patch.heads) {
                    (None, _) => edits[p] = Some(Edit::Replace(values)),
                    (Some(k), Some(heads)) if tap == Tap::Z => {
                        let w = tap_layout.get(k).map_or(0, |l| l.0);
                        if n_head == 0 || w % n_head != 0 {
                            return Err(TraceError::Patch(format!(
                                "z at block {p} has {w} values per token, not a multiple of the model's {n_head} heads"
                            )));
                        }
                        let d = w / n_head;
                        let cols = heads
                            .iter()
                            .filter(|&&(b, _)| b == p)
                            .map(|&(_, h)| (h * d, (h + 1) * d))
                            .collect();
                        tap_edits[k] = Some(Edit::ReplaceCols(values, cols));
                    }
                    (Some(k), _) => tap_edits[k] = Some(Edit::Replace(values)),
                }
            }
        }
        self.apply_edits(edits, tap_edits);
        Ok(())
    }

    /// Apply a control vector (`data` starts at llama.cpp layer 1, n_embd floats per layer) to
    /// layers `il_start..=il_end`, or clear it with `None`. `l_out` then includes the shift.
    pub fn set_control_vector(&mut self, cv: Option<(&[f32], i32, i32)>) -> Result<(), TraceError> {
        match cv {
            Some((data, a, b)) => self.ctx.set_control_vector(Some(data), a, b)?,
            None => self.ctx.set_control_vector(None, 0, 0)?,
        }
        Ok(())
    }

    /// The configuration the tracer runs with: the one it was given, with the batch sizes lowered
    /// to what the context holds (see [`Tracer::new`]).
    pub fn config(&self) -> &TraceConfig {
        &self.cfg
    }

    /// Sequences decoded together (the size of a batch group).
    pub fn n_seq(&self) -> usize {
        self.cfg.n_seq
    }

    /// Values per row of `tap`'s tensor at `block` as llama.cpp's graph holds it (every head for
    /// `z`, whatever --heads keeps), once [`Tracer::identify`] found the taps.
    pub fn tap_width(&self, tap: Tap, block: usize) -> Option<usize> {
        let k = self.tap_slot(tap, block).ok()?;
        self.ctx.tap_layout().get(k).map(|l| l.0)
    }

    /// Bytes of states read from the backend so far (only stored rows are read).
    pub fn bytes_read(&self) -> u64 {
        self.ctx.bytes_read()
    }

    /// Blocks whose input and output llama.cpp's graph confirmed (see `llama::context`):
    /// n_layer once a decode succeeded.
    pub fn blocks_checked(&self) -> usize {
        self.ctx.blocks_checked()
    }

    /// Seconds spent inside llama.cpp's decode (callbacks included) so far.
    pub fn decode_seconds(&self) -> f64 {
        self.decode_s
    }

    /// Check every prompt fits before any work is done.
    pub fn check_prompts(&self, prompts: &[Vec<Token>]) -> Result<(), TraceError> {
        self.cfg.check_prompts(prompts)
    }

    /// Trace `prompts`, handing each finished prompt to `sink` in input order. `progress` is told
    /// how many tokens were decoded after each decode.
    pub fn trace(
        &mut self,
        prompts: &[Vec<Token>],
        sink: impl FnMut(PromptTrace) -> anyhow::Result<()>,
        progress: impl FnMut(usize),
    ) -> Result<(), TraceError> {
        self.trace_streaming(prompts, sink, progress, &mut |_| true)
    }

    /// [`Tracer::trace`], telling `on_token` about every generated token as it is chosen, before
    /// it is decoded: the prompt's index, the token, and the kept points' rows at the position
    /// whose logits chose it (one `n_embd` row per kept point, in `points` order). `on_token`
    /// returning false ends that prompt's generation there (the token is not kept), as if the
    /// model had ended it: a server's client went away, or had enough.
    pub fn trace_streaming(
        &mut self,
        prompts: &[Vec<Token>],
        mut sink: impl FnMut(PromptTrace) -> anyhow::Result<()>,
        mut progress: impl FnMut(usize),
        on_token: &mut dyn FnMut(GeneratedToken) -> bool,
    ) -> Result<(), TraceError> {
        self.check_prompts(prompts)?;
        if self.cfg.taps.contains(&Tap::Pattern) {
            self.check_pattern(prompts)?;
        }
        if !self.cfg.taps.is_empty() {
            self.check_tap_blocks()?;
            self.identify_taps(prompts)?;
        }
        let n_slots = self.cfg.points.len() + self.n_tap_slots();
        let mut start = 0;
        while start < prompts.len() {
            let end = (start + self.cfg.n_seq).min(prompts.len());
            let mut seqs: Vec<Seq> = (start..end)
                .map(|index| Seq {
                    index,
                    tokens: prompts[index].clone(),
                    n_prompt: prompts[index].len(),
                    rows: vec![Vec::new(); n_slots],
                    positions: Vec::new(),
                    logits: None,
                    next: None,
                    nonfinite: None,
                })
                .collect();
            self.ctx.clear_memory();
            self.prompt_phase(&mut seqs, &mut progress)?;
            self.generate_phase(&mut seqs, &mut progress, on_token)?;
            for s in seqs {
                let index = s.index;
                let t = self.finish(s)?;
                sink(t).map_err(|source| TraceError::Sink { index, source })?;
            }
            start = end;
        }
        self.ctx.clear_memory();
        Ok(())
    }

    /// Taps inside blocks need a block to be captured at.
    fn check_tap_blocks(&self) -> Result<(), TraceError> {
        if self.cfg.tap_blocks(self.n_layer).is_empty() {
            return Err(TraceError::Tap(format!(
                "taps inside blocks need a block: --points names none below point {} (point p < {} names block p)",
                self.n_layer, self.n_layer
            )));
        }
        Ok(())
    }

    /// `pattern` maps the KV cache's cells to key positions: one sequence at a time in a
    /// cleared cache puts position p in cell p, unless a sliding-window cache wraps around.
    fn check_pattern(&self, prompts: &[Vec<Token>]) -> Result<(), TraceError> {
        if self.cfg.n_seq != 1 {
            return Err(TraceError::Tap(
                "tap `pattern` needs one prompt at a time (--n-seq 1): the key positions are the KV cache's cells of one sequence".into(),
            ));
        }
        let n_swa = self.ctx.model().n_swa();
        if n_swa > 0 {
            if let Some((i, p)) = prompts
                .iter()
                .enumerate()
                .find(|(_, p)| p.len() + self.cfg.generate > n_swa)
            {
                return Err(TraceError::Tap(format!(
                    "tap `pattern`: prompt {i} has {} tokens{}, more than this model's attention window ({n_swa}); its sliding-window cache reuses cells, so key positions cannot be told apart",
                    p.len(),
                    if self.cfg.generate > 0 { format!(" + {} to generate", self.cfg.generate) } else { String::new() }
                )));
            }
        }
        Ok(())
    }

    /// Tap slots: every in-block tap at every tap block.
    fn n_tap_slots(&self) -> usize {
        self.cfg.taps.len() * self.cfg.tap_blocks(self.n_layer).len()
    }

    /// Find the taps in llama.cpp's graph now (every trace does it first) and say what they are:
    /// per in-block tap of the config, its width, whether the last block holds output rows only,
    /// and the tensor name at each block.
    pub fn identify(&mut self, prompts: &[Vec<Token>]) -> Result<Vec<TapInfo>, TraceError> {
        if self.cfg.taps.is_empty() {
            return Ok(Vec::new());
        }
        self.check_tap_blocks()?;
        self.identify_taps(prompts)?;
        let layout = self.ctx.tap_layout();
        let heads = self.ctx.tap_heads();
        let names = self.ctx.tap_tensors();
        let sinks = self.ctx.tap_sinks();
        let n = self.cfg.tap_blocks(self.n_layer).len();
        Ok(self
            .cfg
            .taps
            .iter()
            .enumerate()
            .map(|(t, &tap)| TapInfo {
                tap,
                width: match (tap, &self.cfg.heads) {
                    (Tap::Pattern, Some(k)) => k.len(),
                    (Tap::Pattern, None) => heads[t * n],
                    (Tap::Z, Some(k)) => layout[t * n].0 / self.ctx.model().n_head() * k.len(),
                    _ => layout[t * n].0,
                },
                last_block_output_rows: layout[(t + 1) * n - 1].1,
                tensors: names[t * n..(t + 1) * n].to_vec(),
                sinks: sinks[t * n..(t + 1) * n].iter().any(|&s| s),
            })
            .collect())
    }

    /// Find the taps in llama.cpp's graph: a one-token decode whose graph is checked (block
    /// structure, then every tap located; see `llama::context`), so the traced graphs, which have
    /// the same shape, are matched from the start. Run before every trace, after whatever changed
    /// the graph (a control vector adds nodes).
    fn identify_taps(&mut self, prompts: &[Vec<Token>]) -> Result<(), TraceError> {
        let token = prompts
            .first()
            .and_then(|p| p.first().copied())
            .unwrap_or(self.ctx.model().bos());
        self.ctx.recheck();
        self.ctx.clear_memory();
        self.batch.clear();
        self.batch.push(token, 0, 0, true);
        self.ctx.set_wanted_rows(&[false], &[false]);
        let t = std::time::Instant::now();
        let r = self.ctx.decode(&self.batch);
        self.decode_s += t.elapsed().as_secs_f64();
        self.ctx.clear_memory();
        r?;
        let layout = self.ctx.tap_layout();
        if layout.len() != self.n_tap_slots() {
            return Err(TraceError::Unchecked {
                checked: self.ctx.blocks_checked(),
                n_layer: self.n_layer,
                arch: self.arch.clone(),
            });
        }
        let blocks = self.cfg.tap_blocks(self.n_layer);
        let heads = self.ctx.tap_heads();
        for (t, tap) in self.cfg.taps.iter().enumerate() {
            let widths: Vec<usize> = layout[t * blocks.len()..(t + 1) * blocks.len()]
                .iter()
                .zip(&heads[t * blocks.len()..(t + 1) * blocks.len()])
                .map(|(l, &h)| l.0.max(h))
                .collect();
            let n_head = self.ctx.model().n_head();
            let mismatched = layout[t * blocks.len()..(t + 1) * blocks.len()]
                .iter()
                .zip(&heads[t * blocks.len()..(t + 1) * blocks.len()])
                .any(|(l, &h)| {
                    if *tap == Tap::Z {
                        l.0 % n_head != 0
                    } else {
                        h != n_head
                    }
                });
            if self.cfg.heads.is_some() && matches!(tap, Tap::Z | Tap::Pattern) && mismatched {
                return Err(TraceError::Tap(format!(
                    "--heads: tap `{tap}` does not have this model's {n_head} heads at every chosen block; choose blocks with --points, or leave out --heads"
                )));
            }
            if widths.iter().any(|&w| w != widths[0]) {
                return Err(TraceError::Tap(format!(
                    "tap `{tap}` cannot be captured at every block: it has {} values per token at some blocks and {} at others (blocks of different sizes); choose blocks of one size with --points",
                    widths.iter().min().unwrap_or(&0),
                    widths.iter().max().unwrap_or(&0)
                )));
            }
        }
        Ok(())
    }

    fn keeps(&self, s: &Seq, pos: usize) -> bool {
        match self.cfg.positions {
            Positions::All => true,
            Positions::Last => pos + 1 >= s.n_prompt,
        }
    }

    /// Whether token `pos` of `s` must be marked as an output: its logits are needed (last prompt
    /// token, generated tokens) or its row of the last block is kept.
    fn is_output(&self, s: &Seq, pos: usize) -> bool {
        pos + 1 >= s.n_prompt || (self.keeps(s, pos) && self.cfg.reads_last_block(self.n_layer))
    }

    fn prompt_phase(
        &mut self,
        seqs: &mut [Seq],
        progress: &mut impl FnMut(usize),
    ) -> Result<(), TraceError> {
        let all: Vec<usize> = (0..seqs.len()).collect();
        self.prompt_phase_of(seqs, &all, progress)
    }

    /// Decode the prompts of the sequences `which` (indices into `seqs`, which are also their
    /// sequence ids), packed into batches of at most `n_batch` tokens.
    fn prompt_phase_of(
        &mut self,
        seqs: &mut [Seq],
        which: &[usize],
        progress: &mut impl FnMut(usize),
    ) -> Result<(), TraceError> {
        let work: Vec<(usize, usize)> = which
            .iter()
            .flat_map(|&si| (0..seqs[si].n_prompt).map(move |p| (si, p)))
            .collect();
        for chunk in work.chunks(self.cfg.n_batch) {
            self.batch.clear();
            self.layout.clear();
            for &(si, pos) in chunk {
                let s = &seqs[si];
                let out = self.is_output(s, pos);
                self.batch.push(s.tokens[pos], pos, si, out);
                self.layout.push(Slot {
                    seq: si,
                    pos,
                    kept: self.keeps(s, pos),
                });
            }
            self.decode_and_collect(seqs)?;
            progress(chunk.len());
        }
        Ok(())
    }

    /// Each of the sequences `which` chooses its first generated token from its prompt's last
    /// logits (none when the model ends there).
    fn first_tokens(&self, seqs: &mut [Seq], which: &[usize]) -> Result<(), TraceError> {
        let model = self.ctx.model();
        for &si in which {
            let s = &mut seqs[si];
            let logits = s.logits.as_ref().ok_or(TraceError::NoLogits(s.index))?;
            let t = argmax(logits) as Token;
            s.next = (!model.is_eog(t)).then_some(t);
        }
        Ok(())
    }

    fn generate_phase(
        &mut self,
        seqs: &mut [Seq],
        progress: &mut impl FnMut(usize),
        on_token: &mut dyn FnMut(GeneratedToken) -> bool,
    ) -> Result<(), TraceError> {
        if self.cfg.generate == 0 {
            return Ok(());
        }
        let all: Vec<usize> = (0..seqs.len()).collect();
        self.first_tokens(seqs, &all)?;
        for _ in 0..self.cfg.generate {
            if !self.generate_step(seqs, progress, on_token)? {
                break;
            }
        }
        Ok(())
    }

    /// One step of greedy generation: every sequence with a next token (that `on_token` lets
    /// go on) has it decoded and chooses the one after. False when no sequence had one.
    fn generate_step(
        &mut self,
        seqs: &mut [Seq],
        progress: &mut impl FnMut(usize),
        on_token: &mut dyn FnMut(GeneratedToken) -> bool,
    ) -> Result<bool, TraceError> {
        let (e, n_points) = (self.n_embd, self.cfg.points.len());
        let model = self.ctx.model();
        self.batch.clear();
        self.layout.clear();
        for (si, s) in seqs.iter_mut().enumerate() {
            if let Some(t) = s.next {
                let rows: Vec<&[f32]> = s.rows[..n_points]
                    .iter()
                    .map(|r| &r[r.len().saturating_sub(e)..])
                    .collect();
                let go_on = on_token(GeneratedToken {
                    index: s.index,
                    token: t,
                    n_generated: s.tokens.len() - s.n_prompt,
                    rows,
                });
                if !go_on {
                    s.next = None;
                    continue;
                }
                let pos = s.tokens.len();
                s.tokens.push(t);
                self.batch.push(t, pos, si, true);
                self.layout.push(Slot {
                    seq: si,
                    pos,
                    kept: true,
                });
            }
        }
        if self.batch.is_empty() {
            return Ok(false);
        }
        self.decode_and_collect(seqs)?;
        progress(self.batch.len());
        for (r, slot) in self.layout.iter().enumerate() {
            let logits = self
                .ctx
                .logits_ith(r)
                .ok_or(TraceError::NoLogits(seqs[slot.seq].index))?;
            let t = argmax(logits) as Token;
            seqs[slot.seq].next = (!model.is_eog(t)).then_some(t);
        }
        Ok(true)
    }

    /// Continuous batching, for a server: up to `n_seq − 1` sequences generate together, a sequence
    /// that ends leaves at once (its states go to `done`), and another joins in its slot while
    /// the rest go on. `admit` is asked for new prompts ([`Admission`]: free slots, whether
    /// nothing is generating — then it may wait for one —, and the KV cells left) and answers
    /// with [`Joining`] prompts, or None for no more (the loop ends once the last sequence has
    /// left). A joining prompt is decoded in batches of its own (with any that join with it);
    /// every generation step decodes one token of every live sequence. `on_token` ends a
    /// sequence by returning false (at its budget, or when its client left).
    ///
    /// The KV cells of a sequence that left are not reused while others generate: llama.cpp
    /// would place a newcomer's keys in the gap, out of order among the others', and the
    /// attention sums would then round differently from the same prompt alone (measured: 1% at
    /// block 0 on SmolLM2). So they pass to the last sequence id, which no decode uses, cells
    /// are taken in order, each joining prompt reserving its prompt plus its budget, and the
    /// cache is cleared whenever nothing is generating.
    pub fn serve(
        &mut self,
        admit: &mut dyn FnMut(Admission) -> Option<Vec<Joining>>,
        on_token: &mut dyn FnMut(GeneratedToken) -> bool,
        done: &mut dyn FnMut(PromptTrace),
    ) -> Result<(), TraceError> {
        let n_slots = self.cfg.points.len() + self.n_tap_slots();
        // The last sequence id keeps the cells of the sequences that left.
        if self.cfg.n_seq < 2 {
            return Err(TraceError::Tap(
                "internal: continuous batching needs n_seq ≥ 2 (one id keeps the cells of sequences that left)".into(),
            ));
        }
        let n = self.cfg.n_seq - 1;
        let keeper = n;
        let capacity = self.cfg.ctx.saturating_mul(self.cfg.n_seq);
        let empty = || Seq {
            index: usize::MAX,
            tokens: Vec::new(),
            n_prompt: 0,
            rows: vec![Vec::new(); n_slots],
            positions: Vec::new(),
            logits: None,
            next: None,
            nonfinite: None,
        };
        let mut seqs: Vec<Seq> = (0..n).map(|_| empty()).collect();
        let mut live = vec![false; n];
        // Cells taken or promised since the cache was last cleared.
        let mut reserved = 0usize;
        self.ctx.clear_memory();
        loop {
            let n_live = live.iter().filter(|&&l| l).count();
            if n_live == 0 && reserved > 0 {
                self.ctx.clear_memory();
                reserved = 0;
            }
            if n_live < n {
                let asked = Admission {
                    free: n - n_live,
                    idle: n_live == 0,
                    cells: capacity - reserved,
                };
                match admit(asked) {
                    None if n_live == 0 => break,
                    None => {}
                    Some(new) => {
                        let mut which = Vec::new();
                        for j in new.into_iter().take(n - n_live) {
                            if j.tokens.is_empty() {
                                return Err(TraceError::Empty(j.index));
                            }
                            let need = j.tokens.len() + j.budget;
                            if reserved + need > capacity {
                                return Err(TraceError::TooLong {
                                    index: j.index,
                                    tokens: j.tokens.len(),
                                    generate: j.budget,
                                    ctx: capacity - reserved,
                                });
                            }
                            reserved += need;
                            let si = live
                                .iter()
                                .position(|&l| !l)
                                .expect("a free slot (at most `free` admitted)");
                            seqs[si] = Seq {
                                index: j.index,
                                n_prompt: j.tokens.len(),
                                tokens: j.tokens,
                                ..empty()
                            };
                            live[si] = true;
                            which.push(si);
                        }
                        if !which.is_empty() {
                            self.prompt_phase_of(&mut seqs, &which, &mut |_| {})?;
                            self.first_tokens(&mut seqs, &which)?;
                        }
                    }
                }
            }
            if live.iter().any(|&l| l) {
                self.generate_step(&mut seqs, &mut |_| {}, on_token)?;
            }
            for si in 0..n {
                if live[si] && seqs[si].next.is_none() {
                    live[si] = false;
                    let s = std::mem::replace(&mut seqs[si], empty());
                    self.ctx.retire_sequence(si, keeper);
                    done(self.finish(s)?);
                }
            }
        }
        self.ctx.clear_memory();
        Ok(())
    }

    /// Decode the current batch and copy the kept rows into their sequences. Only kept rows are
    /// read from the backend.
    fn decode_and_collect(&mut self, seqs: &mut [Seq]) -> Result<(), TraceError> {
        let n_tokens = self.batch.len();
        let outputs: Vec<usize> = (0..n_tokens).filter(|&i| self.batch.is_output(i)).collect();
        let kept: Vec<bool> = self.layout.iter().map(|s| s.kept).collect();
        let kept_out: Vec<bool> = outputs.iter().map(|&i| kept[i]).collect();
        self.ctx.set_wanted_rows(&kept, &kept_out);
        self.patch_edits(seqs, &outputs)?;
        let t = std::time::Instant::now();
        self.ctx.decode(&self.batch)?;
        self.decode_s += t.elapsed().as_secs_f64();
        // Every intervention reached every row of its point.
        let edited = self
            .ctx
            .rows_edited()
            .expect("tracer contexts always capture");
        for &point in &self.edited {
            let want = if point == self.n_layer {
                outputs.len()
            } else {
                n_tokens
            };
            if edited[point] != want {
                return Err(TraceError::Intervention {
                    point,
                    got: edited[point],
                    want,
                });
            }
        }
        let tap_edited = self
            .ctx
            .tap_rows_edited()
            .expect("tracer contexts always capture");
        // The taps' layout and blocks, read once per decode (the checks below use them too).
        let tap_layout = self.ctx.tap_layout();
        let blocks = self.cfg.tap_blocks(self.n_layer);
        for &k in &self.tap_edited {
            let want = if tap_layout.get(k).is_some_and(|l| l.1) {
                outputs.len()
            } else {
                n_tokens
            };
            if tap_edited[k] != want {
                return Err(TraceError::Tap(format!(
                    "the intervention on tap `{}` at block {} reached {} rows of a decode, expected {want}",
                    self.cfg.taps[k / blocks.len()],
                    blocks[k % blocks.len()],
                    tap_edited[k]
                )));
            }
        }
        // Every decode after the first relies on the first graph's structural check.
        if self.ctx.blocks_checked() != self.n_layer {
            return Err(TraceError::Unchecked {
                checked: self.ctx.blocks_checked(),
                n_layer: self.n_layer,
                arch: self.arch.clone(),
            });
        }
        let rows = self.ctx.captured().expect("tracer contexts always capture");
        let seen = self
            .ctx
            .rows_seen()
            .expect("tracer contexts always capture");
        let e = self.n_embd;
        let n_kept = kept.iter().filter(|&&k| k).count();
        let n_kept_out = kept_out.iter().filter(|&&k| k).count();
        // Validate: every kept point delivered one row per token (the last block: per output),
        // and the kept ones were copied.
        for (slot, &point) in self.cfg.points.iter().enumerate() {
            let (want, copied) = if point == self.n_layer {
                (outputs.len(), n_kept_out)
            } else {
                (n_tokens, n_kept)
            };
            if seen[slot] != want || rows[slot].len() != copied * e {
                return Err(TraceError::Incomplete {
                    point,
                    tensor: if point == 0 {
                        self.point0.clone()
                    } else {
                        arch::point_tensor(&self.arch, point)
                    },
                    got: seen[slot],
                    want,
                    arch: self.arch.clone(),
                });
            }
        }
        let n_points = self.cfg.points.len();
        let tap_heads = self.ctx.tap_heads();
        let tap_sinks = self.ctx.tap_sinks();
        let row_lens = self
            .ctx
            .tap_row_lens()
            .expect("tracer contexts always capture");
        // Where each copied row of a `pattern` slot starts.
        let starts: Vec<Vec<usize>> = row_lens
            .iter()
            .map(|l| {
                l.iter()
                    .scan(0, |acc, &n| {
                        let s = *acc;
                        *acc += n;
                        Some(s)
                    })
                    .collect()
            })
            .collect();
        for (k, &(width, out_rows)) in tap_layout.iter().enumerate() {
            let slot = n_points + k;
            let (want, copied) = if out_rows {
                (outputs.len(), n_kept_out)
            } else {
                (n_tokens, n_kept)
            };
            let complete = if width == 0 {
                row_lens[k].len() == copied && row_lens[k].iter().sum::<usize>() == rows[slot].len()
            } else {
                rows[slot].len() == copied * width
            };
            if seen[slot] != want || !complete {
                return Err(TraceError::Incomplete {
                    point: blocks[k % blocks.len()],
                    tensor: format!("tap {}", self.cfg.taps[k / blocks.len()]),
                    got: seen[slot],
                    want,
                    arch: self.arch.clone(),
                });
            }
        }
        // Row of each kept batch token among the copied rows: for the last block counted over
        // kept outputs, for every other point over kept tokens.
        let mut kept_row = vec![usize::MAX; n_tokens];
        let mut out_row = vec![usize::MAX; n_tokens];
        let mut k = 0;
        for (i, &kp) in kept.iter().enumerate() {
            if kp {
                kept_row[i] = k;
                k += 1;
            }
        }
        let mut k = 0;
        for &i in &outputs {
            if kept[i] {
                out_row[i] = k;
                k += 1;
            }
        }
        for (i, slot) in self.layout.iter().enumerate() {
            let s = &mut seqs[slot.seq];
            if slot.kept {
                let j = s.positions.len();
                s.positions.push(slot.pos);
                for (k, &point) in self.cfg.points.iter().enumerate() {
                    let r = if point == self.n_layer {
                        out_row[i]
                    } else {
                        kept_row[i]
                    };
                    let row = &rows[k][r * e..(r + 1) * e];
                    if s.nonfinite.is_none() && !measurable_state(row) {
                        s.nonfinite = Some((k, j));
                        if !self.cfg.allow_nonfinite {
                            return Err(TraceError::NonFinite {
                                index: s.index,
                                what: "state",
                                point,
                                position: slot.pos,
                            });
                        }
                    }
                    s.rows[k].extend_from_slice(row);
                }
                for (k, &(width, out_rows)) in tap_layout.iter().enumerate() {
                    let r = if out_rows { out_row[i] } else { kept_row[i] };
                    if width == 0 {
                        // `pattern`: per head, the keys up to the query (cells 0..=pos); every
                        // later cell must hold an exact 0 (masked), or cells are not positions.
                        let (start, len) = (starts[k][r], row_lens[k][r]);
                        let heads = tap_heads[k];
                        let n_kv = len / heads;
                        let row = &rows[n_points + k][start..start + len];
                        let block = blocks[k % blocks.len()];
                        if n_kv <= slot.pos {
                            return Err(TraceError::Tap(format!("tap `pattern` at block {block}: {n_kv} key cells for a query at position {}", slot.pos)));
                        }
                        for h in 0..heads {
                            let cells = &row[h * n_kv..(h + 1) * n_kv];
                            if let Some(c) = cells[slot.pos + 1..].iter().position(|&x| x != 0.0) {
                                return Err(TraceError::Tap(format!(
                                    "tap `pattern` at block {block}, head {h}: key cell {} after the query at position {} holds {}: the KV cache's cells are not this prompt's positions",
                                    slot.pos + 1 + c, slot.pos, cells[slot.pos + 1 + c]
                                )));
                            }
                            let kept = &cells[..=slot.pos];
                            let finite = kept.iter().all(|x| x.is_finite());
                            let sum: f64 = kept.iter().map(|&x| x as f64).sum();
                            // With attention sinks the sink's share is missing from the row:
                            // the keys' probabilities are non-negative and sum to at most 1.
                            let softmax = if tap_sinks[k] {
                                kept.iter().all(|&x| x >= 0.0) && sum <= 1.0 + PATTERN_SUM_TOLERANCE
                            } else {
                                (sum - 1.0).abs() <= PATTERN_SUM_TOLERANCE
                            };
                            if !finite && self.cfg.allow_nonfinite {
                                s.nonfinite.get_or_insert((n_points - 1, j));
                            } else if !finite || !softmax {
                                let over = if tap_sinks[k] {
                                    "these keys and the attention sink"
                                } else {
                                    "these keys"
                                };
                                return Err(TraceError::Tap(format!(
                                    "tap `pattern` at block {block}, head {h}, position {}: the probabilities sum to {sum} (NaN or infinite values, or not a softmax over {over})",
                                    slot.pos
                                )));
                            }
                            s.rows[n_points + k].extend_from_slice(kept);
                        }
                        continue;
                    }
                    let row = &rows[n_points + k][r * width..(r + 1) * width];
                    if s.nonfinite.is_none() && !row.iter().all(|x| x.is_finite()) {
                        s.nonfinite = Some((n_points - 1, j));
                        if !self.cfg.allow_nonfinite {
                            return Err(TraceError::NonFinite {
                                index: s.index,
                                what: "tap value",
                                point: blocks[k % blocks.len()],
                                position: slot.pos,
                            });
                        }
                    }
                    s.rows[n_points + k].extend_from_slice(row);
                }
            }
            if slot.pos + 1 == s.n_prompt {
                let logits = self
                    .ctx
                    .logits_ith(i)
                    .ok_or(TraceError::NoLogits(s.index))?;
                if s.nonfinite.is_none() && !measurable_logits(logits) {
                    s.nonfinite = Some((self.cfg.points.len() - 1, s.positions.len() - 1));
                    if !self.cfg.allow_nonfinite {
                        return Err(TraceError::NonFinite {
                            index: s.index,
                            what: "next-token logits",
                            point: self.n_layer,
                            position: slot.pos,
                        });
                    }
                }
                s.logits = Some(logits.to_vec());
            }
        }
        Ok(())
    }

    fn finish(&self, s: Seq) -> Result<PromptTrace, TraceError> {
        let n_pos = s.positions.len();
        let n_points = self.cfg.points.len();
        let mut flat = Vec::with_capacity(n_points * n_pos * self.n_embd);
        for r in &s.rows[..n_points] {
            flat.extend_from_slice(r);
        }
        let states = Array3::from_shape_vec((n_points, n_pos, self.n_embd), flat)
            .expect("rows match the layout");
        let n_blocks = self.cfg.tap_blocks(self.n_layer).len();
        let layout = self.ctx.tap_layout();
        let mut taps = Vec::with_capacity(self.cfg.taps.len());
        let heads = self.ctx.tap_heads();
        let n_tokens = s.tokens.len();
        for (t, chunk) in s.rows[n_points..].chunks(n_blocks.max(1)).enumerate() {
            if t >= self.cfg.taps.len() {
                break;
            }
            if self.cfg.taps[t] == Tap::Pattern {
                // Queries at the kept positions, keys at every token, zero after the query.
                let h = heads[t * n_blocks];
                let kept: Vec<usize> = self.cfg.heads.clone().unwrap_or_else(|| (0..h).collect());
                let mut a = ArrayD::zeros(IxDyn(&[n_blocks, kept.len(), n_pos, n_tokens]));
                for (b, r) in chunk.iter().enumerate() {
                    let mut at = 0;
                    for (j, &pos) in s.positions.iter().enumerate() {
                        for head in 0..h {
                            if let Some(slot) = kept.iter().position(|&k| k == head) {
                                for key in 0..=pos {
                                    a[[b, slot, j, key]] = r[at + key];
                                }
                            }
                            at += pos + 1;
                        }
                    }
                }
                taps.push(a);
                continue;
            }
            // Every block of a tap has the same width (checked by identify_taps).
            let width = layout[t * n_blocks].0;
            let mut flat = Vec::with_capacity(n_blocks * n_pos * width);
            for r in chunk {
                flat.extend_from_slice(r);
            }
            let mut a = ArrayD::from_shape_vec(IxDyn(&[n_blocks, n_pos, width]), flat)
                .expect("rows match the layout");
            if let (Tap::Z, Some(kept)) = (self.cfg.taps[t], &self.cfg.heads) {
                // Head-major rows: keep the chosen heads' slices.
                let head_dim = width / self.ctx.model().n_head();
                let cols: Vec<usize> = kept
                    .iter()
                    .flat_map(|&h| h * head_dim..(h + 1) * head_dim)
                    .collect();
                a = a.select(ndarray::Axis(2), &cols);
            }
            taps.push(a);
        }
        Ok(PromptTrace {
            index: s.index,
            states,
            taps,
            positions: s.positions,
            logits: s.logits.ok_or(TraceError::NoLogits(s.index))?,
            tokens: s.tokens,
            n_prompt: s.n_prompt,
            nonfinite: s.nonfinite,
        })
    }
}

/// Index of the largest value (first on ties), as greedy decoding picks it.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
