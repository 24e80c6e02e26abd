//! The run directory: the one place that knows its file names and layout (schema_version 1).
//!
//! ```text
//! RUN_DIR/
//!   run.json          manifest: provenance, model facts, capture settings, prompts; "complete": true
//!   states/00000.npy  [n_points, n_positions, n_embd] per prompt (f32, or f16 with --dtype f16)
//!   states.csv        the same values in long/wide CSV (with --format csv|both)
//!   last.npy          [n_prompts, n_points, n_embd] f32 at the last prompt position (always)
//!   logits.npy        [n_prompts, n_vocab] f32 next-token logits at the same position (always)
//!   tokens.csv        prompt, id, label, position, token_id, piece, generated
//!   metrics.csv       prompt, id, label, point, norm, step, rel_step, cos_next, cos_final, turn_deg
//!                     (last prompt position; blank where undefined)
//! ```
//! Writing happens in a hidden sibling directory that is renamed into place after `run.json`
//! (with `"complete": true`) is written, so an interrupted or failed trace never leaves a directory
//! that looks complete.

pub mod npy;
pub mod read;
pub mod synthetic;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Axis};
use serde::{Deserialize, Serialize};

use crate::analysis::metrics::{self, TrajectoryMetrics};
use crate::capture::engine::{Positions, PromptTrace};
use crate::model_info::ModelFacts;
use crate::output::{Kind, OutputError, Staging};
use npy::{NpyRows, F16};

pub const SCHEMA_VERSION: u32 = 2;
/// The oldest run format this version reads (version 1: no taps inside blocks).
pub const OLDEST_SCHEMA_VERSION: u32 = 1;
/// Folder of the per-prompt files of taps inside blocks: `taps/<tap>/<index>.npy`.
pub const TAPS_DIR: &str = "taps";
pub const RUN_JSON: &str = "run.json";
pub const STATES_DIR: &str = "states";
pub const STATES_CSV: &str = "states.csv";
pub const LAST_NPY: &str = "last.npy";
pub const LOGITS_NPY: &str = "logits.npy";
pub const TOKENS_CSV: &str = "tokens.csv";
pub const METRICS_CSV: &str = "metrics.csv";
pub const LENS_JSON: &str = "lens.json";
/// While a trace runs (staging only): the plan fingerprint a resumed trace must match.
pub const RESUME_PLAN: &str = ".plan";
/// While a trace runs (staging only): one line per prompt fully on disk.
pub const JOURNAL: &str = ".journal.jsonl";

/// One prompt of an unfinished trace, fully written and synced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub record: PromptRecord,
    /// Its logit lens, when traced with --lens.
    #[serde(default)]
    pub lens: Option<PromptLens>,
    /// Its lens self-check difference.
    #[serde(default)]
    pub lens_diff: f64,
    /// Lengths of tokens.csv, metrics.csv and states.csv at the checkpoint.
    #[serde(default)]
    pub csv_lengths: [u64; 3],
    /// How many prompts the checkpoint of this entry journaled (to tell a whole one).
    #[serde(default)]
    pub checkpoint_size: usize,
    /// sha256 of this prompt's staged data, verified before `--resume` keeps it: its states and
    /// tap files by relative path, its rows of `last.npy` and `logits.npy` (`last.npy#3`), and the
    /// CSV bytes its checkpoint added (`tokens.csv@120..480`). An entry without them is not kept.
    #[serde(default)]
    pub checksums: std::collections::BTreeMap<String, String>,
}

