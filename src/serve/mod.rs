//! `gguf-trace serve`: an OpenAI-compatible HTTP server (axum on tokio) that generates like
//! llama-server and hands back, per request, what each generated token looked like inside
//! (the `"trace"` extension, see [`api::TraceExt`]), with that request's own steering and
//! ablation, plus a live page at `/`.
//!
//! - `api.rs`: request and response bodies.
//! - `worker.rs`: the one thread that decodes (batches of requests that share settings).
//! - `page.html`: the live page (plotly.js inlined, as in the reports: no CDN).

pub mod api;
pub mod worker;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use self::api::*;
use self::worker::{Event, Finished, Job, Queue, Spec, WorkerSettings};
use crate::capture::engine::Positions;
use crate::capture::taps::Tap;
use crate::cli::{parse_points, ServeArgs};
use crate::commands::trace::{Ablation, Steering};
use crate::llama::model::{LoadOptions, Model};

const PAGE: &str = include_str!("page.html");

/// Everything a handler needs.
struct App {
    model: Arc<Model>,
    name: String,
    queue: Arc<Queue>,
    api_key: Option<String>,
    stats: Arc<worker::Stats>,
    /// Requests decoded together at most, and whether that is bit-exact (measured at start).
    parallel: usize,
    batched_exactly: bool,
    ctx: usize,
    max_tokens: usize,
    vectors: Option<PathBuf>,
    runs: PathBuf,
    /// Uploaded control vectors live here until the server exits.
    uploads: tempfile::TempDir,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    created: u64,
    page: String,
}

type Shared = Arc<App>;

/// An error answered as JSON: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            503 => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind,
                code: self.status.as_u16(),
            },
        };
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A JSON body that could not be read: say what to fix.
fn rejection(e: JsonRejection) -> ApiError {
    let status = e.status();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is larger than the server's --max-body".to_string()
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "send the body as JSON with the header Content-Type: application/json".to_string()
        }
        _ => e.body_text(),
    };
    ApiError { status, message }
}

