//! The commands behind the CLI: option validation, progress output, and calls into the library.

pub mod compare;
pub mod direction;
pub mod inspect;
pub mod quantize;
pub mod report;
pub mod trace;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

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

/// Load a model with a spinner on a terminal.
pub fn load_model(path: &Path, opts: LoadOptions) -> Result<Model> {
    check_gguf_path(path)?;
    let sp = spinner(&format!(
        "loading {}",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    ));
    let m = Model::load(path, opts);
    sp.finish_and_clear();
    Ok(m?)
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

/// A bar on stderr; hidden when stderr is not a terminal.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let tmpl = format!("{{msg}} [{{bar:32}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})");
    pb.set_style(
        ProgressStyle::with_template(&tmpl)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
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
