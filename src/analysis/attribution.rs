//! Direct logit attribution: the model's logit for a target token (or the target − foil logit
//! difference) split into what the embedding and each block's attention and MLP wrote into the
//! residual stream.
//!
//! The residual stream at the last point is a sum, `x = resid[0] + Σ_b attn_out[b] + Σ_b
//! mlp_out[b]` (the taps are the tensors llama.cpp adds, found in its graph). The readout is
//! `logit = scale_out · (W_U[t] · norm(x) + b_out[t])` with `norm(x) = g ⊙ (x − μ(x)) · s(x) + b`
//! (RMSNorm: no mean removed, no `b`). With the norm's scale `s` frozen at its value on the real
//! `x` (TransformerLens's convention: `apply_ln_to_stack(..., pos_slice)` with the cached
//! scale), the readout is linear, so each term of the sum gets its own share and the shares plus
//! a constant (the norm's bias and the output bias) add up to the logit. Soft-capping (a `tanh`
//! after the readout) is not linear: there the shares add up to the logit *before* capping,
//! which is recovered from the model's logit through `atanh` and said so on the page.

use serde::{Deserialize, Serialize};

/// The model's final norm and output scaling as the attribution reads them.
#[derive(Debug, Clone)]
pub struct Readout {
    /// LayerNorm (mean removed) when true, RMSNorm when false.
    pub layer_norm: bool,
    pub eps: f32,
    /// `output_norm.weight` (none: no scale).
    pub gain: Option<Vec<f32>>,
    /// `output_norm.bias`.
    pub bias: Option<Vec<f32>>,
    /// Factor applied to the logits (`logit_scale`), 1 when none.
    pub logit_scale: f32,
    /// Final-logit soft-capping (0: none).
    pub softcap: f32,
}

/// What is attributed: the unembedding row of the target, minus the foil's when there is one.
#[derive(Debug, Clone)]
pub struct Direction {
    /// `W_U[target] − W_U[foil]` (dequantized by ggml from the file's own tensor).
    pub w: Vec<f32>,
    /// `b_out[target] − b_out[foil]` (0 without an output bias).
    pub out_bias: f64,
}

/// The attribution of one prompt's logit (difference) at one position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptAttribution {
    /// Token position attributed (the last prompt position).
    pub position: usize,
    pub target: i32,
    pub target_piece: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foil: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foil_piece: Option<String>,
    /// The model's own logit of the target (minus the foil's), from llama.cpp's output; before
    /// soft-capping where the model caps (recovered through atanh).
    pub logit: f64,
    /// Share of the embedding (point 0: token embedding, plus position embedding where the
    /// architecture adds one there).
    pub embed: f64,
    /// Share of each block's attention output, block 0 first.
    pub attn: Vec<f64>,
    /// Share of each block's MLP (or mixture-of-experts) output.
    pub mlp: Vec<f64>,
    /// The norm's bias and the output bias (times the logit scale): no component writes them.
    pub constant: f64,
    /// The final norm's scale `s(x)` on the real residual, shared by every share.
    pub norm_scale: f64,
    /// `logit − (embed + Σ attn + Σ mlp + constant)`: what the decomposition misses against the
    /// model's own logit (llama.cpp quantizes the activation before a quantized output matrix;
    /// the shares are exact float64 dot products).
    pub residual: f64,
    /// `|x − (resid[0] + Σ attn_out + Σ mlp_out)| / |x|`: how completely the captured
    /// components rebuild the real last residual (float rounding of the additions only).
    pub unexplained: f64,
    /// With the `z` tap: each block's share split by head, `[block][head]` (the block's
    /// attention output is `W_O z + b`, so head h's share is its slice of z times its columns of
    /// the output projection, read back through the same frozen norm); empty without `z`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<Vec<f64>>,
    /// The share of each block's attention output bias (`attn_output.bias`; 0 without one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub head_bias: Vec<f64>,
    /// With heads: the largest relative L2 distance, over blocks, between the captured
    /// `attn_out` and `W_O z + b` recomputed from the captured z (see [`BlockHeads::projection_error`]).
    #[serde(default)]
    pub projection_error: f64,
}

