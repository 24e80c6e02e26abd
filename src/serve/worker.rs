//! The engine side of `serve`: one thread owns llama.cpp's decoding. Requests wait in a bounded
//! queue; the worker takes the oldest and every waiting request that can share its batch (the
//! same capture settings and the same interventions: llama.cpp's control vector belongs to the
//! context, so a batch has one), up to `--parallel`, and decodes them as sequences of one batch
//! with the tracer's generation loop. Each generated token goes to its request's channel as it
//! is chosen; a request whose client went away stops at its next token.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::api::{LensReading, StatesMode};
use crate::capture::engine::{GeneratedToken, Positions, PromptTrace, TraceConfig, Tracer};
use crate::capture::taps::Tap;
use crate::commands::trace::{Ablation, Steering};
use crate::llama::context::CacheType;
use crate::llama::gguf::Gguf;
use crate::llama::lens::LensHead;
use crate::llama::model::Model;
use crate::llama::Token;

/// Events a request's client may leave unread before the server gives up on it (a client that
/// stopped reading a stream would otherwise make the server hold its whole answer).
pub const EVENT_BUFFER: usize = 256;

/// A request, resolved against the model: what the worker decodes and what it hands back.
#[derive(Debug, Clone)]
pub struct Spec {
    pub points: Vec<usize>,
    pub positions: Positions,
    pub taps: Vec<Tap>,
    pub lens_k: usize,
    pub states: StatesMode,
    /// Hand each generated token's rows back with its event (streamed inline states).
    pub stream_rows: bool,
    pub steering: Option<Steering>,
    pub ablation: Option<Ablation>,
    /// What `trace` is told for `states: "run"`: the points as `--points` spells them.
    pub points_spec: String,
    /// Uploaded control vectors, deleted when the last holder of the request lets go.
    pub uploads: Vec<Arc<tempfile::TempPath>>,
}

impl Spec {
    /// Requests with equal keys can share a batch: same capture and the same interventions.
    pub fn batch_key(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}",
            self.points,
            self.positions,
            self.taps,
            self.steering
                .as_ref()
                .map(|s| (&s.files, s.scale, &s.points)),
            self.ablation
                .as_ref()
                .map(|a| (&a.file, &a.points, &a.direction)),
        )
    }
}

pub struct Job {
    pub id: String,
    pub tokens: Vec<Token>,
    pub max_tokens: usize,
    pub spec: Spec,
    pub key: String,
    pub events: Sender<Event>,
    /// What `states: "run"` traces: the prompt as the model reads it (rendered).
    pub rendered: String,
}

/// Why a request's generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended it (an end-of-generation token).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The server is shutting down.
    Cancelled,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

pub enum Event {
    /// The request's batch is set up (its interventions accepted): tokens follow.
    Started,
    Token {
        id: Token,
        /// New text (whole characters only: a piece that ends inside a UTF-8 character waits
        /// for the next).
        text: String,
        lens: Option<Vec<LensReading>>,
        /// The kept points' rows that chose this token (`[n_points, n_embd]`), when streamed.
        rows: Option<Vec<f32>>,
    },
    Done(Box<Finished>),
    Error {
        status: u16,
        message: String,
    },
}

pub struct Finished {
    pub trace: PromptTrace,
    pub text: String,
    /// The text not streamed yet (a character the last token left unfinished).
    pub tail: String,
    pub finish: Finish,
    pub lens: Vec<Vec<LensReading>>,
    pub run: Option<String>,
    pub points: Vec<usize>,
    pub tap_names: Vec<String>,
    /// The request asked for its states inline.
    pub states_inline: bool,
}

