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

/// What llama.cpp assumes about a model beyond its file: constants it fixes to one checkpoint's
/// values, and position encodings the file does not record. The architecture matrix proves a
/// graph with models that fit these assumptions; a model that does not is computed otherwise than
/// its own framework computes it, and no check of the graph can see that. Returns one line per
/// assumption this file leaves open or contradicts (`get` reads a number from the file's
/// metadata); nothing where llama.cpp reads the value from the file.
pub fn assumptions(
    arch: &str,
    get: &dyn Fn(&str) -> Option<f64>,
    n_layer: usize,
    n_embd: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    // MiniCPM's scales (llama.cpp: models/minicpm.cpp and minicpm3.cpp): the embedding scale 12,
    // the residual scale 1.4/√n_layer and the head scale 256/n_embd of MiniCPM-2B and
    // MiniCPM3-4B. minicpm reads them from the file when present; minicpm3 always uses them.
    let scales = || {
        [
            ("embedding_scale", 12.0),
            ("residual_scale", 1.4 / (n_layer.max(1) as f64).sqrt()),
            ("logit_scale", 256.0 / n_embd.max(1) as f64),
        ]
    };
    match arch {
        "minicpm" => {
            for (key, used) in scales() {
                if get(&format!("minicpm.{key}")).is_none() {
                    out.push(format!(
                        "the file does not record minicpm.{key}: llama.cpp assumes {used:.6} (MiniCPM-2B's value)"
                    ));
                }
            }
        }
        "minicpm3" => {
            for (key, used) in scales() {
                let line = match get(&format!("minicpm3.{key}")) {
                    Some(v) if (v - used).abs() > 1e-4 * used.abs() => format!(
                        "the file records minicpm3.{key} = {v}, but llama.cpp computes with {used:.6} (fixed to MiniCPM3-4B's value): the states are not this model's"
                    ),
                    Some(_) => continue,
                    None => format!(
                        "llama.cpp fixes minicpm3's {key} to {used:.6} (MiniCPM3-4B's value); the file does not record the model's own"
                    ),
                };
                out.push(line);
            }
        }
        "falcon" => out.push(
            "llama.cpp computes falcon with rotary position embeddings; Falcon models configured with ALiBi instead (alibi = true in their config, e.g. falcon-rw-1b) are computed otherwise by their framework, and the GGUF does not record which (the matrix verified the rotary variant)".into(),
        ),
        _ => {}
    }
    out
}

#[cfg(test)]
mod assumption_tests {
    use super::assumptions;

    #[test]
    fn assumptions_are_named_where_the_file_leaves_them_open_or_contradicts_them() {
        let none = |_: &str| None;
        assert!(assumptions("llama", &none, 30, 576).is_empty());
        assert_eq!(assumptions("falcon", &none, 2, 64).len(), 1);
        // minicpm reads its scales from the file when present: nothing is assumed then.
        assert_eq!(assumptions("minicpm", &none, 40, 2304).len(), 3);
        let all = |_: &str| Some(1.0);
        assert!(assumptions("minicpm", &all, 40, 2304).is_empty());
        // minicpm3 always computes with its fixed values: a file that agrees is fine, one that
        // differs is named as not this model's states.
        let agrees = |k: &str| match k {
            "minicpm3.embedding_scale" => Some(12.0),
            "minicpm3.residual_scale" => Some(1.4 / 62f64.sqrt()),
            "minicpm3.logit_scale" => Some(256.0 / 2560.0),
            _ => None,
        };
        assert!(assumptions("minicpm3", &agrees, 62, 2560).is_empty());
        let differs = |k: &str| (k == "minicpm3.embedding_scale").then_some(10.0);
        let lines = assumptions("minicpm3", &differs, 62, 2560);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("records minicpm3.embedding_scale = 10"));
        assert!(lines[0].contains("not this model's"));
    }
}
