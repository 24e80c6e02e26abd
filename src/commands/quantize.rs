//! `gguf-trace quantize SRC.gguf --type f32,q8_0,... -o DIR`: a quantization ladder of one model.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _, Result};

use super::bar;
use crate::cli::QuantizeArgs;
use crate::llama::gguf::Gguf;
use crate::llama::{backend, ftype_name, quantize};
use crate::model_info::tensor_mix;
use crate::output::{check_target, sync_file, Kind, Staging};
use crate::quant::{output_name, parse_types};

/// Types that hold full-precision values; anything else means the source is already quantized.
const FLOAT_TYPES: [&str; 3] = ["f32", "f16", "bf16"];

/// Parse "[  12/ 272]" at the start of a quantize log line.
fn progress(line: &str) -> Option<(u64, u64)> {
    let inner = line.trim_start().strip_prefix('[')?.split(']').next()?;
    let (a, b) = inner.split_once('/')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

pub fn run(args: &QuantizeArgs, out: &mut dyn Write) -> Result<()> {
    let threads = super::resolve_threads(args.threads)?;
    let types = parse_types(&args.types).map_err(anyhow::Error::msg)?;
    let source = args.source.path().to_path_buf();
    super::check_model_gguf(&source)?;
    let src = Gguf::open(&source)?;
    let src_hist = src.type_histogram();
    let quantized_src = src_hist.keys().any(|t| !FLOAT_TYPES.contains(&t.as_str()));
    let src_label = src
        .get_f64("general.file_type")
        .map(|f| ftype_name(f as u32))
        .unwrap_or_else(|| "?".into());
    if args.output.exists() && !args.output.is_dir() {
        bail!(
            "{}: exists and is not a directory; -o names the directory the files go into",
            args.output.display()
        );
    }
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    // Every output is checked before anything is written (existing files need --force, and even
    // then only GGUF files are replaced).
    let mut planned: Vec<(PathBuf, String, &str, u32)> = Vec::new();
    for &(name, ftype) in &types {
        let file = output_name(&stem, name);
        let dst = args.output.join(&file);
        if args.output.is_dir() {
            check_target(&dst, Kind::Gguf, args.force)?;
        }
        if same_file(&dst, &source) {
            bail!(
                "{}: is the source model; choose another -o directory",
                dst.display()
            );
        }
        planned.push((dst, file, name, ftype));
    }
    if quantized_src {
        eprintln!(
            "note: {} is already quantized ({src_label}; {}): every output is a requantization. F32 is the exact reference of a quantized source (F16 rounds most values).",
            source.display(),
            tensor_mix(&src_hist)
        );
    }
    let created = !args.output.exists();
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create output directory {}", args.output.display()))?;
    let result = write_all(args, out, planned, threads, quantized_src, &src_label);
    if result.is_err() && created {
        // A directory this command created and left empty is removed (never one with files).
        let _ = std::fs::remove_dir(&args.output);
    }
    result
}

/// Quantize every planned type in turn, each file staged and swapped in when complete.
fn write_all(
    args: &QuantizeArgs,
    out: &mut dyn Write,
    planned: Vec<(PathBuf, String, &str, u32)>,
    threads: i32,
    quantized_src: bool,
    src_label: &str,
) -> Result<()> {
    // What will be written, for the last line: the ladder through `compare` comes next.
    let files: Vec<String> = planned
        .iter()
        .map(|(dst, ..)| super::shell_word(dst))
        .collect();
    for (dst, file, name, ftype) in planned {
        let staging = Staging::new(&dst)?;
        let tmp = staging.path(&file);
        let pb = bar(0, "tensors");
        pb.set_message(format!("quantizing to {}", name.to_uppercase()));
        let pbc = Arc::new(Mutex::new(pb.clone()));
        backend::set_log_observer(Some(Box::new(move |line: &str| {
            if let Some((i, n)) = progress(line) {
                let pb = pbc.lock().unwrap_or_else(|e| e.into_inner());
                pb.set_length(n);
                pb.set_position(i);
            }
        })));
        // llama_model_quantize cannot be cancelled: run it on a worker and stop waiting on Ctrl-C
        // (the staging directory is removed on the way out; the worker ends with the process).
        let (src_path, tmp_path) = (args.source.path().to_path_buf(), tmp.clone());
        let worker = std::thread::spawn(move || {
            quantize::quantize(&src_path, &tmp_path, ftype, threads, quantized_src)
        });
        while !worker.is_finished() && !backend::interrupted() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        backend::set_log_observer(None);
        pb.finish_and_clear();
        if backend::interrupted() {
            bail!("interrupted: {} was not written", dst.display());
        }
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("the quantization thread panicked"))?
            .map_err(|e| super::name_full_disk(&args.output, e.into()))?;
        sync_file(&tmp)?;
        let g = Gguf::open(&tmp)?;
        let label = g
            .get_f64("general.file_type")
            .map(|f| ftype_name(f as u32))
            .unwrap_or_else(|| "?".into());
        let mix = tensor_mix(&g.type_histogram());
        drop(g);
        staging.commit(&[file], &[])?;
        eprintln!(
            "{}: {label}{} — real tensor mix: {mix}",
            dst.display(),
            if quantized_src {
                format!(" (requantized from {src_label})")
            } else {
                String::new()
            },
        );
        writeln!(out, "{}", dst.display())?;
    }
    eprintln!(
        "wrote {} file(s) in {} — next: gguf-trace compare {} {} -f PROMPTS.txt -o runs/ladder",
        files.len(),
        args.output.display(),
        super::shell_word(args.source.path()),
        files.join(" ")
    );
    Ok(())
}

/// Whether two paths name the same existing file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_progress_lines() {
        assert_eq!(
            super::progress("[  12/ 272]              blk.0.attn_k.weight - [576, 192]"),
            Some((12, 272))
        );
        assert_eq!(
            super::progress("llama_model_quantize_impl: model size"),
            None
        );
    }
}
