//! Command-line definitions (clap derive) — parsing only; commands validate their options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "gguf-trace",
    version,
    about = "See how a local GGUF model thinks: capture its residual stream through llama.cpp and explore it",
    long_about = "See how a local GGUF model thinks.\n\n\
gguf-trace runs a GGUF model through llama.cpp exactly as it really runs (quantized), captures the \
residual stream after every transformer block for every token, and writes it as NPY/CSV files with \
a JSON manifest that numpy and pandas read in one line.\n\n\
Depth is counted in points: point 0 is the input of block 0, point p is the output of block p-1, \
so a model with L blocks has L+1 points.",
    after_help = "Examples:\n  \
gguf-trace inspect model.gguf\n  \
gguf-trace trace -m model.gguf -p \"The capital of France is\" -o runs/paris\n  \
gguf-trace trace -m model.gguf -f prompts/paraphrases.txt -f prompts/unrelated.txt -o runs/funnel\n  \
gguf-trace trace -m model.gguf --chat -p \"Tell me a joke\" --generate 32 -o runs/joke"
)]
pub struct Cli {
    /// Show llama.cpp's own log on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant (trace's many options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a GGUF model: architecture, quantization and real tensor-type mix, shape, chat
    /// template, and whether it can be traced.
    Inspect(InspectArgs),
    /// Run prompts through a model and capture the residual stream at every point and position.
    Trace(TraceArgs),
    /// Turn run directories into one standalone interactive HTML report (plus CSVs of its numbers).
    Report(ReportArgs),
    /// Write quantized copies of a model (one file per type; an F32/F16 source quantizes exactly, a
    /// quantized one is requantized) and show each file's real tensor mix.
    Quantize(QuantizeArgs),
    /// Export the contrast direction between two labels of a run as a llama.cpp control vector,
    /// and print how well the labels separate (leave-one-out).
    Direction(DirectionArgs),
    /// Causal tracing: patch the clean run's state into the corrupted prompt at one (point,
    /// position) at a time and record the probability of the clean answer: a heat map of where
    /// the answer is carried.
    Patch(PatchArgs),
    /// Trace the same prompts through several models and report them together (quantization drift
    /// when they are one model at several precisions).
    Compare(CompareArgs),
    /// Serve this machine's CPU to tracing clients over llama.cpp's RPC protocol (as llama.cpp's
    /// rpc-server does; the two interoperate). Unauthenticated: keep it on a trusted network.
    RpcServer(RpcServerArgs),
    /// Serve the model over HTTP like llama-server (OpenAI-compatible /v1/completions and
    /// /v1/chat/completions, streamed or whole), handing back per request what each generated
    /// token looked like inside (states, logit lens) with that request's own steering or
    /// ablation (the `"trace"` extension, see the README), and a live page at /.
    Serve(ServeArgs),
    /// Print shell completions or the man page, generated from these very definitions, e.g.
    /// `gguf-trace generate complete-bash > ~/.local/share/bash-completion/completions/gguf-trace`
    /// or `gguf-trace generate man > ~/.local/share/man/man1/gguf-trace.1`.
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to print.
    #[arg(value_enum)]
    pub kind: GenerateKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GenerateKind {
    /// Completions for bash.
    CompleteBash,
    /// Completions for zsh.
    CompleteZsh,
    /// Completions for fish.
    CompleteFish,
    /// Completions for PowerShell.
    CompletePowershell,
    /// The man page (roff).
    Man,
}

/// The model file, taken the same way by every command that reads one model: as the first
/// argument (`gguf-trace trace model.gguf …`) or with -m (`gguf-trace trace -m model.gguf …`).
#[derive(Debug, Clone, Args)]
pub struct ModelArg {
    /// The GGUF model file (or give it with -m).
    #[arg(
        value_name = "MODEL.gguf",
        required_unless_present = "model_opt",
        conflicts_with = "model_opt"
    )]
    model_pos: Option<PathBuf>,
    /// The GGUF model file (or give it as the first argument).
    #[arg(
        short = 'm',
        long = "model",
        id = "model_opt",
        value_name = "MODEL.gguf"
    )]
    model_opt: Option<PathBuf>,
}

