//! Capture points inside a block ("taps"): their names, TransformerLens aliases, and what each
//! holds. Where each tap's tensor is found in llama.cpp's graph is decided structurally by the
//! graph check in `llama::context` (`identify_block`), never by a tensor name.
//!
//! Numbering: `resid` keeps the points 0..=L (point p = input of block p). Every other tap belongs
//! to a block: tap `attn_out` at block b is what block b's attention adds to the residual stream
//! that block b reads (point b), so that
//! `resid_mid[b] = resid[b] + attn_out[b]` and `resid[b+1] = resid_mid[b] + mlp_out[b]`.

use std::fmt;
use std::str::FromStr;

/// One capture point kind.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Tap {
    /// The residual stream between blocks (points 0..=L): today's states files.
    Resid,
    /// The residual after attention, before the MLP (llama.cpp's `ffn_inp`); sequential blocks only.
    ResidMid,
    /// What attention adds to the residual stream (after a post-attention norm where the
    /// architecture has one).
    AttnOut,
    /// What the MLP (or the mixture of experts) adds to the residual stream.
    MlpOut,
    /// Every head's attention output before the output projection: [n_head × head_dim].
    Z,
    /// The MLP's hidden activations: the input of its down projection [n_ff].
    Neurons,
    /// Per-head attention probabilities: [n_head, query, key] (needs llama.cpp's attention
    /// without flash attention, which a trace with `pattern` uses).
    Pattern,
    /// A mixture-of-experts block's router logits, one per expert: [n_expert].
    RouterLogits,
    /// The experts the router chose for the token, as llama.cpp ranks them: [n_expert_used]
    /// expert numbers (int32).
    RouterExperts,
    /// The weight each chosen expert's output is multiplied by (after the model's gating,
    /// normalisation and scale), in the order of `router_experts`: [n_expert_used].
    RouterWeights,
    /// `--taps router`: the three router taps, as the command line names them together; the
    /// settings record replaces it with [`ROUTER`] when it is validated, so no trace sees it.
    Router,
}

/// `--taps router`: the three router taps together.
pub const ROUTER: [Tap; 3] = [Tap::RouterLogits, Tap::RouterExperts, Tap::RouterWeights];

/// Every tap, in the order files and run.json list them.
pub const ALL: [Tap; 10] = [
    Tap::Resid,
    Tap::ResidMid,
    Tap::AttnOut,
    Tap::MlpOut,
    Tap::Z,
    Tap::Neurons,
    Tap::Pattern,
    Tap::RouterLogits,
    Tap::RouterExperts,
    Tap::RouterWeights,
];

impl Tap {
    pub fn name(self) -> &'static str {
        match self {
            Tap::Resid => "resid",
            Tap::ResidMid => "resid_mid",
            Tap::AttnOut => "attn_out",
            Tap::MlpOut => "mlp_out",
            Tap::Z => "z",
            Tap::Neurons => "neurons",
            Tap::Pattern => "pattern",
            Tap::RouterLogits => "router_logits",
            Tap::RouterExperts => "router_experts",
            Tap::RouterWeights => "router_weights",
            Tap::Router => "router",
        }
    }

    /// TransformerLens hook names accepted for this tap (`blocks.L.` prefixes are not needed).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Tap::Resid => &["hook_resid_pre", "hook_resid_post"],
            Tap::ResidMid => &["hook_resid_mid"],
            Tap::AttnOut => &["hook_attn_out"],
            Tap::MlpOut => &["hook_mlp_out"],
            Tap::Z => &["hook_z", "attn.hook_z"],
            Tap::Neurons => &["hook_post", "mlp.hook_post"],
            Tap::Pattern => &["hook_pattern", "attn.hook_pattern"],
            Tap::RouterLogits | Tap::RouterExperts | Tap::RouterWeights | Tap::Router => &[],
        }
    }

    /// Whether this tap belongs to a block (all but `resid`, which has points 0..=L).
    pub fn in_block(self) -> bool {
        self != Tap::Resid
    }

    /// Whether the tap's values are integers (expert numbers, written as int32).
    pub fn integer(self) -> bool {
        self == Tap::RouterExperts
    }

    /// The taps a `--taps` entry stands for: itself, or the three router taps for `router`.
    pub fn expand(self) -> &'static [Tap] {
        match self {
            Tap::Router => &ROUTER,
            t => std::slice::from_ref(ALL.iter().find(|&&a| a == t).expect("every tap is in ALL")),
        }
    }
}

impl fmt::Display for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tap {
    type Err = String;
    fn from_str(s: &str) -> Result<Tap, String> {
        let s = s.trim();
        let bare = s
            .strip_prefix("blocks.")
            .map_or(s, |r| r.split_once('.').map_or(r, |(_, rest)| rest));
        if bare == Tap::Router.name() {
            return Ok(Tap::Router);
        }
        for t in ALL {
            if t.name() == bare || t.aliases().contains(&bare) {
                return Ok(t);
            }
        }
        Err(format!(
            "unknown tap `{s}`: choose from {}, or router for the three router taps (TransformerLens names such as hook_attn_out work too)",
            ALL.map(Tap::name).join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        for (text, tap) in [
            ("resid", Tap::Resid),
            ("hook_attn_out", Tap::AttnOut),
            ("blocks.3.hook_resid_mid", Tap::ResidMid),
            (" mlp_out ", Tap::MlpOut),
            ("attn.hook_z", Tap::Z),
            ("mlp.hook_post", Tap::Neurons),
        ] {
            assert_eq!(text.parse::<Tap>(), Ok(tap), "{text}");
        }
        assert!("attn"
            .parse::<Tap>()
            .unwrap_err()
            .contains("unknown tap `attn`"));
        assert_eq!(" router ".parse::<Tap>().map(Tap::expand), Ok(&ROUTER[..]));
        assert_eq!(Tap::Z.expand(), &[Tap::Z]);
        assert!(ALL.iter().all(|t| t.aliases().len() <= 2));
        assert!(ALL
            .iter()
            .filter(|t| t.integer())
            .eq([Tap::RouterExperts].iter()));
        for t in ALL {
            assert_eq!(t.name().parse::<Tap>().unwrap(), t);
        }
    }
}
