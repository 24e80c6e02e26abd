//! PCA with ndarray-linalg: one basis per model, fitted on all points of all prompts shown.
//!
//! The basis comes from the eigen-decomposition of the d×d covariance (LAPACK `syevd` through
//! ndarray-linalg's `eigh`), which works the same for n < d and n > d and costs O(n·d²) once.
//! Components are sign-stable: each is flipped so that its largest-magnitude loading is positive.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use ndarray_linalg::{Eigh, UPLO};

#[derive(Debug, thiserror::Error)]
pub enum PcaError {
    #[error("PCA needs at least 2 points, got {0}")]
    TooFew(usize),
    #[error("PCA failed in LAPACK: {0}")]
    Linalg(#[from] ndarray_linalg::error::LinalgError),
}

#[derive(Debug, Clone)]
pub struct Pca {
    pub mean: Array1<f64>,
    /// `[k, d]`: the principal axes, one per row, by decreasing variance.
    pub components: Array2<f64>,
    /// Variance along each component.
    pub variance: Array1<f64>,
    /// Share of the total variance along each component.
    pub explained_ratio: Array1<f64>,
}

impl Pca {
    /// Fit `k` components on the rows of `x` (`[n, d]`).
    pub fn fit(x: ArrayView2<f32>, k: usize) -> Result<Pca, PcaError> {
        let (n, d) = x.dim();
        if n < 2 {
            return Err(PcaError::TooFew(n));
        }
        let x = x.mapv(|v| v as f64);
        let mean = x.mean_axis(Axis(0)).expect("n >= 2");
        let xc = &x - &mean;
        let cov = xc.t().dot(&xc) / (n as f64 - 1.0);
        let total: f64 = cov.diag().sum();
        let (vals, vecs) = cov.eigh(UPLO::Upper)?;
        // eigh returns ascending eigenvalues; take the largest k.
        let k = k.min(d);
        let mut components = Array2::<f64>::zeros((k, d));
        let mut variance = Array1::<f64>::zeros(k);
        for c in 0..k {
            let j = d - 1 - c;
            let mut v = vecs.column(j).to_owned();
            let (imax, _) = v.iter().enumerate().fold((0, 0.0f64), |(bi, bv), (i, &x)| {
                if x.abs() > bv {
                    (i, x.abs())
                } else {
                    (bi, bv)
                }
            });
            if v[imax] < 0.0 {
                v.mapv_inplace(|x| -x);
            }
            components.row_mut(c).assign(&v);
            variance[c] = vals[j].max(0.0);
        }
        let explained_ratio = if total > 0.0 {
            variance.mapv(|v| v / total)
        } else {
            Array1::zeros(k)
        };
        Ok(Pca {
            mean,
            components,
            variance,
            explained_ratio,
        })
    }

    /// Project rows `[n, d]` onto the components: `[n, k]`.
    pub fn transform(&self, x: ArrayView2<f32>) -> Array2<f64> {
        let xc = x.mapv(|v| v as f64) - &self.mean;
        xc.dot(&self.components.t())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Deterministic pseudo-random numbers (no RNG crate needed in tests).
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn planted(n: usize, d: usize) -> (Array2<f32>, Vec<usize>) {
        // Variance 100 along axis 3, 25 along axis 7, noise 0.01 elsewhere.
        let mut s = 42u64;
        let x = Array2::from_shape_fn((n, d), |(_, j)| {
            let r = lcg(&mut s);
            let scale = match j {
                3 => 10.0,
                7 => 5.0,
                _ => 0.1,
            };
            (r * scale * 3f64.sqrt()) as f32 + 1.0
        });
        (x, vec![3, 7])
    }

    #[test]
    fn recovers_planted_directions_when_n_exceeds_d() {
        let (x, axes) = planted(2000, 16);
        let p = Pca::fit(x.view(), 3).unwrap();
        for (c, &axis) in axes.iter().enumerate() {
            assert!(
                p.components[[c, axis]] > 0.99,
                "component {c}: {:?}",
                p.components.row(c)
            );
        }
        let total = 100.0 + 25.0 + 14.0 * 0.01;
        assert!(
            (p.explained_ratio[0] - 100.0 / total).abs() < 0.03,
            "{}",
            p.explained_ratio[0]
        );
        assert!(
            (p.explained_ratio[1] - 25.0 / total).abs() < 0.03,
            "{}",
            p.explained_ratio[1]
        );
        assert!(p.explained_ratio[2] < 0.01);
    }

    #[test]
    fn works_when_d_exceeds_n_and_is_sign_stable() {
        let (x, _) = planted(40, 200);
        let p = Pca::fit(x.view(), 2).unwrap();
        assert!(p.components[[0, 3]] > 0.95);
        // Sign-stable: negating the data's centred part gives the same axes.
        let neg = x.mapv(|v| 2.0 - v);
        let q = Pca::fit(neg.view(), 2).unwrap();
        for c in 0..2 {
            let dot: f64 = p.components.row(c).dot(&q.components.row(c));
            assert!(dot > 0.999, "component {c} flipped sign");
        }
        let y = p.transform(x.view());
        assert_eq!(y.dim(), (40, 2));
        assert!(
            y.column(0).mean().unwrap().abs() < 1e-6,
            "projections are centred"
        );
    }

    #[test]
    fn too_few_points() {
        let x = Array2::<f32>::zeros((1, 4));
        assert!(Pca::fit(x.view(), 2).is_err());
    }
}
