//! Qwen3-MoE: grouped-query attention with per-head RMSNorm of queries and keys, and mixtures of
//! experts every `decoder_sparse_step` layers except those in `mlp_only_layers` (dense), routed by
//! softmax top-k (renormalized under `norm_topk_prob`), without a shared expert.

use std::path::Path;

use serde::Deserialize;

use crate::attention::{Gqa, GqaDims, GqaFields};
use crate::config::{Common, FfnShape, Refuse, RopeConfig, Shapes, read_fields};
use crate::error::Result;
use crate::model::{Ffn, Layer, Mlp, Moe, SWIGLU_NAMES};
use crate::models::{Architecture, layer_prefix, same};
use crate::router::{Router, SoftmaxTopK};
use crate::weights::Weights;

/// Qwen3-MoE's own fields of `config.json` (the shared ones are in [`crate::config::BaseConfig`]).
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Key/value heads (default `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Dims per head (default `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
    /// Share of each head's dims rotated (only 1 is implemented).
    pub partial_rotary_factor: Option<f64>,
    /// Window of the sliding-window attention, used when `use_sliding_window` is true.
    pub sliding_window: Option<usize>,
    /// Use `sliding_window` (default false).
    pub use_sliding_window: Option<bool>,
    /// Routed experts (hub name).
    pub num_experts: Option<usize>,
    /// Routed experts (transformers 5 name).
    pub num_local_experts: Option<usize>,
    /// Experts selected per token.
    pub num_experts_per_tok: usize,
    /// Intermediate size of each expert.
    pub moe_intermediate_size: usize,
    /// A MoE layer every this many layers (default 1).
    pub decoder_sparse_step: Option<usize>,
    /// Layers that are dense whatever `decoder_sparse_step` says.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// A shared expert (Qwen2-MoE has one; Qwen3-MoE must not).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Renormalize the selected experts' probabilities (default false).
    pub norm_topk_prob: Option<bool>,
    /// Intermediate size of the dense layers (needed when there are any).
    pub intermediate_size: Option<usize>,
}

/// The feed-forward block of one Qwen3-MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// A dense SwiGLU MLP of this intermediate size.
    Dense(usize),
    /// A mixture of experts ([`Qwen3Moe::routing`], [`Qwen3Moe::moe_intermediate_size`]).
    Moe,
}

/// A validated Qwen3-MoE architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3Moe {
    /// Epsilon of the layers' RMSNorms.
    pub rms_eps: f32,
    /// Attention.
    pub attn: GqaDims,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// The feed-forward block of each layer.
    pub ffn: Vec<FfnKind>,
    /// Intermediate size of each expert.
    pub moe_intermediate_size: usize,
    /// Routing of the MoE layers.
    pub routing: SoftmaxTopK,
}

/// [`crate::models::Parse`] of Qwen3-MoE.
pub fn parse(file: &Path, text: &str, common: &Common) -> Result<Box<dyn Architecture>> {
    Ok(Box::new(read_fields::<Config>(file, text)?.validate(common, Refuse(file))?))
}

impl Config {
    /// Checks the fields against the shared ones and what the runtime implements.
    pub fn validate(&self, common: &Common, refuse: Refuse) -> Result<Qwen3Moe> {
        let gqa = GqaFields {
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            partial_rotary_factor: self.partial_rotary_factor,
            sliding_window: if self.use_sliding_window.unwrap_or(false) { self.sliding_window } else { None },
            qk_norm: true,
        };
        let (attn, rope) = gqa.validate(common, refuse)?;
        let experts = self
            .num_experts
            .or(self.num_local_experts)
            .ok_or_else(|| refuse.invalid("num_experts", "(missing)", "is needed (or num_local_experts)"))?;
        let step = self.decoder_sparse_step.unwrap_or(1).max(1);
        let only = self.mlp_only_layers.as_deref().unwrap_or(&[]);
        if let Some(s) = self.shared_expert_intermediate_size
            && s > 0
        {
            return Err(refuse.unsupported("shared_expert_intermediate_size", s, "0: Qwen3-MoE has no shared expert"));
        }
        let top_k = self.num_experts_per_tok;
        let ffn = (0..common.layers)
            .map(|i| {
                if !only.contains(&i) && experts > 0 && (i + 1) % step == 0 {
                    return Ok(FfnKind::Moe);
                }
                self.intermediate_size.map(FfnKind::Dense).ok_or_else(|| {
                    refuse.invalid("intermediate_size", "(missing)", format!("is needed by dense layer {i}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if ffn.contains(&FfnKind::Moe) && (top_k == 0 || top_k > experts) {
            let rule = format!("must be between 1 and num_experts ({experts})");
            return Err(refuse.invalid("num_experts_per_tok", top_k, rule));
        }
        Ok(Qwen3Moe {
            rms_eps: common.rms_eps,
            attn,
            rope,
            ffn,
            moe_intermediate_size: self.moe_intermediate_size,
            routing: SoftmaxTopK { experts, top_k, norm_topk_prob: self.norm_topk_prob.unwrap_or(false) },
        })
    }
}

impl Architecture for Qwen3Moe {
    fn num_layers(&self) -> usize {
        self.ffn.len()
    }

    fn rope(&self) -> &RopeConfig {
        &self.rope
    }

    fn shapes(&self) -> Shapes {
        let layers = self
            .ffn
            .iter()
            .map(|f| match *f {
                FfnKind::Dense(intermediate) => FfnShape::Dense { intermediate },
                FfnKind::Moe => FfnShape::Moe {
                    experts: self.routing.experts,
                    intermediate: self.moe_intermediate_size,
                    shared_intermediate: None,
                },
            })
            .collect();
        Shapes { hidden: self.attn.hidden, attention: self.attn.shape(), layers }
    }

    fn load_layer<'a>(&self, w: &'a Weights, i: usize) -> Result<Layer<'a>> {
        let p = layer_prefix(i);
        let h = self.attn.hidden;
        let attn = Box::new(Gqa::load(w, &p.join("self_attn"), &self.attn)?);
        let mp = p.join("mlp");
        let mlp = match self.ffn.get(i) {
            Some(&FfnKind::Dense(inter)) => Mlp::Dense(Ffn::load(w, &mp, SWIGLU_NAMES, h, inter)?),
            _ => {
                let routing = Router::Softmax(self.routing.clone());
                Mlp::Moe(Moe::load(w, &mp, SWIGLU_NAMES, routing, h, self.moe_intermediate_size, None)?)
            }
        };
        Layer::load(w, &p, i, h, self.rms_eps, attn, mlp)
    }

    fn same_as(&self, other: &dyn Architecture) -> bool {
        same(self, other)
    }
}
