//! `gguf-trace direction RUN --labels A,B -o dir.gguf`: the contrast direction as a control vector.

use std::io::Write;

use anyhow::{bail, Context as _, Result};

use super::select::{self, Selection, SELECTION_KEY};
use crate::analysis::contrast::{self, Contrast, ContrastAccumulator};
use crate::cli::DirectionArgs;
use crate::llama::gguf::write_control_vector_with_peak;
use crate::output::{check_target, sync_file, Kind, Staging};
use crate::run::Run;

/// The prompts of labels `a` and `b` in a run; clear errors when a label is missing or too small.
pub fn groups(run: &Run, a: &str, b: &str) -> Result<(Vec<usize>, Vec<usize>)> {
    let labels: Vec<String> = run
        .manifest
        .prompts
        .iter()
        .map(|p| p.label.clone().unwrap_or_default())
        .collect();
    let mut present: Vec<&str> = labels.iter().map(String::as_str).collect();
    present.sort();
    present.dedup();
    let pick = |l: &str| -> Result<Vec<usize>> {
        let v: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == l).collect();
        if v.is_empty() {
            bail!(
                "label \"{l}\" is not in {} (its labels: {})",
                run.dir.display(),
                present.join(", ")
            );
        }
        if v.len() < 3 {
            bail!(
                "label \"{l}\" has {} prompt(s) in {}; a leave-one-out contrast needs at least 3",
                v.len(),
                run.dir.display()
            );
        }
        Ok(v)
    };
    Ok((pick(a)?, pick(b)?))
}

/// Run `--select`: the candidate directions go to a temporary control vector that the selection's
/// ablation runs read.
fn select_point(
    args: &DirectionArgs,
    run: &Run,
    dirs: &[(usize, Vec<f32>)],
    held_out: &std::path::Path,
    labels: (&str, &str),
) -> Result<Selection> {
    let model = args
        .model
        .as_ref()
        .context("--select needs the model: -m model.gguf")?;
    let n_layer = run.manifest.model.n_layer;
    let kept = &run.manifest.capture.points;
    // Each candidate's direction is ablated at every point 2..=L, as the README says: the
    // temporary file needs a direction at each, so the run must keep them all.
    if let Some(p) = (2..=n_layer).find(|p| !kept.contains(p)) {
        bail!(
            "--select: {} does not keep point {p}; a candidate is ablated at every point 2..={n_layer}, so trace the run without --points",
            run.dir.display()
        );
    }
    let candidates: Vec<usize> = match &args.select_points {
        Some(spec) => {
            let v = crate::cli::parse_points(spec, n_layer)
                .map_err(|e| anyhow::anyhow!(e.replace("--points", "--select-points")))?;
            if let Some(p) = v
                .iter()
                .find(|&&p| p < 2 || p >= n_layer || !kept.contains(&p))
            {
                bail!(
                    "--select-points: point {p} is not a candidate (candidates are the points 2..={} that a block reads and the run keeps: {})",
                    n_layer - 1,
                    crate::cli::format_points(kept)
                );
            }
            v
        }
        None => kept
            .iter()
            .copied()
            .filter(|p| (2..n_layer).contains(p))
            .collect(),
    };
    if candidates.is_empty() {
        bail!(
            "--select: the run keeps no candidate point (2..{})",
            n_layer - 1
        );
    }
    if args.select_max_kl.is_nan() || args.select_max_kl < 0.0 {
        bail!("--select-max-kl must be a number ≥ 0");
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let file = tmp.path().join("candidates.gguf");
    crate::llama::gguf::write_control_vector(&file, &run.manifest.model.architecture, dirs)
        .context("cannot write the candidate directions")?;
    select::select(
        run,
        &file,
        &select::SelectOptions {
            model,
            held_out,
            labels,
            candidates,
            generate: args.select_generate,
            max_kl: args.select_max_kl,
            threads: args.threads,
        },
    )
}

/// Index (into `points`) of the best-separating point in 2..n_layer: a point a block reads and a
/// control vector can shift (llama.cpp has no slot for point 1's block 0). None when the run keeps
/// no such point.
pub fn intervention_peak(points: &[usize], c: &Contrast, n_layer: usize) -> Option<usize> {
    (0..points.len())
        .filter(|&k| (2..n_layer).contains(&points[k]))
        .max_by(|&a, &b| c.separation[a].d.total_cmp(&c.separation[b].d))
}

/// Parse "A,B".
pub fn parse_labels(spec: &str) -> Result<(String, String)> {
    match spec
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [a, b] if !a.is_empty() && !b.is_empty() && a != b => Ok((a.to_string(), b.to_string())),
        _ => bail!("--labels: expected two different labels \"A,B\", got \"{spec}\""),
    }
}

