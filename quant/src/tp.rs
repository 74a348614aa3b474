//! Whether a block-FP8 checkpoint can run at a tensor parallelism, by the engines' rules: every
//! dimension of an FP8 weight that is split over ranks must leave each rank whole 128-blocks, and
//! every part of a fused layer but the last must be whole 128-row blocks even unsplit (vLLM checks
//! both when it builds each layer, `validate_fp8_block_shape` and `Fp8MoEMethod`; SGLang
//! likewise). A dimension that is not split may end in a partial block. Column-parallel layers split their rows
//! (q/k/v per head, with key/value heads replicated when there are fewer than ranks; gate/up;
//! MLA's `q_b_proj`/`kv_b_proj`; experts' gate/up), row-parallel ones their columns (`o_proj`,
//! `down_proj`, experts' down), and MLA's `q_a_proj`/`kv_a_proj_with_mqa` are replicated.

use serde_json::Value;

use crate::block::BLOCK;
use crate::groups::{GroupKind, group_of};

/// How a layer is split over tensor-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// Rows split (output features), in `heads` equal heads when given.
    Column { heads: Option<Heads> },
    /// Columns split (input features).
    Row,
    /// Every rank holds all of it.
    Replicated,
}

/// Which head count splits a per-head layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Heads {
    /// The query heads.
    Query,
    /// The key/value heads (replicated when fewer than the ranks).
    KeyValue,
}

/// Why a checkpoint cannot run at a tensor parallelism.
#[derive(Debug, thiserror::Error)]
pub enum TpError {
    /// A rank's shard of an FP8 weight is not whole 128×128 blocks.
    #[error(
        "tensor {tensor}: at tensor parallelism {tp} each rank holds a {shard:?} shard of its {shape:?} \
         ({how}), not whole {BLOCK}-blocks, which vLLM and SGLang refuse{advice}"
    )]
    Shard {
        /// The weight.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// A rank's shard of it.
        shard: [usize; 2],
        /// The tensor parallelism.
        tp: usize,
        /// How the layer is split.
        how: &'static str,
        /// What runs instead.
        advice: String,
    },
    /// A weight does not split evenly at all (its heads or features are not a multiple of the
    /// ranks).
    #[error("tensor {tensor}: its {what} ({count}) do not split over {tp} ranks{advice}")]
    Uneven {
        /// The weight.
        tensor: String,
        /// What is split ("rows", "columns", "query heads", ...).
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The tensor parallelism.
        tp: usize,
        /// What runs instead.
        advice: String,
    },
}

/// Head counts read from config.json.
#[derive(Clone, Copy, Debug)]
struct HeadCounts {
    query: Option<usize>,
    key_value: Option<usize>,
}

impl HeadCounts {
    fn of(config: Option<&Value>) -> Self {
        let get = |k: &str| config.and_then(|c| c.get(k)).and_then(Value::as_u64).and_then(|v| usize::try_from(v).ok());
        let query = get("num_attention_heads");
        HeadCounts { query, key_value: get("num_key_value_heads").or(query) }
    }
}

/// How the engines split the weight `name`.
fn split_of(name: &str) -> Split {
    let Some(module) = name.strip_suffix(".weight") else { return Split::Replicated };
    let leaf = module.rsplit('.').next().unwrap_or(module);
    if group_of(name).is_some_and(|(_, kind)| kind == GroupKind::Experts) {
        return match leaf {
            "down_proj" | "w2" => Split::Row,
            _ => Split::Column { heads: None },
        };
    }
    match leaf {
        "q_proj" | "q_b_proj" | "kv_b_proj" => Split::Column { heads: Some(Heads::Query) },
        "k_proj" | "v_proj" => Split::Column { heads: Some(Heads::KeyValue) },
        "o_proj" | "down_proj" | "w2" => Split::Row,
        "gate_proj" | "up_proj" | "w1" | "w3" => Split::Column { heads: None },
        _ => Split::Replicated,
    }
}

