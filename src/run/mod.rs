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

pub const SCHEMA_VERSION: u32 = 1;
pub const RUN_JSON: &str = "run.json";
pub const STATES_DIR: &str = "states";
pub const STATES_CSV: &str = "states.csv";
pub const LAST_NPY: &str = "last.npy";
pub const LOGITS_NPY: &str = "logits.npy";
pub const TOKENS_CSV: &str = "tokens.csv";
pub const METRICS_CSV: &str = "metrics.csv";
pub const LENS_JSON: &str = "lens.json";

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
    #[error("{path}: invalid run.json: {source}")]
    BadManifest {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported schema_version {found} (this gguf-trace reads {SCHEMA_VERSION})")]
    Schema { path: String, found: u32 },
    #[error("{path}: {msg}")]
    Npy { path: String, msg: String },
    #[error("{0}: the run has no prompts")]
    NoPrompts(String),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Relative path of the states file (None with --format csv).
    pub states_file: Option<String>,
    /// The first point and position whose state (or the next-token logits, reported at the last
    /// point) was NaN or infinite — only in runs traced with `--allow-nonfinite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonfinite: Option<NonFinite>,
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
    /// The lens at the last prompt position.
    pub fn last_prompt(&self) -> &crate::analysis::lens::LensTrace {
        self.traces
            .iter()
            .find(|t| t.position == self.last_prompt_position)
            .unwrap_or(&self.traces[0])
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

/// The sizes a run directory is laid out for.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub n_prompts: usize,
    pub n_points: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
}

/// Writes a run directory, prompt by prompt, inside a [`Staging`] directory that is swapped into
/// place only when everything (run.json with `"complete": true` last) is written and synced.
pub struct RunWriter {
    final_dir: PathBuf,
    name: String,
    tmp_dir: PathBuf,
    staging: Staging,
    dtype: Dtype,
    format: Format,
    width: usize,
    last: NpyRows,
    logits: NpyRows,
    tokens_csv: csv::Writer<fs::File>,
    states_csv: Option<csv::Writer<fs::File>>,
    metrics_csv: csv::Writer<fs::File>,
    /// Relative paths of the per-prompt states files written so far (synced at the end).
    states_files: Vec<String>,
}

impl RunWriter {
    /// Refuse an existing `out` without `force`, then start writing in a hidden sibling directory.
    pub fn create(
        out: &Path,
        force: bool,
        shape: RunShape,
        dtype: Dtype,
        format: Format,
    ) -> Result<RunWriter, RunError> {
        let RunShape {
            n_prompts,
            n_points,
            n_embd,
            n_vocab,
        } = shape;
        check_output(out, force)?;
        let staging = Staging::new(out)?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let tmp_dir = staging.path(&name);
        fs::create_dir(&tmp_dir).map_err(|source| RunError::Unwritable {
            path: tmp_dir.display().to_string(),
            source,
        })?;
        let w = move || -> Result<RunWriter, RunError> {
            if format.npy() {
                let d = tmp_dir.join(STATES_DIR);
                fs::create_dir(&d).map_err(io_err(&d))?;
            }
            let p = tmp_dir.join(LAST_NPY);
            let last = NpyRows::create(&p, &[n_prompts, n_points, n_embd]).map_err(io_err(&p))?;
            let p = tmp_dir.join(LOGITS_NPY);
            let logits = NpyRows::create(&p, &[n_prompts, n_vocab]).map_err(io_err(&p))?;
            let p = tmp_dir.join(TOKENS_CSV);
            let mut tokens_csv = csv::Writer::from_path(&p).map_err(|e| RunError::Io {
                path: p.display().to_string(),
                source: e.into(),
            })?;
            tokens_csv
                .write_record([
                    "prompt",
                    "id",
                    "label",
                    "position",
                    "token_id",
                    "piece",
                    "generated",
                ])
                .map_err(|e| RunError::Io {
                    path: p.display().to_string(),
                    source: e.into(),
                })?;
            let p = tmp_dir.join(METRICS_CSV);
            let mut metrics_csv = csv::Writer::from_path(&p).map_err(|e| RunError::Io {
                path: p.display().to_string(),
                source: e.into(),
            })?;
            let mut header = vec!["prompt", "id", "label", "point"];
            header.extend(TrajectoryMetrics::NAMES);
            metrics_csv
                .write_record(&header)
                .map_err(|e| RunError::Io {
                    path: p.display().to_string(),
                    source: e.into(),
                })?;
            let states_csv = if format.csv() {
                let p = tmp_dir.join(STATES_CSV);
                let mut w = csv::Writer::from_path(&p).map_err(|e| RunError::Io {
                    path: p.display().to_string(),
                    source: e.into(),
                })?;
                let mut header: Vec<String> = ["prompt", "point", "position"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                header.extend((0..n_embd).map(|d| format!("d{d}")));
                w.write_record(&header).map_err(|e| RunError::Io {
                    path: p.display().to_string(),
                    source: e.into(),
                })?;
                Some(w)
            } else {
                None
            };
            Ok(RunWriter {
                final_dir: out.to_path_buf(),
                name,
                tmp_dir,
                staging,
                dtype,
                format,
                width: n_prompts.saturating_sub(1).to_string().len().max(5),
                last,
                logits,
                tokens_csv,
                states_csv,
                metrics_csv,
                states_files: Vec::new(),
            })
        };
        w()
    }

    /// Relative path of a prompt's states file: the zero-padded prompt index, never the user's id.
    pub fn states_file(&self, index: usize) -> String {
        format!("{STATES_DIR}/{index:0w$}.npy", w = self.width)
    }

    /// Write one prompt's files. Returns the relative states path (None with --format csv).
    pub fn write_prompt(
        &mut self,
        t: &PromptTrace,
        points: &[usize],
        id: &str,
        label: Option<&str>,
        pieces: &[String],
    ) -> Result<Option<String>, RunError> {
        let rel = self.format.npy().then(|| self.states_file(t.index));
        if let Some(rel) = &rel {
            let p = self.tmp_dir.join(rel);
            let res = match self.dtype {
                Dtype::F32 => ndarray_npy::write_npy(&p, &t.states),
                Dtype::F16 => {
                    ndarray_npy::write_npy(&p, &t.states.mapv(|x| F16(half::f16::from_f32(x))))
                }
            };
            res.map_err(|e| RunError::Npy {
                path: p.display().to_string(),
                msg: e.to_string(),
            })?;
            self.states_files.push(rel.clone());
        }
        let slot = t.last_prompt_slot();
        let p = self.tmp_dir.join(LAST_NPY);
        self.last
            .set_row(t.index, t.states.index_axis(Axis(1), slot))
            .map_err(io_err(&p))?;
        let p = self.tmp_dir.join(LOGITS_NPY);
        self.logits
            .set_row(t.index, ndarray::ArrayView1::from(&t.logits[..]))
            .map_err(io_err(&p))?;

        let csv_err = |p: &Path| {
            let path = p.display().to_string();
            move |e: csv::Error| RunError::Io {
                path,
                source: e.into(),
            }
        };
        let p = self.tmp_dir.join(TOKENS_CSV);
        let index = t.index.to_string();
        for (pos, (&tok, piece)) in t.tokens.iter().zip(pieces).enumerate() {
            self.tokens_csv
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
        let p = self.tmp_dir.join(METRICS_CSV);
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
            self.metrics_csv.write_record(&rec).map_err(csv_err(&p))?;
        }
        if let Some(w) = self.states_csv.as_mut() {
            let p = self.tmp_dir.join(STATES_CSV);
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
        Ok(rel)
    }

    /// Write an extra JSON file into the run (e.g. lens.json).
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RunError> {
        write_json_atomic(&self.tmp_dir.join(name), value)
    }

    /// Sync every data file, write run.json (complete) last, and swap the directory into place.
    pub fn finish(mut self, manifest: &Manifest) -> Result<PathBuf, RunError> {
        let flush = |w: &mut csv::Writer<fs::File>, p: PathBuf| -> Result<(), RunError> {
            w.flush().map_err(io_err(&p))?;
            w.get_ref().sync_all().map_err(io_err(&p))
        };
        flush(&mut self.tokens_csv, self.tmp_dir.join(TOKENS_CSV))?;
        flush(&mut self.metrics_csv, self.tmp_dir.join(METRICS_CSV))?;
        if let Some(w) = self.states_csv.as_mut() {
            flush(w, self.tmp_dir.join(STATES_CSV))?;
        }
        let p = self.tmp_dir.join(LAST_NPY);
        self.last.sync().map_err(io_err(&p))?;
        let p = self.tmp_dir.join(LOGITS_NPY);
        self.logits.sync().map_err(io_err(&p))?;
        for rel in &self.states_files {
            crate::output::sync_file(&self.tmp_dir.join(rel))?;
        }
        crate::output::sync_dir(&self.tmp_dir.join(STATES_DIR));
        let mut m = manifest.clone();
        m.complete = true;
        write_json_atomic(&self.tmp_dir.join(RUN_JSON), &m)?;
        crate::output::sync_dir(&self.tmp_dir);
        self.staging.commit(std::slice::from_ref(&self.name), &[])?;
        Ok(self.final_dir.clone())
    }

    /// The directory being written (inside the staging area) — for extra files such as lens.json.
    pub fn dir(&self) -> &Path {
        &self.tmp_dir
    }
}

/// Refuse an existing `out` without `force`; with `force`, refuse anything that is not a run
/// directory written by gguf-trace (see [`crate::output::check_target`]).
pub fn check_output(out: &Path, force: bool) -> Result<(), RunError> {
    Ok(crate::output::check_target(out, Kind::Run, force)?)
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
    let want = h.data_offset + shape.iter().product::<usize>() as u64 * item;
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    if len != want {
        return Err(invalid(format!(
            "{len} bytes, expected {want} (truncated or damaged)"
        )));
    }
    Ok(())
}

/// A complete run directory, opened for reading.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Run {
    /// Open a run directory; refuses a directory that is not a run or an incomplete run.
    pub fn open(dir: &Path) -> Result<Run, RunError> {
        let d = dir.display().to_string();
        if !dir.is_dir() {
            return Err(RunError::NotARun(d));
        }
        let p = dir.join(RUN_JSON);
        let text = fs::read_to_string(&p).map_err(|_| RunError::NotARun(d.clone()))?;
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
        if found != SCHEMA_VERSION {
            return Err(RunError::Schema {
                path: p.display().to_string(),
                found,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|source| RunError::BadManifest {
                path: p.display().to_string(),
                source,
            })?;
        if manifest.prompts.is_empty() {
            return Err(RunError::NoPrompts(d));
        }
        let run = Run {
            dir: dir.to_path_buf(),
            manifest,
        };
        run.validate()?;
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
                let path = self.contained(rel)?;
                let descr = match m.capture.dtype {
                    Dtype::F32 => "<f4",
                    Dtype::F16 => "<f2",
                };
                check_npy(&path, descr, &[n_points, p.positions.len(), n_embd])?;
            }
        }
        check_npy(
            &self.dir.join(LAST_NPY),
            "<f4",
            &[n_prompts, n_points, n_embd],
        )?;
        check_npy(&self.dir.join(LOGITS_NPY), "<f4", &[n_prompts, n_vocab])?;
        if m.lens.is_some() {
            let p = self.dir.join(LENS_JSON);
            let lens = self.lens()?.unwrap_or_default();
            let ok = lens.len() == n_prompts
                && lens.iter().enumerate().all(|(i, l)| {
                    l.index == i
                        && !l.traces.is_empty()
                        && l.traces.iter().all(|t| t.points.len() == n_points)
                });
            if !ok {
                return Err(invalid(
                    &p,
                    format!("does not hold one lens of {n_points} points per prompt ({n_prompts})"),
                ));
            }
        }
        Ok(())
    }

    /// `dir/rel`, refusing a relative path that leaves the run directory.
    fn contained(&self, rel: &str) -> Result<PathBuf, RunError> {
        let r = Path::new(rel);
        if r.is_absolute()
            || r.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(RunError::Invalid {
                path: self.dir.join(RUN_JSON).display().to_string(),
                msg: format!("states file \"{rel}\" is not inside the run directory"),
            });
        }
        Ok(self.dir.join(r))
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

    /// `[n_prompts, n_points, n_embd]` at the last prompt position.
    pub fn last(&self) -> Result<Array3<f32>, RunError> {
        let p = self.dir.join(LAST_NPY);
        ndarray_npy::read_npy(&p).map_err(Self::npy_err(&p))
    }

    /// The logit lens per prompt (when traced with --lens).
    pub fn lens(&self) -> Result<Option<Vec<PromptLens>>, RunError> {
        if self.manifest.lens.is_none() {
            return Ok(None);
        }
        let p = self.dir.join(LENS_JSON);
        let text = fs::read_to_string(&p).map_err(io_err(&p))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| RunError::BadManifest {
                path: p.display().to_string(),
                source,
            })
    }

    /// `[n_prompts, n_vocab]` next-token logits at the last prompt position.
    pub fn logits(&self) -> Result<Array2<f32>, RunError> {
        let p = self.dir.join(LOGITS_NPY);
        ndarray_npy::read_npy(&p).map_err(Self::npy_err(&p))
    }

    /// A prompt's states `[n_points, n_positions, n_embd]` as f32 (f16 files are widened).
    pub fn states(&self, index: usize) -> Result<Array3<f32>, RunError> {
        let rec = &self.manifest.prompts[index];
        let rel = rec.states_file.as_ref().ok_or_else(|| RunError::Npy {
            path: self.dir.display().to_string(),
            msg: "this run was written with --format csv: no NPY states".into(),
        })?;
        let p = self.dir.join(rel);
        match self.manifest.capture.dtype {
            Dtype::F32 => ndarray_npy::read_npy(&p).map_err(Self::npy_err(&p)),
            Dtype::F16 => {
                let a: Array3<F16> = ndarray_npy::read_npy(&p).map_err(Self::npy_err(&p))?;
                Ok(a.mapv(|x| x.0.to_f32()))
            }
        }
    }
}