/// The contrast of a run's two labels, and the shuffled-label control.
pub fn analyse(run: &Run, a: &str, b: &str) -> Result<(Contrast, Contrast)> {
    let (ga, gb) = groups(run, a, b)?;
    // Streamed: one prompt's states in memory at a time, whatever the run's size.
    let states = run.last_states()?;
    let (n, p, d) = (states.n_prompts, states.n_points, states.n_embd);
    let (sa, sb) = contrast::shuffled_groups(&ga, &gb, 0x5eed);
    let mut accs = [
        ContrastAccumulator::new(n, p, d, &ga, &gb),
        ContrastAccumulator::new(n, p, d, &sa, &sb),
    ];
    let members: Vec<usize> = (0..n).filter(|&i| accs[0].member(i)).collect();
    for i in members {
        let h = states.prompt(i)?;
        accs.iter_mut().for_each(|c| c.first(i, h.view()));
    }
    for i in 0..n {
        let h = states.prompt(i)?;
        accs.iter_mut().for_each(|c| c.second(i, h.view()));
    }
    let [c, control] = accs.map(ContrastAccumulator::finish);
    Ok((c, control))
}

pub fn run(args: &DirectionArgs, out: &mut dyn Write) -> Result<()> {
    let (a, b) = parse_labels(&args.labels)?;
    check_target(&args.output, Kind::ControlVector, args.force)?;
    let run = Run::open(&args.run)?;
    run.require_finite()?;
    let identity = run.identity();
    let (c, control) = analyse(&run, &a, &b).map_err(|e| identity.explain(e))?;
    // Readers take no lock: states read from a run replaced meanwhile may mix two runs.
    identity.check()?;
    let points = &run.manifest.capture.points;
    // direction.<il> shifts l_out-il, i.e. point il + 1: export every stored point p ≥ 2.
    let dirs: Vec<(usize, Vec<f32>)> = points
        .iter()
        .enumerate()
        .filter(|(_, &p)| p >= 2)
        .map(|(k, &p)| (p - 1, c.directions.row(k).to_vec()))
        .collect();
    if dirs.is_empty() {
        bail!(
            "{}: the run keeps no point ≥ 2, so there is nothing a control vector can shift",
            args.run.display()
        );
    }
    let name = args
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the output path names no file")?;
    let staging = Staging::new(&args.output)?;
    let staged = staging.path(&name);
    // The point recorded for interventions: the best-separating point that a block reads. Point
    // n_layer (after the last block) feeds only the final norm and the unembedding: ablating or
    // steering there is a bias on the logits, not an edit any block computes with.
    let n_layer = run.manifest.model.n_layer;
    let read = intervention_peak(points, &c, n_layer);
    let selection = match &args.select {
        Some(held_out) => Some(select_point(args, &run, &dirs, held_out, (&a, &b))?),
        None => None,
    };
    let recorded = selection
        .as_ref()
        .and_then(|s| s.chosen)
        .or(read.map(|k| points[k]));
    let json = selection.as_ref().map(serde_json::to_string).transpose()?;
    write_control_vector_with_peak(
        &staged,
        &run.manifest.model.architecture,
        &dirs,
        recorded,
        json.as_deref().map(|j| (SELECTION_KEY, j)),
    )
    .with_context(|| format!("cannot write {}", args.output.display()))
    .map_err(|e| super::name_full_disk(&crate::output::parent_dir(&args.output), e))?;
    sync_file(&staged)?;
    staging.commit(&[name], &[])?;
    let pk = c.peak;
    let (ga, gb) = groups(&run, &a, &b)?;
    eprintln!(
        "{a} vs {b}: {}",
        crate::analysis::contrast::reading(&c, &control, ga.len(), gb.len(), points)
    );
    if let Some(sel) = &selection {
        match sel.chosen {
            Some(p) => {
                let c = sel
                    .candidates
                    .iter()
                    .find(|c| c.point == p)
                    .expect("the chosen point is a candidate");
                eprintln!(
                    "selected point {p}: ablating its direction brings {a}'s refusal score on the held-out prompts from {:.0}% to {:.0}% (broken text {:.0}%), {b}'s next-token KL {:.3} nats; --ablate and --control-vector use it by default",
                    100.0 * sel.baseline.refusal_a,
                    100.0 * c.score.refusal_a,
                    100.0 * c.score.broken_a,
                    c.score.kl_b
                );
            }
            None => eprintln!(
                "note: no point chosen: {}; the file records the best-separating point a block reads instead",
                sel.why_none.as_deref().unwrap_or("no candidate met the bounds")
            ),
        }
    }
    match read {
        Some(k) if k != pk && selection.is_none() => eprintln!(
            "interventions default to point {} (d = {:.2}), the best-separating point a block reads: point {} is read by no block, only by the output",
            points[k],
            c.separation[k].d,
            points[pk]
        ),
        Some(_) => {}
        None => eprintln!(
            "note: the run keeps no point in 2..{} that a block reads, so the file records no default point for --ablate and --control-vector",
            n_layer.saturating_sub(1)
        ),
    }
    eprintln!(
        "wrote {}: {} direction tensors (direction.{}..direction.{}), scale = raw difference of means — next: gguf-trace trace MODEL.gguf --ablate {} -p TEXT -o runs/ablated (or --control-vector {} --control-scale S)",
        args.output.display(),
        dirs.len(),
        dirs[0].0,
        dirs.last().unwrap().0,
        super::shell_word(&args.output),
        super::shell_word(&args.output)
    );
    writeln!(out, "{}", args.output.display())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    /// Two groups whose separation grows with depth, largest at the last point: the point
    /// recorded for interventions is the best one before it (and never point 0 or 1).
    #[test]
    fn the_intervention_point_is_one_a_block_reads() {
        let (n, p, d) = (12, 6, 4);
        let mut states = Array3::<f32>::zeros((n, p, d));
        for i in 0..n {
            let sign = if i < n / 2 { 1.0 } else { -1.0 };
            for k in 0..p {
                // Separation along axis 0 grows with k; per-prompt noise along axis 1 and 0.
                states[[i, k, 0]] = sign * k as f32 + 0.3 * ((i * 7 + k) % 5) as f32;
                states[[i, k, 1]] = ((i * 3 + k) % 4) as f32;
            }
        }
        let a: Vec<usize> = (0..n / 2).collect();
        let b: Vec<usize> = (n / 2..n).collect();
        let c = contrast::contrast(states.view(), &a, &b);
        let points: Vec<usize> = (0..p).collect();
        let n_layer = p - 1;
        assert_eq!(
            c.peak, n_layer,
            "the planted separation peaks at the last point"
        );
        assert_eq!(intervention_peak(&points, &c, n_layer), Some(n_layer - 1));
        assert_eq!(intervention_peak(&[0, 1, n_layer], &c, n_layer), None);
    }
}
