//! What the report shows of one run: its states, PCA basis, metrics and groups — computed once.

use ndarray::{Array2, Array3, Axis};

use crate::analysis::metrics::{self, TrajectoryMetrics};
use crate::analysis::pca::Pca;
use crate::run::Run;

/// Label of prompts that have none.
pub const NO_LABEL: &str = "(no label)";

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

pub struct RunView {
    pub run: Run,
    /// Short display name: "SmolLM2-135M-Instruct.Q4_1.gguf · funnel".
    pub name: String,
    /// `[n_prompts, n_points, d]` at the last prompt position.
    pub last: Array3<f32>,
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
}

impl RunView {
    pub fn new(run: Run) -> anyhow::Result<RunView> {
        let last = run.last()?;
        let (n, p, d) = last.dim();
        let flat = last
            .view()
            .into_shape_with_order((n * p, d))
            .expect("contiguous");
        let pca = Pca::fit(flat, 3)?;
        let proj = pca
            .transform(flat)
            .into_shape_with_order((n, p, pca.components.nrows()))
            .expect("shape");
        let metrics: Vec<TrajectoryMetrics> =
            last.outer_iter().map(|h| metrics::trajectory(h)).collect();
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
        let center: Array2<f32> = metrics::point_means(last.view());
        let groups: Vec<GroupMetrics> = order
            .iter()
            .map(|label| {
                let members: Vec<usize> = (0..n).filter(|&i| &labels[i] == label).collect();
                GroupMetrics {
                    alignment: metrics::alignment(last.view(), &members, None),
                    alignment_centered: metrics::alignment(
                        last.view(),
                        &members,
                        Some(center.view()),
                    ),
                    funnel_width: metrics::funnel_width(last.view(), &members),
                    label: label.clone(),
                    members,
                }
            })
            .collect();
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
            last,
            pca,
            proj,
            metrics,
            labels,
            groups,
            delta,
            run,
        })
    }

    pub fn n_prompts(&self) -> usize {
        self.last.len_of(Axis(0))
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
    pub fn generated_path(&self, p: usize) -> Option<(ndarray::Array2<f32>, Vec<usize>)> {
        let rec = &self.run.manifest.prompts[p];
        let states = self.run.states(p).ok()?;
        let cols: Vec<usize> = rec
            .positions
            .iter()
            .enumerate()
            .filter(|(_, &pos)| pos + 1 >= rec.n_prompt_tokens)
            .map(|(j, _)| j)
            .collect();
        let h = states
            .select(Axis(1), &cols)
            .index_axis(Axis(0), self.points.len() - 1)
            .to_owned();
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
