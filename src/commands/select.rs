//! `direction --select FILE -m MODEL`: choose the point whose direction mediates the behaviour,
//! the way the refusal-direction work chooses it (Arditi et al. 2024): every candidate point's
//! direction is ablated at every point while the model answers held-out prompts, and each is
//! scored by what that does — label A's refusal score (the text judge), A's broken text, and the
//! next-token KL it causes on label B's prompts. The chosen point lowers A's refusal score most
//! among the candidates that keep B's KL within a bound and do not break A's text.
//!
//! The best-*separating* point is not the answer: separability usually peaks at the last point,
//! which no block reads, and ablating there is a bias on the logits (measured on
//! Qwen2.5-Coder-1.5B: the README's "Refusal on a model that refuses").

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::trace::{self, Ablation, TraceOptions};
use crate::analysis::effects;
use crate::capture::engine::Positions;
use crate::cli::PromptArgs;
use crate::report::interventions::effects_by_group;
use crate::run::Run;

/// Metadata key of the selection in the direction GGUF (a JSON string: [`Selection`]).
pub const SELECTION_KEY: &str = "gguf_trace.selection";

/// Largest share of label A's generations a chosen candidate may turn into broken text: a
/// direction whose ablation removes refusals by breaking the model is not the refusal direction.
pub const MAX_BROKEN: f64 = 0.25;

/// What ablating one candidate (or nothing: the baseline) does on the held-out prompts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Score {
    /// Label A's refusal score and broken share.
    pub refusal_a: f64,
    pub broken_a: f64,
    /// Label B's refusal score (refusals the ablation adds where there were none to remove).
    pub refusal_b: f64,
    /// Mean next-token KL(baseline ‖ ablated) on label B's and label A's prompts, nats.
    pub kl_b: f64,
    pub kl_a: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    pub point: usize,
    pub score: Score,
}

/// The selection, recorded in the direction file and drawn by the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Selection {
    /// The held-out prompt file.
    pub held_out: String,
    pub labels: (String, String),
    pub n_a: usize,
    pub n_b: usize,
    pub generate: usize,
    pub max_kl: f64,
    pub max_broken: f64,
    pub baseline: Score,
    pub candidates: Vec<Candidate>,
    /// The chosen point; None when no candidate met the bounds.
    pub chosen: Option<usize>,
    /// Why no point was chosen (absent in files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_none: Option<String>,
}

/// Fewest held-out prompts of label A the model must refuse without ablation for a selection: a
/// refusal score moved by one or two prompts cannot tell the candidates apart.
pub const MIN_REFUSED: usize = 3;

impl Selection {
    /// The rule, applied to the scores: the lowest refusal score on A among candidates within
    /// the KL and broken-text bounds (ties go to the lower KL on B), and only if it is lower than
    /// the baseline's and the baseline refuses at least [`MIN_REFUSED`] prompts. Otherwise
    /// nothing is chosen and `why_none` says why.
    pub fn choose(&mut self) {
        self.chosen = None;
        self.why_none = None;
        let (a, b) = (&self.labels.0, &self.labels.1);
        let refused = (self.baseline.refusal_a * self.n_a as f64).round() as usize;
        if refused < MIN_REFUSED {
            self.why_none = Some(format!(
                "without ablation the model refuses only {refused} of the {} held-out {a} prompts: too few to choose a direction by its effect (at least {MIN_REFUSED}; use more or harder prompts)",
                self.n_a
            ));
            return;
        }
        let best = self
            .candidates
            .iter()
            .filter(|c| c.score.kl_b <= self.max_kl && c.score.broken_a <= self.max_broken)
            .min_by(|x, y| {
                x.score
                    .refusal_a
                    .total_cmp(&y.score.refusal_a)
                    .then(x.score.kl_b.total_cmp(&y.score.kl_b))
            });
        match best {
            None => {
                self.why_none = Some(format!(
                    "no candidate kept {b}'s KL within {} nats and {a}'s broken text within {:.0}%",
                    self.max_kl,
                    100.0 * self.max_broken
                ))
            }
            Some(c) if c.score.refusal_a >= self.baseline.refusal_a => {
                self.why_none = Some(format!(
                    "no candidate within the bounds lowers {a}'s refusal score (baseline {:.0}%; the best, point {}, gives {:.0}%)",
                    100.0 * self.baseline.refusal_a,
                    c.point,
                    100.0 * c.score.refusal_a
                ))
            }
            Some(c) => self.chosen = Some(c.point),
        }
    }
}

