#!/usr/bin/env python3
"""Train the tiny byte-level DeepSeek-V3-style MoE bundled as `cli/assets/tiny-moe/`.

What it does
  * reads ../shared/data/tinyshakespeare.txt (never copied into the repo); the FIRST 90% of its bytes
    (`split = len(data) * 9 // 10`) are the training set, the last 10% the held-out set;
  * byte-level tokens: vocab 256, token id = byte value (no BOS/EOS, no special tokens);
  * builds a `DeepseekV3ForCausalLM` with transformers' own classes (MLA with q/kv LoRA, YaRN RoPE,
    interleaved rope, sigmoid group-limited routing with e_score_correction_bias, 1 shared expert,
    first layer dense) and trains it with AdamW in float32 on the CPU;
  * MoE load balancing: DeepSeek-V3's aux-loss-free bias update (e_score_correction_bias += u * sign(mean
    load - load) after every step) plus a small batch-wise balance loss (alpha = 1e-3);
  * writes the model as transformers saves it (`save_pretrained`: config.json, generation_config.json,
    model.safetensors in BF16; e_score_correction_bias kept F32 as on the DeepSeek hub checkpoints), plus
    a `tokenizer.json` for the HF `tokenizers` library mapping every byte to id = byte value;
  * reloads the saved BF16 checkpoint in float32 (eager attention and experts) and measures train and
    held-out byte perplexity with the ARCHITECTURE.md protocol (ctx 256, non-overlapping windows, every
    token but each window's first scored), and prints the numbers for TRAINING.md.

How to run (from the repository root; ~30-40 min on 2 shared CPU cores):
    nohup nice -n 10 /work/pyenv/bin/python tools/train_tiny.py > /tmp/train_tiny.log 2>&1 &
Options: --steps N (default 3000), --threads N (default 2), --out DIR, --data FILE, --eval-only.
Deterministic given the seed, thread count and torch build (CPU float32 reductions can differ between
machines, so bitwise-identical weights are only expected on the same setup).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

SEED = 1234
CTX = 256
BATCH = 16
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
DEFAULT_OUT = os.path.join(REPO, "cli", "assets", "tiny-moe")


def make_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,  # dense MLP of layer 0
        moe_intermediate_size=128,
        num_hidden_layers=4,  # layer 0 dense, layers 1..3 MoE
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=CTX,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rope_interleave=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        rms_norm_eps=1e-6,
    )


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}  # id = byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def check_tokenizer(tok, heldout_bytes):
    text = heldout_bytes.decode("utf-8")
    ids = tok.encode(text).ids
    assert ids == list(heldout_bytes), "tokenizer does not map the held-out text to its bytes"
    sample = "Ünïcödé → ok\n\ttab\r\nemoji 🙂 and NUL-free bytes ~\x7f\n"
    ids = tok.encode(sample).ids
    assert ids == list(sample.encode("utf-8")), "tokenizer does not map non-ASCII text to its UTF-8 bytes"
    assert tok.decode(ids) == sample, "tokenizer decode is not the inverse of encode"
    assert tok.get_vocab_size() == 256


def windows(ids, ctx):
    """Protocol windows: consecutive, non-overlapping, last one kept if it has >= 2 tokens."""
    out = []
    for s in range(0, len(ids), ctx):
        w = ids[s : s + ctx]
        if len(w) >= 2:
            out.append(w)
    return out


@torch.no_grad()
def perplexity(model, ids, ctx, batch=16):
    """exp(mean NLL) over every token but each window's first; positions restart at 0 per window."""
    ws = windows(ids, ctx)
    total, count = 0.0, 0
    full = [w for w in ws if len(w) == ctx]
    rest = [w for w in ws if len(w) != ctx]
    for i in range(0, len(full), batch):
        x = torch.tensor(full[i : i + batch], dtype=torch.long)
        logits = model(input_ids=x).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    for w in rest:
        x = torch.tensor([w], dtype=torch.long)
        logits = model(input_ids=x).logits.float()
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += nll.item()
        count += len(w) - 1
    return math.exp(total / count), total / count, count


