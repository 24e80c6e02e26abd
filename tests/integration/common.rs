//! Test fixture: finds the models, loads each once per process, traces, runs the binary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use gguf_trace::capture::engine::{PromptTrace, TraceConfig, Tracer};
use gguf_trace::chat::tokenize_prompt;
use gguf_trace::llama::model::{LoadOptions, Model};

pub const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

/// `$GGUF_TRACE_CACHE` (as `scripts/lib.sh` sets it), else `~/.cache/gguf-trace`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GGUF_TRACE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("gguf-trace")
        })
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("GGUF_TRACE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models"))
}

/// Path of a test model. A missing model fails the test (never a silent pass): `scripts/test`
/// fetches them. Returns an Option so call sites read as "require this model".
pub fn model_path(name: &str) -> Option<PathBuf> {
    let p = models_dir().join(name);
    assert!(
        p.is_file(),
        "test model {} is missing; run scripts/test to fetch it (or set GGUF_TRACE_MODELS)",
        p.display()
    );
    Some(p)
}

fn load(name: &str, cell: &'static OnceLock<Option<Model>>) -> Option<&'static Model> {
    cell.get_or_init(|| {
        let p = model_path(name)?;
        Some(Model::load(&p, &LoadOptions::default()).expect("test model loads"))
    })
    .as_ref()
}

pub fn smol() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    load(SMOL, &M)
}

pub fn gemma() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    load(GEMMA, &M)
}

/// Unwrap a required fixture (model paths and models: missing ones already failed the test).
#[macro_export]
macro_rules! require {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return,
        }
    };
}

pub fn tokens(model: &Model, texts: &[&str]) -> Vec<Vec<i32>> {
    texts
        .iter()
        .map(|t| tokenize_prompt(model, t).unwrap())
        .collect()
}

/// Trace token lists with the default config changed by `f`.
pub fn trace_tokens(
    model: &Model,
    toks: &[Vec<i32>],
    f: impl FnOnce(&mut TraceConfig),
) -> Vec<PromptTrace> {
    let mut cfg = TraceConfig::new(model);
    cfg.threads = 2;
    f(&mut cfg);
    let mut tracer = Tracer::new(model, cfg).unwrap();
    let mut out = Vec::new();
    tracer
        .trace(
            toks,
            |t| {
                out.push(t);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    out
}

pub fn trace(model: &Model, texts: &[&str], f: impl FnOnce(&mut TraceConfig)) -> Vec<PromptTrace> {
    trace_tokens(model, &tokens(model, texts), f)
}

/// Largest relative L2 error ‖a−b‖/‖a‖ over all state vectors (one per point and position) —
/// one number for "same states".
pub fn max_rel_diff(a: ndarray::ArrayView3<f32>, b: ndarray::ArrayView3<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let mut worst = 0f32;
    for (ra, rb) in a
        .lanes(ndarray::Axis(2))
        .into_iter()
        .zip(b.lanes(ndarray::Axis(2)))
    {
        let num: f64 = ra
            .iter()
            .zip(rb.iter())
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = ra
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-30);
        worst = worst.max((num / den) as f32);
    }
    worst
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gguf-trace"))
}

pub fn run_bin(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

pub fn python() -> Command {
    Command::new(std::env::var_os("GGUF_TRACE_PYTHON").unwrap_or_else(|| "python3".into()))
}

/// Run a Python snippet with arguments; panics with its stderr on failure; returns stdout.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = python()
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Assert a failed command printed exactly one `error:` line mentioning `needle`, exited non-zero
/// (not by a signal), and left no run behind at `out` (if given).
pub fn assert_clean_error(o: &Output, needle: &str, out: Option<&Path>) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        o.status.code().is_some(),
        "killed by a signal (crash?): {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "error line {:?} does not mention {needle:?}",
        lines[0]
    );
    if let Some(out) = out {
        assert!(
            !out.join("run.json").exists(),
            "a run was left at {}",
            out.display()
        );
    }
}

pub fn argmax_ref(v: &[f32]) -> usize {
    gguf_trace::capture::engine::argmax(v)
}

/// Every path under `dir` with its size and first bytes (enough to see a file replaced, created or
/// removed; large model copies are compared by size and head).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if m.is_dir() {
                out.insert(rel, (0, b"<dir>".to_vec()));
                stack.push(p);
            } else {
                let mut head = vec![0u8; 4096];
                let n = std::fs::File::open(&p).unwrap().read(&mut head).unwrap();
                head.truncate(n);
                out.insert(rel, (m.len(), head));
            }
        }
    }
    out
}

/// Assert `dir` holds exactly what `before` recorded.
pub fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, (u64, Vec<u8>)>, what: &str) {
    let after = snapshot(dir);
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after.get(*k).is_some_and(|a| a != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        added.is_empty() && removed.is_empty() && changed.is_empty(),
        "{what}: disk changed — added {added:?}, removed {removed:?}, changed {changed:?}"
    );
}

/// Run the binary in `work` and assert it succeeded.
pub fn ok(work: &Path, args: &[&str]) -> Output {
    let o = bin().args(args).current_dir(work).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A running `gguf-trace` whose stderr lines are collected as they come.
struct Watched {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watched {
    fn spawn(work: &Path, args: &[&str]) -> Watched {
        Self::spawn_with(work, args, bin())
    }

    fn spawn_with(work: &Path, args: &[&str], mut cmd: std::process::Command) -> Watched {
        let mut child = cmd
            .args(args)
            .current_dir(work)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let _ = tx.send(line.unwrap_or_default());
            }
        });
        Watched {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn assert_running(&mut self, args: &[&str]) {
        self.seen.extend(self.lines.try_iter());
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{args:?} finished before it could be interrupted: {:?}",
            self.seen
        );
    }

    /// Send `signal`, wait for the exit; (exit code, every stderr line).
    fn signal(mut self, signal: &str) -> (Option<i32>, Vec<String>) {
        let kill = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        (status.code(), self.seen)
    }
}

