//! Linear CKA between the states of two models over the same inputs.
//!
//! With few inputs and wide states the plain estimator is biased upward (independent random
//! 576-dim matrices give ≈ 0.95 at n = 30), so the reported CKA is the debiased one built on the
//! unbiased HSIC estimator (Song et al. 2012); the plain one is kept for comparison.

use ndarray::{Array2, ArrayView2, ArrayView3, Axis};

/// Gram matrix `X Xᵀ` (`[n, n]`) of the column-centred rows of `x` (`[n, d]`), in f64.
pub fn gram(x: ArrayView2<f32>) -> Array2<f64> {
    let x = x.mapv(|v| v as f64);
    let mean = x.mean_axis(Axis(0)).expect("n >= 1");
    let xc = &x - &mean;
    xc.dot(&xc.t())
}

/// Unbiased HSIC of two Gram matrices (their diagonals are ignored). Needs n ≥ 4.
pub fn hsic_unbiased(k: &Array2<f64>, l: &Array2<f64>) -> f64 {
    let n = k.nrows();
    assert!(
        n >= 4 && l.nrows() == n,
        "unbiased HSIC needs n >= 4 and equal sizes"
    );
    let zero_diag = |m: &Array2<f64>| {
        let mut m = m.clone();
        m.diag_mut().fill(0.0);
        m
    };
    let (k, l) = (zero_diag(k), zero_diag(l));
    let nf = n as f64;
    let trace_kl: f64 = (&k * &l).sum();
    let (k1, l1) = (k.sum_axis(Axis(1)), l.sum_axis(Axis(1)));
    let (sk, sl) = (k1.sum(), l1.sum());
    (trace_kl + sk * sl / ((nf - 1.0) * (nf - 2.0)) - 2.0 / (nf - 2.0) * k1.dot(&l1))
        / (nf * (nf - 3.0))
}

/// Debiased linear CKA from Gram matrices.
pub fn cka_debiased(k: &Array2<f64>, l: &Array2<f64>) -> f64 {
    hsic_unbiased(k, l) / (hsic_unbiased(k, k) * hsic_unbiased(l, l)).sqrt()
}

/// The plain (biased) linear CKA from Gram matrices of centred data.
pub fn cka_plain(k: &Array2<f64>, l: &Array2<f64>) -> f64 {
    let dot = |a: &Array2<f64>, b: &Array2<f64>| (a * b).sum();
    dot(k, l) / (dot(k, k) * dot(l, l)).sqrt()
}

/// Debiased CKA between every point of `a` (`[n, Pa, d_a]`) and every point of `b`
/// (`[n, Pb, d_b]`), in memory: `[Pa, Pb]`. `order` permutes b's inputs (the shuffled control);
/// None keeps them. The report reads points one at a time through [`cka_matrix_by_point`].
pub fn cka_matrix(a: ArrayView3<f32>, b: ArrayView3<f32>, order: Option<&[usize]>) -> Array2<f64> {
    let rows: Vec<usize> = (0..a.shape()[0]).collect();
    let b_rows: Vec<usize> = order.map(<[usize]>::to_vec).unwrap_or_else(|| rows.clone());
    let point =
        |x: ArrayView3<f32>, k: usize, r: &[usize]| Ok(x.index_axis(Axis(1), k).select(Axis(0), r));
    cka_matrix_by_point(
        (a.shape()[1], &mut |k| point(a, k, &rows)),
        (b.shape()[1], &mut |k| point(b, k, &b_rows)),
    )
    .expect("in-memory reads do not fail")
}

/// Reads point `k`'s rows (`[n, d]`, the same n inputs in the same order for both models).
pub type PointReader<'a> = &'a mut dyn FnMut(usize) -> anyhow::Result<Array2<f32>>;

/// [`cka_matrix`] over points read one at a time: `a` and `b` are (point count, reader). B's Gram
/// matrices are kept (`Pb · n²` f64), A's made one at a time, so memory is bounded by n, not by
/// the width or the number of A's points.
pub fn cka_matrix_by_point(
    a: (usize, PointReader),
    b: (usize, PointReader),
) -> anyhow::Result<Array2<f64>> {
    let gb: Vec<Array2<f64>> = (0..b.0)
        .map(|k| Ok(gram((b.1)(k)?.view())))
        .collect::<anyhow::Result<_>>()?;
    let mut m = Array2::<f64>::zeros((a.0, b.0));
    for i in 0..a.0 {
        let ga = gram((a.1)(i)?.view());
        for (j, g) in gb.iter().enumerate() {
            m[[i, j]] = cka_debiased(&ga, g);
        }
    }
    Ok(m)
}

/// For two depth profiles, the mean CKA along the normalized-depth diagonal (point i of A against
/// the point of B at the same fraction of its depth).
pub fn diagonal_mean(m: &Array2<f64>) -> f64 {
    let (pa, pb) = m.dim();
    let v: Vec<f64> = (0..pa)
        .map(|i| {
            m[[
                i,
                ((i as f64 / (pa - 1).max(1) as f64) * (pb - 1) as f64).round() as usize,
            ]]
        })
        .filter(|x| x.is_finite())
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn rnd(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut s = seed;
        Array2::from_shape_fn((n, d), |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
    }

    #[test]
    fn identity_rotation_and_scaling() {
        let x = rnd(40, 12, 1);
        let k = gram(x.view());
        assert!((cka_debiased(&k, &k) - 1.0).abs() < 1e-12);
        // An orthogonal rotation (a Givens rotation of two axes) and an isotropic scale.
        let (c, s) = (0.6f32, 0.8f32);
        let mut y = x.clone();
        for mut row in y.rows_mut() {
            let (a, b) = (row[0], row[1]);
            row[0] = c * a - s * b;
            row[1] = s * a + c * b;
        }
        let y = y.mapv(|v| v * 3.5);
        let l = gram(y.view());
        assert!((cka_debiased(&k, &l) - 1.0).abs() < 1e-9);
        assert!((cka_plain(&k, &l) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn debiased_is_near_zero_for_independent_wide_matrices_where_plain_is_not() {
        let (x, y) = (rnd(30, 576, 2), rnd(30, 576, 3));
        let (k, l) = (gram(x.view()), gram(y.view()));
        let (plain, deb) = (cka_plain(&k, &l), cka_debiased(&k, &l));
        assert!(plain > 0.85, "plain CKA {plain}");
        assert!(deb.abs() < 0.1, "debiased CKA {deb}");
        assert!(plain - deb > 0.75);
    }
}
