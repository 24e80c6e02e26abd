//! The capture settings of a trace: one record.
//!
//! Every option that changes what a trace measures or how it is laid out on disk is a field here,
//! and nowhere else: clap parses it (the record is flattened into `trace` and `compare`, so both
//! build it the same way), [`CaptureArgs::validate`] checks it once, the resume fingerprint hashes
//! the whole record, and run.json stores it as is (`capture.settings`). Adding an option is one
//! field here plus its use.

use anyhow::{bail, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::capture::engine::Positions;
use crate::capture::taps::Tap;
use crate::cli::RpcArgs;
use crate::llama::context::CacheType;
use crate::run::{Dtype, Format};

/// llama.cpp's limit on sequences in one context (`LLAMA_MAX_SEQ`).
pub const MAX_SEQ: usize = 256;
/// Largest --ctx (tokens per prompt plus generation).
pub const MAX_CTX: usize = 1 << 22;

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptureArgs {
    /// Positions to store: every prompt position, or only the last (generated tokens are always stored).
    #[arg(long, value_enum, default_value = "all")]
    pub positions: Positions,

    /// Points to keep: "all", or a list such as "0,10-20,30" (0 = input of block 0, p = output of block p-1).
    #[arg(long, value_name = "SPEC", default_value = "all")]
    pub points: String,

    /// What to capture: "resid" (the residual stream between blocks, always kept) and taps inside
    /// each block --points names (point p < L names block p): resid_mid (after attention, before
    /// the MLP), attn_out and mlp_out (what attention and the MLP add to the residual stream), z
    /// (each head's output before the output projection), neurons (the MLP's hidden
    /// activations), pattern (per-head attention probabilities; turns flash attention off and
    /// decodes one prompt at a time), router (a mixture-of-experts block's router_logits, the
    /// router_experts it chose and their router_weights). TransformerLens names work too (hook_attn_out,
    /// hook_resid_mid, hook_z, hook_post, hook_pattern). Each tap is found from the structure of
    /// llama.cpp's graph, or refused with the reason; written as NPY to taps/<tap>/<prompt>.npy
    #[arg(long, value_name = "TAP[,TAP...]", default_value = "resid", value_delimiter = ',', value_parser = parse_tap)]
    pub taps: Vec<Tap>,

    /// Heads to keep for the z and pattern taps, e.g. "0,3-5" (default: every head).
    #[arg(long, value_name = "SPEC")]
    pub heads: Option<String>,

    /// Greedily generate N tokens after each prompt and store their states too (uses the KV cache).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub generate: usize,

    /// Format of the per-prompt states (last.npy and logits.npy are always written; taps inside
    /// blocks are always NPY).
    #[arg(long, value_enum, default_value = "npy")]
    pub format: Format,

    /// Element type of the per-prompt NPY states and taps (f16 refuses values beyond its range).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,

    /// Token limit for one prompt plus its generation.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub ctx: usize,

    /// CPU threads (default: all available).
    #[arg(short, long, value_name = "N")]
    pub threads: Option<i32>,

    /// Layers to offload to the GPU or the --rpc servers (default: all there; 0 on CPU builds
    /// without --rpc).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub n_gpu_layers: Option<i32>,

    #[command(flatten)]
    #[serde(flatten)]
    pub rpc: RpcArgs,

    /// Prompts decoded together as separate sequences of one batch (1-256).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub n_seq: usize,

    /// Keep quantized weights in the file's layout on the CPU. By default llama.cpp repacks some
    /// types (e.g. Q4_K) into interleaved layouts computed by other kernels, as RPC workers and
    /// GPUs do not: with --no-repack a local trace is bit-identical to one over --rpc.
    #[arg(long)]
    pub no_repack: bool,

    /// Element type of llama.cpp's KV cache. llama.cpp's default, f16, rounds every key and value
    /// (states move by ~1e-3 relative against an exact computation); f32 keeps them in float32
    /// (on the CPU: ~1e-7 from HF transformers in float64), costs twice the cache memory and turns
    /// flash attention off (llama.cpp's flash attention rounds keys and values to f16); q8_0 …
    /// q4_0 show what a quantized cache does to the states
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub cache_type: CacheType,

    /// Largest number of tokens in one decode.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub batch_size: usize,

    /// llama.cpp's physical micro-batch size.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub ubatch_size: usize,

    /// Keep going when a state or logit is NaN or infinite (a broken model, an extreme control
    /// vector): the first such point and position of each prompt is recorded in run.json
    /// (prompts[].nonfinite) instead of failing the trace. Reports refuse such runs.
    #[arg(long)]
    pub allow_nonfinite: bool,
}

/// One `--taps` entry (the list is checked as a whole by [`CaptureArgs::validate`]).
fn parse_tap(s: &str) -> Result<Tap, String> {
    if s.trim().is_empty() {
        return Err("an empty entry in the list".into());
    }
    if let Some(rest) = s.trim().strip_prefix("blocks.") {
        // TransformerLens names a block in the hook; here --points chooses the blocks.
        let (block, hook) = rest.split_once('.').unwrap_or((rest, ""));
        return Err(format!(
            "`{s}` names block {block}: give the tap without its block and choose blocks with --points (--taps {hook} --points {block})"
        ));
    }
    s.parse()
}

impl Default for CaptureArgs {
    /// The command line's defaults (what `trace` does without options): defined once, by clap.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            capture: CaptureArgs,
        }
        <Defaults as clap::Parser>::parse_from(["gguf-trace"]).capture
    }
}

