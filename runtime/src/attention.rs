//! Grouped-query attention (Mixtral, Qwen3-MoE): its validated dimensions and its layer.
//! DeepSeek's multi-head latent attention is in [`crate::models::deepseek_v3`].

use crate::config::{AttentionShape, Common, Refuse, RopeConfig};
use crate::error::Result;
use crate::model::{Act, Attention, Linear, norm};
use crate::ops::{RopeTable, causal_attention, rms_norm_inplace};
use crate::prefix::Prefix;
use crate::weights::Weights;

/// The fields of grouped-query attention, as the architecture's config read them.
#[derive(Clone, Copy, Debug)]
pub struct GqaFields {
    /// `num_key_value_heads` (default: `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// `head_dim` (default: `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
    /// `partial_rotary_factor` (only 1 is implemented).
    pub partial_rotary_factor: Option<f64>,
    /// Keys further back than this many positions are masked.
    pub sliding_window: Option<usize>,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
}

/// Validated dimensions of grouped-query attention.
#[derive(Clone, Debug, PartialEq)]
pub struct GqaDims {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Epsilon of the query and key norms.
    pub rms_eps: f32,
    /// Keys further back than this many positions are masked (`None`: full causal attention).
    pub sliding_window: Option<usize>,
    /// Multiplier of `q · k` before the softmax.
    pub softmax_scale: f32,
}

impl GqaFields {
    /// Checks the fields against the shared ones; returns the dimensions and the rotary embedding
    /// (all of each head's dims rotated, in halves).
    pub fn validate(&self, common: &Common, refuse: Refuse) -> Result<(GqaDims, RopeConfig)> {
        let heads = common.heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(refuse.invalid(
                "num_key_value_heads",
                kv_heads,
                format!("must divide num_attention_heads ({heads})"),
            ));
        }
        let head_dim = self.head_dim.unwrap_or(common.hidden / heads);
        if let Some(p) = self.partial_rotary_factor
            && p != 1.0
        {
            return Err(refuse.unsupported("partial_rotary_factor", p, "1"));
        }
        let rope = common.rope.config(head_dim, false, "head_dim", refuse)?;
        let dims = GqaDims {
            hidden: common.hidden,
            heads,
            kv_heads,
            head_dim,
            qk_norm: self.qk_norm,
            rms_eps: common.rms_eps,
            sliding_window: self.sliding_window,
            softmax_scale: (head_dim as f64).powf(-0.5) as f32,
        };
        Ok((dims, rope))
    }
}

impl GqaDims {
    /// The attention's GEMM dimensions.
    pub fn shape(&self) -> AttentionShape {
        AttentionShape::Gqa { heads: self.heads, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }
}

/// Grouped-query attention of one layer with its weights.
#[derive(Debug)]
pub struct Gqa<'a> {
    dims: GqaDims,
    q: Linear<'a>,
    k: Linear<'a>,
    v: Linear<'a>,
    o: Linear<'a>,
    /// Per-head `q_norm` and `k_norm` (Qwen3).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

impl<'a> Gqa<'a> {
    /// Loads `{p}.q_proj`, `k_proj`, `v_proj`, `o_proj` (and `q_norm`, `k_norm`) of `p`, the
    /// layer's `self_attn`.
    pub fn load(w: &'a Weights, p: &Prefix, dims: &GqaDims) -> Result<Self> {
        let (h, hd) = (dims.hidden, dims.head_dim);
        let lin = |name: &str, out: usize, inp: usize| Linear::load(w, p.join(name).as_str(), out, inp);
        Ok(Gqa {
            q: lin("q_proj", dims.heads * hd, h)?,
            k: lin("k_proj", dims.kv_heads * hd, h)?,
            v: lin("v_proj", dims.kv_heads * hd, h)?,
            o: lin("o_proj", h, dims.heads * hd)?,
            qk_norm: if dims.qk_norm {
                Some((norm(w, &p.name("q_norm.weight"), hd)?, norm(w, &p.name("k_norm.weight"), hd)?))
            } else {
                None
            },
            dims: dims.clone(),
        })
    }
}

impl<'a> Attention<'a> for Gqa<'a> {
    fn forward(&self, rope: &RopeTable, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>> {
        let d = &self.dims;
        let (heads, kvh, hd) = (d.heads, d.kv_heads, d.head_dim);
        let mut q = self.q.forward(x, t, act)?;
        let mut k = self.k.forward(x, t, act)?;
        let v = self.v.forward(x, t, act)?;
        if let Some((qn, kn)) = &self.qk_norm {
            rms_norm_inplace(&mut q, hd, qn, d.rms_eps);
            rms_norm_inplace(&mut k, hd, kn, d.rms_eps);
        }
        let mut scratch = Vec::new();
        for i in 0..t {
            for hh in 0..heads {
                rope.apply(&mut q[(i * heads + hh) * hd..(i * heads + hh + 1) * hd], i, &mut scratch);
            }
            for hh in 0..kvh {
                rope.apply(&mut k[(i * kvh + hh) * hd..(i * kvh + hh + 1) * hd], i, &mut scratch);
            }
        }
        let out = causal_attention(&q, &k, &v, t, heads, kvh, hd, hd, d.softmax_scale, d.sliding_window);
        self.o.forward(&out, t, act)
    }

    fn linears(&self) -> Vec<&Linear<'a>> {
        vec![&self.q, &self.k, &self.v, &self.o]
    }
}