impl ModelArg {
    /// The model's path (clap requires exactly one of the two forms; parsed args always have it).
    pub fn path(&self) -> &std::path::Path {
        self.model_pos
            .as_deref()
            .or(self.model_opt.as_deref())
            .unwrap_or(std::path::Path::new(""))
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Address to listen on (loopback by default; anything else is reachable by others: use
    /// --api-key there).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (the page takes ?key=KEY).
    #[arg(
        long,
        value_name = "KEY",
        env = "GGUF_TRACE_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Requests decoded together as sequences of one batch (those with the same capture
    /// settings and interventions). At start a short decode checks that a request among others
    /// gets the same bits as alone; where llama.cpp's kernels make them differ (Gemma-3 on the
    /// CPU), requests are decoded one at a time.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: usize,
    /// Decode up to --parallel requests together even where that changes their results in the
    /// last bits (see --parallel).
    #[arg(long)]
    pub allow_batch_drift: bool,
    /// Requests that may wait for a slot; past them the server answers 503 with Retry-After.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub queue: usize,
    /// Tokens per request: prompt plus generation.
    #[arg(long, default_value_t = 2048, value_name = "TOKENS")]
    pub ctx: usize,
    /// Tokens generated when a request does not say (max_tokens).
    #[arg(long, default_value_t = 128, value_name = "TOKENS")]
    pub max_tokens: usize,
    /// A folder of control vectors and directions (GGUF, as `direction` writes them) that
    /// requests may name in `trace.steer.vector` / `trace.ablate.vector`.
    #[arg(long, value_name = "DIR")]
    pub vectors: Option<PathBuf>,
    /// Where `"states": "run"` writes run directories (default: a temporary folder removed at exit).
    #[arg(long, value_name = "DIR")]
    pub runs: Option<PathBuf>,
    /// Largest request body in bytes (uploaded control vectors count).
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    pub max_body: usize,
    /// Seconds in-flight requests get to finish after Ctrl-C / SIGTERM before they are cut.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub shutdown_timeout: f64,
    /// Threads for llama.cpp (default: every core).
    #[arg(short = 't', long)]
    pub threads: Option<i32>,
}

#[derive(Debug, Args)]
pub struct RpcServerArgs {
    /// Address to listen on (loopback by default; anything else is reachable by others).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on. (No short form: -p is a prompt in every command.)
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// CPU threads for the served backend (default: all available).
    #[arg(short, long, value_name = "N")]
    pub threads: Option<i32>,
}

/// Where the layers run: llama.cpp RPC servers (part of the capture settings).
#[derive(Debug, Clone, PartialEq, Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RpcArgs {
    /// Run layers on llama.cpp RPC servers, "HOST:PORT[,HOST:PORT...]" (`gguf-trace rpc-server`
    /// or llama.cpp's rpc-server on each worker). Every layer goes remote unless --n-gpu-layers
    /// says how many; the rest run here.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub rpc: Option<String>,
    /// Share of the remote layers per server, e.g. "3,1" (llama.cpp's --tensor-split).
    #[arg(long, value_name = "A,B,...", requires = "rpc")]
    pub tensor_split: Option<String>,
    /// Seconds an RPC worker may go without answering (while the model uploads or a batch
    /// computes) before the trace stops with an error naming it; the checkpoints stay for
    /// --resume. Not part of the settings record: it changes no number.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::llama::rpc::DEFAULT_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    #[serde(skip, default = "default_rpc_timeout")]
    pub rpc_timeout: u64,
}

fn default_rpc_timeout() -> u64 {
    crate::llama::rpc::DEFAULT_TIMEOUT_S
}

impl Default for RpcArgs {
    fn default() -> Self {
        RpcArgs {
            rpc: None,
            tensor_split: None,
            rpc_timeout: default_rpc_timeout(),
        }
    }
}

impl RpcArgs {
    /// The endpoints and split, checked for form.
    pub fn resolve(&self) -> Result<(Vec<String>, Vec<f32>), String> {
        let endpoints: Vec<String> = match &self.rpc {
            None => Vec::new(),
            Some(s) => s.split(',').map(|e| e.trim().to_string()).collect(),
        };
        if endpoints.iter().any(|e| e.is_empty()) {
            return Err("--rpc: empty endpoint in the list".into());
        }
        let split = match &self.tensor_split {
            None => Vec::new(),
            Some(s) => s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite() && *v >= 0.0)
                        .ok_or_else(|| {
                            format!("--tensor-split: \"{x}\" is not a share (a number ≥ 0)")
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        if !split.is_empty() && split.len() != endpoints.len() {
            return Err(format!(
                "--tensor-split has {} shares for {} RPC servers",
                split.len(),
                endpoints.len()
            ));
        }
        if !split.is_empty() && split.iter().sum::<f32>() <= 0.0 {
            return Err("--tensor-split: the shares add up to 0".into());
        }
        Ok((endpoints, split))
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories written by `trace` (several runs or models go into one report).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The HTML file to write; CSVs of the numbers are written beside it.
    #[arg(short, long, value_name = "report.html")]
    pub output: PathBuf,
    /// Page title.
    #[arg(long, value_name = "T")]
    pub title: Option<String>,
    /// For a quantization ladder: the reference run (default: the highest-precision one).
    #[arg(long, value_name = "RUN_DIR")]
    pub reference: Option<PathBuf>,
    /// Overwrite an existing report written by gguf-trace (and its CSVs); other files are never
    /// overwritten.
    #[arg(long)]
    pub force: bool,

    /// The refusal phrases the Interventions section's keyword judge looks for at the start of a
    /// generation, one per line (default: the shipped prompts/refusal_phrases.txt).
    #[arg(long, value_name = "FILE")]
    pub refusal_phrases: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PatchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The clean prompt: its next token (greedy) is "the answer".
    #[arg(long, value_name = "TEXT")]
    pub clean: String,
    /// The corrupted prompt (e.g. another subject), of the same token count.
    #[arg(long, value_name = "TEXT")]
    pub corrupt: String,
    /// Points to sweep: "all" or a list such as "0,10-20" (default: all).
    #[arg(long, value_name = "SPEC", default_value = "all")]
    pub points: String,
    /// The rows beside the residual stream's that separate attention from the MLP: restore what
    /// attention (attn_out) or the MLP (mlp_out) of a window of blocks added at one token; "resid"
    /// for the residual row alone (also z, resid_mid, neurons)
    #[arg(long, value_name = "TAPS", default_value = "attn_out,mlp_out")]
    pub taps: String,
    /// Blocks restored together for the attn_out/mlp_out rows, centred on each block (Meng et
    /// al. restore 10: one block's part alone rarely moves the answer)
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// The heat-map page to write (its numbers go to the .csv beside it).
    #[arg(short, long, value_name = "PATCH.html")]
    pub output: PathBuf,
    /// Overwrite an existing page and CSV written by gguf-trace (never any other file).
    #[arg(long)]
    pub force: bool,
    /// CPU threads (default: all available).
    #[arg(short, long, value_name = "N")]
    pub threads: Option<i32>,
}

#[derive(Debug, Args)]
pub struct DirectionArgs {
    /// A run directory whose prompts carry the two labels.
    pub run: PathBuf,
    /// The two labels, "A,B": the direction points from B's mean to A's (e.g. harmful,harmless).
    #[arg(long, value_name = "A,B")]
    pub labels: String,
    /// The control-vector GGUF to write.
    #[arg(short, long, value_name = "FILE.gguf")]
    pub output: PathBuf,
    /// Overwrite an existing control vector (never any other file).
    #[arg(long)]
    pub force: bool,
    /// Choose the default intervention point by effect, not by separation: ablate each candidate
    /// point's direction while the model answers the held-out prompts of FILE (.txt/.jsonl with
    /// labels A and B), and record the point that lowers A's refusal score most while label B's
    /// next-token KL stays within --select-max-kl and A's text is not broken. Needs -m. The scores
    /// are printed, recorded in the file and drawn by `report`.
    #[arg(long, value_name = "FILE", requires = "model")]
    pub select: Option<PathBuf>,
    /// The model the run was traced with (for --select).
    #[arg(short, long, value_name = "model.gguf", requires = "select")]
    pub model: Option<PathBuf>,
    /// Candidate points for --select (default: every point 2..n_layer-1 the run keeps, the points
    /// a block reads).
    #[arg(long, value_name = "SPEC", requires = "select")]
    pub select_points: Option<String>,
    /// Tokens generated per held-out prompt for the refusal judge.
    #[arg(long, value_name = "N", default_value_t = 24, requires = "select")]
    pub select_generate: usize,
    /// Largest mean next-token KL (nats) a candidate may cause on label B's prompts. Arditi et
    /// al. use 0.1; on Qwen2.5-Coder-1.5B every candidate that moved refusal at all caused
    /// 0.11–0.56, so the default is 0.3 (the selection records every candidate's KL).
    #[arg(long, value_name = "NATS", default_value_t = 0.3, requires = "select")]
    pub select_max_kl: f64,
    /// CPU threads for --select (default: all available).
    #[arg(short, long, value_name = "N", requires = "select")]
    pub threads: Option<i32>,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub source: ModelArg,
    /// Comma-separated target types, e.g. f32,q8_0,q6_k,q4_k_m,q3_k_m,q2_k. (No short form: -t is
    /// the thread count in every command.)
    #[arg(long = "type", value_name = "TYPES")]
    pub types: String,
    /// Output directory (created if missing); files are named after the source and the type.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    /// CPU threads (default: all available).
    #[arg(short, long, value_name = "N")]
    pub threads: Option<i32>,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Models to compare, at least two, in the order given (or repeat -m instead).
    #[arg(value_name = "MODEL.gguf")]
    pub models_pos: Vec<PathBuf>,
    /// Models to compare (repeatable; or give them as arguments).
    #[arg(short, long = "model", id = "models", value_name = "MODEL.gguf")]
    pub models: Vec<PathBuf>,
    #[command(flatten)]
    pub input: PromptArgs,
    /// Output directory: one run directory per model and report.html.
    #[arg(short, long, value_name = "OUT_DIR")]
    pub output: PathBuf,
    /// Overwrite an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// The reference model of a quantization ladder (default: the highest precision).
    #[arg(long, value_name = "MODEL.gguf")]
    pub reference: Option<PathBuf>,
    /// Also compute the logit lens of every model (for the thinking-styles comparison).
    #[arg(long)]
    pub lens: bool,
    /// Page title of the report.
    #[arg(long, value_name = "T")]
    pub title: Option<String>,
    /// Continue an interrupted compare of the same OUT_DIR: finished runs are kept, an
    /// interrupted one resumes from its last prompt on disk.
    #[arg(long)]
    pub resume: bool,
    /// Print what each model answered — a row per prompt, a column per model with its most likely
    /// next token — on stdout before the report's path: "auto" when stdout is a terminal,
    /// "always", or "never". Every run's run.json and the report record them either way
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = When::Auto)]
    pub answers: When,
    #[command(flatten)]
    pub capture: crate::settings::CaptureArgs,
}

/// Where prompts come from and how they are rendered (shared by `trace` and `compare`).
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// A prompt (repeatable). Special-token text such as <|im_start|> is parsed like llama.cpp's CLI.
    #[arg(short, long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,

