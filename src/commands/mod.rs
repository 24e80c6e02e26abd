//! The commands behind the CLI: option validation, progress output, and calls into the library.

pub mod attribute;
pub mod compare;
pub mod direction;
pub mod generate;
pub mod inspect;
pub mod patch;
pub mod quantize;
pub mod report;
pub mod rpc_server;
pub mod select;
pub mod trace;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::llama::gguf::Gguf;
use crate::llama::model::{LoadOptions, Model};

/// Check that `path` is a readable, non-empty file that starts with the GGUF magic, so the user
/// gets a precise message instead of llama.cpp's generic failure.
pub fn check_gguf_path(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot open model", path.display()))?;
    if meta.is_dir() {
        bail!(
            "{}: is a directory, expected a .gguf model file",
            path.display()
        );
    }
    if let Some(kind) = crate::paths::special_kind(meta.file_type()) {
        bail!(
            "{}: is {kind}, not a file; expected a .gguf model file",
            path.display()
        );
    }
    if meta.len() == 0 {
        bail!("{}: empty file, expected a .gguf model", path.display());
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open model", path.display()))?;
    if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        bail!(
            "{}: not a GGUF file (it does not start with the GGUF magic)",
            path.display()
        );
    }
    Ok(())
}

/// Check a model file before llama.cpp sees it: a GGUF whose header parses, whose tensors lie
/// within the file, and whose hyper-parameters that llama.cpp asserts on are sane. A hostile or
/// damaged file gets a one-line error here instead of an abort inside llama.cpp.
pub fn check_model_gguf(path: &Path) -> Result<()> {
    check_gguf_path(path)?;
    let g = Gguf::open(path)?;
    let file_len = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot open model", path.display()))?
        .len();
    let arch = g.get_str("general.architecture").unwrap_or_default();
    if arch.is_empty() {
        bail!(
            "{}: no general.architecture in the metadata: not a model GGUF",
            path.display()
        );
    }
    if arch == "controlvector" {
        bail!(
            "{}: is a control vector, not a model (use it with --control-vector)",
            path.display()
        );
    }
    for (key, what) in [
        ("block_count", "blocks"),
        ("embedding_length", "width"),
        ("context_length", "trained context"),
    ] {
        let k = format!("{arch}.{key}");
        if let Some(v) = g.get(&k) {
            // A scalar must be a positive count (arrays, per-layer values, are llama.cpp's to check).
            if let Some(x) = v.as_f64() {
                if x.is_nan() || x < 1.0 {
                    bail!(
                        "{}: metadata {k} = {x}: a model needs at least one {what}",
                        path.display(),
                        what = what.trim_end_matches('s')
                    );
                }
            }
        }
    }
    // Floating-point hyper-parameters must be numbers; norm epsilons must not be negative
    // (ggml asserts eps >= 0 inside a decode).
    for key in g.keys() {
        if let Some(x) = g.get(&key).and_then(|v| v.as_f64()) {
            if !x.is_finite() {
                bail!("{}: metadata {key} is {x}: not a number", path.display());
            }
            if key.contains("epsilon") && x < 0.0 {
                bail!(
                    "{}: metadata {key} = {x}: a norm epsilon cannot be negative",
                    path.display()
                );
            }
        }
        if g.get(&key).is_some_and(|v| v.is_null()) {
            bail!("{}: metadata {key} is not a number", path.display());
        }
    }
    // Recurrent models (mamba, mamba2, rwkv…) carry state-space or WKV hyper-parameters and no
    // attention heads: llama.cpp runs them, but there is no residual stream of transformer blocks
    // to trace. Said as such, not as "no attention heads" (hybrids, which have heads in some
    // layers, load and are refused by name after the load).
    let heads = g.get(&format!("{arch}.attention.head_count"));
    let no_heads = heads.as_ref().is_none_or(|v| match v.as_f64() {
        Some(x) => x < 1.0,
        None => v
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.as_f64().is_some_and(|x| x < 1.0))),
    });
    let recurrent_keys = g.keys().into_iter().any(|k| {
        [
            ".ssm.",
            ".wkv.",
            ".rwkv.",
            ".time_mix_",
            ".token_shift_count",
        ]
        .iter()
        .any(|m| k.starts_with(&arch) && k[arch.len()..].starts_with(m))
    });
    if recurrent_keys && no_heads {
        bail!(
            "{}: {arch} is a recurrent architecture (state-space or RWKV), not supported: gguf-trace traces the residual stream between transformer blocks",
            path.display()
        );
    }
    if let Some(v) = g.get(&format!("{arch}.attention.head_count")) {
        if v.as_f64().is_some_and(|x| x < 1.0) {
            bail!(
                "{}: metadata {arch}.attention.head_count is 0: a model needs attention heads",
                path.display()
            );
        }
    }
    for t in g.tensors() {
        if t.offset.saturating_add(t.size as u64) > file_len {
            bail!(
                "{}: tensor {} lies beyond the end of the file (truncated or damaged download?)",
                path.display(),
                t.name
            );
        }
    }
    Ok(())
}

