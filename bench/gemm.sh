#!/usr/bin/env bash
# FP8 GEMM kernels on a GPU: the acceptance tests (every variant against the CPU reference) and
# `fp8forge bench gemm` on DeepSeek-V3's shapes, ours next to cuBLASLt BF16 and FP8 in one run.
#
# The device machine has no Rust: build here, carry the two binaries, run there.
#
#   bench/gemm.sh build               # here: release binaries -> target/release/{fp8forge,fp8forge-gpu-tests}
#   bench/gemm.sh test                # device: GPU tests (FP8FORGE_REQUIRE_GPU=1), report in $OUT
#   bench/gemm.sh bench [ARGS...]     # device: bench gemm --deepseek-v3 (or ARGS), JSON + table in $OUT
#   bench/gemm.sh all                 # device: test, then bench
#
# Results go to $OUT (the device tool's output folder) or a temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
[ $# -gt 0 ] && shift
OUT=${OUT:-$(mktemp -d)}
BIN=${FP8FORGE_BIN:-target/release/fp8forge}
GPU_TESTS=${FP8FORGE_GPU_TESTS:-target/release/fp8forge-gpu-tests}

build() {
    set -e
    cargo build --release -p fp8forge-cli
    local exe
    exe=$(cargo test --release -p fp8forge-kernels --test gpu --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])' | tail -1)
    [ -n "$exe" ] || { echo "gemm.sh: could not find the gpu test binary" >&2; exit 1; }
    local dir=${CARGO_TARGET_DIR:-target}/release
    mkdir -p target/release
    cp "$exe" target/release/fp8forge-gpu-tests
    [ "$dir/fp8forge" -ef target/release/fp8forge ] || cp "$dir/fp8forge" target/release/fp8forge
    strip target/release/fp8forge target/release/fp8forge-gpu-tests 2>/dev/null || true
    ls -la target/release/fp8forge target/release/fp8forge-gpu-tests
    echo "carry: target/release/fp8forge target/release/fp8forge-gpu-tests; run: bash bench/gemm.sh all"
}

device_info() {
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/gpu.txt"
}

run_tests() {
    [ -x "$GPU_TESTS" ] || { echo "gemm.sh: $GPU_TESTS missing (run 'bench/gemm.sh build' here and carry it)" >&2; return 1; }
    FP8FORGE_REQUIRE_GPU=1 FP8FORGE_GPU_REPORT="$OUT/gpu_report.tsv" RUST_BACKTRACE=1 \
        "$GPU_TESTS" --test-threads=1 2>&1 | tee "$OUT/gpu_tests.log"
    local rc=${PIPESTATUS[0]}
    echo "gpu tests: exit $rc; per-variant errors in $OUT/gpu_report.tsv"
    return "$rc"
}

run_bench() {
    [ -x "$BIN" ] || { echo "gemm.sh: $BIN missing (run 'bench/gemm.sh build' here and carry it)" >&2; return 1; }
    local args=("$@")
    [ ${#args[@]} -eq 0 ] && args=(--deepseek-v3)
    "$BIN" bench gemm "${args[@]}" --json > "$OUT/bench.json" 2> "$OUT/bench.err"
    local rc=$?
    python3 - "$OUT/bench.json" <<'PY' | tee "$OUT/bench.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no JSON: {e}"); sys.exit(0)
print(f"device: {r['device']} ({r['arch']}, {r['sms']} SMs, driver {r['driver_version']}), kernels {r['kernel_hash'][:12]}")
shapes = []
for row in r["rows"]:
    s = (row["m"], row["n"], row["k"], row["groups"])
    if s not in shapes: shapes.append(s)
print(f"| M | N×K | E | ours TFLOP/s (config) | cuBLASLt BF16 | cuBLASLt FP8 block | ours/BF16 | ours/FP8 | rel_err ours |")
print("|---|---|---|---|---|---|---|---|---|")
for s in shapes:
    rows = [x for x in r["rows"] if (x["m"], x["n"], x["k"], x["groups"]) == s]
    def best(impl):
        c = [x for x in rows if x["impl"] == impl and x["tflops"]]
        return max(c, key=lambda x: x["tflops"]) if c else None
    o, b, f = best("fp8forge"), best("cublaslt_bf16"), best("cublaslt_fp8_block")
    t = lambda x: f"{x['tflops']:.0f}" if x else "-"
    ratio = lambda a, c: f"{a['tflops']/c['tflops']:.2f}" if a and c else "-"
    ours = f"{t(o)} ({o['config']})" if o else "- (" + "; ".join(x.get("error") or "?" for x in rows if x["impl"] == "fp8forge") + ")"
    err = f"{o['rel_err']:.1e}" if o and o["rel_err"] is not None else "-"
    print(f"| {s[0]} | {s[1]}×{s[2]} | {s[3]} | {ours} | {t(b)} | {t(f)} | {ratio(o, b)} | {ratio(o, f)} | {err} |")
PY
    echo "bench: exit $rc (stderr in $OUT/bench.err)"
    return "$rc"
}

case "$MODE" in
    build) build ;;
    test) device_info; run_tests ;;
    bench) device_info; run_bench "$@" ;;
    all) device_info; run_tests; t=$?; run_bench "$@"; b=$?; device_info; exit $(( t || b )) ;;
    *) echo "usage: bench/gemm.sh build|test|bench [ARGS]|all" >&2; exit 2 ;;
esac
