//! What the report shows of one run: its PCA basis and projections, metrics, groups, contrast and
//! lens summary — computed once, streamed over the run's prompts.
//!
//! Memory is bounded by what is drawn and the statistics kept, not by the number of prompts: the
//! states are read one prompt at a time from `last.npy` in a few passes (per-prompt metrics and
//! sums; distances and leave-one-out projections that need the sums; PCA; projections), and the
//! lens one prompt at a time from `lens.json`. What is kept per prompt is a few numbers per point
//! (metrics, 3 PCA coordinates, 2 contrast projections); per group, three `[points, width]` f64
//! sums, in batches of at most [`GROUP_MEMORY`] bytes (more groups cost more passes, not memory).

use indicatif::ProgressBar;
use ndarray::{Array2, Array3, ArrayView2};

use super::MAX_DRAWN;
use crate::analysis::contrast::{self, Contrast, ContrastAccumulator};
use crate::analysis::lens::LensTrace;
use crate::analysis::metrics::{self, GroupAccumulator, TrajectoryMetrics};
use crate::analysis::pca::{Pca, PcaMethod, Rows};
use crate::run::read::LastStates;
use crate::run::{PromptLens, Run};

/// Label of prompts that have none.
pub const NO_LABEL: &str = "(no label)";

/// Most memory the group sums of one pass may take.
pub const GROUP_MEMORY: usize = 256 << 20;

pub struct GroupMetrics {
    pub label: String,
    pub members: Vec<usize>,
    /// A(l): mean pairwise (cos + 1) / 2, raw residual stream.
    pub alignment: Vec<f64>,
    /// A(l) after subtracting the per-point mean over all prompts of the run.
    pub alignment_centered: Vec<f64>,
    pub funnel_width: Vec<f64>,
}

pub struct Delta {
    pub a: String,
    pub b: String,
    pub delta: Vec<f64>,
    pub delta_centered: Vec<f64>,
}

/// The contrast of the first two labels (each with at least 3 prompts) and its shuffled control.
pub struct ContrastPair {
    pub a: String,
    pub b: String,
    pub contrast: Contrast,
    pub control: Contrast,
}

/// A valid logit lens, summarised while streaming `lens.json`.
pub struct LensSummary {
    /// The first [`MAX_DRAWN`] prompts' lens at the last prompt position (what the page draws),
    /// with their token pieces.
    pub shown: Vec<(usize, std::collections::BTreeMap<i32, String>, LensTrace)>,
    /// Mean over all prompts, per point, of the lens entropy and of the final token's probability.
    pub mean_entropy: Vec<f64>,
    pub mean_p_final: Vec<f64>,
    /// Every prompt's decision point.
    pub decisions: Vec<usize>,
}

impl LensSummary {
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    fn read(run: &Run) -> anyhow::Result<Option<LensSummary>> {
        if !run.manifest.lens.as_ref().is_some_and(|l| l.valid) {
            return Ok(None);
        }
        let n_points = run.manifest.capture.points.len();
        let mut s = LensSummary {
            shown: Vec::new(),
            mean_entropy: vec![0.0; n_points],
            mean_p_final: vec![0.0; n_points],
            decisions: Vec::new(),
        };
        run.for_each_lens(|mut pl: PromptLens| {
            let k = pl
                .traces
                .iter()
                .position(|t| t.position == pl.last_prompt_position)
                .unwrap_or(0);
            let tr = pl.traces.swap_remove(k);
            for (j, p) in tr.points.iter().enumerate() {
                s.mean_entropy[j] += p.entropy;
                s.mean_p_final[j] += p.p_final;
            }
            s.decisions.push(tr.decision_point);
            if s.shown.len() < MAX_DRAWN {
                s.shown.push((pl.index, pl.pieces, tr));
            }
            Ok(())
        })?;
        let n = s.decisions.len().max(1) as f64;
        s.mean_entropy.iter_mut().for_each(|x| *x /= n);
        s.mean_p_final.iter_mut().for_each(|x| *x /= n);
        Ok(Some(s))
    }
}

pub struct RunView {
    pub run: Run,
    /// Short display name: "SmolLM2-135M-Instruct.Q4_1.gguf · funnel".
    pub name: String,
    /// `last.npy`, read a prompt at a time.
    states: LastStates,
    /// Point index of each stored point.
    pub points: Vec<usize>,
    pub n_layer: usize,
    pub pca: Pca,
    /// `[n_prompts, n_points, 3]` PCA projections.
    pub proj: Array3<f64>,
    pub metrics: Vec<TrajectoryMetrics>,
    pub labels: Vec<String>,
    pub groups: Vec<GroupMetrics>,
    pub delta: Option<Delta>,
    pub contrast: Option<ContrastPair>,
    pub lens: Option<LensSummary>,
}