pub fn run(args: &ServeArgs, out: &mut dyn std::io::Write) -> Result<()> {
    if args.parallel == 0 || args.parallel > 64 {
        bail!("--parallel {}: between 1 and 64 requests", args.parallel);
    }
    if !(args.shutdown_timeout.is_finite() && (0.0..=3600.0).contains(&args.shutdown_timeout)) {
        bail!(
            "--shutdown-timeout {}: between 0 and 3600 seconds",
            args.shutdown_timeout
        );
    }
    if args.max_body < 1024 {
        bail!("--max-body {}: at least 1024 bytes", args.max_body);
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens 0: a request generates at least one token");
    }
    if args.queue == 0 {
        bail!("--queue 0: at least one request must be able to wait");
    }
    if args.ctx == 0 || args.ctx > crate::settings::MAX_CTX {
        bail!(
            "--ctx {}: must be between 1 and {}",
            args.ctx,
            crate::settings::MAX_CTX
        );
    }
    if let Some(d) = &args.vectors {
        if !d.is_dir() {
            bail!("--vectors {}: not a folder", d.display());
        }
    }
    let threads = crate::commands::resolve_threads(args.threads)?;
    // Listen before loading: a port in use or a bad address is said at once.
    let addr = format!("{}:{}", args.host, args.port);
    let std_listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let path = args.model.path().to_path_buf();
    let model = Arc::new(crate::commands::load_model(&path, LoadOptions::default())?);
    if let Some(why) = crate::capture::arch::untraceable_reason(&model) {
        bail!("{}: cannot be traced: {why}", path.display());
    }
    let (runs, _runs_tmp) = match &args.runs {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("--runs {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("gguf-trace-serve-runs-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // Several requests share a batch only where that changes no bit of any of them.
    let mut parallel = args.parallel;
    let mut batched_exactly = true;
    if parallel > 1 {
        batched_exactly = worker::batch_invariant(&model, threads, args.ctx)
            .map_err(|e| anyhow::anyhow!("{}: the start-up decode failed: {e}", path.display()))?;
        if !batched_exactly {
            if args.allow_batch_drift {
                eprintln!("note: on this backend, llama.cpp's results for this model depend on which requests share a batch (measured at start): answers decoded together may differ in the last bits, or a near-tie token, from the same request alone (--allow-batch-drift)");
            } else {
                eprintln!("note: on this backend, llama.cpp's results for this model depend on which requests share a batch (measured at start), so requests are decoded one at a time: each answer is what the request gets alone. --allow-batch-drift decodes up to --parallel together anyway");
                parallel = 1;
            }
        }
    }
    // Requests are taken in batches from the queue: --parallel of them plus --queue may wait.
    let queue = Arc::new(Queue::new(parallel + args.queue));
    let cancel = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(worker::Stats::default());
    let settings = WorkerSettings {
        stats: stats.clone(),
        model_path: path.clone(),
        ctx: args.ctx,
        parallel,
        threads,
        runs: runs.clone(),
        cancel: cancel.clone(),
    };
    let worker = {
        let (m, q) = (model.clone(), queue.clone());
        std::thread::Builder::new()
            .name("gguf-trace-decode".into())
            .spawn(move || worker::run(m, settings, q))?
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let page = PAGE
        .replace("{{PLOTLY}}", &crate::report::page::plotly_script())
        .replace("{{MODEL}}", &html_escape(&name));
    let app = Arc::new(App {
        model,
        name,
        queue: queue.clone(),
        api_key: args.api_key.clone(),
        stats,
        parallel,
        batched_exactly,
        ctx: args.ctx,
        max_tokens: args.max_tokens,
        vectors: args.vectors.clone(),
        runs,
        uploads: tempfile::Builder::new()
            .prefix("gguf-trace-serve-vectors-")
            .tempdir()?,
        next_id: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        page,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let grace = Duration::from_secs_f64(args.shutdown_timeout);
    let result: Result<()> = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        writeln!(
            out,
            "serving {} on http://{local}/ (OpenAI API under /v1; {} request(s) decoded together, {} may wait){}",
            app.name,
            parallel,
            args.queue,
            if app.api_key.is_some() { "; every route but /health needs the API key" } else { "" }
        )?;
        out.flush()?;
        let router = router(app.clone(), args.max_body);
        let app2 = app.clone();
        let cancel2 = cancel.clone();
        let shutdown = async move {
            wait_for_signal().await;
            eprintln!(
                "shutting down: no new requests; in-flight ones have {:.0} s to finish",
                grace.as_secs_f64()
            );
            app2.shutting_down.store(true, Ordering::SeqCst);
            app2.queue.close();
            // In-flight generations get the grace period, then stop at their next token.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                cancel2.store(true, Ordering::SeqCst);
                // Connections that still do not close (a client that stopped reading) do not
                // hold the process: a last bound.
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!("shutdown: connections still open after the grace period; exiting");
                std::process::exit(0);
            });
        };
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving")?;
        Ok(())
    });
    queue.close();
    cancel.store(true, Ordering::SeqCst);
    let _ = worker.join();
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(app: Shared, max_body: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/runs/{id}", get(run_files))
        .route("/runs/{id}/{*file}", get(run_file))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(405, "this route does not take that method: the /v1 routes that generate take POST, the others GET")
        })
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(
        404,
        "no such route: the server answers /v1/completions, /v1/chat/completions, /v1/models, /health, /runs/{id}/… and the page at /",
    )
}

/// `--api-key`: every route but `/health` needs `Authorization: Bearer KEY` (the page may take
/// it as `?key=KEY`).
async fn auth(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let Some(key) = app.api_key.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim);
    let query_key = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("key="))
            .map(str::to_string)
    });
    let given = bearer.map(str::to_string).or(query_key);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(401, "wrong API key").into_response(),
        None => ApiError::new(
            401,
            "this server needs an API key: send the header Authorization: Bearer KEY",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn page(State(app): State<Shared>) -> Html<String> {
    Html(app.page.clone())
}

async fn health(State(app): State<Shared>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        return ApiError::new(503, "the server is shutting down").into_response();
    }
    let s = &app.stats;
    Json(json!({
        "status": "ok",
        "waiting": app.queue.waiting(),
        "decoding": s.decoding.load(Ordering::SeqCst),
        "generated_tokens": s.generated.load(Ordering::Relaxed),
        "served": s.served.load(Ordering::Relaxed),
        "abandoned": s.abandoned.load(Ordering::Relaxed),
        "largest_batch": s.largest_batch.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn models(State(app): State<Shared>) -> Json<Value> {
    let m = &app.model;
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.name,
            "object": "model",
            "created": app.created,
            "owned_by": "gguf-trace",
            "meta": {
                "n_layer": m.n_layer(),
                "n_embd": m.n_embd(),
                "n_vocab": m.n_vocab(),
                "n_ctx": app.ctx,
                "points": m.n_layer() + 1,
                "vectors": known_vectors(&app),
                "parallel": app.parallel,
                "batched_exactly": app.batched_exactly,
            }
        }]
    }))
}

