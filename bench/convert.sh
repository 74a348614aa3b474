#!/usr/bin/env bash
# Convert throughput against the copy bound, measured in the same run.
#
# Generates ~1 GiB of BF16 shards (DeepSeek-V3 expert-shaped weights), then times, on the same
# files: `cp` + `sync` of the shards (the copy bound at equal durability: conversion fsyncs every
# file it writes) and `fp8forge convert`. Prints both times, their ratio, and the peak RSS of the
# conversion (from /usr/bin/time -v, mapped file pages included) against the largest tensor.
#
# Usage: bench/convert.sh [GiB=1] [workdir]
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-1}
WORK=${2:-$(mktemp -d)}
cargo build --release -q -p fp8forge-cli -p fp8forge-tests --bins --examples
BIN=target/release/fp8forge
IN=$WORK/in OUT=$WORK/out COPY=$WORK/copy
rm -rf "$IN" "$OUT" "$COPY"
target/release/examples/make_bench_model "$IN" "$GIB"
[ -x /usr/bin/time ] || { echo "need /usr/bin/time (apt-get install time)" >&2; exit 1; }

# Warm the page cache identically for both: read the input once.
cat "$IN"/*.safetensors > /dev/null
sync

t0=$(date +%s.%N)
mkdir -p "$COPY" && cp "$IN"/* "$COPY"/ && sync "$COPY"/*
t1=$(date +%s.%N)
rm -rf "$COPY"; sync
cat "$IN"/*.safetensors > /dev/null
t2=$(date +%s.%N)
/usr/bin/time -v -o "$WORK/time.txt" "$BIN" convert "$IN" "$OUT" --quiet
t3=$(date +%s.%N)

bytes=$(cat "$IN"/*.safetensors | wc -c)
largest=$("$BIN" inspect "$IN" --json | python3 -c 'import json,sys; print(max(t["bytes"] for t in json.load(sys.stdin)["tensors"]))')
rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
python3 - "$t0" "$t1" "$t2" "$t3" "$bytes" "$largest" "$rss_kb" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:5]); nbytes, largest, rss_kb = map(int, sys.argv[5:8])
copy, conv = t1 - t0, t3 - t2
limit = 1.5 * largest + 256e6
print(f"input: {nbytes/2**30:.2f} GiB BF16, largest tensor {largest/1e6:.1f} MB")
print(f"copy+sync: {copy:.2f} s ({nbytes/copy/1e9:.2f} GB/s)")
print(f"convert:   {conv:.2f} s ({nbytes/conv/1e9:.2f} GB/s of input)")
print(f"ratio convert/copy: {conv/copy:.2f} (goal <= 1.5)")
print(f"peak RSS: {rss_kb*1024/1e6:.1f} MB (limit 1.5 x largest + 256 MB = {limit/1e6:.1f} MB): {'OK' if rss_kb*1024 <= limit else 'OVER'}")
PY
