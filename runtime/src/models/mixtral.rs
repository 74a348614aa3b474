//! Mixtral: grouped-query attention (with an optional sliding window) and, in every layer, a
//! mixture of experts routed by softmax top-k with the selected probabilities renormalized.

use std::path::Path;

use serde::Deserialize;

use crate::attention::{Gqa, GqaDims, GqaFields};
use crate::config::{Common, FfnShape, Refuse, RopeConfig, Shapes, read_fields};
use crate::error::Result;
use crate::model::{Layer, Mlp, Moe, SWIGLU_NAMES};
use crate::models::{Architecture, layer_prefix, same};
use crate::router::{Router, SoftmaxTopK};
use crate::weights::Weights;

/// Mixtral's own fields of `config.json` (the shared ones are in [`crate::config::BaseConfig`]).
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Key/value heads (default `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Dims per head (default `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
    /// Share of each head's dims rotated (only 1 is implemented).
    pub partial_rotary_factor: Option<f64>,
    /// Keys further back than this many positions are masked.
    pub sliding_window: Option<usize>,
    /// Routed experts (hub name).
    pub num_local_experts: Option<usize>,
    /// Routed experts (another name some conversions use).
    pub num_experts: Option<usize>,
    /// Experts selected per token.
    pub num_experts_per_tok: usize,
    /// Intermediate size of each expert.
    pub intermediate_size: usize,
}

/// A validated Mixtral architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixtral {
    /// Decoder layers.
    pub layers: usize,
    /// Epsilon of the layers' RMSNorms.
    pub rms_eps: f32,
    /// Attention.
    pub attn: GqaDims,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// Intermediate size of each expert.
    pub intermediate_size: usize,
    /// Routing of every layer.
    pub routing: SoftmaxTopK,
}

/// [`crate::models::Parse`] of Mixtral.
pub fn parse(file: &Path, text: &str, common: &Common) -> Result<Box<dyn Architecture>> {
    Ok(Box::new(read_fields::<Config>(file, text)?.validate(common, Refuse(file))?))
}

impl Config {
    /// Checks the fields against the shared ones and what the runtime implements.
    pub fn validate(&self, common: &Common, refuse: Refuse) -> Result<Mixtral> {
        let gqa = GqaFields {
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            partial_rotary_factor: self.partial_rotary_factor,
            sliding_window: self.sliding_window,
            qk_norm: false,
        };
        let (attn, rope) = gqa.validate(common, refuse)?;
        let experts = self
            .num_local_experts
            .or(self.num_experts)
            .ok_or_else(|| refuse.invalid("num_local_experts", "(missing)", "is needed (or num_experts)"))?;
        let top_k = self.num_experts_per_tok;
        if experts == 0 || top_k == 0 || top_k > experts {
            let rule = format!("must be between 1 and num_local_experts ({experts})");
            return Err(refuse.invalid("num_experts_per_tok", top_k, rule));
        }
        Ok(Mixtral {
            layers: common.layers,
            rms_eps: common.rms_eps,
            attn,
            rope,
            intermediate_size: self.intermediate_size,
            routing: SoftmaxTopK { experts, top_k, norm_topk_prob: true },
        })
    }
}

impl Architecture for Mixtral {
    fn num_layers(&self) -> usize {
        self.layers
    }

    fn rope(&self) -> &RopeConfig {
        &self.rope
    }

    fn shapes(&self) -> Shapes {
        let moe = FfnShape::Moe {
            experts: self.routing.experts,
            intermediate: self.intermediate_size,
            shared_intermediate: None,
        };
        Shapes { hidden: self.attn.hidden, attention: self.attn.shape(), layers: vec![moe; self.layers] }
    }

    fn load_layer<'a>(&self, w: &'a Weights, i: usize) -> Result<Layer<'a>> {
        let p = layer_prefix(i);
        let h = self.attn.hidden;
        let attn = Box::new(Gqa::load(w, &p.join("self_attn"), &self.attn)?);
        // The hub names the block `block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2`
        // (down); transformers 5 writes `mlp` with the usual names.
        let (block, names) = match p.join("block_sparse_moe") {
            b if w.has(&b.join("gate").name("weight")) => (b, ["w1", "w3", "w2"]),
            _ => (p.join("mlp"), SWIGLU_NAMES),
        };
        let routing = Router::Softmax(self.routing.clone());
        let mlp = Mlp::Moe(Moe::load(w, &block, names, routing, h, self.intermediate_size, None)?);
        Layer::load(w, &p, i, h, self.rms_eps, attn, mlp)
    }

    fn same_as(&self, other: &dyn Architecture) -> bool {
        same(self, other)
    }
}
