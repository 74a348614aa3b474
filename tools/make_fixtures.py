#!/usr/bin/env python3
"""Write the tiny random-weight HF MoE fixtures and their transformers reference numbers.

Output: tests/fixtures/hf/<arch>/ for arch in deepseek_v3, mixtral, qwen3_moe, each with
  config.json, generation_config.json, model.safetensors   exactly as `save_pretrained` writes them (BF16,
                                                            per-expert tensor names on disk)
  tokens.txt                 whitespace-separated token ids (N_TOKENS of them)
  reference.json             transformers' numbers for the BF16 checkpoint, widened exactly to float32
  reference_fp8.json         same, for `fp8forge convert --scale-format f32`, dequantized by this script
  reference_fp8_ue8m0.json   same, for `fp8forge convert --scale-format ue8m0`

How to run (from the repository root; about a minute on one CPU core):
    nice -n 10 /work/pyenv/bin/python tools/make_fixtures.py [--fp8forge /work/bin/fp8forge] [--only ARCH]
Requirements: torch, transformers 5.x, safetensors, numpy; an `fp8forge` binary for the FP8 references
(`--fp8forge PATH`, default $FP8FORGE or `fp8forge` on PATH). The FP8 checkpoints are written to a temp dir
and not kept: tests re-create them from the committed BF16 fixture (fp8forge convert is deterministic).

Weights. The models are built with transformers' config classes and *ForCausalLM under a fixed seed, then
re-initialised with a much larger spread than initializer_range (linear / embedding / expert / router
weights ~ N(0, std^2) with std per ARCHS below, every RMSNorm weight 1 + 0.1*N(0,1), DeepSeek's
e_score_correction_bias 0.1*N(0,1)), so that the logits are far from uniform and every part of the network
matters. The DeepSeek e_score_correction_bias is saved as F32 (as on the DeepSeek-V3 hub checkpoints and as
transformers keeps it in memory: `_keep_in_fp32_modules_strict`); everything else is BF16.

Tokens. Uniformly random ids would give perplexity >= vocab whatever the model (the targets are independent
of the prediction), so a wrong runtime could not be told from a right one. The ids are therefore SAMPLED
from the BF16 model itself (loaded in float32), window by window with the evaluation windowing: each
CTX-token window starts with a uniformly random id and continues by ancestral sampling at temperature 1
with positions restarting at 0. The perplexity is then about exp(model entropy), far below vocab, and any
implementation error raises it. tokens.txt is committed, so tests never need to regenerate it.

Reference protocol (ARCHITECTURE.md): consecutive non-overlapping windows of CTX=64 tokens, a shorter last
window kept if it has >= 2 tokens, every token but each window's first scored, positions restart at 0 in
every window, no BOS added, perplexity = exp(mean NLL). Models are loaded with dtype=torch.float32,
attn_implementation="eager", experts_implementation="eager".
reference*.json fields: ctx, tokens_scored, nll_mean, perplexity, nll_per_window, logits_window0 (first
LOGIT_POSITIONS positions x vocab, f32 values), top1_window0 (argmax at every position of window 0),
experts_window0 ({layer index: per position the sorted routed expert ids} for every MoE layer, window 0),
top1_margin_window0 (top-1 minus top-2 logit per position), routing_min_margin (smallest gap between the last
chosen and first rejected routing candidate over all tokens; the seed is re-drawn until it is >= 1e-4),
max_abs_logit_diff_f32_vs_f64 (float rounding alone: a guide for test tolerances), seed, versions and, for
the FP8 ones, the fp8forge command.

FP8 dequantization here follows the format contract: w[r, c] = float32(q[r, c]) * scale_inv[r // 128, c // 128]
(edge blocks partial); the dequantized f32 tensors are written as an f32 checkpoint and loaded with
from_pretrained (not FineGrainedFP8Config, which mis-handles shapes that are not multiples of 128).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

CTX = 64
N_TOKENS = 300
LOGIT_POSITIONS = 8
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_ROOT = os.path.join(REPO, "tests", "fixtures", "hf")


def deepseek_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=300,
        hidden_size=160,  # > 128, not a multiple: partial FP8 blocks along K and N
        intermediate_size=192,  # dense MLP of layer 0
        moe_intermediate_size=32,
        num_hidden_layers=3,  # layer 0 dense, layers 1-2 MoE
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64,
        },
        rope_interleave=True,  # as the DeepSeek-V3 hub checkpoints are laid out (transformers' default)
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=300,
        hidden_size=160,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 40
        num_key_value_heads=2,  # GQA
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=300,
        hidden_size=160,
        head_dim=48,  # explicit, != hidden_size / num_attention_heads (40)
        intermediate_size=192,  # dense MLP of the mlp_only_layers
        moe_intermediate_size=32,
        num_hidden_layers=3,
        mlp_only_layers=[0],  # layer 0 dense, layers 1-2 MoE
        decoder_sparse_step=1,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )


# arch -> (config factory, model class name, seed, weight std, lm_head/embedding std)
ARCHS = {
    "deepseek_v3": (deepseek_config, "DeepseekV3ForCausalLM", 11, 0.06, 0.5),
    "mixtral": (mixtral_config, "MixtralForCausalLM", 22, 0.06, 0.5),
    "qwen3_moe": (qwen3_moe_config, "Qwen3MoeForCausalLM", 33, 0.06, 0.5),
}
# A seed is accepted only if every routing decision (BF16 and both FP8 variants, all windows) has at least
# this margin, so float rounding differences between implementations cannot flip an expert choice.
# DeepSeek: in sigmoid-score units (group choice and expert choice); softmax routers: in router-logit units.
MIN_ROUTING_MARGIN = 1e-4
MAX_SEED_TRIES = 20


@torch.no_grad()
def reinit(model, seed, std, head_std):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name or name.startswith("lm_head"):
            p.copy_(head_std * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def save_bf16(model, out_dir):
    model = model.to(torch.bfloat16)
    # Keep DeepSeek's e_score_correction_bias in float32 like the hub checkpoints (transformers keeps it
    # float32 when it loads in BF16 too); `.to(bfloat16)` narrowed it, so restore the f32 values.
    for name, mod in model.named_modules():
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.data = mod.e_score_correction_bias.data.float()
    model.save_pretrained(out_dir)
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)


def load_f32(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    m.eval()
    return m


def windows(ids, ctx):
    out = []
    for s in range(0, len(ids), ctx):
        w = ids[s : s + ctx]
        if len(w) >= 2:
            out.append(w)
    return out


@torch.no_grad()
def sample_tokens(model, vocab, n, ctx, seed):
    g = torch.Generator().manual_seed(seed)
    ids = []
    while len(ids) < n:
        length = min(ctx, n - len(ids))
        w = [int(torch.randint(0, vocab, (1,), generator=g))]
        while len(w) < length:
            logits = model(input_ids=torch.tensor([w])).logits[0, -1].double()
            p = torch.softmax(logits, -1)
            w.append(int(torch.multinomial(p, 1, generator=g)))
        ids.extend(w)
    return ids


def moe_gates(model):
    """[(layer index, router module)] for every MoE layer."""
    out = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            out.append((i, gate))
    return out


@torch.no_grad()
def reference(model, ids, ctx):
    routes, gate_inputs = {}, {}
    handles = []
    for i, gate in moe_gates(model):

        def hook(mod, inp, out, i=i):
            routes[i] = out[-1]
            gate_inputs.setdefault(i, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

        handles.append(gate.register_forward_hook(hook))
    total, count, per_window = 0.0, 0, []
    logits0 = top1 = margin1 = experts0 = None
    for k, w in enumerate(windows(ids, ctx)):
        x = torch.tensor([w])
        logits = model(input_ids=x).logits[0].float()
        logp = torch.log_softmax(logits.double(), -1)
        nll = -logp[torch.arange(len(w) - 1), x[0, 1:]]
        per_window.append(float(nll.mean()))
        total += float(nll.sum())
        count += len(w) - 1
        if k == 0:
            logits0 = [[float(v) for v in row] for row in logits[:LOGIT_POSITIONS].numpy().astype(np.float32)]
            top1 = [int(v) for v in logits.argmax(-1)]
            top2 = logits.double().topk(2, -1)[0]
            margin1 = [float(v) for v in (top2[:, 0] - top2[:, 1])]
            experts0 = {str(i): sorted_rows(r) for i, r in sorted(routes.items())}
    for h in handles:
        h.remove()
    import transformers

    return {
        "ctx": ctx,
        "tokens_scored": count,
        "nll_mean": total / count,
        "perplexity": math.exp(total / count),
        "nll_per_window": per_window,
        "logits_window0_positions": LOGIT_POSITIONS,
        "logits_window0": logits0,
        "top1_window0": top1,
        "top1_margin_window0": margin1,
        "experts_window0": experts0,
        "routing_min_margin": routing_min_margin(model, gate_inputs),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
    }


@torch.no_grad()
def f64_deviation(model_dir, ids, ctx):
    """max |logit_f32 - logit_f64| over all windows: how much float rounding alone moves the logits."""
    m32, m64 = load_f32(model_dir), load_f32(model_dir).double()
    worst = 0.0
    for w in windows(ids, ctx):
        x = torch.tensor([w])
        worst = max(worst, float((m32(input_ids=x).logits.double() - m64(input_ids=x).logits).abs().max()))
    return worst


def routing_min_margin(model, gate_inputs):
    """Smallest gap, over all routed tokens, between the last chosen and the first rejected candidate."""
    best = float("inf")
    for i, g in moe_gates(model):
        x = torch.cat(gate_inputs[i]).double()
        logits = x @ g.weight.double().T
        k = g.top_k
        if hasattr(g, "e_score_correction_bias"):  # DeepSeek: sigmoid + bias, group-limited
            s = logits.sigmoid() + g.e_score_correction_bias.double()
            n_exp, n_grp = s.shape[1], g.num_group
            gs = s.view(-1, n_grp, n_exp // n_grp).topk(2, -1)[0].sum(-1)
            if g.topk_group < n_grp:
                srt = gs.sort(-1, descending=True)[0]
                best = min(best, float((srt[:, g.topk_group - 1] - srt[:, g.topk_group]).min()))
            idx = gs.topk(g.topk_group, -1)[1]
            mask = torch.zeros_like(gs).scatter_(1, idx, 1).bool().repeat_interleave(n_exp // n_grp, 1)
            srt = s.masked_fill(~mask, float("-inf")).sort(-1, descending=True)[0]
        else:  # softmax routers: the order of the logits is the order of the probabilities
            srt = logits.sort(-1, descending=True)[0]
        best = min(best, float((srt[:, k - 1] - srt[:, k]).min()))
    return best


def sorted_rows(idx):
    return [sorted(int(v) for v in row) for row in idx.reshape(idx.shape[0], -1)]


def dequant_checkpoint(fp8_dir, out_dir, src_config):
    """Dequantize every F8_E4M3 tensor with its 128x128 weight_scale_inv grid into an f32 checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    files = sorted(f for f in os.listdir(fp8_dir) if f.endswith(".safetensors"))
    for fn in files:
        with safe_open(os.path.join(fp8_dir, fn), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    out, n_fp8 = {}, 0
    for k, t in tensors.items():
        if k.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[k[: -len(".weight")] + ".weight_scale_inv"]
            assert s.dtype == torch.float32, k
            n, kk = t.shape
            assert tuple(s.shape) == (math.ceil(n / 128), math.ceil(kk / 128)), (k, s.shape)
            full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :kk]
            out[k] = t.float() * full
            n_fp8 += 1
        else:
            out[k] = t.float()
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(src_config))
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    return n_fp8


def dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def build(arch, seed, fp8forge, out_dir):
    """Write one fixture with this seed; return (references, model dir) or None if a routing margin is small."""
    import transformers

    cfg_fn, cls_name, _, std, head_std = ARCHS[arch]
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    torch.manual_seed(seed)
    cfg = cfg_fn()
    model = getattr(transformers, cls_name)(cfg)
    reinit(model, seed, std, head_std)
    save_bf16(model, out_dir)
    del model

    ref_model = load_f32(out_dir)
    ids = sample_tokens(ref_model, cfg.vocab_size, N_TOKENS, CTX, seed + 1000)
    ref = reference(ref_model, ids, CTX)
    ref["checkpoint"] = "bf16"
    ref["seed"] = seed
    ref["max_abs_logit_diff_f32_vs_f64"] = f64_deviation(out_dir, ids, CTX)
    refs = {"reference.json": ref}
    print(f"{arch} seed {seed}: bf16 ppl {ref['perplexity']:.6f}  routing margin {ref['routing_min_margin']:.2e}")
    if ref["routing_min_margin"] < MIN_ROUTING_MARGIN:
        return None

    if fp8forge is None:
        print(f"{arch}: no fp8forge binary, FP8 references skipped", flush=True)
    else:
        for fmt, fname in (("f32", "reference_fp8.json"), ("ue8m0", "reference_fp8_ue8m0.json")):
            with tempfile.TemporaryDirectory() as tmp:
                fp8_dir = os.path.join(tmp, "fp8")
                cmd = [fp8forge, "convert", out_dir, fp8_dir, "--scale-format", fmt, "--quiet"]
                subprocess.run(cmd, check=True)
                deq_dir = os.path.join(tmp, "deq")
                n_fp8 = dequant_checkpoint(fp8_dir, deq_dir, os.path.join(fp8_dir, "config.json"))
                r = reference(load_f32(deq_dir), ids, CTX)
                r["max_abs_logit_diff_f32_vs_f64"] = f64_deviation(deq_dir, ids, CTX)
            r["checkpoint"] = f"fp8 block 128x128, scale_fmt {fmt}, dequantized to f32"
            r["fp8forge_command"] = f"fp8forge convert <fixture> <out> --scale-format {fmt}"
            r["fp8_tensors"] = n_fp8
            r["seed"] = seed
            r["top1_agreement_window0_vs_bf16"] = float(
                np.mean([a == b for a, b in zip(r["top1_window0"], ref["top1_window0"])])
            )
            refs[fname] = r
            print(
                f"{arch} seed {seed}: fp8 {fmt:5s} ppl {r['perplexity']:.6f}  routing margin "
                f"{r['routing_min_margin']:.2e}  ({n_fp8} FP8 tensors, window-0 top-1 agreement with bf16 "
                f"{r['top1_agreement_window0_vs_bf16']:.3f})",
                flush=True,
            )
            if r["routing_min_margin"] < MIN_ROUTING_MARGIN:
                return None

    with open(os.path.join(out_dir, "tokens.txt"), "w") as f:
        for i in range(0, len(ids), 20):
            f.write(" ".join(str(t) for t in ids[i : i + 20]) + "\n")
    for fname, r in refs.items():
        dump(r, os.path.join(out_dir, fname))
    return refs


