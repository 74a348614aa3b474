//! Model configurations read from a Hugging Face `config.json`, validated whole at load: a field
//! the runtime does not implement is an error here, never a silent approximation in `forward`.
//!
//! What every architecture shares is here: the fields of [`BaseConfig`], RoPE with YaRN
//! ([`RopeParams`]), the validated [`ModelConfig`] and the errors naming a field. Each
//! architecture's own fields, checks and layers are one file of [`crate::models`].

use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, RuntimeError};
use crate::models::{self, Architecture};

/// The fields of `config.json` every architecture has (names as the hub and transformers 5
/// write them). Each architecture reads its own fields from the same file.
#[derive(Clone, Debug, Deserialize)]
pub struct BaseConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Decoder layers (not counting DeepSeek's multi-token-prediction layers).
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Activation of the MLPs (default `silu`, the only one implemented).
    pub hidden_act: Option<String>,
    /// Biases on the attention projections (not implemented).
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections (not implemented).
    pub mlp_bias: Option<bool>,
    /// Epsilon of every RMSNorm (default 1e-6).
    pub rms_norm_eps: Option<f64>,
    /// The output head is the embedding matrix (default false).
    pub tie_word_embeddings: Option<bool>,
    /// Longest position the model was configured for (default 4096).
    pub max_position_embeddings: Option<usize>,
    /// RoPE base (hub configs; transformers 5 puts it in `rope_parameters`).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (hub configs).
    pub rope_scaling: Option<RopeScaling>,
    /// RoPE base and scaling (transformers 5 configs).
    pub rope_parameters: Option<RopeScaling>,
}

/// `rope_scaling` (or transformers 5's `rope_parameters`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeScaling {
    /// `default` or `yarn`.
    pub rope_type: Option<String>,
    /// The older name of `rope_type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// RoPE base (in `rope_parameters`).
    pub rope_theta: Option<f64>,
    /// Context extension factor.
    pub factor: Option<f64>,
    /// Context length before extension.
    pub original_max_position_embeddings: Option<usize>,
    /// YaRN's fast boundary (default 32).
    pub beta_fast: Option<f64>,
    /// YaRN's slow boundary (default 1).
    pub beta_slow: Option<f64>,
    /// YaRN's magnitude scale of cos and sin.
    pub mscale: Option<f64>,
    /// YaRN's magnitude scale of all dims (DeepSeek: also corrects the softmax scale).
    pub mscale_all_dim: Option<f64>,
    /// Factor on cos and sin, when given outright.
    pub attention_factor: Option<f64>,
    /// Round YaRN's correction range to whole dims (default true).
    pub truncate: Option<bool>,
}

/// The validated values of [`BaseConfig`], handed to each architecture's `validate`.
#[derive(Clone, Debug, PartialEq)]
pub struct Common {
    /// Model width.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f32,
    /// The output head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest position the model was configured for.
    pub max_position_embeddings: usize,
    /// RoPE settings.
    pub rope: RopeParams,
}

/// Rotary position embedding as the layers apply it.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Number of rotated dimensions per head.
    pub dim: usize,
    /// Per-pair inverse frequencies (`dim / 2` of them), YaRN-corrected where configured.
    pub inv_freq: Vec<f32>,
    /// Factor applied to cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
    /// DeepSeek's interleaved layout: pairs `(x0, x1), (x2, x3), ...` instead of halves.
    pub interleave: bool,
}

/// A validated model configuration: what the model loop needs, and the architecture (its own
/// dimensions and layers).
#[derive(Debug)]
pub struct ModelConfig {
    /// The config file it was read from.
    pub file: PathBuf,
    /// `model_type` as written.
    pub model_type: String,
    /// Model width.
    pub hidden: usize,
    /// Vocabulary size (rows of the embedding and the output head).
    pub vocab: usize,
    /// Epsilon of the final RMSNorm.
    pub rms_eps: f32,
    /// The output head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest position the model was configured for.
    pub max_position_embeddings: usize,
    /// The architecture, validated: decoder layers, attention, routing, RoPE.
    pub arch: Box<dyn Architecture>,
}

