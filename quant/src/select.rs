//! Which tensors are quantized: the default rules, and the user's `--skip` / `--only` overrides.

use fp8forge_formats::Dtype;
use regex::Regex;

/// Default exclusions: (pattern on the full tensor name, reason shown to the user).
///
/// Embeddings and the output head stay in high precision (as in DeepSeek's own FP8 release);
/// MoE routers decide which experts run and are tiny; the DeepSeek MTP layer's `eh_proj` and
/// `shared_head.head` are plain (unquantized) linear layers in vLLM and SGLang, which would load
/// FP8 bytes into a BF16 parameter if they were converted.
const DEFAULT_SKIP: &[(&str, &str)] = &[
    (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embeddings)\.", "embedding"),
    (r"(^|\.)lm_head\.", "output head"),
    (r"(^|\.)[^.]*norm[^.]*\.", "normalization"),
    (r"\.(gate|router)\.weight$", "MoE router"),
    (r"e_score_correction_bias", "router bias"),
    (r"(^|\.)(eh_proj|shared_head)\.", "MTP projection, unquantized in vLLM and SGLang"),
];

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Quantize to FP8 with 128×128 block scales.
    Quantize,
    /// Copy unchanged, for the reason given.
    Keep(String),
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
    defaults: Vec<(Regex, &'static str)>,
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
            .map(|(p, why)| {
                Regex::new(p)
                    .map(|r| (r, *why))
                    .map_err(|e| SelectError::BadRegex { pattern: (*p).into(), reason: e.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(Selection { defaults, skip: compile(skip)?, only: compile(only)? })
    }

    /// Decides the fate of a tensor from its name, dtype and shape.
    pub fn decide(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Decision {
        if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            return Decision::Keep(format!("dtype {dtype:?} is not BF16/F16/F32"));
        }
        if shape.len() != 2 {
            return Decision::Keep(format!("{}-D tensor, not a 2-D weight", shape.len()));
        }
        if let Some(r) = self.skip.iter().find(|r| r.is_match(name)) {
            return Decision::Keep(format!("--skip {}", r.as_str()));
        }
        if !self.only.is_empty() {
            return if self.only.iter().any(|r| r.is_match(name)) {
                Decision::Quantize
            } else {
                Decision::Keep("not matched by --only".into())
            };
        }
        if !name.ends_with(".weight") {
            return Decision::Keep("not a .weight tensor".into());
        }
        match self.defaults.iter().find(|(r, _)| r.is_match(name)) {
            Some((_, why)) => Decision::Keep((*why).into()),
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
        let s = Selection::new(&[], &["lm_head".into()]).expect("rules");
        assert!(q(&s, "lm_head.weight"));
        assert!(!q(&s, "model.layers.0.mlp.up_proj.weight"));
        assert!(Selection::new(&["(".into()], &[]).is_err());
    }
}