impl CaptureArgs {
    /// Check every setting that can be checked without the model, and resolve the defaults that
    /// depend on the machine (threads) or on other settings (layers placed with --rpc), so the
    /// record holds what the trace uses.
    pub fn validate(&mut self) -> Result<()> {
        self.threads = Some(crate::commands::resolve_threads(self.threads)?);
        let (endpoints, _) = self.rpc.resolve().map_err(anyhow::Error::msg)?;
        self.n_gpu_layers = Some(match self.n_gpu_layers {
            Some(n) => n,
            None if !endpoints.is_empty() => 999,
            None => crate::cli::default_gpu_layers(),
        });
        let mut seen = Vec::new();
        for t in self.taps.iter().flat_map(|t| t.expand()) {
            if seen.contains(t) {
                bail!("--taps: `{t}` is named twice");
            }
            seen.push(*t);
        }
        self.taps = seen;
        // One order, so the same taps in another order are the same plan for --resume.
        self.taps.sort();
        if self.taps.contains(&Tap::Pattern)
            && !matches!(
                self.cache_type,
                CacheType::F16 | CacheType::F32 | CacheType::Bf16
            )
        {
            bail!(
                "--taps pattern computes attention without flash attention, and llama.cpp's quantized KV cache needs flash attention: use --cache-type f16, bf16 or f32"
            );
        }
        if self.heads.is_some() && !self.taps.iter().any(|t| matches!(t, Tap::Z | Tap::Pattern)) {
            bail!(
                "--heads chooses heads of the z and pattern taps: add --taps z or --taps pattern"
            );
        }
        if self.ctx == 0 || self.ctx > MAX_CTX {
            bail!("--ctx {}: must be between 1 and {MAX_CTX}", self.ctx);
        }
        if self.n_seq == 0 || self.n_seq > MAX_SEQ {
            bail!("--n-seq {}: must be between 1 and {MAX_SEQ}", self.n_seq);
        }
        if self.generate > MAX_CTX {
            bail!(
                "--generate {}: at most {MAX_CTX} tokens (the largest --ctx) can follow a prompt",
                self.generate
            );
        }
        for (flag, v) in [
            ("--batch-size", self.batch_size),
            ("--ubatch-size", self.ubatch_size),
        ] {
            if v == 0 || v > MAX_CTX {
                bail!("{flag} {v}: must be between 1 and {MAX_CTX} tokens (sizes beyond --ctx × --n-seq are lowered to it, as llama.cpp does)");
            }
        }
        if self
            .ctx
            .checked_mul(self.n_seq)
            .is_none_or(|n| n > u32::MAX as usize)
        {
            bail!("--ctx × --n-seq is too large for one KV cache; lower one of them");
        }
        if self.dtype == Dtype::F16 && !self.format.npy() && self.block_taps().is_empty() {
            bail!("--dtype f16 applies to NPY states; with --format csv it would be ignored (use --format both)");
        }
        if self.n_gpu_layers() < -1 {
            bail!(
                "--n-gpu-layers {}: must be -1 (all) or more",
                self.n_gpu_layers()
            );
        }
        Ok(())
    }

    /// Threads (resolved by [`CaptureArgs::validate`]).
    pub fn threads(&self) -> i32 {
        self.threads
            .unwrap_or_else(crate::capture::engine::default_threads)
    }

    /// Layers offloaded (resolved by [`CaptureArgs::validate`]).
    pub fn n_gpu_layers(&self) -> i32 {
        self.n_gpu_layers
            .unwrap_or_else(crate::cli::default_gpu_layers)
    }

    /// The taps inside blocks (every tap but `resid`, which is always kept).
    pub fn block_taps(&self) -> Vec<Tap> {
        let mut t: Vec<Tap> = self.taps.iter().copied().filter(|t| t.in_block()).collect();
        t.sort();
        t
    }

    /// The RPC endpoints and their shares (checked by [`CaptureArgs::validate`]).
    pub fn rpc(&self) -> (Vec<String>, Vec<f32>) {
        self.rpc.resolve().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_command_lines() {
        let d = CaptureArgs::default();
        assert_eq!(d.positions, Positions::All);
        assert_eq!(d.points, "all");
        assert_eq!(d.taps, vec![Tap::Resid]);
        assert_eq!(
            (d.ctx, d.n_seq, d.batch_size, d.ubatch_size),
            (512, 16, 512, 512)
        );
        assert_eq!(d.cache_type, CacheType::F16);
        // A run.json written before a field existed reads with that field's default.
        let old: CaptureArgs = serde_json::from_str(r#"{"ctx": 64}"#).unwrap();
        assert_eq!(
            old,
            CaptureArgs {
                ctx: 64,
                ..CaptureArgs::default()
            }
        );
        // The record round-trips through run.json as is.
        let v = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<CaptureArgs>(&v).unwrap(), d);
    }
}