/// The checksum of one staged item named as in [`JournalEntry::checksums`], computed from the
/// staging directory `dir`.
fn staged_checksum(dir: &Path, key: &str) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let range = |rel: &str, start: u64, end: u64| -> std::io::Result<String> {
        let f = fs::File::open(dir.join(rel))?;
        let mut buf = vec![0u8; (end.saturating_sub(start)).min(f.metadata()?.len()) as usize];
        f.read_exact_at(&mut buf, start)?;
        Ok(format!("{:x}", Sha256::digest(&buf)))
    };
    if let Some((rel, row)) = key.split_once('#') {
        let row: u64 = row.parse().map_err(std::io::Error::other)?;
        let h = npy::NpyHeader::read(&dir.join(rel))?;
        let width = h.shape.iter().skip(1).product::<usize>() as u64 * 4;
        let start = h.data_offset + row * width;
        return range(rel, start, start + width);
    }
    if let Some((rel, span)) = key.split_once('@') {
        let (a, b) = span
            .split_once("..")
            .ok_or_else(|| std::io::Error::other("bad span"))?;
        let (a, b): (u64, u64) = (
            a.parse().map_err(std::io::Error::other)?,
            b.parse().map_err(std::io::Error::other)?,
        );
        return range(rel, a, b);
    }
    let mut h = Sha256::new();
    std::io::copy(&mut fs::File::open(dir.join(key))?, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The journal's complete lines, in order (a torn last line — a power cut — is ignored).
pub fn read_journal(path: &Path) -> Vec<JournalEntry> {
    let text = crate::paths::read_text(path, crate::paths::MAX_JSON).unwrap_or_default();
    let mut out: Vec<JournalEntry> = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str::<JournalEntry>(line) {
            Ok(e) if e.record.index == out.len() => out.push(e),
            _ => break,
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot write to {path}: {source}")]
    Unwritable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a gguf-trace run directory (no run.json)")]
    NotARun(String),
    #[error(
        "{0} is an incomplete run (interrupted or failed trace: run.json lacks \"complete\": true)"
    )]
    Incomplete(String),
    #[error("{0} was replaced while it was being read (a gguf-trace run with --force wrote a new run there); run this command again")]
    Replaced(String),
    #[error("{path}: invalid run.json: {source}")]
    BadManifest {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported schema_version {found} (this gguf-trace reads {OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION})")]
    Schema { path: String, found: u32 },
    #[error("{path}: {msg}")]
    Npy { path: String, msg: String },
    #[error("{0}: the run has no prompts")]
    NoPrompts(String),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("--dtype f16 cannot hold {what}: it reaches {max:.0} in magnitude, beyond f16's largest value 65504 (this model's residual stream is too large for f16); trace with --dtype f32")]
    F16Range { what: String, max: f32 },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    /// Integer taps (`router_experts`: expert numbers), whatever --dtype says; not a choice of
    /// --dtype.
    #[value(skip)]
    I32,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 => 2,
        }
    }

    /// The NPY header's `descr` of this type (little-endian).
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F16 => "<f2",
            Dtype::I32 => "<i4",
        }
    }

    /// The type tap `tap`'s files are written in when the run's --dtype is `self`.
    pub fn for_tap(self, tap: crate::capture::taps::Tap) -> Dtype {
        if tap.integer() {
            Dtype::I32
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Npy,
    Csv,
    Both,
}

impl Format {
    pub fn npy(self) -> bool {
        matches!(self, Format::Npy | Format::Both)
    }
    pub fn csv(self) -> bool {
        matches!(self, Format::Csv | Format::Both)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema_version: u32,
    /// Written last: a run without it is incomplete.
    pub complete: bool,
    pub tool: String,
    pub tool_version: String,
    pub created: String,
    pub provenance: Provenance,
    pub model: ModelFacts,
    pub capture: CaptureSettings,
    pub prompts: Vec<PromptRecord>,
    pub timings: Timings,
    /// Logit-lens settings and self-check (None without --lens).
    #[serde(default)]
    pub lens: Option<LensInfo>,
    /// Direct logit attribution: its convention and self-check (None without --attribution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionInfo>,
    /// Fingerprint of the model file, the options and the prompts (what `--resume` matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// How the logit lens was computed, and whether it reproduces the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LensInfo {
    pub k: usize,
    /// "last" (last prompt position) or "all" (every stored position).
    pub positions: String,
    pub output_tensor: String,
    pub norm: String,
    pub eps: f32,
    pub softcap: f32,
    /// Largest |lens logit − model logit| at the last point and last prompt position, over prompts.
    pub self_check_max_abs_diff: f64,
    pub tolerance: f64,
    /// False when the lens does not reproduce the model's own logits: its numbers must not be used.
    pub valid: bool,
}

/// How the direct logit attribution was computed, and whether its shares add up to the model's
/// own logits (`prompts[].attribution` holds each prompt's shares).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttributionInfo {
    pub convention: String,
    pub output_tensor: String,
    pub norm: String,
    pub softcap: f32,
    pub logit_scale: f32,
    /// Largest |model logit − sum of shares| over prompts, relative to the sum of |shares|.
    pub max_relative_residual: f64,
    /// Largest |x − sum of components| / |x| over prompts.
    pub max_unexplained: f64,
    pub residual_tolerance: f64,
    pub unexplained_tolerance: f64,
    /// False when some prompt's shares do not add up within the tolerances: not to be used.
    pub valid: bool,
    /// Whether per-head shares were computed (`--taps z`).
    #[serde(default)]
    pub heads: bool,
    /// Largest gap between a block's attention share and the sum of its heads' shares (and its
    /// output bias's), relative to the prompt's Σ|share|.
    #[serde(default)]
    pub max_heads_gap: f64,
    /// Largest relative distance between a block's captured attention output and the output
    /// projection of its captured heads (`W_O z + b`): heads are drawn only where it is small.
    #[serde(default)]
    pub max_projection_error: f64,
    /// Whether the head shares add up to their blocks' (within the residual tolerance): false
    /// where a block's attention output is not `W_O z + b` (a post-attention norm, Gemma 2/3).
    #[serde(default)]
    pub heads_valid: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub model_sha256: String,
    pub llama_cpp_sys_2: String,
    /// llama.cpp's system info (CPU features: states differ slightly across SIMD paths, so runs are
    /// reproducible per machine, not bit-identical across machines).
    pub system_info: String,
    pub devices: Vec<String>,
    pub command_line: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureSettings {
    /// Points kept (0 = input of block 0, p = output of block p-1).
    pub points: Vec<usize>,
    /// llama.cpp tensor captured for each kept point.
    pub point_tensors: Vec<String>,
    pub positions: Positions,
    pub generate: usize,
    pub chat: bool,
    pub system: Option<String>,
    pub dtype: Dtype,
    pub format: Format,
    pub ctx: usize,
    pub n_seq: usize,
    pub n_batch: usize,
    pub n_ubatch: usize,
    pub threads: i32,
    pub n_gpu_layers: i32,
    /// Control vectors applied while tracing (`--control-vector`), empty when unsteered.
    #[serde(default)]
    pub control_vectors: Vec<String>,
    #[serde(default)]
    pub control_scale: f32,
    /// Steered points (first, last); point p is shifted through llama.cpp layer p − 1.
    #[serde(default)]
    pub control_points: Option<(usize, usize)>,
    /// Traced with `--allow-nonfinite` (non-finite prompts recorded instead of failing).
    #[serde(default)]
    pub allow_nonfinite: bool,
    /// llama.cpp RPC servers that ran layers (`--rpc`), and their shares (`--tensor-split`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rpc: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tensor_split: Vec<f32>,
    /// Whether llama.cpp repacked quantized weights for the CPU (false with `--no-repack`).
    #[serde(default = "yes")]
    pub cpu_repack: bool,
    /// Element type of llama.cpp's KV cache (`--cache-type`; runs before it used f16).
    #[serde(default)]
    pub cache_type: crate::llama::context::CacheType,
    /// `--ablate`: the direction file and the points ablated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ablation: Option<AblationSettings>,
    /// `--patch-from`: the source run, points and positions patched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<PatchSettings>,
    /// `--ablate-heads`: the heads ablated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ablated_heads: Option<HeadAblationSettings>,
    /// Taps inside blocks (`--taps`; schema 2): what each file holds. Empty in version-1 runs
    /// and for `--taps resid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<TapRecord>,
    /// The settings record as the trace used it (schema 2; see `crate::settings`): every option
    /// as given, with threads and layer placement resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<crate::settings::CaptureArgs>,
    /// Attention computed without flash attention: a trace with the `pattern` tap (flash attention
    /// keeps no probabilities) or with an f32 KV cache; false when llama.cpp chose.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flash_attn_off: bool,
}

/// One tap inside blocks: per prompt `prompts[].tap_files[tap]`, an NPY array of `dtype`,
/// `[blocks.len(), n_positions, width]` (the positions of the prompt's states file), or for
/// `pattern` `[blocks.len(), heads, n_positions, n_tokens]` (see [`TapRecord::shape`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TapRecord {
    pub tap: crate::capture::taps::Tap,
    /// Blocks captured (block b reads point b), in file order.
    pub blocks: Vec<usize>,
    /// Values per token: n_embd for resid_mid, attn_out and mlp_out; n_head × head_dim for `z`
    /// (head-major: reshape to [n_head, head_dim]); the MLP's hidden size for `neurons`; the
    /// heads for `pattern`.
    pub width: usize,
    /// For `z`: the number of heads kept (width = heads × head_dim); for `pattern`: the heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<usize>,
    /// The model's head numbers kept (`--heads`), in file order; empty: every head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub head_ids: Vec<usize>,
    pub dtype: Dtype,
    /// Folder of the per-prompt files, relative to the run.
    pub dir: String,
    /// llama.cpp's name of the tensor captured at each block (names are not unique: the tensor
    /// was identified by the graph's structure, see the README's "Taps inside the block").
    pub tensors: Vec<String>,
    /// Whether the last block's rows are the model's output rows only (llama.cpp computes the
    /// rest of the last block only for tokens it outputs).
    pub last_block_output_rows: bool,
    /// `pattern` only: the model's softmax has attention sinks (gpt-oss), a learned logit per
    /// head normalised with the keys but belonging to none, so each row sums to 1 minus the
    /// sink's share (as transformers' eager attention returns it). Absent: rows sum to 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_sinks: bool,
}

/// Activation patching applied during a trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PatchSettings {
    pub from: String,
    pub points: Vec<usize>,
    pub positions: String,
    /// `--patch-taps`: what was replaced at `points` (taps inside the block: at those blocks).
    /// Empty: the residual stream (runs before taps could be patched).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<crate::capture::taps::Tap>,
    /// `--patch-heads`: only these (block, head) slices of z were replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<(usize, usize)>,
}

/// `--ablate-heads`: attention heads whose slice of the `z` tap was overwritten during a trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadAblationSettings {
    /// (block, head) of every ablated head.
    pub heads: Vec<(usize, usize)>,
    /// `--ablate-heads-from`: the run whose mean z each head was set to; None: zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_from: Option<String>,
}