/// The GGUF files of `--vectors` (what `trace.steer.vector` and `trace.ablate.vector` may name).
fn known_vectors(app: &App) -> Vec<String> {
    let Some(dir) = &app.vectors else {
        return Vec::new();
    };
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.ends_with(".gguf"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A run directory's files (for `states: "run"`).
async fn run_files(
    State(app): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let dir = run_dir(&app, &id)?;
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| ApiError::new(500, e.to_string()))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(&dir) {
                files.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    files.sort();
    Ok(Json(json!({"id": id, "path": dir, "files": files})))
}

async fn run_file(
    State(app): State<Shared>,
    UrlPath((id, file)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let dir = run_dir(&app, &id)?;
    if file
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\\'))
    {
        return Err(ApiError::bad(format!("{file:?}: not a file of the run")));
    }
    let path = dir.join(&file);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::new(404, format!("run {id} has no file {file}")))?;
    let kind = match Path::new(&file).extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("csv") => "text/csv",
        Some("html") => "text/html; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, kind)], bytes).into_response())
}

fn run_dir(app: &App, id: &str) -> Result<PathBuf, ApiError> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::bad(format!("{id:?}: not a run id")));
    }
    let dir = app.runs.join(id);
    if !dir.join("run.json").is_file() {
        return Err(ApiError::new(404, format!("no run {id} on this server")));
    }
    Ok(dir)
}

async fn completions(
    State(app): State<Shared>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(rejection)?;
    let req: CompletionRequest = serde_path_to_error::deserialize(body).map_err(body_error)?;
    check_n(req.n)?;
    check_stop(&req.stop)?;
    if req.echo {
        return Err(ApiError::bad(
            "echo: the prompt is not repeated in the answer; the client has it",
        ));
    }
    check_logprobs(&req.logprobs)?;
    let prompt = match req.prompt {
        PromptInput::One(p) => p,
        PromptInput::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptInput::Many(v) => {
            return Err(ApiError::bad(format!(
                "prompt: {} prompts in one request; send one per request (they are decoded together when they arrive together)",
                v.len()
            )))
        }
    };
    serve_request(
        app,
        prompt,
        req.max_tokens,
        req.stream,
        req.trace.unwrap_or_default(),
        false,
    )
    .await
}

async fn chat_completions(
    State(app): State<Shared>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(rejection)?;
    let req: ChatRequest = serde_path_to_error::deserialize(body).map_err(body_error)?;
    check_n(req.n)?;
    check_stop(&req.stop)?;
    check_logprobs(&req.logprobs)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages: at least one message"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant"
        ) {
            return Err(ApiError::bad(format!(
                "messages[{i}].role {:?}: expected system, user or assistant",
                m.role
            )));
        }
        let text = match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => t.push_str(s),
                        (k, _) => {
                            return Err(ApiError::bad(format!(
                            "messages[{i}]: a content part of type {k:?}; only text is understood"
                        )))
                        }
                    }
                }
                t
            }
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        messages.push((role.to_string(), text));
    }
    let model = app.model.clone();
    let rendered =
        tokio::task::spawn_blocking(move || crate::chat::render_messages(&model, &messages))
            .await
            .map_err(|e| ApiError::new(500, e.to_string()))?
            .map_err(|e| ApiError::bad(format!("messages: {e}")))?;
    serve_request(
        app,
        rendered,
        req.max_completion_tokens.or(req.max_tokens),
        req.stream,
        req.trace.unwrap_or_default(),
        true,
    )
    .await
}