impl PromptAttribution {
    /// The sum of the shares (the logit as the decomposition gives it).
    pub fn total(&self) -> f64 {
        self.embed + self.attn.iter().sum::<f64>() + self.mlp.iter().sum::<f64>() + self.constant
    }
}

/// `Σ v_i c_i` in float64.
fn dot(v: &[f64], c: &[f32]) -> f64 {
    v.iter().zip(c).map(|(&a, &b)| a * b as f64).sum()
}

/// The shares of one prompt: `x` is the real last residual, `embed` point 0, `attn[b]` and
/// `mlp[b]` the blocks' outputs (all of the readout's width).
pub fn decompose(
    r: &Readout,
    d: &Direction,
    x: &[f32],
    embed: &[f32],
    attn: &[&[f32]],
    mlp: &[&[f32]],
) -> Shares {
    let n = x.len() as f64;
    let mu = if r.layer_norm {
        x.iter().map(|&a| a as f64).sum::<f64>() / n
    } else {
        0.0
    };
    let var = x.iter().map(|&a| (a as f64 - mu).powi(2)).sum::<f64>() / n;
    let s = 1.0 / (var + r.eps as f64).sqrt();
    let scale = r.logit_scale as f64;
    // u = scale_out · s · g ⊙ w: the readout of a centred component is u · c.
    let u: Vec<f64> =
        d.w.iter()
            .enumerate()
            .map(|(i, &w)| scale * s * r.gain.as_ref().map_or(1.0, |g| g[i] as f64) * w as f64)
            .collect();
    // Under LayerNorm, u · (c − mean(c)) = (u − mean(u)) · c: the readout vector of any part.
    let u_mean = if r.layer_norm {
        u.iter().sum::<f64>() / n
    } else {
        0.0
    };
    let readout: Vec<f64> = u.iter().map(|&a| a - u_mean).collect();
    let share = |c: &[f32]| dot(&readout, c);
    let constant = scale
        * (r.bias.as_ref().map_or(0.0, |b| {
            b.iter()
                .zip(&d.w)
                .map(|(&bi, &wi)| bi as f64 * wi as f64)
                .sum()
        }) + d.out_bias);
    let mut rebuilt: Vec<f64> = embed.iter().map(|&a| a as f64).collect();
    for c in attn.iter().chain(mlp) {
        for (acc, &v) in rebuilt.iter_mut().zip(c.iter()) {
            *acc += v as f64;
        }
    }
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|a| a * a).sum::<f64>().sqrt();
    let miss = norm(&mut rebuilt.iter().zip(x).map(|(a, &b)| a - b as f64));
    let x_norm = norm(&mut x.iter().map(|&a| a as f64));
    Shares {
        embed: share(embed),
        attn: attn.iter().map(|c| share(c)).collect(),
        mlp: mlp.iter().map(|c| share(c)).collect(),
        constant,
        norm_scale: s,
        linear: share(x) + constant,
        unexplained: if x_norm > 0.0 { miss / x_norm } else { 0.0 },
        readout,
    }
}

/// One block's attention output split by head (see [`block_heads`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockHeads {
    /// Each head's share of the logit.
    pub shares: Vec<f64>,
    /// The output bias's share (0 without one).
    pub bias: f64,
    /// `|W_O z + b − attn_out| / |attn_out|`: whether the block's attention output is the output
    /// projection of its heads and nothing more (a norm or a scale after the projection makes it
    /// something else, and then no head has a share of its own).
    pub projection_error: f64,
}