/// `model_type` alone, read first to choose the architecture.
#[derive(Deserialize)]
struct ModelType {
    model_type: Option<String>,
}

impl ModelConfig {
    /// Reads and validates `config.json` of a model directory.
    pub fn load(file: &Path) -> Result<Self> {
        // A regular file only: a FIFO would block the read (see fp8forge_formats::input).
        let text = fp8forge_formats::input::read_regular_to_string(file)?;
        Self::parse(file, &text)
    }

    /// Validates the text of a config (`file` names it in errors).
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| RuntimeError::Config { file: file.to_owned(), reason: format!("malformed JSON: {e}") })?;
        let model_type = read_fields::<ModelType>(file, text)?
            .model_type
            .ok_or_else(|| RuntimeError::Config { file: file.to_owned(), reason: "missing field model_type".into() })?;
        let arch_parse = models::find(&model_type).ok_or_else(|| {
            Refuse(file).unsupported("model_type", format!("{model_type:?}"), models::supported().join(", "))
        })?;
        let common = read_fields::<BaseConfig>(file, text)?.validate(file)?;
        let arch = arch_parse(file, text, &common)?;
        Ok(ModelConfig {
            file: file.to_owned(),
            model_type,
            hidden: common.hidden,
            vocab: common.vocab,
            rms_eps: common.rms_eps,
            tie_word_embeddings: common.tie_word_embeddings,
            max_position_embeddings: common.max_position_embeddings,
            arch,
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.arch.num_layers()
    }

    /// The rotary embedding.
    pub fn rope(&self) -> &RopeConfig {
        self.arch.rope()
    }

    /// The weight GEMM dimensions of the model.
    pub fn shapes(&self) -> Shapes {
        self.arch.shapes()
    }

    /// True when `other` has the same architecture, shapes and routing: a model and its baseline
    /// must, to be compared layer by layer.
    pub fn same_architecture(&self, other: &ModelConfig) -> bool {
        self.hidden == other.hidden && self.vocab == other.vocab && self.arch.same_as(other.arch.as_ref())
    }
}

impl BaseConfig {
    /// Checks the shared fields and computes their values.
    pub fn validate(&self, file: &Path) -> Result<Common> {
        let refuse = Refuse(file);
        let act = self.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(refuse.unsupported("hidden_act", format!("{act:?}"), "silu"));
        }
        if self.attention_bias == Some(true) {
            return Err(refuse.unsupported("attention_bias", true, "false"));
        }
        if self.mlp_bias == Some(true) {
            return Err(refuse.unsupported("mlp_bias", true, "false"));
        }
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return Err(refuse.invalid(field, v, "must be positive"));
            }
        }
        Ok(Common {
            hidden: self.hidden_size,
            vocab: self.vocab_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            rms_eps: self.rms_norm_eps.unwrap_or(1e-6) as f32,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            rope: RopeParams::read(self, &refuse)?,
        })
    }
}

/// The weight GEMM dimensions of a model (what `autotune --model` tunes), from its validated
/// config: a plain description, mapped by the CLI onto autotune's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shapes {
    /// Model width.
    pub hidden: usize,
    /// The attention block (the same in every layer).
    pub attention: AttentionShape,
    /// The feed-forward block of each decoder layer, in layer order.
    pub layers: Vec<FfnShape>,
}

/// The attention block's dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttentionShape {
    /// Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2).
    Mla {
        /// Query heads.
        heads: usize,
        /// Rank of the query compression (`None`: a plain `q_proj`).
        q_lora_rank: Option<usize>,
        /// Rank of the key/value compression.
        kv_lora_rank: usize,
        /// Per-head query/key dims without position encoding.
        qk_nope_head_dim: usize,
        /// Per-head query/key dims with RoPE.
        qk_rope_head_dim: usize,
        /// Per-head value dims.
        v_head_dim: usize,
    },
    /// Grouped-query attention (Mixtral, Qwen3-MoE).
    Gqa {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Dims per head.
        head_dim: usize,
    },
}

