#!/usr/bin/env bash
# Evaluation speed: `fp8forge eval` against Hugging Face transformers (CPU, float32) on the same
# model and the same tokens, measured in the same run, with the peak RSS of each.
#
#   bench/eval.sh [MODEL_DIR] [N_TOKENS] [CTX]
#
# MODEL_DIR defaults to the bundled tiny MoE (cli/assets/tiny-moe); the tokens are the first
# N_TOKENS (default 32768) bytes of the held-out last 10% of ../shared/data/tinyshakespeare.txt
# (byte-level ids). Needs a Python with torch and transformers: set PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-cli/assets/tiny-moe}
N=${2:-32768}
CTX=${3:-256}
PY=${PYTHON:-python3}
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || { echo "bench/eval.sh: $DATA not found" >&2; exit 2; }
"$PY" -c "import torch, transformers" 2>/dev/null || { echo "bench/eval.sh: $PY lacks torch/transformers (set PYTHON)" >&2; exit 2; }
cargo build --release -q -p fp8forge-cli
BIN=target/release/fp8forge
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" - "$DATA" "$N" > "$work/tokens.txt" <<'PY'
import sys
b = open(sys.argv[1], "rb").read()
held = b[len(b) * 9 // 10:][: int(sys.argv[2])]
print(" ".join(str(x) for x in held))
PY
rss() { awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2/1024}' "$1"; }
/usr/bin/time -v "$BIN" eval "$MODEL" --tokens "$work/tokens.txt" --ctx "$CTX" --act-quant none --json --quiet \
  > "$work/ours.json" 2> "$work/ours.time"
/usr/bin/time -v "$PY" tools/eval_transformers.py "$MODEL" "$work/tokens.txt" --ctx "$CTX" \
  > "$work/hf.json" 2> "$work/hf.time"
"$PY" - "$work/ours.json" "$work/hf.json" "$(rss "$work/ours.time")" "$(rss "$work/hf.time")" "$(nproc)" <<'PY'
import json, sys
o, h = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
rel = abs(o["perplexity"] / h["perplexity"] - 1)
print(f"model {o['model']} ({o['model_type']}, {o['weights']}), {o['tokens']} tokens, ctx {o['ctx']}, {sys.argv[5]} cores")
print(f"perplexity: fp8forge {o['perplexity']:.6f}  transformers {h['perplexity']:.6f}  (relative difference {rel:.1e})")
print(f"fp8forge eval:  {o['seconds']:7.2f} s  {o['tokens_per_second']:9.0f} tokens/s  peak RSS {sys.argv[3]} MB")
print(f"transformers:   {h['seconds']:7.2f} s  {h['tokens_per_second']:9.0f} tokens/s  peak RSS {sys.argv[4]} MB"
      f"  (torch {h['torch']}, transformers {h['transformers']}, {h['torch_threads']} threads)")
print(f"speed ratio fp8forge / transformers: {o['tokens_per_second'] / h['tokens_per_second']:.2f}x")
PY