    /// A prompt file (repeatable): .txt (one prompt per line; blank lines and # comments skipped)
    /// or .jsonl ({"text": ..., "label": ..., "id": ...}). The file name is the default label.
    #[arg(short, long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Render each prompt as a user message through the model's own chat template.
    #[arg(long)]
    pub chat: bool,

    /// System message for --chat.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Skip the graph check. By default `inspect` runs the check every trace runs on its first
    /// decode (a one-token decode proving point 0 and every l_out-N are the residual stream), so
    /// its "traceable" verdict is the trace's own; the decode reads every weight once, which takes
    /// a while for a large model on a slow disk.
    #[arg(long)]
    pub no_check: bool,
    /// (The check is now the default; kept so older scripts still run.)
    #[arg(long, hide = true, conflicts_with = "no_check")]
    pub check: bool,
}

/// When to print something that is meant for a person (`auto`: when the stream is a terminal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum When {
    Auto,
    Always,
    Never,
}

impl When {
    /// Whether to print, given whether the stream is a terminal.
    pub fn print(self, terminal: bool) -> bool {
        match self {
            When::Auto => terminal,
            When::Always => true,
            When::Never => false,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArg,

    #[command(flatten)]
    pub input: PromptArgs,

    /// Output directory (refused if it exists, unless --force).
    #[arg(short, long, value_name = "RUN_DIR")]
    pub output: PathBuf,

    /// Overwrite an existing output directory.
    #[arg(long)]
    pub force: bool,

    /// Print what the model answered — each prompt's top next tokens with their probabilities,
    /// and any generated text — on stdout, before the run's path: "auto" when stdout is a
    /// terminal (a script reading the path gets only the path), "always", or "never". run.json
    /// records them either way (`.prompts[].top`)
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = When::Auto)]
    pub answers: When,