/// A directional ablation applied during a trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AblationSettings {
    pub file: String,
    pub points: Vec<usize>,
    /// The point whose direction was projected out everywhere; None: each point its own.
    #[serde(default)]
    pub direction_point: Option<usize>,
    /// `--ablate-taps`: the parts whose output lost the direction (at the blocks `points` name);
    /// empty: the residual stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<crate::capture::taps::Tap>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptRecord {
    pub index: usize,
    pub id: String,
    pub label: Option<String>,
    /// Where the prompt came from ("-p #1", "prompts/x.txt:3").
    pub source: String,
    pub text: String,
    /// The text as tokenized (after the chat template, if any).
    pub rendered: String,
    /// Prompt tokens then generated tokens.
    pub tokens: Vec<i32>,
    pub pieces: Vec<String>,
    pub n_prompt_tokens: usize,
    /// Token positions stored in the states file, in order.
    pub positions: Vec<usize>,
    pub generated_text: String,
    /// The most likely next tokens at the last prompt position (id, text, probability), most
    /// likely first: what the model answers. Empty in runs traced before it was recorded, and
    /// where the logits were not finite.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<crate::answer::TopToken>,
    /// Relative path of the states file (None with --format csv).
    pub states_file: Option<String>,
    /// Relative path of each tap's file (schema 2, taps inside blocks only).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tap_files: std::collections::BTreeMap<String, String>,
    /// The first point and position whose state (or the next-token logits, reported at the last
    /// point) was NaN or infinite — only in runs traced with `--allow-nonfinite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonfinite: Option<NonFinite>,
    /// With `--attribution`: the target's logit split into the embedding's and each block's
    /// attention and MLP shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<crate::analysis::attribution::PromptAttribution>,
}

/// Where a prompt first went non-finite.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NonFinite {
    pub point: usize,
    pub position: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Timings {
    pub load_s: f64,
    pub trace_s: f64,
    /// Time inside llama.cpp's decode (eval callbacks included).
    #[serde(default)]
    pub decode_s: f64,
    pub total_s: f64,
    pub tokens_decoded: usize,
    pub tokens_per_s: f64,
    /// Bytes of states read from the backend (only the stored rows and points are read).
    #[serde(default)]
    pub bytes_read: u64,
}

/// The lens of one prompt (lens.json holds one per prompt, in prompt order).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptLens {
    pub index: usize,
    /// Top-token pieces, by token id, for display.
    pub pieces: std::collections::BTreeMap<i32, String>,
    pub traces: Vec<crate::analysis::lens::LensTrace>,
    /// Position of the last prompt token (the lens every run has, whatever --lens-all says).
    #[serde(default)]
    pub last_prompt_position: usize,
}

impl PromptLens {
    /// Index in `traces` of the lens at the last prompt position.
    fn last_prompt_index(&self) -> usize {
        self.traces
            .iter()
            .position(|t| t.position == self.last_prompt_position)
            .unwrap_or(0)
    }

    /// The lens at the last prompt position.
    pub fn last_prompt(&self) -> &crate::analysis::lens::LensTrace {
        &self.traces[self.last_prompt_index()]
    }

    /// The lens at the last prompt position, taken out (the others are dropped).
    pub fn take_last_prompt(&mut self) -> crate::analysis::lens::LensTrace {
        let k = self.last_prompt_index();
        self.traces.swap_remove(k)
    }
}

/// Bytes a run will take, for the estimate printed before tracing.
pub fn estimate_bytes(
    n_points: usize,
    positions_per_prompt: &[usize],
    n_embd: usize,
    n_vocab: usize,
    dtype: Dtype,
    format: Format,
) -> u64 {
    let n_prompts = positions_per_prompt.len() as u64;
    let values: u64 = positions_per_prompt
        .iter()
        .map(|&p| (p * n_points * n_embd) as u64)
        .sum();
    let mut b = (n_prompts * (n_points * n_embd + n_vocab) as u64) * 4 + 4096;
    if format.npy() {
        b += values * dtype.bytes() as u64 + n_prompts * 128;
    }
    if format.csv() {
        b += values * 13; // shortest round-trip f32 text plus separator, on average
    }
    b
}

/// The open files of a run being written (a [`RunWriter`] without its staging).
struct RunFiles {
    final_dir: PathBuf,
    name: String,
    tmp_dir: PathBuf,
    dtype: Dtype,
    format: Format,
    width: usize,
    last: NpyRows,
    logits: NpyRows,
    tokens_csv: csv::Writer<fs::File>,
    states_csv: Option<csv::Writer<fs::File>>,
    metrics_csv: csv::Writer<fs::File>,
    /// Taps inside blocks, in the order of a trace's `taps` arrays.
    taps: Vec<crate::capture::taps::Tap>,
}

impl TapRecord {
    /// The shape of a prompt's file with `n_pos` stored positions and `n_tokens` tokens.
    pub fn shape(&self, n_pos: usize, n_tokens: usize) -> Vec<usize> {
        tap_shape(self.tap, self.blocks.len(), self.width, n_pos, n_tokens)
    }
}

/// The shape of a tap's file: `[n_blocks, n_pos, width]`, or `[n_blocks, heads, n_pos, n_tokens]`
/// for `pattern` (whose width is its heads).
pub fn tap_shape(
    tap: crate::capture::taps::Tap,
    n_blocks: usize,
    width: usize,
    n_pos: usize,
    n_tokens: usize,
) -> Vec<usize> {
    if tap == crate::capture::taps::Tap::Pattern {
        vec![n_blocks, width, n_pos, n_tokens]
    } else {
        vec![n_blocks, n_pos, width]
    }
}

impl RunFiles {
    fn into_writer(self, staging: Staging, resumed: bool) -> RunWriter {
        RunWriter {
            files: self,
            staging,
            states_files: Vec::new(),
            resumed,
            csv_checked: [0; 3],
        }
    }
}

/// The sizes a run directory is laid out for.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub n_prompts: usize,
    pub n_points: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
    /// Taps inside blocks: (tap, number of blocks, width).
    pub taps: Vec<(crate::capture::taps::Tap, usize, usize)>,
}

/// Writes a run directory, prompt by prompt, inside a [`Staging`] directory that is swapped into
/// place only when everything (run.json with `"complete": true` last) is written and synced.
pub struct RunWriter {
    files: RunFiles,
    staging: Staging,
    /// Relative paths of the per-prompt states files written since the last sync.
    states_files: Vec<String>,
    /// Whether this writer continues an interrupted trace (`--resume`).
    resumed: bool,
    /// CSV lengths the journal's checksums already cover (tokens, metrics, states).
    csv_checked: [u64; 3],
}

impl RunWriter {
    /// Refuse an existing `out` without `force`, then start writing in a staging directory.
    pub fn create(
        out: &Path,
        force: bool,
        shape: RunShape,
        dtype: Dtype,
        format: Format,
    ) -> Result<RunWriter, RunError> {
        Ok(Self::open(out, force, shape, dtype, format, "", false, &|_| true)?.0)
    }