/// The bounded queue between the HTTP side and the worker.
pub struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic elsewhere cannot leave the queue half-changed (every change is one call).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job; false (the job dropped) when the queue is full or closed.
    pub fn push(&self, job: Job) -> bool {
        let mut s = self.lock();
        // Clients that left while waiting give their places back.
        s.jobs.retain(|j| !j.events.is_closed());
        if s.closed || s.jobs.len() >= self.capacity {
            return false;
        }
        s.jobs.push_back(job);
        self.ready.notify_one();
        true
    }

    pub fn waiting(&self) -> usize {
        self.lock()
            .jobs
            .iter()
            .filter(|j| !j.events.is_closed())
            .count()
    }

    /// Refuse new jobs and tell waiting ones the server is going away.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        for j in s.jobs.drain(..) {
            let _ = j.events.try_send(Event::Error {
                status: 503,
                message: "the server is shutting down".into(),
            });
        }
        self.ready.notify_all();
    }

    /// The oldest job and every waiting job that can share its batch, up to `max`; None once
    /// the queue is closed. Jobs whose client already left are dropped here.
    fn take_group(&self, max: usize) -> Option<Vec<Job>> {
        let mut s = self.lock();
        loop {
            s.jobs.retain(|j| !j.events.is_closed());
            if let Some(first) = s.jobs.pop_front() {
                let mut group = vec![first];
                let mut i = 0;
                while i < s.jobs.len() && group.len() < max {
                    if s.jobs[i].key == group[0].key {
                        group.push(s.jobs.remove(i).expect("index in range"));
                    } else {
                        i += 1;
                    }
                }
                return Some(group);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What the worker has done, for `/health`.
#[derive(Default)]
pub struct Stats {
    /// Requests being decoded now.
    pub decoding: AtomicUsize,
    /// Tokens generated since the server started.
    pub generated: AtomicU64,
    /// Requests answered (whole), and those whose client left before the end.
    pub served: AtomicU64,
    pub abandoned: AtomicU64,
    /// The most requests decoded together so far.
    pub largest_batch: AtomicUsize,
}

/// What the worker needs besides the model.
pub struct WorkerSettings {
    pub model_path: PathBuf,
    pub ctx: usize,
    pub parallel: usize,
    pub threads: i32,
    /// Where `states: "run"` directories go.
    pub runs: PathBuf,
    /// Set at shutdown once in-flight requests had their time: every generation stops.
    pub cancel: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
}

/// Incremental detokenization that never splits a UTF-8 character.
struct TextStream {
    tokens: Vec<Token>,
    sent: usize,
}

impl TextStream {
    fn push(&mut self, model: &Model, t: Token) -> String {
        self.tokens.push(t);
        let text = model.detokenize(&self.tokens, false);
        // A piece ending inside a character renders as U+FFFD until the rest arrives.
        if text.ends_with('\u{FFFD}') || text.len() < self.sent || !text.is_char_boundary(self.sent)
        {
            return String::new();
        }
        let new = text[self.sent..].to_string();
        self.sent = text.len();
        new
    }
}

/// The worker thread's loop: until the queue closes, decode groups of jobs.
pub fn run(model: Arc<Model>, settings: WorkerSettings, queue: Arc<Queue>) {
    let mut lens: Option<Result<LensHead, String>> = None;
    while let Some(group) = queue.take_group(settings.parallel) {
        let wants_lens = group.iter().any(|j| j.spec.lens_k > 0);
        if wants_lens && lens.is_none() {
            lens = Some(
                Gguf::open(&settings.model_path)
                    .map_err(|e| e.to_string())
                    .and_then(|g| {
                        LensHead::load(&settings.model_path, &g, settings.threads)
                            .map_err(|e| e.to_string())
                    }),
            );
        }
        let head = match (&lens, wants_lens) {
            (Some(Ok(h)), true) => Some(h),
            (Some(Err(e)), true) => {
                for j in &group {
                    let _ = j.events.try_send(Event::Error {
                        status: 400,
                        message: format!(
                            "lens_top_k: this model's logit-lens head cannot be read: {e}"
                        ),
                    });
                }
                continue;
            }
            _ => None,
        };
        let n = group.len();
        settings.stats.decoding.fetch_add(n, Ordering::SeqCst);
        settings.stats.largest_batch.fetch_max(n, Ordering::SeqCst);
        // A bug must not take the decoding thread down with it (every later request would wait
        // forever): the group's requests are dropped (their clients get a 500) and serving goes on.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_group(&model, &settings, group, head)
        }));
        if served.is_err() {
            eprintln!(
                "error: an internal error ended {n} request(s) (the panic above); serving goes on"
            );
        }
        settings.stats.decoding.fetch_sub(n, Ordering::SeqCst);
    }
}

