//! `gguf-trace patch`: causal tracing (Meng et al., 2022, "Locating and editing factual
//! associations in GPT") on a GGUF model as it really runs. The clean prompt is traced at every
//! point and position; its greedy next token is the answer. Then, one (point, position) at a time,
//! the corrupted prompt is run with that single state replaced by the clean run's (activation
//! patching in the eval callback, see `llama::context::Edit`), and the probability of the answer
//! at the last position is recorded: the cells where it comes back carry the answer.
//!
//! Beside the residual row, the two rows that separate attention from the MLP (their Figure 1):
//! restoring what the attention (`attn_out`) or the MLP (`mlp_out`) of a window of blocks around
//! each block added at one token, from the clean run (taps patched in the eval callback).

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use ndarray::{Array2, Array3};
use plotly::common::{ColorScale, ColorScalePalette, Title};
use plotly::layout::Axis;
use plotly::{HeatMap, Layout, Plot};

use super::{bar, load_model, resolve_threads};
use crate::capture::engine::{Patch, PatchPositions, Positions, TraceConfig, Tracer};
use crate::capture::taps::Tap;
use crate::cli::{parse_points, PatchArgs};
use crate::llama::model::{LoadOptions, Model};
use crate::llama::Token;
use crate::output::{check_target, write_synced, Kind, Staging};
use crate::report::{page, Figure, Section};

/// The result of a sweep.
pub struct Sweep {
    pub clean: Vec<Token>,
    pub corrupt: Vec<Token>,
    /// The clean run's greedy next token.
    pub answer: Token,
    /// P(answer) at the last position: clean, corrupted.
    pub p_clean: f64,
    pub p_corrupt: f64,
    /// What each prompt answers: its top next tokens.
    pub clean_top: Vec<crate::answer::TopToken>,
    pub corrupt_top: Vec<crate::answer::TopToken>,
    pub points: Vec<usize>,
    /// `[points, positions]`: P(answer) with that one state patched from the clean run.
    pub p: Array2<f64>,
    /// The attention and MLP rows: per component, `[blocks, positions]`: P(answer) with the
    /// component's output at the window of blocks around that block restored at that position.
    pub components: Vec<(Tap, Array2<f64>)>,
    /// Blocks restored together around each block (Meng et al.: 10).
    pub window: usize,
}

/// The blocks restored around block `b` by a window of `w` (Meng et al.'s convention:
/// `max(0, b − w/2) .. min(L, b + ⌈w/2⌉)`, so a window of 10 is b−5 ..= b+4).
pub fn window_blocks(b: usize, w: usize, n_layer: usize) -> Vec<usize> {
    (b.saturating_sub(w / 2)..(b + w.div_ceil(2)).min(n_layer)).collect()
}

fn softmax_at(logits: &[f32], token: Token) -> f64 {
    crate::analysis::lens::log_softmax(logits)[token as usize].exp()
}

/// Trace one prompt and return its trace.
fn trace_one(tracer: &mut Tracer, tokens: &[Token]) -> Result<crate::capture::engine::PromptTrace> {
    let mut got = None;
    tracer.trace(
        &[tokens.to_vec()],
        |t| {
            got = Some(t);
            Ok(())
        },
        |_| {},
    )?;
    got.context("the tracer returned no prompt")
}

