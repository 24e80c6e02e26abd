//! What the report shows of one run: its PCA basis and projections, metrics, groups, contrast and
//! lens summary — computed once, streamed over the run's prompts.
//!
//! Memory is bounded by what is drawn and the statistics kept, not by the number of prompts: the
//! states are read one prompt at a time from `last.npy` in a few passes (per-prompt metrics and
//! sums; distances and leave-one-out projections that need the sums; PCA; projections), and the
//! lens one prompt at a time from `lens.json`. What is kept per prompt is a few numbers per point
//! (metrics, 3 PCA coordinates, 2 contrast projections); per group, three `[points, width]` f64
//! sums for labels of two or more prompts, in batches of at most [`GROUP_MEMORY`] (256 MiB; more
//! groups cost more passes over their own members, not memory).

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
    /// Per prompt, per point: the lens entropy (nats), and whether the lens's top token is already
    /// the final prediction ("decided") — kept for the bootstrap intervals of the styles section
    /// (prompts × points values: 1.3 MB for 2,000 prompts × 81 points).
    pub entropy: Vec<Vec<f32>>,
    pub decided: Vec<Vec<bool>>,
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
            entropy: Vec::new(),
            decided: Vec::new(),
        };
        run.for_each_lens(|mut pl: PromptLens| {
            let tr = pl.take_last_prompt();
            for (j, p) in tr.points.iter().enumerate() {
                s.mean_entropy[j] += p.entropy;
                s.mean_p_final[j] += p.p_final;
            }
            s.entropy
                .push(tr.points.iter().map(|p| p.entropy as f32).collect());
            s.decided
                .push(tr.points.iter().map(|p| p.rank_final == 0).collect());
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
    /// The run's directory as pages and tables name it: where the user will find it (a compare's
    /// runs are read from its staging directory and shown where they land).
    pub shown_dir: String,
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
    /// Passes begun (for the progress message).
    passes: std::sync::atomic::AtomicUsize,
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
        let k = self
            .passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.view
            .start(&format!("PCA pass {k}"), self.view.states.n_prompts);
    }
    fn block(&self, b: usize, f: &mut dyn FnMut(ArrayView2<f32>)) -> anyhow::Result<()> {
        let (n, k) = (self.view.states.n_prompts, self.blocks());
        self.view
            .visit(b * n / k..(b + 1) * n / k, &mut |_, h| f(h))
    }
}

/// Passes over a run's prompts, with progress and Ctrl-C checks.
struct Passes<'a> {
    states: &'a LastStates,
    bar: &'a ProgressBar,
    what: &'a str,
}

