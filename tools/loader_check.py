#!/usr/bin/env python3
"""fp8forge's output through the real loaders, on checkpoints made by transformers itself.

    tools/loader_check.sh [FP8FORGE_BIN]        # installs the environment, then runs this
    python tools/loader_check.py --fp8forge BIN [--keep DIR]

For each of deepseek_v3, mixtral and qwen3_moe: a small random-weight model is built with transformers'
own config and model classes (every quantized weight dimension a multiple of 128, so that
FineGrainedFP8Config's block-size derivation, rows // scale_rows, is right: see ARCHITECTURE.md's
pitfalls), re-initialised with a spread that makes its logits peaky (make_fixtures.reinit) and saved in
BF16 with save_pretrained. Then:

  bf16   perplexity of the BF16 checkpoint: transformers (float32) vs `fp8forge eval`
  fp8    `fp8forge convert IN OUT` (DeepSeek format, default rules), loaded by transformers with
         FineGrainedFP8Config(dequantize=True) (float32), vs `fp8forge eval --act-quant none` of OUT
         (weight-only, as transformers' dequantized model computes)
  ct     `fp8forge convert --format compressed-tensors IN OUT_CT`, decompressed by compressed-tensors'
         own config-driven dequantizer (CompressedTensorsDequantizer, float32), every FP8 weight compared
         bitwise with codes x weight_scale_inv of OUT (in float32) and, rounded to BF16, with
         `fp8forge dequant OUT`. Both sides compute one float32 product of the same E4M3 code and the
         same float32 scale, so anything but bitwise equality is a bug.

And for each architecture, its real tokenizer family (`tokenizers`' byte-level BPE with DeepSeek-V3's
and with Qwen's pre-tokenizer regexes, SentencePiece-style BPE with byte fallback as Mistral ships it),
trained here on the bundled held-out text and saved as tokenizer.json:

  text   `fp8forge eval --text` (the Rust `tokenizers` crate, fancy-regex) vs transformers' AutoTokenizer
         on the same text (numbers, CJK, kana, Cyrillic, combining accents, emoji, contractions, CRLF,
         runs of spaces): the same token count and the same perplexity (TOL), with a model whose
         vocabulary is the tokenizer's.

Perplexities agree within TOL relative, on N_TOKENS tokens in windows of CTX (ARCHITECTURE.md's protocol,
tools/eval_transformers.py's code). The tokens are sampled from the BF16 model itself, as
tools/make_fixtures.py does: on real text a random model's perplexity is astronomical (about 1e10 here)
and a wrong engine could not be told from a right one; on its own samples it is about exp(entropy).

Not checked, by design: decompressing compressed-tensors MoE experts through transformers. transformers
5.17-5.24 keeps experts fused (gate_up_proj [E, 2I, H]) and cannot decompress block-scaled fused experts
from any producer, llm-compressor's own output included; the expert tensors are compared here through
compressed-tensors' model-free dequantizer instead, which works on the on-disk per-expert names.

Prints one line per check and last `loader-check: N passed, M failed`; exits 1 when M > 0.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import transformers
from safetensors.torch import load_file

from eval_transformers import total_nll
from make_fixtures import reinit, sample_tokens, save_bf16

N_TOKENS, CTX, TOL = 512, 128, 1e-3
WEIGHT_STD, HEAD_STD = 0.06, 0.5  # as tools/make_fixtures.py


def deepseek_v3():
    # MLA: kv_a_proj_with_mqa has kv_lora_rank + qk_rope_head_dim rows, so both are multiples of 128.
    return transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=128, v_head_dim=128,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 128},
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )


def mixtral():
    return transformers.MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
    )


def qwen3_moe():
    return transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=256, head_dim=128, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, mlp_only_layers=[0], decoder_sparse_step=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False,
    )


ARCHS = {"deepseek_v3": (deepseek_v3, 101), "mixtral": (mixtral, 102), "qwen3_moe": (qwen3_moe, 103)}

# Text that exercises every branch of the pre-tokenizers below.
MIXED_TEXT = ("Numbers 1234567 and 3.14159, 2026-11-29; CJK 中文字符测试 日本語のテキスト カタカナ; "
              "Cyrillic Привет, мир! Greek αβγ; accents café naïve e\u0301; emoji 🙂🚀 ok; don't WE'LL it's;\n\n"
              "  tabs\tand   spaces   \r\n symbols <=> ==> @#$% [x] {y} (z) \"quoted\" `code`  \n")
# DeepSeek-V3's tokenizer.json: three isolated splits (digits in threes, CJK/kana runs, the rest).
DEEPSEEK_SPLITS = [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                   r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
# Qwen2/Qwen3's: case-insensitive contractions and a lookahead.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HELDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cli", "assets", "tiny-moe", "heldout.txt")


def train_tokenizer(arch, out_dir):
    """The tokenizer family `arch` ships with, trained on the held-out text; saved as tokenizer.json
    with a tokenizer_config.json. Returns the evaluation text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    with open(HELDOUT, encoding="utf-8") as f:
        text = f.read()
    if arch == "mixtral":
        tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    else:
        splits = DEEPSEEK_SPLITS if arch == "deepseek_v3" else [QWEN_SPLIT]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<s>", "</s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text[:60000], MIXED_TEXT], trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tk.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)
    return MIXED_TEXT + text[60000:61500] + MIXED_TEXT


