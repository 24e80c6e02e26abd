//! What clients send and get back: the OpenAI-compatible request bodies (unknown OpenAI fields
//! are accepted, as llama-server does) and gguf-trace's `"trace"` extension (strict: an unknown
//! field is an error that names it).

use serde::{Deserialize, Serialize};

use crate::capture::engine::Positions;

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stop: Option<serde_json::Value>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub trace: Option<TraceExt>,
}

/// A completion's prompt: a string, or a list holding one string (what OpenAI clients send for
/// batches; one prompt per request here).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or a list holding one string (token ids are not accepted)"
)]
pub enum PromptInput {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// The newer OpenAI name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stop: Option<serde_json::Value>,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub trace: Option<TraceExt>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

/// A message's content: text, or a list of parts of which only text parts are understood.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string, or a list of text parts")]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// The `"trace"` extension: what to capture and hand back for this request, and its own
/// interventions. Names and value syntax as `trace`'s options spell them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceExt {
    /// Capture points, as `--points` (default: every point).
    #[serde(default)]
    pub points: Option<String>,
    /// Taps inside blocks, as `--taps` (comma-separated; `states: "inline"|"run"` hands them back).
    #[serde(default)]
    pub taps: Option<String>,
    /// `"all"` (default) or `"last"`: the prompt positions kept (generated ones always are).
    #[serde(default)]
    pub positions: Option<Positions>,
    /// The logit lens's top k tokens at every kept point, for every generated token (0: none).
    #[serde(default)]
    pub lens_top_k: Option<usize>,
    /// `"none"` (default), `"inline"` (NPY bytes, base64) or `"run"` (a run directory on the
    /// server, served under `/runs/{id}/`).
    #[serde(default)]
    pub states: Option<StatesMode>,
    /// Element type of inline states: `"f32"` (default) or `"f16"`.
    #[serde(default)]
    pub dtype: Option<InlineDtype>,
    #[serde(default)]
    pub steer: Option<SteerExt>,
    #[serde(default)]
    pub ablate: Option<AblateExt>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatesMode {
    #[default]
    None,
    Inline,
    Run,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InlineDtype {
    #[default]
    F32,
    F16,
}

/// Steering for this request: `--control-vector` (a file in the server's `--vectors` folder,
/// or the GGUF's bytes in base64), `--control-scale`, `--control-points`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerExt {
    #[serde(default)]
    pub vector: Option<String>,
    #[serde(default)]
    pub data: Option<String>,
    #[serde(default)]
    pub scale: Option<f32>,
    #[serde(default)]
    pub points: Option<String>,
}

/// Directional ablation for this request: `--ablate` (a file in `--vectors`, or base64 bytes),
/// `--ablate-points`, `--ablate-direction`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblateExt {
    #[serde(default)]
    pub vector: Option<String>,
    #[serde(default)]
    pub data: Option<String>,
    #[serde(default)]
    pub points: Option<String>,
    #[serde(default)]
    pub direction: Option<String>,
}

/// A JSON error body, as OpenAI servers send them.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: u16,
}

/// One kept point's logit-lens reading of a generated token.
#[derive(Debug, Clone, Serialize)]
pub struct LensReading {
    pub point: usize,
    pub top: Vec<crate::answer::TopToken>,
}
