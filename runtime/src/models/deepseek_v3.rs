//! DeepSeek-V3 / R1 (and Kimi-K2, the same architecture): multi-head latent attention with
//! compressed queries and DeepSeek's interleaved RoPE (YaRN with its softmax correction), dense
//! layers before `first_k_dense_replace`, then mixtures of experts with a shared expert and
//! sigmoid group-limited routing ([`crate::router::GroupLimited`]).
//!
//! The hub's checkpoints also hold `num_nextn_predict_layers` multi-token-prediction layers after
//! the decoder layers (`model.layers.61.*` of DeepSeek-V3: `eh_proj`, `enorm`, `hnorm`,
//! `shared_head` and a full decoder layer). They predict the token after next for speculative
//! decoding and take no part in the next-token distribution: they are not loaded or evaluated.

use std::path::Path;

use serde::Deserialize;

use crate::config::{AttentionShape, Common, FfnShape, Refuse, RopeConfig, Shapes, read_fields};
use crate::error::Result;
use crate::model::{Act, Attention, Ffn, Layer, Linear, Mlp, Moe, SWIGLU_NAMES, norm};
use crate::models::{Architecture, layer_prefix, same};
use crate::ops::{RopeTable, causal_attention, rms_norm_inplace};
use crate::prefix::Prefix;
use crate::router::{GroupLimited, Router};
use crate::weights::Weights;

/// Epsilon of MLA's `q_a_layernorm` and `kv_a_layernorm`: DeepSeek's reference code and
/// transformers build them with the RMSNorm default, whatever `rms_norm_eps` says.
const MLA_NORM_EPS: f32 = 1e-6;

/// DeepSeek-V3's own fields of `config.json` (the shared ones are in [`crate::config::BaseConfig`]).
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Must equal `num_attention_heads` (MLA has one key/value head per query head).
    pub num_key_value_heads: Option<usize>,
    /// Rank of the query compression (`null`: a plain `q_proj`, as DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression.
    pub kv_lora_rank: usize,
    /// Per-head query/key dims without position encoding.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dims with RoPE.
    pub qk_rope_head_dim: usize,
    /// Per-head value dims.
    pub v_head_dim: usize,
    /// RoPE pairs interleaved (default true, as DeepSeek's checkpoints are laid out).
    pub rope_interleave: Option<bool>,
    /// Router scores (default `sigmoid`, the only one implemented).
    pub scoring_func: Option<String>,
    /// Expert selection (default `noaux_tc`, the only one implemented).
    pub topk_method: Option<String>,
    /// A MoE layer every this many layers (only 1 is implemented).
    pub moe_layer_freq: Option<usize>,
    /// Routed experts.
    pub n_routed_experts: Option<usize>,
    /// Routed experts, as some conversions name them.
    pub num_local_experts: Option<usize>,
    /// Expert groups (default 1: no group limit).
    pub n_group: Option<usize>,
    /// Groups kept per token (default `n_group`).
    pub topk_group: Option<usize>,
    /// Experts selected per token.
    pub num_experts_per_tok: usize,
    /// Intermediate size of each routed expert.
    pub moe_intermediate_size: usize,
    /// Shared experts, fused into one MLP of `n_shared_experts × moe_intermediate_size` (default 0).
    pub n_shared_experts: Option<usize>,
    /// Renormalize the selected experts' scores (default true).
    pub norm_topk_prob: Option<bool>,
    /// Multiplier of the routed experts' weights (default 1).
    pub routed_scaling_factor: Option<f64>,
    /// Layers before this one are dense (default 0).
    pub first_k_dense_replace: Option<usize>,
    /// Intermediate size of the dense layers.
    pub intermediate_size: usize,
    /// Multi-token-prediction layers after the decoder layers: read, and not evaluated.
    pub num_nextn_predict_layers: Option<usize>,
}

/// Validated dimensions of multi-head latent attention.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaDims {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Rank of the query compression (`None`: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression.
    pub kv_lora_rank: usize,
    /// Per-head query/key dims without position encoding.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dims with RoPE (the key part is shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value dims.
    pub v_head_dim: usize,
    /// Multiplier of `q · k` before the softmax (YaRN-corrected).
    pub softmax_scale: f32,
}

/// A validated DeepSeek-V3 architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV3 {
    /// Decoder layers (without the multi-token-prediction layers).
    pub layers: usize,
    /// Epsilon of the layers' RMSNorms.
    pub rms_eps: f32,
    /// Attention.
    pub mla: MlaDims,
    /// Rotary embedding of the `qk_rope_head_dim` dims.
    pub rope: RopeConfig,
    /// Layers before this one are dense.
    pub first_k_dense_replace: usize,
    /// Intermediate size of the dense layers.
    pub intermediate_size: usize,
    /// Intermediate size of each routed expert.
    pub moe_intermediate_size: usize,
    /// Intermediate size of the shared expert MLP (`None`: none).
    pub shared_intermediate: Option<usize>,
    /// Routing of the MoE layers.
    pub routing: GroupLimited,
}