fn check_n(n: Option<usize>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::bad(format!(
            "n: {n} choices; generation is greedy (as `trace`'s), so every choice would be the same: leave n at 1"
        ))),
    }
}

/// Log-probabilities are not computed: refused when asked for (false, 0 and null are no request).
fn check_logprobs(v: &Option<Value>) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(()),
        Some(v) => Err(ApiError::bad(format!(
            "logprobs {v}: not supported; ask for the logit lens instead (trace.lens_top_k: its last point is the model's own next-token distribution)"
        ))),
    }
}

/// Stop sequences would cut the answer where `trace`'s would not: refused rather than ignored.
fn check_stop(stop: &Option<Value>) -> Result<(), ApiError> {
    match stop {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(v) => Err(ApiError::bad(format!(
            "stop {v}: stop sequences are not supported (generation is trace's: greedy, to max_tokens or the model's end token); cut the text on the client"
        ))),
    }
}

fn body_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if path == "." || path.is_empty() {
        ApiError::bad(format!("the request body: {inner}"))
    } else {
        ApiError::bad(format!("{path}: {inner}"))
    }
}

/// A control vector or direction named by a request: a file of `--vectors`, or uploaded bytes.
/// An uploaded file lives as long as the request that uploaded it (`Spec::uploads`).
fn vector_file(
    app: &App,
    what: &str,
    name: Option<&str>,
    data: Option<&str>,
    uploads: &mut Vec<Arc<tempfile::TempPath>>,
) -> Result<PathBuf, ApiError> {
    match (name, data) {
        (Some(_), Some(_)) => Err(ApiError::bad(format!(
            "trace.{what}: give `vector` (a file the server knows) or `data` (the GGUF in base64), not both"
        ))),
        (None, None) => Err(ApiError::bad(format!(
            "trace.{what}: name the direction with `vector` (a file in the server's --vectors folder) or upload it as `data` (base64)"
        ))),
        (Some(n), None) => {
            let Some(dir) = &app.vectors else {
                return Err(ApiError::bad(format!(
                    "trace.{what}.vector {n:?}: this server knows no files (start it with --vectors DIR), or upload the GGUF as `data`"
                )));
            };
            if n.is_empty() || n.contains('/') || n.contains('\\') || n.starts_with('.') {
                return Err(ApiError::bad(format!(
                    "trace.{what}.vector {n:?}: a file name in the server's --vectors folder"
                )));
            }
            let p = dir.join(n);
            if !p.is_file() {
                let known = known_vectors(app);
                return Err(ApiError::bad(format!(
                    "trace.{what}.vector {n:?}: no such file in --vectors (it has: {})",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                )));
            }
            Ok(p)
        }
        (None, Some(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ApiError::bad(format!("trace.{what}.data: not base64 ({e})")))?;
            let mut f = tempfile::Builder::new()
                .prefix("upload-")
                .suffix(".gguf")
                .tempfile_in(app.uploads.path())
                .map_err(|e| ApiError::new(500, e.to_string()))?;
            std::io::Write::write_all(&mut f, &bytes)
                .map_err(|e| ApiError::new(500, e.to_string()))?;
            let path = f.into_temp_path();
            let p = path.to_path_buf();
            uploads.push(Arc::new(path));
            Ok(p)
        }
    }
}

