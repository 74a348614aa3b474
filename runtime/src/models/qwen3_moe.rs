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
                if !only.contains(&i) && experts > 0 && (i + 1).is_multiple_of(step) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{AttentionShape, FfnShape, ModelConfig};

    /// Qwen3-30B-A3B's config.json as the hub ships it.
    const HUB: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
  "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128,
  "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#;

    fn with(edit: &dyn Fn(&mut serde_json::Value)) -> crate::Result<ModelConfig> {
        let mut v: serde_json::Value = serde_json::from_str(HUB).expect("hub config");
        edit(&mut v);
        ModelConfig::parse(Path::new("config.json"), &v.to_string())
    }

    #[test]
    fn the_hub_config_validates_with_its_dimensions() {
        let c = with(&|_| {}).expect("Qwen3-30B-A3B's config is supported");
        assert_eq!((c.num_layers(), c.hidden, c.vocab), (48, 2048, 151936));
        let s = c.shapes();
        assert_eq!(s.attention, AttentionShape::Gqa { heads: 32, kv_heads: 4, head_dim: 128 });
        assert!(
            s.layers.iter().all(|l| *l == FfnShape::Moe { experts: 128, intermediate: 768, shared_intermediate: None })
        );
    }

    #[test]
    fn mlp_only_layers_and_the_sparse_step_make_dense_layers() {
        let c = with(&|v| {
            v["mlp_only_layers"] = serde_json::json!([0]);
            v["decoder_sparse_step"] = 2.into();
        })
        .expect("dense layers");
        let s = c.shapes();
        let dense = FfnShape::Dense { intermediate: 6144 };
        assert_eq!((&s.layers[0], &s.layers[2]), (&dense, &dense), "layer 0 is listed, layer 2 is off-step");
        assert!(matches!(s.layers[1], FfnShape::Moe { .. }) && matches!(s.layers[3], FfnShape::Moe { .. }));
        let e = with(&|v| {
            v["mlp_only_layers"] = serde_json::json!([0]);
            v.as_object_mut().map(|o| o.remove("intermediate_size"));
        })
        .expect_err("a dense layer without its size")
        .to_string();
        assert!(e.contains("intermediate_size (missing) is needed by dense layer 0"), "{e}");
        let e = with(&|v| v["shared_expert_intermediate_size"] = 512.into()).expect_err("shared expert").to_string();
        assert!(e.contains("shared_expert_intermediate_size 512 is not supported"), "{e}");
        let e = with(&|v| v["mlp_only_layers"] = "all".into()).expect_err("not a list").to_string();
        assert!(e.contains("mlp_only_layers"), "{e}");
    }
}