fn fail(group: &[Job], status: u16, message: String) {
    for j in group {
        let _ = j.events.try_send(Event::Error {
            status,
            message: message.clone(),
        });
    }
}

/// Decode one group of jobs that share capture settings and interventions.
fn serve_group(model: &Model, settings: &WorkerSettings, group: Vec<Job>, head: Option<&LensHead>) {
    let spec = group[0].spec.clone();
    let generate = group.iter().map(|j| j.max_tokens).max().unwrap_or(0);
    let n_seq = group.len();
    // The KV cache holds ctx × n_seq cells and llama.cpp clears it when the context is made:
    // size it to what this group needs (in 256-token steps), not to --ctx.
    let need = group
        .iter()
        .map(|j| j.tokens.len() + j.max_tokens)
        .max()
        .unwrap_or(1);
    let ctx = need
        .div_ceil(256)
        .saturating_mul(256)
        .min(settings.ctx)
        .max(need);
    let cfg = TraceConfig {
        positions: spec.positions,
        points: spec.points.clone(),
        generate,
        ctx,
        n_seq,
        n_batch: 512.max(n_seq),
        n_ubatch: 512.max(n_seq),
        threads: settings.threads,
        allow_nonfinite: false,
        cache_type: CacheType::F16,
        taps: spec.taps.clone(),
        no_flash_attn: false,
        heads: None,
    };
    let prompts: Vec<Vec<Token>> = group.iter().map(|j| j.tokens.clone()).collect();
    let mut tracer = match Tracer::new(model, cfg) {
        Ok(t) => t,
        Err(e) => return fail(&group, 500, e.to_string()),
    };
    // The request's own interventions, set up exactly as `trace` sets them up.
    let steered = match crate::commands::trace::steer(&mut tracer, spec.steering.as_ref(), model) {
        Ok(s) => s,
        Err(e) => return fail(&group, 400, format!("trace.steer: {e:#}")),
    };
    let ablated = match crate::commands::trace::ablate(&mut tracer, spec.ablation.as_ref(), model) {
        Ok((points, _)) => points,
        Err(e) => return fail(&group, 400, format!("trace.ablate: {e:#}")),
    };
    if let Some((a, b)) = steered {
        if let Some(p) = ablated.iter().find(|&&p| (a..=b).contains(&p)) {
            // As `trace` refuses it: llama.cpp adds the control vector before the point is
            // named, so the ablation would remove the steering's own component there.
            return fail(
                &group,
                400,
                format!("point {p} is both steered (trace.steer.points {a}-{b}) and ablated: choose one intervention per point (trace.ablate.points)"),
            );
        }
    }
    let tap_infos = match tracer.identify(&prompts) {
        Ok(t) => t,
        Err(e) => return fail(&group, 400, format!("trace.taps: {e}")),
    };
    for j in &group {
        let _ = j.events.try_send(Event::Started);
    }
    let mut streams: Vec<TextStream> = group
        .iter()
        .map(|_| TextStream {
            tokens: Vec::new(),
            sent: 0,
        })
        .collect();
    let mut lens_log: Vec<Vec<Vec<LensReading>>> = vec![Vec::new(); group.len()];
    let mut finish = vec![Finish::Stop; group.len()];
    let n_embd = model.n_embd();
    let mut lens_error: Option<String> = None;
    let mut left = vec![false; group.len()];
    let mut stalled = vec![false; group.len()];
    let mut on_token = |g: GeneratedToken| -> bool {
        let j = &group[g.index];
        if settings.cancel.load(Ordering::Relaxed) {
            finish[g.index] = Finish::Cancelled;
            return false;
        }
        if g.n_generated >= j.max_tokens {
            finish[g.index] = Finish::Length;
            return false;
        }
        if j.events.is_closed() {
            if !left[g.index] {
                left[g.index] = true;
                eprintln!(
                    "request {}: the client left after {} token(s); its generation stopped",
                    j.id, g.n_generated
                );
                settings.stats.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        settings.stats.generated.fetch_add(1, Ordering::Relaxed);
        let lens = match head {
            Some(h) if j.spec.lens_k > 0 => {
                let x: Vec<f32> = g.rows.concat();
                match h.logits(&x, g.rows.len()) {
                    Ok(l) => {
                        let nv = h.n_vocab();
                        let readings: Vec<LensReading> = j
                            .spec
                            .points
                            .iter()
                            .enumerate()
                            .map(|(k, &point)| LensReading {
                                point,
                                top: crate::answer::top_k(
                                    &l[k * nv..(k + 1) * nv],
                                    j.spec.lens_k,
                                    |id| model.token_piece(id),
                                ),
                            })
                            .collect();
                        lens_log[g.index].push(readings.clone());
                        Some(readings)
                    }
                    Err(e) => {
                        lens_error = Some(e.to_string());
                        return false;
                    }
                }
            }
            _ => None,
        };
        let rows = j.spec.stream_rows.then(|| {
            let mut v = Vec::with_capacity(g.rows.len() * n_embd);
            for r in &g.rows {
                v.extend_from_slice(r);
            }
            v
        });
        let text = streams[g.index].push(model, g.token);
        match j.events.try_send(Event::Token {
            id: g.token,
            text,
            lens,
            rows,
        }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                // The client stopped reading: its answer would pile up here.
                eprintln!(
                    "request {}: the client left {EVENT_BUFFER} tokens unread; its generation stopped",
                    j.id
                );
                settings.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                stalled[g.index] = true;
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    };
    let mut done: Vec<Option<PromptTrace>> = (0..group.len()).map(|_| None).collect();
    let result = tracer.trace_streaming(
        &prompts,
        |t| {
            let i = t.index;
            done[i] = Some(t);
            Ok(())
        },
        |_| {},
        &mut on_token,
    );
    drop(tracer);
    if let Some(e) = lens_error {
        return fail(&group, 500, format!("logit lens: {e}"));
    }
    if let Err(e) = result {
        return match e {
            // The request's own steering or ablation broke the arithmetic: its mistake.
            crate::capture::engine::TraceError::NonFinite { what, point, position, .. } => fail(
                &group,
                400,
                format!("the {what} at point {point}, position {position} became NaN or infinite (or beyond f32's range) under this request's steering or ablation; lower trace.steer.scale"),
            ),
            e => fail(&group, 500, e.to_string()),
        };
    }
    let tap_names: Vec<String> = tap_infos.iter().map(|t| t.tap.to_string()).collect();
    for (i, j) in group.iter().enumerate() {
        let Some(t) = done[i].take() else {
            let _ = j.events.try_send(Event::Error {
                status: 500,
                message: "the tracer handed back no states for this request".into(),
            });
            continue;
        };
        if j.events.is_closed() || stalled[i] {
            continue;
        }
        let text = model.detokenize(t.generated(), false);
        let sent = streams[i].sent;
        let tail = if text.is_char_boundary(sent) && sent <= text.len() {
            text[sent..].to_string()
        } else {
            String::new()
        };
        if finish[i] == Finish::Stop && t.generated().len() >= j.max_tokens {
            finish[i] = Finish::Length;
        }
        let run = if j.spec.states == StatesMode::Run {
            match write_run(settings, j, t.generated().len()) {
                Ok(id) => Some(id),
                Err(e) => {
                    let _ = j.events.try_send(Event::Error {
                        status: 500,
                        message: format!("writing the run: {e:#}"),
                    });
                    continue;
                }
            }
        } else {
            None
        };
        settings.stats.served.fetch_add(1, Ordering::Relaxed);
        let _ = j.events.try_send(Event::Done(Box::new(Finished {
            trace: t,
            text,
            tail,
            finish: finish[i],
            lens: std::mem::take(&mut lens_log[i]),
            run,
            points: j.spec.points.clone(),
            tap_names: tap_names.clone(),
            states_inline: j.spec.states == StatesMode::Inline,
        })));
    }
}

/// `states: "run"`: the request traced by `trace` itself (same engine, options, prompt and
/// number of generated tokens) into `<runs>/<id>`, a normal run directory.
fn write_run(settings: &WorkerSettings, j: &Job, n_generated: usize) -> anyhow::Result<String> {
    use crate::commands::trace::TraceOptions;
    let out = settings.runs.join(&j.id);
    let input = crate::cli::PromptArgs {
        prompts: vec![j.rendered.clone()],
        files: Vec::new(),
        chat: false,
        system: None,
    };
    let mut opts = TraceOptions::new(settings.model_path.clone(), input, out);
    opts.quiet = true;
    opts.capture.points = j.spec.points_spec.clone();
    opts.capture.positions = j.spec.positions;
    opts.capture.taps = j.spec.taps.clone();
    opts.capture.generate = n_generated;
    opts.capture.ctx = settings.ctx;
    opts.capture.threads = Some(settings.threads);
    opts.steering = j.spec.steering.clone();
    opts.ablation = j.spec.ablation.clone();
    opts.capture.validate()?;
    crate::commands::trace::trace(&opts)?;
    Ok(j.id.clone())
}

/// Whether this model, on this backend, computes a request decoded among others exactly as
/// alone: four prompts of different lengths (past the first global-attention blocks and a
/// micro-batch boundary), each traced alone and all four together with a few generated tokens,
/// compared bit for bit at every point. llama.cpp's CPU kernels depend on the batch shape for
/// some models (Gemma-3 here), and then `serve` decodes one request at a time.
pub fn batch_invariant(model: &Model, threads: i32) -> Result<bool, String> {
    const PROBES: [&str; 4] = [
        "The quick brown fox jumps over the lazy dog because it was in a hurry to get home before the rain",
        "def fibonacci(n):\n    if n < 2:\n        return n",
        "Water boils at",
        "Once upon a time, in a kingdom by the sea, there lived a princess who",
    ];
    let prompts: Vec<Vec<Token>> = PROBES
        .iter()
        .map(|p| crate::chat::tokenize_prompt(model, p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let run = |n_seq: usize, prompts: &[Vec<Token>]| -> Result<Vec<PromptTrace>, String> {
        let mut cfg = TraceConfig::new(model);
        cfg.positions = Positions::Last;
        cfg.generate = 4;
        cfg.ctx = 256;
        cfg.n_seq = n_seq;
        cfg.threads = threads;
        let mut tracer = Tracer::new(model, cfg).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        tracer
            .trace(
                prompts,
                |t| {
                    out.push(t);
                    Ok(())
                },
                |_| {},
            )
            .map_err(|e| e.to_string())?;
        Ok(out)
    };
    let together = run(prompts.len(), &prompts)?;
    for (i, p) in prompts.iter().enumerate() {
        let alone = run(1, std::slice::from_ref(p))?;
        let (a, b) = (&alone[0], &together[i]);
        if a.tokens != b.tokens
            || a.states.shape() != b.states.shape()
            || a.states
                .iter()
                .zip(&b.states)
                .any(|(x, y)| x.to_bits() != y.to_bits())
        {
            return Ok(false);
        }
    }
    Ok(true)
}