/// Resolve the `"trace"` extension against the model; every mistake is a 400 that names it.
fn resolve(app: &App, ext: &TraceExt) -> Result<Spec, ApiError> {
    let n_layer = app.model.n_layer();
    let points_spec = ext.points.clone().unwrap_or_else(|| "all".into());
    let points = parse_points(&points_spec, n_layer)
        .map_err(|e| ApiError::bad(format!("trace.points: {}", e.replace("--points ", ""))))?;
    let mut taps = Vec::new();
    if let Some(list) = &ext.taps {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let t: Tap = item
                .parse()
                .map_err(|e: String| ApiError::bad(format!("trace.taps: {e}")))?;
            if t == Tap::Pattern {
                return Err(ApiError::bad(
                    "trace.taps: `pattern` needs one prompt at a time; use `trace --taps pattern`",
                ));
            }
            if t.in_block() && !taps.contains(&t) {
                taps.push(t);
            }
        }
        taps.sort();
    }
    let mut uploads = Vec::new();
    let lens_k = ext.lens_top_k.unwrap_or(0);
    if lens_k > 100 {
        return Err(ApiError::bad(format!(
            "trace.lens_top_k {lens_k}: at most 100 tokens per point"
        )));
    }
    let steering = match &ext.steer {
        None => None,
        Some(st) => {
            let scale = st.scale.unwrap_or(1.0);
            if !scale.is_finite() {
                return Err(ApiError::bad("trace.steer.scale: a finite number"));
            }
            let file = request_vector(
                app,
                "steer",
                st.vector.as_deref(),
                st.data.as_deref(),
                &mut uploads,
            )?;
            Some(Steering {
                files: vec![file],
                scale,
                points: st.points.clone(),
            })
        }
    };
    let ablation = match &ext.ablate {
        None => None,
        Some(a) => Some(Ablation {
            file: request_vector(
                app,
                "ablate",
                a.vector.as_deref(),
                a.data.as_deref(),
                &mut uploads,
            )?,
            points: a.points.clone(),
            direction: a.direction.clone(),
            taps: Vec::new(),
        }),
    };
    let states = ext.states.unwrap_or_default();
    // Nothing inside is handed back: capture only the last point's rows of the generated tokens
    // (the cheapest capture; the tokens are the same bits, as tracing changes no result).
    let (points, points_spec, positions, taps) = if states == StatesMode::None && lens_k == 0 {
        (
            vec![n_layer],
            n_layer.to_string(),
            Positions::Last,
            Vec::new(),
        )
    } else {
        (
            points,
            points_spec,
            ext.positions.unwrap_or(Positions::All),
            taps,
        )
    };
    Ok(Spec {
        points,
        positions,
        taps,
        lens_k,
        states,
        stream_rows: ext.states == Some(StatesMode::Inline),
        steering,
        ablation,
        points_spec,
        uploads,
    })
}

/// The control vector or direction a request names (`vector`) or uploads (`data`), checked
/// against the model now: another width, or no control vector at all, is the client's mistake.
fn request_vector(
    app: &App,
    what: &str,
    vector: Option<&str>,
    data: Option<&str>,
    uploads: &mut Vec<Arc<tempfile::TempPath>>,
) -> Result<PathBuf, ApiError> {
    let file = vector_file(app, what, vector, data, uploads)?;
    let shown = vector.unwrap_or("the uploaded vector");
    check_vector(&file, shown, app.model.n_embd(), what)?;
    Ok(file)
}

/// A control vector of another width (or not one at all) is the client's mistake: say so now.
fn check_vector(file: &Path, shown: &str, n_embd: usize, what: &str) -> Result<(), ApiError> {
    crate::cvec::load(&[(file, 1.0)], n_embd)
        .map(drop)
        .map_err(|e| {
            // Name the file as the client named it, not by the server's path.
            let msg = e.to_string().replace(&file.display().to_string(), shown);
            ApiError::bad(format!("trace.{what}: {msg}"))
        })
}