/// One decoder layer's feed-forward block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FfnShape {
    /// A dense SwiGLU MLP.
    Dense {
        /// Its intermediate size.
        intermediate: usize,
    },
    /// A mixture of experts.
    Moe {
        /// Routed experts.
        experts: usize,
        /// Intermediate size of each routed expert.
        intermediate: usize,
        /// Intermediate size of the shared expert MLP (`None`: no shared expert).
        shared_intermediate: Option<usize>,
    },
}

/// Reads the fields of `T` from the config's text. A value of the wrong type is reported with
/// the text around it, so that the field is named.
pub(crate) fn read_fields<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| RuntimeError::Config { file: file.to_owned(), reason: describe(&e, text) })
}

/// A serde error without its position, followed by the config text that precedes the position
/// (which names the field) unless the field is missing.
fn describe(e: &serde_json::Error, text: &str) -> String {
    let full = e.to_string();
    let msg = full.rsplit_once(" at line ").map_or(full.as_str(), |(m, _)| m);
    if msg.starts_with("missing field") || e.line() == 0 {
        return msg.replace('`', "");
    }
    let line = text.lines().nth(e.line() - 1).unwrap_or("");
    let end = (0..=e.column().min(line.len())).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
    let before: Vec<char> = line[..end].chars().rev().take(60).collect();
    let snippet: String = before.into_iter().rev().collect();
    format!("{msg}, at line {} after `{}`", e.line(), snippet.trim())
}

/// Errors naming a field of one config file.
#[derive(Clone, Copy, Debug)]
pub struct Refuse<'a>(
    /// The config file.
    pub &'a Path,
);

impl Refuse<'_> {
    /// `field` has a value (`value`, as JSON) the runtime does not implement.
    pub fn unsupported(self, field: &str, value: impl Display, supported: impl Into<String>) -> RuntimeError {
        RuntimeError::Unsupported {
            file: self.0.to_owned(),
            field: field.to_owned(),
            value: value.to_string(),
            supported: supported.into(),
        }
    }

    /// `field` has a value (`value`) that breaks `rule`.
    pub fn invalid(self, field: &str, value: impl Display, rule: impl Into<String>) -> RuntimeError {
        RuntimeError::Invalid {
            file: self.0.to_owned(),
            field: field.to_owned(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }
}

/// YaRN parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    factor: f64,
    original_max_position_embeddings: usize,
    beta_fast: f64,
    beta_slow: f64,
    mscale: f64,
    mscale_all_dim: f64,
    attention_factor: Option<f64>,
    truncate: bool,
}

/// The RoPE settings: `rope_theta` and `rope_scaling` (hub configs) or `rope_parameters`
/// (transformers 5 configs).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    theta: f64,
    yarn: Option<Yarn>,
}