/// Each head's share of one block's attention output `W_O z + b`, in one pass over `W_O`: with
/// `v` the readout vector ([`Shares::readout`]), head h's share is `Σ_{j ∈ h} z_j (W_Oᵀ v)_j` and
/// the bias's `v · b`; and how far `W_O z + b` is from the captured `attn_out`. `w_o` is the output
/// projection as float32 rows, `[n_embd][n_in]` (row k: the weights into output k), `z` the
/// block's `n_in` = n_head × head_dim values at the position attributed.
pub fn block_heads(
    v: &[f64],
    w_o: &[f32],
    z: &[f32],
    n_head: usize,
    bias: Option<&[f32]>,
    attn_out: &[f32],
) -> BlockHeads {
    let n_in = z.len();
    let mut wv = vec![0f64; n_in];
    let (mut d2, mut n2) = (0f64, 0f64);
    for (k, (&vk, &a)) in v.iter().zip(attn_out).enumerate() {
        let row = &w_o[k * n_in..(k + 1) * n_in];
        let mut o = bias.map_or(0.0, |b| b[k] as f64);
        for ((acc, &w), &x) in wv.iter_mut().zip(row).zip(z) {
            *acc += vk * w as f64;
            o += w as f64 * x as f64;
        }
        d2 += (o - a as f64).powi(2);
        n2 += (a as f64).powi(2);
    }
    let d = n_in / n_head.max(1);
    BlockHeads {
        shares: (0..n_head)
            .map(|h| (h * d..(h + 1) * d).map(|j| z[j] as f64 * wv[j]).sum())
            .collect(),
        bias: bias.map_or(0.0, |b| dot(v, b)),
        projection_error: if n2 > 0.0 {
            (d2 / n2).sqrt()
        } else {
            d2.sqrt()
        },
    }
}

/// The shares of one prompt (see [`decompose`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Shares {
    pub embed: f64,
    pub attn: Vec<f64>,
    pub mlp: Vec<f64>,
    pub constant: f64,
    pub norm_scale: f64,
    /// The readout of the real residual (what the shares should sum to).
    pub linear: f64,
    pub unexplained: f64,
    /// The readout vector: the share of any component `c` is `readout · c`.
    pub readout: Vec<f64>,
}

/// The logit before soft-capping, from the model's capped logit: `cap · atanh(logit / cap)`
/// (the logit itself without capping). None where the capped value sits so close to ±cap that
/// the inverse is not determined in float32.
pub fn uncapped(logit: f32, softcap: f32) -> Option<f64> {
    if softcap <= 0.0 {
        return Some(logit as f64);
    }
    let y = logit as f64 / softcap as f64;
    (y.abs() < 1.0 - 1e-6).then(|| softcap as f64 * y.atanh())
}

/// Largest [`BlockHeads::projection_error`] with which per-head shares are drawn. llama.cpp rounds z to 8
/// bits per block before a quantized projection: measured 1.3% (SmolLM2) and 2.7% (Qwen2.5-
/// Coder-0.5B), ≤ 9.2e-8 on the matrix's F32 files; where a norm or a scale follows the
/// projection it is 0.66–1.0 on the matrix (AFMoE, EXAONE 4, Gemma 2/3, Granite's residual
/// scale, OLMo 2/3) and 1.99 on Gemma-3-270M.
pub const PROJECTION_TOLERANCE: f64 = 0.1;

/// Largest |residual| accepted against the model's own logit, relative to the spread of the
/// shares (`Σ |share|`). The shares are float64 dot products with the dequantized output rows;
/// llama.cpp's output layer first quantizes the normed state to 8 bits per block when the output
/// matrix is quantized, which moves a logit by up to ~0.5% of that spread on the test models
/// (measured: see the README's attribution section); a missing component or a wrong norm moves
/// it by tens of percent.
pub const RESIDUAL_TOLERANCE: f64 = 0.02;

/// Largest `unexplained` accepted: the captured components rebuild the last residual up to the
/// float32 rounding of the additions llama.cpp made (measured ≤ 1e-6 on the test models).
pub const UNEXPLAINED_TOLERANCE: f64 = 1e-4;

