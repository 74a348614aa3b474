#!/usr/bin/env python3
"""Perplexity of a Hugging Face checkpoint with transformers on the CPU, by the protocol of
ARCHITECTURE.md (consecutive windows of --ctx tokens, a last window kept if it has >= 2 tokens,
every token but a window's first scored, positions restarting at 0), in float32.

The reference side of bench/eval.sh: prints one JSON object with the perplexity, the tokens
scored, and the seconds from the start of model loading to the last window (imports excluded).

    python tools/eval_transformers.py MODEL_DIR TOKENS_FILE [--ctx 256] [--threads N]
"""
import argparse
import json
import math
import time

import torch
import transformers


def total_nll(model, ids, ctx):
    """(summed NLL, tokens scored) of `model` on `ids` by the protocol above."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids), ctx):
            w = ids[i : i + ctx]
            if len(w) < 2:
                continue
            x = torch.tensor([w])
            logits = model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits[:-1].double(), dim=-1)
            nll -= lp.gather(1, x[0, 1:, None]).sum().item()
            n += len(w) - 1
    return nll, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ids = [int(t) for t in open(a.tokens).read().split()]
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    loaded = time.perf_counter()
    nll, n = total_nll(model, ids, a.ctx)
    end = time.perf_counter()
    print(json.dumps({
        "perplexity": math.exp(nll / n),
        "nll_mean": nll / n,
        "tokens_scored": n,
        "tokens": len(ids),
        "seconds": end - start,
        "load_seconds": loaded - start,
        "tokens_per_second": len(ids) / (end - start),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
