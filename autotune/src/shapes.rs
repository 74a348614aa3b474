//! The GEMM shapes of a model, read from its `config.json` the way serving engines lay the
//! layers out (fused QKV / q_a+kv_a projections, fused gate+up projections, experts grouped).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One weight GEMM: `D[M, N] = A[M, K] · B[N, K]ᵀ`, for every M the model sees.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GemmShape {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Experts sharing the shape in one M-grouped launch (`1`: a dense GEMM).
    pub groups: usize,
    /// What it is (`q_a+kv_a`, `experts.gate_up`, ...), for people reading the table.
    pub what: String,
}

/// Why a config cannot be read for shapes.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// A field is missing or not a positive integer.
    #[error("config.json: field {0} is missing or not a positive integer")]
    Field(String),
    /// The architecture is not one the runtime and kernels know.
    #[error("config.json: model_type {0:?} is not supported (deepseek_v3, kimi_k2, mixtral, qwen3_moe)")]
    ModelType(String),
}

fn field(c: &Value, k: &str) -> Result<usize, ShapeError> {
    opt(c, k).ok_or_else(|| ShapeError::Field(k.into()))
}

fn opt(c: &Value, k: &str) -> Option<usize> {
    c.get(k).and_then(Value::as_u64).filter(|&v| v > 0).map(|v| v as usize)
}

fn first(c: &Value, ks: &[&str]) -> Result<usize, ShapeError> {
    ks.iter().find_map(|k| opt(c, k)).ok_or_else(|| ShapeError::Field(ks.join(" or ")))
}

/// Every distinct weight GEMM of the model described by `config` (a parsed config.json).
pub fn model_shapes(config: &Value) -> Result<Vec<GemmShape>, ShapeError> {
    let mt = config.get("model_type").and_then(Value::as_str).unwrap_or("");
    let h = field(config, "hidden_size")?;
    let heads = field(config, "num_attention_heads")?;
    let mut v: Vec<GemmShape> = Vec::new();
    let mut add = |n: usize, k: usize, groups: usize, what: &str| {
        if !v.iter().any(|s| s.n == n && s.k == k && s.groups == groups) {
            v.push(GemmShape { n, k, groups, what: what.into() });
        }
    };
    match mt {
        "deepseek_v3" | "kimi_k2" => {
            let rope = field(config, "qk_rope_head_dim")?;
            let nope = field(config, "qk_nope_head_dim")?;
            let vd = field(config, "v_head_dim")?;
            let kvr = field(config, "kv_lora_rank")?;
            match opt(config, "q_lora_rank") {
                Some(qr) => {
                    add(qr + kvr + rope, h, 1, "q_a+kv_a");
                    add(heads * (nope + rope), qr, 1, "q_b");
                }
                None => {
                    add(heads * (nope + rope), h, 1, "q");
                    add(kvr + rope, h, 1, "kv_a");
                }
            }
            add(heads * (nope + vd), kvr, 1, "kv_b");
            add(h, heads * vd, 1, "o");
            let layers = field(config, "num_hidden_layers")?;
            if opt(config, "first_k_dense_replace").unwrap_or(0).min(layers) > 0 {
                let i = field(config, "intermediate_size")?;
                add(2 * i, h, 1, "mlp.gate_up");
                add(h, i, 1, "mlp.down");
            }
            let e = first(config, &["n_routed_experts", "num_local_experts"])?;
            let mi = field(config, "moe_intermediate_size")?;
            add(2 * mi, h, e, "experts.gate_up");
            add(h, mi, e, "experts.down");
            if let Some(s) = opt(config, "n_shared_experts") {
                add(2 * mi * s, h, 1, "shared_experts.gate_up");
                add(h, mi * s, 1, "shared_experts.down");
            }
        }
        "mixtral" | "qwen3_moe" => {
            let kvh = opt(config, "num_key_value_heads").unwrap_or(heads);
            let hd = opt(config, "head_dim").unwrap_or(h / heads);
            add((heads + 2 * kvh) * hd, h, 1, "qkv");
            add(h, heads * hd, 1, "o");
            let e = first(config, &["num_local_experts", "num_experts"])?;
            let inter = if mt == "mixtral" {
                field(config, "intermediate_size")?
            } else {
                field(config, "moe_intermediate_size")?
            };
            add(2 * inter, h, e, "experts.gate_up");
            add(h, inter, e, "experts.down");
            let dense_layers = config.get("mlp_only_layers").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
            if mt == "qwen3_moe" && dense_layers {
                let i = field(config, "intermediate_size")?;
                add(2 * i, h, 1, "mlp.gate_up");
                add(h, i, 1, "mlp.down");
            }
        }
        other => return Err(ShapeError::ModelType(other.into())),
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_v3_config_gives_the_bench_targets_shapes() {
        let c = serde_json::json!({
            "model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "num_hidden_layers": 61,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
            "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3
        });
        let s = model_shapes(&c).expect("shapes");
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
    fn mixtral_and_unknown_models() {
        let c = serde_json::json!({
            "model_type": "mixtral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "num_local_experts": 8
        });
        let s = model_shapes(&c).expect("shapes");
        let nk: Vec<(usize, usize, usize)> = s.iter().map(|s| (s.n, s.k, s.groups)).collect();
        assert_eq!(nk, vec![(6144, 4096, 1), (4096, 4096, 1), (28672, 4096, 8), (4096, 14336, 8)]);
        let bad = serde_json::json!({"model_type": "llama", "hidden_size": 1, "num_attention_heads": 1});
        assert!(matches!(model_shapes(&bad), Err(ShapeError::ModelType(_))));
    }
}