def make(arch, fp8forge, ablations):
    base_seed = ARCHS[arch][2]
    out_dir = os.path.join(OUT_ROOT, arch)
    for attempt in range(MAX_SEED_TRIES):
        refs = build(arch, base_seed + 100 * attempt, fp8forge, out_dir)
        if refs is not None:
            break
        print(f"{arch}: a routing margin is below {MIN_ROUTING_MARGIN}, trying the next seed", flush=True)
    else:
        raise SystemExit(f"{arch}: no seed with routing margins >= {MIN_ROUTING_MARGIN}")
    r = refs["reference.json"]
    vocab = len(r["logits_window0"][0])
    summary = ", ".join(f"{k[:-5]} ppl {v['perplexity']:.6f}" for k, v in refs.items())
    print(f"{arch}: vocab {vocab}, {summary}", flush=True)
    if ablations:
        run_ablations(arch, out_dir)


@torch.no_grad()
def run_ablations(arch, model_dir):
    """Print how much each plausible runtime bug moves the perplexity and window-0 logits."""
    ids = [int(t) for t in open(os.path.join(model_dir, "tokens.txt")).read().split()]
    base = reference(load_f32(model_dir), ids, CTX)
    base_logits = torch.tensor(base["logits_window0"])

    def report(name, mutate):
        m = load_f32(model_dir)
        mutate(m)
        r = reference(m, ids, CTX)
        d = (torch.tensor(r["logits_window0"]) - base_logits).abs().max().item()
        print(f"  ablation {name:40s} ppl {base['perplexity']:8.4f} -> {r['perplexity']:8.4f}  max|dlogit| {d:.3e}")

    def each_gate(fn):
        return lambda m: [fn(g) for _, g in moe_gates(m)]

    def each_attn(fn):
        return lambda m: [fn(layer.self_attn) for layer in m.model.layers]

    def default_rope(m):
        re = m.model.rotary_emb
        d = m.config.qk_rope_head_dim if arch == "deepseek_v3" else re.inv_freq.numel() * 2
        base_theta = m.config.rope_parameters["rope_theta"]
        re.inv_freq = 1.0 / (base_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        re.attention_scaling = 1.0

    def rope_theta(theta):
        def f(m):
            re = m.model.rotary_emb
            d = re.inv_freq.numel() * 2
            re.inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))

        return f

    def gqa_tiled(attn):  # kv head j serves q heads j, j+n_kv, ... instead of j*n_rep .. j*n_rep+n_rep-1
        hd, nkv = attn.head_dim, attn.config.num_key_value_heads
        nq = attn.config.num_attention_heads
        rep = nq // nkv
        perm = torch.tensor([(h % nkv) * rep + h // nkv for h in range(nq)])
        w = attn.q_proj.weight.view(nq, hd, -1)
        attn.q_proj.weight.copy_(w[perm].reshape(nq * hd, -1))
        o = attn.o_proj.weight.view(-1, nq, hd)
        attn.o_proj.weight.copy_(o[:, perm].reshape(o.shape[0], -1))

    cases = []
    if arch == "deepseek_v3":
        cases += [
            ("rope not interleaved", lambda m: setattr(m.config, "rope_interleave", False)),
            ("plain RoPE instead of YaRN inv_freq", default_rope),
            ("softmax scale without mscale^2", each_attn(lambda a: setattr(a, "scaling", a.qk_head_dim**-0.5))),
            ("e_score_correction_bias ignored", each_gate(lambda g: g.e_score_correction_bias.zero_())),
            ("no group limit (topk_group = n_group)", each_gate(lambda g: setattr(g, "topk_group", g.num_group))),
            ("routed_scaling_factor 1.0", each_gate(lambda g: setattr(g, "routed_scaling_factor", 1.0))),
            ("norm_topk_prob false", each_gate(lambda g: setattr(g, "norm_topk_prob", False))),
            ("shared expert dropped", lambda m: [l.mlp.shared_experts.down_proj.weight.zero_()
                                                 for l in m.model.layers if hasattr(l.mlp, "shared_experts")]),
        ]
    else:
        cases += [
            ("rope_theta 10000", rope_theta(10000.0)),
            ("GQA heads mapped tiled", each_attn(gqa_tiled)),
            ("top_k 1", each_gate(lambda g: setattr(g, "top_k", 1))),
        ]
        if arch == "qwen3_moe":
            cases += [
                ("norm_topk_prob false", each_gate(lambda g: setattr(g, "norm_topk_prob", False))),
                ("q_norm/k_norm skipped",
                 each_attn(lambda a: (setattr(a, "q_norm", torch.nn.Identity()), setattr(a, "k_norm", torch.nn.Identity())))),
            ]
    print(f"{arch}: ablations (each one a plausible runtime bug)")
    for name, fn in cases:
        report(name, fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp8forge", default=os.environ.get("FP8FORGE") or shutil.which("fp8forge"))
    ap.add_argument("--only", choices=list(ARCHS), action="append")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ablations", action="store_true", help="also print how much plausible bugs move the numbers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    for arch in args.only or list(ARCHS):
        make(arch, args.fp8forge, args.ablations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