    /// Like [`RunWriter::create`], but resumable: `plan` (a fingerprint of the model file, the
    /// options and the prompts) is stored in the staging directory, and with `resume` the
    /// staging directory of an interrupted trace of the same target is taken over when its plan
    /// is the same (a different plan is refused and left untouched). The prompts its journal
    /// records are kept as far as `valid` accepts them and their states files are sound, cut back
    /// to a checkpoint; the rest is traced again. Returns the writer and the prompts kept.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        out: &Path,
        force: bool,
        shape: RunShape,
        dtype: Dtype,
        format: Format,
        plan: &str,
        resume: bool,
        valid: &dyn Fn(&JournalEntry) -> bool,
    ) -> Result<(RunWriter, Vec<JournalEntry>), RunError> {
        if !resume && !force {
            refuse_interrupted(out)?;
        }
        check_output(out, force)?;
        let accept = |dir: &Path| -> Result<(), OutputError> {
            let found = crate::paths::read_text(&dir.join(RESUME_PLAN), crate::paths::MAX_JSON)
                .unwrap_or_default();
            if found.trim() == plan {
                Ok(())
            } else {
                Err(OutputError::Refused(format!(
                    "the interrupted trace of {} was made with another model file, other options or other prompts; run with --force instead of --resume to discard it and start over",
                    out.display()
                )))
            }
        };
        let (staging, adopted) = Staging::new_or_adopt(out, resume, &accept)?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let tmp_dir = staging.path(&name);
        if adopted {
            let journal = read_journal(&tmp_dir.join(JOURNAL));
            let descr = dtype.descr();
            // Staged data is kept only where it is what the journal recorded (a file edited by
            // hand, a NaN written without changing its size, is traced again).
            // (Every entry of a checkpoint names the same CSV bytes: each is hashed once.)
            let seen = std::cell::RefCell::new(std::collections::HashMap::new());
            let verified = |e: &JournalEntry| {
                !e.checksums.is_empty()
                    && e.checksums.iter().all(|(k, c)| {
                        let mut seen = seen.borrow_mut();
                        let x = seen
                            .entry(k.clone())
                            .or_insert_with(|| staged_checksum(&tmp_dir, k).ok());
                        x.as_ref() == Some(c)
                    })
            };
            let sound = |e: &JournalEntry| {
                let n_pos = e.record.positions.len();
                valid(e)
                    && verified(e)
                    && e.record.states_file.as_ref().is_none_or(|rel| {
                        check_npy(
                            &tmp_dir.join(rel),
                            descr,
                            &[shape.n_points, n_pos, shape.n_embd],
                        )
                        .is_ok()
                    })
                    && e.record.tap_files.len() == shape.taps.len()
                    && shape.taps.iter().all(|&(tap, n_blocks, width)| {
                        let want = tap_shape(tap, n_blocks, width, n_pos, e.record.tokens.len());
                        e.record.tap_files.get(tap.name()).is_some_and(|rel| {
                            check_npy(&tmp_dir.join(rel), dtype.for_tap(tap).descr(), &want).is_ok()
                        })
                    })
            };
            let ok = journal.iter().take_while(|e| sound(e)).count();
            // Keep whole checkpoints only (their CSV lengths are known, and they end on a batch
            // group), as far as every prompt in them is sound.
            let mut cut = 0;
            while cut < ok {
                let size = journal[cut].checkpoint_size;
                let end = cut + size;
                let whole = size > 0
                    && end <= ok
                    && journal[cut..end].iter().all(|e| {
                        e.csv_lengths == journal[cut].csv_lengths && e.checkpoint_size == size
                    });
                if !whole {
                    break;
                }
                cut = end;
            }
            if cut < journal.len() {
                eprintln!(
                    "note: {} prompt(s) of the interrupted trace of {} are damaged or no longer match; they are traced again",
                    journal.len() - cut,
                    out.display()
                );
            }
            if cut > 0 {
                let reopened = RunWriter::open_files(
                    out,
                    name.clone(),
                    tmp_dir.clone(),
                    shape.clone(),
                    dtype,
                    format,
                    false,
                );
                if let Ok(files) = reopened {
                    let mut w = files.into_writer(staging, true);
                    w.truncate_csvs(journal[cut - 1].csv_lengths)?;
                    w.csv_checked = journal[cut - 1].csv_lengths;
                    let kept: Vec<JournalEntry> = journal.into_iter().take(cut).collect();
                    w.rewrite_journal(&kept)?;
                    return Ok((w, kept));
                }
                eprintln!(
                    "note: the files of the interrupted trace of {} are damaged; tracing from the start",
                    out.display()
                );
            }
            fs::remove_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        }
        fs::create_dir(&tmp_dir).map_err(|source| RunError::Unwritable {
            path: tmp_dir.display().to_string(),
            source,
        })?;
        crate::output::write_synced(&tmp_dir.join(RESUME_PLAN), plan.as_bytes())?;
        let files = RunWriter::open_files(out, name, tmp_dir, shape, dtype, format, true)?;
        Ok((files.into_writer(staging, false), Vec::new()))
    }

    /// Replace the journal by `entries` (after cutting a damaged tail).
    fn rewrite_journal(&self, entries: &[JournalEntry]) -> Result<(), RunError> {
        let p = self.files.tmp_dir.join(JOURNAL);
        let mut text = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut text, e).map_err(|e| RunError::Io {
                path: p.display().to_string(),
                source: e.into(),
            })?;
            text.push(b'\n');
        }
        crate::output::write_synced(&p, &text)?;
        Ok(())
    }

    fn open_files(
        out: &Path,
        name: String,
        tmp_dir: PathBuf,
        shape: RunShape,
        dtype: Dtype,
        format: Format,
        fresh: bool,
    ) -> Result<RunFiles, RunError> {
        let RunShape {
            n_prompts,
            n_points,
            n_embd,
            n_vocab,
            taps,
        } = shape;
        let csv_io = |p: &Path| {
            let path = p.display().to_string();
            move |e: csv::Error| RunError::Io {
                path,
                source: e.into(),
            }
        };
        // A CSV with its header (fresh) or reopened for appending (resumed).
        let csv_file = |p: &Path, header: &[String]| -> Result<csv::Writer<fs::File>, RunError> {
            if fresh {
                let mut w = csv::Writer::from_path(p).map_err(csv_io(p))?;
                w.write_record(header).map_err(csv_io(p))?;
                Ok(w)
            } else {
                let f = fs::File::options()
                    .append(true)
                    .open(p)
                    .map_err(io_err(p))?;
                Ok(csv::WriterBuilder::new().from_writer(f))
            }
        };
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if fresh && format.npy() {
            let d = tmp_dir.join(STATES_DIR);
            fs::create_dir(&d).map_err(io_err(&d))?;
        }
        if fresh {
            for (tap, _, _) in &taps {
                let d = tmp_dir.join(TAPS_DIR).join(tap.name());
                fs::create_dir_all(&d).map_err(io_err(&d))?;
            }
        }
        let rows = |p: &Path, shape: &[usize]| {
            if fresh {
                NpyRows::create(p, shape)
            } else {
                NpyRows::open(p, shape)
            }
            .map_err(io_err(p))
        };
        let last = rows(&tmp_dir.join(LAST_NPY), &[n_prompts, n_points, n_embd])?;
        let logits = rows(&tmp_dir.join(LOGITS_NPY), &[n_prompts, n_vocab])?;
        let tokens_csv = csv_file(
            &tmp_dir.join(TOKENS_CSV),
            &strings(&[
                "prompt",
                "id",
                "label",
                "position",
                "token_id",
                "piece",
                "generated",
            ]),
        )?;
        let mut header = strings(&["prompt", "id", "label", "point"]);
        header.extend(strings(&TrajectoryMetrics::NAMES));
        let metrics_csv = csv_file(&tmp_dir.join(METRICS_CSV), &header)?;
        let states_csv = if format.csv() {
            let mut header = strings(&["prompt", "point", "position"]);
            header.extend((0..n_embd).map(|d| format!("d{d}")));
            Some(csv_file(&tmp_dir.join(STATES_CSV), &header)?)
        } else {
            None
        };
        Ok(RunFiles {
            final_dir: out.to_path_buf(),
            name,
            tmp_dir,
            dtype,
            format,
            width: n_prompts.saturating_sub(1).to_string().len().max(5),
            last,
            logits,
            tokens_csv,
            states_csv,
            metrics_csv,
            taps: taps.iter().map(|t| t.0).collect(),
        })
    }

    /// Whether this writer continues an interrupted trace.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Truncate the CSVs to the lengths of a checkpoint.
    fn truncate_csvs(&mut self, lengths: [u64; 3]) -> Result<(), RunError> {
        let files = [
            (self.files.tmp_dir.join(TOKENS_CSV), lengths[0]),
            (self.files.tmp_dir.join(METRICS_CSV), lengths[1]),
            (self.files.tmp_dir.join(STATES_CSV), lengths[2]),
        ];
        for (p, len) in files {
            if p.exists() {
                fs::File::options()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(len))
                    .map_err(io_err(&p))?;
            }
        }
        Ok(())
    }

    /// Make everything written so far durable and record `entries` (the prompts written since
    /// the last checkpoint) in the journal: a resumed trace continues after the last of them.
    pub fn checkpoint(&mut self, entries: &mut [JournalEntry]) -> Result<(), RunError> {
        self.sync_data()?;
        let len = |p: PathBuf| fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        let lengths = [
            len(self.files.tmp_dir.join(TOKENS_CSV)),
            len(self.files.tmp_dir.join(METRICS_CSV)),
            len(self.files.tmp_dir.join(STATES_CSV)),
        ];
        let p = self.files.tmp_dir.join(JOURNAL);
        let mut f = fs::File::options()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io_err(&p))?;
        let size = entries.len();
        // What this checkpoint adds, by checksum: each prompt's files and rows, and the new CSV
        // bytes (the same for every entry of the checkpoint).
        let dir = &self.files.tmp_dir;
        let sum = |key: String| -> Result<(String, String), RunError> {
            let c = staged_checksum(dir, &key).map_err(io_err(&dir.join(&key)))?;
            Ok((key, c))
        };
        let mut csv_sums = Vec::new();
        for (k, name) in [TOKENS_CSV, METRICS_CSV, STATES_CSV].iter().enumerate() {
            if dir.join(name).exists() {
                csv_sums.push(sum(format!(
                    "{name}@{}..{}",
                    self.csv_checked[k], lengths[k]
                ))?);
            }
        }
        for e in entries.iter_mut() {
            let i = e.record.index;
            let mut keys = vec![format!("{LAST_NPY}#{i}"), format!("{LOGITS_NPY}#{i}")];
            keys.extend(e.record.states_file.iter().cloned());
            keys.extend(e.record.tap_files.values().cloned());
            e.checksums = keys.into_iter().map(sum).collect::<Result<_, _>>()?;
            e.checksums.extend(csv_sums.iter().cloned());
        }
        self.csv_checked = lengths;
        for e in entries.iter_mut() {
            e.csv_lengths = lengths;
            e.checkpoint_size = size;
            let mut line = serde_json::to_vec(&*e).map_err(|e| RunError::Io {
                path: p.display().to_string(),
                source: e.into(),
            })?;
            line.push(b'\n');
            f.write_all(&line).map_err(io_err(&p))?;
        }
        f.sync_all().map_err(io_err(&p))?;
        self.staging.mark_resumable();
        Ok(())
    }

    /// Flush and sync every data file written so far.
    fn sync_data(&mut self) -> Result<(), RunError> {
        let flush = |w: &mut csv::Writer<fs::File>, p: PathBuf| -> Result<(), RunError> {
            w.flush().map_err(io_err(&p))?;
            w.get_ref().sync_all().map_err(io_err(&p))
        };
        flush(
            &mut self.files.tokens_csv,
            self.files.tmp_dir.join(TOKENS_CSV),
        )?;
        flush(
            &mut self.files.metrics_csv,
            self.files.tmp_dir.join(METRICS_CSV),
        )?;
        if let Some(w) = self.files.states_csv.as_mut() {
            flush(w, self.files.tmp_dir.join(STATES_CSV))?;
        }
        let p = self.files.tmp_dir.join(LAST_NPY);
        self.files.last.sync().map_err(io_err(&p))?;
        let p = self.files.tmp_dir.join(LOGITS_NPY);
        self.files.logits.sync().map_err(io_err(&p))?;
        for rel in self.states_files.drain(..) {
            crate::output::sync_file(&self.files.tmp_dir.join(rel))?;
        }
        crate::output::sync_dir(&self.files.tmp_dir.join(STATES_DIR));
        for tap in &self.files.taps {
            crate::output::sync_dir(&self.files.tmp_dir.join(TAPS_DIR).join(tap.name()));
        }
        Ok(())
    }

    /// Leave the staging directory in place for `--resume` (after a checkpoint) instead of
    /// removing it.
    pub fn keep_for_resume(self) {
        self.staging.keep();
    }

    /// Relative path of a prompt's states file: the zero-padded prompt index, never the user's id.
    pub fn states_file(&self, index: usize) -> String {
        format!("{STATES_DIR}/{index:0w$}.npy", w = self.files.width)
    }

    /// Relative path of a prompt's file of tap `tap` (named like its states file).
    pub fn tap_file(&self, tap: crate::capture::taps::Tap, index: usize) -> String {
        format!(
            "{TAPS_DIR}/{}/{index:0w$}.npy",
            tap.name(),
            w = self.files.width
        )
    }

    /// Write one array as NPY of type `dtype`.
    fn write_array<D: ndarray::Dimension>(
        &mut self,
        rel: &str,
        a: &ndarray::Array<f32, D>,
        dtype: Dtype,
    ) -> Result<(), RunError> {
        let p = self.files.tmp_dir.join(rel);
        // Always C order: readers (ours and the README's numpy lines) expect it.
        let a = a.as_standard_layout();
        let res = match dtype {
            Dtype::F32 => ndarray_npy::write_npy(&p, &a),
            Dtype::I32 => {
                // Integers captured as f32 (exact below 2^24): anything else is not one.
                if let Some(x) = a
                    .iter()
                    .find(|x| x.fract() != 0.0 || x.abs() > 16_777_216.0)
                {
                    return Err(RunError::Npy {
                        path: p.display().to_string(),
                        msg: format!("internal error: {x} is not an integer"),
                    });
                }
                ndarray_npy::write_npy(&p, &a.mapv(|x| x as i32))
            }
            Dtype::F16 => {
                // A value f16 cannot hold would be written as ±inf: a number nobody measured.
                // (Non-finite values are the model's, recorded with --allow-nonfinite.)
                let max = a
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(0f32, |m, &x| m.max(x.abs()));
                if max > half::f16::MAX.to_f32() {
                    return Err(RunError::F16Range {
                        what: rel.split('/').take(2).collect::<Vec<_>>().join("/"),
                        max,
                    });
                }
                ndarray_npy::write_npy(&p, &a.mapv(|x| F16(half::f16::from_f32(x))))
            }
        };
        res.map_err(|e| RunError::Npy {
            path: p.display().to_string(),
            msg: e.to_string(),
        })?;
        self.states_files.push(rel.to_string());
        Ok(())
    }

    /// Write one prompt's files. Returns the relative states path (None with --format csv) and
    /// the relative path of each tap's file.
    pub fn write_prompt(
        &mut self,
        t: &PromptTrace,
        points: &[usize],
        id: &str,
        label: Option<&str>,
        pieces: &[String],
    ) -> Result<(Option<String>, std::collections::BTreeMap<String, String>), RunError> {
        let rel = self.files.format.npy().then(|| self.states_file(t.index));
        if let Some(rel) = &rel {
            self.write_array(rel, &t.states, self.files.dtype)?;
        }
        let mut tap_files = std::collections::BTreeMap::new();
        for (k, tap) in self.files.taps.clone().into_iter().enumerate() {
            let rel = self.tap_file(tap, t.index);
            let a = t.taps.get(k).ok_or_else(|| RunError::Npy {
                path: rel.clone(),
                msg: format!("internal error: no {tap} array for prompt {}", t.index),
            })?;
            self.write_array(&rel, a, self.files.dtype.for_tap(tap))?;
            tap_files.insert(tap.name().to_string(), rel);
        }
        let slot = t.last_prompt_slot();
        let p = self.files.tmp_dir.join(LAST_NPY);
        self.files
            .last
            .set_row(t.index, t.states.index_axis(Axis(1), slot))
            .map_err(io_err(&p))?;
        let p = self.files.tmp_dir.join(LOGITS_NPY);
        self.files
            .logits
            .set_row(t.index, ndarray::ArrayView1::from(&t.logits[..]))
            .map_err(io_err(&p))?;

        let csv_err = |p: &Path| {
            let path = p.display().to_string();
            move |e: csv::Error| RunError::Io {
                path,
                source: e.into(),
            }
        };
        let p = self.files.tmp_dir.join(TOKENS_CSV);
        let index = t.index.to_string();
        for (pos, (&tok, piece)) in t.tokens.iter().zip(pieces).enumerate() {
            self.files
                .tokens_csv
                .write_record([
                    index.as_str(),
                    id,
                    label.unwrap_or(""),
                    &pos.to_string(),
                    &tok.to_string(),
                    piece,
                    if pos >= t.n_prompt { "1" } else { "0" },
                ])
                .map_err(csv_err(&p))?;
        }
        // Per-trajectory metrics of the last prompt position (full hidden dimension).
        let m = metrics::trajectory(t.states.index_axis(Axis(1), slot));
        let p = self.files.tmp_dir.join(METRICS_CSV);
        for (k, &point) in points.iter().enumerate() {
            let mut rec = vec![
                index.clone(),
                id.to_string(),
                label.unwrap_or("").to_string(),
                point.to_string(),
            ];
            rec.extend(TrajectoryMetrics::NAMES.iter().map(|n| {
                let x = m.get(n)[k];
                if x.is_finite() {
                    x.to_string()
                } else {
                    String::new()
                }
            }));
            self.files
                .metrics_csv
                .write_record(&rec)
                .map_err(csv_err(&p))?;
        }
        if let Some(w) = self.files.states_csv.as_mut() {
            let p = self.files.tmp_dir.join(STATES_CSV);
            for (k, &point) in points.iter().enumerate() {
                for (j, &pos) in t.positions.iter().enumerate() {
                    let mut rec = Vec::with_capacity(3 + t.states.shape()[2]);
                    rec.push(index.clone());
                    rec.push(point.to_string());
                    rec.push(pos.to_string());
                    rec.extend(
                        t.states
                            .slice(ndarray::s![k, j, ..])
                            .iter()
                            .map(|v| v.to_string()),
                    );
                    w.write_record(&rec).map_err(csv_err(&p))?;
                }
            }
        }
        Ok((rel, tap_files))
    }

    /// Write an extra JSON file into the run (e.g. lens.json).
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RunError> {
        write_json_atomic(&self.files.tmp_dir.join(name), value)
    }

    /// Sync every data file, write run.json (complete) last, and swap the directory into place.
    pub fn finish(mut self, manifest: &Manifest) -> Result<PathBuf, RunError> {
        self.sync_data()?;
        let mut m = manifest.clone();
        m.complete = true;
        crate::output::failpoint("run-json");
        write_json_atomic(&self.files.tmp_dir.join(RUN_JSON), &m)?;
        crate::output::failpoint("after-run-json");
        // The resume files go only now: a kill before this point resumes with nothing to trace.
        let _ = fs::remove_file(self.files.tmp_dir.join(JOURNAL));
        let _ = fs::remove_file(self.files.tmp_dir.join(RESUME_PLAN));
        crate::output::sync_dir(&self.files.tmp_dir);
        self.staging
            .commit(std::slice::from_ref(&self.files.name), &[])?;
        Ok(self.files.final_dir.clone())
    }
}