/// Load a model with a spinner on a terminal.
pub fn load_model(path: &Path, opts: LoadOptions) -> Result<Model> {
    check_model_gguf(path)?;
    let sp = spinner(&format!(
        "loading {}",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    ));
    let m = Model::load(path, &opts);
    sp.finish_and_clear();
    Ok(m?)
}

/// Most CPU threads accepted, as a multiple of the CPUs available: far more threads than cores
/// only makes llama.cpp's thread pool spin (100,000 threads ran for minutes on 2 cores).
const MAX_THREADS_PER_CPU: usize = 4;

/// `--threads`: all available CPUs by default; refused outside 1..=4 × the CPUs available.
pub fn resolve_threads(threads: Option<i32>) -> Result<i32> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = cpus * MAX_THREADS_PER_CPU;
    match threads {
        None => Ok(crate::capture::engine::default_threads()),
        Some(t) if t >= 1 && t as usize <= max => Ok(t),
        Some(t) => bail!(
            "--threads {t}: must be between 1 and {max} ({MAX_THREADS_PER_CPU} × the {cpus} CPUs available)"
        ),
    }
}

/// A spinner on stderr; hidden when stderr is not a terminal.
pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A path as one word a shell reads back unchanged (quoted when it holds spaces or anything a
/// shell would expand), for the "next:" lines commands end with.
pub fn shell_word(p: &std::path::Path) -> String {
    let s = p.display().to_string();
    shlex::try_quote(&s).map(|q| q.into_owned()).unwrap_or(s)
}

/// A bar on stderr. When stderr is not a terminal (a log file, CI), a plain line of the same
/// text every [`PLAIN_EVERY`] instead of nothing.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        pb.set_draw_target(indicatif::ProgressDrawTarget::term_like_with_hz(
            Box::new(PlainLines::default()),
            1,
        ));
    }
    // The rate with the precision its size needs (indicatif's {per_sec} prints "1.5486/s").
    let tmpl =
        format!("{{msg}} [{{bar:32}}] {{pos}}/{{len}} {unit} ({{rate}} {unit}/s, eta {{eta}})");
    pb.set_style(
        ProgressStyle::with_template(&tmpl)
            .expect("valid template")
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&rate(s.per_sec()));
                },
            )
            .progress_chars("=> "),
    );
    pb
}

/// How often a progress bar prints a plain line when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A "terminal" for indicatif that prints the bar's line at most every [`PLAIN_EVERY`] and
/// ignores cursor movement: progress in a log, without a line per redraw.
#[derive(Debug)]
struct PlainLines {
    last: std::sync::Mutex<std::time::Instant>,
}

impl Default for PlainLines {
    fn default() -> Self {
        PlainLines {
            last: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl indicatif::TermLike for PlainLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        let s = s.trim_end();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if !s.is_empty() && last.elapsed() >= PLAIN_EVERY {
            *last = std::time::Instant::now();
            eprintln!("{s}");
        }
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write_line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A rate with the precision its size needs: "1234", "56.7", "0.42".
pub fn rate(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A write into `dir` failed: when the disk there is full, say so. llama.cpp's GGUF writers report
/// only "gguf_write_to_file failed" or "basic_ios::clear: iostream error", never the errno; a disk
/// with under 1 MiB left just after a failed write (the partial file still on it) is the cause.
pub fn name_full_disk(dir: &Path, e: anyhow::Error) -> anyhow::Error {
    match fs4::available_space(dir) {
        Ok(free) if free < 1 << 20 => anyhow::anyhow!(
            "no space left on {} ({} free): {e:#}",
            dir.display(),
            human_bytes(free)
        ),
        _ => e,
    }
}

/// "12.3 MiB".
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
