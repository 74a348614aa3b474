//! The `quantization_config` entries of config.json that serving engines read.

use serde_json::{Value, json};

/// DeepSeek / transformers "fp8" block format: weights `F8_E4M3` with `<module>.weight_scale_inv`
/// (f32, one per 128×128 block), activations quantized dynamically per token and 128 channels.
/// The modules left in high precision are listed under both keys the engines read:
/// `ignored_layers` (vLLM's `Fp8Config`, SGLang) and `modules_to_not_convert` (transformers, newer
/// vLLM and SGLang), so that no engine builds an FP8 layer for BF16 data.
pub fn deepseek_fp8(ue8m0: bool, not_converted: &[String]) -> Value {
    let mut qc = json!({
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    });
    if ue8m0 {
        qc["scale_fmt"] = json!("ue8m0");
    }
    if !not_converted.is_empty() {
        qc["ignored_layers"] = json!(not_converted);
        qc["modules_to_not_convert"] = json!(not_converted);
    }
    qc
}

/// compressed-tensors "float-quantized" with the block strategy, as llm-compressor's FP8_BLOCK
/// scheme writes it: static 128×128 block weight scales (`<module>.weight_scale`), dynamic
/// activations in groups of 128, and the modules left unquantized in `ignore`.
pub fn compressed_tensors_fp8_block(ignore: &[String]) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "float-quantized",
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": true,
                    "strategy": "block",
                    "block_structure": [128, 128],
                    "dynamic": false,
                    "group_size": null,
                    "actorder": null,
                    "observer": "minmax",
                    "observer_kwargs": {}
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": true,
                    "strategy": "group",
                    "group_size": 128,
                    "block_structure": null,
                    "dynamic": true,
                    "actorder": null,
                    "observer": null,
                    "observer_kwargs": {}
                },
                "output_activations": null
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": null,
        "sparsity_config": {},
        "global_compression_ratio": null
    })
}
