//! Per-head summaries of attention patterns (the `pattern` tap), so that known head types show up
//! by name: how spread out a head's attention is (entropy), how much goes to the first token (an
//! attention sink), to the previous token, and — where a prompt repeats a token — to the token
//! that followed that token's previous occurrence (an induction head's signature).

use ndarray::{ArrayView4, Axis};

/// One prompt's means per (block, head), each over the query positions where it is defined.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadStats {
    /// `[block][head]` mean entropy of a query's attention, in nats, over queries after the
    /// first (whose one key leaves no choice).
    pub entropy: Vec<Vec<f64>>,
    /// `[block][head]` mean attention to the first token, over queries after it.
    pub first: Vec<Vec<f64>>,
    /// `[block][head]` mean attention to the previous token, over queries from the third on (at
    /// the second, the previous token is the first).
    pub previous: Vec<Vec<f64>>,
    /// `[block][head]` mean attention to the token after the query token's previous occurrence,
    /// over queries whose token occurred before with that next token neither the query nor its
    /// previous token; `None` where no query has such an occurrence.
    pub induction: Option<Vec<Vec<f64>>>,
}

/// The four statistics of one prompt. `pattern` is `[block, head, query, key]` with the queries
/// at `positions` (absolute token positions) and the keys over every token of `tokens`.
pub fn head_stats(pattern: ArrayView4<f32>, positions: &[usize], tokens: &[i32]) -> HeadStats {
    let (n_block, n_head) = (pattern.len_of(Axis(0)), pattern.len_of(Axis(1)));
    // For each stored query: the key an induction head would attend to, if any.
    let induction_key: Vec<Option<usize>> = positions
        .iter()
        .map(|&q| {
            let t = tokens.get(q)?;
            let j = (0..q).rev().find(|&j| tokens[j] == *t)?;
            // Not the query itself, nor the previous token (a previous-token head would score).
            (j + 2 < q).then_some(j + 1)
        })
        .collect();
    let any_induction = induction_key.iter().any(Option::is_some);
    let mut out = HeadStats {
        entropy: vec![vec![0.0; n_head]; n_block],
        first: vec![vec![0.0; n_head]; n_block],
        previous: vec![vec![0.0; n_head]; n_block],
        induction: any_induction.then(|| vec![vec![0.0; n_head]; n_block]),
    };
    for b in 0..n_block {
        for h in 0..n_head {
            let (mut ent, mut first, mut prev, mut ind) = (0.0, 0.0, 0.0, 0.0);
            let (mut n_all, mut n_after, mut n_ind) = (0usize, 0usize, 0usize);
            for (qi, &q) in positions.iter().enumerate() {
                let row =
                    pattern.slice(ndarray::s![b, h, qi, ..=q.min(pattern.len_of(Axis(3)) - 1)]);
                // The first query has one key: its entropy is 0 and it attends to itself.
                if q >= 1 {
                    ent -= row
                        .iter()
                        .filter(|&&p| p > 0.0)
                        .map(|&p| p as f64 * (p as f64).ln())
                        .sum::<f64>();
                    n_all += 1;
                    first += row[0] as f64;
                }
                // At query 1 the previous token is the first: counted only from query 2 on.
                if q >= 2 {
                    prev += row[q - 1] as f64;
                    n_after += 1;
                }
                if let Some(k) = induction_key[qi] {
                    ind += row[k] as f64;
                    n_ind += 1;
                }
            }
            let mean = |s: f64, n: usize| if n == 0 { f64::NAN } else { s / n as f64 };
            out.entropy[b][h] = mean(ent, n_all);
            out.first[b][h] = mean(first, n_all);
            out.previous[b][h] = mean(prev, n_after);
            if let Some(i) = out.induction.as_mut() {
                i[b][h] = mean(ind, n_ind);
            }
        }
    }
    out
}

/// A head is named for a behaviour when its mean over prompts passes these marks (the common
/// reading of such scores: most of a head's attention goes where the name says).
pub const PREVIOUS_TOKEN_MARK: f64 = 0.5;
pub const FIRST_TOKEN_MARK: f64 = 0.8;
pub const INDUCTION_MARK: f64 = 0.3;

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    /// Heads built to be what the names say: head 0 attends to the previous token, head 1 to the
    /// first, head 2 uniformly, head 3 to the token after the previous occurrence (else itself).
    #[test]
    fn built_heads_get_their_scores() {
        // "a b c a b c": tokens repeat from position 3.
        let tokens = [1, 2, 3, 1, 2, 3];
        let n = tokens.len();
        let positions: Vec<usize> = (0..n).collect();
        let mut p = Array4::<f32>::zeros((1, 4, n, n));
        for q in 0..n {
            p[[0, 0, q, q.saturating_sub(1)]] = 1.0;
            p[[0, 1, q, 0]] = 1.0;
            for k in 0..=q {
                p[[0, 2, q, k]] = 1.0 / (q + 1) as f32;
            }
            let k = (0..q)
                .rev()
                .find(|&j| tokens[j] == tokens[q])
                .map(|j| j + 1)
                .filter(|&k| k + 1 < q)
                .unwrap_or(q);
            p[[0, 3, q, k]] = 1.0;
        }
        let s = head_stats(p.view(), &positions, &tokens);
        assert!((s.previous[0][0] - 1.0).abs() < 1e-9);
        assert!((s.first[0][1] - 1.0).abs() < 1e-9);
        assert!(s.previous[0][1] < 0.25);
        let ind = s.induction.unwrap();
        assert!((ind[0][3] - 1.0).abs() < 1e-9, "{ind:?}");
        assert!(ind[0][0] < 0.01 && ind[0][1] < 0.01);
        // Entropy: 0 for the one-hot heads, the mean of ln(q+1) for the uniform one.
        assert!(s.entropy[0][0].abs() < 1e-9);
        let want = (2..=n).map(|k| (k as f64).ln()).sum::<f64>() / (n - 1) as f64;
        assert!((s.entropy[0][2] - want).abs() < 1e-6);
    }

    /// Period-2 text ("a b a b"): the token after the previous occurrence is the previous token,
    /// so a previous-token head must not score as an induction head.
    #[test]
    fn a_previous_token_head_is_not_an_induction_head() {
        let tokens = [1, 2, 1, 2, 1, 2, 3, 4, 3, 4, 5, 6, 7, 5, 6, 7];
        let n = tokens.len();
        let mut p = Array4::<f32>::zeros((1, 1, n, n));
        for q in 0..n {
            p[[0, 0, q, q.saturating_sub(1)]] = 1.0;
        }
        let positions: Vec<usize> = (0..n).collect();
        let s = head_stats(p.view(), &positions, &tokens);
        assert!((s.previous[0][0] - 1.0).abs() < 1e-9);
        let ind = s.induction.unwrap();
        assert!(ind[0][0] < 0.01, "{ind:?}");
    }

    #[test]
    fn no_repeated_token_means_no_induction_score() {
        let tokens = [5, 6, 7];
        let p = Array4::<f32>::from_elem((1, 1, 3, 3), 1.0 / 3.0);
        let s = head_stats(p.view(), &[0, 1, 2], &tokens);
        assert!(s.induction.is_none());
        // Only the last query stored (`--positions last`).
        let p = Array4::<f32>::from_elem((1, 1, 1, 3), 1.0 / 3.0);
        let s = head_stats(p.view(), &[2], &tokens);
        assert!((s.first[0][0] - 1.0 / 3.0).abs() < 1e-6);
    }
}