/// [`crate::models::Parse`] of DeepSeek-V3.
pub fn parse(file: &Path, text: &str, common: &Common) -> Result<Box<dyn Architecture>> {
    Ok(Box::new(read_fields::<Config>(file, text)?.validate(common, Refuse(file))?))
}

impl Config {
    /// Checks the fields against the shared ones and what the runtime implements.
    pub fn validate(&self, common: &Common, refuse: Refuse) -> Result<DeepseekV3> {
        let heads = common.heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if kv_heads != heads {
            let supported = format!("num_attention_heads ({heads}) with MLA");
            return Err(refuse.unsupported("num_key_value_heads", kv_heads, supported));
        }
        let (nope, rd) = (self.qk_nope_head_dim, self.qk_rope_head_dim);
        let interleave = self.rope_interleave.unwrap_or(true);
        let rope = common.rope.config(rd, interleave, "qk_rope_head_dim", refuse)?;
        let softmax_scale = common.rope.deepseek_softmax_scale(((nope + rd) as f64).powf(-0.5)) as f32;
        let mla = MlaDims {
            hidden: common.hidden,
            heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rd,
            v_head_dim: self.v_head_dim,
            softmax_scale,
        };

        let scoring = self.scoring_func.as_deref().unwrap_or("sigmoid");
        if scoring != "sigmoid" {
            return Err(refuse.unsupported("scoring_func", format!("{scoring:?}"), "sigmoid"));
        }
        let method = self.topk_method.as_deref().unwrap_or("noaux_tc");
        if method != "noaux_tc" {
            return Err(refuse.unsupported("topk_method", format!("{method:?}"), "noaux_tc"));
        }
        let freq = self.moe_layer_freq.unwrap_or(1);
        if freq != 1 {
            return Err(refuse.unsupported("moe_layer_freq", freq, "1"));
        }
        let experts = self
            .n_routed_experts
            .or(self.num_local_experts)
            .ok_or_else(|| refuse.invalid("n_routed_experts", "(missing)", "is needed (or num_local_experts)"))?;
        let n_group = self.n_group.unwrap_or(1).max(1);
        let topk_group = self.topk_group.unwrap_or(n_group);
        if !experts.is_multiple_of(n_group) {
            return Err(refuse.invalid("n_group", n_group, format!("must divide n_routed_experts ({experts})")));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(refuse.invalid("topk_group", topk_group, format!("must be between 1 and n_group ({n_group})")));
        }
        if n_group > 1 && experts / n_group < 2 {
            let rule = format!("must leave at least 2 of the {experts} experts per group for group-limited routing");
            return Err(refuse.invalid("n_group", n_group, rule));
        }
        let top_k = self.num_experts_per_tok;
        if top_k > topk_group * (experts / n_group) {
            let rule = format!(
                "must not exceed the {} experts of the topk_group kept groups",
                topk_group * (experts / n_group)
            );
            return Err(refuse.invalid("num_experts_per_tok", top_k, rule));
        }
        let first_k_dense_replace = self.first_k_dense_replace.unwrap_or(0);
        if first_k_dense_replace < common.layers && (experts == 0 || top_k == 0 || top_k > experts) {
            let rule = format!("must be between 1 and n_routed_experts ({experts})");
            return Err(refuse.invalid("num_experts_per_tok", top_k, rule));
        }
        let shared = self.n_shared_experts.unwrap_or(0);
        Ok(DeepseekV3 {
            layers: common.layers,
            rms_eps: common.rms_eps,
            mla,
            rope,
            first_k_dense_replace,
            intermediate_size: self.intermediate_size,
            moe_intermediate_size: self.moe_intermediate_size,
            shared_intermediate: (shared > 0).then_some(self.moe_intermediate_size * shared),
            routing: GroupLimited {
                experts,
                top_k,
                n_group,
                topk_group,
                norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
                routed_scaling_factor: self.routed_scaling_factor.unwrap_or(1.0) as f32,
            },
        })
    }
}

impl DeepseekV3 {
    fn is_dense(&self, i: usize) -> bool {
        i < self.first_k_dense_replace
    }
}

impl Architecture for DeepseekV3 {
    fn num_layers(&self) -> usize {
        self.layers
    }

    fn rope(&self) -> &RopeConfig {
        &self.rope
    }