/// Tokenize, check, queue, and answer (streamed or whole).
async fn serve_request(
    app: Shared,
    prompt: String,
    max_tokens: Option<usize>,
    stream: bool,
    ext: TraceExt,
    chat: bool,
) -> Result<Response, ApiError> {
    if app.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(503, "the server is shutting down"));
    }
    let spec = resolve(&app, &ext)?;
    let model = app.model.clone();
    let text = prompt.clone();
    let tokens = tokio::task::spawn_blocking(move || crate::chat::tokenize_prompt(&model, &text))
        .await
        .map_err(|e| ApiError::new(500, e.to_string()))?
        .map_err(|e| ApiError::bad(format!("prompt: {e}")))?;
    if tokens.is_empty() {
        return Err(ApiError::bad("prompt: it has no tokens"));
    }
    let room = app.ctx.saturating_sub(tokens.len());
    let max_tokens = match max_tokens {
        Some(0) => return Err(ApiError::bad("max_tokens: at least 1")),
        Some(n) if n > room => {
            return Err(ApiError::bad(format!(
                "the prompt has {} tokens + max_tokens {n}, more than the server's --ctx {}; shorten the prompt or lower max_tokens",
                tokens.len(),
                app.ctx
            )))
        }
        Some(n) => n,
        None if room == 0 => {
            return Err(ApiError::bad(format!(
                "the prompt has {} tokens, which fills the server's --ctx {}: nothing can be generated; shorten it",
                tokens.len(),
                app.ctx
            )))
        }
        None => app.max_tokens.min(room),
    };
    let id = format!(
        "{}-{}",
        app.created,
        app.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let (tx, mut rx) = mpsc::channel(worker::EVENT_BUFFER);
    let key = spec.batch_key();
    let job = Job {
        id: id.clone(),
        tokens,
        max_tokens,
        spec,
        key,
        events: tx,
        rendered: prompt,
    };
    if !app.queue.push(job) {
        return Err(ApiError::new(
            503,
            "the server is busy: every queue place is taken; retry shortly",
        ));
    }
    // The first event says whether the batch was set up (its interventions accepted).
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Error { status, message }) => return Err(ApiError::new(status, message)),
        Some(_) => {
            return Err(ApiError::new(
                500,
                "the worker skipped the start of the request",
            ))
        }
        None => return Err(ApiError::new(503, "the server is shutting down")),
    }
    let ctx = Reply {
        n_embd: app.model.n_embd(),
        id: if chat {
            format!("chatcmpl-{id}")
        } else {
            format!("cmpl-{id}")
        },
        chat,
        model: app.name.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        f16: ext.dtype == Some(InlineDtype::F16),
    };
    if stream {
        Ok(sse(ctx, rx).into_response())
    } else {
        loop {
            match rx.recv().await {
                Some(Event::Token { .. }) => {}
                Some(Event::Done(f)) => return Ok(Json(ctx.whole(&f)?).into_response()),
                Some(Event::Error { status, message }) => {
                    return Err(ApiError::new(status, message))
                }
                Some(Event::Started) => {}
                None => return Err(dropped(&app)),
            }
        }
    }
}

/// The worker let go of a request without answering: the server is going away, or the request
/// failed inside it (its log says why).
fn dropped(app: &App) -> ApiError {
    if app.shutting_down.load(Ordering::SeqCst) {
        ApiError::new(503, "the server is shutting down")
    } else {
        ApiError::new(
            500,
            "the request failed inside the server (an internal error; the server's log says why)",
        )
    }
}

/// What every answer of one request shares.
struct Reply {
    id: String,
    n_embd: usize,
    chat: bool,
    model: String,
    created: u64,
    f16: bool,
}

