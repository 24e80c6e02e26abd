//! `trace --attribution`: direct logit attribution while tracing. Each prompt's logit of a target
//! token (default: the model's own top-1 next token; `--target`, or a .jsonl `target` field), or
//! the target − foil difference, split into the embedding's and every block's attention and MLP
//! shares ([`crate::analysis::attribution`]), checked against the model's own logit and stored in
//! run.json (`prompts[].attribution`, `attribution`).

use std::collections::HashMap;

use anyhow::{bail, Context as _, Result};
use ndarray::Axis;

use crate::analysis::attribution::{self, Direction, PromptAttribution, Readout};
use crate::capture::engine::{argmax, PromptTrace, TapInfo};
use crate::capture::taps::Tap;
use crate::llama::gguf::Gguf;
use crate::llama::lens::LensHead;
use crate::llama::model::Model;
use crate::prompts::Prompt;
use crate::run::AttributionInfo;

/// `--attribution` with its `--target` / `--foil`.
#[derive(Debug, Clone, Default)]
pub struct AttributionOptions {
    pub target: Option<String>,
    pub foil: Option<String>,
}

/// The taps the attribution reads (added to `--taps` by `--attribution`).
pub const TAPS: [Tap; 2] = [Tap::AttnOut, Tap::MlpOut];

/// The convention the page and run.json state.
pub const CONVENTION: &str = "the final norm's scale is taken from the real last residual of each prompt and held fixed, so each component's share is its own dot product with the normed unembedding row (TransformerLens's apply_ln_to_stack convention); the norm's bias and the output bias form a constant no component writes";

/// The attribution during a trace.
pub struct AttributionState {
    head: LensHead,
    readout: Readout,
    /// `--target` and `--foil` as token ids (a prompt's own fields override them).
    target: Option<i32>,
    foil: Option<i32>,
    /// Index of attn_out and mlp_out in the prompt traces' taps.
    slots: [usize; 2],
    /// Dequantized unembedding rows by token id.
    rows: HashMap<i32, Vec<f32>>,
    /// With the `z` tap: what per-head shares need.
    heads: Option<Heads>,
}

/// Most memory the dequantized output projections may take (per-head shares are skipped, with a
/// note, beyond it: a 7B model's take 0.5 GiB, a 70B's 21 GiB).
const MAX_HEADS_BYTES: u64 = 4 << 30;

/// Per-head shares: the `z` tap's slot and every block's output projection, dequantized.
struct Heads {
    slot: usize,
    n_head: usize,
    /// Per block: `attn_output.weight` as float32 rows `[n_embd][n_head × head_dim]`.
    w_o: Vec<Vec<f32>>,
    /// Per block: `attn_output.bias`, where the file has one.
    bias: Vec<Option<Vec<f32>>>,
}

/// The output projections of every block, when `z` was captured whole: `Ok(None)` (with the
/// reason) where per-head shares cannot be computed.
fn open_heads(
    model_path: &std::path::Path,
    gguf: &Gguf,
    model: &Model,
    taps: &[TapInfo],
    threads: i32,
) -> Result<Result<Heads, String>> {
    let Some(slot) = taps.iter().position(|t| t.tap == Tap::Z) else {
        return Ok(Err(String::new()));
    };
    let width = taps[slot].width;
    let n_head = model.n_head();
    // Every block's projection is held as float32 while the trace runs.
    let bytes = model.n_layer() as u64 * width as u64 * model.n_embd() as u64 * 4;
    if bytes > MAX_HEADS_BYTES {
        return Ok(Err(format!(
            "the output projections would take {:.1} GiB as float32 (more than {} GiB)",
            bytes as f64 / (1u64 << 30) as f64,
            MAX_HEADS_BYTES >> 30
        )));
    }
    let tensors = gguf.tensors();
    let mut w_o = Vec::new();
    let mut bias = Vec::new();
    for b in 0..model.n_layer() {
        let name = format!("blk.{b}.attn_output.weight");
        let Some(t) = tensors.iter().find(|t| t.name == name) else {
            return Ok(Err(format!("the file has no {name}")));
        };
        if t.shape != [width, model.n_embd()] {
            return Ok(Err(format!(
                "{name} is {:?} and z {width} wide (per-head shares need every head: drop --heads)",
                t.shape
            )));
        }
        if n_head == 0 || width % n_head != 0 {
            return Ok(Err(format!("z is {width} wide for {n_head} heads")));
        }
        w_o.push(
            crate::llama::lens::dequantized(model_path, t, threads)
                .with_context(|| format!("{}: reading {name}", model_path.display()))?,
        );
        let bname = format!("blk.{b}.attn_output.bias");
        bias.push(if tensors.iter().any(|t| t.name == bname) {
            Some(
                gguf.read_f32(&bname)
                    .with_context(|| format!("{}: reading {bname}", model_path.display()))?,
            )
        } else {
            None
        });
    }
    Ok(Ok(Heads {
        slot,
        n_head,
        w_o,
        bias,
    }))
}

