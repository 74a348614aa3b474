#!/usr/bin/env python3
"""Write a random-weight BF16 checkpoint at the widths users run, for speed and memory benchmarks.

    python3 tools/make_wide.py deepseek-v3 OUT [--experts 32]   # hidden 7168, MLA, 1 dense + 1 MoE layer
    python3 tools/make_wide.py qwen3-30b OUT [--experts 128]    # hidden 2048, 32/4 heads x 128, 2 MoE layers
    python3 tools/make_wide.py deepseek-v3 OUT --full --sparse [--fp8]  # the whole 671B layout, no data

--full: DeepSeek-V3/R1 as on the hub: 61 layers (3 dense, 58 MoE of 256 experts) and the MTP layer 61
(`num_nextn_predict_layers: 1`: embed/enorm/hnorm/eh_proj/shared_head), one shard per layer. --sparse
writes the headers and leaves the data as holes (zeros: files of 1.3 TB that take no disk), enough for
`fp8forge eval --dry-run`, which reads only a few matrices. --fp8 writes the DeepSeek FP8 layout
(E4M3 weights, f32 `weight_scale_inv` per 128x128 block, `quantization_config`) instead of BF16; its
scales are written (1.0), its weights left to the generator (or holes).

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
    """Writes one tensor's bytes: BF16 N(0, 0.02^2) weights, BF16 ones for norms, F32 biases;
    FP8 weights as E4M3 N(0, 0.02^2)/scale codes, their scales 1.0."""
    n = int(np.prod(shape))
    dt, _ = dtype_of(name, shape)
    if dt == "F8_E4M3":
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            f.write(e4m3(rng.standard_normal(m, dtype=np.float32) * 0.02).tobytes())
        return
    if name.endswith("_scale_inv"):
        f.write(np.ones(n, dtype=np.float32).tobytes())
        return
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


FP8 = False  # set by --fp8: 2-D weights of the decoder layers as E4M3 with 128x128 block scales
SPARSE = False  # set by --sparse: tensor data left as holes (zeros), except FP8 scales


def quantized(name, shape):
    """The weights DeepSeek's own FP8 release stores in FP8: 2-D projections of the decoder layers
    (not the router, not the MTP layer's eh_proj / shared head, not the embedding or lm_head)."""
    return (FP8 and len(shape) == 2 and name.startswith("model.layers.") and name.endswith("proj.weight")
            and ".eh_proj." not in name)


def e4m3(x):
    """Rounds f32 values to E4M3FN codes (nearest even on the 3-bit mantissa, saturating at 448)."""
    x = np.clip(x, -448.0, 448.0).astype(np.float32)
    sign = (np.signbit(x).astype(np.uint8) << 7)
    a = np.abs(x)
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -9))).astype(np.int32)
    e = np.maximum(e, -6)  # subnormals below 2^-6
    q = np.rint(a / np.exp2(e - 3).astype(np.float32)).astype(np.int32)  # mantissa with the leading 1: 8..16
    e = np.where(q == 16, e + 1, e)
    q = np.where(q == 16, 8, q)
    normal = q >= 8
    code = np.where(normal, ((e + 7) << 3) | (q - 8), q).astype(np.uint8)
    code = np.where(a == 0, 0, code)
    return code | sign


def dtype_of(name, shape):
    if name.endswith("e_score_correction_bias") or name.endswith("_scale_inv"):
        return ("F32", 4)
    return ("F8_E4M3", 1) if quantized(name, shape) else ("BF16", 2)


def with_scales(spec):
    """`spec` with each FP8 weight followed by its `weight_scale_inv` of ceil(N/128) x ceil(K/128)."""
    out = []
    for name, shape in spec:
        out.append((name, shape))
        if quantized(name, shape):
            out.append((name + "_scale_inv", [-(-shape[0] // 128), -(-shape[1] // 128)]))
    return out


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
        if SPARSE:
            start = f.tell()
            for name, shape in spec:
                if name.endswith("_scale_inv"):
                    f.seek(start + header[name]["data_offsets"][0])
                    write_tensor(f, rng, name, shape)
            f.truncate(start + offset)
        else:
            for name, shape in spec:
                write_tensor(f, rng, name, shape)
    return offset


def deepseek_v3(experts, full=False):
    h, v = 7168, 129280
    layers, dense = (61, 3) if full else (2, 1)
    heads, nope, rope, vd, ql, kvl = 128, 128, 64, 128, 1536, 512
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": h,
        "vocab_size": v, "num_hidden_layers": layers, "num_nextn_predict_layers": int(full), "q_lora_rank": ql,
        "kv_lora_rank": kvl, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope, "v_head_dim": vd,
        "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_routed_experts": experts, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": dense, "n_group": 8, "topk_group": 4,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    if FP8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    shards = [[("model.embed_tokens.weight", [v, h])]]
    for layer in range(layers + int(full)):
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        t = [
            (f"{p}.input_layernorm.weight", [h]), (f"{p}.post_attention_layernorm.weight", [h]),
            (f"{a}.q_a_proj.weight", [ql, h]), (f"{a}.q_a_layernorm.weight", [ql]),
            (f"{a}.q_b_proj.weight", [heads * (nope + rope), ql]),
            (f"{a}.kv_a_proj_with_mqa.weight", [kvl + rope, h]), (f"{a}.kv_a_layernorm.weight", [kvl]),
            (f"{a}.kv_b_proj.weight", [heads * (nope + vd), kvl]), (f"{a}.o_proj.weight", [h, heads * vd]),
        ]
        if layer == layers:  # the MTP layer (hub layout): its own embedding, norms, projection and head
            t += [(f"{p}.embed_tokens.weight", [v, h]), (f"{p}.enorm.weight", [h]), (f"{p}.hnorm.weight", [h]),
                  (f"{p}.eh_proj.weight", [h, 2 * h]), (f"{p}.shared_head.norm.weight", [h]),
                  (f"{p}.shared_head.head.weight", [v, h])]
        if layer < dense:
            t += [(f"{p}.mlp.gate_proj.weight", [18432, h]), (f"{p}.mlp.up_proj.weight", [18432, h]),
                  (f"{p}.mlp.down_proj.weight", [h, 18432])]
        else:
            t += [(f"{p}.mlp.gate.weight", [experts, h]), (f"{p}.mlp.gate.e_score_correction_bias", [experts])]
            for e in [f"experts.{i}" for i in range(experts)] + ["shared_experts"]:
                t += [(f"{p}.mlp.{e}.gate_proj.weight", [2048, h]), (f"{p}.mlp.{e}.up_proj.weight", [2048, h]),
                      (f"{p}.mlp.{e}.down_proj.weight", [h, 2048])]
        shards.append(with_scales(t))
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
    ap.add_argument("--full", action="store_true", help="deepseek-v3: all 61 layers and the MTP layer")
    ap.add_argument("--sparse", action="store_true", help="leave tensor data as holes (zeros)")
    ap.add_argument("--fp8", action="store_true", help="deepseek-v3: DeepSeek's FP8 layout")
    a = ap.parse_args()
    global FP8, SPARSE
    FP8, SPARSE = a.fp8, a.sparse
    if (a.full or a.fp8) and a.model != "deepseek-v3":
        ap.error("--full and --fp8 are for deepseek-v3")
    if a.model == "deepseek-v3":
        config, shards = deepseek_v3(a.experts or (256 if a.full else 32), a.full)
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
