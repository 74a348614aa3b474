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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{AttentionShape, FfnShape, ModelConfig};

    /// Mixtral-8x7B-v0.1's config.json as the hub ships it.
    const HUB: &str = r#"{"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
  "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "num_local_experts": 8, "output_router_logits": false, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.02, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000}"#;

    fn with(edit: &dyn Fn(&mut serde_json::Value)) -> crate::Result<ModelConfig> {
        let mut v: serde_json::Value = serde_json::from_str(HUB).expect("hub config");
        edit(&mut v);
        ModelConfig::parse(Path::new("config.json"), &v.to_string())
    }

    #[test]
    fn the_hub_config_validates_with_its_dimensions() {
        let c = with(&|_| {}).expect("Mixtral's config is supported");
        assert_eq!((c.num_layers(), c.hidden, c.vocab), (32, 4096, 32000));
        let s = c.shapes();
        assert_eq!(s.attention, AttentionShape::Gqa { heads: 32, kv_heads: 8, head_dim: 128 });
        assert!(
            s.layers.iter().all(|l| *l == FfnShape::Moe { experts: 8, intermediate: 14336, shared_intermediate: None })
        );
        assert_eq!((c.rope().dim, c.rope().interleave), (128, false));
    }

    #[test]
    fn unsupported_settings_are_refused_naming_the_field_and_value() {
        let e = with(&|v| v["num_key_value_heads"] = 5.into()).expect_err("5 of 32").to_string();
        assert!(e.contains("num_key_value_heads 5 must divide num_attention_heads (32)"), "{e}");
        let e = with(&|v| v["partial_rotary_factor"] = 0.5.into()).expect_err("partial rope").to_string();
        assert!(e.contains("partial_rotary_factor 0.5 is not supported"), "{e}");
        let e = with(&|v| v["num_experts_per_tok"] = 9.into()).expect_err("9 of 8").to_string();
        assert!(e.contains("num_experts_per_tok 9"), "{e}");
        let e = with(&|v| v["attention_bias"] = true.into()).expect_err("biases").to_string();
        assert!(e.contains("attention_bias true is not supported"), "{e}");
        let e = with(&|v| {
            v.as_object_mut().map(|o| o.remove("num_local_experts"));
        })
        .expect_err("no experts")
        .to_string();
        assert!(e.contains("num_local_experts"), "{e}");
    }
}