/// Refuse an existing `out` without `force`; with `force`, refuse anything that is not a run
/// directory written by gguf-trace (see [`crate::output::check_target`]).
pub fn check_output(out: &Path, force: bool) -> Result<(), RunError> {
    Ok(crate::output::check_target(out, Kind::Run, force)?)
}

/// Refuse to start `out` afresh over an interrupted trace of it (without `--resume` or `--force`):
/// its finished prompts are never discarded silently; the error says how many and which flag
/// keeps or drops them.
pub fn refuse_interrupted(out: &Path) -> Result<(), RunError> {
    let Some(staged) = crate::output::resumable(out) else {
        return Ok(());
    };
    let n = read_journal(&staged.join(JOURNAL)).len();
    Err(OutputError::Refused(format!(
        "{} has an interrupted trace with {n} prompt(s) on disk: run the same command with --resume to continue it, or with --force to discard it and start over",
        out.display()
    ))
    .into())
}

/// Write JSON to a temporary file beside `path`, then rename it over `path`.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RunError> {
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    serde_json::to_writer_pretty(&mut f, value).map_err(|e| RunError::Io {
        path: tmp.display().to_string(),
        source: e.into(),
    })?;
    f.write_all(b"\n").map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Check an `.npy` file's element type, shape and size against what the manifest says.
