#!/usr/bin/env bash
# Convert throughput against the durable copy, measured in the same run.
#
# Generates ~1 GiB of BF16 shards (DeepSeek-V3 expert-shaped weights), then times, on the same
# files, REPS times each: `cp` + `sync` of the shards (the copy at equal durability: conversion
# fsyncs every file it writes) and `fp8forge convert`, alternating, and alternating which of the
# two goes first. Before every run the output is removed, dirty pages are synced and the input
# is read once, so both start from the same warm page cache. Prints the median and the spread
# of both, the ratio convert/(cp+sync) (goal <= 1.0), the peak RSS of the conversion (from
# /usr/bin/time -v, mapped file pages included) against the largest tensor, and the load
# average, since other work on the machine moves the figures.
#
# Usage: bench/convert.sh [GiB=1] [workdir] [REPS=3]
# FP8FORGE=path/to/fp8forge times another build of the binary (after building this one).
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-1}
WORK=${2:-$(mktemp -d)}
REPS=${3:-3}
cargo build --release -q -p fp8forge-cli -p fp8forge-tests --bins --examples
BIN=${FP8FORGE:-target/release/fp8forge}
IN=$WORK/in OUT=$WORK/out COPY=$WORK/copy
rm -rf "$IN" "$OUT" "$COPY"
target/release/examples/make_bench_model "$IN" "$GIB"
[ -x /usr/bin/time ] || { echo "need /usr/bin/time (apt-get install time)" >&2; exit 1; }

# Same start for every run: nothing left of the last one, nothing dirty, the input cached.
fresh() {
  rm -rf "$OUT" "$COPY"
  sync
  cat "$IN"/*.safetensors > /dev/null
}
now() { date +%s.%N; }

copy_once() {
  fresh
  local t0 t1
  t0=$(now)
  mkdir -p "$COPY" && cp "$IN"/* "$COPY"/ && sync "$COPY"/*
  t1=$(now)
  copies+=("$(echo "$t1 - $t0" | bc)")
}
convert_once() {
  fresh
  local t0 t1
  t0=$(now)
  /usr/bin/time -v -o "$WORK/time.txt" "$BIN" convert "$IN" "$OUT" --quiet
  t1=$(now)
  converts+=("$(echo "$t1 - $t0" | bc)")
  rss+=("$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")")
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
copies=() converts=() rss=()
for i in $(seq "$REPS"); do
  # Which goes first alternates: each side follows the other's deletion equally often.
  if ((i % 2)); then copy_once; convert_once; else convert_once; copy_once; fi
  echo "run $i: cp+sync ${copies[-1]} s, convert ${converts[-1]} s (load $(cut -d' ' -f1 /proc/loadavg))"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf "$OUT" "$COPY"

bytes=$(cat "$IN"/*.safetensors | wc -c)
largest=$("$BIN" inspect "$IN" --json | python3 -c 'import json,sys; print(max(t["bytes"] for t in json.load(sys.stdin)["tensors"]))')
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
simd=$(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|avx512_fp16|sha_ni' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
python3 - "$bytes" "$largest" "${copies[*]}" "${converts[*]}" "${rss[*]}" <<PY
import statistics, sys
nbytes, largest = int(sys.argv[1]), int(sys.argv[2])
copy, conv, rss = ([float(x) for x in a.split()] for a in sys.argv[3:6])
mc, mv = statistics.median(copy), statistics.median(conv)
ratios = [v / c for v, c in zip(conv, copy)]
limit = 1.5 * largest + 256e6
peak = max(rss) * 1024
print(f"machine: $(nproc) cores, $cpu, {'$simd'.strip() or 'no AVX2'}; load before $load_before, after $load_after")
print(f"input: {nbytes/2**30:.2f} GiB BF16, largest tensor {largest/1e6:.1f} MB; {len(copy)} runs each, alternating")
print(f"cp+sync: median {mc:.2f} s ({nbytes/mc/1e9:.2f} GB/s), range {min(copy):.2f}-{max(copy):.2f} s")
print(f"convert: median {mv:.2f} s ({nbytes/mv/1e9:.2f} GB/s of input), range {min(conv):.2f}-{max(conv):.2f} s")
print(f"ratio convert/(cp+sync): {mv/mc:.2f} (medians; per run {min(ratios):.2f}-{max(ratios):.2f}) (goal <= 1.0): {'OK' if mv <= mc else 'SLOWER'}")
print(f"peak RSS: {peak/1e6:.1f} MB (limit 1.5 x largest + 256 MB = {limit/1e6:.1f} MB): {'OK' if peak <= limit else 'OVER'}")
PY