/// A rank's shard of a `[rows, cols]` weight split as `split` over `tp` ranks.
fn shard(
    name: &str,
    rows: usize,
    cols: usize,
    split: Split,
    heads: HeadCounts,
    tp: usize,
) -> Result<[usize; 2], TpError> {
    let uneven = |what, count| TpError::Uneven { tensor: name.to_owned(), what, count, tp, advice: String::new() };
    match split {
        Split::Replicated => Ok([rows, cols]),
        Split::Row if !cols.is_multiple_of(tp) => Err(uneven("columns", cols)),
        Split::Row => Ok([rows, cols / tp]),
        Split::Column { heads: None } if !rows.is_multiple_of(tp) => Err(uneven("rows", rows)),
        Split::Column { heads: None } => Ok([rows / tp, cols]),
        Split::Column { heads: Some(h) } => {
            let (count, what) = match h {
                Heads::Query => (heads.query, "query heads"),
                Heads::KeyValue => (heads.key_value, "key/value heads"),
            };
            let Some(n) = count.filter(|&n| n > 0 && rows.is_multiple_of(n)) else {
                // No head count to go by: split the rows.
                return if rows.is_multiple_of(tp) { Ok([rows / tp, cols]) } else { Err(uneven("rows", rows)) };
            };
            let per_head = rows / n;
            match h {
                // Fewer key/value heads than ranks: each rank holds one, replicated.
                Heads::KeyValue if tp >= n && tp.is_multiple_of(n) => Ok([per_head, cols]),
                _ if n % tp != 0 => Err(uneven(what, n)),
                _ => Ok([per_head * (n / tp), cols]),
            }
        }
    }
}

/// Whether a weight is a part of a fused layer other than its last (q and k of qkv, gate of
/// gate/up, an expert's gate/up, MLA's `q_a_proj`): the engines require such a part's rows to be
/// whole blocks even unsplit, so that the fused weight's scale rows line up (vLLM's
/// `validate_fp8_block_shape` for merged layers, `Fp8MoEMethod` for the experts' w13).
fn fused_before_last(name: &str) -> bool {
    let leaf = name.strip_suffix(".weight").and_then(|m| m.rsplit('.').next()).unwrap_or(name);
    match group_of(name) {
        Some((_, GroupKind::Experts)) => matches!(leaf, "gate_proj" | "up_proj" | "w1" | "w3"),
        Some((_, GroupKind::Qkv)) => matches!(leaf, "q_proj" | "k_proj"),
        Some((_, GroupKind::GateUp)) => leaf == "gate_proj",
        Some((_, GroupKind::MlaA)) => leaf == "q_a_proj",
        None => false,
    }
}

/// The first weight of `weights` (FP8 weights as (name, shape)) that the engines refuse at
/// tensor parallelism `tp`: a split dimension of a rank's shard that is not whole blocks, or a
/// fused part's rows that are not.
fn first_failure(weights: &[(String, Vec<usize>)], heads: HeadCounts, tp: usize) -> Option<TpError> {
    for (name, shape) in weights {
        let [rows, cols] = shape[..] else { continue };
        let split = split_of(name);
        let [r, c] = match shard(name, rows, cols, split, heads, tp) {
            Err(e) => return Some(e),
            Ok(s) => s,
        };
        let how = match split {
            Split::Row if c % BLOCK != 0 && c != cols => "row-parallel: columns split",
            Split::Column { .. } if r % BLOCK != 0 && r != rows => "column-parallel: rows split",
            _ if r % BLOCK != 0 && fused_before_last(name) => "fused with the next part: its rows must be whole blocks",
            _ => continue,
        };
        return Some(TpError::Shard {
            tensor: name.clone(),
            shape: shape.clone(),
            shard: [r, c],
            tp,
            how,
            advice: String::new(),
        });
    }
    None
}