/// The prompts of a run as rows for the PCA: contiguous blocks of prompts, one prompt's
/// `[n_points, d]` per chunk.
struct PromptRows<'a> {
    view: &'a Passes<'a>,
}

impl Rows for PromptRows<'_> {
    fn width(&self) -> usize {
        self.view.states.n_embd
    }
    fn blocks(&self) -> usize {
        self.view
            .states
            .n_prompts
            .clamp(1, crate::analysis::pca::MAX_BLOCKS)
    }
    fn begin_pass(&self) {
        self.view.start("PCA");
    }
    fn block(&self, b: usize, f: &mut dyn FnMut(ArrayView2<f32>)) -> anyhow::Result<()> {
        let (n, k) = (self.view.states.n_prompts, self.blocks());
        self.view
            .range(b * n / k..(b + 1) * n / k, &mut |_, h| f(h))
    }
}

/// Passes over a run's prompts, with progress and Ctrl-C checks.
struct Passes<'a> {
    states: &'a LastStates,
    bar: &'a ProgressBar,
    what: &'a str,
}

impl Passes<'_> {
    fn start(&self, step: &str) {
        self.bar.set_length(self.states.n_prompts as u64);
        self.bar.set_position(0);
        self.bar.set_message(format!("{}: {step}", self.what));
    }

    /// Prompts `range`, in order.
    fn range(
        &self,
        range: std::ops::Range<usize>,
        f: &mut dyn FnMut(usize, ArrayView2<f32>),
    ) -> anyhow::Result<()> {
        for i in range {
            if crate::llama::backend::interrupted() {
                anyhow::bail!("interrupted: the report was not written");
            }
            let h = self.states.prompt(i)?;
            f(i, h.view());
            self.bar.inc(1);
        }
        Ok(())
    }

    /// Every prompt, in order.
    fn each(&self, step: &str, f: &mut dyn FnMut(usize, ArrayView2<f32>)) -> anyhow::Result<()> {
        self.start(step);
        self.range(0..self.states.n_prompts, f)
    }
}

