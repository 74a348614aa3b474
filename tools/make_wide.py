#!/usr/bin/env python3
"""Write a random-weight BF16 checkpoint at the widths users run, for speed and memory benchmarks.

    python3 tools/make_wide.py deepseek-v3 OUT [--experts 32]   # hidden 7168, MLA, 1 dense + 1 MoE layer
    python3 tools/make_wide.py qwen3-30b OUT [--experts 128]    # hidden 2048, 32/4 heads x 128, 2 MoE layers

deepseek-v3: DeepSeek-V3's widths (hidden 7168, q_lora 1536, kv_lora 512, 128 heads of 128+64 / v 128,
dense MLP 18432, experts of 2048, one shared expert, vocab 129280), one dense layer and one MoE layer with
--experts routed experts (the real model has 256), sigmoid routing with correction bias, no MTP layer.
qwen3-30b: Qwen3-30B-A3B's widths (hidden 2048, 32 query / 4 key-value heads of 128, --experts experts of 768,
top-8, vocab 151936), two MoE layers.

Weights ~ N(0, 0.02^2) (norms 1), written as hub-style shards (embedding, each layer, head) with an index,
generated and written in chunks, so memory stays under a few hundred MB. Random weights are fine for speed and memory; the numbers (perplexity ~ vocab) mean
nothing. Needs numpy.
"""

import argparse
import json
import os

import numpy as np


CHUNK = 1 << 24  # elements generated at a time


def write_tensor(f, rng, name, shape):
    """Writes one tensor's bytes: BF16 N(0, 0.02^2) weights, BF16 ones for norms, F32 biases."""
    n = int(np.prod(shape))
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        if name.endswith("e_score_correction_bias"):
            f.write((rng.standard_normal(m, dtype=np.float32) * 0.1).tobytes())
        elif len(shape) == 1:
            f.write(np.full(m, 0x3F80, dtype=np.uint16).tobytes())
        else:
            x = (rng.standard_normal(m, dtype=np.float32) * 0.02).view(np.uint32)
            x = (x + 0x7FFF + ((x >> 16) & 1)) >> 16  # round to nearest even BF16
            f.write(x.astype(np.uint16).tobytes())


def dtype_of(name, shape):
    return ("F32", 4) if name.endswith("e_score_correction_bias") else ("BF16", 2)


def write_shard(path, rng, spec):
    """A safetensors file of the tensors `spec` ([(name, shape)]), header first, data streamed."""
    header, offset = {}, 0
    for name, shape in spec:
        dt, size = dtype_of(name, shape)
        nbytes = int(np.prod(shape)) * size
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in spec:
            write_tensor(f, rng, name, shape)
    return offset


def deepseek_v3(experts):
    h, v = 7168, 129280
    heads, nope, rope, vd, ql, kvl = 128, 128, 64, 128, 1536, 512
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": h,
        "vocab_size": v, "num_hidden_layers": 2, "num_nextn_predict_layers": 0, "q_lora_rank": ql,
        "kv_lora_rank": kvl, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope, "v_head_dim": vd,
        "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_routed_experts": experts, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 1, "n_group": 8, "topk_group": 4,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    shards = [[("model.embed_tokens.weight", [v, h])]]
    for layer in range(2):
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        t = [
            (f"{p}.input_layernorm.weight", [h]), (f"{p}.post_attention_layernorm.weight", [h]),
            (f"{a}.q_a_proj.weight", [ql, h]), (f"{a}.q_a_layernorm.weight", [ql]),
            (f"{a}.q_b_proj.weight", [heads * (nope + rope), ql]),
            (f"{a}.kv_a_proj_with_mqa.weight", [kvl + rope, h]), (f"{a}.kv_a_layernorm.weight", [kvl]),
            (f"{a}.kv_b_proj.weight", [heads * (nope + vd), kvl]), (f"{a}.o_proj.weight", [h, heads * vd]),
        ]
        if layer == 0:
            t += [(f"{p}.mlp.gate_proj.weight", [18432, h]), (f"{p}.mlp.up_proj.weight", [18432, h]),
                  (f"{p}.mlp.down_proj.weight", [h, 18432])]
        else:
            t += [(f"{p}.mlp.gate.weight", [experts, h]), (f"{p}.mlp.gate.e_score_correction_bias", [experts])]
            for e in [f"experts.{i}" for i in range(experts)] + ["shared_experts"]:
                t += [(f"{p}.mlp.{e}.gate_proj.weight", [2048, h]), (f"{p}.mlp.{e}.up_proj.weight", [2048, h]),
                      (f"{p}.mlp.{e}.down_proj.weight", [h, 2048])]
        shards.append(t)
    shards.append([("model.norm.weight", [h]), ("lm_head.weight", [v, h])])
    return config, shards


def qwen3_30b(experts):
    h, v, heads, kv, hd, inter = 2048, 151936, 32, 4, 128, 768
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h, "vocab_size": v,
        "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "moe_intermediate_size": inter, "num_experts": experts, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
    }
    shards = [[("model.embed_tokens.weight", [v, h])]]
    for layer in range(2):
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        t = [
            (f"{p}.input_layernorm.weight", [h]), (f"{p}.post_attention_layernorm.weight", [h]),
            (f"{a}.q_proj.weight", [heads * hd, h]), (f"{a}.k_proj.weight", [kv * hd, h]),
            (f"{a}.v_proj.weight", [kv * hd, h]), (f"{a}.o_proj.weight", [h, heads * hd]),
            (f"{a}.q_norm.weight", [hd]), (f"{a}.k_norm.weight", [hd]), (f"{p}.mlp.gate.weight", [experts, h]),
        ]
        for i in range(experts):
            e = f"{p}.mlp.experts.{i}"
            t += [(f"{e}.gate_proj.weight", [inter, h]), (f"{e}.up_proj.weight", [inter, h]),
                  (f"{e}.down_proj.weight", [h, inter])]
        shards.append(t)
    shards.append([("model.norm.weight", [h]), ("lm_head.weight", [v, h])])
    return config, shards


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=["deepseek-v3", "qwen3-30b"])
    ap.add_argument("out")
    ap.add_argument("--experts", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.model == "deepseek-v3":
        config, shards = deepseek_v3(a.experts or 32)
    else:
        config, shards = qwen3_30b(a.experts or 128)
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    weight_map, total = {}, 0
    for i, spec in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(os.path.join(a.out, name), rng, spec)
        weight_map.update({n: name for n, _ in spec})
        print(f"{name}: {len(spec)} tensors", flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"{a.out}: {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
