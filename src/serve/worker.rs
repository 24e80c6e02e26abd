//! The engine side of `serve`: one thread owns llama.cpp's decoding. Requests wait in a bounded
//! queue, served in order. The request at the front gets a tracer made for its settings (capture
//! and interventions: llama.cpp's control vector belongs to the context), and every following
//! request with the same settings joins that tracer's batch as slots free up (continuous
//! batching, `Tracer::serve`), up to `--parallel` at once; a request with other settings waits
//! until the batch drains. Each generated token goes to its request's channel as it is chosen; a
//! request whose client went away, or stopped reading, stops at its next token.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::api::{LensReading, StatesMode};
use crate::capture::engine::{
    Admission, GeneratedToken, Joining, Positions, PromptTrace, TraceConfig, TraceError, Tracer,
};
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

impl Job {
    /// KV cells the request may fill: its prompt and every token it may generate.
    pub fn cells(&self) -> usize {
        self.tokens.len() + self.max_tokens
    }
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

    /// Jobs at the front of the queue that can share a batch with `key` (any key: the front
    /// job's), up to `max`; with `wait`, waits for one. `Other` when the front job needs
    /// another batch (it keeps its place: requests are served in order), `Closed` at shutdown.
    /// Jobs whose client already left are dropped here.
    fn take_front(&self, key: Option<&str>, max: usize, wait: bool, cells: usize) -> Admit {
        let mut s = self.lock();
        loop {
            s.jobs.retain(|j| !j.events.is_closed());
            if let Some(front) = s.jobs.front() {
                let key = key.unwrap_or(&front.key).to_string();
                if front.key != key {
                    return Admit::Other;
                }
                // Jobs join while their prompt and budget fit the KV cells left (the next one
                // waits, in order, until the batch drains and the cache is cleared).
                let mut out = Vec::new();
                let mut left = cells;
                while out.len() < max {
                    match s.jobs.front() {
                        Some(j) if j.key == key && j.cells() <= left => {
                            left -= j.cells();
                            out.extend(s.jobs.pop_front());
                        }
                        _ => break,
                    }
                }
                return Admit::Jobs(out);
            }
            if s.closed {
                return Admit::Closed;
            }
            if !wait {
                return Admit::Jobs(Vec::new());
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What [`Queue::take_front`] found.
enum Admit {
    Jobs(Vec<Job>),
    Other,
    Closed,
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

/// The worker thread's loop: until the queue closes, serve the request at the front with a
/// tracer made for its settings, which every following request with the same settings joins
/// (continuous batching), until one with other settings is at the front.
pub fn run(model: Arc<Model>, settings: WorkerSettings, queue: Arc<Queue>) {
    let mut lens: Option<Result<LensHead, String>> = None;
    loop {
        let first = match queue.take_front(None, settings.parallel, true, usize::MAX) {
            Admit::Jobs(j) if !j.is_empty() => j,
            Admit::Jobs(_) | Admit::Other => continue,
            Admit::Closed => break,
        };
        // A bug must not take the decoding thread down with it (every later request would wait
        // forever): the batch's requests are dropped (their clients get a 500), serving goes on.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_batch(&model, &settings, &queue, first, &mut lens)
        }));
        if served.is_err() {
            settings.stats.decoding.store(0, Ordering::SeqCst);
            eprintln!("error: an internal error ended the requests being decoded (the panic above); serving goes on");
        }
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

/// A request being decoded.
struct Live {
    job: Job,
    stream: TextStream,
    lens: Vec<Vec<LensReading>>,
    finish: Finish,
    /// Its client went away (disconnected, or stopped reading).
    gone: bool,
}

/// Serve `first` and every request that joins it (same settings) until none is left.
fn serve_batch(
    model: &Model,
    settings: &WorkerSettings,
    queue: &Queue,
    first: Vec<Job>,
    lens: &mut Option<Result<LensHead, String>>,
) {
    let spec = first[0].spec.clone();
    let key = first[0].key.clone();
    let cfg = TraceConfig {
        positions: spec.positions,
        points: spec.points.clone(),
        // Unused by `serve`: each request's max_tokens ends it.
        generate: 0,
        ctx: settings.ctx,
        // One more sequence id than requests: it keeps the cells of requests that left.
        n_seq: settings.parallel + 1,
        n_batch: 512.max(settings.parallel + 1),
        n_ubatch: 512.max(settings.parallel + 1),
        threads: settings.threads,
        allow_nonfinite: false,
        cache_type: CacheType::F16,
        taps: spec.taps.clone(),
        no_flash_attn: false,
        heads: None,
    };
    let mut tracer = match Tracer::new(model, cfg) {
        Ok(t) => t,
        Err(e) => return fail(&first, 500, e.to_string()),
    };
    // The request's own interventions, set up exactly as `trace` sets them up.
    let steered = match crate::commands::trace::steer(&mut tracer, spec.steering.as_ref(), model) {
        Ok(s) => s,
        Err(e) => return fail(&first, 400, format!("trace.steer: {e:#}")),
    };
    let ablated = match crate::commands::trace::ablate(&mut tracer, spec.ablation.as_ref(), model) {
        Ok((points, _)) => points,
        Err(e) => return fail(&first, 400, format!("trace.ablate: {e:#}")),
    };
    if let Some((a, b)) = steered {
        if let Some(p) = ablated.iter().find(|&&p| (a..=b).contains(&p)) {
            // As `trace` refuses it: llama.cpp adds the control vector before the point is
            // named, so the ablation would remove the steering's own component there.
            return fail(
                &first,
                400,
                format!("point {p} is both steered (trace.steer.points {a}-{b}) and ablated: choose one intervention per point (trace.ablate.points)"),
            );
        }
    }
    let tap_infos = match tracer.identify(&[first[0].tokens.clone()]) {
        Ok(t) => t,
        Err(e) => return fail(&first, 400, format!("trace.taps: {e}")),
    };
    let tap_names: Vec<String> = tap_infos.iter().map(|t| t.tap.to_string()).collect();
    let stats = &settings.stats;
    let live: RefCell<HashMap<usize, Live>> = RefCell::new(HashMap::new());
    let mut pending = Some(first);
    let mut next_index = 0usize;
    let mut admit = |a: Admission| -> Option<Vec<Joining>> {
        let jobs = match pending.take() {
            Some(j) => j,
            None => match queue.take_front(Some(&key), a.free, a.idle, a.cells) {
                Admit::Jobs(j) => j,
                Admit::Other | Admit::Closed => return None,
            },
        };
        let mut out = Vec::new();
        let mut live = live.borrow_mut();
        for job in jobs {
            if job.events.try_send(Event::Started).is_err() {
                continue;
            }
            next_index += 1;
            out.push(Joining {
                index: next_index,
                tokens: job.tokens.clone(),
                budget: job.max_tokens,
            });
            live.insert(
                next_index,
                Live {
                    job,
                    stream: TextStream {
                        tokens: Vec::new(),
                        sent: 0,
                    },
                    lens: Vec::new(),
                    finish: Finish::Stop,
                    gone: false,
                },
            );
        }
        let n = stats.decoding.fetch_add(out.len(), Ordering::SeqCst) + out.len();
        stats.largest_batch.fetch_max(n, Ordering::SeqCst);
        Some(out)
    };
    let n_embd = model.n_embd();
    let mut on_token = |g: GeneratedToken| -> bool {
        let mut map = live.borrow_mut();
        let Some(l) = map.get_mut(&g.index) else {
            return false;
        };
        let j = &l.job;
        if settings.cancel.load(Ordering::Relaxed) {
            l.finish = Finish::Cancelled;
            return false;
        }
        if g.n_generated >= j.max_tokens {
            l.finish = Finish::Length;
            return false;
        }
        if j.events.is_closed() {
            l.gone = true;
            eprintln!(
                "request {}: the client left after {} token(s); its generation stopped",
                j.id, g.n_generated
            );
            stats.abandoned.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        stats.generated.fetch_add(1, Ordering::Relaxed);
        let readings = if j.spec.lens_k > 0 {
            let head = lens.get_or_insert_with(|| {
                Gguf::open(&settings.model_path)
                    .map_err(|e| e.to_string())
                    .and_then(|g| {
                        LensHead::load(&settings.model_path, &g, settings.threads)
                            .map_err(|e| e.to_string())
                    })
            });
            let result = match head {
                Ok(h) => {
                    let nv = h.n_vocab();
                    h.logits(&g.rows.concat(), g.rows.len())
                        .map(|logits| {
                            j.spec
                                .points
                                .iter()
                                .enumerate()
                                .map(|(k, &point)| LensReading {
                                    point,
                                    top: crate::answer::top_k(
                                        &logits[k * nv..(k + 1) * nv],
                                        j.spec.lens_k,
                                        |id| model.token_piece(id),
                                    ),
                                })
                                .collect::<Vec<_>>()
                        })
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("this model's logit-lens head cannot be read: {e}")),
            };
            match result {
                Ok(r) => {
                    l.lens.push(r.clone());
                    Some(r)
                }
                Err(e) => {
                    let _ = j.events.try_send(Event::Error {
                        status: 500,
                        message: format!("logit lens: {e}"),
                    });
                    l.gone = true;
                    return false;
                }
            }
        } else {
            None
        };
        let rows = j.spec.stream_rows.then(|| {
            let mut v = Vec::with_capacity(g.rows.len() * n_embd);
            for r in &g.rows {
                v.extend_from_slice(r);
            }
            v
        });
        let text = l.stream.push(model, g.token);
        match j.events.try_send(Event::Token {
            id: g.token,
            text,
            lens: readings,
            rows,
        }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                // The client stopped reading: its answer would pile up here.
                eprintln!(
                    "request {}: the client left {EVENT_BUFFER} tokens unread; its generation stopped",
                    j.id
                );
                stats.abandoned.fetch_add(1, Ordering::Relaxed);
                l.gone = true;
                false
            }
            Err(TrySendError::Closed(_)) => {
                l.gone = true;
                false
            }
        }
    };
    let mut done = |t: PromptTrace| {
        let Some(mut l) = live.borrow_mut().remove(&t.index) else {
            return;
        };
        stats.decoding.fetch_sub(1, Ordering::SeqCst);
        if l.gone || l.job.events.is_closed() {
            return;
        }
        let j = &l.job;
        let text = model.detokenize(t.generated(), false);
        if l.finish == Finish::Stop && t.generated().len() >= j.max_tokens {
            l.finish = Finish::Length;
        }
        let sent = l.stream.sent;
        let tail = if sent <= text.len() && text.is_char_boundary(sent) {
            text[sent..].to_string()
        } else {
            String::new()
        };
        let run = if j.spec.states == StatesMode::Run {
            match write_run(settings, j, t.generated().len()) {
                Ok(id) => Some(id),
                Err(e) => {
                    let _ = j.events.try_send(Event::Error {
                        status: 500,
                        message: format!("writing the run: {e:#}"),
                    });
                    return;
                }
            }
        } else {
            None
        };
        stats.served.fetch_add(1, Ordering::Relaxed);
        let _ = j.events.try_send(Event::Done(Box::new(Finished {
            trace: t,
            text,
            tail,
            finish: l.finish,
            lens: std::mem::take(&mut l.lens),
            run,
            points: j.spec.points.clone(),
            tap_names: tap_names.clone(),
            states_inline: j.spec.states == StatesMode::Inline,
        })));
    };
    let result = tracer.serve(&mut admit, &mut on_token, &mut done);
    drop(tracer);
    // What is still live when the tracer stops with an error gets that error.
    let left: Vec<(usize, Live)> = live.into_inner().into_iter().collect();
    stats.decoding.fetch_sub(left.len(), Ordering::SeqCst);
    if let Err(e) = result {
        let nonfinite = match &e {
            TraceError::NonFinite {
                index,
                what,
                point,
                position,
            } => Some((*index, *what, *point, *position)),
            _ => None,
        };
        for (index, l) in &left {
            let (status, message) = match nonfinite {
                // The request's own steering or ablation broke the arithmetic: its mistake.
                Some((culprit, what, point, position)) if culprit == *index => (
                    400,
                    format!("the {what} at point {point}, position {position} became NaN or infinite (or beyond f32's range) under this request's steering or ablation; lower trace.steer.scale"),
                ),
                Some(_) => (
                    503,
                    "another request decoded in the same batch failed; retry".to_string(),
                ),
                None => (500, e.to_string()),
            };
            let _ = l.job.events.try_send(Event::Error { status, message });
        }
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
/// alone, along the path `serve` takes: four prompts of different lengths (past the first
/// global-attention blocks and a micro-batch boundary) served two at a time by continuous
/// batching — one ends early and the next joins into its freed slot while the other generates —
/// each compared bit for bit, at every point, with the same prompt traced alone. llama.cpp's CPU
/// kernels depend on the batch shape for some models (Gemma-3 here), and then `serve` decodes
/// one request at a time.
pub fn batch_invariant(model: &Model, threads: i32, ctx: usize) -> Result<bool, String> {
    const PROBES: [(&str, usize); 4] = [
        ("The quick brown fox jumps over the lazy dog because it was in a hurry to get home before the rain", 2),
        ("def fibonacci(n):\n    if n < 2:\n        return n", 6),
        ("Water boils at", 4),
        ("Once upon a time, in a kingdom by the sea, there lived a princess who", 3),
    ];
    let prompts: Vec<Vec<Token>> = PROBES
        .iter()
        .map(|(p, _)| crate::chat::tokenize_prompt(model, p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let config = |n_seq: usize, generate: usize| {
        let mut cfg = TraceConfig::new(model);
        cfg.positions = Positions::Last;
        cfg.generate = generate;
        cfg.ctx = ctx;
        cfg.n_seq = n_seq;
        cfg.threads = threads;
        cfg
    };
    let mut served: HashMap<usize, PromptTrace> = HashMap::new();
    {
        let mut tracer = Tracer::new(model, config(3, 0)).map_err(|e| e.to_string())?;
        let mut next = 0;
        let mut admit = |a: Admission| -> Option<Vec<Joining>> {
            let take: Vec<Joining> = (next..prompts.len())
                .take(a.free)
                .map(|i| Joining {
                    index: i,
                    tokens: prompts[i].clone(),
                    budget: PROBES[i].1,
                })
                .collect();
            next += take.len();
            (!take.is_empty()).then_some(take)
        };
        let mut on_token = |g: GeneratedToken| g.n_generated < PROBES[g.index].1;
        let mut done = |t: PromptTrace| {
            served.insert(t.index, t);
        };
        tracer
            .serve(&mut admit, &mut on_token, &mut done)
            .map_err(|e| e.to_string())?;
    }
    for (i, p) in prompts.iter().enumerate() {
        let mut tracer = Tracer::new(model, config(1, PROBES[i].1)).map_err(|e| e.to_string())?;
        let mut alone = Vec::new();
        tracer
            .trace(
                std::slice::from_ref(p),
                |t| {
                    alone.push(t);
                    Ok(())
                },
                |_| {},
            )
            .map_err(|e| e.to_string())?;
        let (a, b) = (&alone[0], served.get(&i).ok_or("a probe was not served")?);
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