def check_text(arch, bin_, work):
    """`fp8forge eval --text` against transformers' own tokenizer and model on the same text."""
    d = os.path.join(work, arch, "text")
    text = train_tokenizer(arch, d)
    cfg_fn, seed = ARCHS[arch]
    cfg = cfg_fn()
    cfg.vocab_size = transformers.AutoTokenizer.from_pretrained(d).vocab_size
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    reinit(model, seed, WEIGHT_STD, HEAD_STD)
    save_bf16(model, d)
    text_file = os.path.join(work, arch, "text.txt")
    with open(text_file, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    ids = transformers.AutoTokenizer.from_pretrained(d)(text, add_special_tokens=False)["input_ids"]
    out = json.loads(fp8forge(bin_, "eval", d, "--text", text_file, "--ctx", str(CTX), "--act-quant", "none",
                              "--json", "--quiet"))
    theirs = ppl_transformers(d, ids, fp8=False)
    rel = abs(out["perplexity"] - theirs) / theirs
    ok = out["tokens"] == len(ids) and rel <= TOL
    return ok, (f"{len(ids)} tokens (transformers) vs {out['tokens']} (fp8forge); perplexity transformers "
                f"{theirs:.6f}  fp8forge {out['perplexity']:.6f}  rel diff {rel:.1e}")


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def record(self, name, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1

    def run(self, name, fn):
        """fn() -> (ok, detail); an exception is a failure that names its last line."""
        try:
            ok, detail = fn()
        except Exception as e:  # a loader refusing our output is exactly what this check is for
            last = traceback.format_exception_only(e)[-1].strip()
            ok, detail = False, f"raised {last}"
        self.record(name, ok, detail)


def fp8forge(bin_, *args):
    r = subprocess.run([bin_, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fp8forge {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def make_checkpoint(arch, out_dir, tokens_file):
    """Save the BF16 checkpoint and write tokens sampled from it; returns the token ids."""
    cfg_fn, seed = ARCHS[arch]
    cfg = cfg_fn()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    reinit(model, seed, WEIGHT_STD, HEAD_STD)
    save_bf16(model, out_dir)  # narrows the model in place
    ids = sample_tokens(model.float().eval(), cfg.vocab_size, N_TOKENS, CTX, seed + 1000)
    with open(tokens_file, "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")
    return ids


def ppl_transformers(model_dir, ids, fp8):
    kw = {"quantization_config": transformers.FineGrainedFP8Config(dequantize=True)} if fp8 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    nll, n = total_nll(model, ids, CTX)
    return math.exp(nll / n)


def ppl_fp8forge(bin_, model_dir, tokens_file):
    out = fp8forge(bin_, "eval", model_dir, "--tokens", tokens_file, "--ctx", str(CTX),
                   "--act-quant", "none", "--json", "--quiet")
    return json.loads(out)["perplexity"]


def compare_ppl(bin_, model_dir, ids, tokens_file, fp8):
    ours, theirs = ppl_fp8forge(bin_, model_dir, tokens_file), ppl_transformers(model_dir, ids, fp8)
    rel = abs(ours - theirs) / theirs
    return rel <= TOL, f"transformers {theirs:.6f}  fp8forge {ours:.6f}  rel diff {rel:.1e}", theirs


def load_dir(d):
    tensors = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d, f)))
    return tensors


def block_dequant(q, scale_inv):
    """codes x scale_inv per 128x128 block, in float32 (the format contract)."""
    n, k = q.shape
    s = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return q.float() * s


def compare_ct(fp8_dir, ct_dir, bf16_dir):
    """Returns {"dense": (count, first mismatch or None), "experts": (...)}."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    ds, ct, ours_bf16 = load_dir(fp8_dir), load_dir(ct_dir), load_dir(bf16_dir)
    deq = CompressedTensorsDequantizer(ct_dir, dtype=torch.float32).validate(dict(ct))
    out = {"dense": [0, None], "experts": [0, None]}
    for name, q in sorted(ds.items()):
        if q.dtype != torch.float8_e4m3fn:
            continue
        kind = out["experts" if ".experts." in name else "dense"]
        kind[0] += 1
        ref = block_dequant(q, ds[name.removesuffix("weight") + "weight_scale_inv"])
        if name not in deq:
            why = "not dequantized by compressed-tensors (no matching scheme?)"
        elif not torch.equal(ct[name].view(torch.uint8), q.view(torch.uint8)):
            why = "codes differ between the two formats"
        elif deq[name].dtype != torch.float32 or not torch.equal(deq[name].view(torch.int32), ref.view(torch.int32)):
            diff = (deq[name].float() - ref).abs().max().item()
            why = f"compressed-tensors' f32 dequantization differs from codes x weight_scale_inv (max {diff:.3e})"
        elif not torch.equal(ours_bf16[name].view(torch.int16), ref.bfloat16().view(torch.int16)):
            why = "fp8forge dequant's BF16 differs from the f32 product rounded to BF16"
        else:
            continue
        if kind[1] is None:
            kind[1] = f"{name}: {why}"
    return out


def check_arch(arch, bin_, work, checks):
    bf16, fp8, ct, deq = (os.path.join(work, arch, s) for s in ("bf16", "fp8", "ct", "fp8-dequant"))
    tokens_file = os.path.join(work, arch, "tokens.txt")
    try:
        ids = make_checkpoint(arch, bf16, tokens_file)
        fp8forge(bin_, "convert", bf16, fp8, "--quiet")
        fp8forge(bin_, "convert", bf16, ct, "--format", "compressed-tensors", "--quiet")
        fp8forge(bin_, "dequant", fp8, deq, "--quiet")
    except Exception as e:
        checks.record(f"{arch} checkpoints", False, f"raised {traceback.format_exception_only(e)[-1].strip()}")
        return

    base = {}

    def bf16_check():
        ok, detail, base["ppl"] = compare_ppl(bin_, bf16, ids, tokens_file, fp8=False)
        return ok, detail

    def fp8_check():
        ok, detail, ppl = compare_ppl(bin_, fp8, ids, tokens_file, fp8=True)
        if "ppl" in base:
            detail += f"  (FP8 vs BF16 {100 * (ppl / base['ppl'] - 1):+.3f}%)"
        return ok, detail

    checks.run(f"{arch} bf16 ppl, transformers vs fp8forge eval", bf16_check)
    checks.run(f"{arch} fp8 ppl, FineGrainedFP8Config(dequantize=True) vs fp8forge eval", fp8_check)
    checks.run(f"{arch} tokenizer.json, AutoTokenizer + transformers vs fp8forge eval --text",
               lambda: check_text(arch, bin_, work))
    try:
        result = compare_ct(fp8, ct, deq)
    except Exception as e:
        result = {k: (0, f"raised {traceback.format_exception_only(e)[-1].strip()}") for k in ("dense", "experts")}
    for kind, (count, mismatch) in result.items():
        name = f"{arch} compressed-tensors decompression, {kind} weights"
        if mismatch is None and count > 0:
            checks.record(name, True, f"{count} tensors bitwise equal to fp8forge's (f32 and BF16)")
        else:
            checks.record(name, False, mismatch or "no FP8 tensors found")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp8forge", required=True, help="path of the fp8forge binary")
    ap.add_argument("--keep", help="write the checkpoints here and keep them (default: a temp dir)")
    a = ap.parse_args()
    bin_ = os.path.abspath(a.fp8forge)
    start = time.perf_counter()
    # One thread: these models are too small to gain from two, and on a shared 2-core machine torch's
    # second thread waiting at every op's barrier made sampling 10-15x slower (3.5 s against 50 s).
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    checks = Checks()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            check_arch(arch, bin_, a.keep or tmp, checks)
    print(f"({time.perf_counter() - start:.0f} s; transformers {transformers.__version__}, "
          f"torch {torch.__version__}, {N_TOKENS} tokens, ctx {CTX}, tolerance {TOL:g} relative)")
    print(f"loader-check: {checks.passed} passed, {checks.failed} failed")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