def unigram_ppl(train_ids, heldout_ids):
    counts = torch.bincount(torch.tensor(train_ids), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    h = torch.tensor(heldout_ids)
    return math.exp(-logp[h].mean().item())


def save_model(model, tok, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    model = model.to(torch.bfloat16)
    # transformers keeps e_score_correction_bias in float32 (_keep_in_fp32_modules_strict) and the DeepSeek
    # hub checkpoints store it as F32; `.to(bfloat16)` would have narrowed it, so restore float32.
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    model.save_pretrained(out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)


def load_eval_model(out_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    m.eval()
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if not os.path.exists(args.data):
        print(f"skip: {args.data} not found (the shared tinyshakespeare.txt is required)")
        return 0
    data = open(args.data, "rb").read()
    split = len(data) * 9 // 10
    train_ids, heldout_ids = list(data[:split]), list(data[split:])
    print(f"data: {len(data)} bytes, train {len(train_ids)}, held-out {len(heldout_ids)}", flush=True)

    tok = make_tokenizer()
    check_tokenizer(tok, data[split:])
    print("tokenizer: held-out text and a non-ASCII sample encode to exactly their bytes", flush=True)

    from transformers import DeepseekV3ForCausalLM

    t0 = time.time()
    if not args.eval_only:
        torch.manual_seed(SEED)
        cfg = make_config()
        model = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="sdpa", experts_implementation="grouped_mm")
        model.float().train()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"params: {n_params} ({2 * n_params / 1e6:.2f} MB in BF16)", flush=True)

        gates = [l.mlp.gate for l in model.model.layers if hasattr(l.mlp, "gate")]
        stash = {}

        def hook(mod, inp, out):
            stash[id(mod)] = out  # (router_logits, topk_weights, topk_indices)

        for g in gates:
            g.register_forward_hook(hook)

        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in n else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
        warmup = 100

        def lr_at(step):
            if step < warmup:
                return args.lr * (step + 1) / warmup
            prog = (step - warmup) / max(1, args.steps - warmup)
            return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

        gen = torch.Generator().manual_seed(SEED)
        train_t = torch.tensor(train_ids, dtype=torch.long)
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        bias_u, alpha = 1e-3, 1e-3
        ema = None
        for step in range(args.steps):
            for gparam in opt.param_groups:
                gparam["lr"] = lr_at(step)
            starts = torch.randint(0, len(train_ids) - CTX - 1, (BATCH,), generator=gen)
            x = torch.stack([train_t[s : s + CTX] for s in starts.tolist()])
            y = torch.stack([train_t[s + 1 : s + CTX + 1] for s in starts.tolist()])
            stash.clear()
            logits = model(input_ids=x).logits
            lm_loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
            aux = 0.0
            loads = []
            for g in gates:
                router_logits, _, idx = stash[id(g)]
                s = router_logits.sigmoid()
                p = (s / s.sum(-1, keepdim=True)).mean(0)
                cnt = torch.bincount(idx.reshape(-1), minlength=E).float()
                f = cnt * E / (K * idx.shape[0])
                aux = aux + alpha * (f * p).sum()
                loads.append(cnt)
            loss = lm_loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():  # aux-loss-free balancing (DeepSeek-V3 section 2.1.2)
                for g, cnt in zip(gates, loads):
                    g.e_score_correction_bias += bias_u * torch.sign(cnt.mean() - cnt)
            ema = lm_loss.item() if ema is None else 0.98 * ema + 0.02 * lm_loss.item()
            if step % 50 == 0 or step == args.steps - 1:
                load_str = " ".join(
                    "[" + ",".join(f"{v:.2f}" for v in (c / c.sum()).tolist()) + "]" for c in loads
                )
                print(
                    f"step {step:5d} lr {lr_at(step):.2e} loss {lm_loss.item():.4f} ema {ema:.4f} "
                    f"(ppl {math.exp(ema):.3f}) aux {float(aux.detach() if torch.is_tensor(aux) else aux):.5f} t {time.time() - t0:.0f}s load {load_str}",
                    flush=True,
                )
        for g in gates:
            print("e_score_correction_bias", [round(v, 4) for v in g.e_score_correction_bias.tolist()])
        for h in list(gates):
            h._forward_hooks.clear()
        save_model(model, tok, args.out)
        print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)

    m = load_eval_model(args.out)
    ppl_h, nll_h, n_h = perplexity(m, heldout_ids, CTX)
    # train ppl on an evenly spaced subset of protocol windows of the training bytes (every 8th window)
    tw = windows(train_ids, CTX)[::8]
    sub = [t for w in tw for t in w]
    ppl_t, nll_t, n_t = perplexity(m, sub, CTX)
    uni = unigram_ppl(train_ids, heldout_ids)
    res = {
        "heldout_perplexity": ppl_h,
        "heldout_nll_mean": nll_h,
        "heldout_tokens_scored": n_h,
        "train_subset_perplexity": ppl_t,
        "train_subset_tokens_scored": n_t,
        "unigram_heldout_perplexity": uni,
        "wall_seconds": round(time.time() - t0),
    }
    print("RESULT " + json.dumps(res), flush=True)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"model.safetensors: {size} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