fn check_npy(path: &Path, descr: &str, shape: &[usize]) -> Result<(), RunError> {
    let invalid = |msg: String| RunError::Invalid {
        path: path.display().to_string(),
        msg,
    };
    let h = npy::NpyHeader::read(path).map_err(|e| {
        invalid(if e.kind() == std::io::ErrorKind::NotFound {
            "missing".into()
        } else {
            e.to_string()
        })
    })?;
    if h.descr != descr || h.fortran_order {
        return Err(invalid(format!(
            "element type {} (fortran order {}), expected {descr}",
            h.descr, h.fortran_order
        )));
    }
    if h.shape != shape {
        return Err(invalid(format!(
            "shape {:?}, but run.json says {:?}",
            h.shape, shape
        )));
    }
    let item = if descr == "<f2" { 2 } else { 4 };
    // Shapes come from files: a product that does not fit is a damaged file, not a wrapped size.
    let want = shape
        .iter()
        .try_fold(item, |n: u64, &d| n.checked_mul(d as u64))
        .and_then(|n| n.checked_add(h.data_offset))
        .ok_or_else(|| invalid(format!("shape {shape:?} is too large to be a file")))?;
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    if len != want {
        return Err(invalid(format!(
            "{len} bytes, expected {want} (truncated or damaged)"
        )));
    }
    Ok(())
}