/// Whether a prompt's decomposition holds: its residual within [`RESIDUAL_TOLERANCE`] of the
/// shares' spread and its components rebuilding the residual stream.
pub fn holds(a: &PromptAttribution) -> bool {
    a.residual.abs() <= RESIDUAL_TOLERANCE * spread(a) && a.unexplained <= UNEXPLAINED_TOLERANCE
}

/// The spread of a prompt's shares, `Σ |share|` (at least 1e-9): what residuals are relative to.
pub fn spread(a: &PromptAttribution) -> f64 {
    (a.embed.abs()
        + a.attn.iter().map(|v| v.abs()).sum::<f64>()
        + a.mlp.iter().map(|v| v.abs()).sum::<f64>()
        + a.constant.abs())
    .max(1e-9)
}

/// How far a prompt's head shares are from adding up to their blocks' attention shares (the
/// largest block's gap), relative to [`spread`]; 0 without heads.
pub fn heads_gap(a: &PromptAttribution) -> f64 {
    a.heads
        .iter()
        .zip(&a.head_bias)
        .zip(&a.attn)
        .map(|((h, &b), &attn)| (attn - h.iter().sum::<f64>() - b).abs())
        .fold(0.0, f64::max)
        / spread(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readout(layer_norm: bool) -> Readout {
        Readout {
            layer_norm,
            eps: 1e-6,
            gain: Some(vec![1.0, 2.0, 0.5, 1.5]),
            bias: layer_norm.then(|| vec![0.1, -0.2, 0.3, 0.0]),
            logit_scale: 1.0,
            softcap: 0.0,
        }
    }

    /// The readout of `x` computed directly, as the model does.
    fn direct(r: &Readout, d: &Direction, x: &[f32]) -> f64 {
        let n = x.len() as f64;
        let mu = if r.layer_norm {
            x.iter().map(|&a| a as f64).sum::<f64>() / n
        } else {
            0.0
        };
        let var = x.iter().map(|&a| (a as f64 - mu).powi(2)).sum::<f64>() / n;
        let s = 1.0 / (var + r.eps as f64).sqrt();
        let mut out = d.out_bias;
        for i in 0..x.len() {
            let g = r.gain.as_ref().map_or(1.0, |g| g[i] as f64);
            let b = r.bias.as_ref().map_or(0.0, |b| b[i] as f64);
            out += d.w[i] as f64 * ((x[i] as f64 - mu) * s * g + b);
        }
        out * r.logit_scale as f64
    }

    #[test]
    fn shares_sum_to_the_readout_for_rms_and_layer_norm() {
        let embed = [0.5f32, -1.0, 2.0, 0.25];
        let attn = [[0.1f32, 0.2, -0.3, 0.4], [1.0, 0.0, 0.5, -0.5]];
        let mlp = [[-0.2f32, 0.7, 0.1, 0.0], [0.3, -0.4, 0.2, 0.9]];
        let x: Vec<f32> = (0..4)
            .map(|i| embed[i] + attn[0][i] + attn[1][i] + mlp[0][i] + mlp[1][i])
            .collect();
        let d = Direction {
            w: vec![0.3, -0.7, 1.1, 0.2],
            out_bias: 0.25,
        };
        for layer_norm in [false, true] {
            let mut r = readout(layer_norm);
            r.logit_scale = 0.5;
            let s = decompose(
                &r,
                &d,
                &x,
                &embed,
                &[&attn[0], &attn[1]],
                &[&mlp[0], &mlp[1]],
            );
            let total =
                s.embed + s.attn.iter().sum::<f64>() + s.mlp.iter().sum::<f64>() + s.constant;
            let want = direct(&r, &d, &x);
            assert!(
                (total - want).abs() < 1e-6,
                "{layer_norm}: {total} vs {want}"
            );
            assert!((s.linear - want).abs() < 1e-9);
            assert!(s.unexplained < 1e-7);
        }
        // A component left out shows as unexplained and breaks the sum.
        let r = readout(false);
        let s = decompose(&r, &d, &x, &embed, &[&attn[0], &attn[1]], &[&mlp[0]]);
        assert!(s.unexplained > 0.1);
        let total = s.embed + s.attn.iter().sum::<f64>() + s.mlp.iter().sum::<f64>() + s.constant;
        assert!((total - s.linear).abs() > 0.1);
    }

    #[test]
    fn head_shares_add_up_to_the_blocks_attention_share() {
        // Two heads of width 2 into a 3-wide stream: attn_out = W_O z + b.
        let w_o = [
            1.0f32, -0.5, 0.25, 2.0, 0.0, 1.5, -1.0, 0.5, 0.75, 0.1, 0.2, -0.3,
        ];
        let z = [0.4f32, -1.2, 0.8, 0.3];
        let b = [0.05f32, -0.1, 0.2];
        let out: Vec<f32> = (0..3)
            .map(|k| (0..4).map(|j| w_o[k * 4 + j] * z[j]).sum::<f32>() + b[k])
            .collect();
        let d = Direction {
            w: vec![0.3, -0.7, 1.1],
            out_bias: 0.0,
        };
        for layer_norm in [false, true] {
            let r = Readout {
                layer_norm,
                eps: 1e-6,
                gain: Some(vec![1.0, 2.0, 0.5]),
                bias: None,
                logit_scale: 1.0,
                softcap: 0.0,
            };
            let x = [1.0f32, 0.5, -2.0];
            let zero = [0.0f32; 3];
            let sh = decompose(&r, &d, &x, &x, &[&out], &[&zero]);
            let h = block_heads(&sh.readout, &w_o, &z, 2, Some(&b), &out);
            let (heads, bias) = (&h.shares, h.bias);
            let total = heads.iter().sum::<f64>() + bias;
            assert!(
                (total - sh.attn[0]).abs() < 1e-6,
                "{total} vs {}",
                sh.attn[0]
            );
            assert!(heads.iter().all(|h| h.abs() > 1e-3));
            assert!(h.projection_error < 1e-6);
            // A norm after the projection: not the projection any more.
            let normed: Vec<f32> = out.iter().map(|v| v * 0.5).collect();
            let scaled = block_heads(&sh.readout, &w_o, &z, 2, Some(&b), &normed);
            assert!(scaled.projection_error > 0.4);
        }
    }

    #[test]
    fn softcapping_is_undone_and_a_saturated_logit_is_refused() {
        assert_eq!(uncapped(3.5, 0.0), Some(3.5));
        let cap = 30.0f32;
        let pre = 12.0f64;
        let capped = (cap as f64 * (pre / cap as f64).tanh()) as f32;
        assert!((uncapped(capped, cap).unwrap() - pre).abs() < 1e-4);
        assert_eq!(uncapped(cap, cap), None);
    }

    #[test]
    fn the_tolerance_separates_rounding_from_a_missing_part() {
        let mut a = PromptAttribution {
            position: 3,
            target: 1,
            target_piece: "a".into(),
            foil: None,
            foil_piece: None,
            logit: 10.0,
            embed: 1.0,
            attn: vec![4.0, -2.0],
            mlp: vec![3.0, 4.0],
            constant: 0.0,
            norm_scale: 1.0,
            residual: 0.0,
            unexplained: 1e-7,
            heads: Vec::new(),
            head_bias: Vec::new(),
            projection_error: 0.0,
        };
        assert!(holds(&a));
        // 0.5% of the spread (14): rounding of an 8-bit activation.
        a.residual = 0.07;
        assert!(holds(&a));
        // A block's MLP missing (4 of 14).
        a.residual = 4.0;
        assert!(!holds(&a));
        a.residual = 0.0;
        a.unexplained = 0.3;
        assert!(!holds(&a));
    }
}
