//! Control vectors in llama.cpp's format: export of contrast directions, and a loader that applies
//! the rules of llama.cpp's own loader (in its C++ `common` library, not in the bindings):
//! tensors `direction.<il>` with il ≥ 1, F32, one dimension, the same width everywhere (= the
//! model's n_embd), several files summed, each scaled by its strength. The loaded buffer starts at
//! il = 1, as `llama_set_adapter_cvec` expects.

use std::path::Path;

use crate::llama::gguf::Gguf;

#[derive(Debug, thiserror::Error)]
pub enum CvecError {
    #[error(transparent)]
    Gguf(#[from] crate::llama::gguf::GgufError),
    #[error("{path}: tensor {name}: not a control-vector direction (expected direction.<layer> with layer 1..=4096)")]
    BadName { path: String, name: String },
    #[error("{path}: {name} is {ty}, expected a 1-D f32 tensor")]
    BadType {
        path: String,
        name: String,
        ty: String,
    },
    #[error("{path}: control vector width {got} does not match the model's width {want}")]
    Width {
        path: String,
        got: usize,
        want: usize,
    },
    #[error("{path}: holds no direction tensors")]
    Empty { path: String },
    #[error("{path}: {name} holds non-finite values (NaN or infinity)")]
    NonFinite { path: String, name: String },
    #[error("control-vector strength {0} is not a finite number")]
    Strength(f32),
    #[error("{path} records point {n_layer} as its peak, which no block reads (only the output does), so an intervention there is a bias on the logits; run `gguf-trace direction` again (it now records the best point a block reads) or choose with {choose}")]
    LastPoint {
        path: String,
        n_layer: usize,
        choose: &'static str,
    },
}

/// A loaded control vector: `data[(il - 1) * n_embd ..]` is the shift at llama.cpp layer il.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    pub n_embd: usize,
    pub data: Vec<f32>,
    /// The llama.cpp layers (il) the files hold a direction for.
    pub layers: std::collections::BTreeSet<usize>,
}

impl ControlVector {
    /// Highest llama.cpp layer index with data.
    pub fn n_layers(&self) -> usize {
        self.data.len() / self.n_embd.max(1)
    }

    /// The direction at point `p` (llama.cpp layer p − 1, so p ≥ 2) scaled to unit length
    /// (all zeros for a zero direction); None where the files hold none.
    pub fn unit_at(&self, p: usize) -> Option<Vec<f64>> {
        if p < 2 || !self.layers.contains(&(p - 1)) {
            return None;
        }
        let d = &self.data[(p - 2) * self.n_embd..(p - 1) * self.n_embd];
        let norm = d.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        Some(
            d.iter()
                .map(|&x| if norm > 0.0 { x as f64 / norm } else { 0.0 })
                .collect(),
        )
    }
}

/// The peak point a direction file records (`direction` writes it), if any.
pub fn peak_point(path: &Path) -> Option<usize> {
    Gguf::open(path)
        .ok()?
        .get_f64(crate::llama::gguf::PEAK_POINT_KEY)
        .map(|p| p as usize)
}

/// The point a direction file records for interventions by default (its [`peak_point`]) on a
/// model of `n_layer` blocks. A recorded point n_layer is refused: no block reads it, and
/// `choose` names the option with which the user picks a point instead.
pub fn default_point(
    path: &Path,
    n_layer: usize,
    choose: &'static str,
) -> Result<Option<usize>, CvecError> {
    match peak_point(path) {
        Some(p) if p == n_layer => Err(CvecError::LastPoint {
            path: path.display().to_string(),
            n_layer,
            choose,
        }),
        p => Ok(p),
    }
}

/// Highest layer index accepted (no model has more blocks; a larger index would only make the
/// loader allocate for nothing).
pub const MAX_LAYER: usize = 4096;

/// Load and sum control-vector files (each with its strength) for a model of width `n_embd`.
pub fn load(files: &[(&Path, f32)], n_embd: usize) -> Result<ControlVector, CvecError> {
    let mut cv = ControlVector {
        n_embd,
        data: Vec::new(),
        layers: Default::default(),
    };
    for &(path, strength) in files {
        if !strength.is_finite() {
            return Err(CvecError::Strength(strength));
        }
        let p = path.display().to_string();
        let g = Gguf::open(path)?;
        let tensors = g.tensors();
        if tensors.is_empty() {
            return Err(CvecError::Empty { path: p });
        }
        for t in tensors {
            let il: usize = t
                .name
                .strip_prefix("direction.")
                .and_then(|n| n.parse().ok())
                .filter(|&il| (1..=MAX_LAYER).contains(&il))
                .ok_or_else(|| CvecError::BadName {
                    path: p.clone(),
                    name: t.name.clone(),
                })?;
            if t.ty != "f32" || t.shape.len() != 1 {
                return Err(CvecError::BadType {
                    path: p.clone(),
                    name: t.name.clone(),
                    ty: format!("{} {:?}", t.ty, t.shape),
                });
            }
            if t.shape[0] != n_embd {
                return Err(CvecError::Width {
                    path: p.clone(),
                    got: t.shape[0],
                    want: n_embd,
                });
            }
            let v = g.read_f32(&t.name)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(CvecError::NonFinite {
                    path: p.clone(),
                    name: t.name.clone(),
                });
            }
            cv.layers.insert(il);
            if cv.data.len() < il * n_embd {
                cv.data.resize(il * n_embd, 0.0);
            }
            for (d, s) in cv.data[(il - 1) * n_embd..il * n_embd].iter_mut().zip(&v) {
                *d += s * strength;
            }
        }
    }
    Ok(cv)
}