/// Run the sweep over `points` (every position of the prompt).
pub fn sweep(
    model: &Model,
    clean: &[Token],
    corrupt: &[Token],
    points: &[usize],
    (components, window): (&[Tap], usize),
    threads: i32,
    mut progress: impl FnMut(),
) -> Result<Sweep> {
    if clean.len() != corrupt.len() {
        bail!(
            "the clean prompt has {} tokens and the corrupted one {}: patching needs the same token count (change the corrupted subject to one of the same length)",
            clean.len(),
            corrupt.len()
        );
    }
    let n_layer = model.n_layer();
    let mut cfg = TraceConfig::new(model);
    cfg.threads = threads;
    cfg.n_seq = 1;
    cfg.ctx = clean.len().max(8);
    cfg.n_batch = cfg.ctx;
    cfg.n_ubatch = cfg.ctx;
    cfg.taps = components.to_vec();
    let mut tracer = Tracer::new(model, cfg.clone())?;
    let clean_trace = trace_one(&mut tracer, clean)?;
    let answer = crate::capture::engine::argmax(&clean_trace.logits) as Token;
    let p_clean = softmax_at(&clean_trace.logits, answer);
    let top = |logits: &[f32]| {
        crate::answer::top_k(logits, crate::answer::TOP_K, |id| model.token_piece(id))
    };
    let clean_top = top(&clean_trace.logits);
    let states: Arc<Array3<f32>> = Arc::new(clean_trace.states);
    let clean_taps: Arc<Vec<ndarray::ArrayD<f32>>> = Arc::new(clean_trace.taps);
    drop(tracer);

    // The corrupted runs keep only the last position: the patch needs no capture, only the
    // logits (and, to patch taps, the taps located at every block).
    if components.is_empty() {
        cfg.points = vec![n_layer];
    }
    cfg.positions = Positions::Last;
    let mut tracer = Tracer::new(model, cfg)?;
    let corrupt_logits = trace_one(&mut tracer, corrupt)?.logits;
    let p_corrupt = softmax_at(&corrupt_logits, answer);
    let corrupt_top = top(&corrupt_logits);
    let t = clean.len();
    let mut p = Array2::<f64>::zeros((points.len(), t));
    for (k, &point) in points.iter().enumerate() {
        for j in 0..t {
            let states = states.clone();
            tracer.set_patch(Some(Patch {
                points: vec![point],
                taps: vec![Tap::Resid],
                heads: None,
                positions: PatchPositions::List(vec![j]),
                source: Box::new(move |_, _, pt, pos| {
                    Ok(states
                        .slice(ndarray::s![pt, pos, ..])
                        .iter()
                        .copied()
                        .collect())
                }),
            }))?;
            p[[k, j]] = softmax_at(&trace_one(&mut tracer, corrupt)?.logits, answer);
            progress();
        }
    }
    let mut rows = Vec::new();
    for (c, &tap) in components.iter().enumerate() {
        let mut pc = Array2::<f64>::zeros((n_layer, t));
        for b in 0..n_layer {
            for j in 0..t {
                let taps = clean_taps.clone();
                tracer.set_patch(Some(Patch {
                    points: window_blocks(b, window, n_layer),
                    taps: vec![tap],
                    heads: None,
                    positions: PatchPositions::List(vec![j]),
                    // The clean trace kept every block (tap row = block) and every position.
                    source: Box::new(move |_, _, block, pos| {
                        Ok(taps[c]
                            .slice(ndarray::s![block, pos, ..])
                            .iter()
                            .copied()
                            .collect())
                    }),
                }))?;
                pc[[b, j]] = softmax_at(&trace_one(&mut tracer, corrupt)?.logits, answer);
                progress();
            }
        }
        rows.push((tap, pc));
    }
    Ok(Sweep {
        clean: clean.to_vec(),
        corrupt: corrupt.to_vec(),
        answer,
        p_clean,
        p_corrupt,
        clean_top,
        corrupt_top,
        points: points.to_vec(),
        p,
        components: rows,
        window,
    })
}

