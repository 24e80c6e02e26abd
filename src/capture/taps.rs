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
    /// MoE router logits and chosen experts (not captured yet).
    Router,
}

/// Every tap, in the order files and run.json list them.
pub const ALL: [Tap; 8] = [
    Tap::Resid,
    Tap::ResidMid,
    Tap::AttnOut,
    Tap::MlpOut,
    Tap::Z,
    Tap::Neurons,
    Tap::Pattern,
    Tap::Router,
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
            Tap::Router => &[],
        }
    }

    /// Whether this tap belongs to a block (all but `resid`, which has points 0..=L).
    pub fn in_block(self) -> bool {
        self != Tap::Resid
    }

    /// Why this tap cannot be captured by this version, if it cannot.
    pub fn not_yet(self) -> Option<&'static str> {
        match self {
            Tap::Router => {
                Some("`router` (MoE router logits and chosen experts) is not captured yet")
            }
            _ => None,
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
        for t in ALL {
            if t.name() == bare || t.aliases().contains(&bare) {
                return Ok(t);
            }
        }
        Err(format!(
            "unknown tap `{s}`: choose from {} (TransformerLens names such as hook_attn_out work too)",
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
        assert!(Tap::Pattern.not_yet().is_none() && Tap::Router.not_yet().is_some());
        assert!(ALL
            .iter()
            .filter(|t| t.not_yet().is_none())
            .all(|t| t.aliases().len() <= 2));
        for t in ALL {
            assert_eq!(t.name().parse::<Tap>().unwrap(), t);
        }
    }
}
