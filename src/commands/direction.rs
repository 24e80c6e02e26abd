//! `gguf-trace direction RUN --labels A,B -o dir.gguf`: the contrast direction as a control vector.

use std::io::Write;

use anyhow::{bail, Context as _, Result};

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
    let (c, control) = analyse(&run, &a, &b)?;
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
    let peak = points[c.peak];
    write_control_vector_with_peak(
        &staged,
        &run.manifest.model.architecture,
        &dirs,
        (peak >= 2).then_some(peak),
    )
    .with_context(|| format!("cannot write {}", args.output.display()))?;
    sync_file(&staged)?;
    staging.commit(&[name], &[])?;
    let pk = c.peak;
    let s = c.separation[pk];
    let cs = control.separation[control.peak];
    let sh = c.sharpness;
    eprintln!(
        "{a} vs {b}: peak at point {} — leave-one-out d = {:.2}, accuracy = {:.1}% (shuffled labels: d = {:.2}, accuracy = {:.1}% at their own peak, point {})",
        points[pk],
        s.d,
        100.0 * s.accuracy,
        cs.d,
        100.0 * cs.accuracy,
        points[control.peak]
    );
    eprintln!(
        "switch: {} — {:.0}% of the rise in d ({:.2}) happens within {} steps from point {}",
        if sh.hard { "hard" } else { "soft" },
        100.0 * sh.max_window_share,
        sh.rise,
        sh.window,
        points[sh.window_start]
    );
    eprintln!(
        "wrote {} direction tensors (direction.{}..direction.{}), scale = raw difference of means",
        dirs.len(),
        dirs[0].0,
        dirs.last().unwrap().0
    );
    writeln!(out, "{}", args.output.display())?;
    Ok(())
}