pub fn run(args: &PatchArgs, out: &mut dyn Write) -> Result<()> {
    if args.output.is_dir() {
        bail!(
            "{}: is a directory; give the page's file name, e.g. {}/patch.html",
            args.output.display(),
            args.output.display()
        );
    }
    if args
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        bail!(
            "{}: give the page's name (e.g. patch.html); the CSV is written beside it",
            args.output.display()
        );
    }
    let csv = args.output.with_extension("csv");
    check_target(&args.output, Kind::Report, args.force)?;
    check_target(&csv, Kind::Report, args.force)?;
    let threads = resolve_threads(args.threads)?;
    let model = load_model(args.model.path(), LoadOptions::default())?;
    if let Some(why) = crate::capture::arch::untraceable_reason(&model) {
        bail!("{}: cannot be traced: {why}", args.model.path().display());
    }
    let points = parse_points(&args.points, model.n_layer()).map_err(anyhow::Error::msg)?;
    let components: Vec<Tap> = super::trace::parse_patch_taps(&args.taps)
        .map_err(|e| anyhow::anyhow!(e.to_string().replacen("--patch-taps", "--taps", 1)))?
        .into_iter()
        .filter(|t| t.in_block())
        .collect();
    let window = args.window as usize;
    let clean = crate::chat::tokenize_prompt(&model, &args.clean)?;
    let corrupt = crate::chat::tokenize_prompt(&model, &args.corrupt)?;
    let runs = (points.len() + components.len() * model.n_layer()) * clean.len();
    let pb = bar(runs as u64, "patched runs");
    pb.set_message("patching");
    let s = sweep(
        &model,
        &clean,
        &corrupt,
        &points,
        (&components, window),
        threads,
        || pb.inc(1),
    )?;
    pb.finish_and_clear();

    let pieces: Vec<String> = s.corrupt.iter().map(|&t| model.token_piece(t)).collect();
    let clean_pieces: Vec<String> = s.clean.iter().map(|&t| model.token_piece(t)).collect();
    let answer = model.token_piece(s.answer);
    // The share of the clean probability a patch restores: (p − p_corrupt) / (p_clean − p_corrupt).
    let span = s.p_clean - s.p_corrupt;
    let effect = |v: f64| {
        if span.abs() > 0.0 {
            (v - s.p_corrupt) / span
        } else {
            f64::NAN
        }
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    // component: resid (layer = the point patched), or a tap inside the block (layer = the block
    // at the centre of the window restored).
    w.write_record([
        "component",
        "layer",
        "position",
        "clean_piece",
        "corrupt_piece",
        "p_answer",
        "restored",
    ])?;
    let n_layer = model.n_layer();
    let mut grids: Vec<(String, Vec<usize>, &Array2<f64>)> =
        vec![("resid".to_string(), s.points.clone(), &s.p)];
    for (tap, grid) in &s.components {
        grids.push((tap.to_string(), (0..n_layer).collect(), grid));
    }
    for (name, layers, grid) in &grids {
        for (k, &pt) in layers.iter().enumerate() {
            for j in 0..pieces.len() {
                w.write_record([
                    name.clone(),
                    pt.to_string(),
                    j.to_string(),
                    clean_pieces[j].clone(),
                    pieces[j].clone(),
                    format!("{:.6e}", grid[[k, j]]),
                    format!("{:.6}", effect(grid[[k, j]])),
                ])?;
            }
        }
    }
    let csv_bytes = w.into_inner().context("writing the CSV")?;

    let esc = crate::report::trajectories::html_escape;
    let labels: Vec<String> = (0..pieces.len())
        .map(|j| {
            let (a, b) = (&clean_pieces[j], &pieces[j]);
            let tok = if a == b {
                a.clone()
            } else {
                format!("{a}/{b}")
            };
            format!("{j}: {}", esc(&crate::answer::visible(&tok)))
        })
        .collect();
    let heat = |layers: &[usize], grid: &Array2<f64>, y_title: &str| {
        let ys: Vec<String> = layers.iter().map(|p| p.to_string()).collect();
        let z: Vec<Vec<f64>> = grid.outer_iter().map(|r| r.to_vec()).collect();
        let mut plot = Plot::new();
        plot.add_trace(
            HeatMap::new(labels.clone(), ys, z)
                .color_scale(ColorScale::Palette(ColorScalePalette::Viridis))
                .color_bar(
                    plotly::common::ColorBar::new().title(Title::with_text("P(clean answer)")),
                )
                .name("P(answer)"),
        );
        plot.set_layout(
            Layout::new()
                .height(620)
                .x_axis(
                    Axis::new()
                        .title(Title::with_text("position: clean/corrupted token"))
                        .tick_angle(-90.0)
                        .auto_margin(true),
                )
                .y_axis(Axis::new().title(Title::with_text(y_title))),
        );
        plot
    };
    let plot = heat(&s.points, &s.p, "point patched");
    let mut figures = vec![Figure {
            title: "P(clean answer) with one state patched from the clean run".into(),
            caption: "Each cell runs the corrupted prompt with one state — the residual stream at that point (row) and token position (column) — replaced by the clean prompt's, and shows the probability of the clean answer at the last position. Bright cells carry the information that decides the answer: typically the subject's last token in early-to-middle points, and the last position in late points. The last point only acts at the last position (it feeds nothing but the logits). A cell can exceed the clean prompt's own P: one clean state inside the corrupted context can push the answer further than the whole clean prompt does.".into(),
            plot,
        }];
    for (tap, grid) in &s.components {
        let (what, who) = match tap {
            Tap::AttnOut => ("attention's output", "attention"),
            Tap::MlpOut => ("MLP's output", "the MLP"),
            _ => ("tap", "this part"),
        };
        figures.push(Figure {
            title: format!("P(clean answer) with {what} (`{tap}`) restored over {} block(s)", s.window),
            caption: format!(
                "Each cell runs the corrupted prompt with what {who} added to the residual stream at one token position (column) restored from the clean run, at the {} block(s) centred on the row's block (blocks b−{} … b+{}, cut at the model's ends), as Meng et al. (2022) separate attention from the MLP. Compare with the residual row above: where the MLP row lights up at the subject's tokens and the attention row does not, the MLP of those blocks writes what the subject recalls; attention that lights up at the last position moves it there. One block's part alone rarely moves the answer, hence the window (--window).",
                s.window,
                s.window / 2,
                s.window.div_ceil(2) - 1
            ),
            plot: heat(&(0..n_layer).collect::<Vec<_>>(), grid, "block at the window's centre"),
        });
    }
    let sections = [Section {
        tabs: Vec::new(),
        title: "Causal tracing".into(),
        note: format!(
            "<table class=\"answers\"><tr><th>prompt</th><th>answer: the most likely next tokens</th></tr>\
             <tr><td><b>clean</b><br>{}</td><td>{}</td></tr>\
             <tr><td><b>corrupted</b><br>{}</td><td>{}</td></tr></table>\
             <p>The clean answer <code>{}</code> has P = {:.3} after the clean prompt and {:.3} after the corrupted one; the figure shows how much of it one state from the clean run brings back. Model: {}.</p>",
            esc(&args.clean),
            crate::report::answers::top_html(&s.clean_top, 3),
            esc(&args.corrupt),
            crate::report::answers::top_html(&s.corrupt_top, 3),
            esc(&crate::answer::visible(&answer)),
            s.p_clean,
            s.p_corrupt,
            esc(&args.model.path().display().to_string())
        ),
        figures,
    }];
    let html = page::render(&page::PageInput {
        title: "gguf-trace: causal tracing",
        views: &[],
        sections: &sections,
        csv_files: vec![csv
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()],
    })
    .context("rendering the page")?;
    let names: Vec<String> = [&args.output, &csv]
        .iter()
        .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect::<Option<_>>()
        .context("the output path names no file")?;
    let staging = Staging::new(&args.output)?;
    write_synced(&staging.path(&names[1]), &csv_bytes)?;
    write_synced(&staging.path(&names[0]), html.as_bytes())?;
    staging.commit(&names, &[])?;
    // The strongest cells, for the terminal.
    let mut cells: Vec<(f64, usize, usize)> =
        s.p.indexed_iter()
            .map(|((k, j), &v)| (v, s.points[k], j))
            .collect();
    cells.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!(
        "clean → {}\ncorrupted → {}",
        crate::answer::top_line(&s.clean_top, 3),
        crate::answer::top_line(&s.corrupt_top, 3)
    );
    eprintln!(
        "answer {:?}: P = {:.3} clean, {:.3} corrupted; strongest patches: {}",
        answer,
        s.p_clean,
        s.p_corrupt,
        cells
            .iter()
            .take(5)
            .map(|(v, p, j)| format!("point {p} at {j} ({:?}) {v:.3}", pieces[*j]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (tap, grid) in &s.components {
        if let Some(((b, j), v)) = grid.indexed_iter().max_by(|a, b| a.1.total_cmp(b.1)) {
            eprintln!(
                "strongest {tap} restore ({}-block window): centred on block {b} at {j} ({:?}) {v:.3}",
                s.window, pieces[j]
            );
        }
    }
    eprintln!(
        "wrote {} and {} — open the page in a browser (it works offline)",
        args.output.display(),
        csv.display()
    );
    writeln!(out, "{}", args.output.display())?;
    Ok(())
}