/// Spawn the binary in `work`, wait until a stderr line contains `ready` (then `delay`), send
/// `signal`, and return (exit code, stderr lines).
pub fn interrupt(
    work: &Path,
    args: &[&str],
    ready: &str,
    delay: Duration,
    signal: &str,
) -> (Option<i32>, Vec<String>) {
    let mut w = Watched::spawn(work, args);
    if !ready.is_empty() {
        loop {
            let line = w
                .lines
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("{args:?} never printed {ready:?}: {:?}", w.seen));
            w.seen.push(line.clone());
            if line.contains(ready) {
                break;
            }
        }
    }
    std::thread::sleep(delay);
    w.assert_running(args);
    w.signal(signal)
}

/// Spawn the binary in `work` paused at the test hook `point` (`GGUF_TRACE_PAUSE`, see
/// `output::pause_point`), send `signal` once it is there, and return (exit code, stderr lines):
/// the signal lands at that step on any machine, fast or loaded (a fixed delay could land before
/// it or after the command ended).
pub fn interrupt_at(
    work: &Path,
    args: &[&str],
    point: &str,
    signal: &str,
) -> (Option<i32>, Vec<String>) {
    let flags = tempfile::tempdir().unwrap();
    let never = flags.path().join("never");
    let mut cmd = bin();
    cmd.env("GGUF_TRACE_PAUSE", format!("{point}:{}", never.display()));
    let reached = flags.path().join("never.reached");
    signal_when(
        Watched::spawn_with(work, args, cmd),
        args,
        || reached.exists(),
        signal,
    )
}

/// Spawn the binary in `work`, wait until `ready()` holds (polled; at most 5 minutes), send
/// `signal`, and return (exit code, stderr lines). Progress-based, so it holds on a loaded machine.
pub fn interrupt_when(
    work: &Path,
    args: &[&str],
    ready: impl Fn() -> bool,
    signal: &str,
) -> (Option<i32>, Vec<String>) {
    signal_when(Watched::spawn(work, args), args, ready, signal)
}

/// Wait until `ready()` holds (polled; at most 5 minutes, the command still running), then send
/// `signal`.
fn signal_when(
    mut w: Watched,
    args: &[&str],
    ready: impl Fn() -> bool,
    signal: &str,
) -> (Option<i32>, Vec<String>) {
    let start = std::time::Instant::now();
    while !ready() {
        w.assert_running(args);
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{args:?}: never ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w.signal(signal)
}

/// Two run directories hold the same data: every data file byte for byte (run.json is compared
/// by the callers that need it, apart from times and provenance).
pub fn assert_same_data(a: &Path, b: &Path) {
    let mut files = vec![
        PathBuf::from("last.npy"),
        PathBuf::from("logits.npy"),
        PathBuf::from("tokens.csv"),
        PathBuf::from("metrics.csv"),
    ];
    for e in std::fs::read_dir(b.join("states")).unwrap() {
        files.push(Path::new("states").join(e.unwrap().file_name()));
    }
    // Taps inside blocks (schema 2): every file of every tap.
    if let Ok(taps) = std::fs::read_dir(b.join("taps")) {
        for t in taps {
            let t = Path::new("taps").join(t.unwrap().file_name());
            for e in std::fs::read_dir(b.join(&t)).unwrap() {
                files.push(t.join(e.unwrap().file_name()));
            }
        }
    }
    for f in files {
        assert!(
            std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(),
            "{} differs between {} and {}",
            f.display(),
            a.display(),
            b.display()
        );
    }
}

/// Prompts journaled (checkpointed to disk) by unfinished traces under `dir` whose staging path
/// contains `filter`.
/// Start the binary with `args` in `w` (stderr piped) and return once it has journaled a prompt
/// (a checkpoint is on disk), failing if it ends first or takes over 300 s.
pub fn spawn_until_journaled(w: &Path, args: &[&str]) -> std::process::Child {
    let mut child = bin()
        .args(args)
        .current_dir(w)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while journaled(w, "") == 0 {
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        assert!(start.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

pub fn journaled(dir: &Path, filter: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(it) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in it.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|f| f == ".journal.jsonl")
                && p.to_string_lossy().contains(filter)
            {
                n += std::fs::read_to_string(&p)
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
            }
        }
    }
    n
}

/// The HF oracle's python (`$GGUF_TRACE_HF_PYTHON`, else the venv `scripts/test` installs); a
/// missing one fails the test that needs it, naming `what` needs it.
pub fn hf_python(what: &str) -> PathBuf {
    let p = std::env::var_os("GGUF_TRACE_HF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv-hf/bin/python"));
    assert!(
        p.is_file(),
        "{what} needs HF transformers in {}; run scripts/test to install it (or set GGUF_TRACE_HF_PYTHON)",
        p.display()
    );
    p
}

/// The repository's root (the bundled prompt sets are in its `prompts/`).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `gguf-trace trace -m MODEL -o OUT ARGS...`, which must succeed; the run it wrote, opened.
pub fn trace_run(model: &Path, args: &[&str], out: &Path) -> gguf_trace::run::Run {
    let mut a = vec!["trace", "-m", s(model), "-o", s(out)];
    a.extend(args);
    let o = run_bin(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    gguf_trace::run::Run::open(out).unwrap()
}
