//! Writes a BF16 checkpoint of about N GiB of DeepSeek-V3 expert-shaped weights (2048×7168,
//! 7168×2048) in 4 shards with an index, for `bench/convert.sh`.

use fp8forge_formats::Dtype;
use fp8forge_tests::write_checkpoint;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "bench-model".into()));
    let gib: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let per_expert = 3 * 2048 * 7168 * 2;
    let experts = ((gib * (1u64 << 30) as f64) / per_expert as f64).ceil() as usize;
    let mut specs = vec![];
    for e in 0..experts {
        let p = format!("model.layers.{}.mlp.experts.{}", 3 + e / 16, e % 16);
        specs.push((format!("{p}.gate_proj.weight"), Dtype::BF16, vec![2048, 7168]));
        specs.push((format!("{p}.up_proj.weight"), Dtype::BF16, vec![2048, 7168]));
        specs.push((format!("{p}.down_proj.weight"), Dtype::BF16, vec![7168, 2048]));
        if e % 16 == 0 {
            specs.push((
                format!("model.layers.{}.post_attention_layernorm.weight", 3 + e / 16),
                Dtype::BF16,
                vec![7168],
            ));
        }
    }
    let config = serde_json::json!({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]});
    write_checkpoint(&dir, &specs, &config, 4, 1);
    eprintln!("wrote {} tensors ({experts} experts) to {}", specs.len(), dir.display());
}
