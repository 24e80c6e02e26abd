//! `gguf-trace report RUN_DIR... -o report.html`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::{bar, spinner};
use crate::cli::ReportArgs;
use crate::output::{check_target, write_synced, Kind, Staging};
use crate::report::{self, csv_out, page, view::RunView};
use crate::run::Run;

/// Build the report for `runs` and write it (HTML and CSVs) atomically: every file is staged
/// and swapped into place only when all are written. `force` allows replacing an earlier
/// gguf-trace report (never any other file). Returns the figure count.
pub fn write_report(
    runs: &[&Path],
    out: &Path,
    title: Option<&str>,
    reference: Option<&Path>,
    force: bool,
    refusal_phrases: Option<&Path>,
    shown_as: Option<&[PathBuf]>,
) -> Result<usize> {
    let phrases = crate::analysis::effects::parse_phrases(&match refusal_phrases {
        Some(p) => crate::paths::read_text(p, 16 << 20)
            .with_context(|| format!("--refusal-phrases {}: cannot read", p.display()))?,
        None => crate::analysis::effects::DEFAULT_PHRASES.to_string(),
    });
    if phrases.is_empty() {
        bail!("--refusal-phrases: the file lists no phrase");
    }
    if runs.is_empty() {
        bail!("no run directories given");
    }
    // The same run twice is not a comparison (nor a quantization ladder of one file).
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[..i] {
            if let (Ok(x), Ok(y)) = (a.canonicalize(), b.canonicalize()) {
                if x == y {
                    bail!(
                        "{} and {} are the same run; give each run once (several runs are compared with each other)",
                        b.display(),
                        a.display()
                    );
                }
            }
        }
    }
    if out.is_dir() {
        bail!(
            "{}: is a directory; give the report's file name, e.g. {}/report.html",
            out.display(),
            out.display()
        );
    }
    // The page and every CSV it may have: all must be free (or earlier output of ours with --force).
    let html_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the output path names no file")?;
    check_target(out, Kind::Report, force)?;
    for k in csv_out::kinds(true) {
        check_target(&csv_out::path(out, k), Kind::Report, force)?;
    }
    let opened: Vec<Run> = runs
        .iter()
        .map(|d| {
            let r = Run::open(d)?;
            r.require_finite()?;
            Ok(r)
        })
        .collect::<Result<_>>()?;
    // Readers take no lock: a run replaced meanwhile (a --force retrace) is detected and named.
    let identities: Vec<_> = opened.iter().map(Run::identity).collect();
    let replaced = |e: anyhow::Error| {
        identities
            .iter()
            .find_map(|id| id.check().err())
            .map_or(e, anyhow::Error::from)
    };
    crate::output::pause_point("report-read");
    let sp = bar(0, "prompts");
    let mut views: Vec<RunView> = Vec::with_capacity(opened.len());
    for (i, r) in opened.into_iter().enumerate() {
        check_interrupt()?;
        let d = r.dir.display().to_string();
        let what = format!("run {}/{}", i + 1, runs.len());
        let mut view = RunView::new(r, &sp, &what)
            .with_context(|| format!("{d}: analysing"))
            .map_err(replaced)?;
        if let Some(p) = shown_as.and_then(|s| s.get(i)) {
            view.shown_dir = p.display().to_string();
        }
        views.push(view);
    }
    sp.finish_and_clear();
    let sp = spinner("drawing");
    check_interrupt()?;
    sp.set_message("drawing");
    let reference = match reference {
        None => None,
        Some(r) => {
            let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            Some(
                views
                    .iter()
                    .position(|v| canon(&v.run.dir) == canon(r))
                    .with_context(|| {
                        format!("--reference {} is not one of the runs given", r.display())
                    })?,
            )
        }
    };
    let (sections, ladder) = report::build(&views, reference, &phrases).map_err(replaced)?;
    for id in &identities {
        id.check()?;
    }
    check_interrupt()?;
    let csv_names: Vec<String> = csv_out::kinds(ladder.is_some())
        .into_iter()
        .map(|k| file_name(&csv_out::path(out, k)))
        .collect();
    let default_title = format!(
        "gguf-trace: {}",
        views
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(" vs ")
    );
    let html = page::render(&page::PageInput {
        title: title.unwrap_or(&default_title),
        views: &views,
        sections: &sections,
        csv_files: csv_names.clone(),
    })
    .context("rendering the report page")?;
    sp.set_message("writing");
    let staging = Staging::new(out)?;
    let staged = staging.path(&html_name);
    csv_out::write(&staged, &views, ladder.as_ref())?;
    write_synced(&staged, html.as_bytes())?;
    let mut names = csv_names;
    names.push(html_name);
    // CSVs of an earlier report that this one does not have (a ladder's drift/kl) would be stale.
    let stale: Vec<String> = csv_out::kinds(true)
        .into_iter()
        .map(|k| file_name(&csv_out::path(out, k)))
        .filter(|n| !names.contains(n))
        .collect();
    staging.commit(&names, &stale)?;
    sp.finish_and_clear();
    Ok(page::n_figures(&sections))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Stop with an error if Ctrl-C or SIGTERM arrived.
fn check_interrupt() -> Result<()> {
    if crate::llama::backend::interrupted() {
        bail!("interrupted: the report was not written");
    }
    Ok(())
}

pub fn run(args: &ReportArgs, out: &mut dyn Write) -> Result<()> {
    let runs: Vec<&Path> = args.runs.iter().map(|p| p.as_path()).collect();
    let n = write_report(
        &runs,
        &args.output,
        args.title.as_deref(),
        args.reference.as_deref(),
        args.force,
        args.refusal_phrases.as_deref(),
        None,
    )?;
    eprintln!(
        "wrote {} — {n} figures from {} run(s), with its CSV tables beside it; open it in a browser (it works offline)",
        args.output.display(),
        runs.len()
    );
    writeln!(out, "{}", args.output.display())?;
    Ok(())
}