/// The selection a direction file records, if any.
pub fn recorded(path: &Path) -> Option<Selection> {
    let g = crate::llama::gguf::Gguf::open(path).ok()?;
    serde_json::from_str(&g.get_str(SELECTION_KEY)?).ok()
}

/// How to select.
pub struct SelectOptions<'a> {
    pub model: &'a Path,
    pub held_out: &'a Path,
    pub labels: (&'a str, &'a str),
    pub candidates: Vec<usize>,
    pub generate: usize,
    pub max_kl: f64,
    pub threads: Option<i32>,
}

/// Score every candidate of the direction file `directions` (written from `run`) on the held-out
/// prompts and choose one.
pub fn select(run: &Run, directions: &Path, o: &SelectOptions) -> Result<Selection> {
    // The held-out prompts must carry both labels: checked before the model runs.
    let held = crate::prompts::load_file(o.held_out)
        .with_context(|| format!("--select {}", o.held_out.display()))?;
    let count = |l: &str| {
        held.iter()
            .filter(|p| p.label.as_deref() == Some(l))
            .count()
    };
    let (n_a, n_b) = (count(o.labels.0), count(o.labels.1));
    if n_a == 0 || n_b == 0 {
        bail!(
            "--select {}: the held-out prompts need both labels \"{}\" ({n_a} prompts) and \"{}\" ({n_b} prompts)",
            o.held_out.display(),
            o.labels.0,
            o.labels.1
        );
    }
    if o.generate == 0 {
        bail!("--select-generate must be at least 1: the judge reads the generated text");
    }
    if o.generate > crate::settings::MAX_CTX {
        bail!(
            "--select-generate {}: at most {} tokens (the largest --ctx) can follow a prompt",
            o.generate,
            crate::settings::MAX_CTX
        );
    }
    let tmp =
        tempfile::tempdir().context("cannot create a temporary folder for the selection runs")?;
    let c = &run.manifest.capture;
    let input = PromptArgs {
        prompts: vec![],
        files: vec![o.held_out.to_path_buf()],
        chat: c.chat,
        system: c.system.clone(),
    };
    let options = |out: PathBuf, ablate_from: Option<usize>| {
        let mut t = TraceOptions::new(o.model.to_path_buf(), input.clone(), out);
        t.capture.positions = Positions::Last;
        t.capture.points = "last".into();
        t.capture.generate = o.generate;
        t.capture.cache_type = c.cache_type;
        t.quiet = true;
        if let Some(th) = o.threads {
            t.capture.threads = Some(th);
        }
        t.ablation = ablate_from.map(|p| Ablation {
            file: directions.to_path_buf(),
            points: None,
            direction: Some(p.to_string()),
            taps: Vec::new(),
        });
        t
    };
    let phrases = effects::parse_phrases(effects::DEFAULT_PHRASES);
    eprintln!(
        "selecting among {} candidate points on {} held-out prompts ({} \"{}\", {} \"{}\"), {} tokens each",
        o.candidates.len(),
        n_a + n_b,
        n_a,
        o.labels.0,
        n_b,
        o.labels.1,
        o.generate
    );
    // The traces here are scratch work in a temporary folder: an interrupted one cannot be
    // resumed, whatever the trace's own error says.
    let run_trace = |t: &TraceOptions, what: &str| -> Result<std::path::PathBuf> {
        trace::trace(t).map_err(|e| {
            if crate::llama::backend::interrupted() {
                anyhow::anyhow!(
                    "interrupted while scoring {what}; nothing was written (run the command again to start the selection over)"
                )
            } else {
                e
            }
        })
    };
    let base_dir = run_trace(&options(tmp.path().join("baseline"), None), "the baseline")?;
    let base = Run::open(&base_dir)?;
    if base.manifest.model.n_embd != run.manifest.model.n_embd
        || base.manifest.provenance.model_sha256 != run.manifest.provenance.model_sha256
    {
        bail!(
            "-m {}: not the model {} was traced with (its sha256 differs)",
            o.model.display(),
            run.dir.display()
        );
    }
    // The two labels' prompts (the same indices in every run of the held-out file).
    let groups: Vec<(String, Vec<usize>)> = [o.labels.0, o.labels.1]
        .iter()
        .map(|&l| {
            let ix = (base.manifest.prompts.iter())
                .filter(|p| p.label.as_deref() == Some(l))
                .map(|p| p.index)
                .collect();
            (l.to_string(), ix)
        })
        .collect();
    let score = |r: &Run| -> Result<Score> {
        let fx = effects_by_group(&base, r, groups.clone(), &phrases)?;
        let judged = |e: Option<f64>| e.expect("--select generates, so every run is judged");
        Ok(Score {
            refusal_a: judged(fx[0].refusal),
            broken_a: judged(fx[0].broken),
            refusal_b: judged(fx[1].refusal),
            kl_b: fx[1].kl,
            kl_a: fx[0].kl,
        })
    };
    let baseline = score(&base)?;
    eprintln!(
        "baseline: {} refusal {:.0}%, {} refusal {:.0}%",
        o.labels.0,
        100.0 * baseline.refusal_a,
        o.labels.1,
        100.0 * baseline.refusal_b
    );
    let mut candidates = Vec::new();
    for (k, &p) in o.candidates.iter().enumerate() {
        let dir = run_trace(
            &options(tmp.path().join(format!("p{p}")), Some(p)),
            &format!("point {p}"),
        )?;
        let s = score(&Run::open(&dir)?)?;
        eprintln!(
            "[{}/{}] point {p}: {} refusal {:.0}% (broken {:.0}%), {} KL {:.3}, {} refusal {:.0}%",
            k + 1,
            o.candidates.len(),
            o.labels.0,
            100.0 * s.refusal_a,
            100.0 * s.broken_a,
            o.labels.1,
            s.kl_b,
            o.labels.1,
            100.0 * s.refusal_b
        );
        std::fs::remove_dir_all(&dir).ok();
        candidates.push(Candidate { point: p, score: s });
    }
    let mut sel = Selection {
        held_out: o.held_out.display().to_string(),
        labels: (o.labels.0.to_string(), o.labels.1.to_string()),
        n_a,
        n_b,
        generate: o.generate,
        max_kl: o.max_kl,
        max_broken: MAX_BROKEN,
        baseline,
        candidates,
        chosen: None,
        why_none: None,
    };
    sel.choose();
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(point: usize, refusal_a: f64, broken_a: f64, kl_b: f64) -> Candidate {
        Candidate {
            point,
            score: Score {
                refusal_a,
                broken_a,
                refusal_b: 0.0,
                kl_b,
                kl_a: 0.0,
            },
        }
    }

    #[test]
    fn the_rule_keeps_damage_and_broken_text_out() {
        let mut s = Selection {
            held_out: "h.jsonl".into(),
            labels: ("harmful".into(), "harmless".into()),
            n_a: 10,
            n_b: 10,
            generate: 16,
            max_kl: 0.1,
            max_broken: MAX_BROKEN,
            baseline: cand(0, 0.9, 0.0, 0.0).score,
            candidates: vec![
                cand(5, 0.5, 0.0, 0.02),
                // Lowest refusal, but it breaks the text: out.
                cand(10, 0.0, 0.6, 0.05),
                // Lowest refusal within bounds, tied with 16: the lower KL wins.
                cand(14, 0.1, 0.1, 0.08),
                cand(16, 0.1, 0.0, 0.03),
                // Too much damage on B.
                cand(20, 0.0, 0.0, 0.4),
            ],
            chosen: None,
            why_none: None,
        };
        s.choose();
        assert_eq!(s.chosen, Some(16));
        s.max_kl = 0.01;
        s.choose();
        assert_eq!(s.chosen, None, "no candidate within the KL bound");
        assert!(s
            .why_none
            .as_deref()
            .unwrap()
            .starts_with("no candidate kept"));
        // A candidate that does not lower refusal is not chosen, even the best within bounds.
        s.max_kl = 0.1;
        s.baseline.refusal_a = 0.1;
        s.choose();
        assert_eq!(s.chosen, None);
        // 0.1 of 10 prompts is one refusal: too few to choose from.
        assert!(
            s.why_none
                .as_deref()
                .unwrap()
                .contains("refuses only 1 of the 10"),
            "{s:?}"
        );
        s.n_a = 40;
        s.choose();
        assert_eq!(s.chosen, None);
        assert!(
            s.why_none.as_deref().unwrap().contains("no candidate within the bounds lowers harmful's refusal score (baseline 10%; the best, point 16, gives 10%)"),
            "{s:?}"
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Selection>(&json).unwrap(), s);
    }
}