/// Checks that the FP8 weights `weights` (name and shape) can run at tensor parallelism `tp` by the
/// engines' rules, with head counts from `config` (config.json).
///
/// # Errors
///
/// [`TpError`] naming the first weight whose shard is not whole 128×128 blocks (or does not split
/// evenly), with the tensor parallelisms that would work and, when only experts fail, that expert
/// parallelism runs it (experts are then not split).
pub fn check_tp(weights: &[(String, Vec<usize>)], config: Option<&Value>, tp: usize) -> Result<(), TpError> {
    let heads = HeadCounts::of(config);
    let Some(mut e) = first_failure(weights, heads, tp.max(1)) else { return Ok(()) };
    let works: Vec<String> = [2, 4, 8, 16]
        .into_iter()
        .filter(|&t| first_failure(weights, heads, t).is_none())
        .map(|t| t.to_string())
        .collect();
    let dense: Vec<(String, Vec<usize>)> = weights
        .iter()
        .filter(|(n, _)| !group_of(n).is_some_and(|(_, kind)| kind == GroupKind::Experts))
        .cloned()
        .collect();
    let mut advice = match works.as_slice() {
        [] => "; no tensor parallelism above 1 works".to_string(),
        [w] => format!("; tensor parallelism {w} works"),
        w => format!("; tensor parallelisms {} work", w.join(", ")),
    };
    if first_failure(&dense, heads, tp).is_none() {
        advice += &format!(", and so does {tp} with expert parallelism (experts are then not split)");
    }
    match &mut e {
        TpError::Shard { advice: a, .. } | TpError::Uneven { advice: a, .. } => *a = advice,
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, shape: [usize; 2]) -> (String, Vec<usize>) {
        (name.to_owned(), shape.to_vec())
    }

    /// Qwen3-30B-A3B: hidden 2048, 32 query and 4 key/value heads of 128, experts of 768.
    fn qwen3_30b() -> (Vec<(String, Vec<usize>)>, Value) {
        let p = "model.layers.0";
        let weights = vec![
            w(&format!("{p}.self_attn.q_proj.weight"), [4096, 2048]),
            w(&format!("{p}.self_attn.k_proj.weight"), [512, 2048]),
            w(&format!("{p}.self_attn.v_proj.weight"), [512, 2048]),
            w(&format!("{p}.self_attn.o_proj.weight"), [2048, 4096]),
            w(&format!("{p}.mlp.experts.0.gate_proj.weight"), [768, 2048]),
            w(&format!("{p}.mlp.experts.0.up_proj.weight"), [768, 2048]),
            w(&format!("{p}.mlp.experts.0.down_proj.weight"), [2048, 768]),
        ];
        (weights, serde_json::json!({"num_attention_heads": 32, "num_key_value_heads": 4}))
    }

    #[test]
    fn qwen3_30b_a3b_runs_at_tp_2_and_not_at_tp_4_but_with_expert_parallelism() {
        let (weights, config) = qwen3_30b();
        check_tp(&weights, Some(&config), 1).expect("tp 1");
        check_tp(&weights, Some(&config), 2).expect("tp 2: 384-row expert shards");
        let e = check_tp(&weights, Some(&config), 4).expect_err("tp 4: 192-row expert shards").to_string();
        assert!(e.contains("mlp.experts.0.gate_proj.weight") && e.contains("[192, 2048]"), "{e}");
        assert!(e.contains("tensor parallelism 2 works") && e.contains("expert parallelism"), "{e}");
        // At 8 ranks the 4 key/value heads are replicated, one per rank: 128 rows, whole blocks.
        let dense: Vec<_> = weights.iter().filter(|(n, _)| !n.contains("experts")).cloned().collect();
        check_tp(&dense, Some(&config), 8).expect("tp 8, dense layers");
    }

    #[test]
    fn rows_columns_and_heads_are_split_as_the_engines_split_them() {
        let heads = HeadCounts { query: Some(128), key_value: Some(128) };
        // DeepSeek-V3: kv_b_proj [128 heads * 256, 512] column, o_proj [7168, 128 * 128] row,
        // q_a_proj replicated.
        assert_eq!(
            shard("a.kv_b_proj.weight", 32768, 512, split_of("a.kv_b_proj.weight"), heads, 8).ok(),
            Some([4096, 512])
        );
        assert_eq!(
            shard("a.o_proj.weight", 7168, 16384, split_of("a.o_proj.weight"), heads, 8).ok(),
            Some([7168, 2048])
        );
        assert_eq!(split_of("a.self_attn.q_a_proj.weight"), Split::Replicated);
        assert_eq!(split_of("a.block_sparse_moe.experts.3.w2.weight"), Split::Row);
        assert_eq!(split_of("a.block_sparse_moe.experts.3.w1.weight"), Split::Column { heads: None });
        let e = shard(
            "x.q_proj.weight",
            96 * 128,
            1024,
            Split::Column { heads: Some(Heads::Query) },
            HeadCounts { query: Some(96), key_value: Some(8) },
            64,
        );
        assert!(matches!(e, Err(TpError::Uneven { what: "query heads", count: 96, .. })), "{e:?}");
    }

    #[test]
    fn unsplit_dimensions_may_end_in_a_partial_block_but_fused_parts_may_not() {
        let config = serde_json::json!({"num_attention_heads": 4, "num_key_value_heads": 2});
        // Hidden 320 (not whole blocks) is fine unsplit; o_proj's 320 rows are never split.
        let ok = vec![w("l.self_attn.o_proj.weight", [320, 512]), w("l.mlp.down_proj.weight", [320, 256])];
        check_tp(&ok, Some(&config), 1).expect("tp 1");
        check_tp(&ok, Some(&config), 2).expect("tp 2: 256- and 128-column shards");
        // q of a fused qkv must be whole 128-row blocks even at tp 1; v, the last part, need not.
        let e = check_tp(&[w("l.self_attn.q_proj.weight", [320, 256])], Some(&config), 1).expect_err("q 320 rows");
        assert!(e.to_string().contains("fused"), "{e}");
        check_tp(&[w("l.self_attn.v_proj.weight", [160, 256])], Some(&config), 1).expect("v is last");
        // An expert's gate/up (vLLM's fused w13) likewise.
        let e = check_tp(&[w("l.mlp.experts.0.up_proj.weight", [96, 256])], Some(&config), 1).expect_err("96 rows");
        assert!(e.to_string().contains("l.mlp.experts.0.up_proj.weight"), "{e}");
    }

    #[test]
    fn deepseek_v3_runs_up_to_tp_16_and_not_at_32() {
        let p = "model.layers.3";
        let weights = vec![
            w(&format!("{p}.self_attn.q_a_proj.weight"), [1536, 7168]),
            w(&format!("{p}.self_attn.kv_a_proj_with_mqa.weight"), [576, 7168]),
            w(&format!("{p}.self_attn.q_b_proj.weight"), [128 * 192, 1536]),
            w(&format!("{p}.self_attn.kv_b_proj.weight"), [128 * 256, 512]),
            w(&format!("{p}.self_attn.o_proj.weight"), [7168, 128 * 128]),
            w("model.layers.0.mlp.gate_proj.weight", [18432, 7168]),
            w("model.layers.0.mlp.down_proj.weight", [7168, 18432]),
            w(&format!("{p}.mlp.shared_experts.gate_proj.weight"), [2048, 7168]),
            w(&format!("{p}.mlp.experts.0.gate_proj.weight"), [2048, 7168]),
            w(&format!("{p}.mlp.experts.0.down_proj.weight"), [7168, 2048]),
        ];
        let config = serde_json::json!({"num_attention_heads": 128, "num_key_value_heads": 128});
        for tp in [1, 2, 4, 8, 16] {
            check_tp(&weights, Some(&config), tp).unwrap_or_else(|e| panic!("tp {tp}: {e}"));
        }
        let e = check_tp(&weights, Some(&config), 32).expect_err("tp 32: 576-row dense shards").to_string();
        assert!(e.contains("mlp.gate_proj.weight") && e.contains("[576, 7168]"), "{e}");
        assert!(e.contains("tensor parallelisms 2, 4, 8, 16 work") && !e.contains("expert parallelism"), "{e}");
    }
}