    #[command(flatten)]
    pub capture: crate::settings::CaptureArgs,

    /// Read the weights into memory instead of memory-mapping the file. With mmap (the default)
    /// a model file that is truncated or replaced during a trace kills the process (SIGBUS).
    #[arg(long)]
    pub no_mmap: bool,

    /// Logit lens: run every point's state at the last prompt position through the model's final
    /// norm and unembedding (stored in lens.json; checked against the model's own logits).
    #[arg(long)]
    pub lens: bool,

    /// With --lens: every stored position, not just the last prompt position.
    #[arg(long, requires = "lens")]
    pub lens_all: bool,

    /// With --lens: how many top tokens to keep per point.
    #[arg(long, value_name = "K", default_value_t = 5)]
    pub lens_k: usize,

    /// Direct logit attribution: split each prompt's logit of the answer (the model's top-1 next
    /// token, or --target) into what the embedding and every block's attention and MLP wrote into
    /// the residual stream, checked against the model's own logit (run.json
    /// prompts[].attribution; a section of the report). Captures the attn_out and mlp_out taps;
    /// with --taps z as well, each block's attention share is split by head
    #[arg(long)]
    pub attribution: bool,

    /// With --attribution: the token whose logit is split (one token of the model, with its
    /// leading space where words have one, e.g. " Paris"); a .jsonl prompt's "target" field
    /// overrides it. Default: each prompt's own top-1 next token
    #[arg(long, value_name = "TOKEN", requires = "attribution")]
    pub target: Option<String>,

