//! `gguf-trace quantize SRC.gguf --type f32,q8_0,... -o DIR`: a quantization ladder of one model.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _, Result};

use super::{bar, check_gguf_path};
use crate::cli::QuantizeArgs;
use crate::llama::gguf::Gguf;
use crate::llama::{backend, ftype_name, quantize};
use crate::model_info::tensor_mix;
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
    check_gguf_path(&args.source)?;
    let types = parse_types(&args.types).map_err(anyhow::Error::msg)?;
    let src = Gguf::open(&args.source)?;
    let src_hist = src.type_histogram();
    let quantized_src = src_hist.keys().any(|t| !FLOAT_TYPES.contains(&t.as_str()));
    let src_label = src
        .get_f64("general.file_type")
        .map(|f| ftype_name(f as u32))
        .unwrap_or_else(|| "?".into());
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create output directory {}", args.output.display()))?;
    let stem = args
        .source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let threads = args
        .threads
        .unwrap_or_else(crate::capture::engine::default_threads);
    if quantized_src {
        eprintln!(
            "note: {} is already quantized ({src_label}; {}): every output is a requantization. F32 is the exact reference of a quantized source (F16 rounds most values).",
            args.source.display(),
            tensor_mix(&src_hist)
        );
    }
    let mut planned: Vec<(PathBuf, &str, u32)> = Vec::new();
    for &(name, ftype) in &types {
        let dst = args.output.join(output_name(&stem, name));
        if dst.exists() && !args.force {
            bail!(
                "{} already exists; pass --force to overwrite it",
                dst.display()
            );
        }
        planned.push((dst, name, ftype));
    }
    for (dst, name, ftype) in planned {
        let tmp = dst.with_extension("gguf.partial");
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
        let result = quantize::quantize(&args.source, &tmp, ftype, threads, quantized_src);
        backend::set_log_observer(None);
        pb.finish_and_clear();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        std::fs::rename(&tmp, &dst).with_context(|| format!("cannot write {}", dst.display()))?;
        let g = Gguf::open(&dst)?;
        let label = g
            .get_f64("general.file_type")
            .map(|f| ftype_name(f as u32))
            .unwrap_or_else(|| "?".into());
        eprintln!(
            "{}: {label}{} — real tensor mix: {}",
            dst.display(),
            if quantized_src {
                format!(" (requantized from {src_label})")
            } else {
                String::new()
            },
            tensor_mix(&g.type_histogram())
        );
        writeln!(out, "{}", dst.display())?;
    }
    Ok(())
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