    fn shapes(&self) -> Shapes {
        let m = &self.mla;
        let attention = AttentionShape::Mla {
            heads: m.heads,
            q_lora_rank: m.q_lora_rank,
            kv_lora_rank: m.kv_lora_rank,
            qk_nope_head_dim: m.qk_nope_head_dim,
            qk_rope_head_dim: m.qk_rope_head_dim,
            v_head_dim: m.v_head_dim,
        };
        let layers = (0..self.layers)
            .map(|i| match self.is_dense(i) {
                true => FfnShape::Dense { intermediate: self.intermediate_size },
                false => FfnShape::Moe {
                    experts: self.routing.experts,
                    intermediate: self.moe_intermediate_size,
                    shared_intermediate: self.shared_intermediate,
                },
            })
            .collect();
        Shapes { hidden: m.hidden, attention, layers }
    }

    fn load_layer<'a>(&self, w: &'a Weights, i: usize) -> Result<Layer<'a>> {
        let p = layer_prefix(i);
        let h = self.mla.hidden;
        let attn = Box::new(Mla::load(w, &p.join("self_attn"), &self.mla)?);
        let mp = p.join("mlp");
        let mlp = if self.is_dense(i) {
            Mlp::Dense(Ffn::load(w, &mp, SWIGLU_NAMES, h, self.intermediate_size)?)
        } else {
            let e = self.routing.experts;
            let bias_name = mp.join("gate").name("e_score_correction_bias");
            let bias = if w.has(&bias_name) { w.load(&bias_name, &[e])?.data } else { vec![0.0; e] };
            let routing = Router::SigmoidGroupLimited(self.routing.clone(), bias);
            let moe_inter = self.moe_intermediate_size;
            Mlp::Moe(Moe::load(w, &mp, SWIGLU_NAMES, routing, h, moe_inter, self.shared_intermediate)?)
        };
        Layer::load(w, &p, i, h, self.rms_eps, attn, mlp)
    }

    fn same_as(&self, other: &dyn Architecture) -> bool {
        same(self, other)
    }
}