    /// With --attribution: split the target − foil logit difference instead (e.g. --target " Paris"
    /// --foil " London"); a .jsonl prompt's "foil" field overrides it
    #[arg(long, value_name = "TOKEN", requires = "attribution")]
    pub foil: Option<String>,

    /// Steer with a llama.cpp control-vector GGUF (repeatable; files are summed), e.g. one written
    /// by `gguf-trace direction`.
    #[arg(long = "control-vector", value_name = "FILE")]
    pub control_vectors: Vec<PathBuf>,

    /// Strength of the control vector(s) (default 1): 1 moves group B's mean onto group A's at
    /// each steered point. A list ("0,0.5,1,2") traces once per value, into RUN_DIR-scale<value>
    /// each (a dose-response for `report`)
    #[arg(long, value_name = "S[,S...]", allow_hyphen_values = true, value_delimiter = ',', value_parser = finite_f32)]
    pub control_scale: Vec<f32>,

    /// Points to steer, "A-B" (point p is shifted through llama.cpp layer p − 1, so A ≥ 2);
    /// default: the direction's peak point when the file records it (`direction` does: there
    /// scale 1 moves a state by one difference of the label means), else every point it covers.
    #[arg(long, value_name = "A-B")]
    pub control_points: Option<String>,

    /// Directional ablation (Arditi et al., 2024): at every chosen point and position, remove the
    /// component along that point's unit direction from FILE, h ← h − (h·r̂) r̂, written back into
    /// the residual stream so the next block reads the ablated state (stored states and
    /// generations show the effect). FILE: a control-vector GGUF, e.g. from `gguf-trace direction`
    #[arg(long, value_name = "FILE")]
    pub ablate: Option<PathBuf>,

    /// Points to ablate with --ablate, e.g. "all" or "10-20" (default: every point FILE has a
    /// direction for; control vectors hold directions from point 2 on); with --ablate-taps, the
    /// blocks whose parts are ablated (block b's parts write into point b + 1, whose direction is
    /// theirs unless --ablate-direction names one)
    #[arg(long, value_name = "SPEC")]
    pub ablate_points: Option<String>,

