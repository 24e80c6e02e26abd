//! Facts about a model file, shared by `inspect` and the run manifest.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::capture::arch;
use crate::llama::gguf::Gguf;
use crate::llama::model::Model;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelFacts {
    pub path: String,
    pub file_name: String,
    pub architecture: String,
    pub name: Option<String>,
    /// llama.cpp's file-type label ("Q4_1", "Q4_K - Medium").
    pub file_type: String,
    /// How many tensors of each ggml type the file really holds (K-quants fall back on some widths).
    pub tensor_types: BTreeMap<String, usize>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_params: u64,
    pub size_bytes: u64,
    pub file_bytes: u64,
    pub has_chat_template: bool,
    /// Tensor captured as point 0 for this architecture.
    pub point0_tensor: String,
    /// Why the model cannot be traced; None when it can.
    pub untraceable: Option<String>,
    /// How far a trace of this model can be trusted.
    #[serde(default)]
    pub trust: Trust,
    /// What llama.cpp assumes about this model beyond its file (constants fixed to one
    /// checkpoint's values, a position encoding the file does not record), which no check of the
    /// graph can see: one line each (see `arch::assumptions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assumptions: Vec<String>,
}

/// How far a trace of a model can be trusted.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Trust {
    /// The architecture is in the test suite's matrix: its states equal HF transformers' hidden
    /// states at every point and position (and every trace also passes the self-check).
    Verified,
    /// Not in the matrix, but llama.cpp's graph proved point 0 and every `l_out-N` to be the
    /// residual stream (a trace of it completed, or `inspect` ran the check).
    SelfChecked,
    /// Not in the matrix and not yet checked (the check runs on a trace's first decode).
    #[default]
    Unchecked,
    /// The model cannot be traced (see `untraceable`).
    Untraceable,
}

impl Trust {
    /// One line for `inspect`.
    pub fn describe(self) -> &'static str {
        match self {
            Trust::Verified => {
                "verified against HF transformers (architecture in the test matrix; every trace also self-checks llama.cpp's graph)"
            }
            Trust::SelfChecked => {
                "self-checked: llama.cpp's graph proves point 0 and every l_out-N are the residual stream (architecture not in the verified matrix)"
            }
            Trust::Unchecked => {
                "not in the verified matrix; every trace proves point 0 and l_out-N from llama.cpp's graph on its first decode (`inspect` runs that check unless --no-check)"
            }
            Trust::Untraceable => "not traceable",
        }
    }
}

impl ModelFacts {
    pub fn gather(path: &Path, model: &Model, gguf: &Gguf) -> ModelFacts {
        let architecture = gguf.get_str("general.architecture").unwrap_or_default();
        ModelFacts {
            path: crate::paths::recorded(path.as_os_str()),
            file_name: path
                .file_name()
                .map(crate::paths::recorded)
                .unwrap_or_default(),
            name: gguf.get_str("general.name"),
            file_type: model.ftype_name(),
            tensor_types: gguf.type_histogram(),
            n_layer: model.n_layer(),
            n_embd: model.n_embd(),
            n_head: model.n_head(),
            n_head_kv: model.n_head_kv(),
            n_vocab: model.n_vocab(),
            n_ctx_train: model.n_ctx_train(),
            n_params: model.n_params(),
            size_bytes: model.size_bytes(),
            file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            has_chat_template: gguf.get_str("tokenizer.chat_template").is_some(),
            point0_tensor: arch::point0_tensor(&architecture).to_string(),
            untraceable: arch::untraceable_reason(model),
            assumptions: arch::assumptions(
                &architecture,
                &|k| gguf.get_f64(k),
                model.n_layer(),
                model.n_embd(),
            ),
            trust: if arch::untraceable_reason(model).is_some() {
                Trust::Untraceable
            } else if arch::VERIFIED.contains(&architecture.as_str()) {
                Trust::Verified
            } else {
                Trust::Unchecked
            },
            architecture,
        }
    }

    /// "Q4_K: 120, Q6_K: 12, F32: 37" — the real tensor mix, largest first.
    pub fn tensor_mix(&self) -> String {
        tensor_mix(&self.tensor_types)
    }
}

/// "Q4_K: 120, Q6_K: 12, F32: 37" — a tensor-type histogram, largest first.
pub fn tensor_mix(hist: &BTreeMap<String, usize>) -> String {
    let mut v: Vec<_> = hist.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(t, n)| format!("{}: {n}", t.to_uppercase()))
        .collect::<Vec<_>>()
        .join(", ")
}
