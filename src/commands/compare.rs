//! `gguf-trace compare -m A.gguf -m B.gguf ... -o OUT_DIR`: the same prompts through several
//! models, one run directory each, and one report.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::trace::{LensOptions, TraceOptions};
use crate::cli::CompareArgs;
use crate::output::{check_target, Kind, Staging, COMPARE_JSON};
use crate::prompts;

/// The marker that makes a compare directory recognisable (so `--force` may replace it).
#[derive(serde::Serialize)]
struct CompareManifest<'a> {
    tool: &'static str,
    tool_version: &'static str,
    models: Vec<String>,
    runs: &'a [String],
    report: &'static str,
}

pub fn run(args: &CompareArgs, out: &mut dyn Write) -> Result<()> {
    // The models come as arguments or as repeated -m: one list from here on.
    if !args.models.is_empty() && !args.models_pos.is_empty() {
        bail!(
            "give the models either as arguments (compare a.gguf b.gguf …) or each with -m (compare -m a.gguf -m b.gguf …), not both: the order they are compared in would be ambiguous"
        );
    }
    let mut args = args.clone();
    if args.models.is_empty() {
        args.models = std::mem::take(&mut args.models_pos);
    }
    let args = &args;
    if args.models.len() < 2 {
        bail!(
            "compare needs at least two models, got {} (e.g. gguf-trace compare a.gguf b.gguf -f prompts.txt -o cmp)",
            args.models.len()
        );
    }
    // One plan for every model; validated (with the prompts and the output) before any load.
    let mut plan = TraceOptions::new(args.models[0].clone(), args.input.clone(), PathBuf::new());
    plan.capture = args.capture.clone();
    plan.capture.validate()?;
    plan.lens = args.lens.then_some(LensOptions { all: false, k: 5 });
    plan.resume = args.resume;
    plan.validate()?;
    let prompts = prompts::collect(&args.input.prompts, &args.input.files)?;
    // An interrupted compare of this output is named first (never discarded without --force).
    if !args.resume && !args.force {
        if let Some(staged) = crate::output::resumable(&args.output) {
            let done = std::fs::read_dir(&staged)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().join(crate::run::RUN_JSON).is_file())
                        .count()
                })
                .unwrap_or(0);
            bail!(
                "{} has an interrupted compare with {done} of {} run(s) finished on disk: run the same command with --resume to continue it, or with --force to discard it and start over",
                args.output.display(),
                args.models.len()
            );
        }
    }
    check_target(&args.output, Kind::Compare, args.force)?;
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
        super::check_model_gguf(m)?;
    }
    // The same file twice would trace it twice and compare it with itself.
    for (i, m) in args.models.iter().enumerate() {
        if let Some(j) = args.models[..i].iter().position(|x| canon(x) == canon(m)) {
            bail!(
                "{} is given twice (models {} and {}); give each model once",
                m.display(),
                j + 1,
                i + 1
            );
        }
    }
    // Everything is written in a staging directory and swapped in at the end: a failed or
    // interrupted compare leaves the previous output (if any) as it was.
    let name = args
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the output path names no directory")?;
    // The compare's own plan (each model's run also checks its own when it resumes): an
    // interrupted compare of other models, options or prompts is refused, never mixed in.
    let fingerprint = serde_json::json!({
        "models": args
            .models
            .iter()
            .map(|m| crate::model_hash::stamp(m).with_context(|| format!("{}: cannot read", m.display())))
            .collect::<Result<Vec<_>>>()?,
        "capture": plan.capture,
        "lens": args.lens,
        "chat": plan.input.chat,
        "system": plan.input.system,
        "prompts": prompts.iter().map(|p| (&p.id, &p.label, &p.text)).collect::<Vec<_>>(),
        "reference": reference,
        "title": args.title,
        "tool_version": env!("CARGO_PKG_VERSION"),
    })
    .to_string();
    let accept = |dir: &Path| -> Result<(), crate::output::OutputError> {
        let found =
            crate::paths::read_text(&dir.join(crate::run::RESUME_PLAN), crate::paths::MAX_JSON)
                .unwrap_or_default();
        if found.trim() == fingerprint {
            Ok(())
        } else {
            Err(crate::output::OutputError::Refused(format!(
                "the interrupted compare of {} was made with other model files, other options or other prompts; run with --force instead of --resume to discard it and start over",
                args.output.display()
            )))
        }
    };
    let (staging, adopted) = Staging::new_or_adopt(&args.output, args.resume, &accept)?;
    if args.resume && !adopted {
        eprintln!(
            "note: no interrupted compare of {} to resume; starting it",
            args.output.display()
        );
    }
    let work = staging.path(&name);
    if !work.is_dir() {
        std::fs::create_dir(&work).with_context(|| format!("cannot create {}", work.display()))?;
        crate::output::write_synced(&work.join(crate::run::RESUME_PLAN), fingerprint.as_bytes())?;
    }
    match compare_into(args, &plan, &work, reference, &|| staging.mark_resumable()) {
        Ok(n) => {
            std::fs::remove_file(work.join(crate::run::RESUME_PLAN))
                .with_context(|| format!("cannot finish {}", work.display()))?;
            staging.commit(&[name], &[])?;
            eprintln!(
                "wrote {} — one run per model and report.html ({n} figures); open the report in a browser",
                args.output.display()
            );
            if args
                .answers
                .print(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            {
                print_answers(args, out)?;
            }
            writeln!(out, "{}", args.output.join(REPORT).display())?;
            Ok(())
        }
        Err(e) if crate::llama::backend::interrupted() => {
            // The runs finished so far (and the interrupted one's checkpoints) stay for --resume.
            staging.keep();
            Err(e.context("compare interrupted; run the same command with --resume to continue"))
        }
        Err(e) => Err(e),
    }
}