/// Before ndarray-npy reads `path`: its header passes our parser (which refuses what would hang
/// py_literal's) and the file holds exactly the data its shape says, so a damaged header can make
/// nothing be allocated beyond the file's size.
fn guard_npy(path: &Path) -> Result<(), RunError> {
    let h = npy::NpyHeader::read(path).map_err(|e| RunError::Npy {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    check_npy(path, &h.descr, &h.shape)
}

/// An NPY file of type `dtype` read as f32 (f16 widened, int32 converted: exact below 2^24).
fn read_as_f32(p: &Path, dtype: Dtype) -> Result<ndarray::ArrayD<f32>, RunError> {
    guard_npy(p)?;
    Ok(match dtype {
        Dtype::F32 => ndarray_npy::read_npy(p).map_err(Run::npy_err(p))?,
        Dtype::F16 => {
            let a: ndarray::ArrayD<F16> = ndarray_npy::read_npy(p).map_err(Run::npy_err(p))?;
            a.mapv(|x| x.0.to_f32())
        }
        Dtype::I32 => {
            let a: ndarray::ArrayD<i32> = ndarray_npy::read_npy(p).map_err(Run::npy_err(p))?;
            a.mapv(|x| x as f32)
        }
    })
}

/// Refuse an array read from `path` that holds NaN or infinity (runs hold finite numbers only;
/// a run traced with `--allow-nonfinite` is refused earlier, by name).
fn finite<D: ndarray::Dimension>(
    path: &Path,
    a: ndarray::Array<f32, D>,
) -> Result<ndarray::Array<f32, D>, RunError> {
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        return Err(RunError::Invalid {
            path: path.display().to_string(),
            msg: format!("holds a NaN or infinite value (element {i}); the file is damaged"),
        });
    }
    Ok(a)
}

/// A complete run directory, opened for reading.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub manifest: Manifest,
    identity: RunIdentity,
}

/// Which directory and manifest a reader opened. Readers take no lock (a report of a big run
/// would hold back every writer); a `--force` retrace swaps a new directory in at the same path
/// meanwhile, so a reader checks this after reading, and where a read fails, before it blames the
/// data: reads that may mix two runs end with an error that says so.
#[derive(Debug, Clone)]
pub struct RunIdentity {
    dir: PathBuf,
    /// (device, inode) of the directory and of its run.json when opened.
    ids: Option<[(u64, u64); 2]>,
}

impl RunIdentity {
    fn of(dir: &Path) -> Option<[(u64, u64); 2]> {
        use std::os::unix::fs::MetadataExt;
        let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        Some([id(dir)?, id(&dir.join(RUN_JSON))?])
    }

    /// An error when the run at this path is no longer the one that was opened.
    pub fn check(&self) -> Result<(), RunError> {
        if Self::of(&self.dir) == self.ids {
            Ok(())
        } else {
            Err(RunError::Replaced(self.dir.display().to_string()))
        }
    }

    /// `e`, or the replacement that explains it.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        match self.check() {
            Ok(()) => e,
            Err(r) => r.into(),
        }
    }
}

impl Run {
    /// Which run this is, to check after reading that it was not replaced meanwhile.
    pub fn identity(&self) -> RunIdentity {
        self.identity.clone()
    }