impl Passes<'_> {
    fn start(&self, step: &str, len: usize) {
        self.bar.set_length(len as u64);
        self.bar.set_position(0);
        self.bar.set_message(format!("{}: {step}", self.what));
    }

    /// The prompts `prompts`, in that order (each read checks for Ctrl-C).
    fn visit(
        &self,
        prompts: impl IntoIterator<Item = usize>,
        f: &mut dyn FnMut(usize, ArrayView2<f32>),
    ) -> anyhow::Result<()> {
        for i in prompts {
            let h = self.states.prompt(i)?;
            f(i, h.view());
            self.bar.inc(1);
        }
        Ok(())
    }

    /// Every prompt, in order.
    fn each(&self, step: &str, f: &mut dyn FnMut(usize, ArrayView2<f32>)) -> anyhow::Result<()> {
        self.start(step, self.states.n_prompts);
        self.visit(0..self.states.n_prompts, f)
    }

    /// The prompts `list`, in that order.
    fn list(
        &self,
        step: &str,
        list: &[usize],
        f: &mut dyn FnMut(usize, ArrayView2<f32>),
    ) -> anyhow::Result<()> {
        self.start(step, list.len());
        self.visit(list.iter().copied(), f)
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
        // Groups of two or more prompts, in batches whose sums fit GROUP_MEMORY: the first batch
        // shares the passes with everything else, later batches read only their own members. A
        // group of one has no pairs (A undefined) and no spread (funnel width 0): no sums needed.
        let per_batch = (GROUP_MEMORY / GroupAccumulator::bytes(p, d).max(1)).max(1);
        let multi: Vec<usize> = (0..order.len())
            .filter(|&g| members[g].len() >= 2)
            .collect();
        let mut batches: Vec<&[usize]> = multi.chunks(per_batch).collect();
        if batches.is_empty() {
            batches.push(&[]);
        }
        let mut stats: Vec<Option<metrics::GroupStats>> = vec![None; order.len()];
        let mut metrics = Vec::with_capacity(n);
        let mut center = Array2::<f64>::zeros((p, d));
        for (b, batch) in batches.iter().enumerate() {
            let mut accs: Vec<GroupAccumulator> =
                batch.iter().map(|_| GroupAccumulator::new(p, d)).collect();
            let slot = |i: usize| batch.iter().position(|&g| g == group_of[i]);
            let prompts: Vec<usize> = if b == 0 {
                (0..n).collect()
            } else {
                (0..n).filter(|&i| slot(i).is_some()).collect()
            };
            passes.list("sums", &prompts, &mut |i, h| {
                if b == 0 {
                    metrics.push(metrics::trajectory(h));
                    center.zip_mut_with(&h, |c, &x| *c += x as f64);
                    for c in contrasts.iter_mut() {
                        c.first(i, h);
                    }
                }
                if let Some(k) = slot(i) {
                    accs[k].first(h);
                }
            })?;
            if b == 0 {
                center /= n as f64;
            }
            passes.list("distances", &prompts, &mut |i, h| {
                if b == 0 {
                    for c in contrasts.iter_mut() {
                        c.second(i, h);
                    }
                }
                if let Some(k) = slot(i) {
                    accs[k].second(h, Some(center.view()));
                }
            })?;
            for (&g, acc) in batch.iter().zip(&accs) {
                stats[g] = Some(acc.finish());
            }
        }
        let stats: Vec<metrics::GroupStats> = stats
            .into_iter()
            .zip(&members)
            .map(|(s, m)| {
                s.unwrap_or_else(|| {
                    // A group of one prompt.
                    let norm = &metrics[m[0]].norm;
                    metrics::GroupStats {
                        alignment: vec![f64::NAN; p],
                        alignment_centered: vec![f64::NAN; p],
                        funnel_width: norm
                            .iter()
                            .map(|&x| if x > 0.0 { 0.0 } else { f64::NAN })
                            .collect(),
                    }
                })
            })
            .collect();
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
        let rows = PromptRows {
            view: &passes,
            passes: Default::default(),
        };
        let pca = Pca::fit_rows(&rows, 3, PcaMethod::for_width(d))?;
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
        // "model.gguf · dir", or just the file name where the directory is named after the model
        // (as `compare` names them): the name should not say the same thing twice.
        let file = &run.manifest.model.file_name;
        let stem = file.strip_suffix(".gguf").unwrap_or(file);
        let name = if dir_name.is_empty() || dir_name == *file || dir_name == stem {
            file.clone()
        } else {
            format!("{file} · {dir_name}")
        };
        Ok(RunView {
            shown_dir: run.dir.display().to_string(),
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
    pub fn generated_path(&self, p: usize) -> anyhow::Result<Option<(Array2<f32>, Vec<usize>)>> {
        let rec = &self.run.manifest.prompts[p];
        if rec.states_file.is_none() {
            return Ok(None);
        }
        let states = self.run.prompt_states(p)?;
        let cols: Vec<usize> = rec
            .positions
            .iter()
            .enumerate()
            .filter(|(_, &pos)| pos + 1 >= rec.n_prompt_tokens)
            .map(|(j, _)| j)
            .collect();
        let h = states.point_positions(self.points.len() - 1, &cols)?;
        Ok(Some((h, cols)))
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
