//! Which tensors are quantized: the default rules, and the user's `--skip` / `--only` overrides.

use fp8forge_formats::Dtype;
use regex::Regex;

/// Default exclusions: (pattern on the full tensor name, reason shown to the user, whether FP8
/// is refused outright for it because no serving engine loads it so).
///
/// Embeddings and the output head stay in high precision (as in DeepSeek's own FP8 release; vLLM
/// and SGLang have no FP8 parameter for them); MoE routers decide which experts run, are tiny, and
/// DeepSeek's and Mixtral's are built unquantized by both engines; the DeepSeek MTP layer's
/// `eh_proj` and `shared_head.head` are plain (unquantized) linear layers in vLLM and SGLang, which
/// would load FP8 bytes into a BF16 parameter; Qwen2-MoE's and Qwen3-Next's
/// `shared_expert_gate` and DeepSeek-V3.2's `indexer.weights_proj` are built unquantized by vLLM.
const DEFAULT_SKIP: &[(&str, &str, bool)] = &[
    (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embeddings)\.", "embedding", true),
    (r"(^|\.)lm_head\.", "output head", true),
    (r"(^|\.)[^.]*norm[^.]*\.", "normalization", false),
    (r"\.(gate|router)\.weight$", "MoE router", true),
    (r"e_score_correction_bias", "router bias", false),
    (r"(^|\.)(eh_proj|shared_head)\.", "MTP projection, unquantized in vLLM and SGLang", true),
    (r"\.shared_expert_gate\.weight$", "shared-expert gate, unquantized in vLLM", true),
    (r"\.indexer\.weights_proj\.weight$", "DeepSeek-V3.2 indexer weights, unquantized in vLLM", true),
];

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Quantize to FP8 with 128×128 block scales.
    Quantize,
    /// Copy unchanged, for the reason given.
    Keep(KeepReason),
    /// `--only` asks for FP8 where no serving engine loads it (an embedding, the output head, a
    /// router, an MTP projection): refused, for the reason given.
    Unloadable(&'static str),
}

/// Why a tensor is copied unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// Not a floating-point dtype fp8forge quantizes.
    Dtype(Dtype),
    /// Not a matrix.
    Dims(usize),
    /// A `--skip` pattern matches it.
    Skip(String),
    /// `--only` is given and no pattern of it matches.
    NotOnly,
    /// Not named `*.weight`.
    NotWeight,
    /// A default rule keeps it.
    Default(&'static str),
    /// Kept with the rest of a group a `--skip` split (see [`crate::groups`]).
    Widened(String),
}

impl std::fmt::Display for KeepReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepReason::Dtype(d) => write!(f, "dtype {d:?} is not BF16/F16/F32"),
            KeepReason::Dims(n) => write!(f, "{n}-D tensor, not a 2-D weight"),
            KeepReason::Skip(re) => write!(f, "--skip {re}"),
            KeepReason::NotOnly => f.write_str("not matched by --only"),
            KeepReason::NotWeight => f.write_str("not a .weight tensor"),
            KeepReason::Default(why) => f.write_str(why),
            KeepReason::Widened(group) => write!(f, "kept with the rest of {group}"),
        }
    }
}

/// Errors building a selection.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// A `--skip` or `--only` pattern is not a valid regular expression.
    #[error("invalid regular expression {pattern:?}: {reason}")]
    BadRegex {
        /// The pattern as given.
        pattern: String,
        /// The regex crate's explanation.
        reason: String,
    },
}