impl RunView {
    /// Analyse `run`, streaming its states; `bar` shows the passes, labelled `what`.
    pub fn new(run: Run, bar: &ProgressBar, what: &str) -> anyhow::Result<RunView> {
        let states = run.last_states()?;
        let (n, p, d) = (states.n_prompts, states.n_points, states.n_embd);
        let passes = Passes {
            states: &states,
            bar,
            what,
        };
        let labels: Vec<String> = run
            .manifest
            .prompts
            .iter()
            .map(|p| p.label.clone().unwrap_or_else(|| NO_LABEL.to_string()))
            .collect();
        let mut order: Vec<String> = Vec::new();
        for l in &labels {
            if !order.contains(l) {
                order.push(l.clone());
            }
        }
        let members: Vec<Vec<usize>> = order
            .iter()
            .map(|label| (0..n).filter(|&i| &labels[i] == label).collect())
            .collect();
        let group_of: Vec<usize> = labels
            .iter()
            .map(|l| order.iter().position(|o| o == l).expect("label in order"))
            .collect();
        // Contrast of the first two labels, and the shuffled-label control.
        let mut contrasts: Vec<ContrastAccumulator> =
            if members.len() >= 2 && members[0].len() >= 3 && members[1].len() >= 3 {
                let (sa, sb) = contrast::shuffled_groups(&members[0], &members[1], 0x5eed);
                vec![
                    ContrastAccumulator::new(n, p, d, &members[0], &members[1]),
                    ContrastAccumulator::new(n, p, d, &sa, &sb),
                ]
            } else {
                vec![]
            };
        // Groups in batches whose sums fit GROUP_MEMORY; the first batch shares the passes.
        let per_batch = (GROUP_MEMORY / GroupAccumulator::bytes(p, d).max(1)).max(1);
        let batches: Vec<std::ops::Range<usize>> = (0..order.len())
            .step_by(per_batch)
            .map(|s| s..(s + per_batch).min(order.len()))
            .collect();
        let mut stats = Vec::with_capacity(order.len());
        let mut metrics = Vec::with_capacity(n);
        let mut center = Array2::<f64>::zeros((p, d));
        for (b, range) in batches.iter().enumerate() {
            let mut accs: Vec<GroupAccumulator> =
                range.clone().map(|_| GroupAccumulator::new(p, d)).collect();
            let in_batch = |i: usize| range.contains(&group_of[i]);
            passes.each("sums", &mut |i, h| {
                if b == 0 {
                    metrics.push(metrics::trajectory(h));
                    center.zip_mut_with(&h, |c, &x| *c += x as f64);
                    for c in contrasts.iter_mut() {
                        c.first(i, h);
                    }
                }
                if in_batch(i) {
                    accs[group_of[i] - range.start].first(h);
                }
            })?;
            if b == 0 {
                center /= n as f64;
            }
            passes.each("distances", &mut |i, h| {
                if b == 0 {
                    for c in contrasts.iter_mut() {
                        c.second(i, h);
                    }
                }
                if in_batch(i) {
                    accs[group_of[i] - range.start].second(h, Some(center.view()));
                }
            })?;
            stats.extend(accs.iter().map(GroupAccumulator::finish));
        }
        let groups: Vec<GroupMetrics> = order
            .iter()
            .zip(members)
            .zip(stats)
            .map(|((label, members), s)| GroupMetrics {
                label: label.clone(),
                members,
                alignment: s.alignment,
                alignment_centered: s.alignment_centered,
                funnel_width: s.funnel_width,
            })
            .collect();
        let contrast = (contrasts.len() == 2).then(|| {
            let control = contrasts.pop().expect("two").finish();
            ContrastPair {
                a: groups[0].label.clone(),
                b: groups[1].label.clone(),
                contrast: contrasts.pop().expect("two").finish(),
                control,
            }
        });
        let pca = Pca::fit_rows(&PromptRows { view: &passes }, 3, PcaMethod::for_width(d))?;
        let k = pca.components.nrows();
        let mut proj = Array3::<f64>::zeros((n, p, k));
        passes.each("projections", &mut |i, h| {
            proj.index_axis_mut(ndarray::Axis(0), i)
                .assign(&pca.transform(h));
        })?;
        // ΔA between the first two groups (in order of appearance): e.g. paraphrases − unrelated.
        let delta = (groups.len() >= 2).then(|| {
            let (a, b) = (&groups[0], &groups[1]);
            Delta {
                a: a.label.clone(),
                b: b.label.clone(),
                delta: a
                    .alignment
                    .iter()
                    .zip(&b.alignment)
                    .map(|(x, y)| x - y)
                    .collect(),
                delta_centered: a
                    .alignment_centered
                    .iter()
                    .zip(&b.alignment_centered)
                    .map(|(x, y)| x - y)
                    .collect(),
            }
        });
        bar.set_message(format!("{what}: lens"));
        let lens = LensSummary::read(&run)?;
        let dir_name = run
            .dir
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!("{} · {dir_name}", run.manifest.model.file_name);
        Ok(RunView {
            points: run.manifest.capture.points.clone(),
            n_layer: run.manifest.model.n_layer,
            name,
            states,
            pca,
            proj,
            metrics,
            labels,
            groups,
            delta,
            contrast,
            lens,
            run,
        })
    }

    /// Prompt `i`'s trajectory at the last prompt position, `[n_points, d]` (read from disk).
    pub fn trajectory(&self, i: usize) -> anyhow::Result<Array2<f32>> {
        Ok(self.states.prompt(i)?)
    }

    /// Point `k` of the prompts `rows`, `[rows.len(), d]` (read from disk).
    pub fn point_rows(&self, k: usize, rows: &[usize]) -> anyhow::Result<Array2<f32>> {
        Ok(self.states.point_rows(k, rows)?)
    }

    pub fn n_prompts(&self) -> usize {
        self.states.n_prompts
    }

    /// Depth of each stored point as a fraction of the model's blocks (point / n_layer).
    pub fn depth(&self) -> Vec<f64> {
        self.points
            .iter()
            .map(|&p| p as f64 / self.n_layer.max(1) as f64)
            .collect()
    }

    /// Prompt `p`'s path over generation at the last stored point: `[steps, d]`, the last prompt
    /// token first, then each generated token; with the stored column of each step.
    pub fn generated_path(&self, p: usize) -> Option<(Array2<f32>, Vec<usize>)> {
        let rec = &self.run.manifest.prompts[p];
        let states = self.run.prompt_states(p).ok()?;
        let cols: Vec<usize> = rec
            .positions
            .iter()
            .enumerate()
            .filter(|(_, &pos)| pos + 1 >= rec.n_prompt_tokens)
            .map(|(j, _)| j)
            .collect();
        let h = states.point_positions(self.points.len() - 1, &cols).ok()?;
        Some((h, cols))
    }

    pub fn group_names(&self) -> Vec<&str> {
        self.groups.iter().map(|g| g.label.as_str()).collect()
    }
}

/// At most `max` prompt indices, evenly spread (every k-th), so large runs stay drawable.
pub fn thin(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let k = n.div_ceil(max);
    (0..n).step_by(k).collect()
}
