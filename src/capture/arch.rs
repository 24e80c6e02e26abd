//! What we know about architectures: which tensor is point 0, and whether a model can be traced.
//!
//! This is the one place that maps architectures to tensor names. llama.cpp names the residual
//! stream after block N `l_out-N` in (almost) every decoder; the input of block 0 is named per
//! architecture. Names move between llama.cpp versions: the integration tests check the two test
//! architectures, and every trace validates that each wanted tensor fired with the right rows.

use crate::llama::model::Model;

/// (architecture, tensor that holds the input of block 0) — from llama.cpp's model graphs in
/// llama-cpp-sys-2 0.1.161; every other architecture uses `embd`. Every trace proves the name from
/// the graph itself (see `llama::context`), so a stale entry stops a trace instead of
/// mislabelling it; the architecture matrix checks the values against HF transformers.
const POINT0: &[(&str, &str)] = &[
    ("gemma", "inp_scaled"),
    ("gemma2", "inp_scaled"),
    ("gemma3", "inp_scaled"),
    ("gemma3n", "inp_scaled"),
    ("gemma4", "inp_scaled"),
    ("minicpm3", "inp_scaled"),
    ("bloom", "inp_norm-0"),
    ("talkie", "inp_norm"),
    // The learned position embedding is added to `embd`; the sum is the block input.
    ("gpt2", "inpL"),
    ("starcoder", "inpL"),
    ("afmoe", "inp_embd_scaled"),
];

/// GGUF architectures verified against HF transformers by the test suite's architecture matrix
/// (`tests/integration/arch_matrix.rs`): every point at every position equals HF's hidden states
/// within the measured tolerances, and the logit lens reproduces the model's logits. The matrix
/// test fails when this list and its results differ.
pub const VERIFIED: &[&str] = &[
    "afmoe",
    "apertus",
    "arcee",
    "bloom",
    "cohere2",
    "cohere2moe",
    "command-r",
    "ernie4_5",
    "ernie4_5-moe",
    "exaone4",
    "falcon",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma4",
    "gpt-oss",
    "gpt2",
    "gptneox",
    "granite",
    "granitemoe",
    "jais2",
    "llama",
    "mellum",
    "mpt",
    "nemotron",
    "olmo",
    "olmo2",
    "olmoe",
    "phi2",
    "phi3",
    "qwen2",
    "qwen2moe",
    "qwen3",
    "qwen3moe",
    "seed_oss",
    "smollm3",
    "stablelm",
    "starcoder",
    "starcoder2",
];

/// Name of the tensor holding the input of block 0 (point 0) for `arch`.
pub fn point0_tensor(arch: &str) -> &'static str {
    POINT0
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, n)| *n)
        .unwrap_or("embd")
}

/// Name of the tensor holding point `p` (0..=n_layer).
pub fn point_tensor(arch: &str, p: usize) -> String {
    if p == 0 {
        point0_tensor(arch).to_string()
    } else {
        format!("l_out-{}", p - 1)
    }
}

/// Run the graph self-check (see `llama::context`) on a one-token decode: `Err` says why the
/// model's states cannot be trusted.
pub fn self_check(model: &Model) -> Result<(), String> {
    use super::engine::{Positions, TraceConfig, Tracer};
    let mut cfg = TraceConfig::new(model);
    cfg.positions = Positions::Last;
    cfg.points = vec![0, model.n_layer()];
    cfg.ctx = 8;
    cfg.n_seq = 1;
    cfg.n_batch = 8;
    cfg.n_ubatch = 8;
    let token = model
        .tokenize("The", false, false)
        .ok()
        .and_then(|t| t.first().copied());
    let mut tracer = Tracer::new(model, cfg).map_err(|e| e.to_string())?;
    tracer
        .trace(&[vec![token.unwrap_or(model.bos())]], |_| Ok(()), |_| {})
        .map_err(|e| e.to_string())
}

/// Why a model cannot be traced, or `None` when it can.
pub fn untraceable_reason(model: &Model) -> Option<String> {
    if model.is_recurrent() {
        Some(
            "recurrent architecture: it has no per-token residual stream of transformer blocks"
                .into(),
        )
    } else if model.is_hybrid() {
        Some("hybrid (attention + recurrent) architecture: not supported yet".into())
    } else if model.has_encoder() {
        Some(
            "encoder or encoder-decoder architecture: only decoder-only models can be traced"
                .into(),
        )
    } else if !model.has_decoder() {
        Some("the model has no decoder".into())
    } else if model.n_layer() == 0 || model.n_embd() == 0 {
        Some("the model reports no layers".into())
    } else {
        None
    }
}