/// Trace every model into `work` (runs already complete there for the same plan are kept when
/// resuming) and write the report. Returns the figure count.
fn compare_into(
    args: &CompareArgs,
    plan: &TraceOptions,
    work: &Path,
    reference: Option<usize>,
    run_done: &dyn Fn(),
) -> Result<usize> {
    // One run directory per model, named after the model file (numbered when names repeat).
    let mut names: Vec<String> = Vec::new();
    for (i, m) in args.models.iter().enumerate() {
        let stem = m
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("model{i}"));
        // Numbered when names repeat or would clash with the compare directory's own files.
        let reserved = stem == REPORT
            || stem == COMPARE_JSON
            || stem.starts_with("report.")
            || stem.starts_with('.');
        let sub = if names.contains(&stem) || reserved {
            format!("{stem}-{i}")
        } else {
            stem
        };
        eprintln!("[{}/{}] {}", i + 1, args.models.len(), m.display());
        let mut t = plan.clone();
        t.model = m.clone();
        t.output = work.join(&sub);
        t.shown_as = Some(args.output.join(&sub));
        // A run left by an interrupted compare is ours to replace.
        t.force = true;
        super::trace::trace(&t)?;
        run_done();
        names.push(sub);
    }
    let dirs: Vec<PathBuf> = names.iter().map(|n| work.join(n)).collect();
    let runs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let n = super::report::write_report(
        &runs,
        &work.join(REPORT),
        args.title.as_deref(),
        reference.map(|r| dirs[r].as_path()),
        true,
        None,
        // Pages and tables name the runs where they land, not the staging they are read from.
        Some(
            &names
                .iter()
                .map(|n| args.output.join(n))
                .collect::<Vec<_>>(),
        ),
    )?;
    crate::run::write_json_atomic(
        &work.join(COMPARE_JSON),
        &CompareManifest {
            tool: env!("CARGO_PKG_NAME"),
            tool_version: env!("CARGO_PKG_VERSION"),
            models: args
                .models
                .iter()
                .map(|m| m.display().to_string())
                .collect(),
            runs: &names,
            report: REPORT,
        },
    )?;
    Ok(n)
}

/// Every model's answers, read back from the committed runs (what was written is what is shown).
fn print_answers(args: &CompareArgs, out: &mut dyn Write) -> Result<()> {
    let manifest: serde_json::Value = serde_json::from_str(&crate::paths::read_text(
        &args.output.join(COMPARE_JSON),
        crate::paths::MAX_JSON,
    )?)?;
    let names: Vec<String> = manifest["runs"]
        .as_array()
        .context("compare.json lists no runs")?
        .iter()
        .filter_map(|r| r.as_str().map(String::from))
        .collect();
    let runs = names
        .iter()
        .map(|n| Ok(crate::run::Run::open(&args.output.join(n))?))
        .collect::<Result<Vec<_>>>()?;
    let answers: Vec<Vec<crate::answer::Answer>> = runs
        .iter()
        .map(|r| {
            r.manifest
                .prompts
                .iter()
                .map(crate::answer::Answer::of)
                .collect()
        })
        .collect();
    let csv = args.output.join("report.answers.csv");
    crate::answer::print_compare(
        out,
        &names,
        &answers,
        crate::answer::terminal_width(),
        &format!("see {}", csv.display()),
    )?;
    Ok(())
}

/// File name of the report inside a compare directory.
const REPORT: &str = "report.html";