/// An array as NPY bytes in base64; f16 refuses values beyond its range (as `trace --dtype f16`).
fn npy_b64(data: Vec<f32>, shape: &[usize], f16: bool) -> Result<Value, ApiError> {
    use ndarray_npy::WriteNpyExt;
    if f16 {
        if let Some(x) = data
            .iter()
            .find(|x| x.is_finite() && x.abs() > f32::from(half::f16::MAX))
        {
            return Err(ApiError::bad(format!(
                "trace.dtype \"f16\": a state holds {x:e}, beyond f16's range (±65504); ask for \"f32\""
            )));
        }
    }
    let mut buf = Vec::new();
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), data)
        .map_err(|e| ApiError::new(500, e.to_string()))?;
    let written = if f16 {
        arr.mapv(|x| crate::run::npy::F16(half::f16::from_f32(x)))
            .write_npy(&mut buf)
    } else {
        arr.write_npy(&mut buf)
    };
    written.map_err(|e| ApiError::new(500, e.to_string()))?;
    Ok(json!({
        "dtype": if f16 { "f16" } else { "f32" },
        "shape": shape,
        "npy": base64::engine::general_purpose::STANDARD.encode(&buf),
    }))
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    fn choice(&self, text: &str, finish: Option<&str>, chunk: bool) -> Value {
        if !self.chat {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        } else if chunk {
            json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        }
    }

    fn trace_of(&self, f: &Finished) -> Value {
        let t = &f.trace;
        let mut v = json!({
            "points": f.points,
            "positions": t.positions,
            "tokens": t.tokens,
            "n_prompt": t.n_prompt,
        });
        if !f.lens.is_empty() {
            v["lens"] = json!(f.lens);
        }
        if let Some(run) = &f.run {
            v["run"] = json!(run);
        }
        v
    }

    fn whole(&self, f: &Finished) -> Result<Value, ApiError> {
        let mut trace = self.trace_of(f);
        let t = &f.trace;
        if f.states_inline {
            let shape = t.states.shape().to_vec();
            trace["states"] = npy_b64(t.states.iter().copied().collect(), &shape, self.f16)?;
            let mut taps = serde_json::Map::new();
            for (name, a) in f.tap_names.iter().zip(&t.taps) {
                taps.insert(
                    name.clone(),
                    npy_b64(a.iter().copied().collect(), a.shape(), self.f16)?,
                );
            }
            if !taps.is_empty() {
                trace["taps"] = Value::Object(taps);
            }
        }
        Ok(json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(&f.text, Some(f.finish.as_str()), false)],
            "usage": {
                "prompt_tokens": t.n_prompt,
                "completion_tokens": t.tokens.len() - t.n_prompt,
                "total_tokens": t.tokens.len(),
            },
            "trace": trace,
        }))
    }

    /// A streamed error: the OpenAI error object as the chunk's data.
    fn error_chunk(e: ApiError) -> String {
        let kind = if e.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        json!({"error": {"message": e.message, "type": kind, "code": e.status.as_u16()}})
            .to_string()
    }
}

/// Server-sent events: one chunk per generated token, a last chunk with the finish reason and the
/// whole trace, then `[DONE]`. Dropping the stream (the client left) closes the channel, which
/// stops the request's generation at its next token.
fn sse(
    reply: Reply,
    rx: mpsc::Receiver<Event>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let reply = Arc::new(reply);
    let events = stream::unfold((rx, false), move |(mut rx, done)| {
        let reply = reply.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let ev = rx.recv().await;
                let (data, end) = match ev {
                    Some(Event::Started) => continue,
                    Some(Event::Token {
                        id,
                        text,
                        lens,
                        rows,
                    }) => {
                        let mut trace = json!({"token": id});
                        if let Some(l) = lens {
                            trace["lens"] = json!(l);
                        }
                        if let Some(r) = rows {
                            let shape = [r.len() / reply.n_embd, reply.n_embd];
                            match npy_b64(r, &shape, reply.f16) {
                                Ok(v) => trace["rows"] = v,
                                Err(e) => {
                                    return Some((
                                        vec![Ok(SseEvent::default().data(Reply::error_chunk(e)))],
                                        (rx, true),
                                    ))
                                }
                            }
                        }
                        let chunk = json!({
                            "id": reply.id,
                            "object": reply.object(true),
                            "created": reply.created,
                            "model": reply.model,
                            "choices": [reply.choice(&text, None, true)],
                            "trace": trace,
                        });
                        (chunk.to_string(), false)
                    }
                    Some(Event::Done(f)) => match reply.whole(&f) {
                        Ok(whole) => {
                            let chunk = json!({
                                "id": reply.id,
                                "object": reply.object(true),
                                "created": reply.created,
                                "model": reply.model,
                                "choices": [reply.choice(&f.tail, Some(f.finish.as_str()), true)],
                                "usage": whole["usage"],
                                "trace": whole["trace"],
                            });
                            (chunk.to_string(), true)
                        }
                        Err(e) => (Reply::error_chunk(e), true),
                    },
                    Some(Event::Error { status, message }) => {
                        (Reply::error_chunk(ApiError::new(status, message)), true)
                    }
                    None => return None,
                };
                return Some((vec![Ok(SseEvent::default().data(data))], (rx, end)));
            }
        }
    })
    .flat_map(stream::iter)
    .chain(stream::once(async {
        Ok(SseEvent::default().data("[DONE]"))
    }));
    Sse::new(events).keep_alive(KeepAlive::default())
}
