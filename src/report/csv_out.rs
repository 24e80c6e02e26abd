//! The report's numbers as CSV beside it, one table shape per file:
//! - `<stem>.answers.csv`: per run and prompt — the top next tokens (id, text, probability) and
//!   the generated text;
//! - `<stem>.metrics.csv`: per run, prompt and point — the per-trajectory metrics and PCA coordinates;
//! - `<stem>.groups.csv`: per run, label and point — A, centered A, funnel width;
//! - `<stem>.delta.csv`: per run and point — ΔA between the first two labels;
//! - for a quantization ladder, `<stem>.drift.csv` (per level and point: cosine, relative error)
//!   and `<stem>.kl.csv` (per level and prompt: KL, top-1 agreement, Δp).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::quant::Ladder;
use super::view::RunView;
use crate::analysis::metrics::TrajectoryMetrics;

/// Path of the CSV file `kind` written beside `report` (`report.metrics.csv`, ...).
pub fn path(report: &Path, kind: &str) -> PathBuf {
    let stem = report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let dir = report
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join(format!("{stem}.{kind}.csv"))
}

/// Kinds of CSV written for a report (drift and kl only for a quantization ladder).
pub fn kinds(ladder: bool) -> Vec<&'static str> {
    let mut k = vec!["answers", "metrics", "groups", "delta"];
    if ladder {
        k.extend(["drift", "kl"]);
    }
    k
}

fn num(x: f64) -> String {
    if x.is_finite() {
        x.to_string()
    } else {
        String::new()
    }
}

/// Write the CSVs (into the report's staging directory).
pub fn write(report: &Path, views: &[RunView], ladder: Option<&Ladder>) -> Result<()> {
    write_csv(&path(report, "answers"), |w| {
        w.write_record(super::answers::csv_header())?;
        for v in views {
            for row in super::answers::csv_rows(v) {
                w.write_record(&row)?;
            }
        }
        Ok(())
    })?;
    let (mp, gp, dp) = (
        path(report, "metrics"),
        path(report, "groups"),
        path(report, "delta"),
    );
    write_csv(&mp, |w| {
        let mut h = vec!["run", "model", "prompt", "id", "label", "point", "depth"];
        h.extend(TrajectoryMetrics::NAMES);
        h.extend(["pc1", "pc2", "pc3"]);
        w.write_record(&h)?;
        for v in views {
            let depth = v.depth();
            for (i, m) in v.metrics.iter().enumerate() {
                let rec = &v.run.manifest.prompts[i];
                for (k, &p) in v.points.iter().enumerate() {
                    let mut r = vec![
                        v.shown_dir.clone(),
                        v.run.manifest.model.file_name.clone(),
                        i.to_string(),
                        rec.id.clone(),
                        v.labels[i].clone(),
                        p.to_string(),
                        depth[k].to_string(),
                    ];
                    r.extend(TrajectoryMetrics::NAMES.iter().map(|n| num(m.get(n)[k])));
                    r.extend((0..3).map(|c| {
                        if c < v.proj.shape()[2] {
                            num(v.proj[[i, k, c]])
                        } else {
                            String::new()
                        }
                    }));
                    w.write_record(&r)?;
                }
            }
        }
        Ok(())
    })?;
    write_csv(&gp, |w| {
        w.write_record([
            "run",
            "model",
            "label",
            "n",
            "point",
            "depth",
            "alignment",
            "alignment_centered",
            "funnel_width",
        ])?;
        for v in views {
            let depth = v.depth();
            for g in &v.groups {
                for (k, &p) in v.points.iter().enumerate() {
                    w.write_record([
                        v.shown_dir.clone(),
                        v.run.manifest.model.file_name.clone(),
                        g.label.clone(),
                        g.members.len().to_string(),
                        p.to_string(),
                        depth[k].to_string(),
                        num(g.alignment[k]),
                        num(g.alignment_centered[k]),
                        num(g.funnel_width[k]),
                    ])?;
                }
            }
        }
        Ok(())
    })?;
    write_csv(&dp, |w| {
        w.write_record([
            "run",
            "model",
            "group_a",
            "group_b",
            "point",
            "depth",
            "delta_a",
            "delta_a_centered",
        ])?;
        for v in views {
            if let Some(d) = &v.delta {
                let depth = v.depth();
                for (k, &p) in v.points.iter().enumerate() {
                    w.write_record([
                        v.shown_dir.clone(),
                        v.run.manifest.model.file_name.clone(),
                        d.a.clone(),
                        d.b.clone(),
                        p.to_string(),
                        depth[k].to_string(),
                        num(d.delta[k]),
                        num(d.delta_centered[k]),
                    ])?;
                }
            }
        }
        Ok(())
    })?;
    if let Some(l) = ladder {
        write_csv(&path(report, "drift"), |w| {
            w.write_record([
                "run",
                "file_type",
                "tensor_mix",
                "reference",
                "point",
                "depth",
                "n",
                "mean_cos",
                "min_cos",
                "mean_rel_err",
            ])?;
            for lv in &l.levels {
                let v = &views[lv.run];
                let depth = v.depth();
                for (k, d) in lv.drift.iter().enumerate() {
                    w.write_record([
                        v.shown_dir.clone(),
                        v.run.manifest.model.file_type.clone(),
                        v.run.manifest.model.tensor_mix(),
                        (lv.run == l.reference).to_string(),
                        v.points[k].to_string(),
                        depth[k].to_string(),
                        d.n.to_string(),
                        num(d.mean_cos),
                        num(d.min_cos),
                        num(d.mean_rel_err),
                    ])?;
                }
            }
            Ok(())
        })?;
        write_csv(&path(report, "kl"), |w| {
            w.write_record([
                "run",
                "file_type",
                "prompt",
                "id",
                "kl",
                "top1_agree",
                "dp_ref_top",
            ])?;
            for lv in &l.levels {
                let v = &views[lv.run];
                for (i, rec) in v.run.manifest.prompts.iter().enumerate() {
                    w.write_record([
                        v.shown_dir.clone(),
                        v.run.manifest.model.file_type.clone(),
                        i.to_string(),
                        rec.id.clone(),
                        num(lv.output.kl[i]),
                        lv.output.top1_agree[i].to_string(),
                        num(lv.output.dp[i]),
                    ])?;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn write_csv(
    path: &Path,
    body: impl FnOnce(&mut csv::Writer<std::fs::File>) -> Result<(), csv::Error>,
) -> Result<()> {
    // `path` is inside the report's staging directory: written once, synced, swapped in later.
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    body(&mut w).with_context(|| format!("writing {}", path.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    w.get_ref()
        .sync_all()
        .with_context(|| format!("writing {}", path.display()))
}