impl RopeParams {
    fn read(c: &BaseConfig, refuse: &Refuse) -> Result<Self> {
        let params = c.rope_parameters.as_ref();
        let scaling = c.rope_scaling.as_ref().or(params);
        let theta = match c.rope_theta {
            Some(t) => t,
            None => params.and_then(|p| p.rope_theta).unwrap_or(10000.0),
        };
        if theta <= 0.0 {
            return Err(refuse.invalid("rope_theta", theta, "must be positive"));
        }
        let Some(s) = scaling else { return Ok(RopeParams { theta, yarn: None }) };
        let kind = s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("default");
        match kind {
            "default" => Ok(RopeParams { theta, yarn: None }),
            "yarn" => {
                let orig = s.original_max_position_embeddings.ok_or_else(|| {
                    refuse.invalid(
                        "rope_scaling.original_max_position_embeddings",
                        "(missing)",
                        "is needed by YaRN rope scaling",
                    )
                })?;
                let max_pos = c.max_position_embeddings.unwrap_or(orig);
                let factor = s.factor.unwrap_or(max_pos as f64 / orig as f64);
                let yarn = Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: s.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: s.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0),
                    mscale: s.mscale.unwrap_or(0.0),
                    mscale_all_dim: s.mscale_all_dim.unwrap_or(0.0),
                    attention_factor: s.attention_factor,
                    truncate: s.truncate.unwrap_or(true),
                };
                Ok(RopeParams { theta, yarn: Some(yarn) })
            }
            other => Err(refuse.unsupported("rope_scaling.rope_type", format!("{other:?}"), "default, yarn")),
        }
    }

    /// The rotary embedding of `dim` dims per head (`field` names the config field that sets
    /// `dim`, for the error when it is odd or zero).
    pub fn config(&self, dim: usize, interleave: bool, field: &str, refuse: Refuse) -> Result<RopeConfig> {
        if !dim.is_multiple_of(2) || dim == 0 {
            return Err(refuse.invalid(field, dim, "must be even and positive (the rotated dims per head)"));
        }
        let (inv_freq, attention_factor) = self.inv_freq(dim);
        Ok(RopeConfig { dim, inv_freq, attention_factor: attention_factor as f32, interleave })
    }

    /// DeepSeek's correction of the softmax scale under YaRN, `mscale(factor, mscale_all_dim)²`,
    /// multiplied into `scale` (unchanged without YaRN or with `mscale_all_dim` 0).
    pub fn deepseek_softmax_scale(&self, scale: f64) -> f64 {
        match &self.yarn {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                scale * (m * m)
            }
            _ => scale,
        }
    }

    /// Inverse frequencies for `dim` rotated dims and the factor on cos/sin, as transformers
    /// computes them (`_compute_default_rope_parameters`, `_compute_yarn_parameters`).
    fn inv_freq(&self, dim: usize) -> (Vec<f32>, f64) {
        let base = self.theta;
        let pos_freq = |i: usize| (base as f32).powf((2 * i) as f32 / dim as f32) as f64;
        let half = dim / 2;
        let Some(y) = &self.yarn else {
            return ((0..half).map(|i| (1.0 / pos_freq(i)) as f32).collect(), 1.0);
        };
        let attention_factor = y.attention_factor.unwrap_or_else(|| {
            if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
            } else {
                yarn_mscale(y.factor, 1.0)
            }
        });
        let orig = y.original_max_position_embeddings as f64;
        let correction_dim =
            |rot: f64| (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv = (0..half)
            .map(|i| {
                let ramp = (((i as f32 - low as f32) / (high as f32 - low as f32)) as f64).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let pf = pos_freq(i);
                let (inter, extra) = ((1.0 / (y.factor as f32 * pf as f32)) as f64, (1.0 / pf as f32) as f64);
                (inter * (1.0 - extrapolation) + extra * extrapolation) as f32
            })
            .collect();
        (inv, attention_factor)
    }
}

/// YaRN's magnitude correction `0.1 · m · ln(s) + 1` (1 for `s <= 1`).
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        match ModelConfig::parse(Path::new("config.json"), text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_reported_with_its_field() {
        let e = refused(r#"{"model_type": "mixtral", "hidden_size": "big", "vocab_size": 3}"#);
        assert!(e.contains("config.json") && e.contains("\"hidden_size\": \"big\""), "{e}");
        let e = refused(r#"{"model_type": "mixtral", "vocab_size": 3}"#);
        assert!(e.contains("missing field hidden_size"), "{e}");
        let e = refused(r#"{"model_type": "llama"}"#);
        assert!(e.contains("model_type \"llama\" is not supported") && e.contains("mixtral"), "{e}");
        let e = refused("{");
        assert!(e.contains("malformed JSON"), "{e}");
    }

    #[test]
    fn deepseek_softmax_scale_is_corrected_only_under_yarn_with_mscale_all_dim() {
        let plain = RopeParams { theta: 1e4, yarn: None };
        assert_eq!(plain.deepseek_softmax_scale(0.125), 0.125);
        let y = Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
            attention_factor: None,
            truncate: true,
        };
        let m = 0.1 * 40f64.ln() + 1.0;
        let yarn = RopeParams { theta: 1e4, yarn: Some(y.clone()) };
        assert_eq!(yarn.deepseek_softmax_scale(0.125), 0.125 * (m * m));
        let off = RopeParams { theta: 1e4, yarn: Some(Yarn { mscale_all_dim: 0.0, ..y }) };
        assert_eq!(off.deepseek_softmax_scale(0.125), 0.125);
    }
}