    /// Open a run directory; refuses a directory that is not a run or an incomplete run.
    pub fn open(dir: &Path) -> Result<Run, RunError> {
        let d = dir.display().to_string();
        if !dir.is_dir() {
            return Err(RunError::NotARun(d));
        }
        let identity = RunIdentity {
            dir: dir.to_path_buf(),
            ids: RunIdentity::of(dir),
        };
        let p = dir.join(RUN_JSON);
        let text =
            crate::paths::read_text(&p, crate::paths::MAX_JSON).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RunError::NotARun(d.clone()),
                _ => RunError::Io {
                    path: p.display().to_string(),
                    source: e,
                },
            })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| RunError::BadManifest {
                path: p.display().to_string(),
                source,
            })?;
        if value.get("complete").and_then(|c| c.as_bool()) != Some(true) {
            return Err(RunError::Incomplete(d));
        }
        let found = value
            .get("schema_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if !(OLDEST_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&found) {
            return Err(RunError::Schema {
                path: p.display().to_string(),
                found,
            });
        }
        // Parsed from the text (not the Value) so an error names its line and column.
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| RunError::BadManifest {
                path: p.display().to_string(),
                source,
            })?;
        if manifest.prompts.is_empty() {
            return Err(RunError::NoPrompts(d));
        }
        let run = Run {
            dir: dir.to_path_buf(),
            manifest,
            identity,
        };
        run.validate().map_err(|e| match run.identity.check() {
            Ok(()) => e,
            Err(r) => r,
        })?;
        run.identity.check()?;
        Ok(run)
    }

    /// Check that the manifest is consistent with itself and that every data file it names
    /// exists with the shape, type and size it declares (headers only: cheap for big runs), so
    /// readers never index out of bounds or skip a damaged file silently.
    pub fn validate(&self) -> Result<(), RunError> {
        let m = &self.manifest;
        let invalid = |path: &Path, msg: String| RunError::Invalid {
            path: path.display().to_string(),
            msg,
        };
        let rj = self.dir.join(RUN_JSON);
        let (n_layer, n_embd, n_vocab) = (m.model.n_layer, m.model.n_embd, m.model.n_vocab);
        let points = &m.capture.points;
        if n_embd == 0 || n_vocab == 0 {
            return Err(invalid(&rj, "model width or vocabulary is 0".into()));
        }
        if points.is_empty()
            || points.windows(2).any(|w| w[0] >= w[1])
            || points.iter().any(|&p| p > n_layer)
        {
            return Err(invalid(
                &rj,
                format!(
                    "capture.points {points:?} are not sorted, unique points within 0..={n_layer}"
                ),
            ));
        }
        if m.capture.point_tensors.len() != points.len() {
            return Err(invalid(
                &rj,
                "capture.point_tensors and capture.points differ in length".into(),
            ));
        }
        for (k, &p) in points.iter().enumerate() {
            if p > 0 && m.capture.point_tensors[k] != format!("l_out-{}", p - 1) {
                return Err(invalid(
                    &rj,
                    format!(
                        "capture.point_tensors[{k}] is \"{}\", but point {p} is l_out-{}",
                        m.capture.point_tensors[k],
                        p - 1
                    ),
                ));
            }
        }
        let (n_prompts, n_points) = (m.prompts.len(), points.len());
        for (i, p) in m.prompts.iter().enumerate() {
            let bad = |msg: String| invalid(&rj, format!("prompt {i}: {msg}"));
            if p.index != i {
                return Err(bad(format!("index {} out of order", p.index)));
            }
            if p.tokens.len() != p.pieces.len()
                || p.n_prompt_tokens == 0
                || p.n_prompt_tokens > p.tokens.len()
            {
                return Err(bad("tokens, pieces and n_prompt_tokens disagree".into()));
            }
            if p.positions.windows(2).any(|w| w[0] >= w[1])
                || p.positions.iter().any(|&q| q >= p.tokens.len())
                || !p.positions.contains(&(p.n_prompt_tokens - 1))
            {
                return Err(bad(
                    "positions must be sorted token positions that include the last prompt token"
                        .into(),
                ));
            }
            if p.states_file.is_some() != m.capture.format.npy() {
                return Err(bad("states_file does not match capture.format".into()));
            }
            if let Some(rel) = &p.states_file {
                let w = n_prompts.saturating_sub(1).to_string().len().max(5);
                if *rel != format!("{STATES_DIR}/{i:0w$}.npy") {
                    return Err(bad(format!(
                        "states_file \"{rel}\" is not this prompt's file ({STATES_DIR}/{i:0w$}.npy)"
                    )));
                }
                // (The exact name above also keeps the path inside the run directory.)
                let path = self.dir.join(rel);
                check_npy(
                    &path,
                    m.capture.dtype.descr(),
                    &[n_points, p.positions.len(), n_embd],
                )?;
            }
            // Taps inside blocks: exactly the taps run.json lists, each at its own file name.
            if p.tap_files.len() != m.capture.taps.len() {
                return Err(bad("tap_files do not match capture.taps".into()));
            }
            for t in &m.capture.taps {
                let w = n_prompts.saturating_sub(1).to_string().len().max(5);
                let want = format!("{TAPS_DIR}/{}/{i:0w$}.npy", t.tap.name());
                if p.tap_files.get(t.tap.name()) != Some(&want) {
                    return Err(bad(format!("tap_files[{}] is not {want}", t.tap)));
                }
                check_npy(
                    &self.dir.join(&want),
                    t.dtype.descr(),
                    &t.shape(p.positions.len(), p.tokens.len()),
                )?;
            }
        }
        for t in &m.capture.taps {
            if t.blocks.is_empty()
                || t.blocks.windows(2).any(|w| w[0] >= w[1])
                || t.blocks.iter().any(|&b| b >= n_layer)
                || t.width == 0
                || t.dtype != m.capture.dtype.for_tap(t.tap)
                || matches!(
                    t.tap,
                    crate::capture::taps::Tap::Resid | crate::capture::taps::Tap::Router
                )
            {
                return Err(invalid(
                    &rj,
                    format!("capture.taps: `{}` needs to be a tap inside blocks, with sorted unique blocks below {n_layer}, a width and the run's dtype (int32 for router_experts)", t.tap),
                ));
            }
        }
        check_npy(
            &self.dir.join(LAST_NPY),
            "<f4",
            &[n_prompts, n_points, n_embd],
        )?;
        check_npy(&self.dir.join(LOGITS_NPY), "<f4", &[n_prompts, n_vocab])?;
        if m.lens.is_some() {
            // Streamed: a big run's lens is checked one prompt at a time.
            let p = self.dir.join(LENS_JSON);
            let wrong = || {
                invalid(
                    &p,
                    format!("does not hold one lens of {n_points} points per prompt ({n_prompts})"),
                )
            };
            let mut i = 0;
            let n = self.for_each_lens(|l| {
                let ok = l.index == i
                    && !l.traces.is_empty()
                    && l.traces.iter().all(|t| t.points.len() == n_points);
                i += 1;
                if ok {
                    Ok(())
                } else {
                    Err(wrong())
                }
            })?;
            if n != n_prompts {
                return Err(wrong());
            }
        }
        Ok(())
    }

    /// Refuse a run holding non-finite states (traced with `--allow-nonfinite`) for analysis.
    pub fn require_finite(&self) -> Result<(), RunError> {
        let bad: Vec<String> = self
            .manifest
            .prompts
            .iter()
            .filter_map(|p| {
                p.nonfinite
                    .as_ref()
                    .map(|n| format!("prompt {} (\"{}\") from point {}", p.index, p.id, n.point))
            })
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(RunError::Invalid {
            path: self.dir.display().to_string(),
            msg: format!(
                "holds non-finite states ({}{}); they cannot be analysed — trace again without the cause, or leave those prompts out",
                bad.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                if bad.len() > 3 { ", …" } else { "" }
            ),
        })
    }

    fn npy_err(p: &Path) -> impl FnOnce(ndarray_npy::ReadNpyError) -> RunError + '_ {
        move |e| RunError::Npy {
            path: p.display().to_string(),
            msg: e.to_string(),
        }
    }

    /// `[n_prompts, n_points, n_embd]` at the last prompt position, all in memory: for small runs
    /// and tests; analyses read it a prompt at a time with [`Run::last_states`].
    pub fn last(&self) -> Result<Array3<f32>, RunError> {
        let p = self.dir.join(LAST_NPY);
        guard_npy(&p)?;
        finite(&p, ndarray_npy::read_npy(&p).map_err(Self::npy_err(&p))?)
    }

    /// The logit lens per prompt (when traced with --lens), all in memory: for small runs and
    /// tests; analyses stream it with [`Run::for_each_lens`].
    pub fn lens(&self) -> Result<Option<Vec<PromptLens>>, RunError> {
        if self.manifest.lens.is_none() {
            return Ok(None);
        }
        let mut all = Vec::new();
        self.for_each_lens(|l| {
            all.push(l);
            Ok(())
        })?;
        Ok(Some(all))
    }

    /// `[n_prompts, n_vocab]` next-token logits at the last prompt position, all in memory (small
    /// runs and tests; analyses use [`Run::logit_rows`]).
    pub fn logits(&self) -> Result<Array2<f32>, RunError> {
        let p = self.dir.join(LOGITS_NPY);
        guard_npy(&p)?;
        finite(&p, ndarray_npy::read_npy(&p).map_err(Self::npy_err(&p))?)
    }

    /// A prompt's array of tap `tap` inside blocks as f32: `[n_blocks, n_positions, width]`, or
    /// `[n_blocks, n_head, n_positions, n_tokens]` for `pattern` (see [`TapRecord::shape`]);
    /// `resid` is [`Run::states`].
    pub fn tap(
        &self,
        tap: crate::capture::taps::Tap,
        index: usize,
    ) -> Result<ndarray::ArrayD<f32>, RunError> {
        let rec = &self.manifest.prompts[index];
        let rel = rec.tap_files.get(tap.name()).ok_or_else(|| RunError::Npy {
            path: self.dir.display().to_string(),
            msg: format!("this run has no tap `{tap}` (trace with --taps {tap})"),
        })?;
        let p = self.dir.join(rel);
        finite(
            &p,
            read_as_f32(&p, self.manifest.capture.dtype.for_tap(tap))?,
        )
    }

    /// A prompt's states `[n_points, n_positions, n_embd]` as f32 (f16 files are widened).
    pub fn states(&self, index: usize) -> Result<Array3<f32>, RunError> {
        let rec = &self.manifest.prompts[index];
        let rel = rec.states_file.as_ref().ok_or_else(|| RunError::Npy {
            path: self.dir.display().to_string(),
            msg: "this run was written with --format csv: no NPY states".into(),
        })?;
        let p = self.dir.join(rel);
        let a = read_as_f32(&p, self.manifest.capture.dtype)?;
        let a = a
            .into_dimensionality::<ndarray::Ix3>()
            .map_err(|e| RunError::Npy {
                path: p.display().to_string(),
                msg: e.to_string(),
            })?;
        finite(&p, a)
    }
}