    /// Which direction --ablate projects out: a point P (P's direction at every ablated point: one
    /// direction, as Arditi et al. do), or "each" (every point its own). Default: the peak point
    /// FILE records (`direction` writes it), else "each"
    #[arg(long, value_name = "P|each")]
    pub ablate_direction: Option<String>,

    /// With --ablate: remove the direction from what attention (attn_out) and/or the MLP
    /// (mlp_out) of the --ablate-points blocks write, instead of from the residual stream (which
    /// then still carries it from the other parts). Adds the taps to --taps
    #[arg(long, value_name = "TAPS")]
    pub ablate_taps: Option<String>,

    /// Ablate attention heads, e.g. "5.3,12.0" (block.head, both from 0): each head's slice of
    /// the `z` tap (its attention-weighted values, before the output projection) is set to zero at
    /// every position, so the block's attention output lacks exactly that head's share. Adds the
    /// `z` tap to --taps (the run stores the ablated z)
    #[arg(long, value_name = "L.H,...")]
    pub ablate_heads: Option<String>,

    /// With --ablate-heads: set each head's slice to its mean over every prompt and stored
    /// position of RUN (a run of the same model traced with --taps z) instead of zero
    /// (mean ablation, which keeps the head's average output)
    #[arg(long, value_name = "RUN")]
    pub ablate_heads_from: Option<PathBuf>,

    /// Activation patching: replace the states at --patch-points (and --patch-positions) with
    /// those of the same-index prompt in RUN, a run of the same model traced with those points and
    /// positions stored; each prompt must have the same token count as its twin there
    #[arg(long, value_name = "RUN")]
    pub patch_from: Option<PathBuf>,

    /// Points to patch with --patch-from, e.g. "12" or "10-20" (with --patch-taps attn_out or
    /// mlp_out: the blocks whose tap is patched)
    #[arg(long, value_name = "SPEC")]
    pub patch_points: Option<String>,

    /// What --patch-from replaces: "resid" (the residual stream, the default) and/or taps inside
    /// the block, e.g. "attn_out,mlp_out" (what attention and the MLP add to the stream; also z,
    /// resid_mid, neurons). RUN must hold them at those blocks; they are added to --taps
    #[arg(long, value_name = "TAPS")]
    pub patch_taps: Option<String>,

    /// Patch only these attention heads from --patch-from, e.g. "9.4,20.0" (block.head): their
    /// slices of the z tap, at --patch-positions; instead of --patch-points (RUN must hold z)
    #[arg(long, value_name = "L.H,...")]
    pub patch_heads: Option<String>,

    /// Prompt positions to patch with --patch-from: "all" (default), "last", or a list such as
    /// "0,3-5" (generated tokens are never patched)
    #[arg(long, value_name = "SPEC")]
    pub patch_positions: Option<String>,

    /// Continue an interrupted trace of the same -o directory (after Ctrl-C, SIGTERM, SIGKILL or a
    /// power cut) from the last prompt fully on disk. Needs the same model file, options and
    /// prompts; a run that is already complete is left as it is.
    #[arg(long)]
    pub resume: bool,
}

/// A finite f32 (NaN, infinities and values beyond f32's range are refused with the text typed).
fn finite_f32(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(_) => Err(format!("{s} is not a finite number within f32's range")),
        Err(_) => Err(format!("{s} is not a number")),
    }
}

/// Default GPU offload: everything when a GPU backend is compiled in, nothing on CPU builds.
pub fn default_gpu_layers() -> i32 {
    if cfg!(any(feature = "cuda", feature = "metal", feature = "vulkan")) {
        999
    } else {
        0
    }
}

/// Parse `--control-points A-B` into (A, B), checked against the points a control vector can
/// reach: 2..=n_layer (llama.cpp has no slot for layer 0, i.e. point 1).
pub fn parse_control_points(spec: &str, n_layer: usize) -> Result<(usize, usize), String> {
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("--control-points: expected A-B, got \"{spec}\""))?;
    let p = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("--control-points: \"{s}\" is not a point number"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!("--control-points: range {a}-{b} is backwards"));
    }
    if a < 2 || b > n_layer {
        return Err(format!("--control-points: {a}-{b} is outside 2-{n_layer} (a control vector shifts points 2..={n_layer})"));
    }
    Ok((a, b))
}

