//! The weight GEMM shapes of a model, the way serving engines lay the layers out (fused QKV /
//! q_a+kv_a projections, fused gate+up projections, experts grouped).
//!
//! The model's dimensions come in as [`ModelDims`], filled from a validated config by the caller
//! (the CLI reads `config.json` with the runtime's parser): this crate does not parse configs.

use serde::{Deserialize, Serialize};

/// One weight GEMM: `D[M, N] = A[M, K] · B[N, K]ᵀ`, for every M the model sees.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WeightShape {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Experts sharing the shape in one M-grouped launch (`1`: a dense GEMM).
    pub groups: usize,
    /// What it is (`q_a+kv_a`, `experts.gate_up`, ...), for people reading the table.
    pub what: String,
}

/// The dimensions of a model that fix its weight GEMMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDims {
    /// Model width.
    pub hidden: usize,
    /// The attention block (the same in every layer).
    pub attention: AttentionDims,
    /// The feed-forward block of each decoder layer, in layer order.
    pub layers: Vec<FfnDims>,
}

/// The attention block's dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttentionDims {
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
pub enum FfnDims {
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

/// Every distinct weight GEMM of the model: the attention projections, then the feed-forward
/// blocks in the order the layers first use them (a dense MLP, or the routed experts and then
/// the shared expert). Shapes are distinct by (N, K, groups); the first name given a shape stays.
pub fn model_shapes(dims: &ModelDims) -> Vec<WeightShape> {
    let h = dims.hidden;
    let mut v: Vec<WeightShape> = Vec::new();
    let mut add = |n: usize, k: usize, groups: usize, what: &str| {
        if !v.iter().any(|s| s.n == n && s.k == k && s.groups == groups) {
            v.push(WeightShape { n, k, groups, what: what.into() });
        }
    };
    match dims.attention {
        AttentionDims::Mla { heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim } => {
            let (kvr, nope, rope) = (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim);
            match q_lora_rank.filter(|&r| r > 0) {
                Some(qr) => {
                    add(qr + kvr + rope, h, 1, "q_a+kv_a");
                    add(heads * (nope + rope), qr, 1, "q_b");
                }
                None => {
                    add(heads * (nope + rope), h, 1, "q");
                    add(kvr + rope, h, 1, "kv_a");
                }
            }
            add(heads * (nope + v_head_dim), kvr, 1, "kv_b");
            add(h, heads * v_head_dim, 1, "o");
        }
        AttentionDims::Gqa { heads, kv_heads, head_dim } => {
            add((heads + 2 * kv_heads) * head_dim, h, 1, "qkv");
            add(h, heads * head_dim, 1, "o");
        }
    }
    for layer in &dims.layers {
        match *layer {
            FfnDims::Dense { intermediate: i } => {
                add(2 * i, h, 1, "mlp.gate_up");
                add(h, i, 1, "mlp.down");
            }
            FfnDims::Moe { experts, intermediate: mi, shared_intermediate } => {
                add(2 * mi, h, experts, "experts.gate_up");
                add(h, mi, experts, "experts.down");
                if let Some(si) = shared_intermediate {
                    add(2 * si, h, 1, "shared_experts.gate_up");
                    add(h, si, 1, "shared_experts.down");
                }
            }
        }
    }
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// DeepSeek-V3's dimensions (the hub's config.json): MLA with q_lora_rank 1536, 3 dense
    /// layers then 58 MoE layers of 256 experts and one shared expert.
    pub(crate) fn deepseek_v3() -> ModelDims {
        let moe = FfnDims::Moe { experts: 256, intermediate: 2048, shared_intermediate: Some(2048) };
        let mut layers = vec![FfnDims::Dense { intermediate: 18432 }; 3];
        layers.extend(std::iter::repeat_n(moe, 58));
        ModelDims {
            hidden: 7168,
            attention: AttentionDims::Mla {
                heads: 128,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
            },
            layers,
        }
    }

    #[test]
    fn deepseek_v3_config_gives_the_bench_targets_shapes() {
        let s = model_shapes(&deepseek_v3());
        let nk: Vec<(usize, usize, usize)> = s.iter().map(|s| (s.n, s.k, s.groups)).collect();
        // The dense shapes of ../shared/BENCH_TARGETS.md, then the MLP and expert shapes.
        for want in
            [(2112, 7168, 1), (24576, 1536, 1), (32768, 512, 1), (7168, 16384, 1), (4096, 7168, 256), (7168, 2048, 256)]
        {
            assert!(nk.contains(&want), "missing {want:?} in {nk:?}");
        }
        assert!(nk.contains(&(36864, 7168, 1)) && nk.contains(&(7168, 18432, 1)));
        assert!(nk.contains(&(4096, 7168, 1)), "shared expert gate_up");
        assert_eq!(nk.len(), 10);
    }

    #[test]
    fn mixtral_shapes() {
        let moe = FfnDims::Moe { experts: 8, intermediate: 14336, shared_intermediate: None };
        let dims = ModelDims {
            hidden: 4096,
            attention: AttentionDims::Gqa { heads: 32, kv_heads: 8, head_dim: 128 },
            layers: vec![moe; 32],
        };
        let nk: Vec<(usize, usize, usize)> = model_shapes(&dims).iter().map(|s| (s.n, s.k, s.groups)).collect();
        assert_eq!(nk, vec![(6144, 4096, 1), (4096, 4096, 1), (28672, 4096, 8), (4096, 14336, 8)]);
    }

    #[test]
    fn qwen3_moe_shapes_and_a_plain_q_projection() {
        // Qwen3-30B-A3B: 32 query heads of 128 over a 2048 width, 4 KV heads, 128 experts of 768.
        let moe = FfnDims::Moe { experts: 128, intermediate: 768, shared_intermediate: None };
        let dims = ModelDims {
            hidden: 2048,
            attention: AttentionDims::Gqa { heads: 32, kv_heads: 4, head_dim: 128 },
            layers: vec![moe; 48],
        };
        let nk: Vec<(usize, usize, usize)> = model_shapes(&dims).iter().map(|s| (s.n, s.k, s.groups)).collect();
        assert_eq!(nk, vec![(5120, 2048, 1), (2048, 4096, 1), (1536, 2048, 128), (2048, 768, 128)]);
        // MLA without a query compression (DeepSeek-V2-Lite) has q and kv_a instead of q_a+kv_a.
        let mut lite = deepseek_v3();
        if let AttentionDims::Mla { q_lora_rank, .. } = &mut lite.attention {
            *q_lora_rank = None;
        }
        let what: Vec<String> = model_shapes(&lite).into_iter().map(|s| s.what).collect();
        assert_eq!(what[..4], ["q", "kv_a", "kv_b", "o"]);
    }
}