/// The tensor selection rules of one conversion.
#[derive(Clone, Debug)]
pub struct Selection {
    defaults: Vec<(Regex, &'static str, bool)>,
    skip: Vec<Regex>,
    only: Vec<Regex>,
}

fn compile(patterns: &[String]) -> Result<Vec<Regex>, SelectError> {
    patterns
        .iter()
        .map(|p| Regex::new(p).map_err(|e| SelectError::BadRegex { pattern: p.clone(), reason: e.to_string() }))
        .collect()
}

impl Selection {
    /// Builds the rules: `skip` patterns exclude more tensors; non-empty `only` patterns replace
    /// the default rules (every matching 2-D float tensor is quantized, minus `skip`).
    pub fn new(skip: &[String], only: &[String]) -> Result<Self, SelectError> {
        let defaults = DEFAULT_SKIP
            .iter()
            .map(|(p, why, refuse)| {
                Regex::new(p)
                    .map(|r| (r, *why, *refuse))
                    .map_err(|e| SelectError::BadRegex { pattern: (*p).into(), reason: e.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(Selection { defaults, skip: compile(skip)?, only: compile(only)? })
    }

    /// The `--only` patterns, in order.
    pub fn only(&self) -> &[Regex] {
        &self.only
    }

    /// Decides the fate of a tensor from its name, dtype and shape.
    pub fn decide(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Decision {
        if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            return Decision::Keep(KeepReason::Dtype(dtype));
        }
        if shape.len() != 2 {
            return Decision::Keep(KeepReason::Dims(shape.len()));
        }
        if let Some(r) = self.skip.iter().find(|r| r.is_match(name)) {
            return Decision::Keep(KeepReason::Skip(r.as_str().to_owned()));
        }
        let default = self.defaults.iter().find(|(r, ..)| r.is_match(name));
        if !self.only.is_empty() {
            return match (self.only.iter().any(|r| r.is_match(name)), default) {
                (true, Some((_, why, true))) => Decision::Unloadable(why),
                (true, _) => Decision::Quantize,
                (false, _) => Decision::Keep(KeepReason::NotOnly),
            };
        }
        if !name.ends_with(".weight") {
            return Decision::Keep(KeepReason::NotWeight);
        }
        match default {
            Some((_, why, _)) => Decision::Keep(KeepReason::Default(why)),
            None => Decision::Quantize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(sel: &Selection, name: &str) -> bool {
        sel.decide(name, Dtype::BF16, &[256, 256]) == Decision::Quantize
    }

    #[test]
    fn defaults_quantize_linear_weights_and_keep_embeddings_heads_norms_routers() {
        let s = Selection::new(&[], &[]).expect("rules");
        for n in [
            "model.layers.0.self_attn.q_a_proj.weight",
            "model.layers.0.self_attn.kv_b_proj.weight",
            "model.layers.3.mlp.experts.17.gate_proj.weight",
            "model.layers.3.mlp.shared_experts.down_proj.weight",
            "model.layers.1.block_sparse_moe.experts.0.w1.weight",
            "model.layers.0.mlp.gate_proj.weight",
        ] {
            assert!(q(&s, n), "{n} should be quantized");
        }
        for n in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight",
            "model.layers.3.mlp.gate.weight",
            "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.61.eh_proj.weight",
            "model.layers.61.shared_head.head.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias",
            "model.layers.3.mlp.shared_expert_gate.weight",
            "model.layers.3.self_attn.indexer.weights_proj.weight",
        ] {
            assert!(!q(&s, n), "{n} should be kept");
        }
        assert!(!matches!(s.decide("x.weight", Dtype::BF16, &[4]), Decision::Quantize));
        assert!(!matches!(s.decide("x.weight", Dtype::I64, &[4, 4]), Decision::Quantize));
        assert!(!matches!(s.decide("x.weight", Dtype::F8_E4M3, &[4, 4]), Decision::Quantize));
    }

    #[test]
    fn skip_removes_and_only_replaces_the_defaults() {
        let s = Selection::new(&[r"\.experts\.".into()], &[]).expect("rules");
        assert!(!q(&s, "model.layers.3.mlp.experts.1.up_proj.weight"));
        assert!(q(&s, "model.layers.3.mlp.shared_experts.up_proj.weight"));
        let s = Selection::new(&[], &["up_proj".into()]).expect("rules");
        assert!(q(&s, "model.layers.0.mlp.up_proj.weight"));
        assert!(!q(&s, "model.layers.0.mlp.down_proj.weight"));
        // What no engine loads in FP8 is refused, not quietly kept.
        let s = Selection::new(&[], &["lm_head|embed_tokens|\\.gate\\.|eh_proj".into()]).expect("rules");
        for n in [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.3.mlp.gate.weight",
            "model.layers.61.eh_proj.weight",
        ] {
            assert!(matches!(s.decide(n, Dtype::BF16, &[256, 256]), Decision::Unloadable(_)), "{n}");
        }
        assert!(Selection::new(&["(".into()], &[]).is_err());
    }
}
