//! `gguf-trace compare -m A.gguf -m B.gguf ... -o OUT_DIR`: the same prompts through several
//! models, one run directory each, and one report.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::cli::{CompareArgs, DtypeArg, FormatArg, TraceArgs};
use crate::{prompts, run};

pub fn run(args: &CompareArgs, out: &mut dyn Write) -> Result<()> {
    if args.models.len() < 2 {
        bail!("compare needs at least two models (repeat -m)");
    }
    // Fail fast on prompts and the output directory before any model is loaded.
    prompts::collect(&args.input.prompts, &args.input.files)?;
    run::check_output(&args.output, args.force)?;
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let reference = match &args.reference {
        None => None,
        Some(r) => Some(
            args.models
                .iter()
                .position(|m| canon(m) == canon(r))
                .with_context(|| {
                    format!("--reference {} is not one of the -m models", r.display())
                })?,
        ),
    };
    for m in &args.models {
        super::check_gguf_path(m)?;
    }
    if args.output.exists() {
        std::fs::remove_dir_all(&args.output)
            .with_context(|| format!("cannot replace {}", args.output.display()))?;
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    // One run directory per model, named after the model file (numbered when names repeat).
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (i, m) in args.models.iter().enumerate() {
        let stem = m
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("model{i}"));
        let mut dir = args.output.join(&stem);
        if dirs.contains(&dir) {
            dir = args.output.join(format!("{stem}-{i}"));
        }
        eprintln!("[{}/{}] {}", i + 1, args.models.len(), m.display());
        let t = TraceArgs {
            model: m.clone(),
            input: args.input.clone(),
            positions: args.positions,
            points: "all".into(),
            generate: args.generate,
            output: dir.clone(),
            force: true,
            format: FormatArg::Npy,
            dtype: DtypeArg::F32,
            ctx: args.ctx,
            threads: args.threads,
            n_gpu_layers: args.n_gpu_layers,
            n_seq: 16,
            batch_size: 512,
            ubatch_size: 512,
            lens: args.lens,
            lens_all: false,
            lens_k: 5,
            control_vectors: vec![],
            control_scale: 1.0,
            control_points: None,
        };
        super::trace::run(&t, &mut std::io::sink())?;
        dirs.push(dir);
    }
    let report = args.output.join("report.html");
    let runs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let n = super::report::write_report(
        &runs,
        &report,
        args.title.as_deref(),
        reference.map(|r| dirs[r].as_path()),
    )?;
    eprintln!("report with {n} figures from {} runs", dirs.len());
    writeln!(out, "{}", report.display())?;
    Ok(())
}