/// Sorted points as a `--points` spec: "2-10,12".
pub fn format_points(points: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let mut j = i;
        while j + 1 < points.len() && points[j + 1] == points[j] + 1 {
            j += 1;
        }
        out.push(if j > i {
            format!("{}-{}", points[i], points[j])
        } else {
            points[i].to_string()
        });
        i = j + 1;
    }
    out.join(",")
}

/// Parse a `--points` spec against a model with `n_layer` blocks (points 0..=n_layer).
pub fn parse_points(spec: &str, n_layer: usize) -> Result<Vec<usize>, String> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("all") {
        return Ok((0..=n_layer).collect());
    }
    let mut v = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let num = |s: &str| -> Result<usize, String> {
            let s = s.trim();
            if s.eq_ignore_ascii_case("last") {
                return Ok(n_layer);
            }
            s.parse::<usize>()
                .map_err(|_| format!("--points: \"{s}\" is not a point number"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b {
            return Err(format!("--points: range {part} is backwards"));
        }
        if b > n_layer {
            return Err(format!(
                "--points: point {b} is out of range; this model has points 0..={n_layer}"
            ));
        }
        v.extend(a..=b);
    }
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err("--points: no points selected".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_specs() {
        assert_eq!(parse_points("all", 3).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_points("0, 2-3,2", 3).unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_points("last", 30).unwrap(), vec![30]);
        assert!(parse_points("4", 3).unwrap_err().contains("0..=3"));
        assert!(parse_points("x", 3).is_err());
        assert!(parse_points("3-1", 3).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// One grammar: a short letter means one long option in every subcommand, and no subcommand
    /// has a letter twice. (clap checks duplicates only in debug builds; CI tests release.)
    #[test]
    fn a_short_letter_means_one_thing_everywhere() {
        use clap::CommandFactory;
        let mut meaning: std::collections::BTreeMap<char, (String, String)> = Default::default();
        let cli = Cli::command();
        let mut cmds = vec![cli.clone()];
        cmds.extend(cli.get_subcommands().cloned());
        for c in &cmds {
            let mut seen = std::collections::BTreeSet::new();
            for a in c.get_arguments() {
                let Some(short) = a.get_short() else { continue };
                assert!(seen.insert(short), "{}: -{short} twice", c.get_name());
                let long = a.get_long().unwrap_or_default().to_string();
                let (cmd, was) = meaning
                    .entry(short)
                    .or_insert((c.get_name().to_string(), long.clone()));
                assert_eq!(
                    *was,
                    long,
                    "-{short} is --{was} in {cmd} but --{long} in {}",
                    c.get_name()
                );
            }
        }
    }

    /// The model is taken as the first argument or with -m, in every one-model command.
    #[test]
    fn the_model_is_positional_or_dash_m() {
        use clap::Parser;
        for cmd in [
            vec!["trace", "-p", "x", "-o", "r"],
            vec!["patch", "--clean", "a", "--corrupt", "b", "-o", "p.html"],
            vec!["inspect"],
            vec!["quantize", "--type", "q8_0", "-o", "d"],
        ] {
            let mut pos = vec!["gguf-trace", cmd[0], "m.gguf"];
            pos.extend(&cmd[1..]);
            let mut opt = vec!["gguf-trace", cmd[0], "-m", "m.gguf"];
            opt.extend(&cmd[1..]);
            let path = |argv: &[&str]| match Cli::try_parse_from(argv).unwrap().command {
                Command::Trace(a) => a.model.path().to_path_buf(),
                Command::Patch(a) => a.model.path().to_path_buf(),
                Command::Inspect(a) => a.model.path().to_path_buf(),
                Command::Quantize(a) => a.source.path().to_path_buf(),
                _ => unreachable!(),
            };
            assert_eq!(path(&pos), std::path::Path::new("m.gguf"), "{pos:?}");
            assert_eq!(path(&opt), std::path::Path::new("m.gguf"), "{opt:?}");
            let mut both = opt.clone();
            both.insert(2, "n.gguf");
            assert!(Cli::try_parse_from(&both).is_err(), "{both:?}");
            let mut none = vec!["gguf-trace", cmd[0]];
            none.extend(&cmd[1..]);
            assert!(Cli::try_parse_from(&none).is_err(), "{none:?}");
        }
    }
}