/// Row `j` (a stored position) of entry `b` (a point or block) of a `[entry, position, width]`
/// array.
fn tap_row(a: ndarray::ArrayViewD<'_, f32>, b: usize, j: usize) -> Vec<f32> {
    a.index_axis(Axis(0), b)
        .index_axis(Axis(0), j)
        .iter()
        .copied()
        .collect()
}

/// A prompt's named target and foil as token ids: its own `target`/`foil` fields, else the
/// command's (`cli`, already resolved).
fn prompt_tokens(
    model: &Model,
    p: &Prompt,
    cli: (Option<i32>, Option<i32>),
) -> Result<(Option<i32>, Option<i32>)> {
    let own = |text: &Option<String>, what: &str| {
        text.as_deref()
            .map(|t| one_token(model, t, &format!("{}: {what}", p.source)))
            .transpose()
    };
    Ok((
        own(&p.target, "target")?.or(cli.0),
        own(&p.foil, "foil")?.or(cli.1),
    ))
}

/// The token a target or foil text names: it must be exactly one token of the model.
fn one_token(model: &Model, text: &str, what: &str) -> Result<i32> {
    let t = model
        .tokenize(text, false, true)
        .with_context(|| format!("{what} `{text}`"))?;
    match t.as_slice() {
        [id] => Ok(*id),
        _ => bail!(
            "{what} `{text}` is {} tokens for this model ({}): give one token, with its leading space where the model's words have one (e.g. \" Paris\")",
            t.len(),
            t.iter()
                .map(|&id| format!("{:?}", model.token_piece(id)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl AttributionState {
    /// Load the readout and check every target and foil before anything is traced (the caller
    /// has checked that every point is kept).
    pub fn open(
        opts: &AttributionOptions,
        model_path: &std::path::Path,
        gguf: &Gguf,
        model: &Model,
        taps: &[TapInfo],
        prompts: &[&Prompt],
        threads: i32,
    ) -> Result<AttributionState> {
        let head = LensHead::load(model_path, gguf, threads)
            .with_context(|| format!("{}: loading the output head", model_path.display()))?;
        if head.n_embd() != model.n_embd() || head.n_vocab() != model.n_vocab() {
            bail!(
                "{}: the output matrix is {}×{}, the model {}×{}: the attribution cannot read this file",
                model_path.display(),
                head.n_embd(),
                head.n_vocab(),
                model.n_embd(),
                model.n_vocab()
            );
        }
        let slot = |tap: Tap| -> Result<usize> {
            let i = taps
                .iter()
                .position(|t| t.tap == tap)
                .with_context(|| format!("internal error: --attribution without the {tap} tap"))?;
            if taps[i].width != model.n_embd() {
                bail!(
                    "the {tap} tap of this model is {} wide, the residual stream {}: the attribution cannot read it",
                    taps[i].width,
                    model.n_embd()
                );
            }
            Ok(i)
        };
        let slots = [slot(Tap::AttnOut)?, slot(Tap::MlpOut)?];
        let cli = |text: &Option<String>, what: &str| {
            text.as_deref()
                .map(|t| one_token(model, t, what))
                .transpose()
        };
        let (target, foil) = (cli(&opts.target, "--target")?, cli(&opts.foil, "--foil")?);
        for p in prompts {
            let (t, f) = prompt_tokens(model, p, (target, foil))?;
            // A named target equal to its foil (the prompt's own fields, else the command's).
            if let (Some(t), Some(f)) = (t, f) {
                if t == f {
                    bail!(
                        "prompt {}: the foil is the target ({:?}): the difference would be 0",
                        p.id,
                        model.token_piece(t)
                    );
                }
            }
        }
        let heads = match open_heads(model_path, gguf, model, taps, threads)? {
            Ok(h) => Some(h),
            Err(why) => {
                if !why.is_empty() {
                    eprintln!("note: --attribution with --taps z: no per-head shares: {why}");
                }
                None
            }
        };
        Ok(AttributionState {
            readout: head.readout(),
            head,
            target,
            foil,
            slots,
            rows: HashMap::new(),
            heads,
        })
    }

    fn row(&mut self, id: i32) -> Result<&[f32]> {
        if !self.rows.contains_key(&id) {
            let r = self.head.unembedding_rows(&[id])?;
            self.rows.insert(id, r);
        }
        Ok(&self.rows[&id])
    }

    /// One prompt's attribution at its last prompt position.
    pub fn add(
        &mut self,
        t: &PromptTrace,
        prompt: &Prompt,
        model: &Model,
    ) -> Result<Option<PromptAttribution>> {
        let j = t.last_prompt_slot();
        let (target, foil) = prompt_tokens(model, prompt, (self.target, self.foil))?;
        let target = target.unwrap_or_else(|| argmax(&t.logits) as i32);
        if foil == Some(target) {
            // Only a default target (the model's own answer) can meet its foil here: named
            // targets equal to their foils are refused before tracing.
            eprintln!(
                "note: prompt {}: its answer {:?} is the foil, so there is no difference to attribute: left out of the attribution",
                prompt.id,
                model.token_piece(target)
            );
            return Ok(None);
        }
        let mut w = self.row(target)?.to_vec();
        let bias = self.head.output_bias(&[target, foil.unwrap_or(target)]);
        let mut out_bias = bias[0] as f64;
        if let Some(f) = foil {
            for (a, b) in w.iter_mut().zip(self.row(f)?) {
                *a -= b;
            }
            out_bias -= bias[1] as f64;
        }
        // Every array here is [block or point, stored position, width]: row j of each.
        let states = t.states.view().into_dyn();
        let x = tap_row(states.view(), t.states.len_of(Axis(0)) - 1, j);
        let embed = tap_row(states, 0, j);
        let block_rows = |slot: usize| -> Vec<Vec<f32>> {
            let a = &t.taps[self.slots[slot]];
            (0..a.len_of(Axis(0)))
                .map(|b| tap_row(a.view(), b, j))
                .collect()
        };
        let (attn, mlp) = (block_rows(0), block_rows(1));
        fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
            v.iter().map(Vec::as_slice).collect()
        }
        let d = Direction { w, out_bias };
        let sh = attribution::decompose(&self.readout, &d, &x, &embed, &refs(&attn), &refs(&mlp));
        let cap = self.readout.softcap;
        let logit_of = |id: i32| attribution::uncapped(t.logits[id as usize], cap);
        let logit = match (logit_of(target), foil.map(logit_of)) {
            (Some(a), None) => a,
            (Some(a), Some(Some(b))) => a - b,
            _ => f64::NAN,
        };
        let (mut heads, mut head_bias, mut projection_error) = (Vec::new(), Vec::new(), 0f64);
        if let Some(h) = &self.heads {
            let z = &t.taps[h.slot];
            for (b, ((w_o, bias), out)) in h.w_o.iter().zip(&h.bias).zip(&attn).enumerate() {
                let zb = tap_row(z.view(), b, j);
                let bh =
                    attribution::block_heads(&sh.readout, w_o, &zb, h.n_head, bias.as_deref(), out);
                heads.push(bh.shares);
                head_bias.push(bh.bias);
                projection_error = projection_error.max(bh.projection_error);
            }
        }
        let mut a = PromptAttribution {
            heads,
            head_bias,
            projection_error,
            position: t.positions[j],
            target,
            target_piece: model.token_piece(target),
            foil,
            foil_piece: foil.map(|f| model.token_piece(f)),
            logit,
            embed: sh.embed,
            attn: sh.attn,
            mlp: sh.mlp,
            constant: sh.constant,
            norm_scale: sh.norm_scale,
            residual: 0.0,
            unexplained: sh.unexplained,
        };
        a.residual = a.logit - a.total();
        Ok(Some(a))
    }

    /// What run.json records of the attribution, from every prompt's.
    pub fn info(&self, prompts: &[&PromptAttribution]) -> AttributionInfo {
        let spread = attribution::spread;
        let max = |f: &dyn Fn(&PromptAttribution) -> f64| {
            prompts.iter().map(|a| f(a)).fold(0f64, |m, v| {
                if v.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(v)
                }
            })
        };
        AttributionInfo {
            convention: CONVENTION.into(),
            output_tensor: self.head.output_tensor.clone(),
            norm: format!("{:?}", self.head.norm).to_lowercase(),
            softcap: self.readout.softcap,
            logit_scale: self.readout.logit_scale,
            max_relative_residual: max(&|a| a.residual.abs() / spread(a)),
            max_unexplained: max(&|a| a.unexplained),
            residual_tolerance: attribution::RESIDUAL_TOLERANCE,
            unexplained_tolerance: attribution::UNEXPLAINED_TOLERANCE,
            valid: prompts.iter().all(|a| attribution::holds(a)),
            heads: self.heads.is_some(),
            max_heads_gap: max(&attribution::heads_gap),
            max_projection_error: max(&|a| a.projection_error),
            heads_valid: self.heads.is_some()
                && prompts.iter().all(|a| {
                    attribution::heads_gap(a) <= attribution::RESIDUAL_TOLERANCE
                        && a.projection_error <= attribution::PROJECTION_TOLERANCE
                }),
        }
    }
}

/// The lines `trace` prints under its answers for an attributed run: whether the shares add up,
/// and the components that wrote most of the attributed logits on average over the prompts.
pub fn summary(m: &crate::run::Manifest) -> Option<String> {
    let info = m.attribution.as_ref()?;
    let all: Vec<&PromptAttribution> = m
        .prompts
        .iter()
        .filter_map(|p| p.attribution.as_ref())
        .collect();
    if all.is_empty() {
        return None;
    }
    if !info.valid {
        return Some(format!(
            "attribution: the shares do not add up to the model's own logits (largest residual {:.1e} of Σ|share|, tolerance {:.0e}; the captured components rebuild the last residual to {:.1e}, tolerance {:.0e}): not shown",
            info.max_relative_residual, info.residual_tolerance, info.max_unexplained, info.unexplained_tolerance
        ));
    }
    let n = all.len() as f64;
    let mean = |f: &dyn Fn(&PromptAttribution) -> f64| all.iter().map(|a| f(a)).sum::<f64>() / n;
    let mut parts: Vec<(String, f64)> = vec![("the embedding".into(), mean(&|a| a.embed))];
    for b in 0..all[0].attn.len() {
        parts.push((format!("attention {b}"), mean(&|a| a.attn[b])));
        parts.push((format!("MLP {b}"), mean(&|a| a.mlp[b])));
    }
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = parts
        .iter()
        .take(4)
        .map(|(name, v)| format!("{name} {v:+.2}"))
        .collect();
    let of = if all.iter().any(|a| a.foil.is_some()) {
        "target − foil logit"
    } else {
        "answer's logit"
    };
    let heads = if !info.heads {
        String::new()
    } else if !info.heads_valid {
        format!(
            "\n  heads: not shown — attention here is not the output projection of the heads alone (off by {:.1e}: a norm or a scale follows it)",
            info.max_projection_error
        )
    } else {
        let mut h: Vec<(String, f64)> = Vec::new();
        for b in 0..all[0].heads.len() {
            for k in 0..all[0].heads[b].len() {
                h.push((format!("L{b}.H{k}"), mean(&|a| a.heads[b][k])));
            }
        }
        h.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let top: Vec<String> = h
            .iter()
            .take(4)
            .map(|(n, v)| format!("{n} {v:+.2}"))
            .collect();
        format!("\n  heads writing most: {}", top.join(", "))
    };
    Some(format!(
        "attribution ({} prompt(s), mean share of each {of}): most written by {}; the shares add up to the model's logits (largest residual {:.1e} of Σ|share|){heads}",
        all.len(),
        top.join(", "),
        info.max_relative_residual
    ))
}