/// DeepSeek's multi-head latent attention of one layer with its weights.
#[derive(Debug)]
pub struct Mla<'a> {
    dims: MlaDims,
    /// `q_a_proj` and `q_a_layernorm` when queries are compressed.
    q_a: Option<(Linear<'a>, Vec<f32>)>,
    /// `q_b_proj` (compressed queries) or `q_proj`.
    q: Linear<'a>,
    /// `kv_a_proj_with_mqa`.
    kv_a: Linear<'a>,
    /// `kv_a_layernorm`.
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj`.
    kv_b: Linear<'a>,
    /// `o_proj`.
    o: Linear<'a>,
}

impl<'a> Mla<'a> {
    /// Loads the attention `p` (`model.layers.3.self_attn`).
    pub fn load(w: &'a Weights, p: &Prefix, d: &MlaDims) -> Result<Self> {
        let h = d.hidden;
        let (heads, kvr, nope, rd, vd) =
            (d.heads, d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim);
        let lin = |name: &str, out: usize, inp: usize| Linear::load(w, p.join(name).as_str(), out, inp);
        let (q_a, q) = match d.q_lora_rank {
            Some(r) => (
                Some((lin("q_a_proj", r, h)?, norm(w, &p.name("q_a_layernorm.weight"), r)?)),
                lin("q_b_proj", heads * (nope + rd), r)?,
            ),
            None => (None, lin("q_proj", heads * (nope + rd), h)?),
        };
        Ok(Mla {
            q_a,
            q,
            kv_a: lin("kv_a_proj_with_mqa", kvr + rd, h)?,
            kv_a_norm: norm(w, &p.name("kv_a_layernorm.weight"), kvr)?,
            kv_b: lin("kv_b_proj", heads * (nope + vd), kvr)?,
            o: lin("o_proj", h, heads * vd)?,
            dims: d.clone(),
        })
    }
}

impl<'a> Attention<'a> for Mla<'a> {
    fn forward(&self, rope: &RopeTable, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>> {
        let d = &self.dims;
        let (heads, kvr, nope, rd, vd) =
            (d.heads, d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim);
        let qk = nope + rd;
        let mut qs = match &self.q_a {
            Some((qa, qa_norm)) => {
                let mut c = qa.forward(x, t, act)?;
                rms_norm_inplace(&mut c, qa.w.rows, qa_norm, MLA_NORM_EPS);
                self.q.forward(&c, t, act)?
            }
            None => self.q.forward(x, t, act)?,
        };
        let ckv = self.kv_a.forward(x, t, act)?;
        let mut latent = vec![0f32; t * kvr];
        let mut k_rot = vec![0f32; t * rd];
        for i in 0..t {
            let row = &ckv[i * (kvr + rd)..(i + 1) * (kvr + rd)];
            latent[i * kvr..(i + 1) * kvr].copy_from_slice(&row[..kvr]);
            k_rot[i * rd..(i + 1) * rd].copy_from_slice(&row[kvr..]);
        }
        rms_norm_inplace(&mut latent, kvr, &self.kv_a_norm, MLA_NORM_EPS);
        let kv = self.kv_b.forward(&latent, t, act)?;
        let mut scratch = Vec::new();
        let mut keys = vec![0f32; t * heads * qk];
        let mut values = vec![0f32; t * heads * vd];
        for i in 0..t {
            rope.apply(&mut k_rot[i * rd..(i + 1) * rd], i, &mut scratch);
            for hd in 0..heads {
                let qh = &mut qs[(i * heads + hd) * qk..(i * heads + hd + 1) * qk];
                rope.apply(&mut qh[nope..], i, &mut scratch);
                let src = &kv[(i * heads + hd) * (nope + vd)..(i * heads + hd + 1) * (nope + vd)];
                let kh = &mut keys[(i * heads + hd) * qk..(i * heads + hd + 1) * qk];
                kh[..nope].copy_from_slice(&src[..nope]);
                kh[nope..].copy_from_slice(&k_rot[i * rd..(i + 1) * rd]);
                values[(i * heads + hd) * vd..(i * heads + hd + 1) * vd].copy_from_slice(&src[nope..]);
            }
        }
        let out = causal_attention(&qs, &keys, &values, t, heads, heads, qk, vd, d.softmax_scale, None);
        self.o.forward(&out, t, act)
    }

    fn linears(&self) -> Vec<&Linear<'a>> {
        self.q_a.iter().map(|(l, _)| l).chain([&self.q, &self.kv_a, &self.kv_b, &self.o]).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{AttentionShape, FfnShape, ModelConfig};

    /// DeepSeek-V3's config.json as the hub ships it (quantization and auto_map left out).
    const HUB: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
  "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
  "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
  "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128, "num_experts_per_tok": 8,
  "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
  "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": true,
  "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 129280
}"#;

    fn with(edit: &dyn Fn(&mut serde_json::Value)) -> crate::Result<ModelConfig> {
        let mut v: serde_json::Value = serde_json::from_str(HUB).expect("hub config");
        edit(&mut v);
        ModelConfig::parse(Path::new("config.json"), &v.to_string())
    }

    #[test]
    fn the_hub_config_validates_to_61_layers_without_the_mtp_layer() {
        let c = with(&|_| {}).expect("DeepSeek-V3's config is supported");
        assert_eq!(c.num_layers(), 61, "the MTP layer is not a decoder layer");
        let s = c.shapes();
        assert_eq!(s.hidden, 7168);
        assert_eq!(
            s.attention,
            AttentionShape::Mla {
                heads: 128,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128
            }
        );
        assert_eq!(s.layers[2], FfnShape::Dense { intermediate: 18432 });
        assert_eq!(s.layers[3], FfnShape::Moe { experts: 256, intermediate: 2048, shared_intermediate: Some(2048) });
        let r = c.rope();
        assert_eq!((r.dim, r.interleave, r.inv_freq.len()), (64, true, 32));
        assert!(r.attention_factor == 1.0, "mscale = mscale_all_dim: cos and sin unscaled");
    }

    #[test]
    fn unsupported_routing_is_refused_naming_the_field_and_value() {
        let e = with(&|v| v["scoring_func"] = "softmax".into()).expect_err("softmax scoring").to_string();
        assert!(e.contains("scoring_func \"softmax\" is not supported") && e.contains("sigmoid"), "{e}");
        let e = with(&|v| v["topk_method"] = "greedy".into()).expect_err("greedy").to_string();
        assert!(e.contains("topk_method \"greedy\""), "{e}");
        let e = with(&|v| v["n_group"] = 3.into()).expect_err("3 groups of 256").to_string();
        assert!(e.contains("n_group 3 must divide n_routed_experts (256)"), "{e}");
        let e = with(&|v| v["num_key_value_heads"] = 8.into()).expect_err("GQA with MLA").to_string();
        assert!(e.contains("num_key_value_heads 8"), "{e}");
        let e = with(&|v| v["qk_rope_head_dim"] = 63.into()).expect_err("odd rope dims").to_string();
        assert!(e.contains("qk_rope_head_dim 63 must be even"), "{e}");
        let e = with(&|v| v["num_experts_per_tok"] = 200.into()).expect_err("200 of 4 groups of 32").to_string();
        assert!(e.contains("num_experts_per_tok 200 must not exceed the 128 experts"), "{e}");
    }

    #[test]
    fn a_model_differs_from_one_with_other_routing() {
        let a = with(&|_| {}).expect("hub");
        let b = with(&|v| v["routed_scaling_factor"] = 1.0.into()).expect("other scaling");
        assert!(a.same_architecture(&with(&|_| {}).expect("hub")));
        assert!(!a.same_architecture(&b), "a routing difference went unnoticed");
    }
}
