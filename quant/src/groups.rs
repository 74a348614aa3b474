//! What serving engines load as one: the groups of weights vLLM and SGLang fuse into one module
//! (q/k/v; gate/up; DeepSeek's `q_a_proj` + `kv_a_proj_with_mqa`) or quantize all or none (the
//! experts of one MoE layer, with DeepSeek's shared expert, which SGLang may fold in). A
//! conversion must never leave such a group part FP8 and part BF16: the engines decide per
//! module, from the config, and would load the odd part wrongly.

use serde::{Deserialize, Serialize};

/// Why weights form a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupKind {
    /// `q_proj`, `k_proj`, `v_proj` of one attention block: fused into `qkv_proj`.
    Qkv,
    /// DeepSeek's `q_a_proj` and `kv_a_proj_with_mqa`: fused by SGLang.
    MlaA,
    /// `gate_proj` and `up_proj` of one dense MLP or shared expert: fused into `gate_up_proj`.
    GateUp,
    /// Every expert of one MoE layer (and DeepSeek's shared experts of that layer): one fused
    /// MoE module, quantized all or none.
    Experts,
}

impl GroupKind {
    /// Words for messages.
    pub fn describe(self) -> &'static str {
        match self {
            GroupKind::Qkv => "q/k/v of one attention block, fused by vLLM and SGLang",
            GroupKind::MlaA => "q_a_proj and kv_a_proj_with_mqa, fused by SGLang",
            GroupKind::GateUp => "gate/up of one MLP, fused by vLLM and SGLang",
            GroupKind::Experts => {
                "the experts of one MoE layer (and its shared experts), quantized all or none by vLLM and SGLang"
            }
        }
    }
}

/// The group a weight (a tensor name ending in `.weight`) belongs to, as its key (the module
/// prefix the engines see) and kind; `None` for a weight the engines load on its own.
pub fn group_of(name: &str) -> Option<(String, GroupKind)> {
    let module = name.strip_suffix(".weight")?;
    let (parent, leaf) = module.rsplit_once('.')?;
    // Experts: `<mlp>.experts.<i>.<proj>`; DeepSeek's shared experts join their layer's experts.
    if let Some((experts, index)) = parent.rsplit_once('.')
        && index.bytes().all(|b| b.is_ascii_digit())
        && !index.is_empty()
        && experts.ends_with(".experts")
    {
        return Some((experts.to_owned(), GroupKind::Experts));
    }
    if let Some(mlp) = parent.strip_suffix(".shared_experts")
        && matches!(leaf, "gate_proj" | "up_proj" | "down_proj")
    {
        return Some((format!("{mlp}.experts"), GroupKind::Experts));
    }
    match leaf {
        "q_proj" | "k_proj" | "v_proj" if parent.ends_with("attn") => {
            Some((format!("{parent}.qkv_proj"), GroupKind::Qkv))
        }
        "q_a_proj" | "kv_a_proj_with_mqa" => Some((format!("{parent}.fused_qkv_a_proj"), GroupKind::MlaA)),
        "gate_proj" | "up_proj" => Some((format!("{parent}.gate_up_proj"), GroupKind::GateUp)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Option<(String, GroupKind)> {
        group_of(name)
    }

    #[test]
    fn groups_follow_what_the_engines_fuse() {
        let e = |k: &str| Some((k.to_string(), GroupKind::Experts));
        assert_eq!(key("model.layers.3.mlp.experts.17.gate_proj.weight"), e("model.layers.3.mlp.experts"));
        assert_eq!(key("model.layers.3.mlp.experts.0.down_proj.weight"), e("model.layers.3.mlp.experts"));
        assert_eq!(key("model.layers.3.mlp.shared_experts.up_proj.weight"), e("model.layers.3.mlp.experts"));
        assert_eq!(
            key("model.layers.1.block_sparse_moe.experts.7.w2.weight"),
            e("model.layers.1.block_sparse_moe.experts")
        );
        let qkv = Some(("model.layers.0.self_attn.qkv_proj".to_string(), GroupKind::Qkv));
        for p in ["q_proj", "k_proj", "v_proj"] {
            assert_eq!(key(&format!("model.layers.0.self_attn.{p}.weight")), qkv);
        }
        let a = Some(("model.layers.0.self_attn.fused_qkv_a_proj".to_string(), GroupKind::MlaA));
        assert_eq!(key("model.layers.0.self_attn.q_a_proj.weight"), a);
        assert_eq!(key("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), a);
        let gu = Some(("model.layers.0.mlp.gate_up_proj".to_string(), GroupKind::GateUp));
        assert_eq!(key("model.layers.0.mlp.gate_proj.weight"), gu);
        assert_eq!(key("model.layers.0.mlp.up_proj.weight"), gu);
        // Qwen2-MoE's singular shared expert is a plain MLP: its gate/up are fused, not joined.
        let se = Some(("model.layers.0.mlp.shared_expert.gate_up_proj".to_string(), GroupKind::GateUp));
        assert_eq!(key("model.layers.0.mlp.shared_expert.gate_proj.weight"), se);
        for alone in [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.self_attn.q_b_proj.weight",
            "model.layers.0.self_attn.kv_b_proj.weight",
            "model.layers.3.mlp.gate.weight",
            "model.layers.0.self_attn.q_proj.bias",
        ] {
            assert_eq!(key(alone), None, "{alone}");
        }
    }
}
