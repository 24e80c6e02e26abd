//! `gguf-trace report RUN_DIR... -o report.html`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context as _, Result};

use super::spinner;
use crate::cli::ReportArgs;
use crate::report::{self, csv_out, page, view::RunView};
use crate::run::Run;

/// Build the report for `runs` and write it (HTML and CSVs) atomically. Returns the figure count.
pub fn write_report(
    runs: &[&Path],
    out: &Path,
    title: Option<&str>,
    reference: Option<&Path>,
) -> Result<usize> {
    if runs.is_empty() {
        bail!("no run directories given");
    }
    if out.is_dir() {
        bail!(
            "{}: is a directory; give the report's file name, e.g. {}/report.html",
            out.display(),
            out.display()
        );
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!(
            "cannot write {}: {} is not a directory",
            out.display(),
            parent.display()
        );
    }
    let opened: Vec<Run> = runs
        .iter()
        .map(|d| Run::open(d))
        .collect::<Result<_, _>>()?;
    let sp = spinner("analysing");
    let views: Vec<RunView> = opened
        .into_iter()
        .map(|r| {
            let d = r.dir.display().to_string();
            RunView::new(r).with_context(|| format!("{d}: analysing"))
        })
        .collect::<Result<_>>()?;
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
    let (sections, ladder) = report::build(&views, reference)?;
    let csv_paths: Vec<_> = csv_out::kinds(ladder.is_some())
        .into_iter()
        .map(|k| csv_out::path(out, k))
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
        csv_files: csv_paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect(),
    })
    .context("rendering the report page")?;
    sp.set_message("writing");
    csv_out::write(out, &views, ladder.as_ref())?;
    let tmp = out.with_extension("html.tmp");
    std::fs::write(&tmp, html).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    sp.finish_and_clear();
    Ok(page::n_figures(&sections))
}

pub fn run(args: &ReportArgs, out: &mut dyn Write) -> Result<()> {
    let runs: Vec<&Path> = args.runs.iter().map(|p| p.as_path()).collect();
    let n = write_report(
        &runs,
        &args.output,
        args.title.as_deref(),
        args.reference.as_deref(),
    )?;
    eprintln!("report with {n} figures from {} run(s)", runs.len());
    writeln!(out, "{}", args.output.display())?;
    Ok(())
}
